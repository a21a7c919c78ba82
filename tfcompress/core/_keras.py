"""The one place that imports TensorFlow and Keras.

tfmot wraps only Keras 2 (`tf_keras`) layers. `TF_USE_LEGACY_KERAS=1` is set (unless the user set it) before
TensorFlow is first imported, so that `tf.keras` inside TensorFlow and tfmot means tf_keras too; `keras` here
is always `tf_keras`, imported by name, and `keras3()` is Keras 3 (the `keras` package) for users' Keras 3
models. Every other module takes `tf`, `keras` and `keras3` from here.
"""

import os
import sys

# TensorFlow decides what `tf.keras` is at its first use, from this variable. Unset, it is set to 1 (tf.keras is
# then tf_keras in the user's process too). A user who set it otherwise (TF_USE_LEGACY_KERAS=0: keep tf.keras as
# Keras 3) keeps that: `tf.keras` is resolved below before tfmot, which sets the variable to 1 when imported,
# reads it, and `restore_user_choice` puts the user's value back. tfcompress uses `tf_keras` by name either way.
_USER_CHOICE = os.environ.get("TF_USE_LEGACY_KERAS")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ log (`E0000 ... NodeDef mentions attribute use_unbounded_threadpool ...` from tf_keras'
# tf.data ops, measured in `make demo`) reads as an error to a person and is not one: off unless the user set the
# level or a pipeline runs with --verbose.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if "--verbose" in sys.argv[1:] else "3")

from tfcompress.core._native import native_output_captured  # noqa: E402  (after the variables above)

# TensorFlow's import prints CUDA and oneDNN notices to the process's stderr; show them only if it fails.
_import_error = None
with native_output_captured() as _import_log:
    try:
        import tensorflow as tf
        import tf_keras as keras

        tf.config.list_physical_devices()  # initialises the devices now, while their notices are kept
        if _USER_CHOICE not in (None, "1", "true", "True"):
            _resolved = tf.keras.__name__  # tf.keras is Keras 3 now, as the user chose, before tfmot reads it
    except BaseException as e:  # re-raised below, once stderr is back
        _import_error = e
if _import_error is not None:
    sys.stderr.write("".join(_import_log))
    raise _import_error



def restore_user_choice() -> None:
    """Puts back the user's own TF_USE_LEGACY_KERAS (tfmot's import sets it to 1); called once imports are done."""
    if _USER_CHOICE is not None:
        os.environ["TF_USE_LEGACY_KERAS"] = _USER_CHOICE


def keras_saved_metadata(path: str) -> list[dict]:
    """The layer records a tf_keras SavedModel keeps in `keras_metadata.pb` (class name, name, config), as
    dicts, read without loading the model."""
    import json

    from tf_keras.protobuf import saved_metadata_pb2

    metadata = saved_metadata_pb2.SavedMetadata()
    with open(os.path.join(path, "keras_metadata.pb"), "rb") as f:
        metadata.ParseFromString(f.read())
    return [json.loads(node.metadata) for node in metadata.nodes if node.metadata]


def keras3():
    """Keras 3 (the `keras` package, TensorFlow backend), imported on first use.

    `tf.keras` means tf_keras once tfcompress is imported (TF_USE_LEGACY_KERAS=1), but `import keras`
    is Keras 3 whatever the variable says: that is the module a Keras 3 user's models come from.
    """
    import keras as keras_3

    return keras_3


def is_keras3(obj) -> bool:
    """Whether `obj` is a Keras 3 model or layer (never imports Keras 3: no Keras 3 module, no Keras 3 object)."""
    keras_3 = sys.modules.get("keras")
    layer = getattr(getattr(keras_3, "layers", None), "Layer", None)
    return layer is not None and isinstance(obj, layer)


__all__ = ["tf", "keras", "keras3", "is_keras3", "keras_saved_metadata"]
