"""Prior-preservation distillation: keep the adapted VAR close to the frozen base model on the base domain.

A bank of token maps is sampled once from the frozen base model (its own classes, classifier-free guidance), before
fine-tuning. During fine-tuning a KL term pulls the student's next-token distributions towards the teacher's on
those maps. Both models are conditioned on their unconditional label: the student's base class rows were replaced
by the target label set, while the unconditional row (kept by ``resize_class_embedding``) is common to both, so
the term preserves the base model's unconditional prior over base-domain images.

The bank depends on no training example, so under DP its gradient is public: it is added after noising and
costs no privacy (``private_step(public_grad_fn=...)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.schema import EvaluationConfig

from .data.tokens import to_device
from .models import VAR, VQVAE
from .training import teacher_forcing_batch


@dataclass(frozen=True)
class PriorBank:
    """Token maps [M, pn*pn] per scale sampled from the base model, with the base classes they were drawn for."""

    base_labels_M: torch.Tensor
    tokens: tuple[torch.Tensor, ...]

    @property
    def size(self) -> int:
        return self.base_labels_M.shape[0]

    def batch(
        self, size: int, *, generator: torch.Generator, device: torch.device | str = "cpu"
    ) -> list[torch.Tensor]:
        pick = torch.randint(0, self.size, (size,), generator=generator)
        return [to_device(t[to_device(pick, t.device)], device) for t in self.tokens]


@torch.no_grad()
def build_prior_bank(
    teacher: VAR,
    vqvae: VQVAE,
    *,
    num_samples: int,
    evaluation: EvaluationConfig,
    generator: torch.Generator,
    chunk_size: int = 64,
) -> PriorBank:
    """Sample ``num_samples`` token maps from ``teacher`` for uniformly drawn base classes (on the teacher's device),
    ``chunk_size`` at a time, with the trial's sampling settings (``evaluation``'s guidance scale, top-k, top-p)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    device = next(teacher.parameters()).device
    labels_M = torch.randint(0, teacher.num_classes, (num_samples,), generator=generator)
    # Sampling draws on the teacher's device: derive a generator there from ``generator`` (reproducible anywhere).
    device_generator = torch.Generator(device=device).manual_seed(
        int(torch.randint(0, 2**62, (1,), generator=generator))
    )
    chunks = []
    for start in range(0, num_samples, chunk_size):
        label_B = labels_M[start : start + chunk_size].to(device)
        chunks.append(
            teacher.sample_tokens(
                label_B,
                vqvae=vqvae,
                cfg=evaluation.guidance_scale,
                top_p=evaluation.top_p,
                top_k=min(evaluation.top_k, teacher.vocab_size),
                generator=device_generator,
            )
        )
    tokens = tuple(torch.cat([chunk[si] for chunk in chunks]).cpu() for si in range(len(teacher.patch_nums)))
    return PriorBank(labels_M, tokens)


def prior_preservation_loss(
    student: VAR,
    teacher: VAR,
    vqvae: VQVAE,
    idx_Bl: list[torch.Tensor],
    *,
    drop_path_uniform_BD: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token-mean KL(teacher || student) of the next-token distributions on bank token maps, both models
    conditioned on their unconditional label. Gradient flows into the student only. ``drop_path_uniform_BD``
    decides the student's drop-path (see ``VAR.forward``; fine-tuning passes public draws, so this term depends
    on nothing private, not even through torch's global generator)."""
    x_BLCv, _ = teacher_forcing_batch(vqvae, idx_Bl)
    B = x_BLCv.shape[0]
    was_training = teacher.training
    teacher.eval()  # deterministic targets: no drop-path in the teacher
    try:
        with torch.no_grad():
            teacher_logp_BLV = teacher(
                torch.full((B,), teacher.unconditional_label, device=x_BLCv.device), x_BLCv
            ).log_softmax(-1)
    finally:
        teacher.train(was_training)
    student_logp_BLV = student(
        torch.full((B,), student.unconditional_label, device=x_BLCv.device),
        x_BLCv,
        drop_path_uniform_BD=drop_path_uniform_BD,
    ).log_softmax(-1)
    kl_BL = F.kl_div(student_logp_BLV, teacher_logp_BLV, log_target=True, reduction="none").sum(-1)
    return kl_BL.mean()
