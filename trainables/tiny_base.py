"""The built-in tiny base: a small multi-scale VQVAE and class-conditional VAR pre-trained offline on procedural
glyphs (letters and symbols rendered from matplotlib's fonts, ``data/glyphs.py``; never digits). It stands in for
the official ImageNet models on machines without the checkpoints or a GPU: a base that can draw strokes, to be
adapted to a domain it has never seen (the handwritten digits of the embedded default).

Built once into ``cache_dir/tiny-base/``, each part under a file lock, so concurrent trials of a sweep share
one build (the launcher builds it before the trials start); later trials and sweeps load the saved checkpoints
(official layout + sidecar). The VQVAE's folder is keyed by everything its bytes depend on (glyph renderer,
architecture, schedule, training settings, seed, the source text of the code that makes it, the fonts and the
versions of torch, NumPy, Pillow, FreeType and matplotlib), so a change to any of them builds a new one; every
VAR depth shares it. A VAR's folder adds its own architecture, schedule, training settings and model code, and
the SHA-256 of the VQVAE it is trained on. Each sidecar records its folder's settings; a cache whose files are
missing, damaged or of other settings is refused with the folder to delete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import inspect
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import features

from .data import glyphs, offline
from .models import build_var, build_vqvae, load_vqvae
from .models.checkpoints import (
    CheckpointError,
    checkpoint_sha256,
    file_lock,
    read_verified,
    save_var,
    save_vqvae,
    sidecar_path,
)
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
# Settings of the training loops (their arguments other than the schedule), recorded in the folder keys.
VQVAE_TRAINING = dict(restart_every=25)
VAR_TRAINING = dict(class_dropout=0.1, max_grad_norm=2.0)
# The source files (relative to the package) whose code makes the tiny base: an edit builds a new base.
_PACKAGE = Path(__file__).resolve().parent
VQVAE_SOURCES = ("data/glyphs.py", "pretrain.py", "training.py", "tiny_base.py", "models/vqvae.py")
VAR_SOURCES = ("models/var.py",)


class TinyBaseError(CheckpointError):
    """The tiny base's cache cannot be used as it is (missing, damaged or mismatched files); names the folder
    to delete so that the next run rebuilds it."""


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


def source_sha256(names: Sequence[str]) -> dict[str, str]:
    """SHA-256 (16 hex digits) of the source text of each file in ``names`` (relative to the package)."""
    return {name: hashlib.sha256((_PACKAGE / name).read_bytes()).hexdigest()[:16] for name in names}


def library_versions() -> dict[str, str]:
    """The versions of the libraries whose code changes the tiny base's pixels or weights."""
    return {
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "pillow": str(PIL.__version__),
        "freetype": str(features.version("freetype2")),
        "matplotlib": importlib.metadata.version("matplotlib"),
    }


def _schedule_record(schedule: Schedule) -> dict:
    """The schedule's fields that change the weights (how often it logs does not)."""
    return {k: v for k, v in dataclasses.asdict(schedule).items() if k != "log_every"}


def _normalised(record: dict) -> dict:
    return json.loads(json.dumps(record))  # tuples -> lists: as a sidecar holds it


def vqvae_settings(pretraining_steps: int) -> dict:
    """What the tiny VQVAE's bytes depend on (not the VAR's depth: every depth shares one VQVAE, as VAR's
    family does): its folder's key and its sidecar's record."""
    vq_schedule, _ = schedules(pretraining_steps)
    code = source_sha256(VQVAE_SOURCES)
    code["data/offline.py:to_unit_range"] = hashlib.sha256(
        inspect.getsource(offline.to_unit_range).encode()
    ).hexdigest()[:16]
    return _normalised(
        {
            "source": SOURCE,
            "classes": list(glyphs.GLYPH_CLASSES),
            "fonts": list(glyphs.FONT_FILES),
            "fonts_sha256": glyphs.fonts_sha256(),
            "renderer": {
                "max_stroke": glyphs.MAX_STROKE,
                "low_resolution_share": glyphs.LOW_RESOLUTION_SHARE,
                "supersample": glyphs.SUPERSAMPLE,
            },
            "image_size": IMAGE_SIZE,
            "glyphs_per_class": GLYPHS_PER_CLASS,
            "vqvae": VQVAE_ARCHITECTURE,
            "steps": pretraining_steps,
            "schedule": _schedule_record(vq_schedule),
            "training": VQVAE_TRAINING,
            "seed": SEED,
            "sources": code,
            "libraries": library_versions(),
        }
    )


def _with_var(vq_settings: dict, *, depth: int, pretraining_steps: int, vqvae_sha256: str) -> dict:
    _, var_schedule = schedules(pretraining_steps)
    return _normalised(
        {
            **vq_settings,
            "var": var_architecture(depth),
            "var_schedule": _schedule_record(var_schedule),
            "var_training": VAR_TRAINING,
            "var_sources": source_sha256(VAR_SOURCES),
            "vqvae_sha256": vqvae_sha256,
        }
    )


