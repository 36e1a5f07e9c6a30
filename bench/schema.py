"""What one trial is and what it leaves behind: ``TrialConfig`` (frozen, validated at construction) and the result
record written for every trial. Standard library only, so the launcher's dry run and ``analysis`` can read it
without torch or Ray.

The trial id is a SHA-256 of the canonical JSON of everything that determines the trial's numbers (model, data,
method, privacy, optimisation, evaluation). ``resources`` (workers, GPUs, checkpoint interval, retries) is left out:
the same experiment on another cluster shape is the same trial, so a relaunch on bigger hardware still skips it.
Files and datasets enter it by content where their content ids are known (``CONTENT_IDS``, filled by
``bench.preflight.identify``), so the same files mounted elsewhere are the same trial; paths stay in the config
as provenance. Every field is checked against its annotated type first (``_check_types``), then its range. An
integer given for a float field is stored as a float, so ``epsilon: 8`` and ``epsilon: 8.0`` are one trial.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import hashlib
import json
import math
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from .errors import VarsweepError

# 2: evaluation.cfg -> guidance_scale, optimization.max_grad_norm -> global_clip_norm; 3: integers in float fields
# are floats (one id for 8 and 8.0), privacy.physical_batch_rows -> resources.rows_per_forward (see upgrade_record)
SCHEMA_VERSION = 3
OLDER_SCHEMA_VERSIONS = (1, 2)  # read only to be upgraded (``upgrade_record``)
# Fields that left their section in a version bump: where they went (an old sweep file's error names it).
MOVED_FIELDS = {"privacy.physical_batch_rows": "resources.rows_per_forward (since schema version 3)"}
OFFICIAL_DEPTHS = (16, 20, 24, 30)
TINY_RESOLUTION = 16  # trainables.tiny_base.IMAGE_SIZE
OFFICIAL_RESOLUTION = 256
# "base": evaluate the base model, no training. In the order tables list methods (analysis.metrics.METHOD_LABELS).
METHODS = ("base", "full", "lora", "ln_tuning", "lora_attention", "lora_mlp")
# The closed sets of names, defined here once; every registry keyed by one of them is tested to hold exactly these
# (tests/test_closed_sets.py). trainables/models/ (torch only) keeps its own copy of CLASS_INITS, tested equal.
INCEPTION_EXTRACTOR, SUBSTITUTE_EXTRACTOR, DIGITS_EXTRACTOR = (
    "inception-v3-compat",
    "substitute-randconv-v1",
    "digits-cnn-v2",
)
EXTRACTORS = (INCEPTION_EXTRACTOR, SUBSTITUTE_EXTRACTOR, DIGITS_EXTRACTOR)  # digits-cnn-v2: digits only
# Extractors records may name but no trial may use any more, and why.
RETIRED_EXTRACTORS = {
    "digits-cnn-v1": "it was trained on the digits train split, the private data of DP trials, so their metrics "
    "were not covered by the privacy guarantee; use digits-cnn-v2 (trained on the test split)",
}
DIGITS_EXTRACTORS = (DIGITS_EXTRACTOR, *RETIRED_EXTRACTORS)
ACCOUNTANTS = ("rdp", "prv")
# Opacus's PRV accountant is read (and can calibrate) only up to this epsilon: its grid grows with epsilon (measured
# on 2 CPU cores, q = 0.05, 30 steps: 0.5 s at epsilon 100, 10 s and an infinite result at 1,000, 47 s and infinite
# at 10,000; a calibration at 1,000 over 319 steps ran past 500 s). Above it the ledger cross-checks with RDP only.
PRV_MAX_EPSILON = 100.0
# The calibration's domain (trainables.privacy): far beyond any meaningful budget (1e12 calibrates in ~3 s, 1e15
# never ends), and a budget beyond it guarantees nothing.
MAX_TARGET_EPSILON = 1e6
CLIPPING_MODES = ("auto", "bookkeeping", "hooks", "ghost")
LORA_TARGETS = (
    "attention",
    "mlp",
    "modulation",
)  # groups of a block's linears LoRA can target (trainables.methods)
# Each LoRA method's targets when method.lora_targets is None.
LORA_PRESETS = {
    "lora": ("attention", "mlp", "modulation"),
    "lora_attention": ("attention",),
    "lora_mlp": ("mlp",),
}
CLASS_INITS = (
    "unconditional",
    "mean",
    "normal",
)  # how new class-embedding rows start (models.resize_class_embedding)
STATUSES = ("success", "failed")


@dataclass(frozen=True)
class DatasetFacts:
    """Published split sizes (used for dry-run estimates; trials always count the real files)."""

    train_images: int
    test_images: int
    classes: int
    offline: bool = False


# REFERENCE.md §3; the two offline sets are generated locally (trainables/data/offline.py).
DATASETS = {
    "cub200": DatasetFacts(5994, 5794, 200),
    "food101": DatasetFacts(75750, 25250, 101),
    "flowers102": DatasetFacts(1020, 6149, 102),
    "oxford_pet": DatasetFacts(3680, 3669, 37),
    "stanford_cars": DatasetFacts(8144, 8041, 196),
    "folder": DatasetFacts(0, 0, 0),
    "digits": DatasetFacts(1438, 359, 10, offline=True),
    "shapes": DatasetFacts(2000, 500, 10, offline=True),
}


class ConfigError(VarsweepError):
    """An invalid trial configuration; the message names the field."""


def _require(condition: bool, field_name: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field_name}: {message}")


# Seeds are mixed into 64-bit generator seeds (e.g. ``seed * 1_000_003 + batch``): a 31-bit seed, as numpy's and
# most tools' take, leaves every such product in range; a larger one failed in the middle of a trial.
MAX_SEED = 2**31 - 1


def _check_seeds(config: TrialConfig) -> None:
    seeds = {
        "data.view_seed": config.data.view_seed,
        "optimization.seed": config.optimization.seed,
        "evaluation.sampling_seed": config.evaluation.sampling_seed,
        "audit.seed": None if config.audit is None else config.audit.seed,
    }
    for field_name, value in seeds.items():
        _require(
            value is None or 0 <= value <= MAX_SEED, field_name, f"must be in [0, {MAX_SEED}], got {value}"
        )


# --- field types: one generic check, derived from each section's annotations ---------------------------------
_TYPE_NAMES = {bool: "boolean", int: "integer", float: "finite number", str: "string", type(None): "null"}


@functools.cache
def _field_types(kind: type) -> dict[str, Any]:
    return typing.get_type_hints(kind)  # the annotations are strings (``from __future__ import annotations``)


def _accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` has the annotated type. ``bool`` is no integer here and NaN/inf are no numbers (no
    setting means them); an integer is a number. Tuples are ``tuple[X, ...]`` of X."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(option, value) for option in typing.get_args(hint))
    if hint is float:
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and (isinstance(value, int) or math.isfinite(value))
        )
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (bool, str, type(None)):
        return isinstance(value, hint)
    if typing.get_origin(hint) is tuple:
        element = typing.get_args(hint)[0]
        return isinstance(value, tuple) and all(_accepts(element, item) for item in value)
    raise TypeError(
        f"no type check for annotation {hint!r}: extend bench.schema._accepts"
    )  # a new kind of field


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"list of {_type_name(typing.get_args(hint)[0])}s"
    return _TYPE_NAMES[hint]


def _check_types(section: Any) -> None:
    """Refuse any field whose value is not of its annotated type, naming the field (runs first in every section's
    ``__post_init__``, so the range checks after it compare numbers with numbers); store an integer given for a
    float field as that float, so the config, its record and its trial id do not depend on how a number was
    written (8 or 8.0)."""
    name = _SECTION_NAMES[type(section)]
    for field_name, hint in _field_types(type(section)).items():
        value = getattr(section, field_name)
        _require(
            _accepts(hint, value),
            f"{name}.{field_name}",
            f"expected {_type_name(hint)}, got {value!r} ({type(value).__name__})",
        )
        try:
            declared = _as_declared(hint, value)
        except ValueError as err:
            raise ConfigError(f"{name}.{field_name}: {err}") from None
        object.__setattr__(section, field_name, declared)


def _as_declared(hint: Any, value: Any) -> Any:
    """``value`` (already accepted by ``hint``) with integers in float places made floats."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if isinstance(value, int) and not isinstance(value, bool) and float in options and int not in options:
        try:
            as_float = float(value)
        except OverflowError:
            as_float = math.inf
        if as_float != value:  # above 2**53 not every integer is a float: the id would hash a rounded number
            raise ValueError(f"{value} cannot be stored as a float exactly")
        return as_float
    if isinstance(value, tuple):
        element = next(typing.get_args(o)[0] for o in options if typing.get_origin(o) is tuple)
        return tuple(_as_declared(element, item) for item in value)
    return value


def _is_sha256(value: str | None) -> bool:
    return value is None or (len(value) == 64 and all(c in "0123456789abcdef" for c in value))


def _check_content_ids(section: Any, pairs: Mapping[str, str]) -> None:
    """Content ids (``<path field>: <id field>``): 64 lowercase hex characters, and only beside the path they identify."""
    name = _SECTION_NAMES[type(section)]
    for path_field, id_field in pairs.items():
        value = getattr(section, id_field)
        _require(
            _is_sha256(value),
            f"{name}.{id_field}",
            f"expected a SHA-256 (64 lowercase hex characters) or null, got {value!r}",
        )
        _require(
            value is None or getattr(section, path_field) is not None,
            f"{name}.{id_field}",
            f"identifies {name}.{path_field}, which is not set",
        )


