"""Dry-run estimates of a sweep: steps, training rows and GPU hours per trial, from the official VAR geometry and
an assumed utilisation (stated in the output). Standard library only.

The FLOP model is the one PyTorch's FLOP counter applies to a real step (``trainables.profiling``): 2 FLOPs per
multiply-add of every matrix product. Per token: the blocks' attention (qkv, projection) and MLP weights and the
output head; per image: the AdaLN modulation (each block's and the head's, computed once per image from the class
embedding); attention's two L x L products per block, counted dense (the block-causal mask hides ~38% of the pairs
at 680 tokens; ``visible_attention_fraction``). Norms, softmax, element-wise ops, the optimiser and the adapters'
own small products (~2% for rank-16 LoRA) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import DATASETS, TrialConfig

VAR_PARAMETERS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}  # REFERENCE.md §1
OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TOKENS_PER_IMAGE = sum(n * n for n in OFFICIAL_PATCH_NUMS)  # 680
ASSUMED_FLOPS_PER_GPU = 989e12 * 0.35  # H100 dense bf16 peak at 35% utilisation
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


def training_flops_per_row(shape: VarShape, method: str, *, dense_attention: bool = True) -> float:
    """Training FLOPs of one row (one image view): forward, then backward. Full fine-tuning computes weight and
    input gradients (2x the forward); adapters only input gradients (1x; the word embedding, whose input needs
    no gradient, none). ``dense_attention=False`` counts only the pairs the mask lets through."""
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
    """How much a training total with attention counted dense exceeds one counting only the visible pairs
    (0.045 = 4.5%), for the official VAR of ``depth``."""
    shape = VarShape.official(depth)
    return (
        training_flops_per_row(shape, method) / training_flops_per_row(shape, method, dense_attention=False)
        - 1
    )


ATTENTION_NOTE = (
    f"training attention is counted as dense L x L: the block-causal mask hides {1 - visible_attention_fraction():.0%} of the "
    f"pairs at 680 tokens, so d16 training totals are {dense_attention_overhead('full'):.1%} (full fine-tuning) to "
    f"{dense_attention_overhead('lora'):.1%} (adapters) above the FLOPs of the visible pairs; sampling (KV cache) "
    "computes only visible pairs"
)


def training_flops(config: TrialConfig, *, train_images: int, steps: int) -> float:
    """Model FLOPs of a trial's training (official models only; the tiny base is not estimated): FLOPs per row
    times the rows it trains (steps x batch, or under DP steps x q*N, times k views)."""
    if config.model.base != "official":
        return 0.0
    k = 1 if config.privacy is None else config.privacy.augmentation_multiplicity
    rows = (
        steps
        * k
        * (config.privacy.sampling_rate * train_images if config.privacy else config.optimization.batch_size)
    )
    return training_flops_per_row(VarShape.official(config.model.depth), config.method.name) * rows


def estimate(configs: list[TrialConfig], *, done: set[str], plans: dict) -> str:
    """A table of the sweep: one line per trial, then totals."""
    lines = [f"{'trial':<44} {'id':<16} {'status':<8} {'workers x GPU':>13} {'steps':>7} {'GPU h':>8}"]
    total_hours, todo = 0.0, 0
    for c in configs:
        plan = plans.get(c.trial_id)
        images = plan.train_images if plan is not None else DATASETS[c.data.dataset].train_images
        steps = plan.planned_steps if plan is not None else c.planned_steps(images)
        hours = training_flops(c, train_images=images, steps=steps) / ASSUMED_FLOPS_PER_GPU / 3600
        finished = c.trial_id in done
        if not finished:
            total_hours, todo = total_hours + hours, todo + 1
        gpus = f"{c.resources.workers} x {c.resources.gpus_per_worker:g}"
        lines.append(
            f"{c.label:<44} {c.trial_id:<16} {'done' if finished else 'pending':<8} {gpus:>13} {steps:>7} {hours:>8.2f}"
        )
    lines.append(
        f"{todo} of {len(configs)} trials to run; estimated training GPU hours {total_hours:.1f} "
        f"(model FLOPs at {ASSUMED_FLOPS_PER_GPU / 1e12:.0f} TFLOP/s per GPU; evaluation and tiny models not included)"
    )
    return "\n".join(lines)
