"""The paper's DP settings calibrated over varsweep's RDP orders and over Opacus's default orders, side by side.

Usage: python scripts/benchmark_accounting.py [--out docs/benchmarks.md]
For every distinct (epsilon, q, planned steps) of the paper sweeps Table 2, 3 and 10 on Oxford Flowers (N = 1020,
delta = 1/N): sigma calibrated by Opacus's ``get_noise_multiplier`` with its default RDP orders (1.1-63) and by
``trainables.privacy.calibrate_noise_multiplier`` (``RDP_ORDERS``, 1.01-4096); epsilon spent at the end by both
calibrations (reported over our orders), the best order, and whether Opacus warns that the optimal order is the
largest (or smallest) one at any of the steps a run logs. Appends a dated Markdown section to ``--out``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import benchmark_common
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from bench.sweeps import table2, table3, table10
from trainables.privacy import RDP_ORDERS, calibrate_noise_multiplier

N_FLOWERS = 1020


def settings() -> list[tuple[float, float, int]]:
    configs = table2.sweep() + table3.sweep() + table10.sweep()
    return sorted(
        {(c.privacy.target_epsilon, c.privacy.sampling_rate, c.planned_steps(N_FLOWERS)) for c in configs},
        key=lambda s: (s[2], s[0]),
    )


def edge_warnings(sigma: float, *, q: float, steps: int, orders: list[float] | None) -> str:
    """Which edge warnings Opacus raises over the epsilons a run logs (steps 1, 2, 5, 10, 50, half, all)."""
    seen = set()
    for logged in sorted({1, 2, 5, 10, 50, steps // 2, steps}):
        accountant = RDPAccountant()
        accountant.history = [(sigma, q, logged)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            accountant.get_epsilon(delta=1 / N_FLOWERS, **({"alphas": orders} if orders else {}))
        seen |= {w for w in ("largest", "smallest") for c in caught if f"the {w} alpha" in str(c.message)}
    return ", ".join(sorted(seen)) or "none"


def spent(sigma: float, *, q: float, steps: int) -> tuple[float, float]:
    accountant = RDPAccountant()
    accountant.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, order = accountant.get_privacy_spent(delta=1 / N_FLOWERS, alphas=RDP_ORDERS)
    return float(eps), float(order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows, started = [], time.perf_counter()
    for epsilon, q, steps in settings():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opacus_sigma = get_noise_multiplier(
                target_epsilon=epsilon, target_delta=1 / N_FLOWERS, sample_rate=q, steps=steps
            )
        t = time.perf_counter()
        ours = calibrate_noise_multiplier(
            target_epsilon=epsilon, delta=1 / N_FLOWERS, sampling_rate=q, steps=steps
        )
        seconds = time.perf_counter() - t
        (eps_opacus, _), (eps_ours, order) = (
            spent(opacus_sigma, q=q, steps=steps),
            spent(ours, q=q, steps=steps),
        )
        rows.append(
            f"| {epsilon:g} | {q} | {steps} | {opacus_sigma:.4f} | {ours:.4f} | {100 * (ours / opacus_sigma - 1):+.2f}% | "
            f"{eps_opacus:.3f} | {eps_ours:.3f} | {order:g} | {edge_warnings(opacus_sigma, q=q, steps=steps, orders=None)} | "
            f"{edge_warnings(ours, q=q, steps=steps, orders=RDP_ORDERS)} | {seconds:.1f} |"
        )
    text = "\n".join(
        [
            f"### Paper DP settings: RDP orders 1.01-4096 vs Opacus's 1.1-63 ({benchmark_common.stamp()})",
            "",
            f"`python scripts/benchmark_accounting.py`; {benchmark_common.machine()}. Oxford Flowers N = {N_FLOWERS}, delta = 1/N; "
            "steps = epochs / q (LoRA 80, LN-tuning 100 epochs). sigma by Opacus's `get_noise_multiplier` with its default orders "
            "and by ours; epsilon spent at the end by each sigma, both over our orders; edge warnings over the epsilons a run "
            "logs (steps 1, 2, 5, 10, 50, half, all).",
            "",
            "| target eps | q | steps | sigma (Opacus orders) | sigma (ours) | change | eps spent, Opacus sigma | eps spent, our sigma "
            "| best order | edge warnings, Opacus orders | edge warnings, ours | calibration s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"{len(rows)} settings in {time.perf_counter() - started:.0f} s.",
            "",
        ]
    )
    benchmark_common.publish(text, args.out)


if __name__ == "__main__":
    main()
