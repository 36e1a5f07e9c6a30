"""VAR: class-conditional next-scale prediction transformer (Tian et al. 2024).

State-dict compatible with the official ``var_d{16,20,24,30}.pth``. Differences from the published code,
numerically neutral for the same inputs except the last two:
- a linear layer that is wrapped (LoRA) or hooked (per-sample gradients) is called as a module, and then the
  q/v biases are added after ``mat_qkv``'s call instead of being fused into ``F.linear`` (the published code's
  form, kept where nothing would miss the call);
- class dropout is not applied in ``forward`` (the training step applies it, once per example);
- the KV cache is an explicit per-call object, not module state;
- sampling takes a ``torch.Generator`` that advances across calls instead of re-seeding;
- under autocast, AdaLN's modulated input to a linear layer comes in autocast's dtype, rounded once where the
  published expression rounds in float32 and then casts (``modulate``: a few entries in 10^5 differ, ours the
  closer to the exact value);
- in training, the queries' gain multiplies x by gain / norm where the published code divides by the norm and
  then multiplies (``unit_vectors``: a float32 rounding apart, a few bf16 queries in 10^6 one step), and under
  autocast q's and k's norms are float32 on any device (CUDA autocast's; CPU autocast's are bf16).
Shapes: B batch, L = sum(pn^2) tokens, C width, H heads, V codebook size, Cvae latent channels.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .vqvae import VQVAE

LN_EPS = 1e-6
MAX_LOG_SCALE_MUL = math.log(100.0)


class DropPath(nn.Module):
    """Stochastic depth: zero a whole row's residual branch with probability p (training only) and scale the kept
    rows by 1/(1-p), applied to the branch's gain gamma [B, 1, C] (``forward``) rather than to the branch. The
    decision is made outside the block's forward (``row_scale``, called by ``VAR.forward``) and enters it as a
    tensor: torch.compile specialises a compiled block on a float attribute such as p, which grows with depth, so
    blocks that read it each compiled anew until the recompile limit left the deeper ones eager; with the factor as
    an input every block of a model shares one graph."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def row_scale(self, uniform_B: torch.Tensor) -> torch.Tensor:
        """Each row's factor [B] (float32): 1/(1-p) where its uniform in [0, 1) is below 1-p (kept), else 0."""
        keep = 1.0 - self.p
        return (uniform_B < keep).to(torch.float32) / keep

    def forward(self, gamma_B1C: torch.Tensor, scale_B: torch.Tensor) -> torch.Tensor:
        """gamma times each row's factor [B, 1, C], float32: the factor is not rounded to bf16 (1/(1-p) would be
        off by up to 2^-9, a bias), and scaling the gain instead of the branch [B, L, C] makes no full-size tensor."""
        return gamma_B1C.float() * scale_B.view(-1, 1, 1)

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_BLC)))

    def sampling_weights(self, device_type: str) -> tuple[LinearWeights | None, LinearWeights | None]:
        """fc1's and fc2's ``frozen_cast``, made once per sampling call for ``step`` (None, None where this module
        is hooked: its call is then kept)."""
        if not unhooked(self):
            return None, None
        return frozen_cast(self.fc1, device_type), frozen_cast(self.fc2, device_type)

    def step(
        self, x_BlC: torch.Tensor, weights: tuple[LinearWeights | None, LinearWeights | None]
    ) -> torch.Tensor:
        """``forward`` [B, l, C] with the call's ``sampling_weights``."""
        fc1, fc2 = weights
        if fc1 is None and fc2 is None:
            return self(x_BlC)
        return linear(self.fc2, self.act(linear(self.fc1, x_BlC, fc1)), fc2)


# A linear layer's (weight, bias) as a sampling call uses them at every scale: ``frozen_cast``
LinearWeights = tuple[torch.Tensor, torch.Tensor | None]
# (q/v biases [3C] in the product's dtype, the queries' gain [1, H, 1, 1] or None, mat_qkv's and proj's
# ``frozen_cast``): ``SelfAttention.sampling_constants``
SamplingConstants = tuple[torch.Tensor, torch.Tensor | None, LinearWeights | None, LinearWeights | None]


def frozen_cast(layer: nn.Module, device_type: str) -> LinearWeights | None:
    """A plain, unhooked ``nn.Linear``'s (weight, bias), those of them that are frozen float32 cast to the autocast
    dtype, for a sampling call to make once and use at every scale. Autocast keeps its cast of a weight for the
    rest of its region only where the weight is a leaf that requires grad: a frozen layer (an LN-tuning model's,
    the base model that trials of method ``base`` evaluate) was cast again at every scale, 4 bytes read and 2
    written per weight each time. The same bits as autocast's cast. None where the layer's own call stays: outside
    autocast, another layer type (LoRA's keeps its own casts), a hooked layer, nothing frozen in float32."""
    if type(layer) is not nn.Linear or not unhooked(layer) or not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: torch.Tensor | None) -> torch.Tensor | None:
        frozen = t is not None and t.dtype == torch.float32 and not t.requires_grad
        return t.to(dtype) if frozen else t

    weight, bias = cast(layer.weight), cast(layer.bias)
    return None if weight is layer.weight and bias is layer.bias else (weight, bias)


def linear(layer: nn.Module, x: torch.Tensor, weights: LinearWeights | None) -> torch.Tensor:
    """``layer(x)``, or with ``weights`` (its ``frozen_cast``) the same product from them."""
    return layer(x) if weights is None else F.linear(x, *weights)


