"""Verification stage: checks a `.tflite` model in the LiteRT interpreter against what was promised.

Takes the flatbuffer (bytes or path), the mode and I/O dtype it was converted for, and optionally the
float model with labelled evaluation data; returns a `VerificationResult` listing every check. All checks
run; with `raise_on_failure` a single `VerificationError` then lists every failed one. Evaluation runs in
batches (the interpreter's input is resized), never one sample at a time, except for a model converted with
a fixed batch size, which runs in batches of exactly that size. Where LiteRT's default XNNPACK delegate
cannot run a model (measured: an unrolled LSTM), it runs again on LiteRT's builtin kernels without the
delegate and the result says so in `notes`; where LiteRT cannot run it at all, that is a failed check.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

import numpy as np
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from tfcompress.core import litert_probe
from tfcompress.core._native import native_output_captured
from tfcompress.conversion import fidelity
from tfcompress.conversion.convert import INTEGER_MODES, Mode
from tfcompress.conversion.fidelity import dequantize, quantize
from tfcompress.core.progress import progress
from tfcompress.core.errors import InterpreterRunError, VerificationError
from tfcompress.core.model_io import FloatModel
from tfcompress.core.tflite_model import TfliteModel, TfliteSource, output_names, weight_tensors

# Tensor dtypes an integer mode may contain besides its I/O: activations, weights, biases, shapes.
_ALLOWED_DTYPES = {
    Mode.INT8: frozenset({"int8", "int32"}),
    Mode.INT16X8: frozenset({"int16", "int8", "int32", "int64"}),
}
_BIAS_DTYPE = {Mode.INT8: "int32", Mode.INT16X8: "int64"}


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclasses.dataclass(frozen=True)
class AccuracyResult:
    """Accuracies are fractions in [0, 1]; `accuracy_drop` is float minus TFLite."""

    num_samples: int
    float_accuracy: float
    tflite_accuracy: float
    accuracy_drop: float
    top1_agreement: float
    max_abs_output_error: float
    mean_abs_output_error: float


@dataclasses.dataclass(frozen=True)
class VerificationResult:
    checks: tuple[Check, ...]
    ops: dict[str, int]
    inputs: tuple[dict, ...]
    outputs: tuple[dict, ...]
    accuracy: AccuracyResult | None
    fidelity: fidelity.FidelityResult | None = None
    target_error: dict | None = None  # regression targets: mean squared error of float and .tflite
    notes: tuple[str, ...] = ()
    """What the run had to work around, e.g. LiteRT's XNNPACK delegate failing (then builtin kernels ran)."""

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.passed]


def verify(
    tflite_model: TfliteSource,
    mode: Mode | str,
    io_dtype: str,
    float_model: FloatModel | None = None,
    eval_samples: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
    max_accuracy_drop: float | None = None,
    batch_size: int = 500,
    raise_on_failure: bool = True,
    float_outputs: np.ndarray | dict[str, np.ndarray] | None = None,
    *,
    eval_output: str | None = None,
    samples_source: str = "evaluation data",
    min_top1_agreement: float = fidelity.DEFAULT_MIN_TOP1_AGREEMENT,
    min_output_sqnr_db: float = fidelity.DEFAULT_MIN_OUTPUT_SQNR_DB,
    eval_batches: Iterable[tuple[np.ndarray, np.ndarray | None]] | None = None,
) -> VerificationResult:
    """Runs every check on a converted model.

    Args:
        tflite_model: the parsed model (`read_tflite`), its flatbuffer bytes, or a path to a `.tflite` file.
        mode: the conversion mode the model was made in (`convert.Mode`).
        io_dtype: the promised input and output dtype.
        float_model: the float model to compare against (needed for accuracy checks).
        eval_samples: float32 held-out samples shaped like the model input: every output of the float model
            and the `.tflite` is compared on them (`fidelity`).
        eval_labels: labels for `eval_samples`: class indices of a classifier output (gated with
            `max_accuracy_drop`), or regression targets shaped like an output (their error is reported).
            Without labels, every output is gated on fidelity instead.
        max_accuracy_drop: largest allowed float-minus-TFLite top-1 accuracy drop, a fraction in [0, 1].
        batch_size: samples per interpreter call.
        raise_on_failure: raise `VerificationError` listing every failed check.
        float_outputs: the float model's outputs on `eval_samples`, if already computed: one output's array,
            or every output by name (`FloatModel.predict_all`).
        eval_output: which output the labels are for (needed when the model has several).
        samples_source: where `eval_samples` come from, for the report.
        min_top1_agreement, min_output_sqnr_db: the fidelity gates of outputs without class labels.
        eval_batches: instead of `eval_samples`/`eval_labels`, `(samples, labels or None)` batches streamed from a
            source too large for memory (`datasets.Source.batches`): each runs through LiteRT and the float model
            as it arrives, and only the outputs and labels are kept.

    Returns:
        A `VerificationResult`.
    """
    mode = Mode(mode)
    if max_accuracy_drop is not None and not 0.0 <= max_accuracy_drop <= 1.0:
        raise ValueError(
            "max_accuracy_drop is a fraction in [0, 1] (0.005 is half a percentage point). "
            f"Received: max_accuracy_drop={max_accuracy_drop}"
        )
    if eval_labels is not None and eval_samples is None:
        raise ValueError("eval_labels need their eval_samples. Received eval_labels without eval_samples.")
    if eval_labels is not None and len(eval_samples) != len(eval_labels):
        raise ValueError(
            f"eval_samples and eval_labels differ in length. Received: {len(eval_samples)} samples, "
            f"{len(eval_labels)} labels"
        )
    parsed = litert_probe.read_user_tflite(tflite_model)  # a user's file runs in a child process first
    checks = [*_dtype_checks(parsed, mode, io_dtype), _builtin_only_check(parsed)]
    accuracy = measured = target_error = None
    notes: list[str] = []
    tflite_all = None
    if eval_batches is not None and float_model is not None:
        try:
            tflite_all, float_outputs, eval_labels, note = _stream(parsed, float_model, eval_batches, batch_size)
        except InterpreterRunError as e:
            checks += [Check(f.split(":")[0], False, f.split(":", 1)[-1].strip()) for f in e.failures]
        else:
            notes += [note] if note else []
            if len(next(iter(tflite_all.values()))) < fidelity.MIN_FIDELITY_SAMPLES:
                raise ValueError(
                    f"Comparing the .tflite with the float model needs at least {fidelity.MIN_FIDELITY_SAMPLES} "
                    f"held-out samples. Received: {len(next(iter(tflite_all.values())))} ({samples_source})"
                )
        run = None
    elif eval_samples is not None and (float_model is not None or float_outputs is not None):
        if len(eval_samples) < fidelity.MIN_FIDELITY_SAMPLES:
            raise ValueError(
                f"Comparing the .tflite with the float model needs at least {fidelity.MIN_FIDELITY_SAMPLES} "
                f"held-out samples. Received: {len(eval_samples)} ({samples_source})"
            )
        try:
            run = run_litert(parsed, quantize(eval_samples, _input_detail(parsed)), batch_size=batch_size)
        except InterpreterRunError as e:
            checks += [Check(f.split(":")[0], False, f.split(":", 1)[-1].strip()) for f in e.failures]
            run = None
        else:
            notes += [run.note] if run.note else []
    else:
        run = None
    if run is not None:
        tflite_all = _named_outputs(parsed, run)
    if tflite_all is not None:
        if isinstance(float_outputs, dict):  # every output by name, as `FloatModel.predict_all` returns them
            float_all = {name: np.asarray(values) for name, values in float_outputs.items()}
        elif float_outputs is not None:
            float_all = {next(iter(tflite_all)): np.asarray(float_outputs)} if len(tflite_all) == 1 else None
            if float_all is None:
                raise ValueError("float_outputs holds one output, but the model has several: pass float_model.")
        else:
            float_all = float_model.predict_all(eval_samples)
        pairs = fidelity.pair_outputs(float_all, tflite_all)
        labels = None
        if eval_labels is not None:
            labels = fidelity.interpret_labels(eval_labels, dict((n, f) for n, f, _ in pairs), eval_output,
                                               samples_source)
        measured = fidelity.measure(pairs, samples_source, labels)
        gated_by_labels = None
        if labels is not None and labels.kind == "targets":
            f, q = next((f, q) for n, f, q in pairs if n == labels.output)
            target_error = {"output": labels.output,
                            "float_mse": float(np.mean((f - labels.values) ** 2)),
                            "tflite_mse": float(np.mean((q - labels.values) ** 2))}
        if labels is not None and labels.kind == "classes":
            gated_by_labels = labels.output
            f, q = next((f, q) for n, f, q in pairs if n == labels.output)
            accuracy = _accuracy(f, q, labels.values)
            if max_accuracy_drop is not None:
                checks.append(Check(
                    "accuracy_drop",
                    accuracy.accuracy_drop <= max_accuracy_drop + 1e-12,
                    f"float {accuracy.float_accuracy:.4f}, tflite {accuracy.tflite_accuracy:.4f}, drop "
                    f"{accuracy.accuracy_drop:.4f} (limit {max_accuracy_drop:.4f}) on "
                    f"{accuracy.num_samples} samples",
                ))
        checks += [Check(name, False, detail) for name, detail in fidelity.gate_failures(
            measured, min_top1_agreement, min_output_sqnr_db, skip=gated_by_labels)]
        if not any(c.name.startswith("fidelity_") for c in checks):
            gated = [o.name for o in measured.outputs if o.name != gated_by_labels]
            if gated:
                checks.append(Check("fidelity", True, f"output(s) {', '.join(gated)} within top-1 agreement >= "
                                    f"{min_top1_agreement} and SQNR >= {min_output_sqnr_db} dB on "
                                    f"{measured.num_samples} samples ({samples_source})"))
    result = VerificationResult(
        checks=tuple(checks),
        ops=parsed.op_counts(),
        inputs=tuple(_io_info(parsed, i) for i in parsed.inputs),
        outputs=tuple(_io_info(parsed, i) for i in parsed.outputs),
        accuracy=accuracy,
        fidelity=measured,
        target_error=target_error,
        notes=tuple(notes),
    )
    if raise_on_failure and not result.passed:
        raise VerificationError(result.failures, result)
    return result


