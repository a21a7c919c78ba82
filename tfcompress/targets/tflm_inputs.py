"""Export stage, its inputs: which samples the TFLM check runs, and how they reach it.

Takes evaluation data (`datasets.EvalData`: arrays, or a streamed tree, TFRecords or `tf.data.Dataset`), or none, and
the model; returns the check's inputs in the model's input dtype: every sample, the seeded `tflm_samples` subset
(`tflm_subset`; from a streamed source gathered in one pass, so memory holds the subset), seeded random inputs
without data, or a `StreamedInputs` that `export.build_micro_export` runs batch by batch (every sample of a streamed
source, memory bounded by one batch). Also the description of the samples and the subset's manifest record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from tfcompress.conversion import datasets
from tfcompress.conversion.verify import quantize
from tfcompress.core.tflite_model import TfliteModel

DEFAULT_RANDOM_SAMPLES = 200
# The TFLM check's default sample count: 1,000 resolves top-1 agreement to 0.001 (one sample), the
# resolution of its 0.999 gate; `tflm_samples=None` ("all" on the command line) checks every sample.
DEFAULT_TFLM_SAMPLES = 1000


def parse_tflm_samples(text: str) -> int | None:
    """`--tflm_samples`: a count of at least 1, or "all" (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError("tflm_samples is how many samples the TFLM check runs: a whole number of at least 1, or "
                         f"'all'. Received: tflm_samples={text!r}")
    return value


def check_tflm_samples(value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError("tflm_samples is how many samples the TFLM check runs: a whole number of at least 1, or "
                         f"None (--tflm_samples=all) for every sample. Received: tflm_samples={value!r}")


def tflm_subset(num_samples: int, tflm_samples: int | None, seed: int = 0) -> np.ndarray | None:
    """The indices (sorted) of the samples the TFLM check runs: `tflm_samples` of `num_samples` drawn without
    replacement with `seed`; None where that is every sample."""
    check_tflm_samples(tflm_samples)
    if tflm_samples is None or tflm_samples >= num_samples:
        return None
    return np.sort(np.random.default_rng(seed).choice(num_samples, size=tflm_samples, replace=False))


def take_tflm_subset(inputs: np.ndarray, labels: np.ndarray | None, described: str, tflm_samples: int | None,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, str, dict | None]:
    """The check's inputs (and labels) cut to `tflm_subset`, the description saying so, and the subset's
    record for the manifest (None where every sample runs)."""
    indices = tflm_subset(len(inputs), tflm_samples, seed)
    if indices is None:
        return inputs, labels, described, None
    described, subset = _subset_record(len(indices), len(inputs), described, seed)
    return inputs[indices], None if labels is None else np.asarray(labels)[indices], described, subset


def _subset_record(count: int, total: int, described: str, seed: int) -> tuple[str, dict]:
    resolution = 1.0 / count
    subset = {"num_samples": int(count), "of": int(total), "seed": seed, "top1_agreement_resolution": resolution,
              "how": "drawn without replacement with the seed, in index order; --tflm_samples=all runs every one"}
    return f"{count} of {described}, drawn with seed {seed} (top-1 agreement resolution {resolution:g})", subset


@dataclasses.dataclass(frozen=True)
class StreamedInputs:
    """The TFLM check's inputs read batch by batch from a streamed source and quantized for `model`: the check
    holds one batch of inputs at a time (and every output). `build_micro_export` takes it instead of an array."""

    data: datasets.EvalData
    model: TfliteModel
    use_labels: bool = True  # False: the source's labels are not the first output's classes (TFLM accuracy unmeasured)

    @property
    def labelled(self) -> bool:
        return self.use_labels and self.data.labelled

    def chunks(self, labels: list | None = None) -> Iterator[np.ndarray]:
        """Quantized input batches; each batch's labels appended to `labels` as it streams."""
        for x, y in self.data.batches():
            if labels is not None and y is not None and self.use_labels:
                labels.append(y)
            yield micro_inputs(self.model, x)[0]


def tflm_check_inputs(model: TfliteModel, data: datasets.EvalData, tflm_samples: int | None, seed: int = 0
                      ) -> tuple[np.ndarray | StreamedInputs, np.ndarray | None, np.ndarray | None, str, dict | None]:
    """The TFLM check's inputs from evaluation data, with `tflm_samples` (`tflm_subset`) applied.

    Arrays are quantized and cut as `take_tflm_subset` cuts them. A streamed source (tree, TFRecords, tf.data) is
    counted, then its subset is gathered in one pass (memory holds the subset, not the data); with every sample
    (`tflm_samples=None`, or no fewer than the source holds) it is a `StreamedInputs`, run batch by batch.

    Returns:
        (inputs, their labels or None, the float samples of a streamed subset (else None), the description,
        the subset's manifest record or None).
    """
    if data.source is None:
        inputs, described = micro_inputs(model, data.x, seed)
        inputs, labels, described, subset = take_tflm_subset(inputs, data.y, described, tflm_samples, seed)
        return inputs, labels, None, described, subset
    total = data.source.count() if data.stop is None else min(data.stop, data.source.count())
    described = f"{total} evaluation samples streamed from {data.description}"
    indices = tflm_subset(total, tflm_samples, seed)
    if indices is None:
        return StreamedInputs(data, model), None, None, described, None
    xs, ys, position = [], [], 0
    for x, y in data.batches():
        rows = indices[(indices >= position) & (indices < position + len(x))] - position
        xs.append(x[rows])
        ys.append(None if y is None else y[rows])
        position += len(x)
    samples = np.concatenate(xs)
    labels = None if ys[0] is None else np.concatenate(ys)
    described, subset = _subset_record(len(indices), total, described, seed)
    return micro_inputs(model, samples)[0], labels, samples, described, subset


def micro_inputs(model: TfliteModel, samples: np.ndarray | None, seed: int = 0,
                 num_random: int = DEFAULT_RANDOM_SAMPLES, kind: str = "evaluation") -> tuple[np.ndarray, str]:
    """Inputs in the model's input dtype for the TFLM check, and how they were made.

    `samples` are float model inputs (preprocessed; `kind` names them in the description), quantized with
    the input tensor's parameters; without them, seeded uniform random inputs over the input dtype's range
    are used.
    """
    (index,) = model.inputs
    tensor = model.tensors[index]
    dtype = np.dtype(tensor.dtype)
    shape = tensor.shape[1:]
    if samples is not None:
        detail = {"dtype": dtype, "quantization": (tensor.scale[0] if tensor.scale else 0.0,
                                                   tensor.zero_point[0] if tensor.zero_point else 0)}
        return quantize(np.asarray(samples, np.float32), detail), f"{len(samples)} {kind} samples"
    rng = np.random.default_rng(seed)
    if dtype.kind == "f":
        inputs = rng.uniform(0.0, 1.0, size=(num_random, *shape)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        inputs = rng.integers(info.min, info.max, size=(num_random, *shape), endpoint=True).astype(dtype)
    return inputs, f"{num_random} random inputs (seed {seed}); no evaluation data given"
