"""The optimize pipeline: float Keras model in, factorized, pruned, clustered and/or QAT fine-tuned, verified
int8 `.tflite` out.

Takes an `OptimizeConfig` (its fields are the flags of `pipelines/optimize.py`); returns an
`OptimizeResult`. Stages run in a fixed order, each only when asked for:

    float → channels → factorize → prune → cluster → qat → (candidates) → convert

Channel pruning (`tfcompress.runs.channel_stage`) comes first: it removes whole filters, so every later stage
works on the smaller model. Factorization comes first among the rest because it changes the layers (a Dense
becomes two) and the later stages should compress the layers that ship; pruning comes before clustering so that
clustering can keep the zeros (`preserve_sparsity`); QAT comes last among the training stages, preserving what
came before (PQAT after pruning, CQAT/PCQAT after clustering). With a teacher (`distill_from`) the channel, factorize,
prune and cluster fine-tunes train through `tfcompress.training.distill.Distiller`; QAT trains on the labels, or
with `qat_distill` distils from the model it starts from. A model with several outputs trains every head on its
own labels (one `train_labels_key` per output). Each stage leaves its artefact under `<output_dir>/stages/` and
its numbers in `<output_dir>/report.json`. A rerun with the same settings resumes after the last completed
stage. The validation split is cut from the end of the training data; the evaluation data (a test split) is only
ever measured on, never used to choose anything. After QAT, `tfcompress.runs.candidates` also quantizes the
model QAT started from post-training and ships the one that scores better on validation (`force_qat`: QAT
regardless); either goes through the same gated convert stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
import warnings

import numpy as np

from tfcompress.conversion import calibration, datasets
from tfcompress.core import keras3 as keras3_io
from tfcompress.core import progress
from tfcompress.analysis import report as run_report
from tfcompress.core._keras import keras
from tfcompress.core.artefacts import atomic_path, output_lock, prepare_output_dir, write_atomic, write_json
from tfcompress.training.cluster import distinct_values
from tfcompress.training.cluster import cluster as cluster_weights
from tfcompress.training.cluster import strip as strip_clustering
from tfcompress.training.distill import Distiller
from tfcompress.core.errors import CalibrationDataError, ModelLoadError, OutputPathError, VerificationError
from tfcompress.training.factorize import FactorizeResult, factorize
from tfcompress.core.model_io import FloatModel, load_model, model_source
from tfcompress.core.model_safety import check_model_file
from tfcompress.runs import candidates, recipe_format
from tfcompress.runs.pipeline import MICRO_DIRNAME, ConvertPipelineConfig, run_convert
from tfcompress.training.prune import PruningCallback, prune, strip
from tfcompress.runs.optimize_config import OptimizeConfig
from tfcompress.training.losses import TrainingLoss, output_activation, training_loss, training_targets
from tfcompress.training.lowbit import max_distinct
from tfcompress.training.quantize import low_bit_layers, quantize_aware
from tfcompress.training.channel_graph import model_macs
from tfcompress.training import distribute
from tfcompress.runs import channel_stage

STATE_FILENAME = "state.json"
REPORT_SCHEMA_VERSION = 1
@dataclasses.dataclass(frozen=True)
class OptimizeResult:
    model_path: str | None  # None on a worker that is not the chief: it trains, the chief writes
    report_path: str | None
    stages: tuple[dict, ...]
    resumed_after: str | None
    shipped: dict | None = None
    """With --qat: which candidate (QAT, or PTQ of the model before QAT) shipped and why (`Choice.to_json`)."""


@dataclasses.dataclass(frozen=True)
class _Stream:
    """A streamed training source: samples [0, split) train, [split, total) validate (held in memory)."""

    source: datasets.Source
    split: int
    total: int
    calibration_raw: np.ndarray  # seeded samples of the training range as stored, for PTQ's calibration


@dataclasses.dataclass(frozen=True)
class _Inputs:
    """What every training stage reads: the settings, the data splits and the checked-up-front pieces."""

    config: OptimizeConfig
    x_train: np.ndarray
    y_train: tuple[np.ndarray, ...]  # one labels array per output, in the model's output order
    x_val: np.ndarray
    y_val: tuple[np.ndarray, ...]
    # The evaluation data, labels of the output `config.eval_output` (the only one, for one output): in memory or
    # streamed batch by batch (`datasets.EvalData`)
    evaluation: datasets.EvalData | None
    float_model: keras.Model
    teacher: keras.Model | None
    factorized: FactorizeResult | None
    losses: tuple[TrainingLoss, ...]  # one per output, in the model's output order
    heads: tuple[candidates.Head, ...]
    source: FloatModel | None = None  # the model as loaded (a Keras 3 one is translated into float_model)
    translation: keras3_io.Translation | None = None
    backup_dir: str | None = None  # multi-worker: where each fine-tune's BackupAndRestore checkpoints go
    # A streamed training source (image tree, TFRecords): fit reads it through tf.data, and x_train/y_train hold
    # only a seeded sample of its training range (for the stages that need inputs in memory).
    stream: _Stream | None = None

    def fit_data(self) -> dict:
        """What `fit` trains on: the arrays, or the streamed source's training range through tf.data."""
        if self.stream is None:
            return {"x": self.x_train, "y": self.targets(self.y_train), "batch_size": self.config.batch_size}
        return {"x": self.stream.source.training_dataset(self.config.batch_size, self.config.seed,
                                                         stop=self.stream.split)}

    @property
    def num_train(self) -> int:
        """Samples in the training split (validation starts there)."""
        return len(self.x_train) if self.stream is None else self.stream.split

    def input_model(self) -> dict:
        """What the run started from, for report.json (`"input_model"`)."""
        return {"source": self.source.source, "kind": self.source.kind, "keras_version": self.source.keras_version,
                "translation": None if self.translation is None else {
                    "description": self.translation.describe(), "layers": self.translation.num_layers,
                    "max_abs_error": self.translation.max_abs_error, "num_samples": self.translation.num_samples,
                    "inputs": self.translation.inputs_source}}

    def targets(self, y: tuple[np.ndarray, ...]):
        """Labels as Keras' fit takes them: the one array, or the list of one per output."""
        return y[0] if len(y) == 1 else list(y)

    @property
    def regression(self) -> bool:
        return any(loss.regression for loss in self.losses)

    def describe_loss(self) -> str:
        if len(self.losses) == 1:
            return self.losses[0].describe()
        return "; ".join(f"{head.name}: {loss.describe()}" for head, loss in zip(self.heads, self.losses))


