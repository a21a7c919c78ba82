"""The auto search (`tfcompress auto`): a float Keras model, its training data and budgets in, the smallest verified
model that meets every gate out.

Takes an `AutoConfig`; returns an `AutoResult`. Each attempt is a whole verified run of the convert or optimize
pipeline in `<output_dir>/attempts/NN_name/`, judged on the validation split (cut from the end of the training
data as `optimize` cuts it; the test split only measures the chosen model at the end): accuracy drop against the
float model, flash bytes (the `.tflite`, or with `--target=micro` what the TFLM export ships, LUT-compressed
where the attempt compresses), TFLM arena, single-thread LiteRT latency. The search goes cheapest first and stops
at the first attempt that meets every gate:

1. post-training int8 (500 calibration samples); if it loses too much accuracy, the quantization debugger names
   the layers it serves worst (recorded in the state and the report), then other calibration draws (1,000; 100
   with another seed), then quantization-aware training;
2. a missed latency or arena budget: sensitivity-guided channel pruning (`--prune_channels=auto`) with the MAC
   budget the measured miss suggests; a model still over budget shrinks by what was measured, one that meets it but
   loses accuracy is fine-tuned three times as long, distilled from the float model, then pruned halfway less (four
   fractions at most);
3. a missed flash budget: with `--target=micro`, clustering to 16 values and then ternary weights, both shipped
   through TFLM look-up-table compression; then channel pruning by parameters on top of the smallest accurate of
   those (or of the model so far), tuned the same way.

Every attempt is recorded (settings, numbers, verdict) in `auto_state.json` as it finishes, so a killed search
resumes after the last finished attempt. No attempt meets every gate: `BudgetNotMetError` (exit 1) names the
closest and what it missed; its model stays under `attempts/`, no `model.tflite` is written. Out of time
(`max_minutes`): the best passing model so far, or that error, and the result says the search was cut.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import time

import numpy as np

from tfcompress.analysis import debug, search_report
from tfcompress.analysis.inspection import inspect_tflite
from tfcompress.analysis.latency import measure_latency
from tfcompress.conversion import datasets
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.conversion.verify import run_tflite
from tfcompress.core.artefacts import output_lock, prepare_output_dir, write_atomic, write_json
from tfcompress.core.errors import BudgetNotMetError, TfcompressError
from tfcompress.core.model_io import load_model, model_source
from tfcompress.runs import recipe_format
from tfcompress.runs.auto_config import AutoConfig
from tfcompress.runs.optimize import OptimizeConfig, _translated, run_optimize
from tfcompress.runs.pipeline import MICRO_DIRNAME, ConvertPipelineConfig, run_convert
from tfcompress.targets.export import ExportConfig, run_export

STATE_FILENAME = "auto_state.json"
MODEL_FILENAME = "model.tflite"
REPORT_FILENAME = "report.json"
CHANNEL_TRIES = 4
EXPORT_CHECK_SAMPLES = 200
LATENCY_ROUNDS = 3
DEBUG_SAMPLES = 100  # as convert --debug_layers
WORST_LAYERS = 3


@dataclasses.dataclass(frozen=True)
class AutoResult:
    model_path: str
    report_path: str
    attempts: tuple[dict, ...]
    chosen: dict
    cut: bool


class _Search:
    """One search: its data, the float model's accuracy and the attempts made (and replayed on resume)."""

    def __init__(self, config: AutoConfig, directory: str, state: dict, x_val, y_val, float_accuracy: float,
                 loaded, samples: np.ndarray):
        self.config, self.directory, self.state = config, directory, state
        self.loaded, self.samples = loaded, samples  # the float model as loaded and calibration samples (debugger)
        self.x_val, self.y_val, self.float_accuracy = x_val, y_val, float_accuracy
        self.data_dir = os.path.join(directory, "data")
        self.started = time.monotonic()
        self.cut = False

    # -- running and judging attempts ------------------------------------------------------------------------

    def out_of_time(self) -> bool:
        limit = self.config.max_minutes
        if limit is not None and time.monotonic() - self.started > limit * 60:
            self.cut = True
        return self.cut

    def attempt(self, name: str, kind: str, settings: dict, compress: bool = False) -> dict | None:
        """The record of attempt `name` (replayed from the state when it was made with these settings), or None
        when the time is up."""
        for record in self.state["attempts"]:
            if record["name"] == name and record["settings"] == settings and record["compress"] == compress:
                return record
        if self.out_of_time():
            return None
        index = len(self.state["attempts"]) + 1
        path = os.path.join(self.directory, "attempts", f"{index:02d}_{name}")
        start = time.perf_counter()
        record = {"index": index, "name": name, "kind": kind, "settings": settings, "compress": compress,
                  "directory": path}
        try:
            model_path = self._run(kind, settings, path)
            record |= self._measure(model_path, path, compress)
        except (TfcompressError, ValueError, RuntimeError) as e:  # RuntimeError: a latency measurement that failed
            record |= {"model": None, "error": (str(e).splitlines() or [type(e).__name__])[0][:500]}
        record["seconds"] = round(time.perf_counter() - start, 2)
        record |= self.judge(record)
        self.state["attempts"].append(record)
        write_json(os.path.join(self.directory, STATE_FILENAME), self.state)
        return record

    def debugged(self) -> dict:
        """The QuantizationDebugger on the float model, run once (kept in the state): the layers post-training
        quantization serves worst (lowest SQNR), named before the search turns to QAT."""
        if "debugger" not in self.state:
            start = time.perf_counter()
            try:
                found = debug.to_json(debug.debug_quantization(self.loaded, self.samples[:DEBUG_SAMPLES]))
                keep = ("tensor", "op", "sqnr_db", "rmse_over_scale", "max_abs_error")
                found = {"worst_layers": [{k: layer[k] for k in keep} for layer in found["layers"][:WORST_LAYERS]],
                         "samples": found["num_samples"]}
            except TfcompressError as e:  # the search goes on without the names
                found = {"worst_layers": [], "error": (str(e).splitlines() or [type(e).__name__])[0][:500]}
            self.state["debugger"] = found | {"seconds": round(time.perf_counter() - start, 2)}
            write_json(os.path.join(self.directory, STATE_FILENAME), self.state)
        return self.state["debugger"]

    def _run(self, kind: str, settings: dict, path: str) -> str:
        config = self.config
        common = dict(output_dir=path, saved_model_dir=config.saved_model_dir, keras_model=config.keras_model,
                      trust_model=config.trust_model, input_scale=config.input_scale,
                      input_offset=config.input_offset,
                      calibration_data=os.path.join(self.data_dir, "calibration.npz"),
                      calibration_key="x", eval_data=os.path.join(self.data_dir, "validation.npz"), eval_key="x",
                      eval_labels_key="y", max_accuracy_drop=1.0, target=config.target, latency_runs=0,
                      overwrite=True)  # the drop is judged here, against the float model, not the stage before
        if kind == "ptq":
            result = run_convert(ConvertPipelineConfig(**common, num_calibration_samples=settings["samples"],
                                                       seed=settings["seed"], debug_layers=False))
            return result.model_path
        settings = dict(settings)
        if settings.pop("distill", None):  # the float model teaches its pruned copy
            settings["distill_from"] = model_source(config.saved_model_dir, config.keras_model)
        result = run_optimize(OptimizeConfig(
            **common, train_data=config.train_data, train_key=config.train_key,
            train_labels_key=config.train_labels_key, validation_fraction=config.validation_fraction,
            seed=config.seed, batch_size=config.batch_size, learning_rate=config.learning_rate,
            data_spec=config.data_spec, **settings))
        return result.model_path

    def _measure(self, model_path: str, path: str, compress: bool) -> dict:
        with open(model_path, "rb") as f:
            data = f.read()
        predictions = run_tflite(model_path, self.x_val)
        accuracy = float(np.mean(predictions.argmax(-1) == self.y_val))
        numbers = {"model": model_path, "bytes": len(data), "gzip_bytes": len(gzip.compress(data, 9, mtime=0)),
                   "validation_accuracy": accuracy, "accuracy_drop": self.float_accuracy - accuracy,
                   "flash_bytes": len(data), "arena_bytes": None, "latency_median_ms": None, "shipped": model_path}
        if self.config.target == "micro":
            manifest_dir = os.path.join(path, MICRO_DIRNAME)
            if compress:
                manifest_dir = os.path.join(path, "micro_lut")
                run_export(ExportConfig(tflite=model_path, output_dir=manifest_dir, compress=True,
                                        eval_data=os.path.join(self.data_dir, "validation.npz"), eval_key="x",
                                        eval_labels_key="y", num_eval_samples=EXPORT_CHECK_SAMPLES,
                                        input_scale=self.config.input_scale, input_offset=self.config.input_offset,
                                        overwrite=True))
            with open(os.path.join(manifest_dir, "manifest.json")) as f:
                manifest = json.load(f)
            shipped = [os.path.join(manifest_dir, name) for name in manifest.get("files", {})
                       if str(name).endswith(".tflite")]
            numbers |= {"flash_bytes": manifest["flash_bytes"], "arena_bytes": manifest["arena"]["arena_bytes"],
                        "shipped": shipped[0] if shipped else model_path}
        if self.config.latency_runs > 0:  # the best of three fresh processes: one run moved by 30% on a busy machine
            numbers["latency_median_ms"] = min(measure_latency(model_path, num_runs=self.config.latency_runs).median_ms
                                               for _ in range(LATENCY_ROUNDS))
        return numbers

    def judge(self, record: dict) -> dict:
        """Which gates `record` misses (`misses`: "accuracy", "flash_bytes", ...) and how far (`over`: measured /
        budget)."""
        if record.get("model") is None:
            return {"misses": ["verification"], "over": {}, "verdict": f"failed: {record.get('error')}"}
        misses = []
        over = {"accuracy_drop": record["accuracy_drop"] / max(self.config.max_accuracy_drop, 1e-4)}
        if record["accuracy_drop"] > self.config.max_accuracy_drop + 1e-9:
            misses.append("accuracy")
        measured = {"flash_bytes": record["flash_bytes"], "arena_bytes": record["arena_bytes"],
                    "latency_ms": record["latency_median_ms"]}
        for name, budget in self.config.budgets.items():
            over[name] = measured[name] / budget
            if measured[name] > budget:
                misses.append(name)
        verdict = "meets every gate" if not misses else "misses " + ", ".join(misses)
        return {"misses": misses, "over": over, "verdict": verdict}


