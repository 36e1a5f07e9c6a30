"""Training step, optimiser groups, schedule, sampling behaviour and the module-call contract of VAR."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VAR, TINY_VQVAE
from torch import nn

from trainables import progress as progress_module
from trainables.data import offline
from trainables.models import KVCache, build_var, build_vqvae
from trainables.pretrain import Schedule, encode_tokens, reconstruction_mse, train_vqvae
from trainables.progress import Progress
from trainables.training import (
    apply_class_dropout,
    build_optimizer,
    lr_at,
    parameter_groups,
    record_history,
    teacher_forcing_batch,
    token_cross_entropy,
    var_training_step,
)


@pytest.fixture(scope="module")
def shapes16():
    return offline.shapes(split="train", images_per_class=12, image_size=16, seed=0)


def test_tiny_vqvae_reconstruction_improves(shapes16):
    torch.manual_seed(0)
    vqvae = build_vqvae(**TINY_VQVAE)
    before = reconstruction_mse(vqvae, shapes16.images_N3HW)
    history = train_vqvae(
        vqvae,
        shapes16.images_N3HW,
        schedule=Schedule(steps=120, batch_size=16, lr=1e-3, warmup_steps=5, weight_decay=0.0, log_every=40),
    )
    after = reconstruction_mse(vqvae, shapes16.images_N3HW)
    print(f"reconstruction MSE {before:.4f} -> {after:.4f}")
    assert after < 0.7 * before
    assert history[-1]["step"] == 120 and not vqvae.training


def test_tiny_var_loss_drops_on_fixed_batch(tiny_var, tiny_vqvae, shapes16):
    tokens = encode_tokens(tiny_vqvae, shapes16.images_N3HW[:16])
    labels = shapes16.labels_N[:16] % TINY_VAR["num_classes"]
    optimizer = build_optimizer(tiny_var, lr=3e-3)
    losses = [
        var_training_step(tiny_var, tiny_vqvae, optimizer, labels, tokens, class_dropout=0.0)["loss"]
        for _ in range(40)
    ]
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.5 * losses[0]


def test_loss_is_token_mean_cross_entropy(tiny_var, tiny_vqvae):
    idx_Bl = tiny_vqvae.img_to_idxBl(torch.rand(3, 3, 16, 16) * 2 - 1)
    x, target_BL = teacher_forcing_batch(tiny_vqvae, idx_Bl)
    logits_BLV = tiny_var(torch.tensor([0, 1, 2]), x)
    manual = -logits_BLV.log_softmax(-1).gather(-1, target_BL[..., None]).squeeze(-1)
    assert target_BL.shape == (3, tiny_var.seq_len)
    assert torch.allclose(token_cross_entropy(logits_BLV, target_BL), manual, atol=1e-5)


def test_teacher_forcing_input_is_built_in_float32_under_autocast(tiny_vqvae, monkeypatch):
    """The official trainer builds the VAR input before its autocast region; inside one (CUDA's bf16 autocast in
    training) the phi convolutions ran in bf16, a bf16 ulp off float32's. The VQVAE now runs with autocast off.
    A spy stands in for it: bf16 kernels run under CPU autocast here changed later tests' float32 results."""
    idx_Bl = tiny_vqvae.img_to_idxBl(torch.rand(4, 3, 16, 16) * 2 - 1)
    seen = []

    def spy(idx):
        seen.append(torch.is_autocast_enabled("cpu"))
        return torch.zeros(4, tiny_var_tokens(idx), 8)

    monkeypatch.setattr(tiny_vqvae, "idxBl_to_var_input", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_BLCv, target_BL = teacher_forcing_batch(tiny_vqvae, idx_Bl)
    assert seen == [False] and x_BLCv.shape == (4, target_BL.shape[1] - 1, 8)


def tiny_var_tokens(idx_Bl) -> int:
    """Tokens after the first scale."""
    return sum(idx.shape[1] for idx in idx_Bl[1:])


def test_class_dropout_once_per_example():
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = apply_class_dropout(
        labels, rate=0.1, unconditional_label=7, generator=torch.Generator().manual_seed(0)
    )
    assert set(dropped.unique().tolist()) == {0, 7}
    assert abs((dropped == 7).float().mean().item() - 0.1) < 0.01
    assert torch.equal(apply_class_dropout(labels, rate=0.0, unconditional_label=7), labels)
    with pytest.raises(ValueError, match="class dropout"):
        apply_class_dropout(labels, rate=1.0, unconditional_label=7)


def test_forward_has_no_class_dropout():
    # Drop-path off: block 1 of a depth-2 model drops paths at the full rate (global draws without keyed ones),
    # so the two forwards differed whenever the global stream dropped one.
    var = build_var(**TINY_VAR, drop_path_rate=0.0, generator=torch.Generator().manual_seed(0)).train()
    x = torch.randn(2, var.seq_len - 1, 8)
    labels = torch.tensor([1, 2])
    assert torch.equal(var(labels, x), var(labels, x))


def test_no_weight_decay_groups(tiny_var):
    decay, no_decay = parameter_groups(tiny_var, weight_decay=0.05)
    names = {id(p): n for n, p in tiny_var.named_parameters()}
    decay_names, no_decay_names = (
        {names[id(p)] for p in decay["params"]},
        {names[id(p)] for p in no_decay["params"]},
    )
    assert decay_names | no_decay_names == set(names.values()) and not decay_names & no_decay_names
    for name in (
        "class_emb.weight",
        "lvl_embed.weight",
        "pos_start",
        "pos_1LC",
        "word_embed.bias",
        "head.bias",
        "blocks.0.attn.q_bias",
        "blocks.0.attn.v_bias",
        "blocks.0.attn.scale_mul_1H11",
        "blocks.1.ada_lin.1.bias",
    ):
        assert name in no_decay_names, name
    for name in (
        "word_embed.weight",
        "head.weight",
        "blocks.0.attn.mat_qkv.weight",
        "blocks.0.ffn.fc1.weight",
        "blocks.1.ada_lin.1.weight",
    ):
        assert name in decay_names, name
    tiny_var.class_emb.weight.requires_grad_(False)
    assert "class_emb.weight" not in {
        names[id(p)] for g in parameter_groups(tiny_var, weight_decay=0.05) for p in g["params"]
    }


def test_lr_schedule():
    kw = dict(base_lr=1.0, total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(100, **kw) == pytest.approx(0.1) and lr_at(55, **kw) == pytest.approx(0.55)


def test_history_keeps_six_significant_digits():
    """The last steps of a cosine schedule at lr 1e-4 and a small prior KL are logged, not read as 0.0 (six
    decimal places kept ~2 digits of 2.5e-8); counts stay integers."""
    history: list[dict] = []
    record_history(
        history, None, step=990, started=0.0, lr=2.467198e-08, prior_kl=3.2e-7, loss=4.1589423, codes=3
    )
    entry = history[0]
    assert entry["lr"] == 2.4672e-08 and entry["prior_kl"] == 3.2e-07 and entry["loss"] == 4.15894
    assert entry["codes"] == 3 and isinstance(entry["codes"], int) and entry["step"] == 991


def test_progress_eta_rates_only_the_steps_done_since_its_start(monkeypatch):
    """A run resumed at step 8 of 12 that takes 1 s for step 9 has 3 steps (3 s) left: the rate divides the time
    since the resume by the steps since the resume, not by all 9."""
    now = {"t": 100.0}
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now["t"])
    lines: list[str] = []
    progress = Progress("training", "step", 12, log=lines.append, every_seconds=0.0, start=8)
    now["t"] += 1.0
    progress.update(9)
    assert lines == ["[training] step 9/12 (75%), 1 s, ETA 3 s"]
    progress.update(8)  # nothing done since the start yet: no rate, no ETA
    assert lines[-1] == "[training] step 8/12 (67%), 1 s"


def test_every_linear_layer_is_called_as_a_module(tiny_var, tiny_vqvae):
    """LoRA and per-sample-gradient hooks only see modules that are called (REFERENCE.md defect 1)."""
    called = set()
    linears = {name: m for name, m in tiny_var.named_modules() if isinstance(m, nn.Linear)}
    handles = [
        m.register_forward_hook(lambda mod, i, o, n=name: called.add(n)) for name, m in linears.items()
    ]
    tiny_var(torch.tensor([0, 1]), torch.randn(2, tiny_var.seq_len - 1, 8))
    assert called == set(linears)
    called.clear()
    tiny_var.sample(torch.tensor([0]), vqvae=tiny_vqvae, cfg=1.0, top_k=0, top_p=0.0)
    assert called == set(linears)
    for h in handles:
        h.remove()


def test_kv_cache_matches_masked_forward(tiny_var):
    """Scale-by-scale with the KV cache gives the same hidden states as the block-causal masked forward."""
    labels, x = torch.tensor([0, 3]), torch.randn(2, tiny_var.seq_len - 1, 8)
    with torch.no_grad():
        tokens_BLC, cond_BC = tiny_var.embed_tokens(labels, x)
        full_BLC = tokens_BLC
        for block in tiny_var.blocks:
            full_BLC = block(full_BLC, cond_BD=cond_BC, attn_mask=tiny_var.attn_bias_for_masking)
        caches, start, pieces = [KVCache() for _ in tiny_var.blocks], 0, []
        for pn in tiny_var.patch_nums:
            h_BlC = tokens_BLC[:, start : start + pn * pn]
            for block, cache in zip(tiny_var.blocks, caches):
                h_BlC = block(h_BlC, cond_BD=cond_BC, attn_mask=None, kv_cache=cache)
            pieces.append(h_BlC)
            start += pn * pn
    assert torch.allclose(torch.cat(pieces, dim=1), full_BLC, atol=1e-5)


def test_sampling_is_reproducible_and_never_repeats(tiny_var, tiny_vqvae):
    labels = torch.tensor([1, 1, 1, 1])
    kw = dict(vqvae=tiny_vqvae, cfg=1.5, top_k=0, top_p=0.0)
    first = tiny_var.sample(labels, generator=torch.Generator().manual_seed(5), **kw)
    again = tiny_var.sample(labels, generator=torch.Generator().manual_seed(5), **kw)
    assert first.shape == (4, 3, 16, 16) and 0.0 <= first.min() and first.max() <= 1.0
    assert torch.equal(first, again)
    generator = torch.Generator().manual_seed(5)
    batch_a, batch_b = (
        tiny_var.sample(labels, generator=generator, **kw),
        tiny_var.sample(labels, generator=generator, **kw),
    )
    assert torch.equal(batch_a, first) and not torch.equal(batch_a, batch_b)
    assert len({tuple(img.flatten().tolist()) for img in batch_a}) == 4  # same class, distinct images


def test_sampling_restores_mode_and_validates(tiny_var, tiny_vqvae):
    tiny_var.train()
    tiny_var.sample(torch.tensor([0]), vqvae=tiny_vqvae, cfg=1.0, top_k=5, top_p=0.5)
    assert tiny_var.training
    with pytest.raises(ValueError, match="labels must be in"):
        tiny_var.sample(torch.tensor([6]), vqvae=tiny_vqvae, cfg=1.0, top_k=0, top_p=0.0)
    with pytest.raises(ValueError, match="top_p"):
        tiny_var.sample(torch.tensor([0]), vqvae=tiny_vqvae, cfg=1.0, top_k=0, top_p=1.0)
    other = build_vqvae(**(TINY_VQVAE | {"vocab_size": 32}))
    with pytest.raises(ValueError, match="does not match"):
        tiny_var.sample(torch.tensor([0]), vqvae=other, cfg=1.0, top_k=0, top_p=0.0)
    # A model on another device (a GPU; here the weightless meta device) than the host generator: named, where
    # torch's multinomial refused it at the first scale's draw.
    elsewhere = build_var(**TINY_VAR, device="meta")
    with pytest.raises(
        ValueError, match=r"generator is on cpu, the model on meta: .*torch.Generator\('meta'\)"
    ):
        elsewhere.sample(
            torch.tensor([0]), vqvae=tiny_vqvae, cfg=1.0, top_k=0, top_p=0.0, generator=torch.Generator()
        )


def test_forward_and_encoder_validate_shapes(tiny_var, tiny_vqvae):
    with pytest.raises(ValueError, match="x_BLCv_wo_first_l"):
        tiny_var(torch.tensor([0]), torch.randn(1, tiny_var.seq_len, 8))
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 16, 16\]"):
        tiny_vqvae.img_to_idxBl(torch.rand(1, 3, 32, 32))


