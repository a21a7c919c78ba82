"""Capturing what TensorFlow's C++ code writes straight to file descriptors 1 and 2.

The converter prints MLIR diagnostics and quantizer chatter, and importing TensorFlow prints CUDA and
oneDNN notices, below Python's `sys.stdout`; the command line promises one clear line, so that output is
kept in a temporary file and shown only when it matters (an error, or TFCOMPRESS_NATIVE_LOG=1).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator


# While output is captured, the real stderr (a dup of fd 2 from before), for progress bars.
_terminal: list = []


def terminal_stderr():
    """The stream that reaches the user's stderr, even while native output is captured."""
    return _terminal[-1] if _terminal else sys.stderr


@contextlib.contextmanager
def native_output_captured(always: bool = False) -> Iterator[list[str]]:
    """Yields a list that holds the captured text once the block ends.

    With TFCOMPRESS_NATIVE_LOG=1 nothing is captured (the output goes through), unless `always`: for
    output that is parsed, not shown (TFLM's allocation report).
    """
    captured: list[str] = []
    if os.environ.get("TFCOMPRESS_NATIVE_LOG") == "1" and not always:
        yield captured
        return
    with tempfile.TemporaryFile("w+", errors="replace") as log:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        _terminal.append(os.fdopen(os.dup(saved[1]), "w", buffering=1, closefd=True))
        try:
            for fd in (1, 2):
                os.dup2(log.fileno(), fd)
            yield captured
        finally:
            _terminal.pop().close()
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            log.seek(0)
            captured.append(log.read())
