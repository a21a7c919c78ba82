"""Recipes: the published schema is the one the code checks, every setting has a place, the effective recipe
rebuilds its config, and every example recipe reproduces the equivalent flags' `.tflite` byte for byte."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jsonschema
import pytest
import yaml
from conftest import CALIBRATION, ROOT

from tfcompress.runs import recipe as recipes
from tfcompress.runs import recipe_format
from tfcompress.runs.auto_config import AutoConfig
from tfcompress.runs.optimize_config import OptimizeConfig
from tfcompress.runs.pipeline import ConvertPipelineConfig

RECIPES = ROOT / "recipes"
EXAMPLES = sorted(p.name for p in RECIPES.iterdir() if p.suffix in (".yaml", ".yml", ".json")
                  and p.name != "recipe.schema.json")
SCALE = "0.00392156862745098"
CAL = [f"--calibration_data={CALIBRATION}", "--calibration_key=x"]
# Each example recipe, as the flags of its command (the model and data paths the test gives both).
EQUIVALENT_FLAGS = {
    "lenet_ptq_micro.yaml": ("convert", [*CAL, "--num_calibration_samples=200", f"--input_scale={SCALE}",
                                         "--mode=int8", "--target=micro", "--max_accuracy_drop=0.005", "--seed=0"]),
    "lenet_prune_qat.yaml": ("optimize", [*CAL, f"--input_scale={SCALE}", "--prune", "--final_sparsity=0.8",
                                          "--prune_scope=global", "--prune_epochs=1", "--qat", "--qat_epochs=1",
                                          "--batch_size=128", "--learning_rate=0.0005", "--max_accuracy_drop=0.01",
                                          "--seed=0"]),
    "lenet_channels_cluster.json": ("optimize", [*CAL, f"--input_scale={SCALE}", "--prune_channels=0.25",
                                                 "--channel_criterion=l1", "--channel_multiple=8", "--cluster=16",
                                                 "--cluster_epochs=1", "--target=micro", "--max_accuracy_drop=0.01",
                                                 "--seed=0"]),
    "lenet_auto_flash.yaml": ("auto", [f"--input_scale={SCALE}", "--epochs=2", "--max_accuracy_drop=0.003",
                                       "--max_flash_bytes=65536", "--max_minutes=30", "--target=micro", "--seed=0"]),
}
# What the test changes in both runs, beyond the model and data paths: the session CNN's int8 model fits the
# example's 64 KiB already; a looser gate keeps the search to its first attempt on 220 validation images.
OVERRIDES = {"lenet_auto_flash.yaml": {"max_accuracy_drop": 0.02}}


def test_the_published_schema_is_the_one_the_code_checks():
    assert json.loads((RECIPES / "recipe.schema.json").read_text()) == recipes.schema()


def test_every_example_has_its_equivalent_flags_here():
    assert set(EXAMPLES) == set(EQUIVALENT_FLAGS)


@pytest.mark.parametrize("command", recipe_format.COMMANDS)
def test_every_setting_of_every_command_has_one_place_in_a_recipe(command):
    for field in dataclasses.fields(recipes.CONFIGS[command]):
        if field.name in recipe_format.RUN_ONLY:
            continue
        assert recipe_format.section_of(field.name) is not None, field.name


@pytest.mark.parametrize("example", EXAMPLES)
def test_examples_are_valid_against_the_published_schema(example):
    published = json.loads((RECIPES / "recipe.schema.json").read_text())
    document = yaml.safe_load((RECIPES / example).read_text())  # YAML reads JSON too
    jsonschema.Draft202012Validator(published).validate(document)
    broken = json.loads(json.dumps(document))
    broken.setdefault("gates", {})["max_acuracy_drop"] = 0.01
    with pytest.raises(jsonschema.ValidationError, match="max_acuracy_drop"):
        jsonschema.Draft202012Validator(published).validate(broken)


@pytest.mark.parametrize("config", [
    ConvertPipelineConfig(output_dir="out", keras_model="m.keras", calibration_data="cal.npz",
                          calibration_key="x", eval_data="eval.npz", num_eval_samples=300, input_scale=1 / 255,
                          mode="int16x8", io_dtype="int16", num_calibration_samples=100, max_accuracy_drop=0.02,
                          seed=3, latency_runs=0, debug_layers=False, min_output_sqnr_db=20),
    OptimizeConfig(output_dir="out", train_data="train.npz", saved_model_dir="sm", validation_fraction=0.2,
                   input_scale=1 / 255, prune=True, final_sparsity=0.7, prune_scope="global", prune_exclude=("conv",),
                   prune_epochs=3, cluster=8, qat=True, learning_rate=1e-3, target="micro", max_accuracy_drop=0.02,
                   seed=3),
    OptimizeConfig(output_dir="out", train_data="train.npz", saved_model_dir="sm", prune_channels="auto",
                   target_macs=0.5, channel_criterion="l2", channel_multiple=4, qat=True, qat_distill=True,
                   qat_weights="int4", keep_int8=("conv", "logits")),
    AutoConfig(output_dir="out", train_data="train.npz", keras_model="m.keras", max_accuracy_drop=0.003,
               max_flash_bytes=65536, max_arena_bytes=20000, target="micro", max_minutes=30.0, epochs=3),
], ids=["convert", "optimize", "optimize-channels", "auto"])
def test_the_effective_recipe_rebuilds_the_same_config(config, tmp_path, monkeypatch):
    for name in ("m.keras", "cal.npz", "eval.npz", "train.npz"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sm").mkdir()
    monkeypatch.chdir(tmp_path)
    command = {ConvertPipelineConfig: "convert", OptimizeConfig: "optimize", AutoConfig: "auto"}[type(config)]
    path = recipe_format.write_effective_recipe(command, config, str(tmp_path))
    rebuilt = recipes.load_recipe(path).config()
    absolute = {name: str(tmp_path / getattr(config, name)) for name in recipe_format.PATHS
                if getattr(config, name, None)}
    assert rebuilt == dataclasses.replace(config, **absolute)


def test_a_setting_given_on_the_command_line_replaces_the_recipes(saved_model_dir):
    recipe = recipes.load_recipe(RECIPES / "lenet_prune_qat.yaml", overrides={
        "saved_model_dir": saved_model_dir, "final_sparsity": 0.9, "qat_epochs": 2, "prune_exclude": ["conv"]})
    config = recipe.config()
    assert (config.saved_model_dir, config.keras_model) == (saved_model_dir, None)
    assert (config.final_sparsity, config.qat_epochs, config.prune_exclude) == (0.9, 2, ("conv",))
    assert config.prune_epochs == 1 and config.prune and config.qat
    with pytest.raises(recipes.RecipeError, match="lists no cluster stage"):
        recipes.load_recipe(RECIPES / "lenet_prune_qat.yaml", overrides={"cluster": 16})


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_an_example_recipe_and_its_flags_give_the_same_tflite_bytes(example, saved_model_dir, train_npz, eval_npz,
                                                                    tmp_path):
    command, flags = EQUIVALENT_FLAGS[example]
    data = {"saved_model_dir": saved_model_dir, "eval_data": eval_npz, **OVERRIDES.get(example, {})}
    if command != "convert":
        data["train_data"] = train_npz
    by_recipe, by_flags = tmp_path / "recipe", tmp_path / "flags"
    runs = [
        [sys.executable, "-m", "pipelines", "run", str(RECIPES / example), f"--output_dir={by_recipe}",
         *(f"--set={name}={value}" for name, value in data.items()), "--noprogress"],
        [sys.executable, "-m", "pipelines", command, *flags, *(f"--{name}={value}" for name, value in data.items()),
         f"--output_dir={by_flags}", "--noprogress"],
    ]
    processes = [subprocess.Popen(argv, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for argv in runs]
    for process in processes:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    tflite = (by_recipe / "model.tflite").read_bytes()
    assert tflite == (by_flags / "model.tflite").read_bytes()
    written = [yaml.safe_load((d / recipe_format.RECIPE_FILENAME).read_text()) for d in (by_recipe, by_flags)]
    assert written[0].pop("output_dir") == str(by_recipe) and written[1].pop("output_dir") == str(by_flags)
    assert written[0] == written[1]
    if command == "convert":  # the effective recipe alone repeats the run
        again = tmp_path / "again"
        done = subprocess.run([sys.executable, "-m", "pipelines", "run", str(by_recipe / "recipe.yaml"),
                               f"--output_dir={again}", "--noprogress"], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (again / "model.tflite").read_bytes() == tflite
