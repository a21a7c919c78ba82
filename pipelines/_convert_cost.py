"""What `tfcompress benchmark_convert` measures beyond LeNet-5's table: the pipeline's overhead over a hand script on
MobileNetV2, LiteRT verification throughput against LiteRT's own invoke loop, the TFLM check's speed-up over the
serial loop, and how each stage's cost grows with the model (the scaling table).

The hand-written path here, like `_reference`'s, uses TensorFlow and LiteRT directly, not the tfcompress library.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from tfcompress.conversion.verify import run_litert
from tfcompress.core._keras import keras, tf
from tfcompress.core.tflite_model import read_tflite
from tfcompress.models import zoo
from tfcompress.targets import micro

MOBILENET_INPUT = (224, 224, 3)
NUM_CALIBRATION = 100
NUM_EVAL = 200


def mobilenet_v2_files(directory: str, alpha: float, seed: int = 0) -> dict:
    """MobileNetV2 (224x224, 1,000 classes) with random weights as a SavedModel, 100 calibration and 200 evaluation
    inputs drawn uniformly from [-1, 1] (its preprocessed range); no labels (random weights classify nothing)."""
    os.makedirs(directory, exist_ok=True)
    saved_model = os.path.join(directory, "savedmodel")
    if not os.path.exists(os.path.join(saved_model, "saved_model.pb")):
        keras.utils.set_random_seed(seed)
        model = keras.applications.MobileNetV2(input_shape=MOBILENET_INPUT, alpha=alpha, weights=None)
        model.save(saved_model, save_format="tf")
        with open(os.path.join(directory, "parameters.json"), "w") as f:
            json.dump({"parameters": int(model.count_params())}, f)
    rng = np.random.default_rng(seed)
    calibration, evaluation = os.path.join(directory, "calibration.npz"), os.path.join(directory, "eval.npz")
    if not os.path.exists(evaluation):
        np.savez(calibration, x=rng.uniform(-1, 1, (NUM_CALIBRATION, *MOBILENET_INPUT)).astype(np.float32))
        np.savez(evaluation, x_test=rng.uniform(-1, 1, (NUM_EVAL, *MOBILENET_INPUT)).astype(np.float32))
    with open(os.path.join(directory, "parameters.json")) as f:
        parameters = json.load(f)["parameters"]
    return {"parameters": parameters, "saved_model_dir": saved_model, "calibration_data": calibration,
            "calibration_key": "x", "eval_data": evaluation, "eval_labels_key": ""}


def resnet8_files(directory: str, seed: int = 0) -> dict:
    """The zoo's residual CNN (ResNet-8, 32x32 RGB MNIST), trained briefly, as its run files."""
    if not os.path.exists(os.path.join(directory, zoo.EVAL_FILENAME)):
        model, data = zoo.train("resnet8", seed=seed)
        zoo.write_run_files(model, data, directory)
    return {"parameters": int(keras.models.load_model(os.path.join(directory, zoo.MODEL_FILENAME)).count_params()),
            "keras_model": os.path.join(directory, zoo.MODEL_FILENAME),
            "calibration_data": os.path.join(directory, zoo.CALIBRATION_FILENAME), "calibration_key": "x",
            "eval_data": os.path.join(directory, zoo.EVAL_FILENAME)}


