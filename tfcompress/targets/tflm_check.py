"""The TFLM check: TensorFlow Lite Micro's outputs against LiteRT's, output by output, in quantized steps.

Takes a parsed integer flatbuffer, the inputs it was run on and TFLM's outputs (`micro.run_tflm_outputs`);
returns a `LitertComparison`: per output, TFLM against LiteRT's reference kernels (the gate: at most
`tolerance_steps` apart, and top-1 agreement on classifier outputs, `classifier_outputs`) and LiteRT's
optimized kernels against the same reference (reported). Also reads what the comparison needs from the
graph: each output's name (`output_names`) and the ops an output depends on (`ancestors`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from tfcompress.core.tflite_model import Operator, TfliteModel, TfliteSource, output_names, read_tflite
from tfcompress.conversion.verify import LiteRTRun, run_litert

# TFLM's reference kernels and LiteRT's optimized kernels may round a requantization differently, by one
# step of that op's output; a step lost early can move later outputs by a step more. So the tolerance is
# one step per op that requantizes (ops that only move or pick int8 values keep them exactly).
STEPS_PER_REQUANTIZING_OP = 1
_EXACT_OPS = frozenset({"RESHAPE", "SQUEEZE", "EXPAND_DIMS", "MAX_POOL_2D", "TRANSPOSE", "PAD", "PADV2",
                        "STRIDED_SLICE", "SLICE", "GATHER", "SPACE_TO_DEPTH", "DEPTH_TO_SPACE", "PACK",
                        "UNPACK", "SPLIT", "SPLIT_V", "SHAPE"})
MIN_TOP1_AGREEMENT = 0.999
# Top-1 agreement is gated on classifier outputs only: (batch, classes) from a SOFTMAX, or the first output
# where the caller gave class labels. The arg-max of a reconstruction or a regression is no decision, and
# TFLM's one-step differences flip it between near-equal values (measured: the zoo autoencoder, 0.985 to 0.995).
_CLASSIFIER_OPS = frozenset({"SOFTMAX", "LOG_SOFTMAX"})
_PASS_THROUGH_OPS = frozenset({"QUANTIZE", "DEQUANTIZE", "RESHAPE", "SQUEEZE"})


@dataclasses.dataclass(frozen=True)
class TflmComparison:
    """TFLM against LiteRT on the same quantized inputs; differences in output quantization steps."""

    num_samples: int
    max_step_difference: int
    mean_step_difference: float
    top1_agreement: float
    tolerance_steps: int
    min_top1_agreement: float
    samples: str
    reference: str = "LiteRT"
    compared: str = "TFLM"
    output: str = ""
    """Which model output (its signature name where the model has one); empty where not told."""
    top1_ties: int = 0
    """Samples counted as agreeing because one side's top score is an exact tie that includes the other's
    top-1 class (its arg-max then only says which tied class has the lower index)."""

    @property
    def passed(self) -> bool:
        return (self.max_step_difference <= self.tolerance_steps
                and self.top1_agreement >= self.min_top1_agreement)

    @property
    def failures(self) -> list[str]:
        found = []
        where = f" on output {self.output!r}" if self.output else ""
        if self.max_step_difference > self.tolerance_steps:
            found.append(f"tflm_output_difference: {self.compared} and {self.reference} outputs differ by up to "
                         f"{self.max_step_difference} quantized steps (tolerance {self.tolerance_steps}){where}")
        if self.top1_agreement < self.min_top1_agreement:
            found.append(f"tflm_top1_agreement: {self.top1_agreement:.4f} < {self.min_top1_agreement}{where}")
        return found


@dataclasses.dataclass(frozen=True)
class LitertComparison:
    """Every model output of TFLM against LiteRT's reference kernels (`checks`, the gate), and LiteRT's
    optimized kernels against the same reference (`phone`, reported), in the model's output order."""

    checks: tuple[TflmComparison, ...]
    phone: tuple[TflmComparison, ...]
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[str]:
        return [f for c in self.checks for f in c.failures]


def ancestors(model: TfliteModel, tensor: int, producers: dict | None = None) -> list[Operator]:
    """Every op that `tensor` depends on, through any input."""
    producers = producers if producers is not None else {out: op for op in model.operators for out in op.outputs}
    seen, stack, found = set(), [tensor], []
    while stack:
        op = producers.get(stack.pop())
        if op is None or op.index in seen:
            continue
        seen.add(op.index)
        found.append(op)
        stack.extend(i for i in op.inputs if i >= 0)
    return found


def classifier_outputs(model: TfliteModel, labelled: bool = False) -> frozenset[int]:
    """Positions of the outputs whose top-1 agreement is gated: (batch, classes) outputs of a SOFTMAX
    (through QUANTIZE, DEQUANTIZE, RESHAPE, SQUEEZE), and the first output when `labelled` (the caller
    gave class labels for it)."""
    producers = {out: op for op in model.operators for out in op.outputs}
    found = {0} if labelled else set()
    for position, index in enumerate(model.outputs):
        if len(model.tensors[index].shape) != 2 or model.tensors[index].shape[-1] < 2:
            continue
        op = producers.get(index)
        while op is not None and op.op in _PASS_THROUGH_OPS and op.inputs:
            op = producers.get(op.inputs[0])
        if op is not None and op.op in _CLASSIFIER_OPS:
            found.add(position)
    return frozenset(found)


REFERENCE = "LiteRT reference kernels"


