"""Optional Ethos-U stage: compiles an int8 `.tflite` with Arm Vela and reads what it estimates.

Takes the flatbuffer that `export` ships; returns a `VelaResult` (NPU and CPU op counts, SRAM and flash
bytes, estimated inference time) and writes `<name>_vela.tflite`. Vela (`pip install .[npu]`,
`ethos-u-vela`) is never a hard dependency. It exits 0 even when every op falls back to the CPU, so the
result is judged by the NPU operator count, and it writes its timing estimate only to
`*_summary_*.csv`, which is read here.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from tfcompress.core.artefacts import write_atomic
from tfcompress.core.errors import InputError, VerificationError

ACCELERATOR = "ethos-u55-128"
_OPS = re.compile(r"^(CPU|NPU) operators = (\d+)", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class VelaResult:
    accelerator: str
    system_config: str
    npu_ops: int
    cpu_ops: int
    sram_bytes: int
    flash_bytes: int
    inference_seconds: float
    npu_cycles: int
    macs: int
    vela_version: str
    output: str


def vela_executable() -> str:
    """The `vela` next to this Python (the project's venv), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "vela")
    found = beside if os.access(beside, os.X_OK) else shutil.which("vela")
    if not found:
        raise InputError("--vela needs Arm Vela, which is not installed. Install the optional extra with "
                         "`pip install .[npu]` (ethos-u-vela), or drop --vela.")
    return found


def compile_for_ethos_u(flatbuffer: bytes, output_dir: str, name: str,
                        accelerator: str = ACCELERATOR) -> VelaResult:
    """Runs Vela on `flatbuffer`; writes `<output_dir>/<name>_vela.tflite`.

    Raises:
        InputError: Vela is not installed, or rejected the model.
        VerificationError: Vela placed no operator on the NPU.
    """
    vela = vela_executable()
    with tempfile.TemporaryDirectory(prefix="tfcompress-vela-") as work:
        model_path = os.path.join(work, f"{name}.tflite")
        with open(model_path, "wb") as f:
            f.write(flatbuffer)
        run = subprocess.run([vela, model_path, "--accelerator-config", accelerator, "--output-dir", work],
                             capture_output=True, text=True, cwd=work)
        if run.returncode != 0:
            last = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
            raise InputError(f"Vela failed on {name}.tflite (exit {run.returncode}): {last[0]}. "
                             "Run vela by hand on the .tflite to see its full log.")
        ops = {kind: int(n) for kind, n in _OPS.findall(run.stdout)}
        (summary,) = glob.glob(os.path.join(work, f"{name}_summary_*.csv"))
        with open(summary, newline="") as f:
            row = next(csv.DictReader(f))
        with open(os.path.join(work, f"{name}_vela.tflite"), "rb") as f:
            compiled = f.read()
    output = os.path.join(output_dir, f"{name}_vela.tflite")
    result = VelaResult(
        accelerator=accelerator,
        system_config=row["system_config"],
        npu_ops=ops.get("NPU", 0),
        cpu_ops=ops.get("CPU", 0),
        sram_bytes=int(round(float(row["sram_memory_used"]) * 1024)),
        flash_bytes=int(round(float(row["off_chip_flash_memory_used"]) * 1024)),
        inference_seconds=float(row["inference_time"]),
        npu_cycles=int(float(row["cycles_total"])),
        macs=int(float(row["nn_macs"])),
        vela_version=_version(vela),
        output=output,
    )
    if result.npu_ops == 0:
        raise VerificationError([f"vela_npu_ops: Vela placed no operator on the NPU ({result.cpu_ops} on "
                                 "the CPU); the model gains nothing from Ethos-U"])
    write_atomic(output, compiled)
    return result


def _version(vela: str) -> str:
    run = subprocess.run([vela, "--version"], capture_output=True, text=True)
    return run.stdout.strip()
