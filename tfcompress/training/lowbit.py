"""Low-bit weights for quantization-aware training: int4, int2, ternary, binary and power-of-two kernels.

Takes a layer kind and a weight scheme; gives tfmot a `QuantizeConfig` whose weight quantizer projects each
kernel, per output channel, onto the scheme's few values in the forward pass and passes the gradient
straight through to the float kernel (the straight-through estimator of BinaryConnect and TWN). The
projected kernel then goes through the same symmetric per-channel 8-bit fake quantization tfmot's own
scheme uses, so the TFLite converter finds the ranges it expects and writes an ordinary full-int8
flatbuffer (activations stay int8, as tfmot's default scheme makes them): the int8 kernel holds only the
projected values, which `export --compress` packs into 1-, 2- or 4-bit look-up-table indices for TFLM.

The schemes are the definitions of `tfcompress.core.quantizers` (numpy, the written reference), computed
with TensorFlow ops here; the tests hold the two to each other.
"""

from __future__ import annotations

import enum

from tfcompress.core._keras import keras, tf

from tensorflow_model_optimization.python.core.quantization.keras import quant_ops, quantizers  # after _keras
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_registry as _registry,
)


class Weights(str, enum.Enum):
    INT8 = "int8"
    INT4 = "int4"
    INT2 = "int2"
    TERNARY = "ternary"
    BINARY = "binary"
    POW2 = "pow2"


# Power-of-two exponents per channel: an int8 weight can hold 127, 64, ..., 1 (seven halvings) exactly apart.
MAX_POW2_EXPONENTS = 7
DEFAULT_POW2_EXPONENTS = 4
# The layers whose kernel gets low-bit weights; the kernel's attribute on each.
KERNELS = {"Conv2D": "kernel", "Dense": "kernel", "DepthwiseConv2D": "depthwise_kernel"}


def max_distinct(weights: Weights | str, pow2_exponents: int = DEFAULT_POW2_EXPONENTS) -> int:
    """The most distinct values one output channel of the shipped int8 kernel may hold under `weights`."""
    weights = Weights(weights)
    return {Weights.INT8: 255, Weights.INT4: 15, Weights.INT2: 3, Weights.TERNARY: 3, Weights.BINARY: 2,
            Weights.POW2: 2 * pow2_exponents + 1}[weights]


def _channels_last(kernel, depthwise: bool):
    """The kernel as [..., channels]: a depthwise kernel [h, w, in, multiplier] has in * multiplier channels
    (TFLite's DEPTHWISE_CONV_2D filter [1, h, w, in * multiplier], quantized along its last axis), here
    [h * w, in * multiplier]."""
    if depthwise:
        h, w, c, m = kernel.shape
        return tf.reshape(kernel, (h * w, c * m))
    return kernel


def _round(x):
    """Rounds half away from zero, as TFLite (std::round) and the numpy reference do."""
    return tf.sign(x) * tf.floor(tf.abs(x) + 0.5)


def project(kernel, weights: Weights | str, pow2_exponents: int = DEFAULT_POW2_EXPONENTS,
            per_channel: bool = True):
    """The kernel projected onto the scheme's values, per channel (the last axis) or for the whole tensor."""
    weights = Weights(weights)
    axes = list(range(kernel.shape.rank - (1 if per_channel else 0)))
    magnitude = tf.abs(kernel)
    if weights in (Weights.INT4, Weights.INT2):
        levels = float((1 << ((4 if weights is Weights.INT4 else 2) - 1)) - 1)
        peak = tf.reduce_max(magnitude, axis=axes, keepdims=True)
        scale = tf.where(peak > 0, peak / levels, tf.ones_like(peak))
        return tf.clip_by_value(_round(kernel / scale), -levels, levels) * scale
    if weights is Weights.TERNARY:
        delta = 0.7 * tf.reduce_mean(magnitude, axis=axes, keepdims=True)
        kept = tf.cast(magnitude > delta, kernel.dtype)
        count = tf.reduce_sum(kept, axis=axes, keepdims=True)
        alpha = tf.math.divide_no_nan(tf.reduce_sum(magnitude * kept, axis=axes, keepdims=True), count)
        return alpha * tf.sign(kernel) * kept
    if weights is Weights.BINARY:
        alpha = tf.reduce_mean(magnitude, axis=axes, keepdims=True)
        return alpha * tf.where(kernel >= 0, tf.ones_like(kernel), -tf.ones_like(kernel))
    if weights is Weights.POW2:
        peak = tf.reduce_max(magnitude, axis=axes, keepdims=True)
        top = _round(tf.math.log(tf.where(peak > 0, peak, tf.ones_like(peak))) / tf.math.log(2.0))
        safe = tf.where(magnitude > 0, magnitude, tf.ones_like(magnitude))
        exponent = _round(tf.math.log(safe) / tf.math.log(2.0))
        keep = tf.logical_and(magnitude > 0, exponent >= top - (pow2_exponents - 1))
        exponent = tf.minimum(exponent, top)
        return tf.where(keep, tf.sign(kernel) * tf.pow(2.0, exponent), tf.zeros_like(kernel))
    return kernel


