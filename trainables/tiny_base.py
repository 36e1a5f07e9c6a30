"""The built-in tiny base: a small multi-scale VQVAE and class-conditional VAR pre-trained offline on procedural
shapes (the stand-in for the official ImageNet models on machines without the checkpoints or a GPU).

Built once per (depth, pre-training steps) into ``cache_dir/tiny-base/<key>/`` under a file lock, so concurrent
trials of a sweep share one build; later trials and sweeps load the saved checkpoints (official layout + sidecar).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .data import offline
from .models import build_var, build_vqvae
from .models.checkpoints import file_lock, save_var, save_vqvae
from .pretrain import Schedule, encode_tokens, train_var, train_vqvae

IMAGE_SIZE = 16
SHAPES_PER_CLASS = 200
VQVAE_ARCHITECTURE = dict(vocab_size=256, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4), ch_mult=(1, 2, 2), num_res_blocks=1)
SEED = 0


def var_architecture(depth: int) -> dict:
    """VAR of the tiny base: width 32 per block of depth (official VAR: 64), 2 heads, 10 shape classes."""
    return dict(depth=depth, embed_dim=32 * depth, num_heads=2, drop_path_rate=0.0, num_classes=len(offline.SHAPE_CLASSES),
                patch_nums=VQVAE_ARCHITECTURE["patch_nums"], vocab_size=VQVAE_ARCHITECTURE["vocab_size"],
                z_channels=VQVAE_ARCHITECTURE["z_channels"])


def schedules(steps: int) -> tuple[Schedule, Schedule]:
    log_every = max(1, steps // 6)
    return (Schedule(steps=steps, batch_size=32, lr=1e-3, warmup_steps=min(20, steps), weight_decay=0.0, log_every=log_every),
            Schedule(steps=steps, batch_size=64, lr=1e-3, warmup_steps=min(50, steps), log_every=log_every))


def settings(depth: int, pretraining_steps: int) -> dict:
    return {"image_size": IMAGE_SIZE, "shapes_per_class": SHAPES_PER_CLASS, "vqvae": VQVAE_ARCHITECTURE, "var": var_architecture(depth),
            "steps": pretraining_steps, "seed": SEED}


def tiny_base(cache_dir: str | Path, *, depth: int, pretraining_steps: int, log=None) -> dict:
    """Paths {"vqvae", "var"} of the tiny base's checkpoints and its architectures, building it if absent."""
    record = settings(depth, pretraining_steps)
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) / "tiny-base" / f"d{depth}-{pretraining_steps}-{key}"
    paths = {"vqvae": folder / "vqvae.pth", "var": folder / "var.pth"}
    with file_lock(folder.parent / f"{folder.name}.lock"):
        if not all(p.is_file() for p in paths.values()):
            _build(paths, depth=depth, steps=pretraining_steps, record=record, log=log)
    return {**paths, "vqvae_architecture": VQVAE_ARCHITECTURE, "var_architecture": var_architecture(depth), "settings": record}


def _build(paths: dict, *, depth: int, steps: int, record: dict, log) -> None:
    source = offline.shapes(split="train", images_per_class=SHAPES_PER_CLASS, image_size=IMAGE_SIZE, seed=SEED)
    vq_schedule, var_schedule = schedules(steps)
    torch.manual_seed(SEED)
    vqvae = build_vqvae(**VQVAE_ARCHITECTURE)
    train_vqvae(vqvae, source.images_N3HW, schedule=vq_schedule, seed=SEED, log=log)
    var = build_var(**var_architecture(depth), generator=torch.Generator().manual_seed(SEED))
    train_var(var, vqvae, encode_tokens(vqvae, source.images_N3HW), source.labels_N, schedule=var_schedule, seed=SEED, log=log)
    # The VAR is written last: its presence marks a finished build (each file is written atomically).
    save_vqvae(vqvae, paths["vqvae"], metadata={"tiny_base": record})
    save_var(var, paths["var"], metadata={"tiny_base": record})
