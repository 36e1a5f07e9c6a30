"""What a trial's training loop does besides its steps' kernels, measured on this machine's CPU: the host work that
precedes each forward (the keyed draws and the gather of the token views), a DP run's epsilon reading at its logging
steps, and averaging gradients over DDP ranks, one all-reduce per parameter (varsweep before, and Opacus's
``reduce_gradients``) beside ``trainables.training.average_gradients``; each side by side in one run.

Usage: python scripts/benchmark_loop_overheads.py [--depths 16,20] [--methods full,lora] [--timed-depth 16]
                                                  [--world 2] [--rounds 9] [--out docs/benchmarks.md]

Host work: ``example_draws`` and ``TokenViews.take`` for Oxford Flowers' 1,020 training examples with V cached
views each (int16 token maps of the official 10 scales, d16's 32 drop-path branches), medians of 30 calls. It is
the time a GPU idles per forward when the host waits for the GPU before starting it, and the time a trial's loop
can hide behind the GPU's work when it does not.
Accounting: a DP run's RDP epsilon at a logging step (every 50 steps by default; the GPU waits meanwhile), by
Opacus's ``RDPAccountant`` over ``RDP_ORDERS`` beside ``trainables.privacy.epsilon_spent`` (the first reading and
the median of the next nine, at 10 step counts), for three (sigma, q) pairs.
Averaging: all-reduces per step are counted exactly for the trainable gradients of a VAR adapted as a trial adapts
it (the official architectures, 102 classes; built on the meta device: nothing is allocated); they do not depend on
the device. Times: ``--world`` processes on this CPU over gloo, at ``--timed-depth``, the two forms alternating
round by round on the same gradients (medians of ``--rounds``, after one untimed round of each). NCCL between GPUs
has other per-call and per-byte costs, so only the counts and the direction carry over.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import benchmark_common
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from opacus.accountants import RDPAccountant

from bench.schema import MethodConfig
from trainables import privacy
from trainables.assets import OFFICIAL_VAR
from trainables.draws import ExampleKey, example_draws
from trainables.methods import adapt, trainable_parameters
from trainables.models import build_var
from trainables.training import SMALL_GRADIENT_BYTES, average_gradients, gradient_collectives

DROP_PATH_BRANCHES = 32  # VAR-d16's residual branches
# (cached views V, examples per forward b, views per example k): a non-DP batch of 16 and of 64, a DP chunk at k = 32
HOST_SETTINGS = ((8, 16, 1), (32, 64, 1), (32, 8, 32))


def host_work(views: int, examples: int, k: int, *, calls: int = 30) -> dict:
    """Median milliseconds of one forward's draws and gather (on the host, as trials run them)."""
    data, generator = benchmark_common.flowers_token_views(views=views), torch.Generator().manual_seed(1)
    key, seconds = ExampleKey.from_entropy(), []
    for step in range(calls):
        indices = torch.randperm(benchmark_common.FLOWERS_TRAIN_IMAGES, generator=generator)[:examples]
        start = time.perf_counter()
        drawn = example_draws(
            key, indices, step=step, num_views=views, k=k, drop_path_branches=DROP_PATH_BRANCHES
        )
        data.take(indices, k=k, uniform_bV=drawn.views_bV)
        seconds.append(time.perf_counter() - start)
    return {"views": views, "examples": examples, "k": k, "ms": 1e3 * statistics.median(seconds)}


# (noise multiplier, sampling rate): 32 expected examples of Oxford Flowers' 1,020 at two noise levels, and a large
# sampling rate (the reading's cost grows with q)
ACCOUNTING_SETTINGS = ((1.0, 0.03), (0.6, 0.0314), (2.0, 0.5))


def accounting(noise_multiplier: float, sampling_rate: float) -> dict:
    """Milliseconds of an RDP epsilon reading at 10 step counts: Opacus's accountant (median) and epsilon_spent
    (its first reading, then the median of the rest)."""
    privacy._rdp_of_one_step.cache_clear()
    before, now = [], []
    for steps in range(50, 550, 50):
        accountant = RDPAccountant()
        accountant.history = [(noise_multiplier, sampling_rate, steps)]
        start = time.perf_counter()
        accountant.get_epsilon(delta=1e-3, alphas=privacy.RDP_ORDERS)
        before.append(time.perf_counter() - start)
        start = time.perf_counter()
        privacy.epsilon_spent(
            noise_multiplier=noise_multiplier,
            sampling_rate=sampling_rate,
            steps=steps,
            delta=1e-3,
            accountants=("rdp",),
        )
        now.append(time.perf_counter() - start)
    return {
        "noise_multiplier": noise_multiplier,
        "sampling_rate": sampling_rate,
        "accountant_ms": 1e3 * statistics.median(before),
        "first_ms": 1e3 * now[0],
        "later_ms": 1e3 * statistics.median(now[1:]),
    }


