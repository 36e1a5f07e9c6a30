"""The digit classifier behind the embedded default's metrics (``digits-cnn-v2``): trained once per cache folder on
three quarters of the digits test split, never on the train split (a DP trial's private data), accurate on the held-out
quarter and on the train split it never saw, cached with its record, and the class accuracy of generated samples it
gives."""

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
    held_out_split,
    predict,
)
from trainables.evaluation.features import build_extractor

READ_SPLITS: list[str] = []  # the digits splits the classifier's build read


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    lines: list[str] = []
    digits = offline.digits

    def spied(*, split: str, **kwargs):
        READ_SPLITS.append(split)
        return digits(split=split, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(offline, "digits", spied)
        model, record = digit_classifier(cache, log=lines.append)
    return cache, model, record, lines


def test_the_classifier_never_reads_the_train_split(built):
    """A DP trial's metrics are released without noise: the classifier behind them must not have seen its data."""
    assert READ_SPLITS == ["test"]


def test_classifier_is_accurate_on_held_out_digits_and_records_it(built):
    cache, model, record, lines = built
    test = offline.digits(split="test", image_size=16)
    fit, held_out = held_out_split(test)
    accuracy = (predict(model, held_out.images_N3HW) == held_out.labels_N).double().mean().item()
    assert accuracy >= 0.96 and record["test_accuracy"] == pytest.approx(accuracy)
    assert record["name"] == CLASSIFIER == "digits-cnn-v2" and record["split"] == "test"
    assert (record["train_images"], record["test_images"]) == (len(fit), len(held_out)) == (268, 91)
    # The folds are stratified: every class is held out in proportion (each has 35-37 test digits).
    assert torch.bincount(held_out.labels_N, minlength=10).min() >= 8
    # The train split, a trial's (private) training data, is never seen, and still read as well.
    train = offline.digits(split="train", image_size=16)
    assert (predict(model, train.images_N3HW) == train.labels_N).double().mean() >= 0.96
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
