"""Token cache: hit/miss, invalidation, resumable sharded build, bit-exactness against on-the-fly tokenisation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_VQVAE
from PIL import Image
from test_datasets import make_folder

from trainables.data import token_cache
from trainables.data.datasets import DatasetError, read_dataset
from trainables.data.token_cache import (
    TokenCache,
    ViewSpec,
    cache_key,
    image_identity,
    make_views,
    open_token_cache,
)
from trainables.models import build_vqvae

SPEC = ViewSpec(resolution=16, num_views=3, seed=1)


@pytest.fixture
def images(tmp_path):
    make_folder(tmp_path / "data")  # 5 train images of 20x12 px in two classes
    return read_dataset("folder", tmp_path / "data", "train")


def make_vqvae(seed: int = 0):
    torch.manual_seed(seed)
    return build_vqvae(**TINY_VQVAE).eval()


def test_miss_then_hit_with_identical_tokens(images, tmp_path):
    vqvae = make_vqvae()
    first, hit = open_token_cache(tmp_path / "cache", images, vqvae, spec=SPEC, shard_size=2)
    assert not hit and first.num_examples == 5 and first.num_views == 3
    assert first.views[0].dtype == torch.int16 and [v.shape[-1] for v in first.views] == [1, 4, 9, 16]
    second, hit = open_token_cache(tmp_path / "cache", images, vqvae, spec=SPEC, shard_size=2)
    assert hit and all(torch.equal(a, b) for a, b in zip(first.views, second.views))
    assert torch.equal(second.labels_N, torch.tensor(images.labels))


def test_cached_tokens_equal_on_the_fly_tokenisation_of_the_same_crops(images, tmp_path):
    vqvae = make_vqvae()
    cached, _ = open_token_cache(tmp_path / "cache", images, vqvae, spec=SPEC, shard_size=2)
    for index in range(len(images)):
        with Image.open(images.paths[index]) as image:
            views = make_views(image, spec=SPEC, identity=image_identity(images.paths[index].read_bytes()))
        with torch.no_grad():
            direct = vqvae.img_to_idxBl(views)
        for si, idx_Vl in enumerate(direct):
            assert torch.equal(cached.views[si][index].long(), idx_Vl)
    assert not torch.equal(views[0], views[1])  # the views really are different crops


def test_any_change_of_weights_spec_or_images_misses(images, tmp_path):
    vqvae = make_vqvae()
    base = cache_key(images, vqvae, SPEC)
    changed_vqvae = make_vqvae()
    with torch.no_grad():
        changed_vqvae.quantize.embedding.weight[0, 0] += 1e-3
    assert cache_key(images, changed_vqvae, SPEC)["vqvae"] != base["vqvae"]
    assert cache_key(images, vqvae, ViewSpec(resolution=16, num_views=3, seed=2)) != base
    assert cache_key(images.without({0}), vqvae, SPEC) != base
    open_token_cache(tmp_path / "cache", images, vqvae, spec=SPEC)
    _, hit = open_token_cache(tmp_path / "cache", images, changed_vqvae, spec=SPEC)
    assert not hit and len(list((tmp_path / "cache").iterdir())) == 2


def test_interrupted_build_resumes_at_the_first_unfinished_shard(images, tmp_path, monkeypatch):
    vqvae = make_vqvae()
    full, _ = open_token_cache(tmp_path / "reference", images, vqvae, spec=SPEC, shard_size=2)
    calls = []
    real_tokenise = token_cache._tokenise

    def dying_after_two_shards(images_, indices, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        calls.append(indices)
        return real_tokenise(images_, indices, *args, **kwargs)

    monkeypatch.setattr(token_cache, "_tokenise", dying_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        open_token_cache(tmp_path / "cache", images, vqvae, spec=SPEC, shard_size=2)
    cache = TokenCache(tmp_path / "cache", cache_key(images, vqvae, SPEC), shard_size=2)
    assert not cache.complete and json.loads((cache.folder / "progress.json").read_text())[
        "finished_images"
    ] == [[0, 4]]
    with pytest.raises(DatasetError, match="incomplete"):
        cache.load()
    calls.clear()
    monkeypatch.setattr(token_cache, "_tokenise", real_tokenise)
    resumed, hit = open_token_cache(tmp_path / "cache", images, vqvae, spec=SPEC, shard_size=2)
    assert not hit and all(torch.equal(a, b) for a, b in zip(full.views, resumed.views))


@pytest.mark.parametrize("kept_bytes", [0, 200, -1])
def test_an_unfinished_build_s_file_cut_short_is_made_anew_not_padded_with_zeros(
    images, tmp_path, monkeypatch, kept_bytes
):
    """A scale file of an interrupted build, cut short (a full disk, a copy), was opened by numpy's "r+" memory map,
    which pads it with zeros, and the shards recorded as finished kept those zeros as tokens; an empty one stopped
    every build with an EOFError naming no file."""
    vqvae = make_vqvae()
    full = _interrupted_build(images, vqvae, tmp_path, monkeypatch, shards=2)
    cache = TokenCache(tmp_path / "cache", cache_key(images, vqvae, SPEC), shard_size=2)
    data = cache.scale_path(1).read_bytes()
    cache.scale_path(1).write_bytes(data[: len(data) - 1 if kept_bytes < 0 else kept_bytes])
    resumed, hit = open_token_cache(tmp_path / "cache", images, vqvae, spec=SPEC, shard_size=2)
    assert not hit and all(torch.equal(a, b) for a, b in zip(full, resumed.views))


def _interrupted_build(images, vqvae, tmp_path, monkeypatch, *, shards: int):
    """A build into ``tmp_path / "cache"`` (shards of 2 images) that crashed after ``shards`` shards; returns the
    uninterrupted build's views (``tmp_path / "reference"``) to compare a resumed one with."""
    full, _ = open_token_cache(tmp_path / "reference", images, vqvae, spec=SPEC, shard_size=2)
    real_tokenise, calls = token_cache._tokenise, []

    def dying(*args, **kwargs):
        if len(calls) == shards:
            raise KeyboardInterrupt("simulated crash")
        calls.append(1)
        return real_tokenise(*args, **kwargs)

    monkeypatch.setattr(token_cache, "_tokenise", dying)
    with pytest.raises(KeyboardInterrupt):
        open_token_cache(tmp_path / "cache", images, vqvae, spec=SPEC, shard_size=2)
    monkeypatch.setattr(token_cache, "_tokenise", real_tokenise)
    return full.views


