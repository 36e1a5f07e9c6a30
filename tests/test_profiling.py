"""FLOP accounting: the counter agrees with a hand formula and with the dry-run estimate on a tiny VAR (training and
sampling) and counts attention over the visible pairs whichever kernel runs; totals follow the rows processed; the
estimate counts d16's AdaLN per image; the attention note's numbers; the dry run prices training and evaluation
from measured rates where one matches, from the nearest measured setting's, else at the assumed utilisation;
a malformed throughput file is refused by name."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import time

import pytest
import torch
from conftest import TINY_VAR, TINY_VQVAE, run_script
from torch.utils.flop_counter import FlopCounterMode

from bench.estimates import (
    ESTIMATE_DEVICE,
    INCEPTION_GFLOPS_PER_IMAGE,
    OFFICIAL_PATCH_NUMS,
    TOKENS_PER_IMAGE,
    VAR_PARAMETERS,
    DecoderShape,
    VarShape,
    assumed_flops_per_second,
    decoding_flops,
    estimate,
    evaluated_images,
    evaluation_gpu_hours,
    gpu_kind,
    load_measured_sampling,
    load_measured_throughput,
    longest_first,
    measured_rate,
    sampling_flops_per_image,
    sampling_rate,
    training_flops,
    training_flops_per_row,
    training_gpu_hours,
    training_rate,
    training_rows,
    visible_attention_fraction,
)
from bench.schema import DATASETS, SUBSTITUTE_EXTRACTOR, EvaluationConfig, MethodConfig, replace
from bench.sweeps import build_sweep
from trainables.evaluation.evaluate import _sampling_flops_per_image
from trainables.methods import adapt, merge_adapters
from trainables.models import build_var, build_vqvae
from trainables.plan import TrialPlan
from trainables.profiling import (
    NOT_COUNTED,
    ComputeLedger,
    StepMeter,
    count_flops,
    flops_per_row,
    visible_pair_counter,
    visible_share,
)
from trainables.training import view_losses


def hand_flops(rows: int) -> float:
    """Forward: 2 FLOPs per multiply-add of every linear layer plus attention's two L x L products per head; backward:
    input and weight gradients (2x forward) except the word embedding, whose input needs no gradient (1x), and
    attention's backward counted as 2.5x its forward (five L x L products), over the visible query/key pairs only
    (a token sees its own and coarser scales)."""
    C, V, Cv, H = TINY_VAR["embed_dim"], TINY_VAR["vocab_size"], TINY_VAR["z_channels"], TINY_VAR["num_heads"]
    depth, pn = TINY_VAR["depth"], TINY_VAR["patch_nums"]
    L, first = sum(p * p for p in pn), pn[0] ** 2
    sizes = [p * p for p in pn]
    visible_pairs = sum(size * sum(sizes[: i + 1]) for i, size in enumerate(sizes))
    per_block_tokens = L * (3 * C * C + C * C + 2 * C * 4 * C)
    per_block_cond = C * 6 * C
    linear = rows * (depth * (per_block_tokens + per_block_cond) + C * 2 * C + L * C * V)
    word = rows * (L - first) * Cv * C
    attention = depth * rows * H * 4 * visible_pairs * (C // H)
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


@pytest.mark.parametrize("blocks", [None, (0,), (1,)])
def test_dry_run_estimate_counts_like_the_counter_on_the_tiny_model(tiny_vqvae, blocks):
    """bench.estimates' FLOP model (AdaLN per image, attention over the visible pairs; weight gradients of the
    trained blocks only, input gradients through all) against the counter on a real step."""
    var = build_var(**TINY_VAR, drop_path_rate=0.0)
    adapt(var, MethodConfig(name="full", train_blocks=blocks), num_classes=3, seed=0)
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
    # the counter counts what the model computes (norm-free: within 0.3% here); a dense attention count is 2% off
    trained = None if blocks is None else len(blocks)
    assert training_flops_per_row(shape, "full", trained_blocks=trained) == pytest.approx(counted, rel=0.005)
    assert (
        training_flops_per_row(shape, "full", dense_attention=True, trained_blocks=trained) > 1.015 * counted
    )
    if blocks is not None:  # the estimate of all blocks would be far off
        assert training_flops_per_row(shape, "full") > 1.1 * counted


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_counter_counts_visible_pairs_whichever_kernel_runs(tiny_vqvae, method):
    """The masked kernel computes every L x L pair, the per-scale kernel only the visible ones; the recorded
    FLOPs (and so MFU) are the useful ones either way: equal to 1e-9. PyTorch's stock counter on the masked
    kernel counts more by exactly the hidden pairs' share of attention, so the correction is not vacuous."""
    var = build_var(**TINY_VAR, drop_path_rate=0.0)
    adapt(var, MethodConfig(name=method), num_classes=3, seed=0)
    var.train()
    idx = [torch.randint(0, 64, (3, 1, p * p)) for p in TINY_VAR["patch_nums"]]

    def step() -> None:
        view_losses(
            var, tiny_vqvae, torch.zeros(3, dtype=torch.long), idx, class_dropout=0.0
        ).sum().backward()

    counts, ops = {}, {}
    for kernel in ("masked", "per_scale"):
        var.attention_kernel = kernel
        counts[kernel], ops[kernel] = count_flops(step)
        attention = sum(n for op, n in ops[kernel].items() if "scaled_dot_product" in op)
        assert attention > 0
    assert counts["masked"] == pytest.approx(counts["per_scale"], rel=1e-9)
    var.attention_kernel = "masked"
    with FlopCounterMode(display=False) as stock:
        step()
    hidden = 1 - visible_attention_fraction(TINY_VAR["patch_nums"])
    dense_attention = attention / (1 - hidden)
    in_place = sum(
        n for op, n in ops["masked"].items() if op.endswith("_")
    )  # products the stock counter skips
    assert stock.get_total_flops() - counts["masked"] + in_place == pytest.approx(
        hidden * dense_attention, rel=1e-6
    )


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_s_counted_flops_are_peft_s_whichever_way_its_layer_forms_its_sums(
    tiny_vqvae, autocast, monkeypatch
):
    """varsweep's LoRA layer forms its sums in place (``addmm_``: the adapter's product into the base output, the
    base's input gradient into lora_A's) or in one product over both inner dimensions (under autocast); PyTorch's
    counter skips in-place products, which cut a LoRA trial's recorded FLOPs by a quarter. Counted as their
    out-of-place forms, a step counts exactly what peft's own layer (out-of-place products and adds) does."""
    import peft

    from trainables.methods import LoraLinear

    var = build_var(**TINY_VAR, drop_path_rate=0.0)
    adapt(var, MethodConfig(name="lora"), num_classes=3, seed=0)
    var.train()
    idx = [
        torch.randint(0, 64, (3, 1, p * p), generator=torch.Generator().manual_seed(0))
        for p in TINY_VAR["patch_nums"]
    ]

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = view_losses(
                var, tiny_vqvae, torch.zeros(3, dtype=torch.long), idx, class_dropout=0.0
            ).sum()
        loss.backward()

    ours, by_op = count_flops(step)
    assert any("addmm_" in op for op in by_op)  # the in-place sums run and are counted
    monkeypatch.setattr(LoraLinear, "forward", peft.tuners.lora.layer.Linear.forward)
    monkeypatch.setattr(LoraLinear, "linear_plus_bias", lambda *_: None)  # mat_qkv's biases added after it
    theirs, their_ops = count_flops(step)
    assert not any("addmm_" in op for op in their_ops)
    assert ours == theirs


