"""Dry-run estimates of a sweep: steps, training rows and GPU hours per trial, from the official VAR geometry and
either a measured training throughput (``measured_throughput.json``, written by ``scripts/benchmark_gpu.py``) or,
where no measurement matches the trial, an assumed utilisation; the output says per trial which. Standard
library only.

The FLOP model is the one ``trainables.profiling``'s counter applies to a real step: 2 FLOPs per multiply-add of
every matrix product. Per token: the blocks' attention (qkv, projection) and MLP weights and the output head; per
image: the AdaLN modulation (each block's and the head's, computed once per image from the class embedding);
attention's two L x L products per block over the query/key pairs the block-causal mask lets through (62% of the
dense L x L at 680 tokens; ``visible_attention_fraction``), the useful work whichever kernel computes it.
Norms, softmax, element-wise ops, the optimiser and the adapters' own small products (~2% for rank-16 LoRA) are
not counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .schema import DATASETS, TrialConfig

VAR_PARAMETERS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}  # REFERENCE.md §1
OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TOKENS_PER_IMAGE = sum(n * n for n in OFFICIAL_PATCH_NUMS)  # 680
ASSUMED_UTILISATION = 0.35
ASSUMED_FLOPS_PER_GPU = 989e12 * ASSUMED_UTILISATION  # H100/H200 dense bf16 peak at 35% utilisation
# Attention's backward as a multiple of its forward (five L x L products for two), as the counter counts it.
ATTENTION_BACKWARD = 2.5


@dataclass(frozen=True)
class VarShape:
    """The matrix-product geometry of a VAR: depth, width C (64 x depth for the official family), codebook size,
    VQVAE latent channels, token-map sides per scale."""

    depth: int
    embed_dim: int
    vocab_size: int = 4096
    z_channels: int = 32
    patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS

    @classmethod
    def official(cls, depth: int) -> VarShape:
        return cls(depth=depth, embed_dim=64 * depth)

    @property
    def tokens(self) -> int:
        """L, tokens per image (680 for the official scales)."""
        return sum(n * n for n in self.patch_nums)

    @property
    def per_token_weights(self) -> int:
        """Weights applied to every token: per block qkv (3C^2), projection (C^2), MLP (8C^2); the head (C x V)."""
        c = self.embed_dim
        return self.depth * 12 * c * c + c * self.vocab_size

    @property
    def per_image_weights(self) -> int:
        """The AdaLN modulation, applied once per image: 6C^2 per block and 2C^2 before the head."""
        c = self.embed_dim
        return self.depth * 6 * c * c + 2 * c * c

    @property
    def word_embedding_flops(self) -> int:
        """Forward FLOPs of the word embedding (latent channels -> C) on the tokens after the first scale."""
        return 2 * self.z_channels * self.embed_dim * (self.tokens - self.patch_nums[0] ** 2)

    @property
    def attention_flops(self) -> int:
        """Forward FLOPs of attention's two L x L products in every block, dense (masked pairs included)."""
        return self.depth * 4 * self.tokens**2 * self.embed_dim


def visible_attention_fraction(patch_nums: tuple[int, ...] = OFFICIAL_PATCH_NUMS) -> float:
    """Share of the L x L query-key pairs VAR's block-causal mask lets through (a token sees its own and earlier
    scales): 286,434 of 462,400 = 0.619 for the official scales, so 38% of the dense count is masked."""
    sizes = [n * n for n in patch_nums]
    seen = sum(size * sum(sizes[: i + 1]) for i, size in enumerate(sizes))
    return seen / sum(sizes) ** 2


def training_flops_per_row(shape: VarShape, method: str, *, dense_attention: bool = False) -> float:
    """Useful training FLOPs of one row (one image view): forward, then backward. Full fine-tuning computes weight
    and input gradients (2x the forward); adapters only input gradients (1x; the word embedding, whose input
    needs no gradient, none). Attention counts the query/key pairs the mask lets through; ``dense_attention=True``
    counts all L x L pairs (what a kernel that computes the masked pairs too does)."""
    if method == "base":
        return 0.0
    full = method == "full"
    linear = 2 * (shape.per_token_weights * shape.tokens + shape.per_image_weights)
    attention = shape.attention_flops * (
        1.0 if dense_attention else visible_attention_fraction(shape.patch_nums)
    )
    return (
        (3 if full else 2) * linear
        + (2 if full else 1) * shape.word_embedding_flops
        + (1 + ATTENTION_BACKWARD) * attention
    )


def dense_attention_overhead(method: str, *, depth: int = 16) -> float:
    """How much a training total with attention counted dense would exceed the useful one, which counts only the
    visible pairs (0.045 = 4.5%), for the official VAR of ``depth``."""
    shape = VarShape.official(depth)
    return (
        training_flops_per_row(shape, method, dense_attention=True) / training_flops_per_row(shape, method)
        - 1
    )