def run_auto(config: AutoConfig) -> AutoResult:
    """Runs (or resumes) the search; writes `model.tflite`, `report.json`, `report.md` and `pareto.png`.

    Raises:
        BudgetNotMetError: no attempt met every gate (exit 1; the closest attempt is named and kept).
        ValueError, InputError: bad settings, model, data or output location (nothing is written).
    """
    source = model_source(config.saved_model_dir, config.keras_model)
    loaded = load_model(source, trust_model=config.trust_model)
    model, _ = _translated(loaded, config.trust_model)
    if len(model.outputs) != 1 or len(model.inputs) != 1:
        raise ValueError(f"auto judges one classifier output; {model.name!r} has {len(model.inputs)} input(s) and "
                         f"{len(model.outputs)} output(s). Use tfcompress optimize for it.")
    if model.outputs[0].shape[-1] in (None, 1) or len(model.outputs[0].shape) != 2:
        raise ValueError(f"auto judges a classifier's top-1 accuracy: one output of class scores (N, classes); "
                         f"{model.name!r} outputs {tuple(model.outputs[0].shape)}. Use tfcompress optimize or convert, "
                         "whose gates also cover one-unit and regression outputs.")
    x, y, raw_x, raw_y, split = _load_training_data(config, model)
    x_val, y_val = x[split:][:config.num_validation_samples], y[split:][:config.num_validation_samples]
    _check_fixed_overhead(config, loaded, x[:split])
    float_accuracy = float(np.mean(model.predict(x_val, verbose=0, batch_size=256).argmax(-1) == y_val))
    directory, _ = prepare_output_dir(config.output_dir, (MODEL_FILENAME, REPORT_FILENAME), config.overwrite)
    with output_lock(directory, "tfcompress auto"), recipe_format.recorded("auto", config, directory):
        state = _load_state(directory, config)
        os.makedirs(os.path.join(directory, "data"), exist_ok=True)
        _write_npz(os.path.join(directory, "data", "validation.npz"),
                   x=raw_x[split:][:config.num_validation_samples], y=raw_y[split:][:config.num_validation_samples])
        _write_npz(os.path.join(directory, "data", "calibration.npz"), x=raw_x[:split])
        search = _Search(config, directory, state, x_val, y_val, float_accuracy, loaded, x[:split])
        _search(search)
        return _finish(search, model, source)


