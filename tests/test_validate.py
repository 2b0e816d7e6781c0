"""Dataset validation: GX metadata suite, pixels, duplicates, leakage, PHI, the artifact and its privacy."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synth.data import expectations as gxs
from synth.data import validate as v
from synth.data.canonical import load_dataset, write_dataset
from synth.errors import ConfigError, InputError, ValidationFailed

CLASSES = ["normal", "pneumonia"]


def _tiny(
    root: Path,
    name: str = "ds",
    *,
    sizes: dict[str, int] | None = None,
    seed: int = 0,
    mutate=None,
    images_mutate=None,
    **kwargs,
) -> Path:
    """A tiny canonical dataset: `sizes[split]` images per class, random 8×8 pixels (all distinct)."""
    sizes = sizes or {"train": 4, "val": 2, "test": 2}
    rng = np.random.default_rng(seed)
    rows = [
        (f"{split}-{label}-{i}", split, label)
        for split, n in sizes.items()
        for label in range(len(CLASSES))
        for i in range(n)
    ]
    meta = pd.DataFrame(rows, columns=["image_id", "split", "label"])
    if mutate is not None:
        meta = mutate(meta)
    images = rng.integers(0, 256, size=(len(meta), 8, 8), dtype=np.uint8)
    if images_mutate is not None:
        images = images_mutate(images, meta)
    return write_dataset(root / name, images, meta, class_names=CLASSES, source={"name": "tiny"}, **kwargs)


def _rewrite_metadata(ds: Path, fn) -> None:
    """Edit metadata.parquet behind the header's back (as a damaged or hand-edited dataset would be)."""
    meta = pd.read_parquet(ds / "metadata.parquet")
    fn(meta).to_parquet(ds / "metadata.parquet", index=False)


def _edit_header(ds: Path, fn) -> None:
    header = json.loads((ds / "dataset.json").read_text())
    fn(header)
    (ds / "dataset.json").write_text(json.dumps(header))


def _rules(report: v.ValidationReport, severity: str | None = None) -> set[str]:
    return {f.rule for f in report.findings if severity is None or f.severity == severity}


def _one(report: v.ValidationReport, rule: str) -> v.Finding:
    found = report.by_rule(rule)
    assert len(found) == 1, report.findings
    return found[0]


# --- a clean dataset and the artifact -------------------------------------------------------------------


def test_clean_dataset_passes_and_writes_artifact(tmp_path: Path) -> None:
    ds = _tiny(tmp_path, sizes={"train": 4, "val": 2, "test": 2})
    report = v.validate_dataset(ds, min_per_class=2)

    assert report.passed
    assert _rules(report, "block") == set() and _rules(report, "warn") == set()
    assert _rules(report, "info") == {"duplicates.ingest", "patients.unchecked"}
    assert report.class_counts == {
        "train": {"normal": 4, "pneumonia": 4},
        "val": {"normal": 2, "pneumonia": 2},
        "test": {"normal": 2, "pneumonia": 2},
    }
    assert report.pixels["sha256_checked"] == 16 and report.pixels["sha256_mismatched"] == 0
    assert report.expectations and all(e.success for e in report.expectations)
    # One suite covers every required rule, and the class-count check ran per split and class.
    assert {e.rule for e in report.expectations} == {
        gxs.COLUMNS, gxs.TYPES, gxs.NOT_NULL, gxs.LABEL_RANGE, gxs.SPLIT_VALUES, gxs.IMAGE_ID_UNIQUE,
        gxs.SHA256_FORMAT, gxs.CLASS_COUNT,
    }
    assert sum(e.rule == gxs.CLASS_COUNT for e in report.expectations) == 6

    out = ds / "validation"  # the default
    assert report.out == out
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith("validation")) == ["validation"]
    header = json.loads((out / "report.json").read_text())
    assert header["kind"] == "validation" and header["schema_version"] == 1
    assert header["inputs"] == {"dataset": load_dataset(ds).content_hash}
    assert header["config"] == {"min_per_class": 2}
    assert header["passed"] is True and header["summary"] == {"block": 0, "warn": 0, "info": 2}
    assert (out / "data_docs" / "index.html").is_file()
    assert any((out / "data_docs" / "validations").rglob("*.html"))
    assert "data_docs/index.html" in header["files"]
    # The dataset itself is untouched: its content hash still verifies.
    load_dataset(ds, verify=True)

    again = v.load_report(out)
    assert again.to_json() == report.to_json()
    report.raise_for_blocking()  # no-op


