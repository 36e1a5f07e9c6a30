"""The built-in tiny base: a small multi-scale VQVAE and class-conditional VAR pre-trained offline on procedural
glyphs (letters and symbols rendered from matplotlib's fonts, ``data/glyphs.py``; never digits). It stands in for
the official ImageNet models on machines without the checkpoints or a GPU: a base that can draw strokes, to be
adapted to a domain it has never seen (the handwritten digits of the embedded default).

Built once per (depth, pre-training steps) into ``cache_dir/tiny-base/<key>/`` under a file lock, so concurrent
trials of a sweep share one build (the launcher builds it before the trials start); later trials and sweeps load
the saved checkpoints (official layout + sidecar).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .data import glyphs
from .models import build_var, build_vqvae, load_vqvae
from .models.checkpoints import file_lock, save_var, save_vqvae
from .pretrain import Schedule, encode_tokens, train_var, train_vqvae
from .progress import Log, Progress

SOURCE = "glyphs-v1"
IMAGE_SIZE = 16
GLYPHS_PER_CLASS = 120
# One downsampling (16 px -> an 8x8 latent, each token covering 2x2 pixels of a digit's 8x8 scan upsampled): a 4x4
# latent (two downsamplings) cannot give a digit's strokes back faithfully, whatever the training length.
VQVAE_ARCHITECTURE = dict(
    vocab_size=256, z_channels=8, ch=32, patch_nums=(1, 2, 4, 8), ch_mult=(1, 2), num_res_blocks=1
)
SEED = 0


def var_architecture(depth: int) -> dict:
    """VAR of the tiny base: width 32 per block of depth (official VAR: 64), 2 heads, one class per glyph."""
    return dict(
        depth=depth,
        embed_dim=32 * depth,
        num_heads=2,
        drop_path_rate=0.0,
        num_classes=len(glyphs.GLYPH_CLASSES),
        patch_nums=VQVAE_ARCHITECTURE["patch_nums"],
        vocab_size=VQVAE_ARCHITECTURE["vocab_size"],
        z_channels=VQVAE_ARCHITECTURE["z_channels"],
    )


def schedules(steps: int) -> tuple[Schedule, Schedule]:
    """(VQVAE, VAR) optimisation: the VAR trains for ``steps``, the VQVAE for half as many (it converges sooner,
    and its full-resolution convolutions cost the most per step)."""
    vq_steps = max(1, steps // 2)
    return (
        Schedule(
            steps=vq_steps,
            batch_size=32,
            lr=2e-3,
            warmup_steps=min(20, vq_steps),
            weight_decay=0.0,
            log_every=max(1, vq_steps // 10),
        ),
        Schedule(
            steps=steps, batch_size=64, lr=1e-3, warmup_steps=min(50, steps), log_every=max(1, steps // 10)
        ),
    )


def vqvae_settings(pretraining_steps: int) -> dict:
    """What the tiny VQVAE depends on (not the VAR's depth: every depth shares one VQVAE, as VAR's family does)."""
    return {
        "source": SOURCE,
        "classes": list(glyphs.GLYPH_CLASSES),
        "fonts": list(glyphs.FONT_FILES),
        "image_size": IMAGE_SIZE,
        "glyphs_per_class": GLYPHS_PER_CLASS,
        "vqvae": VQVAE_ARCHITECTURE,
        "steps": pretraining_steps,
        "seed": SEED,
    }


def settings(depth: int, pretraining_steps: int) -> dict:
    return {**vqvae_settings(pretraining_steps), "var": var_architecture(depth)}


def _key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def tiny_base_folder(cache_dir: str | Path, *, depth: int, pretraining_steps: int) -> Path:
    return (
        Path(cache_dir)
        / "tiny-base"
        / f"d{depth}-{pretraining_steps}-{_key(settings(depth, pretraining_steps))}"
    )


def tiny_vqvae_folder(cache_dir: str | Path, *, pretraining_steps: int) -> Path:
    return (
        Path(cache_dir) / "tiny-base" / f"vqvae-{pretraining_steps}-{_key(vqvae_settings(pretraining_steps))}"
    )


def tiny_base(cache_dir: str | Path, *, depth: int, pretraining_steps: int, log: Log | None = None) -> dict:
    """Paths {"vqvae", "var"} of the tiny base's checkpoints and its architectures, building what is absent: the
    VQVAE once per pre-training length (shared by every depth), the VAR once per depth on the VQVAE's tokens."""
    vq_folder = tiny_vqvae_folder(cache_dir, pretraining_steps=pretraining_steps)
    var_folder = tiny_base_folder(cache_dir, depth=depth, pretraining_steps=pretraining_steps)
    paths = {"vqvae": vq_folder / "vqvae.pth", "var": var_folder / "var.pth"}
    if not paths["var"].is_file():
        with file_lock(var_folder.parent / f"{var_folder.name}.lock"):
            if not paths["var"].is_file():
                _build(paths, depth=depth, steps=pretraining_steps, log=log)
    return {
        **paths,
        "vqvae_architecture": VQVAE_ARCHITECTURE,
        "var_architecture": var_architecture(depth),
        "settings": settings(depth, pretraining_steps),
    }