def _search(s: _Search) -> None:
    """The ladder: cheapest first, each step chosen from what the earlier attempts measured."""
    config = s.config
    base = s.attempt("ptq", "ptq", {"samples": 500, "seed": config.seed})
    if base is None or not base["misses"]:
        return
    quant = {}
    if "accuracy" in base["misses"] or "verification" in base["misses"]:
        s.debugged()  # which layers quantize worst, for the report, before other draws and QAT
        for name, samples, seed in (("ptq_1000", 1000, config.seed), ("ptq_100_seed1", 100, config.seed + 1)):
            record = s.attempt(name, "ptq", {"samples": samples, "seed": seed})
            if record is None or not record["misses"]:
                return
            if _accurate(record):
                base = record
                break
        else:
            record = s.attempt("qat", "optimize", {"qat": True, "qat_epochs": config.epochs})
            if record is None or not record["misses"] or not _accurate(record):
                return  # met, out of time, or the accuracy cannot be held: the closest is reported
            base, quant = record, {"qat": True, "qat_epochs": config.epochs}
    channels = {}
    speed = [name for name in ("latency_ms", "arena_bytes") if name in base["misses"]]
    if speed:
        fraction = _clamp(0.9 / max(base["over"][name] for name in speed))
        record, done = _tune(s, "target_macs", speed, fraction, quant, compress=False, suffix="")
        if done or record is None:
            return  # met, out of time, or latency/arena out of reach at the accuracy asked: the closest is reported
        base = record
        channels = {k: record["settings"][k] for k in ("prune_channels", "target_macs", "prune_epochs")}
    if "flash_bytes" not in base["misses"]:
        return
    compressed = []
    if config.target == "micro":
        for name, settings in (("cluster16_lut", {"cluster": 16, "cluster_epochs": config.epochs, **quant, **channels}),
                               ("ternary_lut", {"qat": True, "qat_epochs": config.epochs, "qat_weights": "ternary",
                                                **channels})):
            record = s.attempt(name, "optimize", settings, compress=True)
            if record is None or not record["misses"]:
                return
            if _accurate(record):
                compressed.append((name, record))
    # Channel pruning by parameters on top of the smallest accurate model so far, by as much as its flash miss asks.
    name, start = min(compressed, key=lambda c: c[1]["flash_bytes"], default=("", base))
    extra = quant if start["kind"] == "ptq" else {k: v for k, v in start["settings"].items()
                                                  if k not in ("prune_channels", "target_params")}
    params = _clamp(0.9 / start["over"]["flash_bytes"])
    _tune(s, "target_params", ["flash_bytes"], params, extra, compress=bool(name), suffix=f"_{name}" if name else "")


