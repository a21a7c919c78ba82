"""Benchmark of every path on the test model zoo: PTQ int8, the microcontroller export, optimize prune + QAT.

Run with `tfcompress benchmark_zoo` (a few minutes on 2 cores). Each zoo model (`tfcompress.models.zoo`:
ResNet-8, DS-CNN, MobileNet v1 0.25, the dense autoencoder, a two-output CNN, an unrolled GRU) is trained
briefly on its shipped or generated data, then taken through `convert` (int8, uint8 I/O), `convert
--target micro` and `optimize --prune --qat`, each a full verified run. One row per model and path: float
and int8 accuracy (or fidelity: the worst output's SQNR and top-1 agreement), bytes, gzip -9 bytes,
single-thread latency (LiteRT with XNNPACK, fresh process), TFLM against LiteRT's reference kernels (max
steps, top-1 agreement), the arena (recorded, and the size that ran), and the exit status: a refused path
is a result, with its one-line message. Targets: every cell exits 0; PTQ within 0.5 points of float on each
classifier; the model `optimize --qat` ships at or above PTQ on each classifier; the autoencoder's SQNR
above its gate. Writes `benchmark_zoo.{json,md}` to --output_dir.
"""

from __future__ import annotations

import gzip
import os
import time

import numpy as np
from absl import flags

from pipelines import _benchmark, _common
from tfcompress.analysis import latency
from tfcompress.conversion import fidelity
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.core.errors import EXIT_BAD_INPUT, TfcompressError
from tfcompress.models import zoo
from tfcompress.runs import optimize, pipeline

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_zoo", "Where the results go.")
_MODELS = flags.DEFINE_list("models", list(zoo.ZOO), "Zoo models to run.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of training, fine-tuning and calibration sampling.")
_SPARSITY = flags.DEFINE_float("final_sparsity", 0.5, "Sparsity of the optimize path's pruning.")
_PRUNE_EPOCHS = flags.DEFINE_integer("prune_epochs", 2, "Pruning fine-tune epochs.", lower_bound=1)
_QAT_EPOCHS = flags.DEFINE_integer("qat_epochs", 1, "QAT fine-tune epochs.", lower_bound=1)
_LATENCY_RUNS = flags.DEFINE_integer("latency_runs", 100, "Single-thread invokes timed per model.", lower_bound=1)

MAX_PTQ_DROP = 0.005
OPTIMIZE_MAX_DROP = 0.01  # optimize's own default: int8 against the fine-tuned Keras model it converts
NUM_CALIBRATION = 200
PATHS = ("PTQ int8", "micro", "optimize prune+QAT")


def main(argv: list[str]) -> None:
    del argv
    for name in _MODELS.value:
        zoo.get(name)  # an unknown name is one line before any training
    summary = run_benchmark(_OUTPUT.value, _MODELS.value, _SEED.value, _SPARSITY.value, _PRUNE_EPOCHS.value,
                            _QAT_EPOCHS.value, _LATENCY_RUNS.value)
    print(summary["tables"])


def run_benchmark(output_dir: str, names: list[str], seed: int = 0, final_sparsity: float = 0.5,
                  prune_epochs: int = 2, qat_epochs: int = 1, latency_runs: int = 100) -> dict:
    os.makedirs(output_dir, exist_ok=True)
    start_all = time.perf_counter()
    rows = {}
    for name in names:
        start = time.perf_counter()
        model, data = zoo.train(name, seed=seed)
        train_seconds = time.perf_counter() - start
        files = zoo.write_run_files(model, data, os.path.join(output_dir, name, "inputs"))
        entry = zoo.get(name)
        labels = _eval_labels(entry)
        common = dict(keras_model=files.keras_model, calibration_data=files.calibration_data,
                      calibration_key="x", eval_data=files.eval_data, num_calibration_samples=NUM_CALIBRATION,
                      max_accuracy_drop=MAX_PTQ_DROP, seed=seed, overwrite=True, latency_runs=0, **labels)
        for path in PATHS:
            out = os.path.join(output_dir, name, _benchmark.slug(path))
            start = time.perf_counter()
            try:
                row = _run_path(path, entry, data, files, common, out, final_sparsity, prune_epochs, qat_epochs,
                                seed, latency_runs)
            except (TfcompressError, ValueError) as e:
                row = {"exit": getattr(e, "exit_code", EXIT_BAD_INPUT), "error": " ".join(str(e).split())}
            rows[f"{name} / {path}"] = row | {"model": name, "path": path, "train_seconds": round(train_seconds, 1),
                                              "seconds": round(time.perf_counter() - start, 1)}
    summary = {"rows": rows, "targets": _targets(rows)}
    tables = render(summary, time.perf_counter() - start_all)
    write_json(os.path.join(output_dir, "benchmark_zoo.json"), summary)
    write_atomic(os.path.join(output_dir, "benchmark_zoo.md"), (tables + "\n").encode())
    return summary | {"tables": tables}


