"""The demo: train LeNet-5 on the shipped MNIST, convert it to a verified int8 model, print a report.

Run with no flags (`make demo` or `tfcompress demo`). The work is `tfcompress.runs.demo.run_demo`: train the
baseline (seeded), save it as a SavedModel, convert it to float32 and to int8 with uint8 I/O, verify both
on all 10,000 test images, time each single-threaded in a fresh process, print a table. Everything lands
in --output_dir (replaced on each run).
"""

from __future__ import annotations

from absl import flags

from pipelines import _common
from tfcompress.runs import demo

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/demo", "Where the demo's artefacts go (replaced).")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Training epochs of the baseline LeNet-5.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for training and for drawing calibration samples.")
_MAX_DROP = flags.DEFINE_float("max_accuracy_drop", 0.01, "Largest allowed int8 accuracy drop, a fraction.",
                               lower_bound=0.0, upper_bound=1.0)


def main(argv: list[str]) -> None:
    del argv
    summary = demo.run_demo(_OUTPUT.value, epochs=_EPOCHS.value, seed=_SEED.value,
                            max_accuracy_drop=_MAX_DROP.value)
    print(summary["table"])


if __name__ == "__main__":
    _common.run(main)
