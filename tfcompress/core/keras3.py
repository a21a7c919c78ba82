"""Keras 3 models in: telling them apart, loading them, converting them, and translating them to tf_keras.

In TensorFlow >= 2.16 `tf.keras` is Keras 3 unless TF_USE_LEGACY_KERAS=1, so most users' models are Keras 3;
tfmot (pruning wrappers, clustering, QAT) works only on tf_keras (Keras 2). Post-training conversion takes a
Keras 3 model directly (`converter`); the training-time stages take the tf_keras model `to_tf_keras`
translates from it layer by layer (configs mapped, weights copied, outputs compared on real inputs before
any training), and `to_keras3` hands a pruned or clustered result back as a Keras 3 model.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import tempfile
import zipfile
from typing import Any

import numpy as np

from tfcompress.core._keras import is_keras3, keras, keras3, tf

# Base-layer keyword arguments tf_keras accepts on every layer.
_BASE_KWARGS = frozenset({"name", "trainable", "dtype", "input_shape", "batch_input_shape", "batch_size",
                          "input_dim", "weights", "activity_regularizer", "autocast", "dynamic"})
# Keras 3 keys renamed in tf_keras, per layer class.
_RENAMED = {"LeakyReLU": {"negative_slope": "alpha"}}
EQUIVALENCE_TOLERANCE = 1e-5


class Keras3Error(ValueError):
    """A Keras 3 model that cannot be used as asked; the message names the cause and the fix."""


@dataclasses.dataclass(frozen=True)
class Translation:
    """A Keras 3 model translated to tf_keras, and how close the two are on real inputs.

    Attributes:
        model: the tf_keras functional model (same layer names, weights copied).
        num_layers: layers translated (nested models counted by their layers).
        max_abs_error: the largest |Keras 3 output - tf_keras output| over `num_samples` inputs.
        num_samples: inputs the two models were compared on (0: not compared yet).
        inputs_source: what those inputs were ("training data", ...).
    """

    model: Any
    num_layers: int
    max_abs_error: float | None = None
    num_samples: int = 0
    inputs_source: str | None = None

    def describe(self) -> str:
        text = f"Keras 3 model, translated to tf_keras ({self.num_layers} layers, weights copied)"
        if self.num_samples:
            text += (f"; outputs agree within {self.max_abs_error:.1e} on {self.num_samples} "
                     f"{self.inputs_source or 'inputs'}")
        return text


# ---------------------------------------------------------------------------------------------------
# Telling Keras versions apart


def file_keras_version(path: str) -> int | None:
    """The Keras major version that wrote a `.keras`/`.h5` file or a SavedModel directory, if it says.

    `.keras` archives keep it in `metadata.json`, `.h5` files in the `keras_version` attribute; tf_keras
    SavedModels have `keras_metadata.pb`, Keras 3 `model.export()` SavedModels its variables endpoints.
    """
    try:
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, "keras_metadata.pb")):
                return 2
            return None  # decided on load (exported_by_keras3)
        if path.endswith(".keras") and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if "metadata.json" not in archive.namelist():
                    return None
                version = str(json.loads(archive.read("metadata.json")).get("keras_version", ""))
        elif path.endswith((".h5", ".hdf5")):
            import h5py

            with h5py.File(path, "r") as f:
                version = f.attrs.get("keras_version", "")
                version = version.decode() if isinstance(version, bytes) else str(version)
        else:
            return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None  # unreadable: the loader says why
    major = version.split(".")[0]
    return int(major) if major.isdigit() else None


def exported_by_keras3(loaded) -> bool:
    """Whether a restored SavedModel object was written by Keras 3's `model.export()` (an ExportArchive)."""
    return hasattr(loaded, "_all_variables") and hasattr(loaded, "_misc_assets")


def load_keras3_file(path: str, safe_mode: bool = True):
    """Loads a Keras 3 `.keras`/`.h5` file with Keras 3 (uncompiled; `safe_mode` refuses Lambda code)."""
    return keras3().saving.load_model(path, compile=False, safe_mode=safe_mode)


def check_usable(model, what: str = "model", backend: str | None = None) -> None:
    """Refuses a Keras 3 model on another backend than TensorFlow (`backend`: the process's, by default)."""
    backend = backend or keras3().config.backend()
    if backend != "tensorflow":
        raise Keras3Error(
            f"The Keras 3 {what} {model.name!r} runs on the {backend!r} backend; tfcompress converts and trains "
            "TensorFlow graphs. Set KERAS_BACKEND=tensorflow before importing keras, and load or rebuild the "
            f"model there (its weights carry over: model.save('model.keras')). Received: backend={backend!r}"
        )


