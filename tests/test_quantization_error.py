"""`tfcompress.analysis.quantization_error` and `tfcompress quantization_error`: kernel error per quantizer.

On the session-trained MNIST CNN (conftest). The script runs in subprocesses (pipeline scripts define flags).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from tfcompress.analysis import quantization_error as qe
from tfcompress.core import quantizers
from tfcompress.core._keras import keras


@pytest.fixture(scope="module")
def result(trained_model):
    return qe.quantization_error(trained_model)


def test_rows_per_kernel_and_scheme_order(result, trained_model):
    assert [r.layer for r in result.layers] == ["conv", "fc", "logits"]
    assert [r.parameters for r in result.layers] == [72, 1352 * 32, 320]
    assert result.total.parameters == sum(r.parameters for r in result.layers)
    for r in (*result.layers, result.total):
        e = {s: r.errors[s].sqnr_db for s in qe.SCHEMES}
        # Linear: about 6 dB per bit. pow2 (4 exponents: 2 to 3 significant bits of range, none of mantissa)
        # sits between int2 and int4; ternary beats binary (its zero level), and int2 (3 levels, the same
        # count as ternary) loses to ternary, whose threshold and scale fit the bulk of the weights, not the max.
        assert e["int8"] > e["int4"] > e["pow2"] > e["ternary"] > e["int2"], e
        assert e["ternary"] > e["binary"], e
        assert 35 < e["int8"] < 55 and 10 < e["int4"] < 30
    fc = trained_model.get_layer("fc").kernel.numpy()
    row = result.layers[1]
    assert row.errors["int4"].sqnr_db == quantizers.sqnr_db(fc, quantizers.int_n(fc, 4, axis=-1))
    assert row.errors["int8"].max_error <= np.max(np.abs(fc)) / 127 / 2 + 1e-9


def test_depthwise_kernels_are_per_output_channel():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Input((8, 8, 3)), keras.layers.DepthwiseConv2D(3, depth_multiplier=2,
                              name="dw"), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, name="d")])
    r = qe.quantization_error(model)
    assert [(x.layer, x.kind, x.channels) for x in r.layers] == [("dw", "DepthwiseConv2D", 6), ("d", "Dense", 2)]
    with pytest.raises(ValueError, match=r"has no layer with a kernel .* Received: model="):
        qe.quantization_error(keras.Sequential([keras.layers.Input((4,)), keras.layers.ReLU()]))


def test_files_written(result, keras_file, tmp_path):
    out = tmp_path / "qe"
    written = qe.run_quantization_error(keras_model=keras_file, output_dir=str(out))
    data = json.loads((out / qe.JSON_FILENAME).read_text())
    assert data["schemes"] == list(qe.SCHEMES) and [r["layer"] for r in data["layers"]] == ["conv", "fc", "logits"]
    assert math.isclose(data["total"]["errors"]["int8"]["sqnr_db"], result.total.errors["int8"].sqnr_db)
    assert written.total.errors["int8"] == result.total.errors["int8"]
    assert "| (model) | all kernels |" in (out / qe.MARKDOWN_FILENAME).read_text()
    assert (out / qe.PLOT_FILENAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines", "quantization_error", *arguments], cwd=ROOT,
                          text=True, capture_output=True, timeout=300)


def test_cli(keras_file, tmp_path):
    ok = _cli(f"--keras_model={keras_file}", f"--output_dir={tmp_path / 'out'}")
    assert ok.returncode == 0, ok.stderr
    assert "| fc | Dense | 43,264 |" in ok.stdout and (tmp_path / "out" / qe.PLOT_FILENAME).is_file()
    bad = _cli(f"--keras_model={tmp_path / 'missing.keras'}", f"--output_dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "tfcompress quantization_error: error:" in bad.stderr
    assert not (tmp_path / "bad").exists()
    both = _cli(f"--keras_model={keras_file}", f"--saved_model_dir={tmp_path}")
    assert both.returncode == 2 and "Give exactly one model" in both.stderr


def test_a_tf_keras_saved_model_is_measured_like_its_keras_file(result, saved_model_dir):
    """A SavedModel tf_keras wrote (the demo's float_savedmodel is one) has its layers in keras_metadata.pb."""
    from_saved = qe.quantization_error(saved_model_dir)
    assert [r.layer for r in from_saved.layers] == ["conv", "fc", "logits"]
    assert from_saved.total.errors["int8"] == result.total.errors["int8"]
