"""Verification in the LiteRT interpreter: every check runs, failures are listed together."""

from __future__ import annotations

import re

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter

from conftest import small_cnn
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.core._keras import keras
from tfcompress.core.errors import CalibrationDataError, InterpreterRunError, ModelLoadError, VerificationError
from tfcompress.core.model_io import load_model
from tfcompress.core.tflite_model import read_tflite
from tfcompress.conversion.verify import quantize, run_litert, run_tflite, verify
from tfcompress.models import zoo_data


@pytest.fixture(scope="module")
def int8_model(saved_model_dir, calibration_samples):
    return convert(load_model(saved_model_dir), ConvertConfig(), calibration_samples)


@pytest.fixture(scope="module")
def float32_model(saved_model_dir):
    return convert(load_model(saved_model_dir), ConvertConfig("float32"))


def test_int8_model_passes_with_accuracy_close_to_float(int8_model, saved_model_dir, mnist_subset):
    _, _, x_test, y_test = mnist_subset
    result = verify(int8_model, "int8", "uint8", float_model=load_model(saved_model_dir),
                    eval_samples=x_test, eval_labels=y_test, max_accuracy_drop=0.01)
    assert result.passed, result.failures
    assert [c.name for c in result.checks] == [
        "input_dtype", "output_dtype", "integer_only", "weight_dtypes", "builtin_ops_only", "accuracy_drop"]
    acc = result.accuracy
    assert acc.num_samples == 1000
    assert 0.85 <= acc.float_accuracy <= 1.0  # a 2-epoch CNN on 8,000 images: about 0.9
    assert abs(acc.accuracy_drop) <= 0.01  # tolerance: 10 of 1,000 images
    assert acc.top1_agreement >= 0.98
    assert result.ops["CONV_2D"] == 1 and result.ops["FULLY_CONNECTED"] == 2
    assert result.inputs[0]["dtype"] == "uint8" and result.outputs[0]["dtype"] == "uint8"


def test_float32_model_matches_keras_outputs(float32_model, trained_model, mnist_subset):
    _, _, x_test, _ = mnist_subset
    np.testing.assert_allclose(run_tflite(float32_model, x_test), trained_model.predict(x_test, verbose=0),
                               atol=1e-4)


def test_every_failed_check_is_listed_at_once(float32_model):
    with pytest.raises(VerificationError) as e:
        verify(float32_model, "int8", "uint8")
    names = [f.split(":")[0] for f in e.value.failures]
    assert names == ["input_dtype", "output_dtype", "integer_only", "weight_dtypes"]
    assert "expected uint8, found float32" in e.value.failures[0]
    assert str(e.value).startswith("4 verification check(s) failed")


def test_accuracy_gate_fails_a_model_worse_than_float(saved_model_dir, calibration_samples, mnist_subset):
    _, _, x_test, y_test = mnist_subset
    untrained = convert(load_model(small_cnn(seed=1)), ConvertConfig(), calibration_samples)
    with pytest.raises(VerificationError, match=r"accuracy_drop: float 0\.[89]\d+, tflite 0\.\d+, drop 0\.\d+ "
                                               r"\(limit 0\.0050\) on 1000 samples"):
        verify(untrained, "int8", "uint8", float_model=load_model(saved_model_dir),
               eval_samples=x_test, eval_labels=y_test, max_accuracy_drop=0.005)


def test_batched_evaluation_equals_one_sample_loop(int8_model, mnist_subset):
    _, _, x_test, _ = mnist_subset
    samples = x_test[:64]
    batched = run_tflite(int8_model, samples, batch_size=25)  # uneven last batch on purpose
    interpreter = Interpreter(model_content=int8_model)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    looped = []
    for sample in samples:
        interpreter.set_tensor(inp["index"], quantize(sample[None], inp))
        interpreter.invoke()
        looped.append(interpreter.get_tensor(out["index"]))
    scale, zero_point = out["quantization"]
    np.testing.assert_array_equal(batched, (np.concatenate(looped).astype(np.float32) - zero_point) * scale)