def is_graph_model(model) -> bool:
    """A Keras 3 functional or Sequential model (what can be translated layer by layer)."""
    k = keras3()
    return isinstance(model, (k.Sequential, k.src.models.functional.Functional))


def check_graph_model(model, stage: str) -> None:
    check_usable(model)
    if not is_graph_model(model):
        raise Keras3Error(
            f"{stage} needs a functional or Sequential Keras 3 model, but {model.name!r} is a subclassed model "
            f"({type(model).__name__}): its layers are Python code, not a graph that can be copied. Rebuild it with "
            "keras.Input(...) and layer calls (keras.Model(inputs, outputs)) or keras.Sequential, and load its weights "
            f"(model.load_weights). Received: model={type(model).__name__}"
        )


# ---------------------------------------------------------------------------------------------------
# Conversion


def output_names(model) -> list[str]:
    """A Keras 3 model's output names: `output_names` where Keras 3 has them, else the output layers' names
    (a Keras 3 Sequential has no `output_names`), as tf_keras names them."""
    names = list(getattr(model, "output_names", None) or [])
    if not names:
        names = [_tensor_name(t, i) for i, t in enumerate(model.outputs)]
    return names


def export(model) -> tempfile.TemporaryDirectory:
    """A live Keras 3 model as a SavedModel in a temporary directory (removed with the returned object), its
    outputs named as in Keras; `TFLiteConverter.from_saved_model(directory.name)` converts it.

    `TFLiteConverter.from_keras_model` takes a Keras 3 model too, but exports it with outputs `output_0`,
    `output_1`, ... and prints the export to stdout; this exports it with Keras 3's own `ExportArchive` (the
    model's variables tracked, so the converter freezes them) and a dict of outputs keyed by the Keras output
    names, as tf_keras models have. `FloatModel` exports once and makes every converter from that directory.
    """
    check_usable(model)
    k = keras3()
    names = output_names(model)
    spec = [tf.TensorSpec(tuple(t.shape), t.dtype, name=_tensor_name(t, i)) for i, t in enumerate(model.inputs)]

    def serve(*inputs):
        outputs = model(inputs[0] if len(inputs) == 1 else list(inputs), training=False)
        if isinstance(outputs, dict):
            return {name: outputs[name] for name in names}
        return dict(zip(names, _as_list(outputs)))

    archive = k.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=spec)
    directory = tempfile.TemporaryDirectory(prefix="tfcompress_keras3_")
    archive.write_out(directory.name, verbose=False)
    return directory


def _tensor_name(tensor, index: int) -> str:
    history = getattr(tensor, "_keras_history", None)
    layer = getattr(history, "operation", None) if history is not None else None
    return getattr(layer, "name", None) or f"tensor_{index}"


# ---------------------------------------------------------------------------------------------------
# Keras 3 -> tf_keras


def to_tf_keras(model, inputs: np.ndarray | None = None, inputs_source: str | None = None,
                stage: str = "The training-time stages") -> Translation:
    """Translates a Keras 3 functional or Sequential model into an equivalent tf_keras functional model.

    Every layer's config is mapped to its tf_keras counterpart and its weights are copied; with `inputs`
    (real samples, batch first) both models are run and must agree within 1e-5 (times the output's
    largest magnitude, when that is above 1), else `Keras3Error`.

    ```python
    translation = to_tf_keras(keras3_model, inputs=x_train[:256], inputs_source="training inputs")
    pruned = tfcompress.prune(translation.model, 0.8)   # or cluster, quantize_aware, factorize ...
    ```

    Raises:
        Keras3Error: another backend, a subclassed model, a layer with no tf_keras counterpart (named, with
            the fix), or outputs that differ.
    """
    check_graph_model(model, stage)
    translated, count = _translate(model)
    result = Translation(translated, count)
    if inputs is not None:
        result = check_equivalent(model, result, inputs, inputs_source)
    return result


def as_tf_keras(model, stage: str):
    """`model` as a tf_keras model: itself if it is one; a Keras 3 model translated by `to_tf_keras`.

    The API's training stages take either Keras. Given no data, the translation is checked on 32 seeded random
    inputs in [0, 1); call `to_tf_keras(model, inputs=x)` first to check it on your own samples.
    """
    if not is_keras3(model):
        return model
    return to_tf_keras(model, inputs=probe_inputs(model), inputs_source="seeded random inputs in [0, 1)",
                       stage=stage).model


