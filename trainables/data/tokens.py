"""Token maps of a dataset with several augmented views per example, as training reads them.

``views[si]`` holds, for scale si, the VQVAE token indices of every example's V augmented views [N, V, pn*pn]
(computed once by the frozen VQVAE; the on-disk cache of a later issue produces the same structure).
Augmentation multiplicity k draws k distinct views of each sampled example per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenViews:
    labels_N: torch.Tensor
    views: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if self.labels_N.ndim != 1 or not self.views:
            raise ValueError("TokenViews needs labels [N] and at least one scale of token views")
        N, V = self.labels_N.shape[0], self.views[0].shape[1]
        bad = [si for si, v in enumerate(self.views) if v.ndim != 3 or v.shape[:2] != (N, V)]
        if bad:
            raise ValueError(
                f"token views of scales {bad} are not [N={N}, V={V}, pn*pn]: {[list(self.views[si].shape) for si in bad]}"
            )

    @classmethod
    def single_view(cls, labels_N: torch.Tensor, tokens: Sequence[torch.Tensor]) -> TokenViews:
        """From one token map per example ([N, pn*pn] per scale)."""
        return cls(labels_N, tuple(t[:, None] for t in tokens))

    @property
    def num_examples(self) -> int:
        return self.labels_N.shape[0]

    @property
    def num_views(self) -> int:
        return self.views[0].shape[1]

    def check_multiplicity(self, k: int) -> None:
        if not 1 <= k <= self.num_views:
            raise ValueError(
                f"augmentation multiplicity k={k} needs k distinct cached views per example, "
                f"but the token data holds {self.num_views}"
            )

    def take(
        self,
        indices: torch.Tensor,
        *,
        k: int,
        generator: torch.Generator | None = None,
        uniform_bV: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(labels [b], per scale the token maps [b, k, pn*pn] of k distinct views of each example, int64). The views
        are those with the k smallest of the example's V uniforms: ``uniform_bV`` (per-example draws, see
        trainables/draws.py) or, without it, uniforms drawn from ``generator`` in batch order."""
        self.check_multiplicity(k)
        if uniform_bV is None:
            uniform_bV = torch.rand(len(indices), self.num_views, generator=generator)
        elif tuple(uniform_bV.shape) != (len(indices), self.num_views):
            raise ValueError(
                f"uniform_bV must be [b={len(indices)}, V={self.num_views}], got {list(uniform_bV.shape)}"
            )
        pick_bk = uniform_bV.cpu().argsort(dim=1)[:, :k]
        rows_b1 = indices[:, None]
        # One transfer of every scale's maps (a copy per scale would be ten), cast to int64 on the device.
        picked = [v[rows_b1, pick_bk] for v in self.views]
        flat = to_device(torch.cat([t.flatten() for t in picked]), device).to(torch.long)
        return (
            to_device(self.labels_N[indices], device),
            [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in picked]), picked)],
        )


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``, without making the host wait for the device: a CPU tensor bound for a CUDA device
    goes through a fresh page-locked copy as an asynchronous copy, where a plain ``.to`` synchronises the stream (the
    host would wait for every queued kernel, e.g. the last step's, before drawing and queueing the next). The
    page-locked buffer is not reused before the copy has run (PyTorch's host allocator records the copy on the
    stream). Asynchronous only where that is safe: to CUDA from the host or from CUDA, and to the meta device (no
    data); every other copy (to the host above all: it must be complete when it is read) is a plain ``.to``."""
    device = torch.device(device)
    if device.type == "meta" or (device.type == "cuda" and tensor.device.type == "cuda"):
        return tensor.to(device, non_blocking=True)
    if device.type == "cuda" and tensor.device.type == "cpu":
        # pin_memory() returns a pinned tensor itself: copy it, so the caller's buffer is never read late
        pinned = tensor.clone().pin_memory() if tensor.is_pinned() else tensor.pin_memory()
        return pinned.to(device, non_blocking=True)
    return tensor.to(device)