def run_optimize(config: OptimizeConfig, strategy=None) -> OptimizeResult:
    """Runs the chosen stages, resuming after the last completed one when the settings match.

    The fine-tunes train under `config.strategy` (or `strategy`, a `tf.distribute.Strategy`, which wins). On
    several workers every one runs this with the same config; the chief writes the run's files, the others
    train in a scratch folder (`<output_dir>/.workers/<task>`, removed when they finish) and return a result
    without paths.

    Raises:
        InputError: bad model, data or output location.
        ValueError: settings that do not fit the model (layer names, a teacher of another output shape).
        ConversionError, VerificationError: from the final convert stage (no model.tflite is written).
        SparsityNotReachedError: pruning ended below its target.
        OutputPathError: another run holds `output_dir`, stages made with other settings sit there, or the disk
            is full (no partial file is left at a final path).
    """
    # The strategy before any TensorFlow op (MultiWorkerMirroredStrategy must come first in a process); then
    # inputs and settings, so that bad input leaves nothing behind; then the output location.
    distribution = distribute.plan(config.strategy, config.cluster_resolver, config.batch_size, strategy)
    inputs = _check_inputs(config)
    if distribution.workers > 1:
        inputs = dataclasses.replace(inputs, backup_dir=os.path.join(os.path.abspath(config.output_dir), "stages",
                                                                     BACKUP_DIRNAME))
    if not distribution.is_chief:
        return _run_worker(config, inputs, distribution)
    output_dir, _ = prepare_output_dir(config.output_dir, (), overwrite=True)
    # One run per directory; the convert runs inside (stages/convert, stages/candidates) are covered by it.
    with output_lock(output_dir, "tfcompress optimize"), recipe_format.recorded("optimize", config, output_dir):
        return _optimize(config, inputs, output_dir, distribution)


BACKUP_DIRNAME = "backup"
WORKERS_DIRNAME = ".workers"


def _run_worker(config: OptimizeConfig, inputs: _Inputs, distribution: distribute.Distribution) -> OptimizeResult:
    """A worker other than the chief: the same stages in its scratch folder, removed once they are done."""
    scratch = os.path.join(config.output_dir, WORKERS_DIRNAME, distribution.task.replace(" ", "-"))
    os.makedirs(scratch, exist_ok=True)
    with output_lock(scratch, "tfcompress optimize (worker)"):
        result = _optimize(config, inputs, scratch, distribution)
    shutil.rmtree(scratch, ignore_errors=True)
    with contextlib.suppress(OSError):  # the last worker out removes the folder they shared
        os.rmdir(os.path.dirname(scratch))
    return result


def _remove_empty_dirs(top: str) -> None:
    """Removes the empty folders under `top` (`<output_dir>/stages/backup`), `top`, and `stages` if empty."""
    for folder in sorted((entry[0] for entry in os.walk(top)), key=len, reverse=True) + [os.path.dirname(top)]:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _optimize(config: OptimizeConfig, inputs: _Inputs, output_dir: str,
              distribution: distribute.Distribution) -> OptimizeResult:
    stages_dir = os.path.join(output_dir, "stages")
    state = _load_state(stages_dir, config)
    if distribution.workers > 1:  # every worker resumes after the same stage, or their collectives never meet
        agreed = distribute.agreed_count(distribution, len(state["completed"]), len(config.stages) + 1)
        state = {**state, "completed": state["completed"][:agreed]}
    resumed_after = state["completed"][-1]["stage"] if state["completed"] else None
    model = _resume_model(state, config.trust_model)
    if model is None:
        model = inputs.float_model
        _complete(state, stages_dir, "float", model, inputs, seconds=0.0)
    done = {s["stage"] for s in state["completed"]}
    for stage in config.stages:
        if stage in done:
            continue
        start = time.perf_counter()
        keras.utils.set_random_seed(config.seed)
        if stage == "factorize":  # factorized once up front, from the float model
            model = inputs.factorized.model
        with distribution.scope():
            model, stage_inputs = _in_scope(model, inputs, distribution, stage, stages_dir)
            with distribute.peers_lost_reported(distribution, f"the {stage} fine-tune", stage_inputs.backup_dir):
                model, details = _STAGES[stage](model, stage_inputs)
        model = _complete(state, stages_dir, stage, model, inputs, seconds=time.perf_counter() - start,
                          details=details, distribution=distribution)
    if inputs.backup_dir is not None:  # the fine-tunes are over: their (emptied) checkpoint folders go
        _remove_empty_dirs(inputs.backup_dir)
    if not distribution.is_chief:
        return OptimizeResult(None, None, tuple(state["completed"]), resumed_after)

    start = time.perf_counter()
    choice = _choose_candidate(state, stages_dir, inputs)
    shipped = None if choice is None else choice.to_json() | {"seconds": round(time.perf_counter() - start, 3)}
    converted, convert_stage = _convert_stage(inputs, state, stages_dir, output_dir, choice)
    stages = [*state["completed"], convert_stage]
    keras3_model = _hand_back_keras3(inputs, state, output_dir)
    report_path = os.path.join(output_dir, "report.json")
    write_json(report_path, {"schema_version": REPORT_SCHEMA_VERSION, "config": recipe_format.plain_config(config),
                             "distribution": distribution.describe(config.batch_size),
                             "input_model": inputs.input_model(), "keras3_model": keras3_model,
                             "resumed_after": resumed_after, "loss": inputs.describe_loss(), "shipped": shipped,
                             "stages": stages})
    run_report.write_report(run_report.compute_report(output_dir, latency_runs=config.latency_runs,
                                                      parsed={"model.tflite": converted.tflite}))
    return OptimizeResult(convert_stage["artefact"], report_path, tuple(stages), resumed_after, shipped)


