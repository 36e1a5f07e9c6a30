"""How much the demo's non-DP metrics move with the trial seed: the demo's full and LoRA trials (bench/sweeps/demo.py)
re-run with other seeds through ``run_trial`` in plain processes, two at a time, each on one thread.

Usage: python scripts/demo_seed_spread.py [--seeds 0 1 2] [--methods full lora] [--cache-dir runs/demo/cache] [--out docs/benchmarks.md]
The cache folder is a finished demo's (tiny base, digit classifier, token cache: nothing is rebuilt); a folder
lacking any of them is refused before anything runs (a relative one is taken from the current folder). The demo's
targets (bench.demo) must hold for every seed, not only for seed 0, so their thresholds are set from this spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import benchmark_common

from bench.sweeps import build_sweep
from trainables.evaluation.classifier import classifier_folder
from trainables.models.checkpoints import checkpoint_sha256
from trainables.tiny_base import tiny_base_folder, tiny_vqvae_folder

ONE_TRIAL = """
import json, sys, torch
from bench.schema import replace
from bench.sweeps import build_sweep
from trainables.trial import run_trial
method, seed, cache, artifacts = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
config = next(c for c in build_sweep("demo") if c.method.name == method and c.privacy is None)
record = run_trial(replace(config, optimization={"seed": seed}), cache_dir=cache, artifacts_dir=artifacts, log=lambda line: None)
print(json.dumps({key: record["metrics"][key] for key in ("fid", "precision", "recall", "class_accuracy")}))
"""


def one(method: str, seed: int, *, cache_dir: str, work: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", ONE_TRIAL, method, str(seed), cache_dir, f"{work}/{method}-{seed}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {"method": method, "seed": seed, **json.loads(out.stdout.strip().splitlines()[-1])}


def missing_from_demo_cache(cache_dir: Path) -> list[str]:
    """What a finished demo leaves in its cache folder that ``cache_dir`` lacks: the tiny base (its VQVAE and its
    VAR), the digit classifier and a complete token cache. Every trial would build what is missing, for many
    minutes, its output hidden."""
    model = build_sweep("demo")[0].model  # one tiny base for all the demo's trials
    steps = model.tiny_pretraining_steps
    missing = []
    vqvae = tiny_vqvae_folder(cache_dir, pretraining_steps=steps) / "vqvae.pth"
    if not vqvae.is_file():
        missing.append(f"the tiny base's VQVAE ({vqvae}) and VAR")
    else:
        var = tiny_base_folder(
            cache_dir, depth=model.depth, pretraining_steps=steps, vqvae_sha256=checkpoint_sha256(vqvae)
        )
        if not (var / "var.pth").is_file():
            # a demo run with other code or settings left its VAR under another key (it covers the VAR's sources)
            others = sorted(
                f.name for f in var.parent.glob(f"d{model.depth}-{steps}-*") if f.is_dir() and f != var
            )
            elsewhere = (
                f"; {', '.join(others)} beside it hold VARs of other code or settings" if others else ""
            )
            missing.append(f"the tiny base's VAR ({var / 'var.pth'}{elsewhere})")
    classifier = classifier_folder(cache_dir)
    if not ((classifier / "weights.pt").is_file() and (classifier / "classifier.json").is_file()):
        missing.append(f"the digit classifier ({classifier})")
    if not any(_complete(meta) for meta in (cache_dir / "token-cache").glob("*/meta.json")):
        missing.append(f"a complete token cache (in {cache_dir / 'token-cache'})")
    return missing


def _complete(meta: Path) -> bool:
    """Whether a token cache's ``meta.json`` says it is complete (``TokenCache.complete``)."""
    try:
        return json.loads(meta.read_text()).get("complete", False) is True
    except (OSError, ValueError, AttributeError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["full", "lora"])
    parser.add_argument("--cache-dir", default="runs/demo/cache")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    cache_dir = str(Path(args.cache_dir).resolve())
    missing = missing_from_demo_cache(Path(cache_dir))
    if missing:
        given = (
            "" if Path(args.cache_dir).is_absolute() else f" (--cache-dir {args.cache_dir} from {Path.cwd()})"
        )
        sys.exit(
            f"{cache_dir}{given} is not the cache folder of a finished demo: it lacks {'; '.join(missing)}. Run "
            "`make demo` first (its cache: runs/demo/cache under the folder it ran in, or $VARSWEEP_CACHE), or give "
            "--cache-dir a finished demo's cache folder; the trials would otherwise rebuild all of it first, for "
            "many minutes, with their output hidden."
        )
    with tempfile.TemporaryDirectory() as work, ThreadPoolExecutor(max_workers=2) as pool:
        rows = list(
            pool.map(
                lambda ms: one(*ms, cache_dir=cache_dir, work=work),
                [(m, s) for m in args.methods for s in args.seeds],
            )
        )
    lines = [
        f"| {r['method']} | {r['seed']} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['class_accuracy']:.3f} |"
        for r in rows
    ]
    for method in args.methods:
        mine = [r for r in rows if r["method"] == method]
        lines.append(
            f"| {method} | min over seeds | {max(r['fid'] for r in mine):.2f} (max) | {min(r['precision'] for r in mine):.3f} | "
            f"{min(r['recall'] for r in mine):.3f} | {min(r['class_accuracy'] for r in mine):.3f} |"
        )
        lines.append(
            f"| {method} | spread (stdev) | {statistics.pstdev(r['fid'] for r in mine):.2f} | {statistics.pstdev(r['precision'] for r in mine):.3f} | "
            f"{statistics.pstdev(r['recall'] for r in mine):.3f} | {statistics.pstdev(r['class_accuracy'] for r in mine):.3f} |"
        )
    text = "\n".join(
        [
            f"### Demo metrics across trial seeds ({benchmark_common.stamp()})",
            "",
            f"`python scripts/demo_seed_spread.py --seeds {' '.join(map(str, args.seeds))}`; {benchmark_common.machine()}.",
            "",
            "| method | seed | FID | precision | recall | class accuracy |",
            "|---|---|---|---|---|---|",
            *lines,
            "",
        ]
    )
    benchmark_common.publish(text, args.out)


if __name__ == "__main__":
    main()
