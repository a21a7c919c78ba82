"""Benchmark of channel pruning (issue 15): whole filters removed, so the int8 model really is smaller and faster.

Run with `tfcompress benchmark_channels` (about 6 minutes on 2 cores). Two models, each trained here, seeded, on
the first --num_train MNIST training images (the last 10% of them are the validation split): LeNet-5 (Caffe
variant, 28x28x1) and ResNet-8 at MLPerf Tiny's width (16/32/64 filters) on MNIST padded to 32x32x3. Per model
and MAC budget (--target_macs, the fraction of the weighted layers' multiply-accumulates kept), three int8
models (post-training quantization, uint8 I/O, calibrated on training images):

1. the unpruned model;
2. uniform channel pruning: every prunable channel group loses the same fraction, the smallest that meets the
   budget (`uniform_ratio`), then --prune_epochs of fine-tuning;
3. sensitivity-guided: each group pruned alone at 0.1 ... 0.9 on the validation split (`sensitivity`), per-group
   ratios from one tolerated loss that meets the budget (`solve_ratios`), the same fine-tune.

Both pruned models get 512 training images as `prune_channels(data=...)`. Measured per int8 model: test accuracy
in LiteRT on the first --num_test MNIST test images (only reported, never used to choose anything), parameters,
MACs, flash (.tflite bytes), the TFLM arena, single-thread LiteRT latency (XNNPACK, fresh process) and host-side
TFLM latency (the tflite-micro Python interpreter's reference kernels). A latency probe (--probe_macs) prunes the
float model uniformly to smaller budgets without fine-tuning and times it: where, if anywhere, LiteRT's latency
follows the MACs down. Targets: on the residual CNN, >= 1.6x faster int8 LiteRT latency at <= 1 point accuracy
drop; sensitivity-guided at or above uniform test accuracy at the same MAC budget. Writes
`benchmark_channels.{json,md}` (and each model's `.tflite`) to --output_dir; a failed row or a missed target is
reported, neither fails the run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import numpy as np
from absl import flags

from pipelines import _benchmark, _common
from tfcompress.analysis.latency import measure_latency
from tfcompress.analysis.macs import count_macs
from tfcompress.analysis.sensitivity import sensitivity, solve_ratios, uniform_ratio
from tfcompress.conversion.convert import ConvertConfig, convert_and_read
from tfcompress.conversion.fidelity import quantize
from tfcompress.conversion.verify import run_tflite
from tfcompress.core._keras import keras, tf
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.core.errors import TfcompressError
from tfcompress.core.model_io import load_model
from tfcompress.core.tflite_model import read_tflite
from tfcompress.models import baseline, zoo, zoo_data
from tfcompress.targets import micro
from tfcompress.training.channel_graph import channel_plan
from tfcompress.training.channel_prune import prune_channels

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_channels", "Where the results go.")
_MODELS = flags.DEFINE_list("models", ["lenet5", "resnet8"], "Models to run: lenet5, resnet8.")
_TARGET_MACS = flags.DEFINE_list("target_macs", ["0.5", "0.25"], "MAC budgets, each the fraction of the weighted "
                                 "layers' multiply-accumulates kept, in (0, 1); a uniform and a sensitivity-guided "
                                 "row per budget.")
_PRUNE_EPOCHS = flags.DEFINE_integer("prune_epochs", 4, "Fine-tune epochs after channel pruning.", lower_bound=1)
_TRAIN_EPOCHS = flags.DEFINE_integer("train_epochs", 5, "Epochs of the float model's training.", lower_bound=1)
_NUM_TRAIN = flags.DEFINE_integer("num_train", 12000, "First MNIST training images used; the last 10% of them are "
                                  "the validation split.", lower_bound=100, upper_bound=60000)
_NUM_TEST = flags.DEFINE_integer("num_test", 10000, "First MNIST test images the int8 accuracy is measured on.",
                                 lower_bound=1, upper_bound=10000)
_PROBE_MACS = flags.DEFINE_list("probe_macs", ["0.4", "0.3", "0.2", "0.15"], "Latency-only probes: MAC budgets at "
                                "which the float model is pruned uniformly (no fine-tune) and timed; empty for none.")
_CHANNEL_MULTIPLE = flags.DEFINE_integer(
    "channel_multiple", 8, "Each pruned group keeps a multiple of this many channels (prune_channels' "
    "channel_multiple; 8, optimize's default, suits XNNPACK and CMSIS-NN); 1 keeps the ratios exact.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of training and fine-tuning.")
_LATENCY_RUNS = flags.DEFINE_integer("latency_runs", 200, "Single-thread LiteRT invokes timed per model (fresh "
                                     "process); TFLM times min(50, this).", lower_bound=1)

RESIDUAL = "resnet8"  # the model the latency target is set on
MIN_SPEEDUP, MAX_DROP_POINTS = 1.6, 1.0
SENSITIVITY_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
NUM_MEAN_SAMPLES = 512  # training inputs for prune_channels(data=...): the pruned model's BatchNorm statistics
NUM_CALIBRATION = 300
NUM_PROBE_CALIBRATION = 100  # the latency probes measure no accuracy
TFLM_RUNS, TFLM_WARMUP = 50, 5
LATENCY_ROUNDS = 3
ANCHORS = ("Distiller (PyTorch), ResNet-56 on CIFAR-10: -37% MACs at -0.14 pt top-1; NNCF, ResNet-50: 40% of "
           "filters pruned at -0.09 pt top-1. Both with their own full training sets and fine-tune schedules; here "
           "the fine-tune is --prune_epochs epochs on about 11k MNIST images.")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How the benchmark builds, feeds and trains one model."""

    name: str
    description: str
    build: Callable[[], keras.Model]
    data: Callable[[int, int], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    from_logits: bool
    learning_rate: float  # Adam, cosine-decayed to zero over the float training
    fine_tune_learning_rate: float  # the same, over the fine-tune
    batch_size: int


def _lenet_data(num_train: int, num_test: int):
    x_train, y_train, x_test, y_test = zoo_data.mnist_slices(num_train, num_test)
    return x_train[..., None], y_train, x_test[..., None], y_test


def _resnet_data(num_train: int, num_test: int):
    data = zoo_data.mnist_32x32_rgb(num_train=num_train, num_test=num_test)
    return data.x_train, data.y_train, data.x_test, data.y_test


MODELS = {
    "lenet5": ModelSpec("lenet5", "LeNet-5 (Caffe variant) on MNIST 28x28x1", baseline.lenet5, _lenet_data,
                        from_logits=True, learning_rate=2e-3, fine_tune_learning_rate=5e-4, batch_size=128),
    "resnet8": ModelSpec("resnet8", "ResNet-8 at MLPerf Tiny width (16/32/64 filters) on MNIST padded to 32x32x3",
                         lambda: zoo.resnet8(filters=(16, 32, 64)), _resnet_data, from_logits=False,
                         learning_rate=zoo.get("resnet8").learning_rate, fine_tune_learning_rate=1e-3,
                         batch_size=64),
}


def main(argv: list[str]) -> None:
    del argv
    budgets = parse_budgets(_TARGET_MACS.value)
    probes = parse_budgets(_PROBE_MACS.value, "probe_macs", allow_empty=True)
    summary = run_benchmark(_OUTPUT.value, _MODELS.value, budgets, probe_macs=probes,
                            prune_epochs=_PRUNE_EPOCHS.value, train_epochs=_TRAIN_EPOCHS.value,
                            num_train=_NUM_TRAIN.value, num_test=_NUM_TEST.value, seed=_SEED.value,
                            latency_runs=_LATENCY_RUNS.value, channel_multiple=_CHANNEL_MULTIPLE.value)
    print(summary["tables"])


def parse_budgets(values: list[str], name: str = "target_macs", allow_empty: bool = False) -> tuple[float, ...]:
    """MAC budgets as floats in (0, 1); ValueError naming what was given otherwise."""
    try:
        budgets = tuple(float(v) for v in values)
    except ValueError:
        budgets = (-1.0,)
    if (not budgets and not allow_empty) or any(not 0 < b < 1 for b in budgets):
        raise ValueError(f"{name} are fractions of the MACs to keep, each in (0, 1), e.g. 0.5 or 0.5,0.35. "
                         f"Received: {name}={','.join(values)!r}")
    return budgets


def run_benchmark(output_dir: str, names: list[str], budgets: tuple[float, ...] = (0.5, 0.25), *,
                  probe_macs: tuple[float, ...] = (0.4, 0.3, 0.2, 0.15), prune_epochs: int = 4,
                  train_epochs: int = 5, num_train: int = 12000, num_test: int = 10000, seed: int = 0,
                  latency_runs: int = 200, channel_multiple: int = 8) -> dict:
    """Trains, prunes, fine-tunes, converts and measures each model; writes and returns the summary."""
    unknown = [name for name in names if name not in MODELS]
    if unknown or not names:
        raise ValueError(f"models must be among {list(MODELS)}. Received: models={','.join(names)!r}")
    budgets = parse_budgets([str(b) for b in budgets])
    probe_macs = parse_budgets([str(b) for b in probe_macs], "probe_macs", allow_empty=True)
    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    settings = {"budgets": list(budgets), "probe_macs": list(probe_macs), "prune_epochs": prune_epochs,
                "train_epochs": train_epochs, "num_train": num_train, "num_test": num_test, "seed": seed,
                "latency_runs": latency_runs, "tflm_runs": min(TFLM_RUNS, latency_runs),
                "channel_multiple": channel_multiple}
    models, rows = {}, {}
    for name in names:
        print(f"Model: {name} ...", flush=True)
        info, model_rows = _run_model(MODELS[name], output_dir, budgets, settings)
        models[name] = info
        rows |= {f"{name} / {label}": row for label, row in model_rows.items()}
    summary = {"schema_version": 1, **settings, "cpu_count": os.cpu_count(), "tensorflow": tf.__version__,
               "anchors": ANCHORS, "models": models, "rows": rows}
    summary["targets"] = _targets(rows, budgets, models)
    summary["total_seconds"] = round(time.perf_counter() - start, 1)
    tables = render(summary)
    write_json(os.path.join(output_dir, "benchmark_channels.json"), summary)
    write_atomic(os.path.join(output_dir, "benchmark_channels.md"), (tables + "\n").encode())
    return summary | {"tables": tables}


@dataclasses.dataclass(frozen=True)
class _Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _split(spec: ModelSpec, num_train: int, num_test: int) -> _Split:
    x, y, x_test, y_test = spec.data(num_train, num_test)
    cut = len(x) - max(1, len(x) // 10)  # the last 10% of the training images validate
    return _Split(x[:cut], y[:cut], x[cut:], y[cut:], x_test, y_test)


def _fit(model: keras.Model, spec: ModelSpec, data: _Split, epochs: int, learning_rate: float, seed: int) -> None:
    """Adam, cosine decay to zero (the last steps leave the BatchNorm statistics describing the final weights)."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    steps = -(-len(data.x_train) // spec.batch_size) * epochs
    model.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(learning_rate, steps)),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=spec.from_logits), metrics=["accuracy"])
    model.fit(data.x_train, data.y_train, batch_size=spec.batch_size, epochs=epochs, shuffle=True, verbose=0)


def _run_model(spec: ModelSpec, output_dir: str, budgets, settings: dict) -> tuple[dict, dict]:
    seed, started = settings["seed"], time.perf_counter()
    data = _split(spec, settings["num_train"], settings["num_test"])
    keras.utils.set_random_seed(seed)
    model = spec.build()
    _fit(model, spec, data, settings["train_epochs"], spec.learning_rate, seed)
    info = {"description": spec.description, "train_images": len(data.x_train), "validation_images": len(data.x_val),
            "test_images": len(data.x_test), "train_seconds": round(time.perf_counter() - started, 1)}
    measure = dict(spec=spec, data=data, directory=os.path.join(output_dir, spec.name))
    rows = {"unpruned": _row(lambda: (model, {}), **measure)}
    plan = channel_plan(model)
    started = time.perf_counter()
    try:
        curves = sensitivity(model, data.x_val, data.y_val, ratios=SENSITIVITY_RATIOS, kinds=("channel",),
                             criterion="l1", channel_multiple=settings["channel_multiple"])
    except (TfcompressError, ValueError, RuntimeError) as e:
        curves, info["sensitivity_error"] = None, f"{type(e).__name__}: {e}"
    else:
        info["sensitivity"] = curves.to_json() | {"seconds": round(time.perf_counter() - started, 1)}
    for budget in budgets:
        ratio = uniform_ratio(plan, budget, settings["channel_multiple"])
        rows[f"uniform @ {budget:g} MACs"] = _row(
            lambda ratio=ratio: _pruned(model, spec, data, settings, ratio=ratio), **measure,
            extra={"kind": "uniform", "target_macs": budget, "uniform_ratio": ratio})
        rows[f"sensitivity @ {budget:g} MACs"] = _row(
            lambda budget=budget: _guided(model, spec, data, settings, curves, plan, budget), **measure,
            extra={"kind": "sensitivity", "target_macs": budget})
    info["latency_probe"] = _latency_probe(model, data, plan, measure["directory"], settings)
    started = time.perf_counter()
    _time_all([*rows.values(), *info["latency_probe"]], output_dir, data.x_test[:1], settings)
    info["timing_seconds"] = round(time.perf_counter() - started, 1)
    _relative([*rows.values(), *info["latency_probe"]], rows["unpruned"])
    return info, rows


def _relative(entries: list[dict], base: dict) -> None:
    """Adds each entry's MACs fraction, speed-ups and accuracy change against the unpruned model's."""
    for entry in entries:
        if "error" in entry or "error" in base:
            continue
        entry |= {"macs_fraction_tflite": entry["macs_tflite"] / base["macs_tflite"],
                  "litert_speedup": base["litert_median_ms"] / entry["litert_median_ms"],
                  "tflm_speedup": base["tflm_median_ms"] / entry["tflm_median_ms"]}
        if "test_accuracy" in entry:
            entry["delta_points"] = round((entry["test_accuracy"] - base["test_accuracy"]) * 100, 3)


def _guided(model, spec, data: _Split, settings: dict, curves, plan, budget: float):
    if curves is None:
        raise RuntimeError("the sensitivity analysis failed (see the model's sensitivity_error)")
    solution = solve_ratios(curves, plan, target_macs=budget, channel_multiple=settings["channel_multiple"])
    pruned, details = _pruned(model, spec, data, settings, ratios=solution.ratios)
    return pruned, details | {"solution": solution.to_json()}


def _pruned(model, spec: ModelSpec, data: _Split, settings: dict, **how):
    """Channel-pruned (`data=`: 512 training images) and fine-tuned copy of `model`, with its numbers."""
    started = time.perf_counter()
    result = prune_channels(model, criterion="l1", data=data.x_train[:NUM_MEAN_SAMPLES],
                            channel_multiple=settings["channel_multiple"], **how)
    pruned_at = time.perf_counter()
    before = _accuracy(result.model.predict(data.x_val, batch_size=256, verbose=0), data.y_val)
    _fit(result.model, spec, data, settings["prune_epochs"], spec.fine_tune_learning_rate, settings["seed"])
    details = {"ratios": result.ratios, "channels_kept": {g: len(k) for g, k in result.kept.items()},
               "macs_keras": result.macs_after, "macs_fraction_keras": result.macs_after / result.macs_before,
               "float_validation_accuracy_before_fine_tune": before, "layers": result.to_json()["layers"],
               "seconds_prune": round(pruned_at - started, 1),
               "seconds_fine_tune": round(time.perf_counter() - pruned_at, 1)}
    return result.model, details


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(outputs, axis=-1) == labels))


def _row(make, spec: ModelSpec, data: _Split, directory: str, extra: dict | None = None) -> dict:
    """One row: the Keras model `make` returns, converted to int8 and measured. An error is recorded, not raised."""
    started = time.perf_counter()
    row = {"kind": "unpruned", **(extra or {})}
    try:
        model, details = make()
        row |= details
        row |= _measure(model, data, directory, row)
    except (TfcompressError, ValueError, RuntimeError) as e:  # a failed row is a result, not the end of the run
        print(f"  {spec.name}: {row['kind']} failed: {type(e).__name__}: {e}", flush=True)
        row["error"] = " ".join(f"{type(e).__name__}: {e}".split())
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _measure(model, data: _Split, directory: str, row: dict) -> dict:
    """The int8 model's accuracy, I/O types and costs; its `.tflite` written under `directory`."""
    started = time.perf_counter()
    name = _benchmark.slug(f"{row['kind']}_{row.get('target_macs', '')}")
    flat, path = _convert(model, data.x_train[:NUM_CALIBRATION], os.path.join(directory, f"{name}.tflite"))
    converted = time.perf_counter()
    inp, out = flat.tensors[flat.inputs[0]], flat.tensors[flat.outputs[0]]
    numbers = {"tflite": os.path.relpath(path, os.path.dirname(directory)), "input_dtype": inp.dtype,
               "output_dtype": out.dtype, "parameters": int(model.count_params()),
               "float_validation_accuracy": _accuracy(model.predict(data.x_val, batch_size=256, verbose=0),
                                                      data.y_val),
               "validation_accuracy": _accuracy(run_tflite(flat, data.x_val), data.y_val),
               "test_accuracy": _accuracy(run_tflite(flat, data.x_test), data.y_test)}
    evaluated = time.perf_counter()
    numbers |= _costs(flat, data.x_test[:1])
    return numbers | {"seconds_convert": round(converted - started, 1),
                      "seconds_evaluate": round(evaluated - converted, 1),
                      "seconds_costs": round(time.perf_counter() - evaluated, 1)}


def _convert(model, calibration: np.ndarray, path: str):
    """int8 (uint8 I/O) `.tflite` of `model`, parsed, and where it was written."""
    flat = convert_and_read(load_model(model), ConvertConfig("int8"), calibration)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, flat.data)
    return flat, path


def _sample(flat, first_input: np.ndarray) -> np.ndarray:
    """`first_input` (a batch of one) quantized to the model's input dtype."""
    inp = flat.tensors[flat.inputs[0]]
    return quantize(first_input, {"dtype": np.dtype(inp.dtype), "quantization": (inp.scale[0], inp.zero_point[0])})


def _costs(flat, first_input: np.ndarray) -> dict:
    """MACs, flash and the TFLM arena of a converted model (latency comes later, for all models together)."""
    arena = micro.measure_arena(flat, _sample(flat, first_input))
    return {"macs_tflite": count_macs(flat).total_macs, "flash_bytes": len(flat.data),
            "arena_bytes": arena.arena_bytes, "arena_recorded_bytes": arena.recorded_bytes}


def _time_all(entries: list[dict], output_dir: str, first_input: np.ndarray, settings: dict) -> None:
    """LiteRT (single thread, a fresh process each time) and TFLM latency of every converted model, timed in
    LATENCY_ROUNDS interleaved rounds; the fastest round's median counts, so that a burst of load from other
    processes slows one round of every model rather than one model."""
    timed = [entry for entry in entries if "tflite" in entry and "error" not in entry]
    flats = {id(entry): read_tflite(os.path.join(output_dir, entry["tflite"])) for entry in timed}
    for _ in range(LATENCY_ROUNDS):
        for entry in timed:
            flat = flats[id(entry)]
            try:
                latency = measure_latency(os.path.join(output_dir, entry["tflite"]), num_runs=settings["latency_runs"],
                                          num_threads=1)
                tflm = _tflm_latency_ms(flat, _sample(flat, first_input), entry["arena_bytes"], settings["tflm_runs"])
            except (TfcompressError, RuntimeError) as e:
                entry["error"] = " ".join(f"{type(e).__name__}: {e}".split())
                continue
            entry.setdefault("litert_round_medians_ms", []).append(latency.median_ms)
            entry.setdefault("litert_round_p90_ms", []).append(latency.p90_ms)
            entry.setdefault("tflm_round_medians_ms", []).append(tflm)
    for entry in timed:
        if "error" not in entry:
            fastest = int(np.argmin(entry["litert_round_medians_ms"]))
            entry |= {"litert_median_ms": entry["litert_round_medians_ms"][fastest],
                      "litert_p90_ms": entry["litert_round_p90_ms"][fastest],
                      "tflm_median_ms": min(entry["tflm_round_medians_ms"])}


def _latency_probe(model, data: _Split, plan, directory: str, settings: dict) -> list[dict]:
    """Latency only, no accuracy: uniform pruning at each --probe_macs budget, without fine-tuning, converted
    and timed, to show where (if anywhere) LiteRT's latency follows the MACs down."""
    probes = []
    for budget in settings["probe_macs"]:
        started = time.perf_counter()
        ratio = uniform_ratio(plan, budget, settings["channel_multiple"])
        probe = {"target_macs": budget, "uniform_ratio": ratio}
        try:
            pruned = prune_channels(model, ratio, data=data.x_train[:NUM_MEAN_SAMPLES],
                                    channel_multiple=settings["channel_multiple"]).model
            flat, path = _convert(pruned, data.x_train[:NUM_PROBE_CALIBRATION],
                                  os.path.join(directory, f"probe_{_benchmark.slug(f'{budget:g}')}.tflite"))
            probe |= {"tflite": os.path.relpath(path, os.path.dirname(directory)), **_costs(flat, data.x_test[:1])}
        except (TfcompressError, ValueError, RuntimeError) as e:
            probe["error"] = " ".join(f"{type(e).__name__}: {e}".split())
        probes.append(probe | {"seconds": round(time.perf_counter() - started, 1)})
    return probes


def _tflm_latency_ms(flat, sample: np.ndarray, arena_bytes: int, runs: int) -> float:
    """Median of `runs` single-sample `invoke()`s of the tflite-micro Python interpreter (host reference kernels)."""
    interpreter = micro._interpreter(flat, arena_bytes)
    interpreter.set_input(sample, 0)
    for _ in range(TFLM_WARMUP):
        interpreter.invoke()
    times = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        interpreter.invoke()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return float(np.median(times))


def _targets(rows: dict, budgets, models: dict) -> dict:
    targets = _benchmark.failed_paths(rows)
    for key, row in rows.items():
        model, label = key.split(" / ", 1)
        if model != RESIDUAL or row["kind"] == "unpruned" or "delta_points" not in row:
            continue
        drop, speedup = -row["delta_points"], row["litert_speedup"]
        record = _benchmark.target(speedup, MIN_SPEEDUP, False, "")
        record["passed"] = speedup >= MIN_SPEEDUP and drop <= MAX_DROP_POINTS
        record["why"] = None if record["passed"] else (
            f"{speedup:.2f}x faster at {drop:+.2f} pt drop (needs >= {MIN_SPEEDUP:g}x and <= {MAX_DROP_POINTS:g} pt); "
            + _probe_note(models[model].get("latency_probe", [])))
        targets[f"{model} / {label}: int8 LiteRT speed-up at <= {MAX_DROP_POINTS:g} pt drop"] = record
    for model in models:
        for budget in budgets:
            uniform = rows.get(f"{model} / uniform @ {budget:g} MACs", {})
            guided = rows.get(f"{model} / sensitivity @ {budget:g} MACs", {})
            if "test_accuracy" not in uniform or "test_accuracy" not in guided:
                continue
            targets[f"{model} @ {budget:g} MACs: sensitivity-guided minus uniform test accuracy (pt)"] = (
                _benchmark.target(
                    (guided["test_accuracy"] - uniform["test_accuracy"]) * 100, 0.0, False,
                    f"sensitivity-guided {guided['test_accuracy']:.4f} at {guided['macs_fraction_keras']:.3f} of "
                    f"the MACs, uniform {uniform['test_accuracy']:.4f} at {uniform['macs_fraction_keras']:.3f}"))
    return targets


def _probe_note(probes: list[dict]) -> str:
    """Where the latency probe first reached the speed-up target, for a missed target's explanation."""
    timed = [p for p in probes if "litert_speedup" in p]
    if not timed:
        return "no latency probe ran"
    reached = [p for p in timed if p["litert_speedup"] >= MIN_SPEEDUP]
    if reached:
        first = max(reached, key=lambda p: p["macs_fraction_tflite"])
        return (f"the latency probe (uniform, no fine-tune) first reaches {MIN_SPEEDUP:g}x at "
                f"{first['macs_fraction_tflite']:.3f} of the MACs ({first['litert_speedup']:.2f}x)")
    best = max(timed, key=lambda p: p["litert_speedup"])
    return (f"the latency probe (uniform, no fine-tune) does not reach {MIN_SPEEDUP:g}x down to "
            f"{min(p['macs_fraction_tflite'] for p in timed):.3f} of the MACs: at best {best['litert_speedup']:.2f}x "
            f"at {best['macs_fraction_tflite']:.3f}")


def _cell(row: dict, key: str, spec: str, suffix: str = "") -> str:
    value = row.get(key)
    return "—" if value is None else f"{format(value, spec)}{suffix}"


def render(summary: dict) -> str:
    """The Markdown tables: one per model, the chosen ratios, the latency probes, the anchors and the targets."""
    lines = [f"Channel pruning: unpruned int8 against channel-pruned (uniform / sensitivity-guided at the same MAC "
             f"budget) + {summary['prune_epochs']} epochs of fine-tuning + int8 (PTQ, uint8 I/O). Float models trained "
             f"{summary['train_epochs']} epochs, seed {summary['seed']}; {summary['cpu_count']} CPU cores."
             + (f" Kept channels rounded up to a multiple of {summary['channel_multiple']}."
                if summary["channel_multiple"] > 1 else "")]
    for name, info in summary["models"].items():
        rows = {k.split(" / ", 1)[1]: r for k, r in summary["rows"].items() if k.split(" / ")[0] == name}
        lines += ["", f"### {name}: {info['description']}", "",
                  f"{info['train_images']:,} training, {info['validation_images']:,} validation (sensitivity), "
                  f"{info['test_images']:,} test images (accuracy below; never used to choose). Float trained in "
                  f"{info['train_seconds']:.0f} s.", "", *_model_table(rows), ""]
        lines += [f"- {label}: ratios {_ratios(row)}" for label, row in rows.items()
                  if "ratios" in row and "error" not in row]
        lines += _probe_table(info.get("latency_probe", []))
    lines += ["", f"LiteRT: single thread, XNNPACK, a fresh process per measurement, median of "
              f"{summary['latency_runs']} invokes. TFLM: host-side (this CPU) TFLM reference kernels through the "
              f"tflite-micro Python interpreter, median of {summary['tflm_runs']} single-sample invokes after "
              f"{TFLM_WARMUP} warm-ups: relative speed, not an MCU timing. Both: every model of a table timed in "
              f"{LATENCY_ROUNDS} interleaved rounds, the fastest round's median shown. MACs: the .tflite's "
              "(`count_macs`); MACs kept: against the unpruned .tflite. Arena: TFLM's recording allocator + 5%, proven "
              "by a run.", "", f"Anchors: {summary['anchors']}"]
    return _benchmark.finish_tables(lines, summary["targets"], summary["total_seconds"])


def _model_table(rows: dict) -> list[str]:
    lines = ["| model | MACs kept | int8 test acc | Δ pt | parameters | MACs | flash B | TFLM arena B | "
             "LiteRT ms | LiteRT speed-up | TFLM ms | TFLM speed-up | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, row in rows.items():
        if "error" in row:
            lines.append(f"| {label} | failed: {row['error'][:160]} |" + " |" * 11)
            continue
        lines.append(
            f"| {label} | {_cell(row, 'macs_fraction_tflite', '.3f')} | {row['test_accuracy']:.4f} | "
            f"{_cell(row, 'delta_points', '+.2f')} | {row['parameters']:,} | {row['macs_tflite']:,} | "
            f"{row['flash_bytes']:,} | {row['arena_bytes']:,} | {row['litert_median_ms']:.3f} | "
            f"{_cell(row, 'litert_speedup', '.2f', 'x')} | {row['tflm_median_ms']:.2f} | "
            f"{_cell(row, 'tflm_speedup', '.2f', 'x')} | {row['seconds']:.0f} |")
    return lines


def _probe_table(probes: list[dict]) -> list[str]:
    if not probes:
        return []
    lines = ["", "Latency probe (uniform pruning of the float model, no fine-tune, int8; latency only, accuracy not "
             "measured):", "", "| MAC budget | MACs kept | flash B | TFLM arena B | LiteRT ms | LiteRT speed-up | "
             "TFLM ms | TFLM speed-up |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for probe in probes:
        if "error" in probe:
            lines.append(f"| {probe['target_macs']:g} | failed: {probe['error'][:160]} |" + " |" * 6)
            continue
        lines.append(f"| {probe['target_macs']:g} | {_cell(probe, 'macs_fraction_tflite', '.3f')} | "
                     f"{probe['flash_bytes']:,} | {probe['arena_bytes']:,} | {probe['litert_median_ms']:.3f} | "
                     f"{_cell(probe, 'litert_speedup', '.2f', 'x')} | {probe['tflm_median_ms']:.2f} | "
                     f"{_cell(probe, 'tflm_speedup', '.2f', 'x')} |")
    return lines


def _ratios(row: dict) -> str:
    kept = row.get("channels_kept", {})
    return ", ".join(f"{group} {ratio:.2f} ({kept.get(group, '?')} kept)" for group, ratio in row["ratios"].items())


if __name__ == "__main__":
    _common.run(main)
