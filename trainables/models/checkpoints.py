"""Load and save VAR / VQVAE weights from local paths in the official plain-state-dict layout.

Files are plain ``{key: tensor}`` dicts (``torch.load(weights_only=True)``), so checkpoints we write load with
``strict=True`` in the original VAR code too. Beside each file we write ``<file>.json`` (architecture, SHA-256 of
the weights, free-form metadata such as the trial config); when that sidecar exists, loading verifies it.
Every problem raises ``CheckpointError`` naming the file and what is wrong, before any model memory is allocated.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import secrets
import zipfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from .var import VAR, build_var, scale_layout
from .vqvae import OFFICIAL_CH_MULT, OFFICIAL_PATCH_NUMS, VQVAE, build_vqvae

SIDECAR_FORMAT = "varsweep-checkpoint/1"
CLASS_INITS = ("unconditional", "mean", "normal")
_MAX_LISTED = 12
_READ_ATTEMPTS = 3  # reads of a checkpoint whose pair is replaced meanwhile, before giving up


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: missing, unreadable, corrupt, or of another architecture."""


def _listing(title: str, items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED]) + (
        f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    )
    return f"  {title} ({len(items)}): {shown}"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a flat ``{str: Tensor}`` state dict on the CPU, with only tensor data unpickled (no sidecar check;
    ``read_verified`` checks one)."""
    path = Path(path)
    _require_file(path)
    with open(path, "rb") as handle:
        return _load_state(handle, path, check_crc=True)


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint file at {path}" + (" (it is a folder)" if path.is_dir() else "")
        )


def what_it_holds(handle: BinaryIO) -> str:
    """What an unreadable file is, from its first bytes: torch's own errors for an empty file (``EOFError`` with no
    message) or a text file (``KeyError: 101``) said nothing of either."""
    handle.seek(0)
    start = handle.read(64)
    if not start:
        return "it is empty: 0 bytes"
    if start[:4] != b"PK\x03\x04" and all(32 <= b < 127 or b in b"\t\n\r" for b in start):
        return f"it holds text, not a PyTorch weights file: {start.decode()[:40]!r}"
    return "truncated, corrupt or not a PyTorch weights file"


def read_checkpoint_header(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of the checkpoint file at ``path`` on the meta device: its keys, shapes and dtypes, from the
    file's header alone (no tensor data is read); refused as ``read_state_dict`` refuses it."""
    with open(path, "rb") as handle:
        return _load_state(handle, Path(path), map_location="meta")


def _load_state(
    handle: BinaryIO, path: Path, *, map_location: str = "cpu", check_crc: bool = False
) -> dict[str, torch.Tensor]:
    """The state dict in the open file ``handle`` (of ``path``, named in errors); ``weights_only``: a pickled
    object other than tensors and plain containers is refused, never constructed. ``check_crc``: verify the
    zip members' CRC-32s first (``check_zip_crcs``; where no sidecar's SHA-256 vouches for the bytes)."""
    if check_crc:
        check_zip_crcs(handle, path)
    try:
        state = torch.load(handle, map_location=map_location, weights_only=True)
    except Exception as err:
        detail = _load_failure(err)
        raise CheckpointError(
            f"cannot read checkpoint {path} ({what_it_holds(handle)}): "
            + f"{type(err).__name__}{': ' + detail if detail else ''}"
        ) from err
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, expected a state dict of tensors"
        )
    not_tensors = [
        f"{k!s} ({type(v).__name__})"
        for k, v in state.items()
        if not isinstance(k, str) or not isinstance(v, torch.Tensor)
    ]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint {path} is not a flat state dict of tensors (nested checkpoints such as "
            f"{{'model': ...}} must be unpacked first):\n" + _listing("non-tensor entries", not_tensors)
        )
    return dict(state)


def _load_failure(err: Exception) -> str:
    """What ``torch.load`` found wrong, in a line: its weights-only refusal opens with advice to load with
    ``weights_only=False`` (running whatever the file holds), never the thing to do with a damaged or foreign
    file, so only the unpickler's own finding is kept."""
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:
        finding = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
        return f"the weights-only unpickler refused it: {' '.join(finding.split())}"
    return text.splitlines()[0] if text else ""


