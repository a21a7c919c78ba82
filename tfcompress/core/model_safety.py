"""Loading a model file must not run code from it unless the user says so.

Keras files can carry Python: a `Lambda` layer stores its function's bytecode, which Keras runs when it
rebuilds the model, and a custom layer class names code the loader would look up. Before any model file is
deserialized, `check_model_file` reads the configuration it saved (a `.h5` file's `model_config`, a `.keras`
archive's `config.json`, a tf_keras SavedModel's `keras_metadata.pb`) and refuses `Lambda` layers and layer
classes that are neither built into Keras (either Keras; tfmot's QAT wrappers included) nor registered as
custom objects, naming each, unless `trust_model=True` (`--trust_model`). Keras 3 archives are then loaded
with Keras' own `safe_mode` as well. A SavedModel without Keras metadata is a graph: loading it runs no
Python, so it needs no check.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator

from tfcompress.core._keras import keras, keras3, keras_saved_metadata
from tfcompress.core.errors import ModelLoadError

_MODEL_CLASSES = frozenset({"Functional", "Sequential", "Model"})
TRUST_FLAG = "--trust_model"


def check_model_file(path: str, trust_model: bool = False) -> None:
    """Raises `ModelLoadError` naming every `Lambda` or unknown custom layer the file's saved config holds.

    ```python
    check_model_file("model.h5")                     # refuses a Lambda layer
    check_model_file("model.h5", trust_model=True)   # the user vouches for the file: nothing checked
    ```
    """
    if trust_model:
        return
    records = list(_layer_records(path))
    if os.path.isdir(path):
        # tf_keras revives a SavedModel's custom layers from their traced graphs, without their classes' code;
        # only a Lambda's stored bytecode would run (its metadata also lists metrics, which are not layers).
        records = [(class_name, name) for class_name, name in records if class_name == "Lambda"]
    lambdas = [name for class_name, name in records if class_name == "Lambda"]
    unknown = [f"{name} ({class_name})" for class_name, name in records
               if class_name != "Lambda" and not _known(class_name)]
    problems = []
    if lambdas:
        problems.append(f"Lambda layer(s) {', '.join(repr(n) for n in lambdas)} (their Python code would run on "
                        "load)")
    if unknown:
        problems.append(f"custom layer(s) {', '.join(unknown)} that are not registered (keras.saving."
                        "register_keras_serializable)")
    if problems:
        raise ModelLoadError(
            f"{path} holds {' and '.join(problems)}; a model file is not trusted to run code. Rebuild those layers "
            "from built-in Keras layers, or, if you trust the file, pass --trust_model (API: trust_model=True)."
        )


def _layer_records(path: str) -> Iterator[tuple[str, str]]:
    """(class name, layer name) of every layer the file's saved configuration describes, nested ones too."""
    config = _saved_config(path)
    if config is None:
        return
    if isinstance(config, list):  # a SavedModel's metadata: one record per layer
        for record in config:
            yield str(record.get("class_name")), str(record.get("name") or record.get("config", {}).get("name"))
        return
    yield from _walk(config)


def _walk(value) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        if isinstance(value.get("class_name"), str) and isinstance(value.get("config"), dict):
            config = value["config"]
            if "name" in config and ("layers" in config or "trainable" in config or "dtype" in config
                                     or value["class_name"] == "Lambda"):
                yield value["class_name"], str(config["name"])
        for child in value.values():
            yield from _walk(child)
    elif isinstance(value, list):
        for child in value:
            yield from _walk(child)


def _saved_config(path: str):
    try:
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "keras_metadata.pb")):
                return None  # a graph: restoring it runs no Python
            return keras_saved_metadata(path)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("config.json"))
        import h5py

        with h5py.File(path, "r") as f:
            config = f.attrs.get("model_config")
            if config is None:
                raise ModelLoadError(
                    f"{path} holds no model (no model_config in the file: it is empty, or holds weights only from "
                    "save_weights). Save the whole model with model.save(...)."
                )
            return json.loads(config.decode() if isinstance(config, bytes) else config)
    except (OSError, KeyError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"Cannot read the saved configuration of {path} ({reason}): the file is corrupt or not a Keras model. "
            "Save the model again."
        ) from None


def _known(class_name: str) -> bool:
    """Built into tf_keras or Keras 3, one of tfmot's QAT classes, or registered as a custom object."""
    if class_name in _MODEL_CLASSES or isinstance(getattr(keras.layers, class_name, None), type):
        return True
    k3 = keras3()
    if isinstance(getattr(k3.layers, class_name, None), type):
        return True
    import tensorflow_model_optimization as tfmot  # QAT models: tfmot's wrappers and quantizers

    with tfmot.quantization.keras.quantize_scope():
        if keras.saving.get_registered_object(class_name) is not None:
            return True
    return k3.saving.get_registered_object(class_name) is not None
