"""GPU efficiency of VAR-d16/d20 training, DP-SGD and generation (issue 16), measured side by side in one call.

Usage: python scripts/benchmark_gpu.py [--quick] [--device cuda] [--depth 16 ...] [--out RUN.json]
                                      [--deadline-s 500] [--skip-phase PHASE ...] [--cost NAME=SECONDS ...]
                                      [--report docs/benchmarks.md] [--write-throughput bench/measured_throughput.json]
       python scripts/benchmark_gpu.py --from RUN.json [--report docs/benchmarks.md] [--write-throughput ...]
       python scripts/benchmark_gpu.py --device cpu --depth 2 --quick      (a smoke run of the script on a CPU)

On the lent H200 (its image's Python 3.12 and torch, no network, nothing of ours installed): run ``make
device-wheels`` here once (the pinned Opacus, torch-fidelity and peft wheels into .whl/), then the device tool's
``run`` with ``kind: "nvidia-h200"`` (the tool's default kind is an H100, whose 80 GB the largest generation
batches may not fit), ``carry: [".whl"]``, ``timeout_s: 540`` and the command

    export BENCHMARK_GPU_T0=$(date +%s.%N); set -o pipefail;
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1;
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1; python3 scripts/benchmark_gpu.py 2>&1 | tee $OUT/log

(``pipefail``: the call's exit status is the script's, not tee's; ``BENCHMARK_GPU_T0``: the deadline counts from
the command's start, the wheels' install included), then ``--from`` the returned benchmark_gpu.json with
``--report`` and ``--write-throughput`` here. Where only an H100 is lent, the same run there is still worth its
time: its rows carry the device's name, the throughput file keeps them beside the H200's, and ``python -m bench
sweep ... --dry-run --gpu H100`` prices from them. The same command, in a Python holding only the image's packages
at its torch 2.11 and ``--device cpu --depth 2 --quick``, is how the script was checked here (2026-12-04, again
2026-12-06 and 2026-12-07): nothing else is needed there (the deadline's clock reads psutil, which benchmark_common imports).

Time. The device kills the call at 540 s, so the run keeps a hard deadline (``--deadline-s``, default 500 s; 150 s
with ``--quick``) counted from the process's start (or ``$BENCHMARK_GPU_T0``), not from when its models are built:
every measurement has an expected cost (``COSTS``, rough H200 seconds for what cannot be predicted, such as a
compile; eager steps priced from the rows measured before them) and starts only if that cost fits before the
deadline, else it is recorded as skipped with the reason. Each phase also has a window counted from its own start
(``Plan.windows``): past it, the phase starts nothing more, so a slow phase costs the phases after it time but
cannot take all of it. A watchdog ends the process at ``--hard-stop-s`` (deadline + 30 s) if a measurement runs
far past its estimate. The JSON (``--out``, default ``$OUT/benchmark_gpu.json`` when $OUT is set) is replaced
atomically at the start and end of every measurement: it names the measurement in flight (``running``), so a run
cut short keeps every finished row and says what it was doing; each measurement's start is printed with its
expected cost, and ``timeline`` records expected against actual seconds (to recalibrate ``COSTS``). After an
exception the GPU's health is checked (a synchronize and a tiny kernel): a broken device (an illegal address, a
failed graph capture) is recorded in ``device_broken`` and every later measurement is skipped, the JSON still
written and the report still printed.

Phases, by priority (the issue's targets first; nothing compiles before phase 6):
1. matmul: the achievable dense bf16 rate (large square products, random inputs rotated, back to back between
   CUDA synchronisations, medians), beside the datasheet peak (``bench.estimates.PEAK_FLOPS``), and the memory bandwidth (a 4 GiB
   device-to-device copy): the two ceilings, MFU's denominator.
2. training: d16 eager, full fine-tuning then LoRA, as trials run (bf16 autocast, the per_scale kernel, fused
   AdamW, token-cache style inputs: random token maps, no VQVAE encoding), up the batch ladder until a batch fails.
   Images/s, peak GiB, MFU = useful FLOPs (``bench.estimates.training_flops_per_row``: attention over the visible
   query/key pairs only, its backward without a kernel's recomputation of the scores) / the matmul rate of phase 1,
   and / the datasheet.
3. privacy: at d16 the non-DP step and book-keeping for DP-full and DP-LoRA at k = 1 and k = 32 views per example
   (``dp_rows`` rows per physical batch; at k = 32 one example): time and peak-memory ratios to the non-DP step.
   (k = 128, one example's views in four forwards of ``dp_rows`` as the paper sweeps run it, opens phase 10.)
4. generation: d16 eager (CFG 1.5, top-k 900, top-p 0.96, bf16 autocast) up a small batch ladder.
5. evaluation: generation plus Inception-v3 features (torch-fidelity's FID architecture, random weights: nothing
   is downloaded) of Oxford Flowers' 6,149 test images at the fastest eager batch (in memory).
6. training_compiled: ``compile_blocks`` at each method's fastest eager batch, compiled afresh (dynamo reset: no
   graphs of another model count toward its recompile limit); rows record the graphs compiled; the compiled
   step's profile while it is compiled.
7. generation_compiled: ``compiled=True`` (CUDA graphs) at ONE batch, the fastest eager one; then, reusing its ten
   scale graphs, the 6,149-image evaluation at it if it is the fastest setting.
8. more_depths (d20): the eager ladder, DP-full at k = 1 (no DP and book-keeping: the one setting whose
   routes change with the width), compiled training at the best batch.
9. profiles (``torch.profiler``): the fastest eager training step per method, the DP step beside its non-DP step,
   the fastest eager generation batch: kernel time by category, the GPU's busy share, the costliest kernels.
10. options: a block's element-wise pieces and the decoder's beside the published forms; book-keeping's norm
   accuracy on the device; fused AdamW off and the masked kernel beside each method's first row, LoRA's frozen
   weights in bf16; DP's Gram routes, Opacus's ghost clipping (float32, beside a float32 non-DP step) and hooks;
   a LoRA trial's model sampling; the VQVAE decode in NCHW and channels-last.
11. trial_loops: per method a trial's own loop (``finetune``) at the fastest setting trials run beside its bare
   step, with every implicit host wait for the GPU (CUDA's sync debug mode); DP-LoRA's loop; the evaluation at a
   trial's setting (the trials' ``generate``: eager, ``EvaluationConfig.batch_size``, its PNG files; extrapolated).
12. compiled_more: compiled training at the first batch, compiled generation at the other batches, the evaluation
   at a trial's setting with ``resources.compile_sampling`` (its batch size's ten scale graphs compiled: first
   calls timed apart).
13. flex: the FlexAttention kernel beside each method's first row (its kernel compiles on first use), last.
What one call reaches. By the cost table (``COSTS``; a review's simulation of the plan, 2026-12-07), a default call
spends ~330 s (the wheels' install included) on phases 1-5, then has time for compiled full fine-tuning and its
profile and d20's eager rows; compiled generation's ten scale compiles (~260 s by the table) do not fit after
them, and skipping training_compiled (or evaluation too) does not make room. They need a call of their own, about
400 s: ``--only-phase generation --only-phase generation_compiled`` (the eager ladder picks the batch),
on a warm machine when that much device time is left, else in a later session; ``--from`` each returned JSON
with ``--report`` and ``--write-throughput``. If real costs run 1.6x the table's, the privacy window cuts DP-LoRA
at k = 32: read ``timeline`` and pass ``--cost`` to recalibrate a second call.
Every measurement runs in its own try/except (the error is recorded and the run goes on). Markdown tables are
printed at the end (and appended to ``--report``). Timings: median of ``steps`` calls after ``warmup`` untimed
ones (allocation, autotuning, compilation), CUDA synchronised around each.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import re
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import benchmark_common
import peft
import psutil
import torch
from benchmark_common import official_models, timed
from torch import nn
from torch.nn import functional as F

from bench.estimates import (
    MEASURED_THROUGHPUT_FILE,
    PEAK_FLOPS,
    USEFUL_ATTENTION_BACKWARD,
    VarShape,
    gpu_kind,
    training_flops_per_row,
)
from bench.schema import (
    AUTO_ATTENTION_KERNEL,
    SUBSTITUTE_EXTRACTOR,
    EvaluationConfig,
    MethodConfig,
    OptimizationConfig,
    PrivacyConfig,
    ResourcesConfig,
)
from trainables.evaluation.features import uint8_batches
from trainables.evaluation.generate import generate, generation_plan
from trainables.finetune import RunPlan, finetune
from trainables.methods import LoraLinear, adapt
from trainables.models import release_sampling_caches
from trainables.models import vqvae as vqvae_module
from trainables.models.var import LN_EPS, AdaLNSelfAttn, modulate, unit_vectors
from trainables.privacy import make_private, private_step
from trainables.profiling import Stopwatch, peak_flops_per_second
from trainables.training import bf16_autocast, build_optimizer, compile_blocks, view_losses

CLASSES, VOCAB, GIB = (
    benchmark_common.FLOWERS_CLASSES,
    4096,
    1024**3,
)  # Oxford Flowers' classes; the official codebook
FLOWERS_TEST_IMAGES = 6149
GENERATION_DEPTH = 16
# Compiled sampling replays every scale from its fourth call on: the first runs scale 0 eagerly (it allocates the
# static KV caches), compiles scales 1-9 and runs their CUDA-graph warm-up; the second compiles scale 0 and records
# scales 1-9; the third records scale 0. The two after the first run untimed, or a timed median holds a compile.
COMPILED_WARM_CALLS = 2
DP_KERNEL = AUTO_ATTENTION_KERNEL  # the kernel trials use; the DP rows compare clipping modes, not kernels


# The device kills the call at 540 s: by default nothing starts that is expected to end after 500 s from the
# process's start (150 s for --quick), and the watchdog ends the process 30 s after the deadline.
DEADLINE_S, QUICK_DEADLINE_S, HARD_STOP_AFTER_S = 500.0, 150.0, 30.0
CPU_DEADLINE_S = 3600.0  # a smoke run on a CPU measures everything
# Rough seconds on an H200 for what a measurement's expected cost is made of, where no row measured before it says
# (an eager step's cost comes from the rows measured before it: ``step_seconds``). Compiles cannot be predicted
# from rows: compiled sampling compiles one graph per scale (ten, each unrolling every block; ~25 s each at d16,
# scaled with depth), ``compile_blocks`` a block's forward and backward (~90 s), FlexAttention its kernels (~40 s).
# Settable per run: --cost NAME=SECONDS.
COSTS = {
    "process_start": 20.0,  # interpreter and imports before the clock is read (when $BENCHMARK_GPU_T0 is unset)
    "matmul": 3.0,  # one size: allocation, 23 products
    "bandwidth": 3.0,
    "build_d16": 10.0,  # the official-layout VQVAE and a VAR on the CPU, scaled with depth
    "training_setup": 6.0,  # a model copied to the device, its optimizer, the first steps' allocation/autotuning
    "training_step_d16_b16": 0.12,  # a d16 full fine-tuning step at batch 16 (160 images/s measured)
    "dp_setup": 8.0,  # make_private, its hooks and buffers
    "dp_factor": 2.5,  # a DP step over the non-DP one (book-keeping measured 1.46x; Opacus hooks up to 8x)
    "dp_split_factor": 1.2,  # book-keeping with an example's views over forwards (0.96-1.03x on a CPU, 2026-12-07)
    "opacus_factor": 8.0,
    "generation_setup": 4.0,
    "generation_images_per_s": 120.0,  # d16 eager sampling (138 images/s at batch 64 measured)
    "compile_sampling_scale": 25.0,  # one scale's graph at d16, its CUDA-graph warm-up included
    "compile_training": 90.0,
    "flex": 40.0,
    "inception_setup": 8.0,
    "inception_images_per_s": 1500.0,
    "png_images_per_s": 150.0,
    "block_op": 3.0,
    "norm_accuracy": 3.0,
    "profile_setup": 6.0,
    "trial_loop_setup": 15.0,
    "decode_layouts": 8.0,
}
SCALES = 10  # the official patch_nums: one compiled sampling graph each


@dataclass(frozen=True)
class Plan:
    """What one call measures. ``deadline_s``: seconds from the process's start after which nothing is expected to
    run; ``windows``: seconds from each phase's own start after which it starts nothing new (None: no window)."""

    depths: tuple[int, ...]
    batches: tuple[int, ...]
    steps: int
    warmup: int
    kernels: tuple[str, ...]
    compile: bool
    compile_batches: str  # "base and best" or "best"
    dp_configs: tuple[tuple[str, int], ...]  # (method, k views per example)
    dp_rows: int
    dp_clippings: tuple[str, ...]
    generation_depth: int
    generation_batches: tuple[int, ...]
    generation_compiled: bool
    generation_steps: int
    evaluation_images: int
    evaluation_trial_images: int
    matmul_sizes: tuple[int, ...]
    copy_mib: int
    vqvae_channels: int
    profile_steps: int
    loop_steps: int
    deadline_s: float
    hard_stop_s: float | None
    windows: dict
    costs: dict
    skip_phases: tuple[str, ...] = ()


# The phases in priority order (``run``): the issue's targets, then the compiled paths, the other depths, and the
# options last. A phase's window (seconds from its own start) bounds what an overrun in it costs the later ones.
PHASES = (
    "matmul",
    "training",
    "privacy",
    "generation",
    "evaluation",
    "training_compiled",
    "generation_compiled",
    "more_depths",
    "profiles",
    "options",
    "trial_loops",
    "compiled_more",
    "flex",
)
WINDOWS = {
    "matmul": 40.0,
    "training": 100.0,
    "privacy": 110.0,
    "generation": 70.0,
    "evaluation": 90.0,
    "training_compiled": 220.0,
    "generation_compiled": 330.0,
    "more_depths": 220.0,
}


