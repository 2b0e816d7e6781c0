"""The utility audit's header (`utility.json`, kind "utility_audit"): its schema and its one reader.

`reports.utility.audit_utility` writes it; the gate, the report, the CLI summary and the release documents read
it through `load_utility_audit`. Metrics are `{"value": v, "ci": [lo, hi]}` mappings; the sections consumers rely
on are typed, everything else is kept as written (extra keys allowed, for forward compatibility).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from synth import layout
from synth.header_schema import HeaderModel, load_header, parse_header


class UtilityAudit(HeaderModel):
    """A utility audit directory's header."""

    class_names: list[str]
    trtr: dict[str, Any] | None = None
    trts: dict[str, Any] | None = None
    tstr: dict[str, Any] | None = None
    tstr_vs_trtr: dict[str, Any] | None = None
    tstr_over_trtr: dict[str, Any] | None = None
    baselines: dict[str, Any] | None = None

    def body(self) -> dict[str, Any]:
        """The header as a plain dict, as written (for code that walks the JSON)."""
        return self.model_dump(mode="json")


def metric_value(utility: Mapping[str, Any], setting: str, metric: str) -> float | None:
    """A protocol's point estimate in a `utility.json` body (`setting` 'trtr', 'trts' or 'tstr'); None when the
    audit did not measure it."""
    return ((utility.get(setting) or {}).get(metric) or {}).get("value")


def paired_ratio(utility: Mapping[str, Any], metric: str) -> float | None:
    """TSTR/TRTR of `metric` in a `utility.json` body (paired bootstrap point estimate); None when not measured."""
    return (((utility.get("tstr_vs_trtr") or {}).get(metric) or {}).get("ratio") or {}).get("value")


def parse_utility_audit(header: dict[str, Any], *, source: object) -> UtilityAudit:
    """Validate a `utility.json` header already read (one-line InputError naming `source` when malformed)."""
    return parse_header(UtilityAudit, header, source=source, what="utility audit header")


def read_utility_audit(root: Path) -> dict[str, Any]:
    """The header of a utility audit directory as written (a plain dict), after checking it against
    `UtilityAudit`."""
    return load_header(UtilityAudit, Path(root), layout.UTILITY_HEADER, kind=layout.UTILITY_KIND,
                       what="utility audit header")[0]


def load_utility_audit(root: Path) -> UtilityAudit:
    """The typed header of a utility audit directory."""
    return load_header(UtilityAudit, Path(root), layout.UTILITY_HEADER, kind=layout.UTILITY_KIND,
                       what="utility audit header")[1]
