"""The optimize pipeline on a real CNN and real MNIST: prune → PQAT → verified int8, resuming, and the
factorize, cluster and distillation stages."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

import numpy as np
import pytest

from conftest import CALIBRATION, MNIST, SCALE, run_scripts
from tfcompress.core._keras import keras, tf
from tfcompress.core.errors import NotFullyQuantizedError, OutputPathError
import tfcompress
from tfcompress.runs.candidates import Candidate, decide
from tfcompress.runs.optimize import OptimizeConfig, run_optimize
from tfcompress.training.losses import output_activation, training_loss
from tfcompress.core.tflite_model import read_tflite
from tfcompress.models import zoo, zoo_data


def _config(keras_file, train_npz, eval_npz, output_dir, **overrides):
    values = dict(output_dir=str(output_dir), train_data=train_npz, keras_model=keras_file,
                  eval_data=eval_npz, input_scale=SCALE, prune=True, final_sparsity=0.5, qat=True,
                  prune_epochs=1, qat_epochs=1, batch_size=64, max_accuracy_drop=0.02)
    values.update(overrides)
    return OptimizeConfig(**values)


def test_prune_then_pqat_gives_verified_sparse_int8_and_resumes(keras_file, train_npz, eval_npz, tmp_path):
    config = _config(keras_file, train_npz, eval_npz, tmp_path / "out")
    result = run_optimize(config)
    assert [s["stage"] for s in result.stages] == ["float", "prune", "qat", "convert"]
    parsed = read_tflite(result.model_path)
    assert {parsed.tensors[i].dtype for i in parsed.inputs + parsed.outputs} == {"uint8"}
    prune_stage, convert_stage = result.stages[1], result.stages[3]
    assert prune_stage["sparsity"] == pytest.approx(0.5, abs=0.01)
    # The zeros survive PQAT and int8 conversion into the shipped weights.
    assert all(v == pytest.approx(0.5, abs=0.02) for v in convert_stage["weight_sparsity"].values())
    assert convert_stage["eval_accuracy"] >= result.stages[0]["eval_accuracy"] - 0.03
    report = json.loads(open(result.report_path).read())
    assert report["loss"] == ("sparse_categorical_crossentropy (from_logits=True: the model ends in linear, so it "
                              "outputs logits)")
    assert report["stages"][-1]["bytes"] == os.path.getsize(result.model_path)
    # The rendered report reads the stage files from disk: check them against Keras' own view.
    rows = {row["stage"]: row for row in report["report"]["stages"]}
    assert list(rows) == ["float", "prune", "qat", "int8 (.tflite)"]
    pruned = keras.models.load_model(tmp_path / "out" / "stages" / "prune.h5")
    assert rows["prune"]["parameters"] == pruned.count_params()
    assert rows["prune"]["nonzero_parameters"] == sum(int(np.count_nonzero(w)) for w in pruned.get_weights())
    assert rows["int8 (.tflite)"]["accuracy"] == convert_stage["eval_accuracy"]
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "layer_sparsity.png").exists()

    # Interrupted after pruning: the rerun starts at QAT and leaves the pruned model alone.
    state_path = tmp_path / "out" / "stages" / "state.json"
    state = json.loads(state_path.read_text())
    state["completed"] = state["completed"][:2]
    state_path.write_text(json.dumps(state))
    pruned_mtime = os.path.getmtime(tmp_path / "out" / "stages" / "prune.h5")
    again = run_optimize(config)
    assert again.resumed_after == "prune"
    assert os.path.getmtime(tmp_path / "out" / "stages" / "prune.h5") == pruned_mtime
    assert [s["stage"] for s in again.stages] == ["float", "prune", "qat", "convert"]

    with pytest.raises(OutputPathError, match=r"holds stages made with other settings\. Pass --overwrite"):
        run_optimize(_config(keras_file, train_npz, eval_npz, tmp_path / "out", final_sparsity=0.6))


def _integer_only_uint8_io(parsed) -> bool:
    io = set(parsed.inputs + parsed.outputs)
    return ({parsed.tensors[i].dtype for i in io} == {"uint8"}
            and {t.dtype for t in parsed.tensors if t.index not in io} <= {"int8", "int32"})


@pytest.fixture(scope="module")
def resnet8_files(tmp_path_factory):
    """The zoo's ResNet-8 trained on MNIST train[:3000] (32x32x3), and a training file of train[:3600]:
    the last 600, which the float model never saw, are the optimize run's validation split."""
    model, data = zoo.train("resnet8")
    directory = tmp_path_factory.mktemp("resnet8")
    files = zoo.write_run_files(model, data, directory)
    held_out = zoo_data.mnist_32x32_rgb(num_train=3600)
    np.savez(directory / "train.npz", x_train=held_out.x_train, y_train=held_out.y_train)
    return files, str(directory / "train.npz")


