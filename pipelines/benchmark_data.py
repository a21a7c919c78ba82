"""Benchmark streamed data: peak memory and wall time of convert and optimize as the data grows, per source.

Run with `tfcompress benchmark_data [--saved_model_dir=artefacts/demo/float_savedmodel]` (after `make demo`). From
the shipped MNIST training images, sets of 1x, 4x and 16x `--base_size` images are written as an `.npz`, a
class-per-folder PNG tree and a TFRecord file of PNG-encoded examples under `--output_dir/data/` (kept between
runs). For each size and source, in a child process (peak resident memory from GNU time): `tfcompress convert`
calibrating on the set (500 samples: the `.npz` by its seeded selection, the streamed sources by one-pass reservoir
sampling) and evaluating on all of it, and a one-epoch `tfcompress optimize --prune` training on it (validation the
last 10%). In process, on the 1x set: evaluation streamed in batches against the same evaluation in memory (best of
three; also the PNGs decoded whole first, and a TFRecord file of raw values, which separate the cost of streaming
from the cost of decoding PNG), and the input pipeline alone (images decoded per second) against `fit` (training
images per second).
Writes benchmark_data.{json,md} to --output_dir. A failed run is reported; it does not fail the benchmark.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import numpy as np
from absl import flags

from pipelines import _benchmark, _common
from pipelines._convert_cost import _child
from tfcompress.conversion import calibration, datasets
from tfcompress.conversion.verify import verify
from tfcompress.core._keras import keras
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.core.model_io import load_model
from tfcompress.core.tflite_model import read_tflite
from tfcompress.models import baseline

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_data", "Where the data and the results go.")
_MODEL = flags.DEFINE_string("saved_model_dir", "artefacts/demo/float_savedmodel", "The trained LeNet-5 SavedModel "
                             "(the demo's).")
_BASE = flags.DEFINE_integer("base_size", 2500, "Images in the 1x set.", lower_bound=100)
_SCALES = flags.DEFINE_list("scales", ["1", "4", "16"], "Sizes, in multiples of --base_size.")
_SOURCES = flags.DEFINE_list("sources", ["npz", "png", "tfrecord"], "Sources to measure.")
_OPTIMIZE = flags.DEFINE_bool("optimize", True, "Also measure the one-epoch optimize --prune runs.")
SOURCES = ("npz", "png", "tfrecord")
SCALE = str(baseline.MNIST_SCALE)


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    output_dir = os.path.abspath(_OUTPUT.value)
    model_dir = os.path.abspath(_MODEL.value)
    scales = [int(s) for s in _SCALES.value]
    rows = {}
    for scale in scales:
        paths = _write_data(os.path.join(output_dir, "data"), scale * _BASE.value)
        for source in _SOURCES.value:
            for command in ("convert", "optimize") if _OPTIMIZE.value else ("convert",):
                name = f"{command} {source} {scale}x"
                run_dir = os.path.join(output_dir, "runs", _benchmark.slug(name))
                shutil.rmtree(run_dir, ignore_errors=True)  # optimize would resume an earlier run's stages
                code, err, wall, peak = _child(_arguments(command, source, paths[source], model_dir, run_dir))
                rows[name] = {"command": command, "source": source, "scale": scale, "images": scale * _BASE.value,
                              "seconds": round(wall, 2), "peak_rss_mib": None if peak is None else round(peak, 1)}
                if code != 0:
                    rows[name]["error"] = f"exit {code}: {' '.join(err.split())[-400:]}"
                print(f"{name}: {rows[name]}", flush=True)
    base = _write_data(os.path.join(output_dir, "data"), scales[0] * _BASE.value)
    evaluation = _evaluation(base, model_dir, os.path.join(output_dir, "runs", _benchmark.slug(f"convert npz "
                                                                                                f"{scales[0]}x")))
    throughput = {source: _throughput(base[source], model_dir) for source in ("png", "tfrecord")}
    targets = _targets(rows, evaluation, scales)
    total = time.perf_counter() - start
    document = {"rows": rows, "evaluation_1x": evaluation, "throughput_1x": throughput, "targets": targets,
                "base_size": _BASE.value, "cores": os.cpu_count(), "total_seconds": round(total, 1)}
    write_json(os.path.join(output_dir, "benchmark_data.json"), document)
    write_atomic(os.path.join(output_dir, "benchmark_data.md"),
                 _markdown(rows, evaluation, throughput, targets, total).encode())
    print(f"wrote {output_dir}/benchmark_data.{{json,md}}")


def _write_data(directory: str, size: int) -> dict[str, str]:
    """The first `size` MNIST training images (repeated past 60,000) as .npz, PNG tree and TFRecord; made once."""
    folder = os.path.join(directory, str(size))
    paths = {"npz": os.path.join(folder, "data.npz"), "png": os.path.join(folder, "tree"),
             "tfrecord": os.path.join(folder, "data.tfrecord")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(folder, exist_ok=True)
    with np.load(baseline.MNIST_PATH) as d:
        x, y = d["x_train"], d["y_train"]
    index = np.arange(size) % len(x)
    x, y = x[index], y[index]
    np.savez(paths["npz"], x_train=x, y_train=y)
    datasets.write_image_tree(x, y, paths["png"])
    datasets.write_tfrecords(x, y, paths["tfrecord"])
    return paths


def _arguments(command: str, source: str, path: str, model_dir: str, run_dir: str) -> list[str]:
    common = [sys.executable, "-m", "pipelines", command, f"--saved_model_dir={model_dir}", f"--input_scale={SCALE}",
              f"--output_dir={run_dir}", "--latency_runs=0", "--noprogress", f"--calibration_data={path}"]
    if command == "convert":
        keys = (["--calibration_key=x_train", "--eval_key=x_train", "--eval_labels_key=y_train"] if source == "npz"
                else [])
        return [*common, f"--eval_data={path}", *keys, "--overwrite"]
    keys = ["--calibration_key=x_train"] if source == "npz" else []
    return [*common, f"--train_data={path}", *keys, "--prune", "--prune_epochs=1"]


def _evaluation(paths: dict[str, str], model_dir: str, convert_dir: str) -> dict:
    """Seconds to evaluate the 1x set's .tflite: loaded into memory then verified, against streamed (best of 3)."""
    model = load_model(model_dir)
    tflite = read_tflite(os.path.join(convert_dir, "model.tflite"))
    shape = model.input_shape
    paths = dict(paths, **{"tfrecord raw": _raw_records(paths["npz"])})
    times = {}
    for source in ("npz", "png whole", "png", "tfrecord", "tfrecord raw"):
        best = None
        for _ in range(3):
            start = time.perf_counter()
            if source == "npz":
                x, y = calibration.load_labelled_data(paths["npz"], shape, key="x_train", labels_key="y_train",
                                                      scale=baseline.MNIST_SCALE, what="Training data")
                result = verify(tflite, "int8", "uint8", float_model=model, eval_samples=x, eval_labels=y)
            elif source == "png whole":  # the same PNGs decoded into memory first (PIL, as flat folders were read)
                x, y = _decoded_whole(paths["png"], shape)
                result = verify(tflite, "int8", "uint8", float_model=model, eval_samples=x, eval_labels=y)
            else:
                stream = datasets.open_source(paths[source], shape, labelled=True, scale=baseline.MNIST_SCALE)
                result = verify(tflite, "int8", "uint8", float_model=model, eval_batches=stream.batches())
            seconds = time.perf_counter() - start
            best = seconds if best is None else min(best, seconds)
        times[source] = {"seconds": round(best, 3), "accuracy": result.accuracy.tflite_accuracy,
                         "num_samples": result.accuracy.num_samples}
    return times


