"""Channel pruning: the groups it finds, the exact surgery, the per-layer table, real accuracy, refusals."""

from __future__ import annotations

import numpy as np
import pytest

import tfcompress
from tfcompress.core._keras import keras, keras3
from tfcompress.models import zoo
from tfcompress.training.channel_graph import channel_plan
from tfcompress.training.channel_prune import channel_scores, prune_channels, zero_channels


def _with_batch_norm_statistics(model: keras.Model, seed: int = 0) -> keras.Model:
    """An untrained zoo model whose BatchNorm layers hold non-trivial statistics (as a trained one's do), so
    that removing a channel after BatchNorm is not the same as removing a channel of zeros."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0.3, 0.3, beta.shape),
                               rng.normal(0, 0.3, mean.shape), rng.uniform(0.5, 1.5, variance.shape)])
    return model


def _outputs(model, x) -> list[np.ndarray]:
    out = model.predict(x, verbose=0, batch_size=len(x))
    return [np.asarray(o) for o in (out if isinstance(out, list) else [out])]


ZOO_CASES = ["resnet8", "ds_cnn", "mobilenet_v1", "dense_autoencoder", "two_output"]


@pytest.mark.parametrize("name", ZOO_CASES)
def test_pruned_model_equals_original_with_channels_zeroed(name):
    model = _with_batch_norm_statistics(zoo.get(name).builder())
    x = np.random.default_rng(1).uniform(0, 1, (16, *model.input_shape[1:])).astype(np.float32)
    result = prune_channels(model, 0.5)
    zeroed = zero_channels(model, {k: np.array(v) for k, v in result.kept.items()})
    assert result.macs_after < result.macs_before and result.params_after < result.params_before
    for a, b in zip(_outputs(result.model, x), _outputs(zeroed, x)):
        scale = max(1.0, float(np.abs(b).max()))
        np.testing.assert_allclose(a, b, atol=2e-5 * scale, rtol=0)


def test_data_remeasures_batch_norm_statistics_of_the_pruned_model():
    model = _with_batch_norm_statistics(zoo.resnet8())
    x = np.random.default_rng(2).uniform(0, 1, (64, 32, 32, 3)).astype(np.float32)
    plain = prune_channels(model, 0.5).model
    fresh = prune_channels(model, 0.5, data=x).model
    probe = keras.Model(fresh.inputs, fresh.get_layer("stage2_a_conv").output)
    features = probe(x, training=False).numpy()
    bn = fresh.get_layer("stage2_a_bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), features.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), features.var((0, 1, 2)), rtol=1e-3, atol=1e-5)
    assert not np.allclose(plain.get_layer("stage2_a_bn").moving_mean.numpy(), bn.moving_mean.numpy())
    assert bn.momentum == model.get_layer("stage2_a_bn").momentum  # put back after measuring


def test_groups_follow_residual_adds_depthwise_and_outputs():
    resnet = channel_plan(zoo.resnet8())
    tied = {g.name: set(g.layers) for g in resnet.groups}
    assert tied["stem_conv"] == {"stem_conv", "stage1_b_conv"}  # identity shortcut: the stem's channels are added
    assert tied["stage2_b_conv"] == {"stage2_b_conv", "stage2_projection"}
    assert tied["stage3_b_conv"] == {"stage3_b_conv", "stage3_projection"}
    output = resnet.group("probabilities")
    assert not output.prunable and "feeds the model's output 'probabilities'" in output.reason

    ds = channel_plan(zoo.ds_cnn())
    depthwise = [layer for layer in ds.layers if layer.depthwise]
    assert len(depthwise) == 4 and all(layer.output is None for layer in depthwise)
    assert {g.name for g in ds.prunable} == {"stem_conv"} | {f"block{i}_pointwise_conv" for i in range(1, 5)}

    mobilenet = channel_plan(zoo.mobilenet_v1())
    preds = mobilenet.group("conv_preds")
    assert not preds.prunable and "Reshape" in preds.reason
    assert channel_plan(zoo.gru_classifier()).prunable == ()  # the GRU is not followed: nothing to cut


def test_concatenate_keeps_each_branch_apart():
    inputs = keras.Input((12, 12, 3))
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="a")(inputs)
    b = keras.layers.Conv2D(6, 1, activation="relu", name="b")(inputs)
    x = keras.layers.Concatenate(name="cat")([a, b])
    x = keras.layers.Conv2D(5, 3, name="mix")(x)
    x = keras.layers.Flatten(name="flat")(x)
    outputs = keras.layers.Dense(4, name="head")(x)
    model = keras.Model(inputs, outputs)
    result = prune_channels(model, ratios={"a": 0.5, "b": 0.5, "mix": 0.4})
    assert result.model.get_layer("mix").kernel.shape == (3, 3, 4 + 3, 3)
    assert result.model.get_layer("head").kernel.shape == (10 * 10 * 3, 4)  # Flatten rows of the kept channels
    x = np.random.default_rng(0).normal(size=(8, 12, 12, 3)).astype(np.float32)
    zeroed = zero_channels(model, {k: np.array(v) for k, v in result.kept.items()})
    np.testing.assert_allclose(_outputs(result.model, x)[0], _outputs(zeroed, x)[0], atol=1e-5)


def test_table_counts_channels_parameters_and_macs(trained_model):
    result = prune_channels(trained_model, 0.5)
    rows = {row.name: row for row in result.layers}
    assert (rows["conv"].channels_before, rows["conv"].channels_after) == (8, 4)
    assert (rows["fc"].channels_before, rows["fc"].channels_after) == (32, 16)
    assert rows["fc"].params_after == 13 * 13 * 4 * 16 + 16  # the Flatten's rows of 4 kept channels
    assert rows["fc"].macs_after == 13 * 13 * 4 * 16 and rows["conv"].macs_after == 26 * 26 * 9 * 4
    assert rows["logits"].channels_after == 10 and "output" in rows["logits"].reason
    assert result.params_after == result.model.count_params()
    plan = channel_plan(trained_model)
    assert plan.cost({k: len(v) for k, v in result.kept.items()})[0] == result.macs_after
    markdown = result.markdown()
    assert "| conv | Conv2D | 8 → 4 |" in markdown and "feeds the model's output 'logits'" in markdown
    assert result.to_json()["macs_after"] == result.macs_after


def test_criteria_rank_the_filters_they_say(trained_model):
    plan = channel_plan(trained_model)
    kernel = trained_model.get_layer("conv").kernel.numpy()
    l1 = channel_scores(trained_model, plan, "l1")["conv"]
    l2 = channel_scores(trained_model, plan, "l2")["conv"]
    np.testing.assert_allclose(l1 / l1.mean(), np.abs(kernel).sum((0, 1, 2)) / np.abs(kernel).sum((0, 1, 2)).mean())
    norms = np.sqrt((kernel**2).sum((0, 1, 2)))
    np.testing.assert_allclose(l2, norms / norms.mean(), rtol=1e-6)
    kept = prune_channels(trained_model, 0.5, criterion="l1").kept["conv"]
    assert set(kept) == set(np.argsort(-np.abs(kernel).sum((0, 1, 2)))[:4].tolist())


def test_bn_gamma_ranks_by_the_batch_norm_scale():
    model = _with_batch_norm_statistics(zoo.ds_cnn(filters=16, num_blocks=1))
    gamma = np.abs(model.get_layer("stem_bn").gamma.numpy())
    kept = prune_channels(model, 0.25, criterion="bn_gamma").kept["stem_conv"]
    assert set(kept) == set(np.argsort(-gamma)[:12].tolist())


def test_fine_tune_recovers_the_accuracy_of_a_half_pruned_cnn(trained_model, mnist_subset):
    x_train, y_train, x_test, y_test = mnist_subset
    base = float(np.mean(trained_model.predict(x_test, verbose=0).argmax(-1) == y_test))
    pruned = prune_channels(trained_model, 0.5, data=x_train[:512]).model
    pruned.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    pruned.fit(x_train, y_train, epochs=1, batch_size=64, verbose=0)
    tuned = float(np.mean(pruned.predict(x_test, verbose=0).argmax(-1) == y_test))
    assert tuned >= base - 0.02, (base, tuned)


def test_int8_conversion_of_a_pruned_model_ships_fewer_macs(trained_model, calibration_samples):
    result = prune_channels(trained_model, 0.5, data=calibration_samples)
    before = tfcompress.convert(tfcompress.load_model(trained_model), tfcompress.ConvertConfig("int8"),
                                calibration_samples)
    after = tfcompress.convert(tfcompress.load_model(result.model), tfcompress.ConvertConfig("int8"),
                               calibration_samples)
    assert tfcompress.count_macs(after).total_macs == result.macs_after
    assert tfcompress.count_macs(before).total_macs == result.macs_before
    assert len(after) < 0.6 * len(before)
    io = tfcompress.inspect_tflite(after)
    assert {t.dtype for t in io.inputs} == {"uint8"} and {t.dtype for t in io.outputs} == {"uint8"}


def test_channel_multiple_rounds_kept_channels_up(trained_model):
    result = tfcompress.prune_channels(trained_model, 0.7, channel_multiple=8)
    assert result.model.get_layer("conv").filters == 8  # 8 channels: rounding 2 up to 8 keeps the layer whole
    assert result.model.get_layer("fc").units == 16  # 32 * 0.3 = 9.6 -> 10 kept -> 16
    with pytest.raises(ValueError, match=r"channel_multiple is a positive whole number"):
        tfcompress.prune_channels(trained_model, 0.5, channel_multiple=0)


def test_keras3_model_is_pruned_through_its_translation():
    k3 = keras3()
    model = k3.Sequential([k3.Input((10, 10, 1)), k3.layers.Conv2D(6, 3, activation="relu", name="conv"),
                           k3.layers.Flatten(), k3.layers.Dense(3, name="out")])
    result = prune_channels(model, 0.5)
    assert result.model.get_layer("conv").filters == 3 and isinstance(result.model, keras.Model)


def test_bad_arguments_are_refused_with_the_fix(trained_model):
    with pytest.raises(ValueError, match=r"in \[0, 1\).*Received: ratio=1.0"):
        prune_channels(trained_model, 1.0)
    with pytest.raises(ValueError, match=r"Received: ratio=-0.1"):
        prune_channels(trained_model, -0.1)
    with pytest.raises(ValueError, match=r"removes every one of its 8 channels; the largest ratio that keeps one is "
                                         r"0.875"):
        prune_channels(trained_model, ratios={"conv": 0.95})
    with pytest.raises(ValueError,
                       match=r"names a layer the model does not have: 'conv9'.*\['conv', 'fc', 'logits'\]"):
        prune_channels(trained_model, ratios={"conv9": 0.5})
    with pytest.raises(ValueError,
                       match=r"channels of 'logits' cannot be removed: its output feeds the model's output"):
        prune_channels(trained_model, ratios={"logits": 0.5})
    with pytest.raises(ValueError, match=r"'pool' \(MaxPooling2D\) makes no output channels of its own"):
        prune_channels(trained_model, ratios={"pool": 0.5})
    with pytest.raises(ValueError, match=r"Give ratio .* or ratios"):
        prune_channels(trained_model)
    with pytest.raises(ValueError, match=r"criterion must be one of \['l1', 'l2', 'bn_gamma'\]"):
        prune_channels(trained_model, 0.5, criterion="taylor")
    with pytest.raises(ValueError, match=r"share their channels .* take one ratio"):
        prune_channels(zoo.resnet8(), ratios={"stem_conv": 0.5, "stage1_b_conv": 0.25})

    class Subclassed(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match=r"subclassed model has no graph to follow.*Received: model=Subclassed"):
        prune_channels(Subclassed(), 0.5)
