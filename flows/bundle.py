"""The release bundle's content: synthetic images in Hugging Face imagefolder layout, card, datasheet, Croissant.

`write_bundle_content` fills a directory the caller created (the release flow makes a temporary directory, calls
this, then writes manifest/provenance/signature and renames it into place atomically). Layout: see
`reports.bundle_layout`.

Only synthetic pixels go in, by construction: the one pixel source is the generated set's `images.npy`, and that
set is refused unless every row is split 'synthetic' and its content hash is the one the facts (and so the
provenance) name. With `real_pixel_hashes` (e.g. the source's `sha256` column) every PNG written, report figures
included, is also checked not to reproduce a real image exactly.

PNGs are deterministic: same pixels and release id, same bytes (Pillow writes no time or text chunks unless asked).
Each synthetic PNG carries one chunk: the XMP packet of `reports.synthetic_mark` (IPTC digital source type
`trainedAlgorithmicMedia` and the release id), written before the files are hashed, so manifest, Croissant and
release.sig cover the marked bytes.
"""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from reports.bundle_layout import (
    CROISSANT,
    DATASHEET,
    METADATA_CSV,
    README,
    REPORT_DIR,
    SPLIT_DIR,
    class_folder_names,
    image_file_name,
)
from reports.croissant import build_croissant, write_croissant
from reports.dataset_card import render_dataset_card
from reports.datasheet import render_datasheet
from reports.facts import ReleaseFacts, check_synthetic_only, metadata_columns
from reports.synthetic_mark import XMP_KEY, xmp_packet
from synth.artifacts import write_json
from synth.data.canonical import load_dataset, pixel_sha256
from synth.errors import InputError, IntegrityError, PolicyBlocked, where

_SUMMARY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\.json$")


def png_bytes(image: np.ndarray, *, xmp: str | None = None) -> bytes:
    """Lossless, deterministic PNG of one uint8 H×W, H×W×1 or H×W×3 image: no metadata chunks, except the XMP
    packet `xmp` (an uncompressed iTXt `XML:com.adobe.xmp` chunk) when given."""
    from PIL import Image, PngImagePlugin

    arr = np.ascontiguousarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise InputError(f"cannot write a {arr.dtype} image of shape {arr.shape} as PNG (need uint8 H×W[×1|3|4])")
    buf = io.BytesIO()
    info = None
    if xmp is not None:
        info = PngImagePlugin.PngInfo()
        info.add_itxt(XMP_KEY, xmp, zip=False)  # the XMP spec asks for an uncompressed packet
    Image.fromarray(arr).save(buf, format="PNG", compress_level=9, pnginfo=info)
    return buf.getvalue()


def png_pixels(path: Path) -> np.ndarray:
    """Decode a PNG back to its uint8 array (grayscale H×W, colour H×W×C)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _check_target(root: Path) -> None:
    if not root.is_dir():
        raise InputError(where(root, "bundle directory does not exist; create it first"))
    taken = [n for n in (README, DATASHEET, CROISSANT, "data", REPORT_DIR) if (root / n).exists()]
    if taken:
        raise InputError(where(root, f"already holds {taken}; write bundle content into a fresh directory"))


def _write_data(root: Path, synthetic_dir: Path, facts: ReleaseFacts, real: set[str]) -> list[str]:
    ds = load_dataset(synthetic_dir, verify=True)
    meta = ds.metadata
    check_synthetic_only(meta, synthetic_dir)
    if ds.content_hash != facts.synthetic.content_hash:
        raise IntegrityError(
            where(
                synthetic_dir,
                f"content hash {ds.content_hash[:12]}… is not the synthetic set the release facts name "
                f"({facts.synthetic.content_hash[:12]}…)",
            )
        )
    if tuple(ds.class_names) != tuple(facts.class_names):
        raise InputError(where(synthetic_dir, f"class names {ds.class_names} differ from {list(facts.class_names)}"))
    columns = metadata_columns(meta)
    if columns != dict(facts.synthetic.columns):
        raise InputError(
            where(synthetic_dir, f"metadata columns {columns} differ from the facts' {dict(facts.synthetic.columns)}")
        )
    if "file_name" in columns:
        raise InputError(where(synthetic_dir, "metadata has a 'file_name' column, which the release reserves"))
    labels = meta["label"].to_numpy()
    empty = [n for i, n in enumerate(ds.class_names) if not (labels == i).any()]
    if empty:
        # torchvision's ImageFolder would shift the indices of a missing class folder (or fail on an empty one).
        raise InputError(where(synthetic_dir, f"no synthetic image of class(es) {empty}; generate every class"))

    images = ds.images
    if real:
        hashes = pixel_sha256(images)
        copies = [meta["image_id"].iloc[i] for i, h in enumerate(hashes) if h in real]
        if copies:
            raise PolicyBlocked(
                where(synthetic_dir, f"{len(copies)} synthetic image(s) are exact copies of real images "
                      f"(first: {copies[0]!r}); they must not be released")
            )

    folders = class_folder_names(ds.class_names)
    for folder in folders:
        (root / SPLIT_DIR / folder).mkdir(parents=True)
    n = len(meta)
    file_names = []
    written = []
    mark = xmp_packet(facts.release_id)
    for i in range(n):
        rel = f"{folders[int(labels[i])]}/{image_file_name(i, n)}"
        (root / SPLIT_DIR / rel).write_bytes(png_bytes(images[i], xmp=mark))
        file_names.append(rel)
        written.append(f"{SPLIT_DIR}/{rel}")

    table = meta[list(columns)].copy()
    table.insert(0, "label", labels.astype("int64"))
    table.insert(0, "file_name", file_names)
    with open(root / METADATA_CSV, "w", encoding="utf-8", newline="") as f:
        table.to_csv(f, index=False, lineterminator="\n")
    written.append(METADATA_CSV)
    return written


def _copy_report(root: Path, report_dir: Path, summaries: Mapping[str, Path | Mapping[str, Any]]) -> list[str]:
    out = root / REPORT_DIR
    out.mkdir()
    written: list[str] = []
    if report_dir is not None:
        report_dir = Path(report_dir)
        if not report_dir.is_dir():
            raise InputError(where(report_dir, "public report directory does not exist"))
        for src in sorted(report_dir.rglob("*")):
            rel = src.relative_to(report_dir)
            if src.is_symlink():
                raise InputError(where(src, "is a symbolic link; the public report must hold plain files only"))
            if src.is_dir():
                (out / rel).mkdir(exist_ok=True)
            elif src.is_file():
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, out / rel)
                written.append(f"{REPORT_DIR}/{rel.as_posix()}")
    for name, value in summaries.items():
        if not _SUMMARY_NAME.match(name):
            raise InputError(where(name, "summary name must be a plain file name ending in .json"))
        if (out / name).exists():
            raise InputError(where(name, "summary would overwrite a file of the public report"))
        if isinstance(value, Mapping):
            write_json(out / name, dict(value))
        else:
            src = Path(value)
            if not src.is_file():
                raise InputError(where(src, "summary file does not exist"))
            shutil.copyfile(src, out / name)
        written.append(f"{REPORT_DIR}/{name}")
    return written


def _check_no_real_pngs(root: Path, paths: list[str], real: set[str]) -> None:
    for rel in paths:
        is_png = rel.lower().endswith(".png") and rel.startswith(f"{REPORT_DIR}/")
        if is_png and pixel_sha256(png_pixels(root / rel)[None])[0] in real:
            raise PolicyBlocked(where(root / rel, "is an exact copy of a real image; it must not be released"))


def write_bundle_content(
    root: Path,
    *,
    synthetic_dir: Path,
    public_report_dir: Path | None,
    facts: ReleaseFacts,
    summaries: Mapping[str, Path | Mapping[str, Any]] | None = None,
    real_pixel_hashes: Collection[str] | None = None,
) -> list[str]:
    """Write the bundle's content into the existing, empty-of-content directory `root`.

    `synthetic_dir`: the generated set (canonical dataset, all rows split 'synthetic', content hash =
    `facts.synthetic.content_hash`). `public_report_dir`: copied to report/ (plain files only). `summaries`:
    extra report/<name>.json files, from a path or a dict (e.g. {"privacy.json": ..., "utility.json": ...}).
    `real_pixel_hashes`: pixel sha256 of real images that must not appear (PolicyBlocked if one does).
    Returns the written paths relative to `root` (posix, sorted); manifest/provenance/signature are the caller's.
    The synthetic set is checked before anything is written; a later error (report, real figure) leaves `root`
    partly written, for the caller to discard (as `atomic_dir` does).
    """
    root = Path(root)
    _check_target(root)
    real = set(real_pixel_hashes or ())
    written = _write_data(root, Path(synthetic_dir), facts, real)
    data_bytes = sum((root / p).stat().st_size for p in written if p.startswith(f"{SPLIT_DIR}/") and p.endswith(".png"))
    (root / README).write_text(render_dataset_card(facts, data_bytes=data_bytes), encoding="utf-8", newline="\n")
    (root / DATASHEET).write_text(render_datasheet(facts), encoding="utf-8", newline="\n")
    write_croissant(root / CROISSANT, build_croissant(facts, root / "data", root=root))
    written += [README, DATASHEET, CROISSANT]
    if public_report_dir is not None or summaries:
        report = _copy_report(root, public_report_dir, dict(summaries or {}))
        if real:
            _check_no_real_pngs(root, report, real)
        written += report
    return sorted(written)
