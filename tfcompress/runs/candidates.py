"""The optimize run's last choice: the QAT model, or post-training quantization of the model QAT started from.

Takes the run's `OptimizeConfig`, the Keras artefacts before and after the QAT stage and the validation
split; returns a `Choice` naming the candidate to ship and why. Both candidates are converted by
`run_convert` in the run's mode (so with its io dtype) into `<stages>/candidates/{qat,ptq}/`, checked for
what every conversion must be (integer-only, the I/O dtypes) but not gated on the evaluation data, and
scored in LiteRT on the validation split. The better one ships; on a tie post-training quantization does,
as the model nobody fine-tuned further: QAT that cannot beat it has not earned its place. `force_qat`
ships QAT whatever the scores. The evaluation data (a test split) is measured for the report only, never
used to choose. The caller hands the shipped candidate's `.tflite` to the gated convert stage, which verifies
it as it would a model it converted.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np

from tfcompress.conversion import calibration, datasets
from tfcompress.conversion.convert import ConvertConfig
from tfcompress.conversion import fidelity
from tfcompress.conversion.verify import run_tflite_all
from tfcompress.core.artefacts import write_atomic
from tfcompress.core.errors import TfcompressError
from tfcompress.core.tflite_model import TfliteModel
from tfcompress.runs.optimize_config import OptimizeConfig
from tfcompress.runs.pipeline import ConvertPipelineConfig, run_convert

CANDIDATES_DIRNAME = "candidates"
CALIBRATION_FILENAME = "ptq_calibration.npz"
CALIBRATION_KEY = "x"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One converted model the run could ship.

    Attributes:
        name: "qat" or "ptq".
        source: the Keras artefact it is converted from.
        calibration_data, calibration_key: the samples its conversion calibrates with (None: none needed).
        model_path: its `.tflite`; None when it could not be made (`error` says why).
        bytes, sha256: of that `.tflite`.
        validation_accuracy: top-1 in LiteRT on the run's validation split (what the choice reads).
        eval_accuracy: top-1 in LiteRT on the evaluation data, reported only.
        error: why the conversion failed, for a PTQ candidate that could not be made.
    """

    name: str
    source: str
    calibration_data: str | None
    calibration_key: str | None
    model_path: str | None = None
    bytes: int | None = None
    sha256: str | None = None
    validation_accuracy: float | None = None
    eval_accuracy: float | None = None
    validation_mse: float | None = None  # regression targets: what the choice reads instead
    eval_mse: float | None = None
    validation_by_output: dict[str, float] | None = None  # a multi-output model: each head's own score
    error: str | None = None
    tflite: TfliteModel | None = dataclasses.field(default=None, repr=False, compare=False)
    """The converted model as parsed (`model_path`'s bytes), for the convert stage to verify, not redo."""

    def to_json(self) -> dict:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self) if field.name != "tflite"}


@dataclasses.dataclass(frozen=True)
class Choice:
    shipped: Candidate
    candidates: tuple[Candidate, ...]
    reason: str

    def to_json(self) -> dict:
        return {"candidate": self.shipped.name, "reason": self.reason,
                "candidates": {c.name: c.to_json() for c in self.candidates}}


@dataclasses.dataclass(frozen=True)
class Splits:
    """The samples the candidates are scored on; `split` is where validation starts in the training data.

    `y_val` holds one labels array per model output (`heads`, in the float model's output order); `evaluation`
    labels the output `eval_output` (the only one, for a single-output model), in memory or streamed.
    """

    x_val: np.ndarray
    y_val: tuple[np.ndarray, ...]
    evaluation: datasets.EvalData | None
    split: int
    heads: tuple[Head, ...]
    eval_output: str | None = None
    # A streamed training source: PTQ's calibration samples, drawn (seeded) from its training range as stored
    calibration_raw: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Head:
    """One model output as the scores read it: its name, and whether it is a regression and outputs logits."""

    name: str
    regression: bool
    from_logits: bool


@dataclasses.dataclass(frozen=True)
class Scores:
    """What a model scored: top-1 accuracy (classifier heads) or mean squared error (regression heads).

    With several outputs, `accuracy` and `mse` are those of `eval_output` when it names one, else the mean
    over the heads of that kind; `by_output` has each head's own number.
    """

    accuracy: float | None
    mse: float | None
    by_output: dict[str, float] | None = None


