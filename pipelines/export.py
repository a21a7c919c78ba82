r"""Export a verified integer .tflite for microcontrollers: C array, op resolver, arena size, TFLM check.

Example:
  tfcompress export --tflite=artefacts/demo/int8/model.tflite --target=micro --name=lenet5 \
      --eval_data=data/mnist.npz --input_scale=0.00392156862745098 --output_dir=artefacts/micro

Writes <name>_model_data.h/.cc, <name>_op_resolver.h, <name>.tflite and manifest.json (with --vela also
<name>_vela.tflite). The model is first run in TFLite Micro's interpreter with the reported arena and
compared with LiteRT. Exit codes: 0 exported, 1 a check failed (nothing written), 2 bad arguments or
input (nothing written).

--target=onnx (the onnx extra: pip install '.[onnx]') writes <name>.onnx and onnx_report.json instead: the int8
model for ONNX Runtime (tf2onnx), run in onnxruntime against LiteRT and, with --saved_model_dir/--keras_model and
--eval_data, the float model; written only when the gates pass (exit 1 otherwise, the report kept):
  tfcompress export --tflite=artefacts/demo/int8/model.tflite --target=onnx \
      --saved_model_dir=artefacts/demo/float_savedmodel --eval_data=data/mnist.npz \
      --input_scale=0.00392156862745098 --output_dir=artefacts/onnx
"""

from __future__ import annotations

from absl import flags

from pipelines import _common
from tfcompress.targets import export
from tfcompress.conversion import fidelity

_TFLITE = flags.DEFINE_string("tflite", None, "The verified .tflite model to export.", required=True)
_TARGET = flags.DEFINE_enum("target", "micro", list(export.TARGETS), "What to export for.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where the firmware files go.", required=True)
_NAME = flags.DEFINE_string("name", None, "C identifier for the model array and file names "
                            "(default: the .tflite file name, sanitised).")
_LABELS = flags.DEFINE_string("labels", None, "Text file with one class label per line, for the manifest.")
_EVAL = flags.DEFINE_string("eval_data", None, "Labelled .npz, class-per-folder image tree or TFRecord "
                            "file(s) whose samples are run through TFLM and LiteRT (default: seeded random inputs); "
                            "a tree or TFRecords is streamed.")
_DATA_SPEC = flags.DEFINE_string("data_spec", None, "TFRecord sources: the features holding the input and the "
                                 "label, image=KEY,label=KEY (default image=image,label=label).")
_EVAL_KEY = flags.DEFINE_string("eval_key", "x_test", "Samples array inside --eval_data.")
_EVAL_LABELS_KEY = flags.DEFINE_string("eval_labels_key", "y_test", "Labels array inside --eval_data.")
_NUM_EVAL = flags.DEFINE_integer("num_eval_samples", None, "Check only the first N samples.", lower_bound=1)
_SCALE = flags.DEFINE_float("input_scale", 1.0, "Preprocessing: model input = raw * input_scale + "
                            "input_offset (then quantized with the model's input parameters).")
_OFFSET = flags.DEFINE_float("input_offset", 0.0, "See --input_scale.")
_COMPRESS = flags.DEFINE_bool("compress", False, "LUT-compress weight tensors with few distinct values "
                              "per channel (after clustering); TFLM decodes them into the arena.")
_VELA = flags.DEFINE_bool("vela", False, "Also compile for Arm Ethos-U55-128 with Vela (pip install "
                          ".[npu]) and record its NPU op count, SRAM and estimated time.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the random check inputs when no --eval_data is given.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing files in --output_dir.")
_MODEL = flags.DEFINE_string("saved_model_dir", None, "--target=onnx: the float model (SavedModel) to compare "
                             "with on --eval_data (the accuracy drop is then measured against it).")
_KERAS_MODEL = flags.DEFINE_string("keras_model", None, "--target=onnx: the float model as a .keras/.h5 file.")
_TRUST_MODEL = flags.DEFINE_bool("trust_model", False, "Load a model file even if it holds code (Lambda layers, "
                                 "unregistered custom layers): only for files you trust.")
_MAX_DROP = flags.DEFINE_float("max_accuracy_drop", 0.01, "--target=onnx: largest allowed top-1 accuracy drop of "
                               "ONNX Runtime against the float model (or the .tflite without one), a fraction.")
_MIN_TOP1 = flags.DEFINE_float("min_top1_agreement", fidelity.DEFAULT_MIN_TOP1_AGREEMENT, "--target=onnx: the "
                               "least top-1 agreement of ONNX Runtime with LiteRT, a fraction.")
