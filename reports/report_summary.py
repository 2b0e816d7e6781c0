"""The audit report's summary (`summary.json`, header kind "report"): its schema and its one reader.

`reports.report.render_report` writes it beside `report.html` (body: `build_context(...)["summary"]`);
`synthgate report` and the tests read it through `load_report_summary`. Extra keys are allowed (a newer report may
record more); a malformed summary is one `InputError` line naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from reports.report_layout import KIND, SUMMARY
from synth.header_schema import HeaderModel, load_header


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")


class SummaryKeyNumber(_Section):
    """One key number with its CI, its status against the policy and the gate checks that judged it."""

    key: str
    label: str
    value: float | int | bool | str | None = None
    ci: list[float] | None = None
    display: str = ""
    status: str
    checks: list[str] = Field(default_factory=list)
    note: str | None = None
    threshold: float | int | bool | str | None = None


class SummaryVerdict(_Section):
    """The gate's decision and the failed checks' messages."""

    decision: str
    reasons: list[str] = Field(default_factory=list)


class ReportSummary(HeaderModel):
    """A report directory's header: the key numbers, the verdict (None before the gate ran), what the report shows."""

    public: bool
    gate_evaluated: bool
    verdict: SummaryVerdict | None = None
    key_numbers: list[SummaryKeyNumber] = Field(default_factory=list)
    status_counts: dict[str, int] = Field(default_factory=dict)
    class_names: list[str] = Field(default_factory=list)
    synthetic_counts: dict[str, int] = Field(default_factory=dict)
    sample_images_withheld: int = 0
    sections: list[str] = Field(default_factory=list)

    def count(self, status: str) -> int:
        """Key numbers with `status` (one of `reports.report_layout.STATUSES`; 0 for any other)."""
        return int(self.status_counts.get(status, 0))


WHAT = "report summary"


def read_report_summary(root: Path) -> dict[str, Any]:
    """The summary of the report directory `root` as written (checked against `ReportSummary`)."""
    return load_header(ReportSummary, Path(root), SUMMARY, kind=KIND, what=WHAT)[0]


def load_report_summary(root: Path) -> ReportSummary:
    """The typed summary of the report directory `root`."""
    return load_header(ReportSummary, Path(root), SUMMARY, kind=KIND, what=WHAT)[1]
