"""Microcontroller export on a real MNIST CNN: TFLM runs it with the reported arena and matches LiteRT,
the generated C++ compiles and reproduces the model bytes, bad input is refused with one clear line."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema

from conftest import CALIBRATION, ROOT, SCALE
from tfcompress.targets import export
from tfcompress.targets import arena_probe, micro
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.conversion.datasets import write_tfrecords
from tfcompress.core._keras import keras
from tfcompress.core.errors import InputError, MicroTargetError, ModelLoadError, VerificationError
from tfcompress.core.model_io import load_model
from tfcompress.core.tflite_model import read_tflite

STUB_INCLUDE = ROOT / "tests" / "data" / "tflm_stub"
NUM_CHECK = 300


@pytest.fixture(scope="module")
def calibration_samples():
    with np.load(CALIBRATION) as d:
        return d["x"][:100].astype(np.float32) * SCALE


@pytest.fixture(scope="module")
def int8_path(trained_model, calibration_samples, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("micro") / "small cnn.tflite"
    path.write_bytes(convert(load_model(trained_model), ConvertConfig(), calibration_samples))
    return str(path)


@pytest.fixture(scope="module")
def exported(int8_path, eval_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "firmware"
    result = export.run_export(export.ExportConfig(
        tflite=int8_path, output_dir=str(out), eval_data=eval_npz, input_scale=SCALE,
        num_eval_samples=NUM_CHECK, labels=_labels_file(tmp_path_factory)))
    return result


def _labels_file(tmp_path_factory, count: int = 10) -> str:
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(f"digit {i}" for i in range(count)) + "\n")
    return str(path)


def test_export_writes_every_file_and_a_true_manifest(exported, int8_path):
    m = exported.manifest
    name = "small_cnn"  # derived from "small cnn.tflite", sanitised
    assert m["name"] == name and m["notes"] == ["name 'small cnn' is not a C identifier; using 'small_cnn'"]
    files = sorted(os.listdir(exported.output_dir))
    assert files == sorted([f"{name}.tflite", f"{name}_model_data.cc", f"{name}_model_data.h",
                            f"{name}_op_resolver.h", "manifest.json"])
    data = open(int8_path, "rb").read()
    assert open(os.path.join(exported.output_dir, f"{name}.tflite"), "rb").read() == data
    on_disk = json.load(open(os.path.join(exported.output_dir, "manifest.json")))
    assert on_disk["sha256"] == hashlib.sha256(data).hexdigest()
    assert on_disk["flash_bytes"] == len(data)
    assert on_disk["ops"] == read_tflite(data).op_counts()
    assert on_disk["resolver"]["methods"] == ["AddConv2D", "AddFullyConnected", "AddMaxPool2D",
                                              "AddQuantize", "AddReshape"]
    assert on_disk["labels"] == [f"digit {i}" for i in range(10)]
    assert on_disk["inputs"][0]["dtype"] == "uint8" and on_disk["inputs"][0]["shape"] == [1, 28, 28, 1]
    assert on_disk["outputs"][0]["dtype"] == "uint8"
    assert on_disk["tflm_check"]["num_samples"] == NUM_CHECK


def test_tflm_matches_litert_within_the_stated_tolerance(exported, int8_path):
    check = exported.manifest["tflm_check"]
    # TFLM is checked against LiteRT's reference kernels, the arithmetic it runs itself; LiteRT's default
    # XNNPACK kernels (what a phone runs) are compared with the same reference and only reported.
    assert check["reference"] == "LiteRT reference kernels" and check["compared"] == "TFLM"
    phone = exported.manifest["litert_optimized_vs_reference"]
    assert phone["compared"] == "LiteRT (XNNPACK)" and phone["num_samples"] == check["num_samples"]
    assert phone["min_top1_agreement"] == 0.0  # never a gate
    # QUANTIZE (input), CONV_2D, FULLY_CONNECTED x2, QUANTIZE (output) requantize; pool and reshape do not.
    assert read_tflite(int8_path).op_counts() == {"CONV_2D": 1, "FULLY_CONNECTED": 2, "MAX_POOL_2D": 1,
                                                  "QUANTIZE": 2, "RESHAPE": 1}
    assert check["tolerance_steps"] == 5
    assert check["max_step_difference"] <= 1  # measured on this model: within one step of the reference
    assert phone["max_step_difference"] <= check["tolerance_steps"]
    assert check["top1_agreement"] >= 0.999


def test_model_runs_with_the_reported_arena_and_not_with_a_much_smaller_one(int8_path, eval_npz):
    data = open(int8_path, "rb").read()
    with np.load(eval_npz) as d:
        inputs = d["x_test"][:20, ..., None]  # uint8 pixels are the quantized input (scale 1/255, zp 0)
    arena = micro.measure_arena(data, inputs[:1])
    assert arena.recorded_bytes < arena.arena_bytes <= 1.10 * arena.recorded_bytes
    assert arena.arena_bytes % 16 == 0
    assert arena.smallest_run_bytes is None and arena.probes == 1  # the recorded total + 5% ran at once
    outputs = micro.run_tflm(data, inputs, arena.arena_bytes)
    assert outputs.shape == (20, 10) and outputs.dtype == np.uint8
    # A size that may be too small is only ever tried in a child process (it can crash the interpreter).
    half = arena_probe.probe_arena(data, inputs[:1], arena.recorded_bytes // 2)
    assert not half.ran and "Failed to resize buffer. Requested: " in half.detail  # the allocator's own line
    assert arena_probe.probe_arena(data, inputs[:1], arena.arena_bytes).ran


def test_arena_is_searched_when_the_recorded_total_does_not_run(tmp_path):
    # A dense int8 autoencoder (10 FULLY_CONNECTED): TFLM's recording allocator under-reports what it needs
    # (measured: 17,872 recorded, 18,768 with the margin fails, 16,000 crashes the process with SIGSEGV).
    keras.utils.set_random_seed(0)
    inputs = keras.Input((640,))
    x = inputs
    for units in (128, 128, 128, 128, 8, 128, 128, 128, 128):
        x = keras.layers.Dense(units, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(640)(x))
    samples = np.random.default_rng(0).normal(size=(200, 640)).astype(np.float32)
    data = convert(load_model(model), ConvertConfig("int8"), samples)
    sample = np.zeros((1, 640), np.uint8)
    arena = micro.measure_arena(data, sample)
    assert arena.smallest_run_bytes is not None and arena.probes > 2
    assert arena.smallest_run_bytes > math.ceil(arena.recorded_bytes * 1.05)
    assert arena.arena_bytes == math.ceil(arena.smallest_run_bytes * 1.05 / 16) * 16
    assert arena_probe.probe_arena(data, sample, arena.arena_bytes).ran
    assert not arena_probe.probe_arena(data, sample, arena.smallest_run_bytes - 16).ran
    crashed = arena_probe.probe_arena(data, sample, 16_000)
    assert not crashed.ran  # whether it died or refused, this process is still here to say so


def _compile(tmp_path, export_dir: str, name: str) -> subprocess.CompletedProcess:
    main = tmp_path / "main.cc"
    main.write_text(f"""
