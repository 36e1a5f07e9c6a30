"""The fine-tuning loop of one adaptation trial, with or without DP-SGD.

Composes the pieces as functions: the adapted model (``methods.adapt``), the per-view loss with augmentation
multiplicity and scale weights (``training.view_losses``), optional prior-preservation distillation
(``prior``) and optional DP-SGD (``privacy``). Non-DP steps draw fixed-size batches from a fresh permutation per
epoch; DP steps draw Poisson batches and never log statistics of private examples (no training loss, no
gradient norm, no batch size): their history holds the step, learning rate, epsilon spent and the public prior loss.

Settings come from the trial config's own sections (``bench.schema``: ``OptimizationConfig``, ``MethodConfig``,
``PrivacyConfig``), which checked themselves at construction; ``RunPlan`` holds the few values known only once the
training split is (planned steps, convergence steps, log interval, sigma).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bench.errors import VarsweepError
from bench.schema import (
    FLEX_ON_CPU,
    VIEW_SPLITTING_CLIPPING,
    ConfigError,
    MethodConfig,
    OptimizationConfig,
    PrivacyConfig,
    ResourcesConfig,
)

from .data.tokens import TokenViews, to_device
from .draws import ExampleKey, example_draws
from .methods import trainable_parameters
from .models import VAR, VQVAE
from .prior import PriorBank, prior_preservation_loss
from .privacy import (
    PrivateTraining,
    epsilon_spent,
    load_privacy_state,
    make_private,
    next_batch,
    privacy_ledger,
    privacy_state_dict,
    private_step,
    release,
    resolve_clipping,
    validate_privacy,
)
from .profiling import StepMeter
from .training import (
    Logger,
    average_gradients,
    bf16_autocast,
    build_optimizer,
    compile_blocks,
    epoch_batches,
    examples_per_forward,
    is_logging_step,
    load_optimizer_state,
    lr_at,
    rank_and_world,
    record_history,
    scale_loss_weights,
    set_lr,
    uncompile_blocks,
    view_losses,
)


@dataclass(frozen=True)
class RunPlan:
    """What a run needs beyond the config sections, known once the training split is (no field repeats a config
    field): ``planned_steps`` optimiser steps (``TrialConfig.planned_steps``); ``evaluation_steps``: steps done
    after which ``finetune`` calls its ``evaluate_fn`` (``TrialConfig.convergence_steps``; the
    final step always); history entries every ``log_every`` steps; ``prior_batch_size`` bank samples per step for
    the prior-preservation term; ``noise_multiplier``: DP's sigma as the trial's plan calibrated it (None: calibrated
    by ``make_private``)."""

    planned_steps: int
    evaluation_steps: tuple[int, ...] = ()
    log_every: int = 50
    prior_batch_size: int = 16
    noise_multiplier: float | None = None

    def __post_init__(self) -> None:
        if self.planned_steps < 1 or self.log_every < 1 or self.prior_batch_size < 1:
            raise ValueError(
                f"invalid run plan {self}: need planned_steps >= 1, log_every >= 1, prior_batch_size >= 1"
            )
        if any(not 1 <= step <= self.planned_steps for step in self.evaluation_steps):
            raise ValueError(
                f"invalid run plan: evaluation steps {list(self.evaluation_steps)} must lie in 1..{self.planned_steps}"
            )
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"invalid run plan: noise_multiplier must be > 0, got {self.noise_multiplier}")

    def evaluation_points(self) -> set[int]:
        """Steps done after which ``evaluate_fn`` runs: the planned ones and the final step."""
        return set(self.evaluation_steps) | {self.planned_steps}


@dataclass(frozen=True)
class Prior:
    """Prior-preservation inputs: the frozen base model and its sampled bank."""

    teacher: VAR
    bank: PriorBank


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a run saves its training state, whichever comes first: every ``every_steps`` steps, every
    ``every_fraction`` of the planned steps (both step-based: saves after the multiples of the smaller interval,
    floor(fraction * planned) >= 1 steps, so a resumed run continues the same schedule) and once ``every_minutes``
    of wall-clock time have passed since the last save (or the run's start). Not at the final step, whose save
    ``Checkpointing`` makes whatever the policy says. Steps count steps done (1..planned). Pure: the caller measures
    the time."""

    every_steps: int
    every_fraction: float | None = None
    every_minutes: float | None = None

    def __post_init__(self) -> None:
        if (
            self.every_steps < 1
            or not (self.every_fraction is None or 0 < self.every_fraction <= 1)
            or not (self.every_minutes is None or self.every_minutes > 0)
        ):
            raise ValueError(
                f"invalid checkpoint policy {self}: need every_steps >= 1, every_fraction in (0, 1], every_minutes > 0"
            )

    def step_interval(self, planned_steps: int) -> int:
        """Steps between step-based saves."""
        if self.every_fraction is None:
            return self.every_steps
        # The epsilon keeps 0.29 * 100 = 28.999... at 29.
        return min(self.every_steps, max(1, math.floor(self.every_fraction * planned_steps + 1e-9)))

    def schedule(self, planned_steps: int) -> list[int]:
        """The step-based saves of a run of ``planned_steps`` (steps done), without the wall clock."""
        interval = self.step_interval(planned_steps)
        return list(range(interval, planned_steps, interval))

    def due_by_steps(self, done: int, planned_steps: int) -> bool:
        return 0 < done < planned_steps and done % self.step_interval(planned_steps) == 0

    def due_by_time(self, done: int, planned_steps: int, seconds_since_save: float) -> bool:
        return (
            self.every_minutes is not None
            and 0 < done < planned_steps
            and seconds_since_save >= 60 * self.every_minutes
        )

    def due(self, done: int, *, planned_steps: int, seconds_since_save: float) -> bool:
        """Whether to save after ``done`` steps of ``planned_steps``, ``seconds_since_save`` after the last save."""
        return self.due_by_steps(done, planned_steps) or self.due_by_time(
            done, planned_steps, seconds_since_save
        )


