"""Peak tensor memory and FLOPs of a DP step (book-keeping) against the non-DP step on the same rows, counted exactly
on a CPU: every tensor storage an operation creates is counted from its creation to its release, as CUDA's allocator
counts ``max_memory_allocated`` (without its rounding, caching and kernel workspaces), and every operation's FLOPs by
PyTorch's FLOP counter's formulas (matrix products and attention; the same count on any device; in-place products,
which that counter skips, by their out-of-place formulas). Optionally beside another git
revision's code, each configuration in its own process.

Usage: python scripts/benchmark_dp_memory.py [--depth 2] [--width 1024 --heads 16] [--views 1:8,8:16]
                                             [--precision bf16,fp32] [--versus REV] [--out docs/benchmarks.md]
Geometry: VAR-d16's layer widths (1024, 16 heads; ``--width 1280 --heads 20`` for VAR-d20's) and tokens (256 px:
680 per view), ``--depth`` blocks, a narrow VQVAE (only its embedding is used). Rows = examples x k views; DP takes
one physical batch of all rows. Parameters and optimiser state scale with depth like the activations, so a few
blocks give d16's ratios at the same rows (the class embedding and the head are a larger share). ``bf16``: the forwards under CPU bf16 autocast, as GPU
training runs them; ``fp32``: as CPU trials run. Step 1 creates AdamW's state; step 2's memory is counted, step 3's
traffic and FLOPs. Reported: the memory held before the step (parameters, optimiser state), the peak of what the step adds over
it, where it peaked (forward, backward, the clipped sum after the backward, the update) and the step's FLOPs.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import weakref
from collections.abc import Callable
from pathlib import Path

import benchmark_common
import torch
from benchmark_privacy import _plain_step, _private, d16_like
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode

from trainables.privacy import private_step
from trainables.training import build_optimizer

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


# NVIDIA's H200 datasheet (SXM, dense): bf16/fp16 tensor cores 989 TFLOP/s, fp32 67 TFLOP/s, HBM3e 4.8 TB/s.
H200_DATASHEET = {"half_flops": 989e12, "float32_flops": 67e12, "bytes": 4.8e12}
HALF_TYPES = (torch.bfloat16, torch.float16)
# Allocations and storage swaps (Opacus's ``p.data = ...``): no kernel moves data.
NO_DATA = {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided", "set_"}
# In-place ops that overwrite their output without reading it.
WRITE_ONLY = {"normal_", "uniform_", "bernoulli_", "exponential_", "random_", "fill_", "zero_", "copy_"}
# Factories that take a tensor for its shape, dtype and device only: they write their output, read nothing.
SHAPE_ONLY = {
    "new_zeros",
    "new_ones",
    "new_full",
    "zeros_like",
    "ones_like",
    "full_like",
    "rand_like",
    "randn_like",
}


# Products that add beta x ``self`` to their result.
ACCUMULATING = {"addmm", "baddbmm", "addbmm", "addmv"}


def copied_addend(name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor | None:
    """The addend (``self``) that CUDA's addmm or baddbmm copies into an output other than itself before the product
    accumulates into that output (ATen's ``addmm_out_cuda_impl``, ``baddbmm``'s meta function: cuBLAS's C is its
    output), or None: in place (``out`` is ``self``), beta 0 (nothing added), or addmm's bias vector, which
    cuBLASLt adds in its epilogue (1-D and contiguous, beta 1, both factors at least 2 x 2). Such a call is two
    kernels: the copy, then a product that reads the output it writes. (addmv and addbmm copy too; no step uses
    them.)"""
    beta = kwargs.get("beta", 1)
    if name.removesuffix("_") not in ("addmm", "baddbmm") or beta == 0:
        return None
    addend, factors = args[0], args[1:3]
    if addend.data_ptr() == out.data_ptr() and (addend.shape, addend.stride()) == (out.shape, out.stride()):
        return None
    bias = addend.dim() == 1 and addend.is_contiguous() and all(min(f.shape) > 1 for f in factors)
    return None if name == "addmm" and bias and beta == 1 else addend


# Arguments a schema marks as written that the kernel only reads when the keyword named is None: the fused
# optimisers write the gradients only to unscale them by ``grad_scale``.
READ_UNLESS = {"_fused_adamw_": ("grads", "grad_scale"), "_fused_adam_": ("grads", "grad_scale")}


def _written_arguments(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an operation writes in place without returning them (``_fused_adamw_`` returns nothing and
    updates its parameters and moments), from the schema's write annotations (``Tensor(a!)[]``)."""
    schema = func._schema
    if not schema.is_mutable:
        return []
    bound = dict(zip((a.name for a in schema.arguments), args)) | kwargs
    read_only, unless = READ_UNLESS.get(func.__name__.split(".")[0], (None, None))
    written = []
    for argument in schema.arguments:
        if not (argument.alias_info and argument.alias_info.is_write) or argument.name not in bound:
            continue
        if argument.name == read_only and bound.get(unless) is None:
            continue
        written += [t for t in tree_leaves(bound[argument.name]) if isinstance(t, torch.Tensor)]
    return written


