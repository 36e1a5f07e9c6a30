"""Offline image data for the embedded default and the tests (no network, no files to fetch).

Two domains, so that the tiny pipeline has something real to adapt *to*:
- source ("pre-training", the role ImageNet plays for VAR): ``shapes``, a procedural generator of ten classes of
  coloured geometric shapes on tinted backgrounds. Procedural, so any number of images at any size, fully
  determined by the seed.
- target ("adaptation", the role of CUB / Flowers / ...): ``digits``, scikit-learn's bundled copy of the UCI
  handwritten digits (1,797 real 8x8 scans by 43 writers, ten classes), drawn as dark ink on light paper.
  Real images that ship inside an installed package, so they work offline and on CI; their domain (grey,
  stroke-based, hand-made) is clearly different from the source.
Images are uint8 [N, 3, H, W]; ``to_unit_range`` maps them to the model's [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..models.checkpoints import atomic_write, file_lock

SHAPE_CLASSES = (
    "circle",
    "ring",
    "square",
    "diamond",
    "triangle",
    "plus",
    "wide bar",
    "tall bar",
    "two dots",
    "checker",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
SUPERSAMPLE = 4  # render at 4x then area-average, for anti-aliased edges
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ImageSet:
    """images_N3HW: uint8 [N, 3, H, W]; labels_N: int64 [N] indexing ``class_names``."""

    name: str
    split: str
    images_N3HW: torch.Tensor
    labels_N: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return self.labels_N.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels_N, minlength=self.num_classes).tolist()
        return dict(zip(self.class_names, counts))


def to_unit_range(images_N3HW: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images_N3HW.float().div(127.5).sub(1.0)


def _shape_mask(kind: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of shape ``kind`` in shape-local coordinates (unit size, centred at 0)."""
    r = np.hypot(x, y)
    if kind == 0:
        return r < 1.0
    if kind == 1:
        return (r < 1.0) & (r > 0.55)
    if kind == 2:
        return np.maximum(abs(x), abs(y)) < 0.85
    if kind == 3:
        return abs(x) + abs(y) < 1.0
    if kind == 4:
        return (y > -0.9) & (y < 0.7) & (abs(x) < (y + 0.9) * 0.62)
    if kind == 5:
        return ((abs(x) < 0.28) & (abs(y) < 1.0)) | ((abs(y) < 0.28) & (abs(x) < 1.0))
    if kind == 6:
        return (abs(x) < 1.0) & (abs(y) < 0.35)
    if kind == 7:
        return (abs(y) < 1.0) & (abs(x) < 0.35)
    if kind == 8:
        return (np.hypot(x - 0.55, y) < 0.4) | (np.hypot(x + 0.55, y) < 0.4)
    return (np.maximum(abs(x), abs(y)) < 0.9) & ((x > 0) == (y > 0))


