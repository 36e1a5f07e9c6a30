"""One JSON result per trial under ``<storage>/results/<trial_id>.json``, on a local or shared path or any URI
pyarrow understands (s3://, gs://, ...). Written atomically: a local file is renamed into place, an object store
publishes an object only when its upload completes. No torch, no Ray.

A trial's artifacts (adapter, generated and real sample images) live beside the results, under
``<storage>/artifacts/<trial_id>/``, and are complete before its result is written (``publish``): on a local or
shared path the trial writes them in place; on a URI storage (every URI, file:// included) it writes them into a
node-local staging folder under the cache that is uploaded, replacing an earlier attempt's upload, then removed.
The cache therefore holds nothing of a trial's own: clearing it loses no result or artifact.

A storage that cannot be used raises ``StorageError`` naming it and why, when the store is opened (a writable
store is probed with a small file, so a read-only or unreachable storage fails before any trial starts). A file
that is not a valid result of its trial (unreadable, not JSON, another schema version, a config that does not
match its id) is ``invalid``: never counted as done, so the trial runs again."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from pyarrow import fs as pafs

from .cli import probe_folder
from .errors import VarsweepError
from .schema import (
    SCHEMA_VERSION,
    STATUSES,
    ConfigError,
    absolute,
    check_result,
    is_newer_version,
    is_older_version,
    is_uri,
    newer_version_note,
    upgrade_record,
)

# What pyarrow raises for a URI it cannot parse or a filesystem it cannot reach (ArrowInvalid is a ValueError,
# ArrowNotImplementedError a NotImplementedError, I/O failures OSError).
_PYARROW_ERRORS = (pa.ArrowException, ValueError, NotImplementedError, OSError)
# What an older record that cannot be upgraded raises (bad fields, wrong types, a value a check refuses).
_UPGRADE_ERRORS = (ConfigError, TypeError, KeyError, AttributeError, ValueError)
ARTIFACTS_FOLDER = "artifacts"  # <storage>/artifacts/<trial_id>/: a trial's adapter and sample images
TRAIN_FOLDER = "train"  # <storage>/train/trial-<trial_id>/: a trial's Ray Train run (its checkpoints)
STAGING_FOLDER = "staging"  # <cache_dir>/staging/<storage key>/<trial_id>/: a trial's artifacts before their upload to a URI storage


def default_cache_dir(storage: str) -> str:
    """``VARSWEEP_CACHE``, else ``STORAGE/cache`` for a local storage, else ``~/.cache/varsweep`` (absolute)."""
    chosen = os.environ.get("VARSWEEP_CACHE") or (
        str(Path(storage) / "cache") if not is_uri(storage) else str(Path.home() / ".cache" / "varsweep")
    )
    return absolute(chosen)


class StorageError(VarsweepError):
    """A storage path or URI that cannot be opened, read or written; the message names it and the problem."""


class ClaimedError(StorageError):
    """Trials of a sweep that another running sweep on the same storage is training; the message names them."""


STALE_TEMPORARY_S = 3600.0  # a result's temporary file lives for one write: older ones are a killed write's
CLAIMS_LOCK = ".claims.lock"  # in results/: hidden, so no result listing sees it
CLAIMS_FOLDER = "claims"  # <storage>/claims/<trial_id>.json: the trials a running sweep's driver holds
CLAIM_REFRESH_S = 60.0  # how often a driver rewrites its claims' heartbeat while its trials run
CLAIM_STALE_S = (
    300.0  # a claim not refreshed for this long is its driver's, gone (on the claim's own machine: at once)
)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# pyarrow's Google Cloud Storage client retries a bucket it cannot reach (no network, no credentials) for minutes,
# silent, before the first error, each call of a store's several: a launch or `bench status` looked hung. A store
# first asks for its folder once with retries bounded to GCS_PROBE_RETRY_LIMIT_S (about twice that in all), then
# works with GCS_RETRY_LIMIT_S, so a trial's write mid-sweep still rides out a minute's outage. A URI that sets its
# own ``retry_limit_seconds`` keeps it.
GCS_PROBE_RETRY_LIMIT_S = 10
GCS_RETRY_LIMIT_S = 60


def _bounded_retries(uri: str, *, limit_s: float) -> str:
    """``uri`` with ``retry_limit_seconds`` added to a ``gs://`` or ``gcs://`` URI's query where it has none."""
    split = urllib.parse.urlsplit(uri)
    if split.scheme.lower() not in ("gs", "gcs") or "retry_limit_seconds" in urllib.parse.parse_qs(
        split.query
    ):
        return uri
    bounded = "&".join(filter(None, [split.query, f"retry_limit_seconds={limit_s:g}"]))
    return urllib.parse.urlunsplit(split._replace(query=bounded))


