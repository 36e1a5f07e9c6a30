"""The driver's preflight reads what it can before any GPU is used: checkpoint headers and key lists (memory-mapped,
weights_only), the Inception weights, every listed image; all problems of all trials in one error, grouped by
problem, each distinct file read once, nothing created by a dry run, and a hint when the assets root is wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import TINY_VAR, TINY_VQVAE
from sweep_driver import tiny_trial
from test_datasets import jpeg, make_cub, make_folder

from bench.preflight import SweepError, check_sweep
from bench.schema import (
    DataConfig,
    EvaluationConfig,
    MethodConfig,
    ModelConfig,
    OptimizationConfig,
    PrivacyConfig,
    TrialConfig,
    replace,
)
from bench.sweeps import build_sweep
from bench.sweeps.common import Assets
from trainables.assets import (
    OFFICIAL_VAR,
    OFFICIAL_VQVAE,
    check_checkpoint,
    check_inception_weights,
    read_header,
)
from trainables.models import build_var, build_vqvae
from trainables.models.checkpoints import CheckpointError, save_var


def shaped_like(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict with every key, shape and dtype of ``model`` whose tensors share one element (zero strides):
    a depth-16 VAR's header in a few kilobytes."""
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in model.state_dict().items()}


class Payload:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    paths = {
        name: root / f"{name}.pth"
        for name in ("var_ok", "vqvae_ok", "truncated", "empty", "payload", "inception_bad")
    }
    torch.save(shaped_like(build_var(depth=16, **OFFICIAL_VAR, device="meta")), paths["var_ok"])
    torch.save(shaped_like(build_vqvae(**OFFICIAL_VQVAE, device="meta")), paths["vqvae_ok"])
    whole = paths["var_ok"].read_bytes()
    paths["truncated"].write_bytes(whole[: len(whole) // 2])
    paths["empty"].write_bytes(b"")
    paths["marker"] = root / "payload-ran"
    torch.save({"model": Payload(paths["marker"])}, paths["payload"])
    torch.save({"fc.weight": torch.zeros(3, 2)}, paths["inception_bad"])  # plain tensors, but not Inception's
    return paths


def official(var: Path, vqvae: Path, inception: Path, data: DataConfig, *, seed: int = 0) -> TrialConfig:
    return TrialConfig(
        model=ModelConfig(
            base="official",
            depth=16,
            var_checkpoint=str(var),
            vqvae_checkpoint=str(vqvae),
            tiny_pretraining_steps=0,
        ),
        data=data,
        method=MethodConfig(name="lora"),
        optimization=OptimizationConfig(steps=10, seed=seed),
        evaluation=EvaluationConfig(inception_weights=str(inception)),
    )


def test_headers_are_read_against_the_architecture(files, tmp_path):
    check_checkpoint(files["var_ok"], kind="var", architecture={"depth": 16, **OFFICIAL_VAR})
    check_checkpoint(files["vqvae_ok"], kind="vqvae", architecture=OFFICIAL_VQVAE)
    small = tmp_path / "small.pth"
    torch.save(build_var(**TINY_VAR).state_dict(), small)
    check_checkpoint(small, kind="var", architecture=TINY_VAR)
    with pytest.raises(CheckpointError, match=r"mis-shaped keys .*class_emb\.weight"):
        check_checkpoint(small, kind="var", architecture={**TINY_VAR, "num_classes": 7})
    with pytest.raises(CheckpointError, match="missing keys"):
        check_checkpoint(small, kind="var", architecture={**TINY_VAR, "depth": 3})
    with pytest.raises(CheckpointError, match="unexpected keys"):
        check_checkpoint(files["var_ok"], kind="vqvae", architecture=TINY_VQVAE)
    # A varsweep checkpoint's sidecar is read too: its architecture must be the one the trial builds.
    saved = save_var(build_var(**TINY_VAR), tmp_path / "saved.pth")
    check_checkpoint(saved, kind="var", architecture=TINY_VAR)
    with pytest.raises(
        CheckpointError, match=r"saved for another var architecture: num_classes: saved 5, requested 7"
    ):
        check_checkpoint(saved, kind="var", architecture={**TINY_VAR, "num_classes": 7})


def test_a_mismatched_checkpoint_says_what_it_looks_like(files, tmp_path):
    """Key lists alone said nothing of a VAR of another depth, swapped VAR and VQVAE paths, or a model saved from
    inside DDP; an HTML page saved as .pth gave an empty reason."""
    d16 = {"depth": 16, **OFFICIAL_VAR}
    cases = {
        "d20": (
            build_var(depth=20, **OFFICIAL_VAR, device="meta"),
            "var",
            d16,
            r"a VAR of depth 20 .*depth 16: set model\.depth",
        ),
        "vqvae": (
            build_vqvae(**OFFICIAL_VQVAE, device="meta"),
            "var",
            d16,
            r"the VQVAE's checkpoint, given where the VAR's goes",
        ),
        "var": (
            build_var(**d16, device="meta"),
            "vqvae",
            OFFICIAL_VQVAE,
            r"the VAR's checkpoint, given where the VQVAE's goes",
        ),
    }
    for name, (model, kind, architecture, hint) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(shaped_like(model), path)
        with pytest.raises(CheckpointError, match=r"what it looks like: " + hint):
            check_checkpoint(path, kind=kind, architecture=architecture)
    wrapped = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in build_var(**TINY_VAR).state_dict().items()}, wrapped)
    with pytest.raises(CheckpointError, match=r"every key starts with 'module\.' .*strip that prefix"):
        check_checkpoint(wrapped, kind="var", architecture=TINY_VAR)
    page = tmp_path / "page.pth"
    page.write_text("<!DOCTYPE html><html><head><title>Sign in</title></head></html>")
    with pytest.raises(CheckpointError, match=r"it holds text, not a PyTorch weights file: '<!DOCTYPE html>"):
        read_header(page)


