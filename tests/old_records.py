"""Result records as older schema versions wrote them, for the upgrade tests (``bench.schema.upgrade_record``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.schema import EXTRACTORS

REPO = Path(__file__).resolve().parents[1]
SCHEMA_2 = "56a1946"  # the last commit of schema version 2


def as_version(record: dict, version: int) -> dict:
    """``record`` (current) as schema ``version`` (1 or 2) wrote it, under another trial id (older versions hashed
    other fields). Version 2: a DP trial's rows per forward were ``privacy.physical_batch_rows`` (its
    ``resources.rows_per_forward`` had to be 0) and float fields kept integers as written (the epsilon here); version
    1 also had ``evaluation.cfg`` and ``optimization.max_grad_norm`` under those names. Neither had
    ``resources.compile_sampling`` (added in version 3)."""
    old = json.loads(json.dumps(record))
    config = old["config"]
    old["schema_version"], old["trial_id"] = version, record["trial_id"][::-1]
    del config["resources"]["compile_sampling"]
    if config["privacy"] is not None:
        config["privacy"]["physical_batch_rows"] = config["resources"]["rows_per_forward"]
        config["resources"]["rows_per_forward"] = 0
        epsilon = config["privacy"]["target_epsilon"]
        config["privacy"]["target_epsilon"] = int(epsilon) if float(epsilon).is_integer() else epsilon
    if version == 1:
        config["evaluation"]["cfg"] = config["evaluation"].pop("guidance_scale")
        config["optimization"]["max_grad_norm"] = config["optimization"].pop("global_clip_norm")
    return old


def schema_at(commit: str, folder: Path):
    """bench/schema.py as it was at ``commit``, loaded as a module of the ``bench`` package (its relative imports
    resolve), or a skip where the repository's history is not at hand (an unpacked release)."""
    shown = subprocess.run(
        ["git", "show", f"{commit}:bench/schema.py"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    if shown.returncode != 0:
        pytest.skip(f"git history with {commit} not available: {shown.stderr.strip()[:200]}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"schema_{commit}.py"
    path.write_text(shown.stdout)
    spec = importlib.util.spec_from_file_location(f"bench.schema_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    # registered for good: dataclasses and type hints (the result sections' TypedDicts) look their module up
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def version_2_schema(folder: Path):
    """``schema_at(SCHEMA_2)`` taught the extractors added since (``digits-cnn-v2``, which replaced its
    ``digits-cnn-v1`` in version 3): the upgrade tests write version-2 records of today's built-in trials, which
    score digits with it; the record's format, hashing and checks are that version's."""
    before = schema_at(SCHEMA_2, folder)
    before.EXTRACTORS = tuple(dict.fromkeys((*before.EXTRACTORS, *EXTRACTORS)))
    return before


def written_by_version_2(config, folder: Path, **result) -> dict:
    """The result version 2 (``SCHEMA_2``) wrote for the experiment of ``config`` (current): its config validated by
    that schema (``version_2_schema``), under the id it gave, ``result`` passed to its ``make_result``."""
    before = version_2_schema(folder)
    old = before.TrialConfig.from_dict(as_version({"config": config.to_dict(), "trial_id": ""}, 2)["config"])
    return before.make_result(old, **result)
