"""Calibration stage, streamed: the kinds of data source `datasets.open_source` opens, and how each is read.

Takes a class-per-folder image tree (`ImageTree`: labels from the sorted folder names, as
`keras.utils.image_dataset_from_directory` gives them; images resized to the model input with bilinear
interpolation), TFRecord files of `tf.train.Example`s (`TfRecords`: a `DataSpec` names the image and label
features), or a `tf.data.Dataset` of `(input, label)` or of inputs alone (`InMemoryDataset`); each is a `Source`
that yields validated float32 batches shaped like the model input (`batches`), index ranges in memory (`arrays`)
and a `tf.data` pipeline for `model.fit` (`training_dataset`). Memory is bounded by the batch. Every batch is
checked as it streams with the rules of `calibration` (shape and channel count, finite values, label range); a
batch TensorFlow cannot read is decoded again image by image to name the file (`_diagnose_images`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator, Sequence

import numpy as np

from tfcompress.conversion import calibration
from tfcompress.core._keras import tf
from tfcompress.core.errors import CalibrationDataError

INTERPOLATION = "bilinear"
# The tree's files are listed in one fixed shuffled order, so that an index range (the validation split) holds
# every class, as image_dataset_from_directory shuffles before it splits.
TREE_ORDER_SEED = 0
# Streamed batches hold at most this many bytes of float32 inputs (and at most MAX_BATCH samples): 1,000 MNIST
# images, 111 at 224x224x3. Memory is bounded by this, not by the data.
BATCH_BYTES = 64 << 20
MAX_BATCH = 1000
SHUFFLE_BUFFER = 10_000  # encoded records or file paths, not decoded images
PARSE_BATCH = 256  # records of raw values parsed together
_SPEC_FIX = "pass --data_spec=image=KEY,label=KEY with the record's feature names"


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Which features of a TFRecord `tf.train.Example` hold the input and the label.

    The input feature is either an encoded PNG/JPEG (a bytes feature, decoded and resized like a tree's
    images) or the raw values (a float or int64 list holding one input, reshaped to the model input).
    """

    image: str = "image"
    label: str = "label"