@pytest.mark.parametrize(
    "name, problem",
    [
        ("truncated", "cannot read checkpoint"),
        ("empty", r"is empty \(0 bytes\)"),
        ("payload", "cannot read checkpoint"),
    ],
)
def test_unreadable_checkpoints_are_named(files, name, problem):
    with pytest.raises(CheckpointError, match=problem):
        read_header(files[name])
    assert not files["marker"].exists()  # weights_only refused the pickle: nothing in it ran


def test_a_wrong_inception_file_is_refused(files, tmp_path):
    for path in (files["inception_bad"], files["payload"], files["empty"]):
        with pytest.raises(CheckpointError, match="not torch-fidelity's Inception-v3 weights"):
            check_inception_weights(path)
    assert not files["marker"].exists()


def test_every_problem_of_every_trial_once_grouped(files, tmp_path):
    cub_root = tmp_path / "cub"
    make_cub(cub_root)
    gone = cub_root / "CUB_200_2011" / "images" / "010.Blackbird" / "img_0.jpg"
    gone.unlink()
    for split, label in (("train", "a"), ("train", "b"), ("test", "a"), ("test", "b")):
        jpeg(tmp_path / "folder" / split / label / "0.jpg")
    cub = DataConfig(dataset="cub200", root=str(cub_root), resolution=256)
    folder = DataConfig(dataset="folder", root=str(tmp_path / "folder"), resolution=256)
    bad_inception = files["inception_bad"]
    configs = [
        official(files["truncated"], files["vqvae_ok"], bad_inception, cub, seed=0),
        official(files["truncated"], files["vqvae_ok"], bad_inception, cub, seed=1),
        official(files["empty"], files["vqvae_ok"], bad_inception, folder),
        official(files["payload"], files["vqvae_ok"], bad_inception, folder),
        official(files["var_ok"], files["vqvae_ok"], bad_inception, folder),
    ]
    cache = tmp_path / "cache"
    with pytest.raises(SweepError) as raised:
        check_sweep(configs, cache_dir=str(cache), write=False)
    message = str(raised.value)
    assert message.startswith("5 of 5 trials cannot run; nothing was started:")
    for path in (files["truncated"], files["empty"], files["payload"], bad_inception, gone):
        assert message.count(str(path)) == 1, (
            path,
            message,
        )  # each problem once, however many trials share it
    lines = message.splitlines()

    def affected(path: Path) -> str:
        at = next(i for i, line in enumerate(lines) if str(path) in line)
        return next(line for line in lines[at + 1 :] if line.strip().startswith("affects"))

    assert affected(files["truncated"]).strip().startswith("affects 2 trials") and configs[
        1
    ].trial_id in affected(files["truncated"])
    assert configs[2].trial_id in affected(files["empty"]) and configs[3].trial_id in affected(
        files["payload"]
    )
    assert affected(bad_inception).strip() == "affects all 5 trials"
    assert re.search(r"data\.root: 1 of the 6 images the train split of cub200 lists", message)
    assert configs[0].trial_id in affected(gone) and configs[2].trial_id not in affected(gone)
    assert (
        "model.vqvae_checkpoint" not in message and str(files["var_ok"]) not in message
    )  # the valid headers pass
    assert "hint" not in message
    assert (
        not cache.exists() and not files["marker"].exists()
    )  # the dry run created nothing and ran no pickle