def handwritten(files: dict) -> dict:
    """The plain script on any of these models: TFLiteConverter (full int8, uint8 I/O, the calibration file as the
    representative dataset), then LiteRT on the evaluation inputs in batches of 500 on every core."""
    start = time.perf_counter()
    with np.load(files["calibration_data"]) as d:
        calibration = d[files["calibration_key"]].astype(np.float32)

    def representative_dataset():
        for sample in calibration:
            yield [sample[None]]

    converter = (tf.lite.TFLiteConverter.from_saved_model(files["saved_model_dir"]) if "saved_model_dir" in files
                 else tf.lite.TFLiteConverter.from_keras_model(keras.models.load_model(files["keras_model"])))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    model = converter.convert()
    convert_seconds = time.perf_counter() - start
    start = time.perf_counter()
    with np.load(files["eval_data"]) as d:
        x = d["x_test"].astype(np.float32)
    interpreter = Interpreter(model_content=model, num_threads=os.cpu_count())
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    scale, zero_point = inp["quantization"]
    q = np.clip(np.round(x / scale + zero_point), 0, 255).astype(np.uint8)
    batch = min(500, len(q))
    interpreter.resize_tensor_input(inp["index"], [batch, *inp["shape"][1:]])
    interpreter.allocate_tensors()
    outputs = []
    for begin in range(0, len(q) - len(q) % batch, batch):
        interpreter.set_tensor(inp["index"], q[begin : begin + batch])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(out["index"]).copy())
    evaluate_seconds = time.perf_counter() - start
    return {"model": model, "outputs": np.concatenate(outputs), "convert_seconds": convert_seconds,
            "evaluate_seconds": evaluate_seconds, "total_seconds": convert_seconds + evaluate_seconds}


def invoke_loop_throughput(model_path: str, inputs: np.ndarray, batch_size: int = 500, repeats: int = 3) -> dict:
    """Samples/second of the verification's LiteRT run (`run_litert`, what `verify` calls) against LiteRT's own
    invoke loop, same model, batch and threads, inputs already quantized for both; alternating, best of `repeats`.

    The loop is timed twice: from the model's bytes like the verification (create the interpreter, resize,
    allocate, then set_tensor / invoke / get_tensor per batch; `ratio`, the gated one), and on an interpreter
    already allocated and invoked once (`warm_ratio`: XNNPACK packs the weights on the first invoke, a cost every
    fresh evaluation pays, which dominates when the evaluation is one or two batches).
    """
    threads = os.cpu_count() or 1
    parsed = read_tflite(model_path)
    batch = min(batch_size, len(inputs))
    usable = inputs[: len(inputs) - len(inputs) % batch]

    def loop(interpreter=None):
        if interpreter is None:
            interpreter = Interpreter(model_content=parsed.data, num_threads=threads)
            detail = interpreter.get_input_details()[0]
            interpreter.resize_tensor_input(detail["index"], [batch, *detail["shape"][1:]])
            interpreter.allocate_tensors()
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        for begin in range(0, len(usable), batch):
            interpreter.set_tensor(inp["index"], usable[begin : begin + batch])
            interpreter.invoke()
            interpreter.get_tensor(out["index"])
        return interpreter

    warm = loop()
    times: dict[str, list[float]] = {"verification": [], "loop": [], "warm_loop": []}
    for _ in range(repeats):
        for name, run in (("verification", lambda: run_litert(parsed, usable, batch_size=batch, num_threads=threads)),
                          ("loop", loop), ("warm_loop", lambda: loop(warm))):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    return {"samples": int(len(usable)), "batch_size": batch, "num_threads": threads,
            "verification_samples_per_second": len(usable) / best["verification"],
            "invoke_loop_samples_per_second": len(usable) / best["loop"],
            "warm_invoke_loop_samples_per_second": len(usable) / best["warm_loop"],
            "ratio": best["loop"] / best["verification"], "warm_ratio": best["warm_loop"] / best["verification"]}


def tflm_check_speedup(model_path: str, inputs: np.ndarray, repeats: int = 2) -> dict:
    """The TFLM check (`micro.check_against_litert`: TFLM's run and LiteRT's two runs it is compared with) on the
    same inputs, serial (`workers=1`: one process, one after the other, as before worker processes) against the
    default (TFLM split across worker processes on every core while LiteRT runs in this one); alternating, best of
    `repeats` each. Also says whether the outputs and the comparison were identical."""
    model = read_tflite(model_path)
    arena = micro.measure_arena(model, inputs[:1]).arena_bytes
    times: dict[int | None, list[float]] = {1: [], None: []}
    results = {}
    for _ in range(repeats):
        for workers in times:
            start = time.perf_counter()
            results[workers] = micro.check_against_litert(model, inputs, arena, "benchmark", workers=workers)
            times[workers].append(time.perf_counter() - start)
    serial, parallel = min(times[1]), min(times[None])
    (serial_out, serial_check), (parallel_out, parallel_check) = results[1], results[None]
    return {"samples": int(len(inputs)), "workers": micro.default_workers(), "serial_seconds": serial,
            "parallel_seconds": parallel, "speedup": serial / parallel,
            "identical_outputs": all(a.tobytes() == b.tobytes() for a, b in zip(serial_out, parallel_out))
            and serial_check == parallel_check}


