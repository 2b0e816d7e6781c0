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


def _tiny_dataset(root: Path) -> Path:
    import numpy as np
    import pandas as pd

    from synth.data.canonical import write_dataset

    images = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    meta = pd.DataFrame({"image_id": list("abcd"), "split": ["train", "train", "val", "test"], "label": [0, 1, 0, 1]})
    return write_dataset(root, images, meta, class_names=["no", "yes"], source={"name": "tiny"})


def test_dataset_header_is_typed_and_malformed_ones_are_one_line(tmp_path: Path) -> None:
    from synth.data.canonical import load_dataset, load_dataset_header
    from synth.layout import DATASET_HEADER

    ds = _tiny_dataset(tmp_path / "ds")
    info = load_dataset_header(ds)
    assert info.class_names == ["no", "yes"] and info.counts.total == 4
    assert info.counts.split("train") == 2 and info.counts.split("synthetic") == 0
    assert info.counts.per_split() == {"train": 2, "val": 1, "test": 1, "total": 4}
    assert info.counts.per_class["train"] == {"no": 1, "yes": 1}
    assert (info.image.height, info.image.channels) == (8, 1)

    header = json.loads((ds / DATASET_HEADER).read_text())
    header["future_field"] = [1]
    write_json(ds / DATASET_HEADER, header)
    assert load_dataset_header(ds).extra("future_field") == [1]  # a newer writer's keys are kept

    header["counts"]["total"] = "four"
    write_json(ds / DATASET_HEADER, header)
    with pytest.raises(InputError, match=r"dataset\.json: malformed dataset header: counts\.total") as e:
        load_dataset_header(ds)
    assert "\n" not in str(e.value)
    # Consumers of an opened dataset read through the same schema (the validator alone reads `.header` as is).
    opened = load_dataset(ds)
    assert opened.header["counts"]["total"] == "four"
    with pytest.raises(InputError, match=r"malformed dataset header"):
        _ = opened.class_names


def test_guidance_selection_is_typed(tmp_path: Path) -> None:
    from reports.guidance import HEADER, KIND, load_guidance, read_guidance
    from synth.artifacts import write_header

    body = {"guidance_scale": 2.0, "objective": "balanced accuracy", "sampler": "ddim", "steps": 10,
            "real_val_images": 3, "candidates": [
                {"guidance_scale": 1.0, "balanced_accuracy": 0.8, "worst_class_sensitivity": 0.7,
                 "worst_class": "no", "auroc": 0.9},
                {"guidance_scale": 2.0, "balanced_accuracy": 0.85, "worst_class_sensitivity": None,
                 "worst_class": None, "auroc": None}]}
    write_header(tmp_path, HEADER, kind=KIND, schema_version=1, files=[], body=body)
    selection = load_guidance(tmp_path)
    assert selection.guidance_scale == 2.0 and read_guidance(tmp_path)["steps"] == 10
    # A selection written before EMA snapshots were offered reads as the final EMA weights; one written before
    # TRTS floors, as chosen without one.
    assert selection.facts() == {"guidance_scale": 2.0, "weights": "ema", "weights_step": None,
                                 "objective": "balanced accuracy", "trts_floor": None, "ratio_floor": None,
                                 "weights_candidates": [],
                                 "candidates": [
        {"guidance_scale": 1.0, "balanced_accuracy": 0.8, "worst_class_sensitivity": 0.7,
         "trts_balanced_accuracy": None},
        {"guidance_scale": 2.0, "balanced_accuracy": 0.85, "worst_class_sensitivity": None,
         "trts_balanced_accuracy": None}]}

    header = json.loads((tmp_path / HEADER).read_text())
    del header["guidance_scale"]
    write_json(tmp_path / HEADER, header)
    with pytest.raises(InputError, match=r"guidance\.json: malformed guidance selection header: guidance_scale"):
        load_guidance(tmp_path)


def test_verdict_round_trips_and_malformed_files_are_one_line(tmp_path: Path) -> None:
    from flows.policy import GateInputs, Verdict
    from reports.verdict import read_verdict

    verdict = gate(GateInputs(dp=False, flagged_fraction=0.0, disclosure_violations=2), Policy())
    assert isinstance(verdict, Verdict)
    path = tmp_path / "verdict.json"
    path.write_text(verdict.model_dump_json(indent=2))  # as flows.stages.gate_stage writes it
    again = read_verdict(path)
    assert again == verdict and again.reasons == verdict.reasons and not again.passed

    data = json.loads(path.read_text())
    data["checks"][0]["passed"] = "yes"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"verdict\.json: verdict check 0 needs a 'rule' \(text\) and 'passed'") as e:
        read_verdict(path)
    assert "\n" not in str(e.value)
    path.write_text("[1]")
    with pytest.raises(InputError, match=r"verdict\.json: a verdict must be a JSON object, got list"):
        read_verdict(path)


def test_report_summary_is_typed(inputs: dict[str, Any], tmp_path: Path) -> None:
    from reports.report_summary import load_report_summary
    from synth.artifacts import read_header as raw

    report = render_report(privacy_dir=inputs["privacy"], utility_dir=inputs["utility"], real_dir=inputs["real"],
                           synthetic_dir=inputs["synthetic"], out=tmp_path / "report", public=True)
    summary = load_report_summary(report)
    body = raw(report, SUMMARY, kind="report")
    assert summary.public is True and summary.verdict is None and not summary.gate_evaluated
    assert [k.key for k in summary.key_numbers] == [k["key"] for k in body["key_numbers"]]
    assert summary.count("not_judged") == len(body["key_numbers"]) == body["status_counts"]["not_judged"]

    body["key_numbers"][0]["status"] = None
    write_json(report / SUMMARY, body)
    with pytest.raises(InputError, match=r"summary\.json: malformed report summary: key_numbers\.0\.status"):
        load_report_summary(report)
