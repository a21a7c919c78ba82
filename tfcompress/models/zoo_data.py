"""The data of the test model zoo: small float32 sets derived from the shipped MNIST, or generated.

Takes a seed (and sample counts); returns a `ZooData` of float32 inputs and their targets for one zoo
model (`tfcompress.models.zoo`). Nothing is downloaded. The image sets are cut from the shipped MNIST
(`baseline.MNIST_PATH`): training samples from the start of its training split, evaluation samples from
the start of its test split, which is only ever measured on. The keyword-spotting "spectrograms" and the
anomaly-detection spectra are generated from seeded random numbers with a structure a model has to learn;
each generator's docstring says what that structure is.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from tfcompress.core._keras import tf
from tfcompress.models.baseline import MNIST_PATH, MNIST_SCALE

# The word templates of the synthetic keyword-spotting task are fixed, whatever the sample seed: the
# "language" stays the same while the utterances drawn from it change.
_KWS_TEMPLATE_SEED = 20240611
KWS_FRAMES, KWS_FEATURES, KWS_CLASSES = 49, 10, 12
SPECTRUM_FRAMES, SPECTRUM_BINS = 5, 128


@dataclasses.dataclass(frozen=True)
class ZooData:
    """Training and evaluation data of one zoo model, inputs float32.

    Attributes:
        x_train, y_train: what the model is fitted on (and calibrated with). `y_train` holds int64 class
            indices, float32 regression targets, or for a multi-output model a dict of them by output name.
        x_test, y_test: held-out evaluation samples and their targets, in the same form.
        source: where the data came from, for reports.
        x_anomalous: for the autoencoder, held-out samples that do not follow the training distribution.
    """

    x_train: np.ndarray
    y_train: np.ndarray | dict[str, np.ndarray]
    x_test: np.ndarray
    y_test: np.ndarray | dict[str, np.ndarray]
    source: str
    x_anomalous: np.ndarray | None = None


def mnist_slices(num_train: int, num_test: int,
                 path: str | pathlib.Path = MNIST_PATH) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The first `num_train` training and first `num_test` test images of MNIST, (N, 28, 28) in [0, 1].

    Only the slices are converted to float, so a few thousand images cost milliseconds, not the whole set.
    """
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(
            f"MNIST not found at {path}. Run from a clone of the tfcompress repository (it ships "
            "data/mnist.npz) or pass the path of an mnist.npz with x_train/y_train/x_test/y_test."
        )
    with np.load(path) as d:
        x_train = d["x_train"][:num_train].astype(np.float32) * MNIST_SCALE
        y_train = d["y_train"][:num_train].astype(np.int64)
        x_test = d["x_test"][:num_test].astype(np.float32) * MNIST_SCALE
        y_test = d["y_test"][:num_test].astype(np.int64)
    return x_train, y_train, x_test, y_test


def _padded_rgb(images: np.ndarray) -> np.ndarray:
    # 28x28 grey to 32x32x3: the CIFAR-10 input of MLPerf Tiny's ResNet, 2 black pixels each side.
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=-1)


def _resized_rgb(images: np.ndarray, size: int) -> np.ndarray:
    resized = tf.image.resize(images[..., None], (size, size), method="bilinear").numpy()
    return np.repeat(np.clip(resized, 0.0, 1.0), 3, axis=-1).astype(np.float32)


def mnist_32x32_rgb(seed: int = 0, num_train: int = 3000, num_test: int = 500) -> ZooData:
    """MNIST padded to 32x32 and replicated to three channels, values in [0, 1]; labels are the digits."""
    del seed  # the MNIST slices are fixed; the argument keeps one signature for every zoo data set
    x_train, y_train, x_test, y_test = mnist_slices(num_train, num_test)
    return ZooData(_padded_rgb(x_train), y_train, _padded_rgb(x_test), y_test,
                   source=f"MNIST (shipped) padded to 32x32x3: train[:{num_train}], test[:{num_test}]")


