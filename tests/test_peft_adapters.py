"""Adapters in peft's own format (``trainables.peft_format``): peft's ``PeftModel.from_pretrained`` loads what a
trained tiny VAR saved and gives the logits varsweep's ``load_adapter`` gives, peft's ``merge_and_unload`` gives
``merge_adapters``' logits as a plain VAR, and a wrong base, depth or file is refused by name."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch
from conftest import TINY_VAR, TINY_VQVAE
from safetensors.torch import load_file, save, save_file
from sweep_driver import tiny_trial
from test_methods import NEW_CLASSES, random_batch, tiny_base, train_steps

from bench.schema import SUBSTITUTE_EXTRACTOR, ConfigError, MethodConfig
from trainables.evaluation.evaluate import main as evaluate_main
from trainables.methods import (
    adapt,
    adapter_record,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from trainables.models import CheckpointError, build_var, build_vqvae, load_var
from trainables.models.checkpoints import checkpoint_sha256, save_var, save_vqvae
from trainables.patches import patches_applied
from trainables.peft_format import PROVENANCE_FILE, peft_base, save_peft_adapter
from trainables.trial import PEFT_ADAPTER_FOLDER, _save_adapters

SPECS = {
    "lora": MethodConfig(name="lora", lora_rank=4),
    "ln_tuning": MethodConfig(name="ln_tuning"),
    "lora_attention_block1": MethodConfig(name="lora_attention", lora_rank=2, train_blocks=(1,)),
}
TRAINING_STEPS = 2


def _architecture() -> dict:
    return {**TINY_VAR, "drop_path_rate": 0.0}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base checkpoint and, per method, the model trained a few steps and its adapter saved in both formats
    (varsweep's ``adapter.pt`` and the peft folder)."""
    root = tmp_path_factory.mktemp("peft")
    base_path = save_var(tiny_base(), root / "base.pth")
    sha = checkpoint_sha256(base_path)
    trained = {}
    for name, method in SPECS.items():
        var = load_var(base_path, **_architecture())
        adaptation = adapt(var, method, num_classes=NEW_CLASSES, seed=0, base_sha256=sha)
        train_steps(var, TRAINING_STEPS)
        save_adapter(var, root / f"{name}.pt", adaptation=adaptation)
        folder = save_peft_adapter(
            var, root / name, adaptation=adaptation, metadata={"note": "from the test"}
        )
        trained[name] = SimpleNamespace(
            var=var.eval(), adaptation=adaptation, folder=folder, pt=root / f"{name}.pt"
        )
    return SimpleNamespace(root=root, base=base_path, sha=sha, trained=trained)


def _peft_model(saved, name: str) -> peft.PeftModel:
    """The fine-tuned model as a peft user gets it: a fresh base, ``peft_base``, then peft's own loader."""
    folder = saved.trained[name].folder
    base = peft_base(load_var(saved.base, **_architecture()), folder, base_sha256=saved.sha)
    return peft.PeftModel.from_pretrained(base, folder).eval()


def _varsweep_model(saved, name: str, *, source: str = "pt"):
    trained = saved.trained[name]
    var = load_var(saved.base, **_architecture())
    adaptation = load_adapter(var, trained.pt if source == "pt" else trained.folder, base_sha256=saved.sha)
    assert adaptation == trained.adaptation
    return var.eval()


