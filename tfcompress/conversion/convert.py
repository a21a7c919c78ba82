"""Post-training conversion stage: a float model in, `.tflite` bytes out.

Takes a `FloatModel` (see `model_io`), a `ConvertConfig` and, for the integer modes, calibration samples;
returns the flatbuffer as bytes. `int8` (the default) is full-integer quantization with uint8 input and
output; an op that stays in float is a `NotFullyQuantizedError` naming it. QAT models carry their own
ranges, so for them calibration samples are optional.
"""

from __future__ import annotations

import dataclasses
import enum
import re
import warnings

import numpy as np

from tfcompress.conversion import calibration
from tfcompress.core._keras import tf
from tfcompress.core._native import native_output_captured
from tfcompress.core.errors import ConversionError, NotFullyQuantizedError
from tfcompress.core.model_io import FloatModel
from tfcompress.core.tflite_model import TfliteModel, TfliteSource, read_tflite


class Mode(str, enum.Enum):
    INT8 = "int8"
    INT16X8 = "int16x8"
    DYNAMIC = "dynamic"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


# The I/O dtypes each mode can produce; the first is the default.
IO_DTYPES: dict[Mode, tuple[str, ...]] = {
    Mode.INT8: ("uint8", "int8", "float32"),
    Mode.INT16X8: ("int16", "float32"),
    Mode.DYNAMIC: ("float32",),
    Mode.FLOAT16: ("float32",),
    Mode.FLOAT32: ("float32",),
}
INTEGER_MODES = frozenset({Mode.INT8, Mode.INT16X8})
_TF_DTYPES = {"uint8": tf.uint8, "int8": tf.int8, "int16": tf.int16, "float32": tf.float32}


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """How to convert.

    Attributes:
        mode: one of `Mode` (or its string value).
        io_dtype: input and output dtype; None picks the mode's default (uint8 for int8).
    """

    mode: Mode | str = Mode.INT8
    io_dtype: str | None = None

    def __post_init__(self):
        try:
            mode = Mode(self.mode)
        except ValueError:
            raise ValueError(
                f"Unknown conversion mode. Expected one of {[m.value for m in Mode]}. "
                f"Received: mode={self.mode!r}"
            ) from None
        object.__setattr__(self, "mode", mode)
        allowed = IO_DTYPES[mode]
        if self.io_dtype is None:
            object.__setattr__(self, "io_dtype", allowed[0])
        elif self.io_dtype not in allowed:
            raise ValueError(
                f"io_dtype {self.io_dtype!r} is not available in {mode.value} mode; choose one of "
                f"{list(allowed)}. Received: io_dtype={self.io_dtype!r}"
            )

    @property
    def needs_calibration(self) -> bool:
        return self.mode in INTEGER_MODES


def convert(model: FloatModel, config: ConvertConfig, calibration_samples: np.ndarray | None = None) -> bytes:
    """Converts `model` to a TFLite flatbuffer.

    `convert_and_read` is the same, returning the parsed `TfliteModel` (whose `.data` are these bytes).

    Args:
        model: the float model, from `model_io.load_model`.
        config: mode and I/O dtype.
        calibration_samples: float32 samples shaped like the model input; required by the integer
            modes unless the model is quantization-aware.

    Returns:
        The `.tflite` bytes. The same model, config and samples give the same bytes.

    Raises:
        ValueError: an integer mode without calibration samples for a model that is not QAT.
        NotFullyQuantizedError: in an integer mode, some ops stayed in float.
        ConversionError: the converter rejected the model.
    """
    return convert_and_read(model, config, calibration_samples).data


