"""The convert pipeline: float model on disk in, verified `.tflite` and `report.json` out.

Takes a `ConvertPipelineConfig` (its fields are the flags of `pipelines/convert.py`); returns a
`ConvertPipelineResult` of paths and metrics. Order: check the output location, load the model and data,
convert, verify, then write. A model that fails verification is never written as `model.tflite`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import json
import os
import shutil
import time

import numpy as np

from tfcompress.core.version import __version__
from tfcompress.conversion import calibration, datasets, fidelity
from tfcompress.core.artefacts import output_lock, prepare_output_dir, remove_if_empty, write_atomic, write_json
from tfcompress.analysis import debug
from tfcompress.targets import export as micro_export
from tfcompress.analysis import report as run_report
from tfcompress.conversion.convert import INTEGER_MODES, ConvertConfig, Mode, convert_and_read
from tfcompress.core.errors import (
    CalibrationDataError,
    ConversionError,
    InputError,
    MicroTargetError,
    TfcompressError,
    VerificationError,
)
from tfcompress.core.model_io import load_model, model_source
from tfcompress.core.tflite_model import TfliteModel, weight_sparsity
from tfcompress.conversion.verify import Check, VerificationResult, verify
from tfcompress.runs import recipe_format

MODEL_FILENAME = "model.tflite"
MICRO_DIRNAME = "micro"
TARGETS = micro_export.TARGETS
REPORT_FILENAME = "report.json"
REPORT_SCHEMA_VERSION = 1


def check_target(target: str | None, mode: str) -> None:
    """`--target micro` needs a full-integer mode: TFLM has no hybrid kernels and float defeats it."""
    if target is None:
        return
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS} or None. Received: target={target!r}")
    if Mode(mode) not in INTEGER_MODES:
        raise ValueError(
            f"--target {target} needs a full-integer model (--mode int8 or int16x8); --mode {mode} keeps "
            f"float ops that TFLite Micro cannot run. Received: mode={mode!r}"
        )


@dataclasses.dataclass(frozen=True)
class ConvertPipelineConfig:
    """Everything one conversion run needs. Field names equal the command-line flags.

    Accuracies and accuracy drops are fractions in [0, 1]. From the API, `calibration_data` may also be a
    `tf.data.Dataset` of inputs (or `(input, label)` pairs) and `eval_data` one of `(input, label)` pairs (inputs
    alone with `eval_labels_key=""`): streamed like a TFRecord file, and recorded as `<tf.data.Dataset>` in
    `recipe.yaml` and `report.json` (`recipe_format.DATASET`).
    """

    output_dir: str
    saved_model_dir: str | None = None
    keras_model: str | None = None
    trust_model: bool = False  # load model files that hold code (Lambda, unregistered custom layers)
    calibration_data: str | None = None
    calibration_key: str | None = None
    # The TFRecord features that hold the input and the label ("image=KEY,label=KEY"; datasets.parse_data_spec)
    data_spec: str | None = None
    eval_data: str | None = None
    eval_key: str = "x_test"
    eval_labels_key: str | None = "y_test"  # None or "": no labels, fidelity gates only
    eval_output: str | None = None
    num_eval_samples: int | None = None
    min_top1_agreement: float = fidelity.DEFAULT_MIN_TOP1_AGREEMENT
    min_output_sqnr_db: float = fidelity.DEFAULT_MIN_OUTPUT_SQNR_DB
    # Calibration-source samples set aside for the fidelity check when there is no evaluation data. None:
    # HELD_OUT_SAMPLES without eval data, none with it; 0: none (the run then compares nothing).
    held_out_samples: int | None = None
    input_scale: float = 1.0
    input_offset: float = 0.0
    mode: str = Mode.INT8.value
    io_dtype: str | None = None
    num_calibration_samples: int = 500
    max_accuracy_drop: float = 0.01
    seed: int = 0
    target: str | None = None
    latency_runs: int = 200
    # The QuantizationDebugger converts the model twice more: run when asked, and when a gate fails (its
    # per-tensor error then shows where the int8 model lost).
    debug_layers: bool = False
    overwrite: bool = False
    # Samples the TFLM check of --target micro runs (drawn with `seed`); None: every one.
    tflm_samples: int | None = micro_export.DEFAULT_TFLM_SAMPLES

    def __post_init__(self):
        model_source(self.saved_model_dir, self.keras_model)
        check_target(self.target, self.mode)
        datasets.parse_data_spec(self.data_spec)
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ValueError(
                "max_accuracy_drop is a fraction in [0, 1] (0.005 is half a percentage point). "
                f"Received: max_accuracy_drop={self.max_accuracy_drop}"
            )
        if self.num_calibration_samples < 1:
            raise ValueError(
                "num_calibration_samples must be at least 1 (100-500 is typical). "
                f"Received: num_calibration_samples={self.num_calibration_samples}"
            )
        if not 0.0 <= self.min_top1_agreement <= 1.0:
            raise ValueError(
                "min_top1_agreement is a fraction in [0, 1] (0.97 is the default). "
                f"Received: min_top1_agreement={self.min_top1_agreement}"
            )
        if self.latency_runs < 0:
            raise ValueError(f"latency_runs must be 0 (skip) or more. Received: latency_runs={self.latency_runs}")
        if self.num_eval_samples is not None and self.num_eval_samples < 1:
            raise ValueError(
                f"num_eval_samples must be at least 1. Received: num_eval_samples={self.num_eval_samples}"
            )
        ConvertConfig(self.mode, self.io_dtype)  # validates mode and io_dtype
        micro_export.check_tflm_samples(self.tflm_samples)

    @property
    def model_source(self) -> str:
        return model_source(self.saved_model_dir, self.keras_model)


@dataclasses.dataclass(frozen=True)
class ConvertPipelineResult:
    model_path: str | None
    report_path: str
    verification: VerificationResult
    num_bytes: int
    report: dict
    tflite: TfliteModel | None = dataclasses.field(default=None, repr=False)
    """The verified model as parsed once by the run (its `.data` is `model.tflite`'s bytes)."""


def run_convert(config: ConvertPipelineConfig, converted: TfliteModel | None = None) -> ConvertPipelineResult:
    """Converts and verifies one model, writing `model.tflite` and `report.json` to `output_dir`.

    Args:
        config: the run's settings.
        converted: the `.tflite` an earlier `run_convert` made from this very model, mode and calibration
            data (the optimize run's candidates): verified and written here exactly like a fresh
            conversion, which it replaces. The conversion is deterministic, so only the time differs.

    Raises:
        InputError: bad model, data or output location (nothing is written); `OutputPathError` also when
            another run holds `output_dir`, or the disk is full (no partial file is left at a final path).
        ConversionError: the model cannot be converted in the requested mode (nothing is written).
        VerificationError: a check failed; `report.json` records the failures and no `model.tflite`
            is left in `output_dir`.
    """
    convert_config = ConvertConfig(config.mode, config.io_dtype)
    artefacts = (MODEL_FILENAME, REPORT_FILENAME, run_report.MARKDOWN) + ((MICRO_DIRNAME,) if config.target else ())
    output_dir, created = prepare_output_dir(config.output_dir, artefacts, config.overwrite)
    try:
        with output_lock(output_dir, "tfcompress convert"), \
                recipe_format.recorded("convert", config, output_dir):  # a second run on this directory refuses
            return _convert_and_write(config, convert_config, output_dir, converted)
    except (InputError, ConversionError, ValueError):
        if created:
            remove_if_empty(output_dir)
        raise


def _convert_and_write(config: ConvertPipelineConfig, convert_config: ConvertConfig, output_dir: str,
                       converted: TfliteModel | None) -> ConvertPipelineResult:
    model_path = os.path.join(output_dir, MODEL_FILENAME)
    report_path = os.path.join(output_dir, REPORT_FILENAME)
    timings = {}

    start = time.perf_counter()
    model = load_model(config.model_source, trust_model=config.trust_model)
    samples = held_out = None
    if config.calibration_data is not None and (convert_config.needs_calibration or config.eval_data is None):
        # Without evaluation data, calibration-source samples that calibration does not use are held out,
        # so the .tflite is still compared with the float model on inputs it was not calibrated on.
        loaded = datasets.load_calibration_data(
            config.calibration_data, model.input_shape, key=config.calibration_key,
            num_samples=config.num_calibration_samples, seed=config.seed,
            scale=config.input_scale, offset=config.input_offset,
            num_held_out=_num_held_out(config), spec=config.data_spec,
        )
        samples = loaded.samples if convert_config.needs_calibration else None
        held_out = loaded.held_out
    elif convert_config.needs_calibration and not model.is_quantization_aware:
        raise CalibrationDataError(
            f"{convert_config.mode.value} mode needs calibration data for {config.model_source}: pass "
            "--calibration_data (an .npz, .npy or image folder drawn from the training split)."
        )
    eval_x = eval_y = eval_batches = streamed = None
    samples_source = "evaluation data"
    if config.eval_data is not None and datasets.is_streamed(config.eval_data, labelled=bool(config.eval_labels_key)):
        streamed = _eval_stream(config, model)
        eval_batches = streamed.batches()
        samples_source = f"evaluation data {_described(config.eval_data)}"
    elif config.eval_data is not None:
        eval_x, eval_y = calibration.load_eval_data(
            config.eval_data, model.input_shape, key=config.eval_key, labels_key=config.eval_labels_key,
            scale=config.input_scale, offset=config.input_offset, limit=config.num_eval_samples,
        )
        if config.eval_labels_key and config.eval_labels_key == config.eval_key:
            eval_y = eval_x  # an autoencoder's targets are its inputs, preprocessed like them
        samples_source = f"evaluation data {config.eval_data}"
    elif held_out is not None:
        if len(held_out) < fidelity.MIN_FIDELITY_SAMPLES:
            raise CalibrationDataError(
                f"Comparing the .tflite with the float model needs at least {fidelity.MIN_FIDELITY_SAMPLES} "
                f"held-out samples, but {config.calibration_data} leaves only {len(held_out)} after calibration: "
                "pass --eval_data, or calibration data with more samples."
            )
        eval_x = held_out
        samples_source = (f"{len(held_out)} calibration-source samples not used for calibration "
                          f"({config.calibration_data})")
    timings["load_seconds"] = time.perf_counter() - start

    # The float model's outputs on the evaluation samples do not depend on the conversion: computed in a thread
    # while the converter runs (the converter and its calibration keep one core busy, the float model the other).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        reference = (pool.submit(_float_reference, model, eval_x)
                     if eval_x is not None and len(eval_x) >= fidelity.MIN_FIDELITY_SAMPLES else None)
        parsed = converted
        if parsed is None:
            start = time.perf_counter()
            # Parsed once; every later stage takes it. calibration_seconds is part of convert_seconds.
            parsed = convert_and_read(model, convert_config, samples, timings)
            timings["convert_seconds"] = time.perf_counter() - start
        float_outputs = None
        if reference is not None:
            start = time.perf_counter()
            float_outputs, timings["float_reference_seconds"] = reference.result()
            timings["float_reference_wait_seconds"] = time.perf_counter() - start  # what the converter did not hide

    start = time.perf_counter()
    result = verify(
        parsed, convert_config.mode, convert_config.io_dtype, float_model=model, float_outputs=float_outputs,
        eval_samples=eval_x, eval_labels=eval_y,
        max_accuracy_drop=(config.max_accuracy_drop if eval_y is not None or (eval_batches is not None and
                                                                               config.eval_labels_key) else None),
        raise_on_failure=False, eval_output=config.eval_output, samples_source=samples_source,
        min_top1_agreement=config.min_top1_agreement, min_output_sqnr_db=config.min_output_sqnr_db,
        eval_batches=eval_batches,
    )
    timings["verify_seconds"] = time.perf_counter() - start

    firmware = None
    if result.passed and config.target == "micro":
        start = time.perf_counter()
        try:
            firmware = _micro_export(parsed, eval_x, eval_y, samples, result, config, model, streamed)
        except VerificationError as e:
            result = dataclasses.replace(result, checks=result.checks + tuple(
                Check(f.split(":")[0], False, f.split(":", 1)[-1].strip()) for f in e.failures))
        timings["micro_export_seconds"] = time.perf_counter() - start

    report = _report(config, convert_config, parsed, result, samples, timings)
    report["input_model"] = {"source": model.source, "kind": model.kind, "keras_version": model.keras_version}
    if result.passed:
        write_atomic(model_path, parsed.data)
        if firmware is not None:
            micro_export.write_micro_export(firmware, os.path.join(output_dir, MICRO_DIRNAME), overwrite=True)
            report["micro"] = firmware.manifest
        start = time.perf_counter()
        debugged = _write_debug(config, convert_config, model, samples, output_dir, asked=config.debug_layers)
        if debugged:
            timings["debug_seconds"] = time.perf_counter() - start
        report["not_run"] = _not_run(config, debugged)
        write_json(report_path, report)
        start = time.perf_counter()
        summary = run_report.compute_report(output_dir, latency_runs=config.latency_runs,
                                            parsed={MODEL_FILENAME: parsed})
        run_report.write_report(summary)
        timings["report_seconds"] = time.perf_counter() - start
        with open(report_path) as f:
            report = json.load(f)
        report["timings"] = {k: round(v, 3) for k, v in timings.items()}
        write_json(report_path, report)
        return ConvertPipelineResult(model_path, report_path, result, parsed.num_bytes, report, parsed)
    # A stale model.tflite (or firmware) from an earlier run must not sit beside a report that says this
    # one failed.
    if os.path.exists(model_path):
        os.unlink(model_path)
    shutil.rmtree(os.path.join(output_dir, MICRO_DIRNAME), ignore_errors=True)
    for name in (run_report.MARKDOWN, run_report.DEBUG_JSON, *run_report.PLOTS):
        if os.path.exists(os.path.join(output_dir, name)):
            os.unlink(os.path.join(output_dir, name))
    # A gate failed: the per-tensor quantization error shows where (debug.json, `tfcompress debug`'s form).
    if _write_debug(config, convert_config, model, samples, output_dir, asked=True):
        report["debug"] = f"{run_report.DEBUG_JSON}: per-tensor quantization error, measured because a check failed"
    write_json(report_path, report)
    raise VerificationError(result.failures, result)


