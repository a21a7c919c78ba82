"""Quantization-aware training stage: wraps a tf_keras model with tfmot's fake-quant layers.

Takes a float Sequential or functional model; returns a new model that trains with int8 fake
quantization (QAT) under tfmot's default 8-bit scheme, or its prune-preserving (PQAT) or
cluster-preserving (CQAT) variants. Layers tfmot cannot quantize are named up front instead of failing
deep inside tfmot; with `leave_float` they stay float, and the converted model is then not full-integer
(the convert stage refuses int8 for it, naming the ops).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence

from tfcompress.core._keras import keras
from tfcompress.core.keras3 import as_tf_keras
from tfcompress.training import lowbit

import tensorflow_model_optimization as tfmot  # after _keras: needs TF_USE_LEGACY_KERAS
from tensorflow_model_optimization.python.core.quantization.keras.collab_opts.cluster_preserve import (
    cluster_preserve_quantize_registry as _cluster_preserve,
)
from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
    default_8bit_quantize_registry,
)

_QUANTIZED_LAYERS = frozenset({"QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer", "QuantizeAnnotate"})
_PRUNED_LAYERS = frozenset({"PruneLowMagnitude"})
_CLUSTERED_LAYERS = frozenset({"ClusterWeights", "ClusterWeightsRNN", "ClusterWeightsMHA"})
# Handled by tfmot's graph transforms (folded into the preceding Conv2D/Dense), not by the registry.
_FOLDED_LAYERS = (keras.layers.BatchNormalization,)


class Scheme(str, enum.Enum):
    DEFAULT = "default"
    PRUNE_PRESERVING = "prune_preserving"
    CLUSTER_PRESERVING = "cluster_preserving"


def unsupported_layers(model: keras.Model) -> list[str]:
    """Names of the layers tfmot's default 8-bit scheme cannot quantize, as `name (Class)`."""
    registry = default_8bit_quantize_registry.Default8BitQuantizeRegistry()
    return [
        f"{layer.name} ({type(layer).__name__})"
        for layer in model.layers
        if not isinstance(layer, (keras.layers.InputLayer, *_FOLDED_LAYERS)) and not registry.supports(layer)
    ]


