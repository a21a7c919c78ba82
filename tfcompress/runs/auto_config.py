"""The auto search's settings: `AutoConfig`, validated when built, and its resume fingerprint.

Field names equal the flags of `pipelines/auto.py`; accuracy drops are fractions in [0, 1], budgets are bytes
and milliseconds. `tfcompress.runs.auto` runs the search this config describes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers

from tfcompress.conversion.datasets import parse_data_spec
from tfcompress.core.model_io import model_source


@dataclasses.dataclass(frozen=True)
class AutoConfig:
    """Field names equal the flags."""

    output_dir: str
    train_data: str
    saved_model_dir: str | None = None
    keras_model: str | None = None
    trust_model: bool = False
    train_key: str = "x_train"
    train_labels_key: str = "y_train"
    validation_fraction: float = 0.1
    num_validation_samples: int = 2000
    """Validation samples every attempt is judged on (the first of the split; resolution 1 / this)."""
    eval_data: str | None = None
    """A test split: only the chosen model's final numbers are measured on it, never a decision."""
    eval_key: str = "x_test"
    eval_labels_key: str = "y_test"
    input_scale: float = 1.0
    input_offset: float = 0.0
    data_spec: str | None = None
    """The TFRecord features that hold the input and the label ("image=KEY,label=KEY"; datasets.parse_data_spec)"""
    max_accuracy_drop: float = 0.01
    max_flash_bytes: int | None = None
    max_arena_bytes: int | None = None
    max_latency_ms: float | None = None
    target: str | None = None
    max_minutes: float | None = None
    epochs: int = 2
    """Epochs of each fine-tune an attempt runs (channel pruning, clustering, QAT)."""
    batch_size: int = 128
    learning_rate: float = 5e-4
    seed: int = 0
    latency_runs: int = 100
    overwrite: bool = False

    def __post_init__(self):
        model_source(self.saved_model_dir, self.keras_model)
        parse_data_spec(self.data_spec)
        if _not_real(self.max_accuracy_drop) or not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ValueError("max_accuracy_drop is a fraction in [0, 1] (0.005 is half a percentage point). "
                             f"Received: max_accuracy_drop={self.max_accuracy_drop}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError("validation_fraction is the share of the training data held out, in (0, 1). "
                             f"Received: validation_fraction={self.validation_fraction}")
        if self.target not in (None, "micro"):
            raise ValueError(f"target is 'micro' or unset. Received: target={self.target!r}")
        for name in ("max_flash_bytes", "max_arena_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} is a positive number of bytes. Received: {name}={value!r}")
        if self.max_latency_ms is not None and (_not_real(self.max_latency_ms) or self.max_latency_ms <= 0):
            raise ValueError(f"max_latency_ms is a positive time in milliseconds (single-thread LiteRT, median). "
                             f"Received: max_latency_ms={self.max_latency_ms}")
        if self.max_arena_bytes is not None and self.target != "micro":
            raise ValueError("max_arena_bytes is TFLite Micro's tensor arena, measured only with --target=micro: pass "
                             "--target=micro as well, or drop --max_arena_bytes. "
                             f"Received: max_arena_bytes={self.max_arena_bytes}, target={self.target!r}")
        if self.max_latency_ms is not None and self.latency_runs < 1:
            raise ValueError("max_latency_ms is checked by measuring: latency_runs must be at least 1. "
                             f"Received: max_latency_ms={self.max_latency_ms}, latency_runs={self.latency_runs}")
        if self.max_minutes is not None and (_not_real(self.max_minutes) or self.max_minutes <= 0):
            raise ValueError(f"max_minutes is a positive time limit for the search. Received: "
                             f"max_minutes={self.max_minutes}")
        for name in ("epochs", "batch_size", "num_validation_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1. Received: {name}={getattr(self, name)}")
        if self.latency_runs < 0:
            raise ValueError(f"latency_runs must be 0 (skip) or more. Received: latency_runs={self.latency_runs}")

    @property
    def budgets(self) -> dict[str, float]:
        """The budgets given, by name."""
        values = {"flash_bytes": self.max_flash_bytes, "arena_bytes": self.max_arena_bytes,
                  "latency_ms": self.max_latency_ms}
        return {name: value for name, value in values.items() if value is not None}

    def fingerprint(self) -> str:
        """What the attempts depend on; a rerun with another fingerprint starts over (or is refused)."""
        values = dataclasses.asdict(self)
        for name in ("output_dir", "overwrite", "trust_model", "max_minutes", "eval_data", "eval_key",
                     "eval_labels_key"):
            values.pop(name)
        if self.data_spec is None:  # the default: searches made before --data_spec existed still resume
            values.pop("data_spec")
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _not_real(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, numbers.Real)