def _region(t: torch.Tensor) -> tuple:
    """The elements a tensor covers: another view of the same storage (a product's operand beside its output in
    one buffer) is other memory, read even where the output is only written."""
    return t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor holds: a broadcast (stride-0) dimension is read once, not once per
    element it stands for (an expanded norm [B, H, L, 1] is not a [B, H, L, c] read)."""
    distinct = math.prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)
    return distinct * t.element_size()


class Traffic(TorchDispatchMode):
    """The memory traffic, FLOPs and kernels of an eager step, op by op: each tensor an operation takes counted as
    read once and each tensor it returns as written once (no reuse through caches between kernels: what an eager
    GPU step moves at least), views and allocations excluded; an addmm or baddbmm whose addend is not its output is
    counted as CUDA runs it, a copy of the addend into the output and a product accumulating there
    (``copied_addend``). ``roofline_s``: the sum over operations of
    max(FLOPs / matmul rate, bytes / bandwidth) at the H200 datasheet's rates (the half-precision rate where the
    first floating operand is bf16/fp16, else float32's), an estimate of the step on that chip, not a measurement."""

    def __init__(self):
        super().__init__()
        self.bytes = self.flops = self.kernels = 0
        self.roofline_s = 0.0
        self.by_op: dict[str, list] = {}  # name -> [kernels, GB, roofline ms]
        self.formulas = FlopCounterMode(display=False).flop_registry

    def _flops(self, func, args, kwargs, out) -> int:
        formula = self.formulas.get(func.overloadpacket)
        name = func.__name__.split(".")[0]
        # PyTorch's counter has no formula for an in-place product: its out-of-place one (the rule
        # trainables.profiling meters trials by; kept here, as --versus counts revisions older than it).
        if formula is None and name.removesuffix("_") in ACCUMULATING:
            formula = self.formulas.get(getattr(torch.ops.aten, name.removesuffix("_")))
        if formula is None:
            return 0
        if func is torch.ops.aten.bmm.dtype:  # its out_dtype is no shape
            return formula(args[0], args[1], out_val=out)
        return formula(*args, **kwargs, out_val=out)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        returned = {t.untyped_storage().data_ptr() for t in outputs}
        outputs += [
            t
            for t in _written_arguments(func, args, kwargs)
            if t.untyped_storage().data_ptr() not in returned
        ]
        mutable = func._schema.is_mutable
        held = {t.untyped_storage().data_ptr() for t in inputs}
        name = func.__name__.split(".")[0]
        if name in NO_DATA or (not mutable and all(t.untyped_storage().data_ptr() in held for t in outputs)):
            return out  # an allocation, a view or other metadata: no kernel moves data
        written = {_region(t) for t in outputs}
        # An ``out=`` tensor is written, not read, as is the target of a fill or a copy; a product accumulating
        # into its ``out=`` (``beta`` != 0, ``out`` is ``self``) reads it once, as ``self``; in place with
        # ``beta`` 0, it only writes ``self``.
        product = name.removesuffix("_") in ACCUMULATING
        accumulates = product and kwargs.get("beta", 1) != 0
        overwritten = (
            name in WRITE_ONLY
            or ("out" in kwargs and not accumulates)
            or (product and name.endswith("_") and not accumulates)
        )
        operands = [t for t in tree_leaves((args, kwargs | {"out": None})) if isinstance(t, torch.Tensor)]
        read = [t for t in operands if not (overwritten and _region(t) in written)]
        read = [] if name in SHAPE_ONLY else read
        addend = copied_addend(name, args, kwargs, outputs[0]) if product else None
        if addend is not None:  # the copy's kernel; the product then reads its output instead of the addend
            self._record(
                f"copy_ (addend of {func.__name__})", _distinct_bytes(addend) + _distinct_bytes(outputs[0])
            )
            read = [t for t in read if t is not addend] + outputs[:1]
        floating = [t for t in inputs if t.is_floating_point()]
        # The rate follows the first operand's dtype, not that of a float32 mask beside it.
        half = bool(floating) and floating[0].dtype in HALF_TYPES
        flops = self._flops(func, args, kwargs, out)
        self._record(func.__name__, sum(_distinct_bytes(t) for t in read + outputs), flops=flops, half=half)
        return out

    def _record(self, name: str, moved: int, *, flops: int = 0, half: bool = False) -> None:
        """One kernel moving ``moved`` bytes, on the roofline at the slower of its FLOPs' time and its bytes'."""
        rate = H200_DATASHEET["half_flops" if half else "float32_flops"]
        self.bytes += moved
        self.flops += flops
        self.kernels += 1
        seconds = max(flops / rate, moved / H200_DATASHEET["bytes"])
        self.roofline_s += seconds
        entry = self.by_op.setdefault(name, [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += moved / 1e9
        entry[2] += 1e3 * seconds


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's rules where CPU autocast's differ, replayed on a CPU under autocast, so that counts of a CPU
    step move the bytes a CUDA step would:
    - ``Tensor.norm`` runs in float32. CPU autocast keeps a bf16 input's norm in bf16; CUDA autocast appends
      ``dtype=torch.float32`` to the call (its ``fp32_append_dtype`` policy, ATen/autocast_mode.h: no cast of the
      input; the reduction reads the bf16 entries), so the norm, and the quotient ``F.normalize`` returns, is
      float32. (A mode sees F.normalize whole, not the norm inside it, so F.normalize is run as CUDA autocast
      runs it.) Until 2026-12-05 this replay copied the input to float32 first, a copy CUDA does not make.
    - ``addcmul`` and ``addcdiv`` are promoted: CUDA autocast casts their floating inputs to the widest of their
      dtypes (a bf16 branch beside a float32 stream is copied to float32 in full), CPU autocast passes them
      through. Their ``out=`` forms pass through on both.
    - CUDA autocast's float32 lists where CPU autocast lets a bf16 input through (``FLOAT32_ON_CUDA``): layer
      and group norms and interpolation copy a bf16 input to float32 and run in float32 (its ``fp32`` policy);
      sums, softmax and the like read it as it is and write float32 (``fp32_set_opt_dtype``: ``dtype`` appended
      where none is given)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        if func in PROMOTED_ON_CUDA and kwargs.get("out") is None:
            return func(*_promoted(args), **kwargs)
        half = bool(args) and isinstance(args[0], torch.Tensor) and args[0].dtype in HALF_TYPES
        # CUDA autocast leaves ``out=`` calls alone; its "cast" policy casts every half argument, "dtype" looks at
        # the first and keeps a dtype given (by keyword or by position).
        policy = FLOAT32_ON_CUDA.get(func) if kwargs.get("out") is None else None
        if (
            policy == "cast"
            and _any_half((args, kwargs))
            and _interpolation(func, args, kwargs) in CAST_INTERPOLATIONS
        ):
            return func(*_float32(args), **_float32(kwargs))
        given = kwargs.get("dtype") is not None or any(isinstance(a, torch.dtype) for a in args[1:])
        if policy == "dtype" and half and not given:
            return func(*args, **{**kwargs, "dtype": torch.float32})
        if half and func is torch.nn.functional.normalize:
            return _normalize_with_float32_norm(*args, **kwargs)
        if half and func in (torch.Tensor.norm, torch.norm) and kwargs.get("dtype") is None:
            return func(*args, **{**kwargs, "dtype": torch.float32})
        return func(*args, **kwargs)


# Operations CUDA autocast promotes to their widest floating input and CPU autocast does not (used in a step).
PROMOTED_ON_CUDA = (torch.addcmul, torch.Tensor.addcmul, torch.addcdiv, torch.Tensor.addcdiv)


# CUDA autocast's float32 policies (ATen/autocast_mode.h's AT_FORALL_FP32 and AT_FORALL_FP32_SET_OPT_DTYPE) for
# the functions a step or a sampling call uses, none of which CPU autocast casts (tests check both against the
# dispatcher's AutocastCUDA and AutocastCPU kernels; ``prod``, on both lists, is left out). "cast": every half
# input copied to float32; "dtype": ``dtype=torch.float32`` appended where no dtype is given (a keyword every one
# of them takes). CPU autocast's own float32 policies are not undone: of them a step meets only cross-entropy,
# whose logits varsweep makes float32 itself.
FLOAT32_ON_CUDA = {
    torch.nn.functional.layer_norm: "cast",
    torch.layer_norm: "cast",
    torch.nn.functional.group_norm: "cast",
    torch.group_norm: "cast",
    torch.nn.functional.interpolate: "cast",
    torch.exp: "cast",
    torch.Tensor.exp: "cast",
    torch.rsqrt: "cast",
    torch.Tensor.rsqrt: "cast",
    torch.nn.functional.softmax: "dtype",
    torch.softmax: "dtype",
    torch.Tensor.softmax: "dtype",
    torch.nn.functional.log_softmax: "dtype",
    torch.log_softmax: "dtype",
    torch.Tensor.log_softmax: "dtype",
    torch.cumsum: "dtype",
    torch.Tensor.cumsum: "dtype",
    torch.sum: "dtype",
    torch.Tensor.sum: "dtype",
    torch.linalg.vector_norm: "dtype",
}
# F.interpolate's modes on CUDA autocast's float32 list (the upsample kernels; "area" is an adaptive pooling).
CAST_INTERPOLATIONS = {"nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear"}


def _interpolation(func, args: tuple, kwargs: dict) -> str:
    """F.interpolate's mode (its fourth parameter); "nearest", a mode cast to float32, for any other function."""
    if func is not torch.nn.functional.interpolate:
        return "nearest"
    return kwargs.get("mode", args[3] if len(args) > 3 else "nearest")


def _any_half(tree) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype in HALF_TYPES for t in tree_leaves(tree))


def _float32(tree):
    """``tree`` (args or kwargs) with every half tensor copied to float32, as CUDA autocast's ``fp32`` policy."""
    return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype in HALF_TYPES else t, tree)


