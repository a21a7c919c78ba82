"""The sensitivity run (`tfcompress sensitivity`): a model and its training data in, per-layer sensitivity curves out.

Takes a `SensitivityConfig` (its fields are the flags of `pipelines/sensitivity.py`); loads the model (either
Keras, translated to tf_keras as the optimize run does), cuts the validation split from the end of the training
data exactly as `optimize` does (the test split is never read), runs `tfcompress.analysis.sensitivity`, and with a
budget also solves the per-layer channel ratios. Writes `sensitivity.json`, `sensitivity.md` and `sensitivity.png`
to the output directory, each atomically; returns a `SensitivityRunResult`.
"""

from __future__ import annotations

import dataclasses
import os

from tfcompress.analysis import sensitivity as sens
from tfcompress.conversion import datasets
from tfcompress.core.artefacts import output_lock, prepare_output_dir, remove_if_empty, write_atomic, write_json
from tfcompress.core.model_io import load_model, model_source
from tfcompress.runs.optimize import _translated
from tfcompress.training.channel_graph import channel_plan
from tfcompress.training.losses import training_targets

JSON_FILENAME = "sensitivity.json"
MARKDOWN_FILENAME = "sensitivity.md"
PLOT_FILENAME = "sensitivity.png"


@dataclasses.dataclass(frozen=True)
class SensitivityConfig:
    """Field names equal the flags; ratios and fractions are in [0, 1]."""

    output_dir: str
    train_data: str
    saved_model_dir: str | None = None
    keras_model: str | None = None
    trust_model: bool = False
    train_key: str = "x_train"
    train_labels_key: str = "y_train"
    # The TFRecord features that hold the input and the label ("image=KEY,label=KEY"; datasets.parse_data_spec)
    data_spec: str | None = None
    validation_fraction: float = 0.1
    eval_output: str | None = None
    input_scale: float = 1.0
    input_offset: float = 0.0
    ratios: tuple[float, ...] = sens.DEFAULT_RATIOS
    kinds: tuple[str, ...] = sens.KINDS
    channel_criterion: str = "l1"
    channel_multiple: int = 8
    target_macs: float | None = None
    target_params: float | None = None
    overwrite: bool = False

    def __post_init__(self):
        model_source(self.saved_model_dir, self.keras_model)
        datasets.parse_data_spec(self.data_spec)
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError("validation_fraction is the share of the training data held out, in (0, 1). "
                             f"Received: validation_fraction={self.validation_fraction}")


@dataclasses.dataclass(frozen=True)
class SensitivityRunResult:
    result: sens.SensitivityResult
    solution: sens.Solution | None
    json_path: str


def run_sensitivity(config: SensitivityConfig) -> SensitivityRunResult:
    """Measures and writes; nothing is written when the model, the data or a setting is refused.

    Raises:
        ValueError: bad settings (ratios, kinds, criterion, output name, an unreachable budget).
        InputError: the model, the data or the output location cannot be used.
    """
    directory, created = prepare_output_dir(config.output_dir, (JSON_FILENAME, MARKDOWN_FILENAME, PLOT_FILENAME),
                                            config.overwrite)
    try:
        model, _ = _translated(load_model(model_source(config.saved_model_dir, config.keras_model),
                                          trust_model=config.trust_model), config.trust_model)
        names = list(model.output_names)
        position = names.index(config.eval_output) if config.eval_output in names else 0
        if config.eval_output is not None and config.eval_output not in names:
            raise ValueError(f"eval_output must name one of the model's outputs {names}. "
                             f"Received: eval_output={config.eval_output!r}")
        x_val, y_val = _validation_split(config, model, position)
        result = sens.sensitivity(model, x_val, y_val, ratios=config.ratios, kinds=config.kinds,
                                  criterion=config.channel_criterion, output=names[position],
                                  channel_multiple=config.channel_multiple)
        solution = None
        if config.target_macs is not None or config.target_params is not None:
            solution = sens.solve_ratios(result, channel_plan(model), target_macs=config.target_macs,
                                         target_params=config.target_params, channel_multiple=config.channel_multiple)
    except Exception:
        if created:
            remove_if_empty(directory)
        raise
    json_path = os.path.join(directory, JSON_FILENAME)
    with output_lock(directory, "tfcompress sensitivity"):
        write_json(json_path, result.to_json() | {"source": model_source(config.saved_model_dir, config.keras_model),
                                                  "validation_samples": len(x_val),
                                                  "solution": None if solution is None else solution.to_json()})
        write_atomic(os.path.join(directory, MARKDOWN_FILENAME), render(result, solution).encode())
        write_atomic(os.path.join(directory, PLOT_FILENAME), result.plot())
    return SensitivityRunResult(result, solution, json_path)


def _validation_split(config: SensitivityConfig, model, position: int):
    """The validation split, cut from the end of the training data as optimize cuts it. A streamed source (tree,
    TFRecords, tf.data) reads only that index range into memory; an .npz is loaded whole, as before."""
    shape = tuple(model.inputs[0].shape)
    if datasets.is_streamed(config.train_data, labelled=True):
        source = datasets.open_source(config.train_data, shape, labelled=True, what="Training data",
                                      spec=config.data_spec, scale=config.input_scale, offset=config.input_offset,
                                      num_classes=max(2, int(model.outputs[position].shape[-1] or 0)))
        total = source.count()
        x, y = source.arrays(total - max(1, int(round(total * config.validation_fraction))), total)
        return x, y
    x, raw = datasets.load_labelled_data(
        config.train_data, shape, key=config.train_key, labels_key=config.train_labels_key,
        scale=config.input_scale, offset=config.input_offset, what="Training data",
        key_flags="--train_key / --train_labels_key", class_indices=False)
    if config.train_labels_key == config.train_key:  # an autoencoder: its targets are its inputs
        raw = x
    y, _ = training_targets(raw, model, f"{config.train_data} (key '{config.train_labels_key}')", output=position)
    split = len(x) - max(1, int(round(len(x) * config.validation_fraction)))
    return x[split:], y[split:]


def render(result: sens.SensitivityResult, solution: sens.Solution | None) -> str:
    text = result.markdown()
    if solution is not None:
        text += ("\nSolved channel ratios (each group pruned as far as one common loss allows): "
                 + ", ".join(f"{name} {ratio:.2f}" for name, ratio in solution.ratios.items())
                 + f"; MACs kept {solution.macs_fraction:.3f}, parameters kept {solution.params_fraction:.3f}.\n")
    return text
