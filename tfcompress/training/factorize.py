"""Low-rank factorization stage: a Keras model in, a new model with factorized Dense/1×1 Conv2D layers out.

`factorize` takes a Sequential or functional tf_keras model and replaces each selected Dense kernel
`W` (m×n) and each 1×1, stride-1 Conv2D by two layers, m×r without bias and r×n with the original bias
and activation, from a truncated SVD of `W`. It returns a `FactorizeResult`: the new functional model
(with the caller's weights, ready to fine-tune and convert) and what happened to each layer (rank,
parameters and multiply-accumulates before and after, or why it was left alone). The caller's model is
never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Sequence

import numpy as np

from tfcompress.core._keras import keras
from tfcompress.core.keras3 import as_tf_keras

_SUFFIX = "_lowrank"
# Cumulative energies are fractions of a float sum; this much below `energy` still counts as reaching it.
_ENERGY_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class LayerFactorization:
    """What `factorize` did to one selected layer.

    Attributes:
        name: the layer's name; once factorized, the second (r×n) layer keeps it and the first is
            called `<name>_lowrank`.
        rank: the rank r chosen (from `rank` or `energy`), also when the layer was left alone.
        params_before, params_after: weights including the bias (after == before when left alone).
        macs_before, macs_after: multiply-accumulates per example; None where a spatial size is unknown.
        factorized: whether the layer was replaced.
        reason: why it was left alone ("" when factorized).
    """

    name: str
    rank: int
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    factorized: bool
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class FactorizeResult:
    """The factorized model and one `LayerFactorization` per selected layer, in model order."""

    model: keras.Model
    layers: tuple[LayerFactorization, ...]

    @property
    def params_before(self) -> int:
        return sum(lyr.params_before for lyr in self.layers)

    @property
    def params_after(self) -> int:
        return sum(lyr.params_after for lyr in self.layers)


def factorize(
    model: keras.Model,
    rank: int | None = None,
    energy: float | None = None,
    layers: Sequence[str] | None = None,
) -> FactorizeResult:
    """Replaces Dense and 1×1 Conv2D kernels by two low-rank factors from a truncated SVD.

    `W = U S Vᵀ` is cut to its first r singular values and split evenly, `(U √S)(√S Vᵀ)`, so both factors
    have similar ranges (which int8 quantization likes). A layer is replaced only where it gets smaller,
    r·(m+n) < m·n; otherwise it is kept and the result says so. Fine-tune the new model briefly:

    ```python
    result = tfcompress.factorize(model, energy=0.9, layers=["fc"])
    result.model.compile(...); result.model.fit(x, y, epochs=1)
    for layer in result.layers:
        print(layer.name, layer.rank, layer.params_before, "->", layer.params_after)
    ```

    Args:
        model: a Sequential (built, with an Input) or functional tf_keras model; it is never changed.
        rank: the rank r of every factorized layer, 1 <= r < min(m, n). Give `rank` or `energy`.
        energy: keep the smallest r whose squared singular values reach this fraction of the total, in
            (0, 1]; chosen per layer.
        layers: names of the layers to factorize; default every Dense and 1×1, stride-1 Conv2D.

    Returns:
        A `FactorizeResult` with a new functional model (uncompiled).

    Raises:
        ValueError: both or neither of `rank`/`energy`, a value out of range, unknown or unsuitable
            layer names, or a model that is not a Sequential/functional tf_keras model.
    """
    model = as_tf_keras(model, "factorize")  # a Keras 3 model is translated (checked equal)
    _check_model(model)
    _check_rank_energy(rank, energy)
    selected = _select_layers(model, layers)
    plans = {}
    for layer in selected:
        kernel = _kernel_matrix(layer)
        m, n = kernel.shape
        if rank is not None and layers is not None and rank >= min(m, n):
            raise ValueError(
                f"rank must be below min(m, n) = {min(m, n)} for layer {layer.name} ({m}×{n} kernel): a "
                f"full-rank factorization removes nothing. Choose a smaller rank, or use energy=... "
                f"Received: rank={rank}"
            )
        plans[layer.name] = _plan(kernel, rank, energy)

    new_model = _rebuild(model, {name: plan for name, plan in plans.items() if plan["factorize"]})
    reports = []
    for layer in selected:
        plan = plans[layer.name]
        m, n = plan["shape"]
        r = plan["rank"]
        bias = int(np.prod(layer.bias.shape)) if getattr(layer, "bias", None) is not None else 0
        positions = _positions(new_model.get_layer(layer.name))
        after = r * (m + n) if plan["factorize"] else m * n
        reports.append(LayerFactorization(
            name=layer.name,
            rank=r,
            params_before=m * n + bias,
            params_after=after + bias,
            macs_before=None if positions is None else positions * m * n,
            macs_after=None if positions is None else positions * after,
            factorized=plan["factorize"],
            reason=plan["reason"],
        ))
    return FactorizeResult(model=new_model, layers=tuple(reports))


# ---------------------------------------------------------------------------------------------------
# Helpers


def _check_model(model) -> None:
    if not isinstance(model, keras.Model) or (
        not isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", False)
    ):
        raise ValueError(
            "factorize rebuilds the model's graph layer by layer, so it needs a Sequential or functional "
            "tf_keras model; subclassed models have no graph to rebuild. Rebuild it with keras.Sequential "
            f"or the functional API. Received: model={type(model).__name__}"
        )
    if not model.inputs:
        raise ValueError(
            f"Sequential model {model.name!r} has no input yet, so it has no graph to rebuild. Start it "
            f"with keras.layers.Input(shape) (or call it on data once). Received: model={model.name}"
        )


def _check_rank_energy(rank, energy) -> None:
    if (rank is None) == (energy is None):
        raise ValueError(
            "Give exactly one of rank (the same rank for every layer) or energy (the fraction of squared "
            f"singular values to keep, per layer). Received: rank={rank}, energy={energy}"
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1):
        raise ValueError(f"rank must be a positive integer. Received: rank={rank}")
    if energy is not None and not (isinstance(energy, numbers.Real) and 0 < energy <= 1):
        raise ValueError(
            "energy is the fraction of the kernel's squared singular values to keep, in (0, 1]; 0.9 is a "
            f"common start. Received: energy={energy}"
        )


def _eligible(layer) -> bool:
    # Exact classes: subclasses (Conv2DTranspose, custom layers) may compute something else.
    if type(layer) is keras.layers.Dense:
        return True
    return (type(layer) is keras.layers.Conv2D and tuple(layer.kernel_size) == (1, 1)
            and tuple(layer.strides) == (1, 1) and layer.groups == 1)


def _select_layers(model, layers) -> list:
    candidates = [lyr for lyr in model.layers if not isinstance(lyr, keras.layers.InputLayer)]
    if layers is None:
        selected = [lyr for lyr in candidates if _eligible(lyr)]
        if not selected:
            raise ValueError(
                f"Model {model.name!r} has no Dense or 1×1, stride-1 Conv2D layer to factorize. "
                "Received: layers=None"
            )
        return selected
    if isinstance(layers, str):
        layers = [layers]
    names = [lyr.name for lyr in candidates]
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise ValueError(
            f"layers names layers the model does not have: {unknown}; choose from {names}. "
            f"Received: layers={list(layers)}"
        )
    unsuitable = [f"{lyr.name} ({type(lyr).__name__})" for lyr in candidates
                  if lyr.name in layers and not _eligible(lyr)]
    if unsuitable:
        raise ValueError(
            f"factorize replaces Dense and 1×1, stride-1 Conv2D layers only; {', '.join(unsuitable)} is "
            f"not one. Leave it out of layers. Received: layers={list(layers)}"
        )
    return [lyr for lyr in candidates if lyr.name in layers]


def _kernel_matrix(layer) -> np.ndarray:
    kernel = np.asarray(layer.kernel.numpy())
    return kernel.reshape(kernel.shape[-2], kernel.shape[-1])  # a 1×1 conv kernel is (1, 1, m, n)


def _plan(kernel: np.ndarray, rank, energy) -> dict:
    m, n = kernel.shape
    u, s, vt = np.linalg.svd(kernel.astype(np.float64), full_matrices=False)
    if rank is not None:
        r = int(rank)
    else:
        squares = np.cumsum(s**2)
        fractions = squares / squares[-1] if squares[-1] > 0 else np.ones_like(squares)
        r = int(np.searchsorted(fractions, energy - _ENERGY_TOLERANCE)) + 1
    r = min(r, min(m, n))
    plan = {"shape": (m, n), "rank": r, "factorize": False, "reason": ""}
    if r >= min(m, n):
        plan["reason"] = f"rank {r} is the full rank min(m, n) = {min(m, n)}: nothing to cut"
    elif r * (m + n) >= m * n:
        plan["reason"] = f"rank {r} needs r·(m+n) = {r * (m + n)} weights, not fewer than m·n = {m * n}"
    else:
        root = np.sqrt(s[:r])
        plan.update(factorize=True, first=(u[:, :r] * root).astype(kernel.dtype),
                    second=(root[:, None] * vt[:r]).astype(kernel.dtype))
    return plan


def _rebuild(model, plans: dict) -> keras.Model:
    """A new functional model from `model`'s config with each planned layer split in two, weights copied."""
    functional = model
    if isinstance(model, keras.Sequential):
        functional = keras.Model(model.inputs, model.outputs)
    config = copy.deepcopy(functional.get_config())
    taken = {entry["name"] for entry in config["layers"]}
    first_names = {}
    entries = []
    for entry in config["layers"]:
        name = entry["name"]
        if name in plans:
            first = _unique(f"{name}{_SUFFIX}", taken)
            first_names[name] = first
            entries.append(_first_entry(entry, first, plans[name]["rank"]))
            entry.pop("build_config", None)  # built for m inputs; it now takes r
            entry["inbound_nodes"] = [[[first, i, 0, {}]] for i in range(len(entry["inbound_nodes"]))]
        entries.append(entry)
    config["layers"] = entries
    config["name"] = model.name
    custom = {type(m).__name__: type(m) for m in model.submodules if isinstance(m, keras.layers.Layer)}
    new = keras.Model.from_config(config, custom_objects=custom)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        target = new.get_layer(layer.name)
        if layer.name not in plans:
            target.set_weights(layer.get_weights())
            continue
        plan = plans[layer.name]
        m, n = plan["shape"]
        r = plan["rank"]
        shape = (1, 1) if isinstance(layer, keras.layers.Conv2D) else ()
        new.get_layer(first_names[layer.name]).set_weights([plan["first"].reshape(shape + (m, r))])
        rest = [layer.bias.numpy()] if layer.use_bias else []
        target.set_weights([plan["second"].reshape(shape + (r, n)), *rest])
    return new


def _first_entry(entry: dict, name: str, rank: int) -> dict:
    """The m×r layer: the original's class and config, r outputs, no bias, activation or penalties."""
    config = dict(entry["config"], name=name, use_bias=False, activation="linear", activity_regularizer=None,
                  kernel_regularizer=None, kernel_constraint=None, bias_regularizer=None,
                  bias_constraint=None)
    config["units" if entry["class_name"] == "Dense" else "filters"] = rank
    first = {k: v for k, v in entry.items() if k not in ("build_config", "inbound_nodes")}
    first.update(config=config, name=name, inbound_nodes=copy.deepcopy(entry["inbound_nodes"]))
    return first


def _unique(name: str, taken: set) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    taken.add(candidate)
    return candidate


def _positions(layer) -> int | None:
    """Output positions per example over all the layer's calls (1 for Dense on vectors, H·W for conv)."""
    total = 0
    for i in range(len(layer.inbound_nodes)):
        shape = tuple(layer.get_output_shape_at(i))
        channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
        spatial = shape[2:] if channels_first else shape[1:-1]
        if any(d is None for d in spatial):
            return None
        total += int(np.prod(spatial, dtype=np.int64))
    return total
