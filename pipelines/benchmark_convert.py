"""Benchmark of the convert pipeline on the demo LeNet-5 against a plain hand-written converter script.

Run with `tfcompress benchmark_convert [--saved_model_dir=artefacts/demo/float_savedmodel]`. Measures, in
one run: float32 vs int8 accuracy on the 10,000 MNIST test images, bytes and gzip -9 bytes, median
single-thread latency in a fresh process, conversion wall time of `pipeline.run_convert` vs a hand-written
`TFLiteConverter` + batched interpreter evaluation (each run twice, alternating, minimum kept), and
evaluation throughput batched vs a one-sample loop. Prints two Markdown tables (models, targets) and
writes them with every number to --output_dir. A missed target prints MISS; it never fails the run.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import platform
import time

from absl import flags
from ai_edge_litert.interpreter import Interpreter

from pipelines import _common, _reference
from tfcompress.models import baseline
from tfcompress.analysis import latency
from tfcompress.runs import pipeline
from tfcompress.runs.demo import CALIBRATION
from tfcompress.core._keras import tf
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.conversion.verify import quantize, run_tflite

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_convert", "Where the results go.")
_MODEL = flags.DEFINE_string("saved_model_dir", None, "Reuse this LeNet-5 SavedModel (e.g. "
                             "artefacts/demo/float_savedmodel) instead of training one.")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Training epochs when no --saved_model_dir.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for training and for drawing calibration samples.")
_NUM_LOOP = flags.DEFINE_integer("num_loop_samples", 1000, "Test images the one-sample loop times.",
                                 lower_bound=1)

# (measured key, target, True if the measured value must be at most the target)
TARGETS = {
    "int8 bytes / float32 bytes": ("bytes_ratio", 0.27, True),
    "accuracy drop (points)": ("accuracy_drop_points", 0.1, True),
    "tfcompress convert+verify / hand-written convert+evaluate": ("wall_time_ratio", 1.3, True),
    "batched / one-sample-loop throughput": ("throughput_ratio", 5.0, False),
}


def main(argv: list[str]) -> None:
    del argv
    summary = run_benchmark(_OUTPUT.value, saved_model_dir=_MODEL.value, epochs=_EPOCHS.value,
                            seed=_SEED.value, num_loop_samples=_NUM_LOOP.value)
    print(summary["tables"])


def run_benchmark(output_dir: str, saved_model_dir: str | None = None, epochs: int = 5, seed: int = 0,
                  num_loop_samples: int = 1000) -> dict:
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
    print("Measuring throughput and fresh-process latency ...", flush=True)
    throughput = measure_throughput(int8_result.model_path, num_loop_samples)
    paths = {"float32 tflite": float_result.model_path, "int8 tflite (tfcompress)": int8_result.model_path,
             "int8 tflite (hand-written)": hand_path}
    accuracies = {"float32 tflite": float_result.verification.accuracy.tflite_accuracy,
                  "int8 tflite (tfcompress)": int8_result.verification.accuracy.tflite_accuracy,
                  "int8 tflite (hand-written)": timing["handwritten_accuracy"]}
    models = {name: _model_row(path, accuracies[name]) for name, path in paths.items()}
    f32, i8 = models["float32 tflite"], models["int8 tflite (tfcompress)"]
    measured = {
        "bytes_ratio": i8["bytes"] / f32["bytes"],
        "accuracy_drop_points": (f32["accuracy"] - i8["accuracy"]) * 100,
        "wall_time_ratio": timing["tfcompress_seconds"] / timing["handwritten_total_seconds"],
        "throughput_ratio": throughput["batched_samples_per_second"] / throughput["loop_samples_per_second"],
    }
    summary = {
        "schema_version": 1, "saved_model_dir": saved_model_dir, "seed": seed,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "tensorflow": tf.__version__,
                    "ai_edge_litert": importlib.metadata.version("ai-edge-litert")},
        "models": models, "timing": timing, "throughput": throughput, "measured": measured,
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


def measure_throughput(model_path: str, num_loop_samples: int) -> dict:
    """Samples/second of `run_tflite` (batched, all test images) vs a one-sample invoke loop."""
    x = baseline.load_mnist().x_test
    threads = os.cpu_count() or 1
    start = time.perf_counter()
    run_tflite(model_path, x, num_threads=threads)
    batched = len(x) / (time.perf_counter() - start)
    interpreter = Interpreter(model_path=model_path, num_threads=threads)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    samples = quantize(x[:num_loop_samples], inp)
    start = time.perf_counter()
    for sample in samples:
        interpreter.set_tensor(inp["index"], sample[None])
        interpreter.invoke()
        interpreter.get_tensor(out["index"])
    loop = len(samples) / (time.perf_counter() - start)
    return {"num_threads": threads, "batched_samples": len(x), "batched_samples_per_second": batched,
            "loop_samples": len(samples), "loop_samples_per_second": loop}


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
    r, tp = t["tfcompress_report_timings"], summary["throughput"]
    lines += [
        "",
        f"Wall time (min of {t['repeats']}): tfcompress int8 run_convert {t['tfcompress_seconds']:.2f} s "
        f"(load {r['load_seconds']:.2f} + convert {r['convert_seconds']:.2f} "
        f"+ verify {r['verify_seconds']:.2f}); hand-written {t['handwritten_total_seconds']:.2f} s "
        f"(convert {t['handwritten_convert_seconds']:.2f} "
        f"+ evaluate {t['handwritten_evaluate_seconds']:.2f}).",
        f"Throughput ({tp['num_threads']} threads): batched {tp['batched_samples_per_second']:,.0f} "
        f"samples/s, one-sample loop {tp['loop_samples_per_second']:,.0f} samples/s. "
        f"Total run {summary['total_seconds']:.1f} s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    _common.run(main)