#include <cstdint>
#include <cstdio>
#include "{name}_model_data.h"
#include "{name}_op_resolver.h"
int main() {{
  {name}_op_resolver resolver;
  if ({name}_register_ops(resolver) != kTfLiteOk) return 3;
  if (resolver.registered() != {name}_op_count) return 4;
  if (reinterpret_cast<std::uintptr_t>({name}) % 16 != 0) return 5;
  std::printf("%u %u\\n", {name}_len, {name}_arena_bytes);
  FILE* out = std::fopen("roundtrip.bin", "wb");
  std::fwrite({name}, 1, {name}_len, out);
  std::fclose(out);
  return 0;
}}
""")
    flags = ["-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{export_dir}", f"-I{STUB_INCLUDE}"]
    subprocess.run(["g++", *flags, "-c", os.path.join(export_dir, f"{name}_model_data.cc"), "-o",
                    str(tmp_path / "model_data.o")], check=True, capture_output=True)
    subprocess.run(["g++", *flags, str(main), str(tmp_path / "model_data.o"), "-o", str(tmp_path / "app")],
                   check=True, capture_output=True)
    return subprocess.run([str(tmp_path / "app")], cwd=tmp_path, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_generated_cpp_compiles_and_reproduces_the_model(exported, tmp_path):
    name = exported.manifest["name"]
    run = _compile(tmp_path, exported.output_dir, name)
    assert run.returncode == 0, run.stderr
    length, arena = (int(v) for v in run.stdout.split())
    assert length == exported.manifest["flash_bytes"]
    assert arena == exported.manifest["arena"]["arena_bytes"]
    shipped = open(os.path.join(exported.output_dir, f"{name}.tflite"), "rb").read()
    assert (tmp_path / "roundtrip.bin").read_bytes() == shipped


def test_every_known_op_has_a_resolver_method_in_the_tflm_api():
    header = (STUB_INCLUDE / "tensorflow/lite/micro/micro_mutable_op_resolver.h").read_text()
    for method in {**micro.TFLM_BUILTINS, **micro.TFLM_CUSTOM}.values():
        assert f"TfLiteStatus {method}()" in header


def test_same_input_gives_the_same_files(int8_path, eval_npz, tmp_path):
    data = open(int8_path, "rb").read()
    inputs, described = export.micro_inputs(read_tflite(data), None, seed=0, num_random=20)
    first = export.build_micro_export(data, inputs, described, name="m")
    second = export.build_micro_export(data, inputs, described, name="m")
    assert first.files == second.files


def _shared_weights(model, levels: int = 16):
    """Weight sharing by hand: every kernel's output channel takes at most `levels` values."""
    from tfcompress.core._keras import keras

    shared = keras.models.clone_model(model)
    shared.set_weights(model.get_weights())
    for layer in shared.layers:
        if not hasattr(layer, "kernel"):
            continue
        kernel, bias = layer.get_weights()
        flat = np.moveaxis(kernel, -1, 0).reshape(kernel.shape[-1], -1)
        for row in flat:
            grid = np.linspace(row.min(), row.max(), levels)
            row[:] = grid[np.abs(row[:, None] - grid).argmin(1)]
        layer.set_weights([np.moveaxis(flat.reshape(kernel.shape[-1], *kernel.shape[:-1]), 0, -1), bias])
    return shared