def settings(depth: int, pretraining_steps: int, *, vqvae_sha256: str) -> dict:
    """What the tiny VAR's bytes depend on: the VQVAE's settings, its own, and the SHA-256 of the VQVAE file
    it is trained on. Its folder's key and its sidecar's record."""
    return _with_var(
        vqvae_settings(pretraining_steps),
        depth=depth,
        pretraining_steps=pretraining_steps,
        vqvae_sha256=vqvae_sha256,
    )


def _key(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]


def _vqvae_folder(cache_dir: str | Path, pretraining_steps: int, record: dict) -> Path:
    return Path(cache_dir) / "tiny-base" / f"vqvae-{pretraining_steps}-{_key(record)}"


def _var_folder(cache_dir: str | Path, depth: int, pretraining_steps: int, record: dict) -> Path:
    return Path(cache_dir) / "tiny-base" / f"d{depth}-{pretraining_steps}-{_key(record)}"


def tiny_vqvae_folder(cache_dir: str | Path, *, pretraining_steps: int) -> Path:
    return _vqvae_folder(cache_dir, pretraining_steps, vqvae_settings(pretraining_steps))


def tiny_base_folder(cache_dir: str | Path, *, depth: int, pretraining_steps: int, vqvae_sha256: str) -> Path:
    """The folder of the tiny VAR of ``depth`` trained on the VQVAE file of SHA-256 ``vqvae_sha256``."""
    return _var_folder(
        cache_dir, depth, pretraining_steps, settings(depth, pretraining_steps, vqvae_sha256=vqvae_sha256)
    )


