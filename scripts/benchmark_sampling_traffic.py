"""Memory traffic, FLOPs and kernels of one eager sampling call (VAR tokens and the VQVAE decode) as CUDA would run
it under bf16 autocast, counted exactly on a CPU; optionally beside another git revision's code.

Usage: python scripts/benchmark_sampling_traffic.py [--depth 16] [--batches 8,16] [--vqvae-channels 160]
                                                    [--versus REV] [--out docs/benchmarks.md]

What trials' evaluation runs (``var.sample``, eager, CFG 1.5, top-k 900, top-p 0.96): the official architectures
(256 px, 10 scales, codebook 4096; VAR-d16 is width 1024, 16 heads), random weights (seed 0), the forwards under CPU
bf16 autocast with CUDA autocast's rules replayed (``CudaAutocast``: its float32 norms, sums and upsampling), each
operation counted by ``Traffic`` (every operand read once, every result written once) and put on the H200
datasheet's roofline. The decode is counted apart on a latent of the same shape. Each configuration runs in its own
process. Bytes and FLOPs are affine in the batch, so two batch sizes give the cost per image and per call (the
roofline time nearly: a kernel's is the larger of its two times, and a small product may change sides between the
batches); the large-batch ceiling is 1 / (roofline seconds per image), an estimate that no eager run reaches
(kernels run below the roofline and each launch costs microseconds), not a measurement.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import benchmark_common
import torch
from benchmark_dp_memory import CudaAutocast, Traffic

from bench.schema import EvaluationConfig, MethodConfig
from trainables.methods import PEFT_METHODS, adapt

ROOT = Path(__file__).resolve().parent.parent
LISTED_MS_PER_IMAGE = 0.005  # operations listed: those above this in any code measured


def _counted(fn) -> dict:
    """``fn()`` under CPU bf16 autocast with CUDA's rules, counted: GB, TFLOP, kernels, roofline ms, by operation."""
    with torch.no_grad(), CudaAutocast(), Traffic() as traffic:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fn()
    return {
        "gb": traffic.bytes / 1e9,
        "tflop": traffic.flops / 1e12,
        "kernels": traffic.kernels,
        "roofline_ms": 1e3 * traffic.roofline_s,
        "by_op_ms": {name: ms for name, (_, _, ms) in traffic.by_op.items()},
    }


def measure(*, depth: int, batch: int, vqvae_channels: int, method: str = "base") -> dict:
    """One sampling call of ``batch`` images and one decode of its latent's shape, counted. ``method``: "base",
    the model as full fine-tuning trains it (every weight trainable); a peft method ("lora", "lora_mlp",
    "ln_tuning", ...), the VAR adapted as such a trial's is (the config's defaults, Oxford Flowers' 102 classes;
    a LoRA adapter's weights drawn non-zero, as after training; the weights a method leaves frozen are frozen)."""
    vqvae, var = benchmark_common.official_models(depth=depth, vqvae_channels=vqvae_channels)
    if method != "base":
        adapt(var, MethodConfig(name=method), num_classes=102, seed=0)
        with torch.no_grad():  # lora_B starts at zero: an adapter that adds nothing is no trained one
            for name, parameter in var.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=1e-3, generator=torch.Generator().manual_seed(1))
    var.eval()
    settings = dict(
        cfg=EvaluationConfig.guidance_scale, top_k=EvaluationConfig.top_k, top_p=EvaluationConfig.top_p
    )
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, var.num_classes, (batch,), generator=generator)
    # A first call of one image, under the same autocast: lazy buffers and the weights a model keeps in bf16 between
    # calls (a LoRA layer's merged weight, or its base's kept cast) are made outside the count, once per evaluation.
    with torch.no_grad(), CudaAutocast(), torch.autocast("cpu", dtype=torch.bfloat16):
        var.sample(labels[:1], vqvae=vqvae, generator=generator, **settings)
    full = var.patch_nums[-1]
    f_hat_BChw = torch.randn(batch, var.z_channels, full, full, generator=generator)
    call = _counted(lambda: var.sample(labels, vqvae=vqvae, generator=generator, **settings))
    decode = _counted(lambda: vqvae.fhat_to_img(f_hat_BChw))
    return {
        "depth": depth,
        "batch": batch,
        "vqvae_channels": vqvae_channels,
        "method": method,
        "call": call,
        "decode": decode,
    }


def run_in_process(*, depth: int, batch: int, vqvae_channels: int, method: str, code: Path) -> dict:
    """``measure`` in a fresh process importing ``trainables`` from ``code`` (a checkout's root)."""
    one = {"depth": depth, "batch": batch, "vqvae_channels": vqvae_channels, "method": method}
    return benchmark_common.run_child(__file__, one, code=code)


def per_image(small: dict, large: dict, part: str) -> dict:
    """The affine fit of ``part`` ("call", "decode" or "tokens") between two batch sizes: per image and per call."""
    a, b = _part(small, part), _part(large, part)
    images = large["batch"] - small["batch"]
    slope = {key: (b[key] - a[key]) / images for key in ("gb", "tflop", "roofline_ms")}
    fixed = {key: a[key] - slope[key] * small["batch"] for key in slope}
    return {"per_image": slope, "per_call": fixed, "kernels": b["kernels"]}


