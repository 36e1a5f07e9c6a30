"""Trial configs: validation names the field, JSON round trips, ids ignore field order and resources; every sweep
builds; result records validate."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random

import pytest
from old_records import as_version, written_by_version_2

from bench.schema import (
    MIN_EVALUATION_IMAGES,
    NON_DP_ONLY,
    TINY_RESOLUTION,
    ConfigError,
    DataConfig,
    EvaluationConfig,
    MethodConfig,
    ModelConfig,
    OptimizationConfig,
    PrivacyConfig,
    ResourcesConfig,
    TrialConfig,
    check_result,
    make_result,
    replace,
    upgrade_record,
)
from bench.sweeps import SWEEPS, build_sweep
from bench.sweeps.common import OFFICIAL_VOCABULARY, SMOKE_CANARIES, TINY_VOCABULARY, Assets, smoke_version

TINY = smoke_version(build_sweep("table1")[0])


def _shuffled(value):
    """The same JSON value with every object's keys in a random order."""
    if isinstance(value, dict):
        items = list(value.items())
        random.Random(len(items)).shuffle(items)
        return {k: _shuffled(v) for k, v in items}
    return [_shuffled(v) for v in value] if isinstance(value, list) else value


@pytest.mark.parametrize("name", sorted(SWEEPS))
@pytest.mark.parametrize("smoke", [False, True])
def test_every_sweep_builds_and_round_trips(name, smoke):
    configs = build_sweep(name, smoke=smoke, assets=Assets("/data/varsweep"))
    assert configs and len({c.trial_id for c in configs}) == len(configs)
    for config in configs:
        text = json.dumps(config.to_dict())
        again = TrialConfig.from_dict(_shuffled(json.loads(text)))
        assert again == config and again.trial_id == config.trial_id
        if smoke:
            assert (
                config.model.base == "tiny"
                and config.data.root is None
                and config.resources.gpus_per_worker == 0
            )


def test_paper_hyper_parameters():
    table1 = build_sweep("table1", assets=Assets("/a"))
    assert len(table1) == 30
    fft_cub = next(
        c for c in table1 if c.method.name == "full" and c.data.dataset == "cub200" and c.model.depth == 16
    )
    assert (
        fft_cub.optimization.learning_rate,
        fft_cub.optimization.batch_size,
        fft_cub.optimization.epochs,
    ) == (1e-4, 512, 50)
    assert (
        fft_cub.model.var_checkpoint == "/a/checkpoints/var_d16.pth"
        and fft_cub.data.root == "/a/datasets/cub200"
    )
    lora_food = next(c for c in table1 if c.method.name == "lora" and c.data.dataset == "food101")
    assert (lora_food.optimization.learning_rate, lora_food.optimization.epochs) == (5e-4, 6)
    table3 = build_sweep("table3")
    assert sorted({c.privacy.target_epsilon for c in table3}) == [1, 10, 20, 50, 100, 500, 1000]
    # sigma as Opacus's default (PRV) calibrates it, where PRV can: RDP's is 4-11% higher at epsilon 100 to 1
    assert {(c.privacy.target_epsilon, c.privacy.accountant) for c in table3} == {
        *((e, "prv") for e in (1, 10, 20, 50, 100)),
        (500, "rdp"),
        (1000, "rdp"),
    }
    assert {c.privacy.accountant for c in build_sweep("table3", smoke=True)} == {"prv", "rdp"}
    assert all(
        c.privacy.sampling_rate == 0.251
        and c.privacy.augmentation_multiplicity == 32
        and c.data.cached_views == 128  # each step's 32 views drawn from 4k crops, not the same 32 every step
        for c in table3
    )
    # Augmentation: a pool of crops per image (a pool of one would train on one fixed crop for every epoch).
    assert {c.data.cached_views for c in table1} == {16}
    # Warm-up is 5% of a run, at most 100 steps: Flowers FFT's 96 steps warm up for 5.
    fft_flowers = next(c for c in table1 if c.method.name == "full" and c.data.dataset == "flowers102")
    assert fft_flowers.planned_steps(1020) == 96 and fft_flowers.optimization.warmup_steps == 5
    assert max(c.optimization.warmup_steps for c in table1) == 100
    dp_lora = build_sweep("table2")[0]
    assert dp_lora.planned_steps(1020) == 319  # 80 epochs at q = 0.251 -> ceil(80 / 0.251) steps
    assert {c.trial_id for c in build_sweep("table9", assets=Assets("/a"))} == {
        c.trial_id for c in table1
    }  # precision/recall: the same trials
    # the smoke versions of the seed-1 trials drew the seed-0 crops; both sampled with 0
    for smoke in (False, True):
        assert all(
            c.optimization.seed == c.data.view_seed == c.evaluation.sampling_seed == 1
            for c in build_sweep("second_seed", smoke=smoke)
        )
    assert all(c.evaluation.sampling_seed == 0 for c in table1)
    # Fig. 2's curves are Table 1's seed-0 runs (they trained the six runs twice): one training serves both
    for smoke in (False, True):
        curves = build_sweep("convergence", smoke=smoke)
        assert len(curves) == (3 if smoke else 6) and {c.trial_id for c in curves} <= {
            c.trial_id for c in build_sweep("table1", smoke=smoke)
        }
        assert all(c.evaluation.convergence_points == 8 for c in curves) or smoke
    assert not any(c.evaluation.convergence_points for c in build_sweep("second_seed"))


