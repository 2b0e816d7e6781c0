"""`synthgate audit privacy`: the artifact, exit codes, --filter, the DP ledger check and bad inputs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
import torch

from flows.cli import run
from privacy.ledger import build_ledger
from privacy.ledger_check import LEDGER_FILE, check_ledger
from synth.artifacts import atomic_dir, read_header, verify_content, write_header
from synth.data.canonical import load_dataset, write_dataset
from synth.errors import InputError
from tests.planted import apply_transform
from tests.privacy_fixtures import write_synthetic

STEPS = ["--encoder-steps", "10"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, pneumonia_dataset: Path, pneumonia_slice: Path) -> Path:
    """40 real test images that are not in the slice, plus 4 brightened copies of the slice's training images."""
    full, sl = load_dataset(pneumonia_dataset), load_dataset(pneumonia_slice)
    test_images, test_meta = full.split("test")
    unused = ~test_meta["image_id"].isin(set(sl.metadata["image_id"])).to_numpy()
    clean = test_images[unused][:40]
    train = sl.split("train")[0]
    copies = apply_transform(train[:4], "brighter", np.random.default_rng(0))
    images = np.concatenate([clean, copies])
    labels = np.r_[test_meta["label"].to_numpy()[unused][:40], np.zeros(4, int)]
    return write_synthetic(tmp_path_factory.mktemp("syn") / "syn", images, labels)


def _ledger(epsilon_factor: float = 1.0) -> str:
    ledger = build_ledger([(1.1, 0.05, 300)], delta=1e-5, accountant="rdp", max_grad_norm=1.0, noise_multiplicity=1,
                          dataset_size=64, batch_size=3, check=False)
    return replace(ledger, epsilon=ledger.epsilon * epsilon_factor).to_json()


def _model_dir(out: Path, ledger: str | None, *, declares_dp: bool = True) -> Path:
    with atomic_dir(out) as tmp:
        if ledger is not None:
            (tmp / LEDGER_FILE).write_text(ledger)
        write_header(tmp, "model_card.json", kind="model", schema_version=1, files=[],
                     body={"privacy": {"dp": True} if declares_dp else None})
    return out


def test_audit_writes_the_artifact_and_filters(tmp_path, pneumonia_slice, synthetic, capsys):
    out, filtered = tmp_path / "audit", tmp_path / "filtered"
    code = run(["audit", "privacy", "--real", str(pneumonia_slice), "--synthetic", str(synthetic), "--out", str(out),
                "--filter", str(filtered), *STEPS])
    assert code == 0, capsys.readouterr()
    # stderr is not a terminal here: the stages are progress lines on stderr (flows/cli_progress.py)
    err = capsys.readouterr().err
    assert "privacy reference: copy-detection encoder: started (10 steps)" in err
    assert "privacy audit: memorization: nearest training image of 44 synthetic images" in err
    header = read_header(out, "privacy.json", kind="privacy_audit")
    verify_content(out, header)
    real, syn = load_dataset(pneumonia_slice), load_dataset(synthetic)
    assert header["inputs"] == {"real": real.content_hash, "synthetic": syn.content_hash}
    assert header["passed"] is True and header["membership"] is None and header["ledger_check"] is None
    mem = header["memorization"]
    assert mem["spaces"] == ["pixel", "learned", "registered"]
    assert header["counts"] == {"train": 64, "holdout": 64, "holdout_splits": ["val", "test"], "synthetic": 44}
    assert set(mem["thresholds"]) == set(mem["per_space"]) == {"pixel", "learned", "registered"}
    assert mem["null"]["size"] == 64 and mem["null"]["quantile_below_resolution"]
    assert header["disclosure"]["passed"] and header["disclosure"]["columns"] == ["label"]
    table = pd.read_parquet(out / "memorization.parquet")
    assert len(table) == 44 and table["image_id"].tolist() == syn.metadata["image_id"].tolist()
    flagged = set(table.loc[table["flagged"], "image_id"])
    assert {f"syn-{i:05d}" for i in range(40, 44)} <= flagged
    assert mem["flagged"] == len(flagged) and mem["flagged_fraction"] == pytest.approx(len(flagged) / 44)
    assert any(f["rule"] == "memorization.flagged" and f["severity"] == "warn" for f in header["findings"])
    plots = json.loads((out / "plots.json").read_text())
    assert sum(plots["histograms"]["pixel"]["holdout_to_train"]) == 64
    assert plots["top_pairs"]["pixel"][0]["synthetic_id"] in flagged
    assert len(pd.read_parquet(out / "holdout_distances.parquet")) == 64
    assert (out / "encoder" / "encoder.json").is_file()
    # --filter: the synthetic set without its flagged images, recorded in the audit
    kept = load_dataset(filtered)
    assert set(kept.metadata["image_id"]) == set(table["image_id"]) - flagged
    assert header["filtered"]["content_hash"] == kept.content_hash
    assert header["filtered"]["removed_memorized"] == len(flagged)
    # the saved encoder can be reused for another audit of the same real set
    again = tmp_path / "audit2"
    assert run(["audit", "privacy", "--real", str(pneumonia_slice), "--synthetic", str(synthetic), "--out",
                str(again), "--encoder", str(out / "encoder")]) == 0
    h2 = read_header(again, "privacy.json")
    assert h2["inputs"]["encoder"] and h2["memorization"]["thresholds"] == mem["thresholds"]


