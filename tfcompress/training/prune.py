"""Pruning stage: a Keras model in, a copy pruned by magnitude out.

`prune` takes a trained Sequential or functional Keras model and returns a copy set up for magnitude
pruning with a schedule that is sure to finish within the planned steps; fine-tune it with
`PruningCallback` and call `strip` to get a plain model with sparse kernels back. The caller's model is
never modified (tfmot's own `prune_low_magnitude` shares its layers).

One API serves both Keras versions, and the model's type decides: a tf_keras (Keras 2) model gets tfmot's
`PruneLowMagnitude` wrappers; a Keras 3 model (TensorFlow backend) gets masks on its kernels, kept by
`tfcompress.training.prune_keras3` without wrappers, so that Keras 3's own `fit` trains it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from tfcompress.core._keras import is_keras3, keras
from tfcompress.core.errors import TfcompressError
from tfcompress.training import cluster

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
    """Returns a copy of `model` whose prunable layers are set up for magnitude pruning.

    The schedule runs from `begin_step` to `end_step` (or `begin_epoch`/`end_epoch` times
    `steps_per_epoch`). `"polynomial"` raises sparsity from `initial_sparsity` to `final_sparsity` along
    Zhu & Gupta's cubic curve; `"constant"` prunes to `final_sparsity` at once. Masks update every
    `frequency` steps; by default about ten times over the schedule (at most every 100 steps), with
    `end_step` moved back by less than one frequency onto the last update, so a short fine-tune reaches
    the final sparsity. A tf_keras model gets tfmot's wrappers; a Keras 3 model keeps its own layers, with
    a mask on each pruned kernel applied after every optimizer step (see `prune_keras3`). Fine-tune with
    `PruningCallback`, in either Keras' `fit`:

    ```python
    pruned = tfcompress.prune(model, 0.8, end_epoch=2, steps_per_epoch=len(x) // 32)
    pruned.compile(...)
    pruned.fit(x, y, batch_size=32, epochs=2, callbacks=[tfcompress.PruningCallback()])
    model = tfcompress.strip(pruned)
    ```

    Args:
        model: a Sequential or functional Keras model, tf_keras or Keras 3 (TensorFlow backend); it is
            copied, never changed.
        final_sparsity: fraction of zeros to reach in each pruned kernel, in [0, 1). With
            `scope="global"` the fraction over all pruned kernels together.
        schedule: `"polynomial"` or `"constant"`.
        initial_sparsity: sparsity at `begin_step` for the polynomial schedule.
        begin_step, end_step: training steps where pruning starts and ends. With neither `end_step`
            nor `end_epoch`, the schedule ends at the last step of the first `fit` (PruningCallback reads
            its epochs and steps), so `prune(model, 0.8)` plus the callback is enough.
        begin_epoch, end_epoch, steps_per_epoch: the same in epochs, converted with `steps_per_epoch`.
        frequency: steps between mask updates; must divide `end_step - begin_step`.
        layers: layer names or classes to prune; default every layer with prunable weights.
        exclude: layer names or classes to leave alone.
        structure: `None` or `"2:4"` (two zeros in every four input channels; `final_sparsity` 0.5).
        scope: `"local"` (every layer to `final_sparsity`) or `"global"` (one magnitude threshold over
            all pruned kernels, turned into a target per layer).

    Returns:
        A new Keras model (uncompiled): with `PruneLowMagnitude` wrappers (tf_keras), or with masked
        kernels and the pruning state attached (Keras 3).

    Raises:
        ValueError: for bad arguments, an already pruned model, or a selected layer that cannot be pruned.
    """
    keras_3 = _keras3_module() if is_keras3(model) else None
    if keras_3:
        keras_3.check_model(model)
    else:
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

    if keras_3:
        selected = keras_3.select_layers(model, layers, exclude)
        weights_of = keras_3.prunable_weights
    else:
        selected = _select_layers(model, layers, exclude)
        weights_of = _prunable_weights
    if structure == "2:4":
        _check_m_by_n(selected, keras_3.prunable_weights if keras_3 else None)
    if scope == "global":
        targets = _global_targets(selected, final_sparsity, weights_of)
    else:
        targets = {layer.name: final_sparsity for layer in selected}

    def make_schedule(target):
        if schedule == "constant":
            made = ConstantSparsity(target, begin, end, frequency)
        else:
            made = PolynomialDecay(min(initial_sparsity, target), target, begin, end, 3, frequency)
        setattr(made, _DEFERRED, deferred)
        return made

    if keras_3:
        return keras_3.wrap(model, {name: make_schedule(t) for name, t in targets.items()}, structure)

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
    """Returns `model` without what tfcompress added for training: plain layers that keep the result.

    Removes pruning (tfmot's `PruneLowMagnitude` wrappers, or a pruned Keras 3 model's masks and state;
    the kernels keep their zeros) and clustering (tfmot's `ClusterWeights` wrappers, through
    `tfcompress.strip_clustering`; the kernels keep their clustered values). A model with neither comes
    back as a plain copy. Quantization-aware wrappers stay: that model is meant for conversion.

    ```python
    plain = tfcompress.strip(pruned)      # or a clustered model, tf_keras or Keras 3
    ```

    Raises:
        ValueError: `model` is not a Sequential or functional Keras model, or a pruned Keras 3 model was
            trained without `PruningCallback` (its masks never moved).
    """
    if is_keras3(model):
        return _keras3_module().strip(model)
    _check_model(model)
    if any(isinstance(lyr, cluster.ClusterWeights) for lyr in _flat_layers(model)):
        model = cluster.strip(model)
    return tfmot.sparsity.keras.strip_pruning(model)


def sparsity(model: keras.Model) -> dict[str, float]:
    """Fraction of zeros per pruned kernel, keyed by layer name, plus `"overall"` weighted by size.

    For a pruned model the pruned layers count; for a plain (say, stripped) model every layer with a
    kernel does. Works for tf_keras and Keras 3 models alike.

    ```python
    tfcompress.sparsity(tfcompress.strip(pruned))  # {"fc": 0.8, "logits": 0.8, "overall": 0.8}
    ```
    """
    if is_keras3(model):
        return _zero_fractions(_keras3_module().layer_weights(model))
    wrappers = _pruned_layers(model)
    if wrappers:
        weights = {w.layer.name: [v for v, _, _ in w.pruning_vars] for w in wrappers}
    else:
        weights = {lyr.name: [lyr.kernel] for lyr in _flat_layers(model) if getattr(lyr, "kernel", None) is not None}
    return _zero_fractions(
        {name: [np.asarray(keras.backend.get_value(v)) for v in variables] for name, variables in weights.items()})


class PruningCallback(keras.callbacks.Callback):
    """Drives pruning during `fit` and reports sparsity; required when training a pruned model.

    Works in a tf_keras `fit` and in Keras 3's own `fit` alike (the model's type decides). For tf_keras it
    does what tfmot's `UpdatePruningStep` does (counts pruning steps, applies masks at every epoch end);
    for Keras 3 it counts the steps from the optimizer's iterations and updates the masks on the schedule
    before the scheduled steps run (the masks themselves are applied after every optimizer step). In
    place of `PruningSummaries` it writes `sparsity` (overall) and `sparsity/<layer>` into the epoch logs,
    so History, CSVLogger and TensorBoard record them. With `verify_final_sparsity` (the default) a `fit`
    that is too short for the schedule fails at its start with a `ValueError`, and a training that ends
    below a layer's target sparsity raises `SparsityNotReachedError`. Turn it off to spread one schedule
    over several `fit` calls. State is reset in `on_train_begin`.

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
        self._keras3_steps = None  # a prune_keras3.Stepper while a Keras 3 model is trained

    def set_model(self, model):
        pruned = _keras3_module().state_of(model) is not None if is_keras3(model) else _pruned_layers(model)
        if not pruned:
            raise ValueError(
                f"PruningCallback was given model {model.name!r}, which has no pruned layers: call "
                "tfcompress.prune(model, ...) first and train the model it returns. "
                f"Received: model={model.name}"
            )
        super().set_model(model)

    def on_train_begin(self, logs=None):
        if is_keras3(self.model):
            self._keras3_steps = _keras3_module().Stepper(self.model)
        else:
            self._keras3_steps = None
            self._step_callback = tfmot.sparsity.keras.UpdatePruningStep()
            self._step_callback.set_model(self.model)
            self._step_callback.on_train_begin(logs)
        self._end_deferred_schedules()
        if self.verify_final_sparsity:
            self._check_plan()

    def on_train_batch_begin(self, batch, logs=None):
        if self._keras3_steps is not None:
            self._keras3_steps.on_batch_begin(batch, self.params.get("steps"))

    def on_epoch_end(self, epoch, logs=None):
        if self._keras3_steps is None:
            self._step_callback.on_epoch_end(epoch, logs)
        if logs is not None:
            values = sparsity(self.model)
            logs["sparsity"] = values.pop("overall")
            logs.update({f"sparsity/{name}": value for name, value in values.items()})

    def on_train_end(self, logs=None):
        if self._keras3_steps is not None:
            self._keras3_steps.on_train_end()
        if not self.verify_final_sparsity:
            return
        reached = sparsity(self.model)
        short = [
            f"{name}: {reached[name]:.3f} < {target:.3f}"
            for name, (target, _) in self._targets().items()
            if reached[name] < target - self.tolerance
        ]
        if short:
            raise SparsityNotReachedError(
                f"Training stopped at pruning step {self._done()} below the target sparsity "
                f"({'; '.join(short)}). Train for at least the schedule's end_step, or lower end_step in "
                "tfcompress.prune; pass PruningCallback(verify_final_sparsity=False) when a later fit finishes "
                "the schedule."
            )

    # The pruning state, read from tfmot's wrappers (tf_keras) or from prune_keras3's state (Keras 3).

    def _done(self) -> int:
        """Pruning steps done before this point (tfmot's `pruning_step`)."""
        if is_keras3(self.model):
            return _keras3_module().state_of(self.model).step
        return int(keras.backend.get_value(_pruned_layers(self.model)[0].pruning_step))

    def _schedules(self) -> list:
        if is_keras3(self.model):
            return list(_keras3_module().state_of(self.model).schedules.values())
        return [w.pruning_schedule for w in _pruned_layers(self.model)]

    def _targets(self) -> dict[str, tuple[float, int]]:
        if is_keras3(self.model):
            return _keras3_module().targets(self.model)
        return _targets(self.model)

    def _end_deferred_schedules(self):
        """Ends schedules made without an end at the last step of this fit (before it is traced)."""
        deferred = [s for s in self._schedules() if getattr(s, _DEFERRED, False)]
        if not deferred:
            return
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        if not epochs or not steps:
            raise ValueError(
                "tfcompress.prune was called without end_step/end_epoch, so the schedule ends with this "
                "fit, but its length is unknown (a dataset without a known size). Pass end_step to "
                f"tfcompress.prune, or steps_per_epoch to fit. Received: epochs={epochs}, steps={steps}"
            )
        done = self._done()
        for schedule in deferred:
            # tfmot counts pruning steps from 1, so the last step of this fit is done + epochs * steps.
            schedule.end_step = max(done, 0) + epochs * steps
            schedule.frequency, schedule.end_step = _frequency(None, schedule.begin_step, schedule.end_step)
            setattr(schedule, _DEFERRED, False)

    def _check_plan(self):
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        if not epochs or not steps:
            return  # a dataset of unknown length: only the end-of-training check applies
        done = self._done()
        planned = done + epochs * steps
        end = max(end for _, end in self._targets().values())
        if end > planned:
            raise ValueError(
                f"The pruning schedule ends at step {end}, but this fit runs only {planned} steps "
                f"({epochs} epochs x {steps} steps, {done} done before), {end - planned} too few to reach "
                "the final sparsity. Train for more epochs or lower end_step/end_epoch in tfcompress.prune. "
                f"Received: epochs={epochs}, steps={steps}"
            )