KERAS3_FILENAME = "model_keras3.keras"


def _hand_back_keras3(inputs: _Inputs, state: dict, output_dir: str) -> str | None:
    """For a Keras 3 input: the last pruned or clustered float model as a Keras 3 `.keras` file (weights copied
    back into the user's architecture), when the stages kept that architecture (no factorize). QAT models stay
    tf_keras (tfmot's wrappers); what ships is the `.tflite` either way."""
    if inputs.translation is None or {"factorize", "channels"} & set(inputs.config.stages):
        return None
    kept = [s for s in state["completed"] if s["stage"] in ("prune", "cluster")]
    if not kept:
        return None
    plain = _to_keras(load_model(kept[-1]["artefact"], trust_model=inputs.config.trust_model))
    handed = keras3_io.to_keras3(plain, like=inputs.source.keras_model)
    path = os.path.join(output_dir, KERAS3_FILENAME)
    with atomic_path(path) as partial:
        handed.save(partial)
    return path


def _choose_candidate(state: dict, stages_dir: str, inputs: _Inputs) -> candidates.Choice | None:
    """With QAT: the QAT model or post-training quantization of the model before it, by validation."""
    completed = state["completed"]
    if completed[-1]["stage"] != "qat" or inputs.config.mode == "float32":  # float32 quantizes nothing
        return None
    splits = candidates.Splits(inputs.x_val, inputs.y_val, inputs.evaluation,
                               split=inputs.num_train, heads=inputs.heads, eval_output=inputs.config.eval_output,
                               calibration_raw=None if inputs.stream is None else inputs.stream.calibration_raw)
    return candidates.choose(inputs.config, stages_dir, before_qat=completed[-2]["artefact"],
                             qat=completed[-1]["artefact"], splits=splits)


def _convert_stage(inputs: _Inputs, state: dict, stages_dir: str, output_dir: str,
                   choice: candidates.Choice | None):
    """Converts what ships through the gated convert stage (whichever candidate it is) into model.tflite."""
    config = inputs.config
    start = time.perf_counter()
    source, calibration_data, calibration_key, tflite = (state["completed"][-1]["artefact"],
                                                         config.calibration_data, config.calibration_key, None)
    if choice is not None:
        shipped = choice.shipped
        source, calibration_data, calibration_key = shipped.source, shipped.calibration_data, shipped.calibration_key
        tflite = shipped.tflite  # converted from these very settings: verified with the gates, not redone
    converted = run_convert(ConvertPipelineConfig(
        output_dir=os.path.join(stages_dir, "convert"), keras_model=source, trust_model=config.trust_model,
        mode=config.mode,
        calibration_data=calibration_data, calibration_key=calibration_key,
        eval_data=config.eval_data, eval_key=config.eval_key, eval_labels_key=config.eval_labels_key,
        eval_output=config.eval_output, input_scale=config.input_scale, input_offset=config.input_offset,
        num_calibration_samples=config.num_calibration_samples, data_spec=config.data_spec,
        max_accuracy_drop=config.max_accuracy_drop, seed=config.seed, target=config.target, overwrite=True,
        tflm_samples=config.tflm_samples, latency_runs=0,  # the run's own report times the final model once
    ), converted=tflite)
    low_bit = _low_bit_shipped(converted.tflite, state, choice)  # before model.tflite: a broken promise fails
    model_path = os.path.join(output_dir, "model.tflite")
    write_atomic(model_path, converted.tflite.data)
    if config.target:
        _copy_dir(os.path.join(os.path.dirname(converted.model_path), MICRO_DIRNAME),
                  os.path.join(output_dir, MICRO_DIRNAME))
    accuracy = converted.verification.accuracy
    return converted, {
        "stage": "convert", "artefact": model_path, "converted_from": source,
        "shipped": None if choice is None else choice.shipped.name, "bytes": converted.num_bytes,
        "eval_accuracy": None if accuracy is None else accuracy.tflite_accuracy,
        "accuracy_drop_vs_input_model": None if accuracy is None else accuracy.accuracy_drop,
        "weight_sparsity": converted.report["model"]["weight_sparsity"],
        # What ships: at most `cluster` values per output channel of each weight tensor.
        "distinct_values": distinct_values(converted.tflite) if config.cluster is not None else None,
        **({"low_bit_weights": low_bit} if low_bit else {}),
        "micro": converted.report.get("micro"),
        "fidelity": converted.report.get("fidelity"),
        "target_error": converted.report.get("target_error"),
        "seconds": round(time.perf_counter() - start, 3),
    }


def _low_bit_shipped(tflite, state: dict, choice: candidates.Choice | None) -> dict | None:
    """What the shipped flatbuffer holds for each low-bit layer: its most distinct int8 values per output
    channel, against what the scheme allows.

    Raises:
        VerificationError: a low-bit layer holds more values than its scheme allows, or cannot be found.
    """
    qat = state["completed"][-1]
    if "low_bit_layers" not in qat or choice is None or choice.shipped.name != "qat":
        return None
    counts = distinct_values(tflite)
    allowed = qat["max_distinct_per_channel"]
    layers, problems = {}, []
    for layer in qat["low_bit_layers"]:
        found = [value for name, value in counts.items() if f"quant_{layer}" in name.split("/")]
        if not found:
            problems.append(f"{layer}: no weight tensor of the .tflite is named after it")
            continue
        layers[layer] = max(value["max_per_channel"] for value in found)
        if layers[layer] > allowed:
            problems.append(f"{layer}: {layers[layer]} distinct values in one output channel, {qat['weights']} "
                            f"allows {allowed}")
    if problems:
        raise VerificationError(f"the int8 model does not hold the {qat['weights']} weights QAT trained: "
                                + "; ".join(problems))
    return {"weights": qat["weights"], "allowed_per_channel": allowed,
            "max_distinct_per_channel": layers, "keep_int8": qat["keep_int8"]}


