"""optimize --prune_channels: uniform and sensitivity-guided channel pruning, then fine-tune, QAT and a verified int8
model that really is smaller (MACs, bytes, arena), on the MNIST CNN and the zoo's depthwise and residual models."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SCALE

import tfcompress
from tfcompress.core.tflite_model import read_tflite
from tfcompress.runs.optimize import OptimizeConfig, run_optimize


def test_uniform_channel_pruning_then_qat_ships_a_smaller_verified_int8_model(keras_file, train_npz, eval_npz,
                                                                             tmp_path):
    config = OptimizeConfig(output_dir=str(tmp_path / "out"), train_data=train_npz, keras_model=keras_file,
                            eval_data=eval_npz, input_scale=SCALE, prune_channels="0.5", channel_multiple=4, qat=True,
                            prune_epochs=2,
                            qat_epochs=1, batch_size=64, max_accuracy_drop=0.02, target="micro", latency_runs=20)
    result = run_optimize(config)
    stages = {s["stage"]: s for s in result.stages}
    assert list(stages) == ["float", "channels", "qat", "convert"]
    channels = stages["channels"]
    assert channels["macs"] < 0.5 * stages["float"]["macs"]
    assert channels["channel_pruning"]["ratios"] == {"conv": 0.5, "fc": 0.5}
    probe = channels["int8_probe"]
    assert probe["after"]["bytes"] < 0.6 * probe["before"]["bytes"]
    assert probe["after"]["arena_bytes"] < probe["before"]["arena_bytes"]  # 4 conv maps instead of 8
    assert probe["after"]["latency_median_ms"] > 0
    tflite = read_tflite(result.model_path)
    assert {tflite.tensors[i].dtype for i in tflite.inputs + tflite.outputs} == {"uint8"}
    assert tfcompress.count_macs(tflite).total_macs == channels["macs"]
    # measured: 0.898 float, 0.863 int8 after half the channels, 2 epochs on 1,980 images and QAT
    assert stages["convert"]["eval_accuracy"] >= stages["float"]["eval_accuracy"] - 0.06
    report = json.loads(open(result.report_path).read())
    rows = {row["stage"]: row for row in report["report"]["stages"]}
    assert rows["channels"]["macs"] == channels["macs"]
    assert rows["float"]["arena_bytes"] == probe["before"]["arena_bytes"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Channel pruning: uniform ratio 0.5" in markdown and "| conv | Conv2D | 8 → 4 |" in markdown

    # Resumed: a rerun with the same settings redoes nothing of the training stages.
    again = run_optimize(config)
    assert again.resumed_after == "qat"


@pytest.mark.slow
def test_auto_channel_pruning_meets_the_mac_budget_on_the_depthwise_model(trained, tmp_path):
    zoo_model = trained("ds_cnn")
    train = tmp_path / "train.npz"
    np.savez(train, x_train=zoo_model.data.x_train, y_train=zoo_model.data.y_train)
    result = run_optimize(OptimizeConfig(
        output_dir=str(tmp_path / "out"), train_data=str(train), keras_model=zoo_model.files.keras_model,
        eval_data=zoo_model.files.eval_data, prune_channels="auto", target_macs=0.5, prune_epochs=2, batch_size=64,
        learning_rate=1e-3, max_accuracy_drop=0.05, calibration_data=zoo_model.files.calibration_data,
        calibration_key="x", latency_runs=20))
    stages = {s["stage"]: s for s in result.stages}
    assert list(stages) == ["float", "channels", "convert"]
    channels = stages["channels"]
    assert channels["solution"]["macs_fraction"] <= 0.5
    assert {c["layer"] for c in channels["sensitivity"]["curves"]} == {
        "stem_conv", *(f"block{i}_pointwise_conv" for i in range(1, 5))}
    # The depthwise layers shrink with the pointwise channels they pass through.
    table = {row["name"]: row for row in channels["channel_pruning"]["layers"]}
    assert table["block2_depthwise"]["channels_after"] == table["block1_pointwise_conv"]["channels_after"]
    tflite = read_tflite(result.model_path)
    macs = tfcompress.count_macs(tflite).total_macs
    assert macs == channels["macs"] and macs <= 0.5 * stages["float"]["macs"] + 1
    assert stages["convert"]["eval_accuracy"] >= stages["float"]["eval_accuracy"] - 0.1


@pytest.fixture(scope="module")
def wide_cnn(trained, tmp_path_factory):
    """A CNN whose int8 latency follows its MACs (45M; the zoo's small ones run in tens of microseconds, where
    the interpreter's fixed cost hides what channels cost), trained one epoch on the zoo's 32x32 MNIST."""
    from tfcompress.core._keras import keras

    data = trained("resnet8").data
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv1"),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(2, name="pool"),
        keras.layers.Conv2D(64, 3, activation="relu", name="conv3"),
        keras.layers.GlobalAveragePooling2D(name="gap"),
        keras.layers.Dense(10, activation="softmax", name="probabilities"),
    ], name="wide_cnn")
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(data.x_train, data.y_train, epochs=1, batch_size=64, verbose=0)
    root = tmp_path_factory.mktemp("wide")
    model.save(root / "wide.keras")
    np.savez(root / "train.npz", x_train=data.x_train, y_train=data.y_train)
    np.savez(root / "eval.npz", x_test=data.x_test, y_test=data.y_test)
    return root


@pytest.mark.slow
def test_latency_budget_is_searched_by_measuring(wide_cnn, tmp_path):
    result = run_optimize(OptimizeConfig(
        output_dir=str(tmp_path / "out"), train_data=str(wide_cnn / "train.npz"),
        keras_model=str(wide_cnn / "wide.keras"), eval_data=str(wide_cnn / "eval.npz"), prune_channels="auto",
        target_latency=0.7, prune_epochs=1, batch_size=64, max_accuracy_drop=0.5,
        calibration_data=str(wide_cnn / "train.npz"), calibration_key="x_train", latency_runs=50))
    search = {s["stage"]: s for s in result.stages}["channels"]["latency_search"]
    last = search["attempts"][-1]
    assert last["latency_median_ms"] <= search["goal_ms"] and last["latency_fraction"] <= 0.7
    assert last["macs_fraction"] < 0.7


@pytest.mark.slow
def test_an_unreachable_latency_budget_names_the_fastest_attempt(wide_cnn, tmp_path):
    with pytest.raises(ValueError, match=r"target_latency=0.01 was not reached by removing channels: the fastest of "
                                         r"1 attempts kept 0\.\d+ of the int8 latency .* Ask for at least"):
        run_optimize(OptimizeConfig(
            output_dir=str(tmp_path / "out"), train_data=str(wide_cnn / "train.npz"),
            keras_model=str(wide_cnn / "wide.keras"), prune_channels="auto", target_latency=0.01,
            calibration_data=str(wide_cnn / "train.npz"), calibration_key="x_train", latency_runs=20))
    assert not (tmp_path / "out" / "model.tflite").exists()
