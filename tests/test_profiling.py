"""FLOP accounting: the counter agrees with a hand formula and with the dry-run estimate on a tiny VAR; totals follow the
rows processed; the estimate counts d16's AdaLN per image; the attention note's numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VAR

from bench.estimates import (
    OFFICIAL_PATCH_NUMS,
    TOKENS_PER_IMAGE,
    VAR_PARAMETERS,
    VarShape,
    training_flops_per_row,
    visible_attention_fraction,
)
from bench.schema import MethodConfig
from trainables.methods import adapt
from trainables.models import build_var
from trainables.profiling import NOT_COUNTED, ComputeLedger, flops_per_row
from trainables.training import view_losses


def hand_flops(rows: int) -> float:
    """Forward: 2 FLOPs per multiply-add of every linear layer plus attention's two L x L products per head; backward:
    input and weight gradients (2x forward) except the word embedding, whose input needs no gradient (1x), and
    attention's backward counted as 2.5x its forward (five L x L products)."""
    C, V, Cv, H = TINY_VAR["embed_dim"], TINY_VAR["vocab_size"], TINY_VAR["z_channels"], TINY_VAR["num_heads"]
    depth, pn = TINY_VAR["depth"], TINY_VAR["patch_nums"]
    L, first = sum(p * p for p in pn), pn[0] ** 2
    per_block_tokens = L * (3 * C * C + C * C + 2 * C * 4 * C)
    per_block_cond = C * 6 * C
    linear = rows * (depth * (per_block_tokens + per_block_cond) + C * 2 * C + L * C * V)
    word = rows * (L - first) * Cv * C
    attention = depth * rows * H * 4 * L * L * (C // H)
    return 2 * linear * 3 + 2 * word * 2 + attention * 3.5


def test_counter_matches_the_hand_formula_within_5_percent(tiny_vqvae):
    var = build_var(**TINY_VAR, drop_path_rate=0.0)
    adapt(var, MethodConfig(name="full"), num_classes=3, seed=0)
    var.train()
    g = torch.Generator().manual_seed(0)

    def step(rows: int) -> None:
        idx = [torch.randint(0, 64, (rows, 1, p * p), generator=g) for p in TINY_VAR["patch_nums"]]
        view_losses(
            var, tiny_vqvae, torch.zeros(rows, dtype=torch.long), idx, class_dropout=0.0
        ).sum().backward()

    per_row, by_op = flops_per_row(step, rows=6)
    print(f"counted {per_row:.0f} FLOPs per row, hand formula {hand_flops(1):.0f}; ops {sorted(by_op)}")
    assert per_row == pytest.approx(hand_flops(1), rel=0.05)
    assert any("scaled_dot_product" in op for op in by_op)  # attention is counted
    per_row_larger, _ = flops_per_row(step, rows=12)
    assert per_row_larger == pytest.approx(per_row, rel=1e-9)  # linear in rows


def test_ledger_totals_use_actual_rows():
    ledger = ComputeLedger(train_flops_per_row=2e12, sample_flops_per_image=5e11)
    for batch in (3, 0, 5):  # actual Poisson batch sizes, k = 2 views each
        ledger.add_training(batch * 2, seconds=1.0)
    ledger.images_sampled = 10
    report = ledger.report(peak_flops_per_second=1e13)
    assert report["rows_trained"] == 16 and report["train_pflops"] == pytest.approx(0.032)
    assert report["sample_pflops"] == pytest.approx(0.005) and report["mfu"] == pytest.approx(
        32e12 / 3 / 1e13
    )
    assert "not counted" in report["not_counted"]


def test_dry_run_estimate_counts_like_the_counter_on_the_tiny_model(tiny_vqvae):
    """bench.estimates' FLOP model (AdaLN per image, attention dense) against the counter on a real step."""
    var = build_var(**TINY_VAR, drop_path_rate=0.0)
    adapt(var, MethodConfig(name="full"), num_classes=3, seed=0)
    var.train()

    def step(rows: int) -> None:
        idx = [torch.randint(0, 64, (rows, 1, p * p)) for p in TINY_VAR["patch_nums"]]
        view_losses(
            var, tiny_vqvae, torch.zeros(rows, dtype=torch.long), idx, class_dropout=0.0
        ).sum().backward()

    counted, _ = flops_per_row(step, rows=4)
    shape = VarShape(
        depth=TINY_VAR["depth"],
        embed_dim=TINY_VAR["embed_dim"],
        vocab_size=TINY_VAR["vocab_size"],
        z_channels=TINY_VAR["z_channels"],
        patch_nums=TINY_VAR["patch_nums"],
    )
    assert training_flops_per_row(shape, "full") == pytest.approx(counted, rel=0.05)


def test_adaln_is_per_image_in_the_d16_estimate():
    """The estimate's split of d16's weights matches the real model's (built on the meta device): ~100M AdaLN
    weights are applied once per image, not per token as the old estimate (6 x all parameters x 680) had it."""
    var = build_var(
        depth=16,
        num_classes=1000,
        patch_nums=OFFICIAL_PATCH_NUMS,
        vocab_size=4096,
        z_channels=32,
        device="meta",
    )
    weights = {name: p.numel() for name, p in var.named_parameters()}
    shape = VarShape.official(16)
    assert (
        sum(n for name, n in weights.items() if "ada_lin" in name and name.endswith("weight"))
        == shape.per_image_weights
        > 100e6
    )
    per_token = ("attn.mat_qkv.weight", "attn.proj.weight", "ffn.fc1.weight", "ffn.fc2.weight")
    assert (
        sum(n for name, n in weights.items() if name.endswith(per_token) or name == "head.weight")
        == shape.per_token_weights
    )
    assert sum(weights.values()) == VAR_PARAMETERS[16]
    old = 6 * VAR_PARAMETERS[16] * TOKENS_PER_IMAGE
    assert 1.3 < old / training_flops_per_row(shape, "full") < 1.4  # the old estimate was a third too high


def test_the_attention_note_counts_the_masked_pairs():
    """38% of the dense L x L pairs are masked at 680 tokens (counted on the model's own mask), and the note's
    percentages follow from the estimate's FLOP model."""
    var = build_var(
        depth=1,
        num_classes=2,
        patch_nums=OFFICIAL_PATCH_NUMS,
        vocab_size=16,
        z_channels=4,
        embed_dim=8,
        num_heads=1,
    )
    mask = var.attn_bias_for_masking
    assert mask.shape[-1] == 680 and torch.isfinite(mask).sum().item() / 680**2 == pytest.approx(
        visible_attention_fraction()
    )
    assert visible_attention_fraction() == 286_434 / 462_400
    shape = VarShape.official(16)
    overheads = [
        training_flops_per_row(shape, m) / training_flops_per_row(shape, m, dense_attention=False) - 1
        for m in ("full", "lora")
    ]
    assert [round(100 * o, 1) for o in overheads] == [4.5, 6.5]
    assert "38%" in NOT_COUNTED and "4.5%" in NOT_COUNTED and "6.5%" in NOT_COUNTED
