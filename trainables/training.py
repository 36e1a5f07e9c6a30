"""One VAR training step: teacher forcing, token-mean cross-entropy, class dropout, AdamW with a no-decay group.

Plain functions so that adaptation methods and DP (which wrap the model or the optimiser) compose with them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bench.schema import ConfigError

from .data.tokens import to_device
from .draws import ExampleDraws
from .models import VAR, VQVAE
from .models.var import AdaLNSelfAttn

ADAMW_BETAS = (0.9, 0.95)
NO_DECAY_PARAM_NAMES = ("pos_start", "pos_1LC", "scale_mul_1H11", "ada_gss")
Logger = Callable[[dict], None]


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside an initialised process group. The one
    place the trainables read them (privacy, fine-tuning and the trial all ask here)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


# Gradients under this size are all-reduced together, a flat copy per dtype and device; larger ones in place. A
# collective costs a launch and a network round trip whatever its size: one per parameter made VAR-d16's ~200
# tensors (LoRA's ~160 adapter factors, 64 KiB each) pay it ~200 times a step.
SMALL_GRADIENT_BYTES = 1 << 20


def gradient_collectives(grads: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The gradients each all-reduce of ``average_gradients`` takes, in order: every gradient of at least
    ``SMALL_GRADIENT_BYTES`` alone, then the smaller ones of each dtype and device together."""
    large, small = [], {}
    for g in grads:
        if g.nbytes >= SMALL_GRADIENT_BYTES:
            large.append([g])
        else:
            small.setdefault((g.dtype, g.device), []).append(g)
    return large + list(small.values())


def average_gradients(params: Sequence[torch.Tensor], world: int) -> None:
    """Replace each ``p.grad`` by its mean over the ``world`` ranks of the initialised process group (every rank
    must hold gradients for the same parameters). The sum is each element's over the ranks, as one all-reduce per
    parameter gave it: bit for bit at two ranks; for more, up to the collective's summation order (and, where the
    world is no power of two, the last bit of the division)."""
    grads = [p.grad for p in params if p.grad is not None]
    for group in gradient_collectives(grads):
        if len(group) == 1 and group[0].is_contiguous():
            dist.all_reduce(group[0])
            continue
        flat = torch.cat([g.reshape(-1) for g in group])
        dist.all_reduce(flat)
        torch._foreach_copy_(
            group, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in group]), group)]
        )
    if grads:
        torch._foreach_div_(grads, world)


def epoch_batches(num_examples: int, *, batch_size: int, generator: torch.Generator):
    """Endless stream of index batches [b]; a fresh permutation every epoch (the order never repeats)."""
    full_batches = max(1, num_examples // batch_size)  # the incomplete tail of an epoch is dropped
    while True:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, full_batches * batch_size, batch_size):
            yield order[start : start + batch_size]


def is_logging_step(step: int, *, log_every: int, total_steps: int) -> bool:
    """Whether step ``step`` (0-based) of ``total_steps`` is logged: every ``log_every`` steps and the last one."""
    return step % log_every == 0 or step == total_steps - 1


def record_history(
    history: list[dict], log: Logger | None, *, step: int, started: float, **values: float
) -> None:
    """Append {"step": step + 1 (steps done), "seconds" since ``started`` (perf_counter), **values} and log it.
    Float values keep 6 significant digits (a fixed number of decimals would read a late cosine learning rate or a
    small KL as 0.0); integers stay as they are."""
    entry = {
        "step": step + 1,
        "seconds": round(time.perf_counter() - started, 3),
        **{k: significant(v) for k, v in values.items()},
    }
    history.append(entry)
    if log is not None:
        log(entry)


def significant(value: float, digits: int = 6) -> float:
    """``value`` rounded to ``digits`` significant digits (NaN and infinities unchanged; integers as they are)."""
    if isinstance(value, int):
        return value
    return float(f"{value:.{digits}g}")


def bf16_autocast(device: torch.device, *, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device when ``enabled``; a no-op elsewhere (CPU bf16 autocast is slower than fp32)."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def apply_class_dropout(
    label_B: torch.Tensor,
    *,
    rate: float,
    unconditional_label: int,
    generator: torch.Generator | None = None,
    uniform_B: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace each example's label by the unconditional one with probability ``rate``, one draw per example
    (the model learns the unconditional distribution used by classifier-free guidance): the example's uniform in
    ``uniform_B`` when given (per-example draws, see trainables/draws.py), else a draw from ``generator``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"class dropout rate must be in [0, 1), got {rate}")
    if rate == 0.0:
        return label_B
    if uniform_B is None:
        device = generator.device if generator is not None else label_B.device
        uniform_B = torch.rand(label_B.shape, generator=generator, device=device)
    drop_B = to_device(uniform_B, label_B.device) < rate
    return torch.where(drop_B, torch.full_like(label_B, unconditional_label), label_B)


