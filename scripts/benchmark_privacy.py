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

``--versus REV``: book-keeping at git revision REV beside this tree's, at a VAR-d16-like geometry: the 680 tokens
of 256x256 images (patch_nums 1..16), ``--width`` and ``--heads`` as VAR-d16 (1024, 16) but ``--depth`` blocks;
``--views`` lists k:rows (rows = examples x k). REV's whole code (its ``trainables`` and ``bench``, from a temporary
``git worktree``; the scripts are this tree's) runs in processes of its own: per method and k, four processes (no DP
and book-keeping, with REV's code and with this tree's) each build the same seeded model and take one step in turn,
round by round, so that a load change on a shared machine hits all four alike. Each code's DP step is compared with
its own non-DP step. A process that fails ends the run with its stderr.

``--split K:ROWS:F1,F2,...``: this tree's book-keeping at the same d16-like geometry on ROWS rows (ROWS / K examples
of K views) in forwards of F rows each, beside the non-DP step on the same ROWS rows (one view each) in forwards of
F: where F < K an example's views take several forwards (``privacy._split_views_clipped``). Per method and F two
processes step in turn, as for ``--versus``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import benchmark_common
import psutil
import torch

from bench.schema import MethodConfig, PrivacyConfig, ResourcesConfig
from trainables.finetune import accumulate_loss_gradients
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
    # the trials' kernel; code older than ResourcesConfig's choice of kernel trained with VAR's default
    kernel = getattr(ResourcesConfig(), "training_attention_kernel", None)
    if kernel is not None:
        var.attention_kernel = kernel
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
    tokens = [torch.randint(0, VOCAB, (batch_size, k, pn * pn)) for pn in PATCH_NUMS]

    def loss_fn(part: torch.Tensor, *, views: slice = slice(None)) -> torch.Tensor:
        """Per-view losses [b, v] of examples ``part``; ``views``: those of one forward when an example's views
        are split over several (rows per forward below k)."""
        return view_losses(var, vqvae, label_N[part], [t[part][:, views] for t in tokens], class_dropout=0.1)

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
    """DP training state for one step of ``examples`` examples (k views each) in forwards of ``rows`` rows (code
    before ``resources.rows_per_forward`` took them as ``privacy.physical_batch_rows``: ``--versus``)."""
    rows_in_resources = "rows_per_forward" in {f.name for f in dataclasses.fields(ResourcesConfig)}
    privacy = PrivacyConfig(
        target_epsilon=10.0,
        sampling_rate=0.25,
        max_grad_norm=0.5,
        augmentation_multiplicity=k,
        clipping=clipping,
        **({} if rows_in_resources else {"physical_batch_rows": rows}),
    )
    return make_private(
        var,
        optimizer,
        privacy=privacy,
        dataset_size=4 * examples,
        planned_steps=1000,
        **({"resources": ResourcesConfig(rows_per_forward=rows)} if rows_in_resources else {}),
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


def d16_like(method: str, *, depth: int, width: int, heads: int, k: int, rows: int, bf16: bool = False):
    """(var, loss_fn) at VAR-d16's token layout (680 tokens per view) with ``depth`` blocks of ``width`` and
    ``heads``, adapted by ``method`` (seed 0), and ``rows // k`` examples of k random token views: loss_fn(example
    indices, views=slice of the k) -> per-view losses, forwards under CPU bf16 autocast when ``bf16``. A narrow
    VQVAE: only its embedding is used."""
    torch.manual_seed(0)
    patch_nums = OFFICIAL_PATCH_NUMS
    vqvae = build_vqvae(
        vocab_size=VOCAB, z_channels=32, ch=32, patch_nums=patch_nums, ch_mult=(1, 1), num_res_blocks=1
    )
    var = _adapted_var(method, depth=depth, patch_nums=patch_nums, embed_dim=width, num_heads=heads)
    examples = rows // k
    label_N = torch.randint(0, CLASSES, (examples,))
    tokens = [torch.randint(0, VOCAB, (examples, k, pn * pn)) for pn in patch_nums]

    def loss_fn(part: torch.Tensor, *, views: slice = slice(None)) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            idx = [t[part][:, views] for t in tokens]
            return view_losses(var, vqvae, label_N[part], idx, class_dropout=0.1)

    return var, loss_fn


def _versus_step(config: dict, *, depth: int, width: int, heads: int):
    """A fresh d16-like model (the same seed for every code and kind) and its step: book-keeping DP when
    ``config["dp"]``, else the non-DP step on the same rows. With ``config["forward"]`` (``--split``) both take
    the rows in forwards of that many: the non-DP step's rows are one view each."""
    k, rows, forward = config["k"], config["rows"], config.get("forward")
    examples = rows // k
    layout = dict(depth=depth, width=width, heads=heads)
    if forward is not None and not config["dp"]:
        var, loss_fn = d16_like(config["method"], k=1, rows=rows, **layout)
        return _accumulated_step(
            var, build_optimizer(var, lr=1e-4), rows=rows, forward=forward, loss_fn=loss_fn
        )
    var, loss_fn = d16_like(config["method"], k=k, rows=rows, **layout)
    optimizer = build_optimizer(var, lr=1e-4)
    if not config["dp"]:
        return _plain_step(var, optimizer, batch_size=examples, loss_fn=loss_fn)
    state = _private(var, optimizer, k=k, clipping="bookkeeping", rows=forward or rows, examples=examples)
    return lambda: private_step(state, torch.arange(examples), loss_fn)


def _accumulated_step(var, optimizer, *, rows: int, forward: int, loss_fn):
    """The non-DP step on ``rows`` examples of one view, ``forward`` per forward (the trials' accumulation)."""

    def step():
        optimizer.zero_grad(set_to_none=True)
        accumulate_loss_gradients(loss_fn, torch.arange(rows), examples_per_forward=forward)
        optimizer.step()

    return step


# Marks a stepping process's replies on its stdout (anything else it prints there is skipped).
REPLY = "benchmark_privacy reply: "
# The steps of a --versus row: (result key, with the revision's code (else this tree's), book-keeping DP (else none)).
VERSUS_KINDS = (
    ("versus_none", True, False),
    ("versus", True, True),
    ("none", False, False),
    ("current", False, True),
)


def serve_steps(step, *, requests=None, replies=None) -> None:
    """Reply ready, then take one step per line read from ``requests`` (stdin) until they end, replying (stdout)
    to each with its seconds and its peak resident set size over its start in MiB (the peak is reset first; NaN
    where it cannot be)."""
    requests, replies = requests or sys.stdin, replies or sys.stdout
    print(REPLY + json.dumps({"ready": True}), file=replies, flush=True)
    for _ in requests:
        exact = _peak_reset()
        rss_before = psutil.Process().memory_info().rss
        started = time.perf_counter()
        step()
        seconds = time.perf_counter() - started
        mib = (_peak_rss() - rss_before) / MIB if exact else float("nan")
        print(REPLY + json.dumps({"s": seconds, "mib": mib}), file=replies, flush=True)


class SteppingChild:
    """A process (``--one-versus``) that builds one model and its step with the code at ``code`` (a checkout's
    root: its ``trainables`` and ``bench`` are imported, the scripts are this tree's) and steps on request.
    ``what`` names it in the message that ends this process when it fails (its stderr's tail follows)."""

    def __init__(self, config: dict, *, code: Path, what: str, extra: tuple[str, ...] = ()):
        self.what = what
        self.stderr = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty child cannot block on it
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(code), str(benchmark_common.REPO / "scripts")]),
        }
        command = [
            sys.executable,
            __file__,
            "--one-versus",
            json.dumps(config),
            *extra,
            "--expect",
            str(code),
        ]
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )
        self._reply()  # built: the next process's build does not overlap this one's

    def step(self) -> dict:
        """One step: {"s": seconds, "mib": its peak over its start}."""
        try:
            self.process.stdin.write("step\n")
            self.process.stdin.flush()
        except OSError:  # the process has ended
            self._failed()
        return self._reply()

    def _reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line.removeprefix(REPLY))
        self._failed()

    def _failed(self) -> NoReturn:
        status = self.process.wait()
        self.stderr.seek(0)
        raise SystemExit(
            f"{self.what} failed (exit status {status}); its stderr ends:\n{self.stderr.read()[-4000:]}"
        )

    def close(self) -> None:
        """End the process (its requests end) and wait for it."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.stderr.close()


def run_versus_row(
    config: dict, *, revision: str, worktree: Path, depth: int, width: int, heads: int, steps: int
) -> dict:
    """One method and k (``config``: method, k, rows) at the d16-like geometry: the non-DP and the book-keeping
    step with the code of ``revision`` (checked out at ``worktree``) and with this tree's, each in its own process
    (``SteppingChild``), stepping in turn round by round. Time: each step's median over the rounds after the first
    (optimiser state, allocator pools); memory: each step's largest peak resident set size over its start."""
    children = {}
    for key, theirs, dp in VERSUS_KINDS:
        code, name = (worktree, f"the code of {revision}") if theirs else (benchmark_common.REPO, "this tree")
        step = "book-keeping" if dp else "non-DP"
        what = f"the {step} step of {config} with {name} ({code})"
        if theirs:
            what += f" (this script could not run {revision}'s code there)"
        children[key] = ({**config, "dp": dp}, code, what)
    return {**config, **stepped_in_turn(children, depth=depth, width=width, heads=heads, steps=steps)}


