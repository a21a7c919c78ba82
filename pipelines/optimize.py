r"""Factorize, prune, cluster and/or quantization-aware fine-tune a Keras model, then convert it to a verified
int8 TFLite model.

Example (the demo's LeNet-5, prune to 80% then PQAT):
  tfcompress optimize --saved_model_dir=artefacts/demo/float_savedmodel --train_data=data/mnist.npz \
      --eval_data=data/mnist.npz --input_scale=0.00392156862745098 --prune --final_sparsity=0.8 --qat \
      --output_dir=artefacts/optimize
Add --cluster=16 for weight sharing (kept through PCQAT), --factorize_energy=0.9 --factorize_layers=fc1 for a
low-rank fc1, --distill_from=TEACHER to fine-tune against a teacher's logits; --qat --qat_weights=ternary (or
int4, int2, binary, pow2) for low-bit kernels with int8 activations (that QAT model ships).

--prune_channels=0.5 (or =auto --target_macs=0.5) removes whole filters first, so MACs, arena and latency drop.

Stages run in this order, each when asked for: float → channels → factorize → prune → cluster → qat → convert. With
--distill_from the factorize, prune and cluster fine-tunes train through the teacher; QAT uses the labels.
Each stage leaves its model in <output_dir>/stages/ and its numbers in <output_dir>/report.json; a rerun
with the same flags resumes after the last completed stage (--overwrite starts over). The validation split
is cut from the end of --train_data. With --qat the model before QAT is also quantized post-training, and
whichever int8 model scores higher on the validation split ships (a tie ships post-training quantization;
--force_qat ships QAT regardless). Exit codes: 0 verified, 1 verification failed, 2 bad input.
"""

from __future__ import annotations

from absl import flags

from pipelines import _common
from tfcompress.runs import optimize, optimize_config
from tfcompress.targets import export

_MODEL = flags.DEFINE_string("saved_model_dir", None, "Keras SavedModel of the float model.")
_KERAS_MODEL = flags.DEFINE_string("keras_model", None, "A .keras or .h5 model, tf_keras or Keras 3 (instead of "
                                   "--saved_model_dir; a Keras 3 one is translated to tf_keras for training).")
_TRUST_MODEL = flags.DEFINE_bool("trust_model", False, "Load a model file even if it holds code (Lambda layers, "
                                  "unregistered custom layers): only for files you trust.")
_TRAIN = flags.DEFINE_string("train_data", None, "Training .npz, class-per-folder image tree or TFRecord files "
                             "(streamed through tf.data; validation is cut from its end).", required=True)
_DATA_SPEC = flags.DEFINE_string("data_spec", None, "TFRecord sources: the features holding the input and the "
                                 "label, image=KEY,label=KEY (default image=image,label=label).")
_TRAIN_KEY = flags.DEFINE_string("train_key", "x_train", "Samples array inside --train_data.")
_TRAIN_LABELS_KEY = flags.DEFINE_string("train_labels_key", "y_train", "Labels array inside --train_data; for a "
                                        "model with several outputs one per output, comma-separated in the "
                                        "model's output order (y_digit,y_parity).")
_VALIDATION = flags.DEFINE_float("validation_fraction", 0.1, "Share of --train_data held out for validation.")
_EVAL = flags.DEFINE_string("eval_data", None, "Labelled evaluation .npz, class-per-folder image tree or TFRecord "
                            "file(s) (a test split: measured only; a tree or TFRecords is streamed batch by batch).")
_EVAL_KEY = flags.DEFINE_string("eval_key", "x_test", "Samples array inside --eval_data.")
_EVAL_LABELS_KEY = flags.DEFINE_string("eval_labels_key", "y_test", "Labels array inside --eval_data.")
_EVAL_OUTPUT = flags.DEFINE_string("eval_output", None, "The output --eval_labels_key labels, when the model has "
                                   "several; it also decides which of QAT and PTQ ships (default: the mean "
                                   "over outputs on validation).")
