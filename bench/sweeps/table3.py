"""Table 3: DP LoRA (k = 32) on Oxford Flowers across the privacy budget epsilon, VAR-d16 and d20."""

from __future__ import annotations

from ..schema import TrialConfig
from .common import Assets, dp_trial, paper_or_smoke

EPSILONS = (1, 10, 20, 50, 100, 500, 1000)


def sweep(*, smoke: bool = False, assets: Assets = Assets(), delta: float | None = None) -> list[TrialConfig]:
    """``delta``: None is the paper's 1/N (weak: see README); any delta < 1/N may be set."""
    configs = [
        dp_trial("lora", depth, epsilon=epsilon, k=32, assets=assets, delta=delta)
        for depth in (16, 20)
        for epsilon in EPSILONS
    ]
    return paper_or_smoke(configs, smoke)
