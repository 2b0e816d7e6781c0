"""Read a folder of single-frame grayscale DICOM files listed by a CSV manifest.

Pixel pipeline, per file:
  1. modality LUT: RescaleSlope/RescaleIntercept (or a Modality LUT Sequence) → modality units (e.g. HU);
  2. window: the explicit `window=(center, width)` if given, else the file's first WindowCenter/WindowWidth,
     else the image's own min–max; values outside the window clip (linear window: center ± width/2);
  3. MONOCHROME1 is inverted, so a higher value is always brighter;
  4. scaled to uint8 0–255, then optionally center-cropped and resized like the image folder.

Privacy: no DICOM header value is copied anywhere. Metadata comes only from the CSV; the source record holds
only counts and the arguments the user gave. Multi-frame and colour DICOMs are rejected as unsupported.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synth.data.imagefolder import check_size, progress, resize_square, stack_images
from synth.data.limits import check_images_size, declared_dicom_shape
from synth.data.manifest import read_manifest
from synth.data.sources import SourceData
from synth.errors import ConfigError, InputError, where

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


def read_dicom(
    folder: Path,
    csv: Path,
    *,
    size: int | None = None,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    window: tuple[float, float] | None = None,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> SourceData:
    """Read the DICOM files `csv` lists (paths relative to `folder`) into a grayscale `SourceData`.

    window: (center, width) in modality units (after rescale), applied to every file instead of the files'
            own windows. size: as in `read_imagefolder` (center-crop to square, then resize); when None all
            images must share one size. Metadata and splits come from the CSV (`read_manifest`).
    """
    size = check_size(size)
    window = check_window(window)
    manifest = read_manifest(Path(csv), Path(folder), class_names=class_names, seed=seed, fractions=fractions)
    check_images_size([declared_dicom_shape(p) for p in manifest.paths], size)

    windowing: Counter[str] = Counter()
    cropped = 0
    arrays: list[np.ndarray] = []
    for path in progress(manifest.paths, "reading DICOM files"):
        arr, how = load_dicom(path, window=window)
        windowing[how] += 1
        if size is not None:
            cropped += arr.shape[0] != arr.shape[1]
            arr = resize_square(arr, size)
        arrays.append(arr)
    images, _, _ = stack_images(arrays, manifest.paths, channels=1)

    notes = list(manifest.notes)
    if windowing["min_max"]:
        notes.append(f"{windowing['min_max']} file(s) had no usable window: scaled by their own min–max")
    if cropped:
        notes.append(f"{cropped} non-square image(s) center-cropped to a square before resizing")
    source: dict[str, Any] = {
        "format": "dicom",
        **manifest.source_info(),
        "resized_to": size,
        "channels": 1,
        "files": len(arrays),
        "window": None if window is None else {"center": window[0], "width": window[1]},
        "windowing": dict(sorted(windowing.items())),  # how many files used each window source
    }
    return SourceData(
        images=images,
        metadata=manifest.metadata(),
        class_names=manifest.class_names,
        source=source,
        notes=notes,
    )


def check_window(window: Sequence[float] | None) -> tuple[float, float] | None:
    """Validate an explicit (center, width) window."""
    if window is None:
        return None
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError):
        raise ConfigError(where("--window", f"must be two numbers CENTER WIDTH, got {window!r}")) from None
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise ConfigError(where("--window", f"needs a finite center and a positive width, got {window!r}"))
    return center, width


def load_dicom(path: Path, *, window: tuple[float, float] | None = None) -> tuple[np.ndarray, str]:
    """One DICOM file as uint8 H×W, and where its window came from ("explicit", "file" or "min_max").

    A file that is not DICOM, has no pixel data, cannot be decoded, or is multi-frame or colour raises
    `InputError` naming it (never quoting header values).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        raise InputError(where(path, "is not a DICOM file (no DICOM file meta header)")) from None
    except Exception as e:  # truncated or malformed files raise many types
        raise InputError(where(path, f"cannot be read as DICOM ({e.__class__.__name__})")) from None
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise InputError(where(path, "DICOM file has no pixel data"))
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    except (TypeError, ValueError):
        raise InputError(where(path, "DICOM image attributes are malformed")) from None
    if frames > 1:
        raise InputError(where(path, f"multi-frame DICOM ({frames} frames) is not supported"))
    if samples != 1 or photometric not in _MONOCHROME:
        raise InputError(
            where(path, f"colour DICOM ({photometric}, {samples} samples/pixel) is not supported; "
                  "only MONOCHROME1/MONOCHROME2")
        )
    try:
        stored = ds.pixel_array
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    except Exception as e:  # missing decoder plugin, truncated pixel data, bad rescale values...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", "unknown transfer syntax")
        problem = f"pixel data cannot be decoded ({e.__class__.__name__}; {name})"
        raise InputError(where(path, problem)) from None
    if values.ndim != 2:
        raise InputError(where(path, f"pixel data has shape {values.shape}; expected one 2-D frame"))

    how = "explicit"
    if window is None:
        window = _file_window(ds)
        how = "file" if window is not None else "min_max"
    if window is not None:
        center, width = window
        scaled = np.clip((values - (center - width / 2)) / width, 0.0, 1.0)
    else:
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if photometric == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.rint(scaled * 255.0).astype(np.uint8), how


def _file_window(ds: Any) -> tuple[float, float] | None:
    """The file's first WindowCenter/WindowWidth pair, or None when absent or unusable."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        center = float(center[0] if _multi(center) else center)
        width = float(width[0] if _multi(width) else width)
    except (TypeError, ValueError, IndexError):
        return None
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        return None
    return center, width


def _multi(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)
