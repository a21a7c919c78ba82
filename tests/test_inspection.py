"""`tfcompress.analysis.inspection` and `pipelines/inspect_model.py`: every number against an independent source.

Sizes and hashes come from the file system and hashlib, tensors and weights from the LiteRT interpreter,
MACs from a hand count. The script runs in subprocesses (its absl flags would clash in this process).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from conftest import CALIBRATION, ROOT, SCALE, run_scripts
from tfcompress.models import baseline
from tfcompress.core._keras import keras
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.core.errors import ModelLoadError
from tfcompress.analysis.inspection import inspect_tflite, render_text, to_json
from tfcompress.core.model_io import load_model
from tfcompress.core.tflite_model import weight_sparsity

LENET_MACS = 24 * 24 * 20 * 25 + 8 * 8 * 50 * 25 * 20 + 800 * 500 + 500 * 10  # 2,293,000
SCRIPT = str(ROOT / "pipelines" / "inspect_model.py")


@pytest.fixture(scope="module")
def lenet_path(tmp_path_factory) -> str:
    """Int8 LeNet-5 with random weights, 60% of fc1's weights and the first conv filter set to zero."""
    keras.utils.set_random_seed(0)
    model = baseline.lenet5()
    fc1_kernel, fc1_bias = model.get_layer("fc1").get_weights()
    fc1_kernel[np.random.default_rng(0).random(fc1_kernel.shape) < 0.6] = 0.0
    model.get_layer("fc1").set_weights([fc1_kernel, fc1_bias + 0.1])  # a non-zero bias is stored
    conv1_kernel, conv1_bias = model.get_layer("conv1").get_weights()
    conv1_kernel[..., 0] = 0.0
    model.get_layer("conv1").set_weights([conv1_kernel, conv1_bias])
    with np.load(CALIBRATION) as d:
        samples = d["x"][:50].astype(np.float32) * SCALE
    path = tmp_path_factory.mktemp("inspect") / "lenet.tflite"
    path.write_bytes(convert(load_model(model), ConvertConfig(), samples))
    return str(path)


def _interpreter(path: str) -> Interpreter:
    interpreter = Interpreter(model_path=path)
    interpreter.allocate_tensors()
    return interpreter


def test_file_and_tensors_match_the_interpreter(lenet_path):
    found = inspect_tflite(lenet_path)
    assert found.source == lenet_path
    assert found.num_bytes == os.path.getsize(lenet_path)
    assert found.sha256 == hashlib.sha256(open(lenet_path, "rb").read()).hexdigest()
    assert found.num_subgraphs == 1
    assert dict(found.op_counts) == {"CONV_2D": 2, "FULLY_CONNECTED": 2, "MAX_POOL_2D": 2, "QUANTIZE": 2,
                                     "RESHAPE": 1}
    details = {d["index"]: d for d in _interpreter(lenet_path).get_tensor_details()}
    assert [t.index for t in found.tensors] == sorted(details)
    for t in found.tensors:
        d, q = details[t.index], details[t.index]["quantization_parameters"]
        assert (t.name, t.dtype, t.shape) == (d["name"], np.dtype(d["dtype"]).name, tuple(d["shape"]))
        assert np.allclose(t.scale, q["scales"]) and list(t.zero_point) == list(q["zero_points"])
        assert t.per_channel_count == (len(q["scales"]) if len(q["scales"]) > 1 else 0)
        if t.per_channel_count:
            assert t.quantized_dimension == q["quantized_dimension"]
    per_channel = {t.name: t.per_channel_count for t in found.tensors if t.per_channel_count}
    assert sorted(per_channel.values()) == [10, 20, 20, 50, 50, 500, 500]  # weights and biases per filter


def test_io_matches_the_interpreter(lenet_path):
    found = inspect_tflite(lenet_path)
    interpreter = _interpreter(lenet_path)
    for mine, theirs in ((found.inputs, interpreter.get_input_details()),
                         (found.outputs, interpreter.get_output_details())):
        assert len(mine) == len(theirs) == 1
        assert (mine[0].index, mine[0].dtype, mine[0].shape) == (
            theirs[0]["index"], "uint8", tuple(theirs[0]["shape"]))
        assert mine[0].scale[0] == pytest.approx(theirs[0]["quantization"][0])
        assert mine[0].zero_point[0] == theirs[0]["quantization"][1]


