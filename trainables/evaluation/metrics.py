"""FID, precision/recall and KID from feature matrices, with torch-fidelity's implementations.

The paper's protocol computes all three on the same Inception-v3 pool features (torch-fidelity's default
precision/recall would use VGG16 features instead), so metrics here take features, whatever extractor made them;
the extractor's name travels with every result (the result's ``evaluation_settings``) and results of different extractors are
never compared. Reference statistics of a real split are computed once and cached on disk (``ReferenceStats``).
Features: float [N, D]; the first argument is always the generated set, the second the real one.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import calculate_precision_recall_part

from ..models.checkpoints import atomic_write

# 2: the key names the extractor's weights, and real images decode through ``bench.pixels.to_rgb`` (EXIF orientation,
# 16-bit and float pixels rescaled), so version-1 statistics of some splits are stale: they miss and are rebuilt.
# 3: transparent pixels are composited onto white (``to_rgb``).
REFERENCE_FORMAT = "varsweep-reference-stats/3"
# Rows of one block of pairwise distances in precision/recall: a block is [PR_BLOCK_ROWS, N] float64, ~200 MB at
# Food-101's 25,250 test images, where the full matrices were N x N (5 GB each, ~15 GB together).
PR_BLOCK_ROWS = 1024
KID_MAX_SUBSET_SIZE = 1000  # the usual KID subset size, an upper bound here (``kid_subset_size``)


def _check_features(generated_ND: torch.Tensor, real_MD: torch.Tensor, *, minimum: int) -> None:
    if generated_ND.ndim != 2 or real_MD.ndim != 2 or generated_ND.shape[1] != real_MD.shape[1]:
        raise ValueError(
            f"need two feature matrices [N, D] of one width, got {list(generated_ND.shape)} and {list(real_MD.shape)}"
        )
    if min(len(generated_ND), len(real_MD)) < minimum:
        raise ValueError(
            f"need at least {minimum} samples per set, got {len(generated_ND)} generated and {len(real_MD)} real"
        )
    if not (torch.isfinite(generated_ND).all() and torch.isfinite(real_MD).all()):
        raise ValueError("features contain NaN or inf")


def gaussian_statistics(features_ND: torch.Tensor) -> dict[str, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64) of a feature set, as FID uses them."""
    return fid_features_to_statistics(features_ND.detach().cpu().double())


def fid_from_statistics(generated: dict[str, np.ndarray], real: dict[str, np.ndarray]) -> float:
    return float(fid_statistics_to_metric(generated, real, verbose=False)["frechet_inception_distance"])


