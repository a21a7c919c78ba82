r"""Search for the smallest verified model that meets an accuracy tolerance and device budgets.

Example (the demo's LeNet-5, for a microcontroller with 64 KiB of flash for the model):
  tfcompress auto --saved_model_dir=artefacts/demo/float_savedmodel --train_data=data/mnist.npz \
      --eval_data=data/mnist.npz --input_scale=0.00392156862745098 --max_accuracy_drop=0.003 \
      --max_flash_bytes=65536 --target=micro --output_dir=artefacts/auto

Each attempt is a whole verified convert or optimize run under <output_dir>/attempts/, judged on the validation
split (the end of --train_data; --eval_data, a test split, only measures the chosen model afterwards): post-training
int8 first, other calibration draws and QAT when accuracy is lost, sensitivity-guided channel pruning for latency
and arena, clustering or ternary weights with TFLM look-up-table compression and channel pruning for flash. The
first attempt that meets every gate is written as model.tflite, with report.json (every attempt), report.md and
pareto.png. A rerun with the same flags resumes after the last finished attempt. Exit codes: 0 a model met every
gate; 1 none did (the closest is named and kept under attempts/, no model.tflite); 2 bad arguments or input.
"""

from __future__ import annotations

from absl import flags

from pipelines import _common
from tfcompress.runs import auto, auto_config

_MODEL = flags.DEFINE_string("saved_model_dir", None, "Keras SavedModel of the float model.")
_KERAS_MODEL = flags.DEFINE_string("keras_model", None, "A .keras or .h5 model, tf_keras or Keras 3 (instead of "
                                   "--saved_model_dir).")
_TRUST_MODEL = flags.DEFINE_bool("trust_model", False, "Load a model file even if it holds code (Lambda layers, "
                                  "unregistered custom layers): only for files you trust.")
_TRAIN = flags.DEFINE_string("train_data", None, "Labelled training .npz: calibration, fine-tuning, and the "
                             "validation split every decision is made on.", required=True)
_TRAIN_KEY = flags.DEFINE_string("train_key", "x_train", "Samples array inside --train_data.")
_TRAIN_LABELS_KEY = flags.DEFINE_string("train_labels_key", "y_train", "Class labels inside --train_data.")
_VALIDATION = flags.DEFINE_float("validation_fraction", 0.1, "Share of --train_data held out for validation.")
_NUM_VALIDATION = flags.DEFINE_integer("num_validation_samples", 2000, "Validation samples each attempt is judged "
                                       "on (the first of the split).")
_EVAL = flags.DEFINE_string("eval_data", None, "Labelled test .npz: the chosen model's final numbers only.")
_EVAL_KEY = flags.DEFINE_string("eval_key", "x_test", "Samples array inside --eval_data.")
_EVAL_LABELS_KEY = flags.DEFINE_string("eval_labels_key", "y_test", "Labels array inside --eval_data.")
_DATA_SPEC = flags.DEFINE_string("data_spec", None, "TFRecord sources: the features holding the input and the "
                                 "label, image=KEY,label=KEY (default image=image,label=label).")
_SCALE = flags.DEFINE_float("input_scale", 1.0, "Model input = raw * input_scale + input_offset.")
_OFFSET = flags.DEFINE_float("input_offset", 0.0, "See --input_scale.")
_MAX_DROP = flags.DEFINE_float("max_accuracy_drop", 0.01, "Largest validation accuracy drop against the float "
                               "model, a fraction (0.003 is 0.3 points).")
_FLASH = flags.DEFINE_integer("max_flash_bytes", None, "Flash budget: the .tflite bytes (with --target=micro, what "
                              "the TFLM export ships).")
_ARENA = flags.DEFINE_integer("max_arena_bytes", None, "TFLM tensor arena budget (needs --target=micro).")
_LATENCY = flags.DEFINE_float("max_latency_ms", None, "Single-thread LiteRT latency budget (median, fresh process).")
_TARGET = flags.DEFINE_enum("target", None, ["micro"], "Export and check each attempt for TFLite Micro.")
_MINUTES = flags.DEFINE_float("max_minutes", None, "Stop starting attempts after this long; the best so far ships.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Epochs of each fine-tune an attempt runs.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 128, "Fine-tuning batch size.", lower_bound=1)
_LR = flags.DEFINE_float("learning_rate", 5e-4, "Adam learning rate of the fine-tunes.", lower_bound=0.0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of calibration draws and fine-tunes.")
_LATENCY_RUNS = flags.DEFINE_integer("latency_runs", 100, "Single-thread invokes timed per attempt; 0 skips (not "
                                     "with --max_latency_ms).", lower_bound=0)
_OUTPUT = flags.DEFINE_string("output_dir", None, "Where attempts, model.tflite and the report go.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start over instead of resuming.")


def main(argv: list[str]) -> None:
    del argv
    result = auto.run_auto(auto_config.AutoConfig(
        output_dir=_OUTPUT.value, train_data=_TRAIN.value, saved_model_dir=_MODEL.value,
        keras_model=_KERAS_MODEL.value, trust_model=_TRUST_MODEL.value, train_key=_TRAIN_KEY.value,
        train_labels_key=_TRAIN_LABELS_KEY.value, validation_fraction=_VALIDATION.value,
        num_validation_samples=_NUM_VALIDATION.value, eval_data=_EVAL.value, eval_key=_EVAL_KEY.value,
        eval_labels_key=_EVAL_LABELS_KEY.value, input_scale=_SCALE.value, input_offset=_OFFSET.value,
        data_spec=_DATA_SPEC.value,
        max_accuracy_drop=_MAX_DROP.value, max_flash_bytes=_FLASH.value, max_arena_bytes=_ARENA.value,
        max_latency_ms=_LATENCY.value, target=_TARGET.value, max_minutes=_MINUTES.value, epochs=_EPOCHS.value,
        batch_size=_BATCH.value, learning_rate=_LR.value, seed=_SEED.value, latency_runs=_LATENCY_RUNS.value,
        overwrite=_OVERWRITE.value))
    for attempt in result.attempts:
        print(f"  {attempt['index']:>2} {attempt['name']:<28} {attempt['verdict']}")
    cut = " (search cut by --max_minutes)" if result.cut else ""
    print(f"chose {result.chosen['name']}: flash {result.chosen['flash_bytes']:,} bytes, validation accuracy "
          f"{result.chosen['validation_accuracy']:.4f}{cut}; {result.model_path}; report {result.report_path}")


if __name__ == "__main__":
    _common.run(main)