def low_bit_layers(model: keras.Model, keep_int8: Sequence[str] | None = None,
                   leave_float: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(layers that get low-bit weights, layers kept at int8) of `model`.

    The candidates are the Conv2D, DepthwiseConv2D and Dense layers not left float. `keep_int8=None` keeps the
    first and the last of them at int8 (the last of each output, for several outputs), as the low-bit
    literature does (TWN, XNOR-Net, DoReFa-Net: the first layer sees the raw input, the last one makes the
    scores); `keep_int8=[]` makes every one low-bit.
    """
    layers = [layer for layer in model.layers
              if type(layer).__name__ in lowbit.KERNELS and layer.name not in leave_float]
    candidates = [layer.name for layer in layers]
    if keep_int8 is None:
        # "The last" is every head of a multi-output model: the weight layers whose output is a model output,
        # or else the last weight layer (a head that ends in a separate activation layer).
        heads = [layer.name for layer in layers if any(layer.output is output for output in model.outputs)]
        kept = [candidates[0], *(heads or candidates[-1:])] if len(candidates) > 1 else []
    else:
        names = {layer.name for layer in model.layers}
        unknown = sorted(set(keep_int8) - names)
        if unknown:
            raise ValueError(
                f"keep_int8 names layers that are not in model {model.name}: {unknown}. Use names from "
                f"model.summary(). Received: keep_int8={list(keep_int8)}"
            )
        not_kernels = sorted(set(keep_int8) - set(candidates))
        if not_kernels:
            raise ValueError(
                f"keep_int8 names layers of model {model.name} without low-bit weights to keep at int8 (not "
                f"Conv2D, DepthwiseConv2D or Dense, or left float): {not_kernels}. Name only those layers. "
                f"Received: keep_int8={list(keep_int8)}"
            )
        kept = [name for name in candidates if name in keep_int8]
    return [name for name in candidates if name not in kept], list(dict.fromkeys(kept))


def quantize_aware(model: keras.Model, scheme: Scheme | str = Scheme.DEFAULT,
                   leave_float: Sequence[str] = (), weights: str = "int8",
                   keep_int8: Sequence[str] | None = None,
                   pow2_exponents: int = lowbit.DEFAULT_POW2_EXPONENTS) -> keras.Model:
    """Returns a quantization-aware copy of `model` for fine-tuning; the caller's model is untouched.

    Example:
        ```python
        qat = tfcompress.quantize_aware(model)  # or scheme="prune_preserving" after strip()
        qat.compile(...); qat.fit(x, y, epochs=1)
        tflite = tfcompress.convert(tfcompress.load_model(qat), tfcompress.ConvertConfig("int8"))
        ```

    Args:
        model: a tf_keras Sequential or functional model, not already quantization-aware; for
            `prune_preserving`, a pruned model after `strip` (zeros kept, wrappers removed).
        scheme: "default" (QAT), "prune_preserving" (PQAT) or "cluster_preserving" (CQAT).
        leave_float: names of layers tfmot cannot quantize that should stay float. The model is then not
            full-integer and int8 conversion will refuse it.
        weights: the kernels' values in training and in the shipped int8 model: "int8" (tfmot's scheme),
            "int4" / "int2" (symmetric linear, 15 / 3 levels), "ternary" (TWN: 0.7 x mean|w| threshold, one
            scale), "binary" (sign(w) x mean|w|) or "pow2" (signed powers of two, `pow2_exponents` of them).
            The scale is per output channel for Conv2D/DepthwiseConv2D and per tensor for Dense (the
            converter's only form for a QAT FULLY_CONNECTED). Activations stay int8 either way.
        keep_int8: Conv2D/DepthwiseConv2D/Dense layers that keep int8 weights when `weights` is low-bit;
            None (default) keeps the first and the last; [] makes every one low-bit.
        pow2_exponents: exponents per channel for "pow2" (1-7): at most 2k+1 distinct values.

    Raises:
        ValueError: subclassed or nested model, already quantized or still pruning-wrapped, unknown
            scheme, unknown `leave_float` names, or layers tfmot cannot quantize (named).
    """
    model = as_tf_keras(model, "quantize_aware")  # a Keras 3 model is translated (checked equal)
    scheme = _scheme(scheme)
    weights = _weights(weights)
    _check_structure(model)
    if weights is not lowbit.Weights.INT8 and scheme is not Scheme.DEFAULT:
        raise ValueError(
            f"weights={weights.value!r} replaces every kernel value by the scheme's few values, which neither "
            "keeps a pruned kernel's zeros nor its clusters: use scheme='default' with low-bit weights, or "
            f"weights='int8' with {scheme.value}. Received: scheme={scheme.value!r}, weights={weights.value!r}"
        )
    if not (isinstance(pow2_exponents, int) and 1 <= pow2_exponents <= lowbit.MAX_POW2_EXPONENTS):
        raise ValueError(
            f"pow2_exponents must be an integer in [1, {lowbit.MAX_POW2_EXPONENTS}] (an int8 weight holds "
            f"127, 64, ..., 1 apart: {lowbit.MAX_POW2_EXPONENTS} halvings). Received: pow2_exponents={pow2_exponents!r}"
        )
    names = {layer.name for layer in model.layers}
    unknown = sorted(set(leave_float) - names)
    if unknown:
        raise ValueError(
            f"leave_float names layers that are not in model {model.name}: {unknown}. Use names from "
            f"model.summary(). Received: leave_float={list(leave_float)}"
        )
    blocked = [entry for entry in unsupported_layers(model) if entry.split(" (")[0] not in leave_float]
    if blocked:
        raise ValueError(
            f"tfmot cannot quantize {len(blocked)} layer(s) of model {model.name}: {', '.join(blocked)}. "
            "Replace them with supported layers (e.g. fold Rescaling into the input pipeline), or pass "
            f"leave_float={[entry.split(' (')[0] for entry in blocked]} to keep them float (the model is "
            "then not full-integer). Received: leave_float=" + repr(list(leave_float))
        )

    def annotate(layer):
        copy = layer.__class__.from_config(layer.get_config())
        if layer.name in leave_float:
            return copy
        return tfmot.quantization.keras.quantize_annotate_layer(copy)

    scheme_object = _scheme_object(scheme)
    if weights is not lowbit.Weights.INT8:
        low_bit, _ = low_bit_layers(model, keep_int8, leave_float)
        if not low_bit:
            raise ValueError(
                f"weights={weights.value!r} would change no layer of model {model.name}: it has no Conv2D, "
                "DepthwiseConv2D or Dense layer outside keep_int8 and leave_float (the first and the last are "
                "kept at int8 by default: pass keep_int8=[] to make them low-bit too). Received: "
                f"keep_int8={None if keep_int8 is None else list(keep_int8)}"
            )
        scheme_object = lowbit.low_bit_scheme(weights.value, frozenset(low_bit), pow2_exponents)
    elif keep_int8:
        raise ValueError("keep_int8 names the layers that stay int8 among low-bit ones, so it needs low-bit "
                         f"weights (weights='int4', 'ternary', ...). Received: keep_int8={list(keep_int8)}, "
                         "weights='int8'")

    annotated = keras.models.clone_model(model, clone_function=annotate)
    annotated.set_weights(model.get_weights())
    try:
        with tfmot.quantization.keras.quantize_scope():
            return tfmot.quantization.keras.quantize_apply(annotated, scheme_object)
    except RuntimeError as e:
        found = re.search(r"Layer (\S+):<class '[\w.]*\.(\w+)'> is not supported", str(e))
        where = f"layer {found.group(1)} ({found.group(2)})" if found else "a layer"
        raise ValueError(
            f"tfmot cannot quantize {where} of model {model.name} in this position ({e}). Move it after "
            f"a Conv2D/Dense it can fold into, replace it, or pass it in leave_float."
        ) from None


def _scheme(scheme) -> Scheme:
    try:
        return Scheme(scheme)
    except ValueError:
        raise ValueError(
            f"Unknown QAT scheme. Expected one of {[s.value for s in Scheme]}. Received: scheme={scheme!r}"
        ) from None


def _weights(weights) -> lowbit.Weights:
    try:
        return lowbit.Weights(weights)
    except ValueError:
        raise ValueError(
            f"Unknown QAT weights. Expected one of {[w.value for w in lowbit.Weights]}. Received: weights={weights!r}"
        ) from None


class _PerLayerClusterPreserveRegistry(_cluster_preserve.Default8bitClusterPreserveQuantizeRegistry):
    """tfmot's registry with a fresh weight quantizer per layer.

    tfmot shares one weight quantizer between all Dense (and all Conv) layers, and the first layer without
    zeros turns its `preserve_sparsity` off for all of them: a pruned, clustered layer then loses its
    zeros in CQAT. A fresh registry state per layer keeps each layer's own setting.
    """

    def __init__(self, preserve_sparsity: bool):
        super().__init__(preserve_sparsity)
        self._preserve_sparsity = preserve_sparsity

    def get_quantize_config(self, layer):
        _cluster_preserve.ClusterPreserveQuantizeRegistry.__init__(self, self._preserve_sparsity)
        return super().get_quantize_config(layer)


class _ClusterPreserveScheme(tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme):
    def get_quantize_registry(self):
        return _PerLayerClusterPreserveRegistry(self.preserve_sparsity)


def _scheme_object(scheme: Scheme):
    if scheme is Scheme.PRUNE_PRESERVING:
        return tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
    if scheme is Scheme.CLUSTER_PRESERVING:
        return _ClusterPreserveScheme(preserve_sparsity=True)
    return tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme()


def _check_structure(model) -> None:
    if not isinstance(model, keras.Model):
        raise ValueError(
            "quantize_aware expects a tf_keras (Keras 2) model; Keras 3 models cannot be wrapped by tfmot. "
            f"Received: model={type(model).__name__}"
        )
    if not isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", False):
        raise ValueError(
            f"Model {model.name} is a subclassed model; tfmot can only wrap Sequential and functional "
            f"models. Rebuild it with keras.Sequential or the functional API. Received: "
            f"model={type(model).__name__}"
        )
    nested = [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
    if nested:
        raise ValueError(
            f"Model {model.name} nests model(s) {nested} as layers; tfmot cannot wrap nested models. "
            "Flatten them into one functional model first."
        )
    kinds = {type(layer).__name__ for layer in model.submodules}
    if kinds & _QUANTIZED_LAYERS:
        raise ValueError(
            f"Model {model.name} is already quantization-aware (it has tfmot quantize wrappers). Quantize "
            "the float model once; to convert this one, pass it to convert directly."
        )
    if kinds & _CLUSTERED_LAYERS:
        raise ValueError(
            f"Model {model.name} still has clustering wrappers. Call tfcompress.strip_clustering(model) "
            "after clustering, then quantize_aware(..., scheme='cluster_preserving')."
        )
    if kinds & _PRUNED_LAYERS:
        raise ValueError(
            f"Model {model.name} still has pruning wrappers. Call tfcompress.strip(model) after pruning, "
            "then quantize_aware(..., scheme='prune_preserving')."
        )
