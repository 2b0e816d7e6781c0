"""`synthgate --version`, shell completion, a missing command module, and `synthgate releases list|show|diff`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flows.cli import run, version
from flows.keys import generate_keys
from flows.signing import sign_bundle

HUMAN = {"decision": "approved", "reviewer": "dr who", "auto_approved": False}
AUTO = {"decision": "approved", "reviewer": None, "auto_approved": True}


def _release(releases, private, rid, *, counts, ratio, auc, flagged, epsilon, approval, policy_ba, steps):
    """A small signed bundle shaped like `synthgate release`'s output (predicate, summary, data folders)."""
    root = releases / rid
    for label, (cls, n) in enumerate(counts.items()):
        d = root / "data" / "train" / f"{label}_{cls}"
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"syn-{i:06d}.png").write_bytes(b"\x89PNG" + rid.encode() + bytes([label, i]))
    (root / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# card\n")
    (root / "report").mkdir()
    numbers = [("tstr_trtr_balanced_accuracy_ratio", "TSTR / TRTR balanced-accuracy ratio", ratio, f"{ratio:.3f}"),
               ("membership_auc", "Membership inference AUC (strongest attack)", auc, f"{auc:.3f}"),
               ("flagged_fraction", "Memorization flagged", flagged / 10, f"{flagged} of 10")]
    (root / "report" / "summary.json").write_text(json.dumps({"key_numbers": [
        {"key": k, "label": label, "value": v, "display": shown, "status": "green"}
        for k, label, v, shown in numbers]}))
    privacy = {"epsilon": epsilon, "delta": 1e-5, "accountant": "prv"} if epsilon else None
    sign_bundle(root, private, predicate={
        "release_id": rid, "created": "2026-12-01T00:00:00+00:00", "summary": "s", "gate": "pass",
        "approval": approval, "privacy": privacy,
        "config": {"train": {"max_steps": steps, "preset": "small"}, "dp": {"enabled": bool(epsilon)},
                   "policy": {"min_tstr_trtr_balanced_accuracy_ratio": policy_ba, "require_dp": False}}})


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    base = tmp_path_factory.mktemp("releases")
    private_path, public_path = generate_keys(base / "keys")
    private = private_path  # sign_bundle takes the key file
    rel = base / "releases"
    _release(rel, private, "rel-a", counts={"normal": 3, "pneumonia": 2}, ratio=0.9, auc=0.5, flagged=0,
             epsilon=None, approval=AUTO, policy_ba=0.85, steps=400)
    _release(rel, private, "rel-b", counts={"normal": 3, "pneumonia": 4}, ratio=0.8, auc=0.55, flagged=1,
             epsilon=8.0, approval=HUMAN, policy_ba=0.75, steps=2400)
    (rel / "index.json").write_text("{}")  # what publish writes beside the bundles: not a release
    return rel, public_path


def test_version(capsys):
    assert run(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"synthgate {version()}" and version()[0].isdigit()


def test_shell_completion_script_and_completions(capsys, monkeypatch):
    # --show-completion is a flag: typer detects the shell from the parent processes, which a detached run (no
    # shell above it) does not have, so the detection is pinned to bash here.
    import typer.completion

    monkeypatch.setattr(typer.completion, "_get_shell_name", lambda: "bash")
    assert run(["--show-completion"]) == 0
    assert "_synthgate_completion" in capsys.readouterr().out
    # What the installed script does on <TAB>: call synthgate with the completion variables set.
    monkeypatch.setenv("_SYNTHGATE_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "synthgate releases d")
    monkeypatch.setenv("COMP_CWORD", "2")
    assert run([]) == 0
    assert capsys.readouterr().out.split() == ["diff"]


def test_a_missing_command_module_is_an_error():
    code = ("import flows.cli as c, importlib; c._COMMAND_MODULES = c._COMMAND_MODULES + ('flows.cli_nope',); "
            "c._register()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode != 0 and "No module named 'flows.cli_nope'" in proc.stderr


def test_releases_list(releases, capsys):
    rel, public = releases
    assert run(["releases", "list", str(rel), "--key", str(public), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    by_id = {r["release_id"]: r for r in out["releases"]}
    assert set(by_id) == {"rel-a", "rel-b"} and out["failed_verification"] == []
    assert by_id["rel-a"]["approval"] == "automatic (no human review)"
    assert by_id["rel-b"]["approval"] == "reviewer dr who" and by_id["rel-b"]["epsilon"] == 8.0
    assert by_id["rel-b"]["class_counts"] == {"normal": 3, "pneumonia": 4} and by_id["rel-a"]["verified_by"]
    assert run(["releases", "list", str(rel)]) == 0
    table = capsys.readouterr().out
    assert "rel-a" in table and "rel-b" in table and "not checked" in table and "ε = 8" in table


def test_releases_list_fails_on_a_tampered_bundle(releases, tmp_path, capsys):
    import shutil

    rel, public = releases
    copy = tmp_path / "releases"
    shutil.copytree(rel, copy)
    png = next((copy / "rel-b" / "data").rglob("*.png"))
    png.write_bytes(png.read_bytes() + b"x")
    assert run(["releases", "list", str(copy), "--key", str(public)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "rel-a" in out


def test_releases_show(releases, capsys):
    rel, public = releases
    assert run(["releases", "show", "rel-b", "--releases", str(rel), "--key", str(public)]) == 0
    out = capsys.readouterr().out
    assert "reviewer dr who" in out and "ε = 8" in out and "verified" in out and "normal 3, pneumonia 4" in out
    assert "Membership inference AUC" in out and "0.550" in out and "min_tstr_trtr_balanced_accuracy_ratio" in out
    assert run(["releases", "show", str(rel / "rel-a"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["key_numbers"]["membership_auc"]["value"] == 0.5 and data["verified_by"] is None
    assert data["policy"]["min_tstr_trtr_balanced_accuracy_ratio"] == 0.85 and "policy" not in data["config"]


def test_releases_diff(releases, capsys):
    rel, _ = releases
    assert run(["releases", "diff", "rel-a", "rel-b", "--releases", str(rel), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["key_numbers"]["tstr_trtr_balanced_accuracy_ratio"]["change"] == pytest.approx(-0.1)
    assert d["key_numbers"]["membership_auc"]["change"] == pytest.approx(0.05)
    assert d["key_numbers"]["flagged_fraction"]["a"] == "0 of 10" and d["key_numbers"]["flagged_fraction"]["b"] == (
        "1 of 10")
    assert d["privacy"]["epsilon"] == [None, 8.0] and d["counts"] == {"normal": [3, 3], "pneumonia": [2, 4]}
    assert d["approval"] == ["automatic (no human review)", "reviewer dr who"]
    assert d["policy"] == {"min_tstr_trtr_balanced_accuracy_ratio": [0.85, 0.75]}
    assert d["config"] == {"dp.enabled": [False, True], "train.max_steps": [400, 2400]}
    assert run(["releases", "diff", "rel-a", "rel-b", "--releases", str(rel)]) == 0
    table = capsys.readouterr().out
    assert "config.train.max_steps" in table and "images: pneumonia" in table and "-0.1" in table
    assert "images: normal" not in table  # unchanged counts are not listed as differences


def test_releases_bad_input_is_one_line(releases, tmp_path, capsys):
    rel, _ = releases
    assert run(["releases", "show", "nope", "--releases", str(rel)]) == 2
    assert "nope: no such release in" in capsys.readouterr().err
    assert run(["releases", "list", str(tmp_path / "missing")]) == 2
    assert "releases directory does not exist" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "provenance.json").write_text("{not json")
    assert run(["releases", "show", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "provenance.json: not readable JSON" in err and "Traceback" not in err