def _part(row: dict, part: str) -> dict:
    if part != "tokens":
        return row[part]
    return {key: row["call"][key] - row["decode"][key] for key in ("gb", "tflop", "kernels", "roofline_ms")}


def table(rows: list[dict]) -> list[str]:
    """Per code and part: the counts at each batch size, then per image and the large-batch ceiling."""
    head = "| code | part | " + " | ".join(f"batch {r} (GB / ms)" for r in _batches(rows))
    head += " | kernels per call | GB per image | ms per image | ms per call | ceiling (images/s) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for code in dict.fromkeys(r["code"] for r in rows):
        mine = sorted((r for r in rows if r["code"] == code), key=lambda r: r["batch"])
        for part in ("call", "tokens", "decode"):
            fit = per_image(mine[0], mine[-1], part)
            counts = " | ".join(
                f"{_part(r, part)['gb']:.1f} / {_part(r, part)['roofline_ms']:.2f}" for r in mine
            )
            ceiling = 1e3 / fit["per_image"]["roofline_ms"]
            lines.append(
                f"| {code} | {part} | {counts} | {fit['kernels']} | {fit['per_image']['gb']:.2f} | "
                f"{fit['per_image']['roofline_ms']:.3f} | {fit['per_call']['roofline_ms']:.2f} | {ceiling:.0f} |"
            )
    return lines


def operations(rows: list[dict]) -> list[str]:
    """Each operation's roofline ms per image (the slope between the extreme batch sizes), side by side per code:
    every operation above ``LISTED_MS_PER_IMAGE`` in any code, costliest (in the last code) first."""
    codes = list(dict.fromkeys(r["code"] for r in rows))
    slopes = {}
    for code in codes:
        mine = sorted((r for r in rows if r["code"] == code), key=lambda r: r["batch"])
        small, large = mine[0]["call"]["by_op_ms"], mine[-1]["call"]["by_op_ms"]
        images = mine[-1]["batch"] - mine[0]["batch"]
        slopes[code] = {name: (ms - small.get(name, 0.0)) / images for name, ms in large.items()}
    names = {
        name for per_code in slopes.values() for name, ms in per_code.items() if ms > LISTED_MS_PER_IMAGE
    }
    head = "| operation | " + " | ".join(codes) + " |"
    lines = [head, "|" + "---|" * (len(codes) + 1)]
    for name in sorted(names, key=lambda n: -slopes[codes[-1]].get(n, 0.0)):
        lines.append(f"| {name} | " + " | ".join(f"{slopes[c].get(name, 0.0):.3f}" for c in codes) + " |")
    return lines


def _batches(rows: list[dict]) -> list[int]:
    return sorted({r["batch"] for r in rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument(
        "--batches", default="8,16", help="two or more batch sizes (the fit takes the extremes)"
    )
    parser.add_argument("--vqvae-channels", type=int, default=160, help="160: the official VQVAE's")
    parser.add_argument(
        "--method",
        choices=("base", *PEFT_METHODS),
        default="base",
        help="base: every weight trainable (full fine-tuning's model); a peft method: such a trial's model",
    )
    benchmark_common.add_revision_arguments(parser)
    args = parser.parse_args()
    if args.one:
        benchmark_common.check_imported_from(args.expect)
        print(json.dumps(measure(**json.loads(args.one))))
        return
    batches = sorted({int(b) for b in args.batches.split(",")})
    if len(batches) < 2:
        parser.error("--batches needs two batch sizes: the cost per image is the slope between them")
    rows = []
    with benchmark_common.revision_checkout(args.versus, "sampling-traffic") as versus:
        codes = ({args.versus: versus} if versus else {}) | {"this tree": ROOT}
        for name, code in codes.items():
            for batch in batches:
                shape = dict(
                    depth=args.depth, batch=batch, vqvae_channels=args.vqvae_channels, method=args.method
                )
                rows.append({**run_in_process(**shape, code=code), "code": name})
                print(
                    json.dumps({k: v for k, v in rows[-1].items() if k not in ("call", "decode")}), flush=True
                )
    command = f"python scripts/benchmark_sampling_traffic.py --depth {args.depth} --batches {args.batches}"
    command += f" --vqvae-channels {args.vqvae_channels} --method {args.method}" + (
        f" --versus {args.versus}" if args.versus else ""
    )
    section = [
        f"### Eager sampling counted as CUDA runs it: VAR-d{args.depth} ({args.method}), VQVAE "
        f"{args.vqvae_channels} channels "
        f"({benchmark_common.stamp()})",
        "",
        f"Machine: {benchmark_common.machine()}. Script: `{command}`. Parts: the whole call, the decode (counted "
        "apart) and the tokens (the call less the decode). GB and ms (the H200 roofline) at each batch size; per "
        "image and per call from the two; the ceiling is 1 / (ms per image), an estimate, not a measurement.",
        "",
        *table(rows),
        "",
        "Per operation, roofline ms per image:",
        "",
        *operations(rows),
        "",
    ]
    benchmark_common.publish("\n".join(section), args.out)


if __name__ == "__main__":
    main()