def _promoted(args: tuple) -> tuple:
    floating = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    widest = functools.reduce(torch.promote_types, (a.dtype for a in floating))
    return tuple(a.to(widest) if any(a is f for f in floating) else a for a in args)


def _normalize_with_float32_norm(x, p=2.0, dim=1, eps=1e-12, out=None):
    assert out is None
    return x / x.norm(p, dim, keepdim=True, dtype=torch.float32).clamp_min(eps).expand_as(x)


_EMULATION = []  # the library registration must outlive the call that made it


def cuda_products_library() -> torch.library.Library:
    """CPU kernels for CUDA's float32-output bmm and baddbmm (products with float32 output from bf16 operands):
    alive while the returned registration is."""
    library = torch.library.Library("aten", "IMPL")
    library.impl("bmm.dtype", lambda x, y, out_dtype: torch.bmm(x.to(out_dtype), y.to(out_dtype)), "CPU")
    library.impl("baddbmm.dtype_out", _baddbmm_dtype_out, "CPU")
    return library


def _baddbmm_dtype_out(acc, x, y, out_dtype, *, beta=1, alpha=1, out):
    """CUDA's float32-output baddbmm into ``out`` (CUDA accumulates into ``out`` itself: ``acc`` is ``out``)."""
    assert out.data_ptr() == acc.data_ptr() or beta == 0
    return out.baddbmm_(x.to(out_dtype), y.to(out_dtype), beta=beta, alpha=alpha)


