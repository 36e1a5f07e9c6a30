"""Generation, a training step or VQVAE encoding on CPU, side by side: the model code at a base commit, or the original VAR
code, against this working tree's.

Usage: python scripts/benchmark_cpu_side_by_side.py [--task generation] [--base a7366f3] [--depths 4,16]
    [--batch-size 2] [--threads 2] [--repeats 3]
       python scripts/benchmark_cpu_side_by_side.py --task training --base 14bb342 --depths 16
    [--kernel per_scale] [--precision bf16]
       python scripts/benchmark_cpu_side_by_side.py --original PATH [--task generation|training|encode] ...

Checks the base commit out into a temporary ``git worktree`` and, for every depth, runs one subprocess that loads
both versions of ``trainables.models`` (the base one under another package name) with the same weights (random,
official layout: 1000 classes, patch_nums 1..16, V 4096, Cvae 32, the official-size VQVAE) and times, alternating
base and ours call by call (one warm-up each, then the median of ``--repeats``) so background load hits both
alike, either
- generation: ``VAR.sample`` at CFG 1.5, top-k 900, top-p 0.96 (fp32; each call re-seeds its generator, and the
  images of both versions are compared: the same draws give the same images up to float rounding),
- training: the forward, token cross-entropy and backward of ``--batch-size`` random token maps (no optimizer;
  drop-path at the official rate, the same draws for both), the training attention kernel ``--kernel``, fp32 or
  bf16 autocast (``--precision``); the gradients of both versions are compared, and two further steps of each are
  counted with CUDA autocast's float32 norms replayed: op by op (bytes moved, kernels, an H200 roofline
  estimate) and tensor by tensor (the step's peak), or
- encode: the VQVAE's ``img_to_idxBl`` (the token cache's call) on ``--batch-size`` random 256-px images, fp32;
  the share of token indices that differ between the versions is reported.
Peak RSS comes from one further subprocess per version that builds the models and runs once. Prints a markdown
table.

``--original PATH`` puts the original VAR code in the base's place: PATH is a checkout of
github.com/FoundationVision/VAR (its ``models`` package and ``dist.py``; nothing of it is copied here), built as
its ``build_vae_var`` builds the official models on a machine without flash-attn or xformers (fp32 SDPA with the
float mask in training, SDPA over the KV cache in sampling), with our weights loaded into it (the layouts are
the same). Generation calls its ``autoregressive_infer_cfg`` with ``g_seed=0``, which draws what our sampler
draws from a generator seeded 0, so the images compare. Training runs both without drop-path and without class
dropout (the original draws them from torch's global generator in another order than ours), so the gradients
compare too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLING = dict(cfg=1.5, top_k=900, top_p=0.96)
ORIGINAL_FILES = ("dist.py", "models/__init__.py", "models/var.py", "models/vqvae.py", "models/basic_var.py")

WORKER = r"""
import importlib.util, json, resource, statistics, sys, time
import torch

mode, base_tree, depth, batch, threads, repeats = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
task, settings, original = sys.argv[7], json.loads(sys.argv[8]), sys.argv[9] == "original"
torch.set_num_threads(threads)