def stepped_in_turn(children: dict, *, depth: int, width: int, heads: int, steps: int) -> dict:
    """Start a ``SteppingChild`` per entry of ``children`` ({key: (config, code, what)}) and step them in turn for
    ``steps`` + 1 rounds: {key_s: the median seconds of the rounds after the first (optimiser state, allocator
    pools), key_mib: the largest peak resident set size over a step's start}."""
    extra = ("--depth", str(depth), "--width", str(width), "--heads", str(heads))
    seconds = {key: [] for key in children}
    peaks = {key: [] for key in children}
    with contextlib.ExitStack() as stack:
        started = {}
        for key, (config, code, what) in children.items():
            started[key] = SteppingChild(config, code=code, what=what, extra=extra)
            stack.callback(started[key].close)
        for round_ in range(steps + 1):
            for key, child in started.items():
                reply = child.step()
                if round_:
                    seconds[key].append(reply["s"])
                    peaks[key].append(reply["mib"])
    return {
        **{f"{key}_s": statistics.median(seconds[key]) for key in seconds},
        **{f"{key}_mib": max(peaks[key]) for key in peaks},
    }


def run_split_row(config: dict, *, depth: int, width: int, heads: int, steps: int) -> dict:
    """One method, k, rows and rows per forward (``config``): the non-DP and the book-keeping step of this tree,
    each in its own process, stepping in turn (``stepped_in_turn``)."""
    children = {
        key: ({**config, "dp": dp}, benchmark_common.REPO, f"the {key} step of {config} with this tree")
        for key, dp in (("none", False), ("dp", True))
    }
    return {**config, **stepped_in_turn(children, depth=depth, width=width, heads=heads, steps=steps)}


