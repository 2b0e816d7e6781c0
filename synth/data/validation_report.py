"""The validation report of a canonical dataset: its findings (counts, column names and rule ids, never a data
value) and the reader of `report.json` (`load_report`). Written by `synth.data.validate`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from synth import layout
from synth.artifacts import read_header
from synth.data.expectations import ExpectationResult
from synth.errors import ValidationFailed, where

Severity = Literal["block", "warn", "info"]
SEVERITY_ORDER = {"block": 0, "warn": 1, "info": 2}

KIND = "validation"
SCHEMA_VERSION = 1
REPORT = layout.VALIDATION_REPORT


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
            "summary": {s: sum(f.severity == s for f in self.findings) for s in SEVERITY_ORDER},
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
