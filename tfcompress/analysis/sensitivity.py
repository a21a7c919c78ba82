"""Sensitivity analysis and the channel budget solver: which layers can lose channels (or weights) cheaply.

Takes a trained Keras model and validation data; `sensitivity` prunes each prunable layer alone at each
ratio, without fine-tuning, two ways (whole channels as `tfcompress.prune_channels` would remove them, and
unstructured magnitude pruning of the kernel) and measures the validation metric each time, as Distiller's
sensitivity analysis does. Returns a `SensitivityResult` (JSON, Markdown table, PNG of metric against ratio,
a line per layer). `solve_ratios` turns the channel curves into per-group ratios that meet a budget of
multiply-accumulates or parameters with the least predicted loss: a greedy walk that each time takes the
one step of one group that buys the most cost per unit of predicted loss (losses of the layers added, as
measured alone). Use validation data only: the ratios are chosen on it.
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence

import numpy as np

from tfcompress.core._keras import keras
from tfcompress.core.keras3 import as_tf_keras
from tfcompress.training.channel_graph import ChannelPlan, channel_plan, check_graph_model
from tfcompress.training.channel_prune import (
    CRITERIA,
    _clone,
    channel_scores,
    kept_count,
    recalibrate_batch_norm,
    select_channels,
    zero_channels,
)

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
KINDS = ("channel", "unstructured")
METRICS = {"accuracy": True, "top1_agreement": True, "mse": False}  # metric -> higher is better


@dataclasses.dataclass(frozen=True)
class Curve:
    """The metric of the model with one layer (or channel group) pruned alone, per ratio."""

    layer: str
    kind: str
    channels: int
    ratios: tuple[float, ...]
    values: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class SensitivityResult:
    """Per-layer sensitivity curves.

    Attributes:
        metric: `"accuracy"` (class labels), `"mse"` (regression targets), or without labels
            `"top1_agreement"` (a classifier's own predictions) / `"mse"` to its own outputs.
        baseline: the unpruned model's metric on the same data.
        num_samples: the validation samples measured on.
        curves: channel curves (one per prunable channel group, named by its first layer) and unstructured
            curves (one per weighted layer).
        criterion: how channels were ranked.
    """

    metric: str
    baseline: float
    num_samples: int
    curves: tuple[Curve, ...]
    criterion: str

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    def loss(self, value: float) -> float:
        """How much worse `value` is than the baseline (accuracy points lost, or MSE gained), ≥ 0 when worse."""
        return self.baseline - value if self.higher_is_better else value - self.baseline

    def curve(self, layer: str, kind: str = "channel") -> Curve:
        for curve in self.curves:
            if curve.layer == layer and curve.kind == kind:
                return curve
        raise KeyError((layer, kind))

    def to_json(self) -> dict:
        return {"metric": self.metric, "baseline": self.baseline, "num_samples": self.num_samples,
                "criterion": self.criterion, "curves": [dataclasses.asdict(c) for c in self.curves]}

    def markdown(self) -> str:
        ratios = sorted({r for c in self.curves for r in c.ratios})
        lines = [f"Sensitivity: {self.metric} on {self.num_samples} validation samples (unpruned "
                 f"{self.baseline:.4f}), each layer pruned alone, no fine-tuning; channels ranked by "
                 f"{self.criterion}.", "",
                 "| layer | kind | channels | " + " | ".join(f"{r:g}" for r in ratios) + " |",
                 "|---|---|---:|" + "---:|" * len(ratios)]
        for c in self.curves:
            values = dict(zip(c.ratios, c.values))
            cells = " | ".join(f"{values[r]:.4f}" if r in values else "" for r in ratios)
            lines.append(f"| {c.layer} | {c.kind} | {c.channels} | {cells} |")
        return "\n".join(lines) + "\n"

    def plot(self) -> bytes:
        """A PNG: the metric against the ratio, one line per layer, channel and unstructured side by side."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, kind in zip(axes, KINDS):
            for c in (c for c in self.curves if c.kind == kind):
                ax.plot([0.0, *c.ratios], [self.baseline, *c.values], marker="o", markersize=3, label=c.layer)
            ax.set_title(f"{kind} pruning, one layer at a time")
            ax.set_xlabel("ratio pruned")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0].set_ylabel(self.metric)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
        plt.close(fig)
        return buffer.getvalue()