# ---------------------------------------------------------------------------------------------------
# Helpers


def _keras3_module():
    """`prune_keras3`, imported on first use (it imports this module for the shared helpers)."""
    from tfcompress.training import prune_keras3

    return prune_keras3


def _zero_fractions(weights: dict[str, list[np.ndarray]]) -> dict[str, float]:
    """Fraction of zeros per entry of `weights` (name -> arrays), plus `"overall"` weighted by size."""
    result, zeros, total = {}, 0, 0
    for name, values in weights.items():
        layer_zeros = sum(int(np.count_nonzero(v == 0)) for v in values)
        layer_total = sum(v.size for v in values)
        result[name] = layer_zeros / max(layer_total, 1)
        zeros, total = zeros + layer_zeros, total + layer_total
    result["overall"] = zeros / max(total, 1)
    return result


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
        target = _schedule_target(wrapper.pruning_schedule, wrapper.sparsity_m_by_n)
        if target is not None:
            targets[wrapper.layer.name] = target
    return targets


def _schedule_target(schedule, m_by_n=None) -> tuple[float, int] | None:
    """(final sparsity, end step) of one schedule; None for a schedule tfcompress did not make."""
    if m_by_n:
        m, n = m_by_n
        target = m / n
    elif isinstance(schedule, PolynomialDecay):
        target = schedule.final_sparsity
    elif isinstance(schedule, ConstantSparsity):
        target = schedule.target_sparsity
    else:
        return None
    return target, max(schedule.end_step, schedule.begin_step)


