"""Robustness fuzzing: malformed `.tflite` files and calibration arrays must end in one-line errors.

The mutators take a valid flatbuffer and return a damaged copy: bit flips, truncation, zeroed ranges, and
targeted changes to the fields a reader trusts (uoffsets, vector lengths, indices, Buffer offset/size),
found by walking the flatbuffer's tables (`field_positions`). `tests/test_fuzz.py` draws their arguments
with hypothesis; `run_fuzz` (`tfcompress fuzz`) draws them from a seeded generator and counts outcomes:
accepted, refused with a `TfcompressError` (by class), crashes of the LiteRT child (`litert_probe.ProbeServer`)
and unexpected exceptions, which must stay 0.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import struct
import tempfile
import time

import numpy as np

from tfcompress.analysis.inspection import inspect_tflite
from tfcompress.conversion import calibration
from tfcompress.core import litert_probe
from tfcompress.core.errors import TfcompressError
from tfcompress.core.tflite_model import read_tflite

# Field ids of the schema's tables that hold uoffsets (vectors, strings, tables), per table.
_MODEL_FIELDS = {"operator_codes": 1, "subgraphs": 2, "description": 3, "buffers": 4, "signature_defs": 7}
_SUBGRAPH_FIELDS = {"tensors": 0, "inputs": 1, "outputs": 2, "operators": 3}
_TENSOR_FIELDS = {"shape": 0, "name": 3, "quantization": 4}
_OPERATOR_FIELDS = {"inputs": 1, "outputs": 2, "builtin_options": 4}
_QUANT_FIELDS = {"scale": 2, "zero_point": 3}
KINDS = ("bit_flip", "truncate", "zero_range", "uoffset", "vector_length", "index", "buffer_size")


@dataclasses.dataclass(frozen=True)
class Fields:
    """Byte positions in a flatbuffer: uoffsets, vector length prefixes, int32 index scalars, Buffer sizes."""

    uoffsets: tuple[int, ...]
    lengths: tuple[int, ...]
    indices: tuple[int, ...]
    buffer_sizes: tuple[int, ...]


def _u32(data: bytes, pos: int) -> int:
    return struct.unpack_from("<I", data, pos)[0]


def _field(data: bytes, table: int, field_id: int) -> int | None:
    """Where a table's field is stored, or None when the table leaves it out."""
    vtable = table - struct.unpack_from("<i", data, table)[0]
    slot = 4 + 2 * field_id
    if slot + 2 > struct.unpack_from("<H", data, vtable)[0]:
        return None
    offset = struct.unpack_from("<H", data, vtable + slot)[0]
    return table + offset if offset else None


def field_positions(data: bytes) -> Fields:
    """Walks a valid flatbuffer's Model, SubGraph, Tensor, Operator, Buffer and quantization tables."""
    uoffsets, lengths, indices, sizes = [0], [], [], []

    def vector(pos: int | None) -> list[int]:
        """Records the uoffset at `pos` and the vector's length; the element positions."""
        if pos is None:
            return []
        uoffsets.append(pos)
        start = pos + _u32(data, pos)
        lengths.append(start)
        return [start + 4 + 4 * i for i in range(_u32(data, start))]

    def tables(pos: int | None) -> list[int]:
        elements = vector(pos)
        uoffsets.extend(elements)
        return [e + _u32(data, e) for e in elements]

    model = _u32(data, 0)
    subgraphs = tables(_field(data, model, _MODEL_FIELDS["subgraphs"]))
    buffers = tables(_field(data, model, _MODEL_FIELDS["buffers"]))
    for name in ("operator_codes", "description", "signature_defs"):
        pos = _field(data, model, _MODEL_FIELDS[name])
        if pos is not None:
            uoffsets.append(pos)
    for graph in subgraphs:
        for name in ("inputs", "outputs"):
            indices.extend(vector(_field(data, graph, _SUBGRAPH_FIELDS[name])))
        for tensor in tables(_field(data, graph, _SUBGRAPH_FIELDS["tensors"])):
            vector(_field(data, tensor, _TENSOR_FIELDS["shape"]))
            for field_id in (1, 2):  # type (a byte; its int32 neighbourhood is mutated) and buffer
                pos = _field(data, tensor, field_id)
                if pos is not None and pos + 4 <= len(data):
                    indices.append(pos)
            quant = _field(data, tensor, _TENSOR_FIELDS["quantization"])
            if quant is not None:
                uoffsets.append(quant)
                table = quant + _u32(data, quant)
                for name in ("scale", "zero_point"):
                    vector(_field(data, table, _QUANT_FIELDS[name]))
        for op in tables(_field(data, graph, _SUBGRAPH_FIELDS["operators"])):
            pos = _field(data, op, 0)
            if pos is not None:
                indices.append(pos)
            for name in ("inputs", "outputs"):
                indices.extend(vector(_field(data, op, _OPERATOR_FIELDS[name])))
            pos = _field(data, op, _OPERATOR_FIELDS["builtin_options"])
            if pos is not None:
                uoffsets.append(pos)
    for buffer in buffers:
        vector(_field(data, buffer, 0))
        for field_id in (1, 2):  # offset and size (uint64)
            pos = _field(data, buffer, field_id)
            if pos is not None:
                sizes.append(pos)
    return Fields(tuple(uoffsets), tuple(lengths), tuple(indices), tuple(sizes))