def test_a_torch_without_a_kernels_formula_meters_the_step_instead_of_failing(tiny_vqvae, monkeypatch):
    """torch 2.11 (the lent GPU machine's image) has no FLOP formula for the CPU flash kernels: the counter then
    leaves them uncounted, as the stock counter does, and the step still runs; the other kernels keep their
    visible-pair formula. Before, building the counter raised KeyError, failing every trial's counted step."""
    import torch.utils.flop_counter as flop_counter

    missing = (
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward,
    )
    older = {op: f for op, f in flop_counter.flop_registry.items() if op not in missing}
    monkeypatch.setattr(flop_counter, "flop_registry", older)
    counter = visible_pair_counter()
    assert not any(op in counter.flop_registry for op in missing)
    assert torch.ops.aten._scaled_dot_product_efficient_attention in counter.flop_registry
    var = build_var(**TINY_VAR, drop_path_rate=0.0).train()
    idx = [torch.randint(0, 64, (3, 1, p * p)) for p in TINY_VAR["patch_nums"]]
    with counter:
        view_losses(
            var, tiny_vqvae, torch.zeros(3, dtype=torch.long), idx, class_dropout=0.0
        ).sum().backward()
    by_op = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert counter.get_total_flops() > 0 and not any("scaled_dot_product" in op for op in by_op)


def test_visible_share_of_a_mask():
    bias = torch.tensor([[0.0, float("-inf")], [0.0, 0.0]])
    assert visible_share(bias) == 0.75 and visible_share(bias[None, None]) == 0.75
    assert visible_share(torch.tensor([[True, False], [False, False]])) == 0.25
    assert visible_share(None) == 1.0


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


def test_the_note_names_the_feature_extraction_at_its_counted_cost():
    """Inception-v3's forward (torchvision's geometry, TF Inception's: 299 x 299 input) counted as training's
    products are: 11.4 GFLOPs an image, 1.2% of a d16 image's sampling; the note says so."""
    import torchvision

    inception = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        inception(torch.zeros(1, 3, 299, 299))
    assert round(counter.get_total_flops() / 1e9, 1) == INCEPTION_GFLOPS_PER_IMAGE
    share = INCEPTION_GFLOPS_PER_IMAGE * 1e9 / sampling_flops_per_image(VarShape.official(16))
    assert 0.005 < share < 0.015
    assert f"Inception-v3: {INCEPTION_GFLOPS_PER_IMAGE} GFLOPs an image, about 1%" in NOT_COUNTED


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
        training_flops_per_row(shape, m, dense_attention=True) / training_flops_per_row(shape, m) - 1
        for m in ("full", "lora")
    ]
    assert [round(100 * o, 1) for o in overheads] == [4.5, 6.5]
    assert "38%" in NOT_COUNTED and "4.5%" in NOT_COUNTED and "6.5%" in NOT_COUNTED


SEED_DOCS = "docs/benchmarks.md, 'VAR-d16 on NVIDIA H200 (2026-11-26 00:58 UTC)'"


