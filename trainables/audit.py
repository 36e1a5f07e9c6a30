"""A privacy audit in one training run (issue 18; Steinke, Nasr & Jagielski 2023): canaries, which of them train,
their membership scores and the audit section of the result record.

Canaries. m procedural glyph images (``trainables.data.glyphs.render``: letters and symbols, out of every
fine-tuning set's domain), each with a uniformly random label of the dataset's classes. Canary i depends only on
(audit seed, i): its own generator stream, never the one the tiny base was pre-trained on. They are written once as
PNGs under ``<cache>/audit-canaries/`` (keyed by kind, seed, m, resolution and classes) and tokenised through the
same token cache as any split, so every trial with the same canaries shares both.

Inclusion. Each canary trains with probability 1/2, independently, drawn from a stream keyed by the audit seed
alone (BLAKE2b of the seed; no training randomness, no optimisation seed): the mask is independent of everything
the training draws, which the one-run analysis needs. It is recorded in the result: it is the audit's ground truth.
The trial then trains on its real split plus the included canaries (N' = N + included examples): the planned
steps, the DP sampling (Poisson over N' examples), delta = 1/N' and sigma all follow N', because that is the
dataset the mechanism is run on and whose guarantee is being audited.

Scores. "nll_drop": a canary's per-token NLL (nats) of its token maps under its label, averaged over all its cached
views, under the adapted model before its first step minus under the released model. Teacher-forced, no class
dropout, eval mode. The reference is the same model for included and excluded canaries, so only training can move
their scores apart. The per-token cross-entropies come from float32 logits, but their mean over tokens and
views and the difference are float64: an NLL of 4-8 nats rounded to float32 is known to ~5e-7 only, while DP
training moves scores by ~1e-4, so float32 NLLs tie scores that differ (and the bound abstains on ties).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.schema import AuditConfig

from .data.datasets import ImageList
from .data.glyphs import GLYPH_CLASSES, render
from .data.tokens import TokenViews
from .models import VAR, VQVAE
from .models.checkpoints import atomic_write, file_lock
from .training import teacher_forcing_batch, token_cross_entropy

CANARY_STREAM = 0xA0D17  # first word of every canary's generator seed: a stream no other generator here uses
SCORE = "nll_drop"
SCORE_BATCH_ROWS = 256  # canary views per scoring forward


def canary_folder(cache_dir: str | Path, audit: AuditConfig, *, resolution: int, classes: int) -> Path:
    """Where the canaries of ``audit`` at this resolution and label count are written."""
    name = f"{audit.canary_kind}-seed{audit.seed}-m{audit.canaries}-{resolution}px-{classes}classes"
    return Path(cache_dir) / "audit-canaries" / name


def canary_label_and_glyph(
    audit: AuditConfig, index: int, *, classes: int
) -> tuple[int, np.random.Generator]:
    """Canary ``index``'s label (uniform over ``classes``) and the generator that then draws its glyph; both keyed
    by (audit seed, index) only, so canary i is the same whatever m is."""
    rng = np.random.default_rng([CANARY_STREAM, audit.seed, index])
    return int(rng.integers(classes)), rng


def render_canary(audit: AuditConfig, index: int, *, resolution: int, classes: int) -> tuple[np.ndarray, int]:
    """(image uint8 [H, W, 3], label) of canary ``index``: a random glyph class drawn as ``glyphs.render`` draws."""
    label, rng = canary_label_and_glyph(audit, index, classes=classes)
    char = GLYPH_CLASSES[int(rng.integers(len(GLYPH_CLASSES)))]
    pixels = render(char, image_size=resolution, rng=rng)
    return np.round(pixels * 255).astype(np.uint8), label


def canary_images(
    cache_dir: str | Path, audit: AuditConfig, *, resolution: int, class_names: tuple[str, ...]
) -> ImageList:
    """The m canaries as an ``ImageList`` (split "canaries", labels indexing ``class_names``), written as PNGs under
    the cache once (a ``complete`` marker last; concurrent trials wait on a lock and then read)."""
    folder = canary_folder(cache_dir, audit, resolution=resolution, classes=len(class_names))
    paths = tuple(folder / f"canary_{index:06d}.png" for index in range(audit.canaries))
    labels_file = folder / "labels.txt"
    if not (folder / "complete").is_file():
        with file_lock(folder / "write.lock"):
            if not (folder / "complete").is_file():
                labels = []
                for index, path in enumerate(paths):
                    image, label = render_canary(
                        audit, index, resolution=resolution, classes=len(class_names)
                    )
                    atomic_write(
                        path, lambda tmp, image=image: Image.fromarray(image).save(tmp, format="PNG")
                    )
                    labels.append(label)
                atomic_write(labels_file, lambda tmp: tmp.write_text("\n".join(map(str, labels)) + "\n"))
                atomic_write(
                    folder / "complete", lambda tmp: tmp.write_text("trainables.audit.canary_images\n")
                )
    labels = tuple(int(line) for line in labels_file.read_text().split())
    return ImageList(f"audit-{audit.canary_kind}", "canaries", paths, labels, tuple(class_names))


def inclusion_mask(audit: AuditConfig) -> np.ndarray:
    """Which canaries train: bool [m], each True with probability 1/2, from a stream keyed by the audit seed only."""
    digest = hashlib.blake2b(f"varsweep audit inclusion {audit.seed}".encode(), digest_size=16).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return rng.random(audit.canaries) < 0.5


def included_count(audit: AuditConfig | None) -> int:
    """How many canaries the trial trains on (0 without an audit): what the plan adds to N."""
    return 0 if audit is None else int(inclusion_mask(audit).sum())


def with_canaries(train: TokenViews, canaries: TokenViews, mask_M: np.ndarray) -> TokenViews:
    """The training data: every real example (indices 0..N-1, as without an audit) followed by the included
    canaries in canary order. Both must hold the same number of cached views."""
    if canaries.num_views != train.num_views:
        raise ValueError(f"canaries hold {canaries.num_views} views per example, the split {train.num_views}")
    keep = torch.from_numpy(np.flatnonzero(mask_M))
    return TokenViews(
        torch.cat([train.labels_N, canaries.labels_N[keep]]),
        tuple(torch.cat([real, canary[keep]]) for real, canary in zip(train.views, canaries.views)),
    )


@torch.no_grad()
def canary_nll(var: VAR, vqvae: VQVAE, canaries: TokenViews, *, device: torch.device) -> np.ndarray:
    """Per-token NLL (nats) of each canary's token maps under its label, averaged over its V cached views:
    float64 [m]. Teacher-forced, no class dropout, eval mode (the model's mode is restored). The forward and
    each token's cross-entropy are float32; the mean over the L tokens and V views is float64, since it is the
    float32 rounding of that mean (a step of ~5e-7 at 4-8 nats), not the per-token one, that would tie scores
    differing by more."""
    was_training = var.training
    var.eval()
    views = canaries.num_views
    per_batch = max(1, SCORE_BATCH_ROWS // views)
    try:
        out = []
        for start in range(0, canaries.num_examples, per_batch):
            index = torch.arange(start, min(start + per_batch, canaries.num_examples))
            idx_rows = [v[index].to(device=device, dtype=torch.long).flatten(0, 1) for v in canaries.views]
            label_r = canaries.labels_N[index].to(device).repeat_interleave(views)  # rows example-major
            x_RLCv, target_RL = teacher_forcing_batch(vqvae, idx_rows)
            ce_RL = token_cross_entropy(var(label_r, x_RLCv), target_RL)
            out.append(ce_RL.double().mean(dim=1).view(len(index), views).mean(dim=1).cpu())
        return torch.cat(out).numpy()
    finally:
        var.train(was_training)


def audit_record(
    audit: AuditConfig,
    *,
    reference_M: np.ndarray,
    released_M: np.ndarray,
    mask_M: np.ndarray,
    delta: float,
    claimed_epsilon: float | None,
    mechanism: str,
) -> dict:
    """The result record's ``audit`` section (``bench.schema.AuditRecord``) from the per-canary NLLs before and
    after training and the inclusion mask: the one-run lower bound and the ROC of ``trainables.audit_bound``."""
    from .audit_bound import epsilon_lower_bound, membership_roc  # numpy/scipy only

    scores_M = np.asarray(reference_M, dtype=np.float64) - np.asarray(released_M, dtype=np.float64)
    mask_M = np.asarray(mask_M, dtype=bool)
    bound = epsilon_lower_bound(scores_M, mask_M, delta=delta, confidence=audit.confidence)
    roc = membership_roc(scores_M, mask_M)
    return {
        "canaries": audit.canaries,
        "included": int(mask_M.sum()),
        "canary_kind": audit.canary_kind,
        "score": SCORE,
        "confidence": audit.confidence,
        "delta": float(delta),
        "claimed_epsilon": None if claimed_epsilon is None else float(claimed_epsilon),
        "epsilon_lower_bound": float(bound["epsilon_lower_bound"]),
        "guesses": int(bound["guesses"]),
        "correct_guesses": int(bound["correct_guesses"]),
        "tpr_at_1pct_fpr": float(roc["tpr_at_1pct_fpr"]),
        "tpr_at_0_1pct_fpr": float(roc["tpr_at_0_1pct_fpr"]),
        "auc": float(roc["auc"]),
        "mechanism": mechanism,
        "scores": [float(s) for s in scores_M],
        "included_mask": [bool(x) for x in mask_M],
    }