# ---------------------------------------------------------------------------------------------------
# The training stages: each takes the previous stage's Keras model and returns the next one, plus the
# stage's own numbers for the report.


def _channels_stage(model, inputs: _Inputs):
    config = inputs.config
    pruned, details = channel_stage.prune_channels_stage(model, config, inputs.x_train, inputs.x_val,
                                                         inputs.y_val[_head_position(inputs)])
    _fine_tune(pruned, inputs, config.prune_epochs)
    return pruned, details


def _head_position(inputs: _Inputs) -> int:
    names = [head.name for head in inputs.heads]
    return names.index(inputs.config.eval_output) if inputs.config.eval_output in names else 0


def _factorize_stage(model, inputs: _Inputs):
    config = inputs.config
    result = inputs.factorized  # `model` is its model (made again in the strategy's scope when distributed)
    _fine_tune(model, inputs, config.factorize_epochs)
    return model, {"factorization": [dataclasses.asdict(layer) for layer in result.layers],
                   "factorized_parameters": {"before": result.params_before, "after": result.params_after}}


def _prune_stage(model, inputs: _Inputs):
    pruned = _pruned(model, inputs.config)
    _fine_tune(pruned, inputs, inputs.config.prune_epochs, callbacks=[PruningCallback()])
    return strip(pruned), {}


def _cluster_stage(model, inputs: _Inputs):
    config = inputs.config
    clustered = _clustered(model, config)
    _fine_tune(clustered, inputs, config.cluster_epochs)
    plain = strip_clustering(clustered)
    return plain, {"clusters": config.cluster, "preserve_sparsity": config.prune,
                   "distinct_values": _distinct_kernel_values(plain)}


def _qat_stage(model, inputs: _Inputs):
    config = inputs.config
    # With a --distill_from teacher the QAT fine-tune still trains on the labels: QAT is a short fine-tune of a
    # model the teacher has already shaped. --qat_distill instead makes the model QAT starts from (its own
    # float self, pruned or clustered as the earlier stages left it) the teacher of its quantized copy.
    scheme, why = _qat_scheme(model, config)
    with _expected_cqat_warnings_dropped(scheme == "cluster_preserving"):
        qat = quantize_aware(model, scheme=scheme, leave_float=config.leave_float, weights=config.qat_weights,
                             keep_int8=config.keep_int8, pow2_exponents=config.pow2_exponents)
        frozen = _freeze_batch_norm(qat) if config.qat_freeze_bn else []
        trainer = qat
        if config.qat_distill:
            trainer = Distiller(qat, model, temperature=config.distill_temperature, alpha=config.distill_alpha,
                                from_logits=inputs.losses[0].from_logits)
            trainer.compile(optimizer=keras.optimizers.Adam(config.learning_rate), metrics=["accuracy"])
        else:
            _compile(qat, inputs)
        _fit(trainer, inputs, config.qat_epochs)
    _unfreeze(qat, frozen)
    if config.qat_scheme == "cluster_preserving":
        qat = _reloadable(qat, model, config)
    details = {"scheme": scheme, **({"scheme_because": why} if why else {}), **_low_bit_details(model, config)}
    if config.qat_distill:
        details["distilled_from"] = "the model before QAT (self-distillation)"
    if config.qat_freeze_bn:
        details["frozen_batch_norm"] = frozen
    return qat, details


def _low_bit_details(model, config: OptimizeConfig) -> dict:
    if config.qat_weights == "int8":
        return {}
    low_bit, kept = low_bit_layers(model, config.keep_int8, config.leave_float)
    if not low_bit:
        raise ValueError(
            f"--qat_weights={config.qat_weights} would change no layer of {model.name}: every Conv2D, "
            "DepthwiseConv2D and Dense layer is kept at int8 or left float (the first and the last are kept by "
            "default: pass --keep_int8= (empty) to make them low-bit too). Received: keep_int8="
            f"{None if config.keep_int8 is None else list(config.keep_int8)}")
    because = ("the first weight layer and the last of each output stay int8, as the low-bit literature keeps them "
               "(TWN, XNOR-Net, DoReFa-Net)") if config.keep_int8 is None else "--keep_int8"
    return {"weights": config.qat_weights, "low_bit_layers": low_bit, "keep_int8": kept, "keep_int8_because": because,
            "max_distinct_per_channel": max_distinct(config.qat_weights, config.pow2_exponents),
            **({"pow2_exponents": config.pow2_exponents} if config.qat_weights == "pow2" else {})}


# A model that comes to QAT this sparse (pruned before, say in the user's own fit with PruningCallback) is
# fine-tuned with PQAT, which keeps its zeros; plain QAT would train them away.
SPARSE_INPUT = 0.1


def _qat_scheme(model, config: OptimizeConfig) -> tuple[str, str | None]:
    """The QAT scheme for `model`, and why when it is not the one the settings name."""
    if config.qat_scheme != "default":
        return config.qat_scheme, None
    if config.qat_weights != "int8":  # low-bit weights make their own zeros (ternary, pow2) or none (binary)
        return "default", None
    sparsity = _kernel_sparsity(model)
    if sparsity >= SPARSE_INPUT:
        return "prune_preserving", (f"the model QAT starts from is {sparsity:.1%} zeros in its kernels (pruned "
                                    "before): prune-preserving QAT keeps them")
    return "default", None


