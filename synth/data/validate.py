"""Validate a canonical dataset before anything is trained on it.

Metadata rules run as one Great Expectations suite (`synth.data.expectations`); pixels, duplicates, patient
leakage, PHI and header consistency are checked here with numpy/pandas. Every problem becomes a `Finding` with
a severity: "block" (the dataset must not be used), "warn" or "info". Findings carry counts, column names and
rule ids, never a data value, because the report and its Data Docs are meant to be shared.

The output is one artifact directory, written atomically:

    report.json   header (kind "validation") + the report body
    data_docs/    the GX Data Docs HTML site for the metadata suite
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from synth import layout
from synth.artifacts import atomic_dir, content_hash, read_header, write_header
from synth.data import expectations as gxs
from synth.data.canonical import image_spec, load_dataset, pixel_sha256, split_counts
from synth.data.duplicates import find_duplicate_groups
from synth.data.expectations import ExpectationResult
from synth.data.phi import find_phi_columns
from synth.errors import ConfigError, InputError, ValidationFailed, where

KIND = "validation"
SCHEMA_VERSION = 1
REPORT = layout.VALIDATION_REPORT
DOCS = "data_docs"
DEFAULT_OUT = "validation"
_CHUNK = 4096  # images per pixel-check chunk: bounded memory whatever the dataset size

Severity = Literal["block", "warn", "info"]
_SEVERITY_ORDER = {"block": 0, "warn": 1, "info": 2}


@dataclass(frozen=True)
class Finding:
    """One validation finding. `message` names columns, splits and counts, never a value."""

    rule: str
    severity: Severity
    message: str
    count: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"rule": self.rule, "severity": self.severity, "message": self.message, "count": self.count}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Finding:
        return cls(
            rule=data["rule"], severity=data["severity"], message=data["message"], count=data.get("count")
        )


@dataclass(frozen=True)
class ValidationReport:
    """What `validate_dataset` found. `passed` is True when no finding blocks."""

    passed: bool
    findings: list[Finding]
    class_counts: dict[str, dict[str, int]]
    duplicates: dict[str, Any]
    expectations: list[ExpectationResult]
    pixels: dict[str, Any] = field(default_factory=dict)
    n_images: int = 0
    out: Path | None = None  # the artifact directory, when one was written

    @property
    def blocking(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "block"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warn"]

    def by_rule(self, rule: str) -> list[Finding]:
        return [f for f in self.findings if f.rule == rule]

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "n_images": self.n_images,
            "summary": {s: sum(f.severity == s for f in self.findings) for s in _SEVERITY_ORDER},
            "findings": [f.to_json() for f in self.findings],
            "class_counts": self.class_counts,
            "duplicates": self.duplicates,
            "pixels": self.pixels,
            "expectations": [e.to_json() for e in self.expectations],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], out: Path | None = None) -> ValidationReport:
        return cls(
            passed=bool(data["passed"]),
            findings=[Finding.from_json(f) for f in data["findings"]],
            class_counts=dict(data["class_counts"]),
            duplicates=dict(data["duplicates"]),
            expectations=[ExpectationResult.from_json(e) for e in data["expectations"]],
            pixels=dict(data.get("pixels", {})),
            n_images=int(data.get("n_images", 0)),
            out=out,
        )

    def raise_for_blocking(self) -> None:
        """Raise `ValidationFailed` (exit 1) naming the blocking rules, if any."""
        if self.passed:
            return
        rules = ", ".join(dict.fromkeys(f.rule for f in self.blocking))
        raise ValidationFailed(
            where(self.out or "dataset", f"{len(self.blocking)} blocking finding(s): {rules}")
        )


def load_report(path: Path) -> ValidationReport:
    """Read a validation artifact written by `validate_dataset`."""
    data = read_header(Path(path), REPORT, kind=KIND)
    return ValidationReport.from_json(data, out=Path(path))


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
            ingest["removed_per_split"] = _merge_splits(ingest["removed_per_split"])
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


def _countable(metadata: pd.DataFrame) -> bool:
    """Split and class counts mean something only with a split column and integer labels."""
    columns = set(metadata.columns)
    return {"split", "label"} <= columns and pd.api.types.is_integer_dtype(metadata["label"].dtype)


_OTHER_SPLIT = "<other>"


def _split_key(split: object) -> str:
    """A split name safe to print: an unknown split value is data, so it is reported only as '<other>'."""
    return str(split) if split in gxs.ALLOWED_SPLITS else _OTHER_SPLIT


def _merge_splits(counts: Mapping[str, Any]) -> dict[str, Any]:
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
    safe = _merge_splits(splits)
    if "total" in counts:
        safe["total"] = counts["total"]
    if isinstance(counts.get("per_class"), Mapping):
        safe["per_class"] = _merge_splits(counts["per_class"])
    return safe


def check_header(
    header: Mapping[str, Any], metadata: pd.DataFrame, class_names: Sequence[str]
) -> list[Finding]:
    """The header's split and class counts agree with the metadata."""
    if not _countable(metadata):
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


