"""Benchmark of what makes QAT earn its place on the zoo: learning rate, frozen BatchNorm, self-distillation.

Run with `tfcompress benchmark_qat` (several minutes on 2 cores). Each zoo classifier (default: ResNet-8,
DS-CNN, MobileNet v1 0.25) is trained briefly as `tfcompress.models.zoo` does, then fine-tuned by
`optimize --qat` (no pruning: QAT of the float model itself) under each variant:

- plain QAT at optimize's default learning rate (5e-4) and at 1e-4;
- `--qat_freeze_bn`: BatchNormalization normalizes with its moving statistics and keeps them;
- `--qat_distill`: the float model is the teacher of its own quantization-aware copy (`Distiller`,
  temperature 4, alpha 0.1);
- both, at 1e-4.

Every run also quantizes the same float model post-training (the PTQ candidate, identical across variants)
and scores both int8 models in LiteRT on the validation split (cut from the training data) and on the
held-out test samples. One row per model and variant: validation and test top-1 of the QAT and PTQ int8
models, which one `optimize` ships, and the run's seconds. Writes `benchmark_qat.{json,md}` to --output_dir.
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import flags

from pipelines import _benchmark
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.core.errors import TfcompressError
from tfcompress.models import zoo
from tfcompress.runs import optimize

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_qat", "Where the results go.")
_MODELS = flags.DEFINE_list("models", ["resnet8", "ds_cnn", "mobilenet_v1"], "Zoo classifiers to run.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of training, fine-tuning and calibration sampling.")
_QAT_EPOCHS = flags.DEFINE_integer("qat_epochs", 2, "QAT fine-tune epochs.", lower_bound=1)

NUM_CALIBRATION = 200
VARIANTS = {
    "QAT, lr 5e-4": {},
    "QAT, lr 1e-4": {"learning_rate": 1e-4},
    "QAT + frozen BN": {"qat_freeze_bn": True},
    "QAT + self-distillation": {"qat_distill": True},
    "QAT + self-distillation + frozen BN, lr 1e-4": {"qat_distill": True, "qat_freeze_bn": True,
                                                     "learning_rate": 1e-4},
}


def main(argv: list[str]) -> None:
    del argv
    for name in _MODELS.value:
        if zoo.get(name).task is not zoo.Task.CLASSIFICATION:
            raise ValueError(f"benchmark_qat compares single-output classifiers. Received: models={name!r}")
    summary = run_benchmark(_OUTPUT.value, _MODELS.value, _SEED.value, _QAT_EPOCHS.value)
    print(summary["tables"])


def run_benchmark(output_dir: str, names: list[str], seed: int = 0, qat_epochs: int = 2) -> dict:
    os.makedirs(output_dir, exist_ok=True)
    start_all = time.perf_counter()
    rows = []
    for name in names:
        model, data = zoo.train(name, seed=seed)
        files = zoo.write_run_files(model, data, os.path.join(output_dir, name, "inputs"))
        train = os.path.join(output_dir, name, "inputs", "train.npz")
        np.savez(train, x_train=data.x_train, y_train=data.y_train)
        for variant, settings in VARIANTS.items():
            start = time.perf_counter()
            row = {"model": name, "variant": variant, **settings}
            try:
                result = optimize.run_optimize(optimize.OptimizeConfig(
                    output_dir=os.path.join(output_dir, name, _benchmark.slug(variant)), train_data=train,
                    keras_model=files.keras_model, eval_data=files.eval_data, qat=True, qat_epochs=qat_epochs,
                    calibration_data=files.calibration_data, calibration_key="x",
                    num_calibration_samples=NUM_CALIBRATION, seed=seed, latency_runs=0, overwrite=True,
                    **settings))
            except TfcompressError as e:
                row["error"] = " ".join(str(e).split())
            else:
                candidates = result.shipped["candidates"]
                row |= {"float_validation": result.stages[0]["validation_accuracy"],
                        "float_eval": result.stages[0]["eval_accuracy"],
                        "qat_keras_validation": result.stages[1]["validation_accuracy"],
                        **{f"{c}_int8_{split}": candidates[c][f"{split}_accuracy"]
                           for c in ("qat", "ptq") for split in ("validation", "eval")},
                        "shipped": result.shipped["candidate"]}
            row["seconds"] = round(time.perf_counter() - start, 1)
            rows.append(row)
    summary = {"rows": rows, "qat_epochs": qat_epochs, "seed": seed}
    tables = render(summary, time.perf_counter() - start_all)
    write_json(os.path.join(output_dir, "benchmark_qat.json"), summary)
    write_atomic(os.path.join(output_dir, "benchmark_qat.md"), (tables + "\n").encode())
    return summary | {"tables": tables}


def render(summary: dict, total_seconds: float) -> str:
    def cell(value):
        return "—" if value is None else f"{value:.4f}"

    lines = [f"QAT variants, {summary['qat_epochs']} epoch(s) each; int8 top-1 in LiteRT (validation: cut from "
             "the training data; test: held out).", "",
             "| model | variant | float test | QAT int8 val | PTQ int8 val | QAT int8 test | PTQ int8 test | "
             "ships | s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['variant']} | error: {row['error']} | | | | | | "
                         f"{row['seconds']} |")
            continue
        lines.append(f"| {row['model']} | {row['variant']} | {cell(row['float_eval'])} | "
                     f"{cell(row['qat_int8_validation'])} | {cell(row['ptq_int8_validation'])} | "
                     f"{cell(row['qat_int8_eval'])} | {cell(row['ptq_int8_eval'])} | {row['shipped']} | "
                     f"{row['seconds']} |")
    lines += ["", f"Total run {total_seconds:.1f} s."]
    return "\n".join(lines)