def emulate_cuda_kernels() -> None:
    """Run book-keeping as it runs on CUDA, on the CPU's kernels: bf16 products and one-pass norms (the
    native-half path), CPU kernels for the float32-output overloads of bmm and baddbmm (CUDA's only), and, in code
    older than the native-half path, its CUDA branch of ``_matmul_f32`` taken for CPU tensors too. Counts, not
    times, are what such a run is for."""
    from trainables import bookkeeping

    _EMULATION.append(cuda_products_library())
    if hasattr(bookkeeping, "NATIVE_HALF_DEVICES"):
        bookkeeping.NATIVE_HALF_DEVICES = ("cuda", "cpu")
        bookkeeping.NATIVE_FLOAT32_OUTPUT["cpu"] = True
        return
    upcasting = bookkeeping._matmul_f32

    def as_on_cuda(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dtype == y.dtype and x.dtype in HALF_TYPES and x.ndim == y.ndim == 3:
            return torch.bmm(x, y, out_dtype=torch.float32)
        return upcasting(x, y)

    bookkeeping._matmul_f32 = as_on_cuda


def _held_bytes(var: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters, buffers, the optimiser's state and what modules keep between steps (LoRA layers' casts of their
    frozen base, ``LoraLinear._base_output``)."""
    tensors = list(var.parameters()) + list(var.buffers())
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    kept = [getattr(m, "_frozen_cast", None) or {} for m in var.modules()]
    # a LoRA layer's weight cast may be a view of "joined", the cast with the adapter's spare columns (rows)
    for cast in kept:
        whole = cast.get("weight") if cast.get("joined") is None else cast["joined"]
        tensors += [t for t in (whole, cast.get("bias")) if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def _phased(
    var: torch.nn.Module, optimizer: torch.optim.Optimizer, tracker: LiveTensorBytes
) -> Callable[[], None]:
    """Name the step's phases for the tracker: forward, backward, after the backward (book-keeping's clipped sum,
    the noise) and the update. Patches ``torch.autograd.backward`` and ``optimizer.step``; returns the
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
    if config.get("kernel_set") == "cuda":
        emulate_cuda_kernels()
    with CudaAutocast():  # every row as CUDA autocast runs it (nothing changes without autocast)
        return _measure(config, depth=depth)


