"""Peak tensor memory and FLOPs of a DP step (book-keeping) against the non-DP step on the same rows, counted exactly
on a CPU: every tensor storage an operation creates is counted from its creation to its release, as CUDA's allocator
counts ``max_memory_allocated`` (without its rounding, caching and kernel workspaces), and every operation's FLOPs by
PyTorch's FLOP counter (matrix products and attention; the same count on any device). Optionally beside another git
revision's code, each configuration in its own process.

Usage: python scripts/benchmark_dp_memory.py [--depth 2] [--views 1:8,8:16] [--precision bf16,fp32]
                                             [--versus REV] [--out docs/benchmarks.md]
Geometry: VAR-d16's layer widths (1024, 16 heads) and tokens (256 px: 680 per view), ``--depth`` blocks, a narrow
VQVAE (only its embedding is used). Rows = examples x k views; DP takes one physical batch of all rows. Parameters
and optimiser state scale with depth like the activations, so a few blocks give d16's ratios at the same rows
(the class embedding and the head are a larger share). ``bf16``: the forwards under CPU bf16 autocast, as GPU
training runs them; ``fp32``: as CPU trials run. Step 1 creates AdamW's state; step 2's memory is counted, step 3's
FLOPs. Reported: the memory held before the step (parameters, optimiser state), the peak of what the step adds over
it, where it peaked (forward, backward, the clipped sum after the backward, the update) and the step's FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

import benchmark_common
import torch
from benchmark_privacy import _plain_step, _private, d16_like
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from trainables.privacy import private_step

MIB = 1024**2
ROOT = Path(__file__).resolve().parent.parent


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and still alive (``live``) and their maximum
    (``peak``), with the phase (``phase``, set by the caller) at which the maximum occurred."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.phase = self.peak_phase = ""
        self._sizes: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # One Python object per storage for as long as it lives: its id names it.
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._sizes or key in inputs or storage.nbytes() == 0:
                continue  # a view, an in-place result (of a tensor made before the mode too) or empty: nothing new
            self._sizes[key] = storage.nbytes()
            weakref.finalize(storage, self._release, key)
            self.live += storage.nbytes()
            if self.live > self.peak:
                self.peak, self.peak_phase = self.live, self.phase
        return out


def _held_bytes(var: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = list(var.parameters()) + list(var.buffers())
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def _phased(
    var: torch.nn.Module, optimizer: torch.optim.Optimizer, tracker: LiveTensorBytes
) -> Callable[[], None]:
    """Name the step's phases for the tracker: forward, backward, after the backward (book-keeping's clipped sum,
    Opacus's noise) and the update. Patches ``torch.autograd.backward`` and ``optimizer.step``; returns the
    function that undoes that."""

    def forward_starts(*_):
        tracker.phase = "forward"

    handle = var.register_forward_pre_hook(forward_starts)
    backward, update = torch.autograd.backward, optimizer.step

    def phased_backward(*args, **kwargs):
        tracker.phase = "backward"
        backward(*args, **kwargs)
        tracker.phase = "after backward"

    def phased_update(*args, **kwargs):
        tracker.phase = "update"
        return update(*args, **kwargs)

    torch.autograd.backward, optimizer.step = phased_backward, phased_update

    def restore() -> None:
        handle.remove()
        torch.autograd.backward, optimizer.step = backward, update

    return restore


def measure(config: dict, *, depth: int) -> dict:
    """One configuration's step: {held_mib, peak_mib (over held), peak_phase, flops}."""
    k, rows = config["k"], config["rows"]
    examples = rows // k
    var, loss_fn = d16_like(
        config["method"],
        depth=depth,
        width=1024,
        heads=16,
        k=k,
        rows=rows,
        bf16=config["precision"] == "bf16",
    )
    optimizer = torch.optim.AdamW([p for p in var.parameters() if p.requires_grad], lr=1e-4)
    if config["dp"]:
        state = _private(var, optimizer, k=k, clipping="bookkeeping", rows=rows, examples=examples)
        step = lambda: private_step(state, torch.arange(examples), loss_fn)  # noqa: E731
    else:
        step = _plain_step(var, optimizer, batch_size=examples, loss_fn=loss_fn)
    step()  # AdamW's state
    held = _held_bytes(var, optimizer)
    tracker = LiveTensorBytes()
    restore = _phased(var, optimizer, tracker)
    with tracker:
        step()
    restore()
    flops = FlopCounterMode(display=False)
    with flops:
        step()
    return {
        **config,
        "held_mib": held / MIB,
        "peak_mib": tracker.peak / MIB,
        "peak_phase": tracker.peak_phase,
        "flops": flops.get_total_flops(),
    }