def open_storage(storage: str, *, retry_limit_s: float = GCS_RETRY_LIMIT_S) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path inside it) of a local path (made absolute, ``~`` expanded) or a URI; a URI pyarrow
    cannot parse, of an unknown scheme or naming no bucket raises ``StorageError``. ``retry_limit_s`` bounds a
    Google Cloud Storage client's retries of one call (seconds)."""
    if not is_uri(storage):
        return pafs.LocalFileSystem(), str(Path(storage).expanduser().resolve())
    scheme = storage.split("://", 1)[0]
    try:
        filesystem, root = pafs.FileSystem.from_uri(_bounded_retries(storage, limit_s=retry_limit_s))
    except _PYARROW_ERRORS as err:
        raise StorageError(
            f"storage URI {storage!r} (scheme {scheme!r}) cannot be opened: {_first_line(err)}"
        ) from err
    if not root.strip("/"):
        raise StorageError(f"storage URI {storage!r} names no bucket or folder (e.g. {scheme}://bucket/runs)")
    return filesystem, root.rstrip("/")


class ResultStore:
    """``create=False`` opens a store read-only: nothing is created (``bench status``, dry runs, analysis);
    ``create=True`` creates the results folder and probes that a file can be written there. ``reach=False`` skips
    the quick reachability probe of a URI storage (a trial's workers: the driver probed it)."""

    def __init__(self, storage: str | os.PathLike, *, create: bool = True, reach: bool = True):
        storage = str(storage)
        if not storage.strip():  # "" would be the working folder: a script's unset variable, not a choice
            raise StorageError("storage: an empty path (an unset variable?); give a folder or a URI")
        self.fs, root = open_storage(storage)
        self.storage, self.root, self.folder = storage, root, f"{root}/results"
        if reach and not self.local:
            self._reach()
        if create:
            self._create()

    def _reach(self) -> None:
        """Ask for the storage folder once, with few retries: a bucket that cannot be reached (no network, no
        credentials, a wrong name) is named within seconds, before the store's calls retry it for minutes."""
        filesystem, _ = open_storage(self.storage, retry_limit_s=GCS_PROBE_RETRY_LIMIT_S)
        try:
            filesystem.get_file_info(self.root)
        except _PYARROW_ERRORS as err:
            raise StorageError(
                f"cannot reach storage {self.storage}: {_first_line(err)} (check the bucket's name, this machine's "
                "credentials for it and its network)"
            ) from err

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
                where = (
                    f" ({err.filename})"
                    if err.filename and str(err.filename) not in (self.storage, self.root)
                    else ""
                )
                raise StorageError(
                    f"storage {self.storage} is not writable: {err.strerror or _first_line(err)}{where}"
                ) from err
            self._remove_stale_temporaries()
            return
        probe = f"{self.folder}/.write-probe-{uuid.uuid4().hex}"
        try:
            self.fs.create_dir(self.folder, recursive=True)
            with self.fs.open_output_stream(probe) as out:
                out.write(b"probe")
            self.fs.delete_file(probe)
        except _PYARROW_ERRORS as err:
            raise StorageError(f"storage {self.storage} is not writable: {_first_line(err)}") from err

    def _remove_stale_temporaries(self) -> None:
        """Delete the temporary files of result writes killed before their rename (``_write_text``), which stayed
        forever; only those over ``STALE_TEMPORARY_S`` old, so a write under way in another process keeps its own."""
        now = time.time()
        for tmp in Path(self.folder).glob(".tmp-*"):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > STALE_TEMPORARY_S:
                    tmp.unlink()

    def exists(self) -> bool:
        """Whether the storage folder itself exists."""
        return self._type(self.root) == pafs.FileType.Directory

    def require_folder(self) -> None:
        """Raise ``StorageError`` unless the storage folder exists (a missing storage, or a file given as one)."""
        kind = self._type(self.root)
        if kind == pafs.FileType.NotFound:
            raise StorageError(
                f"no storage folder at {self.storage}: nothing has run there (give the storage the sweep wrote)"
            )
        if kind != pafs.FileType.Directory:
            raise StorageError(
                f"storage {self.storage} is a file, not a storage folder (give the storage the sweep wrote)"
            )

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
            raise ConfigError(
                f"result of trial {record['trial_id']} is not JSON-serialisable: {err}"
            ) from err
        path = self.path(record["trial_id"])
        try:
            self._write_text(path, text)
        except _PYARROW_ERRORS as err:
            raise StorageError(f"cannot write result {path}: {_first_line(err)}") from err
        return path

    def _write_text(self, path: str, text: str) -> None:
        if self.local:
            # Created with the umask's mode: mkstemp's 0600 stayed on the result, unreadable to other users of a
            # shared storage (their status and analysis read it as invalid).
            tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}")
            handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
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
        """The parsed file of ``trial_id`` (not validated; see ``state``), None when there is none (or it holds
        JSON's ``null``, which ``state`` calls invalid)."""
        try:
            return json.loads(self.read_text(self.path(trial_id)))
        except FileNotFoundError:
            return None

    def status(self, trial_id: str) -> str | None:
        """ "success" or "failed" for a valid result of this trial; None when there is none or the file is invalid
        (see ``state``), so the trial runs again and its new result replaces the file."""
        state, _ = self.state(trial_id)
        return state if state in STATUSES else None

    def state(self, trial_id: str) -> tuple[str, str]:
        """("pending" | "success" | "failed" | "invalid" | "newer", detail): a failed trial's first error line, or
        why a file is not a valid result of this trial (unreadable, not JSON, not an object, an older schema
        version, a config not matching its id, another trial's result); "newer": a result a later varsweep wrote,
        which this one neither reads nor replaces."""
        try:
            record = json.loads(self.read_text(self.path(trial_id)))
        except FileNotFoundError:
            return "pending", ""
        except (ValueError, OSError, pa.ArrowException) as err:  # JSON and UTF-8 errors are ValueErrors
            return (
                "invalid",
                f"{'not JSON' if isinstance(err, ValueError) else 'cannot be read'} ({_first_line(err)})",
            )
        if not isinstance(record, Mapping):  # e.g. ``null``: a file, not a missing result
            return "invalid", f"not a JSON object but {json.dumps(record)[:40]}"
        version = _schema_version(record)
        if is_newer_version(version):
            return "newer", newer_version_note(record)
        if is_older_version(version):
            return (
                "invalid",
                f"schema version {version}: run `python -m bench upgrade-results {self.storage}` (rewrites it as a version-{SCHEMA_VERSION} result)",
            )
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
        return sorted(
            info.path
            for info in infos
            if info.path.endswith(".json")
            and not info.base_name.startswith(".")
            and info.type == pafs.FileType.File
        )  # a folder so named is no result, nor a hidden file (an analysis's manifest, an editor's copy)

    def read_text(self, path: str) -> str:
        with self.fs.open_input_stream(path) as handle:
            return handle.read().decode()

    def all(self) -> list[dict]:
        """Every valid result in the folder (invalid files are left out; ``state`` says why)."""
        ids = [Path(path).stem for path in self.files()]
        return [self.read(i) for i in ids if self.state(i)[0] in STATUSES]

    # --- artifacts -------------------------------------------------------------------------------------------
    @property
    def remote(self) -> bool:
        """Whether the storage is a URI: a trial's artifacts are then staged on its node and uploaded."""
        return is_uri(self.storage)

    @property
    def key(self) -> str:
        """A short name of this storage for local folders kept per storage (16 hex digits of its URI's SHA-256)."""
        return hashlib.sha256(self.storage.encode()).hexdigest()[:16]

    def artifacts_folder(self, trial_id: str) -> str:
        """``<storage>/artifacts/<trial_id>`` as a path of this store's filesystem."""
        return f"{self.root}/{ARTIFACTS_FOLDER}/{trial_id}"

    def artifacts_dir(self, trial_id: str, *, cache_dir: str | os.PathLike, fresh: bool = False) -> Path:
        """The local folder a trial writes its artifacts into: the artifacts folder itself on a local storage, else
        ``<cache_dir>/staging/<storage key>/<trial_id>`` (uploaded by ``publish``; keyed by the storage too, since
        every URI storage shares the default cache: two sweeps into two buckets emptied and uploaded each other's
        folder). ``fresh`` (rank 0, at the start of an attempt) empties and creates it, so nothing of an earlier
        attempt is mixed into this one's."""
        folder = (
            Path(cache_dir) / STAGING_FOLDER / self.key / trial_id
            if self.remote
            else Path(self.artifacts_folder(trial_id))
        )
        if fresh:
            try:
                if folder.exists():
                    shutil.rmtree(folder)
                folder.mkdir(parents=True)
            except OSError as err:
                raise StorageError(
                    f"cannot prepare the artifacts folder {folder} of trial {trial_id}: {err.strerror or err}"
                ) from err
        return folder

    def upload_artifacts(self, trial_id: str, folder: str | os.PathLike) -> str:
        """Copy every file under the local ``folder`` to ``<storage>/artifacts/<trial_id>/`` (same relative paths),
        first deleting what an earlier attempt uploaded there; returns the destination. ``StorageError`` names it."""
        destination = self.artifacts_folder(trial_id)
        try:
            if self.fs.get_file_info(destination).type != pafs.FileType.NotFound:
                self.fs.delete_dir(destination)
            self.fs.create_dir(destination, recursive=True)
            pafs.copy_files(
                str(Path(folder).resolve()),
                destination,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.fs,
            )
        except _PYARROW_ERRORS as err:
            raise StorageError(
                f"cannot upload the artifacts of trial {trial_id} to {destination}: {_first_line(err)}"
            ) from err
        return destination

    def publish(self, record: Mapping[str, Any], *, artifacts_dir: str | os.PathLike) -> str:
        """Write a trial's result once its artifacts are in place: on a URI storage ``artifacts_dir`` (the staging
        folder) is uploaded first and removed after, so a result's existence implies complete artifacts. An invalid
        record raises ``ConfigError`` before anything is uploaded. Returns the result's path."""
        validate_record(record)
        if self.remote:
            self.upload_artifacts(record["trial_id"], artifacts_dir)
        path = self.write(record)
        if self.remote:
            shutil.rmtree(artifacts_dir, ignore_errors=True)  # the cache keeps nothing of a trial's own
            try:  # nor the storage's folder once its last staged trial is gone
                Path(artifacts_dir).parent.rmdir()
            except OSError:  # other trials of this storage are staging
                pass
        return path

    # --- claims: one running sweep per trial ------------------------------------------------------------------
    @contextlib.contextmanager
    def claimed(
        self,
        trial_ids: list[str],
        *,
        sweep: str,
        labels: Mapping[str, str] | None = None,
        refresh_s: float = CLAIM_REFRESH_S,
    ):
        """Hold ``trial_ids`` for this driver while the block runs: two sweeps sharing trials on one storage (Table
        2's and 3's k = 32 cells) trained them at once, each resuming the other's checkpoints, emptying its
        artifacts and deleting its run, and a DP trial's steps ran twice with fresh noise while its ledger counted
        them once. ``ClaimedError`` (nothing claimed) names the trials another live sweep holds. A background
        thread rewrites the claims' heartbeat every ``refresh_s`` and releases those of trials that succeeded; the
        rest are deleted when the block ends. A claim is
        live while its heartbeat is under ``CLAIM_STALE_S`` old and, on this machine, its process exists.
        ``labels``: trial id -> label, for the message. Two drivers starting in the same second on a storage without
        atomic creation (an object store) can still both claim a trial; on a local or NFS storage the check and the
        writing of the claims hold a lock (``_claims_lock``), so one gets them and the other is refused."""
        owner = {"sweep": sweep, "host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex}
        with self._claims_lock():
            held = [(t, c) for t in trial_ids if (c := self._live_claim(t)) is not None]
            if held:
                raise ClaimedError(_claimed_message(held, folder=self.root, labels=labels or {}))
            self._write_claims(trial_ids, owner)
        stop = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat, args=(trial_ids, owner, stop, refresh_s), name="claims", daemon=True
        )
        heartbeat.start()
        try:
            yield
        finally:
            stop.set()
            heartbeat.join()
            self._release_claims(trial_ids, owner)

    @contextlib.contextmanager
    def _claims_lock(self):
        """An exclusive ``flock`` on ``results/.claims.lock`` of a local storage while the block runs: two drivers
        started together both found no claim, then both wrote theirs (measured: 10 of 10 simultaneous starts). NFS
        emulates flock with byte-range locks, which need the file open for writing. It stays: a lock file deleted
        while another driver waits on it would let a third lock a new one. Nothing on an object store."""
        if not self.local:
            yield
            return
        path = f"{self.folder}/{CLAIMS_LOCK}"
        handle = _open_lock(path)
        try:
            if handle is not None and not _locked(handle, path=path):
                os.close(handle)
                handle = None
            yield
        finally:
            if handle is not None:
                os.close(handle)  # releases the lock

    def claim_path(self, trial_id: str) -> str:
        return f"{self.root}/{CLAIMS_FOLDER}/{trial_id}.json"

    def read_claim(self, trial_id: str) -> dict | None:
        """The claim on ``trial_id``, None when there is none (or it cannot be read: a half-written one)."""
        try:
            claim = json.loads(self.read_text(self.claim_path(trial_id)))
        except (ValueError, OSError, pa.ArrowException):
            return None
        return claim if isinstance(claim, dict) else None

    def _live_claim(self, trial_id: str) -> dict | None:
        claim = self.read_claim(trial_id)
        return claim if claim is not None and claim_is_live(claim, now=time.time()) else None

    def _write_claims(self, trial_ids: list[str], owner: dict) -> None:
        try:
            self.fs.create_dir(f"{self.root}/{CLAIMS_FOLDER}", recursive=True)
            for trial_id in trial_ids:
                claim = {**owner, "trial_id": trial_id, "heartbeat": time.time()}
                self._write_text(self.claim_path(trial_id), json.dumps(claim))
        except (*_PYARROW_ERRORS, OSError) as err:
            raise StorageError(
                f"cannot write the claims in {self.root}/{CLAIMS_FOLDER}: {_first_line(err)}"
            ) from err

    def _heartbeat(self, trial_ids: list[str], owner: dict, stop: threading.Event, refresh_s: float) -> None:
        """Every ``refresh_s``: release the claims of trials whose success is written (another sweep may then
        skip them, not wait), and rewrite the rest's heartbeat."""
        held = list(trial_ids)
        while not stop.wait(refresh_s):
            finished = [t for t in held if self.status(t) == "success"]
            self._release_claims(finished, owner)
            held = [t for t in held if t not in finished]
            # A storage hiccup is only warned of: the next beat tries again (a claim is stale after minutes).
            try:
                self._write_claims(held, owner)
            except StorageError as err:
                print(f"warning: {err}", file=sys.stderr)

    def _release_claims(self, trial_ids: list[str], owner: dict) -> None:
        for trial_id in trial_ids:
            claim = self.read_claim(trial_id)
            if claim is not None and claim.get("token") == owner["token"]:  # not one a later sweep took over
                try:
                    self.fs.delete_file(self.claim_path(trial_id))
                except (*_PYARROW_ERRORS, OSError):
                    pass  # left behind: stale once its heartbeat is old, at once on this machine
        if self.local:  # the folder too, once no sweep holds a claim (an object store has no empty folders)
            with contextlib.suppress(OSError):
                os.rmdir(f"{self.root}/{CLAIMS_FOLDER}")

    # --- schema upgrades -------------------------------------------------------------------------------------
    def upgrade_file(
        self, path: str, *, dry_run: bool = False, planned: dict[str, dict] | None = None
    ) -> tuple[str, str]:
        """Rewrite one result file of an older schema version as its current-version file (``upgrade_record``):
        the new file (named by the new trial id; the same file, replaced atomically, where the id is unchanged) is
        written first, then the old one deleted, so an interrupted upgrade leaves both and a rerun finishes it.
        Returns (outcome, one line for a person); outcome is "upgraded" (or "would upgrade" with ``dry_run``,
        nothing written), "current" or "left" (left alone, with the reason: unreadable, invalid, or its new trial
        already holds another result). ``planned``: with ``dry_run``, the records the files before this one would
        have written, by trial id (filled here), so a dry run says what the run will do with two old files that
        become one trial."""
        name = Path(path).name
        try:
            record = json.loads(self.read_text(path))
        except (ValueError, OSError, pa.ArrowException) as err:
            return (
                "left",
                f"{name}: left alone: {'not JSON' if isinstance(err, ValueError) else 'cannot be read'} ({_first_line(err)})",
            )
        if not isinstance(record, Mapping):
            return "left", f"{name}: left alone: not a JSON object but {json.dumps(record)[:40]}"
        version = _schema_version(record)
        if version == SCHEMA_VERSION and type(version) is int:
            return "current", f"{name}: schema version {SCHEMA_VERSION} already, nothing to do"
        try:
            upgraded, note, copies = self._upgraded(record)
        except _UPGRADE_ERRORS as err:
            return "left", f"{name}: left alone: {_first_line(err)}"
        new_path = self.path(upgraded["trial_id"])
        # A trial whose id the upgrade leaves unchanged (no changed field in its config) is rewritten in place.
        in_place = Path(new_path).name == name
        kept, replaced = ("", "") if in_place else self._other_result(new_path, upgraded, planned=planned)
        if kept:
            return "left", (
                f"{name}: left alone: trial {upgraded['trial_id']} already has {kept} in {new_path}; "
                f"delete {name} if it is not needed, or {Path(new_path).name} to keep this one in its place "
                "(then run upgrade-results again)"
            )
        action = f"version {version} -> {SCHEMA_VERSION}, trial {record.get('trial_id')} -> {upgraded['trial_id']} ({Path(new_path).name})"
        note += replaced + ("" if in_place else self._stale_checkpoints(record.get("trial_id")))
        if dry_run:
            if planned is not None:
                planned[upgraded["trial_id"]] = upgraded
            return "would upgrade", f"{name}: would upgrade: {action}{note}"
        for source, relative in copies:  # before the result that names them
            destination = f"{self.root}/{relative}"
            try:
                self.fs.create_dir(
                    destination.rsplit("/", 1)[0], recursive=True
                )  # a single file's copy makes no folders
                pafs.copy_files(
                    source,
                    destination,
                    source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=self.fs,
                )
            except _PYARROW_ERRORS as err:
                raise StorageError(f"cannot copy {source} to {destination}: {_first_line(err)}") from err
        self.write(upgraded)
        if not in_place:
            try:
                self.fs.delete_file(path)
            except _PYARROW_ERRORS as err:
                raise StorageError(
                    f"wrote {new_path} but cannot delete {path}: {_first_line(err)} (delete it by hand)"
                ) from err
        return "upgraded", f"{name}: upgraded: {action}{note}"

    def _upgraded(self, record: Any) -> tuple[dict, str, list[tuple[str, str]]]:
        """(the current-version result, the artifacts note, the artifact copies) of an older ``record``; raises one
        of ``_UPGRADE_ERRORS`` where it cannot be upgraded (the file is then left alone)."""
        upgraded = upgrade_record(record)
        note, copies = self._old_artifacts(upgraded)
        validate_record(upgraded)
        return upgraded, note, copies

    @staticmethod
    def _old_artifacts(record: dict) -> tuple[str, list[tuple[str, str]]]:
        """Rewrite an upgraded record's artifacts section in the storage layout; returns (a note for the summary
        line, the (local source, path relative to the storage root) copies that put the files there). Older
        records name the files by absolute paths on the machine that ran the trial (its cache's work/<trial_id>/
        folder, the dataset's own images): they are copied, not moved, to ``<storage>/artifacts/<new trial id>/``.
        When the generated images are not on this machine the section is left out. The adapter's sidecar keeps
        the trial id it was trained under."""
        section = record.get("artifacts")
        if not isinstance(section, dict) or "folder" in section or not section:
            return "", []
        generated = section.get("generated_images")
        if not isinstance(generated, str) or not Path(generated).is_dir():
            del record["artifacts"]
            return f"; its generated images ({generated}) are not on this machine: artifacts left out", []
        folder = f"{ARTIFACTS_FOLDER}/{record['trial_id']}"
        copies = [(generated, f"{folder}/images")]
        adapter = Path(generated).parent / "adapter.pt"
        if adapter.is_file():
            copies += [(str(adapter), f"{folder}/adapter.pt")]
            copies += (
                [(f"{adapter}.json", f"{folder}/adapter.pt.json")]
                if Path(f"{adapter}.json").is_file()
                else []
            )
        real = []
        for entry in section.get("real_images") or []:
            found = [
                path for path in entry.get("paths", []) if isinstance(path, str) and Path(path).is_file()
            ]
            stored = [
                f"{folder}/real/class_{entry['label']}/{n}{Path(path).suffix}" for n, path in enumerate(found)
            ]
            copies += list(zip(found, stored))
            real.append(
                {"label": entry["label"], "class": entry.get("class", str(entry["label"])), "paths": stored}
            )
        record["artifacts"] = {
            "folder": folder,
            "adapter": f"{folder}/adapter.pt" if adapter.is_file() else None,
            "generated_images": f"{folder}/images",
            "real_images": real,
        }
        return f"; {len(copies)} artifact file(s) and folder(s) copied to {folder}/", copies

    def _stale_checkpoints(self, old_id: Any) -> str:
        """A note naming the training run folder of ``old_id`` when there is one: a trial run again under its new
        id starts afresh, so those checkpoints (of a failed run; a finished DP run's are deleted) are not used."""
        folder = f"{self.root}/{TRAIN_FOLDER}/trial-{old_id}"
        if not isinstance(old_id, str) or self._type(folder) != pafs.FileType.Directory:
            return ""
        return f"; its checkpoints under the old id, {folder}, are no longer used: delete that folder"

    def older_results(self, *, skip: Collection[str] = ()) -> dict[str, str]:
        """{path: the trial id it upgrades to ("" when it cannot be upgraded)} of every result file of an older
        schema version (``python -m bench upgrade-results`` rewrites them); unreadable files are not listed, nor
        the files of the trial ids in ``skip`` (ones known to hold a current result)."""
        found = {}
        for path in self.files():
            if Path(path).stem in skip:
                continue
            try:
                record = json.loads(self.read_text(path))
            except (ValueError, OSError, pa.ArrowException):
                continue
            version = _schema_version(record)
            if isinstance(version, int) and not isinstance(version, bool) and version < SCHEMA_VERSION:
                try:
                    found[path] = self._upgraded(record)[0]["trial_id"]
                except _UPGRADE_ERRORS:
                    found[path] = ""
        return found

    def upgrades_due(self, older: Mapping[str, str]) -> dict[str, str]:
        """{trial id: path} of the ``older`` results (``older_results``) that ``upgrade-results`` would rewrite as
        that trial's result: its file is missing or is the older result itself (an upgrade that keeps the id). A trial that already holds a
        current result (a newer run, an interrupted upgrade's copy) is not listed: the upgrade leaves the older
        file alone there."""
        due = {}
        for path, new_id in older.items():
            own_file = Path(path).name == Path(self.path(new_id)).name
            if new_id and (own_file or self.state(new_id)[0] == "pending"):
                due[new_id] = path
        return due

    def _other_result(
        self, path: str, upgraded: Mapping[str, Any], *, planned: dict[str, dict] | None = None
    ) -> tuple[str, str]:
        """(what ``path`` holds when it is a result ``upgraded`` may not replace, else "": nothing, the same (an
        earlier, interrupted upgrade of this file), or a failed result and ``upgraded`` a successful one; a note
        naming the failed result replaced). ``planned``: a dry run's records, which stand for the files."""
        try:
            existing = (planned or {}).get(upgraded["trial_id"]) or json.loads(self.read_text(path))
        except FileNotFoundError:
            return "", ""
        except (ValueError, OSError, pa.ArrowException):
            return "an unreadable file", ""
        if existing == json.loads(json.dumps(upgraded)):
            return "", ""
        version = _schema_version(existing)
        status = existing.get("status") if isinstance(existing, Mapping) else None
        current = (
            version == SCHEMA_VERSION and type(version) is int
        )  # a newer varsweep's is neither read nor replaced
        if current and status == "failed" and upgraded.get("status") == "success":
            # A relaunch would rerun the failed trial and replace its result: the success, a run of the same
            # experiment, takes its place now, whichever of two old files that became one trial comes first.
            error = str(existing.get("error") or "").strip().splitlines() or ["no error recorded"]
            return "", f"; replaces its failed result ({error[0]})"
        return f"a schema version {version} result ({status})", ""


