"""Fine-tuning under tf.distribute: two workers as two local processes against one, the strategy object of the
API, and the cluster's bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from conftest import CALIBRATION, ROOT, SCALE

from tfcompress.core._keras import tf
from tfcompress.core.errors import InputError
from tfcompress.runs.optimize import OptimizeConfig, run_optimize
from tfcompress.training import distribute

WORKER_TIMEOUT_S = 420


def _flags(keras_file, train_npz, eval_npz, output_dir) -> list[str]:
    return [f"--keras_model={keras_file}", f"--train_data={train_npz}", f"--eval_data={eval_npz}",
            f"--input_scale={SCALE}", "--prune", "--final_sparsity=0.5", "--prune_epochs=2", "--qat",
            "--batch_size=64", "--latency_runs=0", f"--output_dir={output_dir}"]


def _report(output_dir) -> dict:
    with open(os.path.join(output_dir, "report.json")) as f:
        return json.load(f)


def _stage(report: dict, name: str) -> dict:
    return next(stage for stage in report["stages"] if stage["stage"] == name)


@pytest.mark.slow
def test_two_workers_match_one_worker_and_only_the_chief_writes(keras_file, train_npz, eval_npz, tmp_path):
    """The same prune + QAT fine-tune at the same global batch (64) on one process, then on two workers (32 each).

    The two workers start from a copy of the one-worker run as the chief's output directory, with every stage
    done, and nothing in the other worker's: they must agree to start from the first stage (a chief resuming
    alone would leave the worker waiting in its first fine-tune, and the test would time out)."""
    one, two = tmp_path / "one", tmp_path / "two"
    alone = run_optimize(OptimizeConfig(
        output_dir=str(one), keras_model=keras_file, train_data=train_npz, eval_data=eval_npz, input_scale=SCALE,
        prune=True, final_sparsity=0.5, prune_epochs=2, qat=True, batch_size=64, latency_runs=0))
    shutil.copytree(one, two)
    copied = (two / "model.tflite").stat().st_mtime_ns
    workers = []
    for tf_config in distribute.loopback_tf_configs(2):
        env = dict(os.environ, TF_CONFIG=tf_config)
        workers.append(subprocess.Popen(
            [sys.executable, "-m", "pipelines", "optimize", *_flags(keras_file, train_npz, eval_npz, two),
             "--strategy=multi_worker"], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE))
    try:
        outputs = [worker.communicate(timeout=WORKER_TIMEOUT_S) for worker in workers]
    finally:
        for worker in workers:  # bounded: a worker still waiting for its peer is killed, not left behind
            if worker.poll() is None:
                worker.kill()
                worker.communicate()
    for worker, (_, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
    assert "trained as a worker; the chief writes the model and the report" in outputs[1][0]
    assert "verified" in outputs[0][0] and "resumed after" not in outputs[0][0]

    # The chief wrote the run again; the worker's scratch folder and the fine-tunes' checkpoints are gone.
    assert (two / "model.tflite").stat().st_mtime_ns > copied
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert not (two / ".workers").exists() and not (two / "stages" / "backup").exists()
    report, single = _report(two), _report(one)
    assert report["resumed_after"] is None
    assert report["distribution"] == {"strategy": "multi_worker", "replicas": 2, "workers": 2, "global_batch": 64,
                                      "per_replica_batch": 32, "written_by": "worker 0"}
    assert single["distribution"]["replicas"] == 1 and single["distribution"]["global_batch"] == 64

    # The pruning schedule counted global steps: the target is reached as on one machine.
    for name in ("prune", "qat"):
        assert _stage(report, name)["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert _stage(report, name)["sparsity"] == pytest.approx(_stage(single, name)["sparsity"], abs=0.005)
        assert _stage(report, name)["eval_accuracy"] == pytest.approx(_stage(single, name)["eval_accuracy"],
                                                                      abs=0.02)
    assert _stage(report, "convert")["eval_accuracy"] >= _stage(single, "convert")["eval_accuracy"] - 0.02

    # The chief's .tflite is the verified full-int8 model, uint8 in and out.
    interpreter = Interpreter(model_path=str(two / "model.tflite"))
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    assert interpreter.get_output_details()[0]["dtype"] == np.uint8
    assert alone.model_path == str(one / "model.tflite")


def test_a_strategy_object_trains_the_stages_in_its_scope(keras_file, train_npz, eval_npz, tmp_path):
    """`run_optimize(config, strategy=...)`: the model is made again in the strategy's scope, pruned, converted."""
    result = run_optimize(OptimizeConfig(
        output_dir=str(tmp_path / "out"), keras_model=keras_file, train_data=train_npz, eval_data=eval_npz,
        input_scale=SCALE, prune=True, final_sparsity=0.5, prune_epochs=1, batch_size=64, latency_runs=0,
        calibration_data=str(CALIBRATION), calibration_key="x", max_accuracy_drop=0.02),
        strategy=tf.distribute.MirroredStrategy(["/cpu:0"]))
    report = _report(tmp_path / "out")
    assert report["distribution"] == {"strategy": "MirroredStrategy", "replicas": 1, "workers": 1,
                                      "global_batch": 64, "per_replica_batch": 64, "written_by": "chief"}
    assert _stage(report, "prune")["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert _stage(report, "convert")["eval_accuracy"] > 0.8
    assert os.path.isfile(result.model_path)


@pytest.mark.parametrize("tf_config, message", [
    (None, "--strategy=multi_worker needs the cluster: set TF_CONFIG on every worker"),
    ("{cluster", "TF_CONFIG is not JSON"),
    ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG needs a 'cluster'"),
    ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 2}}',
     r"names this task worker 2, which is not in its cluster \(worker \(2\)\)"),
    ('{"cluster": {"chief": ["a:1"]}, "task": {"type": "worker", "index": 0}}',
     "names this task worker 0, which is not in its cluster"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:1"]}, "task": {"type": "ps", "index": 0}}',
     "trains on 'chief' and 'worker' tasks only"),
])
def test_a_cluster_that_does_not_hold_this_worker_is_refused(tf_config, message):
    environ = {} if tf_config is None else {"TF_CONFIG": tf_config}
    with pytest.raises(InputError, match=message):
        distribute.check_cluster("multi_worker", "tf_config", environ)


