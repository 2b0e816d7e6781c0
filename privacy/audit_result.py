"""The privacy audit's header (`privacy.json`, kind "privacy_audit"): its schema and its one reader.

`privacy.audit.audit_privacy` writes it; the gate, the report and the release documents read it through
`load_privacy_audit`. Sections a consumer relies on are typed (memorization, disclosure, the ledger check,
membership); everything else is kept as written (extra keys allowed, so an older reader accepts a newer audit).

**The judged membership AUC** is defined here, once (`MembershipSummary.judged`): the strongest attack's AUC with
a *reliably reversed* attack (AUC CI entirely below 0.5) counted as 1 − AUC, because an attacker who learns a
score's sign from shadow models reaches that. The gate judges it, and the report and the datasheet show it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from synth import layout
from synth.artifacts import read_header


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")


class AttackSummary(_Section):
    """One membership attack's headline metrics (`privacy.membership.membership_summary`'s `attacks` entries)."""

    auc: float
    auc_ci: list[float] | None = None
    tpr_at_1pct_fpr: float | None = None
    tpr_at_1pct_fpr_ci: list[float] | None = None
    roc: dict[str, Any] | None = None

    @property
    def reversed(self) -> bool:
        """Members score reliably *below* non-members (the whole AUC CI under 0.5)."""
        return self.auc_ci is not None and len(self.auc_ci) == 2 and self.auc_ci[1] < 0.5


class JudgedAUC(BaseModel):
    """The membership AUC the gate judges and every document shows, with the CI and attack it comes from."""

    model_config = ConfigDict(frozen=True)

    value: float
    ci: list[float] | None
    attack: str | None
    reversed: bool  # True when the value counts a reversed attack as 1 − AUC


class MembershipSummary(_Section):
    """The `membership` section: headline numbers (max over attacks), each attack, and the caveats."""

    status: str = "measured"
    auc: float | None = None
    auc_ci: list[float] | None = None
    auc_attack: str | None = None
    auc_any_direction: float | None = None
    tpr_at_1pct_fpr: float | None = None
    attacks: dict[str, AttackSummary] = Field(default_factory=dict)
    note: str | None = None

    @property
    def measured(self) -> bool:
        return self.auc is not None and math.isfinite(self.auc)

    @property
    def judged(self) -> JudgedAUC | None:
        """The judged AUC (module docstring); None when membership was not measured."""
        if not self.measured:
            return None
        headline = JudgedAUC(value=float(self.auc), ci=self.auc_ci, attack=self.auc_attack, reversed=False)
        flipped = [(1 - a.auc, name, a) for name, a in self.attacks.items() if a.reversed]
        best = max(flipped, key=lambda t: t[0], default=None)
        if self.auc_any_direction is not None and (best is None or not math.isclose(best[0], self.auc_any_direction)):
            # Written by a newer/other writer without the per-attack CIs that say which attack it came from.
            if self.auc_any_direction > headline.value:
                return JudgedAUC(value=float(self.auc_any_direction), ci=None, attack=None, reversed=True)
            return headline
        if best is None or best[0] <= headline.value:
            return headline
        value, name, attack = best
        ci = [1 - attack.auc_ci[1], 1 - attack.auc_ci[0]] if attack.auc_ci else None
        return JudgedAUC(value=float(value), ci=ci, attack=name, reversed=True)


class LedgerCheckSummary(_Section):
    """The `ledger_check` section (`privacy.ledger_check.LedgerCheck.to_json` plus its message)."""

    passed: bool
    epsilon_claimed: float | None = None
    epsilon_recomputed: float | None = None
    message: str | None = None


class MemorizationSummary(_Section):
    """The `memorization` section: flagged share, thresholds and the files holding the rows and plot data."""

    flagged_fraction: float
    table: str = layout.MEMORIZATION_TABLE
    thresholds: dict[str, Any] | None = None
    plots: str | None = None


class DisclosureSummary(_Section):
    """The `disclosure` section: k-anonymity of the released attributes."""

    k: int
    columns: list[str] = Field(default_factory=list)


class PrivacyAudit(_Section):
    """A privacy audit directory's header."""

    kind: str
    schema_version: int
    content_hash: str
    inputs: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)
    files: list[str] = Field(default_factory=list)
    created: str
    counts: dict[str, Any] = Field(default_factory=dict)
    memorization: MemorizationSummary
    disclosure: DisclosureSummary
    ledger_check: LedgerCheckSummary | None = None
    membership: MembershipSummary | None = None

    @property
    def judged_membership_auc(self) -> float | None:
        judged = self.membership.judged if self.membership is not None else None
        return None if judged is None else judged.value


def parse_privacy_audit(header: dict[str, Any], *, source: object) -> PrivacyAudit:
    """Validate a `privacy.json` header already read (one-line InputError naming `source` when malformed)."""
    from synth.header_schema import parse_header

    return parse_header(PrivacyAudit, header, source=source, what="privacy audit header")


def read_privacy_audit(root: Path) -> dict[str, Any]:
    """The header of a privacy audit directory as written (a plain dict), after checking it against
    `PrivacyAudit`."""
    header = read_header(Path(root), layout.PRIVACY_AUDIT_HEADER, kind=layout.PRIVACY_AUDIT_KIND)
    parse_privacy_audit(header, source=Path(root) / layout.PRIVACY_AUDIT_HEADER)
    return header


def load_privacy_audit(root: Path) -> PrivacyAudit:
    """The typed header of a privacy audit directory."""
    header = read_header(Path(root), layout.PRIVACY_AUDIT_HEADER, kind=layout.PRIVACY_AUDIT_KIND)
    return parse_privacy_audit(header, source=Path(root) / layout.PRIVACY_AUDIT_HEADER)
