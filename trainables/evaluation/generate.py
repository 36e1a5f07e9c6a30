"""Class-conditional generation for evaluation: per-class counts, distinct randomness per batch, resumable PNGs.

The published pipeline passed one seed to every batch (repeated images within a class) and mapped numbered class
folders through a string sort. Here the plan comes from the evaluation split's own per-class counts (by class
index), every batch b draws from a generator seeded by (seed, b) (so batches differ, and a resumed run regenerates
exactly the missing batches), and the sampling settings travel with the images.

Images on disk are keyed by the model that drew them: ``generated.json`` in the output folder holds a fingerprint
of the VAR's and the VQVAE's weights, the sampling settings and the plan, written before the first PNG. A run whose
model or settings differ (a retried trial's new attempt, another checkpoint) clears the folder's images first, so a
resumed run skips only batches its own model wrote and an evaluation never scores an earlier model's images. A run
of the same model and settings with another plan (another image count or split) is refused: the folder's images are
that plan's (a batch's images depend on all its labels), and deleting them is left to the user.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.errors import VarsweepError
from bench.schema import MAX_SEED, EvaluationConfig

from ..models import VAR, VQVAE, release_sampling_caches
from ..models.checkpoints import atomic_write
from ..progress import Progress
from ..training import bf16_autocast

MANIFEST = "generated.json"
# What else an image depends on: the sampler's code. 2 (2026-12-05): under bf16 autocast the decoder's norms and
# upsampling run in bf16 and the cached step's q and k are normalised as in training, images a rounding apart from
# version 1's, which a resumed folder must not mix with them. 3 (2026-12-05): under autocast a LoRA layer samples
# with its adapter merged into the base weight (``LoraLinear._merged_product``), a rounding apart from version 2.
# 4 (2026-12-07): the decoder's bf16 output is taken to float32 before it is mapped from [-1, 1] to [0, 1]
# (``VAR.sample``; the decoder itself stays in bf16), where version 3 mapped it in bf16: about a third of its uint8
# pixels one level apart. The manifest also records the plan (``generation_manifest``).
GENERATED_FORMAT = "varsweep-generated/4"


def check_sampling_seed(seed: int) -> None:
    """Refuse a sampling seed outside [0, ``MAX_SEED``] (the schema's bound on every seed), before anything is
    drawn: batch b draws from ``sampling_seed * 1_000_003 + b``, which must fit torch's signed 64-bit seed (seeds
    from about 1.8e13 overflowed at the first batch, after the reference statistics were computed)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(
            f"sampling seed {seed!r} is out of range: it must be an integer in [0, {MAX_SEED}], so every "
            "batch's seed (seed * 1000003 + batch) fits torch's 64-bit seed"
        )


SAMPLING_FIELDS = (
    "guidance_scale",
    "top_k",
    "top_p",
    "batch_size",
    "sampling_seed",
)  # of EvaluationConfig: what an image depends on


def sampling_record(evaluation: EvaluationConfig, *, autocast_bf16: bool, compiled: bool = False) -> dict:
    """The sampling settings an image set was drawn with, under the config's names (recorded with results and in
    the generated folder's manifest); ``autocast_bf16`` is the trial's ``optimization.autocast_bf16`` (CUDA only);
    ``compiled`` (``resources.compile_sampling``) is recorded only where set, so the records and manifests of eager
    sampling stay those written before it existed (a resumed folder keeps its images)."""
    record = {**{name: getattr(evaluation, name) for name in SAMPLING_FIELDS}, "autocast_bf16": autocast_bf16}
    return {**record, "compiled": True} if compiled else record


