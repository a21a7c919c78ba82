"""The demo on the real LeNet-5 and the full MNIST test split (slow: trains for one epoch)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from tfcompress.core.tflite_model import read_tflite

# What a person reads as an error: TensorFlow's C++ log lines, Python warnings, TensorFlow's logged warnings.
NOISE = re.compile(r"^[EWF]\d{4} |UserWarning|DeprecationWarning|^WARNING:|^W\d{4}|Traceback", re.MULTILINE)


@pytest.mark.slow
def test_demo_trains_converts_and_reports(tmp_path):
    """`make demo`, as a person runs it (the console script, a fresh process): its output is the summary only."""
    tfcompress = os.path.join(os.path.dirname(sys.executable), "tfcompress")
    env = {name: value for name, value in os.environ.items() if name not in ("TF_CPP_MIN_LOG_LEVEL",)}
    done = subprocess.run([tfcompress, "demo", f"--output_dir={tmp_path}", "--epochs=1", "--seed=0",
                           "--max_accuracy_drop=0.005"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not NOISE.findall(done.stdout + done.stderr), (done.stdout + done.stderr)[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    f32, i8 = summary["models"]["float32"], summary["models"]["int8"]
    assert f32["accuracy"] >= 0.97  # one epoch of LeNet-5 (five reach about 0.993)
    assert abs(i8["accuracy_drop"]) <= 0.005  # 50 of the 10,000 test images
    assert i8["bytes"] <= 0.27 * f32["bytes"]
    parsed = read_tflite(i8["path"])
    assert {parsed.tensors[i].dtype for i in parsed.inputs + parsed.outputs} == {"uint8"}
    assert parsed.op_counts() == {"CONV_2D": 2, "FULLY_CONNECTED": 2, "MAX_POOL_2D": 2, "QUANTIZE": 2,
                                  "RESHAPE": 1}
    assert sum(t.dtype == "int8" and t.is_constant for t in parsed.tensors) == 4  # four weight tensors
    assert os.path.getsize(i8["path"]) == i8["bytes"]
    assert "| int8 | uint8 |" in (tmp_path / "summary.md").read_text()
    assert summary["micro"]["tflm_samples"] == 10000 and summary["micro"]["tflm_top1_agreement"] >= 0.999
    assert (tmp_path / "int8" / "micro" / "model_model_data.cc").exists()
    assert (tmp_path / "int8" / "report.md").exists() and (tmp_path / "float32" / "report.md").exists()
