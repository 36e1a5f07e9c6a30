"""Generation on CPU (fp32), side by side: the sampler at a base commit against this working tree's.

Usage: python scripts/benchmark_generation_cpu.py [--base a7366f3] [--depths 4,16] [--batch-size 2]
    [--threads 2] [--repeats 3]

Checks the base commit out into a temporary ``git worktree`` and, for every depth, runs one subprocess that loads
both versions of ``trainables.models`` (the base one under another package name) with the same weights (random,
official layout: 1000 classes, patch_nums 1..16, V 4096, Cvae 32, the official-size VQVAE) and times
``VAR.sample`` at CFG 1.5, top-k 900, top-p 0.96, alternating base and ours call by call (one warm-up each, then
the median of ``--repeats``), so background load hits both alike. Each call re-seeds its generator, and the
images of both versions are compared (the same draws give the same images up to float rounding). Peak RSS comes
from one further subprocess per version that builds the models and samples once. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = dict(cfg=1.5, top_k=900, top_p=0.96)

WORKER = r"""
import importlib.util, json, resource, statistics, sys, time
import torch

mode, base_tree, depth, batch, threads, repeats = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
settings = json.loads(sys.argv[7])
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
        generator=torch.Generator().manual_seed(0),
    ).eval()
    return var, vqvae


def run(var, vqvae):
    labels = torch.arange(batch) * 7 % 1000
    with torch.no_grad():
        return var.sample(labels, vqvae=vqvae, generator=torch.Generator().manual_seed(0), **settings)


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


if mode == "time":
    import trainables.models as ours
    versions = {"base": build(load_base_models()), "ours": build(ours)}
    versions["base"][0].load_state_dict(versions["ours"][0].state_dict())  # the very same weights
    versions["base"][1].load_state_dict(versions["ours"][1].state_dict())
    seconds, images = {name: [] for name in versions}, {}
    for round_ in range(repeats + 1):  # round 0 warms up
        for name, (var, vqvae) in versions.items():
            started = time.perf_counter()
            images[name] = run(var, vqvae)
            if round_:
                seconds[name].append(time.perf_counter() - started)
    diff = (images["base"] - images["ours"]).abs().max().item()
    print(json.dumps({
        "median_s": {name: statistics.median(s) for name, s in seconds.items()},
        "max_image_diff": diff,
    }))
else:
    models = load_base_models() if mode == "base" else __import__("trainables.models").models
    var, vqvae = build(models)
    resident = peak_gib()
    run(var, vqvae)
    print(json.dumps({"built_gib": resident, "peak_gib": peak_gib()}))
"""


def worker(mode: str, base_tree: Path, *, depth: int, batch: int, threads: int, repeats: int) -> dict:
    argv = [sys.executable, "-c", WORKER, mode, str(base_tree), str(depth), str(batch), str(threads)]
    argv += [str(repeats), json.dumps(SETTINGS)]
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"worker {mode} depth {depth} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(base_tree: Path, *, depth: int, batch: int, threads: int, repeats: int) -> dict:
    timing = worker("time", base_tree, depth=depth, batch=batch, threads=threads, repeats=repeats)
    memory = {
        name: worker(name, base_tree, depth=depth, batch=batch, threads=threads, repeats=repeats)
        for name in ("base", "ours")
    }
    return {"depth": depth, **timing, "memory": memory}


def table(rows: list[dict], *, base: str, batch: int, threads: int, repeats: int) -> str:
    lines = [
        f"Generation on CPU, fp32, {threads} threads, batch {batch}, CFG {SETTINGS['cfg']}, top-k "
        f"{SETTINGS['top_k']}, top-p {SETTINGS['top_p']}; median of {repeats} calls after one warm-up, base "
        f"and ours alternating in one process; peak RSS of a separate build-and-sample process.",
        "",
        f"| depth | {base} s/batch | ours s/batch | ours / {base} | max image diff | "
        f"peak RSS {base} (GiB) | peak RSS ours (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base_s, ours_s = row["median_s"]["base"], row["median_s"]["ours"]
        lines.append(
            f"| d{row['depth']} | {base_s:.2f} | {ours_s:.2f} | {ours_s / base_s:.3f} | "
            f"{row['max_image_diff']:.1e} | {row['memory']['base']['peak_gib']:.2f} | "
            f"{row['memory']['ours']['peak_gib']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="a7366f3", help="git revision to compare against")
    parser.add_argument("--depths", default="4,16", help="comma-separated VAR depths")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="generation-base-") as scratch:
        base_tree = Path(scratch) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base_tree), args.base],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        try:
            rows = []
            for depth in map(int, args.depths.split(",")):
                rows.append(
                    measure(
                        base_tree,
                        depth=depth,
                        batch=args.batch_size,
                        threads=args.threads,
                        repeats=args.repeats,
                    )
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO, check=False)
    print(table(rows, base=args.base, batch=args.batch_size, threads=args.threads, repeats=args.repeats))


if __name__ == "__main__":
    main()
