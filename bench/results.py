"""One JSON result per trial under ``<storage>/results/<trial_id>.json``, on a local or shared path or any URI
pyarrow understands (s3://, gs://, ...). Written atomically: a local file is renamed into place, an object store
publishes an object only when its upload completes. No torch, no Ray.

A storage that cannot be used raises ``StorageError`` naming it and why, when the store is opened (a writable
store is probed with a small file, so a read-only or unreachable storage fails before any trial starts). A file
that is not a valid result of its trial (unreadable, not JSON, another schema version, a config that does not
match its id) is ``invalid``: never counted as done, so the trial runs again."""
from __future__ import annotations

import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
from pyarrow import fs as pafs

from .cli import probe_folder
from .errors import VarsweepError
from .schema import STATUSES, ConfigError, absolute, check_result, is_uri

# What pyarrow raises for a URI it cannot parse or a filesystem it cannot reach (ArrowInvalid is a ValueError,
# ArrowNotImplementedError a NotImplementedError, I/O failures OSError).
_PYARROW_ERRORS = (pa.ArrowException, ValueError, NotImplementedError, OSError)


def default_cache_dir(storage: str) -> str:
    """``VARSWEEP_CACHE``, else ``STORAGE/cache`` for a local storage, else ``~/.cache/varsweep`` (absolute)."""
    chosen = os.environ.get("VARSWEEP_CACHE") or (str(Path(storage) / "cache") if not is_uri(storage) else str(Path.home() / ".cache" / "varsweep"))
    return absolute(chosen)


class StorageError(VarsweepError):
    """A storage path or URI that cannot be opened, read or written; the message names it and the problem."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def open_storage(storage: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path inside it) of a local path (made absolute, ``~`` expanded) or a URI; a URI pyarrow
    cannot parse, of an unknown scheme or naming no bucket raises ``StorageError``."""
    if not is_uri(storage):
        return pafs.LocalFileSystem(), str(Path(storage).expanduser().resolve())
    scheme = storage.split("://", 1)[0]
    try:
        filesystem, root = pafs.FileSystem.from_uri(storage)
    except _PYARROW_ERRORS as err:
        raise StorageError(f"storage URI {storage!r} (scheme {scheme!r}) cannot be opened: {_first_line(err)}") from err
    if not root.strip("/"):
        raise StorageError(f"storage URI {storage!r} names no bucket or folder (e.g. {scheme}://bucket/runs)")
    return filesystem, root.rstrip("/")