def make_plan(args: argparse.Namespace, device: torch.device) -> Plan:
    cuda = device.type == "cuda"
    quick = bool(getattr(args, "quick", False))
    deadline = getattr(args, "deadline_s", None) or (
        (QUICK_DEADLINE_S if quick else DEADLINE_S) if cuda else CPU_DEADLINE_S
    )
    hard_stop = getattr(args, "hard_stop_s", None)
    if hard_stop is None:
        hard_stop = deadline + HARD_STOP_AFTER_S if cuda else None
    costs = {**COSTS, **dict(getattr(args, "cost", None) or ())}
    plan = Plan(
        depths=(16, 20),
        batches=(16, 32, 64, 128),
        steps=5,
        warmup=2,
        kernels=("masked", "per_scale", "flex"),
        compile=True,
        compile_batches="base and best",
        # The targets (no DP and book-keeping) at each configuration; Opacus's ghost and hooks, options beside
        # book-keeping, come with the options. k = 128 (the paper's largest, an example's views in four forwards
        # of 32 rows: its memory and time, not a target) opens the options.
        dp_configs=(("full", 1), ("lora", 1), ("full", 32), ("lora", 32), ("full", 128), ("lora", 128)),
        dp_rows=32,
        dp_clippings=("bookkeeping", "bookkeeping:gram", "ghost", "hooks"),
        generation_depth=GENERATION_DEPTH,
        generation_batches=(64, 128, 256, 512),
        generation_compiled=True,
        generation_steps=3,
        evaluation_images=FLOWERS_TEST_IMAGES,
        evaluation_trial_images=1024,
        matmul_sizes=(4096, 8192, 16384),
        copy_mib=4096,
        vqvae_channels=160,
        profile_steps=3,
        loop_steps=10,
        deadline_s=deadline,
        hard_stop_s=hard_stop or None,
        windows=dict(WINDOWS) if cuda else {},  # a CPU smoke run measures everything
        costs=costs,
        skip_phases=skipped_phases(args),
    )
    if quick:  # a first look at the eager targets: nothing compiles
        plan = replace(
            plan,
            depths=(16,),
            batches=(16, 64),
            steps=3,
            compile=False,
            compile_batches="best",
            dp_configs=(("full", 1),),
            dp_clippings=("bookkeeping", "bookkeeping:gram"),
            generation_batches=(64, 256),
            generation_compiled=False,
            evaluation_images=1024,
            evaluation_trial_images=512,
            matmul_sizes=(8192,),
            windows={k: v / 2 for k, v in plan.windows.items()},
        )
    if not cuda:  # a smoke run of the script: tiny sizes; no FlexAttention backward and no compiling on a CPU
        plan = replace(
            plan,
            batches=(1, 2),
            steps=1,
            warmup=0,
            kernels=("masked", "per_scale"),
            compile=False,
            dp_rows=2,
            dp_configs=(("lora", 1), ("lora", 2), ("full", 1), ("lora", 4)),  # k = 4: views in two forwards
            dp_clippings=("bookkeeping", "bookkeeping:gram", "hooks", "ghost"),
            generation_batches=(2,),
            generation_compiled=False,
            generation_steps=1,
            evaluation_images=2,
            evaluation_trial_images=2,
            matmul_sizes=(256,),
            copy_mib=64,
            vqvae_channels=32,
            profile_steps=1,
            loop_steps=2,
        )
    if args.depth:
        plan = replace(plan, depths=tuple(args.depth), generation_depth=args.depth[0])
    return plan


def process_start(*, now: float | None = None) -> float:
    """When this run's clock starts (epoch seconds): ``$BENCHMARK_GPU_T0`` (the device command's own start, set by
    its first line) where it is set and plausible, else the process's creation (the interpreter's start and the
    imports count), else now less ``COSTS["process_start"]``."""
    now = time.time() if now is None else now
    try:
        created = psutil.Process().create_time()
    except Exception:  # (a platform without it)
        created = now - COSTS["process_start"]
    given = os.environ.get("BENCHMARK_GPU_T0")
    try:
        t0 = float(given) if given else None
    except ValueError:
        t0 = None
    # A stale value (another call's, or one set in a shell hours ago) is ignored.
    return t0 if t0 is not None and created - 600 <= t0 <= created else created


def device_fault(device: torch.device | None) -> str | None:
    """None if ``device`` still runs work (a synchronize and a tiny kernel read back), else what failed: after an
    illegal address or a failed CUDA-graph capture every later CUDA call fails, and measuring on is pointless."""
    if device is None or device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        value = torch.ones(1, device=device).add_(1).item()
        if value != 2.0:
            return f"a test kernel returned {value}"
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return None


class Recorder:
    """The run's results, written atomically to ``path`` at the start and the end of every measurement; failures
    and skips are recorded too. Every measurement passes the start gate (``fits``): the device is healthy, its
    expected seconds fit before the deadline, and its phase is inside its window."""

    def __init__(
        self,
        path: Path | None,
        meta: dict,
        *,
        t0: float | None = None,
        deadline_s: float = math.inf,
        clock: Callable[[], float] = time.time,
        health: Callable[[], str | None] = lambda: None,
    ):
        self.path, self.clock, self.health = path, clock, health
        self.t0 = clock() if t0 is None else t0
        self.deadline_s = deadline_s
        self.broken: str | None = None
        self.running: list[dict] = []
        self.phase: str | None = None
        self.phase_started, self.window = 0.0, None
        self.data = {
            "meta": meta,
            "errors": [],
            "skipped": [],
            "deadline_s": deadline_s if math.isfinite(deadline_s) else None,
            "timeline": [],
            "running": [],
        }

    def elapsed(self) -> float:
        """Seconds since the process started (or the given ``t0``)."""
        return self.clock() - self.t0

    def left(self) -> float:
        return self.deadline_s - self.elapsed()

    def begin_phase(self, name: str, window: float | None) -> None:
        self.phase, self.phase_started, self.window = name, self.elapsed(), window
        print(
            f"[{self.elapsed():6.1f} s] == phase {name} ("
            + ("no window" if window is None else f"window {window:.0f} s")
            + f", {self.left():.0f} s to the deadline)",
            flush=True,
        )

    def fits(self, section: str, what: str, cost: float | None) -> bool:
        """Whether ``what`` may start now (else it is recorded as skipped, with the reason)."""
        why = None
        if self.broken:
            why = f"device broken: {self.broken}"
        elif cost is not None and cost > self.left():
            why = (
                f"time: expected ~{cost:.0f} s, {max(self.left(), 0):.0f} s left before the deadline at "
                f"{self.deadline_s:.0f} s"
            )
        elif cost is not None and self.window is not None:
            into = self.elapsed() - self.phase_started
            if into >= self.window:
                why = f"time: phase {self.phase}'s window of {self.window:.0f} s is over ({into:.0f} s in)"
        if why is None:
            return True
        self.skip(section, what, why, cost=cost)
        return False

    def add(self, section: str, row: dict) -> dict:
        self.data.setdefault(section, []).append(row)
        self.write()
        return row

    def measure(
        self, section: str, what: str, fn: Callable[[], dict | None], *, cost: float | None = None
    ) -> dict | None:
        """``fn()``'s row, added to ``section``, if it passes the start gate for ``cost`` expected seconds (None: a
        phase, gated only by the device's health); an exception is recorded (and printed), the device's health
        checked, and gives None."""
        if not self.fits(section, what, cost):
            return None
        started = self.elapsed()
        expected = "" if cost is None else f"expected ~{cost:.0f} s, "
        print(
            f"[{started:6.1f} s] > {section}: {what} ({expected}{self.left():.0f} s to the deadline)",
            flush=True,
        )
        event = {"section": section, "what": what, "phase": self.phase, "start_s": round(started, 1)}
        event["expected_s"] = None if cost is None else round(cost, 1)
        self.running.append(event)
        self.write()
        row, failed = None, None
        try:
            row = fn()
        except Exception as error:  # one failed measurement must not end the run
            traceback.print_exc()
            failed = f"{type(error).__name__}: {error}"
            self.data["errors"].append({"section": section, "what": what, "error": failed})
        finally:
            self.running.remove(event)
            try:
                free_memory()
            except Exception:  # (a broken device fails here too: the health check below says so)
                failed = failed or "freeing memory failed"
        seconds = self.elapsed() - started
        if cost is not None:  # (a phase's own entry would only repeat its measurements)
            self.data["timeline"].append({**event, "seconds": round(seconds, 1), "ok": failed is None})
        if failed is not None:
            fault = self.health()
            if fault is not None and not self.broken:
                self.broken = f"after {section}: {what}: {fault}"
                self.data["device_broken"] = {"section": section, "what": what, "fault": fault}
                print(
                    f"[{self.elapsed():6.1f} s] DEVICE BROKEN ({fault}): nothing more is measured", flush=True
                )
            self.write()
            return None
        print(
            f"[{self.elapsed():6.1f} s] {section}: {what} ({seconds:.1f} s"
            + ("" if cost is None else f"; expected {cost:.0f}")
            + ")",
            flush=True,
        )
        if row is None:
            self.write()
            return None
        return self.add(section, row)

    def skip(self, section: str, what: str, why: str, *, cost: float | None = None) -> None:
        entry = {"section": section, "what": what, "why": why, "phase": self.phase}
        if cost is not None:
            entry["expected_s"] = round(cost, 1)
        entry["at_s"] = round(self.elapsed(), 1)
        self.data["skipped"].append(entry)
        print(f"[{self.elapsed():6.1f} s] skipped {section}: {what} ({why})", flush=True)
        self.write()

    def write(self) -> None:
        """The JSON replaced whole (a temporary file renamed over it): a process killed mid-write leaves the last
        complete one."""
        self.data["elapsed_s"] = self.elapsed()
        self.data["running"] = [dict(r) for r in self.running]
        if self.path:
            text = json.dumps(self.data, indent=1)
            temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            temporary.write_text(text)
            os.replace(temporary, self.path)


def start_watchdog(rec: Recorder, hard_stop_s: float | None) -> None:
    """End the process at ``hard_stop_s`` from its start, should a measurement run that far past its estimate:
    the JSON on disk holds every finished measurement and names the one in flight, and the log says so before
    the device's own kill would cut it mid-line."""
    if not hard_stop_s:
        return

    def watch() -> None:
        while (left := hard_stop_s - rec.elapsed()) > 0:
            time.sleep(min(left, 5.0))
        running = "; ".join(f"{r['section']}: {r['what']}" for r in rec.running) or "nothing"
        print(
            f"\n[{rec.elapsed():6.1f} s] HARD STOP at {hard_stop_s:.0f} s, still running {running}. "
            "The JSON holds every finished measurement: rebuild the report with --from.",
            flush=True,
        )
        os._exit(3)

    threading.Thread(target=watch, name="benchmark-watchdog", daemon=True).start()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release_caches(var: nn.Module) -> None:
    """Free the static KV caches compiled sampling keeps for ``var`` (tens of GiB at a large batch), so they do
    not stay beside the next measurement's memory."""
    release_sampling_caches(var)
    free_memory()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


# --- 1. matmul rate ---------------------------------------------------------------------------------------------


def matmul_rate(size: int, *, device: torch.device, reps: int = 20) -> dict:
    """Dense matmul rate of [size x size] @ [size x size] (bf16 on CUDA, float32 elsewhere) on random inputs,
    three pairs rotated so no product reads what the previous one left in cache; ``reps`` products back to back
    between two synchronisations, the median of three such runs (a synchronisation per product would add the
    launch gap to each: a lower ceiling, a higher MFU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(size)
    pairs = [
        (
            torch.randn(size, size, device=device, dtype=dtype, generator=g),
            torch.randn(size, size, device=device, dtype=dtype, generator=g),
        )
        for _ in range(3)
    ]
    calls = iter(range(10**9))

    def product() -> None:
        a, b = pairs[next(calls) % 3]
        torch.mm(a, b)

    def products() -> None:
        for _ in range(reps):
            product()

    seconds = timed(products, steps=3, warmup=1, device=device) / reps
    return {
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
        "ms": 1e3 * seconds,
        "tflops": 2 * size**3 / seconds / 1e12,
    }


def copy_rate(mib: int, *, device: torch.device, reps: int = 20) -> dict:
    """Device memory bandwidth: a copy between two buffers of ``mib`` MiB (random bytes), counting bytes read plus
    bytes written, two pairs rotated."""
    n = mib * 1024**2
    g = torch.Generator(device=device).manual_seed(mib)
    pairs = [
        (
            torch.empty(n, dtype=torch.uint8, device=device),
            torch.randint(0, 256, (n,), dtype=torch.uint8, device=device, generator=g),
        )
        for _ in range(2)
    ]
    calls = iter(range(10**9))

    def copy() -> None:
        dst, src = pairs[next(calls) % 2]
        dst.copy_(src)

    seconds = timed(copy, steps=reps, warmup=3, device=device)
    return {"mib": mib, "ms": 1e3 * seconds, "tb_per_s": 2 * n / seconds / 1e12}


def measure_matmul(rec: Recorder, plan: Plan, device: torch.device) -> None:
    """The two ceilings: the dense matmul rate and the memory bandwidth (a large device-to-device copy)."""
    for size in plan.matmul_sizes:
        rec.measure(
            "matmul",
            f"{size}^3",
            lambda size=size: matmul_rate(size, device=device),
            cost=plan.costs["matmul"],
        )
    rec.measure(
        "bandwidth",
        f"{plan.copy_mib} MiB copy",
        lambda: copy_rate(plan.copy_mib, device=device),
        cost=plan.costs["bandwidth"],
    )
    rates = [r["tflops"] for r in rec.data.get("matmul", [])]
    copies = [r["tb_per_s"] for r in rec.data.get("bandwidth", [])]
    peak = peak_flops_per_second(device)
    rec.data["rates"] = {
        "achievable_tflops": max(rates) if rates else None,
        "datasheet_tflops": None if peak is None else peak / 1e12,
        "bandwidth_tb_per_s": max(copies) if copies else None,
    }
    rec.write()


def _forward_backward(
    fn: Callable, inputs: list[torch.Tensor], upstream: torch.Tensor, *, device: torch.device
):
    """(output, gradients of ``inputs``) of ``fn`` under bf16 autocast, for a float32 upstream gradient. Each call
    copies its inputs into fresh leaves (timed with it, alike for both forms)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = fn(*leaves)
    out.backward(upstream.to(out.dtype))
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def block_op_cases(device: torch.device, *, heads: int, batch: int) -> dict:
    """What a training block computes otherwise than the published code (and peft): {name: (published, ours,
    inputs, upstream)}, on a block's shapes (``heads`` of 64 channels, 680 positions). The residual's "published"
    form is the published order (branch times gamma, then the row's factor, then the sum) with the factor in
    float32, as varsweep computed it before."""
    g = torch.Generator(device=device).manual_seed(0)
    width, L = 64 * heads, 680

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, generator=g).to(dtype)

    q = randn(batch, heads, L, 64, dtype=torch.bfloat16)  # the qkv product's bf16, as under autocast
    gain = torch.rand(1, heads, 1, 1, device=device, generator=g) * 10 + 1
    block = AdaLNSelfAttn(width, heads, mlp_ratio=4.0, drop_path=0.1, attn_l2_norm=True, shared_aln=False)
    factor = torch.tensor([0.0, *[1 / 0.9] * (batch - 1)], device=device)  # one dropped row
    residual = [randn(batch, L, width), randn(batch, L, width, dtype=torch.bfloat16)]
    residual.append(randn(batch, 1, width, dtype=torch.bfloat16))
    # AdaLN's input: the float32 residual stream and a block's bf16 scale and shift (ada_lin's, under autocast).
    adaln = [randn(batch, L, width), *(randn(batch, 1, width, dtype=torch.bfloat16) for _ in range(2))]

    def ln(x):
        return F.layer_norm(x, (width,), eps=LN_EPS)

    # Each layer gets a view of its input leaf: a block's activation is no leaf, and autocast caches the cast of a
    # float32 leaf, which would make peft's two casts one here and not in a block.
    fc2, qkv = (
        lora_layer_pair(i, o, device=device, generator=g) for i, o in ((4 * width, width), (width, 3 * width))
    )

    def called(layer: nn.Module) -> Callable:
        return lambda x: layer(x.view_as(x))

    return {
        # Both end in the dtype the attention takes q and k in (its autocast casts the published float32).
        "keys: F.normalize, then the attention's cast": (
            lambda x: F.normalize(x, dim=-1).to(torch.bfloat16),
            lambda x: unit_vectors(x, dtype=torch.bfloat16),
            [q],
            randn(*q.shape),
        ),
        "queries: F.normalize, then the gain, then the attention's cast": (
            lambda x, a: (F.normalize(x, dim=-1) * a).to(torch.bfloat16),
            lambda x, a: unit_vectors(x, a, dtype=torch.bfloat16),
            [q, gain],
            randn(*q.shape),
        ),
        "residual: x + branch * gamma * drop-path factor": (
            lambda x, h, gamma: x + ((h * gamma) * factor.view(-1, 1, 1)).to(h.dtype),
            lambda x, h, gamma: block._add_branch(x, h, gamma, factor),
            residual,
            randn(batch, L, width),
        ),
        "AdaLN: ln(x) * (1 + scale) + shift, then the product's cast": (
            lambda x, scale, shift: (ln(x) * (1 + scale) + shift).to(torch.bfloat16),
            lambda x, scale, shift: modulate(ln(x), 1 + scale, shift),
            adaln,
            randn(batch, L, width),
        ),
        # The layers ride along: their adapter weights' gradients are compared too.
        "LoRA fc2 (bf16 input): peft's layer": (
            *map(called, fc2),
            [randn(batch, L, 4 * width, dtype=torch.bfloat16)],
            randn(batch, L, width),
            fc2,
        ),
        "LoRA mat_qkv (float32 input): peft's layer": (
            *map(called, qkv),
            [randn(batch, L, width)],
            randn(batch, L, 3 * width),
            qkv,
        ),
    }


