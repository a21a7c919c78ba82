"""Quantization debugging stage: which layers lose the most when a float model is quantized to int8.

Takes a `FloatModel` (see `model_io`) and calibration samples; returns a `QuantizationDebugResult`, one
row per quantized tensor, worst first, from TensorFlow's `tf.lite.experimental.QuantizationDebugger`.
The debugger builds an int8 model in which every quantized op has a float twin fed with the same
(dequantized) input, so each row measures the error that one layer adds, not the error accumulated
from earlier layers. Per row: the scale, RMSE/scale (about 0.29, i.e. 1/sqrt(12), is the rounding
error of a well-used int8 range; much more means the range is too wide or the values cluster) and the
SQNR in dB (`10*log10(mean(float^2) / mean((quantized - float)^2))`; lower is worse). Ops the int8 model
leaves in float are listed in `float_ops`. `run_debug` is the command-line form: files in, files out.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import re
import warnings
from typing import Any
from collections.abc import Iterator

import numpy as np

from tfcompress.conversion import calibration, datasets
from tfcompress.core._keras import tf
from tfcompress.core._native import native_output_captured
from tfcompress.core.artefacts import output_lock, prepare_output_dir, remove_if_empty, write_atomic, write_json
from tfcompress.core.errors import ConversionError, InputError, NotFullyQuantizedError
from tfcompress.core.model_io import FloatModel, load_model, model_source
from tfcompress.core.tflite_model import read_tflite

JSON_FILENAME = "debug.json"
CSV_FILENAME = "debug.csv"
CSV_FIELDS = ("op", "tensor", "tensor_index", "scale", "zero_point", "num_elements", "mean_error",
              "max_abs_error", "mean_squared_error", "rmse_over_scale", "sqnr_db")


class QuantizationDebugError(ConversionError):
    """TensorFlow's QuantizationDebugger could not build or run the model's debug version (exit 1)."""


@dataclasses.dataclass(frozen=True)
class LayerError:
    """The quantization error one op adds to its output tensor, averaged over the samples.

    Attributes:
        op: the op producing the tensor, e.g. `CONV_2D`.
        tensor: the tensor's name in the debug model.
        tensor_index: its index in the debug model.
        scale, zero_point: its int8 quantization.
        num_elements: values compared per sample (0: the debugger could not compare this tensor).
        mean_error, max_abs_error, mean_squared_error: of `dequantized - float`.
        rmse_over_scale: `sqrt(mean_squared_error) / scale`.
        sqnr_db: signal-to-quantization-noise ratio in dB; inf for no error, nan when not compared.
    """

    op: str
    tensor: str
    tensor_index: int
    scale: float
    zero_point: int
    num_elements: int
    mean_error: float
    max_abs_error: float
    mean_squared_error: float
    rmse_over_scale: float
    sqnr_db: float


@dataclasses.dataclass(frozen=True)
class QuantizationDebugResult:
    """Per-layer quantization errors, worst (lowest SQNR) first.

    Attributes:
        source: the model that was debugged.
        num_samples: calibration samples used both to calibrate and to measure.
        layers: one row per quantized tensor, sorted by `sqnr_db` ascending (not compared rows last).
        float_ops: ops the int8 model leaves in float, as `OP (output tensor)`.
    """

    source: str
    num_samples: int
    layers: tuple[LayerError, ...]
    float_ops: tuple[str, ...]


def debug_quantization(model: FloatModel, samples: np.ndarray) -> QuantizationDebugResult:
    """Runs the QuantizationDebugger on `model`, calibrating and measuring with `samples`.

    Args:
        model: the float model, from `model_io.load_model`.
        samples: float32 calibration samples shaped like the model input.

    Returns:
        The per-layer errors and the ops that stay in float.

    Raises:
        ValueError: no samples.
        InputError: the model is quantization-aware (the debugger measures post-training calibration).
        NotFullyQuantizedError: the model uses TensorFlow ops with no TFLite builtin kernel.
        QuantizationDebugError: the converter or the debugger failed for another reason.
    """
    if model.is_quantization_aware:
        raise InputError(
            f"{model.source} is quantization-aware (QAT): its int8 ranges come from training, and the "
            "QuantizationDebugger only measures post-training calibration (it finds nothing to compare). "
            "Debug the float model the QAT copy was made from.")
    dataset = calibration.representative_dataset(samples)
    converter = model.converter()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = dataset
    # max_abs_error of an empty comparison would raise inside the debugger; report it as not compared.
    layer_metrics = {"max_abs_error": lambda diffs: float(np.max(np.abs(diffs))) if diffs.size else math.nan}
    error = None
    with _quiet(), native_output_captured() as native_log:
        try:
            debug_model = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=dataset,
                debug_options=tf.lite.experimental.QuantizationDebugOptions(layer_metrics),
            )
            # A second debugger over the same debug model keeps every tensor, so the float values
            # (for the signal power of the SQNR) are still there after each invoke.
            debugger = tf.lite.experimental.QuantizationDebugger(
                quant_debug_model_content=debug_model.quant_model, debug_dataset=dataset,
                debug_options=tf.lite.experimental.QuantizationDebugOptions(
                    layer_metrics, layer_direct_compare_metrics={"float_power": _float_power}),
            )
            debugger.run()
            table = io.StringIO()
            debugger.layer_statistics_dump(table)
            float_ops = _float_ops(debug_model.get_nondebug_quantized_model())
        except Exception as e:  # the converter and the debugger raise several unrelated types
            error = e
    if error is not None:
        raise _debugger_error(error, "".join(native_log), model.source) from None
    layers = [_row(row) for row in csv.DictReader(io.StringIO(table.getvalue()))]
    layers.sort(key=lambda r: (math.isnan(r.sqnr_db), r.sqnr_db, -_finite(r.rmse_over_scale)))
    return QuantizationDebugResult(source=model.source, num_samples=len(samples), layers=tuple(layers),
                                   float_ops=float_ops)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # The debugger warns that tf.lite.Interpreter is deprecated, and numpy warns on empty comparisons.
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


def _float_power(float_values, quantized_values, scale, zero_point) -> float:
    del quantized_values, scale, zero_point
    return float(np.mean(np.square(float_values, dtype=np.float64))) if np.size(float_values) else math.nan


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


def _row(row: dict[str, str]) -> LayerError:
    def number(key: str) -> float:
        text = row.get(key, "")
        return float(text) if text not in ("", None) else math.nan

    scale, mse, power = number("scale"), number("mean_squared_error"), number("float_power")
    count = number("num_elements")
    if math.isnan(mse) or math.isnan(power):
        sqnr = math.nan
    elif mse == 0.0:
        sqnr = math.inf
    else:
        sqnr = 10.0 * math.log10(power / mse) if power > 0.0 else -math.inf
    return LayerError(
        op=row["op_name"], tensor=row["tensor_name"], tensor_index=int(row["tensor_idx"]), scale=scale,
        zero_point=int(float(row["zero_point"])), num_elements=int(count) if math.isfinite(count) else 0,
        mean_error=number("mean_error"), max_abs_error=number("max_abs_error"), mean_squared_error=mse,
        rmse_over_scale=math.sqrt(mse) / scale if scale > 0 and not math.isnan(mse) else math.nan,
        sqnr_db=sqnr,
    )


def _float_ops(flatbuffer: bytes) -> tuple[str, ...]:
    parsed = read_tflite(flatbuffer)
    # The debug conversion keeps float I/O, and a float op is wrapped in DEQUANTIZE/QUANTIZE: name the op.
    ops = [op for op in parsed.float_ops(allow_float_io=True) if op.op not in ("QUANTIZE", "DEQUANTIZE")]
    return tuple(parsed.describe(op) for op in ops)


def _debugger_error(error: Exception, native_log: str, source: str) -> ConversionError:
    text = f"{error}\n{native_log}"
    select = re.search(r"TF Select ops: ([^\n]+)", text)
    if select:
        ops = [op.strip() for op in select.group(1).split(",") if op.strip()]
        result: ConversionError = NotFullyQuantizedError(
            f"{source} uses TensorFlow op(s) with no TFLite builtin kernel: {', '.join(ops)}. They would "
            "need TF Select (Flex), which cannot be quantized, so there is nothing to debug: replace "
            "those layers.", ops=ops)
    elif "debug mode" in str(error):
        result = QuantizationDebugError(
            f"No op of {source} was quantized to int8, so the QuantizationDebugger has nothing to "
            "compare. Check that the model has layers with int8 kernels (Conv2D, Dense ...).")
    else:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        first = lines[0] if lines else type(error).__name__
        detail = next((line for line in lines if "error:" in line), first)
        result = QuantizationDebugError(
            f"The QuantizationDebugger failed on {source}: {detail}. Run with --verbose for the "
            "converter's full log.")
    result.details = text
    return result


def check_fully_quantized(result: QuantizationDebugResult) -> None:
    """Raises `NotFullyQuantizedError` when the int8 model leaves ops in float (after a report is shown)."""
    if result.float_ops:
        names = sorted({op.split(" ")[0] for op in result.float_ops})
        more = f" and {len(result.float_ops) - 5} more" if len(result.float_ops) > 5 else ""
        raise NotFullyQuantizedError(
            f"int8 quantization of {result.source} leaves {len(result.float_ops)} op(s) in float: "
            f"{', '.join(result.float_ops[:5])}{more}. Replace the layers TFLite cannot run in int8 (ops "
            f"left in float: {', '.join(names)}), or convert with --mode=dynamic or --mode=float16.",
            ops=names)


def _plain(value: float) -> float | None:
    return value if math.isfinite(value) else None


def to_json(result: QuantizationDebugResult) -> dict[str, Any]:
    """The result as strict JSON types; non-finite numbers (no error, not compared) become null."""
    return {
        "source": result.source,
        "num_samples": result.num_samples,
        "float_ops": list(result.float_ops),
        "layers": [{k: _plain(v) if isinstance(v, float) else v for k, v in dataclasses.asdict(r).items()}
                   for r in result.layers],
    }


def to_csv(result: QuantizationDebugResult) -> str:
    """One line per layer, worst first, with the `CSV_FIELDS` columns."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for r in result.layers:
        writer.writerow([getattr(r, field) for field in CSV_FIELDS])
    return out.getvalue()