@dataclass(frozen=True)
class Checkpointing:
    """Resumable training. ``save(state)`` is called on every rank at the same steps: when the trial's
    ``resources`` say so (every ``checkpoint_every_steps`` steps, every ``checkpoint_every_fraction`` of the
    planned steps, every ``checkpoint_every_minutes`` of wall-clock time by ``clock`` (seconds), whichever comes
    first; under a process group rank 0's clock decides for all, as ``ray.train.report`` is a barrier) and after
    every convergence evaluation step (so an evaluation is never released from a step a resumed run would redo);
    and after the final step, without the optimiser's moments (nothing trains from it): a retry whose final
    evaluation, artifacts or result failed then evaluates the same final model, where it had retrained up to a
    quarter of the run (without DP at the GPU-hours' cost; under DP with fresh noise, a second noised model of
    steps the ledger counts once). ``resume`` is a state saved that way. Under an initialised process group only rank
    0's state is complete enough to keep. ``identity`` names what defines the training (``run_trial`` passes the
    trial id; None: ``training_identity`` of the run's sections and planned steps): every state carries it and the
    planned steps, and a ``resume`` saved under another identity or plan is refused (a state written before states
    carried them is accepted as it is)."""

    save: Callable[[dict], None]
    resources: ResourcesConfig
    resume: dict | None = None
    clock: Callable[[], float] = time.monotonic
    identity: str | None = None

    @property
    def policy(self) -> CheckpointPolicy:
        r = self.resources
        return CheckpointPolicy(
            every_steps=r.checkpoint_every_steps,
            every_fraction=r.checkpoint_every_fraction,
            every_minutes=r.checkpoint_every_minutes,
        )


class TrainingDiverged(VarsweepError):
    """The loss or the trained parameters became NaN or infinite: the settings (the learning rate, the clipping)
    make this training diverge. Raised before a non-finite model is checkpointed or returned; retrying the same
    settings diverges again."""


class OutOfGpuMemory(VarsweepError):
    """A training step did not fit the GPU's memory at the trial's rows per forward (``resources.rows_per_forward``),
    named with the setting that lowers it."""


@contextlib.contextmanager
def rows_named_on_out_of_memory(
    *, rows_per_forward: int, views_per_example: int, step: int, splits_views: bool = False
):
    """Re-raise CUDA's out-of-memory error of a training step as ``OutOfGpuMemory`` naming what to change: the rows
    per forward set the step's activation memory (~0.75 GiB per row of 680 tokens at VAR-d16 in bf16, measured;
    growing with width x depth), and lowering them changes no number and no trial id (down to 1 where the step
    ``splits_views``: DP with book-keeping; else to the k views an example's forward holds). Nothing of the
    private batch is named: a chunk's rows are the setting's, whatever the Poisson batch holds."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        k = views_per_example
        rows = "the whole local batch (0)" if rows_per_forward == 0 else str(rows_per_forward)
        floor = "at least 1"
        if k > 1:
            floor = (
                f"down to 1: below k = {k} an example's views take several forwards"
                if splits_views
                else f"at least k = {k}: an example's views share a forward"
            )
        raise OutOfGpuMemory(
            f"step {step + 1}: the GPU ran out of memory with resources.rows_per_forward = {rows} rows per forward "
            f"({_gpu_memory()}): lower it ({floor}; accumulated, it changes no number and no trial id), or run on a "
            f"GPU with more memory. CUDA said: {str(error).splitlines()[0] if str(error) else 'out of memory'}"
        ) from error


def _gpu_memory() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    return f"{torch.cuda.get_device_name(device)}, {total:.0f} GiB"


def training_identity(
    *,
    optimization: OptimizationConfig,
    method: MethodConfig,
    privacy: PrivacyConfig | None,
    planned_steps: int,
) -> str:
    """A 16-hex-digit content hash of what defines a run that ``finetune`` is given (its sections and planned
    steps), for callers without a trial id. ``resources`` are left out, as from the trial id: another device or
    cluster shape continues the same training."""
    sections = {
        "optimization": dataclasses.asdict(optimization),
        "method": dataclasses.asdict(method),
        "privacy": None if privacy is None else dataclasses.asdict(privacy),
        "planned_steps": planned_steps,
    }
    text = json.dumps(sections, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_resume(resume: dict, *, identity: str | None, planned_steps: int) -> None:
    """Refuse a training state that another training saved (another identity or plan), or one past the plan. A
    state saved before states named their identity and plan is accepted (its step is still checked)."""
    step, saved = int(resume["step"]), resume.get("identity")
    saved_plan = resume.get("planned_steps", planned_steps)
    if saved is not None and ((identity is not None and saved != identity) or saved_plan != planned_steps):
        raise ValueError(
            f"resume: the checkpoint at step {step} was saved by training {saved!r} of {saved_plan} planned steps, "
            f"but this run is {identity!r} of {planned_steps} planned steps: resume a trial only from its own "
            "checkpoints (start this one without resume, or from its own training folder)"
        )
    if not 0 <= step <= planned_steps:
        raise ValueError(
            f"resume: the checkpoint is at step {step}, past this run's {planned_steps} planned steps: resume a "
            "trial only from its own checkpoints"
        )


def check_finetune(
    data: TokenViews,
    *,
    privacy: PrivacyConfig | None,
    plan: RunPlan,
    prior: Prior | None,
    prior_weight: float,
    resume: dict | None = None,
    resources: ResourcesConfig | None = None,
    device: torch.device | str = "cpu",
    identity: str | None = None,
    batch_size: int | None = None,
) -> None:
    """Every problem that depends on the data, the plan, the checkpoint or the device, before any compute (the
    settings themselves were checked by their config sections). ``identity``: the run's (``Checkpointing``); None
    skips the checkpoint's identity check. ``batch_size``: the non-DP batch, which every rank must share."""
    data.check_multiplicity(1 if privacy is None else privacy.augmentation_multiplicity)
    world = rank_and_world()[1]
    if privacy is None and batch_size is not None and batch_size < world:
        raise ConfigError(
            f"optimization.batch_size: {batch_size} examples cannot be shared by {world} processes; use a batch "
            f"of at least {world} or fewer workers"
        )
    check_resources(resources or ResourcesConfig(), device=device, privacy=privacy)
    if prior_weight > 0 and prior is None:
        raise ValueError("method.prior_weight > 0 needs a Prior (frozen base model and its sample bank)")
    if privacy is not None:
        validate_privacy(privacy, dataset_size=data.num_examples, planned_steps=plan.planned_steps)
    if resume is not None and ("privacy" in resume) != (privacy is not None):
        raise ValueError(
            f"the checkpoint at step {resume['step']} was saved by a {'DP' if 'privacy' in resume else 'non-DP'} run, but this run "
            f"is {'DP' if privacy is not None else 'not DP'}: "
            + (
                "resume it with the privacy settings it was trained under (continuing without DP would release a model the "
                "ledger does not cover)"
                if privacy is None
                else "a DP run cannot continue steps taken without DP; start it from the base model"
            )
        )
    if resume is not None:
        check_resume(resume, identity=identity, planned_steps=plan.planned_steps)


