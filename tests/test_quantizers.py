"""`tfcompress.core.quantizers`: the reference quantizers on real weights, and TFLite's int8 parameters reproduced.

The unit tests quantize the kernels of the session-trained MNIST CNN (conftest). The reference test converts
models with `tfcompress.convert(ConvertConfig("int8"))` on the repo's calibration samples and recomputes every
quantization parameter of the `.tflite` from two inputs: the calibration ranges, and the float weights after
the converter's batch-normalization folding. Both come from the converter's calibration-only output
(`converter._experimental_calibrate_only = True`): a float flatbuffer whose activation tensors carry the
calibrated min/max in their quantization parameters and whose constants are the folded float weights the
quantizer then quantizes (the same ops in the same order as the int8 model minus its QUANTIZE ops, so tensors
pair up by position). Any tensor not reproduced fails the test, with every mismatch listed.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CALIBRATION, SCALE
from tfcompress.conversion import calibration
from tfcompress.conversion.convert import ConvertConfig, convert_and_read
from tfcompress.core import quantizers as qz
from tfcompress.core._keras import keras, tf
from tfcompress.core.model_io import load_model
from tfcompress.core.tflite_model import TfliteModel, read_tflite

# Ops whose output parameters TFLite does not derive from their own calibrated range.
FIXED_OUTPUT = {"SOFTMAX": (1 / 256, -128), "LOGISTIC": (1 / 256, -128), "TANH": (1 / 128, 0)}  # fixed range
SAME_AS_INPUT = {"MAX_POOL_2D", "RESHAPE", "SQUEEZE", "AVERAGE_POOL_2D"}  # SameOperandsAndResultsScale ops
WEIGHTED = {"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"}


@pytest.fixture(scope="module")
def kernels(trained_model) -> dict[str, np.ndarray]:
    return {layer.name: layer.get_weights()[0] for layer in trained_model.layers if layer.get_weights()}


def test_rounding_is_half_away_from_zero():
    assert qz.round_half_away_from_zero(np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])).tolist() == [
        -3, -2, -1, 1, 2, 3]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_levels_and_round_trip(kernels, bits):
    w = kernels["fc"]
    q = qz.linear(w, bits, symmetric=True, axis=-1)
    top = 2 ** (bits - 1) - 1
    assert q.scheme == "symmetric" and q.narrow_range and q.scale.shape == (32,)
    assert q.q.min() >= -top and q.q.max() <= top and np.all(q.zero_point == 0)
    assert np.all(np.abs(q.q).max(axis=0) == top)  # every channel's largest weight hits the top integer
    for c in range(w.shape[-1]):
        assert len(np.unique(q.q[:, c])) <= 2 * top + 1
    assert np.all(np.abs(q.dequantize() - w) <= q.scale / 2 + 1e-12)
    # Values already on the grid come back exactly.
    again = qz.linear(q.dequantize(), bits, symmetric=True, axis=-1)
    np.testing.assert_array_equal(again.q, q.q)
    assert len(np.unique(qz.int_n(w[:, :1], bits, axis=-1))) <= 2 * top + 1


def test_asymmetric_textbook_and_signed(kernels):
    w = kernels["conv"]
    q = qz.linear(w, 8, axis=-1)
    assert q.q.min() == 0 and q.q.max() == 255 and q.scheme == "asymmetric"
    assert np.all(np.abs(q.dequantize() - w) <= q.scale / 2 + 1e-12)
    np.testing.assert_allclose(q.dequantize().min(axis=(0, 1, 2)), w.min(axis=(0, 1, 2)), atol=1e-12)
    s = qz.linear(w, 8, axis=-1, signed=True)
    assert s.q.min() >= -128 and s.q.max() <= 127 and s.zero_point.dtype == np.int64
    assert np.all(s.dequantize()[w == 0] == 0)
    assert np.all(np.abs(s.dequantize() - w) <= s.scale / 2 + 1e-9)
    t = qz.linear(w, 8)  # one range for the whole tensor
    assert t.scale.shape == (1,) and q.scale.shape == (8,)


def test_constant_channels_dequantize_exactly():
    x = np.zeros((3, 3, 1, 4))
    x[..., 1] = 0.25
    x[..., 2] = -3.0
    for q in (qz.linear(x, 8, axis=-1), qz.linear(x, 4, symmetric=True, axis=-1),
              qz.linear(x, 8, axis=-1, signed=True)):
        assert np.all(np.isfinite(q.scale)) and np.all(q.scale > 0)
        np.testing.assert_array_equal(q.dequantize(), x)
    assert qz.linear(np.full(5, 7.0), 8).scale.tolist() == [1.0]
    np.testing.assert_array_equal(qz.logarithmic(x, axis=-1)[..., 0], 0)
    np.testing.assert_array_equal(qz.ternary(x, axis=-1)[..., 0], 0)


def test_logarithmic_powers_of_two(kernels):
    w = kernels["fc"]
    p = qz.logarithmic(w, exponents=4, axis=-1)
    for c in range(w.shape[-1]):
        values = np.unique(p[:, c])
        assert len(values) <= 9
        nonzero = np.abs(values[values != 0])
        np.testing.assert_array_equal(np.log2(nonzero), np.round(np.log2(nonzero)))
        e_max = qz.round_half_away_from_zero(np.log2(np.abs(w[:, c]).max()))
        assert np.log2(nonzero).max() == e_max and np.log2(nonzero).min() >= e_max - 3
    assert np.all(np.sign(p[p != 0]) == np.sign(w[p != 0]))
    np.testing.assert_array_equal(qz.logarithmic(np.array([-8.0, 4.0, 1.0, 0.4, 0.0]), 2), [-8, 4, 0, 0, 0])


def test_ternary_and_binary(kernels):
    w = kernels["fc"]
    t = qz.ternary(w, axis=-1)
    b = qz.binary(w, axis=-1)
    for c in range(w.shape[-1]):
        col = np.abs(w[:, c].astype(np.float64))
        kept = col > 0.7 * col.mean()
        np.testing.assert_allclose(np.unique(np.abs(t[:, c])), [0, col[kept].mean()])
        np.testing.assert_allclose(np.unique(b[:, c]), [-col.mean(), col.mean()])
    assert np.all(b[w >= 0] > 0)
    np.testing.assert_array_equal(qz.binary(np.array([0.0, -2.0])), [1.0, -1.0])


def test_error_metrics(kernels):
    w = kernels["fc"].astype(np.float64)
    assert qz.sqnr_db(w, w) == float("inf") and qz.mse(w, w) == 0 and qz.max_error(w, w) == 0
    y = w + 0.1 * w
    assert qz.sqnr_db(w, y) == pytest.approx(20.0)
    assert qz.mse(np.zeros(4), np.full(4, 2.0)) == 4.0 and qz.max_error([1, 2], [1, -1]) == 3.0
    assert qz.sqnr_db(np.zeros(3), np.ones(3)) == float("-inf")
    # About 6 dB per bit for the linear quantizer.
    gains = [qz.sqnr_db(w, qz.int_n(w, b, -1)) - qz.sqnr_db(w, qz.int_n(w, b - 1, -1)) for b in (6, 7, 8)]
    assert all(4.5 < g < 7.5 for g in gains)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"bits must be an integer from 2 to 16 .* Received: bits=1"):
        qz.linear(np.ones(3), 1)
    with pytest.raises(ValueError, match=r"Received: bits=8.0"):
        qz.int_n(np.ones(3), 8.0)
    with pytest.raises(ValueError, match=r"exponents must be an integer from 1 to 7 .* Received: exponents=8"):
        qz.logarithmic(np.ones(3), exponents=8)
    with pytest.raises(ValueError, match=r"axis must be None .* Received: axis=2"):
        qz.ternary(np.ones((2, 2)), axis=2)
    with pytest.raises(ValueError, match=r"Received: symmetric=True, signed=True"):
        qz.linear(np.ones(3), 8, symmetric=True, signed=True)


def test_tflite_params_textbook_cases():
    assert qz.tflite_activation_params(0.0, 1.0) == (float(np.float32(1.0) / np.float32(255)), -128)
    assert qz.tflite_activation_params(2.0, 3.0)[1] == -128  # range widened to include 0
    scale, zero_point = qz.tflite_activation_params(-1.0, 0.5)
    assert zero_point == 42 and scale == float(np.float32(1.5) / np.float32(255))
    assert qz.tflite_activation_params(0.0, 0.0) == (float(np.float32(1e-6) / np.float32(255)), 0)
    scales, zps = qz.tflite_weight_params(np.stack([np.full(4, 0.5), np.zeros(4)]), axis=0)
    assert scales.tolist() == [np.float32(0.5) / np.float32(127), np.float32(5e-7) / np.float32(127)]
    q, _ = qz.tflite_quantize_weights(np.stack([np.array([0.5, -0.25, 0.0, 1e-3]), np.zeros(4)]), axis=0)
    assert q.tolist() == [[127, -64, 0, 0], [0, 0, 0, 0]]


def _calibrated(model, samples) -> TfliteModel:
    converter = model.converter()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = calibration.representative_dataset(samples)
    converter._experimental_calibrate_only = True
    return read_tflite(converter.convert())


def _reproduce(model, samples) -> tuple[TfliteModel, int, list[str]]:
    """Every int8 model parameter recomputed; returns the model, how many tensors were checked, the mismatches."""
    q = convert_and_read(model, ConvertConfig("int8"), samples)
    c = _calibrated(model, samples)
    ranges = {}
    for i, t in enumerate(c.root.subgraphs[0].tensors):
        if t.quantization is not None and t.quantization.min is not None and len(t.quantization.min):
            ranges[i] = (float(t.quantization.min[0]), float(t.quantization.max[0]))
    core_ops = [o for o in q.operators if o.op != "QUANTIZE"]
    if [o.op for o in core_ops] != list(c.op_names):
        return q, 0, [f"op lists differ: {[o.op for o in core_ops]} vs {list(c.op_names)}"]
    pair = {}
    for oq, oc in zip(core_ops, c.operators):
        pair.update(zip(oq.inputs + oq.outputs, oc.inputs + oc.outputs))
    expected: dict[int, tuple[float, int]] = {}

    def activation(i: int) -> tuple[float, int]:
        if i in expected:
            return expected[i]
        producer = next((o for o in q.operators if i in o.outputs), None)
        if producer is None:  # a uint8 model input: its QUANTIZE's int8 params, zero point shifted by 128
            quantize = next(o for o in q.operators if o.op == "QUANTIZE" and o.inputs[0] == i)
            scale, zp = activation(quantize.outputs[0])
            result = (scale, zp + 128 if q.tensors[i].dtype == "uint8" else zp)
        elif producer.op == "QUANTIZE" and q.tensors[producer.inputs[0]].dtype == "int8":
            scale, zp = activation(producer.inputs[0])  # the uint8 output: int8 params, zero point + 128
            result = (scale, zp + 128)
        elif producer.op == "QUANTIZE":  # the input's own calibrated range
            result = qz.tflite_activation_params(*ranges[c.inputs[q.inputs.index(producer.inputs[0])]])
        elif producer.op in FIXED_OUTPUT:
            result = FIXED_OUTPUT[producer.op]
        elif producer.op in SAME_AS_INPUT:
            result = activation(producer.inputs[0])
        else:  # CONV_2D, FULLY_CONNECTED, ADD, MEAN, ...: the output's calibrated range
            result = qz.tflite_activation_params(*ranges[pair[i]])
        expected[i] = result
        return result

    mismatches, checked = [], 0
    for t in q.tensors:
        if t.is_constant or t.dtype not in ("int8", "uint8"):
            continue
        scale, zp = activation(t.index)
        checked += 1
        if np.float32(scale) != np.float32(t.scale[0]) or zp != t.zero_point[0]:
            mismatches.append(f"{t.name}: scale {t.scale[0]!r} zero point {t.zero_point[0]}, "
                              f"expected {scale!r}, {zp}")
    for op in q.operators:
        if op.op not in WEIGHTED:
            continue
        w = q.tensors[op.inputs[1]]
        values, scales = qz.tflite_quantize_weights(c.constants[pair[w.index]], w.quantized_dimension)
        checked += 1
        if not np.array_equal(np.float32(w.scale), scales):
            mismatches.append(f"{w.name}: weight scales {w.scale} expected {scales.tolist()}")
        if any(w.zero_point):
            mismatches.append(f"{w.name}: weight zero points {w.zero_point} expected 0")
        if (differ := int(np.sum(values != q.constants[w.index]))):
            mismatches.append(f"{w.name}: {differ} int8 weights differ")
        if len(op.inputs) > 2 and op.inputs[2] >= 0:
            b = q.tensors[op.inputs[2]]
            checked += 1
            bias_scales = qz.tflite_bias_scales(activation(op.inputs[0])[0], scales)
            if not np.array_equal(np.float32(b.scale), bias_scales) or any(b.zero_point):
                mismatches.append(f"{b.name}: bias scales {b.scale} expected {bias_scales.tolist()}")
    return q, checked, mismatches


def test_reproduces_every_parameter_of_the_int8_cnn(trained_model):
    with np.load(CALIBRATION) as d:
        samples = d["x"][:200].astype(np.float32) * SCALE  # as the demo: the repo's samples, scaled to [0, 1]
    q, checked, mismatches = _reproduce(load_model(trained_model), samples)
    assert not mismatches, "\n".join(mismatches)
    # 8 activations (uint8 input and output, the input QUANTIZE, conv, pool, reshape, fc, logits), 3 weights, 3 biases.
    assert checked == len([t for t in q.tensors if t.dtype in ("int8", "uint8")]) + 3 == 14


@pytest.mark.slow
@pytest.mark.parametrize("name, ops", [("ds_cnn", {"DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "SOFTMAX"}),
                                       ("resnet8", {"ADD", "MEAN", "SOFTMAX"})])
def test_reproduces_every_parameter_of_zoo_models(trained, name, ops):
    entry = trained(name)  # batch normalization folded into the convolutions; residual adds; depthwise convs
    with np.load(entry.files.calibration_data) as d:
        samples = d["x"][:200]
    q, checked, mismatches = _reproduce(load_model(entry.files.keras_model), samples)
    assert not mismatches, "\n".join(mismatches)
    assert ops <= set(q.op_names) and checked > 20


def test_reproduces_every_parameter_of_the_demo_lenet5(mnist_subset):
    """The demo's own architecture (LeNet-5 of `tfcompress.models.baseline`), trained briefly on real MNIST."""
    from tfcompress.models import baseline

    x_train, y_train, _, _ = mnist_subset
    keras.utils.set_random_seed(0)
    model = baseline.compile_classifier(baseline.lenet5())
    model.fit(x_train, y_train, epochs=1, batch_size=128, verbose=0)
    with np.load(CALIBRATION) as d:
        samples = d["x"][:200].astype(np.float32) * SCALE
    q, checked, mismatches = _reproduce(load_model(model), samples)
    assert not mismatches, "\n".join(mismatches)
    # 4 weights and 4 biases, and every int8/uint8 activation
    assert checked == len([t for t in q.tensors if t.dtype in ("int8", "uint8")]) + 4
