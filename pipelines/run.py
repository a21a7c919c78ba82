r"""Run a recipe: a convert, optimize or auto run described in a YAML or JSON file.

Example (after `make demo`):
  tfcompress run recipes/lenet_prune_qat.yaml
  tfcompress run recipes/lenet_prune_qat.yaml --output_dir=artefacts/try2 --set final_sparsity=0.9

The recipe is checked against the published JSON Schema (recipes/recipe.schema.json, or --print_schema) before
anything runs; an error names the key path, what was expected and what was found. Inside a section every key is
the flag of the same name of the recipe's command, so a recipe and those flags give the same .tflite bytes.
Relative paths in a recipe are read from the recipe's folder. Every run writes its effective recipe (every
setting, defaults included) to recipe.yaml in its output directory: `tfcompress run <output_dir>/recipe.yaml`
repeats it. Exit codes: those of the recipe's command (0 success, 1 verification failed or budget missed, 2 bad
arguments or input, the recipe included).
"""

from __future__ import annotations

import json

import yaml
from absl import flags

from pipelines import _common
from tfcompress.runs import recipe as recipes
from tfcompress.runs import recipe_format

POSITIONAL_FLAG = "recipe"

_RECIPE = flags.DEFINE_string("recipe", None, "The recipe: a .yaml, .yml or .json file.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where the run's files go, instead of the recipe's output_dir.")
_SET = flags.DEFINE_multi_string("set", [], "flag=value: replaces one setting of the recipe (the value is read "
                                 "as YAML: 0.9, true, [a, b]); repeat for more.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing results (convert, auto) or start over "
                               "(optimize) instead of resuming; never read from a recipe.")
_TRUST_MODEL = flags.DEFINE_bool("trust_model", False, "Load a model file even if it holds code (Lambda layers, "
                                 "unregistered custom layers): only for files you trust; never read from a recipe.")
_CHECK = flags.DEFINE_bool("check", False, "Validate the recipe and print the effective recipe; run nothing.")
_PRINT_SCHEMA = flags.DEFINE_bool("print_schema", False, "Print the recipes' JSON Schema and exit.")


def main(argv: list[str]) -> None:
    del argv
    if _PRINT_SCHEMA.value:
        print(json.dumps(recipes.schema(), indent=2))
        return
    if not _RECIPE.value:
        raise ValueError("tfcompress run needs a recipe: tfcompress run recipe.yaml (see recipes/ for examples).")
    overrides = dict(recipes.parse_override(text) for text in _SET.value)
    recipe = recipes.load_recipe(_RECIPE.value, overrides, _OUTPUT.value)
    config = recipe.config(overwrite=_OVERWRITE.value, trust_model=_TRUST_MODEL.value)
    if _CHECK.value:
        print(yaml.safe_dump(recipe_format.effective_recipe(recipe.command, config), sort_keys=False), end="")
        return
    result = recipes.execute(recipe.command, config)
    print(f"{recipe.command}: verified {result.model_path}; report {result.report_path}")


if __name__ == "__main__":
    _common.run(main)