def check_zip_crcs(handle: BinaryIO, path: Path) -> None:
    """Refuse a zip-format checkpoint (what ``torch.save`` writes, its members stored uncompressed) whose bytes
    do not match a member's recorded CRC-32: ``torch.load`` does not check them, so a file damaged in a copy
    loaded with changed weights, silently (a sidecar's SHA-256 catches that, the official files have none). One
    extra read of the file. A legacy (non-zip) file or a broken zip is left to ``torch.load``; members without a
    CRC-32 (``torch.serialization.set_crc32_options(False)`` writes 0) are not checked. ``handle`` is rewound."""
    member = None
    try:
        if not zipfile.is_zipfile(handle):
            return
        with zipfile.ZipFile(handle) as archive:
            for member in (m for m in archive.infolist() if m.CRC != 0):
                with archive.open(member) as data:  # raises BadZipFile at the end of a member that differs
                    while data.read(1 << 22):
                        pass
    except zipfile.BadZipFile as err:
        where = f"member {member.filename}: " if member is not None else ""
        raise CheckpointError(
            f"checkpoint {path} is damaged ({where}{err}): its bytes changed after it was saved; copy it again"
        ) from err
    except (OSError, EOFError, ValueError):  # truncated or torn: torch.load names the problem
        pass
    finally:
        handle.seek(0)


def check_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    finite_keys: set[str],
    path: str | os.PathLike,
    what: str,
) -> None:
    """Compare keys, shapes and dtype kinds with ``expected`` (a meta-device model's state dict) and look for
    NaN/inf in ``finite_keys`` (all but ``NON_FINITE_BY_DESIGN``: the attention mask holds -inf); raise one
    ``CheckpointError`` listing every problem."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} (expected {list(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    kinds = [
        f"{k} {state[k].dtype} (expected {v.dtype})"
        for k, v in expected.items()
        if k in state and state[k].dtype.is_floating_point != v.dtype.is_floating_point
    ]
    non_finite = [
        k
        for k in finite_keys
        if k in state and state[k].dtype.is_floating_point and not bool(torch.isfinite(state[k]).all())
    ]
    problems = [
        _listing(title, items)
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("mis-shaped keys", shapes),
            ("wrong dtype kind", kinds),
            ("keys with NaN/inf values", non_finite),
        )
        if items
    ]
    if problems:
        hint = _diagnosis(state, expected)
        raise CheckpointError(
            f"checkpoint {path} does not match the {what} it is loaded into:\n"
            + "\n".join(problems)
            + (f"\n  what it looks like: {hint}" if hint else "")
        )


# Keys only one of the two official models has: which file a swapped path gave.
VAR_MARKERS, VQVAE_MARKERS = ("class_emb.weight", "head.weight"), ("quantize.embedding.weight",)


def _diagnosis(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> str:
    """What a checkpoint whose keys do not match is, where its keys tell (key lists alone said nothing of it): the
    other model's file, a model saved inside DDP (``module.`` before every key), or a VAR of another depth."""
    keys, wanted = set(state), set(expected)
    if keys and all(k.startswith("module.") for k in keys) and {k[7:] for k in keys} == wanted:
        return (
            "every key starts with 'module.' (saved from inside DistributedDataParallel): strip that prefix"
        )
    for markers, other, this in ((VQVAE_MARKERS, "VQVAE", "VAR"), (VAR_MARKERS, "VAR", "VQVAE")):
        if all(m in keys for m in markers) and not any(m in wanted for m in markers):
            return f"the {other}'s checkpoint, given where the {this}'s goes (are the two paths swapped?)"
    depth, wanted_depth = _depth(keys), _depth(wanted)
    if depth and wanted_depth and depth != wanted_depth:
        return f"a VAR of depth {depth} (blocks 0-{depth - 1}); this model has depth {wanted_depth}: set model.depth"
    return ""


def _depth(keys: set[str]) -> int:
    """The number of transformer blocks ``blocks.<i>.`` keys name (0 for none)."""
    blocks = {int(k.split(".")[1]) for k in keys if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return max(blocks) + 1 if blocks else 0


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of the file's bytes."""
    with open(path, "rb") as handle:
        return _stream_sha256(handle)


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """The identity of a checkpoint as ``load_var``/``load_vqvae`` read it: the SHA-256 its sidecar records (the
    loaders refuse weights that differ from it), else the file's own; hashes a file only when it has no sidecar."""
    record = read_sidecar(path)
    sha = None if record is None else record.get("sha256")
    return sha if isinstance(sha, str) and sha else file_sha256(path)


def _stream_sha256(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: handle.read(1 << 22), b""):
        digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(path)}.json")