@pytest.mark.slow  # trains the zoo's ResNet-8 (about 15 s) before a QAT run (about 15 s)
def test_one_epoch_qat_of_the_residual_cnn_loses_to_ptq_on_validation_so_ptq_ships(resnet8_files, tmp_path):
    files, train = resnet8_files
    config = OptimizeConfig(output_dir=str(tmp_path / "out"), train_data=train, keras_model=files.keras_model,
                            validation_fraction=600 / 3600, eval_data=files.eval_data, qat=True, batch_size=64,
                            calibration_data=files.calibration_data, calibration_key="x", latency_runs=0)
    result = run_optimize(config)
    assert [s["stage"] for s in result.stages] == ["float", "qat", "convert"]
    report = json.loads(open(result.report_path).read())
    shipped = report["shipped"]
    qat, ptq = shipped["candidates"]["qat"], shipped["candidates"]["ptq"]
    # A one-epoch QAT fine-tune of the residual CNN (BatchNorm folded, batch statistics) loses accuracy
    # that post-training quantization of the float model keeps.
    assert qat["validation_accuracy"] < ptq["validation_accuracy"]
    assert shipped["candidate"] == "ptq" and report["stages"][-1]["shipped"] == "ptq"
    assert shipped["reason"].startswith("post-training quantization scored higher (validation accuracy QAT ")
    # Made from the float model, calibrated on --calibration_data as given.
    assert ptq["source"] == report["stages"][0]["artefact"] == report["stages"][-1]["converted_from"]
    assert ptq["calibration_data"] == files.calibration_data
    # What ships passed the gated convert stage and is byte for byte the PTQ candidate.
    shipped_bytes = open(result.model_path, "rb").read()
    assert _integer_only_uint8_io(read_tflite(shipped_bytes))
    assert shipped_bytes == open(ptq["model_path"], "rb").read() and len(shipped_bytes) == ptq["bytes"]
    assert report["stages"][-1]["eval_accuracy"] == pytest.approx(ptq["eval_accuracy"], abs=0.002)


def test_force_qat_ships_qat_where_ptq_scores_higher_and_a_rerun_without_it_ships_ptq(keras_file, train_npz,
                                                                                      eval_npz, tmp_path):
    # A learning rate far too high for a fine-tune: QAT wrecks the small CNN, post-training quantization of
    # the float model does not.
    config = _config(keras_file, train_npz, eval_npz, tmp_path / "out", prune=False, learning_rate=0.05,
                     force_qat=True, latency_runs=0)
    forced = run_optimize(config)
    qat, ptq = forced.shipped["candidates"]["qat"], forced.shipped["candidates"]["ptq"]
    assert qat["validation_accuracy"] < ptq["validation_accuracy"] - 0.05
    # Without --calibration_data, PTQ calibrates on samples drawn from the training split, as stored.
    assert ptq["source"] == forced.stages[0]["artefact"]
    assert ptq["calibration_data"] == str(tmp_path / "out" / "stages" / "ptq_calibration.npz")
    with np.load(ptq["calibration_data"]) as d, np.load(train_npz) as train:
        drawn, training_split = d["x"], train["x_train"][:2200 - 220]  # the last 10% validate
        assert drawn.shape == (500, 28, 28) and drawn.dtype == training_split.dtype
        assert {x.tobytes() for x in drawn} <= {x.tobytes() for x in training_split}
    assert forced.shipped["candidate"] == "qat" and forced.stages[-1]["shipped"] == "qat"
    assert forced.shipped["reason"].startswith("QAT as --force_qat asks (validation accuracy QAT ")
    assert forced.stages[-1]["converted_from"] == forced.stages[1]["artefact"]
    shipped_bytes = open(forced.model_path, "rb").read()
    assert _integer_only_uint8_io(read_tflite(shipped_bytes))
    assert shipped_bytes == open(qat["model_path"], "rb").read()

    # Which candidate ships is decided after training: without --force_qat the rerun resumes after QAT.
    chosen = run_optimize(dataclasses.replace(config, force_qat=False))
    assert chosen.resumed_after == "qat"
    report = json.loads(open(chosen.report_path).read())
    assert report["shipped"]["candidate"] == "ptq" and report["stages"][-1]["shipped"] == "ptq"
    assert report["shipped"]["reason"] == (
        f"post-training quantization scored higher (validation accuracy QAT {qat['validation_accuracy']:.4f}, "
        f"post-training quantization {ptq['validation_accuracy']:.4f})")
    shipped_bytes = open(chosen.model_path, "rb").read()
    assert _integer_only_uint8_io(read_tflite(shipped_bytes))
    assert shipped_bytes == open(ptq["model_path"], "rb").read()