def sensitivity(
    model: keras.Model,
    x: np.ndarray,
    y: np.ndarray | None = None,
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    kinds: Sequence[str] = KINDS,
    criterion: str = "l1",
    output: str | None = None,
    batch_size: int = 256,
    channel_multiple: int = 1,
) -> SensitivityResult:
    """Prunes each layer alone at each ratio and measures the model on validation data, without fine-tuning.

    ```python
    result = tfcompress.sensitivity(model, x_val, y_val)    # validation split, never the test split
    print(result.markdown())
    ```

    Args:
        model: a trained Sequential or functional tf_keras or Keras 3 model.
        x, y: validation inputs and their labels: class indices (or one-hot) give accuracy, float targets
            shaped like the output give the mean squared error; without `y`, the unpruned model's own
            predictions are the reference (top-1 agreement for a softmax-like output, else MSE).
        ratios: fractions pruned, each in (0, 1).
        kinds: `"channel"` (whole channels of each prunable group, `prune_channels`' way) and/or
            `"unstructured"` (smallest |w| of each Conv/Dense/DepthwiseConv2D kernel).
        criterion: how channels are ranked (as `prune_channels`). After each removal the BatchNormalization
            statistics are measured afresh on (the first 512 of) `x`, as `prune_channels(data=...)` does.
        output: the output measured, by name, for a model with several (default the first).
        channel_multiple: channels are removed so that a multiple of this many stay (as `prune_channels`).

    Raises:
        ValueError: bad ratios, kinds, criterion or output name, or labels that fit neither metric.
    """
    model = check_graph_model(as_tf_keras(model, stage="sensitivity analysis"), "sensitivity")
    ratios = _check_ratios(ratios)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {list(KINDS)}. Received: kinds={list(kinds)}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {list(CRITERIA)}. Received: criterion={criterion!r}")
    position = _output_position(model, output)
    x = np.asarray(x, dtype=np.float32)
    reference = _predict(model, x, position, batch_size)
    metric, measure = _metric(reference, y)
    baseline = measure(reference)
    plan = channel_plan(model)
    work = _clone(model)
    curves = []
    if "channel" in kinds:
        scores = channel_scores(model, plan, criterion)
        for group in plan.prunable:
            values = []
            for ratio in ratios:
                kept = select_channels(plan, scores, {group.name: ratio}, channel_multiple)
                zero_channels(model, kept, plan, target=work)  # every channel layer set afresh
                recalibrate_batch_norm(work, x)  # as prune_channels(data=...) does
                values.append(measure(_predict(work, x, position, batch_size)))
            curves.append(Curve(group.name, "channel", group.channels, ratios, tuple(values)))
        zero_channels(model, {}, plan, target=work)  # back to the model's own weights
    if "unstructured" in kinds:
        for layer in plan.layers:
            original = model.get_layer(layer.name).get_weights()
            values = []
            for ratio in ratios:
                kernel = original[0].copy()
                count = int(math.floor(ratio * kernel.size + 0.5))
                if count:
                    smallest = np.argsort(np.abs(kernel).ravel(), kind="stable")[:count]
                    kernel.ravel()[smallest] = 0
                work.get_layer(layer.name).set_weights([kernel, *original[1:]])
                values.append(measure(_predict(work, x, position, batch_size)))
            work.get_layer(layer.name).set_weights(original)
            curves.append(Curve(layer.name, "unstructured", layer.channels_out, ratios, tuple(values)))
    return SensitivityResult(metric, float(baseline), len(x), tuple(curves), criterion)


