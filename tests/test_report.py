"""The steward's audit report on a small real slice: sections, numbers and statuses, autoescaping, the public
variant's "no real pixels" guarantee, determinism, bad inputs and the CLI.

Inputs come from the real audit functions (`privacy.audit.audit_privacy`, `reports.utility.audit_utility`) on the
`pneumonia_slice`; see tests/report_fixtures.py for what is built and what is stand-in (the membership entry).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from reports import figures
from reports.report import HTML, SECTION_IDS, SUMMARY, render_report
from synth.artifacts import read_header, verify_content, write_json
from synth.data.canonical import Dataset, load_dataset
from synth.errors import InputError, IntegrityError
from tests.report_fixtures import (
    COPY_ID,
    INJECTED_CLASS,
    INJECTED_ID,
    INJECTED_MESSAGE,
    build_report_inputs,
    verdict_for,
)

SUB_IDS = ("memorization-pairs", "memorization-histograms", "utility-roc", "utility-metrics", "utility-per-class",
           "utility-augmentation")
TILE = 28


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, pneumonia_slice: Path) -> dict[str, Any]:
    return build_report_inputs(tmp_path_factory.getbasetemp() / "report-inputs", pneumonia_slice)


def _render(inputs: dict[str, Any], out: Path, **kw: Any) -> Path:
    args: dict[str, Any] = dict(privacy_dir=inputs["privacy"], utility_dir=inputs["utility"], real_dir=inputs["real"],
                                synthetic_dir=inputs["synthetic"], model_dir=inputs["model"],
                                verdict=verdict_for(inputs), out=out)
    args.update(kw)
    return render_report(**args)


@pytest.fixture(scope="module")
def steward(inputs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _render(inputs, tmp_path_factory.mktemp("steward") / "report")


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.ids += [v for k, v in attrs if k == "id" and v]


def _parse(html: str) -> _Ids:
    p = _Ids()
    p.feed(html)
    return p


def _section(html: str, section_id: str) -> str:
    start = html.index(f'<section id="{section_id}">')
    return html[start: html.index("</section>", start)]


def _pngs(html: str) -> list[np.ndarray]:
    """Every embedded PNG, decoded, as uint8 arrays (grayscale stays 2-D, plots are H×W×4)."""
    out = []
    for b64 in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html):
        out.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))))
    return out


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _windows_matching(gray: np.ndarray, hashes: set[str], sums: set[int]) -> int:
    """How many 28×28 windows of a grayscale image (at every offset) are pixel-identical to an image whose hash is
    in `hashes`. Windows are prefiltered by their pixel sum (integral image), then hashed."""
    if gray.shape[0] < TILE or gray.shape[1] < TILE:
        return 0
    g = gray.astype(np.int64)
    ii = np.pad(g.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    win = ii[TILE:, TILE:] - ii[:-TILE, TILE:] - ii[TILE:, :-TILE] + ii[:-TILE, :-TILE]
    found = 0
    for y, x in zip(*np.nonzero(np.isin(win, np.fromiter(sums, dtype=np.int64))), strict=True):
        found += _sha(gray[y: y + TILE, x: x + TILE]) in hashes
    return found


def _gray_views(png: np.ndarray) -> list[np.ndarray]:
    """A grayscale PNG as is; an RGB(A) plot as each of its colour channels (a gray image drawn in a plot has equal
    channels, so any channel would carry its pixels)."""
    return [png] if png.ndim == 2 else [png[..., c] for c in range(3)]


def _real_index(dataset_dir: Path) -> tuple[set[str], set[int]]:
    ds = load_dataset(dataset_dir)
    sums = {int(s) for s in np.asarray(ds.images, dtype=np.int64).reshape(len(ds.images), -1).sum(1)}
    return set(ds.metadata["sha256"].astype(str)), sums


def _real_pixels_in(html: str, dataset_dir: Path) -> int:
    hashes, sums = _real_index(dataset_dir)
    return sum(_windows_matching(v, hashes, sums) for png in _pngs(html) for v in _gray_views(png))


def _summary_keys(root: Path) -> dict[str, dict[str, Any]]:
    body = read_header(root, SUMMARY, kind="report")
    return {k["key"]: k for k in body["key_numbers"]}


# --------------------------------------------------------------------------------------------------------------


def test_steward_report_has_every_section_numbers_and_statuses(steward: Path, inputs: dict[str, Any]) -> None:
    assert sorted(p.name for p in steward.iterdir()) == [HTML, SUMMARY]
    html = (steward / HTML).read_text(encoding="utf-8")
    ids = _parse(html).ids
    for sid in (*SECTION_IDS, *SUB_IDS):
        assert ids.count(sid) == 1, sid
    assert html.index('id="summary"') < html.index('id="samples"') < html.index('id="gate"')

    header = read_header(steward, SUMMARY, kind="report")
    verify_content(steward, header)
    hashes = {
        "real": load_dataset(inputs["real"]).content_hash,
        "synthetic": load_dataset(inputs["synthetic"]).content_hash,
        "model": read_header(inputs["model"], "model_card.json")["content_hash"],
        "privacy_audit": read_header(inputs["privacy"], "privacy.json")["content_hash"],
        "utility_audit": read_header(inputs["utility"], "utility.json")["content_hash"],
    }
    assert {k: v for k, v in header["inputs"].items() if k != "verdict"} == hashes
    assert len(header["inputs"]["verdict"]) == 64
    assert header["verdict"]["decision"] == "block" and header["gate_evaluated"] is True
    assert header["public"] is False

    # The key numbers come from the audits and appear in the summary section.
    u = json.loads((inputs["utility"] / "utility.json").read_text())
    p = json.loads((inputs["privacy"] / "privacy.json").read_text())
    summary = _section(html, "summary")
    keys = _summary_keys(steward)
    ratio = u["tstr_over_trtr"]
    assert keys["tstr_over_trtr"]["value"] == pytest.approx(ratio["value"])
    assert keys["tstr_over_trtr"]["ci"] == ratio["ci"]
    assert f"{ratio['value']:.3f}" in summary and f"[{ratio['ci'][0]:.3f}, {ratio['ci'][1]:.3f}]" in summary
    assert f"{u['trtr']['auroc']['value']:.3f}" in summary
    assert f"{p['membership']['auc']:.3f}" in summary
    assert "ε = 2.88 at δ = 1e-05" in summary
    memo = p["memorization"]
    assert memo["flagged"] >= 1  # the planted copy
    assert f"({memo['flagged']} of {memo['synthetic_images']};" in summary
    assert "Release gate: BLOCK" in summary

    # Statuses against the verdict: ratio passes but its CI crosses the threshold, membership AUC passes clearly,
    # disclosure failed, numbers without a rule have none.
    assert keys["tstr_over_trtr"]["status"] == "amber"
    assert keys["membership_auc"]["status"] == "green"
    assert keys["disclosure_violations"]["status"] == "red"
    assert keys["trtr_auroc"]["status"] == "none"
    assert header["status_counts"]["amber"] == 1 and header["status_counts"]["red"] == 1
    for status in ("amber", "green", "red"):
        assert f'class="badge st-{status}"' in summary

    # Details: the ledger, fidelity, membership and utility tables carry their numbers.
    ledger = _section(html, "privacy-ledger")
    for text in ("1.1 / 0.0136 / 1,500", "rdp", "noise multiplicity K", "secure RNG</th><td>no"):
        assert text in ledger
    fid = u["fidelity"]["spaces"]["classifier"]["synthetic"]["overall"]["fid"]
    assert f"{fid:.4g}" in _section(html, "fidelity")
    assert f"{p['membership']['attacks']['loss']['auc']:.3f}" in _section(html, "membership")
    assert "Augmentation curve" in _section(html, "utility")
    assert "train-" in _section(html, "provenance")  # duplicate groups (ids) in the steward's copy

    # The steward's copy shows real images: side by side, and the closest pairs with training ids.
    assert "<img" in _section(html, "real-vs-synthetic")
    top = json.loads((inputs["privacy"] / "plots.json").read_text())["top_pairs"]
    first = next(iter(top.values()))[0]
    assert first["synthetic_id"] == COPY_ID and first["train_id"] in _section(html, "memorization")
    assert _real_pixels_in(html, inputs["real"]) > 0  # the detector used on the public report does see them


def test_gate_not_evaluated_membership_not_run_no_model(inputs: dict[str, Any], tmp_path: Path) -> None:
    privacy = tmp_path / "privacy"
    shutil.copytree(inputs["privacy"], privacy)
    header = json.loads((privacy / "privacy.json").read_text())
    header["membership"] = None  # what audit_privacy writes until the membership audit is wired in
    write_json(privacy / "privacy.json", header)
    out = _render(inputs, tmp_path / "report", privacy_dir=privacy, verdict=None, model_dir=None)
    html = (out / HTML).read_text(encoding="utf-8")
    assert "gate not evaluated yet" in _section(html, "summary")
    assert "Gate not evaluated yet." in _section(html, "gate")
    assert "Membership inference was not run" in _section(html, "membership")
    assert "No model directory was given" in _section(html, "privacy-ledger")
    body = read_header(out, SUMMARY, kind="report")
    assert body["verdict"] is None and body["gate_evaluated"] is False
    assert {k["status"] for k in body["key_numbers"]} == {"not_judged"}
    assert set(body["inputs"]) == {"privacy_audit", "utility_audit", "real", "synthetic"}
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in html


def test_not_differentially_private_model(inputs: dict[str, Any], tmp_path: Path) -> None:
    from synth.artifacts import write_header
    from synth.data.canonical import write_dataset

    model = tmp_path / "model"
    model.mkdir()
    card = read_header(inputs["model"], "model_card.json")
    write_header(model, "model_card.json", kind="model", schema_version=1, files=[], inputs=card["inputs"],
                 body={"class_names": card["class_names"], "privacy": None})
    model_hash = read_header(model, "model_card.json")["content_hash"]
    # The same synthetic images and metadata (same content hash) recorded as generated by this model, and a
    # privacy audit of this model (no ledger to check).
    synthetic = tmp_path / "synthetic"
    ds = load_dataset(inputs["synthetic"])
    write_dataset(synthetic, np.asarray(ds.images), ds.metadata.drop(columns="sha256"), class_names=ds.class_names,
                  source=ds.header["source"], extra={"generation": {"model_content_hash": model_hash}})
    assert load_dataset(synthetic).content_hash == ds.content_hash
    privacy = tmp_path / "privacy"
    shutil.copytree(inputs["privacy"], privacy)
    header = json.loads((privacy / "privacy.json").read_text())
    header["inputs"]["model"], header["ledger_check"] = model_hash, None
    write_json(privacy / "privacy.json", header)

    out = _render(inputs, tmp_path / "report", model_dir=model, synthetic_dir=synthetic, privacy_dir=privacy)
    html = (out / HTML).read_text(encoding="utf-8")
    assert "Not differentially private." in _section(html, "privacy-ledger")
    assert _summary_keys(out)["epsilon"]["display"] == "not differentially private"

    # A model that is not the synthetic set's generator, or not the one the privacy audit checked, is refused.
    with pytest.raises(InputError, match="synthetic set was generated by model"):
        _render(inputs, tmp_path / "r1", model_dir=model)
    with pytest.raises(InputError, match="privacy audit checked model"):
        _render(inputs, tmp_path / "r2", model_dir=model, synthetic_dir=synthetic)
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_report_on_the_filtered_set(inputs: dict[str, Any], tmp_path: Path) -> None:
    """The released set is the synthetic set without its flagged images (as `privacy.memorization.filter_flagged`
    writes it): both audits are accepted for it, with a note, and the removed copy's pair says it was removed."""
    from synth.data.canonical import write_dataset

    ds = load_dataset(inputs["synthetic"])
    keep = (ds.metadata["image_id"] != COPY_ID).to_numpy()
    filtered = write_dataset(
        tmp_path / "released", np.asarray(ds.images[keep]), ds.metadata[keep].drop(columns="sha256"),
        class_names=ds.class_names, source=ds.header["source"],
        extra={"generation": ds.header["generation"], "filtered": {"from": ds.content_hash, "removed_memorized": 1}})
    out = _render(inputs, tmp_path / "report", synthetic_dir=filtered)
    html = (out / HTML).read_text(encoding="utf-8")
    assert "The synthetic set of this report is the filtered one" in _section(html, "memorization")
    assert "removed from this (filtered) synthetic set" in _section(html, "memorization")
    assert "the utility audit was run on the synthetic set this one was filtered from" in _section(html, "provenance")
    assert read_header(out, SUMMARY, kind="report")["synthetic_counts"] == {
        name: int((ds.metadata[keep]["label"] == c).sum()) for c, name in enumerate(ds.class_names)}
    # A set filtered from some other set is still refused.
    other = write_dataset(
        tmp_path / "other", np.asarray(ds.images[keep]), ds.metadata[keep].drop(columns="sha256"),
        class_names=ds.class_names, source=ds.header["source"], extra={"filtered": {"from": "0" * 64}})
    with pytest.raises(InputError, match="privacy audit was run on synthetic set"):
        _render(inputs, tmp_path / "r", synthetic_dir=other, model_dir=None)


