"""Generation for evaluation: per-class plans, distinct randomness per batch, resumable lossless output."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import random
from fractions import Fraction

import pytest
import torch
from conftest import TINY_VAR
from test_datasets import make_folder

from bench.errors import VarsweepError
from bench.schema import SUBSTITUTE_EXTRACTOR, EvaluationConfig
from trainables.data.datasets import read_dataset
from trainables.evaluation import generate as generate_module
from trainables.evaluation.generate import (
    MANIFEST,
    PngWriter,
    _read_png,
    generate,
    generation_plan,
    image_path,
    read_generated,
    weights_fingerprint,
)
from trainables.models import build_var
from trainables.progress import Progress

SETTINGS = EvaluationConfig(
    extractor=SUBSTITUTE_EXTRACTOR, guidance_scale=1.0, top_k=0, top_p=0.0, batch_size=3, sampling_seed=4
)


def test_plan_follows_the_split_counts_in_class_index_order(tmp_path):
    make_folder(tmp_path)  # test split: class "10" (index 0) has 2 images, class "2" (index 1) has 1
    test = read_dataset("folder", tmp_path, "test")
    assert generation_plan(list(test.class_counts.values())) == [2, 1]
    assert generation_plan([2, 1], total=7) == [5, 2] and sum(generation_plan([3, 3, 1], total=10)) == 10
    with pytest.raises(ValueError):
        generation_plan([0, 0])


def test_plan_remainders_are_exact_and_ties_go_to_the_lower_class_index():
    """Classes 4 and 5 have equal remainders (576 * 7 and 576 * 50 leave 76 over 172), which floats ranked 5 first."""
    plan = generation_plan([2, 0, 101, 2, 7, 50, 3, 7, 0], total=576)
    assert plan[4] == 24 and plan[5] == 167 and sum(plan) == 576

    def largest_remainders(counts: list[int], total: int) -> list[int]:  # in exact fractions
        exact = [Fraction(total * c, sum(counts)) for c in counts]
        plan = [int(x) for x in exact]
        for i in sorted(range(len(counts)), key=lambda i: (-(exact[i] - plan[i]), i))[: total - sum(plan)]:
            plan[i] += 1
        return plan

    draw = random.Random(0)
    for _ in range(300):
        counts = [draw.choice([0, 1, 2, 3, 7, 50, 101]) for _ in range(draw.randint(1, 12))]
        counts[0] += 1  # a positive sum
        total = draw.randint(1, 3000)
        assert generation_plan(counts, total=total) == largest_remainders(counts, total), (counts, total)


def test_decoded_bf16_images_become_pixels_in_float32(tiny_var, tiny_vqvae, monkeypatch):
    """Under bf16 autocast the decoder returns bf16 (kept: the GENERATED_FORMAT comment says why); mapping [-1, 1]
    to [0, 1] in bf16 moved about a third of the uint8 pixels one level. CPU bf16 autocast stands in for CUDA's."""

    def cpu_autocast(device, *, enabled=True):
        return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()

    monkeypatch.setattr(generate_module, "bf16_autocast", cpu_autocast)
    decoded, decode = [], tiny_vqvae.fhat_to_img

    def spy(f_hat):
        decoded.append(decode(f_hat))
        return decoded[-1]

    monkeypatch.setattr(tiny_vqvae, "fhat_to_img", spy)
    images, _ = generate(tiny_var, tiny_vqvae, [4, 0, 2, 0, 1], evaluation=SETTINGS, autocast_bf16=True)
    assert {d.dtype for d in decoded} == {torch.bfloat16}  # the stand-in does run the decoder in bf16
    in_float32 = torch.cat([d.float().add(1).mul(0.5) for d in decoded])
    assert torch.equal(images, in_float32.clamp(0, 1).mul(255).round().to(torch.uint8))


def test_batches_draw_distinct_randomness_and_counts_per_class(tiny_var, tiny_vqvae):
    images, labels = generate(tiny_var, tiny_vqvae, [4, 0, 2, 0, 1], evaluation=SETTINGS, autocast_bf16=True)
    assert (
        labels.tolist() == [0, 0, 0, 0, 2, 2, 4]
        and images.shape == (7, 3, 16, 16)
        and images.dtype == torch.uint8
    )
    # images 0-2 (batch 0) and image 3 (batch 1) are all class 0: no two may repeat
    assert len({tuple(images[i].flatten().tolist()) for i in range(4)}) == 4
    again, _ = generate(tiny_var, tiny_vqvae, [4, 0, 2, 0, 1], evaluation=SETTINGS, autocast_bf16=True)
    assert torch.equal(images, again)  # deterministic in (seed, batch index)


