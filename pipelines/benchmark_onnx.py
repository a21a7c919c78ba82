"""Benchmark the ONNX export: ONNX Runtime int8 against LiteRT int8 on LeNet-5 and the zoo's residual CNN.

Run with `tfcompress benchmark_onnx [--saved_model_dir=artefacts/demo/float_savedmodel]` (after `make demo`; the
ResNet-8 is trained here for seconds, as the test zoo trains it). Per model: the int8 `.tflite` from
`tfcompress convert` (calibration from the training split), then `tfcompress export --target onnx` against the
float model on the test split (LeNet-5: the 10,000 MNIST test images; ResNet-8: the zoo's held-out set). Reported:
accuracy of the float model, LiteRT and ONNX Runtime, their top-1 agreement and output SQNR, bytes and gzip -9
bytes of both files, single-thread latency of both (fresh process, one sample, median of --latency_runs; the best
of three interleaved rounds), and how many of the model's Conv/MatMul/Gemm layers ONNX Runtime's graph optimizer
turned into integer kernels (QLinearConv, QGemm, ...; the rest run in float on dequantized weights, every run).
Writes benchmark_onnx.{json,md} to --output_dir. A failed model is reported; it does not fail the run.
"""

from __future__ import annotations

import collections
import gzip
import os
import pathlib
import tempfile
import time

from absl import flags

from pipelines import _benchmark, _common
from tfcompress.analysis.latency import measure_latency
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.models import baseline, zoo
from tfcompress.runs.pipeline import ConvertPipelineConfig, run_convert
from tfcompress.targets.export import ExportConfig, run_export

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_onnx", "Where the results go.")
_MODEL = flags.DEFINE_string("saved_model_dir", "artefacts/demo/float_savedmodel", "The trained LeNet-5 SavedModel "
                             "(the demo's).")
_LATENCY_RUNS = flags.DEFINE_integer("latency_runs", 200, "Single-sample runs timed per round.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the calibration draw and the ResNet-8 training.")
CALIBRATION = os.path.join("calibration_data", "mnist_calibration.npz")
_LAYERS = ("Conv", "MatMul", "Gemm")