def test_the_committed_throughput_holds_the_documented_h200_figures():
    by = {
        (m["method"], m["clipping"], m["augmentation_multiplicity"]): m
        for m in load_measured_throughput()
        if m["device"] == ESTIMATE_DEVICE and m["depth"] == 16 and m["source"]["docs"] == SEED_DOCS
    }
    assert by[("full", None, 1)]["rows_per_second"] == 160.0
    assert by[("lora", None, 1)]["rows_per_second"] == 147.8
    assert by[("lora", "bookkeeping", 1)]["rows_per_second"] == pytest.approx(16 / 0.1577, abs=0.05)
    assert all(m["precision"] == "bf16 autocast" for m in by.values())
    sampling = {
        (m["batch_size"], m["precision"]): m["images_per_second"]
        for m in load_measured_sampling()
        if m["device"] == ESTIMATE_DEVICE and m["depth"] == 16 and m["source"]["docs"] == SEED_DOCS
    }
    assert sampling == {
        (32, "bf16 autocast"): 112.4,
        (32, "float32"): 48.7,
        (64, "bf16 autocast"): 137.6,
        (64, "float32"): 50.8,
    }


def _entry(**over) -> dict:
    entry = {
        "device": ESTIMATE_DEVICE,
        "depth": 16,
        "method": "lora",
        "clipping": None,
        "augmentation_multiplicity": 1,
        "precision": "bf16 autocast",
        "rows_per_second": 100.0,
        "attention_kernel": "masked",
        "compile": False,
        "source": {"script": "s", "date": "2026-11-26", "docs": "d"},
    }
    return {**entry, **over}


def test_a_measured_rate_matches_depth_method_dp_and_k_exactly():
    table1 = build_sweep("table1")
    lora16 = next(c for c in table1 if c.method.name == "lora" and c.model.depth == 16)
    table2 = build_sweep("table2")
    dp_k1 = next(
        c
        for c in table2
        if c.method.name == "lora" and c.model.depth == 16 and c.privacy.augmentation_multiplicity == 1
    )
    assert dp_k1.privacy.clipping == "auto"  # resolves to book-keeping for an adapted VAR
    entries = [
        _entry(rows_per_second=1.0, depth=20),
        _entry(rows_per_second=2.0, method="full"),
        _entry(rows_per_second=3.0, device="NVIDIA A100"),
        _entry(rows_per_second=4.0, precision="float32"),
        _entry(rows_per_second=5.0, clipping="bookkeeping", augmentation_multiplicity=32),
    ]
    assert measured_rate(lora16, entries) is None and measured_rate(dp_k1, entries) is None
    entries.append(_entry(rows_per_second=6.0, clipping="bookkeeping"))
    assert measured_rate(dp_k1, entries)["rows_per_second"] == 6.0
    assert measured_rate(lora16, entries) is None
    ghost = dataclasses.replace(dp_k1, privacy=dataclasses.replace(dp_k1.privacy, clipping="ghost"))
    assert measured_rate(ghost, entries + [_entry(clipping="ghost")]) is None  # ghost trains in float32
    assert measured_rate(ghost, [_entry(clipping="ghost", precision="float32")]) is not None
    # several: the trial's kernel and compile setting first ("auto" is per_scale), then the latest
    later = _entry(rows_per_second=7.0, source={"date": "2026-12-01"})
    same_setting = _entry(rows_per_second=8.0, attention_kernel="per_scale", source={"date": "2026-01-01"})
    assert measured_rate(lora16, [_entry(), later])["rows_per_second"] == 7.0
    assert measured_rate(lora16, [_entry(), later, same_setting])["rows_per_second"] == 8.0


def test_a_gpu_is_priced_from_its_own_kind_first_then_another_scaled_by_the_datasheet_peaks():
    """The device is matched by kind (the benchmark's full name, or ``--gpu``'s short one) and freed last: an
    H200 trial at d20 is priced from the H200's d16 before the H100's d20; an H100 trial from the H100's
    measurement; an A100, with none of its own, from the nearest other GPU's (the H100's d20: one difference, not
    two) times 312/989; a float32 setting with nothing near in float32, at 35% of the A100's peak. Unknown GPUs
    are refused by name."""
    configs = build_sweep("table1")
    full20 = next(c for c in configs if c.method.name == "full" and c.model.depth == 20)
    h200_d16 = _entry(rows_per_second=100.0, method="full", depth=16)
    h100_d20 = _entry(rows_per_second=40.0, method="full", depth=20, device="NVIDIA H100 80GB HBM3")
    entries = [h200_d16, h100_d20]
    assert training_rate(full20, entries).measured is h200_d16
    for name in ("H100", "h100", "NVIDIA H100 80GB HBM3"):
        assert measured_rate(full20, entries, device=name) is h100_d20
    a100 = training_rate(full20, entries, device="A100")
    assert a100.kind == "scaled" and a100.measured is h100_d20
    assert a100.per_second == pytest.approx(40.0 * 312 / 989) and a100.basis == "from H100: 12.6 rows/s"
    flops = [training_flops_per_row(VarShape.official(d), "full") for d in (16, 20)]
    h200_only = training_rate(full20, [h200_d16], device="A100")
    assert h200_only.basis.startswith("from H200 d16: ")
    assert h200_only.per_second == pytest.approx(100.0 * flops[0] / flops[1] * 312 / 989)
    float32 = replace(full20, optimization={"autocast_bf16": False})
    assumed = training_rate(float32, entries, device="A100")
    assert assumed.kind == "assumed" and assumed.per_second == pytest.approx(312e12 * 0.35 / flops[1])
    assert gpu_kind("NVIDIA H200 NVL") == "H200 NVL" and gpu_kind("NVIDIA L40S") == "L40S"
    assert gpu_kind("NVIDIA H100 NVL") == "H100 NVL" and gpu_kind("NVIDIA L40") == "L40"
    assert gpu_kind("NVIDIA L4") == "L4" and gpu_kind("NVIDIA H100 80GB HBM3") == "H100"
    assert gpu_kind("cpu") is None
    with pytest.raises(
        ValueError, match="unknown GPU 'V100': the dry run prices one of H200 NVL, H100 NVL, H100 PCIe"
    ):
        estimate([full20], done=set(), plans={}, measurements=entries, samplings=[], device="V100")