def _check_ratios(ratios) -> tuple[float, ...]:
    values = tuple(ratios)
    if not values or any(isinstance(r, bool) or not isinstance(r, (int, float, np.floating)) or not 0 < r < 1
                         for r in values):
        raise ValueError("ratios are fractions pruned, each in (0, 1), e.g. 0.1 ... 0.9. "
                         f"Received: ratios={list(values)}")
    return tuple(sorted(float(r) for r in values))


def _output_position(model, output) -> int:
    names = list(model.output_names)
    if output is None:
        return 0
    if output not in names:
        raise ValueError(f"output must name one of the model's outputs {names}. Received: output={output!r}")
    return names.index(output)


def _predict(model, x, position: int, batch_size: int) -> np.ndarray:
    outputs = model.predict(x, batch_size=batch_size, verbose=0)
    return np.asarray(outputs[position] if isinstance(outputs, (list, tuple)) else outputs)


def _metric(reference: np.ndarray, y):
    """(name, function of predictions) for the labels given."""
    if y is None:
        if reference.ndim == 2 and reference.shape[1] > 1:
            top = reference.argmax(-1)
            return "top1_agreement", lambda p: float(np.mean(p.argmax(-1) == top))
        return "mse", lambda p: float(np.mean((p - reference) ** 2))
    y = np.asarray(y)
    if y.shape == reference.shape and y.dtype.kind == "f" and not (reference.ndim == 2 and _one_hot(y)):
        return "mse", lambda p: float(np.mean((p - y) ** 2))
    if y.ndim == 2 and y.shape == reference.shape:
        y = y.argmax(-1)
    if y.ndim == 1 and len(y) == len(reference) and reference.ndim == 2:
        labels = y.astype(np.int64)
        if reference.shape[1] == 1:
            return "accuracy", lambda p: float(np.mean((p[:, 0] > 0.5) == (labels > 0)))
        return "accuracy", lambda p: float(np.mean(p.argmax(-1) == labels))
    raise ValueError(
        f"Labels of shape {y.shape} fit neither class labels ({len(reference)},) nor targets shaped like the "
        f"output {reference.shape}. Pass class indices or targets shaped like the output. Received: y.shape={y.shape}")


def _one_hot(y: np.ndarray) -> bool:
    return bool(np.all((y == 0) | (y == 1)) and np.all(y.sum(-1) == 1))


