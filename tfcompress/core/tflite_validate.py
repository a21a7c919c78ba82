"""Structural checks of a parsed `.tflite` flatbuffer, before any interpreter or reader relies on it.

LiteRT's schema module parses offsets and vector lengths (`tflite_model._parse` turns whatever it raises
into a `ModelLoadError`); this module checks what the schema cannot: that every index points at something
that exists, that constant buffers hold exactly the bytes their tensor's shape and dtype need, and that
quantization parameters agree with each other and with the shape. A mutated or truncated file then ends in
one line naming what is wrong, instead of an `IndexError` deep in a reader or a crash of an interpreter.

Called by `tflite_model.read_tflite` on every file and every byte string, once per parse.
"""

from __future__ import annotations

import math

from ai_edge_litert import schema_py_generated as schema

from tfcompress.core.errors import ModelLoadError

FIX = "The file is corrupt or truncated: convert the model again."
# Bytes per element of the fixed-size types; int4/uint4/int2 pack several elements into a byte.
_ITEM_BYTES = {
    schema.TensorType.FLOAT32: 4, schema.TensorType.FLOAT16: 2, schema.TensorType.INT32: 4,
    schema.TensorType.UINT8: 1, schema.TensorType.INT64: 8, schema.TensorType.BOOL: 1,
    schema.TensorType.INT16: 2, schema.TensorType.COMPLEX64: 8, schema.TensorType.INT8: 1,
    schema.TensorType.FLOAT64: 8, schema.TensorType.COMPLEX128: 16, schema.TensorType.UINT64: 8,
    schema.TensorType.UINT32: 4, schema.TensorType.UINT16: 2, schema.TensorType.BFLOAT16: 2,
}
_PACKED_BITS = {schema.TensorType.INT4: 4, getattr(schema.TensorType, "UINT4", -4): 4,
                getattr(schema.TensorType, "INT2", -2): 2}
_TYPE_NAMES = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
# The options table each op's readers (MACs, inspection) and kernels expect; another kind is corrupt.
_OPTIONS = {"CONV_2D": "Conv2DOptions", "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions",
            "MAX_POOL_2D": "Pool2DOptions", "AVERAGE_POOL_2D": "Pool2DOptions", "L2_POOL_2D": "Pool2DOptions",
            "FULLY_CONNECTED": "FullyConnectedOptions", "TRANSPOSE_CONV": "TransposeConvOptions",
            "SOFTMAX": "SoftmaxOptions", "RESHAPE": "ReshapeOptions", "ADD": "AddOptions", "MUL": "MulOptions",
            "CONCATENATION": "ConcatenationOptions"}
_OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
_OPTION_NAMES = {v: k for k, v in vars(schema.BuiltinOptions).items() if not k.startswith("_")}
# TFLite counts a tensor's elements in an int: a larger shape is corrupt, not a model.
MAX_ELEMENTS = 2**31 - 1


class _Invalid(Exception):
    """One structural problem, described for the message."""


def validate(root, data: bytes, source: str) -> None:
    """Raises `ModelLoadError` naming the first structural problem of `root` (a `schema.ModelT`).

    `data` is the flatbuffer itself (buffers of models over 2 GB sit past it, by `offset` and `size`).
    """
    try:
        _validate(root, len(data))
    except _Invalid as e:
        raise ModelLoadError(f"{source} is a corrupt TFLite flatbuffer: {e}. {FIX}") from None


def _length(values) -> int:
    return 0 if values is None else len(values)