class Source:
    """One streamed data source, fitted to one model input.

    Attributes:
        description: where the data comes from, for messages and reports.
        labelled: whether it yields labels.
    """

    description: str
    labelled: bool

    def __init__(self, input_shape: Sequence[int | None], what: str, scale: float, offset: float,
                 num_classes: int | None):
        calibration._check_preprocessing(scale, offset, None)
        self.input_shape = tuple(None if d is None else int(d) for d in input_shape)
        self.what, self.scale, self.offset, self.num_classes = what, scale, offset, num_classes
        self._count = None

    # What each kind of source provides -------------------------------------------------------------------
    def _elements(self, start: int, stop: int | None, shuffle_seed: int | None) -> tf.data.Dataset:
        """(raw input, label) elements in the source's order (or shuffled), before batching."""
        raise NotImplementedError

    def _diagnose(self, start: int, stop: int, error: Exception) -> CalibrationDataError:
        """The one-line error for a batch [start, stop) that TensorFlow failed to read."""
        return CalibrationDataError(f"{self.what} {self.description} cannot be read ({_one_line(error)}). "
                                    "Expected readable records; re-create the data.")

    def count(self) -> int:
        if self._count is None:
            self._count = int(self._elements(0, None, None).reduce(np.int64(0), lambda n, _: n + 1).numpy())
        return self._count

    # What every source offers ---------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Samples per streamed batch: `BATCH_BYTES` of float32 inputs, at most `MAX_BATCH`."""
        per_sample = 4 * int(np.prod([d or 1 for d in self.input_shape[1:]]))
        return max(1, min(MAX_BATCH, BATCH_BYTES // per_sample))

    def batches(self, batch_size: int | None = None, start: int = 0,
                stop: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Validated `(float32 samples fitted to the input, int64 labels or None)` batches of [start, stop)."""
        batch_size = batch_size or self.batch_size
        dataset = self._elements(start, stop, None).batch(batch_size).prefetch(tf.data.AUTOTUNE)
        position = start
        iterator = iter(dataset.as_numpy_iterator())
        while True:
            try:
                raw, labels = next(iterator)
            except StopIteration:
                return
            except (tf.errors.OpError, ValueError) as e:
                raise self._diagnose(position, position + batch_size, e) from None
            yield self.check(raw, labels, position)
            position += len(raw)

    def check(self, raw: np.ndarray, labels: np.ndarray | None, position: int = 0):
        """One streamed batch through `calibration`'s rules, and its labels against the classes."""
        source = f"{self.description} (samples {position} to {position + len(raw) - 1})"
        if raw.ndim == len(self.input_shape) + 1 and raw.shape[-1] == 1:  # (H, W, 1) images for an (H, W) input
            raw = raw[..., 0]
        samples = calibration.fit_to_input(
            calibration.preprocess(raw, self.scale, self.offset, None, source), self.input_shape, source)
        if not self.labelled:
            return samples, None
        labels = calibration._class_indices(np.asarray(labels), source)
        if self.num_classes is not None and len(labels) and labels.max() >= self.num_classes:
            raise CalibrationDataError(
                f"Labels {source} hold class indices from {int(labels.min())} to {int(labels.max())}, outside "
                f"the {self.num_classes} classes of the model's output (0 to {self.num_classes - 1}): pass this "
                "model's labels."
            )
        return samples, labels

    def arrays(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """[start, stop) in memory: for the small parts (a validation split, a limit), never the whole data."""
        xs, ys = [], []
        for x, y in self.batches(start=start, stop=stop):
            xs.append(x)
            ys.append(y)
        if not xs:
            raise CalibrationDataError(
                f"{self.what} {self.description} holds no samples in [{start}, {stop}). Expected at least one; "
                "pass more data."
            )
        return np.concatenate(xs), (np.concatenate(ys) if self.labelled else None)

    def training_dataset(self, batch_size: int, seed: int, start: int = 0, stop: int | None = None,
                         shuffle: bool = True) -> tf.data.Dataset:
        """(inputs, labels) batches for `model.fit`: shuffled before decoding (seeded, reshuffled each epoch),
        decoded in parallel, scaled, prefetched. Run `reservoir_sample` (or `batches`) over the range first:
        that pass applies the checks, which inside `fit` could only fail as a TensorFlow traceback."""
        shape = [-1, *(d for d in self.input_shape[1:])]
        scale, offset = self.scale, self.offset

        def scaled(raw, labels):
            return tf.reshape(tf.cast(raw, tf.float32) * scale + offset, shape), labels

        count = (self.count() if stop is None else stop) - start
        elements = self._elements(start, stop, seed if shuffle else None).batch(batch_size)
        # A known length: fit's progress and PruningCallback read the steps per epoch (a TFRecord has none).
        elements = elements.apply(tf.data.experimental.assert_cardinality(-(-count // batch_size)))
        return elements.map(scaled, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


class ImageTree(Source):
    """A folder of class sub-folders of PNG/JPEG images; the label is the index of the sorted folder name."""

    labelled = True

    def __init__(self, root: pathlib.Path, input_shape, what: str = "Evaluation data", scale: float = 1.0,
                 offset: float = 0.0, num_classes: int | None = None):
        super().__init__(input_shape, what, scale, offset, num_classes)
        self.root, self.description = root, str(root)
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        if not folders:
            raise CalibrationDataError(
                f"{what} folder {root} has no class sub-folders. Expected one sub-folder of images per class "
                "(labels come from the folder names); put each class's images in its own folder."
            )
        self.class_names = tuple(p.name for p in folders)
        paths, labels = [], []
        for label, folder in enumerate(folders):
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            if not files:
                raise CalibrationDataError(
                    f"{what} class folder {folder} is empty. Expected at least one PNG/JPEG image per class; add "
                    "images or remove the folder."
                )
            for file in files:
                if file.suffix.lower() not in calibration._IMAGE_SUFFIXES:
                    raise CalibrationDataError(
                        f"{what} file {file} is not a PNG/JPEG image. Expected only .png, .jpg or .jpeg files in "
                        "the class folders; remove it."
                    )
            paths += [str(p) for p in files]
            labels += [label] * len(files)
        order = np.random.default_rng(TREE_ORDER_SEED).permutation(len(paths))
        self.paths = np.asarray(paths)[order]
        self.labels = np.asarray(labels, np.int64)[order]
        self._count = len(self.paths)
        rank = len(self.input_shape)
        if rank not in (3, 4) or None in self.input_shape[1:3]:
            raise CalibrationDataError(
                f"{what} {root} holds images, but the model input {self.input_shape} is not a fixed "
                "(height, width[, channels]) image: pass arrays (.npz) shaped like the input."
            )
        self.channels = self.input_shape[3] if rank == 4 else 1

    def _elements(self, start, stop, shuffle_seed):
        paths, labels = self.paths[start:stop], self.labels[start:stop]
        dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
        if shuffle_seed is not None:
            dataset = dataset.shuffle(min(len(paths), SHUFFLE_BUFFER), seed=shuffle_seed,
                                      reshuffle_each_iteration=True)
        size, channels = self.input_shape[1:3], self.channels
        return dataset.map(lambda path, label: (_decode(tf.io.read_file(path), size, channels), label),
                           num_parallel_calls=tf.data.AUTOTUNE)

    def _diagnose(self, start, stop, error):
        return _diagnose_images([(p, tf.io.read_file(p)) for p in self.paths[start:stop]], self, error)


class TfRecords(Source):
    """`tf.train.Example` records in one or more TFRecord files; `spec` names the input and label features."""

    def __init__(self, files: list[pathlib.Path], description: str, input_shape, spec: DataSpec,
                 labelled: bool, what: str = "Evaluation data", scale: float = 1.0, offset: float = 0.0,
                 num_classes: int | None = None):
        super().__init__(input_shape, what, scale, offset, num_classes)
        self.files, self.description, self.spec, self.labelled = [str(f) for f in files], description, spec, labelled
        first = files[0]
        try:
            record = next(iter(tf.data.TFRecordDataset(str(first)).take(1).as_numpy_iterator()), None)
            example = None if record is None else tf.train.Example.FromString(record)
        except Exception as e:  # a truncated or foreign file: DataLossError, DecodeError
            raise CalibrationDataError(
                f"{what} {first} cannot be read as TFRecord ({_one_line(e)}). Expected TFRecord files of "
                "tf.train.Example records; re-create it with tf.io.TFRecordWriter."
            ) from None
        if example is None:
            raise CalibrationDataError(
                f"{what} {first} holds no records. Expected tf.train.Example records; pass a non-empty file."
            )
        features = example.features.feature
        for role, key in (("image", spec.image), ("label", spec.label))[: 2 if labelled else 1]:
            if key not in features:
                raise CalibrationDataError(
                    f"{what} {first} has no feature '{key}' (the {role} key of the data spec); its features are "
                    f"{', '.join(sorted(features)) or 'none'}: {_SPEC_FIX}."
                )
        self.encoded = features[spec.image].WhichOneof("kind") == "bytes_list"
        if self.encoded and (len(self.input_shape) not in (3, 4) or None in self.input_shape[1:3]):
            raise CalibrationDataError(
                f"{what} {first} holds encoded images, but the model input {self.input_shape} is not a fixed "
                "image shape: store the raw values as a float list instead."
            )
        self.channels = (self.input_shape[3] if len(self.input_shape) == 4 else 1) if self.encoded else None
        label_kind = features[spec.label].WhichOneof("kind") if labelled else None
        self._label_dtype = tf.float32 if label_kind == "float_list" else tf.int64

    def _elements(self, start, stop, shuffle_seed):
        dataset = tf.data.TFRecordDataset(self.files).skip(start)
        if stop is not None:
            dataset = dataset.take(stop - start)
        if shuffle_seed is not None:
            dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=True)
        spec = self.spec
        features = {spec.image: (tf.io.FixedLenFeature([], tf.string) if self.encoded
                                 else tf.io.VarLenFeature(tf.float32))}
        if self.labelled:
            features[spec.label] = tf.io.FixedLenFeature([], self._label_dtype)
        size, channels, shape = self.input_shape[1:3], self.channels, [d for d in self.input_shape[1:]]

        if not self.encoded and None not in shape:
            # Raw values of a fixed shape: parsed a batch at a time (each record's length still checked exactly),
            # about twice as fast as one record at a time.
            features[spec.image] = tf.io.FixedLenFeature([int(np.prod(shape))], tf.float32)

            def parse_batch(records):
                parsed = tf.io.parse_example(records, features)
                images = tf.reshape(parsed[spec.image], [-1, *shape])
                labels = (tf.cast(parsed[spec.label], tf.int64) if self.labelled
                          else tf.zeros(tf.shape(records)[:1], tf.int64))
                return images, labels

            return dataset.batch(PARSE_BATCH).map(parse_batch, num_parallel_calls=tf.data.AUTOTUNE).unbatch()

        def parse(record):
            parsed = tf.io.parse_single_example(record, features)
            value = parsed[spec.image]
            image = (_decode(value, size, channels) if self.encoded
                     else tf.reshape(tf.sparse.to_dense(value), [-1 if d is None else d for d in shape]))
            label = tf.cast(parsed[spec.label], tf.int64) if self.labelled else tf.zeros([], tf.int64)
            return image, label

        return dataset.map(parse, num_parallel_calls=tf.data.AUTOTUNE)

    def count(self) -> int:
        """The records, counted without parsing or decoding them."""
        if self._count is None:
            records = tf.data.TFRecordDataset(self.files)
            self._count = int(records.reduce(np.int64(0), lambda n, _: n + 1).numpy())
        return self._count

    def _diagnose(self, start, stop, error):
        detail = _one_line(error)
        if self.encoded and "Key:" not in detail and "DataLoss" not in type(error).__name__:
            records = tf.data.TFRecordDataset(self.files).skip(start).take(stop - start)
            encoded = [tf.io.parse_single_example(r, {self.spec.image: tf.io.FixedLenFeature([], tf.string)})
                       [self.spec.image] for r in records]
            return _diagnose_images([(f"{self.description} record {start + i}", value)
                                     for i, value in enumerate(encoded)], self, error)
        shape = self.input_shape[1:]
        if not self.encoded and None not in shape and "DataLoss" not in type(error).__name__:
            wanted = int(np.prod(shape))
            records = tf.data.TFRecordDataset(self.files).skip(start).take(stop - start)
            for i, record in enumerate(records):  # the first record of another length than the input's
                example = tf.train.Example.FromString(record.numpy())
                found = len(example.features.feature[self.spec.image].float_list.value)
                if found != wanted:
                    return CalibrationDataError(
                        f"{self.what} {self.description} record {start + i} holds {found} values in "
                        f"'{self.spec.image}'; the model input {tuple(shape)} needs {wanted}. Expected every record "
                        "to hold one input's raw values: re-create the files for this model's input."
                    )
        return CalibrationDataError(
            f"{self.what} {self.description} cannot be read near record {start} ({detail}). Expected complete "
            f"tf.train.Example records whose features match the data spec ({self.spec.image}, {self.spec.label}): "
            f"{_SPEC_FIX}, or re-create the files."
        )


class InMemoryDataset(Source):
    """A user's `tf.data.Dataset` of `(input, label)` pairs or of inputs alone, batched or not (API only)."""

    def __init__(self, dataset: tf.data.Dataset, input_shape, what: str = "Evaluation data", scale: float = 1.0,
                 offset: float = 0.0, num_classes: int | None = None, labelled: bool = True):
        super().__init__(input_shape, what, scale, offset, num_classes)
        self.description = "the tf.data.Dataset"
        spec = dataset.element_spec
        paired = isinstance(spec, tuple) and len(spec) == 2
        if labelled and not paired:
            raise CalibrationDataError(
                f"{what} {self.description} yields {spec}, not (input, label) pairs. Expected a dataset of "
                "(input, label); zip the inputs with their labels."
            )
        self.labelled = labelled
        x_spec = spec[0] if paired else spec
        if x_spec.shape.rank == len(self.input_shape):  # batched: unbatch, so ranges and batch sizes are ours
            dataset = dataset.unbatch()
        self.dataset = dataset if paired else dataset.map(lambda x: (x, tf.zeros([], tf.int64)))

    def _elements(self, start, stop, shuffle_seed):
        dataset = self.dataset.skip(start)
        if stop is not None:
            dataset = dataset.take(stop - start)
        if shuffle_seed is not None:
            dataset = dataset.shuffle(SHUFFLE_BUFFER, seed=shuffle_seed, reshuffle_each_iteration=True)
        return dataset.map(lambda x, y: (tf.cast(x, tf.float32), tf.cast(y, tf.int64)))


def _decode(encoded, size, channels: int):
    """An encoded PNG/JPEG at its own channel count (checked against `channels`), resized to `size`."""
    image = tf.io.decode_image(encoded, channels=0, expand_animations=False)
    tf.debugging.assert_equal(tf.shape(image)[-1], channels, message="channel count differs from the model input")
    image = tf.image.resize(image, size, method=INTERPOLATION)  # float32; the same size keeps the pixels exact
    image.set_shape([*size, channels])
    return image


def _diagnose_images(items: list[tuple[str, object]], source: Source, error: Exception) -> CalibrationDataError:
    """Decodes a failed batch's images one at a time to name the file and the cause."""
    for name, encoded in items:
        try:
            image = tf.io.decode_image(encoded, channels=0, expand_animations=False)
        except (tf.errors.OpError, ValueError) as e:
            return CalibrationDataError(
                f"{source.what} image {_name(name)} cannot be read ({_one_line(e)}). Expected a valid PNG or JPEG "
                "file; re-save or remove it."
            )
        if int(image.shape[-1]) != source.channels:
            return CalibrationDataError(
                f"{source.what} image {_name(name)} has {int(image.shape[-1])} channel(s) but the model input "
                f"{source.input_shape} has {source.channels}; convert the images (e.g. grayscale to RGB), or pass "
                "the model's matching data."
            )
    return CalibrationDataError(f"{source.what} {source.description} cannot be read ({_one_line(error)}). Expected "
                                "readable PNG/JPEG images; re-save them.")


def _name(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def _one_line(error: BaseException) -> str:
    detail = " ".join(str(error).split()) or type(error).__name__
    return detail if len(detail) <= 200 else detail[:200] + "..."
