"""Conversion in every mode, on a real CNN trained on MNIST: dtypes, ops, determinism, refusals."""

from __future__ import annotations

import numpy as np
import pytest

from tfcompress.core._keras import keras, tf
from tfcompress.conversion.convert import IO_DTYPES, ConvertConfig, Mode, convert
from tfcompress.core.errors import NotFullyQuantizedError
from tfcompress.core.model_io import load_model
from tfcompress.core.tflite_model import read_tflite, weight_tensors

def _dtypes(parsed, indices):
    return {parsed.tensors[i].dtype for i in indices}


def _inner_dtypes(parsed):
    io = set(parsed.inputs) | set(parsed.outputs)
    return {t.dtype for t in parsed.tensors if t.index not in io}


@pytest.mark.parametrize(
    "mode, io_dtype, inner",
    [
        ("int8", None, {"int8", "int32"}),
        ("int8", "int8", {"int8", "int32"}),
        ("int8", "float32", {"int8", "int32"}),
        ("int16x8", None, {"int16", "int8", "int64", "int32"}),
        ("int16x8", "float32", {"int16", "int8", "int64", "int32"}),
    ],
)
def test_integer_modes_are_integer_only(saved_model_dir, calibration_samples, mode, io_dtype, inner):
    config = ConvertConfig(mode, io_dtype)
    parsed = read_tflite(convert(load_model(saved_model_dir), config, calibration_samples))
    expected_io = config.io_dtype
    assert _dtypes(parsed, parsed.inputs) == {expected_io}
    assert _dtypes(parsed, parsed.outputs) == {expected_io}
    assert _inner_dtypes(parsed) <= inner
    assert not parsed.float_ops(allow_float_io=expected_io == "float32")
    assert {"CONV_2D", "FULLY_CONNECTED", "MAX_POOL_2D"} <= set(parsed.op_names)
    for _, weights, bias in weight_tensors(parsed):
        assert weights.dtype == "int8"
        assert bias.dtype == ("int32" if mode == "int8" else "int64")


def test_int8_default_is_uint8_io_with_quantize_at_both_ends(saved_model_dir, calibration_samples):
    assert ConvertConfig().io_dtype == "uint8"
    parsed = read_tflite(convert(load_model(saved_model_dir), ConvertConfig(), calibration_samples))
    assert parsed.op_names[0] == "QUANTIZE" and parsed.op_names[-1] == "QUANTIZE"
    (inp,) = [parsed.tensors[i] for i in parsed.inputs]
    # Calibration spans [0, 1], so uint8 pixels map onto the input without loss.
    assert inp.scale == pytest.approx((1 / 255,), rel=1e-6) and inp.zero_point == (0,)


def test_float_modes(saved_model_dir):
    model = load_model(saved_model_dir)
    float32 = read_tflite(convert(model, ConvertConfig("float32")))
    float16 = read_tflite(convert(model, ConvertConfig("float16")))
    dynamic = read_tflite(convert(model, ConvertConfig("dynamic")))
    for parsed in (float32, float16, dynamic):
        assert _dtypes(parsed, parsed.inputs) == {"float32"}
    assert all(w.dtype == "float32" for _, w, _ in weight_tensors(float32))
    assert any(t.dtype == "float16" for t in float16.tensors)
    # Dynamic range quantization leaves tiny kernels (under 1,024 weights, like the 3x3x8 conv) in float.
    big = [w for _, w, _ in weight_tensors(dynamic) if np.prod(w.shape) >= 1024]
    assert big and all(w.dtype == "int8" for w in big)
    # Weights dominate the file: float16 about halves it, int8 weights about quarter it.
    assert float16.num_bytes < 0.6 * float32.num_bytes
    assert dynamic.num_bytes < 0.35 * float32.num_bytes


@pytest.mark.parametrize("source", ["saved_model_dir", "keras_file", "h5_file", "trained_model"])
def test_every_model_source_converts_to_int8(request, calibration_samples, source):
    model = load_model(request.getfixturevalue(source))
    assert model.input_shape == (None, 28, 28, 1)
    parsed = read_tflite(convert(model, ConvertConfig(), calibration_samples))
    assert _inner_dtypes(parsed) <= {"int8", "int32"}


def test_same_inputs_give_same_bytes(saved_model_dir, calibration_samples):
    model = load_model(saved_model_dir)
    first = convert(model, ConvertConfig(), calibration_samples)
    second = convert(load_model(saved_model_dir), ConvertConfig(), calibration_samples.copy())
    assert first == second


def _with_layer(layer):
    return keras.Sequential([
        keras.layers.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10), layer,
    ])


def test_op_without_int8_kernel_is_named(calibration_samples):
    model = load_model(_with_layer(keras.layers.Lambda(tf.sin)))
    with pytest.raises(NotFullyQuantizedError, match=r"int8 conversion left 1 op\(s\) in float: SIN") as e:
        convert(model, ConvertConfig(), calibration_samples)
    assert e.value.ops == ["SIN"]


def test_op_needing_tf_select_is_named(calibration_samples):
    model = load_model(_with_layer(keras.layers.Lambda(tf.math.erf)))
    with pytest.raises(NotFullyQuantizedError, match=r"no TFLite builtin kernel: Erf\. .*TF Select"):
        convert(model, ConvertConfig(), calibration_samples)


def test_int8_without_calibration_is_refused(saved_model_dir):
    with pytest.raises(ValueError, match=r"int8 mode needs calibration samples .*calibration_samples=None"):
        convert(load_model(saved_model_dir), ConvertConfig())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "int4"}, r"Unknown conversion mode.*mode='int4'"),
        ({"mode": "float16", "io_dtype": "uint8"}, r"not available in float16 mode.*io_dtype='uint8'"),
        ({"mode": "int8", "io_dtype": "int16"}, r"not available in int8 mode"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConvertConfig(**kwargs)


def test_qat_model_converts_with_and_without_calibration(mnist_subset, calibration_samples):
    import tensorflow_model_optimization as tfmot

    from conftest import small_cnn

    x_train, y_train, _, _ = mnist_subset
    qat = tfmot.quantization.keras.quantize_model(small_cnn())
    qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x_train[:2000], y_train[:2000], epochs=1, batch_size=64, verbose=0)
    model = load_model(qat)
    assert model.is_quantization_aware
    for samples in (None, calibration_samples):
        parsed = read_tflite(convert(model, ConvertConfig(), samples))
        assert _dtypes(parsed, parsed.inputs) == {"uint8"}
        assert _inner_dtypes(parsed) <= {"int8", "int32"}


def test_mode_values_are_the_documented_strings():
    assert [m.value for m in Mode] == ["int8", "int16x8", "dynamic", "float16", "float32"]
    assert IO_DTYPES[Mode.INT8][0] == "uint8"