def test_autoescape(steward: Path) -> None:
    html = (steward / HTML).read_text(encoding="utf-8")
    assert "script" not in _parse(html).tags
    assert not re.search(r"<\s*script", html, re.IGNORECASE)
    assert "<img src=x" not in html
    assert "onerror=alert(1)>" not in html
    assert "pneumonia &lt;script&gt;alert(&#39;class&#39;)&lt;/script&gt;" in html  # class name
    assert "syn-&lt;script&gt;alert(&#39;id&#39;)&lt;/script&gt;" in html  # a synthetic image id
    assert "&lt;img src=x onerror=alert(1)&gt;" in _section(html, "gate")  # a verdict message
    assert INJECTED_CLASS not in html and INJECTED_ID not in html and INJECTED_MESSAGE not in html
    # Defence in depth: the page forbids scripts and any external resource.
    assert "default-src 'none'; img-src data:" in html


def test_public_report_has_no_real_pixels(inputs: dict[str, Any], pneumonia_dataset: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_root = Path(inputs["real"]).resolve()
    original = Dataset.__dict__["images"]

    def guarded(self: Dataset) -> np.ndarray:
        if Path(self.root).resolve() == real_root:
            raise AssertionError("the public report read real pixels")
        return original.__get__(self, Dataset)

    # By construction: the public renderer never reads the real dataset's pixels.
    monkeypatch.setattr(Dataset, "images", property(guarded))
    out = _render(inputs, tmp_path / "public", public=True)
    monkeypatch.undo()
    html = (out / HTML).read_text(encoding="utf-8")

    # And by inspection: no embedded PNG holds a real image (any 28×28 window, at any offset, in any channel),
    # checked against every image of the whole real PneumoniaMNIST, the planted copy included.
    pngs = _pngs(html)
    assert len(pngs) >= 8  # sample grids and plots are there
    assert _real_pixels_in(html, pneumonia_dataset) == 0
    assert _real_pixels_in(html, inputs["real"]) == 0

    # Every tile of the sample grids is a synthetic image, and not the flagged copy.
    syn = load_dataset(inputs["synthetic"])
    syn_hashes = dict(zip(syn.metadata["sha256"], syn.metadata["image_id"], strict=True))
    grids = [p for p in pngs if p.ndim == 2]
    tiles = []
    for g in grids:
        step = TILE + figures.GRID_PAD
        for y in range(figures.GRID_PAD, g.shape[0] - TILE + 1, step):
            for x in range(figures.GRID_PAD, g.shape[1] - TILE + 1, step):
                tile = g[y: y + TILE, x: x + TILE]
                if (tile == figures.GRID_BACKGROUND).all():
                    continue  # an empty cell of the last row
                tiles.append(syn_hashes.get(_sha(tile)))
    assert tiles and None not in tiles
    assert COPY_ID not in tiles
    memo = pd.read_parquet(inputs["privacy"] / "memorization.parquet")
    flagged = set(memo.loc[memo["flagged"], "image_id"])
    assert COPY_ID in flagged
    assert sorted(tiles) == sorted(set(syn.metadata["image_id"]) - flagged)  # every unflagged image, once

    # No real-image ids, no closest-pair images, no local paths.
    top = json.loads((inputs["privacy"] / "plots.json").read_text())["top_pairs"]
    for pairs in top.values():
        for pair in pairs:
            assert pair["train_id"] not in html
    assert "<img" not in _section(html, "real-vs-synthetic")
    assert "<img" not in _section(html, "memorization").split('id="memorization-histograms"')[0]
    summary_text = (out / SUMMARY).read_text(encoding="utf-8")
    for key in ("real", "synthetic", "model", "privacy", "utility"):
        assert str(inputs[key]) not in html and str(inputs[key]) not in summary_text
    assert "Public version: contains no real patient images" in html
    assert read_header(out, SUMMARY, kind="report")["public"] is True
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in html
    assert len(html.encode()) < 3_000_000


def test_public_report_refuses_when_flagged_images_are_unknown(inputs: dict[str, Any], tmp_path: Path) -> None:
    """Without memorization.parquet the flagged synthetic images cannot all be identified (the closest pairs list
    only some), so the public report refuses rather than risk showing one; the steward's copy renders."""
    from synth.artifacts import content_hash

    privacy = tmp_path / "privacy"
    shutil.copytree(inputs["privacy"], privacy)
    (privacy / "memorization.parquet").unlink()
    header = json.loads((privacy / "privacy.json").read_text())
    header["files"] = [f for f in header["files"] if f != "memorization.parquet"]
    header["content_hash"] = content_hash(privacy, header["files"])
    header["memorization"]["flagged"] = 5  # more than the closest pairs show
    write_json(privacy / "privacy.json", header)
    with pytest.raises(InputError, match="cannot tell which ones to keep out"):
        _render(inputs, tmp_path / "public", privacy_dir=privacy, public=True)
    assert (_render(inputs, tmp_path / "steward", privacy_dir=privacy) / HTML).is_file()


def test_output_is_deterministic(inputs: dict[str, Any], steward: Path, tmp_path: Path) -> None:
    again = _render(inputs, tmp_path / "again")
    assert (again / HTML).read_bytes() == (steward / HTML).read_bytes()
    a, b = (read_header(r, SUMMARY, kind="report") for r in (steward, again))
    assert a.pop("created") and b.pop("created")
    assert a == b
    assert len((steward / HTML).read_bytes()) < 3_000_000


def test_figures_are_deterministic_pngs() -> None:
    one = figures.roc_figure({"p": {"a": {"fpr": [0, 0.5, 1], "tpr": [0, 0.8, 1]}}}, title="t")
    assert one == figures.roc_figure({"p": {"a": {"fpr": [0, 0.5, 1], "tpr": [0, 0.8, 1]}}}, title="t")
    assert one.startswith(b"\x89PNG") and b"Software" not in one and b"matplotlib" not in one.lower()
    imgs = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    grid = figures.tile_grid(imgs, 2)
    assert grid.shape == (1 + 2 * 29, 1 + 2 * 29)
    assert (grid[1 + 29: 1 + 29 + 28, 1: 29] == imgs[2]).all()


def test_bad_inputs_one_line(inputs: dict[str, Any], steward: Path, tmp_path: Path) -> None:
    cases = [
        ({"out": steward}, "already exists"),
        ({"privacy_dir": inputs["utility"]}, "is not a synthgate artifact (no privacy.json)"),
        ({"privacy_dir": tmp_path / "missing"}, "is not a directory"),
        ({"utility_dir": inputs["privacy"]}, "is not a synthgate artifact (no utility.json)"),
        ({"real_dir": inputs["synthetic"]}, "run on real set"),
        ({"verdict": {"decision": "maybe", "checks": []}}, "verdict decision must be"),
        ({"verdict": tmp_path / "nope.json"}, "verdict file not found"),
        ({"verdict": {"decision": "pass", "checks": [{"rule": 1}]}}, "needs a 'rule'"),
    ]
    for i, (kw, message) in enumerate(cases):
        kw = {"out": tmp_path / f"out{i}", **kw}
        with pytest.raises(InputError, match=re.escape(message)) as e:
            _render(inputs, **kw)
        assert "\n" not in str(e.value)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out")]

    # An audit whose files changed after it was written is refused (exit 1).
    privacy = tmp_path / "privacy"
    shutil.copytree(inputs["privacy"], privacy)
    (privacy / "plots.json").write_text("{}")
    with pytest.raises(IntegrityError, match="content hash does not match"):
        _render(inputs, tmp_path / "out-x", privacy_dir=privacy)
    (privacy / "memorization.parquet").unlink()
    with pytest.raises(IntegrityError, match=r"is missing 'memorization.parquet', listed in its header"):
        _render(inputs, tmp_path / "out-y", privacy_dir=privacy)


def _cli(argv: list[str]) -> int:
    import flows.cli

    if "flows.cli_report" not in flows.cli._COMMAND_MODULES and not any(
        c.name == "report" for c in flows.cli.app.registered_commands
    ):
        from flows.cli_report import register

        register(flows.cli.app)  # until the lead lists flows.cli_report in _COMMAND_MODULES
    return flows.cli.run(argv)


def test_cli(inputs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    audit = tmp_path / "audit"
    audit.mkdir()
    (audit / "privacy").symlink_to(inputs["privacy"], target_is_directory=True)
    (audit / "utility").symlink_to(inputs["utility"], target_is_directory=True)
    write_json(audit / "verdict.json", verdict_for(inputs))
    # AUDIT_DIR alone: real/synthetic from the utility audit's record, the model from the synthetic set's record.
    assert _cli(["report", str(audit), "--out", str(tmp_path / "r1"), "--public"]) == 0
    body = read_header(tmp_path / "r1", SUMMARY, kind="report")
    assert body["public"] is True and body["verdict"]["decision"] == "block"
    assert set(body["inputs"]) == {"privacy_audit", "utility_audit", "real", "synthetic", "model", "verdict"}
    assert "gate: BLOCK" in capsys.readouterr().out

    # Explicit flags, no verdict.
    argv = ["report", "--privacy", str(inputs["privacy"]), "--utility", str(inputs["utility"]), "--real",
            str(inputs["real"]), "--synthetic", str(inputs["synthetic"]), "--out", str(tmp_path / "r2")]
    assert _cli(argv) == 0
    assert "gate not evaluated yet" in capsys.readouterr().out
    assert read_header(tmp_path / "r2", SUMMARY, kind="report")["public"] is False

    for bad in (["report", "--out", str(tmp_path / "r3")],
                ["report", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r3")],
                ["report", str(audit)],
                ["report", str(audit), "--out", str(tmp_path / "r1")],
                ["report", str(audit), "--real", str(inputs["synthetic"]), "--out", str(tmp_path / "r3")]):
        assert _cli(bad) == 2, bad
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "r3").exists()