def _candidate(name: str, validation_accuracy: float | None) -> Candidate:
    made = validation_accuracy is not None
    return Candidate(name, f"{name}.h5", None, None, model_path=f"{name}.tflite" if made else None,
                     validation_accuracy=validation_accuracy, error=None if made else "conversion failed")


@pytest.mark.parametrize("qat, ptq, force_qat, shipped, reason", [
    (0.95, 0.95, False, "ptq", r"^post-training quantization scored as high \(validation accuracy QAT 0\.9500, "
                               r"post-training quantization 0\.9500\); a tie ships it, as the model not fine-tuned"),
    (0.96, 0.95, False, "qat", r"^QAT scored higher \(validation accuracy QAT 0\.9600, post-training "
                               r"quantization 0\.9500\)$"),
    (0.90, 0.95, False, "ptq", r"^post-training quantization scored higher \(validation accuracy QAT 0\.9000, "),
    (0.90, 0.95, True, "qat", r"^QAT as --force_qat asks \(validation accuracy QAT 0\.9000, "),
    (0.90, None, False, "qat", r"^QAT: post-training quantization failed \(see its error\)$"),
])
def test_qat_ships_only_when_forced_or_strictly_better_on_validation(qat, ptq, force_qat, shipped, reason):
    choice = decide(_candidate("qat", qat), _candidate("ptq", ptq), force_qat=force_qat)
    assert choice.shipped.name == shipped
    assert re.search(reason, choice.reason)
    assert choice.to_json()["candidate"] == shipped and set(choice.to_json()["candidates"]) == {"qat", "ptq"}


def test_nothing_to_do_and_bad_split_are_refused(keras_file, train_npz, tmp_path):
    with pytest.raises(ValueError, match=r"Nothing to optimize: pass --prune_channels, --factorize_energy, --prune, "
                                         r"--cluster and/or --qat"):
        OptimizeConfig(output_dir=str(tmp_path), train_data=train_npz, keras_model=keras_file)
    with pytest.raises(ValueError, match=r"validation_fraction .* Received: validation_fraction=1.0"):
        OptimizeConfig(output_dir=str(tmp_path), train_data=train_npz, keras_model=keras_file, prune=True,
                       validation_fraction=1.0)


def test_training_data_errors_name_the_training_flags(keras_file, eval_npz, tmp_path):
    from tfcompress.core.errors import CalibrationDataError

    with pytest.raises(CalibrationDataError, match=r"^Training data .* has no array named 'x_train'.*"
                                                   r"--train_key / --train_labels_key"):
        run_optimize(OptimizeConfig(output_dir=str(tmp_path / "out"), train_data=eval_npz,
                                    keras_model=keras_file, input_scale=SCALE, prune=True))
    assert not (tmp_path / "out").exists()


