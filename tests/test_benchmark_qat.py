"""`tfcompress benchmark_qat`: what it refuses before any training (the measured table is in the README)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("models, message", [
    ("dense_autoencoder", "benchmark_qat compares single-output classifiers. Received: models='dense_autoencoder'"),
    ("lenet", "Unknown zoo model"),
])
def test_benchmark_qat_refuses_what_is_not_a_zoo_classifier(tmp_path, models, message):
    tfcompress = os.path.join(os.path.dirname(sys.executable), "tfcompress")
    done = subprocess.run([tfcompress, "benchmark_qat", f"--models={models}", f"--output_dir={tmp_path / 'out'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()
