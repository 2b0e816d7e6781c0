"""Typed artifact readers: one judged membership AUC and one ε everywhere, one-line errors for malformed headers.

Built on the report fixtures (tests/report_fixtures.py: a real privacy and utility audit of a small slice, a model
directory with a DP card and ledger, planted membership scores)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from flows.policy import Policy, gate
from flows.stages import gate_inputs
from privacy.audit_result import load_privacy_audit
from reports.report import SUMMARY, render_report
from synth.artifacts import read_header, write_json
from synth.errors import InputError
from synth.layout import MODEL_CARD, PRIVACY_AUDIT_HEADER
from synth.model_card import load_model_card
from tests.report_fixtures import LEDGER_EPSILON, build_report_inputs

REVERSED_AUC = 0.3  # members score reliably *below* non-members: an attacker who flips the sign gets 0.7


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, pneumonia_slice: Path) -> dict[str, Any]:
    return build_report_inputs(tmp_path_factory.getbasetemp() / "report-inputs", pneumonia_slice)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _with_reversed_attack(privacy: Path) -> float:
    """Add a reliably reversed attack to the audit's membership entry (header only: the content hash holds)."""
    header = json.loads((privacy / PRIVACY_AUDIT_HEADER).read_text())
    mem = header["membership"]
    mem["attacks"]["reversed"] = {**mem["attacks"]["loss"], "auc": REVERSED_AUC, "auc_ci": [0.25, 0.35]}
    judged = 1 - REVERSED_AUC
    assert judged > mem["auc"]  # the published-direction headline is lower than what the gate must judge
    mem["auc_any_direction"] = judged
    write_json(privacy / PRIVACY_AUDIT_HEADER, header)
    return judged


def test_report_datasheet_and_gate_show_the_same_membership_auc(inputs: dict[str, Any], tmp_path: Path) -> None:
    from flows.release_config import ReleaseConfig
    from flows.stages import release_facts
    from reports.datasheet import render_datasheet
    from reports.facts import ApprovalFacts

    privacy = _copy(inputs["privacy"], tmp_path / "privacy")
    judged = _with_reversed_attack(privacy)
    args = dict(privacy_dir=privacy, utility_dir=inputs["utility"], model=inputs["model"],
                released=inputs["synthetic"])

    gated = gate_inputs(**args)
    assert gated.membership_auc == pytest.approx(judged)

    policy = Policy(max_membership_auc=0.9)
    verdict = gate(gated, policy)
    check = next(c for c in verdict.checks if c.rule == "max_membership_auc")
    assert check.value == pytest.approx(judged)

    report = render_report(privacy_dir=privacy, utility_dir=inputs["utility"], real_dir=inputs["real"],
                           synthetic_dir=inputs["synthetic"], model_dir=inputs["model"], verdict=verdict,
                           out=tmp_path / "report")
    summary = read_header(report, SUMMARY, kind="report")
    keys = {k["key"]: k for k in summary["key_numbers"]}
    assert keys["membership_auc"]["value"] == pytest.approx(judged)
    assert keys["membership_auc"]["ci"] == pytest.approx([0.65, 0.75])
    assert keys["membership_auc"]["status"] in ("green", "amber")  # judged against the same check

    facts = release_facts(
        ReleaseConfig(workdir=tmp_path / "work"), release_id="r1", dataset=inputs["real"], model=inputs["model"],
        synthetic=inputs["synthetic"], released=inputs["synthetic"], privacy_dir=privacy,
        utility_dir=inputs["utility"], verdict=verdict, approval=ApprovalFacts(decision="approved",
                                                                              auto_approved=True))
    assert facts.privacy_audit is not None and facts.privacy_audit.membership_auc == pytest.approx(judged)
    assert f"Membership inference AUC: {judged:.3f}" in render_datasheet(facts)


def test_gate_reads_the_ledger_epsilon_and_blocks_a_card_that_disagrees(inputs: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    args = dict(privacy_dir=inputs["privacy"], utility_dir=inputs["utility"], released=inputs["synthetic"])
    policy = Policy(require_dp=True, max_epsilon=10, require_ledger_check=False)
    honest = gate_inputs(model=inputs["model"], **args)
    assert honest.epsilon == honest.card_epsilon == LEDGER_EPSILON
    assert next(c for c in gate(honest, policy).checks if c.rule == "card_epsilon").passed

    model = _copy(inputs["model"], tmp_path / "model")
    card = json.loads((model / MODEL_CARD).read_text())
    card["privacy"]["epsilon"] = 1.0  # doctored after training: the ledger still proves 2.88
    write_json(model / MODEL_CARD, card)
    doctored = gate_inputs(model=model, **args)
    assert doctored.epsilon == LEDGER_EPSILON and doctored.card_epsilon == 1.0
    verdict = gate(doctored, policy)
    assert verdict.decision == "block"
    failed = [c for c in verdict.checks if not c.passed]
    honest_failed = [c for c in gate(honest, policy).checks if not c.passed]
    assert [c for c in failed if c not in honest_failed] == [next(c for c in failed if c.rule == "card_epsilon")]
    assert f"model card states ε 1, but its privacy ledger's ε is {LEDGER_EPSILON:.6g}" in verdict.reasons


def test_malformed_headers_are_one_line_errors_naming_the_file(inputs: dict[str, Any], tmp_path: Path) -> None:
    privacy = _copy(inputs["privacy"], tmp_path / "privacy")
    header = json.loads((privacy / PRIVACY_AUDIT_HEADER).read_text())
    header["memorization"]["flagged_fraction"] = "most"
    write_json(privacy / PRIVACY_AUDIT_HEADER, header)
    with pytest.raises(InputError, match=r"privacy\.json: malformed privacy audit header: "
                                         r"memorization\.flagged_fraction") as e:
        load_privacy_audit(privacy)
    assert "\n" not in str(e.value)

    model = _copy(inputs["model"], tmp_path / "model")
    card = json.loads((model / MODEL_CARD).read_text())
    card["privacy"]["epsilon"] = "small"
    write_json(model / MODEL_CARD, card)
    with pytest.raises(InputError, match=r"model_card\.json: malformed model card: privacy\.epsilon") as e:
        load_model_card(model)
    assert "\n" not in str(e.value)
    # Unknown keys are kept, not refused: a newer trainer may record more.
    card["privacy"]["epsilon"] = LEDGER_EPSILON
    card["future_field"] = {"x": 1}
    write_json(model / MODEL_CARD, card)
    assert load_model_card(model).extra("future_field") == {"x": 1}
