"""Launch a sweep on Ray: a Tune ``Tuner`` over the sweep's trials, each trial function starting a Ray Train
``TorchTrainer`` (Train V2: the trainer is not passed to the Tuner; worker reports reach Tune through
``TuneReportCallback``). One of the two files that import Ray (the other: ``trainables/ray_worker.py``), and
only inside the functions that run a sweep: a dry run imports neither Ray nor peft, and Opacus only for a
sweep with DP trials (its accountant calibrates their noise).

Storage layout (a local or shared path, or a URI for results, artifacts and checkpoints):
  <storage>/results/<trial_id>.json     one result per trial (success or failed), written atomically
  <storage>/artifacts/<trial_id>/       the trial's adapter.pt, generated images (images/) and a few real evaluation
                                        images (real/), complete before its result is written (see ResultStore)
  <storage>/train/trial-<trial_id>/     the trial's Ray Train run: checkpoints a retried or relaunched trial resumes from
                                        (deleted when a DP trial's result is written)
  <storage>/tune/<sweep>/               Tune's experiment state (and TensorBoard events, one folder per trial)
  <storage>/mlflow.db, mlflow-artifacts/ (--tracking mlflow, the default store) one MLflow run per trial
  <storage>/wandb/                      (--tracking wandb) W&B offline runs
  <cache_dir>/                          shared caches (tiny bases, offline data, token caches, reference statistics);
                                        nothing of a trial's own, so clearing it loses no result or artifact
  <cache_dir>/staging/<trial_id>/       (URI storage only) a trial's artifacts on rank 0's node until they are uploaded
Relaunching the same command skips every trial whose result says success and resumes the others.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Read by Ray when it is imported: keep every worker line (Ray would fold similar lines of different processes).
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault(
    "RAY_AIR_NEW_OUTPUT", "0"
)  # the classic engine honours verbose=0 (the new one prints tables)
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # failures are recorded in the result files instead
if not sys.stdout.isatty():  # a log file or a pipe: worker lines without terminal colour codes
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")

import yaml
from pyarrow import fs as pafs

from trainables.progress import duration

from .estimates import ESTIMATE_DEVICE, estimate, longest_first
from .preflight import SweepError, check_sweep, identify
from .results import (  # noqa: F401 - default_cache_dir: re-exported
    TRAIN_FOLDER,
    ResultStore,
    StorageError,
    check_storage_location,
    default_cache_dir,
)
from .schema import TrialConfig, absolute, is_uri, make_result, storage_child, utc_now
from .tracking import (
    MLFLOW_NAMED_TARGETS,
    TRACKERS,
    Tracker,
    check_target,
    check_tracking,
    default_target,
    describe,
    open_tracker,
)

# What a trial holds on the node that runs its Tune actor (the head, on a cluster whose GPU nodes start on demand):
# the actor and its Train controller each import torch, ~0.4 GB of private memory apiece (measured outside Ray), so
# Ray places no more trials there than that node's memory holds (a sweep of 30 trials at 64 MiB each once asked for
# ~23 GB on a 32 GiB head).
TRIAL_FUNCTION_MEMORY_BYTES = 2**30
# ... and on the head: Train 2.60 starts a trial's controller on the node of its Tune actor, so an actor Ray placed
# on a spot GPU node took the trial down with the node (Tune retries none), and held memory there that kept the
# node from idling down. Every Ray head has the resource ``node:__internal_head__`` (Train's own state actor asks
# for it the same way).
TRIAL_FUNCTION_RESOURCES = {"CPU": 0, "memory": TRIAL_FUNCTION_MEMORY_BYTES, "node:__internal_head__": 0.001}
# How long a trial's Train controller waits for its workers' placement group before it gives up, removes the
# group and asks again. Ray Train (2.60) counts that timeout as a retryable controller error, charged to
# `controller_failure_limit` (unlimited, set explicitly in `_trial_function`), never to `max_failures`: a trial
# that waits for resources queues, it does not fail. The value only sets how often a waiting trial re-requests.
# Starting a worker process on a busy small machine can take minutes (Train's default, 60 s, churns); under an
# autoscaler a GPU node takes minutes to boot and install (a spot node longer), so the wait there is an hour:
# the pending request then stays in place, as demand the autoscaler sees, until the node has joined.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
START_TIMEOUT_LOCAL_S = 900.0
START_TIMEOUT_AUTOSCALING_S = 3600.0
# Train's controller takes one report off a worker per poll of its workers (every 2 s by default), and a worker's
# report blocks while the one before it still waits: a run that reports faster than that trains at the poll rate.
# A trial reports every logged step (every step of a short run): 24 steps of a smoke trial on 2 CPU cores took
# 51 s, of which 2.4 s were optimiser steps (docs/benchmarks.md). Polling every 0.2 s costs the controller one
# small call per worker each time. A value in the driver's environment wins (it travels in the job's runtime env).
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = 0.2
# Where `ray up` puts the autoscaler's (prepared) config on the head; Ray Tune takes its presence to mean an
# autoscaling cluster as well (ray.tune.execution.cluster_info).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"
RUNTIME_ENV_VARS = {
    "PYTHONUNBUFFERED": "1",
    START_TIMEOUT_ENV: str(int(START_TIMEOUT_LOCAL_S)),
    # Train V2 re-logs every print of a worker (stdout and the root logger): each line would appear twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # its C++ start-up line is noise on machines without preemption
}
PROGRESS_EVERY_SECONDS = 30.0
# Set by `ray job submit` in its driver: the job's config, whose runtime env ray.init merges with its own.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def driver_env_vars() -> dict[str, str]:
    """The environment the sweep gives Ray's processes, less the variables a submitted job's runtime env sets
    already: Ray refuses to merge the two when they share a key, even at the same value, and the job's value is
    the one meant (the driver runs under it too)."""
    wanted = {**RUNTIME_ENV_VARS, POLL_INTERVAL_ENV: os.environ.get(POLL_INTERVAL_ENV, str(POLL_INTERVAL_S))}
    job = json.loads(os.environ.get(JOB_CONFIG_ENV) or "{}")
    taken = ((job.get("runtime_env") or {}).get("env_vars") or {}).keys()
    return {name: value for name, value in wanted.items() if name not in taken}


@dataclass(frozen=True)
class Launch:
    """Where a sweep runs and writes. Local paths are made absolute here, in the driver, before anything reaches
    Tune or Train (their processes run in working folders of their own); URIs pass through."""

    storage: str
    cache_dir: str
    max_concurrent: int | None = None
    address: str | None = None  # None: RAY_ADDRESS, else a running local cluster, else a new local Ray
    # The autoscaler's cluster config (cluster.yaml or the head's ~/ray_bootstrap_config.yaml) that concurrency
    # follows; None: the running cluster's own (see `autoscaling_limits`).
    cluster_config: str | None = None
    # Seconds a trial waits for its workers before re-requesting them (START_TIMEOUT_ENV); None: decided by
    # `run_sweep` (START_TIMEOUT_LOCAL_S, or START_TIMEOUT_AUTOSCALING_S under an autoscaler).
    worker_start_timeout_s: float | None = None
    # One of bench.tracking.TRACKERS: where each trial's params, metrics and artifacts also go (from the driver).
    tracking: str = "none"
    # The MLflow tracking URI or the W&B folder; None: under the storage (`bench.tracking.default_target`).
    tracking_uri: str | None = None

    def __post_init__(self) -> None:
        # as given: made absolute, "s3:/b" would read as the folder "<cwd>/s3:/b"
        check_storage_location(str(self.storage), what="--storage")
        check_storage_location(str(self.cache_dir), what="the cache folder (--cache-dir or VARSWEEP_CACHE)")
        object.__setattr__(self, "storage", absolute(str(self.storage)))
        object.__setattr__(self, "cache_dir", absolute(str(self.cache_dir)))
        if self.max_concurrent is not None and (
            not isinstance(self.max_concurrent, int)
            or isinstance(self.max_concurrent, bool)
            or self.max_concurrent < 1
        ):
            raise SweepError(
                f"--max-concurrent must be >= 1, got {self.max_concurrent!r} (leave it out to fit the cluster)"
            )
        timeout = self.worker_start_timeout_s
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf
        ):
            raise SweepError(f"worker start timeout must be a positive number of seconds, got {timeout!r}")
        self._check_tracking()

    def _check_tracking(self) -> None:
        """The tracker's name and target (not its package: trial processes rebuild this object on nodes that need
        no tracker installed; `run_sweep` checks the package in the driver)."""
        if self.tracking not in TRACKERS:
            raise SweepError(
                f"unknown tracker {self.tracking!r}: --tracking takes one of {', '.join(TRACKERS)}"
            )
        if self.tracking_uri is not None:
            if not isinstance(self.tracking_uri, str) or not self.tracking_uri.strip():
                raise SweepError(f"--tracking-uri must be a URI or a folder, got {self.tracking_uri!r}")
            if not (self.tracking == "mlflow" and self.tracking_uri in MLFLOW_NAMED_TARGETS):
                object.__setattr__(self, "tracking_uri", absolute(self.tracking_uri))
        check_target(self.tracking, storage=self.storage, tracking_uri=self.tracking_uri)

    @property
    def train_storage(self) -> str:
        return storage_child(self.storage, TRAIN_FOLDER)

    @property
    def tune_storage(self) -> str:
        return storage_child(self.storage, "tune")


def pending_trials(
    configs: list[TrialConfig], store: ResultStore
) -> tuple[list[TrialConfig], list[TrialConfig]]:
    """(trials still to run, trials already finished successfully). Failed trials run again."""
    done = [c for c in configs if store.status(c.trial_id) == "success"]
    finished = {c.trial_id for c in done}
    return [c for c in configs if c.trial_id not in finished], done


def refuse_older_results(
    todo: list[TrialConfig], store: ResultStore, *, done: list[TrialConfig] | None = None
) -> None:
    """Raise ``SweepError`` when a trial still to run has a result of another schema version: running it would
    spend the compute again and overwrite that result. An older one is kept by ``upgrade-results``; a newer one
    (a later varsweep wrote it, e.g. another machine on the same storage) needs this varsweep upgraded. ``done``:
    trials known to hold a current result, whose files need not be read again."""
    if not todo:
        return
    newer = [(c, detail) for c in todo for state, detail in [store.state(c.trial_id)] if state == "newer"]
    if newer:
        raise SweepError(
            f"{len(newer)} trial(s) to run hold a result in {store.folder} that this varsweep cannot read "
            f"({newer[0][0].label}: {newer[0][1]}); running them would overwrite those results"
        )
    due = store.upgrades_due(store.older_results(skip={c.trial_id for c in done or ()}))
    stale = [c for c in todo if c.trial_id in due]
    if stale:
        raise SweepError(
            f"{len(stale)} trial(s) to run have a result of an older schema version in {store.folder} "
            f"({stale[0].label}: {Path(due[stale[0].trial_id]).name}): run `python -m bench upgrade-results "
            f"{store.storage}` first, which rewrites them under their current trial ids, so they are not run again"
        )


# Ray's queue actor that carries Train's reports to a Tune trial: stopped with SIGTERM when its trial ends, Ray's
# SIGTERM handler may raise SystemExit inside the actor's interpreter shutdown (threading._shutdown), which prints a
# traceback under "(_QueueActor pid=...)" on the driver's console though nothing failed. The actor is Ray's own and
# writes nothing else to stderr; a real failure of the reports surfaces as the trial's failed result.
QUIET_ACTORS = ("_QueueActor",)


def _without_quiet_actors_stderr(handler):
    def handle(data: dict) -> None:
        if not (data.get("is_err") and data.get("actor_name") in QUIET_ACTORS):
            handler(data)

    return handle


def quiet_ray_internal_actors() -> bool:
    """Keep the stderr of Ray's internal actors named in ``QUIET_ACTORS`` off the driver's console (everything
    else printed as before); returns whether it could (False: a Ray whose log dispatcher is not as expected, left
    unchanged)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        with dispatcher._lock:
            dispatcher.handlers = [
                (name, _without_quiet_actors_stderr(h) if name == "ray_print_logs" else h)
                for name, h in dispatcher.handlers
            ]
    except (ImportError, AttributeError, TypeError, ValueError):
        return False
    return True


