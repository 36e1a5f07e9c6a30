"""The published tables (arXiv 2507.11441, copied in ``analysis/paper/``), our tables beside them, and a results
fixture whose metrics equal the published values (the golden test regenerates the paper's tables from it).

The paper's Table 1 also lists DiT-XL-2 baselines; varsweep adapts VAR only, so those rows are never regenerated.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.estimates import trial_estimate
from bench.schema import DATASETS, LORA_PRESETS, TrialConfig, make_result
from bench.sweeps import table1, table2, table3, table10
from bench.sweeps.common import Assets

from .load import AnalysisError, config_value
from .metrics import (
    DATASET_COLUMNS,
    METHOD_LABELS,
    PAPER_EXTRACTOR,
    PAPER_VARIANTS,
    VARIANT_LABELS,
    effective_targets,
    variant,
)
from .tables import DP_DATASET, MISSING, Cell, Table, published

PAPER = "arXiv 2507.11441"
# Key columns of each published table; every other column holds a value.
KEYS = {
    "table1_fid": ("model", "method"),
    "table2_dp_multiplicity": ("model", "method", "epsilon", "k"),
    "table3_dp_epsilon": ("model", "method", "k"),
    "table9_precision_recall": ("model", "method"),
    "table10_dp_ablation": ("model", "variant", "targets", "epsilon", "k"),
}
OUR_MODELS = ("VAR-",)  # rows of other model families (DiT) are published baselines only
PAPER_RESOLUTION = 256  # the paper's images, in pixels
# How the paper sampled and what it evaluated on (VAR's FID settings; FID against the test split): trials column ->
# (config field, the paper's value).
PAPER_SETTINGS = {
    "guidance_scale": ("evaluation.guidance_scale", 1.5),
    "top_k": ("evaluation.top_k", 900),
    "top_p": ("evaluation.top_p", 0.96),
    "evaluation_split": ("data.evaluation_split", "test"),
}


def number(text: str) -> float | None:
    """A published or rendered cell as a number: "6.02M" -> 6.02e6, "" -> None."""
    text = text.strip()
    if not text:
        return None
    if text.endswith("M"):
        return float(text[:-1]) * 1e6
    return float(text)


def ours_as_rows(table: Table) -> list[dict[str, str | Cell]]:
    return [dict(zip(table.header, row)) for row in table.rows]


def _shown(mine: str | Cell | None) -> tuple[str | Cell, str]:
    """(what the comparison shows for our cell, its mean as the CSV writes it): the whole cell where it holds
    trials, so its spread, seed count and failures stand beside the published number (the CSV keeps the mean),
    else the missing mark."""
    if not isinstance(mine, Cell):
        return mine or MISSING, mine or ""
    held = mine.mean is not None or mine.failed or mine.no_value
    return (mine if held else MISSING), mine.csv()


def check_comparable(trials, records: dict[str, dict]) -> None:
    """Refuse (AnalysisError, one line) to put results beside the published numbers that cannot stand there:
    another feature extractor than the paper's (its FIDs are on another scale), a dataset the paper did not use,
    a set number of evaluation images (the paper generates as many per class as the test split has), another
    resolution than the paper's, other sampling settings or evaluation split than the paper's (``PAPER_SETTINGS``)
    or LoRA targets other than the method's preset (``_other_targets``). Only the trials the paper tables show are
    checked: audited trials are not."""
    shown = trials[~trials["audited"]]
    images = shown["trial_id"].map(lambda t: config_value(records[t]["config"], "evaluation.num_images"))
    problems = [
        _other_extractors(shown),
        _other_datasets(shown),
        _set_image_counts(images.dropna()),
        _other_resolutions(shown["resolution"][shown["resolution"] != PAPER_RESOLUTION]),
        *[_other_setting(shown[column], *setting) for column, setting in PAPER_SETTINGS.items()],
        _other_targets(shown),
    ]
    if any(problems):
        raise AnalysisError(f"--compare-paper refused: {'; '.join(p for p in problems if p)}")


def _other_extractors(trials) -> str | None:
    other = trials[trials["extractor"] != PAPER_EXTRACTOR]["extractor"].value_counts()
    found = ", ".join(f"{name} ({n} trials)" for name, n in other.items())
    return (
        f"the published numbers use the {PAPER_EXTRACTOR} extractor, these results were evaluated with {found}, "
        "whose FIDs are not comparable"
        if len(other)
        else None
    )


def _other_datasets(trials) -> str | None:
    unused = trials[~trials["dataset"].isin(list(DATASET_COLUMNS))]["dataset"].value_counts()
    found = ", ".join(f"{name} ({n} trials)" for name, n in unused.items())
    return (
        f"the paper did not use dataset{'s' * (len(unused) > 1)} {found} (it used {', '.join(DATASET_COLUMNS)}; "
        "select with --where data.dataset=NAME)"
        if len(unused)
        else None
    )


def _set_image_counts(images) -> str | None:
    """``images``: the evaluation.num_images of the trials that set one."""
    return (
        f"{_trials(len(images))} evaluated on a set number of images (evaluation.num_images = {_values(images)}; "
        "the paper generates as many per class as the test split has: select the others with "
        "--where evaluation.num_images=null)"
        if len(images)
        else None
    )


def _other_resolutions(resolutions) -> str | None:
    """``resolutions``: those of the trials at another resolution than the paper's."""
    return (
        f"{_trials(len(resolutions))} at data.resolution = {_values(resolutions)} (the paper's images are "
        f"{PAPER_RESOLUTION} px: select the others with --where data.resolution={PAPER_RESOLUTION})"
        if len(resolutions)
        else None
    )


