"""The release policy and the gate that turns audit numbers into pass or block.

A policy is a YAML mapping of thresholds (see `Policy`). The gate checks every threshold that is set and returns
all reasons, not just the first: a steward fixing a blocked release needs the whole list. A metric that a policy
constrains but the run did not measure blocks the release (fail closed). The verdict's schema (`Verdict`, `Check`)
lives in `reports.verdict`, beside its reader, since the report reads it too.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from reports.verdict import Check, Verdict
from synth.config import build, load_yaml

__all__ = ["Check", "GateInputs", "Policy", "Verdict", "gate"]  # Check and Verdict: the verdict's schema


class Policy(BaseModel):
    """Thresholds a release must meet. `None` leaves a metric unconstrained."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    require_dp: bool = False
    max_epsilon: float | None = Field(None, gt=0)
    max_delta: float | None = Field(None, gt=0, lt=1)
    max_flagged_fraction: float | None = Field(0.0, ge=0, le=1)  # after filtering flagged images out
    # Before filtering: a generator that copies many patients is not made safe by dropping the copies we found.
    max_flagged_fraction_before_filter: float | None = Field(0.05, ge=0, le=1)
    max_membership_auc: float | None = Field(None, ge=0.5, le=1)
    max_membership_tpr_at_1pct_fpr: float | None = Field(None, ge=0, le=1)
    # Utility, judged per class: a synthetic set that trains a classifier which never predicts a class is blocked
    # whatever its AUROC. Defaults from measurements on two modalities (README, benchmarks/README.md).
    min_tstr_trtr_balanced_accuracy_ratio: float | None = Field(0.85, ge=0)
    min_tstr_trtr_worst_class_ratio: float | None = Field(0.7, ge=0)
    min_trts_balanced_accuracy: float | None = Field(0.7, ge=0, le=1)
    # AUROC ratio and plain TRTS accuracy: off by default (AUROC ranks; accuracy follows the class prior).
    min_tstr_trtr_ratio: float | None = Field(None, ge=0)
    min_trts_accuracy: float | None = Field(None, ge=0, le=1)
    min_per_class_count: int | None = Field(None, ge=0)
    disclosure_k: int = Field(5, ge=1)
    require_ledger_check: bool = True  # a DP claim must be recomputed independently
    # A DP release's canary audit (privacy/dp_audit.py) must have run, and its ε lower bound must not exceed the
    # audit run's claimed ε (if it does, the DP implementation does not deliver its claim).
    require_dp_audit: bool = True

    @classmethod
    def from_yaml(cls, path: Path) -> Policy:
        """Load a policy file; one-line errors name the file and the field."""
        data = load_yaml(path)
        return build(cls, data.get("policy", data), source=path)

    def loosened(self) -> tuple[str, ...]:
        """Each rule this policy makes less strict than synthgate's defaults ("rule = value (default d)"): a
        researcher must be told when a release passed a gate the steward lowered. Stricter settings are not listed."""
        default = type(self)()
        out = []
        for name in type(self).model_fields:
            mine, theirs = getattr(self, name), getattr(default, name)
            if mine == theirs:
                continue
            way = LOOSER[name]
            if way == "off":
                looser = theirs and not mine
            elif way == "lower":
                looser = theirs is not None and (mine is None or mine < theirs)
            else:  # "higher"
                looser = theirs is not None and (mine is None or mine > theirs)
            if looser:
                out.append(f"{name} = {'off' if mine is None else mine} (default {theirs})")
        return tuple(out)


# Which way each rule of `Policy` gets less strict: "higher" (a ceiling raised), "lower" (a floor lowered; k, the
# smallest group released, too), "off" (a requirement dropped); None (unconstrained) is the loosest of all. Every
# field is listed here, checked by a test, so a new rule is never judged by its name.
Loosens = Literal["off", "higher", "lower"]
LOOSER: dict[str, Loosens] = {
    "require_dp": "off", "max_epsilon": "higher", "max_delta": "higher", "max_flagged_fraction": "higher",
    "max_flagged_fraction_before_filter": "higher", "max_membership_auc": "higher",
    "max_membership_tpr_at_1pct_fpr": "higher", "min_tstr_trtr_balanced_accuracy_ratio": "lower",
    "min_tstr_trtr_worst_class_ratio": "lower", "min_trts_balanced_accuracy": "lower", "min_tstr_trtr_ratio": "lower",
    "min_trts_accuracy": "lower", "min_per_class_count": "lower", "disclosure_k": "lower",
    "require_ledger_check": "off", "require_dp_audit": "off",
}


