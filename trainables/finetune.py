"""The fine-tuning loop of one adaptation trial, with or without DP-SGD.

Composes the pieces as functions: the adapted model (``methods.adapt``), the per-view loss with augmentation
multiplicity and scale weights (``training.view_losses``), optional prior-preservation distillation
(``prior``) and optional DP-SGD (``privacy``). Non-DP steps draw fixed-size batches from a fresh permutation per
epoch; DP steps draw Poisson batches and never log statistics of private examples (no training loss, no
gradient norm, no batch size): their history holds the step, learning rate, epsilon spent and the public prior loss.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from .data.tokens import TokenViews
from .draws import ExampleKey, example_draws
from .methods import trainable_parameters
from .models import VAR, VQVAE
from .pretrain import epoch_batches, is_logging_step, record_history
from .profiling import StepMeter
from .prior import PriorBank, prior_preservation_loss
from .privacy import (PrivacySpec, PrivateTraining, epsilon_spent, load_privacy_state, make_private, next_batch, privacy_ledger,
                      privacy_state_dict, private_step, release, validate_privacy)
from .training import bf16_autocast, build_optimizer, lr_at, scale_loss_weights, set_lr, view_losses

Logger = Callable[[dict], None]


@dataclass(frozen=True)
class FinetuneOptions:
    """steps: optimiser steps; batch_size: examples per non-DP step (DP draws Poisson batches of rate q);
    augmentation_multiplicity: k views per example (must equal the privacy spec's under DP);
    scale_weight_decay: per-scale loss weight decay**s (1 = plain token mean); prior_weight: weight of the
    prior-preservation KL (0 = off), on ``prior_batch_size`` bank samples per step; max_grad_norm: non-DP
    global-norm clipping (DP clips per example with the privacy spec's C)."""

    steps: int
    lr: float
    batch_size: int = 32
    warmup_steps: int = 0
    weight_decay: float = 0.05
    class_dropout: float = 0.1
    augmentation_multiplicity: int = 1
    scale_weight_decay: float = 1.0
    prior_weight: float = 0.0
    prior_batch_size: int = 16
    max_grad_norm: float | None = 2.0
    log_every: int = 50
    eval_every: int = 0  # convergence curve: call ``evaluate_fn`` every this many steps (0 = only if asked at the end)
    eval_points: int = 0  # or at this many evenly spaced steps of the run, the last one final (0 = off; not with eval_every)
    autocast_bf16: bool = False  # forward passes under bf16 autocast when the model is on a CUDA device

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0 or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"invalid options {self}: need steps >= 1, batch_size >= 1, lr > 0, 0 <= warmup_steps <= steps")
        if self.prior_weight < 0 or self.prior_batch_size < 1 or self.augmentation_multiplicity < 1 or self.log_every < 1 or self.eval_every < 0:
            raise ValueError(f"invalid options {self}: need prior_weight >= 0, prior_batch_size >= 1, augmentation_multiplicity >= 1, "
                             "log_every >= 1, eval_every >= 0")
        if self.eval_points < 0 or (self.eval_points and self.eval_every):
            raise ValueError(f"invalid options {self}: need eval_points >= 0, and at most one of eval_every and eval_points")

    def evaluation_steps(self) -> list[int]:
        """Steps done after which ``finetune`` calls its ``evaluate_fn`` (see ``evaluation_steps``)."""
        return evaluation_steps(self.steps, every=self.eval_every, points=self.eval_points)


def evaluation_steps(planned_steps: int, *, every: int = 0, points: int = 0) -> list[int]:
    """The convergence curve's points, as steps done (1..planned_steps): every ``every`` steps, or ``points``
    evenly spaced steps (step ceil(i * planned / points) for i = 1..points; fewer when the run is shorter), and
    always the final step. Pure: every rank and a resumed run compute the same list."""
    if every:
        chosen = set(range(every, planned_steps + 1, every))
    else:
        chosen = {-(-i * planned_steps // points) for i in range(1, points + 1)}
    return sorted(chosen | {planned_steps})


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
    of wall-clock time have passed since the last save (or the run's start). Never after the final step: the
    result follows it. Steps count steps done (1..planned). Pure: the caller measures the time."""

    every_steps: int
    every_fraction: float | None = None
    every_minutes: float | None = None

    def __post_init__(self) -> None:
        if self.every_steps < 1 or not (self.every_fraction is None or 0 < self.every_fraction <= 1) or not (
                self.every_minutes is None or self.every_minutes > 0):
            raise ValueError(f"invalid checkpoint policy {self}: need every_steps >= 1, every_fraction in (0, 1], every_minutes > 0")

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
        return self.every_minutes is not None and 0 < done < planned_steps and seconds_since_save >= 60 * self.every_minutes

    def due(self, done: int, *, planned_steps: int, seconds_since_save: float) -> bool:
        """Whether to save after ``done`` steps of ``planned_steps``, ``seconds_since_save`` after the last save."""
        return self.due_by_steps(done, planned_steps) or self.due_by_time(done, planned_steps, seconds_since_save)


@dataclass(frozen=True)
class Checkpointing:
    """Resumable training. ``save(state)`` is called on every rank at the same steps: when ``policy`` says so
    (every ``every`` steps, every ``every_fraction`` of the planned steps, every ``every_minutes`` of wall-clock
    time by ``clock`` (seconds), whichever comes first; under a process group rank 0's clock decides for all, as
    ``ray.train.report`` is a barrier) and after every convergence evaluation step (so an evaluation is never
    released from a step a resumed run would redo); never after the final step. ``resume`` is a state saved that
    way. Under an initialised process group only rank 0's state is complete enough to keep."""

    every: int
    save: Callable[[dict], None]
    resume: dict | None = None
    every_minutes: float | None = None
    every_fraction: float | None = None
    clock: Callable[[], float] = time.monotonic

    @property
    def policy(self) -> CheckpointPolicy:
        return CheckpointPolicy(every_steps=self.every, every_fraction=self.every_fraction, every_minutes=self.every_minutes)


def check_finetune(data: TokenViews, *, options: FinetuneOptions, privacy: PrivacySpec | None, prior: Prior | None,
                   resume: dict | None = None) -> None:
    """Every setting problem, before any compute."""
    data.check_multiplicity(options.augmentation_multiplicity)
    if options.prior_weight > 0 and prior is None:
        raise ValueError("prior_weight > 0 needs a Prior (frozen base model and its sample bank)")
    if privacy is not None:
        validate_privacy(privacy, dataset_size=data.num_examples, planned_steps=options.steps)
        if privacy.augmentation_multiplicity != options.augmentation_multiplicity:
            raise ValueError(f"augmentation_multiplicity differs between the options ({options.augmentation_multiplicity}) "
                             f"and the privacy spec ({privacy.augmentation_multiplicity})")
    if resume is not None and ("privacy" in resume) != (privacy is not None):
        raise ValueError(f"the checkpoint at step {resume['step']} was saved by a {'DP' if 'privacy' in resume else 'non-DP'} run, but this run "
                         f"is {'DP' if privacy is not None else 'not DP'}: "
                         + ("resume it with the privacy spec it was trained under (continuing without DP would release a model the "
                            "ledger does not cover)" if privacy is None else
                            "a DP run cannot continue steps taken without DP; start it from the base model"))


def finetune(var: VAR, vqvae: VQVAE, data: TokenViews, *, options: FinetuneOptions, privacy: PrivacySpec | None = None,
             prior: Prior | None = None, seed: int = 0, sampling_seed: int | None = None, log: Logger | None = None,
             evaluate_fn: Callable[[VAR], dict] | None = None, checkpointing: Checkpointing | None = None) -> dict:
    """Train the trainable parameters of an adapted ``var``; returns {"history": [...], "privacy": ledger or None,
    "convergence": [{"step": s, **evaluate_fn(var)}, ...]} (evaluations at ``options.evaluation_steps()``: every
    ``eval_every`` steps or at ``eval_points`` evenly spaced steps, and at the end; ``evaluate_fn`` sees the model in
    eval mode, e.g. a small-sample FID).
    Under an initialised process group each rank trains on its share of every batch and gradients are averaged.

    Randomness. Each example's own draws (which k cached views, class dropout, drop-path) are keyed by (key, step,
    example index) (``trainables/draws.py``): they do not depend on the rest of the batch, the rank or the physical
    chunk. Prior-bank batches come from a public stream seeded by (seed, step), independent of the private batch.
    Without DP the key comes from ``seed``, so a run resumed from ``checkpointing.resume`` continues bit-identically on
    the same device. Under DP the example key, the Poisson sampling and the noise are seeded from OS entropy
    (``sampling_seed``, for tests and debugging, seeds the sampling and the example key; the ledger says so); a
    checkpoint holds no generator state, so a resumed DP run draws fresh entropy: nobody who reads a checkpoint can
    predict the noise of later steps. Its accounting continues exactly (the steps taken are in the checkpoint)."""
    resume = checkpointing.resume if checkpointing is not None else None
    check_finetune(data, options=options, privacy=privacy, prior=prior, resume=resume)
    device = next(var.parameters()).device
    # Non-DP batches come from a stream shared by all ranks (each takes its share); DP batches from the private sampler.
    sampling_generator = torch.Generator().manual_seed(seed)
    prior_generator = torch.Generator()
    public_key = ExampleKey.from_seed(seed)
    draws = _StepDraws(key=public_key)  # a DP run replaces the key by its secret one (privacy.make_private)
    weights_L = scale_loss_weights(var.patch_nums, decay=options.scale_weight_decay).to(device) if options.scale_weight_decay != 1.0 else None
    optimizer = build_optimizer(var, lr=options.lr, weight_decay=options.weight_decay)
    k, branches = options.augmentation_multiplicity, var.drop_path_branches

    # Only the forwards are autocast: backward ops follow their forward's dtypes, and the losses come out float32.
    bf16 = training_autocast(options, privacy) and device.type == "cuda"
    autocast = lambda: bf16_autocast(device, enabled=bf16)  # noqa: E731

    def loss_fn(indices: torch.Tensor) -> torch.Tensor:
        drawn = example_draws(draws.key, indices, step=draws.step, num_views=data.num_views, k=k, drop_path_branches=branches)
        label_b, idx_views = data.take(indices, k=k, uniform_bV=drawn.views_bV, device=device)
        with autocast():
            return view_losses(var, vqvae, label_b, idx_views, class_dropout=options.class_dropout, token_weights_L=weights_L, draws=drawn)

    def prior_loss() -> torch.Tensor:
        batch = prior.bank.batch(options.prior_batch_size, generator=prior_generator, device=device)
        rows = torch.arange(options.prior_batch_size)
        drop_path_BD = public_key.uniform(rows, step=draws.step, purpose="prior_drop_path", count=branches).to(device) if branches else None
        with autocast():
            return options.prior_weight * prior_preservation_loss(var, prior.teacher, vqvae, batch, drop_path_uniform_BD=drop_path_BD)

    run = _Run(history=[], convergence=[], meter=StepMeter(device), start_step=0)
    if resume is not None:
        _restore(var, optimizer, resume, run)
    evaluation_points = set(options.evaluation_steps())
    saves = _SaveDecision(checkpointing, planned_steps=options.steps, device=device) if checkpointing is not None else None

    def begin_step(step: int) -> None:
        draws.step = step
        prior_generator.manual_seed((seed * 1_000_003 + 1) * 1_000_033 + step)

    def after_step(step: int, private: PrivateTraining | None = None) -> None:
        # Every rank knows the evaluation steps (only the evaluating rank has an evaluate_fn): all save after them.
        evaluation_step = step + 1 in evaluation_points
        if evaluate_fn is not None and evaluation_step:
            var.eval()
            run.convergence.append({"step": step + 1, **evaluate_fn(var)})
            var.train()
        if saves is not None and saves.due(step + 1, evaluation_step=evaluation_step):
            checkpointing.save(_training_state(var, optimizer, step=step + 1, run=run, private=private))
            saves.saved()

    var.train()
    common = dict(loss_fn=loss_fn, prior_loss=prior_loss if options.prior_weight > 0 else None, options=options,
                  log=log, begin_step=begin_step, after_step=after_step, run=run)
    if privacy is None:
        ledger = _plain_run(optimizer, data, generator=sampling_generator, **common)
    else:
        # A resumed DP run must not repeat the lost run's draws: caller-seeded sampling moves to a seed of its own.
        seed_now = sampling_seed if resume is None or sampling_seed is None else sampling_seed * 1_000_003 + run.start_step
        ledger = _private_run(var, optimizer, data, privacy=privacy, sampling_seed=seed_now, resume=resume, draws=draws, **common)
    var.eval()
    return {"history": run.history, "privacy": ledger, "convergence": run.convergence,
            "compute": {**run.meter.report(), "training_precision": "bf16 autocast" if bf16 else "float32"}}


class _SaveDecision:
    """Applies a ``Checkpointing``'s policy during a run: step-based saves and saves after evaluation steps are
    known to every rank; the wall-clock one is rank 0's, broadcast to the others (one int, only on steps where
    nothing else decides and a time limit is set). Nothing about the batch enters the decision (DP: the times are
    released without noise anyway)."""

    def __init__(self, checkpointing: Checkpointing, *, planned_steps: int, device: torch.device):
        self.policy, self.clock, self.planned, self.device = checkpointing.policy, checkpointing.clock, planned_steps, device
        self.last_save = self.clock()

    def due(self, done: int, *, evaluation_step: bool) -> bool:
        if not 0 < done < self.planned:
            return False
        if evaluation_step or self.policy.due_by_steps(done, self.planned):
            return True
        if self.policy.every_minutes is None:
            return False
        return _rank0_decides(self.policy.due_by_time(done, self.planned, self.clock() - self.last_save), device=self.device)

    def saved(self) -> None:
        self.last_save = self.clock()


def _rank0_decides(flag: bool, *, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank of an initialised process group (a one-element broadcast); ``flag`` alone."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")  # NCCL moves CUDA tensors only
    value = torch.tensor([int(flag)], dtype=torch.int32, device=on)
    dist.broadcast(value, src=0)
    return bool(value.item())


@dataclass
class _StepDraws:
    """The key and step the per-example draws of the current step use."""

    key: ExampleKey
    step: int = 0


def training_autocast(options: FinetuneOptions, privacy: PrivacySpec | None) -> bool:
    """Whether the forwards may run under bf16 autocast (on CUDA). Not with Opacus ghost clipping: its norms are
    taken in the activations' dtype, and a bf16-rounded norm could let a clipped gradient exceed C."""
    return options.autocast_bf16 and (privacy is None or privacy.clipping != "ghost")


@dataclass
class _Run:
    """What a run accumulates (and a checkpoint keeps)."""

    history: list[dict]
    convergence: list[dict]
    meter: StepMeter
    start_step: int


def _training_state(var: VAR, optimizer, *, step: int, run: _Run, private: PrivateTraining | None) -> dict:
    """Everything a resumed run needs, as tensors and plain values (``torch.save``-able with weights_only)."""
    state = {"step": step, "trainable": {name: p.detach().cpu().clone() for name, p in trainable_parameters(var).items()},
             "optimizer": optimizer.state_dict(), "history": list(run.history), "convergence": list(run.convergence),
             "compute": dataclasses.asdict(run.meter.ledger)}
    if private is not None:
        state["privacy"] = privacy_state_dict(private)  # the accounting only: no generator state (see finetune)
    return state


def _restore(var: VAR, optimizer, state: dict, run: _Run) -> None:
    params = trainable_parameters(var)
    if set(params) != set(state["trainable"]):
        raise ValueError(f"the checkpoint's trainable parameters differ from this model's: "
                         f"{sorted(set(params) ^ set(state['trainable']))[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    run.history[:], run.convergence[:] = state["history"], state["convergence"]
    for key, value in state["compute"].items():
        setattr(run.meter.ledger, key, value)
    run.start_step = int(state["step"])


def _plain_run(optimizer, data, *, loss_fn, prior_loss, options, generator, log, begin_step, after_step, run):
    batches, history, meter, started = epoch_batches(data.num_examples, batch_size=options.batch_size, generator=generator), run.history, run.meter, time.perf_counter()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    k = options.augmentation_multiplicity

    def one_step(local: torch.Tensor):
        loss = loss_fn(local).mean()
        kl = prior_loss() if prior_loss is not None else None
        optimizer.zero_grad(set_to_none=True)
        (loss if kl is None else loss + kl).backward()
        if world > 1:
            _average_gradients(params, world)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm or math.inf)
        optimizer.step()
        return loss, kl, grad_norm

    for _ in range(run.start_step):  # a resumed run skips the batches already trained on
        next(batches)
    for step in range(run.start_step, options.steps):
        begin_step(step)
        lr = _schedule(optimizer, step, options)
        batch = next(batches)
        local = batch[rank::world]
        (loss, kl, grad_norm), seconds = meter.run(lambda: one_step(local), local_rows=len(local) * k)
        meter.ledger.add_training(len(batch) * k, seconds)
        if is_logging_step(step, options):
            values = {"loss": loss.item(), "grad_norm": float(grad_norm), "lr": lr}
            record_history(history, log, step=step, started=started, **values, **({"prior_kl": kl.item() / options.prior_weight} if kl is not None else {}))
        after_step(step)
    return None


def _average_gradients(params: list[torch.Tensor], world: int) -> None:
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _private_run(var, optimizer, data, *, loss_fn, prior_loss, options, privacy, sampling_seed, resume, draws, log, begin_step, after_step, run):
    state = make_private(var, optimizer, spec=privacy, dataset_size=data.num_examples, planned_steps=options.steps,
                         sampling_seed=sampling_seed)
    draws.key = state.example_key
    try:
        if resume is not None:
            load_privacy_state(state, resume["privacy"])
        _private_steps(state, loss_fn=loss_fn, prior_loss=prior_loss, options=options, log=log, begin_step=begin_step,
                       after_step=lambda step: after_step(step, state), run=run)
    finally:
        release(state)
    return privacy_ledger(state)


def _private_steps(state, *, loss_fn, prior_loss, options, log, begin_step, after_step, run) -> None:
    history, meter, started, kl_values = run.history, run.meter, time.perf_counter(), []

    def public_grad() -> None:
        kl = prior_loss()
        kl.backward()
        kl_values.append(kl.item())

    k = state.spec.augmentation_multiplicity
    for step in range(run.start_step, options.steps):
        begin_step(step)
        lr = _schedule(state.optimizer, step, options)
        indices = next_batch(state)
        # The prior term's cost is per step, not per row: counted apart, else FLOPs per row would reveal the batch size.
        public = meter.fixed_cost(public_grad) if prior_loss is not None else None
        _, seconds = meter.run(lambda: private_step(state, indices, loss_fn, public_grad_fn=public), local_rows=len(indices) * k)
        # The actual Poisson batch size is private (nothing released may depend on it): compute is accounted at the
        # expected batch q*N, and the history holds no batch size.
        meter.ledger.add_training(state.expected_batch_size * k, seconds)
        if is_logging_step(step, options):
            spent = epsilon_spent(noise_multiplier=state.noise_multiplier, sampling_rate=state.spec.sampling_rate, steps=state.steps,
                                  delta=state.delta, accountants=("rdp",))
            values = {"lr": lr, "epsilon_rdp": spent["rdp"]}
            if kl_values:
                values["prior_kl"] = kl_values[-1] / options.prior_weight
            record_history(history, log, step=step, started=started, **values)
        after_step(step)


def _schedule(optimizer, step: int, options: FinetuneOptions) -> float:
    lr = lr_at(step, base_lr=options.lr, total_steps=options.steps, warmup_steps=options.warmup_steps)
    set_lr(optimizer, lr)
    return lr