def check_resources(
    resources: ResourcesConfig, *, device: torch.device | str, privacy: PrivacyConfig | None
) -> None:
    """What ``resources`` asks that this device or run cannot do (``ConfigError`` naming the field): FlexAttention
    has no backward on a CPU; ``rows_per_forward`` must hold one example's k views (k under DP; 1 without) unless
    its clipping spreads them over forwards (``VIEW_SPLITTING_CLIPPING``)."""
    if resources.training_attention_kernel == "flex" and torch.device(device).type == "cpu":
        raise ConfigError(f"resources.attention_kernel: {FLEX_ON_CPU}")
    views = 1 if privacy is None else privacy.augmentation_multiplicity
    splits = privacy is not None and privacy.clipping in VIEW_SPLITTING_CLIPPING
    hint = (
        ""
        if privacy is None
        else f", which share a forward with privacy.clipping={privacy.clipping!r}: use 0, at least k, or clipping "
        f"in {VIEW_SPLITTING_CLIPPING} (which spreads an example's views over forwards)"
    )
    examples_per_forward(resources.rows_per_forward, views_per_example=views, splits_views=splits, hint=hint)


def prepare_model(var: VAR, resources: ResourcesConfig, *, privacy: PrivacyConfig | None) -> dict:
    """Set ``var`` up (in place) for training as ``resources`` says: the resolved attention kernel, compiled blocks.
    Returns what the trial's cost records of it: {"attention_kernel", "compiled_blocks", "rows_per_forward"}.
    Compiled blocks are refused with Opacus's hooks or ghost clipping (see ``bench.schema.COMPILE_CLIPPING``)."""
    if resources.compile and privacy is not None and resolve_clipping(privacy, var) != "bookkeeping":
        raise ConfigError(
            f"resources.compile: does not compose with clipping {resolve_clipping(privacy, var)!r} (Opacus's "
            "per-layer hooks recompile the blocks for every layer; ghost clipping's second backward cannot run "
            "through them)"
        )
    var.attention_kernel = resources.training_attention_kernel
    return {
        "attention_kernel": var.attention_kernel,
        "compiled_blocks": compile_blocks(var) if resources.compile else 0,
        "rows_per_forward": resources.rows_per_forward,
    }


@contextlib.contextmanager
def _attention_kernel(var: VAR, kernel: str):
    before, var.attention_kernel = var.attention_kernel, kernel
    try:
        yield
    finally:
        var.attention_kernel = before