def load_base_models():
    folder = f"{base_tree}/trainables/models"
    spec = importlib.util.spec_from_file_location(
        "base_models", f"{folder}/__init__.py", submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["base_models"] = module
    spec.loader.exec_module(module)
    return module


def build(models):
    torch.manual_seed(0)
    vqvae = models.build_vqvae(
        vocab_size=4096, z_channels=32, ch=160, patch_nums=models.OFFICIAL_PATCH_NUMS
    ).eval()
    var = models.build_var(
        depth=depth, num_classes=1000, patch_nums=models.OFFICIAL_PATCH_NUMS, vocab_size=4096, z_channels=32,
        generator=torch.Generator().manual_seed(0), drop_path_rate=0.0 if original else None,
    ).eval()
    return var, vqvae


def build_original():  # the official models as the original code's build_vae_var makes them, minus flash-attn
    sys.path.insert(0, base_tree)  # its modules import each other as `models.*` and `dist`
    from models.var import VAR
    from models.vqvae import VQVAE
    torch.manual_seed(0)
    patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    vqvae = VQVAE(vocab_size=4096, z_channels=32, ch=160, test_mode=True, share_quant_resi=4, v_patch_nums=patch_nums)
    var = VAR(
        vae_local=vqvae, num_classes=1000, depth=depth, embed_dim=64 * depth, num_heads=depth,
        drop_path_rate=0.0 if task == "training" else 0.1 * depth / 24, norm_eps=1e-6, shared_aln=False,
        cond_drop_rate=0.0, attn_l2_norm=True, patch_nums=patch_nums, flash_if_available=False,
        fused_if_available=False,
    ).eval()
    return var, vqvae


def build_base():
    return build_original() if original else build(load_base_models())


def generate(var, vqvae):
    labels = torch.arange(batch) * 7 % 1000
    with torch.no_grad():
        if hasattr(var, "autoregressive_infer_cfg"):  # the original code: g_seed seeds its own generator
            return var.autoregressive_infer_cfg(batch, labels, g_seed=0, **settings)
        return var.sample(labels, vqvae=vqvae, generator=torch.Generator().manual_seed(0), **settings)


def train(var, vqvae):  # forward, token cross-entropy, backward: every parameter's gradient, flattened [P] float32
    train_step(var, vqvae)
    return torch.cat([p.grad.flatten().float() for p in var.parameters() if p.grad is not None])


def train_step(var, vqvae):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(2)  # drop-path's draws (the global generator's), the same for both versions
    labels = torch.randint(0, 1000, (batch,), generator=g)
    idx_Bl = [torch.randint(0, 4096, (batch, pn * pn), generator=g) for pn in var.patch_nums]
    var.train().zero_grad(set_to_none=True)
    var.attention_kernel = settings["kernel"]  # the original code has one: SDPA with a float mask
    to_input = vqvae.quantize.idxBl_to_var_input if hasattr(var, "autoregressive_infer_cfg") else vqvae.idxBl_to_var_input
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings["precision"] == "bf16"):
        logits_BLV = var(labels, to_input(idx_Bl))
    torch.nn.functional.cross_entropy(logits_BLV.float().flatten(0, 1), torch.cat(idx_Bl, 1).flatten()).backward()


def encode(var, vqvae):  # the token cache's call: every scale's token indices of random images, flat [B*L]
    images_B3HW = torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        return torch.cat(vqvae.img_to_idxBl(images_B3HW), 1).flatten().float()


run = {"generation": generate, "training": train, "encode": encode}[task]


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


if mode == "time":
    import trainables.models as ours
    versions = {"base": build_base(), "ours": build(ours)}
    versions["base"][0].load_state_dict(versions["ours"][0].state_dict())  # the very same weights
    versions["base"][1].load_state_dict(versions["ours"][1].state_dict())
    seconds, images = {name: [] for name in versions}, {}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, (var, vqvae) in versions.items():
            started = time.perf_counter()
            images[name] = run(var, vqvae)
            if round_:
                seconds[name].append(time.perf_counter() - started)
    if task == "encode":  # the share of token indices that differ
        diff = (images["base"] != images["ours"]).float().mean().item()
    else:
        diff = (images["base"] - images["ours"]).abs().max().item()
    counted = {}
    if task == "training":  # what an eager GPU step would move: bytes and kernels, op by op (benchmark_dp_memory)
        from benchmark_dp_memory import CudaAutocast, LiveTensorBytes, Traffic
        for name, (var, vqvae) in versions.items():
            with CudaAutocast(), Traffic() as traffic:  # CUDA autocast's rules: float32 norms, promoted addcmul
                train_step(var, vqvae)
            with CudaAutocast(), LiveTensorBytes() as live:  # tensors the step makes, its gradients among them
                train_step(var, vqvae)
            counted[name] = {
                "gb": traffic.bytes / 1e9, "kernels": traffic.kernels, "roofline_ms": 1e3 * traffic.roofline_s,
                "peak_mib": live.peak / 2**20,
            }
    print(json.dumps({
        "median_s": {name: statistics.median(s) for name, s in seconds.items()},
        "max_diff": diff,  # images (generation), gradients (training) or tokens (encode, the share differing)
        "max_abs": images["base"].abs().max().item(),
        "traffic": counted,
    }))
