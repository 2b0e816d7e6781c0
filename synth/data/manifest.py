"""The CSV manifest that accompanies an image folder or a DICOM folder.

One row per image. Required: a file column (`file`, `file_name`, `filename` or `path`, relative to the
folder) and `label` (class names or integers). Optional: `patient_id` and `split` (train/val/test). Every
other column is a categorical attribute (sex, age group, site...), kept as strings ("unknown" when missing).

The manifest is the only source of per-image metadata: nothing is read from image or DICOM headers. It is
rejected, with a one-line `InputError` naming the CSV, when it has PHI columns, names files that do not exist
or lie outside the folder, repeats a file, or has empty labels or bad split values.
"""

from __future__ import annotations

import csv as csvlib
import hashlib
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from synth.artifacts import sha256_file
from synth.data.canonical import SPLITS
from synth.data.phi import find_phi_columns
from synth.errors import ConfigError, InputError, where

FILE_COLUMNS: tuple[str, ...] = ("file", "file_name", "filename", "path")
# Columns synthgate derives itself: a CSV column of that name would be silently overwritten.
RESERVED_COLUMNS: tuple[str, ...] = ("image_id", "sha256")
SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
MISSING_TOKENS = {"", "na", "n/a", "nan", "null", "none"}
UNKNOWN = "unknown"
_SHOW = 3  # how many offending entries a message names
_INT = re.compile(r"^[+-]?\d+$")


@dataclass
class Manifest:
    """A validated manifest.

    frame: one row per image, in CSV order, with columns `file` (normalised relative path), `label` (int
           index into `class_names`), optional `patient_id` (str), `split` (train/val/test) and the attribute
           columns (str, "unknown" where missing).
    paths: absolute path of each row's file.
    """

    frame: pd.DataFrame
    class_names: list[str]
    paths: list[Path]
    csv: Path
    csv_sha256: str
    split_method: str  # "column" | "by_patient" | "by_image"
    attributes: list[str]
    seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    notes: list[str] = field(default_factory=list)

    def metadata(self) -> pd.DataFrame:
        """Per-image metadata for `SourceData`: image_id, split, label, [patient_id], attributes."""
        meta = pd.DataFrame(
            {
                "image_id": [image_id_for(f) for f in self.frame["file"]],
                "split": self.frame["split"].to_numpy(),
                "label": self.frame["label"].astype("int64").to_numpy(),
            }
        )
        if "patient_id" in self.frame.columns:
            meta["patient_id"] = self.frame["patient_id"].to_numpy()
        for column in self.attributes:
            meta[column] = self.frame[column].to_numpy()
        return meta

    def source_info(self) -> dict[str, Any]:
        """What the dataset header records about the manifest (no per-row values)."""
        info: dict[str, Any] = {
            "csv": self.csv.name,
            "csv_sha256": self.csv_sha256,
            "split_method": self.split_method,
        }
        if self.split_method != "column":
            info["split_seed"] = self.seed
            info["split_fractions"] = list(self.fractions)
        return info


def image_id_for(rel_path: str) -> str:
    """Stable image id: a hash of the normalised relative path (file names may hold PHI, so not the name)."""
    return hashlib.sha256(rel_path.encode()).hexdigest()[:16]


