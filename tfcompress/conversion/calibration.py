"""Calibration stage: turns user data into the samples the integer converter and the evaluator need.

Takes a path (an `.npz` archive, an `.npy` file or a folder of PNG/JPEG images), the model's input shape
and the preprocessing (`raw * scale + offset`, or a function); returns float32 samples shaped like the
model input: a deterministic selection for `TFLiteConverter.representative_dataset`
(`load_calibration_data`), or the first samples with integer labels for evaluation (`load_labelled_data`).
Every problem with the data is a one-line `CalibrationDataError` naming the file, what was expected, what
was found and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import pathlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from tfcompress.core.errors import CalibrationDataError
from tfcompress.core.progress import progress

MIN_CALIBRATION_SAMPLES = 10
# The largest magnitude a preprocessed sample may hold. Models train on normalized inputs; a value past this
# is a missed scale (or a corrupt sample), and int8 calibration would spend the input's 256 steps on it.
MAX_ABS_VALUE = 1e6

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "F"})
_NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integer, float
_FORMATS = "an .npz or .npy file or a folder of .png/.jpg/.jpeg images"
_FIX_SHAPE = "resize or reshape the samples, or pass the model's matching data."


def load_array(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Reads raw samples from an `.npz` archive, an `.npy` file or a folder of PNG/JPEG images.

    Images are read in file-name order; the first image's mode decides whether all are read as
    grayscale `(H, W)` or colour `(H, W, 3)`.

    Args:
        path: the `.npz`/`.npy` file or the image folder.
        key: the array to read from an `.npz`; may be left out when the archive holds one array.

    Returns:
        The samples as stored (uint8 for images), with a leading sample axis.

    Raises:
        CalibrationDataError: the path is missing, of an unknown format or unreadable, the key is
            missing or ambiguous, or the array is empty, scalar or non-numeric.
    """
    path, what = pathlib.Path(path), "Calibration data"
    _check_exists(path, what, _FORMATS)
    if path.is_dir():
        array = _load_images(path, what)
    elif path.suffix.lower() == ".npz":
        with _open_npz(path, what) as archive:
            array = _read_key(archive, key, path, what, "pass it with --calibration_key")
    elif path.suffix.lower() == ".npy":
        array = _read(lambda: np.load(path, allow_pickle=False), path, what, ".npy")
    else:
        raise CalibrationDataError(
            f"{what} {path} has an unsupported format ({path.suffix or 'no extension'}). Expected "
            f"{_FORMATS}; convert the data, e.g. np.save('samples.npy', x)."
        )
    _check_array(array, str(path), what)
    return array


def _check_exists(path: pathlib.Path, what: str, formats: str) -> None:
    if not path.exists():
        raise CalibrationDataError(
            f"{what} not found: {path} does not exist. Expected {formats}; fix the path."
        )


def _read(load: Callable[[], np.ndarray], path: pathlib.Path, what: str, kind: str):
    try:
        return load()
    except Exception as e:  # np.load raises many types (BadZipFile, OSError, ValueError ...)
        detail = " ".join(str(e).split())
        if detail.startswith("Object arrays cannot be loaded"):
            raise CalibrationDataError(
                f"{what} {path} holds non-numeric values (a pickled object array). Expected a bool, "
                "integer or float array; save it with np.asarray(x, dtype=np.float32)."
            ) from None
        raise CalibrationDataError(
            f"{what} {path} cannot be read as {kind} ({type(e).__name__}: {detail}). Expected a "
            f"complete {kind} file; re-create it with {'np.savez' if kind == '.npz' else 'np.save'}."
        ) from None


def _open_npz(path: pathlib.Path, what: str) -> np.lib.npyio.NpzFile:
    archive = _read(lambda: np.load(path, allow_pickle=False), path, what, ".npz")
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise CalibrationDataError(
            f"{what} {path} cannot be read as .npz (it holds a single .npy array). Expected an .npz "
            "archive; rename it to .npy or re-create it with np.savez."
        )
    return archive


def _read_key(archive, key: str | None, path: pathlib.Path, what: str, key_hint: str) -> np.ndarray:
    keys = list(archive.files)
    if key is None and not keys:
        raise CalibrationDataError(
            f"{what} {path} holds no arrays. Expected at least one; re-create it with "
            "np.savez(path, x=samples)."
        )
    if key is None and len(keys) > 1:
        raise CalibrationDataError(
            f"{what} {path} holds several arrays ({', '.join(keys)}) and no key was given. Expected "
            f"the samples' key; {key_hint}."
        )
    key = keys[0] if key is None else key
    if key not in keys:
        raise CalibrationDataError(
            f"{what} {path} has no array named '{key}'. Expected one of its keys: "
            f"{', '.join(keys) or 'none'}; {key_hint}."
        )
    return _read(lambda: archive[key], path, what, ".npz")


