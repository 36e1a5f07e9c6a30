"""The demo sweep on a local Ray, measured: fixed overhead per trial (launch to first training step) against its
training time, the sweep's wall time, and how many trials ran at once.

Usage: python scripts/benchmark_sweep.py [--storage DIR (fresh: everything is built, the tiny base included)] [--out docs/benchmarks.md]
Per trial: startup = launch (Tune trial function) -> the Train worker's function starts (Ray actors, placement group,
process group); setup = worker start -> first training step (base model loaded or built, splits decoded, token
cache opened or built, adapter prepared); train = the optimiser steps; evaluation = generation + features + metrics.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import benchmark_common

from bench.launcher import Launch, default_cache_dir, run_sweep
from bench.results import ResultStore
from bench.sweeps import build_sweep


def most_concurrent(records: list[dict]) -> int:
    """Largest number of trials whose [started_at, finished_at] intervals overlap."""
    events = []
    for r in records:
        events += [
            (datetime.fromisoformat(r["started_at"]), 1),
            (datetime.fromisoformat(r["finished_at"]), -1),
        ]
    running = peak = 0
    for _, change in sorted(events, key=lambda e: (e[0], e[1])):
        running += change
        peak = max(peak, running)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    storage = args.storage or Path(tempfile.mkdtemp(prefix="varsweep-demo-"))
    configs = build_sweep("demo")
    started = time.perf_counter()
    outcome = run_sweep(
        "demo", configs, Launch(storage=str(storage), cache_dir=default_cache_dir(str(storage))), verbose=0
    )
    wall = time.perf_counter() - started
    records = [ResultStore(storage).read(c.trial_id) for c in configs]
    rows, overheads, trains = [], [], []
    for r in records:
        cost, c = r["cost"], r["config"]
        overhead = (cost.get("startup_seconds") or 0.0) + (cost.get("setup_seconds") or 0.0)
        name = c["method"]["name"] + (
            "" if c["privacy"] is None else f" DP eps {c['privacy']['target_epsilon']:g}"
        )
        rows.append(
            f"| {name} | {cost.get('startup_seconds', 0):.1f} | {cost.get('setup_seconds', 0):.1f} | {cost.get('train_seconds', 0):.1f} | "
            f"{cost.get('evaluation_seconds', 0):.1f} | {r['metrics'].get('fid', float('nan')):.2f} |"
        )
        overheads.append(overhead)
        if cost.get("train_seconds"):
            trains.append(cost["train_seconds"])
    text = "\n".join(
        [
            f"### Demo sweep on a local Ray ({benchmark_common.stamp()})",
            "",
            f"Machine: {benchmark_common.machine()}. Script: `python scripts/benchmark_sweep.py` (fresh storage: the tiny base is built "
            f"inside the first trial's setup).",
            "",
            "| trial | startup s (launch -> worker) | setup s (-> first step) | train s | evaluation s | FID |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"- Sweep wall time: {wall:.0f} s for {len(records)} trials ({outcome['failed']} failed); Tune ran up to {outcome['concurrency']} at a time, "
            f"and up to {most_concurrent(records)} trials overlapped in their recorded run times.",
            f"- Fixed overhead per trial (startup + setup), median: {statistics.median(overheads):.1f} s; training time of the training trials, "
            f"median: {statistics.median(trains):.1f} s (ratio {statistics.median(overheads) / statistics.median(trains):.2f}).",
            "",
        ]
    )
    benchmark_common.publish(text, args.out)


if __name__ == "__main__":
    main()
