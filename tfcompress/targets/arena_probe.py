"""One TFLite Micro allocation and invoke at a given arena size, in a child process of its own.

`probe_arena` runs this file as a script (it imports only `tflite_micro` and numpy, not tfcompress or
TensorFlow, so a probe starts in a fraction of a second). A too-small arena can make the `tflite-micro`
interpreter crash its process (SIGSEGV, measured on a dense int8 autoencoder at 16,000 bytes) instead of
raising, so no size that might be too small is ever tried in the caller's process.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile

import numpy as np

_FAILED = 3


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    arena_bytes: int
    ran: bool
    detail: str  # "ok", the allocator's first error line, or how the process died
    signal: int | None = None  # the signal that killed the child, if one did


def probe_arena(flatbuffer: bytes, sample: np.ndarray, arena_bytes: int, timeout_s: float = 120.0) -> ProbeResult:
    """Allocates the model in `arena_bytes` and invokes it once on `sample` (batch of 1), in a child process."""
    with tempfile.TemporaryDirectory(prefix="tfcompress-arena-") as tmp:
        model_path, sample_path = os.path.join(tmp, "model.tflite"), os.path.join(tmp, "sample.npy")
        with open(model_path, "wb") as f:
            f.write(flatbuffer)
        np.save(sample_path, np.asarray(sample), allow_pickle=False)
        try:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), model_path, sample_path,
                                   str(int(arena_bytes))], capture_output=True, text=True, timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired:
            return ProbeResult(int(arena_bytes), False, f"no answer within {timeout_s:.0f} s")
    if done.returncode == 0:
        return ProbeResult(int(arena_bytes), True, "ok")
    if done.returncode < 0:
        return ProbeResult(int(arena_bytes), False, f"the interpreter's process died (signal {-done.returncode})",
                           -done.returncode)
    lines = [line.strip() for line in (done.stderr or "").splitlines() if line.strip()]
    return ProbeResult(int(arena_bytes), False, lines[0] if lines else f"exit status {done.returncode}")


def _run(model_path: str, sample_path: str, arena_bytes: int) -> int:
    from tflite_micro import runtime

    with open(model_path, "rb") as f:
        data = f.read()
    try:
        interpreter = runtime.Interpreter.from_bytes(data, arena_size=arena_bytes)
        interpreter.set_input(np.load(sample_path, allow_pickle=False), 0)
        interpreter.invoke()
    except RuntimeError as e:
        print(" ".join(str(e).split()) or "AllocateTensors failed", file=sys.stderr)
        return _FAILED
    return 0


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1], sys.argv[2], int(sys.argv[3])))