def test_read_tflite_reports_io_and_size(int8_model, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(int8_model)
    parsed = read_tflite(path)
    assert parsed.num_bytes == len(int8_model) == path.stat().st_size
    assert parsed.op_counts()["QUANTIZE"] == 2


@pytest.mark.parametrize("content, message", [
    (None, r"TFLite model not found: .*missing\.tflite\. Pass the path of an existing \.tflite file"),
    (b"not a flatbuffer at all", r"is not a TFLite flatbuffer \(no 'TFL3' identifier\)"),
])
def test_bad_tflite_files(tmp_path, content, message):
    path = tmp_path / "missing.tflite"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        read_tflite(path)


def test_truncated_flatbuffer_is_reported_as_corrupt(int8_model, tmp_path):
    path = tmp_path / "cut.tflite"
    path.write_bytes(int8_model[:200])
    with pytest.raises(ModelLoadError, match=r"corrupt TFLite flatbuffer"):
        read_tflite(path)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_accuracy_drop": 1.5}, r"fraction in \[0, 1\].*max_accuracy_drop=1\.5"),
    ({"eval_labels": np.zeros(2)}, r"eval_labels need their eval_samples"),
    ({"eval_samples": np.zeros((2, 28, 28, 1), np.float32), "eval_labels": np.zeros(3)},
     r"differ in length\. Received: 2 samples, 3 labels"),
])
def test_bad_arguments(int8_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        verify(int8_model, "int8", "uint8", **kwargs)


# ---------------------------------------------------------------------------------------------------
# Fidelity: every output compared with the float model, with or without labels


def test_without_labels_every_output_is_gated_on_fidelity(int8_model, saved_model_dir, mnist_subset):
    _, _, x_test, y_test = mnist_subset
    result = verify(int8_model, "int8", "uint8", float_model=load_model(saved_model_dir), eval_samples=x_test,
                    samples_source="test images")
    assert result.passed and result.accuracy is None
    assert result.checks[-1].name == "fidelity" and "SQNR >= 15.0 dB on 1000 samples" in result.checks[-1].detail
    (out,) = result.fidelity.outputs
    assert result.fidelity.num_samples == 1000 and result.fidelity.source == "test images"
    # The small CNN ends in logits: no probability rows, so no top-1 gate without labels, SQNR only.
    assert out.classifier is False and out.top1_agreement is None
    assert 20.0 <= out.sqnr_db < 60.0 and 0 < out.mean_abs_error < out.max_abs_error
    labelled = verify(int8_model, "int8", "uint8", float_model=load_model(saved_model_dir), eval_samples=x_test,
                      eval_labels=y_test)
    (same,) = labelled.fidelity.outputs
    assert same.classifier and same.top1_agreement == labelled.accuracy.top1_agreement
    assert same.sqnr_db == out.sqnr_db
    with pytest.raises(VerificationError, match=r"fidelity_output_sqnr: output '\w+': \d+\.\d dB < 90\.0 dB on "
                                                r"1000 samples \(evaluation data\)"):
        verify(int8_model, "int8", "uint8", float_model=load_model(saved_model_dir), eval_samples=x_test,
               min_output_sqnr_db=90.0)


def _convert_keras(model, samples):
    return convert(load_model(model), ConvertConfig(), samples)


def test_labels_shaped_for_another_task_are_refused(int8_model, saved_model_dir, mnist_subset, calibration_samples):
    _, _, x_test, y_test = mnist_subset
    float_model = load_model(saved_model_dir)
    with pytest.raises(CalibrationDataError, match=r"hold class indices from 0 to 12, outside the 10 classes of "
                                                   r"output '\w+' \(0 to 9\): pass this model's labels\."):
        verify(int8_model, "int8", "uint8", float_model=float_model, eval_samples=x_test[:50],
               eval_labels=np.arange(50) % 13)
    with pytest.raises(CalibrationDataError, match=r"have shape \(50,\), but output '\w+' gives \(10,\) per sample: "
                                                   r"pass class indices \(N,\) for a classifier output, or targets "
                                                   r"shaped like the output \(50, 10\) for a regression\."):
        verify(int8_model, "int8", "uint8", float_model=float_model, eval_samples=x_test[:50],
               eval_labels=np.linspace(0, 1, 50))
    with pytest.raises(ValueError, match=r"needs at least 10 held-out samples\. Received: 5 \(evaluation data\)"):
        verify(int8_model, "int8", "uint8", float_model=float_model, eval_samples=x_test[:5])
    # A regression head (one value per sample) given class labels.
    keras.utils.set_random_seed(0)
    regression = keras.Sequential([keras.layers.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(1)])
    flatbuffer = _convert_keras(regression, calibration_samples)
    with pytest.raises(CalibrationDataError, match=r"are class indices, but output '\w+' gives \(1,\) per sample, "
                                                   r"not one score per class: for a regression output pass targets "
                                                   r"shaped like the output\."):
        verify(flatbuffer, "int8", "uint8", float_model=load_model(regression), eval_samples=x_test[:50],
               eval_labels=y_test[:50])
    # Regression targets shaped like the output: their error is reported, fidelity gates the output.
    targets = regression.predict(x_test[:50], verbose=0) + 0.1
    result = verify(flatbuffer, "int8", "uint8", float_model=load_model(regression), eval_samples=x_test[:50],
                    eval_labels=targets)
    assert result.accuracy is None and result.target_error["float_mse"] == pytest.approx(0.01, rel=1e-3)
    assert result.target_error["tflite_mse"] > 0 and result.checks[-1].name == "fidelity"


def test_a_two_output_model_is_compared_output_by_output(mnist_subset, calibration_samples):
    x_train, y_train, x_test, y_test = mnist_subset
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1))
    trunk = keras.layers.Dense(32, activation="relu")(keras.layers.Flatten()(inputs))
    model = keras.Model(inputs, [keras.layers.Dense(10, activation="softmax", name="digit")(trunk),
                                 keras.layers.Dense(2, activation="softmax", name="parity")(trunk)])
    model.compile("adam", ["sparse_categorical_crossentropy"] * 2)
    model.fit(x_train[:2000], [y_train[:2000], y_train[:2000] % 2], epochs=1, verbose=0)
    flatbuffer = _convert_keras(model, calibration_samples)
    float_model = load_model(model)
    with pytest.raises(CalibrationDataError, match=r"The model has 2 outputs \(digit, parity\) and the labels "
                                                   r"evaluation data do not say which one they are for: pass "
                                                   r"--eval_output with one of those names\."):
        verify(flatbuffer, "int8", "uint8", float_model=float_model, eval_samples=x_test, eval_labels=y_test)
    result = verify(flatbuffer, "int8", "uint8", float_model=float_model, eval_samples=x_test, eval_labels=y_test,
                    eval_output="digit", max_accuracy_drop=0.02)
    assert result.passed, result.failures
    assert [o.name for o in result.fidelity.outputs] == ["digit", "parity"]
    digit, parity = result.fidelity.outputs
    float_digit, float_parity = model.predict(x_test, verbose=0)
    assert result.accuracy.float_accuracy == pytest.approx(np.mean(float_digit.argmax(1) == y_test))
    # The unlabelled head is gated on fidelity: softmax rows, so top-1 agreement too.
    assert parity.classifier and parity.top1_agreement >= 0.97 and parity.sqnr_db >= 15.0
    assert "output(s) parity within" in result.checks[-1].detail
    assert float_parity.shape == (1000, 2)