_SCALE = flags.DEFINE_float("input_scale", 1.0, "Model input = raw * input_scale + input_offset.")
_OFFSET = flags.DEFINE_float("input_offset", 0.0, "See --input_scale.")
_PRUNE_CHANNELS = flags.DEFINE_string("prune_channels", None, "Remove whole filters first (the model really shrinks: "
                                      "MACs, arena, latency): a ratio in [0, 1) for every prunable layer, or 'auto' "
                                      "for per-layer ratios from a sensitivity analysis on the validation split that "
                                      "meet --target_macs, --target_params or --target_latency; then "
                                      "--prune_epochs of fine-tuning.")
_TARGET_MACS = flags.DEFINE_float("target_macs", None, "With --prune_channels=auto: fraction of the "
                                  "multiply-accumulates to keep, in (0, 1].")
_TARGET_PARAMS = flags.DEFINE_float("target_params", None, "With --prune_channels=auto: fraction of the Conv/Dense "
                                    "parameters to keep, in (0, 1].")
_TARGET_LATENCY = flags.DEFINE_float("target_latency", None, "With --prune_channels=auto: fraction of the int8 "
                                     "model's single-thread LiteRT latency to keep, in (0, 1] (measured).")
_CHANNEL_CRITERION = flags.DEFINE_enum("channel_criterion", "l1", ["l1", "l2", "bn_gamma"], "How channels are "
                                       "ranked: L1/L2 norm of each filter (BatchNorm scale folded in) or the "
                                       "BatchNorm |gamma|.")
_CHANNEL_MULTIPLE = flags.DEFINE_integer("channel_multiple", 8, "With --prune_channels: each layer keeps a multiple "
                                         "of this many channels (the counts XNNPACK and CMSIS-NN run fastest on; 1 "
                                         "for exact ratios).", lower_bound=1)
_FACTORIZE_ENERGY = flags.DEFINE_float("factorize_energy", None, "Replace Dense and 1x1 Conv2D kernels by "
                                       "two low-rank factors keeping this fraction of the squared singular "
                                       "values, in (0, 1] (first stage).")
_FACTORIZE_LAYERS = flags.DEFINE_list("factorize_layers", [], "Layers to factorize (default: every Dense and "
                                      "1x1, stride-1 Conv2D).")
_FACTORIZE_EPOCHS = flags.DEFINE_integer("factorize_epochs", 1, "Epochs of the fine-tune after factorizing.",
                                         lower_bound=1)
_PRUNE = flags.DEFINE_bool("prune", False, "Run the pruning fine-tune stage.")
_SPARSITY = flags.DEFINE_float("final_sparsity", 0.8, "Target fraction of zero weights.", lower_bound=0.0,
                               upper_bound=0.99)
_SCOPE = flags.DEFINE_enum("prune_scope", "local", ["local", "global"], "Per-layer or one global threshold.")
_STRUCTURE = flags.DEFINE_enum("prune_structure", None, ["2:4"], "Structured sparsity pattern.")
_PRUNE_EXCLUDE = flags.DEFINE_list("prune_exclude", [], "Layers not to prune (e.g. a first conv with fewer "
                                    "than 4 input channels under --prune_structure=2:4).")
_PRUNE_EPOCHS = flags.DEFINE_integer("prune_epochs", 2, "Epochs of the pruning fine-tune.", lower_bound=1)
_CLUSTER = flags.DEFINE_integer("cluster", None, "Cluster every kernel to this many distinct values, in "
                                "[2, 256] (after --prune: keeping the zeros, at least 3), then fine-tune.")
_CLUSTER_EPOCHS = flags.DEFINE_integer("cluster_epochs", 1, "Epochs of the clustering fine-tune.",
                                       lower_bound=1)
_QAT = flags.DEFINE_bool("qat", False, "Run quantization-aware fine-tuning (prune-preserving after --prune, "
                         "cluster-preserving after --cluster).")
_QAT_EPOCHS = flags.DEFINE_integer("qat_epochs", 1, "Epochs of QAT.", lower_bound=1)
_FORCE_QAT = flags.DEFINE_bool("force_qat", False, "Ship the QAT model even where post-training quantization "
                               "of the model before QAT scores higher on validation (needs --qat).")
_QAT_DISTILL = flags.DEFINE_bool("qat_distill", False, "Distil the QAT fine-tune from the model QAT starts from "
                                 "(its own float self; --distill_temperature and --distill_alpha apply).")
