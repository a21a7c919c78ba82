"""The convert pipeline: float model on disk in, verified `.tflite` and `report.json` out.

Takes a `ConvertPipelineConfig` (its fields are the flags of `pipelines/convert.py`); returns a
`ConvertPipelineResult` of paths and metrics. Order: check the output location, load the model and data,
convert, verify, then write. A model that fails verification is never written as `model.tflite`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import time

from tfcompress.core.version import __version__
from tfcompress.conversion import calibration
from tfcompress.core.artefacts import prepare_output_dir, remove_if_empty, write_atomic, write_json
from tfcompress.analysis import debug
from tfcompress.targets import export as micro_export
from tfcompress.analysis import report as run_report
from tfcompress.conversion.convert import INTEGER_MODES, ConvertConfig, Mode, convert_and_read
from tfcompress.core.errors import (
    CalibrationDataError,
    ConversionError,
    InputError,
    TfcompressError,
    VerificationError,
)
from tfcompress.core.model_io import load_model, model_source
from tfcompress.core.tflite_model import TfliteModel, weight_sparsity
from tfcompress.conversion.verify import Check, VerificationResult, verify

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

    Accuracies and accuracy drops are fractions in [0, 1].
    """

    output_dir: str
    saved_model_dir: str | None = None
    keras_model: str | None = None
    calibration_data: str | None = None
    calibration_key: str | None = None
    eval_data: str | None = None
    eval_key: str = "x_test"
    eval_labels_key: str = "y_test"
    num_eval_samples: int | None = None
    input_scale: float = 1.0
    input_offset: float = 0.0
    mode: str = Mode.INT8.value
    io_dtype: str | None = None
    num_calibration_samples: int = 500
    max_accuracy_drop: float = 0.01
    seed: int = 0
    target: str | None = None
    latency_runs: int = 200
    debug_layers: bool = True
    overwrite: bool = False

    def __post_init__(self):
        model_source(self.saved_model_dir, self.keras_model)
        check_target(self.target, self.mode)
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
        if self.latency_runs < 0:
            raise ValueError(f"latency_runs must be 0 (skip) or more. Received: latency_runs={self.latency_runs}")
        if self.num_eval_samples is not None and self.num_eval_samples < 1:
            raise ValueError(
                f"num_eval_samples must be at least 1. Received: num_eval_samples={self.num_eval_samples}"
            )
        ConvertConfig(self.mode, self.io_dtype)  # validates mode and io_dtype

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


def run_convert(config: ConvertPipelineConfig) -> ConvertPipelineResult:
    """Converts and verifies one model, writing `model.tflite` and `report.json` to `output_dir`.

    Raises:
        InputError: bad model, data or output location (nothing is written).
        ConversionError: the model cannot be converted in the requested mode (nothing is written).
        VerificationError: a check failed; `report.json` records the failures and no `model.tflite`
            is left in `output_dir`.
    """
    convert_config = ConvertConfig(config.mode, config.io_dtype)
    artefacts = (MODEL_FILENAME, REPORT_FILENAME, run_report.MARKDOWN) + ((MICRO_DIRNAME,) if config.target else ())
    output_dir, created = prepare_output_dir(config.output_dir, artefacts, config.overwrite)
    try:
        return _convert_and_write(config, convert_config, output_dir)
    except (InputError, ConversionError, ValueError):
        if created:
            remove_if_empty(output_dir)
        raise