def test_every_paper_trial_puts_32_rows_through_a_forward():
    """Rows per forward set a step's activation memory (~0.75 GiB a row at d16 in bf16): every DP paper trial kept
    the default 256 (~190 GiB at d16, more than any GPU holds) while the non-DP ones used 32; then DP used at least
    k (~100 GiB at k = 128 and d16, beyond an H100). All use 32 now: at k = 128 an example's views take four
    forwards, which their book-keeping clipping allows."""
    paper = {c.trial_id: c for name in SWEEPS if name != "demo" for c in build_sweep(name)}
    dp = [c for c in paper.values() if c.privacy is not None]
    assert len(dp) == 31 and {c.privacy.augmentation_multiplicity for c in dp} == {1, 32, 128}
    assert {c.privacy.clipping for c in dp} == {"auto"}
    assert {c.resources.rows_per_forward for c in paper.values()} == {32}
    # Their smoke versions take the same route: k = 128's 6 views in two forwards of 3, the others' (at most 4) whole.
    for config in dp:
        smoke = smoke_version(config)
        split = config.privacy.augmentation_multiplicity > 32
        assert smoke.resources.rows_per_forward == (3 if split else 64), config.label
        assert smoke.privacy.augmentation_multiplicity == (
            6 if split else min(4, config.privacy.augmentation_multiplicity)
        )


@pytest.mark.parametrize("name", ["table2", "table10"])
def test_a_smoke_sweep_keeps_the_spread_route_beside_the_whole_one(name):
    """Resources are not in the trial id: Table 2's k = 32 and k = 128 smoke versions (both k = 4) were one trial,
    the k = 32 one ran and its views went through whole, so ``table2 --smoke`` never spread views over forwards."""
    paper = [
        c for c in build_sweep(name) if c.privacy is not None and c.privacy.augmentation_multiplicity > 1
    ]
    smoke = build_sweep(name, smoke=True)
    spread = {c.trial_id for c in smoke if c.privacy is not None and c.resources.rows_per_forward == 3}
    assert spread and len(spread) == len(
        {
            smoke_version(c).trial_id
            for c in paper
            if c.resources.rows_per_forward < c.privacy.augmentation_multiplicity
        }
    )
    if name == "table2":
        assert any(c.privacy is not None and c.privacy.augmentation_multiplicity == 4 for c in smoke)


def test_trial_id_ignores_resources_but_not_settings():
    config = smoke_version(build_sweep("table1")[0])
    assert replace(config, resources={"workers": 4}).trial_id == config.trial_id
    assert replace(config, optimization={"seed": 7}).trial_id != config.trial_id
    assert replace(config, data={"cached_views": 3}).trial_id != config.trial_id


def test_one_training_run_has_one_trial_id_however_its_blocks_and_targets_are_spelled():
    config = next(c for c in build_sweep("table1", smoke=True) if c.method.name == "lora")
    blocks = {replace(config, method={"train_blocks": b}).trial_id for b in ((0, 1), (1, 0), (0, 1, 1))}
    targets = {
        replace(config, method={"lora_targets": t}).trial_id
        for t in (("attention", "mlp"), ("mlp", "attention"), ("mlp", "attention", "mlp"))
    }
    assert len(blocks) == 1 and len(targets) == 1
    assert TrialConfig.from_dict(
        {**config.to_dict(), "method": {**config.to_dict()["method"], "train_blocks": [1, 0]}}
    ).method.train_blocks == (0, 1)
    assert replace(config, method={"train_blocks": (0,)}).trial_id not in blocks


