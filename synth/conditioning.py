"""What the generator is conditioned on: the class label, optionally crossed with categorical attributes.

A condition is one integer index into the UNet's class embedding. With attributes (sex, age group, ...) the index
enumerates the joint combinations label × attribute values, so one embedding table conditions on all of them; the
extra index `num_conditions` is the null condition for classifier-free guidance.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from synth.errors import ConfigError


@dataclass(frozen=True)
class ConditionSpace:
    """The set of conditions a model knows, and how labels/attributes map to condition indices."""

    class_names: tuple[str, ...]
    attributes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.attributes)

    @property
    def num_conditions(self) -> int:
        return len(self.class_names) * math.prod(len(values) for _, values in self.attributes)

    def encode(self, label: int, attrs: Mapping[str, str] | None = None) -> int:
        """Condition index of a label (and attribute values, when the space has attributes)."""
        if not 0 <= int(label) < len(self.class_names):
            raise ConfigError(f"label {label!r} outside 0..{len(self.class_names) - 1}")
        index = int(label)
        attrs = attrs or {}
        for name, values in self.attributes:
            if name not in attrs:
                raise ConfigError(f"condition needs attribute {name!r}")
            value = str(attrs[name])
            if value not in values:
                raise ConfigError(f"attribute {name}={value!r} not in {list(values)}")
            index = index * len(values) + values.index(value)
        return index

    def decode(self, index: int) -> tuple[int, dict[str, str]]:
        """Inverse of `encode`: (label, attribute values)."""
        if not 0 <= int(index) < self.num_conditions:
            raise ConfigError(f"condition {index!r} outside 0..{self.num_conditions - 1}")
        index = int(index)
        attrs: dict[str, str] = {}
        for name, values in reversed(self.attributes):
            index, pos = divmod(index, len(values))
            attrs[name] = values[pos]
        return index, dict(reversed(list(attrs.items())))

    def encode_frame(self, metadata: pd.DataFrame) -> np.ndarray:
        """Condition index of every row of a canonical metadata frame."""
        index = metadata["label"].to_numpy(dtype=np.int64).copy()
        for name, values in self.attributes:
            lookup = {v: i for i, v in enumerate(values)}
            col = metadata[name].astype(str)
            unknown = sorted(set(col) - set(lookup))
            if unknown:
                raise ConfigError(f"attribute {name!r} has values {unknown} not in the condition space")
            index = index * len(values) + col.map(lookup).to_numpy(dtype=np.int64)
        return index

    def labels_of(self, conditions: np.ndarray) -> np.ndarray:
        """The class label of each condition index."""
        divisor = math.prod(len(values) for _, values in self.attributes)
        return np.asarray(conditions, dtype=np.int64) // divisor

    def all_conditions(self) -> list[tuple[int, dict[str, str]]]:
        """Every (label, attributes) combination, in index order."""
        combos = itertools.product(range(len(self.class_names)), *(v for _, v in self.attributes))
        return [(c[0], dict(zip(self.attribute_names, c[1:], strict=True))) for c in combos]

    def to_json(self) -> dict[str, Any]:
        return {
            "class_names": list(self.class_names),
            "attributes": [{"name": n, "values": list(v)} for n, v in self.attributes],
            "num_conditions": self.num_conditions,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ConditionSpace:
        return cls(
            class_names=tuple(data["class_names"]),
            attributes=tuple((a["name"], tuple(a["values"])) for a in data.get("attributes", [])),
        )

    @classmethod
    def from_metadata(
        cls, metadata: pd.DataFrame, class_names: Sequence[str], attributes: Sequence[str] = ()
    ) -> ConditionSpace:
        """Build the space from a dataset's metadata; attribute values are the sorted distinct values."""
        missing = [a for a in attributes if a not in metadata.columns]
        if missing:
            raise ConfigError(f"dataset has no attribute column(s) {missing}")
        return cls(
            class_names=tuple(class_names),
            attributes=tuple((a, tuple(sorted(metadata[a].astype(str).unique()))) for a in attributes),
        )
