"""Kills and faults on real runs: SIGKILL at fixed points of `convert`, `optimize` and `export`, then a rerun;
a damaged stage file; a file-size limit; two runs on one output directory.

The kill points are the k-th atomic write of a run (`TFCOMPRESS_FAULT_KILL_AT_WRITE=k`, see
`tfcompress.core.artefacts`): the process truncates that write's temporary file to half and SIGKILLs itself
before the rename, the worst moment for a file. Each sweep kills runs on one output directory in turn, each
run the rerun of the one killed before it (with the same flags), later and later; after every kill no file at
a final path is truncated or unparseable; a last rerun exits 0 and its model verifies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import CALIBRATION, ROOT, SCALE
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.core import artefacts
from tfcompress.core.model_io import load_model
from tfcompress.core.tflite_model import read_tflite
from tfcompress.runs.optimize import OptimizeConfig, run_optimize

KILLED = -signal.SIGKILL
_FAULT_VARIABLES = (artefacts.FAULT_KILL_ENV, artefacts.FAULT_STOP_ENV)


def _env(**faults: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _FAULT_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env.update({name: str(value) for name, value in faults.items()})
    return env


def _run(arguments: list[str], preexec_fn=None, **faults: int) -> subprocess.CompletedProcess:
    """`tfcompress <verb> ...` in a child process (`python -m pipelines`), with fault variables set."""
    return subprocess.run([sys.executable, "-m", "pipelines", *arguments], cwd=ROOT, env=_env(**faults),
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn)


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _damaged(directory) -> list[str]:
    """Every file at a final path under `directory` that does not parse whole; [] when all do.

    Temporary files (`.<name>.partial-*`) and the lock file are not final paths. Stage files recorded in
    `stages/state.json` must match their recorded sha256 and size.
    """
    problems = []
    for root, _, names in os.walk(directory):
        for name in sorted(names):
            if name.startswith("."):
                continue
            path = os.path.join(root, name)
            try:
                data = open(path, "rb").read()
                if name.endswith(".tflite"):
                    read_tflite(data)
                elif name.endswith(".json"):
                    json.loads(data)
                elif name.endswith(".png"):
                    with Image.open(path) as image:
                        image.verify()
                    assert data.endswith(b"IEND\xaeB`\x82"), "no PNG end chunk"
                elif name.endswith(".h5"):
                    import h5py

                    with h5py.File(path, "r") as f:
                        assert "model_weights" in f, "no model_weights group"
                elif name.endswith(".npz"):
                    with np.load(path) as archive:
                        [archive[key] for key in archive.files]
                elif name.endswith((".cc", ".h")):
                    text = data.decode()
                    assert text.count("{") == text.count("}") and text.endswith("\n"), "unbalanced C file"
                elif name.endswith(".md"):
                    assert data.decode().endswith("\n"), "report.md ends mid-line"
            except Exception as e:  # any failure to parse is the finding
                problems.append(f"{path}: {type(e).__name__}: {e}")
    state_path = os.path.join(directory, "stages", "state.json")
    if os.path.exists(state_path):
        for entry in json.loads(open(state_path).read())["completed"]:
            if (_sha256(entry["artefact"]), os.path.getsize(entry["artefact"])) != (
                    entry["artefact_sha256"], entry["artefact_bytes"]):
                problems.append(f"{entry['artefact']}: checksum differs from state.json")
    return problems


def _partials(directory) -> list[str]:
    return [name for _, _, names in os.walk(directory) for name in names if artefacts.PARTIAL in name]


def _sweep(arguments: list[str], directory, kill_points: tuple[int, ...], after_kill=None) -> int:
    """Kills a run at each of `kill_points` in turn (each run the rerun of the last); returns the kills."""
    for number, k in enumerate(kill_points):
        killed = _run(arguments, **{artefacts.FAULT_KILL_ENV: k})
        assert killed.returncode == KILLED, (k, killed.returncode, killed.stderr[-2000:])
        assert _partials(directory), f"kill at write {k} left no temporary file: it was not mid-write"
        assert os.path.exists(os.path.join(directory, artefacts.LOCK_FILENAME))  # stale: the next run takes it
        assert _damaged(directory) == [], f"after the kill at write {k}"
        if after_kill is not None:
            after_kill(number, k)
    return len(kill_points)


@pytest.fixture(scope="module")
def int8_path(trained_model, calibration_samples, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("faults") / "small_cnn.tflite"
    path.write_bytes(convert(load_model(trained_model), ConvertConfig(), calibration_samples[:100]))
    return str(path)


def _convert_arguments(keras_file, eval_npz, output_dir) -> list[str]:
    return ["convert", f"--keras_model={keras_file}", f"--calibration_data={CALIBRATION}", "--calibration_key=x",
            f"--input_scale={SCALE}", f"--eval_data={eval_npz}", f"--output_dir={output_dir}",
            "--num_calibration_samples=100", "--latency_runs=0", "--nodebug_layers", "--overwrite"]


def _no_leftovers(directory) -> None:
    assert _partials(directory) == []
    assert not os.path.exists(os.path.join(directory, artefacts.LOCK_FILENAME))
    assert _damaged(directory) == []


def test_convert_killed_at_every_write_leaves_no_truncated_file_and_a_rerun_completes(keras_file, eval_npz,
                                                                                     tmp_path):
    out = tmp_path / "convert"
    arguments = _convert_arguments(keras_file, eval_npz, out)
    # A run writes model.tflite, report.json, report.md, two plots, then report.json again: killed mid-way
    # through the first, fourth (a plot) and sixth.
    kills = _sweep(arguments, out, (1, 4, 6))
    assert kills == 3
    done = _run(arguments)
    assert done.returncode == 0, done.stderr[-3000:]
    _no_leftovers(out)
    report = json.loads((out / "report.json").read_text())
    assert report["verified"] is True
    assert report["model"]["sha256"] == _sha256(out / "model.tflite")
    assert read_tflite(str(out / "model.tflite")).num_bytes == report["model"]["bytes"]


def test_export_killed_at_every_write_leaves_no_truncated_file_and_a_rerun_completes(int8_path, tmp_path):
    out = tmp_path / "export"
    arguments = ["export", f"--tflite={int8_path}", f"--output_dir={out}", "--num_eval_samples=5", "--overwrite"]
    # model_data.h, model_data.cc, op_resolver.h, model.tflite, manifest.json.
    kills = _sweep(arguments, out, (1, 2, 4, 5))
    assert kills == 4
    done = _run(arguments)
    assert done.returncode == 0, done.stderr[-3000:]
    _no_leftovers(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(os.listdir(out)) == manifest["files"]
    assert (out / "small_cnn.tflite").read_bytes() == open(int8_path, "rb").read()


def _optimize_arguments(keras_file, train_npz, eval_npz, output_dir) -> list[str]:
    return ["optimize", f"--keras_model={keras_file}", f"--train_data={train_npz}", f"--eval_data={eval_npz}",
            f"--input_scale={SCALE}", "--prune", "--final_sparsity=0.5", "--qat", "--prune_epochs=1",
            "--qat_epochs=1", "--batch_size=64", "--max_accuracy_drop=0.05", "--num_calibration_samples=100",
            "--latency_runs=0", f"--output_dir={output_dir}"]


@pytest.mark.slow
def test_optimize_killed_at_stage_candidate_and_final_writes_resumes_and_completes(keras_file, train_npz,
                                                                                  eval_npz, tmp_path):
    out = tmp_path / "optimize"
    arguments = _optimize_arguments(keras_file, train_npz, eval_npz, out)
    state_path = out / "stages" / "state.json"
    # Each run resumes after the last checksummed stage, so its writes count from there: 3 = mid prune.h5
    # (float.h5 and state.json done); 4 = mid state.json recording QAT (prune.h5 and qat.h5 written); 9 = inside
    # the candidates' conversions; 18 = mid the final model.tflite.
    recorded = (["float"], ["float", "prune"], ["float", "prune", "qat"], ["float", "prune", "qat"])

    def after_kill(number: int, k: int) -> None:
        assert [s["stage"] for s in json.loads(state_path.read_text())["completed"]] == recorded[number], k
        assert not (out / "model.tflite").exists()  # nothing shipped yet: no partial one at the final path

    kills = _sweep(arguments, out, (3, 4, 9, 18), after_kill)
    assert kills == 4
    done = _run(arguments)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed after stage qat" in done.stdout
    _no_leftovers(out)
    assert json.loads((out / "stages" / "convert" / "report.json").read_text())["verified"] is True
    assert _sha256(out / "model.tflite") == _sha256(out / "stages" / "convert" / "model.tflite")
    read_tflite(str(out / "model.tflite"))


def test_a_truncated_or_changed_stage_file_is_detected_and_that_stage_redone(keras_file, train_npz, eval_npz,
                                                                           tmp_path, caplog):
    config = OptimizeConfig(output_dir=str(tmp_path / "out"), train_data=train_npz, keras_model=keras_file,
                            eval_data=eval_npz, input_scale=SCALE, prune=True, final_sparsity=0.5, qat=True,
                            prune_epochs=1, qat_epochs=1, batch_size=64, max_accuracy_drop=0.05, latency_runs=0)
    run_optimize(config)
    stages = tmp_path / "out" / "stages"
    recorded = {s["stage"]: s for s in json.loads((stages / "state.json").read_text())["completed"]}
    assert recorded["prune"]["artefact_sha256"] == _sha256(stages / "prune.h5")
    assert recorded["prune"]["artefact_bytes"] == os.path.getsize(stages / "prune.h5")

    # Truncated: prune and QAT are redone; the float stage is kept.
    size = os.path.getsize(stages / "prune.h5")
    os.truncate(stages / "prune.h5", size // 2)
    with caplog.at_level(logging.WARNING, logger="tfcompress.runs.optimize"):
        again = run_optimize(config)
    assert again.resumed_after == "float"
    assert [s["stage"] for s in again.stages] == ["float", "prune", "qat", "convert"]
    lines = [r.getMessage() for r in caplog.records if r.name == "tfcompress.runs.optimize"]
    assert lines == [f"{stages / 'prune.h5'} is truncated or resized ({size // 2:,} bytes, {size:,} recorded): "
                     "redoing stage prune and those after it (qat)"]
    assert _damaged(tmp_path / "out") == []

    # Same size, one byte changed: only QAT is redone.
    caplog.clear()
    data = bytearray((stages / "qat.h5").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (stages / "qat.h5").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="tfcompress.runs.optimize"):
        third = run_optimize(config)
    assert third.resumed_after == "prune"
    lines = [r.getMessage() for r in caplog.records if r.name == "tfcompress.runs.optimize"]
    assert lines == [f"{stages / 'qat.h5'} has changed since it was recorded (its sha256 differs): redoing "
                     "stage qat"]
    assert _damaged(tmp_path / "out") == []


def _limit(size: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def test_a_file_size_limit_is_one_line_exit_2_and_leaves_no_partial_file(keras_file, eval_npz, int8_path,
                                                                         tmp_path):
    limit = 30_000  # below model.tflite, above report.json and the plots
    assert os.path.getsize(int8_path) > limit
    out = tmp_path / "limited"
    done = _run(_convert_arguments(keras_file, eval_npz, out), preexec_fn=_limit(limit))
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines() == [
        f"tfcompress convert: error: Cannot write {out / 'model.tflite'}: file too large. Free space (or raise "
        "the file-size limit, ulimit -f) or choose another --output_dir."]
    assert not out.exists()  # the run created it and left nothing in it: removed


def test_a_file_size_limit_inside_an_hdf5_stage_save_is_the_same_one_line_error(tmp_path):
    """Keras saves stage files through h5py, which reports the errno only in its message."""
    script = ("import h5py, numpy as np\n"
              "from tfcompress.core.artefacts import atomic_path\n"
              "from tfcompress.core.errors import OutputPathError\n"
              f"path = {str(tmp_path / 'stage.h5')!r}\n"
              "try:\n"
              "    with atomic_path(path) as tmp:\n"
              "        with h5py.File(tmp, 'w') as f:\n"
              "            f['w'] = np.zeros(100_000, np.float32)\n"
              "except OutputPathError as e:\n"
              "    print(e)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: (signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
                                                           _limit(50_000)()))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"Cannot write {tmp_path / 'stage.h5'}: file too large. Free space (or raise the "
                                   "file-size limit, ulimit -f) or choose another --output_dir.")
    assert os.listdir(tmp_path) == []  # neither the file nor its temporary one


def _stopped(pid: int, timeout: float = 240.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return True
        time.sleep(0.2)
    return False


def test_a_second_run_on_the_same_output_dir_refuses_naming_the_first(keras_file, eval_npz, tmp_path):
    out = tmp_path / "shared"
    arguments = _convert_arguments(keras_file, eval_npz, out)
    # The first run stops itself (SIGSTOP, holding its lock) at its first write, so the second surely meets it.
    first = subprocess.Popen([sys.executable, "-m", "pipelines", *arguments], cwd=ROOT,
                             env=_env(**{artefacts.FAULT_STOP_ENV: 1}), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _stopped(first.pid), "the first run never reached its first write"
        second = _run(arguments)
    finally:
        os.kill(first.pid, signal.SIGCONT)
        out_text, err_text = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"tfcompress convert: error: --output_dir {out} is in use by another tfcompress run "
                               f"(pid {first.pid}, `tfcompress convert`, started ")
    assert lines[0].endswith("): wait for it to finish or choose another --output_dir.")
    assert first.returncode == 0, err_text[-3000:]
    _no_leftovers(out)
    assert json.loads((out / "report.json").read_text())["verified"] is True
