from __future__ import annotations

import pytest

from flows.stages import artifact_hash, run_stage
from synth.artifacts import atomic_dir, write_header
from synth.errors import InputError


def _builder(calls):
    def build(out):
        calls.append(out)
        with atomic_dir(out) as tmp:
            (tmp / "x").write_text(str(len(calls)))
            write_header(tmp, "summary.json", kind="t", schema_version=1, files=["x"])
        return out

    return build


def test_same_key_is_cached_other_key_rebuilds(tmp_path):
    calls = []
    a = run_stage(tmp_path, "s", inputs={"d": "h1"}, config={"k": 1}, build=_builder(calls))
    b = run_stage(tmp_path, "s", inputs={"d": "h1"}, config={"k": 1}, build=_builder(calls))
    assert a == b and len(calls) == 1
    run_stage(tmp_path, "s", inputs={"d": "h1"}, config={"k": 2}, build=_builder(calls))
    run_stage(tmp_path, "s", inputs={"d": "h2"}, config={"k": 2}, build=_builder(calls))
    assert len(calls) == 3 and (tmp_path / "s" / "x").read_text() == "3"
    assert len(artifact_hash(tmp_path / "s")) == 64


def test_output_without_stamp_is_rebuilt(tmp_path):
    calls = []
    run_stage(tmp_path, "s", inputs={}, config={}, build=_builder(calls))
    (tmp_path / ".stages" / "s.json").unlink()  # crash between the rename and the stamp
    run_stage(tmp_path, "s", inputs={}, config={}, build=_builder(calls))
    assert len(calls) == 2


def test_failed_build_leaves_no_stamp(tmp_path):
    def broken(out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "s", inputs={}, config={}, build=broken)
    assert not (tmp_path / ".stages" / "s.json").exists() and not (tmp_path / "s").exists()


def test_artifact_hash_needs_a_header(tmp_path):
    with pytest.raises(InputError):
        artifact_hash(tmp_path)
