r"""Benchmark `tfcompress auto` on the issue's two budgets, against the best hand-made recipes.

Example:
  tfcompress benchmark_auto --output_dir=artefacts/benchmark_auto

- LeNet-5 (trained here as the demo trains it, on the shipped MNIST): `--max_accuracy_drop=0.003
  --max_flash_bytes=65536 --target=micro`.
- The zoo's ResNet-8 at MLPerf Tiny width (16/32/64 filters), trained here on MNIST padded to 32x32x3: a latency
  budget of `--latency_fraction` (0.6) times its int8 post-training quantized latency, `--max_accuracy_drop=0.01`.

For each: the attempts, wall time, the chosen model's numbers (validation for the search, the test split once at
the end), and the best hand recipe of the earlier benchmarks where their JSON is present (benchmark_lowbit for
LeNet-5's flash, benchmark_channels for the residual CNN's latency). Writes benchmark_auto.{json,md}.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
from absl import flags

from pipelines import _benchmark, _common
from tfcompress.analysis.latency import measure_latency
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.core._keras import keras, tf
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.core.errors import BudgetNotMetError
from tfcompress.core.model_io import load_model
from tfcompress.models import baseline, zoo, zoo_data
from tfcompress.runs.auto import run_auto
from tfcompress.runs.auto_config import AutoConfig

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_auto", "Where the results go.")
_MODELS = flags.DEFINE_list("models", ["lenet5", "resnet8"], "Models to run: lenet5, resnet8.")
_MAX_MINUTES = flags.DEFINE_float("max_minutes", 30.0, "Time limit of each search.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs of each fine-tune an attempt runs.", lower_bound=1)
_LATENCY_FRACTION = flags.DEFINE_float("latency_fraction", 0.6, "The residual CNN's latency budget, a fraction of "
                                       "its int8 post-training quantized latency.")
_RESNET_TRAIN = flags.DEFINE_integer("resnet_num_train", 12000, "MNIST training images for the residual CNN.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of training and the searches.")

LENET_FLASH = 65536
HAND_LOWBIT = "artefacts/benchmark_lowbit/benchmark_lowbit.json"
HAND_CHANNELS = "artefacts/benchmark_channels/benchmark_channels.json"


def main(argv: list[str]) -> None:
    del argv
    summary = run_benchmark(_OUTPUT.value, list(_MODELS.value), max_minutes=_MAX_MINUTES.value,
                            epochs=_EPOCHS.value, latency_fraction=_LATENCY_FRACTION.value,
                            resnet_num_train=_RESNET_TRAIN.value, seed=_SEED.value)
    print(summary["tables"])


def run_benchmark(output_dir: str, names: list[str], max_minutes: float = 30.0, epochs: int = 2,
                  latency_fraction: float = 0.6, resnet_num_train: int = 12000, seed: int = 0,
                  lenet_epochs: int = 5, resnet_epochs: int = 5) -> dict:
    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    runs = {}
    for name in names:
        print(f"Model: {name} ...", flush=True)
        directory = os.path.join(output_dir, name)
        os.makedirs(directory, exist_ok=True)
        if name == "lenet5":
            runs[name] = _lenet(directory, max_minutes, epochs, seed, lenet_epochs)
        elif name == "resnet8":
            runs[name] = _resnet(directory, max_minutes, epochs, seed, latency_fraction, resnet_num_train,
                                 resnet_epochs)
        else:
            raise ValueError(f"models are lenet5 and resnet8. Received: models={names}")
    summary = {"schema_version": 1, "seed": seed, "epochs": epochs, "max_minutes": max_minutes,
               "cpu_count": os.cpu_count(), "tensorflow": tf.__version__, "runs": runs,
               "targets": _targets(runs, max_minutes)}
    summary["total_seconds"] = time.perf_counter() - start
    summary["tables"] = render(summary)
    write_json(os.path.join(output_dir, "benchmark_auto.json"), {k: v for k, v in summary.items() if k != "tables"})
    write_atomic(os.path.join(output_dir, "benchmark_auto.md"), (summary["tables"] + "\n").encode())
    return summary


def _lenet(directory: str, max_minutes: float, epochs: int, seed: int, train_epochs: int) -> dict:
    model = baseline.train_lenet5(baseline.load_mnist(), epochs=train_epochs, seed=seed)
    model_path = os.path.join(directory, "lenet5.keras")
    model.save(model_path)
    config = AutoConfig(
        output_dir=os.path.join(directory, "auto"), train_data=str(baseline.MNIST_PATH), keras_model=model_path,
        eval_data=str(baseline.MNIST_PATH), input_scale=baseline.MNIST_SCALE,
        validation_fraction=baseline.NUM_VALIDATION / 60000, max_accuracy_drop=0.003, max_flash_bytes=LENET_FLASH,
        target="micro", max_minutes=max_minutes, epochs=epochs, seed=seed, overwrite=True)
    return _search(config) | {"budget": {"flash_bytes": LENET_FLASH}, "hand": _hand_lowbit()}


def _resnet(directory: str, max_minutes: float, epochs: int, seed: int, latency_fraction: float, num_train: int,
            train_epochs: int) -> dict:
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    data = zoo_data.mnist_32x32_rgb(seed, num_train=num_train, num_test=2000)
    model = zoo.resnet8(filters=(16, 32, 64))
    steps = -(-len(data.x_train) // 64) * train_epochs
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(5e-3, steps)),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(data.x_train, data.y_train, batch_size=64, epochs=train_epochs, verbose=0)
    model_path = os.path.join(directory, "resnet8.keras")
    model.save(model_path)
    train, test = os.path.join(directory, "train.npz"), os.path.join(directory, "test.npz")
    np.savez(train, x_train=data.x_train, y_train=data.y_train)
    np.savez(test, x_test=data.x_test, y_test=data.y_test)
    ptq = convert(load_model(model_path), ConvertConfig("int8"), data.x_train[:200])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ptq.tflite")
        with open(path, "wb") as f:
            f.write(ptq)
        ptq_latency = min(measure_latency(path, num_runs=200).median_ms for _ in range(3))  # as auto measures
    budget = round(latency_fraction * ptq_latency, 4)
    config = AutoConfig(
        output_dir=os.path.join(directory, "auto"), train_data=train, keras_model=model_path, eval_data=test,
        max_accuracy_drop=0.01, max_latency_ms=budget, max_minutes=max_minutes, epochs=epochs, seed=seed,
        latency_runs=200, learning_rate=1e-3, batch_size=64, overwrite=True)
    return _search(config) | {"budget": {"latency_ms": budget, "ptq_latency_ms": ptq_latency,
                                         "fraction": latency_fraction}, "hand": _hand_channels()}


def _search(config: AutoConfig) -> dict:
    start = time.perf_counter()
    try:
        result = run_auto(config)
        outcome = {"met": True, "chosen": _brief(result.chosen), "cut": result.cut, "error": None}
    except BudgetNotMetError as e:
        outcome = {"met": False, "chosen": None, "cut": None, "error": str(e)}
    with open(os.path.join(config.output_dir, "report.json")) as f:
        report = json.load(f)
    outcome |= {"seconds": time.perf_counter() - start, "attempts": [_brief(a) for a in report["attempts"]],
                "float_validation_accuracy": report["float_validation_accuracy"]}
    return outcome


def _brief(record: dict) -> dict:
    keys = ("index", "name", "settings", "compress", "validation_accuracy", "accuracy_drop", "flash_bytes",
            "gzip_bytes", "arena_bytes", "latency_median_ms", "seconds", "verdict", "test_accuracy",
            "float_test_accuracy", "test_samples")
    return {k: record.get(k) for k in keys if k in record}


def _hand_lowbit() -> dict | None:
    """The smallest flash of benchmark_lowbit's hand recipes (its JSON, when that benchmark has run)."""
    if not os.path.exists(HAND_LOWBIT):
        return None
    with open(HAND_LOWBIT) as f:
        rows = json.load(f)["rows"]
    best = None
    for name, row in rows.items():
        flash = row.get("flash_bytes_compressed")
        if flash and (best is None or flash < best["flash_bytes"]):
            best = {"recipe": f"QAT {name} weights + --compress (benchmark_lowbit)", "flash_bytes": flash,
                    "test_accuracy": row.get("accuracy"), "delta_points": row.get("delta_points")}
    return best