def score_outputs(outputs: Sequence[np.ndarray], labels: Sequence[np.ndarray], heads: Sequence[Head],
                  eval_output: str | None = None) -> Scores:
    """Scores a model's outputs (in `heads` order) against one labels array per head."""
    by_output, accuracies, errors = {}, {}, {}
    for out, y, head in zip(outputs, labels, heads, strict=True):
        if head.regression:
            errors[head.name] = by_output[head.name] = float(np.mean((out - y) ** 2))
        else:
            accuracies[head.name] = by_output[head.name] = float(np.mean(_predicted(out, head.from_logits) == y))
    if len(heads) == 1:
        return Scores(next(iter(accuracies.values()), None), next(iter(errors.values()), None))

    def pick(values: dict[str, float]) -> float | None:
        if eval_output in values:
            return values[eval_output]
        return float(np.mean(list(values.values()))) if values and eval_output is None else None
    return Scores(pick(accuracies), pick(errors), by_output)


def score_one(output: np.ndarray, labels: np.ndarray, head: Head) -> Scores:
    return score_outputs([output], [labels], [head])


def _predicted(outputs: np.ndarray, from_logits: bool) -> np.ndarray:
    if outputs.shape[-1] == 1:  # one sigmoid unit (or logit): the class is which side of the midpoint
        return (outputs[:, 0] > (0.0 if from_logits else 0.5)).astype(np.int64)
    return np.argmax(outputs, axis=1)


def choose(config: OptimizeConfig, stages_dir: str, before_qat: str, qat: str, splits: Splits) -> Choice:
    """Converts both candidates, scores them on validation and picks the one to ship.

    Raises:
        ConversionError, VerificationError: the QAT candidate cannot be converted (as the run without
            the comparison would fail). A PTQ candidate that fails is reported and QAT ships.
    """
    directory = os.path.join(stages_dir, CANDIDATES_DIRNAME)
    qat_candidate = Candidate("qat", qat, config.calibration_data, config.calibration_key)
    try:
        qat_candidate = _converted(qat_candidate, config, directory, splits)
    except TfcompressError as e:
        # A QAT model the converter cannot make integer (measured: the zoo autoencoder's Dense + BatchNorm
        # blocks keep a float QUANTIZE/DEQUANTIZE pair) need not sink the run when PTQ converts.
        if config.force_qat or config.qat_weights != "int8":  # low-bit weights: PTQ is not what was asked
            raise
        qat_error = e
    else:
        qat_error = None
    ptq = Candidate("ptq", before_qat, calibration_data=None, calibration_key=None)
    try:  # QAT needs no calibration data, so too few training samples to draw from only rule PTQ out
        data, key = _ptq_calibration(config, stages_dir, splits.split, splits.calibration_raw)
        ptq = dataclasses.replace(ptq, calibration_data=data, calibration_key=key)
        ptq = _converted(ptq, config, directory, splits)
    except TfcompressError as e:
        ptq = dataclasses.replace(ptq, error=str(e))
    if qat_error is not None:
        if ptq.model_path is None:
            raise qat_error
        qat_candidate = dataclasses.replace(qat_candidate, error=str(qat_error))
        return Choice(ptq, (qat_candidate, ptq), "post-training quantization: the QAT model does not convert "
                      f"({' '.join(str(qat_error).split())})")
    low_bit = config.qat_weights != "int8"
    return decide(qat_candidate, ptq, force_qat=config.force_qat or low_bit,
                  forced_because=f"QAT with {config.qat_weights} weights, as --qat_weights asks (post-training "
                                 "quantization keeps int8 weights)" if low_bit else None)


def decide(qat: Candidate, ptq: Candidate, force_qat: bool = False, forced_because: str | None = None) -> Choice:
    """The rule: QAT ships if forced, if PTQ could not be made, or if it scores strictly higher on validation."""
    candidates = (qat, ptq)
    if ptq.model_path is None:
        return Choice(qat, candidates, "QAT: post-training quantization failed (see its error)")
    if qat.validation_mse is not None and ptq.validation_mse is not None:  # regression: lower is better
        a, b = -qat.validation_mse, -ptq.validation_mse
        scores = (f"validation mean squared error QAT {qat.validation_mse:.6g}, post-training quantization "
                  f"{ptq.validation_mse:.6g}")
    else:
        a, b = qat.validation_accuracy, ptq.validation_accuracy
        scores = f"validation accuracy QAT {a:.4f}, post-training quantization {b:.4f}"
    if qat.validation_by_output and ptq.validation_by_output:  # several outputs: say what the numbers are
        scores += "; per output QAT/PTQ: " + ", ".join(f"{name} {value:.4f}/{ptq.validation_by_output[name]:.4f}"
                                                      for name, value in qat.validation_by_output.items())
    if force_qat:
        return Choice(qat, candidates, f"{forced_because or 'QAT as --force_qat asks'} ({scores})")
    if a > b:
        return Choice(qat, candidates, f"QAT scored higher ({scores})")
    if a == b:
        # QAT that cannot beat quantizing the model it started from has not earned its place; that model's
        # weights are the ones the earlier stages validated, without a further fake-quant fine-tune.
        return Choice(ptq, candidates, f"post-training quantization scored as high ({scores}); a tie ships it, "
                      "as the model not fine-tuned further")
    return Choice(ptq, candidates, f"post-training quantization scored higher ({scores})")


