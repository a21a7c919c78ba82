"""tfcompress auto on the MNIST CNN: a small search end to end (PTQ misses the flash budget, a compressed attempt
meets it), resume after a kill, and a budget no attempt meets."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import SCALE

from tfcompress.core._keras import keras
from tfcompress.core.errors import BudgetNotMetError
from tfcompress.core.tflite_model import read_tflite
from tfcompress.runs.auto import run_auto
from tfcompress.runs.auto_config import AutoConfig


def _config(keras_file, train_npz, eval_npz, output_dir, **overrides) -> AutoConfig:
    values = dict(output_dir=str(output_dir), train_data=train_npz, keras_model=keras_file, eval_data=eval_npz,
                  input_scale=SCALE, max_accuracy_drop=0.05, target="micro", epochs=1, batch_size=64,
                  latency_runs=20)
    values.update(overrides)
    return AutoConfig(**values)


def test_search_stops_at_the_first_attempt_that_meets_every_gate_and_resumes(keras_file, train_npz, eval_npz,
                                                                           tmp_path):
    config = _config(keras_file, train_npz, eval_npz, tmp_path / "out", max_flash_bytes=40_000)
    result = run_auto(config)
    names = [a["name"] for a in result.attempts]
    assert names[0] == "ptq" and "flash_bytes" in result.attempts[0]["misses"]
    assert result.attempts[0]["flash_bytes"] > 40_000  # the int8 CNN: about 50 KB
    assert result.chosen["name"] == names[-1] and not result.chosen["misses"]
    assert result.chosen["flash_bytes"] <= 40_000 and result.chosen["compress"]
    assert result.chosen["accuracy_drop"] <= 0.05
    # What ships is what the TFLM export checked: the LUT-compressed flatbuffer, uint8 in and out.
    with open(result.model_path, "rb") as f, open(result.chosen["shipped"], "rb") as g:
        assert f.read() == g.read()
    assert os.path.getsize(result.model_path) <= result.chosen["flash_bytes"]
    shipped = read_tflite(result.model_path)
    assert {shipped.tensors[i].dtype for i in shipped.inputs + shipped.outputs} == {"uint8"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [a["name"] for a in report["attempts"]] == names
    assert report["chosen"]["test_samples"] == 1000 and 0.0 <= report["chosen"]["test_accuracy"] <= 1.0
    assert report["validation_samples"] == 220  # the last tenth of the 2,200 training images
    assert (tmp_path / "out" / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert "| 1 | ptq |" in (tmp_path / "out" / "report.md").read_text()

    # Killed before the end: the rerun replays the recorded attempts instead of running them again.
    os.remove(result.model_path)
    os.remove(tmp_path / "out" / "report.json")
    again = run_auto(config)
    assert [a["seconds"] for a in again.attempts] == [a["seconds"] for a in result.attempts]
    assert again.chosen["name"] == result.chosen["name"]
    assert sorted(os.listdir(tmp_path / "out" / "attempts")) == [
        f"{a['index']:02d}_{a['name']}" for a in result.attempts]


@pytest.mark.slow
def test_an_unreachable_budget_names_the_closest_attempt_and_ships_nothing(keras_file, train_npz, eval_npz, tmp_path):
    config = _config(keras_file, train_npz, eval_npz, tmp_path / "out", max_flash_bytes=5_000,
                     max_accuracy_drop=0.02)
    with pytest.raises(BudgetNotMetError, match=r"No model met every gate in \d attempt\(s\)\. Closest: \S+ "
                                                 r"\(misses .*flash .* bytes \(budget 5,000 bytes\)"):
        run_auto(config)
    assert not (tmp_path / "out" / "model.tflite").exists()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["chosen"] is None and len(report["attempts"]) >= 4
    assert os.path.exists(report["closest"]["model"])  # kept under attempts/
    assert all(a["misses"] for a in report["attempts"])


def test_bad_settings_are_refused_before_anything_is_written(keras_file, train_npz, tmp_path):
    with pytest.raises(ValueError, match=r"max_arena_bytes is TFLite Micro's tensor arena, measured only with "
                                         r"--target=micro: pass --target=micro"):
        AutoConfig(output_dir=str(tmp_path / "a"), train_data=train_npz, keras_model=keras_file,
                   max_arena_bytes=10_000)
    with pytest.raises(ValueError, match=r"max_accuracy_drop is a fraction in \[0, 1\]"):
        AutoConfig(output_dir=str(tmp_path / "a"), train_data=train_npz, keras_model=keras_file,
                   max_accuracy_drop=1.5)
    with pytest.raises(ValueError, match=r"max_flash_bytes=1000 is below the [\d,]+ bytes the int8 flatbuffer"):
        run_auto(AutoConfig(output_dir=str(tmp_path / "b"), train_data=train_npz, keras_model=keras_file,
                            input_scale=SCALE, max_flash_bytes=1000))
    assert not (tmp_path / "b").exists()


def test_multi_output_models_are_sent_to_optimize(trained, tmp_path):
    zoo_model = trained("two_output")
    train = tmp_path / "train.npz"
    np.savez(train, x_train=zoo_model.data.x_train, y_train=zoo_model.data.y_train["digit"])
    with pytest.raises(ValueError, match=r"auto judges one classifier output; 'two_output' has 1 input\(s\) and 2 "
                                         r"output\(s\)\. Use tfcompress optimize"):
        run_auto(AutoConfig(output_dir=str(tmp_path / "out"), train_data=str(train),
                            keras_model=zoo_model.files.keras_model))
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_post_training_quantization_that_loses_accuracy_names_its_worst_layers_before_qat(trained_model, train_npz,
                                                                                           tmp_path):
    # One unit of `fc` made huge (and unread by the logits): the float model is unchanged, but the int8 scale of
    # fc's output grows so large that the other units round to zero.
    model = keras.models.clone_model(trained_model)
    model.set_weights(trained_model.get_weights())
    kernel, bias = model.get_layer("fc").get_weights()
    kernel[:, 0], bias[0] = 0.0, 20_000.0
    model.get_layer("fc").set_weights([kernel, bias])
    weights, logits_bias = model.get_layer("logits").get_weights()
    weights[0, :] = 0.0
    model.get_layer("logits").set_weights([weights, logits_bias])
    path = str(tmp_path / "outlier.keras")
    model.save(path)
    config = _config(path, train_npz, None, tmp_path / "out", target=None, latency_runs=0, max_accuracy_drop=0.02)
    try:
        run_auto(config)
    except BudgetNotMetError:
        pass  # whether QAT recovers does not matter here: the debugger's step does
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    names = [a["name"] for a in report["attempts"]]
    assert names[:4] == ["ptq", "ptq_1000", "ptq_100_seed1", "qat"]
    assert report["attempts"][0]["accuracy_drop"] > 0.2  # the outlier ruins post-training quantization
    worst = report["debugger"]["worst_layers"]
    # The damage shows where fc's crushed outputs are read: the logits, the worst tensor by SQNR.
    assert len(worst) == 3 and worst[0]["op"] == "FULLY_CONNECTED" and worst[0]["sqnr_db"] < 3.0
    assert all(worst[0]["sqnr_db"] <= layer["sqnr_db"] for layer in worst)
    assert report["debugger"]["samples"] == 100
    assert f"`{worst[0]['tensor']}`" in (tmp_path / "out" / "report.md").read_text()
