"""`IngestConfig`: the settings of one ingest, declared once for `synthgate ingest`'s flags and the release
config's `source:` section (`flows.release_config.SourceSettings` adds the validation stage's `min_per_class`).

Types and choices are checked here; values that depend on the source (a size, a DICOM window, channels for the
format) are checked by `synth.data.ingest`, with the flag named in the message, so each rule lives in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class IngestConfig(BaseModel):
    """What to ingest and how (see `synthgate ingest`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = Field(description="An .npz, a known MedMNIST name, or an image/DICOM folder")
    csv: Path | None = Field(None, description="CSV naming each image (file, label[, patient_id, split, ...])")
    format: Literal["auto", "medmnist", "imagefolder", "dicom"] = "auto"
    size: int | None = Field(None, description="resize images to size×size (any source)")
    channels: int | None = Field(None, description="1 (grayscale) or 3 (RGB); default: detect")
    classes: list[str] | None = Field(None, description="class names in label order (default: from the source)")
    window: tuple[float, float] | None = Field(None, description="DICOM window (center, width); default: the "
                                                                 "file's own")
    license: str | None = Field(None, description="license of the source data (default: from the source)")
    attribution: str | None = None
    duplicates: Literal["collapse", "keep"] = "collapse"
    seed: int = Field(0, ge=0, description="seed of the split assignment when the CSV has none")


def ingest_with(config: IngestConfig, out: Path) -> Path:
    """Ingest `config.path` into the canonical dataset `out` (see `synth.data.ingest.ingest`)."""
    from synth.data.ingest import ingest

    return ingest(
        config.path, out, csv=config.csv, fmt=config.format, size=config.size, channels=config.channels,
        class_names=config.classes, window=config.window, duplicate_policy=config.duplicates,
        license=config.license, attribution=config.attribution, seed=config.seed,
    )
