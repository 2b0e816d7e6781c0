from __future__ import annotations

import pytest

from flows.policy import LOOSER, DPAuditOutcome, GateInputs, Policy, gate
from synth.errors import ConfigError, InputError

GOOD = GateInputs(dp=True, epsilon=8.0, delta=1e-5, ledger_check_passed=True, flagged_fraction=0.0,
                  flagged_fraction_before_filter=0.002,
                  membership_auc=0.51, membership_tpr_at_1pct_fpr=0.011, tstr_trtr_ratio=0.97, trts_accuracy=0.9,
                  tstr_trtr_balanced_accuracy_ratio=0.96, tstr_trtr_worst_class_ratio=0.9,
                  trts_balanced_accuracy=0.92,
                  per_class_counts={"normal": 100, "pneumonia": 200}, disclosure_violations=0,
                  dp_audit=DPAuditOutcome(epsilon_lower_bound=0.3, claimed_epsilon=1.0, epsilon_ceiling=4.6,
                                          canaries=1000))
STRICT = Policy(require_dp=True, max_epsilon=10, max_delta=1e-4, max_flagged_fraction=0.0, max_membership_auc=0.6,
                max_membership_tpr_at_1pct_fpr=0.05, min_tstr_trtr_ratio=0.9, min_trts_accuracy=0.85,
                min_per_class_count=50)


def test_good_run_passes_every_check():
    verdict = gate(GOOD, STRICT)
    assert verdict.passed and verdict.reasons == []
    assert {c.rule for c in verdict.checks} >= {"require_dp", "max_epsilon", "ledger_check", "max_flagged_fraction",
                                               "min_tstr_trtr_ratio", "disclosure_k"}


def test_every_failure_is_reported_not_just_the_first():
    bad = GOOD.model_copy(update={"epsilon": 20.0, "flagged_fraction": 0.03, "trts_accuracy": 0.5,
                                  "per_class_counts": {"normal": 10, "pneumonia": 200}})
    verdict = gate(bad, STRICT)
    assert verdict.decision == "block"
    rules = {c.rule for c in verdict.checks if not c.passed}
    assert rules == {"max_epsilon", "max_flagged_fraction", "min_trts_accuracy", "min_per_class_count"}
    assert any("ε 20 > 10" in r for r in verdict.reasons)


def test_default_policy_judges_utility_by_balanced_accuracy_and_the_worst_class():
    assert gate(GOOD, Policy()).passed
    # The demo's old failure: AUROC ratio 0.96 and TRTS accuracy 0.9 look fine while the TSTR classifier never
    # predicts one class (balanced accuracy at chance, worst-class sensitivity 0).
    dead_class = GOOD.model_copy(update={"tstr_trtr_balanced_accuracy_ratio": 0.58, "tstr_trtr_worst_class_ratio": 0.01,
                                         "trts_balanced_accuracy": 0.52})
    verdict = gate(dead_class, Policy())
    assert verdict.decision == "block"
    assert {c.rule for c in verdict.checks if not c.passed} == {
        "min_tstr_trtr_balanced_accuracy_ratio", "min_tstr_trtr_worst_class_ratio", "min_trts_balanced_accuracy"}
    assert "TSTR/TRTR balanced-accuracy ratio 0.58 < 0.85" in verdict.reasons
    # Unmeasured utility blocks too (fail closed); a steward may switch a check off explicitly.
    unmeasured = GOOD.model_copy(update={"tstr_trtr_balanced_accuracy_ratio": None})
    assert [c.rule for c in gate(unmeasured, Policy()).checks if not c.passed] == [
        "min_tstr_trtr_balanced_accuracy_ratio"]
    assert gate(unmeasured, Policy(min_tstr_trtr_balanced_accuracy_ratio=None)).passed


def test_planted_copies_block_with_default_policy():
    verdict = gate(GOOD.model_copy(update={"flagged_fraction": 0.01}), Policy())
    assert not verdict.passed and "flagged fraction" in verdict.reasons[0]


def test_many_copies_block_even_after_filtering():
    verdict = gate(GOOD.model_copy(update={"flagged_fraction": 0.0, "flagged_fraction_before_filter": 0.2}), Policy())
    assert [c.rule for c in verdict.checks if not c.passed] == ["max_flagged_fraction_before_filter"]


