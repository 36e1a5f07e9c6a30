"""Every closed set of names is defined once (``bench.schema``), and every registry keyed by one of them holds
exactly that set (in its order where the order shows): a name added in one place and forgotten in another fails
here, not mid-sweep."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from analysis import figures, tables
from analysis.metrics import DATASET_COLUMNS, METHOD_LABELS, VARIANT_LABELS, VARIANT_TARGETS
from bench import schema
from bench.sweeps import SWEEPS, build_sweep
from bench.sweeps.common import DP_SETTINGS, PAPER_DATASETS, PAPER_METHODS
from trainables import methods, privacy
from trainables.data.datasets import READERS
from trainables.data.offline import OFFLINE_SETS
from trainables.evaluation import features
from trainables.models import checkpoints

TRAINED = tuple(m for m in schema.METHODS if m != "base")  # "base" evaluates the base model: nothing to adapt


def test_methods_registries_hold_every_method():
    assert set(methods.METHODS) == set(TRAINED)
    assert set(methods.LORA_PRESETS) == {m for m in TRAINED if m.startswith("lora")}
    assert tuple(METHOD_LABELS) == schema.METHODS  # the same names in the same (table) order
    assert set(figures.METHOD_COLORS) == set(figures.METHOD_MARKERS) == set(schema.METHODS)
    assert set(VARIANT_LABELS) == set(VARIANT_TARGETS) <= set(TRAINED)
    assert set(DP_SETTINGS) == set(TRAINED)  # every trained method has the paper's DP settings
    assert PAPER_METHODS == tables.TABLE1_METHODS and set(tables.ABLATION_METHODS) <= set(TRAINED)
    assert set(tables.TABLE2_METHODS) <= set(TRAINED)


def test_lora_targets_are_the_libraries_groups():
    assert tuple(methods.LORA_TARGET_GROUPS) == schema.LORA_TARGETS
    assert all(set(groups) <= set(schema.LORA_TARGETS) for groups in methods.LORA_PRESETS.values())


def test_datasets_are_readers_or_offline_sets():
    offline = {name for name, facts in schema.DATASETS.items() if facts.offline}
    assert offline == set(OFFLINE_SETS)
    assert set(READERS) == set(schema.DATASETS) - offline
    assert PAPER_DATASETS == tuple(DATASET_COLUMNS) and set(PAPER_DATASETS) <= set(READERS)


def test_every_sweep_uses_the_closed_sets():
    for name in SWEEPS:
        for config in build_sweep(name) + build_sweep(name, smoke=True):
            assert config.method.name in schema.METHODS and config.data.dataset in schema.DATASETS
            assert config.evaluation.extractor in schema.EXTRACTORS


def test_privacy_uses_the_schemas_sets():
    assert privacy.ACCOUNTANTS is schema.ACCOUNTANTS


@pytest.mark.parametrize("accountant", schema.ACCOUNTANTS)
def test_every_accountant_calibrates(accountant):
    sigma = privacy.calibrate_noise_multiplier(
        target_epsilon=8.0, delta=1e-3, sampling_rate=0.25, steps=8, accountant=accountant
    )
    assert 0 < sigma < 10


@pytest.mark.parametrize("clipping", schema.CLIPPING_MODES)
def test_every_clipping_mode_is_valid_for_the_library(clipping):
    """Each mode passes the library's checks and makes a private model: "auto" resolves to a concrete mode."""
    config = schema.PrivacyConfig(
        target_epsilon=8.0, sampling_rate=0.25, max_grad_norm=1.0, clipping=clipping
    )
    assert privacy.validate_privacy(config, dataset_size=100, planned_steps=8) == pytest.approx(1e-2)
    model = nn.Sequential(nn.Linear(4, 3))
    state = privacy.make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        privacy=config,
        resources=schema.ResourcesConfig(rows_per_forward=32),
        dataset_size=100,
        planned_steps=8,
    )
    assert state.clipping in set(schema.CLIPPING_MODES) - {"auto"} and (
        clipping == "auto" or state.clipping == clipping
    )
    privacy.release(state)


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