def test_drop_path_only_in_training():
    var = build_var(**(TINY_VAR | {"depth": 3, "drop_path_rate": 0.5}))
    x, labels = torch.randn(4, var.seq_len - 1, 8), torch.tensor([0, 1, 2, 3])
    var.eval()
    assert torch.equal(var(labels, x), var(labels, x))
    var.train()
    torch.manual_seed(0)
    outs = [var(labels, x) for _ in range(3)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_from_scratch_init_is_reproducible():
    a = build_var(**TINY_VAR, generator=torch.Generator().manual_seed(3))
    b = build_var(**TINY_VAR, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    gamma = a.blocks[0].ada_lin[1].weight[: 2 * a.width].abs().max()
    assert gamma < 1e-2 * a.blocks[0].ada_lin[1].weight[2 * a.width :].abs().max() * 10


def test_train_vqvae_applies_the_schedules_weight_decay(shapes16):
    def trained(weight_decay: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        vqvae = build_vqvae(**TINY_VQVAE)
        schedule = Schedule(steps=2, batch_size=8, lr=1e-2, weight_decay=weight_decay, log_every=2)
        train_vqvae(vqvae, shapes16.images_N3HW, schedule=schedule)
        return vqvae.state_dict()

    plain, again, decayed = trained(0.0), trained(0.0), trained(0.5)
    assert all(
        torch.equal(plain[k], again[k]) for k in plain
    )  # deterministic: what differs below is the decay
    assert not all(torch.equal(plain[k], decayed[k]) for k in plain)


def test_tiny_base_builds_once_and_shares_its_vqvae_across_depths(tmp_path):
    from trainables.tiny_base import tiny_base

    lines: list[str] = []
    after = []
    for seed, folder in ((12345, tmp_path / "other"), (999, tmp_path)):  # each builds its VQVAE
        torch.manual_seed(seed)
        first = tiny_base(folder, depth=1, pretraining_steps=4, log=lines.append)
        after.append(torch.rand(3))
    assert not torch.equal(*after)  # the build does not reset the caller's global stream to a fixed state
    assert first["vqvae"].is_file() and first["var"].is_file() and first["settings"]["source"] == "glyphs-v1"
    assert sum("VQVAE step" in line for line in lines) >= 1 and any("building once" in line for line in lines)
    lines.clear()
    second = tiny_base(tmp_path, depth=2, pretraining_steps=4, log=lines.append)
    assert second["vqvae"] == first["vqvae"] and second["var"] != first["var"]  # one VQVAE for every depth
    assert not any("VQVAE step" in line for line in lines) and any("VAR step" in line for line in lines)
    lines.clear()
    again = tiny_base(tmp_path, depth=1, pretraining_steps=4, log=lines.append)
    assert again["var"] == first["var"] and lines == []  # built once: later calls only load