def _freeze_batch_norm(model) -> list[str]:
    """Sets every BatchNormalization (also inside tfmot's wrappers) non-trainable: tf_keras then runs it in
    inference mode, so its moving statistics stay as they were (measured: tfmot's wrapper still trains the
    scale and offset, which it tracks itself). Returns the layers' names."""
    frozen = []
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, keras.layers.BatchNormalization):
            inner.trainable = False
            frozen.append(inner.name)
    return frozen


def _unfreeze(model, names: list[str]) -> None:
    """Undoes `_freeze_batch_norm` once trained: tfmot's QuantizeWrapper lists a frozen layer's scale twice in
    its weights (measured: gamma and beta, trainable and not), which HDF5 cannot save."""
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if inner.name in names:
            inner.trainable = True


# What CQAT always says: its kernels are assigned from the trained centroids, so Keras finds no gradient for
# them ("did you forget to provide a loss?"), and tfmot notes each layer without zeros. Neither is a fault.
_CQAT_NOISE = ("Gradients do not exist for variables", "does not contain zero weights, so apply CQAT instead")


class _DropMessages(logging.Filter):
    def __init__(self, fragments=_CQAT_NOISE):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(fragment in record.getMessage() for fragment in self.fragments)


# Stage files are HDF5 on purpose (see `_complete`); tf_keras says so on every save ("legacy format") and, for a
# model compiled for the fine-tune, that its metrics are not built. Neither is a fault a person should read.
_SAVE_NOISE = ("Compiled the loaded model, but the compiled metrics have yet to be built",)


@contextlib.contextmanager
def _quiet_save():
    loggers = [logging.getLogger("tensorflow"), logging.getLogger()]
    drop = _DropMessages(_SAVE_NOISE)
    for logger in loggers:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="You are saving your model as an HDF5 file")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


@contextlib.contextmanager
def _expected_cqat_warnings_dropped(active: bool):
    # tf_keras logs through "tensorflow"; tfmot through the root logger.
    loggers = [logging.getLogger("tensorflow"), logging.getLogger()] if active else []
    drop = _DropMessages()
    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


# CQAT's extra per-layer variables; the rest of a CQAT layer's weights are those of a default-scheme one.
_CLUSTER_VARIABLES = frozenset({"cluster_centroids_tf", "ori_weights_vars_tf", "pulling_indices_tf"})


def _reloadable(cqat, stripped, config: OptimizeConfig):
    """The trained CQAT model as the same model under tfmot's default 8-bit scheme.

    tfmot cannot reload a CQAT model: its quantize configs do not serialise the cluster-preserving weight
    quantizer, so the saved file comes back with the default quantizer and fewer weights per layer. Out
    of training the two quantizers compute the same thing (the kernel, which CQAT keeps clustered, fake-
    quantized with the learned range), so the stage saves the default-scheme model with CQAT's weights.
    """
    plain = quantize_aware(stripped, scheme="default", leave_float=config.leave_float)
    for source, target in zip(cqat.layers, plain.layers):
        target.set_weights([value for weight, value in zip(source.weights, source.get_weights())
                            if weight.name.split("/")[-1].split(":")[0] not in _CLUSTER_VARIABLES])
    return plain


_STAGES = {"channels": _channels_stage, "factorize": _factorize_stage, "prune": _prune_stage, "cluster": _cluster_stage,
           "qat": _qat_stage}


def _fine_tune(model, inputs: _Inputs, epochs: int, callbacks=()) -> None:
    """Trains `model` in place: on the labels, or through a `Distiller` when there is a teacher."""
    config = inputs.config
    trainer = model
    if inputs.teacher is not None:
        trainer = Distiller(model, inputs.teacher, temperature=config.distill_temperature,
                            alpha=config.distill_alpha, from_logits=inputs.losses[0].from_logits)
        trainer.compile(optimizer=keras.optimizers.Adam(config.learning_rate), metrics=["accuracy"])
    else:
        _compile(model, inputs)
    _fit(trainer, inputs, epochs, callbacks)


def _fit(trainer, inputs: _Inputs, epochs: int, callbacks=()) -> None:
    """Every fine-tune's `fit`. On several workers BackupAndRestore lets workers restarted after one was killed
    resume the fine-tune at the epoch it reached (checkpoints in the output directory the workers share)."""
    backup = [] if inputs.backup_dir is None else [keras.callbacks.BackupAndRestore(inputs.backup_dir)]
    trainer.fit(**inputs.fit_data(), epochs=epochs, shuffle=True,
                validation_data=(inputs.x_val, inputs.targets(inputs.y_val)), callbacks=[*callbacks, *backup],
                verbose=progress.keras_verbose())


def _in_scope(model, inputs: _Inputs, distribution: distribute.Distribution, stage: str, stages_dir: str):
    """Under a strategy: the stage's model (and teacher) made again inside its scope, whose variables the
    replicas mirror, and the stage's own backup folder; without one, both as they are."""
    if not distribution.distributed:
        return model, inputs
    copies = []
    for each in (model, inputs.teacher):
        if each is None:
            copies.append(None)
            continue
        path = os.path.join(stages_dir, f".{stage}-in-scope.h5")
        try:
            with _quiet_save():
                each.save(path, include_optimizer=False)
            copies.append(_to_keras(load_model(path, trust_model=True)))  # written just now, by this run
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    backup = None if inputs.backup_dir is None else os.path.join(inputs.backup_dir, stage)
    return copies[0], dataclasses.replace(inputs, teacher=copies[1], backup_dir=backup)


# ---------------------------------------------------------------------------------------------------
# Helpers


