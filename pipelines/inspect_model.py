r"""Inspect a .tflite model: ops, tensors, quantization, I/O, MACs and weights per layer, size and sha256.

Example:
  tfcompress inspect artefacts/demo/int8/model.tflite
  python pipelines/inspect_model.py --tflite=artefacts/demo/model.tflite
  python pipelines/inspect_model.py --tflite=artefacts/demo/model.tflite --json > inspection.json

Prints a text report, or with --json the same numbers as JSON on stdout. Nothing is written.
Exit codes: 0 success, 2 bad arguments or input (a missing file or one that is not a TFLite flatbuffer).
"""

from __future__ import annotations

import json

from absl import flags

from pipelines import _common
from tfcompress.analysis import inspection

_TFLITE = flags.DEFINE_string("tflite", None, "The .tflite model to inspect (or pass the path alone).",
                              required=True)
POSITIONAL_FLAG = "tflite"
_JSON = flags.DEFINE_bool("json", False, "Print the inspection as JSON instead of text.")


def main(argv: list[str]) -> None:
    del argv
    result = inspection.inspect_tflite(_TFLITE.value)
    if _JSON.value:
        print(json.dumps(inspection.to_json(result), indent=2))
    else:
        print(inspection.render_text(result))


if __name__ == "__main__":
    _common.run(main)
