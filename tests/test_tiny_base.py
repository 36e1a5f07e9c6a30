"""The tiny base's cache: its folder keys cover what changes its bytes, its sidecars record those keys, a VAR
is used only with the VQVAE it was trained on, and a damaged cache is refused with the folder to delete."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import shutil
from pathlib import Path

import PIL
import pytest
import torch

from trainables import tiny_base as tb
from trainables.data import glyphs
from trainables.models import CheckpointError, build_vqvae, save_vqvae
from trainables.models.checkpoints import file_sha256, read_sidecar, sidecar_path

STEPS = 2
FEW_GLYPHS = 2  # per class: a build takes seconds


@pytest.fixture
def few_glyphs(monkeypatch):
    monkeypatch.setattr(tb, "GLYPHS_PER_CLASS", FEW_GLYPHS)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny base of depth 1 (2 steps, 2 glyphs per class), built once; tests damage copies of it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tb, "GLYPHS_PER_CLASS", FEW_GLYPHS)
        cache = tmp_path_factory.mktemp("tiny-base-cache")
        return cache, tb.tiny_base(cache, depth=1, pretraining_steps=STEPS)


def _copy(built_cache, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(cache, VQVAE path, VAR path) of a copy of the built cache."""
    cache, built = built_cache
    shutil.copytree(cache, tmp_path / "cache")
    return tmp_path / "cache", *(tmp_path / "cache" / built[k].relative_to(cache) for k in ("vqvae", "var"))


def test_the_vqvae_folder_key_covers_what_changes_its_bytes(monkeypatch, tmp_path):
    def folder() -> Path:
        return tb.tiny_vqvae_folder(tmp_path, pretraining_steps=STEPS)

    base, version = folder(), importlib.metadata.version
    vq_schedule, var_schedule = tb.schedules(STEPS)
    changes = {
        "stroke width": (glyphs, "MAX_STROKE", glyphs.MAX_STROKE * 2),
        "low-resolution share": (glyphs, "LOW_RESOLUTION_SHARE", 0.25),
        "learning rate": (
            tb,
            "schedules",
            lambda steps: (dataclasses.replace(vq_schedule, lr=vq_schedule.lr / 2), var_schedule),
        ),
        "batch size": (
            tb,
            "schedules",
            lambda steps: (dataclasses.replace(vq_schedule, batch_size=16), var_schedule),
        ),
        "code restarts": (tb, "VQVAE_TRAINING", {"restart_every": 50}),
        "torch": (torch, "__version__", "1.0.0"),
        "Pillow": (PIL, "__version__", "1.0.0"),
        "matplotlib": (
            importlib.metadata,
            "version",
            lambda name: "1.0.0" if name == "matplotlib" else version(name),
        ),
    }
    for what, (owner, name, value) in changes.items():
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, value)
            assert folder() != base, what
    assert folder() == base


def test_the_var_folder_key_covers_its_settings_and_vqvae(monkeypatch, tmp_path):
    def folder(vqvae_sha256: str = "0" * 64) -> Path:
        return tb.tiny_base_folder(tmp_path, depth=1, pretraining_steps=STEPS, vqvae_sha256=vqvae_sha256)

    base = folder()
    vq_schedule, var_schedule = tb.schedules(STEPS)
    assert folder("1" * 64) != base  # another VQVAE
    for what, replaced in {
        "warm-up": dict(warmup_steps=1),
        "learning rate": dict(lr=var_schedule.lr * 2),
    }.items():
        with monkeypatch.context() as patch:
            patch.setattr(
                tb,
                "schedules",
                lambda steps, changed=replaced: (vq_schedule, dataclasses.replace(var_schedule, **changed)),
            )
            assert folder() != base, what
    for setting in ({"class_dropout": 0.2}, {"max_grad_norm": None}):
        with monkeypatch.context() as patch:
            patch.setattr(tb, "VAR_TRAINING", tb.VAR_TRAINING | setting)
            assert folder() != base, setting
    assert folder() == base


