"""The gate and the report: the numbers the gate judges, read off the artifacts through their typed readers; the
verdict; the steward's and public reports; the Prefect summary of the utility numbers."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flows.policy import DPAuditOutcome, GateInputs, Verdict, gate
from flows.release_config import ReleaseConfig
from flows.stage_runner import (
    PUBLIC_REPORT,
    REPORT,
    VERDICT,
)
from synth.artifacts import atomic_file


def gate_inputs(privacy_dir: Path, utility_dir: Path, model: Path, released: Path,
                dp_audit: Path | None = None) -> GateInputs:
    """The numbers the gate judges, read off the artifacts (and recomputed on the released set where it matters:
    what is released is what must be safe)."""
    import pandas as pd

    from privacy.audit_result import load_privacy_audit
    from privacy.disclosure import check_disclosure
    from privacy.ledger import read_model_ledger
    from reports.utility_result import load_utility_audit
    from synth.data.canonical import load_dataset
    from synth.model_card import load_model_card

    audit = load_privacy_audit(privacy_dir)
    utility = load_utility_audit(utility_dir)
    claim = load_model_card(model).privacy
    ledger = read_model_ledger(model)
    rel = load_dataset(released)
    table = pd.read_parquet(privacy_dir / audit.memorization.table, columns=["image_id", "flagged"])
    flagged_ids = set(table.loc[table["flagged"], "image_id"])
    released_ids = rel.metadata["image_id"]
    membership = audit.membership
    # The released set is re-checked on the columns the audit judged released (label + patient attributes).
    disclosure = check_disclosure(rel.metadata, k=audit.disclosure.k, columns=list(audit.disclosure.columns))
    counts = rel.info.counts.per_class.get("synthetic", {})
    return GateInputs(
        dp=ledger is not None or claim is not None,
        # One ε: the ledger's, which the ledger check recomputes; the card's is compared with it by the gate.
        epsilon=ledger.epsilon if ledger is not None else None,
        delta=ledger.delta if ledger is not None else None,
        card_epsilon=claim.epsilon if claim is not None else None,
        ledger_check_passed=None if audit.ledger_check is None else audit.ledger_check.passed,
        flagged_fraction=float(released_ids.isin(flagged_ids).mean()) if len(released_ids) else 1.0,
        flagged_fraction_before_filter=audit.memorization.flagged_fraction,
        membership_auc=audit.judged_membership_auc,
        membership_tpr_at_1pct_fpr=membership.tpr_at_1pct_fpr if membership is not None else None,
        **utility_gate_fields(utility.body()),
        per_class_counts={str(k): int(v) for k, v in counts.items()},
        disclosure_violations=disclosure.violations + int(disclosure.released_patient_id),
        dp_audit=_dp_audit_outcome(dp_audit),
    )


def _dp_audit_outcome(root: Path | None) -> DPAuditOutcome | None:
    if root is None:
        return None
    from privacy.dp_audit import read_dp_audit

    h = read_dp_audit(root)
    return DPAuditOutcome(epsilon_lower_bound=h["epsilon_lower_bound"], claimed_epsilon=h["claimed_epsilon"],
                          epsilon_ceiling=h["epsilon_ceiling"], canaries=h["canaries"])


def utility_gate_fields(utility: Mapping[str, Any]) -> dict[str, float | None]:
    """The `GateInputs` fields read off a `utility.json` body (None where the audit did not measure them)."""
    from reports.utility_result import metric_value, paired_ratio

    return {
        "tstr_trtr_balanced_accuracy_ratio": paired_ratio(utility, "balanced_accuracy"),
        "tstr_trtr_worst_class_ratio": paired_ratio(utility, "worst_class_sensitivity"),
        "trts_balanced_accuracy": metric_value(utility, "trts", "balanced_accuracy"),
        "tstr_trtr_ratio": (utility.get("tstr_over_trtr") or {}).get("value"),
        "trts_accuracy": metric_value(utility, "trts", "accuracy"),
    }


def utility_markdown(utility_dir: Path) -> str:
    """Key utility numbers for the Prefect summary: balanced accuracy and the worst class first, with the floor a
    majority-class classifier scores (numbers only)."""
    from reports.facts import UtilityAuditFacts
    from reports.utility_result import load_utility_audit

    u = UtilityAuditFacts.from_utility(load_utility_audit(utility_dir).body())

    def est(e: Any) -> str:
        return "–" if e is None else f"{e.value:.3f}"

    lines = ["| | TRTR | TSTR | TRTS |", "|---|---|---|---|"]
    for label, values in (("balanced accuracy", u.balanced_accuracy),
                          ("worst-class sensitivity", u.worst_class_sensitivity), ("AUROC", u.auroc)):
        lines.append(f"| {label} | " + " | ".join(est(values.get(p)) for p in ("TRTR", "TSTR", "TRTS")) + " |")
    worst = ", ".join(f"{p}: {c}" for p, c in u.worst_class.items())
    ratios = "; ".join(f"{m.replace('_', ' ')} {e.value:.3f}" for m, e in u.ratios.items())
    m = u.majority_baseline
    floor = (f"Always predicting '{m['class']}' scores balanced accuracy {float(m['balanced_accuracy']):.3f}, "
             f"accuracy {float(m['accuracy']):.3f}." if m.get("class") is not None else "")
    return "\n".join([*lines, "", f"TSTR/TRTR ratios: {ratios or '–'}. Worst classes: {worst or '–'}. {floor}"])


def gate_stage(cfg: ReleaseConfig, privacy_dir: Path, utility_dir: Path, model: Path, released: Path,
               dp_audit: Path | None = None) -> Verdict:
    """Judge the run against the policy; the verdict is written to the work dir (small JSON)."""
    verdict = gate(gate_inputs(privacy_dir, utility_dir, model, released, dp_audit), cfg.policy)
    with atomic_file(cfg.workdir / VERDICT) as tmp:
        tmp.write_text(verdict.model_dump_json(indent=2))
    return verdict


def report_stage(
    cfg: ReleaseConfig, *, dataset: Path, model: Path, released: Path, privacy_dir: Path, utility_dir: Path,
    verdict: Verdict | None, public: bool,
) -> Path:
    """The steward's report (real images shown; never leaves the site) or its public variant (no real pixels)."""
    from reports.report import render_report

    out = cfg.workdir / (PUBLIC_REPORT if public else REPORT)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(out)  # cheap to redo, and the verdict changes between the two renderings of a run
    return render_report(privacy_dir=privacy_dir, utility_dir=utility_dir, real_dir=dataset, synthetic_dir=released,
                         model_dir=model, verdict=verdict, out=out, public=public)
