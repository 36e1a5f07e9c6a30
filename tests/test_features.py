"""Feature extractors: the offline substitute separates real domains; Inception refuses to run without local weights."""

from __future__ import annotations

import pytest
import torch

from trainables.data import offline
from trainables.evaluation.features import (
    INCEPTION,
    SUBSTITUTE,
    build_extractor,
    extract_features,
    uint8_batches,
)
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


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised Inception-v3 state dict in torch-fidelity's layout (the real file cannot be fetched
    offline): built by constructing torch-fidelity's network with its weight loading switched off once."""
    from unittest import mock

    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    with (
        mock.patch("torch.load", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path="unused"
        )
    torch.save(net.state_dict(), path)
    return path


def test_inception_extractor_runs_from_a_local_weights_file(inception_weights):
    extractor = build_extractor(INCEPTION, weights_path=inception_weights)
    images = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    features = extract_features(extractor, [images])
    assert extractor.name == INCEPTION and features.shape == (2, 2048) and torch.isfinite(features).all()


def test_reference_statistics_are_keyed_by_the_inception_weights(inception_weights, tmp_path, monkeypatch):
    """Statistics made with one Inception weights file never serve another; a trial's recorded SHA-256 of its
    own file is used as is (no second hash of ~100 MB)."""
    from test_datasets import jpeg

    from bench.schema import EvaluationConfig
    from trainables.data.datasets import read_dataset
    from trainables.evaluation import features as features_module
    from trainables.evaluation.evaluate import reference_statistics
    from trainables.evaluation.metrics import ReferenceStats
    from trainables.models.checkpoints import file_sha256

    for i in range(4):
        jpeg(tmp_path / "data" / "test" / "a" / f"{i}.png", seed=i)
    images, cache = read_dataset("folder", tmp_path / "data", "test"), ReferenceStats(tmp_path / "reference")
    other = tmp_path / "other-inception.pth"
    torch.save(
        {k: v * 3 if v.is_floating_point() else v for k, v in torch.load(inception_weights).items()}, other
    )
    first, second = (build_extractor(INCEPTION, weights_path=path) for path in (inception_weights, other))
    assert not reference_statistics(images, extractor=first, resolution=16, cache=cache)[1]
    assert reference_statistics(images, extractor=first, resolution=16, cache=cache)[1]
    stats, hit = reference_statistics(images, extractor=second, resolution=16, cache=cache)
    assert not hit and len(list((tmp_path / "reference").iterdir())) == 2
    from trainables.evaluation.evaluate import extractor_weights_id

    assert first.weights_id == file_sha256(inception_weights) != second.weights_id
    recorded = EvaluationConfig(inception_weights=str(other), inception_weights_sha256="ab" * 32)
    fresh = build_extractor(INCEPTION, weights_path=other)
    monkeypatch.setattr(features_module, "file_sha256", lambda path: pytest.fail("hashed a known file"))
    assert extractor_weights_id(fresh, evaluation=recorded) == "ab" * 32