def _hand_channels(max_points: float = 1.0) -> dict | None:
    """The residual CNN's fastest hand recipe in benchmark_channels (its JSON, when that benchmark has run) that kept
    the int8 test accuracy within `max_points` of the unpruned int8 model."""
    if not os.path.exists(HAND_CHANNELS):
        return None
    with open(HAND_CHANNELS) as f:
        rows = json.load(f).get("rows") or {}
    best = None
    for name, row in rows.items():
        if not name.startswith("resnet8 / ") or name.endswith("unpruned") or row.get("litert_speedup") is None:
            continue
        if row["delta_points"] >= -max_points and (best is None or row["litert_speedup"] > best["latency_speedup"]):
            best = {"recipe": f"{name.split(' / ')[1]} + 4 epochs (benchmark_channels)",
                    "latency_speedup": round(row["litert_speedup"], 3), "latency_ms": row["litert_median_ms"],
                    "test_accuracy": row["test_accuracy"], "delta_points": row["delta_points"]}
    return best


def _targets(runs: dict, max_minutes: float) -> dict:
    targets = {}
    for name, run in runs.items():
        targets[f"{name}: a model meets every gate"] = _benchmark.target(
            1.0 if run["met"] else 0.0, 1.0, at_most=False, why=run["error"] or "")
        targets[f"{name}: search minutes"] = _benchmark.target(
            run["seconds"] / 60, max_minutes, at_most=True, why="the search ran past its time limit")
    lenet, hand = runs.get("lenet5"), (runs.get("lenet5") or {}).get("hand")
    if lenet and lenet["met"] and hand:
        targets["lenet5: flash no larger than the best hand recipe"] = _benchmark.target(
            lenet["chosen"]["flash_bytes"] / hand["flash_bytes"], 1.0, at_most=True,
            why=f"the hand recipe ({hand['recipe']}) ships {hand['flash_bytes']:,} bytes")
    resnet = runs.get("resnet8")
    hand = (resnet or {}).get("hand")
    if resnet and resnet["met"] and hand:
        speedup = resnet["attempts"][0]["latency_median_ms"] / resnet["chosen"]["latency_median_ms"]
        resnet["chosen"]["latency_speedup"] = round(speedup, 3)
        targets["resnet8: latency speed-up no smaller than the best hand recipe within 1 point"] = _benchmark.target(
            speedup, hand["latency_speedup"], at_most=False,
            why=f"the hand recipe ({hand['recipe']}) ran {hand['latency_speedup']}x faster than int8 PTQ")
    return targets


