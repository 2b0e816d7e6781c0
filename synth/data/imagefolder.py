"""Read a folder of ordinary images (PNG, JPEG, anything Pillow opens) listed by a CSV manifest.

Every image becomes uint8. Modes: 1-bit and 8-bit grayscale stay grayscale; 16/32-bit grayscale and float
images are scaled to 0–255 by their own min–max; palette images are expanded; alpha (LA, RGBA, transparent
palettes) is composited onto black, the usual background of medical images; CMYK/YCbCr/LAB/HSV become RGB. An
RGB image whose three channels are identical counts as grayscale (many X-ray sets are stored that way).
EXIF orientation is applied.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps

from synth.data.limits import check_images_size, declared_image_shape
from synth.data.manifest import read_manifest
from synth.data.sources import SourceData
from synth.errors import ConfigError, InputError, where

_T = TypeVar("_T")
_PROGRESS_MIN = 50  # show a progress bar from this many files on (and only on a terminal)
_HIGH_BIT = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_ALPHA = {"LA", "La", "PA", "RGBA", "RGBa"}


def read_imagefolder(
    folder: Path,
    csv: Path,
    *,
    size: int | None = None,
    channels: int | None = None,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> SourceData:
    """Read the images `csv` lists (paths relative to `folder`) into a `SourceData`.

    size:     when given, each image is center-cropped to a square (the shorter side) and resized to
              size×size (Lanczos when shrinking, bicubic when enlarging); when None all images must already
              share one size.
    channels: 1 or 3 forces grayscale (ITU-R 601 luma) or RGB (gray replicated); None gives 1 when every
              image is grayscale, else 3.
    Metadata comes only from the CSV (see `synth.data.manifest.read_manifest`, which also makes the splits).
    """
    size = check_size(size)
    if channels not in (None, 1, 3):
        raise ConfigError(where("--channels", f"must be 1 or 3, got {channels!r}"))
    manifest = read_manifest(Path(csv), Path(folder), class_names=class_names, seed=seed, fractions=fractions)
    # From the headers, before any pixel is decoded: the stacked array must fit the ingest limit.
    check_images_size([declared_image_shape(p) for p in manifest.paths], size)

    counts: Counter[str] = Counter()
    arrays: list[np.ndarray] = []
    for path in progress(manifest.paths, "reading images"):
        arr, kind = load_image(path)
        counts[kind] += 1
        if size is not None:
            if arr.shape[0] != arr.shape[1]:
                counts["cropped"] += 1
            arr = resize_square(arr, size)
        arrays.append(arr)
    images, out_channels, channel_notes = stack_images(arrays, manifest.paths, channels=channels)

    notes = list(manifest.notes)
    if counts["high_bit"]:
        notes.append(f"{counts['high_bit']} high-bit-depth image(s) scaled to 8 bits by their own min–max")
    if counts["alpha"]:
        notes.append(f"{counts['alpha']} image(s) with transparency composited onto black")
    if counts["cropped"]:
        notes.append(f"{counts['cropped']} non-square image(s) center-cropped to a square before resizing")
    notes += channel_notes
    source = {
        "format": "imagefolder",
        **manifest.source_info(),
        "resized_to": size,
        "channels": out_channels,
        "files": len(arrays),
    }
    return SourceData(
        images=images,
        metadata=manifest.metadata(),
        class_names=manifest.class_names,
        source=source,
        notes=notes,
    )


def load_image(path: Path) -> tuple[np.ndarray, str]:
    """One image as uint8 H×W (grayscale) or H×W×3, and the conversion it took ("plain", "high_bit", "alpha").

    Any file Pillow cannot decode raises `InputError` naming it.
    """
    try:
        with Image.open(path) as opened:
            frames = getattr(opened, "n_frames", 1)
            if frames > 1:
                raise InputError(where(path, f"has {frames} frames; only single-frame images are supported"))
            image = ImageOps.exif_transpose(opened)
            image.load()
    except InputError:
        raise
    except Exception as e:  # Pillow's decoders raise many types (OSError, SyntaxError, EOFError, zlib.error)
        if isinstance(e, Image.DecompressionBombError):
            kind = "too large (Pillow's decompression-bomb guard)"
        else:
            kind = f"unreadable or corrupt ({e.__class__.__name__})"
        raise InputError(where(path, f"cannot be read as an image: {kind}")) from None
    return _to_uint8(image)


def _to_uint8(image: Image.Image) -> tuple[np.ndarray, str]:
    mode = image.mode
    if mode in _HIGH_BIT:
        arr = np.asarray(image).astype(np.float64)
        return _min_max_uint8(arr), "high_bit"
    if mode in ("1", "L"):
        return np.asarray(image.convert("L")), "plain"
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA:
        gray = mode in ("LA", "La")
        rgba = np.asarray(image.convert("LA" if gray else "RGBA")).astype(np.float64)
        color, alpha = rgba[..., :-1], rgba[..., -1:] / 255.0
        arr = np.clip(np.rint(color * alpha), 0, 255).astype(np.uint8)
        return (arr[..., 0] if gray else _gray_if_equal(arr)), "alpha"
    return _gray_if_equal(np.asarray(image.convert("RGB"))), "plain"


def _min_max_uint8(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _gray_if_equal(rgb: np.ndarray) -> np.ndarray:
    """H×W when all three channels are identical, else the H×W×3 array itself."""
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0])
    return rgb


def check_size(size: int | None) -> int | None:
    """Validate a --size value."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ConfigError(where("--size", f"must be a positive integer, got {size!r}"))
    return int(size)