def test_unmeasured_constrained_metric_blocks():
    verdict = gate(GOOD.model_copy(update={"membership_auc": None, "ledger_check_passed": None}), STRICT)
    assert {c.rule for c in verdict.checks if not c.passed} == {"max_membership_auc", "ledger_check"}


def test_non_private_model_against_dp_policy():
    verdict = gate(GOOD.model_copy(update={"dp": False, "epsilon": None}), STRICT)
    assert "policy requires DP, model is not private" in verdict.reasons
    assert gate(GOOD.model_copy(update={"dp": False}), Policy(max_epsilon=5)).decision == "block"
    assert gate(GOOD.model_copy(update={"dp": False}), Policy()).passed


def test_policy_yaml(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text("policy:\n  require_dp: true\n  max_epsilon: 10\n  disclosure_k: 10\n")
    assert Policy.from_yaml(path) == Policy(require_dp=True, max_epsilon=10, disclosure_k=10)
    path.write_text("max_epsilon: -1\n")
    with pytest.raises(ConfigError, match=r"policy\.yaml: max_epsilon: .*greater than 0.*\(got -1\)"):
        Policy.from_yaml(path)
    path.write_text("max_epsilon: 1\nmax_epsilom: 2\n")
    with pytest.raises(ConfigError, match="max_epsilom"):
        Policy.from_yaml(path)
    path.write_text("- a list\n")
    with pytest.raises(InputError, match="mapping"):
        Policy.from_yaml(path)


def test_a_dp_release_needs_a_canary_audit_within_its_claim():
    assert next(c for c in gate(GOOD, Policy()).checks if c.rule == "dp_audit").passed
    broken = GOOD.model_copy(update={"dp_audit": DPAuditOutcome(epsilon_lower_bound=3.9, claimed_epsilon=1.0,
                                                                epsilon_ceiling=4.6, canaries=1000)})
    verdict = gate(broken, Policy())
    assert [c.rule for c in verdict.checks if not c.passed] == ["dp_audit"]
    assert "empirical ε ≥ 3.9 EXCEEDS the audit run's claimed ε 1" in verdict.reasons[0]
    skipped = GOOD.model_copy(update={"dp_audit": None})
    assert "was not run" in gate(skipped, Policy()).reasons[0]
    assert gate(skipped, Policy(require_dp_audit=False)).passed
    # Not a DP release: nothing to audit.
    assert "dp_audit" not in {c.rule for c in gate(GOOD.model_copy(update={"dp": False}), Policy()).checks}


def test_loosened_lists_only_rules_below_the_defaults():
    assert Policy().loosened() == () and STRICT.loosened() == ()  # tighter than the defaults: nothing to declare
    lowered = Policy(min_tstr_trtr_balanced_accuracy_ratio=0.6, min_trts_balanced_accuracy=None,
                     max_flagged_fraction_before_filter=0.1, require_dp_audit=False, disclosure_k=2,
                     max_epsilon=10, min_per_class_count=5)
    assert lowered.loosened() == (
        "max_flagged_fraction_before_filter = 0.1 (default 0.05)",
        "min_tstr_trtr_balanced_accuracy_ratio = 0.6 (default 0.85)",
        "min_trts_balanced_accuracy = off (default 0.7)",
        "disclosure_k = 2 (default 5)",
        "require_dp_audit = False (default True)",
    )


def test_every_rule_declares_which_way_it_loosens():
    # A rule missing here would crash loosened(); one listed the wrong way would hide a lowered gate. Each way is
    # checked against a value on the loose side of the default.
    assert set(LOOSER) == set(Policy.model_fields) and set(LOOSER.values()) <= {"off", "higher", "lower"}
    for name, way in LOOSER.items():
        default = getattr(Policy(), name)
        loose = {"off": False, "higher": None, "lower": None}[way]
        if way == "off" and not default:
            continue  # off by default: cannot be loosened
        if default is None:
            continue  # unconstrained by default: nothing looser
        if name == "disclosure_k":
            loose = 1  # k may not be None
        assert Policy(**{name: loose}).loosened() == (f"{name} = {'off' if loose is None else loose} "
                                                      f"(default {default})",), name
