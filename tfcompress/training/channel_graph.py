"""Channel pruning, part 1: which channels of a Keras model can be removed together, and what each costs.

Takes a Sequential or functional tf_keras model; returns a `ChannelPlan`: the model's channel groups (the
output channels of a Conv/Dense layer, followed through the layers that pass channels through unchanged:
BatchNormalization, element-wise activations, pooling, padding, dropout, DepthwiseConv2D with one multiplier;
groups joined by an element-wise merge such as a residual Add are one group, as their channels must go
together), whether each group can shrink and why not, and for every weighted layer how its input and
output are made of group channels, so that the multiply-accumulates and parameters of any choice of kept
channels are computed without building the model (`ChannelPlan.cost`). Nothing here changes a model:
`tfcompress.training.channel_prune` does, from this plan.

Each tensor's last axis is described as a list of slots, one per feature: a channel id, or -1 for a feature
that belongs to no group (the model's input, or what a layer the plan does not follow made). Flatten repeats
the slots once per spatial position (channels-last order), Concatenate joins them, so a consumer's inputs
are cut by looking up each slot.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tfcompress.core._keras import keras

_NO_CHANNEL = -1

# Activations with f(0) = 0: a removed (zeroed) channel stays zero through them, so removing it is exact.
_ZERO_PRESERVING = {"linear", "relu", "relu6", "tanh", "swish", "silu", "gelu", "elu", "selu", "leaky_relu",
                    "softsign", "hard_swish", "mish"}
_PASS_THROUGH = (
    "BatchNormalization", "ReLU", "LeakyReLU", "ELU", "PReLU", "Dropout", "SpatialDropout1D", "SpatialDropout2D",
    "GaussianNoise", "GaussianDropout", "AlphaDropout", "MaxPooling1D", "MaxPooling2D", "AveragePooling1D",
    "AveragePooling2D", "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D", "ZeroPadding1D", "ZeroPadding2D", "Cropping1D", "Cropping2D", "UpSampling1D",
    "UpSampling2D", "Activation", "DepthwiseConv2D", "ActivityRegularization",
)
_MERGES = ("Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum")
PRODUCERS = ("Conv1D", "Conv2D", "Dense")


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels that are removed together.

    Attributes:
        name: the first producing layer's name (the name `ratios` and the solver use for the group).
        layers: every layer whose output channels these are (several when a merge such as Add ties them).
        channels: how many channels the group has.
        prunable: whether channels of the group can be removed.
        reason: why not ("" when prunable).
    """

    name: str
    layers: tuple[str, ...]
    channels: int
    prunable: bool
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class WeightedLayer:
    """A layer whose cost depends on kept channels: its kernel's input and output described by groups.

    `inputs` counts the input slots per group name (`""` for slots of no group); `output` is the group of
    its output channels (a producer); None for a DepthwiseConv2D (its output channels are its input's) and
    where the output belongs to no group. `macs` are the unpruned per-example multiply-accumulates,
    `kernel_params` and `bias_params` the unpruned weights.
    """

    name: str
    kind: str
    inputs: tuple[tuple[str, int], ...]
    output: str | None
    channels_in: int
    channels_out: int
    macs: int
    kernel_params: int
    bias_params: int
    depthwise: bool = False

    @property
    def params(self) -> int:
        return self.kernel_params + self.bias_params


