"""Tests for the factorization stage: SVD-split layers of real models, fine-tuned and converted to int8."""

from __future__ import annotations

import numpy as np
import pytest

from tfcompress.core._keras import keras
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.training.factorize import FactorizeResult, LayerFactorization, factorize
from tfcompress.core.model_io import load_model
from tfcompress.conversion.verify import verify

M, N = 1352, 32  # small_cnn's fc kernel: 13·13·8 pooled features in, 32 units out


def test_energy_picks_the_smallest_rank_and_counts_match_by_hand(trained_model):
    before = [w.copy() for w in trained_model.get_weights()]
    result = factorize(trained_model, energy=0.9, layers=["fc"])
    assert isinstance(result, FactorizeResult)
    for old, new in zip(before, trained_model.get_weights()):
        np.testing.assert_array_equal(old, new)  # the caller's model is untouched
    (fc,) = result.layers
    r = fc.rank
    s = np.linalg.svd(before[2].astype(np.float64), compute_uv=False)
    kept = np.cumsum(s**2) / np.sum(s**2)
    assert kept[r - 1] >= 0.9 > kept[r - 2]  # the smallest rank that keeps 90% of the energy
    assert fc == LayerFactorization("fc", r, M * N + N, r * (M + N) + N, M * N, r * (M + N), True, "")
    assert result.params_before - result.params_after == M * N - r * (M + N)
    new = result.model
    assert isinstance(new, keras.Model) and not isinstance(new, keras.Sequential)
    assert [lyr.name for lyr in new.layers][1:] == ["conv", "pool", "flatten", "fc_lowrank", "fc", "logits"]
    assert new.get_layer("fc_lowrank").kernel.shape == (M, r) and not new.get_layer("fc_lowrank").use_bias
    assert new.get_layer("fc").kernel.shape == (r, N)
    assert new.get_layer("fc").activation is keras.activations.relu
    np.testing.assert_array_equal(new.get_layer("fc").bias.numpy(), before[3])
    assert new.count_params() == trained_model.count_params() - M * N + r * (M + N)


def test_fine_tuned_factorized_model_converts_to_verified_int8(trained_model, mnist_subset,
                                                               calibration_samples):
    x_train, y_train, x_test, y_test = mnist_subset
    model = factorize(trained_model, energy=0.9, layers=["fc"]).model
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  ["accuracy"])
    original = trained_model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    before = model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    model.fit(x_train[:4000], y_train[:4000], epochs=1, batch_size=64, verbose=0, shuffle=False)
    after = model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]
    print(f"accuracy: original {original:.3f}, factorized {before:.3f}, after 1-epoch fine-tune {after:.3f}")
    assert before > 0.5 and after > 0.85
    flatbuffer = convert(load_model(model), ConvertConfig(), calibration_samples)
    result = verify(flatbuffer, "int8", "uint8", float_model=load_model(model), eval_samples=x_test,
                    eval_labels=y_test, max_accuracy_drop=0.02)
    assert result.ops["FULLY_CONNECTED"] == 3  # fc_lowrank, fc, logits


def _low_rank(shape, rank, seed):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(shape[0], rank)) @ rng.normal(size=(rank, shape[1])) / shape[0]
    return kernel.astype(np.float32)


def test_exact_low_rank_kernels_give_the_same_outputs_in_a_functional_dag():
    inputs = keras.Input((8, 8, 32))
    pointwise = keras.layers.Conv2D(32, 1, activation="relu", name="pw")(inputs)
    x = keras.layers.Add(name="residual")([inputs, pointwise])
    x = keras.layers.Conv2D(16, 3, name="spatial")(x)  # 3×3: not a candidate
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu", name="hidden")(x)
    model = keras.Model(inputs, keras.layers.Dense(10, name="out")(x))
    model.get_layer("pw").kernel.assign(_low_rank((32, 32), 4, 0).reshape(1, 1, 32, 32))
    hidden = model.get_layer("hidden")
    hidden.kernel.assign(_low_rank(tuple(hidden.kernel.shape), 8, 1))
    result = factorize(model, energy=1.0)
    by_name = {lyr.name: lyr for lyr in result.layers}
    assert set(by_name) == {"pw", "hidden", "out"}  # 3×3 convolutions are left out
    assert (by_name["pw"].rank, by_name["hidden"].rank) == (4, 8)
    assert by_name["pw"].macs_before == 8 * 8 * 32 * 32  # 64 positions, 32×32 each
    assert by_name["pw"].macs_after == 8 * 8 * 4 * 64
    out = by_name["out"]
    assert not out.factorized and out.rank == 10 and "full rank" in out.reason
    assert out.params_after == out.params_before
    assert result.model.get_layer("pw_lowrank").kernel.shape == (1, 1, 32, 4)
    x = np.random.default_rng(2).normal(size=(16, 8, 8, 32)).astype(np.float32)
    np.testing.assert_allclose(result.model(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_rank_leaves_layers_that_would_grow_and_says_why(trained_model):
    result = factorize(trained_model, rank=8)
    by_name = {lyr.name: lyr for lyr in result.layers}
    assert by_name["fc"].factorized and by_name["fc"].params_after == 8 * (M + N) + N
    # logits is 32×10: rank 8 needs 8·42 = 336 weights, more than its 320.
    logits = by_name["logits"]
    assert not logits.factorized
    assert logits.reason == "rank 8 needs r·(m+n) = 336 weights, not fewer than m·n = 320"
    assert "logits_lowrank" not in [lyr.name for lyr in result.model.layers]


@pytest.mark.parametrize("kwargs, message", [
    (dict(), r"exactly one of rank .* Received: rank=None, energy=None"),
    (dict(rank=4, energy=0.9), r"Received: rank=4, energy=0.9"),
    (dict(rank=0), r"positive integer. Received: rank=0"),
    (dict(rank=2.5), r"Received: rank=2.5"),
    (dict(rank=32, layers=["fc"]),
     r"below min\(m, n\) = 32 for layer fc \(1352×32 kernel\).* Received: rank=32"),
    (dict(energy=0), r"in \(0, 1\].* Received: energy=0"),
    (dict(energy=1.5), r"Received: energy=1.5"),
    (dict(energy=0.9, layers=["fc9"]), r"does not have: \['fc9'\].* Received: layers=\['fc9'\]"),
    (dict(energy=0.9, layers=["conv", "pool"]),
     r"Dense and 1×1, stride-1 Conv2D layers only; conv \(Conv2D\), pool \(MaxPooling2D\)"),
])
def test_bad_arguments(trained_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factorize(trained_model, **kwargs)


def test_models_without_a_graph_are_refused():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match=r"subclassed models have no graph.* Received: model=Sub"):
        factorize(Sub(), rank=2)
    with pytest.raises(ValueError, match=r"has no input yet.* keras.layers.Input"):
        factorize(keras.Sequential([keras.layers.Dense(4)]), rank=2)
    with pytest.raises(ValueError, match=r"no Dense or 1×1, stride-1 Conv2D layer"):
        factorize(keras.Sequential([keras.layers.Input((4, 4, 1)), keras.layers.Conv2D(2, 3)]), rank=1)