def _load_images(folder: pathlib.Path, what: str) -> np.ndarray:
    entries = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name)
    files = [p for p in entries if p.suffix.lower() in _IMAGE_SUFFIXES]
    if not files:
        raise CalibrationDataError(
            f"{what} folder {folder} holds no PNG/JPEG images (found {len(entries)} other file(s)). "
            "Expected .png, .jpg or .jpeg files; add images or pass the right folder."
        )
    images, mode, size = [], None, None
    for file in files:
        try:
            with Image.open(file) as image:
                if mode is None:
                    mode, size = ("L" if image.mode in _GRAYSCALE_MODES else "RGB"), image.size
                elif image.size != size:
                    raise CalibrationDataError(
                        f"{what} image {file} is {image.height}x{image.width} (height x width) but "
                        f"{files[0].name} is {size[1]}x{size[0]}. Expected all images in {folder} to "
                        f"have the same size; resize them to {size[1]}x{size[0]}."
                    )
                images.append(np.asarray(image.convert(mode)))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise CalibrationDataError(
                f"{what} image {file} cannot be read ({type(e).__name__}: {' '.join(str(e).split())}). "
                "Expected a valid PNG or JPEG file; re-save or remove it."
            ) from None
    return np.stack(images)


def _check_array(array: np.ndarray, source: str, what: str) -> None:
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise CalibrationDataError(
            f"{what} {source} holds non-numeric values (dtype {array.dtype}). Expected a bool, integer "
            "or float array; convert it with np.asarray(x, dtype=np.float32)."
        )
    if array.ndim == 0:
        raise CalibrationDataError(
            f"{what} {source} holds a scalar (shape ()). Expected an array with a leading sample axis, "
            "e.g. (N, 28, 28); save the samples, not a single value."
        )
    if array.size == 0:
        raise CalibrationDataError(
            f"{what} {source} is empty (shape {tuple(array.shape)}, 0 samples). Expected at least one "
            "sample; pass a file that holds the samples."
        )


def _check_preprocessing(scale: float, offset: float, fn: Callable | None) -> None:
    if fn is not None and (scale != 1.0 or offset != 0.0):
        raise ValueError(
            "Pass either fn or scale/offset, not both; fold the scaling into fn or drop fn. "
            f"Received: fn={fn!r}, scale={scale}, offset={offset}"
        )
    if not (math.isfinite(scale) and math.isfinite(offset)):
        raise ValueError(
            "scale and offset must be finite numbers, e.g. scale=1/255. "
            f"Received: scale={scale}, offset={offset}"
        )


def _samples(source: str) -> str:
    return f"Samples from {source}" if source else "The samples"


def preprocess(raw: np.ndarray, scale: float = 1.0, offset: float = 0.0,
               fn: Callable[[np.ndarray], np.ndarray] | None = None, source: str = "") -> np.ndarray:
    """Maps raw samples to the float32 values the model was trained on.

    Args:
        raw: numeric (bool, integer or float) samples.
        scale: multiplier, e.g. `1/255` for uint8 pixels.
        offset: added after scaling.
        fn: instead of `scale`/`offset`, a function from the raw batch to the model's values.
        source: where the samples came from, for error messages.

    Returns:
        `raw * scale + offset` (computed in float64, rounded once) or `fn(raw)`, as float32.

    Raises:
        ValueError: `fn` together with a non-default `scale`/`offset`, or a non-finite `scale`/`offset`.
        CalibrationDataError: the samples are non-numeric, or the result holds NaN, Inf or a value beyond
            `MAX_ABS_VALUE`.
    """
    _check_preprocessing(scale, offset, fn)
    raw = np.asarray(raw)
    _check_array(raw, source or "(in memory)", "Calibration data")
    if fn is None:
        result = raw.astype(np.float64) * scale + offset
    else:
        result = np.asarray(fn(raw))
        if result.dtype.kind not in _NUMERIC_KINDS:
            raise CalibrationDataError(
                f"The preprocessing function returned non-numeric values (dtype {result.dtype}) for "
                f"{source or 'the samples'}. Expected a numeric array; make it return floats."
            )
    with np.errstate(over="ignore"):  # values past float32's range become Inf, reported below
        out = result.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), out.shape))
        num_nan = int(np.isnan(out).sum())
        raise CalibrationDataError(
            f"{_samples(source)} contain {num_nan} NaN and {int(bad.sum()) - num_nan} Inf value(s) after "
            f"preprocessing (first at index {first}). Expected finite values only; repair or drop those "
            "samples, or check the preprocessing (--input_scale, --input_offset)."
        )
    huge = np.abs(out) > MAX_ABS_VALUE
    if huge.any():
        first = tuple(int(i) for i in np.unravel_index(int(np.argmax(huge)), out.shape))
        raise CalibrationDataError(
            f"{_samples(source)} contain {int(huge.sum())} value(s) beyond +-{MAX_ABS_VALUE:.0e} after "
            f"preprocessing (first {float(out[first]):.6g} at index {first}). Expected normalized model inputs; "
            "check the preprocessing (--input_scale, --input_offset), or repair those samples."
        )
    return out