@pytest.mark.parametrize("name", ["lora", "ln_tuning"])
def test_peft_loads_the_adapter_with_varsweeps_logits_and_merges_to_a_plain_var(saved, name):
    folder = saved.trained[name].folder
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        PROVENANCE_FILE,
    ]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == {"lora": "LORA", "ln_tuning": "LN_TUNING"}[name]
    label_B, x_BLCv, _ = random_batch(seed=1)
    with torch.no_grad():
        expected_BLV = _varsweep_model(saved, name)(label_B, x_BLCv)
        from_peft_BLV = _peft_model(saved, name)(label_B, x_BLCv)
        from_folder_BLV = _varsweep_model(saved, name, source="folder")(label_B, x_BLCv)
        trained_BLV = saved.trained[name].var(label_B, x_BLCv)
    # Tolerance: none. The same modules run the same operations (the patches are numerically exact). (With a
    # gradient, the training forward folds the queries' gain into their normalisation: a float32 rounding apart.)
    assert torch.equal(from_peft_BLV, expected_BLV) and torch.equal(from_folder_BLV, expected_BLV)
    assert torch.equal(trained_BLV, expected_BLV)
    merged = _peft_model(saved, name).merge_and_unload()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())
    assert list(merged.state_dict()) == list(tiny_base().state_dict())  # the official layout, new class count
    assert merged.class_emb.weight.shape[0] == NEW_CLASSES + 1
    with torch.no_grad():
        # Merging folds the low-rank product into the weights: float32 rounding, hence 1e-5.
        torch.testing.assert_close(
            merged(label_B, x_BLCv),
            merge_adapters(_varsweep_model(saved, name))(label_B, x_BLCv),
            rtol=1e-5,
            atol=1e-5,
        )


def test_selected_blocks_and_targets_reach_peft_and_the_provenance_is_kept(saved):
    name = "lora_attention_block1"
    folder = saved.trained[name].folder
    tensors = load_file(folder / "adapter_model.safetensors")
    adapted = {key.split(".lora_")[0] for key in tensors if ".lora_" in key}
    assert adapted == {"base_model.model.blocks.1.attn.mat_qkv", "base_model.model.blocks.1.attn.proj"}
    assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] == ["class_emb"]
    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    assert provenance["base_sha256"] == saved.sha and provenance["metadata"] == {"note": "from the test"}
    assert provenance["adaptation"] == json.loads(json.dumps(saved.trained[name].adaptation.to_dict()))
    label_B, x_BLCv, _ = random_batch(seed=2)
    with torch.no_grad():
        assert torch.equal(
            _peft_model(saved, name)(label_B, x_BLCv), _varsweep_model(saved, name)(label_B, x_BLCv)
        )


def test_peft_base_refuses_another_checkpoint_or_depth(saved):
    folder = saved.trained["lora"].folder
    other = save_var(tiny_base(seed=1), saved.root / "other.pth")
    for load in (peft_base, load_adapter):
        with pytest.raises(CheckpointError, match="was trained on the base checkpoint with SHA-256"):
            load(load_var(other, **_architecture()), folder, base_sha256=checkpoint_sha256(other))
        deeper = build_var(**{**TINY_VAR, "depth": 3}, generator=torch.Generator().manual_seed(0))
        with pytest.raises(CheckpointError, match=r"trained on another VAR: depth: saved 2, requested 3"):
            load(deeper, folder, base_sha256=None)


