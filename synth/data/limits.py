"""Size limits on ingest, checked from what a source declares before any pixel is read.

A small file can declare a huge array: a deflate-compressed `.npz` of zeros expands a thousandfold, and a `.npy`
header can claim hundreds of gigabytes. Ingest refuses a source whose declared size exceeds the limit instead of
finding out by running out of memory. The limit (default 1 GB of pixel data) is raised with
`SYNTHGATE_MAX_INPUT_GB`.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np

from synth.errors import ConfigError, InputError, where

ENV_VAR = "SYNTHGATE_MAX_INPUT_GB"
DEFAULT_GB = 1.0


def max_input_bytes() -> int:
    """The ingest limit in bytes: `SYNTHGATE_MAX_INPUT_GB` (a positive number of GB), else 1 GB."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return int(DEFAULT_GB * 1e9)
    try:
        gb = float(raw)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb > 0):
        raise ConfigError(where(ENV_VAR, f"must be a positive number of GB, got {raw!r}"))
    return int(gb * 1e9)


def too_large(path: object, declared: int, limit: int, what: str) -> InputError:
    """The one-line error for a source that declares more than the limit."""
    return InputError(where(path, f"{what} declare {declared / 1e9:.3g} GB of pixel data, more than the limit "
                                  f"{limit / 1e9:.3g} GB (raise it with {ENV_VAR})"))


def npz_declared_arrays(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in an `.npz`, read from the `.npy` headers only (nothing decompressed
    beyond them). Refuses members that are not `.npy`, headers that are malformed, object dtypes and members whose
    stored size disagrees with their header."""
    arrays = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                if not info.filename.endswith(".npy"):
                    raise InputError(where(path, f"member {info.filename[:80]!r} is not a .npy array"))
                with zf.open(info) as f:
                    shape, dtype, header_len = _npy_header(path, info.filename, f)
                data_len = math.prod(shape) * dtype.itemsize
                if info.file_size != header_len + data_len:
                    raise InputError(where(path, f"{info.filename}: header declares {shape} {dtype} but the member "
                                                 f"holds {info.file_size - header_len} data bytes"))
                arrays[info.filename.removesuffix(".npy")] = (shape, dtype)
    except (zipfile.BadZipFile, EOFError) as e:
        raise InputError(where(path, f"is not a valid .npz archive (truncated or corrupt: {e})")) from None
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError) as e:  # zip64 limits, unknown compression,
        raise InputError(where(path, f"cannot be read as .npz ({e.__class__.__name__})")) from None  # encryption
    return arrays


def _npy_header(path: Path, name: str, f) -> tuple[tuple[int, ...], np.dtype, int]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, SyntaxError, TypeError, OSError, zipfile.BadZipFile) as e:
        first = str(e).splitlines()[0][:120] if str(e) else e.__class__.__name__
        raise InputError(where(path, f"{name}: malformed .npy header ({first})")) from None
    if dtype.hasobject:
        raise InputError(where(path, f"{name} holds pickled objects, which are not loaded for safety"))
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise InputError(where(path, f"{name}: malformed .npy header (shape {shape})"))
    return tuple(shape), dtype, f.tell()


def check_npz_size(path: Path, limit: int | None = None) -> None:
    """Refuse an `.npz` whose arrays declare more bytes in all than `limit` (default: `max_input_bytes()`)."""
    limit = max_input_bytes() if limit is None else limit
    declared = sum(math.prod(shape) * dtype.itemsize for shape, dtype in npz_declared_arrays(path).values())
    if declared > limit:
        raise too_large(path, declared, limit, "its arrays")


# One image may not declare more pixels than Pillow's own decompression-bomb error threshold (2 × 89.5M).
MAX_IMAGE_PIXELS = 2 * 89_478_485


def check_images_size(declared: list[tuple[Path, int, int, int]], size: int | None,
                      limit: int | None = None) -> None:
    """Refuse a folder whose images, as declared by their headers as (file, height, width, channels), would
    stack into more than `limit` bytes (each resized to `size`×`size` when given), or that holds one image larger
    than `MAX_IMAGE_PIXELS`."""
    limit = max_input_bytes() if limit is None else limit
    total = 0
    for path, height, width, channels in declared:
        if height * width > MAX_IMAGE_PIXELS:
            raise InputError(where(path, f"declares {height}×{width} pixels, more than {MAX_IMAGE_PIXELS:,} "
                                         "(a decompression bomb?)"))
        total += (size * size if size is not None else height * width) * channels
    if total > limit:
        raise too_large(declared[0][0].parent, total, limit, f"its {len(declared)} images")


def declared_image_shape(path: Path) -> tuple[Path, int, int, int]:
    """(path, height, width, output channels) of an image file from its header, without decoding its pixels.

    A header that cannot be read declares nothing here: the reader refuses that file with its precise error."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
            bands = len(image.getbands())
    except Exception:  # Pillow's openers raise many types
        return path, 0, 0, 1
    return path, height, width, 1 if bands == 1 else 3


def declared_dicom_shape(path: Path) -> tuple[Path, int, int, int]:
    """(path, rows, columns, 1) of a DICOM file from its header (pixel data not read); zeros when unreadable."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return path, int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), 1
    except Exception:  # malformed headers raise many types; read_dicom reports them precisely
        return path, 0, 0, 1
