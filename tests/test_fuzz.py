"""Fuzzing: malformed .tflite files and calibration arrays end in one-line TfcompressErrors, never a crash.

Mutations of a real int8 model (bit flips, truncation, zeroed ranges, uoffsets, vector lengths, indices,
Buffer sizes) go through read_tflite, inspection, LiteRT verification and the TFLM export; mutated
calibration arrays through the loader. Hypothesis draws the cases, derandomized and bounded; the
10,000-case run is `tfcompress fuzz`.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT
from tfcompress.analysis import fuzz
from tfcompress.analysis.inspection import inspect_tflite
from tfcompress.conversion.calibration import MAX_ABS_VALUE, preprocess
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.conversion.verify import run_tflite
from tfcompress.core import litert_probe
from tfcompress.core.errors import CalibrationDataError, ModelLoadError, TfcompressError
from tfcompress.core.model_io import load_model
from tfcompress.core.tflite_model import read_tflite
from tfcompress.targets import export

_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)
_INTS = st.integers(0, 2**62)


@pytest.fixture(scope="module")
def int8_data(trained_model, calibration_samples) -> bytes:
    return convert(load_model(trained_model), ConvertConfig(), calibration_samples[:100])


@pytest.fixture(scope="module")
def fields(int8_data) -> fuzz.Fields:
    return fuzz.field_positions(int8_data)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _one_line(error: TfcompressError) -> None:
    assert "\n" not in str(error) and str(error).strip(), repr(error)


def _refused(error: TfcompressError) -> None:
    """A refusal of a bad file: one line, exit code 2."""
    _one_line(error)
    assert isinstance(error, ModelLoadError) and error.exit_code == 2, repr(error)


_counter = itertools.count()


def _write(workdir, data: bytes) -> str:
    path = workdir / f"case{next(_counter)}.tflite"
    path.write_bytes(data)
    return str(path)


def test_field_walk_finds_the_structure(int8_data, fields):
    model = read_tflite(int8_data)
    assert len(fields.lengths) > len(model.tensors) and len(fields.uoffsets) > len(model.tensors)
    assert len(fields.indices) >= len(model.tensors)


@settings(max_examples=200, **_SETTINGS)
@given(kind=st.sampled_from(fuzz.KINDS), a=_INTS, b=_INTS, c=_INTS)
def test_mutated_files_are_read_and_inspected_or_refused_in_one_line(int8_data, fields, kind, a, b, c):
    data = fuzz.mutate(int8_data, fields, kind, a, b, c)
    try:
        read_tflite(data)
        inspect_tflite(data)
    except TfcompressError as e:
        _refused(e)


@settings(max_examples=25, **_SETTINGS)
@given(kind=st.sampled_from(fuzz.KINDS[3:]), a=_INTS, b=_INTS, c=_INTS)
def test_mutated_files_are_verified_or_refused_in_one_line(int8_data, fields, calibration_samples, workdir, kind,
                                                           a, b, c):
    path = _write(workdir, fuzz.mutate(int8_data, fields, kind, a, b, c))
    try:
        run_tflite(path, calibration_samples[:8])
    except TfcompressError as e:
        _one_line(e)


@settings(max_examples=6, **_SETTINGS)
@given(kind=st.sampled_from(("index", "vector_length", "bit_flip")), a=_INTS, b=_INTS, c=_INTS)
def test_mutated_files_are_exported_or_refused_in_one_line(int8_data, fields, workdir, kind, a, b, c):
    path = _write(workdir, fuzz.mutate(int8_data, fields, kind, a, b, c))
    try:
        export.run_export(export.ExportConfig(tflite=path, output_dir=str(workdir / f"out{next(_counter)}")))
    except TfcompressError as e:
        _one_line(e)


@settings(max_examples=60, **_SETTINGS)
@given(kind=st.sampled_from(fuzz.CALIBRATION_KINDS), a=_INTS, seed=_INTS, suffix=st.sampled_from([".npy", ".npz"]))
def test_mutated_calibration_arrays_are_loaded_or_refused_in_one_line(workdir, kind, a, seed, suffix):
    array, valid = fuzz.calibration_case(kind, a, np.random.default_rng(seed))
    folder = workdir / f"cal{next(_counter)}"
    folder.mkdir()
    if valid:
        assert fuzz.load_calibration_case(array, str(folder), suffix).samples.shape[1:] == (28, 28, 1)
        return
    with pytest.raises(CalibrationDataError) as e:
        fuzz.load_calibration_case(array, str(folder), suffix)
    _one_line(e.value)
    assert e.value.exit_code == 2


def test_structural_errors_name_the_problem_and_the_fix(int8_data, fields):
    model = read_tflite(int8_data)
    weights = next(t for t in model.tensors if t.is_constant and t.dtype == "int8" and len(t.shape) == 4)
    # The weights' buffer: shrink its data vector's length prefix to 12 bytes.
    raw = model.root.buffers[model.root.subgraphs[0].tensors[weights.index].buffer].data
    lengths = [p for p in fields.lengths if int.from_bytes(int8_data[p:p + 4], "little") == len(raw)]
    damaged = fuzz.set_u32(int8_data, lengths[0], 12)
    message = (rf"the model bytes is a corrupt TFLite flatbuffer: tensor {weights.index}'s buffer holds 12 bytes, "
               rf"its shape \({', '.join(map(str, weights.shape))}\) int8 needs {int(np.prod(weights.shape))}\. "
               r"The file is corrupt or truncated: convert the model again\.")
    with pytest.raises(ModelLoadError, match=message):
        read_tflite(damaged)
    with pytest.raises(ModelLoadError, match=r"is a corrupt TFLite flatbuffer \(.*\)\. The file is corrupt or "
                                             r"truncated: convert the model again\."):
        read_tflite(int8_data[: len(int8_data) // 3])


def test_huge_calibration_values_are_refused():
    raw = np.ones((2, 3), np.float32)
    raw[1, 2] = 5e7
    limit = re.escape(f"+-{MAX_ABS_VALUE:.0e}")
    with pytest.raises(CalibrationDataError, match=rf"Samples from x\.npy contain 1 value\(s\) beyond {limit} "
                                                   r"after preprocessing \(first 5e\+07 at index \(1, 2\)\)\. "
                                                   r"Expected normalized model inputs"):
        preprocess(raw, source="x.npy")


def _crashing_mutant(int8_data, fields, workdir) -> str | None:
    """The first seeded mutant that read_tflite accepts and that crashes LiteRT in the guarded child."""
    rng = np.random.default_rng(0)
    with litert_probe.ProbeServer(timeout_s=30) as server:
        for _ in range(1500):  # index mutations crash LiteRT most often (measured: 4 in about 140)
            kind = "index"
            a, b, c = (int(x) for x in rng.integers(0, 1 << 62, size=3))
            data = fuzz.mutate(int8_data, fields, kind, a, b, c)
            try:
                read_tflite(data)
            except ModelLoadError:
                continue
            path = _write(workdir, data)
            # A crash in the shared child may come from an earlier file's damage: confirm it in a fresh one.
            if server.check(path).status == "crashed" and litert_probe.probe_file(path).status == "crashed":
                return path
    return None


def test_a_file_that_crashes_the_interpreter_is_one_line_in_process_and_in_the_cli(int8_data, fields, workdir,
                                                                                   calibration_samples):
    bad = workdir / "truncated.tflite"
    bad.write_bytes(int8_data[: len(int8_data) // 2])
    commands = [[sys.executable, "-m", "pipelines", "inspect", str(bad)],
                [sys.executable, "-m", "pipelines", "export", f"--tflite={bad}", f"--output_dir={workdir / 'e1'}"]]
    crashing = _crashing_mutant(int8_data, fields, workdir)
    if crashing is not None:
        commands.append([sys.executable, "-m", "pipelines", "export", f"--tflite={crashing}",
                         f"--output_dir={workdir / 'e2'}"])
    processes = [subprocess.Popen(c, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for c in commands]
    if crashing is not None:
        with pytest.raises(ModelLoadError, match=r"made the TFLite interpreter crash \(signal \d+, SIG[A-Z]+\) on "
                                                 r"its first allocate_tensors\(\) and invoke\(\), run in a child "
                                                 r"process: the file is corrupt or uses an op this runtime cannot "
                                                 r"run: convert the model again\."):
            run_tflite(crashing, calibration_samples[:4])
    for command, process in zip(commands, processes):
        out, err = process.communicate(timeout=300)
        assert process.returncode == 2, (command, err)
        assert err.strip().count("\n") == 0 and "Traceback" not in err, err
        assert "error:" in err and ("corrupt TFLite flatbuffer" in err or "crash" in err), err
    assert crashing is not None, "no seeded mutant crashed LiteRT: the guard was not exercised"
