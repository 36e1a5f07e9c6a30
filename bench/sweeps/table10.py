"""Table 10: which layers DP LoRA should adapt (VAR-d16, Oxford Flowers, epsilon 10, k = 128): attention only,
MLP only, attention + MLP + AdaLN (the main setting), and LNTuning."""

from __future__ import annotations

from ..schema import TrialConfig
from .common import Assets, dp_trial, paper_or_smoke

VARIANTS = ("lora_attention", "lora_mlp", "lora", "ln_tuning")


def sweep(*, smoke: bool = False, assets: Assets = Assets(), delta: float | None = None) -> list[TrialConfig]:
    """``delta``: None is the paper's 1/N (weak: see README); any delta < 1/N may be set."""
    return paper_or_smoke(
        [dp_trial(method, 16, epsilon=10, k=128, assets=assets, delta=delta) for method in VARIANTS], smoke
    )
