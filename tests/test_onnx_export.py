"""ONNX export: the verified int8 `.tflite` through tf2onnx into onnxruntime, checked against LiteRT and the float
model on real data; written only when it passes, the same bytes every time, refused clearly when it cannot run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import CALIBRATION, ROOT, SCALE

from tfcompress.conversion.verify import run_tflite_raw
from tfcompress.core.errors import InputError, VerificationError
from tfcompress.core.tflite_model import read_tflite
from tfcompress.runs.pipeline import ConvertPipelineConfig, run_convert
from tfcompress.targets import onnx_export
from tfcompress.targets.export import ExportConfig, run_export


@pytest.fixture(scope="module")
def int8_tflite(saved_model_dir, eval_npz, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("onnx_convert")
    result = run_convert(ConvertPipelineConfig(
        output_dir=str(out), saved_model_dir=saved_model_dir, calibration_data=str(CALIBRATION),
        calibration_key="x", eval_data=eval_npz, input_scale=SCALE, latency_runs=0, debug_layers=False))
    return result.model_path


def _config(tflite, out, **kwargs) -> ExportConfig:
    return ExportConfig(tflite=tflite, output_dir=str(out), target="onnx", input_scale=SCALE, **kwargs)


def test_the_onnx_model_is_int8_and_matches_litert_and_the_float_model(int8_tflite, saved_model_dir, eval_npz,
                                                                       tmp_path):
    result = run_export(_config(int8_tflite, tmp_path, saved_model_dir=saved_model_dir, eval_data=eval_npz,
                                max_accuracy_drop=0.01))
    report = json.loads((tmp_path / onnx_export.REPORT_FILENAME).read_text())
    assert report == json.loads(json.dumps(result.manifest)) and report["passed"]
    path = tmp_path / "model.onnx"
    proto = onnx.load(path)
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops, ops
    assert report["input_dtype"] == "uint8" and report["output_dtypes"] == ["uint8"]
    weights = [i for i in proto.graph.initializer if np.prod(i.dims) > 100]
    assert weights and all(i.data_type == onnx.TensorProto.INT8 for i in weights), \
        [(i.name, i.data_type) for i in weights]
    # Run the written file here, independently of the export's own check: the same uint8 outputs as LiteRT,
    # within one quantization step, on the 1,000 MNIST test images.
    with np.load(eval_npz) as d:
        x, y = d["x_test"], d["y_test"]
    tflite = read_tflite(int8_tflite)
    detail = tflite.tensors[tflite.inputs[0]]
    q = np.clip(np.round(x[..., None] * SCALE / detail.scale[0] + detail.zero_point[0]), 0, 255).astype(np.uint8)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_out = session.run(None, {session.get_inputs()[0].name: q})[0]
    lite_out = run_tflite_raw(tflite, q)
    steps = np.abs(ort_out.astype(int) - lite_out.astype(int))
    assert steps.max() <= 2 and np.mean(ort_out.argmax(1) == lite_out.argmax(1)) >= 0.99
    accuracy = report["accuracy"]
    assert accuracy["reference"] == "float"
    assert abs(accuracy["onnx"] - np.mean(ort_out.argmax(1) == y)) < 1e-9
    assert accuracy["float"] - accuracy["onnx"] <= 0.01
    assert report["vs_tflite"][0]["top1_agreement"] >= 0.99 and report["vs_tflite"][0]["sqnr_db"] > 40


def test_the_same_tflite_gives_the_same_onnx_bytes(int8_tflite):
    model = read_tflite(int8_tflite)
    assert onnx_export.tflite_to_onnx(model, int8_tflite) == onnx_export.tflite_to_onnx(model, int8_tflite)


def test_a_failed_gate_writes_the_report_and_no_onnx_model(int8_tflite, eval_npz, tmp_path):
    # A gate above the 200 dB that identical outputs score: no ONNX model can pass it.
    with pytest.raises(VerificationError, match="fidelity_output_sqnr"):
        run_export(_config(int8_tflite, tmp_path, eval_data=eval_npz, min_output_sqnr_db=250.0))
    assert not (tmp_path / "model.onnx").exists()
    report = json.loads((tmp_path / onnx_export.REPORT_FILENAME).read_text())
    assert not report["passed"] and report["onnx_file"] is None


def test_a_float_tflite_is_refused(saved_model_dir, tmp_path):
    float_dir = tmp_path / "float"
    result = run_convert(ConvertPipelineConfig(output_dir=str(float_dir), saved_model_dir=saved_model_dir,
                                               mode="float32", latency_runs=0, debug_layers=False,
                                               calibration_data=str(CALIBRATION), calibration_key="x",
                                               input_scale=SCALE))
    with pytest.raises(InputError, match="the ONNX export takes a verified full-integer .tflite"):
        run_export(_config(result.model_path, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet8", "ds_cnn", "two_output"])
def test_zoo_models_export_to_onnx(trained, name, tmp_path):
    """Residual adds, depthwise convolutions and two heads convert and run in onnxruntime like in LiteRT."""
    entry = trained(name)
    files = entry.files
    converted = run_convert(ConvertPipelineConfig(
        output_dir=str(tmp_path / "tflite"), keras_model=files.keras_model, calibration_data=files.calibration_data,
        calibration_key="x", eval_data=files.eval_data, latency_runs=0, debug_layers=False,
        eval_output=entry.model.output_names[0]))
    result = run_export(ExportConfig(tflite=converted.model_path, output_dir=str(tmp_path / "onnx"), target="onnx",
                                     keras_model=files.keras_model, eval_data=files.eval_data))
    report = result.manifest
    assert report["passed"] and (tmp_path / "onnx" / "model.onnx").exists()
    assert len(report["vs_tflite"]) == len(entry.model.outputs)
    for output in report["vs_tflite"]:
        assert output["sqnr_db"] > 30, output
    assert report["accuracy"]["float"] - report["accuracy"]["onnx"] <= 0.02


def test_without_the_extra_the_export_names_the_install(int8_tflite, tmp_path):
    """tf2onnx made unimportable in a fresh process, as on an install without `.[onnx]`: exit 2, one line."""
    code = ("import sys; sys.modules['tf2onnx'] = None; from pipelines.__main__ import main; "
            f"main(['tfcompress', 'export', '--tflite={int8_tflite}', '--target=onnx', "
            f"'--output_dir={tmp_path / 'out'}'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.startswith("tfcompress export")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert lines == ["tfcompress export: error: --target onnx needs tf2onnx, which is not installed: install the ONNX "
                     "extra: pip install 'tfcompress[onnx]' (tf2onnx, onnx, onnxruntime; from a checkout: pip install "
                     "-e '.[onnx]')."], done.stderr[-2000:]
    assert not (tmp_path / "out").exists()
