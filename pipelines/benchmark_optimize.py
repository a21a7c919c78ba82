"""Benchmark of the paths to an int8 `.tflite` for the demo LeNet-5, against tfmot's tutorial recipe.

Run with `tfcompress benchmark_optimize [--saved_model_dir=artefacts/demo/float_savedmodel]`. In one run:
PTQ (`pipeline.run_convert`), and through `optimize.run_optimize`: prune 80% local → PTQ, QAT, prune 80%
local → PQAT, prune 90% global → PQAT, 2:4 → PQAT and prune 90% local → PQAT (global vs local at the same
overall sparsity); beside them tfmot's pruning + PQAT tutorial recipe written by hand. Per path: accuracy
of the `.tflite` on the 10,000 MNIST test images, bytes, gzip -9 bytes, zero fraction of the stored
weights, seconds per stage. Prints two Markdown tables (paths, targets) and writes them with every number
to --output_dir. A failed path or a missed target is reported; neither fails the run.
"""

from __future__ import annotations

import gzip
import math
import os
import time

import numpy as np
from absl import flags

from pipelines import _benchmark, _common, _reference
from tfcompress.models import baseline
from tfcompress.runs import optimize
from tfcompress.runs import pipeline
from tfcompress.core._keras import keras, tf
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.runs.demo import CALIBRATION
from tfcompress.core.tflite_model import read_tflite, weight_sparsity

import tensorflow_model_optimization as tfmot  # after _keras: needs TF_USE_LEGACY_KERAS

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_optimize", "Where the results go.")
_MODEL = flags.DEFINE_string("saved_model_dir", "artefacts/demo/float_savedmodel",
                             "The trained LeNet-5 SavedModel (the demo's).")
_PRUNE_EPOCHS = flags.DEFINE_integer("prune_epochs", 2, "Pruning fine-tune epochs.", lower_bound=1)
_QAT_EPOCHS = flags.DEFINE_integer("qat_epochs", 1, "QAT fine-tune epochs.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for fine-tuning and calibration sampling.")

# name -> run_optimize settings (None: PTQ only, through run_convert)
PATHS = {
    "PTQ": None,
    "prune 80% → PTQ": dict(prune=True, final_sparsity=0.8),
    "QAT": dict(qat=True),
    "prune 80% → PQAT": dict(prune=True, final_sparsity=0.8, qat=True),
    "global prune 90% → PQAT": dict(prune=True, final_sparsity=0.9, prune_scope="global", qat=True),
    # conv1 sees one input channel: 2:4 needs groups of 4, so it stays dense (as on sparse tensor cores).
    "2:4 → PQAT": dict(prune=True, final_sparsity=0.5, prune_structure="2:4", prune_exclude=("conv1",),
                       qat=True),
    "local prune 90% → PQAT": dict(prune=True, final_sparsity=0.9, qat=True),
}
HAND = "tfmot tutorial recipe (prune 50→80% → PQAT)"
STAGES = ("prune", "qat", "convert")


def main(argv: list[str]) -> None:
    del argv
    summary = run_benchmark(_OUTPUT.value, _MODEL.value, prune_epochs=_PRUNE_EPOCHS.value,
                            qat_epochs=_QAT_EPOCHS.value, seed=_SEED.value)
    print(summary["tables"])


def run_benchmark(output_dir: str, saved_model_dir: str, prune_epochs: int = 2, qat_epochs: int = 1,
                  seed: int = 0) -> dict:
    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    print("Converting the float32 reference ...", flush=True)
    float_result = pipeline.run_convert(_convert_config(output_dir, "float32", saved_model_dir, "float32", seed))
    float_row = _model_row(float_result.model_path, float_result.verification.accuracy.tflite_accuracy,
                           {"convert": None})
    rows = {"float32 (reference)": float_row}
    for name, settings in PATHS.items():
        print(f"Path: {name} ...", flush=True)
        rows[name] = _run_path(output_dir, saved_model_dir, name, settings, prune_epochs, qat_epochs, seed)
    print(f"Path: {HAND} ...", flush=True)
    rows[HAND] = _run_hand(output_dir, saved_model_dir, prune_epochs, qat_epochs, seed)
    for row in rows.values():
        if "error" not in row:
            row["delta_points"] = (row["accuracy"] - float_row["accuracy"]) * 100
            row["gzip_ratio"] = float_row["gzip9_bytes"] / row["gzip9_bytes"]
    summary = {"schema_version": 1, "saved_model_dir": saved_model_dir, "seed": seed,
               "prune_epochs": prune_epochs, "qat_epochs": qat_epochs, "cpu_count": os.cpu_count(),
               "tensorflow": tf.__version__, "rows": rows, "targets": _targets(rows)}
    summary["total_seconds"] = time.perf_counter() - start
    tables = render(summary)
    write_json(os.path.join(output_dir, "benchmark_optimize.json"), summary)
    write_atomic(os.path.join(output_dir, "benchmark_optimize.md"), (tables + "\n").encode())
    return summary | {"tables": tables}