def read_manifest(
    csv: Path,
    folder: Path,
    *,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> Manifest:
    """Read and validate the CSV manifest of `folder`; see the module docstring for the format.

    Labels: with `class_names`, a label must be one of them, or (when no label is a class name) every label an
    integer index into them. Without, class names are the sorted distinct labels (numerically when all are
    integers). Splits: the `split` column when present; else whole patients are assigned (when `patient_id`
    exists), else single images, ordered by a seeded hash and cut at the target `fractions` of images.
    """
    csv, folder = Path(csv), Path(folder)
    fracs = _check_fractions(fractions)
    frame = _read_csv(csv)
    if not folder.is_dir():
        raise InputError(where(folder, "image folder does not exist or is not a directory"))

    # Structure first: a CSV without a file column is told so, not that a column such as `name` looks like PHI.
    frame = _rename_required(csv, frame)
    _check_phi(csv, frame)
    for column in frame.columns:
        frame[column] = frame[column].astype(str).str.strip()

    files = _check_files(csv, folder, frame["file"])
    frame["file"] = files
    labels, names = _labels(csv, frame["label"], class_names)
    frame["label"] = labels

    notes: list[str] = []
    if "patient_id" in frame.columns:
        empty = _lines(frame["patient_id"] == "")
        if empty:
            raise InputError(where(csv, f"empty patient_id in {_first(empty, 'line')}"))

    if "split" in frame.columns:
        frame["split"] = _check_splits(csv, frame["split"])
        method = "column"
        if "patient_id" in frame.columns:
            spans = frame.groupby("patient_id")["split"].nunique()
            if (spans > 1).any():
                notes.append(f"{int((spans > 1).sum())} patient(s) appear in more than one split of the CSV")
    elif "patient_id" in frame.columns:
        frame["split"] = assign_splits(frame["patient_id"].tolist(), seed=seed, fractions=fracs)
        method = "by_patient"
    else:
        frame["split"] = assign_splits(frame["file"].tolist(), seed=seed, fractions=fracs)
        method = "by_image"
    if method != "column":
        notes += [
            f"split {s!r} is empty (too few {'patients' if method == 'by_patient' else 'images'} for the "
            f"fractions {list(fracs)})"
            for s, f in zip(SPLITS, fracs, strict=True)
            if f > 0 and not (frame["split"] == s).any()
        ]

    managed = {"file", "label", "patient_id", "split"}
    attributes = [c for c in frame.columns if c not in managed]
    for column in attributes:
        values = frame[column]
        frame[column] = values.where(~values.str.lower().isin(MISSING_TOKENS), UNKNOWN)
        if len(frame) >= 20 and frame[column].nunique() == len(frame):
            notes.append(f"attribute {column!r} has a distinct value on every row: an identifier?")

    pid = ["patient_id"] if "patient_id" in frame.columns else []
    ordered = ["file", "label", *pid, "split", *attributes]
    frame = frame[ordered].reset_index(drop=True)
    return Manifest(
        frame=frame,
        class_names=names,
        paths=[(folder / f).absolute() for f in frame["file"]],
        csv=csv,
        csv_sha256=sha256_file(csv),
        split_method=method,
        attributes=attributes,
        seed=seed,
        fractions=fracs,
        notes=notes,
    )


def assign_splits(keys: Sequence[str], *, seed: int, fractions: Sequence[float]) -> list[str]:
    """Deterministic split per row, grouping rows by key (a patient id, or a file for per-image splits).

    Distinct keys are ordered by sha256(seed, key) and walked while counting rows; a key goes to the split
    whose cumulative-row interval (train up to fractions[0]·N, then val, then test) holds the midpoint of its
    rows, so a key never spans splits and row counts land as close to the fractions as whole keys allow.
    """
    counts: dict[str, int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    order = sorted(counts, key=lambda k: (hashlib.sha256(f"{seed}\0{k}".encode()).hexdigest(), k))
    total = len(keys)
    bounds = (fractions[0] * total, (fractions[0] + fractions[1]) * total)
    split_of: dict[str, str] = {}
    seen = 0
    for key in order:
        mid = seen + counts[key] / 2
        split_of[key] = SPLITS[0] if mid < bounds[0] else SPLITS[1] if mid < bounds[1] else SPLITS[2]
        seen += counts[key]
    return [split_of[k] for k in keys]


# ------------------------------------------------------------------------------------------------------------


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    try:
        fracs = tuple(float(f) for f in fractions)
    except (TypeError, ValueError):
        raise ConfigError(where("fractions", f"must be three numbers, got {fractions!r}")) from None
    if len(fracs) != 3 or min(fracs) < 0 or abs(sum(fracs) - 1.0) > 1e-6:
        raise ConfigError(where("fractions", f"must be three non-negative numbers summing to 1, got {fracs}"))
    return fracs  # type: ignore[return-value]


def _read_csv(csv: Path) -> pd.DataFrame:
    if not csv.exists():
        raise InputError(where(csv, "CSV does not exist"))
    if not csv.is_file():
        raise InputError(where(csv, "CSV is not a file"))
    if csv.stat().st_size == 0:
        raise InputError(where(csv, "CSV is empty (0 bytes)"))
    try:
        with open(csv, newline="", encoding="utf-8-sig") as f:
            header = next(csvlib.reader(f), [])
        with warnings.catch_warnings():
            # A row with more fields than the header would otherwise be truncated with only a warning.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(csv, dtype=str, keep_default_na=False, index_col=False, encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(where(csv, "cannot be parsed as CSV (not UTF-8 text)")) from None
    except pd.errors.EmptyDataError:
        raise InputError(where(csv, "CSV has no header row")) from None
    except (pd.errors.ParserError, pd.errors.ParserWarning, csvlib.Error, ValueError) as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
        raise InputError(where(csv, f"cannot be parsed as CSV ({detail})")) from None
    except OSError as e:
        raise InputError(where(csv, f"cannot be read ({e.strerror or e.__class__.__name__})")) from None

    names = [h.strip() for h in header]
    if len(frame.columns) != len(names):
        raise InputError(where(csv, "cannot be parsed as CSV (header and rows disagree)"))
    repeated = sorted({n for n in names if n and names.count(n) > 1})
    if repeated:
        raise InputError(where(csv, f"repeated column name(s): {', '.join(map(repr, repeated))}"))
    frame.columns = names
    # Excel leaves trailing empty columns; drop them, but refuse an unnamed column that holds data.
    for i, name in enumerate(names):
        if name == "" and (frame.iloc[:, i].astype(str).str.strip() != "").any():
            raise InputError(where(csv, f"column {i + 1} has values but no name in the header"))
    frame = frame[[n for n in names if n != ""]].fillna("")
    if frame.columns.empty:
        raise InputError(where(csv, "CSV has no named columns"))
    if frame.empty:
        raise InputError(where(csv, "CSV has no rows (only a header)"))
    return frame


def _check_phi(csv: Path, frame: pd.DataFrame) -> None:
    findings = [f.message() for f in find_phi_columns(frame)]
    # phi.py leaves patient_id's values alone (a managed column); a patient_id that is an e-mail, a phone
    # number or a date is still PHI, so check its values under a neutral name.
    pid = next((c for c in frame.columns if c.strip().lower() == "patient_id"), None)
    if pid is not None:
        probe = frame[[pid]].set_axis(["patient_ref"], axis=1)
        findings += [
            f"column {pid!r} looks like PHI ({f.kind}, by its values)" for f in find_phi_columns(probe)
        ]
    if findings:
        raise InputError(where(csv, "; ".join(findings) + "; remove PHI before ingest"))


def _rename_required(csv: Path, frame: pd.DataFrame) -> pd.DataFrame:
    lower = {c: c.lower() for c in frame.columns}
    file_cols = [c for c in frame.columns if lower[c] in FILE_COLUMNS]
    if not file_cols:
        raise InputError(
            where(csv, f"missing the file column (one of {', '.join(FILE_COLUMNS)}); "
                  f"columns: {list(frame.columns)}")
        )
    if len(file_cols) > 1:
        raise InputError(where(csv, f"more than one file column: {file_cols}; keep one"))
    renames = {file_cols[0]: "file"}
    for wanted in ("label", "patient_id", "split"):
        match = [c for c in frame.columns if lower[c] == wanted]
        if len(match) > 1:
            raise InputError(where(csv, f"more than one {wanted!r} column: {match}"))
        if match:
            renames[match[0]] = wanted
    if "label" not in renames.values():
        raise InputError(where(csv, f"missing the 'label' column; columns: {list(frame.columns)}"))
    frame = frame.rename(columns=renames)
    reserved = [c for c in frame.columns if c.lower() in RESERVED_COLUMNS]
    if reserved:
        raise InputError(where(csv, f"column(s) {reserved} are reserved (synthgate derives them); rename"))
    return frame


def _lines(mask: pd.Series) -> list[int]:
    """CSV line numbers (header is line 1) of the rows where `mask` holds."""
    return [int(i) + 2 for i in mask[mask].index]


def _all_lines(column: pd.Series) -> list[int]:
    return [i + 2 for i in range(len(column))]


def _first(items: Sequence[Any], what: str = "") -> str:
    shown = ", ".join(f"{what} {x}".strip() for x in items[:_SHOW])
    more = f" and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return shown + more


def _normalise_path(value: str) -> str | None:
    """Relative POSIX path, or None when the value is absolute or climbs out with '..'."""
    value = value.replace("\\", "/")
    if value.startswith("/") or re.match(r"^[A-Za-z]:", value):
        return None
    parts = PurePosixPath(value).parts
    if ".." in parts:
        return None
    return PurePosixPath(*parts).as_posix() if parts else ""


def _check_files(csv: Path, folder: Path, column: pd.Series) -> list[str]:
    empty = _lines(column == "")
    if empty:
        raise InputError(where(csv, f"empty file entry in {_first(empty, 'line')}"))
    files: list[str] = []
    for line, value in zip(_all_lines(column), column, strict=True):
        rel = _normalise_path(value)
        if rel is None or rel in ("", "."):
            raise InputError(
                where(csv, f"line {line}: file {value!r} is absolute or leaves the image folder {folder}")
            )
        files.append(rel)
    seen: dict[str, int] = {}
    repeated = []
    for f in files:
        seen[f] = seen.get(f, 0) + 1
        if seen[f] == 2:
            repeated.append(f)
    if repeated:
        raise InputError(where(csv, f"{len(repeated)} file(s) listed more than once: {_first(repeated)}"))
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise InputError(
            where(csv, f"{len(missing)} of {len(files)} file(s) not found in {folder}: {_first(missing)}")
        )
    _check_inside(csv, folder, files)
    return files


def _check_inside(csv: Path, folder: Path, files: Sequence[str]) -> None:
    """Refuse files that resolve outside the folder (a symbolic link, or a linked directory on the way)."""
    root = os.path.realpath(folder)
    outside = [f for f in files if os.path.commonpath([root, os.path.realpath(folder / f)]) != root]
    if outside:
        raise InputError(where(csv, f"{len(outside)} file(s) are links leading outside the image folder {folder}: "
                                    f"{_first(outside)}"))


def _labels(csv: Path, column: pd.Series, class_names: Sequence[str] | None) -> tuple[list[int], list[str]]:
    empty = _lines(column == "")
    if empty:
        raise InputError(where(csv, f"empty label in {_first(empty, 'line')}"))
    values = column.tolist()
    all_int = all(_INT.match(v) for v in values)
    if class_names is None:
        if all_int:
            names = [str(v) for v in sorted({int(v) for v in values})]
            values = [str(int(v)) for v in values]
        else:
            names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        return [index[v] for v in values], names

    names = [str(n) for n in class_names]
    if len(set(names)) != len(names) or not names:
        raise ConfigError(where("class_names", f"must be distinct and non-empty, got {names}"))
    index = {n: i for i, n in enumerate(names)}
    unknown = [(line, v) for line, v in zip(_all_lines(column), values, strict=True) if v not in index]
    if not unknown:
        return [index[v] for v in values], names
    # Integer labels are indices into class_names, but only when no label is written as a class name.
    if all_int and not any(v in index for v in values):
        out = [(line, int(v)) for line, v in zip(_all_lines(column), values, strict=True)]
        bad = [(line, v) for line, v in out if not 0 <= v < len(names)]
        if bad:
            raise InputError(
                where(csv, f"line {bad[0][0]}: label index {bad[0][1]} is out of range for {len(names)} "
                      f"class names {names}")
            )
        return [v for _, v in out], names
    line, value = unknown[0]
    more = f" ({len(unknown)} rows in all)" if len(unknown) > 1 else ""
    raise InputError(where(csv, f"line {line}: label {value!r} is not one of the class names {names}{more}"))


def _check_splits(csv: Path, column: pd.Series) -> list[str]:
    mapped = column.str.lower().map(SPLIT_ALIASES)
    bad = mapped.isna()
    if bad.any():
        line = _lines(bad)[0]
        value = column[bad].iloc[0]
        raise InputError(
            where(csv, f"line {line}: split {value!r} is not one of train, val, test "
                  f"({int(bad.sum())} bad rows)")
        )
    return mapped.astype(str).tolist()
