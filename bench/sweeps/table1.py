"""Table 1: FID of each method (FFT, LoRA, LNTuning) x model (VAR-d16, d20) x the five datasets, no DP."""

from __future__ import annotations

from ..schema import TrialConfig
from .common import PAPER_DATASETS, PAPER_METHODS, Assets, paper_or_smoke, paper_trial


def sweep(*, smoke: bool = False, assets: Assets = Assets(), seed: int = 0) -> list[TrialConfig]:
    configs = [
        paper_trial(method, depth, dataset, assets=assets, seed=seed)
        for depth in (16, 20)
        for method in PAPER_METHODS
        for dataset in PAPER_DATASETS
    ]
    return paper_or_smoke(configs, smoke)