def _measure(config: dict, *, depth: int) -> dict:
    k, rows = config["k"], config["rows"]
    examples = rows // k
    if config.get("keep_ratio") is not None:
        from trainables import bookkeeping

        bookkeeping.KEEP_MEMORY_RATIO = config["keep_ratio"]
    var, loss_fn = d16_like(
        config["method"],
        depth=depth,
        width=config.get("width", 1024),
        heads=config.get("heads", 16),
        k=k,
        rows=rows,
        bf16=config["precision"] == "bf16",
    )
    # AdamW as trials build it on the device the row stands for: fused on a GPU (bf16), torch's default on a CPU.
    fused = config["precision"] == "bf16"
    try:
        optimizer = build_optimizer(var, lr=1e-4, fused=fused)
    except TypeError:  # code before 96d2061 (``--versus``) had no choice of kernel
        optimizer = torch.optim.AdamW([p for p in var.parameters() if p.requires_grad], lr=1e-4, fused=fused)
    if config["dp"]:
        state = _private(var, optimizer, k=k, clipping="bookkeeping", rows=rows, examples=examples)
        state.module.linear_route = config.get("route", "auto")
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
    traffic = Traffic()
    with traffic:
        step()
    return {
        **config,
        "held_mib": held / MIB,
        "peak_mib": tracker.peak / MIB,
        "peak_phase": tracker.peak_phase,
        "flops": traffic.flops,
        "traffic_gb": traffic.bytes / 1e9,
        "kernel_count": traffic.kernels,
        "roofline_ms": 1e3 * traffic.roofline_s,
        "roofline_by_op": dict(sorted(traffic.by_op.items(), key=lambda item: -item[1][2])[:20]),
    }


def configurations(
    views: str,
    precisions: str,
    *,
    routes: str,
    kernel_set: str,
    geometry: dict | None = None,
    methods: str = "full,lora",
) -> list[dict]:
    """No DP, then book-keeping per route ("auto": as trials run; "gram": every linear layer's norms through Gram
    matrices; "auto@R": auto with per-example gradients kept up to R x their a and g, not KEEP_MEMORY_RATIO), on
    the CPU's kernels or CUDA's emulated (``emulate_cuda_kernels``). ``geometry``: {width, heads}."""
    configs = []
    for view in views.split(","):
        k, rows = (int(x) for x in view.split(":"))
        for precision in precisions.split(","):
            for method in methods.split(","):
                common = dict(method=method, k=k, rows=rows, precision=precision, **(geometry or {}))
                configs.append(dict(common, dp=False))
                for route in routes.split(","):
                    route, _, ratio = route.partition("@")
                    keep = dict(keep_ratio=float(ratio)) if ratio else {}
                    configs.append(dict(common, dp=True, route=route, kernel_set=kernel_set, **keep))
    return configs


def run_in_process(config: dict, *, depth: int, code: Path) -> dict:
    """``measure`` in a fresh process importing ``trainables`` from ``code`` (a checkout's root)."""
    return benchmark_common.run_child(__file__, config, code=code, extra=("--depth", str(depth)))