def _stream(parsed: TfliteModel, float_model: FloatModel, batches, batch_size: int):
    """Every output of the .tflite and of the float model, and the labels, over streamed batches."""
    tflite_parts: dict[str, list[np.ndarray]] = {}
    float_parts: dict[str, list[np.ndarray]] = {}
    labels, note, interpreter = [], None, None
    detail = _input_detail(parsed)
    for x, y in batches:
        inputs = quantize(x, detail)
        if interpreter is None:  # the first batch finds the kernels that run the model; one interpreter for the rest
            run = run_litert(parsed, inputs, batch_size=batch_size)
            note = run.note
            interpreter = _interpreter(parsed, None, OpResolverType.AUTO if run.kernels == "optimized"
                                       else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        else:
            try:
                run = LiteRTRun(_run_batches(interpreter, inputs, batch_size), "optimized")
            except (RuntimeError, ValueError) as e:
                raise InterpreterRunError([f"litert_runtime: LiteRT cannot run the model ({_one_line(e)}). "
                                           f"{_RUNTIME_FIX}"]) from None
        for name, values in _named_outputs(parsed, run).items():
            tflite_parts.setdefault(name, []).append(values)
        for name, values in float_model.predict_all(x, batch_size=batch_size).items():
            float_parts.setdefault(name, []).append(values)
        if y is not None:
            labels.append(y)
    if not tflite_parts:
        raise ValueError("eval_batches yielded no samples. Received: an empty source")
    joined = ({name: np.concatenate(parts) for name, parts in tflite_parts.items()},
              {name: np.concatenate(parts) for name, parts in float_parts.items()})
    return (*joined, np.concatenate(labels) if labels else None, note)


@dataclasses.dataclass(frozen=True)
class LiteRTRun:
    """Every output of one LiteRT run, in the model's output order, as stored (quantized).

    `kernels` is "optimized" (the default resolver with XNNPACK), "builtin" (the default delegate failed,
    so LiteRT's builtin kernels ran without it; `note` says why) or "reference" (`BUILTIN_REF`).
    """

    outputs: tuple[np.ndarray, ...]
    kernels: str
    note: str | None = None


def run_litert(model: TfliteSource, inputs: np.ndarray, batch_size: int = 500, num_threads: int | None = None,
               reference_kernels: bool = False) -> LiteRTRun:
    """Runs `inputs` (already in the model's input dtype) through LiteRT; every output, as stored.

    Where the default XNNPACK delegate fails to prepare or run the model, it runs again with
    `OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES` (the same builtin kernels, no delegate) and says so.

    Raises:
        InterpreterRunError: LiteRT cannot allocate or invoke the model with the kernels asked for (and,
            for the default kernels, not without the delegate either).
        ModelLoadError: `model` is a path to a file that crashes LiteRT, or that LiteRT refuses
            (`litert_probe`: a user's file runs once in a child process first).
    """
    if isinstance(model, (str, os.PathLike)):
        model = litert_probe.read_user_tflite(model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1. Received: batch_size={batch_size}")
    # LiteRT raises RuntimeError for what its kernels refuse and ValueError for a model it cannot load
    # ("The model is not a valid Flatbuffer buffer"): both are a model LiteRT cannot run.
    if reference_kernels:
        try:
            return LiteRTRun(_run_batches(_interpreter(model, num_threads, OpResolverType.BUILTIN_REF), inputs,
                                          batch_size), "reference")
        except (RuntimeError, ValueError) as e:
            raise InterpreterRunError([f"litert_runtime: LiteRT's reference kernels cannot run the model "
                                       f"({_one_line(e)}). {_RUNTIME_FIX}"]) from None
    try:
        return LiteRTRun(_run_batches(_interpreter(model, num_threads), inputs, batch_size), "optimized")
    except (RuntimeError, ValueError) as e:
        delegate = _one_line(e)
    try:
        outputs = _run_batches(_interpreter(model, num_threads, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES),
                               inputs, batch_size)
    except (RuntimeError, ValueError) as e:
        raise InterpreterRunError([f"litert_runtime: LiteRT cannot run the model with its builtin kernels "
                                   f"({_one_line(e)}), nor with its XNNPACK delegate ({delegate}). "
                                   f"{_RUNTIME_FIX}"]) from None
    return LiteRTRun(outputs, "builtin", note=(
        f"LiteRT's XNNPACK delegate cannot run the model ({delegate}); it ran on LiteRT's builtin kernels "
        "without the delegate (OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)"))


_RUNTIME_FIX = ("The converter wrote a model its own runtime rejects: run `tfcompress inspect` on it to find the "
                "op named, and change that layer")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def run_tflite(model: TfliteSource, samples: np.ndarray, batch_size: int = 500,
               num_threads: int | None = None) -> np.ndarray:
    """Runs float `samples` through a single-input `.tflite` model in batches; its first output.

    Inputs are quantized with the input tensor's scale and zero point; outputs are dequantized, so the
    result is comparable with the float model's.
    """
    parsed = litert_probe.read_user_tflite(model)
    run = run_litert(parsed, quantize(samples, _input_detail(parsed)), batch_size, num_threads)
    return dequantize(run.outputs[0], _output_detail(parsed, 0))


def run_tflite_all(model: TfliteSource, samples: np.ndarray, batch_size: int = 500,
                   num_threads: int | None = None) -> dict[str, np.ndarray]:
    """Like `run_tflite`, every output: dequantized, by its name in the serving signature (`output_names`)."""
    parsed = litert_probe.read_user_tflite(model)
    return _named_outputs(parsed, run_litert(parsed, quantize(samples, _input_detail(parsed)), batch_size,
                                             num_threads))


def _named_outputs(parsed: TfliteModel, run: LiteRTRun) -> dict[str, np.ndarray]:
    """A run's outputs dequantized, by their names in the serving signature."""
    return {name: dequantize(raw, _output_detail(parsed, i))
            for i, (name, raw) in enumerate(zip(output_names(parsed), run.outputs))}


def run_tflite_raw(model: TfliteSource, inputs: np.ndarray, batch_size: int = 500,
                   num_threads: int | None = None, reference_kernels: bool = False) -> np.ndarray:
    """Runs `inputs` already in the model's input dtype; returns the first output tensor as stored (quantized).

    `reference_kernels` runs LiteRT's reference kernels (`OpResolverType.BUILTIN_REF`) instead of the
    default optimized ones with XNNPACK: the same arithmetic as TFLite Micro's reference kernels, which
    the optimized kernels may round differently (several output steps on deep int8 nets).
    """
    return run_litert(model, inputs, batch_size, num_threads, reference_kernels).outputs[0]


def _input_detail(model: TfliteModel) -> dict:
    (index,) = model.inputs
    return _detail(model.tensors[index])


def _output_detail(model: TfliteModel, position: int) -> dict:
    return _detail(model.tensors[model.outputs[position]])


def _detail(tensor) -> dict:
    """The two fields of an interpreter's tensor details that `quantize` and `dequantize` read."""
    return {"dtype": np.dtype(tensor.dtype),
            "quantization": (tensor.scale[0] if tensor.scale else 0.0,
                             tensor.zero_point[0] if tensor.zero_point else 0)}


def _interpreter(model: TfliteSource, num_threads: int | None,
                 resolver: OpResolverType = OpResolverType.AUTO) -> Interpreter:
    if isinstance(model, TfliteModel):
        model = model.data
    kwargs = {"model_content": model} if isinstance(model, (bytes, bytearray)) else {"model_path": os.fspath(model)}
    if resolver is not OpResolverType.AUTO:
        kwargs["experimental_op_resolver_type"] = resolver
    return Interpreter(num_threads=num_threads or os.cpu_count() or 1, **kwargs)


def _run_batches(interpreter: Interpreter, inputs: np.ndarray, batch_size: int) -> tuple[np.ndarray, ...]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1. Received: batch_size={batch_size}")
    (inp,) = interpreter.get_input_details()
    outs = interpreter.get_output_details()
    signature = inp.get("shape_signature")
    # A model converted with a fixed batch size (keras.Input(batch_size=1), the route to TFLM for recurrent
    # layers) has that batch baked into its constant shapes: resizing it fails, so it runs in batches of
    # exactly that size, the last one padded.
    fixed = int(signature[0]) if signature is not None and len(signature) and signature[0] > 0 else None
    size = fixed or batch_size
    outputs: list[list[np.ndarray]] = [[] for _ in outs]
    current = None
    starts = range(0, len(inputs), size)
    for start in progress(starts, total=len(starts), desc="evaluating (LiteRT)"):
        batch = inputs[start : start + size]
        count = len(batch)
        if fixed and count < fixed:
            batch = np.concatenate([batch, np.repeat(batch[-1:], fixed - count, axis=0)])
        if current != len(batch):
            if not fixed:
                interpreter.resize_tensor_input(inp["index"], [len(batch), *inp["shape"][1:]])
            with native_output_captured():  # LiteRT announces its XNNPACK delegate on the C-level stderr
                interpreter.allocate_tensors()
            current = len(batch)
        interpreter.set_tensor(inp["index"], batch)
        with native_output_captured():  # and a delegate that fails at run time prints its reason there
            interpreter.invoke()
        for collected, out in zip(outputs, outs):
            collected.append(interpreter.get_tensor(out["index"])[:count].copy())
    return tuple(np.concatenate(collected, axis=0) for collected in outputs)


def _dtype_checks(parsed: TfliteModel, mode: Mode, io_dtype: str) -> list[Check]:
    checks = []
    for kind, indices in (("input", parsed.inputs), ("output", parsed.outputs)):
        found = [parsed.tensors[i].dtype for i in indices]
        checks.append(Check(
            f"{kind}_dtype",
            all(d == io_dtype for d in found),
            f"expected {io_dtype}, found {', '.join(found)}",
        ))
    if mode in INTEGER_MODES:
        io = set(parsed.inputs) | set(parsed.outputs)
        allowed = _ALLOWED_DTYPES[mode]
        bad = [t for t in parsed.tensors if t.index not in io and t.dtype not in allowed]
        checks.append(Check(
            "integer_only",
            not bad,
            f"{len(bad)} tensor(s) outside {sorted(allowed)}, e.g. "
            + ", ".join(f"{t.name} ({t.dtype})" for t in bad[:3]) if bad
            else f"every tensor is one of {sorted(allowed)}",
        ))
        wrong = []
        for op, weights, bias in weight_tensors(parsed):
            if weights.dtype != "int8":
                wrong.append(f"{op.op} weights {weights.name} are {weights.dtype}")
            if bias is not None and bias.dtype != _BIAS_DTYPE[mode]:
                wrong.append(f"{op.op} bias {bias.name} is {bias.dtype}")
        checks.append(Check(
            "weight_dtypes",
            not wrong,
            "; ".join(wrong[:3]) if wrong else f"weights int8, biases {_BIAS_DTYPE[mode]}",
        ))
    elif mode is Mode.FLOAT16:
        n = sum(t.dtype == "float16" for t in parsed.tensors)
        checks.append(Check("float16_weights", n > 0, f"{n} float16 tensor(s)"))
    elif mode is Mode.DYNAMIC:
        n = sum(w.dtype == "int8" for _, w, _ in weight_tensors(parsed))
        checks.append(Check("int8_weights", n > 0, f"{n} layer(s) with int8 weights"))
    return checks


def _builtin_only_check(parsed: TfliteModel) -> Check:
    custom = sorted({op.custom_code or op.op for op in parsed.operators if op.op == "CUSTOM"})
    return Check(
        "builtin_ops_only",
        not custom,
        f"custom or TF Select ops present: {', '.join(custom)}" if custom else
        f"{len(parsed.operators)} builtin ops",
    )


def _accuracy(float_outputs: np.ndarray, tflite_outputs: np.ndarray, labels: np.ndarray) -> AccuracyResult:
    if float_outputs.ndim != 2 or tflite_outputs.shape != float_outputs.shape:
        raise ValueError(
            "Accuracy needs a classifier with (batch, classes) outputs. "
            f"Received: float outputs {float_outputs.shape}, tflite outputs {tflite_outputs.shape}"
        )
    float_top1 = fidelity.predicted_classes(float_outputs)
    tflite_top1 = fidelity.predicted_classes(tflite_outputs, like=float_outputs)
    float_accuracy = float(np.mean(float_top1 == labels))
    tflite_accuracy = float(np.mean(tflite_top1 == labels))
    error = np.abs(float_outputs - tflite_outputs)
    return AccuracyResult(
        num_samples=int(len(labels)),
        float_accuracy=float_accuracy,
        tflite_accuracy=tflite_accuracy,
        accuracy_drop=float_accuracy - tflite_accuracy,
        top1_agreement=float(np.mean(float_top1 == tflite_top1)),
        max_abs_output_error=float(error.max()),
        mean_abs_output_error=float(error.mean()),
    )


def _io_info(parsed: TfliteModel, index: int) -> dict:
    t = parsed.tensors[index]
    return {
        "name": t.name,
        "dtype": t.dtype,
        "shape": list(t.shape),
        "scale": t.scale[0] if len(t.scale) == 1 else list(t.scale),
        "zero_point": t.zero_point[0] if len(t.zero_point) == 1 else list(t.zero_point),
    }
