"""`tfcompress benchmark_lowbit`, shortened: int8 and ternary QAT of the session CNN, measured end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_ternary_row_holds_three_values_packs_to_two_bits_and_runs_identically(keras_file, tmp_path):
    tfcompress = os.path.join(os.path.dirname(sys.executable), "tfcompress")
    done = subprocess.run([tfcompress, "benchmark_lowbit", f"--saved_model_dir={keras_file}", "--schemes=int8,ternary",
                           "--qat_epochs=1", "--tflm_samples=100", f"--output_dir={tmp_path}", "--noprogress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "benchmark_lowbit.json").read_text())
    rows = summary["rows"]
    assert list(rows) == ["float32 (reference)", "int8", "ternary"]
    ternary, int8 = rows["ternary"], rows["int8"]
    assert ternary["low_bit_layers"] == ["fc"] and ternary["keep_int8"] == ["conv", "logits"]
    assert ternary["max_distinct_per_channel"] == {"fc": 3}
    assert ternary["index_bitwidths"]["quant_fc"] == 2
    assert ternary["compressed_identical_in_tflm"] is True
    assert ternary["flash_bytes_compressed"] < ternary["flash_bytes"]
    assert ternary["tflm_top1_agreement"] >= 0.99 and int8["tflm_top1_agreement"] >= 0.99
    assert abs(ternary["accuracy"] - rows["float32 (reference)"]["accuracy"]) <= 0.05
    assert set(summary["targets"]) == {"ternary accuracy drop vs float (points)",
                                       "ternary --compress flash / int8 flash"}
    assert "| ternary |" in (tmp_path / "benchmark_lowbit.md").read_text()
