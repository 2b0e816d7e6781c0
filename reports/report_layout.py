"""Names and sizes of the steward's audit report (`reports.report`): its files, sections and sample sizes."""

from __future__ import annotations

from pathlib import Path

from synth import layout

KIND = "report"
SCHEMA_VERSION = 1
HTML = layout.REPORT_HTML
SUMMARY = layout.REPORT_SUMMARY
TEMPLATES = Path(__file__).parent / "templates"
TEMPLATE = "report.html.j2"

PRIVACY_HEADER = layout.PRIVACY_AUDIT_HEADER
MEMORIZATION_TABLE = layout.MEMORIZATION_TABLE
UTILITY_ROC = layout.UTILITY_ROC
SYNTHETIC_SPLIT = "synthetic"

SAMPLES_PER_CLASS = 24
SAMPLE_COLUMNS = 8
SIDE_BY_SIDE = 16  # real and synthetic images per class in the steward's comparison
PAIRS_PER_SPACE = 8
DUPLICATE_GROUPS_SHOWN = 20
SELECTION_SEED = 0

# Every section of the report, in order: (id, title). Both variants have all of them (the public one says what it
# leaves out), so a reader and a test can find each by id.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("summary", "Summary"),
    ("samples", "Synthetic samples per class"),
    ("real-vs-synthetic", "Real and synthetic side by side"),
    ("memorization", "Memorization: closest synthetic↔training pairs"),
    ("membership", "Membership inference"),
    ("utility", "Utility: is the clinical signal preserved?"),
    ("fidelity", "Fidelity"),
    ("disclosure", "Attribute disclosure"),
    ("privacy-ledger", "Privacy ledger"),
    ("provenance", "Dataset provenance"),
    ("gate", "Gate verdict"),
)
SECTION_IDS: tuple[str, ...] = tuple(s for s, _ in SECTIONS)
STATUSES = ("green", "amber", "red", "none", "not_judged")