def _other_setting(values, field: str, paper) -> str | None:
    """``values``: one sampling or evaluation setting of the trials (``PAPER_SETTINGS``), ``field`` its config
    field."""
    other = values[values != paper]
    return (
        f"{_trials(len(other))} at {field} = {_listed(other)} (the paper's is {_setting(paper)}: select the others "
        f"with --where {field}={_setting(paper)})"
        if len(other)
        else None
    )


def _other_targets(trials) -> str | None:
    """The LoRA trials whose method.lora_targets are not their method's preset: a variant the paper did not run,
    or another method's run, which Tables 1-3 would show under its method's name."""
    lora = trials[trials["method"].isin(list(LORA_PRESETS))]
    targets = [effective_targets(t.method, t.lora_targets) for t in lora.itertuples()]
    other = lora[[t != "+".join(LORA_PRESETS[m]) for t, m in zip(targets, lora["method"])]]
    if other.empty:
        return None
    found = other.groupby(["method", "lora_targets"]).size()
    listed = "; ".join(f"{m} with {t} ({_trials(n)}): {_variant_of(m, t)}" for (m, t), n in found.items())
    presets = ", ".join(f"{label} ({'+'.join(groups)})" for groups, (label, _) in PAPER_VARIANTS.items())
    return (
        f"method.lora_targets other than the method's preset ({listed}); the paper's LoRA variants are the "
        f"presets {presets}, each under its own method: select the others with --where method.lora_targets=null"
    )


def _variant_of(method: str, targets: str) -> str:
    """How ``_other_targets`` names a method's run with ``targets``: "LoRA-AM, no paper variant"."""
    label = variant(method, targets)[0]
    same = next((m for m, groups in LORA_PRESETS.items() if "+".join(groups) == targets), None)
    return f"{label}, no paper variant" if same is None else f"{label}, method {same}'s run"


