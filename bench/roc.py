"""The ROC curve of a membership score, in plain Python: one definition for the trial that summarises its audit
(``trainables.audit_bound``: AUC, TPR at low FPR) and for the analysis that draws the curves from the recorded
scores (``analysis``, which installs without numpy's scientific stack beside it)."""

from __future__ import annotations

from collections.abc import Sequence


def roc_vertices(scores: Sequence[float], members: Sequence[bool]) -> tuple[list[float], list[float]]:
    """(FPR, TPR) after thresholding "score >= t" at each distinct score, highest first, with (0, 0) prepended.

    A group of tied scores moves both rates at once (one vertex per group), so the curve does not depend on the
    order of the inputs. Members are the positives.

    Args:
        scores: m finite floats; members: m bools, both kinds present (checked by the callers).

    Returns:
        Two lists of equal length n <= m + 1, non-decreasing, from (0, 0) to (1, 1).
    """
    pairs = sorted(zip(scores, members), key=lambda pair: -pair[0])
    positives = sum(1 for _, member in pairs if member)
    negatives = len(pairs) - positives
    false_positive_rate, true_positive_rate = [0.0], [0.0]
    true_positives = false_positives = 0
    for i, (score, member) in enumerate(pairs):
        true_positives += bool(member)
        false_positives += not member
        if i + 1 == len(pairs) or pairs[i + 1][0] != score:  # the last of its tie group
            false_positive_rate.append(false_positives / negatives)
            true_positive_rate.append(true_positives / positives)
    return false_positive_rate, true_positive_rate
