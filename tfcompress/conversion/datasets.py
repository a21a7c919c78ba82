"""Calibration stage, streamed: data that need not fit in memory, for calibration, evaluation and training.

Takes a class-per-folder image tree, TFRecord files with a `DataSpec` (`--data_spec=image=KEY,label=KEY`), or in
the API a `tf.data.Dataset`, and the model input shape; returns a `sources.Source` (`open_source`: validated
float32 batches, index ranges, a `tf.data` pipeline for `fit`), seeded one-pass reservoir samples
(`reservoir_sample`), and the `load_calibration_data` / `load_labelled_data` every run calls: those hand `.npz`/`.npy`
files and flat image folders on to `calibration` unchanged (the same samples, the same `.tflite` bytes). Every
problem is a one-line `CalibrationDataError` naming the file. `write_image_tree` and `write_tfrecords` make such
sources from arrays (the tests and `benchmark_data` do).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from tfcompress.conversion import calibration
from tfcompress.conversion.sources import (  # noqa: F401  (re-exported: the module's public names)
    BATCH_BYTES,
    INTERPOLATION,
    MAX_BATCH,
    TREE_ORDER_SEED,
    DataSpec,
    ImageTree,
    InMemoryDataset,
    Source,
    TfRecords,
)
from tfcompress.core._keras import tf
from tfcompress.core.errors import CalibrationDataError

TFRECORD_SUFFIXES = (".tfrecord", ".tfrecords", ".tfr")


def parse_data_spec(text: str | None) -> DataSpec:
    """`"image=image_raw,label=digit"` (either part may be left out) → `DataSpec`; None → the defaults."""
    if not text:
        return DataSpec()
    values = {}
    for part in text.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or name not in ("image", "label") or not value or name in values:
            raise ValueError(
                "data_spec names the TFRecord features as image=KEY,label=KEY, e.g. image=image_raw,label=label. "
                f"Received: data_spec={text!r}"
            )
        values[name] = value
    return DataSpec(**values)


def is_streamed(path, labelled: bool = False) -> bool:
    """Whether `path` is a source this module reads: a `tf.data.Dataset`, TFRecord file(s) or a class tree.

    With `labelled`, any folder is (a flat folder of images has no labels: `ImageTree` says so); without, a flat
    folder of images stays with `calibration` (unlabelled calibration samples, read as before).
    """
    if isinstance(path, tf.data.Dataset):
        return True
    path = pathlib.Path(path)
    if path.is_file():
        return path.suffix.lower() in TFRECORD_SUFFIXES
    if path.is_dir():
        return labelled or any(p.is_dir() for p in path.iterdir()) or bool(_tfrecord_files(path))
    return False


def _tfrecord_files(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in TFRECORD_SUFFIXES)


def open_source(data, input_shape: Sequence[int | None], *, labelled: bool, what: str = "Evaluation data",
                spec: DataSpec | str | None = None, scale: float = 1.0, offset: float = 0.0,
                num_classes: int | None = None) -> Source:
    """Opens a streamed source (see `is_streamed`) for a model input.

    Args:
        data: a class-per-folder image tree, a TFRecord file or a folder of them, or a `tf.data.Dataset`.
        input_shape: the model input shape including the batch dimension.
        labelled: whether labels are needed (a tree's labels are its folder names; a TFRecord's `spec.label`).
        what: how messages name the data ("Calibration data", "Training data" ...).
        spec: the TFRecord feature names (`DataSpec` or its `parse_data_spec` text).
        scale, offset: the preprocessing (`calibration.preprocess`).
        num_classes: labels must be below it (the model's classes).

    Raises:
        CalibrationDataError: the source cannot be used.
    """
    common = dict(what=what, scale=scale, offset=offset, num_classes=num_classes)
    if isinstance(data, tf.data.Dataset):
        return InMemoryDataset(data, input_shape, labelled=labelled, **common)
    path = pathlib.Path(data)
    calibration._check_exists(path, what, "an image tree, TFRecord files, or an .npz/.npy file")
    spec = spec if isinstance(spec, DataSpec) else parse_data_spec(spec)
    if path.is_file():
        return TfRecords([path], str(path), input_shape, spec, labelled, **common)
    records = _tfrecord_files(path)
    if records:
        return TfRecords(records, f"{path} ({len(records)} TFRecord file(s))", input_shape, spec, labelled,
                         **common)
    return ImageTree(path, input_shape, **common)


def reservoir_sample(source: Source, num_samples: int, seed: int, batch_size: int | None = None,
                     stop: int | None = None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """`min(num_samples, N)` samples of [0, stop) drawn uniformly in one pass (Algorithm R), in source order.

    Deterministic: the same seed (and source) gives the same samples; memory holds `num_samples`, not N.

    Returns:
        (samples, labels or None, N: how many the source held).
    """
    calibration._check_count(num_samples, "num_samples")
    rng = np.random.default_rng(seed)
    kept_x = kept_y = None
    kept_index = np.zeros(0, np.int64)
    seen = 0
    for x, y in source.batches(batch_size, stop=stop):
        if kept_x is None:
            kept_x = np.empty((num_samples, *x.shape[1:]), np.float32)
            kept_y = np.empty(num_samples, np.int64) if y is not None else None
            kept_index = np.full(num_samples, -1, np.int64)
        indices = np.arange(seen, seen + len(x))
        slots = np.where(indices < num_samples, indices, rng.integers(0, indices + 1))
        for row in np.flatnonzero(slots < num_samples):  # in order: a later sample replaces an earlier one
            slot = slots[row]
            kept_x[slot], kept_index[slot] = x[row], indices[row]
            if kept_y is not None:
                kept_y[slot] = y[row]
        seen += len(x)
    if kept_x is None:
        raise CalibrationDataError(
            f"{source.what} {source.description} holds no samples. Expected at least one; pass the data."
        )
    filled = min(num_samples, seen)
    order = np.argsort(kept_index[:filled], kind="stable")
    return kept_x[:filled][order], (None if kept_y is None else kept_y[:filled][order]), seen


def write_image_tree(images: np.ndarray, labels: np.ndarray, root: str | os.PathLike,
                     class_names: Sequence[str] | None = None) -> pathlib.Path:
    """Writes uint8 images as `root/<class>/<index>.png` (a class-per-folder tree); returns `root`."""
    root = pathlib.Path(root)
    names = list(class_names) if class_names is not None else [str(c) for c in range(int(np.max(labels)) + 1)]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    encoded = _encode_png(images)
    for index, (data, label) in enumerate(zip(encoded, labels)):
        (root / names[int(label)] / f"{index:07d}.png").write_bytes(data)
    return root


def write_tfrecords(images: np.ndarray, labels: np.ndarray, path: str | os.PathLike, *, encoded: bool = True,
                    spec: DataSpec | None = None) -> pathlib.Path:
    """Writes `tf.train.Example`s (the image as PNG bytes, or its raw values as floats, and an int64 label)."""
    path, spec = pathlib.Path(path), spec or DataSpec()
    with tf.io.TFRecordWriter(str(path)) as writer:
        values = _encode_png(images) if encoded else images
        for value, label in zip(values, labels):
            image = (tf.train.Feature(bytes_list=tf.train.BytesList(value=[value])) if encoded
                     else tf.train.Feature(float_list=tf.train.FloatList(value=np.ravel(value).astype(np.float32))))
            example = tf.train.Example(features=tf.train.Features(feature={
                spec.image: image, spec.label: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))}))
            writer.write(example.SerializeToString())
    return path


def _encode_png(images: np.ndarray) -> list[bytes]:
    images = np.asarray(images, np.uint8)
    if images.ndim == 3:
        images = images[..., np.newaxis]
    return [tf.io.encode_png(image).numpy() for image in images]


def load_calibration_data(path, input_shape: Sequence[int | None], *, key: str | None = None,
                          num_samples: int = 500, seed: int = 0, scale: float = 1.0, offset: float = 0.0,
                          num_held_out: int = 0, spec: DataSpec | str | None = None) -> calibration.CalibrationData:
    """`calibration.load_calibration_data` for every source: arrays and flat image folders as before (the same
    samples, so the same `.tflite` bytes); streamed sources by seeded one-pass reservoir sampling.

    A streamed source draws `num_samples + num_held_out` samples in one pass; then `num_held_out` of them (at most
    a fifth of the source, seeded with `seed + 1`) are set aside as `held_out`, never calibrated on.
    """
    if not is_streamed(path):
        return calibration.load_calibration_data(path, input_shape, key=key, num_samples=num_samples, seed=seed,
                                                 scale=scale, offset=offset, num_held_out=num_held_out)
    calibration._check_count(num_samples, "num_samples")
    source = open_source(path, input_shape, labelled=False, what="Calibration data", spec=spec, scale=scale,
                         offset=offset)
    drawn, _, available = reservoir_sample(source, num_samples + max(0, num_held_out), seed)
    if available < calibration.MIN_CALIBRATION_SAMPLES:
        calibration._select_indices(available, num_samples, seed)  # raises its one-line error
    held_out = None
    if num_held_out > 0:
        count = min(num_held_out, available // 5)
        kept = np.zeros(len(drawn), bool)
        kept[np.random.default_rng(seed + 1).choice(len(drawn), size=count, replace=False)] = True
        held_out, drawn = drawn[kept], drawn[~kept]
    return calibration.CalibrationData(samples=drawn[:num_samples], source=source.description,
                                       num_available=available, held_out=held_out)


def load_labelled_data(path, input_shape: Sequence[int | None], *, key: str, labels_key: str | None,
                       scale: float = 1.0, offset: float = 0.0, limit: int | None = None,
                       what: str = "Evaluation data", key_flags: str = "--eval_key / --eval_labels_key",
                       class_indices: bool = True, spec: DataSpec | str | None = None,
                       num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """`calibration.load_labelled_data` (or `load_eval_data` without `labels_key`) for every source, in memory.

    For the parts a stage holds whole (an export's check inputs, a sensitivity split, `limit` samples); a source
    too large for memory is streamed by `open_source` instead. Streamed labels are class indices (a tree's folder
    index, a record's label feature).
    """
    if not is_streamed(path, labelled=bool(labels_key)):
        if not labels_key:
            return calibration.load_eval_data(path, input_shape, key=key, labels_key=None, scale=scale,
                                              offset=offset, limit=limit)
        return calibration.load_labelled_data(path, input_shape, key=key, labels_key=labels_key, scale=scale,
                                              offset=offset, limit=limit, what=what, key_flags=key_flags,
                                              class_indices=class_indices)
    calibration._check_count(limit, "limit", allow_none=True)
    source = open_source(path, input_shape, labelled=bool(labels_key), what=what, spec=spec, scale=scale,
                         offset=offset, num_classes=num_classes)
    return source.arrays(0, limit)


@dataclasses.dataclass(frozen=True)
class EvalData:
    """Labelled (or unlabelled) evaluation samples, held in memory or streamed: the one way every stage that
    scores a model on evaluation data reads it, in bounded batches.

    Either `x` (and `y`) arrays, or a streamed `source` read up to `stop` samples.
    """

    x: np.ndarray | None = None
    y: np.ndarray | None = None
    source: Source | None = None
    stop: int | None = None

    @property
    def description(self) -> str:
        return self.source.description if self.source is not None else f"{len(self.x)} samples in memory"

    @property
    def labelled(self) -> bool:
        return self.source.labelled if self.source is not None else self.y is not None

    def batches(self, batch_size: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """`(samples, labels or None)` batches; a streamed source's are checked as they arrive."""
        if self.source is not None:
            yield from self.source.batches(batch_size, stop=self.stop)
            return
        batch_size = batch_size or MAX_BATCH
        for start in range(0, len(self.x), batch_size):
            yield self.x[start:start + batch_size], None if self.y is None else self.y[start:start + batch_size]

    def collect(self, predict: Callable[[np.ndarray], Sequence[np.ndarray]],
                batch_size: int | None = None) -> tuple[list[np.ndarray], np.ndarray | None]:
        """`predict` run batch by batch: every output it returns concatenated, and the labels; the inputs are
        never held together."""
        if self.source is None:
            return list(predict(self.x)), self.y
        parts, labels = [], []
        for x, y in self.batches(batch_size):
            parts.append(list(predict(x)))
            if y is not None:
                labels.append(y)
        if not parts:
            raise CalibrationDataError(f"{self.source.what} {self.source.description} holds no samples. Expected at "
                                       "least one; pass the data.")
        return ([np.concatenate(column) for column in zip(*parts)], np.concatenate(labels) if labels else None)


def open_eval_data(path, input_shape: Sequence[int | None], *, key: str, labels_key: str | None,
                   scale: float = 1.0, offset: float = 0.0, limit: int | None = None,
                   what: str = "Evaluation data", key_flags: str = "--eval_key / --eval_labels_key",
                   class_indices: bool = True, spec: DataSpec | str | None = None,
                   num_classes: int | None = None) -> EvalData:
    """`load_labelled_data`'s data as an `EvalData`: arrays and flat folders loaded as before, a streamed source
    (a tree, TFRecords, a `tf.data.Dataset`) opened and checked now but read batch by batch later."""
    if not is_streamed(path, labelled=bool(labels_key)):
        x, y = load_labelled_data(path, input_shape, key=key, labels_key=labels_key, scale=scale, offset=offset,
                                  limit=limit, what=what, key_flags=key_flags, class_indices=class_indices)
        return EvalData(x, y)
    calibration._check_count(limit, "limit", allow_none=True)
    return EvalData(source=open_source(path, input_shape, labelled=bool(labels_key), what=what, spec=spec,
                                       scale=scale, offset=offset, num_classes=num_classes), stop=limit)
