"""Loading the float model a pipeline starts from: SavedModel directory, tf_keras model, or model file.

Takes what the user has (a SavedModel directory, a `.keras`/`.h5` file, or a live model) from either Keras
(tf_keras, or Keras 3: its files, its `model.export()` SavedModels and its model objects) and returns a
`FloatModel`: its input shape, a batched `predict`, a fresh `TFLiteConverter` for it, and what it is.
Loading errors become one-line `ModelLoadError`s that name the path and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any
from collections.abc import Callable

import numpy as np

from tfcompress.core import keras3 as keras3_io
from tfcompress.core._keras import is_keras3, keras, tf
from tfcompress.core.errors import ModelLoadError
from tfcompress.core.model_safety import check_model_file
from tfcompress.core.progress import progress

_QAT_LAYER_NAMES = frozenset({"QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer"})
_FAKE_QUANT_OPS = frozenset({"FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxVarsPerChannel"})


@dataclasses.dataclass(frozen=True)
class FloatModel:
    """A loaded float (or QAT) model, whatever it was loaded from.

    Attributes:
        source: what the model was loaded from, for messages and reports.
        input_shape: the input shape including the batch dimension (None where dynamic).
        is_quantization_aware: the graph carries fake-quant ranges from QAT.
        keras_model: the tf_keras model, when there is one.
        saved_model_dir: the SavedModel directory, when loaded from one.
        keras_version: 2 (tf_keras), 3 (Keras 3: a model object, file or `model.export()` SavedModel), or None
            (a SavedModel no Keras wrote).
        kind: what it is, for reports ("Keras 3 model (.keras file)", ...).
    """

    source: str
    input_shape: tuple[int | None, ...]
    is_quantization_aware: bool
    keras_model: Any = None
    saved_model_dir: str | None = None
    _signature: Callable | None = None
    _input_name: str | None = None
    keras_version: int | None = 2
    kind: str = "tf_keras model"
    # A Keras 3 model's SavedModel export, made on the first `converter()` (conversion and the debugger share it;
    # load the model again after changing its weights).
    _keras3_export: list = dataclasses.field(default_factory=list, compare=False, repr=False)

    @property
    def is_keras3(self) -> bool:
        return self.keras_version == 3

    def converter(self) -> tf.lite.TFLiteConverter:
        if self.keras_model is not None and self.keras_version == 3:
            if not self._keras3_export:
                self._keras3_export.append(keras3_io.export(self.keras_model))
            return tf.lite.TFLiteConverter.from_saved_model(self._keras3_export[0].name)
        if self.keras_model is not None:
            return tf.lite.TFLiteConverter.from_keras_model(self.keras_model)
        return tf.lite.TFLiteConverter.from_saved_model(self.saved_model_dir)

    def predict(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Float outputs of the first output for `x` (`predict_all` has every output), in batches."""
        return next(iter(self.predict_all(x, batch_size).values()))

    def predict_all(self, x: np.ndarray, batch_size: int = 1000) -> dict[str, np.ndarray]:
        """Every output for `x` by name (Keras output names, or the SavedModel signature's), in batches."""
        outputs: dict[str, list[np.ndarray]] = {}
        starts = range(0, len(x), batch_size)
        for start in progress(starts, total=len(starts), desc="evaluating (float model)"):
            batch = tf.constant(x[start : start + batch_size], dtype=tf.float32)
            if self.keras_model is not None:
                out = self.keras_model(batch, training=False)
                if isinstance(out, dict):
                    named = out
                else:
                    values = out if isinstance(out, (list, tuple)) else [out]
                    names = (keras3_io.output_names(self.keras_model) if self.keras_version == 3
                             else self.keras_model.output_names)
                    named = dict(zip(names, values))
            else:
                out = self._signature(**{self._input_name: batch})
                named = {name: out[name] for name in sorted(out)}
            for name, value in named.items():
                outputs.setdefault(name, []).append(np.asarray(value))
        return {name: np.concatenate(parts, axis=0) for name, parts in outputs.items()}


def model_source(saved_model_dir: str | None, keras_model: str | None) -> str:
    """The one model path a pipeline was given (the --saved_model_dir / --keras_model pair of flags)."""
    if (saved_model_dir is None) == (keras_model is None):
        raise ValueError(
            "Give exactly one model: --saved_model_dir or --keras_model. "
            f"Received: saved_model_dir={saved_model_dir!r}, keras_model={keras_model!r}"
        )
    return saved_model_dir if saved_model_dir is not None else keras_model