def test_edited_or_incomplete_folders_and_full_fine_tuning_are_refused(saved, capsys):
    source = saved.trained["lora"].folder
    edited = saved.root / "edited"
    edited.mkdir()
    for file in source.iterdir():
        (edited / file.name).write_bytes(file.read_bytes())
    tensors = load_file(edited / "adapter_model.safetensors")
    save_file({key: value + 1 for key, value in tensors.items()}, edited / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        peft_base(load_var(saved.base, **_architecture()), edited, base_sha256=None)
    (edited / PROVENANCE_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"missing {PROVENANCE_FILE}"):
        load_adapter(load_var(saved.base, **_architecture()), edited, base_sha256=None)
    # The evaluation command checks a peft folder before it loads any model.
    argv = ["--var", str(saved.base), "--vqvae", str(saved.base), "--adapter", str(edited)]
    argv += ["--dataset", "digits", "--root", str(saved.root), "--out", str(saved.root / "eval")]
    assert evaluate_main(argv) == 2
    assert f"missing {PROVENANCE_FILE}" in capsys.readouterr().err.strip().splitlines()[-1]
    var = tiny_base()
    adaptation = adapt(var, MethodConfig(name="full"), num_classes=NEW_CLASSES, seed=0)
    with pytest.raises(ConfigError, match="'full' has no peft adapter.*official_export_state"):
        save_peft_adapter(var, saved.root / "full", adaptation=adaptation)
    assert not (saved.root / "full").exists()


def test_a_trial_writes_the_peft_folder_beside_adapter_pt_except_for_full(saved, tmp_path):
    names = ("b", "a", "c")  # the training split's classes, label i first at i
    for method in ("lora", "full"):
        config = tiny_trial(method)
        var = tiny_base()
        adaptation = adapt(var, config.method, num_classes=NEW_CLASSES, seed=0)
        _save_adapters(config, var, tmp_path / method, adaptation=adaptation, class_names=names)
        written = sorted(p.name for p in (tmp_path / method).iterdir())
        peft_folder = [PEFT_ADAPTER_FOLDER] if method == "lora" else []
        assert written == sorted(["adapter.pt", "adapter.pt.json", *peft_folder])
        sidecar = json.loads((tmp_path / method / "adapter.pt.json").read_text())
        assert sidecar["metadata"]["class_names"] == list(names)
    provenance = json.loads((tmp_path / "lora" / PEFT_ADAPTER_FOLDER / PROVENANCE_FILE).read_text())
    assert provenance["metadata"]["trial_id"] == tiny_trial("lora").trial_id
    assert provenance["class_names"] == list(names)
    base = build_var(**_architecture(), device="meta")
    for path in (tmp_path / "lora" / "adapter.pt", tmp_path / "lora" / PEFT_ADAPTER_FOLDER):
        assert adapter_record(base, path, base_sha256=None)[1] == names
    assert not list(Path(tmp_path).glob("**/.*tmp-*"))  # no staging folder left behind


def _copy_folder(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def _rewrite_weights(folder: Path, data: bytes) -> None:
    """Replace the folder's weights and pin the new bytes' SHA-256 in its provenance, as a hand edit would."""
    (folder / "adapter_model.safetensors").write_bytes(data)
    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    provenance["weights_sha256"] = hashlib.sha256(data).hexdigest()
    (folder / PROVENANCE_FILE).write_text(json.dumps(provenance))


def _nan_weights(folder: Path) -> None:
    tensors = load_file(folder / "adapter_model.safetensors")
    _rewrite_weights(folder, save({key: value * float("nan") for key, value in tensors.items()}))


def _class_names(names) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        provenance = json.loads((folder / PROVENANCE_FILE).read_text())
        (folder / PROVENANCE_FILE).write_text(json.dumps({**provenance, "class_names": names}))

    return edit


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (_nan_weights, r"holds NaN/inf values in \d+ tensor"),
        (
            lambda folder: _rewrite_weights(
                folder, (folder / "adapter_model.safetensors").read_bytes()[:200]
            ),
            r"adapter_model.safetensors is not a readable safetensors file",
        ),
        (_class_names(["only one"]), r"class_names are not 3 names"),
        (_class_names([1, 2, 3]), r"class_names are not 3 names"),
    ],
)
def test_every_reader_of_a_peft_folder_refuses_the_same_hand_edits(saved, edit, problem):
    """``peft_base`` accepted NaN weights that ``load_adapter`` refused, ``load_adapter`` accepted class names
    that ``peft_base`` refused, and damaged weights (their SHA-256 re-pinned) came out of both as safetensors's
    own error, not a ``CheckpointError`` naming the file."""
    folder = _copy_folder(saved.trained["lora"].folder, saved.root / f"hand-edit-{edit.__name__}-{id(edit)}")
    edit(folder)
    for load in (peft_base, load_adapter):
        base = load_var(saved.base, **_architecture())
        with pytest.raises(CheckpointError, match=problem):
            load(base, folder, base_sha256=saved.sha)
        assert base.num_classes == tiny_base().num_classes and not patches_applied(base)
    with pytest.raises(CheckpointError, match=problem):
        adapter_record(build_var(**_architecture(), device="meta"), folder, base_sha256=saved.sha)