def test_weights_and_zero_fractions_match_the_interpreter(lenet_path):
    found = inspect_tflite(lenet_path)
    interpreter = _interpreter(lenet_path)
    ops = {op["index"]: op for op in interpreter._get_ops_details()}  # private, but there is no public op list
    weighted = [layer for layer in found.layers if layer.weight_zero_fraction is not None]
    assert [layer.op for layer in weighted] == ["CONV_2D", "CONV_2D", "FULLY_CONNECTED", "FULLY_CONNECTED"]
    sparsity = weight_sparsity(lenet_path)
    total = 0
    for layer in weighted:
        inputs = [i for i in ops[layer.index]["inputs"] if i >= 0]
        weights = interpreter.get_tensor(inputs[1])
        assert layer.weight_bytes == sum(interpreter.get_tensor(i).nbytes for i in inputs[1:])
        assert layer.weight_zero_fraction == pytest.approx(float(np.mean(weights == 0)))
        name = interpreter.get_tensor_details()[inputs[1]]["name"]
        assert layer.weight_zero_fraction == pytest.approx(sparsity[name])
        total += layer.weight_bytes
    conv1, _, fc1, _ = weighted
    assert conv1.weight_zero_fraction >= 1 / 20 and fc1.weight_zero_fraction == pytest.approx(0.6, abs=0.01)
    assert fc1.weight_bytes == 800 * 500 + 500 * 4  # int8 weights and the int32 bias that is now stored
    assert found.weight_bytes == total
    assert found.constant_bytes == sum(interpreter.get_tensor(t.index).nbytes
                                       for t in found.tensors if t.is_constant)
    assert all(layer.weight_bytes == 0 for layer in found.layers if layer not in weighted)


def test_float16_weights_behind_dequantize_are_counted():
    keras.utils.set_random_seed(0)
    flatbuffer = convert(load_model(baseline.lenet5()), ConvertConfig(mode="float16"))
    found = inspect_tflite(flatbuffer)
    interpreter = Interpreter(model_content=flatbuffer)
    interpreter.allocate_tensors()
    float16 = [d["index"] for d in interpreter.get_tensor_details() if d["dtype"] == np.float16]
    assert found.weight_bytes == sum(interpreter.get_tensor(i).nbytes for i in float16) > 2 * 430_000
    assert [layer.weight_zero_fraction is not None for layer in found.layers if layer.macs] == [True] * 4
    assert found.total_macs == LENET_MACS


def test_macs_per_layer_and_total(lenet_path):
    found = inspect_tflite(lenet_path)
    assert [layer.macs for layer in found.layers if layer.macs] == [288_000, 1_600_000, 400_000, 5_000]
    assert found.total_macs == LENET_MACS == 2_293_000
    assert found.total_other_ops == 12 * 12 * 20 * 4 + 4 * 4 * 50 * 4


def test_bytes_give_the_same_inspection_and_json_round_trips(lenet_path):
    from_path = inspect_tflite(lenet_path)
    from_bytes = inspect_tflite(open(lenet_path, "rb").read())
    assert from_bytes.source == "<bytes>"
    assert to_json(from_bytes) == {**to_json(from_path), "source": "<bytes>"}
    document = to_json(from_path)
    assert json.loads(json.dumps(document, allow_nan=False)) == document
    assert document["total_macs"] == LENET_MACS and document["inputs"][0]["dtype"] == "uint8"
    text = render_text(from_path)
    assert f"sha256 {from_path.sha256}" in text and "2,293,000 MACs" in text
    fc1 = next(layer for layer in from_path.layers if layer.macs == 800 * 500)
    assert "per-channel x500 (axis 0)" in text and f"{fc1.weight_zero_fraction:.1%}  {fc1.name}" in text


@pytest.mark.parametrize("content, message", [
    (None, r"TFLite model not found: .*missing\.tflite\. Pass the path of an existing \.tflite file\."),
    (b"plain text, not a model", r"is not a TFLite flatbuffer \(no 'TFL3' identifier\)\. Pass a \.tflite"),
    (b"\x10\x00\x00\x00TFL3\x00\x00",
     r"is a corrupt TFLite flatbuffer .*The file is corrupt or truncated: convert the model again\."),
])
def test_bad_files_are_one_line_model_load_errors(tmp_path, content, message):
    path = tmp_path / "missing.tflite"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message) as e:
        inspect_tflite(path)
    assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_script_prints_text_or_json_and_exits_0(lenet_path):
    # `tfcompress inspect model.tflite`: the path may be given bare.
    text, as_json, spaced = run_scripts(SCRIPT, [str(lenet_path)], [f"--tflite={lenet_path}", "--json"],
                                        ["--tflite", str(lenet_path)])
    assert spaced.returncode == 0 and spaced.stdout == text.stdout
    assert text.returncode == 0, text.stderr
    assert "2,293,000 MACs" in text.stdout and "FULLY_CONNECTED" in text.stdout
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == to_json(inspect_tflite(lenet_path))


def test_script_bad_input_exits_2_with_one_line(tmp_path):
    not_a_model = tmp_path / "notes.txt"
    not_a_model.write_text("hello")
    missing, wrong, no_flag = run_scripts(SCRIPT, [f"--tflite={tmp_path / 'nowhere.tflite'}"],
                                          [f"--tflite={not_a_model}"], [])
    assert missing.returncode == wrong.returncode == no_flag.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"inspect_model.py: error: TFLite model not found: {tmp_path / 'nowhere.tflite'}. Pass the path of "
        "an existing .tflite file."]
    assert wrong.stderr.strip().splitlines() == [
        f"inspect_model.py: error: {not_a_model} is not a TFLite flatbuffer (no 'TFL3' identifier). Pass a "
        ".tflite file written by the TFLite converter."]
    assert no_flag.stderr.strip().splitlines() == [
        "inspect_model.py: error: flag --tflite=None: Flag --tflite must have a value other than None. "
        "(see --helpfull)"]
    assert missing.stdout == wrong.stdout == no_flag.stdout == ""