def staged_path(path: str | os.PathLike, sha256: str) -> Path:
    """Where ``save_tensors`` puts new weights until its sidecar commits them: beside ``path``, named by their
    SHA-256 (a hidden file no reader opens unless the sidecar names that SHA-256)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{sha256}.staged")


def _normalised(architecture: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(architecture)))  # tuples -> lists, so saved and requested compare equal


def read_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    """The sidecar ``<path>.json`` as a dict, None when there is none; one that is not a JSON object with an
    architecture raises ``CheckpointError`` naming it."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        record = json.loads(side.read_text())
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise CheckpointError(
            f"checkpoint sidecar {side} is not valid JSON: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(record, dict) or not isinstance(record.get("architecture", {}), dict):
        raise CheckpointError(
            f"checkpoint sidecar {side} is not a sidecar record (a JSON object with format, kind, architecture, sha256)"
        )
    return record


def _committed_weights(path: Path, record: Mapping[str, Any]) -> Path:
    """The file holding the weights ``record`` (the sidecar) describes. A save stopped after committing its
    sidecar and before moving the new weights into place left them staged under their SHA-256: finish that move
    (another reader may finish it first), or read the staged file itself where we may not write."""
    sha = record.get("sha256")
    staged = staged_path(path, sha) if isinstance(sha, str) and sha else None
    if staged is None or not staged.is_file():
        return path
    try:
        os.replace(staged, path)
    except FileNotFoundError:  # moved meanwhile, by the save itself or another reader
        pass
    except OSError:
        return staged
    return path


def _check_sidecar_kind(record: Mapping[str, Any], *, path: Path, kind: str) -> None:
    if record.get("format") != SIDECAR_FORMAT or record.get("kind") != kind:
        raise CheckpointError(
            f"{sidecar_path(path)} describes a {record.get('kind')!r} checkpoint of format {record.get('format')!r}, "
            f"expected {kind!r} / {SIDECAR_FORMAT}"
        )


def architecture_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """One ``"field: saved X, requested Y"`` line per architecture field (depth, width, scales, ...) that differs;
    tuples and lists compare equal (a JSON sidecar holds lists)."""
    saved, wanted = _normalised(saved), _normalised(wanted)
    return [
        f"{k}: saved {saved.get(k)!r}, requested {wanted.get(k)!r}"
        for k in sorted(set(saved) | set(wanted))
        if saved.get(k) != wanted.get(k)
    ]


def _check_sidecar_architecture(
    record: Mapping[str, Any], *, path: Path, kind: str, architecture: Mapping[str, Any]
) -> None:
    differing = architecture_differences(record.get("architecture", {}), architecture)
    if differing:
        raise CheckpointError(
            f"checkpoint {path} was saved for another {kind} architecture: {'; '.join(differing[:_MAX_LISTED])}"
            + (f" ... ({len(differing) - _MAX_LISTED} more)" if len(differing) > _MAX_LISTED else "")
        )


def _sha_mismatch(path: Path, record: Mapping[str, Any], actual: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} does not match the SHA-256 recorded in {sidecar_path(path)} "
        f"({str(record.get('sha256'))[:12]}..., the file has {actual[:12]}...): the weights file was changed or damaged after saving"
    )


def check_sidecar(
    path: str | os.PathLike, *, kind: str, architecture: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The sidecar record when ``<path>.json`` exists, checked to be ours, of ``kind`` and of ``architecture``,
    without reading the weights (the preflight's check; ``verify_sidecar`` adds the SHA-256)."""
    record = read_sidecar(path)
    if record is not None:
        _check_sidecar_kind(record, path=Path(path), kind=kind)
        _check_sidecar_architecture(record, path=Path(path), kind=kind, architecture=architecture)
    return record


def verify_sidecar(
    path: str | os.PathLike, *, kind: str, architecture: Mapping[str, Any]
) -> dict[str, Any] | None:
    """If ``<path>.json`` exists: check it is ours, that the weights' SHA-256 matches (catches a file damaged or
    replaced after saving; a save interrupted after its commit is completed first) and that its architecture
    equals the requested one. Returns its metadata. ``read_verified`` also reads the weights, in one pass."""
    path = Path(path)
    for _ in range(_READ_ATTEMPTS):
        record = read_sidecar(path)
        if record is None:
            return None
        _check_sidecar_kind(record, path=path, kind=kind)
        source = _committed_weights(path, record)
        _require_file(source)
        actual = file_sha256(source)
        if record.get("sha256") == actual:
            _check_sidecar_architecture(record, path=path, kind=kind, architecture=architecture)
            return record.get("metadata")
        if (
            read_sidecar(path) == record
        ):  # not a save committing meanwhile: the weights are not the ones saved
            raise _sha_mismatch(path, record, actual)
    raise _changing(path)


def _changing(path: Path) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} was replaced {_READ_ATTEMPTS} times while being read (another process keeps saving it)"
    )


