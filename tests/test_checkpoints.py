"""Saving and loading from local paths: round trips, official layout, and clear errors for bad files."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from conftest import TINY_VAR, TINY_VQVAE

from trainables.models import (
    CheckpointError,
    load_var,
    load_vqvae,
    resize_class_embedding,
    save_var,
    save_vqvae,
)


def _outputs(var, vqvae):
    torch.manual_seed(1)
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        idx_Bl = vqvae.img_to_idxBl(img)
        logits = var(torch.tensor([0, 4]), vqvae.idxBl_to_var_input(idx_Bl))
        samples = var.sample(
            torch.tensor([1, 2]),
            vqvae=vqvae,
            cfg=1.5,
            top_k=10,
            top_p=0.9,
            generator=torch.Generator().manual_seed(3),
        )
    return idx_Bl, logits, samples


def test_round_trip_gives_identical_outputs(tmp_path, tiny_var, tiny_vqvae):
    save_var(tiny_var, tmp_path / "var.pth", metadata={"trial": {"lr": 1e-3}})
    save_vqvae(tiny_vqvae, tmp_path / "vqvae.pth")
    var = load_var(tmp_path / "var.pth", **TINY_VAR)
    vqvae = load_vqvae(tmp_path / "vqvae.pth", **TINY_VQVAE)
    for before, after in zip(_outputs(tiny_var, tiny_vqvae), _outputs(var.eval(), vqvae)):
        if isinstance(before, list):
            assert all(torch.equal(a, b) for a, b in zip(before, after))
        else:
            assert torch.equal(before, after)
    sidecar = json.loads((tmp_path / "var.pth.json").read_text())
    assert sidecar["metadata"] == {"trial": {"lr": 1e-3}} and sidecar["architecture"]["depth"] == 2


def test_saved_file_is_a_plain_state_dict_in_official_order(tmp_path, tiny_var):
    save_var(tiny_var, tmp_path / "var.pth")
    state = torch.load(tmp_path / "var.pth", weights_only=True)
    assert list(state) == list(tiny_var.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_the_same_weights_save_to_the_same_bytes(tmp_path, tiny_var):
    """Two saves of one state dict (to other paths, each through its own temporary file) give identical files,
    so a rebuilt bit-identical base keeps the SHA-256 its adapters recorded."""
    from trainables.models.checkpoints import read_sidecar, read_state_dict

    first = save_var(tiny_var, tmp_path / "a" / "var.pth")
    second = save_var(tiny_var, tmp_path / "b" / "rebuilt.pth")
    assert first.read_bytes() == second.read_bytes()
    assert read_sidecar(first)["sha256"] == read_sidecar(second)["sha256"]
    state = read_state_dict(second)
    assert list(state) == list(tiny_var.state_dict())
    assert all(torch.equal(state[k], v) for k, v in tiny_var.state_dict().items())


@pytest.mark.parametrize("export", ["half", "mixed"])
def test_a_half_precision_or_mixed_export_loads_as_float32(tmp_path, tiny_var, tiny_vqvae, export):
    """``assign=True`` keeps the file's dtypes: a half export gave a half model, a mixed one failed at its first
    forward. Without a ``dtype`` every floating tensor is float32, as a float32 build's."""
    for name, model in (("var", tiny_var), ("vqvae", tiny_vqvae)):
        state = model.state_dict()
        halved = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        if export == "mixed":
            halved = {**state, **{k: halved[k] for k in list(state)[:3]}}
        torch.save(halved, tmp_path / f"{name}.pth")
    var = load_var(tmp_path / "var.pth", **TINY_VAR)
    vqvae = load_vqvae(tmp_path / "vqvae.pth", **TINY_VQVAE)
    floats = {t.dtype for m in (var, vqvae) for t in m.state_dict().values() if t.is_floating_point()}
    assert floats == {torch.float32}
    idx_Bl, logits, samples = _outputs(var.eval(), vqvae)
    assert torch.isfinite(logits).all() and samples.shape[0] == 2
    assert (
        load_var(tmp_path / "var.pth", **TINY_VAR, dtype=torch.bfloat16).head.weight.dtype == torch.bfloat16
    )


