"""Calibrated thresholds of the memorization check (split-conformal quantiles on a null distribution).

The null distribution is that of real images the model never saw: each real *holdout* image's distance to its
nearest training image. A synthetic image closer to a training image than all but a `quantile` of holdout images
is flagged. With several spaces the rule "flag in ANY space" is calibrated jointly (default): the per-space
thresholds are taken at the same rank of their null distributions, the largest rank at which at most m (below)
null images are flagged in any space, so `quantile` bounds the false-flag rate of the whole rule, not of each
space.

Quantile semantics (split-conformal, so that q is the false-flag rate on *unseen* real images, not just on the
calibration images): with n null distances, at most m = floor(q·(n+1)) − 1 of them may be flagged; the threshold
is the (r+1)-th smallest null distance (r <= m) and flagging is strict (`d < threshold`), so at most r null images
fall below it, ties included, and an unseen exchangeable image falls below it with probability (r+1)/(n+1) <= q.
With q·(n+1) < 2 the threshold is the smallest null distance and the rate is 1/(n+1) (recorded as
`quantile_below_resolution` when even that exceeds q).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from synth.errors import InputError


def allowed_flags(n: int, quantile: float) -> int:
    """How many of n null images may be flagged so that an unseen image is flagged with probability <= q:
    floor(q·(n+1)) − 1 (the split-conformal bound: a new exchangeable value falls below the (m+1)-th smallest of n
    with probability (m+1)/(n+1)); 0 when the null is too small to resolve q."""
    return max(0, math.floor(quantile * (n + 1) + 1e-9) - 1)


def threshold_at(null: np.ndarray, quantile: float) -> float:
    """The single-space calibrated threshold: the (m+1)-th smallest null distance, m = `allowed_flags` (flag
    `d < threshold`)."""
    null = np.sort(np.asarray(null, dtype=np.float64))
    if not len(null):
        raise InputError("calibration: the null distribution is empty")
    return float(null[min(allowed_flags(len(null), quantile), len(null) - 1)])


def calibrate(null: Mapping[str, np.ndarray], *, quantile: float, joint: bool = True) -> dict[str, Any]:
    """Per-space thresholds such that at most m = `allowed_flags(n, q)` null images are flagged (in any space
    when `joint`, else in each space separately). Returns the thresholds, the rank used, the null's flagged
    fractions and the expected false-flag rate on unseen real images, (flagged + 1)/(n + 1)."""
    names = list(null)
    d = np.stack([np.asarray(null[s], dtype=np.float64) for s in names], axis=1)
    n = len(d)
    if n == 0:
        raise InputError("calibration: no holdout images left to calibrate on (all excluded or none given)")
    allowed = allowed_flags(n, quantile)
    ordered = np.sort(d, axis=0)

    def at(rank: int) -> np.ndarray:
        return ordered[min(rank, n - 1)]

    def union(rank: int) -> int:
        return int((d < at(rank)).any(axis=1).sum())

    rank = allowed
    if joint and len(names) > 1:
        lo, hi = 0, allowed  # union(rank) is non-decreasing in rank and union(0) == 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if union(mid) <= allowed:
                lo = mid
            else:
                hi = mid - 1
        rank = lo
    t = at(rank)
    flagged_any = union(rank)
    return {
        "thresholds": {s: float(t[i]) for i, s in enumerate(names)},
        "rank": rank,
        "max_flagged": allowed,
        "null_flagged_fraction": {s: float((d[:, i] < t[i]).mean()) for i, s in enumerate(names)},
        "null_flagged_fraction_any": flagged_any / n,
        "expected_false_flag_rate": (flagged_any + 1) / (n + 1),
        "quantile_below_resolution": quantile * (n + 1) < 1,
    }