def _quiet_expected_exit(unraisable) -> None:
    if not issubclass(unraisable.exc_type, SystemExit):
        sys.__unraisablehook__(unraisable)


def _trial_function(param: dict) -> None:
    """A Tune trial: run the trial's Ray Train run (resuming its checkpoints) unless its result already exists.
    A run that fails after its retries leaves a ``failed`` result naming the error; the trial function then
    returns normally, so Tune prints no traceback (the result file is the record)."""
    # This actor process is the trial's own (no actor reuse). When Tune stops it, Ray's SIGTERM handler may raise
    # SystemExit inside a garbage-collection callback, which Python reports as an "Exception ignored" traceback on
    # the console; that exit is expected, every other unraisable error is still reported.
    sys.unraisablehook = _quiet_expected_exit
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainables.ray_worker import train_loop_per_worker

    config, launch = TrialConfig.from_dict(param["trial"]), Launch(**param["launch"])
    store = ResultStore(launch.storage)
    if store.status(config.trial_id) == "success":  # written by an earlier run of this trial function
        delete_finished_dp_runs([config], launch)
        return
    if (
        launch.worker_start_timeout_s is not None
    ):  # read by Train from this process's environment (see START_TIMEOUT_ENV)
        os.environ[START_TIMEOUT_ENV] = str(launch.worker_start_timeout_s)
    # Train passes it on to its controller; set here too for a Ray the caller initialised without our runtime env.
    os.environ.setdefault(POLL_INTERVAL_ENV, str(POLL_INTERVAL_S))
    r = config.resources
    per_worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker > 0 else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "trial": config.to_dict(),
            "storage": launch.storage,
            "cache_dir": launch.cache_dir,
            "launched_at": time.time(),
        },
        scaling_config=ScalingConfig(
            num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=training_run_name(config.trial_id),
            storage_path=launch.train_storage,
            # A worker group that cannot be placed in time is re-requested without limit
            # (queued, see START_TIMEOUT_ENV); max_failures counts only failures of the training.
            failure_config=FailureConfig(max_failures=r.max_failures, controller_failure_limit=-1),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
            logging_config=LoggingConfig(log_level="ERROR"),
        ),
    )
    started, error = utc_now(), "the training run ended without writing a result"
    before = _record_or_none(store, config.trial_id)  # an earlier launch's failed record, if any
    try:
        trainer.fit()
    except Exception as err:
        error = training_error(err)
    status = store.status(config.trial_id)
    if status == "success":  # a failure after the result was written leaves it
        delete_finished_dp_runs([config], launch)
        return
    # A failure the workers recorded (not retried: ``ray_worker``) during this run: the record is not the one the
    # trial held before it (compared whole, not by time: the workers' nodes keep their own clocks).
    if status == "failed" and _record_or_none(store, config.trial_id) != before:
        return
    store.write(make_result(config, status="failed", error=error, started_at=started, finished_at=utc_now()))


