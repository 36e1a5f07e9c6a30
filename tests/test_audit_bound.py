"""The one-run epsilon lower bound and the membership ROC (trainables/audit_bound.py): the p-value against the
binomial tail and the paper's formula, closed forms, calibration under the null, tightness on randomized response,
monotonicity, ties, ROC values by hand, bad inputs and speed."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from scipy import stats

from trainables.audit_bound import (
    GUESS_FRACTIONS,
    epsilon_lower_bound,
    guess_count_grid,
    lower_bound_for_counts,
    membership_roc,
    one_run_p_value,
)


def paper_p_value(m: int, r: int, v: int, epsilon: float, delta: float, *, monotone: bool = False) -> float:
    """The one-run paper's p-value written out term by term: beta + c max_i P[v - i <= X < v] / i, c = 2 m delta,
    X ~ Binomial(r, q). ``monotone``: each term's -(c / i - 1) beta dropped where c > i (the module's variant)."""
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    beta = stats.binom.sf(v - 1, r, q)
    weight = 2 * m * delta
    best, below_v = beta, 0.0
    for i in range(1, v + 1):
        below_v += stats.binom.pmf(v - i, r, q)
        term = beta + weight * below_v / i
        if monotone and weight > i:
            term += (weight / i - 1) * beta
        best = max(best, term)
    return min(1.0, best)


def randomized_response_scores(rng, *, canaries: int, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """An epsilon-DP release per canary: its membership bit, flipped with probability 1 / (1 + e^eps), plus
    independent jitter in [0, 0.5) (post-processing, so still epsilon-DP) so that scores do not tie."""
    included = rng.random(canaries) < 0.5
    flipped = rng.random(canaries) < 1.0 / (1.0 + math.exp(epsilon))
    return (included ^ flipped) + 0.5 * rng.random(canaries), included


def test_p_value_without_delta_is_the_binomial_tail_of_randomized_response():
    for m, r, v, epsilon in [
        (100, 50, 40, 1.0),
        (1000, 1000, 700, 0.5),
        (256, 10, 10, 3.0),
        (50, 20, 3, 0.2),
    ]:
        q = math.exp(epsilon) / (1 + math.exp(epsilon))
        expected = stats.binom.sf(v - 1, r, q)
        got = one_run_p_value(canaries=m, guesses=r, correct_guesses=v, epsilon=epsilon, delta=0.0)
        assert got == pytest.approx(expected, rel=1e-10)
    assert one_run_p_value(canaries=10, guesses=5, correct_guesses=0, epsilon=2.0, delta=0.0) == 1.0


def test_p_value_with_delta_is_the_papers_and_never_smaller_when_made_monotone():
    rng = np.random.default_rng(1)
    for _ in range(60):
        m = int(rng.integers(2, 300))
        r = int(rng.integers(1, m + 1))
        v = int(rng.integers(0, r + 1))
        epsilon, delta = float(rng.uniform(0, 6)), float(10 ** rng.uniform(-7, -1))
        got = one_run_p_value(canaries=m, guesses=r, correct_guesses=v, epsilon=epsilon, delta=delta)
        reference = paper_p_value(m, r, v, epsilon, delta)
        if 2 * m * delta <= 1:
            assert got == pytest.approx(reference, rel=1e-9, abs=1e-300)
        else:  # the monotone replacement: valid (>= the paper's) and increasing in epsilon
            assert got >= reference - 1e-12
            monotone = paper_p_value(m, r, v, epsilon, delta, monotone=True)
            assert got == pytest.approx(monotone, rel=1e-9, abs=1e-300)
    # Where the two differ (2 m delta = 4, p-value ~ 0.15): the module's is the larger, monotone one.
    got = one_run_p_value(canaries=1000, guesses=1000, correct_guesses=900, epsilon=2.0, delta=0.002)
    assert got == pytest.approx(paper_p_value(1000, 1000, 900, 2.0, 0.002, monotone=True), rel=1e-9)
    assert got > paper_p_value(1000, 1000, 900, 2.0, 0.002) + 0.01
    # The delta term matters: at m = 1000, delta = 1e-4 it dominates a tail that is tiny on its own.
    without = one_run_p_value(canaries=1000, guesses=1000, correct_guesses=990, epsilon=3.0, delta=0.0)
    with_delta = one_run_p_value(canaries=1000, guesses=1000, correct_guesses=990, epsilon=3.0, delta=1e-4)
    assert without < 1e-6 and with_delta > 100 * without


def test_p_value_increases_with_epsilon_even_when_two_m_delta_exceeds_one():
    for m, r, v, delta in [(1000, 300, 250, 0.01), (1000, 1000, 900, 0.002), (200, 200, 150, 1e-5)]:
        values = [
            one_run_p_value(canaries=m, guesses=r, correct_guesses=v, epsilon=e, delta=delta)
            for e in np.linspace(0, 8, 200)
        ]
        assert np.all(np.diff(values) >= -1e-15)


def test_perfect_separation_matches_the_all_correct_closed_form():
    # 500 of 1000 included, scores separate them perfectly: k+ = k- = 500 guesses all 1000 correctly. With all
    # correct, beta = q^m, and for 2 m delta <= 1 the p-value lies in [q^m, q^m + 2 m delta]; the bound is where it
    # crosses alpha / (number of grid pairs): epsilon = logit(level^(1/m)) for level between alpha - 2 m delta and
    # alpha. 48 = 7 fractions on each side, less the pair with no guesses.
    m = 1000
    included = np.zeros(m, dtype=bool)
    included[np.random.default_rng(2).permutation(m)[:500]] = True
    scores = included + np.random.default_rng(3).random(m)
    significance = 0.05 / 48
    for delta in (1e-9, 1e-7):
        high = math.log(significance ** (1 / m) / (1 - significance ** (1 / m)))
        level = significance - 2 * m * delta
        low = math.log(level ** (1 / m) / (1 - level ** (1 / m)))
        result = epsilon_lower_bound(scores, included, delta=delta, confidence=0.95)
        assert result["guesses"] == result["correct_guesses"] == m
        assert result["guesses_in"] == result["guesses_out"] == 500
        assert low - 1e-6 <= result["epsilon_lower_bound"] <= high + 1e-6
        assert 4.9 < result["epsilon_lower_bound"] < 5.0  # ln(1000 / ln(48 / 0.05)) ~ 4.97
    # A realistic delta costs bound (the delta term), and lower confidence gives a higher bound.
    at_realistic_delta = epsilon_lower_bound(scores, included, delta=1e-5)["epsilon_lower_bound"]
    assert at_realistic_delta < low - 0.1
    assert epsilon_lower_bound(scores, included, delta=1e-9, confidence=0.5)["epsilon_lower_bound"] > high


def test_scores_independent_of_membership_give_zero_almost_always():
    rng = np.random.default_rng(4)
    zeros = 0
    for _ in range(200):
        included = rng.random(500) < 0.5
        zeros += epsilon_lower_bound(rng.normal(size=500), included, delta=1e-5)["epsilon_lower_bound"] == 0.0
    assert zeros >= 190


@pytest.mark.parametrize("epsilon", [1.0, 4.0])
def test_randomized_response_bound_stays_below_its_epsilon_and_is_tight_for_large_m(epsilon):
    rng = np.random.default_rng(5 + int(epsilon))
    below = 0
    for _ in range(100):
        scores, included = randomized_response_scores(rng, canaries=1000, epsilon=epsilon)
        below += epsilon_lower_bound(scores, included, delta=1e-5)["epsilon_lower_bound"] <= epsilon
    assert below >= 95
    scores, included = randomized_response_scores(rng, canaries=10_000, epsilon=epsilon)
    result = epsilon_lower_bound(scores, included, delta=1e-6)
    assert 0.5 * epsilon < result["epsilon_lower_bound"] <= epsilon
    assert result["guesses_in"] > 0 and result["guesses_out"] > 0  # a symmetric leak: both tails carry it


def test_bound_increases_with_correct_guesses_and_decreases_with_delta():
    bounds = [
        lower_bound_for_counts(canaries=400, guesses=200, correct_guesses=v, delta=1e-5, significance=0.05)
        for v in range(0, 201)
    ]
    assert np.all(np.diff(bounds) >= 0)
    assert bounds[100] == 0.0 and bounds[200] > bounds[180] > bounds[150] > 0
    by_delta = [
        lower_bound_for_counts(canaries=400, guesses=200, correct_guesses=190, delta=d, significance=0.05)
        for d in (0.0, 1e-6, 1e-4, 1e-3)
    ]
    assert by_delta[0] >= by_delta[1] > by_delta[2] > by_delta[3]


def test_the_reported_bound_is_rejected_just_below_and_not_above():
    # The bound is the crossing point: the p-value at it is <= the corrected significance, just above it is not.
    m, r, v, delta = 1000, 400, 340, 1e-4
    bound = lower_bound_for_counts(canaries=m, guesses=r, correct_guesses=v, delta=delta, significance=0.01)
    assert one_run_p_value(canaries=m, guesses=r, correct_guesses=v, epsilon=bound, delta=delta) <= 0.01
    assert one_run_p_value(canaries=m, guesses=r, correct_guesses=v, epsilon=bound + 1e-5, delta=delta) > 0.01


def test_ties_are_never_split_so_array_order_cannot_leak_membership():
    # All scores equal: no information. Even with the arrays ordered by membership the bound must be 0.
    m = 1000
    for included in (np.arange(m) < m // 2, np.arange(m) >= m // 2):
        result = epsilon_lower_bound(np.zeros(m), included, delta=1e-5)
        assert result["epsilon_lower_bound"] == 0.0 and result["guesses"] == 0
    # Any joint permutation of the inputs gives the same answer, ties or not.
    rng = np.random.default_rng(6)
    included = rng.random(m) < 0.5
    scores = np.round(included * 0.8 + rng.normal(size=m), 1)  # coarse: many ties
    reference = epsilon_lower_bound(scores, included, delta=1e-5)
    assert reference["epsilon_lower_bound"] > 0
    for _ in range(3):
        order = rng.permutation(m)
        assert epsilon_lower_bound(scores[order], included[order], delta=1e-5) == reference


def test_guess_grid_depends_on_m_only_and_never_overlaps():
    pairs = guess_count_grid(1000)
    assert len(pairs) == len(GUESS_FRACTIONS) ** 2 - 1 == 48
    assert (500, 500) in pairs and (10, 0) in pairs and (0, 0) not in pairs
    for m in (2, 7, 10, 256, 1001):
        assert all(0 < k_in + k_out <= m for k_in, k_out in guess_count_grid(m))


def test_roc_of_separated_reversed_and_tied_scores():
    included = np.arange(100) < 40
    scores = np.where(included, 1.0, 0.0) + np.linspace(0, 0.5, 100)
    perfect = membership_roc(scores, included)
    assert perfect["auc"] == 1.0 and perfect["tpr_at_1pct_fpr"] == 1.0 and perfect["tpr_at_0_1pct_fpr"] == 1.0
    reversed_roc = membership_roc(-scores, included)
    assert reversed_roc["auc"] == 0.0 and reversed_roc["tpr_at_1pct_fpr"] == 0.0
    assert membership_roc(np.ones(100), included)["auc"] == 0.5


def test_roc_values_by_hand():
    # Members 10, 9, 3, 2; non-members 9, 7, 6, 5, 4, 1. Vertices: (0, 0), (0, 1/4), (1/6, 1/2), ... The tie at 9
    # is the straight segment (0, 1/4) -> (1/6, 1/2): TPR at FPR x = 1/4 + x * 6 / 4. AUC: pairs won (ties 1/2):
    # 6 + 5.5 + 1 + 1 = 13.5 of 24.
    scores = np.array([10, 9, 3, 2, 9, 7, 6, 5, 4, 1], dtype=float)
    included = np.arange(10) < 4
    roc = membership_roc(scores, included)
    assert roc["auc"] == pytest.approx(13.5 / 24)
    assert roc["tpr_at_1pct_fpr"] == pytest.approx(0.25 + 0.01 * 1.5)
    assert roc["tpr_at_0_1pct_fpr"] == pytest.approx(0.25 + 0.001 * 1.5)
    assert roc["fpr"][:3] == pytest.approx([0, 0, 1 / 6]) and roc["tpr"][:3] == pytest.approx([0, 0.25, 0.5])
    assert roc["fpr"][-1] == 1.0 and roc["tpr"][-1] == 1.0


def test_roc_curve_is_downsampled_and_monotone():
    rng = np.random.default_rng(7)
    included = rng.random(10_000) < 0.5
    roc = membership_roc(rng.normal(size=10_000) + included, included)
    assert len(roc["fpr"]) == len(roc["tpr"]) <= 101
    assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    assert 0.7 < roc["auc"] < 0.8  # Phi(1 / sqrt(2)) ~ 0.76


@pytest.mark.parametrize(
    ("scores", "mask", "keywords", "message"),
    [
        ([1.0, 2.0, 3.0], [True, False], {}, "entries"),
        ([1.0, float("nan"), 3.0], [True, False, True], {}, "finite"),
        ([1.0, float("inf"), 3.0], [True, False, True], {}, "finite"),
        ([1.0, 2.0, 3.0], [True, True, True], {}, "both included and excluded"),
        ([1.0, 2.0, 3.0], [False, False, False], {}, "both included and excluded"),
        ([1.0, 2.0, 3.0], [1, 0, 2], {}, "booleans"),
        ([[1.0, 2.0]], [[True, False]], {}, "1-D"),
        (["a", "b"], [True, False], {}, "real numbers"),
        ([1.0, 2.0], [True, False], {"delta": 0.0}, "delta"),
        ([1.0, 2.0], [True, False], {"delta": 1.0}, "delta"),
        ([1.0, 2.0], [True, False], {"delta": "1e-5"}, "delta"),
        ([1.0, 2.0], [True, False], {"delta": None}, "delta"),
        ([1.0, 2.0], [True, False], {"confidence": 1.0}, "confidence"),
        ([1.0, 2.0], [True, False], {"confidence": 0.0}, "confidence"),
        ([1.0, 2.0], [True, False], {"confidence": float("nan")}, "confidence"),
    ],
)
def test_bad_inputs_are_refused_by_name(scores, mask, keywords, message):
    with pytest.raises(ValueError, match=message):
        epsilon_lower_bound(scores, mask, **{"delta": 1e-5, **keywords})
    if not keywords:
        with pytest.raises(ValueError, match=message):
            membership_roc(scores, mask)


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="correct_guesses <= guesses <= canaries"):
        one_run_p_value(canaries=10, guesses=11, correct_guesses=3, epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        one_run_p_value(canaries=10, guesses=5, correct_guesses=3, epsilon=-1.0, delta=0.0)
    with pytest.raises(ValueError, match="significance"):
        lower_bound_for_counts(canaries=10, guesses=5, correct_guesses=3, delta=0.0, significance=0.0)


def test_ten_thousand_canaries_take_under_a_second():
    rng = np.random.default_rng(8)
    included = rng.random(10_000) < 0.5
    scores = rng.normal(size=10_000) + 0.5 * included
    start = time.perf_counter()
    result = epsilon_lower_bound(scores, included, delta=1e-5)
    membership_roc(scores, included)
    assert time.perf_counter() - start < 1.0
    assert result["epsilon_lower_bound"] > 0