def finetune(
    var: VAR,
    vqvae: VQVAE,
    data: TokenViews,
    *,
    optimization: OptimizationConfig,
    method: MethodConfig,
    plan: RunPlan,
    privacy: PrivacyConfig | None = None,
    prior: Prior | None = None,
    debug_seed: int | None = None,
    log: Logger | None = None,
    evaluate_fn: Callable[[VAR], dict] | None = None,
    checkpointing: Checkpointing | None = None,
    resources: ResourcesConfig | None = None,
    unsafe_skip_clipping: bool = False,
) -> dict:
    """Train the trainable parameters of an adapted ``var`` with the trial's ``optimization`` (learning rate,
    batch size, warm-up capped at the planned steps, weight decay, class dropout, global clipping, seed, bf16),
    ``method`` (scale weights, prior weight) and, under DP, ``privacy`` (k views per example; without DP k = 1).
    Returns {"history": [...], "privacy": ledger or None, "convergence": [{"step": s, **evaluate_fn(var)}, ...],
    "compute": {...}} (evaluations at ``plan.evaluation_points()``; ``evaluate_fn`` sees the model in eval mode,
    e.g. a small-sample FID).
    ``resources`` (None: its defaults) says how the steps compute (``prepare_model``): the attention kernel (also
    the prior teacher's), compiled blocks (undone before returning) and, without DP, how many rows go through one
    forward; the compute record names them.
    Under an initialised process group each rank trains on its share of every batch and gradients are averaged,
    each rank's weighted by its share, so the update and the logged loss are the whole batch's.
    A run whose logged loss (without DP) or parameters (at logging steps under DP, before every save, after the
    final step) turn NaN or infinite raises ``TrainingDiverged``; no diverged state is saved or returned.

    Randomness. Each example's own draws (which k cached views, class dropout, drop-path) are keyed by (key, step,
    example index) (``trainables/draws.py``): they do not depend on the rest of the batch, the rank or the physical
    chunk. Prior-bank batches come from a public stream seeded by (seed, step), independent of the private batch.
    Without DP the key comes from ``optimization.seed``, so a run resumed from ``checkpointing.resume`` continues
    bit-identically on the same device. Under DP the example key, the Poisson sampling and the noise are seeded from
    OS entropy (``debug_seed``, for tests and debugging, seeds the sampling and the example key; the ledger says so);
    a checkpoint holds no generator state, so a resumed DP run draws fresh entropy: nobody who reads a checkpoint can
    predict the noise of later steps. Its accounting continues exactly (the steps taken are in the checkpoint).
    ``unsafe_skip_clipping``: the privacy audit's test-only broken DP step (``privacy.make_private``)."""
    resume = checkpointing.resume if checkpointing is not None else None
    resources = resources or ResourcesConfig()
    device = next(var.parameters()).device
    identity = (checkpointing.identity if checkpointing is not None else None) or training_identity(
        optimization=optimization, method=method, privacy=privacy, planned_steps=plan.planned_steps
    )
    check_finetune(
        data,
        privacy=privacy,
        plan=plan,
        prior=prior,
        prior_weight=method.prior_weight,
        resume=resume,
        resources=resources,
        device=device,
        identity=identity,
        batch_size=optimization.batch_size,
    )
    if unsafe_skip_clipping and privacy is None:
        raise ConfigError("unsafe_skip_clipping breaks a DP step: it needs a privacy section")
    seed = optimization.seed
    how = prepare_model(var, resources, privacy=privacy)
    if prior is not None:
        prior.teacher.attention_kernel = how["attention_kernel"]
    optimizer = build_optimizer(var, lr=optimization.learning_rate, weight_decay=optimization.weight_decay)
    # Only the forwards are autocast: backward ops follow their forward's dtypes, and the losses come out float32.
    bf16 = training_autocast(optimization, privacy) and device.type == "cuda"
    inputs = _StepInputs(
        var=var,
        vqvae=vqvae,
        data=data,
        device=device,
        views_per_example=1 if privacy is None else privacy.augmentation_multiplicity,
        class_dropout=optimization.class_dropout,
        bf16=bf16,
        seed=seed,
        prior=prior,
        prior_weight=method.prior_weight,
        prior_batch_size=plan.prior_batch_size,
        draws=_StepDraws(key=ExampleKey.from_seed(seed)),
        token_weights_L=(
            scale_loss_weights(var.patch_nums, decay=method.scale_weight_decay).to(device)
            if method.scale_weight_decay != 1.0
            else None
        ),
    )
    # FlexAttention's fused kernel is opaque to the FLOP counter: the one counted step uses per_scale (the same
    # visible pairs, the same numbers up to rounding).
    counting_context = (
        (lambda: _attention_kernel(var, "per_scale")) if var.attention_kernel == "flex" else None
    )
    run = _Run(
        history=[],
        convergence=[],
        meter=StepMeter(device, counting_context=counting_context),
        start_step=0,
        identity=identity,
        planned_steps=plan.planned_steps,
    )
    if resume is not None:
        _restore(var, optimizer, resume, run)
    saves = (
        _SaveDecision(checkpointing, planned_steps=plan.planned_steps) if checkpointing is not None else None
    )
    after_step = _AfterStep(
        var=var,
        optimizer=optimizer,
        run=run,
        evaluate_fn=evaluate_fn,
        evaluation_points=plan.evaluation_points(),
        checkpointing=checkpointing,
        saves=saves,
    )
    loop = _Loop(
        inputs=inputs,
        after_step=after_step,
        run=run,
        log=log,
        plan=plan,
        learning_rate=optimization.learning_rate,
        warmup_steps=min(optimization.warmup_steps, plan.planned_steps),
    )
    var.train()
    try:
        if privacy is None:
            # Non-DP batches come from a stream shared by all ranks (each takes its share); DP batches from the private sampler.
            ledger = _plain_run(
                optimizer,
                data,
                loop,
                generator=torch.Generator().manual_seed(seed),
                batch_size=optimization.batch_size,
                global_clip_norm=optimization.global_clip_norm,
                rows_per_forward=resources.rows_per_forward,
            )
        else:
            # A resumed DP run must not repeat the lost run's draws: caller-seeded sampling moves to a seed of its own.
            seed_now = (
                debug_seed
                if resume is None or debug_seed is None
                else debug_seed * 1_000_003 + run.start_step
            )
            ledger = _private_run(
                var,
                optimizer,
                data,
                loop,
                privacy=privacy,
                resources=resources,
                debug_seed=seed_now,
                resume=resume,
                unsafe_skip_clipping=unsafe_skip_clipping,
            )
    finally:
        # The trained model leaves as it came: its evaluation samples through eager blocks.
        uncompile_blocks(var)
    # The last update follows the last logged loss: a model that diverged there must not be saved or sampled.
    require_finite_parameters(var, step=plan.planned_steps, private=privacy is not None)
    var.eval()
    return {
        "history": run.history,
        "privacy": ledger,
        "convergence": run.convergence,
        "compute": {
            **run.meter.report(),
            "training_precision": "bf16 autocast" if bf16 else "float32",
            **how,
        },
    }


