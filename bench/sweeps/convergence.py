"""The convergence curves (paper Fig. 2): FID on 1,000 generated images every 500 steps for each method, VAR-d16, on
Oxford Flowers and CUB-200."""
from __future__ import annotations

from ..schema import TrialConfig
from .common import PAPER_METHODS, Assets, paper_or_smoke, paper_trial


def sweep(*, smoke: bool = False, assets: Assets = Assets()) -> list[TrialConfig]:
    configs = [paper_trial(method, 16, dataset, assets=assets, convergence_every_steps=500, convergence_num_images=1000)
               for method in PAPER_METHODS for dataset in ("flowers102", "cub200")]
    return paper_or_smoke(configs, smoke)
