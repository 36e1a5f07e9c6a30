"""Book-keeping per-example clipping: one backward pass, no per-sample copies of large weights, k views per example.

Ghost clipping needs a second backward pass to form the clipped gradient sum; per-sample hooks store a copy of
every weight per example. Book-keeping keeps what one backward already produces, each trainable layer's input
``a`` and output gradient ``g``, and
1. computes every example's gradient norm layer by layer, inside the backward as each layer's ``g`` arrives,
2. forms the clipping factors c_b = min(1, C / ||grad_b||), and
3. builds each layer's clipped sum sum_b c_b grad_b.
During the backward itself the trainable weights are frozen, so autograd skips the weight-gradient products that
step 3 replaces. An example's k augmented views (consecutive rows) are treated as one longer sequence of T positions
(k x the positions of one row), so the clipped quantity is the gradient of the example's mean loss over its views.

A linear layer (in -> out) takes the cheapest of three routes (after the "mixed ghost norm" rule of Bu et al.):
- ``"direct"``, kept: the per-example gradient g_b^T a_b itself, ~2 T in out FLOPs (the weight-gradient product the
  frozen backward skipped), kept (in bfloat16 under autocast) where it takes at most KEEP_MEMORY_RATIO x the memory
  of the ``a`` and ``g`` it lets go during the backward (every layer of VAR-d16 to d30 at one view); the clipped
  sum is then its c-weighted sum (~in out FLOPs per example). No extra products at all.
- ``"gram"``: ||g_b^T a_b||^2 = <g_b g_b^T, a_b a_b^T> from the two [T, T] Gram matrices. Both are symmetric, so
  only their block upper triangle is formed: n row tiles of >= GRAM_TILE_ROWS rows, ~2 T^2 (in + out) (n + 1) / 2n
  FLOPs per example (0.625 of the whole at n = 4). The clipped sum is then one weighted product (g * c)^T a over all
  rows, ~2 T in out FLOPs per example.
- ``"direct"``, not kept: formed in chunks of examples for the norms and dropped; the clipped sum as for Gram.
The Gram route is the cheaper of the last two when in out > T (in + out) (n + 1) / 2n; direct is always the
route of LoRA's rank-r factors, and of every layer with many views (T = k x 680 at VAR-d16). At VAR-d16's geometry
and k = 1, full fine-tuning's DP step costs 1.23-1.26x the non-DP step's FLOPs with whole Gram matrices,
1.14-1.15x with tiles of 170 rows, and 1.00x with every per-example gradient kept, as now (PyTorch's FLOP counter,
docs/benchmarks.md); LoRA's, and every step at k >= 8, 1.00x. Norms are float32 whatever the autocast dtype, and
summed pairwise (they decide the sensitivity).

On a GPU the kept route's cost is memory traffic, not FLOPs: a per-example gradient is written once, read once for
its norm and once for the clipped sum (2 bytes each in bf16, ``NATIVE_HALF_DEVICES``), where float32 intermediates,
a division by k = 1 and upcast copies had moved ~46 bytes per entry. The clipped sum is not formed on its own: one
product with float32 output adds it straight into DP-SGD's noise (``WeightedRows``, ``add_term``). Its clipping
factors enter that product in bf16, rounded toward zero (``bfloat16_toward_zero``): never above the float32 factor,
1 exactly for an unclipped example, and within 2^-7 below it for a clipped one, which then counts as if clipped to
a norm between (1 - 2^-7) C and C. (Two bf16 parts came within 2^-15 but cost two float32 sums and two more passes
over the noise: 24 bytes per parameter, ~1 ms of a VAR-d16 step on an H200.)

Rules exist for the layer types an adapted VAR trains (``nn.Linear`` incl. peft's LoRA/LN-tuning layers,
``nn.Embedding`` and the small modules of ``trainables.patches``); any other trainable layer is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

from .patches import AddParameter, HeadScale, QKVBias

LINEAR_ROUTES = ("auto", "gram", "direct")
# Largest transient a chunk of per-example products (direct gradients or Gram matrices) may take; bounds the
# memory of the routes where nothing is kept, e.g. the direct route at k = 32 views.
CHUNK_BYTES = 256 * 1024**2
F32_BYTES = 4
# Gram products are formed in row tiles (see the module docstring): rows of the smallest tile, and most tiles. A
# tile of 128 rows still fills a GPU's matrix units and a CPU's kernels (measured on 2 cores, T = 680, 1024 -> 3072:
# 0.166 s whole, 0.111 s at 2 tiles, 0.093 s at 4, 0.091 s at 5).
GRAM_TILE_ROWS = 128
MAX_GRAM_TILES = 4
# A per-example gradient is kept (then the norms cost no product beyond the non-DP step's) where it takes at most
# this many times the bytes of the layer's a and g, which it replaces. At 680 positions (256 px) and one view, the
# qkv, MLP and head gradients are 1.13-1.2x their a and g at VAR-d16, 1.41-1.51x at d20, 1.64-1.81x at d24 and
# 1.92-2.26x at d30; 2.5 keeps them all. Measured with two blocks of each width, 8 rows, bf16, on an H200 roofline
# (docs/benchmarks.md): through Gram matrices (fp32 weighted products) a DP-full step cost 2.39x the non-DP step at
# d20's width and 2.69x at d30's; kept, 1.19x and 1.21x (1.001x its FLOPs). Memory: the same peak at d20's width
# (1.07x the non-DP step's total), 1.06x -> 1.13x at d30's (1.05x -> 1.12x with four blocks: kept gradients mostly
# take the place of activations the backward has freed).
KEEP_MEMORY_RATIO = 2.5


def _fold(rows_R: torch.Tensor, k: int) -> torch.Tensor:
    """Example-major rows [B*k, ..., d] -> [B, T, d] with T = k * (positions per row); 1-D ids -> [B, k]."""
    if rows_R.ndim == 1:
        return rows_R.reshape(-1, k)
    return rows_R.reshape(rows_R.shape[0] // k, -1, rows_R.shape[-1])


def gram_tiles(positions: int) -> int:
    """Row tiles of the block-triangular Gram products over ``positions`` (T) rows: as many as keep each tile at
    least GRAM_TILE_ROWS rows, at most MAX_GRAM_TILES (further tiles save little: (n + 1) / 2n tends to 1/2)."""
    return max(1, min(MAX_GRAM_TILES, positions // GRAM_TILE_ROWS))


def linear_route(*, positions: int, in_features: int, out_features: int) -> str:
    """The cheaper norm route for a linear layer over ``positions`` (T) per example when its per-example gradient
    cannot be kept: "gram" costs ~2 T^2 (in + out) (n + 1) / 2n FLOPs per example (n = ``gram_tiles(T)``),
    "direct" ~2 T in out; both then pay the same weighted product for the clipped sum."""
    tiles = gram_tiles(positions)
    gram = positions * (in_features + out_features) * (tiles + 1) / (2 * tiles)
    return "gram" if in_features * out_features > gram else "direct"


def _kept_dtype(a_R: torch.Tensor, g_R: torch.Tensor) -> torch.dtype:
    """The dtype of a kept per-example gradient: bfloat16 where both operands are (under autocast: the precision of
    autocast's own weight gradient, and half the bytes), else float32. Its norm is taken from the rounded values, so
    what the clipped sum adds is what was clipped."""
    return torch.bfloat16 if a_R.dtype == g_R.dtype == torch.bfloat16 else torch.float32


def _keeps_direct(*, positions: int, a_R: torch.Tensor, g_R: torch.Tensor) -> bool:
    """Whether a per-example gradient [out, in] takes at most KEEP_MEMORY_RATIO x the memory of the example's
    ``a`` and ``g``, which it lets go."""
    in_features, out_features = a_R.shape[-1], g_R.shape[-1]
    released = positions * (in_features * a_R.element_size() + out_features * g_R.element_size())
    kept = in_features * out_features * torch.finfo(_kept_dtype(a_R, g_R)).bits // 8
    return kept <= KEEP_MEMORY_RATIO * released


# Devices with native half-precision kernels (CUDA): there a bf16 per-example gradient is formed by one bf16
# product (float32 accumulation, one rounding), a squared norm is one float32-accumulating pass over it, and the
# clipped sum reads it once through a matmul with float32 output. A CPU's path upcasts to float32 first (its bf16
# matmul ran 3x slower than the upcast one here) and sums squares pairwise in chunks; the results agree to the
# tolerances of tests/test_bookkeeping.py, which also runs the native path on the CPU.
NATIVE_HALF_DEVICES = ("cuda",)
# Device types whose bmm takes two half-precision operands to a float32 output (``torch.bmm(..., out_dtype=)``,
# CUDA only in PyTorch 2.8+); the first failure (an older torch, an unsupported layout) turns its use off.
NATIVE_FLOAT32_OUTPUT = {"cuda": True}
HALF = (torch.bfloat16, torch.float16)


def _matmul_f32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y [..., m, n] with float32 output from operands of any float dtype, upcasting only what is not float32;
    two half-precision CUDA operands go through a matmul with float32 output (no float32 copies; the products
    of bf16/fp16 values are exact in float32, so this equals the upcast product up to summation order)."""
    if x.dtype == y.dtype == torch.float32:
        return x @ y
    if (
        NATIVE_FLOAT32_OUTPUT.get(x.device.type, False)
        and x.dtype == y.dtype
        and x.dtype in HALF
        and x.ndim == y.ndim == 3
    ):
        try:
            return torch.bmm(x, y, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # the upcast product below is the same sum
            NATIVE_FLOAT32_OUTPUT[x.device.type] = False
    return x.float() @ y.float()


def _product_as(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x @ y in ``dtype``: on a native-half device, operands of that half dtype give it directly (one rounding of
    the float32-accumulated product, as autocast's own weight gradient); otherwise float32, then cast."""
    if x.device.type in NATIVE_HALF_DEVICES and x.dtype == y.dtype == dtype and dtype in HALF:
        return x @ y
    return _matmul_f32(x, y).to(dtype)


def _example_chunks(examples: int, bytes_per_example: int) -> list[slice]:
    step = max(1, CHUNK_BYTES // max(1, bytes_per_example))
    return [slice(s, s + step) for s in range(0, examples, step)]


def _square_sums(x_B: torch.Tensor, *, in_place: bool = False) -> torch.Tensor:
    """Per-example sums of squares [B] (float32) of x [B, ...], reduced pairwise: an einsum or matmul dot product
    accumulates millions of terms in sequence and missed by 2.4e-3 relative on a CPU (1024 x 3072), enough to let a
    clipped gradient exceed C. ``in_place`` squares x itself; otherwise in chunks of examples (CHUNK_BYTES)."""
    if x_B.device.type in NATIVE_HALF_DEVICES:  # one pass, accumulated in float32 by a tree of partial sums
        return torch.linalg.vector_norm(x_B.flatten(1), dim=1, dtype=torch.float32).square()
    if in_place:
        return x_B.square_().flatten(1).sum(1, dtype=torch.float32)
    chunks = _example_chunks(x_B.shape[0], x_B[0].numel() * F32_BYTES)
    return torch.cat([x_B[part].float().square().flatten(1).sum(1) for part in chunks])


def _direct_norms(a_BTi: torch.Tensor, g_BTo: torch.Tensor, k: int, *, keep_as: torch.dtype | None):
    """Per-example weight gradients g_b^T a_b / k: their squared norms [B] (float32) and, if ``keep_as`` is a
    dtype, the gradients themselves [B, out, in] in it (the norms are those of the rounded values)."""
    if keep_as is not None:
        grad_Boi = _product_as(g_BTo.transpose(1, 2), a_BTi, keep_as)
        if k != 1:
            grad_Boi.div_(k)
        return _square_sums(grad_Boi), grad_Boi
    per_example = g_BTo.shape[-1] * a_BTi.shape[-1] * F32_BYTES
    sq = []
    for part in _example_chunks(a_BTi.shape[0], per_example):
        sq.append(_square_sums(_matmul_f32(g_BTo[part].transpose(1, 2), a_BTi[part]), in_place=True))
    return torch.cat(sq) / (k * k), None


def _gram_norms(a_BTi: torch.Tensor, g_BTo: torch.Tensor, k: int) -> torch.Tensor:
    """Squared norms [B] of g_b^T a_b / k as <g_b g_b^T, a_b a_b^T> (float32), in chunks of examples.

    Both Gram matrices are symmetric: row tile [r0, r1) is multiplied only against the columns from r0 on, and the
    sum counts its off-diagonal part twice and its diagonal block [r0, r1) x [r0, r1) once."""
    B, T = a_BTi.shape[:2]
    tiles = gram_tiles(T)
    bounds = [T * j // tiles for j in range(tiles + 1)]
    largest = max((r1 - r0) * (T - r0) for r0, r1 in zip(bounds[:-1], bounds[1:]))
    sq_B = torch.zeros(B, device=g_BTo.device, dtype=torch.float32)
    for part in _example_chunks(B, 2 * largest * F32_BYTES):
        for r0, r1 in zip(bounds[:-1], bounds[1:]):
            prod_btT = _matmul_f32(g_BTo[part, r0:r1], g_BTo[part, r0:].transpose(1, 2))
            prod_btT.mul_(_matmul_f32(a_BTi[part, r0:r1], a_BTi[part, r0:].transpose(1, 2)))
            diagonal_b = prod_btT[..., : r1 - r0].sum((1, 2))
            sq_B[part] += 2 * prod_btT.sum((1, 2)) - diagonal_b
    return sq_B.clamp_min(0) / (k * k)


def _linear_norms(
    layer: nn.Linear, a_R: torch.Tensor, g_R: torch.Tensor, k: int, *, trainable: set, route: str = "auto"
) -> tuple[torch.Tensor, dict]:
    """Squared per-example norms [B] (float32) of the layer's weight and bias gradients, and what the clipped sum
    needs: kept per-example gradients {param: [B, ...]} and/or the rows ``"a"``, ``"g"`` for a weighted product."""
    a_BTi, g_BTo = _fold(a_R, k), _fold(g_R, k)
    T, kept = a_BTi.shape[1], {}
    sq_B = torch.zeros(a_BTi.shape[0], device=g_R.device, dtype=torch.float32)
    if layer.weight in trainable:
        keep = route != "gram" and _keeps_direct(positions=T, a_R=a_R, g_R=g_R)
        if route == "auto":  # a kept per-example gradient costs no extra product: the cheapest route
            route = (
                "direct"
                if keep
                else linear_route(positions=T, in_features=a_R.shape[-1], out_features=g_R.shape[-1])
            )
        if route == "direct":
            keep_as = _kept_dtype(a_R, g_R) if keep else None
            sq_weight_B, grad_Boi = _direct_norms(a_BTi, g_BTo, k, keep_as=keep_as)
        else:
            sq_weight_B, grad_Boi = _gram_norms(a_BTi, g_BTo, k), None
        sq_B = sq_B + sq_weight_B
        if keep:
            kept[layer.weight] = grad_Boi
        else:
            kept["a"], kept["g"] = a_R, g_R
    if layer.bias is not None and layer.bias in trainable:
        kept[layer.bias] = g_BTo.sum(1, dtype=torch.float32) / k
        sq_B = sq_B + _square_sums(kept[layer.bias])
    return sq_B, kept


def bfloat16_toward_zero(c_B: torch.Tensor) -> torch.Tensor:
    """[B] bfloat16 clipping factors for c [B] >= 0 (float32), each rounded toward zero: never above the float32
    factor (the sensitivity stays C), within 2^-7 of it relatively, and 1 (an unclipped example) exactly."""
    return (c_B.float().contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


class WeightedRows(NamedTuple):
    """sum_b weights_B[b] * rows_B[b], a clipped sum not yet formed: ``add_term`` adds it where it is needed in one
    product that reads the rows once (float32 output), e.g. straight into DP-SGD's noise."""

    weights_B: torch.Tensor
    rows_B: torch.Tensor  # [B, *parameter shape]


class WeightedOuterProducts(NamedTuple):
    """sum_r weights_R[r] g_R[r]^T a_R[r] [out, in], a linear layer's clipped weight sum over its rows (weights
    c_b / k per row) where no per-example gradient was kept, not yet formed: ``add_term`` adds it with one float32
    product into its target, which reads and writes the target once instead of writing the product and adding it."""

    weights_R: torch.Tensor
    g_R: torch.Tensor  # [R, ..., out]
    a_R: torch.Tensor  # [R, ..., in]


def _outer_products_into(
    acc: torch.Tensor, term: WeightedOuterProducts, *, alpha: float, beta: float
) -> None:
    """acc = beta * acc + alpha * (g * w)^T a in place (acc float32 [out, in]; beta 0: acc's content ignored)."""
    g_R, a_R = term.g_R, term.a_R
    gw_Ro = (g_R * term.weights_R.view(-1, *([1] * (g_R.ndim - 1)))).reshape(-1, g_R.shape[-1])
    acc.addmm_(gw_Ro.T, a_R.reshape(-1, a_R.shape[-1]).to(gw_Ro.dtype), beta=beta, alpha=alpha)


# A term of a clipped sum: a float32 tensor, or products not yet formed.
Term = torch.Tensor | WeightedRows | WeightedOuterProducts


def _weighted_rows_into(acc: torch.Tensor, term: WeightedRows, *, alpha: float, beta: float) -> None:
    """acc = beta * acc + alpha * sum_b w_b rows_b in place (acc float32, contiguous, of a row's shape; beta 0:
    acc's content ignored). Half-precision rows on a CUDA device: one baddbmm with float32 output, reading the rows
    and acc once; elsewhere, or where that product is missing (``_accumulates_float32``), the upcast product."""
    w_11B, rows_1BJ = term.weights_B.view(1, 1, -1), term.rows_B.flatten(1).unsqueeze(0)
    acc_11J = acc.view(1, 1, -1)
    if w_11B.dtype == rows_1BJ.dtype and w_11B.dtype in HALF and _accumulates_float32(acc.device):
        # out= acc itself: PyTorch's out_dtype baddbmm accumulates into its output (no copy of acc)
        torch.baddbmm(acc_11J, w_11B, rows_1BJ, out_dtype=torch.float32, beta=beta, alpha=alpha, out=acc_11J)
        return
    acc_11J.baddbmm_(w_11B.float(), rows_1BJ.float(), beta=beta, alpha=alpha)


_PROBED: set = set()  # device types whose float32-output baddbmm was tried


def _accumulates_float32(device: torch.device) -> bool:
    """Whether a half-precision baddbmm can accumulate into a float32 output on ``device`` (CUDA, PyTorch 2.8+),
    tried once on a small product and checked against the upcast one: a failure inside a step could not tell
    whether the sum was already added, and an output that dropped what ``acc`` held (the noise the clipped sum is
    added into) would silently void the privacy guarantee."""
    if NATIVE_FLOAT32_OUTPUT.get(device.type, False) and device.type not in _PROBED:
        _PROBED.add(device.type)
        NATIVE_FLOAT32_OUTPUT[device.type] = _float32_output_is_exact(device)
    return NATIVE_FLOAT32_OUTPUT.get(device.type, False)


def _float32_output_is_exact(device: torch.device) -> bool:
    """beta * acc + alpha * w @ rows through the float32-output baddbmm, into acc itself, against the upcast
    product (bf16 operands: their products are exact in float32, so only summation order may differ)."""
    generator = torch.Generator().manual_seed(0)
    acc_11J = torch.randn(1, 1, 64, generator=generator).to(device)
    w_11B, rows_1BJ = (
        torch.randn(shape, generator=generator).bfloat16().to(device) for shape in ((1, 1, 8), (1, 8, 64))
    )
    expected_11J = torch.baddbmm(acc_11J, w_11B.float(), rows_1BJ.float(), beta=0.5, alpha=2.0)
    try:
        torch.baddbmm(acc_11J, w_11B, rows_1BJ, out_dtype=torch.float32, beta=0.5, alpha=2.0, out=acc_11J)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(acc_11J, expected_11J, rtol=1e-5, atol=1e-5))


# How each unformed term is added into a float32 target: (acc, term, *, alpha, beta), beta 0 ignoring acc.
ADDERS = {WeightedRows: _weighted_rows_into, WeightedOuterProducts: _outer_products_into}


def _shape(term: Term) -> torch.Size:
    if isinstance(term, WeightedRows):
        return term.rows_B.shape[1:]
    if isinstance(term, WeightedOuterProducts):
        return torch.Size((term.g_R.shape[-1], term.a_R.shape[-1]))
    return term.shape


def add_term(acc: torch.Tensor, term: Term, *, alpha: float = 1.0) -> None:
    """acc += alpha * term, in place (acc float32, contiguous)."""
    adder = ADDERS.get(type(term))
    if adder is not None:
        adder(acc.view(_shape(term)), term, alpha=alpha, beta=1.0)
    else:
        acc.add_(term.view_as(acc), alpha=alpha)


def formed(terms: list[Term], *, alpha: float = 1.0) -> torch.Tensor:
    """alpha * the sum of ``terms`` (one parameter's clipped sum), a new float32 tensor of the first term's shape."""
    first, *rest = terms
    adder = ADDERS.get(type(first))
    if adder is not None:
        device = first[-1].device  # the rows' (each unformed term's last field)
        out = torch.empty(_shape(first), device=device, dtype=torch.float32)
        adder(out, first, alpha=alpha, beta=0.0)
    else:  # a dense term is a float32 tensor no one else holds (a chunk's or an embedding's own sum)
        out = first if alpha == 1 else torch.mul(first, alpha)
    for term in rest:
        add_term(out, term, alpha=alpha)
    return out


def _kept_clipped(kept: dict, c_B: torch.Tensor, c_bf16_B: torch.Tensor) -> dict:
    """{param: [WeightedRows]}: sum_b c_b grad_b for every kept per-example gradient [B, ...] (float32 or
    bfloat16), not yet formed. A bf16 gradient is weighted by c in bf16 toward zero (``bfloat16_toward_zero(c_B)``,
    formed once per step), which lets DP-SGD's noised mean add it into the noise in one product with float32
    output: the gradient read once, the noise read and written once, and no float32 sum in between."""
    return {
        p: [WeightedRows(c_bf16_B if grad.dtype == torch.bfloat16 else c_B.to(grad.dtype), grad)]
        for p, grad in kept.items()
        if isinstance(p, nn.Parameter)
    }


def add_terms(into: dict, terms: dict) -> None:
    """Collect a chunk of examples' clipped sums ({param: [terms]}) in ``into``."""
    for p, new in terms.items():
        into.setdefault(p, []).extend(new)


def settle(into: dict) -> None:
    """Form every parameter's collected terms into one float32 tensor, releasing the per-example gradients and
    rows the unformed ones hold (between chunks of examples: the next chunk's backward must not run beside them)."""
    for p, terms in into.items():
        if len(terms) > 1 or any(type(term) in ADDERS for term in terms):
            into[p] = [formed(terms)]


def _linear_clipped(layer: nn.Linear, kept: dict, c_B: torch.Tensor, k: int, *, c_bf16_B) -> dict:
    grads = _kept_clipped(kept, c_B, c_bf16_B)
    if "a" in kept:  # one weighted product over all rows (weights c_b / k per row), in float32
        w_R = (c_B / k).repeat_interleave(k)
        grads[layer.weight] = [WeightedOuterProducts(w_R, kept["g"], kept["a"])]
    return grads


def _embedding_norms(
    layer: nn.Embedding, ids_R: torch.Tensor, g_R: torch.Tensor, k: int, **_
) -> tuple[torch.Tensor, dict]:
    per_example = (
        GradSampleModule.GRAD_SAMPLERS[nn.Embedding](layer, [_fold(ids_R, k)], _fold(g_R, k).float())[
            layer.weight
        ]
        / k
    )
    return _square_sums(per_example, in_place=True), {"ids": ids_R, "g": g_R}


def _embedding_clipped(layer: nn.Embedding, kept: dict, c_B: torch.Tensor, k: int, **_) -> dict:
    ids_R, g_R = kept["ids"], kept["g"]
    w_R = (c_B / k).repeat_interleave(k)
    gw = (g_R * w_R.view(-1, *([1] * (g_R.ndim - 1)))).reshape(-1, layer.embedding_dim)
    return {
        layer.weight: [
            torch.zeros_like(layer.weight).index_add_(0, ids_R.reshape(-1), gw.to(layer.weight.dtype))
        ]
    }


def _small_norms(
    layer: nn.Module, a_R: torch.Tensor, g_R: torch.Tensor, k: int, **_
) -> tuple[torch.Tensor, dict]:
    """Small parameters: explicit per-example gradients from the per-sample rule, kept for the clipped sum (at one
    view per example, the rule's own: a mean over one view would copy them, [B, L, C] for the positions)."""
    per_row = GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, [a_R], g_R)
    kept = {
        p: gs.float() if k == 1 else gs.float().view(-1, k, *gs.shape[1:]).mean(1)
        for p, gs in per_row.items()
    }
    sq_B = sum(_square_sums(gs) for gs in kept.values())
    return sq_B, kept


def _small_clipped(layer: nn.Module, kept: dict, c_B: torch.Tensor, k: int, *, c_bf16_B) -> dict:
    return _kept_clipped(kept, c_B, c_bf16_B)


NormRule = Callable[..., tuple[torch.Tensor, dict]]
SumRule = Callable[..., dict]  # (layer, kept, c_B, k, *, c_bf16_B) -> {param: [terms of its clipped sum]}
RULES: dict[type, tuple[NormRule, SumRule]] = {
    nn.Linear: (_linear_norms, _linear_clipped),
    nn.Embedding: (_embedding_norms, _embedding_clipped),
    AddParameter: (_small_norms, _small_clipped),
    QKVBias: (_small_norms, _small_clipped),
    HeadScale: (_small_norms, _small_clipped),
}
# Layers whose norms are taken inside the backward. The others (few, small) wait for its end: their per-sample
# rules read ``requires_grad``, which is off for every trainable parameter while the backward runs.
IN_BACKWARD = (nn.Linear,)


def _trainable_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def hooks_are_book_keeping_s(module: nn.Module) -> bool:
    """Every forward hook and pre-hook on ``module`` is a ``BookKeeping``'s (or there is none): they keep its input
    and take its output's gradient, and never see its input's gradient."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return all(isinstance(getattr(hook, "__self__", None), BookKeeping) for hook in hooks)


def bookkeeping_supports(model: nn.Module) -> bool:
    layers = _trainable_layers(model)
    return all(type(m) in RULES for m in layers) and not _shared_parameters(layers)


def _shared_parameters(layers: list[nn.Module]) -> list[str]:
    """Trainable parameters owned by more than one layer (tied weights), each as "layer, layer" type names: its
    per-example gradient is the sum of the layers' and its squared norm is not the sum of theirs, so book-keeping,
    which adds per-layer norms and clipped sums, would clip above C (by up to sqrt 2) and count it twice."""
    owners: dict[int, list[str]] = {}
    for layer in layers:
        for p in layer.parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), []).append(type(layer).__name__)
    return [", ".join(names) for names in owners.values() if len(names) > 1]


class _GradientTap(torch.autograd.Function):
    """x as a tensor whose gradient autograd forms though nothing it comes from needs one (``anchor``, an empty
    leaf, does; it gets no gradient): a hook on it gets g, which ends there. A leaf (``x.detach().requires_grad_()``)
    would also keep g in its ``.grad``, AccumulateGrad's copy of a first layer's whole output gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None


class BookKeeping:
    """Records inputs of every trainable layer of ``model`` while ``active`` and turns each output gradient into
    per-example norms as it arrives in the backward.

    ``linear_route``: "auto" (the cheaper route per layer, see the module docstring), or "gram" / "direct" for
    every linear layer (tests and measurements)."""

    def __init__(self, model: nn.Module, *, linear_route: str = "auto"):
        if linear_route not in LINEAR_ROUTES:
            raise ValueError(f"linear_route must be one of {LINEAR_ROUTES}, got {linear_route!r}")
        self.layers = _trainable_layers(model)
        unsupported = sorted({type(m).__name__ for m in self.layers if type(m) not in RULES})
        if unsupported:
            raise NotImplementedError(
                f"book-keeping clipping has no rule for trainable layers of type {unsupported}"
            )
        shared = _shared_parameters(self.layers)
        if shared:
            raise NotImplementedError(
                f"book-keeping clipping cannot clip a parameter shared by several trainable layers (tied weights: "
                f"{'; '.join(shared[:4])}): its per-example norm is not the sum of the layers' norms; use "
                "privacy.clipping 'hooks' (what 'auto' resolves to for such a model)"
            )
        self.linear_route = linear_route
        self.params = [p for m in self.layers for p in m.parameters(recurse=False) if p.requires_grad]
        self.trainable = set(self.params)
        self.active = False
        self._k = 0  # views per example of the running backward
        self._anchor: torch.Tensor | None = None  # _GradientTap's, made per clipped_sum
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.norms: dict[nn.Module, torch.Tensor] = {}  # squared per-example norms [B], float32
        self.kept: dict[nn.Module, dict] = {}  # what each layer's clipped sum needs
        self.pending: dict[
            nn.Module, tuple[torch.Tensor, torch.Tensor]
        ] = {}  # (a, g) of layers not IN_BACKWARD
        self._handles = [m.register_forward_hook(self._record) for m in self.layers]
        self._handles += [
            m.register_forward_pre_hook(self._cast_as_autocast)
            for m in self.layers
            if isinstance(m, nn.Linear)
        ]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _clear(self) -> None:
        self.inputs.clear(), self.norms.clear(), self.kept.clear(), self.pending.clear()

    def _cast_as_autocast(self, module: nn.Linear, inputs: tuple):
        """Under autocast a linear layer multiplies a bf16 (autocast-dtype) copy of a float32 input. Made here, that
        copy is both the layer's operand (autocast then casts nothing) and what ``_record`` holds for the backward:
        the bytes the non-DP step's autograd would save, not the float32 input's twice as many, and the gradient
        whose norm is clipped is the one autocast computes."""
        x = inputs[0]
        if not self.active or x.dtype != torch.float32 or not torch.is_autocast_enabled(x.device.type):
            return None
        return (x.to(torch.get_autocast_dtype(x.device.type)), *inputs[1:])

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor):
        if not self.active:
            return None
        if module in self.inputs or module in self.norms or module in self.pending:
            raise NotImplementedError(
                f"{type(module).__name__} is called twice in one forward; book-keeping clipping needs one call"
            )
        self.inputs[module] = inputs[0].detach()
        # A first layer (its input needs no gradient), or the frozen scale's gain: tapped for g.
        if not output.requires_grad:
            output = _GradientTap.apply(output, self._anchor)
        output.register_hook(functools.partial(self._on_output_grad, module))
        return output

    def _on_output_grad(self, module: nn.Module, grad: torch.Tensor) -> None:
        """The layer's norms as soon as its output gradient exists, overlapping the rest of the backward; its
        input is released here unless the clipped sum needs it."""
        a_R = self.inputs.pop(module)
        if isinstance(module, IN_BACKWARD):
            self._norms(module, a_R, grad.detach())
        else:
            self.pending[module] = (a_R, grad.detach())

    def _norms(self, module: nn.Module, a_R: torch.Tensor, g_R: torch.Tensor) -> None:
        # No autocast here whatever the caller's context: the norms' matmuls must stay float32. No autograd either:
        # a per-sample rule that reads its parameter (HeadScale's) would otherwise give the norms, the clipping
        # factors and every clipped gradient a graph holding float32 copies of the layers' inputs.
        with torch.autocast(g_R.device.type, enabled=False), torch.no_grad():
            self.norms[module], self.kept[module] = RULES[type(module)][0](
                module, a_R, g_R, self._k, trainable=self.trainable, route=self.linear_route
            )

    def clipped_sum(
        self, loss_fn: Callable[[], torch.Tensor], *, max_grad_norm: float, into: dict | None = None
    ) -> int:
        """Run ``loss_fn`` (-> per-view losses [b, k]) and backward with weights frozen, then write each trainable
        parameter's sum over examples of its clipped view-mean gradient into ``p.grad``, or, given ``into``, add it
        there as terms ({param: [terms]}, ``add_terms``), which DP-SGD's noised mean adds into its noise without
        forming the sum. Returns b."""
        self._clear()
        # Made here, not in a hook: a leaf made inside a compiled block would break its graph.
        device = self.params[0].device if self.params else None  # none: nothing is hooked, nothing tapped
        self._anchor = torch.empty(0, device=device, requires_grad=True)
        for p in self.params:
            p.requires_grad_(False)  # autograd then skips the weight-gradient products rebuilt below
        self.active = True
        try:
            loss_bk = loss_fn()
            b, self._k = loss_bk.shape
            loss_bk.sum().backward()
        finally:
            self.active = False
            for p in self.params:
                p.requires_grad_(True)
        try:
            for module, (a_R, g_R) in list(self.pending.items()):
                self._norms(module, a_R, g_R)
            self.pending.clear()
            missing = [type(m).__name__ for m in self.layers if m not in self.norms]
            if missing:
                raise RuntimeError(
                    f"no output gradient reached trainable layers {missing[:8]} (not used by the loss?)"
                )
            self._write_clipped(max_grad_norm=max_grad_norm, into=into)
        finally:
            self._clear()
        return b

    @torch.no_grad()
    def _write_clipped(self, *, max_grad_norm: float, into: dict | None = None) -> None:
        norm_B = torch.stack([self.norms[m] for m in self.layers]).sum(0).sqrt()
        c_B = (max_grad_norm / (norm_B + 1e-6)).clamp(max=1.0)
        c_bf16_B = bfloat16_toward_zero(c_B)
        for m in self.layers:
            sums = RULES[type(m)][1](m, self.kept.pop(m), c_B, self._k, c_bf16_B=c_bf16_B)
            if into is not None:
                add_terms(into, sums)
                continue
            for p, terms in sums.items():
                p.grad = formed(terms).to(p.dtype).view_as(p)
