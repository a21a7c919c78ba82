"""Clustering stage: a Keras model in, a copy wrapped for weight clustering out.

`cluster` takes a trained Sequential or functional Keras model and returns a copy whose clusterable
layers are wrapped by tfmot's `ClusterWeights`, so every kernel holds at most `number_of_clusters`
distinct values (per output channel with `per_channel`). Fine-tune it, call `strip` to get plain layers
back, then either convert it directly or keep the clusters through QAT with
`quantize_aware(stripped, scheme="cluster_preserving")`. `distinct_values` reads a converted `.tflite` and
counts the distinct stored weight values, which is what ships. The caller's model is never modified.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np

from tfcompress.core._keras import keras
from tfcompress.core.keras3 import as_tf_keras
from tfcompress.core.tflite_model import TfliteSource, read_tflite, weight_tensors

import tensorflow_model_optimization as tfmot  # after _keras: needs TF_USE_LEGACY_KERAS
from tensorflow_model_optimization.python.core.clustering.keras import (
    cluster_wrapper,
    clustering_registry,
)

ClusterWeights = cluster_wrapper.ClusterWeights
MIN_CLUSTERS = 2
# int8 weights take at most 256 values, so more clusters cannot survive conversion.
MAX_CLUSTERS = 256
_WRAPPERS = frozenset({"PruneLowMagnitude", "QuantizeWrapper", "QuantizeWrapperV2", "QuantizeAnnotate"})
_NUMPY_TYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32,
                "float32": np.float32, "float16": np.float16}


class CentroidInit(str, enum.Enum):
    KMEANS_PLUS_PLUS = "kmeans_plus_plus"
    LINEAR = "linear"
    DENSITY_BASED = "density_based"
    RANDOM = "random"


_TFMOT_INIT = {
    CentroidInit.KMEANS_PLUS_PLUS: tfmot.clustering.keras.CentroidInitialization.KMEANS_PLUS_PLUS,
    CentroidInit.LINEAR: tfmot.clustering.keras.CentroidInitialization.LINEAR,
    CentroidInit.DENSITY_BASED: tfmot.clustering.keras.CentroidInitialization.DENSITY_BASED,
    CentroidInit.RANDOM: tfmot.clustering.keras.CentroidInitialization.RANDOM,
}


def cluster(
    model: keras.Model,
    number_of_clusters: int,
    centroid_init: CentroidInit | str = CentroidInit.KMEANS_PLUS_PLUS,
    per_channel: bool = False,
    preserve_sparsity: bool = False,
    layers: Sequence[str] | None = None,
) -> keras.Model:
    """Returns a copy of `model` whose clusterable layers are wrapped for weight clustering.

    Each wrapped kernel is replaced during training by a lookup into `number_of_clusters` trainable
    centroids. Fine-tune briefly (one epoch at a low learning rate is typical), then `strip`:

    ```python
    clustered = tfcompress.cluster(model, 16)
    clustered.compile(...); clustered.fit(x, y, epochs=1)
    plain = tfcompress.strip_clustering(clustered)
    tflite = tfcompress.convert(tfcompress.load_model(plain), tfcompress.ConvertConfig(), samples)
    ```

    Args:
        model: a trained Sequential or functional tf_keras model; it is copied, never changed.
        number_of_clusters: distinct values per kernel (per output channel with `per_channel`), in
            [2, 256]; with `preserve_sparsity`, at least 3 (one centroid is pinned at zero).
        centroid_init: "kmeans_plus_plus", "linear", "density_based" or "random".
        per_channel: cluster each output channel of a Conv2D kernel separately (matches int8's
            per-channel scales; other layers are clustered per tensor).
        preserve_sparsity: keep the zeros of a pruned model at zero while clustering.
        layers: names of the layers to cluster; default every layer whose weights tfmot clusters
            (DepthwiseConv2D and normalization layers, which tfmot never clusters, stay as they are).

    Returns:
        A new Keras model (uncompiled) with `ClusterWeights` wrappers.

    Raises:
        ValueError: bad arguments, a model that is subclassed or already wrapped, or a selected layer
            tfmot cannot cluster (named, with the fix).
    """
    model = as_tf_keras(model, "cluster")  # a Keras 3 model is translated (checked equal)
    _check_model(model)
    if not isinstance(number_of_clusters, (int, np.integer)) or not (
        MIN_CLUSTERS <= number_of_clusters <= MAX_CLUSTERS
    ):
        raise ValueError(
            f"number_of_clusters must be an integer in [{MIN_CLUSTERS}, {MAX_CLUSTERS}]: one value is no "
            "clustering, and int8 weights hold at most 256 distinct values. Pick, say, 16. "
            f"Received: number_of_clusters={number_of_clusters}"
        )
    if preserve_sparsity and number_of_clusters < 3:
        raise ValueError(
            "preserve_sparsity pins one centroid at zero, so it needs number_of_clusters >= 3 (tfmot "
            f"refuses fewer). Received: number_of_clusters={number_of_clusters}, preserve_sparsity=True"
        )
    init = _centroid_init(centroid_init)
    selected = _select_layers(model, layers, int(number_of_clusters), per_channel)

    # Copy first: the wrappers below take over the copy's layers, never the caller's.
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())

    def wrap(layer):
        if layer.name not in selected:
            return layer
        return tfmot.clustering.keras.cluster_weights(
            layer,
            int(number_of_clusters),
            cluster_centroids_init=_TFMOT_INIT[init],
            preserve_sparsity=preserve_sparsity,
            cluster_per_channel=per_channel,
        )

    return keras.models.clone_model(copy, clone_function=wrap)


def strip(model: keras.Model) -> keras.Model:
    """Returns `model` without clustering wrappers: plain layers whose kernels hold the clustered values.

    ```python
    plain = tfcompress.strip_clustering(clustered)
    ```

    Raises:
        ValueError: `model` is not a tf_keras model.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "strip expects the tf_keras model returned by cluster (after fine-tuning). "
            f"Received: model={type(model).__name__}"
        )
    return tfmot.clustering.keras.strip_clustering(model)