def _convert(model: FloatModel, config: ConvertConfig, calibration_samples: np.ndarray | None,
             timings: dict | None = None) -> bytes:
    """The converter run itself; `convert_and_read` adds the integer-only check."""
    mode = config.mode
    if mode in INTEGER_MODES and calibration_samples is None and not model.is_quantization_aware:
        raise ValueError(
            f"{mode.value} mode needs calibration samples to find activation ranges (only QAT models "
            "carry their own). Pass calibration data (--calibration_data). Received: calibration_samples=None"
        )
    converter = model.converter()
    if mode is Mode.FLOAT16:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif mode is Mode.DYNAMIC:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif mode in INTEGER_MODES:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if calibration_samples is not None:
            converter.representative_dataset = calibration.representative_dataset(calibration_samples, timings)
            # Restricting to integer kernels without a representative dataset makes the converter raise,
            # so a QAT model converted from its own ranges takes the unrestricted path and the float-op
            # check below enforces the same promise.
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.TFLITE_BUILTINS_INT8
                if mode is Mode.INT8
                else tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
            ]
        if config.io_dtype != "float32":
            converter.inference_input_type = _TF_DTYPES[config.io_dtype]
            converter.inference_output_type = _TF_DTYPES[config.io_dtype]
    error = None
    with native_output_captured() as native_log, warnings.catch_warnings():
        # Said on every uint8/int8-I/O conversion: the input statistics come from calibration, as intended.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        try:
            flatbuffer = converter.convert()
        except Exception as e:  # the converter raises several unrelated types
            error = e
    if error is not None:
        raise _conversion_error(error, "".join(native_log), mode) from None
    return flatbuffer


def convert_and_read(model: FloatModel, config: ConvertConfig, calibration_samples: np.ndarray | None = None,
                     timings: dict | None = None) -> TfliteModel:
    """`convert`, returning the parsed flatbuffer: a run parses it here once and passes it along.

    With `timings`, the converter's calibration time is added to its `calibration_seconds`.
    """
    parsed = read_tflite(_convert(model, config, calibration_samples, timings))
    if config.mode in INTEGER_MODES:
        check_integer_only(parsed, config.mode, allow_float_io=config.io_dtype == "float32")
    return parsed


def check_integer_only(flatbuffer: TfliteSource, mode: Mode, allow_float_io: bool) -> None:
    """Raises `NotFullyQuantizedError` naming every op that computes in float."""
    parsed = read_tflite(flatbuffer)
    offenders = parsed.float_ops(allow_float_io=allow_float_io)
    # The DEQUANTIZE/QUANTIZE pairs around a float op are symptoms; name the op they serve.
    offenders = [op for op in offenders if op.op not in ("QUANTIZE", "DEQUANTIZE")] or offenders
    if offenders:
        names = sorted({op.custom_code or op.op for op in offenders})
        described = ", ".join(parsed.describe(op) for op in offenders[:5])
        raise NotFullyQuantizedError(
            f"{mode.value} conversion left {len(offenders)} op(s) in float: {described}. "
            f"TFLite has no {mode.value} kernel for {', '.join(names)}: replace those layers, or convert "
            "with --mode=dynamic or --mode=float16.",
            ops=names,
        )


def _conversion_error(error: Exception, native_log: str, mode: Mode) -> ConversionError:
    text = f"{error}\n{native_log}"
    select = re.search(r"TF Select ops: ([^\n]+)", text)
    if select:
        ops = [op.strip() for op in select.group(1).split(",") if op.strip()]
        result = NotFullyQuantizedError(
            f"The model uses TensorFlow op(s) with no TFLite builtin kernel: {', '.join(ops)}. "
            "They would need TF Select (Flex), which cannot be quantized or run on microcontrollers: "
            "replace those layers.",
            ops=ops,
        )
        result.details = text
        return result
    message = str(error).strip()
    error_lines = [line.strip() for line in message.splitlines() if "error:" in line]
    detail = (error_lines or message.splitlines() or [type(error).__name__])[0]
    result = ConversionError(
        f"The TFLite converter rejected the model in {mode.value} mode: {detail}. "
        "Run with --verbose for the converter's full log."
    )
    result.details = text
    return result