def fit_to_input(samples: np.ndarray, input_shape: Sequence[int | None], source: str = "") -> np.ndarray:
    """Checks samples against the model input shape, adding a missing trailing channel axis of size 1.

    Args:
        samples: samples with a leading sample axis, e.g. `(N, 28, 28)`.
        input_shape: the model input shape including the batch dimension, e.g. `(None, 28, 28, 1)`;
            `None` dimensions accept any size.
        source: where the samples came from, for error messages.

    Returns:
        The samples, shaped `(N, *input_shape[1:])`.

    Raises:
        ValueError: `input_shape` is empty.
        CalibrationDataError: the rank or a fixed dimension does not match.
    """
    input_shape = tuple(None if d is None else int(d) for d in input_shape)
    if not input_shape:
        raise ValueError(
            "input_shape must include the batch dimension, e.g. (None, 28, 28, 1). Received: input_shape=()"
        )
    rank = len(input_shape)
    if samples.ndim == rank - 1 and input_shape[-1] == 1:
        samples = samples[..., np.newaxis]
    expected = "(" + ", ".join(["N"] + ["?" if d is None else str(d) for d in input_shape[1:]]) + ")"
    prefix = f"{_samples(source)} have shape {tuple(samples.shape)}"
    channels = input_shape[-1]
    spatial_match = all(w in (None, h) for w, h in zip(input_shape[1:], samples.shape[1:]))
    if samples.ndim == rank - 1 >= 2 and spatial_match:
        # Only the channel axis is missing and it is not 1 (that case was fixed above): say so plainly.
        raise CalibrationDataError(
            f"{prefix} (no channel axis) but the model expects {expected}: {channels} channels; convert the "
            f"samples to {channels} channels (e.g. grayscale to RGB), or pass the model's matching data."
        )
    if samples.ndim != rank:
        raise CalibrationDataError(
            f"{prefix} (rank {samples.ndim}) but the model expects {expected} (rank {rank}); {_FIX_SHAPE}"
        )
    for axis, (want, have) in enumerate(zip(input_shape, samples.shape)):
        if axis == 0 or want is None or want == have:
            continue
        if axis == rank - 1:
            # A rank-2 input is a feature vector; calling its last axis "channels" would mislead.
            what = "channels" if rank >= 3 else "features"
            raise CalibrationDataError(
                f"{prefix} but the model expects {expected}: {have} {what}, expected {want}; convert the "
                f"samples to {want} {what} (e.g. grayscale vs RGB), or pass the model's matching data."
            )
        raise CalibrationDataError(
            f"{prefix} but the model expects {expected}: dimension {axis} is {have}, expected {want}; "
            f"{_FIX_SHAPE}"
        )
    return samples


def _check_count(value, name: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, e.g. 500. Received: {name}={value!r}")


def _select_indices(num_available: int, num_samples: int, seed: int) -> np.ndarray:
    _check_count(num_samples, "num_samples")
    if num_available < MIN_CALIBRATION_SAMPLES:
        raise CalibrationDataError(
            f"Calibration needs at least {MIN_CALIBRATION_SAMPLES} samples, found {num_available}; TFLite "
            "recommends 100-500. Pass more samples from the training data."
        )
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_available, size=min(num_samples, num_available), replace=False))