@dataclasses.dataclass(frozen=True)
class Solution:
    """Per-group ratios from `solve_ratios` and what they cost and are predicted to lose."""

    ratios: dict[str, float]
    kept: dict[str, int]
    macs: int
    params: int
    macs_fraction: float
    params_fraction: float
    predicted_loss: float
    """The common loss each group was allowed (its measured loss alone, interpolated): not a sum."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def solve_ratios(result: SensitivityResult, plan: ChannelPlan, *, target_macs: float | None = None,
                 target_params: float | None = None, channel_multiple: int = 1) -> Solution:
    """Per-group channel ratios that meet a budget, each group pruned as far as one common loss allows.

    Each group's curve (its measured loss at each ratio, made non-decreasing, with a slight slope so that flat
    stretches are shared out evenly, interpolated linearly from 0 at ratio 0) gives, for a tolerated loss t, the
    largest ratio whose loss stays within t; t is found by bisection as the smallest that meets the budget.
    Sensitive groups keep more channels, robust ones fewer, and no group is pushed far past where it breaks to
    save a little cost elsewhere (Distiller's sensitivity pruning picks per-layer ratios from one tolerated loss
    the same way).

    Args:
        result: channel sensitivity curves of the model `plan` describes.
        plan: the model's `ChannelPlan`.
        target_macs, target_params: the fraction of the weighted layers' multiply-accumulates / parameters to
            keep, in (0, 1].
        channel_multiple: kept channels are rounded up to a multiple of this (as `prune_channels`).

    Raises:
        ValueError: no target, a target outside (0, 1], or one that no choice reaches (the message says the
            smallest reachable fraction).
    """
    targets = {"target_macs": target_macs, "target_params": target_params}
    if all(v is None for v in targets.values()):
        raise ValueError("Give target_macs or target_params (the fraction to keep, in (0, 1]). "
                         f"Received: target_macs={target_macs}, target_params={target_params}")
    for name, value in targets.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
            raise ValueError(f"{name} is the fraction to keep, in (0, 1]; 0.5 halves it. Received: {name}={value}")
    base_macs, base_params = plan.cost({})
    curves = {c.layer: c for c in result.curves if c.kind == "channel"}
    groups = [g for g in plan.prunable if g.name in curves]
    # A slope of `tie` per unit of ratio under every curve: where curves are flat (no measurable loss, common for
    # the first ratios), groups grow together as the tolerated loss grows, instead of all jumping to the end of
    # their flat part at once and overshooting the budget.
    tie = 1e-3 * max(abs(result.baseline), 1e-9)
    points = {}
    for g in groups:
        worst, row = 0.0, [(0.0, 0.0)]
        for ratio, value in zip(curves[g.name].ratios, curves[g.name].values):
            worst = max(worst, result.loss(value))
            row.append((ratio, worst + tie * ratio))
        points[g.name] = row

    def ratios_at(tolerated: float) -> dict[str, float]:
        return {g.name: _largest_ratio(points[g.name], tolerated) for g in groups}

    def cost(ratios) -> tuple[int, int]:
        return plan.cost({g.name: kept_count(g.channels, ratios[g.name], channel_multiple) for g in groups})

    def met(ratios) -> bool:
        macs, params = cost(ratios)
        return ((target_macs is None or macs <= target_macs * base_macs + 1e-9)
                and (target_params is None or params <= target_params * base_params + 1e-9))

    highest = max((row[-1][1] for row in points.values()), default=0.0) + 1.0
    if not met(ratios_at(highest)):
        macs, params = cost(ratios_at(highest))
        raise ValueError(
            f"The budget cannot be reached by removing channels: with every prunable layer at its largest ratio "
            f"({max(result_ratios(result), default=0):g}) the model keeps {macs / base_macs:.3f} of its MACs and "
            f"{params / base_params:.3f} of its parameters. Ask for at least that. Received: "
            + ", ".join(f"{k}={v}" for k, v in targets.items() if v is not None))
    low, high = 0.0, highest
    for _ in range(50):
        middle = (low + high) / 2
        if met(ratios_at(middle)):
            high = middle
        else:
            low = middle
    ratios = ratios_at(high)  # unrounded: rounding a ratio down can keep one more channel and miss the budget
    macs, params = cost(ratios)
    kept = {g.name: kept_count(g.channels, ratios[g.name], channel_multiple) for g in groups}
    return Solution(ratios=ratios, kept=kept, macs=macs, params=params, macs_fraction=macs / base_macs,
                    params_fraction=params / base_params, predicted_loss=float(high))


def _largest_ratio(points: list[tuple[float, float]], tolerated: float) -> float:
    """The largest ratio whose interpolated loss is within `tolerated` (points: (ratio, loss), non-decreasing)."""
    best = 0.0
    for (r0, l0), (r1, l1) in zip(points, points[1:]):
        if l1 <= tolerated:
            best = r1
            continue
        if l0 <= tolerated < l1:
            best = r0 + (r1 - r0) * (tolerated - l0) / (l1 - l0)
        break
    return best


def result_ratios(result: SensitivityResult) -> tuple[float, ...]:
    return tuple(sorted({r for c in result.curves for r in c.ratios}))


def uniform_ratio(plan: ChannelPlan, target_macs: float, channel_multiple: int = 1) -> float:
    """The smallest uniform ratio (to 1e-3) whose channel pruning keeps at most `target_macs` of the MACs."""
    base, _ = plan.cost({})
    low, high = 0.0, 0.999
    for _ in range(30):
        middle = (low + high) / 2
        macs, _ = plan.cost({g.name: kept_count(g.channels, middle, channel_multiple) for g in plan.prunable})
        if macs <= target_macs * base:
            high = middle
        else:
            low = middle
    return math.ceil(high * 1000) / 1000