def probe_inputs(model, count: int = 32, seed: int = 0) -> np.ndarray:
    spec = model.inputs[0]
    shape = tuple(count if i == 0 and d is None else (d or 1) for i, d in enumerate(spec.shape))
    rng = np.random.default_rng(seed)
    if "int" in str(spec.dtype):
        return np.zeros(shape, dtype=np.int32)
    return rng.uniform(0.0, 1.0, shape).astype(np.float32)


def check_equivalent(original, translation: Translation, inputs: np.ndarray,
                     inputs_source: str | None = None) -> Translation:
    """Runs both models on `inputs`; returns the translation with the measured error, or raises."""
    dtype = np.int32 if "int" in str(original.inputs[0].dtype) else np.float32
    x = np.asarray(inputs, dtype=dtype)[:256]
    batch = original.inputs[0].shape[0]  # a model built for a fixed batch (batch_size=1) runs in those batches
    step = batch or len(x)
    count = (len(x) // step) * step
    if count == 0:
        raise Keras3Error(f"Comparing the tf_keras translation of {original.name!r} needs at least {step} input "
                          f"samples (its fixed batch size). Received: {len(x)} samples")
    x = x[:count]
    ours_parts, theirs_parts = [], []
    for start in range(0, count, step):
        chunk = tf.constant(x[start:start + step])
        ours_parts.append([np.asarray(v) for v in _as_list(translation.model(chunk, training=False))])
        out = original(chunk, training=False)
        out = [out[n] for n in output_names(original)] if isinstance(out, dict) else _as_list(out)
        theirs_parts.append([np.asarray(v) for v in out])
    ours = [np.concatenate(parts) for parts in zip(*ours_parts)]
    theirs = [np.concatenate(parts) for parts in zip(*theirs_parts)]
    worst = 0.0
    for name, a, b in zip(output_names(original), theirs, ours):
        a, b = a.astype(np.float64), b.astype(np.float64)
        error = float(np.max(np.abs(a - b))) if a.size else 0.0
        limit = EQUIVALENCE_TOLERANCE * max(1.0, float(np.max(np.abs(a))) if a.size else 1.0)
        if not error <= limit:
            raise Keras3Error(
                f"The tf_keras translation of Keras 3 model {original.name!r} differs from it on output {name!r} "
                f"by {error:.3g} (limit {limit:.1e}) on {len(x)} inputs: a layer behaves differently in tf_keras. "
                "Report it with the model, and meanwhile save the model from tf_keras (import tf_keras as keras) "
                "to use the training stages."
            )
        worst = max(worst, error)
    return dataclasses.replace(translation, max_abs_error=worst, num_samples=int(len(x)),
                               inputs_source=inputs_source)


def to_keras3(model, like):
    """Hands a tf_keras model with `like`'s layers (a pruned or clustered result, stripped) back as Keras 3.

    A copy of the Keras 3 model `like` gets each layer's weights from the layer of the same name in `model`.

    ```python
    plain = tfcompress.strip(clustered)                 # tf_keras, clustered weights
    keras3_model = tfcompress.to_keras3(plain, like=original_keras3_model)
    ```
    """
    check_graph_model(like, "to_keras3")
    if is_keras3(model):
        raise Keras3Error(f"to_keras3 takes a tf_keras model; {model.name!r} is already Keras 3. Received: "
                          f"model={type(model).__name__}")
    copy = keras3().models.clone_model(like)
    copy.set_weights(like.get_weights())
    ours = {layer.name: layer for layer in _flat_layers(model)}
    for layer in _flat_layers(copy):
        if not layer.weights:
            continue
        source = ours.get(layer.name)
        if source is None or len(source.get_weights()) != len(layer.weights):
            raise Keras3Error(
                f"Layer {layer.name!r} of {like.name!r} has no counterpart with the same weights in {model.name!r}: "
                "to_keras3 hands back models with the original's layers (pruned or clustered, stripped), not "
                f"factorized or QAT ones. Received: model={model.name}"
            )
        values = source.get_weights()
        for variable, value in zip(layer.weights, values):
            if tuple(variable.shape) != value.shape:
                raise Keras3Error(f"Layer {layer.name!r}: weight {variable.name} is {tuple(variable.shape)} in "
                                  f"Keras 3 but {value.shape} in {model.name!r}. Received: model={model.name}")
        layer.set_weights(values)
    return copy


def _flat_layers(model) -> list:
    found = []
    for layer in model.layers:
        found.extend(_flat_layers(layer) if isinstance(layer, (keras.Model, keras3().Model)) else [layer])
    return found


def _as_list(outputs) -> list:
    if isinstance(outputs, dict):
        return list(outputs.values())
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _translate(model) -> tuple[Any, int]:
    """(tf_keras functional model, layers translated) for a Keras 3 functional or Sequential model."""
    k = keras3()
    if isinstance(model, k.Sequential):
        return _translate_sequential(model)
    return _translate_functional(model)


def _translate_sequential(model) -> tuple[Any, int]:
    if not model.built or not getattr(model, "inputs", None):
        raise Keras3Error(
            f"Keras 3 Sequential model {model.name!r} has no input shape yet: start it with keras.Input(shape) or "
            f"call it once on data, then pass it again. Received: model={model.name}"
        )
    spec = model.inputs[0]
    x = inputs = keras.Input(batch_shape=tuple(spec.shape), dtype=spec.dtype, name=_tensor_name(spec, 0))
    count = 0
    for layer in model.layers:
        made, n = _layer(layer, layer.__class__.__name__, "keras.layers", layer.get_config())
        x = made(x)
        _copy_weights(layer, made)
        count += n
    return keras.Model(inputs, x, name=model.name), count


def _translate_functional(model) -> tuple[Any, int]:
    config = model.get_config()
    operations = {op.name: op for op in model.operations}  # layers, and operators such as x + y
    produced: dict[tuple[str, int], list] = {}
    made_layers: dict[str, Any] = {}
    pending = []
    count = 0
    for entry in config["layers"]:
        name = entry.get("name") or entry["config"]["name"]
        if entry["class_name"] == "InputLayer":
            cfg = entry["config"]
            shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
            produced[(name, 0)] = [keras.Input(batch_shape=tuple(shape), dtype=cfg.get("dtype", "float32"), name=name)]
            continue
        for index, node in enumerate(entry.get("inbound_nodes", [])):
            pending.append((entry, name, index, node))
    while pending:
        progress_made, waiting = False, []
        for entry, name, index, node in pending:
            try:
                args = _resolve(node.get("args", ()), produced)
                kwargs = _resolve(node.get("kwargs", {}), produced)
            except KeyError:
                waiting.append((entry, name, index, node))
                continue
            if name not in made_layers:
                made_layers[name], n = _layer(operations[name], entry["class_name"], entry.get("module"),
                                              entry["config"])
                count += n
            outputs = made_layers[name](*args, **kwargs)
            produced[(name, index)] = _as_list(outputs)
            progress_made = True
        if not progress_made:
            names = sorted({name for _, name, _, _ in waiting})
            raise Keras3Error(f"Cannot order the layers of Keras 3 model {model.name!r} ({', '.join(names)} wait on "
                              "inputs no layer produces). Received: model={model.name}")
        pending = waiting
    for name, layer in made_layers.items():
        _copy_weights(operations[name], layer)
    inputs = _structure(config["input_layers"], produced)
    outputs = _structure(config["output_layers"], produced)
    return keras.Model(inputs, outputs, name=model.name), count


def _structure(spec, produced):
    if isinstance(spec, dict):
        return {key: _structure(value, produced) for key, value in spec.items()}
    if len(spec) == 3 and isinstance(spec[0], str) and isinstance(spec[1], int):
        return produced[(spec[0], spec[1])][spec[2]]
    return [_structure(s, produced) for s in spec]


def _resolve(value, produced):
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            layer, node, tensor = value["config"]["keras_history"]
            return produced[(layer, node)][tensor]
        return {key: _resolve(v, produced) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, produced) for v in value)
    return value