def generation_plan(class_counts: Sequence[int], *, total: int | None = None) -> list[int]:
    """Images to generate per class index: the evaluation split's own counts, or ``total`` images split in the
    same proportions (largest remainders, ties to the lower index)."""
    counts = [int(c) for c in class_counts]
    if any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"class counts must be >= 0 with a positive sum, got {counts}")
    if total is None:
        return counts
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    # In integers: total * c / sum(counts) as floats rounds the remainders, so exact ties could order either way.
    plan = [total * c // sum(counts) for c in counts]
    remainders = [total * c % sum(counts) for c in counts]
    by_remainder = sorted(range(len(counts)), key=lambda i: (-remainders[i], i))
    for i in by_remainder[: total - sum(plan)]:
        plan[i] += 1
    return plan


def _labels(plan: Sequence[int]) -> list[int]:
    return [index for index, count in enumerate(plan) for _ in range(count)]


def image_path(out_dir: Path, label: int, number: int) -> Path:
    return out_dir / f"class_{label:04d}" / f"{number:06d}.png"


@contextlib.contextmanager
def _compiled_caches(var: VAR, compiled: bool):
    """Frees the static KV caches compiled CUDA sampling keeps for ``var`` on leaving (2 x batch x L x C x 2 per
    block in the autocast dtype: 2.9 GB at VAR-d16 and batch 32), so they do not stay beside training's memory
    between a trial's evaluations."""
    try:
        yield
    finally:
        if compiled:
            release_sampling_caches(var)


@torch.no_grad()
def generate(
    var: VAR,
    vqvae: VQVAE,
    plan: Sequence[int],
    *,
    evaluation: EvaluationConfig,
    autocast_bf16: bool,
    compiled: bool = False,
    out_dir: str | Path | None = None,
    progress: Progress | None = None,
    tally: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generate ``plan[c]`` images of every class c with the sampling settings of ``evaluation`` (guidance scale,
    top-k/top-p, batch size, sampling seed); forwards under bf16 autocast when ``autocast_bf16`` on CUDA.
    ``compiled``: each scale's step runs compiled (``VAR.sample(compiled=True)``), every batch padded to the batch
    size (``pad_to``: the extra rows draw nothing and are not decoded) so that one compile serves the whole run;
    CUDA's static KV caches are freed at the end (a later call re-records its CUDA graphs, it does not compile
    again).

    With ``out_dir``: lossless PNGs ``class_XXXX/NNNNNN.png`` (NNNNNN numbers the image within the whole run), each
    written atomically by a pool of threads while the next batch is drawn; batches whose files all exist are read
    instead of drawn, so an interrupted run resumes, but only when the folder's manifest names these weights and
    settings (else its images are deleted first) and this plan (else ``GeneratedFolderError``, before anything is
    drawn). Returns when every file is written: images uint8 [N, 3, H, W] (the drawn ones as written, the resumed
    ones as read) and labels [N]. ``tally``: a dict this call sets ``drawn`` (images drawn) and ``resumed`` (images
    read back from ``out_dir``) in, so that a rate is of the images drawn, not of those an earlier run drew."""
    check_sampling_seed(evaluation.sampling_seed)  # before the folder is claimed and anything drawn
    labels_N = torch.tensor(_labels(plan), dtype=torch.long)
    device = next(var.parameters()).device
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        claim_folder(
            out,
            generation_manifest(
                var, vqvae, sampling_record(evaluation, autocast_bf16=autocast_bf16, compiled=compiled), plan
            ),
            progress=progress,
        )
    kept, counts = [], {"drawn": 0, "resumed": 0}
    with PngWriter(enabled=out is not None) as writer, _in_eval_mode(var), _compiled_caches(var, compiled):
        for b, start in enumerate(range(0, len(labels_N), evaluation.batch_size)):
            label_B = labels_N[start : start + evaluation.batch_size]
            paths = [] if out is None else [image_path(out, int(c), start + i) for i, c in enumerate(label_B)]
            images_B3HW = _resumed(paths, progress=progress)
            if images_B3HW is None:
                images_B3HW = _sample_batch(
                    var,
                    vqvae,
                    label_B.to(device),
                    evaluation=evaluation,
                    autocast_bf16=autocast_bf16,
                    compiled=compiled,
                    batch_index=b,
                )
                writer.submit(paths, images_B3HW)
                counts["drawn"] += len(images_B3HW)
            else:
                counts["resumed"] += len(images_B3HW)
            kept.append(images_B3HW)
            if progress is not None:
                progress.update(start + len(label_B))
    if tally is not None:
        tally.update(counts)
    return (torch.cat(kept) if kept else torch.zeros(0, dtype=torch.uint8)), labels_N


@contextlib.contextmanager
def _in_eval_mode(module: torch.nn.Module):
    """Eval mode for the whole block, the module's mode restored after: for a run of sampling calls, not per call
    (as ``sample`` sets it), so a LoRA model merges its adapters once (``LoraLinear._merged_weight``)."""
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


class GeneratedFolderError(VarsweepError):
    """An output folder that holds images of this model and sampling settings drawn for another plan."""


class PngWriter:
    """Writes batches of images as PNGs on a pool of threads (zlib and fsync release the GIL: a 256 px image is
    ~8 ms of compression and a file sync, which in the drawing loop would make a GPU evaluation wait on one CPU
    core). At most ``in_flight`` batches wait, so memory stays bounded; a failed write is raised at the next
    ``submit`` or on leaving the block, which waits for every write. ``enabled=False``: a no-op. One batch is one
    thread's task: ``in_flight`` (default twice the threads) must reach ``threads`` for all of them to work."""

    def __init__(self, *, enabled: bool = True, threads: int | None = None, in_flight: int | None = None):
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.enabled, self.threads = enabled, threads or min(8, usable)
        self.in_flight = in_flight or 2 * self.threads
        self.pending: list[Future] = []

    def __enter__(self) -> PngWriter:
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="png") if self.enabled else None
        return self

    def submit(self, paths: Sequence[Path], images_N3HW: torch.Tensor) -> None:
        if self.pool is None:
            return
        self.pending = [f for f in self.pending if not _finished(f)]
        while len(self.pending) >= self.in_flight:
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(_write_pngs, paths, images_N3HW))

    def __exit__(self, exc_type, *exc) -> None:
        if self.pool is None:
            return
        try:
            for future in self.pending:
                if exc_type is None:
                    future.result()
                else:  # finish what was drawn, but let the error that ended the loop be the one raised
                    wait([future])
        finally:
            self.pool.shutdown(cancel_futures=True)


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer of ``modules`` (position, name, shape, dtype and bytes): changes
    whenever any weight does. One pass over the weights, tensor by tensor (VAR-d16 + VQVAE, ~1.6 GB: seconds)."""
    digest = hashlib.sha256()
    for position, module in enumerate(modules):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(f"{position}.{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
            digest.update(
                memoryview(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
            )
    return digest.hexdigest()


def generation_manifest(var: VAR, vqvae: VQVAE, sampling: dict, plan: Sequence[int]) -> dict:
    """What the images of an output folder depend on: the weights that drew them, the sampling settings
    (``sampling_record``) and the plan, images per class index (with the settings' batch size it fixes every
    batch's labels and shape: image n is drawn in batch n // batch_size, beside that batch's other labels)."""
    return {
        "format": GENERATED_FORMAT,
        "weights_sha256": weights_fingerprint(var, vqvae),
        "sampling": sampling,
        "plan": [int(c) for c in plan],
    }


def claim_folder(out_dir: Path, manifest: dict, *, progress: Progress | None = None) -> None:
    """Make ``out_dir`` hold only images of ``manifest``'s model: when its manifest names another model, format or
    sampling settings (or is missing or unreadable), delete its class folders, then write the manifest (before any
    PNG: a run killed in between leaves the old manifest, and the next run clears again). A folder holding images
    of the same model and settings drawn for another plan is refused (``GeneratedFolderError``), nothing deleted:
    they are computed work of that plan, which a run of this one cannot resume."""
    path = out_dir / MANIFEST
    try:
        current = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        current = None
    if current == manifest:
        return
    stale = sorted(p for p in out_dir.glob("class_*") if p.is_dir()) if out_dir.is_dir() else []
    if any(next(folder.glob("*.png"), None) for folder in stale) and _other_plan_only(current, manifest):
        raise GeneratedFolderError(
            f"{out_dir} holds images of this model and sampling settings drawn for another plan "
            f"({_plan_text(current['plan'])}; this run: {_plan_text(manifest['plan'])}), which cannot be resumed "
            "at this plan: write to another output folder (the command's --out), or delete this one to draw "
            "this plan there"
        )
    if stale and progress is not None:
        progress.message(
            f"{out_dir}: deleting the images of another model or sampling setting ({len(stale)} class folders)"
        )
    for folder in stale:
        shutil.rmtree(folder)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True)))


def _other_plan_only(current: dict | None, manifest: dict) -> bool:
    """Whether manifest ``current`` differs from ``manifest`` in its plan alone."""
    plan = current.get("plan") if isinstance(current, dict) else None
    if not isinstance(plan, list) or not all(type(c) is int for c in plan):
        return False
    return current["plan"] != manifest["plan"] and {**current, "plan": manifest["plan"]} == manifest


def _plan_text(plan: Sequence[int]) -> str:
    """A plan for a message: its image count and its first per-class counts."""
    shown = ", ".join(str(c) for c in plan[:8]) + (f", ... ({len(plan)} classes)" if len(plan) > 8 else "")
    return f"{sum(plan)} images, per class [{shown}]"


def _sample_batch(
    var: VAR,
    vqvae: VQVAE,
    label_B: torch.Tensor,
    *,
    evaluation: EvaluationConfig,
    autocast_bf16: bool,
    compiled: bool,
    batch_index: int,
) -> torch.Tensor:
    device = label_B.device
    generator = torch.Generator(device=device).manual_seed(evaluation.sampling_seed * 1_000_003 + batch_index)
    with bf16_autocast(device, enabled=autocast_bf16):
        images = var.sample(
            label_B,
            vqvae=vqvae,
            cfg=evaluation.guidance_scale,
            top_k=evaluation.top_k,
            top_p=evaluation.top_p,
            generator=generator,
            compiled=compiled,
            # one batch shape for the compiled steps: a last, smaller batch would compile them again
            pad_to=evaluation.batch_size if compiled else None,
        )
    return images.float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def _finished(future: Future) -> bool:
    """Whether ``future`` is done; raises the error of a failed one."""
    if future.done():
        future.result()
        return True
    return False


def _write_pngs(paths: Sequence[Path], images_N3HW: torch.Tensor) -> None:
    for path, image_3HW in zip(paths, images_N3HW):
        atomic_write(
            path, lambda tmp, i=image_3HW: Image.fromarray(i.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
        )


def _read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def _resumed(paths: Sequence[Path], *, progress: Progress | None) -> torch.Tensor | None:
    """A batch an earlier run of these weights and settings wrote whole, as uint8 [B, 3, H, W]; None when a file is
    missing or unreadable (the batch is then drawn again: nothing but that batch is lost)."""
    if not paths or not all(p.is_file() for p in paths):
        return None
    try:
        return torch.stack([_read_png(p) for p in paths])
    except (OSError, ValueError, RuntimeError) as error:
        if progress is not None:
            progress.message(f"drawing a batch again: {error}")
        return None


def read_generated(out_dir: str | Path, plan: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 3, H, W] and labels [N] of a finished ``generate`` run, in generation order."""
    labels = _labels(plan)
    missing = [
        str(image_path(Path(out_dir), c, n))
        for n, c in enumerate(labels)
        if not image_path(Path(out_dir), c, n).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} generated images missing under {out_dir}, e.g. {missing[:3]}; rerun generate to finish"
        )
    images = [_read_png(image_path(Path(out_dir), c, n)) for n, c in enumerate(labels)]
    return torch.stack(images), torch.tensor(labels)
