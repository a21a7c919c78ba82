"""Fidelity: how closely a `.tflite` model reproduces its float model, output by output, with or without labels.

Takes the parsed `.tflite`, the float model and held-out input samples (evaluation data, or calibration-source
samples that calibration did not use); returns a `FidelityResult`: for every output, SQNR (dB) and the
largest and mean absolute error of the dequantized outputs against the float ones, and for classifier
outputs the top-1 agreement. Also reads what evaluation labels mean for a model (`interpret_labels`): class
indices for a classifier output, or regression targets shaped like an output, and refuses labels shaped
for another task with one line.

A model without labels (an autoencoder, a regression, a classifier whose labels the user lacks) is gated
on fidelity alone: `DEFAULT_MIN_TOP1_AGREEMENT` and `DEFAULT_MIN_OUTPUT_SQNR_DB`, chosen from the zoo
(README: measured on every zoo model's int8 conversion).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from tfcompress.core.errors import CalibrationDataError

# Measured on the int8 (uint8-I/O) conversion of every zoo model on its held-out samples (README): the
# classifiers' top-1 agreement is 0.990-1.000 and their probabilities keep 26.5-39.3 dB SQNR, the
# autoencoder's reconstruction 41.3 dB. The gates leave 2 points and 11 dB of margin below the worst of
# those; a model below them lost more than rounding (a wrong input scale, a range calibration missed).
DEFAULT_MIN_TOP1_AGREEMENT = 0.97
DEFAULT_MIN_OUTPUT_SQNR_DB = 15.0
MIN_FIDELITY_SAMPLES = 10
# SQNR of an output reproduced exactly (no quantization noise at all), instead of infinity in JSON.
EXACT_SQNR_DB = 200.0


@dataclasses.dataclass(frozen=True)
class OutputFidelity:
    """One output: float against `.tflite` (dequantized) on the same held-out samples."""

    name: str
    shape: tuple[int, ...]  # per sample
    classifier: bool  # probability rows, or an output the labels name as classes
    top1_agreement: float | None  # classifiers only
    sqnr_db: float
    max_abs_error: float
    mean_abs_error: float


@dataclasses.dataclass(frozen=True)
class FidelityResult:
    num_samples: int
    source: str
    outputs: tuple[OutputFidelity, ...]


@dataclasses.dataclass(frozen=True)
class Labels:
    """What evaluation labels are for one output: class indices, or regression targets."""

    output: str
    kind: str  # "classes" or "targets"
    values: np.ndarray


def pair_outputs(float_outputs: dict[str, np.ndarray],
                 tflite_outputs: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, float, tflite) per output, in the float model's order: by name, else one to one by order."""
    if set(float_outputs) == set(tflite_outputs):
        return [(name, float_outputs[name], tflite_outputs[name]) for name in float_outputs]
    if len(float_outputs) == len(tflite_outputs) == 1:
        (name, f), (_, q) = next(iter(float_outputs.items())), next(iter(tflite_outputs.items()))
        return [(name, f, q)]
    shapes = {name: q.shape for name, q in tflite_outputs.items()}
    pairs = []
    for name, f in float_outputs.items():
        same = [n for n, shape in shapes.items() if shape == f.shape]
        if len(same) != 1:
            raise ValueError(
                f"Cannot tell which .tflite output is the float model's output {name!r}: names differ "
                f"({sorted(tflite_outputs)} against {sorted(float_outputs)}) and shapes do not decide. "
                "Convert from the Keras model so the signature keeps the output names."
            )
        pairs.append((name, f, tflite_outputs[same[0]]))
        del shapes[same[0]]
    return pairs


def measure(pairs: list[tuple[str, np.ndarray, np.ndarray]], source: str,
            labels: Labels | None = None) -> FidelityResult:
    outputs = []
    for name, f, q in pairs:
        f, q = np.asarray(f, np.float64), np.asarray(q, np.float64)
        error = f - q
        noise = float(np.sum(error ** 2))
        signal = float(np.sum(f ** 2))
        if noise == 0.0:
            sqnr = EXACT_SQNR_DB
        else:
            sqnr = min(EXACT_SQNR_DB, 10.0 * math.log10(signal / noise)) if signal > 0 else -EXACT_SQNR_DB
        labelled_classes = labels is not None and labels.output == name and labels.kind == "classes"
        classifier = f.ndim == 2 and (labelled_classes or (f.shape[1] >= 2 and _probability_rows(f)))
        outputs.append(OutputFidelity(
            name=name, shape=tuple(int(d) for d in f.shape[1:]), classifier=bool(classifier),
            top1_agreement=float(np.mean(predicted_classes(f) == predicted_classes(q, like=f)))
            if classifier else None,
            sqnr_db=round(sqnr, 3), max_abs_error=float(np.abs(error).max(initial=0.0)),
            mean_abs_error=float(np.abs(error).mean()) if error.size else 0.0,
        ))
    return FidelityResult(num_samples=int(len(pairs[0][1])) if pairs else 0, source=source, outputs=tuple(outputs))