def _stage_logger(progress: Progress, *, keys: tuple[str, ...]):
    return lambda entry: progress.update(
        entry["step"], " ".join(f"{k}={entry[k]:.4f}" for k in keys if k in entry)
    )


def _build(paths: dict, *, depth: int, steps: int, log: Log | None) -> None:
    stage = f"tiny base d{depth}"
    n = GLYPHS_PER_CLASS * len(glyphs.GLYPH_CLASSES)
    vq_schedule, var_schedule = schedules(steps)
    vq_plan = (
        f"the VQVAE of {paths['vqvae'].parent.name} (shared by every depth)"
        if paths["vqvae"].is_file()
        else f"{vq_schedule.steps} VQVAE steps (shared by every depth)"
    )
    Progress(stage, "", 1, log=log).message(
        f"building once into {paths['var'].parent.parent} (later trials and sweeps reuse it): "
        f"{n} glyphs, {vq_plan}, {var_schedule.steps} VAR steps"
    )
    images_N3HW, labels_N = glyphs.glyph_images(
        split="train", images_per_class=GLYPHS_PER_CLASS, image_size=IMAGE_SIZE, seed=SEED
    )
    vqvae = _vqvae(paths["vqvae"], images_N3HW, schedule=vq_schedule, stage=stage, log=log)
    var = build_var(**var_architecture(depth), generator=torch.Generator().manual_seed(SEED))
    train_var(
        var,
        vqvae,
        encode_tokens(vqvae, images_N3HW),
        labels_N,
        schedule=var_schedule,
        seed=SEED,
        log=_stage_logger(Progress(stage, "VAR step", steps, log=log), keys=("loss",)),
    )
    save_var(
        var, paths["var"], metadata={"tiny_base": settings(depth, steps)}
    )  # written atomically, last: the build's marker


def _vqvae(path: Path, images_N3HW: torch.Tensor, *, schedule: Schedule, stage: str, log: Log | None):
    """The shared tiny VQVAE: loaded when an earlier build of any depth made it, else trained and saved."""
    with file_lock(path.parent.parent / f"{path.parent.name}.lock"):
        if path.is_file():
            return load_vqvae(path, **VQVAE_ARCHITECTURE).eval()
        # build_vqvae initialises from the global stream: seeded here, in a fork, so the caller's stream (e.g.
        # a DP trial's, built in the same process) is not reset to a public, fixed state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            vqvae = build_vqvae(**VQVAE_ARCHITECTURE)
            train_vqvae(
                vqvae,
                images_N3HW,
                schedule=schedule,
                seed=SEED,
                log=_stage_logger(Progress(stage, "VQVAE step", schedule.steps, log=log), keys=("rec_mse",)),
            )
        save_vqvae(vqvae, path, metadata={"tiny_base": vqvae_settings(schedule.steps)})
        return vqvae.eval()
