"""The checks of `synth.data.validate`, each returning findings (and a summary) computed from counts only:
expectations turned into findings, pixels, duplicates and cross-split leakage, patients, PHI, header and
integrity."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synth.artifacts import content_hash
from synth.data import expectations as gxs
from synth.data.canonical import image_spec, pixel_sha256, split_counts
from synth.data.duplicates import find_duplicate_groups
from synth.data.expectations import ExpectationResult
from synth.data.phi import find_phi_columns
from synth.data.validation_report import Finding, Severity

_CHUNK = 4096  # images per pixel-check chunk: bounded memory whatever the dataset size


# --- checks: each returns findings (and a summary), from counts only ---------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def findings_from_expectations(
    results: Sequence[ExpectationResult], *, min_per_class: int | None = None
) -> list[Finding]:
    """One finding per failed GX expectation (`min_per_class` is quoted in class-count messages)."""
    findings = []
    for r in results:
        if r.success:
            continue
        col = f"column {r.column!r}" if r.column else "table"
        n = r.unexpected_count
        if r.raised:
            message = f"{r.type} on {col} could not be evaluated"
        elif r.rule == gxs.COLUMNS:
            message = f"required column {r.column!r} is missing"
        elif r.rule == gxs.TYPES:
            expected = "integer" if r.column == "label" else "string"
            found = f" (found {r.observed})" if isinstance(r.observed, str) else ""
            count = f": {_plural(n, 'value')} of another type" if n else ""
            message = f"{col} should hold {expected}s{found}{count}"
        elif r.rule == gxs.NOT_NULL:
            message = f"{col} has {_plural(n or 0, 'null value')}"
        elif r.rule == gxs.LABEL_RANGE:
            message = f"{_plural(n or 0, 'label')} outside the class indices"
        elif r.rule == gxs.SPLIT_VALUES:
            message = f"{_plural(n or 0, 'row')} with a split outside {', '.join(gxs.ALLOWED_SPLITS)}"
        elif r.rule == gxs.IMAGE_ID_UNIQUE:
            message = f"{_plural(n or 0, 'row')} share an image_id with another row"
        elif r.rule == gxs.SHA256_FORMAT:
            message = f"{_plural(n or 0, 'sha256 value')} not 64 lowercase hex digits"
        elif r.rule == gxs.CLASS_COUNT:
            cond = r.condition or {}
            message = (
                f"split {cond.get('split')!r} has {_plural(int(r.observed or 0), 'image')} of class "
                f"{cond.get('class')!r}"
            )
            if min_per_class is not None:
                message += f" (minimum {min_per_class})"
            n = int(r.observed or 0)
        else:
            message = f"{r.type} failed on {col}"
        severity: Severity = "warn" if r.severity == "warn" else "block"
        findings.append(Finding(r.rule, severity, message, n))
    return findings


def check_pixels(
    images: np.ndarray, metadata: pd.DataFrame, header_spec: Mapping[str, Any] | None
) -> tuple[list[Finding], dict[str, Any], list[str] | None]:
    """Shape/dtype against the header, finiteness, constant images, and metadata sha256 against the pixels.

    Walks the (memory-mapped) array in chunks. Returns the findings, a summary and the recomputed pixel hashes
    (None when the array is not N×H×W[×C]).
    """
    findings: list[Finding] = []
    summary: dict[str, Any] = {"shape": list(images.shape), "dtype": str(images.dtype)}
    if images.ndim not in (3, 4):
        findings.append(
            Finding("pixels.spec", "block", f"images.npy has shape {images.shape}, not N×H×W[×C]")
        )
        return findings, summary, None
    actual = image_spec(images)
    if images.dtype != np.uint8:
        findings.append(Finding("pixels.dtype", "block", f"images are {images.dtype}, expected uint8"))
    if header_spec is None:
        findings.append(Finding("pixels.spec", "block", "dataset header has no image spec"))
    else:
        diffs = [
            f"{k} {header_spec.get(k)} vs {actual[k]}" for k in actual if header_spec.get(k) != actual[k]
        ]
        if diffs:
            findings.append(
                Finding(
                    "pixels.spec",
                    "block",
                    "image spec differs from the header (header vs images): " + ", ".join(diffs),
                    len(diffs),
                )
            )
    n = len(images)
    if n != len(metadata):
        findings.append(
            Finding(
                "pixels.count",
                "block",
                f"{_plural(n, 'image')} but {_plural(len(metadata), 'metadata row')}",
                abs(n - len(metadata)),
            )
        )
    recorded = metadata["sha256"].tolist() if "sha256" in metadata.columns and n == len(metadata) else None
    floating = np.issubdtype(images.dtype, np.floating)
    nonfinite = constant = mismatched = 0
    hashes: list[str] = []
    for start in range(0, n, _CHUNK):
        chunk = np.asarray(images[start : start + _CHUNK])
        flat = chunk.reshape(len(chunk), -1)
        if floating:
            nonfinite += int((~np.isfinite(flat).all(axis=1)).sum())
        if flat.shape[1]:
            constant += int((flat.min(axis=1) == flat.max(axis=1)).sum())
        hashes.extend(pixel_sha256(chunk))
    if recorded is not None:
        mismatched = sum(a != b for a, b in zip(hashes, recorded, strict=True))
    if nonfinite:
        findings.append(
            Finding(
                "pixels.finite", "block", f"{_plural(nonfinite, 'image')} with non-finite pixels", nonfinite
            )
        )
    if constant:
        findings.append(
            Finding(
                "pixels.constant",
                "warn",
                f"{_plural(constant, 'image')} of a single constant value",
                constant,
            )
        )
    if mismatched:
        findings.append(
            Finding(
                "pixels.sha256",
                "block",
                f"{_plural(mismatched, 'image')} whose pixels do not match the metadata sha256",
                mismatched,
            )
        )
    summary.update(
        n_images=n,
        constant=constant,
        nonfinite=nonfinite,
        sha256_checked=0 if recorded is None else n,
        sha256_mismatched=mismatched,
    )
    return findings, summary, hashes


_INGEST_KEYS = (
    "policy",
    "groups",
    "within_split",
    "across_splits",
    "label_conflicts",
    "removed",
    "removed_per_split",
)


def check_duplicates(
    metadata: pd.DataFrame, recorded: Mapping[str, Any] | None, pixel_hashes: list[str] | None = None
) -> tuple[list[Finding], dict[str, Any]]:
    """Exact duplicates left in the data, and what ingest's duplicate policy recorded in the header.

    Groups are found by the recomputed pixel hashes when given (so leakage is caught even if the metadata's
    sha256 column was edited), else by the metadata's sha256.
    """
    findings: list[Finding] = []
    summary: dict[str, Any] = {}
    use_pixels = pixel_hashes is not None and len(pixel_hashes) == len(metadata)
    has_hashes = use_pixels or "sha256" in metadata.columns
    if {"image_id", "split", "label"} <= set(metadata.columns) and has_hashes:
        frame = metadata[["image_id", "split", "label"]].reset_index(drop=True)
        frame["sha256"] = pixel_hashes if use_pixels else metadata["sha256"].to_numpy()
        frame = frame[frame["sha256"].duplicated(keep=False)].reset_index(drop=True)  # only groups matter
        groups = find_duplicate_groups(frame)
        within = sum(not g["spans_splits"] for g in groups)
        across = sum(g["spans_splits"] for g in groups)
        conflicts = sum(not g["labels_agree"] for g in groups)
        summary.update(
            groups=len(groups),
            within_split=within,
            across_splits=across,
            label_conflicts=conflicts,
            images_in_groups=sum(len(g["image_ids"]) for g in groups),
        )
        if within:
            findings.append(
                Finding(
                    "duplicates.within_split",
                    "warn",
                    f"{_plural(within, 'group')} of identical images inside one split",
                    within,
                )
            )
        if across:
            findings.append(
                Finding(
                    "duplicates.across_splits",
                    "block",
                    f"{_plural(across, 'group')} of identical images span splits (leakage)",
                    across,
                )
            )
    recorded = dict(recorded or {})
    if recorded:
        ingest = {k: recorded[k] for k in _INGEST_KEYS if k in recorded}
        if isinstance(ingest.get("removed_per_split"), Mapping):
            ingest["removed_per_split"] = merge_splits(ingest["removed_per_split"])
        summary["ingest"] = ingest
        groups, removed = int(ingest.get("groups", 0)), int(ingest.get("removed", 0))
        findings.append(
            Finding(
                "duplicates.ingest",
                "info",
                f"ingest (policy {ingest.get('policy', '?')!r}) found {_plural(groups, 'group')} of "
                f"identical images ({ingest.get('within_split', 0)} within a split, "
                f"{ingest.get('across_splits', 0)} across splits) and removed {_plural(removed, 'image')}",
                groups,
            )
        )
        conflicts = int(recorded.get("label_conflicts", 0))
    else:
        summary["ingest"] = None
        findings.append(Finding("duplicates.ingest", "info", "the dataset header has no duplicate record"))
        conflicts = int(summary.get("label_conflicts", 0))
    if conflicts:
        findings.append(
            Finding(
                "duplicates.label_conflicts",
                "warn",
                f"{_plural(conflicts, 'duplicate group')} with disagreeing labels",
                conflicts,
            )
        )
    return findings, summary


def check_patients(metadata: pd.DataFrame) -> list[Finding]:
    """A patient whose images sit in more than one split leaks between training and holdout."""
    if "patient_id" not in metadata.columns:
        return [
            Finding("patients.unchecked", "info", "no patient_id column: patient-level leakage not checked")
        ]
    if "split" not in metadata.columns:
        return []
    rows = metadata[["patient_id", "split"]].dropna()
    splits_per_patient = rows.groupby("patient_id")["split"].nunique()
    leaked = int((splits_per_patient > 1).sum())
    if not leaked:
        return []
    return [
        Finding(
            "patients.cross_split",
            "block",
            f"{_plural(leaked, 'patient')} with images in more than one split",
            leaked,
        )
    ]


def check_phi(metadata: pd.DataFrame) -> list[Finding]:
    """Columns that look like PHI, by name or by value shape: one blocking finding each."""
    return [
        Finding("phi.column", "block", f.message(), int(metadata[f.column].notna().sum()))
        for f in find_phi_columns(metadata)
    ]


def _flatten_counts(counts: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in counts.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten_counts(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def countable(metadata: pd.DataFrame) -> bool:
    """Split and class counts mean something only with a split column and integer labels."""
    columns = set(metadata.columns)
    return {"split", "label"} <= columns and pd.api.types.is_integer_dtype(metadata["label"].dtype)


_OTHER_SPLIT = "<other>"


def _split_key(split: object) -> str:
    """A split name safe to print: an unknown split value is data, so it is reported only as '<other>'."""
    return str(split) if split in gxs.ALLOWED_SPLITS else _OTHER_SPLIT


def merge_splits(counts: Mapping[str, Any]) -> dict[str, Any]:
    """Rename unknown split keys to '<other>' (summing them) in a per-split mapping of counts."""
    merged: dict[str, Any] = {}
    for split, value in counts.items():
        key = _split_key(split)
        if isinstance(value, Mapping):
            slot = merged.setdefault(key, {})
            for name, n in value.items():
                slot[name] = slot.get(name, 0) + n
        else:
            merged[key] = merged.get(key, 0) + value
    return merged


def _safe_counts(counts: Mapping[str, Any]) -> dict[str, Any]:
    """`split_counts`-shaped counts with unknown split names merged into '<other>'."""
    splits = {k: v for k, v in counts.items() if k not in ("total", "per_class")}
    safe = merge_splits(splits)
    if "total" in counts:
        safe["total"] = counts["total"]
    if isinstance(counts.get("per_class"), Mapping):
        safe["per_class"] = merge_splits(counts["per_class"])
    return safe


def check_header(
    header: Mapping[str, Any], metadata: pd.DataFrame, class_names: Sequence[str]
) -> list[Finding]:
    """The header's split and class counts agree with the metadata."""
    if not countable(metadata):
        return []  # the missing or mistyped column is already a finding
    recorded = _flatten_counts(_safe_counts(header.get("counts") or {}))
    actual = _flatten_counts(_safe_counts(split_counts(metadata, class_names)))
    diffs = [
        f"{k} {recorded.get(k)} vs {actual.get(k)}"
        for k in sorted(recorded.keys() | actual.keys())
        if recorded.get(k) != actual.get(k)
    ]
    if not diffs:
        return []
    shown = ", ".join(diffs[:6]) + (", …" if len(diffs) > 6 else "")
    return [
        Finding(
            "header.counts",
            "block",
            f"header counts disagree with the metadata (header vs data): {shown}",
            len(diffs),
        )
    ]


def check_integrity(root: Path, header: Mapping[str, Any]) -> list[Finding]:
    """The payload files still hash to the header's content hash."""
    try:
        actual = content_hash(root, list(header.get("files", [])))
    except OSError as e:
        return [
            Finding(
                "integrity.content_hash", "block", f"dataset files cannot be hashed ({e.__class__.__name__})"
            )
        ]
    if actual != header.get("content_hash"):
        return [
            Finding(
                "integrity.content_hash",
                "block",
                "dataset files do not match the header's content hash (changed after ingest)",
            )
        ]
    return []
