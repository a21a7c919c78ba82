"""Tests for the clustering stage: the trained small CNN clustered, fine-tuned and converted to int8."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_cnn

from tfcompress.core._keras import keras
from tfcompress.training.cluster import ClusterWeights, cluster, distinct_values, strip
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.core.model_io import load_model
from tfcompress.training.quantize import quantize_aware
from tfcompress.core.tflite_model import weight_sparsity
from tfcompress.conversion.verify import verify

CLUSTERS = 16
SAMPLES = 2000


def _fit(model, mnist_subset, samples=SAMPLES):
    x_train, y_train, _, _ = mnist_subset
    model.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  ["accuracy"])
    model.fit(x_train[:samples], y_train[:samples], epochs=1, batch_size=64, verbose=0, shuffle=False)
    return model


def _by_layer(values: dict) -> dict:
    """Keys like 'small_cnn/fc/MatMul' or 'small_cnn/quant_fc/MatMul;...' as the layer name ('fc')."""
    return {name.split(";")[0].split("/")[1].removeprefix("quant_"): v for name, v in values.items()}


@pytest.fixture(scope="module")
def clustered(trained_model, mnist_subset):
    """The trained CNN clustered to 16 values per kernel, fine-tuned one epoch and stripped."""
    before = [w.copy() for w in trained_model.get_weights()]
    wrapped = cluster(trained_model, CLUSTERS)
    for old, new in zip(before, trained_model.get_weights()):
        np.testing.assert_array_equal(old, new)  # the caller's model is untouched
    assert not any(isinstance(lyr, ClusterWeights) for lyr in trained_model.layers)
    assert {lyr.layer.name for lyr in wrapped.layers if isinstance(lyr, ClusterWeights)} == {"conv", "fc", "logits"}
    return strip(_fit(wrapped, mnist_subset))


def test_clustered_model_keeps_its_values_in_the_int8_flatbuffer(clustered, mnist_subset,
                                                                 calibration_samples):
    _, _, x_test, y_test = mnist_subset
    assert [lyr.name for lyr in clustered.layers] == ["conv", "pool", "flatten", "fc", "logits"]
    for name in ("conv", "fc", "logits"):
        assert np.unique(clustered.get_layer(name).kernel.numpy()).size <= CLUSTERS
    flatbuffer = convert(load_model(clustered), ConvertConfig(), calibration_samples)
    result = verify(flatbuffer, "int8", "uint8", float_model=load_model(clustered), eval_samples=x_test,
                    eval_labels=y_test, max_accuracy_drop=0.02)
    assert result.passed and result.accuracy.tflite_accuracy > 0.8
    counts = _by_layer(distinct_values(flatbuffer))
    assert set(counts) == {"conv", "fc", "logits"}
    for name, count in counts.items():
        assert count["max_per_channel"] <= CLUSTERS, name
    # The converter gives fully connected weights one int8 scale per output channel here, so the same
    # 16 float values land on different integers in different rows: per tensor there are more.
    assert counts["fc"]["per_tensor"] > CLUSTERS


def test_cluster_preserving_qat_converts_to_verified_int8(clustered, trained_model, mnist_subset, tmp_path):
    _, _, x_test, y_test = mnist_subset
    # CQAT reads the clusters from the plain kernels of the stripped model (tfmot's get_unique).
    cqat = _fit(quantize_aware(clustered, scheme="cluster_preserving"), mnist_subset)
    loaded = load_model(cqat)
    assert loaded.is_quantization_aware
    flatbuffer = convert(loaded, ConvertConfig())  # QAT ranges: no calibration data needed
    verify(flatbuffer, "int8", "uint8", float_model=load_model(trained_model), eval_samples=x_test,
           eval_labels=y_test, max_accuracy_drop=0.03)
    path = tmp_path / "cqat.tflite"
    path.write_bytes(flatbuffer)
    counts = _by_layer(distinct_values(path))  # a path works as well as bytes
    assert set(counts) == {"conv", "fc", "logits"}
    for name, count in counts.items():
        assert count["max_per_channel"] <= CLUSTERS, name
    # QAT's fake quantisation gives Dense kernels one scale per tensor: 16 values in the whole tensor.
    assert counts["fc"]["per_tensor"] <= CLUSTERS and counts["logits"]["per_tensor"] <= CLUSTERS


def test_preserve_sparsity_keeps_a_pruned_models_zeros(trained_model, mnist_subset, calibration_samples):
    sparse = keras.models.clone_model(trained_model)
    weights = trained_model.get_weights()
    kernel = weights[2]  # fc kernel: half its weights (the smallest) set to zero, as magnitude pruning does
    weights[2] = np.where(np.abs(kernel) < np.quantile(np.abs(kernel), 0.5), 0.0, kernel).astype(np.float32)
    sparse.set_weights(weights)
    plain = strip(_fit(cluster(sparse, 8, preserve_sparsity=True, layers=["fc"]), mnist_subset))
    fc = plain.get_layer("fc").kernel.numpy()
    assert np.all(fc[weights[2] == 0] == 0)  # every pruned weight is still zero
    assert np.unique(fc).size <= 8
    shipped = _by_layer(weight_sparsity(convert(load_model(plain), ConvertConfig(), calibration_samples)))
    assert shipped["fc"] >= 0.5


def test_sparsity_survives_cluster_preserving_qat(trained_model, mnist_subset):
    sparse = keras.models.clone_model(trained_model)
    weights = trained_model.get_weights()
    kernel = weights[2]
    weights[2] = np.where(np.abs(kernel) < np.quantile(np.abs(kernel), 0.5), 0.0, kernel).astype(np.float32)
    sparse.set_weights(weights)
    plain = strip(_fit(cluster(sparse, 8, preserve_sparsity=True, layers=["fc"]), mnist_subset, 512))
    pcqat = quantize_aware(plain, scheme="cluster_preserving")
    x_train, y_train, _, _ = mnist_subset
    pcqat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pcqat.fit(x_train[:512], y_train[:512], epochs=1, batch_size=64, verbose=0, shuffle=False)
    shipped = _by_layer(weight_sparsity(convert(load_model(pcqat), ConvertConfig())))
    # tfmot alone loses these zeros: its registry shares one weight quantizer between all Dense layers,
    # and logits (no zeros) switches preserve_sparsity off for fc too. tfcompress.training.quantize keeps one per layer.
    assert shipped["fc"] >= 0.5


def test_the_one_strip_removes_clustering_wrappers_too(trained_model, mnist_subset):
    """`tfcompress.strip` (the pruning module's) strips a clustered model as `strip_clustering` does."""
    from tfcompress.training.prune import strip as strip_any

    wrapped = _fit(cluster(trained_model, 8, layers=["fc"]), mnist_subset, 512)
    plain = strip_any(wrapped)
    assert not any(isinstance(lyr, ClusterWeights) for lyr in plain.layers)
    assert [lyr.name for lyr in plain.layers] == ["conv", "pool", "flatten", "fc", "logits"]
    fc = plain.get_layer("fc").kernel.numpy()
    assert np.unique(fc).size <= 8
    np.testing.assert_array_equal(fc, strip(wrapped).get_layer("fc").kernel.numpy())
    x_test = mnist_subset[2][:64]
    np.testing.assert_allclose(plain.predict(x_test, verbose=0), wrapped.predict(x_test, verbose=0), atol=1e-5)


def test_quantize_aware_asks_to_strip_clustering_first(trained_model):
    with pytest.raises(ValueError, match=r"still has clustering wrappers\. Call tfcompress.strip_clustering"):
        quantize_aware(cluster(trained_model, 8, layers=["fc"]), scheme="cluster_preserving")


def test_per_channel_and_layer_selection(trained_model):
    wrapped = cluster(trained_model, 4, centroid_init="linear", per_channel=True, layers=["conv"])
    (conv,) = [lyr for lyr in wrapped.layers if isinstance(lyr, ClusterWeights)]
    assert conv.layer.name == "conv" and conv.cluster_per_channel
    assert conv.cluster_centroids["kernel"].shape == (8, 4)  # 4 centroids for each of 8 output channels
    kernel = strip(wrapped).get_layer("conv").kernel.numpy()
    assert max(np.unique(kernel[..., c]).size for c in range(8)) <= 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(number_of_clusters=1), r"integer in \[2, 256\].* Received: number_of_clusters=1$"),
    (dict(number_of_clusters=257), r"int8 weights hold at most 256 .* Received: number_of_clusters=257$"),
    (dict(number_of_clusters=8.0), r"Received: number_of_clusters=8.0$"),
    (dict(number_of_clusters=2, preserve_sparsity=True),
     r"needs number_of_clusters >= 3 .* Received: number_of_clusters=2, preserve_sparsity=True"),
    (dict(number_of_clusters=8, centroid_init="kmeans"),
     r"Unknown centroid initialisation.* Received: centroid_init='kmeans'"),
    (dict(number_of_clusters=8, layers=["dense_9"]),
     r"layers names layers the model does not have: \['dense_9'\].* Received: layers=\['dense_9'\]"),
    (dict(number_of_clusters=8, layers=["pool"]),
     r"tfmot cannot cluster the weights of pool \(MaxPooling2D\)"),
    (dict(number_of_clusters=16, per_channel=True),
     r"conv \(72 weights\) has no more weights per channel than clusters.* per_channel=False"),
    (dict(number_of_clusters=128), r"conv \(72 weights\) has no more weights than clusters"),
])
def test_bad_arguments(trained_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cluster(trained_model, **kwargs)


def test_wrapped_and_subclassed_models_are_refused(trained_model):
    wrapped = cluster(trained_model, 8)
    with pytest.raises(ValueError, match=r"already clustered .* tfcompress.strip_clustering\(model\) first"):
        cluster(wrapped, 8)

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match=r"Sequential or functional tf_keras model.* Received: model=Sub"):
        cluster(Sub(), 8)
    with pytest.raises(ValueError, match=r"Nested models cannot be clustered"):
        cluster(keras.Sequential([keras.layers.Input((28, 28, 1)), small_cnn()]), 8)
    with pytest.raises(ValueError, match=r"strip expects the tf_keras model .* Received: model=str"):
        strip("model.h5")


class _Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.scale = self.add_weight("scale", shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


def test_layers_tfmot_cannot_cluster_are_skipped_by_default_or_named():
    model = keras.Sequential([keras.layers.Input((8, 8, 4)), keras.layers.DepthwiseConv2D(3, name="dw"),
                              keras.layers.Flatten(), keras.layers.Dense(4, name="out")])
    wrapped = cluster(model, 8)  # tfmot never clusters depthwise kernels: left as they are
    assert [lyr.layer.name for lyr in wrapped.layers if isinstance(lyr, ClusterWeights)] == ["out"]
    with pytest.raises(ValueError, match=r"cannot cluster the weights of dw \(DepthwiseConv2D\).* layers="):
        cluster(model, 8, layers=["dw", "out"])
    custom = keras.Sequential(
        [keras.layers.Input((8,)), _Scale(name="scale"), keras.layers.Dense(4, name="out")])
    with pytest.raises(ValueError, match=r"weights of scale \(_Scale\).* Received: layers=None"):
        cluster(custom, 8)
    wrapped = cluster(custom, 8, layers=["out"])
    assert [lyr.layer.name for lyr in wrapped.layers if isinstance(lyr, ClusterWeights)] == ["out"]