def _lock(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.lock"


def tiny_base(cache_dir: str | Path, *, depth: int, pretraining_steps: int, log: Log | None = None) -> dict:
    """Paths {"vqvae", "var"} of the tiny base's checkpoints, their architectures, the VAR's settings and the
    VQVAE's SHA-256, building what is absent: the VQVAE once per pre-training length (shared by every depth),
    the VAR once per depth and VQVAE on the VQVAE's tokens. Both files are checked against their sidecars
    (intact, of this folder's settings, the VAR trained on this VQVAE) on every call: ``TinyBaseError`` names
    the folder to delete otherwise."""
    vq_settings = vqvae_settings(pretraining_steps)
    vq_path = _vqvae_folder(cache_dir, pretraining_steps, vq_settings) / "vqvae.pth"
    built = None  # what this call's VQVAE build made, for its VAR build
    vq_sha = _intact(vq_path, kind="vqvae", expected=vq_settings)
    if vq_sha is None:
        with file_lock(_lock(vq_path.parent)):
            vq_sha = _intact(vq_path, kind="vqvae", expected=vq_settings)
            if vq_sha is None:
                built = _build_vqvae(
                    vq_path, depth=depth, steps=pretraining_steps, record=vq_settings, log=log
                )
                vq_sha = checkpoint_sha256(vq_path)
    record = _with_var(vq_settings, depth=depth, pretraining_steps=pretraining_steps, vqvae_sha256=vq_sha)
    var_path = _var_folder(cache_dir, depth, pretraining_steps, record) / "var.pth"
    if _intact(var_path, kind="var", expected=record, depth=depth, vqvae_path=vq_path) is None:
        with file_lock(_lock(var_path.parent)):
            if _intact(var_path, kind="var", expected=record, depth=depth, vqvae_path=vq_path) is None:
                _build_var(
                    var_path, vq_path, built, depth=depth, steps=pretraining_steps, record=record, log=log
                )
    return {
        "vqvae": vq_path,
        "var": var_path,
        "vqvae_architecture": VQVAE_ARCHITECTURE,
        "var_architecture": var_architecture(depth),
        "settings": record,
        "vqvae_sha256": vq_sha,
    }


def _damaged(folder: Path, problem: str) -> TinyBaseError:
    return TinyBaseError(
        f"the tiny base's cache folder {folder} cannot be used: {problem}. Delete the folder {folder} and "
        f"run again: the next run rebuilds it"
    )


def _intact(
    path: Path, *, kind: str, expected: dict, depth: int | None = None, vqvae_path: Path | None = None
) -> str | None:
    """SHA-256 of the tiny base's checkpoint at ``path`` when the file and its sidecar are complete, agree and
    record ``expected`` (the settings its folder is keyed by); None when neither was saved yet (build it; a
    save stopped before its commit leaves only a staged file, which the next save removes). A VAR
    (``vqvae_path``: the VQVAE it is loaded with) must record that VQVAE's SHA-256. Anything else raises
    ``TinyBaseError``."""
    side = sidecar_path(path)
    if not side.is_file():
        if not path.exists():
            return None
        raise _damaged(
            path.parent, f"{path} has no sidecar {side.name} (it was removed, or not written by us)"
        )
    architecture = (
        build_vqvae(**VQVAE_ARCHITECTURE, device="meta").architecture
        if kind == "vqvae"
        else build_var(**var_architecture(depth), device="meta").architecture
    )
    try:
        _, sha, metadata = read_verified(path, kind=kind, architecture=architecture)
    except CheckpointError as err:
        raise _damaged(path.parent, str(err)) from err
    recorded = (metadata or {}).get("tiny_base")
    recorded = recorded if isinstance(recorded, dict) else {}
    if vqvae_path is not None and recorded.get("vqvae_sha256") != expected["vqvae_sha256"]:
        raise TinyBaseError(
            f"the tiny base's VAR {path} was trained on a VQVAE with SHA-256 "
            f"{str(recorded.get('vqvae_sha256'))[:12]}..., not on {vqvae_path} (SHA-256 "
            f"{expected['vqvae_sha256'][:12]}...): a VAR is only valid with the VQVAE it was trained on. "
            f"Delete the folder {path.parent} and run again: the next run rebuilds the VAR on this VQVAE"
        )
    if recorded != expected:
        differing = sorted(k for k in set(recorded) | set(expected) if recorded.get(k) != expected.get(k))
        raise _damaged(
            path.parent, f"{side} records other settings than its folder is keyed by ({', '.join(differing)})"
        )
    return sha


def _stage_logger(progress: Progress, *, keys: tuple[str, ...]):
    return lambda entry: progress.update(
        entry["step"], " ".join(f"{k}={entry[k]:.4f}" for k in keys if k in entry)
    )


def _glyphs() -> tuple[torch.Tensor, torch.Tensor]:
    return glyphs.glyph_images(
        split="train", images_per_class=GLYPHS_PER_CLASS, image_size=IMAGE_SIZE, seed=SEED
    )


def _announce(stage: str, path: Path, plan: str, *, log: Log | None) -> None:
    Progress(stage, "", 1, log=log).message(
        f"building once into {path.parent.parent} (later trials and sweeps reuse it): "
        f"{GLYPHS_PER_CLASS * len(glyphs.GLYPH_CLASSES)} glyphs, {plan}"
    )


def _build_vqvae(path: Path, *, depth: int, steps: int, record: dict, log: Log | None) -> dict:
    """Train and save the shared tiny VQVAE; returns what the VAR's build reuses (the VQVAE, the glyphs)."""
    stage = f"tiny base d{depth}"
    vq_schedule, var_schedule = schedules(steps)
    _announce(
        stage,
        path,
        f"{vq_schedule.steps} VQVAE steps (shared by every depth), then {var_schedule.steps} VAR steps",
        log=log,
    )
    images_N3HW, labels_N = _glyphs()
    # build_vqvae initialises from the global stream: seeded here, in a fork, so the caller's stream (e.g. a
    # DP trial's, built in the same process) is not reset to a public, fixed state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        vqvae = build_vqvae(**VQVAE_ARCHITECTURE)
        train_vqvae(
            vqvae,
            images_N3HW,
            schedule=vq_schedule,
            seed=SEED,
            restart_every=VQVAE_TRAINING["restart_every"],
            log=_stage_logger(Progress(stage, "VQVAE step", vq_schedule.steps, log=log), keys=("rec_mse",)),
        )
    save_vqvae(vqvae, path, metadata={"tiny_base": record})
    return {"vqvae": vqvae.eval(), "images": images_N3HW, "labels": labels_N}


def _build_var(
    path: Path, vq_path: Path, built: dict | None, *, depth: int, steps: int, record: dict, log: Log | None
) -> None:
    """Train and save the tiny VAR of ``depth`` on the VQVAE at ``vq_path`` (``built``: that VQVAE and the
    glyphs, when this call just made them)."""
    stage = f"tiny base d{depth}"
    _, var_schedule = schedules(steps)
    if built is None:
        _announce(
            stage,
            path,
            f"the VQVAE of {vq_path.parent.name} (shared by every depth), {var_schedule.steps} VAR steps",
            log=log,
        )
        vqvae = load_vqvae(vq_path, **VQVAE_ARCHITECTURE).eval()
        if checkpoint_sha256(vq_path) != record["vqvae_sha256"]:
            raise TinyBaseError(f"the tiny base's VQVAE {vq_path} was replaced while being read; run again")
        images_N3HW, labels_N = _glyphs()
    else:
        vqvae, images_N3HW, labels_N = built["vqvae"], built["images"], built["labels"]
    var = build_var(**var_architecture(depth), generator=torch.Generator().manual_seed(SEED))
    train_var(
        var,
        vqvae,
        encode_tokens(vqvae, images_N3HW),
        labels_N,
        schedule=var_schedule,
        seed=SEED,
        class_dropout=VAR_TRAINING["class_dropout"],
        max_grad_norm=VAR_TRAINING["max_grad_norm"],
        log=_stage_logger(Progress(stage, "VAR step", steps, log=log), keys=("loss",)),
    )
    save_var(var, path, metadata={"tiny_base": record})  # written atomically: the VAR's commit
