"""FLOP accounting: the counter agrees with a hand formula on a tiny VAR; totals follow the rows processed."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_VAR
from trainables.methods import AdaptationSpec, adapt
from trainables.models import build_var
from trainables.profiling import ComputeLedger, flops_per_row
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
    var = adapt(build_var(**TINY_VAR, drop_path_rate=0.0), AdaptationSpec(method="full", num_classes=3)).train()
    g = torch.Generator().manual_seed(0)

    def step(rows: int) -> None:
        idx = [torch.randint(0, 64, (rows, 1, p * p), generator=g) for p in TINY_VAR["patch_nums"]]
        view_losses(var, tiny_vqvae, torch.zeros(rows, dtype=torch.long), idx, class_dropout=0.0).sum().backward()

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
    assert report["sample_pflops"] == pytest.approx(0.005) and report["mfu"] == pytest.approx(32e12 / 3 / 1e13)
    assert "not counted" in report["not_counted"]
