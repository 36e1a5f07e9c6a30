"""Exact compute accounting: FLOPs from PyTorch's FLOP counter, totals over the rows actually processed.

Every op the counter sees (matrix products, attention forward and backward) scales linearly with the number of
rows (example views) in a batch, so one counted step at a known row count gives FLOPs per row, and a trial's
training total is FLOPs per row times the rows it processed, plus any per-step work counted apart (a DP run's
public prior term). Non-DP runs count the rows they really processed; DP runs count the expected rows
(floor(q*N)*k per step), because the actual Poisson batch sizes are private and no released figure may depend on
them. The
counter does not count norms, softmax, element-wise ops or the optimiser (small next to the matrix products;
stated in every report). Attention counts useful work only, the query/key pairs the mask lets through, whichever
kernel computes it (``visible_pair_counter``): the block-causal mask hides 38% of the pairs at VAR's 680
tokens, which a dense count would put on d16 training totals as 4.5% (full fine-tuning) to 6.5% (adapters)
(``bench.estimates.ATTENTION_NOTE``, computed there); sampling, through the KV cache, computes only those pairs.
Totals are reported in PFLOPs (1e15 FLOPs), not as a rate (the published "PFLOPs" was a rate).
"""

from __future__ import annotations

import contextlib
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.estimates import ATTENTION_NOTE, FEATURES_NOTE, PEAK_FLOPS, gpu_kind

PETA = 1e15


NOT_COUNTED = (
    "norms, softmax, element-wise ops and the optimiser update are not counted, nor is "
    + FEATURES_NOTE
    + "; a DP step's per-example clipping products are (they depend on the clipping mode); "
    + ATTENTION_NOTE
)

# The fused attention kernels that take a mask (an additive bias: -inf hides a pair; or a boolean: False hides
# it), and the name of that argument in their schema. Their stock FLOP formulas count every L x L pair. SDPA
# without a mask (VAR's per-scale kernel, the flash kernels, sampling) is counted as is: it computes only the
# pairs it is given. Not covered: SDPA's math fallback (decomposed into matrix products, counted dense) and
# FlexAttention, which PyTorch's counter counts dense and which cannot run under a counter outside compilation.
_MASKED_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: "attn_mask",
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: "attn_mask",
    torch.ops.aten._scaled_dot_product_efficient_attention: "attn_bias",
    torch.ops.aten._scaled_dot_product_efficient_attention_backward: "attn_bias",
    torch.ops.aten._scaled_dot_product_cudnn_attention: "attn_bias",
    torch.ops.aten._scaled_dot_product_cudnn_attention_backward: "attn_bias",
}


def visible_share(mask: torch.Tensor | None) -> float:
    """Share of the query/key pairs an attention mask lets through (1 without a mask): finite entries of an
    additive bias, True entries of a boolean mask. A mask broadcast over batch and heads counts the same share."""
    if mask is None:
        return 1.0
    seen = mask if mask.dtype == torch.bool else torch.isfinite(mask)
    return seen.float().mean().item()


def _visible_pair_formula(dense: Callable, op: torch._ops.OpOverloadPacket, mask_name: str):
    """``dense``: the stock formula of ``op``, as the counter applies it."""
    position = [a.name for a in op.default._schema.arguments].index(mask_name)

    def formula(*args, out_val=None, **kwargs) -> int:
        mask = kwargs.get(mask_name, args[position] if position < len(args) else None)
        return round(dense(*args, out_val=out_val, **kwargs) * visible_share(mask))

    formula._get_raw = True  # FlopCounterMode hands it the tensors themselves, not their shapes
    return formula


# Products computed in place, which PyTorch's counter has no formula for (it counts ``out=`` and out-of-place
# calls only), and the out-of-place op whose formula counts them: LoRA's layers accumulate their sums this way.
_IN_PLACE_PRODUCTS = {
    torch.ops.aten.addmm_: torch.ops.aten.addmm,
    torch.ops.aten.baddbmm_: torch.ops.aten.baddbmm,
}


def _as_formula(counted: Callable):
    """``counted`` (a formula of the counter's registry, which takes the tensors) as a custom one."""

    def formula(*args, out_val=None, **kwargs) -> int:
        return counted(*args, out_val=out_val, **kwargs)

    formula._get_raw = True  # FlopCounterMode hands it the tensors themselves, not their shapes
    return formula


def visible_pair_counter() -> FlopCounterMode:
    """PyTorch's FLOP counter with masked attention counted over the visible query/key pairs only, so a step
    counts the same useful FLOPs with the masked, per-scale or any other exact kernel, and with products computed
    in place (``addmm_``, ``baddbmm_``) counted as their out-of-place forms, so a step counts the same FLOPs
    whichever way its sums are formed. An op the installed torch's counter has no formula for (torch 2.11 has none
    for the CPU flash kernels) stays uncounted, as the stock counter leaves it, rather than failing the step that
    meters it."""
    stock = FlopCounterMode(display=False).flop_registry
    in_place = {op: _as_formula(stock[like]) for op, like in _IN_PLACE_PRODUCTS.items() if like in stock}
    return FlopCounterMode(
        display=False,
        custom_mapping={
            **in_place,
            **{
                op: _visible_pair_formula(stock[op], op, name)
                for op, name in _MASKED_ATTENTION.items()
                if op in stock
            },
        },
    )


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int]]:
    """Run ``fn`` once under the visible-pair FLOP counter: (total FLOPs, FLOPs per aten op)."""
    with visible_pair_counter() as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def flops_per_row(step: Callable[[int], object], *, rows: int) -> tuple[float, dict[str, int]]:
    """FLOPs per row of ``step(rows)`` (one forward + backward on ``rows`` example views)."""
    total, by_op = count_flops(lambda: step(rows))
    return total / rows, by_op


