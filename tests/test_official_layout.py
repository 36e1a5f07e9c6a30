"""Our modules reproduce the official checkpoints' key lists exactly (built on the meta device: no memory)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import reference_file

from trainables.models import OFFICIAL_PATCH_NUMS, build_var, build_vqvae, count_parameters

DTYPES = {"float32": torch.float32, "int64": torch.int64}


def _assert_layout(module: torch.nn.Module, reference: dict) -> None:
    expected = reference["state_dict"]
    ours = module.state_dict()
    assert list(ours) == list(expected), "keys or key order differ"
    params = dict(module.named_parameters())
    for key, (shape, dtype, kind) in expected.items():
        assert list(ours[key].shape) == shape, key
        assert ours[key].dtype == DTYPES[dtype], key
        assert (key in params) == (kind == "param"), key
    assert sum(p.numel() for p in params.values()) == reference["total_params"]
    assert sum(b.numel() for b in module.buffers()) == reference["total_buffer_elements"]


@pytest.mark.parametrize("depth", [16, 20])
def test_var_matches_official_key_list(depth):
    reference = json.loads(reference_file(f"state_dict_var_d{depth}.json").read_text())
    var = build_var(
        depth=depth,
        num_classes=1000,
        patch_nums=OFFICIAL_PATCH_NUMS,
        vocab_size=4096,
        z_channels=32,
        device="meta",
    )
    _assert_layout(var, reference)


def test_vqvae_matches_official_key_list():
    reference = json.loads(reference_file("state_dict_vqvae.json").read_text())
    vqvae = build_vqvae(vocab_size=4096, z_channels=32, ch=160, patch_nums=OFFICIAL_PATCH_NUMS, device="meta")
    _assert_layout(vqvae, reference)
    for name, count in reference["submodule_params"].items():
        assert count_parameters(getattr(vqvae, name)) == count, name


@pytest.mark.parametrize(
    "depth,params", [(16, 310_283_520), (20, 600_917_136), (24, 1_033_399_360), (30, 2_010_020_356)]
)
def test_var_parameter_counts(depth, params):
    var = build_var(
        depth=depth,
        num_classes=1000,
        patch_nums=OFFICIAL_PATCH_NUMS,
        vocab_size=4096,
        z_channels=32,
        device="meta",
    )
    assert count_parameters(var) == params
    assert var.seq_len == 680 and var.width == 64 * depth and var.num_heads == depth
    assert var.blocks[0].drop_path.__class__.__name__ == "Identity"
    assert var.blocks[-1].drop_path.p == pytest.approx(0.1 * depth / 24)


def test_phi_index_per_scale_for_ten_scales():
    vqvae = build_vqvae(vocab_size=4096, z_channels=32, ch=160, patch_nums=OFFICIAL_PATCH_NUMS, device="meta")
    phis = vqvae.quantize.quant_resi
    assert [phis.index_for(si, 10) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize(
    "num_shared, expected",
    [(3, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]), (6, [0, 0, 1, 1, 2, 3, 3, 4, 5, 5]), (1, [0] * 10)],
)
def test_phi_index_for_other_numbers_of_shared_phis(num_shared, expected):
    """The official rule for K != 4 insets the ticks by 1/(2K) (numpy.linspace(1/2/K, 1-1/2/K, K)), not 1/(3K)."""
    vqvae = build_vqvae(
        vocab_size=64,
        z_channels=8,
        ch=32,
        patch_nums=OFFICIAL_PATCH_NUMS,
        share_quant_resi=num_shared,
        device="meta",
    )
    assert [vqvae.quantize.quant_resi.index_for(si, 10) for si in range(10)] == expected


def test_sequence_length_and_mask_derive_from_patch_nums():
    var = build_var(
        depth=2, num_classes=3, patch_nums=(2, 3, 5), vocab_size=16, z_channels=4, embed_dim=32, num_heads=2
    )
    assert var.seq_len == 4 + 9 + 25 and var.first_l == 4
    assert var.pos_start.shape == (1, 4, 32)
    bias = var.attn_bias_for_masking[0, 0]
    lvl = var.lvl_1L[0]
    assert torch.equal(bias == 0, lvl[:, None] >= lvl[None, :])
    logits = var(torch.tensor([0, 3]), torch.randn(2, var.seq_len - 4, 4))
    assert logits.shape == (2, 38, 16)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(patch_nums=(1,)), "patch_nums"),
        (dict(patch_nums=(2, 1)), "patch_nums"),
        (dict(embed_dim=100, num_heads=3), "divisible"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
    ],
)
def test_build_var_rejects_bad_layouts(kwargs, match):
    args = (
        dict(
            depth=2, num_classes=3, patch_nums=(1, 2), vocab_size=16, z_channels=4, embed_dim=64, num_heads=2
        )
        | kwargs
    )
    with pytest.raises(ValueError, match=match):
        build_var(**args)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(ch=48), "multiple of 32"),
        (dict(share_quant_resi=0), "share_quant_resi"),
        (dict(patch_nums=(3, 3)), "patch_nums"),
    ],
)
def test_build_vqvae_rejects_bad_layouts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_vqvae(**(dict(vocab_size=16, z_channels=4, ch=32, patch_nums=(1, 2)) | kwargs))
