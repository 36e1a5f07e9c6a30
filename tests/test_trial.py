"""One trial in a plain Python process (no Ray): result records, shared caches, resumable training, and sweeps that
fail before anything starts."""

from __future__ import annotations

import copy
import math
import re
import time
from pathlib import Path

import pytest
from sweep_driver import tiny_trial

from bench.estimates import estimate, evaluated_images
from bench.launcher import Launch, SweepError, check_sweep, run_sweep
from bench.results import ResultStore
from bench.schema import NON_DP_ONLY, ConfigError, PrivacyConfig, TrialConfig, check_result, replace
from bench.sweeps import build_sweep
from trainables import finetune as finetune_module
from trainables import privacy
from trainables import trial as trial_module
from trainables.data.datasets import DatasetError, check_images
from trainables.evaluation import evaluate as evaluate_module
from trainables.evaluation.generate import generate
from trainables.privacy import PrivacyConfigError, poisson_batch
from trainables.progress import Progress
from trainables.trial import Attempt, plan_trial, preflight, run_trial


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_run_trial_dp_then_base_share_caches(cache_dir, tmp_path, monkeypatch):
    dp = PrivacyConfig(
        target_epsilon=2.0,
        sampling_rate=0.02,
        max_grad_norm=1.0,
        augmentation_multiplicity=2,
    )
    config = replace(
        tiny_trial("lora", steps=4),
        privacy=dp.__dict__,
        method={"prior_weight": 0.05},
        data={"cached_views": 2},
        optimization=NON_DP_ONLY,
        evaluation={"convergence_every_steps": 2, "convergence_num_images": 10},
        # the convergence curve samples compiled beside book-keeping's hooks
        resources={"compile_sampling": True},
    )
    batch_sizes = []  # the actual Poisson batch sizes, seen by a spy on the real sampler

    def spy(*args, **kwargs):
        batch = poisson_batch(*args, **kwargs)
        batch_sizes.append(len(batch))
        return batch

    monkeypatch.setattr(privacy, "poisson_batch", spy)
    generated = []  # every image the trial draws, seen by a spy on the real generator

    def counted_generation(*args, **kwargs):
        drawn = generate(*args, **kwargs)
        generated.append(len(drawn[0]))
        return drawn

    monkeypatch.setattr(evaluate_module, "generate", counted_generation)
    # The trial plans once: sigma is calibrated and the steps counted by its preflight only (make_private takes the plan's sigma).
    calls = {"calibrations": 0, "planned_steps": 0}
    calibrate, planned_steps = privacy.calibrate_noise_multiplier, TrialConfig.planned_steps

    def counted_calibration(**kwargs):
        calls["calibrations"] += 1
        return calibrate(**kwargs)

    def counted_steps(self, train_images):
        calls["planned_steps"] += 1
        return planned_steps(self, train_images)

    monkeypatch.setattr(
        privacy, "calibrate_noise_multiplier", counted_calibration
    )  # trainables.plan imports it when it calibrates
    monkeypatch.setattr(TrialConfig, "planned_steps", counted_steps)
    reports, storage = [], tmp_path / "storage"
    # The record names the commit of the code the trial imported, not one made while it trained (the record's
    # environment was read after training).
    monkeypatch.setattr(
        trial_module, "_git_commit", lambda: "made while it ran" if reports else "at its start"
    )
    cache_before = {p.name for p in cache_dir.iterdir()}
    record = run_trial(
        config,
        cache_dir=cache_dir,
        artifacts_dir=storage / "artifacts" / config.trial_id,
        report=lambda metrics, state: reports.append((metrics, state)),
        log=lambda line: None,
    )
    assert calls == {"calibrations": 1, "planned_steps": 1}
    assert record["privacy"]["noise_multiplier"] == calibrate(
        target_epsilon=2.0, delta=1 / 1438, sampling_rate=0.02, steps=4
    )
    assert check_result(record) == config and record["status"] == "success"
    assert reports and record["environment"]["git_commit"] == "at its start"
    assert record["privacy"]["epsilon_rdp"] <= 2.0 and record["privacy"]["steps"] == 4
    assert [c["step"] for c in record["convergence"]] == [2, 4] and all(
        c["fid"] > 0 for c in record["convergence"]
    )
    assert record["data"]["train_images"] == 1438 and record["data"]["token_cache_hit"] is False
    assert (
        record["evaluation_settings"]["extractor"] == "substitute-randconv-v1"
        and record["evaluation_settings"]["images_generated"] == 20
        and record["evaluation_settings"]["sampling"]["compiled"] is True
    )
    # On digits every trial also scores what it draws with the digit classifier, whatever the FID extractor.
    metrics, classifier = record["metrics"], record["evaluation_settings"]["classifier"]
    assert 0 <= metrics["class_accuracy"] <= 1 and len(metrics["class_accuracy_per_class"]) == 10
    assert (
        classifier["name"] == "digits-cnn-v2"
        and classifier["test_accuracy"] > 0.97
        and len(classifier["weights_sha256"]) == 64
    )
    assert metrics["kid_std"] > 0  # KID averages over subsets of half the images, which differ
    assert all("class_accuracy" in entry for entry in record["convergence"])
    assert record["cost"]["train_pflops"] > 0 and record["cost"]["rows_trained"] == (
        4 * 2 * math.floor(0.02 * 1438)
    )  # at the expected batch floor(q N), not the actual ones
    assert len(batch_sizes) == 4 and len(set(batch_sizes)) > 1
    # the dry-run estimate prices the images the trial drew: 10 at each of the 2 points, then 20
    split = record["data"]["evaluation_images"]
    assert generated == [10, 10, 20] and sum(generated) == evaluated_images(
        config, evaluation_split=split, steps=4
    )
    assert not exact_batch_size_leaks(record, [metrics for metrics, _ in reports], batch_sizes, k=2)
    # The prior term's KL is computed from the model: the result's history holds it, the live reports do not (a
    # retried attempt takes the steps after its last checkpoint again, so their values are not released until then).
    assert all("prior_kl" in entry for entry in record["history"])
    assert [m["step"] for m, _ in reports if "epsilon_rdp" in m] and not any(
        "prior_kl" in m for m, _ in reports
    )
    assert (
        record["cost"]["training_precision"] == "float32"
    )  # bf16 autocast is asked for, but only CUDA runs use it
    assert record["parameters"]["trainable"] > record["parameters"]["trainable_without_class_embedding"] > 0
    # The trial's artifacts live in storage (artifacts/<trial id>/), named relative to its root; nothing of it in the cache.
    artifacts, folder = record["artifacts"], f"artifacts/{config.trial_id}"
    assert (
        artifacts["folder"],
        artifacts["adapter"],
        artifacts["peft_adapter"],
        artifacts["generated_images"],
    ) == (folder, f"{folder}/adapter.pt", f"{folder}/adapter-peft", f"{folder}/images")
    assert [(e["label"], e["class"]) for e in artifacts["real_images"]] == [
        (d, f"{d:02d}_{d}") for d in range(10)
    ]  # every class
    assert all(len(e["paths"]) == 6 for e in artifacts["real_images"])
    paths = [
        artifacts["adapter"],
        artifacts["peft_adapter"],
        artifacts["generated_images"],
        *(p for e in artifacts["real_images"] for p in e["paths"]),
    ]
    for path in paths:
        assert (
            not Path(path).is_absolute()
            and "\\" not in path
            and (storage / path).resolve().is_relative_to(storage.resolve())
        )
        assert (storage / path).exists(), path
    assert len(list((storage / artifacts["generated_images"]).rglob("*.png"))) == 20
    assert {p.name for p in cache_dir.iterdir()} - cache_before <= {
        "offline-data",
        "token-cache",
        "reference-stats",
        "tiny-base",
        "digits-classifier",
        "content-ids.json",
        "image-checks",
    }
    assert not list(cache_dir.rglob("adapter.pt")) and not (cache_dir / "work").exists()
    checkpoints = [state for _, state in reports if state is not None]
    # after the convergence evaluation at step 2 and after the final step
    assert [s["step"] for s in checkpoints] == [2, 4]
    assert "loss" not in reports[0][0]  # DP logs no private statistics
    base = run_trial(
        replace(tiny_trial("base", steps=0), data={"cached_views": 2}),
        cache_dir=cache_dir,
        artifacts_dir=tmp_path / "base",
        log=lambda line: None,
    )
    assert (
        base["data"]["token_cache_hit"] is True and base["evaluation_settings"]["reference_cache_hit"] is True
    )
    assert (
        base["parameters"]["trainable"] == 0 and base["history"] == [] and base["cost"]["train_pflops"] == 0
    )
    assert "compiled" not in base["evaluation_settings"]["sampling"]  # eager: the record as before the option
    assert base["artifacts"]["adapter"] is base["artifacts"]["peft_adapter"] is None
    assert not (tmp_path / "base" / "adapter.pt").exists()