def read_verified(
    path: str | os.PathLike, *, kind: str, architecture: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], str, dict[str, Any] | None]:
    """(state dict, SHA-256 of the bytes it was read from, sidecar metadata or None) of the checkpoint at ``path``,
    read once: the hash and the tensors come from the same open file, so a concurrent re-save cannot pair one
    file's tensors with another's hash. With a sidecar, its kind, SHA-256 and architecture are checked; a save
    interrupted after its commit is completed first; a pair replaced while we read is read again."""
    path = Path(path)
    for _ in range(_READ_ATTEMPTS):
        record = read_sidecar(path)
        if record is not None:
            _check_sidecar_kind(record, path=path, kind=kind)
        source = path if record is None else _committed_weights(path, record)
        _require_file(source)
        with open(source, "rb") as handle:
            actual = _stream_sha256(handle)
            if record is not None and record.get("sha256") != actual:
                if read_sidecar(path) == record:
                    raise _sha_mismatch(path, record, actual)
                continue  # a save committed a new pair while we read: read that one
            if record is not None:
                _check_sidecar_architecture(record, path=path, kind=kind, architecture=architecture)
            handle.seek(0)
            # Without a sidecar nothing vouches for the bytes (the official checkpoints): their CRC-32s do.
            state = _load_state(handle, path, check_crc=record is None)
            return state, actual, None if record is None else record.get("metadata")
    raise _changing(path)


# State-dict entries that hold -inf by design: VAR's scale-causal attention mask (its layout is checked apart).
NON_FINITE_BY_DESIGN = frozenset({"attn_bias_for_masking"})


def _load_into(
    path: str | os.PathLike,
    *,
    build_meta: Callable[[], nn.Module],
    what: str,
    kind: str,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
) -> tuple[nn.Module, str]:
    """(model on ``device``, SHA-256 of the file) after checking sidecar, keys, shapes and finiteness. Every
    floating tensor is in ``dtype`` (None: float32, whatever the file holds: a half-precision or mixed export
    loads as the model a float32 build gives, not as the file's dtypes, which ``assign`` would keep)."""
    model = build_meta()
    state, sha, _ = read_verified(path, kind=kind, architecture=model.architecture)
    check_state_dict(
        state,
        model.state_dict(),
        # buffers too: the keys' zero bias enters every attention (a NaN one made every output NaN)
        finite_keys=set(model.state_dict()) - NON_FINITE_BY_DESIGN,
        path=path,
        what=what,
    )
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device or "cpu", dtype=dtype or torch.float32), sha


