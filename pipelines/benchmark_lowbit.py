"""Benchmark of low-bit QAT weights (int8, int4, int2, ternary, binary, pow2) on the demo LeNet-5.

Run with `tfcompress benchmark_lowbit [--saved_model_dir=artefacts/demo/float_savedmodel]` (after `make demo`).
Per scheme, `optimize --qat --qat_weights=<scheme>` fine-tunes the demo model (first and last layers kept at
int8, the default) on the MNIST training split (validation cut from its end) and converts it to full-int8
with uint8 I/O; then the `.tflite` is measured: accuracy on the 10,000 MNIST test images (LiteRT), the most
distinct int8 values in one output channel of the low-bit layers (from the flatbuffer), bytes and gzip -9
bytes, the TFLM flash image uncompressed and LUT-compressed (`export --compress`), TFLM's top-1 agreement
with LiteRT on --tflm_samples test images, and whether the compressed model's outputs equal the uncompressed
ones in TFLM. The float model's own `.tflite` accuracy is the reference. Prints Markdown tables and writes
them with every number to --output_dir. A failed scheme or a missed target is reported; neither fails the run.
"""

from __future__ import annotations

import gzip
import os
import time

import numpy as np
from absl import flags

from pipelines import _benchmark, _common
from tfcompress.core._keras import tf
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.models import baseline
from tfcompress.runs import optimize, pipeline
from tfcompress.runs.demo import CALIBRATION
from tfcompress.targets.export import build_micro_export
from tfcompress.training.cluster import distinct_values

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_lowbit", "Where the results go.")
_MODEL = flags.DEFINE_string("saved_model_dir", "artefacts/demo/float_savedmodel",
                             "The trained LeNet-5 (SavedModel, or a .keras/.h5 file): the demo's.")
_SCHEMES = flags.DEFINE_list("schemes", ["int8", "int4", "int2", "ternary", "binary", "pow2"],
                             "The --qat_weights schemes to run.")