def test_slurm_outside_a_job_a_resolver_without_workers_and_measured_channels_are_refused():
    with pytest.raises(InputError, match="is not in one .no SLURM_PROCID"):
        distribute.check_cluster("multi_worker", "slurm", {})
    with pytest.raises(ValueError, match="it needs strategy='multi_worker'"):
        OptimizeConfig(output_dir="out", train_data="train.npz", keras_model="m.keras", prune=True,
                       cluster_resolver="slurm")
    with pytest.raises(ValueError, match="each worker would time it differently"):
        OptimizeConfig(output_dir="out", train_data="train.npz", keras_model="m.keras", prune_channels="auto",
                       target_latency=0.5, strategy="multi_worker")


def test_a_batch_that_does_not_split_over_the_workers_exits_2_before_waiting_for_them(keras_file, train_npz,
                                                                                       tmp_path):
    env = dict(os.environ, TF_CONFIG=distribute.loopback_tf_configs(2)[0])  # nobody listens: the check comes first
    done = subprocess.run([sys.executable, "-m", "pipelines", "optimize", f"--keras_model={keras_file}",
                           f"--train_data={train_npz}", "--prune", "--batch_size=63", "--strategy=multi_worker",
                           f"--output_dir={tmp_path / 'out'}"], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=WORKER_TIMEOUT_S)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "tfcompress optimize: error: --batch_size=63 is the global batch, split evenly over the 2 replicas of "
        "--strategy=multi_worker, and does not divide by 2: pass a multiple of 2 (e.g. 62)."]
    assert not (tmp_path / "out").exists()
