from __future__ import annotations

import json

import pytest

from synth.artifacts import atomic_dir, read_header, verify_content, write_header
from synth.errors import InputError, IntegrityError


def test_atomic_dir_renames_only_on_success(tmp_path):
    out = tmp_path / "art"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "x"
    assert not list(tmp_path.glob("art.tmp-*"))


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("x")
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_existing_and_cleans_stale_tmp(tmp_path):
    (tmp_path / "art.tmp-dead").mkdir()
    out = tmp_path / "art"
    with atomic_dir(out):
        pass
    assert not (tmp_path / "art.tmp-dead").exists()
    with pytest.raises(InputError, match="already exists"), atomic_dir(out):
        pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "new").write_text("1")
    assert (out / "new").exists()


def test_header_hash_detects_changes(tmp_path):
    (tmp_path / "data.bin").write_bytes(b"abc")
    header = write_header(tmp_path, "h.json", kind="thing", schema_version=1, files=["data.bin"],
                          inputs={"x": "1"}, body={"extra": 5})
    data = read_header(tmp_path, "h.json", kind="thing")
    assert data["content_hash"] == header.content_hash and data["extra"] == 5
    verify_content(tmp_path, data)
    (tmp_path / "data.bin").write_bytes(b"abd")
    with pytest.raises(IntegrityError):
        verify_content(tmp_path, data)
    with pytest.raises(InputError, match="expected 'other'"):
        read_header(tmp_path, "h.json", kind="other")


def test_read_header_rejects_non_artifacts(tmp_path):
    with pytest.raises(InputError, match="not a synthgate artifact"):
        read_header(tmp_path, "h.json")
    (tmp_path / "h.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot be read as JSON"):
        read_header(tmp_path, "h.json")
    (tmp_path / "h.json").write_text(json.dumps({"kind": "x"}))
    with pytest.raises(InputError, match="not a synthgate artifact header"):
        read_header(tmp_path, "h.json")