def test_full_fine_tuning_of_some_blocks_is_priced_at_its_own_flops():
    """Measurements train every block; full fine-tuning of blocks 12-15 of d16 computes weight gradients for 4
    of 16 blocks (1.30x fewer FLOPs per row, its input gradients still run through all), so its rows per second
    are scaled up by that, measured or assumed, and its training FLOPs are the smaller count; LoRA restricted to
    blocks trains alike (its adapter gradients are not counted)."""
    full16 = next(c for c in build_sweep("table1") if c.method.name == "full" and c.model.depth == 16)
    late = replace(full16, method={"train_blocks": (12, 13, 14, 15)})
    shape = VarShape.official(16)
    fewer = training_flops_per_row(shape, "full") / training_flops_per_row(shape, "full", trained_blocks=4)
    assert round(fewer, 2) == 1.30
    entries = [_entry(method="full", rows_per_second=160.0)]
    rate = training_rate(late, entries)
    assert rate.kind == "scaled" and rate.measured is entries[0]
    assert rate.per_second == pytest.approx(160.0 * fewer)
    assert rate.basis == f"measured 160.0 rows/s; 4/16 blocks: {160.0 * fewer:.1f} rows/s"
    assert measured_rate(late, entries) is None and measured_rate(full16, entries) is entries[0]
    assumed = training_rate(late, [])
    assert assumed.kind == "assumed"
    assert assumed.per_second == pytest.approx(training_rate(full16, []).per_second * fewer)
    n = DATASETS[full16.data.dataset].train_images
    assert training_flops(full16, train_images=n, steps=10) == pytest.approx(
        fewer * training_flops(late, train_images=n, steps=10)
    )
    lora16 = next(c for c in build_sweep("table1") if c.method.name == "lora" and c.model.depth == 16)
    lora_late = replace(lora16, method={"train_blocks": (12, 13, 14, 15)})
    assert training_rate(lora_late, [_entry()]).kind == "measured"


def test_gpu_hours_come_from_the_measured_rate_where_one_matches():
    configs = build_sweep("table1")
    lora16 = next(c for c in configs if c.method.name == "lora" and c.model.depth == 16)
    ln16 = next(c for c in configs if c.method.name == "ln_tuning" and c.model.depth == 16)
    images = DATASETS[lora16.data.dataset].train_images
    steps = lora16.planned_steps(images)
    entries = [_entry(rows_per_second=50.0)]
    hours, rate = training_gpu_hours(lora16, train_images=images, steps=steps, measurements=entries)
    assert rate.kind == "measured" and rate.measured is entries[0]
    assert hours == pytest.approx(training_rows(lora16, train_images=images, steps=steps) / 50.0 / 3600)
    float32 = replace(ln16, optimization={"autocast_bf16": False})  # nothing measured in float32: assumed
    ln_images = DATASETS[ln16.data.dataset].train_images
    ln_steps = ln16.planned_steps(ln_images)
    hours, rate = training_gpu_hours(float32, train_images=ln_images, steps=ln_steps, measurements=entries)
    assert rate.kind == "assumed" and rate.measured is None
    assert hours == pytest.approx(
        training_flops(ln16, train_images=ln_images, steps=ln_steps)
        / assumed_flops_per_second(ESTIMATE_DEVICE)
        / 3600
    )
    text = estimate([lora16, float32], done=set(), plans={}, measurements=entries, samplings=[])
    rows = text.splitlines()
    assert "measured 50.0 rows/s" in rows[1] and "assumed 35% MFU: " in rows[2]
    assert "measured: NVIDIA H200 d16 lora no DP k=1 bf16 autocast: 50.0 rows/s" in text


def test_a_folder_dataset_without_a_plan_is_not_estimated_at_zero():
    """A folder dataset has no published size: a dry run whose preflight failed (no plan) priced its trials at
    N = 0 (one step, no images, 0.0 GPU hours) as if measured; they are listed as not estimated and counted."""
    lora16 = next(c for c in build_sweep("table1") if c.method.name == "lora" and c.model.depth == 16)
    folder = replace(lora16, data={"dataset": "folder", "root": "/nowhere"})
    text = estimate([lora16, folder], done=set(), plans={}, measurements=[_entry()], samplings=[])
    rows = text.splitlines()
    assert "measured 100.0 rows/s" in rows[1] and rows[2].split()[2:] == [
        "pending",
        "not",
        "estimated:",
        *("split sizes are read from the data, and the preflight could not plan this trial".split()),
    ]
    footer = rows[3]
    assert footer.startswith("2 of 2 trials to run;") and footer.endswith(
        "for 1 of them; 1 not estimated: split sizes are read from the data, and the preflight could not plan this trial"
    )
    alone = estimate([lora16], done=set(), plans={}, measurements=[_entry()], samplings=[]).splitlines()[2]
    assert re.search(r"= (\S+)$", alone).group(1) == re.search(r"= (\S+) for", footer).group(1)


