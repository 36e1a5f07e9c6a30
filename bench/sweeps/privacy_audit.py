"""Privacy audit (issue 18, beyond the paper): an empirical lower bound on epsilon from one training run per point
(1,000 canaries, each in the training set with probability 1/2), VAR-d16 on Oxford Flowers: DP LoRA at epsilon x
k, full and LN tuning at one epsilon, and every method without DP."""

from __future__ import annotations

import dataclasses

from ..schema import AuditConfig, TrialConfig, replace
from .common import (
    CPU_RESOURCES,
    PAPER_METHODS,
    SMOKE_CANARIES,
    Assets,
    dp_trial,
    paper_trial,
    smoke_version,
    unique,
)

DEPTH = 16
DATASET = "flowers102"
EPSILONS = (1, 10, 100)  # LoRA's privacy budgets: strong, the paper's Table 2 budget, weak
MULTIPLICITIES = (1, 32)  # k: one view per step, and Table 3's 32 augmented views
OTHER_METHODS_EPSILON = 10  # full and LN tuning are audited at this one budget, k = 1
PAPER_CANARIES = 1000
# Every trial is audited (and a DP trial trains) at this delta. The one-run bound pays about 2 m delta of its
# significance: at the paper's delta = 1/N (Flowers with 500 included canaries: 1/1520) 1,000 canaries give a bound
# of 0 even for perfect guesses (and 200 canaries on digits likewise), while at 1e-6 the cost is 0.2% (m = 1,000).
AUDIT_DELTA = 1e-6
# Smoke: the same design at a laptop's size. 200 canaries beside digits' 1,438 images; LoRA at the two budgets
# the demo uses and k up to the smoke cap of 4, 24 steps each (a DP k = 4 trial: ~20 s on 2 CPU cores). 24 steps
# draw an included canary about once (0.5 times in batches of 32 without DP, 1.2 times at the DP sampling rate of
# 0.05): a run that short leaks too little for the bound to leave 0, with DP or without.
SMOKE_EPSILONS = (1, 8)
SMOKE_MULTIPLICITIES = (1, 4)
SMOKE_STEPS = 24
# Two mid-run checkpoints rather than the six-step smoke's one every 3 steps (7 saves in a 24-step run).
SMOKE_RESOURCES = dataclasses.replace(CPU_RESOURCES, checkpoint_every_steps=SMOKE_STEPS // 3)
# ... so the smoke also has a pair that memorises: full fine-tuning, 300 steps at learning rate 1e-2 without class
# dropout (without DP 64 examples a step: each included canary is drawn ~12 times), once without DP and once at
# epsilon 8. Measured on 2 CPU cores (audit seeds 0-2, training seeds 0-1): without DP bounds 1.17-1.99, AUC
# 0.78-0.85; with DP bound 0.0, AUC 0.47-0.49. Alone in one process a run takes ~40 s and ~60 s; in the sweep on
# Ray, two trials at a time, 65 s and 90 s. The non-DP bound is how CI knows the audit can see a leak.
MEMORISING_STEPS = 300
MEMORISING_OPTIMIZATION = {"learning_rate": 1e-2, "class_dropout": 0.0}
MEMORISING_BATCH_SIZE = 64  # without DP; a DP trial's batches are Poisson at the smoke's sampling rate
MEMORISING_EPSILON = 8
MEMORISING_RESOURCES = dataclasses.replace(CPU_RESOURCES, checkpoint_every_steps=MEMORISING_STEPS // 3)


def audited(config: TrialConfig, *, canaries: int) -> TrialConfig:
    """``config`` with an audit of ``canaries`` glyph canaries at 95% confidence; audit seed 0 keys the canaries
    and which of them train (streams of the audit's own, never the training's randomness or its seed). A DP trial
    is audited at its own delta; one without DP at ``AUDIT_DELTA``, the delta of the DP trials beside it."""
    delta = None if config.privacy is not None else AUDIT_DELTA
    return dataclasses.replace(config, audit=AuditConfig(canaries=canaries, delta=delta))


def paper_configs(assets: Assets) -> list[TrialConfig]:
    """The un-audited paper-scale trials of this sweep, in table order (non-DP first, then DP)."""
    plain = [paper_trial(method, DEPTH, DATASET, assets=assets) for method in PAPER_METHODS]
    lora = [
        dp_trial("lora", DEPTH, epsilon=epsilon, k=k, assets=assets, delta=AUDIT_DELTA)
        for epsilon in EPSILONS
        for k in MULTIPLICITIES
    ]
    others = [
        dp_trial(method, DEPTH, epsilon=OTHER_METHODS_EPSILON, k=1, assets=assets, delta=AUDIT_DELTA)
        for method in PAPER_METHODS
        if method != "lora"
    ]
    return plain + lora + others


def smoke_configs(assets: Assets) -> list[TrialConfig]:
    """The un-audited smoke trials, tiny base on digits: LoRA without DP and at each smoke (epsilon, k), then the
    memorising full fine-tuning without DP and at ``MEMORISING_EPSILON``."""
    lora = [paper_trial("lora", DEPTH, DATASET, assets=assets)] + [
        dp_trial("lora", DEPTH, epsilon=epsilon, k=k, assets=assets, delta=AUDIT_DELTA)
        for epsilon in SMOKE_EPSILONS
        for k in SMOKE_MULTIPLICITIES
    ]
    full = [
        paper_trial("full", DEPTH, DATASET, assets=assets),
        dp_trial("full", DEPTH, epsilon=MEMORISING_EPSILON, k=1, assets=assets, delta=AUDIT_DELTA),
    ]
    short = [
        dataclasses.replace(smoke_version(config, steps=SMOKE_STEPS), resources=SMOKE_RESOURCES)
        for config in lora
    ]
    return short + [memorising(smoke_version(config, steps=MEMORISING_STEPS)) for config in full]


def memorising(config: TrialConfig) -> TrialConfig:
    """A smoke trial at the settings that memorise (``MEMORISING_*``)."""
    optimization = dict(MEMORISING_OPTIMIZATION)
    if config.privacy is None:
        optimization["batch_size"] = MEMORISING_BATCH_SIZE
    return dataclasses.replace(replace(config, optimization=optimization), resources=MEMORISING_RESOURCES)


def sweep(*, smoke: bool = False, assets: Assets = Assets()) -> list[TrialConfig]:
    """Every trial audited; ``smoke``: the tiny base on offline digits with 200 canaries (7 trials)."""
    if smoke:
        return unique([audited(c, canaries=SMOKE_CANARIES) for c in smoke_configs(assets)])
    return unique([audited(c, canaries=PAPER_CANARIES) for c in paper_configs(assets)])
