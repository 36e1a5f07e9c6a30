"""Adaptation methods and per-sample-gradient patches: what trains, counts, adapter round trips, numeric equivalence."""

from __future__ import annotations

import copy
import dataclasses
import json

import peft
import pytest
import torch
from conftest import TINY_VAR, lora_twins
from torch import nn

from analysis.load import trial_row
from bench.schema import LORA_TARGETS, ConfigError, MethodConfig, make_result
from bench.sweeps import build_sweep
from trainables.methods import (
    LORA_TARGET_GROUPS,
    LoraLinear,
    adapt,
    adapter_record,
    load_adapter,
    merge_adapters,
    official_export_state,
    parameter_counts,
    save_adapter,
    trainable_parameters,
)
from trainables.models import CheckpointError, build_var, load_var
from trainables.models.checkpoints import checkpoint_sha256, file_sha256, resize_class_embedding, save_var
from trainables.models.vqvae import OFFICIAL_PATCH_NUMS
from trainables.patches import (
    OPACUS_PATCHES,
    apply_patches,
    official_key,
    official_state_dict,
    patches_applied,
)
from trainables.training import build_optimizer, parameter_groups

NEW_CLASSES = 3
SPECS = {  # the trial config's method sections
    "full": MethodConfig(name="full"),
    "lora": MethodConfig(name="lora", lora_rank=4),
    "lora_attention": MethodConfig(name="lora_attention", lora_rank=4),
    "lora_mlp": MethodConfig(name="lora_mlp", lora_rank=4),
    "ln_tuning": MethodConfig(name="ln_tuning"),
    "full_block1": MethodConfig(name="full", train_blocks=(1,)),
    "lora_block0": MethodConfig(name="lora", lora_rank=4, train_blocks=(0,)),
    "ln_tuning_block1": MethodConfig(name="ln_tuning", train_blocks=(1,)),
}
# Which base-module paths a spec may change (besides the new class embedding), as substrings of parameter names.
EXPECTED_CHANGED = {
    "full": None,  # everything
    "lora": ("attn.mat_qkv.lora_", "attn.proj.lora_", "ffn.fc1.lora_", "ffn.fc2.lora_", "ada_lin.1.lora_"),
    "lora_attention": ("attn.mat_qkv.lora_", "attn.proj.lora_"),
    "lora_mlp": ("ffn.fc1.lora_", "ffn.fc2.lora_"),
    "ln_tuning": ("ada_lin.1.ln_tuning_layers.",),
    "full_block1": ("blocks.1.",),
    "lora_block0": tuple(
        f"blocks.0.{p}"
        for p in (
            "attn.mat_qkv.lora_",
            "attn.proj.lora_",
            "ffn.fc1.lora_",
            "ffn.fc2.lora_",
            "ada_lin.1.lora_",
        )
    ),
    "ln_tuning_block1": ("blocks.1.ada_lin.1.ln_tuning_layers.",),
}


def tiny_base(seed: int = 0) -> torch.nn.Module:
    return build_var(**TINY_VAR, drop_path_rate=0.0, generator=torch.Generator().manual_seed(seed))


def adapted(var, method: MethodConfig, *, num_classes: int = NEW_CLASSES):
    """``var`` prepared by ``adapt`` (in place) with seed 0, for tests that need only the model."""
    adapt(var, method, num_classes=num_classes, seed=0)
    return var


