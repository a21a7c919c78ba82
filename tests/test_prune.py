"""Tests for the pruning stage: tiny real models fine-tuned on small slices of real MNIST."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_cnn

from tfcompress.core._keras import keras, tf
from tfcompress.core.errors import TfcompressError
from tfcompress.training.prune import (
    ConstantSparsity,
    PolynomialDecay,
    PruneLowMagnitude,
    PruningCallback,
    SparsityNotReachedError,
    prune,
    sparsity,
    strip,
)

BATCH = 64
SAMPLES = 1024
STEPS = SAMPLES // BATCH  # 16 steps per epoch


@pytest.fixture(scope="module")
def data(mnist_subset):
    x_train, y_train, _, _ = mnist_subset
    return x_train[:SAMPLES], y_train[:SAMPLES]


def _fit(model, data, epochs=1, callbacks=None, **kwargs):
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    x, y = data
    if callbacks is None:
        callbacks = [PruningCallback()]
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, shuffle=False, callbacks=callbacks,
                     **kwargs)


def _wrappers(model):
    return {lyr.layer.name: lyr for lyr in model.layers if isinstance(lyr, PruneLowMagnitude)}


def test_reaches_final_sparsity_with_auto_frequency_and_logs_it(data):
    pruned = prune(small_cnn(), 0.8, end_step=2 * STEPS)
    # About ten mask updates (every 3 steps); the end moves back onto their grid (32 -> 30) so the last
    # update lands on it.
    grid = {(w.pruning_schedule.frequency, w.pruning_schedule.end_step) for w in _wrappers(pruned).values()}
    assert grid == {(3, 30)}
    history = _fit(pruned, data, epochs=2)
    reached = sparsity(pruned)
    for name in ("conv", "fc", "logits"):
        assert reached[name] == pytest.approx(0.8, abs=0.01)
    assert history.history["sparsity"][-1] == pytest.approx(0.8, abs=0.01)
    assert history.history["sparsity"][0] < history.history["sparsity"][-1]  # the cubic ramp
    assert {"sparsity/conv", "sparsity/fc", "sparsity/logits"} <= set(history.history)
    plain = strip(pruned)
    assert not any(isinstance(lyr, PruneLowMagnitude) for lyr in plain.layers)
    assert [lyr.name for lyr in plain.layers] == ["conv", "pool", "flatten", "fc", "logits"]
    assert sparsity(plain)["overall"] == pytest.approx(0.8, abs=0.01)


def test_schedule_without_end_ends_with_the_first_fit(data):
    """The issue's one-liner: `prune(model, 0.8)` then fit with the callback, no step arithmetic."""
    pruned = prune(small_cnn(), 0.8)
    history = _fit(pruned, data, epochs=2)
    schedules = {w.pruning_schedule for w in _wrappers(pruned).values()}
    assert {(s.end_step, s.frequency) for s in schedules} == {(30, 3)}  # the fit's 32 steps on a grid of 3
    assert history.history["sparsity"][-1] == pytest.approx(0.8, abs=0.01)
    assert sparsity(strip(pruned))["overall"] == pytest.approx(0.8, abs=0.01)


def test_callers_model_is_untouched(data):
    model = small_cnn()
    before = [w.copy() for w in model.get_weights()]
    pruned = prune(model, 0.5, end_step=STEPS)
    _fit(pruned, data)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert not any(isinstance(lyr, PruneLowMagnitude) for lyr in model.layers)
    # The copy starts from the caller's weights.
    fresh = prune(model, 0.5, end_step=STEPS)
    np.testing.assert_array_equal(_wrappers(fresh)["fc"].layer.kernel.numpy(), before[2])


def test_global_scope_gives_per_layer_targets_with_the_right_overall(data):
    model = small_cnn()
    # Give layers different magnitudes so that one global threshold prunes them unevenly.
    model.get_layer("logits").kernel.assign(model.get_layer("logits").kernel * 10.0)
    pruned = prune(model, 0.7, end_step=STEPS, scope="global")
    targets = {n: w.pruning_schedule.final_sparsity for n, w in _wrappers(pruned).items()}
    assert len(set(round(t, 3) for t in targets.values())) == 3
    assert targets["logits"] < 0.7 < targets["fc"]
    _fit(pruned, data)
    reached = sparsity(pruned)
    assert reached["overall"] == pytest.approx(0.7, abs=0.01)
    for name, target in targets.items():
        assert reached[name] == pytest.approx(target, abs=0.01)


