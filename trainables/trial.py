"""One trial, end to end, in a plain Python process: ``run_trial(config, ...)`` returns its result record.

preflight (cheap checks: files, dataset listing, privacy budget with the real N) -> base model (official
checkpoints or the built-in tiny base) -> dataset splits (decoded once; corrupt images skipped only when asked)
-> token cache (shared by every trial with the same key) -> adaptation -> fine-tuning (DP or not, checkpointed,
convergence FIDs) -> evaluation (FID, precision/recall, KID) -> result record (``bench.schema``).
Ray is not imported here: ``trainables/ray_worker.py`` calls ``run_trial`` inside a Ray Train worker, tests and
debugging call it directly. Under an initialised process group every rank trains and rank 0 evaluates.

The trial's own files (adapter, generated images, a few real evaluation images per class) go to ``artifacts_dir``,
which the launcher maps to ``<storage>/artifacts/<trial_id>/``; the record names them relative to the storage root.
Nothing of a trial's own is written under the cache.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from bench.schema import BROKEN_MECHANISM, ConfigError, EvaluationConfig, TrialConfig, make_result, utc_now

from .assets import FileIds, verify_content
from .audit import audit_record, canary_images, canary_nll, inclusion_mask, with_canaries
from .data.datasets import DatasetError, ImageList, check_images
from .data.token_cache import ViewSpec, open_token_cache
from .data.tokens import TokenViews
from .evaluation.classifier import digit_classifier
from .evaluation.evaluate import ScoringSettings, evaluate
from .evaluation.features import DIGITS_CNN, build_extractor
from .evaluation.metrics import ReferenceStats
from .finetune import Checkpointing, Prior, RunPlan, check_resources, finetune
from .methods import PEFT_METHODS, Adaptation, adapt, parameter_counts, save_adapter
from .models import VAR, VQVAE, load_var, load_vqvae, resize_class_embedding
from .models.checkpoints import atomic_write, checkpoint_sha256
from .peft_format import save_peft_adapter
from .plan import TrialPlan, image_problems, list_splits, plan_trial, preflight
from .prior import build_prior_bank
from .profiling import peak_flops_per_second
from .progress import Progress
from .tiny_base import tiny_base
from .training import rank_and_world

# What a DP trial's record adds to the privacy ledger's list of figures released without noise.
RECORD_RELEASED_WITHOUT_NOISE = {
    "data.train_images": "N, the number of training examples",
    "data.skipped_images": "how many training and evaluation images were corrupt and skipped (only with skip_corrupt_images)",
    "cost.wall_seconds, cost.gpu_hours, cost.setup_seconds, cost.startup_seconds": "wall-clock times of the trial (wall_seconds and gpu_hours over every attempt), training included",
    "tune.seconds, tune.eta_seconds": "training wall-clock times reported to Ray Tune while the trial runs, as in the history",
    "tune.checkpoint": "the steps at which a training checkpoint was saved: by step count, or by wall-clock training time",
}
Report = Callable[
    [dict, dict | None], None
]  # (metrics for the progress table, training state to checkpoint or None)
PACKAGES = ("torch", "torchvision", "peft", "opacus", "torch-fidelity", "numpy", "ray", "varsweep")


def prepare_shared(
    configs: list[TrialConfig], cache_dir: str | Path, *, log: Callable[[str], None] | None = print
) -> None:
    """Build, once and before any trial starts, what trials on the built-in tiny base share: the tiny bases, the
    offline data folders, their token caches and (on digits) the digit classifier. Each is cached under
    ``cache_dir`` and built under a file lock, so trials then only load them; official-model trials build their
    token caches in their own workers (on GPU nodes, not on the driver). First, every split any trial reads is
    decoded (``check_images``, kept in the cache): a corrupt image stops the sweep before anything is built."""
    cache_dir, seen = Path(cache_dir), set()
    _check_every_split(configs, cache_dir, log=log)
    for config in configs:
        if config.model.base != "tiny":
            continue
        d = config.data
        key = (
            config.model.depth,
            config.model.tiny_pretraining_steps,
            d.dataset,
            d.root,
            d.resolution,
            d.cached_views,
            d.view_seed,
            d.train_split,
        )
        if key in seen:
            continue
        seen.add(key)
        vqvae = load_base(config, cache_dir, device=torch.device("cpu"), log=log).vqvae
        train, _ = check_images(
            list_splits(config, cache_dir)[0], skip_corrupt=d.skip_corrupt_images, cache_dir=cache_dir
        )
        open_token_cache(
            cache_dir / "token-cache",
            train,
            vqvae,
            spec=ViewSpec(resolution=d.resolution, num_views=d.cached_views, seed=d.view_seed),
            log=log,
        )
    if any(c.data.dataset == "digits" for c in configs):
        digit_classifier(cache_dir, log=log)


def _check_every_split(
    configs: list[TrialConfig], cache_dir: Path, *, log: Callable[[str], None] | None
) -> None:
    """``plan.image_problems`` raised, each problem with the trials it stops (the driver's ``check_sweep`` found
    them first, and kept the decoding's outcome in the cache)."""
    problems = image_problems(configs, cache_dir, log=log)
    if problems:
        raise DatasetError(
            f"{sum(map(len, problems.values()))} trial(s) cannot run on their images:\n  "
            + "\n  ".join(
                f"{', '.join(f'{c.label} ({c.trial_id})' for c in trials)}, {problem}"
                for problem, trials in problems.items()
            )
        )


class Base(NamedTuple):
    """The trial's base models, in eval mode, and the SHA-256 of the VAR checkpoint file (recorded in adapters)."""

    vqvae: VQVAE
    var: VAR
    var_sha256: str


def load_base(config: TrialConfig, cache_dir: str | Path, *, device: torch.device, log=None) -> Base:
    """The trial's base models on ``device``, and the VAR checkpoint's SHA-256 (the one the trial id names when
    ``bench.preflight.identify`` filled it; ``verify_content`` checked the file against it)."""
    m = config.model
    if m.base == "tiny":
        built = tiny_base(cache_dir, depth=m.depth, pretraining_steps=m.tiny_pretraining_steps, log=log)
        vqvae = load_vqvae(built["vqvae"], **built["vqvae_architecture"], device=device)
        var = load_var(built["var"], **built["var_architecture"], device=device)
        var_sha256 = checkpoint_sha256(built["var"])
    else:
        vqvae = load_vqvae(m.vqvae_checkpoint, device=device)
        var = load_var(m.var_checkpoint, depth=m.depth, device=device)
        var_sha256 = m.var_checkpoint_sha256 or checkpoint_sha256(m.var_checkpoint)
    return Base(vqvae.eval(), var.eval(), var_sha256)


def _rank0_first(fn: Callable[[], object]) -> object:
    """Run ``fn`` on rank 0, then on the other ranks (shared caches are built once, then read)."""
    rank, world = rank_and_world()
    result = fn() if rank == 0 else None
    if world > 1:
        dist.barrier()
        if rank != 0:
            result = fn()
    return result


ATTEMPTS_KEY = "attempts"  # a training state's record of the attempts up to it (``Attempt.carried``)


@dataclass(frozen=True)
class Attempt:
    """This attempt of a trial and the earlier ones the training state it resumed from carries: when the first
    started (UTC, ``utc_now``), this attempt's number (1: the first), and the wall-clock seconds and GPU hours of
    the earlier attempts up to their last saved state (the steps a failed attempt took after it are not counted,
    as in the training time). ``gpus``: this attempt's (0 on CPUs); each attempt's GPU hours are its own, since a
    retry may run on another cluster shape. ``startup_seconds``: the first attempt's, launch to its start (a
    retry's own clock runs from the same launch, so it would count the earlier attempts again; None when unknown).
    ``commit``: the code this attempt runs (``environment``'s ``git_commit``); ``earlier_commits``: the earlier
    attempts', in order (a relaunch after an upgrade keeps the trial id: its record names every commit that
    trained it). Wall-clock times are released without noise under DP."""

    started_at: str
    number: int
    clock_start: float  # time.perf_counter() at this attempt's start
    earlier_wall_seconds: float
    earlier_gpu_hours: float
    gpus: float
    startup_seconds: float | None = None
    commit: str | None = None
    earlier_commits: tuple[str | None, ...] = ()

    @classmethod
    def begin(
        cls,
        resume: dict | None,
        *,
        gpus: float,
        clock_start: float,
        startup_seconds: float | None = None,
        commit: str | None = None,
    ) -> Attempt:
        """``startup_seconds``: this attempt's launch to start, kept only for the first attempt."""
        now = utc_now()
        if resume is None:
            return cls(now, 1, clock_start, 0.0, 0.0, gpus, startup_seconds, commit)
        carried = resume.get(ATTEMPTS_KEY)
        if carried is None:  # saved before states carried it: its training seconds, a lower bound
            seconds = float(resume.get("compute", {}).get("train_seconds", 0.0))
            return cls(now, 2, clock_start, seconds, gpus * seconds / 3600, gpus, commit=commit)
        return cls(
            carried["started_at"],
            int(carried["count"]) + 1,
            clock_start,
            float(carried["wall_seconds"]),
            float(carried["gpu_hours"]),
            gpus,
            carried.get("startup_seconds"),  # absent from states saved before they carried it
            commit,
            tuple(carried.get("git_commits", ())),  # likewise
        )

    def wall_seconds(self) -> float:
        """Seconds of every attempt so far: the earlier ones' and this one's until now."""
        return self.earlier_wall_seconds + time.perf_counter() - self.clock_start

    def gpu_hours(self) -> float:
        return self.earlier_gpu_hours + self.gpus * (time.perf_counter() - self.clock_start) / 3600

    def carried(self) -> dict:
        """What a training state saved now carries for the attempt that resumes from it (plain values)."""
        return {
            "started_at": self.started_at,
            "count": self.number,
            "wall_seconds": self.wall_seconds(),
            "gpu_hours": self.gpu_hours(),
            "startup_seconds": self.startup_seconds,
            "git_commits": [*self.earlier_commits, self.commit],
        }


def run_trial(
    config: TrialConfig,
    *,
    cache_dir: str | Path,
    artifacts_dir: str | Path,
    device: torch.device | str = "cpu",
    report: Report | None = None,
    resume: dict | None = None,
    log: Callable[[str], None] = print,
    startup_seconds: float | None = None,
    unsafe_mechanism: str | None = None,
) -> dict:
    """Train and evaluate one trial; returns its result record (on ranks other than 0: the record without metrics).
    ``cache_dir`` holds what trials share (tiny bases, offline data, token caches, reference statistics);
    ``artifacts_dir`` this trial's own files (``adapter.pt``, ``adapter-peft/``, ``images/``, ``real/``), the local
    folder that is or becomes ``<storage>/artifacts/<trial_id>/`` (the record's ``artifacts`` paths are relative to
    the storage root).
    ``resume`` is a training state saved through ``report`` by an earlier attempt of the same trial (one another
    trial saved is refused: states carry the trial id); the record's ``started_at`` is then the first attempt's and
    its ``cost.wall_seconds`` and ``cost.gpu_hours`` add the earlier attempts' (``Attempt``), as its training
    figures do. ``startup_seconds`` (launch to this call, measured by the launcher's worker) is recorded in the cost
    for the first attempt (a resumed record keeps the first attempt's, ``Attempt``) with this attempt's setup,
    training and evaluation times. With ``config.audit`` the included canaries train beside the split and the record gets its ``audit``
    section (``trainables.audit``).
    ``unsafe_mechanism="skip_clipping"`` exists for the privacy audit's tests only (no config field, no command
    line reaches it): the DP step skips per-example clipping, noise still calibrated to C. Such a record has
    status "failed" (``UNSAFE_ERROR``), ``audit.mechanism`` ``bench.schema.BROKEN_MECHANISM`` and a ledger whose
    ``clipping`` says it was skipped, so it can never pass for a DP result."""
    wall = time.perf_counter()
    device, cache_dir, artifacts_dir = torch.device(device), Path(cache_dir), Path(artifacts_dir)
    rank, world = rank_and_world()
    # The GPUs the trial holds (workers x GPUs per worker, as the estimate prices them), not its processes.
    gpus = world * config.resources.gpus_per_worker if device.type == "cuda" else 0
    # At the start: the commit of the code this trial imported, not one made while it trained.
    environment_now = environment(device, world_size=world)
    attempt = Attempt.begin(
        resume,
        gpus=gpus,
        clock_start=wall,
        startup_seconds=startup_seconds,
        commit=environment_now["git_commit"],
    )
    if attempt.earlier_commits:
        environment_now["earlier_git_commits"] = list(attempt.earlier_commits)
    _check_unsafe_mechanism(config, unsafe_mechanism)
    plan = preflight(config, cache_dir)
    # What the device cannot train (flex attention on a CPU), before anything is loaded.
    if config.method.name != "base":
        check_resources(config.resources, device=device, privacy=config.privacy)
    # The files are still those the trial id names (none are loaded yet); hashes the driver cached are reused.
    verify_content(config, splits=plan.splits, files=FileIds(cache_dir, write=False))
    # Decoded once per split by the sweep's driver (``prepare_shared``): here the kept outcome is read.
    train, evaluation = plan.splits
    train, skipped = check_images(train, skip_corrupt=config.data.skip_corrupt_images, cache_dir=cache_dir)
    evaluation, skipped_eval = check_images(
        evaluation, skip_corrupt=config.data.skip_corrupt_images, cache_dir=cache_dir
    )
    if skipped or skipped_eval:  # planned for the images it trains on and scores: steps, batch, delta, sigma
        plan = plan_trial(config, (train, evaluation))
    vqvae, base, base_sha256 = _rank0_first(lambda: load_base(config, cache_dir, device=device, log=log))
    spec = ViewSpec(
        resolution=config.data.resolution, num_views=config.data.cached_views, seed=config.data.view_seed
    )
    views, cache_hit = _rank0_first(
        lambda: open_token_cache(cache_dir / "token-cache", train, vqvae, spec=spec, log=log)
    )
    canaries = (
        _canaries(config, train, vqvae, plan=plan, cache_dir=cache_dir, spec=spec, log=log)
        if config.audit is not None
        else None
    )
    var, adaptation = _adapted(
        config, base, classes=len(train.class_names), device=device, base_sha256=base_sha256
    )
    # The audit's reference: every canary's NLL under the adapted model before its first step (rank 0 audits).
    reference_M = (
        canary_nll(var, vqvae, canaries.views, device=device) if canaries is not None and rank == 0 else None
    )
    evaluator = (
        _Evaluator(config, vqvae, evaluation, cache_dir=cache_dir, device=device, log=log)
        if rank == 0
        else None
    )  # rank 0 evaluates
    out = {"history": [], "privacy": None, "convergence": [], "compute": {}}
    setup_seconds = time.perf_counter() - wall
    if config.method.name != "base":
        out = _train(
            config,
            var,
            vqvae,
            views if canaries is None else with_canaries(views, canaries.views, canaries.mask_M),
            base=base,
            plan=plan,
            evaluator=evaluator,
            report=report,
            resume=resume,
            attempt=attempt,
            log=log,
            unsafe_skip_clipping=unsafe_mechanism == "skip_clipping",
        )
    if out["privacy"] is not None:
        out["privacy"]["released_without_noise"].update(RECORD_RELEASED_WITHOUT_NOISE)
        if canaries is not None:
            out["privacy"]["released_without_noise"].update(AUDIT_RELEASED_WITHOUT_NOISE)
    record = dict(
        history=out["history"],
        convergence=out["convergence"],
        privacy=out["privacy"],
        parameters=_parameters(config, var),
        environment=environment_now,
        started_at=attempt.started_at,
        data={
            "train_images": len(train),
            "evaluation_images": len(evaluation),
            "classes": len(train.class_names),
            "skipped_images": skipped + skipped_eval,
            "token_cache_hit": bool(cache_hit),
            "planned_steps": plan.planned_steps,
            "resumed_from_step": None if resume is None else int(resume["step"]),
        },
    )
    status, error = ("failed", UNSAFE_ERROR) if unsafe_mechanism is not None else ("success", None)
    if rank != 0:
        return make_result(config, status=status, error=error, **record, finished_at=utc_now())
    if canaries is not None:
        record["audit"] = _audit_section(
            config,
            canaries,
            reference_M=reference_M,
            released_M=canary_nll(var, vqvae, canaries.views, device=device),
            plan=plan,
            ledger=out["privacy"],
            unsafe=unsafe_mechanism is not None,
        )
    # The trained model is saved before it is evaluated: an evaluation that fails does not take it along.
    trained = adaptation is not None
    peft_written = trained and _save_adapters(
        config, var, artifacts_dir, adaptation=adaptation, class_names=train.class_names
    )
    evaluation_started = time.perf_counter()
    final = evaluator(var, evaluation=config.evaluation, out_dir=artifacts_dir / "images")
    phases = {
        "startup_seconds": attempt.startup_seconds,
        "setup_seconds": setup_seconds,
        "evaluation_seconds": time.perf_counter() - evaluation_started,
    }
    cost = {
        **_cost(out["compute"], final["compute"], device=device, world=world, attempt=attempt),
        **phases,
    }
    return make_result(
        config,
        status=status,
        error=error,
        metrics=final["metrics"],
        cost=cost,
        evaluation_settings=_evaluation_record(final),
        artifacts=_artifacts(config, artifacts_dir, evaluation, adapter=trained, peft=peft_written),
        **record,
        finished_at=utc_now(),
    )


UNSAFE_MECHANISMS = ("skip_clipping",)
UNSAFE_ERROR = (
    "not a DP result: trained with the test-only broken mechanism unsafe_mechanism='skip_clipping' (per-example "
    "clipping skipped, noise calibrated to C), so the privacy ledger's epsilon does not hold"
)
AUDIT_RELEASED_WITHOUT_NOISE = {
    "audit": "the privacy audit: which canaries trained (its ground truth) and their scores under the released model",
}


def _check_unsafe_mechanism(config: TrialConfig, unsafe_mechanism: str | None) -> None:
    """Refuse, before anything is built, a broken mechanism the trial cannot run."""
    if unsafe_mechanism is None:
        return
    if unsafe_mechanism not in UNSAFE_MECHANISMS:
        raise ConfigError(f"unsafe_mechanism: one of {UNSAFE_MECHANISMS} or None, got {unsafe_mechanism!r}")
    if config.privacy is None or config.privacy.clipping not in ("auto", "bookkeeping"):
        raise ConfigError(
            "unsafe_mechanism: skipping clipping breaks a DP step with book-keeping clipping; the trial has "
            + ("no privacy section" if config.privacy is None else f"clipping {config.privacy.clipping!r}")
        )


class _Canaries(NamedTuple):
    """An audit's canaries as token views [m, V, pn*pn] per scale, and which of them train (bool [m])."""

    views: TokenViews
    mask_M: np.ndarray


def _canaries(
    config: TrialConfig, train: ImageList, vqvae, *, plan: TrialPlan, cache_dir: Path, spec: ViewSpec, log
) -> _Canaries:
    """The audit's canaries (written and tokenised once under the cache) and its inclusion mask, which must be the
    one the plan counted."""
    images = _rank0_first(
        lambda: canary_images(
            cache_dir, config.audit, resolution=config.data.resolution, class_names=train.class_names
        )
    )
    views, _ = _rank0_first(
        lambda: open_token_cache(cache_dir / "token-cache", images, vqvae, spec=spec, log=log)
    )
    mask_M = inclusion_mask(config.audit)
    if int(mask_M.sum()) != plan.canaries_included:
        raise RuntimeError(
            f"{int(mask_M.sum())} canaries included, the plan counted {plan.canaries_included}"
        )
    return _Canaries(views, mask_M)


def _audit_section(
    config: TrialConfig,
    canaries: _Canaries,
    *,
    reference_M,
    released_M,
    plan: TrialPlan,
    ledger,
    unsafe: bool,
) -> dict:
    """The record's ``audit``: the claimed epsilon is the ledger's spent epsilon under the calibration accountant."""
    claimed = None if ledger is None else ledger[f"epsilon_{config.privacy.accountant}"]
    mechanism = BROKEN_MECHANISM if unsafe else ("none" if ledger is None else "dp-sgd")
    return audit_record(
        config.audit,
        reference_M=reference_M,
        released_M=released_M,
        mask_M=canaries.mask_M,
        delta=plan.audit_delta,
        claimed_epsilon=claimed,
        mechanism=mechanism,
    )


PEFT_ADAPTER_FOLDER = "adapter-peft"  # beside adapter.pt: the same adapter in peft's own format


def _save_adapters(
    config: TrialConfig,
    var: VAR,
    artifacts_dir: Path,
    *,
    adaptation: Adaptation,
    class_names: Sequence[str],
) -> bool:
    """``adapter.pt`` (varsweep's format, every trained tensor) and, for the peft methods, ``adapter-peft/``: the
    same adapter as a folder ``peft.PeftModel.from_pretrained`` loads (``trainables.peft_format``). Full
    fine-tuning has no adapter to give peft; its model is exported whole (``methods.official_export_state``).
    Both record ``class_names`` (the training split's): the evaluation command refuses a split of other classes,
    whose labels would silently name other classes. Returns whether the peft folder was written."""
    metadata = {"trial": config.to_dict(), "trial_id": config.trial_id}
    recorded = dict(adaptation=adaptation, metadata=metadata, class_names=class_names)
    save_adapter(var, artifacts_dir / "adapter.pt", **recorded)
    if adaptation.method.name not in PEFT_METHODS:
        return False
    save_peft_adapter(var, artifacts_dir / PEFT_ADAPTER_FOLDER, **recorded)
    return True


def _adapted(
    config: TrialConfig, base: VAR, *, classes: int, device: torch.device, base_sha256: str
) -> tuple[VAR, Adaptation | None]:
    """A copy of the base prepared for the trial's method, and what ``adapt`` did (None for method ``base``:
    only the new label set, nothing trained)."""
    var = copy.deepcopy(base).to(device)
    m = config.method
    if m.name == "base":
        resize_class_embedding(var, classes, init=m.class_init)
        var.requires_grad_(False)
        return var, None
    return var, adapt(var, m, num_classes=classes, seed=config.optimization.seed, base_sha256=base_sha256)


# A live report is released at once, but the steps a failed attempt took after its last checkpoint are taken again
# by the retry, with fresh noise, and the ledger counts them once. Under DP a value computed from the model of such a
# step (the prior term's KL) would release an update that no ledger counts, so it is held back from the live
# reports; the history keeps it and the result releases it, once every step it depends on is accounted.
HELD_UNDER_DP = ("prior_kl",)


def _train(
    config: TrialConfig,
    var,
    vqvae,
    views,
    *,
    base,
    plan: TrialPlan,
    evaluator,
    report: Report | None,
    resume,
    attempt: Attempt,
    log,
    unsafe_skip_clipping: bool = False,
) -> dict:
    e, steps = config.evaluation, plan.planned_steps
    run_plan = RunPlan(
        planned_steps=steps,
        evaluation_steps=plan.evaluation_steps,
        log_every=max(1, min(50, steps // 20)),
        noise_multiplier=plan.noise_multiplier,
    )
    prior = _prior(config, base, vqvae) if config.method.prior_weight > 0 else None
    first_step = (
        resume["step"] if resume is not None else 0
    )  # "seconds" in the history restart with each attempt

    progress = Progress("training", "step", steps, log=log, every_seconds=30.0, start=first_step)

    def on_log(entry: dict) -> None:
        progress.update(
            entry["step"],
            " ".join(
                f"{key}={value:.4g}"
                for key, value in entry.items()
                if key in ("loss", "epsilon_rdp") and isinstance(value, float)
            ),
        )
        if report is not None:
            done = entry["step"] - first_step
            eta = entry["seconds"] / done * (steps - entry["step"]) if done > 0 else None
            live = {k: v for k, v in entry.items() if config.privacy is None or k not in HELD_UNDER_DP}
            report(
                {**live, "steps_total": steps, **({"eta_seconds": round(eta)} if eta is not None else {})},
                None,
            )

    def save(state: dict) -> None:
        if report is not None:
            report(
                {"step": state["step"], "steps_total": steps, "checkpoint": True, **_last_convergence(state)},
                {**state, ATTEMPTS_KEY: attempt.carried()},
            )

    convergence = None
    if evaluator is not None and plan.evaluation_steps:
        small = dataclasses.replace(e, num_images=e.convergence_num_images)  # a small-sample FID per point

        def convergence(model) -> dict:
            return {
                key: value
                for key, value in evaluator(model, evaluation=small, quiet=True)["metrics"].items()
                if key in ("fid", "precision", "recall", "class_accuracy")
            }

    checkpointing = Checkpointing(
        save=save, resources=config.resources, resume=resume, identity=config.trial_id
    )
    return finetune(
        var,
        vqvae,
        views,
        optimization=config.optimization,
        method=config.method,
        privacy=config.privacy,
        plan=run_plan,
        prior=prior,
        log=on_log,
        evaluate_fn=convergence,
        checkpointing=checkpointing,
        resources=config.resources,
        unsafe_skip_clipping=unsafe_skip_clipping,
    )


def _artifacts(
    config: TrialConfig,
    artifacts_dir: Path,
    evaluation: ImageList,
    *,
    adapter: bool,
    peft: bool,
    per_class: int = 6,
) -> dict:
    """The record's ``artifacts``: paths relative to the storage root ("/" separated; the folder is
    ``artifacts/<trial_id>``), after copying up to ``per_class`` real evaluation images of every class into
    ``real/class_<label>/<n><suffix>`` so the analysis can show them beside the generated ones without the dataset."""
    folder = f"artifacts/{config.trial_id}"
    real = [{"label": label, "class": name, "paths": []} for label, name in enumerate(evaluation.class_names)]
    for path, label in zip(evaluation.paths, evaluation.labels):
        paths = real[label]["paths"]
        if len(paths) < per_class:
            relative = f"real/class_{label}/{len(paths)}{Path(path).suffix.lower()}"
            atomic_write(artifacts_dir / relative, lambda tmp, source=path: shutil.copyfile(source, tmp))
            paths.append(f"{folder}/{relative}")
    return {
        "folder": folder,
        "adapter": f"{folder}/adapter.pt" if adapter else None,
        "peft_adapter": f"{folder}/{PEFT_ADAPTER_FOLDER}" if peft else None,
        "generated_images": f"{folder}/images",
        "real_images": real,
    }


def _parameters(config: TrialConfig, var) -> dict:
    if config.method.name == "base":
        return {
            "trainable": 0,
            "trainable_without_class_embedding": 0,
            "base_total": sum(p.numel() for p in var.parameters()),
        }
    return parameter_counts(var)


def _last_convergence(state: dict) -> dict:
    last = state["convergence"][-1] if state["convergence"] else {}
    return {f"convergence_{key}": value for key, value in last.items() if key != "step"}


def _prior(config: TrialConfig, base, vqvae) -> Prior:
    teacher = copy.deepcopy(base).requires_grad_(False).eval()
    bank = build_prior_bank(
        teacher,
        vqvae,
        num_samples=256,
        evaluation=config.evaluation,
        generator=torch.Generator().manual_seed(config.optimization.seed),
    )
    return Prior(teacher=teacher, bank=bank)


class _Evaluator:
    """Evaluation with the trial's settings; the extractor (and, on digits, the digit classifier that scores class
    accuracy) is built once and reference statistics are cached."""

    def __init__(
        self,
        config: TrialConfig,
        vqvae,
        images: ImageList,
        *,
        cache_dir: Path,
        device: torch.device,
        log=None,
    ):
        e = config.evaluation
        self.config, self.vqvae, self.images, self.device, self.log = config, vqvae, images, device, log
        self.classifier = (
            digit_classifier(cache_dir, device=device, log=log) if config.data.dataset == "digits" else None
        )
        self.extractor = (
            self.classifier[0]
            if e.extractor == DIGITS_CNN
            else build_extractor(e.extractor, weights_path=e.inception_weights)
        ).to(device)
        self.cache = ReferenceStats(cache_dir / "reference-stats")

    def __call__(
        self, var, *, evaluation: EvaluationConfig, out_dir: Path | None = None, quiet: bool = False
    ) -> dict:
        """Metrics of ``var`` with ``evaluation`` (the trial's section, or a copy with the convergence curve's image count)."""
        return evaluate(
            var,
            self.vqvae,
            self.images,
            evaluation=evaluation,
            autocast_bf16=self.config.optimization.autocast_bf16,
            compiled_sampling=self.config.resources.compile_sampling,
            cache=self.cache,
            scoring=ScoringSettings(),  # KID's subset size: half the smaller set (``metrics.kid_subset_size``)
            feature_extractor=self.extractor,
            out_dir=out_dir,
            classifier=self.classifier,
            log=None if quiet else self.log,
        )


def _evaluation_record(final: dict) -> dict:
    return {
        **final["evaluation_settings"],
        "sampling": final["sampling"],
        "images_generated": final["images_generated"],
        "plan": final["plan"],
        "reference_cache_hit": final["reference_cache_hit"],
    }


def _cost(train: dict, sample: dict, *, device: torch.device, world: int, attempt: Attempt) -> dict:
    """Totals of the trial: training PFLOPs over the rows actually processed, sampling PFLOPs, times, GPU hours, MFU.
    Like the training figures a resumed state carries, the wall-clock seconds and GPU hours add the earlier
    attempts' (up to the state this attempt resumed from) to this one's."""
    train_pflops = train.get("train_pflops", 0.0)
    seconds = train.get("train_seconds", 0.0)
    peak = peak_flops_per_second(device)
    return {
        "train_pflops": train_pflops,
        "sample_pflops": sample["sample_pflops"],
        "total_pflops": train_pflops + sample["sample_pflops"],
        "train_flops_per_row": train.get("train_flops_per_row", 0.0),
        "rows_trained": train.get("rows_trained", 0),
        "train_seconds": seconds,
        "rows_per_second": train.get("rows_per_second"),
        "peak_memory_bytes": train.get("peak_memory_bytes"),
        "sample_images_per_second": sample["images_per_second"],
        "wall_seconds": attempt.wall_seconds(),
        "gpu_hours": attempt.gpu_hours(),
        "mfu": (train_pflops * 1e15 / seconds / (peak * world)) if (peak and seconds) else None,
        "training_precision": train.get("training_precision"),
        "attention_kernel": train.get("attention_kernel"),
        "compiled_blocks": train.get("compiled_blocks"),
        "rows_per_forward": train.get("rows_per_forward"),
        "not_counted": train.get("not_counted"),
    }


def environment(device: torch.device, *, world_size: int) -> dict:
    """Provenance: code version, packages, devices, host."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    devices = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if device.type == "cuda"
        else [platform.processor() or platform.machine()]
    )
    return {
        "git_commit": _git_commit(),
        "packages": versions,
        "python": platform.python_version(),
        "device_type": device.type,
        "devices": devices,
        "world_size": world_size,
        "host": socket.gethostname(),
        "torch_threads": torch.get_num_threads(),
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        commit = out.stdout.strip() if out.returncode == 0 else None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{commit}+dirty" if commit and dirty else commit
    except (OSError, subprocess.SubprocessError):
        return None
