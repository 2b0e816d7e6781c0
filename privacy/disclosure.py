"""Attribute disclosure: k-anonymity of the attributes a synthetic set releases.

Each combination of released attributes (label × sex × age group …) must describe at least k synthetic records;
a rare combination can point at the one real patient it came from. Counts only: no pixel, no identifier.

Released attributes are the label plus the synthetic set's attribute columns that are *patient* attributes, i.e.
that the real dataset also has (a column only the synthetic set has, such as a generation seed, describes no
patient). A `patient_id` column in a synthetic set is itself a disclosure and always blocks.

Suppression (what `suppress` does, and what `--filter` applies): first *generalise* — in every record of a
combination with fewer than k records, replace the non-label attribute values with `SUPPRESSED` ("*"), which
merges those records into the label's "any value" combination; then *remove* the records whose combination is
still below k (only possible when a label itself has fewer than k records, or the "*" group of a label is still
small). Labels are never generalised: they are what the synthetic set is for. Both counts are reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from synth.errors import ConfigError

SUPPRESSED = "*"
NOT_ATTRIBUTES = ("image_id", "split", "sha256", "patient_id")


@dataclass(frozen=True)
class DisclosureResult:
    """Per-combination counts before (and after) suppression, with what suppression changed."""

    k: int
    columns: list[str]
    combinations: list[dict[str, Any]]  # {"values": {col: value}, "count": n, "below_k": bool}
    violations: int  # combinations with fewer than k records in the set as given
    records_in_violations: int
    released_patient_id: bool
    rows_generalised: int = 0
    rows_removed: int = 0
    combinations_after: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.violations == 0 and not self.released_patient_id

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "columns": self.columns,
            "passed": self.passed,
            "violations": self.violations,
            "records_in_violations": self.records_in_violations,
            "released_patient_id": self.released_patient_id,
            "suppression": {
                "method": "generalise non-label attributes to '*', then remove rows still below k",
                "rows_generalised": self.rows_generalised,
                "rows_removed": self.rows_removed,
            },
            "combinations": self.combinations,
            "combinations_after_suppression": self.combinations_after,
        }


def released_columns(synthetic: pd.DataFrame, real_attributes: Sequence[str] | None = None) -> list[str]:
    """`label` plus the synthetic attribute columns that are patient attributes (present in `real_attributes`;
    all non-bookkeeping columns when `real_attributes` is None)."""
    cols = [c for c in synthetic.columns if c not in NOT_ATTRIBUTES and c != "label"]
    if real_attributes is not None:
        cols = [c for c in cols if c in set(real_attributes)]
    return ["label", *cols]


def _combination_counts(meta: pd.DataFrame, columns: list[str], k: int) -> list[dict[str, Any]]:
    if meta.empty:
        return []
    keyed = meta[columns].astype(object).where(meta[columns].notna(), None)
    counts = keyed.value_counts(dropna=False, sort=False).sort_index()
    out = []
    for values, n in counts.items():
        values = values if isinstance(values, tuple) else (values,)
        out.append(
            {
                "values": {c: _plain(v) for c, v in zip(columns, values, strict=True)},
                "count": int(n),
                "below_k": int(n) < k,
            }
        )
    return out


def _plain(v: Any) -> Any:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    return v.item() if hasattr(v, "item") else v


def _group_sizes(meta: pd.DataFrame, columns: list[str]) -> np.ndarray:
    keyed = meta[columns].astype(str)  # NaN/None become "nan"/"None": their own group, as in value_counts
    return keyed.groupby(columns, sort=False)[columns[0]].transform("size").to_numpy()


def check_disclosure(
    synthetic: pd.DataFrame,
    *,
    k: int = 5,
    columns: Sequence[str] | None = None,
    real_attributes: Sequence[str] | None = None,
) -> DisclosureResult:
    """Count every combination of released attributes and find those with fewer than `k` records; also
    compute what `suppress` would change (without changing anything)."""
    if k < 1:
        raise ConfigError(f"disclosure k {k!r} must be >= 1")
    cols = list(columns) if columns is not None else released_columns(synthetic, real_attributes)
    missing = [c for c in cols if c not in synthetic.columns]
    if missing:
        raise ConfigError(f"disclosure columns {missing} are not in the synthetic metadata")
    combos = _combination_counts(synthetic, cols, k)
    below = [c for c in combos if c["below_k"]]
    generalised_meta, mask, report = _suppress(synthetic, cols, k)
    return DisclosureResult(
        k=k,
        columns=cols,
        combinations=combos,
        violations=len(below),
        records_in_violations=sum(c["count"] for c in below),
        released_patient_id="patient_id" in synthetic.columns,
        rows_generalised=report["rows_generalised"],
        rows_removed=report["rows_removed"],
        combinations_after=_combination_counts(generalised_meta[mask], cols, k),
    )


def _suppress(meta: pd.DataFrame, cols: list[str], k: int) -> tuple[pd.DataFrame, np.ndarray, dict[str, int]]:
    out = meta.reset_index(drop=True).copy()
    attrs = [c for c in cols if c != "label"]
    generalised = 0
    if attrs and len(out):
        small = _group_sizes(out, cols) < k
        generalised = int(small.sum())
        if generalised:
            for c in attrs:
                out[c] = out[c].astype(object)
                out.loc[small, c] = SUPPRESSED
    keep = np.ones(len(out), dtype=bool)
    if len(out):
        keep = _group_sizes(out, cols) >= k
    return out, keep, {"rows_generalised": generalised, "rows_removed": int((~keep).sum())}


def suppress(
    synthetic: pd.DataFrame,
    *,
    k: int = 5,
    columns: Sequence[str] | None = None,
    real_attributes: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, np.ndarray, dict[str, int]]:
    """Apply k-anonymity suppression. Returns (metadata with generalised values, boolean mask of rows to keep,
    counts). Rows of the returned metadata line up with the input's rows (index reset)."""
    cols = list(columns) if columns is not None else released_columns(synthetic, real_attributes)
    return _suppress(synthetic, cols, k)