@pytest.mark.parametrize(
    "build, field",
    [
        (
            lambda: ModelConfig(
                base="official", depth=17, var_checkpoint="a", vqvae_checkpoint="b", tiny_pretraining_steps=0
            ),
            "model.depth",
        ),
        (lambda: ModelConfig(base="official", depth=16, tiny_pretraining_steps=0), "model.var_checkpoint"),
        (lambda: DataConfig(dataset="imagenet"), "data.dataset"),
        (lambda: DataConfig(dataset="cub200"), "data.root"),
        (lambda: MethodConfig(name="dora"), "method.name"),
        (
            lambda: PrivacyConfig(target_epsilon=0, sampling_rate=0.1, max_grad_norm=1),
            "privacy.target_epsilon",
        ),
        (  # refused at calibration only, with a message that named no field
            lambda: PrivacyConfig(target_epsilon=1e9, sampling_rate=0.1, max_grad_norm=1),
            r"privacy.target_epsilon: must be at most 1e\+06",
        ),
        (
            lambda: PrivacyConfig(target_epsilon=1, sampling_rate=1.5, max_grad_norm=1),
            "privacy.sampling_rate",
        ),
        (
            lambda: PrivacyConfig(
                target_epsilon=1,
                sampling_rate=0.1,
                max_grad_norm=1,
                clipping="ghost",
                augmentation_multiplicity=4,
            ),
            "privacy.clipping",
        ),
        (lambda: OptimizationConfig(epochs=3, steps=4), "optimization.epochs"),
        (lambda: EvaluationConfig(extractor="inception-v3-compat"), "evaluation.inception_weights"),
        (lambda: ResourcesConfig(workers=2, gpus_per_worker=0.5), "resources.gpus_per_worker"),
        (
            lambda: replace(
                TINY,
                optimization=NON_DP_ONLY,
                privacy={
                    "target_epsilon": 1,
                    "sampling_rate": 0.1,
                    "max_grad_norm": 1,
                    "augmentation_multiplicity": 4,
                },
            ),
            "privacy.augmentation_multiplicity",
        ),
        (
            lambda: replace(TINY, privacy={"target_epsilon": 1, "sampling_rate": 0.1, "max_grad_norm": 1}),
            "optimization.batch_size",
        ),
        (lambda: MethodConfig(name="lora", lora_targets=("attention", "ffn")), "method.lora_targets"),
        (lambda: MethodConfig(name="lora", lora_targets=()), "method.lora_targets"),
        (lambda: MethodConfig(name="full", train_blocks=()), "method.train_blocks"),
        (lambda: MethodConfig(name="full", train_blocks=(0, -1)), "method.train_blocks"),
        (
            lambda: replace(
                TINY,
                optimization={"batch_size": 256, "global_clip_norm": None},
                privacy={"target_epsilon": 1, "sampling_rate": 0.1, "max_grad_norm": 1},
            ),
            "optimization.global_clip_norm",
        ),
        (lambda: replace(TINY, method={"name": "base"}), "optimization.steps"),
        (lambda: TrialConfig.from_dict({**TINY.to_dict(), "method": {"name": "lora", "rank": 8}}), "method"),
        (
            lambda: TrialConfig(
                model=ModelConfig(
                    base="official",
                    depth=16,
                    var_checkpoint="a",
                    vqvae_checkpoint="b",
                    tiny_pretraining_steps=0,
                ),
                evaluation=EvaluationConfig(extractor="substitute-randconv-v1"),
            ),
            "data.resolution",
        ),
        (
            lambda: EvaluationConfig(extractor="substitute-randconv-v1", top_p=1.0),
            "evaluation.top_p",
        ),  # the sampler refuses top_p=1
        (
            lambda: replace(
                TINY,
                data={"dataset": "shapes"},
                evaluation={"extractor": "digits-cnn-v2", "inception_weights": None},
            ),
            "evaluation.extractor",
        ),
    ],
)
def test_invalid_configs_name_the_field(build, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build()


@pytest.mark.parametrize(
    "change, field",
    [
        # precision/recall's 3 nearest neighbours need 4 images, else the trial fails after training
        ({"evaluation": {"num_images": 3}}, "evaluation.num_images"),
        ({"evaluation": {"convergence_num_images": 3}}, "evaluation.convergence_num_images"),
        ({"optimization": {"weight_decay": -0.05}}, "optimization.weight_decay"),
        ({"optimization": {"global_clip_norm": -1.0}}, "optimization.global_clip_norm"),
        ({"optimization": {"global_clip_norm": 0.0}}, "optimization.global_clip_norm"),
        ({"method": {"name": "lora", "train_blocks": [0, 2]}}, "method.train_blocks"),
        # TINY's workers have no GPU, and FlexAttention no CPU backward
        ({"resources": {"attention_kernel": "flex"}}, "resources.attention_kernel"),
        # each of 4 DDP ranks draws its share of a non-DP batch: refused at preflight, not after setup
        ({"resources": {"workers": 4}, "optimization": {"batch_size": 2}}, "optimization.batch_size"),
        # seeds are mixed into 64-bit generator seeds: a date-like 20240101 is fine, 2**31 is not (it failed in
        # the trial's evaluation, after training)
        ({"optimization": {"seed": 2**31, "steps": 1}}, "optimization.seed"),
        ({"evaluation": {"sampling_seed": 20_000_000_000_000}}, "evaluation.sampling_seed"),
        ({"data": {"dataset": "digits", "view_seed": -1}}, "data.view_seed"),
        ({"audit": {"seed": 2**31}}, "audit.seed"),
        # retired: trained on the train split, a DP trial's private data (its records still read)
        ({"evaluation": {"extractor": "digits-cnn-v1"}}, "evaluation.extractor"),
        # the tiny base's scales are 16 px's: another size failed after the base was built
        ({"data": {"dataset": "digits", "resolution": 32}}, "data.resolution"),
        # a worker trains on one device: a second GPU sat reserved and idle, and was counted as used
        ({"resources": {"gpus_per_worker": 2.0}}, "resources.gpus_per_worker"),
        # a run ending inside its warm-up never reaches its learning rate
        ({"optimization": {"steps": 50, "warmup_steps": 100}}, "optimization.warmup_steps"),
        # full fine-tuning reads no LoRA rank or alpha: crossed with ranks, it trained once per rank
        ({"method": {"name": "full", "lora_rank": 8}}, "method.lora_rank"),
        ({"method": {"name": "ln_tuning", "lora_alpha": 4.0}}, "method.lora_alpha"),
        # a LoRA method's own targets spelled out: the same run as None under another id (in any order)
        (
            {"method": {"name": "lora", "lora_targets": ["mlp", "modulation", "attention"]}},
            "method.lora_targets",
        ),
        ({"method": {"name": "lora_attention", "lora_targets": ["attention"]}}, "method.lora_targets"),
        # ... or another LoRA method's: lora on the attention alone is lora_attention's run (and label) elsewhere
        (
            {"method": {"name": "lora", "lora_targets": ["attention"]}},
            "method 'lora_attention' with it unset",
        ),
        (
            {"method": {"name": "lora_mlp", "lora_targets": ["attention", "mlp", "modulation"]}},
            "method 'lora'",
        ),
        # a rule the run does not read (delta null is 1/N), and a sign only the id sees: one run under two ids
        (
            {
                "privacy": {
                    "target_epsilon": 8.0,
                    "sampling_rate": 0.05,
                    "max_grad_norm": 1.0,
                    "allow_delta_at_least_inverse_n": True,
                },
                "optimization": {"batch_size": 256},
            },
            "privacy.allow_delta_at_least_inverse_n",
        ),
        ({"evaluation": {"top_p": -0.0}}, "evaluation.top_p: is -0.0"),
    ],
)
def test_a_trial_that_cannot_run_is_refused_before_it_starts_and_its_old_record_still_reads(change, field):
    """Rules added after results were written check trials as they are planned, not records as they are read."""
    config = replace(TINY, **change)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        config.check_launchable()
    assert TrialConfig.from_dict(config.to_dict()) == config


def test_a_smoke_version_trains_the_same_relative_blocks_of_its_smaller_model():
    """VAR-d16's last four blocks are block 1 of the 2-block smoke model (once kept as 12..15: refused in the trial)."""
    official = build_sweep("table1")[0]
    assert official.model.depth == 16 and TINY.model.depth == 2
    last_four = dataclasses.replace(
        official, method=dataclasses.replace(official.method, train_blocks=(12, 13, 14, 15))
    )
    assert smoke_version(last_four).method.train_blocks == (1,)
    first_and_last = dataclasses.replace(
        official, method=dataclasses.replace(official.method, train_blocks=(0, 15))
    )
    assert smoke_version(first_and_last).method.train_blocks == (0, 1)


def test_a_smoke_version_keeps_the_audit_at_a_smoke_s_canaries():
    """An audited trial's smoke version is audited too (it was dropped: another trial, without its audit)."""
    audited = build_sweep("privacy_audit")[0]
    assert audited.audit is not None and audited.audit.canaries > SMOKE_CANARIES
    smoke = smoke_version(audited)
    assert smoke.audit == dataclasses.replace(audited.audit, canaries=SMOKE_CANARIES)
    assert "audit200" in smoke.label and smoke_version(TINY).audit is None


@pytest.mark.parametrize(
    "changes",
    [
        dict(clipping="hooks"),
        dict(clipping="ghost", accountant="prv"),
        dict(delta=1e-3, allow_delta_at_least_inverse_n=True),
    ],
)
def test_a_smoke_version_keeps_the_trial_s_clipping_accountant_and_delta_rule(changes):
    """The smoke run takes the trial's DP route (its clipping and accountant were reset to the defaults, and a
    delta allowed at least 1/N by the trial was refused in its smoke version), at the smoke's sampling rate and k."""
    dp = next(c for c in build_sweep("table2") if c.privacy is not None)
    trial = dataclasses.replace(
        dp,
        privacy=dataclasses.replace(dp.privacy, augmentation_multiplicity=1, **changes),
        resources=dataclasses.replace(dp.resources, rows_per_forward=32),
    )
    smoke = smoke_version(trial)
    assert smoke.privacy == dataclasses.replace(trial.privacy, sampling_rate=0.05)
    smoke.check_launchable()


def test_the_tiny_resolution_is_the_tiny_base_s():
    from trainables.tiny_base import IMAGE_SIZE

    assert TINY_RESOLUTION == IMAGE_SIZE


def test_a_smoke_version_filters_the_same_share_of_its_codebook():
    """The smoke's top-k is the trial's share of the codebook (top-k 0 ran no filter in any smoke sweep), with
    sizes that are the tiny base's and the official VQVAE's own."""
    import inspect

    from trainables.models.checkpoints import load_vqvae
    from trainables.tiny_base import VQVAE_ARCHITECTURE

    assert TINY_VOCABULARY == VQVAE_ARCHITECTURE["vocab_size"]
    assert OFFICIAL_VOCABULARY == inspect.signature(load_vqvae).parameters["vocab_size"].default
    paper = build_sweep("table1")[0]
    assert paper.evaluation.top_k == 900 and smoke_version(paper).evaluation.top_k == 56
    tiny = replace(smoke_version(paper), evaluation={"top_k": 40})
    assert smoke_version(tiny).evaluation.top_k == 40  # already the tiny codebook's
    off = replace(paper, evaluation={"top_k": 0})
    assert (
        smoke_version(off).evaluation.top_k == 0
        and smoke_version(replace(paper, evaluation={"top_k": 1})).evaluation.top_k == 1
    )
    # a non-DP batch goes through in two forwards, as the paper's 256 do in forwards of 32
    assert smoke_version(paper).resources.rows_per_forward * 2 == smoke_version(paper).optimization.batch_size


def test_the_smallest_evaluation_is_what_precision_recall_can_score():
    from trainables.evaluation.evaluate import ScoringSettings

    assert MIN_EVALUATION_IMAGES == ScoringSettings().neighborhood + 1


def test_result_records_validate():
    config = smoke_version(build_sweep("table2")[0])
    record = make_result(config, status="failed", error="RuntimeError: boom")
    assert check_result(json.loads(json.dumps(record))) == config
    with pytest.raises(ConfigError, match="error"):
        make_result(config, status="failed")
    with pytest.raises(ConfigError, match="trial_id"):
        check_result({**record, "trial_id": "0" * 16})
    with pytest.raises(ConfigError, match="schema_version"):
        check_result({**record, "schema_version": 0})


def test_relative_paths_become_absolute_once_in_the_driver(tmp_path, monkeypatch):
    from bench.schema import absolute, with_absolute_paths
    from bench.sweeps.common import Assets

    monkeypatch.chdir(tmp_path)
    assert (
        absolute("runs/x") == str(tmp_path / "runs" / "x")
        and absolute("s3://bucket/runs") == "s3://bucket/runs"
    )
    assert Assets("assets").root == str(
        tmp_path / "assets"
    )  # paper sweeps name absolute checkpoint and dataset paths
    # The default root is read when a path is taken: a default Assets() is built when the sweeps are imported,
    # before a caller sets VARSWEEP_ASSETS or changes folder (which it once ignored).
    monkeypatch.setenv("VARSWEEP_ASSETS", "later")
    assert Assets().checkpoint("var_d16.pth") == str(tmp_path / "later" / "checkpoints" / "var_d16.pth")
    assert build_sweep("table3")[0].data.root == str(tmp_path / "later" / "datasets" / "flowers102")
    monkeypatch.delenv("VARSWEEP_ASSETS")
    assert Assets().dataset("cub200") == str(tmp_path / "assets" / "datasets" / "cub200")
    config = replace(
        TINY,
        data={"dataset": "folder", "root": "my-images"},
        evaluation={"extractor": "substitute-randconv-v1"},
    )
    fixed = with_absolute_paths(config)
    assert fixed.data.root == str(tmp_path / "my-images") and fixed.trial_id != config.trial_id
    assert with_absolute_paths(fixed) is fixed and with_absolute_paths(TINY) is TINY


# --- types: every field refuses a value of the wrong type, naming the field (before any range check) -----------
def _record(**sections) -> dict:
    record = TINY.to_dict()
    for name, values in sections.items():
        record[name] = values if not isinstance(values, dict) else {**(record[name] or {}), **values}
    return record


@pytest.mark.parametrize(
    "build, field",
    [
        (
            lambda: PrivacyConfig(target_epsilon="10", sampling_rate=0.1, max_grad_norm=1.0),
            "privacy.target_epsilon",
        ),
        (lambda: OptimizationConfig(steps=2.5), "optimization.steps"),
        (lambda: OptimizationConfig(steps=True), "optimization.steps"),
        (lambda: OptimizationConfig(epochs=float("nan")), "optimization.epochs"),
        (lambda: OptimizationConfig(steps=3, learning_rate=float("inf")), "optimization.learning_rate"),
        (lambda: OptimizationConfig(steps=3, autocast_bf16=1), "optimization.autocast_bf16"),
        (lambda: OptimizationConfig(steps=3, seed=None), "optimization.seed"),
        (
            lambda: PrivacyConfig(target_epsilon=1.0, sampling_rate=float("nan"), max_grad_norm=1.0),
            "privacy.sampling_rate",
        ),
        (
            lambda: PrivacyConfig(
                target_epsilon=1.0, sampling_rate=0.1, max_grad_norm=1.0, accountant=["rdp"]
            ),
            "privacy.accountant",
        ),
        (lambda: DataConfig(dataset=["digits"]), "data.dataset"),
        (lambda: DataConfig(resolution="16"), "data.resolution"),
        (lambda: DataConfig(skip_corrupt_images="no"), "data.skip_corrupt_images"),
        (lambda: MethodConfig(train_blocks=("a",)), "method.train_blocks"),
        (lambda: MethodConfig(train_blocks=(True,)), "method.train_blocks"),
        (lambda: MethodConfig(lora_targets="mat_qkv"), "method.lora_targets"),
        (lambda: MethodConfig(lora_targets=("mat_qkv", 3)), "method.lora_targets"),
        (lambda: ModelConfig(depth=2.0), "model.depth"),
        (lambda: EvaluationConfig(extractor="substitute-randconv-v1", top_k=900.0), "evaluation.top_k"),
        (
            lambda: EvaluationConfig(extractor="substitute-randconv-v1", num_images=False),
            "evaluation.num_images",
        ),
        (lambda: ResourcesConfig(workers="2"), "resources.workers"),
        (lambda: ResourcesConfig(gpus_per_worker=None), "resources.gpus_per_worker"),
        (
            lambda: ModelConfig(
                base="official",
                depth=16,
                var_checkpoint="a",
                vqvae_checkpoint="b",
                tiny_pretraining_steps=0,
                var_checkpoint_sha256="abc",
            ),
            "model.var_checkpoint_sha256",
        ),
        (
            lambda: ModelConfig(
                base="official",
                depth=16,
                var_checkpoint="a",
                vqvae_checkpoint="b",
                tiny_pretraining_steps=0,
                vqvae_checkpoint_sha256="AB" * 32,
            ),
            "model.vqvae_checkpoint_sha256",
        ),
        (
            lambda: ModelConfig(var_checkpoint_sha256="ab" * 32),
            "model.var_checkpoint_sha256",
        ),  # no path to identify
        (lambda: DataConfig(content_id="ab" * 32), "data.content_id"),  # offline sets have no content id
        (lambda: TrialConfig.from_dict(None), "config"),
        (lambda: TrialConfig.from_dict([]), "config"),
        (lambda: TrialConfig.from_dict("config"), "config"),
        (
            lambda: TrialConfig.from_dict({k: v for k, v in TINY.to_dict().items() if k != "privacy"}),
            "config",
        ),  # missing section
        (lambda: TrialConfig.from_dict(_record(model="tiny")), "model"),
        (lambda: TrialConfig.from_dict(_record(optimization=[1, 2])), "optimization"),
        (lambda: TrialConfig.from_dict(_record(data=None)), "data"),
        (
            lambda: TrialConfig.from_dict(_record(privacy={"sampling_rate": 0.1, "max_grad_norm": 1.0})),
            "privacy",
        ),  # missing field
        (lambda: TrialConfig.from_dict(_record(optimization={"steps": 2.5})), "optimization.steps"),
        (lambda: TrialConfig.from_dict(_record(method={"train_blocks": ["a"]})), "method.train_blocks"),
        (lambda: replace(TINY, method={"train_blocks": [0, "x"]}), "method.train_blocks"),
        (lambda: replace(TINY, optimization={"sneaky": 1}), "optimization"),
    ],
)
def test_wrong_types_name_the_field(build, field):
    with pytest.raises(ConfigError, match=rf"^{field.replace('.', chr(92) + '.')}:"):
        build()


def test_ints_are_numbers_and_lists_become_tuples():
    assert PrivacyConfig(target_epsilon=10, sampling_rate=1, max_grad_norm=1).target_epsilon == 10
    assert (
        OptimizationConfig(epochs=3).epochs == 3 and ResourcesConfig(gpus_per_worker=0).gpus_per_worker == 0
    )
    config = TrialConfig.from_dict(
        _record(method={"name": "lora", "train_blocks": [0, 1], "lora_targets": ["attention"]})
    )
    assert config.method.train_blocks == (0, 1) and config.method.lora_targets == ("attention",)
    assert replace(TINY, method={"train_blocks": [1]}).method.train_blocks == (1,)
    # A record written before a field existed still reads (the field takes its default).
    older = _record()
    del older["evaluation"]["convergence_points"], older["model"]["var_checkpoint_sha256"]
    del older["resources"]["compile_sampling"]
    assert TrialConfig.from_dict(older) == TINY


# --- sampling settings: the schema and the sampler accept and refuse exactly the same values ------------------
SAMPLING_VALUES = [
    ("top_p", 0, True),
    ("top_p", 0.0, True),
    ("top_p", 0.5, True),
    ("top_p", 0.999, True),
    ("top_p", 1, False),
    ("top_p", 1.0, False),
    ("top_p", -0.1, False),
    ("top_p", float("nan"), False),
    ("top_p", float("inf"), False),
    ("top_p", "0.5", False),
    ("top_p", True, False),
    ("top_p", None, False),
    ("top_k", 0, True),
    ("top_k", 1, True),
    ("top_k", 900, True),
    ("top_k", -1, False),
    ("top_k", 2.5, False),
    ("top_k", 2.0, False),
    ("top_k", True, False),
    ("top_k", "5", False),
    ("guidance_scale", 0, True),
    ("guidance_scale", 1.5, True),
    ("guidance_scale", 4, True),
    ("guidance_scale", -0.5, False),
    ("guidance_scale", float("nan"), False),
    ("guidance_scale", float("inf"), False),
    ("guidance_scale", False, False),
]


SAMPLER_NAMES = {"guidance_scale": "cfg"}  # VAR.sample keeps upstream's argument name


@pytest.mark.parametrize("name, value, valid", SAMPLING_VALUES)
def test_schema_and_sampler_agree_on_sampling_settings(name, value, valid, tiny_sampler):
    import torch

    var, vqvae = tiny_sampler
    settings = {"guidance_scale": 1.5, "top_k": 0, "top_p": 0.0, name: value}
    sampler_settings = {SAMPLER_NAMES.get(key, key): v for key, v in settings.items()}
    if valid:
        EvaluationConfig(extractor="substitute-randconv-v1", **settings)
        images = var.sample(
            torch.tensor([0]), vqvae=vqvae, generator=torch.Generator().manual_seed(0), **sampler_settings
        )
        assert images.shape[0] == 1
        return
    with pytest.raises(ConfigError, match=rf"^evaluation\.{name}:"):
        EvaluationConfig(extractor="substitute-randconv-v1", **settings)
    with pytest.raises(ValueError, match=rf"^{SAMPLER_NAMES.get(name, name)} must be"):
        var.sample(torch.tensor([0]), vqvae=vqvae, **sampler_settings)


@pytest.fixture(scope="module")
def tiny_sampler():
    import torch
    from conftest import TINY_VAR, TINY_VQVAE

    from trainables.models import build_var, build_vqvae

    return build_var(**TINY_VAR, generator=torch.Generator().manual_seed(0)).eval(), build_vqvae(
        **TINY_VQVAE
    ).eval()


def test_non_dp_only_fields_are_at_their_defaults_and_out_of_a_dp_trials_id():
    defaults = {f.name: f.default for f in dataclasses.fields(OptimizationConfig)}
    assert NON_DP_ONLY == {name: defaults[name] for name in NON_DP_ONLY}
    for config, hashed in ((build_sweep("table2")[0], False), (TINY, True)):
        identity = {k: v for k, v in config.to_dict().items() if k != "resources"}
        assert set(NON_DP_ONLY) <= set(identity["optimization"])  # written into the record as provenance
        if not hashed:  # a DP trial's id is that of the experiment, without the fields it never uses
            identity["optimization"] = {
                k: v for k, v in identity["optimization"].items() if k not in NON_DP_ONLY
            }
        digest = hashlib.sha256(
            json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()[:16]
        assert digest == config.trial_id


def test_version_1_results_are_refused_with_the_upgrade_command_and_upgrade_to_the_same_experiment():
    dp = build_sweep("table2", smoke=True)[0]
    current = make_result(dp, status="failed", error="x")
    old = as_version(current, 1)
    old["config"]["optimization"]["batch_size"] = 32  # version 1 let DP trials carry an unused batch size
    with pytest.raises(
        ConfigError, match=r"schema version 1.*evaluation\.cfg became guidance_scale.*upgrade-results"
    ):
        check_result(old)
    upgraded = upgrade_record(old)
    assert check_result(upgraded) == dp and upgraded["trial_id"] == dp.trial_id
    assert upgraded["upgraded_from"] == {"schema_version": 1, "trial_id": old["trial_id"]}
    assert upgrade_record(current) == current
    with pytest.raises(ConfigError, match="schema version 7"):
        upgrade_record({**current, "schema_version": 7})


def test_version_2_results_upgrade_with_their_rows_per_forward_and_float_fields():
    """Version 2 kept a DP trial's rows per forward in privacy.physical_batch_rows and hashed 8 and 8.0 apart."""
    dp = next(c for c in build_sweep("table3", smoke=True) if c.privacy is not None)
    assert dp.privacy.target_epsilon == int(
        dp.privacy.target_epsilon
    )  # the upgrade below must turn 8 into 8.0
    current = make_result(dp, status="success", metrics={"fid": 1.0})
    old = as_version(current, 2)
    assert isinstance(old["config"]["privacy"]["target_epsilon"], int)
    with pytest.raises(ConfigError, match=r"schema version 2 .*resources\.rows_per_forward.*upgrade-results"):
        check_result(old)
    upgraded = upgrade_record(old)
    assert upgraded["config"] == current["config"] and upgraded["trial_id"] == dp.trial_id
    assert check_result(upgraded).resources.rows_per_forward == dp.resources.rows_per_forward == 64
    assert upgraded["upgraded_from"] == {"schema_version": 2, "trial_id": old["trial_id"]}


@pytest.mark.parametrize(("rows", "k", "moved"), [(1, 4, 4), (5, 2, 4), (64, 2, 64), (3, 1, 3)])
def test_version_2_physical_batch_rows_keep_their_examples_per_forward(tmp_path, rows, k, moved):
    """Version 2 put max(1, rows // k) examples through a forward (rows below k allowed); version 3 counts whole
    examples' rows, so a real version-2 record (written by that schema) upgrades to the same examples per forward,
    and the cost section, where version 2 recorded the unused resources field (0), says the rows too."""
    dp = next(c for c in build_sweep("demo", smoke=True) if c.privacy is not None)
    dp = dataclasses.replace(
        dp,
        privacy=dataclasses.replace(dp.privacy, augmentation_multiplicity=k),
        data=dataclasses.replace(dp.data, cached_views=max(k, dp.data.cached_views)),
    )
    cost = {"gpu_hours": 0.1, "train_pflops": 0.01, "rows_per_forward": 0}
    old = written_by_version_2(dp, tmp_path, status="success", cost=cost)
    old["config"]["privacy"]["physical_batch_rows"] = rows
    upgraded = upgrade_record(old)
    assert (
        upgraded["config"]["resources"]["rows_per_forward"] == upgraded["cost"]["rows_per_forward"] == moved
    )
    assert moved // k == max(1, rows // k) and check_result(upgraded).privacy.augmentation_multiplicity == k


def test_an_integer_a_float_cannot_hold_exactly_is_refused():
    """Above 2**53 not every integer is a float: storing the rounded number would hash another value."""
    for exact in (2**53, 2**54, 10**22):
        assert OptimizationConfig(steps=1, learning_rate=exact).learning_rate == float(exact)
    for value in (2**53 + 1, 10**400, -(10**30)):
        with pytest.raises(
            ConfigError, match=rf"optimization\.learning_rate: {value} cannot be stored as a float"
        ):
            OptimizationConfig(steps=1, learning_rate=value)


def test_an_integer_in_a_float_field_is_that_float_and_the_same_trial():
    config = build_sweep("demo", smoke=True)[-2]
    assert config.privacy is not None
    written = {"target_epsilon": 8, "max_grad_norm": 1, "sampling_rate": 1}
    as_ints = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, **written))
    as_floats = dataclasses.replace(
        config, privacy=dataclasses.replace(config.privacy, **{k: float(v) for k, v in written.items()})
    )
    assert as_ints.trial_id == as_floats.trial_id and as_ints.to_dict() == as_floats.to_dict()
    assert all(type(getattr(as_ints.privacy, name)) is float for name in written)
    assert type(as_ints.optimization.steps) is int  # an integer field keeps its integer
    epochs = OptimizationConfig(epochs=3, learning_rate=1)
    assert type(epochs.epochs) is float and type(epochs.learning_rate) is float


def test_rows_per_forward_holds_an_examples_views_unless_book_keeping_splits_them_and_leaves_the_trial_id():
    config = next(c for c in build_sweep("table3", smoke=True) if c.privacy is not None)
    k = config.privacy.augmentation_multiplicity
    assert k > 1 and config.privacy.clipping == "auto"
    for clipping in ("hooks",):  # ghost clipping takes k = 1 only
        opacus = dataclasses.replace(config.privacy, clipping=clipping)
        with pytest.raises(
            ConfigError,
            match=rf"resources\.rows_per_forward: {k - 1} rows cannot hold one example's k={k} views, which "
            rf"share a forward with privacy\.clipping='{clipping}'",
        ):
            dataclasses.replace(
                config,
                privacy=opacus,
                resources=dataclasses.replace(config.resources, rows_per_forward=k - 1),
            )
    for rows in (0, 1, k - 1, k, 1000):
        other = dataclasses.replace(
            config, resources=dataclasses.replace(config.resources, rows_per_forward=rows)
        )
        assert other.trial_id == config.trial_id
