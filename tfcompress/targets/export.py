"""Export stage: a verified integer `.tflite` in, firmware files for TensorFlow Lite Micro out.

Takes the flatbuffer and samples to check it with; runs it in TFLM (`tfcompress.targets.micro`), and returns
the files a microcontroller build needs: `<name>_model_data.h/.cc` (the model as an aligned C array),
`<name>_op_resolver.h` (a `MicroMutableOpResolver` with exactly the ops the model uses), `<name>.tflite`
and `manifest.json` (shapes, quantization, ops, arena and flash bytes, the TFLM check of every output).
One input, any number of outputs. Nothing is written unless every check passed, and each file lands whole.
"""

from __future__ import annotations

import dataclasses
import itertools
import keyword
import os
import re
import time

import numpy as np

from tfcompress.core.version import __version__
from tfcompress.conversion import datasets, fidelity
from tfcompress.targets import arena_probe, micro, tflm_check
from tfcompress.core.artefacts import output_lock, prepare_output_dir, remove_if_empty, write_atomic, write_json
from tfcompress.core import litert_probe
from tfcompress.core.errors import InputError, MicroTargetError, ModelLoadError, VerificationError
from tfcompress.core.tflite_model import Tensor, TfliteModel, TfliteSource, read_tflite
from tfcompress.targets.tflm_inputs import (  # noqa: F401  (re-exported: the export's public names)
    DEFAULT_RANDOM_SAMPLES,
    DEFAULT_TFLM_SAMPLES,
    StreamedInputs,
    check_tflm_samples,
    micro_inputs,
    parse_tflm_samples,
    take_tflm_subset,
    tflm_check_inputs,
    tflm_subset,
)

MANIFEST_SCHEMA_VERSION = 1
TARGETS = ("micro", "onnx")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# C and C++ keywords that Python's keyword list lacks; a model array may not be named after one.
_CPP_KEYWORDS = frozenset(
    "alignas alignof asm auto bool break case catch char char16_t char32_t class const constexpr "
    "const_cast continue decltype default delete do double dynamic_cast else enum explicit export "
    "extern false float for friend goto if inline int long mutable namespace new noexcept nullptr "
    "operator private protected public register reinterpret_cast return short signed sizeof static "
    "static_assert static_cast struct switch template this thread_local throw true try typedef typeid "
    "typename union unsigned using virtual void volatile wchar_t while".split()
)


