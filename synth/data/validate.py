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
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from synth.artifacts import atomic_dir, read_header, write_header
from synth.data import expectations as gxs
from synth.data.canonical import load_dataset, split_counts
from synth.data.expectations import ExpectationResult
from synth.data.validation_checks import (
    check_duplicates,
    check_header,
    check_integrity,
    check_patients,
    check_phi,
    check_pixels,
    countable,
    findings_from_expectations,
    merge_splits,
)
from synth.data.validation_report import (
    KIND,
    REPORT,
    SCHEMA_VERSION,
    SEVERITY_ORDER,
    Finding,
    ValidationReport,
    load_report,
)
from synth.errors import ConfigError, InputError, where

DOCS = "data_docs"
DEFAULT_OUT = "validation"

__all__ = ["DEFAULT_OUT", "DOCS", "KIND", "REPORT", "SCHEMA_VERSION", "Finding", "ValidationReport", "load_report",
           "validate_dataset"]


# --- orchestration ---------------------------------------------------------------------------------------


def _class_counts(metadata: pd.DataFrame, class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    if not countable(metadata):
        return {}
    return merge_splits(split_counts(metadata, class_names)["per_class"])


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
    return sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity])


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