def test_inception_weights_that_are_not_there_are_refused_whatever_the_extractor(tmp_path):
    """Each trial refuses a named weights file that does not exist, so the driver does too, before anything runs."""
    config = replace(tiny_trial(), evaluation={"inception_weights": str(tmp_path / "nope.pth")})
    assert config.evaluation.extractor != "inception-v3-compat"
    with pytest.raises(
        SweepError, match=rf"evaluation.inception_weights: no file at {tmp_path / 'nope.pth'}"
    ):
        check_sweep([config], cache_dir=str(tmp_path / "cache"), write=False)


def test_a_batch_larger_than_the_split_and_split_classes_that_differ_are_named(tmp_path):
    for split, labels, per_class in (("train", "ab", 1), ("test", "ac", 2)):  # an evaluation scores >= 4
        for label in labels:
            for i in range(per_class):
                jpeg(tmp_path / "folder" / split / label / f"{i}.jpg")
    folder = {"dataset": "folder", "root": str(tmp_path / "folder"), "resolution": 16}
    with pytest.raises(SweepError, match=r"different classes \(only in train: b; only in test: c\)"):
        check_sweep(
            [replace(tiny_trial("lora"), data=folder)], cache_dir=str(tmp_path / "cache"), write=False
        )
    (tmp_path / "folder" / "test" / "c").rename(tmp_path / "folder" / "test" / "b")
    with pytest.raises(SweepError, match=r"optimization.batch_size: 16 is more than the 2 training examples"):
        check_sweep(
            [replace(tiny_trial("lora"), data=folder)], cache_dir=str(tmp_path / "cache"), write=False
        )
    check_sweep(
        [replace(tiny_trial("lora"), data=folder, optimization={"batch_size": 2})],
        cache_dir=str(tmp_path / "cache"),
        write=False,
    )


def test_an_image_in_both_the_training_and_the_evaluation_split_is_refused_before_compute(tmp_path):
    """A CUB image marked for both splits (its file under a train id and a test id) was scored against by the
    model that trained on it."""
    make_cub(tmp_path)
    listed = tmp_path / "CUB_200_2011" / "images.txt"
    lines = listed.read_text().splitlines()
    assert lines[:2] == ["1 001.Albatross/img_0.jpg", "2 001.Albatross/img_1.jpg"]  # 1 trains, 2 tests
    listed.write_text(
        "\n".join(["1 001.Albatross/img_0.jpg", "2 001.Albatross/img_0.jpg", *lines[2:]]) + "\n"
    )
    cub = {"dataset": "cub200", "root": str(tmp_path), "resolution": 16}
    with pytest.raises(
        SweepError, match=r"1 image\(s\) of cub200 are in both the train and the test split .*img_0\.jpg"
    ):
        check_sweep(
            [replace(tiny_trial("lora"), data=cub, optimization={"batch_size": 2})],
            cache_dir=str(tmp_path / "cache"),
            write=False,
        )


