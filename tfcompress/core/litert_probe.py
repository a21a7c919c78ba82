"""A user-given `.tflite` runs once in LiteRT in a child process before this process runs it.

The structural checks (`tflite_validate`) catch what the flatbuffer's layout shows; what an interpreter's
kernels make of a malformed model they do not. A native interpreter that dereferences a bad shape or option
kills its process (measured: TFLite Micro with a too-small arena died with SIGSEGV), and no `except` can
catch that. So a `.tflite` the user passed by path (`tfcompress export`, `verify` or `run_tflite` given a
path) is first allocated and invoked once on zeros in a child process (`probe_file`); a child killed by a
signal, or one that takes too long, becomes one `ModelLoadError` line. Bytes this process made (a fresh
conversion) skip the probe, and a file whose sha256 passed once in this process is not probed again.

Run as a script, this file imports only LiteRT and numpy (not tfcompress or TensorFlow), so a probe starts
in about 0.3 s: `python litert_probe.py MODEL` checks one file (exit 0 ran, 3 refused with the reason on
stdout), `python litert_probe.py --serve` checks one path per stdin line, one answer line each
(`ProbeServer`, used by `tfcompress fuzz` to run thousands of files through one child at a time).
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import subprocess
import sys

_REFUSED = 3
# The child's address space: enough for LiteRT and any model this toolkit makes; a corrupt shape asking
# for more fails its allocation in the child instead of swapping the machine.
MEMORY_LIMIT_BYTES = 8 << 30
DEFAULT_TIMEOUT_S = 60.0
_FIX = "the file is corrupt or uses an op this runtime cannot run: convert the model again"
_passed: set[str] = set()  # sha256 of files that ran in a probe of this process


@dataclasses.dataclass(frozen=True)
class ProbeOutcome:
    """How one file's first LiteRT run went: "ok", "refused" (LiteRT raised), "crashed" or "timeout"."""

    status: str
    detail: str = ""
    signal: int | None = None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return "unknown signal"


def describe_crash(number: int) -> str:
    """`signal 11, SIGSEGV`."""
    return f"signal {number}, {_signal_name(number)}"


def probe_file(path: str | os.PathLike, timeout_s: float = DEFAULT_TIMEOUT_S) -> ProbeOutcome:
    """Allocates and invokes the file once on zeros in LiteRT, in a child process of its own."""
    command = [sys.executable, os.path.abspath(__file__), os.fspath(path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return ProbeOutcome("timeout", f"no answer within {timeout_s:.0f} s")
    if done.returncode == 0:
        return ProbeOutcome("ok")
    if done.returncode < 0:
        return ProbeOutcome("crashed", describe_crash(-done.returncode), -done.returncode)
    lines = [line.strip() for line in (done.stdout or "").splitlines() if line.strip()]
    if done.returncode == _REFUSED and lines:
        return ProbeOutcome("refused", lines[-1])
    errors = [line.strip() for line in (done.stderr or "").splitlines() if line.strip()]
    return ProbeOutcome("refused", errors[-1] if errors else f"exit status {done.returncode}")


def check_user_file(model, path: str | os.PathLike, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Raises `ModelLoadError` unless `path` (already read and validated as `model`) runs once in a child.

    Raises:
        ModelLoadError: the child crashed (killed by a signal) or timed out.
    """
    from tfcompress.core.errors import ModelLoadError

    if model.sha256 in _passed:
        return
    outcome = probe_file(path, timeout_s)
    source = os.fspath(path)
    if outcome.status == "crashed":
        raise ModelLoadError(
            f"{source} made the TFLite interpreter crash ({outcome.detail}) on its first allocate_tensors() and "
            f"invoke(), run in a child process: {_FIX}."
        )
    if outcome.status == "timeout":
        raise ModelLoadError(
            f"{source}'s first LiteRT allocate_tensors() and invoke() gave {outcome.detail}: {_FIX}."
        )
    # A refusal ("refused": LiteRT raised) is safe in this process too: the caller's own run then reports it
    # in its words (a failed verification check, TFLM's missing kernel), so only crashes and hangs stop here.
    _passed.add(model.sha256)


def read_user_tflite(model, timeout_s: float = DEFAULT_TIMEOUT_S):
    """`read_tflite`, plus the child-process probe when `model` is a path (a file the user gave).

    A `TfliteModel` or bytes are returned parsed without a probe: this process produced them.
    """
    from tfcompress.core.tflite_model import read_tflite

    parsed = read_tflite(model)
    if isinstance(model, (str, os.PathLike)):
        check_user_file(parsed, model, timeout_s)
    return parsed


class ProbeServer:
    """One child that probes many files in turn; a crash is reported for its file and a new child starts.

    Use as a context manager; `check(path)` returns a `ProbeOutcome` per file.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    def __enter__(self) -> ProbeServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> subprocess.Popen:
        if self.process is None:
            self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=subprocess.DEVNULL, text=True, bufsize=1)
        return self.process

    def _restart(self) -> None:
        self.close()
        self.restarts += 1

    def close(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait()
            for stream in (self.process.stdin, self.process.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self.process = None

    def check(self, path: str | os.PathLike) -> ProbeOutcome:
        process = self._start()
        try:
            process.stdin.write(os.fspath(path) + "\n")
            process.stdin.flush()
        except OSError:
            pass  # the child is gone: its exit status says why, below
        ready, _, _ = select.select([process.stdout], [], [], self.timeout_s)
        line = process.stdout.readline() if ready else None
        if line:
            status, _, detail = line.rstrip("\n").partition("\t")
            return ProbeOutcome(status, detail)
        if line is None:
            self._restart()
            return ProbeOutcome("timeout", f"no answer within {self.timeout_s:.0f} s")
        code = process.wait()
        self._restart()
        if code < 0:
            return ProbeOutcome("crashed", describe_crash(-code), -code)
        return ProbeOutcome("crashed", f"the child exited with status {code}")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _run_once(path: str) -> str | None:
    """In the child: None when the model allocated and ran on zeros, else LiteRT's reason, one line."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    reasons = []
    for resolver in (None, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES):
        kwargs = {} if resolver is None else {"experimental_op_resolver_type": resolver}
        try:
            interpreter = Interpreter(model_path=path, num_threads=1, **kwargs)
            interpreter.allocate_tensors()
            for detail in interpreter.get_input_details():
                dtype = np.dtype(detail["dtype"])
                if dtype.kind in "biufc":
                    interpreter.set_tensor(detail["index"], np.zeros(detail["shape"], dtype))
            interpreter.invoke()
            return None
        except Exception as e:  # LiteRT raises RuntimeError and ValueError (and others) for what it refuses
            reasons.append(_one_line(e))
    if reasons[0] == reasons[1]:
        return reasons[0]
    return f"{reasons[0]}; without its XNNPACK delegate: {reasons[1]}"


def _limit_memory() -> None:
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):
        pass  # not on this platform: the timeout still bounds the child


def _serve() -> int:
    for line in sys.stdin:
        path = line.rstrip("\n")
        if not path:
            continue
        try:
            reason = _run_once(path)
        except MemoryError:
            reason = "MemoryError: the model asks for more memory than the probe allows"
        answer = "ok" if reason is None else "refused\t" + reason.replace("\t", " ")
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()
    return 0


def _main(argv: list[str]) -> int:
    _limit_memory()
    if argv == ["--serve"]:
        return _serve()
    try:
        reason = _run_once(argv[0])
    except MemoryError:
        reason = "MemoryError: the model asks for more memory than the probe allows"
    if reason is None:
        return 0
    print(reason)
    return _REFUSED


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