@dataclasses.dataclass(frozen=True)
class MicroExport:
    """The files of one export, by file name, and the manifest written among them."""

    name: str
    files: dict[str, bytes]
    manifest: dict


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What `run_export` (`tfcompress export`) needs; field names equal the flag names."""

    tflite: str
    output_dir: str
    target: str = "micro"
    name: str | None = None
    labels: str | None = None
    eval_data: str | None = None
    eval_key: str = "x_test"
    eval_labels_key: str = "y_test"
    num_eval_samples: int | None = None
    # The TFRecord features that hold the input and the label ("image=KEY,label=KEY"; datasets.parse_data_spec)
    data_spec: str | None = None
    input_scale: float = 1.0
    input_offset: float = 0.0
    compress: bool = False
    vela: bool = False
    seed: int = 0
    overwrite: bool = False
    # --target onnx only: the float model to compare with, the gates (fractions in [0, 1]; dB), the ONNX opset.
    saved_model_dir: str | None = None
    keras_model: str | None = None
    trust_model: bool = False
    max_accuracy_drop: float = 0.01
    min_top1_agreement: float = fidelity.DEFAULT_MIN_TOP1_AGREEMENT
    min_output_sqnr_db: float = fidelity.DEFAULT_MIN_OUTPUT_SQNR_DB
    opset: int = 17
    tflm_samples: int | None = DEFAULT_TFLM_SAMPLES  # None: every sample

    def __post_init__(self):
        datasets.parse_data_spec(self.data_spec)
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}. Received: target={self.target!r}")
        if self.target == "onnx":
            given = [f"--{n}" for n in ("compress", "vela", "labels") if getattr(self, n)]
            if given:
                raise ValueError(f"{', '.join(given)} belong(s) to --target=micro; the ONNX export takes neither. "
                                 f"Drop {', '.join(given)}, or export with --target=micro.")
            if self.saved_model_dir and self.keras_model:
                raise ValueError("Give at most one float model: --saved_model_dir or --keras_model. Received both.")
            for name in ("max_accuracy_drop", "min_top1_agreement"):
                if not 0.0 <= getattr(self, name) <= 1.0:
                    raise ValueError(f"{name} is a fraction in [0, 1] (0.005 is half a point). "
                                     f"Received: {name}={getattr(self, name)}")
            if not 13 <= self.opset <= 18:
                raise ValueError(f"opset is an ONNX opset tf2onnx 1.17 writes, 13 to 18. Received: opset={self.opset}")
        else:
            given = [f"--{n}" for n in ("saved_model_dir", "keras_model") if getattr(self, n)]
            if given:
                raise ValueError(f"{', '.join(given)} is the float model the ONNX export compares with: pass "
                                 "--target=onnx, or drop it (the micro export checks TFLM against LiteRT).")
        check_tflm_samples(self.tflm_samples)


@dataclasses.dataclass(frozen=True)
class ExportResult:
    output_dir: str
    files: tuple[str, ...]
    manifest: dict


def c_name(name: str | None, source: str) -> tuple[str, str | None]:
    """The C identifier for the model array, and a note when it was derived and had to change.

    An explicit `name` must already be a valid identifier (an `InputError` suggests one); without one,
    the file name's stem is sanitised.
    """
    if name is not None:
        if not _IDENTIFIER.match(name) or name in _CPP_KEYWORDS or keyword.iskeyword(name):
            suggestion = _sanitise(name)
            raise InputError(
                f"--name {name!r} is not a valid C identifier (letters, digits and underscores, not "
                f"starting with a digit, not a keyword). Pass e.g. --name={suggestion}."
            )
        return name, None
    stem = os.path.splitext(os.path.basename(source))[0] or "model"
    sanitised = _sanitise(stem)
    note = None if sanitised == stem else f"name {stem!r} is not a C identifier; using {sanitised!r}"
    return sanitised, note


def _sanitise(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", text).strip("_") or "model"
    if name[0].isdigit():
        name = "model_" + name
    if name in _CPP_KEYWORDS or keyword.iskeyword(name):
        name += "_model"
    return name


def build_micro_export(flatbuffer: TfliteSource, inputs: np.ndarray | StreamedInputs, samples: str, *, name: str,
                       labels: list[str] | None = None, compress: bool = False,
                       source: str = "the model", eval_labels: np.ndarray | None = None,
                       float_accuracy: float | None = None,
                       max_accuracy_drop: float | None = None, subset: dict | None = None) -> MicroExport:
    """Checks the model in TFLM and renders the firmware files (nothing is written here).

    `inputs` are the check's inputs in the model's input dtype, or a `StreamedInputs` run batch by batch (its
    labels, where the source has them, are `eval_labels`).

    Every output is compared with LiteRT's reference kernels in its own quantized steps; top-1 agreement
    is gated on classifier outputs (`tflm_check.classifier_outputs`: a SOFTMAX's, and the first output where
    `labels` or `eval_labels` are given, which both describe the first output). With `eval_labels`
    (class indices of `inputs`), TFLM's own top-1 accuracy is measured; with `float_accuracy` and
    `max_accuracy_drop` too, it is gated like LiteRT's: at most that drop below float.

    Raises:
        MicroTargetError: float, hybrid or custom ops, an input TFLM needs constant computed at run time,
            a kernel TFLM refuses the model with, or nothing to compress with `compress`.
        InputError: more than one input, or labels that do not fit the first output.
        VerificationError: TFLM disagrees with LiteRT beyond the tolerance, or the compressed model
            does not reproduce the uncompressed one exactly.
    """
    start = time.perf_counter()
    model = read_tflite(flatbuffer)
    flatbuffer = model.data
    micro.check_micro_compatible(model, source)
    _check_single_input(model, source)
    labels = _check_labels(labels, model)
    streamed = isinstance(inputs, StreamedInputs)
    streamed_labels: list[np.ndarray] = []
    chunks = inputs.chunks(streamed_labels) if streamed else iter([inputs])
    first = next(chunks)
    one_input = first[:1].copy()
    arena = micro.measure_arena(model, one_input)
    classifiers = tflm_check.classifier_outputs(model, labelled=eval_labels is not None or labels is not None or (
        streamed and inputs.labelled))
    # Run with the reported arena, in worker processes on every core while LiteRT runs here; a streamed source
    # batch by batch.
    tflm_outputs, comparison = micro.check_against_litert(model, itertools.chain([first], chunks),
                                                          arena.arena_bytes, samples, classifiers)
    del first
    if streamed_labels:
        eval_labels = np.concatenate(streamed_labels)
    failures = list(comparison.failures)
    tflm_accuracy = None
    if eval_labels is not None:  # class labels of the first output
        tflm_accuracy = {"num_samples": int(len(eval_labels)), "tflm_accuracy": float(np.mean(
            tflm_outputs[0].reshape(len(tflm_outputs[0]), -1).argmax(1) == np.asarray(eval_labels)))}
        if float_accuracy is not None and max_accuracy_drop is not None:
            drop = float_accuracy - tflm_accuracy["tflm_accuracy"]
            tflm_accuracy |= {"float_accuracy": float_accuracy, "accuracy_drop": drop,
                              "max_accuracy_drop": max_accuracy_drop}
            if drop > max_accuracy_drop + 1e-12:
                failures.append(f"tflm_accuracy_drop: float {float_accuracy:.4f}, TFLM "
                                f"{tflm_accuracy['tflm_accuracy']:.4f}, drop {drop:.4f} (limit "
                                f"{max_accuracy_drop:.4f}) on {len(eval_labels)} samples")
    if failures:
        raise VerificationError(failures)
    shipped, shipped_model, compression = flatbuffer, model, None
    if compress:
        lut = micro.lut_compress(model)
        shipped = lut.flatbuffer
        shipped_model = read_tflite(shipped)
        arena_before, arena = arena, micro.measure_arena(shipped_model, one_input)
        exact = micro.compare_tflm_exact(shipped_model, inputs.chunks() if streamed else inputs, arena.arena_bytes,
                                         tflm_outputs, samples)
        if not exact.passed:
            raise VerificationError(exact.failures)
        compression = {
            "method": "lut (tflite_micro.compression, per-channel tables, DECODE ops)",
            "flash_bytes_before": len(flatbuffer),
            "flash_bytes_after": len(shipped),
            "arena_bytes_before": arena_before.arena_bytes,
            "arena_bytes_after": arena.arena_bytes,
            "tensors": [dataclasses.asdict(t) for t in lut.tensors],
            "tflm_exact_check": dataclasses.asdict(exact),
        }
    calls = micro.resolver_calls(shipped_model)
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "generator": f"tfcompress {__version__}",
        "name": name,
        "source": source,
        "sha256": shipped_model.sha256,
        "flash_bytes": len(shipped),
        "arena": dataclasses.asdict(arena),
        "inputs": [_tensor_info(shipped_model.tensors[i]) for i in shipped_model.inputs],
        "outputs": [_tensor_info(shipped_model.tensors[i]) for i in shipped_model.outputs],
        "labels": labels,
        "ops": shipped_model.op_counts(),
        "resolver": {"methods": calls, "op_count": len(calls)},
        # The first output's checks (the only one's, for most models); every output's in output_checks.
        "tflm_check": dataclasses.asdict(comparison.checks[0]),
        # Reported, not gated: the phone runtime's optimized kernels against the reference arithmetic.
        "litert_optimized_vs_reference": dataclasses.asdict(comparison.phone[0]),
        "output_checks": [{"output": check.output, "tensor": model.tensors[index].name,
                           "top1_gated": position in classifiers, "tflm_check": dataclasses.asdict(check),
                           "litert_optimized_vs_reference": dataclasses.asdict(phone)}
                          for position, (index, check, phone) in enumerate(
                              zip(model.outputs, comparison.checks, comparison.phone))],
        "notes": list(comparison.notes),
        "tflm_accuracy": tflm_accuracy,
        "tflm_subset": subset,
        "compression": compression,
        "tflite_micro_version": tflm_version(),
    }
    files = {
        f"{name}_model_data.h": _model_header(name, shipped_model, arena, labels).encode(),
        f"{name}_model_data.cc": _model_source(name, shipped).encode(),
        f"{name}_op_resolver.h": _resolver_header(name, calls).encode(),
        f"{name}.tflite": shipped,
    }
    manifest["files"] = sorted([*files, "manifest.json"])
    manifest["export_seconds"] = round(time.perf_counter() - start, 3)
    return MicroExport(name=name, files=files, manifest=manifest)


def write_micro_export(export: MicroExport, output_dir: str, overwrite: bool = False,
                       extra: dict | None = None) -> tuple[str, ...]:
    """Writes every file of `export` (each atomically) and `manifest.json`; returns their paths."""
    output_dir, _ = prepare_output_dir(output_dir, (*export.files, "manifest.json"), overwrite)
    paths = []
    for filename, data in export.files.items():
        path = os.path.join(output_dir, filename)
        write_atomic(path, data)
        paths.append(path)
    manifest_path = os.path.join(output_dir, "manifest.json")
    write_json(manifest_path, {**export.manifest, **(extra or {})})
    return (*paths, manifest_path)


def run_export(config: ExportConfig) -> ExportResult:
    """`tfcompress export`: reads `config.tflite`, checks it in TFLM, writes the firmware files (with
    `target="onnx"`: converts it to ONNX, checks it in onnxruntime, writes `<name>.onnx`)."""
    if config.target == "onnx":
        from tfcompress.targets import onnx_export

        return ExportResult(*onnx_export.run_onnx_export(config))
    # A clear ModelLoadError for a missing, non-flatbuffer or corrupt file, and for one that crashes LiteRT
    # or TFLM: both run it once in a child process before this process does.
    model = litert_probe.read_user_tflite(config.tflite)
    _check_input_shape(model, config.tflite)
    check_user_file_in_tflm(model, config.tflite)
    name, note = c_name(config.name, config.tflite)
    labels = _read_labels(config.labels) if config.labels else None
    files = (f"{name}_model_data.h", f"{name}_model_data.cc", f"{name}_op_resolver.h", f"{name}.tflite",
             "manifest.json") + ((f"{name}_vela.tflite",) if config.vela else ())
    output_dir, created = prepare_output_dir(config.output_dir, files, config.overwrite)
    try:
        with output_lock(output_dir, "tfcompress export"):  # a second run on this directory refuses
            return _export(config, model, name, note, labels, output_dir)
    except BaseException:
        if created:
            remove_if_empty(output_dir)
        raise


def _export(config: ExportConfig, model: TfliteModel, name: str, note: str | None, labels: list[str] | None,
            output_dir: str) -> ExportResult:
    if config.eval_data is not None:
        shape = (None, *model.tensors[model.inputs[0]].shape[1:])
        data = datasets.open_eval_data(
            config.eval_data, shape, key=config.eval_key, labels_key=config.eval_labels_key,
            scale=config.input_scale, offset=config.input_offset, limit=config.num_eval_samples,
            spec=config.data_spec)
        inputs, sample_labels, _, described, subset = tflm_check_inputs(model, data, config.tflm_samples,
                                                                        config.seed)
    else:
        inputs, described = micro_inputs(model, None, config.seed)
        inputs, sample_labels, described, subset = take_tflm_subset(inputs, None, described,
                                                                    config.tflm_samples, config.seed)
    export = build_micro_export(model, inputs, described, name=name, labels=labels,
                                compress=config.compress, source=config.tflite, eval_labels=sample_labels,
                                subset=subset)
    extra = {"notes": export.manifest["notes"] + ([note] if note else [])}
    if config.vela:
        from tfcompress.targets import vela

        extra["vela"] = dataclasses.asdict(vela.compile_for_ethos_u(export.files[f"{name}.tflite"],
                                                                    output_dir, name))
    paths = write_micro_export(export, output_dir, overwrite=True, extra=extra)
    return ExportResult(output_dir, paths, {**export.manifest, **extra})


# The most elements one input sample may hold: far past any microcontroller's RAM (the check inputs are
# built on the host, 200 samples at a time, so a corrupt shape must not reach numpy).
MAX_INPUT_ELEMENTS = 1 << 24


def _check_input_shape(model: TfliteModel, source: str) -> None:
    if len(model.inputs) != 1:
        return  # `_check_single_input` says so in build_micro_export
    tensor = model.tensors[model.inputs[0]]
    if not tensor.shape or 0 in tensor.shape:
        raise ModelLoadError(f"{source}'s input tensor {tensor.index} has shape {tensor.shape}: a model input needs a "
                             "batch axis and no zero-size dimension. The file is corrupt or truncated: convert the "
                             "model again.")
    elements = int(np.prod(tensor.shape[1:], dtype=np.float64))
    if elements > MAX_INPUT_ELEMENTS:
        raise MicroTargetError(f"{source}'s input holds {elements:,} elements per sample (shape {tensor.shape}), more "
                               f"than the {MAX_INPUT_ELEMENTS:,} a microcontroller export takes. Export a model with "
                               "a smaller input, or check that the file is not corrupt.")


_USER_FILE_FIX = "the file is corrupt or uses an op this runtime cannot run: convert the model again."


def check_user_file_in_tflm(model: TfliteModel, source: str, timeout_s: float = 60.0, fix: str = _USER_FILE_FIX,
                            error: type[InputError] = ModelLoadError) -> None:
    """Allocates and invokes a user's model once on zeros in TFLM in a child process (`arena_probe`).

    TFLM's interpreter checks less than LiteRT's, and a crash would take this process with it; a model TFLM
    merely refuses is left to the in-process run, whose error names the kernel. Models that are not for
    TFLM at all (float, hybrid, several inputs) are left to `build_micro_export`'s own one-line refusals.
    `fix` ends the message and `error` is raised: a model the convert pipeline just made is not a corrupt file.

    Raises:
        ModelLoadError (or `error`): the child died by a signal or took longer than `timeout_s`.
    """
    try:
        micro.check_micro_compatible(model, source)
        _check_single_input(model, source)
    except InputError:
        return
    tensor = model.tensors[model.inputs[0]]
    try:
        sample = np.zeros((1, *tensor.shape[1:]), dtype=np.dtype(tensor.dtype))
    except TypeError:  # a dtype numpy has no name for: the in-process checks refuse it in one line
        return
    probe = arena_probe.probe_arena(model.data, sample, max(10 * len(model.data), 1 << 20), timeout_s)
    if probe.signal is not None:
        raise error(f"{source} made the TFLite Micro interpreter crash ({litert_probe.describe_crash(probe.signal)}) "
                    f"on its first allocation and invoke, run in a child process: {fix}")
    if probe.detail.startswith("no answer"):
        raise error(f"{source}'s first TFLite Micro allocation and invoke gave {probe.detail}: {fix}")


def _read_labels(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise InputError(f"Labels file not found: {path}. Pass a text file with one label per line.")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _check_labels(labels: list[str] | None, model: TfliteModel) -> list[str] | None:
    if labels is None:
        return None
    classes = model.tensors[model.outputs[0]].shape[-1]
    if len(labels) != classes:
        raise InputError(f"{len(labels)} labels given but the model has {classes} outputs. Pass one "
                         "label per output class, one per line.")
    return list(labels)


def _check_single_input(model: TfliteModel, source: str) -> None:
    if len(model.inputs) != 1:
        raise InputError(f"{source} has {len(model.inputs)} inputs; microcontroller export supports one (and "
                         "any number of outputs). Export a single-input model, e.g. with the inputs "
                         "concatenated into one tensor.")


def _tensor_info(t: Tensor) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "scale": list(t.scale),
            "zero_point": list(t.zero_point)}


def tflm_version() -> str:
    from tflite_micro import __version__ as version

    return str(version)


def _describe(t: Tensor) -> str:
    quant = ""
    if t.scale:
        quant = f" scale={t.scale[0]:.9g} zero_point={t.zero_point[0] if t.zero_point else 0}"
    return f"{t.dtype} {list(t.shape)}{quant} ({t.name})"


def _output_lines(model: TfliteModel) -> list[str]:
    if len(model.outputs) == 1:
        return [f"// Output: {_describe(model.tensors[model.outputs[0]])}"]
    names = tflm_check.output_names(model)
    return [f"// Output {position} ({names[position]}): {_describe(model.tensors[index])}"
            for position, index in enumerate(model.outputs)]


def _guard(name: str, suffix: str) -> str:
    return f"{name.upper()}_{suffix}_H_"


def _model_header(name: str, model: TfliteModel, arena: micro.ArenaSize, labels: list[str] | None) -> str:
    guard = _guard(name, "MODEL_DATA")
    lines = [
        f"// Generated by tfcompress {__version__}. Do not edit.",
        f"// Model sha256: {model.sha256}",
        f"// Input:  {_describe(model.tensors[model.inputs[0]])}",
        *_output_lines(model),
        "// Ops: " + ", ".join(f"{op} x{n}" for op, n in model.op_counts().items()),
        f"// Tensor arena: {arena.arena_bytes} bytes (TFLM recording allocator measured "
        f"{arena.recorded_bytes}, plus {arena.margin:.0%} margin, rounded up to 16).",
    ]
    if labels:
        lines.append("// Labels: " + ", ".join(labels))
    lines += [
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        f"extern const unsigned char {name}[];",
        f"extern const unsigned int {name}_len;",
        f"constexpr unsigned int {name}_arena_bytes = {arena.arena_bytes};",
        "",
        f"#endif  // {guard}",
        "",
    ]
    return "\n".join(lines)


def _model_source(name: str, flatbuffer: bytes) -> str:
    rows = []
    for start in range(0, len(flatbuffer), 12):
        rows.append("  " + ", ".join(f"0x{b:02x}" for b in flatbuffer[start : start + 12]) + ",")
    return "\n".join([
        f"// Generated by tfcompress {__version__}. Do not edit.",
        f'#include "{name}_model_data.h"',
        "",
        "// TFLM reads the flatbuffer in place: 16-byte alignment keeps its tensors aligned.",
        f"alignas(16) const unsigned char {name}[] = {{",
        *rows,
        "};",
        f"const unsigned int {name}_len = {len(flatbuffer)};",
        "",
    ])


def _resolver_header(name: str, calls: list[str]) -> str:
    guard = _guard(name, "OP_RESOLVER")
    body = [f"  if (resolver.{call}() != kTfLiteOk) return kTfLiteError;" for call in calls]
    return "\n".join([
        f"// Generated by tfcompress {__version__}. Do not edit.",
        f"// The ops {name} uses, and no others (smallest kernel code in flash).",
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        '#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"',
        "",
        f"constexpr unsigned int {name}_op_count = {len(calls)};",
        f"using {name}_op_resolver = tflite::MicroMutableOpResolver<{name}_op_count>;",
        "",
        f"inline TfLiteStatus {name}_register_ops({name}_op_resolver& resolver) {{",
        *body,
        "  return kTfLiteOk;",
        "}",
        "",
        f"#endif  // {guard}",
        "",
    ])