def _ptq_calibration(config: OptimizeConfig, stages_dir: str, split: int,
                     drawn: np.ndarray | None = None) -> tuple[str | None, str | None]:
    """--calibration_data when given, else samples drawn (seeded) from the training split, raw as stored.

    Raw, so that the convert stage applies --input_scale/--input_offset to them as to any calibration file;
    never from the validation or evaluation data, which would then score a model calibrated on them.
    """
    if config.calibration_data is not None or not ConvertConfig(config.mode).needs_calibration:
        return config.calibration_data, config.calibration_key
    if drawn is None:
        raw = calibration.load_array(config.train_data, config.train_key)[:split]
        drawn = calibration.select(raw, config.num_calibration_samples, config.seed)
    buffer = io.BytesIO()
    np.savez(buffer, **{CALIBRATION_KEY: drawn})
    path = os.path.join(stages_dir, CALIBRATION_FILENAME)
    write_atomic(path, buffer.getvalue())
    return path, CALIBRATION_KEY


def _converted(candidate: Candidate, config: OptimizeConfig, directory: str, splits: Splits) -> Candidate:
    converted = run_convert(ConvertPipelineConfig(
        output_dir=os.path.join(directory, candidate.name), keras_model=candidate.source,
        trust_model=config.trust_model, mode=config.mode,
        calibration_data=candidate.calibration_data, calibration_key=candidate.calibration_key,
        input_scale=config.input_scale, input_offset=config.input_offset,
        num_calibration_samples=config.num_calibration_samples, seed=config.seed, overwrite=True,
        latency_runs=0, debug_layers=False,  # a candidate is scored, not profiled
        # Calibrated on exactly what the convert stage would calibrate on (which holds samples out for its
        # fidelity check only when it has no evaluation data), so the shipped bytes are the same either way.
        held_out_samples=0 if config.eval_data is not None else None,
    ))
    common = dict(model_path=converted.model_path, bytes=converted.num_bytes, sha256=converted.tflite.sha256,
                  tflite=converted.tflite)
    validation = score_outputs(_outputs(converted.tflite, splits.x_val, splits.heads), splits.y_val, splits.heads,
                               splits.eval_output)
    evaluation = Scores(None, None)
    if splits.evaluation is not None:
        names = [head.name for head in splits.heads]
        position = names.index(splits.eval_output) if splits.eval_output in names else 0
        outputs, labels = splits.evaluation.collect(
            lambda x: _outputs(converted.tflite, x, splits.heads)[position : position + 1])
        evaluation = score_one(outputs[0], labels, splits.heads[position])
    return dataclasses.replace(
        candidate, **common, validation_accuracy=validation.accuracy, validation_mse=validation.mse,
        validation_by_output=validation.by_output, eval_accuracy=evaluation.accuracy, eval_mse=evaluation.mse)


def _outputs(model: TfliteModel, x: np.ndarray, heads: Sequence[Head]) -> list[np.ndarray]:
    """The `.tflite`'s outputs in the order of `heads`, by name (also tfmot's `quant_` one).

    The converter may order several outputs otherwise than Keras (measured: the two-output model comes out
    `parity`, `digit`), so only a single output is taken without its name.
    """
    by_name = run_tflite_all(model, x)
    if len(by_name) == len(heads) == 1:
        return list(by_name.values())
    resolved = [fidelity.resolve_output(list(by_name), head.name) for head in heads]
    if None in resolved or len(set(resolved)) != len(heads):
        raise ValueError(f"Cannot tell which .tflite output is which head: the .tflite names {sorted(by_name)}, "
                         f"the model {[head.name for head in heads]}. Convert from the Keras model so the "
                         "signature keeps the output names.")
    return [by_name[name] for name in resolved]
