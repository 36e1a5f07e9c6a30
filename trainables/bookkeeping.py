"""Book-keeping per-example clipping: one backward pass, no per-sample copies of large weights, k views per example.

Ghost clipping needs a second backward pass to form the clipped gradient sum; per-sample hooks store a copy of
every weight per example. Book-keeping keeps what one backward already produces, each trainable layer's input
``a`` and output gradient ``g``, and then
1. computes every example's gradient norm layer by layer (linear layers from the Gram matrices of ``a`` and ``g``
   over the example's positions, or from the explicit per-example gradient when that is cheaper),
2. forms the clipping factors c_b = min(1, C / ||grad_b||), and
3. builds each layer's clipped sum as one weighted weight-gradient product, sum_b c_b grad_b.
During the backward itself the trainable weights are frozen, so autograd skips the weight-gradient products that
step 3 replaces. An example's k augmented views (consecutive rows) are treated as one longer sequence, so the
clipped quantity is the gradient of the example's mean loss over its views.

Rules exist for the layer types an adapted VAR trains (``nn.Linear`` incl. peft's LoRA/LN-tuning layers,
``nn.Embedding`` and the small modules of ``trainables.patches``); any other trainable layer is refused.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.grad_sample import GradSampleModule
from torch import nn

from .patches import AddParameter, HeadScale, QKVBias


def _fold(rows_R: torch.Tensor, k: int) -> torch.Tensor:
    """Example-major rows [B*k, ..., d] -> [B, T, d] with T = k * (positions per row); 1-D ids -> [B, k]."""
    if rows_R.ndim == 1:
        return rows_R.reshape(-1, k)
    return rows_R.reshape(rows_R.shape[0] // k, -1, rows_R.shape[-1])


def _linear_norms(
    layer: nn.Linear, a_R: torch.Tensor, g_R: torch.Tensor, k: int
) -> tuple[torch.Tensor, dict]:
    # Norms decide the clipping factor, hence the sensitivity: compute them in float32 whatever the autocast dtype.
    a_BTi, g_BTo = _fold(a_R, k).float(), _fold(g_R, k).float()
    T, out_features, in_features = a_BTi.shape[1], g_BTo.shape[-1], a_BTi.shape[-1]
    sq_B = g_BTo.new_zeros(g_BTo.shape[0])
    if layer.weight.requires_grad:
        if (
            T * T <= out_features * in_features
        ):  # Gram matrices over the example's T positions are the cheaper route
            gram_g_BTT, gram_a_BTT = g_BTo @ g_BTo.transpose(1, 2), a_BTi @ a_BTi.transpose(1, 2)
            sq_B = sq_B + (gram_g_BTT * gram_a_BTT).sum(dim=(1, 2)).clamp_min(0) / (k * k)
        else:
            sq_B = sq_B + torch.einsum("bto,bti->boi", g_BTo, a_BTi).pow(2).sum(dim=(1, 2)) / (k * k)
    if layer.bias is not None and layer.bias.requires_grad:
        sq_B = sq_B + (g_BTo.sum(1) / k).pow(2).sum(-1)
    return sq_B, {}


def _linear_clipped(
    layer: nn.Linear, a_R: torch.Tensor, g_R: torch.Tensor, w_R: torch.Tensor, kept: dict
) -> dict:
    gw_Ro = (g_R * w_R.view(-1, *([1] * (g_R.ndim - 1)))).reshape(-1, g_R.shape[-1])
    grads = {}
    if layer.weight.requires_grad:
        grads[layer.weight] = gw_Ro.T @ a_R.reshape(-1, a_R.shape[-1]).to(gw_Ro.dtype)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = gw_Ro.sum(0)
    return grads


def _embedding_norms(
    layer: nn.Embedding, ids_R: torch.Tensor, g_R: torch.Tensor, k: int
) -> tuple[torch.Tensor, dict]:
    per_example = (
        GradSampleModule.GRAD_SAMPLERS[nn.Embedding](layer, [_fold(ids_R, k)], _fold(g_R, k).float())[
            layer.weight
        ]
        / k
    )
    return per_example.pow(2).flatten(1).sum(1), {}


def _embedding_clipped(
    layer: nn.Embedding, ids_R: torch.Tensor, g_R: torch.Tensor, w_R: torch.Tensor, kept: dict
) -> dict:
    gw = (g_R * w_R.view(-1, *([1] * (g_R.ndim - 1)))).reshape(-1, layer.embedding_dim)
    return {
        layer.weight: torch.zeros_like(layer.weight).index_add_(
            0, ids_R.reshape(-1), gw.to(layer.weight.dtype)
        )
    }


def _small_norms(layer: nn.Module, a_R: torch.Tensor, g_R: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
    """Small parameters: explicit per-example gradients from the per-sample rule, kept for the clipped sum."""
    per_row = GradSampleModule.GRAD_SAMPLERS[type(layer)](layer, [a_R], g_R)
    kept = {p: gs.float().view(-1, k, *gs.shape[1:]).mean(1) for p, gs in per_row.items()}
    sq_B = sum(gs.pow(2).flatten(1).sum(1) for gs in kept.values())
    return sq_B, kept


def _small_clipped(
    layer: nn.Module, a_R: torch.Tensor, g_R: torch.Tensor, w_R: torch.Tensor, kept: dict
) -> dict:
    k = a_R.shape[0] // next(iter(kept.values())).shape[0]
    c_B = w_R.view(-1, k)[:, 0] * k  # the clipping factors (w_R holds c_b / k per row)
    return {p: torch.einsum("b,b...->...", c_B.to(gs.dtype), gs) for p, gs in kept.items()}


NormRule = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, dict]]
SumRule = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, dict], dict]
RULES: dict[type, tuple[NormRule, SumRule]] = {
    nn.Linear: (_linear_norms, _linear_clipped),
    nn.Embedding: (_embedding_norms, _embedding_clipped),
    AddParameter: (_small_norms, _small_clipped),
    QKVBias: (_small_norms, _small_clipped),
    HeadScale: (_small_norms, _small_clipped),
}


def _trainable_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def bookkeeping_supports(model: nn.Module) -> bool:
    return all(type(m) in RULES for m in _trainable_layers(model))


class BookKeeping:
    """Records inputs and output gradients of every trainable layer of ``model`` while ``active``."""

    def __init__(self, model: nn.Module):
        self.layers = _trainable_layers(model)
        unsupported = sorted({type(m).__name__ for m in self.layers if type(m) not in RULES})
        if unsupported:
            raise NotImplementedError(
                f"book-keeping clipping has no rule for trainable layers of type {unsupported}"
            )
        self.params = [p for m in self.layers for p in m.parameters(recurse=False) if p.requires_grad]
        self.active = False
        self.inputs: dict[nn.Module, torch.Tensor] = {}
        self.output_grads: dict[nn.Module, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._record) for m in self.layers]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor):
        if not self.active:
            return None
        if module in self.inputs:
            raise NotImplementedError(
                f"{type(module).__name__} is called twice in one forward; book-keeping clipping needs one call"
            )
        self.inputs[module] = inputs[0].detach()
        if (
            not output.requires_grad
        ):  # a first layer (its input needs no gradient): make its output a leaf to get g
            output = output.detach().requires_grad_(True)
        output.register_hook(lambda grad: self.output_grads.__setitem__(module, grad.detach()))
        return output

    def clipped_sum(self, loss_fn: Callable[[], torch.Tensor], *, max_grad_norm: float) -> int:
        """Run ``loss_fn`` (-> per-view losses [b, k]) and backward with weights frozen, then write each trainable
        parameter's sum over examples of its clipped view-mean gradient into ``p.grad``. Returns b."""
        self.inputs.clear(), self.output_grads.clear()
        for p in self.params:
            p.requires_grad_(False)  # autograd then skips the weight-gradient products rebuilt below
        self.active = True
        try:
            loss_bk = loss_fn()
            b, k = loss_bk.shape
            loss_bk.sum().backward()
        finally:
            self.active = False
            for p in self.params:
                p.requires_grad_(True)
        missing = [type(m).__name__ for m in self.layers if m not in self.output_grads]
        if missing:
            raise RuntimeError(
                f"no output gradient reached trainable layers {missing[:8]} (not used by the loss?)"
            )
        self._write_clipped(k, max_grad_norm=max_grad_norm)
        self.inputs.clear(), self.output_grads.clear()
        return b

    def _write_clipped(self, k: int, *, max_grad_norm: float) -> None:
        norms, kept = [], {}
        for m in self.layers:
            sq_B, kept[m] = RULES[type(m)][0](m, self.inputs[m], self.output_grads[m], k)
            norms.append(sq_B)
        norm_B = torch.stack(norms).sum(0).sqrt()
        c_B = (max_grad_norm / (norm_B + 1e-6)).clamp(max=1.0)
        w_R = (c_B / k).repeat_interleave(k)
        for m in self.layers:
            for p, grad in RULES[type(m)][1](m, self.inputs[m], self.output_grads[m], w_R, kept[m]).items():
                p.grad = grad.to(p.dtype).view_as(p)