def _tune(s: _Search, knob: str, budgets: list[str], fraction: float, extra: dict, compress: bool,
          suffix: str) -> tuple[dict | None, bool]:
    """Channel pruning by `knob` (`target_macs` or `target_params`) until the `budgets` are met at the accuracy
    asked. A fraction that keeps accuracy but misses a budget shrinks by what was measured (never below one known to
    lose accuracy); one that meets the budgets but loses accuracy is tried once more with three times the
    fine-tune, distilled from the float model (measured on ResNet-8 at 0.4 of its MACs, 8 epochs: 0.58 points lost
    with the teacher, 1.25 without), then the fraction moves halfway back toward the last accurate one. At most
    `CHANNEL_TRIES` fractions.

    Returns:
        (the attempt that met `budgets` at the accuracy asked, or None; whether the search is over: an attempt met
        every gate, or the time is up).
    """
    config = s.config
    good, bad = 1.0, None
    short = knob.split("_")[1]
    for _ in range(CHANNEL_TRIES):
        settings = {**extra, "prune_channels": "auto", knob: fraction, "prune_epochs": config.epochs}
        record = s.attempt(f"channels_{short}_{fraction:.3f}{suffix}", "optimize", settings, compress=compress)
        if record is None or not record["misses"]:
            return record, True
        within = not [name for name in budgets if name in record["misses"]]
        if not _accurate(record) and within and "verification" not in record["misses"]:
            longer = {**settings, "prune_epochs": 3 * config.epochs, "distill": "float model"}
            record = s.attempt(f"channels_{short}_{fraction:.3f}{suffix}_long", "optimize", longer, compress=compress)
            if record is None or not record["misses"]:
                return record, True
        if _accurate(record):
            still = [name for name in budgets if name in record["misses"]]
            if not still:
                return record, False
            good = fraction
            step = fraction * 0.9 / max(record["over"][name] for name in still)
            following = _clamp(step if bad is None else max(step, (fraction + bad) / 2))
        else:
            bad = fraction
            following = _clamp((fraction + good) / 2)
        if following == fraction:
            break
        fraction = following
    return None, False