def lora_layer_pair(
    in_features: int, out_features: int, *, device: torch.device, generator: torch.Generator
) -> tuple[nn.Module, nn.Module]:
    """peft's own LoRA linear layer and varsweep's (``trainables.methods.LoraLinear``) at the trials' rank 16 and
    alpha 32, on the same frozen base weights and a non-zero B (a trained adapter, not the zero start)."""
    base = nn.Linear(in_features, out_features, device=device).requires_grad_(False)
    config = peft.LoraConfig(r=16, lora_alpha=32)
    published = peft.tuners.lora.layer.Linear(base, "default", config=config, r=16, lora_alpha=32)
    nn.init.normal_(published.lora_B["default"].weight, std=0.02, generator=generator)
    ours = LoraLinear(copy.deepcopy(base), "default", config=config, r=16, lora_alpha=32)
    ours.load_state_dict(published.state_dict())
    return published, ours


def block_op_row(name: str, case: tuple, *, steps: int, device: torch.device) -> dict:
    """Both forms of one operation timed side by side, with their outputs' and input gradients' largest relative
    differences; where the case carries the two modules, their trainable weights' gradients' too (from the
    first call, before the timed ones accumulate into them)."""
    published, ours, inputs, upstream, *modules = case
    results = [_forward_backward(fn, inputs, upstream, device=device) for fn in (published, ours)]
    (out_p, grads_p), (out_o, grads_o) = results

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    weights = {}
    for pair in modules:
        trained = [[p.grad for p in module.parameters() if p.requires_grad] for module in pair]
        weights["weight_gradient_diff"] = max(relative(o, p) for p, o in zip(*trained, strict=True))

    times = [
        timed(
            lambda fn=fn: _forward_backward(fn, inputs, upstream, device=device), steps=steps, device=device
        )
        for fn in (published, ours)
    ]
    return {
        "what": name,
        "published_ms": 1e3 * times[0],
        "ours_ms": 1e3 * times[1],
        "ratio": times[1] / times[0],
        "dtypes": [str(out_p.dtype).removeprefix("torch."), str(out_o.dtype).removeprefix("torch.")],
        "output_diff": relative(out_o, out_p),
        "gradient_diff": max(relative(o, p) for o, p in zip(grads_o, grads_p, strict=True)),
        **weights,
    }


def decode_op_cases(device: torch.device, *, channels: int, batch: int) -> dict:
    """The decoder's pieces that sampling runs in the map's dtype (``trainables.models.vqvae``: no autograd, under
    autocast) against the forms it ran before, which CUDA autocast runs in float32, each followed by the next
    convolution's cast: {name: (before, ours, the precision autocast gives the piece before, a bf16 map)}, on the
    full-resolution level's maps (``channels``, 256 x 256; upsampling's input 128 x 128)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, channels, 256, 256, device=device, generator=g).to(torch.bfloat16)
    norm = nn.GroupNorm(32, channels, eps=1e-6).to(device)
    nn.init.normal_(norm.weight, 1.0, 0.1, generator=g)
    nn.init.normal_(norm.bias, 0.0, 0.1, generator=g)

    def upsampled(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, scale_factor=2, mode="nearest")

    return {
        "decoder norm + SiLU, then the convolution's cast": (
            lambda t: F.silu(norm(t), inplace=True).to(torch.bfloat16),
            lambda t: vqvae_module._norm_silu(norm, t),
            lambda t: norm(t).dtype,
            x,
        ),
        "decoder nearest upsampling, then the convolution's cast": (
            lambda t: upsampled(t).to(torch.bfloat16),
            vqvae_module._upsampled,
            lambda t: upsampled(t).dtype,
            x[:, :, :128, :128].contiguous(),
        ),
    }


def decode_op_row(name: str, case: tuple, *, steps: int, device: torch.device) -> dict:
    """Both forms of a decoder piece timed side by side (forward, no autograd, bf16 autocast) with the dtype the
    earlier form's piece had (CUDA autocast: float32) and their outputs' largest difference relative to the
    largest entry."""
    before, ours, before_dtype, x = case

    def run(fn):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(x)

    out_before, out_ours, dtype = run(before), run(ours), run(before_dtype)
    times = [timed(lambda fn=fn: run(fn), steps=steps, device=device) for fn in (before, ours)]
    difference = (out_ours.float() - out_before.float()).abs().max() / out_before.float().abs().max()
    return {
        "what": name,
        "published_ms": 1e3 * times[0],
        "ours_ms": 1e3 * times[1],
        "ratio": times[1] / times[0],
        "dtypes": [str(dtype).removeprefix("torch."), str(out_ours.dtype).removeprefix("torch.")],
        "output_diff": difference.item(),
    }


def measure_block_ops(rec: Recorder, plan: Plan, device: torch.device) -> None:
    """varsweep's forms of a block's element-wise pieces against the published forms, forward and backward side by
    side at the first depth and batch, then the decoder's pieces against their float32 forms: the CPU suite checks
    their values, this their time and CUDA's dtypes."""
    heads, cost = plan.depths[0], plan.costs["block_op"]
    if not rec.fits("block_ops", "the block's pieces", cost):
        return
    for name, case in block_op_cases(device, heads=heads, batch=plan.batches[0]).items():
        rec.measure(
            "block_ops",
            name,
            lambda name=name, case=case: block_op_row(name, case, steps=plan.steps * 4, device=device),
            cost=cost,
        )
    if not rec.fits("decode_ops", "the decoder's pieces", cost):
        return
    cases = decode_op_cases(device, channels=plan.vqvae_channels, batch=plan.batches[0])
    for name, case in cases.items():
        rec.measure(
            "decode_ops",
            name,
            lambda name=name, case=case: decode_op_row(name, case, steps=plan.steps * 4, device=device),
            cost=cost,
        )


# --- 2. training ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One training configuration."""

    depth: int
    method: str
    kernel: str
    fused: bool
    batch: int
    compiled: bool = False
    frozen_bf16: bool = False

    def label(self) -> str:
        return (
            f"d{self.depth} {self.method} {self.kernel} fused={self.fused} compiled={self.compiled} "
            f"batch={self.batch} frozen_bf16={self.frozen_bf16}"
        )


class Models:
    """The official-layout VQVAE and a pristine VAR per depth (random weights, seed 0), built once and copied. Every
    depth stays built (the VAR on the CPU: 3.5 GiB for d16 and d20): the phases go d16, d20, d16, d20, and each
    rebuild cost 3-7 s of device time."""

    def __init__(self, device: torch.device, *, vqvae_channels: int):
        self.device, self.vqvae_channels, self._cache = device, vqvae_channels, {}

    def built(self, depth: int) -> bool:
        return depth in self._cache

    def base(self, depth: int) -> tuple[nn.Module, nn.Module]:
        if depth not in self._cache:
            free_memory()
            vqvae, var = official_models(depth=depth, vqvae_channels=self.vqvae_channels)
            self._cache[depth] = (vqvae.to(self.device), var)
        return self._cache[depth]

    def adapted(self, depth: int, method: str) -> tuple[nn.Module, nn.Module]:
        """(VQVAE, a fresh copy of the base VAR on the device, adapted with ``method`` for CLASSES classes)."""
        vqvae, var = self.base(depth)
        var = copy.deepcopy(var).to(self.device)
        if method != "base":
            adapt(var, MethodConfig(name=method), num_classes=CLASSES, seed=0)
            var.train()
        return vqvae, var


# --- expected costs (the start gate's) ---------------------------------------------------------------------------

# What is compiled now (cleared by ``fresh_compile_state``, which forgets every graph): the batch sizes whose ten
# scale graphs compiled sampling holds, and whether FlexAttention's kernels are compiled.
# What this process has compiled: sampling graphs per batch size, FlexAttention's kernel per depth (its head count
# and width are in the compiled kernel's shapes, so d20 compiles anew after d16).
_COMPILED = {"sampling_batches": set(), "flex": set()}


def build_cost(plan: Plan, models: Models, depth: int) -> float:
    """Seconds to build ``depth``'s models first (0 once built)."""
    return 0.0 if models.built(depth) else plan.costs["build_d16"] * depth / 16


def step_seconds(rec: Recorder, plan: Plan, depth: int, method: str, batch: int) -> float:
    """A training step's expected seconds: from the eager row measured nearest in batch size (its method's, its
    depth's where measured), scaled by the batch and by the useful FLOPs per row; else the table's d16 step."""
    eager = [r for r in rec.data.get("training", []) if not r["compiled"]]
    rows = [r for r in eager if r["method"] == method] or eager
    rows = [r for r in rows if r["depth"] == depth] or rows
    if rows:
        near = min(rows, key=lambda r: abs(math.log(batch / r["batch"])))
        per_flop = near["step_ms"] / 1e3 / near["batch"] / useful_flops_per_row(near["depth"], near["method"])
    else:
        per_flop = plan.costs["training_step_d16_b16"] / 16 / useful_flops_per_row(16, "full")
    return per_flop * useful_flops_per_row(depth, method) * batch


def training_cost(rec: Recorder, plan: Plan, models: Models, s: Setting, *, compile: bool = False) -> float:
    """Expected seconds of a training row of ``s``: its model's build (first), the setup, warm-up and timed steps
    (another kernel than the trials': 1.5x), a compile where ``compile`` (``compile_blocks``) or FlexAttention's
    first."""
    step = step_seconds(rec, plan, s.depth, s.method, s.batch) * (
        1.0 if s.kernel == AUTO_ATTENTION_KERNEL else 1.5
    )
    cost = (
        build_cost(plan, models, s.depth) + plan.costs["training_setup"] + (plan.warmup + plan.steps) * step
    )
    if compile:
        cost += plan.costs["compile_training"]
    if s.kernel == "flex" and models.device.type == "cuda" and s.depth not in _COMPILED["flex"]:
        cost += plan.costs["flex"]
    return cost


def profile_cost(plan: Plan, step: float) -> float:
    """A profile of ``profile_steps`` calls of ``step`` seconds (after one untimed; the profiler's own overhead
    and its tables: ~3x)."""
    return plan.costs["profile_setup"] + (1 + 3 * plan.profile_steps) * step


def dp_cost(
    rec: Recorder,
    plan: Plan,
    models: Models,
    depth: int,
    method: str,
    k: int,
    clipping: str | None,
    precision: str,
) -> float:
    """Expected seconds of a privacy row: the non-DP step on its rows (measured, else from the training rows;
    float32 2x), times the table's factor for its clipping, plus the setup."""
    wanted = "bf16 autocast" if precision == "bf16" else "float32"
    base = next(
        (
            r["step_ms"] / 1e3
            for r in rec.data.get("privacy", [])
            if (r["depth"], r["method"], r["k"], r["clipping"], r["precision"])
            == (depth, method, k, None, wanted)
        ),
        None,
    )
    if base is None:
        forwards = dp_examples(k=k, rows=plan.dp_rows) * k / plan.dp_rows  # more than one where k > rows
        base = (
            step_seconds(rec, plan, depth, method, plan.dp_rows)
            * forwards
            * (1.0 if precision == "bf16" else 2.0)
        )
    name, _ = split_clipping(clipping)
    factor = {None: 1.0, "bookkeeping": plan.costs["dp_factor"]}.get(name, plan.costs["opacus_factor"])
    if name == "bookkeeping" and k > plan.dp_rows:  # the split route: plain backwards, a norm per example
        factor = plan.costs["dp_split_factor"]
    setup = plan.costs["training_setup"] + (plan.costs["dp_setup"] if name else 0.0)
    return build_cost(plan, models, depth) + setup + (plan.warmup + plan.steps) * base * factor


def sampling_rate(rec: Recorder, plan: Plan, depth: int, batch: int) -> float:
    """Expected eager images/s at ``batch``: the eager generation row nearest in batch size, else the table's
    (d16; scaled with depth)."""
    rows = [r for r in rec.data.get("generation", []) if not r["compiled"] and r["depth"] == depth]
    if rows:
        return min(rows, key=lambda r: abs(math.log(batch / r["batch"])))["images_per_s"]
    return plan.costs["generation_images_per_s"] * 16 / depth


def sampling_compile_cost(plan: Plan, depth: int, batch: int) -> float:
    """Compiled sampling's ten scale graphs at ``batch`` (0 when compiled already in this dynamo state)."""
    if batch in _COMPILED["sampling_batches"]:
        return 0.0
    return SCALES * plan.costs["compile_sampling_scale"] * depth / 16


def generation_cost(
    rec: Recorder, plan: Plan, models: Models, depth: int, batch: int, *, compiled: bool
) -> float:
    calls = 1 + plan.generation_steps + (COMPILED_WARM_CALLS if compiled else 0)
    cost = build_cost(plan, models, depth) + plan.costs["generation_setup"]
    cost += calls * batch / sampling_rate(rec, plan, depth, batch)  # compiled: at the eager rate, to be safe
    return cost + (sampling_compile_cost(plan, depth, batch) if compiled else 0.0)