def training_error(err: Exception) -> str:
    """The error a failed Train run records, its first line (what status and the summary show) naming the cause:
    Train's ``WorkerGroupError`` reads "Training failed due to worker errors:" and then each rank's traceback, and
    its ``ControllerError`` "Training failed due to controller error:", so the cause (the lowest failed rank's
    exception, or the controller's) leads and the whole text follows."""
    whole = f"{type(err).__name__}: {err}"
    failures = getattr(err, "worker_failures", None)
    if failures:
        rank = min(failures)
        return f"{_last_error_line(failures[rank])} (rank {rank})\n{whole}"
    controller = getattr(err, "controller_failure", None)
    if controller is not None:
        return f"{_last_error_line(controller)} (Train's controller)\n{whole}"
    return whole


def _last_error_line(err: BaseException | str) -> str:
    """The line that names an exception: its own "Type: message" line, or for a wrapped one (Ray's task errors
    carry the remote traceback in their text) the last traceback line of that form."""
    text = err if isinstance(err, str) else str(err)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    named = [
        line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*:", line)
    ]
    if named:
        return named[-1]
    first = lines[0] if lines else ""
    return first if isinstance(err, str) else f"{type(err).__name__}: {first}"


def _record_or_none(store: ResultStore, trial_id: str) -> dict | None:
    """The trial's result file as parsed, None when there is none or it cannot be read."""
    try:
        return store.read(trial_id)
    except (ValueError, OSError):
        return None


