"""Report stage: a finished run's artefacts in, `report.md`, `report.json` and PNG plots out.

`compute_report` reads only what a run left on disk (its `report.json`, the `.tflite` and Keras files,
`debug.json` from the quantization debugger, the micro manifest) and returns a `Report` of plain numbers:
one `StageRow` per stage (float, pruned, QAT, int8 ...), the final model's layers and the worst
quantized tensors. `render_markdown`, `to_json` and `render_plots` then render it; `write_report` does
all three into the run's directory. Accuracies and their changes are fractions; Markdown adds points.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import zipfile

import numpy as np

from tfcompress.analysis import latency
from tfcompress.analysis import macs
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.analysis.inspection import inspect_tflite
from tfcompress.core.tflite_model import TfliteModel, TfliteSource, read_tflite, weight_tensors

SCHEMA_VERSION = 1
MARKDOWN = "report.md"
PLOTS = ("accuracy_vs_size.png", "layer_sparsity.png", "quantization_error.png")
DEBUG_JSON = "debug.json"
WORST_TENSORS = 10
LOSSLESS_DB = 100.0


@dataclasses.dataclass(frozen=True)
class StageRow:
    """One stage's artefact and its numbers; None where a number does not apply or was not measured."""

    stage: str
    artefact: str | None
    format: str  # "tflite", "keras" (.h5/.keras) or "savedmodel"
    accuracy: float | None
    accuracy_change: float | None  # against the first (float) stage
    bytes: int | None
    gzip_bytes: int | None
    parameters: int | None
    nonzero_parameters: int | None
    macs: int | None
    latency_median_ms: float | None
    latency_p90_ms: float | None
    arena_bytes: int | None


@dataclasses.dataclass(frozen=True)
class LayerRow:
    name: str
    op: str
    weight_bytes: int
    zero_fraction: float | None
    macs: int


@dataclasses.dataclass(frozen=True)
class TensorError:
    op: str
    tensor: str
    rmse_over_scale: float | None
    sqnr_db: float | None


@dataclasses.dataclass(frozen=True)
class Report:
    schema_version: int
    run_dir: str
    kind: str  # "convert" or "optimize"
    stages: tuple[StageRow, ...]
    layers: tuple[LayerRow, ...]
    worst_tensors: tuple[TensorError, ...]
    latency_threads: int
    fidelity: dict | None = None  # the final model against the float model, every output (report.json's)
    input_model: dict | None = None  # what the run started from: source, kind ("Keras 3 model (.keras file)"), ...
    channels: dict | None = None  # channel pruning: how ratios were chosen, the per-layer table, the int8 probes
    low_bit: dict | None = None  # low-bit QAT weights: what the shipped flatbuffer holds per layer, what stayed int8
    not_run: tuple[str, ...] = ()  # what the run left out (report.json's not_run), said in report.md


def compute_report(run_dir: str, latency_runs: int = 200,
                   parsed: dict[str, TfliteModel] | None = None) -> Report:
    """Reads a convert or optimize run's directory; `latency_runs=0` skips the latency measurement.

    `parsed` maps file names in `run_dir` to models the run has parsed already; each is used only where its
    bytes are the file's, so the report still describes what is on disk.
    """
    with open(os.path.join(run_dir, "report.json")) as f:
        record = json.load(f)
    models = _ParsedModels(run_dir, parsed or {})
    if "stages" in record:
        kind, rows, final = "optimize", _optimize_rows(record, run_dir, latency_runs, models), "model.tflite"
    else:
        kind, rows, final = "convert", _convert_rows(record, run_dir, latency_runs, models), "model.tflite"
    final_path = os.path.join(run_dir, final)
    layers = ()
    if os.path.exists(final_path):
        layers = tuple(LayerRow(layer.name, layer.op, layer.weight_bytes, layer.weight_zero_fraction, layer.macs)
                       for layer in inspect_tflite(models.read(final_path)).layers
                       if layer.weight_bytes or layer.macs)
    fidelity = record.get("fidelity")
    if fidelity is None and "stages" in record:
        fidelity = record["stages"][-1].get("fidelity")
    return Report(SCHEMA_VERSION, run_dir, kind, rows, layers, _worst_tensors(run_dir), latency_threads=1,
                  fidelity=fidelity, input_model=record.get("input_model"), low_bit=_low_bit(record),
                  channels=_channels(record), not_run=tuple(record.get("not_run") or ()))