def split_table(results: list[dict]) -> list[str]:
    lines = [
        "| method | k | rows | rows per forward | DP route | no DP (s) | book-keeping (s) | time vs no DP | "
        "step peak over start, no DP (MiB) | book-keeping (MiB) | memory vs no DP |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        route = (
            f"views split, {r['k'] // r['forward']} forwards an example"
            if r["forward"] < r["k"]
            else "one forward"
        )
        lines.append(
            f"| {r['method']} | {r['k']} | {r['rows']} | {r['forward']} | {route} | {r['none_s']:.2f} | "
            f"{r['dp_s']:.2f} | {r['dp_s'] / r['none_s']:.2f}x | {r['none_mib']:.0f} | {r['dp_mib']:.0f} | "
            f"{r['dp_mib'] / max(r['none_mib'], 1):.2f}x |"
        )
    return lines


def parse_split(text: str) -> tuple[int, int, list[int]]:
    """``--split``'s K:ROWS:F1,F2,...; ValueError unless all are positive integers, ROWS a multiple of K, and
    each F divides K (split views) or is a multiple of K dividing ROWS (whole examples), so every forward is full."""
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"{text!r} is not K:ROWS:F1,F2,...")
    numbers = [parts[0], parts[1], *parts[2].split(",")]
    if not all(n.isdigit() and int(n) > 0 for n in numbers):
        raise ValueError(f"{text!r}: K, ROWS and each F must be positive integers")
    k, rows, *forwards = (int(n) for n in numbers)
    if rows % k:
        raise ValueError(f"{text!r}: ROWS (examples x K) must be a multiple of K")
    for forward in forwards:
        if (forward < k and k % forward) or (forward >= k and (forward % k or rows % forward)):
            raise ValueError(f"{text!r}: F={forward} must divide K or be a multiple of K that divides ROWS")
    return k, rows, forwards


