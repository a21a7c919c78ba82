"""The optimize pipeline's channel pruning stage: a float Keras model in, a smaller one (whole filters removed) out.

Takes the model, the `OptimizeConfig` and the training and validation splits. With a fixed `prune_channels`
ratio every prunable channel group loses that fraction; with `"auto"` a sensitivity analysis on the validation
split (`tfcompress.analysis.sensitivity`) gives per-group curves and `solve_ratios` picks the ratios that meet
`target_macs` / `target_params`, or, for `target_latency`, the MAC budget is searched until the int8 model's
measured single-thread LiteRT latency meets it. Both ends are also converted to int8 on a few training samples
to measure what the report shows: bytes, latency and (with `--target=micro`) the TFLM arena, before and after.
Returns the pruned (not yet fine-tuned) model and the stage's numbers for report.json.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

from tfcompress.analysis.latency import measure_latency
from tfcompress.analysis.sensitivity import sensitivity, solve_ratios
from tfcompress.conversion.convert import ConvertConfig, convert
from tfcompress.core.model_io import load_model
from tfcompress.training.channel_graph import channel_plan
from tfcompress.training.channel_prune import kept_count, prune_channels

SENSITIVITY_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
NUM_BN_SAMPLES = 512  # inputs on which the pruned model's BatchNorm statistics are measured afresh
NUM_PROBE_CALIBRATION = 100  # calibration samples of the int8 probes (bytes, latency, arena): not what ships
LATENCY_ATTEMPTS = 5


def check(model, config) -> None:
    """Refuses, before anything is written, a model with nothing to prune and a MAC/parameter budget that no
    choice of ratios reaches."""
    plan = channel_plan(model)
    if not plan.prunable:
        reasons = "; ".join(f"{g.name}: {g.reason}" for g in plan.groups) or "it has no Conv or Dense layer"
        raise ValueError(f"--prune_channels finds no layer of {model.name!r} whose channels can be removed "
                         f"({reasons}). Leave --prune_channels out. Received: prune_channels={config.prune_channels!r}")
    if config.prune_channels != "auto" or config.target_latency is not None:
        return
    base_macs, base_params = plan.cost({})
    macs, params = _smallest_kept(plan, config)
    for name, target, reached in (("target_macs", config.target_macs, macs / base_macs),
                                  ("target_params", config.target_params, params / base_params)):
        if target is not None and reached > target + 1e-9:
            raise ValueError(
                f"{name}={target} cannot be reached by removing channels: with every prunable layer at ratio "
                f"{SENSITIVITY_RATIOS[-1]} the model keeps {reached:.3f} (the rest is in layers whose channels stay, "
                f"such as the output layer). Ask for at least {reached:.3f}. Received: {name}={target}")


def _smallest_kept(plan, config) -> tuple[int, int]:
    """(MACs, parameters) with every prunable group at the largest sensitivity ratio."""
    return plan.cost({g.name: kept_count(g.channels, SENSITIVITY_RATIOS[-1], config.channel_multiple)
                      for g in plan.prunable})


def prune_channels_stage(model, config, x_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray):
    """(channel-pruned model, details for report.json); the fine-tune is the caller's."""
    data = x_train[:NUM_BN_SAMPLES]
    details: dict = {"criterion": config.channel_criterion, "channel_multiple": config.channel_multiple}
    if config.prune_channels != "auto":
        result = prune_channels(model, float(config.prune_channels), criterion=config.channel_criterion, data=data,
                                channel_multiple=config.channel_multiple)
        details["mode"] = f"uniform ratio {config.prune_channels}"
    else:
        start = time.perf_counter()
        curves = sensitivity(model, x_val, y_val, ratios=SENSITIVITY_RATIOS, kinds=("channel",),
                             criterion=config.channel_criterion, channel_multiple=config.channel_multiple)
        details["sensitivity"] = curves.to_json() | {"seconds": round(time.perf_counter() - start, 3)}
        plan = channel_plan(model)
        if config.target_latency is None:
            solution = solve_ratios(curves, plan, target_macs=config.target_macs, target_params=config.target_params,
                                    channel_multiple=config.channel_multiple)
            result = prune_channels(model, ratios=solution.ratios, criterion=config.channel_criterion, data=data,
                                    channel_multiple=config.channel_multiple)
            details["solution"] = solution.to_json()
            details["mode"] = "sensitivity-guided, " + ", ".join(
                f"{name}={getattr(config, name)}" for name in ("target_macs", "target_params")
                if getattr(config, name) is not None)
        else:
            result, search = _latency_search(model, config, curves, plan, data, x_train)
            details["latency_search"] = search
            details["mode"] = f"sensitivity-guided, target_latency={config.target_latency}"
    details["channel_pruning"] = result.to_json()
    details["channel_table"] = result.markdown()
    details["int8_probe"] = {"before": _probe(model, config, x_train), "after": _probe(result.model, config, x_train)}
    return result.model, details


