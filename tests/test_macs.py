"""MACs per layer of converted models, against counts worked out by hand from the layer definitions."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CALIBRATION, SCALE
from tfcompress.models import baseline
from tfcompress.core._keras import keras
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.core.errors import ModelLoadError
from tfcompress.analysis.macs import count_macs
from tfcompress.core.model_io import load_model


@pytest.fixture(scope="module")
def lenet_int8() -> bytes:
    """LeNet-5 (random weights: the counts do not depend on them), full int8, 50 calibration samples."""
    keras.utils.set_random_seed(0)
    with np.load(CALIBRATION) as d:
        samples = d["x"][:50].astype(np.float32) * SCALE
    return convert(load_model(baseline.lenet5()), ConvertConfig(), samples)


def test_lenet5_macs_match_the_hand_count(lenet_int8, tmp_path):
    conv1 = 24 * 24 * 20 * 5 * 5 * 1  # 28-5+1 = 24 outputs per side, 20 filters of 5x5x1
    conv2 = 8 * 8 * 50 * 5 * 5 * 20  # pooled to 12x12x20, 12-5+1 = 8, 50 filters of 5x5x20
    fc1 = 800 * 500  # pooled to 4x4x50 = 800 inputs
    fc2 = 500 * 10
    assert (conv1, conv2, fc1, fc2) == (288_000, 1_600_000, 400_000, 5_000)
    pool1, pool2 = 12 * 12 * 20 * 2 * 2, 4 * 4 * 50 * 2 * 2

    path = tmp_path / "lenet.tflite"
    path.write_bytes(lenet_int8)
    for model in (lenet_int8, path, str(path)):
        counted = count_macs(model)
        by_op = [(layer.op, layer.macs, layer.other_ops) for layer in counted.layers
                 if layer.macs or layer.other_ops]
        assert by_op == [("CONV_2D", conv1, 0), ("MAX_POOL_2D", 0, pool1), ("CONV_2D", conv2, 0),
                         ("MAX_POOL_2D", 0, pool2), ("FULLY_CONNECTED", fc1, 0), ("FULLY_CONNECTED", fc2, 0)]
        assert counted.total_macs == conv1 + conv2 + fc1 + fc2 == 2_293_000
        assert counted.total_other_ops == pool1 + pool2 == 14_720
    assert [layer.op_index for layer in counted.layers] == list(range(len(counted.layers)))
    uncounted = {layer.op for layer in counted.layers if not (layer.macs or layer.other_ops)}
    assert uncounted == {"QUANTIZE", "RESHAPE"}


def test_every_counted_op_kind_matches_the_hand_count():
    """Depthwise, transposed convolution, average pooling, ADD and MUL, in a float32 model."""
    keras.utils.set_random_seed(0)
    image = keras.layers.Input((8, 8, 3), name="image")
    dw = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(image)  # 8x8x3, 3x3 per channel
    up = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="up")(dw)  # 16x16x4
    pooled = keras.layers.AveragePooling2D(2, name="avg")(up)  # 8x8x4, 2x2 window
    conv = keras.layers.Conv2D(4, 1, name="pointwise")(dw)  # 8x8x4 from 3 channels, 1x1
    added = keras.layers.Add(name="add")([pooled, conv])
    scaled = keras.layers.Multiply(name="mul")([added, conv])
    model = keras.Model(image, scaled, name="zoo")
    counted = count_macs(convert(load_model(model), ConvertConfig(mode="float32")))
    by_op: dict[str, tuple[int, int]] = {}
    for layer in counted.layers:
        macs, other = by_op.get(layer.op, (0, 0))
        by_op[layer.op] = (macs + layer.macs, other + layer.other_ops)
    assert by_op["DEPTHWISE_CONV_2D"] == (8 * 8 * 3 * 3 * 3, 0)
    assert by_op["TRANSPOSE_CONV"] == (8 * 8 * 3 * 3 * 3 * 4, 0)  # every input value times k_h*k_w*out_c
    assert by_op["AVERAGE_POOL_2D"] == (0, 8 * 8 * 4 * 2 * 2)
    assert by_op["CONV_2D"] == (8 * 8 * 4 * 1 * 1 * 3, 0)
    assert by_op["ADD"] == (0, 8 * 8 * 4) and by_op["MUL"] == (0, 8 * 8 * 4)
    assert counted.total_macs == 1_728 + 6_912 + 768


def test_bad_input_is_a_one_line_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match=r"TFLite model not found: .*nowhere\.tflite\. Pass the path"):
        count_macs(tmp_path / "nowhere.tflite")
    text = tmp_path / "notes.tflite"
    text.write_text("not a model")
    with pytest.raises(ModelLoadError, match=r"is not a TFLite flatbuffer \(no 'TFL3' identifier\)"):
        count_macs(text)