def _layout(args) -> dict:
    """The d16-like geometry and step count of ``--versus`` and ``--split`` rows."""
    return dict(depth=args.depth, width=args.width, heads=args.heads, steps=args.steps)


def _shown(row: dict) -> dict:
    print(json.dumps(row), flush=True)  # as it is measured: a run cut short keeps what it printed
    return row


def split(args, k: int, rows: int, forwards: list[int]) -> None:
    """Book-keeping at rows per forward ``forwards`` beside the non-DP step at the same, per method."""
    results = []
    for method in ("full", "lora"):
        for forward in forwards:
            config = dict(method=method, k=k, rows=rows, forward=forward)
            results.append(_shown(run_split_row(config, **_layout(args))))
    stamp, machine = benchmark_common.stamp(), benchmark_common.machine()
    section = [
        f"### Book-keeping DP with an example's views spread over forwards: width {args.width}, {args.heads} heads, "
        f"depth {args.depth}, 680 tokens ({stamp})",
        "",
        f"Machine: {machine}. Script: `python scripts/benchmark_privacy.py --split {args.split} --width {args.width} "
        f"--heads {args.heads} --depth {args.depth} --steps {args.steps}` (per row two processes, the non-DP step "
        f"on the same {rows} rows of one view each and the book-keeping step on {rows // k} examples of k = {k} "
        f"views, both in forwards of the row's rows, stepping in turn; median of {args.steps} rounds after one "
        "untimed round; DP steps include noise and AdamW like the non-DP ones; memory: each step's peak resident "
        "set size over its start).",
        "",
        *split_table(results),
        "",
    ]
    benchmark_common.publish("\n".join(section), args.out)


def versus_table(results: list[dict], *, revision: str) -> list[str]:
    lines = [
        f"| method | k | rows | no DP {revision} (s) | book-keeping {revision} (s) | no DP this tree (s) | "
        f"book-keeping this tree (s) | time vs no DP: {revision} | this tree | step peak over start, no DP this "
        f"tree (MiB) | memory vs no DP: {revision} | this tree |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['k']} | {r['rows']} | {r['versus_none_s']:.2f} | {r['versus_s']:.2f} | "
            f"{r['none_s']:.2f} | {r['current_s']:.2f} | {r['versus_s'] / r['versus_none_s']:.2f}x | "
            f"{r['current_s'] / r['none_s']:.2f}x | {r['none_mib']:.0f} | "
            f"{r['versus_mib'] / max(r['versus_none_mib'], 1):.2f}x | {r['current_mib'] / max(r['none_mib'], 1):.2f}x |"
        )
    return lines


def parse_views(text: str) -> list[tuple[int, int]]:
    """``--views``' k:rows pairs; ValueError unless each is two positive integers with rows a multiple of k."""
    views = []
    for view in text.split(","):
        k, colon, rows = view.partition(":")
        if not (colon and k.isdigit() and rows.isdigit() and int(k) > 0 and int(rows) > 0):
            raise ValueError(f"{view!r} is not k:rows (two positive integers)")
        if int(rows) % int(k):
            raise ValueError(f"{view!r}: rows (examples x k) must be a multiple of k")
        views.append((int(k), int(rows)))
    return views


