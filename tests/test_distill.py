"""Tests for the distillation stage: a small MLP student learns MNIST from the trained CNN teacher."""

from __future__ import annotations

import numpy as np
import pytest

from tfcompress.core._keras import keras, tf
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.training.distill import Distiller
from tfcompress.core.model_io import load_model
from tfcompress.conversion.verify import verify

SAMPLES = 4000
LOGS = {"loss", "student_loss", "distillation_loss", "accuracy"}


def _student(units: int = 10, seed: int = 1) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.layers.Input((28, 28, 1)),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(32, activation="relu", name="hidden"),
        keras.layers.Dense(units, name="logits"),
    ], name="student")


def _distiller(teacher, **kwargs) -> Distiller:
    distiller = Distiller(_student(), teacher, **kwargs)
    distiller.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    return distiller


def test_student_learns_from_the_teacher_and_exports_to_int8(trained_model, mnist_subset,
                                                             calibration_samples):
    x_train, y_train, x_test, y_test = mnist_subset
    teacher_weights = [w.copy() for w in trained_model.get_weights()]
    distiller = _distiller(trained_model)
    student_variables = {id(v) for v in distiller.student.trainable_variables}
    assert {id(v) for v in distiller.trainable_variables} == student_variables
    seen = []
    callbacks = [keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(dict(logs))),
                 keras.callbacks.EarlyStopping("val_loss", patience=2)]
    history = distiller.fit(x_train[:SAMPLES], y_train[:SAMPLES], batch_size=64, epochs=2, verbose=0,
                            validation_data=(x_test, y_test), callbacks=callbacks)
    losses = history.history["loss"]
    assert losses[1] < losses[0]
    assert len(seen) == 2 and LOGS | {f"val_{name}" for name in LOGS} <= set(seen[-1])
    evaluated = distiller.evaluate(x_test, y_test, verbose=0, return_dict=True)
    assert set(evaluated) == LOGS
    assert evaluated["accuracy"] > 0.5  # chance is 0.1
    # The teacher is frozen and the caller's object untouched.
    for old, new in zip(teacher_weights, trained_model.get_weights()):
        np.testing.assert_array_equal(old, new)
    assert trained_model.trainable
    # Calling the distiller runs the student; the student is a plain model that converts like any other.
    np.testing.assert_allclose(distiller.predict(x_test[:32], verbose=0),
                               distiller.student(x_test[:32]).numpy(), rtol=1e-5, atol=1e-5)
    flatbuffer = convert(load_model(distiller.student), ConvertConfig(), calibration_samples)
    result = verify(flatbuffer, "int8", "uint8", float_model=load_model(distiller.student),
                    eval_samples=x_test, eval_labels=y_test, max_accuracy_drop=0.02)
    assert result.accuracy.tflite_accuracy > 0.5


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_loss_is_the_documented_mix(trained_model, mnist_subset, alpha):
    _, _, x_test, y_test = mnist_subset
    x, y = x_test[:128], y_test[:128]
    temperature = 3.0
    distiller = _distiller(trained_model, temperature=temperature, alpha=alpha)
    logs = distiller.evaluate(x, y, batch_size=128, verbose=0, return_dict=True)
    student = distiller.student(x).numpy().astype(np.float64)
    teacher = trained_model(x).numpy().astype(np.float64)

    def softmax(z):
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    hard = -np.mean(np.log(softmax(student)[np.arange(len(y)), y]))
    p, q = softmax(teacher / temperature), softmax(student / temperature)
    soft = np.mean(np.sum(p * np.log(p / q), axis=-1)) * temperature**2
    assert logs["student_loss"] == pytest.approx(hard, rel=1e-4)
    assert logs["distillation_loss"] == pytest.approx(soft, rel=1e-3)
    assert logs["loss"] == pytest.approx(alpha * hard + (1 - alpha) * soft, rel=1e-3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=0), r"must be positive .* Received: temperature=0$"),
    (dict(temperature=-2.0), r"Received: temperature=-2.0$"),
    (dict(alpha=1.5), r"fraction in \[0, 1\] .* Received: alpha=1.5$"),
    (dict(alpha=-0.1), r"Received: alpha=-0.1$"),
])
def test_bad_arguments(trained_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Distiller(_student(), trained_model, **kwargs)


def test_mismatched_models_and_misuse_are_refused(trained_model, mnist_subset):
    x_train, y_train, _, _ = mnist_subset
    with pytest.raises(ValueError, match=r"same shape .* Received: student output shape=\(None, 5\), "
                                         r"teacher output shape=\(None, 10\)"):
        Distiller(_student(units=5), trained_model)
    with pytest.raises(ValueError, match=r"student as a tf_keras .* Received: student=str"):
        Distiller("student.h5", trained_model)
    distiller = Distiller(_student(), trained_model)
    with pytest.raises(ValueError, match=r"compile takes no loss.* Received: loss='mse'"):
        distiller.compile("adam", loss="mse")
    distiller.compile("adam")
    with pytest.raises(ValueError, match=r"trains on labels as well.* Received: y=None"):
        distiller.fit(x_train[:64], epochs=1, verbose=0)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.flatten = keras.layers.Flatten()
            self.dense = keras.layers.Dense(7)

        def call(self, x):
            return self.dense(self.flatten(x))

    # A subclassed student has no static output shape: the first batch (of 32) checks it.
    distiller = Distiller(Subclassed(), trained_model)
    distiller.compile("adam")
    with pytest.raises(ValueError, match=r"student output shape=\(32, 7\), teacher output shape=\(32, 10\)"):
        distiller.fit(tf.constant(x_train[:64]), y_train[:64], epochs=1, verbose=0)


def test_probability_models_distil_exactly_as_their_logit_models(trained_model, mnist_subset):
    # softmax(log p) = p: a student and teacher that end in softmax (from_logits=False) give the losses of
    # the same models without it (from_logits=True), so a float model can teach its own QAT copy.
    x_train, y_train, _, _ = mnist_subset
    student = _student()
    with_softmax = {name: keras.Sequential([model, keras.layers.Softmax()])
                    for name, model in (("student", student), ("teacher", trained_model))}
    x, y = x_train[:256], y_train[:256]
    losses = []
    for distiller in (Distiller(student, trained_model, temperature=3.0, alpha=0.3),
                      Distiller(with_softmax["student"], with_softmax["teacher"], temperature=3.0, alpha=0.3,
                                from_logits=False)):
        distiller.compile(keras.optimizers.SGD(0.0))
        losses.append(distiller.evaluate(x, y, verbose=0, return_dict=True))
    for name in ("loss", "student_loss", "distillation_loss"):
        assert losses[1][name] == pytest.approx(losses[0][name], rel=1e-4), name