def test_the_folder_keys_follow_the_source_of_the_code_that_makes_the_base(monkeypatch, tmp_path):
    listed = (*tb.VQVAE_SOURCES, *tb.VAR_SOURCES)
    assert {"data/glyphs.py", "pretrain.py", "tiny_base.py", "models/var.py", "models/vqvae.py"} <= set(
        listed
    )
    package, copy = Path(tb.__file__).parent, tmp_path / "package"
    for name in listed:
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package / name, copy / name)
    monkeypatch.setattr(tb, "_PACKAGE", copy)

    def folders() -> tuple[Path, Path]:
        return (
            tb.tiny_vqvae_folder(tmp_path, pretraining_steps=STEPS),
            tb.tiny_base_folder(tmp_path, depth=1, pretraining_steps=STEPS, vqvae_sha256="0" * 64),
        )

    vq_before, var_before = folders()
    for name in listed:
        text = (copy / name).read_text()
        (copy / name).write_text(text + "\n# edited\n")
        vq_after, var_after = folders()
        assert var_after != var_before, name
        assert (vq_after != vq_before) == (name in tb.VQVAE_SOURCES), name  # the VQVAE is not the VAR's code
        (copy / name).write_text(text)
    assert folders() == (vq_before, var_before)


def test_each_sidecar_records_the_settings_its_folder_is_keyed_by(built_cache, few_glyphs):
    cache, built = built_cache
    vq_record = read_sidecar(built["vqvae"])["metadata"]["tiny_base"]
    assert vq_record == tb.vqvae_settings(STEPS) and vq_record["steps"] == STEPS
    assert built["vqvae"].parent == tb.tiny_vqvae_folder(cache, pretraining_steps=STEPS)
    vq_sha = file_sha256(built["vqvae"])
    var_record = read_sidecar(built["var"])["metadata"]["tiny_base"]
    assert var_record == tb.settings(1, STEPS, vqvae_sha256=vq_sha) and var_record["vqvae_sha256"] == vq_sha
    assert built["var"].parent == tb.tiny_base_folder(
        cache, depth=1, pretraining_steps=STEPS, vqvae_sha256=vq_sha
    )


def test_a_var_is_used_only_with_the_vqvae_it_was_trained_on(built_cache, few_glyphs, tmp_path):
    cache, vq_path, var_path = _copy(built_cache, tmp_path)
    # A rebuilt VQVAE that came out different (another machine's rounding): intact, of this folder's settings.
    torch.manual_seed(1)
    save_vqvae(build_vqvae(**tb.VQVAE_ARCHITECTURE), vq_path, metadata=read_sidecar(vq_path)["metadata"])
    lines: list[str] = []
    rebuilt = tb.tiny_base(cache, depth=1, pretraining_steps=STEPS, log=lines.append)
    assert rebuilt["vqvae"] == vq_path and rebuilt["var"] != var_path  # a new VAR, trained on the new VQVAE
    assert any("VAR step" in line for line in lines) and not any("VQVAE step" in line for line in lines)
    assert read_sidecar(rebuilt["var"])["metadata"]["tiny_base"]["vqvae_sha256"] == file_sha256(vq_path)
    # The VAR trained on the first VQVAE, put where the VAR of this one belongs: refused, naming both files.
    for path in (var_path, sidecar_path(var_path)):
        shutil.copyfile(path, rebuilt["var"].parent / path.name)
    with pytest.raises(CheckpointError) as refused:
        tb.tiny_base(cache, depth=1, pretraining_steps=STEPS)
    message = str(refused.value)
    assert str(rebuilt["var"]) in message and str(vq_path) in message
    assert f"Delete the folder {rebuilt['var'].parent}" in message


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _other_seed(path: Path) -> None:
    side = sidecar_path(path)
    side.write_text(side.read_text().replace('"seed": 0', '"seed": 1'))


DAMAGE = {
    "truncated VAR": ("var", _truncate),
    "VAR without its sidecar": ("var", lambda path: sidecar_path(path).unlink()),
    "VAR sidecar of other settings": ("var", _other_seed),
    "VQVAE weights removed": ("vqvae", Path.unlink),
    "VQVAE changed after saving": ("vqvae", _flip_a_byte),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_is_refused_with_the_folder_to_delete(built_cache, few_glyphs, tmp_path, damage):
    cache, vq_path, var_path = _copy(built_cache, tmp_path)
    which, damaged = DAMAGE[damage]
    path = {"vqvae": vq_path, "var": var_path}[which]
    damaged(path)
    with pytest.raises(CheckpointError, match="Delete the folder") as refused:
        tb.tiny_base(cache, depth=1, pretraining_steps=STEPS)
    assert f"Delete the folder {path.parent} and run again" in str(refused.value)
    if (
        which == "var" or damage == "VQVAE weights removed"
    ):  # doing as told rebuilds it (a VQVAE: seconds more)
        shutil.rmtree(path.parent)
        rebuilt = tb.tiny_base(cache, depth=1, pretraining_steps=STEPS)
        assert rebuilt[which] == path and rebuilt["vqvae"].is_file() and rebuilt["var"].is_file()
        assert tb.tiny_base(cache, depth=1, pretraining_steps=STEPS) == rebuilt