def test_rerun_replaces_report_atomically(tmp_path: Path) -> None:
    ds = _tiny(tmp_path)
    out = tmp_path / "val"
    v.validate_dataset(ds, out, min_per_class=2)
    (out / "stale.txt").write_text("old")
    v.validate_dataset(ds, out, min_per_class=3)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "report.json").read_text())["config"] == {"min_per_class": 3}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("val")] == ["val"]


def test_failure_midway_leaves_no_partial_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _tiny(tmp_path)
    out = tmp_path / "val"

    def boom(*args, docs_dir: Path, **kwargs):
        docs_dir.mkdir()
        (docs_dir / "index.html").write_text("half-built")
        raise RuntimeError("docs build crashed")

    monkeypatch.setattr(gxs, "run_metadata_suite", boom)
    with pytest.raises(RuntimeError):
        v.validate_dataset(ds, out)
    assert not out.exists()
    assert list(tmp_path.glob("val*")) == []

    # An earlier report survives a failed re-run unchanged.
    monkeypatch.undo()
    v.validate_dataset(ds, out, min_per_class=2)
    before = (out / "report.json").read_text()
    monkeypatch.setattr(gxs, "run_metadata_suite", boom)
    with pytest.raises(RuntimeError):
        v.validate_dataset(ds, out)
    assert (out / "report.json").read_text() == before
    assert [p.name for p in tmp_path.glob("val*")] == ["val"]


def test_refuses_outputs_it_must_not_replace(tmp_path: Path) -> None:
    ds = _tiny(tmp_path)
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="not a validation report"):
        v.validate_dataset(ds, other)
    assert (other / "keep.txt").read_text() == "x"
    with pytest.raises(InputError, match="replace the dataset"):
        v.validate_dataset(ds, ds)
    assert (ds / "images.npy").is_file()


