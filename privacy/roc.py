"""ROC / AUC of a membership attack's scores (higher = more likely a member): AUC, TPR at a fixed FPR, the ROC
curve, its downsampling for a plot, and bootstrap CIs.

Small helpers of our own rather than `reports`' metrics: `privacy` must not import `reports` (dependencies point
flows → reports → privacy → synth).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from synth.errors import ConfigError

FPR_TARGETS: dict[str, float] = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0_1pct_fpr": 0.001}


def _scores(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise ConfigError(f"{what} scores are empty")
    if not np.isfinite(a).all():
        raise ConfigError(f"{what} scores contain {int((~np.isfinite(a)).sum())} non-finite value(s)")
    return a


def roc_auc(members: Any, nonmembers: Any) -> float:
    """P(member score > non-member score) + ½·P(equal): the Mann–Whitney U statistic from midranks."""
    from scipy.stats import rankdata

    pos, neg = _scores(members, "member"), _scores(nonmembers, "non-member")
    ranks = rankdata(np.concatenate([pos, neg]), method="average")
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def tpr_at_fpr(members: Any, nonmembers: Any, fpr: float) -> float:
    """The largest TPR over thresholds ("member" when score >= threshold) whose FPR is at most `fpr`.

    With n non-members at most k = ⌊fpr·n⌋ false positives are allowed; the best such threshold lies just above the
    (k+1)-th largest non-member score s, so TPR = fraction of members scoring strictly above s.
    """
    pos, neg = _scores(members, "member"), _scores(nonmembers, "non-member")
    if not 0 <= fpr <= 1:
        raise ConfigError(f"fpr {fpr!r} outside [0, 1]")
    k = math.floor(fpr * neg.size + 1e-9)
    if k >= neg.size:
        return 1.0
    cut = np.sort(neg)[::-1][k]
    return float((pos > cut).mean())


def roc_curve(members: Any, nonmembers: Any) -> tuple[np.ndarray, np.ndarray]:
    """Every vertex of the empirical ROC curve, (0, 0) first and (1, 1) last: (fpr, tpr), both non-decreasing."""
    pos, neg = _scores(members, "member"), _scores(nonmembers, "non-member")
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], is_pos[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # one vertex per distinct threshold
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(1 - y)[last_of_tie]
    return np.r_[0.0, fp / neg.size], np.r_[0.0, tp / pos.size]


def downsample_roc(fpr: np.ndarray, tpr: np.ndarray, max_points: int, *, min_fpr: float) -> dict[str, list[float]]:
    """At most `max_points` ROC vertices for a plot, dense at low FPR (log grid from `min_fpr`) and across [0, 1].

    For each grid value g the kept vertex is the last one with FPR <= g (the best TPR there), so the points are
    true vertices and the step curve through them never overstates the attack.
    """
    fpr, tpr = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    if fpr.size <= max_points:
        keep = np.arange(fpr.size)
    else:
        half = max(2, (max_points - 2) // 2)
        grid = np.unique(np.r_[np.geomspace(max(min_fpr, 1e-6), 1.0, half), np.linspace(0.0, 1.0, half)])
        idx = np.searchsorted(fpr, grid, side="right") - 1
        keep = np.unique(np.r_[0, idx[idx >= 0], fpr.size - 1])[:max_points]
        if keep[-1] != fpr.size - 1:
            keep[-1] = fpr.size - 1
    return {"fpr": [round(float(v), 6) for v in fpr[keep]], "tpr": [round(float(v), 6) for v in tpr[keep]]}


def bootstrap_metrics(
    members: np.ndarray, nonmembers: np.ndarray, *, resamples: int, level: float, seed: int | np.random.SeedSequence
) -> dict[str, list[float]]:
    """Percentile CIs of AUC and TPR@FPR from resampling members and non-members separately (with replacement)."""
    pos, neg = _scores(members, "member"), _scores(nonmembers, "non-member")
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {"auc": [], **{k: [] for k in FPR_TARGETS}}
    for _ in range(resamples):
        p, q = pos[rng.integers(0, pos.size, pos.size)], neg[rng.integers(0, neg.size, neg.size)]
        draws["auc"].append(roc_auc(p, q))
        for key, alpha in FPR_TARGETS.items():
            draws[key].append(tpr_at_fpr(p, q, alpha))
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    return {k: [float(np.percentile(v, lo)), float(np.percentile(v, hi))] for k, v in draws.items()}
