"""Table 9: precision and recall (k=3, Inception features) of the Table 1 models. Every evaluation computes them, so
these are Table 1's trials: a sweep that already ran Table 1 finds them finished and runs nothing."""

from __future__ import annotations

from ..schema import TrialConfig
from . import table1
from .common import Assets


def sweep(*, smoke: bool = False, assets: Assets = Assets()) -> list[TrialConfig]:
    return table1.sweep(smoke=smoke, assets=assets)
