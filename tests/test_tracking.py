"""Experiment tracking (``Launch(tracking=...)``, ``bench.tracking``): one small sweep (a non-DP and a DP trial on the
tiny base) tracked in MLflow's default store under the storage, read back with MLflow's own client, and its
relaunch, which adds no run (marked slow: with the tiny base, the digit classifier and the token cache built first
it takes ~2-4 minutes on 2 cores); a failed trial's run ends FAILED and an interrupted one is continued; bad
trackers, missing packages and a URI storage without ``--tracking-uri`` are refused before Ray starts."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import ray
from PIL import Image
from sweep_driver import tiny_trial

from bench.launcher import Launch, run_sweep, tracking_callbacks
from bench.preflight import SweepError
from bench.results import ResultStore
from bench.schema import PrivacyConfig, make_result
from bench.tracking import (
    MlflowTracker,
    check_tracking,
    describe,
    final_metrics,
    flat_params,
    open_tracker,
    step_metrics,
)

SWEEP = "tracked"
DP = PrivacyConfig(target_epsilon=4.0, sampling_rate=0.02, max_grad_norm=1.0)


def _configs():
    return [tiny_trial("full", steps=6), tiny_trial("lora", steps=6, privacy=DP)]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The sweep run twice with ``--tracking mlflow`` (the second time every trial is done), its console output,
    and MLflow's client on the default store."""
    root = tmp_path_factory.mktemp("tracked")
    launch = Launch(storage=str(root / "storage"), cache_dir=str(root / "cache"), tracking="mlflow")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            first = run_sweep(SWEEP, _configs(), launch, verbose=0)
            again = run_sweep(SWEEP, _configs(), launch, verbose=0)
    finally:
        ray.shutdown()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'storage' / 'mlflow.db'}")
    return {"launch": launch, "first": first, "again": again, "out": out.getvalue(), "client": client}


def _runs(client, sweep: str = SWEEP) -> dict:
    experiment = client.get_experiment_by_name(sweep)
    return {run.data.tags["trial_id"]: run for run in client.search_runs([experiment.experiment_id])}


@pytest.mark.slow
def test_each_trial_is_an_mlflow_run_with_params_metrics_and_artifacts(tracked):
    assert tracked["first"]["failed"] == 0 and tracked["first"]["ran"] == 2, tracked["out"][-3000:]
    client, storage = tracked["client"], Path(tracked["launch"].storage)
    runs = _runs(client)
    configs = {c.trial_id: c for c in _configs()}
    assert sorted(runs) == sorted(configs)
    for trial_id, run in runs.items():
        config, record = configs[trial_id], ResultStore(storage).read(trial_id)
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "success"
        assert run.data.tags["sweep"] == SWEEP and run.data.tags["method"] == config.method.name
        assert run.data.tags["dataset"] == "digits"
        assert (
            run.data.params["optimization.steps"] == "6"
            and run.data.params["method.name"] == config.method.name
        )
        assert run.data.params["resources.workers"] == "1"
        assert run.data.metrics["fid"] == pytest.approx(record["metrics"]["fid"])
        assert {"precision", "recall", "cost.train_pflops"} <= set(run.data.metrics)
        artifacts = {entry.path: entry for entry in client.list_artifacts(run.info.run_id)}
        assert (
            sorted(artifacts) == ["result.json", "sample_grid.png"] and artifacts["sample_grid.png"].file_size
        )
        folder = storage / "download" / trial_id
        folder.mkdir(parents=True)
        local = Path(client.download_artifacts(run.info.run_id, "result.json", str(folder)))
        assert json.loads(local.read_text()) == record
        with Image.open(client.download_artifacts(run.info.run_id, "sample_grid.png", str(folder))) as grid:
            assert grid.width > 300 and grid.height > 300  # 10 digit rows of generated beside real images
        # Artifacts sit beside the database, not in the driver's working folder.
        assert str(storage / "mlflow-artifacts") in run.info.artifact_uri


@pytest.mark.slow
def test_training_history_and_epsilon_spent_are_logged_per_step(tracked):
    client = tracked["client"]
    runs = _runs(client)
    full, dp = (
        next(run for run in runs.values() if run.data.tags["dp"] == flag) for flag in ("false", "true")
    )
    losses = client.get_metric_history(full.info.run_id, "loss")
    assert [m.step for m in sorted(losses, key=lambda m: m.step)] == [1, 2, 3, 4, 5, 6]
    spent = sorted(client.get_metric_history(dp.info.run_id, "epsilon_rdp"), key=lambda m: m.step)
    assert len(spent) >= 6 and spent[-1].value <= 4.0
    assert [m.value for m in spent] == sorted(m.value for m in spent)  # epsilon only grows
    assert dp.data.params["privacy.target_epsilon"] == "4.0" and full.data.params["privacy"] == "null"
    assert dp.data.metrics["privacy.epsilon_rdp"] == pytest.approx(spent[-1].value, rel=1e-3)


