"""The front door, run the way a user runs it: the real command line in a subprocess, from a working folder of its
own, with *relative* ``--storage`` and ``--cache-dir`` (Ray runs trials and workers in folders of its own, so a
relative path that reached them would strand every result). A ``--smoke`` sweep tracked in MLflow, its relaunch,
``bench status``, ``bench demo --smoke`` (what CI runs) and the smoke privacy audit's memorising pair with its
analysis share one module-scoped folder and cache: the tiny base and the digit classifier are built once for all of
them. Last, the cache folder is deleted: every result and sample image is in the storage, so the analysis still
draws every trial's grid."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from bench.__main__ import select
from bench.roc import roc_vertices
from bench.sweeps import build_sweep

STORAGE = "runs/ci"  # relative to the working folder, as a user types it
CACHE = "runs/ci/cache"
SWEEP = (
    "sweep",
    "convergence",
    "--smoke",
    "--where",
    "method.name=lora",
)  # one trial of the grid: checkpoints, convergence


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("user")


def bench(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    env.pop("VARSWEEP_CACHE", None)
    return subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _trial_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("train/trial-*") if p.is_dir())


@pytest.fixture(scope="module")
def smoke_sweep(workdir):
    """The sweep and its relaunch, both tracked in MLflow's default store under the storage (``--tracking``)."""
    first = bench(*SWEEP, "--storage", STORAGE, "--cache-dir", CACHE, "--tracking", "mlflow", cwd=workdir)
    again = bench(*SWEEP, "--storage", STORAGE, "--cache-dir", CACHE, "--tracking", "mlflow", cwd=workdir)
    return first, again


def test_relative_paths_land_under_the_working_folder(smoke_sweep, workdir):
    first, _ = smoke_sweep
    assert first.returncode == 0, first.stderr[-3000:]
    configs = [c for c in build_sweep("convergence", smoke=True) if c.method.name == "lora"]
    assert len(configs) == 1
    storage = workdir / STORAGE
    for config in configs:
        record = json.loads((storage / "results" / f"{config.trial_id}.json").read_text())
        assert record["status"] == "success" and record["metrics"]["class_accuracy"] is not None
        # The trial's files are in the storage, named relative to it; the cache holds nothing of the trial's own.
        artifacts = record["artifacts"]
        assert (
            artifacts["folder"] == f"artifacts/{config.trial_id}"
            and (storage / artifacts["adapter"]).is_file()
        )
        assert list((storage / artifacts["generated_images"]).glob("class_*/*.png"))
        assert all(
            (storage / path).is_file() for entry in artifacts["real_images"] for path in entry["paths"]
        )
    assert not (workdir / CACHE / "work").exists() and not (workdir / CACHE / "staging").exists()
    # Checkpoints (every 3 of 6 steps), Tune's state and every shared cache are in the user's folder.
    assert len(_trial_folders(storage)) == len(configs) and all(
        list(p.glob("step_*")) for p in _trial_folders(storage)
    )
    assert (storage / "tune").is_dir()
    cache = workdir / CACHE
    assert (
        len(list((cache / "tiny-base").glob("d2-*/var.pth"))) == 1
        and len(list((cache / "tiny-base").glob("vqvae-*/vqvae.pth"))) == 1
    )
    assert len(list((cache / "digits-classifier").glob("*/weights.pt"))) == 1 and list(
        (cache / "token-cache").iterdir()
    )
    # Built once, by the driver, before the trials: one build message each, and no trial rebuilt them.
    assert (
        first.stdout.count("building once into") == 1 and first.stdout.count("of the digits test split") == 1
    )
    assert first.stdout.count("tokenising 1438 images") == 1
    # The summary's wall time holds that building, which the progress lines (from the trials' start) do not.
    summary = (
        r"1 trials finished, 0 failed, 0 skipped, [0-9hms ]+ \([0-9hms ]+ of it preparing shared caches\)"
    )
    assert re.search(summary, first.stdout), first.stdout[-1000:]