class _SaveDecision:
    """Applies a ``Checkpointing``'s policy during a run: step-based saves and saves after evaluation steps are
    known to every rank; the wall-clock one is rank 0's, broadcast to the others (one int, only on steps where
    nothing else decides and a time limit is set) over a host group (``_host_group``). Nothing about the batch
    enters the decision (DP: the times are released without noise anyway)."""

    def __init__(self, checkpointing: Checkpointing, *, planned_steps: int):
        self.policy, self.clock, self.planned = checkpointing.policy, checkpointing.clock, planned_steps
        # Made on every rank alike (every rank builds its decision at the same point of the run).
        self.group = _host_group() if self.policy.every_minutes is not None else None
        self.last_save = self.clock()

    def due(self, done: int, *, evaluation_step: bool) -> bool:
        if done == self.planned > 0:  # the final state (see ``Checkpointing``)
            return True
        if not 0 < done < self.planned:
            return False
        if evaluation_step or self.policy.due_by_steps(done, self.planned):
            return True
        if self.policy.every_minutes is None:
            return False
        return _rank0_decides(
            self.policy.due_by_time(done, self.planned, self.clock() - self.last_save), group=self.group
        )

    def saved(self) -> None:
        self.last_save = self.clock()


def _host_group() -> dist.ProcessGroup | None:
    """A process group that moves host tensors, for decisions taken every step: under NCCL (which moves CUDA
    tensors only, so reading the result back would make the host wait for every queued kernel, the ones of the step
    in flight included) a gloo group over the same ranks; the default group where it is gloo already; None in a
    single process."""
    if rank_and_world()[1] == 1 or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def _rank0_decides(flag: bool, *, group: dist.ProcessGroup | None) -> bool:
    """Rank 0's ``flag`` on every rank of an initialised process group (a one-element broadcast over ``group``, a
    host group, see ``_host_group``); ``flag`` alone in a single process."""
    if rank_and_world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.broadcast(value, src=0, group=group)
    return bool(value.item())


@dataclass
class _Run:
    """What a run accumulates (and a checkpoint keeps), and what names the training its checkpoints belong to."""

    history: list[dict]
    convergence: list[dict]
    meter: StepMeter
    start_step: int
    identity: str
    planned_steps: int


def _diverged(step: int, what: str, *, private: bool) -> TrainingDiverged:
    hint = "" if private else " or optimization.global_clip_norm (None: no clipping; try 1.0)"
    return TrainingDiverged(
        f"training diverged: {what} at step {step} (NaN or infinite); lower optimization.learning_rate{hint} "
        "and run the trial again (its checkpoints hold no diverged model)"
    )


def require_finite_loss(values: dict[str, float], *, step: int) -> None:
    """Raise ``TrainingDiverged`` where a logged value (host floats: no extra device sync) is not finite."""
    bad = [key for key, value in values.items() if not math.isfinite(value)]
    if bad:
        raise _diverged(step, "the " + " and the ".join(bad) + " became non-finite", private=False)


def require_finite_parameters(var: VAR, *, step: int, private: bool) -> None:
    """Raise ``TrainingDiverged`` where a trainable parameter holds a NaN or infinity after ``step`` steps (one
    device sync; under DP the parameters are public, unlike the loss)."""
    params = list(trainable_parameters(var).values())
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise _diverged(step, "the trained parameters became non-finite", private=private)