def load_model(source: Any, trust_model: bool = False) -> FloatModel:
    """Loads a float model from a SavedModel directory, a `.keras`/`.h5` file or a model object.

    Either Keras: a tf_keras (Keras 2) or Keras 3 model object, a `.keras`/`.h5` file either wrote (told apart
    by the version the file records), a tf_keras SavedModel, a Keras 3 `model.export()` SavedModel, or any
    SavedModel with a serving signature. Keras 3 models must be on the TensorFlow backend.

    A model file's saved configuration is read first: `Lambda` layers (whose code Keras would run while
    loading) and unregistered custom layers are refused, naming each, unless `trust_model` (`--trust_model`).

    Args:
        source: a path (str or PathLike) or a Keras model.
        trust_model: the user vouches for the file: load it even if it holds code (Keras' `safe_mode` off).

    Raises:
        ModelLoadError: missing path, unknown format, or a file TensorFlow cannot read.
        ValueError: `source` is neither a path nor a Keras model, or a Keras 3 model on another backend.
    """
    if isinstance(source, keras.Model):
        return _from_keras(source, source.name, "tf_keras model (object)")
    if is_keras3(source):
        keras3_io.check_usable(source)
        return _from_keras(source, source.name, "Keras 3 model (object)", keras_version=3)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            "load_model expects a SavedModel directory, a .keras/.h5 path or a Keras model (tf_keras or Keras 3). "
            f"Received: source={type(source).__name__}"
        )
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ModelLoadError(f"Model not found: {path}. Pass an existing SavedModel directory or .keras/.h5 file.")
    if os.path.isdir(path):
        return _from_saved_model(path)
    if path.endswith((".keras", ".h5", ".hdf5")):
        version = keras3_io.file_keras_version(path)
        suffix = os.path.splitext(path)[1]
        check_model_file(path, trust_model)  # before Keras deserializes anything
        try:
            model = (keras3_io.load_keras3_file(path, safe_mode=not trust_model) if version == 3
                     else _load_keras_file(path, safe_mode=not trust_model))
        except Exception as e:
            writer = "Keras 3" if version == 3 else "tf_keras (Keras 2)" if version == 2 else "Keras"
            raise ModelLoadError(
                f"Cannot load Keras model {path} (written by {writer}): {_first_line(e)}. Check that the file is "
                "complete and loads in the Keras that saved it."
            ) from None
        if version == 3:
            keras3_io.check_usable(model)
            return _from_keras(model, path, f"Keras 3 model ({suffix} file)", keras_version=3)
        return _from_keras(model, path, f"tf_keras model ({suffix} file)")
    raise ModelLoadError(
        f"Unknown model format: {path}. Pass a SavedModel directory or a .keras/.h5 file."
    )


def _load_keras_file(path: str, safe_mode: bool = True):
    import tensorflow_model_optimization as tfmot  # QAT models need tfmot's custom objects

    with tfmot.quantization.keras.quantize_scope():
        return keras.models.load_model(path, compile=False, safe_mode=safe_mode)


def _from_keras(model, source: str, kind: str, keras_version: int = 2) -> FloatModel:
    if not model.inputs or len(model.inputs) != 1:
        raise ModelLoadError(
            f"Model {source} has {len(model.inputs or [])} inputs; tfcompress converts single-input models. "
            "Build the model with one Input (subclassed models: call it once on data first)."
        )
    shape = tuple(model.inputs[0].shape)
    _check_fixed_shape(shape, source)
    layers = model._flatten_layers() if keras_version == 3 else model.submodules
    qat = any(type(layer).__name__ in _QAT_LAYER_NAMES for layer in layers)
    return FloatModel(source=str(source), input_shape=shape, is_quantization_aware=qat, keras_model=model,
                      keras_version=keras_version, kind=kind)


def _from_saved_model(path: str) -> FloatModel:
    if not (os.path.isfile(os.path.join(path, "saved_model.pb"))
            or os.path.isfile(os.path.join(path, "saved_model.pbtxt"))):
        raise ModelLoadError(
            f"{path} is not a SavedModel directory (no saved_model.pb). "
            "Pass the directory written by tf.saved_model.save or model.save(..., save_format='tf')."
        )
    try:
        loaded = tf.saved_model.load(path)
    except Exception as e:
        raise ModelLoadError(
            f"Cannot load SavedModel {path}: {_first_line(e)}. The directory is corrupt or incomplete: "
            "save the model again."
        ) from None
    signature = getattr(loaded, "signatures", {}).get("serving_default")
    if signature is None:
        raise ModelLoadError(
            f"SavedModel {path} has no 'serving_default' signature. Save it with a serving signature "
            "(Keras models get one from model.save)."
        )
    _, kwargs = signature.structured_input_signature
    if len(kwargs) != 1:
        raise ModelLoadError(
            f"SavedModel {path} has {len(kwargs)} inputs; tfcompress converts single-input models."
        )
    (name, spec), = kwargs.items()
    _check_fixed_shape(tuple(spec.shape), path)
    if os.path.isfile(os.path.join(path, "keras_metadata.pb")):
        version, kind = 2, "tf_keras SavedModel"
    elif keras3_io.exported_by_keras3(loaded):
        version, kind = 3, "Keras 3 model.export() SavedModel (a graph: no Keras layers to train)"
    else:
        version, kind = None, "SavedModel"
    graph_def = signature.graph.as_graph_def()
    ops = {n.op for n in graph_def.node}
    for function in graph_def.library.function:
        ops.update(n.op for n in function.node_def)
    return FloatModel(
        source=path,
        input_shape=tuple(spec.shape),
        is_quantization_aware=bool(ops & _FAKE_QUANT_OPS),
        saved_model_dir=path,
        _signature=signature,
        _input_name=name,
        keras_version=version,
        kind=kind,
    )


def _check_fixed_shape(shape: tuple, source: str) -> None:
    dynamic = [i for i, d in enumerate(shape) if i > 0 and d is None]
    if dynamic:
        fixed = tuple(d if d is not None else "N" for d in shape[1:])
        raise ModelLoadError(
            f"Model {source} has an input of shape {shape} whose dimension(s) {', '.join(map(str, dynamic))} are not "
            "fixed: int8 calibration and microcontroller arenas need every size but the batch. Rebuild the model "
            f"with keras.Input({fixed}) filled in (the weights carry over)."
        )


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