# Errors of a file system that keeps no locks (NFSv3 without lockd, Lustre without flock): claims go unlocked there.
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
CLAIMS_LOCK_WAIT_S = 60.0  # another driver holds the lock for milliseconds; a minute means it is stuck


def _open_lock(path: str) -> int | None:
    """The claims' lock file opened for locking (made writable by every user of a shared storage: it holds no data,
    and a second user could not open the first one's 0644 file for writing); read-only where another user's file
    cannot be opened for writing (enough for flock on a local disk). None, with a warning, where it cannot be
    opened at all: the claims are then checked and written unlocked, as before the lock."""
    try:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except PermissionError:
            return os.open(path, os.O_RDONLY)
    except OSError as err:
        print(f"warning: claims unlocked: cannot open {path}: {_first_line(err)}", file=sys.stderr)
        return None
    # only its owner may change the mode: another user's file is left as it is
    with contextlib.suppress(OSError):
        if os.fstat(handle).st_mode & 0o777 != 0o666:
            os.fchmod(handle, 0o666)
    return handle


def _locked(handle: int, *, path: str) -> bool:
    """Take the exclusive lock on ``handle``, retrying for ``CLAIMS_LOCK_WAIT_S``: True once held; False, with a
    warning, on a file system that keeps no locks. A lock held longer (a stopped driver, a hung NFS lock server)
    raises ``StorageError`` naming the file rather than waiting for ever."""
    deadline = time.monotonic() + CLAIMS_LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise StorageError(
                    f"the claims' lock {path} has been held by another process for {CLAIMS_LOCK_WAIT_S:.0f} s (a "
                    "stopped or hung sweep driver?): end that driver, or delete the file if none runs"
                ) from None
            time.sleep(0.05)
        except OSError as err:
            if err.errno in NO_LOCKS:
                print(
                    f"warning: claims unlocked: {path}'s file system keeps no locks ({err.strerror})",
                    file=sys.stderr,
                )
                return False
            raise StorageError(f"cannot lock the claims' lock {path}: {_first_line(err)}") from err