def _render_shape(kind: int, *, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One anti-aliased image, float32 [H, W, 3] in [0, 1]."""
    n = image_size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n * 2 - 1
    gx, gy = np.meshgrid(coords, coords)
    size = rng.uniform(0.35, 0.6)
    cx, cy = rng.uniform(-0.95 + size, 0.95 - size, size=2)
    angle = rng.uniform(
        -0.35, 0.35
    )  # small tilt only: larger turns would make 'plus' and 'checker' ambiguous
    dx, dy = (gx - cx) / size, (gy - cy) / size
    x, y = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
    mask = _shape_mask(kind, x, y).astype(np.float32)
    background = rng.uniform(0.0, 1.0, size=3)
    foreground = rng.uniform(0.0, 1.0, size=3)
    while np.abs(foreground - background).sum() < 0.9:  # keep the shape visible against its background
        foreground = rng.uniform(0.0, 1.0, size=3)
    shading = 1.0 + 0.15 * (gx * rng.uniform(-1, 1) + gy * rng.uniform(-1, 1))
    image = (background * shading[..., None]) * (1 - mask[..., None]) + foreground * mask[..., None]
    image = image.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(image, 0.0, 1.0)


def shapes(*, split: str, images_per_class: int, image_size: int = 32, seed: int = 0) -> ImageSet:
    """Procedural source domain: ``images_per_class`` images of each of the ten shape classes.
    Splits use disjoint random streams, so train and test never share an image."""
    _check_split(split)
    if images_per_class < 1 or image_size < 8:
        raise ValueError(
            f"need images_per_class >= 1 and image_size >= 8, got {images_per_class}, {image_size}"
        )
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    labels = np.repeat(np.arange(len(SHAPE_CLASSES)), images_per_class)
    pixels = np.stack([_render_shape(int(k), image_size=image_size, rng=rng) for k in labels])
    images = torch.from_numpy(np.round(pixels * 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
    return ImageSet("shapes", split, images, torch.from_numpy(labels).long(), SHAPE_CLASSES)


def digits(*, split: str, image_size: int = 32, test_fraction: float = 0.2, seed: int = 0) -> ImageSet:
    """Target domain: scikit-learn's bundled handwritten digits, upsampled (bicubic) to ``image_size`` and drawn
    as dark ink on light paper. Stratified split: per class, a seeded ``test_fraction`` goes to ``test``."""
    _check_split(split)
    from sklearn.datasets import load_digits  # bundled with scikit-learn; nothing is downloaded

    bunch = load_digits()
    ink_N88 = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)
    labels_N = torch.from_numpy(bunch.target.astype(np.int64))
    chosen = _stratified_indices(labels_N, split=split, test_fraction=test_fraction, seed=seed)
    ink_N1HW = F.interpolate(
        ink_N88[chosen, None], size=(image_size, image_size), mode="bicubic", align_corners=False
    ).clamp(0, 1)
    paper_N3HW = (1.0 - 0.85 * ink_N1HW).expand(-1, 3, -1, -1)
    images = paper_N3HW.mul(255).round().to(torch.uint8).contiguous()
    return ImageSet("digits", split, images, labels_N[chosen], DIGIT_CLASSES)


def _stratified_indices(
    labels_N: torch.Tensor, *, split: str, test_fraction: float, seed: int
) -> torch.Tensor:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels_N.unique(sorted=True).tolist():
        members = torch.nonzero(labels_N == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_test = max(1, round(test_fraction * members.numel()))
        chosen.append(members[:n_test] if split == "test" else members[n_test:])
    return torch.cat(chosen).sort().values


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


OFFLINE_SETS = ("digits", "shapes")


def folder_path(name: str, root: str | Path, *, image_size: int, seed: int = 0) -> Path:
    """Where ``write_folder`` puts an offline set: ``root/<name>-<size>px-seed<seed>``."""
    if name not in OFFLINE_SETS:
        raise ValueError(f"unknown offline set {name!r}; known: {OFFLINE_SETS}")
    return Path(root) / f"{name}-{image_size}px-seed{seed}"


def _split_set(name: str, split: str, *, image_size: int, seed: int) -> ImageSet:
    if name == "digits":
        return digits(split=split, image_size=image_size, seed=seed)
    return shapes(
        split=split, images_per_class=200 if split == "train" else 50, image_size=image_size, seed=seed
    )


def _file_layout(images: ImageSet, folder: Path) -> list[tuple[Path, int]]:
    """(PNG path, label) of every image, in generation order."""
    return [
        (
            folder
            / images.split
            / f"{label:02d}_{images.class_names[label].replace(' ', '_')}"
            / f"{i:05d}.png",
            label,
        )
        for i, label in enumerate(images.labels_N.tolist())
    ]


def listing(
    name: str, root: str | Path, split: str, *, image_size: int, seed: int = 0
) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """The (path, label) list and class names a split of ``write_folder``'s folder has (or will have), in the
    order the generic folder reader lists it (class folder, then file name), without writing anything: what a
    dry run counts."""
    images = _split_set(name, split, image_size=image_size, seed=seed)
    files = sorted(
        _file_layout(images, folder_path(name, root, image_size=image_size, seed=seed)),
        key=lambda item: item[0],
    )
    return files, tuple(
        sorted({path.parent.name for path, _ in files})
    )  # the reader names classes by their folders


def write_folder(name: str, root: str | Path, *, image_size: int, seed: int = 0) -> Path:
    """Write an offline set as a generic ``train/<class>/`` ``test/<class>/`` PNG folder (the layout users' own data
    has) under ``root/<name>-<size>px-seed<seed>``, so sweeps read it through the same reader, token cache and
    evaluation as real datasets. Written once, under a file lock (concurrent trials and sweeps wait for one
    writer, then reuse its folder): every PNG is written atomically and a ``complete`` marker is created last,
    so a reader that finds the marker finds every image whole; later calls reuse it."""
    folder = folder_path(name, root, image_size=image_size, seed=seed)
    marker = folder / "complete"
    if marker.is_file():
        return folder
    with file_lock(folder.parent / f"{folder.name}.lock"):
        if marker.is_file():  # another writer finished while we waited
            return folder
        for split in SPLITS:
            images = _split_set(name, split, image_size=image_size, seed=seed)
            for image_3HW, (path, _) in zip(images.images_N3HW, _file_layout(images, folder)):
                pixels = image_3HW.permute(1, 2, 0).numpy()
                atomic_write(path, lambda tmp, pixels=pixels: Image.fromarray(pixels).save(tmp, format="PNG"))
        atomic_write(marker, lambda tmp: tmp.write_text("written by trainables.data.offline.write_folder\n"))
    return folder