def test_a_class_the_evaluation_scores_but_no_training_image_has_is_refused_before_compute(tmp_path):
    """CUB's classes come from classes.txt: a split file moving a class's every image to the test split was
    accepted, and the evaluation generated that class from a class embedding no step trained."""
    make_cub(tmp_path)
    split_file = tmp_path / "CUB_200_2011" / "train_test_split.txt"
    lines = split_file.read_text().splitlines()
    assert lines[:2] == ["1 1", "2 0"]  # 001.Albatross: image 1 trains, image 2 tests
    split_file.write_text("\n".join(["1 0", *lines[1:]]) + "\n")
    cub = {"dataset": "cub200", "root": str(tmp_path), "resolution": 16}
    with pytest.raises(
        SweepError,
        match=r"1 class\(es\) of cub200 have images in the test split but none in the train split "
        r"\(001\.Albatross\)",
    ):
        check_sweep(
            [replace(tiny_trial("lora"), data=cub, optimization={"batch_size": 2})],
            cache_dir=str(tmp_path / "cache"),
            write=False,
        )


@pytest.mark.parametrize("write", [False, True])
def test_a_corrupt_image_stops_the_sweep_in_its_preflight_dry_run_or_not(tmp_path, write):
    """The dry run said a folder with a text file for a PNG and a truncated PNG could run; the real run found them
    only after it had started Ray. Both now decode every image in the preflight; only the real run keeps the
    outcome (the trials then read it)."""
    make_folder(tmp_path / "data")
    jpeg(tmp_path / "data" / "test" / "2" / "1.png", seed=9)  # 4 test images: what an evaluation needs
    (tmp_path / "data" / "train" / "2" / "0.png").write_text("not an image")
    truncated = tmp_path / "data" / "train" / "10" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    folder = {"dataset": "folder", "root": str(tmp_path / "data"), "resolution": 16}
    configs = [
        replace(tiny_trial(method), data=folder, optimization={"batch_size": 2})
        for method in ("lora", "full")
    ]
    with pytest.raises(
        SweepError, match=r"2 of 2 trials cannot run.*\n  folder train: 2 unreadable image\(s\)"
    ):
        check_sweep(configs, cache_dir=str(tmp_path / "cache"), write=write)
    assert (tmp_path / "cache" / "image-checks").exists() == write
    skipping = {**folder, "skip_corrupt_images": True}
    check_sweep(
        [replace(c, data=skipping) for c in configs], cache_dir=str(tmp_path / "cache"), write=write
    )  # 3 of the 5 training images are left, enough for batches of 2