def fid(generated_ND: torch.Tensor, real_MD: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to the two feature sets."""
    _check_features(generated_ND, real_MD, minimum=2)
    return fid_from_statistics(gaussian_statistics(generated_ND), gaussian_statistics(real_MD))


def precision_recall(
    generated_ND: torch.Tensor, real_MD: torch.Tensor, *, neighborhood: int = 3
) -> dict[str, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019): a sample is covered by a set when it lies within the
    k-th-nearest-neighbour radius of some member of that set. Precision: generated samples covered by the real
    set; recall: real samples covered by the generated set."""
    _check_features(generated_ND, real_MD, minimum=neighborhood + 1)
    # Block by block (torch-fidelity's low-memory route): the same distances and radii as the full matrices.
    precision, recall = calculate_precision_recall_part(
        generated_ND.detach().cpu().double(),
        real_MD.detach().cpu().double(),
        neighborhood=neighborhood,
        batch_size=PR_BLOCK_ROWS,
    )
    return {"precision": float(precision), "recall": float(recall)}


def kid_subset_size(generated: int, real: int, *, largest: int = KID_MAX_SUBSET_SIZE) -> int:
    """KID's subset size for sets of ``generated`` and ``real`` images: half the smaller set, at most ``largest``,
    at least 2 (the unbiased MMD needs two). Half, so that random subsets of a small set differ and ``kid_std``
    measures something (subsets of the whole set are all the same set: std 0)."""
    return max(2, min(largest, min(generated, real) // 2))


def kid(
    generated_ND: torch.Tensor,
    real_MD: torch.Tensor,
    *,
    subsets: int = 100,
    subset_size: int | None = None,
    seed: int = 2020,
) -> dict[str, float]:
    """Kernel Inception Distance (cubic polynomial kernel, unbiased MMD^2 over ``subsets`` random subsets of
    ``subset_size`` samples per set; None: ``kid_subset_size``'s rule). A size above either set's is refused,
    never shrunk silently (the recorded size must be the one used)."""
    _check_features(generated_ND, real_MD, minimum=2)
    if subset_size is None:
        subset_size = kid_subset_size(len(generated_ND), len(real_MD))
    if not 2 <= subset_size <= min(len(generated_ND), len(real_MD)):
        raise ValueError(
            f"KID subset_size {subset_size} needs 2 <= size <= each set's size ({len(generated_ND)} generated, "
            f"{len(real_MD)} real); kid_subset_size() gives a size that fits"
        )
    out = kid_features_to_metric(
        generated_ND.detach().cpu().double(),
        real_MD.detach().cpu().double(),
        kid_subsets=subsets,
        kid_subset_size=subset_size,
        rng_seed=seed,
        verbose=False,
    )
    return {
        "kid_mean": float(out["kernel_inception_distance_mean"]),
        "kid_std": float(out["kernel_inception_distance_std"]),
    }


@dataclass(frozen=True)
class ReferenceKey:
    """What reference statistics depend on; two trials share them exactly when their keys are equal."""

    dataset: str
    split: str
    resolution: int
    extractor: str
    num_images: int
    # ``ImageList.fingerprint()``: every (path, label, size, mtime) and sampled file bytes, so two folders with equal
    # names and counts never collide and pixels replaced at the same path miss.
    images: str = ""
    # The extractor's weights (``evaluate.extractor_weights_id``: the Inception file's SHA-256, the digit
    # classifier's weights_sha256, the substitute's seed): statistics of one weights file never serve another.
    weights: str = ""

    def file_name(self) -> str:
        return (
            f"{self.dataset}-{self.split}-{self.resolution}px-{self.extractor}-{self.num_images}-{self.images[:12]}"
            f"-{self.weights[:12]}.npz"
        )


def _check_arrays(record: dict[str, np.ndarray]) -> None:
    """``ValueError`` unless ``record`` holds features [N, D] and their float64 mu [D] and sigma [D, D]: a file
    without them (another writer's) failed with a bare KeyError after every image had been generated."""
    missing = [name for name in ("features", "mu", "sigma") if name not in record]
    if missing:
        raise ValueError(f"no {', '.join(repr(m) for m in missing)} entry")
    features, mu, sigma = record["features"], record["mu"], record["sigma"]
    dim = features.shape[-1] if features.ndim == 2 else -1
    if (
        dim < 1
        or mu.shape != (dim,)
        or sigma.shape != (dim, dim)
        or {mu.dtype, sigma.dtype} != {np.dtype("float64")}
    ):
        raise ValueError(
            f"entries of other shapes than features [N, D], mu [D] and sigma [D, D]: features "
            f"{list(features.shape)}, mu {list(mu.shape)}, sigma {list(sigma.shape)}"
        )


class ReferenceStats:
    """Real-split features and their Gaussian statistics, cached on disk under ``root`` by ``ReferenceKey``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: ReferenceKey) -> Path:
        return self.root / key.file_name()

    def load(self, key: ReferenceKey) -> dict[str, np.ndarray] | None:
        """The cached entry (mu, sigma, features) or None; a damaged or foreign file raises ValueError naming it."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            # A truncated or overwritten archive fails in zipfile or zlib (BadZipFile, EOFError, zlib.error) as
            # well as in numpy (OSError, ValueError).
            with np.load(path, allow_pickle=False) as data:
                record = {name: data[name] for name in data.files}
            if "meta" not in record:
                raise ValueError("no 'meta' entry: not a file these statistics were saved as")
            meta = json.loads(str(record.pop("meta")))
            if not isinstance(meta, dict):
                raise ValueError(f"its 'meta' entry is {type(meta).__name__}, not an object")
            _check_arrays(record)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise ValueError(
                f"reference statistics {path} are unreadable ({type(err).__name__}: {err}); delete the file to "
                "recompute"
            ) from err
        if meta.get("format") != REFERENCE_FORMAT:  # an older format's pixels or key may differ: recomputed
            return None
        if meta != {"format": REFERENCE_FORMAT, **asdict(key)}:
            raise ValueError(f"reference statistics {path} were written for {meta}, not {asdict(key)}")
        return record

    def save(self, key: ReferenceKey, features_ND: torch.Tensor) -> dict[str, np.ndarray]:
        if len(features_ND) != key.num_images:
            raise ValueError(f"{len(features_ND)} features for a key of {key.num_images} images")
        stats = gaussian_statistics(features_ND)
        record = {**stats, "features": features_ND.detach().cpu().float().numpy()}
        meta = json.dumps({"format": REFERENCE_FORMAT, **asdict(key)}, sort_keys=True)
        atomic_write(self.path(key), lambda tmp: _savez(tmp, meta=np.array(meta), **record))
        return record


def _savez(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.savez would append ".npz" to a path
        np.savez(handle, **arrays)
