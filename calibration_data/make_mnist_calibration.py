"""Regenerates `mnist_calibration.npz` from `data/mnist.npz`: 500 MNIST training images, deterministically.

Run from anywhere: `python calibration_data/make_mnist_calibration.py`. Uses only numpy. The draw is the
one `tfcompress.calibration.select(x_train, 500, seed=0)` makes, and it reads the training split only:
calibrating on test images would leak them into the model that is then evaluated on them.
"""

import pathlib

import numpy as np

NUM_SAMPLES = 500
SEED = 0

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE.parent / "data" / "mnist.npz"
TARGET = HERE / "mnist_calibration.npz"


def main() -> None:
    with np.load(SOURCE) as mnist:
        x_train, y_train = mnist["x_train"], mnist["y_train"]
    rng = np.random.default_rng(SEED)
    indices = np.sort(rng.choice(len(x_train), size=NUM_SAMPLES, replace=False))
    np.savez_compressed(
        TARGET,
        x=x_train[indices][..., np.newaxis].astype(np.uint8),
        y=y_train[indices],
        indices=indices.astype(np.int64),
    )
    print(f"Wrote {TARGET}: x {x_train[indices].shape + (1,)} uint8 from MNIST x_train, seed {SEED}.")


if __name__ == "__main__":
    main()