def random_batch(B: int = 4, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L, first_l = sum(pn * pn for pn in TINY_VAR["patch_nums"]), TINY_VAR["patch_nums"][0] ** 2
    label_B = torch.randint(0, NEW_CLASSES, (B,), generator=g)
    x_BLCv = torch.randn(B, L - first_l, TINY_VAR["z_channels"], generator=g)
    target_BL = torch.randint(0, TINY_VAR["vocab_size"], (B, L), generator=g)
    return label_B, x_BLCv, target_BL


def train_steps(var, steps: int) -> list[dict[str, torch.Tensor]]:
    """AdamW steps on a fixed batch; returns the gradients of the first step."""
    optimizer = build_optimizer(var, lr=1e-2)
    label_B, x_BLCv, target_BL = random_batch()
    first_grads = {}
    var.train()
    for step in range(steps):
        logits_BLV = var(label_B, x_BLCv)
        loss = torch.nn.functional.cross_entropy(logits_BLV.flatten(0, 1), target_BL.flatten())
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            first_grads = {n: p.grad.clone() for n, p in var.named_parameters() if p.grad is not None}
        optimizer.step()
    return first_grads


@pytest.mark.parametrize("name", sorted(SPECS))
def test_only_intended_parameters_change(name):
    var = adapted(tiny_base(), SPECS[name])
    before = {n: p.detach().clone() for n, p in var.named_parameters()}
    first_grads = train_steps(var, 3)
    changed = {n for n, p in var.named_parameters() if not torch.equal(p, before[n])}
    trainable = set(trainable_parameters(var))
    assert changed == trainable, (
        f"changed but frozen: {sorted(changed - trainable)}; trainable but unchanged: {sorted(trainable - changed)}"
    )
    allowed = EXPECTED_CHANGED[name]
    for param_name in trainable - {"class_emb.weight"}:
        assert allowed is None or any(fragment in param_name for fragment in allowed), param_name
    assert "class_emb.weight" in trainable and var.class_emb.weight.shape[0] == NEW_CLASSES + 1
    # Every LoRA target gets gradient at the very first step (lora_B starts at zero, so its gradient must not be).
    lora_b = [n for n in trainable if ".lora_B." in n]
    assert all(first_grads[n].abs().sum() > 0 for n in lora_b)
    if allowed is not None and name.startswith("lora"):
        targets = {n.split(".lora_B.")[0] for n in lora_b}
        assert len(targets) == len(lora_b) and targets  # one adapter pair per targeted module


def test_patched_positions_and_biases_stay_out_of_weight_decay():
    var = adapted(tiny_base(), SPECS["full"])
    decayed = {id(p) for p in parameter_groups(var, weight_decay=0.05)[0]["params"]}
    for name, param in var.named_parameters():
        if any(fragment in name for fragment in ("pos_start", "pos_1LC", "q_bias", "v_bias", "scale_mul")):
            assert id(param) not in decayed, name


def test_selective_blocks_beyond_depth_fail():
    with pytest.raises(
        ConfigError, match=r"method.train_blocks: \(7,\) names a block beyond the model's depth"
    ):
        adapt(tiny_base(), MethodConfig(name="lora", train_blocks=(7,)), num_classes=3, seed=0)


def test_adapt_refuses_what_it_cannot_adapt():
    with pytest.raises(ConfigError, match="method.name: 'base' trains nothing"):
        adapt(tiny_base(), MethodConfig(name="base"), num_classes=3, seed=0)
    with pytest.raises(ConfigError, match="num_classes"):
        adapt(tiny_base(), SPECS["lora"], num_classes=0, seed=0)


def test_lora_target_groups_are_the_schemas_closed_set():
    assert tuple(LORA_TARGET_GROUPS) == LORA_TARGETS


@pytest.mark.parametrize(
    "bad",
    [
        dict(name="prefix"),
        dict(name="full", lora_targets=("attention",)),
        dict(name="lora", lora_targets=("conv",)),
        dict(name="lora", lora_rank=0),
        dict(name="full", train_blocks=()),
    ],
)
def test_method_settings_are_checked_by_the_config_section(bad):
    with pytest.raises(ConfigError, match="method."):
        MethodConfig(**bad)


def official_adapted(depth: int, method: str, *, num_classes: int):
    """An official-size VAR of ``depth`` for ``num_classes`` classes, adapted by ``method``, on the meta device
    (shapes and counts only, no memory)."""
    var = build_var(
        depth=depth,
        num_classes=num_classes,
        patch_nums=OFFICIAL_PATCH_NUMS,
        vocab_size=4096,
        z_channels=32,
        device="meta",
    )
    return adapted(var, MethodConfig(name=method), num_classes=num_classes)


@pytest.mark.parametrize("depth, lora_without_class_embedding", [(16, 6_029_312), (20, 9_420_800)])
def test_lora_parameter_counts_match_the_paper(depth, lora_without_class_embedding):
    """Paper: LoRA d16 6.02-6.03M, d20 9.42M trainable at 1000-class shapes, class embedding excluded."""
    counts = parameter_counts(official_adapted(depth, "lora", num_classes=1000))
    width = 64 * depth
    assert counts["trainable_without_class_embedding"] == lora_without_class_embedding
    assert counts["trainable"] == lora_without_class_embedding + 1001 * width
    assert counts["base_total"] == {16: 310_283_520, 20: 600_917_136}[depth]
    assert counts["adapter_parameters"] == lora_without_class_embedding


@pytest.mark.parametrize(
    "method, depth, published_pct",
    [
        ("lora", 16, 1.91),
        ("ln_tuning", 16, 24.56),
        ("lora", 20, 1.54),
        ("ln_tuning", 20, 24.69),
        ("full", 16, 100),
    ],
)
def test_the_tables_trainable_share_is_the_papers_up_to_the_class_embedding(method, depth, published_pct):
    """Table 1's share is of the adapted model (base plus adapter modules, peft's count): LN tuning's 100.8M
    trainable copies are 24.6% of it, not the 32.6% of the base alone. It exceeds the published share only by the
    new class embedding (CUB's 201 rows: the published shares are those of a 200-class dataset), which varsweep
    trains and the published code left untrained."""
    counts = parameter_counts(official_adapted(depth, method, num_classes=200))
    config = next(
        c
        for c in build_sweep("table1")
        if (c.method.name, c.model.depth, c.data.dataset) == (method, depth, "cub200")
    )
    row = trial_row(make_result(config, status="success", parameters=counts))
    class_rows_pct = 100 * 201 * 64 * depth / (counts["base_total"] + counts["adapter_parameters"])
    extra = 0 if method == "full" else class_rows_pct
    # the published shares are truncated to two decimals
    assert published_pct <= row["trainable_pct"] - extra < published_pct + 0.01
    # a record written before adapter_parameters was recorded reads the same share
    older = {name: n for name, n in counts.items() if name != "adapter_parameters"}
    assert (
        trial_row(make_result(config, status="success", parameters=older))["trainable_pct"]
        == row["trainable_pct"]
    )


@pytest.mark.parametrize("name", ["full", "lora", "ln_tuning", "lora_block0"])
def test_adapter_round_trip_restores_the_fine_tuned_model(name, tmp_path):
    base_path = save_var(tiny_base(), tmp_path / "base.pth")
    var = load_var(base_path, **_load_args())
    adaptation = adapt(var, SPECS[name], num_classes=NEW_CLASSES, seed=0)
    train_steps(var, 3)
    save_adapter(var, tmp_path / "adapter.pt", adaptation=adaptation, metadata={"note": "from the caller"})
    restored = load_var(base_path, **_load_args())
    assert load_adapter(restored, tmp_path / "adapter.pt", base_sha256=None) == adaptation
    label_B, x_BLCv, _ = random_batch(seed=1)
    var.eval(), restored.eval()
    assert torch.equal(var(label_B, x_BLCv), restored(label_B, x_BLCv))
    # Merged adapters give the same function in the official layout, loadable as a plain VAR checkpoint.
    expected_BLV = var(label_B, x_BLCv)
    state = official_export_state(var)
    assert list(state) == list(tiny_base().state_dict())
    merged_path = save_var(var, tmp_path / "merged.pth", state=state)
    merged = load_var(merged_path, **{**_load_args(), "num_classes": NEW_CLASSES}).eval()
    torch.testing.assert_close(merged(label_B, x_BLCv), expected_BLV, rtol=1e-5, atol=1e-5)


def _load_args() -> dict:
    return {**TINY_VAR, "drop_path_rate": 0.0}


def test_adapter_sidecar_holds_the_method_section_and_older_flat_records_still_load(tmp_path):
    base_path = save_var(tiny_base(), tmp_path / "base.pth")
    var = load_var(base_path, **_load_args())
    adaptation = adapt(
        var, SPECS["lora_block0"], num_classes=NEW_CLASSES, seed=0, base_sha256=checkpoint_sha256(base_path)
    )
    save_adapter(var, tmp_path / "adapter.pt", adaptation=adaptation)
    sidecar_file = tmp_path / "adapter.pt.json"
    sidecar = json.loads(sidecar_file.read_text())
    assert sidecar["metadata"]["adaptation"] == json.loads(
        json.dumps(
            {
                "method": dataclasses.asdict(SPECS["lora_block0"]),
                "num_classes": NEW_CLASSES,
                "seed": 0,
                "patches": list(OPACUS_PATCHES),
            }
        )
    )
    assert sidecar["metadata"]["base_sha256"] == checkpoint_sha256(base_path) == file_sha256(base_path)
    # Adapters saved before the method became the config's section kept a flat record ({"method": name, ...}).
    sidecar["metadata"]["adaptation"] = {
        "method": "lora",
        "num_classes": NEW_CLASSES,
        "lora_rank": 4,
        "lora_alpha": 32.0,
        "lora_targets": None,
        "train_blocks": [0],
        "class_init": "unconditional",
        "seed": 0,
    }
    sidecar_file.write_text(json.dumps(sidecar))
    restored = load_var(base_path, **_load_args())
    assert load_adapter(restored, tmp_path / "adapter.pt", base_sha256=None) == dataclasses.replace(
        adaptation, base_sha256=None
    )
    assert all(
        torch.equal(p, trainable_parameters(restored)[name]) for name, p in trainable_parameters(var).items()
    )
    # The patches rename parameter keys: a record naming other patches than adapt() applies does not fit.
    sidecar["metadata"]["adaptation"] = {**adaptation.to_dict(), "patches": ["positions_as_modules"]}
    sidecar_file.write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match=r"saved from a VAR with patches \['positions_as_modules'\]"):
        load_adapter(load_var(base_path, **_load_args()), tmp_path / "adapter.pt", base_sha256=None)


