"""What every pipeline script shares: exit codes, one-line errors, and the `tfcompress <verb>` entry.

Exit codes: 0 success, 1 verification failed, 2 bad arguments or input (also: the output directory is in
use by another run, or the disk is full). Errors print one line naming the cause and the fix; `--verbose`
adds the traceback and any converter log.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from tfcompress.core import progress
from tfcompress.core.errors import EXIT_BAD_INPUT, TfcompressError, VerificationError

flags.DEFINE_bool("verbose", False, "On failure, also print the traceback and the converter's log.")
flags.DEFINE_bool("progress", True, "Progress bars on long steps (calibration, evaluation, the TFLM check) "
                  "when stderr is a terminal; --noprogress turns them off.")


def _prog(argv: Sequence[str]) -> str:
    return os.path.basename(argv[0]) if argv else "tfcompress"


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"{_prog(argv)}: error: {e} (see --helpfull)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _guarded(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    def wrapped(argv: list[str]) -> None:
        logging.set_verbosity(logging.DEBUG if flags.FLAGS.verbose else logging.WARNING)
        progress.set_enabled(flags.FLAGS.progress)
        if len(argv) > 1:
            print(f"{_prog(argv)}: error: unexpected arguments {argv[1:]}; every input is a --flag.",
                  file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        try:
            main(argv)
        except VerificationError as e:
            if flags.FLAGS.verbose:
                traceback.print_exc()
            print(f"{_prog(argv)}: verification failed ({len(e.failures)} check(s)):", file=sys.stderr)
            for failure in e.failures:
                print(f"  FAILED {failure}", file=sys.stderr)
            sys.exit(e.exit_code)
        except (TfcompressError, ValueError, FileNotFoundError) as e:
            if flags.FLAGS.verbose:
                traceback.print_exc()
                if getattr(e, "details", ""):
                    print(e.details, file=sys.stderr)
            print(f"{_prog(argv)}: error: {e}", file=sys.stderr)
            sys.exit(getattr(e, "exit_code", EXIT_BAD_INPUT))

    return wrapped


def _print_help(main: Callable, argv: Sequence[str]) -> None:
    """The script's docstring and its own flags (absl's --help would list none under `tfcompress <verb>`)."""
    module = sys.modules[main.__module__]
    print((module.__doc__ or "").strip() + "\n")
    print(f"usage: {_prog(argv)} [--flags]\n")
    print(flags.FLAGS.module_help(module))
    print(flags.FLAGS.module_help(sys.modules[__name__]))


def _takes_value(arg: str) -> bool:
    """Whether `arg` is a `--flag` written without `=value` whose value is the next argument (`--set a=1`)."""
    if not arg.startswith("-") or "=" in arg:
        return False
    name = arg.lstrip("-")
    return name in flags.FLAGS and not isinstance(flags.FLAGS[name], flags.BooleanFlag)


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """`app.run` with exit code 2 on flag errors and one-line messages for tfcompress errors.

    `--help` prints the script's flags and exits 0.
    """
    argv = list(sys.argv if argv is None else argv)
    # A file-size limit (ulimit -f) kills with SIGXFSZ by default; ignored, the write fails with EFBIG instead and
    # the run ends with one line naming the file (OutputPathError), its temporary file removed.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # A script may name one flag that a bare argument fills (`tfcompress inspect model.tflite`).
    positional = getattr(sys.modules[main.__module__], "POSITIONAL_FLAG", None)
    bare = [arg for i, arg in enumerate(argv[1:], 1) if not arg.startswith("-") and not _takes_value(argv[i - 1])]
    if positional and len(bare) == 1:
        argv = [argv[0], *(a if a is not bare[0] else f"--{positional}={a}" for a in argv[1:])]
    try:
        if any(arg in ("-h", "--help", "-help", "--helpshort") for arg in argv[1:]):
            _print_help(main, argv)
            sys.exit(0)
        app.run(_guarded(main), argv=argv, flags_parser=_parse_flags)
    except BrokenPipeError:
        # The reader went away (`tfcompress inspect m.tflite | head`): stop quietly, as Python's docs advise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
