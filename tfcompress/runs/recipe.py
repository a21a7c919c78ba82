"""Recipes: a convert, optimize or auto run described in a YAML or JSON file kept beside the training code.

`load_recipe` reads the file, checks it against the published JSON Schema (`schema()`; `recipes/recipe.schema.json`
in the repository) and refuses with one line naming the key path, what was expected and what was found (an
unknown key gets the nearest valid one); then the order of optimize's stages and the paths. `Recipe.config()`
builds the same config the command's flags build, so a recipe and the equivalent flags give the same `.tflite`
bytes; `run_recipe` runs it. Every run writes its effective recipe (`recipe_format.write_effective_recipe`).

Format (every key inside a section is the flag of the same name; relative paths are read from the recipe's
folder):

    tfcompress_recipe: 1
    command: optimize                       # convert | optimize | auto
    output_dir: ../artefacts/lenet_prune_qat
    seed: 0
    model: {saved_model_dir: ../artefacts/demo/float_savedmodel}
    data: {train_data: ../data/mnist.npz, eval_data: ../data/mnist.npz, input_scale: 0.00392156862745098}
    stages:                                 # optimize only, in the order they run
      - prune: {final_sparsity: 0.8, prune_scope: global}
      - qat: {qat_epochs: 1}
    gates: {max_accuracy_drop: 0.01}
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import types
import typing

from tfcompress.core.errors import InputError
from tfcompress.conversion.convert import IO_DTYPES, Mode
from tfcompress.runs import recipe_format
from tfcompress.runs.auto_config import AutoConfig
from tfcompress.runs.optimize_config import CHANNEL_CRITERIA, QAT_WEIGHTS, TRAINING_STAGES, OptimizeConfig
from tfcompress.runs.pipeline import ConvertPipelineConfig
from tfcompress.training.distribute import RESOLVERS, STRATEGIES
from tfcompress.training.losses import LOSSES

CONFIGS = {"convert": ConvertPipelineConfig, "optimize": OptimizeConfig, "auto": AutoConfig}
SCHEMA_ID = "https://github.com/tfcompress/tfcompress/recipes/recipe.schema.json"
_ENUMS = {
    "mode": [m.value for m in Mode],
    "io_dtype": sorted({d for ds in IO_DTYPES.values() for d in ds}),
    "channel_criterion": list(CHANNEL_CRITERIA),
    "qat_weights": list(QAT_WEIGHTS),
    "prune_scope": ["local", "global"],
    "prune_structure": ["2:4"],
    "loss": list(LOSSES),
    "target": ["micro"],
    "strategy": list(STRATEGIES),
    "cluster_resolver": list(RESOLVERS),
}
_FRACTIONS = ("max_accuracy_drop", "final_sparsity", "min_top1_agreement")
_POSITIVE = ("epochs", "batch_size", "factorize_epochs", "prune_epochs", "cluster_epochs", "qat_epochs",
             "num_calibration_samples", "num_eval_samples", "num_validation_samples", "channel_multiple")
_JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}
_WORDS = {"string": "a string", "boolean": "true or false", "integer": "a whole number", "number": "a number",
          "null": "null", "array": "a list", "object": "a mapping of keys to values"}


class RecipeError(InputError):
    """A recipe cannot be used: unreadable, not valid against the schema, or naming a path that does not exist."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe: the command and its flag settings (paths absolute)."""

    path: str
    command: str
    settings: dict

    def config(self, overwrite: bool = False, trust_model: bool = False):
        """The command's config, exactly as its flags would build it (`ValueError` for what the config refuses)."""
        cls = CONFIGS[self.command]
        hints = typing.get_type_hints(cls)
        values = {name: None if (name, value) == ("tflm_samples", "all") else _coerce(value, hints[name])
                  for name, value in self.settings.items()}
        return cls(**values, overwrite=overwrite, trust_model=trust_model)