def load_vqvae(
    path: str | os.PathLike,
    *,
    vocab_size: int = 4096,
    z_channels: int = 32,
    ch: int = 160,
    patch_nums: Sequence[int] = OFFICIAL_PATCH_NUMS,
    share_quant_resi: int = 4,
    ch_mult: Sequence[int] = OFFICIAL_CH_MULT,
    num_res_blocks: int = 2,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VQVAE:
    """Load a VQVAE from a local file; defaults describe the official ``vae_ch160v4096z32.pth``. ``dtype``: of
    the floating tensors (None: float32)."""
    arch = dict(
        vocab_size=vocab_size,
        z_channels=z_channels,
        ch=ch,
        patch_nums=tuple(patch_nums),
        share_quant_resi=share_quant_resi,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
    )
    vqvae, _ = _load_into(
        path,
        build_meta=lambda: build_vqvae(**arch, device="meta"),
        what=f"VQVAE {arch}",
        kind="vqvae",
        device=device,
        dtype=dtype,
    )
    return vqvae.eval()


def load_var(
    path: str | os.PathLike,
    *,
    depth: int,
    num_classes: int = 1000,
    patch_nums: Sequence[int] = OFFICIAL_PATCH_NUMS,
    vocab_size: int = 4096,
    z_channels: int = 32,
    embed_dim: int | None = None,
    num_heads: int | None = None,
    attn_l2_norm: bool = True,
    shared_aln: bool = False,
    drop_path_rate: float | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VAR:
    """Load a VAR from a local file. ``num_classes`` is the number of classes the checkpoint was trained with
    (1000 for the official ImageNet models); use ``resize_class_embedding`` to move to a new label set.
    ``dtype``: of the floating tensors (None: float32, whatever dtypes the file holds).
    The scale-layout buffers are checked against ``patch_nums`` (a checkpoint of another resolution fails).
    Nothing is recorded on the model: a caller that needs the file's identity (e.g. for ``methods.adapt``) takes
    ``checkpoint_sha256(path)``."""

    def build_meta() -> VAR:
        return build_var(
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
            device="meta",
        )

    var, _ = _load_into(
        path,
        build_meta=build_meta,
        what=f"VAR-d{depth} with {num_classes} classes",
        kind="var",
        device=device,
        dtype=dtype,
    )
    _check_scale_layout(var, path=path)
    return var


def _check_scale_layout(var: VAR, *, path: str | os.PathLike) -> None:
    lvl_1L, attn_bias_11LL = scale_layout(var.patch_nums)
    if not torch.equal(var.lvl_1L.cpu(), lvl_1L) or not torch.equal(
        var.attn_bias_for_masking.float().cpu(), attn_bias_11LL
    ):
        raise CheckpointError(
            f"checkpoint {path}: buffers lvl_1L / attn_bias_for_masking do not match patch_nums {var.patch_nums}"
        )


@torch.no_grad()
def resize_class_embedding(
    var: VAR, num_classes: int, *, init: str = "unconditional", generator: torch.Generator | None = None
) -> VAR:
    """Give ``var`` a new label set of ``num_classes`` classes (K+1 rows, the last one unconditional), in place.

    The unconditional row is kept, so classifier-free guidance starts from the base model's unconditional
    distribution. New class rows are initialised by ``init``:
    - ``"unconditional"`` (default): a copy of the base unconditional row, so every new class starts as the base
      model's unconditional generator and the fine-tuning data alone separates the classes;
    - ``"mean"``: the mean of the base model's class rows;
    - ``"normal"``: N(0, 1/(3C)) as in from-scratch training (``generator`` for reproducibility).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if init not in CLASS_INITS:
        raise ValueError(f"init must be one of {CLASS_INITS}, got {init!r}")
    old_KC = var.class_emb.weight
    new = nn.Embedding(num_classes + 1, var.width, device=old_KC.device, dtype=old_KC.dtype)
    if init == "unconditional":
        new.weight[:num_classes] = old_KC[-1]
    elif init == "mean":
        new.weight[:num_classes] = old_KC[:-1].mean(dim=0)
    else:
        nn.init.trunc_normal_(new.weight, std=(1 / (3 * var.width)) ** 0.5, generator=generator)
    new.weight[num_classes] = old_KC[-1]
    new.weight.requires_grad_(old_KC.requires_grad)
    var.class_emb, var.num_classes = new, num_classes
    return var


@contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock (works across processes and, on NFS with lockd, across nodes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write(
    path: Path, write: Callable[[Path], None], *, name_from_content: Callable[[BinaryIO], Path] | None = None
) -> Path:
    """``write(tmp)`` a file beside ``path``, fsync it, then rename it over ``path``: an interrupted save never
    leaves a half-written file (checkpoints, their sidecars, caches, generated images). ``name_from_content``
    (given the written file, open for reading) names another destination beside it instead, e.g. by the bytes'
    SHA-256. Returns the path written. The one writer of this package: every file is written this way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with the umask's mode (mkstemp's 0600 stayed on the renamed file: other users of a shared storage
    # could not read a result's artifacts).
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
            destination = path if name_from_content is None else name_from_content(handle)
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)
    return destination


def save_state(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``torch.save`` through an open file: given a path, torch names the zip's inner folder after the file,
    so the same weights written to two (temporary, randomly named) files got two SHA-256s, and an adapter
    recorded against a rebuilt, bit-identical base was refused. Through a handle the inner name is fixed."""
    with open(path, "wb") as handle:
        torch.save(state, handle)


def save_tensors(
    path: str | os.PathLike,
    state: Mapping[str, torch.Tensor],
    *,
    kind: str,
    architecture: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
) -> Path:
    """Write a flat tensor dict plus its ``<path>.json`` sidecar (kind, architecture, SHA-256, metadata) as one
    atomic pair: a reader sees the old pair or the new one, never new weights with an old sidecar.

    1. the weights go to a temporary file, then (renamed) to ``staged_path(path, sha)``, named by their SHA-256;
    2. the sidecar naming that SHA-256 replaces the old one: the commit point (before it, readers see the old
       pair; the staged file is ignored);
    3. the staged weights replace ``path``. A reader that finds the new sidecar while the weights are still
       staged (a save stopped between 2 and 3) completes step 3 itself (``_committed_weights``)."""
    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    written: dict[str, str] = {}

    def staged_by_sha(handle: BinaryIO) -> Path:
        written["sha"] = _stream_sha256(handle)
        return staged_path(path, written["sha"])

    staged = atomic_write(path, lambda tmp: save_state(state, tmp), name_from_content=staged_by_sha)
    sha = written["sha"]
    record = {
        "format": SIDECAR_FORMAT,
        "kind": kind,
        "architecture": _normalised(architecture),
        "sha256": sha,
        "weights": path.name,
        "metadata": dict(metadata or {}),
    }
    atomic_write(sidecar_path(path), lambda out: out.write_text(json.dumps(record, indent=1, sort_keys=True)))
    try:
        os.replace(staged, path)
    except FileNotFoundError:  # a reader completed the move already
        pass
    _remove_stale_staged(path)
    return path


def _remove_stale_staged(path: Path) -> None:
    """Staged weights of earlier saves stopped before their commit: no sidecar names them any more."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.staged"):
        stale.unlink(missing_ok=True)


def save_var(
    var: VAR,
    path: str | os.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write ``var``'s state dict in the official layout (loadable by the original code) plus ``<path>.json``
    with the architecture, SHA-256 and ``metadata`` (e.g. the trial config). Atomic. ``state`` overrides the
    module's own state dict (a patched model passes its official-layout state). ``class_names``: a fine-tuned
    model's training classes (label i is class_names[i]), recorded in the metadata: the evaluation command then
    refuses a split of other classes, as it does for an adapter."""
    if class_names is not None:
        entry = class_names_entry(class_names, num_classes=var.architecture["num_classes"])
        metadata = {**dict(metadata or {}), CLASS_NAMES: entry}
    return save_tensors(
        path,
        var.state_dict() if state is None else state,
        kind="var",
        architecture=var.architecture,
        metadata=metadata,
    )


# The record's key for the training split's class names (label i is class_names[i]): in an adapter's sidecar
# metadata, a peft folder's provenance and a fine-tuned VAR checkpoint's sidecar metadata (``save_var``). Records
# saved before it was recorded have none.
CLASS_NAMES = "class_names"


def class_names_entry(class_names: Sequence[str] | None, *, num_classes: int) -> list[str] | None:
    """``class_names`` as a record holds them, after checking they name the model's classes."""
    if class_names is None:
        return None
    names = list(class_names)
    if len(names) != num_classes or not all(isinstance(name, str) for name in names):
        raise ValueError(
            f"class_names: expected the {num_classes} class names of the training split (label i is "
            f"class_names[i]), got {len(names)}: {names[:5]}"
        )
    return names


def recorded_class_names(
    path: str | os.PathLike, record: Mapping[str, Any], *, num_classes: int, what: str = "adapter"
) -> tuple[str, ...] | None:
    """The training class names ``record`` holds (an adapter's or a VAR checkpoint's metadata; ``what`` names the
    file in the error), None where it holds none; ``CheckpointError`` for names that are not one string per
    class."""
    names = record.get(CLASS_NAMES)
    if names is None:
        return None
    if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(n, str) for n in names):
        raise CheckpointError(
            f"{what} {path}: its {CLASS_NAMES} are not {num_classes} names, one per class of its model "
            "(edited by hand or damaged)"
        )
    return tuple(names)


def save_vqvae(vqvae: VQVAE, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> Path:
    return save_tensors(
        path, vqvae.state_dict(), kind="vqvae", architecture=vqvae.architecture, metadata=metadata
    )