_QAT_EPOCHS = flags.DEFINE_integer("qat_epochs", 2, "QAT fine-tune epochs per scheme.", lower_bound=1)
_TFLM_SAMPLES = flags.DEFINE_integer("tflm_samples", 1000, "Test images run through TFLM per model.",
                                     lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the fine-tunes.")

FLOAT = "float32 (reference)"
# Ternary Weight Networks (Li & Liu, 2016), LeNet-5 on MNIST: full precision 99.41%, ternary 99.35%, binary 99.05%.
ANCHORS = {"float": 0.9941, "ternary": 0.9935, "binary": 0.9905}


def main(argv: list[str]) -> None:
    del argv
    summary = run_benchmark(_OUTPUT.value, _MODEL.value, schemes=tuple(_SCHEMES.value), qat_epochs=_QAT_EPOCHS.value,
                            tflm_samples=_TFLM_SAMPLES.value, seed=_SEED.value)
    print(summary["tables"])


def run_benchmark(output_dir: str, model: str, schemes=("int8", "int4", "int2", "ternary", "binary", "pow2"),
                  qat_epochs: int = 2, tflm_samples: int = 1000, seed: int = 0) -> dict:
    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    source = {"keras_model": model} if os.path.isfile(model) else {"saved_model_dir": model}
    data = baseline.load_mnist()
    uint8 = np.clip(np.round(data.x_test[:tflm_samples] / baseline.MNIST_SCALE), 0, 255).astype(np.uint8)
    rows = {FLOAT: _float_row(output_dir, source, seed)}
    for scheme in schemes:
        print(f"Scheme: {scheme} ...", flush=True)
        rows[scheme] = _run_scheme(output_dir, source, scheme, qat_epochs, seed, uint8, data.y_test[:tflm_samples])
    reference = rows[FLOAT]
    for row in rows.values():
        if "error" not in row and "error" not in reference:
            row["delta_points"] = (row["accuracy"] - reference["accuracy"]) * 100
    summary = {"schema_version": 1, "model": model, "seed": seed, "qat_epochs": qat_epochs,
               "tflm_samples": int(len(uint8)), "cpu_count": os.cpu_count(), "tensorflow": tf.__version__,
               "anchors": ANCHORS, "rows": rows, "targets": _targets(rows)}
    summary["total_seconds"] = time.perf_counter() - start
    tables = render(summary)
    write_json(os.path.join(output_dir, "benchmark_lowbit.json"), summary)
    write_atomic(os.path.join(output_dir, "benchmark_lowbit.md"), (tables + "\n").encode())
    return summary | {"tables": tables}


def _float_row(output_dir: str, source: dict, seed: int) -> dict:
    start = time.perf_counter()
    try:
        result = pipeline.run_convert(pipeline.ConvertPipelineConfig(
            output_dir=os.path.join(output_dir, "float32"), mode="float32", eval_data=str(baseline.MNIST_PATH),
            input_scale=baseline.MNIST_SCALE, seed=seed, overwrite=True, latency_runs=0, **source))
    except Exception as e:  # a failed path is a result of the benchmark, not the end of it
        return _failed(FLOAT, e, start)
    data = open(result.model_path, "rb").read()
    return {"accuracy": result.verification.accuracy.tflite_accuracy, "bytes": len(data),
            "gzip9_bytes": len(gzip.compress(data, 9, mtime=0)), "seconds": time.perf_counter() - start}


def _run_scheme(output_dir, source, scheme, qat_epochs, seed, tflm_inputs, tflm_labels) -> dict:
    start = time.perf_counter()
    try:
        result = optimize.run_optimize(optimize.OptimizeConfig(
            output_dir=os.path.join(output_dir, _benchmark.slug(scheme)), train_data=str(baseline.MNIST_PATH),
            eval_data=str(baseline.MNIST_PATH), input_scale=baseline.MNIST_SCALE, calibration_data=CALIBRATION,
            calibration_key="x", qat=True, qat_weights=scheme, qat_epochs=qat_epochs, force_qat=True,
            max_accuracy_drop=0.02, seed=seed, overwrite=True, latency_runs=20, **source))
        trained = time.perf_counter()
        flatbuffer = open(result.model_path, "rb").read()
        export = build_micro_export(flatbuffer, tflm_inputs, f"{len(tflm_inputs)} MNIST test images",
                                    name="lenet5", eval_labels=tflm_labels, compress=scheme != "int8")
    except Exception as e:  # a failed path is a result of the benchmark, not the end of it
        return _failed(scheme, e, start)
    stages = {s["stage"]: s for s in result.stages}
    manifest = export.manifest
    compression = manifest["compression"]
    low_bit = stages["convert"].get("low_bit_weights")
    per_channel = {name: value["max_per_channel"] for name, value in distinct_values(flatbuffer).items()}
    compressed = export.files["lenet5.tflite"] if compression else None
    return {
        "accuracy": stages["convert"]["eval_accuracy"],
        "validation_accuracy": stages["qat"].get("validation_accuracy"),
        "low_bit_layers": stages["qat"].get("low_bit_layers", []), "keep_int8": stages["qat"].get("keep_int8", []),
        "max_distinct_per_channel": None if low_bit is None else low_bit["max_distinct_per_channel"],
        "allowed_per_channel": None if low_bit is None else low_bit["allowed_per_channel"],
        "distinct_per_channel_by_tensor": per_channel,
        "bytes": len(flatbuffer), "gzip9_bytes": len(gzip.compress(flatbuffer, 9, mtime=0)),
        "flash_bytes": compression["flash_bytes_before"] if compression else manifest["flash_bytes"],
        "flash_bytes_compressed": compression["flash_bytes_after"] if compression else None,
        "gzip9_bytes_compressed": None if compressed is None else len(gzip.compress(compressed, 9, mtime=0)),
        "index_bitwidths": None if not compression else {t["name"].split("/")[1]: t["index_bitwidth"]
                                                         for t in compression["tensors"]},
        "arena_bytes": manifest["arena"]["arena_bytes"],
        "tflm_top1_agreement": manifest["tflm_check"]["top1_agreement"],
        "tflm_accuracy": (manifest.get("tflm_accuracy") or {}).get("tflm_accuracy"),
        "compressed_identical_in_tflm": None if not compression else
        compression["tflm_exact_check"]["max_step_difference"] == 0,
        "seconds": {"optimize": trained - start, "micro_export": time.perf_counter() - trained},
    }


def _targets(rows: dict) -> dict:
    targets = _benchmark.failed_paths(rows)
    reference = rows[FLOAT]
    if "error" in reference:
        return targets
    for scheme, points in (("ternary", 0.3), ("binary", 1.0)):
        row = rows.get(scheme)
        if row and "error" not in row:
            drop = (reference["accuracy"] - row["accuracy"]) * 100
            targets[f"{scheme} accuracy drop vs float (points)"] = _benchmark.target(
                drop, points, at_most=True, why=f"{scheme} QAT of {row['accuracy']:.4f} against float "
                                                f"{reference['accuracy']:.4f} after the fine-tune's epochs")
    ternary, int8 = rows.get("ternary"), rows.get("int8")
    if ternary and int8 and "error" not in ternary and "error" not in int8 and ternary["flash_bytes_compressed"]:
        targets["ternary --compress flash / int8 flash"] = _benchmark.target(
            ternary["flash_bytes_compressed"] / int8["flash_bytes"], 0.3, at_most=True,
            why="the int8-kept first and last layers and the non-weight bytes weigh more than 30% of int8")
    return targets


def render(summary: dict) -> str:
    rows = summary["rows"]
    lines = [f"Low-bit QAT weights on LeNet-5 (MNIST, 10,000 test images; QAT {summary['qat_epochs']} epochs; first "
             f"and last layers int8; TFLM on {summary['tflm_samples']} test images)", "",
             "| weights | test accuracy | Δ vs float (pt) | max values / channel (allowed) | bytes | gzip -9 | "
             "TFLM flash | flash --compress | index bits | TFLM top-1 agreement | compressed = uncompressed |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:100]} |" + " |" * 9)
            continue
        def opt(value, fmt="{:,}"):
            return "—" if value is None else fmt.format(value)
        values = row.get("max_distinct_per_channel")
        distinct = "—" if not values else f"{max(values.values())} ({row['allowed_per_channel']})"
        bits = row.get("index_bitwidths")
        lines.append(
            f"| {name} | {row['accuracy']:.4f} | {opt(row.get('delta_points'), '{:+.2f}')} | {distinct} | "
            f"{row['bytes']:,} | {row['gzip9_bytes']:,} | {opt(row.get('flash_bytes'))} | "
            f"{opt(row.get('flash_bytes_compressed'))} | "
            f"{'—' if not bits else ', '.join(f'{k} {v}' for k, v in bits.items())} | "
            f"{opt(row.get('tflm_top1_agreement'), '{:.4f}')} | {opt(row.get('compressed_identical_in_tflm'), '{}')} |")
    lines += ["", "Anchors (Li & Liu 2016, TWN, LeNet-5 on MNIST, trained from scratch): full precision 99.41%, "
              "ternary 99.35%, binary 99.05%."]
    return _benchmark.finish_tables(lines, summary["targets"], summary["total_seconds"])


def _failed(name: str, error: Exception, start: float) -> dict:
    print(f"  {name} failed: {type(error).__name__}: {error}", flush=True)
    return {"error": f"{type(error).__name__}: {error}", "seconds": {"total": time.perf_counter() - start}}


if __name__ == "__main__":
    _common.run(main)
