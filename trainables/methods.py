"""Adaptation methods: which parameters of a pre-trained VAR are trained, as plain functions behind a registry.

``adapt(var, method, num_classes=..., seed=...)`` (``method``: the trial config's ``bench.schema.MethodConfig``) gives
the base VAR the target label set, applies the per-sample-gradient patches (the same
model structure with and without DP), then the method: ``full`` (every parameter), LoRA presets via peft
(``lora`` = attention + MLP + the blocks' AdaLN modulation, the paper's main setting; ``lora_attention``;
``lora_mlp``) or ``ln_tuning`` (peft LayerNorm tuning of the blocks' ``ada_lin.1``: VAR's LayerNorms have no
weights, the modulation linears are its norm parameters). The new class embedding is always trained.
``train_blocks`` restricts any method to a subset of the transformer blocks (selective layer tuning).

``adapt`` returns what it did as an ``Adaptation`` record (nothing is hidden on the model): ``save_adapter`` takes
it, and ``load_adapter`` returns the one it read. Adapter files hold exactly the trainable tensors; with the base
checkpoint they restore the fine-tuned model. The peft methods' adapters are also written in peft's own format
(``trainables.peft_format``: a folder ``peft.PeftModel.from_pretrained`` loads, built from ``peft_config``, the
same configuration ``adapt`` injects); ``load_adapter`` reads such a folder too.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample
from opacus.grad_sample.utils import register_norm_sampler
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from bench.schema import LORA_PRESETS, ConfigError, MethodConfig

from . import bookkeeping
from .models.checkpoints import (
    CLASS_NAMES,
    CheckpointError,
    check_sidecar,
    class_names_entry,
    read_verified,
    recorded_class_names,
    resize_class_embedding,
    save_tensors,
)
from .models.var import VAR, unhooked
from .patches import OPACUS_PATCHES, apply_patches, patches_applied

# Module paths inside a block, by role (REFERENCE.md §3: LoRA on mat_qkv, proj, fc1, fc2 and the blocks' ada_lin.1).
LORA_TARGET_GROUPS = {
    "attention": ("attn.mat_qkv", "attn.proj"),
    "mlp": ("ffn.fc1", "ffn.fc2"),
    "modulation": ("ada_lin.1",),
}
CLASS_EMBEDDING = "class_emb"  # the VAR module of the new label set: trained whole by every method
# The methods that train peft adapters (saved in peft's own format too, ``trainables.peft_format``).
PEFT_METHODS = (*LORA_PRESETS, "ln_tuning")
FULL_HAS_NO_ADAPTER = (
    "full fine-tuning changes the base weights themselves, so there is no adapter to hand to peft: "
    "export the whole fine-tuned model with official_export_state (an official-layout VAR checkpoint) "
    "or keep save_adapter's adapter.pt (all trained tensors)"
)


@dataclass(frozen=True)
class Adaptation:
    """What ``adapt`` did to a VAR: the method (the trial config's section, checked at its construction), the
    label count, the seed of the new class rows and adapter initialisation, the per-sample-gradient patches
    applied (``trainables.patches`` names) and the SHA-256 of the base checkpoint file (None: not given).
    Saved in an adapter's sidecar (the SHA-256 as its ``base_sha256``)."""

    method: MethodConfig
    num_classes: int
    seed: int = 0
    patches: tuple[str, ...] = OPACUS_PATCHES
    base_sha256: str | None = None

    def target_groups(self) -> tuple[str, ...]:
        return self.method.lora_targets or LORA_PRESETS[self.method.name]

    def to_dict(self) -> dict[str, Any]:
        """The sidecar's ``adaptation`` record (the base SHA-256 is saved beside it, as ``base_sha256``)."""
        return {
            "method": dataclasses.asdict(self.method),
            "num_classes": self.num_classes,
            "seed": self.seed,
            "patches": list(self.patches),
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], *, base_sha256: str | None = None) -> Adaptation:
        """An adapter sidecar's record; also reads the flat ``AdaptationSpec`` dict adapters saved before the
        method became the config's ``MethodConfig`` ({"method": name, "lora_rank": ..., ...}), and records
        without ``patches`` (saved when ``adapt`` always applied ``OPACUS_PATCHES``)."""
        method = record["method"]
        if isinstance(method, str):  # the older flat layout
            method = {
                "name": method,
                **{k: v for k, v in record.items() if k not in ("method", "num_classes", "seed", "patches")},
            }
        tuples = {k: tuple(v) for k in ("lora_targets", "train_blocks") if (v := method.get(k)) is not None}
        return cls(
            method=MethodConfig(**{**method, **tuples}),
            num_classes=int(record["num_classes"]),
            seed=int(record.get("seed", 0)),
            patches=tuple(record.get("patches", OPACUS_PATCHES)),
            base_sha256=base_sha256,
        )


def _blocks_pattern(adaptation: Adaptation, depth: int) -> str:
    train_blocks = adaptation.method.train_blocks
    blocks = range(depth) if train_blocks is None else train_blocks
    return "(" + "|".join(str(b) for b in sorted(set(blocks))) + ")"


def check_adaptable(var: VAR, method: MethodConfig, *, num_classes: int) -> None:
    """``ConfigError`` for what ``adapt`` cannot do to ``var`` (a meta-device build will do), raised before it
    changes anything: a method that trains nothing, no classes, blocks beyond the model's depth."""
    if method.name not in METHODS:  # "base" is a MethodConfig name too: it evaluates the base model
        raise ConfigError(
            f"method.name: {method.name!r} trains nothing, so there is nothing to adapt; trained methods: "
            f"{sorted(METHODS)}"
        )
    if num_classes < 1:
        raise ConfigError(f"num_classes: must be >= 1, got {num_classes}")
    _check_blocks(method, depth=var.depth)


def _check_blocks(method: MethodConfig, *, depth: int) -> None:
    """A TrialConfig checks train_blocks against model.depth; adapt() and peft_config may be given any model."""
    if method.train_blocks is not None and max(method.train_blocks) >= depth:
        raise ConfigError(
            f"method.train_blocks: {method.train_blocks} names a block beyond the model's depth {depth}"
        )


