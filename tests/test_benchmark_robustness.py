"""`tfcompress benchmark_robustness`, shortened: its counts add up and every target holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_benchmark_robustness_counts(tmp_path):
    tfcompress = os.path.join(os.path.dirname(sys.executable), "tfcompress")
    done = subprocess.run([tfcompress, "benchmark_robustness", "--cases=200", "--cli_cases=3",
                           f"--output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "benchmark_robustness.json").read_text())
    fuzzed = summary["in_process"]
    assert fuzzed["tflite"]["cases"] + fuzzed["calibration"]["cases"] == 200
    assert fuzzed["unexpected_exceptions"] == 0
    assert summary["cli"]["runs"] == 6 and sum(summary["cli"]["exits"].values()) == 6
    assert all(t["passed"] for t in summary["targets"].values()), summary["targets"]
    assert "| command line (`inspect` + `export`) |" in (tmp_path / "benchmark_robustness.md").read_text()