def test_an_unmeasured_setting_is_priced_from_the_nearest_measured_one_at_its_utilisation():
    """VAR-d20 priced from d16's measurement keeps d16's utilisation: its rows/s shrink by the FLOPs per row
    (1.91x for full fine-tuning), where the assumed 35% made a d20 trial cheaper than d16's at its measured 15%.
    Then another k (rows count every view: the rate per row carries over), then another method at its FLOPs; the
    nearest depth first. Precision and DP clipping are never crossed; the base trains nothing."""
    configs = build_sweep("table1")
    full20 = next(c for c in configs if c.method.name == "full" and c.model.depth == 20)
    ratio = training_flops_per_row(VarShape.official(20), "full") / training_flops_per_row(
        VarShape.official(16), "full"
    )
    assert round(ratio, 2) == 1.91
    rate = training_rate(full20, [_entry(method="full", rows_per_second=160.0)])
    assert rate.kind == "scaled" and rate.per_second == pytest.approx(160.0 / ratio)
    assert rate.basis == f"from d16: {160.0 / ratio:.1f} rows/s"
    d16, d24 = _entry(method="full"), _entry(method="full", depth=24, source={"date": "2026-12-01"})
    assert training_rate(full20, [d16, d24]).measured is d24  # 4 away either way: the latest
    assert training_rate(full20, [d16, {**d24, "depth": 22, "source": {}}]).measured["depth"] == 22
    # a measurement of the trial's own method at another depth comes before another method at its depth
    lora20 = _entry(depth=20, rows_per_second=77.0)
    assert training_rate(full20, [lora20, d16]).measured is d16
    from_lora = training_rate(full20, [lora20])
    lora_flops = training_flops_per_row(VarShape.official(20), "lora")
    assert from_lora.basis.startswith("from lora: ") and from_lora.per_second == pytest.approx(
        77.0 * lora_flops / training_flops_per_row(VarShape.official(20), "full")
    )
    for other in (dict(precision="float32"), dict(clipping="bookkeeping")):
        assert training_rate(full20, [_entry(**{"method": "full", **other})]).kind == "assumed"
    # from another method, one that trains alike: LN tuning's input gradients are LoRA's, not full fine-tuning's,
    # even where LoRA was measured at another depth only
    ln16 = next(c for c in configs if c.method.name == "ln_tuning" and c.model.depth == 16)
    full16, lora16 = _entry(method="full", rows_per_second=160.0), _entry(rows_per_second=147.8)
    assert training_rate(ln16, [full16, lora16]).basis == "from lora: 147.8 rows/s"
    ln20, full_d20 = replace(ln16, model={"depth": 20}), _entry(method="full", depth=20, rows_per_second=84.0)
    for entries in ([full_d20, lora16], [lora16, full_d20]):
        assert training_rate(ln20, entries).measured is lora16
    table2 = build_sweep("table2")
    k32 = next(c for c in table2 if c.method.name == "lora" and c.privacy.augmentation_multiplicity == 32)
    dp_k1 = _entry(depth=k32.model.depth, clipping="bookkeeping", rows_per_second=101.5)
    rate = training_rate(k32, [_entry(depth=k32.model.depth, rows_per_second=150.0), dp_k1])
    assert rate.measured is dp_k1 and rate.per_second == 101.5 and rate.basis == "from k=1: 101.5 rows/s"
    # the nearest k by ratio, whatever the file's order: k = 4 is nearer 32 than k = 1 is
    dp_k4 = {**dp_k1, "augmentation_multiplicity": 4, "rows_per_second": 95.2}
    for entries in ([dp_k1, dp_k4], [dp_k4, dp_k1]):
        assert training_rate(k32, entries).basis == "from k=4: 95.2 rows/s"
    base = replace(full20, method={"name": "base"}, optimization={"steps": 0, "epochs": None})
    hours, rate = training_gpu_hours(base, train_images=1020, steps=0, measurements=[])
    assert hours == 0.0 and rate.basis == "trains nothing"