def litert_runs(flatbuffer: TfliteSource, inputs: np.ndarray) -> tuple[LiteRTRun, LiteRTRun]:
    """LiteRT's two runs the comparison needs: its reference kernels (TFLM's arithmetic) and its default
    optimized kernels, on the same inputs.

    Raises:
        InterpreterRunError: LiteRT cannot run the model with its reference kernels.
    """
    model = read_tflite(flatbuffer)
    return run_litert(model, inputs, reference_kernels=True), run_litert(model, inputs)


def compare_with_litert(flatbuffer: TfliteSource, inputs: np.ndarray | None, tflm_outputs: Sequence[np.ndarray],
                        samples: str, classifiers: frozenset[int] | None = None,
                        litert: tuple[LiteRTRun, LiteRTRun] | None = None) -> LitertComparison:
    """TFLM's outputs (from `run_tflm_outputs`) against LiteRT's on the same inputs, output by output.

    `checks` compares TFLM with LiteRT's reference kernels, the same arithmetic TFLM runs, in steps of each
    output and within `tolerance_steps` of its path; top-1 agreement is gated on the `classifiers` positions
    (default `classifier_outputs(model)`) and reported on the rest. `phone` compares LiteRT's default
    optimized (XNNPACK) kernels with its reference kernels: what a phone runs against what a
    microcontroller runs. Both runtimes are right, yet on deep int8 nets they round differently by several
    steps and flip some top-1 decisions, so `phone` is reported, never failed. `litert`: `litert_runs` on these
    inputs, where the caller made them already (while TFLM ran).

    Raises:
        InterpreterRunError: LiteRT cannot run the model with its reference kernels.
    """
    model = read_tflite(flatbuffer)
    if isinstance(tflm_outputs, np.ndarray):
        tflm_outputs = (tflm_outputs,)
    if len(tflm_outputs) != len(model.outputs):
        raise ValueError(f"tflm_outputs must hold one array per model output ({len(model.outputs)}). "
                         f"Received: {len(tflm_outputs)} arrays")
    classifiers = classifier_outputs(model) if classifiers is None else classifiers
    reference, optimized = litert_runs(model, inputs) if litert is None else litert
    phone_name = "LiteRT (XNNPACK)" if optimized.kernels == "optimized" else "LiteRT (builtin, XNNPACK failed)"
    names = output_names(model)
    checks, phone = [], []
    for position, tflm in enumerate(tflm_outputs):
        step, tolerance = _output_step(model, position), tolerance_steps(model, position)
        ref = reference.outputs[position] / step
        gate = MIN_TOP1_AGREEMENT if position in classifiers else 0.0
        checks.append(compare_outputs(tflm / step, ref, samples, REFERENCE, tolerance, gate, output=names[position]))
        phone.append(compare_outputs(optimized.outputs[position] / step, ref, samples, REFERENCE, tolerance, 0.0,
                                     compared=phone_name, output=names[position]))
    return LitertComparison(tuple(checks), tuple(phone), tuple(n for n in (optimized.note,) if n))


def tolerance_steps(model: TfliteModel, output: int | None = None) -> int:
    """How many output steps TFLM may differ from LiteRT: one per requantizing op (at least one).

    With `output` (a position in the model's outputs), only the ops that output depends on count.
    """
    ops = model.operators if output is None else ancestors(model, model.outputs[output])
    return max(1, STEPS_PER_REQUANTIZING_OP * sum(op.op not in _EXACT_OPS for op in ops))


def _output_step(model: TfliteModel, output: int = 0) -> float:
    """1 for an integer output; for a float output, the scale of the integer tensor it was dequantized from."""
    out = model.tensors[model.outputs[output]]
    if out.dtype not in ("float32", "float16"):
        return 1.0
    for op in model.operators:
        if op.op == "DEQUANTIZE" and out.index in op.outputs:
            source = model.tensors[op.inputs[0]]
            if source.scale:
                return float(source.scale[0])
    return 1.0


def compare_outputs(a: np.ndarray, b: np.ndarray, samples: str, reference: str, tolerance: int,
                    min_agreement: float, compared: str = "TFLM", output: str = "") -> TflmComparison:
    """Largest and mean difference (in steps) and top-1 agreement of two stacks of outputs.

    Top-1 agrees where both arg-maxes are the same class, and also where one side's top score is an exact
    tie that includes the other side's class (`top1_ties` counts those): quantized outputs do tie (the
    zoo GRU in TFLM: 3 of 500 samples), and then the arg-max picks the lower index, not a class the model
    preferred. Near-ties are not excused: a class that scores lower, by however little, is a disagreement.
    """
    n = len(a)
    # Float outputs arrive divided by their step, so rounding gives whole steps here too.
    a, b = np.rint(a).astype(np.int64).reshape(n, -1), np.rint(b).astype(np.int64).reshape(n, -1)
    diff = np.abs(a - b)
    top_a, top_b, rows = a.argmax(1), b.argmax(1), np.arange(n)
    same = top_a == top_b
    tied = ~same & ((a[rows, top_b] == a[rows, top_a]) | (b[rows, top_a] == b[rows, top_b]))
    return TflmComparison(
        num_samples=n,
        max_step_difference=int(diff.max(initial=0)),
        mean_step_difference=float(diff.mean()) if diff.size else 0.0,
        top1_agreement=float(np.mean(same | tied)),
        tolerance_steps=tolerance,
        min_top1_agreement=min_agreement,
        samples=samples,
        reference=reference,
        compared=compared,
        output=output,
        top1_ties=int(tied.sum()),
    )