else:
    var, vqvae = build_base() if mode == "base" else build(__import__("trainables.models").models)
    resident = peak_gib()
    run(var, vqvae)
    print(json.dumps({"built_gib": resident, "peak_gib": peak_gib()}))
"""


@dataclass(frozen=True)
class Run:
    """What every worker of one invocation runs: ``task`` ("generation", "training" or "encode") with its
    ``settings`` at ``batch`` on ``threads`` threads, ``repeats`` timed calls; ``base_kind`` "commit" (the
    base is this repository at a revision) or "original" (a checkout of the original VAR code)."""

    batch: int
    threads: int
    repeats: int
    task: str
    settings: dict
    base_kind: str


def worker(mode: str, base_tree: Path, *, depth: int, run: Run) -> dict:
    argv = [sys.executable, "-c", WORKER, mode, str(base_tree), str(depth), str(run.batch), str(run.threads)]
    argv += [str(run.repeats), run.task, json.dumps(run.settings), run.base_kind]
    env = {
        "PYTHONPATH": f"{REPO}:{REPO / 'scripts'}",
        "OMP_NUM_THREADS": str(run.threads),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"worker {mode} depth {depth} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(base_tree: Path, *, depth: int, run: Run) -> dict:
    timing = worker("time", base_tree, depth=depth, run=run)
    memory = {name: worker(name, base_tree, depth=depth, run=run) for name in ("base", "ours")}
    return {"depth": depth, **timing, "memory": memory}


def measured(base_tree: Path, *, depths: list[int], run: Run) -> list[dict]:
    """``measure`` at every depth, each row also printed to stderr as it comes."""
    rows = []
    for depth in depths:
        rows.append(measure(base_tree, depth=depth, run=run))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def table(rows: list[dict], *, base: str, run: Run) -> str:
    batch, threads, repeats, task, settings = run.batch, run.threads, run.repeats, run.task, run.settings
    what = {
        "generation": f"Generation on CPU, fp32, {threads} threads, batch {batch}, CFG {settings.get('cfg')}, top-k "
        f"{settings.get('top_k')}, top-p {settings.get('top_p')}",
        "training": f"Training step (forward, loss, backward) on CPU, {settings.get('precision')}, {threads} threads, "
        f"batch {batch}, attention kernel {settings.get('kernel')}"
        + (
            " (the original code's: SDPA with a float mask), no drop-path"
            if run.base_kind == "original"
            else ""
        ),
        "encode": f"VQVAE encoding (`img_to_idxBl`, the token cache's call) on CPU, fp32, {threads} threads, batch "
        f"{batch} of random 256-px images (the depth builds a VAR that is not run)",
    }[task]
    diff = {"generation": "max image diff (of max abs)", "training": "max gradient diff (of max abs)"}.get(
        task, "share of tokens differing"
    )
    lines = [
        f"{what}; median of {repeats} calls after one warm-up, base and ours alternating in one process; peak RSS "
        "of a separate build-and-run process.",
        "",
        *markdown_table(
            ["depth", f"{base} s/call", "ours s/call", f"ours / {base}", diff]
            + [f"peak RSS {base} (GiB)", "peak RSS ours (GiB)"],
            [
                [f"d{r['depth']}", f"{r['median_s']['base']:.2f}", f"{r['median_s']['ours']:.2f}"]
                + [
                    f"{r['median_s']['ours'] / r['median_s']['base']:.3f}",
                    f"{r['max_diff']:.1e}" + ("" if task == "encode" else f" ({r['max_abs']:.1e})"),
                ]
                + [f"{r['memory'][name]['peak_gib']:.2f}" for name in ("base", "ours")]
                for r in rows
            ],
        ),
    ]
    if task == "training":
        counted = [(r["depth"], r["traffic"]["base"], r["traffic"]["ours"]) for r in rows]
        lines += [
            "",
            "Counted op by op in one step (`benchmark_dp_memory.Traffic`: each operand read once, each result written "
            "once, views excluded: what an eager GPU step moves at least), with its H200 roofline estimate (sum over "
            "ops of max(FLOPs / datasheet rate, bytes / datasheet bandwidth); an estimate, not a measurement), and the "
            "step's peak tensor memory (`benchmark_dp_memory.LiveTensorBytes`: every tensor it makes, its gradients "
            "among them; CUDA autocast's float32 norms replayed for both counts):",
            "",
            *markdown_table(
                ["depth", f"GB {base}", "GB ours", f"ours / {base}", f"kernels {base}", "kernels ours"]
                + [f"roofline ms {base}", "roofline ms ours", f"ours / {base}"]
                + [f"peak MiB {base}", "peak MiB ours", f"ours / {base}"],
                [
                    [
                        f"d{depth}",
                        f"{b['gb']:.2f}",
                        f"{o['gb']:.2f}",
                        f"{o['gb'] / b['gb']:.3f}",
                        str(b["kernels"]),
                    ]
                    + [str(o["kernels"]), f"{b['roofline_ms']:.2f}", f"{o['roofline_ms']:.2f}"]
                    + [f"{o['roofline_ms'] / b['roofline_ms']:.3f}"]
                    + [f"{b['peak_mib']:.0f}", f"{o['peak_mib']:.0f}", f"{o['peak_mib'] / b['peak_mib']:.3f}"]
                    for depth, b, o in counted
                ],
            ),
        ]
    return "\n".join(lines)


def check_original(path: Path) -> Path:
    """The checkout ``--original`` names, made absolute; a clear error when it lacks the original code's files."""
    tree = path.expanduser().resolve()
    missing = [name for name in ORIGINAL_FILES if not (tree / name).is_file()]
    if missing:
        raise SystemExit(
            f"--original {path}: not a checkout of github.com/FoundationVision/VAR (missing {', '.join(missing)}); "
            "clone it with `git clone https://github.com/FoundationVision/VAR` and pass its folder"
        )
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="a7366f3", help="git revision to compare against")
    parser.add_argument(
        "--original",
        type=Path,
        help="a checkout of github.com/FoundationVision/VAR to compare against instead of --base",
    )
    parser.add_argument("--depths", default="4,16", help="comma-separated VAR depths")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--task", choices=("generation", "training", "encode"), default="generation")
    parser.add_argument(
        "--kernel", choices=("masked", "per_scale"), default="per_scale", help="training only"
    )
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training only")
    args = parser.parse_args()
    settings = {
        "generation": SAMPLING,
        "training": {"kernel": args.kernel, "precision": args.precision},
        "encode": {},
    }[args.task]
    run = Run(
        batch=args.batch_size,
        threads=args.threads,
        repeats=args.repeats,
        task=args.task,
        settings=settings,
        base_kind="commit" if args.original is None else "original",
    )
    depths = [int(d) for d in args.depths.split(",")]
    if args.original is not None:
        tree = check_original(args.original)
        print(table(measured(tree, depths=depths, run=run), base="original", run=run))
        return
    with tempfile.TemporaryDirectory(prefix="side-by-side-base-") as scratch:
        base_tree = Path(scratch) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base_tree), args.base],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        try:
            rows = measured(base_tree, depths=depths, run=run)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=False)
    print(table(rows, base=args.base, run=run))


if __name__ == "__main__":
    main()