def delete_finished_dp_runs(finished: list[TrialConfig], launch: Launch) -> None:
    """``delete_training_run`` of every DP trial of ``finished`` (trials whose result is written): a driver that
    died between a result and its deletion left them, and a relaunch, which skips the finished trial, removes them
    here. Idempotent: a folder already gone costs one look."""
    for config in finished:
        if config.privacy is not None:
            delete_training_run(launch, config.trial_id)


def training_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def training_run_dir(launch: Launch, trial_id: str) -> str:
    """The trial's Ray Train run folder (its checkpoints and Train's record of them)."""
    return storage_child(launch.train_storage, training_run_name(trial_id))


def delete_training_run(launch: Launch, trial_id: str) -> None:
    """Remove a finished DP trial's training checkpoints. They hold intermediate models (covered by the guarantee,
    like every DP-SGD iterate) and no generator state, but nothing needs them once the result and the released
    adapter are written, and a smaller release is a safer one. The whole run folder goes, so a trial run again
    (its result deleted) starts afresh instead of resuming from checkpoints that are gone."""
    folder = training_run_dir(launch, trial_id)
    filesystem, path = (
        pafs.FileSystem.from_uri(folder) if is_uri(folder) else (pafs.LocalFileSystem(), folder)
    )
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)


@dataclass(frozen=True)
class NodeType:
    """One kind of node the cluster can have: its Ray resources (CPU, GPU, ...) and how many of it may run.
    ``count`` None: no limit of its own. ``head``: the head node, always there and outside the global limit."""

    name: str
    resources: dict[str, float]
    count: int | None
    head: bool = False


@dataclass(frozen=True)
class ClusterLimits:
    """The largest cluster an autoscaler may grow to: its node types, the most worker nodes over all types
    (``max_workers``; None: no limit) and caps on total resources (``max_resources``), and where they came from."""

    node_types: tuple[NodeType, ...]
    source: str
    max_workers: int | None = None
    max_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    grows: bool = True  # False: the nodes of a running cluster without an autoscaler (``fixed_cluster``)


def fixed_cluster(nodes: list[dict[str, float]]) -> ClusterLimits:
    """The nodes of a running cluster as the largest it will be (a local Ray, a cluster without an autoscaler):
    each alive node's Ray resources, no more nodes to come."""
    totals = {key: sum(n.get(key, 0.0) for n in nodes) for key in ("CPU", "GPU")}
    return ClusterLimits(
        tuple(NodeType(f"node {i}", dict(resources), 1, head=True) for i, resources in enumerate(nodes)),
        f"the running Ray cluster ({len(nodes)} node(s), {totals['CPU']:g} CPU and {totals['GPU']:g} GPU in all)",
        max_workers=0,
        grows=False,
    )


def check_current_nodes(configs: list[TrialConfig]) -> None:
    """With no autoscaler config found: refuse a trial that no alive node can place when this process started
    the Ray instance itself (a local Ray, which never grows: the trial would wait for ever); on a cluster it
    connected to, whose autoscaler may not have reported its config (KubeRay's, a ``ray://`` client), warn."""
    import ray

    nodes = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    try:
        check_fits(configs, fixed_cluster(nodes))
    except SweepError as err:
        if _started_here():
            raise
        print(
            f"warning: {err}. No autoscaler config was found (--cluster-config FILE gives one); if nodes that can "
            "place it join, it starts then"
        )


