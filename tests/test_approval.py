"""What the steward sees at the approval pause: key numbers and the `synthgate approve` command."""

from __future__ import annotations

import json

from flows.approval import approval_numbers, approval_prompt, approval_request


def _report(tmp_path):
    numbers = [
        ("trtr_auroc", "TRTR AUROC", "0.975"),  # not a decision number: left out
        ("epsilon", "DP-SGD privacy budget ε", "8.00 (δ = 1e-05)"),
        ("tstr_trtr_balanced_accuracy_ratio", "TSTR / TRTR balanced-accuracy ratio", "0.954"),
        ("tstr_worst_class_sensitivity", "TSTR sensitivity of the worst class (normal)", "0.769"),
        ("membership_auc", "Membership inference AUC (strongest attack)", "0.494"),
        ("flagged_fraction", "Memorization: flagged", "0% (0 of 600; exact copies 0)"),
    ]
    (tmp_path / "summary.json").write_text(json.dumps(
        {"key_numbers": [{"key": k, "label": label, "display": shown} for k, label, shown in numbers]}))
    return tmp_path


def test_approval_request_names_the_command_and_key_numbers(tmp_path):
    md = approval_request(_report(tmp_path), "gate summary", "1234-abcd")
    assert 'synthgate approve 1234-abcd --reviewer "Your Name"' in md and "--reject" in md
    for shown in ("0.954", "normal) | 0.769", "0.494", "exact copies 0", "8.00 (δ = 1e-05)"):
        assert shown in md
    assert "TRTR AUROC" not in md and "gate summary" in md and str(tmp_path / "report.html") in md
    labels = [label for label, _ in approval_numbers(tmp_path)]
    assert labels[0].startswith("TSTR / TRTR balanced") and labels[-1].startswith("DP-SGD")  # decision order


def test_terminal_prompt_lists_numbers_and_command(tmp_path):
    text = approval_prompt(_report(tmp_path), "1234-abcd")
    assert "synthgate approve 1234-abcd" in text and "Membership inference AUC" in text and "0.494" in text


def test_missing_summary_still_gives_the_command(tmp_path):
    assert approval_numbers(tmp_path) == []
    assert "synthgate approve r-1" in approval_request(tmp_path, "", "r-1")
