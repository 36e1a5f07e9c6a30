"""Results folder -> typed pandas DataFrames: one row per trial (failed trials included, with their error), the
convergence curves and the training histories in long form. Every file is validated against the result schema;
a file that is not a valid result stops the analysis with its name, unless the caller asks to skip such files, in
which case they are listed in the report."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.errors import VarsweepError
from bench.results import ResultStore, is_uri
from bench.roc import roc_vertices
from bench.schema import (
    OPTIONAL_SECTIONS,
    SECTIONS,
    AuditConfig,
    ConfigError,
    EvaluationConfig,
    TrialConfig,
    UnknownRecordPath,
    check_result,
    replace,
)

from .metrics import DATASET_COLUMNS, METHOD_LABELS, METRICS, lookup


class AnalysisError(VarsweepError):
    """Results that cannot be analysed as asked; the message says which files or trials and why."""


@dataclass
class Results:
    """``trials``: one row per trial; ``convergence``: (trial_id, step, metric columns); ``history``: (trial_id,
    step, logged columns); ``audit_roc``: (trial_id, fpr, tpr), the membership ROC of every trial whose record
    holds a privacy audit, from (0, 0) to (1, 1); ``records``: trial_id -> the raw record; ``invalid``: (file,
    reason) of skipped files; ``excluded``: trials left out by --where / --extractor; ``repeats``: trials not
    counted twice."""

    folder: str | Path
    trials: pd.DataFrame
    convergence: pd.DataFrame
    history: pd.DataFrame
    records: dict[str, dict]
    audit_roc: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["trial_id", "fpr", "tpr"]))
    invalid: list[tuple[str, str]] = field(default_factory=list)
    excluded: list[tuple[str, str, str]] = field(default_factory=list)  # (trial id, label, why)
    repeats: list[tuple[str, str, str]] = field(
        default_factory=list
    )  # (trial id, label, the trial counted instead)

    @property
    def succeeded(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == "success"]

    @property
    def failed(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] != "success"]


def result_texts(folder: str | Path) -> list[tuple[str, str]]:
    """(name, text) of every result file: ``folder/results/*.json`` or ``folder/*.json`` for a local folder, or
    ``URI/results/*.json`` for a storage URI (s3://, gs://, ... through pyarrow, as the sweep wrote them)."""
    try:
        texts, where = _uri_texts(str(folder)) if is_uri(str(folder)) else _local_texts(Path(folder))
    except AnalysisError:
        raise
    except (
        OSError,
        ValueError,
    ) as error:  # unreadable folder or file, storage not reachable (pyarrow raises both kinds)
        raise AnalysisError(
            f"cannot read the results in {folder}: {type(error).__name__}: {_one_line(error)}"
        ) from error
    if not texts:
        raise AnalysisError(f"no result files (*.json) in {where}")
    return texts


def storage_root(folder: str | Path) -> str | Path:
    """The storage root of a results folder, against which records' artifact paths resolve: a storage URI or a
    sweep's storage folder itself, or the parent of its ``results/`` folder when given that."""
    if is_uri(str(folder)):
        return str(folder).rstrip("/")
    folder = Path(folder)
    return folder.parent if folder.name == "results" and not (folder / "results").is_dir() else folder


def _uri_texts(uri: str) -> tuple[list[tuple[str, str]], str]:
    store = ResultStore(uri, create=False)  # reading creates nothing
    return [(path, store.read_text(path)) for path in store.files()], store.folder


def _local_texts(folder: Path) -> tuple[list[tuple[str, str]], Path]:
    if not folder.exists():
        raise AnalysisError(f"results folder {folder} does not exist")
    if not folder.is_dir():
        raise AnalysisError(
            f"{folder} is not a folder (give a sweep's storage folder or a folder of result JSON files)"
        )
    inner = folder / "results"
    where = inner if inner.is_dir() else folder
    return [
        (str(where / name), (where / name).read_text(errors="replace")) for name in _json_names(where)
    ], where


def _json_names(folder: Path) -> list[str]:
    """Sorted names of the folder's *.json files (a folder so named is no result, as in ``ResultStore.files``),
    hidden ones left out: an analysis written into a folder of results keeps its manifest there
    (``.varsweep-outputs.json``), which the next analysis read as a broken result. Path.glob would return nothing
    for a folder it may not list; os.scandir raises PermissionError, which is the truth to report."""
    with os.scandir(folder) as entries:
        return sorted(
            entry.name
            for entry in entries
            if entry.name.endswith(".json") and not entry.name.startswith(".") and entry.is_file()
        )


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no message"


def load_results(
    folder: str | Path,
    *,
    skip_invalid: bool = False,
    extractor: str | None = None,
    where: dict[str, object] | None = None,
    trial_ids: Collection[str] | None = None,
) -> Results:
    """Load and validate every result, then select and check them:
    - a file that is not a valid result, or repeats another file's trial id, stops the analysis (``skip_invalid``:
      it is listed and skipped);
    - ``where`` keeps the trials whose config has these values (dotted paths, e.g. {"optimization.seed": 0}), and
      ``trial_ids`` only these trials (one sweep's, in a folder that holds others);
    - results of more than one feature extractor are refused (their FIDs are not comparable) unless ``extractor``
      selects one; left-out trials are listed in ``Results.excluded``;
    - trials repeating another's setting and seeds (e.g. a Table 1 trial and its convergence-sweep twin, which
      differ only in convergence evaluations) count once: ``Results.repeats``;
    - two different settings in one table cell (e.g. LoRA rank 16 and 64 for the same model, dataset and
      privacy) are refused with the fields that differ, since averaging them would pass them off as seeds;
      audited trials are checked apart from the others (the utility tables leave them out)."""
    records, rows, invalid, files = {}, {}, [], {}
    for name, text in result_texts(folder):
        try:
            record = json.loads(text)
            if not isinstance(record, dict):  # said plainly, not as the AttributeError of reading a field
                raise ValueError(f"not a JSON object but {json.dumps(record)[:40]}")
            check_result(
                record
            )  # typed: history and convergence entries are objects with a step, values of their types
            row = trial_row(
                record
            )  # a schema-valid record whose values cannot be read is as invalid as a broken file
        except (
            UnknownRecordPath
        ):  # our reader asks for a key the record type does not define: not the file's fault
            raise
        except (json.JSONDecodeError, ConfigError, TypeError, KeyError, AttributeError, ValueError) as error:
            invalid.append((name, f"{type(error).__name__}: {_one_line(error)}"))
            continue
        if record["trial_id"] in records:
            invalid.append(
                (name, f"repeats trial {record['trial_id']} of {files[record['trial_id']]} (kept that file)")
            )
            continue
        records[record["trial_id"]], rows[record["trial_id"]], files[record["trial_id"]] = record, row, name
    if invalid and not skip_invalid:
        listing = "\n".join(f"  {name}: {reason}" for name, reason in invalid)
        raise AnalysisError(
            f"{len(invalid)} file(s) are not valid results of this schema (pass --skip-invalid to list and skip them):\n{listing}"
        )
    if not records:
        raise AnalysisError(f"no valid results in {folder}: all {len(invalid)} files are invalid")
    trials = pd.DataFrame(list(rows.values()))
    trials, excluded = _select(trials, records, where=where or {}, extractor=extractor, trial_ids=trial_ids)
    trials, repeats = _count_repeats_once(trials, records)
    _check_one_setting_per_cell(trials, records)
    records = {
        tid: r for tid, r in records.items() if tid in set(trials["trial_id"]) | {t for t, _, _ in repeats}
    }
    return Results(
        folder=folder,
        trials=_ordered(trials),
        convergence=_long(records, "convergence"),
        history=_long(records, "history"),
        records=records,
        audit_roc=_audit_roc(records),
        invalid=invalid,
        excluded=excluded,
        repeats=repeats,
    )


def _audit_roc(records: dict[str, dict]) -> pd.DataFrame:
    """(trial_id, fpr, tpr) vertices of each audited record's ROC, from its per-canary scores and inclusion."""
    rows = []
    for trial_id, record in records.items():
        audit = record.get("audit")
        if audit:
            fpr, tpr = roc_vertices(audit["scores"], audit["included_mask"])
            rows += [{"trial_id": trial_id, "fpr": x, "tpr": y} for x, y in zip(fpr, tpr)]
    return pd.DataFrame(rows, columns=["trial_id", "fpr", "tpr"])


def config_value(config: dict, path: str):
    """The value at a dotted path of a config dict (``method.lora_rank``); AnalysisError names a wrong path. An
    optional section that a record leaves out or holds as null (``audit`` of a trial without an audit, ``privacy``
    of a non-DP trial) reads as None, as do its fields: ``--where audit=null`` keeps the trials without an audit and
    ``--where privacy.target_epsilon=8`` passes over the non-DP ones. A field the section does not have is still
    an error, whatever the record holds."""
    section, *rest = path.split(".")
    if section in OPTIONAL_SECTIONS and config.get(section) is None:
        fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
        if len(rest) > 1 or (rest and rest[0] not in fields):
            raise AnalysisError(
                f"--where {path}: no such config field ({section} has: {', '.join(sorted(fields))})"
            )
        return None
    value = config
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise AnalysisError(f"--where {path}: no such config field (sections: {', '.join(config)})")
        value = value[part]
    return value


def flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def fields_default(kind: type, name: str):
    return next(f.default for f in dataclasses.fields(kind) if f.name == name)


# What a trial's run is apart from: the convergence evaluations made during training (evaluation only; the training
# streams do not depend on them). Trials equal but for these are one run repeated (``_count_repeats_once``).
CONVERGENCE_NEUTRAL = {
    "evaluation": {
        "convergence_every_steps": 0,
        "convergence_points": 0,
        "convergence_num_images": fields_default(EvaluationConfig, "convergence_num_images"),
    },
}
# What does not change a trial's setting either: the seeds, its replicate axis. The training seed, the seed of the
# cached crops and the evaluation's sampling seed (the paper sweeps move the three together) and, for an audited trial only, the audit's seed (it draws other
# canaries; README advises rerunning with another): replacing it in a trial without an audit would add one.
SETTING_NEUTRAL = {
    "optimization": {"seed": 0},
    "data": {"view_seed": 0},
    "evaluation": {**CONVERGENCE_NEUTRAL["evaluation"], "sampling_seed": 0},
}
AUDIT_NEUTRAL = {"audit": {"seed": 0}}
NOT_SETTING = tuple(
    f"{section}.{name}" for section, fields in {**SETTING_NEUTRAL, **AUDIT_NEUTRAL}.items() for name in fields
)


def setting_of(config: TrialConfig) -> str:
    """The trial id of ``config`` with the seeds and convergence evaluations neutralised: equal for replicates. A
    grouping key only: trial ids themselves are unchanged."""
    return replace(config, **SETTING_NEUTRAL, **(AUDIT_NEUTRAL if config.audit else {})).trial_id


# What a run's repeat may differ in besides: the sampling seed of its evaluation (the training is the same run). The
# paper sweeps' second seed sampled with seed 0 before it sampled with its own: its older results repeat the new ones.
RUN_NEUTRAL = {"evaluation": {**CONVERGENCE_NEUTRAL["evaluation"], "sampling_seed": 0}}


def run_of(config: TrialConfig) -> str:
    """The trial id of ``config`` with the convergence evaluations and the evaluation's sampling seed neutralised:
    equal for repeats of one run (every training, crop and audit seed kept, so replicates differ)."""
    return replace(config, **RUN_NEUTRAL).trial_id


def _select(
    trials: pd.DataFrame,
    records: dict,
    *,
    where: dict,
    extractor: str | None,
    trial_ids: Collection[str] | None,
) -> tuple[pd.DataFrame, list]:
    excluded = []
    if trial_ids is not None:
        keep = trials["trial_id"].isin(set(trial_ids))
        excluded += [
            (t.trial_id, t.label, f"not one of the {len(set(trial_ids))} trials asked for")
            for t in trials[~keep].itertuples()
        ]
        trials = trials[keep]
    for path, wanted in where.items():
        keep = trials["trial_id"].map(lambda tid: config_value(records[tid]["config"], path) == wanted)  # noqa: B023
        excluded += [(t.trial_id, t.label, f"{path} is not {wanted!r}") for t in trials[~keep].itertuples()]
        trials = trials[keep]
    found = {
        name: int(n)
        for name, n in trials.loc[trials["status"] == "success", "extractor"].value_counts().items()
    }
    if extractor is not None:
        if extractor not in set(trials["extractor"]):
            raise AnalysisError(f"no trial was evaluated with extractor {extractor!r}; found: {found}")
        excluded += [
            (t.trial_id, t.label, f"evaluated with {t.extractor}")
            for t in trials[trials["extractor"] != extractor].itertuples()
        ]
        trials = trials[trials["extractor"] == extractor]
    elif len(found) > 1:
        raise AnalysisError(
            f"these results mix feature extractors {found}: FIDs from different extractors are not "
            "comparable; choose one with --extractor NAME"
        )
    if trials.empty:
        asked = [f"--where {path}={json.dumps(value)}" for path, value in where.items()] + (
            [f"--extractor {extractor}"] if extractor else []
        )
        raise AnalysisError(
            f"no trial is left after the selection {' '.join(asked) or '(the trials asked for)'} ({len(excluded)} excluded)"
        )
    return trials.reset_index(drop=True), excluded


def _count_repeats_once(trials: pd.DataFrame, records: dict) -> tuple[pd.DataFrame, list]:
    """One trial per run (``run_of``: the setting and every seed, training, crop and audit): a success before a
    failure, then one that sampled with its training seed (as the paper sweeps do), then the one with more
    convergence evaluations, then the smaller trial id. Returns (trials, [(repeat id, label, kept id), ...])."""
    configs = [records[t]["config"] for t in trials["trial_id"]]
    rank = trials.assign(
        _ok=trials["status"] != "success",
        _sampled_otherwise=[
            c["evaluation"].get("sampling_seed", 0) != c["optimization"].get("seed", 0) for c in configs
        ],
        _curve=[-len(records[t]["convergence"]) for t in trials["trial_id"]],
    )
    rank = rank.sort_values(["run", "_ok", "_sampled_otherwise", "_curve", "trial_id"])
    first = rank.groupby("run")["trial_id"].transform("first")
    repeats = [
        (t, label, kept) for t, label, kept in zip(rank["trial_id"], rank["label"], first) if t != kept
    ]
    return trials[trials["trial_id"].isin(set(first))].reset_index(drop=True), repeats


CELL = ["model", "dataset", "method", "epsilon", "k"]


def _check_one_setting_per_cell(trials: pd.DataFrame, records: dict) -> None:
    """Refuse two settings in one table cell. Audited trials are checked apart from the others: they are their own
    experiment (they train on canaries besides the dataset), which the utility tables leave out."""
    conflicts = []
    for key, group in trials.fillna({"epsilon": -1.0}).groupby([*CELL, "audited"]):
        if group["setting"].nunique() > 1:
            configs = [
                flat_config(records[t]["config"]) for t in group.drop_duplicates("setting")["trial_id"]
            ]
            differ = sorted(
                k
                for k in set().union(*configs)
                if k not in NOT_SETTING
                and not k.startswith("resources.")
                and len({json.dumps(c.get(k), default=str) for c in configs}) > 1
            )
            values = "; ".join(
                f"{k} = {', '.join(sorted({json.dumps(c.get(k), default=str) for c in configs}))}"
                for k in differ[:4]
            )
            model, dataset, method, epsilon, k, audited = key
            where = f"{model} {dataset} {method} {'no DP' if epsilon < 0 else f'ε={epsilon:g}'} k={k}"
            where += " (audited)" if audited else ""
            conflicts.append(f"  {where}: {group['setting'].nunique()} settings differing in {values}")
    if conflicts:
        raise AnalysisError(
            f"{len(conflicts)} table cell(s) hold trials of different settings, which would be averaged as if they "
            "were seeds; analyse them separately (other folders, or --where FIELD=VALUE):\n"
            + "\n".join(conflicts[:10])
        )


def _trainable_share(
    record: dict, trainable: float | None, base_total: float | None, *, method: str
) -> float:
    """Trainable parameters as a percentage of the adapted model's (base plus adapter modules: peft's count, which
    the paper's shares follow; LN tuning's trainable copies of the AdaLN linears count in both). Records written
    before ``adapter_parameters`` was recorded: an adapter method's adapter is its trainable parameters but the class
    embedding."""
    if trainable is None or not base_total:
        return math.nan
    adapter = lookup(record, "parameters.adapter_parameters")
    if adapter is None and method not in ("full", "base"):
        adapter = lookup(record, "parameters.trainable_without_class_embedding")
    return 100.0 * trainable / (base_total + (adapter or 0))


def trial_row(record: dict) -> dict:
    """The flat, typed description of one trial: its axes (model, dataset, method, privacy, seed), status and
    every registry metric (NaN where the trial has none)."""
    config = TrialConfig.from_dict(record["config"])
    model, method, privacy = config.model, config.method, config.privacy
    # Every read goes through ``lookup``: a path the typed record does not define raises instead of reading as NaN.
    trainable, total = lookup(record, "parameters.trainable"), lookup(record, "parameters.base_total")
    classifier = lookup(record, "evaluation_settings.classifier") or {}
    delta = lookup(record, "privacy.delta")
    row = {
        "trial_id": record["trial_id"],
        "setting": setting_of(config),
        "run": run_of(config),
        "status": record["status"],
        "error": record["error"],
        "label": config.label,
        "model": f"VAR-d{model.depth}" if model.base == "official" else f"tiny-d{model.depth}",
        "depth": model.depth,
        "dataset": config.data.dataset,
        "dataset_column": DATASET_COLUMNS.get(config.data.dataset, config.data.dataset),
        "resolution": config.data.resolution,
        "method": method.name,
        "method_label": METHOD_LABELS[method.name],
        "lora_rank": method.lora_rank,
        "lora_targets": "+".join(method.lora_targets) if method.lora_targets else None,
        "dp": privacy is not None,
        "epsilon": privacy.target_epsilon if privacy else math.nan,
        "k": privacy.augmentation_multiplicity if privacy else 1,
        "sampling_rate": privacy.sampling_rate if privacy else math.nan,
        "dp_max_grad_norm": privacy.max_grad_norm if privacy else math.nan,
        "seed": config.optimization.seed,
        "extractor": lookup(record, "evaluation_settings.extractor") or config.evaluation.extractor,
        "guidance_scale": config.evaluation.guidance_scale,
        "top_k": config.evaluation.top_k,
        "top_p": config.evaluation.top_p,
        "evaluation_split": config.data.evaluation_split,
        "convergence_num_images": config.evaluation.convergence_num_images,
        "finished_at": record["finished_at"],
        "git_commit": lookup(record, "environment.git_commit"),
        "devices": ", ".join(sorted(set(lookup(record, "environment.devices") or []))),
        # DDP workers as the run recorded them, else as its config asked
        "workers": lookup(record, "environment.world_size") or config.resources.workers,
        "trainable_params": float(trainable) if trainable is not None else math.nan,
        "trainable_pct": _trainable_share(record, trainable, total, method=method.name),
        "delta": delta if delta is not None else math.nan,
        "classifier": classifier.get("name"),
        "classifier_test_accuracy": _percent(classifier.get("test_accuracy")),
        "cost_estimated": lookup(record, "cost.estimated") is True,
    }
    row.update(audit_columns(record, audit=config.audit))
    for metric in METRICS.values():
        if metric.name not in row:
            value = lookup(record, metric.source)
            # Only numbers: metrics may also hold lists (class_accuracy_per_class) or strings.
            row[metric.name] = (
                float(value) * metric.scale
                if isinstance(value, (int, float)) and not isinstance(value, bool)
                else math.nan
            )
    return row


# The privacy audit's columns of the trials table (column -> path in the record); NaN (None for the mechanism)
# where a trial has no ``audit`` section. Fractions stay fractions here; the table shows them in percent.
AUDIT_COLUMNS = {
    "audit_included": "audit.included",
    "audit_delta": "audit.delta",
    "audit_claimed_epsilon": "audit.claimed_epsilon",
    "audit_epsilon_lower_bound": "audit.epsilon_lower_bound",
    "audit_guesses": "audit.guesses",
    "audit_correct_guesses": "audit.correct_guesses",
    "audit_tpr_at_1pct_fpr": "audit.tpr_at_1pct_fpr",
    "audit_tpr_at_0_1pct_fpr": "audit.tpr_at_0_1pct_fpr",
    "audit_auc": "audit.auc",
}


def audit_columns(record: dict, *, audit: AuditConfig | None) -> dict:
    """The trial's audit as flat columns: ``audited`` (its config asks for an audit), the configured canaries and
    confidence (NaN without an audit; a record's own are checked equal to them), ``audit_mechanism`` (str or
    None) and every ``AUDIT_COLUMNS`` number (NaN where not recorded, e.g. a failed audited trial)."""
    columns = {
        "audited": audit is not None,
        "audit_canaries": float(audit.canaries) if audit else math.nan,
        "audit_confidence": audit.confidence if audit else math.nan,
        "audit_mechanism": lookup(record, "audit.mechanism"),
    }
    for column, source in AUDIT_COLUMNS.items():
        value = lookup(record, source)
        columns[column] = float(value) if value is not None else math.nan
    return columns


def _percent(fraction) -> float:
    """A stored fraction in percent; NaN where it is missing or not a number."""
    return (
        100.0 * float(fraction)
        if isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
        else math.nan
    )


def _ordered(trials: pd.DataFrame) -> pd.DataFrame:
    """Stable order: model depth, dataset, method (table order), privacy, k, seed; typed columns."""
    trials = trials.astype(
        {"depth": "int64", "k": "int64", "seed": "int64", "dp": "bool", "epsilon": "float64"}
    )
    order = trials["method"].map({name: i for i, name in enumerate(METHOD_LABELS)})
    trials = trials.assign(_order=order).sort_values(
        ["depth", "dataset", "_order", "dp", "epsilon", "k", "seed"], na_position="first"
    )
    return trials.drop(columns="_order").reset_index(drop=True)


def _long(records: dict[str, dict], key: str) -> pd.DataFrame:
    rows = [{"trial_id": tid, **entry} for tid, record in records.items() for entry in record[key]]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=["trial_id", "step"])