def _setting(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _listed(values) -> str:
    return ", ".join(_setting(v) for v in sorted(set(values)))


def _trials(n: int) -> str:
    return f"{n} trial{'s' * (n != 1)}"


def _values(values) -> str:
    return ", ".join(str(int(v)) for v in sorted(set(values)))


def comparison(table: Table) -> Table | None:
    """Our numbers beside the published ones for every cell of a paper table (long form: key, column, ours,
    paper, difference). Cells only one side has are listed with the other side marked missing."""
    base = next((name for name in KEYS if table.name == name or table.name.startswith(f"{name}_")), None)
    if base is None or table.dataset not in (
        None,
        DP_DATASET,
    ):  # a DP table of another dataset has no published twin
        return None
    keys, paper_rows = KEYS[base], [r for r in published(base) if r["model"].startswith(OUR_MODELS)]
    ours = {tuple(r[k] for k in keys): r for r in ours_as_rows(table)}
    theirs = {tuple(r[k] for k in keys): r for r in paper_rows}
    published_columns = list(paper_rows[0]) if paper_rows else []
    values = [c for c in dict.fromkeys([*table.header, *published_columns]) if c not in keys]
    rows = []
    for key in list(theirs) + [k for k in ours if k not in theirs]:
        for column in values:
            shown, mine = _shown((ours.get(key) or {}).get(column))
            paper = (theirs.get(key) or {}).get(column, "")
            if shown == MISSING and not paper:
                continue
            a, b = number(mine) if mine else None, number(paper) if paper else None
            diff = "" if a is None or b is None else f"{a - b:+.4g}"  # ours - paper
            rows.append([*key, column, shown, paper or MISSING, diff])
    return Table(
        f"compare_{table.name}",
        f"{table.title}: ours vs published ({PAPER})",
        [*keys, "column", "ours", "paper", "difference"],
        rows,
        cells_csv=False,
    )


# --- the golden fixture ----------------------------------------------------------------------------------------


def paper_fixture(folder: str | Path, *, assets: Assets = Assets("/assets")) -> list[Path]:
    """Write one result per published VAR cell (Tables 1, 2, 3, 9, 10): the paper sweeps' configs with metrics
    equal to the published values, parameter counts that give the published counts and shares, and as cost the
    dry-run estimate (``bench.estimates.trial_estimate``: useful FLOPs, GPU hours at the assumed utilisation).
    Returns the files written (``folder/results/<id>.json``)."""
    records: dict[str, dict] = {}

    def add(config: TrialConfig, **metrics: float) -> None:
        record = records.setdefault(config.trial_id, _fixture_record(config))
        record["metrics"].update(metrics)

    params = {(r["model"], r["method"]): r for r in published("table1_fid")}
    by_label = {label: name for name, label in METHOD_LABELS.items()}
    for config in table1.sweep(assets=assets):
        row = params[(f"VAR-d{config.model.depth}", METHOD_LABELS[config.method.name])]
        pr = {
            r["method"]: r
            for r in published("table9_precision_recall")
            if r["model"] == f"VAR-d{config.model.depth}"
        }
        column = DATASET_COLUMNS[config.data.dataset]
        add(
            config,
            fid=float(row[column]),
            precision=float(pr[row["method"]][f"{column}_p"]) / 100,
            recall=float(pr[row["method"]][f"{column}_r"]) / 100,
        )
        _set_parameters(records[config.trial_id], row)
    dp = {
        (c.model.depth, c.method.name, c.privacy.augmentation_multiplicity, c.privacy.target_epsilon): c
        for c in [*table2.sweep(assets=assets), *table3.sweep(assets=assets), *table10.sweep(assets=assets)]
    }
    for r in published("table2_dp_multiplicity"):
        config = dp[
            (int(r["model"].removeprefix("VAR-d")), by_label[r["method"]], int(r["k"]), float(r["epsilon"]))
        ]
        add(config, fid=float(r["fid"]))
        _set_parameters(records[config.trial_id], params[(r["model"], r["method"])])
    for r in published("table3_dp_epsilon"):
        for column in (c for c in r if c.startswith("eps_")):
            config = dp[
                (
                    int(r["model"].removeprefix("VAR-d")),
                    by_label[r["method"]],
                    int(r["k"]),
                    float(column.removeprefix("eps_")),
                )
            ]
            add(config, fid=float(r[column]))
            _set_parameters(records[config.trial_id], params[(r["model"], r["method"])])
    variants = {label: name for name, label in VARIANT_LABELS.items()}
    for r in published("table10_dp_ablation"):
        config = dp[
            (int(r["model"].removeprefix("VAR-d")), variants[r["variant"]], int(r["k"]), float(r["epsilon"]))
        ]
        add(config, fid=float(r["fid"]))
        _set_parameters(records[config.trial_id], r)
    out = Path(folder) / "results"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for trial_id, record in sorted(records.items()):
        path = out / f"{trial_id}.json"
        path.write_text(json.dumps(record, indent=1, sort_keys=True))
        written.append(path)
    return written


def _fixture_record(config: TrialConfig) -> dict:
    images = DATASETS[config.data.dataset].train_images
    # The dry run's estimate at the datasets' published sizes and the assumed utilisation: no measured rates, so
    # a device run's refresh of bench/measured_throughput.json does not move the golden tables.
    e = trial_estimate(config, measurements=[], samplings=[])
    privacy = None
    if config.privacy is not None:
        p = config.privacy
        privacy = {
            "target_epsilon": p.target_epsilon,
            "delta": p.delta or 1 / images,
            "sampling_rate": p.sampling_rate,
            "steps": e.steps,
            "max_grad_norm": p.max_grad_norm,
            "augmentation_multiplicity": p.augmentation_multiplicity,
        }
    sample_flops = e.sample_flops_per_image * e.final_images  # as a record counts it: the final evaluation's
    cost = {
        "train_pflops": e.train_flops / 1e15,
        "sample_pflops": sample_flops / 1e15,
        "total_pflops": (e.train_flops + sample_flops) / 1e15,
        "gpu_hours": e.training_hours + e.evaluation_hours,
        "estimated": True,
    }
    return make_result(
        config,
        status="success",
        metrics={},
        privacy=privacy,
        cost=cost,
        evaluation_settings={"extractor": config.evaluation.extractor},
        environment={
            "git_commit": "fixture",
            "devices": [f"published values ({PAPER}); cost is the dry-run estimate"],
        },
        started_at="2025-07-15T00:00:00+00:00",
        finished_at="2025-07-15T00:00:00+00:00",
    )


def _set_parameters(record: dict, row: dict[str, str]) -> None:
    """Counts whose trainable share is the published one (the published counts' totals are not printed: the
    fixture puts the whole total in base_total)."""
    trainable, pct = number(row["trainable_params"]), float(row["trainable_pct"])
    record["parameters"] = {
        "trainable": int(round(trainable)),
        "base_total": trainable * 100 / pct,
        "adapter_parameters": 0,
    }