def test_input_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a synthgate artifact"):
        v.validate_dataset(tmp_path / "empty")
    ds = _tiny(tmp_path)
    with pytest.raises(ConfigError, match="min_per_class"):
        v.validate_dataset(ds, min_per_class=-1)
    (ds / "metadata.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"metadata\.parquet"):
        v.validate_dataset(ds)


# --- metadata rules (GX suite) ----------------------------------------------------------------------------


def _set(col, value, row=0, dtype=None):
    def fn(meta: pd.DataFrame) -> pd.DataFrame:
        meta = meta.copy()
        meta[col] = meta[col].astype(object)
        meta.loc[row, col] = value
        if dtype is not None:
            meta[col] = meta[col].astype(dtype)
        return meta

    return fn


@pytest.mark.parametrize(
    ("mutate", "rule", "count"),
    [
        (_set("label", 5, dtype="int64"), gxs.LABEL_RANGE, 1),
        (_set("label", -1, dtype="int64"), gxs.LABEL_RANGE, 1),
        (_set("split", "holdout"), gxs.SPLIT_VALUES, 1),
        (_set("image_id", "train-0-1"), gxs.IMAGE_ID_UNIQUE, 2),
    ],
    ids=["label-high", "label-negative", "split", "image-id"],
)
def test_metadata_rules_block(tmp_path: Path, mutate, rule: str, count: int) -> None:
    # Written through write_dataset, so the header agrees and only the metadata rule fires.
    ds = _tiny(tmp_path, mutate=mutate)
    report = v.validate_dataset(ds, tmp_path / "out", min_per_class=2)
    assert not report.passed
    assert _rules(report, "block") == {rule}
    assert _one(report, rule).count == count
    failed = [e for e in report.expectations if not e.success]
    assert [e.rule for e in failed] == [rule]
    with pytest.raises(ValidationFailed, match=rule) as err:
        report.raise_for_blocking()
    assert err.value.exit_code == 1


@pytest.mark.parametrize(
    ("edit", "rules", "column"),
    [
        (lambda m: m.drop(columns="label"), {gxs.COLUMNS}, "label"),
        (lambda m: m.drop(columns="sha256"), {gxs.COLUMNS}, "sha256"),
        (lambda m: m.assign(label=m["label"].astype(str)), {gxs.TYPES}, "label"),
        (lambda m: m.assign(image_id=np.arange(len(m))), {gxs.TYPES}, "image_id"),
        (_set("sha256", None), {gxs.NOT_NULL, "pixels.sha256"}, "sha256"),
        (_set("sha256", "F" * 64), {gxs.SHA256_FORMAT, "pixels.sha256"}, "sha256"),
    ],
    ids=["no-label", "no-sha256", "label-str", "image-id-int", "sha-null", "sha-format"],
)
def test_tampered_metadata_blocks(tmp_path: Path, edit, rules: set[str], column: str) -> None:
    ds = _tiny(tmp_path)
    _rewrite_metadata(ds, edit)
    report = v.validate_dataset(ds, tmp_path / "out", min_per_class=2)
    assert not report.passed
    # The edit also breaks the dataset's content hash, which is reported, not raised.
    assert _rules(report, "block") == rules | {"integrity.content_hash"}
    failed = [e for e in report.expectations if not e.success]
    assert failed and {e.column for e in failed} == {column}
    assert not any(e.raised for e in report.expectations)


def test_class_count_blocks_on_train_and_warns_elsewhere(tmp_path: Path) -> None:
    def thin(meta):
        drop = meta[(meta["split"] == "train") & (meta["label"] == 1)].index[:2]
        return meta.drop(index=drop).reset_index(drop=True)

    ds = _tiny(tmp_path, sizes={"train": 4, "val": 2, "test": 2}, mutate=thin)
    report = v.validate_dataset(ds, tmp_path / "out", min_per_class=3)
    blocks = report.by_rule(gxs.CLASS_COUNT)
    train = [f for f in blocks if f.severity == "block"]
    assert len(train) == 1 and train[0].count == 2
    message = train[0].message
    assert "'train'" in message and "'pneumonia'" in message and "minimum 3" in message
    # val and test hold 2 of each class: 4 warnings, no block.
    assert sum(f.severity == "warn" for f in blocks) == 4
    assert not report.passed

    ok = v.validate_dataset(_tiny(tmp_path, "ok"), tmp_path / "out-ok", min_per_class=3)
    assert ok.passed and {f.severity for f in ok.by_rule(gxs.CLASS_COUNT)} == {"warn"}


# --- leakage, duplicates, PHI ---------------------------------------------------------------------------


def test_patient_in_two_splits_blocks(tmp_path: Path) -> None:
    def patients(meta):
        meta = meta.copy()
        meta["patient_id"] = [f"p{i}" for i in range(len(meta))]
        meta.loc[meta.index[-1], "patient_id"] = "p0"  # p0: a train image and a test image
        return meta

    report = v.validate_dataset(_tiny(tmp_path, mutate=patients), tmp_path / "out", min_per_class=2)
    assert _rules(report, "block") == {"patients.cross_split"}
    assert _one(report, "patients.cross_split").count == 1
    assert "patients.unchecked" not in _rules(report)

    clean = _tiny(tmp_path, "clean", mutate=lambda m: m.assign(patient_id=[f"p{i}" for i in range(len(m))]))
    assert v.validate_dataset(clean, tmp_path / "out-clean", min_per_class=2).passed


def _copy_image(src: int, dst: int):
    def fn(images, meta):
        images = images.copy()
        images[dst] = images[src]
        return images

    return fn


def test_duplicates_within_split_warn_and_across_splits_block(tmp_path: Path) -> None:
    # Rows 0 and 1 are train/normal; the last row is test/pneumonia.
    within = v.validate_dataset(_tiny(tmp_path, "w", images_mutate=_copy_image(0, 1)), tmp_path / "o1",
                                min_per_class=2)
    assert within.passed
    assert _one(within, "duplicates.within_split").severity == "warn"
    assert within.duplicates["groups"] == 1 and within.duplicates["within_split"] == 1
    assert "duplicates.label_conflicts" not in _rules(within)

    across = v.validate_dataset(_tiny(tmp_path, "a", images_mutate=_copy_image(0, -1)), tmp_path / "o2",
                                min_per_class=2)
    assert not across.passed
    assert _rules(across, "block") == {"duplicates.across_splits"}
    assert across.duplicates["across_splits"] == 1
    # No header record: label conflicts are counted in the data (train/normal vs test/pneumonia).
    assert _one(across, "duplicates.label_conflicts").count == 1


def test_header_duplicate_record_is_reported(tmp_path: Path) -> None:
    record = {
        "policy": "collapse", "groups": 5, "within_split": 3, "across_splits": 2, "label_conflicts": 1,
        "images_in_groups": 11, "removed": 6, "removed_per_split": {"train": 4, "test": 2},
        "group_list": [{"sha256": "0" * 64, "image_ids": ["SECRET-ID-1", "SECRET-ID-2"]}],
    }
    ds = _tiny(tmp_path, duplicates=record)
    report = v.validate_dataset(ds, tmp_path / "out", min_per_class=2)
    assert report.passed
    info = _one(report, "duplicates.ingest")
    assert info.severity == "info" and info.count == 5
    assert "3 within a split" in info.message and "2 across splits" in info.message
    assert "removed 6" in info.message
    assert _one(report, "duplicates.label_conflicts").severity == "warn"
    assert report.duplicates["ingest"]["removed_per_split"] == {"train": 4, "test": 2}
    assert "SECRET-ID" not in (tmp_path / "out" / "report.json").read_text()  # the group list is not copied


def test_phi_column_blocks(tmp_path: Path) -> None:
    ds = _tiny(tmp_path, mutate=lambda m: m.assign(date_of_birth="1970-01-01"))
    report = v.validate_dataset(ds, tmp_path / "out", min_per_class=2)
    finding = _one(report, "phi.column")
    assert finding.severity == "block" and "'date_of_birth'" in finding.message
    assert not report.passed


# --- pixels and header ------------------------------------------------------------------------------------


def test_constant_images_warn(tmp_path: Path) -> None:
    def flat(images, meta):
        images = images.copy()
        images[[0, 5]] = 0
        images[9] = 255
        return images

    report = v.validate_dataset(_tiny(tmp_path, images_mutate=flat), tmp_path / "out", min_per_class=2)
    assert report.passed
    assert _one(report, "pixels.constant").count == 3 and report.pixels["constant"] == 3


def test_pixels_not_matching_sha256_block(tmp_path: Path) -> None:
    ds = _tiny(tmp_path)
    images = np.load(ds / "images.npy")
    images[3, 0, 0] ^= 1
    images[7, 4, 4] ^= 1
    np.save(ds / "images.npy", images)
    report = v.validate_dataset(ds, tmp_path / "out", min_per_class=2)
    assert _rules(report, "block") == {"pixels.sha256", "integrity.content_hash"}
    assert _one(report, "pixels.sha256").count == 2


def test_wrong_dtype_shape_and_nonfinite_block(tmp_path: Path) -> None:
    ds = _tiny(tmp_path)
    images = np.load(ds / "images.npy").astype(np.float32)
    images[2, 1, 1] = np.nan
    np.save(ds / "images.npy", images)
    report = v.validate_dataset(ds, tmp_path / "out", min_per_class=2)
    assert {"pixels.dtype", "pixels.spec", "pixels.finite"} <= _rules(report, "block")
    assert _one(report, "pixels.finite").count == 1
    assert "dtype uint8 vs float32" in _one(report, "pixels.spec").message

    ds2 = _tiny(tmp_path, "short")
    np.save(ds2 / "images.npy", np.load(ds2 / "images.npy")[:-1])
    short = v.validate_dataset(ds2, tmp_path / "out2", min_per_class=2)
    assert _one(short, "pixels.count").count == 1
    assert short.pixels["sha256_checked"] == 0  # rows no longer line up with images


def test_header_spec_and_counts_must_match(tmp_path: Path) -> None:
    ds = _tiny(tmp_path)

    def lie(header):
        header["image"]["height"] = 28
        header["counts"]["train"] = 99
        header["counts"]["per_class"]["val"]["normal"] = 7

    _edit_header(ds, lie)
    report = v.validate_dataset(ds, tmp_path / "out", min_per_class=2)
    assert _rules(report, "block") == {"pixels.spec", "header.counts"}
    counts = _one(report, "header.counts")
    assert counts.count == 2
    assert "train 99 vs 8" in counts.message and "per_class/val/normal 7 vs 2" in counts.message


# --- privacy: nothing planted leaks into the artifact ------------------------------------------------------

EMAILS = ["jane.doe@example.org", "john.roe@example.org", "ann.poe@example.net"]
PATIENTS = ["PAT-93817-QX", "PAT-55102-KZ", "PAT-70443-MB"]


def _planted(tmp_path: Path) -> Path:
    def plant(meta):
        meta = meta.copy()
        meta["contact"] = [EMAILS[i % 3] for i in range(len(meta))]  # PHI by value shape, not by name
        meta["patient_id"] = [PATIENTS[i % 3] for i in range(len(meta))]  # and patients leak across splits
        # The same values in columns GX checks, as failing values GX's default format would echo:
        meta.loc[0, "split"] = EMAILS[0]  # not an allowed split
        meta.loc[[1, 2], "image_id"] = PATIENTS[1]  # duplicated image_id
        return meta

    return _tiny(tmp_path, mutate=plant)


def _artifact_text(out: Path) -> dict[str, str]:
    texts = {}
    for dirpath, _, names in os.walk(out):
        for name in names:
            path = Path(dirpath) / name
            texts[str(path.relative_to(out))] = path.read_bytes().decode("utf-8", errors="replace")
    return texts


def test_planted_phi_is_reported_but_never_echoed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = v.validate_dataset(_planted(tmp_path), out, min_per_class=2)

    assert not report.passed
    phi = _one(report, "phi.column")
    assert "'contact'" in phi.message and "e-mail" in phi.message
    assert {"patients.cross_split", gxs.SPLIT_VALUES, gxs.IMAGE_ID_UNIQUE} <= _rules(report, "block")
    assert report.class_counts.keys() == {"<other>", "train", "val", "test"}

    texts = _artifact_text(out)
    assert "report.json" in texts and any(k.startswith("data_docs/validations/") for k in texts)
    for secret in [*EMAILS, *PATIENTS]:
        leaks = [name for name, text in texts.items() if secret in text]
        assert leaks == [], f"{secret!r} leaked into {leaks}"


def test_privacy_check_would_catch_gx_default_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: with a value-echoing result format the same walk finds the planted values."""
    monkeypatch.setattr(gxs, "RESULT_FORMAT", {"result_format": "COMPLETE"})
    out = tmp_path / "out"
    v.validate_dataset(_planted(tmp_path), out, min_per_class=2)
    docs = "\n".join(text for name, text in _artifact_text(out).items() if name.startswith("data_docs/"))
    assert EMAILS[0] in docs and PATIENTS[1] in docs


# --- the real PneumoniaMNIST ------------------------------------------------------------------------------


def test_pneumoniamnist_passes(pneumonia_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "validation"
    start = time.perf_counter()
    report = v.validate_dataset(pneumonia_dataset, out)
    elapsed = time.perf_counter() - start

    assert report.passed, report.blocking
    assert set(report.class_counts) == {"train", "val", "test"}
    for split, per_class in report.class_counts.items():
        assert set(per_class) == {"normal", "pneumonia"} and min(per_class.values()) >= 10, split
    assert report.duplicates["groups"] == 0  # the default policy collapsed them
    ingest = report.duplicates["ingest"]
    assert (ingest["groups"], ingest["within_split"], ingest["across_splits"]) == (27, 19, 8)
    info = _one(report, "duplicates.ingest")
    assert info.severity == "info" and info.count == 27
    assert report.pixels["sha256_checked"] == report.n_images == len(load_dataset(pneumonia_dataset).metadata)
    assert (out / "data_docs" / "index.html").is_file()
    assert elapsed < 60  # ~1 s on an idle machine once GX is imported; generous for shared cores