def _check_inputs(config: OptimizeConfig) -> _Inputs:
    """Loads the model, data and teacher and tries each stage's settings on the model, writing nothing."""
    source = load_model(model_source(config.saved_model_dir, config.keras_model), trust_model=config.trust_model)
    float_model, translation = _translated(source, config.trust_model)
    names = tuple(float_model.output_names)
    if len(names) > 1 and config.distill_from is not None:
        raise ValueError(f"--distill_from distils one output's logits; {float_model.name} has {len(names)} "
                         f"outputs ({', '.join(names)}). Leave --distill_from out. Received: "
                         f"distill_from={config.distill_from!r}")
    if len(names) > 1 and config.eval_data is not None and config.eval_output is None:
        raise CalibrationDataError(
            f"The model has {len(names)} outputs ({', '.join(names)}) and the labels {config.eval_data} (key "
            f"'{config.eval_labels_key}') do not say which one they are for: pass --eval_output with one of those "
            "names."
        )
    if config.eval_output is not None and config.eval_output not in names:
        raise CalibrationDataError(
            f"--eval_output {config.eval_output!r} is not an output of the model. Expected one of: {', '.join(names)}."
        )
    *data, regression, stream = _load_data(config, float_model)
    if translation is not None:  # proven on real inputs before any training
        translation = keras3_io.check_equivalent(source.keras_model, translation, data[0], "training inputs")
    if config.qat_distill and (len(names) > 1 or any(regression) or float_model.outputs[0].shape[-1] < 2):
        raise ValueError(
            "--qat_distill distils one output of class scores (at least two classes); "
            f"{float_model.name} has {len(names)} output(s) ({', '.join(names)})"
            f"{' with regression targets' if any(regression) else ''}. Leave --qat_distill out."
        )
    if any(regression) and config.distill_from is not None:
        raise ValueError("--distill_from distils class logits; the training targets are regression targets. "
                         f"Leave --distill_from out. Received: distill_from={config.distill_from!r}")
    teacher = _load_teacher(config, float_model, data[0])
    factorized = None
    if config.factorize_energy is not None:
        factorized = factorize(float_model, energy=config.factorize_energy,
                               layers=list(config.factorize_layers) or None)
    # The later stages see the factorized layers, so their layer settings are checked against those.
    model = float_model if factorized is None else factorized.model
    if config.prune_channels is not None:
        channel_stage.check(model, config)  # something prunable, a reachable budget
    if config.prune:
        _pruned(model, config)  # checks the layers against the pruning settings; the copy is dropped
    if config.cluster is not None:
        _clustered(model, config)
    if config.qat_weights != "int8":
        _low_bit_details(model, config)  # checks keep_int8 against the layers, and that some layer is left low-bit
    losses = tuple(training_loss(float_model, config.loss, regression=r, output=i) for i, r in enumerate(regression))
    heads = tuple(candidates.Head(name, loss.regression, loss.from_logits) for name, loss in zip(names, losses))
    return _Inputs(config, *data, float_model=float_model, teacher=teacher, factorized=factorized, losses=losses,
                   heads=heads, source=source, translation=translation, stream=stream)


def _load_teacher(config: OptimizeConfig, student, x_train: np.ndarray):
    if config.distill_from is None:
        return None
    loaded = load_model(config.distill_from, trust_model=config.trust_model)
    teacher, translation = _translated(loaded, config.trust_model)
    if translation is not None:
        keras3_io.check_equivalent(loaded.keras_model, translation, x_train, "training inputs")
    # Both logits, or both probabilities (their logarithms stand in for the logits): not one of each.
    if _ends_in_softmax(teacher) != _ends_in_softmax(student):
        role, model, other = (("teacher (--distill_from)", teacher, "model to optimize") if _ends_in_softmax(teacher)
                              else ("model to optimize", student, "teacher (--distill_from)"))
        raise ValueError(
            f"Distillation compares the two models' outputs, but the {role} ends in a softmax and the {other} "
            "outputs logits. Save both with their final softmax or both without it. "
            f"Received: {role.split(' (')[0]}={model.name}"
        )
    shapes = {role: ([tuple(t.shape[1:]) for t in m.inputs], [tuple(t.shape[1:]) for t in m.outputs])
              for role, m in (("teacher", teacher), ("student", student))}
    if shapes["teacher"] != shapes["student"]:
        raise ValueError(
            f"The teacher {config.distill_from} must take the input and give the output shape of the model "
            "to optimize (one logit per class, the same classes): distill from a teacher trained on the "
            "same task. Received: "
            + ", ".join(f"{role} input shape={_shapes(i)}, {role} output shape={_shapes(o)}"
                        for role, (i, o) in shapes.items())
        )
    return teacher


def _shapes(shapes: list) -> str:
    return ", ".join(str((None, *s)) for s in shapes)


def _ends_in_softmax(model) -> bool:
    last = model.layers[-1]
    return isinstance(last, keras.layers.Softmax) or getattr(last, "activation", None) is keras.activations.softmax


def _clustered(model, config: OptimizeConfig):
    # Per tensor, as tfmot's CQAT expects; after pruning one cluster is pinned at zero to keep the zeros.
    return cluster_weights(model, int(config.cluster), preserve_sparsity=config.prune)


def _distinct_kernel_values(model) -> dict[str, int]:
    return {layer.name: int(np.unique(layer.kernel.numpy()).size) for layer in model.layers
            if getattr(layer, "kernel", None) is not None}


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
        return _checked(state)
    os.makedirs(stages_dir, exist_ok=True)
    return {"fingerprint": fingerprint, "completed": []}


def _checksum(path: str) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a stage file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest(), os.path.getsize(path)


def _damage(entry: dict) -> str | None:
    """Why a completed stage's recorded artefact cannot be resumed from (missing, truncated, changed), or None."""
    path = entry["artefact"]
    if not os.path.isfile(path):
        return "is missing"
    if "artefact_sha256" not in entry:  # recorded before stage files were checksummed: trusted as it is
        return None
    sha256, size = _checksum(path)
    if size != entry["artefact_bytes"]:
        return f"is truncated or resized ({size:,} bytes, {entry['artefact_bytes']:,} recorded)"
    if sha256 != entry["artefact_sha256"]:
        return "has changed since it was recorded (its sha256 differs)"
    return None


