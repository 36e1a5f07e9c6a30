"""Feature extractors for FID / precision-recall / KID, and feature extraction over image batches.

- ``inception-v3-compat``: torch-fidelity's TF-compatible Inception-v3 pool features (2048-d), the paper's protocol.
  Its weights file (``weights-inception-2015-12-05-6726825d.pth``) is read from a local path, for air-gapped
  clusters; nothing is downloaded.
- ``substitute-randconv-v1``: for offline runs without the Inception weights (tests, the embedded default): a fixed,
  seeded random convolutional network (images resized to 64x64, three stride-2 3x3 conv + ReLU layers, per-channel
  mean and standard deviation pooled: 256-d). Its numbers are only comparable with themselves: the extractor's
  name is recorded in every result and tables never mix extractors.
- ``digits-cnn-v2``: the 128-d penultimate layer of a digit classifier trained once on the digits test split, the
  evaluation split, never a trial's training data (``classifier.py``); for the offline digits only, where it
  measures what a reader of digits sees.
Extractors take uint8 images [B, 3, H, W] and return float32 features [B, D]. Each has a ``name`` and a
``weights_id`` (which weights: cached reference statistics are keyed by both).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bench.schema import DIGITS_EXTRACTOR, EXTRACTORS, INCEPTION_EXTRACTOR, SUBSTITUTE_EXTRACTOR

from ..models.checkpoints import CheckpointError, file_sha256, read_state_dict

INCEPTION, SUBSTITUTE, DIGITS_CNN = (
    INCEPTION_EXTRACTOR,
    SUBSTITUTE_EXTRACTOR,
    DIGITS_EXTRACTOR,
)  # names: bench.schema.EXTRACTORS
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


class RandomConvFeatures(nn.Module):
    """The substitute extractor: weights drawn once from a fixed seed (He-normal), never trained."""

    name = SUBSTITUTE

    def __init__(self, *, seed: int = 0):
        super().__init__()
        self.weights_id = f"seed-{seed}"  # the weights are the seed's draw
        generator = torch.Generator().manual_seed(seed)
        widths = (3, 32, 64, 128)
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths, widths[1:])
        )
        with torch.no_grad():
            for conv in self.convs:
                conv.weight.normal_(0.0, (2.0 / (conv.in_channels * 9)) ** 0.5, generator=generator)
                conv.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        if images_B3HW.dtype != torch.uint8 or images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
            raise ValueError(
                f"expected uint8 images [B, 3, H, W], got {images_B3HW.dtype} {list(images_B3HW.shape)}"
            )
        x = images_B3HW.float().div(127.5).sub(1.0)
        x = F.interpolate(x, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        for conv in self.convs:
            x = F.relu(conv(x))
        return torch.cat((x.mean(dim=(2, 3)), x.std(dim=(2, 3))), dim=1)


class InceptionFeatures(nn.Module):
    """torch-fidelity's Inception-v3 (TF-compatible) 2048-d pool features from a local weights file."""

    name = INCEPTION

    def __init__(self, weights_path: str | Path, *, sha256: str | None = None):
        """``sha256``: the file's SHA-256 when the caller knows it (a trial's ``inception_weights_sha256``);
        else it is hashed on first use of ``weights_id``."""
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception-v3 weights not found at {path}: download {INCEPTION_WEIGHTS_FILE} once "
                "(torch-fidelity's release) and pass its local path; runs never download"
            )
        try:  # validate as plain tensors first (and their CRC-32s): torch-fidelity loads with weights_only=False
            read_state_dict(path)
        except CheckpointError as err:
            raise ValueError(f"{path} is not a readable Inception-v3 state dict: {err}") from err
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        try:
            self.net = FeatureExtractorInceptionV3(
                INCEPTION, ["2048"], feature_extractor_weights_path=str(path)
            )
        except RuntimeError as err:  # load_state_dict's: every missing and unexpected key, thousands of them
            raise ValueError(f"{path} is not an Inception-v3 state dict ({_key_summary(str(err))})") from err
        self.weights_path, self._sha256 = path, sha256

    @property
    def weights_id(self) -> str:
        """SHA-256 of the weights file (~100 MB: hashed once per extractor, a fraction of a second)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.weights_path)
        return self._sha256

    def forward(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        return self.net(images_B3HW)[0]


def _key_summary(message: str, *, shown: int = 3) -> str:
    """``load_state_dict``'s error in a line: how many keys are missing, unexpected or mis-shaped, and the first
    few names of each (its own message lists all of them, 17,584 characters for a VAR checkpoint)."""
    parts = []
    for title, pattern in (
        ("missing", r"Missing key\(s\) in state_dict: ([^\n]*)"),
        ("unexpected", r"Unexpected key\(s\) in state_dict: ([^\n]*)"),
    ):
        found = re.search(pattern, message)
        names = re.findall(r'"([^"]+)"', found.group(1)) if found else []
        if names:
            more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
            parts.append(f"{len(names)} {title} keys: {', '.join(names[:shown])}{more}")
    mis_shaped = re.findall(r"size mismatch for ([^:]+):", message)
    if mis_shaped:
        more = f", ... ({len(mis_shaped) - shown} more)" if len(mis_shaped) > shown else ""
        parts.append(f"{len(mis_shaped)} mis-shaped keys: {', '.join(mis_shaped[:shown])}{more}")
    return "; ".join(parts) or message.strip().splitlines()[0][:300]


def build_extractor(
    name: str,
    *,
    weights_path: str | Path | None = None,
    weights_sha256: str | None = None,
    cache_dir: str | Path | None = None,
    log=None,
) -> nn.Module:
    """The extractor ``name``: Inception needs ``weights_path`` (``weights_sha256``: its known SHA-256, saving a
    hash); the digit classifier is built in ``cache_dir``."""
    if name == DIGITS_CNN:
        if cache_dir is None:
            raise ValueError(f"{DIGITS_CNN} is trained once into a cache folder: pass cache_dir")
        from .classifier import digit_classifier

        return digit_classifier(cache_dir, log=log)[0]
    if name == INCEPTION:
        if weights_path is None:
            raise ValueError(
                f"{INCEPTION} needs weights_path (the local {INCEPTION_WEIGHTS_FILE}); offline runs may use {SUBSTITUTE!r}"
            )
        return InceptionFeatures(weights_path, sha256=weights_sha256)
    if name == SUBSTITUTE:
        return RandomConvFeatures()
    raise ValueError(f"unknown feature extractor {name!r}; known: {list(EXTRACTORS)}")


@torch.no_grad()
def extract_features(
    extractor: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    *,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Features [N, D] (float64 on CPU) of uint8 image batches [B, 3, H, W]."""
    features = [extractor(batch.to(device)).double().cpu() for batch in batches]
    if not features:
        raise ValueError("no images to extract features from")
    return torch.cat(features)


def uint8_batches(images_N3HW: torch.Tensor, batch_size: int = 64) -> Iterable[torch.Tensor]:
    for start in range(0, len(images_N3HW), batch_size):
        yield images_N3HW[start : start + batch_size]