def test_cache_is_memory_mapped_and_never_written_by_readers(images, tmp_path):
    vqvae = make_vqvae()
    views, _ = open_token_cache(tmp_path / "cache", images, vqvae, spec=SPEC)
    cache = TokenCache(tmp_path / "cache", cache_key(images, vqvae, SPEC))
    before = cache.scale_path(3).read_bytes()
    views.views[3][0, 0, 0] = -1  # copy-on-write: the file keeps its content
    assert cache.scale_path(3).read_bytes() == before


def test_damaged_file_and_unreadable_image_are_named(images, tmp_path):
    vqvae = make_vqvae()
    cache = TokenCache(tmp_path / "cache", cache_key(images, vqvae, SPEC), shard_size=2)
    cache.build(images, vqvae, spec=SPEC)
    cache.scale_path(1).write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="tokens_s1.npy is damaged"):
        cache.load()
    images.paths[3].write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=f"cannot read image {images.paths[3]}"):
        open_token_cache(tmp_path / "other", images, vqvae, spec=SPEC)


@pytest.mark.parametrize("resumed_shard_size", [8, 1, 3])
def test_a_build_resumed_with_another_shard_size_has_every_token(
    images, tmp_path, monkeypatch, resumed_shard_size
):
    """Interrupted after the first shard of 2 images, then resumed with another shard size: the finished shards
    must not be read as shards of the new size (with 8, "shard 0 finished" used to skip every image: zero tokens)."""
    vqvae = make_vqvae()
    full = _interrupted_build(images, vqvae, tmp_path, monkeypatch, shards=1)
    resumed, hit = open_token_cache(
        tmp_path / "cache", images, vqvae, spec=SPEC, shard_size=resumed_shard_size
    )
    assert not hit and all(torch.equal(a, b) for a, b in zip(full, resumed.views))


