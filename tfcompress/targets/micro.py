"""Microcontroller stage: runs a `.tflite` model in TensorFlow Lite Micro's own interpreter.

Takes a verified integer flatbuffer; returns what a firmware build needs to know about it: whether TFLM
can run it at all (`check_micro_compatible`: integer ops with a TFLM kernel, and the inputs TFLM's
kernels need constant are constant), the `MicroMutableOpResolver` calls it needs (`resolver_calls`), the
tensor arena it needs as measured by TFLM's recording allocator (`measure_arena`), every output of every
input in TFLM (`run_tflm_outputs`; `tfcompress.targets.tflm_check` compares them with LiteRT's), and
optionally a look-up-table compressed flatbuffer for models whose weights take few distinct values
(`lut_compress`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import numpy as np

from tfcompress.core._native import native_output_captured
from tfcompress.core.errors import MicroTargetError, VerificationError
from tfcompress.core.progress import progress
from tfcompress.core.tflite_model import TfliteModel, TfliteSource, model_bytes, read_tflite, weight_tensors
from tfcompress.targets import arena_probe, tflm_worker
from tfcompress.targets.tflm_check import (
    LitertComparison,
    TflmComparison,
    ancestors,
    compare_outputs,
    compare_with_litert,
    litert_runs,
)

# Builtin op -> its MicroMutableOpResolver method, as declared in TFLM's micro_mutable_op_resolver.h.
# Every op here has a registration in the pinned tflite-micro package's interpreter.
TFLM_BUILTINS: dict[str, str] = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax", "ARG_MIN": "AddArgMin",
    "ASSIGN_VARIABLE": "AddAssignVariable", "AVERAGE_POOL_2D": "AddAveragePool2D",
    "BATCH_MATMUL": "AddBatchMatMul", "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd",
    "BROADCAST_ARGS": "AddBroadcastArgs", "BROADCAST_TO": "AddBroadcastTo", "CALL_ONCE": "AddCallOnce",
    "CAST": "AddCast", "CEIL": "AddCeil", "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D",
    "COS": "AddCos", "CUMSUM": "AddCumSum", "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv",
    "ELU": "AddElu", "EMBEDDING_LOOKUP": "AddEmbeddingLookup", "EQUAL": "AddEqual", "EXP": "AddExp",
    "EXPAND_DIMS": "AddExpandDims", "FILL": "AddFill", "FLOOR": "AddFloor", "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod", "FULLY_CONNECTED": "AddFullyConnected", "GATHER": "AddGather",
    "GATHER_ND": "AddGatherNd", "GREATER": "AddGreater", "GREATER_EQUAL": "AddGreaterEqual",
    "HARD_SWISH": "AddHardSwish", "IF": "AddIf", "L2_NORMALIZATION": "AddL2Normalization",
    "L2_POOL_2D": "AddL2Pool2D", "LEAKY_RELU": "AddLeakyRelu", "LESS": "AddLess",
    "LESS_EQUAL": "AddLessEqual", "LOG": "AddLog", "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot", "LOGICAL_OR": "AddLogicalOr", "LOGISTIC": "AddLogistic",
    "LOG_SOFTMAX": "AddLogSoftmax", "MAXIMUM": "AddMaximum", "MAX_POOL_2D": "AddMaxPool2D",
    "MEAN": "AddMean", "MINIMUM": "AddMinimum", "MIRROR_PAD": "AddMirrorPad", "MUL": "AddMul",
    "NEG": "AddNeg", "NOT_EQUAL": "AddNotEqual", "PACK": "AddPack", "PAD": "AddPad", "PADV2": "AddPadV2",
    "PRELU": "AddPrelu", "QUANTIZE": "AddQuantize", "READ_VARIABLE": "AddReadVariable",
    "REDUCE_MAX": "AddReduceMax", "REDUCE_MIN": "AddReduceMin", "RELU": "AddRelu", "RELU6": "AddRelu6",
    "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "REVERSE_V2": "AddReverseV2",
    "ROUND": "AddRound", "RSQRT": "AddRsqrt", "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape",
    "SIN": "AddSin", "SLICE": "AddSlice", "SOFTMAX": "AddSoftmax", "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd",
    "SPACE_TO_DEPTH": "AddSpaceToDepth", "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV", "SQRT": "AddSqrt",
    "SQUARE": "AddSquare", "SQUARED_DIFFERENCE": "AddSquaredDifference", "SQUEEZE": "AddSqueeze",
    "STRIDED_SLICE": "AddStridedSlice", "SUB": "AddSub", "SUM": "AddSum", "SVDF": "AddSvdf",
    "TANH": "AddTanh", "TRANSPOSE": "AddTranspose", "TRANSPOSE_CONV": "AddTransposeConv",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM", "UNPACK": "AddUnpack",
    "VAR_HANDLE": "AddVarHandle", "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
}
# Custom ops TFLM itself provides (TFLM_DECODE is what LUT compression inserts).
TFLM_CUSTOM: dict[str, str] = {
    "TFLM_DECODE": "AddDecode",
    "TFLite_Detection_PostProcess": "AddDetectionPostprocess",
}

# Inputs that TFLM's kernels refuse unless they are constant in the flatbuffer (each kernel's Prepare:
# "Non-constant >name< tensor is not supported", the same list in the pinned tflite-micro's library and in
# tflite-micro's kernels/*.cc): op -> (input position, name).
CONSTANT_INPUTS: dict[str, tuple[tuple[int, str], ...]] = {
    "BROADCAST_TO": ((1, "shape"),), "EXPAND_DIMS": ((1, "axis"),), "FILL": ((0, "dims"),),
    "PAD": ((1, "paddings"),), "PADV2": ((1, "paddings"),), "RESIZE_BILINEAR": ((1, "size"),),
    "RESIZE_NEAREST_NEIGHBOR": ((1, "size"),), "SPLIT": ((0, "axis"),), "SPLIT_V": ((2, "axis"),),
    "STRIDED_SLICE": ((1, "begin"), (2, "end"), (3, "strides")), "TRANSPOSE": ((1, "perm"),),
}
# Allocator lines that mean the arena was too small (anything else TFLM refuses is the model, not the size).
_ARENA_FAILURE = re.compile(r"Failed to (resize buffer|allocate)|Requested: \d+")
# Margin on the recording allocator's figure: the host build is 64-bit (its persistent structs are at
# least as large as a 32-bit MCU's), but the arena start is aligned at run time and vendor kernels may
# ask for scratch buffers the reference kernels do not. Rounded up to 16 bytes.
ARENA_MARGIN = 0.05
_ARENA_LINE = re.compile(r"Arena allocation total (\d+) bytes")


@dataclasses.dataclass(frozen=True)
class ArenaSize:
    """The tensor arena to give TFLM, proven by allocating and invoking the model at exactly that size.

    `recorded_bytes` is TFLM's recording allocator's total. `arena_bytes` adds `margin` (a fraction) to it,
    or, where the recorded total was not enough to run the model (`smallest_run_bytes` is then set),
    to the smallest size that ran, found by bisection. Every size that might be too small is tried in a
    child process (`arena_probe`), since a too-small arena can crash the interpreter's process.
    """

    recorded_bytes: int
    arena_bytes: int
    margin: float
    smallest_run_bytes: int | None = None
    probes: int = 0


@dataclasses.dataclass(frozen=True)
class CompressedTensor:
    name: str
    mode: str  # "per-channel" (one value table per output channel) or "per-tensor"
    distinct_values: int  # the most values in one table
    index_bitwidth: int
    bytes_before: int


@dataclasses.dataclass(frozen=True)
class LutCompression:
    flatbuffer: bytes
    tensors: tuple[CompressedTensor, ...]


def _runtime():
    from tflite_micro import runtime  # imported late: only this stage needs it

    return runtime


def check_micro_compatible(model: TfliteModel, source: str = "the model") -> None:
    """Raises `MicroTargetError` unless every op computes in integers and has a TFLM kernel.

    TFLM has no hybrid (dynamic-range) kernels and shipping float or float16 weights defeats the point;
    QUANTIZE/DEQUANTIZE at the model's edges (float32 I/O around an integer model) are fine.
    """
    float_ops = model.float_ops(allow_float_io=True)
    if float_ops:
        dtypes = {t.dtype for t in model.tensors}
        weights = {w.dtype for _, w, _ in weight_tensors(model)}
        if "float16" in dtypes:
            kind = "a float16 model"
        elif weights & {"int8", "uint8"}:
            kind = "a dynamic-range (hybrid) model, which TFLM rejects"
        else:
            kind = "a float model"
        ops = ", ".join(sorted({op.op for op in float_ops}))
        raise MicroTargetError(
            f"{source} is {kind} (float ops: {ops}). Convert with --mode=int8 (full integer, "
            "calibration data needed) before exporting for microcontrollers."
        )
    missing = sorted({op.custom_code or op.op for op in model.operators
                      if (op.custom_code and op.custom_code not in TFLM_CUSTOM)
                      or (not op.custom_code and op.op not in TFLM_BUILTINS)})
    if missing:
        raise MicroTargetError(
            f"{source} uses op(s) with no TFLM kernel registration known to tfcompress: "
            f"{', '.join(missing)}. Replace them in the model, or register your own kernel with "
            "MicroMutableOpResolver::AddCustom and export with a hand-written resolver."
        )
    computed = _computed_constant_inputs(model)
    if computed:
        raise MicroTargetError(
            f"TFLM cannot run {source}: {'; '.join(computed)}. Build the model with a fixed batch size of 1 "
            "(keras.Input(shape, batch_size=1)) so that the converter folds the shape into a constant, and "
            "convert again."
        )


def _computed_constant_inputs(model: TfliteModel) -> list[str]:
    """Each input of `CONSTANT_INPUTS` that the model computes at run time, described for the message."""
    producers = {out: op for op in model.operators for out in op.outputs}
    found = []
    for op in model.operators:
        for position, name in CONSTANT_INPUTS.get(op.op, ()):
            if position >= len(op.inputs) or op.inputs[position] < 0:
                continue
            tensor = model.tensors[op.inputs[position]]
            if tensor.is_constant:
                continue
            if tensor.index not in producers:
                origin = "from a model input"
            elif "SHAPE" in {a.op for a in ancestors(model, tensor.index, producers)}:
                origin = "from the input's shape, read by SHAPE"
            else:
                origin = f"by {producers[tensor.index].op}"
            found.append(f"{model.describe(op)} takes its {name} computed at run time ({origin}), and TFLM's "
                         f"{op.op} kernel needs a constant {name}")
    return found


def resolver_calls(model: TfliteModel) -> list[str]:
    """The `MicroMutableOpResolver` methods the model needs, one per distinct op, sorted by op name."""
    check_micro_compatible(model)
    names = sorted({op.custom_code or op.op for op in model.operators})
    return [TFLM_CUSTOM.get(n) or TFLM_BUILTINS[n] for n in names]


def _interpreter(flatbuffer: TfliteSource, arena_bytes: int):
    flatbuffer = model_bytes(flatbuffer)
    runtime = _runtime()
    with native_output_captured() as log:
        try:
            interpreter = runtime.Interpreter.from_bytes(flatbuffer, arena_size=int(arena_bytes))
        except RuntimeError as e:
            error = e
        else:
            error = None
    if error is not None:
        detail = (log[0] if log else "").strip()  # empty where TFCOMPRESS_NATIVE_LOG=1 let it through
        first = detail.splitlines()[0] if detail else ""
        if first and not _ARENA_FAILURE.search(detail):  # a kernel's Prepare refused the model itself
            refusal = MicroTargetError(
                f"TFLM cannot prepare the model: {first}. Change the op that kernel belongs to (TFLM's "
                "reference kernels support fewer shapes and types than LiteRT's); TFCOMPRESS_NATIVE_LOG=1 "
                "shows TFLM's whole log.")
            refusal.details = detail
            raise refusal from None
        raise ArenaTooSmallError(arena_bytes, detail) from None
    return interpreter


class ArenaTooSmallError(VerificationError):
    """TFLM could not allocate the model's tensors in the given arena."""

    def __init__(self, arena_bytes: int, log: str):
        reason = log.splitlines()[0] if log else "AllocateTensors failed"
        super().__init__([f"tflm_arena: TFLM cannot allocate the model in {arena_bytes} bytes ({reason})"])
        self.details = log


