"""On-disk token cache: a dataset split tokenised once by the frozen VQVAE, for a fixed seeded set of augmented views.

Training reads token maps instead of re-encoding every augmented view at every step (the published pipeline spent
about a quarter of the d16 step in the VQVAE). Each image gets ``num_views`` views: the paper's train transform
(shorter side to resolution*288/256, LANCZOS) followed by random crops whose offsets come from a generator seeded by
(seed, the image file's SHA-256), so any view can be reproduced exactly. The image alone decides its crops, not its
place in the listing: under DP, adding or removing one image must leave every other example's input as it was
(the accountant's add/remove neighbours), which listing indices, shifted by one insertion, do not. Augmentation multiplicity k draws k of these views.

Layout under ``root/<dataset>-<split>-<key hash>/``: ``meta.json`` (the key, dtype, completion), ``labels.npy``
and one memory-mapped array per scale ``tokens_s{si}.npy`` [N, V, pn*pn] (int16 when the codebook fits, else
int32), filled shard by shard of ``shard_size`` images; ``progress.json`` (rewritten atomically after each shard
is flushed) lists the finished image ranges [start, stop), so an interrupted build resumes at the first unfinished
shard, whatever shard size either build used (a shard counts as finished only when all its images are), and readers
trust only a cache whose ``meta.json`` says complete. Concurrent trials wanting the same cache serialise on the
folder's ``build.lock``: one builds, the others wait and then read. The key covers the dataset, split, the image
files' content fingerprint (``ImageList.fingerprint()``: paths, labels, sizes, mtimes and sampled bytes), VQVAE
weights, resolution and augmentation spec: change any, or replace an image's pixels at the same path, and the cache
misses. A cache is shared by every trial (and sweep) with the same key.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from bench.pixels import to_rgb

from ..models import VQVAE
from ..models.checkpoints import atomic_write, file_lock
from ..progress import Log, Progress
from .datasets import DatasetError, ImageList
from .tokens import TokenViews

# 2: images decode through ``bench.pixels.to_rgb`` (EXIF orientation, 16-bit and float pixels rescaled, not clipped),
# so views of some images differ from version 1's and its caches must miss.
# 3: crops are seeded by the image file's content, not its index in the listing.
# 4: transparent pixels are composited onto white (``bench.pixels.to_rgb``), not shown in the colour the file keeps under them.
CACHE_FORMAT = "varsweep-token-cache/4"
PROGRESS_FORMAT = "varsweep-token-cache-progress/2"
RESIZE_RATIO = 288 / 256


@dataclass(frozen=True)
class ViewSpec:
    """How the cached views of an image are made: ``num_views`` random crops of size ``resolution`` after
    resizing the shorter side to round(resolution * resize_ratio) with LANCZOS; offsets seeded by (seed, the
    image's identity: its file's SHA-256)."""

    resolution: int
    num_views: int
    seed: int = 0
    resize_ratio: float = RESIZE_RATIO

    def __post_init__(self) -> None:
        if self.resolution < 1 or self.num_views < 1 or self.resize_ratio < 1.0:
            raise ValueError(
                f"invalid view spec {self}: need resolution >= 1, num_views >= 1, resize_ratio >= 1"
            )


def vqvae_fingerprint(vqvae: VQVAE) -> str:
    """SHA-256 over the VQVAE's state dict (names, shapes, dtypes and bytes): changes whenever the weights do."""
    digest = hashlib.sha256()
    for name, tensor in vqvae.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(images: ImageList, vqvae: VQVAE, spec: ViewSpec) -> dict:
    return {
        "format": CACHE_FORMAT,
        "dataset": images.name,
        "split": images.split,
        "images": images.fingerprint(),
        "num_images": len(images),
        "vqvae": vqvae_fingerprint(vqvae),
        "patch_nums": list(vqvae.patch_nums),
        "vocab_size": vqvae.vocab_size,
        "views": asdict(spec),
    }


def image_identity(data: bytes) -> bytes:
    """What an image's crops are keyed by: the SHA-256 of its file's bytes (the example alone)."""
    return hashlib.sha256(data).digest()