def claim_is_live(claim: Mapping[str, Any], *, now: float) -> bool:
    """Whether ``claim``'s driver is still running: its heartbeat is under ``CLAIM_STALE_S`` old (it refreshes every
    ``CLAIM_REFRESH_S``) and, when it was written on this machine, its process exists (a killed driver's claims
    free its trials at once here; elsewhere after ``CLAIM_STALE_S``)."""
    try:
        fresh = now - float(claim.get("heartbeat", 0.0)) < CLAIM_STALE_S
    except (TypeError, ValueError):
        return False
    if not fresh or claim.get("host") != socket.gethostname():
        return fresh
    pid = claim.get("pid")
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _claimed_message(held: list[tuple[str, dict]], *, folder: str, labels: Mapping[str, str]) -> str:
    now = time.time()
    lines = [
        f"  {labels.get(trial_id, '')} ({trial_id}): sweep {claim.get('sweep')!r}, pid {claim.get('pid')} on {claim.get('host')}, its driver "
        f"seen {now - float(claim.get('heartbeat', now)):.0f} s ago"
        for trial_id, claim in held[:10]
    ]
    return (
        f"{len(held)} trial(s) of this sweep are being trained by another sweep on the storage {folder}:\n"
        + "\n".join(lines)
        + ("\n  ..." if len(held) > 10 else "")
        + f"\nwait for it to end (a relaunch then skips what it finished), or leave them out with --where; a claim "
        f"whose driver has stopped is dropped after {CLAIM_STALE_S:.0f} s (on its own machine, at once)"
    )


