"""Experiment tracking of a sweep's trials (``--tracking {none,tensorboard,mlflow,wandb}``): one tracker run per
trial with the trial's config as parameters (dotted names, ``privacy.target_epsilon``), tags (trial id, sweep,
method, dataset), the training metrics and the epsilon spent as the workers report them, the final metrics of the
trial's result, and as artifacts the result JSON and the trial's sample grid (generated beside real images).

- ``tensorboard``: Tune's own ``TBXLoggerCallback`` writes events under ``<storage>/tune/<sweep>/<trial>/``.
- ``mlflow``: an MLflow experiment named after the sweep; by default in a SQLite store beside the results
  (``sqlite:///<storage>/mlflow.db``, artifacts in ``<storage>/mlflow-artifacts/``): MLflow 3 refuses its old file
  store unless told otherwise and recommends a database; SQLite needs no server and works offline.
- ``wandb``: W&B runs in offline mode under ``<storage>/wandb/`` (no account, no network; ``wandb sync`` uploads
  them later).

Neither Ray nor a tracker's package is imported here at module level, so the command line and a dry run stay light:
``check_tracking`` only looks the packages up. The Tune callback that drives a ``Tracker`` lives in
``bench.launcher``, the one driver module that imports Ray. Every tracker call happens in the sweep's driver
process: a trial's workers never talk to the tracker (a SQLite store is written by one process)."""

from __future__ import annotations

import abc
import importlib.util
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .preflight import SweepError
from .results import ResultStore
from .schema import TrialConfig, is_uri, storage_child