@pytest.mark.parametrize("write", [False, True])
def test_copies_of_an_image_in_your_own_folders_are_refused_before_compute(tmp_path, write):
    """A copied or hard-linked image of a ``folder`` dataset passed: under DP each copy was an example of its own
    (one picture 3 of N = 21, its guarantee a group of three's), and a training image copied into test/ was scored
    against. Only a symbolic link (the same file) was caught. A copy in the training split is refused under DP only
    (without DP it weighs the picture double, as oversampling on purpose does)."""
    make_folder(tmp_path / "data")
    jpeg(tmp_path / "data" / "test" / "2" / "1.png", seed=9)
    train, test = tmp_path / "data" / "train", tmp_path / "data" / "test"
    folder = {"dataset": "folder", "root": str(tmp_path / "data"), "resolution": 16}
    plain = replace(tiny_trial("lora"), data=folder, optimization={"batch_size": 2})
    private = replace(
        tiny_trial("lora", privacy=PrivacyConfig(target_epsilon=8.0, sampling_rate=0.5, max_grad_norm=1.0)),
        data=folder,
    )
    check_sweep([plain, private], cache_dir=str(tmp_path / "cache"), write=write)
    assert (tmp_path / "cache" / "image-digests").exists() == write
    (train / "10" / "9.png").hardlink_to(train / "10" / "0.png")
    with pytest.raises(
        SweepError,
        match=r"1 of 2 trials cannot run.*\n  folder train: 1 image\(s\) have byte-identical copies.*0\.png = "
        r".*9\.png\): under DP",
    ) as refused:
        check_sweep([plain, private], cache_dir=str(tmp_path / "cache"), write=write)
    assert private.trial_id in str(refused.value) and plain.trial_id not in str(refused.value)
    check_sweep([plain], cache_dir=str(tmp_path / "cache"), write=write)
    (train / "10" / "9.png").unlink()
    (test / "10" / "copy.png").write_bytes((train / "2" / "1.png").read_bytes())
    with pytest.raises(
        SweepError,
        match=r"(?s)2 of 2 trials cannot run.*1 image\(s\) of the test split are byte-identical copies of train "
        r"images .*set data\.evaluation_split: train",
    ):
        check_sweep([plain, private], cache_dir=str(tmp_path / "cache"), write=write)
    (test / "10" / "copy.png").unlink()
    check_sweep([plain, private], cache_dir=str(tmp_path / "cache"), write=write)


def test_a_sweep_refused_keeps_the_plans_of_its_other_trials_for_the_dry_run_s_estimate(tmp_path):
    """A dry run whose preflight stopped one trial estimated none of a folder dataset's trials ("split sizes are read
    from the data, which the preflight could not read"), also those whose data it had read and planned."""
    make_folder(tmp_path / "data")
    jpeg(tmp_path / "data" / "test" / "2" / "1.png")  # 4 test images: what an evaluation needs
    folder = {"dataset": "folder", "root": str(tmp_path / "data"), "resolution": 16}
    fits = replace(tiny_trial("lora"), data=folder, optimization={"batch_size": 2})
    too_large = replace(fits, optimization={"batch_size": 64})
    with pytest.raises(SweepError, match="batch_size: 64 is more than the 5 training examples") as refused:
        check_sweep([fits, too_large], cache_dir=str(tmp_path / "cache"), write=False)
    assert (
        set(refused.value.plans) == {fits.trial_id} and refused.value.plans[fits.trial_id].train_images == 5
    )


def test_a_wrong_split_or_root_names_the_field(tmp_path):
    """The preflight said "data: unknown split 'val'" and "data: folder: dataset root ... does not exist", naming
    no field; a root given as the train/ folder itself said only that train/train was missing."""
    make_folder(tmp_path / "data")
    folder = {"dataset": "folder", "root": str(tmp_path / "data"), "resolution": 16}
    lora = replace(tiny_trial("lora"), optimization={"batch_size": 2})
    cases = [
        ({**folder, "evaluation_split": "val"}, r"data\.evaluation_split: unknown split 'val'"),
        ({**folder, "train_split": "validation"}, r"data\.train_split: unknown split 'validation'"),
        (
            {**folder, "root": str(tmp_path / "nowhere")},
            r"data\.root: folder: dataset root .*nowhere does not exist",
        ),
        (
            {**folder, "root": str(tmp_path / "data" / "train")},
            r"the root is the folder holding train/ and test/, here .*data, not .*data/train",
        ),
    ]
    for data, message in cases:
        with pytest.raises(SweepError, match=message):
            check_sweep([replace(lora, data=data)], cache_dir=str(tmp_path / "cache"), write=False)


def test_a_test_image_that_links_to_a_training_image_is_in_both_splits(tmp_path):
    """A symbolic link is the file it names: scoring against it scores against the training image."""
    make_cub(tmp_path)
    images = tmp_path / "CUB_200_2011" / "images"
    (images / "001.Albatross" / "img_1.jpg").unlink()
    (images / "001.Albatross" / "img_1.jpg").symlink_to("img_0.jpg")  # id 2, a test image
    cub = {"dataset": "cub200", "root": str(tmp_path), "resolution": 16}
    with pytest.raises(SweepError, match=r"1 image\(s\) of cub200 are in both .*img_0\.jpg = .*img_1\.jpg"):
        check_sweep(
            [replace(tiny_trial("lora"), data=cub, optimization={"batch_size": 2})],
            cache_dir=str(tmp_path / "cache"),
            write=False,
        )