def _cpu_copy(value):
    """``value`` with every tensor in it cloned to the CPU (dicts, lists and tuples rebuilt; the rest as is)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return value


def _training_state(var: VAR, optimizer, *, step: int, run: _Run, private: PrivateTraining | None) -> dict:
    """Everything a resumed run needs, as tensors and plain values (``torch.save``-able with weights_only), none
    shared with the live run: a caller that keeps the dict keeps the state of ``step``. Raises
    ``TrainingDiverged`` rather than return non-finite parameters (a retry would resume the diverged model)."""
    trainable = {name: p.detach().to("cpu", copy=True) for name, p in trainable_parameters(var).items()}
    if not all(bool(torch.isfinite(t).all()) for t in trainable.values()):
        raise _diverged(step, "the trained parameters became non-finite", private=private is not None)
    state = {
        "step": step,
        "identity": run.identity,
        "planned_steps": run.planned_steps,
        "trainable": trainable,
        # torch's state_dict holds the live exp_avg, exp_avg_sq and step tensors, which the next steps change: copied
        # where the state is kept (rank 0; the other ranks' states only pass the report barrier, and a copy of full
        # fine-tuning's AdamW moments is gigabytes per rank); none in the final state, which no step follows
        "optimizer": {}
        if step >= run.planned_steps
        else (_cpu_copy if rank_and_world()[0] == 0 else dict)(optimizer.state_dict()),
        "history": list(run.history),
        "convergence": list(run.convergence),
        "compute": dataclasses.asdict(run.meter.ledger),
    }
    if private is not None:
        state["privacy"] = privacy_state_dict(
            private
        )  # the accounting only: no generator state (see finetune)
    return state


def _restore(var: VAR, optimizer, state: dict, run: _Run) -> None:
    params = trainable_parameters(var)
    if set(params) != set(state["trainable"]):
        raise ValueError(
            f"the checkpoint's trainable parameters differ from this model's: "
            f"{sorted(set(params) ^ set(state['trainable']))[:5]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["trainable"][name])
    if state["optimizer"]:
        load_optimizer_state(optimizer, state["optimizer"])
    elif int(state["step"]) < run.planned_steps:  # only the final state leaves the moments out
        raise ValueError(
            f"the checkpoint of step {state['step']} (of {run.planned_steps}) holds no optimiser state to train on from"
        )
    run.history[:], run.convergence[:] = state["history"], state["convergence"]
    for key, value in state["compute"].items():
        setattr(run.meter.ledger, key, value)
    # names only, also where an older checkpoint kept their totals
    run.meter.ledger.counted_ops = sorted(run.meter.ledger.counted_ops)
    run.start_step = int(state["step"])


@dataclass
class _StepDraws:
    """The key and step the per-example draws of the current step use."""

    key: ExampleKey
    step: int = 0


def training_autocast(optimization: OptimizationConfig, privacy: PrivacyConfig | None) -> bool:
    """Whether the forwards may run under bf16 autocast (on CUDA). Not with Opacus ghost clipping: its norms are
    taken in the activations' dtype, and a bf16-rounded norm could let a clipped gradient exceed C."""
    return optimization.autocast_bf16 and (privacy is None or privacy.clipping != "ghost")


@dataclass
class _StepInputs:
    """What a step's losses read: the models, the token views, the loss settings and the current step's draws. A
    DP run replaces ``draws.key`` by its secret key (``privacy.make_private``); the prior term keeps the public one."""

    var: VAR
    vqvae: VQVAE
    data: TokenViews
    device: torch.device
    views_per_example: int
    class_dropout: float
    token_weights_L: torch.Tensor | None
    bf16: bool
    seed: int
    prior: Prior | None
    prior_weight: float
    prior_batch_size: int
    draws: _StepDraws
    public_key: ExampleKey = dataclasses.field(init=False)
    prior_generator: torch.Generator = dataclasses.field(init=False, default_factory=torch.Generator)

    def __post_init__(self) -> None:
        self.public_key = self.draws.key

    @property
    def uses_prior(self) -> bool:
        return self.prior_weight > 0

    def begin_step(self, step: int) -> None:
        self.draws.step = step
        # Modulo 2**64 (the generator's range; the same seed below 2**24): a 31-bit seed's product is larger.
        self.prior_generator.manual_seed(((self.seed * 1_000_003 + 1) * 1_000_033 + step) % 2**64)

    def view_losses(self, indices: torch.Tensor, *, views: slice | None = None) -> torch.Tensor:
        """Per-view losses [b, k] of the examples ``indices`` (their own draws: views, class dropout, drop-path), or
        [b, len(views)] of their views ``views`` alone (of the k, with the draws they have among all k)."""
        k, branches = self.views_per_example, self.var.drop_path_branches
        drawn = example_draws(
            self.draws.key,
            indices,
            step=self.draws.step,
            num_views=self.data.num_views,
            k=k,
            drop_path_branches=branches,
        )
        label_b, idx_views = self.data.take(indices, k=k, uniform_bV=drawn.views_bV, device=self.device)
        if views is not None:
            idx_views, drawn = [idx_bkl[:, views] for idx_bkl in idx_views], drawn.of_views(views, k=k)
        with bf16_autocast(self.device, enabled=self.bf16):
            return view_losses(
                self.var,
                self.vqvae,
                label_b,
                idx_views,
                class_dropout=self.class_dropout,
                token_weights_L=self.token_weights_L,
                draws=drawn,
            )

    def prior_loss(self) -> torch.Tensor:
        """The weighted prior-preservation KL on a public bank batch (drop-path from the public key)."""
        batch = self.prior.bank.batch(
            self.prior_batch_size, generator=self.prior_generator, device=self.device
        )
        rows, branches = torch.arange(self.prior_batch_size), self.var.drop_path_branches
        drop_path_BD = (
            to_device(
                self.public_key.uniform(
                    rows, step=self.draws.step, purpose="prior_drop_path", count=branches
                ),
                self.device,
            )
            if branches
            else None
        )
        with bf16_autocast(self.device, enabled=self.bf16):
            kl = prior_preservation_loss(
                self.var, self.prior.teacher, self.vqvae, batch, drop_path_uniform_BD=drop_path_BD
            )
            return self.prior_weight * kl