@dataclass
class KVCache:
    """Keys and values [B, H, l, c] of the scales seen so far in one sampling call (one per block).

    ``capacity`` 0 grows the cache by concatenation at every scale; ``capacity`` L preallocates [B, H, L, c]
    buffers on the first ``extend`` (dtype and device of the first keys) and writes each scale in place, so no
    scale copies the earlier ones and the buffers keep one address (CUDA graphs replay against it)."""

    k_BHlc: torch.Tensor | None = None
    v_BHlc: torch.Tensor | None = None
    capacity: int = 0
    length: int = 0  # tokens written so far (static buffers only)

    @property
    def allocated(self) -> bool:
        return self.k_BHlc is not None

    def reset(self) -> None:
        """Start a new sampling call on the same buffers."""
        self.length = 0
        if self.capacity == 0:
            self.k_BHlc = self.v_BHlc = None

    def extend(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one scale's keys and values; return every key and value so far."""
        if self.capacity == 0:
            if self.k_BHlc is not None:
                k_BHlc = torch.cat((self.k_BHlc, k_BHlc), dim=2)
                v_BHlc = torch.cat((self.v_BHlc, v_BHlc), dim=2)
            self.k_BHlc, self.v_BHlc = k_BHlc, v_BHlc
            return k_BHlc, v_BHlc
        k_slot_BHlc, v_slot_BHlc = self.slots(v_BHlc, key_dtype=k_BHlc.dtype)
        k_slot_BHlc.copy_(k_BHlc)
        v_slot_BHlc.copy_(v_BHlc)
        return self.advance(k_BHlc.shape[2])

    def slots(self, like_BHlc: torch.Tensor, *, key_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the next scale's keys and values go in the static buffers, views [B, H, l, c] of
        ``like_BHlc``'s shape, for a caller to write in place before ``advance``; the buffers are allocated on
        first use, the keys' in ``key_dtype``, the values' in ``like_BHlc``'s dtype, on its device."""
        if self.k_BHlc is None:
            B, H, _, c = like_BHlc.shape
            self.k_BHlc = like_BHlc.new_empty(B, H, self.capacity, c, dtype=key_dtype)
            self.v_BHlc = like_BHlc.new_empty(B, H, self.capacity, c)
        start, end = self.length, self.length + like_BHlc.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} tokens cannot hold {end}")
        return self.k_BHlc[:, :, start:end], self.v_BHlc[:, :, start:end]

    def advance(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Count ``tokens`` more as written (``slots``); every key and value so far [B, H, length, c]."""
        self.length += tokens
        return self.k_BHlc[:, :, : self.length], self.v_BHlc[:, :, : self.length]


# How the training forward computes VAR's scale-causal attention (a token sees every token of its own and coarser
# scales). All three give the same numbers up to float rounding (tests/test_training_levers.py):
# - "masked": one SDPA call over all L x L pairs with an additive -inf bias (the published code's way; the float
#   bias keeps SDPA off its flash kernels and computes the 38% of pairs that are hidden at 680 tokens);
# - "per_scale": one unmasked SDPA call per scale, its queries against the keys of the scales up to it: exactly
#   the visible pairs, and every call may use the flash/efficient kernels (its backward: ``_PerScaleAttention``);
# - "flex": FlexAttention with a block mask of the layout (compiled on CUDA; eager elsewhere, which materialises
#   the scores and is slow: for tests).
ATTENTION_KERNELS = ("masked", "per_scale", "flex")


@dataclass(frozen=True)
class ScaleBlocks:
    """The scale-causal layout as token ranges: the queries of scale s, [ends[s-1], ends[s]), see keys [0, ends[s])."""

    ends: tuple[int, ...]


AttentionMask = torch.Tensor | ScaleBlocks | BlockMask | None
_compiled_flex = {}


def _flex(device_type: str):
    """flex_attention, compiled once per process on CUDA (the fused kernel); the eager reference elsewhere."""
    if device_type != "cuda":
        return flex_attention
    if "cuda" not in _compiled_flex:
        _compiled_flex["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex["cuda"]


def _autocast_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype autocast gives SDPA's inputs on this device (``default`` where autocast is off)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


def unhooked(module: nn.Module) -> bool:
    """No forward or backward hook on ``module`` (those of per-sample gradients: Opacus's, book-keeping's), so its
    computation may be folded into a neighbour's without anything missing its call."""
    return not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _own_backward(*tensors: torch.Tensor | None) -> bool:
    """Whether a gradient will flow through any of ``tensors`` outside a compiled region: where this module's
    autograd functions replace autograd's backward (dynamo traces the plain operations instead, and inductor fuses
    their backward itself)."""
    wanted = any(t is not None and t.requires_grad for t in tensors)
    return torch.is_grad_enabled() and wanted and not torch.compiler.is_compiling()


def _scale_pieces(qkv: Sequence[torch.Tensor], ends: tuple[int, ...]):
    """Per scale: its queries and the keys and values of the scales up to it, views [B, H, *, c]."""
    q_BHLc, k_BHLc, v_BHLc = qkv
    for start, end in zip((0, *ends[:-1]), ends, strict=True):
        yield q_BHLc[:, :, start:end], k_BHLc[:, :, :end], v_BHLc[:, :, :end]


class _PerScaleAttention(torch.autograd.Function):
    """The "per_scale" kernel with a backward that adds each scale's gradients into one buffer per input.

    Autograd's backward of a slice is a zero-filled gradient of the whole input: ten scales made 28 full-size
    [B, H, L, c] tensors per block (a whole-range slice makes none) and as many full-size adds, around attention
    kernels that compute far less. Here each scale's gradients are added into their ranges only. q, k and v are
    cast once to ``dtype`` (autocast's, which SDPA would apply to every call's slices, 2.5x the keys); k's and v's
    gradients are accumulated in float32 (or double), q's rows each written once, and all are returned in the
    inputs' own dtypes. Each scale's SDPA
    graph is built in the forward and differentiated in the backward: nothing is recomputed and the same kernels
    run. No double backward (create_graph=True raises)."""

    @staticmethod
    def forward(ctx, q_BHLc, k_BHLc, v_BHLc, ends: tuple[int, ...], scale: float, dtype: torch.dtype):
        inputs = (q_BHLc, k_BHLc, v_BHLc)
        ctx.dtypes, ctx.dtype, ctx.ends, ctx.graphs = [t.dtype for t in inputs], dtype, ends, []
        with torch.enable_grad():
            for pieces in _scale_pieces([t.detach().to(dtype) for t in inputs], ends):
                leaves = [
                    p.detach().requires_grad_(need) for p, need in zip(pieces, ctx.needs_input_grad[:3])
                ]
                ctx.graphs.append((leaves, F.scaled_dot_product_attention(*leaves, scale=scale)))
        return torch.cat([out_BHlc.detach() for _, out_BHlc in ctx.graphs], dim=2)

    @staticmethod
    def backward(ctx, grad_BHLc):
        # Grad mode is on in a backward only under create_graph=True: the sums below would cut the second derivative.
        if torch.is_grad_enabled():
            raise RuntimeError("per-scale attention has no double backward: use attention_kernel 'masked'")
        if ctx.graphs is None:
            raise RuntimeError(
                "Trying to backward through per-scale attention a second time: pass retain_graph=True to the first"
            )
        # A retained graph (Opacus's ghost clipping runs two backwards) keeps each scale's graph for the next;
        # otherwise their saved tensors go now, with the rest of this block's, not when the whole graph is freed.
        keep = torch._C._autograd._get_current_graph_task_keep_graph()
        # Half-precision k and v are accumulated in float32 and rounded once at the end. q's rows are each written
        # once: its buffer, in the promotion of q's dtype and the attention's, holds the attention's gradients exactly.
        sums = [torch.promote_types(dtype, torch.float32) for dtype in ctx.dtypes]
        sums[0] = torch.promote_types(ctx.dtypes[0], ctx.dtype)
        # q's buffer; k's and v's finest-scale gradients (every row) and the sums over the rows coarser scales see.
        q_grad, finest, coarse = None, [None, None, None], [None, None, None]
        starts = (0, *ctx.ends[:-1])
        # Finest scale first: its keys and values span every row and its gradients, kept as they come, hold the
        # finished gradients of the rows no coarser scale sees; the second finest starts the sums of the others (no
        # zero-filled buffer to add into). q's rows, one range per scale, are each written once.
        for (leaves, out_BHlc), start, end in reversed(list(zip(ctx.graphs, starts, ctx.ends, strict=True))):
            wanted = [i for i, leaf in enumerate(leaves) if leaf.requires_grad]
            grads = torch.autograd.grad(
                out_BHlc, [leaves[i] for i in wanted], grad_BHLc[:, :, start:end], retain_graph=keep
            )
            for i, grad in zip(wanted, grads, strict=True):
                if i == 0:  # q: this scale's rows only
                    if q_grad is None:
                        q_grad = grad_BHLc.new_empty(grad_BHLc.shape, dtype=sums[0])
                    q_grad[:, :, start:end].copy_(grad)
                elif finest[i] is None:  # a fresh tensor, ours
                    finest[i] = grad
                elif coarse[i] is None:
                    coarse[i] = _widened_sum(finest[i][:, :, :end], grad, sums[i])
                else:
                    coarse[i][:, :, :end].add_(grad)
        if not keep:
            ctx.graphs = None
        kv_grads = [_joined(finest[i], coarse[i], ctx.dtypes[i]) for i in (1, 2)]
        return (None if q_grad is None else q_grad.to(ctx.dtypes[0]), *kv_grads, None, None, None)


def _widened_sum(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a + b in ``dtype``: into ``a`` itself (a view of a tensor of ours) where that is its dtype, else written once
    into a new tensor, computed in ``dtype`` (a product by a broadcast one of ``dtype`` promotes the sum; the same
    bits as casting a first and adding b to it)."""
    if a.dtype == dtype:
        return a.add_(b)
    return torch.addcmul(a, b, _broadcast(a, 1.0, dtype), out=a.new_empty(a.shape, dtype=dtype))


def _broadcast(a: torch.Tensor, value: float, dtype: torch.dtype) -> torch.Tensor:
    """``value`` in ``dtype``, broadcast to a's shape (nothing written): beside a and b in an element-wise op it makes
    the op compute in ``dtype`` (type promotion) without a copy of either."""
    return a.new_full((), value, dtype=dtype).expand(a.shape)


def _joined(
    finest: torch.Tensor | None, coarse: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """A key's or value's gradient in ``dtype``: the finest scale's gradients with the sums of the rows coarser
    scales see (their leading rows) written over them, where the sums are not in them already."""
    if finest is None:
        return None
    grad = finest.to(dtype)
    if coarse is not None and coarse.dtype != finest.dtype:
        grad[:, :, : coarse.shape[2]].copy_(coarse)
    return grad


def scale_causal_attention(
    q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor, *, mask: AttentionMask, scale: float
) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v [B, H, L, c] for any of the mask forms of ``ATTENTION_KERNELS`` (None:
    every key visible, as in cached sampling)."""
    if mask is None or isinstance(mask, torch.Tensor):
        bias = None if mask is None else mask.to(q_BHLc.dtype)
        return F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, attn_mask=bias, scale=scale)
    # Autocast casts SDPA's inputs at every call (the per-scale calls' key prefixes add up to 2.5x the keys) and
    # has no rule for flex_attention, which would run in float32 (the qkv bias promotes q, k and v): cast once.
    dtype = _autocast_dtype(q_BHLc.device.type, q_BHLc.dtype)
    # Dynamo cannot trace the Function's inner autograd.grad: a compiled block traces the plain slices instead,
    # and their backward is compiled with the rest of the block's. (The Function casts inside, keeping the
    # gradients' dtypes.)
    if isinstance(mask, ScaleBlocks) and _own_backward(q_BHLc, k_BHLc, v_BHLc):
        return _PerScaleAttention.apply(q_BHLc, k_BHLc, v_BHLc, mask.ends, scale, dtype)
    qkv = [q_BHLc.to(dtype), k_BHLc.to(dtype), v_BHLc.to(dtype)]
    if isinstance(mask, BlockMask):
        return _flex(q_BHLc.device.type)(*qkv, block_mask=mask, scale=scale)
    return torch.cat(
        [F.scaled_dot_product_attention(*p, scale=scale) for p in _scale_pieces(qkv, mask.ends)], dim=2
    )


NORMALIZE_EPS = 1e-12  # F.normalize's


class _UnitVectors(torch.autograd.Function):
    """``F.normalize(x, dim=-1)`` [..., c] for training, times a per-head ``gain`` when one is given (the queries'
    learned scale; [1, H, 1, 1], or [B, H, 1, 1] with one copy per row): forward the same norm and clamp, then the
    quotient (no gain: F.normalize's bits) or one product by gain / norm (the published (x / norm) * gain up to a
    float32 rounding, one pass over x instead of two). Backward: three passes over x's size where autograd makes
    about ten through the division by an expanded norm (the quotient's two gradients, the norm's and their sum), and
    three more for the gain's product; the gain's gradient is reduced from per-row sums to the gain's shape (a
    per-row gain gets each row's own: the per-example gradients of DP-SGD at no extra pass).

    ``dtype`` None: the norm as ``Tensor.norm`` takes it (CUDA autocast: float32, so a bf16 x gives float32 unit
    vectors there, as F.normalize's), and the result in that type. ``dtype`` given (the attention's autocast
    dtype, which it casts q and k to): the norm in float32 from x's entries (as CUDA autocast takes it: its
    ``fp32_append_dtype`` policy adds the dtype, no copy of x), and the result written in ``dtype``, rounded once
    from float32 (the values the attention's cast gave). Its gradient then comes in ``dtype`` and is read as it
    comes, with the same float32 arithmetic (the products of two bf16 numbers are exact in float32): where the
    float32 result's gradient came through the cast's backward, which wrote a float32 copy of it, the same bits."""

    @staticmethod
    def forward(ctx, x_BHLc, gain, dtype: torch.dtype | None):
        unit_BHLc, n_BHL1, d_BHL1 = _unit_vectors_forward(x_BHLc, gain, dtype)
        ctx.save_for_backward(x_BHLc, n_BHL1, d_BHL1, gain)
        return unit_BHLc

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_BHLc):
        x_BHLc, n_BHL1, d_BHL1, gain = ctx.saved_tensors
        # y = a x / d, d = max(|x|, eps): dx = a (g - x (g.x) / (d |x|)) / d where |x| > eps (there d = |x|),
        # a g / d elsewhere (d is the constant eps); da = sum of (g.x) / d over the head's rows.
        gx_BHL1 = wide_products(grad_BHLc, x_BHLc, n_BHL1.dtype).sum(-1, keepdim=True)
        coef_BHL1 = torch.where(n_BHL1 > NORMALIZE_EPS, -gx_BHL1 / (d_BHL1 * d_BHL1), 0.0)
        rate_BHL1 = d_BHL1.reciprocal() if gain is None else gain / d_BHL1
        # The last pass scales and writes x's dtype at once (no float32 gradient and a cast after it).
        grad_x = torch.mul(
            torch.addcmul(grad_BHLc, x_BHLc, coef_BHL1), rate_BHL1, out=torch.empty_like(x_BHLc)
        )
        grad_gain = None
        if gain is not None and ctx.needs_input_grad[1]:
            # Summed over the gain's broadcast dimensions: (0, 2, 3) per head, (2, 3) per row.
            broadcast = [i for i, size in enumerate(gain.shape) if size == 1]
            grad_gain = (gx_BHL1 / d_BHL1).sum(broadcast, keepdim=True, dtype=torch.float32).to(gain.dtype)
        return grad_x, grad_gain, None


def _unit_vectors_forward(
    x_BHLc: torch.Tensor, gain: torch.Tensor | None, dtype: torch.dtype | None, *, keep_layout: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_UnitVectors``'s forward: (unit vectors [B, H, L, c], the norm and its clamp [B, H, L, 1]). The unit
    vectors are contiguous, or with ``keep_layout`` in x's dimension order (heads inside tokens for a view of the
    qkv product, as a plain quotient is written: an attention then writes its output so, and the output
    projection reads it without a copy)."""
    n_BHL1 = _last_dim_norms(x_BHLc, dtype)
    d_BHL1 = n_BHL1.clamp_min(NORMALIZE_EPS)
    out = None
    if dtype is not None and keep_layout:
        out = _empty_in_layout(x_BHLc, dtype)
    elif dtype is not None:
        out = x_BHLc.new_empty(x_BHLc.shape, dtype=dtype)
    if gain is None:
        return torch.div(x_BHLc, d_BHL1, out=out), n_BHL1, d_BHL1
    return torch.mul(x_BHLc, gain / d_BHL1, out=out), n_BHL1, d_BHL1


def _last_dim_norms(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The norms of x's last dimension [..., 1]: as ``Tensor.norm`` takes them where ``dtype`` is None, else in
    float32 from x's entries (CUDA autocast's rule for norms, with no copy of x)."""
    if dtype is None:
        return x.norm(2, dim=-1, keepdim=True)
    return torch.linalg.vector_norm(
        x, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32)
    )