TRACKERS = ("none", "tensorboard", "mlflow", "wandb")
# MLflow tracking URIs that are names, not paths (a Databricks workspace from the CLI's default profile).
MLFLOW_NAMED_TARGETS = ("databricks", "databricks-uc")
# What each tracker needs installed in the driver's environment (import names), and the command that installs it.
PACKAGES = {
    "tensorboard": (("tensorboardX",), "pip install tensorboardX tensorboard"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "wandb": (("wandb",), "pip install wandb"),
}
# MLflow's SQL stores (the default SQLite one included) need these; the full `mlflow` package brings them, its
# `mlflow-skinny` variant does not.
MLFLOW_SQL_PACKAGES = ("sqlalchemy", "alembic")
# Keys of a worker's progress report that are training metrics (the rest is bookkeeping: step, ETA, markers).
STEP_METRICS = ("loss", "grad_norm", "lr", "prior_kl", "epsilon_rdp", "seconds")
# A checkpoint report carries the latest convergence evaluation (small-sample FID, ...) under this prefix.
CONVERGENCE_PREFIX = "convergence_"
# Numeric sections of a result logged as final metrics: metrics under their own names, the others prefixed.
FINAL_SECTIONS = {"metrics": "", "privacy": "privacy.", "cost": "cost."}
RESULT_ARTIFACT, GRID_ARTIFACT = "result.json", "sample_grid.png"  # a run's artifacts, the same in every run
MLFLOW_BATCH = 100  # MLflow's limit on parameters per log_batch call
MLFLOW_STATUS = {"success": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}  # a run's end, by outcome


def check_tracking(tracking: str, *, tracking_uri: str | None = None) -> None:
    """Refuse an unknown tracker, or one whose package is not installed in this (the driver's) environment, naming
    the pip command; for MLflow on a SQL store (the default) also the SQL packages. Looks packages up without
    importing them."""
    if tracking not in TRACKERS:
        raise SweepError(f"unknown tracker {tracking!r}: --tracking takes one of {', '.join(TRACKERS)}")
    if tracking == "none":
        return
    modules, command = PACKAGES[tracking]
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing and tracking == "mlflow" and _sql_store(tracking_uri):
        missing = [name for name in MLFLOW_SQL_PACKAGES if importlib.util.find_spec(name) is None]
        command = f"{command} (the full package; mlflow-skinny lacks {' and '.join(MLFLOW_SQL_PACKAGES)})"
    if missing:
        raise SweepError(
            f"--tracking {tracking} needs {', '.join(missing)}, which is not installed here: {command}"
        )


def _sql_store(tracking_uri: str | None) -> bool:
    """Whether MLflow would open ``tracking_uri`` (None: the default SQLite store) through SQLAlchemy."""
    scheme = "sqlite" if tracking_uri is None else tracking_uri.partition("://")[0].partition("+")[0]
    return scheme in ("sqlite", "postgresql", "mysql", "mssql")


def check_target(tracking: str, *, storage: str, tracking_uri: str | None) -> None:
    """Refuse a tracking target that cannot work with this storage: the default MLflow store and W&B folder sit
    under a local storage, so a URI storage (s3://...) needs an explicit ``--tracking-uri``; ``--tracking-uri``
    means nothing to ``none`` and ``tensorboard`` (TensorBoard events always go with Tune's state)."""
    if tracking in ("none", "tensorboard"):
        if tracking_uri is not None:
            raise SweepError(
                f"--tracking-uri {tracking_uri} is for --tracking mlflow or wandb, not --tracking {tracking}"
            )
        return
    if tracking_uri is None and is_uri(storage):
        example = (
            "sqlite:///runs/mlflow.db or http://mlflow-server:5000" if tracking == "mlflow" else "wandb-runs"
        )
        raise SweepError(
            f"--tracking {tracking} on the URI storage {storage} needs --tracking-uri (e.g. {example}): its default "
            f"target is a local folder under the storage"
        )
    if tracking == "wandb" and tracking_uri is not None and is_uri(tracking_uri):
        raise SweepError(
            f"--tracking-uri for wandb is a local folder for its offline runs, got {tracking_uri}"
        )


def default_target(tracking: str, *, storage: str, tracking_uri: str | None) -> str | None:
    """Where the tracker writes: the MLflow tracking URI, the W&B folder, the TensorBoard log folder (Tune's);
    None for ``none``."""
    if tracking == "mlflow":
        return tracking_uri or f"sqlite:///{Path(storage) / 'mlflow.db'}"
    if tracking == "wandb":
        return tracking_uri or str(Path(storage) / "wandb")
    if tracking == "tensorboard":
        return storage_child(storage, "tune")
    return None


def mlflow_artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a SQLite file (MLflow's default, ``./mlruns`` of the current
    folder, would scatter them); a server or another database keeps its own default (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    return str(database.resolve().parent / "mlflow-artifacts")


def describe(tracking: str, *, sweep: str, target: str | None) -> str | None:
    """The start line of a tracked sweep: where the tracker writes and how to open it."""
    if tracking == "tensorboard":
        return f"tracking: TensorBoard events in {target}/{sweep}/<trial>/; open them with: tensorboard --logdir {target}"
    if tracking == "mlflow":
        artifacts = mlflow_artifact_location(target)
        where = f" (artifacts in {artifacts})" if artifacts else ""
        return f"tracking: MLflow experiment {sweep!r} in {target}{where}; open it with: mlflow ui --backend-store-uri {target}"
    if tracking == "wandb":
        return (
            f"tracking: W&B offline runs of project {sweep!r} in {target}/wandb/; upload them with: "
            f"wandb sync {target}/wandb/offline-run-*"
        )
    return None


# --- what a run holds ------------------------------------------------------------------------------------------
def flat_params(config: TrialConfig) -> dict[str, str]:
    """The trial's config as parameters under dotted names (``privacy.target_epsilon``); values as JSON text
    (``null`` for a trial without DP's ``privacy``, ``[1, 2]`` for a list), strings as they are."""
    params: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            params[prefix] = value if isinstance(value, str) else json.dumps(value)

    walk("", config.to_dict())
    return params


def trial_tags(config: TrialConfig, *, sweep: str) -> dict[str, str]:
    """Tags to find and group runs by: the trial id (the result file's name), the sweep, method, dataset, label."""
    return {
        "trial_id": config.trial_id,
        "sweep": sweep,
        "method": config.method.name,
        "dataset": config.data.dataset,
        "label": config.label,
        "dp": "true" if config.privacy is not None else "false",
    }


def step_metrics(report: Mapping[str, Any]) -> tuple[int, dict[str, float]] | None:
    """(training step, metrics) of a worker's progress report as Tune passes it on; None for a report with no
    training metrics (the final one, whose metrics come from the result instead)."""
    step = report.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or report.get("finished"):
        return None
    metrics = {
        key: float(value)
        for key, value in report.items()
        if (key in STEP_METRICS or key.startswith(CONVERGENCE_PREFIX))
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
    }
    return (step, metrics) if metrics else None


def final_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric scalars of a result's metrics (``fid``, ``precision``, ...), privacy ledger
    (``privacy.epsilon_rdp``, ...) and cost (``cost.train_pflops``, ...); lists and text are left out."""
    out = {}
    for section, prefix in FINAL_SECTIONS.items():
        for key, value in (record.get(section) or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                out[f"{prefix}{key}"] = float(value)
    return out


def convergence_metrics(point: Mapping[str, Any]) -> dict[str, float]:
    """A convergence point of a result (``{"step", "fid", ...}``) under the names the progress reports use."""
    return {
        f"{CONVERGENCE_PREFIX}{key}": float(value)
        for key, value in point.items()
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def final_step(record: Mapping[str, Any]) -> int:
    """The step the final metrics are logged at: the last one trained (0 for a trial that trained nothing)."""
    history = record.get("history") or []
    return int(history[-1]["step"]) if history else 0


def write_artifacts(record: Mapping[str, Any], folder: Path, *, storage: str) -> list[Path]:
    """Files to attach to a trial's run, written into ``folder``: its result JSON (``result.json``) and, for a trial
    with sample images, its grid (``sample_grid.png``, drawn by ``analysis.figures.sample_grid`` as on the report
    page: generated images beside real ones, one row per class)."""
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / RESULT_ARTIFACT
    result.write_text(json.dumps(record, indent=1, sort_keys=True))
    files = [result]
    if record.get("artifacts"):
        from analysis.figures import sample_grid  # matplotlib and PIL: only when a grid is drawn

        grid, _ = sample_grid(dict(record), folder / "grid", storage=storage)
        if grid is not None:
            files.append(grid.rename(folder / GRID_ARTIFACT))
    return files


# --- trackers ------------------------------------------------------------------------------------------------
class Tracker(abc.ABC):
    """One tracker run per trial, driven from the sweep's driver by the launcher's Tune callback: ``start`` when
    a trial starts, ``log_step`` per progress report, ``finish`` once its result is written (or is not: then the run
    is marked failed). Subclasses implement ``_open_run``, ``_log``, ``_close_run``."""

    def __init__(self, sweep: str, *, store: ResultStore, storage: str):
        self.sweep, self.store, self.storage = sweep, store, storage
        self.runs: dict[str, Any] = {}  # config trial id -> the tracker's run (id or object)
        self.convergence_steps: dict[
            str, set[int]
        ] = {}  # config trial id -> steps with a convergence point logged

    def start(self, config: TrialConfig) -> None:
        if config.trial_id not in self.runs:
            self.runs[config.trial_id] = self._open_run(config)

    def log_step(self, trial_id: str, report: Mapping[str, Any]) -> None:
        found = step_metrics(report)
        if found is not None and trial_id in self.runs:
            step, metrics = found
            self._log(self.runs[trial_id], metrics, step=step)
            if any(key.startswith(CONVERGENCE_PREFIX) for key in metrics):
                self.convergence_steps.setdefault(trial_id, set()).add(step)

    def finish(self, trial_id: str) -> None:
        """Final metrics and artifacts from the trial's result; the run ends FINISHED for a success, FAILED
        otherwise (the trial function always returns, so the result's status is the only verdict)."""
        run = self.runs.pop(trial_id, None)
        if run is None:
            return
        record = self.store.read(trial_id)
        success = record is not None and record.get("status") == "success"
        if record is not None:
            logged = self.convergence_steps.pop(trial_id, set())
            for point in (
                record.get("convergence") or []
            ):  # the points no checkpoint report carried (the last)
                if point.get("step") not in logged:
                    self._log(run, convergence_metrics(point), step=int(point["step"]))
            self._log(run, final_metrics(record), step=final_step(record))
            with tempfile.TemporaryDirectory() as folder:
                self._attach(run, write_artifacts(record, Path(folder), storage=self.storage))
        error = "no result written" if record is None else record.get("error")
        if success:
            self._close_run(run, outcome="success", error=None)
        else:
            self._close_run(run, outcome="failed", error=str(error or "failed"))

    def close(self) -> None:
        """End the runs of trials the sweep left unfinished (interrupted; a relaunch resumes them): ``stopped``."""
        for trial_id in list(self.runs):
            self._close_run(
                self.runs.pop(trial_id), outcome="stopped", error="the sweep stopped before the trial ended"
            )

    @abc.abstractmethod
    def _open_run(self, config: TrialConfig) -> Any:
        """A run for the trial (params and tags logged); returns what the other methods take as ``run``."""

    @abc.abstractmethod
    def _log(self, run: Any, metrics: dict[str, float], *, step: int) -> None:
        """Log ``metrics`` at training step ``step``."""

    @abc.abstractmethod
    def _attach(self, run: Any, files: list[Path]) -> None:
        """Attach ``files`` to the run as artifacts."""

    @abc.abstractmethod
    def _close_run(self, run: Any, *, outcome: str, error: str | None) -> None:
        """End the run: ``outcome`` is ``success``, ``failed`` or ``stopped`` (interrupted, to be resumed)."""


class MlflowTracker(Tracker):
    """MLflow through ``MlflowClient`` (no global active run, so concurrent trials each keep their own run). The
    experiment is the sweep's name; a relaunch finds the run of an interrupted trial (same trial id, RUNNING after
    a killed driver, KILLED after a stopped sweep) and continues it rather than starting a second run. A finished
    trial is skipped by the launcher, so it never gets another run; a failed one runs again under a new run."""

    def __init__(self, sweep: str, *, store: ResultStore, storage: str, uri: str):
        super().__init__(sweep, store=store, storage=storage)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri = uri
        logging.getLogger("mlflow").setLevel(
            logging.WARNING
        )  # not its "Creating initial database tables" lines
        try:
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(sweep)
            self.experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(sweep, artifact_location=mlflow_artifact_location(uri))
            )
        except MlflowException as err:
            raise SweepError(
                f"--tracking mlflow: cannot open the tracking store {uri}: {err.message}"
            ) from err

    def _open_run(self, config: TrialConfig) -> str:
        earlier = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.trial_id = '{config.trial_id}'"
        )  # (MLflow's filter compares a status with one value only)
        interrupted = [run for run in earlier if run.info.status in ("RUNNING", "KILLED")]
        if interrupted:
            run_id = interrupted[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{config.label}-{config.trial_id}",
            tags=trial_tags(config, sweep=self.sweep),
        )
        from mlflow.entities import Param

        params = [Param(key, value) for key, value in flat_params(config).items()]
        for start in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(run.info.run_id, params=params[start : start + MLFLOW_BATCH])
        return run.info.run_id

    def _log(self, run: str, metrics: dict[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key, value, now, step) for key, value in metrics.items()]
        for start in range(0, len(entries), MLFLOW_BATCH):
            self.client.log_batch(run, metrics=entries[start : start + MLFLOW_BATCH])

    def _attach(self, run: str, files: list[Path]) -> None:
        for path in files:
            self.client.log_artifact(run, str(path))

    def _close_run(self, run: str, *, outcome: str, error: str | None) -> None:
        self.client.set_tag(run, "status", outcome)
        if error:
            self.client.set_tag(run, "error", error.splitlines()[0][:5000])
        self.client.set_terminated(run, MLFLOW_STATUS[outcome])


class WandbTracker(Tracker):
    """W&B in offline mode (``mode="offline"``: no API key, no network), one run per trial in this process
    (``reinit="create_new"`` keeps concurrent trials' runs apart); ``wandb sync`` uploads the folder later."""

    def __init__(self, sweep: str, *, store: ResultStore, storage: str, folder: str):
        super().__init__(sweep, store=store, storage=storage)
        import wandb

        self.wandb, self.folder = wandb, folder
        Path(folder).mkdir(parents=True, exist_ok=True)

    def _open_run(self, config: TrialConfig):
        tags = trial_tags(config, sweep=self.sweep)
        return self.wandb.init(
            project=self.sweep,
            name=f"{config.label}-{config.trial_id}",
            dir=self.folder,
            mode="offline",
            config=flat_params(config),
            tags=[f"{key}:{value}" for key, value in tags.items()],
            reinit="create_new",
            settings=self.wandb.Settings(silent=True, console="off", x_disable_stats=True),
        )

    def _log(self, run, metrics: dict[str, float], *, step: int) -> None:
        run.log(metrics, step=step)

    def _attach(self, run, files: list[Path]) -> None:
        artifact = self.wandb.Artifact(f"trial-{run.name}", type="result")
        for path in files:
            artifact.add_file(str(path))
        run.log_artifact(artifact)

    def _close_run(self, run, *, outcome: str, error: str | None) -> None:
        run.summary["status"] = outcome
        if error:
            run.summary["error"] = error.splitlines()[0]
        run.finish(exit_code=0 if outcome == "success" else 1)

    def close(self) -> None:
        """Also wait for W&B's service process to have written every run's file (``finish`` may return first)."""
        super().close()
        self.wandb.teardown()


def open_tracker(tracking: str, *, sweep: str, storage: str, tracking_uri: str | None) -> Tracker | None:
    """The driver's tracker for ``mlflow`` and ``wandb`` (None for ``none`` and ``tensorboard``: Tune's own
    TensorBoard logger needs no help). Opens the store now, before any compute, so a bad URI fails first."""
    target = default_target(tracking, storage=storage, tracking_uri=tracking_uri)
    store = ResultStore(storage, create=False)
    if tracking == "mlflow":
        if target.startswith("sqlite:///"):
            Path(target.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return MlflowTracker(sweep, store=store, storage=storage, uri=target)
    if tracking == "wandb":
        os.environ.setdefault("WANDB_SILENT", "true")
        return WandbTracker(sweep, store=store, storage=storage, folder=target)
    return None
