"""Feature extractors: the offline substitute separates real domains; Inception refuses to run without local weights."""
from __future__ import annotations

import pytest
import torch

from trainables.data import offline
from trainables.evaluation.features import INCEPTION, SUBSTITUTE, build_extractor, extract_features, uint8_batches
from trainables.evaluation.metrics import fid


def features_of(images: offline.ImageSet) -> torch.Tensor:
    return extract_features(build_extractor(SUBSTITUTE), uint8_batches(images.images_N3HW))


def test_substitute_is_deterministic_and_separates_domains():
    digits_train = offline.digits(split="train", image_size=16, seed=0)
    digits_test = offline.digits(split="test", image_size=16, seed=0)
    shapes = offline.shapes(split="test", images_per_class=36, image_size=16, seed=0)
    a, b = features_of(digits_test), features_of(digits_test)
    assert torch.equal(a, b) and a.shape == (len(digits_test), 256)
    same_domain = fid(features_of(digits_train), a)
    other_domain = fid(features_of(shapes), a)
    print(f"substitute FID: digits train vs test {same_domain:.4f}, shapes vs digits {other_domain:.4f}")
    assert fid(a, a) < 1e-6 and other_domain > 10 * same_domain > 0


def test_inception_needs_a_local_weights_file(tmp_path):
    with pytest.raises(ValueError, match="needs weights_path"):
        build_extractor(INCEPTION)
    with pytest.raises(FileNotFoundError, match="never download"):
        build_extractor(INCEPTION, weights_path=tmp_path / "missing.pth")
    (tmp_path / "bad.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable Inception-v3 state dict"):
        build_extractor(INCEPTION, weights_path=tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="unknown feature extractor"):
        build_extractor("vgg16")


def test_substitute_refuses_float_images():
    with pytest.raises(ValueError, match="expected uint8"):
        build_extractor(SUBSTITUTE)(torch.zeros(1, 3, 8, 8))