def is_revision(revision: str) -> bool:
    """Whether ``revision`` names a commit of this repository."""
    command = [
        "git",
        "-C",
        str(benchmark_common.REPO),
        "rev-parse",
        "--verify",
        "--quiet",
        f"{revision}^{{commit}}",
    ]
    return subprocess.run(command, capture_output=True).returncode == 0


def versus(args, views: list[tuple[int, int]]) -> None:
    """Book-keeping of ``args.versus`` vs this tree's, each vs its own non-DP step, four processes per method and
    k."""
    results = []
    with benchmark_common.revision_checkout(args.versus, "privacy") as worktree:
        for k, rows in views:
            for method in ("full", "lora"):
                config = dict(method=method, k=k, rows=rows)
                row = run_versus_row(config, revision=args.versus, worktree=worktree, **_layout(args))
                results.append(_shown(row))
    stamp, machine = benchmark_common.stamp(), benchmark_common.machine()
    section = [
        f"### Book-keeping DP, {args.versus} vs this tree, each vs its own non-DP step: width {args.width}, "
        f"{args.heads} heads, depth {args.depth}, 680 tokens ({stamp})",
        "",
        f"Machine: {machine}. Script: `python scripts/benchmark_privacy.py --versus {args.versus} --width {args.width} "
        f"--heads {args.heads} --depth {args.depth} --views {args.views} --steps {args.steps}` (per row four "
        f"processes, the non-DP and the book-keeping step with the whole code of {args.versus} and with this "
        f"tree's, stepping in turn; median of {args.steps} rounds after one untimed round; DP steps include noise "
        "and AdamW like the non-DP ones; rows = examples x k, the same rows for all four; memory: each step's peak "
        "resident set size over its start).",
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
    parser.add_argument(
        "--versus", help="git revision whose code's book-keeping to measure beside this tree's"
    )
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--views", default="1:4,32:32", help="k:rows pairs for --versus")
    parser.add_argument(
        "--split",
        help="K:ROWS:F1,F2,...: book-keeping in forwards of F rows (F < K splits an example's views)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--one-versus", help=argparse.SUPPRESS)
    parser.add_argument("--expect", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_versus:
        benchmark_common.check_imported_from(args.expect)
        config = json.loads(args.one_versus)
        serve_steps(_versus_step(config, depth=args.depth, width=args.width, heads=args.heads))
        return
    if args.one:
        benchmark_common.check_imported_from(args.expect)
        result = run_one(json.loads(args.one), depth=args.depth, batch_size=args.batch_size, steps=args.steps)
        print(json.dumps(result))
        return
    if args.steps < 1:
        parser.error("--steps must be at least 1 (the first step is not timed)")
    if args.split:
        try:
            k, rows, forwards = parse_split(args.split)
        except ValueError as err:
            parser.error(f"--split: {err}")
        split(args, k, rows, forwards)
        return
    if args.versus:
        try:
            views = parse_views(args.views)
        except ValueError as err:
            parser.error(f"--views: {err}")
        if not is_revision(args.versus):
            parser.error(f"--versus {args.versus}: no such git revision in {benchmark_common.REPO}")
        versus(args, views)
        return
    largest_k = max(config["k"] for config in configurations())
    if args.batch_size < largest_k:
        # a DP step's forwards hold batch-size rows, and one example's k views must share a forward
        parser.error(f"--batch-size {args.batch_size} is below the largest k measured ({largest_k})")
    extra = ("--depth", str(args.depth), "--batch-size", str(args.batch_size), "--steps", str(args.steps))
    results = []
    for config in configurations():
        # a fresh process per configuration; one that fails ends this run with its stderr
        results.append(benchmark_common.run_child(__file__, config, code=benchmark_common.REPO, extra=extra))
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