def _accurate(record: dict) -> bool:
    return "accuracy" not in record["misses"] and "verification" not in record["misses"]


def _clamp(fraction: float) -> float:
    return round(min(0.95, max(0.05, fraction)), 3)


def _finish(s: _Search, model, source: str) -> AutoResult:
    config, attempts = s.config, s.state["attempts"]
    passing = [a for a in attempts if not a["misses"]]
    report_path = os.path.join(s.directory, REPORT_FILENAME)
    document = {"schema_version": 1, "config": dataclasses.asdict(config), "source": source,
                "float_validation_accuracy": s.float_accuracy, "validation_samples": len(s.x_val),
                "budgets": config.budgets, "max_accuracy_drop": config.max_accuracy_drop, "cut": s.cut,
                "attempts": attempts, "chosen": None, "debugger": s.state.get("debugger")}
    if not passing:
        closest = min((a for a in attempts if a.get("model")), key=_distance, default=None)
        document["closest"] = closest
        _write_report(s, document)
        cut = " The search was cut by --max_minutes." if s.cut else ""
        if closest is None:
            raise BudgetNotMetError(f"No attempt produced a verified model ({len(attempts)} tried); see "
                                    f"{report_path}.{cut}")
        raise BudgetNotMetError(
            f"No model met every gate in {len(attempts)} attempt(s).{cut} Closest: {closest['name']} "
            f"({closest['verdict']}: {_describe(closest, config)}), kept in {closest['directory']}; see {report_path}.")
    chosen = min(passing, key=lambda a: (a["flash_bytes"], a["latency_median_ms"] or 0.0))
    chosen = dict(chosen) | _test_numbers(config, model, chosen)
    document["chosen"] = chosen
    model_path = os.path.join(s.directory, MODEL_FILENAME)
    with open(chosen["shipped"], "rb") as f:
        write_atomic(model_path, f.read())
    _write_report(s, document)
    return AutoResult(model_path, report_path, tuple(attempts), chosen, s.cut)


def _distance(record: dict) -> tuple:
    """How far an attempt is from meeting every gate: gates missed, then the worst ratio of measured to allowed."""
    worst = max([r for r in record["over"].values()] + [1.0])
    return (len(record["misses"]), worst, record["accuracy_drop"])


def _describe(record: dict, config: AutoConfig) -> str:
    parts = [f"accuracy drop {record['accuracy_drop']:.4f} (allowed {config.max_accuracy_drop})"]
    labels = {"flash_bytes": ("flash", "bytes", "flash_bytes"), "arena_bytes": ("arena", "bytes", "arena_bytes"),
              "latency_ms": ("latency", "ms", "latency_median_ms")}
    for name, budget in config.budgets.items():
        label, unit, key = labels[name]
        parts.append(f"{label} {record[key]:,} {unit} (budget {budget:,} {unit})" if unit == "bytes" else
                     f"{label} {record[key]:.3f} {unit} (budget {budget} {unit})")
    return ", ".join(parts)


