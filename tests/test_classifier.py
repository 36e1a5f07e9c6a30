"""The digit classifier behind the embedded default's metrics (``digits-cnn-v1``): trained once per cache folder on
the digits train split only, accurate on the held-out split, cached with its record, and the class accuracy of
generated samples it gives."""

from __future__ import annotations

import json

import pytest
import torch

from trainables.data import offline
from trainables.evaluation.classifier import (
    CLASSIFIER,
    TRAINING,
    class_accuracy,
    classifier_folder,
    digit_classifier,
    predict,
)
from trainables.evaluation.features import build_extractor


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    lines: list[str] = []
    model, record = digit_classifier(cache, log=lines.append)
    return cache, model, record, lines


def test_classifier_is_accurate_on_held_out_digits_and_records_it(built):
    cache, model, record, lines = built
    test = offline.digits(split="test", image_size=16)
    accuracy = (predict(model, test.images_N3HW) == test.labels_N).double().mean().item()
    assert accuracy >= 0.97 and record["test_accuracy"] == pytest.approx(accuracy)
    assert record["name"] == CLASSIFIER and record["train_images"] == 1438 and record["test_images"] == 359
    epochs = TRAINING["epochs"]
    assert any("test accuracy" in line for line in lines) and any(
        f"epoch {epochs}/{epochs}" in line for line in lines
    )
    # Other resolutions and colours go through the same 16x16 grey input.
    big = torch.nn.functional.interpolate(test.images_N3HW[:64].float(), size=(32, 32), mode="nearest").to(
        torch.uint8
    )
    assert (predict(model, big) == test.labels_N[:64]).double().mean() >= 0.9
    assert model(test.images_N3HW[:5]).shape == (5, 128)


def test_classifier_is_built_once_and_checked_when_loaded(built):
    cache, _, record, _ = built
    lines: list[str] = []
    _, again = digit_classifier(cache, log=lines.append)
    assert again == record and lines == []  # loaded, not retrained
    assert build_extractor(CLASSIFIER, cache_dir=cache).name == CLASSIFIER
    weights = classifier_folder(cache) / "weights.pt"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-10] + b"0123456789")
        with pytest.raises(ValueError, match="does not match the SHA-256"):
            digit_classifier(cache)
    finally:
        weights.write_bytes(original)
    assert (
        json.loads((classifier_folder(cache) / "classifier.json").read_text())["weights_sha256"]
        == record["weights_sha256"]
    )


def test_class_accuracy_counts_each_requested_class():
    requested = torch.tensor([0, 0, 1, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 0])
    out = class_accuracy(predicted, requested, classes=4)
    assert out["class_accuracy"] == pytest.approx(3 / 6)
    assert out["class_accuracy_per_class"] == [pytest.approx(0.5), pytest.approx(2 / 3), 0.0, None]
