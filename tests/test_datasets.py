"""Streamed sources (`conversion/datasets`): image trees, TFRecords and tf.data.Datasets from the shipped MNIST give
the samples the arrays give, reservoir sampling is seeded, convert and optimize take every source, and every bad
source is one line naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import MNIST, SCALE
from PIL import Image

from tfcompress.conversion import datasets
from tfcompress.core._keras import tf
from tfcompress.core.errors import CalibrationDataError
from tfcompress.core.tflite_model import read_tflite
from tfcompress.runs.optimize import run_optimize
from tfcompress.runs.optimize_config import OptimizeConfig
from tfcompress.runs.pipeline import ConvertPipelineConfig, run_convert
from tfcompress.runs.sensitivity_run import SensitivityConfig, run_sensitivity
from tfcompress.targets import micro
from tfcompress.targets.export import ExportConfig, micro_inputs, run_export

SHAPE = (None, 28, 28, 1)
NUM = 200


@pytest.fixture(scope="module")
def mnist():
    with np.load(MNIST) as d:
        return d["x_test"][:NUM], d["y_test"][:NUM].astype(np.int64)


@pytest.fixture(scope="module")
def sources(mnist, tmp_path_factory):
    """The same 200 MNIST test images as an .npz, a PNG tree, a PNG TFRecord and a raw-float TFRecord."""
    root = tmp_path_factory.mktemp("sources")
    x, y = mnist
    np.savez(root / "eval.npz", x_test=x, y_test=y)
    datasets.write_image_tree(x, y, root / "tree")
    datasets.write_tfrecords(x, y, root / "png.tfrecord")
    datasets.write_tfrecords(x, y, root / "raw.tfrecord", encoded=False,
                             spec=datasets.DataSpec(image="pixels", label="digit"))
    return root


def _sorted_rows(x: np.ndarray, y: np.ndarray):
    order = np.lexsort((x.reshape(len(x), -1).sum(axis=1), y))
    return x[order], y[order]


def test_every_source_yields_the_arrays_samples(sources, mnist):
    x, y = mnist
    expected = x[..., None].astype(np.float32) * np.float32(SCALE)
    for path, spec in ((sources / "png.tfrecord", None), (sources / "raw.tfrecord", "image=pixels,label=digit")):
        got_x, got_y = datasets.open_source(path, SHAPE, labelled=True, spec=spec, scale=SCALE).arrays()
        np.testing.assert_allclose(got_x, expected, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(got_y, y)
    # A tree lists its files in one fixed shuffled order (every class in any index range); the same samples.
    tree = datasets.open_source(sources / "tree", SHAPE, labelled=True, scale=SCALE)
    assert tree.class_names == tuple(str(c) for c in range(10)) and tree.count() == NUM
    got_x, got_y = tree.arrays()
    assert len(set(got_y[:NUM // 5].tolist())) >= 8  # the first fifth is not one class
    for a, b in zip(_sorted_rows(got_x, got_y), _sorted_rows(expected, y)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    dataset = tf.data.Dataset.from_tensor_slices((x[..., None], y)).batch(32)  # the API's own pipeline, batched
    got_x, got_y = datasets.open_source(dataset, SHAPE, labelled=True, scale=SCALE).arrays()
    np.testing.assert_allclose(got_x, expected, rtol=0, atol=1e-7)


def test_reservoir_sampling_is_one_seeded_pass(sources, mnist):
    source = datasets.open_source(sources / "png.tfrecord", SHAPE, labelled=True)
    a, labels, seen = datasets.reservoir_sample(source, 50, seed=3, batch_size=64)
    b, _, _ = datasets.reservoir_sample(source, 50, seed=3, batch_size=64)
    c, _, _ = datasets.reservoir_sample(source, 50, seed=4, batch_size=64)
    assert seen == NUM and a.shape == (50, 28, 28, 1)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    rows = {row.tobytes(): i for i, row in enumerate(mnist[0][..., None].astype(np.float32))}
    picked = [rows[row.tobytes()] for row in a]
    assert picked == sorted(picked) and len(set(picked)) == 50  # distinct samples, in source order
    np.testing.assert_array_equal(labels, mnist[1][picked])
    assert max(picked) >= NUM // 2  # drawn from the whole source, not its first 50
    everything, _, _ = datasets.reservoir_sample(source, 500, seed=0)  # more asked than held: every sample
    assert len(everything) == NUM
    # Calibration from the API's tf.data.Dataset (inputs alone) draws the same samples as from the same records.
    dataset = tf.data.Dataset.from_tensor_slices(mnist[0][..., None])
    from_api = datasets.load_calibration_data(dataset, SHAPE, num_samples=50, seed=3)
    assert from_api.num_available == NUM and from_api.samples.tobytes() == a.tobytes()


def test_training_dataset_is_seeded_and_covers_its_range(sources):
    source = datasets.open_source(sources / "tree", SHAPE, labelled=True, scale=SCALE)
    first = [y for _, y in source.training_dataset(32, seed=1, stop=150).as_numpy_iterator()]
    again = [y for _, y in source.training_dataset(32, seed=1, stop=150).as_numpy_iterator()]
    assert [len(y) for y in first] == [32] * 4 + [22]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
    np.testing.assert_array_equal(np.sort(np.concatenate(first)), np.sort(source.labels[:150]))


def test_convert_takes_trees_and_tfrecords(sources, keras_file, tmp_path):
    common = dict(keras_model=keras_file, input_scale=SCALE, latency_runs=0, num_calibration_samples=100)
    streamed = [run_convert(ConvertPipelineConfig(
        output_dir=str(tmp_path / f"tree{i}"), calibration_data=str(sources / "tree"),
        eval_data=str(sources / "png.tfrecord"), **common)) for i in range(2)]
    assert streamed[0].tflite.data == streamed[1].tflite.data  # same seed, same reservoir, same bytes
    in_memory = run_convert(ConvertPipelineConfig(
        output_dir=str(tmp_path / "npz"), calibration_data=str(sources / "tree"),
        eval_data=str(sources / "eval.npz"), **common))
    assert in_memory.tflite.data == streamed[0].tflite.data
    a, b = streamed[0].verification.accuracy, in_memory.verification.accuracy
    assert (a.num_samples, a.float_accuracy, a.tflite_accuracy) == (b.num_samples, b.float_accuracy, b.tflite_accuracy)
    assert a.float_accuracy > 0.9
    other_seed = run_convert(ConvertPipelineConfig(
        output_dir=str(tmp_path / "seed1"), calibration_data=str(sources / "raw.tfrecord"), seed=1,
        data_spec="image=pixels,label=digit", eval_data=str(sources / "tree"), **common))
    model = read_tflite(other_seed.tflite.data)
    for index in (*model.inputs, *model.outputs):
        assert model.tensors[index].dtype == "uint8"
    assert other_seed.verification.accuracy.num_samples == NUM


def test_optimize_streams_its_training_data(sources, keras_file, tmp_path):
    result = run_optimize(OptimizeConfig(
        output_dir=str(tmp_path / "out"), keras_model=keras_file, train_data=str(sources / "png.tfrecord"), prune=True,
        final_sparsity=0.5, prune_epochs=1, batch_size=32, calibration_data=str(sources / "tree"),
        num_calibration_samples=100, input_scale=SCALE, latency_runs=0, eval_data=str(sources / "tree")))
    prune = next(stage for stage in result.stages if stage["stage"] == "prune")
    assert prune["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert prune["validation_accuracy"] >= 0.7  # 40 validation images (the records' last index range), 160 trained on
    # The evaluation tree is scored batch by batch at every stage, and the final conversion streams it too.
    assert prune["eval_accuracy"] >= 0.7
    convert = next(stage for stage in result.stages if stage["stage"] == "convert")
    assert convert["eval_accuracy"] >= 0.7


def test_evaluation_data_streams_or_sits_in_memory(sources, mnist):
    x, y = mnist
    in_memory = datasets.open_eval_data(sources / "eval.npz", SHAPE, key="x_test", labels_key="y_test", scale=SCALE)
    streamed = datasets.open_eval_data(sources / "raw.tfrecord", SHAPE, key="x_test", labels_key="y_test",
                                       scale=SCALE, spec="image=pixels,label=digit", limit=150)
    assert in_memory.source is None and streamed.source is not None and streamed.labelled

    def predict(batch):
        return [batch.reshape(len(batch), -1).sum(axis=1), batch[:, 0, 0, 0]]

    (sums, corners), labels = streamed.collect(predict, batch_size=64)
    (all_sums, _), all_labels = in_memory.collect(predict)
    np.testing.assert_allclose(sums, all_sums[:150], rtol=1e-6)
    np.testing.assert_array_equal(labels, y[:150])
    assert corners.shape == (150,) and len(all_labels) == NUM
    assert [len(b) for b, _ in streamed.batches(64)] == [64, 64, 22]


def test_sensitivity_reads_only_the_validation_range(sources, keras_file, tmp_path):
    common = dict(keras_model=keras_file, input_scale=SCALE, train_key="x_test", train_labels_key="y_test",
                  ratios=(0.5,), kinds=("channel",))
    npz = run_sensitivity(SensitivityConfig(output_dir=str(tmp_path / "npz"), train_data=str(sources / "eval.npz"),
                                            **common))
    records = run_sensitivity(SensitivityConfig(output_dir=str(tmp_path / "records"), data_spec="image=pixels,"
                                                "label=digit", train_data=str(sources / "raw.tfrecord"), **common))
    # The records hold the .npz's samples in its order: the same validation range, the same curves.
    assert records.result.to_json() == npz.result.to_json()
    with open(records.json_path) as f:
        assert json.load(f)["validation_samples"] == NUM // 10


def test_tflm_check_streams_its_inputs(sources, mnist, keras_file, tmp_path):
    """convert --target micro and export take streamed evaluation data: a subset drawn in one pass, or every sample
    run in TFLM batch by batch, with the numbers the .npz gives."""
    common = dict(keras_model=keras_file, input_scale=SCALE, latency_runs=0, num_calibration_samples=100,
                  calibration_data=str(sources / "tree"), target="micro")
    npz = run_convert(ConvertPipelineConfig(output_dir=str(tmp_path / "npz"), eval_data=str(sources / "eval.npz"),
                                            tflm_samples=None, **common))
    every = run_convert(ConvertPipelineConfig(output_dir=str(tmp_path / "every"), tflm_samples=None,
                                              eval_data=str(sources / "png.tfrecord"), **common))
    assert every.tflite.data == npz.tflite.data
    a, b = every.report["micro"], npz.report["micro"]
    assert a["tflm_accuracy"] == b["tflm_accuracy"] and a["tflm_accuracy"]["num_samples"] == NUM
    for key in ("max_step_difference", "top1_agreement"):
        assert a["tflm_check"][key] == b["tflm_check"][key]
    subset = run_convert(ConvertPipelineConfig(output_dir=str(tmp_path / "subset"), tflm_samples=50,
                                               eval_data=str(sources / "tree"), **common))
    assert subset.report["micro"]["tflm_subset"]["num_samples"] == 50
    assert subset.report["micro"]["tflm_subset"]["of"] == NUM
    assert subset.report["micro"]["tflm_accuracy"]["num_samples"] == 50
    exported = run_export(ExportConfig(tflite=npz.model_path, output_dir=str(tmp_path / "export"), tflm_samples=None,
                                       eval_data=str(sources / "raw.tfrecord"), data_spec="image=pixels,label=digit",
                                       input_scale=SCALE))
    assert exported.manifest["tflm_accuracy"]["tflm_accuracy"] == b["tflm_accuracy"]["tflm_accuracy"]
    assert exported.manifest["tflm_check"]["top1_agreement"] == b["tflm_check"]["top1_agreement"]
    # Chunks of inputs give the one array's outputs and comparison, in the check and in the exact comparison.
    model = read_tflite(npz.model_path)
    inputs, _ = micro_inputs(model, mnist[0][..., None].astype(np.float32) * np.float32(SCALE))
    arena = b["arena"]["arena_bytes"]
    whole = micro.check_against_litert(model, inputs, arena, "200 images", workers=1)
    chunked = micro.check_against_litert(model, iter([inputs[:64], inputs[64:]]), arena, "200 images", workers=1)
    assert chunked[1] == whole[1] and all(np.array_equal(a, b) for a, b in zip(chunked[0], whole[0]))
    assert micro.compare_tflm_exact(model, iter([inputs[:64], inputs[64:]]), arena, whole[0], "200 images").passed


@pytest.fixture(scope="module")
def bad(tmp_path_factory, mnist):
    root = tmp_path_factory.mktemp("bad_sources")
    x, y = mnist
    (root / "flat").mkdir()
    Image.fromarray(x[0]).save(root / "flat" / "a.png")
    datasets.write_image_tree(x[:20], y[:20] % 2, root / "empty_class")
    (root / "empty_class" / "2").mkdir()
    datasets.write_image_tree(x[:20], y[:20] % 2, root / "notes")
    (root / "notes" / "1" / "notes.txt").write_text("not an image")
    datasets.write_image_tree(x[:20], y[:20] % 2, root / "broken")
    (root / "broken" / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    datasets.write_image_tree(np.repeat(x[:20, ..., None], 3, axis=-1), y[:20] % 2, root / "rgb")
    datasets.write_image_tree(x[:24], np.arange(24) % 12, root / "twelve")
    datasets.write_tfrecords(x[:20], y[:20], root / "d.tfrecord")
    # Raw values: 20 records of 28x28, then one of 20x20.
    datasets.write_tfrecords(x[:20], y[:20], root / "raw_ok.tfrecord", encoded=False)
    datasets.write_tfrecords(x[:1, :20, :20], y[:1], root / "raw_short.tfrecord", encoded=False)
    (root / "raw_mixed.tfrecord").write_bytes((root / "raw_ok.tfrecord").read_bytes()
                                              + (root / "raw_short.tfrecord").read_bytes())
    (root / "junk.tfrecord").write_bytes(b"not a record file at all")
    with tf.io.TFRecordWriter(str(root / "empty.tfrecord")):
        pass
    return root


@pytest.mark.parametrize("name, spec, match", [
    ("flat", None, r"folder .*flat has no class sub-folders\. Expected one sub-folder of images per class"),
    ("empty_class", None, r"class folder .*empty_class/2 is empty"),
    ("notes", None, r"file .*notes/1/notes\.txt is not a PNG/JPEG image"),
    ("broken", None, r"image .*broken/0/broken\.png cannot be read"),
    ("rgb", None, r"image .*rgb/\d/\d+\.png has 3 channel\(s\) but the model input \(None, 28, 28, 1\) has 1"),
    ("twelve", None, r"hold class indices from 0 to 11, outside the 10 classes"),
    ("d.tfrecord", "image=pixels", r"d\.tfrecord has no feature 'pixels' \(the image key of the data spec\); its "
                                   r"features are image, label: pass --data_spec=image=KEY,label=KEY"),
    ("d.tfrecord", "label=y", r"has no feature 'y' \(the label key"),
    ("raw_mixed.tfrecord", None, r"raw_mixed\.tfrecord record 20 holds 400 values in 'image'; the model input "
                                 r"\(28, 28, 1\) needs 784\."),
    ("junk.tfrecord", None, r"junk\.tfrecord cannot be read as TFRecord"),
    ("empty.tfrecord", None, r"empty\.tfrecord holds no records"),
])
def test_bad_sources_are_one_line_errors(bad, name, spec, match):
    with pytest.raises(CalibrationDataError, match=match) as caught:
        datasets.open_source(bad / name, SHAPE, labelled=True, spec=spec, num_classes=10).arrays()
    assert "\n" not in str(caught.value)


def test_a_flat_image_folder_still_calibrates(bad):
    # Read as before, by calibration (one image is below its minimum); as labelled data it is a tree without classes.
    with pytest.raises(CalibrationDataError, match="Calibration needs at least 10 samples, found 1"):
        datasets.load_calibration_data(bad / "flat", SHAPE, num_samples=5)
    assert not datasets.is_streamed(bad / "flat") and datasets.is_streamed(bad / "flat", labelled=True)


def test_data_spec_is_checked():
    assert datasets.parse_data_spec("image=image_raw, label=y") == datasets.DataSpec("image_raw", "y")
    assert datasets.parse_data_spec(None) == datasets.DataSpec("image", "label")
    with pytest.raises(ValueError, match=r"data_spec names the TFRecord features as image=KEY,label=KEY.*"
                                         r"Received: data_spec='pixels'"):
        datasets.parse_data_spec("pixels")
    with pytest.raises(ValueError, match="Received: data_spec='image=a,image=b'"):
        ConvertPipelineConfig(output_dir="unused", keras_model="m.keras", data_spec="image=a,image=b")


def test_streamed_training_needs_one_output_of_class_scores(bad, tmp_path):
    from tfcompress.core._keras import keras

    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(1)]).save(
        tmp_path / "one_unit.keras")  # one logit, not a sigmoid: which loss it wants is not known
    with pytest.raises(CalibrationDataError, match=r"d\.tfrecord is streamed with class labels .* that are not one "
                                                   r"output of class scores \(or one sigmoid unit for two classes\): "
                                                   r"pass an \.npz"):
        run_optimize(OptimizeConfig(output_dir=str(tmp_path / "out"), keras_model=str(tmp_path / "one_unit.keras"),
                                    train_data=str(bad / "d.tfrecord"), prune=True))
    inputs = keras.Input((28, 28, 1))
    flat = keras.layers.Flatten()(inputs)
    keras.Model(inputs, [keras.layers.Dense(10, name="a")(flat), keras.layers.Dense(2, name="b")(flat)]).save(
        tmp_path / "two_outputs.keras")
    with pytest.raises(CalibrationDataError, match=r"the model has 2 output\(s\) \(a, b\) that are not one output"):
        run_optimize(OptimizeConfig(output_dir=str(tmp_path / "out2"), keras_model=str(tmp_path / "two_outputs.keras"),
                                    train_data=str(bad / "d.tfrecord"), prune=True))


def test_streamed_training_takes_a_sigmoid_binary_classifier(tmp_path):
    """One sigmoid unit and a two-class tree (MNIST zeros and ones): binary cross-entropy on the folder indices."""
    from tfcompress.core._keras import keras

    with np.load(MNIST) as d:
        keep = np.isin(d["y_train"], (0, 1))
        x, y = d["x_train"][keep][:400], d["y_train"][keep][:400]
    datasets.write_image_tree(x, y, tmp_path / "tree", class_names=["zero", "one"])
    keras.utils.set_random_seed(0)
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
                      keras.layers.Dense(1, activation="sigmoid")]).save(tmp_path / "binary.keras")
    result = run_optimize(OptimizeConfig(
        output_dir=str(tmp_path / "out"), keras_model=str(tmp_path / "binary.keras"), train_data=str(tmp_path / "tree"),
        prune=True, final_sparsity=0.5, prune_epochs=2, batch_size=32, input_scale=SCALE, latency_runs=0,
        calibration_data=str(tmp_path / "tree"), num_calibration_samples=100))
    prune = next(stage for stage in result.stages if stage["stage"] == "prune")
    assert prune["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert prune["validation_accuracy"] >= 0.9  # 40 validation images of two classes
    model = read_tflite(result.model_path)
    assert model.tensors[model.outputs[0]].shape[-1] == 1


def test_configs_take_a_tf_data_dataset(sources, mnist, keras_file, tmp_path):
    """The API passes tf.data.Datasets straight to the run configs: the run streams them like any source, and
    recipe.yaml and report.json record `<tf.data.Dataset>` where a path would be (a dataset cannot be replayed)."""
    x, y = mnist
    common = dict(keras_model=keras_file, input_scale=SCALE, latency_runs=0, num_calibration_samples=100)
    from_files = run_convert(ConvertPipelineConfig(output_dir=str(tmp_path / "files"), **common,
                                                   calibration_data=str(sources / "png.tfrecord"),
                                                   eval_data=str(sources / "png.tfrecord")))
    from_api = run_convert(ConvertPipelineConfig(
        output_dir=str(tmp_path / "api"), **common,
        calibration_data=tf.data.Dataset.from_tensor_slices(x[..., None]),  # inputs alone
        eval_data=tf.data.Dataset.from_tensor_slices((x[..., None], y)).batch(50)))  # (input, label), batched
    assert from_api.tflite.data == from_files.tflite.data  # the same records, the same reservoir, the same bytes
    assert from_api.verification.accuracy == from_files.verification.accuracy
    assert from_api.report["config"]["eval_data"] == "<tf.data.Dataset>"
    recipe = (tmp_path / "api" / "recipe.yaml").read_text()
    assert "data.calibration_data, data.eval_data was a tf.data.Dataset given in the API" in recipe
    assert "calibration_data: <tf.data.Dataset>" in recipe
    result = run_optimize(OptimizeConfig(
        output_dir=str(tmp_path / "optimize"), keras_model=keras_file, prune=True, final_sparsity=0.5,
        prune_epochs=1, batch_size=32, num_calibration_samples=100, input_scale=SCALE, latency_runs=0,
        train_data=tf.data.Dataset.from_tensor_slices((x[..., None], y)),
        calibration_data=tf.data.Dataset.from_tensor_slices(x[..., None])))
    prune = next(stage for stage in result.stages if stage["stage"] == "prune")
    assert prune["sparsity"] == pytest.approx(0.5, abs=0.02) and prune["validation_accuracy"] >= 0.7
    with open(result.report_path) as f:
        assert json.load(f)["config"]["train_data"] == "<tf.data.Dataset>"
