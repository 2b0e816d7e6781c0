"""AUROC against brute force, F1/accuracy against hand counts, bootstrap CIs, ROC points, subgroups."""

from __future__ import annotations

import numpy as np
import pytest

from reports.metrics import (
    auroc,
    auroc_macro,
    classification_metrics,
    majority_baseline,
    paired_auroc_comparison,
    paired_comparison,
    roc_curve,
    subgroup_metrics,
)


def brute_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties 1/2, over all pairs."""
    pos, neg = s[y.astype(bool)], s[~y.astype(bool)]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(y * 0.7, 1.0), 1)  # rounding makes many ties, also across classes
    assert auroc(y, s) == pytest.approx(brute_auroc(y, s), abs=1e-12)


def test_auroc_edges() -> None:
    y = np.array([0, 0, 1, 1])
    assert auroc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auroc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auroc(y, np.full(4, 0.5)) == 0.5
    assert np.isnan(auroc(np.ones(4), np.arange(4.0)))


def test_auroc_macro_multiclass_is_mean_of_one_vs_rest() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    p = rng.dirichlet(np.ones(3), 200) + np.eye(3)[y] * 0.3
    expected = np.mean([brute_auroc(y == c, p[:, c]) for c in range(3)])
    assert auroc_macro(y, p) == pytest.approx(expected, abs=1e-12)


def test_point_metrics_match_hand_counts() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 1, 1, 0, 0])
    proba = np.eye(2)[pred] * 0.8 + 0.1
    m = classification_metrics(y, proba, class_names=["normal", "pneumonia"], n_boot=0)
    # class 1: tp 3, fp 1, fn 2 → F1 6/9; class 0: tp 2, fp 2, fn 1 → F1 4/7
    assert m["per_class"]["pneumonia"]["f1"]["value"] == pytest.approx(6 / 9, abs=1e-6)
    assert m["per_class"]["normal"]["f1"]["value"] == pytest.approx(4 / 7, abs=1e-6)
    assert m["f1_macro"]["value"] == pytest.approx((6 / 9 + 4 / 7) / 2, abs=1e-6)
    assert m["accuracy"]["value"] == pytest.approx(5 / 8)
    assert m["per_class"]["normal"]["accuracy"]["value"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["per_class"]["pneumonia"]["accuracy"]["value"] == pytest.approx(3 / 5)
    assert m["per_class"]["pneumonia"]["precision"]["value"] == pytest.approx(3 / 4)
    assert m["balanced_accuracy"]["value"] == pytest.approx((2 / 3 + 3 / 5) / 2, abs=1e-6)
    assert m["auroc"]["value"] == pytest.approx(brute_auroc(y, proba[:, 1]), abs=1e-6)
    assert m["auroc"]["ci"] is None and m["class_counts"] == {"normal": 3, "pneumonia": 5}


def _noisy_scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logit = rng.normal(1.5 * (2 * y - 1), 1.5)
    p1 = 1 / (1 + np.exp(-logit))
    return y, np.stack([1 - p1, p1], axis=1)


def test_bootstrap_cis_contain_point_and_shrink_with_n() -> None:
    widths = []
    for n in (100, 400, 1600):
        y, p = _noisy_scores(n, seed=n)
        m = classification_metrics(y, p, class_names=["a", "b"], n_boot=500, seed=0)
        for metric in (m["auroc"], m["accuracy"], m["f1_macro"], m["per_class"]["a"]["f1"]):
            lo, hi = metric["ci"]
            assert lo <= metric["value"] <= hi
        widths.append(m["auroc"]["ci"][1] - m["auroc"]["ci"][0])
    assert widths[0] > widths[1] > widths[2]
    # Width scales like 1/sqrt(n): 4× the data, about half the width.
    assert 0.35 < widths[2] / widths[1] < 0.7


def test_bootstrap_is_seeded() -> None:
    y, p = _noisy_scores(200, seed=3)
    a = classification_metrics(y, p, class_names=["a", "b"], n_boot=300, seed=7)
    b = classification_metrics(y, p, class_names=["a", "b"], n_boot=300, seed=7)
    c = classification_metrics(y, p, class_names=["a", "b"], n_boot=300, seed=8)
    assert a == b and a["auroc"]["ci"] != c["auroc"]["ci"]


def test_bootstrap_auroc_matches_a_loop_over_resamples() -> None:
    """The vectorised resampling gives the same AUROC distribution as recomputing each resample one by one."""
    y, p = _noisy_scores(60, seed=11)
    rng = np.random.default_rng(5)
    idx = rng.integers(0, 60, size=(200, 60))
    loop = np.array([brute_auroc(y[i], p[i, 1]) if 0 < y[i].sum() < 60 else np.nan for i in idx])
    m = classification_metrics(y, p, class_names=["a", "b"], n_boot=200, seed=5)
    lo, hi = np.percentile(loop[np.isfinite(loop)], [2.5, 97.5])
    assert m["auroc"]["ci"] == pytest.approx([lo, hi], abs=1e-6)


def test_multiclass_metrics_and_absent_class() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    p = rng.dirichlet(np.ones(3), 300) + np.eye(3)[y]
    p /= p.sum(1, keepdims=True)
    m = classification_metrics(y, p, class_names=["a", "b", "c"], n_boot=200)
    assert m["auroc"]["value"] == pytest.approx(auroc_macro(y, p), abs=1e-6)
    assert set(m["per_class"]) == {"a", "b", "c"}
    # A class absent from the labels: its AUROC is undefined (None), the others are still reported.
    m2 = classification_metrics(np.where(y == 2, 0, y), p, class_names=["a", "b", "c"], n_boot=50)
    assert m2["per_class"]["c"]["auroc"]["value"] is None
    assert m2["per_class"]["a"]["auroc"]["value"] is not None


def test_roc_curve_points() -> None:
    y = np.array([0, 0, 1, 1, 1])
    s = np.array([0.1, 0.6, 0.6, 0.8, 0.9])
    r = roc_curve(y, s)
    assert r["fpr"] == [0.0, 0.0, 0.0, 0.5, 1.0]
    assert r["tpr"] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0], abs=1e-6)
    assert r["thresholds"] == [None, 0.9, 0.8, 0.6, 0.1]
    # Trapezoidal area under the points equals the rank AUROC (ties give the diagonal segment).
    assert np.trapezoid(r["tpr"], r["fpr"]) == pytest.approx(auroc(y, s), abs=1e-6)
    yb, pb = _noisy_scores(5000, seed=1)
    thin = roc_curve(yb, pb[:, 1], max_points=100)
    assert len(thin["fpr"]) <= 100 and thin["fpr"][0] == 0.0 and thin["fpr"][-1] == 1.0
    assert np.all(np.diff(thin["fpr"]) >= 0) and np.all(np.diff(thin["tpr"]) >= 0)
    assert roc_curve(np.ones(3), np.arange(3.0)) == {"fpr": [], "tpr": [], "thresholds": []}


def test_subgroups_score_each_value_and_skip_small_groups() -> None:
    y, p = _noisy_scores(300, seed=4)
    sex = np.array(["F"] * 150 + ["M"] * 140 + [None] * 10, dtype=object)
    out = subgroup_metrics(y, p, {"sex": sex}, class_names=["a", "b"], min_size=20, n_boot=100)
    assert set(out["sex"]) == {"F", "M", "<missing>"}
    assert out["sex"]["F"]["n"] == 150
    assert out["sex"]["F"]["auroc"]["value"] == pytest.approx(auroc(y[:150], p[:150, 1]), abs=1e-6)
    assert out["sex"]["<missing>"] == {"n": 10, "skipped": "fewer than 20 images"}


def test_paired_comparison_of_identical_and_worse_models() -> None:
    y, p = _noisy_scores(400, seed=9)
    same = paired_auroc_comparison(y, p, p, n_boot=200)
    assert same["ratio"]["value"] == 1.0 and same["ratio"]["ci"] == [1.0, 1.0]
    rng = np.random.default_rng(0)
    noisy1 = np.clip(p[:, 1] + rng.normal(0, 0.4, len(y)), 0, 1)
    worse = paired_auroc_comparison(y, p, np.stack([1 - noisy1, noisy1], 1), n_boot=300)
    assert worse["ratio"]["value"] < 1.0 and worse["ratio"]["ci"][1] < 1.0
    assert worse["difference"]["ci"][0] <= worse["difference"]["value"] <= worse["difference"]["ci"][1]


def test_specificity_worst_class_and_their_intervals_match_hand_counts() -> None:
    # 3 classes; class 2 is never predicted: its sensitivity (and so the worst class's) is 0.
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 1, 0, 0, 1, 1, 0])
    p = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = classification_metrics(y, p, class_names=["a", "b", "c"], n_boot=200, seed=1)
    sens = {"a": 2 / 3, "b": 2 / 3, "c": 0.0}
    spec = {c: ((y != i) & (pred != i)).sum() / (y != i).sum() for i, c in enumerate("abc")}
    for c in "abc":
        assert m["per_class"][c]["sensitivity"]["value"] == pytest.approx(sens[c], abs=1e-6)
        assert m["per_class"][c]["specificity"]["value"] == pytest.approx(spec[c], abs=1e-6)
    assert m["worst_class"] == "c" and m["worst_class_sensitivity"]["value"] == 0.0
    assert m["balanced_accuracy"]["value"] == pytest.approx(np.mean(list(sens.values())), abs=1e-6)
    lo, hi = m["worst_class_sensitivity"]["ci"]
    assert lo == 0.0 and hi == 0.0  # class c is never predicted in any resample


def test_paired_balanced_accuracy_and_worst_class_ratios_match_a_loop_over_resamples() -> None:
    y, p_ref = _noisy_scores(300, seed=3)
    rng = np.random.default_rng(5)
    # The other model prefers class 1: its class-0 sensitivity drops, AUROC stays the same (a monotone shift).
    p1 = np.clip(p_ref[:, 1] + 0.3, 0, 1)
    p_other = np.stack([1 - p1, p1], 1)
    cmp = paired_comparison(y, p_ref, p_other, n_boot=150, seed=7)

    def ba(y_, p_):
        pred = p_.argmax(1)
        return np.mean([(pred[y_ == c] == c).mean() for c in (0, 1)])

    def worst(y_, p_):
        pred = p_.argmax(1)
        return min((pred[y_ == c] == c).mean() for c in (0, 1))

    assert cmp["balanced_accuracy"]["ratio"]["value"] == pytest.approx(ba(y, p_other) / ba(y, p_ref), abs=1e-6)
    assert cmp["worst_class_sensitivity"]["ratio"]["value"] == pytest.approx(worst(y, p_other) / worst(y, p_ref),
                                                                             abs=1e-6)
    assert cmp["worst_class_sensitivity"]["ratio"]["value"] < 0.9
    assert cmp["auroc"]["ratio"]["value"] == pytest.approx(1.0, abs=0.02)
    # The interval is the percentile of the same resamples scored for both models.
    rs = np.random.default_rng(7).integers(0, len(y), size=(150, len(y)))
    ratios = [ba(y[i], p_other[i]) / ba(y[i], p_ref[i]) for i in rs]
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    assert cmp["balanced_accuracy"]["ratio"]["ci"] == pytest.approx([lo, hi], abs=1e-6)
    del rng


def test_majority_baseline() -> None:
    y = np.array([0] * 30 + [1] * 70)
    b = majority_baseline(y, 1, class_names=["normal", "pneumonia"])
    assert b["class"] == "pneumonia" and b["accuracy"] == 0.7 and b["balanced_accuracy"] == 0.5
    assert b["worst_class_sensitivity"] == 0.0
    assert b["f1_macro"] == pytest.approx((2 * 0.7 / 1.7) / 2, abs=1e-6)