def _layer(source, class_name: str, module: str | None, config: dict) -> tuple[Any, int]:
    """(tf_keras layer or model, layers in it) with the Keras 3 layer's settings."""
    k = keras3()
    if isinstance(source, k.Model):
        check_graph_model(source, "Translating a nested model")
        return _translate(source)
    target = getattr(keras.layers, class_name, None) if module in (None, "keras.layers") else None
    if target is None or not isinstance(target, type) or type(source).__module__.split(".")[0] != "keras":
        raise Keras3Error(_no_counterpart(source, class_name, module))
    # The class Keras 3 registered under this name must be the built-in one, not a user subclass.
    if getattr(k.layers, class_name, None) is not type(source):
        raise Keras3Error(_no_counterpart(source, class_name, module))
    mapped = _map_config(source, class_name, target, config)
    try:
        return target.from_config(mapped), 1
    except Exception as e:  # a config tf_keras refuses: name the layer
        raise Keras3Error(
            f"Layer {source.name!r} ({class_name}) of the Keras 3 model has settings tf_keras's {class_name} "
            f"does not take ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}). Rebuild "
            f"it with settings both Keras versions share, or train it in tf_keras. Received: layer={source.name}"
        ) from None


def _no_counterpart(source, class_name: str, module: str | None) -> str:
    where = f"{module}.{class_name}" if module else class_name
    return (
        f"Layer {source.name!r} ({where}) of the Keras 3 model has no tf_keras counterpart, so the training-time "
        "stages (tfmot: prune, cluster, QAT; factorize, distill) cannot copy it. Replace it with built-in Keras "
        "layers (an operator such as x + y: keras.layers.Add()), or convert the model without training stages "
        f"(tfcompress convert takes Keras 3 models as they are). Received: layer={source.name} ({class_name})"
    )