def _convert_and_write(config: ConvertPipelineConfig, convert_config: ConvertConfig,
                       output_dir: str) -> ConvertPipelineResult:
    model_path = os.path.join(output_dir, MODEL_FILENAME)
    report_path = os.path.join(output_dir, REPORT_FILENAME)
    timings = {}

    start = time.perf_counter()
    model = load_model(config.model_source)
    samples = None
    if convert_config.needs_calibration and config.calibration_data is not None:
        samples = calibration.load_calibration_data(
            config.calibration_data, model.input_shape, key=config.calibration_key,
            num_samples=config.num_calibration_samples, seed=config.seed,
            scale=config.input_scale, offset=config.input_offset,
        ).samples
    elif convert_config.needs_calibration and not model.is_quantization_aware:
        raise CalibrationDataError(
            f"{convert_config.mode.value} mode needs calibration data for {config.model_source}: pass "
            "--calibration_data (an .npz, .npy or image folder drawn from the training split)."
        )
    eval_x = eval_y = None
    if config.eval_data is not None:
        eval_x, eval_y = calibration.load_labelled_data(
            config.eval_data, model.input_shape, key=config.eval_key, labels_key=config.eval_labels_key,
            scale=config.input_scale, offset=config.input_offset, limit=config.num_eval_samples,
        )
    timings["load_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    parsed = convert_and_read(model, convert_config, samples)  # parsed once; every later stage takes it
    timings["convert_seconds"] = time.perf_counter() - start

    start = time.perf_counter()
    result = verify(
        parsed, convert_config.mode, convert_config.io_dtype, float_model=model,
        eval_samples=eval_x, eval_labels=eval_y,
        max_accuracy_drop=config.max_accuracy_drop if eval_x is not None else None,
        raise_on_failure=False,
    )
    timings["verify_seconds"] = time.perf_counter() - start

    firmware = None
    if result.passed and config.target == "micro":
        start = time.perf_counter()
        try:
            firmware = _micro_export(parsed, eval_x, eval_y, result, config)
        except VerificationError as e:
            result = dataclasses.replace(result, checks=result.checks + tuple(
                Check(f.split(":")[0], False, f.split(":", 1)[-1].strip()) for f in e.failures))
        timings["micro_export_seconds"] = time.perf_counter() - start

    report = _report(config, convert_config, parsed, result, samples, timings)
    if result.passed:
        write_atomic(model_path, parsed.data)
        if firmware is not None:
            micro_export.write_micro_export(firmware, os.path.join(output_dir, MICRO_DIRNAME), overwrite=True)
            report["micro"] = firmware.manifest
        write_json(report_path, report)
        _write_debug(config, convert_config, model, samples, output_dir)
        summary = run_report.compute_report(output_dir, latency_runs=config.latency_runs,
                                            parsed={MODEL_FILENAME: parsed})
        run_report.write_report(summary)
        with open(report_path) as f:
            report = json.load(f)
        return ConvertPipelineResult(model_path, report_path, result, parsed.num_bytes, report, parsed)
    # A stale model.tflite (or firmware) from an earlier run must not sit beside a report that says this
    # one failed.
    if os.path.exists(model_path):
        os.unlink(model_path)
    shutil.rmtree(os.path.join(output_dir, MICRO_DIRNAME), ignore_errors=True)
    for name in (run_report.MARKDOWN, run_report.DEBUG_JSON, *run_report.PLOTS):
        if os.path.exists(os.path.join(output_dir, name)):
            os.unlink(os.path.join(output_dir, name))
    write_json(report_path, report)
    raise VerificationError(result.failures, result)


DEBUG_SAMPLES = 100


def _write_debug(config, convert_config, model, samples, output_dir: str) -> None:
    """Per-tensor quantization error (QuantizationDebugger) for the report, where it applies.

    Only post-training int8 with calibration samples: a QAT model has nothing for the debugger to compare.
    A model the debugger cannot handle gets no debug.json; the run itself already passed verification.
    """
    path = os.path.join(output_dir, run_report.DEBUG_JSON)
    if os.path.exists(path):
        os.unlink(path)
    if (not config.debug_layers or convert_config.mode is not Mode.INT8 or samples is None
            or model.is_quantization_aware):
        return
    try:
        result = debug.debug_quantization(model, samples[:DEBUG_SAMPLES])
    except TfcompressError:
        return
    write_json(path, debug.to_json(result))


def _micro_export(parsed: TfliteModel, eval_x, eval_y, result: VerificationResult,
                  config: ConvertPipelineConfig) -> micro_export.MicroExport:
    """Checks the verified model in TFLite Micro and renders its firmware files (written by the caller).

    With labelled evaluation data, TFLM's accuracy is gated against the float model's like LiteRT's.
    """
    inputs, described = micro_export.micro_inputs(parsed, eval_x, config.seed)
    accuracy = result.accuracy
    return micro_export.build_micro_export(
        parsed, inputs, described, name="model", source=MODEL_FILENAME, eval_labels=eval_y,
        float_accuracy=None if accuracy is None else accuracy.float_accuracy,
        max_accuracy_drop=config.max_accuracy_drop if accuracy is not None else None)


def _report(config, convert_config, parsed: TfliteModel, result, samples, timings) -> dict:
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "tool": f"tfcompress {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "verified": result.passed,
        "config": dataclasses.asdict(config) | {"io_dtype": convert_config.io_dtype},
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
        "checks": [dataclasses.asdict(c) for c in result.checks],
        "failures": result.failures,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
