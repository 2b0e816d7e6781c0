"""The canonical dataset: one on-disk form every source is converted into.

    images.npy        uint8, N×H×W (grayscale) or N×H×W×C (RGB)
    metadata.parquet  image_id, split, label, [patient_id], [attributes...], sha256 (of the pixels)
    dataset.json      header: source, content hash, class names, license, counts, duplicate findings

`write_dataset` writes it; consumers read the header through `DatasetHeader` (`Dataset.info`, or
`load_dataset_header` when only the header is needed). `Dataset.header` stays the header as written, for the
validator, which reads damaged headers to report what is wrong with them rather than refusing them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from synth import layout
from synth.artifacts import atomic_dir, read_header, verify_content, write_header
from synth.errors import InputError, where
from synth.header_schema import HeaderModel, load_header, parse_header

KIND = "dataset"
SCHEMA_VERSION = 1
HEADER = layout.DATASET_HEADER
IMAGES = "images.npy"
METADATA = layout.DATASET_METADATA
SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_ORDER = {name: i for i, name in enumerate((*SPLITS, "synthetic"))}
REQUIRED_COLUMNS = ("image_id", "split", "label", "sha256")


def pixel_sha256(images: np.ndarray) -> list[str]:
    """sha256 of each image's raw uint8 bytes (C order); equal pixels give equal hashes."""
    import hashlib

    return [hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest() for img in images]


def image_spec(images: np.ndarray) -> dict[str, Any]:
    """Height, width, channels and dtype of an N×H×W[×C] array."""
    channels = 1 if images.ndim == 3 else int(images.shape[3])
    return {
        "height": int(images.shape[1]),
        "width": int(images.shape[2]),
        "channels": channels,
        "dtype": str(images.dtype),
    }


def split_counts(metadata: pd.DataFrame, class_names: Sequence[str]) -> dict[str, Any]:
    """Per-split totals and per-split, per-class counts."""
    counts: dict[str, Any] = {}
    per_class: dict[str, dict[str, int]] = {}
    for split in sorted(metadata["split"].unique(), key=lambda s: SPLIT_ORDER.get(s, 99)):
        rows = metadata[metadata["split"] == split]
        counts[split] = len(rows)
        per_class[split] = {
            name: int((rows["label"] == i).sum()) for i, name in enumerate(class_names)
        }
    counts["total"] = len(metadata)
    counts["per_class"] = per_class
    return counts


