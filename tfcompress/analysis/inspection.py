"""Inspection stage: what a `.tflite` file holds, as numbers a report or a person can check.

Takes a `.tflite` flatbuffer (bytes or path) and returns an `Inspection`, a frozen dataclass computed
first and rendered separately (`render_text`, `to_json`): the file's size and sha256; op counts; every
tensor with its dtype, shape, stored bytes and quantization (scale, zero point, per-channel count and
axis); the model's inputs and outputs; per layer its MACs and other operations (see `tfcompress.analysis.macs`
for the convention), its stored weight bytes and the fraction of its weights that are zero. Reads only
the flatbuffer (parsed with LiteRT's schema module), never runs it. The module is not called `inspect`:
a script run from this folder (`latency.py` is) would then import it in place of the standard library's.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any
from collections.abc import Mapping

import numpy as np

from tfcompress.analysis.macs import count_macs
from tfcompress.core.tflite_model import Tensor, TfliteModel, TfliteSource, read_tflite, weight_tensors

_NUMPY_TYPES = {"int4": None, "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32,
                "int64": np.int64, "float16": np.float16, "float32": np.float32, "float64": np.float64}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of the first subgraph.

    Attributes:
        index, name, dtype, shape: as stored in the flatbuffer.
        is_constant: it has data in the file (weights, biases, shapes).
        num_bytes: the bytes of data stored for it (0 for activations).
        scale, zero_point: its quantization, one entry per channel when quantized per channel.
        per_channel_count: how many channels carry their own scale (0: per-tensor or unquantized).
        quantized_dimension: the channel axis of per-channel quantization.
    """

    index: int
    name: str
    dtype: str
    shape: tuple[int, ...]
    is_constant: bool
    num_bytes: int
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    per_channel_count: int
    quantized_dimension: int


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """One operator with its arithmetic and, for weighted layers, its stored weights.

    Attributes:
        index: the operator's position.
        op: builtin name or custom code.
        name: the name of its first output tensor.
        macs, other_ops: see `tfcompress.analysis.macs`.
        weight_bytes: bytes of its constant weight and bias tensors (0 for layers without weights).
        weight_zero_fraction: fraction of weights equal to their zero point (exact zeros for float
            weights); None for layers without readable weights.
    """

    index: int
    op: str
    name: str
    macs: int
    other_ops: int
    weight_bytes: int
    weight_zero_fraction: float | None


@dataclasses.dataclass(frozen=True)
class Inspection:
    """Everything `inspect_tflite` found; `render_text` and `to_json` present it."""

    source: str
    num_bytes: int
    sha256: str
    num_subgraphs: int
    op_counts: Mapping[str, int]
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    tensors: tuple[TensorInfo, ...]
    layers: tuple[LayerInfo, ...]
    total_macs: int
    total_other_ops: int
    weight_bytes: int
    constant_bytes: int


def inspect_tflite(model: TfliteSource) -> Inspection:
    """Reads a `.tflite` model and computes its inspection.

    Args:
        model: the flatbuffer as bytes, or the path of a `.tflite` file.

    Returns:
        The `Inspection` of the first subgraph (`num_subgraphs` says whether there are more).

    Raises:
        ModelLoadError: the file is missing or is not a TFLite flatbuffer.
    """
    if isinstance(model, (TfliteModel, bytes, bytearray)):
        source = "<bytes>"
    else:
        source = os.fspath(model)
    parsed = read_tflite(model)  # the one-line ModelLoadError for a missing file or a non-flatbuffer
    data, root = parsed.data, parsed.root
    raw_tensors = root.subgraphs[0].tensors or []
    tensors = tuple(_tensor_info(t, raw, root) for t, raw in zip(parsed.tensors, raw_tensors))
    costs = {c.op_index: c for c in count_macs(parsed).layers}
    weights = _layer_weights(parsed, root, data, tensors)
    layers = tuple(
        LayerInfo(index=op.index, op=op.custom_code or op.op, name=costs[op.index].name,
                  macs=costs[op.index].macs, other_ops=costs[op.index].other_ops,
                  weight_bytes=weights.get(op.index, (0, None))[0],
                  weight_zero_fraction=weights.get(op.index, (0, None))[1])
        for op in parsed.operators
    )
    return Inspection(
        source=source, num_bytes=parsed.num_bytes, sha256=parsed.sha256,
        num_subgraphs=parsed.num_subgraphs, op_counts=parsed.op_counts(),
        inputs=tuple(tensors[i] for i in parsed.inputs),
        outputs=tuple(tensors[i] for i in parsed.outputs),
        tensors=tensors, layers=layers,
        total_macs=sum(layer.macs for layer in layers),
        total_other_ops=sum(layer.other_ops for layer in layers),
        weight_bytes=sum(layer.weight_bytes for layer in layers),
        constant_bytes=sum(t.num_bytes for t in tensors),
    )


def _buffer_bytes(raw_tensor, root, data: bytes) -> bytes:
    """The data stored for a tensor: inline, or (models over 2 GB) at an offset past the flatbuffer."""
    if root.buffers is None or raw_tensor.buffer >= len(root.buffers):
        return b""
    buffer = root.buffers[raw_tensor.buffer]
    if buffer.data is not None and len(buffer.data) > 0:
        return np.asarray(buffer.data, dtype=np.uint8).tobytes()
    if (buffer.offset or 0) > 1 and (buffer.size or 0) > 0:
        return data[buffer.offset: buffer.offset + buffer.size]
    return b""