def adapted_var(depth: int, method: str, *, device: str) -> torch.nn.Module:
    var = build_var(depth=depth, **OFFICIAL_VAR, device=device)
    adapt(var, MethodConfig(name=method), num_classes=benchmark_common.FLOWERS_CLASSES, seed=0)
    return var


def count(depth: int, method: str) -> dict:
    """Gradients, bytes and all-reduces per step of each form (shapes only: the meta device)."""
    grads = [
        torch.empty_like(p) for p in trainable_parameters(adapted_var(depth, method, device="meta")).values()
    ]
    return {
        "depth": depth,
        "method": method,
        "gradients": len(grads),
        "mib": sum(g.nbytes for g in grads) / 2**20,
        "per_parameter_collectives": len(grads),
        "averaged_collectives": len(gradient_collectives(grads)),
    }


def per_parameter(params: list[torch.Tensor], world: int) -> None:
    """The earlier form: an all-reduce and a division per parameter."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _worker(rank: int, world: int, init: str, depth: int, method: str, rounds: int, result: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        params = list(trainable_parameters(adapted_var(depth, method, device="cpu")).values())
        for p in params:
            p.grad = torch.randn_like(p)
        seconds = {"per_parameter": [], "averaged": []}
        forms = {"per_parameter": per_parameter, "averaged": average_gradients}
        for i in range(rounds + 1):
            for name, form in forms.items():
                dist.barrier()
                start = time.perf_counter()
                form(params, world)
                if i:  # the first round of each is untimed (allocations, gloo's buffers)
                    seconds[name].append(time.perf_counter() - start)
        if rank == 0:
            torch.save({name: statistics.median(s) for name, s in seconds.items()}, result)
    finally:
        dist.destroy_process_group()


def timed(depth: int, method: str, *, world: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        init, result = str(Path(folder) / "init"), str(Path(folder) / "result.pt")
        mp.spawn(_worker, args=(world, init, depth, method, rounds, result), nprocs=world, join=True)
        return torch.load(result, weights_only=True)


def report(host: list[dict], accounts: list[dict], rows: list[dict], *, command: str, world: int) -> str:
    lines = [
        f"`{command}` ({benchmark_common.machine()}, {benchmark_common.stamp()}).",
        "",
        "Host work before each forward (keyed draws and the token views' gather, 1,020 examples, medians of 30):",
        "",
        "| cached views V | examples per forward | k | ms |",
        "|---|---|---|---|",
        *(f"| {r['views']} | {r['examples']} | {r['k']} | {r['ms']:.2f} |" for r in host),
        "",
        "A DP run's RDP epsilon reading (at 10 step counts from 50 to 500):",
        "",
        "| noise multiplier | sampling rate | RDPAccountant (ms) | epsilon_spent, first (ms) | epsilon_spent, later (ms) |",
        "|---|---|---|---|---|",
        *(
            f"| {r['noise_multiplier']} | {r['sampling_rate']} | {r['accountant_ms']:.1f} | {r['first_ms']:.1f} "
            f"| {r['later_ms']:.2f} |"
            for r in accounts
        ),
        "",
        f"DDP gradient averaging, all-reduces per step: gradients under {SMALL_GRADIENT_BYTES // 2**20} MiB are "
        "all-reduced together (a flat copy per dtype and device), larger ones in place; times: "
        f"{world} processes over gloo on this CPU, medians, the two forms alternating.",
        "",
        "| depth | method | gradients | MiB | all-reduces per parameter | all-reduces now | per parameter (ms) "
        "| now (ms) | now / per parameter |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        before, now = r.get("per_parameter"), r.get("averaged")
        times = (
            f"{1e3 * before:.1f} | {1e3 * now:.1f} | {now / before:.2f}x" if before and now else "- | - | -"
        )
        lines.append(
            f"| {r['depth']} | {r['method']} | {r['gradients']} | {r['mib']:.1f} | "
            f"{r['per_parameter_collectives']} | {r['averaged_collectives']} | {times} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="16,20")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--timed-depth", type=int, default=16, help="0: counts only")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    host = [host_work(*setting) for setting in HOST_SETTINGS]
    accounts = [accounting(*setting) for setting in ACCOUNTING_SETTINGS]
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        for method in args.methods.split(","):
            row = count(depth, method)
            if depth == args.timed_depth:
                row.update(timed(depth, method, world=args.world, rounds=args.rounds))
            rows.append(row)
    command = "python scripts/benchmark_loop_overheads.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"
    )
    benchmark_common.publish(report(host, accounts, rows, command=command, world=args.world), args.out)


if __name__ == "__main__":
    main()