def test_adapter_refuses_a_base_from_another_checkpoint(tmp_path):
    first, second = (
        save_var(tiny_base(seed=0), tmp_path / "a.pth"),
        save_var(tiny_base(seed=1), tmp_path / "b.pth"),
    )
    var = load_var(first, **_load_args())
    adaptation = adapt(
        var, SPECS["lora"], num_classes=NEW_CLASSES, seed=0, base_sha256=checkpoint_sha256(first)
    )
    save_adapter(var, tmp_path / "adapter.pt", adaptation=adaptation)
    with pytest.raises(CheckpointError, match="was trained on the base checkpoint with SHA-256"):
        load_adapter(
            load_var(second, **_load_args()), tmp_path / "adapter.pt", base_sha256=checkpoint_sha256(second)
        )
    restored = load_var(first, **_load_args())
    assert load_adapter(restored, tmp_path / "adapter.pt", base_sha256=checkpoint_sha256(first)) == adaptation


def test_adapter_refuses_another_base(tmp_path):
    var = tiny_base()
    save_adapter(
        var, tmp_path / "adapter.pt", adaptation=adapt(var, SPECS["lora"], num_classes=NEW_CLASSES, seed=0)
    )
    other = build_var(**{**TINY_VAR, "embed_dim": 32}, generator=torch.Generator().manual_seed(0))
    with pytest.raises(CheckpointError, match="another var-adapter architecture"):
        load_adapter(other, tmp_path / "adapter.pt", base_sha256=None)


@pytest.mark.parametrize("class_init", ["unconditional", "mean", "normal"])
def test_adapt_draws_new_class_rows_also_for_the_base_s_own_label_count(class_init):
    """The tiny base has 5 classes: 5 new classes are not the base's, so their rows are ``class_init``'s (drawn
    with the seed, a trial id's field), as for any other count, never the base's own class rows."""
    classes = TINY_VAR["num_classes"]
    method = MethodConfig(name="lora", lora_rank=2, class_init=class_init)
    rows = {}
    for seed in (0, 1):
        var = tiny_base()
        adapt(var, method, num_classes=classes, seed=seed)
        rows[seed] = var.class_emb.weight.detach()
        expected = resize_class_embedding(
            tiny_base(), classes, init=class_init, generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(rows[seed], expected.class_emb.weight)
    assert not torch.equal(rows[0][:classes], tiny_base().class_emb.weight[:classes])
    assert torch.equal(
        rows[0][classes], tiny_base().class_emb.weight[classes]
    )  # the unconditional row is kept
    assert torch.equal(rows[0], rows[1]) == (class_init != "normal")  # only "normal" draws with the seed


@pytest.mark.parametrize("name", ["lora", "ln_tuning", "full"])
def test_load_adapter_refuses_a_base_that_already_carries_an_adapter_or_patches(name, tmp_path):
    """A LoRA adapter loaded again onto its own (merged) model was applied twice, silently: only a freshly
    loaded base is accepted."""
    base_path = save_var(tiny_base(), tmp_path / "base.pth")
    var = load_var(base_path, **_load_args())
    adaptation = adapt(var, SPECS[name], num_classes=NEW_CLASSES, seed=0)
    train_steps(var, 1)
    save_adapter(var, tmp_path / "adapter.pt", adaptation=adaptation)
    loaded = load_var(base_path, **_load_args())
    load_adapter(loaded, tmp_path / "adapter.pt", base_sha256=None)
    carries = "peft adapter layers" if name != "full" else "the patches"
    for model, what in ((loaded, carries), (merge_adapters(copy.deepcopy(loaded)), "the patches")):
        with pytest.raises(CheckpointError, match=f"already carries {what}.*pass a freshly loaded base"):
            load_adapter(model, tmp_path / "adapter.pt", base_sha256=None)


def test_adapters_record_the_training_class_names_and_older_ones_load_without(tmp_path):
    var = tiny_base()
    adaptation = adapt(var, SPECS["lora"], num_classes=NEW_CLASSES, seed=0)
    with pytest.raises(ValueError, match="class_names: expected the 3 class names of the training split"):
        save_adapter(var, tmp_path / "adapter.pt", adaptation=adaptation, class_names=["a", "b"])
    save_adapter(var, tmp_path / "adapter.pt", adaptation=adaptation, class_names=("c", "a", "b"))
    sidecar_file = tmp_path / "adapter.pt.json"
    sidecar = json.loads(sidecar_file.read_text())
    assert sidecar["metadata"]["class_names"] == ["c", "a", "b"]
    meta_base = build_var(**_load_args(), device="meta")
    assert adapter_record(meta_base, tmp_path / "adapter.pt", base_sha256=None) == (
        adaptation,
        ("c", "a", "b"),
    )
    sidecar["metadata"]["class_names"] = ["c", "a"]  # edited by hand
    sidecar_file.write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="its class_names are not 3 names"):
        adapter_record(meta_base, tmp_path / "adapter.pt", base_sha256=None)
    del sidecar["metadata"]["class_names"]  # an adapter saved before the names were recorded
    sidecar_file.write_text(json.dumps(sidecar))
    assert adapter_record(meta_base, tmp_path / "adapter.pt", base_sha256=None) == (adaptation, None)
    assert load_adapter(tiny_base(), tmp_path / "adapter.pt", base_sha256=None) == adaptation