def test_models_of_other_dtypes_encode_and_sample_beside_each_other(tiny_var, tiny_vqvae):
    """A bf16 or float64 tokenizer encodes (its nearest-code search runs in float32, the latent's precision), and a
    VAR samples beside a tokenizer of another dtype, without autocast."""
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    idx_Bl = tiny_vqvae.img_to_idxBl(img)
    for dtype in (torch.bfloat16, torch.float64):
        vqvae = copy.deepcopy(tiny_vqvae).to(dtype)
        agree = [(a == b).float().mean().item() for a, b in zip(vqvae.img_to_idxBl(img.to(dtype)), idx_Bl)]
        assert min(agree) > 0.9, agree  # bf16 rounds the encoder's latent: a few codes may move
        var = copy.deepcopy(tiny_var).to(dtype)
        for tokenizer in (tiny_vqvae, vqvae):
            with torch.no_grad():
                images = var.sample(torch.tensor([1, 2]), vqvae=tokenizer, cfg=1.5, top_k=10, top_p=0.9)
            assert images.shape == (2, 3, 16, 16) and torch.isfinite(images.float()).all()


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_var(tmp_path / "absent.pth", **TINY_VAR)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_var(path, **TINY_VAR)


def test_truncated_file(tmp_path, tiny_vqvae):
    path = tmp_path / "vqvae.pth"
    torch.save(tiny_vqvae.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_vqvae(path, **TINY_VQVAE)


def _damage_member(path, member_suffix: str) -> str:
    """Flip one bit inside the data of the zip member ending in ``member_suffix`` (a tensor's bytes); its name."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        member = next(m for m in archive.infolist() if m.filename.endswith(member_suffix))
    raw = bytearray(path.read_bytes())
    name_length, extra_length = (
        int.from_bytes(raw[member.header_offset + at : member.header_offset + at + 2], "little")
        for at in (26, 28)
    )
    raw[member.header_offset + 30 + name_length + extra_length + 3] ^= 0x20
    path.write_bytes(bytes(raw))
    return member.filename


def test_a_damaged_checkpoint_without_a_sidecar_is_refused_by_its_crc(tmp_path, tiny_var):
    """torch.load does not check the zip's CRC-32s: a file without a sidecar (as the official checkpoints are)
    with a tensor's bytes damaged loaded with changed weights, silently."""
    from trainables.models.checkpoints import read_state_dict, save_state

    path = tmp_path / "official-like.pth"
    save_state(tiny_var.state_dict(), path)
    member = _damage_member(path, "/data/4")
    for load in (lambda: load_var(path, **TINY_VAR), lambda: read_state_dict(path)):
        with pytest.raises(CheckpointError) as err:
            load()
        assert f"checkpoint {path} is damaged (member {member}: Bad CRC-32" in str(err.value)


def test_legacy_and_crc_less_checkpoints_still_load(tmp_path, tiny_var):
    """The CRC check reads zip files only, and members for which torch.save recorded a CRC-32."""
    legacy = tmp_path / "legacy.pth"
    torch.save(tiny_var.state_dict(), legacy, _use_new_zipfile_serialization=False)
    without_crc = tmp_path / "without-crc.pth"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(tiny_var.state_dict(), without_crc)
    finally:
        torch.serialization.set_crc32_options(True)
    for path in (legacy, without_crc):
        loaded = load_var(path, **TINY_VAR).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in tiny_var.state_dict().items())


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "object.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_var(path, **TINY_VAR)


def test_nested_checkpoint_is_named(tmp_path, tiny_var):
    path = tmp_path / "nested.pth"
    torch.save({"model": tiny_var.state_dict(), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="flat state dict") as err:
        load_var(path, **TINY_VAR)
    assert "model (OrderedDict)" in str(err.value)


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"", r"\(it is empty: 0 bytes\): EOFError$"),
        (b"step 1: 0.5\n", r"\(it holds text, .*'step 1: 0\.5\\n'\)"),
    ],
)
def test_an_empty_or_text_file_given_as_a_checkpoint_is_named_as_such(tmp_path, content, said):
    """torch's own errors said "EOFError:" (nothing after it) and "KeyError: 101" (a text file's first byte)."""
    path = tmp_path / "var.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"cannot read checkpoint {path} {said}"):
        load_var(path, **TINY_VAR)


