r"""Measure how much each reference quantizer loses on a model's kernels, layer by layer.

Example:
  python pipelines/quantization_error.py --saved_model_dir=artefacts/demo/float_savedmodel \
      --output_dir=artefacts/quantization_error

Prints the SQNR (dB) per layer under linear int8 (symmetric per channel, what TFLite ships), int4, int2,
powers of two (4 exponents), ternary and binary, and a whole-model row. With --output_dir, also writes
quantization_error.json, quantization_error.md and quantization_error.png there. Exit codes: 0 success;
2 bad arguments or input (nothing is written).
"""

from __future__ import annotations

from absl import flags

from pipelines import _common
from tfcompress.analysis import quantization_error

_MODEL = flags.DEFINE_string("saved_model_dir", None, "SavedModel directory of the float model (saved by Keras).")
_KERAS_MODEL = flags.DEFINE_string("keras_model", None, "A .keras or .h5 model file, tf_keras or Keras 3 "
                                   "(instead of --saved_model_dir).")
_TRUST_MODEL = flags.DEFINE_bool("trust_model", False, "Load a model file even if it holds code (Lambda layers, "
                                  "unregistered custom layers): only for files you trust.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where quantization_error.{json,md,png} go (default: print only).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing quantization_error files.")


def main(argv: list[str]) -> None:
    del argv
    result = quantization_error.run_quantization_error(
        saved_model_dir=_MODEL.value, keras_model=_KERAS_MODEL.value, output_dir=_OUTPUT.value,
        overwrite=_OVERWRITE.value, trust_model=_TRUST_MODEL.value)
    print(quantization_error.render_markdown(result), end="")


if __name__ == "__main__":
    _common.run(main)