def _numbers(value, path: str = ""):
    """(path, value) of every number in a record; list items share the path ``name[]``."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item, f"{path}[]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, float(value)


def _proportional(values: list[float], to: list[int]) -> bool:
    # Only the sizes the values are compared with count: two equal values beside two equal batch sizes reveal
    # nothing (a tiny model's class accuracy of 0.1 at both convergence points, when the first two Poisson batches
    # drew the same size, about 1 run in 20, was once taken for a leak).
    to = to[: len(values)]
    if len(values) < 2 or len(set(to)) < 2 or any(t == 0 for t in to):
        return False
    ratio = values[0] / to[0]
    return ratio != 0 and all(abs(v - ratio * t) <= 1e-9 * max(1.0, abs(v)) for v, t in zip(values, to))


def exact_batch_size_leaks(record: dict, metrics: list[dict], batch_sizes: list[int], *, k: int) -> list[str]:
    """Every place a DP trial's record or its Tune metrics reveal the exact Poisson batch sizes, unless the privacy
    ledger lists it as released without noise: a per-step series (history entries, reported metrics) or a list
    proportional to the batch sizes of those steps, or a number equal to their total (times k, times the FLOPs per
    row) or proportional to the running totals."""
    listed = {part.strip() for key in record["privacy"]["released_without_noise"] for part in key.split(",")}
    leaks, total, running = [], sum(batch_sizes), [sum(batch_sizes[: i + 1]) for i in range(len(batch_sizes))]
    for source, entries in (
        ("history[]", record["history"]),
        ("tune", [m for m in metrics if isinstance(m.get("step"), int)]),
    ):
        for key in sorted({key for entry in entries for key in entry} - {"step"}):
            if f"{source}.{key}" in listed:
                continue
            series = [
                (e["step"], e[key])
                for e in entries
                if isinstance(e.get(key), (int, float)) and not isinstance(e.get(key), bool)
            ]
            values = [float(v) for _, v in series]
            if _proportional(values, [batch_sizes[step - 1] for step, _ in series]) or _proportional(
                values, [running[step - 1] for step, _ in series]
            ):
                leaks.append(f"{source}.{key}: {values} follows the batch sizes {batch_sizes}")
    flops_per_row = record["cost"].get("train_flops_per_row") or 0.0
    totals = [total, total * k, total * k * flops_per_row / 1e15]
    # The config and the evaluation settings are fixed before any data is read, so a number in them cannot reveal
    # a batch; once, Poisson batches of 31+38+40+19 rows times k=2 equalled the config's batch_size of 256, and four
    # batches totalling 100 rows (about 1 run in 70) equal the evaluation's kid_subsets.
    settings = ("history", "config", "evaluation_settings")
    numbers = list(_numbers({key: value for key, value in record.items() if key not in settings}))
    for path in sorted({path for path, _ in numbers} - listed):
        values = [v for p, v in numbers if p == path]
        if _proportional(values, batch_sizes) or any(
            abs(v - t) <= 1e-9 * max(1.0, abs(t)) for v in values for t in totals if t
        ):
            leaks.append(f"{path}: {values} reveals the batch sizes {batch_sizes}")
    return leaks


def test_a_resumed_trial_s_record_covers_every_attempt(cache_dir, tmp_path, monkeypatch):
    """A resumed attempt's training figures come from the state (every attempt's steps), so its wall-clock
    seconds and GPU hours must too: the state carries the attempts' so far and the record adds them (each training
    step takes 0.5 s here, so this attempt's own wall time is below the 6 steps' training time); the record starts
    when the first attempt did. Its progress line rates only the steps it took. Another trial's state is refused
    naming both trial ids, before anything trains."""
    accumulate = finetune_module.accumulate_loss_gradients

    def slow_step(*args, **kwargs):
        time.sleep(0.5)
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "accumulate_loss_gradients", slow_step)
    starts: list[int] = []

    class RecordedProgress(Progress):
        def __init__(self, *args, **kwargs):
            starts.append(kwargs.get("start"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trial_module, "Progress", RecordedProgress)
    config, states = tiny_trial("lora", steps=6), []

    def keep(metrics: dict, state: dict | None) -> None:
        if state is not None:
            states.append(copy.deepcopy(state))

    first = run_trial(
        config,
        cache_dir=cache_dir,
        artifacts_dir=tmp_path / "first",
        report=keep,
        log=lambda line: None,
        startup_seconds=4.5,
    )
    assert [s["step"] for s in states][-2:] == [4, 6]  # the last mid-run state, then the final one
    mid = states[-2]
    carried = mid["attempts"]
    assert mid["identity"] == config.trial_id
    assert carried["count"] == 1 and carried["started_at"] == first["started_at"]
    assert 4 * 0.5 < carried["wall_seconds"] < first["cost"]["wall_seconds"] and carried["gpu_hours"] == 0
    resumed = run_trial(
        config,
        cache_dir=cache_dir,
        artifacts_dir=tmp_path / "resumed",
        resume=mid,
        log=lambda line: None,
        startup_seconds=600.0,  # from the launch: it includes the first attempt
    )
    cost = resumed["cost"]
    assert first["cost"]["startup_seconds"] == cost["startup_seconds"] == 4.5
    assert resumed["started_at"] == first["started_at"] and resumed["data"]["resumed_from_step"] == 4
    # the code of every attempt: an upgrade between attempts keeps the trial id
    assert carried["git_commits"] == [first["environment"]["git_commit"]]
    assert resumed["environment"]["earlier_git_commits"] == carried["git_commits"]
    assert "earlier_git_commits" not in first["environment"]
    assert cost["train_seconds"] > 6 * 0.5 and cost["wall_seconds"] > cost["train_seconds"]
    assert cost["wall_seconds"] > carried["wall_seconds"] + cost["setup_seconds"] + cost["evaluation_seconds"]
    assert starts == [0, 4]
    other = replace(config, optimization={"learning_rate": 5e-2, "seed": 7})
    with pytest.raises(
        ValueError, match=rf"saved by training '{config.trial_id}'.*this run is '{other.trial_id}'"
    ):
        run_trial(
            other,
            cache_dir=cache_dir,
            artifacts_dir=tmp_path / "other",
            resume=mid,
            log=lambda line: None,
        )


def test_an_attempt_adds_the_earlier_attempts_a_state_carries():
    """Each attempt's GPU hours are its own (a retry may run on another cluster shape); a state saved before states
    carried attempts counts its training seconds, a lower bound of its wall time."""
    carried = {
        "started_at": "2025-01-02T03:04:05+00:00",
        "count": 2,
        "wall_seconds": 7200.0,
        "gpu_hours": 8.0,
    }
    start = time.perf_counter() - 1800
    # This attempt's clock runs from the trial's launch, so it counts the earlier attempts: the first one's is kept.
    attempt = Attempt.begin(
        {"step": 4, "attempts": {**carried, "startup_seconds": 12.5}},
        gpus=2,
        clock_start=start,
        startup_seconds=9000.0,
    )
    assert attempt.number == 3 and attempt.started_at == carried["started_at"]
    assert 9000 <= attempt.wall_seconds() < 9060 and 9.0 <= attempt.gpu_hours() < 9.05
    assert attempt.carried()["count"] == 3 and attempt.carried()["startup_seconds"] == 12.5
    unknown = Attempt.begin(
        {"step": 4, "attempts": carried}, gpus=2, clock_start=start, startup_seconds=9000.0
    )
    assert unknown.startup_seconds is None  # a state saved before states carried it
    older = Attempt.begin(
        {"step": 4, "compute": {"train_seconds": 3600.0}}, gpus=4, clock_start=time.perf_counter()
    )
    assert older.number == 2 and 3600 <= older.wall_seconds() < 3660 and 4.0 <= older.gpu_hours() < 4.1
    fresh = Attempt.begin(None, gpus=1, clock_start=time.perf_counter(), startup_seconds=3.0)
    assert fresh.number == 1 and fresh.wall_seconds() < 60 and fresh.gpu_hours() < 0.02
    assert fresh.carried()["startup_seconds"] == 3.0


def test_preflight_names_the_problem(cache_dir, tmp_path):
    config = tiny_trial("lora")
    plan = preflight(config, cache_dir)
    assert (plan.planned_steps, plan.evaluation_steps, plan.noise_multiplier) == (6, (), None)
    assert plan_trial(config, plan.splits) == plan  # what another rank, listing the same files, plans
    with pytest.raises(DatasetError, match="does not exist"):
        preflight(replace(config, data={"dataset": "cub200", "root": str(tmp_path / "missing")}), cache_dir)
    official = {
        "base": "official",
        "depth": 16,
        "var_checkpoint": str(tmp_path / "var_d16.pth"),
        "vqvae_checkpoint": "v.pth",
        "tiny_pretraining_steps": 0,
    }
    with pytest.raises(ConfigError, match="model.var_checkpoint: no file"):
        preflight(replace(config, model=official, data={"resolution": 256}), cache_dir)
    with pytest.raises(PrivacyConfigError, match="delta"):
        preflight(
            replace(
                config,
                privacy={"target_epsilon": 1.0, "sampling_rate": 0.1, "max_grad_norm": 1.0, "delta": 0.01},
                optimization=NON_DP_ONLY,
            ),
            cache_dir,
        )
    # delta: None is the paper's 1/N; a sweep may set any delta below 1/N (the smoke keeps it), never one above.
    from bench.sweeps import table3

    small = table3.sweep(smoke=True, delta=1e-5)
    assert {c.privacy.delta for c in small} == {1e-5} and preflight(
        small[0], cache_dir
    ).noise_multiplier > preflight(table3.sweep(smoke=True)[0], cache_dir).noise_multiplier
    with pytest.raises(PrivacyConfigError, match=r"delta=0.002 >= 1/N"):
        preflight(table3.sweep(smoke=True, delta=0.002)[0], cache_dir)
    with pytest.raises(PrivacyConfigError, match="cannot reach epsilon"):
        preflight(
            replace(
                config,
                privacy={"target_epsilon": 1e-9, "sampling_rate": 1.0, "max_grad_norm": 1.0},
                optimization={**NON_DP_ONLY, "steps": 10**6},
            ),
            cache_dir,
        )


def test_bad_sweep_fails_before_anything_starts(cache_dir, tmp_path):
    good = tiny_trial("full")
    bad = [
        replace(good, data={"dataset": "flowers102", "root": str(tmp_path / "no-flowers")}),
        replace(
            good,
            privacy={"target_epsilon": 1.0, "sampling_rate": 0.5, "max_grad_norm": 1.0, "delta": 0.5},
            optimization=NON_DP_ONLY,
        ),
    ]
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
    steps, train_hours, images = re.search(r"rows/s +(\d+) +(\S+) +(\d+) ", lora_food).groups()
    assert int(steps) == 1776  # 6 epochs x 75,750 images / batch 256
    assert float(train_hours) > 0 and int(images) == 25250  # Food-101's test split, scored once
    with pytest.raises(SweepError, match="30 of 30 trials cannot run"):
        check_sweep(configs, cache_dir=str(tmp_path))


def test_an_evaluation_split_too_small_to_score_is_refused_before_compute(tmp_path, monkeypatch):
    """3 evaluation images passed every launch check, then the trial failed after training and generating:
    precision/recall (k=3) scores against at least 4 real images, whatever evaluation.num_images says. A DP
    trial is refused before its noise is calibrated (seconds at a large epsilon)."""
    from test_datasets import make_folder

    make_folder(tmp_path / "data")  # train: 5 images; test: 3
    config = replace(
        tiny_trial("lora"),
        data={"dataset": "folder", "root": str(tmp_path / "data"), "resolution": 16},
        evaluation={"num_images": 8},
        optimization={"batch_size": 2},
    )
    expected = r"data.dataset: folder's test split \(data.evaluation_split\) has 3 image\(s\)"
    with pytest.raises(ConfigError, match=expected):
        preflight(config, tmp_path / "cache")
    monkeypatch.setattr(privacy, "calibrate_noise_multiplier", lambda **_: pytest.fail("calibrated first"))
    dp = {"target_epsilon": 8.0, "sampling_rate": 0.5, "max_grad_norm": 1.0, "delta": 1e-3}
    with pytest.raises(ConfigError, match=expected):
        preflight(replace(config, privacy=dp, optimization=NON_DP_ONLY), tmp_path / "cache")


@pytest.mark.parametrize(
    "broken, expected",
    [
        ({"train/2/0.png", "train/10/0.png"}, r"batch_size: 4 is more than the 3 training examples"),
        # the skipped images were class 2's only training images: its test images would score an untrained class
        (
            {"train/2/0.png", "train/2/1.png"},
            r"1 class\(es\) of folder have images in the test split but none in the train split",
        ),
        ({"test/10/0.png"}, r"folder's test split \(data.evaluation_split\) has 3 image\(s\)"),
    ],
)
def test_skipped_corrupt_images_are_planned_out_before_compute(tmp_path, monkeypatch, broken, expected):
    """With data.skip_corrupt_images the driver's preflight plans from the listings; the planned steps, the batch
    check, delta and the evaluation-size check then counted images that would never train or be scored, and a
    split left too small failed after training. The sweep's decoding (``prepare_shared``) and the trial plan
    again for the images kept, and refuse before anything is built or loaded."""
    from test_datasets import jpeg, make_folder

    make_folder(tmp_path / "data")  # train: 5 images; test: 3, plus one more here
    jpeg(tmp_path / "data" / "test" / "2" / "1.png", seed=1)
    for name in broken:
        (tmp_path / "data" / name).write_bytes(b"not an image")
    config = replace(
        tiny_trial("lora"),
        data={
            "dataset": "folder",
            "root": str(tmp_path / "data"),
            "resolution": 16,
            "skip_corrupt_images": True,
        },
        evaluation={"num_images": 8},
        optimization={"batch_size": 4},
    )
    listed = preflight(config, tmp_path / "cache")
    assert (listed.train_images, listed.evaluation_images) == (5, 4)  # the listings pass
    named = (
        rf"{config.label} \({config.trial_id}\), {len(broken)} unreadable image\(s\) skipped: .*{expected}"
    )
    with pytest.raises(DatasetError, match=named):  # the trial named, as the driver's preflight names it
        trial_module.prepare_shared([config], tmp_path / "cache", log=None)
    loaded = []
    monkeypatch.setattr(trial_module, "load_base", lambda *a, **k: loaded.append(1))
    with pytest.raises(ConfigError, match=expected):
        run_trial(config, cache_dir=tmp_path / "cache", artifacts_dir=tmp_path / "artifacts")
    assert loaded == []
    kept = replace(config, optimization={"batch_size": 2, "epochs": 2, "steps": None})
    if "train/10/0.png" in broken:  # planned for the 3 images kept: 2 epochs of batch 2 are 3 steps, not 5
        assert preflight(kept, tmp_path / "cache").planned_steps == 5
        checked = tuple(check_images(split, skip_corrupt=True)[0] for split in listed.splits)
        assert plan_trial(kept, checked).planned_steps == 3