def _module_saved_model(path) -> str:
    """A SavedModel of a plain tf.Module (no Keras): convertible, but nothing to fine-tune."""
    class Scale(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.ones((784, 10)))

        @tf.function(input_signature=[tf.TensorSpec((None, 28, 28, 1), tf.float32)])
        def __call__(self, x):
            return {"logits": tf.matmul(tf.reshape(x, (-1, 784)), self.w)}

    module = Scale()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.__call__})
    return str(path)


def test_command_line_bad_input_exits_2(tmp_path):
    not_keras = _module_saved_model(tmp_path / "module_saved_model")
    # The console script as a Python script, so that the runs go at once (each imports TensorFlow).
    tfcompress = os.path.join(os.path.dirname(sys.executable), "tfcompress")
    missing, bad_alpha, module = run_scripts(
        tfcompress,
        ["optimize", "--keras_model=/nonexistent.keras", f"--train_data={MNIST}", "--prune",
         f"--output_dir={tmp_path}/out"],
        # Every new stage flag parses and reaches OptimizeConfig; the last one is out of range.
        ["optimize", "--keras_model=/nonexistent.keras", f"--train_data={MNIST}", "--factorize_energy=0.9",
         "--factorize_layers=fc", "--factorize_epochs=1", "--prune", "--cluster=8", "--cluster_epochs=1",
         "--qat", "--force_qat",
         "--distill_from=/nonexistent_teacher.h5", "--distill_temperature=2", "--distill_alpha=1.5",
         f"--output_dir={tmp_path}/out"],
        ["optimize", f"--saved_model_dir={not_keras}", f"--train_data={MNIST}", "--prune",
         f"--input_scale={SCALE}", f"--output_dir={tmp_path}/out"])
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "tfcompress optimize: error: Model not found: /nonexistent.keras. Pass an existing SavedModel "
        "directory or .keras/.h5 file."]
    assert bad_alpha.returncode == 2
    assert bad_alpha.stderr.strip().splitlines()[-1].startswith("tfcompress optimize: error: distill_alpha weighs")
    assert bad_alpha.stderr.strip().endswith("Received: distill_alpha=1.5")
    assert module.returncode == 2, module.stderr
    assert module.stderr.strip().splitlines() == [
        f"tfcompress optimize: error: {not_keras} is a SavedModel that holds no Keras model, and the "
        "training-time stages (prune, cluster, QAT, factorize, distill) need one: pass the Keras model "
        "(--keras_model, or a SavedModel written by tf_keras model.save()), or convert this one as it is with "
        "tfcompress convert."]
    assert not (tmp_path / "out").exists()


def test_layers_left_float_make_int8_refuse_and_dynamic_accept(train_npz, eval_npz, tmp_path):
    model = keras.Sequential([keras.layers.Input((28, 28, 1)), keras.layers.Flatten(name="flat"),
                              keras.layers.Dense(10, name="dense"),
                              keras.layers.Lambda(lambda t: tf.sin(t), name="sine")])
    path = tmp_path / "sine.h5"
    model.save(path)
    # The test's own file: trusted, so its Lambda may be rebuilt (tests/test_safe_loading.py: refused otherwise).
    config = dict(output_dir=str(tmp_path / "out"), train_data=train_npz, keras_model=str(path), trust_model=True,
                  input_scale=SCALE, qat=True, leave_float=("sine",), batch_size=64)
    with pytest.raises(NotFullyQuantizedError, match=r"in float: SIN"):
        run_optimize(OptimizeConfig(**config))
    result = run_optimize(OptimizeConfig(**config, mode="dynamic"))  # told otherwise: resumes, converts
    assert result.resumed_after == "qat"
    assert read_tflite(result.model_path).tensors[read_tflite(result.model_path).inputs[0]].dtype == "float32"


def test_bad_pruning_settings_fail_before_anything_is_written(keras_file, train_npz, tmp_path):
    # small_cnn's first conv sees one input channel: 2:4 cannot prune it unless it is excluded.
    with pytest.raises(ValueError, match=r'structure="2:4" needs at least 4 input channels.*conv'):
        run_optimize(OptimizeConfig(output_dir=str(tmp_path / "out"), train_data=train_npz,
                                    keras_model=keras_file, input_scale=SCALE, prune=True,
                                    final_sparsity=0.5, prune_structure="2:4"))
    assert not (tmp_path / "out").exists()


