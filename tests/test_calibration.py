"""Tests of the calibration stage on real files: npz, npy, PNG/JPEG folders and the shipped MNIST."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from tfcompress.conversion import calibration
from tfcompress.conversion.calibration import (
    MIN_CALIBRATION_SAMPLES,
    CalibrationData,
    fit_to_input,
    load_array,
    load_calibration_data,
    load_labelled_data,
    preprocess,
    representative_dataset,
    select,
)
from tfcompress.core.errors import CalibrationDataError, InputError

ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST = ROOT / "data" / "mnist.npz"
SHIPPED = ROOT / "calibration_data" / "mnist_calibration.npz"
MNIST_INPUT = (None, 28, 28, 1)


def _pixels(n: int = 12, shape=(28, 28), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _write_images(folder: pathlib.Path, images: np.ndarray, suffix: str, mode: str) -> pathlib.Path:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image, mode=mode).save(folder / f"img_{i:03d}{suffix}")
    return folder


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---- load_array: formats -------------------------------------------------------------------------


def test_npz_single_array_needs_no_key(tmp_path):
    path = tmp_path / "one.npz"
    np.savez(path, pixels=_pixels(12))
    np.testing.assert_array_equal(load_array(path), _pixels(12))


def test_npz_with_key_and_npy(tmp_path):
    np.savez(tmp_path / "two.npz", x=_pixels(12), y=np.arange(12))
    np.save(tmp_path / "x.npy", _pixels(12))
    np.testing.assert_array_equal(load_array(tmp_path / "two.npz", key="x"), _pixels(12))
    np.testing.assert_array_equal(load_array(str(tmp_path / "x.npy")), _pixels(12))


def test_png_grayscale_folder_is_read_in_name_order(tmp_path):
    images = _pixels(3, (5, 7))
    folder = _write_images(tmp_path / "png", images, ".png", "L")
    loaded = load_array(folder)
    assert loaded.shape == (3, 5, 7) and loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, images)


def test_jpeg_rgb_folder_gives_three_channels(tmp_path):
    folder = _write_images(tmp_path / "jpg", _pixels(2, (6, 4, 3)), ".jpg", "RGB")
    Image.fromarray(_pixels(1, (6, 4))[0], mode="L").save(folder / "z_gray.jpeg")  # converted to RGB
    (folder / "notes.txt").write_text("ignored")
    assert load_array(folder).shape == (3, 6, 4, 3)


# ---- load_array: errors ----------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(CalibrationDataError, match=r"Calibration data not found: .*nope\.npz does not exist\. Expected an \.npz or \.npy file or a folder of \.png/\.jpg/\.jpeg images; fix the path\.") as e:
        load_array(tmp_path / "nope.npz")
    assert isinstance(e.value, InputError)
    _one_line(e)


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2,3")
    with pytest.raises(CalibrationDataError, match=r"data\.csv has an unsupported format \(\.csv\)\. Expected an \.npz or \.npy file or a folder of \.png/\.jpg/\.jpeg images"):
        load_array(path)


def test_corrupt_npz_and_npy(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "bad.npy").write_bytes(b"not numpy at all")
    with pytest.raises(CalibrationDataError, match=r"bad\.npz cannot be read as \.npz \(.*\)\. Expected a complete \.npz file; re-create it with np\.savez") as e:
        load_array(tmp_path / "bad.npz")
    _one_line(e)
    with pytest.raises(CalibrationDataError, match=r"bad\.npy cannot be read as \.npy \(.*\)\. Expected a complete \.npy file; re-create it with np\.save\."):
        load_array(tmp_path / "bad.npy")


def test_npy_saved_as_npz(tmp_path):
    path = tmp_path / "x.npz"
    with open(path, "wb") as f:
        np.save(f, _pixels(12))
    with pytest.raises(CalibrationDataError, match=r"x\.npz cannot be read as \.npz \(it holds a single \.npy array\)"):
        load_array(path)


def test_missing_key_lists_keys(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=_pixels(12), y_train=np.arange(12))
    with pytest.raises(CalibrationDataError, match=r"has no array named 'images'\. Expected one of its keys: x_train, y_train; pass it with --calibration_key\."):
        load_array(tmp_path / "d.npz", key="images")


def test_several_keys_without_key(tmp_path):
    np.savez(tmp_path / "d.npz", x=_pixels(12), y=np.arange(12))
    with pytest.raises(CalibrationDataError, match=r"holds several arrays \(x, y\) and no key was given\. Expected the samples' key; pass it with --calibration_key\."):
        load_array(tmp_path / "d.npz")


def test_npz_without_arrays(tmp_path):
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(CalibrationDataError, match=r"empty\.npz holds no arrays\. Expected at least one"):
        load_array(tmp_path / "empty.npz")


def test_empty_array(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((0, 28, 28), np.uint8))
    with pytest.raises(CalibrationDataError, match=r"e\.npy is empty \(shape \(0, 28, 28\), 0 samples\)\. Expected at least one sample"):
        load_array(tmp_path / "e.npy")


@pytest.mark.parametrize("array, dtype", [(np.array(["a", "b"]), "<U1"), (np.zeros(3, dtype="V4"), "|V4")])
def test_non_numeric_dtype(tmp_path, array, dtype):
    np.save(tmp_path / "s.npy", array)
    with pytest.raises(CalibrationDataError, match=re.escape(f"s.npy holds non-numeric values (dtype {dtype}). Expected a bool, integer or float array")):
        load_array(tmp_path / "s.npy")


def test_object_array(tmp_path):
    np.save(tmp_path / "o.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(CalibrationDataError, match=r"o\.npy holds non-numeric values \(a pickled object array\)\. Expected a bool, integer or float array"):
        load_array(tmp_path / "o.npy")


def test_rank_zero(tmp_path):
    np.save(tmp_path / "s.npy", np.float32(3.0))
    with pytest.raises(CalibrationDataError, match=r"s\.npy holds a scalar \(shape \(\)\)\. Expected an array with a leading sample axis"):
        load_array(tmp_path / "s.npy")


def test_empty_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images")
    with pytest.raises(CalibrationDataError, match=r"folder .*imgs holds no PNG/JPEG images \(found 1 other file\(s\)\)\. Expected \.png, \.jpg or \.jpeg files"):
        load_array(folder)


def test_images_of_different_sizes(tmp_path):
    folder = _write_images(tmp_path / "imgs", _pixels(2, (8, 8)), ".png", "L")
    Image.fromarray(_pixels(1, (8, 9))[0], mode="L").save(folder / "img_001b.png")
    with pytest.raises(CalibrationDataError, match=r"image .*img_001b\.png is 8x9 \(height x width\) but img_000\.png is 8x8\. Expected all images in .* to have the same size; resize them to 8x8\."):
        load_array(folder)


def test_corrupt_image(tmp_path):
    folder = _write_images(tmp_path / "imgs", _pixels(1, (8, 8)), ".png", "L")
    (folder / "img_999.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(CalibrationDataError, match=r"image .*img_999\.png cannot be read \(.*\)\. Expected a valid PNG or JPEG file"):
        load_array(folder)


# ---- preprocess --------------------------------------------------------------------------------------


def test_scale_and_offset_are_exact():
    raw = np.array([[0, 1, 128, 255]], np.uint8)
    out = preprocess(raw, scale=1 / 255, offset=-0.5)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, (raw.astype(np.float64) / 255 - 0.5).astype(np.float32))
    np.testing.assert_array_equal(preprocess(raw, scale=2.0, offset=1.0), [[1, 3, 257, 511]])
    np.testing.assert_array_equal(preprocess(np.array([True, False])), [1.0, 0.0])


def test_fn_replaces_scale():
    out = preprocess(np.array([[2, 4]], np.int32), fn=lambda x: x / 2)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[1, 2]])


def test_nan_and_inf():
    raw = np.ones((2, 3), np.float32)
    raw[0, 2] = np.nan
    raw[1, 0] = np.nan
    with pytest.raises(CalibrationDataError, match=r"Samples from x\.npy contain 2 NaN and 0 Inf value\(s\) after preprocessing \(first at index \(0, 2\)\)\. Expected finite values only"):
        preprocess(raw, source="x.npy")
    raw = np.ones((2, 3), np.float64)
    raw[1, 1] = 1e300  # finite in float64, Inf once cast to float32
    with pytest.raises(CalibrationDataError, match=r"The samples contain 0 NaN and 1 Inf value\(s\) after preprocessing \(first at index \(1, 1\)\)"):
        preprocess(raw)


def test_preprocess_value_errors():
    with pytest.raises(ValueError, match=r"Pass either fn or scale/offset, not both.*Received: fn=.*scale=0\.5, offset=0\.0"):
        preprocess(np.ones(3), scale=0.5, fn=np.asarray)
    with pytest.raises(ValueError, match=r"scale and offset must be finite numbers.*Received: scale=nan, offset=0\.0"):
        preprocess(np.ones(3), scale=float("nan"))


def test_fn_returning_strings():
    with pytest.raises(CalibrationDataError, match=r"preprocessing function returned non-numeric values \(dtype <U1\)"):
        preprocess(np.ones(3), fn=lambda x: np.array(["a"] * 3))


# ---- fit_to_input ------------------------------------------------------------------------------------


def test_channel_axis_is_added():
    assert fit_to_input(np.zeros((4, 28, 28)), MNIST_INPUT).shape == (4, 28, 28, 1)
    assert fit_to_input(np.zeros((4, 28, 28, 1)), MNIST_INPUT).shape == (4, 28, 28, 1)
    assert fit_to_input(np.zeros((4, 30, 20, 3)), (None, None, None, 3)).shape == (4, 30, 20, 3)


def test_wrong_rank():
    with pytest.raises(CalibrationDataError, match=re.escape("Samples from d.npz have shape (4, 784) (rank 2) but the model expects (N, 28, 28, 1) (rank 4); resize or reshape the samples, or pass the model's matching data.")):
        fit_to_input(np.zeros((4, 784)), MNIST_INPUT, source="d.npz")


def test_wrong_spatial_shape():
    with pytest.raises(CalibrationDataError, match=re.escape("The samples have shape (4, 32, 28, 1) but the model expects (N, 28, 28, 1): dimension 1 is 32, expected 28; resize or reshape")):
        fit_to_input(np.zeros((4, 32, 28)), MNIST_INPUT)


def test_wrong_channels():
    with pytest.raises(CalibrationDataError, match=re.escape("Samples from imgs have shape (4, 28, 28, 3) but the model expects (N, 28, 28, 1): 3 channels, expected 1; convert the samples to 1 channels")):
        fit_to_input(np.zeros((4, 28, 28, 3)), MNIST_INPUT, source="imgs")
    with pytest.raises(CalibrationDataError, match=re.escape("The samples have shape (4, 28, 28) (no channel axis) but the model expects (N, 28, 28, 3): 3 channels; convert the samples to 3 channels")):
        fit_to_input(np.zeros((4, 28, 28)), (None, 28, 28, 3))
    with pytest.raises(CalibrationDataError, match=re.escape("expects (N, ?, ?, 3): 1 channels, expected 3")):
        fit_to_input(np.zeros((4, 28, 28, 1)), (None, None, None, 3))


def test_empty_input_shape():
    with pytest.raises(ValueError, match=r"input_shape must include the batch dimension.*Received: input_shape=\(\)"):
        fit_to_input(np.zeros((4, 2)), ())


# ---- select and representative_dataset ---------------------------------------------------------------


def test_select_is_deterministic():
    samples = np.arange(100)
    first = select(samples, 20, seed=1)
    np.testing.assert_array_equal(first, select(samples, 20, seed=1))
    assert not np.array_equal(first, select(samples, 20, seed=2))
    assert len(np.unique(first)) == 20 and np.all(np.diff(first) > 0)
    np.testing.assert_array_equal(select(samples, 500, seed=1), samples)


def test_select_too_few():
    with pytest.raises(CalibrationDataError, match=r"Calibration needs at least 10 samples, found 3; TFLite recommends 100-500\."):
        select(np.zeros((3, 2)), 100, seed=0)
    assert MIN_CALIBRATION_SAMPLES == 10


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_select_bad_num_samples(bad):
    with pytest.raises(ValueError, match=rf"num_samples must be a positive integer, e\.g\. 500\. Received: num_samples={re.escape(repr(bad))}"):
        select(np.zeros((20, 2)), bad, seed=0)


def test_representative_dataset_yields_single_float32_batches_in_order():
    samples = np.arange(12, dtype=np.uint8).reshape(3, 2, 2, 1)
    generate = representative_dataset(samples)
    for _ in range(2):  # the converter may call it more than once: same data every time
        batches = list(generate())
        assert len(batches) == 3
        for sample, batch in zip(samples, batches):
            assert isinstance(batch, list) and len(batch) == 1
            assert batch[0].dtype == np.float32 and batch[0].shape == (1, 2, 2, 1)
            np.testing.assert_array_equal(batch[0][0], sample)
    with pytest.raises(ValueError, match=r"needs at least one sample.*Received: samples\.shape=\(0, 2\)"):
        representative_dataset(np.zeros((0, 2)))


# ---- load_calibration_data ---------------------------------------------------------------------------


def test_mnist_train_calibration_data():
    data = load_calibration_data(MNIST, MNIST_INPUT, key="x_train", num_samples=100, seed=0, scale=1 / 255)
    assert isinstance(data, CalibrationData)
    assert data.samples.shape == (100, 28, 28, 1) and data.samples.dtype == np.float32
    assert data.samples.min() >= 0.0 and data.samples.max() <= 1.0 and data.samples.max() > 0.9
    assert data.num_available == 60000 and "x_train" in data.source
    raw = np.load(MNIST)["x_train"]
    np.testing.assert_array_equal(data.samples[..., 0], select(raw, 100, seed=0) / np.float32(255))


def test_load_calibration_data_from_png_folder_with_fn(tmp_path):
    folder = _write_images(tmp_path / "png", _pixels(12, (28, 28)), ".png", "L")
    data = load_calibration_data(folder, MNIST_INPUT, num_samples=5, fn=lambda x: x / 127.5 - 1)
    assert data.samples.shape == (5, 28, 28, 1) and data.num_available == 12
    assert -1.0 <= data.samples.min() and data.samples.max() <= 1.0


def test_load_calibration_data_errors(tmp_path):
    with pytest.raises(ValueError, match=r"Received: num_samples=0"):
        load_calibration_data(tmp_path / "missing.npz", MNIST_INPUT, num_samples=0)
    with pytest.raises(ValueError, match=r"not both"):
        load_calibration_data(tmp_path / "missing.npz", MNIST_INPUT, offset=1.0, fn=np.asarray)
    raw = _pixels(12).astype(np.float32)
    raw[:, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", raw)
    with pytest.raises(CalibrationDataError, match=r"nan\.npy contain 5 NaN and 0 Inf value\(s\)"):
        load_calibration_data(tmp_path / "nan.npy", MNIST_INPUT, num_samples=5)


def test_shipped_calibration_file_matches_mnist_train():
    with np.load(SHIPPED) as shipped, np.load(MNIST) as mnist:
        assert sorted(shipped.files) == ["indices", "x", "y"]
        indices = shipped["indices"]
        assert shipped["x"].shape == (500, 28, 28, 1) and shipped["x"].dtype == np.uint8
        np.testing.assert_array_equal(indices, np.sort(np.random.default_rng(0).choice(60000, 500, replace=False)))
        np.testing.assert_array_equal(shipped["x"][..., 0], mnist["x_train"][indices])
        np.testing.assert_array_equal(shipped["y"], mnist["y_train"][indices])
    data = load_calibration_data(SHIPPED, MNIST_INPUT, key="x", scale=1 / 255)
    assert data.samples.shape == (500, 28, 28, 1) and data.num_available == 500


# ---- load_labelled_data ------------------------------------------------------------------------------


def test_mnist_test_labelled_data():
    x, y = load_labelled_data(MNIST, MNIST_INPUT, key="x_test", labels_key="y_test", scale=1 / 255, limit=50)
    assert x.shape == (50, 28, 28, 1) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, np.load(MNIST)["y_test"][:50])


def test_one_hot_and_column_labels(tmp_path):
    labels = np.array([3, 1, 0, 2])
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2)), onehot=np.eye(4)[labels], column=labels[:, None].astype(np.float32))
    for labels_key in ("onehot", "column"):
        _, y = load_labelled_data(tmp_path / "d.npz", (None, 2), key="x", labels_key=labels_key)
        np.testing.assert_array_equal(y, labels)
        assert y.dtype == np.int64


def test_labels_of_a_different_length(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10000, 2), np.uint8), y=np.zeros(9999, np.uint8))
    with pytest.raises(CalibrationDataError, match=r"d\.npz has 10000 samples but 9999 labels \(keys 'x', 'y'\)\. Expected one label per sample"):
        load_labelled_data(tmp_path / "d.npz", (None, 2), key="x", labels_key="y")


def test_labels_not_integer(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.array([0.0, 1.5, 2.0]), z=np.zeros((3, 2, 2)))
    with pytest.raises(CalibrationDataError, match=r"Labels .*d\.npz \(key 'y'\) hold 1 value\(s\) that are not class indices \(first: 1\.5 at index 1\)\. Expected non-negative integers"):
        load_labelled_data(tmp_path / "d.npz", (None, 2), key="x", labels_key="y")
    with pytest.raises(CalibrationDataError, match=r"Labels .*\(key 'z'\) have shape \(3, 2, 2\)\. Expected class indices \(N,\) or one-hot \(N, C\)"):
        load_labelled_data(tmp_path / "d.npz", (None, 2), key="x", labels_key="z")


def test_non_npz_eval_data(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    with pytest.raises(CalibrationDataError, match=r"Evaluation data .*x\.npy is not an \.npz archive\. Expected one \.npz holding samples and labels"):
        load_labelled_data(tmp_path / "x.npy", (None, 2), key="x", labels_key="y")
    with pytest.raises(CalibrationDataError, match=r"Evaluation data not found: .*gone\.npz does not exist\. Expected an \.npz archive"):
        load_labelled_data(tmp_path / "gone.npz", (None, 2), key="x", labels_key="y")
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)))
    with pytest.raises(CalibrationDataError, match=r"Evaluation data .*has no array named 'y'\. Expected one of its keys: x; pass the right one with --eval_key / --eval_labels_key\."):
        load_labelled_data(tmp_path / "d.npz", (None, 2), key="x", labels_key="y")


@pytest.mark.parametrize("bad", [0, -1])
def test_labelled_bad_limit(tmp_path, bad):
    with pytest.raises(ValueError, match=rf"limit must be a positive integer, e\.g\. 500\. Received: limit={bad}"):
        load_labelled_data(tmp_path / "d.npz", (None, 2), key="x", labels_key="y", limit=bad)


def test_module_api():
    assert {"load_array", "preprocess", "fit_to_input", "select", "representative_dataset", "CalibrationData", "load_calibration_data", "load_labelled_data"} <= set(dir(calibration))
