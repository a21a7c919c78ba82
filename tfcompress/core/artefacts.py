"""Writing artefacts safely: every file lands whole (temporary file, then rename) or not at all.

- `write_atomic` / `atomic_path`: a final artefact is written under a temporary name in its own directory
  (`.<stem>.partial-XXXX<ext>`), fsynced and renamed into place, so a kill at any moment leaves the old file
  or the new one, never a truncated one. A full disk or a file-size limit (ENOSPC, EFBIG, EDQUOT) becomes
  one `OutputPathError` naming the file, with the temporary file removed.
- `output_lock`: one run per output directory (`fcntl.flock` on `<output_dir>/.tfcompress.lock`, which
  records the holder's pid, command and start time); the kernel drops the lock when the process ends, also
  on SIGKILL, and a later run takes a stale lock file over (and removes the dead run's temporary files).
- Fault injection for the tests (inert unless set): `TFCOMPRESS_FAULT_KILL_AT_WRITE=k` makes the process
  SIGKILL itself at its k-th atomic write, after half the temporary file is on disk and before the rename;
  `TFCOMPRESS_FAULT_STOP_AT_WRITE=k` makes it SIGSTOP itself there (holding its lock) until SIGCONT.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from tfcompress.core.errors import OutputPathError


def prepare_output_dir(output_dir: str | os.PathLike, artefacts: tuple[str, ...],
                       overwrite: bool) -> tuple[str, bool]:
    """Checks that `output_dir` can receive `artefacts` before any work is done; creates it.

    Returns:
        The path, and whether this call created the directory (so a failed run can remove it again).

    Raises:
        OutputPathError: the path is a file, cannot be created or written, or an artefact exists and
            `overwrite` is False.
    """
    path = os.fspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"--output_dir {path} is a file, not a directory. Pass a directory path.")
    for name in artefacts:
        existing = os.path.join(path, name)
        if os.path.exists(existing) and not overwrite:
            raise OutputPathError(
                f"{existing} already exists. Pass --overwrite to replace it, or choose another --output_dir."
            )
    created = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OutputPathError(
            f"--output_dir {path} is not writable ({e.strerror}). Choose a directory you can write to."
        ) from None
    return path, created


def remove_if_empty(path: str) -> None:
    """Removes a directory this run created, so that a failed run leaves nothing behind."""
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty, or already gone: leave it


PARTIAL = ".partial-"
LOCK_FILENAME = ".tfcompress.lock"
FAULT_KILL_ENV = "TFCOMPRESS_FAULT_KILL_AT_WRITE"
FAULT_STOP_ENV = "TFCOMPRESS_FAULT_STOP_AT_WRITE"

_FULL = {errno.ENOSPC: "no space left on device", errno.EFBIG: "file too large",
         errno.EDQUOT: "disk quota exceeded"}
_writes = 0  # atomic writes by this process, for the fault-injection hook


def _full_reason(error: BaseException) -> str | None:
    """"no space left on device" / "file too large" / ..., when `error` is a full disk or a file-size limit.

    h5py (Keras' HDF5 writer) reports the errno only inside its message, so that is read as well.
    """
    if isinstance(error, OSError) and error.errno in _FULL:
        return _FULL[error.errno]
    text = str(error).lower()
    for code, reason in _FULL.items():
        if os.strerror(code).lower() in text or f"errno = {code}," in text:
            return reason
    return None


def _fault_point(tmp: str) -> None:
    """The tests' kill points (see the module docstring); does nothing unless the variables are set."""
    global _writes
    _writes += 1
    if os.environ.get(FAULT_STOP_ENV) == str(_writes):
        os.kill(os.getpid(), signal.SIGSTOP)
    if os.environ.get(FAULT_KILL_ENV) == str(_writes):
        os.truncate(tmp, os.path.getsize(tmp) // 2)  # the worst moment: half a file, not yet renamed
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` for a writer that takes a file name (Keras' `model.save`); once the
    block ends without error the file is fsynced and renamed to `path`, on any error it is removed.

    The temporary name keeps the extension (`.prune.partial-x1y2.h5`), which Keras reads the format from.

    Raises:
        OutputPathError: the disk is full or a file-size limit was hit (the temporary file is removed).
    """
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    stem, ext = os.path.splitext(os.path.basename(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{stem}{PARTIAL}", suffix=ext)
    except OSError as e:
        _raise_if_full(path, e)
        raise
    os.close(fd)
    try:
        try:
            yield tmp
            _fsync(tmp)
            os.chmod(tmp, 0o644)
        except Exception as e:
            _raise_if_full(path, e)
            raise
        _fault_point(tmp)
        os.replace(tmp, path)
        _fsync(directory, directory=True)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _raise_if_full(path: str, error: BaseException) -> None:
    reason = _full_reason(error)
    if reason is not None:
        raise OutputPathError(
            f"Cannot write {path}: {reason}. Free space (or raise the file-size limit, ulimit -f) or choose "
            "another --output_dir."
        ) from None


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, fsyncs it, then renames it into place.

    Raises:
        OutputPathError: the disk is full or a file-size limit was hit; `path` is left as it was.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json(path: str | os.PathLike, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


_held: dict[str, int] = {}  # directory (real path) -> lock file descriptor, for this process


@contextlib.contextmanager
def output_lock(output_dir: str | os.PathLike, command: str) -> Iterator[None]:
    """Holds the exclusive lock of `output_dir` for the block: one tfcompress run per output directory.

    Reentrant in a process: a run inside a run (optimize's convert stage, in a sub-directory of its output
    directory) is covered by the outer lock. The lock file is removed on release; one left by a killed run
    holds no lock (the kernel released it) and is taken over, and the killed run's temporary
    `.*.partial-*` files under `output_dir` are removed.

    Raises:
        OutputPathError: another process holds the lock (its pid, command and start time are named).
    """
    real = os.path.realpath(os.fspath(output_dir))
    if any(real == held or real.startswith(held.rstrip(os.sep) + os.sep) for held in _held):
        yield
        return
    path = os.path.join(real, LOCK_FILENAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _holder(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise OutputPathError(
                f"--output_dir {os.fspath(output_dir)} is in use by another tfcompress run ({holder}): wait for it "
                "to finish or choose another --output_dir."
            ) from None
        try:  # the holder may have released and removed the file between our open and our flock
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(os.fstat(fd), current):
            break
        os.close(fd)
    record = {"pid": os.getpid(), "command": command, "started": time.time(),
              "started_local": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held[real] = fd
    _remove_partials(real)
    try:
        yield
    finally:
        del _held[real]
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _holder(fd: int) -> str:
    """"pid 123, `tfcompress optimize`, started 14:02:07" from the lock file (what the holder wrote)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        started = time.strftime("%H:%M:%S", time.localtime(float(record["started"])))
        return f"pid {int(record['pid'])}, `{record['command']}`, started {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its pid not yet recorded"


def _remove_partials(directory: str) -> None:
    """Removes temporary files that a killed run left (the lock is held, so no live run owns them)."""
    for root, _, names in os.walk(directory):
        for name in names:
            if name.startswith(".") and PARTIAL in name:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(root, name))
