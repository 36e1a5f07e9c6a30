"""Named patches that make a VAR instance acceptable to per-sample-gradient tools (Opacus) without changing its numbers.

Opacus computes per-sample gradients per module, from the inputs it saw and the gradients of its outputs. A
module that owns parameters directly and has no per-sample-gradient rule is handed to functorch as a whole, with
only its positional inputs: for the root VAR (owner of ``pos_start``/``pos_1LC``) that means treating the entire
model as one layer (a per-sample copy of every weight, the published study's defect), and for ``SelfAttention``
(owner of ``q_bias``/``v_bias``/``scale_mul_1H11``) it means re-running attention without its keyword-only causal
mask. Each patch below moves such parameters into a tiny module with an exact per-sample-gradient rule. The
Parameter objects themselves move (no copies), so optimiser state and tied references stay valid.

Patches act on one instance (never on the class) by normal module assignment into the empty slots the model
keeps for them (``VAR.pos_start_add``, ``SelfAttention.qkv_bias``, ...: its forward calls a filled slot). Nothing
is recorded on the instance: ``apply_patches`` returns the names applied, ``patches_applied`` reads them off the
modules, and ``official_state_dict`` maps a patched (and merged, unwrapped) model back to the official key layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn

from .models.var import MAX_LOG_SCALE_MUL, VAR, SelfAttention, query_gain


class PatchModule(nn.Module):
    """Holds parameters moved out of a VAR module; they are positions, biases and scales: never weight-decayed."""

    no_weight_decay = True  # read by training.is_no_decay


class AddParameter(PatchModule):
    """``x + weight`` with ``weight`` [1, ...] broadcast over the batch (and over any other size-1 dim)."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight

    def forward(self, x_B: torch.Tensor) -> torch.Tensor:
        return x_B + self.weight[:, : x_B.shape[1]] if self.weight.ndim > 1 else x_B + self.weight


class QKVBias(PatchModule):
    """Adds (q_bias, 0, v_bias) to the fused qkv projection [B, L, 3C]; keys get no bias."""

    def __init__(self, q_bias: nn.Parameter, v_bias: nn.Parameter):
        super().__init__()
        self.q_bias, self.v_bias = q_bias, v_bias

    def forward(self, qkv_BL3C: torch.Tensor) -> torch.Tensor:
        # No buffer here: Opacus refuses trainable modules that hold buffers; zeros are made per call instead. In
        # qkv's dtype, as SelfAttention.add_qkv_bias.
        bias_3C = torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))
        return qkv_BL3C + bias_3C.to(qkv_BL3C.dtype)


class HeadScale(PatchModule):
    """The queries' per-head gain ``exp(min(scale_mul_1H11, ln 100))``, one copy per row [B, H, 1, 1], by which the
    attention multiplies its unit queries inside their normalisation (``SelfAttention.unit_queries``). The gradient
    reaching this module's output is then each row's gain gradient, which the normalisation's backward reduces from
    its per-row sums anyway: the scale's per-sample gradients cost no pass over the queries."""

    def __init__(self, scale_mul_1H11: nn.Parameter):
        super().__init__()
        self.scale_mul_1H11 = scale_mul_1H11

    def forward(self, rows_B: torch.Tensor) -> torch.Tensor:
        """``rows_B``: any tensor with one row per batch row; only its length is read (the attention passes an
        empty [B, 0], so that hooks keeping the input keep no activation)."""
        return query_gain(self.scale_mul_1H11).expand(rows_B.shape[0], -1, -1, -1)


