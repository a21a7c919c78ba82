"""Weight quantization error per layer: how much each reference quantizer loses on a model's kernels.

Takes a float model (tf_keras or Keras 3, through `model_io.load_model`) and returns a frozen
`QuantizationErrorResult`: per layer with a kernel (Conv2D, DepthwiseConv2D, Dense, ...) its parameter count
and the SQNR (dB), MSE and max error of its kernel under each scheme of `tfcompress.core.quantizers` applied
per output channel (`SCHEMES`: linear int8, which is what TFLite ships, int4, int2, powers of two with 4
exponents, ternary and binary), plus a whole-model row over all kernels together. It measures weights only,
on the Keras kernels before batch-normalization folding; `tfcompress debug` measures activations in int8.
`to_json`, `render_markdown` and `render_plot` (a PNG of SQNR per layer and scheme) present it, and
`run_quantization_error` is the command-line form: a model in, three files out.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Any

import numpy as np

from tfcompress.core import quantizers
from tfcompress.core.artefacts import output_lock, prepare_output_dir, remove_if_empty, write_atomic, write_json
from tfcompress.core._keras import keras
from tfcompress.core.model_io import FloatModel, load_model, model_source
from tfcompress.core.model_safety import check_model_file

JSON_FILENAME = "quantization_error.json"
MARKDOWN_FILENAME = "quantization_error.md"
PLOT_FILENAME = "quantization_error.png"
SCHEMES: dict[str, Any] = {
    "int8": lambda w: quantizers.int_n(w, 8, axis=-1),
    "int4": lambda w: quantizers.int_n(w, 4, axis=-1),
    "int2": lambda w: quantizers.int_n(w, 2, axis=-1),
    "pow2": lambda w: quantizers.logarithmic(w, exponents=4, axis=-1),
    "ternary": lambda w: quantizers.ternary(w, axis=-1),
    "binary": lambda w: quantizers.binary(w, axis=-1),
}


@dataclasses.dataclass(frozen=True)
class SchemeError:
    """One scheme's error on one kernel: SQNR in dB (inf: exact), mean squared error, largest absolute error."""

    sqnr_db: float
    mse: float
    max_error: float


@dataclasses.dataclass(frozen=True)
class LayerQuantizationError:
    """One kernel. `channels` is its number of output channels; `errors` is by scheme name (`SCHEMES`)."""

    layer: str
    kind: str
    shape: tuple[int, ...]
    parameters: int
    channels: int
    errors: dict[str, SchemeError]


@dataclasses.dataclass(frozen=True)
class QuantizationErrorResult:
    """Per-layer kernel errors in model order, and `total`: every kernel together (layer name `(model)`)."""

    source: str
    layers: tuple[LayerQuantizationError, ...]
    total: LayerQuantizationError


def output_channel_view(kernel: np.ndarray, kind: str) -> np.ndarray:
    """The kernel with its output channels on the last axis: a DepthwiseConv2D's `[h, w, in, multiplier]`
    becomes `[h, w, in * multiplier]`; Conv2D `[h, w, in, out]` and Dense `[in, out]` are already so."""
    if kind == "DepthwiseConv2D":
        return kernel.reshape(*kernel.shape[:-2], kernel.shape[-2] * kernel.shape[-1])
    return kernel


def _kernels(keras_model) -> list[tuple[str, str, np.ndarray]]:
    found = []
    for layer in _layers(keras_model):
        kernel = getattr(layer, "depthwise_kernel", None)
        if kernel is None:
            kernel = getattr(layer, "kernel", None)
        if kernel is None or len(kernel.shape) < 2:
            continue
        found.append((layer.name, type(layer).__name__, np.asarray(kernel.numpy(), dtype=np.float64)))
    return found


def _layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:  # a nested model or Sequential
            yield from _layers(layer)
        else:
            yield layer


def _measure(name: str, kind: str, kernel: np.ndarray, channels: int,
             approximations: dict[str, np.ndarray]) -> LayerQuantizationError:
    errors = {}
    for scheme, approx in approximations.items():
        errors[scheme] = SchemeError(quantizers.sqnr_db(kernel, approx), quantizers.mse(kernel, approx),
                                     quantizers.max_error(kernel, approx))
    return LayerQuantizationError(name, kind, tuple(kernel.shape), int(kernel.size), channels, errors)