def _latency_search(model, config, curves, plan, data, x_train):
    """Shrinks the MAC budget until the int8 model's measured latency is within `target_latency` of the
    unpruned one's; each attempt is recorded."""
    runs = max(config.latency_runs, 50)
    base = _probe(model, config, x_train, runs=runs, arena=False)["latency_median_ms"]
    goal = config.target_latency * base
    smallest = _smallest_kept(plan, config)[0] / plan.cost({})[0]
    budget = max(config.target_latency, smallest)
    attempts = []
    for _ in range(LATENCY_ATTEMPTS):
        solution = solve_ratios(curves, plan, target_macs=budget, channel_multiple=config.channel_multiple)
        result = prune_channels(model, ratios=solution.ratios, criterion=config.channel_criterion, data=data,
                                channel_multiple=config.channel_multiple)
        measured = _probe(result.model, config, x_train, runs=runs, arena=False)["latency_median_ms"]
        attempts.append({"target_macs": round(budget, 4), "macs_fraction": solution.macs_fraction,
                         "latency_median_ms": measured, "latency_fraction": measured / base,
                         "ratios": solution.ratios})
        if measured <= goal:
            return result, {"unpruned_latency_median_ms": base, "goal_ms": goal, "attempts": attempts}
        if budget <= smallest + 1e-6:
            break
        budget = max(smallest, budget * goal / measured * 0.98)
    best = min(attempts, key=lambda a: a["latency_fraction"])
    raise ValueError(
        f"target_latency={config.target_latency} was not reached by removing channels: the fastest of "
        f"{len(attempts)} attempts kept {best['latency_fraction']:.3f} of the int8 latency "
        f"({best['latency_median_ms']:.3f} ms against {base:.3f} ms, MACs {best['macs_fraction']:.3f}). Ask for at "
        f"least {best['latency_fraction']:.2f}. Received: target_latency={config.target_latency}")


def _probe(model, config, x_train: np.ndarray, runs: int | None = None, arena: bool | None = None) -> dict:
    """An int8 (uint8 I/O) conversion on a few training samples: bytes, latency and arena. Not what ships."""
    runs = config.latency_runs if runs is None else runs
    arena = config.target == "micro" if arena is None else arena
    flatbuffer = convert(load_model(model), ConvertConfig("int8"), x_train[:NUM_PROBE_CALIBRATION])
    numbers = {"bytes": len(flatbuffer), "latency_median_ms": None, "arena_bytes": None}
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "probe.tflite")
        with open(path, "wb") as f:
            f.write(flatbuffer)
        if runs > 0:
            numbers["latency_median_ms"] = measure_latency(path, num_runs=runs, num_threads=1).median_ms
    if arena:
        from tfcompress.targets.micro import measure_arena  # only with --target=micro

        shape = (1, *x_train.shape[1:])
        numbers["arena_bytes"] = measure_arena(flatbuffer, np.zeros(shape, dtype=np.uint8)).arena_bytes
    return numbers
