"""Sweeps as code: each module's ``sweep(smoke=False, assets=Assets())`` returns the list of ``TrialConfig`` of one
experiment of the paper (``smoke=True``: the same axes on the tiny base and offline data, for a laptop or CI)."""

from __future__ import annotations

from collections.abc import Callable

from ..schema import TrialConfig
from . import convergence, demo, privacy_audit, second_seed, table1, table2, table3, table9, table10
from .common import Assets

SweepFn = Callable[..., list[TrialConfig]]
SWEEPS: dict[str, SweepFn] = {
    "demo": demo.sweep,
    "table1": table1.sweep,
    "table2": table2.sweep,
    "table3": table3.sweep,
    "table9": table9.sweep,
    "table10": table10.sweep,
    "convergence": convergence.sweep,
    "second_seed": second_seed.sweep,
    "privacy_audit": privacy_audit.sweep,
}


def build_sweep(name: str, *, smoke: bool = False, assets: Assets = Assets()) -> list[TrialConfig]:
    if name not in SWEEPS:
        raise KeyError(f"unknown sweep {name!r}; known: {sorted(SWEEPS)}")
    return SWEEPS[name](smoke=smoke, assets=assets)


def describe(name: str) -> str:
    doc = (SWEEPS[name].__module__ and __import__(SWEEPS[name].__module__, fromlist=["_"]).__doc__) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
