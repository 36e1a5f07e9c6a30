"""The embedded default (``make demo``): the tiny base pre-trained on procedural shapes, adapted to scikit-learn's
handwritten digits on CPU. The base model's own FID on digits is the reference every method must beat; DP-LoRA at
epsilon 1 and 8 shows the privacy-utility trade-off; FID uses the offline substitute extractor."""
from __future__ import annotations

from ..schema import (DataConfig, EvaluationConfig, MethodConfig, OptimizationConfig, PrivacyConfig, ResourcesConfig,
                      TrialConfig)
from .common import Assets, tiny_model

DEMO_RESOURCES = ResourcesConfig(workers=1, gpus_per_worker=0.0, cpus_per_worker=1.0, checkpoint_every_steps=100, max_failures=1)
NON_DP = (("full", 3e-4), ("lora", 2e-3), ("ln_tuning", 2e-3))
DP_EPSILONS = (1.0, 8.0)


def sweep(*, smoke: bool = False, assets: Assets = Assets()) -> list[TrialConfig]:
    del assets  # everything is offline
    steps, pretraining = (6, 60) if smoke else (300, 600)
    model = tiny_model(2 if smoke else 4, pretraining_steps=pretraining)
    data = DataConfig(dataset="digits", resolution=16, cached_views=2)
    evaluation = EvaluationConfig(extractor="substitute-randconv-v1", top_k=0, top_p=0.96, cfg=1.5, batch_size=120,
                                  convergence_every_steps=steps // 3, convergence_num_images=120)
    common = dict(model=model, data=data, resources=DEMO_RESOURCES)

    def trial(method: str, lr: float, privacy: PrivacyConfig | None = None) -> TrialConfig:
        optimization = OptimizationConfig(learning_rate=lr, batch_size=64, steps=steps, warmup_steps=min(20, steps))
        return TrialConfig(method=MethodConfig(name=method), optimization=optimization, privacy=privacy, evaluation=evaluation, **common)

    base = TrialConfig(method=MethodConfig(name="base"), optimization=OptimizationConfig(steps=0),
                       evaluation=EvaluationConfig(**{**evaluation.__dict__, "convergence_every_steps": 0}), **common)
    dp = [trial("lora", 2e-3, PrivacyConfig(target_epsilon=eps, sampling_rate=64 / 1438, max_grad_norm=0.5, augmentation_multiplicity=2,
                                             physical_batch_rows=128)) for eps in DP_EPSILONS]
    return [base] + [trial(method, lr) for method, lr in NON_DP] + dp