def test_merge_is_numerically_equivalent():
    for name in ("lora", "ln_tuning"):
        var = adapted(tiny_base(), SPECS[name])
        train_steps(var, 2)
        label_B, x_BLCv, _ = random_batch(seed=2)
        var.eval()
        before_BLV = var(label_B, x_BLCv)
        torch.testing.assert_close(merge_adapters(var)(label_B, x_BLCv), before_BLV, rtol=1e-5, atol=1e-5)
        assert not any(".lora_" in n or "ln_tuning" in n for n, _ in var.named_parameters())


def _lora_step(layer: nn.Module, x: torch.Tensor, *, autocast: bool) -> list[torch.Tensor]:
    """The layer's output, and the gradients of its input and adapter weights, under a fixed upstream gradient.
    The layer gets a view of the input, as a block's activation is no leaf: autocast caches its cast of a float32
    leaf that requires grad, so two casts of a leaf are one and their gradients are summed in bf16."""
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x.view_as(x))
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype))
    return [y, x.grad, *(p.grad for p in layer.parameters() if p.requires_grad)]


@pytest.mark.parametrize(
    "autocast, dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16)]
)
@pytest.mark.parametrize("hooked", [None, "lora_A", "lora_B"])
@pytest.mark.parametrize("features", [(24, 40), (40, 24), (24, 24)])
def test_lora_layer_is_peft_s_bit_for_bit_at_a_power_of_two_scaling(autocast, dtype, hooked, features):
    """rank 4, alpha 32: scaling 8, where moving it to the rank side changes no rounding. A bf16 input under
    autocast (fc2's and proj's) is the case where peft made a float32 copy: the same values without it. The base
    output is added inside the adapter's product, in lora_B's call where a hook (DP's per-sample gradients) must
    see it (``AccumulatingLinear``): the adapter's gradients bit for bit, the output within float32's rounding or
    one bf16 step of its largest entry (rounded once, not twice; see the next tests); so is the input's gradient,
    its two products summed in one (``_LoraProducts`` where nothing is hooked, for layers with more outputs than
    inputs, the forward's sum one product, more inputs, the backward's, and as many; ``_BaseAndTap`` where lora_B
    is hooked, or outside autocast), and bit for bit peft's where autograd sums them: a float32 input under
    autocast (cast once for both products), or a hook on lora_A that could see its input's gradient."""
    stock, ours = lora_twins(32.0, features=features)
    if hooked:
        ours.get_submodule(f"{hooked}.default").register_forward_hook(lambda *_: None)
    x = torch.randn(3, 7, features[0], generator=torch.Generator().manual_seed(2)).to(dtype)
    theirs, mine = _lora_step(stock, x, autocast=autocast), _lora_step(ours, x, autocast=autocast)
    assert len(mine) == 4  # output, input, lora_A and lora_B gradients
    assert all(a.dtype == b.dtype for a, b in zip(theirs, mine, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(theirs[2:], mine[2:]))
    one_step = [torch.finfo(torch.bfloat16).eps * t.float().abs().max() for t in theirs[:2]]
    for i, (a, b) in enumerate(zip(theirs[:2], mine[:2])):
        if i == 1 and (hooked == "lora_A" or (autocast and dtype == torch.float32)):
            assert torch.equal(a, b)
        elif autocast:  # peft rounds each product alone: up to one bf16 step of the addends' size
            assert (a.float() - b.float()).abs().max() <= one_step[i]
        else:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("features, hooked", [((24, 40), False), ((40, 24), False), ((24, 40), True)])
def test_lora_layer_s_input_gradient_sums_its_two_products_rounding_once(features, hooked):
    """Under bf16 autocast, unhooked, a bf16 input: its gradient adds the adapter's product g_a A into the base's
    g W inside one product (float32 accumulation, one rounding fewer than autograd's sum of two rounded
    products), so it is closer to the exact sum of the same bf16 operands than peft's; within one bf16 step of
    it. Accumulated in place where the layer has more outputs than inputs, one product over both inner dimensions
    ([g | g_a] [W ; A]) where it has more inputs; with lora_B hooked (DP), the base's product accumulated into
    lora_A's input gradient (``_BaseAndTap``). ``_LoraProducts`` passes gradcheck in float64, without and with
    the kept weight's spare columns or rows (``joined``), and so does ``_BaseAndTap``."""
    from trainables.methods import _BaseAndTap, _LoraProducts

    stock, ours = lora_twins(32.0, features=features)
    if hooked:
        ours.lora_B["default"].register_forward_hook(lambda *_: None)
    x = torch.randn(64, features[0], generator=torch.Generator().manual_seed(3)).bfloat16()
    grad_y = torch.randn(64, features[1], generator=torch.Generator().manual_seed(4)).bfloat16()
    grads = []
    for layer in (stock, ours):
        x_in = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x_in.view_as(x_in)).backward(grad_y)
        grads.append(x_in.grad.double())
    weight, lora_A, lora_B = (
        t.bfloat16().double()
        for t in (ours.base_layer.weight, ours.lora_A["default"].weight, ours.lora_B["default"].weight)
    )
    g_a = ((grad_y.double() @ lora_B).bfloat16() * ours.scaling["default"]).double()  # as both layers form it
    exact = grad_y.double() @ weight + g_a @ lora_A
    theirs, mine = ((g - exact).abs() for g in grads)
    assert mine.mean() < theirs.mean()
    assert (mine <= torch.finfo(torch.bfloat16).eps * exact.abs().max()).all()
    g = torch.Generator().manual_seed(5)
    x, w, a, b = (
        torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
        for shape in ((3, 5, 6), (7, 6), (2, 6), (7, 2))
    )
    w.requires_grad_(False)  # the base is frozen: the Function forms no gradient for it
    assert torch.autograd.gradcheck(lambda x, a, b: _LoraProducts.apply(x, w, None, a, b, 3.0), (x, a, b))
    wide, tall = torch.zeros(7, 6 + 2, dtype=w.dtype), torch.zeros(7 + 2, 6, dtype=w.dtype)
    wide[:, :6], tall[:7] = w, w
    assert torch.autograd.gradcheck(
        lambda x: torch.cat([t.flatten() for t in _BaseAndTap.apply(x, w, b[:, 0])]), (x,)
    )
    for joined, weight in ((wide, wide[:, :6]), (tall, tall[:7])):
        assert torch.autograd.gradcheck(
            lambda x, a, b, weight=weight, joined=joined: _LoraProducts.apply(
                x, weight, None, a, b, 3.0, joined
            ),
            (x, a, b),
        )


