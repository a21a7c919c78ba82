"""Where each run setting lives in a recipe, and the effective recipe a run writes beside its results.

A recipe (`tfcompress run recipe.yaml`) groups a command's settings into sections; inside a section every key
is the command-line flag of the same name, so a recipe reads like the flags it replaces. This module holds the
grouping (the one table `tfcompress.runs.recipe` validates against) and `effective_recipe`, the complete recipe
of a run's config, which every convert, optimize and auto run writes to `recipe.yaml` in its output directory.
It imports no run module, so those runs can import it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import numpy as np

from tfcompress.core.artefacts import write_atomic
from tfcompress.core.errors import BudgetNotMetError, VerificationError
from tfcompress.core.version import __version__

RECIPE_FILENAME = "recipe.yaml"
FORMAT_VERSION = 1
COMMANDS = ("convert", "optimize", "auto")

# Section -> the flags it holds (for every command that has them). Settings a recipe cannot hold are in
# RUN_ONLY: where this run's files go is the recipe's own `output_dir`; the rest are choices of one run.
SECTIONS: dict[str, tuple[str, ...]] = {
    "model": ("saved_model_dir", "keras_model"),
    "data": ("train_data", "train_key", "train_labels_key", "validation_fraction", "num_validation_samples",
             "calibration_data", "calibration_key", "num_calibration_samples", "held_out_samples",
             "eval_data", "eval_key", "eval_labels_key", "eval_output", "num_eval_samples",
             "input_scale", "input_offset", "data_spec"),
    "training": ("epochs", "batch_size", "learning_rate", "loss", "distill_from", "distill_temperature",
                 "distill_alpha", "strategy", "cluster_resolver"),
    "convert": ("mode", "io_dtype", "target", "latency_runs", "debug_layers", "tflm_samples"),
    "gates": ("max_accuracy_drop", "min_top1_agreement", "min_output_sqnr_db"),
    "budgets": ("max_flash_bytes", "max_arena_bytes", "max_latency_ms", "max_minutes"),
}
TOP_LEVEL = ("output_dir", "seed")
# optimize's training stages, in the order the pipeline runs them: stage -> (its flags, the flag that switches
# it on and must be given in the recipe, or None when listing the stage switches it on).
STAGES: dict[str, tuple[tuple[str, ...], str | None]] = {
    "channels": (("prune_channels", "target_macs", "target_params", "target_latency", "channel_criterion",
                  "channel_multiple"), "prune_channels"),
    "factorize": (("factorize_energy", "factorize_layers", "factorize_epochs"), "factorize_energy"),
    "prune": (("final_sparsity", "prune_scope", "prune_structure", "prune_exclude", "prune_epochs"), None),
    "cluster": (("cluster", "cluster_epochs"), "cluster"),
    "qat": (("qat_epochs", "force_qat", "qat_distill", "qat_freeze_bn", "leave_float", "qat_weights", "keep_int8",
             "pow2_exponents"), None),
}
# Stages switched on by a boolean flag rather than by a setting of their own.
STAGE_SWITCHES = {"prune": "prune", "qat": "qat"}
# Flags that are a run's choice, not part of what it computes: `tfcompress run` takes them as its own flags.
# trust_model is never read from a recipe: a shared file must not be able to switch off the model-loading checks.
RUN_ONLY = ("overwrite", "trust_model")
# Settings that name files: relative paths in a recipe are relative to the recipe's own folder.
PATHS = ("output_dir", "saved_model_dir", "keras_model", "train_data", "eval_data", "calibration_data",
         "distill_from")


def section_of(flag: str) -> str | None:
    """The section (or "stages.<stage>", or "" for top level) that holds `flag`; None for run-only flags."""
    if flag in TOP_LEVEL:
        return ""
    for section, names in SECTIONS.items():
        if flag in names:
            return section
    for stage, (names, _) in STAGES.items():
        if flag in names or STAGE_SWITCHES.get(stage) == flag:
            return f"stages.{stage}"
    return None


def effective_recipe(command: str, config) -> dict:
    """The complete recipe of a run: every setting of `config` (defaults included, paths absolute), grouped.

    `tfcompress run` on it repeats the run: same settings, same `.tflite` bytes.
    """
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    recipe: dict = {"tfcompress_recipe": FORMAT_VERSION, "command": command}
    for name in TOP_LEVEL:
        if name in values:
            recipe[name] = _plain(name, values[name])
    for section, names in SECTIONS.items():
        entries = {name: _plain(name, values[name]) for name in names if name in values}
        if section == "model":
            entries = {name: value for name, value in entries.items() if value is not None}
        if entries:
            recipe[section] = entries
        if section == "data" and command == "optimize":
            recipe["stages"] = [
                {stage: {name: _plain(name, values[name]) for name in names}}
                for stage, (names, switch) in STAGES.items()
                if (values[STAGE_SWITCHES[stage]] if stage in STAGE_SWITCHES else values[switch] is not None)]
    return recipe


def write_effective_recipe(command: str, config, output_dir: str) -> str:
    """Writes `effective_recipe` as `recipe.yaml` in `output_dir` (atomically); returns its path.

    A data field given as a `tf.data.Dataset` (the API only) is recorded as `DATASET`, and the header says which:
    a dataset has no path to replay, so the recipe needs one put there before `tfcompress run` repeats the run.
    """
    import yaml

    path = os.path.join(output_dir, RECIPE_FILENAME)
    given = [f"data.{name}" for name in dataset_fields(config)]
    header = (f"# The effective recipe of this run (tfcompress {__version__}): `tfcompress run {RECIPE_FILENAME}` "
              "repeats it.\n")
    if given:
        header += (f"# {', '.join(given)} was a tf.data.Dataset given in the API, recorded as {DATASET}: put the "
                   "path of the same data there (an .npz, image tree or TFRecords) to repeat the run.\n")
    text = header + yaml.safe_dump(effective_recipe(command, config), sort_keys=False)
    write_atomic(path, text.encode())
    return path


@contextlib.contextmanager
def recorded(command: str, config, output_dir: str):
    """Writes the effective recipe when the run inside ends with a result: success, or a failed gate (its report
    is a result to reproduce too); bad input leaves no recipe behind."""
    try:
        yield
    except (VerificationError, BudgetNotMetError):
        write_effective_recipe(command, config, output_dir)
        raise
    write_effective_recipe(command, config, output_dir)


# What a recipe, a report or a fingerprint records for data given as a `tf.data.Dataset` (it has no path).
DATASET = "<tf.data.Dataset>"
DATA_FIELDS = ("train_data", "calibration_data", "eval_data")


def _is_dataset(value) -> bool:
    return hasattr(value, "element_spec")  # a tf.data.Dataset, told apart without importing TensorFlow


def dataset_fields(config) -> list[str]:
    """The data fields of `config` given as a `tf.data.Dataset`."""
    return [name for name in DATA_FIELDS if _is_dataset(getattr(config, name, None))]


def plain_config(config) -> dict:
    """`dataclasses.asdict(config)` for a report or fingerprint, a `tf.data.Dataset` recorded as `DATASET`."""
    return dataclasses.asdict(dataclasses.replace(config, **{name: DATASET for name in dataset_fields(config)}))


def _plain(name: str, value):
    """A config value as YAML/JSON holds it: tuples as lists, numpy scalars as Python, paths absolute."""
    if _is_dataset(value):
        return DATASET
    if isinstance(value, tuple):
        return [_plain(name, v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if name in PATHS and isinstance(value, str) and value:
        return os.path.abspath(value)
    return value
