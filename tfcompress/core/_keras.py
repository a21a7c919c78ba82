"""The one place that imports TensorFlow and Keras.

tfmot wraps only Keras 2 (`tf_keras`) layers, so `TF_USE_LEGACY_KERAS=1` must be set before TensorFlow
is first imported; otherwise `tf.keras` would be Keras 3 and every model the project builds would be one
tfmot cannot prune or quantize. Every other module takes `tf` and `keras` from here.
"""

import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if os.environ["TF_USE_LEGACY_KERAS"] != "1":
    raise ImportError(
        "tfcompress needs Keras 2 (tf_keras) for tfmot, but TF_USE_LEGACY_KERAS is set to "
        f"{os.environ['TF_USE_LEGACY_KERAS']!r}. Unset it or set it to 1 before importing tfcompress."
    )

from tfcompress.core._native import native_output_captured

# TensorFlow's import prints CUDA and oneDNN notices to the process's stderr; show them only if it fails.
_import_error = None
with native_output_captured() as _import_log:
    try:
        import tensorflow as tf
        import tf_keras as keras

        tf.config.list_physical_devices()  # initialises the devices now, while their notices are kept
    except BaseException as e:  # re-raised below, once stderr is back
        _import_error = e
if _import_error is not None:
    sys.stderr.write("".join(_import_log))
    raise _import_error

__all__ = ["tf", "keras"]