@dataclass(frozen=True)
class ModelConfig:
    """base: "official" (VAR checkpoint of ``depth`` + the official VQVAE, local paths) or "tiny" (the built-in
    tiny base pre-trained offline on procedural glyphs for ``tiny_pretraining_steps``, cached in the sweep's cache
    folder; ``depth`` is its depth). ``*_sha256``: the checkpoint files' SHA-256 (hex); once set, the trial id
    follows them instead of the paths."""

    base: str = "tiny"
    depth: int = 2
    var_checkpoint: str | None = None
    vqvae_checkpoint: str | None = None
    tiny_pretraining_steps: int = (
        600  # tiny base only (0 for official): steps of VQVAE training and of VAR pre-training
    )
    var_checkpoint_sha256: str | None = (
        None  # content ids of the two files (filled by ``bench.preflight.identify``)
    )
    vqvae_checkpoint_sha256: str | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        _check_content_ids(
            self, {"var_checkpoint": "var_checkpoint_sha256", "vqvae_checkpoint": "vqvae_checkpoint_sha256"}
        )
        _require(
            self.base in ("official", "tiny"),
            "model.base",
            f"must be 'official' or 'tiny', got {self.base!r}",
        )
        if self.base == "official":
            _require(
                self.depth in OFFICIAL_DEPTHS,
                "model.depth",
                f"official VAR depths are {OFFICIAL_DEPTHS}, got {self.depth}",
            )
            _require(
                bool(self.var_checkpoint) and bool(self.vqvae_checkpoint),
                "model.var_checkpoint",
                "an official base needs local paths to the VAR and VQVAE checkpoints (nothing is downloaded)",
            )
            _require(self.tiny_pretraining_steps == 0, "model.tiny_pretraining_steps", "only for base='tiny'")
        else:
            _require(1 <= self.depth <= 8, "model.depth", f"the tiny base has depth 1..8, got {self.depth}")
            _require(
                self.var_checkpoint is None and self.vqvae_checkpoint is None,
                "model.var_checkpoint",
                "the tiny base is built in; checkpoint paths are for base='official'",
            )
            _require(
                self.tiny_pretraining_steps >= 1,
                "model.tiny_pretraining_steps",
                f"must be >= 1, got {self.tiny_pretraining_steps}",
            )


@dataclass(frozen=True)
class DataConfig:
    """dataset: a reader name (``trainables.data.datasets``) or an offline set; root: its local folder (None for
    offline sets); resolution in pixels; cached_views: random crops per training image in the token cache
    (k views per example are drawn from these); content_id: SHA-256 (hex) of the dataset name and the train and
    evaluation split listings' content ids (``ImageList.content_id``: relative paths, labels, sizes, sampled
    bytes); once set, the trial id follows it instead of ``root``."""

    dataset: str = "digits"
    root: str | None = None
    resolution: int = 16
    cached_views: int = 1
    view_seed: int = 0
    train_split: str = "train"
    evaluation_split: str = "test"
    skip_corrupt_images: bool = False
    content_id: str | None = None  # the two splits' content (filled by ``bench.preflight.identify``)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_content_ids(self, {"root": "content_id"})
        _require(
            self.dataset in DATASETS,
            "data.dataset",
            f"unknown dataset {self.dataset!r}; known: {sorted(DATASETS)}",
        )
        offline = DATASETS[self.dataset].offline
        _require(
            offline == (self.root is None),
            "data.root",
            "offline sets are generated locally and take no root"
            if offline
            else f"dataset {self.dataset!r} needs its local folder",
        )
        _require(
            self.resolution >= 8 and self.resolution % 8 == 0,
            "data.resolution",
            f"must be a multiple of 8, got {self.resolution}",
        )
        _require(self.cached_views >= 1, "data.cached_views", f"must be >= 1, got {self.cached_views}")


