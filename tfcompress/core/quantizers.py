"""The quantization maths, written once: reference quantizers in numpy, and the parameters TFLite ships.

The ground floor of every quantization stage: takes float arrays (weights or activations) and returns
quantized arrays, their parameters, or the error they introduce. Nothing here imports TensorFlow, so the
definitions can be read, tested and reused alone; the straight-through-estimator versions used in
quantization-aware training are tested against these functions. Two families live here:

* textbook quantizers (`linear`, `int_n`, `logarithmic`, `ternary`, `binary`) and error metrics (`mse`,
  `sqnr_db`, `max_error`), the definitions `tfcompress quantization_error` measures;
* `tflite_activation_params`, `tflite_weight_params` and `tflite_quantize_weights`: what TensorFlow's
  converter computes for a full-int8 model, reproduced to the bit (tests/test_quantizers.py compares them
  with every tensor of converted models).

Rounding is round-half-away-from-zero everywhere (`round_half_away_from_zero`), as C++'s `std::round`
that TFLite's quantizer and kernels use; numpy's `np.round` rounds half to even and would differ on ties.

The `axis` convention: the axis of a weight that indexes its output channels, every other axis being
reduced. Keras Conv2D kernel `[h, w, in, out]` and Dense kernel `[in, out]`: `axis=-1`; Keras
DepthwiseConv2D kernel `[h, w, in, multiplier]`: reshape to `[h, w, in * multiplier]` first, then `axis=-1`;
TFLite CONV_2D filters `[out, h, w, in]` and FULLY_CONNECTED weights `[out, in]`: `axis=0`; TFLite
DEPTHWISE_CONV_2D filters `[1, h, w, out]`: `axis=3` (in general, the tensor's `quantized_dimension`).
`axis=None` quantizes the whole tensor with one set of parameters.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SCHEMES = ("asymmetric", "asymmetric_signed", "symmetric")

# The converter widens a range narrower than this before computing its scale (kNearZeroTolerance in
# tensorflow/compiler/mlir/lite/quantization/common/quantization_lib/quantization_utils.cc).
_NEAR_ZERO_TOLERANCE = 1.0e-6


def round_half_away_from_zero(x: np.ndarray) -> np.ndarray:
    """Rounds to the nearest integer, ties away from zero (C++ `std::round`, as TFLite rounds)."""
    x = np.asarray(x)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A linearly quantized array and its parameters.

    Attributes:
        q: the integers, int64, shaped like the input.
        scale: one step in real units, per channel (length 1 for a per-tensor quantization).
        zero_point: the integer that represents 0.0, per channel. For the textbook `asymmetric` scheme it is
            `-x_min / scale`, a real number (that scheme maps `x_min`, not 0.0, to an integer).
        bits: the bit width.
        axis: the channel axis, or None for per-tensor.
        scheme: `asymmetric` (q in [0, 2^b - 1], dequantized as `x_min + q * scale`), `asymmetric_signed`
            (TFLite's: q in [-2^(b-1), 2^(b-1) - 1], integer zero point) or `symmetric` (zero point 0).
        narrow_range: the lowest integer of the scheme is left out.
        x_min: per channel, the real value of q = 0 in the `asymmetric` scheme; None otherwise.
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    axis: int | None
    scheme: str
    narrow_range: bool = False
    x_min: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        """The real values the integers stand for, float64."""
        scale = _expand(self.scale, self.q.ndim, self.axis)
        if self.scheme == "asymmetric":
            return _expand(self.x_min, self.q.ndim, self.axis) + self.q * scale
        return (self.q - _expand(self.zero_point, self.q.ndim, self.axis)) * scale

    @property
    def num_levels(self) -> int:
        """How many distinct integers the scheme can use."""
        qmin, qmax = _int_range(self.bits, self.scheme, self.narrow_range)
        return qmax - qmin + 1


def linear(x: np.ndarray, bits: int, *, symmetric: bool = False, axis: int | None = None,
           narrow_range: bool | None = None, signed: bool = False) -> Quantized:
    """Uniform (linear) quantization with min/max ranges, per tensor or per channel.

    Asymmetric (the textbook min/max quantizer): `scale = (x_max - x_min) / (2^b - 1)`,
    `q = round((x - x_min) / scale)` in [0, 2^b - 1]. With `signed=True`, TFLite's representation instead:
    the range is first widened to include 0.0, `zero_point = clamp(round(-2^(b-1) - x_min / scale))` and
    `q = clamp(round(x / scale) + zero_point)` in [-2^(b-1), 2^(b-1) - 1], so that 0.0 is exactly representable.
    Symmetric: `scale = max|x| / (2^(b-1) - 1)`, zero point 0, q in [-(2^(b-1) - 1), 2^(b-1) - 1] with the
    default narrow range (what TFLite ships for weights), or down to -2^(b-1) with `narrow_range=False`.

    A constant channel (`x_max <= x_min`, e.g. all zeros) gets scale 1.0 and dequantizes exactly.

    Args:
        x: the real values.
        bits: integer bit width, 2 to 16.
        symmetric: symmetric around zero instead of min/max.
        axis: the channel axis (see the module docstring), or None for one range over the whole tensor.
        narrow_range: leave out the lowest integer (asymmetric: 2^b - 1 levels instead of 2^b). Default:
            True for symmetric, False for asymmetric.
        signed: asymmetric only: TFLite's signed integers with an integer zero point.

    Returns:
        The integers and their parameters.

    Raises:
        ValueError: bits not an integer in 2..16, an axis outside the array, or `signed` with `symmetric`.
    """
    _check_bits(bits)
    x = np.asarray(x, dtype=np.float64)
    axis = _check_axis(axis, x.ndim)
    if narrow_range is None:
        narrow_range = symmetric
    if symmetric and signed:
        raise ValueError("signed=True selects the asymmetric signed representation; symmetric quantization is "
                         "signed already. Pass one of them. Received: symmetric=True, signed=True")
    scheme = "symmetric" if symmetric else "asymmetric_signed" if signed else "asymmetric"
    qmin, qmax = _int_range(bits, scheme, narrow_range)
    if symmetric:
        top = _reduce(np.abs(x), axis, np.max)
        constant = top <= 0.0
        scale = np.where(constant, 1.0, top / (2 ** (bits - 1) - 1))
        q = np.clip(round_half_away_from_zero(x / _expand(scale, x.ndim, axis)), qmin, qmax)
        return Quantized(q.astype(np.int64), scale, np.zeros_like(scale, dtype=np.int64), bits, axis, scheme,
                         narrow_range)
    x_min, x_max = _reduce(x, axis, np.min), _reduce(x, axis, np.max)
    if signed:
        x_min, x_max = np.minimum(x_min, 0.0), np.maximum(x_max, 0.0)
    constant = x_max <= x_min
    scale = np.where(constant, 1.0, (x_max - x_min) / np.where(constant, 1.0, qmax - qmin))
    if signed:
        zero_point = np.where(constant, qmin, np.clip(round_half_away_from_zero(qmin - x_min / scale), qmin, qmax))
        zero_point = zero_point.astype(np.int64)
        q = round_half_away_from_zero(x / _expand(scale, x.ndim, axis)) + _expand(zero_point, x.ndim, axis)
        return Quantized(np.clip(q, qmin, qmax).astype(np.int64), scale, zero_point, bits, axis, scheme,
                         narrow_range)
    q = np.clip(round_half_away_from_zero((x - _expand(x_min, x.ndim, axis)) / _expand(scale, x.ndim, axis)),
                qmin, qmax)
    return Quantized(q.astype(np.int64), scale, -x_min / scale, bits, axis, scheme, narrow_range, x_min)


def int_n(x: np.ndarray, bits: int, axis: int | None = None) -> np.ndarray:
    """Symmetric narrow-range per-channel linear quantization to `bits`, dequantized (float64).

    At most 2^bits - 1 distinct values per channel: 255 for int8, 15 for int4, 3 for int2.
    """
    return linear(x, bits, symmetric=True, axis=axis).dequantize()


def logarithmic(x: np.ndarray, exponents: int = 4, axis: int | None = None) -> np.ndarray:
    """Power-of-two quantization: each value becomes `sign(x) * 2^e` for one of `exponents` exponents.

    Per channel `e_max = round(log2(max|x_c|))`; a nonzero value gets `e = round(log2|x|)` clipped to
    `[e_max - exponents + 1, e_max]`, except that values whose rounded exponent is below that range become 0.
    So a channel holds at most `2 * exponents + 1` distinct values (a sign and an exponent, and zero).
    A multiply by such a weight is a shift.

    Args:
        x: the real values.
        exponents: how many powers of two per channel, 1 to 7.
        axis: the channel axis (see the module docstring), or None for the whole tensor.

    Returns:
        The quantized values, float64.

    Raises:
        ValueError: exponents not an integer in 1..7, or an axis outside the array.
    """
    if isinstance(exponents, bool) or not isinstance(exponents, (int, np.integer)) or not 1 <= exponents <= 7:
        raise ValueError(
            "exponents must be an integer from 1 to 7 (the powers of two a channel may use; 4 is typical). "
            f"Pass e.g. exponents=4. Received: exponents={exponents!r}")
    x = np.asarray(x, dtype=np.float64)
    axis = _check_axis(axis, x.ndim)
    magnitude = np.abs(x)
    top = _reduce(magnitude, axis, np.max)
    with np.errstate(divide="ignore"):
        e_max = round_half_away_from_zero(np.log2(np.where(top > 0.0, top, 1.0)))
        e = round_half_away_from_zero(np.log2(np.where(magnitude > 0.0, magnitude, 1.0)))
    e_max = _expand(e_max, x.ndim, axis)
    e_min = e_max - exponents + 1
    keep = (magnitude > 0.0) & (e >= e_min)
    return np.where(keep, np.sign(x) * np.exp2(np.clip(e, e_min, e_max)), 0.0)


def ternary(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Ternary weights (TWN, Li & Liu 2016): each value becomes `-alpha`, 0 or `+alpha` per channel.

    `delta = 0.7 * mean|x_c|`; `alpha` is the mean of `|x|` over the values with `|x| > delta` (0 if there are
    none); the result is `alpha * sign(x)` where `|x| > delta`, else 0.
    """
    x = np.asarray(x, dtype=np.float64)
    axis = _check_axis(axis, x.ndim)
    magnitude = np.abs(x)
    delta = _expand(0.7 * _reduce(magnitude, axis, np.mean), x.ndim, axis)
    mask = magnitude > delta
    count = _reduce(mask.astype(np.float64), axis, np.sum)
    total = _reduce(np.where(mask, magnitude, 0.0), axis, np.sum)
    alpha = _expand(np.where(count > 0, total / np.where(count > 0, count, 1.0), 0.0), x.ndim, axis)
    return np.where(mask, alpha * np.sign(x), 0.0)


