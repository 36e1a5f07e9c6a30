"""The per-worker function of a trial's Ray Train run (one of the two files that import Ray; the other is
``bench/launcher.py``). Ray Train has already set up the torch process group (DDP, gloo on CPU, NCCL on GPU).

Every rank runs ``trainables.trial.run_trial``; progress and training states go through ``ray.train.report`` (a
barrier: every rank reports at the same steps, rank 0 attaches the checkpoint; a checkpoint due by wall-clock time
is rank 0's decision, broadcast to the other ranks by ``trainables.finetune``). A retried run resumes from the
latest reported checkpoint. Rank 0 writes the trial's artifacts (adapter, sample images) to
``<storage>/artifacts/<trial_id>/`` (on a URI storage through a staging folder it uploads), then its result JSON to
the sweep's result store (``ResultStore.publish``): a result's existence implies its artifacts are complete.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from bench.results import ResultStore
from bench.schema import TrialConfig, make_result, utc_now

STATE_FILE = "training_state.pt"


def _final_errors() -> tuple[type[BaseException], ...]:
    """Errors a retry would meet again and every rank raises at the same point (a diverged training: the loss is
    all-reduced and the parameters are the same on every rank), so each rank ends its attempt instead of raising
    and rank 0 records the failure; Train would otherwise retry them ``resources.max_failures`` times, each from
    the last checkpoint. An error only some ranks raise (e.g. rank 0 building a shared cache while the others wait
    at a barrier) must raise, so that Train tears the group down."""
    from .finetune import TrainingDiverged

    return (TrainingDiverged,)


def train_loop_per_worker(loop_config: dict) -> None:
    """``loop_config``: {"trial": TrialConfig dict, "storage": result store path/URI, "cache_dir",
    "launched_at": wall-clock time the trial was launched}."""
    startup_seconds = time.time() - loop_config["launched_at"]
    # Imported here, not at the top: the Train controller unpickles this function (importing this module) but never
    # runs it, and the models, peft, Opacus and torchvision behind ``run_trial`` cost it ~10 s per trial on 2 cores.
    from . import trial

    # Train sets the workers' root logger to INFO, which prints "Reporting training result ..." at every report;
    # this code logs with print, so only warnings of libraries are worth a line.
    logging.getLogger().setLevel(logging.WARNING)
    config = TrialConfig.from_dict(loop_config["trial"])
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device() if config.resources.gpus_per_worker > 0 else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.resources.cpus_per_worker)))
    resume = _resume_state()

    def report(metrics: dict, state: dict | None) -> None:
        if state is None:
            ray.train.report(_scalars(metrics))
            return
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                torch.save(state, Path(folder) / STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report(
                _scalars(metrics), checkpoint=checkpoint, checkpoint_dir_name=f"step_{state['step']:08d}"
            )

    # Only rank 0 writes to it (and probes that it can). No short reachability probe here: the driver made one
    # before the sweep, and a trial's calls ride out a brief outage on the store's longer retries.
    store = ResultStore(loop_config["storage"], create=rank == 0, reach=False)
    if store.status(config.trial_id) == "success":
        # A retry after rank 0 published (e.g. another rank was lost at the last report): the trial is done, and
        # emptying the artifacts folder below would take the published adapter and images from its result.
        ray.train.report({"finished": 1})
        return
    # Only rank 0 writes artifacts; it starts each attempt from an empty folder (a retry may land on another node).
    artifacts_dir = store.artifacts_dir(config.trial_id, cache_dir=loop_config["cache_dir"], fresh=rank == 0)
    started = utc_now()
    try:
        record = trial.run_trial(
            config,
            cache_dir=loop_config["cache_dir"],
            artifacts_dir=artifacts_dir,
            device=device,
            report=report,
            resume=resume,
            log=lambda line: print(f"[{config.label} rank {rank}] {line}", flush=True),
            startup_seconds=startup_seconds,
        )
    except BaseException as err:
        if (
            rank == 0 and store.remote
        ):  # a failed attempt leaves no staged files on the node (a retry stages afresh)
            shutil.rmtree(artifacts_dir, ignore_errors=True)
        if not isinstance(err, _final_errors()):
            raise
        if rank == 0:
            error = f"{type(err).__name__}: {err}"
            store.write(
                make_result(config, status="failed", error=error, started_at=started, finished_at=utc_now())
            )
            print(f"[{config.label}] failed, not retried: {error}", flush=True)
        ray.train.report({"finished": 1})
        return
    if rank == 0:
        path = store.publish(record, artifacts_dir=artifacts_dir)
        print(f"[{config.label}] result written to {path}", flush=True)
    # Not "done": Tune reads that key as the trial's end and would release the trial (and this run) at once.
    ray.train.report({"finished": 1, **_scalars(record["metrics"])})


def _resume_state() -> dict | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        state = read_state(Path(folder) / STATE_FILE, where=checkpoint.path)
    print(f"resuming from the checkpoint at step {state['step']}", flush=True)
    return state


def read_state(path: Path, *, where: str) -> dict:
    """The training state a checkpoint holds; a damaged or missing file raises naming the checkpoint (``where``,
    its place in the storage) and the way out, where torch's own error named neither the file nor the trial. The
    zip members' CRC-32s are checked first: ``torch.load`` does not, and a flipped byte loaded changed weights, or
    a DP state counting fewer steps than were taken (a ledger under the privacy actually spent), silently."""
    from .models.checkpoints import check_zip_crcs

    try:
        with open(path, "rb") as handle:
            check_zip_crcs(handle, path)
            state = torch.load(handle, weights_only=True, map_location="cpu")
    # torch raises KeyError or IndexError for a text file, RuntimeError for a cut zip, EOFError for an empty one;
    # CheckpointError names a member whose bytes changed
    except Exception as err:
        raise RuntimeError(
            f"the training state of checkpoint {where} cannot be read ({type(err).__name__}: {err}); no step "
            f"was trained from it. Restore the file, or delete the trial's training run ({Path(where).parent}) "
            "to train it from its first step"
        ) from err
    if not isinstance(state, dict) or "step" not in state:
        raise RuntimeError(f"the training state of checkpoint {where} is not one this code wrote (no step)")
    return state


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, bool, str))}
