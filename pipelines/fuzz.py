r"""Fuzz the readers: mutated .tflite files and calibration arrays end in one-line errors, never a crash.

Example:
  tfcompress fuzz --cases=10000 --seed=0
  tfcompress fuzz --tflite=artefacts/demo/int8/model.tflite --cases=2000

Mutates a small int8 model (built and converted here, or --tflite) with bit flips, truncation, zeroed
ranges and changed uoffsets, vector lengths, indices and Buffer sizes; runs each through read_tflite and
inspection, and every one they accept through LiteRT (allocate_tensors and one invoke on zeros) in a
guarded child process, so a crash is counted, not fatal. A tenth of the cases are calibration arrays
(wrong dtype or shape, NaN/Inf, huge values, empty) through the calibration loader. Prints and writes
<output_dir>/fuzz.json. Exit codes: 0 no unexpected exception and no multi-line error (crashes of the
guarded child are counted, not failures), 1 otherwise, 2 bad input.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from pipelines import _common
from tfcompress.core.artefacts import write_json

_CASES = flags.DEFINE_integer("cases", 10000, "How many mutation cases to run.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the mutations (the same seed runs the same cases).")
_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/fuzz", "Where fuzz.json goes.")
_TFLITE = flags.DEFINE_string("tflite", None, "A valid .tflite to mutate (default: a small int8 CNN built "
                              "and converted here).")


def main(argv: list[str]) -> None:
    del argv
    from tfcompress.analysis import fuzz
    from tfcompress.core.tflite_model import read_tflite

    data = read_tflite(_TFLITE.value).data if _TFLITE.value else fuzz.small_int8_model(_SEED.value)
    counts = fuzz.run_fuzz(data, _CASES.value, _SEED.value)
    os.makedirs(_OUTPUT.value, exist_ok=True)
    write_json(os.path.join(_OUTPUT.value, "fuzz.json"), counts)
    print(json.dumps(counts, indent=2))
    # A crash of the guarded LiteRT child is the guard working (counted); what must never happen is an
    # exception other than a one-line TfcompressError in this process.
    if counts["unexpected_exceptions"] or counts["tflite"]["multi_line_errors"] or \
            counts["calibration"]["multi_line_errors"]:
        sys.exit(1)


if __name__ == "__main__":
    _common.run(main)