def test_console_is_one_progress_line_per_change_without_ray_noise(smoke_sweep):
    first, _ = smoke_sweep
    out = first.stdout + first.stderr
    assert "Reporting training result" not in out and "Traceback" not in out
    assert "sweep convergence-smoke: 1 done, 0 running, 0 failed, 0 pending of 1" in first.stdout
    assert "ETA" in first.stdout and "[tiny base d2] VQVAE step" in first.stdout
    lines = [line for line in out.splitlines() if line.strip()]
    repeated = {line for line in lines if lines.count(line) > 1 and "sweep convergence-smoke" not in line}
    assert not repeated, sorted(repeated)[:5]


def test_relaunch_skips_every_finished_trial_and_status_reads_them(smoke_sweep, workdir):
    _, again = smoke_sweep
    assert again.returncode == 0 and "every trial (1) already has its result" in again.stdout
    status = bench("status", *SWEEP[1:], "--storage", STORAGE, cwd=workdir)
    assert status.returncode == 0 and "1 success of 1 trials" in status.stdout


def test_a_trial_the_local_ray_cannot_place_is_refused_not_left_waiting(smoke_sweep, workdir):
    """More workers than this machine has CPUs: a local Ray has no autoscaler, so the trial would wait forever."""
    workers = len(os.sched_getaffinity(0)) + 1
    run = bench(
        *SWEEP,
        "--workers",
        str(workers),
        "--storage",
        "runs/too-big",
        "--cache-dir",
        CACHE,
        cwd=workdir,
        timeout=300,
    )
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert (
        last.startswith("error: trial ")
        and f"needs {workers} worker(s) x 0 GPU + 1 CPU; the running Ray cluster" in last
    )
    assert not list((workdir / "runs" / "too-big" / "results").glob("*.json"))


DIVERGING = """
name: diverging
base:
  model: {base: tiny, depth: 2, tiny_pretraining_steps: 150}
  data: {dataset: digits, resolution: 16}
  method: {name: full}
  optimization: {learning_rate: 1.0e+4, steps: 4, batch_size: 16, global_clip_norm: null}
  evaluation: {extractor: digits-cnn-v2, num_images: 20, batch_size: 20, top_k: 0}
  resources: {workers: 1, gpus_per_worker: 0, cpus_per_worker: 1, checkpoint_every_steps: 2, max_failures: 2}
axes:
  optimization.seed: [0]
"""


def test_a_diverging_trial_fails_once_naming_its_divergence_not_retried(smoke_sweep, workdir):
    """A retry resumes from the last checkpoint with the same settings and diverges again: the workers record the
    failure and end the run (Train would have retried it max_failures times, and the record named Train's error)."""
    (workdir / "diverging.yaml").write_text(DIVERGING)
    run = bench("sweep", "diverging.yaml", "--storage", "runs/diverging", "--cache-dir", CACHE, cwd=workdir)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stdout[-3000:] + run.stderr[-3000:]
    (path,) = (workdir / "runs" / "diverging" / "results").glob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "failed" and record["error"].startswith("TrainingDiverged: training diverged")
    assert "lower optimization.learning_rate" in record["error"]
    assert run.stdout.count("failed, not retried") == 1 and "resuming from the checkpoint" not in run.stdout


def test_the_sweep_is_tracked_in_mlflow_and_read_back_with_its_client(smoke_sweep, workdir):
    """One MLflow run per trial, read with MLflow's own client: the config as params, tags, the training loss per
    step, the final metrics, the result JSON and sample grid as artifacts; the relaunch adds no run."""
    from mlflow.tracking import MlflowClient

    first, again = smoke_sweep
    storage = (workdir / STORAGE).resolve()
    database = f"sqlite:///{storage / 'mlflow.db'}"
    assert f"mlflow ui --backend-store-uri {database}" in first.stdout
    client = MlflowClient(tracking_uri=database)
    experiment = client.get_experiment_by_name("convergence-smoke")
    (run,) = client.search_runs([experiment.experiment_id])  # the relaunch ran nothing and opened no run
    (config,) = [c for c in build_sweep("convergence", smoke=True) if c.method.name == "lora"]
    record = json.loads((storage / "results" / f"{config.trial_id}.json").read_text())
    assert run.info.status == "FINISHED" and run.data.tags["trial_id"] == config.trial_id
    assert run.data.params["method.name"] == "lora" and run.data.params["data.dataset"] == "digits"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, config.optimization.steps + 1))
    assert run.data.metrics["fid"] == pytest.approx(record["metrics"]["fid"])
    artifacts = sorted(entry.path for entry in client.list_artifacts(run.info.run_id))
    assert artifacts == ["result.json", "sample_grid.png"]