def bit_flip(data: bytes, bits: list[int]) -> bytes:
    """`data` with each bit position (modulo the size in bits) flipped."""
    out = bytearray(data)
    for bit in bits:
        bit %= len(out) * 8
        out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def truncate(data: bytes, length: int) -> bytes:
    return data[: length % len(data)]


def zero_range(data: bytes, start: int, length: int) -> bytes:
    start %= len(data)
    return data[:start] + bytes(min(length, len(data) - start)) + data[start + length:]


def set_u32(data: bytes, pos: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("<I", out, pos, value % (1 << 32))
    return bytes(out)


def set_u64(data: bytes, pos: int, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into("<Q", out, pos, value % (1 << 64))
    return bytes(out)


def new_value(old: int, choice: int, extra: int, size: int) -> int:
    """A replacement for an integer field: off by a little, zero, -1, past the file, huge, or arbitrary."""
    options = (old + 4, old - 4, old + 1, 0, (1 << 32) - 1, size + extra % 4096, 1 << 31, extra, old * 2 + 1,
               (1 << 32) - 2)
    return options[choice % len(options)]


def mutate(data: bytes, fields: Fields, kind: str, a: int, b: int, c: int) -> bytes:
    """One mutation of `kind` (`KINDS`), its position and value chosen by the integers `a`, `b`, `c`."""
    if kind == "bit_flip":
        return bit_flip(data, [a, b, c][: 1 + c % 3])
    if kind == "truncate":
        return truncate(data, a)
    if kind == "zero_range":
        return zero_range(data, a, 1 + b % 64)
    targets = {"uoffset": fields.uoffsets, "vector_length": fields.lengths, "index": fields.indices,
               "buffer_size": fields.buffer_sizes}[kind]
    if not targets:
        return bit_flip(data, [a])
    pos = targets[a % len(targets)]
    if kind == "buffer_size":
        return set_u64(data, pos, new_value(struct.unpack_from("<Q", data, pos)[0], b, c, len(data)))
    return set_u32(data, pos, new_value(_u32(data, pos), b, c, len(data)))


def calibration_case(kind: str, a: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """A calibration array shaped like MNIST samples, damaged by `kind`; and whether it is still valid."""
    base = rng.integers(0, 256, size=(12 + a % 20, 28, 28)).astype(np.uint8)
    if kind == "valid":
        return base, True
    if kind == "dtype":
        return [base.astype(np.complex64), base.astype(object), base.astype(str), base.astype("V1"),
                base.astype("datetime64[s]")][a % 5], False
    if kind == "shape":
        return [base[0, 0, 0], base[:, :27], base.reshape(-1), base[..., None, None], base[:, :, :, None]
                .repeat(3, axis=3)][a % 5], False
    if kind == "nan_inf":
        out = base.astype(np.float32)
        out.flat[a % out.size] = [np.nan, np.inf, -np.inf][a % 3]
        return out, False
    if kind == "huge":
        out = base.astype(np.float64)
        out.flat[a % out.size] = [1e9 * 255, -1e12, 1e300][a % 3]
        return out, False
    if kind == "empty":
        return base[:0], False
    if kind == "few":
        return base[: a % calibration.MIN_CALIBRATION_SAMPLES], False
    raise ValueError(f"unknown calibration case kind {kind!r}")


CALIBRATION_KINDS = ("valid", "dtype", "shape", "nan_inf", "huge", "empty", "few")


def load_calibration_case(array: np.ndarray, folder: str, suffix: str) -> calibration.CalibrationData:
    """Saves `array` (pickle allowed, as an attacker would) and loads it back through the calibration loader."""
    path = os.path.join(folder, "samples" + suffix)
    if suffix == ".npz":
        np.savez(path, x=array)  # object arrays are pickled: the loader must refuse them
    else:
        np.save(path, array, allow_pickle=True)
    return calibration.load_calibration_data(path, (None, 28, 28, 1), scale=1 / 255, num_samples=500)  # every sample


@dataclasses.dataclass
class Counts:
    """Outcomes of a fuzz run."""

    cases: int = 0
    accepted: int = 0
    refused: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    multi_line_errors: int = 0
    crashes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    crash_kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    crashes_not_reproduced: int = 0
    """Crashes of the shared child that a fresh child did not repeat (state left by earlier files)."""
    timeouts: int = 0
    litert_runs: int = 0
    litert_refused: int = 0
    unexpected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    unexpected_examples: list = dataclasses.field(default_factory=list)

    def refuse(self, error: TfcompressError) -> None:
        self.refused[type(error).__name__] += 1
        if "\n" in str(error):
            self.multi_line_errors += 1

    def to_json(self) -> dict:
        return {"cases": self.cases, "accepted": self.accepted, "refused": dict(sorted(self.refused.items())),
                "refused_total": sum(self.refused.values()), "multi_line_errors": self.multi_line_errors,
                "litert_runs": self.litert_runs, "litert_refused": self.litert_refused,
                "crashes": dict(self.crashes), "crash_mutations": dict(sorted(self.crash_kinds.items())),
                "crashes_total": sum(self.crashes.values()),
                "crashes_not_reproduced_in_a_fresh_child": self.crashes_not_reproduced,
                "timeouts": self.timeouts, "unexpected_exceptions": dict(self.unexpected),
                "unexpected_total": sum(self.unexpected.values()),
                "unexpected_examples": self.unexpected_examples[:10]}


def check_tflite_case(data: bytes, path: str, counts: Counts, server: litert_probe.ProbeServer | None,
                      kind: str = "") -> None:
    """One mutated flatbuffer through `read_tflite`, `inspect_tflite` and (when accepted) LiteRT in a child."""
    counts.cases += 1
    try:
        read_tflite(data)
        inspect_tflite(data)
    except TfcompressError as e:
        counts.refuse(e)
        return
    except Exception as e:  # the count that must stay 0
        counts.unexpected[type(e).__name__] += 1
        counts.unexpected_examples.append(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
        return
    if server is None:
        counts.accepted += 1
        return
    with open(path, "wb") as f:
        f.write(data)
    outcome = server.check(path)
    counts.litert_runs += 1
    if outcome.status == "ok":
        counts.accepted += 1
    elif outcome.status == "refused":
        counts.litert_refused += 1
        counts.refused["LiteRT refused (raised in the child)"] += 1
    elif outcome.status == "timeout":
        counts.timeouts += 1
    else:
        # The shared child ran earlier files too: a crash counts only if a fresh child crashes on this file.
        fresh = litert_probe.probe_file(path)
        if fresh.status == "crashed":
            counts.crashes[fresh.detail] += 1
            counts.crash_kinds[kind] += 1
        else:
            counts.crashes_not_reproduced += 1
            if fresh.status == "ok":
                counts.accepted += 1
            else:
                counts.litert_refused += 1
                counts.refused["LiteRT refused (raised in the child)"] += 1


def check_calibration_case(array: np.ndarray, valid: bool, folder: str, suffix: str, counts: Counts) -> None:
    counts.cases += 1
    try:
        load_calibration_case(array, folder, suffix)
    except TfcompressError as e:
        counts.refuse(e)
        if valid:
            counts.unexpected["valid calibration array refused"] += 1
        return
    except Exception as e:
        counts.unexpected[type(e).__name__] += 1
        counts.unexpected_examples.append(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
        return
    counts.accepted += 1
    if not valid:
        counts.unexpected["invalid calibration array accepted"] += 1


def run_fuzz(flatbuffer: bytes, cases: int, seed: int = 0, calibration_fraction: float = 0.1) -> dict:
    """Runs `cases` seeded cases (a `calibration_fraction` of them calibration arrays); the counts as JSON."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    fields = field_positions(flatbuffer)
    tflite, arrays = Counts(), Counts()
    with tempfile.TemporaryDirectory(prefix="tfcompress-fuzz-") as folder, \
            litert_probe.ProbeServer(timeout_s=30) as server:
        path = os.path.join(folder, "case.tflite")
        for _ in range(cases):
            a, b, c = (int(x) for x in rng.integers(0, 1 << 62, size=3))
            if rng.random() < calibration_fraction:
                kind = CALIBRATION_KINDS[a % len(CALIBRATION_KINDS)]
                array, valid = calibration_case(kind, b, rng)
                check_calibration_case(array, valid, folder, (".npy", ".npz")[c % 2], arrays)
            else:
                kind = KINDS[int(rng.integers(len(KINDS)))]
                check_tflite_case(mutate(flatbuffer, fields, kind, a, b, c), path, tflite, server, kind)
        restarts = server.restarts
    return {"cases": cases, "seed": seed, "tflite": tflite.to_json(), "calibration": arrays.to_json(),
            "crashes": sum(tflite.crashes.values()),
            "unexpected_exceptions": sum(tflite.unexpected.values()) + sum(arrays.unexpected.values()),
            "litert_child_restarts": restarts, "seconds": round(time.perf_counter() - start, 1)}


def small_int8_model(seed: int = 0) -> bytes:
    """An untrained 28x28x1 CNN (conv, pool, dense) converted to int8 with the shipped calibration images."""
    import numpy as np

    from tfcompress.conversion.convert import ConvertConfig, convert
    from tfcompress.core._keras import keras
    from tfcompress.core.model_io import load_model

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.layers.Input((28, 28, 1)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with np.load(os.path.join(root, "calibration_data", "mnist_calibration.npz")) as d:
        samples = d["x"][:100].astype(np.float32) / 255.0
    return convert(load_model(model), ConvertConfig(), samples)
