"""What every data source hands to ingest: pixels and per-image metadata, before duplicate handling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


@dataclass
class SourceData:
    """One source read into memory.

    images:   uint8, N×H×W or N×H×W×C
    metadata: image_id, split, label (int index into class_names), optional patient_id, optional attribute
              columns (categorical strings). No pixel hash yet: ingest computes it.
    """

    images: np.ndarray
    metadata: pd.DataFrame
    class_names: list[str]
    source: dict[str, Any]
    license: str = "unknown"
    attribution: str = ""
    notes: list[str] = field(default_factory=list)