def scaling_row(name: str, files: dict, output_dir: str, tflm_samples: int | None, extra: tuple[str, ...] = ()) -> dict:
    """One `tfcompress convert --target=micro` in a child process: the report's seconds per stage and the child's
    peak resident memory (`wait4`'s ru_maxrss). Where TFLM cannot run the model (measured: SIGABRT in tflite_micro's
    Interpreter constructor on MobileNetV2, which convert's child-process probe now refuses with exit 2), the row
    says so and the other stages come from a run without --target=micro."""
    args = [sys.executable, "-m", "pipelines", "convert", f"--output_dir={output_dir}", "--overwrite", "--noprogress",
            *(f"--{key}={value}" for key, value in files.items() if key != "parameters"), *extra]
    micro_args = ["--target=micro", f"--tflm_samples={'all' if tflm_samples is None else tflm_samples}"]
    returncode, stderr, wall, usage = _child(args + micro_args)
    tflm_failure = None
    refused = returncode == 2 and "made the TFLite Micro interpreter crash" in stderr
    if returncode < 0 or refused:  # convert now probes TFLM in a child first and refuses such a model (exit 2)
        tflm_failure = (f"the convert --target=micro process died by signal {-returncode} (in TFLM)" if not refused
                        else "convert --target=micro refused it: TFLM crashed allocating it in a child process ("
                        + stderr.split("crash (", 1)[1].split(")", 1)[0] + ")")
        returncode, stderr, wall, usage = _child(args)
    if returncode != 0:
        raise RuntimeError(f"convert of {name} exited {returncode}: {stderr.strip()[-500:]}")
    with open(os.path.join(output_dir, "report.json")) as f:
        report = json.load(f)
    timings = report["timings"]
    micro_check = (report.get("micro") or {}).get("tflm_check") or {}
    return {"model": name, "parameters": files["parameters"], "bytes": report["model"]["bytes"],
            "tflm_failure": tflm_failure,
            "load_seconds": timings["load_seconds"], "convert_seconds": timings["convert_seconds"],
            "calibration_seconds": timings.get("calibration_seconds"),
            "verify_seconds": timings["verify_seconds"], "tflm_check_seconds": timings.get("micro_export_seconds"),
            "tflm_samples": micro_check.get("num_samples"), "report_seconds": timings["report_seconds"],
            "process_seconds": wall, "peak_rss_mib": usage}


def _child(args: list[str]) -> tuple[int, str, float, float | None]:
    """Runs `args` from the repository root; (exit code, stderr, wall seconds, its peak resident MiB).

    The peak comes from GNU time (`/usr/bin/time -f %M`), whose own small process forks the child: a child forked
    from this large process would report this process's pages as its own peak (Linux keeps the higher-water mark
    across exec). None where GNU time is missing.
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tfcompress-rss-") as tmp:
        peak_path = os.path.join(tmp, "peak")
        timed = ["/usr/bin/time", "-f", "%M", "-o", peak_path, *args] if os.path.exists("/usr/bin/time") else args
        done = subprocess.run(timed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        peak, code = None, done.returncode
        if os.path.exists(peak_path):
            text = open(peak_path).read()
            lines = [line for line in text.splitlines() if line.strip().isdigit()]
            peak = int(lines[-1]) / 1024 if lines else None
            if "terminated by signal" in text:  # GNU time exits 128 + signal and says so in its file
                code = -int(text.split("terminated by signal")[-1].split()[0])
    return code, done.stderr, time.perf_counter() - start, peak
