"""Runs bad-input cases of one `tfcompress` verb in one process (absl flags are per process), as the console
script would, and prints one JSON line per case: exit code, stderr, and whether the output directory appeared.

Usage: python tests/bad_input_driver.py <verb> <cases.json>   (cases: a list of argument lists)
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags
from absl.testing import flagsaver

from pipelines import __main__ as verbs
from pipelines import _common


def main() -> None:
    verb, cases_path = sys.argv[1], sys.argv[2]
    module = importlib.import_module(f"pipelines.{verbs._MODULES.get(verb, verb)}")
    with open(cases_path) as f:
        cases = json.load(f)
    for argv in cases:
        stderr = io.StringIO()
        code = 0
        with flagsaver.flagsaver():
            for name in flags.FLAGS:
                flags.FLAGS[name].unparse()
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                try:
                    _common.run(module.main, argv=[f"tfcompress {verb}", *argv])
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
                except BaseException as e:  # an escape the guard missed: recorded, and the test fails
                    code = -1
                    stderr.write(f"Traceback (escaped): {type(e).__name__}: {e}\n")
        print(json.dumps({"argv": argv, "code": code, "stderr": stderr.getvalue()}), flush=True)


if __name__ == "__main__":
    main()
