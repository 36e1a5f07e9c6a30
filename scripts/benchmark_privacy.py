"""Step time and peak memory of DP vs non-DP VAR adaptation, per method, per clipping mode, and vs augmentation
multiplicity k, measured side by side in one run (each configuration in its own fresh process).

Usage: python scripts/benchmark_privacy.py [--depth 6] [--batch-size 32] [--steps 6] [--out docs/benchmarks.md]
Model: VAR of the given depth (width 64*depth) for 64x64 images (VQVAE 16x downsampling, patch_nums 1..4, L=30
tokens, codebook 4096), random weights. A DP step is a fixed batch of ``batch-size`` examples (no Poisson draw, so
every configuration does the same work) in physical batches of ``batch-size`` rows (batch-size/k examples of k
views each): per-sample gradients (or ghost norms), clipping, noise, AdamW. Non-DP steps run all batch-size*k
views in one forward. Memory = peak resident set size of the configuration's process minus its size just before the first
step. Appends a dated Markdown section to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchmark_common
import psutil
import torch

from bench.schema import MethodConfig, PrivacyConfig
from trainables.methods import adapt
from trainables.models import build_var, build_vqvae
from trainables.privacy import make_private, private_step
from trainables.training import build_optimizer, view_losses

PATCH_NUMS, VOCAB, CLASSES = (1, 2, 3, 4), 4096, 10
MIB = 1024**2


def configurations() -> list[dict]:
    methods, modes = ("full", "lora", "ln_tuning"), ("hooks", "ghost", "bookkeeping")
    rows = [dict(method=m, dp=dp, k=1) for dp in (None, *modes) for m in methods]
    rows += [dict(method="lora", dp=dp, k=4) for dp in (None, "hooks", "bookkeeping")]
    rows += [dict(method=m, dp=dp, k=8) for m in methods for dp in (None, "hooks", "bookkeeping")]
    return rows


def run_one(config: dict, *, depth: int, batch_size: int, steps: int) -> dict:
    torch.manual_seed(0)
    vqvae = build_vqvae(
        vocab_size=VOCAB,
        z_channels=32,
        ch=32,
        patch_nums=PATCH_NUMS,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=1,
    ).eval()
    var = build_var(
        depth=depth,
        num_classes=CLASSES,
        patch_nums=PATCH_NUMS,
        vocab_size=VOCAB,
        z_channels=32,
        drop_path_rate=0.0,
        generator=torch.Generator().manual_seed(0),
    )
    adapt(var, MethodConfig(name=config["method"]), num_classes=CLASSES, seed=0)
    var.train()
    k = config["k"]
    label_N = torch.randint(0, CLASSES, (batch_size,))
    views = [torch.randint(0, VOCAB, (batch_size, k, pn * pn)) for pn in PATCH_NUMS]
    loss_fn = lambda part: view_losses(var, vqvae, label_N[part], [v[part] for v in views], class_dropout=0.1)  # noqa: E731
    optimizer = build_optimizer(var, lr=1e-4)
    step = (
        _dp_step(var, optimizer, config, batch_size=batch_size, loss_fn=loss_fn)
        if config["dp"]
        else _plain_step(var, optimizer, batch_size=batch_size, loss_fn=loss_fn)
    )
    rss_before = psutil.Process().memory_info().rss
    seconds = []
    for _ in range(steps + 1):  # the first step allocates optimiser state and per-sample buffers: not timed
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        **config,
        "rows_per_forward": batch_size if config["dp"] else batch_size * k,
        "step_s": statistics.median(seconds[1:]),
        "peak_over_start_mib": (peak - rss_before) / MIB,
    }


def _plain_step(var, optimizer, *, batch_size: int, loss_fn):
    def step():
        loss = loss_fn(torch.arange(batch_size)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _dp_step(var, optimizer, config: dict, *, batch_size: int, loss_fn):
    privacy = PrivacyConfig(
        target_epsilon=10.0,
        sampling_rate=0.25,
        max_grad_norm=0.5,
        augmentation_multiplicity=config["k"],
        physical_batch_rows=batch_size,
        clipping=config["dp"],
    )
    state = make_private(var, optimizer, privacy=privacy, dataset_size=4 * batch_size, planned_steps=1000)
    return lambda: private_step(state, torch.arange(batch_size), loss_fn)


def table(results: list[dict]) -> list[str]:
    base = {(r["method"], r["k"]): r for r in results if r["dp"] is None}
    lines = [
        "| method | DP clipping | k | rows per forward | step (s) | time vs non-DP, same k | peak memory over start (MiB) | memory vs non-DP, same k |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = base.get((r["method"], r["k"]), base[(r["method"], 1)])
        mode = "no DP" if r["dp"] is None else r["dp"]
        lines.append(
            f"| {r['method']} | {mode} | {r['k']} | {r['rows_per_forward']} | {r['step_s']:.3f} | {r['step_s'] / ref['step_s']:.2f}x | "
            f"{r['peak_over_start_mib']:.0f} | {r['peak_over_start_mib'] / max(ref['peak_over_start_mib'], 1):.2f}x |"
        )
    return lines


def summary(results: list[dict]) -> list[str]:
    by = {(r["method"], r["dp"], r["k"]): r for r in results}
    ratio = lambda a, b: by[a]["step_s"] / by[b]["step_s"]  # noqa: E731
    memory = lambda a, b: by[a]["peak_over_start_mib"] / by[b]["peak_over_start_mib"]  # noqa: E731
    lines = []
    for method, name in (
        ("lora", "DP-LoRA / LoRA"),
        ("full", "DP-full / full"),
        ("ln_tuning", "DP-LN-tuning / LN-tuning"),
    ):
        modes = ", ".join(
            f"{ratio((method, mode, 1), (method, None, 1)):.2f}x time, {memory((method, mode, 1), (method, None, 1)):.2f}x memory ({mode})"
            for mode in ("bookkeeping", "hooks", "ghost")
        )
        lines.append(f"- {name} at k=1: {modes}")
    for mode in ("bookkeeping", "hooks"):
        for k in (4, 8):
            lines.append(
                f"- DP-LoRA ({mode}) time(k={k}) / time(1) = {ratio(('lora', mode, k), ('lora', mode, 1)):.2f} (target <= {1.1 * k:.1f}); "
                f"non-DP LoRA on the same k views: {ratio(('lora', None, k), ('lora', None, 1)):.2f}"
            )
    lines.append(
        "- DP (bookkeeping) / non-DP at k=8: "
        + ", ".join(
            f"{m} {ratio((m, 'bookkeeping', 8), (m, None, 8)):.2f}x" for m in ("full", "lora", "ln_tuning")
        )
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(
            json.dumps(
                run_one(json.loads(args.one), depth=args.depth, batch_size=args.batch_size, steps=args.steps)
            )
        )
        return
    results = []
    for config in configurations():
        command = [
            sys.executable,
            __file__,
            "--one",
            json.dumps(config),
            "--depth",
            str(args.depth),
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    stamp, machine = benchmark_common.stamp(), benchmark_common.machine()
    section = [
        f"### DP vs non-DP step, VAR depth {args.depth}, 64x64 (L=30), batch {args.batch_size} ({stamp})",
        "",
        f"Machine: {machine}. Script: `python scripts/benchmark_privacy.py --depth {args.depth} --batch-size {args.batch_size} --steps {args.steps}` "
        f"(median of {args.steps} steps after one untimed step, each configuration in a fresh process).",
        "",
        *table(results),
        "",
        *summary(results),
        "",
    ]
    text = "\n".join(section)
    benchmark_common.publish(text, args.out)


if __name__ == "__main__":
    main()
