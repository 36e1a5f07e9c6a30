"""Adapters in peft's own format: a folder that ``peft.PeftModel.from_pretrained`` loads onto a VAR.

``save_peft_adapter(var, folder, adaptation=...)`` writes what ``adapt`` trained with peft's own
``save_pretrained``: ``adapter_config.json`` (the LoRA / LN-tuning configuration ``adapt`` injected, plus the new
class embedding as a whole trained module: LoRA's ``modules_to_save=["class_emb"]``, one more LN-tuning target) and
``adapter_model.safetensors``. Beside them, ``varsweep_adapter.json`` keeps the provenance peft's config has no
field for: the adaptation record, the base checkpoint's SHA-256 and architecture, the training split's class names,
the SHA-256s of the weights file and of ``adapter_config.json`` (both checked on reading: peft builds its model
from the config) and the caller's metadata (e.g. the trial config).

Loading is peft's API on a base prepared by one documented call::

    base = load_var("var_d16.pth", depth=16)                     # or build_var(...) for a base built in memory
    model = PeftModel.from_pretrained(peft_base(base, folder, base_sha256=checkpoint_sha256("var_d16.pth")), folder)
    merged = model.merge_and_unload()                            # a plain VAR in the official key layout

``peft_base`` is needed because the adapter's class embedding has the new label count (K+1 rows), and peft only
loads a saved module into one of the same shape: it checks the base against the provenance (architecture, depth,
SHA-256) and re-sizes the class embedding as ``adapt`` did. The per-sample-gradient patches
(``trainables.patches``) are not needed: they leave every adapter target and the outputs unchanged. varsweep's own
``load_adapter`` accepts such a folder too. Full fine-tuning has no adapter and is refused with a message naming
the official-layout export instead.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import peft
import safetensors.torch
import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError

from bench.schema import ConfigError

from .methods import (
    CLASS_EMBEDDING,
    CLASS_NAMES,
    PEFT_PREPARED,
    Adaptation,
    apply_adapter_state,
    base_architecture,
    check_finite,
    check_fresh_base,
    check_record_fits,
    class_names_entry,
    is_adapter_parameter,
    peft_config,
    recorded_class_names,
    saved_adaptation,
    tensor_differences,
    trainable_parameters,
)
from .models.checkpoints import (
    CheckpointError,
    architecture_differences,
    atomic_write,
    resize_class_embedding,
)
from .models.var import VAR

PROVENANCE_FILE = "varsweep_adapter.json"
PROVENANCE_KIND = "varsweep-peft-adapter"
ADAPTER_NAME = "default"  # the adapter name ``adapt`` injects under (peft's default)
# Where each peft method's wrapper of the class embedding holds the trained copy (``methods.peft_config``).
CLASS_EMBEDDING_COPY = {peft.PeftType.LORA: "modules_to_save", peft.PeftType.LN_TUNING: "ln_tuning_layers"}
PEFT_PREFIX = "base_model.model."  # where PeftModel keeps the wrapped VAR's keys


def save_peft_adapter(
    var: VAR,
    folder: str | os.PathLike,
    *,
    adaptation: Adaptation,
    metadata: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the adapter of a VAR prepared by ``adapt`` (and trained) as a peft folder (see the module docstring),
    replacing ``folder`` as a whole only once everything is written. ``adaptation``: what ``adapt`` returned;
    ``metadata``: the caller's (JSON), kept in the provenance file; ``class_names``: the training split's (as
    ``methods.save_adapter`` records them). Refuses ``full`` fine-tuning (no adapter) and a model with trainable
    tensors outside the adapter and the class embedding, or a record of another label count or of blocks the model
    lacks (no loader would accept the folder)."""
    config = peft_config(adaptation, depth=var.depth, with_class_embedding=True)  # refuses "full": no adapter
    if adaptation.num_classes != var.num_classes:
        raise ValueError(
            f"adaptation: the record holds {adaptation.num_classes} classes, the model {var.num_classes}; pass the "
            "Adaptation that adapt() returned for it"
        )
    names = class_names_entry(class_names, num_classes=adaptation.num_classes)
    trained = {name: param.detach().cpu() for name, param in trainable_parameters(var).items()}
    others = sorted(
        name for name in trained if name != f"{CLASS_EMBEDDING}.weight" and not is_adapter_parameter(name)
    )
    if others:
        raise ValueError(
            f"save_peft_adapter: {len(others)} trainable tensor(s) are neither adapter weights nor the class "
            f"embedding, so peft could not restore them: {others[:8]}"
        )
    twin = _peft_twin(var, config)
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    twin.save_pretrained(staging, state_dict=_twin_state(twin, trained))
    weights = (staging / SAFETENSORS_WEIGHTS_NAME).read_bytes()
    provenance = {
        "kind": PROVENANCE_KIND,
        "adaptation": adaptation.to_dict(),
        "base_sha256": adaptation.base_sha256,
        "base_architecture": base_architecture(var),
        CLASS_NAMES: names,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
        # peft builds its model from this file: an edited rank, alpha or target list would make peft's loader and
        # varsweep's (which builds from the adaptation record) give two different models, so it is pinned too
        "config_sha256": hashlib.sha256((staging / CONFIG_NAME).read_bytes()).hexdigest(),
        "peft_version": peft.__version__,
        "metadata": dict(metadata or {}),
    }
    text = json.dumps(provenance, indent=1)
    atomic_write(staging / PROVENANCE_FILE, lambda tmp: tmp.write_text(text))
    shutil.rmtree(folder, ignore_errors=True)  # a retried trial's earlier folder
    os.replace(staging, folder)
    return folder


