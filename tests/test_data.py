"""Offline source (procedural shapes) and target (scikit-learn digits) image sets."""
from __future__ import annotations

import pytest
import torch

from trainables.data import offline


def test_shapes_are_deterministic_and_splits_differ():
    a = offline.shapes(split="train", images_per_class=3, image_size=16, seed=1)
    b = offline.shapes(split="train", images_per_class=3, image_size=16, seed=1)
    test = offline.shapes(split="test", images_per_class=3, image_size=16, seed=1)
    assert a.images_N3HW.dtype == torch.uint8 and a.images_N3HW.shape == (30, 3, 16, 16)
    assert torch.equal(a.images_N3HW, b.images_N3HW) and not torch.equal(a.images_N3HW, test.images_N3HW)
    assert a.class_counts() == {name: 3 for name in offline.SHAPE_CLASSES}


def test_digits_split_is_stratified_and_complete():
    train, test = offline.digits(split="train", image_size=16), offline.digits(split="test", image_size=16)
    assert len(train) + len(test) == 1797 and train.images_N3HW.shape[1:] == (3, 16, 16)
    for name in offline.DIGIT_CLASSES:
        total = train.class_counts()[name] + test.class_counts()[name]
        assert abs(test.class_counts()[name] - 0.2 * total) <= 1
    assert train.images_N3HW.float().mean() > 128  # light paper, dark ink


def test_unit_range():
    img = torch.tensor([0, 255], dtype=torch.uint8)
    assert torch.equal(offline.to_unit_range(img), torch.tensor([-1.0, 1.0]))


def test_bad_split():
    with pytest.raises(ValueError, match="split must be one of"):
        offline.shapes(split="val", images_per_class=1)