def test_an_edited_adapter_config_is_refused_by_both_loaders(saved):
    """peft builds its model from adapter_config.json, varsweep's loader from the adaptation record: an edited
    alpha made them two different models, silently. The provenance pins the config's SHA-256; folders saved
    before it did have the fields that shape the model compared with the adaptation record instead."""
    edited = _copy_folder(saved.trained["lora"].folder, saved.root / "config-edited")
    config = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 8.0}))
    for load in (peft_base, load_adapter):
        with pytest.raises(
            CheckpointError, match=r"adapter_config.json is not the file its .* \(SHA-256 differs\)"
        ):
            load(load_var(saved.base, **_architecture()), edited, base_sha256=saved.sha)
    # An older folder: no config SHA-256 in its provenance.
    provenance = json.loads((edited / PROVENANCE_FILE).read_text())
    del provenance["config_sha256"]
    (edited / PROVENANCE_FILE).write_text(json.dumps(provenance))
    for load in (peft_base, load_adapter):
        with pytest.raises(CheckpointError, match=r"lora_alpha: 8.0, trained with 32.0"):
            load(load_var(saved.base, **_architecture()), edited, base_sha256=saved.sha)
    (edited / "adapter_config.json").write_text(json.dumps(config))  # as saved: an older folder still loads
    label_B, x_BLCv, _ = random_batch(seed=4)
    var = load_var(saved.base, **_architecture())
    assert load_adapter(var, edited, base_sha256=saved.sha) == saved.trained["lora"].adaptation
    with torch.no_grad():
        assert torch.equal(var.eval()(label_B, x_BLCv), _varsweep_model(saved, "lora")(label_B, x_BLCv))


def test_peft_base_draws_the_class_rows_as_adapt_does_also_for_the_base_s_own_label_count(saved, tmp_path):
    """The tiny base has 5 classes: an adapter for 5 new classes starts from ``class_init``'s rows (here drawn
    with the seed), not from the base's own class rows, in ``adapt`` and in ``peft_base`` alike."""
    classes = TINY_VAR["num_classes"]
    method = MethodConfig(name="lora", lora_rank=2, class_init="normal")
    var = load_var(saved.base, **_architecture())
    adaptation = adapt(var, method, num_classes=classes, seed=3, base_sha256=saved.sha)
    initial = var.class_emb.weight.detach().clone()
    assert not torch.equal(initial, tiny_base().class_emb.weight)
    folder = save_peft_adapter(var, tmp_path / "same-count", adaptation=adaptation)
    base = peft_base(load_var(saved.base, **_architecture()), folder, base_sha256=saved.sha)
    assert torch.equal(base.class_emb.weight, initial)


def test_peft_base_refuses_a_base_that_already_carries_an_adapter_or_patches(saved):
    folder = saved.trained["lora"].folder
    adapted = _varsweep_model(saved, "lora")
    with pytest.raises(CheckpointError, match="already carries peft adapter layers.*freshly loaded base"):
        peft_base(adapted, folder, base_sha256=saved.sha)
    with pytest.raises(CheckpointError, match=r"already carries the patches \['positions_as_modules'"):
        peft_base(merge_adapters(adapted), folder, base_sha256=saved.sha)


def test_a_base_peft_merged_an_adapter_into_is_refused_by_both_loaders(saved):
    """peft's ``merge_and_unload`` returns the base ``peft_base`` prepared, without adapter layers or patches: a
    loop over adapter folders on one loaded base put each adapter on top of the last one's merged weights."""
    merged = _peft_model(saved, "lora").merge_and_unload()
    for load, other in ((peft_base, "lora_attention_block1"), (load_adapter, "ln_tuning")):
        with pytest.raises(
            CheckpointError, match=r"class rows of the peft adapter .*lora.*freshly loaded base"
        ):
            load(merged, saved.trained[other].folder, base_sha256=saved.sha)


def test_a_provenance_edited_against_its_pinned_config_is_refused_by_both_loaders(saved):
    """The config's SHA-256 pins one side only: an alpha edited in the provenance's adaptation record (the config
    untouched) made varsweep's loader build another model than peft's, silently."""
    edited = _copy_folder(saved.trained["lora"].folder, saved.root / "provenance-edited")
    provenance = json.loads((edited / PROVENANCE_FILE).read_text())
    provenance["adaptation"]["method"]["lora_alpha"] = 320.0
    (edited / PROVENANCE_FILE).write_text(json.dumps(provenance))
    for load in (peft_base, load_adapter):
        with pytest.raises(
            CheckpointError, match=r"describe different models \(lora_alpha: 32.0, trained with 320"
        ):
            load(load_var(saved.base, **_architecture()), edited, base_sha256=saved.sha)
    with pytest.raises(CheckpointError, match="describe different models"):
        adapter_record(build_var(**_architecture(), device="meta"), edited, base_sha256=saved.sha)


