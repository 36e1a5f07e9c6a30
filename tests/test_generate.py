"""Generation for evaluation: per-class plans, distinct randomness per batch, resumable lossless output."""
from __future__ import annotations

import pytest
import torch

from test_datasets import make_folder
from trainables.data.datasets import read_dataset
from trainables.evaluation.generate import SamplingSettings, generate, generation_plan, image_path, read_generated

SETTINGS = SamplingSettings(cfg=1.0, top_k=0, top_p=0.0, batch_size=3, seed=4)


def test_plan_follows_the_split_counts_in_class_index_order(tmp_path):
    make_folder(tmp_path)  # test split: class "10" (index 0) has 2 images, class "2" (index 1) has 1
    test = read_dataset("folder", tmp_path, "test")
    assert generation_plan(list(test.class_counts.values())) == [2, 1]
    assert generation_plan([2, 1], total=7) == [5, 2] and sum(generation_plan([3, 3, 1], total=10)) == 10
    with pytest.raises(ValueError):
        generation_plan([0, 0])


def test_batches_draw_distinct_randomness_and_counts_per_class(tiny_var, tiny_vqvae):
    images, labels = generate(tiny_var, tiny_vqvae, [4, 0, 2, 0, 1], settings=SETTINGS)
    assert labels.tolist() == [0, 0, 0, 0, 2, 2, 4] and images.shape == (7, 3, 16, 16) and images.dtype == torch.uint8
    # images 0-2 (batch 0) and image 3 (batch 1) are all class 0: no two may repeat
    assert len({tuple(images[i].flatten().tolist()) for i in range(4)}) == 4
    again, _ = generate(tiny_var, tiny_vqvae, [4, 0, 2, 0, 1], settings=SETTINGS)
    assert torch.equal(images, again)  # deterministic in (seed, batch index)


def test_png_output_is_lossless_and_resumes(tiny_var, tiny_vqvae, tmp_path):
    plan = [4, 0, 2, 0, 1]
    in_memory, _ = generate(tiny_var, tiny_vqvae, plan, settings=SETTINGS)
    assert generate(tiny_var, tiny_vqvae, plan, settings=SETTINGS, out_dir=tmp_path)[0] is None
    written, labels = read_generated(tmp_path, plan)
    assert torch.equal(written, in_memory) and labels.tolist() == [0, 0, 0, 0, 2, 2, 4]
    survivor = image_path(tmp_path, 0, 0)
    before = survivor.stat().st_mtime_ns
    image_path(tmp_path, 2, 4).unlink()  # an interrupted run: batch 1 (images 3-5) lost one file
    with pytest.raises(FileNotFoundError, match="1 generated images missing"):
        read_generated(tmp_path, plan)
    generate(tiny_var, tiny_vqvae, plan, settings=SETTINGS, out_dir=tmp_path)
    assert survivor.stat().st_mtime_ns == before  # batch 0 was complete and not regenerated
    assert torch.equal(read_generated(tmp_path, plan)[0], in_memory)
