"""The demo run: train the baseline LeNet-5, convert it to float32 and int8, verify, time, report.

Takes an output directory, a training budget and a seed; returns a summary dict (also written as
`summary.json` and `summary.md`). `pipelines/demo.py` (`make demo`, `tfcompress demo`) is its command line.
Steps: train the baseline (seeded), save it as a SavedModel, run the convert pipeline twice on it (float32
for reference, int8 with uint8 I/O, both verified on the full 10,000-image test split), time each
`.tflite` single-threaded in a fresh process, and render a table. The int8 run also exports the model for
microcontrollers (checked in TFLite Micro) into `int8/micro/`.
"""

from __future__ import annotations

import os

from tfcompress.models import baseline
from tfcompress.analysis import latency
from tfcompress.runs import pipeline
from tfcompress.core import progress
from tfcompress.core.artefacts import write_atomic, write_json

# 500 MNIST training images shipped beside data/mnist.npz (see calibration_data/README.md).
CALIBRATION = str(baseline.MNIST_PATH.parents[1] / "calibration_data" / "mnist_calibration.npz")


def run_demo(output_dir: str, epochs: int = 5, seed: int = 0, max_accuracy_drop: float = 0.01) -> dict:
    """Runs the whole demo into `output_dir`; returns the summary (accuracies are fractions)."""
    os.makedirs(output_dir, exist_ok=True)
    print(f"Training LeNet-5 on MNIST ({epochs} epochs, seed {seed}) ...", flush=True)
    data = baseline.load_mnist()
    model = baseline.train_lenet5(data, epochs=epochs, seed=seed, verbose=progress.keras_verbose())
    saved_model_dir = os.path.join(output_dir, "float_savedmodel")
    model.save(saved_model_dir, save_format="tf", overwrite=True)

    results = {}
    for mode in ("float32", "int8"):
        print(f"Converting to {mode} and verifying on the 10,000 test images ...", flush=True)
        results[mode] = pipeline.run_convert(pipeline.ConvertPipelineConfig(
            output_dir=os.path.join(output_dir, mode),
            saved_model_dir=saved_model_dir,
            calibration_data=CALIBRATION,
            calibration_key="x",
            eval_data=str(baseline.MNIST_PATH),
            input_scale=baseline.MNIST_SCALE,
            mode=mode,
            target="micro" if mode == "int8" else None,
            tflm_samples=None,  # the demo checks all 10,000 test images in TFLM (across both cores)
            debug_layers=True,  # and shows the per-tensor quantization error in its report
            max_accuracy_drop=max_accuracy_drop,
            seed=seed,
            overwrite=True,
        ))
    print("Timing each model single-threaded in a fresh process ...", flush=True)
    summary = {"schema_version": 1, "epochs": epochs, "seed": seed, "models": {}}
    for mode, result in results.items():
        timing = latency.measure_latency(result.model_path, num_runs=200, num_threads=1)
        acc = result.verification.accuracy
        summary["models"][mode] = {
            "path": result.model_path,
            "bytes": result.num_bytes,
            "accuracy": acc.tflite_accuracy,
            "float_accuracy": acc.float_accuracy,
            "accuracy_drop": acc.accuracy_drop,
            "top1_agreement": acc.top1_agreement,
            "latency_median_ms": timing.median_ms,
            "latency_p90_ms": timing.p90_ms,
            "io_dtype": result.verification.inputs[0]["dtype"],
        }
    micro = results["int8"].report["micro"]
    summary["micro"] = {"dir": os.path.join(output_dir, "int8", pipeline.MICRO_DIRNAME),
                        "flash_bytes": micro["flash_bytes"], "arena_bytes": micro["arena"]["arena_bytes"],
                        "tflm_top1_agreement": micro["tflm_check"]["top1_agreement"],
                        "tflm_max_step_difference": micro["tflm_check"]["max_step_difference"],
                        "tflm_samples": micro["tflm_check"]["num_samples"]}
    table = render(summary)
    summary["table"] = table
    write_json(os.path.join(output_dir, "summary.json"), {k: v for k, v in summary.items() if k != "table"})
    write_atomic(os.path.join(output_dir, "summary.md"), (table + "\n").encode())
    return summary


def render(summary: dict) -> str:
    f32, i8 = summary["models"]["float32"], summary["models"]["int8"]
    lines = [
        f"LeNet-5 on MNIST, {i8['io_dtype']} I/O int8 vs float32 TFLite "
        f"(accuracy on all 10,000 test images; latency: median of 200 single-thread invokes)",
        "",
        "| model | I/O | test accuracy | bytes | latency median (ms) | latency p90 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in (("float32", f32), ("int8", i8)):
        lines.append(
            f"| {name} | {row['io_dtype']} | {row['accuracy']:.4f} | {row['bytes']:,} | "
            f"{row['latency_median_ms']:.3f} | {row['latency_p90_ms']:.3f} |"
        )
    lines += [
        "",
        f"int8 vs float32: {i8['bytes'] / f32['bytes']:.3f}x the bytes, accuracy change "
        f"{i8['accuracy'] - f32['accuracy']:+.4f} ({(i8['accuracy'] - f32['accuracy']) * 100:+.2f} points), "
        f"top-1 agreement with the float model {i8['top1_agreement']:.4f}, "
        f"{f32['latency_median_ms'] / i8['latency_median_ms']:.2f}x faster.",
        f"Microcontroller build: {summary['micro']['dir']}/ (C array, op resolver, manifest): flash "
        f"{summary['micro']['flash_bytes']:,} bytes, tensor arena {summary['micro']['arena_bytes']:,} bytes; in "
        f"TFLite Micro top-1 agreement with LiteRT {summary['micro']['tflm_top1_agreement']:.4f} on "
        f"{summary['micro']['tflm_samples']:,} images (largest difference "
        f"{summary['micro']['tflm_max_step_difference']} quantized step(s)).",
        f"Artefacts: {os.path.dirname(i8['path'])}/ (model.tflite, report.md with plots, report.json), "
        f"{os.path.dirname(os.path.dirname(i8['path']))}/summary.md",
    ]
    return "\n".join(lines)