def test_mismatched_architecture_lists_keys(tmp_path, tiny_var):
    path = tmp_path / "var.pth"
    torch.save(tiny_var.state_dict(), path)  # no sidecar: the state dict itself is checked
    with pytest.raises(CheckpointError) as err:
        load_var(path, **(TINY_VAR | {"depth": 3}))
    assert "missing keys" in str(err.value) and "blocks.2.attn.mat_qkv.weight" in str(err.value)
    with pytest.raises(CheckpointError) as err:
        load_var(path, **(TINY_VAR | {"num_classes": 7}))
    assert "mis-shaped keys" in str(err.value) and "class_emb.weight [6, 64] (expected [8, 64])" in str(
        err.value
    )


def test_unexpected_and_non_finite_values(tmp_path, tiny_var):
    state = tiny_var.state_dict()
    state["extra.weight"] = torch.zeros(1)
    state["head.bias"] = torch.full_like(state["head.bias"], float("nan"))
    path = tmp_path / "var.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        load_var(path, **TINY_VAR)
    assert "unexpected keys (1): extra.weight" in str(err.value) and "NaN/inf values (1): head.bias" in str(
        err.value
    )


def test_a_non_finite_buffer_that_enters_the_attention_is_refused(tmp_path, tiny_var):
    """The keys' zero bias is a buffer, not a parameter: a NaN there loaded and made every output NaN. The mask's
    -inf entries are its design and still load."""
    state = tiny_var.state_dict()
    state["blocks.0.attn.zero_k_bias"] = torch.full_like(state["blocks.0.attn.zero_k_bias"], float("nan"))
    assert not torch.isfinite(state["attn_bias_for_masking"]).all()
    path = tmp_path / "var.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"NaN/inf values \(1\): blocks\.0\.attn\.zero_k_bias"):
        load_var(path, **TINY_VAR)
    state["blocks.0.attn.zero_k_bias"].zero_()
    torch.save(state, path)
    load_var(path, **TINY_VAR)


def test_other_patch_nums_are_detected(tmp_path):
    from trainables.models import build_var

    var = build_var(**(TINY_VAR | {"patch_nums": (1, 2, 3, 4)}))
    state = var.state_dict()
    state["lvl_1L"] = torch.zeros_like(state["lvl_1L"])
    torch.save(state, tmp_path / "var.pth")
    with pytest.raises(CheckpointError, match="do not match patch_nums"):
        load_var(tmp_path / "var.pth", **TINY_VAR)