def test_prune_then_cluster_then_pcqat_keeps_zeros_and_clusters_in_the_int8_model(keras_file, train_npz,
                                                                                  eval_npz, tmp_path):
    result = run_optimize(_config(keras_file, train_npz, eval_npz, tmp_path / "out", cluster=8))
    assert [s["stage"] for s in result.stages] == ["float", "prune", "cluster", "qat", "convert"]
    stages = {s["stage"]: s for s in result.stages}
    assert stages["qat"]["scheme"] == "cluster_preserving"
    assert stages["cluster"]["preserve_sparsity"] is True
    assert set(stages["cluster"]["distinct_values"]) == {"conv", "fc", "logits"}
    assert all(n <= 8 for n in stages["cluster"]["distinct_values"].values())
    assert stages["cluster"]["sparsity"] >= stages["prune"]["sparsity"] - 0.01
    assert stages["cluster"]["nonzero_parameters"] < stages["float"]["nonzero_parameters"]
    parsed = read_tflite(result.model_path)
    assert {parsed.tensors[i].dtype for i in parsed.inputs + parsed.outputs} == {"uint8"}
    # What ships: at most 8 values in every output channel, and the pruned zeros kept through PCQAT.
    convert_stage = stages["convert"]
    assert len(convert_stage["distinct_values"]) == 3
    assert all(v["max_per_channel"] <= 8 for v in convert_stage["distinct_values"].values())
    assert all(v >= 0.5 - 0.02 for v in convert_stage["weight_sparsity"].values())
    assert convert_stage["eval_accuracy"] >= stages["float"]["eval_accuracy"] - 0.05


def test_factorize_reduces_parameters_and_converts_verified(saved_model_dir, train_npz, eval_npz, tmp_path):
    # From a SavedModel: its reloaded layers name their weights without the layer's scope, which once made
    # the fine-tuned model's optimizer slots collide in the stage's HDF5 file.
    result = run_optimize(OptimizeConfig(
        output_dir=str(tmp_path / "out"), train_data=train_npz, saved_model_dir=saved_model_dir,
        eval_data=eval_npz, input_scale=SCALE, factorize_energy=0.9, factorize_layers=("fc",),
        batch_size=64, calibration_data=str(CALIBRATION), calibration_key="x", max_accuracy_drop=0.02))
    assert [s["stage"] for s in result.stages] == ["float", "factorize", "convert"]
    float_stage, factorize_stage, convert_stage = result.stages
    (fc,) = factorize_stage["factorization"]
    assert fc["name"] == "fc" and fc["factorized"] and 1 <= fc["rank"] < 32
    assert fc["params_after"] < fc["params_before"] and fc["macs_after"] < fc["macs_before"]
    assert float_stage["parameters"] - factorize_stage["parameters"] == fc["params_before"] - fc["params_after"]
    assert "distilled_from" not in factorize_stage
    parsed = read_tflite(result.model_path)
    assert sum(op.op == "FULLY_CONNECTED" for op in parsed.operators) == 3  # fc_lowrank, fc, logits
    assert convert_stage["eval_accuracy"] >= float_stage["eval_accuracy"] - 0.05