def _checked(state: dict) -> dict:
    """`state` with the completed stages cut at the first one whose artefact is missing, truncated or corrupt:
    that stage and every one after it run again (one log line says so)."""
    for position, entry in enumerate(state["completed"]):
        damage = _damage(entry)
        if damage is not None:
            redone = [e["stage"] for e in state["completed"][position:]]
            logging.getLogger(__name__).warning(
                "%s %s: redoing stage %s%s", entry["artefact"], damage, redone[0],
                f" and those after it ({', '.join(redone[1:])})" if len(redone) > 1 else "")
            return {**state, "completed": state["completed"][:position]}
    return state


def _resume_model(state: dict, trust_model: bool = False):
    if not state["completed"]:
        return None
    artefact = state["completed"][-1]["artefact"]
    try:
        return _to_keras(load_model(artefact, trust_model=trust_model), trust_model)
    except ModelLoadError as e:
        raise OutputPathError(f"Cannot resume from {artefact} ({e}). Pass --overwrite to start over.") from None


def _translated(model: FloatModel, trust_model: bool = False):
    """(tf_keras model, its `Translation` when it was translated from Keras 3, else None)."""
    if model.is_keras3 and model.keras_model is not None:
        translation = keras3_io.to_tf_keras(model.keras_model, stage="optimize's training stages")
        return translation.model, translation
    return _to_keras(model, trust_model), None


def _to_keras(model, trust_model: bool = False):
    if model.keras_model is not None:
        return model.keras_model
    if model.is_keras3:
        raise ModelLoadError(
            f"{model.source} is a Keras 3 model.export() SavedModel: it holds the traced graph, not the Keras "
            "layers the training-time stages (prune, cluster, QAT, factorize, distill) fine-tune. Pass the model "
            "saved as a file (model.save('model.keras'), then --keras_model=model.keras), or convert this one as "
            "it is with tfcompress convert."
        )
    loaded = None
    # tf_keras writes keras_metadata.pb beside saved_model.pb; without it there is no Keras model to load.
    if os.path.isfile(os.path.join(model.saved_model_dir, "keras_metadata.pb")):
        check_model_file(model.saved_model_dir, trust_model)  # rebuilding the Keras layers may run their code
        try:
            loaded = keras.models.load_model(model.saved_model_dir, compile=False)
        except Exception:  # a SavedModel that is not a Keras one: Keras may refuse it ...
            loaded = None
    if not isinstance(loaded, keras.Model):  # ... or hand back a bare restored object (tf.Module)
        raise ModelLoadError(
            f"{model.source} is a SavedModel that holds no Keras model, and the training-time stages "
            "(prune, cluster, QAT, factorize, distill) need one: pass the Keras model (--keras_model, or a "
            "SavedModel written by tf_keras model.save()), or convert this one as it is with tfcompress convert."
        )
    return loaded


def _pruned(model, config: OptimizeConfig):
    return prune(model, config.final_sparsity, scope=config.prune_scope, structure=config.prune_structure,
                 exclude=list(config.prune_exclude) or None)


def _load_data(config: OptimizeConfig, model):
    """The training, validation and evaluation splits, and per output whether its labels are regression targets.

    One labels array per output (`--train_labels_key=y_digit,y_parity`, in the model's output order): class
    indices for a classifier output; targets shaped like the output for a regression (an autoencoder is given
    its inputs: --train_labels_key=x_train). The evaluation labels are for one output (`--eval_output`).
    """
    shape = tuple(model.inputs[0].shape)
    if datasets.is_streamed(config.train_data, labelled=True):
        return _load_streamed(config, model)
    keys, names = config.train_labels_keys, list(model.output_names)
    if len(keys) != len(names):
        raise CalibrationDataError(
            f"--train_labels_key names {len(keys)} labels array(s) ({', '.join(keys)}) but the model has "
            f"{len(names)} output(s) ({', '.join(names)}): pass one key per output, comma-separated in that order."
        )
    ys, regression = [], []
    for i, labels_key in enumerate(keys):
        x, raw = calibration.load_labelled_data(
            config.train_data, shape, key=config.train_key, labels_key=labels_key,
            scale=config.input_scale, offset=config.input_offset, what="Training data",
            key_flags="--train_key / --train_labels_key", class_indices=False)
        if labels_key == config.train_key:  # an autoencoder: the targets are the model's inputs
            raw = x
        y, is_regression = training_targets(raw, model, f"{config.train_data} (key '{labels_key}')", output=i)
        ys.append(y)
        regression.append(is_regression)
    split = len(x) - max(1, int(round(len(x) * config.validation_fraction)))
    return (x[:split], tuple(y[:split] for y in ys), x[split:], tuple(y[split:] for y in ys),
            _load_eval(config, model), tuple(regression), None)


def _load_eval(config: OptimizeConfig, model) -> datasets.EvalData | None:
    """The evaluation data (labels of `--eval_output`): an .npz in memory, a streamed source (tree, TFRecords,
    tf.data) read batch by batch whenever a stage is scored."""
    if config.eval_data is None or not config.eval_labels_key:
        return None
    shape, names = tuple(model.inputs[0].shape), list(model.output_names)
    position = names.index(config.eval_output) if config.eval_output is not None else 0
    if datasets.is_streamed(config.eval_data, labelled=True):  # class indices of one output of class scores
        return datasets.open_eval_data(
            config.eval_data, shape, key=config.eval_key, labels_key=config.eval_labels_key,
            scale=config.input_scale, offset=config.input_offset, spec=config.data_spec,
            num_classes=max(2, int(model.outputs[position].shape[-1] or 0)))
    x_eval, raw_eval = calibration.load_labelled_data(
        config.eval_data, shape, key=config.eval_key, labels_key=config.eval_labels_key,
        scale=config.input_scale, offset=config.input_offset, class_indices=False)
    if config.eval_labels_key == config.eval_key:
        raw_eval = x_eval
    y_eval, _ = training_targets(raw_eval, model, f"{config.eval_data} (key '{config.eval_labels_key}')",
                                 output=position)
    return datasets.EvalData(x_eval, y_eval)


