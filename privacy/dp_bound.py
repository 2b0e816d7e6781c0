"""The statistics of privacy auditing in one training run (Steinke, Nasr & Jagielski, NeurIPS 2023).

m canaries each join the training set independently with probability 1/2. After training, an auditor guesses
"in" for some canaries and "out" for others (abstaining on the rest) and counts its correct guesses. If training is
(ε, δ)-DP, the number of correct guesses W among r guesses is stochastically dominated by Binomial(r, q) with
q = e^ε / (1 + e^ε), up to a δ term (their Theorem 5.2):

    P[W ≥ v] ≤ P[Bin(r, q) ≥ v] + 2·m·δ · max_{i=1..v} (P[Bin(r, q) ≥ v - i] - P[Bin(r, q) ≥ v]) / i

So an observed count v falsifies every ε whose right-hand side is below the significance level α; the largest such
ε is a lower bound on the true ε that holds with probability at least 1 - α, whatever the training did. A lower
bound above the accountant's ε means the implementation does not deliver its claim.

What one run can show is limited by m: even all r = m guesses correct only falsify ε up to about log(m / log(1/α))
(`epsilon_ceiling`), so the audit checks a DP implementation at a small ε, where a bug shows, rather than at a
release's ε = 10, which no feasible m could falsify.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability bound on `correct` or more correct guesses out of `guesses` from an (ε, δ)-DP run with
    `m` canaries (Theorem 5.2 of Steinke et al. 2023; δ = 0 is the pure-DP binomial tail)."""
    if correct <= 0:
        return 1.0
    q = special.expit(epsilon)
    tail = float(stats.binom.sf(correct - 1, guesses, q))
    if delta == 0:
        return tail
    i = np.arange(1, correct + 1)
    excess = (stats.binom.sf(correct - i - 1, guesses, q) - tail) / i
    return min(1.0, tail + 2 * m * delta * float(np.max(excess, initial=0.0)))


def epsilon_lower_bound(m: int, guesses: int, correct: int, *, delta: float, significance: float) -> float:
    """The largest ε that `correct` of `guesses` falsifies at `significance` (0.0 when none is falsified)."""
    if not 0 < significance < 1:
        raise ValueError(f"significance {significance!r} must lie in (0, 1)")
    if guesses < 1 or p_value(m, guesses, correct, 0.0, delta) > significance:
        return 0.0

    def margin(eps: float) -> float:  # > 0 while (ε, δ) is falsified
        return significance - p_value(m, guesses, correct, eps, delta)

    lo, hi = 0.0, 1.0
    while margin(hi) > 0:
        lo, hi = hi, 2 * hi
        if hi > 100:  # every guess right with a vast m: report the bracket reached rather than loop on
            return lo
    return float(optimize.brentq(margin, lo, hi, xtol=1e-6))


GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5)


def epsilon_ceiling(m: int, *, delta: float, significance: float,
                    guess_fractions: tuple[float, ...] = GUESS_FRACTIONS) -> float:
    """The most `audit_scores` can show with `m` canaries: its bound when every guess is right."""
    level = significance / len(guess_fractions)
    return max(
        epsilon_lower_bound(m, 2 * _k(f, m), 2 * _k(f, m), delta=delta, significance=level) for f in guess_fractions
    )


def _k(fraction: float, m: int) -> int:
    return max(1, round(fraction * m / 2))


@dataclass(frozen=True)
class GuessResult:
    """One way of guessing: the top `k_in` scores guessed in, the bottom `k_out` guessed out."""

    k_in: int
    k_out: int
    correct: int
    epsilon_lower_bound: float


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    significance: float,
    guess_fractions: tuple[float, ...] = GUESS_FRACTIONS,
) -> tuple[GuessResult, list[GuessResult]]:
    """The best ε lower bound over a few guess sizes (higher score = more likely included).

    Each fraction f guesses the top f·m/2 scores "in" and the bottom f·m/2 "out". Trying several sizes and keeping
    the best is a multiple comparison, so each is tested at `significance / len(guess_fractions)` (Bonferroni):
    the reported bound still holds with probability ≥ 1 - significance. Returns (best, all)."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must be equal-length vectors")
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    level = significance / len(guess_fractions)
    results = []
    for fraction in guess_fractions:
        k = _k(fraction, m)
        correct = int(included[order[:k]].sum() + (~included[order[m - k:]]).sum())
        bound = epsilon_lower_bound(m, 2 * k, correct, delta=delta, significance=level)
        results.append(GuessResult(k_in=k, k_out=k, correct=correct, epsilon_lower_bound=bound))
    best = max(results, key=lambda r: (r.epsilon_lower_bound, r.correct))
    return best, results


def randomized_response_rate(epsilon: float) -> float:
    """The correct-guess rate of the most revealing ε-DP mechanism (randomized response): e^ε / (1 + e^ε)."""
    return 1 / (1 + math.exp(-epsilon))