def test_png_output_is_lossless_and_resumes(tiny_var, tiny_vqvae, tmp_path):
    plan = [4, 0, 2, 0, 1]
    in_memory, _ = generate(tiny_var, tiny_vqvae, plan, evaluation=SETTINGS, autocast_bf16=True)
    returned, _ = generate(
        tiny_var, tiny_vqvae, plan, evaluation=SETTINGS, autocast_bf16=True, out_dir=tmp_path
    )
    written, labels = read_generated(tmp_path, plan)  # every file is written when generate returns
    assert torch.equal(written, in_memory) and torch.equal(returned, in_memory)
    assert labels.tolist() == [0, 0, 0, 0, 2, 2, 4]
    survivor = image_path(tmp_path, 0, 0)
    before = survivor.stat().st_mtime_ns
    image_path(tmp_path, 2, 4).unlink()  # an interrupted run: batch 1 (images 3-5) lost one file
    with pytest.raises(FileNotFoundError, match="1 generated images missing"):
        read_generated(tmp_path, plan)
    resumed, _ = generate(
        tiny_var, tiny_vqvae, plan, evaluation=SETTINGS, autocast_bf16=True, out_dir=tmp_path
    )
    assert survivor.stat().st_mtime_ns == before  # batch 0 was complete and not regenerated
    assert torch.equal(read_generated(tmp_path, plan)[0], in_memory) and torch.equal(resumed, in_memory)


def test_a_folder_of_another_plan_is_refused_and_kept(tiny_var, tiny_vqvae, tmp_path):
    """With batch size 3, plan [3, 3] draws its second batch as labels [1, 1, 1] and plan [3, 2] as [1, 1]: the
    files of images 3 and 4 exist for both, but [3, 2]'s are other draws. Its run is refused, nothing deleted."""
    generate(tiny_var, tiny_vqvae, [3, 3], evaluation=SETTINGS, autocast_bf16=True, out_dir=tmp_path)
    assert json.loads((tmp_path / MANIFEST).read_text())["plan"] == [3, 3]
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")}
    with pytest.raises(VarsweepError, match="another plan") as refused:  # GeneratedFolderError: a bad input
        generate(tiny_var, tiny_vqvae, [3, 2], evaluation=SETTINGS, autocast_bf16=True, out_dir=tmp_path)
    assert (
        str(tmp_path) in str(refused.value)
        and "[3, 3]" in str(refused.value)
        and "--out" in str(refused.value)
    )
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.png")} == written
    assert json.loads((tmp_path / MANIFEST).read_text())["plan"] == [3, 3]
    # In a folder of its own, the plan draws what it draws in memory (not [3, 3]'s images 3 and 4).
    fresh, _ = generate(tiny_var, tiny_vqvae, [3, 2], evaluation=SETTINGS, autocast_bf16=True)
    generate(
        tiny_var, tiny_vqvae, [3, 2], evaluation=SETTINGS, autocast_bf16=True, out_dir=tmp_path / "other"
    )
    assert torch.equal(read_generated(tmp_path / "other", [3, 2])[0], fresh)
    assert not torch.equal(read_generated(tmp_path, [3, 3])[0][3:5], fresh[3:5])
    # Images of another model are another model's, whatever their plan: cleared as before.
    other = build_var(**TINY_VAR, generator=torch.Generator().manual_seed(1)).eval()
    generate(other, tiny_vqvae, [3, 2], evaluation=SETTINGS, autocast_bf16=True, out_dir=tmp_path)
    assert torch.equal(
        read_generated(tmp_path, [3, 2])[0],
        generate(other, tiny_vqvae, [3, 2], evaluation=SETTINGS, autocast_bf16=True)[0],
    )
    assert not image_path(tmp_path, 1, 5).exists()


def test_an_unreadable_image_of_a_finished_batch_is_drawn_again_alone(tiny_var, tiny_vqvae, tmp_path):
    plan = [4, 0, 2, 0, 1]
    in_memory, _ = generate(
        tiny_var, tiny_vqvae, plan, evaluation=SETTINGS, autocast_bf16=True, out_dir=tmp_path
    )
    kept = image_path(tmp_path, 0, 0).stat().st_mtime_ns
    image_path(tmp_path, 2, 5).write_bytes(b"not a png")  # batch 1 (images 3-5)
    messages = []
    progress = Progress("evaluation", "generated image", 7, log=messages.append)
    again, _ = generate(
        tiny_var,
        tiny_vqvae,
        plan,
        evaluation=SETTINGS,
        autocast_bf16=True,
        out_dir=tmp_path,
        progress=progress,
    )
    assert torch.equal(again, in_memory) and torch.equal(read_generated(tmp_path, plan)[0], in_memory)
    assert image_path(tmp_path, 0, 0).stat().st_mtime_ns == kept
    assert any("drawing a batch again" in m and "000005.png" in m for m in messages)