@pytest.mark.parametrize("features", [(24, 40), (40, 24)])
def test_lora_layer_s_spare_columns_rewritten_by_a_later_call_leave_a_pending_backward_right(features):
    """The kept weight's spare columns (rows) take an adapter weight at every call (backward): two calls with
    different adapter weights, then one backward through both, give each call's own input gradient, that of a
    separate step, bit for bit."""
    _, ours = lora_twins(32.0, features=features)
    adapter = [ours.get_submodule(f"{n}.default").weight for n in ("lora_A", "lora_B")]
    inputs, outputs = features
    xs = [torch.randn(3, 7, inputs, generator=torch.Generator().manual_seed(s)).bfloat16() for s in (1, 2)]
    upstream = [
        torch.randn(3, 7, outputs, generator=torch.Generator().manual_seed(s)).bfloat16() for s in (3, 4)
    ]
    weights = [[w.detach().clone() for w in adapter], [w.detach() * -0.5 for w in adapter]]

    def call(x, values):
        with torch.no_grad():
            for w, value in zip(adapter, values):
                w.copy_(value)
        x_in = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ours(x_in.view_as(x_in))
        assert type(y.grad_fn).__name__ == "_LoraProductsBackward"
        return x_in, y

    separate = []
    for x, values, g in zip(xs, weights, upstream):
        x_in, y = call(x, values)
        y.backward(g)
        separate.append(x_in.grad)
    called = [call(x, values) for x, values in zip(xs, weights)]  # the second rewrites the spare columns
    for (_, y), g in zip(called[::-1], upstream[::-1]):  # the second's backward rewrites the spare rows
        y.backward(g)
    assert all(torch.equal(x_in.grad, grad) for (x_in, _), grad in zip(called, separate))


def test_lora_layer_s_output_can_be_changed_in_place_and_compiling_takes_the_plain_path(monkeypatch):
    """The fused layer's output is no view of a Function's output (a caller may scale it in place, as the
    published VAR's blocks do); while compiling, the plain operations run (dynamo traces them), and the checks
    that would break a graph are not reached."""
    _, ours = lora_twins(32.0)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2)).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x.view_as(x))
        assert type(y.grad_fn).__name__ == "_LoraProductsBackward"
        y.mul_(2)
    y.sum().backward()
    assert x.grad is not None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours._fused_products(x, "default", autocast=True) is None
        assert ours._frozen_base_cast(torch.bfloat16) is None


def test_lora_layer_adds_the_base_output_inside_the_adapter_s_product_rounding_once():
    """Under bf16 autocast, unhooked: the output is the bf16 rounding of base + (A x s) B^T (float32 accumulation),
    closer to the exact sum of the same bf16 operands than peft's, which rounds the adapter's product first. (With
    autograd on, as in training: without it the adapter is merged, ``test_without_autograd_the_adapter_is_merged``.)"""
    stock, ours = lora_twins(32.0)
    x = torch.randn(64, 24, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs, mine = stock(x).detach(), ours(x).detach()
        base = ours.base_layer(x)
        a = ours.lora_A["default"](x) * ours.scaling["default"]
    exact = base.double() + a.double() @ ours.lora_B["default"].weight.bfloat16().double().T
    step = torch.finfo(torch.bfloat16).eps * exact.abs()
    assert ((mine.double() - exact).abs() <= step / 2 * (1 + 1e-3)).all()  # the sum rounded once
    assert (mine.double() - exact).abs().mean() < (theirs.double() - exact).abs().mean()


def test_lora_layer_adds_a_frozen_bias_inside_its_product_with_the_same_gradients():
    """``linear_plus_bias`` (mat_qkv's q/v biases, under autocast, unhooked): the layer's output plus the bias, the
    bias added in the base product before its rounding, closer to the exact sum than adding it after the layer,
    within one bf16 step of its largest entry; the gradients of the input and adapter weights bit for bit those of
    the bias added after (the bias adds nothing to them). None where that path does not run: no autocast, a bias
    that trains, or ``lora_B`` hooked (DP): the caller then adds it itself."""
    _, ours = lora_twins(32.0)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(6)).bfloat16()
    bias = torch.randn(40, generator=torch.Generator().manual_seed(7))
    upstream = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(8)).bfloat16()
    results = []
    for folded in (False, True):
        x_in = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ours.linear_plus_bias(x_in, lambda: bias) if folded else ours(x_in) + bias.bfloat16()
        y.backward(upstream)
        results.append([y, x_in.grad] + [p.grad.clone() for p in ours.parameters() if p.requires_grad])
        ours.zero_grad(set_to_none=True)
    (after, *after_grads), (inside, *inside_grads) = results
    assert inside.dtype == torch.bfloat16 and all(
        torch.equal(a, b) for a, b in zip(after_grads, inside_grads)
    )
    with torch.no_grad():
        layer = ours.base_layer
        a = x.double() @ ours.lora_A["default"].weight.bfloat16().double().T * ours.scaling["default"]
        exact = x.double() @ layer.weight.bfloat16().double().T + layer.bias.bfloat16().double()
        exact = (
            exact
            + bias.bfloat16().double()
            + a.bfloat16().double() @ ours.lora_B["default"].weight.bfloat16().double().T
        )
    assert (inside.double() - exact).abs().max() <= torch.finfo(torch.bfloat16).eps * exact.abs().max()
    assert (inside.double() - exact).abs().mean() < (after.double() - exact).abs().mean()
    made = []

    def bias_fn(trains: bool = False):
        made.append(trains)
        return bias.clone().requires_grad_(trains)

    assert ours.linear_plus_bias(x, bias_fn) is None and made == []  # no autocast: the bias not even made
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours.linear_plus_bias(x, lambda: bias_fn(True)) is None and made == [True]
        ours.lora_B["default"].register_forward_hook(lambda *_: None)
        assert ours.linear_plus_bias(x, bias_fn) is None and made == [True]