def test_a_run_in_epochs_that_would_end_inside_its_warm_up_is_named(tmp_path):
    """Epochs resolve to steps only with the split's size: 2 epochs of 2 examples at batch 2 are 2 steps, fewer
    than a warm-up of 5 (the learning rate would never be reached); a warm-up of 2 fits."""
    for split, per_class in (("train", 1), ("test", 2)):
        for label in "ab":
            for i in range(per_class):
                jpeg(tmp_path / "folder" / split / label / f"{i}.jpg")
    folder = {"dataset": "folder", "root": str(tmp_path / "folder"), "resolution": 16}
    in_epochs = {"epochs": 2.0, "steps": None, "batch_size": 2}
    with pytest.raises(
        SweepError, match=r"optimization.warmup_steps: 5 is more than the run's 2 steps \(2.0 epochs"
    ):
        check_sweep(
            [replace(tiny_trial("lora"), data=folder, optimization={**in_epochs, "warmup_steps": 5})],
            cache_dir=str(tmp_path / "cache"),
            write=False,
        )
    check_sweep(
        [replace(tiny_trial("lora"), data=folder, optimization={**in_epochs, "warmup_steps": 2})],
        cache_dir=str(tmp_path / "cache"),
        write=False,
    )


def test_a_wrong_assets_root_gets_a_hint(tmp_path):
    wrong = Assets(str(tmp_path / "wrong"))
    with pytest.raises(SweepError) as raised:
        check_sweep(
            build_sweep("table2", assets=wrong),
            cache_dir=str(tmp_path / "cache"),
            write=False,
        )
    hint = str(raised.value).splitlines()[
        1
    ]  # right under the count: it explains every problem listed after it
    assert (
        hint.strip().startswith("hint:")
        and str(tmp_path / "wrong") in hint
        and "--assets" in hint
        and "VARSWEEP_ASSETS" in hint
    )
    (tmp_path / "right" / "checkpoints").mkdir(
        parents=True
    )  # the right root, its files not copied yet: no hint
    with pytest.raises(SweepError) as raised:
        check_sweep(
            build_sweep("table2", assets=Assets(str(tmp_path / "right"))),
            cache_dir=str(tmp_path / "cache"),
            write=False,
        )
    assert "hint" not in str(raised.value) and "var_d16.pth" in str(raised.value)
    assert not (tmp_path / "cache").exists()
    # A data folder of the sweep file's own, outside the assets, leaves the hint on the assets root (not on "/").
    own_data = [
        replace(c, data={"root": "/elsewhere/my_images"}) for c in build_sweep("table2", assets=wrong)
    ]
    with pytest.raises(SweepError) as raised:
        check_sweep(own_data, cache_dir=str(tmp_path / "cache"), write=False)
    assert f"and {tmp_path / 'wrong'} has no checkpoints/" in str(raised.value)
    # Paths a sweep file names directly, outside any assets layout: --assets cannot move them, so no hint, and the
    # first problem (the missing folder itself) is what the command line's last line quotes.
    own_paths = [
        replace(
            c,
            data={"dataset": "folder", "root": str(tmp_path / "nodata")},
            evaluation={"extractor": "substitute-randconv-v1"},
        )
        for c in build_sweep("demo", smoke=True)
    ]
    with pytest.raises(SweepError) as raised:
        check_sweep(own_paths, cache_dir=str(tmp_path / "cache"), write=False)
    assert "hint" not in str(raised.value)
    assert (
        str(raised.value)
        .splitlines()[1]
        .strip()
        .startswith(f"data.root: folder: dataset root {tmp_path / 'nodata'}")
    )
