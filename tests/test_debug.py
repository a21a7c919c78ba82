"""`tfcompress.analysis.debug` and `pipelines/debug.py`: per-layer int8 error from the QuantizationDebugger.

Models have random weights (the debugger measures rounding, not accuracy) and 50 calibration samples.
The script runs in subprocesses: its flags share names with pipelines/convert.py's.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

import numpy as np
import pytest

from conftest import CALIBRATION, ROOT, SCALE, run_scripts
from tfcompress.models import baseline
from tfcompress.core._keras import keras, tf
from tfcompress.analysis.debug import (
    CSV_FIELDS,
    DebugConfig,
    QuantizationDebugError,
    check_fully_quantized,
    debug_quantization,
    render_text,
    run_debug,
    to_csv,
    to_json,
)
from tfcompress.core.errors import CalibrationDataError, InputError, NotFullyQuantizedError, OutputPathError
from tfcompress.core.model_io import load_model

SCRIPT = str(ROOT / "pipelines" / "debug.py")


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    with np.load(CALIBRATION) as d:
        return d["x"][:50].astype(np.float32) * SCALE


@pytest.fixture(scope="module")
def lenet():
    keras.utils.set_random_seed(0)
    return baseline.lenet5()


@pytest.fixture(scope="module")
def lenet_result(lenet, samples):
    return debug_quantization(load_model(lenet), samples)


def _with(layer) -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.layers.Input((28, 28, 1)), keras.layers.Conv2D(4, 3, name="conv"), layer,
                             keras.layers.Flatten(name="flatten"), keras.layers.Dense(10, name="logits")],
                            name="odd_model")


def test_lenet5_rows_are_per_layer_and_worst_first(lenet_result):
    rows = lenet_result.layers
    assert lenet_result.source == "lenet5" and lenet_result.num_samples == 50
    assert sorted(r.op for r in rows) == ["CONV_2D", "CONV_2D", "FULLY_CONNECTED", "FULLY_CONNECTED",
                                          "MAX_POOL_2D", "MAX_POOL_2D", "RESHAPE"]
    assert [r.sqnr_db for r in rows] == sorted(r.sqnr_db for r in rows)
    assert lenet_result.float_ops == ()
    # Each op gets the dequantized input of its quantized twin, so the rows hold the error one layer adds:
    # weighted layers round once (RMSE near 1/sqrt(12) of a step); max pooling and reshapes add none.
    for r in rows:
        assert r.rmse_over_scale == pytest.approx(math.sqrt(r.mean_squared_error) / r.scale)
        if r.op in ("CONV_2D", "FULLY_CONNECTED"):
            assert 0.15 < r.rmse_over_scale < 0.5 and 30.0 < r.sqnr_db < 60.0
            assert r.max_abs_error <= 2 * r.scale
        else:
            assert r.rmse_over_scale < 1e-3 and r.sqnr_db > 100.0
    assert {r.op for r in rows[:4]} == {"CONV_2D", "FULLY_CONNECTED"}
    conv1 = next(r for r in rows if "conv1" in r.tensor)
    assert conv1.num_elements == 24 * 24 * 20


def test_sqnr_signal_power_is_the_float_layer_output(lenet, lenet_result, samples):
    """The SQNR's signal term, recovered from the row, equals conv1's output power computed by Keras."""
    conv1 = next(r for r in lenet_result.layers if "conv1" in r.tensor)
    outputs = keras.Model(lenet.inputs, lenet.get_layer("conv1").output)(samples).numpy()
    keras_power = float(np.mean(np.square(outputs.astype(np.float64))))
    power = conv1.mean_squared_error * 10 ** (conv1.sqnr_db / 10)
    assert power == pytest.approx(keras_power, rel=1e-3)


def test_json_csv_and_text(lenet_result):
    document = to_json(lenet_result)
    assert json.loads(json.dumps(document, allow_nan=False)) == document
    assert [row["tensor"] for row in document["layers"]] == [r.tensor for r in lenet_result.layers]
    table = list(csv.DictReader(io.StringIO(to_csv(lenet_result))))
    assert tuple(table[0]) == CSV_FIELDS and len(table) == len(lenet_result.layers)
    assert float(table[0]["sqnr_db"]) == pytest.approx(lenet_result.layers[0].sqnr_db)
    text = render_text(lenet_result, top=3).splitlines()
    assert text[0].startswith("int8 quantization error of lenet5 per layer, worst first (3 of 7, 50 samples")
    assert len(text) == 2 + 3 and lenet_result.layers[0].tensor in text[2]


def test_op_left_in_float_is_listed_then_raised(samples):
    result = debug_quantization(load_model(_with(keras.layers.Lambda(lambda t: tf.math.sin(t), name="odd"))),
                                samples)
    assert result.float_ops == ("SIN (odd_model/odd/Sin)",)
    assert {r.op for r in result.layers} == {"CONV_2D", "RESHAPE", "FULLY_CONNECTED"}
    assert "left in float (not measured): SIN (odd_model/odd/Sin)" in render_text(result)
    message = (r"int8 quantization of odd_model leaves 1 op\(s\) in float: SIN \(odd_model/odd/Sin\)\. "
               r"Replace the layers .*\(ops left in float: SIN\)")
    with pytest.raises(NotFullyQuantizedError, match=message) as e:
        check_fully_quantized(result)
    assert e.value.exit_code == 1 and e.value.ops == ["SIN"]


def test_op_without_builtin_kernel_names_it(samples):
    model = load_model(_with(keras.layers.Lambda(lambda t: tf.math.erf(t), name="odd")))
    with pytest.raises(NotFullyQuantizedError, match=r"odd_model uses TensorFlow op\(s\) with no TFLite "
                       r"builtin kernel: Erf\. .*replace those layers\.") as e:
        debug_quantization(model, samples)
    assert e.value.exit_code == 1 and e.value.ops == ["Erf"] and "\n" not in str(e.value)
    assert "TF Select ops: Erf" in e.value.details


def test_model_with_nothing_quantized_is_a_debug_error(samples):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Input((28, 28, 1)),
                              keras.layers.Lambda(lambda t: tf.math.sin(t), name="odd")], name="only_sin")
    with pytest.raises(QuantizationDebugError, match=r"No op of only_sin was quantized to int8, so the "
                       r"QuantizationDebugger has nothing to compare\.") as e:
        debug_quantization(load_model(model), samples)
    assert e.value.exit_code == 1


def test_quantization_aware_model_is_refused(lenet, samples):
    from tfcompress.training.quantize import quantize_aware

    message = r"lenet5 is quantization-aware \(QAT\): .*Debug the float model"
    with pytest.raises(InputError, match=message) as e:
        debug_quantization(load_model(quantize_aware(lenet)), samples)
    assert e.value.exit_code == 2


@pytest.mark.parametrize("overrides, message", [
    (dict(keras_model=None), r"Give exactly one model: --saved_model_dir or --keras_model"),
    (dict(saved_model_dir="x"), r"Give exactly one model: --saved_model_dir or --keras_model"),
    (dict(calibration_data=None), r"pass --calibration_data .*Received: calibration_data=None"),
    (dict(num_calibration_samples=0), r"num_calibration_samples must be at least 1"),
])
def test_config_rejects_bad_arguments(overrides, message):
    values = dict(keras_model="m.keras", calibration_data=str(CALIBRATION))
    with pytest.raises(ValueError, match=message):
        DebugConfig(**{**values, **overrides})


def test_run_debug_writes_files_and_refuses_to_overwrite(lenet, tmp_path):
    keras_file = tmp_path / "lenet.keras"
    lenet.save(keras_file)
    config = DebugConfig(keras_model=str(keras_file), calibration_data=str(CALIBRATION), calibration_key="x",
                         input_scale=SCALE, num_calibration_samples=50, output_dir=str(tmp_path / "out"))
    result = run_debug(config)
    assert sorted(os.listdir(tmp_path / "out")) == ["debug.csv", "debug.json"]
    assert json.loads((tmp_path / "out" / "debug.json").read_text()) == to_json(result)
    assert (tmp_path / "out" / "debug.csv").read_text() == to_csv(result)
    with pytest.raises(OutputPathError, match=r"debug\.json already exists\. Pass --overwrite"):
        run_debug(config)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((50, 32, 32, 1), np.uint8))
    with pytest.raises(CalibrationDataError, match=r"\(N, 28, 28, 1\)"):
        run_debug(DebugConfig(keras_model=str(keras_file), calibration_data=str(bad),
                              output_dir=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()


def test_script_exit_codes_0_1_2(lenet, tmp_path):
    keras_file = tmp_path / "lenet.keras"
    lenet.save(keras_file)
    sin_dir = tmp_path / "sin_savedmodel"
    _with(keras.layers.Lambda(lambda t: tf.math.sin(t), name="odd")).save(sin_dir, save_format="tf")
    data = [f"--calibration_data={CALIBRATION}", "--calibration_key=x", f"--input_scale={SCALE}",
            "--num_calibration_samples=50"]
    out = tmp_path / "out"
    ok, in_float, missing = run_scripts(SCRIPT,
        [f"--keras_model={keras_file}", *data, f"--output_dir={out}", "--json"],
        [f"--saved_model_dir={sin_dir}", *data, "--top=2"],
        [f"--keras_model={tmp_path / 'nowhere.keras'}", *data],
    )
    assert ok.returncode == 0, ok.stderr
    document = json.loads(ok.stdout)
    assert document == json.loads((out / "debug.json").read_text())
    assert len(document["layers"]) == 7 and document["float_ops"] == []
    assert in_float.returncode == 1
    assert "left in float (not measured): SIN" in in_float.stdout and len(in_float.stdout.splitlines()) == 5
    assert len(in_float.stderr.strip().splitlines()) == 1 and in_float.stderr.startswith(
        f"debug.py: error: int8 quantization of {sin_dir} leaves 1 op(s) in float: SIN")
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        f"debug.py: error: Model not found: {tmp_path / 'nowhere.keras'}. Pass an existing SavedModel "
        "directory or .keras/.h5 file."]
