"""The embedded default (``make demo``): a tiny VAR base pre-trained on glyphs (letters and symbols, never digits),
adapted to scikit-learn's handwritten digits on CPU by full fine-tuning, LoRA and DP-LoRA at epsilon 1 and 8; the
un-adapted base model is the reference. Metrics come from a digit classifier (digits-cnn-v2): FID, precision,
recall, KID on its features, and the class accuracy of the generated samples."""

from __future__ import annotations

from ..schema import (
    DataConfig,
    EvaluationConfig,
    MethodConfig,
    OptimizationConfig,
    PrivacyConfig,
    ResourcesConfig,
    TrialConfig,
)
from .common import SMOKE_PRETRAINING_STEPS, Assets, tiny_model

DEMO_RESOURCES = ResourcesConfig(
    workers=1, gpus_per_worker=0.0, cpus_per_worker=1.0, checkpoint_every_steps=250, max_failures=1
)
# (method, learning rate). LN tuning is not in the embedded default: on the 2-block tiny model it reached class
# accuracy 0.47-0.62 and recall 0.09-0.15 within the demo's time (docs/benchmarks.md);
# the smoke versions of table1, table2, table9, table10, convergence and second_seed run it.
NON_DP = (("full", 2e-3), ("lora", 4e-3))
DP_EPSILONS = (1.0, 8.0)
STEPS, DP_STEPS, BATCH = 1000, 200, 32
DP_EXPECTED_BATCH = 32  # Poisson sampling rate q = 32 / 1438 training digits
# A digit's identity is decided by the coarse scales (1x1, 2x2, 4x4 tokens); weighting scale s by 0.5**s keeps the
# 64 finest tokens from drowning that signal in the token mean (MethodConfig.scale_weight_decay).
SCALE_WEIGHT_DECAY = 0.5


def sweep(*, smoke: bool = False, assets: Assets = Assets()) -> list[TrialConfig]:
    del assets  # everything is offline
    # The smoke version shares the smoke sweeps' tiny base (depth 2, SMOKE_PRETRAINING_STEPS): CI builds it once.
    steps, dp_steps, pretraining = (6, 6, SMOKE_PRETRAINING_STEPS) if smoke else (STEPS, DP_STEPS, 800)
    common = dict(
        model=tiny_model(2, pretraining_steps=pretraining),
        data=DataConfig(dataset="digits", resolution=16, cached_views=2),
        resources=DEMO_RESOURCES,
    )

    def evaluation(trained_steps: int) -> EvaluationConfig:
        # guidance 1.0 (not the paper's 1.5): on this small model stronger guidance narrows each class to fewer looks
        # (recall 0.27-0.30 at 1.5, 0.34 at 1.0, class accuracy 0.96 / 0.84 either way; docs/benchmarks.md).
        # The smoke version scores 40 images (the full one as many as the test split) and one convergence point.
        sizes = (
            dict(num_images=40, batch_size=40, convergence_num_images=20)
            if smoke
            else dict(batch_size=120, convergence_num_images=120)
        )
        return EvaluationConfig(
            extractor="digits-cnn-v2",
            top_k=0,
            top_p=0.96,
            guidance_scale=1.0,
            convergence_every_steps=trained_steps // (2 if smoke else 4),
            **sizes,
        )

    def trial(method: str, lr: float, privacy: PrivacyConfig | None = None) -> TrialConfig:
        n = steps if privacy is None else dp_steps
        return TrialConfig(
            method=MethodConfig(name=method, scale_weight_decay=SCALE_WEIGHT_DECAY),
            privacy=privacy,
            optimization=OptimizationConfig(
                learning_rate=lr,
                steps=n,
                warmup_steps=min(20, n),
                **({"batch_size": BATCH} if privacy is None else {}),
            ),
            evaluation=evaluation(n),
            **common,
        )

    base = TrialConfig(
        method=MethodConfig(name="base"),
        optimization=OptimizationConfig(steps=0),
        evaluation=evaluation(0),
        **common,
    )
    dp = [
        trial(
            "lora",
            4e-3,
            PrivacyConfig(
                target_epsilon=eps,
                sampling_rate=DP_EXPECTED_BATCH / 1438,
                max_grad_norm=0.5,
                augmentation_multiplicity=2,
            ),
        )
        for eps in DP_EPSILONS
    ]
    # Longest first: two trials run at a time on two cores, and the short base evaluation fills the end.
    return [trial(method, lr) for method, lr in NON_DP] + dp + [base]
