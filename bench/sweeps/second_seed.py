"""The second seed of Table 1 (mean +- std over seeds in the tables): the same trials with seed 1."""

from __future__ import annotations

from ..schema import TrialConfig
from . import table1
from .common import Assets


def sweep(*, smoke: bool = False, assets: Assets = Assets()) -> list[TrialConfig]:
    return table1.sweep(smoke=smoke, assets=assets, seed=1)