class DPAuditOutcome(BaseModel):
    """What the gate needs of a canary audit (`privacy.dp_audit`): its ε lower bound and the ε its run claims."""

    model_config = ConfigDict(frozen=True)

    epsilon_lower_bound: float
    claimed_epsilon: float
    epsilon_ceiling: float
    canaries: int


class GateInputs(BaseModel):
    """The numbers the gate judges, read off the run's artifacts by the flow."""

    model_config = ConfigDict(frozen=True)

    dp: bool
    epsilon: float | None = None  # the privacy ledger's ε: the value the ledger check recomputes
    # The ε the model card states (what people read). Compared with the ledger's when the caller sets this field
    # (`flows.stages.gate_inputs` always does, None meaning "the card states none"); left unset, not compared.
    card_epsilon: float | None = None
    delta: float | None = None
    ledger_check_passed: bool | None = None
    flagged_fraction: float | None = None  # in the set to be released (after filtering)
    flagged_fraction_before_filter: float | None = None  # in the generated set
    membership_auc: float | None = None
    membership_tpr_at_1pct_fpr: float | None = None
    tstr_trtr_balanced_accuracy_ratio: float | None = None
    tstr_trtr_worst_class_ratio: float | None = None  # TSTR's worst-class sensitivity / TRTR's
    trts_balanced_accuracy: float | None = None
    tstr_trtr_ratio: float | None = None  # AUROC
    trts_accuracy: float | None = None
    per_class_counts: dict[str, int] = Field(default_factory=dict)
    disclosure_violations: int | None = None  # attribute combinations released with fewer than k records
    dp_audit: DPAuditOutcome | None = None  # the canary audit of a DP run (None: not run)


def _upper(rule: str, value: float | None, limit: float | None, what: str) -> Check | None:
    if limit is None:
        return None
    if value is None:
        return Check(rule=rule, passed=False, value=None, threshold=limit, message=f"{what} was not measured")
    ok = value <= limit
    op = "<=" if ok else ">"
    return Check(rule=rule, passed=ok, value=value, threshold=limit, message=f"{what} {value:.4g} {op} {limit:g}")


def _lower(rule: str, value: float | None, limit: float | None, what: str) -> Check | None:
    if limit is None:
        return None
    if value is None:
        return Check(rule=rule, passed=False, value=None, threshold=limit, message=f"{what} was not measured")
    ok = value >= limit
    op = ">=" if ok else "<"
    return Check(rule=rule, passed=ok, value=value, threshold=limit, message=f"{what} {value:.4g} {op} {limit:g}")


def _card_epsilon(card: float | None, ledger: float | None) -> Check:
    """The model card must state the ε its privacy ledger proves: a card edited after training misleads readers."""
    ok = card is not None and ledger is not None and math.isclose(card, ledger, rel_tol=1e-9, abs_tol=1e-12)
    if ok:
        message = f"model card ε {card:.4g} equals the privacy ledger's ε"
    elif card is None:
        message = "model card states no ε, but the model has a privacy ledger" if ledger is not None \
            else "neither the model card nor a privacy ledger states ε"
    elif ledger is None:
        message = f"model card states ε {card:.4g}, but the model has no privacy ledger"
    else:
        message = f"model card states ε {card:.6g}, but its privacy ledger's ε is {ledger:.6g}"
    return Check(rule="card_epsilon", passed=ok, value=card, threshold=ledger, message=message)


def _dp_audit(audit: DPAuditOutcome | None) -> Check:
    """The empirical check of the DP implementation: its canary run's ε lower bound within that run's claim."""
    if audit is None:
        return Check(rule="dp_audit", passed=False, value=None, threshold=None,
                     message="the canary audit of the DP implementation was not run (dp_audit.enabled: false); "
                             "set policy.require_dp_audit: false to release without it")
    ok = audit.epsilon_lower_bound <= audit.claimed_epsilon
    message = (f"canary audit: empirical ε ≥ {audit.epsilon_lower_bound:.3g} "
               f"{'within' if ok else 'EXCEEDS'} the audit run's claimed ε {audit.claimed_epsilon:.3g} "
               f"({audit.canaries} canaries; detectable up to ε ≈ {audit.epsilon_ceiling:.2g})")
    return Check(rule="dp_audit", passed=ok, value=audit.epsilon_lower_bound, threshold=audit.claimed_epsilon,
                 message=message)


