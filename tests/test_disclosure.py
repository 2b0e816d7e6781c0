"""Disclosure: k-anonymity counts per combination of released attributes, and suppression."""

from __future__ import annotations

import pandas as pd
import pytest

from privacy.disclosure import SUPPRESSED, check_disclosure, released_columns, suppress
from synth.errors import ConfigError


def _meta() -> pd.DataFrame:
    # label × sex × age_group; two rare combinations: (1, F, 80+) ×2 and (0, M, 0-4) ×1
    rows = (
        [(0, "F", "5-9")] * 6 + [(0, "M", "5-9")] * 7 + [(1, "F", "5-9")] * 5 + [(1, "M", "5-9")] * 9
        + [(1, "F", "80+")] * 2 + [(0, "M", "0-4")] * 1
    )
    df = pd.DataFrame(rows, columns=["label", "sex", "age_group"])
    df.insert(0, "image_id", [f"s{i}" for i in range(len(df))])
    df.insert(1, "split", "synthetic")
    df["seed"] = range(len(df))  # generation metadata, not a patient attribute
    df["sha256"] = "0" * 64
    return df


def test_released_columns_are_the_label_and_patient_attributes():
    meta = _meta()
    assert released_columns(meta, ["sex", "age_group"]) == ["label", "sex", "age_group"]
    assert released_columns(meta, []) == ["label"]
    assert released_columns(meta) == ["label", "sex", "age_group", "seed"]


def test_combinations_below_k_are_counted_and_reported():
    res = check_disclosure(_meta(), k=5, real_attributes=["sex", "age_group"])
    assert res.columns == ["label", "sex", "age_group"]
    counts = {tuple(c["values"].values()): c["count"] for c in res.combinations}
    assert counts == {(0, "F", "5-9"): 6, (0, "M", "5-9"): 7, (1, "F", "5-9"): 5, (1, "M", "5-9"): 9,
                      (1, "F", "80+"): 2, (0, "M", "0-4"): 1}
    assert res.violations == 2 and res.records_in_violations == 3
    assert not res.passed
    js = res.to_json()
    assert js["combinations"][0].keys() == {"values", "count", "below_k"}
    assert "image_id" not in str(js)  # counts only


def test_suppression_generalises_then_removes_what_is_still_rare():
    meta = _meta()
    res = check_disclosure(meta, k=5, real_attributes=["sex", "age_group"])
    out, keep, counts = suppress(meta, k=5, real_attributes=["sex", "age_group"])
    # the 3 rare records have their attributes generalised to "*": (1,*,*) ×2 and (0,*,*) ×1 are still below 5
    assert counts == {"rows_generalised": 3, "rows_removed": 3}
    assert (out.loc[~keep, ["sex", "age_group"]] == SUPPRESSED).all().all()
    kept = out[keep]
    assert kept.groupby(["label", "sex", "age_group"]).size().min() >= 5
    assert res.rows_generalised == 3 and res.rows_removed == 3
    assert all(c["count"] >= 5 for c in res.combinations_after)
    # generalising can rescue records: with three more rare (1, M, 80+) records the (1, *, *) group reaches 5
    more = pd.concat([meta, meta.iloc[[0, 0, 0]].assign(label=1, sex="M", age_group="80+")], ignore_index=True)
    _, keep2, counts2 = suppress(more, k=5, real_attributes=["sex", "age_group"])
    assert counts2 == {"rows_generalised": 6, "rows_removed": 1}
    assert keep2.sum() == len(more) - 1


def test_label_only_sets_and_patient_ids():
    meta = _meta()[["image_id", "split", "label", "sha256"]]
    assert check_disclosure(meta, k=5).passed
    assert not check_disclosure(meta, k=20).passed  # label 0 has 14 records, label 1 has 16
    leaked = meta.assign(patient_id="p1")
    res = check_disclosure(leaked, k=5)
    assert res.released_patient_id and not res.passed
    with pytest.raises(ConfigError, match="k"):
        check_disclosure(meta, k=0)
    with pytest.raises(ConfigError, match="not in the synthetic metadata"):
        check_disclosure(meta, k=5, columns=["label", "sex"])
