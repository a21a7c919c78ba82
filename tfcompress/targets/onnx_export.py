"""ONNX export: a verified int8 `.tflite` in, the same int8 model for ONNX Runtime out, checked before it is written.

`tf2onnx` (1.17, the `onnx` extra: `pip install 'tfcompress[onnx]'`) reads the `.tflite` itself and writes a QDQ
ONNX model: int8 weights behind DequantizeLinear, activations through QuantizeLinear/DequantizeLinear pairs, the
`.tflite`'s uint8 input and output kept. `onnxruntime` runs it on the evaluation data (or seeded random inputs)
beside LiteRT running the `.tflite`, and beside the float model when one is given; the gates are the convert
pipeline's: accuracy drop against the float model (or the `.tflite` without one), top-1 agreement and output
SQNR against the `.tflite`. `<name>.onnx` is written only when every check passed; `onnx_report.json` always.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import heapq
import io
import os
import tempfile
import time
import warnings

import numpy as np

from tfcompress.core import litert_probe
from tfcompress.core._native import native_output_captured
from tfcompress.core.artefacts import output_lock, prepare_output_dir, remove_if_empty, write_atomic, write_json
from tfcompress.core.errors import ConversionError, InputError, VerificationError
from tfcompress.core.tflite_model import TfliteModel, output_names
from tfcompress.core.version import __version__
from tfcompress.conversion import datasets, fidelity
from tfcompress.conversion.verify import Check, run_litert
from tfcompress.targets.export import micro_inputs

DEFAULT_OPSET = 17
REPORT_FILENAME = "onnx_report.json"
EXTRA_FIX = ("install the ONNX extra: pip install 'tfcompress[onnx]' (tf2onnx, onnx, onnxruntime; from a checkout: "
             "pip install -e '.[onnx]')")
# Initializers this large hold weights; in an int8 ONNX model every one of them is an integer tensor.
_WEIGHT_ELEMENTS = 16
_INTEGER_IO = ("uint8", "int8")


@dataclasses.dataclass(frozen=True)
class OnnxCheck:
    """One ONNX model checked: its bytes, what it holds, and every check (`report` is onnx_report.json)."""

    onnx: bytes
    checks: tuple[Check, ...]
    report: dict

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def require_extra() -> None:
    """Raises `InputError` naming the fix when tf2onnx, onnx or onnxruntime is not installed."""
    missing = []
    for module in ("tf2onnx", "onnx", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise InputError(f"--target onnx needs {', '.join(missing)}, which is not installed: {EXTRA_FIX}.")


def tflite_to_onnx(model: TfliteModel, source: str, opset: int = DEFAULT_OPSET) -> bytes:
    """The ONNX model tf2onnx makes from `model`'s flatbuffer (the same `.tflite` gives the same bytes).

    Raises:
        ConversionError: tf2onnx cannot convert the model (an op it has no mapping for); one line naming it.
    """
    require_extra()
    import tf2onnx
    import tf2onnx.convert

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.tflite")
        with open(path, "wb") as f:
            f.write(model.data)
        # tf2onnx names the nodes it adds from a process-wide counter: reset, the same .tflite gives the same bytes.
        tf2onnx.utils.INTERNAL_NAME = 1
        try:
            with warnings.catch_warnings(), native_output_captured(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")  # tf2onnx reads tensor shapes with the deprecated tf.lite.Interpreter
                proto, _ = tf2onnx.convert.from_tflite(path, opset=opset)
        except Exception as e:  # tf2onnx raises bare exceptions for what it cannot map
            text = " ".join(str(e).split()) or type(e).__name__
            raise ConversionError(
                f"tf2onnx {tf2onnx.__version__} cannot convert {source} to ONNX ({text[:300]}). The ONNX export "
                "covers the ops tf2onnx maps from TFLite; `tfcompress inspect` lists this model's ops.") from None
    _canonical_names(proto)
    return proto.SerializeToString()


def _canonical_names(proto) -> None:
    """Orders and names the graph by what it computes, so the same `.tflite` gives the same bytes.

    tf2onnx numbers the names it makes from a counter and, merging duplicate nodes, keeps one of them in an order
    that changes from run to run (the graph it computes does not). Each node gets a structural hash (its op,
    attributes and the hashes of its inputs; constants by content); nodes are sorted topologically, ties broken by
    that hash, and renamed `<op>_<position>`; constants `const_<first use>`, unknown dimensions `dim_<k>`. Nodes
    that compute the same op on the same inputs become one. The graph's inputs and outputs keep their names (the
    `.tflite`'s tensor names). A graph with control flow (Loop, If, Scan) is left as tf2onnx wrote it.
    """
    import onnx

    graph = proto.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return  # control flow: its subgraphs name outer values, which renaming would cut; tf2onnx's graph stays
    keep = {v.name for v in (*graph.input, *graph.output)}
    value_hash = {v.name: _digest(b"input", v.name.encode()) for v in graph.input}
    for tensor in graph.initializer:
        copy = type(tensor)()
        copy.CopyFrom(tensor)
        copy.name = ""
        value_hash[tensor.name] = _digest(b"const", copy.SerializeToString())
    node_hash, unique, seen, alias = [], [], {}, {}
    for node in graph.node:  # ONNX lists nodes in a topological order
        node.input[:] = [alias.get(n, n) for n in node.input]
        attributes = [a.SerializeToString() for a in sorted(node.attribute, key=lambda a: a.name)]
        digest = _digest(node.op_type.encode(), node.domain.encode(), *attributes,
                         *(value_hash.get(n, b"?") for n in node.input))
        if digest in seen and not set(node.output) & keep:
            # The same op on the same inputs (an unrolled recurrence dequantizes one weight once per step): one
            # node computes it, whichever tf2onnx listed first.
            alias.update(zip(node.output, unique[seen[digest]].output))
            continue
        seen.setdefault(digest, len(unique))
        unique.append(node)
        node_hash.append(digest)
        for j, name in enumerate(node.output):
            value_hash[name] = _digest(digest, str(j).encode())
    order = _topological(unique, node_hash)
    if order is None:
        return  # not a DAG as read (names shared with subgraphs): leave tf2onnx's graph as it is
    nodes, names = [], {}
    for position, i in enumerate(order):
        node = type(unique[i])()
        node.CopyFrom(unique[i])
        node.name = f"{node.op_type}_{position}"
        if not node.domain:
            node.ClearField("domain")  # tf2onnx sets the default domain on some merged nodes, not on others
        for j, name in enumerate(node.output):
            if name and name not in keep:
                names[name] = node.name if j == 0 else f"{node.name}:{j}"
        nodes.append(node)
    constants = {t.name for t in graph.initializer}
    first_use = [n for n in dict.fromkeys(n for node in nodes for n in node.input) if n in constants]
    names.update({name: f"const_{k}" for k, name in enumerate(first_use)})
    rank = {name: k for k, name in enumerate(first_use)}
    initializers = sorted(graph.initializer, key=lambda t: rank.get(t.name, len(rank)))
    for tensor in initializers:
        tensor.name = names.get(tensor.name, tensor.name)
    for node in nodes:
        node.input[:] = [names.get(n, n) for n in node.input]
        node.output[:] = [names.get(n, n) for n in node.output]
    infos = [v for v in graph.value_info if v.name in names]
    for value in infos:
        value.name = names[value.name]
    graph.ClearField("initializer")
    graph.initializer.extend(initializers)
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("value_info")
    graph.value_info.extend(sorted(infos, key=lambda v: v.name))
    symbols: dict[str, str] = {}  # tf2onnx's numbered unknown dimensions ("unk__2871"), in order of appearance
    for value in (*graph.input, *graph.output, *graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = symbols.setdefault(dim.dim_param, f"dim_{len(symbols)}")


def _topological(graph_nodes: list, node_hash: list[bytes]) -> list[int] | None:
    """Node positions in a topological order, the ready node with the smallest hash first; None for a cycle."""
    producer = {name: i for i, node in enumerate(graph_nodes) for name in node.output}
    users: dict[int, list[int]] = collections.defaultdict(list)
    waiting = []
    for i, node in enumerate(graph_nodes):
        sources = {producer[n] for n in node.input if n in producer}
        waiting.append(len(sources))
        for source in sources:
            users[source].append(i)
    ready = [(node_hash[i], i) for i in range(len(graph_nodes)) if waiting[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for j in users[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, (node_hash[j], j))
    return order if len(order) == len(graph_nodes) else None


def _digest(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def run_onnx(onnx_model: bytes, inputs: np.ndarray, batch_size: int = 500,
             num_threads: int | None = None) -> tuple[np.ndarray, ...]:
    """Runs `inputs` (in the model's input dtype) through onnxruntime's CPU provider; every output, as stored."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        batches = [session.run(None, {name: inputs[i:i + batch_size]}) for i in range(0, len(inputs), batch_size)]
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException types
        text = " ".join(str(e).split())[:300]
        raise VerificationError([f"onnx_runtime: onnxruntime cannot run the ONNX model ({text})"]) from None
    return tuple(np.concatenate([b[i] for b in batches]) for i in range(len(batches[0])))


def check_onnx(model: TfliteModel, onnx_model: bytes, inputs: np.ndarray, *, samples: str,
               labels: np.ndarray | None = None, float_outputs: dict[str, np.ndarray] | None = None,
               max_accuracy_drop: float = 0.01,
               min_top1_agreement: float = fidelity.DEFAULT_MIN_TOP1_AGREEMENT,
               min_output_sqnr_db: float = fidelity.DEFAULT_MIN_OUTPUT_SQNR_DB) -> OnnxCheck:
    """Every check of an ONNX model made from `model`, on `inputs` (in the `.tflite`'s input dtype).

    Args:
        labels: class indices of the first output for `inputs`: accuracy of both runtimes (and the float model).
        float_outputs: the float model's outputs on the same samples, by name: the accuracy drop is measured
            against it (otherwise against the `.tflite`), and each runtime's fidelity to it is reported.
    """
    import onnx
    import onnxruntime

    proto = onnx.load_from_string(onnx_model)
    checks = [_checker(proto), *_integer_checks(proto, model)]
    names = output_names(model)
    tflite_run = run_litert(model, inputs)
    onnx_raw = run_onnx(onnx_model, inputs)
    if len(onnx_raw) != len(tflite_run.outputs) or any(
            o.shape != t.shape for o, t in zip(onnx_raw, tflite_run.outputs)):
        raise VerificationError([f"onnx_outputs: the ONNX model's outputs {[o.shape for o in onnx_raw]} are not the "
                                 f".tflite's {[t.shape for t in tflite_run.outputs]}"])
    details = [_detail(model, i) for i in range(len(names))]
    tflite_out = {n: fidelity.dequantize(raw, d) for n, raw, d in zip(names, tflite_run.outputs, details)}
    onnx_out = {n: fidelity.dequantize(raw, d) for n, raw, d in zip(names, onnx_raw, details)}
    # The labels are for the float model's first output (Keras order), or the .tflite's first without a float model.
    first = names[0]
    if float_outputs is not None:
        matched = fidelity.pair_outputs(float_outputs, tflite_out)[0][2]
        first = next(n for n in names if tflite_out[n] is matched)
    classes = None if labels is None else fidelity.Labels(output=first, kind="classes", values=labels)
    vs_tflite = fidelity.measure([(n, tflite_out[n], onnx_out[n]) for n in names], samples, classes)
    checks += [Check(name, False, detail) for name, detail in fidelity.gate_failures(
        vs_tflite, min_top1_agreement, min_output_sqnr_db)]
    if not any(c.name.startswith("fidelity_") for c in checks):
        checks.append(Check("onnx_matches_tflite", True, "; ".join(
            f"{o.name}: SQNR {o.sqnr_db:.1f} dB" + ("" if o.top1_agreement is None else f", top-1 agreement "
                                                     f"{o.top1_agreement:.4f}") for o in vs_tflite.outputs)))
    steps = {n: int(np.abs(raw.astype(np.int64) - t.astype(np.int64)).max(initial=0))
             for n, raw, t in zip(names, onnx_raw, tflite_run.outputs)}
    report = {
        "tfcompress_version": __version__, "tf2onnx_version": _version("tf2onnx"), "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__, "opset": _opset(proto), "onnx_bytes": len(onnx_model),
        "tflite_bytes": len(model.data), "ops": dict(sorted(collections.Counter(n.op_type for n in proto.graph.node)
                                                           .items())),
        "input_dtype": _io_dtype(proto.graph.input[0]), "output_dtypes": [_io_dtype(o) for o in proto.graph.output],
        "samples": samples, "num_samples": int(len(inputs)),
        "vs_tflite": [dataclasses.asdict(o) | {"max_abs_error_steps": steps[o.name]} for o in vs_tflite.outputs],
    }
    if float_outputs is not None:
        report["vs_float"] = {runtime: [dataclasses.asdict(o) for o in fidelity.measure(
            fidelity.pair_outputs(float_outputs, outputs), samples, classes).outputs]
            for runtime, outputs in (("onnx", onnx_out), ("tflite", tflite_out))}
    if labels is not None:
        accuracy = {"tflite": _accuracy(tflite_out[first], labels), "onnx": _accuracy(onnx_out[first], labels)}
        reference = "tflite"
        if float_outputs is not None:
            accuracy["float"] = _accuracy(fidelity.pair_outputs(float_outputs, onnx_out)[0][1], labels)
            reference = "float"
        drop = accuracy[reference] - accuracy["onnx"]
        report["accuracy"] = accuracy | {"output": first, "reference": reference, "accuracy_drop": drop,
                                         "max_accuracy_drop": max_accuracy_drop}
        checks.append(Check("onnx_accuracy_drop", drop <= max_accuracy_drop,
                            f"ONNX Runtime {accuracy['onnx']:.4f} against {reference} {accuracy[reference]:.4f}: "
                            f"drop {drop:.4f} (max {max_accuracy_drop}) on {len(labels)} samples"))
    report["checks"] = [dataclasses.asdict(c) for c in checks]
    report["passed"] = all(c.passed for c in checks)
    return OnnxCheck(onnx_model, tuple(checks), report)


def run_onnx_export(config) -> tuple[str, tuple[str, ...], dict]:
    """`tfcompress export --target onnx` (`config`: an `ExportConfig`): (output dir, files written, report).

    Raises:
        InputError: bad file, data or output location, or the extra not installed (nothing is written).
        ConversionError: tf2onnx cannot convert the model (nothing is written).
        VerificationError: a check failed; onnx_report.json records it, no `.onnx` is written.
    """
    require_extra()
    model = litert_probe.read_user_tflite(config.tflite)
    _check_integer_tflite(model, config.tflite)
    float_model = None
    if config.saved_model_dir or config.keras_model:
        from tfcompress.core.model_io import load_model, model_source

        float_model = load_model(model_source(config.saved_model_dir, config.keras_model),
                                 trust_model=config.trust_model)
    inputs, samples, labels, float_outputs = _check_inputs(config, model, float_model)
    onnx_model = tflite_to_onnx(model, config.tflite, config.opset)
    name = config.name or os.path.splitext(os.path.basename(config.tflite))[0]
    files = (f"{name}.onnx", REPORT_FILENAME)
    output_dir, created = prepare_output_dir(config.output_dir, files, config.overwrite)
    try:
        with output_lock(output_dir, "tfcompress export"):
            start = time.perf_counter()
            checked = check_onnx(model, onnx_model, inputs, samples=samples, labels=labels,
                                 float_outputs=float_outputs, max_accuracy_drop=config.max_accuracy_drop,
                                 min_top1_agreement=config.min_top1_agreement,
                                 min_output_sqnr_db=config.min_output_sqnr_db)
            report = checked.report | {"source": os.path.abspath(config.tflite), "check_seconds": round(
                time.perf_counter() - start, 3), "onnx_file": files[0] if checked.passed else None}
            write_json(os.path.join(output_dir, REPORT_FILENAME), report)
            if not checked.passed:
                raise VerificationError([f"{c.name}: {c.detail}" for c in checked.checks if not c.passed])
            write_atomic(os.path.join(output_dir, files[0]), onnx_model)
            return output_dir, tuple(os.path.join(output_dir, f) for f in files), report
    except (InputError, ConversionError):
        if created:
            remove_if_empty(output_dir)
        raise


def _check_inputs(config, model: TfliteModel, float_model):
    if len(model.inputs) != 1:
        raise InputError(f"{config.tflite} has {len(model.inputs)} inputs; the ONNX export checks single-input "
                         "models.")
    labels = samples_float = None
    if config.eval_data is not None:
        shape = (None, *model.tensors[model.inputs[0]].shape[1:])
        samples_float, labels = datasets.load_labelled_data(
            config.eval_data, shape, key=config.eval_key, labels_key=config.eval_labels_key or None,
            scale=config.input_scale, offset=config.input_offset, limit=config.num_eval_samples,
            # labels as stored: regression targets are judged by the fidelity gates below
            class_indices=False, spec=config.data_spec)
        if labels is not None and labels.ndim == 2 and labels.shape[1] > 1:
            labels = labels.argmax(axis=1)  # one-hot rows
        elif labels is not None and (labels.ndim != 1 or labels.dtype.kind not in "iu"):
            labels = None  # regression targets: the fidelity gates judge the outputs
    elif float_model is not None:
        raise InputError("Comparing with the float model (--saved_model_dir/--keras_model) needs its inputs: pass "
                         "--eval_data as well.")
    # The micro export's check inputs: the samples quantized with the input's parameters, else seeded random ones.
    inputs, samples = micro_inputs(model, samples_float, config.seed)
    float_outputs = None if float_model is None else float_model.predict_all(samples_float)
    return inputs, samples, labels, float_outputs


def _check_integer_tflite(model: TfliteModel, source: str) -> None:
    dtypes = {np.dtype(model.tensors[i].dtype).name for i in (*model.inputs, *model.outputs)}
    if not dtypes <= set(_INTEGER_IO):
        raise InputError(f"{source} has {', '.join(sorted(dtypes))} inputs/outputs; the ONNX export takes a verified "
                         "full-integer .tflite (tfcompress convert's int8 output, uint8 or int8 I/O).")


def _checker(proto) -> Check:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # onnx.checker.ValidationError, onnx.shape_inference.InferenceError
        return Check("onnx_checker", False, f"onnx.checker: {' '.join(str(e).split())[:300]}")
    return Check("onnx_checker", True, f"valid ONNX (opset {_opset(proto)})")


def _integer_checks(proto, model: TfliteModel) -> list[Check]:
    import onnx

    # Scales and zero points (inputs 1 and 2 of QuantizeLinear/DequantizeLinear) are float per channel by design.
    parameters = {name for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                  for name in n.input[1:]}
    floats = [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT
              and i.name not in parameters and int(np.prod(i.dims, dtype=np.int64)) > _WEIGHT_ELEMENTS]
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    quantized = ops["DequantizeLinear"] + sum(v for k, v in ops.items() if k.startswith("QLinear"))
    weights = Check("onnx_integer_weights", not floats and quantized > 0,
                    f"{quantized} DequantizeLinear/QLinear nodes; float weight tensors: {floats[:5] or 'none'}")
    expected = [np.dtype(model.tensors[i].dtype).name for i in (*model.inputs, *model.outputs)]
    found = [_io_dtype(v) for v in (*proto.graph.input, *proto.graph.output)]
    io_check = Check("onnx_io_dtypes", found == expected, f"ONNX inputs/outputs {found}, .tflite {expected}")
    return [weights, io_check]


def _io_dtype(value) -> str:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)).name


def _opset(proto) -> int:
    return max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(fidelity.predicted_classes(outputs) == labels))


def _detail(model: TfliteModel, position: int) -> dict:
    return _detail_of(model.tensors[model.outputs[position]])


def _detail_of(tensor) -> dict:
    return {"dtype": np.dtype(tensor.dtype), "quantization": (tensor.scale[0] if tensor.scale else 0.0,
                                                              tensor.zero_point[0] if tensor.zero_point else 0)}


def _version(module: str) -> str:
    return getattr(__import__(module), "__version__", "unknown")
