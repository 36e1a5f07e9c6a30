"""Launch a sweep on Ray: a Tune ``Tuner`` over the sweep's trials, each trial function starting a Ray Train
``TorchTrainer`` (Train V2: the trainer is not passed to the Tuner; worker reports reach Tune through
``TuneReportCallback``). One of the two files that import Ray (the other: ``trainables/ray_worker.py``).

Storage layout (a local or shared path, or a URI for results and checkpoints):
  <storage>/results/<trial_id>.json     one result per trial (success or failed), written atomically
  <storage>/train/trial-<trial_id>/     the trial's Ray Train run: checkpoints a retried or relaunched trial resumes from
                                        (deleted when a DP trial's result is written)
  <storage>/tune/<sweep>/               Tune's experiment state
  <cache_dir>/                          shared caches (tiny bases, offline data, token caches, reference statistics)
  <cache_dir>/work/<trial_id>/          generated images and the trained adapter of each trial
Relaunching the same command skips every trial whose result says success and resumes the others.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Read by Ray when it is imported: keep every worker line (Ray would fold similar lines of different processes).
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the classic engine honours verbose=0 (the new one prints tables)
os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # failures are recorded in the result files instead
if not sys.stdout.isatty():  # a log file or a pipe: worker lines without terminal colour codes
    os.environ.setdefault("RAY_COLOR_PREFIX", "0")

import ray  # noqa: E402
from pyarrow import fs as pafs  # noqa: E402
from ray import tune  # noqa: E402
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402
from ray.tune.integration.ray_train import TuneReportCallback  # noqa: E402

from trainables.progress import duration  # noqa: E402
from trainables.ray_worker import train_loop_per_worker  # noqa: E402

from .estimates import estimate  # noqa: E402
from .preflight import SweepError, check_sweep  # noqa: E402
from .results import ResultStore  # noqa: E402
from .schema import TrialConfig, absolute, is_uri, make_result, with_absolute_paths  # noqa: E402

TRIAL_FUNCTION_MEMORY_BYTES = 64 * 2**20
RUNTIME_ENV_VARS = {
    "PYTHONUNBUFFERED": "1",
    # Starting a worker process on a busy small machine can take minutes; Train's default start timeout is 60 s.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900",
    # Train V2 re-logs every print of a worker (stdout and the root logger): each line would appear twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # its C++ start-up line is noise on machines without preemption
}
PROGRESS_EVERY_SECONDS = 30.0


@dataclass(frozen=True)
class Launch:
    """Where a sweep runs and writes. Local paths are made absolute here, in the driver, before anything reaches
    Tune or Train (their processes run in working folders of their own); URIs pass through."""

    storage: str
    cache_dir: str
    max_concurrent: int | None = None
    address: str | None = None  # None: RAY_ADDRESS, else a running local cluster, else a new local Ray

    def __post_init__(self) -> None:
        object.__setattr__(self, "storage", absolute(str(self.storage)))
        object.__setattr__(self, "cache_dir", absolute(str(self.cache_dir)))
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise SweepError(f"--max-concurrent must be >= 1, got {self.max_concurrent} (leave it out to fit the cluster)")

    @property
    def train_storage(self) -> str:
        return f"{self.storage.rstrip('/')}/train" if is_uri(self.storage) else str(Path(self.storage) / "train")

    @property
    def tune_storage(self) -> str:
        return f"{self.storage.rstrip('/')}/tune" if is_uri(self.storage) else str(Path(self.storage) / "tune")

    @property
    def work_root(self) -> str:
        return str(Path(self.cache_dir) / "work")


def default_cache_dir(storage: str) -> str:
    """``VARSWEEP_CACHE``, else ``STORAGE/cache`` for a local storage, else ``~/.cache/varsweep`` (absolute)."""
    chosen = os.environ.get("VARSWEEP_CACHE") or (str(Path(storage) / "cache") if not is_uri(storage) else str(Path.home() / ".cache" / "varsweep"))
    return absolute(chosen)


def pending_trials(configs: list[TrialConfig], store: ResultStore) -> tuple[list[TrialConfig], list[TrialConfig]]:
    """(trials still to run, trials already finished successfully). Failed trials run again."""
    done = [c for c in configs if store.status(c.trial_id) == "success"]
    finished = {c.trial_id for c in done}
    return [c for c in configs if c.trial_id not in finished], done


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
    config, launch = TrialConfig.from_dict(param["trial"]), Launch(**param["launch"])
    store = ResultStore(launch.storage)
    if store.status(config.trial_id) == "success":
        return
    r = config.resources
    per_worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker > 0 else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"trial": config.to_dict(), "storage": launch.storage, "cache_dir": launch.cache_dir,
                           "work_root": launch.work_root, "launched_at": time.time()},
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=per_worker),
        run_config=RunConfig(name=Path(training_run_dir(launch, config.trial_id)).name, storage_path=launch.train_storage,
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=[TuneReportCallback()],
                             logging_config=LoggingConfig(log_level="ERROR")))
    started = _now()
    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 - the run failed after its retries: record why, keep the sweep going
        if store.status(config.trial_id) != "success":  # a failure after the result was written leaves the result
            store.write(make_result(config, status="failed", error=f"{type(err).__name__}: {err}", started_at=started, finished_at=_now()))
        return
    if store.status(config.trial_id) != "success":
        store.write(make_result(config, status="failed", error="the training run ended without writing a result",
                                started_at=started, finished_at=_now()))
    elif config.privacy is not None:
        delete_training_run(launch, config.trial_id)


def training_run_dir(launch: Launch, trial_id: str) -> str:
    """The trial's Ray Train run folder (its checkpoints and Train's record of them)."""
    return f"{launch.train_storage.rstrip('/')}/trial-{trial_id}"


def delete_training_run(launch: Launch, trial_id: str) -> None:
    """Remove a finished DP trial's training checkpoints. They hold intermediate models (covered by the guarantee,
    like every DP-SGD iterate) and no generator state, but nothing needs them once the result and the released
    adapter are written, and a smaller release is a safer one. The whole run folder goes, so a trial run again
    (its result deleted) starts afresh instead of resuming from checkpoints that are gone."""
    folder = training_run_dir(launch, trial_id)
    filesystem, path = pafs.FileSystem.from_uri(folder) if is_uri(folder) else (pafs.LocalFileSystem(), folder)
    if filesystem.get_file_info(path).type == pafs.FileType.Directory:
        filesystem.delete_dir(path)


def concurrency(configs: list[TrialConfig], launch: Launch) -> int:
    """How many trials run at once: ``--max-concurrent``, else as many as the cluster's GPUs (GPU trials) or CPUs
    fit (Tune does not reserve Train's resources, and a Train run waiting for resources waits forever)."""
    if launch.max_concurrent:
        return launch.max_concurrent
    total = ray.cluster_resources()
    need_gpu = max(c.resources.workers * c.resources.gpus_per_worker for c in configs)
    need_cpu = max(c.resources.workers * c.resources.cpus_per_worker for c in configs)
    fits = math.floor(total.get("GPU", 0) / need_gpu) if need_gpu > 0 else math.floor(total.get("CPU", 1) / need_cpu)
    return max(1, fits)


class SweepProgress(tune.Callback):
    """One driver line per change (a trial started or ended) and every ``PROGRESS_EVERY_SECONDS``:
    ``sweep demo: 2 done, 2 running, 0 failed, 1 pending of 5; 3m10s elapsed, ETA 4m05s``. A trial counts as failed
    when its result file says so (the trial function itself always returns). The ETA spreads the work left over
    the trials running at once: each running trial's own ETA (from its reports), and for each pending trial its
    planned steps at the seconds per step measured so far plus the mean overhead of the trials that ended."""

    def __init__(self, name: str, todo: list[TrialConfig], *, store: ResultStore, skipped: int, planned_steps: dict[str, int], parallel: int):
        self.name, self.total, self.store, self.skipped, self.parallel = name, len(todo), store, skipped, parallel
        self.planned = planned_steps  # by config trial id
        self.started, self.last = time.perf_counter(), 0.0
        self.running: dict[str, dict] = {}  # Tune trial id -> {"config_id", "started", "step", "eta"}
        self.ended: dict[str, str] = {}
        self.ended_ids: set[str] = set()  # config trial ids
        self.overheads: list[float] = []  # seconds of each ended trial not spent in its training steps

    def on_trial_start(self, iteration, trials, trial, **info):
        config_id = TrialConfig.from_dict(trial.config["trial"]).trial_id
        self.running[trial.trial_id] = {"config_id": config_id, "started": time.perf_counter(), "step": 0, "eta": None, "train_seconds": 0.0}
        self._print()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        state = self.running.get(trial.trial_id)
        if state is not None and isinstance(result.get("step"), int) and not result.get("checkpoint"):
            state.update(step=result["step"], eta=result.get("eta_seconds"), train_seconds=result.get("seconds") or state["train_seconds"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)

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
        work = sum(s["eta"] or 0.0 for s in self.running.values()) + sum(steps * sum(rates) / len(rates) + overhead for steps in pending)
        return work / max(1, min(self.parallel, len(self.running) + len(pending)))

    def _print(self) -> None:
        self.last = time.perf_counter()
        elapsed = self.last - self.started
        done = sum(state == "success" for state in self.ended.values())
        failed = len(self.ended) - done
        pending = self.total - len(self.ended) - len(self.running)
        eta = self._eta() if len(self.ended) < self.total else None
        print(f"sweep {self.name}: {done} done, {len(self.running)} running, {failed} failed, {pending} pending of {self.total}"
              f"{f' ({self.skipped} already done)' if self.skipped else ''}; {duration(elapsed)} elapsed"
              f"{f', ETA {duration(eta)}' if eta is not None else ''}", flush=True)


def run_sweep(name: str, configs: list[TrialConfig], launch: Launch, *, dry_run: bool = False, verbose: int = 0) -> dict:
    """Check, then run every unfinished trial; returns {"ran", "skipped", "failed", "wall_seconds", "concurrency"}.
    A dry run creates nothing (no storage, cache or offline data folder)."""
    configs = [with_absolute_paths(c) for c in configs]
    store = ResultStore(launch.storage, create=not dry_run)
    todo, done = pending_trials(configs, store)
    try:
        plans = check_sweep(todo, cache_dir=launch.cache_dir, write=not dry_run)
    except SweepError:
        if dry_run:  # the grid is still worth seeing, with the published split sizes
            print(estimate(configs, done={c.trial_id for c in done}, plans={}))
        raise
    if dry_run:
        print(estimate(configs, done={c.trial_id for c in done}, plans=plans))
        return {"ran": 0, "skipped": len(done), "failed": 0, "wall_seconds": 0.0, "concurrency": 0}
    if not todo:
        print(f"sweep {name}: every trial ({len(configs)}) already has its result in {store.folder}")
        return {"ran": 0, "skipped": len(done), "failed": 0, "wall_seconds": 0.0, "concurrency": 0}
    started = time.perf_counter()
    from trainables.trial import prepare_shared

    prepare_shared(todo, launch.cache_dir, log=print)  # tiny bases, digit classifier, token caches: built once, here
    if not ray.is_initialized():
        address = launch.address or os.environ.get("RAY_ADDRESS")
        if address is None:  # a new local instance keeps Ray's default token authentication, without its notice
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address=address, logging_level=logging.WARNING,
                 runtime_env={"env_vars": RUNTIME_ENV_VARS})
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # Tune's own summaries and errors: ours are in the results
    parallel = min(concurrency(todo, launch), len(todo))
    print(f"sweep {name}: {len(todo)} trials to run ({len(done)} already done), up to {parallel} at a time; results in {store.folder}")
    progress = SweepProgress(name, todo, store=store, skipped=len(done), planned_steps={c.trial_id: plans[c.trial_id].planned_steps for c in todo},
                             parallel=parallel)
    tuner = tune.Tuner(
        # Tune needs a non-empty request for the trial function; a fraction of a CPU would leave the Train workers
        # one CPU short on a small machine, so it asks for a little memory instead.
        tune.with_resources(_trial_function, {"CPU": 0, "memory": TRIAL_FUNCTION_MEMORY_BYTES}),
        param_space={"trial": tune.grid_search([c.to_dict() for c in todo]), "launch": launch.__dict__},
        # No actor reuse: a reused trial actor's placement group is released with the old trial, taking the new
        # trial's Train controller (scheduled inside it) down with it.
        tune_config=tune.TuneConfig(max_concurrent_trials=parallel, reuse_actors=False, trial_name_creator=_trial_name,
                                    trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=name, storage_path=launch.tune_storage, failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[progress], verbose=verbose))
    tuner.fit()
    time.sleep(2.0)  # worker lines reach the driver asynchronously: let the last ones arrive before the summary
    failed = [c for c in todo if store.status(c.trial_id) != "success"]
    wall = time.perf_counter() - started
    print(f"sweep {name}: {len(todo) - len(failed)} trials finished, {len(failed)} failed, {len(done)} skipped, {duration(wall)}; results in {store.folder}")
    for config in failed:
        print(f"  failed: {config.label} ({config.trial_id}): {store.state(config.trial_id)[1] or 'no result written'}")
    return {"ran": len(todo), "skipped": len(done), "failed": len(failed), "wall_seconds": wall, "concurrency": parallel}


def _trial_name(trial) -> str:
    config = TrialConfig.from_dict(trial.config["trial"])
    return f"{config.label}-{config.trial_id}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