def _eval_stream(config: ConvertPipelineConfig, model) -> datasets.EvalData:
    """Evaluation data streamed from an image tree, TFRecords or a tf.data.Dataset: memory bounded by the batch.

    The source is opened (and its spec checked) now, so that bad data fails before conversion.
    """
    return datasets.open_eval_data(config.eval_data, model.input_shape, key=config.eval_key,
                                   labels_key=config.eval_labels_key, scale=config.input_scale,
                                   offset=config.input_offset, limit=config.num_eval_samples, spec=config.data_spec)


def _described(data) -> str:
    return "<tf.data.Dataset>" if not isinstance(data, (str, os.PathLike)) else str(data)


def _float_reference(model, samples: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
    """Every float output on `samples` by name, and the seconds it took (in the converter's shadow)."""
    start = time.perf_counter()
    return model.predict_all(samples), time.perf_counter() - start


def _num_held_out(config: ConvertPipelineConfig) -> int:
    if config.held_out_samples is not None:
        return config.held_out_samples
    return 0 if config.eval_data is not None else HELD_OUT_SAMPLES


DEBUG_SAMPLES = 100
# Calibration-source samples held out for the fidelity check when there is no evaluation data (at most a
# fifth of the source: 100 of the 500 shipped MNIST calibration images).
HELD_OUT_SAMPLES = 200


def _write_debug(config, convert_config, model, samples, output_dir: str, asked: bool) -> bool:
    """Per-tensor quantization error (QuantizationDebugger) for the report, where it applies and is `asked`;
    True where debug.json was written.

    Only post-training int8 with calibration samples: a QAT model has nothing for the debugger to compare.
    A model the debugger cannot handle gets no debug.json; the run itself already passed verification.
    """
    path = os.path.join(output_dir, run_report.DEBUG_JSON)
    if os.path.exists(path):
        os.unlink(path)
    if not asked or not _debuggable(convert_config, model, samples):
        return False
    try:
        result = debug.debug_quantization(model, samples[:DEBUG_SAMPLES])
    except TfcompressError:
        return False
    write_json(path, debug.to_json(result))
    return True


def _debuggable(convert_config, model, samples) -> bool:
    return convert_config.mode is Mode.INT8 and samples is not None and not model.is_quantization_aware


def _not_run(config: ConvertPipelineConfig, debugged: bool) -> list[str]:
    """What this run left out, for the report to say so."""
    missing = []
    if not debugged:
        missing.append("per-tensor quantization error (QuantizationDebugger): " + (
            "not asked; --debug_layers runs it (it converts the model twice more)" if not config.debug_layers
            else "asked, but it applies only to post-training int8 with calibration data, or the debugger failed"))
    if config.latency_runs == 0:
        missing.append("latency: --latency_runs=0")
    return missing


def _micro_export(parsed: TfliteModel, eval_x, eval_y, calibration_samples, result: VerificationResult,
                  config: ConvertPipelineConfig, float_model, streamed: datasets.EvalData | None = None
                  ) -> micro_export.MicroExport:
    """Checks the verified model in TFLite Micro and renders its firmware files (written by the caller).

    The check runs on the evaluation samples; without them on the calibration samples, inputs like those
    the model will see (measured on the zoo's two-output model: its digit softmax 9 steps off with 200
    random inputs, over its tolerance of 7; 0 with its calibration samples), and on random inputs only
    where there are neither. With labelled evaluation data, TFLM's accuracy is gated
    against the float model's like LiteRT's, on the same samples: where `config.tflm_samples` draws a subset,
    the float model's accuracy is measured again on it.
    """
    # tflite-micro aborts its process on some models LiteRT runs (MobileNetV2: SIGABRT in its Interpreter
    # constructor): a child process allocates the model first, so such a model is refused in one line.
    micro_export.check_user_file_in_tflm(
        parsed, "The converted model", error=MicroTargetError,
        fix=f"this tflite-micro build ({micro_export.tflm_version()}) cannot run it; the LiteRT model is verified: "
            "drop --target=micro, or check the model on the device's own TFLM build.")
    if streamed is not None:
        return _streamed_micro_export(parsed, streamed, result, config, float_model)
    if config.eval_data is None and calibration_samples is not None:
        inputs, described = micro_export.micro_inputs(parsed, calibration_samples, kind="calibration")
    elif config.eval_data is None and eval_x is not None:  # held-out calibration-source samples
        inputs, described = micro_export.micro_inputs(parsed, eval_x, kind="held-out calibration-source")
    else:
        inputs, described = micro_export.micro_inputs(parsed, eval_x, config.seed)
    accuracy = result.accuracy
    classes = None
    if accuracy is not None and len(parsed.outputs) == 1:  # class labels of the one output
        classes = np.asarray(eval_y)
        if classes.ndim == 2:
            classes = classes[:, 0] if classes.shape[1] == 1 else classes.argmax(axis=1)
    float_accuracy = None if accuracy is None else accuracy.float_accuracy
    indices = micro_export.tflm_subset(len(inputs), config.tflm_samples, config.seed)
    inputs, classes, described, subset = micro_export.take_tflm_subset(inputs, classes, described,
                                                                       config.tflm_samples, config.seed)
    if subset is not None and classes is not None:
        float_outputs = float_model.predict(eval_x[indices])
        float_accuracy = float(np.mean(fidelity.predicted_classes(float_outputs) == classes))
    return micro_export.build_micro_export(
        parsed, inputs, described, name="model", source=MODEL_FILENAME, eval_labels=classes,
        float_accuracy=float_accuracy, max_accuracy_drop=config.max_accuracy_drop if classes is not None else None,
        subset=subset)


def _streamed_micro_export(parsed: TfliteModel, data: datasets.EvalData, result: VerificationResult,
                           config: ConvertPipelineConfig, float_model) -> micro_export.MicroExport:
    """`_micro_export` on streamed evaluation data: the `tflm_samples` subset gathered in one pass, or every
    sample run in TFLM batch by batch (`export.tflm_check_inputs`); TFLM's accuracy gated like LiteRT's."""
    inputs, classes, floats, described, subset = micro_export.tflm_check_inputs(parsed, data, config.tflm_samples,
                                                                               config.seed)
    accuracy = result.accuracy
    gated = accuracy is not None and len(parsed.outputs) == 1 and data.labelled
    float_accuracy = None if not gated else accuracy.float_accuracy
    if gated and subset is not None:  # the float model measured again on the subset
        float_accuracy = float(np.mean(fidelity.predicted_classes(float_model.predict(floats)) == classes))
    elif not gated:
        classes = None
        if isinstance(inputs, micro_export.StreamedInputs):
            inputs = dataclasses.replace(inputs, use_labels=False)
    return micro_export.build_micro_export(
        parsed, inputs, described, name="model", source=MODEL_FILENAME, eval_labels=classes,
        float_accuracy=float_accuracy, max_accuracy_drop=config.max_accuracy_drop if gated else None,
        subset=subset)


def _report(config, convert_config, parsed: TfliteModel, result, samples, timings) -> dict:
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool": f"tfcompress {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "verified": result.passed,
        "config": recipe_format.plain_config(config) | {"io_dtype": convert_config.io_dtype},
        "model": {
            "file": MODEL_FILENAME if result.passed else None,
            "bytes": parsed.num_bytes,
            "sha256": parsed.sha256,
            "ops": result.ops,
            "weight_sparsity": weight_sparsity(parsed),
            "inputs": list(result.inputs),
            "outputs": list(result.outputs),
        },
        "num_calibration_samples_used": 0 if samples is None else int(len(samples)),
        "accuracy": None if result.accuracy is None else dataclasses.asdict(result.accuracy),
        "fidelity": None if result.fidelity is None else dataclasses.asdict(result.fidelity),
        "target_error": result.target_error,
        "checks": [dataclasses.asdict(c) for c in result.checks],
        "failures": result.failures,
        "notes": list(result.notes),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
