"""Quantization-aware training on real MNIST: QAT and PQAT models convert to verified full-int8."""

from __future__ import annotations

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from conftest import small_cnn
from tfcompress.core._keras import keras, tf
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.core.errors import NotFullyQuantizedError
from tfcompress.core.model_io import load_model
from tfcompress.training.quantize import quantize_aware, unsupported_layers
from tfcompress.core.tflite_model import read_tflite
from tfcompress.conversion.verify import verify


def _compile(model):
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    return model


@pytest.mark.parametrize("scheme", ["default", "prune_preserving"])
def test_qat_fine_tune_converts_to_verified_int8(trained_model, mnist_subset, scheme):
    x_train, y_train, x_test, y_test = mnist_subset
    before = [w.copy() for w in trained_model.get_weights()]
    qat = _compile(quantize_aware(trained_model, scheme=scheme))
    qat.fit(x_train[:2000], y_train[:2000], epochs=1, batch_size=64, verbose=0)
    for old, new in zip(before, trained_model.get_weights()):
        np.testing.assert_array_equal(old, new)  # the caller's model is untouched
    loaded = load_model(qat)
    assert loaded.is_quantization_aware
    flatbuffer = convert(loaded, ConvertConfig())  # QAT ranges: no calibration data needed
    result = verify(flatbuffer, "int8", "uint8", float_model=load_model(trained_model),
                    eval_samples=x_test, eval_labels=y_test, max_accuracy_drop=0.02)
    assert result.passed, result.failures


def test_prune_preserving_keeps_zeros(trained_model, mnist_subset):
    x_train, y_train, _, _ = mnist_subset
    sparse = keras.models.clone_model(trained_model)
    weights = trained_model.get_weights()
    kernel = weights[2]  # fc kernel
    weights[2] = np.where(np.abs(kernel) < np.quantile(np.abs(kernel), 0.5), 0.0, kernel).astype(np.float32)
    sparse.set_weights(weights)
    pqat = _compile(quantize_aware(sparse, scheme="prune_preserving"))
    pqat.fit(x_train[:1000], y_train[:1000], epochs=1, batch_size=64, verbose=0)
    flatbuffer = convert(load_model(pqat), ConvertConfig())
    parsed = read_tflite(flatbuffer)
    (fc,) = [t for t in parsed.tensors if t.is_constant and t.dtype == "int8" and t.shape == (32, 1352)]
    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    int8_kernel = interpreter.get_tensor(fc.index)
    # Symmetric int8 weights keep 0.0 at 0: the zeros survive PQAT into the flatbuffer.
    assert np.mean(int8_kernel == 0) >= 0.5


def _model_with(layer):
    return keras.Sequential([keras.layers.Input((28, 28, 1)), keras.layers.Flatten(name="flat"),
                             keras.layers.Dense(10, name="dense"), layer])


def test_unsupported_layers_are_named_with_the_fix():
    model = _model_with(keras.layers.LayerNormalization(name="norm"))
    assert unsupported_layers(model) == ["norm (LayerNormalization)"]
    with pytest.raises(ValueError, match=r"tfmot cannot quantize 1 layer\(s\) of model .*: norm "
                                         r"\(LayerNormalization\)\. .*leave_float=\['norm'\]"):
        quantize_aware(model)


def test_leave_float_keeps_the_layer_and_int8_conversion_refuses(calibration_samples):
    model = _model_with(keras.layers.Lambda(lambda t: tf.sin(t), name="sine"))
    qat = quantize_aware(model, leave_float=["sine"])
    with pytest.raises(NotFullyQuantizedError, match=r"SIN"):
        convert(load_model(qat), ConvertConfig(), calibration_samples)


def test_already_quantized_and_subclassed_and_nested_are_refused(trained_model):
    qat = quantize_aware(trained_model)
    with pytest.raises(ValueError, match=r"already quantization-aware"):
        quantize_aware(qat)

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match=r"is a subclassed model.*Received: model=Sub"):
        quantize_aware(Sub())
    inner = small_cnn()
    outer = keras.Sequential([keras.layers.Input((28, 28, 1)), inner])
    with pytest.raises(ValueError, match=r"nests model\(s\) \['small_cnn'\]"):
        quantize_aware(outer)


def test_bad_scheme_and_unknown_leave_float(trained_model):
    with pytest.raises(ValueError, match=r"Unknown QAT scheme.*scheme='int4'"):
        quantize_aware(trained_model, scheme="int4")
    with pytest.raises(ValueError, match=r"not in model small_cnn: \['nope'\]"):
        quantize_aware(trained_model, leave_float=["nope"])