def test_compress_shrinks_flash_and_decodes_exactly_in_tflm(trained_model, calibration_samples, eval_npz,
                                                            tmp_path):
    path = tmp_path / "shared.tflite"
    path.write_bytes(convert(load_model(_shared_weights(trained_model)), ConvertConfig(), calibration_samples))
    result = export.run_export(export.ExportConfig(
        tflite=str(path), output_dir=str(tmp_path / "out"), eval_data=eval_npz, input_scale=SCALE,
        num_eval_samples=50, compress=True))
    c = result.manifest["compression"]
    assert c["flash_bytes_after"] < 0.75 * c["flash_bytes_before"]
    assert result.manifest["flash_bytes"] == c["flash_bytes_after"]
    assert all(t["distinct_values"] <= 16 and t["index_bitwidth"] <= 4 for t in c["tensors"])
    assert c["tflm_exact_check"]["max_step_difference"] == 0
    # The decoded weights live in the arena: the saving in flash is paid for in RAM.
    assert c["arena_bytes_after"] > c["arena_bytes_before"]
    assert "AddDecode" in result.manifest["resolver"]["methods"]
    assert read_tflite(str(tmp_path / "out" / "shared.tflite")).op_counts()["CUSTOM"] == len(c["tensors"])
    # The same 50 samples streamed from TFRecords, every one run batch by batch: the same checks and tables.
    with np.load(eval_npz) as d:
        write_tfrecords(d["x_test"][:50], d["y_test"][:50], tmp_path / "eval.tfrecord")
    streamed = export.run_export(export.ExportConfig(
        tflite=str(path), output_dir=str(tmp_path / "streamed"), eval_data=str(tmp_path / "eval.tfrecord"),
        input_scale=SCALE, compress=True, tflm_samples=None))
    s = streamed.manifest
    assert s["compression"]["tflm_exact_check"]["max_step_difference"] == 0
    assert s["compression"]["flash_bytes_after"] == c["flash_bytes_after"]
    assert s["tflm_accuracy"] == result.manifest["tflm_accuracy"] and s["tflm_accuracy"]["num_samples"] == 50
    for key in ("max_step_difference", "top1_agreement"):
        assert s["tflm_check"][key] == result.manifest["tflm_check"][key]