def test_a_failed_threshold_exits_1_with_a_complete_audit(tmp_path, pneumonia_slice, synthetic):
    out = tmp_path / "audit"
    code = run(["audit", "privacy", "--real", str(pneumonia_slice), "--synthetic", str(synthetic), "--out", str(out),
                "--max-flagged-fraction", "0.05", "--threads", "1", *STEPS])
    assert code == 1
    header = read_header(out, "privacy.json")
    assert header["passed"] is False
    assert [f["rule"] for f in header["findings"] if f["severity"] == "block"] == ["memorization.flagged_fraction"]


def test_ledger_check_passes_and_fails(tmp_path, pneumonia_slice, synthetic):
    good = check_ledger(_model_dir(tmp_path / "good", _ledger()))
    assert good is not None and good.passed and good.relative_difference < 1e-3
    assert good.method == "rdp" and good.library.startswith("dp-accounting")
    bad = check_ledger(_model_dir(tmp_path / "bad", _ledger(0.95)))  # claims 5% less than it spent
    assert bad is not None and not bad.passed and bad.relative_difference == pytest.approx(1 / 0.95 - 1, rel=1e-2)
    assert check_ledger(_model_dir(tmp_path / "none", None, declares_dp=False)) is None
    with pytest.raises(InputError, match=LEDGER_FILE):
        check_ledger(_model_dir(tmp_path / "broken", "{not json"))
    # through the CLI: a disagreeing ledger blocks (exit 1) and is reported
    out = tmp_path / "audit"
    code = run(["audit", "privacy", "--real", str(pneumonia_slice), "--synthetic", str(synthetic), "--out", str(out),
                "--model", str(tmp_path / "bad"), "--no-membership", *STEPS])
    assert code == 1
    header = read_header(out, "privacy.json")
    assert header["ledger_check"]["passed"] is False
    assert header["inputs"]["model"] and header["inputs"]["privacy_ledger"]
    assert any(f["rule"] == "ledger.epsilon" and f["severity"] == "block" for f in header["findings"])


def _bad_real(tmp_path: Path, source: Path, keep_splits: tuple[str, ...]) -> Path:
    ds = load_dataset(source)
    mask = ds.metadata["split"].isin(keep_splits).to_numpy()
    return write_dataset(tmp_path / f"real-{'-'.join(keep_splits)}", np.asarray(ds.images[mask]),
                         ds.metadata[mask].drop(columns="sha256").reset_index(drop=True),
                         class_names=ds.class_names, source={"kind": "test"})


def test_bad_inputs_exit_2_and_write_nothing(tmp_path, pneumonia_slice, synthetic, capsys):
    rng = np.random.default_rng(0)
    big = write_synthetic(tmp_path / "big", (rng.random((5, 32, 32)) * 255).astype(np.uint8), np.zeros(5, int))
    empty = write_synthetic(tmp_path / "empty", np.zeros((0, 28, 28), np.uint8), np.zeros(0, int))
    corrupt = write_synthetic(tmp_path / "corrupt", np.zeros((5, 28, 28), np.uint8), np.zeros(5, int))
    np.save(corrupt / "images.npy", np.full((5, 28, 28), np.nan))  # float images holding NaN
    no_train = _bad_real(tmp_path, pneumonia_slice, ("val", "test"))
    no_holdout = _bad_real(tmp_path, pneumonia_slice, ("train",))
    cases = {
        "32×32": ["--real", str(pneumonia_slice), "--synthetic", str(big)],
        "holds no images": ["--real", str(pneumonia_slice), "--synthetic", str(empty)],
        "uint8": ["--real", str(pneumonia_slice), "--synthetic", str(corrupt)],
        "no 'train' split": ["--real", str(no_train), "--synthetic", str(synthetic)],
        "no holdout": ["--real", str(no_holdout), "--synthetic", str(synthetic)],
        "not a synthgate artifact": ["--real", str(pneumonia_slice), "--synthetic", str(tmp_path)],
        "quantile": ["--real", str(pneumonia_slice), "--synthetic", str(synthetic), "--quantile", "0.9"],
        "encoder.json": ["--real", str(pneumonia_slice), "--synthetic", str(synthetic), "--encoder", str(tmp_path)],
    }
    for message, args in cases.items():
        out = tmp_path / "out"
        filtered = tmp_path / "filtered"
        code = run(["audit", "privacy", *args, "--out", str(out), "--filter", str(filtered), *STEPS])
        err = capsys.readouterr().err
        assert code == 2, (message, err)
        assert message in err, (message, err)
        assert not out.exists() and not filtered.exists(), message
        assert not list(tmp_path.glob("out.tmp-*")), message
    # an existing --out is refused before any work
    (tmp_path / "taken").mkdir()
    assert run(["audit", "privacy", "--real", str(pneumonia_slice), "--synthetic", str(synthetic), "--out",
                str(tmp_path / "taken"), *STEPS]) == 2
    assert "already exists" in capsys.readouterr().err


def test_an_encoder_trained_on_other_data_is_refused(tmp_path, pneumonia_slice, pneumonia_dataset, synthetic,
                                                     capsys):
    from privacy.embeddings import save_encoder, train_encoder
    from tests.privacy_fixtures import TINY_ENCODER

    enc = train_encoder(load_dataset(pneumonia_dataset).split("train")[0][:64], TINY_ENCODER, data_hash="other")
    path = save_encoder(enc, tmp_path / "enc")
    code = run(["audit", "privacy", "--real", str(pneumonia_slice), "--synthetic", str(synthetic), "--out",
                str(tmp_path / "out"), "--encoder", str(path)])
    assert code == 2 and "trained on 'other'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
