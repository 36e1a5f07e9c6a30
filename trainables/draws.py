"""Per-example random draws of a training step, keyed by (key, step, purpose, example index).

DP-SGD's sensitivity bound says: adding or removing one example changes the step's sum of clipped per-example
gradients by at most C. That holds only if no other example's gradient changes, so the random choices made for an
example (which k of its cached views, class dropout, drop-path) must not depend on which other examples are in the
batch or where it sits in it. Drawing them in batch order from one stream breaks that (one more example shifts every
later example's draws). Here every draw is a keyed hash of the example's own index: an example's randomness is the
same whatever else is sampled, and for a secret key the draws of different examples are independent uniforms.

Under DP the key is drawn from OS entropy (never stored: a resumed run draws a new one); without DP it is derived
from the trial's seed, so runs reproduce and a resumed run repeats the lost steps exactly.

The per-step words come from keyed BLAKE2b of (step, purpose); within a step, a few rounds of murmur3's 32-bit
finaliser mix those words with the example index and the draw's slot. Arithmetic stays within int64 (32-bit
products are split into 16-bit halves), so the values are the same on every device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
MAX_INDEX = 2**32


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2**32 for int64 tensors holding uint32 values, without overflowing int64."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser: a bijection of uint32 in which every input bit flips each output bit with probability ~1/2."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


@dataclass(frozen=True)
class ExampleKey:
    """The key of a run's per-example draws. ``secret``: drawn from OS entropy (DP); otherwise derived from a seed."""

    key: bytes
    secret: bool

    @classmethod
    def from_entropy(cls) -> ExampleKey:
        return cls(os.urandom(32), secret=True)

    @classmethod
    def from_seed(cls, seed: int, *, purpose: str = "examples") -> ExampleKey:
        digest = hashlib.blake2b(f"varsweep {purpose} {int(seed)}".encode(), digest_size=32).digest()
        return cls(digest, secret=False)

    def __repr__(self) -> str:  # never print a secret key into a log
        return f"ExampleKey(secret={self.secret})"

    def _step_words(self, step: int, purpose: str) -> list[int]:
        digest = hashlib.blake2b(f"{int(step)} {purpose}".encode(), key=self.key, digest_size=16).digest()
        return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]

    def uniform(self, index_B: torch.Tensor, *, step: int, purpose: str, count: int) -> torch.Tensor:
        """Uniforms in [0, 1) [B, count] float32 on ``index_B``'s device: row b depends only on (key, step, purpose,
        index_B[b]), so the same example gets the same draws in any batch, at any position, on any rank."""
        index_B = index_B.to(torch.int64)
        if index_B.numel() and (int(index_B.min()) < 0 or int(index_B.max()) >= MAX_INDEX):
            raise ValueError(
                f"example indices must be in [0, 2**32), got [{int(index_B.min())}, {int(index_B.max())}]"
            )
        w0, w1, w2, w3 = self._step_words(step, purpose)
        example_B1 = _mix32(_mix32(index_B[:, None] ^ w0) ^ w1)
        slot_1S = _mix32(torch.arange(count, device=index_B.device, dtype=torch.int64)[None] ^ w2)
        h_BS = _mix32(_mix32((example_B1 + slot_1S) & MASK32) ^ w3)
        h_BS = _mix32(
            h_BS ^ example_B1
        )  # a second pass over the example word: (i, s) pairs with equal sums differ
        return (h_BS >> 8).to(torch.float32) * 2.0**-24


@dataclass(frozen=True)
class ExampleDraws:
    """The random choices of one batch of b examples, as uniforms in [0, 1): ``views_bV`` orders each example's V
    cached views (the k smallest are taken), ``label_b`` decides class dropout (shared by the example's views), and
    ``drop_path_RD`` (rows R = b*k, example-major; D = 2*depth residual branches) decides stochastic depth, or None
    when the model has no drop-path."""

    views_bV: torch.Tensor
    label_b: torch.Tensor
    drop_path_RD: torch.Tensor | None

    def of_views(self, views: slice, *, k: int) -> ExampleDraws:
        """The draws of the views ``views`` of each example's k (drop-path rows R = b * len(views)): a forward of
        those views alone gets exactly the draws they have in one forward of all k."""
        drop_path = self.drop_path_RD
        if drop_path is not None:
            drop_path = drop_path.view(-1, k, drop_path.shape[-1])[:, views].reshape(-1, drop_path.shape[-1])
        return dataclasses.replace(self, drop_path_RD=drop_path)


def example_draws(
    key: ExampleKey, index_b: torch.Tensor, *, step: int, num_views: int, k: int, drop_path_branches: int = 0
) -> ExampleDraws:
    """Draws for examples ``index_b`` (dataset indices) at ``step``; ``drop_path_branches`` = 2*depth when the model
    trains with drop-path, else 0."""
    b = index_b.shape[0]
    drop_path = None
    if drop_path_branches:
        drop_path = key.uniform(index_b, step=step, purpose="drop_path", count=k * drop_path_branches).view(
            b * k, drop_path_branches
        )
    return ExampleDraws(
        views_bV=key.uniform(index_b, step=step, purpose="views", count=num_views),
        label_b=key.uniform(index_b, step=step, purpose="class_dropout", count=1)[:, 0],
        drop_path_RD=drop_path,
    )