_MIN_SQNR = flags.DEFINE_float("min_output_sqnr_db", fidelity.DEFAULT_MIN_OUTPUT_SQNR_DB, "--target=onnx: the "
                               "least SQNR (dB) of ONNX Runtime's outputs against LiteRT's.")
_OPSET = flags.DEFINE_integer("opset", 17, "--target=onnx: the ONNX opset written (13-18).")
_TFLM_SAMPLES = flags.DEFINE_string("tflm_samples", str(export.DEFAULT_TFLM_SAMPLES), "Samples the TFLM check runs: "
                                    "N drawn with --seed (the manifest's tflm_subset says which), or 'all'.")


def main(argv: list[str]) -> None:
    del argv
    config = export.ExportConfig(
        tflite=_TFLITE.value, output_dir=_OUTPUT.value, target=_TARGET.value, name=_NAME.value,
        labels=_LABELS.value, eval_data=_EVAL.value, eval_key=_EVAL_KEY.value,
        eval_labels_key=_EVAL_LABELS_KEY.value, num_eval_samples=_NUM_EVAL.value, data_spec=_DATA_SPEC.value,
        input_scale=_SCALE.value, input_offset=_OFFSET.value, compress=_COMPRESS.value, vela=_VELA.value,
        seed=_SEED.value, overwrite=_OVERWRITE.value, saved_model_dir=_MODEL.value, keras_model=_KERAS_MODEL.value,
        trust_model=_TRUST_MODEL.value, max_accuracy_drop=_MAX_DROP.value, min_top1_agreement=_MIN_TOP1.value,
        min_output_sqnr_db=_MIN_SQNR.value, opset=_OPSET.value,
        tflm_samples=export.parse_tflm_samples(_TFLM_SAMPLES.value),
    )
    result = export.run_export(config)
    print(onnx_summary(result) if config.target == "onnx" else summary(result))


def onnx_summary(result: export.ExportResult) -> str:
    r = result.manifest
    lines = [f"exported {r['onnx_file']} to {result.output_dir}: {r['onnx_bytes']:,} bytes (the .tflite: "
             f"{r['tflite_bytes']:,}), opset {r['opset']}, {r['input_dtype']} input"]
    for o in r["vs_tflite"]:
        agreement = "" if o["top1_agreement"] is None else f", top-1 agreement {o['top1_agreement']:.4f}"
        lines.append(f"  onnxruntime vs LiteRT, {o['name']}: SQNR {o['sqnr_db']:.1f} dB, max "
                     f"{o['max_abs_error_steps']} step(s){agreement} on {r['samples']}")
    if "accuracy" in r:
        a = r["accuracy"]
        lines.append(f"  accuracy: onnxruntime {a['onnx']:.4f}, LiteRT {a['tflite']:.4f}"
                     + (f", float {a['float']:.4f}" if "float" in a else "")
                     + f"; drop {a['accuracy_drop']:.4f} against {a['reference']}")
    return "\n".join(lines)


def summary(result: export.ExportResult) -> str:
    m = result.manifest
    check = m["tflm_check"]
    lines = [f"exported {m['name']} to {result.output_dir}"]
    lines += [f"  note: {note}" for note in m.get("notes", [])]
    lines.append(f"  flash {m['flash_bytes']:,} bytes, arena {m['arena']['arena_bytes']:,} bytes "
                 f"(recorded {m['arena']['recorded_bytes']:,} + {m['arena']['margin']:.0%})")
    lines.append(f"  TFLM vs {check['reference']}: max {check['max_step_difference']} step(s), top-1 "
                 f"agreement {check['top1_agreement']:.4f} on {check['samples']}")
    phone = m.get("litert_optimized_vs_reference")
    if phone:
        lines.append(f"  LiteRT XNNPACK (phones) vs reference kernels, reported only: max "
                     f"{phone['max_step_difference']} step(s), top-1 agreement {phone['top1_agreement']:.4f}")
    if m.get("compression"):
        c = m["compression"]
        lines.append(f"  compressed: flash {c['flash_bytes_before']:,} -> {c['flash_bytes_after']:,} bytes, "
                     f"arena {c['arena_bytes_before']:,} -> {c['arena_bytes_after']:,} bytes")
    if m.get("vela"):
        v = m["vela"]
        lines.append(f"  vela {v['accelerator']}: {v['npu_ops']} NPU / {v['cpu_ops']} CPU ops, SRAM "
                     f"{v['sram_bytes']:,} bytes, est. {v['inference_seconds'] * 1000:.3f} ms")
    lines.append("  ops: " + ", ".join(m["resolver"]["methods"]))
    return "\n".join(lines)


if __name__ == "__main__":
    _common.run(main)