def _eval_labels(entry: zoo.ZooModel) -> dict:
    """How each task's evaluation data is labelled for the convert run."""
    if entry.task is zoo.Task.REGRESSION:
        return {"eval_labels_key": "x_test"}  # an autoencoder reconstructs its inputs
    if entry.task is zoo.Task.MULTI_OUTPUT:
        return {"eval_output": entry.builder().output_names[0]}
    return {}


def _run_path(path, entry, data, files, common, out, final_sparsity, prune_epochs, qat_epochs, seed,
              latency_runs) -> dict:
    if path == "optimize prune+QAT":
        train = os.path.join(os.path.dirname(out), "inputs", "train.npz")
        labels = data.y_train
        extra = {"max_accuracy_drop": OPTIMIZE_MAX_DROP}
        if entry.task is zoo.Task.REGRESSION:  # an autoencoder is trained on its own inputs
            np.savez(train, x_train=data.x_train)
            extra |= {"train_labels_key": "x_train", "eval_labels_key": "x_test"}
        elif isinstance(labels, dict):  # a multi-output model: one labels array per output, in output order
            names = entry.builder().output_names
            np.savez(train, x_train=data.x_train, **{f"y_train_{name}": labels[name] for name in names})
            extra |= {"train_labels_key": ",".join(f"y_train_{name}" for name in names)}
        else:
            np.savez(train, x_train=data.x_train, y_train=labels)
        result = optimize.run_optimize(optimize.OptimizeConfig(
            output_dir=out, train_data=train, prune=True, final_sparsity=final_sparsity, qat=True,
            prune_epochs=prune_epochs, qat_epochs=qat_epochs,
            **({k: v for k, v in common.items() if k in _OPTIMIZE_FIELDS} | extra)))
        convert_stage = result.stages[-1]
        row = _tflite_numbers(result.model_path, latency_runs)
        shipped = result.shipped or {}
        candidates = shipped.get("candidates", {})
        measured = convert_stage.get("fidelity") or {}
        return row | {"exit": 0, "float_accuracy": result.stages[0].get("eval_accuracy"),
                      "int8_accuracy": convert_stage.get("eval_accuracy"),
                      "min_sqnr_db": min((o["sqnr_db"] for o in measured.get("outputs", [])), default=None),
                      "shipped": shipped.get("candidate", "qat"), "shipped_reason": shipped.get("reason"),
                      "candidates_eval_accuracy": {name: c.get("eval_accuracy") for name, c in candidates.items()},
                      "candidates_validation": {name: c.get("validation_accuracy") if c.get("validation_mse") is None
                                                else c.get("validation_mse") for name, c in candidates.items()}}
    result = pipeline.run_convert(pipeline.ConvertPipelineConfig(
        output_dir=out, target="micro" if path == "micro" else None, debug_layers=False, **common))
    row = _tflite_numbers(result.model_path, latency_runs) | {"exit": 0}
    accuracy, measured = result.verification.accuracy, result.verification.fidelity
    if accuracy is not None:
        row |= {"float_accuracy": accuracy.float_accuracy, "int8_accuracy": accuracy.tflite_accuracy}
    if measured is not None:
        row |= {"min_sqnr_db": min(o.sqnr_db for o in measured.outputs),
                "min_top1_agreement": min((o.top1_agreement for o in measured.outputs
                                           if o.top1_agreement is not None), default=None)}
    micro = result.report.get("micro")
    if micro:
        check, arena = micro["tflm_check"], micro["arena"]
        row |= {"tflm_max_steps": check["max_step_difference"], "tflm_tolerance_steps": check["tolerance_steps"],
                "tflm_top1_agreement": check["top1_agreement"], "arena_recorded_bytes": arena["recorded_bytes"],
                "arena_bytes": arena["arena_bytes"], "arena_smallest_run_bytes": arena.get("smallest_run_bytes")}
    return row


