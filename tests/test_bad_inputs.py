"""Every bad input of every verb, in one table: exit 2, one line naming the cause and the fix, no traceback, and
nothing written. Each verb's cases run in one process (`tests/bad_input_driver.py`), as the console script would."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CALIBRATION, MNIST, ROOT

from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.core._keras import keras, keras3
from tfcompress.core.model_io import load_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small bad (and good) inputs, made once: models, data, flatbuffers."""
    root = tmp_path_factory.mktemp("bad")
    keras.utils.set_random_seed(0)
    tiny = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                             keras.layers.Dense(10)], name="tiny")
    tiny.save(root / "tiny.keras")
    a, b = keras.Input((28, 28, 1)), keras.Input((4,))
    flat = keras.layers.Flatten()(a)
    keras.Model([a, b], keras.layers.Dense(10)(keras.layers.Concatenate()([flat, b]))).save(root / "two_inputs.keras")
    keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D(),
                      keras.layers.Dense(10)]).save(root / "dynamic.keras")
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Lambda(lambda x: x * 2.0, name="double"),
                      keras.layers.Flatten(), keras.layers.Dense(10)]).save(root / "lambda.h5")
    import h5py

    h5py.File(root / "empty.h5", "w").close()
    (root / "notes.txt").write_text("not a model")
    k3 = keras3()
    k3_inputs = k3.Input((28, 28, 1))
    k3.Model(k3_inputs, k3.layers.Dense(10)(k3.layers.Flatten()(k3_inputs))).export(str(root / "k3_export"),
                                                                                     verbose=False)
    with np.load(MNIST) as d:
        x, y = d["x_test"][:100], d["y_test"][:100]
        np.savez(root / "train.npz", x_train=d["x_train"][:256], y_train=d["y_train"][:256])
    np.savez(root / "eval_bad_labels.npz", x_test=x, y_test=y + 20)
    with_nan = x.astype(np.float32)
    with_nan[3, 5, 5] = np.nan
    np.savez(root / "eval_nan.npz", x_test=with_nan, y_test=y)
    objects = np.empty(2, dtype=object)
    objects[0], objects[1] = {"a": 1}, [1]
    np.savez(root / "object.npz", x=objects)
    np.save(root / "empty.npy", np.zeros((0, 28, 28, 1), np.float32))
    np.save(root / "wrong_shape.npy", np.zeros((8, 5, 5), np.float32))
    from PIL import Image

    (root / "no_images").mkdir()
    (root / "no_images" / "readme.txt").write_text("x")
    (root / "mixed").mkdir()
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(root / "mixed" / "a.png")
    Image.fromarray(np.zeros((32, 30), np.uint8)).save(root / "mixed" / "b.png")
    _write_trees(root, x, y)
    float_tflite = convert(load_model(str(root / "tiny.keras")), ConvertConfig("float32"))
    (root / "float.tflite").write_bytes(float_tflite)
    (root / "garbage.tflite").write_bytes(b"\x00" * 64)
    (root / "truncated.tflite").write_bytes(float_tflite[: len(float_tflite) // 3])
    (root / "labels.txt").write_text("a\nb\n")
    _write_recipes(root)
    return root


def _write_trees(root, x, y) -> None:
    """Streamed sources, each one mistake away from a good class-per-folder tree or TFRecord file."""
    from tfcompress.conversion.datasets import write_image_tree, write_tfrecords

    write_image_tree(x[:20], y[:20] % 2, root / "tree_empty_class")
    (root / "tree_empty_class" / "2").mkdir()
    write_image_tree(x[:20], y[:20] % 2, root / "tree_notes")
    (root / "tree_notes" / "1" / "notes.txt").write_text("not an image")
    write_image_tree(x[:20], y[:20] % 2, root / "tree_broken")
    (root / "tree_broken" / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    write_image_tree(np.repeat(x[:20, ..., None], 3, axis=-1), y[:20] % 2, root / "tree_rgb")
    write_image_tree(x[:24], np.arange(24) % 12, root / "tree_twelve")
    write_tfrecords(x[:20], y[:20], root / "eval.tfrecord")


def _write_recipes(root) -> None:
    """Bad recipes for `tfcompress run`, each one mistake away from a good one."""
    good = {"command": "optimize", "model": {"keras_model": "tiny.keras"}, "data": {"train_data": "train.npz"},
            "stages": [{"prune": {"final_sparsity": 0.5}}, {"qat": {"qat_epochs": 1}}]}
    bad = {
        "unknown_key": {**good, "stages": [{"prune": {"final_sparsty": 0.5}}]},
        "wrong_type": {**good, "stages": [{"prune": {"prune_epochs": "two"}}]},
        "order": {**good, "stages": [{"qat": None}, {"prune": None}]},
        "missing_path": {**good, "data": {"train_data": "absent.npz"}},
        "trust": {**good, "model": {"keras_model": "lambda.h5"}, "trust_model": True},
    }
    for name, recipe in bad.items():
        (root / f"{name}.json").write_text(json.dumps(recipe))
    (root / "recipe.txt").write_text(json.dumps(good))


CAL = [f"--calibration_data={CALIBRATION}", "--calibration_key=x"]

# verb -> (case, arguments with {root} for the fixture directory, what the one line must say)
CASES = {
    "convert": [
        ("no model", [*CAL], "Give exactly one model: --saved_model_dir or --keras_model"),
        ("two models", ["--keras_model={root}/tiny.keras", "--saved_model_dir={root}/k3_export", *CAL],
         "Give exactly one model"),
        ("missing model", ["--keras_model={root}/absent.keras", *CAL], "Model not found"),
        ("unknown format", ["--keras_model={root}/notes.txt", *CAL], "Unknown model format"),
        ("empty .h5", ["--keras_model={root}/empty.h5", *CAL], "holds no model (no model_config"),
        ("Lambda layer", ["--keras_model={root}/lambda.h5", *CAL], "Lambda layer(s) 'double'"),
        ("two inputs", ["--keras_model={root}/two_inputs.keras", *CAL], "has 2 inputs"),
        ("dynamic non-batch dimensions", ["--keras_model={root}/dynamic.keras", *CAL], "are not fixed"),
        ("missing calibration", ["--keras_model={root}/tiny.keras", "--calibration_data={root}/absent.npz"],
         "not found"),
        ("pickled object array", ["--keras_model={root}/tiny.keras", "--calibration_data={root}/object.npz",
                                  "--calibration_key=x"], "pickled object array"),
        ("empty calibration array", ["--keras_model={root}/tiny.keras", "--calibration_data={root}/empty.npy"],
         "is empty (shape (0, 28, 28, 1), 0 samples)"),
        ("calibration of the wrong shape", ["--keras_model={root}/tiny.keras",
                                            "--calibration_data={root}/wrong_shape.npy"],
         "dimension 1 is 5, expected 28"),
        ("image folder without images", ["--keras_model={root}/tiny.keras", "--calibration_data={root}/no_images"],
         "holds no PNG/JPEG images"),
        ("images of mixed sizes", ["--keras_model={root}/tiny.keras", "--calibration_data={root}/mixed"],
         "is 32x30 (height x width) but a.png is 28x28"),
        ("calibration key not given", ["--keras_model={root}/tiny.keras", f"--calibration_data={CALIBRATION}"],
         "no key was given"),
        ("eval labels outside the classes", ["--keras_model={root}/tiny.keras", *CAL,
                                             "--eval_data={root}/eval_bad_labels.npz"], "outside the 10 classes"),
        ("NaN in eval data", ["--keras_model={root}/tiny.keras", *CAL, "--eval_data={root}/eval_nan.npz"],
         "contain 1 NaN"),
        ("image tree without class folders", ["--keras_model={root}/tiny.keras", *CAL, "--eval_data={root}/mixed"],
         "mixed has no class sub-folders. Expected one sub-folder of images per class"),
        ("image tree with an empty class", ["--keras_model={root}/tiny.keras", *CAL,
                                            "--eval_data={root}/tree_empty_class"], "tree_empty_class/2 is empty"),
        ("non-image file in the tree", ["--keras_model={root}/tiny.keras", "--calibration_data={root}/tree_notes"],
         "tree_notes/1/notes.txt is not a PNG/JPEG image"),
        ("unreadable image in the tree", ["--keras_model={root}/tiny.keras", *CAL, "--eval_data={root}/tree_broken"],
         "tree_broken/0/broken.png cannot be read"),
        ("RGB tree for a grayscale model", ["--keras_model={root}/tiny.keras", *CAL, "--eval_data={root}/tree_rgb"],
         "has 3 channel(s) but the model input (None, 28, 28, 1) has 1"),
        ("tree labels outside the classes", ["--keras_model={root}/tiny.keras", *CAL,
                                             "--eval_data={root}/tree_twelve"], "outside the 10 classes"),
        ("TFRecord spec names a missing key", ["--keras_model={root}/tiny.keras", *CAL,
                                               "--eval_data={root}/eval.tfrecord", "--data_spec=image=pixels"],
         "eval.tfrecord has no feature 'pixels' (the image key of the data spec); its features are image, label"),
        ("data spec not KEY=VALUE", ["--keras_model={root}/tiny.keras", *CAL, "--data_spec=pixels"],
         "data_spec names the TFRecord features as image=KEY,label=KEY"),
        ("unknown mode", ["--keras_model={root}/tiny.keras", *CAL, "--mode=int3"], "--mode"),
        ("accuracy drop in points", ["--keras_model={root}/tiny.keras", *CAL, "--max_accuracy_drop=5"],
         "max_accuracy_drop"),
        ("output dir is a file", ["--keras_model={root}/tiny.keras", *CAL, "--output_dir={root}/notes.txt"],
         "is a file, not a directory"),
        ("unexpected argument", ["--keras_model={root}/tiny.keras", *CAL, "extra"], "unexpected arguments"),
        ("no TFLM samples", ["--keras_model={root}/tiny.keras", *CAL, "--target=micro", "--tflm_samples=0"],
         "tflm_samples is how many samples the TFLM check runs: a whole number of at least 1, or 'all'. "
         "Received: tflm_samples='0'"),
        ("TFLM samples not a number", ["--keras_model={root}/tiny.keras", *CAL, "--target=micro",
                                       "--tflm_samples=abc"], "Received: tflm_samples='abc'"),
    ],
    "optimize": [
        ("nothing to optimize", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz"],
         "Nothing to optimize"),
        ("missing training data", ["--keras_model={root}/tiny.keras", "--train_data={root}/absent.npz", "--prune"],
         "not found"),
        ("training tree with an empty class", ["--keras_model={root}/tiny.keras", "--prune",
                                               "--train_data={root}/tree_empty_class"], "tree_empty_class/2 is empty"),
        ("training tree of RGB images", ["--keras_model={root}/tiny.keras", "--prune", "--train_data={root}/tree_rgb"],
         "has 3 channel(s) but the model input (None, 28, 28, 1) has 1"),
        ("Keras 3 export() SavedModel", ["--saved_model_dir={root}/k3_export", "--train_data={root}/train.npz",
                                         "--prune"], "Keras 3 model.export() SavedModel"),
        ("sparsity out of range", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz", "--prune",
                                   "--final_sparsity=1.5"], "final_sparsity"),
        ("labels key count", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz", "--prune",
                              "--train_labels_key=y_train,y_train"], "names 2 labels array(s)"),
        ("Lambda layer", ["--keras_model={root}/lambda.h5", "--train_data={root}/train.npz", "--prune"],
         "Lambda layer(s) 'double'"),
        ("low-bit weights without QAT", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz",
                                         "--prune", "--qat_weights=ternary"], "needs --qat"),
        ("unknown QAT weights", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz", "--qat",
                                 "--qat_weights=int3"], "--qat_weights"),
        ("keep_int8 names an unknown layer", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz",
                                              "--qat", "--qat_weights=ternary", "--keep_int8=nope"],
         "keep_int8 names layers that are not in model"),
        ("channel ratio out of range", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz",
                                        "--prune_channels=1.2"], "prune_channels is the fraction of each layer's"),
        ("auto channels without a budget", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz",
                                            "--prune_channels=auto"], "pass --target_macs, --target_params or"),
        ("budget without auto", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz", "--qat",
                                 "--target_macs=0.5"], "pass --prune_channels=auto as well"),
        ("unreachable MAC budget", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz",
                                    "--prune_channels=auto", "--target_macs=0.01", "--channel_multiple=1"],
         "target_macs=0.01 cannot be reached by removing channels: with every prunable layer at ratio 0.9 the "
         "model keeps 0.250"),
        ("channels with factorize", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz",
                                     "--prune_channels=0.5", "--factorize_energy=0.9"], "both reshape the layers"),
        ("TFLM samples not a number", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz", "--qat",
                                       "--target=micro", "--tflm_samples=some"],
         "tflm_samples is how many samples the TFLM check runs"),
        ("multi_worker without a cluster", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz",
                                            "--prune", "--strategy=multi_worker"],
         "--strategy=multi_worker needs the cluster: set TF_CONFIG on every worker"),
        ("cluster resolver without workers", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz",
                                              "--prune", "--cluster_resolver=slurm"],
         "cluster_resolver='slurm' describes a cluster of workers; it needs strategy='multi_worker'"),
        ("unknown strategy", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz", "--prune",
                              "--strategy=tpu"], "--strategy"),
        ("evaluation TFRecord spec names a missing key", ["--keras_model={root}/tiny.keras", "--prune",
                                                          "--train_data={root}/train.npz", "--data_spec=label=digit",
                                                          "--eval_data={root}/eval.tfrecord"],
         "eval.tfrecord has no feature 'digit' (the label key of the data spec)"),
    ],
    "auto": [
        ("no model", ["--train_data={root}/train.npz"], "Give exactly one model"),
        ("missing training data", ["--keras_model={root}/tiny.keras", "--train_data={root}/absent.npz"], "not found"),
        ("flash budget below the graph's own bytes", ["--keras_model={root}/tiny.keras",
                                                      "--train_data={root}/train.npz", "--max_flash_bytes=100"],
         "bytes the int8 flatbuffer of this model holds besides its weights"),
        ("arena budget without micro", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz",
                                        "--max_arena_bytes=1000"], "pass --target=micro as well"),
        ("accuracy drop in points", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz",
                                     "--max_accuracy_drop=5"], "max_accuracy_drop is a fraction in [0, 1]"),
        ("latency budget without timing", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz",
                                           "--max_latency_ms=1", "--latency_runs=0"],
         "latency_runs must be at least 1"),
        ("Lambda layer", ["--keras_model={root}/lambda.h5", "--train_data={root}/train.npz"],
         "Lambda layer(s) 'double'"),
        ("TFRecord spec names a missing key", ["--keras_model={root}/tiny.keras", "--train_data={root}/eval.tfrecord",
                                               "--data_spec=label=digit"],
         "eval.tfrecord has no feature 'digit' (the label key of the data spec)"),
    ],
    "run": [
        ("unknown key", ["{root}/unknown_key.json"], "stages[0].prune: unknown key 'final_sparsty' (did you mean "
                                                     "'final_sparsity'?)"),
        ("wrong type", ["{root}/wrong_type.json"], "stages[0].prune.prune_epochs: expected a whole number of at "
                                                   "least 1, found a string (\"two\")"),
        ("stages in an impossible order", ["{root}/order.json"], "'qat' cannot come before 'prune'"),
        ("path that does not exist", ["{root}/missing_path.json"], "data.train_data: no such file or folder"),
        ("trust granted by the recipe", ["{root}/trust.json"], "'trust_model' cannot be set in a recipe"),
        ("not a recipe file", ["{root}/recipe.txt"], "a recipe is a .yaml, .yml or .json file"),
        ("no recipe", [], "tfcompress run needs a recipe"),
    ],
    "sensitivity": [
        ("no model", ["--train_data={root}/train.npz"], "Give exactly one model"),
        ("missing training data", ["--keras_model={root}/tiny.keras", "--train_data={root}/absent.npz"], "not found"),
        ("ratio out of range", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz",
                                "--ratios=0.5,1.0"], "ratios are fractions pruned, each in (0, 1)"),
        ("not a number", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz", "--ratios=half"],
         "ratios are numbers in (0, 1)"),
        ("unknown kind", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz", "--kinds=filters"],
         "kinds must be a non-empty subset of ['channel', 'unstructured']"),
        ("unreachable MAC budget", ["--keras_model={root}/tiny.keras", "--train_data={root}/train.npz",
                                    "--target_macs=0.01"], "The budget cannot be reached by removing channels"),
        ("Lambda layer", ["--keras_model={root}/lambda.h5", "--train_data={root}/train.npz"],
         "Lambda layer(s) 'double'"),
        ("TFRecord spec names a missing key", ["--keras_model={root}/tiny.keras", "--train_data={root}/eval.tfrecord",
                                               "--data_spec=image=pixels"],
         "eval.tfrecord has no feature 'pixels' (the image key of the data spec); its features are image, label"),
        ("data spec not KEY=VALUE", ["--keras_model={root}/tiny.keras", "--train_data={root}/eval.tfrecord",
                                     "--data_spec=pixels"], "data_spec names the TFRecord features as image=KEY"),
    ],
    "export": [
        ("missing .tflite", ["--tflite={root}/absent.tflite"], "not found"),
        ("not a flatbuffer", ["--tflite={root}/garbage.tflite"], "not a TFLite flatbuffer"),
        ("truncated flatbuffer", ["--tflite={root}/truncated.tflite"], ".tflite"),
        ("float model", ["--tflite={root}/float.tflite"], "float"),
        ("missing labels file", ["--tflite={root}/float.tflite", "--labels={root}/absent.txt"], "absent.txt"),
        ("float .tflite to ONNX", ["--tflite={root}/float.tflite", "--target=onnx"],
         "the ONNX export takes a verified full-integer .tflite"),
        ("micro-only flag with ONNX", ["--tflite={root}/float.tflite", "--target=onnx", "--compress"],
         "--compress belong(s) to --target=micro"),
        ("float model with the micro target", ["--tflite={root}/float.tflite", "--keras_model={root}/tiny.keras"],
         "pass --target=onnx, or drop it"),
        ("no TFLM samples", ["--tflite={root}/float.tflite", "--tflm_samples=0"],
         "a whole number of at least 1, or 'all'. Received: tflm_samples='0'"),
        ("negative TFLM samples", ["--tflite={root}/float.tflite", "--tflm_samples=-5"], "Received: tflm_samples='-5'"),
        ("TFRecord spec names a missing key", ["--tflite={root}/float.tflite", "--eval_data={root}/eval.tfrecord",
                                               "--data_spec=label=digit"],
         "eval.tfrecord has no feature 'digit' (the label key of the data spec)"),
        ("data spec not KEY=VALUE", ["--tflite={root}/float.tflite", "--data_spec=a=b"],
         "data_spec names the TFRecord features as image=KEY"),
    ],
    "inspect": [
        ("missing .tflite", ["--tflite={root}/absent.tflite"], "not found"),
        ("not a flatbuffer", ["--tflite={root}/garbage.tflite"], "not a TFLite flatbuffer"),
        ("truncated flatbuffer", ["--tflite={root}/truncated.tflite"], ".tflite"),
    ],
    "debug": [
        ("no calibration data", ["--keras_model={root}/tiny.keras"], "--calibration_data"),
        ("Lambda layer", ["--keras_model={root}/lambda.h5", *CAL], "Lambda layer(s) 'double'"),
        ("TFRecord spec names a missing key", ["--keras_model={root}/tiny.keras", "--data_spec=image=pixels",
                                               "--calibration_data={root}/eval.tfrecord"],
         "eval.tfrecord has no feature 'pixels' (the image key of the data spec)"),
    ],
}