def binary(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Binary weights (XNOR-Net style): `sign(x) * mean|x_c|` per channel, with `x >= 0` giving +1."""
    x = np.asarray(x, dtype=np.float64)
    axis = _check_axis(axis, x.ndim)
    alpha = _expand(_reduce(np.abs(x), axis, np.mean), x.ndim, axis)
    return np.where(x >= 0.0, alpha, -alpha)


def mse(x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared difference, in float64."""
    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    return float(np.mean(np.square(d))) if d.size else 0.0


def sqnr_db(x: np.ndarray, y: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `y` as an approximation of `x`: `10 log10(sum x^2 / sum (x-y)^2)`.

    +inf when `y` equals `x` exactly; -inf when `x` is all zeros and `y` is not.
    """
    x = np.asarray(x, dtype=np.float64)
    noise = float(np.sum(np.square(x - np.asarray(y, dtype=np.float64))))
    signal = float(np.sum(np.square(x)))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * float(np.log10(signal / noise))


def max_error(x: np.ndarray, y: np.ndarray) -> float:
    """The largest absolute difference."""
    d = np.abs(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64))
    return float(np.max(d)) if d.size else 0.0


def tflite_activation_params(x_min: float, x_max: float, bits: int = 8) -> tuple[float, int]:
    """The scale and zero point TensorFlow's converter gives an int8 activation calibrated to [x_min, x_max].

    Reproduces, in the converter's own float32/float64 steps (read in tensorflow/tensorflow:
    `tensorflow/compiler/mlir/lite/quantization/common/quantization_lib/quantization_utils.h`
    (`ConvertStatsToQDQs`), `.../quantization_utils.cc` (`GetQuantizedType`, `ExpandVerySmallRange`,
    `DownCastScale`, the `legacy_float_scale` path the TFLite converter takes) and
    `tensorflow/compiler/mlir/lite/quantization/ir/FakeQuantSupport.cc` (`fakeQuantAttrsToType`)):

    1. the range is widened to include 0.0, then to at least 1e-6 wide (`[-5e-7, 5e-7]` around an
       all-zero range);
    2. `scale = (float32(x_max) - float32(x_min)) / (qmax - qmin)` in float32;
    3. `zero_point = qmin - x_min / scale`, rounded half away from zero and clamped to [qmin, qmax].

    Args:
        x_min, x_max: the calibrated range (the min and max the calibration saw).
        bits: bit width of the signed integers (qmin = -2^(b-1)); 8 is what int8 models use (16x8 models
            make their 16-bit activations symmetric instead, which this function does not model).

    Returns:
        (scale as a float32-representable float, zero point).
    """
    _check_bits(bits)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo, hi = min(float(x_min), 0.0), max(float(x_max), 0.0)
    if not hi - lo > _NEAR_ZERO_TOLERANCE:
        lo, hi = min(lo, -_NEAR_ZERO_TOLERANCE / 2), max(hi, _NEAR_ZERO_TOLERANCE / 2)
    scale = (np.float32(hi) - np.float32(lo)) / np.float32(qmax - qmin)
    zero_point = np.float32(qmin - lo / float(scale))
    zero_point = int(np.clip(round_half_away_from_zero(zero_point), qmin, qmax))
    return float(scale), zero_point


def tflite_weight_params(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel scales and zero points TensorFlow's converter gives an int8 weight (symmetric, narrow range).

    `scale_c = float32(max|w_c|) / 127` in float32 (the converter computes `(max - min) / 254` with
    `min = -max`, the same number). An all-zero channel is widened to `[-5e-7, 5e-7]` like an activation
    (`ExpandVerySmallRange`), so its scale is `float32(5e-7) / 127` (about 3.9e-9), not 1.0: its weights are
    still stored as 0. Zero points are all 0. Same sources as `tflite_activation_params`.

    Args:
        w: the float weight as the `.tflite` lays it out (after batch-normalization folding).
        axis: its `quantized_dimension` (see the module docstring).

    Returns:
        (scales as float32, zero points as int64), one per channel.
    """
    w = np.asarray(w, dtype=np.float32)
    axis = _check_axis(axis, w.ndim)
    top = _reduce(np.abs(w), axis, np.max).astype(np.float64)
    hi = np.where(2.0 * top > _NEAR_ZERO_TOLERANCE, top, np.maximum(top, _NEAR_ZERO_TOLERANCE / 2))
    hi32 = hi.astype(np.float32)
    scales = (hi32 - (-hi32)) / np.float32(254)
    return scales.astype(np.float32), np.zeros(scales.shape, dtype=np.int64)


def tflite_quantize_weights(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The int8 values and per-channel scales the converter stores for a float weight.

    `q = clamp(round(w * float32(1 / scale_c)), -127, 127)`, the product taken in float32, as
    `SymmetricPerChannelQuantizeValues` does (tensorflow/lite/tools/optimize/quantization_utils.cc, called
    from `QuantizeLegacy` in the converter's quantization_utils.cc).

    Returns:
        (int8 weights shaped like `w`, float32 scales).
    """
    w = np.asarray(w, dtype=np.float32)
    scales, _ = tflite_weight_params(w, axis)
    axis = _check_axis(axis, w.ndim)
    inverse = (1.0 / scales.astype(np.float64)).astype(np.float32)
    product = (w * _expand(inverse, w.ndim, axis).astype(np.float32)).astype(np.float32)
    q = np.clip(round_half_away_from_zero(product), -127, 127)
    return q.astype(np.int8), scales


def tflite_bias_scales(input_scale: float, weight_scales: np.ndarray) -> np.ndarray:
    """The int32 bias scales of a CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED: input scale times weight scale.

    Multiplied in float64 and rounded to float32 (`GetUniformQuantizedTypeForBias`, legacy float scale).
    """
    return (float(input_scale) * np.asarray(weight_scales, dtype=np.float64)).astype(np.float32)


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
        raise ValueError(
            "bits must be an integer from 2 to 16 (the width of the quantized integers). Pass e.g. bits=8. "
            f"Received: bits={bits!r}")


def _check_axis(axis, ndim: int) -> int | None:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -ndim <= axis < ndim:
        raise ValueError(
            f"axis must be None (per tensor) or the channel axis of the {ndim}-D array, from {-ndim} to "
            f"{ndim - 1}. Pass the output-channel axis (-1 for a Keras kernel). Received: axis={axis!r}")
    return int(axis) % ndim


def _int_range(bits: int, scheme: str, narrow_range: bool) -> tuple[int, int]:
    if scheme == "asymmetric":
        return 0, 2 ** bits - 1 - int(narrow_range)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return qmin + int(narrow_range), qmax


def _reduce(x: np.ndarray, axis: int | None, fn) -> np.ndarray:
    """`fn` over every axis but `axis`: one value per channel (one in all for axis None)."""
    if x.size == 0:
        return np.zeros(1 if axis is None else x.shape[axis])
    if axis is None:
        return np.atleast_1d(fn(x))
    others = tuple(i for i in range(x.ndim) if i != axis)
    # A 1-D array along its channel axis: every value is a channel of its own.
    return np.asarray(fn(x, axis=others)) if others else x.copy()


def _expand(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    """Per-channel values shaped to broadcast against the array they describe."""
    values = np.asarray(values)
    if axis is None:
        return values.reshape(()) if values.size == 1 else values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)
