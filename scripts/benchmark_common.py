"""Shared by the benchmark scripts: the machine line and how a report is printed and appended."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import psutil
import torch

from trainables.data.tokens import TokenViews
from trainables.models import OFFICIAL_PATCH_NUMS, build_var, build_vqvae
from trainables.profiling import Stopwatch

REPO = Path(__file__).resolve().parent.parent
FLOWERS_CLASSES, FLOWERS_TRAIN_IMAGES = 102, 1020  # Oxford Flowers' classes and training images


@contextlib.contextmanager
def revision_checkout(revision: str | None, name: str) -> Iterator[Path | None]:
    """A detached ``git worktree`` of ``revision`` for the block's duration (None: no revision, nothing made)."""
    if revision is None:
        yield None
        return
    tree = Path(f"/tmp/varsweep-{name}-{revision}")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), revision], check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)


def add_revision_arguments(parser: argparse.ArgumentParser) -> None:
    """``--versus`` (another revision's code, counted beside this tree's), ``--out`` (the report appended there) and
    the hidden ``--one`` and ``--expect`` of a child process counting one configuration."""
    parser.add_argument("--versus", help="a git revision whose code to count beside this tree's")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--expect", help=argparse.SUPPRESS)


def run_child(script: str, one: dict, *, code: Path, extra: tuple[str, ...] = ()) -> dict:
    """``script --one ONE`` in a fresh process importing ``trainables`` from ``code`` (a checkout's root) and the
    scripts from this tree; its last printed line, JSON. A failing child's stderr ends this process's message."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(REPO / "scripts")])}
    # --expect: the child checks that it imported the code measured
    command = [sys.executable, script, "--one", json.dumps(one), *extra, "--expect", str(code)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"counting {one} with the code in {code} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_imported_from(code: str | None) -> None:
    """Exit unless ``trainables`` was imported from the checkout ``code`` (a child measuring another revision)."""
    import trainables

    if code and not Path(trainables.__file__).resolve().is_relative_to(Path(code).resolve()):
        raise SystemExit(f"trainables imported from {trainables.__file__}, not from {code}")


def stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def machine() -> str:
    return (
        f"{platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 1024**3:.0f} GiB, "
        f"CPU fp32, torch {torch.__version__}"
    )


def publish(text: str, out: Path | None) -> None:
    """Print the report and append it to ``out`` (docs/benchmarks.md) when given."""
    print(text)
    if out:
        with open(out, "a") as handle:
            handle.write("\n" + text)


def timed(fn, *, steps: int, warmup: int = 1, device: torch.device | str = "cpu") -> float:
    """Median seconds of ``fn`` over ``steps`` calls after ``warmup`` untimed ones (allocation, autotuning);
    CUDA is synchronised around each call."""
    seconds = []
    for i in range(warmup + steps):
        with Stopwatch(device) as watch:
            fn()
        if i >= warmup:
            seconds.append(watch.seconds)
    return statistics.median(seconds)


def official_models(*, depth: int = 16, num_classes: int = 1000, vqvae_channels: int = 160):
    """(VQVAE, VAR) of the official architectures (256px, 10 scales, codebook 4096), random weights, seed 0.
    ``vqvae_channels`` below the official 160 narrows the VQVAE's convolutions only (same layout, latent and
    codebook): for smoke runs on a CPU, where the 256px decoder would dominate."""
    torch.manual_seed(0)
    vqvae = build_vqvae(
        vocab_size=4096, z_channels=32, ch=vqvae_channels, patch_nums=OFFICIAL_PATCH_NUMS
    ).eval()
    var = build_var(
        depth=depth, num_classes=num_classes, patch_nums=OFFICIAL_PATCH_NUMS, vocab_size=4096, z_channels=32
    )
    return vqvae, var


def flowers_token_views(*, views: int = 1, seed: int = 0) -> TokenViews:
    """Random token views shaped as Oxford Flowers' token cache: 1,020 examples of 102 classes, ``views`` cached views
    of the official 10 scales' maps each (int16, the official 4,096 codes)."""
    generator = torch.Generator().manual_seed(seed)
    return TokenViews(
        torch.randint(0, FLOWERS_CLASSES, (FLOWERS_TRAIN_IMAGES,), generator=generator),
        tuple(
            torch.randint(
                0, 4096, (FLOWERS_TRAIN_IMAGES, views, pn * pn), generator=generator, dtype=torch.int16
            )
            for pn in OFFICIAL_PATCH_NUMS
        ),
    )
