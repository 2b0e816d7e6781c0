"""The audit report's key numbers (`reports.report`) and their red/amber/green status against the gate's checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from privacy.audit_result import MembershipSummary
from reports.report_format import _finite, fmt, fmt_pct, metric_parts
from reports.report_inputs import ReportInputs
from reports.report_layout import SYNTHETIC_SPLIT
from synth.data.canonical import Dataset

# --------------------------------------------------------------------------------------------------------------
# Key numbers and their status against the policy


@dataclass(frozen=True)
class KeyNumber:
    key: str
    label: str
    value: float | int | None
    ci: list[float] | None
    display: str
    rules: tuple[str, ...] = ()
    direction: str | None = None  # "max" (value must stay below) or "min"
    note: str = ""


def status_of(k: KeyNumber, verdict: Mapping[str, Any] | None) -> tuple[str, list[dict[str, Any]]]:
    """(status, the verdict's checks on this number); see the module docstring for the statuses."""
    if verdict is None:
        return "not_judged", []
    checks = [c for c in verdict["checks"] if c["rule"] in k.rules]
    if not checks:
        return "none", []
    if not all(c["passed"] for c in checks):
        return "red", checks
    thresholds = [c["threshold"] for c in checks if _finite(c["threshold"])]
    if k.ci and all(_finite(x) for x in k.ci) and thresholds:
        if k.direction == "max" and max(k.ci) > min(thresholds):
            return "amber", checks
        if k.direction == "min" and min(k.ci) < max(thresholds):
            return "amber", checks
    return "green", checks


def _utility_key_numbers(body_u: Mapping[str, Any]) -> list[KeyNumber]:
    """Balanced accuracy and the worst class first: AUROC ranks cases and can look good while a class is dead."""
    out: list[KeyNumber] = []
    floor = (((body_u.get("baselines") or {}).get("majority_class") or {}).get("real_test") or {})
    floor_note = (f"a classifier that always predicts '{floor['class']}' scores balanced accuracy "
                  f"{fmt(floor.get('balanced_accuracy'), '.3f')} (accuracy {fmt(floor.get('accuracy'), '.3f')})"
                  if floor.get("class") else "")
    for key, label, setting in (("trtr_balanced_accuracy", "TRTR balanced accuracy (real → real test)", "trtr"),
                                ("tstr_balanced_accuracy", "TSTR balanced accuracy (synthetic → real test)",
                                 "tstr")):
        v, ci = metric_parts((body_u.get(setting) or {}).get("balanced_accuracy"))
        out.append(KeyNumber(key, label, v, ci, fmt(v, ".3f"), note=floor_note))
    paired = body_u.get("tstr_vs_trtr") or {}
    v, ci = metric_parts((paired.get("balanced_accuracy") or {}).get("ratio"))
    out.append(KeyNumber("tstr_trtr_balanced_accuracy_ratio", "TSTR / TRTR balanced-accuracy ratio", v, ci,
                         fmt(v, ".3f"), ("min_tstr_trtr_balanced_accuracy_ratio",), "min"))
    for setting, label in (("trtr", "TRTR"), ("tstr", "TSTR")):
        block = body_u.get(setting) or {}
        v, ci = metric_parts(block.get("worst_class_sensitivity"))
        worst = block.get("worst_class")
        out.append(KeyNumber(f"{setting}_worst_class_sensitivity",
                             f"{label} sensitivity of the worst class{f' ({worst})' if worst else ''}", v, ci,
                             fmt(v, ".3f")))
    v, ci = metric_parts((paired.get("worst_class_sensitivity") or {}).get("ratio"))
    out.append(KeyNumber("tstr_trtr_worst_class_ratio", "TSTR / TRTR worst-class sensitivity ratio", v, ci,
                         fmt(v, ".3f"), ("min_tstr_trtr_worst_class_ratio",), "min"))
    v, ci = metric_parts((body_u.get("trts") or {}).get("balanced_accuracy"))
    out.append(KeyNumber("trts_balanced_accuracy", "TRTS balanced accuracy (real-trained classifier on synthetic "
                         "images)", v, ci, fmt(v, ".3f"), ("min_trts_balanced_accuracy",), "min"))
    for key, label, setting in (("trtr_auroc", "TRTR AUROC (real → real test)", "trtr"),
                                ("tstr_auroc", "TSTR AUROC (synthetic → real test)", "tstr")):
        v, ci = metric_parts((body_u.get(setting) or {}).get("auroc"))
        out.append(KeyNumber(key, label, v, ci, fmt(v, ".3f")))
    v, ci = metric_parts(body_u.get("tstr_over_trtr"))
    out.append(KeyNumber("tstr_over_trtr", "TSTR / TRTR AUROC ratio", v, ci, fmt(v, ".3f"),
                         ("min_tstr_trtr_ratio",), "min"))
    v, ci = metric_parts((body_u.get("trts") or {}).get("accuracy"))
    out.append(KeyNumber("trts_accuracy", "TRTS accuracy (real-trained classifier on synthetic images)", v, ci,
                         fmt(v, ".3f"), ("min_trts_accuracy",), "min"))
    return out


def _membership_summary(privacy: Mapping[str, Any]) -> MembershipSummary | None:
    """The typed `membership` section of a privacy audit header (validated when the inputs were loaded)."""
    mem = privacy.get("membership")
    return MembershipSummary.model_validate(mem) if isinstance(mem, Mapping) else None


def _key_numbers(inp: ReportInputs) -> list[KeyNumber]:
    body_p, body_u = inp.privacy, inp.utility
    out: list[KeyNumber] = _utility_key_numbers(body_u)

    ledger = inp.ledger
    privacy_claim = (inp.model_card or {}).get("privacy")
    if ledger or privacy_claim:
        eps = (ledger or {}).get("epsilon", (privacy_claim or {}).get("epsilon"))
        delta = (ledger or {}).get("delta", (privacy_claim or {}).get("delta"))
        out.append(KeyNumber("epsilon", "DP-SGD privacy budget ε", eps, None,
                             f"ε = {fmt(eps)} at δ = {fmt(delta, '.2g')}", ("require_dp", "max_epsilon", "max_delta"),
                             "max"))
    elif inp.model_card is not None:
        out.append(KeyNumber("epsilon", "DP-SGD privacy budget ε", None, None, "not differentially private",
                             ("require_dp", "max_epsilon"), "max"))
    else:
        out.append(KeyNumber("epsilon", "DP-SGD privacy budget ε", None, None, "model not given",
                             ("require_dp", "max_epsilon"), "max"))
    lc = body_p.get("ledger_check")
    if isinstance(lc, Mapping) and "passed" in lc:
        out.append(KeyNumber("ledger_check", "ε recomputed from the ledger", None, None,
                             "agrees" if lc.get("passed") else "does NOT agree", ("ledger_check",)))

    memo = body_p.get("memorization")
    if isinstance(memo, Mapping) and "flagged_fraction" in memo:
        n, flagged = memo.get("synthetic_images"), memo.get("flagged")
        out.append(KeyNumber("flagged_fraction", "Memorization: synthetic images flagged as too close to a training "
                             "image", memo.get("flagged_fraction"), None,
                             f"{fmt_pct(memo.get('flagged_fraction'))} ({fmt(flagged)} of {fmt(n)}; "
                             f"exact copies {fmt(memo.get('exact_copies'))})", ("max_flagged_fraction",), "max",
                             "before filtering; the gate judges the set to be released"))
        # `excess` rescales the closer-to-train share so that 0 is what a generator that does not memorise scores
        # (its share equals n_train / (n_train + n_holdout), not 0.5) and 1 is every image nearer to training.
        excesses = [s["closer_to_train"]["excess"] for s in (memo.get("per_space") or {}).values()
                    if isinstance(s, Mapping) and isinstance(s.get("closer_to_train"), Mapping)
                    and _finite(s["closer_to_train"].get("excess"))]
        if excesses:
            out.append(KeyNumber("closer_to_train", "Excess share of synthetic images closer to a training than to a "
                                 "holdout image (0 = no memorization signal, 1 = all; worst space)", max(excesses),
                                 None, fmt(max(excesses), ".3f")))
    else:
        out.append(KeyNumber("flagged_fraction", "Memorization: flagged synthetic images", None, None, "not run",
                             ("max_flagged_fraction",), "max"))

    membership = _membership_summary(body_p)
    judged = membership.judged if membership is not None else None
    if judged is not None:
        # The value the gate judges (`MembershipSummary.judged`), not only the published-direction headline.
        label = "strongest attack" + (f", {judged.attack} reversed: 1 − AUC" if judged.reversed else "")
        out.append(KeyNumber("membership_auc", f"Membership inference AUC ({label})", judged.value, judged.ci,
                             fmt(judged.value, ".3f"), ("max_membership_auc",), "max"))
        mem = body_p["membership"]
        attack = (mem.get("attacks") or {}).get(mem.get("auc_attack")) or {}
        tpr = mem.get("tpr_at_1pct_fpr")
        out.append(KeyNumber("membership_tpr_at_1pct_fpr", "Membership TPR at 1% FPR (strongest)", tpr,
                             attack.get("tpr_at_1pct_fpr_ci"), fmt(tpr, ".3f"), ("max_membership_tpr_at_1pct_fpr",),
                             "max"))
    else:
        out.append(KeyNumber("membership_auc", "Membership inference AUC", None, None, "not run",
                             ("max_membership_auc", "max_membership_tpr_at_1pct_fpr"), "max"))
    fid = _headline_fid(body_u.get("fidelity"))
    if fid is not None:
        out.append(KeyNumber("fid", f"FID in the {fid['space']} space (real holdout floor)", fid["synthetic"], None,
                             f"{fmt(fid['synthetic'], '.4g')} (floor {fmt(fid['floor'], '.4g')})"))

    counts = _synthetic_counts(inp)
    smallest = min(counts.values()) if counts else None
    out.append(KeyNumber("min_class_count", "Synthetic images in the smallest class", smallest, None,
                         ", ".join(f"{k}: {fmt(v)}" for k, v in counts.items()), ("min_per_class_count",), "min"))

    disc = body_p.get("disclosure")
    if isinstance(disc, Mapping) and "violations" in disc:
        out.append(KeyNumber("disclosure_violations", f"Attribute combinations with fewer than k={fmt(disc.get('k'))} "
                             "records", disc.get("violations"), None, fmt(disc.get("violations")), ("disclosure_k",),
                             "max"))
    else:
        out.append(KeyNumber("disclosure_violations", "Attribute disclosure (k-anonymity)", None, None, "not run",
                             ("disclosure_k",), "max"))
    return out


def _headline_fid(fidelity: Any) -> dict[str, Any] | None:
    if not isinstance(fidelity, Mapping):
        return None
    for name, space in (fidelity.get("spaces") or {}).items():
        syn = ((space or {}).get("synthetic") or {}).get("overall") or {}
        floor = ((space or {}).get("real_holdout") or {}).get("overall") or {}
        if _finite(syn.get("fid")):
            return {"space": name, "synthetic": syn["fid"], "floor": floor.get("fid")}
    return None


def _synthetic_rows(ds: Dataset) -> np.ndarray:
    marked = (ds.metadata["split"] == SYNTHETIC_SPLIT).to_numpy()
    return np.flatnonzero(marked) if marked.any() else np.arange(len(ds.metadata))


def _synthetic_counts(inp: ReportInputs) -> dict[str, int]:
    meta = inp.synthetic.metadata.iloc[_synthetic_rows(inp.synthetic)]
    return {name: int((meta["label"] == c).sum()) for c, name in enumerate(inp.class_names)}
