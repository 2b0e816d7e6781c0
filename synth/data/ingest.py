"""Ingest: any supported source → one canonical dataset directory.

Sources: a MedMNIST `.npz` (or a known set's name, e.g. `pneumoniamnist`), an image folder + CSV, a DICOM folder +
CSV. Exact duplicates are found by pixel hash and handled by the duplicate policy before writing.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import numpy as np

from synth.data.canonical import pixel_sha256, write_dataset
from synth.data.duplicates import DuplicatePolicy, apply_policy
from synth.data.sources import SourceData
from synth.errors import ConfigError, InputError, where


class SourceFormat(StrEnum):
    AUTO = "auto"
    MEDMNIST = "medmnist"
    IMAGEFOLDER = "imagefolder"
    DICOM = "dicom"


_DICOM_SUFFIXES = {".dcm", ".dicom", ""}


def detect_format(source: Path, csv: Path | None) -> SourceFormat:
    """Guess the source format from what is on disk."""
    if source.suffix.lower() == ".npz" or (not source.exists() and csv is None):
        return SourceFormat.MEDMNIST
    if not source.exists():
        raise InputError(where(source, "no such file or directory"))
    if source.is_file():
        raise InputError(where(source, "is a file but not an .npz; give an .npz or a folder with --csv"))
    if csv is None:
        raise InputError(where(source, "is a folder: pass --csv FILE naming its images and labels"))
    files = [p for p in source.rglob("*") if p.is_file()]
    dicom = [p for p in files if p.suffix.lower() in _DICOM_SUFFIXES and _looks_like_dicom(p)]
    return SourceFormat.DICOM if dicom else SourceFormat.IMAGEFOLDER


def _looks_like_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_source(
    source: str | Path,
    *,
    csv: Path | None = None,
    fmt: SourceFormat | str = SourceFormat.AUTO,
    size: int | None = None,
    channels: int | None = None,
    class_names: list[str] | None = None,
    window: tuple[float, float] | None = None,
    seed: int = 0,
) -> SourceData:
    """Read any supported source into memory."""
    fmt = SourceFormat(fmt)
    path = Path(source).expanduser()
    if fmt is SourceFormat.AUTO:
        fmt = detect_format(path, csv)
    if fmt is SourceFormat.MEDMNIST:
        from synth.data.medmnist import read_medmnist

        if window is not None:
            raise InputError(where(source, "--window applies to DICOM sources only"))
        return _reshape(read_medmnist(str(source), class_names=class_names), size=size, channels=channels,
                        source=source)
    if csv is None:
        raise InputError(where(source, f"the {fmt.value} format needs --csv FILE"))
    if fmt is SourceFormat.IMAGEFOLDER:
        from synth.data.imagefolder import read_imagefolder

        if window is not None:
            raise InputError(where(source, "--window applies to DICOM sources only"))
        return read_imagefolder(path, Path(csv), size=size, channels=channels, class_names=class_names, seed=seed)
    from synth.data.dicom import read_dicom

    if channels not in (None, 1):
        raise InputError(where(source, "DICOM images are read as grayscale; --channels must be 1"))
    return read_dicom(path, Path(csv), size=size, class_names=class_names, window=window, seed=seed)


def _reshape(data: SourceData, *, size: int | None, channels: int | None, source: str | Path) -> SourceData:
    """An array source resized to size×size and/or converted to `channels`, like an image folder's files."""
    from synth.data.imagefolder import _luma, check_size, resize_square

    try:
        size = check_size(size)
    except ConfigError as e:
        raise InputError(where(source, str(e))) from None
    if channels not in (None, 1, 3):
        raise InputError(where(source, f"--channels must be 1 or 3, got {channels!r}"))
    images, notes = data.images, list(data.notes)
    have = 1 if images.ndim == 3 else images.shape[3]
    if channels is not None and channels != have:
        if channels == 1:
            images = np.stack([_luma(a) for a in images])
            notes.append(f"{len(images)} colour images converted to grayscale (luma)")
        else:
            images = np.repeat(images[..., None], 3, axis=3)
            notes.append(f"{len(images)} grayscale images replicated to 3 channels")
    if size is not None and images.shape[1:3] != (size, size):
        before = f"{images.shape[1]}×{images.shape[2]}"
        images = np.stack([resize_square(a, size) for a in images])
        notes.append(f"resized from {before} to {size}×{size} (center square crop, Lanczos when shrinking)")
    if images is data.images:
        return data
    return SourceData(images=np.ascontiguousarray(images, dtype=np.uint8), metadata=data.metadata,
                      class_names=data.class_names, source={**data.source, "resized_to": size},
                      license=data.license, attribution=data.attribution, notes=notes)


def ingest(
    source: str | Path,
    out: Path,
    *,
    csv: Path | None = None,
    fmt: SourceFormat | str = SourceFormat.AUTO,
    size: int | None = None,
    channels: int | None = None,
    class_names: list[str] | None = None,
    window: tuple[float, float] | None = None,
    duplicate_policy: DuplicatePolicy | str = DuplicatePolicy.COLLAPSE,
    license: str | None = None,
    attribution: str | None = None,
    seed: int = 0,
) -> Path:
    """Read `source`, apply the duplicate policy and write the canonical dataset to `out` (atomically)."""
    out = Path(out)
    if out.exists():
        raise InputError(where(out, "already exists; choose another --out or remove it"))
    data = read_source(
        source, csv=csv, fmt=fmt, size=size, channels=channels, class_names=class_names, window=window, seed=seed
    )
    metadata = data.metadata.copy()
    metadata["sha256"] = pixel_sha256(data.images)
    keep, findings = apply_policy(metadata, duplicate_policy)
    kept_meta = metadata[keep].drop(columns="sha256").reset_index(drop=True)
    return write_dataset(
        out,
        np.ascontiguousarray(data.images[keep]),
        kept_meta,
        class_names=data.class_names,
        source=data.source,
        license=license or data.license,
        attribution=attribution or data.attribution,
        duplicates=findings,
        config={
            "duplicate_policy": str(findings["policy"]),
            "size": size,
            "channels": channels,
            "window": list(window) if window else None,
            "seed": seed,
        },
        extra={"counts_before_policy": {s: int(n) for s, n in metadata["split"].value_counts().items()},
               "notes": data.notes},
    )
