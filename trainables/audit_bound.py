"""Empirical lower bound on a training run's epsilon from canary membership scores (one-run privacy audit).

The design is the one-run audit of Steinke, Nasr and Jagielski (2023, "Privacy auditing with one (1) training
run"): m canaries, each included in the training set independently with probability 1/2; after training, a score
per canary from the released model (higher = more likely a member). The auditor guesses "in" for the k+ highest
scores, "out" for the k- lowest and abstains on the rest; r = k+ + k- guesses, v of them correct. If training is
(epsilon, delta)-DP with respect to each canary, v is (up to the delta term) no more likely to be large than
Binomial(r, e^epsilon / (1 + e^epsilon)), the count of randomized response. The p-value of the observed v under
that null gives a one-sided confidence lower bound on epsilon: the largest epsilon the data still reject.

Everything is numpy + scipy (no torch), so the bound is as cheap to recompute as to read.

Choices made here, each stated where it is made:
- The guess counts (k+, k-) come from a fixed grid of fractions of m (``GUESS_FRACTIONS``, both sides), and the
  significance is divided by the number of distinct grid pairs (Bonferroni), so the maximum over the grid still
  holds at the stated confidence.
- Tied scores are never split: a guess set that would cut through a group of equal scores stops before the group
  (the auditor abstains on it). The guesses then depend on the score values alone, never on the order of the
  arrays, so an array ordered by membership cannot leak it.
- With 2 m delta > 1 the paper's p-value is not provably monotone in epsilon (some of its terms can decrease);
  it is replaced by a slightly larger one that is (see ``one_run_p_value``), so the bisection on epsilon is
  sound. For 2 m delta <= 1 both are the same.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
from scipy import special

from bench.roc import roc_vertices

# Fractions of m for k+ (guesses "in", highest scores) and, independently, for k- (guesses "out", lowest scores).
# Small fractions catch a few strongly memorised canaries (the usual DP-SGD case); 0.5 on both sides guesses
# every canary (the best choice when every canary leaks a little, as randomized response does).
GUESS_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5)

# The delta term's maximum over i only needs i up to a window reaching this many standard deviations (plus a
# fixed margin for the near-degenerate q -> 1 case) below the binomial mean: there T_i is already 1 to within
# e^-80 (Bernstein), so every later term, at most c/i + (1 - c/i)^+ beta, is below the window's last one.
WINDOW_STANDARD_DEVIATIONS = 12.0
WINDOW_MARGIN = 60.0

# Bisection on epsilon stops once the bracket is this narrow (nats); the lower end is returned.
EPSILON_TOLERANCE = 1e-7

ROC_MAX_POINTS = 101


def epsilon_lower_bound(scores, included_mask, *, delta: float, confidence: float = 0.95) -> dict:
    """The one-run empirical lower bound on epsilon at ``delta``, maximised over the guess grid.

    Args:
        scores: (m,) finite floats, one per canary; higher = more likely a member.
        included_mask: (m,) bools (or 0/1), True where the canary was in the training set. Both kinds present.
        delta: the delta of the (epsilon, delta)-DP null, 0 < delta < 1.
        confidence: of the one-sided lower bound, 0 < confidence < 1 (after the grid's Bonferroni correction).

    Returns:
        {"epsilon_lower_bound": float >= 0 (nats), "guesses": r, "correct_guesses": v, "guesses_in": k+ used,
        "guesses_out": k- used} for the grid pair that gives the largest bound (ties and all-zero bounds: the pair
        whose delta-free bound is largest). With probability >= ``confidence`` over the canaries' inclusion (and
        the training's randomness), a training run that is (epsilon, delta)-DP towards each canary has
        epsilon >= the bound.
    """
    scores_m, included_m = _validated_scores_and_mask(scores, included_mask)
    _check_open_unit_interval("delta", delta)
    _check_open_unit_interval("confidence", confidence)
    canaries = scores_m.size
    pairs = guess_count_grid(canaries)
    significance = (1.0 - confidence) / len(pairs)
    ascending = np.sort(scores_m)
    counts = [
        _guess_outcome(scores_m, included_m, ascending=ascending, guesses_in=k_in, guesses_out=k_out)
        for k_in, k_out in pairs
    ]
    guesses = np.array([c[0] + c[1] for c in counts])
    correct = np.array([c[2] for c in counts])
    ceilings = _delta_free_bounds(guesses, correct, significance)
    # The delta-free bound caps the delta bound (its p-value is never larger), so candidates are visited in
    # decreasing order of it and the search stops once no remaining one can beat the best found.
    best_index, best_bound = None, -1.0
    for index in np.argsort(-ceilings, kind="stable"):
        if ceilings[index] <= best_bound:
            break
        bound = _bound_below_ceiling(
            canaries=canaries,
            guesses=int(guesses[index]),
            correct_guesses=int(correct[index]),
            delta=delta,
            significance=significance,
            ceiling=float(ceilings[index]),
        )
        if bound > best_bound:
            best_index, best_bound = index, bound
    guesses_in, guesses_out, correct_count = counts[best_index]
    return {
        "epsilon_lower_bound": float(best_bound),
        "guesses": int(guesses_in + guesses_out),
        "correct_guesses": int(correct_count),
        "guesses_in": int(guesses_in),
        "guesses_out": int(guesses_out),
    }


def guess_count_grid(canaries: int) -> list[tuple[int, int]]:
    """The distinct (k+, k-) pairs tried for m = ``canaries``: floor(f * m) for f in GUESS_FRACTIONS on each side,
    at least one guess. Depends on m only (never on the scores), which is what makes Bonferroni over it valid."""
    counts = sorted({math.floor(fraction * canaries) for fraction in GUESS_FRACTIONS})
    return [(k_in, k_out) for k_in in counts for k_out in counts if k_in + k_out > 0]


def one_run_p_value(
    *, canaries: int, guesses: int, correct_guesses: int, epsilon: float, delta: float
) -> float:
    """P[>= v correct guesses out of r] under the null "(epsilon, delta)-DP towards each of m canaries".

    With q = e^eps / (1 + e^eps), X ~ Binomial(r, q), T_i = P[X >= v - i] and beta = T_0 = P[X >= v], the one-run
    paper's bound is beta + 2 m delta max_{1<=i<=v} (T_i - beta) / i, i.e. max_i [c T_i / i + (1 - c / i) beta]
    with c = 2 m delta. For i < c the coefficient of beta is negative, so that term may decrease as epsilon
    grows; there it is replaced by c T_i / i (larger, so still a valid p-value, and increasing in epsilon, as
    T_i and beta are). The result is the paper's value whenever c <= 1, and never smaller. Clipped to 1.

    Args: m = ``canaries`` >= r = ``guesses`` >= v = ``correct_guesses`` >= 0; epsilon >= 0 (nats);
    0 <= delta <= 1.
    """
    _check_counts(canaries=canaries, guesses=guesses, correct_guesses=correct_guesses, delta=delta)
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be finite and >= 0, got {epsilon}")
    return _p_value(guesses, correct_guesses, q=float(special.expit(epsilon)), weight=2.0 * canaries * delta)


def lower_bound_for_counts(
    *, canaries: int, guesses: int, correct_guesses: int, delta: float, significance: float
) -> float:
    """The largest epsilon (nats, >= 0) whose p-value for (m, r, v) is <= ``significance`` (one guess count, no
    grid correction): every epsilon below it is rejected at that level."""
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")
    _check_counts(canaries=canaries, guesses=guesses, correct_guesses=correct_guesses, delta=delta)
    ceiling = float(_delta_free_bounds(np.array([guesses]), np.array([correct_guesses]), significance)[0])
    return _bound_below_ceiling(
        canaries=canaries,
        guesses=guesses,
        correct_guesses=correct_guesses,
        delta=delta,
        significance=significance,
        ceiling=ceiling,
    )


def membership_roc(scores, included_mask) -> dict:
    """ROC of the membership score (members positive; higher score = guessed member).

    AUC is the Mann-Whitney statistic with tied scores counting 1/2 (equal to the area under the curve below).
    The curve has one vertex per distinct score (thresholding "score >= t"), from (0, 0) to (1, 1); a tie group
    moves both rates at once, a straight segment a randomised threshold achieves. TPR at a given FPR is read off
    that piecewise-linear curve by linear interpolation between vertices (at a vertical step: the top of the step).

    Args:
        scores: (m,) finite floats; included_mask: (m,) bools or 0/1, both kinds present.

    Returns:
        {"auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr": floats in [0, 1], "fpr", "tpr": lists of equal length
        <= 101, from (0, 0) to (1, 1), evenly spaced along the curve's vertices}.
    """
    scores_m, included_m = _validated_scores_and_mask(scores, included_mask)
    false_positive_rate, true_positive_rate = map(
        np.asarray, roc_vertices(scores_m.tolist(), included_m.tolist())
    )
    # Keep the top of each vertical step so interpolation sees strictly increasing FPRs.
    last_of_each = np.append(false_positive_rate[1:] != false_positive_rate[:-1], True)
    fpr_unique, tpr_unique = false_positive_rate[last_of_each], true_positive_rate[last_of_each]
    picked = np.unique(np.linspace(0, false_positive_rate.size - 1, ROC_MAX_POINTS).round().astype(int))
    return {
        "auc": _mann_whitney_auc(scores_m, included_m),
        "tpr_at_1pct_fpr": float(np.interp(0.01, fpr_unique, tpr_unique)),
        "tpr_at_0_1pct_fpr": float(np.interp(0.001, fpr_unique, tpr_unique)),
        "fpr": [float(x) for x in false_positive_rate[picked]],
        "tpr": [float(x) for x in true_positive_rate[picked]],
    }


def _validated_scores_and_mask(scores, included_mask) -> tuple[np.ndarray, np.ndarray]:
    """(m,) float64 scores and (m,) bool mask, or a ValueError naming what is wrong."""
    scores_m = np.asarray(scores)
    mask_m = np.asarray(included_mask)
    if scores_m.ndim != 1 or mask_m.ndim != 1:
        raise ValueError(
            f"scores and included_mask must be 1-D, got shapes {scores_m.shape} and {mask_m.shape}"
        )
    if scores_m.size != mask_m.size:
        raise ValueError(f"scores has {scores_m.size} entries but included_mask has {mask_m.size}")
    if scores_m.dtype == bool or not np.issubdtype(scores_m.dtype, np.number):
        raise ValueError(f"scores must be real numbers, got dtype {scores_m.dtype}")
    if np.iscomplexobj(scores_m):
        raise ValueError("scores must be real numbers, got complex values")
    scores_m = scores_m.astype(np.float64)
    if not np.all(np.isfinite(scores_m)):
        bad = int(np.flatnonzero(~np.isfinite(scores_m))[0])
        raise ValueError(f"scores must be finite; canary {bad} has score {scores_m[bad]}")
    if mask_m.dtype != bool:
        if not np.issubdtype(mask_m.dtype, np.number) or not np.all((mask_m == 0) | (mask_m == 1)):
            raise ValueError("included_mask must hold booleans (or 0/1)")
        mask_m = mask_m.astype(bool)
    members = int(mask_m.sum())
    if members == 0 or members == mask_m.size:
        raise ValueError(
            f"included_mask needs both included and excluded canaries, got {members} included of {mask_m.size}"
        )
    return scores_m, mask_m


def _check_counts(*, canaries: int, guesses: int, correct_guesses: int, delta: float) -> None:
    if not 0 <= correct_guesses <= guesses <= canaries:
        raise ValueError(
            f"need 0 <= correct_guesses <= guesses <= canaries, got {correct_guesses}, {guesses}, {canaries}"
        )
    if not 0 <= delta <= 1:
        raise ValueError(f"delta must be in [0, 1], got {delta}")


def _check_open_unit_interval(name: str, value) -> None:
    if not isinstance(value, Real) or not 0 < value < 1:  # NaN fails the comparison too
        raise ValueError(f"{name} must be a number with 0 < {name} < 1, got {value!r}")


def _guess_outcome(
    scores_m: np.ndarray, included_m: np.ndarray, *, ascending: np.ndarray, guesses_in: int, guesses_out: int
) -> tuple[int, int, int]:
    """(k+ used, k- used, correct guesses) for nominal counts k+/k-, each shrunk so no tie group is split.
    ``ascending``: the (m,) scores sorted."""
    used_in = _untied_count_from_top(ascending, guesses_in)
    used_out = _untied_count_from_bottom(ascending, guesses_out)
    correct = 0
    if used_in:  # the used_in highest scores are exactly those >= the used_in-th highest (no tie is split)
        correct += int(included_m[scores_m >= ascending[ascending.size - used_in]].sum())
    if used_out:
        correct += int((~included_m[scores_m <= ascending[used_out - 1]]).sum())
    return used_in, used_out, correct


def _untied_count_from_top(ascending: np.ndarray, count: int) -> int:
    """The largest j <= count such that the j highest scores are all strictly above the rest."""
    if count == 0 or count >= ascending.size:
        return min(count, ascending.size)
    cut = ascending[ascending.size - count]
    at_or_above = ascending.size - int(np.searchsorted(ascending, cut, side="left"))
    return (
        count if at_or_above == count else ascending.size - int(np.searchsorted(ascending, cut, side="right"))
    )


def _untied_count_from_bottom(ascending: np.ndarray, count: int) -> int:
    """The largest j <= count such that the j lowest scores are all strictly below the rest."""
    if count == 0 or count >= ascending.size:
        return min(count, ascending.size)
    cut = ascending[count - 1]
    at_or_below = int(np.searchsorted(ascending, cut, side="right"))
    return count if at_or_below == count else int(np.searchsorted(ascending, cut, side="left"))


def _delta_free_bounds(guesses: np.ndarray, correct: np.ndarray, significance: float) -> np.ndarray:
    """(n,) bounds at delta = 0: P[Binomial(r, q) >= v] = I_q(v, r - v + 1) (regularised incomplete beta), so
    the q where it equals the significance is betaincinv; epsilon = logit(q), 0 when q <= 1/2 or v = 0."""
    bounds = np.zeros(guesses.shape, dtype=np.float64)
    positive = correct > 0
    q = special.betaincinv(correct[positive], guesses[positive] - correct[positive] + 1, significance)
    bounds[positive] = np.maximum(special.logit(q), 0.0)
    return bounds


def _bound_below_ceiling(
    *, canaries: int, guesses: int, correct_guesses: int, delta: float, significance: float, ceiling: float
) -> float:
    """Bisection on epsilon in [0, ceiling] for the largest epsilon with p-value <= significance (the p-value is
    increasing in epsilon, and at ``ceiling`` its delta-free part alone already reaches the significance)."""
    weight = 2.0 * canaries * delta

    def p_at(epsilon: float) -> float:
        return _p_value(guesses, correct_guesses, q=float(special.expit(epsilon)), weight=weight)

    if ceiling <= 0 or p_at(0.0) > significance:
        return 0.0
    if p_at(ceiling) <= significance:
        return ceiling
    low, high = 0.0, ceiling  # invariant: p(low) <= significance < p(high)
    while high - low > EPSILON_TOLERANCE:
        middle = 0.5 * (low + high)
        if p_at(middle) <= significance:
            low = middle
        else:
            high = middle
    return low


def _p_value(guesses: int, correct_guesses: int, *, q: float, weight: float) -> float:
    """The monotone one-run p-value (see ``one_run_p_value``) for r guesses, v correct, accuracy q of the null's
    randomized response and weight c = 2 m delta. Sums the pmf over a window below v only (see
    WINDOW_STANDARD_DEVIATIONS); with 10,000 guesses that is a few thousand terms instead of up to 10,000."""
    if correct_guesses == 0:
        return 1.0
    tail = float(special.betainc(correct_guesses, guesses - correct_guesses + 1, q))  # P[X >= v]
    if weight == 0:
        return min(tail, 1.0)
    spread = math.sqrt(guesses * q * (1.0 - q))
    lowest = math.floor(guesses * q - WINDOW_STANDARD_DEVIATIONS * spread - WINDOW_MARGIN)
    lowest = min(max(lowest, 0), correct_guesses - 1)
    successes = np.arange(correct_guesses - 1, lowest - 1, -1)  # v-1, v-2, ..., lowest: i = 1, 2, ...
    log_pmf = (
        special.gammaln(guesses + 1)
        - special.gammaln(successes + 1)
        - special.gammaln(guesses - successes + 1)
        + special.xlogy(successes, q)
        + special.xlog1py(guesses - successes, -q)
    )
    upper_tails = np.minimum(tail + np.cumsum(np.exp(log_pmf)), 1.0)  # T_i for i = 1..len
    offsets = np.arange(1, successes.size + 1, dtype=np.float64)
    terms = weight / offsets * upper_tails + np.maximum(0.0, 1.0 - weight / offsets) * tail
    return min(max(float(terms.max()), tail), 1.0)


def _mann_whitney_auc(scores_m: np.ndarray, included_m: np.ndarray) -> float:
    """P[member score > non-member score] + P[equal] / 2, from average ranks."""
    ranks = _average_ranks(scores_m)
    members = int(included_m.sum())
    non_members = included_m.size - members
    rank_sum = float(ranks[included_m].sum())
    return (rank_sum - members * (members + 1) / 2.0) / (members * non_members)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """(m,) 1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.flatnonzero(np.append(True, sorted_values[1:] != sorted_values[:-1]))
    ends = np.append(starts[1:], values.size)  # exclusive
    group_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks
