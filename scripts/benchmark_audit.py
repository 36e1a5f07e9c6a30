"""What a privacy audit costs (issue 18, item 5), measured side by side in one process on the tiny base and digits:
the same trial with and without an ``audit`` section (m canaries, each trained on with probability 1/2), without DP
and under DP. Reports the training rows, training seconds and wall seconds of each pair and their ratios; the
difference outside training is building and tokenising the canaries (once per cache) and scoring them twice (before
and after training).

    python scripts/benchmark_audit.py [--canaries 200] [--steps 300] [--repeats 3] [--out docs/benchmarks.md]

Each pair runs ``--repeats`` times, alternating; the table holds the medians.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchmark_common import machine, publish, stamp

from bench.schema import (
    AuditConfig,
    DataConfig,
    EvaluationConfig,
    MethodConfig,
    OptimizationConfig,
    PrivacyConfig,
    ResourcesConfig,
    TrialConfig,
)
from bench.sweeps.common import tiny_model
from trainables.trial import run_trial

DELTA = 1e-5  # small beside m: at 1/N the one-run bound is 0 whatever the scores (README, privacy audit)


def trial(*, dp: bool, steps: int, canaries: int | None) -> TrialConfig:
    """LoRA on the depth-1 tiny base and 16 px digits; ``canaries`` None: no audit."""
    privacy = (
        PrivacyConfig(target_epsilon=8.0, sampling_rate=0.02, max_grad_norm=1.0, delta=DELTA) if dp else None
    )
    return TrialConfig(
        model=tiny_model(1, pretraining_steps=20),
        data=DataConfig(dataset="digits", resolution=16),
        method=MethodConfig(name="lora"),
        privacy=privacy,
        optimization=OptimizationConfig(
            learning_rate=1e-3, steps=steps, **({} if dp else {"batch_size": 32})
        ),
        evaluation=EvaluationConfig(
            extractor="substitute-randconv-v1", num_images=20, top_k=0, batch_size=20
        ),
        resources=ResourcesConfig(workers=1, gpus_per_worker=0.0, cpus_per_worker=1.0, rows_per_forward=64),
        audit=None if canaries is None else AuditConfig(canaries=canaries, delta=None if dp else DELTA),
    )


def measure(config: TrialConfig, *, cache: Path, root: Path) -> dict:
    record = run_trial(config, cache_dir=cache, artifacts_dir=root / config.trial_id, log=lambda line: None)
    cost = record["cost"]
    return {
        "rows": cost["rows_trained"],
        "train_s": cost["train_seconds"],
        "wall_s": cost["wall_seconds"],
        "bound": (record.get("audit") or {}).get("epsilon_lower_bound"),
    }


def median(found: list[dict]) -> dict:
    """Each measure's median over repeated runs (the bound is the same every time: same seeds)."""
    return {
        key: statistics.median(m[key] for m in found) if found[0][key] is not None else None
        for key in found[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=200)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        cache, root = Path(folder) / "cache", Path(folder) / "artifacts"
        measure(trial(dp=False, steps=1, canaries=None), cache=cache, root=root)  # builds the shared caches
        lines = [
            f"## Privacy audit cost (issue 18), {stamp()}",
            "",
            f"`python scripts/benchmark_audit.py --canaries {args.canaries} --steps {args.steps} --repeats {args.repeats}` "
            f"on {machine()}, medians of {args.repeats} alternating runs:",
            f"LoRA on the depth-1 tiny base, 16 px digits (N = 1,438), {args.steps} steps, the same trial with and "
            f"without an audit of m = {args.canaries} canaries, side by side in one process (the canaries are "
            "built and tokenised once per cache, in the first audited run: a one-time cost the medians leave out).",
            "",
            "| trial | rows trained | training s | wall s | rows ratio | training ratio | wall ratio | bound |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for dp in (False, True):
            runs = {None: [], args.canaries: []}
            for _ in range(args.repeats):
                for canaries, found in runs.items():
                    config = trial(dp=dp, steps=args.steps, canaries=canaries)
                    found.append(measure(config, cache=cache, root=root / str(len(found))))
            plain, audited = (median(found) for found in runs.values())
            label = "DP eps 8" if dp else "no DP"
            for name, m in ((f"{label}", plain), (f"{label}, audited", audited)):
                ratios = (
                    f"{m['rows'] / plain['rows']:.3f}x | {m['train_s'] / plain['train_s']:.2f}x | "
                    f"{m['wall_s'] / plain['wall_s']:.2f}x"
                )
                bound = "" if m["bound"] is None else f"{m['bound']:.2f}"
                lines.append(
                    f"| {name} | {m['rows']:.0f} | {m['train_s']:.1f} | {m['wall_s']:.1f} | {ratios} | {bound} |"
                )
        publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
