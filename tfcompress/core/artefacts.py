"""Writing artefacts safely: every file lands whole (temporary file, then rename) or not at all."""

from __future__ import annotations

import json
import os
import tempfile
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


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to a temporary file beside `path`, then renames it into place."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, value: Any) -> None:
    write_atomic(path, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())