def select(samples: np.ndarray, num_samples: int, seed: int) -> np.ndarray:
    """Picks `min(num_samples, len(samples))` samples without replacement, deterministically.

    Args:
        samples: candidate samples, leading sample axis.
        num_samples: how many to keep.
        seed: seed of `np.random.default_rng`; the same seed picks the same samples.

    Returns:
        The chosen samples in their original (sorted index) order.

    Raises:
        ValueError: `num_samples < 1`.
        CalibrationDataError: fewer than `MIN_CALIBRATION_SAMPLES` samples are available.
    """
    return samples[_select_indices(len(samples), num_samples, seed)]


def representative_dataset(samples: np.ndarray,
                           timings: dict | None = None) -> Callable[[], Iterator[list[np.ndarray]]]:
    """Wraps samples (shaped like the model input) as a `TFLiteConverter.representative_dataset`.

    Returns a generator function yielding `[sample[None]]` as float32, one sample at a time and always
    in the same order, so repeated conversions see the same data. Raises `ValueError` for no samples.
    With `timings`, adds to its `calibration_seconds` the time from the first sample asked for to the
    last one consumed: the converter's calibration runs the float model on each as it asks.
    """
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 0 or len(samples) == 0:
        raise ValueError(
            "representative_dataset needs at least one sample with a leading sample axis. "
            f"Received: samples.shape={samples.shape}"
        )

    def generate() -> Iterator[list[np.ndarray]]:
        start = time.perf_counter()
        for sample in progress(samples, total=len(samples), desc="calibrating"):
            yield [sample[np.newaxis]]
        if timings is not None:
            timings["calibration_seconds"] = timings.get("calibration_seconds", 0.0) + time.perf_counter() - start

    return generate


@dataclasses.dataclass(frozen=True)
class CalibrationData:
    """Calibration samples ready for the converter.

    Attributes:
        samples: float32 samples shaped to the model input, the selected ones only.
        source: the file or folder (and key) they came from.
        num_available: how many samples the source held before selection.
    """

    samples: np.ndarray
    source: str
    num_available: int
    held_out: np.ndarray | None = None
    """Samples of the same source that calibration did not use (`num_held_out`), for fidelity checks."""


def _source(path: str | os.PathLike, key: str | None) -> str:
    return os.fspath(path) + (f" (key '{key}')" if key is not None else "")