def schema() -> dict:
    """The published JSON Schema (draft 2020-12) of recipes, one definition per command."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "tfcompress recipe",
        "description": "A tfcompress convert, optimize or auto run. Inside a section every key is the command-line "
                       "flag of the same name; relative paths are read from the recipe's folder.",
        "type": "object",
        "required": ["command"],
        "properties": {"command": {"enum": list(recipe_format.COMMANDS)}},
        "allOf": [{"if": {"properties": {"command": {"const": c}}, "required": ["command"]},
                   "then": {"$ref": f"#/$defs/{c}"}} for c in recipe_format.COMMANDS],
        "$defs": {c: _command_schema(c) for c in recipe_format.COMMANDS},
    }


def load_recipe(path: str | os.PathLike, overrides: dict | None = None, output_dir: str | None = None) -> Recipe:
    """Reads and validates a recipe.

    Args:
        path: a `.yaml`/`.yml` or `.json` file.
        overrides: flag name -> value, replacing the recipe's (`tfcompress run --set flag=value`); paths in
            them are relative to the working directory.
        output_dir: replaces the recipe's `output_dir`.

    Raises:
        RecipeError: one line: the file, the key path, what was expected and what was found.
    """
    path = os.fspath(path)
    where = os.path.dirname(os.path.abspath(path))
    document = _read(path)
    _resolve_paths(document, where)
    for name, value in (overrides or {}).items():
        _override(document, path, name, value)
    if output_dir is not None:
        document["output_dir"] = os.path.abspath(output_dir)
    command = document.get("command")
    if command not in recipe_format.COMMANDS:
        found = "nothing" if command is None else repr(command)
        raise RecipeError(f"{path}: command: expected one of {', '.join(recipe_format.COMMANDS)}, found {found}"
                          + _nearest(command, recipe_format.COMMANDS) + ".")
    _validate(document, path, command)
    if "output_dir" not in document:
        raise RecipeError(f"{path}: output_dir: missing; add `output_dir: <folder>` to the recipe, or pass "
                          "--output_dir.")
    settings = _flatten(document, command)
    for name in recipe_format.PATHS:
        value = settings.get(name)
        if name != "output_dir" and value and not os.path.exists(value):
            raise RecipeError(f"{path}: {_key_path(document, name)}: no such file or folder {value} (relative paths "
                              f"are read from the recipe's folder, {where}).")
    return Recipe(path=path, command=command, settings=settings)


def run_recipe(path: str | os.PathLike, overrides: dict | None = None, output_dir: str | None = None,
               overwrite: bool = False, trust_model: bool = False):
    """Validates and runs a recipe; returns the command's result (`ConvertPipelineResult`, `OptimizeResult` or
    `AutoResult`). The run writes its effective recipe to `recipe.yaml` in its output directory."""
    recipe = load_recipe(path, overrides, output_dir)
    return execute(recipe.command, recipe.config(overwrite=overwrite, trust_model=trust_model))


def execute(command: str, config):
    """Runs `command` ("convert", "optimize" or "auto") on its config."""
    from tfcompress.runs import auto, optimize, pipeline

    run = {"convert": pipeline.run_convert, "optimize": optimize.run_optimize, "auto": auto.run_auto}
    return run[command](config)


def parse_override(text: str) -> tuple[str, object]:
    """`flag=value` (value read as YAML: 0.9, true, [a, b], auto) -> (flag, value)."""
    import yaml

    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise RecipeError(f"--set takes flag=value (e.g. --set final_sparsity=0.9). Received: --set {text!r}")
    try:
        return name.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return name.strip(), value


# --- the schema -----------------------------------------------------------------------------------------------

def _command_schema(command: str) -> dict:
    fields = _fields(command)
    properties: dict = {"tfcompress_recipe": {"const": recipe_format.FORMAT_VERSION},
                        "command": {"const": command}}
    for name in recipe_format.TOP_LEVEL:
        if name in fields:
            properties[name] = fields[name]
    for section, names in recipe_format.SECTIONS.items():
        own = {name: fields[name] for name in names if name in fields}
        if not own:
            continue
        properties[section] = {"type": "object", "properties": own, "additionalProperties": False}
        if section == "model":
            properties[section].update(minProperties=1, maxProperties=1,
                                       **{"x-expected": "one of saved_model_dir or keras_model"})
    if command == "optimize":
        stages = {}
        for stage, (names, switch) in recipe_format.STAGES.items():
            stages[stage] = {"type": ["object", "null"], "properties": {n: fields[n] for n in names},
                             "additionalProperties": False}
            if switch:
                stages[stage]["required"] = [switch]
        properties["stages"] = {"type": "array", "minItems": 1, "items": {
            "type": "object", "properties": stages, "additionalProperties": False, "minProperties": 1,
            "maxProperties": 1, "x-expected": "one stage: " + ", ".join(recipe_format.STAGES)}}
    schema = {"type": "object", "required": ["command", "model"] + (["stages"] if command == "optimize" else []),
              "properties": properties, "additionalProperties": False}
    if "train_data" in fields:
        schema["required"].append("data")
        properties["data"]["required"] = ["train_data"]
    return schema


def _fields(command: str) -> dict[str, dict]:
    """Flag name -> its JSON Schema, from the command's config dataclass."""
    cls = CONFIGS[command]
    hints = typing.get_type_hints(cls)
    result = {}
    for field in dataclasses.fields(cls):
        if field.name in recipe_format.RUN_ONLY:
            continue
        result[field.name] = _field_schema(field.name, hints[field.name])
    return result


