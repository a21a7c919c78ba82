"""`tfcompress <verb> --flags...`: runs `pipelines/<verb>.py` with the same flags."""

from __future__ import annotations

import importlib
import sys

VERBS = {
    "convert": "Convert a SavedModel or Keras model to a verified TFLite model.",
    "optimize": "Factorize, prune, cluster and/or QAT fine-tune a Keras model (optionally distilled), then "
                "convert and verify it.",
    "benchmark_optimize": "Benchmark every training-time path to int8 on LeNet-5.",
    "demo": "Train LeNet-5 on the shipped MNIST and run the whole convert pipeline on it.",
    "export": "Export a verified .tflite for microcontrollers (C array, op resolver, arena, TFLM check).",
    "benchmark_export": "Benchmark the microcontroller export (flash, arena, TFLM agreement, Vela) on LeNet-5.",
    "inspect": "Inspect a .tflite: ops, tensors, quantization, I/O, MACs and weights per layer.",
    "debug": "Find the layers that lose the most in int8 quantization (TF QuantizationDebugger).",
    "benchmark_compress": "Benchmark clustering, low-rank factorization and distillation on LeNet-5.",
    "benchmark_convert": "Benchmark the convert pipeline against a hand-written converter script.",
    "benchmark_zoo": "Benchmark every path (PTQ, micro, optimize prune+QAT) on the test model zoo.",
    "benchmark_keras3": "Benchmark a Keras 3 CNN pruned in its own fit and QAT-converted against the same CNN "
                        "through tf_keras and tfmot.",
    "benchmark_lowbit": "Benchmark low-bit QAT weights (int8, int4, int2, ternary, binary, pow2) on LeNet-5: accuracy, "
                        "values per channel, flash with --compress, TFLM agreement.",
    "fuzz": "Fuzz the readers with mutated .tflite files and calibration arrays; count refusals and crashes.",
    "benchmark_robustness": "Benchmark robustness: fuzz counts in process, and mutated files through inspect and "
                            "export as processes.",
    "benchmark_qat": "Benchmark QAT variants (learning rate, frozen BatchNorm, self-distillation) against PTQ "
                     "on the zoo classifiers.",
    "quantization_error": "Measure each layer's kernel error under int8, int4, int2, powers of two, ternary and "
                          "binary quantizers (SQNR, MSE, max error).",
    "auto": "Search for the smallest verified model that meets an accuracy tolerance and flash, arena and latency "
            "budgets (PTQ, QAT, channel pruning, clustering, low-bit weights, LUT compression).",
    "benchmark_auto": "Benchmark tfcompress auto: LeNet-5 to 64 KiB of flash at 0.3 points, a residual CNN to 0.6x its "
                      "int8 latency at 1 point, against the hand recipes.",
    "run": "Run a recipe: a convert, optimize or auto run described in a YAML or JSON file (checked against its "
           "JSON Schema first).",
    "benchmark_onnx": "Benchmark the ONNX export: ONNX Runtime int8 against LiteRT int8 on LeNet-5 and a residual CNN "
                      "(accuracy, agreement, bytes, single-thread latency).",
    "sensitivity": "Prune each layer alone at each ratio (whole channels and unstructured) and measure validation "
                   "accuracy without fine-tuning; optionally solve per-layer channel ratios for a MAC budget.",
    "benchmark_distribute": "Benchmark the prune + QAT fine-tune on one worker against two (tf.distribute "
                            "MultiWorkerMirroredStrategy, one core each), with the scaling to expect on a cluster.",
    "benchmark_channels": "Benchmark channel pruning (uniform and sensitivity-guided) on LeNet-5 and a residual CNN: "
                          "accuracy, MACs, flash, arena, LiteRT and TFLM latency.",
    "benchmark_data": "Benchmark streamed data (PNG trees, TFRecords, .npz) at 1x, 4x and 16x of an MNIST set: peak "
                      "memory and wall time of convert and a one-epoch optimize --prune, input pipeline throughput.",
}

_MODULES = {"inspect": "inspect_model"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help") or argv[1] not in VERBS:
        if len(argv) >= 2 and argv[1] not in ("-h", "--help", "help"):
            print(f"tfcompress: error: unknown command {argv[1]!r}; choose one of {sorted(VERBS)}.",
                  file=sys.stderr)
        print("usage: tfcompress <command> [--flags]  (tfcompress <command> --help for its flags)\n")
        for verb, text in VERBS.items():
            print(f"  {verb:<18} {text}")
        sys.exit(0 if len(argv) >= 2 and argv[1] in ("-h", "--help", "help") else 2)
    verb = argv[1]
    # `inspect` would shadow Python's own module for scripts run from pipelines/, hence inspect_model.py.
    module = importlib.import_module(f"pipelines.{_MODULES.get(verb, verb)}")
    from pipelines import _common

    _common.run(module.main, argv=[f"tfcompress {verb}", *argv[2:]])


if __name__ == "__main__":
    main()