_QAT_FREEZE_BN = flags.DEFINE_bool("qat_freeze_bn", False, "Keep BatchNormalization moving statistics fixed "
                                   "during QAT (inference-mode normalization; scale and offset still train).")
_LEAVE_FLOAT = flags.DEFINE_list("leave_float", [], "Layers tfmot cannot quantize to keep float during QAT; "
                                  "the model is then not full-integer and int8 conversion refuses it: pick "
                                  "another --mode (dynamic, float16) to convert it anyway.")
_QAT_WEIGHTS = flags.DEFINE_enum("qat_weights", "int8", ["int8", "int4", "int2", "ternary", "binary", "pow2"],
                                 "Kernel values in QAT and in the shipped int8 model (activations stay int8): int4/"
                                 "int2 linear, ternary (TWN), binary, pow2 (powers of two); needs --qat.")
_KEEP_INT8 = flags.DEFINE_list("keep_int8", None, "Layers that keep int8 weights under low-bit --qat_weights "
                               "(default: the first and the last weight layers; pass an empty value for none).")
_POW2_EXPONENTS = flags.DEFINE_integer("pow2_exponents", 4, "Powers of two per channel for --qat_weights=pow2 "
                                       "(1-7: at most 2k+1 values).")
_DISTILL_FROM = flags.DEFINE_string("distill_from", None, "Teacher (SavedModel dir or .keras/.h5, outputs "
                                    "logits) to distill from in the factorize, prune and cluster fine-tunes.")
_TEMPERATURE = flags.DEFINE_float("distill_temperature", 4.0, "Softmax temperature of the distillation loss.")
_ALPHA = flags.DEFINE_float("distill_alpha", 0.1, "Weight of the label loss; 1 - alpha goes to the teacher's.")
_MODE = flags.DEFINE_enum("mode", "int8", ["int8", "int16x8", "dynamic", "float16", "float32"],
                          "Mode of the final conversion.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Fine-tuning batch size.", lower_bound=1)
_LR = flags.DEFINE_float("learning_rate", 5e-4, "Adam learning rate of the fine-tunes.", lower_bound=0.0)
_LOSS = flags.DEFINE_enum("loss", "auto", list(optimize_config.LOSSES), "Fine-tuning loss; 'auto' picks it "
                          "from the model's output (softmax or logits: sparse categorical, sigmoid: binary), and "
                          "from_logits follows the output activation.")
_CALIBRATION = flags.DEFINE_string("calibration_data", None, "Calibration samples for the final conversion "
                                   "(needed without --qat; with --qat they calibrate the post-training "
                                   "candidate, else it draws --num_calibration_samples from the training split).")
_CALIBRATION_KEY = flags.DEFINE_string("calibration_key", None, "Array name inside a calibration .npz.")
_NUM_CALIBRATION = flags.DEFINE_integer("num_calibration_samples", 500, "Calibration samples to draw.",
                                        lower_bound=1)
_MAX_DROP = flags.DEFINE_float("max_accuracy_drop", 0.01, "Largest allowed int8 accuracy drop against the "
                               "fine-tuned float model, a fraction.", lower_bound=0.0, upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the fine-tunes and the calibration draw.")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where stages, model.tflite and report.json go.",
                              required=True)
_TARGET = flags.DEFINE_enum("target", None, ["micro"], "Also export the final model for microcontrollers "
                            "(checked in TFLite Micro) into <output_dir>/micro/.")
_LATENCY_RUNS = flags.DEFINE_integer("latency_runs", 200, "Single-thread invokes of the final model timed for "
                                     "report.md (fresh process); 0 skips.", lower_bound=0)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start over instead of resuming.")
_STRATEGY = flags.DEFINE_enum("strategy", "none", ["none", "mirrored", "multi_worker"], "Where the fine-tunes "
                              "train: this process, every local device (mirrored), or the workers of a cluster "
                              "(multi_worker, from TF_CONFIG or --cluster_resolver); --batch_size is the global batch.")
_CLUSTER_RESOLVER = flags.DEFINE_enum("cluster_resolver", "tf_config", ["tf_config", "slurm"], "With "
                                      "--strategy=multi_worker: the cluster from TF_CONFIG or from the Slurm job step.")
