"""The run report: every number checked against an independent computation on the small real CNN."""

from __future__ import annotations

import gzip
import json
import concurrent.futures
import os
import pty
import subprocess
import sys

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter

from conftest import CALIBRATION, ROOT, SCALE
from tfcompress.core import progress
from tfcompress.analysis import report
from tfcompress.runs.pipeline import ConvertPipelineConfig, run_convert
from tfcompress.core.tflite_model import read_tflite, weight_tensors
from tfcompress.conversion.verify import run_tflite

# small_cnn: conv 3x3x1 -> 8 on 28x28 (valid: 26x26), fc 1352 -> 32, logits 32 -> 10.
HAND_MACS = 26 * 26 * 8 * 3 * 3 * 1 + 1352 * 32 + 32 * 10


@pytest.fixture(scope="module")
def run_dir(saved_model_dir, eval_npz, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("report") / "run"
    run_convert(ConvertPipelineConfig(
        output_dir=str(out), saved_model_dir=saved_model_dir, calibration_data=str(CALIBRATION),
        calibration_key="x", eval_data=eval_npz, input_scale=SCALE, num_calibration_samples=200,
        latency_runs=50, debug_layers=True))  # asks for the QuantizationDebugger's per-tensor error
    return str(out)


def _rows(run_dir):
    record = json.load(open(os.path.join(run_dir, "report.json")))
    assert record["report"]["schema_version"] == report.SCHEMA_VERSION
    return {row["stage"]: row for row in record["report"]["stages"]}


def test_tflite_row_matches_independent_numbers(run_dir, trained_model, eval_npz):
    row = _rows(run_dir)["int8 (.tflite)"]
    path = os.path.join(run_dir, "model.tflite")
    data = open(path, "rb").read()
    assert row["bytes"] == os.path.getsize(path)
    assert row["gzip_bytes"] == len(gzip.compress(data, 9))
    assert row["parameters"] == trained_model.count_params()
    assert row["macs"] == HAND_MACS
    # Non-zero parameters: stored weights and biases that differ from their zero point, read by LiteRT.
    interpreter = Interpreter(model_content=data)
    interpreter.allocate_tensors()
    nonzero = 0
    for _, weights, bias in weight_tensors(read_tflite(data)):
        for tensor in (weights, bias):
            values = interpreter.get_tensor(tensor.index)
            zero = tensor.zero_point[0] if tensor.zero_point else 0
            nonzero += int(np.count_nonzero(values != zero))
    assert row["nonzero_parameters"] == nonzero
    with np.load(eval_npz) as d:
        x, y = d["x_test"][..., None].astype(np.float32) * SCALE, d["y_test"]
    accuracy = float(np.mean(run_tflite(data, x).argmax(1) == y))
    assert row["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    float_accuracy = float(np.mean(trained_model.predict(x, verbose=0).argmax(1) == y))
    assert row["accuracy_change"] == pytest.approx(accuracy - float_accuracy, abs=1e-9)
    assert 0 < row["latency_median_ms"] <= row["latency_p90_ms"]


def test_float_row_reads_the_saved_model_from_disk(run_dir, trained_model):
    row = _rows(run_dir)["float"]
    weights = trained_model.get_weights()
    assert row["format"] == "savedmodel"
    assert row["parameters"] == sum(w.size for w in weights)
    assert row["nonzero_parameters"] == sum(int(np.count_nonzero(w)) for w in weights)
    assert row["accuracy_change"] == 0.0


def test_layers_give_zero_fraction_and_macs_per_layer(run_dir):
    record = json.load(open(os.path.join(run_dir, "report.json")))
    layers = record["report"]["layers"]
    assert [layer["op"] for layer in layers] == ["CONV_2D", "FULLY_CONNECTED", "FULLY_CONNECTED"]
    assert [layer["macs"] for layer in layers] == [26 * 26 * 8 * 9, 1352 * 32, 32 * 10]
    sparsity = record["model"]["weight_sparsity"]
    assert [layer["zero_fraction"] for layer in layers] == pytest.approx(list(sparsity.values()))


def test_markdown_and_plots_are_written(run_dir):
    markdown = open(os.path.join(run_dir, "report.md")).read()
    assert "| int8 (.tflite) | tflite |" in markdown and f"{HAND_MACS:,}" in markdown
    assert "Worst quantized tensors" in markdown  # debug.json from the QuantizationDebugger
    assert "Not run:" not in markdown  # everything was asked for
    assert "## Fidelity against the float model (" in markdown
    for name in report.PLOTS:
        png = open(os.path.join(run_dir, name), "rb").read()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_worst_tensors_come_from_the_debugger_sorted(run_dir):
    worst = json.load(open(os.path.join(run_dir, "report.json")))["report"]["worst_tensors"]
    sqnr = [t["sqnr_db"] for t in worst if t["sqnr_db"] is not None]
    assert sqnr == sorted(sqnr) and sqnr[0] < report.LOSSLESS_DB
    assert {t["op"] for t in worst} >= {"CONV_2D", "FULLY_CONNECTED"}


def test_progress_bars_only_on_a_terminal():
    assert not progress.enabled()  # pytest captures stderr: no terminal, no bar
    code = ("import time\nfrom tfcompress.core import progress\n"
            "for _ in progress.progress(range(40), 40, 'working'): time.sleep(0.02)\n")
    switched_off = code.replace("import time\n", "import time\nfrom tfcompress.core import progress as p\n"
                                                 "p.set_enabled(False)\n")
    # The three processes at once (each imports TensorFlow): two on a terminal, one piped.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        on, off = (pool.submit(_run_in_pty, [sys.executable, "-c", snippet]) for snippet in (code, switched_off))
        piped = pool.submit(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert "working:" in on.result() and "working:" not in off.result()
        assert piped.result().returncode == 0 and piped.result().stderr == ""


def _run_in_pty(command: list[str]) -> str:
    """Runs `command` with a pseudo-terminal (80 columns) as stdout and stderr; returns what it wrote."""
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    process = subprocess.Popen(command, stdout=follower, stderr=follower, cwd=ROOT)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait()
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")