def gate(inputs: GateInputs, policy: Policy) -> Verdict:
    """Judge a run against a policy; every failed check is a reason to block."""
    checks: list[Check | None] = []
    if policy.require_dp:
        checks.append(Check(rule="require_dp", passed=inputs.dp, value=inputs.dp, threshold=True,
                            message="trained with DP-SGD" if inputs.dp else "policy requires DP, model is not private"))
    if inputs.dp or policy.require_dp:
        checks.append(_upper("max_epsilon", inputs.epsilon, policy.max_epsilon, "ε"))
        checks.append(_upper("max_delta", inputs.delta, policy.max_delta, "δ"))
        if policy.require_ledger_check:
            ok = bool(inputs.ledger_check_passed)
            checks.append(Check(
                rule="ledger_check", passed=ok, value=inputs.ledger_check_passed, threshold=True,
                message="ε recomputed independently from the ledger agrees with the claim" if ok
                else "ε could not be confirmed from the privacy ledger",
            ))
        if "card_epsilon" in inputs.model_fields_set:
            checks.append(_card_epsilon(inputs.card_epsilon, inputs.epsilon))
        if policy.require_dp_audit:
            checks.append(_dp_audit(inputs.dp_audit))
    elif policy.max_epsilon is not None:
        checks.append(Check(rule="max_epsilon", passed=False, value=None, threshold=policy.max_epsilon,
                            message="policy bounds ε but the model is not differentially private"))
    checks.append(_upper("max_flagged_fraction", inputs.flagged_fraction, policy.max_flagged_fraction,
                         "memorization: flagged fraction of released images"))
    checks.append(_upper("max_flagged_fraction_before_filter", inputs.flagged_fraction_before_filter,
                         policy.max_flagged_fraction_before_filter,
                         "memorization: flagged fraction of generated images"))
    checks.append(_upper("max_membership_auc", inputs.membership_auc, policy.max_membership_auc, "membership AUC"))
    checks.append(_upper("max_membership_tpr_at_1pct_fpr", inputs.membership_tpr_at_1pct_fpr,
                         policy.max_membership_tpr_at_1pct_fpr, "membership TPR@1%FPR"))
    checks.append(_lower("min_tstr_trtr_balanced_accuracy_ratio", inputs.tstr_trtr_balanced_accuracy_ratio,
                         policy.min_tstr_trtr_balanced_accuracy_ratio, "TSTR/TRTR balanced-accuracy ratio"))
    checks.append(_lower("min_tstr_trtr_worst_class_ratio", inputs.tstr_trtr_worst_class_ratio,
                         policy.min_tstr_trtr_worst_class_ratio, "TSTR/TRTR worst-class sensitivity ratio"))
    checks.append(_lower("min_trts_balanced_accuracy", inputs.trts_balanced_accuracy,
                         policy.min_trts_balanced_accuracy, "TRTS balanced accuracy"))
    checks.append(_lower("min_tstr_trtr_ratio", inputs.tstr_trtr_ratio, policy.min_tstr_trtr_ratio,
                         "TSTR/TRTR AUROC ratio"))
    checks.append(_lower("min_trts_accuracy", inputs.trts_accuracy, policy.min_trts_accuracy, "TRTS accuracy"))
    if policy.min_per_class_count is not None:
        if not inputs.per_class_counts:
            checks.append(Check(rule="min_per_class_count", passed=False, value=None,
                                threshold=policy.min_per_class_count, message="per-class counts were not measured"))
        for name, count in sorted(inputs.per_class_counts.items()):
            checks.append(_lower("min_per_class_count", count, policy.min_per_class_count, f"images of class {name!r}"))
    violations = inputs.disclosure_violations
    checks.append(Check(
        rule="disclosure_k", passed=violations == 0, value=violations, threshold=policy.disclosure_k,
        message=(f"every released attribute combination has >= {policy.disclosure_k} records" if violations == 0
                 else "disclosure check was not run" if violations is None
                 else f"{violations} attribute combination(s) have fewer than {policy.disclosure_k} records"),
    ))
    kept = [c for c in checks if c is not None]
    return Verdict(decision="pass" if all(c.passed for c in kept) else "block", checks=kept)