def _field_schema(name: str, hint) -> dict:
    args = _args(hint)
    nullable = type(None) in args
    if name == "prune_channels":
        return {"anyOf": [{"type": "number", "minimum": 0, "exclusiveMaximum": 1}, {"const": "auto"}],
                "x-expected": "a fraction in [0, 1) or 'auto'"}
    if name == "tflm_samples":  # None, or "all" as on the command line: every sample
        return {"anyOf": [{"type": "integer", "minimum": 1}, {"enum": ["all", None]}],
                "x-expected": "a whole number of at least 1, or 'all'"}
    if name in _ENUMS:
        values = _ENUMS[name] + ([None] if nullable else [])
        return {"enum": values, "x-expected": "one of " + ", ".join(str(v) for v in _ENUMS[name])
                + (" or null" if nullable else "")}
    types = []
    for arg in args:
        if typing.get_origin(arg) is tuple:
            types.append("array")
        else:
            types.append(_JSON_TYPES[arg])
    schema: dict = {"type": types[0] if len(types) == 1 else types}
    if "array" in types:
        schema["items"] = {"type": "string"}
    if name in _FRACTIONS:
        schema.update(minimum=0, maximum=1, **{"x-expected": "a fraction in [0, 1] (0.005 is half a point)"})
    elif name == "validation_fraction":
        schema.update(exclusiveMinimum=0, exclusiveMaximum=1, **{"x-expected": "a fraction in (0, 1)"})
    elif name in _POSITIVE:
        schema.update(minimum=1, **{"x-expected": "a whole number of at least 1"
                                    + (" or null" if nullable else "")})
    return schema