def _channels(record: dict) -> dict | None:
    stage = next((s for s in record.get("stages", ()) if s["stage"] == "channels"), None)
    if stage is None:
        return None
    return {"mode": stage.get("mode"), "criterion": stage.get("criterion"), "table": stage.get("channel_table"),
            "ratios": (stage.get("channel_pruning") or {}).get("ratios"), "probe": stage.get("int8_probe")}


def _low_bit(record: dict) -> dict | None:
    stages = {stage["stage"]: stage for stage in record.get("stages", ())}
    shipped = stages.get("convert", {}).get("low_bit_weights")
    if not shipped:
        return None
    return {**shipped, "keep_int8_because": stages.get("qat", {}).get("keep_int8_because")}


class _ParsedModels:
    """Each `.tflite` of a run parsed once, starting from the models the run handed over."""

    def __init__(self, run_dir: str, parsed: dict[str, TfliteModel]):
        self._models = {os.path.join(run_dir, name): model for name, model in parsed.items()}

    def read(self, path: str) -> TfliteModel:
        model = self._models.get(path)
        if model is not None:
            with open(path, "rb") as f:
                if f.read() == model.data:
                    return model
        self._models[path] = model = read_tflite(path)
        return model


def _convert_rows(record: dict, run_dir: str, latency_runs: int, models: _ParsedModels) -> tuple[StageRow, ...]:
    config, accuracy = record["config"], record.get("accuracy") or {}
    source = config.get("saved_model_dir") or config.get("keras_model")
    float_accuracy = accuracy.get("float_accuracy")
    rows = [_keras_row("float", source, float_accuracy, float_accuracy)]
    path = os.path.join(run_dir, "model.tflite")
    micro = record.get("micro") or {}
    rows.append(_tflite_row(f"{config['mode']} (.tflite)", models.read(path), path, accuracy.get("tflite_accuracy"),
                            float_accuracy, latency_runs, (micro.get("arena") or {}).get("arena_bytes")))
    return tuple(rows)


def _optimize_rows(record: dict, run_dir: str, latency_runs: int, models: _ParsedModels) -> tuple[StageRow, ...]:
    rows = []
    float_accuracy = record["stages"][0].get("eval_accuracy")
    for stage in record["stages"]:
        if stage["stage"] == "convert":
            micro = stage.get("micro") or {}
            path = os.path.join(run_dir, "model.tflite")
            rows.append(_tflite_row(f"{record['config']['mode']} (.tflite)", models.read(path), path,
                                    stage.get("eval_accuracy"), float_accuracy, latency_runs,
                                    (micro.get("arena") or {}).get("arena_bytes")))
        else:
            rows.append(_keras_row(stage["stage"], stage["artefact"], stage.get("eval_accuracy"), float_accuracy,
                                   stage.get("macs"), _probe(record, stage["stage"])))
    return tuple(rows)


def _probe(record: dict, stage: str) -> dict:
    """The int8 probe the channel pruning stage measured (bytes, latency, arena): before it for the float row,
    after it for its own; {} elsewhere."""
    channels = next((s for s in record["stages"] if s["stage"] == "channels"), None)
    if channels is None or "int8_probe" not in channels:
        return {}
    return channels["int8_probe"].get({"float": "before", "channels": "after"}.get(stage, ""), {})


def _change(accuracy: float | None, reference: float | None) -> float | None:
    return None if accuracy is None or reference is None else accuracy - reference


