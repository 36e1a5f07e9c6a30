"""Step time and peak memory of DP vs non-DP VAR adaptation, per method, per clipping mode, and vs augmentation
multiplicity k, measured side by side in one run (each configuration in its own fresh process).

Usage: python scripts/benchmark_privacy.py [--depth 6] [--batch-size 32] [--steps 6] [--out docs/benchmarks.md]
       python scripts/benchmark_privacy.py --versus a7366f3 [--width 1024 --heads 16 --depth 2 --views 1:4,32:32]
Model: VAR of the given depth (width 64*depth) for 64x64 images (VQVAE 16x downsampling, patch_nums 1..4, L=30
tokens, codebook 4096), random weights. A DP step is a fixed batch of ``batch-size`` examples (no Poisson draw, so
every configuration does the same work) in physical batches of ``batch-size`` rows (batch-size/k examples of k
views each): per-sample gradients (or ghost norms), clipping, noise, AdamW. Non-DP steps run all batch-size*k
views in one forward. Memory = peak resident set size of the configuration's process minus its size just before the first
step. Appends a dated Markdown section to ``--out``.

``--versus REV``: book-keeping of the code at git revision REV (its ``trainables/bookkeeping.py``, from a temporary
``git worktree``) beside the current one and the non-DP step on the same rows, everything else (model, training
code) current, at a VAR-d16-like geometry: the 680 tokens of 256x256 images (patch_nums 1..16), ``--width`` and
``--heads`` as VAR-d16 (1024, 16) but ``--depth`` blocks; ``--views`` lists k:rows (rows = examples x k).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchmark_common
import psutil
import torch

from bench.schema import MethodConfig, PrivacyConfig, ResourcesConfig
from trainables import privacy as privacy_module
from trainables.methods import adapt
from trainables.models import OFFICIAL_PATCH_NUMS, build_var, build_vqvae
from trainables.privacy import make_private, private_step
from trainables.training import build_optimizer, view_losses

PATCH_NUMS, VOCAB, CLASSES = (1, 2, 3, 4), 4096, 10
MIB = 1024**2


def configurations() -> list[dict]:
    methods, modes = ("full", "lora", "ln_tuning"), ("hooks", "ghost", "bookkeeping")
    rows = [dict(method=m, dp=dp, k=1) for dp in (None, *modes) for m in methods]
    rows += [dict(method="lora", dp=dp, k=4) for dp in (None, "hooks", "bookkeeping")]
    rows += [dict(method=m, dp=dp, k=8) for m in methods for dp in (None, "hooks", "bookkeeping")]
    return rows


def _adapted_var(method: str, *, depth: int, patch_nums, **layout):
    """A seeded VAR (no drop-path) adapted by ``method``, in training mode; ``layout``: embed_dim, num_heads."""
    var = build_var(
        depth=depth,
        num_classes=CLASSES,
        patch_nums=patch_nums,
        vocab_size=VOCAB,
        z_channels=32,
        drop_path_rate=0.0,
        generator=torch.Generator().manual_seed(0),
        **layout,
    )
    adapt(var, MethodConfig(name=method), num_classes=CLASSES, seed=0)
    var.attention_kernel = ResourcesConfig().training_attention_kernel  # the trials' default
    return var.train()


def run_one(config: dict, *, depth: int, batch_size: int, steps: int) -> dict:
    torch.manual_seed(0)
    vqvae = build_vqvae(
        vocab_size=VOCAB,
        z_channels=32,
        ch=32,
        patch_nums=PATCH_NUMS,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=1,
    ).eval()
    var = _adapted_var(config["method"], depth=depth, patch_nums=PATCH_NUMS)
    k = config["k"]
    label_N = torch.randint(0, CLASSES, (batch_size,))
    views = [torch.randint(0, VOCAB, (batch_size, k, pn * pn)) for pn in PATCH_NUMS]
    loss_fn = lambda part: view_losses(var, vqvae, label_N[part], [v[part] for v in views], class_dropout=0.1)  # noqa: E731
    optimizer = build_optimizer(var, lr=1e-4)
    step = (
        _dp_step(var, optimizer, config, batch_size=batch_size, loss_fn=loss_fn)
        if config["dp"]
        else _plain_step(var, optimizer, batch_size=batch_size, loss_fn=loss_fn)
    )
    rss_before = psutil.Process().memory_info().rss
    seconds = []
    for _ in range(steps + 1):  # the first step allocates optimiser state and per-sample buffers: not timed
        started = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        **config,
        "rows_per_forward": batch_size if config["dp"] else batch_size * k,
        "step_s": statistics.median(seconds[1:]),
        "peak_over_start_mib": (peak - rss_before) / MIB,
    }


def _plain_step(var, optimizer, *, batch_size: int, loss_fn):
    def step():
        loss = loss_fn(torch.arange(batch_size)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _private(var, optimizer, *, k: int, clipping: str, rows: int, examples: int):
    """DP training state for one step of ``examples`` examples (k views each) in forwards of ``rows`` rows."""
    privacy = PrivacyConfig(
        target_epsilon=10.0,
        sampling_rate=0.25,
        max_grad_norm=0.5,
        augmentation_multiplicity=k,
        clipping=clipping,
    )
    return make_private(
        var,
        optimizer,
        privacy=privacy,
        resources=ResourcesConfig(rows_per_forward=rows),
        dataset_size=4 * examples,
        planned_steps=1000,
    )


def _dp_step(var, optimizer, config: dict, *, batch_size: int, loss_fn):
    state = _private(
        var, optimizer, k=config["k"], clipping=config["dp"], rows=batch_size, examples=batch_size
    )
    return lambda: private_step(state, torch.arange(batch_size), loss_fn)


def table(results: list[dict]) -> list[str]:
    base = {(r["method"], r["k"]): r for r in results if r["dp"] is None}
    lines = [
        "| method | DP clipping | k | rows per forward | step (s) | time vs non-DP, same k | peak memory over start (MiB) | memory vs non-DP, same k |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = base.get((r["method"], r["k"]), base[(r["method"], 1)])
        mode = "no DP" if r["dp"] is None else r["dp"]
        lines.append(
            f"| {r['method']} | {mode} | {r['k']} | {r['rows_per_forward']} | {r['step_s']:.3f} | {r['step_s'] / ref['step_s']:.2f}x | "
            f"{r['peak_over_start_mib']:.0f} | {r['peak_over_start_mib'] / max(ref['peak_over_start_mib'], 1):.2f}x |"
        )
    return lines


def summary(results: list[dict]) -> list[str]:
    by = {(r["method"], r["dp"], r["k"]): r for r in results}
    ratio = lambda a, b: by[a]["step_s"] / by[b]["step_s"]  # noqa: E731
    memory = lambda a, b: by[a]["peak_over_start_mib"] / by[b]["peak_over_start_mib"]  # noqa: E731
    lines = []
    for method, name in (
        ("lora", "DP-LoRA / LoRA"),
        ("full", "DP-full / full"),
        ("ln_tuning", "DP-LN-tuning / LN-tuning"),
    ):
        modes = ", ".join(
            f"{ratio((method, mode, 1), (method, None, 1)):.2f}x time, {memory((method, mode, 1), (method, None, 1)):.2f}x memory ({mode})"
            for mode in ("bookkeeping", "hooks", "ghost")
        )
        lines.append(f"- {name} at k=1: {modes}")
    for mode in ("bookkeeping", "hooks"):
        for k in (4, 8):
            lines.append(
                f"- DP-LoRA ({mode}) time(k={k}) / time(1) = {ratio(('lora', mode, k), ('lora', mode, 1)):.2f} (target <= {1.1 * k:.1f}); "
                f"non-DP LoRA on the same k views: {ratio(('lora', None, k), ('lora', None, 1)):.2f}"
            )
    lines.append(
        "- DP (bookkeeping) / non-DP at k=8: "
        + ", ".join(
            f"{m} {ratio((m, 'bookkeeping', 8), (m, None, 8)):.2f}x" for m in ("full", "lora", "ln_tuning")
        )
    )
    return lines


def _peak_reset() -> bool:
    """Return freed heap memory to the OS (glibc malloc_trim: else one step's freed pools hide the next step's
    peak) and reset the process's peak resident set size (Linux: 5 > /proc/self/clear_refs); False where
    unsupported."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load_bookkeeping(path: str):
    """The BookKeeping class of another revision's ``trainables/bookkeeping.py`` (loaded inside this package, so its
    relative imports resolve to the current ``trainables``)."""
    spec = importlib.util.spec_from_file_location("trainables._bookkeeping_versus", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BookKeeping


def d16_like(method: str, *, depth: int, width: int, heads: int, k: int, rows: int, bf16: bool = False):
    """(var, loss_fn) at VAR-d16's token layout (680 tokens per view) with ``depth`` blocks of ``width`` and
    ``heads``, adapted by ``method`` (seed 0), and ``rows // k`` examples of k random token views: loss_fn(example
    indices) -> per-view losses, forwards under CPU bf16 autocast when ``bf16``. A narrow VQVAE: only its
    embedding is used."""
    torch.manual_seed(0)
    patch_nums = OFFICIAL_PATCH_NUMS
    vqvae = build_vqvae(
        vocab_size=VOCAB, z_channels=32, ch=32, patch_nums=patch_nums, ch_mult=(1, 1), num_res_blocks=1
    )
    var = _adapted_var(method, depth=depth, patch_nums=patch_nums, embed_dim=width, num_heads=heads)
    examples = rows // k
    label_N = torch.randint(0, CLASSES, (examples,))
    views = [torch.randint(0, VOCAB, (examples, k, pn * pn)) for pn in patch_nums]

    def loss_fn(part: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return view_losses(var, vqvae, label_N[part], [v[part] for v in views], class_dropout=0.1)

    return var, loss_fn


def _versus_step(config: dict, kind: str, bookkeeping_from: str, *, depth: int, width: int, heads: int):
    """A fresh model (same seed for every kind) and its step: kind "none" (no DP), "versus" (book-keeping from
    ``bookkeeping_from``) or "current" (this tree's book-keeping)."""
    k, rows = config["k"], config["rows"]
    examples = rows // k
    var, loss_fn = d16_like(config["method"], depth=depth, width=width, heads=heads, k=k, rows=rows)
    optimizer = build_optimizer(var, lr=1e-4)
    if kind == "none":
        return _plain_step(var, optimizer, batch_size=examples, loss_fn=loss_fn)
    current = privacy_module.BookKeeping
    if kind == "versus":
        privacy_module.BookKeeping = _load_bookkeeping(bookkeeping_from)
    try:
        state = _private(var, optimizer, k=k, clipping="bookkeeping", rows=rows, examples=examples)
    finally:
        privacy_module.BookKeeping = current
    return lambda: private_step(state, torch.arange(examples), loss_fn)


def run_versus_one(config: dict, *, depth: int, width: int, heads: int, steps: int) -> dict:
    """One method and k at the d16-like geometry: the non-DP step, the other revision's book-keeping
    (``config["bookkeeping_from"]``) and this tree's, each on its own copy of the model, interleaved step by step
    (so that a load change on a shared machine hits all three alike). Time: median over rounds of each step's
    time; memory: each step's peak resident set size over its start (the peak is reset before every step)."""
    kinds = ("none", "versus", "current")
    steps_by_kind = {
        kind: _versus_step(config, kind, config["bookkeeping_from"], depth=depth, width=width, heads=heads)
        for kind in kinds
    }
    seconds = {kind: [] for kind in kinds}
    peaks = {kind: [] for kind in kinds}
    for round_ in range(steps + 1):  # round 0: optimiser state, allocator pools: not counted
        for kind in kinds:
            exact = _peak_reset()
            rss_before = psutil.Process().memory_info().rss
            started = time.perf_counter()
            steps_by_kind[kind]()
            if round_:
                seconds[kind].append(time.perf_counter() - started)
                peaks[kind].append((_peak_rss() - rss_before) / MIB if exact else float("nan"))
    return {
        **config,
        **{f"{kind}_s": statistics.median(seconds[kind]) for kind in kinds},
        **{f"{kind}_mib": max(peaks[kind]) for kind in kinds},
    }


def versus_table(results: list[dict], *, revision: str) -> list[str]:
    lines = [
        f"| method | k | rows | no DP (s) | book-keeping {revision} (s) | this tree (s) | time vs no DP: {revision} | "
        f"this tree | step peak over start, no DP (MiB) | memory vs no DP: {revision} | this tree |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base_s, base_mib = r["none_s"], max(r["none_mib"], 1)
        lines.append(
            f"| {r['method']} | {r['k']} | {r['rows']} | {base_s:.2f} | {r['versus_s']:.2f} | {r['current_s']:.2f} | "
            f"{r['versus_s'] / base_s:.2f}x | {r['current_s'] / base_s:.2f}x | {r['none_mib']:.0f} | "
            f"{r['versus_mib'] / base_mib:.2f}x | {r['current_mib'] / base_mib:.2f}x |"
        )
    return lines


def versus(args) -> None:
    """Book-keeping of ``args.versus`` vs this tree's vs no DP, one process per method and k."""
    root = Path(__file__).resolve().parent.parent
    worktree = Path(f"/tmp/varsweep-bookkeeping-{args.versus}")
    subprocess.run(
        ["git", "-C", str(root), "worktree", "add", "--detach", str(worktree), args.versus], check=True
    )
    try:
        old = str(worktree / "trainables" / "bookkeeping.py")
        results = []
        for view in args.views.split(","):
            k, rows = (int(x) for x in view.split(":"))
            for method in ("full", "lora"):
                config = dict(method=method, k=k, rows=rows, bookkeeping_from=old)
                command = [sys.executable, __file__, "--one-versus", json.dumps(config)]
                command += [
                    "--depth",
                    str(args.depth),
                    "--width",
                    str(args.width),
                    "--heads",
                    str(args.heads),
                ]
                command += ["--steps", str(args.steps)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results.append(json.loads(output.strip().splitlines()[-1]))
                print(json.dumps(results[-1]), flush=True)
    finally:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(worktree)], check=True)
    stamp, machine = benchmark_common.stamp(), benchmark_common.machine()
    section = [
        f"### Book-keeping DP vs {args.versus} vs no DP, width {args.width}, {args.heads} heads, depth {args.depth}, "
        f"680 tokens ({stamp})",
        "",
        f"Machine: {machine}. Script: `python scripts/benchmark_privacy.py --versus {args.versus} --width {args.width} "
        f"--heads {args.heads} --depth {args.depth} --views {args.views} --steps {args.steps}` (the three steps "
        f"interleaved in one process per row, median of {args.steps} rounds after one untimed round; DP steps "
        "include noise and AdamW like the non-DP ones; rows = examples x k, the same rows for all three).",
        "",
        *versus_table(results, revision=args.versus),
        "",
    ]
    benchmark_common.publish("\n".join(section), args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--versus", help="git revision whose book-keeping to measure beside this tree's")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--views", default="1:4,32:32", help="k:rows pairs for --versus")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--one-versus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    largest_k = max(config["k"] for config in configurations())
    if not args.versus and args.batch_size < largest_k:
        # a DP step's forwards hold batch-size rows, and one example's k views must share a forward
        parser.error(f"--batch-size {args.batch_size} is below the largest k measured ({largest_k})")
    if args.one_versus:
        result = run_versus_one(
            json.loads(args.one_versus),
            depth=args.depth,
            width=args.width,
            heads=args.heads,
            steps=args.steps,
        )
        print(json.dumps(result))
        return
    if args.versus:
        versus(args)
        return
    if args.one:
        print(
            json.dumps(
                run_one(json.loads(args.one), depth=args.depth, batch_size=args.batch_size, steps=args.steps)
            )
        )
        return
    results = []
    for config in configurations():
        command = [
            sys.executable,
            __file__,
            "--one",
            json.dumps(config),
            "--depth",
            str(args.depth),
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    stamp, machine = benchmark_common.stamp(), benchmark_common.machine()
    section = [
        f"### DP vs non-DP step, VAR depth {args.depth}, 64x64 (L=30), batch {args.batch_size} ({stamp})",
        "",
        f"Machine: {machine}. Script: `python scripts/benchmark_privacy.py --depth {args.depth} --batch-size {args.batch_size} --steps {args.steps}` "
        f"(median of {args.steps} steps after one untimed step, each configuration in a fresh process).",
        "",
        *table(results),
        "",
        *summary(results),
        "",
    ]
    text = "\n".join(section)
    benchmark_common.publish(text, args.out)


if __name__ == "__main__":
    main()