def measure_arena(flatbuffer: TfliteSource, sample: np.ndarray, margin: float = ARENA_MARGIN) -> ArenaSize:
    """Runs one inference with TFLM's recording allocator and reads its arena total.

    `sample` is one input in the model's input dtype and shape (batch of 1). The allocator prints to
    the C-level stderr, which is captured at the file-descriptor level.
    """
    if not 0 <= margin <= 1:
        raise ValueError(f"margin must be a fraction in [0, 1]. Received: margin={margin}")
    generous = max(10 * len(model_bytes(flatbuffer)), 1 << 20)
    interpreter = _interpreter(flatbuffer, generous)
    interpreter.set_input(sample, 0)
    interpreter.invoke()
    with native_output_captured(always=True) as log:  # parsed, so captured even with TFCOMPRESS_NATIVE_LOG=1
        interpreter.print_allocations()
    match = _ARENA_LINE.search(log[0])
    if match is None:
        raise RuntimeError(f"TFLM's recording allocator printed no arena total: {log[0][:200]!r}")
    recorded = int(match.group(1))
    data = model_bytes(flatbuffer)
    arena = _with_margin(recorded, margin)
    probe, probes, smallest = arena_probe.probe_arena(data, sample, arena), 1, None
    if not probe.ran:  # the recorded total is not always enough (measured: dense int8 nets)
        smallest, searched = _smallest_arena(data, sample, failing=arena, working=generous)
        arena = _with_margin(smallest, margin)
        probe, probes = arena_probe.probe_arena(data, sample, arena), probes + searched + 1
        if not probe.ran:
            raise ArenaTooSmallError(arena, probe.detail)
    return ArenaSize(recorded_bytes=recorded, arena_bytes=arena, margin=margin, smallest_run_bytes=smallest,
                     probes=probes)