def render(summary: dict) -> str:
    lines = ["# benchmark_auto: tfcompress auto against its budgets", ""]
    for name, run in summary["runs"].items():
        budget = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in run["budget"].items())
        lines += [f"## {name} ({budget}); float validation accuracy {run['float_validation_accuracy']:.4f}", "",
                  "| # | attempt | validation accuracy | drop (points) | flash bytes | arena bytes | latency (ms) "
                  "| seconds | verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for a in run["attempts"]:
            drop = None if a.get("accuracy_drop") is None else a["accuracy_drop"] * 100
            lines.append(f"| {a['index']} | {a['name']} | {_fmt(a.get('validation_accuracy'), '.4f')} | "
                         f"{_fmt(drop, '+.2f')} | {_fmt(a.get('flash_bytes'), ',')} | "
                         f"{_fmt(a.get('arena_bytes'), ',')} | "
                         f"{_fmt(a.get('latency_median_ms'), '.3f')} | {a['seconds']} | {a['verdict']} |")
        chosen = run["chosen"]
        if chosen:
            lines += ["", f"Chosen: {chosen['name']}; test accuracy {_fmt(chosen.get('test_accuracy'), '.4f')} "
                          f"(float {_fmt(chosen.get('float_test_accuracy'), '.4f')}, {chosen.get('test_samples')} "
                          f"test samples); search {run['seconds'] / 60:.1f} min."]
        else:
            lines += ["", f"No model met every gate: {run['error']}"]
        if run.get("hand"):
            lines += [f"Best hand recipe: {json.dumps(run['hand'])}."]
        lines.append("")
    return _benchmark.finish_tables(lines, summary["targets"], summary["total_seconds"])


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


if __name__ == "__main__":
    _common.run(main)
