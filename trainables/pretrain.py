"""Train a tiny VQVAE and pre-train / fine-tune a tiny class-conditional VAR from scratch.

The embedded default cannot download the official weights, so it makes its own small base model the same
way VAR's was made: a VQVAE trained for reconstruction through the multi-scale quantiser, then a VAR trained
on the frozen VQVAE's tokens. Tokens are computed once per image set (the VQVAE is frozen), not at every step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data.offline import to_unit_range
from .models import VAR, VQVAE
from .training import (
    Logger,
    build_optimizer,
    epoch_batches,
    is_logging_step,
    lr_at,
    record_history,
    set_lr,
    teacher_forcing_batch,
    token_cross_entropy,
    var_training_step,
)


@dataclass(frozen=True)
class Schedule:
    """Optimisation of one stage: ``steps`` AdamW steps of ``batch_size`` examples, warm-up then cosine decay."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    weight_decay: float = 0.05
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(
                f"invalid schedule {self}: need steps >= 1, batch_size >= 1, lr > 0, 0 <= warmup_steps <= steps"
            )


@torch.no_grad()
def reconstruction_mse(vqvae: VQVAE, images_N3HW: torch.Tensor, *, batch_size: int = 256) -> float:
    """Mean squared error in [-1, 1] units of encode -> quantise -> decode."""
    vqvae.eval()
    device, total = next(vqvae.parameters()).device, 0.0
    for start in range(0, len(images_N3HW), batch_size):
        img = to_unit_range(images_N3HW[start : start + batch_size]).to(device)
        rec = vqvae.idxBl_to_img(vqvae.img_to_idxBl(img))
        total += F.mse_loss(rec, img, reduction="sum").item()
    return total / images_N3HW.numel()


@torch.no_grad()
def init_codebook_from_data(vqvae: VQVAE, images_N3HW: torch.Tensor, *, generator: torch.Generator) -> None:
    """Set the codebook to latent vectors of random training images (area-averaged to every scale), so that no
    code starts far from the data and dies."""
    device = next(vqvae.parameters()).device
    take = torch.randperm(len(images_N3HW), generator=generator)[:256]
    f_BChw = vqvae.img_to_f(to_unit_range(images_N3HW[take]).to(device))
    pool = [
        F.interpolate(f_BChw, size=(pn, pn), mode="area").permute(0, 2, 3, 1).reshape(-1, f_BChw.shape[1])
        for pn in vqvae.patch_nums
    ]
    pool_NC = torch.cat(pool)
    pick = torch.randint(len(pool_NC), (vqvae.vocab_size,), generator=generator)
    vqvae.quantize.embedding.weight.copy_(pool_NC[pick.to(pool_NC.device)])


@torch.no_grad()
def restart_dead_codes(
    vqvae: VQVAE, f_BChw: torch.Tensor, *, generator: torch.Generator, min_hits: float = 1e-3
) -> int:
    """Move codes whose EMA usage summed over scales is below ``min_hits`` onto random current latent vectors.
    Returns the number of codes restarted."""
    dead_V = vqvae.quantize.ema_vocab_hit_SV.sum(dim=0) < min_hits
    n_dead = int(dead_V.sum())
    if n_dead:
        vectors_NC = f_BChw.permute(0, 2, 3, 1).reshape(-1, f_BChw.shape[1])
        pick = torch.randint(len(vectors_NC), (n_dead,), generator=generator).to(vectors_NC.device)
        vqvae.quantize.embedding.weight[dead_V] = vectors_NC[pick]
        vqvae.quantize.ema_vocab_hit_SV[:, dead_V] = 1.0  # give restarted codes time to be used
    return n_dead