def test_compress_follows_per_tensor_quantization(trained_model, mnist_subset, tmp_path):
    """QAT quantizes Dense kernels per tensor; TFLM decodes those with one table, so one table is written."""
    from tfcompress.core._keras import keras
    from tfcompress.training.quantize import quantize_aware

    shared = keras.models.clone_model(trained_model)
    weights = trained_model.get_weights()
    for i in (0, 2, 4):  # kernels: 16 values over the whole tensor
        grid = np.linspace(weights[i].min(), weights[i].max(), 16)
        weights[i] = grid[np.abs(weights[i][..., None] - grid).argmin(-1)].astype(np.float32)
    shared.set_weights(weights)
    qat = quantize_aware(shared)
    qat.compile(keras.optimizers.SGD(0.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x_train, y_train, x_test, _ = mnist_subset
    qat.fit(x_train[:64], y_train[:64], batch_size=64, epochs=1, verbose=0)  # sets the ranges, moves nothing
    data = convert(load_model(qat), ConvertConfig())
    lut = micro.lut_compress(data)
    modes = {t.name.split(";")[0]: t.mode for t in lut.tensors}
    assert modes["small_cnn/quant_fc/MatMul"] == "per-tensor"
    inputs = (x_test[:50] * 255).astype(np.uint8)
    reference = micro.run_tflm(data, inputs, 1 << 20)
    exact = micro.compare_tflm_exact(lut.flatbuffer, inputs, 1 << 21, reference, "50 samples")
    assert exact.passed and exact.max_step_difference == 0


def test_compress_refuses_a_model_without_shared_weights(int8_path, tmp_path):
    with pytest.raises(MicroTargetError, match="no weight tensor has at most 16 distinct values per channel"):
        micro.lut_compress(open(int8_path, "rb").read())


@pytest.mark.parametrize("mode,kind", [("float32", "a float model"), ("float16", "a float16 model"),
                                       ("dynamic", r"a dynamic-range \(hybrid\) model, which TFLM rejects")])
def test_float_and_hybrid_models_are_refused(trained_model, tmp_path, mode, kind):
    path = tmp_path / "m.tflite"
    path.write_bytes(convert(load_model(trained_model), ConvertConfig(mode)))
    with pytest.raises(MicroTargetError, match=f"is {kind} .*Convert with --mode=int8"):
        export.run_export(export.ExportConfig(tflite=str(path), output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def _with_custom_op(data: bytes, custom: str) -> bytes:
    model = schema.ModelT.InitFromPackedBuf(data, 0)
    for code in model.operatorCodes:
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.RESHAPE:
            code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
            code.customCode = custom
    builder = flatbuffers.Builder(len(data))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def test_custom_op_is_refused(int8_path, tmp_path):
    path = tmp_path / "custom.tflite"
    path.write_bytes(_with_custom_op(open(int8_path, "rb").read(), "MyReshape"))
    with pytest.raises(MicroTargetError, match="no TFLM kernel registration known to tfcompress: MyReshape"):
        export.run_export(export.ExportConfig(tflite=str(path), output_dir=str(tmp_path / "out")))


@pytest.mark.parametrize("content,message", [(None, "TFLite model not found"),
                                             (b"not a model at all", "is not a TFLite flatbuffer")])
def test_missing_or_corrupt_tflite(tmp_path, content, message):
    path = tmp_path / "m.tflite"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        export.run_export(export.ExportConfig(tflite=str(path), output_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["2fast", "my-model", "int", "class"])
def test_name_that_is_not_a_c_identifier(int8_path, tmp_path, name):
    with pytest.raises(InputError, match=f"--name '{name}' is not a valid C identifier.*Pass e.g. --name="):
        export.run_export(export.ExportConfig(tflite=int8_path, output_dir=str(tmp_path / "o"), name=name))
    assert not (tmp_path / "o").exists()


def test_wrong_number_of_labels(int8_path, tmp_path_factory, tmp_path):
    with pytest.raises(InputError, match="3 labels given but the model has 10 outputs"):
        export.run_export(export.ExportConfig(tflite=int8_path, output_dir=str(tmp_path / "o"),
                                              labels=_labels_file(tmp_path_factory, 3)))


def test_cli_exit_codes(int8_path, tmp_path):
    base = [sys.executable, "-m", "pipelines", "export", f"--tflite={int8_path}", "--num_eval_samples=5"]
    ok = subprocess.run([*base, f"--output_dir={tmp_path / 'ok'}", "--name=digits"], capture_output=True,
                        text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "exported digits" in ok.stdout and ok.stderr == ""
    bad = subprocess.run([*base, f"--output_dir={tmp_path / 'bad'}", "--name=no good"], capture_output=True,
                         text=True, cwd=ROOT)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "is not a valid C identifier" in bad.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(shutil.which("vela") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "vela")), reason="ethos-u-vela (extra 'npu') not installed")
def test_vela_puts_every_op_on_the_npu(int8_path, tmp_path):
    from tfcompress.targets import vela

    result = vela.compile_for_ethos_u(open(int8_path, "rb").read(), str(tmp_path), "m")
    assert result.npu_ops > 0 and result.cpu_ops == 0
    assert result.sram_bytes > 0 and result.inference_seconds > 0
    assert read_tflite(result.output).op_counts().get("CUSTOM") == 1  # the ethos-u op


def test_a_disagreeing_interpreter_fails_the_check():
    rng = np.random.default_rng(0)
    litert = rng.integers(0, 256, size=(1000, 10))
    tflm = litert.copy()
    tflm[:2, :] = 255 - tflm[:2, :]  # two samples come out very differently
    check = micro.compare_outputs(tflm, litert, "1000 samples", "LiteRT", tolerance=5, min_agreement=0.999)
    assert not check.passed
    assert check.top1_agreement <= 0.999 and check.max_step_difference > 5
    assert check.failures[0].startswith("tflm_output_difference: TFLM and LiteRT outputs differ by up to")
    assert check.failures[1].startswith("tflm_top1_agreement:")
    same = micro.compare_outputs(litert, litert, "1000 samples", "LiteRT", tolerance=0, min_agreement=1.0)
    assert same.passed and same.max_step_difference == 0


def test_arena_is_measured_even_when_native_output_is_let_through(int8_path, monkeypatch):
    monkeypatch.setenv("TFCOMPRESS_NATIVE_LOG", "1")  # debugging switch: TF's C++ output goes through
    sample = np.zeros((1, 28, 28, 1), np.uint8)
    assert micro.measure_arena(open(int8_path, "rb").read(), sample).recorded_bytes > 0


def test_tflm_accuracy_is_measured_with_labels_and_gated_against_float(int8_path, eval_npz):
    with np.load(eval_npz) as d:
        images, labels = d["x_test"][:100].astype(np.float32)[..., None] * SCALE, d["y_test"][:100]
    model = read_tflite(int8_path)
    inputs, described = export.micro_inputs(model, images)
    measured = export.build_micro_export(model, inputs, described, name="m", eval_labels=labels)
    accuracy = measured.manifest["tflm_accuracy"]
    assert accuracy["num_samples"] == 100 and 0.8 <= accuracy["tflm_accuracy"] <= 1.0
    # A float model better than TFLM by more than the limit fails the export, naming both accuracies.
    with pytest.raises(VerificationError, match=r"tflm_accuracy_drop: float 1\.0000, TFLM 0\.\d{4}, drop "
                                                r"0\.\d{4} \(limit 0\.0000\) on 100 samples"):
        export.build_micro_export(model, inputs, described, name="m", eval_labels=labels,
                                  float_accuracy=1.0, max_accuracy_drop=0.0)


def test_parallel_tflm_check_gives_the_serial_outputs_byte_for_byte(int8_path, eval_npz):
    with np.load(eval_npz) as d:
        images = d["x_test"][:NUM_CHECK].astype(np.float32)[..., None] * SCALE
    model = read_tflite(int8_path)
    inputs, _ = export.micro_inputs(model, images)
    arena = micro.measure_arena(model, inputs[:1]).arena_bytes
    serial = micro.run_tflm_outputs(model, inputs, arena, workers=1)
    for workers in (2, 3):  # this process runs the first share, worker processes the others
        parallel = micro.run_tflm_outputs(model, inputs, arena, workers=workers)
        assert len(parallel) == len(serial) == 1
        assert parallel[0].dtype == serial[0].dtype and parallel[0].shape == (NUM_CHECK, 10)
        assert parallel[0].tobytes() == serial[0].tobytes()
    # The whole check: TFLM in worker processes while LiteRT runs here, the same as one after the other.
    outputs, comparison = micro.check_against_litert(model, inputs, arena, "300 images")
    serial_outputs, serial_comparison = micro.check_against_litert(model, inputs, arena, "300 images", workers=1)
    assert outputs[0].tobytes() == serial_outputs[0].tobytes() == serial[0].tobytes()
    assert comparison == serial_comparison and comparison.checks[0].num_samples == NUM_CHECK
    # Fewer inputs than MIN_INPUTS_PER_WORKER a worker: one process, the same outputs.
    few = micro.run_tflm_outputs(model, inputs[:10], arena, workers=2)
    assert few[0].tobytes() == serial[0][:10].tobytes()
    with pytest.raises(ValueError, match=r"workers must be at least 1\. Received: workers=0"):
        micro.run_tflm_outputs(model, inputs, arena, workers=0)


def test_tflm_samples_checks_a_stated_seeded_subset(int8_path, eval_npz, tmp_path):
    def run(out: str, tflm_samples, seed: int = 0):
        return export.run_export(export.ExportConfig(
            tflite=int8_path, output_dir=str(tmp_path / out), eval_data=eval_npz, input_scale=SCALE,
            tflm_samples=tflm_samples, seed=seed))

    subset = run("subset", 250).manifest
    assert subset["tflm_check"]["num_samples"] == 250 and subset["tflm_accuracy"]["num_samples"] == 250
    assert subset["tflm_subset"] == {
        "num_samples": 250, "of": 1000, "seed": 0, "top1_agreement_resolution": 0.004,
        "how": "drawn without replacement with the seed, in index order; --tflm_samples=all runs every one"}
    assert subset["tflm_check"]["samples"] == ("250 of 1000 evaluation samples, drawn with seed 0 (top-1 agreement "
                                               "resolution 0.004)")
    indices = export.tflm_subset(1000, 250, seed=0)
    assert len(set(indices.tolist())) == 250 and list(indices) == sorted(indices)
    assert np.array_equal(indices, export.tflm_subset(1000, 250, seed=0))
    assert not np.array_equal(indices, export.tflm_subset(1000, 250, seed=1))
    # The subset's TFLM accuracy is the accuracy on exactly those images.
    with np.load(eval_npz) as d:
        images, labels = d["x_test"].astype(np.float32)[..., None] * SCALE, d["y_test"]
    model = read_tflite(int8_path)
    inputs, _ = export.micro_inputs(model, images[indices])
    arena = micro.measure_arena(model, inputs[:1]).arena_bytes
    expected = np.mean(micro.run_tflm(model, inputs, arena, workers=1).argmax(1) == labels[indices])
    assert subset["tflm_accuracy"]["tflm_accuracy"] == pytest.approx(expected, abs=0)
    # The same run again gives the same manifest's check; "all" (None) checks every sample.
    assert run("again", 250).manifest["tflm_check"] == subset["tflm_check"]
    every = run("all", None).manifest
    assert every["tflm_subset"] is None and every["tflm_check"]["num_samples"] == 1000
    assert every["tflm_check"]["samples"] == "1000 evaluation samples"


@pytest.mark.parametrize("text, value", [("1000", 1000), ("1", 1), ("all", None), ("ALL", None)])
def test_tflm_samples_flag_values(text, value):
    assert export.parse_tflm_samples(text) == value


@pytest.mark.parametrize("text", ["0", "-3", "abc", "1.5", ""])
def test_tflm_samples_flag_refuses_anything_but_a_count_or_all(text):
    with pytest.raises(ValueError, match=r"tflm_samples is how many samples the TFLM check runs: a whole number of "
                                         r"at least 1, or 'all'\. Received: tflm_samples="):
        export.parse_tflm_samples(text)
    with pytest.raises(ValueError, match=r"Received: tflm_samples=0"):
        export.ExportConfig(tflite="m.tflite", output_dir="o", tflm_samples=0)