ATTENTION_NOTE = (
    "attention counts only the query/key pairs the block-causal mask lets through, in training (masked or "
    "per-scale kernel) and in sampling (KV cache): the mask hides "
    f"{1 - visible_attention_fraction():.0%} of the L x L pairs at 680 tokens, and counting them would put d16 "
    f"training totals {dense_attention_overhead('full'):.1%} (full fine-tuning) to "
    f"{dense_attention_overhead('lora'):.1%} (adapters) higher"
)


def training_rows(config: TrialConfig, *, train_images: int, steps: int) -> float:
    """Rows (image views) a trial trains: steps x batch, or under DP steps x q*N (expected), times k views."""
    k = 1 if config.privacy is None else config.privacy.augmentation_multiplicity
    per_step = (
        config.privacy.sampling_rate * train_images if config.privacy else config.optimization.batch_size
    )
    return steps * k * per_step


def training_flops(config: TrialConfig, *, train_images: int, steps: int) -> float:
    """Useful model FLOPs of a trial's training (official models only; the tiny base is not estimated): FLOPs per
    row times the rows it trains."""
    if config.model.base != "official":
        return 0.0
    rows = training_rows(config, train_images=train_images, steps=steps)
    return training_flops_per_row(VarShape.official(config.model.depth), config.method.name) * rows


def longest_first(configs: list[TrialConfig], plans: dict) -> list[TrialConfig]:
    """``configs`` in the order a sweep starts them: the most training work first (longest-processing-time-first
    scheduling), so that no long trial starts last and holds the sweep open while the other workers idle. Work is
    the useful FLOPs of an official model's training, then the rows trained (the tiny base's FLOPs are not
    estimated); ties keep the sweep's order. ``plans``: {trial_id: TrialPlan} from the preflight (N, steps)."""

    def work(config: TrialConfig) -> tuple[float, float]:
        plan = plans[config.trial_id]
        size = {"train_images": plan.examples, "steps": plan.planned_steps}
        return training_flops(config, **size), training_rows(config, **size)

    return sorted(configs, key=work, reverse=True)


# Measured training throughput (rows per second on one GPU), one entry per measured setting; see
# ``measured_rate`` for how an entry is matched to a trial. Refreshed by
# ``python scripts/benchmark_gpu.py --write-throughput bench/measured_throughput.json``.
MEASURED_THROUGHPUT_FILE = Path(__file__).with_name("measured_throughput.json")
# The device the dry run prices GPU hours on: the one the measurements and the assumed peak are for.
ESTIMATE_DEVICE = "NVIDIA H200"
THROUGHPUT_KEYS = (
    "device",
    "depth",
    "method",
    "clipping",
    "augmentation_multiplicity",
    "precision",
    "rows_per_second",
    "source",
)


def load_measured_throughput(path: Path = MEASURED_THROUGHPUT_FILE) -> list[dict]:
    """The entries of a measured-throughput file (none when it does not exist); each must hold THROUGHPUT_KEYS."""
    if not path.is_file():
        return []
    entries = json.loads(path.read_text())["measurements"]
    for entry in entries:
        missing = [key for key in THROUGHPUT_KEYS if key not in entry]
        if missing:
            raise ValueError(f"{path}: a measurement lacks {missing}: {entry}")
    return entries


def trial_setting(config: TrialConfig) -> dict:
    """What a measured rate must share with a trial to stand for it: the official depth, the method, the DP
    clipping as the trial resolves it (None without DP; "auto" is book-keeping, which has a rule for every
    layer of an adapted VAR: ``trainables.privacy.resolve_clipping``), k views per example, and the precision
    the trial trains in on a GPU (bf16 autocast unless switched off or under ghost clipping, which trains in
    float32: ``trainables.finetune.training_autocast``)."""
    privacy = config.privacy
    clipping = (
        None if privacy is None else ("bookkeeping" if privacy.clipping == "auto" else privacy.clipping)
    )
    bf16 = config.optimization.autocast_bf16 and clipping != "ghost"
    return {
        "depth": config.model.depth,
        "method": config.method.name,
        "clipping": clipping,
        "augmentation_multiplicity": 1 if privacy is None else privacy.augmentation_multiplicity,
        "precision": "bf16 autocast" if bf16 else "float32",
    }


