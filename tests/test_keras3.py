"""Keras 3 models in: files, `model.export()` SavedModels and live objects through convert and optimize; the
tf_keras translation the training stages use, on the zoo's architectures built in Keras 3; and the refusals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import CALIBRATION, MNIST, ROOT, SCALE, run_scripts

from tfcompress.core import keras3 as keras3_io
from tfcompress.core._keras import keras, keras3
from tfcompress.core.errors import ModelLoadError
from tfcompress.core.model_io import load_model
from tfcompress.core.tflite_model import output_names, read_tflite
from tfcompress.runs.optimize import KERAS3_FILENAME, run_optimize
from tfcompress.runs.optimize_config import OptimizeConfig
from tfcompress.runs.pipeline import ConvertPipelineConfig, run_convert

k = keras3()


def keras3_cnn(seed: int = 0):
    """A Keras 3 CNN with the layers users have: Conv-BN-ReLU, pooling, Dense, Dropout; logits out."""
    k.utils.set_random_seed(seed)
    inputs = k.Input((28, 28, 1), name="image")
    x = k.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = k.layers.BatchNormalization(momentum=0.9, name="bn")(x)
    x = k.layers.ReLU(name="relu")(x)
    x = k.layers.MaxPooling2D(name="pool")(x)
    x = k.layers.Flatten(name="flatten")(x)
    x = k.layers.Dense(32, activation="relu", name="fc")(x)
    x = k.layers.Dropout(0.1, name="dropout")(x)
    return k.Model(inputs, k.layers.Dense(10, name="logits")(x), name="keras3_cnn")


@pytest.fixture(scope="module")
def trained_keras3(mnist_subset):
    x_train, y_train, _, _ = mnist_subset
    model = keras3_cnn()
    model.compile(optimizer="adam", loss=k.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=3, batch_size=64, verbose=0)  # 8,000 images: test accuracy 0.93
    return model


@pytest.fixture(scope="module")
def keras3_files(trained_keras3, tmp_path_factory):
    """The trained Keras 3 model as a .keras file, a .h5 file and a model.export() SavedModel; MNIST run files."""
    root = tmp_path_factory.mktemp("keras3")
    paths = {"keras": root / "cnn.keras", "h5": root / "cnn.h5", "export": root / "cnn_export"}
    trained_keras3.save(paths["keras"])
    trained_keras3.save(paths["h5"])
    trained_keras3.export(str(paths["export"]), verbose=False)
    with np.load(MNIST) as d:
        np.savez(root / "train.npz", x_train=d["x_train"][:2200], y_train=d["y_train"][:2200])
        np.savez(root / "eval.npz", x_test=d["x_test"][:1000], y_test=d["y_test"][:1000])
    return {name: str(p) for name, p in paths.items()} | {"train": str(root / "train.npz"),
                                                          "eval": str(root / "eval.npz")}


def test_each_keras3_form_is_detected_and_said(trained_keras3, keras3_files, keras_file, h5_file):
    live = load_model(trained_keras3)
    assert (live.keras_version, live.kind) == (3, "Keras 3 model (object)")
    assert load_model(keras3_files["keras"]).kind == "Keras 3 model (.keras file)"
    assert load_model(keras3_files["h5"]).kind == "Keras 3 model (.h5 file)"
    exported = load_model(keras3_files["export"])
    assert exported.keras_version == 3 and exported.keras_model is None
    assert exported.kind.startswith("Keras 3 model.export() SavedModel")
    # tf_keras files are still read by tf_keras.
    assert load_model(keras_file).kind == "tf_keras model (.keras file)"
    assert load_model(h5_file).kind == "tf_keras model (.h5 file)"
    assert isinstance(load_model(h5_file).keras_model, keras.Model)


@pytest.mark.parametrize("form", ["keras", "h5", "export"])
def test_convert_takes_keras3_files_directly(form, keras3_files, tmp_path):
    key = "saved_model_dir" if form == "export" else "keras_model"
    config = ConvertPipelineConfig(output_dir=str(tmp_path / "out"), calibration_data=str(CALIBRATION),
                                   calibration_key="x", eval_data=keras3_files["eval"], input_scale=SCALE,
                                   max_accuracy_drop=0.01, latency_runs=0, debug_layers=False,
                                   **{key: keras3_files[form]})
    result = run_convert(config)
    assert result.verification.passed
    parsed = read_tflite(result.model_path)
    assert {parsed.tensors[i].dtype for i in parsed.inputs + parsed.outputs} == {"uint8"}
    accuracy = result.verification.accuracy
    assert accuracy.float_accuracy > 0.9 and accuracy.accuracy_drop <= 0.01
    report = json.loads(open(os.path.join(tmp_path, "out", "report.json")).read())
    assert report["input_model"]["keras_version"] == 3
    markdown = open(os.path.join(tmp_path, "out", "report.md")).read()
    assert "Keras 3 model" in markdown.splitlines()[2]
    # Outputs keep the Keras names (Keras 3's own export calls them output_0, ...).
    assert list(output_names(parsed)) == (["output_0"] if form == "export" else ["logits"])


def test_live_keras3_model_converts_with_the_same_bytes_every_time(trained_keras3, calibration_samples):
    from tfcompress.conversion.convert import ConvertConfig, convert

    model = load_model(trained_keras3)
    first = convert(model, ConvertConfig("int8"), calibration_samples)
    assert first == convert(load_model(trained_keras3), ConvertConfig("int8"), calibration_samples)
    parsed = read_tflite(first)
    assert {parsed.tensors[i].dtype for i in parsed.inputs + parsed.outputs} == {"uint8"}


# ---------------------------------------------------------------------------------------------------
# The translation to tf_keras, on the zoo's architectures built in Keras 3


def _residual():
    inputs = k.Input((32, 32, 3))
    x = k.layers.Conv2D(16, 3, padding="same", kernel_regularizer=k.regularizers.L2(1e-4))(inputs)
    y = k.layers.Conv2D(16, 3, padding="same")(x)
    y = k.layers.BatchNormalization()(y)
    y = k.layers.Activation("relu")(y)
    x = k.layers.Add()([x, y])
    x = k.layers.LeakyReLU(negative_slope=0.1)(x)
    x = k.layers.AveragePooling2D(2)(x)
    x = k.layers.GlobalAveragePooling2D()(x)
    return k.Model(inputs, k.layers.Dense(10, activation="softmax")(x), name="resnet_like")


def _depthwise():
    return k.Sequential([k.Input((49, 10, 1)), k.layers.Conv2D(16, (10, 4), strides=2, padding="same"),
                         k.layers.BatchNormalization(), k.layers.ReLU(), k.layers.DepthwiseConv2D(3, padding="same"),
                         k.layers.SeparableConv2D(16, 3, padding="same"), k.layers.GlobalAveragePooling2D(),
                         k.layers.Dense(12)], name="ds_cnn_like")


def _mobilenet():
    return k.applications.MobileNet(input_shape=(96, 96, 3), alpha=0.25, weights=None, classes=10)


def _autoencoder():
    return k.Sequential([k.Input((640,)), k.layers.Dense(128, activation="relu"), k.layers.Dense(8),
                         k.layers.Dense(128, activation="relu"), k.layers.Dense(640)], name="autoencoder")


def _two_outputs():
    inputs = k.Input((28, 28, 1))
    x = k.layers.Dense(32, activation="relu")(k.layers.Flatten()(inputs))
    return k.Model(inputs, {"digit": k.layers.Dense(10, activation="softmax", name="digit")(x),
                            "parity": k.layers.Dense(2, name="parity")(x)}, name="two_outputs")


def _gru():
    inputs = k.Input((49, 10), batch_size=1)
    x = k.layers.GRU(16, unroll=True)(inputs)
    return k.Model(inputs, k.layers.Dense(4, activation="softmax")(x), name="gru")


def _nested():
    inner = k.Sequential([k.Input((16,)), k.layers.Dense(8, activation="relu")], name="inner")
    inputs = k.Input((16,))
    return k.Model(inputs, k.layers.Dense(2)(inner(inputs)), name="nested")


@pytest.mark.parametrize("build", [_residual, _depthwise, _mobilenet, _autoencoder, _two_outputs, _gru, _nested],
                         ids=lambda f: f.__name__.strip("_"))
def test_translation_is_equivalent_on_the_zoo_architectures(build, mnist_subset):
    k.utils.set_random_seed(1)
    model = build()
    # Real inputs: MNIST digits tiled or cropped to each model's input shape.
    x_train = mnist_subset[0][:64]
    shape = tuple(d or 1 for d in model.inputs[0].shape[1:])
    count = len(x_train)  # a fixed-batch model (the GRU, batch 1) is compared batch by batch
    flat = np.resize(x_train.reshape(count, -1), (count, int(np.prod(shape))))
    inputs = flat.reshape((count, *shape)).astype(np.float32)
    translation = keras3_io.to_tf_keras(model, inputs=inputs, inputs_source="MNIST pixels")
    assert isinstance(translation.model, keras.Model)
    assert translation.max_abs_error <= 1e-5 and translation.num_samples == count
    assert list(translation.model.output_names) == keras3_io.output_names(model)
    assert translation.model.count_params() == model.count_params()
    back = keras3_io.to_keras3(translation.model, like=model)
    assert all(np.array_equal(a, b) for a, b in zip(back.get_weights(), model.get_weights()))


def test_keras3_model_prunes_clusters_and_quantizes_through_the_api(trained_keras3, mnist_subset):
    """cluster, quantize_aware and factorize take a Keras 3 model (translated); the clustered result comes back
    as a Keras 3 model with its weights."""
    import tfcompress

    x_train, y_train, x_test, y_test = mnist_subset
    clustered = tfcompress.cluster(trained_keras3, 8)
    clustered.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"])
    clustered.fit(x_train[:1024], y_train[:1024], epochs=1, batch_size=64, verbose=0)
    back = tfcompress.to_keras3(tfcompress.strip(clustered), like=trained_keras3)
    assert type(back).__module__.startswith("keras.")
    assert np.unique(back.get_layer("fc").kernel.numpy()).size <= 8
    accuracy = np.mean(np.argmax(back.predict(x_test, verbose=0), -1) == y_test)
    assert accuracy > 0.85  # measured 0.95 after one epoch at 8 clusters
    qat = tfcompress.quantize_aware(trained_keras3)
    assert any(type(layer).__name__ == "QuantizeWrapperV2" for layer in qat.layers)
    assert tfcompress.factorize(trained_keras3, rank=4, layers=["fc"]).params_after < trained_keras3.count_params()


# ---------------------------------------------------------------------------------------------------
# optimize and convert --target micro from a Keras 3 .keras file, as a user runs them


def test_keras3_file_through_optimize_prune_qat_and_convert_micro(keras3_files, tmp_path):
    common = [f"--eval_data={keras3_files['eval']}", f"--input_scale={SCALE}", "--noprogress",
              "--latency_runs=0"]
    optimize, micro = run_scripts(
        "pipelines/__main__.py",
        ["optimize", f"--keras_model={keras3_files['keras']}", f"--train_data={keras3_files['train']}", "--prune",
         "--final_sparsity=0.5", "--qat", "--prune_epochs=1", "--qat_epochs=1", "--batch_size=64",
         "--max_accuracy_drop=0.02", "--target=micro", f"--output_dir={tmp_path}/optimize", *common],
        ["convert", f"--keras_model={keras3_files['keras']}", f"--calibration_data={CALIBRATION}",
         "--calibration_key=x", "--target=micro", f"--output_dir={tmp_path}/convert", *common])
    assert optimize.returncode == 0, optimize.stderr[-3000:]
    assert micro.returncode == 0, micro.stderr[-3000:]
    for done in (optimize, micro):  # what a person reads: no warnings, no TensorFlow C++ log lines
        noise = [line for line in (done.stdout + done.stderr).splitlines()
                 if re.search(r"^[EWF]\d{4} |Warning|^WARNING", line)]
        assert not noise, noise[:5]
    report = json.loads(open(tmp_path / "optimize" / "report.json").read())
    assert report["input_model"]["kind"] == "Keras 3 model (.keras file)"
    translation = report["input_model"]["translation"]
    assert translation["max_abs_error"] <= 1e-5 and translation["num_samples"] == 256
    stages = {s["stage"]: s for s in report["stages"]}
    assert stages["prune"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert all(v == pytest.approx(0.5, abs=0.02) for v in stages["convert"]["weight_sparsity"].values())
    assert stages["convert"]["micro"]["arena"]["arena_bytes"] > 0
    # 50% pruning and QAT for one epoch each on 2,200 images: measured 0.905 against 0.930 float.
    assert stages["convert"]["eval_accuracy"] >= stages["float"]["eval_accuracy"] - 0.04
    # The pruned float model handed back in Keras 3 (the user's architecture, its layer names, the zeros).
    handed = k.saving.load_model(report["keras3_model"], compile=False)
    assert report["keras3_model"].endswith(KERAS3_FILENAME)
    assert [layer.name for layer in handed.layers] == [layer.name for layer in keras3_cnn().layers]
    kernel = handed.get_layer("fc").kernel.numpy()
    assert np.mean(kernel == 0) == pytest.approx(0.5, abs=0.01)
    convert_report = json.loads(open(tmp_path / "convert" / "report.json").read())
    assert convert_report["verified"] and convert_report["micro"]["arena"]["arena_bytes"] > 0
    assert "Keras 3 model (.keras file)" in open(tmp_path / "optimize" / "report.md").read()


# ---------------------------------------------------------------------------------------------------
# Refusals: one line, naming the cause and the fix


def test_keras3_export_savedmodel_is_refused_for_training_stages(keras3_files, tmp_path):
    config = OptimizeConfig(output_dir=str(tmp_path / "out"), train_data=keras3_files["train"],
                            saved_model_dir=keras3_files["export"], input_scale=SCALE, prune=True)
    with pytest.raises(ModelLoadError, match=r"is a Keras 3 model\.export\(\) SavedModel: it holds the traced "
                                             r"graph.*model\.save\('model\.keras'\)"):
        run_optimize(config)
    assert not os.path.exists(tmp_path / "out")


def test_layer_without_tf_keras_counterpart_is_named():
    inputs = k.Input((16,))
    x = k.layers.Dense(8, name="fc")(inputs)
    x = k.layers.RMSNormalization(name="rms")(x)  # Keras 3 only
    model = k.Model(inputs, x)
    with pytest.raises(keras3_io.Keras3Error, match=r"^Layer 'rms' \(keras\.layers\.RMSNormalization\) of the "
                                                    r"Keras 3 model has no tf_keras counterpart.*Received: layer=rms"):
        keras3_io.to_tf_keras(model)


def test_operator_on_keras_tensors_is_named_with_the_layer_to_use():
    inputs = k.Input((16,))
    x = k.layers.Dense(8, name="fc")(inputs)
    model = k.Model(inputs, x + 1.0)
    with pytest.raises(keras3_io.Keras3Error, match=r"keras\.src\.ops\.numpy\.Add\) of the Keras 3 model has no "
                                                    r"tf_keras counterpart.*keras\.layers\.Add\(\)"):
        keras3_io.to_tf_keras(model)


def test_subclassed_keras3_model_is_refused_with_what_is_needed():
    class Net(k.Model):
        def __init__(self):
            super().__init__()
            self.fc = k.layers.Dense(4)

        def call(self, x):
            return self.fc(x)

    net = Net()
    net(np.zeros((1, 8), np.float32))
    with pytest.raises(keras3_io.Keras3Error, match=r"needs a functional or Sequential Keras 3 model, but 'net' is "
                                                    r"a subclassed model \(Net\).*keras\.Sequential"):
        keras3_io.to_tf_keras(net, stage="cluster")


def test_keras3_model_on_another_backend_is_refused():
    """Pinned by its message: Keras 3's other backends (JAX, PyTorch; its numpy backend imports JAX) are not
    installed here, so a model cannot be made on one; `check_usable` is what every entry point calls."""
    model = keras3_cnn()
    keras3_io.check_usable(model)  # the TensorFlow backend: accepted
    with pytest.raises(keras3_io.Keras3Error, match=r"^The Keras 3 model 'keras3_cnn' runs on the 'jax' backend; "
                                                    r"tfcompress converts and trains TensorFlow graphs\. Set "
                                                    r"KERAS_BACKEND=tensorflow before importing keras"):
        keras3_io.check_usable(model, backend="jax")


_ENVIRONMENT_SCRIPT = """
import os, sys
import tensorflow as tf
if sys.argv[1] == "touch":
    tf.keras.__name__  # the user's code used tf.keras (Keras 3) before importing tfcompress
import keras
import tfcompress
from tfcompress.core._keras import keras as tf_keras
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
print(tf.keras.__name__.split(".")[0], keras.__version__.split(".")[0], tf_keras.__version__.split(".")[0])
print(tfcompress.load_model(model).kind, len(tfcompress.quantize_aware(model).layers) > 0,
      os.environ.get("TF_USE_LEGACY_KERAS"))
"""


@pytest.mark.parametrize("legacy, touch, tf_keras_is", [
    (None, "none", "tf_keras"),  # unset: tfcompress sets it to 1, tf.keras is tf_keras (said in the README)
    ("0", "none", "keras"),  # the user's TF_USE_LEGACY_KERAS=0 holds: tf.keras stays Keras 3
    (None, "touch", "keras"),  # tf.keras used before tfcompress: it stays what it was
])
def test_a_keras3_users_process(legacy, touch, tf_keras_is):
    """`import keras` is Keras 3 whatever happens; tf.keras follows TF_USE_LEGACY_KERAS as the user left it; and
    tfcompress works on both Keras in every case."""
    env = {name: value for name, value in os.environ.items() if name != "TF_USE_LEGACY_KERAS"}
    if legacy is not None:
        env["TF_USE_LEGACY_KERAS"] = legacy
    out = subprocess.run([sys.executable, "-c", _ENVIRONMENT_SCRIPT, touch], env=env, cwd=ROOT, text=True,
                         capture_output=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    modules, result = out.stdout.splitlines()[-2:]
    assert modules == f"{tf_keras_is} 3 2"
    expected_variable = legacy if legacy is not None else "1"
    assert result == f"Keras 3 model (object) True {expected_variable}"


def test_keras_file_version_is_read_without_loading(keras3_files, keras_file, h5_file, tmp_path):
    assert keras3_io.file_keras_version(keras3_files["keras"]) == 3
    assert keras3_io.file_keras_version(keras3_files["h5"]) == 3
    assert keras3_io.file_keras_version(keras_file) == 2
    assert keras3_io.file_keras_version(h5_file) == 2
    broken = tmp_path / "broken.keras"
    with zipfile.ZipFile(broken, "w") as archive:
        archive.writestr("config.json", "{}")
    assert keras3_io.file_keras_version(str(broken)) is None
