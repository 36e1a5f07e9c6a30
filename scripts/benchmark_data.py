"""Token cache vs on-the-fly VQVAE encoding, reference-statistics reuse, and generation throughput, side by side.

Usage: python scripts/benchmark_data.py [--batch-size 2] [--steps 2] [--out docs/benchmarks.md]
1. Training step at real VAR-d16 size (official VAR-d16 and VQVAE architectures, random weights, 256x256, LoRA):
   on the fly = crop views are encoded by the VQVAE every step (the published pipeline), cached = the token maps
   come from the token cache; same VAR step otherwise. Median of ``--steps`` after one untimed step.
2. Reference statistics: evaluation of a 600-image real split with the substitute extractor, first trial (computes
   and caches) vs second trial (reads the cache).
3. Generation: images per second of VAR-d16 sampling (CFG 1.5, top-k 900, top-p 0.96) on this machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import benchmark_common
import torch
from benchmark_common import official_models, timed
from PIL import Image

from bench.schema import MethodConfig
from trainables.data import offline
from trainables.data.datasets import read_dataset
from trainables.data.tokens import TokenViews
from trainables.evaluation.evaluate import reference_statistics
from trainables.evaluation.features import SUBSTITUTE, build_extractor
from trainables.evaluation.metrics import ReferenceStats
from trainables.methods import adapt
from trainables.training import build_optimizer, view_losses


def training_steps(*, batch_size: int, steps: int) -> dict:
    vqvae, var = official_models()
    adapt(var, MethodConfig(name="lora"), num_classes=102, seed=0)
    var.train()
    optimizer = build_optimizer(var, lr=1e-4)
    images_B3HW = torch.rand(batch_size, 3, 256, 256) * 2 - 1
    labels_B = torch.randint(0, 102, (batch_size,))
    with torch.no_grad():
        cached = TokenViews(labels_B, tuple(t[:, None] for t in vqvae.img_to_idxBl(images_B3HW)))

    def step(idx_views) -> None:
        loss = view_losses(var, vqvae, labels_B, idx_views, class_dropout=0.1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def on_the_fly() -> None:
        with torch.no_grad():
            idx = vqvae.img_to_idxBl(images_B3HW)
        step([t[:, None] for t in idx])

    def from_cache() -> None:
        step(cached.take(torch.arange(batch_size), k=1, generator=torch.Generator().manual_seed(0))[1])

    fly, cache = timed(on_the_fly, steps=steps), timed(from_cache, steps=steps)
    return {"on_the_fly_s": fly, "cached_s": cache, "speedup": fly / cache}


def reference_reuse(folder: Path) -> dict:
    digits = offline.digits(split="train", image_size=64, seed=0)
    for i in range(600):
        path = folder / "test" / digits.class_names[int(digits.labels_N[i])] / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(digits.images_N3HW[i].permute(1, 2, 0).numpy()).save(path)
    images = read_dataset("folder", folder, "test")
    cache, extractor = ReferenceStats(folder / "cache"), build_extractor(SUBSTITUTE)
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        _, hit = reference_statistics(images, extractor=extractor, resolution=64, cache=cache)
        seconds.append(time.perf_counter() - started)
    return {"images": len(images), "first_s": seconds[0], "second_s": seconds[1], "second_hit": hit}


def generation(*, batch_size: int) -> dict:
    vqvae, var = official_models()
    var.eval()
    labels = torch.randint(0, 1000, (batch_size,))
    run = lambda: var.sample(  # noqa: E731
        labels, vqvae=vqvae, cfg=1.5, top_k=900, top_p=0.96, generator=torch.Generator().manual_seed(0)
    )
    seconds = timed(run, steps=1)
    return {"batch_size": batch_size, "seconds_per_batch": seconds, "images_per_second": batch_size / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    train = training_steps(batch_size=args.batch_size, steps=args.steps)
    with tempfile.TemporaryDirectory() as folder:
        reuse = reference_reuse(Path(folder))
    gen = generation(batch_size=args.batch_size)
    stamp, machine = benchmark_common.stamp(), benchmark_common.machine()
    text = "\n".join(
        [
            f"### Token cache, reference statistics, generation ({stamp})",
            "",
            f"Machine: {machine}. Script: `python scripts/benchmark_data.py --batch-size {args.batch_size} --steps {args.steps}`.",
            "",
            "| quantity | value |",
            "|---|---|",
            f"| VAR-d16 LoRA step, batch {args.batch_size} at 256x256, VQVAE encoding on the fly | {train['on_the_fly_s']:.2f} s |",
            f"| same step with tokens from the cache | {train['cached_s']:.2f} s |",
            f"| speed-up from the token cache (target >= 1.2x) | {train['speedup']:.2f}x |",
            f"| reference statistics of {reuse['images']} real images, first trial (compute + cache) | {reuse['first_s']:.2f} s |",
            f"| same, second trial (cache hit: {reuse['second_hit']}) | {reuse['second_s']:.3f} s |",
            f"| VAR-d16 generation, batch {gen['batch_size']} (CFG 1.5, top-k 900, top-p 0.96) | {gen['seconds_per_batch']:.2f} s per batch, {gen['images_per_second']:.3f} images/s |",
            "",
        ]
    )
    benchmark_common.publish(text, args.out)


if __name__ == "__main__":
    main()