def measured_rate(
    config: TrialConfig, measurements: list[dict], *, device: str = ESTIMATE_DEVICE
) -> dict | None:
    """The measurement that stands for ``config`` on ``device``, or None (then the assumed utilisation applies).
    It must match the trial's ``trial_setting`` exactly (no interpolation across depths, methods, clipping modes
    or k); the physical batch it was measured at is not matched. Among several, one measured with the trial's
    attention kernel and compile setting comes first, then the latest."""
    if config.model.base != "official":
        return None
    wanted = {"device": device, **trial_setting(config)}
    matches = [m for m in measurements if all(m[key] == value for key, value in wanted.items())]
    if not matches:
        return None
    kernel, compiled = config.resources.training_attention_kernel, config.resources.compile
    return max(
        matches,
        key=lambda m: (
            m.get("attention_kernel") == kernel and bool(m.get("compile")) == compiled,
            m["source"].get("date", ""),
        ),
    )


def training_gpu_hours(
    config: TrialConfig, *, train_images: int, steps: int, measurements: list[dict]
) -> tuple[float, dict | None]:
    """(GPU hours of a trial's training, the measurement used or None): rows / measured rows per second where a
    measurement matches, else useful FLOPs / ``ASSUMED_FLOPS_PER_GPU``."""
    if config.model.base != "official":
        return 0.0, None
    measured = measured_rate(config, measurements)
    if measured is not None:
        rows = training_rows(config, train_images=train_images, steps=steps)
        return rows / measured["rows_per_second"] / 3600, measured
    return training_flops(config, train_images=train_images, steps=steps) / ASSUMED_FLOPS_PER_GPU / 3600, None


def _basis(config: TrialConfig, measured: dict | None) -> str:
    if config.model.base != "official":
        return "not estimated"
    if measured is None:
        return f"assumed {ASSUMED_UTILISATION:.0%} MFU"
    return f"measured {measured['rows_per_second']:.1f} rows/s"


def expected_examples(config: TrialConfig) -> int:
    """The examples a trial trains on by the dataset's published size: its training split plus, under a privacy
    audit, the expected half of the canaries (each is included with probability 1/2; the plan counts the real
    ones)."""
    canaries = config.audit.canaries // 2 if config.audit is not None else 0
    return DATASETS[config.data.dataset].train_images + canaries


def estimate(
    configs: list[TrialConfig], *, done: set[str], plans: dict, measurements: list[dict] | None = None
) -> str:
    """A table of the sweep: one line per trial with the rate its GPU hours rest on (a measured throughput or
    the assumed utilisation), then totals and the sources of the measured rates used. ``measurements``: the
    entries of ``MEASURED_THROUGHPUT_FILE`` when None."""
    measurements = load_measured_throughput() if measurements is None else measurements
    header = (
        f"{'trial':<44} {'id':<16} {'status':<8} {'workers x GPU':>13} {'rate':<24} {'steps':>7} {'GPU h':>8}"
    )
    lines, total_hours, todo, used = [header], 0.0, 0, {}
    for c in configs:
        plan = plans.get(c.trial_id)
        images = plan.examples if plan is not None else expected_examples(c)
        steps = plan.planned_steps if plan is not None else c.planned_steps(images)
        hours, measured = training_gpu_hours(c, train_images=images, steps=steps, measurements=measurements)
        finished = c.trial_id in done
        if not finished:
            total_hours, todo = total_hours + hours, todo + 1
        if measured is not None:
            used[json.dumps(measured, sort_keys=True)] = measured
        gpus = f"{c.resources.workers} x {c.resources.gpus_per_worker:g}"
        lines.append(
            f"{c.label:<44} {c.trial_id:<16} {'done' if finished else 'pending':<8} {gpus:>13} "
            f"{_basis(c, measured):<24} {steps:>7} {hours:>8.2f}"
        )
    lines.append(
        f"{todo} of {len(configs)} trials to run; estimated training GPU hours {total_hours:.1f} on an "
        f"{ESTIMATE_DEVICE}: 'measured' rows at the training throughput measured for the same depth, method, DP "
        f"clipping, k and precision (any rows per forward); 'assumed' rows at useful model FLOPs / "
        f"{ASSUMED_FLOPS_PER_GPU / 1e12:.0f} TFLOP/s per GPU ({ASSUMED_UTILISATION:.0%} of the dense bf16 peak); "
        "evaluation and tiny models not included"
    )
    lines += [f"  measured: {_describe(m)}" for m in used.values()]
    return "\n".join(lines)


def _describe(m: dict) -> str:
    dp = "no DP" if m["clipping"] is None else f"DP {m['clipping']}"
    source = m["source"]
    settings = ", ".join(
        f"{key} {m[key]}"
        for key in ("attention_kernel", "compile", "rows_per_forward", "measured_in")
        if key in m
    )
    return (
        f"{m['device']} d{m['depth']} {m['method']} {dp} k={m['augmentation_multiplicity']} {m['precision']}: "
        f"{m['rows_per_second']:.1f} rows/s ({settings}; {source.get('script')}, {source.get('date')}, "
        f"{source.get('docs')})"
    )