def teacher_forcing_batch(vqvae: VQVAE, idx_Bl: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(VAR input [B, L-first_l, Cvae], targets [B, L]) from token indices of every scale; the VQVAE is frozen.
    Built in the VQVAE's precision under an enclosing autocast too, as the official trainer builds it before its
    autocast region: the phi convolutions' running sum of the scales in bf16 differed by up to a bf16 ulp."""
    device_type = idx_Bl[0].device.type
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        x_BLCv_wo_first_l = vqvae.idxBl_to_var_input(idx_Bl)
    return x_BLCv_wo_first_l, torch.cat(list(idx_Bl), dim=1)


def token_cross_entropy(logits_BLV: torch.Tensor, target_BL: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, L] (no label smoothing)."""
    B, L, V = logits_BLV.shape
    return F.cross_entropy(logits_BLV.reshape(B * L, V), target_BL.reshape(B * L), reduction="none").view(
        B, L
    )


def var_loss(
    var: VAR,
    vqvae: VQVAE,
    label_B: torch.Tensor,
    idx_Bl: Sequence[torch.Tensor],
    *,
    class_dropout: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Token-mean cross-entropy over all L tokens of the batch, with class dropout applied here (not in forward)."""
    x_BLCv_wo_first_l, target_BL = teacher_forcing_batch(vqvae, idx_Bl)
    label_B = apply_class_dropout(
        label_B, rate=class_dropout, unconditional_label=var.unconditional_label, generator=generator
    )
    return token_cross_entropy(var(label_B, x_BLCv_wo_first_l), target_BL).mean()


def scale_loss_weights(patch_nums: Sequence[int], *, decay: float = 1.0) -> torch.Tensor:
    """Per-token weights [L] giving scale s the weight ``decay**s`` (s = 0 is the coarsest), normalised to mean 1
    over tokens, so ``decay=1`` is the plain token mean and ``decay<1`` emphasises the coarse scales."""
    if not decay > 0:
        raise ValueError(f"scale-weight decay must be > 0, got {decay}")
    weights_L = torch.cat([torch.full((pn * pn,), float(decay) ** si) for si, pn in enumerate(patch_nums)])
    return weights_L / weights_L.mean()


def view_losses(
    var: VAR,
    vqvae: VQVAE,
    label_B: torch.Tensor,
    idx_views: Sequence[torch.Tensor],
    *,
    class_dropout: float,
    token_weights_L: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    draws: ExampleDraws | None = None,
) -> torch.Tensor:
    """Loss of every augmented view [B, k]: ``idx_views`` holds per scale the token maps [B, k, pn*pn] of k views
    of each example. All B*k views go through one batched forward (rows example-major); class dropout is drawn
    once per example and shared by its views. ``token_weights_L`` weights the token mean (see scale_loss_weights).
    ``draws``: the batch's per-example uniforms for class dropout and drop-path (DP training needs them: no
    example's draws may depend on the rest of the batch); without them class dropout draws from ``generator`` and
    drop-path from torch's global generator."""
    B, k = idx_views[0].shape[:2]
    label_B = apply_class_dropout(
        label_B,
        rate=class_dropout,
        unconditional_label=var.unconditional_label,
        generator=generator,
        uniform_B=None if draws is None else draws.label_b,
    )
    x_RLCv, target_RL = teacher_forcing_batch(vqvae, [idx_Bkl.reshape(B * k, -1) for idx_Bkl in idx_views])
    drop_path_RD = (
        None if draws is None or draws.drop_path_RD is None else to_device(draws.drop_path_RD, x_RLCv.device)
    )
    ce_RL = token_cross_entropy(
        var(label_B.repeat_interleave(k), x_RLCv, drop_path_uniform_BD=drop_path_RD), target_RL
    )
    if token_weights_L is not None:
        ce_RL = ce_RL * token_weights_L.to(ce_RL.device)
    return ce_RL.mean(dim=1).view(B, k)


def is_no_decay(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """Biases, norm parameters, embeddings (class, level), positional and attention-scale parameters are not
    decayed (the published study decayed embeddings and biases); modules may say so with ``no_weight_decay``."""
    return (
        param.ndim < 2
        or isinstance(module, (nn.Embedding, nn.LayerNorm, nn.GroupNorm))
        or name in NO_DECAY_PARAM_NAMES
        or getattr(module, "no_weight_decay", False)
    )


def parameter_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """AdamW groups over trainable parameters: [decayed, not decayed]; each parameter appears once."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (no_decay if is_no_decay(module, name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = ADAMW_BETAS,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``parameter_groups``. ``fused``: None = the fused kernel when every trainable parameter is on
    CUDA (one kernel per step instead of the multi-tensor ``foreach`` launches), else torch's default
    implementation. Both keep the same state (``step``, ``exp_avg``, ``exp_avg_sq``), so an optimiser state saved
    by one loads into the other."""
    groups = parameter_groups(model, weight_decay=weight_decay)
    params = [p for group in groups for p in group["params"]]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if fused is None:
        fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, **({"fused": True} if fused else {}))


# AdamW's choice of kernel: not a hyperparameter, so a checkpoint does not set it.
IMPLEMENTATION_FLAGS = ("fused", "foreach")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` keeping this optimiser's own implementation (fused or not): a state
    saved by a fused AdamW on a GPU resumes in the default one on a CPU and vice versa (same ``step``,
    ``exp_avg``, ``exp_avg_sq``; the step counters are placed as this implementation needs them)."""
    groups = [
        {**saved, **{flag: current.get(flag) for flag in IMPLEMENTATION_FLAGS}}
        for saved, current in zip(state["param_groups"], optimizer.param_groups)
    ]
    optimizer.load_state_dict({**state, "param_groups": groups})


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` every transformer block (``AdaLNSelfAttn``) inside ``model`` in place, through peft and
    Opacus wrappers (which keep the blocks as submodules); returns how many. In place (``nn.Module.compile``) so
    that module names, state-dict keys and the hooks of DP book-keeping stay where they are. ``dynamic=None``:
    the first shape is compiled static; a second batch size (the last physical chunk, a Poisson batch) recompiles
    once with a dynamic batch dimension instead of once per size."""
    blocks = [m for m in model.modules() if isinstance(m, AdaLNSelfAttn)]
    for block in blocks:
        block.compile()
    return len(blocks)


def uncompile_blocks(model: nn.Module) -> int:
    """Undo ``compile_blocks``: every block of ``model`` calls its eager forward again (sampling, with its KV cache
    and ten shapes, is not what the blocks were compiled for); returns how many were compiled. The compiled graphs
    stay in torch's cache, so compiling again is cheap."""
    blocks = [
        m for m in model.modules() if isinstance(m, AdaLNSelfAttn) and m._compiled_call_impl is not None
    ]
    for block in blocks:  # nn.Module.compile keeps the compiled call here and has no inverse
        block._compiled_call_impl = None
    return len(blocks)


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``min_ratio * base_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def var_training_step(
    var: VAR,
    vqvae: VQVAE,
    optimizer: torch.optim.Optimizer,
    label_B: torch.Tensor,
    idx_Bl: Sequence[torch.Tensor],
    *,
    class_dropout: float = 0.1,
    max_grad_norm: float | None = 2.0,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One optimiser step on a batch of token maps; returns the loss and the pre-clip gradient norm."""
    var.train()
    loss = var_loss(var, vqvae, label_B, idx_Bl, class_dropout=class_dropout, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else math.inf)
    optimizer.step()
    return {"loss": loss.item(), "grad_norm": float(grad_norm)}


def examples_per_forward(
    rows_per_forward: int, *, views_per_example: int, splits_views: bool = False, hint: str = ""
) -> int | None:
    """Examples per forward for ``rows_per_forward`` rows of ``views_per_example`` views each (None: all at once).
    Fewer rows than views are refused (``hint`` ends the message) unless ``splits_views`` (DP with book-keeping
    clipping, which then puts one example per forward and spreads its views over several: ``views_per_forward``)."""
    if rows_per_forward == 0:
        return None
    if rows_per_forward < views_per_example:
        if splits_views:
            return 1
        raise ConfigError(
            f"resources.rows_per_forward: {rows_per_forward} rows cannot hold one example's "
            f"{views_per_example} views{hint}"
        )
    return rows_per_forward // views_per_example


def views_per_forward(rows_per_forward: int, *, views_per_example: int) -> int | None:
    """How many of one example's views go through a forward when they are split over several (rows_per_forward
    fewer than the views); None when an example's views share one forward."""
    if rows_per_forward == 0 or rows_per_forward >= views_per_example:
        return None
    return rows_per_forward
