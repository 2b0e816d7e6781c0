"""Ingest of the real PneumoniaMNIST and the `ingest` CLI: counts, duplicates, atomicity, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from flows.cli import run
from synth.data.canonical import load_dataset
from synth.data.imagefolder import resize_square
from synth.data.ingest import ingest
from synth.errors import InputError


def test_real_pneumoniamnist_counts_and_duplicates(pneumonia_dataset):
    header = json.loads((pneumonia_dataset / "dataset.json").read_text())
    counts = header["counts"]
    assert (counts["train"], counts["val"], counts["test"]) == (4690, 516, 621)
    assert set(counts["per_class"]["train"]) == {"normal", "pneumonia"}
    dup = header["duplicates"]
    assert (dup["groups"], dup["within_split"], dup["across_splits"]) == (27, 19, 8)
    assert dup["removed_per_split"] == {"test": 3, "train": 18, "val": 8}
    assert all(g["splits"][0] == "train" for g in dup["group_list"] if g["spans_splits"])
    assert header["license"] == "CC BY 4.0" and header["class_names"] == ["normal", "pneumonia"]


def test_canonical_form_is_consistent(pneumonia_dataset):
    ds = load_dataset(pneumonia_dataset, verify=True)
    meta = ds.metadata
    assert ds.images.dtype == np.uint8 and ds.images.shape == (5827, 28, 28)
    assert list(meta.columns) == ["image_id", "split", "label", "sha256"]
    assert meta["image_id"].is_unique and meta["sha256"].is_unique  # collapse policy left no duplicate
    # The collapse policy keeps the train copy: no holdout image equals a training image.
    train = set(meta.loc[meta["split"] == "train", "sha256"])
    assert not train & set(meta.loc[meta["split"] != "train", "sha256"])


def test_ingest_is_deterministic(tmp_path, pneumonia_npz, pneumonia_dataset):
    again = ingest(pneumonia_npz, tmp_path / "again")
    assert load_dataset(again).content_hash == load_dataset(pneumonia_dataset).content_hash


def test_keep_policy_keeps_all_images(tmp_path, pneumonia_npz):
    out = ingest(pneumonia_npz, tmp_path / "keep", duplicate_policy="keep")
    header = load_dataset(out).header
    assert header["counts"]["total"] == 5856 and header["duplicates"]["removed"] == 0


def test_cli_ingest_real_data(tmp_path, pneumonia_npz, capsys):
    assert run(["ingest", str(pneumonia_npz), "--out", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert "27 groups (19 inside a split, 8 across splits)" in out and "4690" in out


def test_cli_bad_input_one_line_exit_2_nothing_left(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_text("not an archive")
    out = tmp_path / "ds"
    assert run(["ingest", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [bad]


def test_existing_output_is_refused(tmp_path, pneumonia_npz):
    (tmp_path / "ds").mkdir()
    with pytest.raises(InputError, match="already exists"):
        ingest(pneumonia_npz, tmp_path / "ds")


def test_failure_mid_write_leaves_no_directory(tmp_path, pneumonia_npz, monkeypatch):
    import synth.data.canonical as canonical

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(canonical, "write_header", broken)
    with pytest.raises(OSError):
        ingest(pneumonia_npz, tmp_path / "ds")
    assert list(tmp_path.iterdir()) == []


def test_console_script_prints_no_traceback(tmp_path):
    missing = tmp_path / "missing.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", "ingest", str(missing), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and str(missing) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_npz_is_resized_and_converted_like_a_folder(tmp_path, capsys):
    """`--size`/`--channels` work on an .npz (HAM10000 64 px RGB → 28 px), with the change recorded."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(-1, 1).astype(np.uint8)
    src = tmp_path / "rgb64.npz"
    np.savez(src, **arrays)
    assert run(["ingest", str(src), "--out", str(tmp_path / "rgb28"), "--size", "28", "--classes", "a,b"]) == 0
    ds = load_dataset(tmp_path / "rgb28")
    assert ds.images.shape == (20, 28, 28, 3) and ds.header["image"]["channels"] == 3
    assert ds.header["config"]["size"] == 28 and ds.header["source"]["resized_to"] == 28
    assert any("resized from 64×64 to 28×28" in note for note in ds.header["notes"])
    first = resize_square(arrays["train_images"][0], 28)
    assert np.array_equal(np.asarray(ds.images[0]), first)
    assert run(["ingest", str(src), "--out", str(tmp_path / "gray"), "--channels", "1"]) == 0
    gray = load_dataset(tmp_path / "gray")
    assert gray.images.shape == (20, 64, 64)
    capsys.readouterr()
    assert run(["ingest", str(src), "--out", str(tmp_path / "bad"), "--size", "0"]) == 2
    assert "--size: must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert run(["ingest", str(src), "--out", str(tmp_path / "win"), "--window", "40", "400"]) == 2
    assert "--window applies to DICOM sources only" in capsys.readouterr().err