@pytest.fixture(scope="module")
def answers(files, tmp_path_factory):
    """Each verb's cases through the driver; every case gets its own fresh --output_dir (where the verb has one)."""
    work = tmp_path_factory.mktemp("answers")
    results = {}
    processes = {}
    for verb, cases in CASES.items():
        argument_lists = []
        for i, (_, arguments, _) in enumerate(cases):
            argv = [a.replace("{root}", str(files)) for a in arguments]
            if verb != "inspect" and not any(a.startswith("--output_dir=") for a in argv):
                argv.append(f"--output_dir={work}/{verb}{i}")
            argument_lists.append([*argv, "--noprogress"])
        path = work / f"{verb}.json"
        path.write_text(json.dumps(argument_lists))
        processes[verb] = subprocess.Popen([sys.executable, "tests/bad_input_driver.py", verb, str(path)], cwd=ROOT,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           env={k: v for k, v in os.environ.items() if k != "TF_CONFIG"})
    for verb, process in processes.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        results[verb] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results, work


@pytest.mark.parametrize("verb, index", [(verb, i) for verb, cases in CASES.items() for i in range(len(cases))],
                         ids=[f"{verb}: {case[0]}" for verb, cases in CASES.items() for case in cases])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(answers, verb, index):
    results, work = answers
    name, _, expected = CASES[verb][index]
    answer = results[verb][index]
    lines = [line for line in answer["stderr"].splitlines() if line.strip()]
    assert answer["code"] == 2, answer
    assert len(lines) == 1, answer["stderr"]
    assert lines[0].startswith(f"tfcompress {verb}: error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in answer["stderr"]
    assert not os.path.exists(work / f"{verb}{index}"), f"{name}: wrote {os.listdir(work / f'{verb}{index}')}"


def test_the_table_covers_every_verb_that_reads_user_files():
    assert set(CASES) == {"convert", "optimize", "export", "inspect", "debug", "sensitivity", "auto", "run"}
    assert sum(len(cases) for cases in CASES.values()) >= 35
