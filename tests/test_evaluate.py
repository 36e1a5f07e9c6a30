"""The evaluation pipeline end to end on tiny models and a fake folder dataset, and its standalone command."""
from __future__ import annotations

import json

import pytest

from test_datasets import make_folder
from trainables.data.datasets import read_dataset
from trainables.evaluation.evaluate import EvaluationSettings, evaluate, main
from trainables.evaluation.generate import SamplingSettings
from trainables.evaluation.metrics import ReferenceStats
from trainables.models.checkpoints import save_var, save_vqvae

SAMPLING = SamplingSettings(cfg=1.0, top_k=0, top_p=0.0, batch_size=4, seed=0)
SETTINGS = EvaluationSettings(resolution=16, kid_subsets=5, kid_subset_size=4)


@pytest.fixture
def split(tmp_path):
    make_folder(tmp_path / "data")
    return read_dataset("folder", tmp_path / "data", "train")  # 5 images: class "10" x3, class "2" x2


def test_evaluate_generates_per_class_and_reuses_reference_statistics(tiny_var, tiny_vqvae, split, tmp_path):
    cache = ReferenceStats(tmp_path / "reference")
    first = evaluate(tiny_var, tiny_vqvae, split, settings=SETTINGS, sampling=SAMPLING, cache=cache)
    assert first["plan"] == [3, 2] and first["images_generated"] == 5 and not first["reference_cache_hit"]
    assert set(first["metrics"]) == {"fid", "precision", "recall", "kid_mean", "kid_std"} and first["metrics"]["fid"] > 0
    assert first["evaluation_settings"]["extractor"] == "substitute-randconv-v1" and first["sampling"]["seed"] == 0
    assert first["compute"]["sample_flops_per_image"] > 0 and first["compute"]["sample_pflops"] == pytest.approx(
        5 * first["compute"]["sample_flops_per_image"] / 1e15)
    second = evaluate(tiny_var, tiny_vqvae, split, settings=SETTINGS, sampling=SAMPLING, cache=cache, out_dir=tmp_path / "images")
    assert second["reference_cache_hit"] and second["metrics"] == first["metrics"]  # PNGs are lossless


def test_resolution_mismatch_is_refused(tiny_var, tiny_vqvae, split, tmp_path):
    with pytest.raises(ValueError, match="generates 16px images but the evaluation resolution is 32px"):
        evaluate(tiny_var, tiny_vqvae, split, settings=EvaluationSettings(resolution=32), sampling=SAMPLING, cache=ReferenceStats(tmp_path))


def test_standalone_command_on_saved_checkpoints(tiny_var, tiny_vqvae, split, tmp_path, capsys):
    var_path, vqvae_path = save_var(tiny_var, tmp_path / "var.pth"), save_vqvae(tiny_vqvae, tmp_path / "vqvae.pth")
    # --depth may be left out: the sidecar records the architecture (a different --depth is refused; see test_bad_inputs)
    assert main(["--var", str(var_path), "--vqvae", str(vqvae_path), "--dataset", "folder",
                 "--root", str(tmp_path / "data"), "--split", "train", "--extractor", "substitute-randconv-v1", "--resolution", "16",
                 "--cfg", "1.0", "--top-k", "0", "--top-p", "0", "--batch-size", "4", "--cache", str(tmp_path / "ref"),
                 "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert result["images_generated"] == 5 and len(list((tmp_path / "eval" / "images").rglob("*.png"))) == 5
    assert "fid" in json.loads(capsys.readouterr().out)