def test_views_of_high_bit_depth_and_exif_turned_images_are_those_of_the_displayed_picture(tmp_path):
    """Views come from the 8-bit picture a viewer shows (``bench.pixels.to_rgb``): a 16-bit scan is not clipped to
    white nor a phone photo left on its side. Caches of the older decoding miss (another format in the key)."""
    import numpy as np
    from test_datasets import displayed_images

    spec = ViewSpec(resolution=8, num_views=2, seed=0)
    for path, pixels in displayed_images(tmp_path).items():
        with Image.open(path) as image:
            views = make_views(image, spec=spec, identity=b"3")
        expected = make_views(Image.fromarray(np.ascontiguousarray(pixels)), spec=spec, identity=b"3")
        assert torch.equal(views, expected), path.name
    assert token_cache.CACHE_FORMAT == "varsweep-token-cache/4"


def test_an_image_s_views_do_not_depend_on_the_other_images(images, tmp_path):
    """Under DP, adding or removing one image (or skipping a corrupt one) must leave every other example's input
    as it was: crops keyed by listing index moved every later image's crops and tokens (2.85 C between the clipped
    sums of two neighbouring datasets in the review's reproduction)."""
    vqvae = make_vqvae()
    full, _ = open_token_cache(tmp_path / "cache", images, vqvae, spec=SPEC)
    for dropped in range(len(images)):
        fewer, _ = open_token_cache(tmp_path / "cache", images.without({dropped}), vqvae, spec=SPEC)
        kept = [i for i in range(len(images)) if i != dropped]
        assert all(torch.equal(f[kept], g) for f, g in zip(full.views, fewer.views)), dropped
    moved = read_dataset("folder", tmp_path / "data", "train")
    renamed = [(p, p.with_name("z-" + p.name)) for p in moved.paths[:2]]
    for old, new in renamed:  # same pixels under other names: other places in the listing, the same crops
        old.rename(new)
    relisted = read_dataset("folder", tmp_path / "data", "train")
    again, _ = open_token_cache(tmp_path / "cache", relisted, vqvae, spec=SPEC)
    order = [relisted.paths.index(new) for _, new in renamed] + [
        relisted.paths.index(p) for p in moved.paths[2:]
    ]
    assert all(torch.equal(f, g[order]) for f, g in zip(full.views, again.views))


def test_views_are_encoded_as_they_are_made_never_a_whole_shard_at_once(images, tmp_path, monkeypatch):
    """k = 128 caches 512 views an image: a 256-image shard's pixels held at once (~100 GiB at 256 px) ran a GPU
    node out of host memory. Every encoded batch is made with at most one image's views and a batch waiting, and
    the tokens are those of one batch of every view."""
    vqvae = make_vqvae()
    reference, _ = open_token_cache(tmp_path / "reference", images, vqvae, spec=SPEC, shard_size=8)
    made, encoded = [0], []
    real_make_views, real_encode = token_cache.make_views, vqvae.img_to_idxBl

    def counted_views(*args, **kwargs):
        views = real_make_views(*args, **kwargs)
        made[0] += len(views)
        return views

    def recorded_encode(batch):
        encoded.append((made[0], len(batch)))
        return real_encode(batch)

    monkeypatch.setattr(token_cache, "make_views", counted_views)
    monkeypatch.setattr(vqvae, "img_to_idxBl", recorded_encode)
    streamed, _ = open_token_cache(tmp_path / "cache", images, vqvae, spec=SPEC, shard_size=8, batch_size=2)
    assert made[0] == 5 * SPEC.num_views and sum(rows for _, rows in encoded) == made[0]
    done = 0
    for views_made, rows in encoded:  # views made but not yet encoded: < one batch plus one image's views
        assert views_made - done <= 2 - 1 + SPEC.num_views
        done += rows
    assert all(torch.equal(a, b) for a, b in zip(reference.views, streamed.views))
