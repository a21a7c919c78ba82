"""Low-bit QAT weights on real MNIST: each scheme trains, converts to verified full-int8 uint8-I/O, ships only
its promised values per channel, and packs into 1-, 2- or 4-bit TFLM look-up tables that run identically."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SCALE
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.conversion.verify import verify
from tfcompress.core import quantizers
from tfcompress.core._keras import keras, tf
from tfcompress.core.model_io import load_model
from tfcompress.core.tflite_model import read_tflite
from tfcompress.runs.optimize import OptimizeConfig, run_optimize
from tfcompress.targets.export import ExportConfig, build_micro_export, run_export
from tfcompress.training import lowbit
from tfcompress.training.cluster import distinct_values
from tfcompress.training.quantize import low_bit_layers, quantize_aware

# (scheme, largest values per channel, TFLM look-up-table index bits for that many values)
SCHEMES = [("int4", 15, 4), ("int2", 3, 2), ("ternary", 3, 2), ("binary", 2, 1), ("pow2", 9, 4)]
REFERENCE = {
    "int4": lambda w: quantizers.int_n(w, 4, axis=-1),
    "int2": lambda w: quantizers.int_n(w, 2, axis=-1),
    "ternary": lambda w: quantizers.ternary(w, axis=-1),
    "binary": lambda w: quantizers.binary(w, axis=-1),
    "pow2": lambda w: quantizers.logarithmic(w, exponents=4, axis=-1),
}


def _compile(model):
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


@pytest.mark.parametrize("scheme", list(REFERENCE))
def test_the_training_projection_is_the_numpy_reference(trained_model, scheme):
    """The TensorFlow projection QAT trains with equals `tfcompress.core.quantizers` on real kernels."""
    for layer in trained_model.layers:
        if not isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            continue
        kernel = layer.get_weights()[0]
        projected = lowbit.project(tf.constant(kernel), scheme).numpy()
        reference = REFERENCE[scheme](kernel.astype(np.float64))
        # float32 against float64: a weight on a threshold may fall either side, nothing else differs
        mismatched = ~np.isclose(projected, reference, rtol=1e-5, atol=1e-7)
        assert mismatched.mean() <= 1e-3, (layer.name, int(mismatched.sum()))
        channels = projected.reshape(-1, projected.shape[-1]).T
        assert max(len(np.unique(c)) for c in channels) <= dict((s, n) for s, n, _ in SCHEMES)[scheme]


@pytest.mark.parametrize("scheme,allowed,bits", SCHEMES)
def test_low_bit_qat_ships_its_values_and_packs_them_for_tflm(trained_model, mnist_subset, scheme, allowed, bits):
    x_train, y_train, x_test, y_test = mnist_subset
    qat = _compile(quantize_aware(trained_model, weights=scheme, keep_int8=[]))  # every layer low-bit
    qat.fit(x_train[:4000], y_train[:4000], epochs=1, batch_size=64, verbose=0)
    flatbuffer = convert(load_model(qat), ConvertConfig())
    result = verify(flatbuffer, "int8", "uint8", float_model=load_model(trained_model),
                    eval_samples=x_test, eval_labels=y_test, max_accuracy_drop=0.08)
    assert result.passed, result.failures  # full-int8, uint8 in and out, accuracy within 8 points
    counts = distinct_values(flatbuffer)
    assert len(counts) == 3
    for name, count in counts.items():
        assert count["max_per_channel"] <= allowed, (name, count)
        if "MatMul" in name:  # Dense kernels have one scale: the whole tensor holds the scheme's values
            assert count["per_tensor"] <= allowed, (name, count)
    if scheme in ("ternary", "binary"):  # the projection is exactly representable: +-127 (and 0)
        values = read_tflite(flatbuffer).constants
        int8 = [v for v in values.values() if v.dtype == np.int8 and v.ndim >= 2]
        assert {int(u) for v in int8 for u in np.unique(v)} <= {-127, 0, 127}
    uint8 = np.clip(np.round(x_test[:100] / SCALE), 0, 255).astype(np.uint8)
    export = build_micro_export(flatbuffer, uint8, "100 MNIST test images", name="lowbit", compress=True)
    compression = export.manifest["compression"]
    assert max(t["index_bitwidth"] for t in compression["tensors"]) == bits
    # fc and logits always; the 72-weight conv only where its tables cost less than the weights they replace
    assert {"quant_fc", "quant_logits"} <= {part for t in compression["tensors"] for part in t["name"].split("/")}
    assert compression["tflm_exact_check"]["max_step_difference"] == 0  # identical outputs in TFLM
    assert compression["flash_bytes_after"] < compression["flash_bytes_before"]


@pytest.mark.parametrize("scheme,allowed,bits", SCHEMES)
def test_each_scheme_runs_from_the_pipeline_and_exports_compressed_for_tflm(keras_file, train_npz, eval_npz, tmp_path,
                                                                           scheme, allowed, bits):
    result = run_optimize(OptimizeConfig(
        output_dir=str(tmp_path / "out"), train_data=train_npz, keras_model=keras_file, eval_data=eval_npz,
        input_scale=SCALE, qat=True, qat_weights=scheme, keep_int8=(), qat_epochs=1, batch_size=64,
        max_accuracy_drop=0.1, target="micro", latency_runs=1))
    convert_stage = result.stages[-1]
    assert convert_stage["shipped"] == "qat"
    assert max(convert_stage["low_bit_weights"]["max_distinct_per_channel"].values()) <= allowed
    run_export(ExportConfig(tflite=result.model_path, output_dir=str(tmp_path / "micro"), compress=True,
                            eval_data=eval_npz, input_scale=SCALE, num_eval_samples=200))
    manifest = json.loads((tmp_path / "micro" / "manifest.json").read_text())
    compression = manifest["compression"]
    # at most the scheme's bits (a pow2 Dense kernel with one scale may hold 8 of its 9 values: 3 bits)
    assert max(t["index_bitwidth"] for t in compression["tensors"]) == bits
    assert all(t["index_bitwidth"] <= bits for t in compression["tensors"])
    assert compression["tflm_exact_check"]["max_step_difference"] == 0  # identical outputs in TFLM
    assert manifest["tflm_check"]["top1_agreement"] >= 0.99  # and TFLM agrees with LiteRT


def test_keep_int8_defaults_to_the_first_and_last_weight_layers(trained_model):
    assert low_bit_layers(trained_model) == (["fc"], ["conv", "logits"])
    assert low_bit_layers(trained_model, keep_int8=["fc"]) == (["conv", "logits"], ["fc"])
    assert low_bit_layers(trained_model, keep_int8=[]) == (["conv", "fc", "logits"], [])


@pytest.mark.slow
def test_ternary_depthwise_and_batch_norm_ds_cnn_converts_with_three_values_per_channel(trained):
    """The zoo's DS-CNN: DepthwiseConv2D (channels in x multiplier) and Conv2D + BatchNorm, which the converter
    folds per channel: still three values per output channel."""
    zoo_model = trained("ds_cnn")
    data = zoo_model.data
    qat = quantize_aware(zoo_model.model, weights="ternary")
    qat.compile(optimizer=keras.optimizers.Adam(5e-4), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    qat.fit(data.x_train, data.y_train, epochs=1, batch_size=64, verbose=0)
    flatbuffer = convert(load_model(qat), ConvertConfig())
    result = verify(flatbuffer, "int8", "uint8", float_model=load_model(zoo_model.model),
                    eval_samples=data.x_test, eval_labels=data.y_test, max_accuracy_drop=0.15)
    assert result.passed, result.failures
    low_bit, kept = low_bit_layers(zoo_model.model)
    counts = distinct_values(flatbuffer)
    depthwise = [name for name in low_bit if "depthwise" in name]
    assert depthwise
    for layer in low_bit:
        (count,) = [c for name, c in counts.items() if f"quant_{layer}" in name.split("/")]
        assert count["max_per_channel"] <= 3, (layer, count)


def test_low_bit_optimize_run_reports_and_checks_the_shipped_values(keras_file, train_npz, eval_npz, tmp_path):
    result = run_optimize(OptimizeConfig(
        output_dir=str(tmp_path / "out"), train_data=train_npz, keras_model=keras_file, eval_data=eval_npz,
        input_scale=SCALE, qat=True, qat_weights="ternary", keep_int8=(), qat_epochs=1, batch_size=64,
        max_accuracy_drop=0.05, target="micro", latency_runs=5))
    report = json.loads(open(result.report_path).read())
    qat, convert_stage = report["stages"][-2], report["stages"][-1]
    assert qat["weights"] == "ternary" and qat["low_bit_layers"] == ["conv", "fc", "logits"]
    assert convert_stage["shipped"] == "qat"  # low-bit was asked: PTQ (int8 weights) is not a candidate to ship
    assert "as --qat_weights asks" in report["shipped"]["reason"]
    assert convert_stage["low_bit_weights"]["max_distinct_per_channel"] == {"conv": 3, "fc": 3, "logits": 3}
    assert convert_stage["micro"]["tflm_check"]["top1_agreement"] >= 0.99
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Low-bit weights: ternary (checked in the flatbuffer)" in markdown
    assert "| fc | 3 | 3 |" in markdown and "Kept at int8: none" in markdown


def test_bad_low_bit_settings_are_refused(trained_model, keras_file, train_npz, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown QAT weights.*Received: weights='int3'"):
        quantize_aware(trained_model, weights="int3")
    with pytest.raises(ValueError, match=r"keep_int8 names layers that are not in model small_cnn: \['nope'\]"):
        quantize_aware(trained_model, weights="ternary", keep_int8=["nope"])
    with pytest.raises(ValueError, match=r"without low-bit weights to keep at int8.*\['pool'\]"):
        quantize_aware(trained_model, weights="ternary", keep_int8=["pool"])
    with pytest.raises(ValueError, match=r"keep_int8 .* needs low-bit weights"):
        quantize_aware(trained_model, keep_int8=["fc"])
    with pytest.raises(ValueError, match=r"neither keeps a pruned kernel's zeros"):
        quantize_aware(trained_model, scheme="prune_preserving", weights="binary")
    with pytest.raises(ValueError, match=r"pow2_exponents must be an integer in \[1, 7\]"):
        quantize_aware(trained_model, weights="pow2", pow2_exponents=8)
    base = dict(output_dir=str(tmp_path), train_data=train_npz, keras_model=keras_file)
    with pytest.raises(ValueError, match=r"needs --qat.*qat_weights='ternary', qat=False"):
        OptimizeConfig(**base, prune=True, qat_weights="ternary")
    with pytest.raises(ValueError, match=r"keeps neither a pruned kernel's zeros nor its clusters"):
        OptimizeConfig(**base, prune=True, qat=True, qat_weights="int4")
    with pytest.raises(ValueError, match=r"qat_weights is one of int8, int4"):
        OptimizeConfig(**base, qat=True, qat_weights="int3")
    assert not (tmp_path / "stages").exists()