def mnist_96x96_rgb(seed: int = 0, num_train: int = 2000, num_test: int = 500) -> ZooData:
    """MNIST resized (bilinear) to 96x96 and replicated to three channels, values in [0, 1]."""
    del seed  # the MNIST slices are fixed; the argument keeps one signature for every zoo data set
    x_train, y_train, x_test, y_test = mnist_slices(num_train, num_test)
    return ZooData(_resized_rgb(x_train, 96), y_train, _resized_rgb(x_test, 96), y_test,
                   source=f"MNIST (shipped) resized to 96x96x3: train[:{num_train}], test[:{num_test}]")


def mnist_two_targets(seed: int = 0, num_train: int = 3000, num_test: int = 500) -> ZooData:
    """MNIST (28, 28, 1) with two targets by output name: `digit` (0-9) and `parity` (1 for odd digits)."""
    del seed  # the MNIST slices are fixed; the argument keeps one signature for every zoo data set
    x_train, y_train, x_test, y_test = mnist_slices(num_train, num_test)
    return ZooData(
        x_train[..., None], {"digit": y_train, "parity": y_train % 2},
        x_test[..., None], {"digit": y_test, "parity": y_test % 2},
        source=f"MNIST (shipped) 28x28x1, digit and parity: train[:{num_train}], test[:{num_test}]",
    )


def mnist_rows(seed: int = 0, num_train: int = 3000, num_test: int = 500) -> ZooData:
    """MNIST as sequences: 28 time steps (the rows), each of 28 features (the pixels of a row)."""
    del seed  # the MNIST slices are fixed; the argument keeps one signature for every zoo data set
    x_train, y_train, x_test, y_test = mnist_slices(num_train, num_test)
    return ZooData(x_train, y_train, x_test, y_test,
                   source=f"MNIST (shipped) as 28 rows of 28 features: train[:{num_train}], test[:{num_test}]")


def _kws_templates() -> np.ndarray:
    """Ten words, each three syllables: (band centre, band width, length in frames) per syllable."""
    rng = np.random.default_rng(_KWS_TEMPLATE_SEED)
    centres = rng.uniform(0.5, KWS_FEATURES - 1.5, size=(KWS_CLASSES - 2, 3))
    widths = rng.uniform(0.6, 1.6, size=(KWS_CLASSES - 2, 3))
    lengths = rng.integers(6, 11, size=(KWS_CLASSES - 2, 3)).astype(np.float64)
    return np.stack([centres, widths, lengths], axis=-1)


def _utterance(rng: np.random.Generator, word: np.ndarray) -> np.ndarray:
    """One (frames, features) spectrogram of a word: syllables as energy bands sliding over the features."""
    bands = np.arange(KWS_FEATURES, dtype=np.float64)
    frames = np.zeros((KWS_FRAMES, KWS_FEATURES))
    lengths = np.maximum(3, np.round(word[:, 2] * rng.uniform(0.8, 1.25))).astype(int)
    start = int(rng.integers(0, KWS_FRAMES - lengths.sum() + 1))
    for (centre, width, _), length in zip(word, lengths):
        # Each syllable glides by up to one band, like a formant; its loudness rises and falls.
        glide = np.linspace(centre, centre + rng.uniform(-1.0, 1.0), length) + rng.normal(0.0, 0.3)
        envelope = np.sin(np.linspace(0.1, np.pi - 0.1, length)) * rng.uniform(0.7, 1.3)
        frames[start:start + length] += envelope[:, None] * np.exp(
            -0.5 * ((bands[None, :] - glide[:, None]) / width) ** 2)
        start += length
    return frames