def _crop_seed(seed: int, identity: bytes) -> int:
    """A 63-bit generator seed from (spec seed, image identity): distinct images get unrelated crop offsets."""
    digest = hashlib.blake2b(f"{seed}:".encode() + identity, digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def make_views(image: Image.Image, *, spec: ViewSpec, identity: bytes) -> torch.Tensor:
    """The ``num_views`` cached views [V, 3, R, R] in [-1, 1] of an image whose ``image_identity`` is
    ``identity``; deterministic in (spec, identity)."""
    resized = TF.resize(
        to_rgb(image),
        round(spec.resolution * spec.resize_ratio),
        interpolation=T.InterpolationMode.LANCZOS,
    )
    pixels = TF.to_dtype(TF.to_image(resized), torch.float32, scale=True) * 2 - 1
    H, W = pixels.shape[-2:]
    generator = torch.Generator().manual_seed(_crop_seed(spec.seed, identity))
    tops = torch.randint(0, H - spec.resolution + 1, (spec.num_views,), generator=generator).tolist()
    lefts = torch.randint(0, W - spec.resolution + 1, (spec.num_views,), generator=generator).tolist()
    return torch.stack(
        [pixels[:, t : t + spec.resolution, s : s + spec.resolution] for t, s in zip(tops, lefts)]
    )


class TokenCache:
    """A token cache directory for one key (see the module docstring)."""

    def __init__(self, root: str | Path, key: dict, *, shard_size: int = 256):
        self.key, self.shard_size = key, shard_size
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        self.folder = Path(root) / f"{key['dataset']}-{key['split']}-{digest}"
        self.dtype = np.int16 if key["vocab_size"] <= np.iinfo(np.int16).max + 1 else np.int32

    @property
    def num_shards(self) -> int:
        return -(-self.key["num_images"] // self.shard_size)

    def scale_path(self, si: int) -> Path:
        return self.folder / f"tokens_s{si}.npy"

    @property
    def complete(self) -> bool:
        meta = self.folder / "meta.json"
        return meta.is_file() and json.loads(meta.read_text()).get("complete", False)

    def _finished_ranges(self) -> list[tuple[int, int]]:
        """Image ranges [start, stop) already tokenised and flushed; none for a progress file of another format
        (e.g. bare shard numbers, whose shard size is unknown: the build starts over)."""
        progress = self.folder / "progress.json"
        record = json.loads(progress.read_text()) if progress.is_file() else None
        if not isinstance(record, dict) or record.get("format") != PROGRESS_FORMAT:
            return []
        return [(int(start), int(stop)) for start, stop in record["finished_images"]]

    def _record_finished(self, ranges: list[tuple[int, int]]) -> None:
        record = {
            "format": PROGRESS_FORMAT,
            "shard_size": self.shard_size,
            "finished_images": [list(r) for r in _merged(ranges)],
        }
        _atomic_write_text(self.folder / "progress.json", json.dumps(record))

    def build(
        self, images: ImageList, vqvae: VQVAE, *, spec: ViewSpec, batch_size: int = 64, log: Log | None = None
    ) -> None:
        """Tokenise every unfinished shard (resumes an interrupted build), then mark the cache complete."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(
            self.folder / "meta.json",
            json.dumps({**self.key, "complete": False, "dtype": np.dtype(self.dtype).name}, indent=1),
        )
        arrays = [self._open_for_writing(si, pn, spec) for si, pn in enumerate(self.key["patch_nums"])]
        finished = self._finished_ranges()
        device = next(vqvae.parameters()).device
        progress = Progress("token cache", "image", len(images), log=log)
        progress.message(f"tokenising {len(images)} images x {spec.num_views} views once into {self.folder}")
        for shard in range(self.num_shards):
            start, stop = shard * self.shard_size, min((shard + 1) * self.shard_size, len(images))
            if _covered(start, stop, finished):
                continue
            for array, tokens in zip(
                arrays,
                _tokenise(
                    images,
                    list(range(start, stop)),
                    vqvae,
                    spec=spec,
                    batch_size=batch_size,
                    device=device,
                    dtype=self.dtype,
                ),
            ):
                array[start:stop] = tokens
                array.flush()
            finished = _merged([*finished, (start, stop)])
            self._record_finished(finished)
            progress.update(stop)
        np.save(self.folder / "labels.npy", np.asarray(images.labels, dtype=np.int64))
        _atomic_write_text(
            self.folder / "meta.json",
            json.dumps({**self.key, "complete": True, "dtype": np.dtype(self.dtype).name}, indent=1),
        )

    def _open_for_writing(self, si: int, pn: int, spec: ViewSpec) -> np.memmap:
        shape = (self.key["num_images"], spec.num_views, pn * pn)
        path = self.scale_path(si)
        if _whole_npy(path, shape=shape, dtype=self.dtype):
            return np.load(path, mmap_mode="r+")
        (self.folder / "progress.json").unlink(
            missing_ok=True
        )  # a new or mismatched file: nothing in it is finished
        return np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=shape)

    def load(self) -> TokenViews:
        """All views as a ``TokenViews`` over memory-mapped arrays (copy-on-write: the files are never modified;
        pages are read on demand and batches are widened to int64 on use)."""
        if not self.complete:
            raise DatasetError(f"token cache {self.folder} is incomplete; build it first")
        views = []
        for si, pn in enumerate(self.key["patch_nums"]):
            try:
                array = np.load(self.scale_path(si), mmap_mode="c")
            except (OSError, ValueError, EOFError) as err:
                raise DatasetError(
                    f"token cache file {self.scale_path(si)} is damaged ({err}); delete the folder to rebuild"
                ) from err
            if array.shape[0] != self.key["num_images"] or array.shape[2] != pn * pn:
                raise DatasetError(
                    f"token cache file {self.scale_path(si)} has shape {array.shape}, expected [{self.key['num_images']}, V, {pn * pn}]"
                )
            views.append(torch.from_numpy(array))
        return TokenViews(torch.from_numpy(np.load(self.folder / "labels.npy")), tuple(views))


def _tokenise(
    images: ImageList,
    indices: list[int],
    vqvae: VQVAE,
    *,
    spec: ViewSpec,
    batch_size: int,
    device: torch.device,
    dtype: type = np.int64,
) -> list[np.ndarray]:
    """Token maps of every view of the given images: per scale [n, V, pn*pn]. The views are encoded in order,
    ``batch_size`` rows at a time, as they are made: memory holds one image's views and a batch, never the
    shard's (k = 128 caches 512 views an image: a 256-image shard's float32 pixels at 256 px are ~100 GiB)."""
    n, num_views = len(indices), spec.num_views
    out = [np.empty((n * num_views, pn * pn), dtype=dtype) for pn in vqvae.patch_nums]
    encoded, rows_N3RR = 0, None
    for position, index in enumerate(indices):
        views_V3RR = _read_views(images.paths[index], spec=spec)
        rows_N3RR = views_V3RR if rows_N3RR is None else torch.cat([rows_N3RR, views_V3RR])
        last = position == n - 1
        while len(rows_N3RR) >= batch_size or (last and len(rows_N3RR)):
            batch_B3RR, rows_N3RR = rows_N3RR[:batch_size], rows_N3RR[batch_size:]
            with torch.no_grad():
                tokens = vqvae.img_to_idxBl(batch_B3RR.to(device))
            for array, idx_Bl in zip(out, tokens):
                array[encoded : encoded + len(batch_B3RR)] = idx_Bl.cpu().numpy()
            encoded += len(batch_B3RR)
    return [array.reshape(n, num_views, -1) for array in out]


def _read_views(path: Path, *, spec: ViewSpec) -> torch.Tensor:
    """The cached views [V, 3, R, R] of the image file at ``path``; an unreadable file raises naming it."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            return make_views(image, spec=spec, identity=image_identity(data))
    except (OSError, Image.DecompressionBombError) as err:
        raise DatasetError(f"cannot read image {path}: {err}") from err


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ranges covering the same images as ``ranges``."""
    out: list[tuple[int, int]] = []
    for start, stop in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def _covered(start: int, stop: int, ranges: list[tuple[int, int]]) -> bool:
    """Whether the merged ``ranges`` hold every image of [start, stop)."""
    return any(a <= start and stop <= b for a, b in ranges)


def _whole_npy(path: Path, *, shape: tuple[int, ...], dtype) -> bool:
    """Whether ``path`` is an .npy file of exactly this shape and dtype holding all its bytes. An unfinished build's
    file cut short (a full disk, a copy) must be made anew: numpy's "r+" memory map pads a short file with zeros,
    which the shards already recorded as finished would then keep as tokens."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            stored_shape, fortran, stored_dtype = read_header(handle)
            offset = handle.tell()
    except (OSError, ValueError, EOFError):  # missing, empty, or not an .npy file
        return False
    whole = offset + math.prod(shape) * np.dtype(dtype).itemsize == path.stat().st_size
    return whole and not fortran and stored_shape == shape and stored_dtype == np.dtype(dtype)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def open_token_cache(
    root: str | Path,
    images: ImageList,
    vqvae: VQVAE,
    *,
    spec: ViewSpec,
    shard_size: int = 256,
    batch_size: int = 64,
    log: Log | None = None,
) -> tuple[TokenViews, bool]:
    """(token views of ``images``, whether the cache was already complete). Builds or finishes it on a miss."""
    cache = TokenCache(root, cache_key(images, vqvae, spec), shard_size=shard_size)
    hit = cache.complete
    if not hit:
        with file_lock(cache.folder / "build.lock"):  # concurrent trials: one builds, the others wait
            hit = cache.complete
            if not hit:
                cache.build(images, vqvae, spec=spec, batch_size=batch_size, log=log)
    return cache.load(), hit