def train_vqvae(
    vqvae: VQVAE,
    images_N3HW: torch.Tensor,
    *,
    schedule: Schedule,
    seed: int = 0,
    restart_every: int = 25,
    log: Logger | None = None,
) -> list[dict]:
    """Reconstruction (MSE) + multi-scale VQ losses (codebook + 0.25 * commitment); returns the history."""
    generator = torch.Generator().manual_seed(seed)
    device = next(vqvae.parameters()).device
    init_codebook_from_data(vqvae, images_N3HW, generator=generator)
    optimizer = build_optimizer(vqvae, lr=schedule.lr, weight_decay=schedule.weight_decay)
    batches, history, started = (
        epoch_batches(len(images_N3HW), batch_size=schedule.batch_size, generator=generator),
        [],
        time.perf_counter(),
    )
    vqvae.train()
    for step in range(schedule.steps):
        set_lr(
            optimizer,
            lr_at(
                step,
                base_lr=schedule.lr,
                total_steps=schedule.steps,
                warmup_steps=schedule.warmup_steps,
                min_ratio=0.1,
            ),
        )
        img = to_unit_range(images_N3HW[next(batches)]).to(device)
        f_BChw = vqvae.img_to_f(img)
        f_hat_BChw, vq_loss, _ = vqvae.quantize(f_BChw)
        rec_loss = F.mse_loss(vqvae.decoder(vqvae.post_quant_conv(f_hat_BChw)), img)
        optimizer.zero_grad(set_to_none=True)
        (rec_loss + vq_loss).backward()
        optimizer.step()
        restarted = (
            restart_dead_codes(vqvae, f_BChw.detach(), generator=generator)
            if (step + 1) % restart_every == 0
            else 0
        )
        # Reading losses forces a device sync: only when logging.
        if is_logging_step(step, log_every=schedule.log_every, total_steps=schedule.steps):
            record_history(
                history,
                log,
                step=step,
                started=started,
                rec_mse=rec_loss.item(),
                vq_loss=vq_loss.item(),
                codes_restarted=restarted,
            )
    vqvae.eval()
    return history


@torch.no_grad()
def encode_tokens(vqvae: VQVAE, images_N3HW: torch.Tensor, *, batch_size: int = 256) -> list[torch.Tensor]:
    """Token indices of every image, one LongTensor [N, pn*pn] per scale (computed once; the VQVAE is frozen)."""
    vqvae.eval()
    device = next(vqvae.parameters()).device
    chunks = [
        vqvae.img_to_idxBl(to_unit_range(images_N3HW[s : s + batch_size]).to(device))
        for s in range(0, len(images_N3HW), batch_size)
    ]
    return [torch.cat([chunk[si] for chunk in chunks]).cpu() for si in range(len(vqvae.patch_nums))]


def train_var(
    var: VAR,
    vqvae: VQVAE,
    tokens: Sequence[torch.Tensor],
    labels_N: torch.Tensor,
    *,
    schedule: Schedule,
    class_dropout: float = 0.1,
    max_grad_norm: float | None = 2.0,
    seed: int = 0,
    log: Logger | None = None,
) -> list[dict]:
    """Train every trainable parameter of ``var`` on cached tokens (pre-training from scratch or full fine-tuning)."""
    generator = torch.Generator().manual_seed(seed)
    device = next(var.parameters()).device
    optimizer = build_optimizer(var, lr=schedule.lr, weight_decay=schedule.weight_decay)
    batches, history, started = (
        epoch_batches(len(labels_N), batch_size=schedule.batch_size, generator=generator),
        [],
        time.perf_counter(),
    )
    for step in range(schedule.steps):
        set_lr(
            optimizer,
            lr_at(step, base_lr=schedule.lr, total_steps=schedule.steps, warmup_steps=schedule.warmup_steps),
        )
        pick = next(batches)
        out = var_training_step(
            var,
            vqvae,
            optimizer,
            labels_N[pick].to(device),
            [t[pick].to(device) for t in tokens],
            class_dropout=class_dropout,
            max_grad_norm=max_grad_norm,
            generator=generator,
        )
        if is_logging_step(step, log_every=schedule.log_every, total_steps=schedule.steps):
            record_history(history, log, step=step, started=started, **out)
    var.eval()
    return history


@torch.no_grad()
def token_nll(
    var: VAR, vqvae: VQVAE, tokens: Sequence[torch.Tensor], labels_N: torch.Tensor, *, batch_size: int = 256
) -> float:
    """Held-out mean cross-entropy per token in nats (teacher forcing, no class dropout)."""
    var.eval()
    device, total, count = next(var.parameters()).device, 0.0, 0
    for start in range(0, len(labels_N), batch_size):
        idx_Bl = [t[start : start + batch_size].to(device) for t in tokens]
        x_BLCv_wo_first_l, target_BL = teacher_forcing_batch(vqvae, idx_Bl)
        losses_BL = token_cross_entropy(
            var(labels_N[start : start + batch_size].to(device), x_BLCv_wo_first_l), target_BL
        )
        total, count = total + losses_BL.sum().item(), count + losses_BL.numel()
    return total / count
