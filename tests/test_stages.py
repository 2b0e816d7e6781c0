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


def test_example_release_file_is_valid():
    from pathlib import Path

    from flows.release_config import ReleaseConfig

    cfg = ReleaseConfig.from_yaml(Path(__file__).parents[1] / "examples" / "release.yaml")
    assert cfg.train.preset == "small" and cfg.policy.min_per_class_count == 50
    assert cfg.privacy_audit["memorization"]["quantile"] == 0.01


def test_bad_release_file_names_file_and_field(tmp_path):
    from flows.release_config import ReleaseConfig
    from synth.errors import ConfigError

    path = tmp_path / "r.yaml"
    path.write_text("dp: {enabled: true, epsilon: -1}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: dp\.epsilon: .*\(got -1\)"):
        ReleaseConfig.from_yaml(path)
    path.write_text("utility_audit: {ratio: [1]}\n")
    with pytest.raises(ConfigError, match=r"utility_audit.*ratio"):
        ReleaseConfig.from_yaml(path)
    path.write_text("trian: {}\n")
    with pytest.raises(ConfigError, match="trian"):
        ReleaseConfig.from_yaml(path)
