"""Every closed set of names is defined once (``bench.schema``), and every registry keyed by one of them holds
exactly that set: a name added in one place and forgotten in another fails here, not mid-sweep."""
from __future__ import annotations

import pytest

from analysis.metrics import METHOD_LABELS, VARIANT_LABELS, VARIANT_TARGETS
from bench import schema
from bench.sweeps.common import DP_SETTINGS, PAPER_DATASETS, PAPER_METHODS
from trainables import methods, privacy
from trainables.data.datasets import READERS
from trainables.data.offline import OFFLINE_SETS
from trainables.evaluation import features
from trainables.models import checkpoints


def test_methods_registries_hold_every_training_method():
    trained = set(schema.METHODS) - {"base"}  # "base" evaluates the base model: nothing to adapt
    assert set(methods.METHODS) == trained
    assert set(methods.LORA_PRESETS) == {m for m in trained if m.startswith("lora")}
    assert set(METHOD_LABELS) == set(schema.METHODS)
    assert set(VARIANT_LABELS) == set(VARIANT_TARGETS) <= trained
    assert set(DP_SETTINGS) <= trained and set(PAPER_METHODS) <= trained


def test_datasets_are_readers_or_offline_sets():
    offline = {name for name, facts in schema.DATASETS.items() if facts.offline}
    assert offline == set(OFFLINE_SETS)
    assert set(READERS) == set(schema.DATASETS) - offline
    assert set(PAPER_DATASETS) <= set(READERS)


def test_privacy_uses_the_schemas_sets():
    assert privacy.CLIPPING_MODES is schema.CLIPPING_MODES and privacy.ACCOUNTANTS is schema.ACCOUNTANTS


@pytest.mark.parametrize("accountant", schema.ACCOUNTANTS)
def test_every_accountant_calibrates(accountant):
    sigma = privacy.calibrate_noise_multiplier(target_epsilon=8.0, delta=1e-3, sampling_rate=0.25, steps=8, accountant=accountant)
    assert 0 < sigma < 10


@pytest.mark.parametrize("clipping", schema.CLIPPING_MODES)
def test_every_clipping_mode_is_valid_for_the_library(clipping):
    spec = privacy.PrivacySpec(target_epsilon=8.0, sampling_rate=0.25, max_grad_norm=1.0, clipping=clipping)
    assert privacy.validate_privacy(spec, dataset_size=100, planned_steps=8) == pytest.approx(1e-2)


def test_class_inits_equal_the_models_copy():
    assert checkpoints.CLASS_INITS == schema.CLASS_INITS  # models/ imports only torch, so it keeps a copy


@pytest.mark.parametrize("name", schema.EXTRACTORS)
def test_every_extractor_name_is_known_to_the_builder(name):
    """Each name builds, or fails only for its missing inputs (Inception's weights, the classifier's cache)."""
    try:
        features.build_extractor(name)
    except ValueError as err:
        assert "unknown feature extractor" not in str(err) and name in str(err)
    assert (features.INCEPTION, features.SUBSTITUTE, features.DIGITS_CNN) == schema.EXTRACTORS
