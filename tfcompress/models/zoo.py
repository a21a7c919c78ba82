"""The test model zoo: reference architectures of the microcontroller field, built here, trained in seconds.

Takes a zoo model's name and a seed; returns a trained tf_keras functional model and its data
(`train`), and writes what a convert run needs, a `.keras` model with a calibration and an evaluation
`.npz`, to a directory (`write_run_files`). The architectures follow MLPerf Tiny (ResNet-8 image
classification, DS-CNN keyword spotting, the dense anomaly-detection autoencoder), the MobileNet v1 of
visual wake words, and two shapes the pipelines must also meet: a model with two outputs and a recurrent
classifier. Widths are cut where MLPerf's would make training take minutes; each builder says where.
Nothing is downloaded: the data comes from `tfcompress.models.zoo_data`.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import os
from collections.abc import Callable

import numpy as np

from tfcompress.core._keras import keras, tf
from tfcompress.core.artefacts import write_atomic
from tfcompress.models import zoo_data
from tfcompress.models.zoo_data import ZooData

# Short fits see only a few dozen batches; at Keras' default momentum of 0.99 the moving statistics of
# batch normalization would still mostly hold their initial values when the model is evaluated.
BN_MOMENTUM = 0.9


def _conv_bn_relu(x, filters: int, kernel_size, strides, name: str):
    x = keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False,
                            name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def resnet8(num_classes: int = 10, filters: tuple[int, int, int] = (8, 16, 32),
            input_shape: tuple[int, int, int] = (32, 32, 3)) -> keras.Model:
    """ResNet-8 as in MLPerf Tiny image classification, with a quarter of its width by default.

    Stem Conv 3x3-BN-ReLU, then three residual stages (the second and third halve the resolution), each
    Conv-BN-ReLU, Conv-BN, added to the shortcut, ReLU; where the shape changes the shortcut is a 1x1
    strided Conv. Global average pooling and a softmax Dense head. MLPerf uses 16/32/64 filters (78k
    parameters); the default 8/16/32 keeps the zoo's training to seconds.
    """
    inputs = keras.Input(input_shape, name="image")
    x = _conv_bn_relu(inputs, filters[0], 3, 1, "stem")
    channels = filters[0]
    for stage, width in enumerate(filters, start=1):
        strides = 1 if stage == 1 else 2
        name = f"stage{stage}"
        y = _conv_bn_relu(x, width, 3, strides, f"{name}_a")
        y = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_b_conv")(y)
        y = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_b_bn")(y)
        shortcut = x
        if strides != 1 or width != channels:
            shortcut = keras.layers.Conv2D(width, 1, strides=strides, name=f"{name}_projection")(x)
        x = keras.layers.Add(name=f"{name}_add")([y, shortcut])
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
        channels = width
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="resnet8")


def ds_cnn(num_classes: int = zoo_data.KWS_CLASSES, filters: int = 64, num_blocks: int = 4,
           input_shape: tuple[int, int, int] = (zoo_data.KWS_FRAMES, zoo_data.KWS_FEATURES, 1)) -> keras.Model:
    """DS-CNN as in MLPerf Tiny keyword spotting (the small model of Zhang et al., "Hello Edge").

    Conv 10x4 stride 2-BN-ReLU, then `num_blocks` depthwise-separable blocks (DepthwiseConv 3x3-BN-ReLU,
    Conv 1x1-BN-ReLU), average pooling over the whole map and a softmax Dense head. MLPerf's widths
    (64 filters, four blocks); its dropout layers are left out, as training here is too short to overfit.
    """
    inputs = keras.Input(input_shape, name="features")
    x = _conv_bn_relu(inputs, filters, (10, 4), 2, "stem")
    for block in range(1, num_blocks + 1):
        name = f"block{block}"
        x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"{name}_depthwise")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_depthwise_bn")(x)
        x = keras.layers.ReLU(name=f"{name}_depthwise_relu")(x)
        x = _conv_bn_relu(x, filters, 1, 1, f"{name}_pointwise")
    x = keras.layers.AveragePooling2D(pool_size=tuple(x.shape[1:3]), name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="ds_cnn")


def mobilenet_v1(num_classes: int = 10, alpha: float = 0.25,
                 input_shape: tuple[int, int, int] = (96, 96, 3)) -> keras.Model:
    """MobileNet v1 from `keras.applications` (alpha 0.25, 96x96: MLPerf Tiny's visual wake words size).

    Randomly initialised (`weights=None`, nothing is downloaded), with its softmax classifier for
    `num_classes`. The batch-normalization momentum is lowered to `BN_MOMENTUM` for the short fits.
    """
    model = keras.applications.MobileNet(input_shape=input_shape, alpha=alpha, weights=None,
                                         classes=num_classes)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BN_MOMENTUM
    return model


def dense_autoencoder(input_size: int = zoo_data.SPECTRUM_FRAMES * zoo_data.SPECTRUM_BINS,
                      hidden: int = 128, bottleneck: int = 8) -> keras.Model:
    """The dense autoencoder of MLPerf Tiny anomaly detection, 640-128-128-8-128-128-640.

    Every hidden Dense is followed by BN and ReLU (as MLPerf's, which has four 128-unit layers on each
    side where this has two); the output is linear, a reconstruction trained with the mean squared error.
    """
    inputs = keras.Input((input_size,), name="spectrum")
    x = inputs
    for name, units in (("encoder1", hidden), ("encoder2", hidden), ("bottleneck", bottleneck),
                        ("decoder1", hidden), ("decoder2", hidden)):
        x = keras.layers.Dense(units, name=f"{name}_dense")(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    outputs = keras.layers.Dense(input_size, name="reconstruction")(x)
    return keras.Model(inputs, outputs, name="dense_autoencoder")


def two_output(num_classes: int = 10) -> keras.Model:
    """A small CNN with two softmax heads on one trunk: `digit` (10 classes) and `parity` (even, odd)."""
    inputs = keras.Input((28, 28, 1), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(16, 3, activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(32, activation="relu", name="fc")(x)
    digit = keras.layers.Dense(num_classes, activation="softmax", name="digit")(x)
    parity = keras.layers.Dense(2, activation="softmax", name="parity")(x)
    return keras.Model(inputs, [digit, parity], name="two_output")


def gru_classifier(num_classes: int = 10, units: int = 32, steps: int = 28, features: int = 28,
                   unroll: bool = True, batch_size: int | None = None) -> keras.Model:
    """A GRU over a sequence (MNIST rows: 28 steps of 28 features) and a softmax Dense head.

    `unroll=True` unrolls the recurrence over the fixed number of steps, so the converter sees plain
    matrix products and element-wise ops instead of a WHILE loop over a subgraph. With the batch size free
    (`batch_size=None`) the GRU's zero initial state is a FILL whose shape is read from the input at run
    time, which TFLite Micro cannot run; `batch_size=1` fixes it, the converter folds the state into a
    constant, and the model runs in TFLM (the weights are the same, so a trained model's can be copied).
    """
    inputs = keras.Input((steps, features), batch_size=batch_size, name="sequence")
    x = keras.layers.GRU(units, unroll=unroll, name="gru")(inputs)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="gru_classifier")


class Task(str, enum.Enum):
    CLASSIFICATION = "classification"  # one softmax head, integer labels
    REGRESSION = "regression"  # float targets (the autoencoder: its own inputs)
    MULTI_OUTPUT = "multi_output"  # several softmax heads, labels by output name


_LOSSES: dict[str, Callable[[], keras.losses.Loss]] = {
    "sparse_categorical_crossentropy": lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=False),
    "mean_squared_error": keras.losses.MeanSquaredError,
}


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """One entry of the zoo: how to build, feed and train a model.

    Attributes:
        name: the key in `ZOO`.
        builder: returns the untrained model.
        data: takes a seed, returns its `ZooData`.
        task: a `Task` (or its value).
        loss: a key of `_LOSSES`; a multi-output model applies it to every head.
        epochs, batch_size, learning_rate: the short fit (Adam).
    """

    name: str
    builder: Callable[[], keras.Model]
    data: Callable[[int], ZooData]
    task: Task | str
    loss: str
    epochs: int
    batch_size: int = 64
    learning_rate: float = 2e-3

    def __post_init__(self):
        object.__setattr__(self, "task", Task(self.task))
        if self.loss not in _LOSSES:
            raise ValueError(f"loss must be one of {sorted(_LOSSES)}. Received: loss={self.loss!r}")

    @property
    def metrics(self) -> list[str]:
        return ["mse"] if self.task is Task.REGRESSION else ["accuracy"]


_CLASSIFICATION = "sparse_categorical_crossentropy"
# Measured on 2 shared CPU cores, data preparation included: resnet8 11 s, ds_cnn 5 s, mobilenet_v1 25 s,
# dense_autoencoder 4 s, two_output 2 s, gru_classifier 5 s.
ZOO: dict[str, ZooModel] = {
    model.name: model for model in (
        ZooModel("resnet8", resnet8, zoo_data.mnist_32x32_rgb, Task.CLASSIFICATION, _CLASSIFICATION, epochs=8,
                 learning_rate=5e-3),
        ZooModel("ds_cnn", ds_cnn, zoo_data.keyword_spectrograms, Task.CLASSIFICATION, _CLASSIFICATION,
                 epochs=4),
        ZooModel("mobilenet_v1", mobilenet_v1, zoo_data.mnist_96x96_rgb, Task.CLASSIFICATION, _CLASSIFICATION,
                 epochs=5, learning_rate=1e-2),
        ZooModel("dense_autoencoder", dense_autoencoder, zoo_data.machine_spectra, Task.REGRESSION,
                 "mean_squared_error", epochs=20, learning_rate=3e-3),
        ZooModel("two_output", two_output, zoo_data.mnist_two_targets, Task.MULTI_OUTPUT, _CLASSIFICATION,
                 epochs=6, learning_rate=5e-3),
        ZooModel("gru_classifier", gru_classifier, zoo_data.mnist_rows, Task.CLASSIFICATION, _CLASSIFICATION,
                 epochs=12, learning_rate=1e-2),
    )
}


def get(name: str) -> ZooModel:
    """The zoo entry called `name`; `ValueError` listing the zoo for an unknown one."""
    if name not in ZOO:
        raise ValueError(f"Unknown zoo model. Expected one of {sorted(ZOO)}. Received: name={name!r}")
    return ZOO[name]


def train(name: str, seed: int = 0, verbose: int = 0) -> tuple[keras.Model, ZooData]:
    """Builds, compiles and briefly fits the zoo model `name`, reproducibly for a seed on one machine.

    Adam with the entry's learning rate; softmax heads train on sparse categorical cross-entropy of
    probabilities (`from_logits=False`), the autoencoder on the mean squared error.

    Returns:
        The trained model and the data it was trained on (with its held-out evaluation samples).
    """
    entry = get(name)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    data = entry.data(seed)
    model = entry.builder()
    # Cosine decay to zero: the last steps barely move the weights, so the batch-normalization moving
    # statistics (and the int8 ranges calibrated later) describe the weights the model ends with.
    steps = -(-len(data.x_train) // entry.batch_size) * entry.epochs
    schedule = keras.optimizers.schedules.CosineDecay(entry.learning_rate, steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss=_LOSSES[entry.loss](),
                  metrics=entry.metrics)
    model.fit(data.x_train, data.y_train, batch_size=entry.batch_size, epochs=entry.epochs, shuffle=True,
              verbose=verbose)
    return model, data


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """Paths of what `write_run_files` wrote: for `--keras_model`, `--calibration_data`, `--eval_data`."""

    keras_model: str
    calibration_data: str
    eval_data: str


MODEL_FILENAME = "model.keras"
CALIBRATION_FILENAME = "calibration.npz"
EVAL_FILENAME = "eval.npz"


def write_run_files(model: keras.Model, data: ZooData, directory: str | os.PathLike,
                    num_calibration_samples: int = 500) -> RunFiles:
    """Writes a trained zoo model and its data as a convert run reads them.

    - `model.keras`: the tf_keras model.
    - `calibration.npz`: key `x`, the first `num_calibration_samples` training inputs (float32, so the
      run needs no `--input_scale`).
    - `eval.npz`: `x_test` and `y_test` (class indices). A multi-output model's `y_test` holds its first
      head's labels, and every head's labels are also stored as `y_test_<output name>`. A regression
      model's file holds no `y_test`: its targets are floats, and the convert run's accuracy check would
      read a (N, 640) float array as one-hot labels and compare arg-maxes. It holds `x_test` and, for
      the autoencoder, `x_anomalous`; the caller measures the reconstruction error.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    files = RunFiles(keras_model=os.path.join(directory, MODEL_FILENAME),
                     calibration_data=os.path.join(directory, CALIBRATION_FILENAME),
                     eval_data=os.path.join(directory, EVAL_FILENAME))
    model.save(files.keras_model)
    _write_npz(files.calibration_data, x=data.x_train[:num_calibration_samples])
    labels = data.y_test
    if not isinstance(labels, dict) and labels.dtype.kind == "f":  # regression targets, not classes
        extra = {} if data.x_anomalous is None else {"x_anomalous": data.x_anomalous}
        _write_npz(files.eval_data, x_test=data.x_test, **extra)
    elif isinstance(labels, dict):
        first = labels[model.output_names[0]]
        _write_npz(files.eval_data, x_test=data.x_test, y_test=first,
                   **{f"y_test_{name}": values for name, values in labels.items()})
    else:
        _write_npz(files.eval_data, x_test=data.x_test, y_test=labels)
    return files


def _write_npz(path: str, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(path, buffer.getvalue())