def test_lora_layer_calls_a_hooked_base_layer_with_the_input_as_given():
    """The unfused path (float32, no autocast: CPU trials) gives the base layer a [N, in] input to accumulate the
    adapter's product into in place, unless something hooks the base layer: a hook then sees the input as the
    layer got it. The same output either way."""
    _, ours = lora_twins(32.0)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(9))
    expected = ours(x)
    seen = []
    ours.base_layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    torch.testing.assert_close(ours(x), expected, rtol=1e-6, atol=1e-6)
    assert seen == [x.shape]


def test_a_hooked_lora_mat_qkv_is_called_not_asked_to_add_the_biases():
    """A LoRA-adapted attention under autocast adds its frozen q/v biases inside mat_qkv's product
    (``linear_plus_bias``), but a hook on mat_qkv itself (the wrapper) must see its call: then it is called and
    the biases added after."""
    var = build_var(**TINY_VAR, generator=torch.Generator().manual_seed(0))
    adapt(var, MethodConfig(name="lora", lora_rank=4), num_classes=TINY_VAR["num_classes"], seed=0)
    attention = var.blocks[0].attn
    x_BLC = torch.randn(2, 5, TINY_VAR["embed_dim"], generator=torch.Generator().manual_seed(1))
    calls = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        folded = attention.qkv_with_bias(x_BLC.bfloat16())
        attention.mat_qkv.register_forward_hook(lambda *_: calls.append(1))
        called = attention.qkv_with_bias(x_BLC.bfloat16())
    assert calls == [1]
    one_step = torch.finfo(torch.bfloat16).eps * called.float().abs().max()
    assert (folded.float() - called.float()).abs().max() <= one_step


def test_a_frozen_base_weight_is_cast_once_and_recast_when_it_changes():
    """Under autocast the frozen base's bf16 cast is kept between calls (autocast would cast it at every call):
    later steps give the first step's outputs and gradients bit for bit, with no cast of the weight; an in-place
    update, a state-dict load, a merge and an unmerge (peft writes those through ``.data``), and a new storage
    each give the new weights' output; a move and a copy drop the cast; inference mode keeps nothing."""
    stock, ours = lora_twins(32.0)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2))
    first = _lora_step(ours, x, autocast=True)
    cast = ours._frozen_cast
    assert (
        cast is not None
        and cast["weight"].dtype == torch.bfloat16
        and torch.equal(cast["weight"], ours.base_layer.weight.bfloat16())
    )
    for _ in range(2):
        for p in ours.parameters():
            p.grad = None
        again = _lora_step(ours, x, autocast=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert ours._frozen_cast is cast  # not recast

    def output(layer):  # with autograd on: the training path (without it the adapter is merged)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x).detach()

    def check():
        torch.testing.assert_close(
            output(ours), output(stock), rtol=0, atol=1e-6 + 2**-7 * output(stock).abs().max()
        )

    with torch.no_grad():
        for layer in (stock, ours):
            layer.base_layer.weight.mul_(-1.5)
    check()
    ours.load_state_dict(lora_twins(32.0)[0].state_dict())
    stock.load_state_dict(ours.state_dict())
    check()
    output(ours)
    for layer in (stock, ours):
        layer.merge()
    assert ours._frozen_cast is None
    check()
    for layer in (stock, ours):
        layer.unmerge()  # while merged, peft's forward ran and nothing was cast
    check()
    for layer in (stock, ours):
        layer.base_layer.weight.data = layer.base_layer.weight.data * 0.5  # a new storage, the same version
    check()
    output(ours)
    ours.to(torch.float32)  # a move drops the cast
    assert ours._frozen_cast is None
    output(ours)
    assert copy.deepcopy(ours)._frozen_cast is None and ours._frozen_cast is not None  # not copied along
    fresh = lora_twins(32.0)[1]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        fresh(x)
    assert fresh._frozen_cast is None


@pytest.mark.parametrize("autocast, tolerance", [(False, 1e-6), (True, 2 * 2**-7)])
def test_lora_layer_is_peft_s_to_rounding_at_any_scaling(autocast, tolerance):
    """alpha 24, rank 4: scaling 6 rounds differently on the rank side; each tensor within ``tolerance`` of its
    largest entry (float32's rounding, or two bf16 steps: each form rounds once where the other does not)."""
    stock, ours = lora_twins(24.0)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2))
    for a, b in zip(_lora_step(stock, x, autocast=autocast), _lora_step(ours, x, autocast=autocast)):
        assert (a.float() - b.float()).abs().max() <= tolerance * a.float().abs().max()


def test_lora_layer_leaves_an_input_of_another_dtype_to_peft_outside_autocast():
    """bf16 base weights, float32 adapter, bf16 input, no autocast: peft casts the input for the adapter."""
    stock, ours = lora_twins(32.0)
    for layer in (stock, ours):
        layer.base_layer.to(torch.bfloat16)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    torch.testing.assert_close(ours(x), stock(x), rtol=0, atol=0)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("features", [(24, 40), (40, 24)])
def test_a_gradient_hook_on_lora_b_s_output_survives_an_in_place_change_of_the_layer_s_output(
    autocast, features
):
    """Book-keeping's way: a forward hook on lora_B registers a gradient hook on its output. Where lora_B's call
    accumulates into the base output (``AccumulatingLinear``), that output is the layer's; a caller that then
    changes it in place (the published VAR's blocks scale theirs) must not lose the hook: it fires once, with
    the gradient of lora_B's output from before the change, as on peft's layer, but for the scaling, which
    varsweep applies on the rank side (bit for bit at a power of two)."""
    seen = {}
    x = torch.randn(3, 7, features[0], generator=torch.Generator().manual_seed(2))
    twins = lora_twins(32.0, features=features)
    for name, layer in zip(("stock", "ours"), twins):
        grads = seen[name] = []

        def hook(module, args, output, grads=grads):
            output.register_hook(lambda g: grads.append(g.float()))

        layer.lora_B["default"].register_forward_hook(hook)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x.clone().requires_grad_())
            y.mul_(3)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(y.dtype))
    assert len(seen["stock"]) == len(seen["ours"]) == 1
    assert torch.equal(seen["ours"][0] * twins[0].scaling["default"], seen["stock"][0])


