"""Table 2: DP fine-tuning on Oxford Flowers at epsilon 10 vs augmentation multiplicity k (LoRA k in {1, 32, 128},
LNTuning k = 1), VAR-d16 and d20."""

from __future__ import annotations

from ..schema import TrialConfig
from .common import Assets, dp_trial, paper_or_smoke

CELLS = (("lora", 1), ("lora", 32), ("lora", 128), ("ln_tuning", 1))


def sweep(*, smoke: bool = False, assets: Assets = Assets(), delta: float | None = None) -> list[TrialConfig]:
    """``delta``: None is the paper's 1/N (weak: see README); any delta < 1/N may be set."""
    configs = [
        dp_trial(method, depth, epsilon=10, k=k, assets=assets, delta=delta)
        for depth in (16, 20)
        for method, k in CELLS
    ]
    return paper_or_smoke(configs, smoke)
