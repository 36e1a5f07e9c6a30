"""One JSON result per trial under ``<storage>/results/<trial_id>.json``, on a local or shared path or any URI
pyarrow understands (s3://, gs://, ...). Written atomically: a local file is renamed into place, an object store
publishes an object only when its upload completes. No torch, no Ray."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pyarrow import fs as pafs

from .schema import check_result, is_uri


class ResultStore:
    """``create=False`` opens a store read-only: nothing is created (``bench status``, dry runs)."""

    def __init__(self, storage: str | os.PathLike, *, create: bool = True):
        storage = str(storage)
        if is_uri(storage):
            self.fs, root = pafs.FileSystem.from_uri(storage)
        else:
            self.fs, root = pafs.LocalFileSystem(), str(Path(storage).resolve())
        self.storage, self.root, self.folder = storage, root.rstrip("/"), f"{root.rstrip('/')}/results"
        if create:
            self.fs.create_dir(self.folder, recursive=True)

    def exists(self) -> bool:
        """Whether the storage folder itself exists."""
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def path(self, trial_id: str) -> str:
        return f"{self.folder}/{trial_id}.json"

    def write(self, record: dict) -> str:
        """Validate and write ``record`` (replacing an earlier one of the same trial)."""
        check_result(record)
        text, path = json.dumps(record, indent=1, sort_keys=True), self.path(record["trial_id"])
        if isinstance(self.fs, pafs.LocalFileSystem):
            handle, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-")
            with os.fdopen(handle, "w") as out:
                out.write(text)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open_output_stream(path) as out:
                out.write(text.encode())
        return path

    def read(self, trial_id: str) -> dict | None:
        try:
            with self.fs.open_input_stream(self.path(trial_id)) as handle:
                return json.loads(handle.read().decode())
        except FileNotFoundError:
            return None

    def status(self, trial_id: str) -> str | None:
        """"success", "failed" or None (no result yet). An unreadable file counts as no result (the trial reruns)."""
        try:
            record = self.read(trial_id)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return None if record is None else record.get("status")

    def state(self, trial_id: str) -> tuple[str, str]:
        """("pending" | "success" | "failed" | "invalid", detail): a failed trial's first error line, or why a
        file is not a valid result (unreadable JSON, another schema version, a config not matching its id)."""
        try:
            record = self.read(trial_id)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return "invalid", f"not JSON ({err})"
        if record is None:
            return "pending", ""
        try:
            check_result(record)
        except (ValueError, TypeError, KeyError) as err:
            return "invalid", str(err)
        if record["status"] == "failed":
            return "failed", (record["error"] or "").strip().splitlines()[0] if (record["error"] or "").strip() else ""
        return record["status"], ""

    def files(self) -> list[str]:
        """Paths of every ``*.json`` in the results folder (valid results or not), sorted."""
        selector = pafs.FileSelector(self.folder, allow_not_found=True)
        return sorted(info.path for info in self.fs.get_file_info(selector) if info.path.endswith(".json"))

    def read_text(self, path: str) -> str:
        with self.fs.open_input_stream(path) as handle:
            return handle.read().decode()

    def all(self) -> list[dict]:
        ids = [Path(path).stem for path in self.files()]
        return [r for r in (self.read(i) for i in ids) if r is not None]