@dataclasses.dataclass(frozen=True)
class ChannelPlan:
    """The channel groups of a model and the weighted layers whose cost they change."""

    groups: tuple[ChannelGroup, ...]
    layers: tuple[WeightedLayer, ...]
    slots: dict = dataclasses.field(repr=False, compare=False)  # layer name -> (input slots, output slots)
    channel_group: np.ndarray = dataclasses.field(repr=False, compare=False)  # channel id -> index in `groups`
    channel_index: np.ndarray = dataclasses.field(repr=False, compare=False)  # channel id -> index in group

    def group(self, name: str) -> ChannelGroup:
        for group in self.groups:
            if name == group.name or name in group.layers:
                return group
        raise KeyError(name)

    @property
    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    def kept_fraction(self, layer: WeightedLayer, kept: dict[str, int]) -> tuple[float, float]:
        """(fraction of input features, fraction of output channels) that `kept` channels per group leave."""
        sizes = {g.name: g.channels for g in self.groups}
        total = sum(count for _, count in layer.inputs)
        kept_in = sum(count if not name else count * kept.get(name, sizes[name]) / sizes[name]
                      for name, count in layer.inputs)
        fraction_in = kept_in / total if total else 1.0
        fraction_out = 1.0 if layer.output is None else kept.get(layer.output, sizes[layer.output]) / sizes[
            layer.output]
        return fraction_in, fraction_out

    def cost(self, kept: dict[str, int] | None = None) -> tuple[int, int]:
        """(multiply-accumulates per example, parameters) of the weighted layers when each group keeps
        `kept[name]` channels (all of them where a group is not named)."""
        kept = kept or {}
        macs = params = 0
        for layer in self.layers:
            fraction_in, fraction_out = self.kept_fraction(layer, kept)
            if layer.depthwise:  # one filter per channel: in and out are the same channels
                fraction_out, fraction_in = fraction_in, 1.0
            macs += int(round(layer.macs * fraction_in * fraction_out))
            params += int(round(layer.kernel_params * fraction_in * fraction_out))
            params += int(round(layer.bias_params * fraction_out))
        return macs, params


class _Groups:
    """Union-find over groups of channel ids while the graph is walked."""

    def __init__(self):
        self.parent: list[int] = []
        self.layers: list[list[str]] = []
        self.size: list[int] = []
        self.reason: list[str] = []
        self.channel_group: list[int] = []
        self.channel_index: list[int] = []

    def new(self, layer: str, size: int) -> np.ndarray:
        g = len(self.parent)
        self.parent.append(g)
        self.layers.append([layer])
        self.size.append(size)
        self.reason.append("")
        first = len(self.channel_group)
        self.channel_group.extend([g] * size)
        self.channel_index.extend(range(size))
        return np.arange(first, first + size, dtype=np.int64)

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def of(self, channel: int) -> int:
        return self.find(self.channel_group[channel])

    def block(self, slots: np.ndarray, reason: str, first: bool = False) -> None:
        for g in {self.of(int(c)) for c in slots if c != _NO_CHANNEL}:
            if first or not self.reason[g]:
                self.reason[g] = reason

    def tie(self, a: np.ndarray, b: np.ndarray, layer: str) -> None:
        """The channels at each position of `a` and `b` meet in an element-wise merge: one group."""
        for x, y in zip(a.tolist(), b.tolist()):
            if x == y:
                continue
            if _NO_CHANNEL in (x, y):
                self.block(np.array([x, y]), f"merged in {layer} with features that cannot be removed")
                continue
            gx, gy = self.of(x), self.of(y)
            if self.channel_index[x] != self.channel_index[y] or self.size[gx] != self.size[gy]:
                self.block(np.array([x, y]), f"merged in {layer} with channels in another order")
                continue
            if gx != gy:
                gx, gy = min(gx, gy), max(gx, gy)  # the group made first (in model order) names both
                self.parent[gy] = gx
                self.layers[gx].extend(self.layers[gy])
                if self.reason[gy] and not self.reason[gx]:
                    self.reason[gx] = self.reason[gy]