def _args(hint) -> tuple:
    """The members of a union annotation (`str | None` -> (str, NoneType)), or the annotation alone."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _coerce(value, hint):
    """A YAML/JSON value as the flag parser gives it: lists as tuples, whole numbers as floats for float flags."""
    if isinstance(value, list):
        return tuple(value)
    args = _args(hint)
    if isinstance(value, int) and not isinstance(value, bool) and float in args and int not in args:
        return float(value)
    return value


# --- reading and checking -------------------------------------------------------------------------------------

def _read(path: str) -> dict:
    import yaml

    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise RecipeError(f"{path}: a recipe is a .yaml, .yml or .json file. Received: {os.path.basename(path)!r}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file; check the path (relative to the working directory).") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e}).") from None
    try:
        document = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}.") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}.") from None
    if not isinstance(document, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values (command, model, data, ...); "
                          f"found {_describe(document)}.")
    return document


def _validate(document: dict, path: str, command: str) -> None:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema()["$defs"][command])
    errors = sorted(validator.iter_errors(document), key=lambda e: (len(e.absolute_path), _dotted(e.absolute_path)))
    if errors:
        more = f" ({len(errors) - 1} more error(s) after this one)" if len(errors) > 1 else ""
        raise RecipeError(f"{path}: {_message(errors[0], command)}{more}")
    stages = [next(iter(item)) for item in document.get("stages", ())]
    for i, stage in enumerate(stages):
        if stages.index(stage) != i:
            raise RecipeError(f"{path}: stages[{i}]: {stage!r} is listed twice; a stage runs once per optimize run "
                              "(merge its settings, or use two recipes).")
    order = [s for s in TRAINING_STAGES if s in stages]
    if stages != order:
        first = next(i for i, (a, b) in enumerate(zip(stages, order)) if a != b)
        raise RecipeError(f"{path}: stages[{first}]: {stages[first]!r} cannot come before {order[first]!r}: optimize "
                          f"runs {' -> '.join(TRAINING_STAGES)}; list the stages in that order ({', '.join(order)}).")


def _message(error, command: str) -> str:
    where = _dotted(error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed))
        key = unknown[0]
        home = recipe_format.section_of(key)
        if key in recipe_format.RUN_ONLY:
            return (f"{where}: {key!r} cannot be set in a recipe; pass --{key} to tfcompress run (a shared recipe "
                    "must not switch off the model-loading checks or replace results unasked).")
        if home is not None and key in _fields(command):
            place = "the top level" if home == "" else (
                f"the {home.split('.')[1]} stage (stages: - {home.split('.')[1]}: {{...}})"
                if home.startswith("stages.") else home)
            return f"{where}: {key!r} is not a key here; it belongs in {place}."
        return f"{where}: unknown key {key!r}{_nearest(key, allowed)}; expected one of {', '.join(allowed)}."
    if error.validator == "required":
        missing = next(n for n in error.validator_value if n not in error.instance)
        hint = {"model": " (saved_model_dir or keras_model)", "stages": " (a list: channels, factorize, prune, "
                "cluster, qat)", "data": " (train_data: the training .npz)"}.get(missing, "")
        return f"{where}: missing key {missing!r}{hint}."
    if error.validator in ("minProperties", "maxProperties", "minItems"):
        expected = error.schema.get("x-expected", "at least one entry")
        return f"{where}: expected {expected}, found {_describe(error.instance)}."
    expected = error.schema.get("x-expected")
    if expected is None:
        kind = error.schema.get("type", "")
        kinds = kind if isinstance(kind, list) else [kind]
        expected = " or ".join(_WORDS.get(k, k) for k in kinds) if kind else error.message
    return f"{where}: expected {expected}, found {_describe(error.instance)}."


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (true or false)"
    kind = {str: "a string", int: "a whole number", float: "a number", list: "a list", dict: "a mapping"}.get(
        type(value), type(value).__name__)
    shown = json.dumps(value, default=str)
    return f"{kind} ({shown if len(shown) <= 60 else shown[:57] + '...'})"


def _dotted(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _nearest(word, choices) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _sections(document: dict):
    """(key path, mapping) of every place settings live in `document`: top level, sections, stage entries."""
    yield "", document
    for section in recipe_format.SECTIONS:
        if isinstance(document.get(section), dict):
            yield section, document[section]
    for i, item in enumerate(document.get("stages") or ()):
        if isinstance(item, dict) and len(item) == 1:
            stage, settings = next(iter(item.items()))
            if isinstance(settings, dict):
                yield f"stages[{i}].{stage}", settings


def _resolve_paths(document: dict, where: str) -> None:
    for _, mapping in _sections(document):
        for name in recipe_format.PATHS:
            value = mapping.get(name)
            if isinstance(value, str) and value:
                mapping[name] = os.path.normpath(os.path.join(where, os.path.expanduser(value)))


def _key_path(document: dict, name: str) -> str:
    for prefix, mapping in _sections(document):
        if name in mapping:
            return f"{prefix}.{name}" if prefix else name
    return name


def _override(document: dict, path: str, name: str, value) -> None:
    """Puts one `--set flag=value` where the recipe keeps that flag."""
    home = recipe_format.section_of(name)
    if home is None:
        raise RecipeError(f"--set {name}: {name!r} is not a recipe setting{_nearest(name, _all_flags())}"
                          + (f"; pass --{name} to tfcompress run" if name in recipe_format.RUN_ONLY else "") + ".")
    if name in recipe_format.PATHS and isinstance(value, str) and value:
        value = os.path.abspath(value)
    if home == "":
        document[name] = value
    elif home.startswith("stages."):
        stage = home.split(".", 1)[1]
        for item in document.get("stages") or ():
            if isinstance(item, dict) and stage in item:
                if name == recipe_format.STAGE_SWITCHES.get(stage):
                    raise RecipeError(f"--set {name}: the {stage} stage is switched on by listing it in the "
                                      "recipe's stages; edit the recipe to add or remove it.")
                item[stage] = dict(item[stage] or {}, **{name: value})
                return
        raise RecipeError(f"--set {name}: {path} lists no {stage} stage, which {name!r} belongs to; add the "
                          f"stage to the recipe (stages: - {stage}: {{{name}: ...}}).")
    else:
        if home == "model":
            document["model"] = {}  # one model source: the override replaces the recipe's
        section = document.setdefault(home, {})
        if not isinstance(section, dict):
            return  # the schema check names the section's wrong type
        section[name] = value


def _all_flags() -> list[str]:
    names = set(recipe_format.TOP_LEVEL)
    for group in recipe_format.SECTIONS.values():
        names.update(group)
    for group, _ in recipe_format.STAGES.values():
        names.update(group)
    return sorted(names)


def _flatten(document: dict, command: str) -> dict:
    """The validated document as flag settings of `command`'s config."""
    settings = {name: document[name] for name in recipe_format.TOP_LEVEL if name in document}
    for section in recipe_format.SECTIONS:
        settings.update(document.get(section) or {})
    for item in document.get("stages") or ():
        stage, values = next(iter(item.items()))
        settings.update(values or {})
        if stage in recipe_format.STAGE_SWITCHES:
            settings[recipe_format.STAGE_SWITCHES[stage]] = True
    return settings