def test_constant_schedule_and_epoch_conversion(data):
    pruned = prune(small_cnn(), 0.6, schedule="constant", begin_epoch=0, end_epoch=1, steps_per_epoch=STEPS,
                   layers=[keras.layers.Dense])
    assert set(_wrappers(pruned)) == {"fc", "logits"}
    schedule = _wrappers(pruned)["fc"].pruning_schedule
    assert isinstance(schedule, ConstantSparsity)
    assert (schedule.begin_step, schedule.end_step) == (0, STEPS)
    history = _fit(pruned, data)
    assert history.history["sparsity"] == [pytest.approx(0.6, abs=0.01)]
    assert "sparsity/conv" not in history.history


def test_epochs_are_converted_with_steps_per_epoch():
    pruned = prune(small_cnn(), 0.5, begin_epoch=1, end_epoch=3, steps_per_epoch=50, exclude=["conv"])
    schedule = _wrappers(pruned)["fc"].pruning_schedule
    assert (schedule.begin_step, schedule.end_step, schedule.frequency) == (50, 150, 10)
    assert "conv" not in _wrappers(pruned)


@pytest.mark.parametrize("schedule", [
    PolynomialDecay(0.1, 0.8, begin_step=5, end_step=105, power=3, frequency=10),
    ConstantSparsity(0.5, begin_step=0, end_step=40, frequency=4),
])
def test_schedule_config_round_trip(schedule):
    config = schedule.get_config()
    again = type(schedule).from_config(config["config"])
    assert again.get_config() == config
    step = tf.constant(55, tf.int64)
    assert float(again(step)[1]) == pytest.approx(float(schedule(step)[1]))


def test_pruned_model_config_round_trip_keeps_schedule():
    pruned = prune(small_cnn(), 0.8, end_step=100, frequency=25)
    config = _wrappers(pruned)["fc"].get_config()
    assert config["pruning_schedule"]["config"]["final_sparsity"] == 0.8
    assert config["pruning_schedule"]["config"]["frequency"] == 25


def test_two_of_four_structure(data):
    pruned = prune(small_cnn(), 0.5, structure="2:4", end_step=STEPS, exclude=["conv"])
    _fit(pruned, data)
    for name in ("fc", "logits"):
        kernel = _wrappers(pruned)[name].layer.kernel.numpy()  # (in, out): groups of 4 input channels
        groups = (kernel.T == 0).reshape(kernel.shape[1], -1, 4).sum(axis=-1)
        assert np.all(groups == 2), name


def test_fit_without_callback_says_what_to_add(data):
    pruned = prune(small_cnn(), 0.5, end_step=STEPS)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"callbacks=\[tfcompress.PruningCallback\(\)\]"):
        _fit(pruned, data, callbacks=[])


def test_callback_needs_a_pruned_model(data):
    with pytest.raises(ValueError, match="has no pruned layers: call tfcompress.prune"):
        _fit(small_cnn(), data)


def test_callback_state_resets_between_fits(data):
    pruned = prune(small_cnn(), 0.5, end_step=STEPS)
    callback = PruningCallback()
    _fit(pruned, data, callbacks=[callback])
    history = _fit(pruned, data, callbacks=[callback])  # same instance, a second fit
    assert history.history["sparsity"] == [pytest.approx(0.5, abs=0.01)]


def test_fit_too_short_for_schedule_says_by_how_much(data):
    pruned = prune(small_cnn(), 0.5, end_epoch=3, steps_per_epoch=STEPS)
    with pytest.raises(ValueError, match=r"ends at step 48, but this fit runs only 16 steps .* 32 too few"):
        _fit(pruned, data, epochs=1)


def test_sparsity_not_reached_raises(data):
    pruned = prune(small_cnn(), 0.5, end_step=3 * STEPS)
    # Planned for the whole schedule, but stopped after one epoch (as EarlyStopping would).
    stop = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: setattr(pruned, "stop_training", True))
    with pytest.raises(SparsityNotReachedError, match=r"step 16 below the target sparsity .* lower end_step"):
        _fit(pruned, data, epochs=3, callbacks=[PruningCallback(), stop])
    assert issubclass(SparsityNotReachedError, TfcompressError)


