"""Reading a `.tflite` flatbuffer: ops, tensors, dtypes and I/O, with the schema LiteRT ships.

Every stage that looks inside a converted model (convert's integer-only guard, verify, the TFLM export,
reports) reads it through `read_tflite`, which returns a small frozen `TfliteModel` of plain values that
also keeps the bytes and the schema's object tree. The flatbuffer is parsed with
`ai_edge_litert.schema_py_generated` (the schema module maintained with the interpreter), never by hand.

Parse once per run: every function that takes a model accepts a `TfliteModel` as well as bytes or a path,
and `read_tflite` hands a `TfliteModel` back as it is, so a run parses its flatbuffer once and passes the
parsed model along.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Sequence

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from tfcompress.core import tflite_validate
from tfcompress.core.errors import ModelLoadError

_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_TYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
_FLOAT_TYPES = frozenset({"float32", "float16", "float64", "bfloat16"})
# Ops whose job is to move between float and integer at the model's edges.
_BOUNDARY_OPS = frozenset({"QUANTIZE", "DEQUANTIZE"})


@dataclasses.dataclass(frozen=True)
class Tensor:
    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    is_constant: bool
    quantized_dimension: int = 0


@dataclasses.dataclass(frozen=True)
class Operator:
    index: int
    op: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    custom_code: str = ""


@dataclasses.dataclass(frozen=True)
class TfliteModel:
    """The parts of a `.tflite` file (its first subgraph) that the checks need."""

    num_bytes: int
    sha256: str
    tensors: tuple[Tensor, ...]
    operators: tuple[Operator, ...]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    num_subgraphs: int
    data: bytes = dataclasses.field(default=b"", repr=False, compare=False)
    """The flatbuffer itself, for interpreters and for writing it out."""
    root: object = dataclasses.field(default=None, repr=False, compare=False)
    """The schema's object tree (`schema.ModelT`), for readers that need options or raw buffers."""

    @functools.cached_property
    def constants(self) -> dict[int, np.ndarray]:
        """Every constant tensor of the first subgraph with a known dtype, as an array, by tensor index.

        Read from the flatbuffer's buffers: what ships, not what the Keras model held.
        """
        found = {}
        for i, t in enumerate(self.root.subgraphs[0].tensors or []):
            raw = self.root.buffers[t.buffer].data if t.buffer < len(self.root.buffers) else None
            dtype = _NUMPY_TYPES.get(_TYPE_NAMES.get(t.type, ""))
            if raw is None or len(raw) == 0 or dtype is None:
                continue
            values = np.frombuffer(np.asarray(raw, dtype=np.uint8).tobytes(), dtype=dtype)
            shape = tuple(int(d) for d in t.shape) if t.shape is not None else ()
            found[i] = values.reshape(shape) if int(np.prod(shape)) == values.size else values
        return found

    @property
    def op_names(self) -> tuple[str, ...]:
        return tuple(o.op for o in self.operators)

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in self.op_names:
            counts[name] = counts.get(name, 0) + 1
        return dict(sorted(counts.items()))

    def io_tensors(self) -> tuple[Tensor, ...]:
        return tuple(self.tensors[i] for i in self.inputs + self.outputs)

    def float_ops(self, allow_float_io: bool) -> list[Operator]:
        """Ops that compute in floating point.

        With `allow_float_io`, a QUANTIZE reading a model input and a DEQUANTIZE writing a model output
        are allowed to touch float tensors (that is how float32 I/O wraps an integer model).
        """
        io = set(self.inputs) | set(self.outputs)
        found = []
        for op in self.operators:
            touched = [i for i in op.inputs + op.outputs if i >= 0]
            float_touched = [i for i in touched if self.tensors[i].dtype in _FLOAT_TYPES]
            if not float_touched:
                continue
            if allow_float_io and op.op in _BOUNDARY_OPS and all(i in io for i in float_touched):
                continue
            found.append(op)
        return found

    def describe(self, op: Operator) -> str:
        """`OP (name of its first output)`, for messages."""
        name = self.tensors[op.outputs[0]].name if op.outputs else ""
        label = op.custom_code or op.op
        return f"{label} ({name})" if name else label


TfliteSource = TfliteModel | bytes | bytearray | str | os.PathLike
"""A model as any stage takes it: parsed already, its bytes, or the path of a `.tflite` file."""


def read_tflite(model: TfliteSource) -> TfliteModel:
    """Parses a `.tflite` flatbuffer given as bytes or as a path; a `TfliteModel` is returned as it is.

    Every file and byte string is checked structurally (`tflite_validate`) before anything uses it.

    Raises:
        ModelLoadError: the file is missing, is not a TFLite flatbuffer, or is corrupt (an offset, index,
            buffer size or quantization parameter that does not fit).
    """
    if isinstance(model, TfliteModel):
        return model
    if isinstance(model, (bytes, bytearray)):
        data, source = bytes(model), "the model bytes"
    else:
        source = os.fspath(model)
        if not os.path.isfile(source):
            raise ModelLoadError(
                f"TFLite model not found: {source}. Pass the path of an existing .tflite file."
            )
        with open(source, "rb") as f:
            data = f.read()
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ModelLoadError(
            f"{source} is not a TFLite flatbuffer (no 'TFL3' identifier). "
            "Pass a .tflite file written by the TFLite converter."
        )
    return _parse(data, source)