@pytest.mark.parametrize("method", ["full", "ln_tuning", "lora"])
def test_the_estimate_s_sampling_flops_are_what_an_evaluation_records(tiny_vqvae, method):
    """bench.estimates' sampling FLOPs (both guidance rows over the KV cache, the word embedding once, the
    quantiser's phi convolutions and the decoder) equal the counter's count that a trial's evaluation records
    (``sample_flops_per_image``) on the tests' tiny VAR and VQVAE, exactly, for an adapted model; for LoRA, once
    its adapter is merged (as CUDA's bf16 sampling runs it): unmerged, the adapter's own products come on top, as
    the estimate leaves them out of training's useful FLOPs too. And the official decoder's count on the meta
    device: 394 GFLOPs of d16's 991 GFLOPs per image."""
    var = build_var(**TINY_VAR, generator=torch.Generator().manual_seed(0))
    adapt(var, MethodConfig(name=method), num_classes=3, seed=0)
    var.eval()
    evaluation = EvaluationConfig(extractor=SUBSTITUTE_EXTRACTOR)
    recorded = _sampling_flops_per_image(var, tiny_vqvae, label=1, evaluation=evaluation)
    shape = VarShape(
        **{key: TINY_VAR[key] for key in ("depth", "embed_dim", "vocab_size", "z_channels", "patch_nums")}
    )
    layout = {key: TINY_VQVAE[key] for key in ("ch", "ch_mult", "num_res_blocks", "z_channels", "patch_nums")}
    estimated = sampling_flops_per_image(shape, DecoderShape(**layout))
    if method == "lora":
        assert recorded > 1.01 * estimated  # the adapter's products, unmerged
        recorded = _sampling_flops_per_image(merge_adapters(var), tiny_vqvae, label=1, evaluation=evaluation)
    assert estimated == recorded
    official = build_vqvae(
        vocab_size=4096, z_channels=32, ch=160, patch_nums=OFFICIAL_PATCH_NUMS, device="meta"
    )
    decoded, _ = count_flops(lambda: official.fhat_to_img(torch.empty(1, 32, 16, 16, device="meta")))
    phis = len(OFFICIAL_PATCH_NUMS) * 2 * 9 * 32 * 32 * 16 * 16  # one 3x3 phi per scale builds f-hat
    assert decoding_flops(DecoderShape()) == decoded + phis == 393_760_735_232
    assert round(sampling_flops_per_image(VarShape.official(16)) / 1e9) == 991


def _sampling(**over) -> dict:
    entry = {
        "device": ESTIMATE_DEVICE,
        "depth": 16,
        "precision": "bf16 autocast",
        "batch_size": 32,
        "compiled": False,
        "images_per_second": 100.0,
        "measured_in": "generation",
        "source": {"date": "2026-11-26"},
    }
    return {**entry, **over}


def test_a_sampling_rate_matches_the_evaluation_setting_or_scales_from_the_nearest():
    """A trial's evaluations are priced at a rate measured for its depth, precision, evaluation batch size and
    compile_sampling (a whole trial evaluation before sampling alone), else from another depth (scaled by the
    sampling FLOPs), batch size or compile setting, else from another kind of GPU (scaled by the peaks), else at
    the assumed utilisation; never across precisions. The evaluation's GPU hours count every GPU the trial
    holds."""
    table1 = build_sweep("table1")
    lora16 = next(c for c in table1 if c.method.name == "lora" and c.model.depth == 16)
    full20 = next(c for c in table1 if c.method.name == "full" and c.model.depth == 20)
    float32, a100 = (
        _sampling(precision="float32", images_per_second=3.0),
        _sampling(device="NVIDIA A100-SXM4-80GB", images_per_second=4.0),
    )
    assumed = sampling_rate(lora16, [float32])
    assert assumed.kind == "assumed" and assumed.per_second == pytest.approx(
        assumed_flops_per_second(ESTIMATE_DEVICE) / sampling_flops_per_image(VarShape.official(16))
    )
    other_gpu = sampling_rate(lora16, [float32, a100])
    assert other_gpu.kind == "scaled" and other_gpu.per_second == pytest.approx(4.0 * 989 / 312)
    assert other_gpu.basis == f"from A100: {4.0 * 989 / 312:.1f} img/s"
    foreign = [float32, a100]
    batch64, compiled32 = (
        _sampling(batch_size=64, images_per_second=1.0),
        _sampling(compiled=True, images_per_second=2.0),
    )
    assert sampling_rate(lora16, [*foreign, batch64]).basis == "from batch 64: 1.0 img/s"
    # the other batch size is relaxed before the compile setting
    assert sampling_rate(lora16, [*foreign, compiled32, batch64]).measured is batch64
    generation = _sampling(source={"date": "2026-12-01"})
    evaluation = _sampling(images_per_second=90.0, measured_in="trial evaluation")
    others = [*foreign, batch64, compiled32]
    assert sampling_rate(lora16, [*others, generation]).measured is generation
    assert sampling_rate(lora16, [*others, generation, evaluation]).measured is evaluation
    compiled = replace(lora16, resources={"compile_sampling": True})
    assert sampling_rate(compiled, others).per_second == 2.0
    scaled = sampling_rate(full20, [*others, evaluation])
    flops = [sampling_flops_per_image(VarShape.official(d)) for d in (16, 20)]
    assert scaled.kind == "scaled" and scaled.per_second == pytest.approx(90.0 * flops[0] / flops[1])
    two_gpus = replace(full20, resources={"workers": 2})
    assert evaluation_gpu_hours(two_gpus, images=3600, rate=scaled) == pytest.approx(
        2 * 3600 / scaled.per_second / 3600
    )
    demo = build_sweep("demo")[0]
    assert sampling_rate(demo, [evaluation]).kind == "none"
    assert evaluation_gpu_hours(demo, images=100, rate=sampling_rate(demo, [evaluation])) == 0.0


