"""Result records as older schema versions wrote them, for the upgrade tests (``bench.schema.upgrade_record``)."""

from __future__ import annotations

import json


def as_version(record: dict, version: int) -> dict:
    """``record`` (current) as schema ``version`` (1 or 2) wrote it, under another trial id (older versions hashed
    other fields). Version 2: a DP trial's rows per forward were ``privacy.physical_batch_rows`` (its
    ``resources.rows_per_forward`` had to be 0) and float fields kept integers as written (the epsilon here); version
    1 also had ``evaluation.cfg`` and ``optimization.max_grad_norm`` under those names."""
    old = json.loads(json.dumps(record))
    config = old["config"]
    old["schema_version"], old["trial_id"] = version, record["trial_id"][::-1]
    if config["privacy"] is not None:
        config["privacy"]["physical_batch_rows"] = config["resources"]["rows_per_forward"]
        config["resources"]["rows_per_forward"] = 0
        epsilon = config["privacy"]["target_epsilon"]
        config["privacy"]["target_epsilon"] = int(epsilon) if float(epsilon).is_integer() else epsilon
    if version == 1:
        config["evaluation"]["cfg"] = config["evaluation"].pop("guidance_scale")
        config["optimization"]["max_grad_norm"] = config["optimization"].pop("global_clip_norm")
    return old