def check_graph_model(model, what: str) -> keras.Model:
    """`model` as a functional tf_keras model, or a `ValueError` saying why it has no graph to rebuild."""
    if not isinstance(model, keras.Model) or (
        not isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", False)
    ):
        raise ValueError(
            f"{what} rebuilds the model's graph layer by layer, so it needs a Sequential or functional Keras "
            "model; a subclassed model has no graph to follow. Rebuild it with keras.Sequential or the "
            f"functional API. Received: model={type(model).__name__}"
        )
    if not model.inputs:
        raise ValueError(
            f"Sequential model {model.name!r} has no input yet, so it has no graph to rebuild. Start it with "
            f"keras.layers.Input(shape) (or call it on data once). Received: model={model.name}"
        )
    if isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def channel_plan(model: keras.Model) -> ChannelPlan:
    """Walks a functional or Sequential tf_keras model and returns its `ChannelPlan`."""
    model = check_graph_model(model, "channel pruning")
    groups = _Groups()
    tensors: dict[int, np.ndarray] = {}  # id(KerasTensor) -> slots
    slots: dict[str, tuple[list[np.ndarray], np.ndarray]] = {}
    weighted: list[tuple] = []
    for tensor in model.inputs:
        tensors[id(tensor)] = np.full(int(tensor.shape[-1] or 0), _NO_CHANNEL, dtype=np.int64)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        nodes = [n for n in layer.inbound_nodes if all(id(t) in tensors for t in _as_list(n.input_tensors))]
        for node in nodes:
            inputs = [tensors[id(t)] for t in _as_list(node.input_tensors)]
            outputs = _as_list(node.output_tensors)
            out = _walk(layer, inputs, outputs, groups, len(nodes) > 1, weighted)
            for tensor in outputs:
                tensors[id(tensor)] = out if out is not None else np.full(
                    int(tensor.shape[-1] or 0), _NO_CHANNEL, dtype=np.int64)
            slots[layer.name] = (inputs, tensors[id(outputs[0])])
    for name, tensor in zip(model.output_names, model.outputs):
        groups.block(tensors[id(tensor)], f"feeds the model's output {name!r}", first=True)
    return _finish(groups, slots, weighted)