def test_distilled_factorize_and_prune_reduce_parameters_and_convert_verified(keras_file, train_npz, eval_npz,
                                                                               tmp_path):
    # The unfactorized model teaches its own factorized, pruned copy; no QAT, so calibrated PTQ converts it.
    result = run_optimize(_config(keras_file, train_npz, eval_npz, tmp_path / "out", qat=False,
                                  factorize_energy=0.9, distill_from=keras_file,
                                  calibration_data=str(CALIBRATION), calibration_key="x"))
    assert [s["stage"] for s in result.stages] == ["float", "factorize", "prune", "convert"]
    float_stage, factorize_stage, prune_stage = result.stages[:3]
    assert factorize_stage["parameters"] < float_stage["parameters"]
    layers = {layer["name"]: layer for layer in factorize_stage["factorization"]}
    assert set(layers) == {"fc", "logits"} and layers["fc"]["factorized"]
    assert layers["fc"]["params_after"] < layers["fc"]["params_before"]
    assert float_stage["parameters"] - factorize_stage["parameters"] == (
        factorize_stage["factorized_parameters"]["before"] - factorize_stage["factorized_parameters"]["after"])
    assert prune_stage["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert "distilled_from" not in float_stage
    assert factorize_stage["distilled_from"] == prune_stage["distilled_from"] == keras_file
    report = json.loads(open(result.report_path).read())
    assert report["config"]["distill_from"] == keras_file
    assert result.stages[-1]["distinct_values"] is None  # not clustered
    parsed = read_tflite(result.model_path)
    assert {parsed.tensors[i].dtype for i in parsed.inputs + parsed.outputs} == {"uint8"}
    assert result.stages[-1]["eval_accuracy"] >= float_stage["eval_accuracy"] - 0.05


@pytest.mark.parametrize("overrides, message", [
    (dict(cluster=1), r"integer in \[2, 256\].* Received: cluster=1$"),
    (dict(cluster=257), r"Received: cluster=257$"),
    (dict(cluster=2), r"needs --cluster=3 or more\. Received: cluster=2, prune=True$"),
    (dict(factorize_energy=0.0), r"in \(0, 1\].* Received: factorize_energy=0.0$"),
    (dict(factorize_energy=1.5), r"Received: factorize_energy=1.5$"),
    (dict(prune=False, qat=True, factorize_layers=("fc",)),
     r"Pass --factorize_energy=0.9 \(say\) as well\. Received: factorize_layers=\['fc'\], "
     r"factorize_energy=None$"),
    (dict(distill_from="teacher.h5", distill_temperature=0.0),
     r"must be positive .* Received: distill_temperature=0.0$"),
    (dict(distill_alpha=1.5), r"fraction in \[0, 1\] .* Received: distill_alpha=1.5$"),
    (dict(distill_alpha=-0.1), r"Received: distill_alpha=-0.1$"),
    (dict(prune=False, distill_from="teacher.h5"),
     r"with only --qat the teacher would go unused.* Received: distill_from='teacher.h5'$"),
    (dict(cluster_epochs=0), r"Received: cluster_epochs=0$"),
    (dict(qat=False, force_qat=True),
     r"^force_qat ships the QAT model even where post-training quantization scores higher on validation, so it "
     r"needs --qat: pass --qat as well, or leave --force_qat out\. Received: force_qat=True, qat=False$"),
])
def test_bad_new_stage_settings_are_refused(keras_file, train_npz, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _config(keras_file, train_npz, None, tmp_path / "out", **overrides)


def test_teacher_of_another_shape_or_with_softmax_is_refused_before_training(keras_file, train_npz, tmp_path):
    def save(units, activation, name):
        model = keras.Sequential([keras.layers.Input((28, 28, 1)), keras.layers.Flatten(),
                                  keras.layers.Dense(units, activation=activation)])
        model.save(tmp_path / name)
        return str(tmp_path / name)

    five = save(5, None, "five.h5")
    with pytest.raises(ValueError, match=r"The teacher .*five\.h5 must take the input and give the output shape "
                                         r".* Received: teacher input shape=\(None, 28, 28, 1\), teacher output "
                                         r"shape=\(None, 5\), student input shape=\(None, 28, 28, 1\), student "
                                         r"output shape=\(None, 10\)$"):
        run_optimize(_config(keras_file, train_npz, None, tmp_path / "out", distill_from=five))
    with pytest.raises(ValueError, match=r"the teacher \(--distill_from\) ends in a softmax"):
        run_optimize(_config(keras_file, train_npz, None, tmp_path / "out",
                             distill_from=save(10, "softmax", "softmax.h5")))
    assert not (tmp_path / "out").exists()


def test_settings_of_stages_that_do_not_run_leave_the_fingerprint_alone(keras_file, train_npz, tmp_path):
    base = _config(keras_file, train_npz, None, tmp_path)
    assert _config(keras_file, train_npz, None, tmp_path, cluster_epochs=3, distill_alpha=0.5,
                   factorize_epochs=2).fingerprint() == base.fingerprint()
    # Which candidate ships is decided after training: --force_qat reruns only the candidates and convert.
    assert _config(keras_file, train_npz, None, tmp_path, force_qat=True).fingerprint() == base.fingerprint()
    clustered = _config(keras_file, train_npz, None, tmp_path, cluster=8)
    assert clustered.fingerprint() != base.fingerprint()
    assert _config(keras_file, train_npz, None, tmp_path, cluster=8, cluster_epochs=2).fingerprint() \
        != clustered.fingerprint()
    assert _config(keras_file, train_npz, None, tmp_path, distill_from=keras_file).fingerprint() \
        != base.fingerprint()


def _tiny(head):
    inputs = keras.Input((8,))
    return keras.Model(inputs, head(keras.layers.Dense(4, name="hidden")(inputs)))


@pytest.mark.parametrize("head, expected", [
    (lambda x: keras.layers.Dense(3, activation="softmax", name="out")(x),
     "sparse_categorical_crossentropy (from_logits=False: the model ends in softmax)"),
    (lambda x: keras.layers.Softmax(name="out")(keras.layers.Dense(3)(x)),
     "sparse_categorical_crossentropy (from_logits=False: the model ends in softmax)"),
    (lambda x: keras.layers.Dense(3, name="out")(x),
     "sparse_categorical_crossentropy (from_logits=True: the model ends in linear, so it outputs logits)"),
    (lambda x: keras.layers.Dense(1, activation="sigmoid", name="out")(x),
     "binary_crossentropy (from_logits=False: the model ends in sigmoid)"),
])
def test_the_fine_tuning_loss_follows_the_output_activation(head, expected):
    assert training_loss(_tiny(head)).describe() == expected


def test_loss_is_decided_on_the_float_model_not_the_qat_wrapped_one():
    model = _tiny(lambda x: keras.layers.Dense(3, activation="softmax", name="out")(x))
    wrapped = tfcompress.quantize_aware(model)
    # tfmot swaps the output activation for a quantize-aware one: the wrapped model hides its softmax,
    # which is why the loss is chosen once, before any stage wraps the model.
    assert output_activation(model) == "softmax" and output_activation(wrapped) != "softmax"
    assert training_loss(model, "binary_crossentropy").describe() == (
        "binary_crossentropy (from_logits=False: the model ends in softmax)")
    with pytest.raises(ValueError, match="loss is one of auto, sparse_categorical_crossentropy, "
                                         "binary_crossentropy, mean_squared_error .* Received: loss='mse'"):
        OptimizeConfig(output_dir="o", train_data="t.npz", keras_model="m.keras", qat=True, loss="mse")


def test_channel_pruning_distils_from_a_softmax_teacher_into_a_softmax_student(trained_model, keras_file, train_npz,
                                                                                 eval_npz, tmp_path):
    # Both end in a softmax: the logarithms of the probabilities stand in for the logits, exact up to a constant
    # the softmax cancels, so the fine-tune matches the one of the same model saved without its softmax.
    model = keras.Model(trained_model.inputs, keras.layers.Softmax(name="probabilities")(trained_model.outputs[0]),
                        name="softmax_cnn")
    path = str(tmp_path / "softmax_cnn.keras")
    model.save(path)
    stages = {}
    for name, source in (("softmax", path), ("logits", keras_file)):
        result = run_optimize(_config(source, train_npz, eval_npz, tmp_path / name, prune=False, qat=False,
                                      prune_channels=0.5, distill_from=source, calibration_data=str(CALIBRATION),
                                      calibration_key="x"))
        assert [s["stage"] for s in result.stages] == ["float", "channels", "convert"]
        stages[name] = result.stages
        parsed = read_tflite(result.model_path)
        assert {parsed.tensors[i].dtype for i in parsed.inputs + parsed.outputs} == {"uint8"}
    float_stage, channel_stage = stages["softmax"][:2]
    assert channel_stage["distilled_from"] == path
    assert channel_stage["macs"] < 0.8 * float_stage["macs"]
    assert channel_stage["validation_accuracy"] == pytest.approx(stages["logits"][1]["validation_accuracy"], abs=0.01)
    assert channel_stage["validation_accuracy"] >= float_stage["validation_accuracy"] - 0.1