def write_dataset(
    out: Path,
    images: np.ndarray,
    metadata: pd.DataFrame,
    *,
    class_names: Sequence[str],
    source: Mapping[str, Any],
    license: str = "unknown",
    attribution: str = "",
    duplicates: Mapping[str, Any] | None = None,
    inputs: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a canonical dataset atomically to `out` and return `out`.

    `metadata` needs `image_id`, `split`, `label` (int, index into `class_names`); `sha256` is computed here.
    """
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise InputError(where(out, f"images must be uint8 N×H×W[×C], got {images.dtype} {images.shape}"))
    if len(images) != len(metadata):
        raise InputError(where(out, f"{len(images)} images but {len(metadata)} metadata rows"))
    meta = metadata.reset_index(drop=True).copy()
    meta["image_id"] = meta["image_id"].astype(str)
    meta["split"] = meta["split"].astype(str)
    meta["label"] = meta["label"].astype("int64")
    meta["sha256"] = pixel_sha256(images)
    ordered = ["image_id", "split", "label"]
    if "patient_id" in meta.columns:
        meta["patient_id"] = meta["patient_id"].astype(str)
        ordered.append("patient_id")
    ordered += [c for c in meta.columns if c not in (*ordered, "sha256")] + ["sha256"]
    meta = meta[ordered]
    # Per-image bookkeeping of a generator (seed, sampler, ...) is not a patient attribute: it must never be
    # grouped on (subgroup tables, disclosure) even when a later stage rewrites the set.
    bookkeeping = set((extra or {}).get("generation_columns") or ())
    attributes = [c for c in ordered
                  if c not in ("image_id", "split", "label", "patient_id", "sha256") and c not in bookkeeping]

    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        np.save(tmp / IMAGES, np.ascontiguousarray(images), allow_pickle=False)
        meta.to_parquet(tmp / METADATA, index=False)
        body = {
            "source": dict(source),
            "class_names": list(class_names),
            "license": license,
            "attribution": attribution,
            "image": image_spec(images),
            "attributes": attributes,
            "has_patient_id": "patient_id" in meta.columns,
            "counts": split_counts(meta, class_names),
            "duplicates": dict(duplicates or {}),
            **dict(extra or {}),
        }
        write_header(
            tmp, HEADER, kind=KIND, schema_version=SCHEMA_VERSION, files=[IMAGES, METADATA],
            inputs=inputs, config=config, body=body,
        )
    return Path(out)


class ImageSpec(BaseModel):
    """`image_spec` of the stored array."""

    model_config = ConfigDict(frozen=True, extra="allow")

    height: int = Field(ge=1)
    width: int = Field(ge=1)
    channels: int = Field(ge=1)
    dtype: str = "uint8"


class DatasetCounts(BaseModel):
    """`split_counts`: `total`, `per_class[split][class]`, and one count per split (extra keys)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    total: int = Field(ge=0)
    per_class: dict[str, dict[str, int]] = Field(default_factory=dict)

    def split(self, name: str) -> int:
        """Images in split `name` (0 when the set has none)."""
        return int((self.model_extra or {}).get(name) or 0)

    def per_split(self) -> dict[str, int]:
        """Images per split in the header's (pipeline) order, then `total`."""
        return {**{str(k): int(v) for k, v in (self.model_extra or {}).items()}, "total": self.total}


class DatasetHeader(HeaderModel):
    """A canonical dataset's header (`dataset.json`). `generation` and `filtered` are set on generated sets and on
    sets filtered by the privacy audit; `generation_columns` names a generator's per-image bookkeeping columns."""

    source: dict[str, Any] = Field(default_factory=dict)
    class_names: list[str] = Field(min_length=1)
    license: str = "unknown"
    attribution: str = ""
    image: ImageSpec
    attributes: list[str] = Field(default_factory=list)
    has_patient_id: bool = False
    counts: DatasetCounts
    duplicates: dict[str, Any] = Field(default_factory=dict)
    generation: dict[str, Any] | None = None
    generation_columns: list[str] = Field(default_factory=list)
    filtered: dict[str, Any] | None = None


WHAT = "dataset header"


def load_dataset_header(root: Path) -> DatasetHeader:
    """The typed header of the canonical dataset at `root` (one-line InputError naming the file when it is
    missing or malformed); reads no pixels."""
    return load_header(DatasetHeader, Path(root), HEADER, kind=KIND, what=WHAT)[1]


@dataclass(frozen=True)
class Dataset:
    """A canonical dataset on disk. Images are memory-mapped, so opening one is cheap."""

    root: Path
    header: dict[str, Any]  # as written (see the module docstring); `info` is the typed, checked form

    @cached_property
    def info(self) -> DatasetHeader:
        """The typed header (one-line InputError naming `dataset.json` when malformed)."""
        return parse_header(DatasetHeader, self.header, source=self.root / HEADER, what=WHAT)

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def content_hash(self) -> str:
        return self.info.content_hash

    @cached_property
    def images(self) -> np.ndarray:
        return np.load(self.root / IMAGES, mmap_mode="r", allow_pickle=False)

    @cached_property
    def metadata(self) -> pd.DataFrame:
        return pd.read_parquet(self.root / METADATA)

    def split_size(self, name: str) -> int:
        """Rows of one split in the metadata (the examples `split(name)` returns): the one way N is counted."""
        return int((self.metadata["split"] == name).sum())

    def split(self, name: str) -> tuple[np.ndarray, pd.DataFrame]:
        """Images (loaded into memory) and metadata rows of one split."""
        mask = (self.metadata["split"] == name).to_numpy()
        return np.asarray(self.images[mask]), self.metadata[mask].reset_index(drop=True)


def load_dataset(root: Path, *, verify: bool = False) -> Dataset:
    """Open a canonical dataset; with `verify`, check its files against the header's content hash."""
    root = Path(root)
    header = read_header(root, HEADER, kind=KIND)
    for name in (IMAGES, METADATA):
        if not (root / name).is_file():
            raise InputError(where(root, f"dataset is missing {name}"))
    if verify:
        verify_content(root, header)
    return Dataset(root=root, header=header)