def _empty_in_layout(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of x's shape in ``dtype``, its dimensions in x's memory order (a view's, e.g. heads inside
    tokens, as an element-wise result of x is laid out)."""
    order = sorted(range(x.ndim), key=x.stride, reverse=True)
    return torch.empty_permuted(x.shape, order, dtype=dtype, device=x.device)


def wide_products(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a * b`` computed and written in ``dtype`` (float32 for bf16 operands, in which their products are exact),
    without a copy of either operand in it: an ``addcmul`` onto a broadcast zero of ``dtype`` computes in that
    type (a plain product of two bf16 tensors rounds to bf16). ``out=``: CUDA autocast would copy the operands."""
    if torch.promote_types(a.dtype, b.dtype) == dtype:
        return a * b
    return torch.addcmul(_broadcast(a, 0.0, dtype), a, b, out=a.new_empty(a.shape, dtype=dtype))


def unit_vectors(
    x_BHLc: torch.Tensor, gain: torch.Tensor | None = None, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``F.normalize(x, dim=-1)`` [B, H, L, c], times ``gain`` ([1, H, 1, 1] or [B, H, 1, 1]) if given,
    differentiated by ``_UnitVectors`` when a gradient will flow (gradients equal up to rounding; with a gain the
    values too), and then written in ``dtype`` if given (the attention's autocast dtype; see ``_UnitVectors``).
    Without a gradient, the same forward (sampling: one pass over x, q and k written in the attention's dtype, so
    the KV cache holds them in it and the attention casts none of it). In a compiled block (inductor fuses the
    backward and the casts anyway), F.normalize and a product, as published."""
    if torch.compiler.is_compiling():
        unit_BHLc = F.normalize(x_BHLc, dim=-1)
        return unit_BHLc if gain is None else unit_BHLc * gain
    if _own_backward(x_BHLc, gain):
        return _UnitVectors.apply(x_BHLc, gain, dtype)
    return _unit_vectors_forward(x_BHLc, gain, dtype, keep_layout=True)[0]


def unit_qk_into_cache(
    qkv_BL3C: torch.Tensor, heads: int, gain: torch.Tensor, cache: KVCache, *, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sampling step's unit queries times ``gain`` [B, H, l, c] and every cached key and value so far
    [B, H, length, c], this scale's written into ``cache``'s static buffers: q's and k's norms in one reduction
    over both, k's unit vectors written straight into the cache and v copied there. The bits of ``unit_vectors``
    and ``KVCache.extend``, with three kernels fewer per block and scale (a norm, a clamp, k's copy)."""
    B, l, C3 = qkv_BL3C.shape  # noqa: E741
    q_BHlc, k_BHlc, v_BHlc = _head_views(qkv_BL3C, heads)
    qk_Bl2Hc = qkv_BL3C.view(B, l, 3, heads, C3 // (3 * heads))[:, :, :2]
    n_Bl2H1 = _last_dim_norms(qk_Bl2Hc, dtype)
    dq_BHl1, dk_BHl1 = n_Bl2H1.clamp_min(NORMALIZE_EPS).permute(2, 0, 3, 1, 4).unbind(0)
    out_dtype = torch.promote_types(qkv_BL3C.dtype, dq_BHl1.dtype) if dtype is None else dtype
    k_slot_BHlc, v_slot_BHlc = cache.slots(v_BHlc, key_dtype=out_dtype)
    torch.div(k_BHlc, dk_BHl1, out=k_slot_BHlc)
    v_slot_BHlc.copy_(v_BHlc)
    unit_q_BHlc = _empty_in_layout(q_BHlc, out_dtype)  # q's layout kept, as unit_vectors keeps it
    torch.mul(q_BHlc, gain / dq_BHl1, out=unit_q_BHlc)
    return (unit_q_BHlc, *cache.advance(l))


def query_gain(scale_mul_1H11: torch.Tensor) -> torch.Tensor:
    """The queries' per-head gain ``exp(min(scale_mul, ln 100))`` [1, H, 1, 1]."""
    return scale_mul_1H11.clamp_max(MAX_LOG_SCALE_MUL).exp()


def _modulated(ln_BLC: torch.Tensor, mul_B1C: torch.Tensor, shift_B1C: torch.Tensor, dtype: torch.dtype):
    """``ln * mul + shift`` [B, L, C] in ``dtype``, one pass (``out=``: also untouched by autocast)."""
    return torch.addcmul(shift_B1C, ln_BLC, mul_B1C, out=ln_BLC.new_empty(ln_BLC.shape, dtype=dtype))


class _Modulate(torch.autograd.Function):
    """AdaLN's ``ln * mul + shift`` [B, L, C] written straight in ``dtype`` (autocast's), which the linear layer it
    feeds would cast it to anyway. Forward: one pass in float32 arithmetic, rounded once to ``dtype``, where the
    product, the sum and autocast's cast made three passes (two of them writing float32). Where the kernel fuses
    the multiply-add, about 2 entries in 10^5 (bf16) differ from the cast of the twice-rounded float32 result: by
    one step of ``dtype``, or a few where ln * mul nearly cancels shift; the single rounding is the closer to the
    exact value. ``out=`` also keeps CUDA autocast from promoting the operands (addcmul is on its promote list).
    Backward: the output's gradient is read as it comes, in ``dtype``, where the cast's backward first wrote a
    float32 copy of it. For the same output gradient, ln's gradient ``grad * mul`` and the modulation's, the sums
    over L of ``grad * ln`` and of ``grad`` (float32), are autograd's."""

    @staticmethod
    def forward(ctx, ln_BLC, mul_B1C, shift_B1C, dtype: torch.dtype):
        ctx.save_for_backward(ln_BLC, mul_B1C)
        return _modulated(ln_BLC, mul_B1C, shift_B1C, dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_BLC):
        ln_BLC, mul_B1C = ctx.saved_tensors
        # mul in float32: two bf16 operands would be multiplied in bf16 and rounded before a float32 output.
        grad_ln = torch.mul(grad_BLC, mul_B1C.float()) if ctx.needs_input_grad[0] else None
        grad_mul = (grad_BLC * ln_BLC).sum(1, keepdim=True) if ctx.needs_input_grad[1] else None
        grad_shift = grad_BLC.sum(1, keepdim=True, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        return grad_ln, grad_mul, grad_shift, None


def modulate(ln_BLC: torch.Tensor, mul_B1C: torch.Tensor, shift_B1C: torch.Tensor) -> torch.Tensor:
    """AdaLN's modulation ``ln * mul + shift`` [B, L, C] of a normalised float32 stream (mul, shift [B, 1, C]).
    Under autocast it comes in autocast's dtype, which every consumer (a linear layer) casts it to anyway
    (``_Modulate``; with no gradient, the same single pass). Elsewhere, and in a compiled block (inductor fuses
    the chain itself), the published expression, in float32."""
    device_type = ln_BLC.device.type
    if (
        ln_BLC.dtype != torch.float32
        or not torch.is_autocast_enabled(device_type)
        or torch.compiler.is_compiling()
    ):
        return ln_BLC * mul_B1C + shift_B1C
    dtype = torch.get_autocast_dtype(device_type)
    if _own_backward(ln_BLC, mul_B1C, shift_B1C):
        return _Modulate.apply(ln_BLC, mul_B1C, shift_B1C, dtype)
    return _modulated(ln_BLC, mul_B1C, shift_B1C, dtype)


class _SplitHeads(torch.autograd.Function):
    """``split_heads`` with a backward that writes q's, k's and v's gradients straight into one [B, L, 3C] tensor:
    autograd's stacked them ([3, B, H, L, c]) and then copied the stack into qkv's layout (the view's backward of a
    permuted gradient), two passes over 3C per token where this makes one."""

    @staticmethod
    def forward(ctx, qkv_BL3C: torch.Tensor, heads: int):
        ctx.dtype = qkv_BL3C.dtype
        ctx.set_materialize_grads(False)  # an unused piece's gradient comes as None, not a zero-filled tensor
        return _head_views(qkv_BL3C, heads)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads_BHLc):
        like = next(g for g in grads_BHLc if g is not None)
        B, H, L, c = like.shape
        grad_BL3Hc = like.new_empty(B, L, 3, H, c, dtype=ctx.dtype)
        for i, grad_BHLc in enumerate(grads_BHLc):
            if grad_BHLc is None:  # no gradient came through this one (frozen keys, say)
                grad_BL3Hc[:, :, i].zero_()
            else:
                grad_BL3Hc[:, :, i].copy_(grad_BHLc.transpose(1, 2))
        return grad_BL3Hc.view(B, L, 3 * H * c), None


def _head_views(qkv_BL3C: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    B, L, C3 = qkv_BL3C.shape
    return qkv_BL3C.view(B, L, 3, heads, C3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def split_heads(qkv_BL3C: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k and v [B, H, L, c], views of qkv [B, L, 3C] (``_SplitHeads`` when a gradient flows outside a compiled
    region: the same values and gradients, one pass fewer backward)."""
    if _own_backward(qkv_BL3C) and qkv_BL3C.is_contiguous():
        return _SplitHeads.apply(qkv_BL3C, heads)
    return _head_views(qkv_BL3C, heads)


class SelfAttention(nn.Module):
    """Multi-head attention; with ``attn_l2_norm`` q and k are unit vectors per head and q is scaled by the
    learned ``exp(min(scale_mul_1H11, ln 100))`` (softmax scale 1)."""

    def __init__(self, width: int, num_heads: int, *, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_l2_norm = num_heads, width // num_heads, attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(width)), nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))  # keys get no bias (kept for the key layout)
        self.proj = nn.Linear(width, width)
        # Empty slots (no state-dict keys) for modules that take over q_bias/v_bias and scale_mul_1H11: a
        # per-sample-gradient patch (trainables/patches.py) assigns them; see add_qkv_bias / unit_queries.
        self.register_module("qkv_bias", None)
        self.register_module("head_scale", None)

    def forward(
        self, x_BLC: torch.Tensor, *, attn_mask: AttentionMask, kv_cache: KVCache | None = None
    ) -> torch.Tensor:
        B, L, C = x_BLC.shape
        q_BHLc, k_BHLc, v_BHLc = split_heads(self.qkv_with_bias(x_BLC), self.num_heads)
        if self.attn_l2_norm:
            # Under autocast, written in the dtype the attention takes them in (None: as F.normalize's).
            dtype = _autocast_dtype(x_BLC.device.type, None)
            q_BHLc = self.unit_queries(q_BHLc, dtype=dtype)
            k_BHLc = unit_vectors(k_BHLc, dtype=dtype)
        if kv_cache is not None:
            k_BHLc, v_BHLc = kv_cache.extend(k_BHLc, v_BHLc)
        out_BHLc = scale_causal_attention(q_BHLc, k_BHLc, v_BHLc, mask=attn_mask, scale=self.scale)
        return self.proj(out_BHLc.transpose(1, 2).reshape(B, L, C))

    def step(
        self, x_BlC: torch.Tensor, *, kv_cache: KVCache, constants: SamplingConstants | None = None
    ) -> torch.Tensor:
        """Cached sampling: one scale's tokens [B, l, C] attend to every cached token and their own.
        ``constants``: ``sampling_constants()`` of this call (None: made here, as at every scale)."""
        B, l, C = x_BlC.shape  # noqa: E741
        bias_3C, gain, qkv, proj = (None,) * 4 if constants is None else constants
        qkv_BlC = self.qkv_with_bias(x_BlC, bias_3C=bias_3C, weight=None if qkv is None else qkv[0])
        q_BHlc, k_BHlc, v_BHlc = _head_views(qkv_BlC, self.num_heads)
        # as the training forward: in the attention's dtype under autocast
        dtype = _autocast_dtype(x_BlC.device.type, None) if self.attn_l2_norm else None
        into_cache = self._unit_qk_into_cache(qkv_BlC, gain, kv_cache, dtype=dtype)
        if into_cache is not None:
            q_BHlc, k_BHLc, v_BHLc = into_cache
        else:
            if self.attn_l2_norm:
                q_BHlc = self.unit_queries(q_BHlc, dtype=dtype, gain=gain)
                k_BHlc = unit_vectors(k_BHlc, dtype=dtype)
            k_BHLc, v_BHLc = kv_cache.extend(k_BHlc, v_BHlc)
        out_BHlc = F.scaled_dot_product_attention(q_BHlc, k_BHLc, v_BHLc, scale=self.scale)
        return linear(self.proj, out_BHlc.transpose(1, 2).reshape(B, l, C), proj)

    def _unit_qk_into_cache(
        self,
        qkv_BlC: torch.Tensor,
        gain: torch.Tensor | None,
        kv_cache: KVCache,
        *,
        dtype: torch.dtype | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``unit_qk_into_cache`` where it gives the separate path's bits with nothing missing: unit q and k, a
        static cache, eager, no gradient to form (of qkv or of the queries' gain), the gain's module unhooked;
        None elsewhere. ``gain``: the call's (None: made here)."""
        scale = self.head_scale
        if not self.attn_l2_norm or kv_cache.capacity == 0 or torch.compiler.is_compiling():
            return None
        if scale is not None and not unhooked(scale):
            return None
        if gain is None:
            gain = query_gain((self if scale is None else scale).scale_mul_1H11)
        if _own_backward(qkv_BlC, gain):
            return None
        return unit_qk_into_cache(qkv_BlC, self.num_heads, gain, kv_cache, dtype=dtype)

    def sampling_constants(self, device_type: str, *, casts: bool = True) -> SamplingConstants:
        """What a cached step makes of this module's parameters alone, once per sampling call instead of at each
        scale (four kernels of a block's ~29 per scale): the q/v biases (q_bias, 0, v_bias) [3C] in the dtype the
        qkv product takes them in (autocast's, else the weight's: the one cast F.linear would repeat), the
        queries' gain [1, H, 1, 1] (None without ``attn_l2_norm``), and with ``casts`` mat_qkv's and proj's
        ``frozen_cast`` (else None: a compiled step casts inside its graph). The same numbers as the step's own."""
        bias_3C = self.biases_3C().to(_autocast_dtype(device_type, self.mat_qkv.weight.dtype))
        owner = self if self.head_scale is None else self.head_scale
        gain = query_gain(owner.scale_mul_1H11) if self.attn_l2_norm else None
        if not casts:
            return bias_3C, gain, None, None
        return bias_3C, gain, frozen_cast(self.mat_qkv, device_type), frozen_cast(self.proj, device_type)

    def qkv_with_bias(
        self,
        x_BlC: torch.Tensor,
        *,
        bias_3C: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``add_qkv_bias(mat_qkv(x))`` [B, l, 3C]. When ``mat_qkv`` is a plain Linear and neither it nor the patch
        module holding the biases (if one does) is hooked, the bias goes into the product itself, as the published
        code's ``F.linear`` adds it (one addmm instead of a matmul and an add over 3C). A wrapping layer that offers
        ``linear_plus_bias(x, bias_fn)`` (LoRA's, when nothing hooks it) is asked to add the biases in its product
        the same way (``bias_fn()`` makes them, called only if it does). Otherwise the modules are called, so the hooks of per-sample gradients see their calls.
        ``bias_3C``: those biases made already (``sampling_constants``), used where they are folded; ``weight``:
        mat_qkv's weight as the call's ``frozen_cast`` made it (a plain Linear's only)."""
        mat, biases = self.mat_qkv, self.qkv_bias
        foldable = unhooked(mat) and (biases is None or unhooked(biases))
        if type(mat) is nn.Linear and foldable:
            return F.linear(
                x_BlC,
                mat.weight if weight is None else weight,
                self.biases_3C().to(mat.weight.dtype) if bias_3C is None else bias_3C,
            )
        # A wrapping layer (LoRA's) may add a bias inside its own product: ``linear_plus_bias`` (None: it cannot).
        plus_bias = getattr(mat, "linear_plus_bias", None) if foldable else None
        bias_fn = self.biases_3C if bias_3C is None else lambda: bias_3C
        qkv_BL3C = None if plus_bias is None else plus_bias(x_BlC, bias_fn)
        return self.add_qkv_bias(mat(x_BlC)) if qkv_BL3C is None else qkv_BL3C

    def biases_3C(self) -> torch.Tensor:
        """(q_bias, 0, v_bias) [3C] from whichever module holds them (this one, or a patch's ``qkv_bias``)."""
        owner = self if self.qkv_bias is None else self.qkv_bias
        return torch.cat((owner.q_bias, self.zero_k_bias, owner.v_bias))

    # The two uses of this module's own parameters go through a submodule when one fills the slot (it then owns
    # the parameters, for per-sample gradients), with the same numbers.
    def add_qkv_bias(self, qkv_BL3C: torch.Tensor) -> torch.Tensor:
        """qkv [B, L, 3C] plus the biases in qkv's dtype: under autocast, as the published code's ``F.linear`` adds
        them (a float32 bias would promote q, k and v to float32, twice the bytes through the norms and casts)."""
        if self.qkv_bias is not None:
            return self.qkv_bias(qkv_BL3C)
        return qkv_BL3C + self.biases_3C().to(qkv_BL3C.dtype)

    def unit_queries(
        self, q_BHLc: torch.Tensor, *, dtype: torch.dtype | None = None, gain: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Unit queries [B, H, L, c] times the per-head ``exp(min(scale_mul, ln 100))``, the gain folded into the
        normalisation (``unit_vectors``, the result in ``dtype`` if given). Where a patch's ``head_scale`` holds the
        scale and is hooked, per-sample gradients need its own call: it gives the gain once per row [B, H, 1, 1]
        (its input, an empty [B, 0], only counts the rows and holds no activation), and the gradient reaching it
        is each row's, which the normalisation's backward forms anyway. ``gain``: the gain made already
        (``sampling_constants``), used where it is not hooked."""
        scale = self.head_scale
        if scale is not None and not unhooked(scale):
            return unit_vectors(q_BHLc, scale(q_BHLc.new_empty(q_BHLc.shape[0], 0)), dtype=dtype)
        if gain is None:
            gain = query_gain((self if scale is None else scale).scale_mul_1H11)
        return unit_vectors(q_BHLc, gain, dtype=dtype)


class SharedAdaLin(nn.Linear):
    """``shared_aln=True`` variant: one modulation linear for all blocks, output [B, 1, 6, C]."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.out_features // 6)


def residual_sum(x_BLC: torch.Tensor, h_BLC: torch.Tensor, gamma_B1C: torch.Tensor) -> torch.Tensor:
    """x + h * gamma [B, L, C] in x's dtype (float32), in one pass: addcmul's ``out=`` form, which CUDA autocast
    leaves alone. Its plain form is on CUDA autocast's promote list: a bf16 branch beside the float32 stream would
    first be copied to float32 in full."""
    return torch.addcmul(x_BLC, h_BLC, gamma_B1C, out=torch.empty_like(x_BLC))


class _AddBranch(torch.autograd.Function):
    """A block's residual ``x + h * gamma`` [B, L, C] (x float32, h the branch [B, L, C], gamma [B, 1, C],
    ``residual_sum``) with autograd's gradients of ``torch.addcmul`` bit for bit in fewer passes: h's gradient
    ``grad * gamma`` is written straight in h's dtype, where autograd wrote it in float32 and then cast it (to
    bf16 under autocast), and gamma's, the sum over L of ``grad * h``, skips autograd's first pass over h, its
    product with addcmul's scalar 1."""

    @staticmethod
    def forward(ctx, x_BLC, h_BLC, gamma_B1C):
        ctx.save_for_backward(h_BLC, gamma_B1C)
        return residual_sum(x_BLC, h_BLC, gamma_B1C)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_BLC):
        h_BLC, gamma_B1C = ctx.saved_tensors
        grad_h = (
            torch.mul(grad_BLC, gamma_B1C, out=torch.empty_like(h_BLC)) if ctx.needs_input_grad[1] else None
        )
        grad_gamma = (grad_BLC * h_BLC).sum(1, keepdim=True) if ctx.needs_input_grad[2] else None
        return grad_BLC if ctx.needs_input_grad[0] else None, grad_h, grad_gamma


class AdaLNSelfAttn(nn.Module):
    """Transformer block with adaptive LayerNorm conditioned on the class embedding.

    ``ada_lin(cond)`` gives gamma1, gamma2, scale1, scale2, shift1, shift2 (in that order), each [B, 1, C].
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        mlp_ratio: float,
        drop_path: float,
        attn_l2_norm: bool,
        shared_aln: bool,
    ):
        super().__init__()
        self.width, self.shared_aln = width, shared_aln
        self.drop_path = (
            DropPath(drop_path) if drop_path > 0 else nn.Identity()
        )  # upstream's layout: block 0 has none
        self.attn = SelfAttention(width, num_heads, attn_l2_norm=attn_l2_norm)
        self.ffn = FFN(width, round(width * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(width, eps=LN_EPS, elementwise_affine=False)
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def modulation(self, cond_BD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.shared_aln:
            return (self.ada_gss + cond_BD).unbind(2)  # cond is shared_ada_lin's [B, 1, 6, C]
        return self.ada_lin(cond_BD).view(-1, 1, 6, self.width).unbind(2)

    def forward(
        self,
        x_BLC: torch.Tensor,
        *,
        cond_BD: torch.Tensor,
        attn_mask: AttentionMask,
        kv_cache: KVCache | None = None,
        drop_path_scale_B2: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attn_mask``: the scale-causal layout in one of the forms of ``scale_causal_attention`` (None: all keys
        visible). ``drop_path_scale_B2``: the rows' drop-path factors for the attention and FFN branches
        (``drop_path_scales``; None: no drop-path)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond_BD)
        s_attn_B, s_ffn_B = (None, None) if drop_path_scale_B2 is None else drop_path_scale_B2.unbind(1)
        h_BLC = self.attn(
            modulate(self.ln_wo_grad(x_BLC), 1 + scale1, shift1), attn_mask=attn_mask, kv_cache=kv_cache
        )
        x_BLC = self._add_branch(x_BLC, h_BLC, gamma1, s_attn_B)
        h_BLC = self.ffn(modulate(self.ln_wo_grad(x_BLC), 1 + scale2, shift2))
        return self._add_branch(x_BLC, h_BLC, gamma2, s_ffn_B)

    def drop_path_scales(self, uniform_B2: torch.Tensor) -> torch.Tensor | None:
        """The rows' drop-path factors [B, 2] for ``forward`` from their uniforms [B, 2] (attention, FFN); None
        in eval mode or for a block without drop-path (block 0). Outside ``forward``, so a compiled block never
        reads p (``DropPath``)."""
        if not self.training or not isinstance(self.drop_path, DropPath):
            return None
        return self.drop_path.row_scale(uniform_B2)

    def sampling_modulation(self, cond_BD: torch.Tensor, *, casts: bool = True) -> tuple:
        """(gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2), each [B, 1, C], the attention's
        ``sampling_constants`` and the FFN's ``sampling_weights`` (with ``casts``, else None), for ``step``: the
        condition and the parameters are the same at every scale, so sampling computes these once per call
        instead of once per scale."""
        device_type = cond_BD.device.type
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond_BD)
        constants = self.attn.sampling_constants(device_type, casts=casts)
        ffn = self.ffn.sampling_weights(device_type) if casts else (None, None)
        return gamma1, gamma2, 1 + scale1, 1 + scale2, shift1, shift2, constants, ffn

    def step(self, x_BlC: torch.Tensor, *, modulation: tuple, kv_cache: KVCache) -> torch.Tensor:
        """Cached sampling (eval: no drop-path) of one scale's tokens [B, l, C] with ``sampling_modulation``."""
        gamma1, gamma2, mul1, mul2, shift1, shift2, constants, ffn = modulation
        h_BlC = self.attn.step(
            modulate(self.ln_wo_grad(x_BlC), mul1, shift1), kv_cache=kv_cache, constants=constants
        )
        x_BlC = self._add_branch(x_BlC, h_BlC, gamma1, None)
        h_BlC = self.ffn.step(modulate(self.ln_wo_grad(x_BlC), mul2, shift2), ffn)
        return self._add_branch(x_BlC, h_BlC, gamma2, None)

    def _add_branch(
        self, x_BLC: torch.Tensor, h_BLC: torch.Tensor, gamma_B1C: torch.Tensor, scale_B: torch.Tensor | None
    ) -> torch.Tensor:
        """x + h * gamma, the rows' drop-path factors (None: none) folded into gamma: one pass over [B, L, C] where
        the product, the factor and the sum made three (and, under autocast, a float32 copy of the branch), and a
        float32 stream's backward through ``_AddBranch``. The product is not rounded to bf16 before the float32
        residual; a bf16 residual stream stays bf16."""
        if scale_B is not None:
            gamma_B1C = self.drop_path(gamma_B1C, scale_B)
        if x_BLC.dtype != torch.float32 or torch.compiler.is_compiling():
            return torch.addcmul(x_BLC, h_BLC, gamma_B1C).to(x_BLC.dtype)
        if _own_backward(x_BLC, h_BLC, gamma_B1C):
            return _AddBranch.apply(x_BLC, h_BLC, gamma_B1C)
        return residual_sum(x_BLC, h_BLC, gamma_B1C)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.ln_wo_grad = nn.LayerNorm(width, eps=LN_EPS, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale_B1C, shift_B1C = self.ada_lin(cond_BD).view(-1, 1, 2, self.width).unbind(2)
        return modulate(self.ln_wo_grad(x_BLC), 1 + scale_B1C, shift_B1C)

    def sampling_modulation(self, cond_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 + scale, shift), each [B, 1, C]: computed once per sampling call (the condition is fixed)."""
        scale_B1C, shift_B1C = self.ada_lin(cond_BD).view(-1, 1, 2, self.width).unbind(2)
        return 1 + scale_B1C, shift_B1C

    def step(self, x_BlC: torch.Tensor, modulation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mul_B1C, shift_B1C = modulation
        return modulate(self.ln_wo_grad(x_BlC), mul_B1C, shift_B1C)


def scale_layout(patch_nums: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(lvl_1L: scale index of every token [1, L] int64, attn_bias_11LL: 0 where the query's scale >= the key's
    scale else -inf [1, 1, L, L]) for row-major tokens of each scale, scales concatenated coarse to fine."""
    lvl_L = torch.cat([torch.full((pn * pn,), si, dtype=torch.long) for si, pn in enumerate(patch_nums)])
    visible_LL = lvl_L[:, None] >= lvl_L[None, :]
    attn_bias_LL = torch.where(visible_LL, 0.0, -torch.inf)
    return lvl_L[None], attn_bias_LL[None, None]


class VAR(nn.Module):
    def __init__(
        self,
        *,
        depth: int,
        num_classes: int,
        patch_nums: Sequence[int],
        vocab_size: int,
        z_channels: int,
        embed_dim: int,
        num_heads: int,
        attn_l2_norm: bool,
        shared_aln: bool,
        drop_path_rate: float,
        mlp_ratio: float = 4.0,
        attention_kernel: str = "masked",
    ):
        super().__init__()
        self.depth, self.num_classes, self.width, self.num_heads = depth, num_classes, embed_dim, num_heads
        self.patch_nums, self.vocab_size, self.z_channels = tuple(patch_nums), vocab_size, z_channels
        self.seq_len = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.attn_l2_norm, self.shared_aln, self.drop_path_rate = attn_l2_norm, shared_aln, drop_path_rate
        self.mlp_ratio = mlp_ratio
        if attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {attention_kernel!r}")
        self.attention_kernel = attention_kernel  # may be changed between forwards
        self._block_masks: dict[str, BlockMask] = {}  # flex block masks by device (built once, not weights)
        C = embed_dim
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.seq_len, C))
        # Empty slots (no state-dict keys) for modules that take over pos_start / pos_1LC: a per-sample-gradient
        # patch (trainables/patches.py) assigns them; see add_start_position / add_positions.
        self.register_module("pos_start_add", None)
        self.register_module("pos_1LC_add", None)
        lvl_1L, attn_bias_11LL = scale_layout(self.patch_nums)
        self.register_buffer("lvl_1L", lvl_1L)
        self.register_buffer("attn_bias_for_masking", attn_bias_11LL)
        self.word_embed = nn.Linear(z_channels, C)
        self.class_emb = nn.Embedding(num_classes + 1, C)  # last row: the unconditional class
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        self.shared_ada_lin = (
            nn.Sequential(nn.SiLU(), SharedAdaLin(C, 6 * C)) if shared_aln else nn.Identity()
        )
        drop_path_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # block 0: none
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(
                C,
                num_heads,
                mlp_ratio=mlp_ratio,
                drop_path=drop_path_rates[i],
                attn_l2_norm=attn_l2_norm,
                shared_aln=shared_aln,
            )
            for i in range(depth)
        )
        self.head_nm = AdaLNBeforeHead(C)
        self.head = nn.Linear(C, vocab_size)

    @property
    def architecture(self) -> dict:
        """The ``build_var`` keyword arguments that rebuild this model's layout (saved beside checkpoints)."""
        return dict(
            depth=self.depth,
            num_classes=self.num_classes,
            patch_nums=self.patch_nums,
            vocab_size=self.vocab_size,
            z_channels=self.z_channels,
            embed_dim=self.width,
            num_heads=self.num_heads,
            attn_l2_norm=self.attn_l2_norm,
            shared_aln=self.shared_aln,
            drop_path_rate=self.drop_path_rate,
        )

    def attention_mask(self, device: torch.device) -> AttentionMask:
        """The training forward's scale-causal layout in the form ``self.attention_kernel`` computes it with."""
        kernel = self.attention_kernel
        if kernel == "masked":
            return self.attn_bias_for_masking
        if kernel == "per_scale":
            ends = [pn * pn for pn in self.patch_nums]
            return ScaleBlocks(tuple(sum(ends[: i + 1]) for i in range(len(ends))))
        if kernel == "flex":
            key = str(device)
            if key not in self._block_masks:
                lvl_L = self.lvl_1L[0].to(device)
                self._block_masks[key] = create_block_mask(
                    lambda b, h, q, k: lvl_L[q] >= lvl_L[k],
                    None,
                    None,
                    self.seq_len,
                    self.seq_len,
                    device=key,
                )
            return self._block_masks[key]
        raise ValueError(f"attention_kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")

    @property
    def unconditional_label(self) -> int:
        return self.num_classes

    def init_weights(
        self,
        *,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-3,
        init_head: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        """From-scratch init of the VAR recipe: Linear/Embedding/positional weights ~ N(0, 1/(3C)) (truncated at
        +-2), biases 0; head x0.02; head_nm modulation x0.5; proj and fc2 / sqrt(2*depth); block modulation rows
        scale/shift x init_adaln and gamma x init_adaln_gamma (small gamma: blocks start near identity)."""
        std = math.sqrt(1 / (3 * self.width))
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.trunc_normal_(module.weight, std=std, generator=generator)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
            for param in (self.pos_start, self.pos_1LC):
                nn.init.trunc_normal_(param, std=std, generator=generator)
            self.head.weight.mul_(init_head)
            self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
            gains_R = self._modulation_gains(init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma)
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
                block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
                if self.shared_aln:
                    block.ada_gss.normal_(generator=generator).div_(math.sqrt(self.width)).mul_(
                        gains_R.view(1, 1, 6, self.width)
                    )
                else:
                    block.ada_lin[-1].weight.mul_(gains_R[:, None])

    def _modulation_gains(self, *, init_adaln: float, init_adaln_gamma: float) -> torch.Tensor:
        gains_R = torch.full((6 * self.width,), init_adaln, device=self.head.weight.device)
        gains_R[: 2 * self.width] = init_adaln_gamma  # gamma1, gamma2 come first
        return gains_R

    def _check_inputs(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> None:
        expected = (label_B.shape[0], self.seq_len - self.first_l, self.z_channels)
        if label_B.ndim != 1 or tuple(x_BLCv_wo_first_l.shape) != expected:
            raise ValueError(
                f"expected label_B [B] and x_BLCv_wo_first_l {list(expected)}, got {list(label_B.shape)} and {list(x_BLCv_wo_first_l.shape)}"
            )

    def embed_tokens(
        self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embeddings [B, L, C], class condition [B, C])."""
        B = label_B.shape[0]
        cond_BC = self.class_emb(label_B)
        sos_BlC = self.add_start_position(cond_BC[:, None].expand(B, self.first_l, -1))
        words_BLC = self.word_embed(x_BLCv_wo_first_l.to(self.word_embed.weight.dtype))
        x_BLC = torch.cat((sos_BlC, words_BLC), dim=1)
        # contiguous level ids: per-sample-gradient tools reshape an embedding's input with view()
        return self.add_positions(x_BLC + self.lvl_embed(self.lvl_1L.expand(B, -1).contiguous())), cond_BC

    # The root module's own parameters are used only here, through a submodule when one fills the slot (it then
    # owns the parameter), so per-sample-gradient tools never treat the whole VAR as one layer.
    def add_start_position(self, sos_BlC: torch.Tensor) -> torch.Tensor:
        """Start tokens [B, first_l, C] plus the learned start position."""
        if self.pos_start_add is not None:
            return self.pos_start_add(sos_BlC)
        return sos_BlC + self.pos_start

    def add_positions(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """Tokens [B, L, C] (or the first l of them) plus the learned absolute positions."""
        if self.pos_1LC_add is not None:
            return self.pos_1LC_add(x_BLC)
        return x_BLC + self.pos_1LC[:, : x_BLC.shape[1]]

    def logits(self, x_BLC: torch.Tensor, cond_BC: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(x_BLC, cond_BC)).float()

    @property
    def drop_path_branches(self) -> int:
        """Residual branches with drop-path (2 per block, attention and FFN), 0 when the rate is 0."""
        return 2 * self.depth if self.drop_path_rate > 0 else 0

    def forward(
        self,
        label_B: torch.Tensor,
        x_BLCv_wo_first_l: torch.Tensor,
        *,
        drop_path_uniform_BD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced training forward: labels [B] (``num_classes`` = unconditional) and the VQVAE's
        ``idxBl_to_var_input`` [B, L-first_l, Cvae] -> logits [B, L, V] (float32). No class dropout here.
        ``drop_path_uniform_BD``: uniforms [B, 2*depth] deciding each row's drop-path in every block (attention,
        FFN), so a row's stochastic depth depends on no other row; None draws from torch's global generator."""
        self._check_inputs(label_B, x_BLCv_wo_first_l)
        if drop_path_uniform_BD is not None and tuple(drop_path_uniform_BD.shape) != (
            label_B.shape[0],
            2 * self.depth,
        ):
            raise ValueError(
                f"drop_path_uniform_BD must be [B={label_B.shape[0]}, 2*depth={2 * self.depth}], got {list(drop_path_uniform_BD.shape)}"
            )
        x_BLC, cond_BC = self.embed_tokens(label_B, x_BLCv_wo_first_l)
        block_cond, attn_mask = self.shared_ada_lin(cond_BC), self.attention_mask(x_BLC.device)
        if self.training and self.drop_path_rate > 0 and drop_path_uniform_BD is None:
            drop_path_uniform_BD = torch.rand(x_BLC.shape[0], 2 * self.depth, device=x_BLC.device)
        for i, block in enumerate(self.blocks):
            x_BLC = block(
                x_BLC,
                cond_BD=block_cond,
                attn_mask=attn_mask,
                drop_path_scale_B2=None
                if drop_path_uniform_BD is None
                else block.drop_path_scales(drop_path_uniform_BD[:, 2 * i : 2 * i + 2]),
            )
        return self.logits(x_BLC, cond_BC)

    @torch.no_grad()
    def sample(
        self,
        label_B: torch.Tensor,
        *,
        vqvae: VQVAE,
        cfg: float,
        top_k: int,
        top_p: float,
        generator: torch.Generator | None = None,
        compiled: bool = False,
        pad_to: int | None = None,
    ) -> torch.Tensor:
        """Class-conditional sampling with classifier-free guidance and a KV cache.

        label_B [B] int64 (``num_classes`` = unconditional); guidance at scale si is ``t = cfg * si/(S-1)`` on
        logits ``(1+t)*cond - t*uncond``; ``top_k=0`` / ``top_p=0`` disable those filters. ``generator`` is
        advanced, never re-seeded, so successive calls give new samples. Returns images [B, 3, H, W] in [0, 1].
        Runs in eval mode (drop-path off) whatever the module's mode, and restores it. ``compiled``: each scale's
        step (blocks, head, guidance, filter) runs torch.compile'd, one graph per scale shape (CUDA graphs on
        CUDA); the same draws as eager up to float rounding. The first call per batch size compiles (slow).
        ``pad_to`` (>= B): the steps run at this batch size, the labels repeated to fill it, so that one compile
        serves every batch up to it; only the B real rows draw from ``generator`` and are decoded, so the images
        are the unpadded call's up to float rounding.
        """
        settings = {"cfg": cfg, "top_k": top_k, "top_p": top_p, "generator": generator, "pad_to": pad_to}
        f_hat_BChw, _ = self._sample_eval_mode(label_B, vqvae=vqvae, compiled=compiled, **settings)
        # float32 before mapping [-1, 1] to [0, 1]: under autocast the decoder returns bf16, whose 8-bit mantissa
        # would round the shifted values to fewer levels than uint8 pixels have
        return vqvae.fhat_to_img(f_hat_BChw).float().add(1).mul(0.5)

    @torch.no_grad()
    def sample_tokens(
        self,
        label_B: torch.Tensor,
        *,
        vqvae: VQVAE,
        cfg: float,
        top_k: int,
        top_p: float,
        generator: torch.Generator | None = None,
        compiled: bool = False,
        pad_to: int | None = None,
    ) -> list[torch.Tensor]:
        """Like ``sample`` but returns the drawn token indices, one [B, pn*pn] int64 tensor per scale."""
        settings = {"cfg": cfg, "top_k": top_k, "top_p": top_p, "generator": generator, "pad_to": pad_to}
        return self._sample_eval_mode(label_B, vqvae=vqvae, compiled=compiled, **settings)[1]

    def _sample_eval_mode(
        self,
        label_B: torch.Tensor,
        *,
        vqvae: VQVAE,
        cfg: float,
        top_k: int,
        top_p: float,
        generator: torch.Generator | None,
        compiled: bool,
        pad_to: int | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self._check_sampling_args(label_B, vqvae=vqvae, cfg=cfg, top_k=top_k, top_p=top_p)
        device = self.class_emb.weight.device
        if generator is not None and generator.device.type != device.type:
            raise ValueError(
                f"the generator is on {generator.device.type}, the model on {device.type}: draw with "
                f"torch.Generator({device.type!r})"
            )
        label_B = label_B.to(device)  # labels built on the host (torch.tensor([...])) for a model on a GPU
        B = label_B.shape[0]
        if pad_to is not None and pad_to < B:
            raise ValueError(f"pad_to ({pad_to}) must be at least the batch ({B})")
        padded_B = label_B if pad_to is None else label_B[torch.arange(pad_to, device=label_B.device) % B]
        was_training = self.training
        self.eval()
        try:
            f_hat_BChw, idx_per_scale = self._sample_fhat(
                padded_B,
                vqvae=vqvae,
                cfg=cfg,
                top_k=top_k,
                top_p=top_p,
                generator=generator,
                compiled=compiled,
                real=B,
            )
        finally:
            self.train(was_training)
        return f_hat_BChw[:B], [idx_Bl[:B] for idx_Bl in idx_per_scale]

    def _check_sampling_args(
        self, label_B: torch.Tensor, *, vqvae: VQVAE, cfg: float, top_k: int, top_p: float
    ) -> None:
        if label_B.ndim != 1 or label_B.numel() == 0 or label_B.dtype != torch.long:
            raise ValueError(
                f"label_B must be a non-empty 1-D int64 tensor, got {label_B.dtype} {list(label_B.shape)}"
            )
        if bool(((label_B < 0) | (label_B > self.num_classes)).any()):
            raise ValueError(
                f"labels must be in [0, {self.num_classes}] ({self.num_classes} = unconditional), got {label_B.tolist()}"
            )
        if (
            vqvae.patch_nums != self.patch_nums
            or vqvae.vocab_size != self.vocab_size
            or vqvae.z_channels != self.z_channels
        ):
            raise ValueError(
                f"VQVAE (patch_nums={vqvae.patch_nums}, V={vqvae.vocab_size}, Cvae={vqvae.z_channels}) does not match "
                f"VAR (patch_nums={self.patch_nums}, V={self.vocab_size}, Cvae={self.z_channels})"
            )
        check_sampling_settings(cfg=cfg, top_k=top_k, top_p=top_p)

    def _sample_fhat(
        self,
        label_B: torch.Tensor,
        *,
        vqvae: VQVAE,
        cfg: float,
        top_k: int,
        top_p: float,
        generator: torch.Generator | None,
        compiled: bool = False,
        real: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(f_hat [B, Cvae, full, full], tokens per scale [B, pn*pn]); only the first ``real`` rows (default all)
        draw from ``generator``, the others (padding) take code 0 and leave the random stream alone."""
        B, S, full = label_B.shape[0], len(self.patch_nums), self.patch_nums[-1]
        cond_2BC = self.class_emb(torch.cat((label_B, torch.full_like(label_B, self.unconditional_label))))
        block_cond = self.shared_ada_lin(cond_2BC)
        # The condition is the same at every scale: modulate once per call, not once per scale. So are the frozen
        # weights: cast once per call (``frozen_cast``), except into a compiled step (CUDA graphs would copy them
        # into the graph's inputs at every replay).
        device_type, casts = cond_2BC.device.type, not compiled
        block_mods = [block.sampling_modulation(block_cond, casts=casts) for block in self.blocks]
        head_mod = self.head_nm.sampling_modulation(cond_2BC)
        head_weights = frozen_cast(self.head, device_type) if casts else None
        word_weights = frozen_cast(self.word_embed, device_type)
        lvl_pos_1LC = self.add_positions(self.lvl_embed(self.lvl_1L))
        next_2BlC = (
            self.add_start_position(cond_2BC[:, None].expand(-1, self.first_l, -1))
            + lvl_pos_1LC[:, : self.first_l]
        )
        caches = _sampling_caches(self, batch=2 * B, device=cond_2BC.device, compiled=compiled)
        step = _compiled_scale_probs(cond_2BC.device) if compiled else _scale_probs
        # f_hat lives in the tokenizer's dtype, the next scale's input in this model's (they may differ)
        f_hat_BChw = cond_2BC.new_zeros(
            B, self.z_channels, full, full, dtype=vqvae.quantize.embedding.weight.dtype
        )
        idx_per_scale, cur = [], 0
        for si, pn in enumerate(self.patch_nums):
            cur += pn * pn
            # static buffers are allocated by an eager step (never inside a graph, whose outputs it may reuse)
            run = step if caches[0].allocated else _scale_probs
            probs_NV = run(
                self,
                next_2BlC,
                block_mods=block_mods,
                head_mod=head_mod,
                head_weights=head_weights,
                caches=caches,
                t=cfg * si / (S - 1),
                top_k=top_k,
                top_p=top_p,
            )
            if compiled and cond_2BC.device.type == "cuda" and si == 0:
                _pin_addresses(caches)
            idx_Bl = _draw(probs_NV, rows=(B if real is None else real) * pn * pn, generator=generator)
            idx_Bl = idx_Bl.view(B, pn * pn)
            idx_per_scale.append(idx_Bl)
            h_BChw = vqvae.quantize.embedding(idx_Bl).transpose(1, 2).reshape(B, self.z_channels, pn, pn)
            f_hat_BChw, next_BChw = vqvae.quantize.next_autoregressive_input(si, f_hat_BChw, h_BChw)
            if si != S - 1:
                next_BlCv = next_BChw.flatten(2).transpose(1, 2).to(self.word_embed.weight.dtype)
                words_BlC = linear(self.word_embed, next_BlCv, word_weights)
                next_2BlC = (words_BlC + lvl_pos_1LC[:, cur : cur + self.patch_nums[si + 1] ** 2]).repeat(
                    2, 1, 1
                )
        return f_hat_BChw, idx_per_scale


def _draw(probs_NV: torch.Tensor, *, rows: int, generator: torch.Generator | None) -> torch.Tensor:
    """One code per row [N] (int64) from probabilities [N, V]: the first ``rows`` drawn, as a multinomial over
    those rows alone draws them (the random stream does not depend on padding rows), the rest code 0."""
    if rows == probs_NV.shape[0]:
        return torch.multinomial(probs_NV, num_samples=1, generator=generator).view(-1)
    idx_N = probs_NV.new_zeros(probs_NV.shape[0], dtype=torch.long)
    idx_N[:rows] = torch.multinomial(probs_NV[:rows], num_samples=1, generator=generator).view(-1)
    return idx_N


def _scale_probs(
    var: VAR,
    x_2BlC: torch.Tensor,
    *,
    block_mods: Sequence[tuple[torch.Tensor, ...]],
    head_mod: tuple[torch.Tensor, torch.Tensor],
    head_weights: LinearWeights | None = None,
    caches: Sequence[KVCache],
    t: float,
    top_k: int,
    top_p: float,
) -> torch.Tensor:
    """One scale of guided sampling: conditional and unconditional tokens [2B, l, C] (rows B: are the
    unconditional copies) through every block and the head, guided logits ``(1+t)*cond - t*uncond``, filtered
    -> sampling probabilities [B*l, V] (float32). Draws nothing, so compiling it leaves the random stream alone.
    ``head_weights``: the head's ``frozen_cast`` for the call (None: its own call)."""
    for block, modulation, cache in zip(var.blocks, block_mods, caches):
        x_2BlC = block.step(x_2BlC, modulation=modulation, kv_cache=cache)
    logits_2BlV = linear(var.head, var.head_nm.step(x_2BlC, head_mod), head_weights).float()
    B = x_2BlC.shape[0] // 2
    logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
    return top_k_top_p_probs(logits_BlV, top_k=top_k, top_p=top_p)


_COMPILED_STEPS: dict[str, object] = {}
# One graph per scale (token count), batch size, guidance t and filter: more than dynamo's default of 8 per code
# object, after which it would silently fall back to eager.
_RECOMPILE_LIMIT = 256
# Static KV buffers of the compiled CUDA path, kept per model and batch layout: CUDA graphs replay against fixed
# addresses, so a new allocation per call would record the graphs again.
_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_scale_probs(device: torch.device):
    """``_scale_probs`` under torch.compile (dynamic=False; "reduce-overhead", i.e. CUDA graphs, on CUDA)."""
    key = device.type
    if key not in _COMPILED_STEPS:
        mode = "reduce-overhead" if key == "cuda" else "default"
        _COMPILED_STEPS[key] = torch.compile(_scale_probs, dynamic=False, mode=mode)
    compiled = _COMPILED_STEPS[key]

    def run(*args, **kwargs) -> torch.Tensor:
        if key == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            return compiled(*args, **kwargs)

    return run


def _sampling_caches(var: VAR, *, batch: int, device: torch.device, compiled: bool) -> list[KVCache]:
    """Static KV caches [batch, H, L, c] per block: fresh per call, except for the compiled CUDA path, which
    reuses the buffers of its model, batch size and autocast setting."""
    if not (compiled and device.type == "cuda"):
        return [KVCache(capacity=var.seq_len) for _ in var.blocks]
    autocast = torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
    key = (batch, str(device), autocast, var.head.weight.dtype)
    per_model = _STATIC_CACHES.setdefault(var, {})
    if key not in per_model:
        per_model[key] = [KVCache(capacity=var.seq_len) for _ in var.blocks]
    for cache in per_model[key]:
        cache.reset()
    return per_model[key]


def release_sampling_caches(var: VAR) -> None:
    """Free the static KV caches that compiled CUDA sampling keeps for ``var``, one set per batch size and
    autocast setting (at a large batch, tens of GiB): a caller moving on to another batch size frees the last
    one's. A later compiled call at a released size allocates anew and records its CUDA graphs again."""
    _STATIC_CACHES.pop(var, None)


def _pin_addresses(caches: Sequence[KVCache]) -> None:
    """Mark the static buffers as fixed-address graph inputs, so CUDA graphs may write them in place."""
    for cache in caches:
        torch._dynamo.mark_static_address(cache.k_BHlc)
        torch._dynamo.mark_static_address(cache.v_BHlc)


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (isinstance(value, int) or math.isfinite(value))
    )


def check_sampling_settings(*, cfg: float, top_k: int, top_p: float) -> None:
    """Raise ValueError naming the first bad argument: the ranges ``bench.schema.EvaluationConfig`` accepts
    (finite cfg >= 0; integer top_k >= 0, 0 = off; finite 0 <= top_p < 1, 0 = off). A bool is no number here."""
    if not (_is_number(cfg) and cfg >= 0):
        raise ValueError(f"cfg must be a finite number >= 0, got {cfg!r}")
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not (_is_number(top_p) and 0 <= top_p < 1):
        raise ValueError(f"top_p must be a finite number in [0, 1) (0 = off), got {top_p!r}")


def sample_top_k_top_p(
    logits_BlV: torch.Tensor, *, top_k: int, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Filter logits to the top-k and to the smallest set holding probability mass top_p, then draw one index
    per position [B, l] with ``torch.multinomial`` (the generator advances as for an unfiltered draw)."""
    B, l, _ = logits_BlV.shape  # noqa: E741
    probs_NV = top_k_top_p_probs(logits_BlV, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs_NV, num_samples=1, generator=generator).view(B, l)


def top_k_top_p_probs(logits_BlV: torch.Tensor, *, top_k: int, top_p: float) -> torch.Tensor:
    """Sampling probabilities [B*l, V] (float32) of logits [B, l, V] kept, as the official sampler keeps them, to
    every code whose logit is at least the top_k-th largest (0 = all; ties at the k-th are all kept: bf16 logits
    tie often) and of those to the fewest, most likely, holding probability mass top_p (0 = off; the most likely
    code always stays). Only the k largest logits are sorted (``topk``), not all V: the codes tied with the k-th
    that ``topk`` left out share its logit, so they sit at the bottom of the sorted order and are counted, not
    sorted. No host synchronisation and no data-dependent shape."""
    V = logits_BlV.shape[-1]
    logits_NV = logits_BlV.float().reshape(-1, V)
    k = top_k if 0 < top_k < V else V
    if k == V and top_p == 0:
        return logits_NV.softmax(dim=-1)
    kept_NK, code_NK = logits_NV.topk(k, dim=-1, sorted=top_p > 0)
    kth_N1 = kept_NK.amin(dim=-1, keepdim=True)
    if top_p == 0:
        return logits_NV.masked_fill(logits_NV < kth_N1, -torch.inf).softmax(dim=-1)
    # Ties with the k-th logit that topk left out (none when k = V: top-p alone reads no V-wide mask).
    extra_NV = (logits_NV == kth_N1).scatter_(-1, code_NK, False) if k < V else None
    extra_N1 = extra_NV.sum(dim=-1, keepdim=True) if extra_NV is not None else kth_N1.new_zeros(kth_N1.shape)
    # Probabilities over the top-k codes and the extra ties, shifted by the largest logit.
    weights_NK = (kept_NK - kept_NK[:, :1]).exp()
    tie_weight_N1 = (kth_N1 - kept_NK[:, :1]).exp()
    total_N1 = weights_NK.sum(dim=-1, keepdim=True) + extra_N1 * tie_weight_N1
    # The mass of each code and every less likely one, summed from the least likely up (as a full ascending sort
    # would, the extra ties lowest): a code goes when that mass is at most 1 - top_p, i.e. the codes above it
    # already hold top_p.
    tail_NK = (weights_NK.flip(-1).cumsum(dim=-1).flip(-1) + extra_N1 * tie_weight_N1) / total_N1
    drop_NK = tail_NK <= 1 - top_p
    drop_NK[:, 0] = False  # always keep the most likely code
    filtered_NV = torch.full_like(logits_NV, -torch.inf).scatter_(
        -1, code_NK, kept_NK.masked_fill(drop_NK, -torch.inf)
    )
    if extra_NV is None:
        return filtered_NV.softmax(dim=-1)
    # int32 ranks (exact to 2**24): half the bytes of cumsum's default int64, the same float32 products.
    extra_tail_NV = extra_NV.cumsum(dim=-1, dtype=torch.int32) * (tie_weight_N1 / total_N1)
    keep_extra_NV = extra_NV & (extra_tail_NV > 1 - top_p)  # the i-th extra tie holds i tie masses below it
    return torch.where(keep_extra_NV, kth_N1, filtered_NV).softmax(dim=-1)


def validate_var_layout(
    *,
    depth: int,
    num_classes: int,
    patch_nums: Sequence[int],
    vocab_size: int,
    z_channels: int,
    embed_dim: int,
    num_heads: int,
    drop_path_rate: float,
) -> None:
    """Raise ValueError naming the bad argument; called before any allocation."""
    if depth < 1 or num_classes < 1 or vocab_size < 2 or z_channels < 1:
        raise ValueError(
            f"need depth >= 1, num_classes >= 1, vocab_size >= 2, z_channels >= 1; got {depth}, {num_classes}, {vocab_size}, {z_channels}"
        )
    if len(patch_nums) < 2 or list(patch_nums) != sorted(set(patch_nums)) or patch_nums[0] < 1:
        raise ValueError(
            f"patch_nums must be >= 2 strictly increasing positive ints, got {tuple(patch_nums)}"
        )
    if num_heads < 1 or embed_dim % num_heads:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")


def build_var(
    *,
    depth: int,
    num_classes: int,
    patch_nums: Sequence[int],
    vocab_size: int,
    z_channels: int,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    attn_l2_norm: bool = True,
    shared_aln: bool = False,
    drop_path_rate: float | None = None,
    attention_kernel: str = "masked",
    init_adaln_gamma: float = 1e-3,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VAR:
    """Build a VAR of the official family: width 64*depth and ``depth`` heads unless given, drop-path up to
    0.1*depth/24 unless given; initialised from scratch (``generator`` makes it reproducible). ``device="meta"``
    allocates nothing."""
    embed_dim = 64 * depth if embed_dim is None else embed_dim
    num_heads = depth if num_heads is None else num_heads
    drop_path_rate = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
    validate_var_layout(
        depth=depth,
        num_classes=num_classes,
        patch_nums=patch_nums,
        vocab_size=vocab_size,
        z_channels=z_channels,
        embed_dim=embed_dim,
        num_heads=num_heads,
        drop_path_rate=drop_path_rate,
    )
    with torch.device(device or "cpu"):
        var = VAR(
            depth=depth,
            num_classes=num_classes,
            patch_nums=patch_nums,
            vocab_size=vocab_size,
            z_channels=z_channels,
            embed_dim=embed_dim,
            num_heads=num_heads,
            attn_l2_norm=attn_l2_norm,
            shared_aln=shared_aln,
            drop_path_rate=drop_path_rate,
            attention_kernel=attention_kernel,
        )
    if str(device) != "meta":
        var.init_weights(init_adaln_gamma=init_adaln_gamma, generator=generator)
    return var.to(dtype=dtype) if dtype is not None else var