@pytest.fixture(scope="module")
def demo(smoke_sweep, workdir) -> subprocess.CompletedProcess:
    return bench("demo", "--smoke", "--storage", STORAGE, cwd=workdir)


def test_demo_smoke_from_a_relative_storage(demo, workdir):
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    storage = workdir / STORAGE
    assert len(list((storage / "results").glob("*.json"))) == 1 + 5
    assert (storage / "analysis" / "index.html").is_file() and len(
        list((storage / "analysis" / "grids").glob("*.png"))
    ) == 5
    assert "Traceback" not in demo.stdout + demo.stderr and "class accuracy" in demo.stdout
    # The demo shares the sweep's cache folder (STORAGE/cache): nothing was built a second time.
    assert "of the digits test split" not in demo.stdout and "VQVAE step" not in demo.stdout
    # A DP trial's training checkpoints are deleted once its result is written; the others keep theirs for resuming.
    records = [json.loads(path.read_text()) for path in (storage / "results").glob("*.json")]
    dp = {r["trial_id"] for r in records if r["privacy"] is not None}
    assert len(dp) == 2 and all(
        (storage / r["artifacts"]["adapter"]).is_file() for r in records if r["trial_id"] in dp
    )
    kept = {p.name.removeprefix("trial-") for p in _trial_folders(storage)}
    trained = {r["trial_id"] for r in records if r["history"] and r["privacy"] is None}
    assert (
        not dp & kept
        and len(trained) == 3
        and all(list((storage / "train" / f"trial-{i}").glob("step_*")) for i in trained)
    )


AUDIT_STORAGE = "runs/audit"
# The smoke audit's memorising pair: full fine-tuning without DP and at epsilon 8 (~2.5 min through Ray on 2 cores).
# Its five short LoRA trials (~3 min more) run the same audit code, audited in-process by tests/test_audit.py
# (DP with k = 2 views included); the slow test below runs them through Ray too.
MEMORISING = "method.name=full"


