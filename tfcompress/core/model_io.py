"""Loading the float model a pipeline starts from: SavedModel directory, tf_keras model, or model file.

Takes what the user has (a SavedModel directory, a `.keras`/`.h5` file, or a live `tf_keras.Model`) and
returns a `FloatModel`: its input shape, a batched `predict`, and a fresh `TFLiteConverter` for it.
Loading errors become one-line `ModelLoadError`s that name the path and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any
from collections.abc import Callable

import numpy as np

from tfcompress.core._keras import keras, tf
from tfcompress.core.errors import ModelLoadError
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
    """

    source: str
    input_shape: tuple[int | None, ...]
    is_quantization_aware: bool
    keras_model: Any = None
    saved_model_dir: str | None = None
    _signature: Callable | None = None
    _input_name: str | None = None

    def converter(self) -> tf.lite.TFLiteConverter:
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
                    named = dict(zip(self.keras_model.output_names, values))
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


def load_model(source: Any) -> FloatModel:
    """Loads a float model from a SavedModel directory, a `.keras`/`.h5` file or a tf_keras model.

    Args:
        source: a path (str or PathLike) or a `tf_keras.Model`.

    Raises:
        ModelLoadError: missing path, unknown format, or a file TensorFlow cannot read.
        ValueError: `source` is neither a path nor a tf_keras model.
    """
    if isinstance(source, keras.Model):
        return _from_keras(source, source.name)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(
            "load_model expects a SavedModel directory, a .keras/.h5 path or a tf_keras.Model; a Keras 3 "
            "model cannot be used (tfmot needs Keras 2). "
            f"Received: source={type(source).__name__}"
        )
    path = os.fspath(source)
    if not os.path.exists(path):
        raise ModelLoadError(f"Model not found: {path}. Pass an existing SavedModel directory or .keras/.h5 file.")
    if os.path.isdir(path):
        return _from_saved_model(path)
    if path.endswith((".keras", ".h5", ".hdf5")):
        try:
            model = _load_keras_file(path)
        except Exception as e:
            raise ModelLoadError(
                f"Cannot load Keras model {path}: {_first_line(e)}. Check that the file is complete and "
                "was saved by tf_keras (Keras 2)."
            ) from None
        return _from_keras(model, path)
    raise ModelLoadError(
        f"Unknown model format: {path}. Pass a SavedModel directory or a .keras/.h5 file."
    )


def _load_keras_file(path: str):
    import tensorflow_model_optimization as tfmot  # QAT models need tfmot's custom objects

    with tfmot.quantization.keras.quantize_scope():
        return keras.models.load_model(path, compile=False)


def _from_keras(model, source: str) -> FloatModel:
    if not model.inputs or len(model.inputs) != 1:
        raise ModelLoadError(
            f"Model {source} has {len(model.inputs or [])} inputs; tfcompress converts single-input models. "
            "Build the model with one Input (subclassed models: call it once on data first)."
        )
    shape = tuple(model.inputs[0].shape)
    qat = any(type(layer).__name__ in _QAT_LAYER_NAMES for layer in model.submodules)
    return FloatModel(source=str(source), input_shape=shape, is_quantization_aware=qat, keras_model=model)


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
    )


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