def _map_config(source, class_name: str, target: type, config: dict) -> dict:
    renamed = _RENAMED.get(class_name, {})
    accepted = _parameters(target) | _BASE_KWARGS
    defaults = _defaults(type(source))
    mapped = {}
    for key, value in config.items():
        key_out = renamed.get(key, key)
        if key == "dtype":
            mapped["dtype"] = _dtype_name(value)
        elif key_out in accepted:
            mapped[key_out] = _legacy(value)
        elif value is None or (key in defaults and _same(defaults[key], value)):
            continue  # a Keras 3 setting left at its default: nothing to carry over
        else:
            raise Keras3Error(
                f"Layer {source.name!r} ({class_name}) of the Keras 3 model sets {key}={value!r}, which tf_keras's "
                f"{class_name} does not have. Leave {key} at its default ({defaults.get(key)!r}) to use the "
                f"training-time stages, or convert the model without them. Received: {key}={value!r}"
            )
    return mapped


def _same(a, b) -> bool:
    try:
        return bool(a == b) or (isinstance(a, (list, tuple)) and list(a) == list(b))
    except Exception:
        return False


def _parameters(cls: type) -> set[str]:
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self":
                names.add(p.name)
        if not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
            break
    return names


def _defaults(cls: type) -> dict:
    defaults = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.default is not inspect.Parameter.empty:
                defaults[p.name] = p.default
    return defaults


def _dtype_name(value) -> str:
    if isinstance(value, dict):
        return str(value.get("config", {}).get("name", "float32"))
    return value if isinstance(value, str) else str(getattr(value, "name", "float32"))


def _legacy(value):
    """Keras 3's serialized objects ({module, class_name, config, registered_name}) in tf_keras's form."""
    if isinstance(value, dict) and "class_name" in value and "config" in value:
        class_name = value["class_name"]
        config = value["config"] if isinstance(value["config"], dict) else {}
        target = _object_class(value.get("module"), class_name)
        if target is not None:
            accepted = _parameters(target)
            config = {k: _legacy(v) for k, v in config.items() if k in accepted or not accepted}
        if class_name == "DTypePolicy":
            return config.get("name", "float32")
        return {"class_name": class_name, "config": config}
    if isinstance(value, dict):
        return {k: _legacy(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return list(value)
    return value


def _object_class(module: str | None, class_name: str):
    for package in (keras.initializers, keras.regularizers, keras.constraints):
        if module is None or module.endswith(package.__name__.rsplit(".", 1)[-1]):
            found = getattr(package, class_name, None)
            if isinstance(found, type):
                return found
    return None


def _copy_weights(source, target) -> None:
    values = source.get_weights()
    if not values:
        return
    if len(target.weights) != len(values):
        raise Keras3Error(
            f"Layer {source.name!r} has {len(values)} weights in Keras 3 but {len(target.weights)} in tf_keras: the "
            "two versions store it differently. Rebuild it with settings both Keras versions share. "
            f"Received: layer={source.name}"
        )
    for variable, value in zip(target.weights, values):
        if tuple(variable.shape) != value.shape:
            raise Keras3Error(
                f"Layer {source.name!r}: a weight is {value.shape} in Keras 3 but {tuple(variable.shape)} in tf_keras. "
                f"Received: layer={source.name}"
            )
    target.set_weights(values)
