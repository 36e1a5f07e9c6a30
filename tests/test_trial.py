"""One trial in a plain Python process (no Ray): result records, shared caches, resumable training, and sweeps that
fail before anything starts."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench.estimates import estimate
from bench.launcher import Launch, SweepError, check_sweep, run_sweep
from bench.results import ResultStore
from bench.schema import ConfigError, PrivacyConfig, check_result, replace
from bench.sweeps import build_sweep
from sweep_driver import tiny_trial
from trainables.data.datasets import DatasetError
from trainables.privacy import PrivacyConfigError
from trainables.trial import preflight, run_trial


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_run_trial_dp_then_base_share_caches(cache_dir, tmp_path):
    dp = PrivacyConfig(target_epsilon=2.0, sampling_rate=0.02, max_grad_norm=1.0, augmentation_multiplicity=2, physical_batch_rows=32)
    config = replace(tiny_trial("lora", steps=4), privacy=dp.__dict__, data={"cached_views": 2},
                     evaluation={"convergence_every_steps": 2, "convergence_num_images": 10})
    reports = []
    record = run_trial(config, cache_dir=cache_dir, work_dir=tmp_path / "dp", report=lambda metrics, state: reports.append((metrics, state)),
                       log=lambda line: None)
    assert check_result(record) == config and record["status"] == "success"
    assert record["privacy"]["epsilon_rdp"] <= 2.0 and record["privacy"]["steps"] == 4
    assert [c["step"] for c in record["convergence"]] == [2, 4] and all(c["fid"] > 0 for c in record["convergence"])
    assert record["data"]["train_images"] == 1438 and record["data"]["token_cache_hit"] is False
    assert record["evaluation_settings"]["extractor"] == "substitute-randconv-v1" and record["evaluation_settings"]["images_generated"] == 20
    # On digits every trial also scores what it draws with the digit classifier, whatever the FID extractor.
    metrics, classifier = record["metrics"], record["evaluation_settings"]["classifier"]
    assert 0 <= metrics["class_accuracy"] <= 1 and len(metrics["class_accuracy_per_class"]) == 10
    assert classifier["name"] == "digits-cnn-v1" and classifier["test_accuracy"] > 0.97 and len(classifier["weights_sha256"]) == 64
    assert metrics["kid_std"] > 0  # KID averages over subsets of half the images, which differ
    assert all("class_accuracy" in entry for entry in record["convergence"])
    assert record["cost"]["train_pflops"] > 0 and record["cost"]["rows_trained"] == 2 * sum(record["privacy"]["actual_batch_sizes"])
    assert record["cost"]["training_precision"] == "float32"  # bf16 autocast is asked for, but only CUDA runs use it
    assert record["parameters"]["trainable"] > record["parameters"]["trainable_without_class_embedding"] > 0
    assert (tmp_path / "dp" / "adapter.pt").is_file() and len(list((tmp_path / "dp" / "images").rglob("*.png"))) == 20
    artifacts = record["artifacts"]  # what the analysis's sample grids read
    assert Path(artifacts["generated_images"]) == (tmp_path / "dp" / "images").resolve()
    assert [(e["label"], e["class"]) for e in artifacts["real_images"]] == [(d, f"{d:02d}_{d}") for d in range(10)]  # every class
    assert all(len(e["paths"]) == 6 and all(Path(p).is_file() for p in e["paths"]) for e in artifacts["real_images"])
    checkpoints = [state for _, state in reports if state is not None]
    assert [s["step"] for s in checkpoints] == [2] and "loss" not in reports[0][0]  # DP logs no private statistics
    base = run_trial(replace(tiny_trial("base", steps=0), data={"cached_views": 2}), cache_dir=cache_dir, work_dir=tmp_path / "base", log=lambda line: None)
    assert base["data"]["token_cache_hit"] is True and base["evaluation_settings"]["reference_cache_hit"] is True
    assert base["parameters"]["trainable"] == 0 and base["history"] == [] and base["cost"]["train_pflops"] == 0


def test_preflight_names_the_problem(cache_dir, tmp_path):
    config = tiny_trial("lora")
    assert preflight(config, cache_dir).planned_steps == 6
    with pytest.raises(DatasetError, match="does not exist"):
        preflight(replace(config, data={"dataset": "cub200", "root": str(tmp_path / "missing")}), cache_dir)
    official = {"base": "official", "depth": 16, "var_checkpoint": str(tmp_path / "var_d16.pth"), "vqvae_checkpoint": "v.pth", "tiny_pretraining_steps": 0}
    with pytest.raises(ConfigError, match="model.var_checkpoint: no file"):
        preflight(replace(config, model=official, data={"resolution": 256}), cache_dir)
    with pytest.raises(PrivacyConfigError, match="delta"):
        preflight(replace(config, privacy={"target_epsilon": 1.0, "sampling_rate": 0.1, "max_grad_norm": 1.0, "delta": 0.01}), cache_dir)
    with pytest.raises(PrivacyConfigError, match="cannot reach epsilon"):
        preflight(replace(config, privacy={"target_epsilon": 1e-9, "sampling_rate": 1.0, "max_grad_norm": 1.0}, optimization={"steps": 10**6}), cache_dir)


def test_bad_sweep_fails_before_anything_starts(cache_dir, tmp_path):
    good = tiny_trial("full")
    bad = [replace(good, data={"dataset": "flowers102", "root": str(tmp_path / "no-flowers")}),
           replace(good, privacy={"target_epsilon": 1.0, "sampling_rate": 0.5, "max_grad_norm": 1.0, "delta": 0.5})]
    launch = Launch(storage=str(tmp_path / "storage"), cache_dir=str(cache_dir))
    with pytest.raises(SweepError) as raised:
        run_sweep("bad", [good, *bad], launch)
    message = str(raised.value)
    assert "2 of 3 trials cannot run" in message and "no-flowers" in message and "delta" in message
    assert ResultStore(launch.storage).all() == []


def test_dry_run_estimates_the_paper_grid(tmp_path):
    configs = build_sweep("table1")
    text = estimate(configs, done=set(), plans={})
    assert "30 of 30 trials to run" in text and "GPU hours" in text
    lora_food = next(line for line in text.splitlines() if line.startswith("lora-d16-food101"))
    assert int(lora_food.split()[-2]) == 1776  # 6 epochs x 75,750 images / batch 256
    with pytest.raises(SweepError, match="30 of 30 trials cannot run"):
        check_sweep(configs, cache_dir=str(tmp_path))