@dataclass(frozen=True)
class _AfterStep:
    """What follows every step: the convergence evaluation at its steps, then a checkpoint when due."""

    var: VAR
    optimizer: torch.optim.Optimizer
    run: _Run
    evaluate_fn: Callable[[VAR], dict] | None
    evaluation_points: set[int]
    checkpointing: Checkpointing | None
    saves: _SaveDecision | None

    def __call__(self, step: int, private: PrivateTraining | None = None) -> None:
        # Every rank knows the evaluation steps (only the evaluating rank has an evaluate_fn): all save after them.
        evaluation_step = step + 1 in self.evaluation_points
        evaluates = self.evaluate_fn is not None and evaluation_step
        saves = self.saves is not None and self.saves.due(step + 1, evaluation_step=evaluation_step)
        # On every rank: sampling a diverged model would fail on the evaluating rank alone.
        if evaluation_step:
            require_finite_parameters(self.var, step=step + 1, private=private is not None)
        if evaluates or saves:
            self.run.meter.pause()  # neither is training time (and the saved ledger holds this segment's)
        if evaluates:
            self.var.eval()
            compiled = uncompile_blocks(self.var)  # sampling runs the eager blocks (see uncompile_blocks)
            self.run.convergence.append({"step": step + 1, **self.evaluate_fn(self.var)})
            if compiled:
                compile_blocks(self.var)
            self.var.train()
        if saves:
            self.checkpointing.save(
                _training_state(self.var, self.optimizer, step=step + 1, run=self.run, private=private)
            )
            self.saves.saved()


