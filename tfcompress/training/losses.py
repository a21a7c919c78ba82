"""The fine-tuning loss and targets of a model: class labels or regression targets, logits or probabilities.

Takes a float Keras model (before any tfmot wrapping) and its training labels; returns the `TrainingLoss`
every fine-tune of that model trains with, and the labels as the loss expects them (`training_targets`):
class indices for a classifier output, float targets for an output they are shaped like (an autoencoder's
targets are its inputs). Decided once, on the float model: tfmot's QAT wrappers replace the output layer's
activation with a quantize-aware one, so a wrapped softmax model would look like it outputs logits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcompress.core._keras import keras
from tfcompress.core.errors import CalibrationDataError

# Fine-tuning losses; softmax/sigmoid outputs train with from_logits=False, others True.
LOSSES = ("auto", "sparse_categorical_crossentropy", "binary_crossentropy", "mean_squared_error")


@dataclasses.dataclass(frozen=True)
class TrainingLoss:
    """The loss every fine-tune trains with, chosen once from the float model's output (or `--loss`)."""

    name: str  # a LOSSES key other than "auto"
    from_logits: bool
    reason: str

    @property
    def regression(self) -> bool:
        return self.name == "mean_squared_error"

    def keras_loss(self):
        if self.name == "binary_crossentropy":
            return keras.losses.BinaryCrossentropy(from_logits=self.from_logits)
        if self.regression:
            return keras.losses.MeanSquaredError()
        return keras.losses.SparseCategoricalCrossentropy(from_logits=self.from_logits)

    @property
    def metrics(self) -> list[str]:
        return ["mse"] if self.regression else ["accuracy"]

    def describe(self) -> str:
        if self.regression:
            return f"{self.name} ({self.reason})"
        return f"{self.name} (from_logits={self.from_logits}: {self.reason})"


def training_loss(model, loss: str = "auto", regression: bool = False, output: int = 0) -> TrainingLoss:
    """The fine-tuning loss for the labels of `model`'s output number `output`, from that output's activation
    (`regression`: float targets).

    A softmax (or sigmoid) output means probabilities (`from_logits=False`); anything else, logits.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss is one of {', '.join(LOSSES)}. Received: loss={loss!r}")
    if regression and loss in ("auto", "mean_squared_error"):
        return TrainingLoss("mean_squared_error", False, "regression targets shaped like the output")
    if loss == "mean_squared_error":
        raise ValueError("loss=mean_squared_error needs regression targets shaped like the model output; the "
                         "training labels are class indices. Pass float targets (--train_labels_key) or leave "
                         "--loss=auto.")
    activation = output_activation(model, output)
    name = loss
    if loss == "auto":
        name = "binary_crossentropy" if activation == "sigmoid" else "sparse_categorical_crossentropy"
    if activation in ("softmax", "sigmoid"):
        return TrainingLoss(name, False, f"the model ends in {activation}")
    return TrainingLoss(name, True, f"the model ends in {activation}, so it outputs logits")


def output_activation(model, output: int = 0) -> str:
    """'softmax', 'sigmoid', or the name of whatever else the layer making output number `output` applies."""
    layer = model.outputs[output]._keras_history.layer
    while hasattr(layer, "layer") and isinstance(layer.layer, keras.layers.Layer):  # pruning/cluster wrappers
        layer = layer.layer
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = getattr(layer, "activation", None)
    for name in ("softmax", "sigmoid"):
        if activation is getattr(keras.activations, name):
            return name
    return getattr(activation, "__name__", "linear") if activation is not None else "linear"


def is_regression_target(labels: np.ndarray, model, output: int = 0) -> bool:
    """Labels shaped like the model's output number `output` (and not one-hot rows) are regression targets."""
    output_shape = tuple(model.outputs[output].shape[1:])
    labels = np.asarray(labels)
    if labels.shape[1:] != output_shape or labels.ndim < 2:
        return False
    one_hot = (labels.shape[1] >= 2 and bool(np.isin(labels, (0, 1)).all())
               and bool(np.all(labels.reshape(len(labels), -1).sum(axis=1) == 1)))
    return not one_hot


def training_targets(labels: np.ndarray, model, source: str, output: int = 0) -> tuple[np.ndarray, bool]:
    """(targets, regression): float32 targets shaped like output number `output`, or int64 class indices."""
    if is_regression_target(labels, model, output):
        return np.asarray(labels, np.float32), True
    labels = np.asarray(labels)
    if labels.ndim == 2:
        labels = labels[:, 0] if labels.shape[1] == 1 else np.argmax(labels, axis=1)
    values = labels.astype(np.float64)
    if labels.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values != np.round(values)) or np.any(values < 0):
        raise CalibrationDataError(
            f"Labels {source} have shape {np.asarray(labels).shape}, neither class indices (N,) nor targets shaped "
            f"like the model output {(None, *model.outputs[output].shape[1:])}: pass one of those."
        )
    return labels.astype(np.int64), False
