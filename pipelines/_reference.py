"""The hand-written TFLite recipe the benchmarks compare tfcompress with, written as tutorials do.

Deliberately independent of the tfcompress library (only the shipped data paths are shared), so a
benchmark measures our pipeline against plain TensorFlow code rather than against itself.
"""

from __future__ import annotations

import os

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from tfcompress.models import baseline
from tfcompress.core._keras import tf
from tfcompress.runs.demo import CALIBRATION


def int8_convert(converter: tf.lite.TFLiteConverter) -> bytes:
    """Full-integer conversion with uint8 I/O, calibrated on the shipped 500 MNIST training images."""
    with np.load(CALIBRATION) as d:
        images = d["x"].astype(np.float32) / 255.0

    def representative_dataset():
        for image in images:
            yield [image[None]]

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    return converter.convert()


def mnist_test_accuracy(model: bytes, batch_size: int = 500) -> float:
    """Top-1 accuracy of a uint8-input `.tflite` on the 10,000 MNIST test images, evaluated in batches."""
    with np.load(baseline.MNIST_PATH) as d:
        x, y = d["x_test"].astype(np.float32)[..., None] / 255.0, d["y_test"]
    interpreter = Interpreter(model_content=model, num_threads=os.cpu_count())
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    scale, zero_point = inp["quantization"]
    q = np.clip(np.round(x / scale + zero_point), 0, 255).astype(np.uint8)
    interpreter.resize_tensor_input(inp["index"], [batch_size, *inp["shape"][1:]])
    interpreter.allocate_tensors()
    correct = 0
    for start in range(0, len(q), batch_size):  # 10,000 is a multiple of the batch size
        interpreter.set_tensor(inp["index"], q[start : start + batch_size])
        interpreter.invoke()
        predicted = np.argmax(interpreter.get_tensor(out["index"]), axis=1)
        correct += int(np.sum(predicted == y[start : start + batch_size]))
    return correct / len(q)