def _raw_records(npz: str) -> str:
    """The set as a TFRecord file of raw pixel values (floats, nothing to decode), made once beside the .npz."""
    path = os.path.join(os.path.dirname(npz), "data_raw.tfrecord")
    if not os.path.exists(path):
        with np.load(npz) as d:
            datasets.write_tfrecords(d["x_train"], d["y_train"], path, encoded=False)
    return path


def _decoded_whole(tree: str, shape) -> tuple[np.ndarray, np.ndarray]:
    folders = sorted(p for p in os.listdir(tree) if os.path.isdir(os.path.join(tree, p)))
    parts = [calibration.load_array(os.path.join(tree, folder)) for folder in folders]
    x = calibration.fit_to_input(calibration.preprocess(np.concatenate(parts), baseline.MNIST_SCALE), shape)
    return x, np.concatenate([np.full(len(part), label) for label, part in enumerate(parts)])


def _throughput(path: str, model_dir: str, batch_size: int = 128) -> dict:
    """Images per second of the input pipeline alone, and of one `fit` epoch reading it (the float model)."""
    source = datasets.open_source(path, load_model(model_dir).input_shape, labelled=True, scale=baseline.MNIST_SCALE)
    for _ in source.training_dataset(batch_size, seed=0).as_numpy_iterator():  # warm: file cache, tracing
        pass
    start = time.perf_counter()
    count = sum(len(y) for _, y in source.training_dataset(batch_size, seed=0).as_numpy_iterator())
    decoded = count / (time.perf_counter() - start)
    model = keras.models.load_model(model_dir)
    model.compile(keras.optimizers.Adam(1e-4), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(source.training_dataset(batch_size, seed=0).take(2), epochs=1, verbose=0)  # tracing
    start = time.perf_counter()
    model.fit(source.training_dataset(batch_size, seed=0), epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    steps = -(-count // batch_size)
    return {"images": count, "decoded_images_per_second": round(decoded, 1),
            "training_steps_per_second": round(steps / seconds, 2),
            "training_images_per_second": round(count / seconds, 1),
            "decode_over_training": round(decoded / (count / seconds), 2)}


def _targets(rows: dict, evaluation: dict, scales: list[int]) -> dict:
    targets = {}
    small, large = min(scales), max(scales)
    for row in rows.values():
        if row["scale"] != large or row["source"] == "npz" or "error" in row:
            continue
        base = rows.get(f"{row['command']} {row['source']} {small}x")
        if base and base.get("peak_rss_mib") and row.get("peak_rss_mib"):
            targets[f"{row['command']} {row['source']}: peak memory {large}x / {small}x"] = _benchmark.target(
                row["peak_rss_mib"] / base["peak_rss_mib"], 1.2, at_most=True,
                why="memory grows with the data: something holds more than a batch")
    # The target: streamed PNG (tree or TFRecord) against the decoded .npz. The two after it separate what
    # streaming costs from what decoding PNG costs: the same PNGs read whole first, and records of raw values.
    for source in ("png", "tfrecord"):
        if source in evaluation and "npz" in evaluation:
            targets[f"streamed evaluation ({source}) / in memory (.npz), {small}x"] = _benchmark.target(
                evaluation[source]["seconds"] / evaluation["npz"]["seconds"], 1.2, at_most=True,
                why="decoding the PNGs costs about what LeNet-5 costs, and the 2 cores are already busy")
    if "png" in evaluation and "png whole" in evaluation:
        targets[f"streamed evaluation (png) / the same PNGs decoded whole first, {small}x"] = _benchmark.target(
            evaluation["png"]["seconds"] / evaluation["png whole"]["seconds"], 1.2, at_most=True,
            why="streaming costs more than reading the tree whole")
    if "tfrecord raw" in evaluation and "npz" in evaluation:
        targets[f"streamed evaluation (TFRecord of raw values) / in memory (.npz), {small}x"] = _benchmark.target(
            evaluation["tfrecord raw"]["seconds"] / evaluation["npz"]["seconds"], 1.2, at_most=True,
            why="the streaming itself (parsing, batching, the loop) costs more than a fifth")
    return targets | _benchmark.failed_paths(rows)


def _markdown(rows: dict, evaluation: dict, throughput: dict, targets: dict, total: float) -> str:
    lines = ["# Streamed data: memory and time as the data grows", "",
             "| run | source | images | wall s | peak RSS MiB |", "|---|---|---|---|---|"]
    for row in rows.values():
        peak = "—" if row["peak_rss_mib"] is None else f"{row['peak_rss_mib']:.0f}"
        result = f"failed: {row['error']}" if "error" in row else f"{row['seconds']:.1f}"
        lines.append(f"| {row['command']} | {row['source']} | {row['images']:,} | {result} | {peak} |")
    lines += ["", "Evaluation of the 1x set's int8 model (float model and LiteRT, best of 3):", "",
              "| source | seconds | samples | tflite accuracy |", "|---|---|---|---|"]
    for source, e in evaluation.items():
        how = {"npz": "npz (in memory)", "png whole": "PNG tree decoded whole first (PIL), then in memory",
               "tfrecord raw": "TFRecord of raw float values (streamed, nothing to decode)"}
        lines.append(f"| {how.get(source, source + ' (streamed)')} | {e['seconds']:.2f} | "
                     f"{e['num_samples']:,} | {e['accuracy']:.4f} |")
    lines += ["", "Input pipeline (1x, batch 128, 2 cores): images decoded per second alone, against one `fit` epoch "
              "of the float model reading it:", "",
              "| source | decoded img/s | fit steps/s | fit img/s | decode / fit |", "|---|---|---|---|---|"]
    for source, t in throughput.items():
        lines.append(f"| {source} | {t['decoded_images_per_second']:,.0f} | {t['training_steps_per_second']:.1f} | "
                     f"{t['training_images_per_second']:,.0f} | {t['decode_over_training']:.1f} |")
    lines += ["", "convert: calibration (500 samples; streamed sources by one-pass reservoir sampling) and evaluation "
              "on every image of the set; optimize: `--prune --prune_epochs=1`, validation the last 10%, then its "
              "convert stage. Peak RSS of the child process (GNU time)."]
    return _benchmark.finish_tables(lines, targets, total)


if __name__ == "__main__":
    _common.run(main)