@register_grad_sampler(AddParameter)
def _add_parameter_grad_sample(
    layer: AddParameter, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict:
    """d(x + w)/dw per example: the output gradient summed over the dims that ``w`` broadcasts along."""
    weight = layer.weight
    g_B = backprops
    if weight.ndim > 1 and backprops.shape[1] < weight.shape[1]:  # only the first l positions were used
        g_B = torch.nn.functional.pad(g_B, (0, 0) * (g_B.ndim - 2) + (0, weight.shape[1] - g_B.shape[1]))
    for dim in range(1, weight.ndim):
        if weight.shape[dim] == 1 and g_B.shape[dim] != 1:
            g_B = g_B.sum(dim, keepdim=True)
    return {weight: g_B.reshape(g_B.shape[0], *weight.shape)} if weight.requires_grad else {}


@register_grad_sampler(QKVBias)
def _qkv_bias_grad_sample(layer: QKVBias, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    # Summed in float32: under autocast the backprops are bf16, and a bf16 sum over L positions would round.
    g_B3C = backprops.reshape(backprops.shape[0], -1, backprops.shape[-1]).sum(1, dtype=torch.float32)
    C = layer.q_bias.shape[0]
    grads = {layer.q_bias: g_B3C[:, :C], layer.v_bias: g_B3C[:, 2 * C :]}
    return {p: g for p, g in grads.items() if p.requires_grad}


@register_grad_sampler(HeadScale)
def _head_scale_grad_sample(
    layer: HeadScale, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict:
    """d gain / ds = gain where s < ln 100 (torch's clamp_max passes no gradient at or above its bound): each row's
    gain gradient [B, H, 1, 1] (float32 sums of the normalisation's backward) times the gain."""
    s_1H11 = layer.scale_mul_1H11
    if not s_1H11.requires_grad:
        return {}
    g_BH11 = backprops.float() * query_gain(s_1H11) * (s_1H11 < MAX_LOG_SCALE_MUL)
    return {s_1H11: g_BH11.unsqueeze(1).to(s_1H11.dtype)}


def _move_parameter(owner: nn.Module, name: str) -> nn.Parameter:
    param = owner._parameters.pop(name)
    if param is None:
        raise ValueError(f"{type(owner).__name__}.{name} is not a parameter (already patched?)")
    return param


def positions_as_modules(var: VAR) -> None:
    """Root-owned ``pos_start`` [1, first_l, C] and ``pos_1LC`` [1, L, C] -> ``pos_start_add.weight`` and
    ``pos_1LC_add.weight``; ``add_start_position``/``add_positions`` call those modules."""
    var.pos_start_add = AddParameter(_move_parameter(var, "pos_start"))
    var.pos_1LC_add = AddParameter(_move_parameter(var, "pos_1LC"))


def attention_parameters_as_modules(var: VAR) -> None:
    """Each block's ``attn.q_bias``/``v_bias`` -> ``attn.qkv_bias.{q,v}_bias`` and ``attn.scale_mul_1H11`` ->
    ``attn.head_scale.scale_mul_1H11``; the key bias stays a (zero) buffer of the attention module."""
    for module in _attention_modules(var):
        module.qkv_bias = QKVBias(_move_parameter(module, "q_bias"), _move_parameter(module, "v_bias"))
        if module.attn_l2_norm:
            module.head_scale = HeadScale(_move_parameter(module, "scale_mul_1H11"))


def _attention_modules(var: VAR) -> list[SelfAttention]:
    return [module for module in var.modules() if isinstance(module, SelfAttention)]


def _positions_patched(var: VAR) -> bool:
    return isinstance(var.pos_start_add, AddParameter)


def _attention_patched(var: VAR) -> bool:
    return any(isinstance(module.qkv_bias, QKVBias) for module in _attention_modules(var))


@dataclass(frozen=True)
class Patch:
    """A named patch: the function applying it, a test whether a model already has it (read off its modules), and
    {patched key fragment: official key fragment} for its state-dict keys."""

    apply: Callable[[VAR], None]
    is_applied: Callable[[VAR], bool]
    official_keys: dict[str, str]


PATCHES: dict[str, Patch] = {
    "positions_as_modules": Patch(
        positions_as_modules,
        _positions_patched,
        {"pos_start_add.weight": "pos_start", "pos_1LC_add.weight": "pos_1LC"},
    ),
    "attention_parameters_as_modules": Patch(
        attention_parameters_as_modules,
        _attention_patched,
        {
            "attn.qkv_bias.q_bias": "attn.q_bias",
            "attn.qkv_bias.v_bias": "attn.v_bias",
            "attn.head_scale.scale_mul_1H11": "attn.scale_mul_1H11",
        },
    ),
}
OPACUS_PATCHES = ("positions_as_modules", "attention_parameters_as_modules")


def patches_applied(var: VAR) -> tuple[str, ...]:
    """The names of the patches ``var`` carries (in ``PATCHES`` order), read off its modules."""
    return tuple(name for name, patch in PATCHES.items() if patch.is_applied(var))


def apply_patches(var: VAR, names: tuple[str, ...] = OPACUS_PATCHES) -> tuple[str, ...]:
    """Apply the named patches to ``var`` in place, once each (a patch it already carries is skipped); returns
    the names of all patches it carries afterwards."""
    if var.shared_aln:
        raise NotImplementedError(
            "per-sample-gradient patches do not cover shared_aln=True VARs (ada_gss); "
            "the official VAR-d16..d30 checkpoints use shared_aln=False"
        )
    unknown = [name for name in names if name not in PATCHES]
    if unknown:
        raise KeyError(f"unknown patch {unknown[0]!r}; known: {sorted(PATCHES)}")
    for name in names:
        if not PATCHES[name].is_applied(var):
            PATCHES[name].apply(var)
    return patches_applied(var)


def official_key(var: VAR, key: str) -> str:
    """The official name of a (parameter or buffer) key of a patched VAR."""
    for name in patches_applied(var):
        for patched, official in PATCHES[name].official_keys.items():
            if key == patched or key.endswith("." + patched):
                return key[: len(key) - len(patched)] + official
    return key


def official_state_dict(var: VAR) -> dict[str, torch.Tensor]:
    """State dict in the official key layout (order included) of a patched, adapter-free VAR."""
    state = {official_key(var, key): value for key, value in var.state_dict().items()}
    return {key: state[key] for key in _official_order(var)}


def _official_order(var: VAR) -> list[str]:
    with torch.device("meta"):
        reference = VAR(**var.architecture)
    return list(reference.state_dict())