def _convert_config(output_dir, subdir, saved_model_dir, mode, seed) -> pipeline.ConvertPipelineConfig:
    return pipeline.ConvertPipelineConfig(
        output_dir=os.path.join(output_dir, subdir), saved_model_dir=saved_model_dir,
        calibration_data=CALIBRATION, calibration_key="x", eval_data=str(baseline.MNIST_PATH),
        input_scale=baseline.MNIST_SCALE, mode=mode, max_accuracy_drop=0.01, seed=seed, overwrite=True)


def _run_path(output_dir, saved_model_dir, name, settings, prune_epochs, qat_epochs, seed) -> dict:
    subdir = _benchmark.slug(name)
    start = time.perf_counter()
    try:
        if settings is None:
            result = pipeline.run_convert(_convert_config(output_dir, subdir, saved_model_dir, "int8", seed))
            return _model_row(result.model_path, result.verification.accuracy.tflite_accuracy,
                              {"convert": time.perf_counter() - start})
        result = optimize.run_optimize(optimize.OptimizeConfig(
            output_dir=os.path.join(output_dir, subdir), train_data=str(baseline.MNIST_PATH),
            saved_model_dir=saved_model_dir, eval_data=str(baseline.MNIST_PATH),
            input_scale=baseline.MNIST_SCALE, prune_epochs=prune_epochs, qat_epochs=qat_epochs,
            calibration_data=CALIBRATION, calibration_key="x", max_accuracy_drop=0.01, seed=seed,
            overwrite=True, **settings))
    except Exception as e:  # a failed path is a result of the benchmark, not the end of it
        print(f"  {name} failed: {type(e).__name__}: {e}", flush=True)
        return {"error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - start}
    stages = {s["stage"]: s for s in result.stages}
    row = _model_row(result.model_path, stages["convert"]["eval_accuracy"],
                     {k: stages[k]["seconds"] for k in STAGES if k in stages})
    row["keras_stages"] = [{k: s.get(k) for k in ("stage", "eval_accuracy", "validation_accuracy", "sparsity",
                                                  "seconds")} for s in result.stages]
    return row


def _run_hand(output_dir, saved_model_dir, prune_epochs, qat_epochs, seed) -> dict:
    """tfmot's pruning tutorial, then its combined (PQAT) tutorial; tfcompress's batch size and rate."""
    defaults = optimize.OptimizeConfig(output_dir="", train_data="", saved_model_dir="", prune=True)
    batch, rate = defaults.batch_size, defaults.learning_rate
    with np.load(baseline.MNIST_PATH) as d:
        x, y = d["x_train"].astype(np.float32)[..., None] / 255.0, d["y_train"]
    split = len(x) - int(round(len(x) * defaults.validation_fraction))
    fit = dict(x=x[:split], y=y[:split], batch_size=batch, validation_data=(x[split:], y[split:]), verbose=2)
    seconds = {}
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    model = keras.models.load_model(saved_model_dir, compile=False)
    end_step = math.ceil(split / batch) * prune_epochs
    schedule = tfmot.sparsity.keras.PolynomialDecay(0.50, 0.80, begin_step=0, end_step=end_step)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    _compile(pruned, rate)
    pruned.fit(epochs=prune_epochs, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()], **fit)
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    seconds["prune"] = time.perf_counter() - start
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    annotated = tfmot.quantization.keras.quantize_annotate_model(stripped)
    pqat = tfmot.quantization.keras.quantize_apply(
        annotated, tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme())
    _compile(pqat, rate)
    pqat.fit(epochs=qat_epochs, **fit)
    seconds["qat"] = time.perf_counter() - start
    start = time.perf_counter()
    model_bytes = _reference.int8_convert(tf.lite.TFLiteConverter.from_keras_model(pqat))
    path = os.path.join(output_dir, "tfmot_recipe", "model.tflite")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, model_bytes)
    accuracy = _reference.mnist_test_accuracy(model_bytes)
    seconds["convert"] = time.perf_counter() - start
    return _model_row(path, accuracy, seconds)