@pytest.mark.slow
def test_the_start_line_says_where_the_runs_are_and_a_relaunch_adds_none(tracked):
    storage = Path(tracked["launch"].storage)
    assert f"mlflow ui --backend-store-uri sqlite:///{storage / 'mlflow.db'}" in tracked["out"]
    assert tracked["again"]["ran"] == 0 and tracked["again"]["skipped"] == 2
    assert len(_runs(tracked["client"])) == 2
    assert "tracking stopped" not in tracked["out"]


def test_a_failed_trial_ends_failed_and_an_interrupted_one_is_continued(tmp_path):
    """The tracker alone (no Ray) on MLflow's default store of a storage: a trial whose result says failed, and one
    left running by a stopped sweep, whose relaunch continues the same run."""
    launch = _launch(tmp_path, tracking="mlflow")
    store = ResultStore(launch.storage)
    tracker = open_tracker("mlflow", sweep="failures", storage=launch.storage, tracking_uri=None)
    uri = f"sqlite:///{Path(launch.storage) / 'mlflow.db'}"
    assert isinstance(tracker, MlflowTracker) and tracker.uri == uri
    failing, stopped = tiny_trial("full", seed=7), tiny_trial("full", seed=8)
    tracker.start(failing)
    tracker.start(stopped)
    tracker.log_step(stopped.trial_id, {"step": 1, "loss": 2.5, "steps_total": 6, "eta_seconds": 3})
    tracker.log_step(failing.trial_id, {"step": 3, "checkpoint": True, "convergence_fid": 50.0})
    points = [{"step": 3, "fid": 50.0}, {"step": 6, "fid": 40.0}]  # the last one reached no checkpoint report
    store.write(
        make_result(failing, status="failed", error="RuntimeError: out of memory\nmore", convergence=points)
    )
    tracker.finish(failing.trial_id)
    tracker.close()
    runs = _runs(tracker.client, "failures")
    assert runs[failing.trial_id].info.status == "FAILED"
    assert runs[failing.trial_id].data.tags["error"] == "RuntimeError: out of memory"
    assert runs[failing.trial_id].data.tags["status"] == "failed"
    fids = tracker.client.get_metric_history(runs[failing.trial_id].info.run_id, "convergence_fid")
    assert sorted((m.step, m.value) for m in fids) == [(3, 50.0), (6, 40.0)]  # each point once
    assert [entry.path for entry in tracker.client.list_artifacts(runs[failing.trial_id].info.run_id)] == [
        "result.json"
    ]
    assert runs[stopped.trial_id].info.status == "KILLED"
    relaunched = MlflowTracker("failures", store=store, storage=launch.storage, uri=uri)
    relaunched.start(stopped)
    continued = relaunched.runs[stopped.trial_id]
    assert continued == runs[stopped.trial_id].info.run_id
    assert relaunched.client.get_run(continued).info.status == "RUNNING"
    assert [m.value for m in relaunched.client.get_metric_history(continued, "loss")] == [2.5]
    assert len(_runs(tracker.client, "failures")) == 2


# --- refused before anything runs ------------------------------------------------------------------------------
def _launch(tmp_path: Path, **changes) -> Launch:
    return Launch(storage=str(tmp_path / "storage"), cache_dir=str(tmp_path / "cache"), **changes)


def test_an_unknown_tracker_is_refused(tmp_path):
    with pytest.raises(SweepError, match="unknown tracker 'neptune'.*none, tensorboard, mlflow, wandb"):
        _launch(tmp_path, tracking="neptune")
    with pytest.raises(SweepError, match="unknown tracker 'MLflow'"):
        check_tracking("MLflow")
    assert _launch(tmp_path).tracking == "none" and _launch(tmp_path, tracking="mlflow").tracking_uri is None


@pytest.mark.parametrize(
    "tracking, blocked, named",
    [
        ("mlflow", "mlflow", "pip install mlflow"),
        ("mlflow", "sqlalchemy", r"pip install mlflow \(the full package; mlflow-skinny lacks sqlalchemy"),
        ("wandb", "wandb", "pip install wandb"),
        ("tensorboard", "tensorboardX", "pip install tensorboardX"),
    ],
)
def test_a_tracker_whose_package_is_missing_is_refused_before_ray_starts(
    tmp_path, monkeypatch, tracking, blocked, named
):
    """A None entry in ``sys.modules`` is Python's way to make a package unimportable (``find_spec`` -> None)."""
    monkeypatch.setitem(sys.modules, blocked, None)
    launch = _launch(tmp_path, tracking=tracking)
    with pytest.raises(SweepError, match=f"--tracking {tracking} needs {blocked}.*{named}"):
        run_sweep("refused", [tiny_trial()], launch)
    assert not ray.is_initialized() and not Path(launch.storage).exists()