def main(argv: list[str]) -> None:
    del argv
    start = time.perf_counter()
    output_dir = _OUTPUT.value
    os.makedirs(output_dir, exist_ok=True)
    rows = {}
    for name, make in (("LeNet-5", _lenet5), ("ResNet-8 (zoo)", _resnet8)):
        try:
            rows[name] = _measure(name, *make(os.path.join(output_dir, _benchmark.slug(name))))
        except Exception as e:  # a failed model is a result
            rows[name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"}
        print(f"{name}: {rows[name]}", flush=True)
    targets = {f"{name}: ONNX Runtime top-1 agreement with LiteRT": _benchmark.target(
        row["top1_agreement"], 0.99, at_most=False, why="ONNX Runtime's QDQ arithmetic rounds differently")
        for name, row in rows.items() if "error" not in row}
    targets |= {f"{name}: accuracy drop ONNX Runtime vs float": _benchmark.target(
        row["accuracy"]["float"] - row["accuracy"]["onnx"], 0.01, at_most=True, why="see the agreement")
        for name, row in rows.items() if "error" not in row}
    targets |= _benchmark.failed_paths(rows)
    total = time.perf_counter() - start
    markdown = _markdown(rows, targets, total)
    write_json(os.path.join(output_dir, "benchmark_onnx.json"), {"models": rows, "targets": targets,
                                                                 "total_seconds": round(total, 1)})
    write_atomic(os.path.join(output_dir, "benchmark_onnx.md"), (markdown + "\n").encode())
    print(markdown)


def _lenet5(directory: str) -> tuple[str, dict, dict]:
    model = _MODEL.value
    if not os.path.exists(model):
        raise FileNotFoundError(f"{model} not found: run `make demo` first, or pass --saved_model_dir.")
    source = {"keras_model": model} if os.path.isfile(model) else {"saved_model_dir": model}
    convert = dict(calibration_data=CALIBRATION, calibration_key="x", eval_data=str(baseline.MNIST_PATH),
                   input_scale=baseline.MNIST_SCALE, **source)
    export = dict(eval_data=str(baseline.MNIST_PATH), input_scale=baseline.MNIST_SCALE, **source)
    return directory, convert, export


def _resnet8(directory: str) -> tuple[str, dict, dict]:
    model, data = zoo.train("resnet8", seed=_SEED.value)
    files = zoo.write_run_files(model, data, os.path.join(directory, "zoo"))
    convert = dict(keras_model=files.keras_model, calibration_data=files.calibration_data, calibration_key="x",
                   eval_data=files.eval_data)
    export = dict(keras_model=files.keras_model, eval_data=files.eval_data)
    return directory, convert, export


def _measure(name: str, directory: str, convert: dict, export: dict) -> dict:
    converted = run_convert(ConvertPipelineConfig(output_dir=os.path.join(directory, "tflite"), seed=_SEED.value,
                                                  latency_runs=0, debug_layers=False, overwrite=True, **convert))
    exported = run_export(ExportConfig(tflite=converted.model_path, output_dir=os.path.join(directory, "onnx"),
                                       target="onnx", overwrite=True, **export))
    report = exported.manifest
    onnx_path = os.path.join(directory, "onnx", report["onnx_file"])
    rounds = {"litert": [], "onnx": []}
    for _ in range(3):  # interleaved, so a busy moment on the machine hits both runtimes alike
        rounds["litert"].append(measure_latency(converted.model_path, _LATENCY_RUNS.value).median_ms)
        rounds["onnx"].append(measure_latency(onnx_path, _LATENCY_RUNS.value).median_ms)
    tflite, onnx_bytes = pathlib.Path(converted.model_path).read_bytes(), pathlib.Path(onnx_path).read_bytes()
    output = report["vs_tflite"][0]
    return {
        "accuracy": {k: report["accuracy"][k] for k in ("float", "tflite", "onnx")},
        "samples": report["samples"],
        "top1_agreement": output["top1_agreement"], "sqnr_db_vs_litert": output["sqnr_db"],
        "max_abs_error_steps": output["max_abs_error_steps"],
        "bytes": {"tflite": len(tflite), "onnx": len(onnx_bytes), "tflite_gzip": len(gzip.compress(tflite, 9, mtime=0)),
                  "onnx_gzip": len(gzip.compress(onnx_bytes, 9, mtime=0))},
        "latency_ms": {"litert": min(rounds["litert"]), "onnx": min(rounds["onnx"]), "rounds": rounds},
        "onnx_ops": report["ops"], "integer_kernels": _integer_kernels(onnx_path),
        "opset": report["opset"], "tf2onnx": report["tf2onnx_version"], "onnxruntime": report["onnxruntime_version"],
    }


def _integer_kernels(onnx_path: str) -> dict:
    """How many Conv/MatMul/Gemm layers ONNX Runtime's optimizer fused into integer kernels (single thread)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    integer = sum(v for k, v in ops.items() if k.startswith(("QLinear", "QGemm", "MatMulInteger", "ConvInteger"))
                  and not k.startswith(("QLinearAdd", "QLinearAveragePool", "QLinearGlobalAveragePool",
                                        "QLinearSigmoid", "QLinearConcat", "QLinearLeakyRelu", "QLinearMul")))
    floating = sum(ops[k] for k in _LAYERS)
    return {"integer": integer, "float": floating, "optimized_ops": dict(sorted(ops.items()))}


def _markdown(rows: dict, targets: dict, total: float) -> str:
    lines = ["# ONNX Runtime int8 against LiteRT int8", "",
             "| model | float acc | LiteRT acc | ORT acc | top-1 agreement | SQNR vs LiteRT (dB) | max steps | "
             ".tflite bytes (gzip) | .onnx bytes (gzip) | LiteRT ms | ORT ms | layers in ORT integer kernels |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} |" + " |" * 10)
            continue
        a, b, t, k = row["accuracy"], row["bytes"], row["latency_ms"], row["integer_kernels"]
        lines.append(
            f"| {name} | {a['float']:.4f} | {a['tflite']:.4f} | {a['onnx']:.4f} | {row['top1_agreement']:.4f} | "
            f"{row['sqnr_db_vs_litert']:.1f} | {row['max_abs_error_steps']} | {b['tflite']:,} ({b['tflite_gzip']:,}) | "
            f"{b['onnx']:,} ({b['onnx_gzip']:,}) | {t['litert']:.3f} | {t['onnx']:.3f} | "
            f"{k['integer']} of {k['integer'] + k['float']} |")
    lines += ["", "Latency: one sample, one thread, fresh process, median of the runs, best of 3 interleaved rounds "
              "(LiteRT `invoke()` with XNNPACK; ONNX Runtime CPU provider `run_with_iobinding`). Layers ONNX Runtime "
              "did not fuse into integer kernels run in float on weights it dequantizes on every run."]
    return _benchmark.finish_tables(lines, targets, total)


if __name__ == "__main__":
    _common.run(main)