def _schema_version(record: Any) -> Any:
    """The schema version a parsed result file says it has (None when it is not a JSON object)."""
    return record.get("schema_version") if isinstance(record, Mapping) else None


def validate_record(record: Any, *, trial_id: str | None = None) -> None:
    """Raise ``ConfigError`` naming the problem unless ``record`` is a valid result (of ``trial_id`` when given)."""
    if not isinstance(record, Mapping):
        raise ConfigError(f"a result must be a JSON object, got {type(record).__name__}")
    try:
        check_result(record)
    except ConfigError:
        raise
    except (
        TypeError,
        KeyError,
        AttributeError,
        ValueError,
    ) as err:  # a config of the wrong shape inside the record
        raise ConfigError(
            f"result of trial {record.get('trial_id')!r}: config: {type(err).__name__}: {_first_line(err)}"
        ) from err
    if trial_id is not None and record["trial_id"] != trial_id:
        raise ConfigError(
            f"trial_id: the file of trial {trial_id} holds the result of trial {record['trial_id']}"
        )


# Where Ray unpacks a job's working directory (``ray job submit --working-dir``) on each node; a relative path
# given to a job's driver resolves inside it.
RAY_JOB_FOLDER = ("runtime_resources", "working_dir_files")


# The URI schemes a storage may have (pyarrow's file systems): "s3:/b" is one of them with a slash missing, where
# "run-2024-01-01T12:00" is a folder.
STORAGE_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def check_storage_location(location: str, *, what: str) -> None:
    """Refuse a storage (or cache) the run could not share or did not mean: a scheme with a slash missing
    (``s3:/bucket`` was a local folder named ``s3:``, results on one node's disk), or a local folder inside Ray's
    copy of a job's working directory (under ``ray job submit`` a relative ``--storage``, the default
    ``runs/sweeps`` included, resolved there: on the head alone, deleted with the job, while the GPU nodes wrote
    elsewhere and the sweep learnt it only at a trial's first checkpoint or end)."""
    typo = re.match(rf"({'|'.join(STORAGE_SCHEMES)}):(?!//)", location, flags=re.IGNORECASE)
    if typo and not is_uri(location):
        fixed = f"{typo.group(1)}://{location[typo.end() :].lstrip('/')}"
        raise StorageError(
            f"{what} {location} reads as a local folder named {typo.group(1)}: but looks like a URI with a slash "
            f"missing: write {fixed}"
        )
    resolved = location if is_uri(location) else absolute(location)
    parts = () if is_uri(location) else Path(resolved).parts
    if any(parts[i : i + 2] == RAY_JOB_FOLDER for i in range(len(parts) - 1)):
        shown = location if resolved == location else f"{location} ({resolved})"
        raise StorageError(
            f"{what} {shown} is inside Ray's copy of this job's working directory (a relative path under "
            "`ray job submit` resolves there): that folder is on one node and is deleted with the job. Give an "
            "absolute path on the file system every node shares (e.g. --storage /mnt/varsweep/runs) or a URI"
        )
