"""The one place that imports TensorFlow and Keras.

tfmot wraps only Keras 2 (`tf_keras`) layers, so `TF_USE_LEGACY_KERAS=1` must be set before TensorFlow
is first imported; otherwise `tf.keras` would be Keras 3 and every model the project builds would be one
tfmot cannot prune or quantize. Every other module takes `tf` and `keras` from here.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

if os.environ["TF_USE_LEGACY_KERAS"] != "1":  # pragma: no cover - guarded by the setdefault above
    raise ImportError(
        "tfcompress needs Keras 2 (tf_keras) for tfmot, but TF_USE_LEGACY_KERAS is set to "
        f"{os.environ['TF_USE_LEGACY_KERAS']!r}. Unset it or set it to 1 before importing tfcompress."
    )

__all__ = ["tf", "keras"]