def quantization_error(model: Any, trust_model: bool = False) -> QuantizationErrorResult:
    """Measures every kernel of `model` under every scheme of `SCHEMES`, per output channel.

    Args:
        model: a `FloatModel`, a tf_keras or Keras 3 model, or anything `model_io.load_model` takes.
        trust_model: load a file even if it holds code (Lambda layers, unregistered custom layers).

    Returns:
        The per-layer errors and the whole-model row.

    Raises:
        ValueError: the model has no layer with a kernel.
        ModelLoadError: `model` is a path that cannot be loaded.
    """
    loaded = model if isinstance(model, FloatModel) else load_model(model, trust_model=trust_model)
    keras_model = loaded.keras_model
    if keras_model is None and loaded.keras_version == 2 and loaded.saved_model_dir:
        # A SavedModel tf_keras wrote (keras_metadata.pb): its layers are rebuilt, which may run their code.
        check_model_file(loaded.saved_model_dir, trust_model)
        keras_model = keras.models.load_model(loaded.saved_model_dir, compile=False)
    if keras_model is None:
        raise ValueError(
            f"{loaded.source} is a SavedModel no Keras wrote, so it has no layers to measure. Pass a Keras "
            f"model (--keras_model, or a SavedModel saved by Keras). Received: model={loaded.source!r}")
    kernels = _kernels(keras_model)
    if not kernels:
        raise ValueError(
            f"{loaded.source} has no layer with a kernel (Conv2D, DepthwiseConv2D, Dense ...), so there are no "
            f"weights to quantize. Pass a model with such layers. Received: model={loaded.source!r}")
    layers, flat, quantized = [], [], {s: [] for s in SCHEMES}
    for name, kind, kernel in kernels:
        view = output_channel_view(kernel, kind)
        approximations = {s: quantize(view).reshape(kernel.shape) for s, quantize in SCHEMES.items()}
        layers.append(_measure(name, kind, kernel, view.shape[-1], approximations))
        flat.append(kernel.ravel())
        for scheme, approx in approximations.items():
            quantized[scheme].append(approx.ravel())
    total = _measure("(model)", "all kernels", np.concatenate(flat), sum(r.channels for r in layers),
                     {s: np.concatenate(parts) for s, parts in quantized.items()})
    return QuantizationErrorResult(loaded.source, tuple(layers), total)


def _plain(value: float) -> float | None:
    return value if math.isfinite(value) else None


def to_json(result: QuantizationErrorResult) -> dict[str, Any]:
    """Strict JSON types; an infinite SQNR (an exact scheme) becomes null."""
    def row(r: LayerQuantizationError) -> dict[str, Any]:
        return {"layer": r.layer, "kind": r.kind, "shape": list(r.shape), "parameters": r.parameters,
                "channels": r.channels,
                "errors": {s: {k: _plain(v) for k, v in dataclasses.asdict(e).items()} for s, e in r.errors.items()}}
    return {"source": result.source, "schemes": list(SCHEMES), "layers": [row(r) for r in result.layers],
            "total": row(result.total)}


def render_markdown(result: QuantizationErrorResult) -> str:
    """A table of SQNR (dB) per layer and scheme, per-output-channel quantization of the kernels."""
    lines = [f"# Weight quantization error of {result.source}", "",
             "SQNR in dB of each kernel under each quantizer (per output channel; higher is better).", "",
             "| layer | kind | parameters | " + " | ".join(SCHEMES) + " |",
             "|---|---|---:|" + "---:|" * len(SCHEMES)]
    for r in (*result.layers, result.total):
        cells = " | ".join(f"{r.errors[s].sqnr_db:.1f}" for s in SCHEMES)
        lines.append(f"| {r.layer} | {r.kind} | {r.parameters:,} | {cells} |")
    return "\n".join(lines) + "\n"


def render_plot(result: QuantizationErrorResult) -> bytes:
    """A PNG: SQNR per layer, one line per scheme (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(result.layers) + 3), 4.5))
    x = np.arange(len(result.layers))
    for scheme in SCHEMES:
        values = [min(r.errors[scheme].sqnr_db, 200.0) for r in result.layers]
        ax.plot(x, values, marker="o", label=scheme)
    ax.set_xticks(x, [r.layer for r in result.layers], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title(f"Kernel quantization error per layer: {result.source}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def run_quantization_error(saved_model_dir: str | None = None, keras_model: str | None = None,
                           output_dir: str | None = None, overwrite: bool = False,
                           trust_model: bool = False) -> QuantizationErrorResult:
    """Loads the model, measures, and writes the JSON, Markdown and PNG into `output_dir` when it is set.

    Raises:
        ValueError: both or neither model flag, or a model without kernels (nothing is written).
        InputError: the model or the output location is bad (nothing is written).
    """
    source = model_source(saved_model_dir, keras_model)
    names = (JSON_FILENAME, MARKDOWN_FILENAME, PLOT_FILENAME)
    directory = created = None
    if output_dir is not None:
        directory, created = prepare_output_dir(output_dir, names, overwrite)
    try:
        result = quantization_error(load_model(source, trust_model=trust_model), trust_model=trust_model)
    except Exception:
        if created:
            remove_if_empty(directory)
        raise
    if directory is not None:
        with output_lock(directory, "tfcompress quantization_error"):
            write_json(os.path.join(directory, JSON_FILENAME), to_json(result))
            write_atomic(os.path.join(directory, MARKDOWN_FILENAME), render_markdown(result).encode())
            write_atomic(os.path.join(directory, PLOT_FILENAME), render_plot(result))
    return result