def _with_margin(size: int, margin: float) -> int:
    return int(math.ceil(size * (1 + margin) / 16) * 16)


def _smallest_arena(data: bytes, sample: np.ndarray, failing: int, working: int) -> tuple[int, int]:
    """Bisection to 16 bytes between a size that failed and one that ran; (smallest that ran, probes)."""
    probes = 0
    while working - failing > 16:
        middle = (failing + working) // 2 // 16 * 16
        if middle <= failing:
            break
        probes += 1
        if arena_probe.probe_arena(data, sample, middle).ran:
            working = middle
        else:
            failing = middle
    return working, probes


T = TypeVar("T")
# Ops that keep state from one invoke to the next: a model with them must see its inputs in order, in one
# interpreter, so its check is never split between processes.
_STATEFUL_OPS = frozenset({"VAR_HANDLE", "ASSIGN_VARIABLE", "READ_VARIABLE", "CALL_ONCE"})
# Fewer inputs than this per worker are not worth a process (a worker starts in about 0.2 s; LeNet-5 takes
# 2.6 ms an input on TFLM's reference kernels).
MIN_INPUTS_PER_WORKER = 64


def default_workers() -> int:
    """The cores this process may use (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def run_tflm_outputs(flatbuffer: TfliteSource, inputs: np.ndarray, arena_bytes: int,
                     workers: int | None = None) -> tuple[np.ndarray, ...]:
    """Runs `inputs` (model input dtype, batch axis first) one by one in TFLM; every output, raw, stacked,
    in the model's output order (TFLM's `get_output(i)`).

    The inputs are split into `workers` contiguous shares (default `default_workers()`): this process runs the
    first, a worker process (`tflm_worker`) each other one, at the same time. Every input is still one invoke
    of its own, so the outputs are identical to `workers=1`'s. A model whose ops keep state between invokes
    (variables), or fewer than `MIN_INPUTS_PER_WORKER` inputs a worker, runs here alone.

    Raises:
        MicroTargetError: a worker process failed (its first line of error, or the signal that ended it).
    """
    return run_tflm_alongside(flatbuffer, inputs, arena_bytes, None, workers)[0]


def run_tflm_alongside(flatbuffer: TfliteSource, inputs: np.ndarray, arena_bytes: int,
                       meanwhile: Callable[[], T] | None, workers: int | None = None
                       ) -> tuple[tuple[np.ndarray, ...], T | None]:
    """`run_tflm_outputs`, with `meanwhile()` run in this process while worker processes run every share of the
    inputs (without `meanwhile`, this process runs the first share itself); (TFLM's outputs, what `meanwhile`
    returned). Where the inputs are not split (one worker, a stateful model, few inputs), `meanwhile` runs first,
    then TFLM here.
    """
    model = read_tflite(flatbuffer)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1. Received: workers={workers}")
    workers = min(workers, max(1, len(inputs) // MIN_INPUTS_PER_WORKER))
    if workers > 1 and _STATEFUL_OPS & {op.op for op in model.operators}:
        workers = 1
    interpreter = _interpreter(model, arena_bytes)  # a model TFLM refuses is refused here, in one line
    if workers == 1:
        other = meanwhile() if meanwhile is not None else None
        return _run_share(interpreter, inputs, len(model.outputs)), other
    bounds = np.linspace(0, len(inputs), workers + 1).astype(int)
    first_here = meanwhile is None
    with tempfile.TemporaryDirectory(prefix="tfcompress-tflm-") as tmp:
        model_path = os.path.join(tmp, "model.tflite")
        with open(model_path, "wb") as f:
            f.write(model.data)
        processes = []
        for k in range(1 if first_here else 0, workers):
            share = os.path.join(tmp, f"inputs{k}.npy")
            np.save(share, np.ascontiguousarray(inputs[bounds[k] : bounds[k + 1]]), allow_pickle=False)
            # stderr to a file: a pipe nobody reads until the end could fill and stall the worker.
            with open(os.path.join(tmp, f"stderr{k}.txt"), "w") as stderr:
                processes.append((k, subprocess.Popen(
                    [sys.executable, tflm_worker.__file__, model_path, share, str(int(arena_bytes)),
                     str(len(model.outputs)), os.path.join(tmp, f"outputs{k}.npz")],
                    stdout=subprocess.DEVNULL, stderr=stderr)))
        shares, other = [], None
        try:
            if first_here:
                shares.append(_run_share(interpreter, inputs[bounds[0] : bounds[1]], len(model.outputs)))
            else:
                other = meanwhile()
        finally:
            for _, process in processes:
                process.wait()
        for k, process in processes:
            with open(os.path.join(tmp, f"stderr{k}.txt")) as f:
                error = f.read()
            if process.returncode != 0:
                lines = [line.strip() for line in (error or "").splitlines() if line.strip()]
                how = f"signal {-process.returncode}" if process.returncode < 0 else (
                    lines[-1] if lines else f"exit status {process.returncode}")
                raise MicroTargetError(f"TFLM failed in the worker process that ran inputs {bounds[k]} to "
                                       f"{bounds[k + 1] - 1} ({how}). Run with workers=1 to see it here.")
            with np.load(os.path.join(tmp, f"outputs{k}.npz"), allow_pickle=False) as saved:
                shares.append(tuple(saved[f"arr_{i}"] for i in range(len(model.outputs))))
    outputs = tuple(np.concatenate([share[i] for share in shares], axis=0) for i in range(len(model.outputs)))
    return outputs, other


def check_against_litert(flatbuffer: TfliteSource, inputs: np.ndarray | Iterable[np.ndarray], arena_bytes: int,
                         samples: str, classifiers: frozenset[int] | None = None, workers: int | None = None
                         ) -> tuple[tuple[np.ndarray, ...], LitertComparison]:
    """The TFLM check: TFLM's outputs (`run_tflm_alongside`) and their comparison with LiteRT's
    (`tflm_check.compare_with_litert`), LiteRT's runs made in this process while worker processes run TFLM.

    `inputs` is one array, or chunks of inputs (a streamed source's batches, quantized): each chunk runs in both
    runtimes as it arrives and only the outputs are kept, so memory holds one chunk of inputs.

    Returns:
        TFLM's outputs and the comparison; both identical to a serial run's (`workers=1`) and to one chunk's.
    """
    model = read_tflite(flatbuffer)
    tflm, reference, optimized = [], [], []
    for chunk in [inputs] if isinstance(inputs, np.ndarray) else inputs:
        outputs, (ref, opt) = run_tflm_alongside(model, chunk, arena_bytes,
                                                 lambda chunk=chunk: litert_runs(model, chunk), workers)
        tflm.append(outputs)
        reference.append(ref)
        optimized.append(opt)
    if not tflm:
        raise ValueError("The TFLM check needs at least one input. Received: no inputs")
    outputs = _joined(tflm)
    litert = tuple(dataclasses.replace(runs[0], outputs=_joined([run.outputs for run in runs]))
                   for runs in (reference, optimized))
    return outputs, compare_with_litert(model, None, outputs, samples, classifiers, litert=litert)


def _joined(parts: Sequence[Sequence[np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Per-chunk output tuples → one array per output."""
    return parts[0] if len(parts) == 1 else tuple(np.concatenate(column, axis=0) for column in zip(*parts))


def _run_share(interpreter, inputs: np.ndarray, num_outputs: int) -> tuple[np.ndarray, ...]:
    outputs: list[list[np.ndarray]] = [[] for _ in range(num_outputs)]
    for i in progress(range(len(inputs)), total=len(inputs), desc="running in TFLM"):
        interpreter.set_input(inputs[i : i + 1], 0)
        interpreter.invoke()
        for position, collected in enumerate(outputs):
            collected.append(np.array(interpreter.get_output(position)))
    return tuple(np.concatenate(collected, axis=0) for collected in outputs)


def run_tflm(flatbuffer: TfliteSource, inputs: np.ndarray, arena_bytes: int, workers: int | None = None) -> np.ndarray:
    """`run_tflm_outputs`' first output: for single-output models."""
    return run_tflm_outputs(flatbuffer, inputs, arena_bytes, workers)[0]


def compare_tflm_exact(compressed: TfliteSource, inputs: np.ndarray | Iterable[np.ndarray], arena_bytes: int,
                       reference_outputs: np.ndarray | Sequence[np.ndarray], samples: str) -> TflmComparison:
    """A compressed model in TFLM against the original's TFLM outputs: decoding is lossless, no tolerance.

    Every output is compared element by element (side by side per sample, for several outputs). `inputs` may be
    chunks, as `check_against_litert` takes them.
    """
    decoded = _joined([run_tflm_outputs(compressed, chunk, arena_bytes)
                       for chunk in ([inputs] if isinstance(inputs, np.ndarray) else inputs)])
    if isinstance(reference_outputs, np.ndarray):
        reference_outputs = (reference_outputs,)
    n = len(decoded[0])
    side_by_side = [np.concatenate([np.asarray(o).reshape(n, -1).astype(np.int64) for o in outputs], axis=1)
                    for outputs in (decoded, reference_outputs)]
    return compare_outputs(*side_by_side, samples, "uncompressed TFLM", 0, 1.0)


def lut_compress(flatbuffer: TfliteSource, max_index_bitwidth: int = 4) -> LutCompression:
    """Look-up-table compresses the weight tensors whose values fit tables of at most 2**bitwidth entries.

    Uses `tflite_micro.compression`; TFLM inserts a DECODE op per tensor that expands the weights into the
    arena at run time. The tables follow the tensor's quantization: one per channel along the quantized
    dimension for per-channel weights, one for the tensor otherwise (TFLM decodes a per-tensor-quantized
    tensor with its first table only: per-channel tables there change the model, measured up to 176 steps).

    Raises:
        MicroTargetError: no weight tensor has few enough distinct values (cluster the model first).
    """
    from tflite_micro import compression
    from tflite_micro.tensorflow.lite.micro.compression import spec

    if not 1 <= max_index_bitwidth <= 7:
        raise ValueError("max_index_bitwidth must be in [1, 7] (8 bits saves nothing on int8). "
                         f"Received: max_index_bitwidth={max_index_bitwidth}")
    model = read_tflite(flatbuffer)
    values = model.constants
    builder = compression.SpecBuilder()
    chosen = []
    for _, weights, _ in weight_tensors(model):
        data = values.get(weights.index)
        if data is None or weights.dtype != "int8" or data.ndim < 1 or weights.index in {c[0] for c in chosen}:
            continue
        per_channel = len(weights.scale) > 1
        axis = weights.quantized_dimension
        groups = np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1) if per_channel else data.reshape(1, -1)
        distinct = max(len(np.unique(group)) for group in groups)
        bits = max(1, math.ceil(math.log2(distinct))) if distinct > 1 else 1
        encoded = math.ceil(data.size * bits / 8) + groups.shape[0] * (1 << bits)
        if bits > max_index_bitwidth or encoded >= data.size:
            continue
        mode = spec.PerChannel(axis=axis) if per_channel else spec.PerTensor()
        builder.add_tensor(subgraph=0, tensor=weights.index).with_lut(index_bitwidth=bits, mode=mode)
        chosen.append((weights.index, CompressedTensor(weights.name, "per-channel" if per_channel else "per-tensor",
                                                       distinct, bits, int(data.size))))
    if not chosen:
        raise MicroTargetError(
            f"no weight tensor has at most {1 << max_index_bitwidth} distinct values per channel (per tensor "
            "where it is quantized per tensor), so LUT "
            "compression would save nothing. Cluster the weights first (weight sharing), or drop --compress."
        )
    with warnings.catch_warnings(), native_output_captured():
        warnings.simplefilter("ignore")
        compressed = bytes(compression.compress(model.data, builder.build()))
    return LutCompression(flatbuffer=compressed, tensors=tuple(c for _, c in chosen))
