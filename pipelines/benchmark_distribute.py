"""Benchmark the fine-tunes under tf.distribute: one worker against two on the same prune + QAT fine-tune.

Run with `tfcompress benchmark_distribute [--saved_model_dir=artefacts/demo/float_savedmodel]` (after `make demo`).
The demo's LeNet-5 is pruned to --final_sparsity over --prune_epochs and QAT fine-tuned for one epoch on the
first --train_samples images of the shipped MNIST training split, at the global batch --batch_size, evaluated on
the 10,000 test images. Once as one process on one core (`--strategy=none`), once as two worker processes on one
core each (`--strategy=multi_worker`, TF_CONFIG on loopback ports), one run after the other. Reported: wall time
of each run, seconds per epoch of each fine-tune (the stage's seconds over its epochs), final int8 accuracy and
sparsity, and the scaling to expect on a real cluster, on paper: every step all-reduces the gradients, one float32
per trainable parameter; a ring all-reduce sends 2(N-1)/N of those bytes per worker per step, so a step costs the
measured one-worker compute split N ways plus that transfer at the link's bandwidth. Writes
benchmark_distribute.{json,md} to --output_dir.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
from absl import flags

from pipelines import _benchmark, _common
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.models import baseline
from tfcompress.training import distribute

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_distribute", "Where the results go.")
_MODEL = flags.DEFINE_string("saved_model_dir", "artefacts/demo/float_savedmodel", "The trained LeNet-5 SavedModel "
                             "(the demo's).")
_TRAIN_SAMPLES = flags.DEFINE_integer("train_samples", 12000, "MNIST training images fine-tuned on (validation: "
                                      "the last 10% of them).", lower_bound=100)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Global batch (each of two workers trains on half of it).",
                              lower_bound=2)
_SPARSITY = flags.DEFINE_float("final_sparsity", 0.75, "Pruning target.", lower_bound=0.0, upper_bound=0.99)
_PRUNE_EPOCHS = flags.DEFINE_integer("prune_epochs", 2, "Epochs of the pruning fine-tune.", lower_bound=1)
_TIMEOUT = flags.DEFINE_integer("timeout_s", 1800, "Longest a run may take before its processes are killed.")
_LINKS_GBIT = (1, 10, 100)  # Ethernet links of typical clusters, Gbit/s
_WORKER_COUNTS = (2, 4, 8)
CALIBRATION = os.path.join("calibration_data", "mnist_calibration.npz")


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    output_dir = os.path.abspath(_OUTPUT.value)
    os.makedirs(output_dir, exist_ok=True)
    if not os.path.exists(_MODEL.value):
        raise FileNotFoundError(f"{_MODEL.value} not found: run `make demo` first, or pass --saved_model_dir.")
    train = os.path.join(output_dir, "train.npz")
    with np.load(baseline.MNIST_PATH) as d:
        np.savez(train, x_train=d["x_train"][:_TRAIN_SAMPLES.value], y_train=d["y_train"][:_TRAIN_SAMPLES.value])
    runs = {"1 worker": _run(1, os.path.join(output_dir, "one_worker"), train),
            "2 workers": _run(2, os.path.join(output_dir, "two_workers"), train)}
    for name, row in runs.items():
        print(f"{name}: {row}", flush=True)
    one, two = runs["1 worker"], runs["2 workers"]
    targets = _benchmark.failed_paths(runs)
    if "error" not in one and "error" not in two:
        targets["int8 accuracy, 2 workers against 1"] = _benchmark.target(
            abs(two["accuracy"] - one["accuracy"]), 0.01, at_most=True, why="same global batch, same schedule")
        targets["sparsity, 2 workers against 1"] = _benchmark.target(
            abs(two["sparsity"] - one["sparsity"]), 0.005, at_most=True, why="the schedule counts global steps")
    paper = _on_paper(one) if "error" not in one else None
    if paper is not None and "error" not in two:  # what a step on two workers cost beyond half a one-worker step
        step = two["seconds_per_epoch"]["prune"] / two["steps_per_epoch"]
        paper["measured_two_workers"] = {
            "step_ms": round(step * 1e3, 3),
            "synchronisation_ms": round((step - paper["compute_ms_per_step_one_worker"] / 2e3) * 1e3, 3)}
    total = time.perf_counter() - start
    write_json(os.path.join(output_dir, "benchmark_distribute.json"),
               {"runs": runs, "on_paper": paper, "targets": targets, "total_seconds": round(total, 1),
                "settings": {"train_samples": _TRAIN_SAMPLES.value, "global_batch": _BATCH.value,
                             "final_sparsity": _SPARSITY.value, "prune_epochs": _PRUNE_EPOCHS.value,
                             "qat_epochs": 1, "cores_per_worker": 1}})
    markdown = _markdown(runs, paper, targets, total)
    write_atomic(os.path.join(output_dir, "benchmark_distribute.md"), (markdown + "\n").encode())
    print(markdown)


def _run(workers: int, output_dir: str, train: str) -> dict:
    """One optimize run as `workers` processes, worker i pinned to core i; the chief's report, read back."""
    arguments = [sys.executable, "-m", "pipelines", "optimize", f"--saved_model_dir={_MODEL.value}",
                 f"--train_data={train}", f"--eval_data={baseline.MNIST_PATH}", f"--input_scale={baseline.MNIST_SCALE}",
                 f"--calibration_data={CALIBRATION}", "--calibration_key=x", "--prune",
                 f"--final_sparsity={_SPARSITY.value}", f"--prune_epochs={_PRUNE_EPOCHS.value}", "--qat",
                 "--qat_epochs=1", f"--batch_size={_BATCH.value}", "--latency_runs=0", "--overwrite",
                 f"--output_dir={output_dir}", "--noprogress"]
    tf_configs = distribute.loopback_tf_configs(workers)
    processes, start = [], time.perf_counter()
    cores = sorted(os.sched_getaffinity(0))
    for index in range(workers):
        env = dict(os.environ)
        if workers > 1:
            env["TF_CONFIG"] = tf_configs[index]
        core = {cores[index % len(cores)]}
        processes.append(subprocess.Popen(
            [*arguments, *(["--strategy=multi_worker"] if workers > 1 else [])], env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda core=core: os.sched_setaffinity(0, core)))
    try:
        outputs = [process.communicate(timeout=_TIMEOUT.value) for process in processes]
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {_TIMEOUT.value} s"}
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    wall = time.perf_counter() - start
    failed = [err.strip().splitlines()[-1:] for process, (_, err) in zip(processes, outputs) if process.returncode]
    if failed:
        return {"error": f"exit codes {[p.returncode for p in processes]}: {failed}"}
    with open(os.path.join(output_dir, "report.json")) as f:
        report = json.load(f)
    stages = {stage["stage"]: stage for stage in report["stages"]}
    train_count = int(round(_TRAIN_SAMPLES.value * 0.9))
    steps = -(-train_count // _BATCH.value)
    return {
        "wall_seconds": round(wall, 1),
        "seconds_per_epoch": {"prune": round(stages["prune"]["seconds"] / _PRUNE_EPOCHS.value, 2),
                              "qat": round(stages["qat"]["seconds"], 2)},
        "steps_per_epoch": steps,
        "accuracy": stages["convert"]["eval_accuracy"],
        "float_accuracy_after_qat": stages["qat"]["eval_accuracy"],
        "sparsity": stages["qat"]["sparsity"],
        "shipped": report["shipped"]["candidate"] if report.get("shipped") else None,
        "parameters": stages["float"]["parameters"],
        "distribution": report["distribution"],
    }


def _on_paper(one: dict) -> dict:
    """Expected seconds per step and speed-up on N workers over links of typical clusters, from the one-worker
    compute time per step and the ring all-reduce's bytes (4 bytes per trainable parameter per step)."""
    compute = one["seconds_per_epoch"]["prune"] / one["steps_per_epoch"]
    gradient_bytes = 4 * one["parameters"]  # LeNet-5 holds no non-trainable weights
    rows = []
    for workers in _WORKER_COUNTS:
        sent = 2 * (workers - 1) / workers * gradient_bytes
        for gbit in _LINKS_GBIT:
            transfer = sent * 8 / (gbit * 1e9)
            step = compute / workers + transfer
            rows.append({"workers": workers, "link_gbit_s": gbit, "bytes_sent_per_step": int(sent),
                         "transfer_ms": round(transfer * 1e3, 3), "step_ms": round(step * 1e3, 3),
                         "speedup": round(compute / step, 2)})
    return {"compute_ms_per_step_one_worker": round(compute * 1e3, 3), "gradient_bytes_per_step": gradient_bytes,
            "rows": rows}


def _markdown(runs: dict, paper: dict | None, targets: dict, total: float) -> str:
    lines = ["# Prune + QAT fine-tune: one worker against two (one core each)", "",
             "| run | wall s | prune s/epoch | QAT s/epoch | steps/epoch | int8 accuracy | sparsity | shipped |",
             "|---|---|---|---|---|---|---|---|"]
    for name, row in runs.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} |" + " |" * 6)
            continue
        lines.append(f"| {name} | {row['wall_seconds']:.1f} | {row['seconds_per_epoch']['prune']:.2f} | "
                     f"{row['seconds_per_epoch']['qat']:.2f} | {row['steps_per_epoch']} | {row['accuracy']:.4f} | "
                     f"{row['sparsity']:.4f} | {row['shipped']} |")
    if paper is not None:
        lines += ["", f"On paper: {paper['gradient_bytes_per_step']:,} gradient bytes all-reduced per step; one "
                  f"worker computes a step in {paper['compute_ms_per_step_one_worker']:.1f} ms.", "",
                  "| workers | link Gbit/s | bytes sent per worker per step | transfer ms | step ms | speed-up |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['workers']} | {r['link_gbit_s']} | {r['bytes_sent_per_step']:,} | {r['transfer_ms']:.2f} | "
                  f"{r['step_ms']:.2f} | {r['speedup']:.2f}x |" for r in paper["rows"]]
        lines += ["", "The transfer is the ring all-reduce's 2(N-1)/N of the gradient bytes at the link's full "
                  "bandwidth, without latency or overlap with compute: a bound, not a forecast."]
        measured = paper.get("measured_two_workers")
        if measured:
            lines += ["", f"Measured here (prune fine-tune, loopback): a step on two workers took "
                      f"{measured['step_ms']:.1f} ms, half a one-worker step plus {measured['synchronisation_ms']:.1f} "
                      "ms of synchronisation per step (collectives over gRPC, the pruning step counter and masks)."]
    return _benchmark.finish_tables(lines, targets, total)


if __name__ == "__main__":
    _common.run(main)