def table(rows: list[dict]) -> list[str]:
    """One line per step: the non-DP step, then each book-keeping step (code, routes) against it; with two codes
    measured (``--versus``), each code's steps against its own non-DP step."""
    head = (
        "| method | k | rows | precision | step | peak over held (MiB) | phase | total memory vs no DP | FLOPs vs "
        "no DP | traffic (GB) | vs no DP | kernels | H200 roofline (ms) | vs no DP |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    key = lambda r: (r["method"], r["k"], r["rows"], r["precision"])  # noqa: E731
    codes = {r["code"] for r in rows if not r["dp"]}
    for plain in (r for r in rows if not r["dp"]):
        dp = [r for r in rows if r["dp"] and key(r) == key(plain)]
        for r in [plain] + [r for r in dp if len(codes) == 1 or r["code"] == plain["code"]]:
            step = "no DP" if r is plain else f"book-keeping {r['code']}, {r['route']} routes"
            step += f" {r['code']}" if r is plain and len(codes) > 1 else ""
            if r.get("keep_ratio") is not None:
                step += f", kept up to {r['keep_ratio']:g}x"
            total = (r["held_mib"] + r["peak_mib"]) / (plain["held_mib"] + plain["peak_mib"])
            lines.append(
                f"| {r['method']} | {r['k']} | {r['rows']} | {r['precision']} | {step} | {r['peak_mib']:.0f} | "
                f"{r['peak_phase']} | {total:.2f}x | {r['flops'] / plain['flops']:.3f}x | {r['traffic_gb']:.2f} | "
                f"{r['traffic_gb'] / plain['traffic_gb']:.2f}x | {r['kernel_count']} | {r['roofline_ms']:.2f} | "
                f"{r['roofline_ms'] / plain['roofline_ms']:.2f}x |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--width", type=int, default=1024, help="1024: VAR-d16's layers; 1280: VAR-d20's")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--views", default="1:8,8:16", help="k:rows pairs (rows = examples x k)")
    parser.add_argument("--precision", default="bf16,fp32")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument(
        "--routes", default="auto", help="book-keeping's linear routes: auto,gram,auto@1.6 (keep ratio 1.6)"
    )
    parser.add_argument(
        "--kernels",
        default="cpu",
        choices=("cpu", "cuda"),
        help="DP steps on the CPU's kernels or CUDA's (emulated)",
    )
    benchmark_common.add_revision_arguments(parser)
    args = parser.parse_args()
    if args.one:
        benchmark_common.check_imported_from(args.expect)
        print(json.dumps(measure(json.loads(args.one), depth=args.depth)))
        return
    rows = []
    with benchmark_common.revision_checkout(args.versus, "dp-memory") as worktree:
        geometry = dict(width=args.width, heads=args.heads)
        configs = configurations(
            args.views,
            args.precision,
            routes=args.routes,
            kernel_set=args.kernels,
            geometry=geometry,
            methods=args.methods,
        )
        for config in configs:
            versus = worktree and (
                not config["dp"] or config["route"] == "auto" and "keep_ratio" not in config
            )
            codes = ({args.versus: worktree} if versus else {}) | {"this tree": ROOT}
            for name, code in codes.items():
                rows.append({**run_in_process(config, depth=args.depth, code=code), "code": name})
                print(json.dumps(rows[-1]), flush=True)
    command = f"python scripts/benchmark_dp_memory.py --depth {args.depth} --width {args.width} --heads {args.heads}"
    command += f" --views {args.views} --precision {args.precision} --methods {args.methods}"
    command += f" --routes {args.routes} --kernels {args.kernels}"
    command += f" --versus {args.versus}" if args.versus else ""
    section = [
        f"### DP step memory, counted tensor by tensor: width {args.width}, {args.heads} heads, depth {args.depth}, "
        "680 tokens "
        f"({benchmark_common.stamp()})",
        "",
        f"Machine: {benchmark_common.machine()}. Script: `{command}`. Held: parameters and AdamW state before the "
        "step; peak: the most the step's own tensors occupied at once; total vs no DP: (held + peak) over the "
        "non-DP step's on the same rows; FLOPs: PyTorch's FLOP counter over one step; traffic: every tensor an "
        "operation reads or writes, once (`Traffic`); H200 roofline: the sum over operations of max(FLOPs / "
        f"rate, bytes / bandwidth) at the datasheet's rates, an estimate. DP kernels: {args.kernels}.",
        "",
        *table(rows),
        "",
    ]
    benchmark_common.publish("\n".join(section), args.out)


if __name__ == "__main__":
    main()
