"""The evaluation pipeline end to end on tiny models and a fake folder dataset, and its standalone command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_datasets import jpeg, make_folder

from bench.schema import SUBSTITUTE_EXTRACTOR, EvaluationConfig
from trainables.data.datasets import read_dataset
from trainables.evaluation.evaluate import EvaluationError, ScoringSettings, evaluate, main
from trainables.evaluation.metrics import ReferenceStats
from trainables.models.checkpoints import file_sha256, save_var, save_vqvae

EVALUATION = EvaluationConfig(
    extractor=SUBSTITUTE_EXTRACTOR, guidance_scale=1.0, top_k=0, top_p=0.0, batch_size=4, sampling_seed=0
)
SCORING = ScoringSettings(kid_subsets=5, kid_subset_size=4)


@pytest.fixture
def split(tmp_path):
    make_folder(tmp_path / "data")
    return read_dataset("folder", tmp_path / "data", "train")  # 5 images: class "10" x3, class "2" x2


def test_evaluate_generates_per_class_and_reuses_reference_statistics(tiny_var, tiny_vqvae, split, tmp_path):
    cache = ReferenceStats(tmp_path / "reference")
    first = evaluate(
        tiny_var, tiny_vqvae, split, evaluation=EVALUATION, autocast_bf16=True, scoring=SCORING, cache=cache
    )
    assert first["plan"] == [3, 2] and first["images_generated"] == 5 and not first["reference_cache_hit"]
    assert (
        set(first["metrics"]) == {"fid", "precision", "recall", "kid_mean", "kid_std"}
        and first["metrics"]["fid"] > 0
    )
    assert first["evaluation_settings"] == {
        "extractor": SUBSTITUTE_EXTRACTOR,
        "resolution": 16,
        "num_images": None,
        "neighborhood": 3,
        "kid_subsets": 5,
        "kid_subset_size": 2,  # the size used: half the smaller set (5 images), below SCORING's bound of 4
    }
    assert first["sampling"] == {
        "guidance_scale": 1.0,
        "top_k": 0,
        "top_p": 0.0,
        "batch_size": 4,
        "sampling_seed": 0,
        "autocast_bf16": True,
    }
    assert first["compute"]["sample_flops_per_image"] > 0 and first["compute"][
        "sample_pflops"
    ] == pytest.approx(5 * first["compute"]["sample_flops_per_image"] / 1e15)
    second = evaluate(
        tiny_var,
        tiny_vqvae,
        split,
        evaluation=EVALUATION,
        autocast_bf16=True,
        scoring=SCORING,
        cache=cache,
        out_dir=tmp_path / "images",
    )
    assert second["reference_cache_hit"] and second["metrics"] == first["metrics"]  # PNGs are lossless


def evaluate_into(folder, var, vqvae, split, *, autocast_bf16: bool = False) -> dict:
    """``evaluate`` with the tests' settings, its reference statistics and images under ``folder``."""
    return evaluate(
        var,
        vqvae,
        split,
        evaluation=EVALUATION,
        autocast_bf16=autocast_bf16,
        scoring=SCORING,
        cache=ReferenceStats(folder / "reference"),
        out_dir=folder / "images",
    )


def test_a_resumed_evaluation_rates_only_the_images_it_drew(tiny_var, tiny_vqvae, split, tmp_path):
    """images_per_second (a trial's cost.sample_images_per_second) is of the images drawn in the timed call: a
    resumed evaluation reads the earlier run's back, which would inflate the rate; with none drawn it is None."""
    from trainables.evaluation.generate import image_path

    def run() -> dict:
        return evaluate_into(tmp_path, tiny_var, tiny_vqvae, split, autocast_bf16=True)

    first = run()
    assert first["images_drawn"] == first["images_generated"] == 5
    assert first["compute"]["images_per_second"] == pytest.approx(5 / first["generation_seconds"])
    resumed = run()
    assert resumed["images_drawn"] == 0 and resumed["compute"]["images_per_second"] is None
    assert resumed["images_generated"] == 5 and resumed["metrics"] == first["metrics"]
    image_path(tmp_path / "images", 1, 4).unlink()  # plan [3, 2] at batch size 4: the last batch is image 4
    partly = run()
    assert partly["images_drawn"] == 1 and partly["images_generated"] == 5
    assert partly["compute"]["images_per_second"] == pytest.approx(1 / partly["generation_seconds"])


