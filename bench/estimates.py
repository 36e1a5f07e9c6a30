"""Dry-run estimates of a sweep: steps, training rows and GPU hours per trial, from the published model sizes and
an assumed utilisation (stated in the output). Standard library only."""
from __future__ import annotations

from .schema import DATASETS, TrialConfig

VAR_PARAMETERS = {16: 310_283_520, 20: 600_917_136, 24: 1_033_399_360, 30: 2_010_020_356}  # REFERENCE.md §1
TOKENS_PER_IMAGE = 680  # official patch_nums 1..16
ASSUMED_FLOPS_PER_GPU = 989e12 * 0.35  # H100 dense bf16 peak at 35% utilisation
# Training FLOPs per token = (2 forward + 4 backward) x parameters for full fine-tuning; adapters skip the weight
# gradients of the frozen layers (2 forward + 2 input-gradient).
FLOPS_PER_PARAMETER_TOKEN = {"full": 6, "base": 0}


def training_flops(config: TrialConfig, *, train_images: int, steps: int) -> float:
    if config.model.base != "official":
        return 0.0
    k = 1 if config.privacy is None else config.privacy.augmentation_multiplicity
    rows = steps * k * (config.privacy.sampling_rate * train_images if config.privacy else config.optimization.batch_size)
    per_token = FLOPS_PER_PARAMETER_TOKEN.get(config.method.name, 4)
    return per_token * VAR_PARAMETERS[config.model.depth] * TOKENS_PER_IMAGE * rows


def estimate(configs: list[TrialConfig], *, done: set[str], plans: dict) -> str:
    """A table of the sweep: one line per trial, then totals."""
    lines = [f"{'trial':<44} {'id':<16} {'status':<8} {'workers x GPU':>13} {'steps':>7} {'GPU h':>8}"]
    total_hours, todo = 0.0, 0
    for c in configs:
        plan = plans.get(c.trial_id)
        images = plan.train_images if plan is not None else DATASETS[c.data.dataset].train_images
        steps = plan.planned_steps if plan is not None else c.planned_steps(images)
        hours = training_flops(c, train_images=images, steps=steps) / ASSUMED_FLOPS_PER_GPU / 3600
        finished = c.trial_id in done
        if not finished:
            total_hours, todo = total_hours + hours, todo + 1
        gpus = f"{c.resources.workers} x {c.resources.gpus_per_worker:g}"
        lines.append(f"{c.label:<44} {c.trial_id:<16} {'done' if finished else 'pending':<8} {gpus:>13} {steps:>7} {hours:>8.2f}")
    lines.append(f"{todo} of {len(configs)} trials to run; estimated training GPU hours {total_hours:.1f} "
                 f"(model FLOPs at {ASSUMED_FLOPS_PER_GPU / 1e12:.0f} TFLOP/s per GPU; evaluation and tiny models not included)")
    return "\n".join(lines)