def test_lora_b_s_bias_is_scaled_with_its_product_as_peft_scales_it():
    """peft's optional lora_B bias (``lora_bias``): y = base(x) + (B A x + b) s. varsweep's own paths scale the
    rank side (s A x) and leave such a layer to peft's forward, so the bias is scaled too: bit for bit."""
    stock, ours = lora_twins(24.0, lora_bias=True)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2))
    for autocast in (False, True):
        theirs, mine = _lora_step(stock, x, autocast=autocast), _lora_step(ours, x, autocast=autocast)
        assert all(torch.equal(a, b) for a, b in zip(theirs, mine, strict=True))
        for layer in (stock, ours):
            layer.zero_grad(set_to_none=True)


def test_lora_layer_sums_its_input_gradient_in_place_only_where_no_hook_can_see_it():
    """``_BaseAndTap`` writes the base's input gradient into lora_A's: only where no hook could see or keep lora_A's
    input gradient. Book-keeping's hooks (they keep the input and take the output's gradient) leave it on; a
    forward hook of another kind (it could hook lora_A's input), a backward hook, or a global module hook turn it
    off, and such a hook then sees the gradient peft's layer gives it."""
    from trainables.bookkeeping import BookKeeping
    from trainables.methods import _input_gradient_unseen

    stock, ours = lora_twins(32.0)
    lora_A = ours.lora_A["default"]
    assert _input_gradient_unseen(lora_A)
    keeper = BookKeeping(ours)
    assert _input_gradient_unseen(lora_A) and lora_A in keeper.layers
    keeper.remove_hooks()
    handles = [
        lora_A.register_full_backward_hook(lambda *_: None),
        torch.nn.modules.module.register_module_full_backward_hook(lambda *_: None),
    ]
    for handle in handles:
        assert not _input_gradient_unseen(lora_A)
        handle.remove()
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2))
    seen = {}
    for name, layer in (("stock", stock), ("ours", ours)):
        kept = seen[name] = []

        def keep_input_gradient(module, args, kept=kept):  # its value when the hook runs, and the tensor kept
            args[0].register_hook(lambda g: kept.extend((g.clone(), g)))

        layer.lora_A["default"].register_forward_pre_hook(keep_input_gradient)
        x_in = x.clone().requires_grad_()
        layer(x_in).backward(torch.ones(3, 7, 40))
        kept.append(x_in.grad)
    assert not _input_gradient_unseen(lora_A)
    assert all(torch.equal(a, b) for a, b in zip(seen["stock"], seen["ours"], strict=True))


@pytest.mark.parametrize("autocast", [False, True])
def test_lora_layer_s_in_place_sums_refuse_a_double_backward(autocast):
    """The input gradient summed in place (``_BaseAndTap`` in float32, ``_LoraProducts`` under bf16 autocast) would
    cut a second derivative: create_graph=True raises instead, even where the gradient is asked with
    allow_unused."""
    _, ours = lora_twins(32.0)
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(2))
    x_in = (x.bfloat16() if autocast else x).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = ours(x_in.view_as(x_in))
    assert type(y.grad_fn).__name__ == ("_LoraProductsBackward" if autocast else "UnsafeViewBackward0")
    lora_A = ours.lora_A["default"].weight
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(y.square().sum(), (x_in, lora_A), create_graph=True, allow_unused=True)


def test_lora_layer_takes_a_single_vector_as_peft_s_does():
    stock, ours = lora_twins(32.0)
    x = torch.randn(24, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours(x), stock(x))


def test_adapt_gives_every_lora_target_varsweep_s_layer_and_peft_s_forward_handles_the_rest():
    var = adapted(tiny_base(), SPECS["lora"])
    layers = [m for m in var.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert layers and all(type(m) is LoraLinear for m in layers)
    assert len(layers) == TINY_VAR["depth"] * sum(len(paths) for paths in LORA_TARGET_GROUPS.values())
    layer = var.blocks[0].ffn.fc1
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.5)
        adapted_out = layer(x)
        layer.enable_adapters(False)  # peft's disabled-adapter path: the base layer alone
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
        layer.enable_adapters(True)
        layer.merge()  # peft's merged path: the base layer holds the adapter
        torch.testing.assert_close(layer(x), adapted_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "names", [("positions_as_modules",), ("attention_parameters_as_modules",), OPACUS_PATCHES]
)
def test_patches_are_numerically_equivalent(names, tiny_vqvae):
    plain = tiny_base()
    plain.train()
    patched = copy.deepcopy(plain)
    assert apply_patches(patched, names) == tuple(name for name in OPACUS_PATCHES if name in names)
    owners = {"positions_as_modules": "VAR", "attention_parameters_as_modules": "SelfAttention"}
    for module in patched.modules():
        own = [n for n, p in module.named_parameters(recurse=False)]
        assert type(module).__name__ not in {owners[n] for n in names} or not own, (
            f"{type(module).__name__} still owns {own}"
        )
    label_B, x_BLCv, target_BL = random_batch(seed=3)
    out_plain, out_patched = plain(label_B, x_BLCv), patched(label_B, x_BLCv)
    # Equal up to float32 rounding, not bit for bit, where a patch owns the queries' scale: the plain model folds
    # it into the queries' normalisation (one pass), the patch module multiplies after it (per-sample gradients
    # need its own call). Measured: 1.4e-6 of the largest entry at most (a sum over every row); a wrong
    # gradient is off by far more.
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * b.abs().max().item())  # noqa: E731
    close(out_patched, out_plain)
    loss = lambda out: torch.nn.functional.cross_entropy(out.flatten(0, 1), target_BL.flatten())  # noqa: E731
    loss(out_plain).backward(), loss(out_patched).backward()
    grads_plain = {n: p.grad for n, p in plain.named_parameters()}
    grads_patched = {official_key(patched, n): p.grad for n, p in patched.named_parameters()}
    assert grads_plain.keys() == grads_patched.keys()
    for name in grads_plain:
        close(grads_patched[name], grads_plain[name])
    assert all(
        torch.equal(a, b) for a, b in zip(plain.state_dict().values(), official_state_dict(patched).values())
    )
    assert list(plain.state_dict()) == list(official_state_dict(patched))
    kwargs = dict(vqvae=tiny_vqvae, cfg=1.5, top_k=10, top_p=0.9)
    labels = torch.tensor([0, 1, 4])
    a = plain.sample(labels, generator=torch.Generator().manual_seed(5), **kwargs)
    b = patched.sample(labels, generator=torch.Generator().manual_seed(5), **kwargs)
    assert torch.equal(a, b)