def test_xnnpack_failure_falls_back_to_builtin_kernels_and_says_so():
    # An unrolled LSTM's int8 model: LiteRT's XNNPACK delegate fails when it first runs ("failed to create
    # XNNPACK runtime"); LiteRT's builtin kernels without the delegate run it.
    keras.utils.set_random_seed(0)
    data = zoo_data.mnist_rows(num_train=100, num_test=50)
    inputs = keras.Input((28, 28))
    x = keras.layers.LSTM(16, unroll=True)(inputs)
    model = load_model(keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x)))
    flatbuffer = convert(model, ConvertConfig(), data.x_train)
    result = verify(flatbuffer, "int8", "uint8", float_model=model, eval_samples=data.x_test,
                    eval_labels=data.y_test)
    assert result.passed and result.accuracy.num_samples == 50
    (note,) = result.notes
    assert re.fullmatch(r"LiteRT's XNNPACK delegate cannot run the model \(failed to create XNNPACK runtime.*"
                        r"failed to prepare\.\); it ran on LiteRT's builtin kernels without the delegate "
                        r"\(OpResolverType\.BUILTIN_WITHOUT_DEFAULT_DELEGATES\)", note), note
    parsed = read_tflite(flatbuffer)
    tensor = parsed.tensors[parsed.inputs[0]]
    quantized = quantize(data.x_test, {"dtype": np.uint8, "quantization": (tensor.scale[0], tensor.zero_point[0])})
    builtin = run_litert(parsed, quantized)
    assert builtin.kernels == "builtin" and builtin.note == note
    reference = run_litert(parsed, quantized, reference_kernels=True)
    # The builtin kernels are LiteRT's optimized ones without XNNPACK: within a few steps of the reference.
    assert np.abs(builtin.outputs[0].astype(int) - reference.outputs[0].astype(int)).max() <= 3