def _full(var: VAR, adaptation: Adaptation) -> None:
    pattern = re.compile(rf"blocks\.{_blocks_pattern(adaptation, var.depth)}\.")
    for name, param in var.named_parameters():
        param.requires_grad_(adaptation.method.train_blocks is None or bool(pattern.match(name)))


class _CastOnce(torch.autograd.Function):
    """x cast to ``dtype`` once for two consumers [*, in]: the same values as two casts, and the consumers'
    gradients summed in x's float32, bit for bit as autograd sums those of two casts, with one cast fewer forward
    and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.input_dtype = x.dtype
        y = x.to(dtype)
        return y, y.view_as(y)

    @staticmethod
    def backward(ctx, grad_first: torch.Tensor, grad_second: torch.Tensor):
        return grad_first.to(ctx.input_dtype).add_(grad_second), None


def _no_double_backward() -> None:
    """Called first in a backward that sums outside autograd: grad mode is on there only under create_graph=True,
    where the sums would silently cut the second derivative."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "varsweep's LoRA layer forms its sums outside autograd: no double backward (create_graph=True); "
            "merge the adapters into the base weights first (trainables.methods.merge_adapters)"
        )


class _BaseAndTap(torch.autograd.Function):
    """A frozen base layer's output [N, out] of x [..., in], and x again ([..., in], a view) for the adapter's
    lora_A, which stays a module call (hooks see it): this backward then receives lora_A's input gradient and
    accumulates the base's into it in place (``addmm_``), where autograd wrote both [N, in] products and added
    them: 4 bytes per bf16 input entry fewer (8 in float32), the sum rounded once."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        x_Ni = x.reshape(-1, x.shape[-1])
        # the bias in the product's epilogue (cuBLASLt), as F.linear adds it
        base_No = x_Ni @ weight.t() if bias is None else torch.addmm(bias, x_Ni, weight.t())
        return base_No, x.view_as(x)

    @staticmethod
    def backward(ctx, grad_base_No, grad_tap):
        _no_double_backward()
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        # lora_A's input gradient, fresh from its backward and seen by no hook (``_input_gradient_unseen``): written
        # in place (a copy where it is not contiguous)
        grad_x = grad_tap.contiguous()
        grad_x.view(-1, grad_x.shape[-1]).addmm_(grad_base_No, weight)
        return grad_x, None, None


class _LoraProducts(torch.autograd.Function):
    """y = x W^T + b + (s x A^T) B^T [..., out], LoRA's layer without hooks, for x and weights in one half dtype
    (the frozen base's kept cast; the adapter weights' casts, whose backward takes their gradients to float32).
    Backward: autograd's products for the adapter weights' gradients; the input gradient's two products summed in
    one. Where autograd wrote each of two [N, features] products and then added them, the sum is formed inside a
    product, rounded once, in one of two ways:
    - accumulated in place (``addmm_``) into the product made first: one read and one write of the sum (an
      ``addmm`` into a new tensor would first copy its addend there, CUDA's kernel, as many bytes as the add);
    - with ``joined`` (the base weight's kept cast with the adapter's rank of spare columns, [out, in + r], or rows,
      [out + r, in]), one product over the base's and the adapter's inner dimensions together: the forward's
      [x | s x A^T] [W | B]^T where out > in (mat_qkv, fc1), the backward's [g | s g B] [W ; A] where
      in > out (fc2). It copies x (or g) next to the adapter's [N, r] and writes the adapter's weight into the spare
      columns (rows): per row, 4 bytes per input entry (output entry) where the in-place sum moved 4 per output entry
      (input entry), so each layer takes it on the side where it saves."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling: float, joined=None):
        rank, (out_features, in_features) = lora_A.shape[0], weight.shape
        x_Ni = x.view(-1, in_features)
        ctx.scaling, ctx.weight = scaling, weight
        # ``joined`` and ``weight`` (its view) live on between steps and the spare columns (rows) are rewritten
        # at every call: held on ctx, not saved, so those writes do not invalidate a pending backward, which
        # never reads them.
        ctx.joined = joined if joined is not None and joined.shape[0] > out_features else None
        # The output written into the returned tensor (a view returned by a Function could not be changed in place)
        y = x.new_empty(*x.shape[:-1], out_features)
        y_No = y.view(-1, out_features)
        if joined is not None and joined.shape[1] > in_features:
            xa_Nk = x.new_empty(x_Ni.shape[0], in_features + rank)
            xa_Nk[:, :in_features].copy_(x_Ni)
            x_Ni, a_Nr = xa_Nk[:, :in_features], xa_Nk[:, in_features:]
            joined[:, in_features:].copy_(lora_B)
            factors = (xa_Nk, joined.t())
        else:
            a_Nr = x.new_empty(x_Ni.shape[0], rank)
            factors = (x_Ni, weight.t())
        a_Nr.addmm_(x_Ni, lora_A.t(), beta=0, alpha=scaling)  # s x A^T, rounded once
        if bias is None:
            torch.mm(*factors, out=y_No)
        else:  # the bias in the product's epilogue (cuBLASLt), as F.linear adds it
            torch.addmm(bias, *factors, out=y_No)
        if factors[0] is x_Ni:  # the adapter's product accumulated into the base's
            y_No.addmm_(a_Nr, lora_B.t())
        ctx.save_for_backward(x_Ni, lora_A, lora_B, a_Nr)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        _no_double_backward()
        x_Ni, lora_A, lora_B, a_Nr = ctx.saved_tensors
        g_No = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[4]:
            grad_B = g_No.t() @ a_Nr  # [out, r], the weight's own layout (a transposed one would be copied)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[3]):
            return grad_x, None, None, grad_A, grad_B, None, None
        joined, out_features = ctx.joined if ctx.needs_input_grad[0] else None, g_No.shape[1]
        if joined is None:
            grad_a_Nr = g_No.new_empty(g_No.shape[0], lora_B.shape[1])
        else:
            ga_Nk = g_No.new_empty(g_No.shape[0], joined.shape[0])
            ga_Nk[:, :out_features].copy_(g_No)
            grad_a_Nr = ga_Nk[:, out_features:]
        grad_a_Nr.addmm_(g_No, lora_B, beta=0, alpha=ctx.scaling)  # s g B, rounded once
        if ctx.needs_input_grad[3]:
            grad_A = grad_a_Nr.t() @ x_Ni
        if ctx.needs_input_grad[0]:
            if joined is None:
                grad_x_Ni = (g_No @ ctx.weight).addmm_(grad_a_Nr, lora_A)
            else:
                joined[out_features:].copy_(lora_A)
                grad_x_Ni = ga_Nk @ joined
            grad_x = grad_x_Ni.view(grad_y.shape[:-1] + (x_Ni.shape[-1],))
        return grad_x, None, None, grad_A, grad_B, None, None


class AccumulatingLinear(nn.Linear):
    """``nn.Linear`` whose call can add its product into a given output in place: ``layer(x, into=y)`` with x
    [..., in] and y [N, out] (N rows of x; no view, and used no more after the call) adds x W^T + b into y and
    returns it shaped [..., out]. LoRA's ``lora_B``: the adapter's product accumulated into the base layer's
    output, where writing the product and then adding the two moved 10 bytes per bf16 output entry and this moves
    6 (the base's write, then one read and one write), while per-sample-gradient hooks still see a call with the
    adapter's input. What a forward hook gets as the output is y, the product's sum with what y held: its gradient
    is the product's (book-keeping's hook takes only that), its values are not the product's. Without ``into``,
    ``nn.Linear``; its per-sample rules are ``nn.Linear``'s (registered below)."""

    def forward(self, x: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        if into is None:
            return super().forward(x)
        into.addmm_(x.reshape(-1, x.shape[-1]), self.weight.to(into.dtype).t())
        if self.bias is not None:
            into.add_(self.bias.to(into.dtype))
        # Shaped as x without a view that autograd tracks (matmul's way): a gradient hook on a tracked view is
        # dropped if the caller then changes the output in place (as the published VAR's blocks scale theirs);
        # on this tensor it is kept, and gets the output's gradient from before that change.
        return torch.ops.aten._unsafe_view(into, (*x.shape[:-1], into.shape[-1]))

    @classmethod
    def holding(cls, layer: nn.Linear) -> AccumulatingLinear:
        """One holding ``layer``'s parameters (made on the meta device: no initialisation, no random draws)."""
        held = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        held.weight, held.bias = layer.weight, layer.bias
        return held


register_grad_sampler(AccumulatingLinear)(compute_linear_grad_sample)  # Opacus's hooks
register_norm_sampler(AccumulatingLinear)(compute_linear_norm_sample)  # Opacus's ghost clipping
bookkeeping.RULES[AccumulatingLinear] = bookkeeping.RULES[nn.Linear]


def _plain_unhooked(layer: nn.Module) -> bool:
    """An adapter layer whose call may be folded into a neighbour's product: a bias-free ``nn.Linear`` that no
    per-sample-gradient hook (DP) needs to see called."""
    return type(layer) in (nn.Linear, AccumulatingLinear) and layer.bias is None and unhooked(layer)


def _input_gradient_unseen(layer: nn.Module) -> bool:
    """No hook can see or keep ``layer``'s input gradient: no backward hook on it nor on every module (global ones),
    and its forward hooks, which could hook its input, only book-keeping's (they keep its input and take its
    output's gradient)."""
    hooks = torch.nn.modules.module
    global_hooks = (
        hooks._global_backward_hooks,
        hooks._global_backward_pre_hooks,
        hooks._global_forward_hooks,
        hooks._global_forward_pre_hooks,
    )
    if layer._backward_hooks or layer._backward_pre_hooks or any(global_hooks):
        return False
    return bookkeeping.hooks_are_book_keeping_s(layer)


def _accumulates(layer: nn.Module) -> bool:
    """``lora_B`` may be called with ``into`` (``AccumulatingLinear``): no backward hook (Opacus's hooks and ghost
    clipping wrap a module's output for theirs, and get the plain call). Forward hooks see the call, with the
    layer's output as its output (book-keeping's takes the gradient there, which is lora_B's output's)."""
    return isinstance(layer, AccumulatingLinear) and not (layer._backward_hooks or layer._backward_pre_hooks)


class LoraLinear(peft.tuners.lora.layer.Linear):
    """peft's LoRA linear layer, y = base(x) + B(A x) * scaling, with the same parameters, state-dict keys, merge and
    export, and a forward that moves fewer bytes under autocast (the step's input and output are [B, L, features]):
    - no copy of a bf16 input in float32: peft casts the input to the adapter's dtype, which under autocast made a
      float32 copy of fc2's and proj's bf16 inputs that autocast then cast straight back, a full-size round trip
      each way of the step for the same values;
    - a float32 input (ada_lin's condition; mat_qkv and fc1 get AdaLN's modulation in the autocast dtype already)
      cast to the autocast dtype once for the base layer and the adapter, which autocast cast once each
      (``_CastOnce``; compiled blocks fuse the casts themselves and keep two);
    - the scaling applied to A x [B, L, r] rather than to the layer's full-width product, in the forward and, by
      autograd, the backward: B(A x * s) = B(A x) * s up to rounding, and bit for bit where s is a power of two
      (varsweep's default rank 16, alpha 32: s = 2). ``lora_B``'s hooks (DP) see A x * s, whose per-example
      gradient is exactly this layer's;
    - its product accumulated into the base output (``addmm_``), in lora_B's own call where a hook (DP's
      book-keeping) must see it (``AccumulatingLinear``): the sum rounded once, not the adapter's product and then
      the sum, and one full-width pass fewer forward (the backward is the same);
    - under autocast, the frozen base weight's cast kept between steps (``_base_output``);
    - without hooks, under autocast, a half-precision input's gradient formed in one product sum, and the output
      of a layer with more outputs than inputs (the gradient of one with more inputs) as one product over the
      base's and the adapter's inner dimensions together, with no accumulating pass (``_LoraProducts``);
    - elsewhere (hooked adapters, float32), the frozen base's input gradient accumulated into lora_A's in place
      (``_BaseAndTap``) where autograd wrote both and added them.
    Anything else goes to peft's forward: merged or disabled adapters, several active adapters, mixed batches, LoRA
    variants, a lora_B bias (peft scales it), and, outside autocast, an input whose dtype is not the adapter's (peft
    casts it)."""

    def _single_adapter(self) -> str | None:
        """The one active, unmerged adapter of the plain LoRA variant that this layer's own paths compute; None
        where peft's forward is left to."""
        names = [name for name in self.active_adapters if name in self.lora_A]
        plain = not (self.disable_adapters or self.merged or self.lora_variant)
        # peft scales lora_B's bias with its product; these paths scale the rank side only
        plain = plain and not any(self.lora_bias.get(name) for name in names)
        return names[0] if plain and len(names) == 1 else None

    def linear_plus_bias(self, x: torch.Tensor, bias_fn: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """This layer's output plus a frozen bias [out], ``bias_fn()`` (the attention's q/v biases on mat_qkv's
        output, made only if used), the bias added inside the base product as a Linear's own bias is
        (``_fused_products``: no full-width add after it), or None where that path does not run or the bias
        trains (the caller adds the bias after calling the layer)."""
        if torch.compiler.is_compiling():  # a compiled block adds it after, fused by inductor
            return None
        name = self._single_adapter()
        device = x.device.type
        if name is None or device == "meta" or not torch.is_autocast_enabled(device):
            return None
        merged = self._merged_product(x, name, extra_bias=bias_fn)
        if merged is not None:
            return merged
        return self._fused_products(x, name, autocast=True, extra_bias=bias_fn)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._single_adapter()
        if args or kwargs or name is None:
            return super().forward(x, *args, **kwargs)
        merged = self._merged_product(x, name)
        if merged is not None:
            return merged
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        device = x.device.type
        autocast = device != "meta" and torch.is_autocast_enabled(device)  # no autocast state on meta
        if not autocast and x.dtype != lora_A.weight.dtype:
            return super().forward(x, *args, **kwargs)
        x_base = x_adapter = x
        if autocast and x.dtype == torch.float32 and not torch.compiler.is_compiling():
            x_base, x_adapter = _CastOnce.apply(x, torch.get_autocast_dtype(device))
        fused = self._fused_products(x, name, autocast=autocast)
        if fused is not None:
            return fused
        # Nothing needs the base layer's input as given (no hook): the base output is made [N, out] and lora_B's
        # product accumulated into it in place, in lora_B's call (``AccumulatingLinear``: hooks see it; into a new
        # tensor, an addmm would first copy its addend there).
        base_layer = self.base_layer
        into_base = _accumulates(lora_B) and x.ndim >= 2 and type(base_layer) is nn.Linear
        into_base = into_base and unhooked(base_layer)
        # lora_A's input gradient is written in place: no hook may see it (Opacus's backward hooks take it)
        dropout = self.lora_dropout[name]
        tap = (
            into_base
            and x_base is x_adapter
            and _input_gradient_unseen(lora_A)
            and _input_gradient_unseen(dropout)
        )
        tapped = self._tapped_base(x, autocast=autocast) if tap else None
        if tapped is not None:  # lora_A's input gradient then takes the base's in place
            base, x_adapter = tapped
        else:
            base = self._base_output(x_base.flatten(0, -2) if into_base else x_base, autocast=autocast)
        a = lora_A(dropout(x_adapter)) * self.scaling[name]
        if into_base and a.dtype == base.dtype:
            return lora_B(a, into=base)
        if into_base:
            base = base.view(*x.shape[:-1], base.shape[-1])
        return base + lora_B(a)

    def _tapped_base(self, x: torch.Tensor, *, autocast: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(the base output [N, out], x again for lora_A) by ``_BaseAndTap``, where x needs a gradient and the
        base (an unhooked ``nn.Linear``) is frozen, in x's dtype (under autocast its kept cast); None otherwise,
        and while compiling (inductor sums the gradients itself)."""
        if torch.compiler.is_compiling() or not (x.requires_grad and torch.is_grad_enabled()):
            return None
        if autocast:
            cast = self._frozen_base_cast(torch.get_autocast_dtype(x.device.type))
            if cast is None:
                return None
            weight, bias = cast["weight"], cast["bias"]
        else:
            weight, bias = self.base_layer.weight, self.base_layer.bias
            if any(t is not None and t.requires_grad for t in (weight, bias)):
                return None
        if x.dtype != weight.dtype:
            return None
        return _BaseAndTap.apply(x, weight, bias)

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        """peft's, with the new ``lora_B`` an ``AccumulatingLinear`` holding the same parameters."""
        super().update_layer(adapter_name, *args, **kwargs)
        if type(self.lora_B[adapter_name]) is nn.Linear:
            self.lora_B[adapter_name] = AccumulatingLinear.holding(self.lora_B[adapter_name])

    def _fused_products(
        self,
        x: torch.Tensor,
        name: str,
        *,
        autocast: bool,
        extra_bias: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """The layer by ``_LoraProducts`` (its input gradient's two products summed in one), where that is the same
        computation: under autocast, x in the autocast dtype (mat_qkv's, proj's, fc1's, fc2's inputs), the base
        frozen with its cast kept, plain bias-free adapter layers without hooks (no DP) or dropout. None otherwise.
        ``extra_bias``: a function making a bias [out] to add with the base's own, in the autocast dtype (None
        returned if it trains: its gradient is not formed here)."""
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        if (
            torch.compiler.is_compiling()  # first: the checks below would break a compiled graph
            or not autocast
            or x.ndim < 2
            or not x.is_contiguous()  # F.linear takes another route for a non-contiguous input
            or x.dtype != torch.get_autocast_dtype(x.device.type)
            or not isinstance(self.lora_dropout[name], nn.Identity)
            or not (_plain_unhooked(lora_A) and _plain_unhooked(lora_B))
        ):
            return None
        cast = self._frozen_base_cast(x.dtype, spare=lora_A.out_features)
        if cast is None:
            return None
        bias = cast["bias"]
        if extra_bias is not None:
            extra = extra_bias()
            if extra.requires_grad:
                return None
            bias = extra.to(x.dtype) if bias is None else bias + extra.to(x.dtype)
        adapter = [layer.weight.to(x.dtype) for layer in (lora_A, lora_B)]
        return _LoraProducts.apply(x, cast["weight"], bias, *adapter, self.scaling[name], cast["joined"])

    def _merged_product(
        self, x: torch.Tensor, name: str, *, extra_bias: Callable[[], torch.Tensor] | None = None
    ) -> torch.Tensor | None:
        """In eval mode without autograd under autocast (sampling, evaluation): x (W + s B A)^T + b [..., out], one
        product with the adapter merged into the base weight, where the adapter's path made two more products, the
        casts of both adapter weights and a copy per call (a LoRA model's eager sampling step launched ~44 kernels,
        a plain one's ~25). The merged weight is formed in float32 and rounded once to the autocast dtype, and kept
        until the layer is put back in training mode (``_merged_weight``). ``extra_bias`` as in
        ``_fused_products``. None where the layer's own paths run instead: training mode, autograd on, no autocast,
        compiling, hooked or biased adapter layers, inference tensors."""
        device = x.device.type
        lora_A, lora_B, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        base = self.base_layer
        if torch.compiler.is_compiling():  # first: nothing below belongs in a compiled graph
            return None
        if torch.is_grad_enabled():
            self._merged_cast = None  # training again: the adapter changes, the kept weight is stale
            return None
        if (
            self.training
            or device == "meta"
            or not torch.is_autocast_enabled(device)
            or type(base) is not nn.Linear
            or not unhooked(base)
            or not (_plain_unhooked(lora_A) and _plain_unhooked(lora_B))
            or not (isinstance(dropout, nn.Identity) or not dropout.training)
            or any(
                t.is_inference() for t in (base.weight, lora_A.weight, lora_B.weight)
            )  # no version counter
        ):
            return None
        held = self._merged_weight(torch.get_autocast_dtype(device), name)
        bias = held["bias"]
        if extra_bias is not None:
            extra = extra_bias().to(held["weight"].dtype)
            bias = extra if bias is None else bias + extra
        return F.linear(x, held["weight"], bias)

    def _merged_weight(self, dtype: torch.dtype, name: str) -> dict:
        """{"weight": (W + s B A) in ``dtype`` [out, in], "bias": b in ``dtype`` or None}, made in float32 and kept
        while the layer stays in eval mode and its weights unchanged (data pointers and version counters: a state
        dict load, an in-place write, a merge). Training mode drops it (``train``): an optimizer step may change the
        adapter without a version counter seeing it (fused AdamW does not bump them), and training holds no copy
        it does not use. While it is kept, the base weight's training cast (``_frozen_cast``) is dropped: one half
        precision copy of the weight held at a time."""
        base, lora_A, lora_B = self.base_layer, self.lora_A[name], self.lora_B[name]
        tensors = [t for t in (base.weight, base.bias, lora_A.weight, lora_B.weight) if t is not None]
        key = [dtype, name, self.scaling[name]] + [(t.device, t.data_ptr(), t._version) for t in tensors]
        held = self._merged_cast
        if held is None or held["key"] != key:
            self._frozen_cast = self._merged_cast = None  # freed before the new copy is made
            with torch.autocast(base.weight.device.type, enabled=False):
                merged = torch.addmm(
                    base.weight.float(),
                    lora_B.weight.float(),
                    lora_A.weight.float(),
                    alpha=self.scaling[name],
                )
            held = self._merged_cast = {
                "key": key,
                "sources": [t.untyped_storage() for t in tensors],  # their addresses stay taken while held
                "weight": merged.to(dtype),
                "bias": None if base.bias is None else base.bias.to(dtype),
            }
        return held

    _merged_cast: dict | None = None

    def _base_output(self, x: torch.Tensor, *, autocast: bool) -> torch.Tensor:
        """The base layer's output. Under autocast, a frozen base (its weight and bias) is cast to the autocast
        dtype once and the cast kept while they are unchanged (``_frozen_cast``): autocast casts a frozen weight
        anew at every call (it caches trainable leaves only), reading 4 and writing 2 bytes per weight each step,
        and the product reads the same bf16 values either way. Memory: 2 bytes per wrapped weight (and the
        adapter's rank of spare columns or rows, ``_frozen_base_cast``), held; in a training step autograd held
        each call's cast for the backward anyway.

        The cast is redone when a tensor's storage, version or device changes (an in-place update, a
        ``load_state_dict``, ``.data = ...``: the old storage is held by the key, so its address cannot be
        reused) and dropped by a move (``_apply``) and by peft's merge, which writes through ``.data``. A write
        through ``.data`` outside these goes unseen: none changes a frozen base in varsweep (DP-DDP's start-up
        broadcast writes every rank's identical copy of the checkpoint)."""
        cast = self._frozen_base_cast(torch.get_autocast_dtype(x.device.type)) if autocast else None
        if cast is None:
            return self.base_layer(x)
        return F.linear(x, cast["weight"], cast["bias"])

    def _frozen_base_cast(self, dtype: torch.dtype, *, spare: int = 0) -> dict | None:
        """The kept cast of the base layer's weight and bias to ``dtype`` ({"weight", "bias", "joined"}), made or
        remade as ``_base_output`` describes; None where none may be kept (a trainable or hooked base, another layer
        type, compiling, inference mode or inference tensors). ``spare`` (the adapter's rank, for ``_LoraProducts``):
        the weight [out, in] is then a view of "joined", the cast with ``spare`` more columns [out, in + spare]
        where out > in, or rows [out + spare, in] where in > out, for the adapter's weight to be written into;
        "joined" is None for a square weight, or without ``spare``."""
        base = self.base_layer
        tensors = [t for t in (base.weight, base.bias) if t is not None]
        if (
            torch.compiler.is_compiling()  # first: is_inference() below would break a compiled graph
            or type(base) is not nn.Linear
            or any(t.requires_grad or t.is_inference() for t in tensors)
            or not unhooked(base)
            or torch.is_inference_mode_enabled()  # an inference tensor could not be saved for a later backward
        ):
            return None
        out_features, in_features = base.weight.shape
        spare = 0 if out_features == in_features else spare
        key = [dtype, spare] + [(t.device, t.data_ptr(), t._version) for t in tensors]
        held = self._frozen_cast
        if held is None or held["key"] != key:
            weight = joined = None
            if spare:  # the cast written into its place in a wider buffer: the same rounding as ``to``
                wide = out_features > in_features
                shape = (out_features, in_features + spare) if wide else (out_features + spare, in_features)
                joined = base.weight.new_empty(shape, dtype=dtype)
                weight = joined[:out_features, :in_features]
                weight.copy_(base.weight)
            held = self._frozen_cast = {
                "key": key,
                "sources": [t.untyped_storage() for t in tensors],  # their addresses stay taken while held
                "weight": base.weight.to(dtype) if weight is None else weight,
                "bias": None if base.bias is None else base.bias.to(dtype),
                "joined": joined,
            }
        return held

    _frozen_cast: dict | None = None

    def merge(self, *args: Any, **kwargs: Any) -> None:
        self._frozen_cast = self._merged_cast = None
        super().merge(*args, **kwargs)

    def train(self, mode: bool = True) -> LoraLinear:
        if mode:  # training may change the adapter unseen (see ``_merged_weight``)
            self._merged_cast = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._frozen_cast = self._merged_cast = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:  # copies and pickles rebuild the casts on first use
        return {k: v for k, v in super().__getstate__().items() if k not in ("_frozen_cast", "_merged_cast")}


def _peft_inject(var: VAR, config: peft.PeftConfig, *, seed: int) -> None:
    if isinstance(config, peft.LoraConfig):
        # peft's (experimental) API for custom LoRA layers
        config._register_custom_module({nn.Linear: LoraLinear})
    # Adapter initialisation draws from the global RNG inside peft: fork it so the result depends on ``seed`` only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.get_peft_model(var, config)  # modifies ``var`` in place and freezes every non-adapter parameter


def peft_config(adaptation: Adaptation, *, depth: int, with_class_embedding: bool = False) -> peft.PeftConfig:
    """The peft configuration ``adapt`` injects for ``adaptation``'s method into a VAR of ``depth`` blocks: LoRA
    (rank, alpha, no dropout) on the method's target groups, or LN tuning of ``ada_lin.1``, in the method's blocks.
    One builder for training and export, so an exported ``adapter_config.json`` is what was trained.
    ``with_class_embedding`` (the peft export) adds the trained class embedding the way each peft method carries a
    whole trained module: LoRA saves it as a module to save, LN tuning tunes a copy of it like its other targets
    (peft's LN-tuning merge does not unwrap modules to save, and this way ``merge_and_unload`` leaves a plain VAR)."""
    method = adaptation.method
    if method.name not in PEFT_METHODS:
        raise ConfigError(
            f"method.name: {method.name!r} has no peft adapter (peft methods: {sorted(PEFT_METHODS)}); "
            + (FULL_HAS_NO_ADAPTER if method.name == "full" else "it trains nothing")
        )
    _check_blocks(method, depth=depth)  # a pattern of blocks the model lacks would match nothing there
    blocks = rf"blocks\.{_blocks_pattern(adaptation, depth)}\."
    if method.name == "ln_tuning":
        target = rf"{blocks}ada_lin\.1"
        return peft.LNTuningConfig(
            target_modules=f"({target}|{CLASS_EMBEDDING})" if with_class_embedding else target
        )
    modules = "|".join(
        re.escape(path) for group in adaptation.target_groups() for path in LORA_TARGET_GROUPS[group]
    )
    return peft.LoraConfig(
        r=method.lora_rank,
        lora_alpha=method.lora_alpha,
        lora_dropout=0.0,
        target_modules=rf"{blocks}({modules})",
        modules_to_save=[CLASS_EMBEDDING] if with_class_embedding else None,
    )


def _peft_method(var: VAR, adaptation: Adaptation) -> None:
    _peft_inject(var, peft_config(adaptation, depth=var.depth), seed=adaptation.seed)


METHODS: dict[str, Callable[[VAR, Adaptation], None]] = {
    "full": _full,
    **{name: _peft_method for name in PEFT_METHODS},
}


def adapt(
    var: VAR, method: MethodConfig, *, num_classes: int, seed: int, base_sha256: str | None = None
) -> Adaptation:
    """Prepare a base VAR for fine-tuning, in place: ``num_classes`` new labels, patches, ``method``, trainable
    class embedding; ``seed`` (the trial's ``optimization.seed``) draws the new class rows and adapter weights.
    ``base_sha256`` (the base checkpoint file's SHA-256, e.g. ``checkpoint_sha256(path)``) is only recorded, so an
    adapter saved with the returned record refuses another base. Returns what was done (hand it to
    ``save_adapter``). Move ``var`` to its training device first (peft adapters are created where the base
    weights live)."""
    check_adaptable(var, method, num_classes=num_classes)
    # Always, also for a label count equal to the base's: the new classes are not the base's, and their rows are
    # the documented ``class_init`` drawn with ``seed`` (a trial id's field), never the base's own class rows.
    resize_class_embedding(
        var, num_classes, init=method.class_init, generator=torch.Generator().manual_seed(seed)
    )
    adaptation = Adaptation(
        method=method, num_classes=num_classes, seed=seed, patches=apply_patches(var), base_sha256=base_sha256
    )
    METHODS[method.name](var, adaptation)
    var.class_emb.weight.requires_grad_(True)
    return adaptation


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def parameter_counts(var: VAR) -> dict[str, int]:
    """Trainable parameters with and without the new class embedding, the base model's total (adapter parameters
    excluded) and the adapter's parameters (``bench.schema.ParameterCounts``)."""
    trainable = sum(p.numel() for p in trainable_parameters(var).values())
    adapter = sum(p.numel() for name, p in var.named_parameters() if is_adapter_parameter(name))
    total = sum(p.numel() for p in var.parameters()) - adapter
    return {
        "trainable": trainable,
        "trainable_without_class_embedding": trainable - var.class_emb.weight.numel(),
        "base_total": total,
        "adapter_parameters": adapter,
    }


def is_adapter_parameter(name: str) -> bool:
    """A parameter that peft's LoRA or LN tuning added (not a base weight, not the class embedding)."""
    return ".lora_" in name or ".ln_tuning_layers." in name


def merge_adapters(var: VAR) -> VAR:
    """Fold LoRA / LN-tuning adapters into the base weights and remove the adapter layers (fast sampling,
    official-layout export). In place; afterwards the model has no trainable-subset structure left."""
    for name, module in list(var.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(var.get_submodule(parent_name) if parent_name else var, child, _merged_layer(module))
    return var


def _merged_layer(module: BaseTunerLayer) -> nn.Module:
    if isinstance(module, peft.tuners.ln_tuning.layer.LNTuningLayer):
        return module.base_layer  # LNTuningLayer.merge swaps the tuned copy into base_layer
    return module.get_base_layer()


ADAPTER_KIND = "var-adapter"


def save_adapter(
    var: VAR,
    path: str | os.PathLike,
    *,
    adaptation: Adaptation,
    metadata: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the trainable tensors of a VAR prepared by ``adapt`` (adapters, class embedding; everything for
    ``full``) with a sidecar holding ``adaptation`` (what ``adapt`` returned: method section, label count, seed,
    patches), the base architecture, the base checkpoint's SHA-256 (``adaptation.base_sha256``), ``class_names``
    (the training split's, label i first at i: an evaluation refuses a split whose classes differ; None: not
    known) and ``metadata`` (e.g. the trial config)."""
    if not isinstance(adaptation, Adaptation):
        raise TypeError(
            f"adaptation: expected the Adaptation that adapt() returned, got {type(adaptation).__name__}"
        )
    meta = {
        **dict(metadata or {}),
        "adaptation": adaptation.to_dict(),
        "base_sha256": adaptation.base_sha256,
        CLASS_NAMES: class_names_entry(class_names, num_classes=adaptation.num_classes),
    }
    return save_tensors(
        path,
        trainable_parameters(var),
        kind=ADAPTER_KIND,
        architecture=base_architecture(var),
        metadata=meta,
    )


def base_architecture(var: VAR) -> dict[str, Any]:
    """The architecture an adapter records of its base: the VAR's, less the class count (the adaptation's)."""
    return {
        **var.architecture,
        "num_classes": None,
    }  # the class count belongs to the adaptation, not the base


def adapter_record(
    base: VAR, path: str | os.PathLike, *, base_sha256: str | None
) -> tuple[Adaptation, tuple[str, ...] | None]:
    """(the ``Adaptation``, the training class names or None) the adapter at ``path`` records, after the checks
    ``load_adapter`` makes that need no base weights: the sidecar's kind and base architecture (``base`` may be a
    meta-device build), the base checkpoint's SHA-256 (``base_sha256``, None skips it) and the records themselves.
    A peft folder's provenance is checked the same way (with its files' SHA-256s), and its weights are read once
    for NaN/inf, as every reader of the folder checks them. The evaluation command runs this before it decodes an
    image or loads a model."""
    if Path(path).is_dir():
        from .peft_format import peft_record  # peft_format builds on this module

        return peft_record(base, path, base_sha256=base_sha256)
    if not Path(path).is_file():
        raise CheckpointError(f"no adapter file or peft adapter folder at {path}")
    record = check_sidecar(path, kind=ADAPTER_KIND, architecture=base_architecture(base))
    saved, names = _recorded(
        path, None if record is None else record.get("metadata"), base_sha256=base_sha256
    )
    check_record_fits(base, path, saved)
    return saved, names


def check_record_fits(base: VAR, path: str | os.PathLike, saved: Adaptation) -> None:
    """``CheckpointError`` for an adapter whose adaptation record ``adapt`` could not apply to ``base`` (a record
    edited by hand: the method "base", blocks beyond the base's depth)."""
    try:
        check_adaptable(base, saved.method, num_classes=saved.num_classes)
    except ConfigError as err:
        raise CheckpointError(f"adapter {path}: its adaptation record does not fit this base: {err}") from err


def _recorded(
    path: str | os.PathLike, metadata: Any, *, base_sha256: str | None
) -> tuple[Adaptation, tuple[str, ...] | None]:
    if not isinstance(metadata, dict) or not isinstance(metadata.get("adaptation"), dict):
        raise CheckpointError(
            f"adapter {path} has no sidecar {path}.json with its adaptation spec; it cannot be applied"
        )
    saved = saved_adaptation(path, metadata, base_sha256=base_sha256)
    return saved, recorded_class_names(path, metadata, num_classes=saved.num_classes)


# Set on a base by ``peft_format.peft_base`` (the adapter folder it was prepared for): peft's ``merge_and_unload``
# returns that same object without adapter layers or patches, so only this mark tells it from a fresh base.
PEFT_PREPARED = "_varsweep_peft_prepared_for"


def check_fresh_base(base: VAR, path: str | os.PathLike) -> None:
    """Refuse a base that already carries peft adapters or per-sample-gradient patches: an adapted, loaded or
    merged model (merging keeps the patches), or one ``peft_base`` prepared (peft's merged model is that base).
    Adapting it again would apply an adapter a second time on top of the first (LoRA: twice the update),
    silently."""
    adapters = any(isinstance(module, BaseTunerLayer) for module in base.modules())
    patches = patches_applied(base)
    prepared = getattr(base, PEFT_PREPARED, None)
    if adapters or patches or prepared:
        carries = (
            "peft adapter layers"
            if adapters
            else f"the patches {list(patches)}"
            if patches
            else f"the class rows of the peft adapter {prepared} (peft_base prepared it; peft's merge_and_unload "
            "returns that same object)"
        )
        raise CheckpointError(
            f"adapter {path}: the given VAR already carries {carries} (adapted, or loaded or merged from an "
            "adapter before), so the adapter would be applied on top of another: pass a freshly loaded base "
            "(load_var or build_var)"
        )


def load_adapter(base: VAR, path: str | os.PathLike, *, base_sha256: str | None) -> Adaptation:
    """Apply the adapter at ``path`` to a freshly loaded base VAR, in place (``base`` becomes the fine-tuned
    model), and return its ``Adaptation`` record. ``base_sha256``: the SHA-256 of the file ``base`` was loaded
    from (``checkpoint_sha256(path)``), required so that no caller skips the check by accident: a base other than
    the one the adapter was trained on is refused; None only for a base that has no file (built in memory).
    A base that already carries adapters or patches is refused (``check_fresh_base``).
    The adapter's tensors and sidecar are read as one verified pair (``read_verified``) before the base is
    touched. ``path`` may also be a peft adapter folder written by ``trainables.peft_format.save_peft_adapter``
    (``adapter_config.json``, ``adapter_model.safetensors`` and varsweep's provenance file), checked the same way."""
    check_fresh_base(base, path)
    if Path(path).is_dir():
        # Imported here: peft_format builds on this module (Adaptation, adapt), so it cannot be imported at its top.
        from .peft_format import load_peft_folder

        return load_peft_folder(base, path, base_sha256=base_sha256)
    state, _, metadata = read_verified(path, kind=ADAPTER_KIND, architecture=base_architecture(base))
    saved, _ = _recorded(path, metadata, base_sha256=base_sha256)
    return apply_adapter_state(base, path, saved=saved, state=state, base_sha256=base_sha256)


def saved_adaptation(
    path: str | os.PathLike, record: Mapping[str, Any], *, base_sha256: str | None
) -> Adaptation:
    """The ``Adaptation`` an adapter's record holds (``{"adaptation": ..., "base_sha256": ...}``: the sidecar's
    metadata, or a peft folder's provenance file), after refusing a base loaded from another file than the one
    the adapter was trained on (``base_sha256``: the given base's; None skips that check)."""
    trained_on = record.get("base_sha256")
    if trained_on and base_sha256 and trained_on != base_sha256:
        raise CheckpointError(
            f"adapter {path} was trained on the base checkpoint with SHA-256 {trained_on}, "
            f"but the given base was loaded from a file with SHA-256 {base_sha256}"
        )
    try:
        return Adaptation.from_dict(record["adaptation"], base_sha256=trained_on)
    except (
        TypeError,
        ValueError,
        KeyError,
        AttributeError,
    ) as err:  # a record edited by hand, or of another version
        raise CheckpointError(f"adapter {path}: its adaptation record is not usable: {err!r}") from err


def check_finite(path: str | os.PathLike, state: Mapping[str, torch.Tensor]) -> None:
    """Refuse an adapter state holding NaN or inf, naming the tensors."""
    non_finite = sorted(
        k for k, v in state.items() if v.dtype.is_floating_point and not bool(torch.isfinite(v).all())
    )
    if non_finite:
        raise CheckpointError(
            f"adapter {path} holds NaN/inf values in {len(non_finite)} tensor(s): {', '.join(non_finite[:8])}"
        )


def apply_adapter_state(
    base: VAR,
    path: str | os.PathLike,
    *,
    saved: Adaptation,
    state: Mapping[str, torch.Tensor],
    base_sha256: str | None,
) -> Adaptation:
    """Adapt ``base`` as ``saved`` records (in place) and copy ``state`` (trainable parameter name -> tensor,
    read from the adapter at ``path``) into its trainable parameters; refuses NaN/inf, another patch set, and
    tensors that do not fit exactly, before ``base`` changes (checked on a weightless twin adapted the same way,
    so a refused adapter leaves a base the next one can still be loaded onto). Returns what ``adapt`` did."""
    check_record_fits(base, path, saved)
    check_finite(path, state)
    _check_fit(base, path, saved=saved, state=state)
    adaptation = adapt(
        base, saved.method, num_classes=saved.num_classes, seed=saved.seed, base_sha256=base_sha256
    )
    with torch.no_grad():
        for name, param in trainable_parameters(base).items():
            param.copy_(state[name])
    return adaptation


def _check_fit(
    base: VAR, path: str | os.PathLike, *, saved: Adaptation, state: Mapping[str, torch.Tensor]
) -> None:
    """Refuse tensors ``state`` that are not exactly the trainable parameters ``base`` gets when adapted as
    ``saved`` records, found on a weightless (meta-device) twin so that ``base`` is not touched."""
    with torch.device("meta"):
        twin = VAR(**base.architecture)
    adapted = adapt(twin, saved.method, num_classes=saved.num_classes, seed=saved.seed)
    if adapted.patches != saved.patches:  # the patches rename keys: another set would not fit the tensors
        raise CheckpointError(
            f"adapter {path} was saved from a VAR with patches {list(saved.patches)}, adapt() now applies "
            f"{list(adapted.patches)}"
        )
    differences = tensor_differences(trainable_parameters(twin), state)
    if differences:
        raise CheckpointError(f"adapter {path} does not fit this base model: {differences}")


def tensor_differences(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """The names ``state`` lacks, has beyond ``expected`` and holds in another shape (eight of each), or None
    where it holds exactly the expected tensors' names and shapes."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if not (missing or unexpected or mismatched):
        return None
    return f"missing {missing[:8]}, unexpected {unexpected[:8]}, mis-shaped {mismatched[:8]}"


def official_export_state(var: VAR) -> dict[str, torch.Tensor]:
    """The fine-tuned model as one plain checkpoint in the official key layout (adapters merged, patches undone
    in the key names). Merges in place: call on a model you no longer train."""
    from .patches import official_state_dict

    return official_state_dict(merge_adapters(var))