def _started_here() -> bool:
    """Whether this process started the Ray instance it is connected to (``ray.init`` found none running)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    try:
        return node is not None and bool(node.is_head())
    except Exception:  # Ray's internals moved: do not refuse on a guess
        return False


def limits_from_cluster_config(config: dict, *, source: str) -> ClusterLimits:
    """``ClusterLimits`` of a Ray cluster-launcher config (cluster.yaml, or the head's prepared copy), with Ray's
    defaults: a node type without ``max_workers`` may have the global ``max_workers``, the head type none besides
    the head itself. ``SweepError`` names ``source`` and the setting that cannot serve."""
    types = config.get("available_node_types")
    if not isinstance(types, dict) or not types:
        raise SweepError(
            f"cluster config {source}: no available_node_types (need each node type's resources and max_workers)"
        )
    head_type = config.get("head_node_type")
    cap = _amount(config.get("max_workers"), f"cluster config {source}: max_workers", whole=True)
    nodes = []
    for name, spec in types.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("resources"), dict):
            raise SweepError(
                f"cluster config {source}: node type {name} declares no resources (e.g. resources: {{CPU: 8, GPU: 1}}; "
                f"the head's ~/ray_bootstrap_config.yaml has them filled in)"
            )
        what = f"cluster config {source}: node type {name}"
        resources = {
            key: _amount(value, f"{what}: resources.{key}") for key, value in spec["resources"].items()
        }
        count = _amount(
            spec.get("max_workers", 0 if name == head_type else cap), f"{what}: max_workers", whole=True
        )
        if name == head_type:
            nodes.append(NodeType(name, resources, 1, head=True))
            if count:  # the head's type may also be launched as workers
                nodes.append(NodeType(name, resources, count))
        else:
            nodes.append(NodeType(name, resources, count))
    return ClusterLimits(tuple(nodes), source, max_workers=cap)


def _amount(value, what: str, *, whole: bool = False):
    """``value`` as a number >= 0 (an int with ``whole``); None stays None; else ``SweepError`` naming ``what``."""
    if value is None:
        return None
    ok = isinstance(value, int) if whole else isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or isinstance(value, bool) or value < 0:
        raise SweepError(f"{what} must be a {'whole ' if whole else ''}number >= 0, got {value!r}")
    return value if whole else float(value)


def limits_from_gcs(cluster_config) -> ClusterLimits | None:
    """``ClusterLimits`` of the cluster config an autoscaler reported to the GCS (autoscaler v2 platforms such as
    KubeRay; a ``max_count`` of -1 means no limit); None when it has no node groups."""
    groups = list(cluster_config.node_group_configs) if cluster_config is not None else []
    if not groups:
        return None
    nodes = tuple(
        NodeType(
            g.name,
            {k: float(v) for k, v in g.resources.items()},
            None if g.max_count < 0 else int(g.max_count),
        )
        for g in groups
    )
    return ClusterLimits(
        nodes,
        "as reported to the GCS",
        max_resources={k: float(v) for k, v in cluster_config.max_resources.items()},
    )


def read_cluster_config(path: str) -> ClusterLimits:
    """``ClusterLimits`` of a cluster-launcher YAML file; ``SweepError`` naming the file when it cannot serve."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise SweepError(f"cluster config {path}: no such file")
    try:
        config = yaml.safe_load(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise SweepError(
            f"cluster config {path}: cannot read it as YAML ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(config, dict):
        raise SweepError(f"cluster config {path}: not a mapping of cluster settings")
    return limits_from_cluster_config(config, source=str(file))


def autoscaling_limits(launch: Launch) -> ClusterLimits | None:
    """What the connected cluster can grow to: ``launch.cluster_config`` when given, else the config an autoscaler
    reported to the GCS, else ``~/ray_bootstrap_config.yaml`` (a `ray up` head, where `ray job submit` runs the
    driver); None without an autoscaler (a local Ray, a fixed cluster)."""
    if launch.cluster_config:
        return read_cluster_config(launch.cluster_config)
    import ray

    try:  # the same record Ray Train checks a worker group against (ray._private.state: GlobalState)
        reported = limits_from_gcs(ray._private.state.state.get_cluster_config())
    except Exception:
        reported = None
    if reported is not None:
        return reported
    bootstrap = Path(BOOTSTRAP_CONFIG).expanduser()
    return read_cluster_config(str(bootstrap)) if bootstrap.is_file() else None


def _trial_shapes(configs: list[TrialConfig]) -> list[tuple[int, dict[str, float]]]:
    """The distinct (workers, resources of one worker) of the trials, as Train requests them."""
    shapes = []
    for c in configs:
        r = c.resources
        shape = (
            r.workers,
            {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker > 0 else {})},
        )
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def _per_node(resources: dict[str, float], bundle: dict[str, float]) -> int:
    """How many workers of ``bundle`` fit on one node with ``resources``."""
    needed = [
        math.floor(resources.get(key, 0.0) / amount + 1e-9) for key, amount in bundle.items() if amount > 0
    ]
    return max(0, min(needed)) if needed else 0


def fit_limits(limits: ClusterLimits, configs: list[TrialConfig]) -> int:
    """Trials that run at once on the largest cluster ``limits`` allow: per node type, max nodes x the trial's
    workers that fit on one node (GPUs and CPUs together); the global ``max_workers`` keeps the node types that fit
    most workers. A trial's workers may span nodes (Train packs them, softly), so a trial needs ``workers`` slots
    anywhere. With several trial shapes, the one that fits least decides (0: some trial fits nowhere)."""
    fits = []
    for workers, bundle in _trial_shapes(configs):
        slots = sum(_per_node(t.resources, bundle) for t in limits.node_types if t.head)
        budget = limits.max_workers
        growable = [t for t in limits.node_types if not t.head and _per_node(t.resources, bundle) > 0]
        for node in sorted(growable, key=lambda t: -_per_node(t.resources, bundle)):
            count = (
                node.count if budget is None else budget if node.count is None else min(node.count, budget)
            )
            if count is None:  # no limit at all: as many trials as the sweep has
                slots = len(configs) * workers
                break
            slots += count * _per_node(node.resources, bundle)
            budget = None if budget is None else budget - count
        for key, cap in limits.max_resources.items():
            if bundle.get(key, 0) > 0:
                slots = min(slots, math.floor(cap / bundle[key] + 1e-9))
        fits.append(slots // workers)
    return min(fits)


def fit_resources(total: dict[str, float], configs: list[TrialConfig]) -> int:
    """Trials that fit the cluster's current resources: its GPUs (GPU trials) or CPUs, at least 1."""
    need_gpu = max(c.resources.workers * c.resources.gpus_per_worker for c in configs)
    need_cpu = max(c.resources.workers * c.resources.cpus_per_worker for c in configs)
    fits = (
        math.floor(total.get("GPU", 0) / need_gpu)
        if need_gpu > 0
        else math.floor(total.get("CPU", 1) / need_cpu)
    )
    return max(1, fits)


def concurrency(
    configs: list[TrialConfig], launch: Launch, *, resources: dict[str, float], limits: ClusterLimits | None
) -> tuple[int, str]:
    """How many trials run at once, and what decided it: ``--max-concurrent``; else the larger of what fits the
    cluster's current ``resources`` (``ray.cluster_resources()``) and what fits the largest cluster its autoscaler
    may grow to (``limits``; None: no autoscaler). A trial started beyond the current resources queues until a node
    has joined (see START_TIMEOUT_ENV). Tune does not reserve Train's resources, so more would only wait."""
    if launch.max_concurrent is not None:
        return launch.max_concurrent, "--max-concurrent"
    current = fit_resources(resources, configs)
    if limits is None:
        return current, "the cluster's current resources; no autoscaler"
    grown = fit_limits(limits, configs)
    if grown > current:
        return grown, f"the autoscaler's node types and limits, {limits.source}"
    return current, f"the cluster's current resources; the autoscaler's limits, {limits.source}, add no room"


def check_fits(configs: list[TrialConfig], limits: ClusterLimits | None) -> None:
    """Refuse trials that no cluster ``limits`` allow can place (they would wait for resources forever)."""
    if limits is None:
        return
    for config in configs:
        if fit_limits(limits, [config]) == 0:
            r = config.resources
            where = limits.source if not limits.grows else f"the largest cluster of {limits.source}"
            raise SweepError(
                f"trial {config.label} ({config.trial_id}) needs {r.workers} worker(s) x {r.gpus_per_worker:g} GPU + "
                f"{r.cpus_per_worker:g} CPU; {where} cannot place it (set the sweep's resources, e.g. --workers "
                "or --gpus-per-worker, or run on a cluster that can: --address, --cluster-config)"
            )


class SweepProgress:
    """The sweep's Tune callback (``tune_callback_class`` adds Tune's base class when a sweep runs): one driver
    line per change (a trial started or ended) and every ``PROGRESS_EVERY_SECONDS``:
    ``sweep demo: 2 done, 2 running, 0 failed, 1 pending of 5; 3m10s elapsed, ETA 4m05s``. A trial counts as failed
    when its result file says so (the trial function itself always returns). The ETA spreads the work left over
    the trials running at once: each running trial's own ETA (from its reports), and for each pending trial its
    planned steps at the seconds per step measured so far plus the mean overhead of the trials that ended."""

    def __init__(
        self,
        name: str,
        todo: list[TrialConfig],
        *,
        store: ResultStore,
        skipped: int,
        planned_steps: dict[str, int],
        parallel: int,
    ):
        self.name, self.total, self.store, self.skipped, self.parallel = (
            name,
            len(todo),
            store,
            skipped,
            parallel,
        )
        self.planned = planned_steps  # by config trial id
        self.started, self.last = time.perf_counter(), 0.0
        self.running: dict[str, dict] = {}  # Tune trial id -> {"config_id", "started", "step", "eta"}
        self.ended: dict[str, str] = {}
        self.ended_ids: set[str] = set()  # config trial ids
        self.overheads: list[float] = []  # seconds of each ended trial not spent in its training steps

    def on_trial_start(self, iteration, trials, trial, **info):
        config_id = TrialConfig.from_dict(trial.config["trial"]).trial_id
        self.running[trial.trial_id] = {
            "config_id": config_id,
            "started": time.perf_counter(),
            "step": 0,
            "eta": None,
            "train_seconds": 0.0,
        }
        self._print()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        state = self.running.get(trial.trial_id)
        if state is not None and isinstance(result.get("step"), int) and not result.get("checkpoint"):
            state.update(
                step=result["step"],
                eta=result.get("eta_seconds"),
                train_seconds=result.get("seconds") or state["train_seconds"],
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record_error(trial)
        self._ended(trial)

    def _record_error(self, trial) -> None:
        """A trial function that raised wrote no result (its storage write failed, its actor died): the error Tune
        kept becomes the trial's failed result, so the reason is in the storage, the summary and status, not
        only in Tune's folder, and the sweep does not read it as a trial a Ctrl-C left unfinished."""
        config = TrialConfig.from_dict(trial.config["trial"])
        if self.store.state(config.trial_id)[0] != "pending":
            return
        try:
            text = Path(trial.error_file).read_text() if trial.error_file else ""
        except OSError:
            text = ""
        text = text or "the trial's process failed and Tune recorded no error"
        error = f"{_last_error_line(text)} (the trial function)\n{text}"
        try:
            self.store.write(make_result(config, status="failed", error=error, finished_at=utc_now()))
        except StorageError as err:
            print(f"  cannot record the failure of {config.label} ({config.trial_id}): {err}")

    def on_step_end(self, iteration, trials, **info):
        if time.perf_counter() - self.last >= PROGRESS_EVERY_SECONDS:
            self._print()

    def _ended(self, trial) -> None:
        state = self.running.pop(trial.trial_id, None)
        config = TrialConfig.from_dict(trial.config["trial"])
        self.ended[trial.trial_id] = self.store.status(config.trial_id) or "failed"
        self.ended_ids.add(config.trial_id)
        if state is not None:
            self.overheads.append(time.perf_counter() - state["started"] - state["train_seconds"])
        self._print()

    def _eta(self) -> float | None:
        rates = [s["train_seconds"] / s["step"] for s in self.running.values() if s["step"]]
        if not rates or any(s["eta"] is None and s["step"] for s in self.running.values()):
            return None
        overhead = sum(self.overheads) / len(self.overheads) if self.overheads else 0.0
        started = {s["config_id"] for s in self.running.values()} | self.ended_ids
        pending = [steps for config_id, steps in self.planned.items() if config_id not in started]
        work = sum(s["eta"] or 0.0 for s in self.running.values()) + sum(
            steps * sum(rates) / len(rates) + overhead for steps in pending
        )
        return work / max(1, min(self.parallel, len(self.running) + len(pending)))

    def _print(self) -> None:
        self.last = time.perf_counter()
        elapsed = self.last - self.started
        done = sum(state == "success" for state in self.ended.values())
        failed = len(self.ended) - done
        pending = self.total - len(self.ended) - len(self.running)
        eta = self._eta() if len(self.ended) < self.total else None
        print(
            f"sweep {self.name}: {done} done, {len(self.running)} running, {failed} failed, {pending} pending of {self.total}"
            f"{f' ({self.skipped} already done)' if self.skipped else ''}; {duration(elapsed)} elapsed"
            f"{f', ETA {duration(eta)}' if eta is not None else ''}",
            flush=True,
        )


class TrialTracking:
    """The sweep's Tune callback for ``--tracking mlflow|wandb`` (``tune_callback_class(TrialTracking)`` adds
    Tune's base class): hands each trial's start, progress reports and end to the driver's ``Tracker``. Ray's own
    ``MLflowLoggerCallback`` does not fit these trials: it logs Tune's whole parameter space under slash-joined names
    (the launch settings included), steps by Tune iteration instead of the training step, marks every trial
    FINISHED (the trial function returns normally after a failure too; the result file is the verdict) and creates
    the experiment without an artifact location (artifacts would land in the driver's working folder). A tracker
    that fails mid-sweep costs its records, never the sweep: the first error is printed and tracking stops."""

    def __init__(self, tracker: Tracker):
        self.tracker, self.broken = tracker, False

    def __getstate__(self) -> dict:
        # Tune pickles its run config, callbacks included, into the experiment folder (for Tuner.restore, which
        # sweeps do not use): a tracker's client (database engine, HTTP session) stays out of it.
        return {"tracker": None, "broken": True}

    def on_trial_start(self, iteration, trials, trial, **info):
        self._safely(self.tracker.start, TrialConfig.from_dict(trial.config["trial"]))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._safely(self.tracker.log_step, _config_id(trial), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._safely(self.tracker.finish, _config_id(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._safely(self.tracker.finish, _config_id(trial))

    def _safely(self, call, *args) -> None:
        if self.broken:
            return
        try:
            call(*args)
        except Exception as err:
            self.broken = True
            print(
                f"tracking stopped: {type(err).__name__}: {err} (the trials go on; their results are in the storage)"
            )


def _config_id(trial) -> str:
    return TrialConfig.from_dict(trial.config["trial"]).trial_id


def tune_callback_class(base: type = SweepProgress) -> type:
    """``base`` (``SweepProgress`` or ``TrialTracking``) as the ``ray.tune.Callback`` subclass Tune requires; made
    here, when a sweep runs, because importing this module must not import Ray (a dry run never does)."""
    from ray import tune

    return type(f"{base.__name__}Callback", (base, tune.Callback), {})


def tracking_callbacks(launch: Launch, tracker: Tracker | None) -> list:
    """Tune callbacks of the launch's tracker: Tune's own TensorBoard logger (named, so it does not depend on Tune
    adding it by default) or ``TrialTracking`` around the driver's MLflow or W&B tracker."""
    if launch.tracking == "tensorboard":
        from ray.tune.logger import TBXLoggerCallback

        return [TBXLoggerCallback()]
    return [tune_callback_class(TrialTracking)(tracker)] if tracker is not None else []


def run_sweep(
    name: str,
    configs: list[TrialConfig],
    launch: Launch,
    *,
    dry_run: bool = False,
    verbose: int = 0,
    gpu: str = ESTIMATE_DEVICE,
) -> dict:
    """Check, then run every unfinished trial; returns {"ran", "skipped", "failed", "wall_seconds", "concurrency"}.
    A dry run creates nothing (no storage, cache or offline data folder). ``gpu``: the GPU the dry run's estimate
    prices hours on and the start order (longest first) ranks trials by."""
    check_tracking(launch.tracking, tracking_uri=launch.tracking_uri)  # its package, before anything is read
    configs = identify(
        configs, cache_dir=launch.cache_dir, write=not dry_run, log=print
    )  # content ids, so a mount change keeps ids
    store = ResultStore(launch.storage, create=not dry_run)
    todo, done = pending_trials(configs, store)
    try:
        refuse_older_results(todo, store, done=done)
        plans = check_sweep(todo, cache_dir=launch.cache_dir, write=not dry_run)
    except SweepError as err:
        # the grid is still worth seeing: the trials planned, the others at the published split sizes
        if dry_run:
            print(estimate(configs, done={c.trial_id for c in done}, plans=err.plans, device=gpu))
        raise
    limits = (
        read_cluster_config(launch.cluster_config) if launch.cluster_config else None
    )  # a bad file fails here
    check_fits(todo, limits)
    if dry_run:
        print(estimate(configs, done={c.trial_id for c in done}, plans=plans, device=gpu))
        return {"ran": 0, "skipped": len(done), "failed": 0, "wall_seconds": 0.0, "concurrency": 0}
    delete_finished_dp_runs(done, launch)
    if not todo:
        print(f"sweep {name}: every trial ({len(configs)}) already has its result in {store.folder}")
        return {"ran": 0, "skipped": len(done), "failed": 0, "wall_seconds": 0.0, "concurrency": 0}
    todo = longest_first(todo, plans, device=gpu)
    # Before any compute: the trials another running sweep on this storage trains are refused, named.
    with store.claimed([c.trial_id for c in todo], sweep=name, labels={c.trial_id: c.label for c in todo}):
        return _launch(
            name, todo, launch, store=store, done=done, plans=plans, limits=limits, verbose=verbose
        )


def _launch(
    name: str,
    todo: list[TrialConfig],
    launch: Launch,
    *,
    store: ResultStore,
    done: list[TrialConfig],
    plans: dict,
    limits: ClusterLimits | None,
    verbose: int,
) -> dict:
    """``run_sweep``'s launch of the checked, claimed trials: Ray, shared caches, then Tune."""
    started = time.perf_counter()
    target = default_target(launch.tracking, storage=launch.storage, tracking_uri=launch.tracking_uri)
    # Opened before any compute: a tracking store that cannot be opened stops the sweep here.
    tracker = open_tracker(
        launch.tracking, sweep=name, storage=launch.storage, tracking_uri=launch.tracking_uri
    )
    import ray
    from ray import tune

    if not ray.is_initialized():
        address = launch.address or os.environ.get("RAY_ADDRESS")
        if (
            address is None
        ):  # a new local instance keeps Ray's default token authentication, without its notice
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
                logging.ERROR
            )
        ray.init(address=address, logging_level=logging.WARNING, runtime_env={"env_vars": driver_env_vars()})
        quiet_ray_internal_actors()
    logging.getLogger("ray.tune").setLevel(
        logging.CRITICAL
    )  # Tune's own summaries and errors: ours are in the results
    if limits is None:  # no --cluster-config: the running cluster's autoscaler, if any (needs the connection)
        limits = autoscaling_limits(launch)
        check_fits(todo, limits)
    if limits is None:
        check_current_nodes(todo)
    from trainables.trial import prepare_shared

    # After the checks that need the connection (a trial refused there costs no build), before any trial starts.
    preparing = time.perf_counter()
    prepare_shared(
        todo, launch.cache_dir, log=print
    )  # tiny bases, digit classifier, token caches: built once
    # The progress lines count from the trials' start; the summary's wall time includes this, and says so.
    preparing_s = time.perf_counter() - preparing
    if launch.worker_start_timeout_s is None:
        launch = dataclasses.replace(
            launch,
            worker_start_timeout_s=START_TIMEOUT_LOCAL_S if limits is None else START_TIMEOUT_AUTOSCALING_S,
        )
    parallel, source = concurrency(todo, launch, resources=ray.cluster_resources(), limits=limits)
    parallel = min(parallel, len(todo))
    print(
        f"sweep {name}: {len(todo)} trials to run ({len(done)} already done), up to {parallel} at a time "
        f"(from {source}); results in {store.folder}"
    )
    line = describe(launch.tracking, sweep=name, target=target)
    if line:
        print(line)
    progress = tune_callback_class()(
        name,
        todo,
        store=store,
        skipped=len(done),
        planned_steps={c.trial_id: plans[c.trial_id].planned_steps for c in todo},
        parallel=parallel,
    )
    tuner = tune.Tuner(
        # Tune needs a non-empty request for the trial function; a fraction of a CPU would leave the Train workers
        # one CPU short on a small machine, so it asks for a little memory instead.
        tune.with_resources(_trial_function, TRIAL_FUNCTION_RESOURCES),
        param_space={"trial": tune.grid_search([c.to_dict() for c in todo]), "launch": launch.__dict__},
        # No actor reuse: a reused trial actor's placement group is released with the old trial, taking the new
        # trial's Train controller (scheduled inside it) down with it.
        tune_config=tune.TuneConfig(
            max_concurrent_trials=parallel,
            reuse_actors=False,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=launch.tune_storage,
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[progress, *tracking_callbacks(launch, tracker)],
            verbose=verbose,
        ),
    )
    try:
        tuner.fit()
    finally:
        if tracker is not None:  # runs of trials that never ended (an interrupted sweep) are marked failed
            tracker.close()
    time.sleep(
        2.0
    )  # worker lines reach the driver asynchronously: let the last ones arrive before the summary
    wall = time.perf_counter() - started
    preparation = f" ({duration(preparing_s)} of it preparing shared caches)" if preparing_s >= 1 else ""
    return {
        **summarise(name, todo, store, skipped=len(done), tail=f"{duration(wall)}{preparation}"),
        "wall_seconds": wall,
        "concurrency": parallel,
    }


def summarise(name: str, todo: list[TrialConfig], store: ResultStore, *, skipped: int, tail: str) -> dict:
    """Print the end of a sweep: what finished, what failed (with its error) and what has no result yet: a trial
    Tune stopped unfinished, as it stops every running trial at a Ctrl-C (its own handler catches the first one,
    so no KeyboardInterrupt reaches the command). Returns {"ran", "skipped", "failed", "unfinished"}."""
    states = {c.trial_id: store.state(c.trial_id) for c in todo}
    failed = [c for c in todo if states[c.trial_id][0] not in ("success", "pending")]
    unfinished = [c for c in todo if states[c.trial_id][0] == "pending"]
    not_finished = f"{len(unfinished)} not finished, " if unfinished else ""
    print(
        f"sweep {name}: {len(todo) - len(failed) - len(unfinished)} trials finished, {len(failed)} failed, "
        f"{not_finished}{skipped} skipped, {tail}; results in {store.folder}"
    )
    for config in failed:
        print(f"  failed: {config.label} ({config.trial_id}): {states[config.trial_id][1]}")
    for config in unfinished:
        print(f"  not finished: {config.label} ({config.trial_id}): no result written; a relaunch resumes it")
    return {"ran": len(todo), "skipped": skipped, "failed": len(failed), "unfinished": len(unfinished)}


def _trial_name(trial) -> str:
    config = TrialConfig.from_dict(trial.config["trial"])
    return f"{config.label}-{config.trial_id}"
