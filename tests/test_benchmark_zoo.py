"""`tfcompress benchmark_zoo` end to end on one zoo model: every path runs, the tables and JSON are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_benchmark_zoo_runs_every_path_on_a_model_and_writes_its_tables(tmp_path):
    tfcompress = os.path.join(os.path.dirname(sys.executable), "tfcompress")
    out = tmp_path / "bench"
    done = subprocess.run([tfcompress, "benchmark_zoo", "--models=ds_cnn", "--prune_epochs=1", "--latency_runs=10",
                           f"--output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "benchmark_zoo.json").read_text())
    rows = summary["rows"]
    assert sorted(rows) == ["ds_cnn / PTQ int8", "ds_cnn / micro", "ds_cnn / optimize prune+QAT"]
    assert all(row["exit"] == 0 for row in rows.values()), rows
    ptq, micro = rows["ds_cnn / PTQ int8"], rows["ds_cnn / micro"]
    assert ptq["bytes"] == micro["bytes"] and ptq["gzip_bytes"] < ptq["bytes"]
    assert micro["tflm_max_steps"] <= micro["tflm_tolerance_steps"] and micro["tflm_top1_agreement"] >= 0.999
    assert micro["arena_bytes"] > micro["arena_recorded_bytes"]
    assert summary["targets"]["ds_cnn: PTQ accuracy drop"]["passed"]
    assert "| ds_cnn | micro | 0 |" in (out / "benchmark_zoo.md").read_text()
    with pytest.raises(subprocess.CalledProcessError) as refused:
        subprocess.run([tfcompress, "benchmark_zoo", "--models=lenet", f"--output_dir={tmp_path / 'x'}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=True)
    assert refused.value.returncode == 2 and "Unknown zoo model" in refused.value.stderr
