"""Shared fixtures: a small real CNN trained on real MNIST, saved in every format the pipeline reads."""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tfcompress.core._keras import keras, tf

ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST = ROOT / "data" / "mnist.npz"
CALIBRATION = ROOT / "calibration_data" / "mnist_calibration.npz"
SCALE = 1.0 / 255.0
NUM_EVAL = 1000


def run_scripts(script: str, *argument_lists: list[str]) -> list[subprocess.CompletedProcess]:
    """Runs a pipeline script once per argument list, concurrently (each run imports TensorFlow)."""
    processes = [subprocess.Popen([sys.executable, script, *arguments], cwd=ROOT, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for arguments in argument_lists]
    results = []
    for process, arguments in zip(processes, argument_lists):
        out, err = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(arguments, process.returncode, out, err))
    return results


def small_cnn(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.layers.Input((28, 28, 1)),
        keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
        keras.layers.MaxPooling2D(2, name="pool"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(32, activation="relu", name="fc"),
        keras.layers.Dense(10, name="logits"),
    ], name="small_cnn")


@pytest.fixture(scope="session")
def mnist_subset():
    """8,000 training images (train split) and the first 1,000 test images, float32 in [0, 1]."""
    with np.load(MNIST) as d:
        x_train = d["x_train"][:8000, ..., None].astype(np.float32) * SCALE
        y_train = d["y_train"][:8000].astype(np.int64)
        x_test = d["x_test"][:NUM_EVAL, ..., None].astype(np.float32) * SCALE
        y_test = d["y_test"][:NUM_EVAL].astype(np.int64)
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="session")
def trained_model(mnist_subset):
    x_train, y_train, _, _ = mnist_subset
    model = small_cnn()
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    tf.config.experimental.enable_op_determinism()
    model.fit(x_train, y_train, epochs=2, batch_size=64, verbose=0, shuffle=False)
    return model


@pytest.fixture(scope="session")
def saved_model_dir(trained_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "small_cnn_savedmodel"
    trained_model.save(path, save_format="tf")
    return str(path)


@pytest.fixture(scope="session")
def keras_file(trained_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "small_cnn.keras"
    trained_model.save(path)
    return str(path)


@pytest.fixture(scope="session")
def h5_file(trained_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "small_cnn.h5"
    trained_model.save(path)
    return str(path)


@pytest.fixture(scope="session")
def train_npz(tmp_path_factory) -> str:
    """The first 2,200 MNIST training images and labels, raw uint8: the optimize runs' training data."""
    path = tmp_path_factory.mktemp("data") / "train.npz"
    with np.load(MNIST) as d:
        np.savez(path, x_train=d["x_train"][:2200], y_train=d["y_train"][:2200])
    return str(path)


@pytest.fixture(scope="session")
def eval_npz(tmp_path_factory) -> str:
    """The first 1,000 MNIST test images and labels, raw uint8 like the shipped file."""
    path = tmp_path_factory.mktemp("data") / "eval.npz"
    with np.load(MNIST) as d:
        np.savez(path, x_test=d["x_test"][:NUM_EVAL], y_test=d["y_test"][:NUM_EVAL])
    return str(path)


@pytest.fixture(scope="session")
def calibration_samples():
    with np.load(CALIBRATION) as d:
        return d["x"][:200].astype(np.float32) * SCALE


@dataclasses.dataclass(frozen=True)
class TrainedZooModel:
    model: object
    data: object  # zoo_data.ZooData
    files: object  # zoo.RunFiles


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Trains a zoo model (`tfcompress.models.zoo`) on first use and keeps it, with its run files written
    by `zoo.write_run_files`, for the rest of the session: test_zoo and test_micro_zoo share the training."""
    from tfcompress.models import zoo

    cache: dict[str, TrainedZooModel] = {}

    def get(name: str) -> TrainedZooModel:
        if name not in cache:
            model, data = zoo.train(name)
            files = zoo.write_run_files(model, data, tmp_path_factory.mktemp(name))
            cache[name] = TrainedZooModel(model, data, files)
        return cache[name]

    return get
