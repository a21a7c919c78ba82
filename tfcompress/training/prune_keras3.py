"""Magnitude pruning for Keras 3 models (TensorFlow backend), trained by Keras 3's own `fit`.

tfmot wraps only tf_keras layers, so a Keras 3 model is pruned without wrappers: `tfcompress.prune`
returns a copy (the caller's model is never changed) whose pruned weights each get a non-trainable mask
variable and a `constraint` that multiplies the weight by its mask. Keras 3's optimizers apply a variable's
constraint after every update, inside the compiled train step, so pruned weights stay exactly zero after
every optimizer step, also with `steps_per_execution > 1`. `tfcompress.PruningCallback` moves the masks
along the schedule (tfmot's `PolynomialDecay`/`ConstantSparsity`, counted in tfmot's pruning steps) and
reports the sparsity; `tfcompress.strip` returns a plain Keras 3 model with the zeros.

The pruning state (schedules, masks, steps counted) is a plain Python object on the model, so
`model.save()` writes an ordinary `.keras` file (the masks' constraints are not part of any config);
training can only continue on the model object `prune` returned.

Everything here is reached through `tfcompress.prune`, `strip`, `sparsity` and `PruningCallback`, which
look at the model's type (`is_keras3`) and call into this module.
"""

from __future__ import annotations

import numpy as np

from tfcompress.core._keras import keras3, tf
from tfcompress.core.keras3 import check_graph_model
from tfcompress.training.prune import _MISSING_CALLBACK, _choose_layers, _schedule_target, _top_level_layers

# Where `prune` keeps the pruning state on the Keras 3 model it returns.
_STATE = "_tfcompress_pruning"
# tfmot's sparsity_m_by_n: two zeros in every four values along the input channels.
_M_BY_N = (2, 4)


class PruningState:
    """The pruning state `prune` attaches to a Keras 3 model (plain Python, so Keras neither tracks nor
    saves it).

    Attributes:
        schedules: layer name -> tfmot `PolynomialDecay` or `ConstantSparsity` (evaluated eagerly).
        masks: layer name -> list of (pruned weight variable, its mask variable).
        structure: None or `"2:4"`.
        step: pruning steps done so far, counted like tfmot's `pruning_step` (the first training step is 1).

    ```python
    state = prune_keras3.state_of(tfcompress.prune(keras3_model, 0.8))
    state.step  # 0 until a fit with PruningCallback
    ```
    """

    def __init__(self, schedules: dict, masks: dict, structure: str | None):
        self.schedules = schedules
        self.masks = masks
        self.structure = structure
        self.step = 0


class _KeepPruned:
    """A variable constraint: the one it replaces (if any), then the mask, so pruned weights stay zero."""

    def __init__(self, mask, inner):
        self.mask = mask
        self.inner = inner

    def __call__(self, weight):
        if self.inner is not None:
            weight = self.inner(weight)
        return keras3().ops.multiply(weight, self.mask)


def state_of(model) -> PruningState | None:
    """The pruning state of a Keras 3 model `prune` returned; None for any other model.

    ```python
    prune_keras3.state_of(pruned).schedules["fc"].final_sparsity  # 0.8
    ```
    """
    state = getattr(model, _STATE, None)
    return state if isinstance(state, PruningState) else None


def check_model(model) -> None:
    """Raises a ValueError unless `model` is a built Sequential or functional Keras 3 model on TensorFlow.

    ```python
    prune_keras3.check_model(keras3_model)
    ```
    """
    check_graph_model(model, "tfcompress.prune")  # the TensorFlow backend; functional or Sequential
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built, so its kernels do not exist yet: start it with keras.Input(...) "
            f"or call it on a batch before pruning. Received: model={model.name}"
        )


def prunable_weights(layer) -> list | None:
    """The weights pruned in a Keras 3 `layer`: `[]` for a layer with nothing to prune (normalization,
    pooling), None for a layer tfcompress does not know (or a quantized or LoRA one).

    Dense and Conv* (transposed too) kernels, DepthwiseConv's depthwise kernel, SeparableConv's pointwise
    kernel, Embedding's embeddings, and the kernel and recurrent kernel of SimpleRNN, GRU and LSTM.

    ```python
    prune_keras3.prunable_weights(model.get_layer("fc"))  # [<Variable path=fc/kernel ...>]
    ```
    """
    layers = keras3().layers
    owner = layer
    if isinstance(layer, (layers.SimpleRNN, layers.GRU, layers.LSTM)):
        owner, names = layer.cell, ("kernel", "recurrent_kernel")
    elif isinstance(layer, (layers.SeparableConv1D, layers.SeparableConv2D)):
        names = ("pointwise_kernel",)
    elif isinstance(layer, (layers.DepthwiseConv1D, layers.DepthwiseConv2D)):
        names = ("kernel",)  # Keras 3 names the depthwise kernel `kernel`
    elif isinstance(layer, (layers.Dense, layers.Conv1D, layers.Conv2D, layers.Conv3D, layers.Conv1DTranspose,
                            layers.Conv2DTranspose, layers.Conv3DTranspose)):
        names = ("kernel",)
    elif isinstance(layer, layers.Embedding):
        names = ("embeddings",)
    elif isinstance(layer, _normalizations()):
        return []
    else:
        return None
    if getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False):
        return None  # the effective kernel is computed, not a variable a mask could keep at zero
    found = [_variable(owner, name) for name in names]
    return None if any(v is None for v in found) else found