class LowBitWeightQuantizer(quantizers.Quantizer):
    """Projects a kernel onto a low-bit scheme (straight-through gradient), then fake-quantizes the projection
    to symmetric int8 with its own range, per output channel or, for `per_channel=False`, per tensor."""

    def __init__(self, weights: str, pow2_exponents: int = DEFAULT_POW2_EXPONENTS, depthwise: bool = False,
                 per_channel: bool = True):
        self.weights = Weights(weights).value
        self.pow2_exponents = int(pow2_exponents)
        self.depthwise = bool(depthwise)
        self.per_channel = bool(per_channel)

    def build(self, tensor_shape, name, layer):
        # One range per last kernel axis, as tfmot's own conv quantizer: for a depthwise kernel [h, w, in,
        # multiplier] that is one per multiplier (the converter refuses other forms, measured: a range per
        # channel on the kernel reshaped to [h * w, in * multiplier] fails in 'tfl.quantize', and a per-tensor
        # range leaves DEPTHWISE_CONV_2D float). The projection stays per channel: one value per channel maps to
        # one int8 value, and the BatchNorm the converter folds in scales each channel on its own.
        shape = (tensor_shape[-1],) if self.per_channel else ()
        built = {bound: layer.add_weight(f"{name}_{bound.split('_')[0]}", shape=shape, trainable=False,
                                         initializer=keras.initializers.Constant(-6.0 if bound == "min_var" else 6.0))
                 for bound in ("min_var", "max_var")}
        built["projected"] = layer.add_weight(f"{name}_{self.weights}", shape=tuple(tensor_shape), trainable=False,
                                              initializer="zeros")
        return built

    def _fake_quant(self, kernel, weights, training: bool):
        # tfmot's own last-value quantizer: in training it takes the range of the projected kernel and keeps it
        # in the layer's min/max variables, which the converter reads as the int8 weight range.
        return quant_ops.LastValueQuantize(kernel, weights["min_var"], weights["max_var"],
                                           per_channel=self.per_channel, is_training=training, num_bits=8,
                                           narrow_range=True, symmetric=True)

    def __call__(self, inputs, training, weights, **kwargs):
        if not training:
            # Out of training the layer computes with the projection of the last training step, kept in a
            # variable: the converter then sees a constant kernel under tfmot's usual fake-quant op (a
            # projection computed in the graph is not folded before the converter quantizes the kernel,
            # measured: it then fails on the kernel's transpose).
            return self._fake_quant(weights["projected"], weights, False)
        kernel = _channels_last(inputs, self.depthwise)
        projected = tf.reshape(project(kernel, self.weights, self.pow2_exponents, self.per_channel), inputs.shape)
        weights["projected"].assign(projected)
        straight = inputs + tf.stop_gradient(projected - inputs)  # the straight-through estimator
        return self._fake_quant(straight, weights, True)

    def get_config(self):
        return {"weights": self.weights, "pow2_exponents": self.pow2_exponents, "depthwise": self.depthwise,
                "per_channel": self.per_channel}

    def __eq__(self, other):
        return isinstance(other, LowBitWeightQuantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self.__eq__(other)


@keras.utils.register_keras_serializable(package="tfcompress")
class LowBitQuantizeConfig(_registry.Default8BitQuantizeConfig):
    """tfmot's 8-bit config for a Conv2D, DepthwiseConv2D or Dense, with a low-bit weight quantizer.

    A Dense kernel has one scale (`per_channel=False`): the converter takes a QAT FULLY_CONNECTED kernel's range
    per tensor only (a per-channel range makes it fail on the kernel's transpose, measured), and one scale
    also keeps the shipped tensor to the scheme's few values as a whole, which a look-up table needs.
    """

    def __init__(self, weight_attrs, activation_attrs, quantize_output, weights: str = "int4",
                 pow2_exponents: int = DEFAULT_POW2_EXPONENTS, per_channel: bool = True):
        super().__init__(weight_attrs, activation_attrs, quantize_output)
        self.weights = Weights(weights).value
        self.pow2_exponents = int(pow2_exponents)
        self.per_channel = bool(per_channel)
        self.weight_quantizer = LowBitWeightQuantizer(
            self.weights, self.pow2_exponents, depthwise=list(weight_attrs) == ["depthwise_kernel"],
            per_channel=self.per_channel)

    def get_config(self):
        return {**super().get_config(), "weights": self.weights, "pow2_exponents": self.pow2_exponents,
                "per_channel": self.per_channel}


class LowBitRegistry(_registry.Default8BitQuantizeRegistry):
    """tfmot's default 8-bit registry, with low-bit weights for the layers named in `low_bit`."""

    def __init__(self, weights: str, low_bit: frozenset[str], pow2_exponents: int = DEFAULT_POW2_EXPONENTS):
        super().__init__()
        self._weights = Weights(weights).value
        self._low_bit = frozenset(low_bit)
        self._pow2_exponents = pow2_exponents

    def get_quantize_config(self, layer):
        config = super().get_quantize_config(layer)
        if layer.name not in self._low_bit or type(layer).__name__ not in KERNELS:
            return config
        return LowBitQuantizeConfig(config.weight_attrs, config.activation_attrs, config.quantize_output,
                                    self._weights, self._pow2_exponents,
                                    per_channel=not isinstance(layer, keras.layers.Dense))


def low_bit_scheme(weights: str, low_bit: frozenset[str], pow2_exponents: int = DEFAULT_POW2_EXPONENTS):
    """tfmot's default 8-bit scheme (same layout transforms) with `LowBitRegistry`."""
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_scheme,
    )

    class _Scheme(default_8bit_quantize_scheme.Default8BitQuantizeScheme):
        def get_quantize_registry(self):
            return LowBitRegistry(weights, low_bit, pow2_exponents)

    return _Scheme()