def evaluation_cost(
    rec: Recorder,
    plan: Plan,
    models: Models,
    *,
    depth: int,
    batch: int,
    compiled: bool,
    images: int,
    png: bool,
) -> float:
    draws = -(-images // batch) + (1 + COMPILED_WARM_CALLS if compiled else 0)
    cost = build_cost(plan, models, depth) + plan.costs["generation_setup"] + plan.costs["inception_setup"]
    cost += draws * batch / sampling_rate(rec, plan, depth, batch)
    cost += images / plan.costs["inception_images_per_s"] + (
        images / plan.costs["png_images_per_s"] if png else 0
    )
    return cost + (sampling_compile_cost(plan, depth, batch) if compiled else 0.0)


def store_frozen_linear_weights_in_bf16(var: nn.Module) -> int:
    """Store the frozen weights (and biases) of every linear layer in bf16, so bf16 autocast stops casting them
    on every forward (it caches casts of trainable leaves only); returns how many layers. A lever measured
    here only: trials keep float32 weights, and LoRA's layers keep their bf16 cast between steps instead
    (``LoraLinear._base_output``), so beside them this row measures the frozen layers LoRA does not wrap and
    the memory of the float32 copies."""
    count = 0
    for module in var.modules():
        if isinstance(module, nn.Linear) and not module.weight.requires_grad:
            for p in (module.weight, module.bias):
                if p is not None and not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
            count += 1
    return count


def token_batch(var: nn.Module, batch: int, *, k: int = 1, device: torch.device):
    """(labels [B], token maps per scale [B, k, pn*pn]): random, as the token cache would hand them over."""
    labels_B = torch.randint(0, CLASSES, (batch,), device=device)
    idx = [torch.randint(0, VOCAB, (batch, k, pn * pn), device=device) for pn in var.patch_nums]
    return labels_B, idx


def train_step_fn(var, vqvae, optimizer, labels_B, idx, *, device: torch.device, autocast_any: bool = False):
    """One AdamW step on a batch. ``autocast_any``: bf16 autocast on a CPU too (the frozen-bf16 lever needs it)."""
    ctx = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if autocast_any
        else (lambda: bf16_autocast(device))
    )

    def step() -> None:
        with ctx():
            loss = view_losses(var, vqvae, labels_B, idx, class_dropout=0.1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def useful_flops_per_row(depth: int, method: str) -> float:
    """MFU's numerator per row: model FLOPs, attention over the visible pairs and its backward twice its forward
    (a flash kernel's recomputation of the scores is work, not model FLOPs)."""
    return training_flops_per_row(
        VarShape.official(depth), method, attention_backward=USEFUL_ATTENTION_BACKWARD
    )


def training_row(rec: Recorder, s: Setting, *, seconds: float, device: torch.device) -> dict:
    useful = useful_flops_per_row(s.depth, s.method) * s.batch
    rates = rec.data.get("rates", {})
    measured, datasheet = rates.get("achievable_tflops"), rates.get("datasheet_tflops")
    return {
        **asdict(s),
        "precision": "bf16 autocast",
        "step_ms": 1e3 * seconds,
        "images_per_s": s.batch / seconds,
        "peak_gib": peak_gib(device),
        "useful_tflop_per_step": useful / 1e12,
        "mfu_measured": useful / seconds / (measured * 1e12) if measured else None,
        "mfu_datasheet": useful / seconds / (datasheet * 1e12) if datasheet else None,
    }


def training_step(models: Models, s: Setting, *, var=None, vqvae=None) -> Callable[[], None]:
    """One training step of setting ``s`` on a fresh adapted model (or on ``var``, e.g. one compiled already)."""
    device = models.device
    vqvae, var = models.adapted(s.depth, s.method) if var is None else (vqvae, var)
    var.attention_kernel = s.kernel
    if s.frozen_bf16:
        store_frozen_linear_weights_in_bf16(var)
    optimizer = build_optimizer(var, lr=1e-4, fused=s.fused)
    labels_B, idx = token_batch(var, s.batch, device=device)
    return train_step_fn(var, vqvae, optimizer, labels_B, idx, device=device, autocast_any=s.frozen_bf16)


def measure_setting(
    rec: Recorder,
    plan: Plan,
    models: Models,
    s: Setting,
    *,
    var=None,
    vqvae=None,
    profile: bool = False,
    cost: float | None = None,
) -> dict | None:
    """Time ``s`` on a fresh adapted model (or on ``var``) if ``cost`` (default: ``training_cost``) fits;
    ``profile``: then profile the same step (phase 9's tables)."""
    device = models.device
    cost = training_cost(rec, plan, models, s) if cost is None else cost

    def run() -> dict:
        step = training_step(models, s, var=var, vqvae=vqvae)
        reset_peak(device)
        seconds = timed(step, steps=plan.steps, warmup=plan.warmup, device=device)
        row = training_row(rec, s, seconds=seconds, device=device)
        if s.kernel == "flex":
            _COMPILED["flex"].add(s.depth)
        if profile:
            rec.measure(
                "profiles",
                f"training {s.label()}",
                lambda: profile_row(f"training {s.label()}", step, plan, device),
                cost=profile_cost(plan, seconds),
            )
        return row

    return rec.measure("training", s.label(), run, cost=cost)


def fastest(rows: list[dict], **match) -> dict | None:
    rows = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return max(rows, key=lambda r: r["images_per_s"], default=None)


def _training_rows(rec: Recorder, depth: int, method: str) -> list[dict]:
    return [r for r in rec.data.get("training", []) if r["depth"] == depth and r["method"] == method]


def _first_row(rec: Recorder, depth: int, method: str) -> dict | None:
    """The first row of a depth and method: the trials' setting at the first batch, every option's reference."""
    return next(iter(_training_rows(rec, depth, method)), None)


def measure_training_targets(rec: Recorder, plan: Plan, models: Models, depth: int) -> None:
    """The targets' ladder: per method (full fine-tuning, then LoRA), the setting trials run (their attention
    kernel, fused AdamW, bf16 autocast) from the first batch size up until one fails (out of memory, or out of
    time: larger batches would not fit either)."""
    for method in ("full", "lora"):
        for batch in plan.batches:
            setting = Setting(depth, method, AUTO_ATTENTION_KERNEL, True, batch)
            if measure_setting(rec, plan, models, setting) is None:
                break


def measure_training_options(rec: Recorder, plan: Plan, models: Models, depth: int) -> None:
    """The levers beside each method's first row (same batch): fused AdamW off, the other attention kernels except
    FlexAttention (it compiles: the last phase); then LoRA's frozen base weights in bf16 at its fastest setting."""
    for method in ("full", "lora"):
        first = _first_row(rec, depth, method)
        if first is None:
            continue
        measure_setting(rec, plan, models, replace(_setting(first), fused=False))
        for kernel in plan.kernels:
            if kernel not in (AUTO_ATTENTION_KERNEL, "flex"):
                measure_setting(rec, plan, models, replace(_setting(first), kernel=kernel))
    best = fastest(_training_rows(rec, depth, "lora"), compiled=False, frozen_bf16=False)
    if best is not None:
        measure_setting(rec, plan, models, replace(_setting(best), frozen_bf16=True))


def measure_flex(rec: Recorder, plan: Plan, models: Models, depth: int) -> None:
    """FlexAttention beside each method's first row: compiled on CUDA at its first use (tens of seconds)."""
    if "flex" not in plan.kernels:
        return
    for method in ("full", "lora"):
        first = _first_row(rec, depth, method)
        if first is not None:
            measure_setting(rec, plan, models, replace(_setting(first), kernel="flex"))


def host_waits(fn: Callable[[], object], *, device: torch.device) -> tuple[object, dict | None]:
    """(``fn()``, where the host waited for the GPU during it: {"file:line": times}) with CUDA's sync debug mode
    warning at every implicit wait (a device value read back, a blocking copy; an explicit ``synchronize`` is not
    one); (``fn()``, None) on another device."""
    if device.type != "cuda":
        return fn(), None
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    waits = Counter(
        f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()
    )
    return result, dict(waits)


def trial_loop_row(
    models: Models, s: Setting, *, steps: int, bare_images_per_s: float, privacy: PrivacyConfig | None = None
) -> dict:
    """A trial's own training loop (``finetune``: its token views on the host, the keyed draws, the transfers, the
    schedule, fused AdamW, the meter; without DP global clipping at 2.0, under DP ``privacy``'s Poisson batches of
    ``s.batch`` expected examples, clipping, noise and accounting) for 1 + ``steps`` steps, on random token maps of
    Oxford Flowers' 1,020 training images; timed between its first step (the FLOP-counting one) and its last (the
    log's clock, after the logged values have waited for the GPU), beside the bare step's ``bare_images_per_s`` at
    the same setting: what a trial gets of the rate the dry-run estimate is built from."""
    vqvae, var = models.adapted(s.depth, s.method)
    data = benchmark_common.flowers_token_views()
    logged = []  # the clock at the first and the last step: the only two it logs
    out, waits = host_waits(
        lambda: finetune(
            var,
            vqvae,
            data,
            optimization=OptimizationConfig(steps=1 + steps, batch_size=s.batch),
            method=MethodConfig(name=s.method),
            plan=RunPlan(planned_steps=1 + steps, log_every=1 + steps),
            privacy=privacy,
            resources=ResourcesConfig(attention_kernel=s.kernel),
            log=lambda entry: logged.append(time.perf_counter()),
        ),
        device=models.device,
    )
    images_per_s = steps * s.batch / (logged[-1] - logged[0])  # under DP: the expected batch, as the ledger
    return {
        **asdict(s),
        "clipping": None if privacy is None else privacy.clipping,
        "k": 1 if privacy is None else privacy.augmentation_multiplicity,
        "precision": "bf16 autocast",  # the trial's default autocast_bf16, as the bare step's rows
        "steps": steps,
        "loop_images_per_s": images_per_s,
        "step_images_per_s": bare_images_per_s,
        "loop_vs_step": images_per_s / bare_images_per_s,
        "meter_rows_per_s": out["compute"]["rows_per_second"],
        "host_waits": waits,  # the two logged steps' values read back, and nothing per step, if the loop holds
    }


def measure_dp_trial_loop(rec: Recorder, plan: Plan, models: Models) -> None:
    """DP-LoRA's loop (book-keeping, k = 1, ``dp_rows`` expected examples, epsilon 8) beside its bare DP step."""
    depth = plan.depths[0]
    bare = next(
        (
            r
            for r in rec.data.get("privacy", [])
            if (r["depth"], r["method"], r["k"], r["clipping"], r["route"])
            == (depth, "lora", 1, "bookkeeping", "auto")
            and r["precision"] == "bf16 autocast"
        ),
        None,
    )
    if bare is None:
        return
    setting = Setting(depth, "lora", DP_KERNEL, fused=True, batch=plan.dp_rows)
    privacy = PrivacyConfig(
        target_epsilon=8.0,
        sampling_rate=plan.dp_rows / benchmark_common.FLOWERS_TRAIN_IMAGES,
        max_grad_norm=1.0,
        clipping="bookkeeping",
    )
    cost = build_cost(plan, models, depth) + plan.costs["trial_loop_setup"]
    cost += (1 + plan.loop_steps) * bare["step_ms"] / 1e3
    rec.measure(
        "trial_loops",
        f"{setting.label()} DP",
        lambda: trial_loop_row(
            models, setting, steps=plan.loop_steps, bare_images_per_s=bare["rows_per_s"], privacy=privacy
        ),
        cost=cost,
    )


def measure_trial_loops(rec: Recorder, plan: Plan, models: Models, depth: int) -> None:
    """Per method, a trial's loop at the fastest eager setting trials run (their kernel, fused AdamW)."""
    for method in ("full", "lora"):
        best = fastest(
            rec.data.get("training", []),
            depth=depth,
            method=method,
            kernel=AUTO_ATTENTION_KERNEL,
            fused=True,
            compiled=False,
            frozen_bf16=False,
        )
        if best is None:
            continue
        setting = _setting(best)
        cost = build_cost(plan, models, depth) + plan.costs["trial_loop_setup"]
        cost += (1 + plan.loop_steps) * best["step_ms"] / 1e3
        rec.measure(
            "trial_loops",
            setting.label(),
            lambda setting=setting, best=best: trial_loop_row(
                models, setting, steps=plan.loop_steps, bare_images_per_s=best["images_per_s"]
            ),
            cost=cost,
        )


def _setting(row: dict) -> Setting:
    return Setting(**{k: row[k] for k in Setting.__dataclass_fields__})


def fresh_compile_state() -> None:
    """Forget every compiled graph: the blocks of all models share one code object (``AdaLNSelfAttn.forward``),
    so graphs of an earlier model or batch size count toward dynamo's recompile limit (past it, blocks run eager in
    a row labelled compiled) and a second batch size recompiles with a dynamic batch dimension, which trials at a
    fixed batch never run."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _COMPILED["sampling_batches"].clear()
    _COMPILED["flex"].clear()


def compile_counters() -> dict:
    """What dynamo and inductor did since ``fresh_compile_state``: graphs compiled and CUDA graphs skipped."""
    counters = torch._dynamo.utils.counters
    return {
        "dynamo_graphs": counters["stats"]["unique_graphs"],
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }


def measure_training_compiled(rec: Recorder, plan: Plan, models: Models, depth: int, *, which: str) -> None:
    """``compile_blocks`` on each method's fastest eager setting, at its batch (``which`` "best") or at the first
    batch (``which`` "base", the full plan's option), compiled afresh on a fresh model (``fresh_compile_state``).
    The first depth's best batch is profiled while compiled (no second compile)."""
    if not plan.compile:
        if which == "best":
            cpu = models.device.type != "cuda"
            why = "not on this device (inductor's CPU compile is for GPU runs)" if cpu else "--quick"
            rec.skip("training", f"d{depth} compile_blocks", why)
        return
    if which == "base" and plan.compile_batches != "base and best":
        return
    for method in ("full", "lora"):
        best = fastest(
            rec.data.get("training", []), depth=depth, method=method, compiled=False, frozen_bf16=False
        )
        if best is None:
            continue
        batch = best["batch"] if which == "best" else plan.batches[0]
        if which == "base" and batch == best["batch"]:
            continue  # measured as the best
        setting = replace(_setting(best), batch=batch, compiled=True)
        profile = which == "best" and depth == plan.depths[0]
        cost = training_cost(rec, plan, models, setting, compile=True)
        if profile:
            cost += profile_cost(plan, step_seconds(rec, plan, depth, method, batch))
        if not rec.fits("training", setting.label(), cost):
            continue
        fresh_compile_state()
        vqvae, var = models.adapted(depth, method)
        compile_blocks(var)
        row = measure_setting(rec, plan, models, setting, var=var, vqvae=vqvae, profile=profile, cost=cost)
        if row is not None:
            row.update(compile_counters())
            rec.write()
        del var
        free_memory()


# --- 3. DP-SGD --------------------------------------------------------------------------------------------------


def split_clipping(clipping: str | None) -> tuple[str | None, str | None]:
    """(clipping, book-keeping's linear routes) of a plan entry: "bookkeeping:gram" -> ("bookkeeping", "gram"),
    "bookkeeping" -> ("bookkeeping", "auto"), "hooks" -> ("hooks", None), None (no DP) -> (None, None)."""
    name, _, route = (clipping or "").partition(":")
    return name or None, (route or "auto") if name == "bookkeeping" else None


def dp_examples(*, k: int, rows: int) -> int:
    """Examples of a privacy row's step at ``rows`` rows per forward: rows // k, or one whose k views take several
    forwards where k > rows."""
    return max(1, rows // k)


def dp_step(var, vqvae, *, clipping: str | None, k: int, rows: int, bf16: bool, device: torch.device):
    """One step on ``dp_examples`` examples of k views in forwards of ``rows`` rows (k > rows: one example, its
    views in forwards of ``rows``, as trials spread them), DP with ``clipping`` (None: the non-DP step on the same
    rows in the same forwards; "bookkeeping:gram": book-keeping with every linear layer's norms through Gram
    matrices, where trials choose per layer), under bf16 autocast or (``bf16`` False: ghost clipping, as trials run
    it) in float32."""
    clipping, route = split_clipping(clipping)
    examples = dp_examples(k=k, rows=rows)
    optimizer = build_optimizer(var, lr=1e-4)
    label_N, tokens = token_batch(var, examples, k=k, device=device)

    def loss_fn(part: torch.Tensor, *, views: slice = slice(None)) -> torch.Tensor:
        with bf16_autocast(device, enabled=bf16):
            idx = [t[part][:, views] for t in tokens]
            return view_losses(var, vqvae, label_N[part], idx, class_dropout=0.1)

    everyone = torch.arange(examples, device=device)
    if clipping is None:
        forwards = [slice(start, start + rows) for start in range(0, k, rows)] if k > rows else [slice(None)]

        def plain() -> None:
            optimizer.zero_grad(set_to_none=True)
            for views in forwards:  # the mean over all examples x k views, accumulated
                (loss_fn(everyone, views=views).sum() / (examples * k)).backward()
            optimizer.step()

        return plain
    dataset = 64 * examples
    privacy = PrivacyConfig(
        target_epsilon=10.0,
        sampling_rate=examples / dataset,
        max_grad_norm=0.5,
        augmentation_multiplicity=k,
        clipping=clipping,
    )
    state = make_private(
        var,
        optimizer,
        privacy=privacy,
        resources=ResourcesConfig(rows_per_forward=rows),
        dataset_size=dataset,
        planned_steps=1000,
    )
    if route not in (None, "auto"):
        state.module.linear_route = route
    return lambda: private_step(state, everyone, loss_fn)


def norm_errors(device: torch.device, dtype: torch.dtype, *, examples: int = 4) -> dict:
    """Largest relative error of book-keeping's squared per-example norms of a VAR-d16 qkv layer (1024 -> 3072, 680
    positions) against float64, per route, as this device computes them (on CUDA: one-pass reductions and float32-
    output products, which the CPU suite cannot run). A kept gradient's norm is checked against its stored values;
    its clipped sum, added into noise by one float32-output product, against float64."""
    from trainables import bookkeeping

    g = torch.Generator(device=device).manual_seed(0)
    a_BTi = torch.randn(examples, 680, 1024, device=device, generator=g).to(dtype)
    g_BTo = torch.randn(examples, 680, 3072, device=device, generator=g).to(dtype)
    exact_B = (g_BTo.double().transpose(1, 2) @ a_BTi.double()).square().sum((1, 2))

    def error(got_B: torch.Tensor, want_B: torch.Tensor) -> float:
        return ((got_B.double() - want_B).abs() / want_B).max().item()

    kept_sq_B, kept_Boi = bookkeeping._direct_norms(
        a_BTi, g_BTo, 1, keep_as=bookkeeping._kept_dtype(a_BTi, g_BTo)
    )
    c_B = torch.rand(examples, device=device, generator=g)
    weights_B = bookkeeping.bfloat16_toward_zero(c_B) if kept_Boi.dtype == torch.bfloat16 else c_B
    noise_oi = torch.randn(kept_Boi.shape[1:], device=device, generator=g)
    noised_oi = noise_oi.clone()
    bookkeeping.add_term(noised_oi, bookkeeping.WeightedRows(weights_B, kept_Boi), alpha=0.5)
    clipped_oi = 0.5 * torch.einsum("b,boi->oi", weights_B.double(), kept_Boi.double())
    want_oi = noise_oi.double() + clipped_oi
    # ``formed`` (no noise: ranks > 0) writes over an uninitialised output with beta 0: its content must not count
    over_nan_oi = torch.full_like(noise_oi, float("nan"))
    bookkeeping._weighted_rows_into(
        over_nan_oi, bookkeeping.WeightedRows(weights_B, kept_Boi), alpha=0.5, beta=0.0
    )
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "gram": error(bookkeeping._gram_norms(a_BTi, g_BTo, 1), exact_B),
        "direct": error(bookkeeping._direct_norms(a_BTi, g_BTo, 1, keep_as=None)[0], exact_B),
        "direct_kept": error(kept_sq_B, kept_Boi.double().square().sum((1, 2))),
        "noised_sum": ((noised_oi.double() - want_oi).norm() / want_oi.norm()).item(),
        "sum_over_nan": ((over_nan_oi.double() - clipped_oi).norm() / clipped_oi.norm()).item(),
        "float32_output_products": _float32_output(device),
    }


def _float32_output(device: torch.device) -> bool:
    """Whether book-keeping's products write float32 from bf16 operands on this device (else they upcast first)."""
    from trainables import bookkeeping

    return bookkeeping.NATIVE_FLOAT32_OUTPUT.get(device.type, False)


def privacy_schedule(plan: Plan) -> dict[str, list[tuple[int, str, int, str | None, str]]]:
    """(depth, method, k, clipping, precision) in the order measured, by phase. "targets" (phase 3): the non-DP
    step and book-keeping (as trials run it) for every configuration of the first depth. "more_depths" (phase 8):
    full fine-tuning at k = 1 at each further depth (the one setting whose routes change with the width: VAR-d20's
    per-example gradients are 1.4-1.5x their a and g). "options" (phase 10): first a k larger than the rows per
    forward (k = 128: one example's views in several forwards, not a target of the issue), then Gram routes,
    Opacus's ghost clipping (float32, as trials run it, beside a float32 non-DP step) and hooks."""
    first = plan.depths[0]
    configs = [(first, method, k) for method, k in plan.dp_configs]
    pairs = [(*config, clipping, "bf16") for config in configs for clipping in (None, "bookkeeping")]
    targets = [pair for pair in pairs if pair[2] <= plan.dp_rows]
    split = [pair for pair in pairs if pair[2] > plan.dp_rows]  # not a target: k = 128's memory and time
    more = [
        (depth, "full", 1, clipping, "bf16")
        for depth in plan.depths[1:]
        if ("full", 1) in plan.dp_configs
        for clipping in (None, "bookkeeping")
    ]
    options = split
    for config in configs:
        k = config[2]
        for clipping in plan.dp_clippings:
            # Opacus's ghost clipping takes one view per example; Gram matrices of k x 680 rows are absurd; Opacus's
            # hooks need an example's k views in one forward.
            if clipping == "bookkeeping" or (k > 1 and clipping in ("ghost", "bookkeeping:gram")):
                continue
            if clipping == "hooks" and k > plan.dp_rows:
                continue
            if clipping == "ghost":
                options += [(*config, None, "float32"), (*config, "ghost", "float32")]
            else:
                options.append((*config, clipping, "bf16"))
    return {"targets": targets, "more_depths": more, "options": options}


def _non_dp_row(rec: Recorder, row: dict) -> dict | None:
    """The non-DP row of ``row``'s depth, method, k and precision, if measured."""
    same = ("depth", "method", "k", "precision")
    return next(
        (
            r
            for r in rec.data.get("privacy", [])
            if r["clipping"] is None and all(r[f] == row[f] for f in same)
        ),
        None,
    )


def measure_norm_accuracy(rec: Recorder, plan: Plan, models: Models) -> None:
    for dtype in (torch.bfloat16, torch.float32):
        rec.measure(
            "norm_accuracy",
            str(dtype),
            lambda dtype=dtype: norm_errors(models.device, dtype),
            cost=plan.costs["norm_accuracy"],
        )


def measure_privacy(rec: Recorder, plan: Plan, models: Models, schedule: list[tuple]) -> None:
    """The DP rows of ``schedule`` (a part of ``privacy_schedule``), each with its time and memory against the
    non-DP row of its depth, method, k and precision where measured."""
    device = models.device
    for depth, method, k, clipping, precision in schedule:
        name = f"d{depth} {method} k={k} {clipping or 'no DP'} {precision}"

        def run(clipping=clipping, method=method, k=k, depth=depth, precision=precision) -> dict:
            vqvae, var = models.adapted(depth, method)
            var.attention_kernel = DP_KERNEL
            bf16 = precision == "bf16"
            step = dp_step(var, vqvae, clipping=clipping, k=k, rows=plan.dp_rows, bf16=bf16, device=device)
            reset_peak(device)
            seconds = timed(step, steps=plan.steps, warmup=plan.warmup, device=device)
            examples = dp_examples(k=k, rows=plan.dp_rows)
            return {
                "depth": depth,
                "method": method,
                "k": k,
                "rows": examples * k,
                "rows_per_forward": plan.dp_rows,
                "examples": examples,
                **dict(zip(("clipping", "route"), split_clipping(clipping), strict=True)),
                "kernel": DP_KERNEL,
                "precision": "bf16 autocast" if bf16 else "float32",
                "step_ms": 1e3 * seconds,
                "rows_per_s": examples * k / seconds,
                "peak_gib": peak_gib(device),
                # Book-keeping turns its float32-output products off for the process at their first failure: which
                # path this row's step took (read after it, so a failure in it shows).
                **({"float32_output_products": _float32_output(device)} if clipping else {}),
            }

        cost = dp_cost(rec, plan, models, depth, method, k, clipping, precision)
        row = rec.measure("privacy", name, run, cost=cost)
        base = None if row is None else _non_dp_row(rec, row)
        if base is not None:  # (a non-DP row is its own base: 1.00x)
            row["time_vs_non_dp"] = row["step_ms"] / base["step_ms"]
            row["memory_vs_non_dp"] = (
                row["peak_gib"] / base["peak_gib"] if row["peak_gib"] and base["peak_gib"] else None
            )
            rec.write()


# --- 4. generation ----------------------------------------------------------------------------------------------


def sample_fn(var, vqvae, batch: int, *, compiled: bool, device: torch.device, seed: int = 0):
    """A call drawing ``batch`` images (or its first ``rows``: a last, smaller batch) as the trials sample."""
    labels = torch.randint(0, CLASSES, (batch,), device=device)
    generator = torch.Generator(device=device).manual_seed(seed)

    def run(rows: int | None = None) -> torch.Tensor:
        with torch.no_grad(), bf16_autocast(device):
            return var.sample(
                labels[:rows],
                vqvae=vqvae,
                cfg=EvaluationConfig.guidance_scale,
                top_k=EvaluationConfig.top_k,
                top_p=EvaluationConfig.top_p,
                generator=generator,
                compiled=compiled,
            )

    return run


def _best_eager_generation(rec: Recorder) -> dict | None:
    eager = [r for r in rec.data.get("generation", []) if not r["compiled"]]
    return max(eager, key=lambda r: r["images_per_s"], default=None)


def _generation_row(plan: Plan, var, vqvae, batch: int, *, compiled: bool, device: torch.device) -> dict:
    if compiled:
        fresh_compile_state()  # (its counters are this row's; graphs of training's compiled blocks go)
    timing = generation_timing(var, vqvae, batch, compiled=compiled, plan=plan, device=device)
    if compiled:
        _COMPILED["sampling_batches"].add(batch)
    return {
        "depth": plan.generation_depth,
        "batch": batch,
        "compiled": compiled,
        "precision": "bf16 autocast",
        **timing,
        **(compile_counters() if compiled else {}),
    }


def measure_generation_eager(rec: Recorder, plan: Plan, models: Models) -> None:
    """Eager sampling up the batch ladder, until a batch fails (out of memory here: larger ones too) or does not
    fit the time left."""
    device, depth = models.device, plan.generation_depth
    vqvae, var = models.adapted(depth, "base")
    var.eval()
    for batch in plan.generation_batches:
        cost = generation_cost(rec, plan, models, depth, batch, compiled=False)
        measured = rec.measure(
            "generation",
            f"d{depth} batch {batch} compiled=False",
            lambda b=batch: _generation_row(plan, var, vqvae, b, compiled=False, device=device),
            cost=cost,
        )
        if measured is None:
            break


def measure_generation_compiled(rec: Recorder, plan: Plan, models: Models, *, which: str) -> None:
    """Compiled sampling (CUDA graphs; its ten scale graphs compiled per batch size, tens of seconds each): at the
    fastest eager batch (``which`` "best"), then, with its graphs still compiled, the 6,149-image evaluation there
    if it is the fastest setting; or (``which`` "others", an option) at the other batch sizes, larger first."""
    device, depth = models.device, plan.generation_depth
    if not plan.generation_compiled:
        if which == "best":
            why = "not on this device (CUDA graphs)" if models.device.type != "cuda" else "--quick"
            rec.skip("generation", "compiled generation", why)
        return
    best = _best_eager_generation(rec)
    if best is None:
        rec.skip("generation", "compiled generation", "no eager generation batch was measured")
        return
    done = {r["batch"] for r in rec.data.get("generation", []) if r["compiled"]}
    if which == "best":
        batches = [best["batch"]]
    else:
        batches = sorted((b for b in plan.generation_batches if b != best["batch"]), reverse=True)
    model = []  # built at the first batch that passes the gate (a copy on the device costs seconds)
    for batch in batches:
        if batch in done:
            continue
        # (the compiled row runs after a dynamo reset: its ten graphs are compiled whatever ran before)
        _COMPILED["sampling_batches"].discard(batch)
        cost = generation_cost(rec, plan, models, depth, batch, compiled=True)
        what = f"d{depth} batch {batch} compiled=True"
        if not rec.fits("generation", what, cost):
            continue
        if not model:
            vqvae, var = models.adapted(depth, "base")
            model += [var.eval(), vqvae]
        rec.measure(
            "generation",
            what,
            lambda b=batch, var=model[0], vqvae=model[1]: _generation_row(
                plan, var, vqvae, b, compiled=True, device=device
            ),
            cost=cost,
        )
    if model and which == "best":
        measure_evaluation_compiled_fastest(rec, plan, models, var=model[0], vqvae=model[1])
    if model:
        release_caches(model[0])


def generation_timing(var, vqvae, batch: int, *, compiled: bool, plan: Plan, device: torch.device) -> dict:
    """Sampling ``batch`` images: the first call (allocation; compiled, the compile) timed apart, then the median of
    ``plan.generation_steps`` calls; peak GiB. Compiled sampling's static caches are released after."""
    fn = sample_fn(var, vqvae, batch, compiled=compiled, device=device)
    try:
        reset_peak(device)
        with Stopwatch(device) as first:
            fn()
        warm = COMPILED_WARM_CALLS if compiled else 0
        seconds = timed(fn, steps=plan.generation_steps, warmup=warm, device=device)
        peak = peak_gib(device)
    finally:
        release_caches(var)
    return {
        "first_call_s": first.seconds,
        "batch_s": seconds,
        "images_per_s": batch / seconds,
        "peak_gib": peak,
    }


def measure_lora_generation(rec: Recorder, plan: Plan, models: Models) -> None:
    """A LoRA trial's model (its adapter merged without autograd: ``LoraLinear._merged_product``) sampling eagerly
    at the fastest eager batch, beside the base model's row there: what a LoRA trial's evaluation draws at."""
    eager = [r for r in rec.data.get("generation", []) if not r["compiled"]]
    if not eager:
        return
    base = max(eager, key=lambda r: r["images_per_s"])
    device, depth, batch = models.device, base["depth"], base["batch"]

    def row() -> dict:
        vqvae, var = models.adapted(depth, "lora")
        # (its first call, timed apart, also merges every adapter into its kept weight)
        timing = generation_timing(var.eval(), vqvae, batch, compiled=False, plan=plan, device=device)
        return {
            "depth": depth,
            "batch": batch,
            "method": "lora",
            **timing,
            "vs_base": timing["images_per_s"] / base["images_per_s"],
        }

    cost = generation_cost(rec, plan, models, depth, batch, compiled=False)
    rec.measure("generation_lora", f"d{depth} lora batch {batch}", row, cost=cost)


def measure_decode_layouts(rec: Recorder, plan: Plan, models: Models) -> None:
    """The VQVAE decode of the fastest eager batch's latent in NCHW (CUDA sampling's layout) and in channels-last
    (a copy of the VQVAE with its weights in NHWC too, so cuDNN runs every convolution NHWC), side by side under
    bf16 autocast, with the images' largest difference and whether the device's GroupNorm keeps channels-last
    (CUDA's kernel in the image's torch may copy its input to NCHW, and its output is then NCHW): whether cuDNN's
    NHWC convolutions pay for what the norms cost in that layout."""
    eager = [r for r in rec.data.get("generation", []) if not r["compiled"]]
    if not eager:
        return
    batch = max(eager, key=lambda r: r["images_per_s"])["batch"]
    device = models.device

    def row() -> dict:
        vqvae, var = models.base(plan.generation_depth)  # the VAR (on the CPU) only for the latent's shape
        nhwc_vqvae = copy.deepcopy(vqvae).to(memory_format=torch.channels_last)
        full = var.patch_nums[-1]
        g = torch.Generator(device=device).manual_seed(0)
        f_hat_BChw = torch.randn(batch, var.z_channels, full, full, device=device, generator=g)

        def decode(channels_last: bool) -> torch.Tensor:
            model = nhwc_vqvae if channels_last else vqvae
            with torch.no_grad(), bf16_autocast(device):
                return model.fhat_to_img(f_hat_BChw, channels_last=channels_last)

        nchw, nhwc = decode(False), decode(True)
        times = [
            timed(lambda c=c: decode(c), steps=plan.generation_steps, device=device) for c in (False, True)
        ]
        norm = next(m for m in nhwc_vqvae.decoder.modules() if isinstance(m, nn.GroupNorm))
        probe = torch.randn(2, norm.num_channels, 16, 16, device=device).contiguous(
            memory_format=torch.channels_last
        )
        with torch.no_grad():
            keeps = norm(probe).is_contiguous(memory_format=torch.channels_last)
        return {
            "batch": batch,
            "nchw_ms": 1e3 * times[0],
            "channels_last_ms": 1e3 * times[1],
            "ratio": times[1] / times[0],
            "image_diff": (nhwc.float() - nchw.float()).abs().max().item(),
            "group_norm_keeps_channels_last": keeps,
        }

    cost = build_cost(plan, models, plan.generation_depth) + plan.costs["decode_layouts"]
    rec.measure("decode_layouts", f"decode batch {batch}", row, cost=cost)


# --- 5. evaluation ----------------------------------------------------------------------------------------------


def random_inception(device: torch.device) -> nn.Module:
    """torch-fidelity's Inception-v3 (the FID architecture varsweep uses) with PyTorch's default random init: its
    constructor reads a weights file, so it gets an empty one and the load is skipped."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from trainables.evaluation.features import INCEPTION

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
            return None  # keep the random weights: the run times the architecture, it measures no images

    with tempfile.TemporaryDirectory() as folder:
        empty = Path(folder) / "empty.pth"
        torch.save({}, empty)
        return RandomInception(INCEPTION, ["2048"], feature_extractor_weights_path=str(empty)).to(device)


def _trial_setting(plan: Plan) -> tuple[int, int]:
    """(batch, images) of the evaluation at a trial's setting."""
    return min(EvaluationConfig.batch_size, plan.evaluation_trial_images), plan.evaluation_trial_images


def measure_evaluation_setting(
    rec: Recorder,
    plan: Plan,
    models: Models,
    name: str,
    *,
    batch: int,
    compiled: bool,
    images: int,
    var=None,
    vqvae=None,
) -> None:
    """The evaluation row of ``name`` ("trial" or "fastest") at ``batch``, unless measured already (on a fresh copy
    of the base model, or on ``var``, whose compiled graphs it reuses)."""
    done = {(r["setting"], r["batch"], r["compiled"]) for r in rec.data.get("evaluation", [])}
    if (name, batch, compiled) in done:
        return
    depth = plan.generation_depth
    png = name == "trial"
    cost = evaluation_cost(
        rec, plan, models, depth=depth, batch=batch, compiled=compiled, images=images, png=png
    )
    rec.measure(
        "evaluation",
        f"{name}: {images} images at batch {batch} compiled={compiled}",
        lambda: evaluation_row(
            models, name, batch=batch, compiled=compiled, images=images, depth=depth, var=var, vqvae=vqvae
        ),
        cost=cost,
    )


def measure_evaluation_target(rec: Recorder, plan: Plan, models: Models) -> None:
    """Phase 5, the target: ``plan.evaluation_images`` (Oxford Flowers' 6,149) at the fastest eager batch, in
    memory. Where that batch is a trial's (a CPU smoke run), the trial's setting instead: its row is both."""
    best = _best_eager_generation(rec)
    if best is None:
        rec.skip("evaluation", "evaluation", "no generation setting was measured")
        return
    trial_batch, trial_images = _trial_setting(plan)
    if best["batch"] == trial_batch:
        measure_evaluation_setting(
            rec, plan, models, "trial", batch=trial_batch, compiled=False, images=trial_images
        )
    else:
        measure_evaluation_setting(
            rec, plan, models, "fastest", batch=best["batch"], compiled=False, images=plan.evaluation_images
        )


def measure_evaluation_compiled_fastest(rec: Recorder, plan: Plan, models: Models, *, var, vqvae) -> None:
    """Phase 7, right after compiled generation (its graphs still compiled, on its model): the target's images at
    the fastest setting, if that is compiled."""
    best = max(rec.data.get("generation", []), key=lambda r: r["images_per_s"], default=None)
    if best is None or not best["compiled"]:
        return
    measure_evaluation_setting(
        rec,
        plan,
        models,
        "fastest",
        batch=best["batch"],
        compiled=True,
        images=plan.evaluation_images,
        var=var,
        vqvae=vqvae,
    )


def measure_evaluation_trial(rec: Recorder, plan: Plan, models: Models, *, compiled: bool) -> None:
    """A trial's setting (its ``generate``, PNG files and all), eager (phase 11) or compiled as
    ``resources.compile_sampling`` draws (phase 12: its batch size's ten graphs compiled, first calls apart)."""
    if not rec.data.get("generation"):
        return
    if compiled and not plan.generation_compiled:
        return
    batch, images = _trial_setting(plan)
    measure_evaluation_setting(rec, plan, models, "trial", batch=batch, compiled=compiled, images=images)


def evaluation_row(
    models: Models,
    setting: str,
    *,
    batch: int,
    compiled: bool,
    images: int,
    depth: int,
    var=None,
    vqvae=None,
) -> dict:
    """Generation then Inception-v3 features of ``images`` images, timed. A trial's setting draws through the
    trials' own ``generate`` into a folder (its weights' fingerprint, the PNG files the trial keeps), so its row
    costs what a trial's evaluation does; the fastest setting draws in memory, the fast path's own cost. Compiled,
    the timed draws follow warm calls, the first two timed apart: at a trial's batch size they compile its ten
    scale steps (the first call runs scale 0 eager, allocating the KV buffers; the second compiles it), once per
    process. A trial's setting then frees the buffers as each of its evaluations does, so its timed draws
    re-record the CUDA graphs: a trial's later evaluation (the fastest setting's graphs were compiled in the
    generation phase, and its timed draws replay them warm). ``var``: that phase's model (else a fresh copy)."""
    if var is None:
        vqvae, var = models.adapted(depth, "base")
    first_calls_s = None
    try:
        var.eval()
        extractor = random_inception(models.device)
        # Compiled, every batch has the one size (a last, smaller one would compile again; ``generate`` pads it
        # alike) and extras are dropped; eager, the last batch is smaller, as ``generate`` draws it.
        fn = sample_fn(var, vqvae, batch, compiled=compiled, device=models.device, seed=1)
        if compiled:
            with Stopwatch(models.device) as first:
                fn()
                fn()
            first_calls_s = first.seconds
            _COMPILED["sampling_batches"].add(batch)
            for _ in range(COMPILED_WARM_CALLS - 1):
                fn()
            if setting == "trial":
                release_caches(var)
        with tempfile.TemporaryDirectory() as folder, Stopwatch(models.device) as total:
            with Stopwatch(models.device) as gen_watch:
                if setting == "trial":  # scored as ``evaluate`` scores: in chunks of 64
                    drawn = trial_generation(
                        var, vqvae, batch=batch, images=images, folder=folder, compiled=compiled
                    )
                    uint8_images = list(uint8_batches(drawn))
                else:
                    uint8_images = in_memory_generation(fn, images, batch=batch, padded=compiled)
            with Stopwatch(models.device) as feat_watch, torch.no_grad():
                features = [extractor(chunk.to(models.device)) for chunk in uint8_images]
    finally:
        release_caches(var)
    return {
        "setting": setting,
        "images": images,
        "depth": depth,
        "batch": batch,
        "compiled": compiled,
        "png_files": setting == "trial",
        "generation_s": gen_watch.seconds,
        "features_s": feat_watch.seconds,
        "total_s": total.seconds,
        "flowers_total_s_extrapolated": total.seconds * FLOWERS_TEST_IMAGES / images,
        "first_calls_s": first_calls_s,  # compiled: the first two batches' calls, compiles included
        "feature_dim": int(features[0][0].shape[-1]),
    }


def in_memory_generation(
    fn: Callable[..., torch.Tensor], images: int, *, batch: int, padded: bool
) -> list[torch.Tensor]:
    """uint8 batches of ``images`` images drawn by ``fn`` (a ``sample_fn`` of ``batch`` images), kept on the
    device. ``padded``: the last batch is drawn whole and cut (compiled sampling's one graph size); else only its
    remainder is drawn (eager: a full last batch overstated the time by up to a batch, 8% at batch 512)."""
    generated, batches = 0, []
    while generated < images:
        rows = min(batch, images - generated)
        drawn = fn() if padded or rows == batch else fn(rows)
        batches.append((drawn[:rows] * 255).round().to(torch.uint8))
        generated += rows
    return batches


def trial_generation(var, vqvae, *, batch: int, images: int, folder: str, compiled: bool) -> torch.Tensor:
    """``images`` images as a trial's evaluation draws them: ``generate`` with the trials' sampling settings at
    ``batch``, under bf16 autocast, compiled as ``resources.compile_sampling`` says, PNGs written to ``folder``;
    uint8 [N, 3, H, W] on the CPU."""
    evaluation = EvaluationConfig(extractor=SUBSTITUTE_EXTRACTOR, batch_size=batch)  # (no features here)
    plan = generation_plan([1] * CLASSES, total=images)
    return generate(
        var, vqvae, plan, evaluation=evaluation, autocast_bf16=True, compiled=compiled, out_dir=folder
    )[0]


# --- 6. profiles -----------------------------------------------------------------------------------------------

# Kernel (CUDA) or operator (CPU) names by what they do, case-insensitive; the first pattern that matches names the
# category, and "other" takes the rest. "triton_tem" kernels are Inductor's templates: FlexAttention's.
CATEGORIES = (
    ("attention", r"flash|fmha|attention|sdpa|flex|triton_tem"),
    ("matmul", r"gemm|gemv|cutlass|xmma|nvjet|cublas|^aten::(mm|bmm|addmm|baddbmm|matmul)$"),
    ("compiled", r"^triton_"),
    ("norm", r"norm"),
    ("softmax / CE", r"softmax|nll_loss|cross_entropy"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("sampling", r"topk|sort|multinomial|cumsum|radix"),
    ("copy / cast", r"copy|memcpy|memset|fill|clone|catarray|^aten::cat$"),
    ("element-wise", r"elementwise|vectorized|reduce|unrolled|^aten::"),
)
TOP_NAMES = 6


def category(name: str) -> str:
    return next((c for c, pattern in CATEGORIES if re.search(pattern, name, re.IGNORECASE)), "other")


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (µs)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profile_calls(fn: Callable[[], object], *, steps: int, device: torch.device) -> dict:
    """Where ``steps`` calls of ``fn`` (after one untimed call) spend their time, per call: wall ms; ms of device
    kernels (CUDA) or of operators' own time (CPU); ``busy``: the share of the wall time in which some kernel ran
    (CUDA; on a CPU, some operator: the rest is Python and dispatch); the ms by category and by costliest name."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with Stopwatch(device) as watch:
            for _ in range(steps):
                fn()
    names = {}
    for event in prof.key_averages():
        if _kernel(event, kind):
            us = event.self_device_time_total if cuda else event.self_cpu_time_total
            names[event.key] = (us / 1e3 / steps, event.count / steps)
    busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in prof.events() if _kernel(e, kind)])
    categories = {c: 0.0 for c, _ in CATEGORIES} | {"other": 0.0}
    for name, (ms, _) in names.items():
        categories[category(name)] += ms
    top = sorted(names.items(), key=lambda item: -item[1][0])[:TOP_NAMES]
    return {
        "steps": steps,
        "wall_ms": 1e3 * watch.seconds / steps,
        "kernel_ms": sum(ms for ms, _ in names.values()),
        "busy": busy_us / 1e6 / watch.seconds,
        "kernels_per_call": sum(n for _, n in names.values()),
        "categories_ms": categories,
        "top": [{"name": name[:100], "ms": ms, "calls": n} for name, (ms, n) in top],
    }


def _kernel(event, kind) -> bool:
    """An event of the device ``kind`` that is work, not a user annotation: the profiler also puts ranges such as
    ``Optimizer.step#AdamW.step`` or ``Torch-Compiled Region`` on the GPU's timeline, spanning the kernels
    inside them, which would count those kernels twice (torch's own tables leave those out too); on a CPU a
    ``record_function`` range's self time is the Python between its ops, not a kernel either."""
    return event.device_type == kind and not getattr(event, "is_user_annotation", False)


def profile_row(what: str, fn: Callable[[], object], plan: Plan, device: torch.device) -> dict:
    return {"what": what, **profile_calls(fn, steps=plan.profile_steps, device=device)}


def measure_profiles(rec: Recorder, plan: Plan, models: Models) -> None:
    """Profiles of the eager paths the tables measured: the fastest training step per method, the DP step with
    book-keeping and the non-DP step on the same rows (full fine-tuning at k = 1 where measured), and the fastest
    eager generation batch. (The compiled training step is profiled in its own phase, while compiled.)"""
    device, depth = models.device, plan.depths[0]
    targets = []
    for method in ("full", "lora"):
        best = fastest(rec.data.get("training", []), depth=depth, method=method, compiled=False)
        if best is not None:
            s = _setting(best)
            cost = profile_cost(plan, best["step_ms"] / 1e3) + plan.costs["training_setup"]
            targets.append((f"training {s.label()}", lambda s=s: training_step(models, s), cost))
    dp = rec.data.get("privacy", [])
    measured = [(r["method"], r["k"]) for r in dp if r["clipping"] == "bookkeeping" and r["depth"] == depth]
    if measured:
        method, k = ("full", 1) if ("full", 1) in measured else measured[0]
        for clipping in (None, "bookkeeping"):

            def build(clipping=clipping, method=method, k=k):
                vqvae, var = models.adapted(depth, method)
                var.attention_kernel = DP_KERNEL
                return dp_step(
                    var, vqvae, clipping=clipping, k=k, rows=plan.dp_rows, bf16=True, device=device
                )

            row = next(
                (
                    r
                    for r in dp
                    if (r["depth"], r["method"], r["k"], r["clipping"]) == (depth, method, k, clipping)
                ),
                None,
            )
            step = (
                row["step_ms"] / 1e3
                if row
                else dp_cost(rec, plan, models, depth, method, k, clipping, "bf16")
            )
            cost = profile_cost(plan, step) + plan.costs["training_setup"] + plan.costs["dp_setup"]
            targets.append(
                (f"d{depth} {method} k={k} {clipping or 'no DP'} ({plan.dp_rows} rows)", build, cost)
            )
    best = _best_eager_generation(rec)
    if best is not None:
        batch = best["batch"]

        def sampler(batch=batch):
            vqvae, var = models.adapted(plan.generation_depth, "base")
            return sample_fn(var.eval(), vqvae, batch, compiled=False, device=device)

        cost = profile_cost(plan, best["batch_s"]) + plan.costs["generation_setup"]
        targets.append((f"generation d{plan.generation_depth} batch {batch}", sampler, cost))
    for what, build, cost in targets:
        rec.measure(
            "profiles",
            what,
            lambda what=what, build=build: profile_row(what, build(), plan, device),
            cost=cost,
        )


# --- report -----------------------------------------------------------------------------------------------------


def _num(value, fmt: str = ".1f", scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value * scale, fmt)


def _ratio(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _compiled(row: dict) -> str:
    """ "True (2 graphs)", with the CUDA graphs inductor skipped where it skipped any (those parts ran eager in a
    row that says compiled), or "False"; rows of runs before the counters were recorded: the bare flag."""
    if not row["compiled"] or "dynamo_graphs" not in row:
        return str(row["compiled"])
    skips = row.get("cudagraph_skips") or 0
    graphs = f"{row['dynamo_graphs']} graph{'s' * (row['dynamo_graphs'] != 1)}"
    return f"True ({graphs}" + (f", {skips} CUDA graph(s) skipped)" if skips else ")")


def _fully_compiled(row: dict) -> bool:
    """Whether a row is a compiled trial's rate: eager, or compiled with no CUDA graph skipped."""
    return not row.get("cudagraph_skips")


def _clipping(row: dict) -> str:
    route = row.get("route")
    return (row["clipping"] or "no DP") + (f" ({route} routes)" if route else "")


def profile_tables(profiles: list[dict]) -> list[str]:
    if not profiles:
        return []
    names = [c for c, _ in CATEGORIES] + ["other"]
    lines = [
        "Where the time goes (`torch.profiler`, per call; busy: share of the wall time with a kernel running; "
        "categories: shares of the kernel time):",
        "",
        "| profiled | wall ms | kernel ms | busy | kernels | " + " | ".join(names) + " |",
        "|---" * (5 + len(names)) + "|",
    ]
    for r in profiles:
        kernel_ms = r["kernel_ms"] or float("nan")
        shares = " | ".join(f"{r['categories_ms'][c] / kernel_ms:.0%}" for c in names)
        lines.append(
            f"| {r['what']} | {r['wall_ms']:.1f} | {r['kernel_ms']:.1f} | {r['busy']:.0%} | "
            f"{r['kernels_per_call']:.0f} | {shares} |"
        )
    lines += [
        "",
        "Costliest kernels, per call:",
        "",
        "| profiled | kernel | ms | calls |",
        "|---|---|---|---|",
    ]
    for r in profiles:
        lines += [
            f"| {r['what']} | `{t['name'].replace('|', '/')}` | {t['ms']:.2f} | {t['calls']:.0f} |"
            for t in r["top"]
        ]
    return [*lines, ""]


def _loop_kind(row: dict) -> str:
    if row.get("clipping") is None:
        return "global clipping"
    return f"DP, {row['clipping']}, Poisson batches of that many expected examples"


def _waits(waits: dict | None) -> str:
    if waits is None:
        return "not counted (no CUDA)"
    return f"{sum(waits.values())} ({', '.join(f'{at} x{n}' for at, n in sorted(waits.items())) or 'none'})"


def _deadline(data: dict) -> str:
    deadline = data.get("deadline_s")
    return f" from the process's start; deadline {deadline:.0f} s" if deadline else ""


def report(data: dict, *, command: str) -> str:
    meta, rates = data["meta"], data.get("rates", {})
    lines = [
        f"### GPU efficiency on {meta['device']} ({meta['stamp']})",
        "",
        f"torch {meta['torch']}. Script: `{command}` ({data['elapsed_s']:.0f} s{_deadline(data)}). Achievable dense matmul rate "
        f"measured in this run: {_num(rates.get('achievable_tflops'))} TFLOP/s (datasheet "
        f"{_num(rates.get('datasheet_tflops'))}); memory bandwidth (a device-to-device copy, bytes read and "
        f"written): {_num(rates.get('bandwidth_tb_per_s'), '.2f')} TB/s. MFU counts useful FLOPs (attention over the visible query/key "
        "pairs only, its backward twice its forward: a kernel's recomputation of the scores is not counted; "
        "`bench.estimates.training_flops_per_row`).",
        "",
        "| matmul | dtype | ms | TFLOP/s |",
        "|---|---|---|---|",
        *(
            f"| {r['size']}^3 | {r['dtype']} | {r['ms']:.2f} | {r['tflops']:.1f} |"
            for r in data.get("matmul", [])
        ),
        "",
    ]
    block_ops = data.get("block_ops", [])
    if block_ops:
        lines += [
            "A block's element-wise pieces, varsweep's form vs the published one on the same inputs (forward and "
            "backward, bf16 autocast, the first depth and batch; differences relative to the largest entry):",
            "",
            "| piece | published (ms) | ours (ms) | ours / published | output dtypes (published, ours) "
            "| output diff | input gradient diff | weight gradient diff |",
            "|---|---|---|---|---|---|---|---|",
            *(
                f"| {r['what']} | {r['published_ms']:.3f} | {r['ours_ms']:.3f} | {r['ratio']:.3f} "
                f"| {', '.join(r['dtypes'])} | {r['output_diff']:.1e} | {r['gradient_diff']:.1e} "
                f"| {_num(r.get('weight_gradient_diff'), '.1e')} |"
                for r in block_ops
            ),
            "",
        ]
    decode_ops = data.get("decode_ops", [])
    if decode_ops:
        lines += [
            "The decoder's pieces in the map's dtype (sampling: no autograd) vs CUDA autocast's float32 forms the "
            "decoder ran before, each with the next convolution's cast (forward, bf16 autocast, the first batch):",
            "",
            "| piece | before (ms) | ours (ms) | ours / before | piece's dtype (before, ours) | output diff |",
            "|---|---|---|---|---|---|",
            *(
                f"| {r['what']} | {r['published_ms']:.3f} | {r['ours_ms']:.3f} | {r['ratio']:.3f} "
                f"| {', '.join(r['dtypes'])} | {r['output_diff']:.1e} |"
                for r in decode_ops
            ),
            "",
        ]
    training = data.get("training", [])
    if training:
        lines += [
            "Training step (bf16 autocast, AdamW, token-cache inputs), vs the first row of its depth and method:",
            "",
            "| depth | method | kernel | fused AdamW | compiled | frozen bf16 | batch | step (ms) | images/s | vs first "
            "| peak GiB | MFU (measured) | MFU (datasheet) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in training:
            first = next(x for x in training if x["depth"] == r["depth"] and x["method"] == r["method"])
            lines.append(
                f"| {r['depth']} | {r['method']} | {r['kernel']} | {r['fused']} | {_compiled(r)} | {r['frozen_bf16']} | "
                f"{r['batch']} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | "
                f"{r['images_per_s'] / first['images_per_s']:.2f}x | {_num(r['peak_gib'])} | "
                f"{_num(r['mfu_measured'], '.1%')} | {_num(r['mfu_datasheet'], '.1%')} |"
            )
        lines.append("")
    lines += [
        f"A trial's loop (`finetune`: host token views, keyed draws, transfers, schedule, the meter; "
        f"{_loop_kind(r)}) at d{r['depth']} {r['method']} batch {r['batch']}: {r['loop_images_per_s']:.1f} images/s "
        f"over {r['steps']} steps, {r['loop_vs_step']:.2f}x the bare step's {r['step_images_per_s']:.1f} (its meter, the counting "
        f"step included: {_num(r['meter_rows_per_s'])} rows/s). Host waits for the GPU in the loop: "
        f"{_waits(r.get('host_waits'))}."
        for r in data.get("trial_loops", [])
    ]
    lines += [""] if data.get("trial_loops") else []
    if data.get("privacy"):
        lines += [
            "DP-SGD step vs the non-DP step on the same rows, forwards and precision (examples x k views; with one "
            "example per step, as at k = 32 and 128, the noise and update fall on one example where a trial spreads "
            "them over its expected batch, so such a ratio errs high):",
            "",
            "| depth | method | k | examples | rows per forward | clipping | precision | step (ms) | rows/s | time vs non-DP | peak GiB | memory vs non-DP |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['depth']} | {r['method']} | {r['k']} | {r['examples']} | {r.get('rows_per_forward', r['rows'])} | "
            f"{_clipping(r)} | {r['precision']} | "
            f"{r['step_ms']:.1f} | {r['rows_per_s']:.1f} | {_ratio(r.get('time_vs_non_dp'))} | "
            f"{_num(r['peak_gib'])} | {_ratio(r.get('memory_vs_non_dp'))} |"
            for r in data["privacy"]
        ]
        lines.append("")
    if data.get("generation"):
        lines += [
            "Generation (CFG 1.5, top-k 900, top-p 0.96, bf16 autocast):",
            "",
            "| depth | batch | compiled | first call (s) | s per batch | images/s | peak GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['depth']} | {r['batch']} | {_compiled(r)} | {r['first_call_s']:.2f} | {r['batch_s']:.3f} | "
            f"{r['images_per_s']:.1f} | {_num(r['peak_gib'])} |"
            for r in data["generation"]
        ]
        lines.append("")
    lines += [
        f"LoRA (d{r['depth']}, adapter merged for sampling) eager generation at batch {r['batch']}: "
        f"{r['images_per_s']:.1f} images/s, {r['vs_base']:.2f}x the base model's (first call {r['first_call_s']:.2f} s)."
        for r in data.get("generation_lora", [])
    ]
    lines += [""] if data.get("generation_lora") else []
    lines += [
        f"VQVAE decode at batch {r['batch']} (bf16 autocast): NCHW {r['nchw_ms']:.2f} ms, channels-last "
        f"{r['channels_last_ms']:.2f} ms ({r['ratio']:.2f}x; GroupNorm keeps channels-last: "
        f"{r['group_norm_keeps_channels_last']}); images' largest difference {r['image_diff']:.1e}."
        for r in data.get("decode_layouts", [])
    ]
    lines += [""] if data.get("decode_layouts") else []
    for r in data.get("evaluation", []):
        setting = {"trial": "a trial's setting", "fastest": "the fastest generation setting"}.get(
            r.get("setting")
        )
        lines += [
            f"Evaluation at {setting or 'the fastest generation setting'}: {r['images']} images at batch {r['batch']} "
            f"(compiled={r['compiled']}): generation{' with its PNG files' if r.get('png_files') else ''} "
            f"{r['generation_s']:.1f} s + Inception-v3 features {r['features_s']:.1f} s = {r['total_s']:.1f} s; "
            f"{FLOWERS_TEST_IMAGES:,} images (Oxford Flowers' test set): {r['flowers_total_s_extrapolated']:.1f} s "
            "(target < 30 s)"
            + (
                f"; timed as a trial's later evaluations run (CUDA graphs re-recorded); its first evaluation adds "
                f"the compile of {r['batch']}-image batches, the first two calls: {r['first_calls_s']:.1f} s."
                if r.get("setting") == "trial" and r.get("first_calls_s") is not None
                else "."
            ),
            "",
        ]
    lines += [
        f"Squared per-example norms against float64 ({r['dtype']} operands, 1024 -> 3072, 680 positions), largest "
        f"relative error: Gram {r['gram']:.1e}, direct {r['direct']:.1e}, direct kept {r['direct_kept']:.1e}; "
        f"the kept gradients' clipped sum added into noise: {r.get('noised_sum', float('nan')):.1e}, written over "
        f"NaN with beta 0: {r.get('sum_over_nan', float('nan')):.1e} (relative L2, float32-output products: "
        f"{r.get('float32_output_products', '-')})."
        for r in data.get("norm_accuracy", [])
    ]
    lines += profile_tables(data.get("profiles", []))
    broken = data.get("device_broken")
    if broken:
        lines.append(
            f"- the device broke in {broken['section']}: {broken['what']} ({broken['fault']}); nothing after it was "
            "measured"
        )
    lines += [
        f"- cut short while running: {r['section']}: {r['what']} (from {r['start_s']:.0f} s, expected "
        f"{_num(r.get('expected_s'), '.0f')} s)"
        for r in data.get("running", [])
    ]
    lines += [f"- failed: {e['section']}: {e['what']}: {e['error']}" for e in data["errors"]]
    lines += [f"- skipped: {s['section']}: {s['what']} ({s['why']})" for s in data["skipped"]]
    return "\n".join(lines)


# --- measured throughput for the dry-run estimate ---------------------------------------------------------------


def _loop_rate(data: dict, *, step_row: dict, clipping: str | None, k: int) -> dict:
    """The rate an entry states: a trial's own loop (``finetune``) where one ran at exactly the step row's setting
    (what a trial gets, its host work and transfers included), else the bare step's."""
    bare = step_row["images_per_s"] if clipping is None else step_row["rows_per_s"]
    wanted = {
        "depth": step_row["depth"],
        "method": step_row["method"],
        "kernel": step_row["kernel"],
        "batch": step_row.get("batch", step_row.get("rows")),
        "compiled": step_row.get("compiled", False),
        "fused": step_row.get("fused", True),
        "clipping": clipping,
        "k": k,
        "precision": step_row["precision"],
    }
    loop = next(
        (r for r in data.get("trial_loops", []) if all(r.get(key) == v for key, v in wanted.items())), None
    )
    if loop is None:
        return {"rows_per_second": round(bare, 1), "measured_in": "bare step"}
    # A loop's rate counts examples (under DP the expected ones); loops run at k = 1, where examples are rows.
    return {
        "rows_per_second": round(loop["loop_images_per_s"], 1),
        "measured_in": "trial loop",
        "bare_step_rows_per_second": round(bare, 1),
    }


def _measured_by(data: dict, *, command: str, docs: str) -> dict:
    """The device and source every throughput-file entry of a run carries."""
    meta = data["meta"]
    source = {"script": command, "date": meta["stamp"][:10], "docs": docs, "torch": meta["torch"]}
    return {"device": meta["device"], "source": source}


def throughput_entries(data: dict, *, command: str, docs: str) -> list[dict]:
    """Entries for ``bench/measured_throughput.json`` from a run's results: per depth, method and (kernel,
    compile) the fastest setting with the fused AdamW trials use on CUDA and float32 weights (the frozen-bf16
    lever is no trial option); per DP configuration its row. Each states a trial loop's rate where one was
    measured at its setting (``_loop_rate``), else the bare step's."""
    common = {**_measured_by(data, command=command, docs=docs), "tokens": "token cache"}
    entries, best = [], {}
    for r in data.get("training", []):
        if r["frozen_bf16"] or not r["fused"] or not _fully_compiled(r):
            continue
        key = (r["depth"], r["method"], r["kernel"], r["compiled"])
        if key not in best or r["images_per_s"] > best[key]["images_per_s"]:
            best[key] = r
    for r in best.values():
        entries.append(
            {
                **common,
                "depth": r["depth"],
                "method": r["method"],
                "clipping": None,
                "augmentation_multiplicity": 1,
                "precision": r["precision"],
                **_loop_rate(data, step_row=r, clipping=None, k=1),
                "rows_per_forward": r["batch"],
                "attention_kernel": r["kernel"],
                "compile": r["compiled"],
                "fused_adamw": r["fused"],
                "step_ms": round(r["step_ms"], 1),
            }
        )
    for r in data.get("privacy", []):
        if r["clipping"] is None or r.get("route") not in (None, "auto"):
            continue  # a forced route is a measurement, not a trial's setting
        entries.append(
            {
                **common,
                "depth": r["depth"],
                "method": r["method"],
                "clipping": r["clipping"],
                "augmentation_multiplicity": r["k"],
                "precision": r["precision"],
                **_loop_rate(data, step_row=r, clipping=r["clipping"], k=r["k"]),
                "rows_per_forward": r.get("rows_per_forward", r["rows"]),  # runs before 2026-12-07: the same
                "attention_kernel": r["kernel"],
                "compile": False,
                "fused_adamw": True,
                "step_ms": round(r["step_ms"], 1),
            }
        )
    return entries


def sampling_entries(data: dict, *, command: str, docs: str) -> list[dict]:
    """The throughput file's "sampling" entries (``bench.estimates.sampling_rate``): each evaluation at a trial's
    setting (generation with its PNG files, then Inception-v3 features; compiled, after its compile, with the
    CUDA graphs re-recorded as a trial's later evaluations do) and each generation row (sampling alone)."""
    common = {**_measured_by(data, command=command, docs=docs), "precision": "bf16 autocast"}
    entries = [
        {
            **common,
            "depth": r["depth"],
            "batch_size": r["batch"],
            "compiled": r["compiled"],
            "images_per_second": round(r["images"] / r["total_s"], 1),
            "measured_in": "trial evaluation",
            "images": r["images"],
            "generation_s": round(r["generation_s"], 2),
            "features_s": round(r["features_s"], 2),
            **({"first_calls_s": round(r["first_calls_s"], 1)} if r.get("first_calls_s") is not None else {}),
        }
        for r in data.get("evaluation", [])
        if r.get("setting") == "trial"
    ]
    entries += [
        {
            **common,
            "precision": r["precision"],
            "depth": r["depth"],
            "batch_size": r["batch"],
            "compiled": r["compiled"],
            "images_per_second": round(r["images_per_s"], 1),
            "measured_in": "generation",
            "batch_s": round(r["batch_s"], 3),
        }
        for r in data.get("generation", [])
        if _fully_compiled(r)
    ]
    return entries


SAME_SETTING = {
    "measurements": (
        "device",
        "depth",
        "method",
        "clipping",
        "augmentation_multiplicity",
        "precision",
        "attention_kernel",
        "compile",
    ),
    "sampling": ("device", "depth", "precision", "batch_size", "compiled", "measured_in"),
}


def write_throughput(path: Path, entries: dict[str, list[dict]]) -> None:
    """Merge ``entries`` ({"measurements": training entries, "sampling": sampling entries}) into the throughput
    file: each replaces an older entry of the same setting in its list. Refused, with nothing written, for a device
    whose datasheet peak ``bench.estimates`` does not know: its loader would refuse the file, and every dry run
    and sweep with it."""
    unknown = sorted({e["device"] for new in entries.values() for e in new if gpu_kind(e["device"]) is None})
    if unknown:
        raise SystemExit(
            f"--write-throughput: no dense bf16 peak is known for {', '.join(unknown)}; add its datasheet peak to "
            f"bench.estimates.PEAK_FLOPS first (it knows {', '.join(PEAK_FLOPS)})"
        )
    data = json.loads(path.read_text()) if path.is_file() else {}
    for name, new in entries.items():
        same = SAME_SETTING[name]
        keys = {tuple(e.get(k) for k in same) for e in new}
        kept = [m for m in data.get(name, []) if tuple(m.get(k) for k in same) not in keys]
        data[name] = kept + new
        print(f"wrote {len(new)} {name} entries to {path} ({len(kept)} others kept)")
    path.write_text(json.dumps(data, indent=1) + "\n")


# --- main -------------------------------------------------------------------------------------------------------


def skipped_phases(args: argparse.Namespace) -> tuple[str, ...]:
    """The phases ``--skip-phase`` leaves out, and those ``--only-phase`` does not name."""
    only = getattr(args, "only_phase", None)
    skipped = set(getattr(args, "skip_phase", None) or ()) | (
        {p for p in PHASES if p not in only} if only else set()
    )
    return tuple(p for p in PHASES if p in skipped)


def _cost_override(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in COSTS:
        raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(COSTS)}")
    return name, float(seconds)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a first look at the eager targets, nothing compiled: at most {QUICK_DEADLINE_S:.0f} s from the "
        "process's start on a GPU",
    )
    parser.add_argument("--depth", type=int, nargs="+", help="VAR depths (default 16 20; --quick 16)")
    parser.add_argument(
        "--deadline-s",
        type=float,
        help=f"seconds from the process's start (or $BENCHMARK_GPU_T0) by which every measurement is expected to "
        f"have ended; one whose expected cost does not fit is skipped (default {DEADLINE_S:.0f}; --quick "
        f"{QUICK_DEADLINE_S:.0f}; on a CPU {CPU_DEADLINE_S:.0f})",
    )
    parser.add_argument(
        "--hard-stop-s",
        type=float,
        help=f"end the process at this many seconds from its start (default: the deadline + "
        f"{HARD_STOP_AFTER_S:.0f} on a GPU, none on a CPU; 0: none)",
    )
    parser.add_argument(
        "--skip-phase",
        action="append",
        choices=PHASES,
        help="leave a phase out (repeatable)",
    )
    parser.add_argument(
        "--only-phase",
        action="append",
        choices=PHASES,
        help="run only these phases (repeatable): compiled generation needs a call of its own, --only-phase "
        "generation --only-phase generation_compiled (see the module docstring's 'What one call reaches')",
    )
    parser.add_argument(
        "--cost",
        action="append",
        type=_cost_override,
        metavar="NAME=SECONDS",
        help=f"override an entry of the expected-cost table (repeatable): {', '.join(COSTS)}",
    )
    default_out = Path(os.environ["OUT"]) / "benchmark_gpu.json" if os.environ.get("OUT") else None
    parser.add_argument(
        "--out", type=Path, default=default_out, help="the run's JSON (default $OUT/benchmark_gpu.json)"
    )
    parser.add_argument("--report", type=Path, help="append the Markdown tables here (docs/benchmarks.md)")
    parser.add_argument(
        "--write-throughput",
        type=Path,
        nargs="?",
        const=MEASURED_THROUGHPUT_FILE,
        help="merge the training rates into this measured-throughput file (default bench/measured_throughput.json)",
    )
    parser.add_argument(
        "--from",
        dest="from_json",
        type=Path,
        help="a run's JSON: measure nothing, report (and write) from it",
    )
    parser.add_argument(
        "--docs", default="docs/benchmarks.md", help="where the run's tables are published (recorded)"
    )
    return parser.parse_args(argv)


def command_line(args: argparse.Namespace) -> str:
    return (
        "python scripts/benchmark_gpu.py " + " ".join(sys.argv[1:])
        if sys.argv[1:]
        else "python scripts/benchmark_gpu.py"
    )


def phases(rec: Recorder, plan: Plan, models: Models) -> list[tuple[str, Callable[[], None]]]:
    """(name, what it measures) in ``PHASES``' priority order: the issue's targets (the matmul rate, d16 eager
    training at the best batch, DP book-keeping at k = 1 and 32, eager generation, the 6,149-image evaluation),
    then compiled training and generation, the other depths, and the options; FlexAttention last."""
    device, first, more = models.device, plan.depths[0], plan.depths[1:]
    schedule = privacy_schedule(plan)

    def more_depths() -> None:
        for depth in more:
            measure_training_targets(rec, plan, models, depth)
            measure_privacy(rec, plan, models, [row for row in schedule["more_depths"] if row[0] == depth])
            measure_training_compiled(rec, plan, models, depth, which="best")

    def options() -> None:
        measure_block_ops(rec, plan, device)
        measure_norm_accuracy(rec, plan, models)
        for depth in plan.depths:
            measure_training_options(rec, plan, models, depth)
        measure_privacy(rec, plan, models, schedule["options"])
        measure_lora_generation(rec, plan, models)
        measure_decode_layouts(rec, plan, models)

    def trial_loops() -> None:
        for depth in plan.depths:
            measure_trial_loops(rec, plan, models, depth)
        measure_dp_trial_loop(rec, plan, models)
        measure_evaluation_trial(rec, plan, models, compiled=False)

    def compiled_more() -> None:
        for depth in plan.depths:
            measure_training_compiled(rec, plan, models, depth, which="base")
        measure_generation_compiled(rec, plan, models, which="others")
        measure_evaluation_trial(rec, plan, models, compiled=True)

    def flex() -> None:
        for depth in plan.depths:
            measure_flex(rec, plan, models, depth)

    table = {
        "matmul": lambda: measure_matmul(rec, plan, device),
        "training": lambda: measure_training_targets(rec, plan, models, first),
        "privacy": lambda: measure_privacy(rec, plan, models, schedule["targets"]),
        "generation": lambda: measure_generation_eager(rec, plan, models),
        "evaluation": lambda: measure_evaluation_target(rec, plan, models),
        "training_compiled": lambda: measure_training_compiled(rec, plan, models, first, which="best"),
        "generation_compiled": lambda: measure_generation_compiled(rec, plan, models, which="best"),
        "more_depths": more_depths,
        "profiles": lambda: measure_profiles(rec, plan, models),
        "options": options,
        "trial_loops": trial_loops,
        "compiled_more": compiled_more,
        "flex": flex,
    }
    return [(name, table[name]) for name in PHASES]


def run(args: argparse.Namespace, *, rec: Recorder | None = None) -> dict:
    device = torch.device(args.device)
    plan = make_plan(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    meta = {
        "device": name,
        "torch": torch.__version__,
        "stamp": benchmark_common.stamp(),
        "command": command_line(args),
        "plan": asdict(plan),
        "datasheet_peaks_tflops": {k: v / 1e12 for k, v in PEAK_FLOPS.items()},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    if rec is not None:  # (a test's, with its own clock)
        rec.data["meta"] = meta
    else:
        rec = Recorder(
            args.out,
            meta,
            t0=process_start(),
            deadline_s=plan.deadline_s,
            health=lambda: device_fault(device),
        )
    start_watchdog(rec, plan.hard_stop_s)
    print(
        f"[{rec.elapsed():6.1f} s] {name}: deadline {plan.deadline_s:.0f} s from the process's start, "
        + ("no hard stop" if plan.hard_stop_s is None else f"hard stop at {plan.hard_stop_s:.0f} s"),
        flush=True,
    )
    rec.write()
    models = Models(device, vqvae_channels=plan.vqvae_channels)
    torch.manual_seed(0)
    for phase, measure in phases(rec, plan, models):
        if phase in plan.skip_phases:
            rec.skip("phases", phase, "--skip-phase")
            continue
        rec.begin_phase(phase, plan.windows.get(phase))
        rec.measure("phases", phase, measure)  # a phase's own failure (a model build) is recorded
    rec.phase = None
    rec.write()
    return rec.data


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # A run on the lent device returns its JSON whole but only the tail of its printed tables: --from rebuilds
    # the report (and the throughput file) from the JSON without measuring anything.
    data = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    if args.write_throughput:  # first: a report that fails on an older run's JSON does not cost the rates
        settings = {"command": data["meta"]["command"], "docs": args.docs}
        write_throughput(
            args.write_throughput,
            {
                "measurements": throughput_entries(data, **settings),
                "sampling": sampling_entries(data, **settings),
            },
        )
    benchmark_common.publish(report(data, command=data["meta"]["command"]), args.report)


if __name__ == "__main__":
    main()