def select_layers(model, layers, exclude) -> list:
    """The top-level layers of a Keras 3 `model` to prune, as `tfcompress.prune` selects them.

    ```python
    prune_keras3.select_layers(model, None, ["conv"])  # [<Dense name=fc>, <Dense name=logits>]
    ```
    """
    pruned = "prune returned it with masks" if state_of(model) is not None else None
    all_layers = _top_level_layers(model, keras3(), pruned, "tfcompress masks")
    return _choose_layers(all_layers, layers, exclude, prunable_weights, "tfcompress")


def wrap(model, schedules: dict, structure: str | None):
    """A copy of `model` (same layers and weights) whose layers in `schedules` have masked weights.

    The copy carries a `PruningState`; every pruned weight gets a mask of ones (nothing pruned before the
    first scheduled step) and a constraint that keeps it multiplied by the mask after each optimizer step.

    ```python
    pruned = prune_keras3.wrap(model, {"fc": PolynomialDecay(0.0, 0.8, 0, 100, 3, 10)}, None)
    ```
    """
    keras_3 = keras3()
    copy = keras_3.models.clone_model(model)
    copy.set_weights(model.get_weights())
    masks = {}
    for name in schedules:
        pairs = []
        for variable in prunable_weights(copy.get_layer(name)):
            mask = keras_3.Variable(np.ones(variable.shape, dtype=variable.dtype), trainable=False,
                                    name=f"{variable.name}_mask")
            variable.constraint = _KeepPruned(mask, variable.constraint)
            pairs.append((variable, mask))
        masks[name] = pairs
    # The constraints are read when the train step is traced: a fresh copy has no traced step yet.
    copy.train_function = None
    setattr(copy, _STATE, PruningState(schedules, masks, structure))
    return copy


def strip(model):
    """A plain Keras 3 copy of `model`: no masks, no constraints added by `prune`, no state; zeros kept.

    ```python
    plain = tfcompress.strip(pruned)  # the same call as for tf_keras
    ```
    """
    check_model(model)
    state = state_of(model)
    values = [_numpy(v) for v in model.weights]
    if state is not None:
        optimizer = getattr(model, "optimizer", None)
        if state.step == 0 and optimizer is not None and _numpy(optimizer.iterations) > 0:
            raise ValueError(f"{_MISSING_CALLBACK} Received: model={model.name}")
        masked = {id(v): _numpy(mask) for pairs in state.masks.values() for v, mask in pairs}
        values = [value * masked[id(v)] if id(v) in masked else value for v, value in zip(model.weights, values)]
    plain = keras3().models.clone_model(model)
    plain.set_weights(values)
    return plain


def layer_weights(model) -> dict[str, list[np.ndarray]]:
    """The weights `tfcompress.sparsity` counts, per layer: the pruned ones, or every kernel of a plain model.

    ```python
    prune_keras3.layer_weights(pruned)["fc"][0].shape  # (1352, 32)
    ```
    """
    state = state_of(model)
    if state is not None:
        return {name: [_numpy(v) for v, _ in pairs] for name, pairs in state.masks.items()}
    kernels = {}
    for layer in _flat_layers(model):
        kernel = getattr(layer, "kernel", None)
        if kernel is not None:
            kernels[layer.name] = [_numpy(kernel)]
    return kernels


def targets(model) -> dict[str, tuple[float, int]]:
    """(final sparsity, end step) of each pruned layer of a pruned Keras 3 model.

    ```python
    prune_keras3.targets(pruned)  # {"fc": (0.8, 30), "logits": (0.8, 30)}
    ```
    """
    state = state_of(model)
    m_by_n = _M_BY_N if state.structure == "2:4" else None
    found = {name: _schedule_target(schedule, m_by_n) for name, schedule in state.schedules.items()}
    return {name: target for name, target in found.items() if target is not None}


