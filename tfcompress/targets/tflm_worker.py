"""A share of the TFLM check's inputs run in TensorFlow Lite Micro, in a worker process of its own.

`micro.run_tflm_outputs` starts this file as a script for every share but the one it runs itself, so the check
uses every core (TFLM's Python interpreter runs one sample at a time on one core). Like `arena_probe`, it imports
only `tflite_micro` and numpy, not tfcompress or TensorFlow, so a worker starts in a fraction of a second. Each
input is invoked on its own, exactly as the serial loop does, so the outputs are the same bytes in any split.
"""

from __future__ import annotations

import sys

import numpy as np

_FAILED = 3


def run(flatbuffer: bytes, inputs: np.ndarray, arena_bytes: int, num_outputs: int) -> tuple[np.ndarray, ...]:
    """Every output of every input (batch axis first), one invoke per input; the serial loop of the check."""
    from tflite_micro import runtime

    interpreter = runtime.Interpreter.from_bytes(flatbuffer, arena_size=int(arena_bytes))
    outputs: list[list[np.ndarray]] = [[] for _ in range(num_outputs)]
    for i in range(len(inputs)):
        interpreter.set_input(inputs[i : i + 1], 0)
        interpreter.invoke()
        for position, collected in enumerate(outputs):
            collected.append(np.array(interpreter.get_output(position)))
    return tuple(np.concatenate(collected, axis=0) for collected in outputs)


def _main(model_path: str, inputs_path: str, arena_bytes: int, num_outputs: int, outputs_path: str) -> int:
    with open(model_path, "rb") as f:
        data = f.read()
    try:
        outputs = run(data, np.load(inputs_path, allow_pickle=False), arena_bytes, num_outputs)
    except RuntimeError as e:
        print(" ".join(str(e).split()) or "TFLM failed", file=sys.stderr)
        return _FAILED
    np.savez(outputs_path, *outputs)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