_OPTIMIZE_FIELDS = ("keras_model", "calibration_data", "calibration_key", "eval_data", "eval_output",
                    "num_calibration_samples",
                    "max_accuracy_drop", "seed", "overwrite", "latency_runs")


def _tflite_numbers(path: str, latency_runs: int) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    timing = latency.measure_latency(path, num_runs=latency_runs, num_threads=1)
    return {"bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9, mtime=0)),
            "latency_median_ms": round(timing.median_ms, 4)}


def _targets(rows: dict) -> dict:
    targets = _benchmark.failed_paths(rows)
    for row in rows.values():
        if "error" in row:
            continue
        task = zoo.get(row["model"]).task
        if row["path"] == "PTQ int8" and row.get("float_accuracy") is not None:
            targets[f"{row['model']}: PTQ accuracy drop"] = _benchmark.target(
                row["float_accuracy"] - row["int8_accuracy"], MAX_PTQ_DROP, True, "PTQ lost accuracy")
        evaluated = row.get("candidates_eval_accuracy") or {}
        if row["path"] == "optimize prune+QAT" and None not in (evaluated.get("qat"), evaluated.get("ptq")):
            # The choice reads the validation split; this measures it on the evaluation data it never saw.
            targets[f"{row['model']}: optimize's shipped model at or above its PTQ candidate (eval)"] = (
                _benchmark.target(evaluated[row["shipped"]] - evaluated["ptq"], 0.0, False,
                                  f"shipped {row['shipped']} by validation, below PTQ on the evaluation data"))
        if row["path"] == "PTQ int8" and task is zoo.Task.REGRESSION:
            targets[f"{row['model']}: output SQNR (dB)"] = _benchmark.target(
                row["min_sqnr_db"], fidelity.DEFAULT_MIN_OUTPUT_SQNR_DB, False, "below the fidelity gate")
    return targets


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def render(summary: dict, total_seconds: float) -> str:
    lines = ["| model | path | exit | float acc | int8 acc | min SQNR dB | min top-1 agr | bytes | gzip -9 | "
             "latency ms | TFLM max / tol steps | TFLM top-1 agr | arena recorded / run | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"].values():
        if "error" in row:
            lines.append(f"| {row['model']} | {row['path']} | {row['exit']} | {row['error'][:160]} "
                         "| | | | | | | | | | |")
            continue
        tflm = (f"{row['tflm_max_steps']} / {row['tflm_tolerance_steps']}" if "tflm_max_steps" in row else "–")
        arena = "–"
        if "arena_bytes" in row:
            arena = f"{row['arena_recorded_bytes']:,} / {row['arena_bytes']:,}"
        lines.append(
            f"| {row['model']} | {row['path']} | {row['exit']} | {_fmt(row.get('float_accuracy'), '.4f')} | "
            f"{_fmt(row.get('int8_accuracy'), '.4f')} | {_fmt(row.get('min_sqnr_db'), '.1f')} | "
            f"{_fmt(row.get('min_top1_agreement'), '.4f')} | {row['bytes']:,} | {row['gzip_bytes']:,} | "
            f"{row['latency_median_ms']:.3f} | {tflm} | {_fmt(row.get('tflm_top1_agreement'), '.4f')} | {arena} | "
            f"{row['seconds']:.1f} |")
    return _benchmark.finish_tables(lines, summary["targets"], total_seconds)


if __name__ == "__main__":
    _common.run(main)