def test_split_training_with_verification_off(data):
    pruned = prune(small_cnn(), 0.5, end_step=2 * STEPS)
    callback = PruningCallback(verify_final_sparsity=False)
    _fit(pruned, data, callbacks=[callback])
    history = _fit(pruned, data, callbacks=[callback])
    assert history.history["sparsity"] == [pytest.approx(0.5, abs=0.01)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(final_sparsity=1.0, end_step=10),
     r"final_sparsity must be a fraction .* Received: final_sparsity=1.0"),
    (dict(final_sparsity=-0.1, end_step=10), r"Received: final_sparsity=-0.1"),
    (dict(final_sparsity=0.5, begin_step=10, end_step=5),
     r"must end after it begins.* Received: begin_step=10, end_step=5"),
    (dict(final_sparsity=0.5, frequency=4), r"frequency needs a known schedule end.* Received: frequency=4"),
    (dict(final_sparsity=0.5, end_epoch=2), r"need steps_per_epoch.* Received: steps_per_epoch=None"),
    (dict(final_sparsity=0.5, end_step=10, end_epoch=2, steps_per_epoch=5), r"not both"),
    (dict(final_sparsity=0.5, end_step=100, frequency=30),
     r"positive divisor of end_step - begin_step \(100\).* Received: frequency=30"),
    # tfmot's default frequency (100) on a 16-step fine-tune would never update a mask.
    (dict(final_sparsity=0.5, end_step=16, frequency=100), r"Received: frequency=100"),
    (dict(final_sparsity=0.5, end_step=10, schedule="cubic"),
     r"schedule must be one of .* Received: schedule='cubic'"),
    (dict(final_sparsity=0.5, end_step=10, scope="model"), r"Received: scope='model'"),
    (dict(final_sparsity=0.2, initial_sparsity=0.5, end_step=10), r"initial_sparsity must not exceed"),
    (dict(final_sparsity=0.5, end_step=10, structure="2:4"),
     r"needs at least 4 input channels per layer, but conv \(1 input channels\)"),
    (dict(final_sparsity=0.8, end_step=10, structure="2:4", exclude=["conv"]), r"use final_sparsity=0.5"),
    (dict(final_sparsity=0.5, end_step=10, layers=["dense_9"]),
     r"layers names layers the model does not have"),
    (dict(final_sparsity=0.5, end_step=10, layers=["pool"]), r"tfmot cannot prune layer\(s\) \['pool'\]"),
    (dict(final_sparsity=0.5, end_step=10, exclude=["conv", "fc", "logits"]), r"No layer is left to prune"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune(small_cnn(), **kwargs)


def test_already_pruned_model_is_rejected():
    pruned = prune(small_cnn(), 0.5, end_step=10)
    with pytest.raises(ValueError, match=r"already pruned .* call tfcompress.strip\(model\) first"):
        prune(pruned, 0.5, end_step=10)


class _Scale(keras.layers.Layer):
    def build(self, input_shape):
        self.scale = self.add_weight("scale", shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


def test_unsupported_layer_with_weights_is_named_or_skipped_when_excluded():
    model = keras.Sequential(
        [keras.layers.Input((8,)), _Scale(name="scale"), keras.layers.Dense(4, name="out")])
    with pytest.raises(ValueError, match=r"tfmot cannot prune layer\(s\) \['scale'\].* exclude=\[\.\.\.\]"):
        prune(model, 0.5, end_step=10)
    pruned = prune(model, 0.5, end_step=10, exclude=["scale"])
    assert set(_wrappers(pruned)) == {"out"}


def test_non_keras2_and_subclassed_models_are_rejected():
    with pytest.raises(ValueError, match=r"Sequential or functional tf_keras model.* Received: model=str"):
        prune("model.h5", 0.5, end_step=10)


def test_bad_tolerance():
    with pytest.raises(ValueError, match=r"Received: tolerance=1.5"):
        PruningCallback(tolerance=1.5)


def test_functional_model(data):
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, activation="relu", name="hidden")(x)
    model = keras.Model(inputs, keras.layers.Dense(10, name="out")(x))
    pruned = prune(model, 0.75, end_step=STEPS)
    assert set(_wrappers(pruned)) == {"hidden", "out"}
    _fit(pruned, data)
    assert sparsity(strip(pruned))["overall"] == pytest.approx(0.75, abs=0.01)


def test_sparsity_survives_into_the_int8_flatbuffer(data, calibration_samples):
    from tfcompress.conversion.convert import ConvertConfig, convert
    from tfcompress.core.model_io import load_model
    from tfcompress.core.tflite_model import weight_sparsity

    pruned = prune(small_cnn(), 0.8)
    _fit(pruned, data, epochs=2)
    plain = strip(pruned)
    keras_sparsity = sparsity(plain)
    shipped = weight_sparsity(convert(load_model(plain), ConvertConfig(), calibration_samples))
    by_layer = {name.split("/")[-2]: value for name, value in shipped.items()}
    assert set(by_layer) == {"conv", "fc", "logits"}
    for layer, value in by_layer.items():
        # int8 rounding can only add zeros (weights below half a step), never remove them.
        assert keras_sparsity[layer] - 1e-9 <= value <= keras_sparsity[layer] + 0.02
