"""The convergence curves (paper Fig. 2): FID on 1,000 generated images at 8 evenly spaced steps of each run (the
last one final) for each method, VAR-d16, on Oxford Flowers and CUB-200. The paper evaluated every 500 steps;
these runs plan 96-937 steps, which would give 1-2 points per curve. They are Table 1's own trials (same ids), which
record the curves: running both sweeps trains each once."""

from __future__ import annotations

from ..schema import TrialConfig
from . import table1
from .common import PAPER_METHODS, Assets, paper_or_smoke


def sweep(*, smoke: bool = False, assets: Assets = Assets()) -> list[TrialConfig]:
    curves = {
        (c.method.name, c.data.dataset): c
        for c in table1.sweep(assets=assets)
        if c.evaluation.convergence_points
    }
    configs = [
        curves[(method, dataset)] for method in PAPER_METHODS for dataset in table1.CONVERGENCE_DATASETS
    ]
    return paper_or_smoke(configs, smoke)
