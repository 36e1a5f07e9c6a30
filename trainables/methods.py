"""Adaptation methods: which parameters of a pre-trained VAR are trained, as plain functions behind a registry.

``adapt(var, spec)`` gives the base VAR the target label set, applies the per-sample-gradient patches (the same
model structure with and without DP), then the method: ``full`` (every parameter), LoRA presets via peft
(``lora`` = attention + MLP + the blocks' AdaLN modulation, the paper's main setting; ``lora_attention``;
``lora_mlp``) or ``ln_tuning`` (peft LayerNorm tuning of the blocks' ``ada_lin.1``: VAR's LayerNorms have no
weights, the modulation linears are its norm parameters). The new class embedding is always trained.
``train_blocks`` restricts any method to a subset of the transformer blocks (selective layer tuning).

Adapter files hold exactly the trainable tensors; with the base checkpoint they restore the fine-tuned model.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import peft
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .models.checkpoints import CheckpointError, read_verified, resize_class_embedding, save_tensors
from .models.var import VAR
from .patches import apply_patches

# Module paths inside a block, by role (REFERENCE.md §3: LoRA on mat_qkv, proj, fc1, fc2 and the blocks' ada_lin.1).
LORA_TARGET_GROUPS = {"attention": ("attn.mat_qkv", "attn.proj"), "mlp": ("ffn.fc1", "ffn.fc2"), "modulation": ("ada_lin.1",)}
LORA_PRESETS = {"lora": ("attention", "mlp", "modulation"), "lora_attention": ("attention",), "lora_mlp": ("mlp",)}


@dataclass(frozen=True)
class AdaptationSpec:
    """What is trained. ``lora_targets`` names groups of ``LORA_TARGET_GROUPS`` (default: the preset's);
    ``train_blocks`` (block indices) restricts the method to those blocks; ``None`` means all blocks."""

    method: str
    num_classes: int
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] | None = None
    train_blocks: tuple[int, ...] | None = None
    class_init: str = "unconditional"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown adaptation method {self.method!r}; known: {sorted(METHODS)}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.lora_rank < 1 or self.lora_alpha <= 0:
            raise ValueError(f"lora_rank must be >= 1 and lora_alpha > 0, got {self.lora_rank}, {self.lora_alpha}")
        unknown = set(self.lora_targets or ()) - set(LORA_TARGET_GROUPS)
        if unknown:
            raise ValueError(f"unknown lora_targets {sorted(unknown)}; known: {sorted(LORA_TARGET_GROUPS)}")
        if self.lora_targets is not None and not self.method.startswith("lora"):
            raise ValueError(f"lora_targets is only meaningful for LoRA methods, not {self.method!r}")
        if self.train_blocks is not None and (not self.train_blocks or min(self.train_blocks) < 0):
            raise ValueError(f"train_blocks must be a non-empty tuple of block indices >= 0, got {self.train_blocks}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "AdaptationSpec":
        tuples = {k: tuple(v) for k in ("lora_targets", "train_blocks") if (v := record.get(k)) is not None}
        return cls(**{**record, **tuples})

    def target_groups(self) -> tuple[str, ...]:
        return self.lora_targets or LORA_PRESETS[self.method]


def _blocks_pattern(spec: AdaptationSpec, depth: int) -> str:
    blocks = range(depth) if spec.train_blocks is None else spec.train_blocks
    if max(blocks) >= depth:
        raise ValueError(f"train_blocks {spec.train_blocks} names a block beyond the model's depth {depth}")
    return "(" + "|".join(str(b) for b in sorted(set(blocks))) + ")"


def _full(var: VAR, spec: AdaptationSpec) -> None:
    pattern = re.compile(rf"blocks\.{_blocks_pattern(spec, var.depth)}\.")
    for name, param in var.named_parameters():
        param.requires_grad_(spec.train_blocks is None or bool(pattern.match(name)))


def _peft_inject(var: VAR, config: peft.PeftConfig, *, seed: int) -> None:
    # Adapter initialisation draws from the global RNG inside peft: fork it so the result depends on ``seed`` only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.get_peft_model(var, config)  # modifies ``var`` in place and freezes every non-adapter parameter


def _lora(var: VAR, spec: AdaptationSpec) -> None:
    modules = "|".join(re.escape(path) for group in spec.target_groups() for path in LORA_TARGET_GROUPS[group])
    target = rf"blocks\.{_blocks_pattern(spec, var.depth)}\.({modules})"
    _peft_inject(var, peft.LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules=target), seed=spec.seed)


def _ln_tuning(var: VAR, spec: AdaptationSpec) -> None:
    target = rf"blocks\.{_blocks_pattern(spec, var.depth)}\.ada_lin\.1"
    _peft_inject(var, peft.LNTuningConfig(target_modules=target), seed=spec.seed)


METHODS: dict[str, Callable[[VAR, AdaptationSpec], None]] = {
    "full": _full, "lora": _lora, "lora_attention": _lora, "lora_mlp": _lora, "ln_tuning": _ln_tuning,
}


def adapt(var: VAR, spec: AdaptationSpec) -> VAR:
    """Prepare a base VAR for fine-tuning, in place: new label set, patches, method, trainable class embedding.
    Move ``var`` to its training device first (peft adapters are created where the base weights live)."""
    if var.num_classes != spec.num_classes:
        resize_class_embedding(var, spec.num_classes, init=spec.class_init, generator=torch.Generator().manual_seed(spec.seed))
    apply_patches(var)
    METHODS[spec.method](var, spec)
    var.class_emb.weight.requires_grad_(True)
    var.__dict__["adaptation"] = spec
    return var


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def parameter_counts(var: VAR) -> dict[str, int]:
    """Trainable parameters with and without the new class embedding, and the base model's total (adapter
    parameters excluded) against which the paper reports the trainable share."""
    trainable = sum(p.numel() for p in trainable_parameters(var).values())
    adapter = sum(p.numel() for name, p in var.named_parameters() if _is_adapter_parameter(name))
    total = sum(p.numel() for p in var.parameters()) - adapter
    return {"trainable": trainable, "trainable_without_class_embedding": trainable - var.class_emb.weight.numel(), "base_total": total}


def _is_adapter_parameter(name: str) -> bool:
    return ".lora_" in name or ".ln_tuning_layers." in name


def merge_adapters(var: VAR) -> VAR:
    """Fold LoRA / LN-tuning adapters into the base weights and remove the adapter layers (fast sampling,
    official-layout export). In place; afterwards the model has no trainable-subset structure left."""
    for name, module in list(var.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(var.get_submodule(parent_name) if parent_name else var, child, _merged_layer(module))
    var.__dict__.pop("adaptation", None)
    return var


def _merged_layer(module: BaseTunerLayer) -> nn.Module:
    if isinstance(module, peft.tuners.ln_tuning.layer.LNTuningLayer):
        return module.base_layer  # LNTuningLayer.merge swaps the tuned copy into base_layer
    return module.get_base_layer()


ADAPTER_KIND = "var-adapter"


def save_adapter(var: VAR, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the trainable tensors of an adapted VAR (adapters, class embedding; everything for ``full``) with a
    sidecar holding the adaptation spec, the base architecture, the base checkpoint's SHA-256 (when the base was
    loaded with ``load_var``) and ``metadata`` (e.g. the trial config)."""
    spec = var.__dict__.get("adaptation")
    if spec is None:
        raise ValueError("this VAR was not prepared with adapt(); nothing identifies its trainable subset")
    meta = {**dict(metadata or {}), "adaptation": spec.to_dict(), "base_sha256": getattr(var, "checkpoint_sha256", None)}
    return save_tensors(path, trainable_parameters(var), kind=ADAPTER_KIND, architecture=_base_architecture(var), metadata=meta)