def _walk(layer, inputs, outputs, groups: _Groups, shared: bool, weighted: list):
    kind = type(layer).__name__
    width = int(outputs[0].shape[-1] or 0)
    if shared:
        for s in inputs:
            groups.block(s, f"consumed by {layer.name}, a layer called more than once")
        return None
    if kind in PRODUCERS and getattr(layer, "groups", 1) == 1 and _channels_last(layer):
        slots = groups.new(layer.name, width)
        activation = _activation_name(layer)
        if activation not in _ZERO_PRESERVING:
            groups.block(slots, f"{layer.name}'s activation {activation!r} does not map 0 to 0")
        weighted.append((layer, inputs[0], slots, False))
        return slots
    if kind in _PASS_THROUGH and len(inputs) == 1 and len(inputs[0]) == width and _channels_last(layer):
        if kind == "DepthwiseConv2D" and layer.depth_multiplier != 1:
            groups.block(inputs[0], f"consumed by {layer.name}, a DepthwiseConv2D with depth_multiplier > 1")
            weighted.append((layer, inputs[0], None, True))
            return None
        if kind == "BatchNormalization" and list(layer.axis) not in ([-1], [len(outputs[0].shape) - 1]):
            groups.block(inputs[0], f"normalized by {layer.name} along an axis other than the channels")
            return None
        activation = _activation_name(layer)
        if activation is not None and activation not in _ZERO_PRESERVING:
            groups.block(inputs[0], f"through {layer.name}, whose activation {activation!r} does not map 0 to 0")
            return None
        if kind == "DepthwiseConv2D":
            weighted.append((layer, inputs[0], inputs[0], True))
        return inputs[0]
    if kind == "Flatten" and len(inputs) == 1 and width % max(len(inputs[0]), 1) == 0 and len(inputs[0]):
        return np.tile(inputs[0], width // len(inputs[0]))
    if kind == "Concatenate" and layer.axis in (-1, len(outputs[0].shape) - 1):
        return np.concatenate(inputs)
    if kind in _MERGES and all(len(s) == width for s in inputs):
        for other in inputs[1:]:
            groups.tie(inputs[0], other, layer.name)
        return inputs[0]
    for s in inputs:
        groups.block(s, f"consumed by {layer.name} ({kind}), which the channel pruning does not follow")
    if kind in PRODUCERS or kind == "DepthwiseConv2D":
        weighted.append((layer, inputs[0], None, kind == "DepthwiseConv2D"))
    return None


def _finish(groups: _Groups, slots: dict, weighted: list) -> ChannelPlan:
    roots = sorted({groups.find(g) for g in range(len(groups.parent))})
    names = {g: groups.layers[g][0] for g in roots}
    result_groups = tuple(
        ChannelGroup(name=names[g], layers=tuple(groups.layers[g]), channels=groups.size[g],
                     prunable=not groups.reason[g] and groups.size[g] > 1,
                     reason=groups.reason[g] or ("" if groups.size[g] > 1 else "has a single channel"))
        for g in roots)
    position = {root: i for i, root in enumerate(roots)}
    channel_group = np.array([position[groups.find(g)] for g in groups.channel_group], dtype=np.int64)
    names = {i: names[root] for root, i in position.items()}
    layers = []
    for layer, in_slots, out_slots, depthwise in weighted:
        counts: dict[str, int] = {}
        for channel in in_slots.tolist():
            key = "" if channel == _NO_CHANNEL else names[int(channel_group[channel])]
            counts[key] = counts.get(key, 0) + 1
        output = None if out_slots is None or depthwise else names[int(channel_group[out_slots[0]])]
        kernel = int(np.prod(_kernel(layer).shape, dtype=np.int64))
        layers.append(WeightedLayer(
            name=layer.name, kind=type(layer).__name__, inputs=tuple(sorted(counts.items())), output=output,
            channels_in=len(in_slots), channels_out=int(layer.output_shape[-1]), macs=layer_macs(layer),
            kernel_params=kernel, bias_params=layer.count_params() - kernel, depthwise=depthwise))
    return ChannelPlan(groups=result_groups, layers=tuple(layers), slots=slots, channel_group=channel_group,
                       channel_index=np.array(groups.channel_index, dtype=np.int64))


def layer_macs(layer) -> int:
    """Multiply-accumulates per example of a Conv1D/Conv2D/DepthwiseConv2D/Dense layer's first call."""
    out_shape = tuple(layer.output_shape)
    positions = int(np.prod([d or 1 for d in out_shape[1:-1]], dtype=np.int64))
    kernel = tuple(_kernel(layer).shape)
    return positions * int(np.prod(kernel, dtype=np.int64))  # a grouped conv's kernel holds in/groups inputs


def model_macs(model) -> int | None:
    """Multiply-accumulates per example of a Keras model's Conv/Dense/DepthwiseConv2D layers (inside tfmot
    wrappers too, nested models not counted); None when it has none."""
    total, found = 0, False
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)  # tfmot's QuantizeWrapper / PruneLowMagnitude
        if type(inner).__name__ in (*PRODUCERS, "DepthwiseConv2D") and getattr(inner, "built", False):
            try:
                total += layer_macs(inner) if inner is layer else _wrapped_macs(layer, inner)
            except (AttributeError, ValueError, RuntimeError):
                continue
            found = True
    return total if found else None


def _wrapped_macs(wrapper, inner) -> int:
    out_shape = tuple(wrapper.output_shape)
    positions = int(np.prod([d or 1 for d in out_shape[1:-1]], dtype=np.int64))
    return positions * int(np.prod(_kernel(inner).shape, dtype=np.int64))


def _kernel(layer):
    return layer.depthwise_kernel if type(layer).__name__ == "DepthwiseConv2D" else layer.kernel


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _channels_last(layer) -> bool:
    return getattr(layer, "data_format", "channels_last") in ("channels_last", None)


def _activation_name(layer) -> str | None:
    kind = type(layer).__name__
    if kind in ("ReLU", "LeakyReLU", "ELU", "PReLU"):
        return "relu"
    activation = getattr(layer, "activation", None)
    if activation is None:
        return None
    return getattr(activation, "__name__", str(activation))