def render_text(result: QuantizationDebugResult, top: int = 10) -> str:
    """The `top` worst layers as a table, and the ops left in float."""
    shown = result.layers[:top]
    lines = [f"int8 quantization error of {result.source} per layer, worst first "
             f"({len(shown)} of {len(result.layers)}, {result.num_samples} samples; "
             "RMSE/scale ~0.29 is ideal rounding):",
             f"  {'op':<18} {'SQNR dB':>8} {'RMSE/scale':>10} {'max |err|':>10} {'scale':>10}  tensor"]
    for r in shown:
        sqnr = "n/a" if math.isnan(r.sqnr_db) else f"{r.sqnr_db:.1f}"
        ratio = "n/a" if math.isnan(r.rmse_over_scale) else f"{r.rmse_over_scale:.3f}"
        max_err = "n/a" if math.isnan(r.max_abs_error) else f"{r.max_abs_error:.3g}"
        lines.append(f"  {r.op:<18} {sqnr:>8} {ratio:>10} {max_err:>10} {r.scale:>10.3g}  {r.tensor}")
    if result.float_ops:
        more = f" and {len(result.float_ops) - 10} more" if len(result.float_ops) > 10 else ""
        lines.append(f"left in float (not measured): {', '.join(result.float_ops[:10])}{more}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class DebugConfig:
    """One debugging run. Field names equal the flags of `pipelines/debug.py`."""

    saved_model_dir: str | None = None
    keras_model: str | None = None
    trust_model: bool = False  # load model files that hold code (Lambda, unregistered custom layers)
    calibration_data: str | None = None
    calibration_key: str | None = None
    input_scale: float = 1.0
    input_offset: float = 0.0
    num_calibration_samples: int = 500
    seed: int = 0
    output_dir: str | None = None
    overwrite: bool = False
    # The TFRecord features that hold the input ("image=KEY,label=KEY"; datasets.parse_data_spec)
    data_spec: str | None = None

    def __post_init__(self):
        model_source(self.saved_model_dir, self.keras_model)
        datasets.parse_data_spec(self.data_spec)
        if self.calibration_data is None:
            raise ValueError(
                "The debugger calibrates and measures on representative samples; pass --calibration_data "
                "(an .npz, .npy or image folder from the training split). Received: calibration_data=None"
            )
        if self.num_calibration_samples < 1:
            raise ValueError(
                "num_calibration_samples must be at least 1 (100-500 is typical). "
                f"Received: num_calibration_samples={self.num_calibration_samples}"
            )

    @property
    def model_source(self) -> str:
        return model_source(self.saved_model_dir, self.keras_model)


def run_debug(config: DebugConfig) -> QuantizationDebugResult:
    """Loads the model and data, debugs, and writes `debug.json` and `debug.csv` when `output_dir` is set.

    Raises:
        InputError: bad model, data or output location (nothing is written).
        ConversionError: the model cannot be quantized or debugged (nothing is written).
    """
    output_dir = created = None
    if config.output_dir is not None:
        output_dir, created = prepare_output_dir(config.output_dir, (JSON_FILENAME, CSV_FILENAME),
                                                 config.overwrite)
    try:
        model = load_model(config.model_source, trust_model=config.trust_model)
        samples = datasets.load_calibration_data(
            config.calibration_data, model.input_shape, key=config.calibration_key,
            num_samples=config.num_calibration_samples, seed=config.seed,
            scale=config.input_scale, offset=config.input_offset, spec=config.data_spec,
        ).samples
        result = debug_quantization(model, samples)
    except (InputError, ConversionError, ValueError):
        if created:
            remove_if_empty(output_dir)
        raise
    if output_dir is not None:
        with output_lock(output_dir, "tfcompress debug"):
            write_json(os.path.join(output_dir, JSON_FILENAME), to_json(result))
            write_atomic(os.path.join(output_dir, CSV_FILENAME), to_csv(result).encode())
    return result
