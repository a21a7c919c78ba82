"""Latency measurement of a `.tflite` model, in a fresh process: the one helper every benchmark uses.

Takes a model path and a thread count; returns a `Latency` (median and p90 in milliseconds). Timings
taken in the process that just trained or converted a model read 30-50% off (warm caches, busy thread
pools), so `measure_latency` runs this file as a separate Python process that imports only LiteRT and
NumPy, warms up, then times each `invoke()` on its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time


@dataclasses.dataclass(frozen=True)
class Latency:
    median_ms: float
    p90_ms: float
    mean_ms: float
    num_runs: int
    num_warmup: int
    num_threads: int


def measure_latency(model_path: str | os.PathLike, num_runs: int = 200, num_warmup: int = 20,
                    num_threads: int = 1) -> Latency:
    """Times single-sample `invoke()` calls of `model_path` in a fresh process (an `.onnx` file: ONNX Runtime's
    CPU provider, `run_with_iobinding` calls).

    Raises:
        ValueError: a count below 1 (warm-up below 0).
        RuntimeError: the measuring process failed (its stderr is included).
    """
    if num_runs < 1 or num_warmup < 0 or num_threads < 1:
        raise ValueError(
            "num_runs and num_threads must be at least 1 and num_warmup at least 0. "
            f"Received: num_runs={num_runs}, num_warmup={num_warmup}, num_threads={num_threads}"
        )
    command = [sys.executable, os.path.abspath(__file__), os.fspath(model_path),
               str(num_runs), str(num_warmup), str(num_threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"Latency measurement of {model_path} failed: {done.stderr.strip()[-2000:]}")
    return Latency(**json.loads(done.stdout.strip().splitlines()[-1]))


def _time_invokes(model_path: str, num_runs: int, num_warmup: int, num_threads: int) -> dict:
    if model_path.endswith(".onnx"):
        return _time_onnx(model_path, num_runs, num_warmup, num_threads)
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=model_path, num_threads=num_threads)
    interpreter.allocate_tensors()
    rng = np.random.default_rng(0)
    for detail in interpreter.get_input_details():
        dtype = np.dtype(detail["dtype"])
        if dtype.kind == "f":
            value = rng.random(detail["shape"], dtype=np.float32).astype(dtype)
        else:
            info = np.iinfo(dtype)
            value = rng.integers(info.min, info.max, detail["shape"], endpoint=True).astype(dtype)
        interpreter.set_tensor(detail["index"], value)
    for _ in range(num_warmup):
        interpreter.invoke()
    times = np.empty(num_runs)
    for i in range(num_runs):
        start = time.perf_counter_ns()
        interpreter.invoke()
        times[i] = (time.perf_counter_ns() - start) / 1e6
    return _summary(times, num_runs, num_warmup, num_threads)


def _time_onnx(model_path: str, num_runs: int, num_warmup: int, num_threads: int) -> dict:
    """ONNX Runtime's CPU provider, timed like LiteRT: inputs bound once (IOBinding), each run on its own."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    rng = np.random.default_rng(0)
    types = {"tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(float)": np.float32}
    for value in session.get_inputs():
        shape = [1 if not isinstance(d, int) else d for d in value.shape]
        dtype = np.dtype(types[value.type])
        if dtype.kind == "f":
            data = rng.random(shape, dtype=np.float32)
        else:
            info = np.iinfo(dtype)
            data = rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype)
        binding.bind_cpu_input(value.name, data)
    for value in session.get_outputs():
        binding.bind_output(value.name)
    for _ in range(num_warmup):
        session.run_with_iobinding(binding)
    times = np.empty(num_runs)
    for i in range(num_runs):
        start = time.perf_counter_ns()
        session.run_with_iobinding(binding)
        times[i] = (time.perf_counter_ns() - start) / 1e6
    return _summary(times, num_runs, num_warmup, num_threads)


def _summary(times, num_runs: int, num_warmup: int, num_threads: int) -> dict:
    import numpy as np

    return {
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "mean_ms": float(times.mean()),
        "num_runs": num_runs,
        "num_warmup": num_warmup,
        "num_threads": num_threads,
    }


if __name__ == "__main__":
    path, runs, warmup, threads = sys.argv[1], *map(int, sys.argv[2:5])
    print(json.dumps(_time_invokes(path, runs, warmup, threads)))