def test_the_command_refuses_an_images_folder_of_another_plan(tiny_var, tiny_vqvae, split, tmp_path, capsys):
    """--num-images changed, same --out: the folder's images are the first plan's (its last batch's shape among
    them); the second run ends in status 2 naming the folder, which keeps the first run's images."""
    var_path, vqvae_path = (
        save_var(tiny_var, tmp_path / "var.pth"),
        save_vqvae(tiny_vqvae, tmp_path / "q.pth"),
    )
    command = ["--var", str(var_path), "--vqvae", str(vqvae_path), "--dataset", "folder", "--root"]
    command += [
        str(tmp_path / "data"),
        "--split",
        "train",
        "--extractor",
        SUBSTITUTE_EXTRACTOR,
        "--cfg",
        "1.0",
    ]
    command += ["--batch-size", "4", "--cache", str(tmp_path / "ref"), "--out", str(tmp_path / "eval")]
    assert main([*command, "--num-images", "6"]) == 0
    pngs = sorted((tmp_path / "eval" / "images").rglob("*.png"))
    capsys.readouterr()
    assert main([*command, "--num-images", "5"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        error.startswith("error: ") and str(tmp_path / "eval" / "images") in error and "another plan" in error
    )
    assert sorted((tmp_path / "eval" / "images").rglob("*.png")) == pngs and len(pngs) == 6


def test_command_defaults_are_the_configs(tmp_path):
    """The command's sampling options default to EvaluationConfig's own values (a sweep trial's), and its options
    become that section (checked by it)."""
    from trainables.evaluation.evaluate import _parser, evaluation_config

    args = _parser().parse_args(
        [
            "--var",
            "v",
            "--vqvae",
            "q",
            "--dataset",
            "folder",
            "--root",
            "r",
            "--out",
            "o",
            "--extractor",
            SUBSTITUTE_EXTRACTOR,
        ]
    )
    assert evaluation_config(args) == EvaluationConfig(extractor=SUBSTITUTE_EXTRACTOR)
    assert args.autocast_bf16 is True and args.resolution is None


def test_standalone_command_on_saved_checkpoints(tiny_var, tiny_vqvae, split, tmp_path, capsys):
    var_path, vqvae_path = (
        save_var(tiny_var, tmp_path / "var.pth"),
        save_vqvae(tiny_vqvae, tmp_path / "vqvae.pth"),
    )
    # --depth may be left out: the sidecar records the architecture (a different --depth is refused; see test_bad_inputs)
    assert (
        main(
            [
                "--var",
                str(var_path),
                "--vqvae",
                str(vqvae_path),
                "--dataset",
                "folder",
                "--root",
                str(tmp_path / "data"),
                "--split",
                "train",
                "--extractor",
                "substitute-randconv-v1",
                "--resolution",
                "16",
                "--cfg",
                "1.0",
                "--top-k",
                "0",
                "--top-p",
                "0",
                "--batch-size",
                "4",
                "--cache",
                str(tmp_path / "ref"),
                "--out",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["images_generated"] == 5 and len(list((tmp_path / "eval" / "images").rglob("*.png"))) == 5
    # what was scored with what: the file said neither the split nor the models
    assert result["inputs"] == {
        "dataset": "folder",
        "split": "train",
        "root": str((tmp_path / "data").resolve()),
        "images": 5,
        "var": {"path": str(var_path.resolve()), "sha256": file_sha256(var_path)},
        "vqvae": {"path": str(vqvae_path.resolve()), "sha256": file_sha256(vqvae_path)},
        "adapter": None,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    out, err = capsys.readouterr()
    assert "fid" in json.loads(out)  # stdout: the metrics alone
    # stderr: the progress a long evaluation shows (the command printed nothing until it ended)
    assert "[evaluation] generated image 5/5 (100%)" in err and "[evaluation] scoring 1/1" in err


def test_compiled_sampling_draws_every_batch_at_one_shape_and_records_it(
    tiny_var, tiny_vqvae, split, tmp_path
):
    """--compile-sampling (a trial's resources.compile_sampling): 5 images at batch 2 are drawn as three batches of
    2 rows, the last padded, so the compiled step makes one graph per scale it runs (every scale but the first,
    whose eager step allocates the KV buffers) and not one more per scale for the last batch's size. The padding
    draws nothing, so with a sampling filter the images are eager sampling's up to rounding; the record and the
    folder's manifest say compiled, eager's not."""
    import torch

    from trainables.evaluation.generate import MANIFEST, read_generated

    var_path, vqvae_path = (
        save_var(tiny_var, tmp_path / "var.pth"),
        save_vqvae(tiny_vqvae, tmp_path / "q.pth"),
    )
    common = ["--var", str(var_path), "--vqvae", str(vqvae_path), "--dataset", "folder", "--root"]
    common += [str(tmp_path / "data"), "--split", "train", "--extractor", SUBSTITUTE_EXTRACTOR]
    common += [
        "--cfg",
        "1.5",
        "--top-k",
        "10",
        "--top-p",
        "0.9",
        "--batch-size",
        "2",
        "--cache",
        str(tmp_path / "ref"),
    ]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert main([*common, "--compile-sampling", "--out", str(tmp_path / "compiled")]) == 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len(tiny_var.patch_nums) - 1
    assert main([*common, "--out", str(tmp_path / "eager")]) == 0
    records, images = {}, {}
    for name in ("compiled", "eager"):
        records[name] = json.loads((tmp_path / name / "evaluation.json").read_text())
        manifest = json.loads((tmp_path / name / "images" / MANIFEST).read_text())
        assert manifest["sampling"] == records[name]["sampling"]
        images[name], _ = read_generated(tmp_path / name / "images", records[name]["plan"])
    assert records["compiled"]["sampling"] == {**records["eager"]["sampling"], "compiled": True}
    assert images["compiled"].shape == images["eager"].shape == (5, 3, 16, 16)
    assert (images["compiled"].int() - images["eager"].int()).abs().max() <= 1  # uint8 levels: rounding only


def six_class_split(root):
    """A folder split of 6 classes, one image each: one class more than the tiny VAR's 5."""
    for c in range(6):
        jpeg(root / "train" / f"class{c}" / "0.png", seed=c)
    return read_dataset("folder", root, "train")


def test_a_split_with_more_classes_than_the_model_is_refused(tiny_var, tiny_vqvae, tmp_path):
    """Label 5 is the 5-class VAR's unconditional class: a sixth class would be drawn unconditionally, silently."""
    split = six_class_split(tmp_path / "six")
    with pytest.raises(EvaluationError, match=r"folder train: the split has 6 classes but the VAR has 5"):
        evaluate_into(tmp_path, tiny_var, tiny_vqvae, split)
    assert not list(tmp_path.rglob("*.npz")) and not (tmp_path / "images").exists()  # nothing computed


def test_the_command_refuses_more_classes_before_loading_a_model(
    tiny_var, tiny_vqvae, tmp_path, capsys, monkeypatch
):
    """The sidecar records the VAR's 5 classes: a 6-class split stops before any image is decoded or model loaded."""
    import trainables.data.datasets as datasets_module
    import trainables.models as models

    six_class_split(tmp_path / "six")
    var_path = save_var(tiny_var, tmp_path / "var.pth")
    vqvae_path = save_vqvae(tiny_vqvae, tmp_path / "vqvae.pth")

    def heavy(*args, **kwargs):
        raise AssertionError("loaded or decoded before the class check")

    for module, name in ((models, "load_var"), (models, "load_vqvae"), (datasets_module, "_unreadable")):
        monkeypatch.setattr(module, name, heavy)
    argv = ["--var", str(var_path), "--vqvae", str(vqvae_path), "--dataset", "folder", "--root"]
    argv += [str(tmp_path / "six"), "--split", "train", "--extractor", SUBSTITUTE_EXTRACTOR, "--out"]
    assert main([*argv, str(tmp_path / "eval"), "--cache", str(tmp_path / "ref")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: folder train: the split has 6 classes but --var") and "has 5" in last


def test_kid_subsets_are_half_the_smaller_set_and_the_record_says_so(tiny_var, tiny_vqvae, split, tmp_path):
    """The command's default bound (1000) used to be clamped to the whole 5-image set: every subset was the same
    set, kid_std 0, and the record said 1000. Both paths now use half the smaller set and record it."""
    out = evaluate(
        tiny_var,
        tiny_vqvae,
        split,
        evaluation=EVALUATION,
        autocast_bf16=False,
        cache=ReferenceStats(tmp_path / "reference"),
    )
    assert ScoringSettings().kid_subset_size == 1000 and out["evaluation_settings"]["kid_subset_size"] == 2
    assert out["metrics"]["kid_std"] > 0


def test_reference_images_of_high_bit_depth_or_exif_turned_files_are_the_displayed_pictures(tmp_path):
    """The real images scored against (16-bit scans were clipped to white, EXIF-turned photos left on their side)
    are those of 8-bit files holding the displayed pictures."""
    import numpy as np
    import torch
    from PIL import Image
    from test_datasets import displayed_images

    from trainables.evaluation.evaluate import real_images_uint8

    (tmp_path / "data" / "test" / "b").mkdir(parents=True)
    displayed = displayed_images(tmp_path / "data" / "test" / "a")
    for path, pixels in displayed.items():
        Image.fromarray(np.ascontiguousarray(pixels)).save(
            tmp_path / "data" / "test" / "b" / f"{path.name}.png"
        )
    images = read_dataset("folder", tmp_path / "data", "test")
    real = dict(zip((p.name for p in images.paths), torch.cat(list(real_images_uint8(images, 8)))))
    originals = [p for p in images.paths if p.parent.name == "a"]
    assert len(originals) == len(displayed) and all(
        torch.equal(real[p.name], real[f"{p.name}.png"]) for p in originals
    )


def _no_heavy_work(monkeypatch) -> list[str]:
    """Make decoding the split's images, building the extractor and loading a model fail, recording which was
    reached (the command reports any exception as its error line, so the list says whether a check came late)."""
    import trainables.evaluation.evaluate as evaluate_module
    import trainables.models as models

    reached = []

    def heavy(name):
        def refuse(*args, **kwargs):
            reached.append(name)
            raise AssertionError(f"{name} reached before the check")

        return refuse

    for module, name in (
        (evaluate_module, "check_images"),
        (evaluate_module, "build_extractor"),
        (evaluate_module, "reference_statistics"),
        (models, "load_var"),
        (models, "load_vqvae"),
    ):
        monkeypatch.setattr(module, name, heavy(name))
    return reached


def _saved_lora(tmp_path, *, base_path, num_classes: int, class_names=None):
    """A LoRA adapter of the tiny base at ``base_path`` (its sidecar records the base file's SHA-256)."""
    from test_methods import tiny_base

    from bench.schema import MethodConfig
    from trainables.methods import adapt, save_adapter
    from trainables.models.checkpoints import checkpoint_sha256

    var = tiny_base()
    method = MethodConfig(name="lora", lora_rank=2)
    adaptation = adapt(var, method, num_classes=num_classes, seed=0, base_sha256=checkpoint_sha256(base_path))
    path = tmp_path / f"adapter-{num_classes}-{'named' if class_names else 'unnamed'}.pt"
    # class_names only where given: an adapter saved without them is one of those saved before they were recorded
    named = {} if class_names is None else {"class_names": class_names}
    return save_adapter(var, path, adaptation=adaptation, **named)


def _command(tmp_path, var_path, vqvae_path, *, root, split="test", **change) -> list[str]:
    options = {
        "--var": var_path,
        "--vqvae": vqvae_path,
        "--dataset": "folder",
        "--root": root,
        "--split": split,
    }
    options |= {
        "--extractor": SUBSTITUTE_EXTRACTOR,
        "--cfg": 1.0,
        "--top-k": 0,
        "--top-p": 0,
        "--batch-size": 4,
    }
    options |= {"--cache": tmp_path / "ref", "--out": tmp_path / "eval", **change}
    return [str(x) for key, value in options.items() for x in (key, value)]


@pytest.fixture
def saved_models(tmp_path):
    from conftest import TINY_VQVAE
    from test_methods import tiny_base

    from trainables.models import build_vqvae

    return save_var(tiny_base(), tmp_path / "base.pth"), save_vqvae(
        build_vqvae(**TINY_VQVAE), tmp_path / "vq.pth"
    )


def _classes(root, split: str, names, *, per_class: int = 2) -> None:
    for c, name in enumerate(names):
        for i in range(per_class):
            jpeg(root / split / name / f"{i}.jpg", seed=c * per_class + i)


@pytest.mark.parametrize(
    "split_classes, named, needles",
    [
        # The reviewer's case: a folder split without one class's folder numbers "c" as label 1, the model's "b".
        (("a", "c"), True, ["are not the 3 --adapter", "missing from the split: 'b'"]),
        (("a", "b", "d"), True, ["missing from the split: 'c'; not trained on: 'd'"]),
        (("a", "c"), False, ["the split has 2 classes but --adapter", "has 3 and records no class names"]),
    ],
)
def test_the_command_refuses_a_split_of_other_classes_than_the_adapter_s_before_decoding_it(
    split_classes, named, needles, saved_models, tmp_path, capsys, monkeypatch
):
    """Each split numbers its own classes, so a split of other classes scored the adapter's label i against
    another class, silently. An adapter records its training classes; one saved before that is held to its count."""
    base_path, vqvae_path = saved_models
    _classes(tmp_path / "data", "train", ("a", "b", "c"))
    _classes(tmp_path / "data", "test", split_classes, per_class=3)
    names = read_dataset("folder", tmp_path / "data", "train").class_names if named else None
    adapter = _saved_lora(tmp_path, base_path=base_path, num_classes=3, class_names=names)
    reached = _no_heavy_work(monkeypatch)
    assert (
        main(_command(tmp_path, base_path, vqvae_path, root=tmp_path / "data", **{"--adapter": adapter})) == 2
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert reached == [] and last.startswith("error: folder test: ")
    assert all(needle in last for needle in needles), last


def _merged_model(tmp_path, *, class_names=None, metadata=None):
    """A tiny fine-tuned VAR of 3 classes saved whole (as a merged adapter or an exported full fine-tuning is)."""
    from test_methods import tiny_base

    from trainables.models.checkpoints import resize_class_embedding

    var = tiny_base()
    resize_class_embedding(var, 3)
    return save_var(var, tmp_path / "merged.pth", class_names=class_names, metadata=metadata)


@pytest.mark.parametrize(
    "split_classes, needles",
    [
        (("a", "c", "d"), ["are not the 3 --var", "missing from the split: 'b'; not trained on: 'd'"]),
        (("a", "b"), ["are not the 3 --var", "missing from the split: 'c'"]),
    ],
)
def test_the_command_holds_a_merged_checkpoint_to_the_class_names_it_records(
    split_classes, needles, saved_models, tmp_path, capsys, monkeypatch
):
    """A fine-tuned model saved whole (adapters merged, ``save_var(class_names=...)``) was held to its class count
    only: a split of three other classes was scored against the wrong labels. Its sidecar's names are checked as an
    adapter's are, before any image is decoded."""
    _, vqvae_path = saved_models
    _classes(tmp_path / "data", "train", ("a", "b", "c"))
    _classes(tmp_path / "data", "test", split_classes, per_class=3)
    merged = _merged_model(
        tmp_path, class_names=read_dataset("folder", tmp_path / "data", "train").class_names
    )
    reached = _no_heavy_work(monkeypatch)
    assert main(_command(tmp_path, merged, vqvae_path, root=tmp_path / "data")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert reached == [] and last.startswith("error: folder test: ")
    assert all(needle in last for needle in needles), last


def test_a_merged_checkpoint_of_its_training_classes_passes_and_one_without_names_is_held_to_its_count(
    saved_models, tmp_path, capsys, monkeypatch
):
    _, vqvae_path = saved_models
    _classes(tmp_path / "data", "train", ("a", "b", "c"))
    _classes(tmp_path / "data", "test", ("a", "b", "c"), per_class=3)
    names = read_dataset("folder", tmp_path / "data", "train").class_names
    reached = _no_heavy_work(monkeypatch)
    command = _command(
        tmp_path, _merged_model(tmp_path, class_names=names), vqvae_path, root=tmp_path / "data"
    )
    assert main(command) == 2 and reached[0] in ("check_images", "build_extractor")  # past the class check
    capsys.readouterr()
    # Without names (a plain checkpoint, e.g. the official ImageNet VAR): any split of no more classes than it has.
    unnamed = _merged_model(tmp_path)
    (tmp_path / "data" / "test" / "c").rename(tmp_path / "data" / "test" / "z")  # three classes, one other
    reached.clear()
    assert main(_command(tmp_path, unnamed, vqvae_path, root=tmp_path / "data")) == 2
    assert reached[0] in ("check_images", "build_extractor")
    _classes(tmp_path / "data", "test", ("y",), per_class=3)  # four classes
    reached.clear()
    assert main(_command(tmp_path, unnamed, vqvae_path, root=tmp_path / "data")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert reached == [] and "the split has 4 classes but --var" in last


def test_class_names_are_one_per_class_when_saved_and_when_read(saved_models, tmp_path, capsys, monkeypatch):
    with pytest.raises(ValueError, match="class_names: expected the 3 class names of the training split"):
        _merged_model(tmp_path, class_names=["a", "b"])
    _, vqvae_path = saved_models
    _classes(tmp_path / "data", "test", ("a", "b", "c"), per_class=3)
    damaged = _merged_model(tmp_path, metadata={"class_names": ["a", "b"]})  # written past save_var's check
    reached = _no_heavy_work(monkeypatch)
    assert main(_command(tmp_path, damaged, vqvae_path, root=tmp_path / "data")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        reached == []
        and f"--var {damaged}: its class_names are not 3 names, one per class of its model" in last
    )


def test_the_command_scores_an_adapter_on_a_split_of_its_training_classes(saved_models, tmp_path):
    base_path, vqvae_path = saved_models
    _classes(tmp_path / "data", "train", ("a", "b", "c"))
    _classes(tmp_path / "data", "test", ("a", "b", "c"))
    names = read_dataset("folder", tmp_path / "data", "train").class_names
    adapter = _saved_lora(tmp_path, base_path=base_path, num_classes=3, class_names=names)
    assert (
        main(_command(tmp_path, base_path, vqvae_path, root=tmp_path / "data", **{"--adapter": adapter})) == 0
    )
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["plan"] == [2, 2, 2]
    assert result["inputs"]["adapter"] == {
        "path": str(Path(adapter).resolve()),
        "sha256": file_sha256(adapter),
    }


def _deeper_base(tmp_path, base_path, vqvae_path):
    import torch
    from conftest import TINY_VAR

    from trainables.models import build_var

    deeper = build_var(
        **{**TINY_VAR, "depth": 3}, drop_path_rate=0.0, generator=torch.Generator().manual_seed(0)
    )
    return {"--var": save_var(deeper, tmp_path / "deep.pth")}, [
        "saved for another var-adapter",
        "depth: saved 2",
    ]


def _other_base_file(tmp_path, base_path, vqvae_path):
    from test_methods import tiny_base

    other = save_var(tiny_base(seed=7), tmp_path / "other.pth")
    return {"--var": other}, ["was trained on the base checkpoint with SHA-256"]


def _other_vocabulary(tmp_path, base_path, vqvae_path):
    from conftest import TINY_VQVAE

    from trainables.models import build_vqvae

    other = save_vqvae(build_vqvae(**{**TINY_VQVAE, "vocab_size": 32}), tmp_path / "vq32.pth")
    return {"--vqvae": other}, [f"--vqvae {other} does not match --var", "vocab_size: VAR 64, VQVAE 32"]


def _plain_of_another_layout(tmp_path, base_path, vqvae_path):
    """No sidecar: --depth 2 is taken as the official layout (1000 classes, 4096 tokens); the file is the tiny
    model's, which its header shows."""
    import torch

    plain = tmp_path / "plain.pth"
    torch.save(torch.load(base_path, weights_only=True), plain)
    return {"--var": plain, "--depth": 2}, [
        f"checkpoint {plain} does not match the VAR --var is taken to be without a sidecar"
    ]


@pytest.mark.parametrize(
    "case",
    [
        _deeper_base,
        _other_base_file,
        _other_vocabulary,
        lambda t, b, q: ({"--resolution": 32}, ["--resolution 32", "16px"]),
        _plain_of_another_layout,
    ],
    ids=["adapter of another depth", "adapter of another base file", "vqvae", "resolution", "header"],
)
def test_the_command_checks_the_models_on_their_records_before_decoding_an_image(
    case, saved_models, tmp_path, capsys, monkeypatch
):
    """An adapter of another base (architecture or file), a VQVAE of other tokens, another --resolution and a
    checkpoint without a sidecar of another layout were found after the split's images were decoded, the
    extractor built and the base loaded (or at the first sample, after the reference statistics)."""
    base_path, vqvae_path = saved_models
    make_folder(tmp_path / "data")
    adapter = _saved_lora(tmp_path, base_path=base_path, num_classes=2)
    change, needles = case(tmp_path, base_path, vqvae_path)
    argv = _command(tmp_path, base_path, vqvae_path, root=tmp_path / "data", split="train", **change)
    if "--adapter" not in argv and case in (_deeper_base, _other_base_file):
        argv += ["--adapter", str(adapter)]
    reached = _no_heavy_work(monkeypatch)
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert reached == [] and last.startswith("error: ")
    assert all(needle in last for needle in needles), last


def test_evaluate_refuses_a_vqvae_of_other_tokens_before_the_reference_statistics(tiny_var, split, tmp_path):
    from conftest import TINY_VQVAE

    from trainables.models import build_vqvae

    other = build_vqvae(**{**TINY_VQVAE, "z_channels": 4}).eval()
    with pytest.raises(
        EvaluationError, match=r"the VQVAE does not match the VAR \(z_channels: VAR 8, VQVAE 4\)"
    ):
        evaluate(
            tiny_var,
            other,
            split,
            evaluation=EVALUATION,
            autocast_bf16=False,
            scoring=SCORING,
            cache=ReferenceStats(tmp_path / "reference"),
        )
    assert not list(tmp_path.rglob("*.npz"))  # no reference statistics computed


def _count_decodes(monkeypatch, *, refuse: bool = False) -> list[str]:
    """Record every image the split's check and the reference statistics decode (``refuse``: fail at the first,
    so a run that reaches one ends there)."""
    import trainables.data.datasets as datasets_module
    import trainables.evaluation.evaluate as evaluate_module

    decoded, decode = [], datasets_module.open_rgb

    def counted(path):
        decoded.append(str(path))
        if refuse:
            raise AssertionError(f"{path} decoded before the check")
        return decode(path)

    monkeypatch.setattr(datasets_module, "open_rgb", counted)
    monkeypatch.setattr(evaluate_module, "open_rgb", counted)
    return decoded


def _damaged_weights(tmp_path, var_path):
    import torch

    state = torch.load(var_path, weights_only=True)
    state["head.bias"] += 1.0
    torch.save(state, var_path)  # the sidecar still records the saved file's SHA-256
    return {}, [str(var_path), "SHA-256"], []


def _var_as_inception(tmp_path, var_path):
    """A loadable checkpoint of another model: torch-fidelity's error listed every key (17,584 characters)."""
    change = {"--extractor": "inception-v3-compat", "--inception-weights": var_path}
    needles = [f"{var_path} is not an Inception-v3 state dict", "472 missing keys: Conv2d_1a_3x3.conv.weight"]
    return change, needles + ["unexpected keys: pos_start", "more)"], []


def _junk_as_inception(tmp_path, var_path):
    (tmp_path / "junk.pth").write_bytes(b"not weights")
    change = {"--extractor": "inception-v3-compat", "--inception-weights": tmp_path / "junk.pth"}
    needles = [f"{tmp_path / 'junk.pth'} is not a readable Inception-v3 state dict", "weights-only unpickler"]
    return change, needles, ["weights_only"]  # not torch's advice to load it with weights_only=False


@pytest.mark.parametrize(
    "case", [_damaged_weights, _var_as_inception, _junk_as_inception], ids=["sha-256", "inception", "junk"]
)
def test_the_command_checks_model_and_extractor_files_before_decoding_an_image(
    case, tiny_var, tiny_vqvae, split, tmp_path, capsys, monkeypatch
):
    """The split was decoded whole before the extractor's weights and the checkpoint's SHA-256 were checked."""
    var_path, vqvae_path = (
        save_var(tiny_var, tmp_path / "var.pth"),
        save_vqvae(tiny_vqvae, tmp_path / "q.pth"),
    )
    change, needles, absent = case(tmp_path, var_path)
    decoded = _count_decodes(monkeypatch, refuse=True)
    assert (
        main(_command(tmp_path, var_path, vqvae_path, root=tmp_path / "data", split="train", **change)) == 2
    )
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert decoded == [] and last.startswith("error: ") and len(last) < 600, last
    assert all(needle in last for needle in needles) and not any(word in last for word in absent), last


@pytest.mark.parametrize("seed", [2**31, -1])
def test_the_command_refuses_a_seed_out_of_range_before_any_work(seed, saved_models, tmp_path, capsys):
    """A seed from about 1.8e13 overflowed torch's seed at the first batch, after the reference statistics."""
    base_path, vqvae_path = saved_models
    make_folder(tmp_path / "data")
    argv = _command(
        tmp_path, base_path, vqvae_path, root=tmp_path / "data", split="train", **{"--seed": seed}
    )
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--sampling-seed/--seed" in last and f"'{seed}'" in last and "[0, 2147483647]" in last, last
    assert not (tmp_path / "ref").exists() and not (tmp_path / "eval").exists()  # nothing computed


def test_generate_refuses_a_seed_out_of_range_and_draws_at_the_largest(tiny_var, tiny_vqvae, tmp_path):
    import dataclasses

    from bench.schema import MAX_SEED
    from trainables.evaluation.generate import generate

    largest = dataclasses.replace(EVALUATION, sampling_seed=MAX_SEED)
    images, _ = generate(tiny_var, tiny_vqvae, [1], evaluation=largest, autocast_bf16=False)
    assert images.shape[0] == 1
    beyond = dataclasses.replace(EVALUATION)
    object.__setattr__(beyond, "sampling_seed", 2**45)  # a config built past the schema's check
    with pytest.raises(
        ValueError, match=r"sampling seed 35184372088832 is out of range: .* \[0, 2147483647\]"
    ):
        generate(tiny_var, tiny_vqvae, [1], evaluation=beyond, autocast_bf16=False, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before the folder was claimed


def test_the_command_drops_unreadable_images_on_request_and_lists_them(
    tiny_var, tiny_vqvae, split, tmp_path, capsys
):
    var_path, vqvae_path = (
        save_var(tiny_var, tmp_path / "var.pth"),
        save_vqvae(tiny_vqvae, tmp_path / "q.pth"),
    )
    broken = tmp_path / "data" / "train" / "10" / "1.png"
    broken.write_bytes(b"not an image")
    jpeg(tmp_path / "data" / "train" / "10" / "3.jpg", seed=3)  # 5 readable images: enough to score
    argv = _command(tmp_path, var_path, vqvae_path, root=tmp_path / "data", split="train")
    assert main(argv) == 2
    assert "--skip-corrupt-images drops them" in capsys.readouterr().err.strip().splitlines()[-1]
    assert main([*argv, "--skip-corrupt-images"]) == 0
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["images_generated"] == 5 and len(result["skipped_images"]) == 1
    assert result["skipped_images"][0].startswith(f"{broken}: ")
    assert f"skipped an unreadable image: {broken}: " in capsys.readouterr().err


def _first_run(tiny_var, tiny_vqvae, tmp_path) -> list[str]:
    """The command's argv on the tiny models and the 5-image split, after a first run of it."""
    var_path, vqvae_path = (
        save_var(tiny_var, tmp_path / "var.pth"),
        save_vqvae(tiny_vqvae, tmp_path / "q.pth"),
    )
    argv = _command(tmp_path, var_path, vqvae_path, root=tmp_path / "data", split="train")
    assert main(argv) == 0
    return argv


def test_a_second_run_of_the_command_decodes_no_image(tiny_var, tiny_vqvae, split, tmp_path, monkeypatch):
    """The command decoded the whole split on every run; the sweep keeps the check's outcome in its cache."""
    argv = _first_run(tiny_var, tiny_vqvae, tmp_path)
    decoded = _count_decodes(monkeypatch)
    assert main(argv) == 0
    assert decoded == []  # the split's check and the reference statistics both read from --cache
    broken = tmp_path / "data" / "train" / "10" / "1.png"
    broken.write_bytes(b"not an image")  # a changed file changes the key: the split is checked again
    assert main(argv) == 2 and len(decoded) == 5


def test_a_failed_write_keeps_the_earlier_evaluation_json(tiny_var, tiny_vqvae, split, tmp_path, monkeypatch):
    """evaluation.json was written in place: a write that failed (a full disk) left a truncated file where the
    earlier result was."""
    from pathlib import Path

    argv = _first_run(tiny_var, tiny_vqvae, tmp_path)
    written = (tmp_path / "eval" / "evaluation.json").read_text()
    write_text = Path.write_text

    def full_disk(self, data, *args, **kwargs):
        if "evaluation.json" not in self.name:
            return write_text(self, data, *args, **kwargs)
        write_text(self, data[: len(data) // 3], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    assert main(argv) == 2
    assert (tmp_path / "eval" / "evaluation.json").read_text() == written
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["evaluation.json", "images"]
