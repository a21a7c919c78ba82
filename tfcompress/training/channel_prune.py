"""Channel pruning stage: a Keras model in, a smaller functional model with whole filters removed out.

`prune_channels` takes a trained Sequential or functional model (tf_keras, or Keras 3 translated), follows its
channel groups (`tfcompress.training.channel_graph`), ranks each group's channels by a criterion (L1 or L2
norm of the filters, or the |gamma| of the BatchNormalization after them), removes the lowest-ranked ones
from every layer that makes, passes through or consumes them, and returns a `ChannelPruneResult`: the new
model (the caller's weights, cut; fine-tune it briefly) and a per-layer table of channels, parameters and
multiply-accumulates before and after, with the reason wherever a layer was left whole. Unlike magnitude
pruning, the model that ships is really smaller: fewer MACs, a smaller arena, lower latency. Before
fine-tuning (and without `data`), the new model computes exactly what the original computes with those channels
zeroed (`zero_channels`); with `data`, its BatchNormalization statistics are then measured afresh. The caller's
model is never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Mapping

import numpy as np

from tfcompress.core._keras import keras
from tfcompress.core.keras3 import as_tf_keras
from tfcompress.training.channel_graph import (
    PRODUCERS,
    ChannelPlan,
    channel_plan,
    check_graph_model,
    layer_macs,
)

CRITERIA = ("l1", "l2", "bn_gamma")


@dataclasses.dataclass(frozen=True)
class LayerChannels:
    """One weighted layer (Conv, Dense, DepthwiseConv2D) before and after channel pruning.

    `group` names the channel group of its output (None where it belongs to none); `reason` says why its
    output channels were not cut ("" when they were, or when a ratio of 0 asked for nothing).
    """

    name: str
    kind: str
    channels_before: int
    channels_after: int
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    group: str | None
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class ChannelPruneResult:
    """The channel-pruned model and what happened to each layer.

    Attributes:
        model: the new functional tf_keras model, weights copied from the original's kept channels.
        layers: one `LayerChannels` per weighted layer, in model order.
        ratios: the ratio applied to each prunable group (by the group's name).
        kept: the kept channel indices of each group (sorted), by group name.
        criterion: how channels were ranked.
        params_before, params_after: every parameter of the model (`count_params`).
    """

    model: keras.Model
    layers: tuple[LayerChannels, ...]
    ratios: dict[str, float]
    kept: dict[str, tuple[int, ...]]
    criterion: str
    params_before: int
    params_after: int

    @property
    def macs_before(self) -> int:
        return sum(layer.macs_before for layer in self.layers)

    @property
    def macs_after(self) -> int:
        return sum(layer.macs_after for layer in self.layers)

    def to_json(self) -> dict:
        return {"criterion": self.criterion, "ratios": self.ratios, "params_before": self.params_before,
                "params_after": self.params_after, "macs_before": self.macs_before, "macs_after": self.macs_after,
                "layers": [dataclasses.asdict(layer) for layer in self.layers]}

    def markdown(self) -> str:
        """The per-layer table (channels, parameters, MACs, why a layer stayed whole) as Markdown."""
        rows = ["| layer | kind | channels | parameters | MACs | note |", "|---|---|---|---|---|---|"]
        for layer in self.layers:
            rows.append(f"| {layer.name} | {layer.kind} | {layer.channels_before} → {layer.channels_after} | "
                        f"{layer.params_before:,} → {layer.params_after:,} | {layer.macs_before:,} → "
                        f"{layer.macs_after:,} | {layer.reason} |")
        rows.append(f"| total | | | {self.params_before:,} → {self.params_after:,} | {self.macs_before:,} → "
                    f"{self.macs_after:,} | all parameters; MACs of the weighted layers |")
        return "\n".join(rows)


def prune_channels(
    model: keras.Model,
    ratio: float | None = None,
    *,
    ratios: Mapping[str, float] | None = None,
    criterion: str = "l1",
    data: np.ndarray | None = None,
    channel_multiple: int = 1,
) -> ChannelPruneResult:
    """Removes the lowest-ranked output channels of Conv/Dense layers and everything that reads them.

    ```python
    result = tfcompress.prune_channels(model, 0.5)          # half the channels of every prunable group
    print(result.markdown())                                # channels, parameters, MACs per layer
    small = result.model                                    # fine-tune it: compile, fit a few epochs
    ```

    Channels tied by an element-wise merge (the two inputs of a residual Add) are one group and go together;
    a DepthwiseConv2D passes its channels through (its filters go with them); a Flatten → Dense drops the
    Dense rows of every position of a removed channel; Concatenate keeps each input's channels apart.
    Groups that reach a model output, a Reshape or any layer this does not follow stay whole, and the table
    says why.

    Args:
        model: a trained Sequential or functional tf_keras or Keras 3 model.
        ratio: the fraction of channels to remove from every prunable group, in [0, 1); each group keeps at
            least one channel.
        ratios: per-layer ratios by the name of a Conv/Dense layer (one of a tied group names the group), in
            [0, 1); they override `ratio` for their group.
        criterion: `"l1"` (sum of |w| of each output channel's filter), `"l2"` (its Euclidean norm) or
            `"bn_gamma"` (|gamma| of the BatchNormalization after the layer, network slimming; L1 where
            no BatchNormalization follows). L1 and L2 are of the filter with the following
            BatchNormalization's scale folded in, as it ships. In a tied group each layer's scores are divided
            by their mean before they are added.
        data: a few hundred inputs (training or validation samples) on which the pruned model's
            BatchNormalization statistics are measured afresh (adaptive BN, as EagleEye does): the statistics
            the original learned no longer describe the thinner layers, and without this one removed group costs
            a BatchNorm network far more accuracy before fine-tuning (measured on ResNet-8: `sensitivity`).
            Without `data` the statistics are the original's and the result computes exactly what
            `zero_channels` does.
        channel_multiple: each group keeps a multiple of this many channels (rounded up; a group smaller than it
            stays whole). Measured on an MLPerf-width ResNet-8 in LiteRT (XNNPACK, one thread): 8/16/32 channels
            per stage ran in 0.058 ms, 7/15/31 in 0.070 ms, 9/17/33 in 0.084 ms; 8 suits XNNPACK and CMSIS-NN.

    Returns:
        A `ChannelPruneResult`.

    Raises:
        ValueError: a subclassed model, a ratio outside [0, 1), neither `ratio` nor `ratios`, an unknown
            layer name, a layer whose channels cannot be removed, a ratio that removes every channel, an
            unknown criterion.
    """
    model = check_graph_model(as_tf_keras(model, stage="channel pruning"), "prune_channels")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {list(CRITERIA)}. Received: criterion={criterion!r}")
    if isinstance(channel_multiple, bool) or not isinstance(channel_multiple, int) or channel_multiple < 1:
        raise ValueError(f"channel_multiple is a positive whole number of channels (8 suits XNNPACK and CMSIS-NN, 1 "
                         f"keeps ratios exact). Received: channel_multiple={channel_multiple!r}")
    plan = channel_plan(model)
    group_ratios = resolve_ratios(model, plan, ratio, ratios)
    scores = channel_scores(model, plan, criterion)
    kept = select_channels(plan, scores, group_ratios, channel_multiple)
    new = rebuild(model, plan, kept)
    if data is not None:
        recalibrate_batch_norm(new, data)
    return ChannelPruneResult(
        model=new, layers=_table(plan, new, group_ratios), ratios=group_ratios,
        kept={name: tuple(int(i) for i in keep) for name, keep in kept.items()}, criterion=criterion,
        params_before=model.count_params(), params_after=new.count_params())


def _check_ratio(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(
            f"A channel pruning ratio is the fraction of a layer's channels to remove, in [0, 1); 0.5 removes "
            f"half. Received: {name}={value!r}")
    return float(value)


def resolve_ratios(model, plan: ChannelPlan, ratio, ratios) -> dict[str, float]:
    """The ratio of every prunable group, by group name, from a uniform `ratio` and per-layer `ratios`."""
    if ratio is None and not ratios:
        raise ValueError("Give ratio (the same for every prunable layer) or ratios ({layer name: ratio}). "
                         f"Received: ratio={ratio}, ratios={ratios}")
    uniform = None if ratio is None else _check_ratio(ratio, "ratio")
    result = {g.name: uniform for g in plan.prunable if uniform is not None}
    names = [layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    chosen: dict[str, tuple[str, float]] = {}
    for name, value in dict(ratios or {}).items():
        value = _check_ratio(value, f"ratios[{name!r}]")
        if name not in names:
            raise ValueError(f"ratios names a layer the model does not have: {name!r}; its Conv/Dense layers are "
                             f"{[n for n in names if type(model.get_layer(n)).__name__ in PRODUCERS]}. "
                             f"Received: ratios={dict(ratios)}")
        try:
            group = plan.group(name)
        except KeyError:
            raise ValueError(
                f"{name!r} ({type(model.get_layer(name)).__name__}) makes no output channels of its own; name "
                f"the Conv or Dense layer before it. Received: ratios={dict(ratios)}") from None
        if not group.prunable:
            raise ValueError(f"The channels of {name!r} cannot be removed: its output {group.reason}. Leave it out "
                             f"of ratios. Received: ratios={dict(ratios)}")
        if group.name in chosen and chosen[group.name][1] != value:
            raise ValueError(
                f"{chosen[group.name][0]!r} and {name!r} share their channels (joined by an element-wise merge), "
                f"so they take one ratio; give them the same. Received: ratios={dict(ratios)}")
        removed = math.floor(value * group.channels + 0.5)
        if removed >= group.channels:
            largest = (group.channels - 1) / group.channels
            raise ValueError(
                f"ratios[{name!r}]={value} removes every one of its {group.channels} channels; the largest "
                f"ratio that keeps one is {largest:.3f}. Received: ratios={dict(ratios)}")
        chosen[group.name] = (name, value)
        result[group.name] = value
    return result


def channel_scores(model, plan: ChannelPlan, criterion: str) -> dict[str, np.ndarray]:
    """Each prunable group's channel importance (higher is kept first) under `criterion`.

    L1 and L2 are taken of each filter as it ships: where a BatchNormalization follows the layer, its scale
    gamma / sqrt(variance + epsilon) is folded in first (the converter folds it the same way), since before
    the folding a filter's norm says little about the size of what the channel carries.
    """
    scores = {}
    for group in plan.prunable:
        total = np.zeros(group.channels, dtype=np.float64)
        for name in group.layers:
            norm = _following_batch_norm(model, plan, name)
            if criterion == "bn_gamma" and norm is not None and norm.scale:
                score = np.abs(np.asarray(norm.gamma.numpy(), dtype=np.float64))
            else:
                kernel = np.asarray(model.get_layer(name).kernel.numpy(), dtype=np.float64)
                flat = kernel.reshape(-1, kernel.shape[-1]) * _bn_scale(norm)
                score = np.sqrt((flat**2).sum(0)) if criterion == "l2" else np.abs(flat).sum(0)
            mean = score.mean()
            total += score / mean if mean > 0 else score
        scores[group.name] = total
    return scores


def _following_batch_norm(model, plan: ChannelPlan, producer: str):
    """The BatchNormalization that normalizes `producer`'s output channels (first one found), or None."""
    out = plan.slots[producer][1]
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization" and layer.name in plan.slots:
            inputs = plan.slots[layer.name][0]
            if inputs and np.array_equal(inputs[0], out):
                return layer
    return None


def _bn_scale(norm) -> np.ndarray | float:
    if norm is None:
        return 1.0
    variance = np.asarray(norm.moving_variance.numpy(), dtype=np.float64)
    gamma = np.asarray(norm.gamma.numpy(), dtype=np.float64) if norm.scale else 1.0
    return np.abs(gamma) / np.sqrt(variance + norm.epsilon)


def kept_count(channels: int, ratio: float, multiple: int = 1) -> int:
    """Channels a group of `channels` keeps at `ratio`: at least one, rounded up to a multiple of `multiple`
    (never more than it has)."""
    kept = channels - min(math.floor(ratio * channels + 0.5), channels - 1)
    return min(channels, -(-kept // multiple) * multiple)


def select_channels(plan: ChannelPlan, scores: Mapping[str, np.ndarray], ratios: Mapping[str, float],
                    multiple: int = 1) -> dict[str, np.ndarray]:
    """The kept channel indices (sorted) of each group `ratios` names: the highest-scored `kept_count`."""
    kept = {}
    for name, value in ratios.items():
        group = plan.group(name)
        order = np.argsort(-np.asarray(scores[group.name]), kind="stable")  # ties keep the earlier channel
        kept[group.name] = np.sort(order[:kept_count(group.channels, value, multiple)])
    return kept


def _channel_kept(plan: ChannelPlan, kept: Mapping[str, np.ndarray]) -> np.ndarray:
    """A boolean per channel id: whether it stays."""
    flags = np.ones(len(plan.channel_group), dtype=bool)
    index = {g.name: i for i, g in enumerate(plan.groups)}
    for name, keep in kept.items():
        members = plan.channel_group == index[plan.group(name).name]
        flags[members] = np.isin(plan.channel_index[members], np.asarray(keep))
    return flags


def _mask(slots: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Which slots stay: those of no group, and the kept channels (one lookup for the whole array)."""
    slots = np.asarray(slots, dtype=np.int64)
    return (slots < 0) | flags[np.maximum(slots, 0)]


def recalibrate_batch_norm(model, data: np.ndarray, batch_size: int = 512) -> list[str]:
    """Sets every BatchNormalization's moving mean and variance to the statistics of `data` (its first
    `batch_size` samples, one batch) as the model computes them; returns the layers' names."""
    norms = [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]
    if not norms:
        return []
    x = np.asarray(data, dtype=np.float32)[:batch_size]
    momenta = [layer.momentum for layer in norms]
    try:
        for layer in norms:
            layer.momentum = 0.0  # the moving statistics become this batch's
        model(x, training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
    return [layer.name for layer in norms]


def _sliced_weights(layer, plan: ChannelPlan, flags: np.ndarray, zero: bool) -> list[np.ndarray] | None:
    """The layer's weights with removed channels cut (or, `zero`, set to 0); None when it has none to change."""
    if layer.name not in plan.slots or not layer.get_weights():
        return None
    inputs, out = plan.slots[layer.name]
    kind = type(layer).__name__
    weights = layer.get_weights()
    if kind in PRODUCERS:
        keep_in = _mask(inputs[0], flags)
        produced = plan.slots[layer.name][1]
        keep_out = _mask(produced, flags) if produced is not None and len(produced) == weights[0].shape[-1] else (
            np.ones(weights[0].shape[-1], dtype=bool))
        if zero:
            kernel = weights[0].copy()
            kernel[..., ~keep_out] = 0
            rest = [w * keep_out for w in weights[1:]]
            return [kernel, *rest]
        return [weights[0][..., keep_in, :][..., keep_out], *[w[keep_out] for w in weights[1:]]]
    keep = _mask(inputs[0], flags)
    if kind == "DepthwiseConv2D":
        if zero:
            kernel = weights[0].copy()
            kernel[:, :, ~keep, :] = 0
            return [kernel, *[w * np.repeat(keep, w.shape[0] // len(keep)) for w in weights[1:]]]
        return [weights[0][:, :, keep, :], *[w[keep] for w in weights[1:]]]
    if kind == "BatchNormalization":
        if zero:  # gamma, beta and the moving mean to 0: the channel's output is 0
            names = [w.name.split("/")[-1].split(":")[0] for w in layer.weights]
            return [w if n == "moving_variance" else w * keep for n, w in zip(names, weights)]
        return [w[keep] for w in weights]
    if kind == "PReLU":
        return [w if zero else w[..., keep] if w.shape[-1] == len(keep) else w for w in weights]
    return None


def zero_channels(model: keras.Model, kept: Mapping[str, np.ndarray], plan: ChannelPlan | None = None,
                  target: keras.Model | None = None) -> keras.Model:
    """`model`'s weights with the channels `kept` leaves out zeroed in every layer that makes or passes them
    (the filter and bias, the BatchNormalization's scale, offset and mean, the depthwise filter): what
    `prune_channels` removes, left in place. The channel-pruned model computes the same.

    Writes into `target` (a model of the same architecture, e.g. an earlier result: every layer that holds
    channel weights is set afresh from `model`) or, by default, a new copy; returns it.
    """
    plan = plan or channel_plan(model)
    target = _clone(model) if target is None else target
    flags = _channel_kept(plan, kept)
    for layer in model.layers:
        weights = _sliced_weights(layer, plan, flags, zero=True)
        if weights is not None:
            target.get_layer(layer.name).set_weights(weights)
    return target


def _clone(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def rebuild(model: keras.Model, plan: ChannelPlan, kept: Mapping[str, np.ndarray]) -> keras.Model:
    """A new functional model from `model`'s config with the channels `kept` leaves out removed."""
    model = check_graph_model(model, "prune_channels")
    flags = _channel_kept(plan, kept)
    config = copy.deepcopy(model.get_config())
    for entry in config["layers"]:
        entry.pop("build_config", None)  # built for the old widths
        name = entry["config"].get("name", entry.get("name"))
        if entry["class_name"] in PRODUCERS and name in plan.slots:
            out = plan.slots[name][1]
            entry["config"]["units" if entry["class_name"] == "Dense" else "filters"] = int(_mask(out, flags).sum())
    custom = {type(m).__name__: type(m) for m in model.submodules if isinstance(m, keras.layers.Layer)}
    new = keras.Model.from_config(config, custom_objects=custom)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        weights = _sliced_weights(layer, plan, flags, zero=False)
        new.get_layer(layer.name).set_weights(layer.get_weights() if weights is None else weights)
    return new


def _table(plan: ChannelPlan, new: keras.Model, ratios: Mapping[str, float]) -> tuple[LayerChannels, ...]:
    rows = []
    for layer in plan.layers:
        after = new.get_layer(layer.name)
        group = None if layer.output is None else plan.group(layer.output)
        if layer.depthwise:
            reason = "DepthwiseConv2D: its channels follow its input's"
        elif group is None:
            reason = "its output belongs to no channel group"
        elif not group.prunable:
            reason = f"output kept whole: {group.reason}"
        elif not ratios.get(group.name):
            reason = "ratio 0"
        else:
            reason = ""
        rows.append(LayerChannels(
            name=layer.name, kind=layer.kind, channels_before=layer.channels_out,
            channels_after=int(after.output_shape[-1]), params_before=layer.params,
            params_after=after.count_params(), macs_before=layer.macs, macs_after=layer_macs(after),
            group=None if group is None else group.name, reason=reason))
    return tuple(rows)