def test_a_failed_write_is_raised_not_lost(tiny_var, tiny_vqvae, tmp_path):
    plan = [4, 0, 2, 0, 1]
    generate(tiny_var, tiny_vqvae, plan, evaluation=SETTINGS, autocast_bf16=True, out_dir=tmp_path)
    for png in (tmp_path / "class_0004").iterdir():
        png.unlink()
    (tmp_path / "class_0004").rmdir()
    (tmp_path / "class_0004").write_text("a file where the class folder goes")
    with pytest.raises(OSError):
        generate(tiny_var, tiny_vqvae, plan, evaluation=SETTINGS, autocast_bf16=True, out_dir=tmp_path)


def test_the_writer_keeps_at_most_its_batches_in_flight_and_finishes_them_all(tmp_path):
    images_N3HW = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    with PngWriter(threads=2, in_flight=3) as writer:
        for b in range(10):
            writer.submit([tmp_path / f"{b}_{i}.png" for i in range(2)], images_N3HW)
            assert len(writer.pending) <= 3
    assert all(
        torch.equal(_read_png(tmp_path / f"{b}_{i}.png"), images_N3HW[i]) for b in range(10) for i in range(2)
    )


def test_a_new_model_never_inherits_an_earlier_models_images(tiny_var, tiny_vqvae, tmp_path):
    """A retried trial evaluates into the folder where an earlier attempt's model stopped after two of three
    batches: every image must then come from the new model (as a fresh generation of it), none from the old."""
    plan = [4, 0, 2, 0, 1]
    generate(tiny_var, tiny_vqvae, plan, evaluation=SETTINGS, autocast_bf16=True, out_dir=tmp_path)
    image_path(tmp_path, 4, 6).unlink()  # the earlier attempt was interrupted in its last batch
    other = build_var(**TINY_VAR, generator=torch.Generator().manual_seed(1)).eval()
    fresh, _ = generate(other, tiny_vqvae, plan, evaluation=SETTINGS, autocast_bf16=True)
    assert not torch.equal(
        fresh[:3], generate(tiny_var, tiny_vqvae, plan, evaluation=SETTINGS, autocast_bf16=True)[0][:3]
    )  # the models differ
    generate(other, tiny_vqvae, plan, evaluation=SETTINGS, autocast_bf16=True, out_dir=tmp_path)
    assert torch.equal(read_generated(tmp_path, plan)[0], fresh)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert (
        manifest["weights_sha256"] == weights_fingerprint(other, tiny_vqvae)
        and manifest["sampling"]["sampling_seed"] == SETTINGS.sampling_seed
    )
    # Other sampling settings are another set of images too; the same model and settings resume (batch 0 kept).
    reseeded = dataclasses.replace(SETTINGS, sampling_seed=5)
    generate(other, tiny_vqvae, plan, evaluation=reseeded, autocast_bf16=True, out_dir=tmp_path)
    assert torch.equal(
        read_generated(tmp_path, plan)[0],
        generate(other, tiny_vqvae, plan, evaluation=reseeded, autocast_bf16=True)[0],
    )
    kept = image_path(tmp_path, 0, 0).stat().st_mtime_ns
    image_path(tmp_path, 4, 6).unlink()
    generate(other, tiny_vqvae, plan, evaluation=reseeded, autocast_bf16=True, out_dir=tmp_path)
    assert image_path(tmp_path, 0, 0).stat().st_mtime_ns == kept and image_path(tmp_path, 4, 6).is_file()


def test_images_without_a_manifest_are_not_trusted(tiny_var, tiny_vqvae, tmp_path):
    """PNGs of unknown origin (e.g. written before manifests existed) are regenerated, not scored."""
    plan = [4, 0, 2, 0, 1]
    other = build_var(**TINY_VAR, generator=torch.Generator().manual_seed(1)).eval()
    generate(other, tiny_vqvae, plan, evaluation=SETTINGS, autocast_bf16=True, out_dir=tmp_path)
    (tmp_path / MANIFEST).unlink()
    generate(tiny_var, tiny_vqvae, plan, evaluation=SETTINGS, autocast_bf16=True, out_dir=tmp_path)
    assert torch.equal(
        read_generated(tmp_path, plan)[0],
        generate(tiny_var, tiny_vqvae, plan, evaluation=SETTINGS, autocast_bf16=True)[0],
    )


def test_weights_fingerprint_follows_every_weight_and_buffer(tiny_var, tiny_vqvae):
    same = copy.deepcopy(tiny_var)
    assert weights_fingerprint(same, tiny_vqvae) == weights_fingerprint(tiny_var, tiny_vqvae)
    with torch.no_grad():
        next(same.parameters()).view(-1)[0] += 1e-6
    assert weights_fingerprint(same, tiny_vqvae) != weights_fingerprint(tiny_var, tiny_vqvae)
    vqvae = copy.deepcopy(tiny_vqvae)
    name, buffer = next((n, b) for n, b in vqvae.named_buffers() if b.is_floating_point() and b.numel())
    buffer.view(-1)[0] += 1.0
    assert weights_fingerprint(tiny_var, vqvae) != weights_fingerprint(tiny_var, tiny_vqvae), name