@dataclass(frozen=True)
class MethodConfig:
    """name: see ``METHODS``; LoRA rank/alpha; train_blocks restricts training to those blocks; scale_weight_decay:
    scale s weighs decay**s; prior_weight: prior-preservation KL weight (0 = off)."""

    name: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] | None = None
    train_blocks: tuple[int, ...] | None = None
    class_init: str = "unconditional"
    scale_weight_decay: float = 1.0
    prior_weight: float = 0.0

    def __post_init__(self) -> None:
        _check_types(self)
        # One spelling per training run, so one trial id: blocks (1, 0) and (0, 1, 1) train what (0, 1) trains.
        if self.train_blocks:
            object.__setattr__(self, "train_blocks", tuple(sorted(set(self.train_blocks))))
        if self.lora_targets and set(self.lora_targets) <= set(LORA_TARGETS):
            object.__setattr__(self, "lora_targets", tuple(t for t in LORA_TARGETS if t in self.lora_targets))
        _require(self.name in METHODS, "method.name", f"unknown method {self.name!r}; known: {list(METHODS)}")
        _require(
            self.lora_rank >= 1 and self.lora_alpha > 0,
            "method.lora_rank",
            "need lora_rank >= 1 and lora_alpha > 0",
        )
        _require(
            self.lora_targets is None or self.name.startswith("lora"),
            "method.lora_targets",
            f"only for LoRA methods, not {self.name!r}",
        )
        _require(
            self.lora_targets is None
            or (bool(self.lora_targets) and set(self.lora_targets) <= set(LORA_TARGETS)),
            "method.lora_targets",
            f"a non-empty list of {LORA_TARGETS}, got {self.lora_targets}",
        )
        _require(
            self.train_blocks is None or (bool(self.train_blocks) and min(self.train_blocks) >= 0),
            "method.train_blocks",
            f"a non-empty list of block indices >= 0, got {self.train_blocks}",
        )
        _require(
            self.class_init in CLASS_INITS,
            "method.class_init",
            f"one of {CLASS_INITS}, got {self.class_init!r}",
        )
        _require(
            0 < self.scale_weight_decay <= 1,
            "method.scale_weight_decay",
            f"must be in (0, 1], got {self.scale_weight_decay}",
        )
        _require(self.prior_weight >= 0, "method.prior_weight", f"must be >= 0, got {self.prior_weight}")


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD: target_epsilon for the whole run; delta None = 1/N; sampling_rate q (Poisson); max_grad_norm: C, the
    per-example clipping norm; augmentation_multiplicity k views averaged per example before clipping (how many
    rows go through one forward is ``resources.rows_per_forward``: it changes no number); clipping: "bookkeeping" (one backward, clipped sums
    rebuilt from layer inputs and output gradients), "hooks" (Opacus per-sample gradients), "ghost" (Opacus ghost
    clipping, k = 1 only) or "auto" (book-keeping where it has a rule for every trainable layer, else hooks);
    allow_delta_at_least_inverse_n: permit delta >= 1/N (a mechanism that may release a whole example)."""

    target_epsilon: float
    sampling_rate: float
    max_grad_norm: float
    delta: float | None = None
    augmentation_multiplicity: int = 1
    accountant: str = "rdp"
    clipping: str = "auto"
    allow_delta_at_least_inverse_n: bool = False

    def __post_init__(self) -> None:
        _check_types(self)
        _require(
            math.isfinite(self.target_epsilon) and self.target_epsilon > 0,
            "privacy.target_epsilon",
            f"must be finite and > 0, got {self.target_epsilon}",
        )
        _require(
            self.target_epsilon <= MAX_TARGET_EPSILON,
            "privacy.target_epsilon",
            f"must be at most {MAX_TARGET_EPSILON:.0e} (a budget beyond that guarantees nothing: train without "
            f"privacy, i.e. privacy null), got {self.target_epsilon:g}",
        )
        _require(
            0 < self.sampling_rate <= 1,
            "privacy.sampling_rate",
            f"must be in (0, 1], got {self.sampling_rate}",
        )
        _require(self.max_grad_norm > 0, "privacy.max_grad_norm", f"must be > 0, got {self.max_grad_norm}")
        _require(
            self.delta is None or 0 < self.delta < 1, "privacy.delta", f"must be in (0, 1), got {self.delta}"
        )
        _require(
            self.augmentation_multiplicity >= 1,
            "privacy.augmentation_multiplicity",
            f"must be >= 1, got {self.augmentation_multiplicity}",
        )
        _require(
            self.accountant in ACCOUNTANTS,
            "privacy.accountant",
            f"one of {ACCOUNTANTS}, got {self.accountant!r}",
        )
        _require(
            self.accountant != "prv" or self.target_epsilon <= PRV_MAX_EPSILON,
            "privacy.accountant",
            f"the PRV accountant calibrates only up to epsilon {PRV_MAX_EPSILON:g} (Opacus's PRV grid grows with "
            f"epsilon: a calibration at 1,000 ran past 500 s), got target_epsilon {self.target_epsilon:g}; use 'rdp'",
        )
        _require(
            self.clipping in CLIPPING_MODES,
            "privacy.clipping",
            f"one of {CLIPPING_MODES}, got {self.clipping!r}",
        )
        _require(
            self.clipping != "ghost" or self.augmentation_multiplicity == 1,
            "privacy.clipping",
            "ghost clipping cannot average k > 1 views before clipping; use 'bookkeeping' or 'hooks'",
        )

    def expected_batch(self, dataset_size: int) -> int:
        """floor(q N), the paper's expected batch (examples): DP-SGD divides the noisy clipped sum by it, and compute
        is accounted at it (the actual Poisson batch size is private). The 1e-9 keeps q = m/N at m, not m - 1."""
        return math.floor(self.sampling_rate * dataset_size + 1e-9)


@dataclass(frozen=True)
class OptimizationConfig:
    """Exactly one of epochs (passes over the training split; under DP one epoch is 1/q steps) or steps.
    batch_size: examples per non-DP step; global_clip_norm: non-DP clipping of the whole gradient's norm (None =
    off). Under DP neither applies (batches are Poisson with rate q, each example is clipped to privacy's C): a DP
    trial leaves both at their defaults (``NON_DP_ONLY``) and its id does not depend on them. Schedule: linear
    warm-up, cosine.
    autocast_bf16: forward passes run under bf16 autocast on CUDA devices (weights, optimiser state and DP clipping
    norms stay float32; CPU runs are float32 whatever this says)."""

    learning_rate: float = 1e-4
    batch_size: int = 256
    epochs: float | None = None
    steps: int | None = None
    warmup_steps: int = 0
    weight_decay: float = 0.05
    class_dropout: float = 0.1
    global_clip_norm: float | None = 2.0
    seed: int = 0
    schedule: str = "cosine"
    autocast_bf16: bool = True

    def __post_init__(self) -> None:
        _check_types(self)
        _require(
            self.learning_rate > 0, "optimization.learning_rate", f"must be > 0, got {self.learning_rate}"
        )
        _require(self.batch_size >= 1, "optimization.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(
            (self.epochs is None) != (self.steps is None),
            "optimization.epochs",
            "give exactly one of epochs and steps",
        )
        _require(
            self.epochs is None or self.epochs > 0, "optimization.epochs", f"must be > 0, got {self.epochs}"
        )
        _require(
            self.steps is None or self.steps >= 0, "optimization.steps", f"must be >= 0, got {self.steps}"
        )
        _require(
            self.warmup_steps >= 0, "optimization.warmup_steps", f"must be >= 0, got {self.warmup_steps}"
        )
        _require(
            0 <= self.class_dropout < 1,
            "optimization.class_dropout",
            f"must be in [0, 1), got {self.class_dropout}",
        )
        _require(
            self.schedule == "cosine",
            "optimization.schedule",
            f"only 'cosine' (warm-up + cosine) exists, got {self.schedule!r}",
        )


@dataclass(frozen=True)
class EvaluationConfig:
    """Sampling: classifier-free guidance scale ``guidance_scale``, ``top_k`` / ``top_p`` filters (0 = off). num_images None = per
    class as many as the evaluation split has; the convergence curve adds a FID on ``convergence_num_images``
    images every convergence_every_steps steps, or at convergence_points evenly spaced steps of the planned run
    (at most one of the two; 0 = off)."""

    extractor: str = "inception-v3-compat"
    inception_weights: str | None = None
    num_images: int | None = None
    guidance_scale: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    batch_size: int = 32
    sampling_seed: int = 0
    convergence_every_steps: int = 0
    convergence_num_images: int = 1000
    convergence_points: int = 0
    inception_weights_sha256: str | None = (
        None  # content id of the weights file (filled by ``bench.preflight.identify``)
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _check_content_ids(self, {"inception_weights": "inception_weights_sha256"})
        _require(  # a retired one is read (records), refused at launch (``TrialConfig.check_launchable``)
            self.extractor in EXTRACTORS or self.extractor in RETIRED_EXTRACTORS,
            "evaluation.extractor",
            f"one of {EXTRACTORS}, got {self.extractor!r}",
        )
        _require(
            self.extractor != "inception-v3-compat" or bool(self.inception_weights),
            "evaluation.inception_weights",
            "Inception-v3 needs a local weights file (weights-inception-2015-12-05-6726825d.pth); nothing is downloaded",
        )
        _require(
            self.num_images is None or self.num_images >= 2,
            "evaluation.num_images",
            f"must be >= 2, got {self.num_images}",
        )
        # Exactly the sampler's own ranges (``VAR.sample``, ``check_sampling_settings``), refused here before any
        # compute: top_k=0 and top_p=0 switch those filters off; top_p=1 is no valid nucleus.
        _require(
            self.guidance_scale >= 0, "evaluation.guidance_scale", f"must be >= 0, got {self.guidance_scale}"
        )
        _require(self.top_k >= 0, "evaluation.top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        _require(0 <= self.top_p < 1, "evaluation.top_p", f"must be in [0, 1) (0 = off), got {self.top_p}")
        _require(self.batch_size >= 1, "evaluation.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(
            self.convergence_every_steps >= 0 and self.convergence_num_images >= 2,
            "evaluation.convergence_every_steps",
            "need convergence_every_steps >= 0 and convergence_num_images >= 2",
        )
        _require(
            self.convergence_points >= 0,
            "evaluation.convergence_points",
            f"must be >= 0, got {self.convergence_points}",
        )
        _require(
            not (self.convergence_points and self.convergence_every_steps),
            "evaluation.convergence_points",
            "give convergence_points or convergence_every_steps, not both",
        )


# Images an evaluation scores at least: precision/recall take each image's 3 nearest neighbours within its own set
# (``trainables.evaluation.evaluate.ScoringSettings.neighborhood``), so a set of fewer than 4 cannot be scored.
MIN_EVALUATION_IMAGES = 4


# Canary kinds of a privacy audit (``trainables.audit``): "glyphs", procedural glyph images out of every dataset's
# domain, each with a uniformly random label of the dataset's classes.
CANARY_KINDS = ("glyphs",)
MIN_CANARIES, MAX_CANARIES = 20, 100_000  # fewer than 20 cannot move the bound; more only costs scoring time


@dataclass(frozen=True)
class AuditConfig:
    """An empirical privacy audit in one training run (Steinke, Nasr & Jagielski 2023): ``canaries`` (m) canaries
    of ``canary_kind``, each included in the training set independently with probability 1/2; ``seed`` draws the
    canaries and which are included (from a stream of its own, never the training's); ``confidence`` of the
    epsilon lower bound. The canaries never enter the evaluation.
    ``delta``: the delta a trial *without* DP is audited at (None: 1/N', what a DP trial on the same N' examples
    resolves by default); set it to the delta of the DP trials it is compared with. A DP trial is always audited at
    its own delta, so there it must stay None. The one-run bound is ~0 unless 2 m delta is small beside the
    significance (e.g. m = 100 canaries and delta = 1/1500 give 0 even for perfect guesses): small sets need an
    explicit small delta (privacy.delta with DP, this without)."""

    canaries: int = 256
    canary_kind: str = "glyphs"
    seed: int = 0
    confidence: float = 0.95
    delta: float | None = None

    def __post_init__(self) -> None:
        _check_types(self)
        _require(
            MIN_CANARIES <= self.canaries <= MAX_CANARIES,
            "audit.canaries",
            f"must be in [{MIN_CANARIES}, {MAX_CANARIES}], got {self.canaries}",
        )
        _require(
            self.canary_kind in CANARY_KINDS,
            "audit.canary_kind",
            f"one of {CANARY_KINDS}, got {self.canary_kind!r}",
        )
        _require(self.seed >= 0, "audit.seed", f"must be >= 0, got {self.seed}")
        _require(0.5 < self.confidence < 1, "audit.confidence", f"must be in (0.5, 1), got {self.confidence}")
        _require(
            self.delta is None or 0 < self.delta < 1, "audit.delta", f"must be in (0, 1), got {self.delta}"
        )


# resources.attention_kernel: "auto" and trainables.models.ATTENTION_KERNELS (tested equal; the schema imports no
# torch). "auto" runs per-scale SDPA: the masked kernel's numbers up to rounding, without the hidden pairs' FLOPs.
ATTENTION_KERNEL_CHOICES = ("auto", "masked", "per_scale", "flex")
AUTO_ATTENTION_KERNEL = "per_scale"
# The DP clipping modes resources.compile and resources.compile_sampling compose with ("auto" is book-keeping for
# every adapted VAR).
COMPILE_CLIPPING = ("auto", "bookkeeping")
# The clipping modes that may spread one example's k views over several forwards (resources.rows_per_forward < k):
# book-keeping clips an example's gradient accumulated over its forwards; Opacus's hooks and ghost clipping take it
# from the one forward that holds all its views.
VIEW_SPLITTING_CLIPPING = ("auto", "bookkeeping")
# Why each compiled path is refused with Opacus's hooks and ghost clipping.
COMPILE_REFUSALS = {
    "compile": "Opacus's per-layer hooks recompile the blocks for every layer, ghost clipping's second backward "
    "cannot run through compiled ones",
    "compile_sampling": "the convergence curve samples while Opacus's module hooks are on the model, and they "
    "break each compiled scale step into a graph per layer",
}


@dataclass(frozen=True)
class ResourcesConfig:
    """workers: DDP processes; gpus_per_worker: at most 1 to launch (a worker trains on one device), a fraction
    only for single-worker trials (NCCL cannot share a GPU between ranks); a trial checkpoints (for retries and
    preemptions) at whichever comes first of every checkpoint_every_steps steps, every checkpoint_every_minutes of training and every checkpoint_every_fraction of
    its planned steps; max_failures: retries of a failed run.

    How the training computes, none of which changes its numbers beyond float rounding (so none enters the trial
    id): attention_kernel, the training forward's scale-causal attention (``ATTENTION_KERNEL_CHOICES``; "auto" is
    ``AUTO_ATTENTION_KERNEL``, per-scale SDPA over exactly the visible pairs; "flex" cannot train on a CPU, which
    has no FlexAttention backward); compile: ``torch.compile`` every transformer block before training (not with
    Opacus hooks or ghost clipping, see ``TrialConfig``); rows_per_forward: the most rows (examples x k views) one
    worker puts through one forward and backward, with or without DP, the rest of its share of the batch
    accumulated over further forwards into the same gradient (0: the whole share at once). Under DP, fewer rows than
    k put one example per forward and spread its views over several, its gradient accumulated before it is clipped
    (book-keeping clipping only, ``VIEW_SPLITTING_CLIPPING``; with Opacus's an example's views share a forward, so
    it is 0 or at least k). It bounds memory for any batch size and k, Poisson batches included; a smaller GPU
    lowers it and keeps the trial id. compile_sampling: evaluations (the final one and the
    convergence curve's) draw with each scale's step ``torch.compile``'d (``VAR.sample(compiled=True)``; CUDA graphs
    on CUDA), every batch padded to ``evaluation.batch_size`` (rows that draw nothing and are not decoded) so one
    compile serves them all; the images are eager sampling's up to float rounding, and their record says which
    path drew them."""

    workers: int = 1
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    checkpoint_every_steps: int = 500
    checkpoint_every_minutes: float = 30.0
    checkpoint_every_fraction: float = 0.25
    max_failures: int = 2
    attention_kernel: str = "auto"
    compile: bool = False
    rows_per_forward: int = 256
    compile_sampling: bool = False

    def __post_init__(self) -> None:
        _check_types(self)
        _require(self.workers >= 1, "resources.workers", f"must be >= 1, got {self.workers}")
        _require(
            self.gpus_per_worker >= 0 and self.cpus_per_worker > 0,
            "resources.gpus_per_worker",
            "need gpus >= 0 and cpus > 0",
        )
        _require(
            self.workers == 1
            or self.gpus_per_worker in (0, 1)
            or self.gpus_per_worker == int(self.gpus_per_worker),
            "resources.gpus_per_worker",
            "fractional GPUs only for single-worker trials (DDP ranks cannot share a GPU)",
        )
        _require(
            self.checkpoint_every_steps >= 1 and self.max_failures >= 0,
            "resources.checkpoint_every_steps",
            "need checkpoint_every_steps >= 1 and max_failures >= 0",
        )
        _require(
            self.checkpoint_every_minutes > 0,
            "resources.checkpoint_every_minutes",
            f"must be > 0, got {self.checkpoint_every_minutes}",
        )
        _require(
            0 < self.checkpoint_every_fraction <= 1,
            "resources.checkpoint_every_fraction",
            f"must be in (0, 1], got {self.checkpoint_every_fraction}",
        )
        _require(
            self.attention_kernel in ATTENTION_KERNEL_CHOICES,
            "resources.attention_kernel",
            f"must be one of {ATTENTION_KERNEL_CHOICES}, got {self.attention_kernel!r}",
        )
        _require(
            self.rows_per_forward >= 0,
            "resources.rows_per_forward",
            f"must be >= 0 (0: the whole local batch in one forward), got {self.rows_per_forward}",
        )

    @property
    def runs_on_cpu(self) -> bool:
        """Workers without a GPU train on their CPUs."""
        return self.gpus_per_worker == 0

    @property
    def training_attention_kernel(self) -> str:
        """The kernel the training forward runs: ``attention_kernel`` with "auto" resolved."""
        return AUTO_ATTENTION_KERNEL if self.attention_kernel == "auto" else self.attention_kernel


FLEX_ON_CPU = "'flex' cannot train on a CPU (FlexAttention has no CPU backward); use 'auto' or 'per_scale'"


# Fields added after a schema version's first results: they enter the trial id only when they differ from this
# default, so results written before they existed keep their ids (and relaunches keep skipping them). Emptied at
# each version bump (a new version changes the ids anyway).
LATER_FIELDS: dict[tuple[str, str], Any] = {}
# Optimisation fields that only a non-DP trial uses: a DP trial keeps their defaults and its id leaves them out.
NON_DP_ONLY = {"batch_size": 256, "global_clip_norm": 2.0}
LORA_ONLY = ("lora_rank", "lora_alpha")  # only a LoRA method's adapters read them


def _check_lora_only(method: MethodConfig) -> None:
    """A method that is not LoRA leaves LoRA's rank and alpha at their defaults: it does not read them, and the
    trial id hashes them, so a sweep crossing methods with LoRA ranks trained full fine-tuning once per rank. A
    LoRA method's targets spelled as its preset are refused likewise: the same run as None under another id
    (checked at launch, so that results written before the rules stay readable)."""
    for name in LORA_ONLY if method.name not in LORA_PRESETS else ():
        default = MethodConfig.__dataclass_fields__[name].default
        _require(
            getattr(method, name) == default,
            f"method.{name}",
            f"method {method.name!r} does not read it (LoRA methods only): leave it at its default {default}",
        )
    # The targets are sorted by __post_init__, so one comparison finds every spelling of a preset: the method's own,
    # or another LoRA method's (lora with ["attention"] is lora_attention's run under another id and label).
    preset = next((name for name, targets in LORA_PRESETS.items() if method.lora_targets == targets), None)
    _require(
        preset is None,
        "method.lora_targets",
        f"{list(method.lora_targets or ())} are method {preset!r}'s own targets: "
        + (
            "leave it unset (null)"
            if preset == method.name
            else f"use method {preset!r} with it unset (null)"
        )
        + ", the one spelling of this training run (its trial id hashes the field as written)",
    )


def _check_one_spelling(config: TrialConfig) -> None:
    """Fields a run does not read, or values spelled two ways, hash one training run under two ids (a sweep would
    train it twice): a delta rule with no delta given (delta None is 1/N, which the rule does not govern), and a
    number written as -0.0 (JSON keeps its sign). Checked at launch, so results written before stay readable."""
    privacy = config.privacy
    _require(
        privacy is None or privacy.delta is not None or not privacy.allow_delta_at_least_inverse_n,
        "privacy.allow_delta_at_least_inverse_n",
        "only governs a delta given in privacy.delta (null is 1/N): leave it false",
    )
    for section in dataclasses.fields(config):
        part = getattr(config, section.name)
        for entry in dataclasses.fields(part) if dataclasses.is_dataclass(part) else ():
            value = getattr(part, entry.name)
            _require(
                not (isinstance(value, float) and value == 0 and math.copysign(1.0, value) < 0),
                f"{section.name}.{entry.name}",
                "is -0.0: write 0 (the trial id hashes the sign)",
            )


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "method": MethodConfig,
    "privacy": PrivacyConfig,
    "optimization": OptimizationConfig,
    "evaluation": EvaluationConfig,
    "resources": ResourcesConfig,
    "audit": AuditConfig,
}
# Sections that may be None. ``privacy`` is written as null; a section added after the first results
# (``LATER_SECTIONS``) is left out of ``to_dict`` at None (hence of the trial id, so ids of trials written before it
# existed stay) and read as None where a record lacks it.
OPTIONAL_SECTIONS = ("privacy", "audit")
LATER_SECTIONS = ("audit",)
_SECTION_NAMES = {kind: name for name, kind in SECTIONS.items()}

PATH_FIELDS = (
    ("model", "var_checkpoint"),
    ("model", "vqvae_checkpoint"),
    ("data", "root"),
    ("evaluation", "inception_weights"),
)
# The content id of each path field: where it is set, the trial id hashes it instead of the path (the same files
# under another mount are the same trial); a path without its content id stays in the hash.
CONTENT_IDS = {
    ("model", "var_checkpoint"): "var_checkpoint_sha256",
    ("model", "vqvae_checkpoint"): "vqvae_checkpoint_sha256",
    ("data", "root"): "content_id",
    ("evaluation", "inception_weights"): "inception_weights_sha256",
}


@dataclass(frozen=True)
class TrialConfig:
    """One trial. ``privacy`` None = no DP. Build with keywords; every section validates itself, then the
    cross-section rules below run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    privacy: PrivacyConfig | None = None
    optimization: OptimizationConfig = field(default_factory=lambda: OptimizationConfig(steps=100))
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    audit: AuditConfig | None = None

    def __post_init__(self) -> None:
        for name, kind in SECTIONS.items():
            value = getattr(self, name)
            _require(
                isinstance(value, kind) or (name in OPTIONAL_SECTIONS and value is None),
                name,
                f"must be a {kind.__name__}",
            )
        if self.model.base == "official":
            _require(
                self.data.resolution == OFFICIAL_RESOLUTION,
                "data.resolution",
                f"the official VQVAE works at {OFFICIAL_RESOLUTION}px, got {self.data.resolution}",
            )
        trains = self.method.name != "base"
        _require(
            trains or self.privacy is None, "privacy", "method 'base' trains nothing, so DP does not apply"
        )
        _require(
            trains or self.audit is None,
            "audit",
            "method 'base' trains nothing, so there is no membership to audit",
        )
        _require(
            self.audit is None or self.audit.delta is None or self.privacy is None,
            "audit.delta",
            "a DP trial is audited at its own delta (privacy.delta): leave audit.delta null",
        )
        _require(
            trains or self.optimization.steps == 0,
            "optimization.steps",
            "method 'base' evaluates the base model: set steps=0",
        )
        _require(
            not trains or self.optimization.steps != 0,
            "optimization.steps",
            "a training method needs steps >= 1 (or epochs)",
        )
        if self.privacy is not None:
            for name, default in NON_DP_ONLY.items():
                _require(
                    getattr(self.optimization, name) == default,
                    f"optimization.{name}",
                    f"does not apply under DP (batches are Poisson with rate privacy.sampling_rate, each example is "
                    f"clipped to privacy.max_grad_norm): leave it at its default {default}",
                )
            for name, why in COMPILE_REFUSALS.items():
                _require(
                    not getattr(self.resources, name) or self.privacy.clipping in COMPILE_CLIPPING,
                    f"resources.{name}",
                    f"does not compose with privacy.clipping={self.privacy.clipping!r} ({why}): use clipping in "
                    f"{COMPILE_CLIPPING} or {name}=false",
                )
            _require(
                self.privacy.augmentation_multiplicity <= self.data.cached_views,
                "privacy.augmentation_multiplicity",
                f"k={self.privacy.augmentation_multiplicity} distinct views need data.cached_views >= k (got {self.data.cached_views})",
            )
            _require(
                self.resources.rows_per_forward == 0
                or self.resources.rows_per_forward >= self.privacy.augmentation_multiplicity
                or self.privacy.clipping in VIEW_SPLITTING_CLIPPING,
                "resources.rows_per_forward",
                f"{self.resources.rows_per_forward} rows cannot hold one example's k="
                f"{self.privacy.augmentation_multiplicity} views, which share a forward with "
                f"privacy.clipping={self.privacy.clipping!r}: use 0, at least k, or clipping in "
                f"{VIEW_SPLITTING_CLIPPING} (which spreads an example's views over forwards)",
            )
        _require(
            not (self.evaluation.convergence_every_steps or self.evaluation.convergence_points) or trains,
            "evaluation.convergence_every_steps",
            "method 'base' has no training steps",
        )
        _require(
            self.evaluation.extractor not in DIGITS_EXTRACTORS or self.data.dataset == "digits",
            "evaluation.extractor",
            f"{self.evaluation.extractor} is a digit classifier's features, for data.dataset='digits' only (got "
            f"{self.data.dataset!r})",
        )

    # --- identity and serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; the ``LATER_SECTIONS`` only when set."""
        values = json.loads(json.dumps(dataclasses.asdict(self)))
        return {k: v for k, v in values.items() if not (k in LATER_SECTIONS and v is None)}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> TrialConfig:
        """The config of a record (``to_dict``'s output): every section present (``privacy`` null without DP), so
        a record that lost a section is refused rather than read with defaults."""
        _require(
            isinstance(record, Mapping),
            "config",
            f"expected an object of sections, got {type(record).__name__}",
        )
        unknown = set(record) - set(SECTIONS)
        missing = set(SECTIONS) - set(record) - set(LATER_SECTIONS)  # older records lack those
        _require(not unknown, "config", f"unknown sections {sorted(unknown)}")
        sections = {
            name: None
            if (name in OPTIONAL_SECTIONS and record[name] is None)
            else _section(kind, record[name], name)
            for name, kind in SECTIONS.items()
            if name in record
        }
        _require(
            not missing,
            "config",
            f"missing sections {sorted(missing)} (privacy is null for a trial without DP)",
        )
        return cls(**sections)

    @property
    def trial_id(self) -> str:
        """What determines the trial's numbers: every section but ``resources``; the content ids of its files and
        dataset in place of their paths where they are known (``CONTENT_IDS``)."""
        identity = {k: v for k, v in self.to_dict().items() if k != "resources"}
        for (section, path_field), id_field in CONTENT_IDS.items():
            if identity.get(section) is not None and identity[section].get(id_field) is not None:
                del identity[section][path_field]
        if identity["privacy"] is not None:
            for name in NON_DP_ONLY:
                del identity["optimization"][name]
        for (
            section,
            name,
        ), default in LATER_FIELDS.items():  # at their default they leave earlier ids unchanged
            if identity.get(section) is not None and identity[section].get(name) == default:
                del identity[section][name]
        return hashlib.sha256(
            json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()[:16]

    @property
    def label(self) -> str:
        """Short human-readable name for progress tables: method, depth, dataset, epsilon, k, seed."""
        dp = (
            ""
            if self.privacy is None
            else f"-eps{self.privacy.target_epsilon:g}-k{self.privacy.augmentation_multiplicity}"
        )
        audit = "" if self.audit is None else f"-audit{self.audit.canaries}"
        return (
            f"{self.method.name}-d{self.model.depth}-{self.data.dataset}{dp}{audit}-s{self.optimization.seed}"
        )

    def check_launchable(self) -> None:
        """Rules a trial must meet to start, beyond those every stored record meets (``__post_init__``): added
        later, they are checked where trials are planned (``trainables.plan.plan_trial``: the sweep's driver and
        each trial, before any compute), so results written before them stay readable."""
        e, o, m = self.evaluation, self.optimization, self.method
        _check_seeds(self)
        _check_lora_only(m)
        _check_one_spelling(self)
        _require(  # a run that ends inside its warm-up never reaches its learning rate (with epochs: plan_trial;
            # 0 steps: the base model, which trains nothing)
            not o.steps or o.warmup_steps <= o.steps,
            "optimization.warmup_steps",
            f"{o.warmup_steps} is more than the run's {o.steps} steps: it would never reach its learning rate",
        )
        _require(  # a worker trains on one device: a second GPU would sit reserved, idle, and counted as used
            self.resources.gpus_per_worker <= 1,
            "resources.gpus_per_worker",
            f"each worker trains on one GPU, got {self.resources.gpus_per_worker:g}; for more GPUs per trial "
            "raise resources.workers (one DDP worker per GPU)",
        )
        _require(
            e.extractor not in RETIRED_EXTRACTORS,
            "evaluation.extractor",
            f"{e.extractor} is retired: {RETIRED_EXTRACTORS.get(e.extractor)}",
        )
        _require(  # the tiny base's VQVAE and VAR scales are built for its glyphs' size
            self.model.base != "tiny" or self.data.resolution == TINY_RESOLUTION,
            "data.resolution",
            f"the tiny base works at {TINY_RESOLUTION}px, got {self.data.resolution}",
        )
        for name, count in (
            ("num_images", e.num_images),
            ("convergence_num_images", e.convergence_num_images),
        ):
            _require(
                count is None or count >= MIN_EVALUATION_IMAGES,
                f"evaluation.{name}",
                f"must be >= {MIN_EVALUATION_IMAGES} (precision/recall's 3 nearest neighbours), got {count}",
            )
        # AdamW checks neither: a negative decay grows the weights every step, a negative norm flips the gradient.
        _require(o.weight_decay >= 0, "optimization.weight_decay", f"must be >= 0, got {o.weight_decay}")
        _require(
            o.global_clip_norm is None or o.global_clip_norm > 0,
            "optimization.global_clip_norm",
            f"must be > 0, or null for no clipping, got {o.global_clip_norm}",
        )
        _require(
            m.train_blocks is None or max(m.train_blocks) < self.model.depth,
            "method.train_blocks",
            f"{m.train_blocks} names a block beyond the model's depth {self.model.depth} (blocks 0.."
            f"{self.model.depth - 1})",
        )
        _require(
            m.name == "base"
            or not (self.resources.runs_on_cpu and self.resources.training_attention_kernel == "flex"),
            "resources.attention_kernel",
            f"{FLEX_ON_CPU} (resources.gpus_per_worker is 0)",
        )
        workers = self.resources.workers
        _require(  # every rank draws its share of a non-DP batch (``trainables.finetune.check_finetune``)
            self.privacy is not None or m.name == "base" or o.batch_size >= workers,
            "optimization.batch_size",
            f"{o.batch_size} examples cannot be shared by {workers} processes; use a batch of at least "
            f"{workers} or fewer workers",
        )

    def planned_steps(self, train_images: int) -> int:
        """Optimiser steps for a training split of ``train_images`` examples (epochs converted by the batch size,
        or under DP by the expected Poisson batch q*N: one epoch = 1/q steps)."""
        if self.optimization.steps is not None:
            return self.optimization.steps
        if self.privacy is not None:
            return max(1, math.ceil(self.optimization.epochs / self.privacy.sampling_rate))
        return max(1, math.ceil(self.optimization.epochs * train_images / self.optimization.batch_size))

    def convergence_steps(self, planned_steps: int) -> tuple[int, ...]:
        """The convergence curve's points for a run of ``planned_steps`` (``evaluation_steps`` of the evaluation
        section; empty without a curve or without training): each scores ``evaluation.convergence_num_images``
        generated images, beside the final evaluation's."""
        e = self.evaluation
        if not (planned_steps and (e.convergence_every_steps or e.convergence_points)):
            return ()
        return tuple(
            evaluation_steps(planned_steps, every=e.convergence_every_steps, points=e.convergence_points)
        )


def evaluation_steps(planned_steps: int, *, every: int = 0, points: int = 0) -> list[int]:
    """The convergence curve's points, as steps done (1..planned_steps): every ``every`` steps, or ``points``
    evenly spaced steps (step ceil(i * planned / points) for i = 1..points; fewer when the run is shorter), and
    always the final step. Pure: every rank, a resumed run and the dry-run estimate compute the same list."""
    if every:
        chosen = set(range(every, planned_steps + 1, every))
    else:
        chosen = {-(-i * planned_steps // points) for i in range(1, points + 1)}
    return sorted(chosen | {planned_steps})


def _section(kind: type, record: Mapping[str, Any], name: str):
    _require(
        isinstance(record, Mapping),
        name,
        f"expected an object of fields, got {record!r} ({type(record).__name__})",
    )
    fields = dataclasses.fields(kind)
    known = {f.name for f in fields}
    unknown = set(record) - known
    _require(not unknown, name, f"unknown fields {sorted(unknown)}; known: {sorted(known)}")
    required = {
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    _require(required <= set(record), name, f"missing fields {sorted(required - set(record))}")
    return kind(**_tuples(record))


def _tuples(values: Mapping[str, Any]) -> dict[str, Any]:
    """JSON lists as the tuples the frozen configs hold (their other checks then see the element types)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def is_uri(location: str) -> bool:
    return "://" in location


def storage_child(location: str, *parts: str) -> str:
    """``location``/parts: a local path, or a URI with the parts added to its path and its query kept at the end
    (``s3://b/runs?region=x`` -> ``s3://b/runs/train?region=x``; appended text would land in the query)."""
    if not is_uri(location):
        return str(Path(location, *parts))
    split = urllib.parse.urlsplit(location)
    return urllib.parse.urlunsplit(split._replace(path="/".join([split.path.rstrip("/"), *parts])))


def absolute(location: str) -> str:
    """A local path made absolute, ``~`` expanded and symbolic links resolved (the driver's view of the file is
    what every worker gets: a link only the driver's machine has, such as ``~/data`` to a shared mount, still
    reaches the mount on the others); a URI (``s3://...``) unchanged."""
    return location if is_uri(location) else str(Path(location).expanduser().resolve())


def with_absolute_paths(config: TrialConfig) -> TrialConfig:
    """The config with every local file or folder it names made absolute (the driver does this once, before any
    trial reaches Ray, whose workers run in folders of their own). A config whose paths are absolute is unchanged."""
    changes: dict[str, dict[str, str]] = {}
    for section, name in PATH_FIELDS:
        value = getattr(getattr(config, section), name)
        if value is not None and absolute(value) != value:
            changes.setdefault(section, {})[name] = absolute(value)
    return replace(config, **changes) if changes else config


def replace(config: TrialConfig, **sections: Mapping[str, Any] | None) -> TrialConfig:
    """A copy with fields of the named sections changed, e.g. ``replace(c, method={"name": "lora"}, privacy=None)``."""
    changes = {}
    for name, values in sections.items():
        _require(name in SECTIONS, name, "unknown section")
        current = getattr(config, name)
        if values is None or current is None:
            changes[name] = None if values is None else _section(SECTIONS[name], values, name)
        else:
            _require(
                isinstance(values, Mapping),
                name,
                f"expected an object of fields, got {type(values).__name__}",
            )
            unknown = set(values) - {f.name for f in dataclasses.fields(current)}
            _require(not unknown, name, f"unknown fields {sorted(unknown)}")
            changes[name] = dataclasses.replace(current, **_tuples(values))
    return dataclasses.replace(config, **changes)


# --- results --------------------------------------------------------------------------------------------------
# The result record, typed. Each section is described below (value types: int, float - an int is a float here -,
# str, bool, None, nested); ``check_result`` checks every key and value against these descriptions.
# Rules: a key a section does not define is refused (a renamed key fails loudly, never reads as a silent NaN);
# a ``NotRequired`` key is a quantity a record may lack (absent = not measured: a record of published values,
# a trial without a classifier), every other key is present in every recorded section. A section is either
# recorded (every required key) or empty (``{}``, ``[]`` or null: not recorded, e.g. a failed trial's metrics),
# never partial. Every key ``trainables.trial.run_trial`` writes is defined here (tests/test_result_record.py).


class ResultMetrics(TypedDict):
    """Final evaluation (``trainables.evaluation.evaluate``): FID; precision and recall as fractions; KID mean and
    standard deviation over subsets; class accuracy (fraction) where a classifier exists (digits)."""

    fid: float
    precision: NotRequired[float]
    recall: NotRequired[float]
    kid_mean: NotRequired[float]
    kid_std: NotRequired[float]
    class_accuracy: NotRequired[float]
    class_accuracy_per_class: NotRequired[list[float | None]]  # None: a class with no generated image


class HistoryEntry(TypedDict):
    """One logged training step: step number, seconds since this attempt's training began, learning rate; the
    loss and global gradient norm without DP, the RDP epsilon spent so far with DP, the prior KL with a prior."""

    step: int
    seconds: float
    lr: float
    loss: NotRequired[float]
    grad_norm: NotRequired[float]
    epsilon_rdp: NotRequired[float]
    prior_kl: NotRequired[float]


class ConvergenceEntry(TypedDict):
    """One convergence evaluation during training (on ``evaluation.convergence_num_images`` images)."""

    step: int
    fid: float
    precision: NotRequired[float]
    recall: NotRequired[float]
    class_accuracy: NotRequired[float]


class PrivacyLedger(TypedDict):
    """What a DP trial spent (``trainables.privacy.privacy_ledger``, ledger version 4). The settings carry
    ``PrivacyConfig``'s names; delta is the resolved one (1/N where the config says null);
    ``released_without_noise``: record paths -> what they reveal. ``physical_batch_rows`` is in ledgers of versions
    2 (named ``physical_batch_size``) and 3 only: since 4 the rows per forward are ``cost.rows_per_forward``.
    ``epsilon_prv`` is left out above an RDP epsilon of 100 unless the PRV accountant calibrated the trial
    (``trainables.privacy.PRV_MAX_EPSILON``; ``accountants.prv`` then says so)."""

    target_epsilon: float
    delta: float
    sampling_rate: float
    steps: int
    max_grad_norm: float
    augmentation_multiplicity: int
    ledger_version: NotRequired[int]
    epsilon_rdp: NotRequired[float]
    epsilon_prv: NotRequired[float]
    noise_multiplier: NotRequired[float]
    planned_steps: NotRequired[int]
    dataset_size: NotRequired[int]
    expected_batch_size: NotRequired[float]
    physical_batch_rows: NotRequired[int]
    clipping: NotRequired[str]
    calibration_accountant: NotRequired[str]
    world_size: NotRequired[int]
    noise_rng: NotRequired[str]
    sampling_rng: NotRequired[str]
    example_rng: NotRequired[str]
    released_without_noise: NotRequired[dict[str, str]]
    accountants: NotRequired[dict[str, str]]


# Older ledger versions: (their name -> today's name) of renamed keys.
LEDGER_RENAMES = {2: {"physical_batch_size": "physical_batch_rows"}}


class Cost(TypedDict):
    """Compute and time of a trial: PFLOPs (1e15 FLOPs; attention over the query/key pairs the mask lets through,
    see ``trainables.profiling.NOT_COUNTED``; a DP trial's include its per-example clipping products, which depend
    on the clipping mode; sampling's are the final evaluation's images, not the
    convergence curve's), seconds, bytes, GPU hours, MFU as a fraction; ``estimated``: the
    numbers are the dry-run estimate (``bench.estimates``), not measured. None: does not apply (a base trial's
    training throughput, MFU on a CPU)."""

    train_pflops: float
    gpu_hours: float
    sample_pflops: NotRequired[float]
    total_pflops: NotRequired[float]
    train_flops_per_row: NotRequired[float]
    rows_trained: NotRequired[float]
    train_seconds: NotRequired[float]
    rows_per_second: NotRequired[float | None]
    peak_memory_bytes: NotRequired[int | None]
    sample_images_per_second: NotRequired[float | None]
    wall_seconds: NotRequired[float]
    mfu: NotRequired[float | None]
    training_precision: NotRequired[str | None]
    # How the training computed (``resources``; None: no training): the attention kernel it ran ("auto" resolved),
    # how many transformer blocks it ran compiled (0: eager), the most rows per forward (0: all at once).
    attention_kernel: NotRequired[str | None]
    compiled_blocks: NotRequired[int | None]
    rows_per_forward: NotRequired[int | None]
    not_counted: NotRequired[str | None]
    startup_seconds: NotRequired[float | None]
    setup_seconds: NotRequired[float]
    evaluation_seconds: NotRequired[float]
    estimated: NotRequired[bool]


class ClassifierFacts(TypedDict):
    """The fixed classifier that scores class accuracy: its name, test accuracy (fraction), weights' SHA-256, input
    size in pixels (``resolution`` in records written before it was named ``input_size``)."""

    name: str
    test_accuracy: float
    weights_sha256: str
    input_size: NotRequired[int]
    resolution: NotRequired[int]


class SamplingRecord(TypedDict):
    """The sampler's settings an image set was drawn with, under ``EvaluationConfig``'s names (``cfg`` and
    ``seed`` in records written before they were renamed ``guidance_scale`` and ``sampling_seed``); autocast_bf16:
    the trial's ``optimization.autocast_bf16`` (CUDA only); compiled: present (True) where compiled steps drew the
    images (``resources.compile_sampling``), absent for eager sampling."""

    top_k: int
    top_p: float
    batch_size: int
    autocast_bf16: bool
    compiled: NotRequired[bool]
    guidance_scale: NotRequired[float]
    sampling_seed: NotRequired[int]
    cfg: NotRequired[float]
    seed: NotRequired[int]


class EvaluationSettings(TypedDict):
    """How the final evaluation ran: extractor, resolution (pixels), images requested (None: as many as the
    evaluation split has), nearest neighbours of precision/recall, KID subsets and their size, the classifier of
    class accuracy, the sampler's settings, images generated, per class plan, whether reference statistics were cached."""

    extractor: str
    resolution: NotRequired[int]
    num_images: NotRequired[int | None]
    neighborhood: NotRequired[int]
    kid_subsets: NotRequired[int]
    kid_subset_size: NotRequired[int]
    classifier: NotRequired[ClassifierFacts]
    sampling: NotRequired[SamplingRecord]
    images_generated: NotRequired[int]
    plan: NotRequired[list[int]]
    reference_cache_hit: NotRequired[bool]


class ParameterCounts(TypedDict):
    """Trainable parameters (with and without the new class embedding), the base model's total and the parameters
    the adapter added (peft's LoRA matrices and LN-tuning copies; 0 or absent for full fine-tuning): the trainable
    share is of the adapted model's parameters, base_total + adapter_parameters, as peft and the paper count it."""

    trainable: int
    base_total: float
    trainable_without_class_embedding: NotRequired[int]
    adapter_parameters: NotRequired[int]


class DataFacts(TypedDict):
    """The splits a trial really used: image counts, classes, the skipped corrupt images ("path: error"), whether
    the token cache existed, the planned steps, the step an attempt resumed from (None: from the start)."""

    train_images: int
    evaluation_images: int
    classes: int
    planned_steps: int
    skipped_images: NotRequired[list[str]]
    token_cache_hit: NotRequired[bool]
    resumed_from_step: NotRequired[int | None]


class Environment(TypedDict):
    """Provenance: code version (git commit, "+dirty" when modified), package versions, devices, host; a resumed
    trial's ``earlier_git_commits``: the commits of the attempts before this one, in order."""

    git_commit: str | None
    earlier_git_commits: NotRequired[list[str | None]]
    devices: list[str]
    packages: NotRequired[dict[str, str | None]]
    python: NotRequired[str]
    device_type: NotRequired[str]
    world_size: NotRequired[int]
    host: NotRequired[str]
    torch_threads: NotRequired[int]


# A few real evaluation images of one class (``class`` is a Python keyword, hence this form).
RealImages = TypedDict("RealImages", {"label": int, "class": str, "paths": list[str]})


class Artifacts(TypedDict):
    """A trial's files under ``<storage>/artifacts/<trial_id>/``, as paths relative to the storage root ("/"
    separated): the folder, the trained adapter (None for the base method), the generated images
    (``class_<label>/``), real evaluation images per class, and the adapter again as a folder peft loads
    (``peft.PeftModel.from_pretrained``; None for full fine-tuning and the base method; absent from records
    written before it). Records written before this layout have only ``generated_images`` and ``real_images``,
    as absolute paths (analysis skips their grids with a note)."""

    generated_images: str
    real_images: list[RealImages]
    folder: NotRequired[str]
    adapter: NotRequired[str | None]
    peft_adapter: NotRequired[str | None]


# What ``audit.mechanism`` says of how the trial trained; the last is a test-only broken DP step (per-example
# clipping skipped, noise still calibrated to C) whose records are refused as results (``check_result``).
AUDIT_MECHANISMS = ("dp-sgd", "none", "broken: clipping skipped (test only)")
BROKEN_MECHANISM = AUDIT_MECHANISMS[2]
AUDIT_SCORES = ("nll_drop",)


class AuditRecord(TypedDict):
    """A privacy audit in one run (``trainables.audit``; ``AuditConfig``): m canaries, how many were included,
    their kind; ``score``: "nll_drop", each canary's per-token NLL (nats) of its token maps under its label at the
    start of fine-tuning minus under the released model (higher = more likely a member); the lower bound on
    epsilon at ``delta`` (the trial's DP delta; without DP the delta a DP trial on the same data would resolve)
    with ``confidence``, from ``guesses`` (r) guesses of which ``correct_guesses`` (v) were right
    (``trainables.audit_bound``); ``claimed_epsilon``: the DP ledger's epsilon spent (None without DP); the ROC's
    AUC and true positive rates (fractions) at 1% and 0.1% false positives; ``mechanism``: one of
    ``AUDIT_MECHANISMS``; per canary its score and whether it was included (the audit's ground truth)."""

    canaries: int
    included: int
    canary_kind: str
    score: str
    confidence: float
    delta: float
    claimed_epsilon: float | None
    epsilon_lower_bound: float
    guesses: int
    correct_guesses: int
    tpr_at_1pct_fpr: float
    tpr_at_0_1pct_fpr: float
    auc: float
    mechanism: str
    scores: list[float]
    included_mask: list[bool]


class UpgradedFrom(TypedDict):
    """The schema version and trial id a record had before ``upgrade_record``."""

    schema_version: int
    trial_id: str | None


RESULT_FIELDS = {
    "schema_version": int,
    "trial_id": str,
    "status": str,
    "error": (str, type(None)),
    "config": dict,
    "metrics": dict,
    "history": list,
    "convergence": list,
    "privacy": (dict, type(None)),
    "cost": dict,
    "evaluation_settings": (dict, type(None)),
    "parameters": dict,
    "data": dict,
    "environment": dict,
    "started_at": str,
    "finished_at": str,
}
# upgraded_from: see upgrade_record; audit: only for a trial with an ``AuditConfig``
OPTIONAL_RESULT_FIELDS = {"artifacts": dict, "upgraded_from": dict, "audit": (dict, type(None))}
# The typed inner sections (``check_result`` checks each against its description).
RESULT_SECTIONS: dict[str, Any] = {
    "metrics": ResultMetrics,
    "history": list[HistoryEntry],
    "convergence": list[ConvergenceEntry],
    "privacy": PrivacyLedger | None,
    "cost": Cost,
    "evaluation_settings": EvaluationSettings | None,
    "parameters": ParameterCounts,
    "data": DataFacts,
    "environment": Environment,
    "artifacts": Artifacts,
    "upgraded_from": UpgradedFrom,
    "audit": AuditRecord | None,
}
RECORD_SCALARS = {
    "schema_version": int,
    "trial_id": str,
    "status": str,
    "error": str | None,
    "started_at": str,
    "finished_at": str,
}


class RecordError(ConfigError):
    """A result record that does not match the typed record; the message names the path (``cost.train_pflops``)."""


class UnknownRecordPath(RecordError):
    """Code asked for a record path the typed record does not define (a reader's mistake, not a bad file)."""


@functools.cache
def _record_fields(kind: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """(key -> value type, required keys) of a TypedDict. Computed from the annotations with their extras, because
    ``__required_keys__`` is wrong under ``from __future__ import annotations`` in Python 3.11."""
    value_types, required = {}, set()
    for key, hint in typing.get_type_hints(kind, include_extras=True).items():
        if typing.get_origin(hint) is NotRequired:
            hint = typing.get_args(hint)[0]
        else:
            required.add(key)
        value_types[key] = hint
    return value_types, frozenset(required)


def _record_type_name(hint: Any) -> str:
    if typing.is_typeddict(hint):
        return "object"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_record_type_name(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) in (list, dict):
        return {list: "list", dict: "object"}[typing.get_origin(hint)]
    return {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}[hint]


def _record_accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` has the outer shape of ``hint`` (nested values are checked by ``_check_record_value``). Records
    may hold NaN (a metric that could not be computed); an integer is a number, a boolean is neither."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_record_accepts(option, value) for option in typing.get_args(hint))
    if typing.is_typeddict(hint) or origin is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_record_value(hint: Any, value: Any, path: str) -> None:
    """Raise ``RecordError`` naming ``path`` unless ``value`` has the type ``hint`` (recursively)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(hint) if _record_accepts(option, value)]
        if not options:
            raise RecordError(
                f"{path}: expected {_record_type_name(hint)}, got {value!r:.80} ({type(value).__name__})"
            )
        _check_record_value(options[0], value, path)
        return
    if not _record_accepts(hint, value):
        raise RecordError(
            f"{path}: expected {_record_type_name(hint)}, got {value!r:.80} ({type(value).__name__})"
        )
    origin = typing.get_origin(hint)
    if typing.is_typeddict(hint):
        _check_record_object(hint, value, path)
    elif origin is list:
        for item in value:
            _check_record_value(typing.get_args(hint)[0], item, f"{path}[]")
    elif origin is dict:
        for key, item in value.items():
            if not isinstance(key, str):
                raise RecordError(f"{path}: keys are strings, got {key!r} ({type(key).__name__})")
            _check_record_value(typing.get_args(hint)[1], item, f"{path}.{key}")


def _check_record_object(kind: Any, value: Mapping[str, Any], path: str) -> None:
    defined, required = _record_fields(kind)
    unknown, missing = sorted(set(value) - set(defined)), sorted(required - set(value))
    if unknown:
        raise RecordError(
            f"{path}.{unknown[0]}: not a key of {path} (unknown keys {unknown}; defined: {sorted(defined)})"
        )
    if missing:
        raise RecordError(
            f"{path}.{missing[0]}: missing (a recorded {path} has {sorted(required)}; empty means not recorded)"
        )
    for key, item in value.items():
        _check_record_value(defined[key], item, f"{path}.{key}")


def _check_sections(record: Mapping[str, Any]) -> None:
    """Every inner section against its description; an empty section (not recorded) passes."""
    for name, hint in RESULT_SECTIONS.items():
        value = record.get(name)
        if value in ({}, [], None):
            continue
        if name == "privacy" and isinstance(value, dict):
            renamed = LEDGER_RENAMES.get(value.get("ledger_version"), {})
            value = {renamed.get(key, key): item for key, item in value.items()}
        _check_record_value(hint, value, name)
    artifacts = record.get("artifacts")
    if artifacts and "folder" in artifacts:  # the storage layout: every path relative to the storage root
        paths = [artifacts["folder"], artifacts["generated_images"]]
        paths += [artifacts.get("adapter"), artifacts.get("peft_adapter")]
        paths += [p for entry in artifacts["real_images"] for p in entry["paths"]]
        bad = [p for p in paths if p is not None and not is_storage_relative(p)]
        _require(
            not bad, "artifacts", f"paths must be relative to the storage root, '/' separated, got {bad[:3]}"
        )


def is_storage_relative(path: str) -> bool:
    """A path relative to the storage root: "/" separated, not absolute, no "..", no backslash or drive."""
    return (
        bool(path)
        and not path.startswith("/")
        and "\\" not in path
        and ":" not in path
        and ".." not in path.split("/")
    )


def record_key_type(source: str) -> Any:
    """The value type the typed record defines at a dotted path (``cost.train_pflops``); list entries are named
    by the list (``history.loss``). Raises ``UnknownRecordPath`` for a path the record does not define."""
    parts = source.split(".")
    hint: Any = RESULT_SECTIONS.get(parts[0], RECORD_SCALARS.get(parts[0]))
    if hint is None:
        raise UnknownRecordPath(
            f"{source}: {parts[0]!r} is not a section of the result record (sections: {sorted(RESULT_SECTIONS)})"
        )
    for depth, part in enumerate(parts[1:], start=1):
        hint = _container(hint)
        where = ".".join(parts[:depth])
        if typing.is_typeddict(hint):
            defined, _ = _record_fields(hint)
            if part not in defined:
                raise UnknownRecordPath(
                    f"{source}: {part!r} is not a key of {where} (defined: {sorted(defined)})"
                )
            hint = defined[part]
        elif typing.get_origin(hint) is dict:
            hint = typing.get_args(hint)[1]
        else:
            raise UnknownRecordPath(f"{source}: {where} holds a {_record_type_name(hint)}, which has no keys")
    return hint


@functools.cache
def _defined_parts(source: str) -> tuple[str, ...]:
    record_key_type(source)
    return tuple(source.split("."))


def record_value(record: Mapping[str, Any], source: str) -> Any:
    """The value at a dotted path of a record (``cost.train_pflops``), or None where the record lacks it (not
    measured, section not recorded). A path the typed record does not define raises ``UnknownRecordPath``, so a
    renamed key fails where it is read instead of reading as a missing value."""
    value: Any = record
    for part in _defined_parts(source):
        if not isinstance(value, Mapping) or value.get(part) is None:
            return None
        value = value[part]
    return value


def _container(hint: Any) -> Any:
    """The object type inside ``X | None`` or ``list[X]`` (a path goes through them)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(hint) if option is not type(None)]
        hint = options[0] if len(options) == 1 else hint
    return typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint


def utc_now() -> str:
    """The time stamp of records (``started_at``, ``finished_at``): UTC, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def make_result(
    config: TrialConfig, *, status: str, error: str | None = None, **fields: Any
) -> dict[str, Any]:
    """A result record (plain JSON types). Missing parts of a failed trial are empty, never invented."""
    record = {
        "schema_version": SCHEMA_VERSION,
        "trial_id": config.trial_id,
        "status": status,
        "error": error,
        "config": config.to_dict(),
        "metrics": {},
        "history": [],
        "convergence": [],
        "privacy": None,
        "cost": {},
        "evaluation_settings": None,
        "parameters": {},
        "data": {},
        "environment": {},
        "started_at": "",
        "finished_at": "",
    }
    record.update(fields)
    check_result(record)
    return record


# Version 1 -> 2: fields renamed in the config ((section, old name) -> new name).
RENAMED_IN_2 = {
    ("evaluation", "cfg"): "guidance_scale",
    ("optimization", "max_grad_norm"): "global_clip_norm",
}


VERSION_CHANGES = (
    ", ".join(f"{s}.{o} became {n}" for (s, o), n in RENAMED_IN_2.items())
    + " in version 2; in version 3 privacy.physical_batch_rows became resources.rows_per_forward and integers in "
    "float fields floats, which changes trial ids"
)


def upgrade_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """An older result as the current version's result of the same experiment, its trial id recomputed
    (``upgraded_from`` keeps the old one and version). 1 -> 2: renamed fields carry their values and a DP trial's
    non-DP-only optimisation fields (which it never used) return to their defaults; 2 -> 3: a DP trial's
    ``privacy.physical_batch_rows`` becomes its ``resources.rows_per_forward``, and the config is rewritten as
    validated (integers in float fields become floats). A current record is returned unchanged (copied)."""
    upgraded = json.loads(json.dumps(record))
    version = upgraded.get("schema_version")
    if version == SCHEMA_VERSION:
        return upgraded
    _require(not is_newer_version(version), "schema_version", newer_version_note(upgraded))
    _require(
        is_older_version(version),
        "schema_version",
        f"cannot upgrade a result of schema version {version!r} (versions are the integers 1 to {SCHEMA_VERSION})",
    )
    _require(
        isinstance(upgraded.get("config"), dict),
        "config",
        f"a schema version {version} result without a config object (got {type(upgraded.get('config')).__name__})",
    )
    config = upgraded["config"]
    if version == 1:
        _upgrade_config_1_to_2(config)
    rows = _upgrade_config_2_to_3(config)
    cost = upgraded.get("cost")
    if rows is not None and isinstance(cost, dict) and "rows_per_forward" in cost:
        cost["rows_per_forward"] = rows  # version 2 recorded a DP trial's unused resources field (0)
    upgraded_config = TrialConfig.from_dict(config)
    upgraded.update(
        schema_version=SCHEMA_VERSION,
        config=upgraded_config.to_dict(),
        trial_id=upgraded_config.trial_id,
        upgraded_from={"schema_version": version, "trial_id": upgraded.get("trial_id")},
    )
    return upgraded


def _upgrade_config_1_to_2(config: dict[str, Any]) -> None:
    for (section, old), new in RENAMED_IN_2.items():
        if isinstance(config.get(section), dict) and old in config[section]:
            config[section][new] = config[section].pop(old)
    if config.get("privacy") is not None and isinstance(config.get("optimization"), dict):
        config["optimization"].update(NON_DP_ONLY)


def _upgrade_config_2_to_3(config: dict[str, Any]) -> int | None:
    """Move a DP trial's ``privacy.physical_batch_rows`` (default 256) to ``resources.rows_per_forward``; returns
    the rows it moved (None for a non-DP trial). Version 2 put max(1, rows // k) examples through a forward, which
    allowed rows < k; version 3 counts rows (and below k spreads an example's views over forwards), so the same
    examples per forward, each example's views in one, are that times k: the record says what ran."""
    privacy = config.get("privacy")
    if not (isinstance(privacy, dict) and isinstance(config.get("resources"), dict)):
        return None
    # version 2 required rows_per_forward 0 under DP (unused): the physical batch was the privacy field
    rows, k = privacy.pop("physical_batch_rows", 256), privacy.get("augmentation_multiplicity", 1)
    if all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (rows, k)):
        rows = max(1, rows // k) * k
    config["resources"]["rows_per_forward"] = rows  # anything else fails validation, naming the field
    return rows


def is_older_version(version: Any) -> bool:
    """Whether ``version`` (a result's ``schema_version``) is one ``upgrade_record`` rewrites: an integer, so a
    ``true`` or ``2.0`` written by hand is no version (``True in (1, 2)`` and ``2.0 == 2`` hold in Python)."""
    return type(version) is int and version in OLDER_SCHEMA_VERSIONS


def is_newer_version(version: Any) -> bool:
    """Whether ``version`` (a result's ``schema_version``) is one a later varsweep writes."""
    return isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION


def newer_version_note(record: Mapping[str, Any]) -> str:
    return (
        f"written by a newer varsweep (schema version {record.get('schema_version')}; this one reads version "
        f"{SCHEMA_VERSION}): upgrade varsweep to read it"
    )


def check_result(record: Mapping[str, Any]) -> TrialConfig:
    """Raise ``ConfigError`` (``RecordError`` for an inner section) unless ``record`` is a valid result of this
    schema version: every field of its type, every section typed as described above; returns its config."""
    _require(
        not is_older_version(record.get("schema_version")),
        "schema_version",
        f"written by schema version {record.get('schema_version')} (before {VERSION_CHANGES}); "
        "`python -m bench upgrade-results STORAGE` rewrites such results under their current trial ids",
    )
    _require(not is_newer_version(record.get("schema_version")), "schema_version", newer_version_note(record))
    _require(
        record.get("schema_version") == SCHEMA_VERSION,
        "schema_version",
        f"expected {SCHEMA_VERSION}, got {record.get('schema_version')}",
    )
    for name, kind in RESULT_FIELDS.items():
        _require(name in record, name, "missing from the result")
        _require(isinstance(record[name], kind), name, f"has type {type(record[name]).__name__}")
    for name, kind in OPTIONAL_RESULT_FIELDS.items():
        _require(
            name not in record or isinstance(record[name], kind),
            name,
            f"has type {type(record.get(name)).__name__}",
        )
    _require(record["status"] in STATUSES, "status", f"one of {STATUSES}, got {record['status']!r}")
    _require(
        record["status"] == "success" or bool(record["error"]), "error", "a failed trial records its error"
    )
    unknown = sorted(set(record) - set(RESULT_FIELDS) - set(OPTIONAL_RESULT_FIELDS))
    _require(
        not unknown,
        unknown[0] if unknown else "",
        f"not a field of the result record (unknown fields {unknown})",
    )
    _check_sections(record)
    config = TrialConfig.from_dict(record["config"])
    _require(
        config.trial_id == record["trial_id"],
        "trial_id",
        f"{record['trial_id']} does not match its config ({config.trial_id})",
    )
    ledger = record["privacy"]
    if record["status"] == "success" and ledger and "planned_steps" in ledger:
        # every planned step of a DP run is taken and accounted; a ledger short of its plan under-reports epsilon
        _require(
            ledger["steps"] == ledger["planned_steps"],
            "privacy.steps",
            f"a successful DP trial accounts all its {ledger['planned_steps']} planned steps, this ledger "
            f"{ledger['steps']}",
        )
    if record.get("audit"):  # absent: no audit asked, a failed trial, or a DDP rank other than 0
        _check_audit(record["audit"], config, status=record["status"])
    return config


def _check_audit(audit: Mapping[str, Any], config: TrialConfig, *, status: str) -> None:
    """The audit section against its trial's config and itself (the types were checked by ``_check_sections``)."""
    _require(config.audit is not None, "audit", "recorded for a trial whose config has no audit")
    m = config.audit.canaries
    _require(
        audit["canaries"] == m and len(audit["scores"]) == m and len(audit["included_mask"]) == m,
        "audit.canaries",
        f"the config's {m} canaries need {m} scores and mask entries, got {audit['canaries']}, "
        f"{len(audit['scores'])} and {len(audit['included_mask'])}",
    )
    _require(
        audit["included"] == sum(audit["included_mask"]),
        "audit.included",
        f"{audit['included']} is not the number of included canaries in the mask",
    )
    _require(
        0 < audit["included"] < m,
        "audit.included",
        f"an audit needs both included and excluded canaries, got {audit['included']} of {m} included",
    )
    _require(
        (audit["canary_kind"], audit["confidence"]) == (config.audit.canary_kind, config.audit.confidence),
        "audit.canary_kind",
        "canary_kind and confidence must be the config's",
    )
    _require(audit["score"] in AUDIT_SCORES, "audit.score", f"one of {AUDIT_SCORES}, got {audit['score']!r}")
    _require(
        audit["mechanism"] in AUDIT_MECHANISMS,
        "audit.mechanism",
        f"one of {AUDIT_MECHANISMS}, got {audit['mechanism']!r}",
    )
    dp = config.privacy is not None
    _require(
        (audit["mechanism"] != "none") == dp and (audit["claimed_epsilon"] is not None) == dp,
        "audit.mechanism",
        "a DP trial audits a DP mechanism with a claimed epsilon; a trial without DP has mechanism 'none' and none",
    )
    # A deliberately broken mechanism is a test of the audit, never a result: its record can only be a failed one.
    _require(
        audit["mechanism"] != BROKEN_MECHANISM or status == "failed",
        "audit.mechanism",
        f"{BROKEN_MECHANISM!r} is not a DP result: such a record must have status 'failed'",
    )
    _require(
        audit["epsilon_lower_bound"] >= 0 and 0 < audit["delta"] < 1,
        "audit.epsilon_lower_bound",
        f"need a bound >= 0 and delta in (0, 1), got {audit['epsilon_lower_bound']} and {audit['delta']}",
    )
    _require(
        0 <= audit["correct_guesses"] <= audit["guesses"] <= m,
        "audit.guesses",
        f"need 0 <= correct_guesses <= guesses <= {m}, got {audit['correct_guesses']} of {audit['guesses']}",
    )
    rates = {key: audit[key] for key in ("tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "auc")}
    bad = {key: value for key, value in rates.items() if not 0 <= value <= 1}
    _require(not bad, "audit." + next(iter(bad), "auc"), f"fractions in [0, 1], got {bad}")