def _base_architecture(var: VAR) -> dict[str, Any]:
    return {**var.architecture, "num_classes": None}  # the class count belongs to the adaptation, not the base


def load_adapter(base: VAR, path: str | os.PathLike) -> VAR:
    """Apply the adapter at ``path`` to a freshly loaded base VAR (in place) and return the fine-tuned model.
    Refuses a base loaded from another checkpoint file than the one the adapter was trained on. The adapter's
    tensors and sidecar are read as one verified pair (``read_verified``) before the base is touched."""
    state, _, metadata = read_verified(path, kind=ADAPTER_KIND, architecture=_base_architecture(base))
    if not isinstance(metadata, dict) or not isinstance(metadata.get("adaptation"), dict):
        raise CheckpointError(f"adapter {path} has no sidecar {path}.json with its adaptation spec; it cannot be applied")
    trained_on, given = metadata.get("base_sha256"), getattr(base, "checkpoint_sha256", None)
    if trained_on and given and trained_on != given:
        raise CheckpointError(f"adapter {path} was trained on the base checkpoint with SHA-256 {trained_on}, "
                              f"but the given base was loaded from a file with SHA-256 {given}")
    non_finite = sorted(k for k, v in state.items() if v.dtype.is_floating_point and not bool(torch.isfinite(v).all()))
    if non_finite:
        raise CheckpointError(f"adapter {path} holds NaN/inf values in {len(non_finite)} tensor(s): {', '.join(non_finite[:8])}")
    try:
        spec = AdaptationSpec.from_dict(metadata["adaptation"])
    except (TypeError, ValueError) as err:  # a sidecar edited by hand, or of another version
        raise CheckpointError(f"adapter {path}: its sidecar's adaptation spec is not usable: {err}") from err
    adapt(base, spec)
    expected = trainable_parameters(base)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(f"adapter {path} does not fit this base model: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                              f"mis-shaped {sorted(mismatched)[:8]}")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(state[name])
    return base


def official_export_state(var: VAR) -> dict[str, torch.Tensor]:
    """The fine-tuned model as one plain checkpoint in the official key layout (adapters merged, patches undone
    in the key names). Merges in place: call on a model you no longer train."""
    from .patches import official_state_dict
    return official_state_dict(merge_adapters(var))