def distinct_values(model: TfliteSource) -> dict[str, dict[str, int]]:
    """Distinct stored weight values per layer weight tensor of a `.tflite`, keyed by tensor name.

    Counts the constant weights of every CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED op as stored in
    the flatbuffer (int8 for an integer model): `"per_tensor"` over the whole tensor and
    `"max_per_channel"`, the largest count along the quantized dimension (output channels: axis 0 for
    conv and fully connected, axis 3 for depthwise). A kernel clustered to k values shows at most k per
    channel; per tensor it may show more, since each channel has its own int8 scale.

    ```python
    tfcompress.distinct_values(tflite)
    # {"small_cnn/fc/MatMul": {"per_tensor": 16, "max_per_channel": 16}, ...}
    ```

    Raises:
        ModelLoadError: the file is missing or not a `.tflite` flatbuffer.
    """
    parsed = read_tflite(model)
    root = parsed.root
    tensors = root.subgraphs[0].tensors
    result = {}
    for op, weights, _ in weight_tensors(parsed, ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")):
        raw = root.buffers[tensors[weights.index].buffer].data
        if raw is None or weights.dtype not in _NUMPY_TYPES:
            continue
        values = np.frombuffer(np.asarray(raw, dtype=np.uint8).tobytes(), dtype=_NUMPY_TYPES[weights.dtype])
        values = values.reshape(weights.shape)
        quantization = tensors[weights.index].quantization
        if len(weights.scale) > 1 and quantization is not None:
            axis = int(quantization.quantizedDimension)
        else:
            axis = 3 if op.op == "DEPTHWISE_CONV_2D" else 0
        channels = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        result[weights.name] = {
            "per_tensor": int(np.unique(values).size),
            "max_per_channel": max((int(np.unique(c).size) for c in channels), default=0),
        }
    return result


# ---------------------------------------------------------------------------------------------------
# Helpers


def _centroid_init(centroid_init) -> CentroidInit:
    try:
        return CentroidInit(centroid_init)
    except ValueError:
        raise ValueError(
            f"Unknown centroid initialisation. Expected one of {[c.value for c in CentroidInit]}. "
            f"Received: centroid_init={centroid_init!r}"
        ) from None


def _check_model(model) -> None:
    if not isinstance(model, keras.Model) or (
        not isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", False)
    ):
        raise ValueError(
            "cluster expects a Sequential or functional tf_keras model; tfmot cannot wrap subclassed or "
            "Keras 3 models. Rebuild it with keras.Sequential or the functional API. "
            f"Received: model={type(model).__name__}"
        )
    if any(isinstance(layer, keras.Model) for layer in model.layers):
        raise ValueError(
            "Nested models cannot be clustered: tfmot wraps only the top-level layers. Flatten the model "
            f"first. Received: model={model.name}"
        )
    kinds = {type(layer).__name__ for layer in model.layers}
    if any(isinstance(layer, ClusterWeights) for layer in model.layers):
        raise ValueError(
            f"Model {model.name!r} is already clustered (it has ClusterWeights layers): keep training it, "
            f"or call tfcompress.strip_clustering(model) first. Received: model={model.name}"
        )
    wrapped = sorted(kinds & _WRAPPERS)
    if wrapped:
        raise ValueError(
            f"Model {model.name!r} has {wrapped} wrappers: strip pruning (tfcompress.strip) before "
            "clustering, and quantize (cluster_preserving QAT) only after it. "
            f"Received: model={model.name}"
        )


def _clusterable(layer) -> bool:
    """Whether tfmot clusters some weight of `layer` (it accepts, but leaves alone, e.g. DepthwiseConv2D)."""
    if isinstance(layer, tfmot.clustering.keras.ClusterableLayer):
        return bool(layer.get_clusterable_weights())
    registry = clustering_registry.ClusteringRegistry
    if not layer.trainable_weights or not registry.supports(layer):
        return False
    names = registry._LAYERS_WEIGHTS_MAP.get(layer.__class__)
    return names is None or bool(names)  # None: an RNN or attention layer, clustered by its cells


def _left_alone(layer) -> bool:
    """A layer tfmot's registry knows but, by design, does not cluster (e.g. DepthwiseConv2D)."""
    return clustering_registry.ClusteringRegistry._LAYERS_WEIGHTS_MAP.get(layer.__class__) == []


def _too_few_weights(layer, number_of_clusters: int, per_channel: bool) -> bool:
    """tfmot silently skips a Conv2D with no more weights (per channel) than clusters; we refuse it."""
    if not isinstance(layer, keras.layers.Conv2D):
        return False
    kernel = np.asarray(layer.kernel.shape)
    count = int(np.prod(kernel))
    if per_channel:
        count //= int(kernel[-1] if layer.data_format != "channels_first" else kernel[1])
    return count <= number_of_clusters


def _select_layers(model, layers, number_of_clusters: int, per_channel: bool) -> set[str]:
    candidates = [lyr for lyr in model.layers if not isinstance(lyr, keras.layers.InputLayer)]
    names = [lyr.name for lyr in candidates]
    if layers is not None:
        if isinstance(layers, str):
            layers = [layers]
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise ValueError(
                f"layers names layers the model does not have: {unknown}; choose from {names}. "
                f"Received: layers={list(layers)}"
            )
        candidates = [lyr for lyr in candidates if lyr.name in layers]
    # By default, layers tfmot leaves unclustered by design (DepthwiseConv2D, normalizations) stay as they
    # are; only weights it does not know at all, or a layer named in `layers`, are refused.
    unsupported = [
        f"{lyr.name} ({type(lyr).__name__})" for lyr in candidates
        if not _clusterable(lyr) and (layers is not None or (lyr.trainable_weights and not _left_alone(lyr)))
    ]
    if unsupported:
        raise ValueError(
            f"tfmot cannot cluster the weights of {', '.join(unsupported)}. Choose the layers to cluster "
            f"with layers=[...] (Dense, Conv2D, ...). Received: layers={layers}"
        )
    selected = [lyr for lyr in candidates if _clusterable(lyr)]
    small = [f"{lyr.name} ({int(np.prod(lyr.kernel.shape))} weights)" for lyr in selected
             if _too_few_weights(lyr, number_of_clusters, per_channel)]
    if small:
        where = "per channel " if per_channel else ""
        raise ValueError(
            f"{', '.join(small)} has no more weights {where}than clusters, so clustering cannot compress "
            "it (tfmot would silently skip it). Leave it out with layers=[...], lower number_of_clusters"
            f"{', or set per_channel=False' if per_channel else ''}. "
            f"Received: number_of_clusters={number_of_clusters}, per_channel={per_channel}"
        )
    if not selected:
        raise ValueError(
            f"No layer of model {model.name!r} has weights to cluster: select Dense or Conv2D layers. "
            f"Received: layers={layers}"
        )
    return {lyr.name for lyr in selected}
