"""Benchmark of the convert pipeline against a plain hand-written converter script, and of how its cost grows.

Run with `tfcompress benchmark_convert [--saved_model_dir=artefacts/demo/float_savedmodel]`. Measures, in
one run: on the demo LeNet-5, float32 vs int8 accuracy on the 10,000 MNIST test images, bytes and gzip -9 bytes,
median single-thread latency in a fresh process; the wall time of `pipeline.run_convert` (int8: conversion,
verification, report) against a hand-written `TFLiteConverter` + batched LiteRT evaluation of the same model, on
LeNet-5 and on MobileNetV2 (alpha 1.0, 224x224, random weights, 100 calibration and 200 evaluation inputs), with
where each second goes; LiteRT verification throughput against LiteRT's own invoke loop (same model, batch and
threads); the TFLM check split across worker processes against the serial loop at equal samples; and a scaling
table (LeNet-5, the zoo's ResNet-8, MobileNetV2 alpha 0.35 and 1.0: seconds per stage of `tfcompress convert
--target=micro` in a child process and its peak resident memory). Prints the tables and writes them with every
number to --output_dir. A missed target prints MISS; it never fails the run.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import platform
import time

import numpy as np
from absl import flags
from ai_edge_litert.interpreter import Interpreter

from pipelines import _common, _convert_cost, _reference
from tfcompress.models import baseline
from tfcompress.analysis import latency
from tfcompress.runs import pipeline
from tfcompress.runs.demo import CALIBRATION
from tfcompress.core._keras import keras, tf
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.conversion.verify import quantize

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_convert", "Where the results go.")
_MODEL = flags.DEFINE_string("saved_model_dir", None, "Reuse this LeNet-5 SavedModel (e.g. "
                             "artefacts/demo/float_savedmodel) instead of training one.")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Training epochs when no --saved_model_dir.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for training and for drawing calibration samples.")
_MOBILENET_REPEATS = flags.DEFINE_integer("mobilenet_repeats", 1, "Timing rounds of the MobileNetV2 overhead "
                                         "comparison (each converts it twice: hand-written and tfcompress).",
                                         lower_bound=1)
_SCALING = flags.DEFINE_bool("scaling", True, "Also run the scaling table (four `convert --target=micro` runs).")
_MOBILENET_TFLM = flags.DEFINE_integer("mobilenet_tflm_samples", 10, "Samples of the scaling table's TFLM check on "
                                       "the MobileNetV2s (TFLM's reference kernels take seconds an image there).",
                                       lower_bound=1)
_TFLM_SAMPLES = 1000  # the TFLM check's default, timed serial against parallel on LeNet-5
# MobileNetV2 with random weights classifies nothing: its softmax is about 0.001 everywhere, under one uint8 output
# step (1/256), so the int8 outputs are all 0 (SQNR 0 dB). The benchmark measures cost, so its gates are open.
MOBILENET_GATES = {"min_top1_agreement": 0.0, "min_output_sqnr_db": -10.0}

# (measured key, target, True if the measured value must be at most the target)
TARGETS = {
    "int8 bytes / float32 bytes": ("bytes_ratio", 0.27, True),
    "accuracy drop (points)": ("accuracy_drop_points", 0.1, True),
    "LeNet-5: tfcompress convert / hand-written convert+evaluate": ("wall_time_ratio", 1.3, True),
    "MobileNetV2 1.0: tfcompress convert / hand-written convert+evaluate": ("mobilenet_wall_time_ratio", 1.3, True),
    "LeNet-5: LiteRT verification / LiteRT invoke loop throughput": ("throughput_ratio", 0.8, False),
    "MobileNetV2 1.0: LiteRT verification / LiteRT invoke loop throughput": ("mobilenet_throughput_ratio", 0.8,
                                                                            False),
    f"TFLM check, serial / worker processes, {_TFLM_SAMPLES:,} LeNet-5 images": ("tflm_speedup", 1.8, False),
}


def main(argv: list[str]) -> None:
    del argv
    summary = run_benchmark(_OUTPUT.value, saved_model_dir=_MODEL.value, epochs=_EPOCHS.value, seed=_SEED.value,
                            mobilenet_repeats=_MOBILENET_REPEATS.value, scaling=_SCALING.value,
                            mobilenet_tflm_samples=_MOBILENET_TFLM.value)
    print(summary["tables"])


def run_benchmark(output_dir: str, saved_model_dir: str | None = None, epochs: int = 5, seed: int = 0,
                  mobilenet_repeats: int = 1, scaling: bool = True, mobilenet_tflm_samples: int = 10) -> dict:
    start = time.perf_counter()
    os.makedirs(output_dir, exist_ok=True)
    if saved_model_dir is None:
        print(f"Training LeNet-5 on MNIST ({epochs} epochs, seed {seed}) ...", flush=True)
        model = baseline.train_lenet5(baseline.load_mnist(), epochs=epochs, seed=seed)
        saved_model_dir = os.path.join(output_dir, "float_savedmodel")
        model.save(saved_model_dir, save_format="tf", overwrite=True)
    print("Converting to float32 with tfcompress ...", flush=True)
    float_result = pipeline.run_convert(_config(output_dir, saved_model_dir, "float32", seed))
    timing = compare_wall_times(output_dir, saved_model_dir, seed)
    int8_result, hand_path = timing.pop("int8_result"), timing.pop("handwritten_path")
    print("Measuring throughput, the TFLM check and fresh-process latency ...", flush=True)
    x_test = baseline.load_mnist().x_test
    q_test = quantize(x_test, _input_detail(int8_result.model_path))
    throughput = _convert_cost.invoke_loop_throughput(int8_result.model_path, q_test)
    tflm = _convert_cost.tflm_check_speedup(int8_result.model_path, q_test[:_TFLM_SAMPLES])
    paths = {"float32 tflite": float_result.model_path, "int8 tflite (tfcompress)": int8_result.model_path,
             "int8 tflite (hand-written)": hand_path}
    accuracies = {"float32 tflite": float_result.verification.accuracy.tflite_accuracy,
                  "int8 tflite (tfcompress)": int8_result.verification.accuracy.tflite_accuracy,
                  "int8 tflite (hand-written)": timing["handwritten_accuracy"]}
    models = {name: _model_row(path, accuracies[name]) for name, path in paths.items()}
    mobilenet = compare_mobilenet(output_dir, seed, mobilenet_repeats)
    table = scaling_table(output_dir, saved_model_dir, seed, mobilenet_tflm_samples) if scaling else None
    f32, i8 = models["float32 tflite"], models["int8 tflite (tfcompress)"]
    measured = {
        "bytes_ratio": i8["bytes"] / f32["bytes"],
        "accuracy_drop_points": (f32["accuracy"] - i8["accuracy"]) * 100,
        "wall_time_ratio": timing["tfcompress_seconds"] / timing["handwritten_total_seconds"],
        "mobilenet_wall_time_ratio": mobilenet["tfcompress_seconds"] / mobilenet["handwritten_total_seconds"],
        "throughput_ratio": throughput["ratio"],
        "mobilenet_throughput_ratio": mobilenet["throughput"]["ratio"],
        "tflm_speedup": tflm["speedup"],
    }
    summary = {
        "schema_version": 2, "saved_model_dir": saved_model_dir, "seed": seed,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "tensorflow": tf.__version__,
                    "ai_edge_litert": importlib.metadata.version("ai-edge-litert"),
                    "load_average_at_start": os.getloadavg()},
        "models": models, "timing": timing, "throughput": throughput, "tflm_check": tflm,
        "mobilenet_v2": mobilenet, "scaling": table, "measured": measured,
        "float_keras_accuracy": int8_result.verification.accuracy.float_accuracy,
        "int8_report_accuracy_drop": int8_result.verification.accuracy.accuracy_drop,
        "targets": {name: {"measured": measured[key], "target": target, "at_most": at_most,
                           "passed": _passes(measured[key], target, at_most)}
                    for name, (key, target, at_most) in TARGETS.items()},
    }
    summary["total_seconds"] = time.perf_counter() - start
    tables = render(summary)
    write_json(os.path.join(output_dir, "benchmark_convert.json"), summary)
    write_atomic(os.path.join(output_dir, "benchmark_convert.md"), (tables + "\n").encode())
    return summary | {"tables": tables}


def _input_detail(model_path: str) -> dict:
    interpreter = Interpreter(model_path=model_path)
    return interpreter.get_input_details()[0]


def compare_mobilenet(output_dir: str, seed: int, repeats: int) -> dict:
    """MobileNetV2 1.0 (random weights): hand-written path and `run_convert` alternately; minima kept."""
    files = _convert_cost.mobilenet_v2_files(os.path.join(output_dir, "mobilenet_v2_1.0"), 1.0, seed)
    config = pipeline.ConvertPipelineConfig(
        output_dir=os.path.join(output_dir, "mobilenet_v2_1.0", "tfcompress"), saved_model_dir=files["saved_model_dir"],
        calibration_data=files["calibration_data"], calibration_key="x", eval_data=files["eval_data"],
        eval_labels_key=None, num_calibration_samples=_convert_cost.NUM_CALIBRATION, seed=seed, overwrite=True,
        **MOBILENET_GATES)
    hand_runs, tfc_runs = [], []
    for i in range(repeats):
        print(f"MobileNetV2 1.0, round {i + 1}/{repeats}: hand-written, then tfcompress int8 ...", flush=True)
        hand_runs.append(_convert_cost.handwritten(files))
        begin = time.perf_counter()
        result = pipeline.run_convert(config)
        tfc_runs.append((time.perf_counter() - begin, result))
    best_hand = min(hand_runs, key=lambda run: run["total_seconds"])
    tfc_seconds, best_tfc = min(tfc_runs, key=lambda run: run[0])
    q = quantize(np.load(files["eval_data"])["x_test"], _input_detail(best_tfc.model_path))
    return {
        "parameters": files["parameters"], "repeats": repeats, "gates": MOBILENET_GATES,
        "tfcompress_seconds": tfc_seconds, "tfcompress_seconds_all": [seconds for seconds, _ in tfc_runs],
        "tfcompress_report_timings": best_tfc.report["timings"],
        "handwritten_convert_seconds": best_hand["convert_seconds"],
        "handwritten_evaluate_seconds": best_hand["evaluate_seconds"],
        "handwritten_total_seconds": best_hand["total_seconds"],
        "handwritten_total_seconds_all": [run["total_seconds"] for run in hand_runs],
        "same_bytes_as_handwritten": best_hand["model"] == best_tfc.tflite.data,
        "throughput": _convert_cost.invoke_loop_throughput(best_tfc.model_path, q),
    }


def scaling_table(output_dir: str, saved_model_dir: str, seed: int, mobilenet_tflm_samples: int) -> list[dict]:
    """`tfcompress convert --target=micro` of four models, each in a child process (its peak memory its own)."""
    lenet = {"parameters": int(keras.models.load_model(saved_model_dir).count_params()),
             "saved_model_dir": saved_model_dir,
             "calibration_data": CALIBRATION, "calibration_key": "x", "eval_data": str(baseline.MNIST_PATH),
             "input_scale": baseline.MNIST_SCALE}
    runs = [("LeNet-5", lenet, None, ()),
            ("ResNet-8 (zoo)", _convert_cost.resnet8_files(os.path.join(output_dir, "resnet8"), seed), None, ())]
    gates = tuple(f"--{k}={v}" for k, v in MOBILENET_GATES.items()) + (
        f"--num_calibration_samples={_convert_cost.NUM_CALIBRATION}",)
    for alpha in (0.35, 1.0):
        files = _convert_cost.mobilenet_v2_files(os.path.join(output_dir, f"mobilenet_v2_{alpha}"), alpha, seed)
        runs.append((f"MobileNetV2 {alpha}", files, mobilenet_tflm_samples, gates))
    rows = []
    for name, files, tflm_samples, extra in runs:
        print(f"Scaling table: {name} through convert --target=micro in a child process ...", flush=True)
        out = os.path.join(output_dir, "scaling", "".join(c for c in name.lower() if c.isalnum() or c == "."))
        rows.append(_convert_cost.scaling_row(name, files, out, tflm_samples or _TFLM_SAMPLES, extra))
    return rows


def _config(output_dir: str, saved_model_dir: str, mode: str, seed: int) -> pipeline.ConvertPipelineConfig:
    return pipeline.ConvertPipelineConfig(
        output_dir=os.path.join(output_dir, mode), saved_model_dir=saved_model_dir,
        calibration_data=CALIBRATION, calibration_key="x", eval_data=str(baseline.MNIST_PATH),
        input_scale=baseline.MNIST_SCALE, mode=mode, seed=seed, overwrite=True,
    )


def compare_wall_times(output_dir: str, saved_model_dir: str, seed: int, repeats: int = 2) -> dict:
    """Runs the hand-written path and `run_convert` (int8) alternately `repeats` times; keeps the minima."""
    hand_runs, tfc_runs = [], []
    for i in range(repeats):
        print(f"Timing round {i + 1}/{repeats}: hand-written, then tfcompress int8 ...", flush=True)
        hand_runs.append(handwritten(saved_model_dir))
        start = time.perf_counter()
        result = pipeline.run_convert(_config(output_dir, saved_model_dir, "int8", seed))
        tfc_runs.append((time.perf_counter() - start, result))
    best_hand = min(hand_runs, key=lambda run: run["total_seconds"])
    tfc_seconds, best_tfc = min(tfc_runs, key=lambda run: run[0])
    hand_path = os.path.join(output_dir, "handwritten", "model.tflite")
    os.makedirs(os.path.dirname(hand_path), exist_ok=True)
    write_atomic(hand_path, best_hand["model"])
    return {
        "repeats": repeats,
        "tfcompress_seconds": tfc_seconds,
        "tfcompress_seconds_all": [seconds for seconds, _ in tfc_runs],
        "tfcompress_report_timings": best_tfc.report["timings"],
        "handwritten_convert_seconds": best_hand["convert_seconds"],
        "handwritten_evaluate_seconds": best_hand["evaluate_seconds"],
        "handwritten_total_seconds": best_hand["total_seconds"],
        "handwritten_total_seconds_all": [run["total_seconds"] for run in hand_runs],
        "handwritten_accuracy": best_hand["accuracy"],
        "int8_result": best_tfc,
        "handwritten_path": hand_path,
    }


def handwritten(saved_model_dir: str) -> dict:
    """The plain script: TFLiteConverter with a representative dataset, then a batched evaluation.

    Reading the calibration and test files is inside the timings, as it is in `run_convert`'s.
    """
    start = time.perf_counter()
    model = _reference.int8_convert(tf.lite.TFLiteConverter.from_saved_model(saved_model_dir))
    convert_seconds = time.perf_counter() - start
    start = time.perf_counter()
    accuracy = _reference.mnist_test_accuracy(model)
    evaluate_seconds = time.perf_counter() - start
    return {"model": model, "accuracy": accuracy, "convert_seconds": convert_seconds,
            "evaluate_seconds": evaluate_seconds, "total_seconds": convert_seconds + evaluate_seconds}


def _model_row(path: str, accuracy: float) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    timing = latency.measure_latency(path, num_runs=200, num_threads=1)
    return {"path": path, "accuracy": accuracy, "bytes": len(data),
            "gzip9_bytes": len(gzip.compress(data, compresslevel=9, mtime=0)),
            "latency_median_ms": timing.median_ms, "latency_p90_ms": timing.p90_ms}


def _passes(value: float, target: float, at_most: bool) -> bool:
    return value <= target if at_most else value >= target


def render(summary: dict) -> str:
    t, m = summary["timing"], summary["machine"]
    lines = [
        f"LeNet-5 on MNIST ({m['cpu_count']} CPUs, TF {m['tensorflow']}, LiteRT {m['ai_edge_litert']}); "
        "accuracy on all 10,000 test images, latency: median of 200 single-thread invokes, fresh process",
        "",
        "| model | test accuracy | bytes | gzip -9 bytes | latency median (ms) |",
        "|---|---|---|---|---|",
    ]
    for name, row in summary["models"].items():
        lines.append(f"| {name} | {row['accuracy']:.4f} | {row['bytes']:,} | {row['gzip9_bytes']:,} | "
                     f"{row['latency_median_ms']:.3f} |")
    lines += ["", "| target | measured | target | result |", "|---|---|---|---|"]
    for name, target in summary["targets"].items():
        sign = "≤" if target["at_most"] else "≥"
        lines.append(f"| {name} | {target['measured']:.3f} | {sign} {target['target']:g} | "
                     f"{'PASS' if target['passed'] else 'MISS'} |")
    mn = summary["mobilenet_v2"]
    lines += ["", "Where each second goes (int8; tfcompress: `run_convert` stages from report.json; hand-written: "
              "TFLiteConverter, then batched LiteRT):", "",
              "| model | tfcompress s | load | convert | verify | debugger | report | hand-written s | convert | "
              "evaluate | ratio |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in (("LeNet-5", t), ("MobileNetV2 1.0", mn)):
        r = row["tfcompress_report_timings"]
        lines.append(
            f"| {name} (min of {row['repeats']}) | {row['tfcompress_seconds']:.2f} | {r['load_seconds']:.2f} | "
            f"{r['convert_seconds']:.2f} | {r['verify_seconds']:.2f} | {r.get('debug_seconds', 0):.2f} | "
            f"{r['report_seconds']:.2f} | {row['handwritten_total_seconds']:.2f} | "
            f"{row['handwritten_convert_seconds']:.2f} | {row['handwritten_evaluate_seconds']:.2f} | "
            f"{row['tfcompress_seconds'] / row['handwritten_total_seconds']:.2f} |")
    lines += ["", "LiteRT throughput, verification (`run_litert`) against LiteRT's own invoke loop, same model, batch "
              "and threads (best of 3); the loop from the model's bytes (new interpreter, resize, allocate: what the "
              "verification does) and on an interpreter allocated and invoked before (warm):", "",
              "| model | samples | batch | threads | verification samples/s | invoke loop samples/s | ratio | "
              "warm loop samples/s | warm ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for name, tp in (("LeNet-5", summary["throughput"]), ("MobileNetV2 1.0", mn["throughput"])):
        lines.append(f"| {name} | {tp['samples']:,} | {tp['batch_size']} | {tp['num_threads']} | "
                     f"{tp['verification_samples_per_second']:,.1f} | {tp['invoke_loop_samples_per_second']:,.1f} | "
                     f"{tp['ratio']:.3f} | {tp['warm_invoke_loop_samples_per_second']:,.1f} | "
                     f"{tp['warm_ratio']:.3f} |")
    tc = summary["tflm_check"]
    lines += ["", f"TFLM check (TFLM + LiteRT comparison) on {tc['samples']:,} LeNet-5 test images: serial "
              f"{tc['serial_seconds']:.2f} s, {tc['workers']} worker processes {tc['parallel_seconds']:.2f} s "
              f"({tc['speedup']:.2f}x), identical outputs: {tc['identical_outputs']}."]
    if summary["scaling"]:
        lines += ["", "Scaling: `tfcompress convert --target=micro` in a child process (calibration runs inside "
                  "the converter: its seconds are part of convert's; load reads the model and the data; report "
                  "includes 200 single-thread latency invokes in a fresh process):", "",
                  "| model | parameters | int8 bytes | load s | calibration s | convert s (all) | verify s | "
                  "TFLM check s (samples) | report s | process s | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in summary["scaling"]:
            calibration = row.get("calibration_seconds")
            lines.append(f"| {row['model']} | {row['parameters']:,} | {row['bytes']:,} | {row['load_seconds']:.2f} | "
                         f"{'–' if calibration is None else f'{calibration:.2f}'} | "
                         f"{row['convert_seconds']:.2f} | {row['verify_seconds']:.2f} | "
                         f"{_tflm_cell(row)} | {row['report_seconds']:.2f} | "
                         f"{row['process_seconds']:.2f} | {_fmt(row['peak_rss_mib'])} |")
        lines += [f"{row['model']}: {row['tflm_failure']}; its other stages are from a run without --target=micro."
                  for row in summary["scaling"] if row.get("tflm_failure")]
    lines += ["", f"Load average at the start: {', '.join(f'{v:.2f}' for v in m['load_average_at_start'])}. "
              f"Total run {summary['total_seconds']:.1f} s."]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _tflm_cell(row: dict) -> str:
    if row.get("tflm_failure"):
        return "crashed (see below)"
    return f"{row['tflm_check_seconds']:.2f} ({row['tflm_samples']:,})"


if __name__ == "__main__":
    _common.run(main)
