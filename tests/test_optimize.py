"""The optimize pipeline on a real CNN and real MNIST: prune → PQAT → verified int8, and resuming."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import MNIST, SCALE
from tfcompress._keras import keras, tf
from tfcompress.errors import NotFullyQuantizedError, OutputPathError
from tfcompress.optimize import OptimizeConfig, run_optimize
from tfcompress.tflite_model import read_tflite


@pytest.fixture(scope="module")
def train_npz(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.npz"
    with np.load(MNIST) as d:
        np.savez(path, x_train=d["x_train"][:2200], y_train=d["y_train"][:2200])
    return str(path)


def _config(keras_file, train_npz, eval_npz, output_dir, **overrides):
    values = dict(output_dir=str(output_dir), train_data=train_npz, keras_model=keras_file,
                  eval_data=eval_npz, input_scale=SCALE, prune=True, final_sparsity=0.5, qat=True,
                  prune_epochs=1, qat_epochs=1, batch_size=64, max_accuracy_drop=0.02)
    values.update(overrides)
    return OptimizeConfig(**values)


def test_prune_then_pqat_gives_verified_sparse_int8_and_resumes(keras_file, train_npz, eval_npz, tmp_path):
    config = _config(keras_file, train_npz, eval_npz, tmp_path / "out")
    result = run_optimize(config)
    assert [s["stage"] for s in result.stages] == ["float", "prune", "qat", "convert"]
    parsed = read_tflite(result.model_path)
    assert {parsed.tensors[i].dtype for i in parsed.inputs + parsed.outputs} == {"uint8"}
    prune_stage, convert_stage = result.stages[1], result.stages[3]
    assert prune_stage["sparsity"] == pytest.approx(0.5, abs=0.01)
    # The zeros survive PQAT and int8 conversion into the shipped weights.
    assert all(v == pytest.approx(0.5, abs=0.02) for v in convert_stage["weight_sparsity"].values())
    assert convert_stage["eval_accuracy"] >= result.stages[0]["eval_accuracy"] - 0.03
    report = json.loads(open(result.report_path).read())
    assert report["stages"][-1]["bytes"] == os.path.getsize(result.model_path)

    # Interrupted after pruning: the rerun starts at QAT and leaves the pruned model alone.
    state_path = tmp_path / "out" / "stages" / "state.json"
    state = json.loads(state_path.read_text())
    state["completed"] = state["completed"][:2]
    state_path.write_text(json.dumps(state))
    pruned_mtime = os.path.getmtime(tmp_path / "out" / "stages" / "prune.h5")
    again = run_optimize(config)
    assert again.resumed_after == "prune"
    assert os.path.getmtime(tmp_path / "out" / "stages" / "prune.h5") == pruned_mtime
    assert [s["stage"] for s in again.stages] == ["float", "prune", "qat", "convert"]

    with pytest.raises(OutputPathError, match=r"holds stages made with other settings\. Pass --overwrite"):
        run_optimize(_config(keras_file, train_npz, eval_npz, tmp_path / "out", final_sparsity=0.6))


def test_nothing_to_do_and_bad_split_are_refused(keras_file, train_npz, tmp_path):
    with pytest.raises(ValueError, match=r"Nothing to optimize: pass --prune and/or --qat"):
        OptimizeConfig(output_dir=str(tmp_path), train_data=train_npz, keras_model=keras_file)
    with pytest.raises(ValueError, match=r"validation_fraction .* Received: validation_fraction=1.0"):
        OptimizeConfig(output_dir=str(tmp_path), train_data=train_npz, keras_model=keras_file, prune=True,
                       validation_fraction=1.0)


def test_training_data_errors_name_the_training_flags(keras_file, eval_npz, tmp_path):
    from tfcompress.errors import CalibrationDataError

    with pytest.raises(CalibrationDataError, match=r"^Training data .* has no array named 'x_train'.*"
                                                   r"--train_key / --train_labels_key"):
        run_optimize(OptimizeConfig(output_dir=str(tmp_path / "out"), train_data=eval_npz,
                                    keras_model=keras_file, input_scale=SCALE, prune=True))
    assert not (tmp_path / "out").exists()


def test_command_line_bad_input_exits_2(tmp_path):
    command = [os.path.join(os.path.dirname(sys.executable), "tfcompress"), "optimize",
               "--keras_model=/nonexistent.keras", f"--train_data={MNIST}", "--prune",
               f"--output_dir={tmp_path}/out"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "tfcompress optimize: error: Model not found: /nonexistent.keras. Pass an existing SavedModel "
        "directory or .keras/.h5 file."]
    assert not (tmp_path / "out").exists()


def test_layers_left_float_make_int8_refuse_and_dynamic_accept(train_npz, eval_npz, tmp_path):
    model = keras.Sequential([keras.layers.Input((28, 28, 1)), keras.layers.Flatten(name="flat"),
                              keras.layers.Dense(10, name="dense"),
                              keras.layers.Lambda(lambda t: tf.sin(t), name="sine")])
    path = tmp_path / "sine.h5"
    model.save(path)
    config = dict(output_dir=str(tmp_path / "out"), train_data=train_npz, keras_model=str(path),
                  input_scale=SCALE, qat=True, leave_float=("sine",), batch_size=64)
    with pytest.raises(NotFullyQuantizedError, match=r"in float: SIN"):
        run_optimize(OptimizeConfig(**config))
    result = run_optimize(OptimizeConfig(**config, mode="dynamic"))  # told otherwise: resumes, converts
    assert result.resumed_after == "qat"
    assert read_tflite(result.model_path).tensors[read_tflite(result.model_path).inputs[0]].dtype == "float32"


def test_bad_pruning_settings_fail_before_anything_is_written(keras_file, train_npz, tmp_path):
    # small_cnn's first conv sees one input channel: 2:4 cannot prune it unless it is excluded.
    with pytest.raises(ValueError, match=r'structure="2:4" needs at least 4 input channels.*conv'):
        run_optimize(OptimizeConfig(output_dir=str(tmp_path / "out"), train_data=train_npz,
                                    keras_model=keras_file, input_scale=SCALE, prune=True,
                                    final_sparsity=0.5, prune_structure="2:4"))
    assert not (tmp_path / "out").exists()