def _compile(model, rate: float) -> None:
    model.compile(optimizer=keras.optimizers.Adam(rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])


def _model_row(path: str, accuracy: float, seconds: dict) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    sizes = {t.name: int(np.prod(t.shape)) for t in read_tflite(data).tensors}
    per_tensor = weight_sparsity(data)
    total = sum(sizes[name] for name in per_tensor)
    zeros = sum(per_tensor[name] * sizes[name] for name in per_tensor)
    return {"path": path, "accuracy": accuracy, "bytes": len(data),
            "gzip9_bytes": len(gzip.compress(data, compresslevel=9, mtime=0)),
            "zero_fraction": zeros / total if total else 0.0, "weights": total,
            "weight_sparsity": per_tensor, "seconds": seconds}


def _targets(rows: dict) -> dict:
    f32, pqat = rows["float32 (reference)"], rows["prune 80% → PQAT"]
    glob, loc = rows["global prune 90% → PQAT"], rows["local prune 90% → PQAT"]
    targets = {}
    if "error" not in pqat:
        drop = -pqat["delta_points"]
        targets["prune 80% + PQAT accuracy drop vs float (points)"] = _benchmark.target(
            drop, 0.3, True, f"the int8 model lost {drop:.2f} points; its Keras stages scored "
            + ", ".join(f"{s['stage']} {s['eval_accuracy']:.4f}" for s in pqat["keras_stages"]) + ".")
        nnz = pqat["weights"] * (1 - pqat["zero_fraction"])
        p = pqat["zero_fraction"]
        floor = nnz + pqat["weights"] * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8 if 0 < p < 1 else nnz
        targets["prune 80% + PQAT gzip bytes: float gzip / gzip"] = _benchmark.target(
            pqat["gzip_ratio"], 12.0, False,
            f"gzip keeps {pqat['gzip9_bytes']:,} bytes against {f32['gzip9_bytes'] / 12:,.0f} needed; "
            f"{nnz:,.0f} non-zero int8 weights plus a {p:.1%}-zero mask are already ~{floor:,.0f} bytes "
            "of entropy before gzip's own overhead.")
    if "error" not in glob and "error" not in loc:
        targets["global 90% − local 90% accuracy (points), both PQAT"] = _benchmark.target(
            (glob["accuracy"] - loc["accuracy"]) * 100, 0.0, False,
            f"global scored {glob['accuracy']:.4f} at zero fraction {glob['zero_fraction']:.3f}, local "
            f"{loc['accuracy']:.4f} at {loc['zero_fraction']:.3f}.")
    targets.update(_benchmark.failed_paths(rows))
    return targets


def render(summary: dict) -> str:
    lines = [
        f"LeNet-5 on MNIST ({summary['cpu_count']} CPUs, TF {summary['tensorflow']}); prune "
        f"{summary['prune_epochs']} epochs, QAT {summary['qat_epochs']}; accuracy of the .tflite on all "
        "10,000 test images", "",
        "| path | test accuracy (.tflite) | Δ vs float (points) | bytes | gzip -9 bytes | float gzip / gzip "
        "| zero fraction of weights | seconds per stage (prune/qat/convert) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in summary["rows"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:120]} | | | | | | |")
            continue
        secs = " / ".join("—" if row["seconds"].get(k) is None else f"{row['seconds'][k]:.1f}" for k in STAGES)
        lines.append(f"| {name} | {row['accuracy']:.4f} | {row['delta_points']:+.2f} | {row['bytes']:,} | "
                     f"{row['gzip9_bytes']:,} | {row['gzip_ratio']:.2f} | {row['zero_fraction']:.3f} | {secs} |")
    return _benchmark.finish_tables(lines, summary["targets"], summary["total_seconds"])


if __name__ == "__main__":
    _common.run(main)
