"""GPU figures at real VAR-d16 size, measured side by side in one run.

Usage: python scripts/benchmark_gpu.py [--device cuda] [--depth 16] [--batch-size 16] [--steps 10]
                                      [--json results.json] [--out docs/benchmarks.md] [--skip-trial]
Models: the official VAR-d16 and VQVAE architectures (256x256, 10 scales, L=680 tokens, codebook 4096), random
weights. Every section is timed as the median of ``--steps`` steps after two untimed ones, with CUDA synchronised.
1. Training step (AdamW) for LoRA and full fine-tuning, bf16 autocast vs float32, with the VQVAE encoding the crop
   on the fly every step (the published pipeline) vs token maps read from the token cache; peak GPU memory; MFU
   = FLOPs counted by PyTorch's FLOP counter / step time / the device's dense bf16 peak.
2. DP-SGD step of LoRA (book-keeping and Opacus hooks clipping) for k = 1 and 4 views per example, vs the non-DP
   step on the same views; bf16 autocast.
3. Generation (CFG 1.5, top-k 900, top-p 0.96): images/s, bf16 autocast vs float32.
4. End to end (unless --skip-trial): ``run_trial`` of the demo sweep's LoRA and DP-LoRA trials on this device,
   with their recorded cost (MFU, training precision, peak memory).
Each finished section is written to ``--json`` at once, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import benchmark_common
import torch
from benchmark_common import official_models, timed

from bench.schema import EvaluationConfig, MethodConfig, PrivacyConfig
from trainables.data.tokens import TokenViews
from trainables.methods import adapt
from trainables.models import OFFICIAL_PATCH_NUMS
from trainables.privacy import make_private, private_step
from trainables.profiling import count_flops, peak_flops_per_second
from trainables.training import bf16_autocast, build_optimizer, view_losses

CLASSES, GIB = 102, 1024**3


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def models(*, depth: int, method: str, device: torch.device):
    vqvae, var = official_models(depth=depth)
    vqvae = vqvae.to(device)
    if method != "base":  # "base": the un-adapted model (generation)
        adapt(var, MethodConfig(name=method), num_classes=CLASSES, seed=0)
        var.train()
    return vqvae, var.to(device)


def training(*, depth: int, batch_size: int, steps: int, device: torch.device) -> list[dict]:
    """Section 1: one row per (method, precision, token source)."""
    images_B3HW = torch.rand(batch_size, 3, 256, 256, device=device) * 2 - 1
    labels_B = torch.randint(0, CLASSES, (batch_size,), device=device)
    return [
        row
        for method in ("lora", "full")
        for row in _method_rows(method, images_B3HW, labels_B, depth=depth, steps=steps, device=device)
    ]


def _method_rows(
    method: str,
    images_B3HW: torch.Tensor,
    labels_B: torch.Tensor,
    *,
    depth: int,
    steps: int,
    device: torch.device,
) -> list[dict]:
    # One function per model, so its weights and optimiser state are freed before the next model is built.
    rows, peak, batch_size = [], peak_flops_per_second(device), len(labels_B)
    vqvae, var = models(depth=depth, method=method, device=device)
    optimizer = build_optimizer(var, lr=1e-4)
    with torch.no_grad():
        cached = TokenViews(labels_B.cpu(), tuple(t[:, None].cpu() for t in vqvae.img_to_idxBl(images_B3HW)))
    for bf16 in (True, False):

        def step(idx_views) -> None:
            with bf16_autocast(device, enabled=bf16):  # noqa: B023
                loss = view_losses(var, vqvae, labels_B, idx_views, class_dropout=0.1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def on_the_fly() -> None:
            with torch.no_grad():  # tokens are computed in float32, as the cache computes them
                idx = vqvae.img_to_idxBl(images_B3HW)
            step([t[:, None] for t in idx])

        def from_cache() -> None:
            step(
                cached.take(
                    torch.arange(batch_size), k=1, generator=torch.Generator().manual_seed(0), device=device
                )[1]
            )

        flops, _ = count_flops(from_cache)
        for source, fn in (("on the fly", on_the_fly), ("token cache", from_cache)):
            reset_peak(device)
            seconds = timed(fn, steps=steps, warmup=2, device=device)
            rows.append(
                {
                    "method": method,
                    "precision": "bf16 autocast" if bf16 else "float32",
                    "tokens": source,
                    "step_s": seconds,
                    "images_per_s": batch_size / seconds,
                    "peak_gib": peak_gib(device),
                    "var_flops": flops,
                    "mfu": flops / seconds / peak if peak else None,
                }
            )
    return rows


def privacy(*, depth: int, batch_size: int, steps: int, device: torch.device) -> list[dict]:
    """Section 2: DP-LoRA vs LoRA on ``batch_size`` rows (``batch_size / k`` examples of k views), bf16 autocast."""
    return [
        _privacy_row(k, clipping, rows=batch_size, depth=depth, steps=steps, device=device)
        for k in (1, 4)
        for clipping in (None, "bookkeeping", "hooks")
    ]


def _privacy_row(
    k: int, clipping: str | None, *, rows: int, depth: int, steps: int, device: torch.device
) -> dict:
    examples = rows // k
    vqvae, var = models(depth=depth, method="lora", device=device)
    optimizer = build_optimizer(var, lr=1e-4)
    label_N = torch.randint(0, CLASSES, (examples,), device=device)
    views = [torch.randint(0, 4096, (examples, k, pn * pn), device=device) for pn in OFFICIAL_PATCH_NUMS]

    def loss_fn(part: torch.Tensor) -> torch.Tensor:
        with bf16_autocast(device):
            return view_losses(var, vqvae, label_N[part], [v[part] for v in views], class_dropout=0.1)

    def plain_step() -> None:
        loss = loss_fn(torch.arange(examples, device=device)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step = plain_step
    if clipping is not None:
        privacy = PrivacyConfig(
            target_epsilon=10.0,
            sampling_rate=0.25,
            max_grad_norm=0.5,
            augmentation_multiplicity=k,
            physical_batch_rows=rows,
            clipping=clipping,
        )
        state = make_private(var, optimizer, privacy=privacy, dataset_size=4 * examples, planned_steps=10_000)
        step = lambda: private_step(state, torch.arange(examples, device=device), loss_fn)  # noqa: E731
    reset_peak(device)
    seconds = timed(step, steps=steps, warmup=2, device=device)
    return {
        "k": k,
        "examples": examples,
        "clipping": clipping or "no DP",
        "step_s": seconds,
        "peak_gib": peak_gib(device),
    }


def generation(*, depth: int, batch_sizes: tuple[int, ...], device: torch.device) -> list[dict]:
    """Section 3: sampling throughput."""
    vqvae, var = models(depth=depth, method="base", device=device)
    var.eval()
    rows = []
    for batch_size in batch_sizes:
        labels = torch.randint(0, CLASSES, (batch_size,), device=device)
        for bf16 in (True, False):

            def run() -> None:
                with torch.no_grad(), bf16_autocast(device, enabled=bf16):  # noqa: B023
                    var.sample(
                        labels,  # noqa: B023
                        vqvae=vqvae,
                        cfg=EvaluationConfig.guidance_scale,
                        top_k=EvaluationConfig.top_k,
                        top_p=EvaluationConfig.top_p,
                        generator=torch.Generator(device=device).manual_seed(0),
                    )

            reset_peak(device)
            seconds = timed(run, steps=3, warmup=2, device=device)
            rows.append(
                {
                    "batch_size": batch_size,
                    "precision": "bf16 autocast" if bf16 else "float32",
                    "batch_s": seconds,
                    "images_per_s": batch_size / seconds,
                    "peak_gib": peak_gib(device),
                }
            )
    return rows


def end_to_end(*, device: torch.device, smoke: bool) -> list[dict]:
    """Section 4: the demo's LoRA and DP-LoRA trials through ``run_trial`` on this device (``smoke``: their
    few-step versions, to check this script)."""
    from bench.sweeps import build_sweep
    from trainables.trial import run_trial

    configs = [c for c in build_sweep("demo", smoke=smoke) if c.method.name == "lora"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for config in configs:
            started = time.perf_counter()
            result = run_trial(
                config,
                cache_dir=Path(folder) / "cache",
                artifacts_dir=Path(folder) / "artifacts" / config.trial_id,
                device=device,
            )
            cost = result["cost"]
            rows.append(
                {
                    "trial": config.label,
                    "status": result["status"],
                    "error": result.get("error"),
                    "wall_s": time.perf_counter() - started,
                    "fid": result["metrics"].get("fid"),
                    "train_seconds": cost.get("train_seconds"),
                    "mfu": cost.get("mfu"),
                    "training_precision": cost.get("training_precision"),
                    "peak_gib": (cost.get("peak_memory_bytes") or 0) / GIB,
                    "rows_per_second": cost.get("rows_per_second"),
                }
            )
    return rows


def report(results: dict, *, args: argparse.Namespace) -> str:
    lines = [
        f"### VAR-d{args.depth} on {results['device']} ({benchmark_common.stamp()})",
        "",
        f"torch {torch.__version__}. Script: `python scripts/benchmark_gpu.py --depth {args.depth} --batch-size {args.batch_size} "
        f"--steps {args.steps}`. MFU against the dense bf16 peak ({results['peak_tflops']} TFLOP/s).",
        "",
    ]
    if "training" in results:
        lines += [
            f"Training step, batch {args.batch_size} at 256x256:",
            "",
            "| method | precision | tokens | step (ms) | images/s | peak GiB | MFU |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['method']} | {r['precision']} | {r['tokens']} | {1e3 * r['step_s']:.1f} | {r['images_per_s']:.1f} | "
            f"{_gib(r['peak_gib'])} | {_pct(r['mfu'])} |"
            for r in results["training"]
        ]
        lines += ["", *_speedups(results["training"]), ""]
    if "privacy" in results:
        base = {r["k"]: r["step_s"] for r in results["privacy"] if r["clipping"] == "no DP"}
        lines += [
            f"DP-LoRA step, {args.batch_size} rows (examples x k views), bf16 autocast:",
            "",
            "| k | examples | clipping | step (ms) | vs non-DP, same views | peak GiB |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['k']} | {r['examples']} | {r['clipping']} | {1e3 * r['step_s']:.1f} | {r['step_s'] / base[r['k']]:.2f}x | {_gib(r['peak_gib'])} |"
            for r in results["privacy"]
        ]
        lines.append("")
    if "generation" in results:
        lines += [
            "Generation (CFG 1.5, top-k 900, top-p 0.96):",
            "",
            "| batch | precision | s per batch | images/s | peak GiB |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['batch_size']} | {r['precision']} | {r['batch_s']:.2f} | {r['images_per_s']:.1f} | {_gib(r['peak_gib'])} |"
            for r in results["generation"]
        ]
        lines.append("")
    if "end_to_end" in results:
        lines += [
            "End to end, demo trials through `run_trial` on this device:",
            "",
            "| trial | status | wall (s) | training (s) | rows/s | precision | MFU | FID |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['trial']} | {r['status']} | {r['wall_s']:.0f} | {r['train_seconds'] or 0:.1f} | {r['rows_per_second'] or 0:.0f} | "
            f"{r['training_precision']} | {_pct(r['mfu'])} | {r['fid'] if r['fid'] is None else round(r['fid'], 2)} |"
            for r in results["end_to_end"]
        ]
        lines.append("")
    lines += [f"Section failed: {name}: {error}" for name, error in results.get("errors", {}).items()]
    return "\n".join(lines)


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _speedups(rows: list[dict]) -> list[str]:
    by = {(r["method"], r["precision"], r["tokens"]): r["step_s"] for r in rows}
    out = []
    for method in ("lora", "full"):
        for precision in ("bf16 autocast", "float32"):
            ratio = by[(method, precision, "on the fly")] / by[(method, precision, "token cache")]
            out.append(f"- token cache speed-up, {method}, {precision}: {ratio:.2f}x (target >= 1.2x)")
        out.append(
            f"- step time float32 / bf16 autocast, {method}, token cache: "
            f"{by[(method, 'float32', 'token cache')] / by[(method, 'bf16 autocast', 'token cache')]:.2f}x"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--generation-batches", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--skip-trial", action="store_true")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="few-step end-to-end trials, and allow a CPU device (to check the script)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda" and not args.smoke:
        sys.exit(
            "benchmark_gpu.py measures a CUDA device (--device cuda); --smoke runs it elsewhere to check it"
        )
    peak = peak_flops_per_second(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = {"device": name, "peak_tflops": None if peak is None else peak / 1e12, "errors": {}}
    sections = {
        "training": lambda: training(
            depth=args.depth, batch_size=args.batch_size, steps=args.steps, device=device
        ),
        "privacy": lambda: privacy(
            depth=args.depth, batch_size=args.batch_size, steps=args.steps, device=device
        ),
        "generation": lambda: generation(
            depth=args.depth, batch_sizes=tuple(args.generation_batches), device=device
        ),
        "end_to_end": lambda: end_to_end(device=device, smoke=args.smoke),
    }
    for name, section in sections.items():
        if name == "end_to_end" and args.skip_trial:
            continue
        started = time.perf_counter()
        try:
            results[name] = section()
        except Exception as error:  # a failed section is reported; the others still run
            traceback.print_exc()
            results["errors"][name] = f"{type(error).__name__}: {error}"
        print(f"[{name}] {time.perf_counter() - started:.0f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    benchmark_common.publish(report(results, args=args), args.out)


if __name__ == "__main__":
    main()
