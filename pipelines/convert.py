r"""Convert a SavedModel or Keras model to a verified TFLite model (default: full int8, uint8 I/O).

Example:
  python pipelines/convert.py --saved_model_dir=artefacts/demo/float_savedmodel \
      --calibration_data=calibration_data/mnist_calibration.npz --calibration_key=x \
      --input_scale=0.00392156862745098 --eval_data=data/mnist.npz --output_dir=artefacts/convert

Writes <output_dir>/model.tflite, report.json, report.md and PNG plots (accuracy against size, per-layer
sparsity, per-layer quantization error). Exit codes: 0 verified, 1 verification failed
(no model.tflite is left), 2 bad arguments or input (nothing is written).
"""

from __future__ import annotations

from absl import flags

from pipelines import _common
from tfcompress.runs import pipeline
from tfcompress.conversion import fidelity
from tfcompress.conversion.convert import IO_DTYPES, Mode
from tfcompress.targets import export

_MODEL = flags.DEFINE_string("saved_model_dir", None, "SavedModel directory of the float model.")
_KERAS_MODEL = flags.DEFINE_string("keras_model", None, "A .keras or .h5 model file, tf_keras or Keras 3 "
                                   "(instead of --saved_model_dir).")
_TRUST_MODEL = flags.DEFINE_bool("trust_model", False, "Load a model file even if it holds code (Lambda layers, "
                                  "unregistered custom layers): only for files you trust.")
_CALIBRATION = flags.DEFINE_string("calibration_data", None, "Representative samples: .npz, .npy, a folder "
                                   "of PNG/JPEG images, a class-per-folder image tree or TFRecord files (drawn in "
                                   "one pass by seeded reservoir sampling), from the training split (see "
                                   "calibration_data/README.md). Needed by int8 and int16x8 unless QAT.")
_CALIBRATION_KEY = flags.DEFINE_string("calibration_key", None, "Array name inside a calibration .npz.")
_EVAL = flags.DEFINE_string("eval_data", None, "Held-out evaluation .npz, class-per-folder image tree or TFRecord "
                            "files (streamed in batches): every output of the .tflite is compared with the float "
                            "model on it; with labels, the accuracy check too.")
_DATA_SPEC = flags.DEFINE_string("data_spec", None, "TFRecord sources: the features holding the input and the "
                                 "label, image=KEY,label=KEY (default image=image,label=label).")
_EVAL_KEY = flags.DEFINE_string("eval_key", "x_test", "Samples array inside --eval_data.")
_EVAL_LABELS_KEY = flags.DEFINE_string("eval_labels_key", "y_test", "Labels array inside --eval_data: class "
                                       "indices, or regression targets shaped like an output; empty for none "
                                       "(fidelity gates only).")
_EVAL_OUTPUT = flags.DEFINE_string("eval_output", None, "The output the labels are for, when the model has "
                                   "several.")
_MIN_TOP1 = flags.DEFINE_float("min_top1_agreement", fidelity.DEFAULT_MIN_TOP1_AGREEMENT, "Fidelity gate of "
                               "classifier outputs without labels: top-1 agreement with the float model, a "
                               "fraction.", lower_bound=0.0, upper_bound=1.0)
_MIN_SQNR = flags.DEFINE_float("min_output_sqnr_db", fidelity.DEFAULT_MIN_OUTPUT_SQNR_DB, "Fidelity gate of "
                               "outputs without class labels: SQNR of the .tflite outputs against the float "
                               "model's, in dB.")
_NUM_EVAL = flags.DEFINE_integer("num_eval_samples", None, "Evaluate on the first N samples only "
                                 "(default: all).", lower_bound=1)
_SCALE = flags.DEFINE_float("input_scale", 1.0, "Preprocessing of calibration and evaluation samples: "
                            "model input = raw * input_scale + input_offset.")
_OFFSET = flags.DEFINE_float("input_offset", 0.0, "See --input_scale.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where model.tflite and report.json go.", required=True)
_MODE = flags.DEFINE_enum("mode", Mode.INT8.value, [m.value for m in Mode], "Conversion mode.")
_IO_DTYPE = flags.DEFINE_enum("io_dtype", None, sorted({d for ds in IO_DTYPES.values() for d in ds}),
                              "Input/output dtype (default: uint8 for int8, int16 for int16x8, else "
                              "float32).")
_NUM_CALIBRATION = flags.DEFINE_integer("num_calibration_samples", 500, "Calibration samples to draw.",
                                        lower_bound=1)