def _validate(root, num_bytes: int) -> None:
    subgraphs = root.subgraphs or []
    if not subgraphs:
        raise _Invalid("it holds no subgraph (a model has at least one)")
    buffers = root.buffers or []
    num_codes = _length(root.operatorCodes)
    for position, buffer in enumerate(buffers):
        offset, size = int(buffer.offset or 0), int(buffer.size or 0)
        if offset > 1 or size > 0:
            if _length(buffer.data) > 0:
                raise _Invalid(f"buffer {position} holds data inline and at offset {offset} as well")
            if offset <= 1 or offset + size > num_bytes:
                raise _Invalid(f"buffer {position} points at bytes {offset}..{offset + size} of a "
                               f"{num_bytes}-byte file")
    for position, index in enumerate(root.metadataBuffer if root.metadataBuffer is not None else ()):
        if not 0 <= int(index) < len(buffers):
            raise _Invalid(f"metadata buffer {position} is buffer {int(index)}, but the file has {len(buffers)}")
    for item in root.metadata or []:
        if not 0 <= int(item.buffer) < len(buffers):
            raise _Invalid(f"metadata entry's buffer {int(item.buffer)} is out of range (the file has "
                           f"{len(buffers)})")
    for number, graph in enumerate(subgraphs):
        where = f"subgraph {number}: " if len(subgraphs) > 1 else ""
        tensors = graph.tensors or []
        for index, tensor in enumerate(tensors):
            _check_tensor(where, index, tensor, buffers)
        count = len(tensors)
        for kind, indices in (("input", graph.inputs), ("output", graph.outputs)):
            for index in indices if indices is not None else ():
                if not 0 <= int(index) < count:
                    raise _Invalid(f"{where}model {kind} tensor {int(index)} does not exist ({count} tensors)")
        for op_index, op in enumerate(graph.operators or []):
            if not 0 <= int(op.opcodeIndex) < num_codes:
                raise _Invalid(f"{where}operator {op_index}'s opcode index {int(op.opcodeIndex)} is out of range "
                               f"({num_codes} operator codes)")
            code = root.operatorCodes[int(op.opcodeIndex)]
            name = _OP_NAMES.get(max(int(code.builtinCode), int(code.deprecatedBuiltinCode)), "")
            options = int(op.builtinOptionsType or 0)
            if name in _OPTIONS and options and _OPTION_NAMES.get(options) != _OPTIONS[name]:
                raise _Invalid(f"{where}operator {op_index} ({name}) carries "
                               f"{_OPTION_NAMES.get(options, f'unknown options ({options})')} instead of "
                               f"{_OPTIONS[name]}")
            for kind, indices in (("input", op.inputs), ("output", op.outputs),
                                  ("intermediate", op.intermediates)):
                for index in indices if indices is not None else ():
                    if not -1 <= int(index) < count:  # -1: an optional input left out
                        raise _Invalid(f"{where}operator {op_index}'s {kind} tensor {int(index)} does not exist "
                                       f"({count} tensors)")
    for signature in root.signatureDefs or []:
        graph_index = int(signature.subgraphIndex)
        if not 0 <= graph_index < len(subgraphs):
            raise _Invalid(f"a signature names subgraph {graph_index}, but the file has {len(subgraphs)}")
        count = _length(subgraphs[graph_index].tensors)
        for item in (signature.inputs or []) + (signature.outputs or []):
            if not 0 <= int(item.tensorIndex) < count:
                raise _Invalid(f"a signature names tensor {int(item.tensorIndex)}, but its subgraph has {count}")


def _check_tensor(where: str, index: int, tensor, buffers) -> None:
    shape = tuple(int(d) for d in (tensor.shape if tensor.shape is not None else ()))
    if any(d < 0 for d in shape):
        raise _Invalid(f"{where}tensor {index}'s shape {shape} has a negative dimension")
    signature = tuple(int(d) for d in (tensor.shapeSignature if tensor.shapeSignature is not None else ()))
    if any(d < -1 for d in signature):
        raise _Invalid(f"{where}tensor {index}'s shape signature {signature} has a dimension below -1")
    elements = math.prod(shape)
    if elements > MAX_ELEMENTS:
        raise _Invalid(f"{where}tensor {index}'s shape {shape} holds {elements:,} elements, more than "
                       f"TFLite's limit of {MAX_ELEMENTS:,}")
    dtype = int(tensor.type)
    if dtype not in _TYPE_NAMES:
        raise _Invalid(f"{where}tensor {index} has an unknown type ({dtype})")
    if int(getattr(tensor, "externalBuffer", 0) or 0) != 0:
        raise _Invalid(f"{where}tensor {index} keeps its data in an external buffer, which tfcompress does not "
                       "read")
    if not 0 <= int(tensor.buffer) < max(len(buffers), 1):
        raise _Invalid(f"{where}tensor {index}'s buffer {int(tensor.buffer)} does not exist ({len(buffers)} "
                       "buffers)")
    buffer = buffers[int(tensor.buffer)] if buffers else None
    stored = 0 if buffer is None else (_length(buffer.data) or int(buffer.size or 0))
    if stored and tensor.sparsity is None:
        if dtype in _ITEM_BYTES:
            needed = elements * _ITEM_BYTES[dtype]
        elif dtype in _PACKED_BITS:
            # Packed sub-byte weights: the converter stores them packed or one per byte.
            needed = None if stored in (math.ceil(elements * _PACKED_BITS[dtype] / 8), elements) else elements
        else:
            needed = None  # strings, resources, variants: no fixed size
        if needed is not None and stored != needed:
            raise _Invalid(f"{where}tensor {index}'s buffer holds {stored} bytes, its shape {shape} "
                           f"{_TYPE_NAMES[dtype]} needs {needed}")
    _check_quantization(where, index, tensor.quantization, shape)


def _check_quantization(where: str, index: int, q, shape: tuple[int, ...]) -> None:
    if q is None:
        return
    scales, zero_points = _length(q.scale), _length(q.zeroPoint)
    if scales and zero_points and scales != zero_points:
        raise _Invalid(f"{where}tensor {index} has {scales} quantization scale(s) but {zero_points} zero "
                       "point(s)")
    if scales and any(not math.isfinite(float(s)) for s in q.scale):
        raise _Invalid(f"{where}tensor {index} has a non-finite quantization scale")
    if scales > 1:
        axis = int(q.quantizedDimension)
        if not 0 <= axis < len(shape):
            raise _Invalid(f"{where}tensor {index} is quantized per channel along axis {axis}, but its shape "
                           f"{shape} has rank {len(shape)}")
        # The channel count is not checked: TFLM's LUT compression keeps a tensor's per-channel scales on
        # its flattened, encoded copy (measured: 32 scales on shape (21632,)); LiteRT checks it at allocation.
