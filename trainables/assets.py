"""A sweep's asset files (VAR / VQVAE checkpoints, the Inception weights, dataset splits): what the driver reads of
them before any GPU is allocated, and their content ids.

- Checks read what is cheap and safe: a checkpoint's pickle header and key list memory-mapped with
  ``weights_only`` (no tensor data is read, nothing is executed), compared with a meta-device model's state dict;
  its ``<file>.json`` sidecar's form and architecture; the Inception weights loaded into torch-fidelity's network
  on the CPU (about 100 MB); every listed image's existence.
- Content ids make trial ids independent of where the files are mounted: a checkpoint's SHA-256 (from the
  varsweep sidecar when there is one, else hashed once and remembered in ``<cache_dir>/content-ids.json`` keyed by
  (absolute path, size, mtime)), and a dataset's SHA-256 over its name and its two split listings' content ids
  (``ImageList.content_id``).
- ``verify_content`` runs in each trial: the files it is about to use are still the ones its id names.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from bench.schema import ConfigError, TrialConfig

from .data.datasets import ImageList
from .models.checkpoints import (
    SIDECAR_FORMAT,
    CheckpointError,
    atomic_write,
    check_sidecar,
    check_state_dict,
    file_lock,
    file_sha256,
    read_sidecar,
    what_it_holds,
)
from .models.var import build_var
from .models.vqvae import OFFICIAL_CH_MULT, OFFICIAL_PATCH_NUMS, build_vqvae

CONTENT_IDS_FILE = "content-ids.json"
CONTENT_IDS_FORMAT = "varsweep-content-ids/1"
# What ``trial.load_base`` loads for an official base (the ``load_var`` / ``load_vqvae`` defaults).
OFFICIAL_VAR = dict(num_classes=1000, patch_nums=OFFICIAL_PATCH_NUMS, vocab_size=4096, z_channels=32)
OFFICIAL_VQVAE = dict(
    vocab_size=4096,
    z_channels=32,
    ch=160,
    patch_nums=OFFICIAL_PATCH_NUMS,
    share_quant_resi=4,
    ch_mult=OFFICIAL_CH_MULT,
    num_res_blocks=2,
)
_READ_ERRORS = (
    pickle.UnpicklingError,
    RuntimeError,
    EOFError,
    OSError,
    zipfile.BadZipFile,
    ValueError,
    KeyError,
)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# --- content ids ---------------------------------------------------------------------------------------------
def sidecar_sha256(path: str | os.PathLike) -> str | None:
    """The SHA-256 a varsweep sidecar (``<path>.json``) records for ``path``; None without a readable one. Cheap:
    the loaders check the file against it (``verify_sidecar``) before using the weights."""
    try:
        record = read_sidecar(path)
    except CheckpointError:
        return None  # a damaged sidecar: the file is hashed instead, and its loader names the problem
    if record is None or record.get("format") != SIDECAR_FORMAT or not _is_sha256(record.get("sha256")):
        return None
    return record["sha256"]


class FileIds:
    """SHA-256 of (large) files, each computed at most once: from the sidecar when there is one, else hashed and
    remembered in ``<cache_dir>/content-ids.json`` under (absolute path, size, mtime_ns), so an 8 GB checkpoint
    is read once per machine and file version. ``write=False`` reads the cache and creates nothing."""

    def __init__(
        self, cache_dir: str | os.PathLike, *, write: bool, log: Callable[[str], None] | None = None
    ):
        self.path, self.write, self.log = Path(cache_dir) / CONTENT_IDS_FILE, write, log
        self.known = self._read()
        self.new: dict[str, dict] = {}

    def _read(self) -> dict[str, dict]:
        try:
            record = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}  # no cache yet, or a damaged one: hashing again is always right
        files = (
            record.get("files")
            if isinstance(record, dict) and record.get("format") == CONTENT_IDS_FORMAT
            else None
        )
        return files if isinstance(files, dict) else {}

    def sha256(self, path: str | os.PathLike, *, sidecar: bool = True) -> str | None:
        """The file's SHA-256 (hex), or None when it is missing or unreadable (the preflight names it)."""
        path = str(path)
        try:
            info = os.stat(path)
        except OSError:
            return None
        if sidecar and (recorded := sidecar_sha256(path)) is not None:
            return recorded
        key = {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
        entry = self.new.get(path) or self.known.get(path)
        if (
            isinstance(entry, dict)
            and {k: entry.get(k) for k in key} == key
            and _is_sha256(entry.get("sha256"))
        ):
            return entry["sha256"]
        if self.log is not None:
            # A dry run or a status writes nothing, so it hashes again each time: "once" holds for runs that write.
            kept = "once" if self.write else "not kept (this command writes no cache; a sweep keeps it)"
            self.log(
                f"hashing {path} ({info.st_size / 2**30:.2f} GiB), {kept}: its SHA-256 identifies the trials "
                "that use it"
            )
        try:
            digest = file_sha256(path)
        except OSError:
            return None
        self.new[path] = {**key, "sha256": digest}
        return digest

    def save(self) -> None:
        """Merge what was hashed into the cache file (under a lock, atomically: drivers may share the cache)."""
        if not (self.write and self.new):
            return
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            files = {**self._read(), **self.new}
            text = json.dumps({"format": CONTENT_IDS_FORMAT, "files": files}, indent=1, sort_keys=True)
            atomic_write(self.path, lambda tmp: tmp.write_text(text))
        self.known, self.new = files, {}


def dataset_content_id(config: TrialConfig, splits: tuple[ImageList, ImageList]) -> str:
    """SHA-256 (hex) of the dataset's name and its training and evaluation splits' content ids (relative paths,
    labels, sizes, sampled bytes). Raises ``DatasetError`` when a listed image is missing."""
    train, evaluation = splits
    root = config.data.root
    parts = {
        "dataset": config.data.dataset,
        "train": [train.split, train.content_id(root)],
        "evaluation": [evaluation.split, evaluation.content_id(root)],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def verify_content(config: TrialConfig, *, splits: tuple[ImageList, ImageList], files: FileIds) -> None:
    """In the trial, before anything is loaded: every file and the dataset whose content id the config carries is
    still that content (a checkpoint replaced after the sweep was launched must not be trained on under the old
    trial's id). ``files`` answers as ``identify`` did: a varsweep sidecar's SHA-256 (its loader then checks the file
    against it), else the cached hash of this path, size and mtime, else the file is hashed. Raises ``ConfigError``
    naming the field and the file."""
    m, e = config.model, config.evaluation
    for field_name, path, expected, sidecar in (
        ("model.var_checkpoint", m.var_checkpoint, m.var_checkpoint_sha256, True),
        ("model.vqvae_checkpoint", m.vqvae_checkpoint, m.vqvae_checkpoint_sha256, True),
        ("evaluation.inception_weights", e.inception_weights, e.inception_weights_sha256, False),
    ):
        if expected is None:
            continue
        actual = files.sha256(path, sidecar=sidecar)
        if actual is None:
            raise ConfigError(
                f"{field_name}: cannot read {path} (it was identified when the sweep was launched)"
            )
        if actual != expected:
            raise ConfigError(
                f"{field_name}: {path} has SHA-256 {actual[:16]}..., not the {expected[:16]}... this trial was "
                "identified with: the file was replaced or changed after the sweep was launched; relaunch the sweep "
                "(the new file is a new trial)"
            )
    if config.data.content_id is not None:
        actual = dataset_content_id(config, splits)
        if actual != config.data.content_id:
            raise ConfigError(
                f"data.root: the {config.data.dataset} images under {config.data.root} changed after the sweep was "
                f"launched (content id {actual[:16]}..., expected {config.data.content_id[:16]}...): images were added, "
                "removed or replaced; relaunch the sweep (the new data is a new trial)"
            )


# --- checks --------------------------------------------------------------------------------------------------
def read_header(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict memory-mapped (``weights_only``: only tensors are unpickled; ``mmap``: no tensor
    data is read, so a multi-GB file costs its key list). Raises ``CheckpointError`` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no file at {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "_use_new_zipfile_serialization" not in str(err):
                raise
            state = torch.load(
                path, map_location="cpu", weights_only=True
            )  # the legacy format cannot be mapped
    except _READ_ERRORS as err:
        # torch's message is empty for some files (an HTML page saved as .pth): its first bytes then say what it is
        reason = _reason(err) or _first_bytes(path)
        raise CheckpointError(
            f"cannot read checkpoint {path} (truncated, corrupt, a pickle of other objects, or not a "
            f"PyTorch weights file): {type(err).__name__}: {reason}"
        ) from err
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, expected a state dict of tensors"
        )
    not_tensors = [
        str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)
    ]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint {path} is not a flat state dict of tensors (entries {not_tensors[:5]} are not tensors)"
        )
    return dict(state)


def _first_bytes(path: Path) -> str:
    """What a file's first bytes are, in words (``what_it_holds``)."""
    try:
        with open(path, "rb") as handle:
            return what_it_holds(handle)
    except OSError as err:
        return f"cannot be read: {err}"


def _reason(err: BaseException) -> str:
    """The informative line of a ``torch.load`` error (weights_only's names the refused global, after a preamble)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(err).splitlines()]
    refused = [
        line.split("WeightsUnpickler error:", 1)[1].split(". Please")[0].strip()
        for line in lines
        if "WeightsUnpickler error:" in line
    ]
    return (refused or [line for line in lines if line] or [""])[0][:300]


@functools.lru_cache(maxsize=16)
def _meta_model(kind: str, architecture: str):
    """A meta-device model (no memory) of ``architecture`` (JSON of the build arguments), cached per sweep."""
    kwargs = json.loads(architecture)
    return build_var(**kwargs, device="meta") if kind == "var" else build_vqvae(**kwargs, device="meta")


def check_checkpoint(path: str | os.PathLike, *, kind: str, architecture: Mapping[str, Any]) -> None:
    """Preflight of one checkpoint for a ``kind`` ("var" or "vqvae") model built with ``architecture`` (the
    ``build_var`` / ``build_vqvae`` keywords): the sidecar, when there is one, describes that model; the file's
    keys, shapes and dtype kinds match it. No tensor data is read (NaN checks and the SHA-256 happen at load)."""
    if kind not in ("var", "vqvae"):
        raise ValueError(f"kind must be 'var' or 'vqvae', got {kind!r}")
    model = _meta_model(kind, json.dumps(dict(architecture), sort_keys=True))
    check_sidecar(path, kind=kind, architecture=model.architecture)
    state = read_header(path)
    check_state_dict(
        state, model.state_dict(), finite_keys=set(), path=path, what=f"{kind.upper()} {dict(architecture)}"
    )


def check_inception_weights(path: str | os.PathLike) -> None:
    """The file is torch-fidelity's Inception-v3 state dict: read as plain tensors first (``weights_only``), then
    loaded strictly into the network on the CPU (what every trial's evaluation does). Raises ``CheckpointError``."""
    from .evaluation.features import INCEPTION, build_extractor

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no file at {path}")
    try:
        build_extractor(INCEPTION, weights_path=path)
    except Exception as err:
        # The extractor's own refusals name the file: named once here, in front
        lines = [
            line.strip()
            for line in str(err)
            .replace(f"checkpoint {path}", "it")
            .replace(str(path), "the file")
            .splitlines()
            if line.strip()
        ]
        detail = "; ".join(lines[:2])[:300]
        raise CheckpointError(
            f"{path} is not torch-fidelity's Inception-v3 weights file "
            f"(weights-inception-2015-12-05-6726825d.pth): {type(err).__name__}: {detail}"
        ) from err
