"""Classification metrics with percentile-bootstrap confidence intervals, in numpy/scipy only.

AUROC is computed from ranks (the Mann–Whitney U statistic: the probability that a random positive scores above a
random negative, ties counting one half), binary or one-vs-rest macro for more classes. Every metric is returned as
`{"value": v, "ci": [lo, hi]}`; undefined values (a class absent from a resample, say) are `None`, never NaN, so
the JSON stays standard.

The bootstrap resamples whole cases with replacement (seeded), computes all metrics for a block of resamples at once
(index matrices, row-wise ranks, per-class counts) and takes percentiles over the resamples where a metric is
defined.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

# Elements of one block of bootstrap index matrices; bounds memory (a few tens of MB) for large sets.
_BLOCK_ELEMENTS = 2_000_000
_MIN_VALID = 20  # fewer defined resamples than this: no interval


def _auroc_rows(pos: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Row-wise AUROC of (b, n) boolean positives against (b, n) scores; NaN where a row lacks a class."""
    ranks = rankdata(scores, axis=1)  # average ranks: a tie between a positive and a negative counts 1/2
    n1 = pos.sum(axis=1).astype(np.float64)
    n0 = pos.shape[1] - n1
    r1 = np.where(pos, ranks, 0.0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (r1 - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    return np.where((n1 > 0) & (n0 > 0), auc, np.nan)


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Binary AUROC of `scores` for `y_true` (bool or 0/1); NaN when only one class is present."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    return float(_auroc_rows(y[None], s[None])[0])


def auroc_macro(y_true: np.ndarray, proba: np.ndarray, *, num_classes: int | None = None) -> float:
    """Binary AUROC of class 1 for two classes; one-vs-rest macro average (over defined classes) for more."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)
    k = num_classes or p.shape[1]
    if k == 2:
        return auroc(y == 1, p[:, 1])
    per = [auroc(y == c, p[:, c]) for c in range(k)]
    defined = [a for a in per if not np.isnan(a)]
    return float(np.mean(defined)) if defined else float("nan")


def roc_curve(y_true: np.ndarray, scores: np.ndarray, *, max_points: int | None = 500) -> dict[str, list]:
    """ROC points (fpr, tpr, threshold) at each distinct score, highest first, starting at (0, 0).

    The first threshold is `None` (above every score). With `max_points`, points are thinned evenly, always
    keeping both ends. Empty lists when a class is absent.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return {"fpr": [], "tpr": [], "thresholds": []}
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(y)[last_of_value]
    fp = np.cumsum(~y)[last_of_value]
    tpr = np.r_[0.0, tp / n1]
    fpr = np.r_[0.0, fp / n0]
    thresholds: list[float | None] = [None, *s[last_of_value].tolist()]
    if max_points is not None and len(tpr) > max_points:
        keep = np.unique(np.linspace(0, len(tpr) - 1, max_points).round().astype(int))
        tpr, fpr = tpr[keep], fpr[keep]
        thresholds = [thresholds[i] for i in keep]
    return {
        "fpr": [round(float(v), 6) for v in fpr],
        "tpr": [round(float(v), 6) for v in tpr],
        "thresholds": [None if t is None else round(float(t), 6) for t in thresholds],
    }


def _metric_rows(y: np.ndarray, proba: np.ndarray, pred: np.ndarray, idx: np.ndarray, k: int) -> dict[str, Any]:
    """All metrics for each row of the (b, n) index matrix `idx`."""
    yr = y[idx]
    pr = pred[idx]
    out: dict[str, Any] = {"accuracy": (yr == pr).mean(axis=1)}
    tp = np.empty((len(idx), k))
    fp = np.empty((len(idx), k))
    fn = np.empty((len(idx), k))
    tn = np.empty((len(idx), k))
    auc = np.empty((len(idx), k))
    for c in range(k):
        is_c, pred_c = yr == c, pr == c
        tp[:, c] = (is_c & pred_c).sum(axis=1)
        fp[:, c] = (~is_c & pred_c).sum(axis=1)
        fn[:, c] = (is_c & ~pred_c).sum(axis=1)
        tn[:, c] = (~is_c & ~pred_c).sum(axis=1)
        if k == 2 and c == 0:
            continue  # filled from class 1 below: with p0 = 1 - p1 the binary AUROC is the same for both classes
        auc[:, c] = _auroc_rows(is_c, proba[:, c][idx])
    if k == 2:
        auc[:, 0] = auc[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        specificity = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
    out["f1_per_class"] = f1
    out["accuracy_per_class"] = recall
    out["precision_per_class"] = precision
    out["specificity_per_class"] = specificity
    out["auroc_per_class"] = auc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows give NaN, which is what we want
        out["f1_macro"] = np.nanmean(f1, axis=1)
        out["balanced_accuracy"] = np.nanmean(recall, axis=1)
        # The class a classifier serves worst: a dead class shows here as 0 whatever the AUROC says.
        out["worst_class_sensitivity"] = np.nanmin(recall, axis=1)
        out["auroc"] = auc[:, 1] if k == 2 else np.nanmean(auc, axis=1)
    return out


def _value(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 6)


def _interval(samples: np.ndarray, level: float) -> list[float | None] | None:
    ok = samples[np.isfinite(samples)]
    if len(ok) < _MIN_VALID:
        return None
    lo, hi = np.percentile(ok, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return [_value(lo), _value(hi)]


def classification_metrics(
    y_true: np.ndarray,
    proba: np.ndarray,
    *,
    class_names: Sequence[str],
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """AUROC, accuracy, balanced accuracy, macro F1, the worst class's sensitivity and per-class
    AUROC/F1/sensitivity/specificity/precision, with bootstrap CIs.

    `proba` is (N, C); predictions are its argmax. Per class, "sensitivity" (also stored as "accuracy", its older
    name) is the fraction of that class's images predicted as that class (recall); "specificity" the fraction of
    the other classes' images not predicted as it; "precision" the fraction of predictions of that class that are
    right. `worst_class` names the class with the lowest sensitivity. Each metric is `{"value": v, "ci": [lo, hi]}`
    (`ci` None when fewer than 20 resamples define it).
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)
    k = len(class_names)
    if p.ndim != 2 or p.shape != (len(y), k):
        raise ValueError(f"proba must be ({len(y)}, {k}), got {p.shape}")
    n = len(y)
    pred = p.argmax(axis=1)
    point = _metric_rows(y, p, pred, np.arange(n)[None], k) if n else None
    samples: dict[str, list[np.ndarray]] = {}
    if n and n_boot > 0:
        rng = np.random.default_rng(seed)
        block = max(1, _BLOCK_ELEMENTS // n)
        for start in range(0, n_boot, block):
            idx = rng.integers(0, n, size=(min(block, n_boot - start), n))
            for name, arr in _metric_rows(y, p, pred, idx, k).items():
                samples.setdefault(name, []).append(arr)
    boot = {name: np.concatenate(parts) for name, parts in samples.items()}

    def metric(name: str, col: int | None = None) -> dict[str, Any]:
        if point is None:
            return {"value": None, "ci": None}
        v = point[name][0] if col is None else point[name][0, col]
        if name not in boot:
            return {"value": _value(v), "ci": None}
        s = boot[name] if col is None else boot[name][:, col]
        return {"value": _value(v), "ci": _interval(s, level)}

    counts = np.bincount(y, minlength=k) if n else np.zeros(k, dtype=int)
    worst = None
    if point is not None:
        recall = point["accuracy_per_class"][0]
        if np.isfinite(recall).any():
            worst = class_names[int(np.nanargmin(recall))]
    return {
        "n": n,
        "class_counts": {name: int(counts[c]) for c, name in enumerate(class_names)},
        "auroc": metric("auroc"),
        "accuracy": metric("accuracy"),
        "balanced_accuracy": metric("balanced_accuracy"),
        "f1_macro": metric("f1_macro"),
        "worst_class_sensitivity": metric("worst_class_sensitivity"),
        "worst_class": worst,
        "per_class": {
            name: {
                "n": int(counts[c]),
                "auroc": metric("auroc_per_class", c),
                "f1": metric("f1_per_class", c),
                "sensitivity": metric("accuracy_per_class", c),
                "specificity": metric("specificity_per_class", c),
                "accuracy": metric("accuracy_per_class", c),
                "precision": metric("precision_per_class", c),
            }
            for c, name in enumerate(class_names)
        },
        "bootstrap": {"method": "percentile", "resamples": int(n_boot), "level": level, "seed": seed},
    }


def subgroup_metrics(
    y_true: np.ndarray,
    proba: np.ndarray,
    groups: Mapping[str, np.ndarray],
    *,
    class_names: Sequence[str],
    min_size: int = 20,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """`classification_metrics` for each value of each attribute column (missing values are their own group).

    Subgroups smaller than `min_size` are listed with their size and `"skipped"` instead of metrics: intervals on a
    handful of images would be noise.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(proba, dtype=np.float64)
    out: dict[str, dict[str, Any]] = {}
    for attr, values in groups.items():
        vals = np.asarray(["<missing>" if v is None or v != v else str(v) for v in values], dtype=object)
        per: dict[str, Any] = {}
        for g_index, value in enumerate(sorted(set(vals.tolist()))):
            mask = vals == value
            if mask.sum() < min_size:
                per[value] = {"n": int(mask.sum()), "skipped": f"fewer than {min_size} images"}
                continue
            per[value] = classification_metrics(
                y[mask], p[mask], class_names=class_names, n_boot=n_boot, level=level, seed=seed + 1 + g_index
            )
        out[attr] = per
    return out


PAIRED_METRICS = ("auroc", "balanced_accuracy", "worst_class_sensitivity", "f1_macro", "accuracy")


def paired_comparison(
    y_true: np.ndarray,
    proba_reference: np.ndarray,
    proba_other: np.ndarray,
    *,
    metrics: Sequence[str] = PAIRED_METRICS,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Each of `metrics` for `proba_other` relative to `proba_reference` on the same cases: ratio and difference
    (other − reference), with paired bootstrap CIs (both models scored on the same resamples, so the shared
    test-set noise cancels). Returns `{metric: {"ratio": est, "difference": est}, "bootstrap": {...}}`; a ratio
    whose reference is 0 is None."""
    y = np.asarray(y_true, dtype=np.int64)
    pa, pb = np.asarray(proba_reference, np.float64), np.asarray(proba_other, np.float64)
    k, n = pa.shape[1], len(y)
    unknown = [m for m in metrics if m not in PAIRED_METRICS]
    if unknown:
        raise ValueError(f"paired metric {unknown[0]!r} is not one of {', '.join(PAIRED_METRICS)}")
    pred_a, pred_b = pa.argmax(axis=1), pb.argmax(axis=1)

    def rows(idx: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return _metric_rows(y, pa, pred_a, idx, k), _metric_rows(y, pb, pred_b, idx, k)

    a0, b0 = rows(np.arange(n)[None])
    rng = np.random.default_rng(seed)
    ratios: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    diffs: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    block = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, n_boot, block):
        a, b = rows(rng.integers(0, n, size=(min(block, n_boot - start), n)))
        for m in metrics:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios[m].append(np.where(a[m] > 0, b[m] / a[m], np.nan))
            diffs[m].append(b[m] - a[m])
    out: dict[str, Any] = {}
    for m in metrics:
        ref, other = float(a0[m][0]), float(b0[m][0])
        ratio_s = np.concatenate(ratios[m]) if ratios[m] else np.array([])
        diff_s = np.concatenate(diffs[m]) if diffs[m] else np.array([])
        out[m] = {
            "ratio": {"value": _value(other / ref) if ref > 0 else None, "ci": _interval(ratio_s, level)},
            "difference": {"value": _value(other - ref), "ci": _interval(diff_s, level)},
        }
    out["bootstrap"] = {"method": "paired percentile", "resamples": int(n_boot), "level": level, "seed": seed}
    return out


def paired_auroc_comparison(
    y_true: np.ndarray,
    proba_reference: np.ndarray,
    proba_other: np.ndarray,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """`paired_comparison` of AUROC alone, as `{"metric": "auroc", "ratio", "difference", "bootstrap"}`."""
    cmp = paired_comparison(y_true, proba_reference, proba_other, metrics=("auroc",), n_boot=n_boot, level=level,
                            seed=seed)
    return {"metric": "auroc", **cmp["auroc"], "bootstrap": cmp["bootstrap"]}


def majority_baseline(y_true: np.ndarray, majority: int, *, class_names: Sequence[str]) -> dict[str, Any]:
    """What a classifier that always predicts class `majority` (its training set's most frequent class) scores on
    `y_true`: the floor any trained classifier must clear. AUROC is 0.5 (a constant score ranks nothing)."""
    y = np.asarray(y_true, dtype=np.int64)
    k = len(class_names)
    n = len(y)
    prevalence = float((y == majority).mean()) if n else 0.0
    present = [c for c in range(k) if (y == c).any()]
    f1_major = 2 * prevalence / (prevalence + 1) if prevalence > 0 else 0.0
    return {
        "class": class_names[majority],
        "accuracy": _value(prevalence),
        "balanced_accuracy": _value(1.0 / len(present)) if majority in present else 0.0,
        "worst_class_sensitivity": 0.0 if len(present) > 1 else 1.0,
        "f1_macro": _value(f1_major / len(present)) if present else None,
        "auroc": 0.5,
    }