def test_a_uri_storage_needs_an_explicit_tracking_uri(tmp_path):
    with pytest.raises(
        SweepError, match="--tracking mlflow on the URI storage s3://bucket/runs needs --tracking-uri"
    ):
        Launch(storage="s3://bucket/runs", cache_dir=str(tmp_path), tracking="mlflow")
    with pytest.raises(SweepError, match="--tracking wandb on the URI storage"):
        Launch(storage="s3://bucket/runs", cache_dir=str(tmp_path), tracking="wandb")
    given = Launch(
        storage="s3://bucket/runs",
        cache_dir=str(tmp_path),
        tracking="mlflow",
        tracking_uri="http://mlflow:5000",
    )
    assert given.tracking_uri == "http://mlflow:5000"
    for named in ("databricks", "databricks-uc"):  # MLflow's names, not folders of the working directory
        assert _launch(tmp_path, tracking="mlflow", tracking_uri=named).tracking_uri == named
    assert (
        Launch(storage="s3://bucket/runs", cache_dir=str(tmp_path), tracking="tensorboard").tracking
        == "tensorboard"
    )


def test_a_tracking_uri_is_refused_where_it_means_nothing(tmp_path):
    with pytest.raises(
        SweepError, match="--tracking-uri .* is for --tracking mlflow or wandb, not --tracking none"
    ):
        _launch(tmp_path, tracking_uri="sqlite:///x.db")
    with pytest.raises(SweepError, match="not --tracking tensorboard"):
        _launch(tmp_path, tracking="tensorboard", tracking_uri="tb")
    with pytest.raises(SweepError, match="--tracking-uri must be a URI or a folder"):
        _launch(tmp_path, tracking="mlflow", tracking_uri="  ")
    local = _launch(tmp_path, tracking="wandb", tracking_uri="relative/wandb")
    assert local.tracking_uri == str(Path("relative/wandb").resolve())  # made absolute in the driver
    assert Launch(**local.__dict__) == local  # as a trial process rebuilds it


# --- what a run holds ------------------------------------------------------------------------------------------
def test_params_are_dotted_and_step_metrics_leave_bookkeeping_out():
    config = tiny_trial("lora", privacy=DP)
    params = flat_params(config)
    assert params["privacy.target_epsilon"] == "4.0" and params["data.dataset"] == "digits"
    assert params["method.lora_targets"] == "null" and params["model.base"] == "tiny"
    assert all("." in key for key in params)
    step, metrics = step_metrics(
        {
            "step": 3,
            "loss": 1.5,
            "lr": 1e-3,
            "steps_total": 6,
            "eta_seconds": 4,
            "training_iteration": 3,
            "pid": 1,
        }
    )
    assert step == 3 and metrics == {"loss": 1.5, "lr": 1e-3}
    assert step_metrics({"step": 6, "checkpoint": True, "convergence_fid": 40.0})[1] == {
        "convergence_fid": 40.0
    }
    assert (
        step_metrics({"finished": 1, "fid": 3.0, "step": 6}) is None and step_metrics({"loss": 1.0}) is None
    )
    record = {
        "metrics": {"fid": 3.0, "class_accuracy_per_class": [0.1]},
        "privacy": {"epsilon_rdp": 3.9, "clipping": "x"},
    }
    assert final_metrics(record) == {"fid": 3.0, "privacy.epsilon_rdp": 3.9}


def test_tensorboard_is_tunes_own_logger_and_the_start_line_says_how_to_open_it(tmp_path):
    launch = _launch(tmp_path, tracking="tensorboard")
    (callback,) = tracking_callbacks(launch, None)
    assert type(callback).__name__ == "TBXLoggerCallback"
    line = describe("tensorboard", sweep="demo", target=f"{launch.storage}/tune")
    assert (
        f"tensorboard --logdir {launch.storage}/tune" in line
        and f"{launch.storage}/tune/demo/<trial>/" in line
    )
    assert tracking_callbacks(_launch(tmp_path), None) == []


def test_wandb_runs_offline_without_an_account(tmp_path, monkeypatch):
    """W&B in offline mode, no API key, no network (HOME emptied so no saved login is found): the trial's run folder
    appears under the storage holding its step metrics, tags and the result artifact."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    launch = _launch(tmp_path, tracking="wandb")
    store = ResultStore(launch.storage)
    tracker = open_tracker("wandb", sweep="offline", storage=launch.storage, tracking_uri=None)
    config = tiny_trial("full", seed=5)
    tracker.start(config)
    for step in (1, 2, 3):
        tracker.log_step(config.trial_id, {"step": step, "loss": 3.0 - step / 10, "eta_seconds": 1})
    store.write(make_result(config, status="failed", error="RuntimeError: boom"))
    tracker.finish(config.trial_id)
    tracker.close()
    (run_file,) = (Path(launch.storage) / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")
    content = run_file.read_bytes()
    assert b"loss" in content and f"trial_id:{config.trial_id}".encode() in content
    assert b"result.json" in content and b"eta_seconds" not in content
    assert describe("wandb", sweep="offline", target=str(Path(launch.storage) / "wandb")).endswith(
        f"wandb sync {launch.storage}/wandb/wandb/offline-run-*"
    )