_TFLM_SAMPLES = flags.DEFINE_string("tflm_samples", str(export.DEFAULT_TFLM_SAMPLES), "With --target=micro: "
                                    "samples the TFLM check runs, N drawn with --seed, or 'all'.")


def main(argv: list[str]) -> None:
    del argv
    result = optimize.run_optimize(optimize.OptimizeConfig(
        output_dir=_OUTPUT.value, train_data=_TRAIN.value, saved_model_dir=_MODEL.value,
        keras_model=_KERAS_MODEL.value, trust_model=_TRUST_MODEL.value, train_key=_TRAIN_KEY.value,
        train_labels_key=_TRAIN_LABELS_KEY.value,
        validation_fraction=_VALIDATION.value, eval_data=_EVAL.value, eval_key=_EVAL_KEY.value,
        eval_labels_key=_EVAL_LABELS_KEY.value, eval_output=_EVAL_OUTPUT.value, input_scale=_SCALE.value,
        input_offset=_OFFSET.value,
        prune_channels=_PRUNE_CHANNELS.value, target_macs=_TARGET_MACS.value, target_params=_TARGET_PARAMS.value,
        target_latency=_TARGET_LATENCY.value, channel_criterion=_CHANNEL_CRITERION.value,
        channel_multiple=_CHANNEL_MULTIPLE.value,
        factorize_energy=_FACTORIZE_ENERGY.value, factorize_layers=tuple(_FACTORIZE_LAYERS.value),
        factorize_epochs=_FACTORIZE_EPOCHS.value, prune=_PRUNE.value, final_sparsity=_SPARSITY.value,
        prune_scope=_SCOPE.value, prune_structure=_STRUCTURE.value, prune_exclude=tuple(_PRUNE_EXCLUDE.value),
        prune_epochs=_PRUNE_EPOCHS.value, cluster=_CLUSTER.value, cluster_epochs=_CLUSTER_EPOCHS.value,
        qat=_QAT.value, qat_epochs=_QAT_EPOCHS.value, force_qat=_FORCE_QAT.value,
        qat_weights=_QAT_WEIGHTS.value, pow2_exponents=_POW2_EXPONENTS.value,
        keep_int8=None if _KEEP_INT8.value is None else tuple(_KEEP_INT8.value),
        qat_distill=_QAT_DISTILL.value, qat_freeze_bn=_QAT_FREEZE_BN.value,
        leave_float=tuple(_LEAVE_FLOAT.value),
        distill_from=_DISTILL_FROM.value, distill_temperature=_TEMPERATURE.value, distill_alpha=_ALPHA.value,
        mode=_MODE.value,
        batch_size=_BATCH.value, learning_rate=_LR.value, loss=_LOSS.value,
        calibration_data=_CALIBRATION.value, calibration_key=_CALIBRATION_KEY.value, data_spec=_DATA_SPEC.value,
        num_calibration_samples=_NUM_CALIBRATION.value, max_accuracy_drop=_MAX_DROP.value,
        seed=_SEED.value, target=_TARGET.value, latency_runs=_LATENCY_RUNS.value, overwrite=_OVERWRITE.value,
        tflm_samples=export.parse_tflm_samples(_TFLM_SAMPLES.value),
        strategy=_STRATEGY.value, cluster_resolver=_CLUSTER_RESOLVER.value,
    ))
    if result.resumed_after:
        print(f"resumed after stage {result.resumed_after}")
    for stage in result.stages:
        acc, zeros = stage.get("eval_accuracy"), stage.get("sparsity")
        macs = stage.get("macs")
        print(f"  {stage['stage']:<9} MACs {'-' if macs is None else f'{macs:,}'}  "
              f"eval accuracy {'-' if acc is None else f'{acc:.4f}'}  "
              f"sparsity {'-' if zeros is None else f'{zeros:.3f}'}  {stage['seconds']:.1f} s")
    if result.model_path is None:
        print("trained as a worker; the chief writes the model and the report")
        return
    if result.shipped:
        print(f"shipped {result.shipped['candidate']}: {result.shipped['reason']}")
    print(f"verified {result.model_path}; report {result.report_path}")


if __name__ == "__main__":
    _common.run(main)