def predicted_classes(outputs: np.ndarray, like: np.ndarray | None = None) -> np.ndarray:
    """Top-1 classes of (N, C) scores; for one unit (N, 1), a binary decision at 0.5 (probabilities) or 0 (logits).

    `like`: the float outputs whose range decides the threshold (the .tflite's must use the same one).
    """
    if outputs.shape[1] == 1:
        reference = outputs if like is None else like
        threshold = 0.5 if reference.min() >= 0.0 and reference.max() <= 1.0 else 0.0
        return (outputs[:, 0] > threshold).astype(np.int64)
    return outputs.argmax(axis=1)


def _probability_rows(f: np.ndarray) -> bool:
    return bool(f.min() >= -1e-6 and f.max() <= 1 + 1e-6 and np.allclose(f.sum(axis=1), 1.0, atol=1e-3))


def gate_failures(result: FidelityResult, min_top1_agreement: float, min_output_sqnr_db: float,
                  skip: str | None = None) -> list[tuple[str, str]]:
    """(check name, detail) for every output below a gate; `skip` names an output gated by its labels."""
    failures = []
    for out in result.outputs:
        if out.name == skip:
            continue
        if out.top1_agreement is not None and out.top1_agreement < min_top1_agreement:
            failures.append(("fidelity_top1_agreement",
                             f"output {out.name!r}: {out.top1_agreement:.4f} < {min_top1_agreement} on "
                             f"{result.num_samples} samples ({result.source})"))
        if out.sqnr_db < min_output_sqnr_db:
            failures.append(("fidelity_output_sqnr",
                             f"output {out.name!r}: {out.sqnr_db:.1f} dB < {min_output_sqnr_db} dB on "
                             f"{result.num_samples} samples ({result.source})"))
    return failures


def resolve_output(names: Sequence[str], wanted: str) -> str | None:
    """`wanted` among `names`, also under tfmot's QAT name for it (QAT wraps output layer `digit` as
    `quant_digit`, which names the output); None when neither is there."""
    for name in (wanted, f"quant_{wanted}"):
        if name in names:
            return name
    return None


def interpret_labels(labels: np.ndarray, float_outputs: dict[str, np.ndarray], output: str | None,
                     source: str) -> Labels:
    """Decides what `labels` are for the model, or refuses them in one line naming the fix.

    Class indices `(N,)` (or one-hot `(N, C)`) label a `(N, C)` output with `C >= 2`; an array shaped like
    an output with other values holds regression targets. A model with several outputs needs `output`
    (`--eval_output`) to say which one the labels are for.
    """
    names = list(float_outputs)
    if output is None:
        if len(names) > 1:
            raise CalibrationDataError(
                f"The model has {len(names)} outputs ({', '.join(names)}) and the labels {source} do not say "
                "which one they are for: pass --eval_output with one of those names."
            )
        output = names[0]
    elif resolve_output(names, output) is None:
        raise CalibrationDataError(
            f"--eval_output {output!r} is not an output of the model. Expected one of: {', '.join(names)}."
        )
    output = resolve_output(names, output) or output
    predicted = float_outputs[output]
    labels = np.asarray(labels)
    flat = labels.reshape(len(labels), -1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if predicted.shape[1:] == (1,) and flat.ndim == 1 and np.isin(flat, (0, 1)).all():
        # One sigmoid unit (or logit) and 0/1 labels: a binary classifier, decided at the midpoint.
        return Labels(output, "classes", flat.astype(np.int64))
    if labels.shape == predicted.shape and not _one_hot(labels):
        return Labels(output, "targets", labels.astype(np.float32))
    classes = labels
    if labels.ndim == 2 and labels.shape[1] == 1:
        classes = labels[:, 0]
    elif labels.ndim == 2 and _one_hot(labels):
        classes = labels.argmax(axis=1)
    integral = classes.ndim == 1 and np.all(np.isfinite(classes)) and np.all(classes == np.round(classes))
    if not integral:
        raise CalibrationDataError(
            f"Labels {source} have shape {labels.shape}, but output {output!r} gives {predicted.shape[1:]} per "
            "sample: pass class indices (N,) for a classifier output, or targets shaped like the output "
            f"{(len(predicted), *predicted.shape[1:])} for a regression."
        )
    if predicted.ndim != 2 or predicted.shape[1] < 2:
        raise CalibrationDataError(
            f"Labels {source} are class indices, but output {output!r} gives {predicted.shape[1:]} per sample, "
            "not one score per class: for a regression output pass targets shaped like the output."
        )
    num_classes = predicted.shape[1]
    if classes.min(initial=0) < 0 or classes.max(initial=0) >= num_classes:
        raise CalibrationDataError(
            f"Labels {source} hold class indices from {int(classes.min())} to {int(classes.max())}, outside "
            f"the {num_classes} classes of output {output!r} (0 to {num_classes - 1}): pass this model's labels."
        )
    return Labels(output, "classes", classes.astype(np.int64))


def _one_hot(labels: np.ndarray) -> bool:
    return (labels.ndim == 2 and labels.shape[1] >= 2 and bool(np.isin(labels, (0, 1)).all())
            and bool(np.all(labels.sum(axis=1) == 1)))


def quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """Float values to the dtype of an interpreter tensor, with its scale and zero point."""
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if dtype.kind == "f" or scale == 0:
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, detail: dict) -> np.ndarray:
    """An interpreter tensor's values back to float with its scale and zero point."""
    scale, zero_point = detail["quantization"]
    if np.dtype(detail["dtype"]).kind == "f" or scale == 0:
        return q.astype(np.float32)
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)