# Training-range samples a streamed source keeps in memory, for the stages that need inputs there (BatchNorm
# statistics of the channel stage, the int8 probes, a Keras 3 translation's check, PTQ's calibration draw).
STREAMED_TRAIN_SAMPLES = 1000


def _load_streamed(config: OptimizeConfig, model):
    """The splits of an image tree or TFRecords: validation is the index range past the training range.

    One pass checks the training range and draws `STREAMED_TRAIN_SAMPLES` of it (seeded reservoir); the validation
    range is read into memory; `fit` streams the training range again each epoch (`_Inputs.fit_data`).
    """
    shape, names = tuple(model.inputs[0].shape), list(model.output_names)
    units = int(model.outputs[0].shape[-1] or 0) if len(names) == 1 else 0
    binary = units == 1 and (output_activation(model) == "sigmoid" or config.loss == "binary_crossentropy")
    if units < 2 and not binary:
        raise CalibrationDataError(
            f"{config.train_data} is streamed with class labels (folder names or the spec's label feature), and the "
            f"model has {len(names)} output(s) ({', '.join(names)}) that are not one output of class scores (or one "
            "sigmoid unit for two classes): pass an .npz with one labels array per output."
        )
    common = dict(labelled=True, what="Training data", spec=config.data_spec, num_classes=max(2, units))
    source = datasets.open_source(config.train_data, shape, scale=config.input_scale, offset=config.input_offset,
                                  **common)
    total = source.count()
    split = total - max(1, int(round(total * config.validation_fraction)))
    raw = datasets.open_source(config.train_data, shape, **common)  # unscaled: PTQ calibration scales it again
    drawn, y_drawn, _ = datasets.reservoir_sample(raw, max(STREAMED_TRAIN_SAMPLES, config.num_calibration_samples),
                                                  config.seed, stop=split)
    x_train = calibration.preprocess(drawn, config.input_scale, config.input_offset, source=source.description)
    x_val, y_val = source.arrays(split, total)
    return (x_train, (y_drawn,), x_val, (y_val,), _load_eval(config, model), (False,),
            _Stream(source, split, total, drawn[: config.num_calibration_samples]))


def _compile(model, inputs: _Inputs) -> None:
    losses = inputs.losses
    loss, metrics = ((losses[0].keras_loss(), losses[0].metrics) if len(losses) == 1 else
                     ([each.keras_loss() for each in losses], [each.metrics for each in losses]))
    model.compile(optimizer=keras.optimizers.Adam(inputs.config.learning_rate), loss=loss, metrics=metrics)


def _predicted(model, x) -> list[np.ndarray]:
    outputs = model.predict(x, batch_size=1000, verbose=0)
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _stage_scores(model, inputs: _Inputs) -> dict:
    """A stage's numbers on validation (every output) and on the evaluation data (the labelled output)."""
    validation = candidates.score_outputs(_predicted(model, inputs.x_val), inputs.y_val, inputs.heads,
                                          inputs.config.eval_output)
    evaluation = candidates.Scores(None, None)
    if inputs.evaluation is not None:
        names = [head.name for head in inputs.heads]
        position = names.index(inputs.config.eval_output) if inputs.config.eval_output in names else 0
        outputs, labels = inputs.evaluation.collect(lambda x: _predicted(model, x)[position : position + 1])
        evaluation = candidates.score_one(outputs[0], labels, inputs.heads[position])
    scores = {"validation_accuracy": validation.accuracy, "eval_accuracy": evaluation.accuracy}
    if inputs.regression:
        scores |= {"validation_mse": validation.mse, "eval_mse": evaluation.mse}
    if validation.by_output is not None:
        scores["validation_by_output"] = validation.by_output
    return scores


def _kernel_sparsity(model) -> float:
    """Zero fraction over every kernel, also inside tfmot's QAT wrappers (which `prune.sparsity` skips)."""
    kernels = [w.numpy() for w in model.weights if w.name.split("/")[-1].startswith("kernel")]
    total = sum(k.size for k in kernels)
    return float(sum(np.sum(k == 0) for k in kernels) / total) if total else 0.0


def _complete(state, stages_dir, stage, model, inputs: _Inputs, seconds, details: dict | None = None,
              distribution: distribute.Distribution | None = None):
    """Saves the stage's model and records its numbers; returns the model the next steps use (under a
    strategy, the saved file loaded again outside its scope: measured on this process alone)."""
    # HDF5: tfmot QAT models do not reload from the .keras format (quantize_layer variables go missing).
    # Without the optimizer: every stage compiles afresh, and the slots of layers rebuilt from a config
    # (factorize) can share a name, which HDF5 refuses.
    path = os.path.join(stages_dir, f"{stage}.h5")
    with atomic_path(path) as partial, _quiet_save():  # whole or not at all: no truncated stage file
        model.save(partial, include_optimizer=False)
    sha256, size = _checksum(path)
    if distribution is not None and distribution.distributed:
        model = _to_keras(load_model(path, trust_model=True))  # written just now, by this run
    distilled = inputs.teacher is not None and stage in ("channels", "factorize", "prune", "cluster")
    state["completed"].append({
        "stage": stage, "artefact": path, "artefact_sha256": sha256, "artefact_bytes": size,
        **_stage_scores(model, inputs),
        "parameters": int(model.count_params()),
        "macs": model_macs(model),
        "nonzero_parameters": int(sum(np.count_nonzero(w) for w in model.get_weights())),
        "sparsity": _kernel_sparsity(model),
        **({"distilled_from": inputs.config.distill_from} if distilled else {}),
        **(details or {}),
        "seconds": round(seconds, 3),
    })
    write_json(os.path.join(stages_dir, STATE_FILENAME), state)
    return model
