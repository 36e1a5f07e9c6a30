"""Results folder -> typed pandas DataFrames: one row per trial (failed trials included, with their error), the
convergence curves and the training histories in long form. Every file is validated against the result schema;
a file that is not a valid result stops the analysis with its name, unless the caller asks to skip such files, in
which case they are listed in the report."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.results import ResultStore, is_uri
from bench.schema import ConfigError, TrialConfig, check_result

from .metrics import DATASET_COLUMNS, METHOD_LABELS, METRICS, lookup


class AnalysisError(ValueError):
    """Results that cannot be analysed as asked; the message says which files or trials and why."""


@dataclass
class Results:
    """``trials``: one row per trial; ``convergence``: (trial_id, step, metric columns); ``history``: (trial_id,
    step, logged columns); ``records``: trial_id -> the raw record; ``invalid``: (file, reason) of skipped files."""

    folder: str | Path
    trials: pd.DataFrame
    convergence: pd.DataFrame
    history: pd.DataFrame
    records: dict[str, dict]
    invalid: list[tuple[str, str]] = field(default_factory=list)

    @property
    def succeeded(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == "success"]

    @property
    def failed(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] != "success"]


def result_texts(folder: str | Path) -> list[tuple[str, str]]:
    """(name, text) of every result file: ``folder/results/*.json`` or ``folder/*.json`` for a local folder, or
    ``URI/results/*.json`` for a storage URI (s3://, gs://, ... through pyarrow, as the sweep wrote them)."""
    if is_uri(str(folder)):
        store = ResultStore(str(folder))
        texts = [(path, store.read_text(path)) for path in store.files()]
        where = store.folder
    else:
        folder = Path(folder)
        if not folder.is_dir():
            raise AnalysisError(f"results folder {folder} does not exist")
        inner = folder / "results"
        where = inner if inner.is_dir() else folder
        texts = [(str(path), path.read_text(errors="replace")) for path in sorted(where.glob("*.json"))]
    if not texts:
        raise AnalysisError(f"no result files (*.json) in {where}")
    return texts


def load_results(folder: str | Path, *, skip_invalid: bool = False, extractor: str | None = None) -> Results:
    """Load and validate every result. Results of more than one feature extractor are refused (their FIDs are not
    comparable) unless ``extractor`` selects one; the other trials are then left out and say so in the report."""
    records, invalid = {}, []
    for name, text in result_texts(folder):
        try:
            record = json.loads(text)
            check_result(record)
        except (json.JSONDecodeError, ConfigError, TypeError, KeyError, AttributeError) as error:
            invalid.append((name, f"{type(error).__name__}: {error}"))
            continue
        records[record["trial_id"]] = record
    if invalid and not skip_invalid:
        listing = "\n".join(f"  {name}: {reason}" for name, reason in invalid)
        raise AnalysisError(f"{len(invalid)} file(s) are not valid results of this schema (pass --skip-invalid to list and skip them):\n{listing}")
    trials = pd.DataFrame([trial_row(r) for r in records.values()]) if records else _empty_trials()
    trials = _select_extractor(trials, extractor)
    kept = set(trials["trial_id"])
    records = {tid: r for tid, r in records.items() if tid in kept}
    return Results(folder=folder, trials=_ordered(trials), convergence=_long(records, "convergence"),
                   history=_long(records, "history"), records=records, invalid=invalid)


def trial_row(record: dict) -> dict:
    """The flat, typed description of one trial: its axes (model, dataset, method, privacy, seed), status and
    every registry metric (NaN where the trial has none)."""
    config = TrialConfig.from_dict(record["config"])
    model, method, privacy = config.model, config.method, config.privacy
    settings = record.get("evaluation_settings") or {}
    params = record.get("parameters") or {}
    trainable, total = params.get("trainable"), params.get("base_total")
    row = {
        "trial_id": record["trial_id"], "status": record["status"], "error": record["error"], "label": config.label,
        "model": f"VAR-d{model.depth}" if model.base == "official" else f"tiny-d{model.depth}", "depth": model.depth,
        "dataset": config.data.dataset, "dataset_column": DATASET_COLUMNS.get(config.data.dataset, config.data.dataset),
        "resolution": config.data.resolution, "method": method.name, "method_label": METHOD_LABELS[method.name],
        "lora_rank": method.lora_rank, "lora_targets": "+".join(method.lora_targets) if method.lora_targets else None,
        "dp": privacy is not None, "epsilon": privacy.target_epsilon if privacy else math.nan,
        "k": privacy.augmentation_multiplicity if privacy else 1, "sampling_rate": privacy.sampling_rate if privacy else math.nan,
        "dp_max_grad_norm": privacy.max_grad_norm if privacy else math.nan, "seed": config.optimization.seed,
        "extractor": settings.get("extractor", config.evaluation.extractor), "finished_at": record["finished_at"],
        "git_commit": (record.get("environment") or {}).get("git_commit"),
        "devices": ", ".join(sorted(set((record.get("environment") or {}).get("devices") or []))),
        "trainable_params": float(trainable) if trainable is not None else math.nan,
        "trainable_pct": 100.0 * trainable / total if trainable is not None and total else math.nan,
        "delta": (record.get("privacy") or {}).get("delta", math.nan),
    }
    for metric in METRICS.values():
        if metric.name not in row:
            value = lookup(record, metric.source)
            row[metric.name] = float(value) * metric.scale if isinstance(value, (int, float)) else math.nan
    return row


def _select_extractor(trials: pd.DataFrame, extractor: str | None) -> pd.DataFrame:
    found = trials.loc[trials["status"] == "success", "extractor"].value_counts()
    if extractor is not None:
        if extractor not in set(trials["extractor"]):
            raise AnalysisError(f"no trial was evaluated with extractor {extractor!r}; found: {dict(found)}")
        return trials[trials["extractor"] == extractor].reset_index(drop=True)
    if len(found) > 1:
        raise AnalysisError(f"these results mix feature extractors {dict(found)}: FIDs from different extractors are not "
                            "comparable; choose one with --extractor NAME")
    return trials


def _ordered(trials: pd.DataFrame) -> pd.DataFrame:
    """Stable order: model depth, dataset, method (table order), privacy, k, seed; typed columns."""
    trials = trials.astype({"depth": "int64", "k": "int64", "seed": "int64", "dp": "bool", "epsilon": "float64"})
    order = trials["method"].map({name: i for i, name in enumerate(METHOD_LABELS)})
    trials = trials.assign(_order=order).sort_values(["depth", "dataset", "_order", "dp", "epsilon", "k", "seed"], na_position="first")
    return trials.drop(columns="_order").reset_index(drop=True)


def _long(records: dict[str, dict], key: str) -> pd.DataFrame:
    rows = [{"trial_id": tid, **entry} for tid, record in records.items() for entry in record[key]]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["trial_id", "step"])


def _empty_trials() -> pd.DataFrame:
    columns = ["trial_id", "status", "error", "label", "model", "depth", "dataset", "dataset_column", "method", "method_label",
               "dp", "epsilon", "k", "seed", "extractor", "trainable_params", "trainable_pct", *METRICS]
    return pd.DataFrame(columns=columns)
