"""Benchmark of the Keras 3 path against the tf_keras (tfmot) path, on the same CNN and the same MNIST.

Run with `tfcompress benchmark_keras3` (about three minutes on 2 cores). Per seed, one CNN (Conv-BN-ReLU,
pooling, Conv-BN-ReLU, Dense, logits) is trained in Keras 3 on the first --num_train MNIST training images (the
last 10% validate) and translated into a tf_keras twin with the same trained weights (`tfcompress.to_tf_keras`,
checked on real inputs); then each, in its own Keras:

1. is pruned to --final_sparsity with `tfcompress.prune` + `tfcompress.PruningCallback()` in its own `fit`
   (Keras 3: masks on the kernels; tf_keras: tfmot's wrappers), then `tfcompress.strip`;
2. goes through `optimize --qat` (the pruned file as --keras_model; the Keras 3 one is translated, and QAT is
   prune-preserving because the model comes in sparse) to a verified full-int8 uint8-I/O `.tflite`.

Accuracy at each stage on the 10,000 MNIST test images (never used to choose anything), the kernels' sparsity
after pruning and the zeros in the shipped `.tflite`'s weight tensors, and seconds per stage. Targets, on the
means over the seeds: the final int8 accuracies within 0.2 points, the sparsities equal (within 0.5 points). Writes
`benchmark_keras3.{json,md}` to --output_dir.
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import flags

from pipelines import _benchmark
from tfcompress.core._keras import keras, keras3
from tfcompress.core.artefacts import write_atomic, write_json
from tfcompress.core.keras3 import to_tf_keras
from tfcompress.core.tflite_model import read_tflite, weight_tensors
from tfcompress.runs import optimize
from tfcompress.training.prune import PruningCallback, prune, sparsity, strip

_OUTPUT = flags.DEFINE_string("output_dir", "artefacts/benchmark_keras3", "Where the results go.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 12000, "MNIST training images used (the last 10% validate).",
                                  lower_bound=1000, upper_bound=60000)
_SPARSITY = flags.DEFINE_float("final_sparsity", 0.8, "Pruning target, a fraction of each kernel.",
                               lower_bound=0.0, upper_bound=0.95)
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Float training epochs.", lower_bound=1)
_PRUNE_EPOCHS = flags.DEFINE_integer("prune_epochs", 2, "Pruning fine-tune epochs.", lower_bound=1)
_QAT_EPOCHS = flags.DEFINE_integer("qat_epochs", 1, "QAT fine-tune epochs (optimize --qat).", lower_bound=1)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (initial weights, calibration sampling): one float "
                           "model per seed, each pruned and QAT-converted by both paths.")

MNIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "mnist.npz")
SCALE = 1.0 / 255.0
BATCH = 64
MAX_ACCURACY_GAP = 0.002
MAX_SPARSITY_GAP = 0.005
PATHS = ("Keras 3 (native pruning)", "tf_keras (tfmot)")


def build_keras3_cnn(seed: int):
    k = keras3()
    k.utils.set_random_seed(seed)
    inputs = k.Input((28, 28, 1), name="image")
    x = inputs
    for i, filters in enumerate((16, 32)):
        x = k.layers.Conv2D(filters, 3, padding="same", name=f"conv{i}")(x)
        x = k.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(x)
        x = k.layers.ReLU(name=f"relu{i}")(x)
        x = k.layers.MaxPooling2D(name=f"pool{i}")(x)
    x = k.layers.Flatten(name="flatten")(x)
    x = k.layers.Dense(64, activation="relu", name="fc")(x)
    return k.Model(inputs, k.layers.Dense(10, name="logits")(x), name="cnn")


def main(argv: list[str]) -> None:
    del argv
    summary = run_benchmark(_OUTPUT.value, _NUM_TRAIN.value, _SPARSITY.value, _EPOCHS.value, _PRUNE_EPOCHS.value,
                            _QAT_EPOCHS.value, tuple(int(seed) for seed in _SEEDS.value))
    print(summary["tables"])


def run_benchmark(output_dir: str, num_train: int = 12000, final_sparsity: float = 0.8, epochs: int = 3,
                  prune_epochs: int = 2, qat_epochs: int = 1, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    os.makedirs(output_dir, exist_ok=True)
    start_all = time.perf_counter()
    with np.load(MNIST) as d:
        x = d["x_train"][:num_train, ..., None].astype(np.float32) * SCALE
        y = d["y_train"][:num_train].astype(np.int64)
        x_test = d["x_test"][..., None].astype(np.float32) * SCALE
        y_test = d["y_test"].astype(np.int64)
        train_npz, eval_npz = os.path.join(output_dir, "train.npz"), os.path.join(output_dir, "test.npz")
        np.savez(train_npz, x_train=d["x_train"][:num_train], y_train=d["y_train"][:num_train])
        np.savez(eval_npz, x_test=d["x_test"], y_test=d["y_test"])
    split = int(num_train * 0.9)  # what optimize cuts as its validation split, here for the fits too
    rows = []
    for seed in seeds:
        # One float model, trained in Keras 3 as its user would; its tf_keras twin is the same trained model.
        start = time.perf_counter()
        keras3_model = build_keras3_cnn(seed)
        _fit(keras3(), keras3_model, x[:split], y[:split], x[split:], y[split:], epochs, 1e-3)
        float_seconds = round(time.perf_counter() - start, 1)
        twin = to_tf_keras(keras3_model, inputs=x[:256], inputs_source="MNIST training images")
        float_test = _accuracy(keras3_model, x_test, y_test)
        for path, module, model in zip(PATHS, (keras3(), keras), (keras3_model, twin.model)):
            row = {"seed": seed, "path": path, "float_test": float_test, "float_seconds": float_seconds,
                   "translation_max_abs_error": twin.max_abs_error}
            module.utils.set_random_seed(seed)
            start = time.perf_counter()
            pruned = prune(model, final_sparsity)
            _fit(module, pruned, x[:split], y[:split], x[split:], y[split:], prune_epochs, 5e-4,
                 [PruningCallback()])
            plain = strip(pruned)
            reached = sparsity(plain)
            row |= {"pruned_test": _accuracy(plain, x_test, y_test), "pruned_sparsity": reached["overall"],
                    "pruned_sparsity_per_layer": {n: v for n, v in reached.items() if n != "overall"},
                    "prune_seconds": round(time.perf_counter() - start, 1)}
            directory = os.path.join(output_dir, f"seed{seed}", _benchmark.slug(path))
            os.makedirs(directory, exist_ok=True)
            pruned_file = os.path.join(directory, "pruned.keras" if module is not keras else "pruned.h5")
            plain.save(pruned_file)
            start = time.perf_counter()
            result = optimize.run_optimize(optimize.OptimizeConfig(
                output_dir=os.path.join(directory, "optimize"), keras_model=pruned_file, train_data=train_npz,
                eval_data=eval_npz, input_scale=SCALE, qat=True, qat_epochs=qat_epochs, batch_size=BATCH,
                max_accuracy_drop=0.01, seed=seed, latency_runs=0, overwrite=True))
            stages = {s["stage"]: s for s in result.stages}
            parsed = read_tflite(result.model_path)
            weights = [parsed.constants[w.index] for _, w, _ in weight_tensors(parsed)]
            zeros = sum(int(np.count_nonzero(w == 0)) for w in weights)
            total = sum(int(w.size) for w in weights)
            row |= {"int8_test": stages["convert"]["eval_accuracy"], "qat_scheme": stages["qat"]["scheme"],
                    "shipped": result.shipped["candidate"], "tflite_bytes": parsed.num_bytes,
                    "tflite_weight_zeros": zeros / total, "optimize_seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
    by_path = {path: [r for r in rows if r["path"] == path] for path in PATHS}
    mean = {path: {key: float(np.mean([r[key] for r in group])) for key in
                   ("pruned_test", "int8_test", "pruned_sparsity", "tflite_weight_zeros")}
            for path, group in by_path.items()}
    k3, tfk = (mean[path] for path in PATHS)
    targets = {
        "mean int8 test accuracy gap (Keras 3 vs tf_keras)": _benchmark.target(
            abs(k3["int8_test"] - tfk["int8_test"]), MAX_ACCURACY_GAP, True,
            "from the same trained weights, each Keras prunes and fine-tunes with its own kernels and optimizer; "
            "the gap is that numerical difference over two fine-tunes and which int8 candidate ships"),
        "mean pruned sparsity gap": _benchmark.target(abs(k3["pruned_sparsity"] - tfk["pruned_sparsity"]),
                                                      MAX_SPARSITY_GAP, True,
                                                      "the two paths pruned to different sparsity"),
        "mean shipped zeros gap": _benchmark.target(abs(k3["tflite_weight_zeros"] - tfk["tflite_weight_zeros"]),
                                                    MAX_SPARSITY_GAP, True, "the shipped weights hold different zeros"),
    }
    summary = {"rows": rows, "mean": mean, "targets": targets, "num_train": num_train,
               "final_sparsity": final_sparsity, "epochs": epochs, "prune_epochs": prune_epochs,
               "qat_epochs": qat_epochs, "seeds": list(seeds)}
    tables = render(summary, time.perf_counter() - start_all)
    write_json(os.path.join(output_dir, "benchmark_keras3.json"), summary)
    write_atomic(os.path.join(output_dir, "benchmark_keras3.md"), (tables + "\n").encode())
    return summary | {"tables": tables}


def _fit(module, model, x, y, x_val, y_val, epochs: int, learning_rate: float, callbacks=()) -> None:
    model.compile(optimizer=module.optimizers.Adam(learning_rate),
                  loss=module.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, validation_data=(x_val, y_val),
              callbacks=list(callbacks), verbose=0)


def _accuracy(model, x, y) -> float:
    return float(np.mean(np.argmax(model.predict(x, batch_size=1000, verbose=0), axis=-1) == y))


def render(summary: dict, total_seconds: float) -> str:
    lines = [f"Keras 3 against tf_keras: one CNN per seed trained in Keras 3 ({summary['num_train']:,} MNIST training "
             f"images, {summary['epochs']} epochs) and its tf_keras twin (the same trained weights), each pruned to "
             f"{summary['final_sparsity']:.0%} with PruningCallback in its own Keras' fit ({summary['prune_epochs']} "
             f"epochs), then optimize --qat ({summary['qat_epochs']} epoch); accuracy on the 10,000 test images.", "",
             "| seed | path | float | pruned | int8 (.tflite) | kernel sparsity | zeros in shipped weights | "
             "QAT scheme | ships | .tflite bytes | s (float / prune / optimize) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['seed']} | {r['path']} | {r['float_test']:.4f} | {r['pruned_test']:.4f} | "
                     f"{r['int8_test']:.4f} | "
                     f"{r['pruned_sparsity']:.4f} | {r['tflite_weight_zeros']:.4f} | {r['qat_scheme']} | "
                     f"{r['shipped']} | {r['tflite_bytes']:,} | {r['float_seconds']} / {r['prune_seconds']} / "
                     f"{r['optimize_seconds']} |")
    lines += ["", "| path | mean pruned | mean int8 | mean kernel sparsity | mean shipped zeros |",
              "|---|---|---|---|---|"]
    for path, m in summary["mean"].items():
        lines.append(f"| {path} | {m['pruned_test']:.4f} | {m['int8_test']:.4f} | {m['pruned_sparsity']:.4f} | "
                     f"{m['tflite_weight_zeros']:.4f} |")
    return _benchmark.finish_tables(lines, summary["targets"], total_seconds)
