"""Time and peak memory of one real-size VAR training step (teacher forcing, backward, AdamW) on this machine.

Usage: python scripts/benchmark_models.py [--depth 16] [--batch-size 1] [--repeats 3] [--out docs/benchmarks.md]
Builds VAR-d{depth} (1000 classes, official layout, random weights: timing does not depend on the values) and the
official-size VQVAE's quantiser for the teacher-forcing input. Memory is the process's resident set size: before
the first step (model + VQVAE resident) and the peak over the whole run (which includes gradients and the two
AdamW moments created by the first step). Appends a dated section to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import torch

from trainables.models import OFFICIAL_PATCH_NUMS, build_var, build_vqvae, count_parameters
from trainables.training import build_optimizer, var_training_step

GIB = 1024**3


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure(*, depth: int, batch_size: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    vqvae = build_vqvae(
        vocab_size=4096, z_channels=32, ch=160, patch_nums=OFFICIAL_PATCH_NUMS, device=device
    ).eval()
    var = build_var(
        depth=depth,
        num_classes=1000,
        patch_nums=OFFICIAL_PATCH_NUMS,
        vocab_size=4096,
        z_channels=32,
        device=device,
    )
    optimizer = build_optimizer(var, lr=1e-4)
    idx_Bl = [torch.randint(0, 4096, (batch_size, pn * pn), device=device) for pn in OFFICIAL_PATCH_NUMS]
    labels_B = torch.randint(0, 1000, (batch_size,), device=device)
    rss_before = psutil.Process().memory_info().rss
    seconds = []
    for _ in range(repeats + 1):  # the first step also allocates the AdamW state: timed separately
        started = time.perf_counter()
        var_training_step(var, vqvae, optimizer, labels_B, idx_Bl)
        seconds.append(time.perf_counter() - started)
    return {
        "depth": depth,
        "params": count_parameters(var),
        "batch_size": batch_size,
        "tokens_per_example": var.seq_len,
        "first_step_s": seconds[0],
        "step_s_median": statistics.median(seconds[1:]),
        "step_s_all": seconds[1:],
        "rss_before_first_step_gib": rss_before / GIB,
        "peak_rss_gib": peak_rss_bytes() / GIB,
        "threads": torch.get_num_threads(),
        "device": device,
    }


def report(result: dict) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / GIB:.0f} GiB"
    return "\n".join(
        [
            f"### VAR-d{result['depth']} training step, batch {result['batch_size']}, {result['device'].upper()} fp32 ({stamp})",
            "",
            f"Machine: {machine}; torch {torch.__version__}, {result['threads']} threads. "
            f"Script: `python scripts/benchmark_models.py --depth {result['depth']} --batch-size {result['batch_size']}`.",
            f"One step = class dropout + teacher-forcing input from the quantiser + forward over {result['tokens_per_example']} tokens "
            "+ token-mean cross-entropy + backward + grad clipping + AdamW.",
            "",
            "| quantity | value |",
            "|---|---|",
            f"| VAR parameters | {result['params']:,} |",
            f"| first step (allocates AdamW state) | {result['first_step_s']:.2f} s |",
            f"| step time, median of {len(result['step_s_all'])} | {result['step_s_median']:.2f} s |",
            f"| all timed steps | {', '.join(f'{s:.2f}' for s in result['step_s_all'])} s |",
            f"| resident memory before the first step (VAR + VQVAE) | {result['rss_before_first_step_gib']:.2f} GiB |",
            f"| peak resident memory (weights, grads, AdamW moments, activations) | {result['peak_rss_gib']:.2f} GiB |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file to append the result to")
    args = parser.parse_args()
    text = report(
        measure(depth=args.depth, batch_size=args.batch_size, repeats=args.repeats, device=args.device)
    )
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
