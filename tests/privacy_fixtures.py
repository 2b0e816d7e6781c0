"""Helpers for the privacy-audit tests: tiny encoder configs and synthetic canonical datasets made of real images."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from privacy.embeddings import AugmentConfig, EncoderConfig
from synth.data.canonical import write_dataset

# A few steps on small batches: enough to exercise training, seconds on a shared CPU.
TINY_ENCODER = EncoderConfig(steps=12, batch_size=32, widths=(8, 16, 16), hidden=32, dim=16,
                             augment=AugmentConfig())


def write_synthetic(
    out: Path, images: np.ndarray, labels: np.ndarray, *, attributes: Mapping[str, list] | None = None,
    class_names: tuple[str, ...] = ("normal", "pneumonia"), prefix: str = "syn",
) -> Path:
    """A synthetic canonical dataset (split "synthetic") holding `images`."""
    meta = pd.DataFrame({
        "image_id": [f"{prefix}-{i:05d}" for i in range(len(images))],
        "split": "synthetic",
        "label": np.asarray(labels, dtype=np.int64),
        **(dict(attributes) if attributes else {}),
    })
    return write_dataset(out, np.ascontiguousarray(images), meta, class_names=class_names,
                         source={"kind": "test-synthetic"})
