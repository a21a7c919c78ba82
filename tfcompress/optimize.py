"""The optimize pipeline: float Keras model in, pruned and/or QAT fine-tuned, verified int8 `.tflite` out.

Takes an `OptimizeConfig` (its fields are the flags of `pipelines/optimize.py`); returns an
`OptimizeResult`. Stages run in order (float → prune → qat → convert), each leaving its artefact under
`<output_dir>/stages/` and its numbers in `<output_dir>/report.json`. A rerun with the same settings
resumes after the last completed stage. The validation split is cut from the end of the training data;
the evaluation data (a test split) is only ever measured on, never used to choose anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time

import numpy as np

from tfcompress import calibration
from tfcompress._keras import keras
from tfcompress.artefacts import prepare_output_dir, write_atomic, write_json
from tfcompress.errors import ModelLoadError, OutputPathError
from tfcompress.model_io import load_model, model_source
from tfcompress.pipeline import MICRO_DIRNAME, ConvertPipelineConfig, check_target, run_convert
from tfcompress.prune import PruningCallback, prune, strip
from tfcompress.quantize import quantize_aware

STATE_FILENAME = "state.json"
REPORT_SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class OptimizeConfig:
    """Field names equal the flags; accuracies and sparsities are fractions in [0, 1]."""

    output_dir: str
    train_data: str
    saved_model_dir: str | None = None
    keras_model: str | None = None
    train_key: str = "x_train"
    train_labels_key: str = "y_train"
    validation_fraction: float = 0.1
    eval_data: str | None = None
    eval_key: str = "x_test"
    eval_labels_key: str = "y_test"
    input_scale: float = 1.0
    input_offset: float = 0.0
    prune: bool = False
    final_sparsity: float = 0.8
    prune_scope: str = "local"
    prune_structure: str | None = None
    prune_exclude: tuple[str, ...] = ()
    prune_epochs: int = 2
    qat: bool = False
    qat_epochs: int = 1
    leave_float: tuple[str, ...] = ()
    mode: str = "int8"
    batch_size: int = 128
    learning_rate: float = 5e-4
    calibration_data: str | None = None
    calibration_key: str | None = None
    num_calibration_samples: int = 500
    max_accuracy_drop: float = 0.01
    seed: int = 0
    target: str | None = None
    overwrite: bool = False

    def __post_init__(self):
        model_source(self.saved_model_dir, self.keras_model)
        check_target(self.target, self.mode)
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                "validation_fraction is the share of the training data held out, in (0, 1). "
                f"Received: validation_fraction={self.validation_fraction}"
            )
        for name in ("prune_epochs", "qat_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1. Received: {name}={getattr(self, name)}")
        if not (self.prune or self.qat):
            raise ValueError(
                "Nothing to optimize: pass --prune and/or --qat (for post-training quantization alone use "
                "tfcompress convert). Received: prune=False, qat=False"
            )

    def fingerprint(self) -> str:
        """Identifies the settings the training stages' artefacts were made with.

        Options of the final conversion and of measurement only (mode, calibration, evaluation, the
        accuracy gate) are left out: changing them reruns just the convert stage.
        """
        values = dataclasses.asdict(self) | {"leave_float": sorted(self.leave_float),
                                             "prune_exclude": sorted(self.prune_exclude)}
        for name in ("output_dir", "overwrite", "mode", "target", "max_accuracy_drop", "calibration_data",
                     "calibration_key", "num_calibration_samples", "eval_data", "eval_key",
                     "eval_labels_key"):
            values.pop(name)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class OptimizeResult:
    model_path: str
    report_path: str
    stages: tuple[dict, ...]
    resumed_after: str | None


def run_optimize(config: OptimizeConfig) -> OptimizeResult:
    """Runs the chosen stages, resuming after the last completed one when the settings match.

    Raises:
        InputError: bad model, data or output location.
        ConversionError, VerificationError: from the final convert stage (no model.tflite is written).
        SparsityNotReachedError: pruning ended below its target.
    """
    # Inputs and settings first, so that bad input leaves nothing behind; then the output location.
    float_model = _to_keras(load_model(model_source(config.saved_model_dir, config.keras_model)))
    x_train, y_train, x_val, y_val, x_eval, y_eval = _load_data(config, tuple(float_model.inputs[0].shape))
    if config.prune:
        _pruned(float_model, config)  # checks the layers against the pruning settings; the copy is dropped
    output_dir, _ = prepare_output_dir(config.output_dir, (), overwrite=True)
    stages_dir = os.path.join(output_dir, "stages")
    state = _load_state(stages_dir, config)
    resumed_after = state["completed"][-1]["stage"] if state["completed"] else None
    model = _resume_model(state)
    if model is None:
        model = float_model
        _complete(state, stages_dir, "float", model, x_val, y_val, x_eval, y_eval, seconds=0.0)
    done = {s["stage"] for s in state["completed"]}
    if config.prune and "prune" not in done:
        start = time.perf_counter()
        keras.utils.set_random_seed(config.seed)
        pruned = _pruned(model, config)
        _compile(pruned, config)
        pruned.fit(x_train, y_train, batch_size=config.batch_size, epochs=config.prune_epochs, shuffle=True,
                   validation_data=(x_val, y_val), callbacks=[PruningCallback()], verbose=2)
        model = strip(pruned)
        _complete(state, stages_dir, "prune", model, x_val, y_val, x_eval, y_eval,
                  seconds=time.perf_counter() - start)
    if config.qat and "qat" not in done:
        start = time.perf_counter()
        keras.utils.set_random_seed(config.seed)
        qat = quantize_aware(model, scheme="prune_preserving" if config.prune else "default",
                             leave_float=config.leave_float)
        _compile(qat, config)
        qat.fit(x_train, y_train, batch_size=config.batch_size, epochs=config.qat_epochs, shuffle=True,
                validation_data=(x_val, y_val), verbose=2)
        model = qat
        _complete(state, stages_dir, "qat", model, x_val, y_val, x_eval, y_eval,
                  seconds=time.perf_counter() - start)

    start = time.perf_counter()
    last = state["completed"][-1]
    converted = run_convert(ConvertPipelineConfig(
        output_dir=os.path.join(stages_dir, "convert"), keras_model=last["artefact"], mode=config.mode,
        calibration_data=config.calibration_data, calibration_key=config.calibration_key,
        eval_data=config.eval_data, eval_key=config.eval_key, eval_labels_key=config.eval_labels_key,
        input_scale=config.input_scale, input_offset=config.input_offset,
        num_calibration_samples=config.num_calibration_samples,
        max_accuracy_drop=config.max_accuracy_drop, seed=config.seed, target=config.target, overwrite=True,
    ))
    model_path = os.path.join(output_dir, "model.tflite")
    with open(converted.model_path, "rb") as f:
        write_atomic(model_path, f.read())
    if config.target:
        _copy_dir(os.path.join(os.path.dirname(converted.model_path), MICRO_DIRNAME),
                  os.path.join(output_dir, MICRO_DIRNAME))
    accuracy = converted.verification.accuracy
    stages = [*state["completed"], {
        "stage": "convert", "artefact": model_path, "bytes": converted.num_bytes,
        "eval_accuracy": None if accuracy is None else accuracy.tflite_accuracy,
        "accuracy_drop_vs_input_model": None if accuracy is None else accuracy.accuracy_drop,
        "weight_sparsity": converted.report["model"]["weight_sparsity"],
        "micro": converted.report.get("micro"),
        "seconds": round(time.perf_counter() - start, 3),
    }]
    report_path = os.path.join(output_dir, "report.json")
    write_json(report_path, {"schema_version": REPORT_SCHEMA_VERSION, "config": dataclasses.asdict(config),
                             "resumed_after": resumed_after, "stages": stages})
    return OptimizeResult(model_path, report_path, tuple(stages), resumed_after)


def _copy_dir(source: str, destination: str) -> None:
    os.makedirs(destination, exist_ok=True)
    for name in sorted(os.listdir(source)):
        with open(os.path.join(source, name), "rb") as f:
            write_atomic(os.path.join(destination, name), f.read())


def _load_state(stages_dir: str, config: OptimizeConfig) -> dict:
    path = os.path.join(stages_dir, STATE_FILENAME)
    fingerprint = config.fingerprint()
    if os.path.exists(path) and config.overwrite:
        shutil.rmtree(stages_dir)
    elif os.path.exists(path):
        with open(path) as f:
            state = json.load(f)
        if state.get("fingerprint") != fingerprint:
            raise OutputPathError(
                f"{stages_dir} holds stages made with other settings. Pass --overwrite to start over, or "
                "choose another --output_dir."
            )
        return state
    os.makedirs(stages_dir, exist_ok=True)
    return {"fingerprint": fingerprint, "completed": []}


def _resume_model(state: dict):
    if not state["completed"]:
        return None
    artefact = state["completed"][-1]["artefact"]
    try:
        return _to_keras(load_model(artefact))
    except ModelLoadError as e:
        raise OutputPathError(f"Cannot resume from {artefact} ({e}). Pass --overwrite to start over.") from None


def _to_keras(model):
    if model.keras_model is not None:
        return model.keras_model
    try:
        return keras.models.load_model(model.saved_model_dir, compile=False)
    except Exception as e:  # a SavedModel that is not a Keras one
        raise ModelLoadError(
            f"{model.source} is a SavedModel but not a Keras one ({type(e).__name__}), so it cannot be "
            "fine-tuned. Save it with tf_keras model.save(), or pass --keras_model."
        ) from None


def _pruned(model, config: OptimizeConfig):
    return prune(model, config.final_sparsity, scope=config.prune_scope, structure=config.prune_structure,
                 exclude=list(config.prune_exclude) or None)


def _load_data(config: OptimizeConfig, shape):
    x, y = calibration.load_labelled_data(
        config.train_data, shape, key=config.train_key, labels_key=config.train_labels_key,
        scale=config.input_scale, offset=config.input_offset, what="Training data",
        key_flags="--train_key / --train_labels_key")
    split = len(x) - max(1, int(round(len(x) * config.validation_fraction)))
    x_eval = y_eval = None
    if config.eval_data is not None:
        x_eval, y_eval = calibration.load_labelled_data(
            config.eval_data, shape, key=config.eval_key, labels_key=config.eval_labels_key,
            scale=config.input_scale, offset=config.input_offset)
    return x[:split], y[:split], x[split:], y[split:], x_eval, y_eval


def _compile(model, config: OptimizeConfig) -> None:
    softmax = getattr(model.layers[-1], "activation", None) is keras.activations.softmax
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax),
                  metrics=["accuracy"])


def _accuracy(model, x, y) -> float | None:
    if x is None:
        return None
    logits = model.predict(x, batch_size=1000, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == y))


def _kernel_sparsity(model) -> float:
    """Zero fraction over every kernel, also inside tfmot's QAT wrappers (which `prune.sparsity` skips)."""
    kernels = [w.numpy() for w in model.weights if w.name.split("/")[-1].startswith("kernel")]
    total = sum(k.size for k in kernels)
    return float(sum(np.sum(k == 0) for k in kernels) / total) if total else 0.0


def _complete(state, stages_dir, stage, model, x_val, y_val, x_eval, y_eval, seconds) -> None:
    # HDF5: tfmot QAT models do not reload from the .keras format (quantize_layer variables go missing).
    path = os.path.join(stages_dir, f"{stage}.h5")
    model.save(path)
    state["completed"].append({
        "stage": stage, "artefact": path,
        "validation_accuracy": _accuracy(model, x_val, y_val),
        "eval_accuracy": _accuracy(model, x_eval, y_eval),
        "parameters": int(model.count_params()),
        "sparsity": _kernel_sparsity(model),
        "seconds": round(seconds, 3),
    })
    write_json(os.path.join(stages_dir, STATE_FILENAME), state)