@dataclass(frozen=True)
class _Loop:
    """What the plain and the private loop share: the step's losses, what follows each step, the record, the
    schedule (warm-up already capped at the planned steps) and the log."""

    inputs: _StepInputs
    after_step: _AfterStep
    run: _Run
    log: Logger | None
    plan: RunPlan
    learning_rate: float
    warmup_steps: int

    def schedule(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = lr_at(
            step,
            base_lr=self.learning_rate,
            total_steps=self.plan.planned_steps,
            warmup_steps=self.warmup_steps,
        )
        set_lr(optimizer, lr)
        return lr

    def logging_step(self, step: int) -> bool:
        return is_logging_step(step, log_every=self.plan.log_every, total_steps=self.plan.planned_steps)


def _plain_run(
    optimizer: torch.optim.Optimizer,
    data: TokenViews,
    loop: _Loop,
    *,
    generator: torch.Generator,
    batch_size: int,
    global_clip_norm: float | None,
    rows_per_forward: int = 0,
) -> None:
    """Non-DP steps: fixed-size batches of ``batch_size`` examples from a fresh permutation per epoch (each rank
    takes its share), global gradient-norm clipping at ``global_clip_norm`` (None: off). ``rows_per_forward`` > 0
    puts at most that many rows (examples x k views) through one forward and accumulates the gradients (0: the
    rank's whole share at once); the prior term is computed once per step. Under a process group each rank's mean
    is weighted by its share of the batch (``_rank_weight``), so the averaged gradient and the logged loss are the
    whole batch's mean whether or not the world divides the batch. A non-finite logged loss or gradient norm
    raises ``TrainingDiverged``."""
    batches, run, inputs = (
        epoch_batches(data.num_examples, batch_size=batch_size, generator=generator),
        loop.run,
        loop.inputs,
    )
    history, meter, started = run.history, run.meter, time.perf_counter()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    rank, world = rank_and_world()
    k = inputs.views_per_example
    chunk = examples_per_forward(rows_per_forward, views_per_example=k)

    def one_step(local: torch.Tensor, weight: float):
        optimizer.zero_grad(set_to_none=True)
        if chunk is None:  # one forward and one backward of the whole local batch and the prior term
            loss = inputs.view_losses(local).mean() * weight
            kl = inputs.prior_loss() if inputs.uses_prior else None
            (loss if kl is None else loss + kl).backward()
        else:
            loss = accumulate_loss_gradients(
                inputs.view_losses, local, examples_per_forward=chunk, weight=weight
            )
            kl = inputs.prior_loss() if inputs.uses_prior else None
            if kl is not None:
                kl.backward()
        if world > 1:
            average_gradients(params, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, global_clip_norm or math.inf)
        optimizer.step()
        return loss, kl, grad_norm

    for _ in range(run.start_step):  # a resumed run skips the batches already trained on
        next(batches)
    for step in range(run.start_step, loop.plan.planned_steps):
        inputs.begin_step(step)
        lr = loop.schedule(optimizer, step)
        batch = next(batches)
        local = batch[rank::world]
        with rows_named_on_out_of_memory(rows_per_forward=rows_per_forward, views_per_example=k, step=step):
            loss, kl, grad_norm = meter.run(
                lambda: one_step(local, _rank_weight(len(local), len(batch), world)),  # noqa: B023
                local_rows=len(local) * k,
                rows=len(batch) * k,
            )
        if loop.logging_step(step):
            values = {"loss": _batch_loss(loss, world), "grad_norm": float(grad_norm)}
            require_finite_loss(values, step=step + 1)
            values["lr"] = lr
            if kl is not None:
                values["prior_kl"] = kl.item() / inputs.prior_weight
            meter.pause()  # the values waited for the GPU already; the log (a Ray report) is not training
            record_history(history, loop.log, step=step, started=started, **values)
        loop.after_step(step)
    meter.pause()
    return None


def _rank_weight(local: int, batch: int, world: int) -> float:
    """The factor on a rank's mean loss over its ``local`` examples of a ``batch`` shared by ``world`` ranks so that
    ``average_gradients`` (the sum over ranks / world) gives the gradient of the whole batch's mean: local * world /
    batch (exactly 1.0 where the world divides the batch)."""
    return local * world / batch


def _batch_loss(loss: torch.Tensor, world: int) -> float:
    """The whole batch's mean loss from each rank's weighted mean (``_rank_weight``): their average over the ranks
    (one all-reduce, on logging steps only: every rank logs at the same steps)."""
    if world == 1:
        return loss.item()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return total.item() / world


def accumulate_loss_gradients(
    view_losses_fn: Callable[[torch.Tensor], torch.Tensor],
    indices: torch.Tensor,
    *,
    examples_per_forward: int | None,
    weight: float = 1.0,
) -> torch.Tensor:
    """Backward ``weight`` times the mean per-view loss of the examples ``indices`` ([b] -> losses [b, k] by
    ``view_losses_fn``), ``examples_per_forward`` examples at a time (None: all at once), each chunk's mean weighted
    by its share of the b examples so the accumulated ``p.grad`` is the one-shot gradient. Returns the (detached)
    weighted mean loss."""
    size = examples_per_forward or max(1, len(indices))
    total = None
    for start in range(0, len(indices), size):
        part = indices[start : start + size]
        loss = view_losses_fn(part).mean() * (weight * len(part) / len(indices))
        loss.backward()
        total = loss.detach() if total is None else total + loss.detach()
    return total


def _private_run(
    var: VAR,
    optimizer: torch.optim.Optimizer,
    data: TokenViews,
    loop: _Loop,
    *,
    privacy: PrivacyConfig,
    resources: ResourcesConfig,
    debug_seed: int | None,
    resume: dict | None,
    unsafe_skip_clipping: bool = False,
) -> dict:
    """DP-SGD steps (``privacy.make_private`` with the plan's sigma); returns the privacy ledger."""
    state = make_private(
        var,
        optimizer,
        privacy=privacy,
        resources=resources,
        dataset_size=data.num_examples,
        planned_steps=loop.plan.planned_steps,
        noise_multiplier=loop.plan.noise_multiplier,
        debug_seed=debug_seed,
        unsafe_skip_clipping=unsafe_skip_clipping,
    )
    loop.inputs.draws.key = state.example_key
    try:
        if resume is not None:
            load_privacy_state(state, resume["privacy"], step=int(resume["step"]))
        _private_steps(state, loop, rows_per_forward=resources.rows_per_forward)
    finally:
        release(state)
    return privacy_ledger(state)


def _private_steps(state: PrivateTraining, loop: _Loop, *, rows_per_forward: int) -> None:
    run, inputs = loop.run, loop.inputs
    history, meter, started, kl_values = run.history, run.meter, time.perf_counter(), []

    def public_grad() -> None:
        kl = inputs.prior_loss()
        kl.backward()
        kl_values[:] = [kl.detach()]  # read on logging steps only: a read waits for the GPU

    k = state.privacy.augmentation_multiplicity
    for step in range(run.start_step, loop.plan.planned_steps):
        inputs.begin_step(step)
        lr = loop.schedule(state.optimizer, step)
        indices = next_batch(state)
        # The prior term's cost is per step, not per row: counted apart, else FLOPs per row would reveal the batch size.
        # Every rank computes it (the same public batch): counted once per rank, as the rows are.
        public = meter.fixed_cost(public_grad, copies=state.world_size) if inputs.uses_prior else None
        # The actual Poisson batch size is private (nothing released may depend on it): compute is accounted at the
        # expected batch q*N, and the history holds no batch size.
        with rows_named_on_out_of_memory(
            rows_per_forward=rows_per_forward,
            views_per_example=k,
            step=step,
            splits_views=state.clipping == "bookkeeping",
        ):
            meter.run(
                lambda: private_step(state, indices, inputs.view_losses, public_grad_fn=public),  # noqa: B023
                local_rows=len(indices) * k,
                rows=state.expected_batch_size * k,
            )
        if loop.logging_step(step):
            meter.pause()  # the accounting and the log (a Ray report) are not training
            spent = epsilon_spent(
                noise_multiplier=state.noise_multiplier,
                sampling_rate=state.privacy.sampling_rate,
                steps=state.steps,
                delta=state.delta,
                accountants=("rdp",),
            )
            values = {"lr": lr, "epsilon_rdp": spent["rdp"]}
            if kl_values:
                values["prior_kl"] = kl_values[-1].item() / inputs.prior_weight
            # The loss is private, the noised parameters public: checked on logging steps only (one device sync).
            require_finite_parameters(loop.inputs.var, step=step + 1, private=True)
            record_history(history, loop.log, step=step, started=started, **values)
        loop.after_step(step, state)
    meter.pause()
