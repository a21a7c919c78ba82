"""The optimize pipeline's settings: `OptimizeConfig`, validated when built, and its resume fingerprint.

Field names equal the flags of `pipelines/optimize.py`; accuracies and sparsities are fractions in [0, 1].
`tfcompress.runs.optimize` runs the stages this config asks for.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers

import numpy as np

from tfcompress.conversion.datasets import parse_data_spec
from tfcompress.training.cluster import MAX_CLUSTERS, MIN_CLUSTERS
from tfcompress.core.model_io import model_source
from tfcompress.runs.pipeline import check_target
from tfcompress.runs import recipe_format
from tfcompress.targets.export import DEFAULT_TFLM_SAMPLES, check_tflm_samples
from tfcompress.training.distribute import check_names
from tfcompress.training.losses import LOSSES


# The training stages in the order they run (each only when its setting asks for it).
TRAINING_STAGES = ("channels", "factorize", "prune", "cluster", "qat")
CHANNEL_CRITERIA = ("l1", "l2", "bn_gamma")  # tfcompress.training.channel_prune.CRITERIA
QAT_WEIGHTS = ("int8", "int4", "int2", "ternary", "binary", "pow2")  # tfcompress.training.lowbit.Weights


@dataclasses.dataclass(frozen=True)
class OptimizeConfig:
    """Field names equal the flags; accuracies and sparsities are fractions in [0, 1].

    From the API, `train_data` and `eval_data` may also be a `tf.data.Dataset` of `(input, label)` pairs, and
    `calibration_data` one of inputs: streamed like TFRecord files (`fit` reads the training range through
    `tf.data`), and recorded as `<tf.data.Dataset>` in `recipe.yaml`, `report.json` and the resume fingerprint, so
    a rerun in the same `output_dir` with another dataset resumes as if it were the same: pass `overwrite`.
    """

    output_dir: str
    train_data: str
    saved_model_dir: str | None = None
    keras_model: str | None = None
    trust_model: bool = False  # load model files that hold code (Lambda, unregistered custom layers)
    train_key: str = "x_train"
    train_labels_key: str = "y_train"
    validation_fraction: float = 0.1
    eval_data: str | None = None
    eval_key: str = "x_test"
    eval_labels_key: str = "y_test"
    eval_output: str | None = None
    """The output `eval_labels_key` labels when the model has several; it also decides which QAT/PTQ candidate
    ships. Without it a multi-output model's candidates are scored on the mean over its outputs."""
    input_scale: float = 1.0
    input_offset: float = 0.0
    prune_channels: float | str | None = None
    """Channel pruning first: a ratio in [0, 1) for every prunable layer, or "auto" (per-layer ratios from a
    sensitivity analysis on the validation split that meet `target_macs`, `target_params` or `target_latency`)."""
    target_macs: float | None = None
    """With prune_channels="auto": the fraction of the multiply-accumulates to keep, in (0, 1]."""
    target_params: float | None = None
    """With prune_channels="auto": the fraction of the Conv/Dense parameters to keep, in (0, 1]."""
    target_latency: float | None = None
    """With prune_channels="auto": the fraction of the int8 model's single-thread LiteRT latency to keep, measured."""
    channel_criterion: str = "l1"
    channel_multiple: int = 8
    """Kept channels are rounded up to a multiple of this: the channel counts XNNPACK's and CMSIS-NN's kernels run
    fastest on (1 keeps ratios exact; a group smaller than it stays whole)."""
    factorize_energy: float | None = None
    factorize_layers: tuple[str, ...] = ()
    factorize_epochs: int = 1
    prune: bool = False
    final_sparsity: float = 0.8
    prune_scope: str = "local"
    prune_structure: str | None = None
    prune_exclude: tuple[str, ...] = ()
    prune_epochs: int = 2
    cluster: int | None = None
    cluster_epochs: int = 1
    qat: bool = False
    qat_epochs: int = 1
    force_qat: bool = False
    qat_distill: bool = False
    """The QAT fine-tune distils from the model QAT starts from (its own float self) through `Distiller`."""
    qat_freeze_bn: bool = False
    """BatchNormalization layers normalize with the moving statistics the earlier stages left (inference mode)
    during QAT, and keep them; their scale and offset still train."""
    leave_float: tuple[str, ...] = ()
    qat_weights: str = "int8"
    """The kernels' values in QAT and in the shipped model: int8, int4, int2, ternary, binary or pow2
    (`tfcompress.quantize_aware`'s `weights`); activations stay int8."""
    keep_int8: tuple[str, ...] | None = None
    """Layers that keep int8 weights under low-bit `qat_weights`; None: the first and the last."""
    pow2_exponents: int = 4
    """Exponents per channel for `qat_weights="pow2"` (1-7)."""
    distill_from: str | None = None
    distill_temperature: float = 4.0
    distill_alpha: float = 0.1
    mode: str = "int8"
    batch_size: int = 128
    learning_rate: float = 5e-4
    loss: str = "auto"
    calibration_data: str | None = None
    calibration_key: str | None = None
    # TFRecord sources: the features holding the input and the label ("image=KEY,label=KEY")
    data_spec: str | None = None
    num_calibration_samples: int = 500
    max_accuracy_drop: float = 0.01
    seed: int = 0
    target: str | None = None
    latency_runs: int = 200
    overwrite: bool = False
    tflm_samples: int | None = DEFAULT_TFLM_SAMPLES  # the TFLM check of --target micro; None: every sample
    strategy: str = "none"
    """Where the fine-tunes train: "none" (this process), "mirrored" (every local device) or "multi_worker"
    (the workers of the cluster `cluster_resolver` describes); `batch_size` is the global batch either way."""
    cluster_resolver: str = "tf_config"
    """With strategy="multi_worker": the cluster from TF_CONFIG ("tf_config") or from the Slurm job ("slurm")."""

    def __post_init__(self):
        model_source(self.saved_model_dir, self.keras_model)
        check_tflm_samples(self.tflm_samples)
        check_names(self.strategy, self.cluster_resolver)
        if self.strategy == "multi_worker" and self.target_latency is not None:
            raise ValueError("--target_latency chooses the channels by timing the model on this machine, and each "
                             "worker would time it differently and prune other channels: use --target_macs or "
                             "--target_params with --strategy=multi_worker, or find the ratios on one machine first. "
                             f"Received: target_latency={self.target_latency}, strategy='multi_worker'")
        parse_data_spec(self.data_spec)
        if self.loss not in LOSSES:
            raise ValueError(
                f"loss is one of {', '.join(LOSSES)} ('auto' picks from the model's output: softmax or "
                f"logits → sparse categorical, sigmoid → binary, regression targets → mean squared error). "
                f"Received: loss={self.loss!r}"
            )
        check_target(self.target, self.mode)
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(
                "validation_fraction is the share of the training data held out, in (0, 1). "
                f"Received: validation_fraction={self.validation_fraction}"
            )
        for name in ("factorize_epochs", "prune_epochs", "cluster_epochs", "qat_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1. Received: {name}={getattr(self, name)}")
        self._check_channels()
        if not (self.prune_channels is not None or self.factorize_energy is not None or self.prune
                or self.cluster is not None or self.qat):
            raise ValueError(
                "Nothing to optimize: pass --prune_channels, --factorize_energy, --prune, --cluster and/or --qat "
                "(for post-training quantization alone use tfcompress convert). Received: prune_channels=None, "
                "factorize_energy=None, prune=False, cluster=None, qat=False"
            )
        if self.force_qat and not self.qat:
            raise ValueError(
                "force_qat ships the QAT model even where post-training quantization scores higher on "
                "validation, so it needs --qat: pass --qat as well, or leave --force_qat out. "
                "Received: force_qat=True, qat=False"
            )
        for name in ("qat_distill", "qat_freeze_bn"):
            if getattr(self, name) and not self.qat:
                raise ValueError(f"{name} changes the QAT fine-tune, so it needs --qat: pass --qat as well, or "
                                 f"leave --{name} out. Received: {name}=True, qat=False")
        self._check_low_bit()
        self._check_factorize()
        self._check_cluster()
        self._check_distill()

    def _check_channels(self) -> None:
        targets = {name: getattr(self, name) for name in ("target_macs", "target_params", "target_latency")}
        for name, value in targets.items():
            if value is not None and (_not_real(value) or not 0.0 < value <= 1.0):
                raise ValueError(f"{name} is the fraction to keep, in (0, 1]; 0.5 halves it. Received: {name}={value}")
        if isinstance(self.channel_multiple, bool) or not isinstance(self.channel_multiple, int) or \
                self.channel_multiple < 1:
            raise ValueError("channel_multiple is a positive whole number of channels (8 suits XNNPACK and CMSIS-NN, "
                             f"1 keeps ratios exact). Received: channel_multiple={self.channel_multiple!r}")
        if self.channel_criterion not in CHANNEL_CRITERIA:
            raise ValueError(f"channel_criterion is one of {', '.join(CHANNEL_CRITERIA)}. "
                             f"Received: channel_criterion={self.channel_criterion!r}")
        value = self.prune_channels
        given = {k: v for k, v in targets.items() if v is not None}
        if value is None or value == "":
            object.__setattr__(self, "prune_channels", None)
            if given:
                raise ValueError(f"{', '.join(given)} sets the budget of --prune_channels=auto; pass "
                                 f"--prune_channels=auto as well. Received: prune_channels=None, "
                                 + ", ".join(f"{k}={v}" for k, v in given.items()))
            return
        if value != "auto":
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = None
            if value is None or not 0.0 <= value < 1.0:
                raise ValueError("prune_channels is the fraction of each layer's channels to remove, in [0, 1) "
                                 "(0.5 removes half), or 'auto' with a budget (--target_macs, --target_params or "
                                 f"--target_latency). Received: prune_channels={self.prune_channels!r}")
            object.__setattr__(self, "prune_channels", value)
            if given:
                raise ValueError(f"A fixed --prune_channels={value} takes no budget; {', '.join(given)} is for "
                                 "--prune_channels=auto. Drop one of them. Received: prune_channels="
                                 f"{value}, " + ", ".join(f"{k}={v}" for k, v in given.items()))
        elif not given:
            raise ValueError("prune_channels='auto' chooses per-layer ratios to meet a budget: pass --target_macs, "
                             "--target_params or --target_latency (fractions to keep, e.g. 0.5). Received: "
                             "prune_channels='auto'")
        elif self.target_latency is not None and len(given) > 1:
            raise ValueError("--target_latency is measured and searched on its own; combine it with neither "
                             "--target_macs nor --target_params. Received: "
                             + ", ".join(f"{k}={v}" for k, v in given.items()))
        if self.factorize_energy is not None:
            raise ValueError("--prune_channels and --factorize_energy both reshape the layers, and the factorize "
                             "stage starts from the float model: run them in two optimize runs, or drop one. "
                             f"Received: prune_channels={self.prune_channels!r}, "
                             f"factorize_energy={self.factorize_energy}")

    def _check_low_bit(self) -> None:
        if self.qat_weights not in QAT_WEIGHTS:
            raise ValueError(f"qat_weights is one of {', '.join(QAT_WEIGHTS)}. "
                             f"Received: qat_weights={self.qat_weights!r}")
        if isinstance(self.pow2_exponents, bool) or not isinstance(self.pow2_exponents, int) \
                or not 1 <= self.pow2_exponents <= 7:
            raise ValueError("pow2_exponents is the number of powers of two per channel, an integer in [1, 7] (an "
                             f"int8 weight holds 127, 64, ..., 1). Received: pow2_exponents={self.pow2_exponents!r}")
        low_bit = self.qat_weights != "int8"
        if low_bit and not self.qat:
            raise ValueError(f"qat_weights={self.qat_weights} trains low-bit weights in the QAT fine-tune, so it "
                             f"needs --qat: pass --qat as well. Received: qat_weights={self.qat_weights!r}, qat=False")
        if low_bit and (self.prune or self.cluster is not None):
            raise ValueError(
                f"qat_weights={self.qat_weights} replaces every kernel value by the scheme's few values, which "
                "keeps neither a pruned kernel's zeros nor its clusters: drop --prune/--cluster (ternary and pow2 "
                "weights are partly zero by themselves), or keep --qat_weights=int8. Received: "
                f"qat_weights={self.qat_weights!r}, prune={self.prune}, cluster={self.cluster}")
        if self.keep_int8 is not None and not low_bit:
            raise ValueError("keep_int8 names the layers that stay int8 among low-bit ones, so it needs "
                             "--qat_weights=int4|int2|ternary|binary|pow2. Received: "
                             f"keep_int8={list(self.keep_int8)}, qat_weights='int8'")

    def _check_factorize(self) -> None:
        energy = self.factorize_energy
        if energy is not None and (_not_real(energy) or not 0.0 < energy <= 1.0):
            raise ValueError(
                "factorize_energy is the fraction of each kernel's squared singular values to keep, in "
                f"(0, 1]; 0.9 is typical. Received: factorize_energy={energy}"
            )
        if self.factorize_layers and energy is None:
            raise ValueError(
                "factorize_layers chooses the layers of the factorize stage, which runs only with "
                "--factorize_energy. Pass --factorize_energy=0.9 (say) as well. "
                f"Received: factorize_layers={list(self.factorize_layers)}, factorize_energy=None"
            )

    def _check_cluster(self) -> None:
        if self.cluster is None:
            return
        low, high = MIN_CLUSTERS, MAX_CLUSTERS
        if not isinstance(self.cluster, (int, np.integer)) or isinstance(self.cluster, bool) or not (
            low <= self.cluster <= high
        ):
            raise ValueError(
                f"cluster is the number of distinct weight values per kernel, an integer in [{low}, {high}] "
                "(int8 weights hold at most 256 values); 16 is typical. "
                f"Received: cluster={self.cluster}"
            )
        if self.prune and self.cluster < 3:
            raise ValueError(
                "After --prune, clustering keeps the zeros by pinning one of the clusters at zero, so it "
                f"needs --cluster=3 or more. Received: cluster={self.cluster}, prune=True"
            )

    def _check_distill(self) -> None:
        t, alpha = self.distill_temperature, self.distill_alpha
        if _not_real(t) or not t > 0:
            raise ValueError(
                "distill_temperature divides the logits before the softmax, so it must be positive (2 to 8 "
                f"is typical). Received: distill_temperature={t}"
            )
        if _not_real(alpha) or not 0.0 <= alpha <= 1.0:
            raise ValueError(
                "distill_alpha weighs the label loss against the teacher's, a fraction in [0, 1] (0.1 is "
                f"typical). Received: distill_alpha={alpha}"
            )
        if self.distill_from is not None and self.factorize_energy is None and not self.prune \
                and self.cluster is None and self.prune_channels is None:
            raise ValueError(
                "--distill_from trains the channel, factorize, prune and cluster fine-tunes through the teacher; "
                "QAT trains on the labels alone, so with only --qat the teacher would go unused. Add one of "
                "--prune_channels, --factorize_energy, --prune, --cluster, or leave --distill_from out. "
                f"Received: distill_from={self.distill_from!r}"
            )

    def fingerprint(self) -> str:
        """Identifies the settings the training stages' artefacts were made with.

        Options of the final conversion and of measurement only (mode, calibration, evaluation, the
        accuracy gate, which candidate ships) are left out: changing them reruns just the candidates and the
        convert stage. So are the settings of stages that do not run (a `cluster_epochs` without `cluster`),
        which also keeps the fingerprints of runs made before those stages existed.
        """
        values = recipe_format.plain_config(self) | {"leave_float": sorted(self.leave_float),
                                             "prune_exclude": sorted(self.prune_exclude),
                                             "factorize_layers": sorted(self.factorize_layers)}
        if self.loss == "auto":  # the default: fingerprints of runs made before --loss existed still match
            values.pop("loss")
        values.pop("trust_model")  # says whether files may be loaded, not how stages are made
        # Where the fine-tunes run, not what they compute (the batch is global): a run may resume on more workers.
        values.pop("strategy")
        values.pop("cluster_resolver")
        if self.data_spec is None:  # the default: runs made before streamed sources existed still match
            values.pop("data_spec")
        for name in ("qat_distill", "qat_freeze_bn"):  # likewise for the QAT options, when off
            if not values[name]:
                values.pop(name)
        if self.qat_weights == "int8":  # the default: runs made before low-bit weights existed still match
            for name in ("qat_weights", "keep_int8", "pow2_exponents"):
                values.pop(name)
        elif self.qat_weights != "pow2":
            values.pop("pow2_exponents")
        if values.get("keep_int8") is not None:
            values["keep_int8"] = sorted(values["keep_int8"])
        for name in ("output_dir", "overwrite", "mode", "target", "latency_runs", "max_accuracy_drop",
                     "calibration_data", "calibration_key", "num_calibration_samples", "eval_data", "eval_key",
                     "eval_labels_key", "eval_output", "force_qat", "tflm_samples"):
            values.pop(name)
        unused = {"prune_channels": ("prune_channels", "target_macs", "target_params", "target_latency",
                                     "channel_criterion", "channel_multiple"),
                  "factorize_energy": ("factorize_energy", "factorize_layers", "factorize_epochs"),
                  "cluster": ("cluster", "cluster_epochs"),
                  "distill_from": ("distill_from", "distill_temperature", "distill_alpha")}
        for setting, names in unused.items():
            if getattr(self, setting) is None:
                for name in names:
                    values.pop(name)
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def train_labels_keys(self) -> tuple[str, ...]:
        """`train_labels_key` split at commas: one labels array per model output, in the outputs' order."""
        return tuple(key.strip() for key in self.train_labels_key.split(","))

    @property
    def stages(self) -> tuple[str, ...]:
        """The training stages this config runs, in order (a subset of `TRAINING_STAGES`)."""
        wanted = {"channels": self.prune_channels is not None,
                  "factorize": self.factorize_energy is not None, "prune": self.prune,
                  "cluster": self.cluster is not None, "qat": self.qat}
        return tuple(stage for stage in TRAINING_STAGES if wanted[stage])

    @property
    def qat_scheme(self) -> str:
        """CQAT (PCQAT after pruning) after clustering, PQAT after pruning alone, else plain QAT."""
        if self.cluster is not None:
            return "cluster_preserving"
        return "prune_preserving" if self.prune else "default"


def _not_real(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, numbers.Real)