def configurations(views: str, precisions: str) -> list[dict]:
    configs = []
    for view in views.split(","):
        k, rows = (int(x) for x in view.split(":"))
        for precision in precisions.split(","):
            for method in ("full", "lora"):
                configs += [
                    dict(method=method, k=k, rows=rows, precision=precision, dp=dp) for dp in (False, True)
                ]
    return configs


def run_in_process(config: dict, *, depth: int, code: Path) -> dict:
    """``measure`` in a fresh process importing ``trainables`` from ``code`` (a checkout's root)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(ROOT / "scripts")])}
    command = [sys.executable, __file__, "--one", json.dumps(config), "--depth", str(depth)]
    command += ["--expect", str(code)]  # the child checks that it imported the code measured
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])


def table(rows: list[dict], versus: str | None) -> list[str]:
    """One line per method, k, precision: non-DP, then book-keeping (this tree, and ``versus``'s)."""
    head = "| method | k | rows | precision | held (MiB) | no DP: step peak over held (MiB) | phase |"
    head += f" book-keeping {versus}: peak | phase | total vs no DP | FLOPs vs no DP |" if versus else ""
    head += " book-keeping: peak (MiB) | phase | total vs no DP | FLOPs vs no DP |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    key = lambda r: (r["method"], r["k"], r["rows"], r["precision"])  # noqa: E731
    for plain in (r for r in rows if not r["dp"] and r["code"] == "current"):
        same = [r for r in rows if r["dp"] and key(r) == key(plain)]
        line = f"| {plain['method']} | {plain['k']} | {plain['rows']} | {plain['precision']} | {plain['held_mib']:.0f} | "
        line += f"{plain['peak_mib']:.0f} | {plain['peak_phase']} |"
        for code in ([versus] if versus else []) + ["current"]:
            (dp,) = [r for r in same if r["code"] == code]
            total = (dp["held_mib"] + dp["peak_mib"]) / (plain["held_mib"] + plain["peak_mib"])
            line += f" {dp['peak_mib']:.0f} | {dp['peak_phase']} | {total:.2f}x | {dp['flops'] / plain['flops']:.3f}x |"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--views", default="1:8,8:16", help="k:rows pairs (rows = examples x k)")
    parser.add_argument("--precision", default="bf16,fp32")
    parser.add_argument("--versus", help="a git revision whose code to measure beside this tree's")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--expect", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import trainables

        if args.expect and not Path(trainables.__file__).resolve().is_relative_to(
            Path(args.expect).resolve()
        ):
            raise SystemExit(f"trainables imported from {trainables.__file__}, not from {args.expect}")
        print(json.dumps(measure(json.loads(args.one), depth=args.depth)))
        return
    worktree = Path(f"/tmp/varsweep-dp-memory-{args.versus}") if args.versus else None
    if worktree:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(worktree), args.versus], check=True
        )
    rows = []
    try:
        for config in configurations(args.views, args.precision):
            codes = {"current": ROOT} | ({args.versus: worktree} if worktree and config["dp"] else {})
            for name, code in codes.items():
                rows.append({**run_in_process(config, depth=args.depth, code=code), "code": name})
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if worktree:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=True
            )
    command = f"python scripts/benchmark_dp_memory.py --depth {args.depth} --views {args.views} --precision {args.precision}"
    command += f" --versus {args.versus}" if args.versus else ""
    section = [
        f"### DP step memory, counted tensor by tensor: width 1024, 16 heads, depth {args.depth}, 680 tokens "
        f"({benchmark_common.stamp()})",
        "",
        f"Machine: {benchmark_common.machine()}. Script: `{command}`. Held: parameters and AdamW state before the "
        "step; peak: the most the step's own tensors occupied at once; total vs no DP: (held + peak) over the "
        "non-DP step's on the same rows; FLOPs: PyTorch's FLOP counter over one step.",
        "",
        *table(rows, args.versus),
        "",
    ]
    benchmark_common.publish("\n".join(section), args.out)


if __name__ == "__main__":
    main()
