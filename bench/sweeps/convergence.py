"""The convergence curves (paper Fig. 2): FID on 1,000 generated images at 8 evenly spaced steps of each run (the
last one final) for each method, VAR-d16, on Oxford Flowers and CUB-200. The paper evaluated every 500 steps;
these runs plan 96-937 steps, which would give 1-2 points per curve."""

from __future__ import annotations

from ..schema import TrialConfig
from .common import PAPER_METHODS, Assets, paper_or_smoke, paper_trial

CONVERGENCE_POINTS = 8


def sweep(*, smoke: bool = False, assets: Assets = Assets()) -> list[TrialConfig]:
    configs = [
        paper_trial(
            method,
            16,
            dataset,
            assets=assets,
            convergence_points=CONVERGENCE_POINTS,
            convergence_num_images=1000,
        )
        for method in PAPER_METHODS
        for dataset in ("flowers102", "cub200")
    ]
    return paper_or_smoke(configs, smoke)