@dataclass
class ComputeLedger:
    """Training and sampling compute of one trial, plus wall time, throughput and peak memory."""

    train_flops_per_row: float
    sample_flops_per_image: float = 0.0
    rows_trained: float = (
        0  # DP runs count the expected rows (q*N*k per step): the actual Poisson batch sizes are private
    )
    images_sampled: int = 0
    train_seconds: float = 0.0
    peak_memory_bytes: int = 0
    # The operators the FLOP counter saw (names only: a DP run's counting step is a private Poisson batch, and its
    # per-operator totals, saved in every checkpoint, would give that batch's size exactly).
    counted_ops: list[str] = field(default_factory=list)
    train_flops_per_step: float = (
        0.0  # work done once per step whatever the batch (a DP run's public prior term)
    )
    steps_trained: int = 0

    def add_training(self, rows: float, seconds: float = 0.0) -> None:
        """One step of ``rows`` rows; ``seconds``: its time where it is known per step (a ``StepMeter`` adds a
        training segment's time when the segment ends)."""
        self.rows_trained += rows
        self.train_seconds += seconds
        self.steps_trained += 1

    def report(self, *, peak_flops_per_second: float | None = None) -> dict:
        train = self.train_flops_per_row * self.rows_trained + self.train_flops_per_step * self.steps_trained
        out = {
            **asdict(self),
            "train_pflops": train / PETA,
            "sample_pflops": self.sample_flops_per_image * self.images_sampled / PETA,
            "rows_per_second": self.rows_trained / self.train_seconds if self.train_seconds else None,
            "not_counted": NOT_COUNTED,
        }
        if peak_flops_per_second and self.train_seconds:
            out["mfu"] = train / self.train_seconds / peak_flops_per_second
        return out


class Stopwatch:
    """Wall time of a block, synchronising CUDA first so queued kernels are included."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._start


def synchronize(device: torch.device) -> None:
    """Wait for the kernels queued on a CUDA ``device`` (nothing to wait for elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepMeter:
    """Times the training and counts the FLOPs of the first non-empty step (everything the step does: forward,
    backward, clipping products, a prior term), giving FLOPs per row for the trial's total.

    The time is a training segment's wall time: from the first step after a ``pause`` (or the start) to the next
    ``pause``, CUDA synchronised at both ends only. Steps in between do not wait for the GPU, so the host draws and
    copies the next batch and queues its kernels while the GPU still runs the last step's; the host work between
    steps (the schedule, the draws, the loop) is training time too. Whatever must not count (a log, DP's
    accounting, an evaluation, a checkpoint) pauses the meter first."""

    def __init__(
        self,
        device: torch.device | str = "cpu",
        *,
        counting_context: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        """``counting_context``: entered around the counting step only (e.g. to run it with an attention kernel
        PyTorch's FLOP counter can see through: FlexAttention's compiled kernel is opaque to it)."""
        self.device = torch.device(device)
        self.ledger = ComputeLedger(train_flops_per_row=0.0)
        self._counting = False
        self._fixed_local = 0.0  # this process's per-step work counted apart (``fixed_cost``)
        self._counting_context = counting_context or contextlib.nullcontext
        self._segment_start: float | None = None

    def run(self, step: Callable[[], object], *, local_rows: int, rows: float) -> object:
        """``step()``'s result. ``local_rows``: example views this process handles in the step (for FLOPs per row);
        ``rows``: the step's rows for the ledger (the global batch; under DP its expected size)."""
        if self._segment_start is None:
            synchronize(self.device)  # queued work of an evaluation or the set-up is not training
            self._segment_start = time.perf_counter()
        counting = self.ledger.train_flops_per_row == 0.0 and local_rows > 0
        counter = visible_pair_counter() if counting else contextlib.nullcontext()
        self._counting = counting
        try:
            with self._counting_context() if counting else contextlib.nullcontext(), counter:
                result = step()
        finally:
            self._counting = False
        if counting:
            self.ledger.train_flops_per_row = (counter.get_total_flops() - self._fixed_local) / local_rows
            self.ledger.counted_ops = sorted(str(op) for op in counter.get_flop_counts().get("Global", {}))
        self.ledger.add_training(rows)
        return result

    def pause(self) -> None:
        """End the training segment: wait for its queued kernels and add its wall time to the ledger."""
        if self._segment_start is None:
            return
        synchronize(self.device)
        self.ledger.train_seconds += time.perf_counter() - self._segment_start
        self._segment_start = None

    def fixed_cost(self, part: Callable[[], object], *, copies: int = 1) -> Callable[[], object]:
        """``part`` (called inside a step) counted apart on the counting step, as per-step work that does not scale
        with the rows (a nested counter: the step's own counter sees these FLOPs too, and they are taken out).
        ``copies``: how many processes run it each step (the step's total counts them all)."""

        def counted() -> object:
            if not self._counting:
                return part()
            with visible_pair_counter() as counter:
                result = part()
            self._fixed_local = float(counter.get_total_flops())
            self.ledger.train_flops_per_step = self._fixed_local * copies
            return result

        return counted

    def report(self) -> dict:
        self.pause()
        self.ledger.peak_memory_bytes = (
            torch.cuda.max_memory_allocated(self.device)
            if self.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        return self.ledger.report()


def peak_flops_per_second(device: torch.device | str) -> float | None:
    """The device's dense bf16 peak, or None (CPU, unknown GPU: no MFU is reported)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    kind = gpu_kind(torch.cuda.get_device_name(device))
    return None if kind is None else PEAK_FLOPS[kind]