def _edited_sidecar(saved, name: str, target: Path, edit) -> Path:
    """A copy of ``name``'s adapter.pt whose sidecar's adaptation record ``edit`` changed in place."""
    target.write_bytes(saved.trained[name].pt.read_bytes())
    sidecar = json.loads(Path(f"{saved.trained[name].pt}.json").read_text())
    edit(sidecar["metadata"]["adaptation"])
    Path(f"{target}.json").write_text(json.dumps(sidecar))
    return target


def test_an_adapter_that_does_not_fit_is_refused_before_the_base_changes(saved):
    """A record whose rank does not fit its tensors was refused only after adapt() had resized, patched and
    wrapped the base, so the next (good) adapter was refused on it as an already adapted base."""
    wrong_rank = _edited_sidecar(
        saved, "lora", saved.root / "wrong-rank.pt", lambda record: record["method"].update(lora_rank=8)
    )
    base = load_var(saved.base, **_architecture())
    with pytest.raises(CheckpointError, match=r"does not fit this base model: .*mis-shaped \['blocks"):
        load_adapter(base, wrong_rank, base_sha256=saved.sha)
    assert base.num_classes == tiny_base().num_classes and not patches_applied(base)
    assert not any(".lora_" in name for name, _ in base.named_parameters())
    assert (
        load_adapter(base, saved.trained["lora"].pt, base_sha256=saved.sha)
        == saved.trained["lora"].adaptation
    )


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda record: record["method"].update(train_blocks=[0, 5]), r"block beyond the model's depth 2"),
        (lambda record: record["method"].update(name="base"), r"'base' trains nothing"),
    ],
)
def test_a_record_that_cannot_apply_to_the_base_is_refused_by_every_reader(saved, edit, problem):
    """``adapter_record`` (what the evaluation command checks before it loads a model) accepted a record that
    ``load_adapter`` then refused, and the refusal changed the base first or came as a ConfigError."""
    path = _edited_sidecar(saved, "lora_attention_block1", saved.root / "edited-record.pt", edit)
    message = rf"adapter {path}: its adaptation record does not fit this base: .*{problem}"
    with pytest.raises(CheckpointError, match=message):
        adapter_record(build_var(**_architecture(), device="meta"), path, base_sha256=saved.sha)
    base = load_var(saved.base, **_architecture())
    with pytest.raises(CheckpointError, match=message):
        load_adapter(base, path, base_sha256=saved.sha)
    assert base.num_classes == tiny_base().num_classes


def test_saving_a_peft_folder_with_a_record_of_another_model_is_refused(saved, tmp_path):
    """A record of other blocks or another rank than the model wrote a folder neither loader could use (or, with
    blocks missing, one peft loaded with untrained blocks), and a record of fewer blocks blamed peft's naming."""
    var = saved.trained["lora"].var
    other_rank = dataclasses.replace(
        saved.trained["lora"].adaptation, method=MethodConfig(name="lora", lora_rank=2)
    )
    fewer_blocks = dataclasses.replace(
        saved.trained["lora"].adaptation, method=MethodConfig(name="lora", lora_rank=4, train_blocks=(0,))
    )
    for adaptation, problem in (
        (other_rank, r"mis-shaped \['base_model"),
        (fewer_blocks, r"unexpected \['base"),
    ):
        with pytest.raises(
            ValueError, match=rf"record does not describe this model's trained tensors.*{problem}"
        ):
            save_peft_adapter(var, tmp_path / "peft", adaptation=adaptation)
        assert not (tmp_path / "peft").exists()
    block0 = load_var(saved.base, **_architecture())
    adapt(block0, fewer_blocks.method, num_classes=NEW_CLASSES, seed=0)
    with pytest.raises(ValueError, match=r"missing \['base_model"):
        save_peft_adapter(block0, tmp_path / "peft", adaptation=saved.trained["lora"].adaptation)
    # Blocks the model lacks match nothing on it, and another label count fits no base's class rows: both saved
    # folders that every loader then refused.
    beyond = dataclasses.replace(
        fewer_blocks, method=MethodConfig(name="lora", lora_rank=4, train_blocks=(0, 5))
    )
    with pytest.raises(ConfigError, match=r"train_blocks: \(0, 5\) names a block beyond the model's depth 2"):
        save_peft_adapter(block0, tmp_path / "peft", adaptation=beyond)
    with pytest.raises(ValueError, match=r"the record holds 9 classes, the model 3"):
        save_peft_adapter(
            block0, tmp_path / "peft", adaptation=dataclasses.replace(fewer_blocks, num_classes=9)
        )
    assert not (tmp_path / "peft").exists()


