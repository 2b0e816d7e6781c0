"""The utility audit end to end on small real slices: schema, TSTR ≈ TRTR for real held-out images, TRTS at chance
for noise, fidelity floor vs noise, bad inputs (exit 2, one line) and the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from reports.classifier import ClassifierConfig
from reports.fidelity import FidelityConfig
from reports.utility import HEADER, KIND, ROC, UtilityConfig, audit_utility, load_audit_inputs, parse_ratios
from synth.artifacts import read_header, verify_content
from synth.data.canonical import load_dataset, write_dataset
from synth.errors import InputError

SMALL = UtilityConfig(
    # threads: module fixtures run before autouse; min_steps: the 256-image sets get 64 steps (8 epochs), not 300
    classifier=ClassifierConfig(epochs=8, width=8, batch_size=32, threads=1, min_steps=64),
    ratios=(0.5, 1.0),
    n_boot=300,
    fidelity_config=FidelityConfig(kid_subset_size=100, kid_subsets=10),
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _balanced(meta: pd.DataFrame, split: str, n: int, rng: np.random.Generator, exclude=()) -> np.ndarray:
    rows = []
    for label in (0, 1):
        idx = np.flatnonzero(((meta["split"] == split) & (meta["label"] == label)).to_numpy())
        idx = np.setdiff1d(idx, np.asarray(exclude, dtype=int))
        rows.append(rng.choice(idx, n // 2, replace=False))
    return np.sort(np.concatenate(rows))


def _write(out: Path, images: np.ndarray, meta: pd.DataFrame, class_names, split: str | None = None) -> Path:
    meta = meta.drop(columns=[c for c in ("sha256",) if c in meta.columns]).reset_index(drop=True)
    if split is not None:
        meta["split"] = split
    return write_dataset(out, images, meta, class_names=class_names, source={"format": "test"})


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory, pneumonia_dataset: Path) -> dict[str, Path]:
    """A real set (256 train / 64 val / 128 test, balanced), a 'synthetic' set of 256 *other* real train images,
    and a noise set with balanced labels."""
    ds = load_dataset(pneumonia_dataset)
    meta, names = ds.metadata, ds.class_names
    rng = np.random.default_rng(0)
    train = _balanced(meta, "train", 256, rng)
    rows = np.sort(np.concatenate([train, _balanced(meta, "val", 64, rng), _balanced(meta, "test", 128, rng)]))
    held_out = _balanced(meta, "train", 256, rng, exclude=train)
    root = tmp_path_factory.mktemp("utility")
    noise_meta = pd.DataFrame({"image_id": [f"n{i}" for i in range(200)], "split": "synthetic",
                               "label": np.arange(200) % 2})
    return {
        # An attribute column (alternating acquisition site) makes the audit report per-subgroup metrics.
        "real": _write(root / "real", np.asarray(ds.images[rows]),
                       meta.iloc[rows].assign(site=np.where(np.arange(len(rows)) % 2, "B", "A")), names),
        "heldout": _write(root / "heldout", np.asarray(ds.images[held_out]), meta.iloc[held_out], names,
                          split="synthetic"),
        "noise": _write(root / "noise", rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), noise_meta, names),
    }


@pytest.fixture(scope="module")
def heldout_audit(sets: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = audit_utility(sets["real"], sets["heldout"], tmp_path_factory.mktemp("a") / "audit", config=SMALL)
    return json.loads((out / HEADER).read_text()) | {"_dir": str(out)}


def _metric(m: dict) -> None:
    assert set(m) == {"value", "ci"}
    assert m["ci"][0] <= m["value"] <= m["ci"][1]


def test_artifact_header_schema_and_plot_data(heldout_audit: dict, sets: dict[str, Path]) -> None:
    root = Path(heldout_audit["_dir"])
    header = read_header(root, HEADER, kind=KIND)
    verify_content(root, header)
    assert header["files"] == [ROC]
    assert header["inputs"] == {"real": load_dataset(sets["real"]).content_hash,
                                "synthetic": load_dataset(sets["heldout"]).content_hash}
    assert header["config"]["classifier"]["epochs"] == 8 and header["config"]["seed"] == 0
    for setting in ("trtr", "trts", "tstr"):
        for name in ("auroc", "accuracy", "f1_macro", "balanced_accuracy"):
            _metric(header[setting][name])
        for cls in ("normal", "pneumonia"):
            for name in ("auroc", "f1", "accuracy", "precision"):
                _metric(header[setting]["per_class"][cls][name])
    for setting in ("trtr", "tstr"):  # scored on the real test split, which has the `site` attribute
        site = header[setting]["subgroups"]["site"]
        assert set(site) == {"A", "B"} and site["A"]["n"] + site["B"]["n"] == 128
        _metric(site["A"]["auroc"])
    assert header["trts"]["subgroups"] == {}  # the synthetic set has no attribute columns
    assert header["trtr"]["n"] == 128 and header["trts"]["n"] == 256 and header["tstr"]["n"] == 128
    assert header["trtr"]["classifier"]["n_train"] == 256 and header["tstr"]["classifier"]["n_train"] == 256
    assert header["trtr"]["select"] == header["tstr"]["select"] == "real/val"
    assert header["tstr_over_trtr"]["metric"] == "auroc"
    assert [p["ratio"] for p in header["augmentation"]["curve"]] == [0.0, 0.5, 1.0]
    assert [p["n_synthetic"] for p in header["augmentation"]["curve"]] == [0, 128, 256]
    assert header["augmentation"]["curve"][2]["classifier"]["n_train"] == 512
    assert header["data"]["synthetic"]["split_used"] == "synthetic"
    assert set(header["timings"]) >= {"trtr_s", "trts_s", "tstr_s", "augmentation_s", "fidelity_s", "total_s"}
    roc = json.loads((root / ROC).read_text())
    assert set(roc) == {"trtr", "trts", "tstr", "augmentation"} and set(roc["augmentation"]) == {"0.5", "1"}
    curve = roc["trtr"]["pneumonia"]
    area = np.trapezoid(curve["tpr"], curve["fpr"])
    assert area == pytest.approx(header["trtr"]["auroc"]["value"], abs=1e-4)


def test_real_heldout_images_as_synthetic_give_tstr_close_to_trtr(heldout_audit: dict) -> None:
    trtr, tstr = heldout_audit["trtr"]["auroc"], heldout_audit["tstr"]["auroc"]
    assert trtr["value"] > 0.85  # the signal is there to be preserved
    assert trtr["ci"][0] <= tstr["value"] <= trtr["ci"][1]
    ratio = heldout_audit["tstr_over_trtr"]
    assert ratio["ci"][0] <= 1.0 <= ratio["ci"][1]  # paired bootstrap: no detectable loss
    # The real classifier recognises the finding in (real) images labelled with their class.
    assert heldout_audit["trts"]["accuracy"]["value"] > 0.75
    assert heldout_audit["trts"]["auroc"]["value"] > 0.85
    for point in heldout_audit["augmentation"]["curve"][1:]:
        diff = point["auroc_minus_trtr"]
        assert diff["ci"][0] <= 0.05 and diff["ci"][1] >= -0.05  # adding real-like images costs nothing


def test_fidelity_of_real_heldout_images_matches_the_real_floor(heldout_audit: dict) -> None:
    space = heldout_audit["fidelity"]["spaces"]["classifier"]
    syn, floor = space["synthetic"]["overall"], space["real_holdout"]["overall"]
    assert syn["n_real"] == 256 and syn["n_synthetic"] == 256 and floor["n_synthetic"] == 192
    assert syn["fid"] < 2 * floor["fid"]  # unseen real train images are as close as the real holdout
    assert syn["precision"] > 0.6 and syn["recall"] > 0.6
    assert set(space["synthetic"]["per_class"]) == {"normal", "pneumonia"}
    assert space["dim"] == 32  # 4 × width 8


def test_noise_gives_trts_at_chance_and_poor_fidelity(sets: dict[str, Path], heldout_audit: dict,
                                                      tmp_path: Path) -> None:
    cfg = SMALL.model_copy(update={"ratios": ()})
    out = audit_utility(sets["real"], sets["noise"], tmp_path / "audit", config=cfg)
    result = json.loads((out / HEADER).read_text())
    trts = result["trts"]["auroc"]
    assert trts["ci"][0] <= 0.5 <= trts["ci"][1] and abs(trts["value"] - 0.5) < 0.1
    assert result["trts"]["accuracy"]["ci"][0] <= 0.5 <= result["trts"]["accuracy"]["ci"][1]
    # A model trained on noise does not recognise pneumonia in real patients.
    assert result["tstr"]["auroc"]["value"] < result["trtr"]["auroc"]["value"] - 0.2
    assert result["tstr_over_trtr"]["ci"][1] < 1.0
    assert result["augmentation"]["curve"] == [result["augmentation"]["curve"][0]]  # ratio 0 (TRTR) only
    noise_fid = result["fidelity"]["spaces"]["classifier"]["synthetic"]["overall"]["fid"]
    heldout_fid = heldout_audit["fidelity"]["spaces"]["classifier"]["synthetic"]["overall"]["fid"]
    assert noise_fid > 5 * heldout_fid


def test_class_collapsed_synthetic_set_is_blocked_by_the_default_gate(sets: dict[str, Path], heldout_audit: dict,
                                                                      tmp_path: Path) -> None:
    """Every 'synthetic' image has one class's look (real pneumonia images) while half are labelled normal: the
    classifier trained on it cannot learn 'normal'. The default policy must block it, whatever its AUROC; the
    real held-out images (a perfect generator) pass the same checks."""
    from flows.policy import GateInputs, Policy, gate
    from flows.stages import utility_gate_fields

    heldout = load_dataset(sets["heldout"])
    pneumonia = np.flatnonzero((heldout.metadata["label"] == 1).to_numpy())
    meta = heldout.metadata.iloc[np.concatenate([pneumonia, pneumonia])].reset_index(drop=True)
    meta["label"] = np.repeat([0, 1], len(pneumonia))
    meta["image_id"] = [f"c{i}" for i in range(len(meta))]
    images = np.asarray(heldout.images)[np.concatenate([pneumonia, pneumonia])]
    collapsed = _write(tmp_path / "collapsed", images, meta, heldout.class_names, split="synthetic")
    out = audit_utility(sets["real"], collapsed, tmp_path / "audit", config=SMALL.model_copy(update={"ratios": ()}))
    body = json.loads((out / HEADER).read_text())

    def judged(utility: dict):
        inputs = GateInputs(dp=False, flagged_fraction=0.0, flagged_fraction_before_filter=0.0,
                            disclosure_violations=0, **utility_gate_fields(utility))
        return gate(inputs, Policy())

    verdict = judged(body)
    assert verdict.decision == "block"
    failed = {c.rule for c in verdict.checks if not c.passed}
    assert failed == {"min_tstr_trtr_balanced_accuracy_ratio", "min_tstr_trtr_worst_class_ratio",
                      "min_trts_balanced_accuracy"}
    assert body["trts"]["balanced_accuracy"]["value"] < 0.65  # normal-labelled images look like pneumonia
    # The floor the summary quotes: always predicting the real train set's majority class (balanced slice: normal).
    floor = body["baselines"]["majority_class"]["real_test"]
    assert floor["balanced_accuracy"] == 0.5 and floor["worst_class_sensitivity"] == 0.0
    assert judged(heldout_audit).passed


def test_headline_ratios_are_paired_and_per_class(heldout_audit: dict) -> None:
    paired = heldout_audit["tstr_vs_trtr"]
    for metric in ("balanced_accuracy", "worst_class_sensitivity", "auroc"):
        _metric(paired[metric]["ratio"])
        _metric(paired[metric]["difference"])
    ba = paired["balanced_accuracy"]["ratio"]["value"]
    assert ba == pytest.approx(heldout_audit["tstr"]["balanced_accuracy"]["value"]
                               / heldout_audit["trtr"]["balanced_accuracy"]["value"], abs=1e-5)
    assert paired["auroc"]["ratio"]["value"] == heldout_audit["tstr_over_trtr"]["value"]
    for setting in ("trtr", "trts", "tstr"):
        block = heldout_audit[setting]
        assert block["worst_class"] in ("normal", "pneumonia")
        sens = {c: block["per_class"][c]["sensitivity"]["value"] for c in ("normal", "pneumonia")}
        assert block["worst_class_sensitivity"]["value"] == min(sens.values())
        _metric(block["per_class"]["normal"]["specificity"])
    point = heldout_audit["augmentation"]["curve"][1]
    _metric(point["balanced_accuracy_minus_trtr"])
    _metric(point["worst_class_sensitivity"])


def test_subgroups_list_patient_attributes_never_generation_columns(sets: dict[str, Path], tmp_path: Path) -> None:
    """A generated set carries per-image bookkeeping (seed, sampler, ...) beside its attributes; even after a later
    stage rewrites it, subgroups are formed on the attributes only."""
    from synth.generate import GENERATION_COLUMNS

    heldout = load_dataset(sets["heldout"])
    n = len(heldout.metadata)
    meta = heldout.metadata.drop(columns="sha256").assign(
        site=np.where(np.arange(n) % 2, "B", "A"), condition=np.arange(n) % 2, seed=np.arange(n) * 7919,
        sampler="sde-dpmsolver++-karras-12", steps=12, guidance_scale=1.0)
    generated = write_dataset(tmp_path / "gen", np.asarray(heldout.images), meta, class_names=heldout.class_names,
                              source={"format": "test"}, extra={"generation_columns": list(GENERATION_COLUMNS)})
    assert load_dataset(generated).header["attributes"] == ["site"]
    # The memorization filter rewrites the set from its header (without `attributes`): still only `site`.
    g = load_dataset(generated)
    rewritten = write_dataset(tmp_path / "rewritten", np.asarray(g.images), g.metadata.drop(columns="sha256"),
                              class_names=g.class_names, source={"format": "test"},
                              extra={"generation_columns": g.header["generation_columns"]})
    out = audit_utility(sets["real"], rewritten, tmp_path / "audit",
                        config=SMALL.model_copy(update={"ratios": (), "fidelity": False}))
    body = json.loads((out / HEADER).read_text())
    assert set(body["trts"]["subgroups"]) == {"site"}
    assert not set(GENERATION_COLUMNS) & set(body["trts"]["subgroups"])


def _variant(src: Path, out: Path, *, images=None, class_names=None, keep=None, split=None) -> Path:
    ds = load_dataset(src)
    meta = ds.metadata
    imgs = np.asarray(ds.images) if images is None else images
    if keep is not None:
        imgs, meta = imgs[keep], meta[keep]
    return _write(out, imgs, meta, class_names or ds.class_names, split=split)


def _bad_input_cases(sets: dict[str, Path], tmp: Path) -> dict[str, tuple[Path, Path, str]]:
    real, syn = sets["real"], sets["heldout"]
    syn_imgs = np.asarray(load_dataset(syn).images)
    syn_meta = load_dataset(syn).metadata
    real_meta = load_dataset(real).metadata
    return {
        "size": (real, _variant(syn, tmp / "s32", images=np.pad(syn_imgs, ((0, 0), (2, 2), (2, 2)))),
                 r"images are 32×32×1 \(H×W×C\) but the real set's are 28×28×1"),
        "channels": (real, _variant(syn, tmp / "rgb", images=np.repeat(syn_imgs[..., None], 3, axis=3)),
                     r"images are 28×28×3"),
        "class names": (real, _variant(syn, tmp / "names", class_names=["healthy", "pneumonia"]),
                        r"class names \['healthy', 'pneumonia'\] differ from the real set's"),
        "missing class": (real, _variant(syn, tmp / "one", keep=(syn_meta["label"] == 1).to_numpy()),
                          r"synthetic set has no images of class\(es\) \['normal'\]"),
        "empty": (real, _variant(syn, tmp / "empty", keep=np.zeros(len(syn_meta), bool)),
                  r"synthetic set is empty \(0 images\)"),
        "no test split": (_variant(real, tmp / "notest", keep=(real_meta["split"] != "test").to_numpy()), syn,
                          r"real set needs train/val/test splits; missing test"),
    }


def test_bad_inputs_raise_before_training(sets: dict[str, Path], tmp_path: Path) -> None:
    for name, (real, syn, message) in _bad_input_cases(sets, tmp_path).items():
        with pytest.raises(InputError, match=message):
            load_audit_inputs(real, syn)
        assert not (tmp_path / f"out-{name}").exists()


def test_cli_bad_inputs_exit_2_with_one_line(sets: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import run

    for name, (real, syn, message) in _bad_input_cases(sets, tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        code = run(["audit", "utility", "--real", str(real), "--synthetic", str(syn), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1 and err.startswith("error:"), err
        import re

        assert re.search(message, err), (name, err)
        assert not out.exists()
    code = run(["audit", "utility", "--real", str(sets["real"]), "--synthetic", str(sets["heldout"]),
                "--out", str(tmp_path / "x"), "--ratios", "1,abc"])
    assert code == 2 and "'abc' is not a number" in capsys.readouterr().err
    code = run(["audit", "utility", "--real", str(sets["real"]), "--synthetic", str(sets["heldout"]),
                "--out", str(tmp_path / "x"), "--epochs", "0"])
    assert code == 2 and "epochs" in capsys.readouterr().err


def test_cli_runs_the_audit_and_matches_the_function(pneumonia_slice: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """`synthgate audit utility` writes the same artifact (same content hash) as `audit_utility` with the same
    settings: seeded end to end."""
    from flows.cli import run

    ds = load_dataset(pneumonia_slice)
    syn = _variant(pneumonia_slice, tmp_path / "syn", keep=(ds.metadata["split"] == "train").to_numpy(),
                   split="synthetic")
    cfg_file = tmp_path / "utility.yaml"
    # min_steps: epochs only, as --epochs says; the 300-step floor is tested elsewhere and would cost ~40 s here
    cfg_file.write_text("classifier:\n  width: 8\n  batch_size: 32\n  min_steps: null\n"
                        "fidelity_config:\n  kid_subset_size: 50\n  kid_subsets: 5\n")
    # A (barely trained) privacy copy-detection encoder adds a second fidelity space.
    from privacy.embeddings import EncoderConfig, save_encoder, train_encoder

    train_images, _ = ds.split("train")
    encoder = save_encoder(train_encoder(train_images, EncoderConfig(steps=2, batch_size=16, hidden=16, dim=8)),
                           tmp_path / "encoder")
    # A user-supplied Inception TorchScript (here a stand-in: average-pooled 299×299 input) adds a third space.
    inception = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())),
                   str(inception))
    out = tmp_path / "audit"
    code = run(["audit", "utility", "--inception-weights", str(inception),
                "--real", str(pneumonia_slice), "--synthetic", str(syn), "--out", str(out),
                "--epochs", "2", "--seed", "3", "--ratios", "1,2", "--bootstrap", "100", "--config", str(cfg_file),
                "--encoder", str(encoder), "--threads", "1"])
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, printed
    assert "TSTR" in printed and "utility.json" in printed
    # stderr is not a terminal here: each audit step is a progress line on stderr (flows/cli_progress.py)
    assert "utility audit: TRTS: scoring 64 synthetic images" in captured.err
    header = read_header(out, HEADER, kind=KIND)
    cfg = header["config"]
    assert cfg["classifier"] == {**cfg["classifier"], "epochs": 2, "seed": 3, "width": 8, "threads": 1}
    assert cfg["seed"] == 3 and cfg["ratios"] == [1.0, 2.0] and cfg["n_boot"] == 100
    # 64 synthetic images for 64 real: ratio 2 is capped to the ratio-1 data, so that classifier is reused.
    one, two = header["augmentation"]["curve"][1:]
    assert one["n_synthetic"] == two["n_synthetic"] == 64 and two["ratio_effective"] == 1.0
    assert two["note"] == "synthetic set too small: used all 64 images" and "note" not in one
    assert two["auroc"] == one["auroc"] and header["timings"]["augmentation_s"]["2"] == 0.0
    assert header["tstr"]["classifier"]["config"]["seed"] == 3
    assert set(header["fidelity"]["spaces"]) == {"classifier", "copy_encoder", "inception"}
    assert header["fidelity"]["spaces"]["inception"]["dim"] == 12
    assert header["fidelity"]["spaces"]["copy_encoder"]["dim"] == 8
    assert header["inputs"]["encoder"] == read_header(encoder, "encoder.json")["content_hash"]
    again = audit_utility(pneumonia_slice, syn, tmp_path / "again", config=UtilityConfig.model_validate(cfg))
    assert read_header(again, HEADER)["content_hash"] == header["content_hash"]
    assert run(["audit", "utility", "--real", str(pneumonia_slice), "--synthetic", str(syn),
                "--out", str(out)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_parse_ratios() -> None:
    assert parse_ratios("0.5, 1,2") == (0.5, 1.0, 2.0)
    assert parse_ratios("") == ()
    with pytest.raises(InputError, match="ratios must be positive"):
        parse_ratios("1,-2")
    assert UtilityConfig(ratios=(2.0, 0.5, 2.0)).ratios == (0.5, 2.0)


def test_register_joins_the_audit_sub_app_of_cli_audit(monkeypatch: pytest.MonkeyPatch) -> None:
    """With flows/cli_audit.py present, `utility` is added to its `audit_app` (no second `audit` group)."""
    import types

    import typer
    from typer.testing import CliRunner

    from flows import cli_utility

    audit_app = typer.Typer(name="audit", no_args_is_help=True)

    @audit_app.command("privacy")
    def privacy() -> None:
        """Stand-in for the privacy audit."""

    app = typer.Typer()
    app.add_typer(audit_app, name="audit")
    monkeypatch.setitem(sys.modules, "flows.cli_audit", types.SimpleNamespace(audit_app=audit_app))
    cli_utility.register(app)
    assert len(app.registered_groups) == 1
    assert [c.name for c in audit_app.registered_commands] == ["privacy", "utility"]
    result = CliRunner().invoke(app, ["audit", "utility", "--help"])
    assert result.exit_code == 0 and "--synthetic" in result.output and "--ratios" in result.output


def test_prefect_summary_leads_with_balanced_accuracy_and_the_floor(heldout_audit: dict) -> None:
    from flows.stages import utility_markdown

    text = utility_markdown(Path(heldout_audit["_dir"]))
    lines = text.splitlines()
    assert lines[0] == "| | TRTR | TSTR | TRTS |"
    assert lines[2].startswith("| balanced accuracy | ") and lines[3].startswith("| worst-class sensitivity | ")
    trtr = heldout_audit["trtr"]["balanced_accuracy"]["value"]
    assert f"| balanced accuracy | {trtr:.3f} |" in text
    assert "Always predicting 'normal' scores balanced accuracy 0.500" in text
    assert "balanced accuracy " in lines[-1] and "worst class sensitivity" in lines[-1]


def test_report_summary_leads_with_balanced_accuracy_and_the_worst_class(heldout_audit: dict) -> None:
    from reports.report_numbers import _utility_key_numbers

    keys = _utility_key_numbers(heldout_audit)
    order = [k.key for k in keys]
    assert order[:3] == ["trtr_balanced_accuracy", "tstr_balanced_accuracy", "tstr_trtr_balanced_accuracy_ratio"]
    assert order.index("tstr_trtr_worst_class_ratio") < order.index("trtr_auroc")
    worst = next(k for k in keys if k.key == "tstr_worst_class_sensitivity")
    assert worst.label.endswith(f"({heldout_audit['tstr']['worst_class']})")
    assert "always predicts 'normal' scores balanced accuracy 0.500" in keys[0].note
    assert next(k for k in keys if k.key == "trts_balanced_accuracy").rules == ("min_trts_balanced_accuracy",)
