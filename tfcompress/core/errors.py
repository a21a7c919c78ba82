"""Errors that callers can catch, and the exit codes the command line maps them to.

`ValueError` is for bad arguments to a function; the `TfcompressError` family is for pipeline failures.
Every error carries a one-line message that names the cause and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

EXIT_VERIFICATION_FAILED = 1
EXIT_BAD_INPUT = 2


class TfcompressError(Exception):
    """Base class of every tfcompress pipeline failure."""

    exit_code = EXIT_BAD_INPUT
    # Long diagnostic text (a converter log, say) shown only with --verbose.
    details: str = ""


class InputError(TfcompressError):
    """An input file, directory or argument cannot be used (exit code 2)."""


class ModelLoadError(InputError):
    """The model (SavedModel, .keras, .h5 or .tflite) is missing or cannot be loaded."""


class CalibrationDataError(InputError):
    """Calibration or evaluation samples are missing, malformed or do not fit the model."""


class OutputPathError(InputError):
    """The output location cannot be written, or would overwrite an artefact without --overwrite."""


class ConversionError(TfcompressError):
    """The TFLite converter rejected the model for a reason other than bad input (exit code 1)."""

    exit_code = EXIT_VERIFICATION_FAILED


class NotFullyQuantizedError(ConversionError):
    """Full-integer conversion was asked for but some ops cannot run in integer arithmetic."""

    def __init__(self, message: str, ops: Sequence[str] = ()):
        super().__init__(message)
        self.ops = list(ops)


class VerificationError(TfcompressError):
    """One or more verification checks failed; `failures` lists each as one line."""

    exit_code = EXIT_VERIFICATION_FAILED

    def __init__(self, failures: Sequence[str], result=None):
        self.failures = list(failures)
        self.result = result
        super().__init__(
            f"{len(self.failures)} verification check(s) failed: " + "; ".join(self.failures)
        )


class BudgetNotMetError(TfcompressError):
    """No model the search tried met every gate (accuracy and budgets); the message names the closest (exit 1)."""

    exit_code = EXIT_VERIFICATION_FAILED


class WorkerLostError(TfcompressError):
    """A worker of a multi-worker fine-tune lost its peers (one was killed or cut off); restart them all (exit 1)."""

    exit_code = EXIT_VERIFICATION_FAILED


class InterpreterRunError(VerificationError):
    """LiteRT could not allocate or invoke the model, even without its default (XNNPACK) delegate."""


class MicroTargetError(InputError):
    """The model cannot go to a microcontroller: float or hybrid ops, or ops TFLM has no kernel for."""
