"""The privacy audit in one run (issue 18): canaries, inclusion, scores and the record's ``audit`` section, checked
by four trainings on the tiny base (run_trial directly, no Ray) and fast tests of the parts.

The trainings use a small folder of offline digits (4 per class) beside m = 100 canaries, so that 300 steps see
each included canary ~75 times in ~25 s on a CPU: (a) without DP the model memorises its canaries and the bound is
clearly above 0; (b) DP at epsilon 1 with clipping skipped (the test-only broken mechanism) gives a bound above 1;
(c) the same DP run with clipping stays at or below its claimed epsilon; (d) a 4-step DP LoRA run with k = 2 views
and 20 canaries trains and scores them. DP trials here set privacy.delta = 1e-5:
at the default 1/N' (1/90) the one-run bound is 0 whatever the guesses (see bench.schema.AuditConfig.delta).
Measured while writing them (audit seeds 0, 1, 2): (b) 2.31, 2.01, 2.31 against a claimed 0.99-1.0; (a) 2.31;
(c) 0.0 (AUC ~0.51).
"""

from __future__ import annotations

import copy
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sweep_driver import tiny_trial

from bench.schema import (
    BROKEN_MECHANISM,
    NON_DP_ONLY,
    AuditConfig,
    ConfigError,
    MethodConfig,
    OptimizationConfig,
    PrivacyConfig,
    RecordError,
    TrialConfig,
    check_result,
    make_result,
    replace,
)
from trainables import audit as audit_module
from trainables import trial as trial_module
from trainables.data import offline
from trainables.data.tokens import TokenViews
from trainables.plan import preflight
from trainables.training import teacher_forcing_batch, token_cross_entropy
from trainables.trial import UNSAFE_ERROR, run_trial