def _tensor_info(tensor: Tensor, raw_tensor, root) -> TensorInfo:
    buffers = root.buffers or []
    buffer = buffers[raw_tensor.buffer] if raw_tensor.buffer < len(buffers) else None
    num_bytes = 0
    if buffer is not None:
        num_bytes = len(buffer.data) if buffer.data is not None else int(buffer.size or 0)
    quantization = raw_tensor.quantization
    return TensorInfo(
        index=tensor.index, name=tensor.name, dtype=tensor.dtype, shape=tensor.shape,
        is_constant=tensor.is_constant, num_bytes=num_bytes, scale=tensor.scale,
        zero_point=tensor.zero_point, per_channel_count=len(tensor.scale) if len(tensor.scale) > 1 else 0,
        quantized_dimension=int(quantization.quantizedDimension) if quantization is not None else 0,
    )


def _layer_weights(parsed: TfliteModel, root, data: bytes,
                   tensors: tuple[TensorInfo, ...]) -> dict[int, tuple[int, float | None]]:
    """op index -> (weight + bias bytes, zero fraction of the weights) for every weighted layer."""
    raw_tensors = root.subgraphs[0].tensors
    # float16 models store weights as float16 constants behind a DEQUANTIZE: follow it to the constant.
    producers = {op.outputs[0]: op for op in parsed.operators if op.op == "DEQUANTIZE" and op.outputs}
    result = {}
    def constant(index: int) -> int:
        return producers[index].inputs[0] if not tensors[index].is_constant and index in producers else index

    for op, weights, bias in weight_tensors(parsed):
        stored = constant(weights.index)
        info = tensors[stored]
        num_bytes = info.num_bytes + (tensors[constant(bias.index)].num_bytes if bias is not None else 0)
        fraction = None
        dtype = _NUMPY_TYPES.get(info.dtype)
        raw = _buffer_bytes(raw_tensors[stored], root, data) if info.is_constant else b""
        if dtype is not None and raw and raw_tensors[stored].sparsity is None:
            values = np.frombuffer(raw, dtype=dtype).reshape(info.shape)
            fraction = float(np.mean(values == _zero_points(info, values.ndim))) if values.size else 0.0
        result[op.index] = (num_bytes, fraction)
    return result


def _zero_points(info: TensorInfo, ndim: int) -> np.ndarray:
    """The stored value that means 0: per channel along the quantized axis, or one for the tensor."""
    if len(info.zero_point) > 1:
        shape = [1] * ndim
        shape[info.quantized_dimension] = len(info.zero_point)
        return np.asarray(info.zero_point).reshape(shape)
    return np.asarray(info.zero_point[0] if info.zero_point else 0)


def to_json(inspection: Inspection) -> dict[str, Any]:
    """The inspection as plain JSON types (lists, not tuples), ready for `json.dumps`."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    result = plain(dataclasses.asdict(inspection))
    result["op_counts"] = dict(inspection.op_counts)
    return result


def _quantization(t: TensorInfo) -> str:
    if not t.scale:
        return "-"
    if len(t.scale) == 1:
        return f"scale={t.scale[0]:.6g} zp={t.zero_point[0] if t.zero_point else 0}"
    return (f"per-channel x{len(t.scale)} (axis {t.quantized_dimension}) "
            f"scale={min(t.scale):.3g}..{max(t.scale):.3g}")


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def render_text(inspection: Inspection) -> str:
    """A human-readable report of `inspection`: summary, I/O, ops, layers, then every tensor."""
    i = inspection
    lines = [
        f"{i.source}: {i.num_bytes:,} bytes, sha256 {i.sha256}",
        f"  {len(i.layers)} ops, {len(i.tensors)} tensors, {i.num_subgraphs} subgraph(s) (first shown); "
        f"{i.total_macs:,} MACs + {i.total_other_ops:,} other ops per inference; weights "
        f"{i.weight_bytes:,} bytes, all constants {i.constant_bytes:,} bytes",
    ]
    for kind, group in (("input", i.inputs), ("output", i.outputs)):
        for t in group:
            lines.append(f"  {kind} #{t.index} {t.name} {t.dtype} {_shape(t.shape)} {_quantization(t)}")
    lines.append("  ops: " + ", ".join(f"{op} x{n}" for op, n in i.op_counts.items()))
    lines.append("")
    lines.append(f"{'#':>4}  {'op':<20} {'MACs':>13} {'other ops':>11} {'weight bytes':>13} "
                 f"{'zeros':>6}  output")
    for layer in i.layers:
        zeros = "" if layer.weight_zero_fraction is None else f"{layer.weight_zero_fraction:.1%}"
        weight_bytes = f"{layer.weight_bytes:,}" if layer.weight_bytes else ""
        lines.append(f"{layer.index:>4}  {layer.op:<20} {layer.macs:>13,} {layer.other_ops:>11,} "
                     f"{weight_bytes:>13} {zeros:>6}  {layer.name}")
    lines.append(f"{'':>4}  {'total':<20} {i.total_macs:>13,} {i.total_other_ops:>11,} {i.weight_bytes:>13,}")
    lines.append("")
    lines.append(f"{'#':>4}  {'dtype':<8} {'shape':<18} {'bytes':>10}  {'quantization':<52} name")
    for t in i.tensors:
        stored = f"{t.num_bytes:,}" if t.is_constant else ""
        lines.append(f"{t.index:>4}  {t.dtype:<8} {_shape(t.shape):<18} {stored:>10}  "
                     f"{_quantization(t):<52} {t.name}")
    return "\n".join(lines)
