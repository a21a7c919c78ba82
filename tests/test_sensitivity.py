"""Sensitivity analysis and the channel budget solver, on the MNIST CNN and the zoo's residual, depthwise and dense
models; the `tfcompress sensitivity` verb."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

import tfcompress
from tfcompress.analysis.sensitivity import Curve, SensitivityResult, solve_ratios, uniform_ratio
from tfcompress.training.channel_graph import channel_plan

RATIOS = (0.25, 0.5, 0.75)


@pytest.fixture(scope="module")
def cnn_sensitivity(trained_model, mnist_subset):
    x_train, y_train, _, _ = mnist_subset
    x_val, y_val = x_train[-1000:], y_train[-1000:]  # the end of the training split, never the test split
    return tfcompress.sensitivity(trained_model, x_val, y_val, ratios=RATIOS), x_val, y_val


def test_curves_measure_each_layer_alone(trained_model, cnn_sensitivity):
    result, x_val, y_val = cnn_sensitivity
    base = float(np.mean(trained_model.predict(x_val, verbose=0).argmax(-1) == y_val))
    assert result.metric == "accuracy" and result.baseline == pytest.approx(base) and result.num_samples == 1000
    channel = {c.layer for c in result.curves if c.kind == "channel"}
    unstructured = {c.layer for c in result.curves if c.kind == "unstructured"}
    assert channel == {"conv", "fc"} and unstructured == {"conv", "fc", "logits"}
    for curve in result.curves:
        assert curve.ratios == RATIOS and all(0.0 <= v <= 1.0 for v in curve.values)
    # removing three quarters of the 8 conv filters costs more than a quarter of the fc kernel's smallest weights
    assert result.curve("conv").values[-1] < base - 0.05
    assert result.curve("fc", "unstructured").values[0] >= base - 0.01
    document = json.loads(json.dumps(result.to_json()))
    assert document["curves"][0]["values"] == list(result.curves[0].values)
    assert "| conv | channel | 8 |" in result.markdown()
    assert result.plot().startswith(b"\x89PNG")


def test_solver_gives_the_robust_layer_the_larger_ratio(trained_model):
    plan = channel_plan(trained_model)
    # fc (32 channels) barely cares, conv (8 channels) breaks early: measured-looking curves, made by hand
    curves = (Curve("conv", "channel", 8, (0.25, 0.5, 0.75), (0.90, 0.60, 0.30)),
              Curve("fc", "channel", 32, (0.25, 0.5, 0.75), (0.97, 0.96, 0.90)))
    result = SensitivityResult("accuracy", 0.97, 1000, curves, "l1")
    solution = solve_ratios(result, plan, target_macs=0.6)
    assert solution.ratios["fc"] > solution.ratios["conv"]
    assert solution.macs_fraction <= 0.6
    assert solution.macs == plan.cost(solution.kept)[0]


def test_solved_ratios_meet_the_budget_and_beat_uniform_before_fine_tuning(trained_model, cnn_sensitivity):
    result, x_val, y_val = cnn_sensitivity
    plan = channel_plan(trained_model)
    solution = solve_ratios(result, plan, target_macs=0.5)
    guided = tfcompress.prune_channels(trained_model, ratios=solution.ratios)
    uniform = tfcompress.prune_channels(trained_model, uniform_ratio(plan, 0.5))
    assert guided.macs_after == solution.macs and guided.macs_after <= 0.5 * guided.macs_before
    assert uniform.macs_after <= 0.5 * uniform.macs_before
    accuracy = {name: float(np.mean(r.model.predict(x_val, verbose=0).argmax(-1) == y_val))
                for name, r in (("guided", guided), ("uniform", uniform))}
    assert accuracy["guided"] >= accuracy["uniform"] - 0.01, accuracy


@pytest.mark.parametrize("name, metric", [("resnet8", "accuracy"), ("ds_cnn", "accuracy"),
                                          ("dense_autoencoder", "mse")])
def test_zoo_models_get_curves_and_a_budget(trained, name, metric):
    model, data = trained(name).model, trained(name).data
    x_val, y_val = data.x_train[-300:], data.y_train[-300:]
    result = tfcompress.sensitivity(model, x_val, y_val, ratios=(0.3, 0.6, 0.9), kinds=("channel",))
    assert result.metric == metric
    plan = channel_plan(model)
    assert {c.layer for c in result.curves} == {g.name for g in plan.prunable}
    solution = solve_ratios(result, plan, target_macs=0.5)
    pruned = tfcompress.prune_channels(model, ratios=solution.ratios, data=data.x_train[:256])
    assert pruned.macs_after == solution.macs <= 0.5 * pruned.macs_before
    prediction = pruned.model.predict(x_val, verbose=0)
    assert prediction.shape == model.predict(x_val, verbose=0).shape and np.isfinite(prediction).all()


def test_bad_arguments_are_refused(trained_model, cnn_sensitivity):
    result, x_val, y_val = cnn_sensitivity
    plan = channel_plan(trained_model)
    with pytest.raises(ValueError, match=r"budget cannot be reached by removing channels: .* keeps 0\.\d+ of its MACs"):
        solve_ratios(result, plan, target_macs=0.01)
    with pytest.raises(ValueError, match=r"Give target_macs or target_params"):
        solve_ratios(result, plan)
    with pytest.raises(ValueError, match=r"target_macs is the fraction to keep, in \(0, 1\]"):
        solve_ratios(result, plan, target_macs=1.5)
    with pytest.raises(ValueError, match=r"ratios are fractions pruned, each in \(0, 1\)"):
        tfcompress.sensitivity(trained_model, x_val, y_val, ratios=(0.0, 0.5))
    with pytest.raises(ValueError, match=r"kinds must be a non-empty subset"):
        tfcompress.sensitivity(trained_model, x_val, y_val, kinds=("filters",))
    with pytest.raises(ValueError, match=r"output must name one of the model's outputs \['logits'\]"):
        tfcompress.sensitivity(trained_model, x_val, y_val, output="digits")
    with pytest.raises(ValueError, match=r"fit neither class labels"):
        tfcompress.sensitivity(trained_model, x_val, y_val[:10])


def test_the_verb_writes_json_markdown_and_plot(saved_model_dir, train_npz, tmp_path):
    out = tmp_path / "sens"
    done = subprocess.run(
        [sys.executable, "-m", "pipelines", "sensitivity", f"--saved_model_dir={saved_model_dir}",
         f"--train_data={train_npz}", "--input_scale=0.00392156862745098", "--ratios=0.5,0.9",
         "--target_macs=0.6", "--channel_multiple=1", f"--output_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads((out / "sensitivity.json").read_text())
    assert document["validation_samples"] == 220  # the last tenth of the 2,200 training images
    assert document["solution"]["macs_fraction"] <= 0.6
    assert "Solved channel ratios" in (out / "sensitivity.md").read_text()
    assert (out / "sensitivity.png").read_bytes().startswith(b"\x89PNG")
    assert "| conv | channel |" in done.stdout
