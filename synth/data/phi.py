"""Columns that look like protected health information (PHI).

A canonical dataset may carry coarse categorical attributes (sex, age group, site) but never direct identifiers.
Both column names and values are checked; findings name the column and the kind of PHI, never the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

# Column names that identify a person or pin them in time/place. Matched on the normalised name.
_NAME_PATTERNS: dict[str, re.Pattern[str]] = {
    "name": re.compile(r"^(patient_?)?(full_?|first_?|last_?|given_?|family_?|sur)?name$|^(fore|sur)name$"),
    "date of birth": re.compile(r"(^|_)(dob|date_?of_?birth|birth_?date|birthday)($|_)"),
    "medical record number": re.compile(r"(^|_)(mrn|medical_?record(_?number)?|record_?number)($|_)"),
    "address": re.compile(r"(^|_)(address|street|addr|zip_?code|postcode|postal_?code)($|_)"),
    "phone": re.compile(r"(^|_)(phone|telephone|mobile|fax|tel)($|_)"),
    "e-mail": re.compile(r"(^|_)(e_?mail)($|_)"),
    "national id": re.compile(r"(^|_)(ssn|social_?security|nhs_?number|passport)($|_)"),
}

# Value shapes that are PHI whatever the column is called.
_VALUE_PATTERNS: dict[str, re.Pattern[str]] = {
    "e-mail": re.compile(r"^[\w.+-]+@[\w-]+\.[\w.-]+$"),
    "phone": re.compile(r"^\+?\(?\d{1,4}\)?[\s.-]?\d{2,4}[\s.-]\d{3,4}([\s.-]\d{2,4})?$"),
    "date": re.compile(r"^(\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{4})([ T]\d{1,2}:\d{2}.*)?$"),
    "social security number": re.compile(r"^\d{3}-\d{2}-\d{4}$"),
}

# Columns synthgate itself manages; their values are checked elsewhere.
_MANAGED = {"image_id", "split", "label", "sha256", "file", "file_name", "patient_id"}


@dataclass(frozen=True)
class PhiFinding:
    column: str
    kind: str
    by: str  # "name" or "values"

    def message(self) -> str:
        return f"column {self.column!r} looks like PHI ({self.kind}, by its {self.by})"


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")


def find_phi_columns(frame: pd.DataFrame, *, value_share: float = 0.5) -> list[PhiFinding]:
    """Columns whose name, or at least `value_share` of whose non-empty values, look like PHI."""
    findings: list[PhiFinding] = []
    for column in frame.columns:
        norm = _normalise(str(column))
        hit = next((kind for kind, pat in _NAME_PATTERNS.items() if pat.search(norm)), None)
        if hit:
            findings.append(PhiFinding(str(column), hit, "name"))
            continue
        if norm in _MANAGED:
            continue
        values = frame[column].dropna().astype(str).str.strip()
        values = values[values != ""]
        if values.empty:
            continue
        for kind, pat in _VALUE_PATTERNS.items():
            if values.map(lambda v, p=pat: bool(p.match(v))).mean() >= value_share:
                findings.append(PhiFinding(str(column), kind, "values"))
                break
    return findings