def test_sidecar_detects_damage_and_architecture(tmp_path, tiny_var):
    path = save_var(tiny_var, tmp_path / "var.pth")
    state = torch.load(path, weights_only=True)
    state["head.bias"] += 1.0
    torch.save(state, path)  # weights changed after saving, sidecar left behind
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_var(path, **TINY_VAR)
    save_var(tiny_var, path)
    sidecar = json.loads((tmp_path / "var.pth.json").read_text())
    sidecar["architecture"]["drop_path_rate"] = 0.5
    (tmp_path / "var.pth.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="drop_path_rate"):
        load_var(path, **TINY_VAR)


def test_resize_class_embedding_keeps_unconditional_row(tiny_var):
    old = tiny_var.class_emb.weight.detach().clone()
    resize_class_embedding(tiny_var, 3)
    new = tiny_var.class_emb.weight
    assert (
        new.shape == (4, tiny_var.width) and tiny_var.num_classes == 3 and tiny_var.unconditional_label == 3
    )
    assert torch.equal(new[3], old[-1]) and torch.equal(new[:3], old[-1].expand(3, -1))
    resize_class_embedding(tiny_var, 8, init="normal", generator=torch.Generator().manual_seed(0))
    assert tiny_var.class_emb.weight.shape == (9, tiny_var.width) and torch.equal(
        tiny_var.class_emb.weight[8], old[-1]
    )
    with pytest.raises(ValueError, match="init must be one of"):
        resize_class_embedding(tiny_var, 3, init="zeros")


def test_resized_model_round_trips(tmp_path, tiny_var):
    resize_class_embedding(tiny_var, 7, init="mean")
    save_var(tiny_var, tmp_path / "ft.pth")
    var = load_var(tmp_path / "ft.pth", **(TINY_VAR | {"num_classes": 7}))
    assert torch.equal(var.class_emb.weight, tiny_var.class_emb.weight)
    with pytest.raises(CheckpointError, match="another var architecture"):
        load_var(tmp_path / "ft.pth", **TINY_VAR)


@pytest.mark.parametrize("reader_can_write", [True, False])
def test_a_re_save_stopped_at_any_point_leaves_the_old_or_the_new_pair(
    tmp_path, tiny_var, monkeypatch, reader_can_write
):
    """Kill a re-save at each of its renames (the k-th ``os.replace`` raises, as if the process died there): loading
    then gives the old pair or the new pair, never a SHA-256 mismatch. A save stopped after its sidecar committed
    is completed by the next reader (``reader_can_write``) or read from its staged file (a read-only reader)."""
    path = tmp_path / "var.pth"
    old_bias = tiny_var.head.bias.detach().clone()
    new_state = {k: v.clone() for k, v in tiny_var.state_dict().items()}
    new_state["head.bias"] = old_bias + 1.0
    real_replace, seen, stop = os.replace, set(), 0
    while True:
        save_var(tiny_var, path, metadata={"version": "old"})
        calls = []

        def replace(src, dst, *, _calls=calls, _stop=stop):
            if len(_calls) == _stop:
                raise OSError("killed")
            _calls.append(dst)
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        try:
            save_var(tiny_var, path, metadata={"version": "new"}, state=new_state)
            finished = True
        except OSError:
            finished = False
        if reader_can_write:
            monkeypatch.setattr(os, "replace", real_replace)
        bias = load_var(path, **TINY_VAR).head.bias.detach()  # never a SHA-256 mismatch
        monkeypatch.setattr(os, "replace", real_replace)
        version = "old" if torch.equal(bias, old_bias) else "new"
        assert version == "old" or torch.equal(bias, old_bias + 1.0), stop
        seen.add(version)
        if reader_can_write:  # the files on disk are that pair now, sidecar included
            on_disk = torch.load(path, weights_only=True)["head.bias"]
            assert (
                torch.equal(on_disk, bias)
                and json.loads((tmp_path / "var.pth.json").read_text())["metadata"]["version"] == version
            )
        if finished:
            break
        stop += 1
    assert seen == {"old", "new"} and stop >= 2  # the kill points covered both sides of the commit
    save_var(tiny_var, path, metadata={"version": "old"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "var.pth",
        "var.pth.json",
    ]  # stale staged files are gone


def test_a_reader_racing_a_re_save_reads_a_consistent_pair(tmp_path, tiny_var, monkeypatch):
    """A reader that took the old sidecar while a save replaced both files re-reads the new pair instead of
    reporting a SHA-256 mismatch."""
    import trainables.models.checkpoints as checkpoints

    path = save_var(tiny_var, tmp_path / "var.pth", metadata={"version": "old"})
    new_state = {k: v.clone() for k, v in tiny_var.state_dict().items()}
    new_state["head.bias"] += 1.0
    real_read_sidecar, calls = checkpoints.read_sidecar, []

    def read_sidecar_then_save(p):
        record = real_read_sidecar(p)
        if not calls:  # the first read returns the old sidecar, then a whole new pair lands
            save_var(tiny_var, path, metadata={"version": "new"}, state=new_state)
        calls.append(record)
        return record

    monkeypatch.setattr(checkpoints, "read_sidecar", read_sidecar_then_save)
    state, _, metadata = checkpoints.read_verified(path, kind="var", architecture=tiny_var.architecture)
    assert (
        metadata["version"] == "new"
        and torch.equal(state["head.bias"], new_state["head.bias"])
        and len(calls) >= 3
    )