def load_calibration_data(path: str | os.PathLike, input_shape: Sequence[int | None], *,
                          key: str | None = None, num_samples: int = 500, seed: int = 0,
                          scale: float = 1.0, offset: float = 0.0,
                          fn: Callable[[np.ndarray], np.ndarray] | None = None,
                          num_held_out: int = 0) -> CalibrationData:
    """Loads, selects, preprocesses and shape-checks calibration samples.

    With `num_held_out`, that many samples (seeded, at most a fifth of the source) are set aside first and
    returned as `held_out`; calibration draws from the others only, so the two never share a sample.

    Selection happens on the raw array, so only the chosen samples are converted, and every chosen sample
    is checked. `fn`, when given, receives the chosen raw batch.

    Args:
        path, key: see `load_array`.
        input_shape: model input shape including the batch dimension, e.g. `(None, 28, 28, 1)`.
        num_samples, seed: see `select`.
        scale, offset, fn: see `preprocess`.

    Raises:
        ValueError: bad arguments. CalibrationDataError: the data cannot be used.
    """
    _check_count(num_samples, "num_samples")
    _check_preprocessing(scale, offset, fn)
    raw = load_array(path, key)
    source = _source(path, key)
    held_out = None
    pool = np.arange(len(raw))
    if num_held_out > 0:
        count = min(num_held_out, len(raw) // 5)
        rng = np.random.default_rng(seed + 1)  # another stream than the calibration draw's
        kept = np.sort(rng.choice(len(raw), size=count, replace=False))
        pool = np.setdiff1d(pool, kept)
        held_out = fit_to_input(preprocess(raw[kept], scale, offset, fn, source), input_shape, source)
    chosen = raw[pool[_select_indices(len(pool), num_samples, seed)]]
    samples = fit_to_input(preprocess(chosen, scale, offset, fn, source), input_shape, source)
    return CalibrationData(samples=samples, source=source, num_available=len(raw), held_out=held_out)


def load_eval_data(path: str | os.PathLike, input_shape: Sequence[int | None], *, key: str,
                   labels_key: str | None, scale: float = 1.0, offset: float = 0.0,
                   limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Loads evaluation samples and, when `labels_key` is given, their labels as stored.

    Unlike `load_labelled_data`, labels are not turned into class indices here: they may be class indices,
    one-hot rows or regression targets, and only the model's outputs tell which (`fidelity.interpret_labels`).
    Without `labels_key` the samples alone are returned (a fidelity check needs no labels).
    """
    if labels_key:
        samples, labels = load_labelled_data(path, input_shape, key=key, labels_key=labels_key, scale=scale,
                                             offset=offset, limit=limit, class_indices=False)
        return samples, labels
    _check_count(limit, "limit", allow_none=True)
    path = pathlib.Path(path)
    _check_exists(path, "Evaluation data", "an .npz archive holding samples")
    if path.is_dir() or path.suffix.lower() != ".npz":
        raise CalibrationDataError(
            f"Evaluation data {path} is not an .npz archive. Expected one .npz holding samples (and labels); "
            "save them with np.savez(path, x_test=samples)."
        )
    with _open_npz(path, "Evaluation data") as archive:
        raw = _read_key(archive, key, path, "Evaluation data", "pass the right one with --eval_key")
    source = _source(path, key)
    _check_array(raw, source, "Evaluation data")
    if limit is not None:
        raw = raw[:limit]
    return fit_to_input(preprocess(raw, scale, offset, None, source), input_shape, source), None


def load_labelled_data(path: str | os.PathLike, input_shape: Sequence[int | None], *, key: str,
                       labels_key: str, scale: float = 1.0, offset: float = 0.0,
                       fn: Callable[[np.ndarray], np.ndarray] | None = None,
                       limit: int | None = None, what: str = "Evaluation data",
                       key_flags: str = "--eval_key / --eval_labels_key",
                       class_indices: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Loads labelled samples (evaluation or training data) and their integer labels from one `.npz`.

    Args:
        path: the `.npz` archive; `key` names its samples, `labels_key` its labels (class indices
            `(N,)`, or one-hot `(N, C)`).
        input_shape: model input shape including the batch dimension.
        scale, offset, fn: see `preprocess`.
        limit: keep only the first `limit` samples (no shuffling).
        what, key_flags: how messages name the data and the flags that choose its keys.

    Returns:
        `(samples, labels)`: float32 samples fitted to the input and int64 class indices.

    Raises:
        ValueError: bad arguments. CalibrationDataError: the data cannot be used.
    """
    _check_count(limit, "limit", allow_none=True)
    _check_preprocessing(scale, offset, fn)
    path = pathlib.Path(path)
    hint = f"pass the right one with {key_flags}"
    _check_exists(path, what, "an .npz archive holding samples and labels")
    if path.is_dir() or path.suffix.lower() != ".npz":
        raise CalibrationDataError(
            f"{what} {path} is not an .npz archive. Expected one .npz holding samples and labels; "
            "save both with np.savez(path, x=samples, y=labels)."
        )
    with _open_npz(path, what) as archive:
        raw = _read_key(archive, key, path, what, hint)
        labels = _read_key(archive, labels_key, path, what, hint)
    source, labels_source = _source(path, key), _source(path, labels_key)
    _check_array(raw, source, what)
    _check_array(labels, labels_source, what)
    if len(labels) != len(raw):
        raise CalibrationDataError(
            f"{what} {path} has {len(raw)} samples but {len(labels)} labels (keys '{key}', "
            f"'{labels_key}'). Expected one label per sample; pass matching arrays."
        )
    if class_indices:
        labels = _class_indices(labels, labels_source)
    if limit is not None:
        raw, labels = raw[:limit], labels[:limit]
    return fit_to_input(preprocess(raw, scale, offset, fn, source), input_shape, source), labels


def _class_indices(labels: np.ndarray, source: str) -> np.ndarray:
    if labels.ndim == 2:
        # A single column holds indices, not a one-hot code: argmax would turn it into all zeros.
        labels = labels[:, 0] if labels.shape[1] == 1 else np.argmax(labels, axis=1)
    if labels.ndim != 1:
        raise CalibrationDataError(
            f"Labels {source} have shape {labels.shape}. Expected class indices (N,) or one-hot (N, C); "
            "reshape the labels."
        )
    values = labels.astype(np.float64)
    bad = ~np.isfinite(values) | (values != np.round(values)) | (values < 0)
    if bad.any():
        first = int(np.argmax(bad))
        raise CalibrationDataError(
            f"Labels {source} hold {int(bad.sum())} value(s) that are not class indices (first: "
            f"{labels[first]} at index {first}). Expected non-negative integers; fix the labels."
        )
    return labels.astype(np.int64)