def _peft_twin(var: VAR, config: peft.PeftConfig) -> peft.PeftModel:
    """A weightless (meta-device) PeftModel of ``var``'s layout under ``config``: peft's own ``save_pretrained``
    runs on it with the trained tensors passed in, so nothing of the base is copied."""
    with torch.device("meta"):
        twin = VAR(**var.architecture)
    return peft.get_peft_model(twin, copy.deepcopy(config))


def _twin_state(twin: peft.PeftModel, trained: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained tensors under the twin's keys: the adapters' as they are, the class embedding as the trained
    copy its peft wrapper holds (LoRA: a module to save; LN tuning: a tuned layer)."""
    holder = CLASS_EMBEDDING_COPY[twin.peft_config[ADAPTER_NAME].peft_type]
    state = {
        PEFT_PREFIX + name.replace(f"{CLASS_EMBEDDING}.", f"{CLASS_EMBEDDING}.{holder}.{ADAPTER_NAME}.", 1)
        if name.startswith(f"{CLASS_EMBEDDING}.")
        else PEFT_PREFIX + name: tensor
        for name, tensor in trained.items()
    }
    differences = tensor_differences(trainable_parameters(twin), state)
    if differences:  # a record of other blocks, targets or rank than the model's
        raise ValueError(
            f"adaptation: the record does not describe this model's trained tensors (as peft "
            f"{peft.__version__} names them): {differences}; pass the Adaptation that adapt() returned for it"
        )
    return state


def read_provenance(folder: str | os.PathLike) -> tuple[dict[str, Any], bytes]:
    """(provenance record, bytes of ``adapter_model.safetensors``) of a peft folder written by
    ``save_peft_adapter``; ``CheckpointError`` naming a missing file, another kind of folder, or weights that are
    not the ones the provenance records (edited, truncated or from another save)."""
    folder = Path(folder)
    missing = [
        name
        for name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, PROVENANCE_FILE)
        if not (folder / name).is_file()
    ]
    if missing:
        raise CheckpointError(
            f"peft adapter folder {folder}: missing {', '.join(missing)} (expected a folder written by "
            "trainables.peft_format.save_peft_adapter)"
        )
    try:
        record = json.loads((folder / PROVENANCE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"peft adapter folder {folder}: {PROVENANCE_FILE} is not readable JSON ({err})"
        ) from err
    if not isinstance(record, dict) or record.get("kind") != PROVENANCE_KIND:
        raise CheckpointError(
            f"peft adapter folder {folder}: {PROVENANCE_FILE} is not a {PROVENANCE_KIND!r} record"
        )
    weights = (folder / SAFETENSORS_WEIGHTS_NAME).read_bytes()
    if hashlib.sha256(weights).hexdigest() != record.get("weights_sha256"):
        raise CheckpointError(
            f"peft adapter folder {folder}: {SAFETENSORS_WEIGHTS_NAME} is not the file its {PROVENANCE_FILE} "
            "records (SHA-256 differs): changed or replaced after saving"
        )
    _check_config(folder, record)
    return record, weights


# The adapter_config.json fields that decide which model peft builds, compared for folders saved before the
# config's SHA-256 was recorded (dropout is 0 and changes no evaluation; peft's other fields are its defaults).
CONFIG_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "modules_to_save")


def _check_config(folder: Path, record: Mapping[str, Any]) -> None:
    """Refuse an ``adapter_config.json`` other than the one saved, or one the adaptation record does not give:
    varsweep's loader builds the model from the adaptation record, peft's from this file, and the two must
    agree. Its SHA-256 (where recorded; folders saved before lack it) pins the file; the fields that shape the
    model (``CONFIG_FIELDS``) are compared with the config the adaptation record gives (``methods.peft_config``),
    so an edit on either side is refused."""
    text = (folder / CONFIG_NAME).read_bytes()
    recorded = record.get("config_sha256")
    if recorded is not None and hashlib.sha256(text).hexdigest() != recorded:
        raise CheckpointError(
            f"peft adapter folder {folder}: {CONFIG_NAME} is not the file its {PROVENANCE_FILE} records "
            "(SHA-256 differs): edited after saving, so peft's loader would build another model than the one "
            "trained"
        )
    differing = _config_differences(folder, record, text)
    if differing:
        raise CheckpointError(
            f"peft adapter folder {folder}: {CONFIG_NAME} and the adaptation record in {PROVENANCE_FILE} "
            f"describe different models ({'; '.join(differing)}): one was edited after saving, so peft's loader "
            "and varsweep's would build different models"
        )


def _config_differences(folder: Path, record: Mapping[str, Any], text: bytes) -> list[str]:
    """``CONFIG_FIELDS`` whose value in the config ``text`` is not the one the adaptation record gives."""
    try:
        saved = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"peft adapter folder {folder}: {CONFIG_NAME} is not readable JSON ({err})"
        ) from err
    depth = (record.get("base_architecture") or {}).get("depth")
    if not isinstance(saved, dict) or not isinstance(depth, int):
        raise CheckpointError(
            f"peft adapter folder {folder}: {CONFIG_NAME}, or the base architecture in {PROVENANCE_FILE}, is not "
            "a record"
        )
    try:
        config = peft_config(
            saved_adaptation(folder, record, base_sha256=None), depth=depth, with_class_embedding=True
        )
    except ConfigError as err:  # a record edited by hand: blocks the base lacks, a method without an adapter
        raise CheckpointError(
            f"peft adapter folder {folder}: its adaptation record does not fit its base: {err}"
        ) from err
    trained = json.loads(json.dumps(config.to_dict()))  # as JSON holds it: enums as strings, tuples as lists
    return [
        f"{field}: {saved.get(field)!r}, trained with {trained[field]!r}"
        for field in CONFIG_FIELDS
        if field in trained and saved.get(field) != trained[field]
    ]


def check_base(base: VAR, folder: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Refuse a base whose architecture (depth, width, heads, scales, vocabulary, ...) is not the one the adapter
    in ``folder`` was trained on, naming each field that differs."""
    saved = record.get("base_architecture")
    if not isinstance(saved, dict):
        raise CheckpointError(
            f"peft adapter folder {folder}: its {PROVENANCE_FILE} records no base architecture"
        )
    differences = architecture_differences(saved, base_architecture(base))
    if differences:
        raise CheckpointError(
            f"peft adapter folder {folder} was trained on another VAR: " + "; ".join(differences)
        )


def peft_base(base: VAR, folder: str | os.PathLike, *, base_sha256: str | None) -> VAR:
    """Prepare ``base`` (a VAR from ``build_var``/``load_var``, without adapters) for
    ``peft.PeftModel.from_pretrained(base, folder)``, in place, and return it: refuses a base that already carries
    adapters or patches or that ``peft_base`` prepared before (``methods.check_fresh_base``: peft's merged model
    is that same object, so a loop over folders on one base stacked each adapter on the last), another
    architecture or (``base_sha256``: the SHA-256 of the file ``base`` was loaded from, None for a base built in
    memory) another base checkpoint, then gives it the adapter's label count as ``adapt`` did (same rows, same
    seed), so peft's copy of the saved class embedding has the shape it loads into."""
    check_fresh_base(base, folder)
    adaptation, _, _ = _checked_folder(base, folder, base_sha256=base_sha256)
    # Always, as ``adapt`` does (also for the base's own label count): the same rows, the same seed.
    resize_class_embedding(
        base,
        adaptation.num_classes,
        init=adaptation.method.class_init,
        generator=torch.Generator().manual_seed(adaptation.seed),
    )
    setattr(base, PEFT_PREPARED, str(folder))
    return base


def peft_record(
    base: VAR, folder: str | os.PathLike, *, base_sha256: str | None
) -> tuple[Adaptation, tuple[str, ...] | None]:
    """``methods.adapter_record`` for a peft folder: (its ``Adaptation``, the training class names or None) after
    the checks every reader of the folder makes (``_checked_folder``)."""
    adaptation, class_names, _ = _checked_folder(base, folder, base_sha256=base_sha256)
    return adaptation, class_names


def load_peft_folder(base: VAR, folder: str | os.PathLike, *, base_sha256: str | None) -> Adaptation:
    """``methods.load_adapter`` for a peft folder: adapt ``base`` as recorded (patches included, ready to train or
    sample like any varsweep-adapted VAR) and copy the folder's tensors in; the same refusals as for ``adapter.pt``
    (another architecture or base checkpoint, NaN/inf, tensors that do not fit), checked before ``base`` changes."""
    saved, _, state = _checked_folder(base, folder, base_sha256=base_sha256)
    return apply_adapter_state(base, folder, saved=saved, state=state, base_sha256=base_sha256)


def _checked_folder(
    base: VAR, folder: str | os.PathLike, *, base_sha256: str | None
) -> tuple[Adaptation, tuple[str, ...] | None, dict[str, torch.Tensor]]:
    """(``Adaptation``, training class names or None, tensors under varsweep's parameter names) of a peft folder,
    after every check its readers share, so that ``peft_base``, ``load_adapter`` and ``adapter_record`` refuse
    the same folders: its files (``read_provenance``), ``base``'s architecture (a meta-device build will do),
    the base checkpoint's SHA-256 (None skips it), the record's fit to ``base``, its class names, and weights that
    safetensors cannot read or that hold NaN/inf."""
    record, weights = read_provenance(folder)
    check_base(base, folder, record)
    adaptation = saved_adaptation(folder, record, base_sha256=base_sha256)
    check_record_fits(base, folder, adaptation)
    class_names = recorded_class_names(folder, record, num_classes=adaptation.num_classes)
    try:
        saved = safetensors.torch.load(weights)
    except SafetensorError as err:  # damaged bytes whose SHA-256 the provenance was edited to match
        raise CheckpointError(
            f"peft adapter folder {folder}: {SAFETENSORS_WEIGHTS_NAME} is not a readable safetensors file ({err})"
        ) from err
    state = {_varsweep_name(key): tensor for key, tensor in saved.items()}
    check_finite(folder, state)
    return adaptation, class_names, state


def _varsweep_name(key: str) -> str:
    """A key of ``adapter_model.safetensors`` as the parameter name in a VAR adapted by ``adapt``. peft saves
    without the adapter name (``blocks.0.attn.proj.lora_A.weight``), ``adapt`` names it
    (``blocks.0.attn.proj.lora_A.default.weight``); the class embedding, a plain trained module in ``adapt``,
    is saved by LoRA as ``class_emb.weight`` and by LN tuning as ``class_emb.ln_tuning_layers.weight``."""
    name = key.removeprefix(PEFT_PREFIX)
    if name.startswith(f"{CLASS_EMBEDDING}."):
        return f"{CLASS_EMBEDDING}.{name.rpartition('.')[2]}"
    for layer in ("lora_A", "lora_B", "ln_tuning_layers"):
        name = name.replace(f".{layer}.", f".{layer}.{ADAPTER_NAME}.", 1)
    return name
