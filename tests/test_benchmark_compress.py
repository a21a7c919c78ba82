"""`tfcompress benchmark_compress --paths=record`, shortened: the record path on the session CNN, end to end."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_record_ships_the_gzipped_lut_tflite_that_tflm_checked(keras_file, train_npz, tmp_path):
    tfcompress = os.path.join(os.path.dirname(sys.executable), "tfcompress")
    done = subprocess.run([tfcompress, "benchmark_compress", f"--saved_model_dir={keras_file}", "--paths=record",
                           f"--train_data={train_npz}", "--record_prune_epochs=1", "--record_qat_epochs=1",
                           "--record_keep_int8=conv,logits",
                           "--record_target_params=0.5", "--tflm_samples=100", f"--output_dir={tmp_path}",
                           "--noprogress"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "benchmark_compress.json").read_text())
    rows = summary["rows"]
    name = "(e) channels (auto) → low-bit QAT → LUT, gzip -9"
    record = rows[name]
    assert list(rows) == ["float32 (reference)", "PTQ int8 (reference)", name]
    assert "error" not in record, record.get("error")
    # Channels really went, and fc's kernel shipped as ternary values packed into 2-bit LUT indices.
    assert record["parameters"] < rows["float32 (reference)"]["parameters"]
    assert [c["channels_after"] < c["channels_before"] for c in record["channels"]] == [False, True, False]
    assert record["max_distinct_per_channel"] <= 255 and 2 in record["index_bitwidths"].values()
    # What ships is the gzip of exactly the file TFLM ran, and TFLM ran it identically to the uncompressed one.
    micro = tmp_path / os.path.relpath(record["micro_dir"], tmp_path)
    shipped = (micro / "lenet5.tflite.gz").read_bytes()
    assert gzip.decompress(shipped) == (micro / "lenet5.tflite").read_bytes()
    assert record["shipped_bytes"] == len(shipped) < record["flash_bytes_compressed"] < record["flash_bytes"]
    assert record["compressed_identical_in_tflm"] is True and record["tflm_samples"] == 100
    assert record["tflm_top1_agreement"] >= 0.99
    assert record["shipped_ratio"] == rows["float32 (reference)"]["bytes"] / record["shipped_bytes"]
    assert record["validation_delta_points"] == pytest.approx(
        (record["validation_accuracy"] - record["float_validation_accuracy"]) * 100)
    combined = summary["targets"]["(e) ≥ 50x at ≤ 0.3 pt (ratio)"]
    assert combined["passed"] == (record["shipped_ratio"] >= 50 and -record["delta_points"] <= 0.3)
    tables = (tmp_path / "benchmark_compress.md").read_text()
    assert "gzip -9 of the LUT-compressed .tflite (shipped)" in tables
    assert f"≥ 50x at ≤ 0.3 pt: {'met' if combined['passed'] else 'missed'}" in tables
