r"""Prune each layer alone at each ratio and measure the model on the validation split, without fine-tuning.

Example (the demo's LeNet-5):
  tfcompress sensitivity --saved_model_dir=artefacts/demo/float_savedmodel --train_data=data/mnist.npz \
      --input_scale=0.00392156862745098 --target_macs=0.5 --output_dir=artefacts/sensitivity

For every prunable channel group (whole channels removed as `tfcompress.prune_channels` removes them, with their
means folded into the next layer and BatchNorm statistics re-measured) and every Conv/Dense kernel (unstructured,
smallest |w| first), at each of --ratios: the validation accuracy (class labels) or mean squared error
(regression targets). The validation split is the last --validation_fraction of --train_data, cut as `optimize`
cuts it; no test split is read. With --target_macs or --target_params, also the per-layer channel ratios that meet
the budget (what `optimize --prune_channels=auto` would use). Writes sensitivity.json, sensitivity.md and
sensitivity.png to --output_dir. Exit codes: 0 success; 2 bad arguments or input (nothing is written).
"""

from __future__ import annotations

from absl import flags

from pipelines import _common
from tfcompress.runs import sensitivity_run

_MODEL = flags.DEFINE_string("saved_model_dir", None, "Keras SavedModel of the float model.")
_KERAS_MODEL = flags.DEFINE_string("keras_model", None, "A .keras or .h5 model, tf_keras or Keras 3 (instead of "
                                   "--saved_model_dir).")
_TRUST_MODEL = flags.DEFINE_bool("trust_model", False, "Load a model file even if it holds code (Lambda layers, "
                                  "unregistered custom layers): only for files you trust.")
_TRAIN = flags.DEFINE_string("train_data", None, "Training .npz, class-per-folder image tree or TFRecord "
                             "file(s); the validation split is cut from its end (only that range is read from a tree "
                             "or TFRecords).",
                             required=True)
_TRAIN_KEY = flags.DEFINE_string("train_key", "x_train", "Samples array inside --train_data.")
_TRAIN_LABELS_KEY = flags.DEFINE_string("train_labels_key", "y_train", "Labels array inside --train_data (class "
                                        "indices, or regression targets; an autoencoder: the --train_key itself).")
_DATA_SPEC = flags.DEFINE_string("data_spec", None, "TFRecord sources: the features holding the input and the "
                                 "label, image=KEY,label=KEY (default image=image,label=label).")
_VALIDATION = flags.DEFINE_float("validation_fraction", 0.1, "Share of --train_data held out for validation.")
_EVAL_OUTPUT = flags.DEFINE_string("eval_output", None, "The output measured, for a model with several "
                                   "(default: the first); --train_labels_key labels it.")
_SCALE = flags.DEFINE_float("input_scale", 1.0, "Model input = raw * input_scale + input_offset.")
_OFFSET = flags.DEFINE_float("input_offset", 0.0, "See --input_scale.")
_RATIOS = flags.DEFINE_list("ratios", [str(r) for r in sensitivity_run.sens.DEFAULT_RATIOS],
                            "Fractions pruned, each in (0, 1).")
_KINDS = flags.DEFINE_list("kinds", list(sensitivity_run.sens.KINDS), "channel and/or unstructured.")
_CRITERION = flags.DEFINE_enum("channel_criterion", "l1", ["l1", "l2", "bn_gamma"], "How channels are ranked.")
_CHANNEL_MULTIPLE = flags.DEFINE_integer("channel_multiple", 8, "Channels are removed so that a multiple of this "
                                         "many stay (as optimize --channel_multiple).", lower_bound=1)
_TARGET_MACS = flags.DEFINE_float("target_macs", None, "Also solve per-layer channel ratios that keep this "
                                  "fraction of the MACs, in (0, 1].")
_TARGET_PARAMS = flags.DEFINE_float("target_params", None, "Also solve per-layer channel ratios that keep this "
                                    "fraction of the Conv/Dense parameters, in (0, 1].")
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where sensitivity.{json,md,png} go.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing sensitivity files.")


def _floats(values: list[str]) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in values)
    except ValueError:
        raise ValueError("ratios are numbers in (0, 1), comma-separated. "
                         f"Received: ratios={','.join(values)}") from None


def main(argv: list[str]) -> None:
    del argv
    run = sensitivity_run.run_sensitivity(sensitivity_run.SensitivityConfig(
        output_dir=_OUTPUT.value, train_data=_TRAIN.value, saved_model_dir=_MODEL.value,
        keras_model=_KERAS_MODEL.value, trust_model=_TRUST_MODEL.value, train_key=_TRAIN_KEY.value,
        train_labels_key=_TRAIN_LABELS_KEY.value, data_spec=_DATA_SPEC.value, validation_fraction=_VALIDATION.value,
        eval_output=_EVAL_OUTPUT.value, input_scale=_SCALE.value, input_offset=_OFFSET.value,
        ratios=_floats(_RATIOS.value), kinds=tuple(_KINDS.value), channel_criterion=_CRITERION.value,
        channel_multiple=_CHANNEL_MULTIPLE.value,
        target_macs=_TARGET_MACS.value, target_params=_TARGET_PARAMS.value, overwrite=_OVERWRITE.value,
    ))
    print(sensitivity_run.render(run.result, run.solution), end="")
    print(f"wrote {run.json_path}")


if __name__ == "__main__":
    _common.run(main)