class ResultStore:
    """``create=False`` opens a store read-only: nothing is created (``bench status``, dry runs, analysis);
    ``create=True`` creates the results folder and probes that a file can be written there."""

    def __init__(self, storage: str | os.PathLike, *, create: bool = True):
        storage = str(storage)
        self.fs, root = open_storage(storage)
        self.storage, self.root, self.folder = storage, root, f"{root}/results"
        if create:
            self._create()

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def _create(self) -> None:
        """Create the results folder and write (then delete) a probe file in it: a storage that is a file, lies
        under a file, is read-only or refuses our credentials fails here, naming itself."""
        if self.local:
            root = Path(self.root)
            if root.exists() and not root.is_dir():
                raise StorageError(f"storage {self.storage} is a file, not a folder")
            try:
                probe_folder(self.folder)
            except OSError as err:
                where = f" ({err.filename})" if err.filename and str(err.filename) not in (self.storage, self.root) else ""
                raise StorageError(f"storage {self.storage} is not writable: {err.strerror or _first_line(err)}{where}") from err
            return
        probe = f"{self.folder}/.write-probe-{uuid.uuid4().hex}"
        try:
            self.fs.create_dir(self.folder, recursive=True)
            with self.fs.open_output_stream(probe) as out:
                out.write(b"probe")
            self.fs.delete_file(probe)
        except _PYARROW_ERRORS as err:
            raise StorageError(f"storage {self.storage} is not writable: {_first_line(err)}") from err

    def exists(self) -> bool:
        """Whether the storage folder itself exists."""
        return self._type(self.root) == pafs.FileType.Directory

    def require_folder(self) -> None:
        """Raise ``StorageError`` unless the storage folder exists (a missing storage, or a file given as one)."""
        kind = self._type(self.root)
        if kind == pafs.FileType.NotFound:
            raise StorageError(f"no storage folder at {self.storage}: nothing has run there (give --storage of the sweep)")
        if kind != pafs.FileType.Directory:
            raise StorageError(f"storage {self.storage} is a file, not a storage folder (give --storage of the sweep)")

    def _type(self, path: str):
        try:
            return self.fs.get_file_info(path).type
        except _PYARROW_ERRORS as err:
            raise StorageError(f"cannot read storage {self.storage}: {_first_line(err)}") from err

    def path(self, trial_id: str) -> str:
        return f"{self.folder}/{trial_id}.json"

    def write(self, record: Mapping[str, Any]) -> str:
        """Validate and write ``record`` (replacing an earlier one of the same trial). An invalid record raises
        ``ConfigError`` naming the field, a storage that refuses the file ``StorageError``; nothing is written."""
        validate_record(record)
        try:
            text = json.dumps(record, indent=1, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"result of trial {record['trial_id']} is not JSON-serialisable: {err}") from err
        path = self.path(record["trial_id"])
        try:
            self._write_text(path, text)
        except _PYARROW_ERRORS as err:
            raise StorageError(f"cannot write result {path}: {_first_line(err)}") from err
        return path

    def _write_text(self, path: str, text: str) -> None:
        if self.local:
            handle, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
            try:
                with os.fdopen(handle, "w") as out:
                    out.write(text)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
        else:
            with self.fs.open_output_stream(path) as out:
                out.write(text.encode())

    def read(self, trial_id: str) -> dict | None:
        """The parsed file of ``trial_id`` (not validated; see ``state``), None when there is none."""
        try:
            with self.fs.open_input_stream(self.path(trial_id)) as handle:
                return json.loads(handle.read().decode())
        except FileNotFoundError:
            return None

    def status(self, trial_id: str) -> str | None:
        """"success" or "failed" for a valid result of this trial; None when there is none or the file is invalid
        (see ``state``), so the trial runs again and its new result replaces the file."""
        state, _ = self.state(trial_id)
        return state if state in STATUSES else None

    def state(self, trial_id: str) -> tuple[str, str]:
        """("pending" | "success" | "failed" | "invalid", detail): a failed trial's first error line, or why a
        file is not a valid result of this trial (unreadable, not JSON, not an object, another schema version,
        a config not matching its id, another trial's result)."""
        try:
            record = self.read(trial_id)
        except (ValueError, OSError, pa.ArrowException) as err:  # JSON and UTF-8 errors are ValueErrors
            return "invalid", f"{'not JSON' if isinstance(err, ValueError) else 'cannot be read'} ({_first_line(err)})"
        if record is None:
            return "pending", ""
        try:
            validate_record(record, trial_id=trial_id)
        except ConfigError as err:
            return "invalid", _first_line(err)
        if record["status"] == "failed":
            return "failed", _first_line(record["error"]) if record["error"].strip() else ""
        return record["status"], ""

    def files(self) -> list[str]:
        """Paths of every ``*.json`` in the results folder (valid results or not), sorted."""
        selector = pafs.FileSelector(self.folder, allow_not_found=True)
        try:
            infos = self.fs.get_file_info(selector)
        except _PYARROW_ERRORS as err:
            raise StorageError(f"cannot list the results in {self.folder}: {_first_line(err)}") from err
        return sorted(info.path for info in infos if info.path.endswith(".json"))

    def read_text(self, path: str) -> str:
        with self.fs.open_input_stream(path) as handle:
            return handle.read().decode()

    def all(self) -> list[dict]:
        """Every valid result in the folder (invalid files are left out; ``state`` says why)."""
        ids = [Path(path).stem for path in self.files()]
        return [self.read(i) for i in ids if self.state(i)[0] in STATUSES]


def validate_record(record: Any, *, trial_id: str | None = None) -> None:
    """Raise ``ConfigError`` naming the problem unless ``record`` is a valid result (of ``trial_id`` when given)."""
    if not isinstance(record, Mapping):
        raise ConfigError(f"a result must be a JSON object, got {type(record).__name__}")
    try:
        check_result(record)
    except ConfigError:
        raise
    except (TypeError, KeyError, AttributeError, ValueError) as err:  # a config of the wrong shape inside the record
        raise ConfigError(f"result of trial {record.get('trial_id')!r}: config: {type(err).__name__}: {_first_line(err)}") from err
    if trial_id is not None and record["trial_id"] != trial_id:
        raise ConfigError(f"trial_id: the file of trial {trial_id} holds the result of trial {record['trial_id']}")