def _with_reshape_to(data: bytes, shape: list[int]) -> bytes:
    """The model with its RESHAPE's shape tensor rewritten (a model LiteRT then cannot allocate)."""
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    graph = model.subgraphs[0]
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.RESHAPE:
            buffer = model.buffers[graph.tensors[op.inputs[1]].buffer]
            buffer.data = list(np.asarray(shape, np.int32).tobytes())
            graph.tensors[op.inputs[1]].shape = [len(shape)]
    builder = flatbuffers.Builder(len(data))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_a_model_litert_cannot_run_is_a_failed_check_not_a_crash(int8_model, saved_model_dir, mnist_subset):
    _, _, x_test, y_test = mnist_subset
    broken = _with_reshape_to(int8_model, [-1, 7])  # 13 * 13 * 8 values per sample do not split into rows of 7
    result = verify(broken, "int8", "uint8", float_model=load_model(saved_model_dir), eval_samples=x_test[:20],
                    eval_labels=y_test[:20], raise_on_failure=False)
    assert not result.passed and result.accuracy is None
    (failure,) = result.failures
    assert re.fullmatch(r"litert_runtime: LiteRT cannot run the model with its builtin kernels \(.+\), nor with "
                        r"its XNNPACK delegate \(.+\)\. The converter wrote a model its own runtime rejects: run "
                        r"`tfcompress inspect` on it to find the op named, and change that layer", failure), failure
    with pytest.raises(InterpreterRunError, match=r"^1 verification check\(s\) failed: litert_runtime: LiteRT's "
                                                  r"reference kernels cannot run the model \("):
        run_litert(broken, quantize(x_test[:2], {"dtype": np.uint8, "quantization": (1 / 255, 0)}),
                   reference_kernels=True)


def test_a_binary_sigmoid_classifier_is_scored_at_the_midpoint(mnist_subset, calibration_samples):
    x_train, y_train, x_test, y_test = mnist_subset
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1, activation="sigmoid")])
    model.compile("adam", "binary_crossentropy")
    model.fit(x_train[:2000], (y_train[:2000] % 2)[:, None], epochs=2, verbose=0)
    flatbuffer = _convert_keras(model, calibration_samples)
    odd = y_test % 2
    result = verify(flatbuffer, "int8", "uint8", float_model=load_model(model), eval_samples=x_test,
                    eval_labels=odd, max_accuracy_drop=0.02)
    expected = np.mean((model.predict(x_test, verbose=0)[:, 0] > 0.5) == odd)
    assert result.passed, result.failures
    assert result.accuracy.float_accuracy == pytest.approx(expected) and expected > 0.8
    (out,) = result.fidelity.outputs
    assert out.classifier and out.top1_agreement == result.accuracy.top1_agreement >= 0.95