def test_the_estimate_counts_every_image_a_trial_evaluates():
    """The final evaluation (the test split, or evaluation.num_images) and convergence_num_images at each point
    of the curve: the convergence sweep's Flowers runs score 6,149 + 8 x 1,000 images; the estimate's table
    prices them and adds their hours to the total."""
    curve = next(c for c in build_sweep("convergence") if c.data.dataset == "flowers102")
    steps = curve.planned_steps(DATASETS["flowers102"].train_images)
    assert len(curve.convergence_steps(steps)) == 8
    assert evaluated_images(curve, evaluation_split=6149, steps=steps) == 6149 + 8 * 1000
    fixed = replace(curve, evaluation={"num_images": 500, "convergence_points": 0})
    assert evaluated_images(fixed, evaluation_split=6149, steps=steps) == 500
    text = estimate(
        [curve], done=set(), plans={}, measurements=[], samplings=[_sampling(depth=curve.model.depth)]
    )
    row, total = text.splitlines()[1], text.splitlines()[2]
    rate = sampling_rate(curve, [_sampling(depth=curve.model.depth)])
    hours = 14149 / 100.0 / 3600
    assert " 14149 measured 100.0 img/s" in row and row.endswith(f"{hours:.2f}")
    train, _ = training_gpu_hours(curve, train_images=1020, steps=steps, measurements=[])
    assert (
        rate.per_second == 100.0
        and f"training {train:.1f} + evaluation {hours:.1f} = {train + hours:.1f}" in total
    )
    assert "NVIDIA H200 d16 sampling at batch 32 eager bf16 autocast: 100.0 images/s (generation" in text


def _plans(configs, *, train_images: int, canaries: int = 0) -> dict:
    return {
        c.trial_id: TrialPlan(
            train_images=train_images,
            evaluation_images=100,
            classes=10,
            planned_steps=c.planned_steps(train_images + canaries),
            canaries_included=canaries,
        )
        for c in configs
    }


def test_a_sweep_starts_its_longest_trials_first():
    """The smoke privacy audit in sweep order starts its 300-step memorising pair last; started longest first, the
    pair goes first and the 24-step LoRA trials fill the other worker (DP: the expected Poisson batch q N' times
    k views). Official models are ordered by their estimated wall time, which the measured rates set: DP-LoRA's
    trials, whose rows run slower than LoRA's without DP, start before LoRA's trials of more FLOPs; ties keep
    their order."""
    audit = build_sweep("privacy_audit", smoke=True)
    assert [c.optimization.steps for c in audit] == [24] * 5 + [300] * 2
    ordered = longest_first(audit, _plans(audit, train_images=1438, canaries=84))
    assert sorted(ordered, key=audit.index) == audit
    expected = [
        "full-d2-digits-eps8-k1",
        "full-d2-digits",
        "lora-d2-digits-eps1-k4",
        "lora-d2-digits-eps8-k4",
    ]
    assert [c.label.removesuffix("-audit200-s0") for c in ordered[:4]] == expected
    assert ordered[-1].privacy is None and ordered[-1].method.name == "lora"
    table1 = [c for c in build_sweep("table1") if c.data.dataset == "flowers102"]
    ordered = longest_first(table1, _plans(table1, train_images=1020), measurements=[], samplings=[])
    work = [training_flops(c, train_images=1020, steps=c.planned_steps(1020)) for c in ordered]
    assert work == sorted(work, reverse=True) and ordered[0].model.depth == max(c.model.depth for c in table1)
    # With measured rates, LoRA at 400 rows/s without DP and 100 with book-keeping: LoRA on CUB (937 steps of
    # 256) has 2.9x the rows and FLOPs of DP-LoRA on Flowers (319 steps of q N = 256), but runs 0.73x as long.
    lora = next(c for c in build_sweep("table1") if c.label == "lora-d16-cub200-s0")
    dp = next(c for c in build_sweep("table2") if c.label == "lora-d16-flowers102-eps10-k1-s0")
    plans = {**_plans([lora], train_images=5994), **_plans([dp], train_images=1020)}
    size = {c: (plans[c.trial_id].examples, plans[c.trial_id].planned_steps) for c in (lora, dp)}
    flops = [training_flops(c, train_images=n, steps=t) for c, (n, t) in size.items()]
    assert 2.8 < flops[0] / flops[1] < 3.0
    assert longest_first([dp, lora], plans, measurements=[], samplings=[]) == [lora, dp]  # FLOPs alone
    rates = [_entry(rows_per_second=400.0), _entry(rows_per_second=100.0, clipping="bookkeeping")]
    assert longest_first([lora, dp], plans, measurements=rates, samplings=[]) == [dp, lora]
    # The demo is in that order already: full and LoRA tie (1,000 steps of 32), then the DP pair (tied), then
    # the base, which trains nothing.
    demo = build_sweep("demo")
    assert longest_first(demo, _plans(demo, train_images=1438)) == demo and demo[-1].method.name == "base"


def test_step_meter_enters_counting_context_on_the_counting_step_only():
    """The context (finetune: per_scale attention while FlexAttention trains) wraps the one counted step and no other."""
    entered = []

    @contextlib.contextmanager
    def context():
        entered.append(True)
        yield

    meter = StepMeter("cpu", counting_context=context)
    weight = torch.randn(4, 4)
    for _ in range(3):
        meter.run(lambda: weight @ weight, local_rows=4, rows=4)
    assert entered == [True] and meter.ledger.train_flops_per_row == 2 * 4**3 / 4


@pytest.mark.parametrize("copies", [1, 4])
def test_per_step_work_every_rank_runs_counts_once_per_rank_and_leaves_the_rows_alone(copies):
    """A DP run's public prior term runs on every rank: the step's total counts it ``copies`` times, while FLOPs
    per row are this process's rows' alone."""
    meter, weight, prior = StepMeter("cpu"), torch.randn(4, 4), torch.randn(2, 2)
    public = meter.fixed_cost(lambda: prior @ prior, copies=copies)
    for _ in range(3):
        meter.run(lambda: (weight @ weight, public()), local_rows=4, rows=4)
    assert meter.ledger.train_flops_per_row == 2 * 4**3 / 4
    assert meter.ledger.train_flops_per_step == copies * 2 * 2**3
    assert meter.ledger.report()["train_pflops"] * 1e15 == 3 * (4 * 2 * 4**3 / 4 + copies * 2 * 2**3)


