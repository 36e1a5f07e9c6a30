"""Building blocks of the paper's sweeps: where the local assets live, the paper's hyper-parameters
(REFERENCE.md §3) and the mapping of any paper trial to its smoke version (tiny base, offline digits, few steps,
the digit classifier's features, CPU). Standard library only."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ..schema import (
    DATASETS,
    PRV_MAX_EPSILON,
    DataConfig,
    EvaluationConfig,
    MethodConfig,
    ModelConfig,
    OptimizationConfig,
    PrivacyConfig,
    ResourcesConfig,
    TrialConfig,
    absolute,
)

PAPER_DATASETS = ("food101", "cub200", "flowers102", "stanford_cars", "oxford_pet")
PAPER_METHODS = ("full", "lora", "ln_tuning")
VQVAE_FILE = "vae_ch160v4096z32.pth"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
ASSETS_ENV = "VARSWEEP_ASSETS"


@dataclass(frozen=True)
class Assets:
    """Local files of a paper sweep: ``root/checkpoints/{var_d16.pth, var_d20.pth, ..., vae_ch160v4096z32.pth,
    weights-inception-2015-12-05-6726825d.pth}`` and ``root/datasets/<dataset>/`` in each dataset's official layout.
    A given root is made absolute when the object is built (in the driver): Ray runs trials in working folders of
    its own, where a relative path would point elsewhere. On a cluster it is the same shared path on every node.
    None (the default): ``$VARSWEEP_ASSETS``, else ``./assets``, read when a path is taken, not when this module
    was imported (a default ``Assets()`` is built then, before a caller sets the variable or changes folder)."""

    root: str | None = None

    def __post_init__(self) -> None:
        if self.root is not None:
            object.__setattr__(self, "root", absolute(self.root))

    def folder(self) -> str:
        """The absolute root: the given one, else ``$VARSWEEP_ASSETS``, else ``./assets`` (read now)."""
        return self.root if self.root is not None else absolute(os.environ.get(ASSETS_ENV, "assets"))

    def checkpoint(self, name: str) -> str:
        return str(Path(self.folder()) / "checkpoints" / name)

    def dataset(self, name: str) -> str:
        return str(Path(self.folder()) / "datasets" / name)


# Non-DP (method, dataset) -> (learning rate, epochs); batch 512 for FFT on CUB, else 256 (REFERENCE.md §3).
_EPOCHS = {
    "full": {"cub200": 50, "food101": 30, "flowers102": 24, "oxford_pet": 40, "stanford_cars": 50},
    "lora": {"cub200": 40, "food101": 6, "flowers102": 40, "oxford_pet": 50, "stanford_cars": 50},
    "ln_tuning": {"cub200": 40, "food101": 6, "flowers102": 45, "oxford_pet": 50, "stanford_cars": 50},
}
# DP (Oxford Flowers): method -> (learning rate, epochs, max grad norm C); q = 0.251, delta = 1/N.
DP_SETTINGS = {
    "full": (1e-4, 180, 0.1),
    "lora": (5e-4, 80, 0.5),
    "lora_attention": (5e-4, 80, 0.5),
    "lora_mlp": (5e-4, 80, 0.5),
    "ln_tuning": (5e-4, 100, 0.5),
}
DP_SAMPLING_RATE = 0.251


def paper_accountant(epsilon: float) -> str:
    """The accountant a paper trial's sigma is calibrated with: Opacus's default (its ``PrivacyEngine``'s PRV), what
    a study on Opacus calibrates with unless told otherwise; RDP's sigma is 4-11% higher at epsilon 100 down to 1
    (q 0.251, 319 steps; docs/benchmarks.md). Above ``PRV_MAX_EPSILON`` (Table 3's 500 and 1,000) PRV cannot
    calibrate (a calibration at 1,000 ran past 500 s): RDP there, over orders down to 1.01."""
    return "prv" if epsilon <= PRV_MAX_EPSILON else "rdp"


# The paper crops every view afresh at every step; the token cache encodes a pool of crops per image once, and each
# step draws its k views from the pool (trainables/data/tokens.py). Without DP a pool of 16 gives each image a new
# crop in most epochs at the cost of ~5 training rows of encoding per image, shared by every trial of the dataset;
# under DP 4k crops per image (>= 16) keep the k views of a step mostly new (a pool of k would repeat the same k
# crops at every step) for ~2% of a DP run's rows.
NON_DP_CACHED_VIEWS = 16


def dp_cached_views(k: int) -> int:
    return max(NON_DP_CACHED_VIEWS, 4 * k)


# Linear warm-up over 5% of a non-DP run, at most 100 steps: Flowers' 96 FFT steps would otherwise all be warm-up.
WARMUP_FRACTION, MAX_WARMUP_STEPS = 0.05, 100
# The paper batches (256 images of 680 tokens without DP, ~256 examples x k views with) do not fit one forward on
# one GPU: full d16 fine-tuning in bf16 held 16.8 GiB at 16 images on an H200 (~0.74 GiB of activations per image
# over 5 GiB of weights, gradients and AdamW state), so 32 rows per forward need ~29 GiB at d16 and, scaled by
# width x depth, ~47 GiB at d20; DP book-keeping adds ~20% to a step's peak (15.7 against 13.3 GiB for DP-LoRA at
# 16 rows on an H200). At k = 128 an example's views take four forwards of 32 (book-keeping's split route, see
# ``privacy._split_views_clipped``) where one forward of 128 would hold ~100 GiB at d16 and ~150 GiB at d20. The
# default's 256 rows were ~190 GiB at d16. Accumulation leaves the numbers unchanged up to rounding, and a step that
# still runs out of memory stops with ``finetune.OutOfGpuMemory`` naming the setting.
GPU_RESOURCES = ResourcesConfig(
    workers=1, gpus_per_worker=1.0, cpus_per_worker=8.0, checkpoint_every_steps=500, rows_per_forward=32
)


def paper_model(depth: int, assets: Assets) -> ModelConfig:
    return ModelConfig(
        base="official",
        depth=depth,
        var_checkpoint=assets.checkpoint(f"var_d{depth}.pth"),
        vqvae_checkpoint=assets.checkpoint(VQVAE_FILE),
        tiny_pretraining_steps=0,
    )


def paper_evaluation(assets: Assets, **changes) -> EvaluationConfig:
    return EvaluationConfig(
        extractor="inception-v3-compat", inception_weights=assets.checkpoint(INCEPTION_FILE), **changes
    )


def non_dp_optimization(method: str, dataset: str, *, seed: int = 0) -> OptimizationConfig:
    lr = 1e-4 if method == "full" else (1e-3 if dataset == "cub200" else 5e-4)
    batch = 512 if (method == "full" and dataset == "cub200") else 256
    epochs = _EPOCHS[method][dataset]
    # The published split size; a trial counts the real files, which match it for the paper's official layouts.
    steps = math.ceil(epochs * DATASETS[dataset].train_images / batch)
    warmup = min(MAX_WARMUP_STEPS, math.ceil(WARMUP_FRACTION * steps))
    return OptimizationConfig(
        learning_rate=lr, batch_size=batch, epochs=epochs, warmup_steps=warmup, seed=seed
    )


def paper_trial(
    method: str, depth: int, dataset: str, *, assets: Assets, seed: int = 0, **evaluation
) -> TrialConfig:
    """A Table-1 style (non-DP) trial with the paper's hyper-parameters. ``seed`` seeds training, the crops and the
    evaluation's sampling: a second seed's spread covers every random draw of the trial, generation's too."""
    evaluation.setdefault("sampling_seed", seed)
    return TrialConfig(
        model=paper_model(depth, assets),
        data=DataConfig(
            dataset=dataset,
            root=assets.dataset(dataset),
            resolution=256,
            cached_views=NON_DP_CACHED_VIEWS,
            view_seed=seed,  # a second seed draws other crops too
        ),
        method=MethodConfig(name=method),
        optimization=non_dp_optimization(method, dataset, seed=seed),
        evaluation=paper_evaluation(assets, **evaluation),
        resources=GPU_RESOURCES,
    )


def dp_trial(
    method: str,
    depth: int,
    *,
    epsilon: float,
    k: int,
    assets: Assets,
    seed: int = 0,
    delta: float | None = None,
) -> TrialConfig:
    """A DP trial on Oxford Flowers with the paper's DP hyper-parameters; k of 4k cached crops per step. ``delta``: None is
    the paper's 1/N; an explicit delta must be below 1/N (Flowers: 1/1020), e.g. 1e-5."""
    lr, epochs, clip = DP_SETTINGS[method]
    # the seed draws the evaluation's samples too (``paper_trial``); sampling touches no private data
    return TrialConfig(
        model=paper_model(depth, assets),
        data=DataConfig(
            dataset="flowers102",
            root=assets.dataset("flowers102"),
            resolution=256,
            cached_views=dp_cached_views(k),
            view_seed=seed,
        ),
        method=MethodConfig(name=method),
        privacy=PrivacyConfig(
            target_epsilon=epsilon,
            sampling_rate=DP_SAMPLING_RATE,
            max_grad_norm=clip,
            augmentation_multiplicity=k,
            delta=delta,
            accountant=paper_accountant(epsilon),
        ),
        optimization=OptimizationConfig(learning_rate=lr, epochs=epochs, warmup_steps=10, seed=seed),
        evaluation=paper_evaluation(assets, sampling_seed=seed),
        resources=GPU_RESOURCES,
    )


# --- smoke versions --------------------------------------------------------------------------------------------
TINY_DEPTHS = {
    16: 2,
    20: 3,
    24: 3,
    30: 4,
}  # keeps the depth axis (a deeper paper model -> a deeper tiny model)
SMOKE_PRETRAINING_STEPS = 150
SMOKE_STEPS = 6
SMOKE_BATCH_SIZE = 32  # a non-DP smoke trial's batch (a DP one's is Poisson at its sampling rate)
TINY_VOCABULARY, OFFICIAL_VOCABULARY = 256, 4096  # codebook sizes: the smoke's top-k keeps the trial's share
# A smoke run's k: at most 4 views an example, or 6 in two forwards where the paper trial spreads an example's views
# over forwards (k = 128 at 32 rows). The two differ so that the two routes stay two trials: resources are not in
# the trial id, and Table 2's k = 32 and k = 128 cells had one smoke id (k = 4), which ran whole, so no smoke sweep
# but table10's took the spread route.
SMOKE_MAX_VIEWS = 4
SMOKE_SPREAD_VIEWS = 6
SMOKE_CANARIES = (
    200  # an audited trial's smoke version audits at most this many canaries (beside 1,438 digits)
)
# Smoke runs of 6 steps checkpoint once, at step 3 (a quarter of the run would checkpoint every step). 64 rows per
# forward: a DP smoke batch (~72 examples x k views) goes through in several chunks, as a paper trial's does.
CPU_RESOURCES = ResourcesConfig(
    workers=1,
    gpus_per_worker=0.0,
    cpus_per_worker=1.0,
    checkpoint_every_steps=3,
    checkpoint_every_fraction=0.5,
    max_failures=1,
    rows_per_forward=64,
)


def tiny_model(depth: int = 2, *, pretraining_steps: int = SMOKE_PRETRAINING_STEPS) -> ModelConfig:
    return ModelConfig(base="tiny", depth=depth, tiny_pretraining_steps=pretraining_steps)


def smoke_version(config: TrialConfig, *, steps: int = SMOKE_STEPS) -> TrialConfig:
    """The same trial's axes (method, relative depth, epsilon, k capped at ``SMOKE_MAX_VIEWS``, seed, convergence
    on/off, its audit with at most ``SMOKE_CANARIES`` canaries) on the tiny base and offline digits, a few steps,
    the digit classifier's features (digits-cnn-v2) and one CPU worker, on the same DP route (``_smoke_resources``)."""
    privacy = config.privacy
    k = (
        1
        if privacy is None
        else SMOKE_SPREAD_VIEWS
        if _spreads_views(config)
        else min(privacy.augmentation_multiplicity, SMOKE_MAX_VIEWS)
    )
    if privacy is not None:
        # the trial's own clipping, accountant and delta rule: the smoke run takes its DP route
        privacy = dataclasses.replace(privacy, sampling_rate=0.05, augmentation_multiplicity=k)
    trains = config.method.name != "base"
    depth = TINY_DEPTHS[config.model.depth] if config.model.base == "official" else config.model.depth
    return TrialConfig(
        model=tiny_model(depth),
        # the trial's crops' seed: a second-seed point draws other crops, as its paper trial does
        data=DataConfig(dataset="digits", resolution=16, cached_views=k, view_seed=config.data.view_seed),
        method=_blocks_at_depth(config.method, depth=depth, of=config.model.depth),
        privacy=privacy,
        optimization=OptimizationConfig(
            learning_rate=1e-3,
            steps=steps if trains else 0,
            seed=config.optimization.seed,
            **({"batch_size": SMOKE_BATCH_SIZE} if privacy is None else {}),
        ),
        evaluation=EvaluationConfig(
            extractor="digits-cnn-v2",
            num_images=40,
            top_k=_smoke_top_k(config),
            batch_size=40,
            sampling_seed=config.evaluation.sampling_seed,
            convergence_every_steps=steps // 2 if _has_convergence(config) else 0,
            convergence_num_images=20,
        ),
        resources=_smoke_resources(config, k=k),
        audit=None
        if config.audit is None
        else dataclasses.replace(config.audit, canaries=min(config.audit.canaries, SMOKE_CANARIES)),
    )


def _spreads_views(config: TrialConfig) -> bool:
    """Whether the trial puts an example's k views through several forwards (k = 128 at 32 rows)."""
    rows, privacy = config.resources.rows_per_forward, config.privacy
    return (
        privacy is not None
        and privacy.augmentation_multiplicity > 1
        and 0 < rows < privacy.augmentation_multiplicity
    )


def _smoke_resources(config: TrialConfig, *, k: int) -> ResourcesConfig:
    """One CPU worker, on the paper trial's code path: a non-DP batch accumulated over two forwards (the paper's
    256 or 512 go through in forwards of 32); where the trial spreads an example's views over forwards, its smoke
    version's k views in two forwards."""
    if config.privacy is None:
        return dataclasses.replace(CPU_RESOURCES, rows_per_forward=SMOKE_BATCH_SIZE // 2)
    if not _spreads_views(config):
        return CPU_RESOURCES
    return dataclasses.replace(CPU_RESOURCES, rows_per_forward=k // 2)


def _smoke_top_k(config: TrialConfig) -> int:
    """An official trial's top-k filter at the same share of the tiny base's codebook (the paper's 900 of 4,096
    codes: 56 of 256), so the smoke run filters as the trial does; 0 (off) stays off, and a trial already on the
    tiny base keeps its own."""
    top_k = config.evaluation.top_k
    if top_k == 0 or config.model.base != "official":
        return top_k
    return max(1, round(top_k * TINY_VOCABULARY / OFFICIAL_VOCABULARY))


def _blocks_at_depth(method: MethodConfig, *, depth: int, of: int) -> MethodConfig:
    """``method`` with its ``train_blocks`` (of a model ``of`` blocks deep) at the same relative depths of a model
    ``depth`` blocks deep: VAR-d16's last four blocks 12..15 are block 1 of the 2-block smoke model."""
    if method.train_blocks is None or depth == of:
        return method
    blocks = tuple(sorted({b * depth // of for b in method.train_blocks}))
    return dataclasses.replace(method, train_blocks=blocks)


def _has_convergence(config: TrialConfig) -> bool:
    return bool(config.evaluation.convergence_every_steps or config.evaluation.convergence_points)


def unique(configs: list[TrialConfig]) -> list[TrialConfig]:
    """Configs in order, each trial once (smoke versions of different paper trials may coincide)."""
    seen, kept = set(), []
    for config in configs:
        if config.trial_id not in seen:
            seen.add(config.trial_id)
            kept.append(config)
    return kept


def paper_or_smoke(configs: list[TrialConfig], smoke: bool) -> list[TrialConfig]:
    return unique([smoke_version(c) for c in configs] if smoke else configs)
