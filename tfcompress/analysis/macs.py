"""Counting the arithmetic of a converted model: multiply-accumulates (MACs) per layer of a `.tflite`.

Part of the inspection stage: takes a `.tflite` flatbuffer (bytes or path), returns a `MacCount` with one
`LayerCost` per operator of the first subgraph. Shapes come from the flatbuffer, so the counts are for
one inference at the batch size stored in the model (1 for models converted with a dynamic batch).

Convention (two separate numbers, never added together):

- `macs`: multiply-accumulates of the layers that multiply weights with activations.
  CONV_2D: `out_h*out_w*out_c*k_h*k_w*in_c` (`in_c` taken from the filter, so grouped convolutions
  count right); DEPTHWISE_CONV_2D: `out_h*out_w*out_c*k_h*k_w`; FULLY_CONNECTED: `batch*out*in`;
  TRANSPOSE_CONV: `in_h*in_w*in_c*k_h*k_w*out_c` (every input value is scattered through the whole
  filter); BATCH_MATMUL: `output elements * K`.
- `other_ops`: elementary operations that are not MACs. Pooling (MAX/AVERAGE/L2_POOL_2D): output
  elements times the window (`filter_h*filter_w`), one comparison or addition per window value;
  elementwise ADD, SUB, MUL, DIV, SQUARED_DIFFERENCE, MAXIMUM, MINIMUM: one per output element.

Every other op (reshapes, activations, QUANTIZE ...) counts 0 in both.
"""

from __future__ import annotations

import dataclasses
import math


from tfcompress.core.tflite_model import TfliteModel, TfliteSource, read_tflite

MAC_OPS = frozenset({"CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL"})
POOL_OPS = frozenset({"MAX_POOL_2D", "AVERAGE_POOL_2D", "L2_POOL_2D"})
ELEMENTWISE_OPS = frozenset({"ADD", "SUB", "MUL", "DIV", "SQUARED_DIFFERENCE", "MAXIMUM", "MINIMUM"})


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """The arithmetic of one operator.

    Attributes:
        op_index: the operator's position in the first subgraph.
        op: its builtin name (or custom code).
        name: the name of its first output tensor.
        macs: multiply-accumulates (see the module docstring).
        other_ops: pooling window operations and elementwise operations.
    """

    op_index: int
    op: str
    name: str
    macs: int
    other_ops: int


@dataclasses.dataclass(frozen=True)
class MacCount:
    """Per-layer costs (in operator order) and their totals."""

    layers: tuple[LayerCost, ...]
    total_macs: int
    total_other_ops: int


def count_macs(model: TfliteSource) -> MacCount:
    """Counts MACs and other operations per operator of a `.tflite` model.

    Args:
        model: the flatbuffer as bytes, or the path of a `.tflite` file.

    Returns:
        A `MacCount`; see the module docstring for what each number counts.

    Raises:
        ModelLoadError: the file is missing or is not a TFLite flatbuffer.
    """
    parsed = read_tflite(model)  # raises the one-line ModelLoadError for a bad path
    root = parsed.root
    options = [op.builtinOptions for op in (root.subgraphs[0].operators or [])]
    layers = tuple(_layer_cost(parsed, op, opts) for op, opts in zip(parsed.operators, options))
    return MacCount(
        layers=layers,
        total_macs=sum(layer.macs for layer in layers),
        total_other_ops=sum(layer.other_ops for layer in layers),
    )


def _layer_cost(parsed: TfliteModel, op, options) -> LayerCost:
    def shape(position: int, outputs: bool = False) -> tuple[int, ...]:
        indices = op.outputs if outputs else op.inputs
        if position >= len(indices) or indices[position] < 0:
            return ()
        return parsed.tensors[indices[position]].shape

    out = shape(0, outputs=True)
    out_elements = math.prod(out) if out else 0
    macs = other = 0
    if op.op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") and len(shape(1)) >= 2:
        weights = shape(1)
        # CONV_2D filter [out_c, k_h, k_w, in_c]; DEPTHWISE [1, k_h, k_w, out_c]; FC [out, in].
        per_output = {"CONV_2D": math.prod(weights[1:]), "DEPTHWISE_CONV_2D": math.prod(weights[1:3]),
                      "FULLY_CONNECTED": weights[-1]}[op.op]
        macs = out_elements * per_output
    elif op.op == "TRANSPOSE_CONV" and len(shape(1)) == 4:
        # Inputs are (output_shape, filter [out_c, k_h, k_w, in_c], input).
        macs = math.prod(shape(2)) * math.prod(shape(1)[:3])
    elif op.op == "BATCH_MATMUL" and len(shape(0)) >= 2:
        lhs = shape(0)
        adj_x = bool(getattr(options, "adjX", False))
        macs = out_elements * (lhs[-2] if adj_x else lhs[-1])
    elif op.op in POOL_OPS and options is not None:
        other = out_elements * int(options.filterHeight) * int(options.filterWidth)
    elif op.op in ELEMENTWISE_OPS:
        other = out_elements
    name = parsed.tensors[op.outputs[0]].name if op.outputs else ""
    return LayerCost(op_index=op.index, op=op.custom_code or op.op, name=name, macs=int(macs),
                     other_ops=int(other))