def _test_numbers(config: AutoConfig, model, chosen: dict) -> dict:
    """The chosen model and the float model on the test split, for the report only."""
    if config.eval_data is None:
        return {}
    x, y = datasets.load_labelled_data(config.eval_data, tuple(model.inputs[0].shape), key=config.eval_key,
                                          labels_key=config.eval_labels_key, scale=config.input_scale,
                                          offset=config.input_offset, spec=config.data_spec)
    float_accuracy = float(np.mean(model.predict(x, verbose=0, batch_size=256).argmax(-1) == y))
    accuracy = float(np.mean(run_tflite(chosen["model"], x).argmax(-1) == y))
    return {"test_accuracy": accuracy, "float_test_accuracy": float_accuracy, "test_samples": len(x)}


def _write_report(s: _Search, document: dict) -> None:
    write_json(os.path.join(s.directory, REPORT_FILENAME), document)
    write_atomic(os.path.join(s.directory, "report.md"), search_report.render_markdown(document).encode())
    write_atomic(os.path.join(s.directory, "pareto.png"), search_report.render_pareto(document))


def _load_training_data(config: AutoConfig, model):
    """Preprocessed samples and class labels, the raw arrays as stored (for the attempts' files), and the split."""
    x, y = datasets.load_labelled_data(config.train_data, tuple(model.inputs[0].shape), key=config.train_key,
                                       labels_key=config.train_labels_key, scale=config.input_scale,
                                       offset=config.input_offset, what="Training data",
                                       key_flags="--train_key / --train_labels_key", spec=config.data_spec)
    # The attempts read .npz copies: a streamed source's samples as decoded, unscaled.
    if datasets.is_streamed(config.train_data, labelled=True):
        raw_x, raw_y = datasets.load_labelled_data(config.train_data, tuple(model.inputs[0].shape),
                                                   key=config.train_key, labels_key=config.train_labels_key,
                                                   what="Training data", spec=config.data_spec)
        return x, y, raw_x, raw_y, len(x) - max(1, int(round(len(x) * config.validation_fraction)))
    with np.load(config.train_data, allow_pickle=False) as archive:
        raw_x, raw_y = archive[config.train_key], archive[config.train_labels_key]
    split = len(x) - max(1, int(round(len(x) * config.validation_fraction)))
    return x, y, raw_x, raw_y, split


def _check_fixed_overhead(config: AutoConfig, loaded, samples: np.ndarray) -> None:
    """A flash budget below what an int8 flatbuffer of this graph needs besides its weights is refused up front."""
    if config.max_flash_bytes is None:
        return
    flatbuffer = convert(loaded, ConvertConfig("int8"), samples[:50])
    overhead = len(flatbuffer) - inspect_tflite(flatbuffer).weight_bytes
    if config.max_flash_bytes <= overhead:
        raise ValueError(
            f"max_flash_bytes={config.max_flash_bytes} is below the {overhead:,} bytes the int8 flatbuffer of this "
            "model holds besides its weights (graph, tensors, quantization parameters): no compression of the "
            f"weights can meet it. Ask for more than {overhead:,} bytes. "
            f"Received: max_flash_bytes={config.max_flash_bytes}")


def _load_state(directory: str, config: AutoConfig) -> dict:
    path = os.path.join(directory, STATE_FILENAME)
    fingerprint = config.fingerprint()
    if config.overwrite:  # start over, as --overwrite says
        shutil.rmtree(os.path.join(directory, "attempts"), ignore_errors=True)
        return {"fingerprint": fingerprint, "attempts": []}
    if os.path.exists(path):
        with open(path) as f:
            state = json.load(f)
        if state.get("fingerprint") == fingerprint:
            return state
        raise TfcompressError(f"{directory} holds a search made with other settings. Pass --overwrite to start over, "
                              "or another --output_dir.")
    return {"fingerprint": fingerprint, "attempts": []}


def _write_npz(path: str, **arrays: np.ndarray) -> None:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())