def model_bytes(model: TfliteSource) -> bytes:
    """The flatbuffer's bytes: a parsed model's own, bytes as they are, a path read (and checked)."""
    if isinstance(model, TfliteModel):
        return model.data
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)
    return read_tflite(model).data


def _parse(data: bytes, source: str) -> TfliteModel:
    """The one place a flatbuffer is parsed (tests count the calls: one per model per run)."""
    try:
        root = schema.ModelT.InitFromPackedBuf(data, 0)
    except Exception as e:  # the generated parser raises assorted errors on truncated data
        detail = " ".join(str(e).split()) or "no detail"
        raise ModelLoadError(f"{source} is a corrupt TFLite flatbuffer ({type(e).__name__}: {detail}). "
                             f"{tflite_validate.FIX}") from None
    tflite_validate.validate(root, data, source)  # indices, buffer sizes, quantization: before any reader
    graph = root.subgraphs[0]
    tensors = []
    for i, t in enumerate(graph.tensors or []):
        q = t.quantization
        scale = tuple(float(s) for s in (q.scale if q is not None and q.scale is not None else ()))
        zps = tuple(int(z) for z in (q.zeroPoint if q is not None and q.zeroPoint is not None else ()))
        buffer = root.buffers[t.buffer] if root.buffers is not None and t.buffer < len(root.buffers) else None
        is_constant = buffer is not None and (
            (buffer.data is not None and len(buffer.data) > 0) or (buffer.size or 0) > 0
        )
        tensors.append(
            Tensor(
                index=i,
                name=_decode(t.name),
                dtype=_TYPE_NAMES.get(t.type, str(t.type)),
                shape=tuple(int(d) for d in (t.shape if t.shape is not None else ())),
                scale=scale,
                zero_point=zps,
                is_constant=is_constant,
                quantized_dimension=int(q.quantizedDimension) if q is not None else 0,
            )
        )
    operators = []
    for i, op in enumerate(graph.operators or []):
        code = root.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        operators.append(
            Operator(
                index=i,
                op=_OP_NAMES.get(builtin, str(builtin)),
                inputs=tuple(int(x) for x in (op.inputs if op.inputs is not None else ())),
                outputs=tuple(int(x) for x in (op.outputs if op.outputs is not None else ())),
                custom_code=_decode(code.customCode),
            )
        )
    return TfliteModel(
        num_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        tensors=tuple(tensors),
        operators=tuple(operators),
        inputs=tuple(int(x) for x in graph.inputs),
        outputs=tuple(int(x) for x in graph.outputs),
        num_subgraphs=len(root.subgraphs),
        data=data,
        root=root,
    )


def output_names(model: TfliteModel) -> tuple[str, ...]:
    """Each output's name in the serving signature (the Keras output name), else its tensor name."""
    by_index = {}
    for signature in (model.root.signatureDefs or []) if model.root is not None else []:
        for item in signature.outputs or []:
            name = item.name.decode() if isinstance(item.name, bytes) else str(item.name)
            by_index.setdefault(int(item.tensorIndex), name)
    return tuple(by_index.get(i, model.tensors[i].name) for i in model.outputs)


def _decode(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def weight_tensors(model: TfliteModel, ops: Sequence[str] = ("CONV_2D", "DEPTHWISE_CONV_2D",
                                                            "FULLY_CONNECTED", "TRANSPOSE_CONV")
                   ) -> list[tuple[Operator, Tensor, Tensor | None]]:
    """(op, weight tensor, bias tensor or None) for every op with learned weights."""
    found = []
    for op in model.operators:
        if op.op not in ops or len(op.inputs) < 2:
            continue
        weights = model.tensors[op.inputs[1]]
        bias_index = 2 if op.op != "TRANSPOSE_CONV" else 3
        bias = None
        if len(op.inputs) > bias_index and op.inputs[bias_index] >= 0:
            bias = model.tensors[op.inputs[bias_index]]
        found.append((op, weights, bias))
    return found


_NUMPY_TYPES = {"int8": "int8", "uint8": "uint8", "int16": "int16", "int32": "int32", "int64": "int64",
                "float32": "float32", "float16": "float16"}


def constant_values(model: TfliteSource) -> dict[int, np.ndarray]:
    """Every constant tensor of the first subgraph with a known dtype, by tensor index (`TfliteModel.constants`)."""
    return read_tflite(model).constants


def weight_sparsity(model: TfliteSource) -> dict[str, float]:
    """Fraction of stored weights equal to their zero point, per layer weight tensor (by tensor name).

    Read from the flatbuffer's constant buffers, so it is what ships: pruning that did not survive
    conversion shows here as a lower fraction than the Keras model's.
    """
    parsed = read_tflite(model)
    values = parsed.constants
    result = {}
    for _, weights, _ in weight_tensors(parsed):
        if weights.index not in values:
            continue
        stored = values[weights.index]
        zero = weights.zero_point[0] if weights.zero_point and len(set(weights.zero_point)) == 1 else 0
        result[weights.name] = float(np.mean(stored == zero)) if stored.size else 0.0
    return result