def _keras_row(stage: str, path: str | None, accuracy: float | None, reference: float | None,
               keras_macs: int | None = None, probe: dict | None = None) -> StageRow:
    """A Keras stage's row; `probe` (latency, arena) is of an int8 conversion of it, where one was measured."""
    probe = probe or {}
    arrays = _keras_arrays(path) if path and os.path.exists(path) else None
    size = _size(path) if path and os.path.exists(path) else None
    gz = None
    if path and os.path.isfile(path):
        with open(path, "rb") as f:
            gz = len(gzip.compress(f.read(), 9, mtime=0))
    return StageRow(
        stage=stage, artefact=path, format="savedmodel" if path and os.path.isdir(path) else "keras",
        accuracy=accuracy, accuracy_change=_change(accuracy, reference), bytes=size, gzip_bytes=gz,
        parameters=None if arrays is None else int(sum(a.size for a in arrays)),
        nonzero_parameters=None if arrays is None else int(sum(np.count_nonzero(a) for a in arrays)),
        macs=keras_macs, latency_median_ms=probe.get("latency_median_ms"), latency_p90_ms=None,
        arena_bytes=probe.get("arena_bytes"))


def _tflite_row(stage: str, model: TfliteModel, path: str, accuracy, reference, latency_runs: int,
                arena: int | None) -> StageRow:
    data = model.data
    parameters, nonzero = tflite_parameters(model)
    timing = latency.measure_latency(path, num_runs=latency_runs, num_threads=1) if latency_runs > 0 else None
    return StageRow(
        stage=stage, artefact=path, format="tflite", accuracy=accuracy,
        accuracy_change=_change(accuracy, reference), bytes=len(data),
        gzip_bytes=len(gzip.compress(data, 9, mtime=0)), parameters=parameters, nonzero_parameters=nonzero,
        macs=macs.count_macs(model).total_macs,
        latency_median_ms=None if timing is None else timing.median_ms,
        latency_p90_ms=None if timing is None else timing.p90_ms, arena_bytes=arena)


def tflite_parameters(data: TfliteSource) -> tuple[int, int]:
    """(parameters, non-zero parameters) of the weight and bias tensors stored in a `.tflite`.

    A quantized weight counts as zero when it equals its zero point (what a float 0.0 becomes).
    """
    model = read_tflite(data)
    values = model.constants
    total = nonzero = 0
    for _, weights, bias in weight_tensors(model):
        for tensor in (weights, bias):
            if tensor is None or tensor.index not in values:
                continue
            stored = values[tensor.index]
            zero = tensor.zero_point[0] if tensor.zero_point and len(set(tensor.zero_point)) == 1 else 0
            total += stored.size
            nonzero += int(np.count_nonzero(stored != zero))
    return total, nonzero


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _keras_arrays(path: str) -> list[np.ndarray]:
    """The kernels and biases stored in a SavedModel, `.h5` or `.keras` file, read without building a model."""
    if os.path.isdir(path):
        from tfcompress.core._keras import tf

        checkpoint = os.path.join(path, "variables", "variables")
        reader = tf.train.load_checkpoint(checkpoint)
        names = [n for n, _ in tf.train.list_variables(checkpoint)
                 if "OPTIMIZER_SLOT" not in n and n.endswith(".ATTRIBUTES/VARIABLE_VALUE")
                 and any(f"/{v}/" in n for v in ("kernel", "bias", "depthwise_kernel"))]
        return [reader.get_tensor(n) for n in names]
    import h5py

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            handle = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        root = "layers"
    else:
        handle, root = h5py.File(path, "r"), "model_weights"
    arrays = []
    with handle:
        def visit(name, item):
            leaf = name.rsplit("/", 1)[-1]
            if isinstance(item, h5py.Dataset) and (root == "layers" or leaf in (
                    "kernel:0", "bias:0", "depthwise_kernel:0", "kernel", "bias", "depthwise_kernel")):
                arrays.append(np.asarray(item))
        if root in handle:
            handle[root].visititems(visit)
    return arrays


