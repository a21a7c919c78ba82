"""Verification in the LiteRT interpreter: every check runs, failures are listed together."""

from __future__ import annotations

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from conftest import small_cnn
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.core.errors import ModelLoadError, VerificationError
from tfcompress.core.model_io import load_model
from tfcompress.core.tflite_model import read_tflite
from tfcompress.conversion.verify import quantize, run_tflite, verify


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
    ({"eval_samples": np.zeros((2, 28, 28, 1), np.float32)}, r"eval_samples and eval_labels go together"),
    ({"eval_samples": np.zeros((2, 28, 28, 1), np.float32), "eval_labels": np.zeros(3)},
     r"differ in length\. Received: 2 samples, 3 labels"),
])
def test_bad_arguments(int8_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        verify(int8_model, "int8", "uint8", **kwargs)
