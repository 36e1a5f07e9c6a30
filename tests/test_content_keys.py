"""Caches keyed by the content of a split, not its listing: pixels replaced at the same path miss the token cache
and the reference statistics; an unchanged split keeps its keys and hits."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TINY_VQVAE
from test_datasets import jpeg, make_folder

from trainables.data.datasets import read_dataset
from trainables.data.token_cache import ViewSpec, cache_key, open_token_cache
from trainables.evaluation.evaluate import reference_statistics
from trainables.evaluation.features import SUBSTITUTE, build_extractor
from trainables.evaluation.metrics import ReferenceStats
from trainables.models import build_vqvae

SPEC = ViewSpec(resolution=16, num_views=1, seed=0)


@pytest.fixture
def split(tmp_path):
    make_folder(tmp_path / "data")  # 5 train images of 20x12 px
    return read_dataset("folder", tmp_path / "data", "train")


def replace_pixels(path, *, seed: int) -> None:
    """Another image of the same dimensions at the same path, written a second later than the old one."""
    before = path.stat().st_mtime_ns
    jpeg(path, seed=seed)
    os.utime(path, ns=(before + 1_000_000_000, before + 1_000_000_000))


def test_replaced_pixels_miss_the_token_cache_and_an_unchanged_split_hits(split, tmp_path):
    torch.manual_seed(0)
    vqvae = build_vqvae(**TINY_VQVAE).eval()
    key = cache_key(split, vqvae, SPEC)
    first, hit = open_token_cache(tmp_path / "cache", split, vqvae, spec=SPEC)
    assert not hit
    again = read_dataset("folder", split.paths[0].parents[2], "train")  # listed afresh, files untouched
    assert (
        cache_key(again, vqvae, SPEC) == key
        and open_token_cache(tmp_path / "cache", again, vqvae, spec=SPEC)[1]
    )
    replace_pixels(split.paths[2], seed=99)
    assert cache_key(split, vqvae, SPEC)["images"] != key["images"]
    replaced, hit = open_token_cache(tmp_path / "cache", split, vqvae, spec=SPEC)
    assert not hit and not torch.equal(replaced.views[-1][2], first.views[-1][2])
    assert all(torch.equal(replaced.views[-1][i], first.views[-1][i]) for i in (0, 1, 3, 4))


def test_replaced_pixels_miss_the_reference_statistics(split, tmp_path):
    extractor = build_extractor(SUBSTITUTE)
    cache = ReferenceStats(tmp_path / "reference")
    first, hit = reference_statistics(split, extractor=extractor, resolution=16, cache=cache)
    assert not hit and reference_statistics(split, extractor=extractor, resolution=16, cache=cache)[1]
    replace_pixels(split.paths[0], seed=99)
    replaced, hit = reference_statistics(split, extractor=extractor, resolution=16, cache=cache)
    assert not hit and not (replaced["mu"] == first["mu"]).all()
    assert len(list((tmp_path / "reference").iterdir())) == 2


def test_a_byte_changed_at_the_same_size_and_time_changes_the_fingerprint(split):
    """Size and mtime can survive a copy that changed content (rsync -t, a restored backup): sampled bytes decide."""
    path = split.paths[1]
    before, info = split.fingerprint(), path.stat()
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert path.stat().st_size == info.st_size and path.stat().st_mtime_ns == info.st_mtime_ns
    assert split.fingerprint() != before