# --- orchestration ---------------------------------------------------------------------------------------


def _class_counts(metadata: pd.DataFrame, class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    if not _countable(metadata):
        return {}
    return _merge_splits(split_counts(metadata, class_names)["per_class"])


def _check_out(dataset_dir: Path, out: Path) -> None:
    """Refuse outputs that `atomic_dir(overwrite=True)` would wrongly replace."""
    ds, target = dataset_dir.resolve(), out.resolve()
    if target == ds or target in ds.parents:
        raise InputError(where(out, "output would replace the dataset itself; choose another --out"))
    if out.exists():
        try:
            read_header(out, REPORT, kind=KIND)
        except InputError:
            raise InputError(
                where(out, "exists and is not a validation report; choose another --out")
            ) from None


def _sort(findings: list[Finding]) -> list[Finding]:
    # sorted() is stable, so the check order is kept within each severity.
    return sorted(findings, key=lambda f: _SEVERITY_ORDER[f.severity])


def validate_dataset(
    dataset_dir: Path, out: Path | None = None, *, min_per_class: int = 10
) -> ValidationReport:
    """Validate the canonical dataset in `dataset_dir` and write the report artifact to `out`.

    `out` defaults to `dataset_dir / "validation"` and is replaced atomically if it holds an earlier report.
    The training split needs `min_per_class` images of every class (block); other splits only warn.
    Raises `InputError` when the dataset cannot be read; blocking findings do not raise (see
    `ValidationReport.raise_for_blocking`).
    """
    if isinstance(min_per_class, bool) or not isinstance(min_per_class, int) or min_per_class < 0:
        raise ConfigError(f"min_per_class must be a non-negative integer, got {min_per_class!r}")
    dataset_dir = Path(dataset_dir)
    out = Path(out) if out is not None else dataset_dir / DEFAULT_OUT
    dataset = load_dataset(dataset_dir)
    header = dataset.header
    class_names = header.get("class_names")
    if not isinstance(class_names, list) or not class_names:
        raise InputError(where(dataset_dir / "dataset.json", "header has no class_names list"))
    try:
        metadata = dataset.metadata
    except Exception as e:  # pyarrow raises several unrelated types for a damaged file
        raise InputError(
            where(dataset_dir / "metadata.parquet", f"cannot be read ({e.__class__.__name__})")
        ) from None
    try:
        images = dataset.images
    except (OSError, ValueError) as e:
        raise InputError(
            where(dataset_dir / "images.npy", f"cannot be read ({e.__class__.__name__})")
        ) from None
    _check_out(dataset_dir, out)

    findings: list[Finding] = check_integrity(dataset_dir, header)
    pixel_findings, pixels, hashes = check_pixels(images, metadata, header.get("image"))
    dup_findings, duplicates = check_duplicates(metadata, header.get("duplicates"), hashes)

    with atomic_dir(out, overwrite=True) as tmp:
        docs = tmp / DOCS
        results = gxs.run_metadata_suite(
            metadata, class_names=class_names, min_per_class=min_per_class, docs_dir=docs
        )
        findings += findings_from_expectations(results, min_per_class=min_per_class)
        findings += pixel_findings
        findings += dup_findings
        findings += check_patients(metadata)
        findings += check_phi(metadata)
        findings += check_header(header, metadata, class_names)
        findings = _sort(findings)
        report = ValidationReport(
            passed=not any(f.severity == "block" for f in findings),
            findings=findings,
            class_counts=_class_counts(metadata, class_names),
            duplicates=duplicates,
            expectations=results,
            pixels=pixels,
            n_images=len(metadata),
            out=out,
        )
        files = sorted(
            os.path.relpath(os.path.join(d, name), tmp) for d, _, names in os.walk(docs) for name in names
        )
        write_header(
            tmp,
            REPORT,
            kind=KIND,
            schema_version=SCHEMA_VERSION,
            files=files,
            inputs={"dataset": dataset.content_hash},
            config={"min_per_class": min_per_class},
            body=report.to_json(),
        )
    return report


__all__ = [
    "ExpectationResult",
    "Finding",
    "ValidationReport",
    "load_report",
    "validate_dataset",
]
