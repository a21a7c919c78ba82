"""Benchmark of robustness against untrusted files: the fuzz counts in this process, and the same mutants through
the real command line.

Run with `tfcompress benchmark_robustness` (about five minutes on 2 cores). Two parts:

1. `--cases` seeded mutation cases (`tfcompress.analysis.fuzz.run_fuzz`, as `tfcompress fuzz`): mutated `.tflite`
   files through read_tflite, inspection and a guarded LiteRT child; mutated calibration arrays through the loader.
   Counted: accepted, refused (one-line errors, by class), interpreter crashes contained in the child, exceptions
   other than a one-line `TfcompressError` (must be 0).
2. `--cli_cases` of those mutants, each through `tfcompress inspect` and `tfcompress export` as separate
   processes, as a user runs them: every exit code must be 0, 1 or 2 (a signal or any other code counts as a
   crash of tfcompress), every failure one line on stderr without a traceback, and a failed export leaves no
   output directory.

Writes `benchmark_robustness.{json,md}` to --output_dir. The bad-input table (`tests/test_bad_inputs.py`) and the
kill sweeps (`tests/test_faults.py`) are counted by their tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags

from pipelines import _benchmark
from tfcompress.core.artefacts import write_atomic, write_json

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_robustness", "Where the results go.")
_CASES = flags.DEFINE_integer("cases", 10000, "In-process fuzz cases.", lower_bound=1)
_CLI_CASES = flags.DEFINE_integer("cli_cases", 24, "Mutants run through `tfcompress inspect` and `export`.",
                                  lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the mutations.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> None:
    del argv
    summary = run_benchmark(_OUTPUT.value, _CASES.value, _CLI_CASES.value, _SEED.value)
    print(summary["tables"])


def run_benchmark(output_dir: str, cases: int = 10000, cli_cases: int = 24, seed: int = 0) -> dict:
    from tfcompress.analysis import fuzz

    os.makedirs(output_dir, exist_ok=True)
    start_all = time.perf_counter()
    model = fuzz.small_int8_model(seed)
    in_process = fuzz.run_fuzz(model, cases, seed)
    cli = _cli_cases(model, cli_cases, seed)
    targets = {
        "unexpected exceptions (in process)": _benchmark.target(in_process["unexpected_exceptions"], 0, True,
                                                                "an exception other than a one-line error"),
        "multi-line errors (in process)": _benchmark.target(
            in_process["tflite"]["multi_line_errors"] + in_process["calibration"]["multi_line_errors"], 0, True,
            "an error message of more than one line"),
        "tfcompress processes crashed or exited outside 0/1/2": _benchmark.target(cli["bad_exits"], 0, True,
                                                                                  "a signal or another exit code"),
        "tracebacks or multi-line errors (command line)": _benchmark.target(cli["tracebacks"] + cli["multi_line"], 0,
                                                                            True, "a traceback reached the user"),
        "partial export folders left": _benchmark.target(cli["partial_outputs"], 0, True,
                                                         "a failed export left files"),
    }
    summary = {"in_process": in_process, "cli": cli, "targets": targets, "seed": seed}
    tables = render(summary, time.perf_counter() - start_all)
    write_json(os.path.join(output_dir, "benchmark_robustness.json"), summary)
    write_atomic(os.path.join(output_dir, "benchmark_robustness.md"), (tables + "\n").encode())
    return summary | {"tables": tables}


def _cli_cases(model: bytes, count: int, seed: int) -> dict:
    from tfcompress.analysis import fuzz

    tfcompress = os.path.join(os.path.dirname(sys.executable), "tfcompress")
    fields = fuzz.field_positions(model)
    rng = np.random.default_rng(seed + 1)
    exits: dict[str, int] = {}
    found = {"runs": 0, "bad_exits": 0, "tracebacks": 0, "multi_line": 0, "partial_outputs": 0}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tfcompress-robustness-") as folder:
        for case in range(count):
            a, b, c = (int(x) for x in rng.integers(0, 1 << 62, size=3))
            kind = fuzz.KINDS[case % len(fuzz.KINDS)]
            path = os.path.join(folder, f"case{case}.tflite")
            with open(path, "wb") as f:
                f.write(fuzz.mutate(model, fields, kind, a, b, c))
            out = os.path.join(folder, f"export{case}")
            commands = {"inspect": [tfcompress, "inspect", path],
                        "export": [tfcompress, "export", f"--tflite={path}", f"--output_dir={out}", "--noprogress"]}
            running = {verb: subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                              text=True) for verb, command in commands.items()}
            for verb, process in running.items():
                _, err = process.communicate(timeout=300)
                code = process.returncode
                found["runs"] += 1
                exits[f"{verb} {code}"] = exits.get(f"{verb} {code}", 0) + 1
                if code not in (0, 1, 2):
                    found["bad_exits"] += 1
                lines = [line for line in err.splitlines() if line.strip()]
                if "Traceback" in err:
                    found["tracebacks"] += 1
                if code != 0 and verb == "inspect" and len(lines) != 1:
                    found["multi_line"] += 1
                if code == 2 and verb == "export" and len(lines) != 1:
                    found["multi_line"] += 1
                if verb == "export" and code != 0 and os.path.exists(out) and os.listdir(out):
                    found["partial_outputs"] += 1
    return found | {"cases": count, "exits": dict(sorted(exits.items())),
                    "seconds": round(time.perf_counter() - start, 1)}


def render(summary: dict, total_seconds: float) -> str:
    p, c = summary["in_process"], summary["cli"]
    t, k = p["tflite"], p["calibration"]
    lines = [f"Robustness against untrusted files (seed {summary['seed']}).", "",
             "| part | cases | accepted | refused (one line) | contained interpreter crashes | unexpected | s |",
             "|---|---|---|---|---|---|---|",
             f"| .tflite mutants, in process | {t['cases']:,} | {t['accepted']:,} | {t['refused_total']:,} "
             f"(of them {t['litert_refused']:,} by LiteRT in the child) | {t['crashes_total']} | "
             f"{t['unexpected_total']} | {p['seconds']} |",
             f"| calibration arrays, in process | {k['cases']:,} | {k['accepted']:,} | {k['refused_total']:,} | – | "
             f"{k['unexpected_total']} | |",
             f"| command line (`inspect` + `export`) | {c['cases']} x 2 | exits: "
             f"{', '.join(f'{name}: {n}' for name, n in c['exits'].items())} | | crashed processes {c['bad_exits']} "
             f"| tracebacks {c['tracebacks']} | {c['seconds']} |"]
    return _benchmark.finish_tables(lines, summary["targets"], total_seconds)