def _worst_tensors(run_dir: str) -> tuple[TensorError, ...]:
    path = os.path.join(run_dir, DEBUG_JSON)
    if not os.path.exists(path):
        return ()
    with open(path) as f:
        layers = json.load(f).get("layers", [])
    rows = [TensorError(r["op"], r["tensor"], r.get("rmse_over_scale"), r.get("sqnr_db")) for r in layers]
    return tuple(rows)


def to_json(report: Report) -> dict:
    return dataclasses.asdict(report)


def _fmt(value, spec: str = ",", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def render_markdown(report: Report) -> str:
    lines = [f"# tfcompress report: {report.kind} run in {report.run_dir}", ""]
    if report.input_model:
        source = report.input_model
        translation = (source.get("translation") or {}).get("description")
        lines += [f"Model: {source['source']}, {source['kind']}"
                  + (f"; {translation.replace('Keras 3 model, ', '')}" if translation else "") + ".", ""]
    lines += [
             "Accuracy on the evaluation data; Δ against the float model in points. Latency: median and p90 of "
             f"single-sample invokes, {report.latency_threads} thread, fresh process.", "",
             "| stage | format | accuracy | Δ (points) | bytes | gzip -9 bytes | parameters | non-zero | MACs "
             "| latency median (ms) | p90 (ms) | arena bytes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.stages:
        change = None if r.accuracy_change is None else r.accuracy_change * 100
        lines.append(
            f"| {r.stage} | {r.format} | {_fmt(r.accuracy, '.4f')} | {_fmt(change, '+.2f')} | {_fmt(r.bytes)} | "
            f"{_fmt(r.gzip_bytes)} | {_fmt(r.parameters)} | {_fmt(r.nonzero_parameters)} | {_fmt(r.macs)} | "
            f"{_fmt(r.latency_median_ms, '.3f')} | {_fmt(r.latency_p90_ms, '.3f')} | {_fmt(r.arena_bytes)} |")
    if report.fidelity:
        f = report.fidelity
        lines += ["", f"## Fidelity against the float model ({f['num_samples']:,} held-out samples: {f['source']})",
                  "", "| output | shape | SQNR (dB) | max abs error | mean abs error | top-1 agreement |",
                  "|---|---|---|---|---|---|"]
        for o in f["outputs"]:
            lines.append(f"| {o['name']} | {tuple(o['shape'])} | {o['sqnr_db']:.1f} | {o['max_abs_error']:.4g} | "
                         f"{o['mean_abs_error']:.4g} | {_fmt(o['top1_agreement'], '.4f')} |")
    if report.channels:
        ch = report.channels
        ratios = ", ".join(f"{name} {ratio:.2f}" for name, ratio in (ch["ratios"] or {}).items())
        lines += ["", f"## Channel pruning: {ch['mode']} (channels ranked by {ch['criterion']})", "",
                  f"Ratio per channel group (a group is named by its first layer): {ratios}.", ""]
        probe = ch.get("probe") or {}
        if probe:
            lines += ["int8 probe of the model before and after channel pruning, before fine-tuning (100 calibration "
                      "samples): " + "; ".join(
                          f"{when} {_fmt(p.get('bytes'))} bytes, latency {_fmt(p.get('latency_median_ms'), '.3f')} ms, "
                          f"arena {_fmt(p.get('arena_bytes'))}" for when, p in probe.items()) + ".", ""]
        lines += [ch["table"] or ""]
    if report.low_bit:
        low = report.low_bit
        kept = ", ".join(low["keep_int8"]) or "none"
        lines += ["", f"## Low-bit weights: {low['weights']} (checked in the flatbuffer)", "",
                  f"Kept at int8: {kept}" + (f" ({low['keep_int8_because']})" if low.get("keep_int8_because") else "")
                  + ".", "", "| layer | most distinct int8 values in one output channel | allowed |", "|---|---|---|"]
        for layer, count in low["max_distinct_per_channel"].items():
            lines.append(f"| {layer} | {count} | {low['allowed_per_channel']} |")
    if report.layers:
        lines += ["", "## Layers of the final model", "",
                  "| layer | op | weight bytes | zeros | MACs |", "|---|---|---|---|---|"]
        for layer in report.layers:
            lines.append(f"| {_short(layer.name, 60)} | {layer.op} | {layer.weight_bytes:,} | "
                         f"{_fmt(layer.zero_fraction, '.1%')} | {layer.macs:,} |")
    if report.not_run:
        lines += ["", "Not run: " + "; ".join(report.not_run) + "."]
    if report.worst_tensors:
        lines += ["", f"## Worst quantized tensors (QuantizationDebugger, lowest SQNR first, top {WORST_TENSORS})",
                  "", "| op | tensor | RMSE / scale | SQNR (dB) |", "|---|---|---|---|"]
        for t in report.worst_tensors[:WORST_TENSORS]:
            lines.append(f"| {t.op} | {t.tensor} | {_fmt(t.rmse_over_scale, '.3f')} | {_fmt(t.sqnr_db, '.1f')} |")
    return "\n".join(lines) + "\n"


def render_plots(report: Report, output_dir: str) -> list[str]:
    """Writes the PNGs that have data (Agg backend, no display needed); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib import ticker

    written = []

    def save(fig, name):
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
        plt.close(fig)
        path = os.path.join(output_dir, name)
        write_atomic(path, buffer.getvalue())
        written.append(path)

    sized = [r for r in report.stages if r.accuracy is not None and (r.gzip_bytes or r.bytes)]
    if sized:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in sized:
            size = r.gzip_bytes or r.bytes
            ax.scatter(size, r.accuracy * 100, s=40)
            ax.annotate(r.stage, (size, r.accuracy * 100), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(_kilobytes))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("gzip -9 size, log scale (a SavedModel: its size on disk)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Accuracy against size across stages")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        save(fig, PLOTS[0])
    weighted = [layer for layer in report.layers if layer.zero_fraction is not None]
    if weighted:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(weighted)))
        names = [_short(layer.name) for layer in weighted]
        ax.barh(names, [layer.zero_fraction * 100 for layer in weighted], color="tab:blue")
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("zero weights in the final .tflite (%)")
        ax.set_title("Per-layer sparsity")
        fig.tight_layout()
        save(fig, PLOTS[1])
    # Ops that only move int8 values (pooling, reshapes) come out near 150 dB: leave them off the scale.
    errors = [t for t in report.worst_tensors[:WORST_TENSORS] if t.sqnr_db is not None and t.sqnr_db < LOSSLESS_DB]
    if errors:
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(errors)))
        ax.barh([f"{t.op} {_short(t.tensor)}" for t in errors], [t.sqnr_db for t in errors], color="tab:red")
        ax.invert_yaxis()
        ax.set_xlabel("SQNR (dB, higher is better)")
        ax.set_title("Per-layer quantization error (worst first)")
        fig.tight_layout()
        save(fig, PLOTS[2])
    return written


def _kilobytes(value: float, _position=None) -> str:
    return f"{value / 1000:,.0f} kB" if value >= 1000 else f"{value:.0f} B"


def _short(name: str, width: int = 40) -> str:
    name = name.split(";")[0]
    return name if len(name) <= width else "…" + name[-(width - 1):]


def write_report(report: Report) -> list[str]:
    """Writes `report.md`, the plots, and the report into `report.json` (under "report")."""
    run_dir = report.run_dir
    markdown = os.path.join(run_dir, MARKDOWN)
    write_atomic(markdown, render_markdown(report).encode())
    paths = [markdown, *render_plots(report, run_dir)]
    record_path = os.path.join(run_dir, "report.json")
    with open(record_path) as f:
        record = json.load(f)
    record["report"] = to_json(report)
    write_json(record_path, record)
    return [*paths, record_path]
