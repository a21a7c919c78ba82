"""Pruning stage: a Keras model in, a copy wrapped for magnitude pruning out.

`prune` takes a trained Sequential or functional Keras model and returns a copy whose prunable layers are
wrapped by tfmot's `PruneLowMagnitude` with a schedule that is sure to finish within the planned steps;
fine-tune it with `PruningCallback` and call `strip` to get a plain model with sparse kernels back.
The caller's model is never modified (tfmot's own `prune_low_magnitude` shares its layers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from tfcompress.core._keras import keras
from tfcompress.core.errors import TfcompressError

import tensorflow_model_optimization as tfmot  # after _keras: needs TF_USE_LEGACY_KERAS
from tensorflow_model_optimization.python.core.sparsity.keras import (
    prune_registry,
    pruning_wrapper,
)

PolynomialDecay = tfmot.sparsity.keras.PolynomialDecay
ConstantSparsity = tfmot.sparsity.keras.ConstantSparsity
PruneLowMagnitude = pruning_wrapper.PruneLowMagnitude

SCHEDULES = ("polynomial", "constant")
SCOPES = ("local", "global")
STRUCTURES = (None, "2:4")
MAX_FREQUENCY = 100
# Marks a schedule made without an end; PruningCallback ends it with the first fit.
_DEFERRED = "_tfcompress_end_from_fit"
_MISSING_CALLBACK = (
    "The pruned model was trained without its pruning callback, so no pruning step was counted. "
    "Add it to fit: model.fit(..., callbacks=[tfcompress.PruningCallback()])."
)


class SparsityNotReachedError(TfcompressError):
    """Training ended before every pruned layer reached its target sparsity."""


def prune(
    model: keras.Model,
    final_sparsity: float,
    *,
    schedule: str = "polynomial",
    initial_sparsity: float = 0.0,
    begin_step: int = 0,
    end_step: int | None = None,
    begin_epoch: int | None = None,
    end_epoch: int | None = None,
    steps_per_epoch: int | None = None,
    frequency: int | None = None,
    layers: Sequence[str | type] | None = None,
    exclude: Sequence[str | type] | None = None,
    structure: str | None = None,
    scope: str = "local",
) -> keras.Model:
    """Returns a copy of `model` whose prunable layers are wrapped for magnitude pruning.

    The schedule runs from `begin_step` to `end_step` (or `begin_epoch`/`end_epoch` times
    `steps_per_epoch`). `"polynomial"` raises sparsity from `initial_sparsity` to `final_sparsity` along
    Zhu & Gupta's cubic curve; `"constant"` prunes to `final_sparsity` at once. Masks update every
    `frequency` steps; by default about ten times over the schedule (at most every 100 steps), with
    `end_step` moved back by less than one frequency onto the last update, so a short fine-tune reaches
    the final sparsity. Fine-tune with `PruningCallback`:

    ```python
    pruned = tfcompress.prune(model, 0.8, end_epoch=2, steps_per_epoch=len(x) // 32)
    pruned.compile(...)
    pruned.fit(x, y, batch_size=32, epochs=2, callbacks=[tfcompress.PruningCallback()])
    model = tfcompress.strip(pruned)
    ```

    Args:
        model: a Sequential or functional Keras model; it is copied, never changed.
        final_sparsity: fraction of zeros to reach in each pruned kernel, in [0, 1). With
            `scope="global"` the fraction over all pruned kernels together.
        schedule: `"polynomial"` or `"constant"`.
        initial_sparsity: sparsity at `begin_step` for the polynomial schedule.
        begin_step, end_step: training steps where pruning starts and ends. With neither `end_step`
            nor `end_epoch`, the schedule ends at the last step of the first `fit` (PruningCallback reads
            its epochs and steps), so `prune(model, 0.8)` plus the callback is enough.
        begin_epoch, end_epoch, steps_per_epoch: the same in epochs, converted with `steps_per_epoch`.
        frequency: steps between mask updates; must divide `end_step - begin_step`.
        layers: layer names or classes to prune; default every layer with weights.
        exclude: layer names or classes to leave alone.
        structure: `None` or `"2:4"` (two zeros in every four input channels; `final_sparsity` 0.5).
        scope: `"local"` (every layer to `final_sparsity`) or `"global"` (one magnitude threshold over
            all pruned kernels, turned into a target per layer).

    Returns:
        A new Keras model (uncompiled) with `PruneLowMagnitude` wrappers.

    Raises:
        ValueError: for bad arguments, an already pruned model, or a selected layer tfmot cannot prune.
    """
    _check_model(model)
    _check_sparsity("final_sparsity", final_sparsity)
    _check_sparsity("initial_sparsity", initial_sparsity)
    _check_choice("schedule", schedule, SCHEDULES)
    _check_choice("scope", scope, SCOPES)
    _check_choice("structure", structure, STRUCTURES)
    begin, end = _steps(begin_step, end_step, begin_epoch, end_epoch, steps_per_epoch)
    deferred = end is None
    if deferred and frequency is not None:
        raise ValueError(
            "frequency needs a known schedule end: pass end_step or end_epoch with it, or leave both "
            f"out and PruningCallback picks all three from the fit. Received: frequency={frequency}"
        )
    if deferred:
        end, frequency = begin + 1, 1  # placeholders until PruningCallback knows the fit's length
    frequency, end = _frequency(frequency, begin, end)
    if schedule == "polynomial" and initial_sparsity > final_sparsity:
        raise ValueError(
            "initial_sparsity must not exceed final_sparsity for the polynomial schedule. "
            f"Received: initial_sparsity={initial_sparsity}, final_sparsity={final_sparsity}"
        )
    if structure == "2:4" and (final_sparsity != 0.5 or scope != "local"):
        raise ValueError(
            'structure="2:4" zeroes exactly half of every layer: use final_sparsity=0.5 and '
            f'scope="local". Received: final_sparsity={final_sparsity}, scope={scope!r}'
        )

    selected = _select_layers(model, layers, exclude)
    if structure == "2:4":
        _check_m_by_n(selected)
    if scope == "global":
        targets = _global_targets(selected, final_sparsity)
    else:
        targets = {layer.name: final_sparsity for layer in selected}

    def make_schedule(target):
        if schedule == "constant":
            made = ConstantSparsity(target, begin, end, frequency)
        else:
            made = PolynomialDecay(min(initial_sparsity, target), target, begin, end, 3, frequency)
        setattr(made, _DEFERRED, deferred)
        return made

    # Copy first: the wrappers below take over the copy's layers, never the caller's.
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    names = set(targets)

    def wrap(layer):
        if layer.name not in names:
            return layer
        wrapper = PruneLowMagnitude(
            layer,
            pruning_schedule=make_schedule(targets[layer.name]),
            sparsity_m_by_n=(2, 4) if structure == "2:4" else None,
        )
        # tfmot's own message for a fit without the callback names a callback tfcompress users lack.
        wrapper._PRUNE_CALLBACK_ERROR_MSG = _MISSING_CALLBACK
        return wrapper

    return keras.models.clone_model(copy, clone_function=wrap)


def strip(model: keras.Model) -> keras.Model:
    """Returns `model` without pruning wrappers: plain layers whose kernels hold the zeros.

    ```python
    plain = tfcompress.strip(pruned)
    ```
    """
    _check_model(model)
    return tfmot.sparsity.keras.strip_pruning(model)


def sparsity(model: keras.Model) -> dict[str, float]:
    """Fraction of zeros per pruned kernel, keyed by layer name, plus `"overall"` weighted by size.

    For a pruned model the wrapped layers count; for a plain (say, stripped) model every layer with a
    kernel does.

    ```python
    tfcompress.sparsity(tfcompress.strip(pruned))  # {"fc": 0.8, "logits": 0.8, "overall": 0.8}
    ```
    """
    wrappers = _pruned_layers(model)
    if wrappers:
        weights = {w.layer.name: [v for v, _, _ in w.pruning_vars] for w in wrappers}
    else:
        weights = {lyr.name: [lyr.kernel] for lyr in _flat_layers(model) if getattr(lyr, "kernel", None) is not None}
    result, zeros, total = {}, 0, 0
    for name, variables in weights.items():
        values = [np.asarray(keras.backend.get_value(v)) for v in variables]
        layer_zeros = sum(int(np.count_nonzero(v == 0)) for v in values)
        layer_total = sum(v.size for v in values)
        result[name] = layer_zeros / max(layer_total, 1)
        zeros, total = zeros + layer_zeros, total + layer_total
    result["overall"] = zeros / max(total, 1)
    return result


class PruningCallback(keras.callbacks.Callback):
    """Drives pruning during `fit` and reports sparsity; required when training a pruned model.

    Does what tfmot's `UpdatePruningStep` does (counts pruning steps, applies masks at every epoch end)
    and, in place of `PruningSummaries`, writes `sparsity` (overall) and `sparsity/<layer>` into the
    epoch logs, so History, CSVLogger and TensorBoard record them. With `verify_final_sparsity` (the
    default) a `fit` that is too short for the schedule fails at its start with a `ValueError`, and a
    training that ends below a layer's target sparsity raises `SparsityNotReachedError`. Turn it off
    to spread one schedule over several `fit` calls. State is reset in `on_train_begin`.

    ```python
    pruned = tfcompress.prune(model, 0.8, end_epoch=2, steps_per_epoch=100)
    pruned.compile(...)
    history = pruned.fit(x, y, epochs=2, steps_per_epoch=100, callbacks=[tfcompress.PruningCallback()])
    history.history["sparsity"]
    ```

    Args:
        verify_final_sparsity: check the plan at train begin and the result at train end.
        tolerance: how far below its target a layer's sparsity may end.
    """

    def __init__(self, verify_final_sparsity: bool = True, tolerance: float = 0.01):
        super().__init__()
        if not 0 <= tolerance < 1:
            raise ValueError(
                f"tolerance must be in [0, 1): it is a fraction of weights. Received: tolerance={tolerance}"
            )
        self.verify_final_sparsity = verify_final_sparsity
        self.tolerance = tolerance
        self._step_callback = None

    def set_model(self, model):
        if not _pruned_layers(model):
            raise ValueError(
                f"PruningCallback was given model {model.name!r}, which has no pruned layers: call "
                "tfcompress.prune(model, ...) first and train the model it returns. "
                f"Received: model={model.name}"
            )
        super().set_model(model)

    def on_train_begin(self, logs=None):
        self._step_callback = tfmot.sparsity.keras.UpdatePruningStep()
        self._step_callback.set_model(self.model)
        self._step_callback.on_train_begin(logs)
        self._end_deferred_schedules()
        if self.verify_final_sparsity:
            self._check_plan()

    def on_epoch_end(self, epoch, logs=None):
        self._step_callback.on_epoch_end(epoch, logs)
        if logs is not None:
            values = sparsity(self.model)
            logs["sparsity"] = values.pop("overall")
            logs.update({f"sparsity/{name}": value for name, value in values.items()})

    def on_train_end(self, logs=None):
        if not self.verify_final_sparsity:
            return
        reached = sparsity(self.model)
        short = [
            f"{name}: {reached[name]:.3f} < {target:.3f}"
            for name, (target, _) in _targets(self.model).items()
            if reached[name] < target - self.tolerance
        ]
        if short:
            step = int(keras.backend.get_value(_pruned_layers(self.model)[0].pruning_step))
            raise SparsityNotReachedError(
                f"Training stopped at pruning step {step} below the target sparsity ({'; '.join(short)}). "
                "Train for at least the schedule's end_step, or lower end_step in tfcompress.prune; pass "
                "PruningCallback(verify_final_sparsity=False) when a later fit finishes the schedule."
            )

    def _end_deferred_schedules(self):
        """Ends schedules made without an end at the last step of this fit (before it is traced)."""
        deferred = [w.pruning_schedule for w in _pruned_layers(self.model)
                    if getattr(w.pruning_schedule, _DEFERRED, False)]
        if not deferred:
            return
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        if not epochs or not steps:
            raise ValueError(
                "tfcompress.prune was called without end_step/end_epoch, so the schedule ends with this "
                "fit, but its length is unknown (a dataset without a known size). Pass end_step to "
                f"tfcompress.prune, or steps_per_epoch to fit. Received: epochs={epochs}, steps={steps}"
            )
        done = int(keras.backend.get_value(_pruned_layers(self.model)[0].pruning_step))
        for schedule in deferred:
            # tfmot counts pruning steps from 1, so the last step of this fit is done + epochs * steps.
            schedule.end_step = max(done, 0) + epochs * steps
            schedule.frequency, schedule.end_step = _frequency(None, schedule.begin_step, schedule.end_step)
            setattr(schedule, _DEFERRED, False)

    def _check_plan(self):
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        if not epochs or not steps:
            return  # a dataset of unknown length: only the end-of-training check applies
        done = int(keras.backend.get_value(_pruned_layers(self.model)[0].pruning_step))
        planned = done + epochs * steps
        end = max(end for _, end in _targets(self.model).values())
        if end > planned:
            raise ValueError(
                f"The pruning schedule ends at step {end}, but this fit runs only {planned} steps "
                f"({epochs} epochs x {steps} steps, {done} done before), {end - planned} too few to reach "
                "the final sparsity. Train for more epochs or lower end_step/end_epoch in tfcompress.prune. "
                f"Received: epochs={epochs}, steps={steps}"
            )


# ---------------------------------------------------------------------------------------------------
# Helpers


def _flat_layers(model) -> list:
    layers = []
    for layer in model.layers:
        layers.extend(_flat_layers(layer) if isinstance(layer, keras.Model) else [layer])
    return layers


def _pruned_layers(model) -> list:
    if not isinstance(model, keras.Model):
        return []
    return [lyr for lyr in _flat_layers(model) if isinstance(lyr, PruneLowMagnitude)]


def _targets(model) -> dict[str, tuple[float, int]]:
    """(final sparsity, end step) of each pruned layer, read back from its wrapper."""
    targets = {}
    for wrapper in _pruned_layers(model):
        schedule = wrapper.pruning_schedule
        if wrapper.sparsity_m_by_n:
            m, n = wrapper.sparsity_m_by_n
            target = m / n
        elif isinstance(schedule, PolynomialDecay):
            target = schedule.final_sparsity
        elif isinstance(schedule, ConstantSparsity):
            target = schedule.target_sparsity
        else:
            continue
        targets[wrapper.layer.name] = (target, max(schedule.end_step, schedule.begin_step))
    return targets


def _check_model(model):
    is_graph = isinstance(model, keras.Sequential) or getattr(model, "_is_graph_network", False)
    if not isinstance(model, keras.Model) or not is_graph:
        raise ValueError(
            "Expected a Sequential or functional tf_keras model (subclassed models and Keras 3 models "
            "cannot be pruned). Build or load it with tfcompress's keras. "
            f"Received: model={type(model).__name__}"
        )


def _check_sparsity(name, value):
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(
            f"{name} must be a fraction of weights in [0, 1) (0.8 zeroes 80% of them). "
            f"Received: {name}={value!r}"
        )


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}. Received: {name}={value!r}")


def _steps(begin_step, end_step, begin_epoch, end_epoch, steps_per_epoch):
    if (begin_epoch is not None or end_epoch is not None) and not steps_per_epoch:
        raise ValueError(
            "begin_epoch/end_epoch need steps_per_epoch to be turned into steps: pass "
            f"steps_per_epoch=ceil(num_samples / batch_size). Received: steps_per_epoch={steps_per_epoch}"
        )
    if end_step is not None and end_epoch is not None:
        raise ValueError(
            f"Pass end_step or end_epoch, not both. Received: end_step={end_step}, end_epoch={end_epoch}"
        )
    begin = begin_epoch * steps_per_epoch if begin_epoch is not None else begin_step
    if end_step is None and end_epoch is None:
        # No end given: PruningCallback sets it to the last step of the first fit (see _DEFERRED).
        return int(begin), None
    end = end_epoch * steps_per_epoch if end_epoch is not None else end_step
    if begin < 0 or end <= begin:
        raise ValueError(
            "The pruning schedule must end after it begins, at a step >= 0: raise end_step/end_epoch or "
            f"lower begin_step/begin_epoch. Received: begin_step={begin}, end_step={end}"
        )
    return int(begin), int(end)


def _frequency(frequency, begin, end):
    """(frequency, end): mask updates every `frequency` steps, the last one exactly on the returned end.

    tfmot updates masks only on steps begin + k * frequency, so an end that is not on that grid is never
    reached. An automatic frequency aims at about ten updates (at most every 100 steps) and moves the end
    back onto its grid, by less than one frequency; a frequency the caller chose must divide the span.
    """
    span = end - begin
    if frequency is None:
        frequency = max(1, min(MAX_FREQUENCY, span // 10))
        return frequency, begin + (span // frequency) * frequency
    if not isinstance(frequency, int) or frequency < 1 or span % frequency:
        raise ValueError(
            f"frequency must be a positive divisor of end_step - begin_step ({span}): masks update only "
            "every `frequency` steps, so otherwise the last update misses end_step and the final sparsity "
            f"is never reached. Pass frequency=None to pick one. Received: frequency={frequency}"
        )
    return frequency, end


def _matches(layer, spec) -> bool:
    return layer.name == spec if isinstance(spec, str) else isinstance(layer, spec)


def _prunable_weights(layer) -> list:
    """The weights tfmot would prune in `layer`; None if tfmot cannot wrap it."""
    if isinstance(layer, tfmot.sparsity.keras.PrunableLayer) or hasattr(layer, "get_prunable_weights"):
        return list(layer.get_prunable_weights())
    if prune_registry.PruneRegistry.supports(layer):
        if layer.__class__ not in prune_registry.PruneRegistry._LAYERS_WEIGHTS_MAP:
            return layer.weights  # an RNN cell list: tfmot knows how to wrap it
        return [getattr(layer, n) for n in prune_registry.PruneRegistry._weight_names(layer)]
    return None


def _select_layers(model, layers, exclude) -> list:
    if _pruned_layers(model):
        raise ValueError(
            f"Model {model.name!r} is already pruned (it has PruneLowMagnitude layers): call "
            f"tfcompress.strip(model) first, or keep training it. Received: model={model.name}"
        )
    if any(isinstance(lyr, keras.Model) for lyr in model.layers):
        raise ValueError(
            "Nested models cannot be pruned: tfmot wraps only the top-level layers. Flatten the model "
            f"first. Received: model={model.name}"
        )
    all_layers = [lyr for lyr in model.layers if not isinstance(lyr, keras.layers.InputLayer)]
    names = {lyr.name for lyr in all_layers}
    for arg, specs in (("layers", layers), ("exclude", exclude)):
        unknown = [s for s in specs or () if isinstance(s, str) and s not in names]
        if unknown:
            raise ValueError(
                f"{arg} names layers the model does not have; choose from {sorted(names)}. "
                f"Received: {arg}={list(specs)}"
            )
    chosen = [lyr for lyr in all_layers if layers is None or any(_matches(lyr, s) for s in layers)]
    chosen = [lyr for lyr in chosen if not any(_matches(lyr, s) for s in exclude or ())]
    selected, unsupported = [], []
    for layer in chosen:
        weights = _prunable_weights(layer)
        if weights:
            selected.append(layer)
        elif weights is None and (layer.weights or layers is not None):
            unsupported.append(layer.name)
        elif layers is not None:
            unsupported.append(layer.name)
    if unsupported:
        raise ValueError(
            f"tfmot cannot prune layer(s) {unsupported}: they have no weights it knows how to prune. "
            "Leave them out with exclude=[...] or choose layers=[...]. "
            f"Received: layers={layers}, exclude={exclude}"
        )
    if not selected:
        raise ValueError(
            "No layer is left to prune: select layers with weights (Dense, Conv2D, ...). "
            f"Received: layers={layers}, exclude={exclude}"
        )
    return selected


def _check_m_by_n(selected: Iterable):
    narrow = [
        f"{lyr.name} ({int(lyr.kernel.shape[-2])} input channels)"
        for lyr in selected
        if getattr(lyr, "kernel", None) is not None and lyr.kernel.shape.rank in (2, 4) and lyr.kernel.shape[-2] < 4
    ]
    if narrow:
        raise ValueError(
            f'structure="2:4" needs at least 4 input channels per layer, but {", ".join(narrow)} has fewer. '
            f"Leave it out with exclude=[...]. Received: structure='2:4'"
        )


def _global_targets(selected, final_sparsity) -> dict[str, float]:
    """One magnitude threshold over all selected kernels, as the sparsity it gives each layer."""
    magnitudes = {
        lyr.name: np.abs(np.concatenate([np.ravel(w) for w in _prunable_weights(lyr)])) for lyr in selected
    }
    everything = np.sort(np.concatenate(list(magnitudes.values())))
    k = int(round(everything.size * final_sparsity))
    if k == 0:
        return {name: 0.0 for name in magnitudes}
    threshold = everything[k - 1]
    return {name: float(np.clip(np.mean(m <= threshold), 0.0, 0.99)) for name, m in magnitudes.items()}