def test_step_meter_waits_for_the_gpu_once_per_training_segment_not_per_step(monkeypatch):
    """Steps queue their kernels without waiting for the last step's: a CUDA meter synchronises where a segment opens
    (its first step) and where it ends (``pause``, the report), and its time is the segments' wall time, the host
    work between steps included and what happens while paused (an evaluation, a checkpoint) left out."""
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    meter = StepMeter(torch.device("cuda"))  # nothing runs on it: the steps are host functions
    meter.ledger.train_flops_per_row = 1.0  # the counting step is another test's
    clock = {"now": 0.0}
    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])

    def step(seconds: float) -> None:
        clock["now"] += seconds

    for _ in range(5):
        meter.run(lambda: step(1.0), local_rows=2, rows=4)
        clock["now"] += 0.5  # between steps: the schedule, the draws
    meter.pause()
    clock["now"] += 100.0  # an evaluation
    meter.pause()  # a second pause is a no-op
    for _ in range(3):
        meter.run(lambda: step(2.0), local_rows=2, rows=4)
    report = meter.report()
    assert len(syncs) == 4  # open, pause, open, the report's pause (two per step before)
    assert report["train_seconds"] == pytest.approx(5 * 1.5 + 3 * 2.0)
    assert report["rows_trained"] == 32 and report["steps_trained"] == 8


@pytest.mark.parametrize(
    ("name", "tflops"),
    (
        ("NVIDIA H200", 989),
        ("NVIDIA H200 NVL", 835),
        ("NVIDIA H100 80GB HBM3", 989),
        ("NVIDIA H100 PCIe", 756),
    ),
)
def test_the_datasheet_peak_is_the_named_parts_not_a_shorter_names(monkeypatch, name, tflops):
    """The NVL and PCIe parts contain the SXM part's name; their lower peaks must win (MFU against the datasheet)."""
    from trainables.profiling import peak_flops_per_second

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops_per_second("cuda") == tflops * 1e12


def test_the_sweeps_script_totals_are_the_dry_run_s():
    """scripts/estimate_sweeps.py, as a user runs it: its table1 row holds the totals the dry run prints for the
    sweep (published split sizes, the committed rates), and every paper sweep has a row."""
    out = run_script("estimate_sweeps.py")
    footer = next(
        line
        for line in estimate(build_sweep("table1"), done=set(), plans={}).splitlines()
        if "GPU hours" in line
    )
    training, evaluation, total = re.search(r"training (\S+) \+ evaluation (\S+) = (\S+)", footer).groups()
    row = next(line for line in out.splitlines() if line.startswith("| table1 |")).split(" | ")
    assert (row[3], row[6], row[8].rstrip(" |")) == (training, evaluation, total)
    assert {line.split(" | ")[0].lstrip("| ") for line in out.splitlines() if line.startswith("| ")} >= {
        "table1",
        "table2",
        "table3",
        "convergence",
        "privacy_audit",
    }


def test_a_throughput_file_with_an_incomplete_entry_is_refused_by_name(tmp_path):
    """A hand-edited throughput file whose entry lacks a key fails with the list, the key and the entry named,
    before any estimate is printed; a file without a sampling list reads as none measured."""
    path = tmp_path / "throughput.json"
    incomplete = {key: value for key, value in _sampling().items() if key != "batch_size"}
    path.write_text(json.dumps({"measurements": [_entry()], "sampling": [incomplete]}))
    assert load_measured_throughput(path) == [_entry()]
    with pytest.raises(ValueError, match=r"a sampling entry lacks \['batch_size'\]"):
        load_measured_sampling(path)
    path.write_text(json.dumps({"measurements": [_entry()]}))
    assert load_measured_sampling(path) == []


@pytest.mark.parametrize(
    "content, problem",
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected an object whose 'measurements' is a list"),
        ('{"measurements": {}}', "expected an object whose 'measurements' is a list"),
        ('{"measurements": ["entry"]}', "lacks"),
        (json.dumps({"measurements": [_entry(rows_per_second=0)]}), "needs a positive rows_per_second"),
        (json.dumps({"measurements": [_entry(depth="20")]}), "a positive integer depth"),
        (json.dumps({"measurements": [_entry(source="docs")]}), "a source object"),
        # A run on a GPU without a known peak (written by --write-throughput before it refused one) was taken
        # when pricing another GPU and failed every dry run and sweep with "error: None (KeyError)".
        (
            json.dumps({"measurements": [_entry(device="Tesla V100-SXM2-32GB")]}),
            r"measured on 'Tesla V100-SXM2-32GB', a device without a known dense bf16 peak",
        ),
    ],
)
def test_a_malformed_throughput_file_is_refused_with_its_path(tmp_path, content, problem):
    """The dry run and the order a sweep starts its trials in read the file: a hand-edited one that is not what
    the estimate needs stops with the file named and the problem, not a bare traceback or a zero rate."""
    path = tmp_path / "throughput.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=problem) as raised:
        load_measured_throughput(path)
    assert str(path) in str(raised.value)
