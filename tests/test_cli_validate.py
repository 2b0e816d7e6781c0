"""`synthgate validate`: exit 0 on the real data after the duplicate policy, 1 on leakage, 2 on a non-dataset."""

from __future__ import annotations

import shutil

from flows.cli import run
from synth.data.ingest import ingest


def test_validate_real_data_passes(tmp_path, pneumonia_dataset, capsys):
    ds = tmp_path / "ds"
    shutil.copytree(pneumonia_dataset, ds, ignore=shutil.ignore_patterns("validation"))
    assert run(["validate", str(ds)]) == 0
    out = capsys.readouterr().out
    assert "passed" in out and "27 groups" in out and "pneumonia" in out
    assert (ds / "validation" / "report.json").is_file() and (ds / "validation" / "data_docs" / "index.html").is_file()


def test_validate_blocks_cross_split_duplicates(tmp_path, pneumonia_npz, capsys):
    ds = ingest(pneumonia_npz, tmp_path / "ds", duplicate_policy="keep")
    assert run(["validate", str(ds), "--out", str(tmp_path / "v")]) == 1
    out = capsys.readouterr().out
    assert "BLOCKED" in out and "duplicates.across_splits" in out


def test_validate_non_dataset_is_input_error(tmp_path, capsys):
    assert run(["validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a synthgate artifact" in err and "Traceback" not in err


def test_validate_relative_path(tmp_path, pneumonia_dataset, monkeypatch):
    shutil.copytree(pneumonia_dataset, tmp_path / "ds", ignore=shutil.ignore_patterns("validation"))
    monkeypatch.chdir(tmp_path)
    assert run(["validate", "ds"]) == 0
    assert (tmp_path / "ds" / "validation" / "data_docs" / "index.html").is_file()