_MAX_DROP = flags.DEFINE_float("max_accuracy_drop", 0.01, "Largest allowed top-1 accuracy drop of the "
                               "TFLite model against the float model, a fraction (0.005 = half a point).",
                               lower_bound=0.0, upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for drawing calibration samples.")
_TARGET = flags.DEFINE_enum("target", None, ["micro"], "Also export for microcontrollers: checks the model in "
                            "TFLite Micro and writes <output_dir>/micro/ (C array, op resolver, manifest).")
_LATENCY_RUNS = flags.DEFINE_integer("latency_runs", 200, "Single-thread invokes timed for report.md (in a "
                                     "fresh process); 0 skips the latency measurement.", lower_bound=0)
_DEBUG_LAYERS = flags.DEFINE_bool("debug_layers", False, "Measure per-tensor quantization error with TF's "
                                  "QuantizationDebugger for the report (post-training int8 only; it converts the "
                                  "model twice more). Off unless asked; a run whose checks fail measures it anyway.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing model.tflite and report.json.")
_TFLM_SAMPLES = flags.DEFINE_string("tflm_samples", str(export.DEFAULT_TFLM_SAMPLES), "With --target=micro: "
                                    "samples the TFLM check runs, N drawn with --seed (report.json's "
                                    "micro.tflm_subset says which), or 'all'.")


def main(argv: list[str]) -> None:
    del argv
    config = pipeline.ConvertPipelineConfig(
        output_dir=_OUTPUT.value,
        saved_model_dir=_MODEL.value,
        keras_model=_KERAS_MODEL.value,
        trust_model=_TRUST_MODEL.value,
        calibration_data=_CALIBRATION.value,
        calibration_key=_CALIBRATION_KEY.value,
        data_spec=_DATA_SPEC.value,
        eval_data=_EVAL.value,
        eval_key=_EVAL_KEY.value,
        eval_labels_key=_EVAL_LABELS_KEY.value or None,
        eval_output=_EVAL_OUTPUT.value,
        num_eval_samples=_NUM_EVAL.value,
        min_top1_agreement=_MIN_TOP1.value,
        min_output_sqnr_db=_MIN_SQNR.value,
        input_scale=_SCALE.value,
        input_offset=_OFFSET.value,
        mode=_MODE.value,
        io_dtype=_IO_DTYPE.value,
        num_calibration_samples=_NUM_CALIBRATION.value,
        max_accuracy_drop=_MAX_DROP.value,
        seed=_SEED.value,
        target=_TARGET.value,
        latency_runs=_LATENCY_RUNS.value,
        debug_layers=_DEBUG_LAYERS.value,
        overwrite=_OVERWRITE.value,
        tflm_samples=export.parse_tflm_samples(_TFLM_SAMPLES.value),
    )
    result = pipeline.run_convert(config)
    print(summary(result))


def summary(result: pipeline.ConvertPipelineResult) -> str:
    lines = [f"verified {result.model_path} ({result.num_bytes:,} bytes)"]
    io = result.verification.inputs[0]
    lines.append(f"  input {io['dtype']} {io['shape']} scale={io['scale']} zero_point={io['zero_point']}")
    acc = result.verification.accuracy
    if acc is not None:
        lines.append(
            f"  accuracy float {acc.float_accuracy:.4f} -> tflite {acc.tflite_accuracy:.4f} "
            f"(drop {acc.accuracy_drop:+.4f}, top-1 agreement {acc.top1_agreement:.4f}, "
            f"{acc.num_samples} samples)"
        )
    fid = result.verification.fidelity
    if fid is not None:
        for out in fid.outputs:
            top1 = "" if out.top1_agreement is None else f", top-1 agreement {out.top1_agreement:.4f}"
            lines.append(f"  output {out.name}: SQNR {out.sqnr_db:.1f} dB, max |error| {out.max_abs_error:.4g}"
                         f"{top1} ({fid.num_samples} samples, {fid.source})")
    lines += [f"  note: {note}" for note in result.verification.notes]
    micro = result.report.get("micro")
    if micro:
        lines.append(f"  micro: flash {micro['flash_bytes']:,} bytes, arena {micro['arena']['arena_bytes']:,} "
                     f"bytes, TFLM vs LiteRT reference kernels top-1 agreement "
                     f"{micro['tflm_check']['top1_agreement']:.4f} on {micro['tflm_check']['samples']}")
        lines += [f"  micro note: {note}" for note in micro.get("notes", [])]
    lines.append(f"  report {result.report_path} (and report.md, plots)")
    return "\n".join(lines)


if __name__ == "__main__":
    _common.run(main)
