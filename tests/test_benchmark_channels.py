"""`benchmark_channels`, shortened: ResNet-8 unpruned against uniform and sensitivity-guided channel pruning at half
the MACs, each fine-tuned, converted to int8 and measured end to end; and what the script refuses before training."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, run_scripts

SCRIPT = str(ROOT / "pipelines" / "benchmark_channels.py")
# solve_ratios may land a channel above the budget (its ratios are rounded to 4 decimals after the search).
SLACK = 0.01
ROWS = ["resnet8 / unpruned", "resnet8 / uniform @ 0.5 MACs", "resnet8 / sensitivity @ 0.5 MACs"]


@pytest.mark.slow
def test_channel_pruned_rows_ship_fewer_macs_and_smaller_flash_and_arena(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipelines.benchmark_channels", "--models=resnet8",
                           "--target_macs=0.5", "--num_train=1500", "--num_test=500", "--train_epochs=1",
                           "--prune_epochs=1", "--latency_runs=5", "--probe_macs=0.25", f"--output_dir={tmp_path}",
                           "--channel_multiple=1", "--noprogress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "benchmark_channels.json").read_text())
    rows = summary["rows"]
    assert list(rows) == ROWS
    for row in rows.values():
        assert "error" not in row, row
        assert row["input_dtype"] == row["output_dtype"] == "uint8"
        for key in ("test_accuracy", "validation_accuracy", "float_validation_accuracy"):
            assert 0.0 <= row[key] <= 1.0, (key, row[key])
        assert (tmp_path / row["tflite"]).stat().st_size == row["flash_bytes"]
        assert row["litert_median_ms"] == min(row["litert_round_medians_ms"]) > 0 and row["tflm_median_ms"] > 0
        assert len(row["litert_round_medians_ms"]) == len(row["tflm_round_medians_ms"]) == 3
    unpruned = rows[ROWS[0]]
    groups = {"stem_conv", "stage1_a_conv", "stage2_a_conv", "stage2_b_conv", "stage3_a_conv", "stage3_b_conv"}
    for key in ROWS[1:]:
        pruned = rows[key]
        assert pruned["target_macs"] == 0.5 and set(pruned["ratios"]) == groups
        assert pruned["macs_fraction_keras"] <= 0.5 + SLACK
        assert pruned["macs_tflite"] <= (0.5 + SLACK) * unpruned["macs_tflite"]
        assert pruned["parameters"] < unpruned["parameters"]
        assert pruned["flash_bytes"] < unpruned["flash_bytes"]
        assert pruned["arena_bytes"] < unpruned["arena_bytes"]
        assert pruned["delta_points"] == pytest.approx((pruned["test_accuracy"] - unpruned["test_accuracy"]) * 100)
    assert rows[ROWS[1]]["uniform_ratio"] == pytest.approx(0.29, abs=0.02)
    assert rows[ROWS[2]]["solution"]["macs_fraction"] <= 0.5 + SLACK
    sensitivity = summary["models"]["resnet8"]["sensitivity"]
    assert {curve["layer"] for curve in sensitivity["curves"]} == groups and sensitivity["num_samples"] == 150
    (probe,) = summary["models"]["resnet8"]["latency_probe"]
    assert probe["macs_fraction_tflite"] <= 0.27 and probe["flash_bytes"] < rows[ROWS[1]]["flash_bytes"]
    assert set(summary["targets"]) == {
        "resnet8 / uniform @ 0.5 MACs: int8 LiteRT speed-up at <= 1 pt drop",
        "resnet8 / sensitivity @ 0.5 MACs: int8 LiteRT speed-up at <= 1 pt drop",
        "resnet8 @ 0.5 MACs: sensitivity-guided minus uniform test accuracy (pt)"}
    table = (tmp_path / "benchmark_channels.md").read_text()
    assert "| uniform @ 0.5 MACs |" in table and "host-side" in table and "Distiller" in table
    assert table.strip() in done.stdout


def test_benchmark_channels_refuses_bad_budgets_and_models_before_training(tmp_path):
    budget, model = run_scripts(SCRIPT, ["--target_macs=0.5,1.5", f"--output_dir={tmp_path / 'a'}"],
                                ["--models=lenet5,vgg", f"--output_dir={tmp_path / 'b'}"])
    assert budget.returncode == 2 and (
        "error: target_macs are fractions of the MACs to keep, each in (0, 1), e.g. 0.5 or 0.5,0.35. "
        "Received: target_macs='0.5,1.5'") in budget.stderr, budget.stderr[-2000:]
    assert model.returncode == 2 and (
        "error: models must be among ['lenet5', 'resnet8']. Received: models='lenet5,vgg'") in model.stderr, (
        model.stderr[-2000:])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
