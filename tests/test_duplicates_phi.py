from __future__ import annotations

import pandas as pd
import pytest

from synth.data.duplicates import apply_policy, find_duplicate_groups
from synth.data.phi import find_phi_columns
from synth.errors import ConfigError


def _meta(rows):
    return pd.DataFrame(rows, columns=["image_id", "split", "label", "sha256"])


def test_collapse_keeps_earliest_split_and_records_groups():
    meta = _meta([
        ("t1", "test", 1, "a"), ("v1", "val", 1, "a"), ("tr1", "train", 1, "a"),  # across splits
        ("tr2", "train", 0, "b"), ("tr3", "train", 0, "b"),  # within train
        ("te2", "test", 0, "c"), ("te3", "test", 1, "c"),  # within test, labels disagree
        ("u", "train", 0, "d"),
    ])
    keep, f = apply_policy(meta)
    assert meta[keep]["image_id"].tolist() == ["tr1", "tr2", "te2", "u"]
    assert (f["groups"], f["within_split"], f["across_splits"], f["label_conflicts"]) == (3, 2, 1, 1)
    assert f["removed"] == 4 and f["removed_per_split"] == {"test": 2, "train": 1, "val": 1}
    groups = {g["sha256"]: g for g in find_duplicate_groups(meta)}
    assert groups["a"]["kept"] == "tr1" and groups["a"]["splits"] == ["train", "val", "test"]


def test_keep_policy_records_but_removes_nothing():
    meta = _meta([("a", "train", 0, "x"), ("b", "val", 0, "x")])
    keep, f = apply_policy(meta, "keep")
    assert keep.all() and f["across_splits"] == 1 and f["removed"] == 0


def test_unknown_policy():
    with pytest.raises(ConfigError, match="'drop'"):
        apply_policy(_meta([]), "drop")


@pytest.mark.parametrize("column", ["patient_name", "Name", "DOB", "date_of_birth", "MRN", "home_address",
                                    "phone", "E-mail", "zip_code", "ssn"])
def test_phi_by_column_name(column):
    frame = pd.DataFrame({column: ["x", "y"], "sex": ["F", "M"]})
    assert [f.column for f in find_phi_columns(frame)] == [column]


@pytest.mark.parametrize(("values", "kind"), [
    (["ann@example.org", "bob@example.com"], "e-mail"),
    (["1990-02-03", "2001-12-31"], "date"),
    (["+1 555 123 4567", "555-123-4567"], "phone"),
])
def test_phi_by_values(values, kind):
    frame = pd.DataFrame({"note": values, "sex": ["F", "M"], "age_group": ["20-29", "30-39"]})
    findings = find_phi_columns(frame)
    assert [(f.column, f.kind, f.by) for f in findings] == [("note", kind, "values")]
    assert values[0] not in findings[0].message()


def test_coarse_attributes_are_not_phi():
    frame = pd.DataFrame({"sex": ["F", "M"], "age_group": ["0-9", "10-19"], "site": ["A", "B"],
                          "patient_id": ["p1", "p2"], "view": ["PA", "AP"]})
    assert find_phi_columns(frame) == []