def keyword_spectrograms(seed: int = 0, num_train: int = 3000, num_test: int = 600) -> ZooData:
    """Synthetic keyword-spotting features, (49 frames, 10 features, 1), 12 classes as in MLPerf Tiny KWS.

    Class 0 is "silence" (background only), class 1 "unknown" (three syllables of a random word drawn
    afresh for every sample), classes 2-11 are ten fixed words of three syllables each. A syllable is a
    band of energy around a feature centre that glides over its 6-10 frames with a rising and falling
    loudness; every utterance has a random onset, speaking rate (0.8-1.25x), pitch offset and loudness.
    All samples get a background level and Gaussian noise (sigma 0.15). Training and evaluation samples
    are separate draws of one seeded generator; the words do not depend on `seed`.
    """
    rng = np.random.default_rng(seed)
    templates = _kws_templates()
    total = num_train + num_test
    labels = rng.integers(0, KWS_CLASSES, size=total)
    x = np.empty((total, KWS_FRAMES, KWS_FEATURES), dtype=np.float64)
    for i, label in enumerate(labels):
        if label == 0:
            frames = np.zeros((KWS_FRAMES, KWS_FEATURES))
        elif label == 1:
            word = np.stack([rng.uniform(0.5, KWS_FEATURES - 1.5, 3), rng.uniform(0.6, 1.6, 3),
                             rng.integers(6, 11, 3).astype(np.float64)], axis=-1)
            frames = _utterance(rng, word)
        else:
            frames = _utterance(rng, templates[label - 2])
        x[i] = frames + rng.uniform(0.05, 0.2) + rng.normal(0.0, 0.15, size=frames.shape)
    x = x[..., None].astype(np.float32)
    labels = labels.astype(np.int64)
    return ZooData(x[:num_train], labels[:num_train], x[num_train:], labels[num_train:],
                   source=f"generated keyword spectrograms 49x10x1, 12 classes (seed {seed}): "
                          f"{num_train} train, {num_test} eval")


def _machine_spectra(rng: np.random.Generator, count: int, anomalous: bool) -> np.ndarray:
    """`count` samples of 5 log-mel-like frames of 128 bins, flattened to 640 values in about [0, 1]."""
    bins = np.arange(SPECTRUM_BINS, dtype=np.float64)
    f0 = rng.uniform(8.0, 16.0, size=(count, 1, 1))
    decay = rng.uniform(0.6, 0.9, size=(count, 1, 1))
    level = rng.uniform(0.2, 0.4, size=(count, 1, 1))
    tilt = rng.uniform(0.05, 0.2, size=(count, 1, 1))
    harmonics = np.arange(1, 9, dtype=np.float64)[None, :, None]
    # Harmonics of the machine's fundamental on a background that falls towards high frequencies.
    peaks = 0.6 * decay ** (harmonics - 1) * np.exp(-0.5 * ((bins - harmonics * f0) / 1.5) ** 2)
    spectrum = level[:, 0] - tilt[:, 0] * bins / SPECTRUM_BINS + peaks.sum(axis=1)
    if anomalous:
        # A fault: a narrow extra resonance between the harmonics.
        centre = (rng.integers(1, 7, size=(count, 1)) + 0.5) * f0[:, 0]
        spectrum = spectrum + 0.4 * np.exp(-0.5 * ((bins - centre) / 1.0) ** 2)
    # The five frames share the spectrum, each a little louder or quieter, with noise.
    gains = rng.uniform(0.9, 1.1, size=(count, SPECTRUM_FRAMES, 1))
    frames = spectrum[:, None, :] * gains + rng.normal(0.0, 0.02, size=(count, SPECTRUM_FRAMES, SPECTRUM_BINS))
    return frames.reshape(count, SPECTRUM_FRAMES * SPECTRUM_BINS).astype(np.float32)


def machine_spectra(seed: int = 0, num_train: int = 3000, num_test: int = 500) -> ZooData:
    """Synthetic anomaly-detection input: 5 frames x 128 log-mel-like bins = 640 values, as in MLPerf Tiny AD.

    A "normal" sample is the spectrum of a machine running: 8 harmonics of a fundamental (8-16 bins,
    amplitudes decaying by 0.6-0.9 per harmonic, 1.5 bins wide) on a background level with a downward tilt,
    repeated over five frames with +-10% gain each and Gaussian noise (sigma 0.02). `x_anomalous` adds a
    fault to held-out samples: a narrow resonance midway between two harmonics. The targets are the inputs
    (an autoencoder reconstructs them).
    """
    rng = np.random.default_rng(seed)
    x_train = _machine_spectra(rng, num_train, anomalous=False)
    x_test = _machine_spectra(rng, num_test, anomalous=False)
    x_anomalous = _machine_spectra(rng, num_test, anomalous=True)
    return ZooData(x_train, x_train, x_test, x_test, x_anomalous=x_anomalous,
                   source=f"generated machine spectra 5x128=640 (seed {seed}): {num_train} train, "
                          f"{num_test} normal and {num_test} anomalous eval")