CANARIES = 100
STEPS = 300
DELTA = 1e-5
PER_CLASS = 4  # real training images per digit class


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def small_digits(tmp_path_factory) -> Path:
    """A folder dataset of the offline digits, ``PER_CLASS`` training and 4 test images per class."""
    source = offline.write_folder("digits", tmp_path_factory.mktemp("offline"), image_size=16)
    root = tmp_path_factory.mktemp("small-digits")
    for split in ("train", "test"):
        for folder in sorted((source / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for path in sorted(folder.iterdir())[:PER_CLASS]:
                shutil.copy(path, root / split / folder.name / path.name)
    return root


def audit_trial(root: Path, *, dp: bool, seed: int = 0) -> TrialConfig:
    """Full fine-tuning of the depth-1 tiny base, 300 steps at a high learning rate, no class dropout; under DP
    epsilon 1 with q = 0.25 (~22 examples a step) and a small C (the noise is then small beside unclipped
    gradients, so skipping the clipping shows)."""
    base = replace(
        tiny_trial("full", steps=STEPS),
        data={"dataset": "folder", "root": str(root)},
        optimization={"learning_rate": 5e-3, "class_dropout": 0.0},
    )
    if not dp:
        return replace(
            base, optimization={"batch_size": 22}, audit={"canaries": CANARIES, "seed": seed, "delta": DELTA}
        )
    privacy = PrivacyConfig(target_epsilon=1.0, sampling_rate=0.25, max_grad_norm=1e-3, delta=DELTA)
    return replace(
        base,
        privacy=privacy.__dict__,
        optimization=NON_DP_ONLY,
        audit={"canaries": CANARIES, "seed": seed},
        resources={"rows_per_forward": 512},
    )


def train(config: TrialConfig, cache_dir: Path, tmp_path: Path, **options) -> dict:
    return run_trial(
        config, cache_dir=cache_dir, artifacts_dir=tmp_path / "artifacts", log=lambda line: None, **options
    )


# --- (a) to (d): the four trainings -----------------------------------------------------------------------------


def test_memorising_without_dp_gives_a_bound_clearly_above_zero(
    small_digits, cache_dir, tmp_path, monkeypatch
):
    seen = []  # every image list an evaluation (final or convergence) scored the model against

    def spy(var, vqvae, images, **kwargs):
        seen.append(images)
        return evaluate(var, vqvae, images, **kwargs)

    evaluate = trial_module.evaluate
    monkeypatch.setattr(trial_module, "evaluate", spy)
    config = audit_trial(small_digits, dp=False)
    record = train(config, cache_dir, tmp_path)
    audit = record["audit"]
    assert check_result(record) == config and record["status"] == "success"
    assert audit["mechanism"] == "none" and audit["claimed_epsilon"] is None and audit["delta"] == DELTA
    assert audit["epsilon_lower_bound"] > 1.0 and audit["auc"] > 0.9, audit["epsilon_lower_bound"]
    mask = np.array(audit["included_mask"])
    assert audit["included"] == mask.sum() and 0 < mask.sum() < CANARIES == len(audit["scores"])
    # The canaries trained (the data the plan counted) but never reached an evaluation or the real-image artifacts.
    canary_folder = cache_dir / "audit-canaries"
    assert seen and all(canary_folder not in Path(path).parents for images in seen for path in images.paths)
    assert all(
        "audit-canaries" not in path
        for entry in record["artifacts"]["real_images"]
        for path in entry["paths"]
    )
    assert record["data"]["train_images"] == 10 * PER_CLASS


def test_a_broken_mechanism_exceeds_its_claimed_epsilon(small_digits, cache_dir, tmp_path):
    config = audit_trial(small_digits, dp=True)
    record = train(config, cache_dir, tmp_path, unsafe_mechanism="skip_clipping")
    audit = record["audit"]
    assert audit["mechanism"] == BROKEN_MECHANISM and audit["claimed_epsilon"] <= 1.0
    assert audit["epsilon_lower_bound"] > audit["claimed_epsilon"], audit["epsilon_lower_bound"]
    # Never a DP result: a failed record naming the switch, a ledger whose clipping says it was skipped.
    assert record["status"] == "failed" and record["error"] == UNSAFE_ERROR
    assert "skipped" in record["privacy"]["clipping"]
    assert check_result(record) == config
    with pytest.raises(ConfigError, match="audit.mechanism: .*must have status 'failed'"):
        check_result({**record, "status": "success", "error": None})


def test_correct_dp_stays_within_its_claimed_epsilon(small_digits, cache_dir, tmp_path):
    config = audit_trial(small_digits, dp=True)
    record = train(config, cache_dir, tmp_path)
    audit = record["audit"]
    assert check_result(record) == config and record["status"] == "success"
    assert audit["mechanism"] == "dp-sgd" and audit["delta"] == DELTA == record["privacy"]["delta"]
    assert audit["claimed_epsilon"] == record["privacy"]["epsilon_rdp"] <= 1.0
    assert audit["epsilon_lower_bound"] <= audit["claimed_epsilon"]
    # The ledger counts the included canaries: the mechanism ran on N' = N + included examples.
    assert record["privacy"]["dataset_size"] == 10 * PER_CLASS + audit["included"]
    assert "audit" in record["privacy"]["released_without_noise"]


def test_an_audited_dp_run_with_augmented_views_trains_and_scores_its_canaries(
    small_digits, cache_dir, tmp_path
):
    """k = 2 views per example (two cached crops): the canaries join the training data with as many cached views
    as the split (a mismatch is refused), every canary gets a finite score, the bound stays within the claim and
    the ledger counts examples, included canaries among them."""
    privacy = PrivacyConfig(
        target_epsilon=8.0, sampling_rate=0.25, max_grad_norm=1.0, delta=DELTA, augmentation_multiplicity=2
    )
    config = replace(
        tiny_trial("lora", steps=4),
        data={"dataset": "folder", "root": str(small_digits), "cached_views": 2},
        privacy=privacy.__dict__,
        optimization=NON_DP_ONLY,
        audit={"canaries": 20},
    )
    record = train(config, cache_dir, tmp_path)
    audit = record["audit"]
    assert check_result(record) == config and record["status"] == "success", record["error"]
    assert record["privacy"]["augmentation_multiplicity"] == 2
    assert (
        audit["mechanism"] == "dp-sgd" and len(audit["scores"]) == 20 and np.isfinite(audit["scores"]).all()
    )
    assert audit["epsilon_lower_bound"] <= audit["claimed_epsilon"] <= 8.0
    assert record["privacy"]["dataset_size"] == 10 * PER_CLASS + audit["included"]


# --- fast tests -------------------------------------------------------------------------------------------------


def test_canaries_are_fixed_by_their_seed_and_index(tmp_path):
    first = audit_module.canary_images(
        tmp_path / "a", AuditConfig(canaries=20), resolution=16, class_names=tuple("abc")
    )
    again = audit_module.canary_images(
        tmp_path / "b", AuditConfig(canaries=40), resolution=16, class_names=tuple("abc")
    )
    other = audit_module.canary_images(
        tmp_path / "c", AuditConfig(canaries=20, seed=1), resolution=16, class_names=tuple("abc")
    )
    pixels = lambda images: [Path(p).read_bytes() for p in images.paths]  # noqa: E731
    assert pixels(first) == pixels(again)[:20] and first.labels == again.labels[:20]
    assert not set(pixels(first)) & set(pixels(other))
    assert len(set(pixels(first))) == 20 and set(first.labels) == {0, 1, 2}
    assert first.class_names == ("a", "b", "c") and first.split == "canaries"
    # Written once: a second call reads the same files without rewriting them.
    stamps = [Path(p).stat().st_mtime_ns for p in first.paths]
    audit_module.canary_images(
        tmp_path / "a", AuditConfig(canaries=20), resolution=16, class_names=tuple("abc")
    )
    assert [Path(p).stat().st_mtime_ns for p in first.paths] == stamps


def test_about_half_the_canaries_are_included_by_a_stream_of_the_audit_seed_only():
    masks = [audit_module.inclusion_mask(AuditConfig(canaries=4000, seed=seed)) for seed in (0, 0, 1)]
    assert np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[0], masks[2])
    assert all(abs(mask.mean() - 0.5) < 0.03 for mask in masks)
    # Independent of m beyond its length (canary i's fate is its own) and of any training seed.
    assert np.array_equal(audit_module.inclusion_mask(AuditConfig(canaries=4000)), masks[0])
    assert audit_module.included_count(None) == 0


def random_canary_views(m: int, views: int, *, seed: int) -> TokenViews:
    """m canaries for the tiny models (5 classes, 64 codes, scales 1-4: L = 30 tokens), ``views`` each."""
    g = torch.Generator().manual_seed(seed)
    tokens = tuple(torch.randint(64, (m, views, pn * pn), generator=g) for pn in (1, 2, 3, 4))
    return TokenViews(torch.randint(5, (m,), generator=g), tokens)


def test_canary_nlls_are_float64_means_of_the_per_token_losses(tiny_var, tiny_vqvae):
    """A canary's NLL is the float64 mean over its tokens and views of the float32 per-token cross-entropies,
    not that mean rounded to float32 (a step of 2^-21 ~ 4.8e-7 near the tiny model's ln 64 ~ 4.16 nats)."""
    canaries = random_canary_views(64, 2, seed=1)
    nll_M = audit_module.canary_nll(tiny_var, tiny_vqvae, canaries, device=torch.device("cpu"))
    with torch.no_grad():
        rows = [
            v.flatten(0, 1) for v in canaries.views
        ]  # example-major: canary i's views are rows 2i, 2i + 1
        x_RLCv, target_RL = teacher_forcing_batch(tiny_vqvae, rows)
        ce_RL = token_cross_entropy(tiny_var(canaries.labels_N.repeat_interleave(2), x_RLCv), target_RL)
    expected_M = ce_RL.numpy().astype(np.float64).reshape(64, -1).mean(axis=1)
    assert nll_M.dtype == np.float64 and np.abs(nll_M - expected_M).max() < 1e-12
    assert np.abs(nll_M - nll_M.astype(np.float32)).max() > 1e-8  # off the float32 grid


def test_nearby_canary_scores_do_not_tie(tiny_var, tiny_vqvae):
    """A released model whose weights moved by a relative 3e-3 shifts the canaries' NLLs by a few 1e-6 (DP
    training moves them by ~1e-4): as float64 means their 64 scores are distinct, where float32 means tie many
    (35 distinct when written), and the bound abstains on ties."""
    canaries = random_canary_views(64, 2, seed=1)
    released = copy.deepcopy(tiny_var)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in released.parameters():
            p.add_(3e-3 * (p.std() if p.numel() > 1 else 1.0) * torch.randn(p.shape, generator=g))
    cpu = torch.device("cpu")
    before_M, after_M = (
        audit_module.canary_nll(v, tiny_vqvae, canaries, device=cpu) for v in (tiny_var, released)
    )
    scores_M = audit_module.audit_record(
        AuditConfig(canaries=64),
        reference_M=before_M,
        released_M=after_M,
        mask_M=np.arange(64) % 2 == 0,
        delta=1e-5,
        claimed_epsilon=None,
        mechanism="none",
    )["scores"]
    assert 1e-7 < np.std(scores_M) < 1e-4
    assert len(set(scores_M)) == 64
    rounded_M = before_M.astype(np.float32).astype(np.float64) - after_M.astype(np.float32)
    assert len(set(rounded_M.tolist())) < 60  # what float32 NLLs would have scored


def test_the_plan_counts_the_included_canaries(small_digits, cache_dir):
    config = replace(
        audit_trial(small_digits, dp=False),
        optimization={"steps": None, "epochs": 2.0, "batch_size": 16},
    )
    plan = preflight(config, cache_dir)
    included = int(audit_module.inclusion_mask(config.audit).sum())
    assert plan.canaries_included == included and plan.examples == 10 * PER_CLASS + included
    assert plan.planned_steps == math.ceil(2.0 * (10 * PER_CLASS + included) / 16)
    assert plan.audit_delta == config.audit.delta  # without DP: the audit's own delta
    # Without DP and without audit.delta the audit is at 1/N' = 1/90 here, where no attack can show a bound:
    # refused before compute (it trained and recorded 0), naming the largest delta that gives one.
    unset = replace(config, audit={**config.audit.__dict__, "delta": None})
    examples = 10 * PER_CLASS + included
    with pytest.raises(
        ConfigError, match=rf"audit: with 100 canaries at delta {1 / examples:.3g} even an attack"
    ):
        preflight(unset, cache_dir)
    dp = replace(audit_trial(small_digits, dp=True), privacy={"delta": 1e-3})
    with pytest.raises(
        ConfigError, match=r"gives an epsilon lower bound of 0: .* Set privacy\.delta to 0\.00027 or less"
    ):
        preflight(dp, cache_dir)


@pytest.mark.parametrize("canaries", [20, 30, 64, 1000, 5000])
def test_the_delta_an_unboundable_audit_is_told_to_take_gives_a_bound(canaries):
    """Named to two digits rounded down: rounded to nearest, the named delta could lie past the threshold."""
    from trainables.plan import _check_audit_can_bound, _perfect_guess_bound

    config = replace(tiny_trial("lora"), audit={"canaries": canaries, "delta": 0.01})
    with pytest.raises(ConfigError, match=r"Set audit\.delta to ([0-9.e-]+) or less") as refused:
        _check_audit_can_bound(config, delta=0.01)
    named = float(re.search(r"to ([0-9.e-]+) or less", str(refused.value)).group(1))
    assert _perfect_guess_bound(config.audit, delta=named) > 0 and named >= 1e-5
    # more canaries would not help (the threshold stays near 2.6e-4): the message must not send users there
    assert "canaries (" not in str(refused.value).split("apart", 1)[1]
    if canaries >= 1000:
        assert all(
            _perfect_guess_bound(AuditConfig(canaries=m), delta=3e-4) == 0 for m in (canaries, 4 * canaries)
        )


def test_an_audit_a_perfect_attack_can_bound_is_accepted():
    """The perfect attack's scores had ties (1 for members, 0 for the rest), on which the bound abstains: at
    delta 2e-4 with 256 canaries it read 0 and refused an audit that an attack ranking the canaries bounds."""
    from trainables.audit_bound import epsilon_lower_bound
    from trainables.plan import _check_audit_can_bound

    config = replace(tiny_trial("lora"), audit={"canaries": 256, "delta": 2e-4})
    _check_audit_can_bound(config, delta=2e-4)
    mask = audit_module.inclusion_mask(config.audit)
    ranked = mask * 256 + np.arange(256)
    assert epsilon_lower_bound(ranked.astype(float), mask, delta=2e-4)["epsilon_lower_bound"] > 0.5


def audit_section(config: TrialConfig, **changes) -> dict:
    mask = audit_module.inclusion_mask(config.audit)
    reference = np.linspace(3.0, 2.0, config.audit.canaries)
    section = audit_module.audit_record(
        config.audit,
        reference_M=reference,
        released_M=reference - mask,  # members' NLL falls by 1
        mask_M=mask,
        delta=1e-5,
        claimed_epsilon=None,
        mechanism="none",
    )
    return {**section, **changes}


def test_the_audit_section_is_checked_against_its_config():
    config = replace(tiny_trial("lora"), audit={"canaries": 50})
    record = make_result(config, status="success", audit=audit_section(config))
    assert record["audit"]["epsilon_lower_bound"] > 0 and record["audit"]["auc"] == 1.0
    for changes, message in (
        ({"included": 0}, "audit.included"),
        ({"included": 50, "included_mask": [True] * 50}, "audit.included: an audit needs both"),
        ({"scores": [0.0] * 49}, "audit.canaries"),
        ({"mechanism": "dp-sgd"}, "audit.mechanism"),
        ({"mechanism": BROKEN_MECHANISM}, "audit.mechanism"),
        ({"confidence": 0.9}, "audit.canary_kind"),
        ({"correct_guesses": 10**6}, "audit.guesses"),
        ({"auc": 1.5}, "audit.auc"),
        ({"score": "loss"}, "audit.score"),
    ):
        with pytest.raises(ConfigError, match=message):
            make_result(config, status="success", audit=audit_section(config, **changes))
    with pytest.raises(RecordError, match="audit.surprise: not a key"):
        make_result(config, status="success", audit=audit_section(config, surprise=1))
    with pytest.raises(ConfigError, match="audit: recorded for a trial whose config has no audit"):
        make_result(tiny_trial("lora"), status="success", audit=audit_section(config))


def test_audit_settings_are_refused_before_anything_runs(tmp_path):
    for fields, message in (
        ({"canaries": 19}, "audit.canaries"),
        ({"canaries": 10**6}, "audit.canaries"),
        ({"canary_kind": "mislabelled"}, "audit.canary_kind"),
        ({"confidence": 0.5}, "audit.confidence"),
        ({"confidence": 1.0}, "audit.confidence"),
        ({"delta": 0.0}, "audit.delta"),
        ({"canaries": True}, "audit.canaries"),
    ):
        with pytest.raises(ConfigError, match=message):
            AuditConfig(**fields)
    with pytest.raises(ConfigError, match="audit: method 'base' trains nothing"):
        TrialConfig(
            method=MethodConfig(name="base"),
            optimization=OptimizationConfig(steps=0),
            evaluation=tiny_trial().evaluation,
            audit=AuditConfig(),
        )
    dp = PrivacyConfig(target_epsilon=1.0, sampling_rate=0.1, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="audit.delta: a DP trial is audited at its own delta"):
        replace(tiny_trial(), privacy=dp.__dict__, optimization=NON_DP_ONLY, audit={"delta": 1e-5})


def test_the_broken_mechanism_is_refused_where_it_cannot_run(tmp_path):
    dp = PrivacyConfig(target_epsilon=1.0, sampling_rate=0.1, max_grad_norm=1.0, clipping="hooks")
    hooks = replace(tiny_trial(), privacy=dp.__dict__, optimization=NON_DP_ONLY)
    for config, mechanism, message in (
        (tiny_trial(), "skip_clipping", "no privacy section"),
        (hooks, "skip_clipping", "clipping 'hooks'"),
        (hooks, "skip_noise", "unsafe_mechanism: one of"),
    ):
        with pytest.raises(ConfigError, match=message):
            train(config, tmp_path / "cache", tmp_path, unsafe_mechanism=mechanism)
    assert not (tmp_path / "cache").exists()  # refused before anything was built


def test_a_config_round_trips_with_and_without_its_audit():
    audited = replace(tiny_trial(), audit={"canaries": 64, "seed": 3, "confidence": 0.9})
    assert TrialConfig.from_dict(copy.deepcopy(audited.to_dict())) == audited
    plain = tiny_trial()
    assert "audit" not in plain.to_dict() and TrialConfig.from_dict(plain.to_dict()) == plain
    assert audited.trial_id != plain.trial_id and audited.label.endswith("-audit64-s0")