def audit(workdir: Path, *where: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """The smoke privacy audit (issue 18; its trials matching ``where``) through Ray, then the analysis of its
    storage, both from the command line; it shares the cache (tiny base, classifier, digits tokens) with the
    sweeps before it."""
    selection = [arg for condition in where for arg in ("--where", condition)]
    sweep = bench(
        "sweep",
        "privacy_audit",
        "--smoke",
        *selection,
        "--storage",
        AUDIT_STORAGE,
        "--cache-dir",
        CACHE,
        cwd=workdir,
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    analysis = subprocess.run(
        [sys.executable, "-m", "analysis", AUDIT_STORAGE, "--out", f"{AUDIT_STORAGE}/analysis"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return sweep, analysis


def check_audit(runs: tuple[subprocess.CompletedProcess, ...], workdir: Path, configs: list) -> list[dict]:
    """Every audited trial of ``configs`` succeeded within its claim, its ROC area is the AUC it recorded, and the
    analysis drew the audit's table (its rows returned) and figures."""
    for run in runs:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    storage = workdir / AUDIT_STORAGE
    records = {c: json.loads((storage / "results" / f"{c.trial_id}.json").read_text()) for c in configs}
    assert all(r["status"] == "success" and r["audit"]["canaries"] == 200 for r in records.values())
    for config, record in records.items():
        section = record["audit"]
        if config.privacy is None:
            expected = (
                0.5 if config.method.name == "full" else 0.0
            )  # LoRA's 24 steps memorise nothing to speak of
            assert section["epsilon_lower_bound"] >= expected and section["mechanism"] == "none", section
        else:
            assert (
                section["epsilon_lower_bound"] <= section["claimed_epsilon"] <= config.privacy.target_epsilon
            )
        # The analysis's ROC curve is the trial's: its area is the AUC the trial recorded.
        fpr, tpr = roc_vertices(section["scores"], section["included_mask"])
        assert np.trapezoid(tpr, fpr) == pytest.approx(section["auc"], abs=1e-12)
    out = storage / "analysis"
    with open(out / "tables" / "privacy_audit.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(configs)
    assert all(float(r["runs_above_claim"]) == 0 for r in rows if r["epsilon"] != "no DP"), rows
    page = (out / "index.html").read_text()
    for figure in ("privacy_audit", "privacy_audit_roc"):
        assert (out / "figures" / f"{figure}.png").stat().st_size > 5000 and f"figures/{figure}.png" in page
    assert "tables/privacy_audit.csv" in page
    return rows


@pytest.fixture(scope="module")
def audit_pair(demo, workdir) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    return audit(workdir, MEMORISING)


@pytest.mark.timeout(1800)  # the fixture's sweep (~2.5 min on 2 cores) and analysis count against this test
def test_the_smoke_privacy_audit_sees_memorisation_and_dp_stays_within_its_claim(audit_pair, workdir):
    """Measured while writing it: the memorising full fine-tuning without DP bounds epsilon by 1.17-1.99 (audit
    seeds 0-2, two training seeds); at epsilon 8, by 0."""
    configs = select(build_sweep("privacy_audit", smoke=True), [MEMORISING], sweep="privacy_audit")
    assert len(configs) == 2
    rows = check_audit(audit_pair, workdir, configs)
    memorising = next(r for r in rows if r["method"] == "FFT" and r["epsilon"] == "no DP")
    assert float(memorising["epsilon_lower_bound_max"]) >= 0.5 and float(memorising["auc"]) > 0.6


@pytest.mark.slow  # ~3 min more on 2 cores: the smoke audit's five LoRA trials
@pytest.mark.timeout(1800)
def test_the_whole_smoke_privacy_audit_runs_after_its_pair_and_no_dp_run_exceeds_its_claim(
    audit_pair, workdir
):
    """The whole smoke sweep relaunched on the pair's storage: the pair is skipped, the LoRA trials (without DP,
    and at epsilon 1 and 8 with k = 1 and 4) run, and every DP run stays within its claim (each was bounded by 0
    when this was written)."""
    again = audit(workdir)
    assert "5 trials finished, 0 failed, 2 skipped" in again[0].stdout, again[0].stdout[-3000:]
    check_audit(again, workdir, build_sweep("privacy_audit", smoke=True))


def test_clearing_the_cache_keeps_every_result_and_sample_image(demo, workdir):
    storage = workdir / STORAGE
    shutil.rmtree(workdir / CACHE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The demo's trials (the sweep's LoRA trial is another setting in the same table cell, which analysis refuses to mix).
    after = subprocess.run(
        [
            sys.executable,
            "-m",
            "analysis",
            STORAGE,
            "--out",
            "after",
            "--no-figures",
            "--where",
            "data.cached_views=2",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert after.returncode == 0, after.stdout[-2000:] + after.stderr[-2000:]
    assert "5 sample grids" in after.stdout and "not found" not in after.stdout
    assert (
        len(list((workdir / "after" / "grids").glob("*.png"))) == 5
        and len(list((storage / "results").glob("*.json"))) == 6
    )


def test_the_queue_actor_s_teardown_traceback_stays_off_the_console():
    """Ray stops the queue actor that carries Train's reports to Tune with SIGTERM, which may print a SystemExit
    traceback under "(_QueueActor pid=...)" (seen once in a fresh clone's demo). The driver's log handler drops that
    actor's stderr and passes everything else: its stdout, every other process's stderr."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from bench.launcher import quiet_ray_internal_actors

    printed = []
    saved = list(dispatcher.handlers)
    dispatcher.handlers = [("ray_print_logs", printed.append)]
    try:
        assert quiet_ray_internal_actors()
        batches = [
            {"is_err": True, "actor_name": "_QueueActor", "pid": 1, "lines": ["Traceback", "SystemExit: 1"]},
            {"is_err": False, "actor_name": "_QueueActor", "pid": 1, "lines": ["a line"]},
            {"is_err": True, "actor_name": "RayTrainWorker", "pid": 2, "lines": ["Traceback", "ValueError"]},
            {"is_err": True, "task_name": "task", "pid": 3, "lines": ["an error"]},
        ]
        for data in batches:
            dispatcher.emit(data)
    finally:
        dispatcher.handlers = saved
    assert printed == batches[1:]
