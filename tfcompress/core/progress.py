"""Progress bars for the long steps (calibration, evaluation, the TFLM check), via tqdm.

Shown only when stderr is a terminal and not turned off (`set_enabled(False)`, the pipelines'
`--noprogress`); bars are drawn on the user's stderr even while TensorFlow's native output is captured.
"""

from __future__ import annotations

from typing import TypeVar
from collections.abc import Iterable, Iterator

from tqdm import tqdm

from tfcompress.core._native import terminal_stderr

T = TypeVar("T")
_enabled = [True]


def set_enabled(enabled: bool) -> None:
    """Turns every progress bar on or off (the pipelines' `--noprogress`)."""
    _enabled[0] = bool(enabled)


def enabled() -> bool:
    """Whether bars are drawn now: turned on, and stderr is a terminal."""
    stream = terminal_stderr()
    return _enabled[0] and hasattr(stream, "isatty") and stream.isatty()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """`iterable`, with a bar on the terminal when `enabled()`; the bar disappears when done."""
    if not enabled():
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=desc, file=terminal_stderr(), leave=False,
                    dynamic_ncols=True, mininterval=0.2)


def keras_verbose() -> int:
    """`verbose` for Keras `fit`: its own progress bar on a terminal, one line per epoch otherwise."""
    return 1 if enabled() else 2
