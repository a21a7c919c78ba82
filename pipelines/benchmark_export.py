"""Benchmark of the microcontroller export on the demo LeNet-5: flash, arena, TFLM agreement, Vela.

Run with `tfcompress benchmark_export` (after `make demo`). Models: the PTQ int8 model
(`pipeline.run_convert`) and a pruned 80% + PQAT one (`optimize.run_optimize`, 2 + 1 epochs), each
exported with `export.run_export` on all 10,000 MNIST test images (TFLM, one sample at a time, against
LiteRT) and, where Vela is installed (`pip install .[npu]`), compiled for Ethos-U55-128. Prints a table of
models and one of targets (arena within 10% above the recording allocator; top-1 agreement >= 99.9%) and
writes both with every number to --output_dir. A missed target is reported, not fatal.
"""

from __future__ import annotations

import gzip
import os
import time

from absl import flags

from pipelines import _common
from tfcompress.targets import export
from tfcompress.runs import optimize
from tfcompress.runs import pipeline
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.models.baseline import MNIST_PATH, MNIST_SCALE
from tfcompress.runs.demo import CALIBRATION

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_export", "Where the results go.")
_MODEL = flags.DEFINE_string("saved_model_dir", "artefacts/demo/float_savedmodel",
                             "The trained LeNet-5 SavedModel (the demo's).")
_NUM_EVAL = flags.DEFINE_integer("num_eval_samples", None, "Check on the first N test images only "
                                 "(default: all 10,000).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for fine-tuning and calibration sampling.")


def main(argv: list[str]) -> None:
    del argv
    summary = run_benchmark(_OUTPUT.value, _MODEL.value, _NUM_EVAL.value, _SEED.value)
    print(summary["tables"])


def run_benchmark(output_dir: str, saved_model_dir: str, num_eval_samples: int | None = None,
                  seed: int = 0) -> dict:
    os.makedirs(output_dir, exist_ok=True)
    common = dict(calibration_data=str(CALIBRATION), calibration_key="x", eval_data=str(MNIST_PATH),
                  input_scale=MNIST_SCALE, seed=seed, overwrite=True)
    start = time.perf_counter()
    ptq = pipeline.run_convert(pipeline.ConvertPipelineConfig(
        output_dir=os.path.join(output_dir, "ptq"), saved_model_dir=saved_model_dir, **common))
    models = {"LeNet-5 int8 (PTQ)": (ptq.model_path, time.perf_counter() - start)}
    start = time.perf_counter()
    pqat = optimize.run_optimize(optimize.OptimizeConfig(
        output_dir=os.path.join(output_dir, "pqat"), saved_model_dir=saved_model_dir,
        train_data=str(MNIST_PATH), prune=True, final_sparsity=0.8, qat=True, prune_epochs=2,
        qat_epochs=1, **common))
    models["LeNet-5 prune 80% + PQAT int8"] = (pqat.model_path, time.perf_counter() - start)

    rows = {}
    for i, (name, (path, make_seconds)) in enumerate(models.items()):
        start = time.perf_counter()
        result = export.run_export(export.ExportConfig(
            tflite=path, output_dir=os.path.join(output_dir, f"micro_{i}"), name="lenet5",
            eval_data=str(MNIST_PATH), input_scale=MNIST_SCALE, num_eval_samples=num_eval_samples,
            vela=_vela_available(), overwrite=True, tflm_samples=None))  # every image, not the 1,000 default
        rows[name] = _row(result.manifest, path, make_seconds, time.perf_counter() - start)
    summary = {"rows": rows, "targets": _targets(rows)}
    tables = render(summary)
    write_json(os.path.join(output_dir, "benchmark_export.json"), summary)
    write_atomic(os.path.join(output_dir, "benchmark_export.md"), (tables + "\n").encode())
    return summary | {"tables": tables}


def _vela_available() -> bool:
    from tfcompress.targets import vela

    try:
        vela.vela_executable()
    except Exception:
        return False
    return True


def _row(manifest: dict, path: str, make_seconds: float, export_seconds: float) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    check, arena, vela = manifest["tflm_check"], manifest["arena"], manifest.get("vela")
    return {
        "tflite": path,
        "flash_bytes": manifest["flash_bytes"],
        "gzip_bytes": len(gzip.compress(data, 9, mtime=0)),
        "recorded_arena_bytes": arena["recorded_bytes"],
        "arena_bytes": arena["arena_bytes"],
        "arena_over_recorded": arena["arena_bytes"] / arena["recorded_bytes"],
        "tflm_samples": check["num_samples"],
        "tflm_max_step_difference": check["max_step_difference"],
        "tflm_mean_step_difference": check["mean_step_difference"],
        "tflm_top1_agreement": check["top1_agreement"],
        "vela": vela,
        "make_seconds": round(make_seconds, 2),
        "export_seconds": round(export_seconds, 2),
    }


def _targets(rows: dict) -> dict:
    targets = {}
    for name, row in rows.items():
        targets[f"{name}: reported arena / recorded"] = {
            "measured": row["arena_over_recorded"], "target": "> 1 and <= 1.10",
            "passed": 1 < row["arena_over_recorded"] <= 1.10}
        targets[f"{name}: TFLM vs LiteRT top-1 agreement"] = {
            "measured": row["tflm_top1_agreement"], "target": ">= 0.999",
            "passed": row["tflm_top1_agreement"] >= 0.999}
    return targets


def render(summary: dict) -> str:
    lines = ["| model | flash bytes | gzip -9 bytes | arena bytes (recorded) | TFLM vs LiteRT max / mean "
             "steps | top-1 agreement (samples) | Vela NPU / CPU ops | Vela SRAM bytes | Vela est. ms | "
             "export s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in summary["rows"].items():
        v = r["vela"]
        vela = (f"{v['npu_ops']} / {v['cpu_ops']} | {v['sram_bytes']:,} | {v['inference_seconds'] * 1000:.3f}"
                if v else "not installed | – | –")
        lines.append(
            f"| {name} | {r['flash_bytes']:,} | {r['gzip_bytes']:,} | {r['arena_bytes']:,} "
            f"({r['recorded_arena_bytes']:,}) | {r['tflm_max_step_difference']} / "
            f"{r['tflm_mean_step_difference']:.4f} | {r['tflm_top1_agreement']:.4f} ({r['tflm_samples']:,}) | "
            f"{vela} | {r['export_seconds']:.1f} |")
    lines += ["", "| target | measured | target | result |", "|---|---|---|---|"]
    for name, t in summary["targets"].items():
        lines.append(f"| {name} | {t['measured']:.4f} | {t['target']} | {'PASS' if t['passed'] else 'MISS'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    _common.run(main)
