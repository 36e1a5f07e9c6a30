"""FID / precision-recall / KID on constructed features, against independent computations, and the reference cache."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from scipy import linalg

from trainables.evaluation.metrics import (
    REFERENCE_FORMAT,
    ReferenceKey,
    ReferenceStats,
    fid,
    kid,
    precision_recall,
)


def independent_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Textbook Frechet distance with scipy's matrix square root (not torch-fidelity's eigenvalue route)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def gaussian(n: int, d: int, *, shift: float = 0.0, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(shift, scale, (n, d)))


def test_fid_of_a_set_with_itself_is_zero():
    x = gaussian(500, 16)
    assert abs(fid(x, x)) < 1e-6


def test_fid_grows_with_the_distance_between_distributions():
    real = gaussian(2000, 8, seed=1)
    values = [fid(gaussian(2000, 8, shift=s, seed=2), real) for s in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] < 0.1
    assert values[-1] == pytest.approx(8 * 2.0**2, rel=0.05)  # mean shift of 2 in each of 8 dims


def test_fid_equals_an_independent_scipy_computation():
    a, b = gaussian(400, 12, seed=3), gaussian(300, 12, shift=0.3, scale=1.5, seed=4)
    assert fid(a, b) == pytest.approx(independent_fid(a.numpy(), b.numpy()), rel=1e-6)


def test_precision_recall_on_hand_built_sets():
    """Real: 4 points on a unit square; with k=1 each real point's radius is 1. Generated: two points near the
    square (covered) and two far away (not covered); the generated set's own radii are small, so only the real
    points next to a near generated point are covered."""
    real = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    generated = torch.tensor([[0.1, 0.0], [0.0, 0.2], [10.0, 10.0], [10.0, 10.3]])
    out = precision_recall(generated, real, neighborhood=1)
    # generated radii (1st NN): 0.2236, 0.2236, 0.3, 0.3; real [0,0] is within 0.1 of g0 -> covered; others not.
    assert out == {"precision": 0.5, "recall": 0.25}
    assert precision_recall(real, real, neighborhood=1) == {"precision": 1.0, "recall": 1.0}


def test_kid_is_near_zero_for_one_distribution_and_positive_otherwise():
    same = kid(gaussian(300, 8, seed=5), gaussian(300, 8, seed=6), subsets=20, subset_size=200)
    shifted = kid(gaussian(300, 8, shift=1.0, seed=7), gaussian(300, 8, seed=6), subsets=20, subset_size=200)
    assert abs(same["kid_mean"]) < 0.05 < shifted["kid_mean"]


def test_bad_features_are_refused():
    with pytest.raises(ValueError, match="one width"):
        fid(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 4 samples"):
        precision_recall(torch.zeros(3, 2), torch.zeros(10, 2))
    with pytest.raises(ValueError, match="NaN or inf"):
        fid(torch.full((5, 2), float("nan")), torch.zeros(5, 2))


def test_reference_statistics_are_cached_and_keyed(tmp_path):
    cache = ReferenceStats(tmp_path)
    key = ReferenceKey(
        dataset="flowers102", split="test", resolution=256, extractor="inception-v3-compat", num_images=50
    )
    assert cache.load(key) is None
    features = gaussian(50, 6, seed=8).float()
    saved = cache.save(key, features)
    loaded = cache.load(key)
    assert np.array_equal(loaded["mu"], saved["mu"]) and np.array_equal(loaded["features"], features.numpy())
    other = ReferenceKey(
        dataset="flowers102", split="test", resolution=256, extractor="substitute", num_images=50
    )
    assert cache.load(other) is None  # another extractor never reuses these statistics
    cache.path(key).write_bytes(b"damaged")
    with pytest.raises(ValueError, match="unreadable"):
        cache.load(key)


def test_a_truncated_or_foreign_reference_file_is_refused_naming_it(tmp_path):
    """A cache file cut short (a full disk, a copy interrupted) failed in zipfile without its path; an archive
    without the 'meta' entry with a bare KeyError. Both are ValueErrors naming the file and the remedy."""
    cache = ReferenceStats(tmp_path)
    key = ReferenceKey(dataset="d", split="test", resolution=16, extractor="x", num_images=5)
    cache.save(key, gaussian(5, 3, seed=1).float())
    whole = cache.path(key).read_bytes()
    cache.path(key).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="unreadable.*delete the file to recompute") as truncated:
        cache.load(key)
    assert str(cache.path(key)) in str(truncated.value)
    with open(cache.path(key), "wb") as handle:
        np.savez(handle, mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="'meta'.*delete the file to recompute") as foreign:
        cache.load(key)
    assert str(cache.path(key)) in str(foreign.value)
    # Its metadata right but no statistics (another writer's): refused here, not by a KeyError of 'mu' once every
    # image had been generated; likewise statistics of other shapes than the features'.
    meta = json.dumps({"format": REFERENCE_FORMAT, **dataclasses.asdict(key)})
    for arrays, problem in (
        ({"features": np.zeros((5, 3), np.float32)}, "no 'mu', 'sigma' entry"),
        ({"features": np.zeros((5, 3), np.float32), "mu": np.zeros(4), "sigma": np.eye(4)}, "other shapes"),
    ):
        with open(cache.path(key), "wb") as handle:
            np.savez(handle, meta=meta, **arrays)
        with pytest.raises(ValueError, match=f"{problem}.*delete the file to recompute"):
            cache.load(key)


def test_batched_precision_recall_equals_the_full_computation_and_never_holds_n_by_n(monkeypatch):
    """Precision/recall go block by block (Food-101's 25,250 test images made ~15 GB of N x N float64 matrices):
    the result is the full matrices' exactly, and no distance block has more rows than PR_BLOCK_ROWS."""
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    from trainables.evaluation import metrics

    generated, real = gaussian(300, 16, shift=0.2, seed=10), gaussian(260, 16, scale=1.3, seed=11)
    precision, recall = calculate_precision_recall_full(generated, real, neighborhood=3)
    cdist, rows = torch.cdist, []

    def recording_cdist(a, b, *args, **kwargs):
        rows.append(len(a))
        return cdist(a, b, *args, **kwargs)

    monkeypatch.setattr(metrics, "PR_BLOCK_ROWS", 64, raising=False)  # raising: the full route has no blocks
    monkeypatch.setattr(torch, "cdist", recording_cdist)
    out = precision_recall(generated, real, neighborhood=3)
    assert out == {"precision": precision, "recall": recall} and 0 < recall < 1 and 0 < precision < 1
    assert rows and max(rows) <= 64


def test_kid_subset_size_is_half_the_smaller_set_and_never_shrunk_silently():
    with pytest.raises(ValueError, match="subset_size 1000 needs 2 <= size <= each set's size"):
        kid(gaussian(50, 4, seed=12), gaussian(40, 4, seed=13), subset_size=1000)
    from trainables.evaluation.metrics import kid_subset_size

    assert [kid_subset_size(g, r) for g, r in ((5, 5), (4, 100), (3, 3), (5000, 2500), (50_000, 50_000))] == [
        2,
        2,
        2,
        1000,
        1000,
    ]
    assert kid_subset_size(40, 30, largest=10) == 10
    a, b = gaussian(50, 4, seed=12), gaussian(40, 4, seed=13)
    assert kid(a, b) == kid(a, b, subset_size=20)  # None: the rule's size


def test_reference_statistics_of_other_extractor_weights_or_an_older_format_miss(tmp_path):
    import json

    from trainables.evaluation import metrics

    cache = ReferenceStats(tmp_path)
    common = dict(
        dataset="folder", split="test", resolution=16, extractor="inception-v3-compat", num_images=20
    )
    key = ReferenceKey(**common, images="c" * 64, weights="a" * 64)
    cache.save(key, gaussian(20, 6, seed=14).float())
    other = ReferenceKey(**common, images="c" * 64, weights="b" * 64)
    assert cache.path(other) != cache.path(key) and cache.load(other) is None and cache.load(key) is not None
    # Statistics written by the previous format (other pixel decoding) at the same name are recomputed.
    meta = json.dumps({**metrics.asdict(key), "format": "varsweep-reference-stats/1"})
    stale = dict(mu=np.zeros(6), sigma=np.eye(6), features=np.zeros((20, 6)))
    metrics._savez(cache.path(key), meta=np.array(meta), **stale)
    assert cache.load(key) is None
