"""A model file does not run its code on load unless --trust_model: Lambda layers and unregistered custom layers
are refused, naming each, before Keras deserializes anything; the refused file's side effect never happens."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CALIBRATION, ROOT

from tfcompress.core._keras import keras, keras3
from tfcompress.core.errors import ModelLoadError
from tfcompress.core.model_io import load_model
from tfcompress.runs.optimize import run_optimize
from tfcompress.runs.optimize_config import OptimizeConfig


def _lambda_model(marker: str, build):
    """A model whose Lambda layer appends to `marker` whenever Keras calls it (also while rebuilding it)."""
    def touch(x, path=marker):
        with open(path, "a") as f:
            f.write("ran\n")
        return x * 2.0

    return build(touch)


def _tf_keras_lambda(touch):
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Lambda(touch, name="double")(inputs)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x), name="with_lambda")


def _keras3_lambda(touch):
    k = keras3()
    inputs = k.Input((28, 28, 1))
    x = k.layers.Lambda(touch, name="double", output_shape=(28, 28, 1))(inputs)
    x = k.layers.Flatten()(x)
    return k.Model(inputs, k.layers.Dense(10, name="logits")(x), name="with_lambda")


@pytest.fixture(scope="module")
def lambda_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lambda")
    marker = str(root / "marker.txt")
    files = {}
    model = _lambda_model(marker, _tf_keras_lambda)
    for name, path in (("h5", root / "tf_keras.h5"), ("keras", root / "tf_keras.keras")):
        model.save(path)
        files[name] = str(path)
    model.save(root / "tf_keras_savedmodel", save_format="tf")
    files["savedmodel"] = str(root / "tf_keras_savedmodel")
    k3 = _lambda_model(marker, _keras3_lambda)
    k3.save(root / "keras3.keras")
    files["keras3"] = str(root / "keras3.keras")
    return files, marker


def _clear(marker):
    if os.path.exists(marker):
        os.remove(marker)


@pytest.mark.parametrize("form", ["h5", "keras", "keras3"])
def test_lambda_file_is_refused_and_its_code_never_runs(form, lambda_files):
    files, marker = lambda_files
    _clear(marker)
    with pytest.raises(ModelLoadError, match=r"holds Lambda layer\(s\) 'double' \(their Python code would run on "
                                             r"load\); a model file is not trusted to run code\. .*--trust_model"):
        load_model(files[form])
    assert not os.path.exists(marker)  # the refused file's code did not run


def test_trust_model_loads_it_and_then_the_code_runs(lambda_files):
    """The check is what stops the code: trusted, the same .h5 file's Lambda runs while Keras rebuilds it."""
    files, marker = lambda_files
    _clear(marker)
    loaded = load_model(files["h5"], trust_model=True)
    assert loaded.keras_model.get_layer("double") is not None
    assert os.path.exists(marker)
    _clear(marker)


def test_cli_refuses_with_one_line_and_exit_2_and_runs_nothing(lambda_files, tmp_path):
    files, marker = lambda_files
    _clear(marker)
    done = subprocess.run([sys.executable, "pipelines/__main__.py", "convert", f"--keras_model={files['h5']}",
                           f"--calibration_data={CALIBRATION}", "--calibration_key=x",
                           f"--output_dir={tmp_path}/out", "--noprogress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("tfcompress")]
    assert len(lines) == 1 and "Lambda layer(s) 'double'" in lines[0] and "--trust_model" in lines[0]
    assert "Traceback" not in done.stderr
    assert not os.path.exists(marker) and not (tmp_path / "out").exists()


def test_savedmodel_with_lambda_converts_as_a_graph_but_is_refused_for_training(lambda_files, tmp_path):
    """Restoring a SavedModel's graph runs no Python (convert is safe); rebuilding its Keras layers would, so the
    training stages refuse it unless trusted."""
    files, marker = lambda_files
    _clear(marker)
    assert load_model(files["savedmodel"]).kind == "tf_keras SavedModel"
    assert not os.path.exists(marker)
    train = tmp_path / "train.npz"
    np.savez(train, x_train=np.zeros((64, 28, 28), np.uint8), y_train=np.zeros(64, np.uint8))
    with pytest.raises(ModelLoadError, match=r"Lambda layer\(s\) 'double'"):
        run_optimize(OptimizeConfig(output_dir=str(tmp_path / "out"), train_data=str(train),
                                    saved_model_dir=files["savedmodel"], prune=True))
    assert not os.path.exists(marker)


class Doubler(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x


@keras.saving.register_keras_serializable(package="tests")
class RegisteredDoubler(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x


def test_unregistered_custom_layer_is_named_and_a_registered_one_loads(tmp_path):
    for layer, name in ((Doubler(name="doubler"), "unregistered.h5"),
                        (RegisteredDoubler(name="doubler"), "registered.h5")):
        inputs = keras.Input((4,))
        keras.Model(inputs, keras.layers.Dense(2)(layer(inputs))).save(tmp_path / name)
    with pytest.raises(ModelLoadError, match=r"custom layer\(s\) doubler \(Doubler\) that are not registered "
                                             r"\(keras\.saving\.register_keras_serializable\)"):
        load_model(str(tmp_path / "unregistered.h5"))
    assert load_model(str(tmp_path / "registered.h5")).keras_model.get_layer("doubler") is not None


def test_quantization_aware_and_plain_files_load_without_trust(keras_file, h5_file, tmp_path):
    import tfcompress

    assert load_model(keras_file).keras_model is not None
    qat = tfcompress.quantize_aware(load_model(h5_file).keras_model)
    qat.save(tmp_path / "qat.h5")
    assert load_model(str(tmp_path / "qat.h5")).is_quantization_aware
