"""The dry-run estimate of every built-in paper sweep, side by side: training and evaluation GPU hours on the
estimate's device, how many trials rest on a measured, scaled or assumed rate, and what training cost with
every setting not measured exactly at the assumed utilisation (the estimate before it took the nearest
measurement's).

Usage: python scripts/estimate_sweeps.py [--out docs/benchmarks.md]
Reads bench/measured_throughput.json; needs no assets (split sizes are the datasets' published ones).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import benchmark_common

from bench.estimates import (
    ESTIMATE_DEVICE,
    assumed_flops_per_second,
    load_measured_sampling,
    load_measured_throughput,
    trial_estimate,
)
from bench.sweeps import SWEEPS, build_sweep

PAPER_SWEEPS = [name for name in SWEEPS if name != "demo"]  # the demo trains the tiny base: never priced


def sweep_row(name: str, *, measurements: list[dict], samplings: list[dict]) -> str:
    """One Markdown row: the sweep's trials, hours and the bases of their rates."""
    training = evaluation = assumed_only = 0.0
    bases, images = Counter(), 0
    configs = build_sweep(name)
    for config in configs:
        e = trial_estimate(config, measurements=measurements, samplings=samplings)
        measured = e.training_rate.kind == "measured"
        assumed_only += (
            e.training_hours if measured else e.train_flops / assumed_flops_per_second(ESTIMATE_DEVICE) / 3600
        )
        training += e.training_hours
        evaluation += e.evaluation_hours
        images += e.images
        bases.update([f"train {e.training_rate.kind}", f"eval {e.sampling_rate.kind}"])
    kinds = [
        "/".join(str(bases[f"{part} {kind}"]) for kind in ("measured", "scaled", "assumed"))
        for part in ("train", "eval")
    ]
    return (
        f"| {name} | {len(configs)} | {assumed_only:.1f} | {training:.1f} | {kinds[0]} | {images:,} | "
        f"{evaluation:.1f} | {kinds[1]} | {training + evaluation:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="append the table here (docs/benchmarks.md)")
    args = parser.parse_args()
    measurements, samplings = load_measured_throughput(), load_measured_sampling()
    lines = [
        f"GPU hours on an {ESTIMATE_DEVICE} (`python scripts/estimate_sweeps.py`, published split sizes):",
        "",
        "| sweep | trials | training, unmeasured at 35% (before) | training | its rates: measured/scaled/assumed | "
        "images evaluated | evaluation | its rates | total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [sweep_row(n, measurements=measurements, samplings=samplings) for n in PAPER_SWEEPS]
    benchmark_common.publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
