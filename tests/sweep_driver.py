"""Tiny trials for the launcher tests, and a sweep driver the tests run (and kill) in a subprocess:

python tests/sweep_driver.py STORAGE RAY_ADDRESS N_TRIALS STEPS
"""

from __future__ import annotations

import sys

from bench.schema import (
    DataConfig,
    EvaluationConfig,
    MethodConfig,
    OptimizationConfig,
    PrivacyConfig,
    ResourcesConfig,
    TrialConfig,
)
from bench.sweeps.common import tiny_model


def tiny_trial(
    method: str = "full",
    *,
    steps: int = 6,
    workers: int = 1,
    seed: int = 0,
    checkpoint_every: int = 2,
    privacy: PrivacyConfig | None = None,
) -> TrialConfig:
    """A trial small enough for 2 CPU cores: depth-1 tiny base (20 pre-training steps), digits at 16 px, 20 images."""
    return TrialConfig(
        model=tiny_model(1, pretraining_steps=20),
        data=DataConfig(dataset="digits", resolution=16),
        method=MethodConfig(name=method),
        privacy=privacy,
        # A DP trial's batches are Poisson (privacy.sampling_rate): batch_size stays at its default.
        optimization=OptimizationConfig(
            learning_rate=1e-3, steps=steps, seed=seed, **({"batch_size": 16} if privacy is None else {})
        ),
        evaluation=EvaluationConfig(
            extractor="substitute-randconv-v1", num_images=20, top_k=0, batch_size=20
        ),
        resources=ResourcesConfig(
            workers=workers,
            gpus_per_worker=0.0,
            cpus_per_worker=1.0,
            checkpoint_every_steps=checkpoint_every,
            checkpoint_every_fraction=1.0,
            max_failures=1,
            rows_per_forward=32,  # a DP batch (~29 examples x k views) goes through in chunks
        ),
    )


def driver_trials(count: int, steps: int) -> list[TrialConfig]:
    return [tiny_trial("lora", steps=steps, seed=seed) for seed in range(count)]


if __name__ == "__main__":
    import ray

    from bench.launcher import Launch, run_sweep

    storage, address, count, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ray.init(address=address)
    run_sweep(
        "driver",
        driver_trials(count, steps),
        Launch(storage=storage, cache_dir=f"{storage}/cache", max_concurrent=1),
        verbose=0,
    )