def _check_model(model):
    is_graph = isinstance(model, keras.Sequential) or getattr(model, "_is_graph_network", False)
    if not isinstance(model, keras.Model) or not is_graph:
        raise ValueError(
            "Expected a Sequential or functional tf_keras model or Keras 3 model (subclassed models cannot "
            "be pruned). Build it with keras.Sequential or the functional API. "
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
    all_layers = _top_level_layers(model, keras, "it has PruneLowMagnitude layers" if _pruned_layers(model) else None,
                                   "tfmot wraps")
    return _choose_layers(all_layers, layers, exclude, _prunable_weights, "tfmot")


def _top_level_layers(model, module, pruned_because: str | None, pruner: str) -> list:
    """The layers of `model` but its inputs, for either Keras (`module`); refuses a pruned or nested model."""
    if pruned_because is not None:
        raise ValueError(
            f"Model {model.name!r} is already pruned ({pruned_because}): call "
            f"tfcompress.strip(model) first, or keep training it. Received: model={model.name}"
        )
    if any(isinstance(lyr, module.Model) for lyr in model.layers):
        raise ValueError(
            f"Nested models cannot be pruned: {pruner} only the top-level layers. Flatten the model "
            f"first. Received: model={model.name}"
        )
    return [lyr for lyr in model.layers if not isinstance(lyr, module.layers.InputLayer)]


def _choose_layers(all_layers, layers, exclude, weights_of, pruner: str) -> list:
    """The layers of `all_layers` that `layers`/`exclude` select, each with weights `weights_of` can prune.

    `weights_of(layer)` gives the prunable weights: a non-empty list, `[]` for a layer known to have none
    (skipped unless named in `layers`), or None for a layer `pruner` does not know (refused if it has
    weights).
    """
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
        weights = weights_of(layer)
        if weights:
            selected.append(layer)
        elif weights is None and (layer.weights or layers is not None):
            unsupported.append(layer.name)
        elif layers is not None:
            unsupported.append(layer.name)
    if unsupported:
        raise ValueError(
            f"{pruner} cannot prune layer(s) {unsupported}: they have no weights it knows how to prune. "
            "Leave them out with exclude=[...] or choose layers=[...]. "
            f"Received: layers={layers}, exclude={exclude}"
        )
    if not selected:
        raise ValueError(
            "No layer is left to prune: select layers with weights (Dense, Conv2D, ...). "
            f"Received: layers={layers}, exclude={exclude}"
        )
    return selected


def _check_m_by_n(selected: Iterable, weights_of=None):
    """Every grouped weight needs 4 input channels: tf_keras's rank-2 and rank-4 kernels (what tfmot groups),
    or, with `weights_of`, every weight of rank >= 2 it gives (Keras 3: grouped along axis -2)."""

    def input_channels(lyr) -> list[int]:
        if weights_of is None:
            kernel = getattr(lyr, "kernel", None)
            weights = [kernel] if kernel is not None and len(kernel.shape) in (2, 4) else []
        else:
            weights = [w for w in weights_of(lyr) if len(w.shape) >= 2]
        return [int(w.shape[-2]) for w in weights]

    narrow = [
        f"{lyr.name} ({min(channels)} input channels)"
        for lyr in selected
        if (channels := input_channels(lyr)) and min(channels) < 4
    ]
    if narrow:
        raise ValueError(
            f'structure="2:4" needs at least 4 input channels per layer, but {", ".join(narrow)} has fewer. '
            f"Leave it out with exclude=[...]. Received: structure='2:4'"
        )


def _global_targets(selected, final_sparsity, weights_of=_prunable_weights) -> dict[str, float]:
    """One magnitude threshold over all selected kernels, as the sparsity it gives each layer."""
    magnitudes = {
        lyr.name: np.abs(np.concatenate([np.ravel(np.asarray(w)) for w in weights_of(lyr)])) for lyr in selected
    }
    everything = np.sort(np.concatenate(list(magnitudes.values())))
    k = int(round(everything.size * final_sparsity))
    if k == 0:
        return {name: 0.0 for name in magnitudes}
    threshold = everything[k - 1]
    return {name: float(np.clip(np.mean(m <= threshold), 0.0, 0.99)) for name, m in magnitudes.items()}