def test_the_readme_s_merge_records_the_class_names_and_the_evaluation_holds_the_merged_model_to_them(
    saved, tmp_path, capsys
):
    """README's peft snippet on the tiny base: the class names the folder records pass through ``adapter_record``
    into the merged checkpoint's sidecar, and the evaluation command refuses a split of other classes for it."""
    from test_evaluate import _classes

    from trainables.data.datasets import read_dataset

    _classes(tmp_path / "data", "train", ("a", "b", "c"))
    _classes(tmp_path / "data", "test", ("a", "b", "d"), per_class=3)
    trained = saved.trained["lora"]
    names = read_dataset("folder", tmp_path / "data", "train").class_names
    folder = save_peft_adapter(
        trained.var, tmp_path / "named", adaptation=trained.adaptation, class_names=names
    )
    # The snippet, with the tiny architecture for depth=16:
    base, base_sha256 = load_var(saved.base, **_architecture()), checkpoint_sha256(saved.base)
    _, class_names = adapter_record(base, folder, base_sha256=base_sha256)
    model = peft.PeftModel.from_pretrained(peft_base(base, folder, base_sha256=base_sha256), folder)
    merged = model.merge_and_unload()
    path = save_var(merged, tmp_path / "var-merged.pth", class_names=class_names)
    assert class_names == tuple(names)
    vqvae = save_vqvae(build_vqvae(**TINY_VQVAE), tmp_path / "vq.pth")
    argv = [
        "--var",
        str(path),
        "--vqvae",
        str(vqvae),
        "--dataset",
        "folder",
        "--root",
        str(tmp_path / "data"),
    ]
    argv += ["--split", "test", "--extractor", SUBSTITUTE_EXTRACTOR, "--out", str(tmp_path / "eval")]
    assert evaluate_main([*argv, "--cache", str(tmp_path / "cache")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"are not the 3 --var {path} was trained on" in last and "not trained on: 'd'" in last


def test_an_evaluation_of_a_peft_folder_records_the_folder_s_files_hash(saved, tmp_path):
    """evaluation.json names what it scored: a peft folder by its path and a SHA-256 over its files' names and
    bytes (another file, or an edited one, gives another), the base by its checkpoint's SHA-256."""
    from test_evaluate import _classes, _command

    names = tuple("abcdefgh"[:NEW_CLASSES])
    _classes(tmp_path / "data", "train", names)
    _classes(tmp_path / "data", "test", names)
    trained = saved.trained["lora"]
    folder = save_peft_adapter(
        trained.var, tmp_path / "named", adaptation=trained.adaptation, class_names=names
    )
    vqvae = save_vqvae(build_vqvae(**TINY_VQVAE), tmp_path / "vq.pth")
    argv = _command(tmp_path, saved.base, vqvae, root=tmp_path / "data", **{"--adapter": folder})
    assert evaluate_main(argv) == 0
    inputs = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["inputs"]
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        digest.update(f"{file.name}\0{hashlib.sha256(file.read_bytes()).hexdigest()}\n".encode())
    assert inputs["adapter"] == {"path": str(folder.resolve()), "sha256": digest.hexdigest()}
    assert inputs["var"] == {"path": str(Path(saved.base).resolve()), "sha256": saved.sha}
