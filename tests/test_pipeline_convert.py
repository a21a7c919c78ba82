"""End to end: `pipelines/convert.py` (and `tfcompress convert`) on a real SavedModel and real MNIST.

Each bad input gets one clear line, exit code 2 and nothing written; a failed verification exits 1 and
leaves no model.tflite; a success writes a uint8-I/O, integer-only model.tflite and report.json.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver

from conftest import CALIBRATION, SCALE
from pipelines import _common
from pipelines import convert as convert_script
from tfcompress.core.errors import (
    CalibrationDataError,
    MicroTargetError,
    ModelLoadError,
    OutputPathError,
)
from tfcompress.runs.pipeline import ConvertPipelineConfig, run_convert
from tfcompress.core import tflite_model
from tfcompress.core.tflite_model import read_tflite
from tfcompress.core.model_io import load_model
from tfcompress.targets import export as micro_export


def _config(saved_model_dir, eval_npz, output_dir, **overrides) -> ConvertPipelineConfig:
    values = dict(
        output_dir=str(output_dir), saved_model_dir=saved_model_dir, calibration_data=str(CALIBRATION),
        calibration_key="x", eval_data=eval_npz, input_scale=SCALE, num_calibration_samples=200,
    )
    values.update(overrides)
    return ConvertPipelineConfig(**values)


def _run_cli(argv: list[str]) -> int:
    """Runs the convert script in this process, as `tfcompress convert` would, and returns its exit code."""
    with flagsaver.flagsaver():
        for name in flags.FLAGS:
            flags.FLAGS[name].unparse()
        with pytest.raises(SystemExit) as e:
            _common.run(convert_script.main, argv=["tfcompress convert", *argv])
    return e.value.code or 0


def test_script_writes_verified_uint8_model_and_report(saved_model_dir, eval_npz, tmp_path, capsys):
    out = tmp_path / "out"
    code = _run_cli([f"--saved_model_dir={saved_model_dir}", f"--calibration_data={CALIBRATION}",
                     "--calibration_key=x", f"--input_scale={SCALE}", f"--eval_data={eval_npz}",
                     f"--output_dir={out}", "--max_accuracy_drop=0.01", "--debug_layers"])
    assert code == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["accuracy_vs_size.png", "debug.json", "layer_sparsity.png", "model.tflite",
                                       "quantization_error.png", "recipe.yaml", "report.json", "report.md"]
    parsed = read_tflite(out / "model.tflite")
    assert {parsed.tensors[i].dtype for i in parsed.inputs + parsed.outputs} == {"uint8"}
    io = set(parsed.inputs) | set(parsed.outputs)
    assert {t.dtype for t in parsed.tensors if t.index not in io} <= {"int8", "int32"}
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] is True and report["failures"] == []
    assert report["model"]["bytes"] == (out / "model.tflite").stat().st_size
    assert report["config"]["io_dtype"] == "uint8"
    # A dense model: only weights that round to zero in int8 are zeros.
    assert set(report["model"]["weight_sparsity"]) == {"small_cnn/conv/Conv2D", "small_cnn/fc/MatMul",
                                                       "small_cnn/logits/MatMul"}
    assert all(0.0 <= v < 0.2 for v in report["model"]["weight_sparsity"].values())
    acc = report["accuracy"]
    assert acc["num_samples"] == 1000
    assert 0.0 <= acc["tflite_accuracy"] <= 1.0 and abs(acc["accuracy_drop"]) <= 0.01
    assert "verified" in capsys.readouterr().out


def test_same_inputs_and_seed_give_identical_files(saved_model_dir, eval_npz, tmp_path):
    first = run_convert(_config(saved_model_dir, eval_npz, tmp_path / "a", seed=3))
    second = run_convert(_config(saved_model_dir, eval_npz, tmp_path / "b", seed=3))
    assert open(first.model_path, "rb").read() == open(second.model_path, "rb").read()
    # Without --debug_layers the QuantizationDebugger does not run, and the report says so.
    assert not os.path.exists(tmp_path / "a" / "debug.json")
    assert first.report["not_run"] == ["per-tensor quantization error (QuantizationDebugger): not asked; "
                                       "--debug_layers runs it (it converts the model twice more)"]
    assert "Not run: per-tensor quantization error (QuantizationDebugger): not asked" in (
        tmp_path / "a" / "report.md").read_text()
    timings = first.report["timings"]
    assert set(timings) == {"load_seconds", "convert_seconds", "calibration_seconds", "float_reference_seconds",
                            "float_reference_wait_seconds", "verify_seconds", "report_seconds"}
    assert 0 < timings["calibration_seconds"] < timings["convert_seconds"]
    # The float model ran on the evaluation data while the converter ran, and verify used those outputs.
    assert first.verification.accuracy.num_samples == 1000 and timings["float_reference_seconds"] > 0


@pytest.mark.parametrize("mode, io_dtype", [
    ("int8", "int8"), ("int8", "float32"), ("int16x8", "int16"), ("dynamic", "float32"),
    ("float16", "float32"), ("float32", "float32")])
def test_every_mode_through_the_pipeline(saved_model_dir, eval_npz, tmp_path, mode, io_dtype):
    result = run_convert(_config(saved_model_dir, eval_npz, tmp_path, mode=mode, io_dtype=io_dtype))
    assert result.verification.inputs[0]["dtype"] == io_dtype
    assert abs(result.verification.accuracy.accuracy_drop) <= 0.01


def test_failed_verification_exits_1_and_leaves_no_model(saved_model_dir, eval_npz, tmp_path, capsys):
    # Calibrating on blank images gives the activations useless ranges: the int8 model is wrong.
    blank = tmp_path / "blank.npz"
    np.savez(blank, x=np.zeros((50, 28, 28, 1), np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.tflite").write_bytes(b"stale model from an earlier run")
    code = _run_cli([f"--saved_model_dir={saved_model_dir}", f"--calibration_data={blank}",
                     f"--input_scale={SCALE}", f"--eval_data={eval_npz}", f"--output_dir={out}",
                     "--overwrite"])
    err = capsys.readouterr().err
    assert code == 1
    assert "verification failed (1 check(s))" in err and "FAILED accuracy_drop: float" in err
    assert "Traceback" not in err
    assert not (out / "model.tflite").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] is False and report["model"]["file"] is None
    # A failed gate runs the QuantizationDebugger: debug.json shows which tensors lost the most.
    assert report["debug"] == "debug.json: per-tensor quantization error, measured because a check failed"
    assert json.loads((out / "debug.json").read_text())["layers"]


def _bad(tmp_path, name, array=None, content=None):
    path = tmp_path / name
    if array is not None:
        np.savez(path, x=array) if name.endswith(".npz") else np.save(path, array)
    elif content is not None:
        path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("case, error, message", [
    ("missing_model", ModelLoadError, r"Model not found: .*nowhere\. Pass an existing SavedModel"),
    ("corrupt_model", ModelLoadError, r"Cannot load SavedModel .*corrupt or incomplete: save the model again"),
    ("not_savedmodel", ModelLoadError, r"is not a SavedModel directory \(no saved_model\.pb\)"),
    ("calibration_missing", CalibrationDataError, r"not found"),
    ("calibration_empty", CalibrationDataError, r"(?i)empty|0 samples"),
    ("calibration_rank", CalibrationDataError, r"(?i)rank|shape"),
    ("calibration_shape", CalibrationDataError, r"\(N, 28, 28, 1\)"),
    ("calibration_channels", CalibrationDataError, r"(?i)channels"),
    ("calibration_nan", CalibrationDataError, r"NaN"),
    ("calibration_inf", CalibrationDataError, r"Inf"),
    ("calibration_text", CalibrationDataError, r"(?i)numeric"),
    ("labels_length", CalibrationDataError, r"has 1000 samples but 999 labels"),
    ("output_is_file", OutputPathError, r"is a file, not a directory"),
    ("output_not_writable", OutputPathError, r"(?i)not writable"),
    ("output_exists", OutputPathError, r"model\.tflite already exists\. Pass --overwrite"),
    ("no_calibration", CalibrationDataError, r"int8 mode needs calibration data .*pass --calibration_data"),
])
def test_bad_input_is_one_line_and_writes_nothing(saved_model_dir, eval_npz, tmp_path, case, error, message):
    out = tmp_path / "out"
    overrides: dict = {}
    if case == "missing_model":
        overrides["saved_model_dir"] = str(tmp_path / "nowhere")
    elif case == "corrupt_model":
        bad = tmp_path / "corrupt"
        bad.mkdir()
        (bad / "saved_model.pb").write_bytes(b"\x08garbage that is not a protobuf")
        overrides["saved_model_dir"] = str(bad)
    elif case == "not_savedmodel":
        (tmp_path / "empty_dir").mkdir()
        overrides["saved_model_dir"] = str(tmp_path / "empty_dir")
    elif case == "calibration_missing":
        overrides["calibration_data"] = str(tmp_path / "nothing.npz")
    elif case.startswith("calibration_"):
        arrays = {
            "calibration_empty": np.zeros((0, 28, 28, 1), np.uint8),
            "calibration_rank": np.zeros((50, 784), np.uint8),
            "calibration_shape": np.zeros((50, 32, 32, 1), np.uint8),
            "calibration_channels": np.zeros((50, 28, 28, 3), np.uint8),
            "calibration_nan": np.full((50, 28, 28, 1), np.nan, np.float32),
            "calibration_inf": np.full((50, 28, 28, 1), np.inf, np.float32),
            "calibration_text": np.full((50, 28, 28, 1), "a"),
        }
        overrides["calibration_data"] = _bad(tmp_path, "cal.npz", arrays[case])
    elif case == "labels_length":
        with np.load(eval_npz) as d:
            np.savez(tmp_path / "eval.npz", x_test=d["x_test"], y_test=d["y_test"][:-1])
        overrides["eval_data"] = str(tmp_path / "eval.npz")
    elif case == "output_is_file":
        out.write_text("a file")
    elif case == "output_not_writable":
        out = "/proc/tfcompress-cannot-write-here"  # not creatable, even by root
    elif case == "output_exists":
        out.mkdir()
        (out / "model.tflite").write_bytes(b"earlier")
    elif case == "no_calibration":
        overrides["calibration_data"] = None
    before = sorted(os.listdir(out)) if os.path.isdir(out) else None
    with pytest.raises(error, match=message) as e:
        run_convert(_config(overrides.pop("saved_model_dir", saved_model_dir), eval_npz, out, **overrides))
    assert "\n" not in str(e.value)
    assert e.value.exit_code == 2
    after = sorted(os.listdir(out)) if os.path.isdir(out) else None
    assert after == before


def test_bad_flags_exit_2_with_one_line(capsys, tmp_path):
    assert _run_cli([f"--output_dir={tmp_path}", "--mode=int4"]) == 2
    assert _run_cli([f"--output_dir={tmp_path}", "--max_accuracy_drop=5"]) == 2
    assert _run_cli([f"--output_dir={tmp_path}"]) == 2  # no model given
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("tfcompress convert: error: ") for line in err)
    assert "Give exactly one model: --saved_model_dir or --keras_model" in err[2]
    assert os.listdir(tmp_path) == []


def test_console_script_reaches_the_same_pipeline(saved_model_dir, eval_npz, tmp_path):
    """The installed `tfcompress convert` entry point, in a real subprocess."""
    command = [os.path.join(os.path.dirname(sys.executable), "tfcompress"), "convert",
               f"--saved_model_dir={saved_model_dir}", f"--calibration_data={CALIBRATION}",
               "--calibration_key=x", f"--input_scale={SCALE}", f"--output_dir={tmp_path / 'cli'}",
               "--num_calibration_samples=100"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cli" / "model.tflite").is_file()
    missing = subprocess.run(command[:2] + ["--saved_model_dir=/nonexistent", f"--output_dir={tmp_path}/x"],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "tfcompress convert: error: Model not found: /nonexistent. Pass an existing SavedModel directory "
        "or .keras/.h5 file."]


def test_help_lists_the_script_flags_and_exits_0(capsys):
    assert _run_cli(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--saved_model_dir", "--calibration_data", "--max_accuracy_drop", "--io_dtype", "--[no]verbose"):
        assert flag in out


def test_target_micro_ends_with_firmware_checked_in_tflm(saved_model_dir, eval_npz, tmp_path, capsys, monkeypatch):
    parses = collections.Counter()
    real_parse = tflite_model._parse

    def counting_parse(data, source):
        parses[hashlib.sha256(data).hexdigest()] += 1
        return real_parse(data, source)

    monkeypatch.setattr(tflite_model, "_parse", counting_parse)
    out = tmp_path / "out"
    code = _run_cli([f"--saved_model_dir={saved_model_dir}", f"--calibration_data={CALIBRATION}",
                     "--calibration_key=x", f"--input_scale={SCALE}", f"--eval_data={eval_npz}",
                     "--num_eval_samples=200", f"--output_dir={out}", "--target=micro"])
    assert code == 0, capsys.readouterr().err
    assert sorted(os.listdir(out / "micro")) == ["manifest.json", "model.tflite", "model_model_data.cc",
                                                 "model_model_data.h", "model_op_resolver.h"]
    assert (out / "micro" / "model.tflite").read_bytes() == (out / "model.tflite").read_bytes()
    report = json.loads((out / "report.json").read_text())
    micro = report["micro"]
    assert micro["tflm_check"]["num_samples"] == 200 and micro["tflm_check"]["top1_agreement"] >= 0.999
    assert micro["arena"]["recorded_bytes"] < micro["arena"]["arena_bytes"]
    # With labels, TFLM's own accuracy is gated against the float model's like LiteRT's.
    tflm = micro["tflm_accuracy"]
    assert tflm["num_samples"] == 200 and tflm["float_accuracy"] == report["accuracy"]["float_accuracy"]
    assert tflm["accuracy_drop"] <= tflm["max_accuracy_drop"] == 0.01
    assert abs(tflm["tflm_accuracy"] - report["accuracy"]["tflite_accuracy"]) <= 0.01
    assert "micro: flash" in capsys.readouterr().out
    # One parse of the shipped flatbuffer for the whole run: convert's guard, verify, the TFLM export and
    # the report all take the parsed model (the debugger parses only its own models).
    assert parses[report["model"]["sha256"]] == 1, parses


def test_target_micro_checks_a_seeded_subset_with_float_accuracy_on_the_same_samples(saved_model_dir, eval_npz,
                                                                                      tmp_path):
    config = _config(saved_model_dir, eval_npz, tmp_path / "out", target="micro", tflm_samples=300, latency_runs=0,
                     debug_layers=False)
    micro = run_convert(config).report["micro"]
    assert micro["tflm_subset"]["num_samples"] == 300 and micro["tflm_subset"]["of"] == 1000
    assert micro["tflm_check"]["num_samples"] == micro["tflm_accuracy"]["num_samples"] == 300
    assert micro["tflm_check"]["samples"].startswith("300 of 1000 evaluation samples, drawn with seed 0")
    # The TFLM accuracy gate compares like with like: the float model's accuracy on those 300 images.
    indices = micro_export.tflm_subset(1000, 300, seed=0)
    with np.load(eval_npz) as d:
        images, labels = d["x_test"][indices].astype(np.float32)[..., None] * SCALE, d["y_test"][indices]
    expected = np.mean(load_model(saved_model_dir).predict(images).argmax(1) == labels)
    assert micro["tflm_accuracy"]["float_accuracy"] == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError, match=r"Received: tflm_samples=0"):
        _config(saved_model_dir, eval_npz, tmp_path / "bad", target="micro", tflm_samples=0)


def test_target_micro_refuses_a_float_mode_before_any_work(saved_model_dir, tmp_path, capsys):
    code = _run_cli([f"--saved_model_dir={saved_model_dir}", f"--output_dir={tmp_path / 'o'}",
                     "--target=micro", "--mode=float16"])
    assert code == 2
    assert "--target micro needs a full-integer model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_without_eval_data_held_out_calibration_samples_check_fidelity(saved_model_dir, tmp_path):
    result = run_convert(_config(saved_model_dir, None, tmp_path / "out", eval_data=None, latency_runs=0,
                                 debug_layers=False))
    report = json.loads(open(result.report_path).read())
    fidelity = report["fidelity"]
    # A fifth of the 500 shipped calibration images is held out; calibration draws from the other 400.
    assert fidelity["num_samples"] == 100
    assert fidelity["source"] == f"100 calibration-source samples not used for calibration ({CALIBRATION})"
    (output,) = fidelity["outputs"]
    assert set(output) == {"name", "shape", "classifier", "top1_agreement", "sqnr_db", "max_abs_error",
                           "mean_abs_error"}
    assert output["shape"] == [10] and output["sqnr_db"] >= 15.0
    assert report["accuracy"] is None and report["num_calibration_samples_used"] == 200
    assert [c for c in report["checks"] if c["name"] == "fidelity"][0]["passed"]
    # Same inputs, same bytes: the held-out draw is seeded too.
    again = run_convert(_config(saved_model_dir, None, tmp_path / "again", eval_data=None, latency_runs=0,
                                debug_layers=False))
    assert open(again.model_path, "rb").read() == open(result.model_path, "rb").read()


def test_unlabelled_fidelity_with_too_few_held_out_samples_is_refused(saved_model_dir, tmp_path):
    small = tmp_path / "small.npz"
    with np.load(CALIBRATION) as d:
        np.savez(small, x=d["x"][:40])  # a fifth is 8 samples: too few to compare anything
    with pytest.raises(CalibrationDataError, match=r"needs at least 10 held-out samples, but .*small\.npz leaves "
                                                   r"only 8 after calibration: pass --eval_data, or calibration "
                                                   r"data with more samples\."):
        run_convert(_config(saved_model_dir, None, tmp_path / "out", eval_data=None, calibration_data=str(small)))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_model_that_crashes_tflite_micro_is_refused_in_one_line(tmp_path):
    """MobileNetV2 (0.35, 96x96, random weights) makes this tflite-micro build abort in its Interpreter
    constructor (SIGABRT); LiteRT runs it. `convert --target=micro` must refuse it, not die with it."""
    from tfcompress.core._keras import keras

    keras.utils.set_random_seed(0)
    path = tmp_path / "mobilenet_v2.keras"
    keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=0.35, weights=None, classes=10).save(path)
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).random((100, 96, 96, 3), dtype=np.float32))
    out = tmp_path / "out"
    with pytest.raises(MicroTargetError, match=r"The converted model made the TFLite Micro interpreter crash \("
                                               r"signal 6, SIGABRT\).*drop --target=micro") as e:
        run_convert(ConvertPipelineConfig(output_dir=str(out), keras_model=str(path),
                                          calibration_data=str(tmp_path / "cal.npz"), calibration_key="x",
                                          num_calibration_samples=20, target="micro", latency_runs=0,
                                          # random weights: the fidelity gates are not what is tested here
                                          min_top1_agreement=0.0, min_output_sqnr_db=-200.0))
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    assert not out.exists()
