r"""Find the layers that lose the most in int8 quantization, with TensorFlow's QuantizationDebugger.

Example:
  python pipelines/debug.py --saved_model_dir=artefacts/demo/float_savedmodel \
      --calibration_data=calibration_data/mnist_calibration.npz --calibration_key=x \
      --input_scale=0.00392156862745098 --num_calibration_samples=100 --output_dir=artefacts/debug

Prints the --top worst layers (lowest SQNR first), or with --json every layer as JSON. With
--output_dir, also writes debug.json and debug.csv there. Exit codes: 0 success; 1 the model cannot be
fully quantized or debugged (the table of the quantized layers is still printed when there is one);
2 bad arguments or input (nothing is written).
"""

from __future__ import annotations

import json

from absl import flags

from pipelines import _common
from tfcompress.analysis import debug

_MODEL = flags.DEFINE_string("saved_model_dir", None, "SavedModel directory of the float model.")
_KERAS_MODEL = flags.DEFINE_string("keras_model", None, "A .keras or .h5 model file, tf_keras or Keras 3 "
                                   "(instead of --saved_model_dir).")
_TRUST_MODEL = flags.DEFINE_bool("trust_model", False, "Load a model file even if it holds code (Lambda layers, "
                                  "unregistered custom layers): only for files you trust.")
_CALIBRATION = flags.DEFINE_string("calibration_data", None, "Representative samples: .npz, .npy or a folder "
                                   "of PNG/JPEG images, drawn from the training split (see "
                                   "calibration_data/README.md). They calibrate and measure.")
_CALIBRATION_KEY = flags.DEFINE_string("calibration_key", None, "Array name inside a calibration .npz.")
_DATA_SPEC = flags.DEFINE_string("data_spec", None, "TFRecord sources: the feature holding the input, image=KEY "
                                 "(default image=image).")
_SCALE = flags.DEFINE_float("input_scale", 1.0, "Preprocessing of calibration samples: "
                            "model input = raw * input_scale + input_offset.")
_OFFSET = flags.DEFINE_float("input_offset", 0.0, "See --input_scale.")
_NUM_CALIBRATION = flags.DEFINE_integer("num_calibration_samples", 500, "Calibration samples to draw.",
                                        lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for drawing calibration samples.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where debug.json and debug.csv go (default: print only).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing debug.json and debug.csv.")
_JSON = flags.DEFINE_bool("json", False, "Print every layer as JSON instead of the table.")
_TOP = flags.DEFINE_integer("top", 10, "How many of the worst layers the table shows.", lower_bound=1)


def main(argv: list[str]) -> None:
    del argv
    config = debug.DebugConfig(
        saved_model_dir=_MODEL.value,
        keras_model=_KERAS_MODEL.value,
        trust_model=_TRUST_MODEL.value,
        calibration_data=_CALIBRATION.value,
        calibration_key=_CALIBRATION_KEY.value,
        input_scale=_SCALE.value,
        input_offset=_OFFSET.value,
        num_calibration_samples=_NUM_CALIBRATION.value,
        seed=_SEED.value,
        output_dir=_OUTPUT.value,
        overwrite=_OVERWRITE.value,
        data_spec=_DATA_SPEC.value,
    )
    result = debug.run_debug(config)
    if _JSON.value:
        print(json.dumps(debug.to_json(result), indent=2))
    else:
        print(debug.render_text(result, top=_TOP.value))
    debug.check_fully_quantized(result)


if __name__ == "__main__":
    _common.run(main)
