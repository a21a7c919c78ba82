"""Knowledge-distillation stage: a trained teacher and a small student in, a trained student out.

`Distiller` is a Keras model that wraps a student and a frozen teacher: `fit` trains the student on a
mix of the hard labels and the teacher's temperature-softened outputs (Hinton et al., 2015), `evaluate`
reports the same losses plus the compiled metrics of the student, and calling it runs the student. After
training, `distiller.student` is a plain Keras model that prunes, quantizes, converts and exports like
any other; the teacher is never changed.
"""

from __future__ import annotations

import numbers

import numpy as np

from tfcompress.core._keras import keras, tf
from tfcompress.core.keras3 import as_tf_keras


class Distiller(keras.Model):
    """Trains `student` to match `teacher`'s softened outputs as well as the labels.

    The loss per batch is

        alpha · CE(labels, student) + (1 − alpha) · KL(softmax(teacher / T) ‖ softmax(student / T)) · T²

    with sparse categorical cross-entropy on integer labels; the T² keeps the soft term's gradients at
    the scale of the hard term's as T changes. Both models output **logits** (no softmax at the end), of
    the same shape, or both probabilities with `from_logits=False`.
    The teacher runs in inference mode (`training=False`) and none of its
    weights are trained: `Distiller.trainable_weights` holds the student's only. The caller's teacher
    object itself is left as it was (its `trainable` flag is not touched).

    `fit`, `evaluate` and callbacks work as usual; the logs hold `loss`, `student_loss` (the hard term),
    `distillation_loss` (the soft term, times T²) and each compiled metric measured on the student's
    outputs.

    ```python
    distiller = tfcompress.Distiller(student, teacher, temperature=4.0, alpha=0.1)
    distiller.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    distiller.fit(x, y, epochs=3, validation_data=(x_val, y_val),
                  callbacks=[keras.callbacks.EarlyStopping("val_loss")])
    tflite = tfcompress.convert(tfcompress.load_model(distiller.student), tfcompress.ConvertConfig(), samples)
    ```

    Args:
        student: the tf_keras model to train; outputs logits.
        teacher: a trained tf_keras model; outputs logits of the student's shape.
        temperature: T > 0; higher values soften the teacher's distribution (2 to 8 is typical).
        alpha: weight of the hard-label loss in [0, 1]; 0 trains on the teacher alone.
        from_logits: False when both models end in a softmax and output probabilities (a float model as
            the teacher of its own quantization-aware copy): their logarithms stand in for the logits,
            which is exact up to a per-sample constant that the softmax cancels.
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Raises:
        ValueError: a non-tf_keras model, output shapes that differ, `temperature` <= 0, or `alpha`
            outside [0, 1].
    """

    def __init__(self, student: keras.Model, teacher: keras.Model, temperature: float = 4.0,
                 alpha: float = 0.1, from_logits: bool = True, **kwargs):
        student, teacher = as_tf_keras(student, "Distiller"), as_tf_keras(teacher, "Distiller")
        for role, model in (("student", student), ("teacher", teacher)):
            if not isinstance(model, keras.Model):
                raise ValueError(
                    f"Distiller needs the {role} as a tf_keras (Keras 2) model, the kind tfcompress builds "
                    f"and tfmot wraps. Received: {role}={type(model).__name__}"
                )
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
            raise ValueError(
                "temperature divides the logits before the softmax, so it must be positive (1 leaves them "
                f"as they are; 2 to 8 is typical). Received: temperature={temperature}"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha <= 1:
            raise ValueError(
                "alpha weighs the hard-label loss against the distillation loss, a fraction in [0, 1] "
                f"(0.1 is typical). Received: alpha={alpha}"
            )
        _check_shapes(_output_shape(student), _output_shape(teacher))
        super().__init__(**kwargs)
        self.student = student
        self.teacher = teacher
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.from_logits = bool(from_logits)
        self._hard_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=self.from_logits)
        self._soft_loss = keras.losses.KLDivergence()
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.distillation_loss_tracker = keras.metrics.Mean(name="distillation_loss")

    def compile(self, optimizer="rmsprop", metrics=None, **kwargs):
        """Configures training; the loss is the distillation loss, so `loss` is not an argument.

        Args:
            optimizer: as for `keras.Model.compile`.
            metrics: metrics of the student's outputs against the labels (e.g. `["accuracy"]`).
            **kwargs: other `keras.Model.compile` arguments (`run_eagerly`, `steps_per_execution`, ...).
        """
        for name in ("loss", "loss_weights"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"Distiller computes its own loss from the labels and the teacher (weighted by alpha "
                    f"and temperature), so compile takes no {name}. Leave it out. "
                    f"Received: {name}={kwargs[name]!r}"
                )
        super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    @property
    def trainable_weights(self):
        return self.student.trainable_weights

    @property
    def non_trainable_weights(self):
        return self.student.non_trainable_weights + self.teacher.weights

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.student_loss_tracker, self.distillation_loss_tracker]
        compiled = self.compiled_metrics.metrics if self._is_compiled and self.compiled_metrics else []
        return trackers + list(compiled)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        teacher_logits = self.teacher(x, training=False)
        with tf.GradientTape() as tape:
            student_logits = self.student(x, training=True)
            loss, hard, soft = self._distillation_loss(y, student_logits, teacher_logits, sample_weight)
            regularization = tf.add_n(self.student.losses) if self.student.losses else 0.0
            total = loss + regularization
        variables = self.student.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
        return self._update_metrics(y, student_logits, sample_weight, total, hard, soft)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        teacher_logits = self.teacher(x, training=False)
        student_logits = self.student(x, training=False)
        loss, hard, soft = self._distillation_loss(y, student_logits, teacher_logits, sample_weight)
        return self._update_metrics(y, student_logits, sample_weight, loss, hard, soft)

    def _distillation_loss(self, y, student_logits, teacher_logits, sample_weight):
        if y is None:
            raise ValueError(
                "Distiller trains on labels as well as on the teacher: pass them to fit/evaluate as "
                "(x, y) or a dataset of (x, y) pairs. Received: y=None"
            )
        _check_shapes(tuple(student_logits.shape), tuple(teacher_logits.shape))
        t = self.temperature
        hard = self._hard_loss(y, student_logits, sample_weight=sample_weight)
        if not self.from_logits:  # probabilities: log p is a logit vector of p (softmax(log p) = p), clipped
            # only where float32 ran out (p = 0), far below what a temperature-softened softmax can see
            tiny = tf.constant(np.finfo(np.float32).tiny, student_logits.dtype)
            teacher_logits, student_logits = (tf.math.log(tf.maximum(p, tiny))
                                              for p in (teacher_logits, student_logits))
        soft = self._soft_loss(tf.nn.softmax(teacher_logits / t, axis=-1),
                               tf.nn.softmax(student_logits / t, axis=-1),
                               sample_weight=sample_weight) * (t * t)
        return self.alpha * hard + (1.0 - self.alpha) * soft, hard, soft

    def _update_metrics(self, y, student_logits, sample_weight, loss, hard, soft):
        self.loss_tracker.update_state(loss)
        self.student_loss_tracker.update_state(hard)
        self.distillation_loss_tracker.update_state(soft)
        self.compiled_metrics.update_state(y, student_logits, sample_weight)
        return {m.name: m.result() for m in self.metrics}


def _output_shape(model) -> tuple | None:
    """The single output's shape for a Sequential/functional model; None when not known yet."""
    outputs = getattr(model, "outputs", None)
    if not outputs:
        return None
    if len(outputs) != 1:
        raise ValueError(
            f"Distiller needs models with one output (the logits); model {model.name!r} has "
            f"{len(outputs)}. Received: outputs={len(outputs)}"
        )
    return tuple(outputs[0].shape)


def _check_shapes(student, teacher) -> None:
    if student is None or teacher is None:
        return  # a subclassed model: checked on the first batch instead
    if tuple(student[1:]) != tuple(teacher[1:]):
        raise ValueError(
            "The teacher and the student must output logits of the same shape (one score per class). "
            "Give the student the teacher's output layer size. "
            f"Received: student output shape={tuple(student)}, teacher output shape={tuple(teacher)}"
        )