def resize_square(arr: np.ndarray, size: int) -> np.ndarray:
    """Center-crop a uint8 H×W[×3] image to a square (the shorter side), then resize it to size×size.

    Lanczos (anti-aliased) when shrinking, bicubic when enlarging. Cropping rather than padding keeps the
    intensity statistics free of artificial black bars that a generative model would learn.
    """
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = arr[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    resample = Image.Resampling.LANCZOS if side > size else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(np.ascontiguousarray(square)).resize((size, size), resample))


def stack_images(
    arrays: list[np.ndarray], paths: Sequence[Path], *, channels: int | None
) -> tuple[np.ndarray, int, list[str]]:
    """Stack uint8 H×W / H×W×3 arrays into N×H×W (1 channel) or N×H×W×3, with the channel count and notes.

    All arrays must share H×W: otherwise an `InputError` names the first odd file and says to pass --size.
    """
    first = arrays[0].shape[:2]
    for arr, path in zip(arrays, paths, strict=True):
        if arr.shape[:2] != first:
            raise InputError(
                where(path, f"is {arr.shape[0]}×{arr.shape[1]} (H×W) but {paths[0].name} is "
                      f"{first[0]}×{first[1]}; images differ in size: pass --size N to resize them")
            )
    n_color = sum(arr.ndim == 3 for arr in arrays)
    out = channels if channels is not None else (3 if n_color else 1)
    notes: list[str] = []
    if out == 1:
        if n_color:
            notes.append(f"{n_color} colour image(s) converted to grayscale (luma)")
        images = np.stack([_luma(a) if a.ndim == 3 else a for a in arrays])
    else:
        n_gray = len(arrays) - n_color
        if n_gray:
            notes.append(f"{n_gray} grayscale image(s) replicated to 3 channels")
        images = np.stack([a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=2) for a in arrays])
    return images.astype(np.uint8, copy=False), out, notes


def _luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb, "RGB").convert("L"))


def progress(items: Iterable[_T], description: str) -> Iterator[_T]:
    """Iterate with a tqdm bar on stderr when there are many items and stderr is a terminal."""
    from tqdm import tqdm

    items = list(items)
    show = len(items) >= _PROGRESS_MIN and sys.stderr.isatty()
    yield from tqdm(items, desc=description, unit="file", disable=not show, leave=False)
