"""Table 1: FID of each method (FFT, LoRA, LNTuning) x model (VAR-d16, d20) x the five datasets, no DP."""

from __future__ import annotations

from ..schema import TrialConfig
from .common import PAPER_DATASETS, PAPER_METHODS, Assets, paper_or_smoke, paper_trial

# The runs paper Fig. 2 follows (``convergence``): VAR-d16 on Oxford Flowers and CUB-200, FID on 1,000 generated
# images at 8 evenly spaced steps (the last one final). Table 1's own runs at seed 0 record the curve, so the figure
# costs 48 small evaluations instead of six more trainings of the same runs (every random draw of a training is
# keyed by its seed, step and example, so a curve changes no step).
CONVERGENCE_DEPTH, CONVERGENCE_DATASETS = 16, ("flowers102", "cub200")
CONVERGENCE = {"convergence_points": 8, "convergence_num_images": 1000}


def sweep(*, smoke: bool = False, assets: Assets = Assets(), seed: int = 0) -> list[TrialConfig]:
    configs = [
        paper_trial(
            method,
            depth,
            dataset,
            assets=assets,
            seed=seed,
            **(CONVERGENCE if _curve(depth, dataset, seed=seed) else {}),
        )
        for depth in (16, 20)
        for method in PAPER_METHODS
        for dataset in PAPER_DATASETS
    ]
    return paper_or_smoke(configs, smoke)


def _curve(depth: int, dataset: str, *, seed: int) -> bool:
    return seed == 0 and depth == CONVERGENCE_DEPTH and dataset in CONVERGENCE_DATASETS
