"""Launch a sweep on Ray: a Tune ``Tuner`` over the sweep's trials, each trial function starting a Ray Train
``TorchTrainer`` (Train V2: the trainer is not passed to the Tuner; worker reports reach Tune through
``TuneReportCallback``). One of the two files that import Ray (the other: ``trainables/ray_worker.py``).

Storage layout (a local or shared path, or a URI for results and checkpoints):
  <storage>/results/<trial_id>.json     one result per trial (success or failed), written atomically
  <storage>/train/trial-<trial_id>/     the trial's Ray Train run: checkpoints a retried or relaunched trial resumes from
  <storage>/tune/<sweep>/               Tune's experiment state
  <cache_dir>/                          shared caches (tiny bases, offline data, token caches, reference statistics)
  <cache_dir>/work/<trial_id>/          generated images and the trained adapter of each trial
Relaunching the same command skips every trial whose result says success and resumes the others.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import tune
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from trainables.ray_worker import train_loop_per_worker
from trainables.trial import preflight

from .estimates import estimate
from .results import ResultStore, is_uri
from .schema import TrialConfig, make_result

PROGRESS_COLUMNS = {"step": "step", "steps_total": "of", "loss": "loss", "epsilon_rdp": "eps", "convergence_fid": "fid@step",
                    "eta_seconds": "eta s", "fid": "FID"}


TRIAL_FUNCTION_MEMORY_BYTES = 64 * 2**20
# Starting a worker process on a busy small machine can take minutes; Train's default start timeout is 60 s.
RUNTIME_ENV_VARS = {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900"}


class SweepError(ValueError):
    """The sweep cannot start; lists every bad trial."""


@dataclass(frozen=True)
class Launch:
    """Where a sweep runs and writes."""

    storage: str
    cache_dir: str
    max_concurrent: int | None = None
    address: str | None = None  # None: RAY_ADDRESS, else a running local cluster, else a new local Ray

    @property
    def train_storage(self) -> str:
        return f"{self.storage.rstrip('/')}/train" if is_uri(self.storage) else str(Path(self.storage).resolve() / "train")

    @property
    def tune_storage(self) -> str:
        return f"{self.storage.rstrip('/')}/tune" if is_uri(self.storage) else str(Path(self.storage).resolve() / "tune")


def default_cache_dir(storage: str) -> str:
    return os.environ.get("VARSWEEP_CACHE", str(Path(storage) / "cache") if not is_uri(storage) else str(Path.home() / ".cache" / "varsweep"))


def pending_trials(configs: list[TrialConfig], store: ResultStore) -> tuple[list[TrialConfig], list[TrialConfig]]:
    """(trials still to run, trials already finished successfully). Failed trials run again."""
    done = [c for c in configs if store.status(c.trial_id) == "success"]
    finished = {c.trial_id for c in done}
    return [c for c in configs if c.trial_id not in finished], done


def check_sweep(configs: list[TrialConfig], *, cache_dir: str) -> dict[str, object]:
    """Preflight of every trial (files, datasets, privacy budgets) before anything starts; raises ``SweepError``
    naming every failing trial and its problem. Returns {trial_id: Preflight}."""
    found, problems = {}, []
    for config in configs:
        try:
            found[config.trial_id] = preflight(config, cache_dir)
        except (ValueError, OSError) as err:
            problems.append(f"  {config.label} ({config.trial_id}): {err}")
    if problems:
        raise SweepError(f"{len(problems)} of {len(configs)} trials cannot run; nothing was started:\n" + "\n".join(problems))
    return found


def _trial_function(param: dict) -> None:
    """A Tune trial: run the trial's Ray Train run (resuming its checkpoints) unless its result already exists."""
    config, launch = TrialConfig.from_dict(param["trial"]), Launch(**param["launch"])
    store = ResultStore(launch.storage)
    if store.status(config.trial_id) == "success":
        return
    r = config.resources
    per_worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker > 0 else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"trial": config.to_dict(), "storage": launch.storage, "cache_dir": launch.cache_dir,
                           "work_root": str(Path(launch.cache_dir) / "work"), "launched_at": time.time()},
        scaling_config=ScalingConfig(num_workers=r.workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=per_worker),
        run_config=RunConfig(name=f"trial-{config.trial_id}", storage_path=launch.train_storage,
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=[TuneReportCallback()]))
    started = _now()
    try:
        trainer.fit()
    except Exception as err:  # the run failed after its retries: record why, keep the sweep going
        if store.status(config.trial_id) == "success":  # it failed after writing its result: the result stands
            print(f"{config.label}: the run ended with {type(err).__name__} after its result was written; keeping the result")
            return
        store.write(make_result(config, status="failed", error=f"{type(err).__name__}: {err}", started_at=started, finished_at=_now()))
        raise
    if store.status(config.trial_id) != "success":
        store.write(make_result(config, status="failed", error="the training run ended without writing a result",
                                started_at=started, finished_at=_now()))


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


def run_sweep(name: str, configs: list[TrialConfig], launch: Launch, *, dry_run: bool = False, verbose: int = 1) -> dict:
    """Check, then run every unfinished trial; returns {"ran", "skipped", "failed", "wall_seconds", "concurrency"}."""
    store = ResultStore(launch.storage)
    todo, done = pending_trials(configs, store)
    try:
        plans = check_sweep(todo, cache_dir=launch.cache_dir)
    except SweepError:
        if dry_run:  # the grid is still worth seeing, with the published split sizes
            print(estimate(configs, done={c.trial_id for c in done}, plans={}))
        raise
    if dry_run:
        print(estimate(configs, done={c.trial_id for c in done}, plans=plans))
        return {"ran": 0, "skipped": len(done), "failed": 0, "wall_seconds": 0.0, "concurrency": 0}
    if not todo:
        print(f"sweep {name}: all {len(configs)} trials already have results in {store.folder}")
        return {"ran": 0, "skipped": len(done), "failed": 0, "wall_seconds": 0.0, "concurrency": 0}
    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=launch.address or os.environ.get("RAY_ADDRESS"),
                 runtime_env={"env_vars": RUNTIME_ENV_VARS})
    parallel = min(concurrency(todo, launch), len(todo))
    print(f"sweep {name}: {len(todo)} trials to run ({len(done)} already done), up to {parallel} at a time")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's classic table honours our columns (step, loss, epsilon, ETA)
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
                                  progress_reporter=tune.CLIReporter(metric_columns=PROGRESS_COLUMNS, parameter_columns={"trial/optimization/seed": "seed"},
                                                                     max_report_frequency=30, max_progress_rows=40),
                                  verbose=verbose))
    tuner.fit()
    failed = [c for c in todo if store.status(c.trial_id) != "success"]
    wall = time.perf_counter() - started
    print(f"sweep {name}: {len(todo) - len(failed)} trials finished, {len(failed)} failed, {len(done)} skipped, {wall:.0f} s; results in {store.folder}")
    return {"ran": len(todo), "skipped": len(done), "failed": len(failed), "wall_seconds": wall, "concurrency": parallel}


def _trial_name(trial) -> str:
    config = TrialConfig.from_dict(trial.config["trial"])
    return f"{config.label}-{config.trial_id}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