# What varsweep once hid on model instances (issue 15): the adaptation record, the applied patch names, the base
# checkpoint's SHA-256, and instance attributes shadowing the model's methods.
HIDDEN_STATE = {"adaptation", "applied_patches", "checkpoint_sha256"}
SHADOWED_METHODS = {"add_start_position", "add_positions", "add_qkv_bias", "unit_queries"}


def test_no_state_is_hidden_on_model_instances_the_records_are_returned(tmp_path):
    base_path = save_var(tiny_base(), tmp_path / "base.pth")
    var = load_var(base_path, **_load_args())
    assert not HIDDEN_STATE & set(var.__dict__)
    assert patches_applied(var) == () and apply_patches(var) == OPACUS_PATCHES == patches_applied(var)
    adaptation = adapt(
        var, SPECS["lora"], num_classes=NEW_CLASSES, seed=5, base_sha256=checkpoint_sha256(base_path)
    )
    assert (adaptation.method, adaptation.num_classes, adaptation.seed) == (SPECS["lora"], NEW_CLASSES, 5)
    assert adaptation.patches == OPACUS_PATCHES and adaptation.base_sha256 == file_sha256(base_path)
    for module in var.modules():  # the forward reaches the patch modules through ordinary submodule slots
        assert not (HIDDEN_STATE | SHADOWED_METHODS) & set(module.__dict__), type(module).__name__
    assert isinstance(var.pos_start_add, torch.nn.Module) and isinstance(
        var.blocks[0].attn.qkv_bias, torch.nn.Module
    )
    with pytest.raises(TypeError, match="adaptation: expected the Adaptation that adapt"):
        save_adapter(var, tmp_path / "adapter.pt", adaptation=adaptation.to_dict())
    # An unpatched model keeps the official layout: the empty slots add no state-dict keys.
    slots = ("pos_start_add", "pos_1LC_add", "qkv_bias", "head_scale")
    assert not any(slot in key for key in tiny_base().state_dict() for slot in slots)


@pytest.mark.parametrize("features", [(24, 40), (40, 24), (24, 24)])
def test_without_autograd_the_adapter_is_merged(features):
    """Without autograd under autocast (sampling), one product with W + s B A formed in float32 and rounded once to
    bf16: closer to the exact product of the bf16 input than the training path's (alpha 24, rank 4: scaling 6). The
    merged weight is kept between calls (the same bits, no new weight; the training cast dropped meanwhile), remade
    when a weight changes, and dropped by a call with autograd on and by a move. Only in eval mode."""
    _, ours = lora_twins(24.0, features=features)
    ours.eval()
    x = torch.randn(64, features[0], generator=torch.Generator().manual_seed(3))

    def exact() -> torch.Tensor:
        base, s = ours.base_layer, ours.scaling["default"]
        A, B = ours.lora_A["default"].weight.double(), ours.lora_B["default"].weight.double()
        return x.bfloat16().double() @ (base.weight.double() + s * B @ A).T + base.bias.double()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = ours(x).detach()  # autograd on: the training path, which keeps the base's cast
        assert ours._frozen_cast is not None and ours._merged_cast is None
        with torch.no_grad():
            merged = ours(x)
            held = ours._merged_cast
            assert held is not None and held["weight"].dtype == torch.bfloat16 and ours._frozen_cast is None
            assert torch.equal(ours(x), merged) and ours._merged_cast is held
    error = {
        name: (y.double() - exact()).abs().mean() for name, y in (("trained", trained), ("merged", merged))
    }
    assert error["merged"] < error["trained"]
    # the weight's rounding and the output's: within two bf16 steps of the largest entry
    assert (merged.double() - exact()).abs().max() <= 2 * torch.finfo(
        torch.bfloat16
    ).eps * exact().abs().max()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours.lora_B["default"].weight.mul_(-2)  # an in-place update: the merged weight is remade
        again = ours(x).double()
        assert ours._merged_cast is not held
    assert (again - exact()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * exact().abs().max()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours(x)
    assert ours._merged_cast is None  # training again
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours(x)
    ours.to(torch.float32)
    assert ours._merged_cast is None


def test_the_adapter_is_not_merged_where_a_hook_or_training_dropout_must_see_it():
    """A hooked adapter layer (DP's per-sample gradients), dropout in training mode, or no autocast: the layer's own
    paths, nothing merged; LoRA's folded bias (``linear_plus_bias``) is added to the merged product."""
    _, ours = lora_twins(32.0)
    ours.eval()
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(4))
    bias = torch.randn(40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = ours(x)
        assert ours._merged_cast is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            merged, folded = ours(x), ours.linear_plus_bias(x, lambda: bias)
            added = merged.float() + bias  # the bias after the product: one rounding more
            torch.testing.assert_close(folded.float(), added, rtol=0, atol=2**-6 * added.abs().max())
            ours.lora_dropout["default"] = nn.Dropout(0.5).eval()
            assert ours._merged_product(x, "default") is not None  # eval mode: dropout is the identity
            ours.lora_dropout["default"].train()
            assert ours._merged_product(x, "default") is None
            ours.lora_dropout["default"] = nn.Identity()
            ours.lora_B["default"].register_forward_hook(lambda *_: None)
            assert ours._merged_product(x, "default") is None
    torch.testing.assert_close(merged.float(), plain, rtol=0, atol=2**-6 * plain.abs().max())


def test_training_mode_drops_the_merged_weight_however_the_adapter_changed():
    """Fused AdamW updates the adapter without bumping its version counter (as a ``.data`` write does here), so the
    kept merged weight cannot tell: the return to training mode drops it, and the next evaluation merges the new
    adapter. In training mode nothing is merged; inference tensors (no version counter) are never merged."""
    _, ours = lora_twins(32.0)
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(4))

    def evaluated() -> torch.Tensor:
        ours.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return ours(x)

    before = evaluated()
    assert ours._merged_cast is not None
    ours.train()
    assert ours._merged_cast is None
    ours.lora_B["default"].weight.data.mul_(-3)  # unseen by the version counter
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours._merged_product(x, "default") is None  # training mode
    after = evaluated()
    fresh = copy.deepcopy(ours)  # nothing kept: merges anew
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(after, fresh.eval()(x)) and not torch.equal(after, before)
    with torch.inference_mode():
        _, inferred = lora_twins(32.0)
        inferred.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert inferred._merged_product(x, "default") is None