class Stepper:
    """One Keras 3 fit's pruning steps, for `PruningCallback`: counts them, updates masks on the schedule.

    Steps are read from the optimizer's iterations (offset so that the count goes on across fits and
    recompiles). Before each train function call, every schedule with an update step among the steps
    about to run (one, or `steps_per_execution`) gets new masks from its sparsity at the last such step, and
    the weights are multiplied by them; the constraint keeps them so through the optimizer steps.

    ```python
    stepper = Stepper(model)            # on_train_begin
    stepper.on_batch_begin(0, steps=16)  # on_train_batch_begin
    stepper.on_train_end()
    ```
    """

    def __init__(self, model):
        self.model = model
        self.state = state_of(model)
        self._offset = self.state.step - self._iterations()

    def _iterations(self) -> int:
        return int(_numpy(self.model.optimizer.iterations))

    def on_batch_begin(self, batch: int, steps: int | None) -> None:
        done = self._offset + self._iterations()
        self.state.step = done
        chunk = max(1, int(getattr(self.model, "steps_per_execution", 1) or 1))
        if steps:
            chunk = max(1, min(chunk, steps - batch))  # the last call of an epoch may run fewer steps
        for name, schedule in self.state.schedules.items():
            step = _last_update(schedule, done + 1, done + chunk)
            if step is not None:
                self._update(name, schedule, step)

    def on_train_end(self) -> None:
        self.state.step = self._offset + self._iterations()
        # The optimizer's last word (say, EMA weights swapped in at the end of fit) bypasses constraints.
        for pairs in self.state.masks.values():
            for variable, mask in pairs:
                variable.assign(_numpy(variable) * _numpy(mask))

    def _update(self, name, schedule, step) -> None:
        # tfmot's own schedule gives the sparsity for the step (its PolynomialDecay formula, in float32).
        target = float(schedule(tf.constant(step, tf.int64))[1])
        for variable, mask in self.state.masks[name]:
            weight = _numpy(variable)
            new = _m_by_n_mask(weight) if self.state.structure == "2:4" else _magnitude_mask(weight, target)
            mask.assign(new)
            variable.assign(weight * new)


# ---------------------------------------------------------------------------------------------------
# Helpers


def _numpy(value):
    return keras3().ops.convert_to_numpy(value)


def _normalizations() -> tuple:
    layers = keras3().layers
    names = ("BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization",
             "RMSNormalization")
    return tuple(getattr(layers, n) for n in names if hasattr(layers, n))


def _variable(owner, name):
    """The variable behind `owner.<name>` (Keras 3 keeps some behind a property, as `_<name>`)."""
    variable_type = keras3().Variable
    for attr in (f"_{name}", name):
        try:
            value = getattr(owner, attr, None)
        except Exception:  # a property of an unbuilt or unusual layer
            value = None
        if isinstance(value, variable_type):
            return value
    return None


def _flat_layers(model) -> list:
    model_type = keras3().Model
    layers = []
    for layer in model.layers:
        layers.extend(_flat_layers(layer) if isinstance(layer, model_type) else [layer])
    return layers


def _last_update(schedule, first: int, last: int) -> int | None:
    """The last step in [first, last] where tfmot would update the masks (begin <= step <= end and
    (step - begin) % frequency == 0), or None."""
    begin, end, frequency = schedule.begin_step, schedule.end_step, schedule.frequency
    top = last if end < 0 else min(last, end)  # tfmot: a negative end prunes forever
    if top < begin:
        return None
    step = begin + (top - begin) // frequency * frequency
    return step if step >= first else None


def _magnitude_mask(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Zeros at the round(size * sparsity) smallest |weight| (ties: the lower flat index first)."""
    magnitudes = np.abs(weight).ravel()
    k = int(round(magnitudes.size * sparsity))
    mask = np.ones(magnitudes.size, dtype=weight.dtype)
    mask[np.argsort(magnitudes, kind="stable")[:k]] = 0
    return mask.reshape(weight.shape)


def _m_by_n_mask(weight: np.ndarray, m_by_n: tuple[int, int] = _M_BY_N) -> np.ndarray:
    """Zeros at the m smallest |weight| of every n consecutive values along axis -2 (the input channels
    of Dense and Conv kernels), like tfmot's sparsity_m_by_n; a last, shorter group is padded with zeros."""
    m, n = m_by_n
    moved = np.moveaxis(np.abs(weight), -2, -1)
    channels = moved.shape[-1]
    padded = np.concatenate([moved, np.zeros(moved.shape[:-1] + ((-channels) % n,), moved.dtype)], axis=-1)
    groups = padded.reshape(-1, n)
    mask = np.ones(groups.shape, dtype=weight.dtype)
    np.put_along_axis(mask, np.argsort(groups, axis=-1, kind="stable")[:, :m], 0, axis=-1)
    mask = mask.reshape(padded.shape)[..., :channels]
    return np.moveaxis(mask, -1, -2)
