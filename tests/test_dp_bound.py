"""The one-run audit statistics (privacy.dp_bound) against direct computation and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from privacy.dp_bound import (
    audit_scores,
    epsilon_ceiling,
    epsilon_lower_bound,
    p_value,
    randomized_response_rate,
)


def test_pure_dp_p_value_is_the_binomial_tail_summed_by_hand() -> None:
    for guesses, correct, eps in [(10, 8, 1.0), (200, 150, 0.5), (50, 50, 3.0)]:
        q = math.exp(eps) / (1 + math.exp(eps))
        by_hand = sum(math.comb(guesses, j) * q**j * (1 - q) ** (guesses - j) for j in range(correct, guesses + 1))
        assert p_value(1000, guesses, correct, eps, 0.0) == pytest.approx(by_hand, rel=1e-9)


def test_delta_only_loosens_the_bound() -> None:
    assert p_value(1000, 500, 400, 1.0, 1e-5) >= p_value(1000, 500, 400, 1.0, 0.0)
    assert epsilon_lower_bound(1000, 500, 400, delta=1e-5, significance=0.05) <= epsilon_lower_bound(
        1000, 500, 400, delta=0.0, significance=0.05
    )


def test_lower_bound_is_where_the_p_value_crosses_the_significance() -> None:
    bound = epsilon_lower_bound(1000, 500, 400, delta=1e-5, significance=0.05)
    assert bound > 0
    assert p_value(1000, 500, 400, bound - 1e-3, 1e-5) < 0.05 < p_value(1000, 500, 400, bound + 1e-3, 1e-5)
    assert epsilon_lower_bound(1000, 500, 250, delta=1e-5, significance=0.05) == 0.0  # coin flipping shows nothing


def test_randomized_response_is_never_caught_above_its_epsilon_and_is_detected_below_it() -> None:
    """The most revealing ε-DP mechanism: each canary's membership bit is reported truthfully with probability
    e^ε/(1+e^ε). The bound must exceed ε in at most ~α of runs (it is a 95% lower bound), and find most of ε."""
    eps, m, runs = 1.0, 1000, 100
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(runs):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < randomized_response_rate(eps)
        reported = np.where(truthful, included, ~included)
        scores = reported + 1e-3 * rng.random(m)  # ties broken at random
        best, _ = audit_scores(scores, included, delta=0.0, significance=0.05)
        bounds.append(best.epsilon_lower_bound)
    bounds = np.array(bounds)
    # P[more than 11 of 100 exceed] is ~0.4% for a true 5% rate (the guarantee says at most 5%, Bonferroni makes it
    # conservative): the test fails only if the bound is wrong.
    assert (bounds > eps).sum() <= stats.binom.ppf(0.996, runs, 0.05)
    assert np.median(bounds) > 0.5


def test_perfect_guesses_reach_the_ceiling_which_grows_with_the_canaries() -> None:
    m = 1000
    included = np.arange(m) % 2 == 0
    best, every = audit_scores(included.astype(float), included, delta=1e-5, significance=0.05)
    assert all(r.correct == r.k_in + r.k_out for r in every)
    assert best.epsilon_lower_bound == pytest.approx(epsilon_ceiling(m, delta=1e-5, significance=0.05))
    assert epsilon_ceiling(200, delta=1e-5, significance=0.05) < best.epsilon_lower_bound < epsilon_ceiling(
        4000, delta=1e-5, significance=0.05
    )
    assert 4 < best.epsilon_lower_bound < 5.5  # about log(m / log(1/α)) for m = 1000
