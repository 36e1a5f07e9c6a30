"""The paper's tables (1, 2, 3, 9, 10) plus a compute, a privacy and a class-accuracy table, built from the trials
DataFrame. Audited trials (config ``audit``) are their own experiment, since they train on canaries besides the
dataset: the privacy_audit, compute (in rows of their own) and privacy tables show them, the utility tables leave
them out and say so. A DP trial that no table's layout has room for (DP full fine-tuning) is named, with its FID, in
a note under its dataset's first DP table and in the report (``dp_in_no_table``).

A table is key columns (strings) and value cells; a cell aggregates the trials that fall in it over seeds (mean,
sample std, count) and remembers how many of its trials failed, so a gap is shown as missing or failed, never
filled in. Each table renders as CSV (the paper's layout, means only), a long CSV with every cell's mean, std and
counts, Markdown and LaTeX.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.estimates import ATTENTION_NOTE, FEATURES_NOTE
from bench.schema import AUDIT_MECHANISMS

from .metrics import (
    DATASET_COLUMNS,
    METHOD_LABELS,
    METRICS,
    VARIANT_LABELS,
    format_count,
    format_percent_share,
    variant,
)

MISSING, FAILED, NO_VALUE = "—", "failed", "no value"
TABLE1_METHODS = ("full", "lora", "ln_tuning")
TABLE2_METHODS = ("lora", "ln_tuning")
ABLATION_METHODS = ("lora_attention", "lora_mlp")


@dataclass(frozen=True)
class Cell:
    """Aggregate of one table cell over seeds, in display units: ``n`` successful trials with a value,
    ``failed`` failed ones, ``no_value`` successful ones that recorded no (or a non-finite) value. ``std``:
    their sample standard deviation, None for fewer than two values (undefined) or a cell that is not a mean.
    ``detail``: text shown after the value where the value alone does not say what it is (" (max of 3)"),
    never in the CSV."""

    mean: float | None
    std: float | None
    n: int
    failed: int
    formatter: Callable[[float], str]
    no_value: int = 0
    detail: str = ""

    def csv(self) -> str:
        return "" if self.mean is None else self.formatter(self.mean)

    def text(self, *, plus_minus: str = "±") -> str:
        if self.mean is None:
            return " / ".join([FAILED] * bool(self.failed) + [NO_VALUE] * bool(self.no_value)) or MISSING
        notes = ([f"{self.failed} failed"] if self.failed else []) + (
            [f"{self.no_value} without value"] if self.no_value else []
        )
        shown = self.formatter(self.mean)
        if self.std is not None:  # a spread of two or more values (a median's cell has none)
            shown += f" {plus_minus} {self.formatter(self.std)} (n={self.n})"
        return shown + self.detail + (f" ({', '.join(notes)})" if notes else "")


@dataclass
class Table:
    """``name``: file stem (the paper's CSV name where there is one); ``header``: column names; ``rows``: key
    strings followed by Cells."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str | Cell]]
    notes: list[str] = field(default_factory=list)
    dataset: str | None = None  # the one dataset of a DP table
    cells_csv: bool = True  # write the per-cell CSV (a comparison's cells are its table's: written there)

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.header)
        writer.writerows([[c.csv() if isinstance(c, Cell) else c for c in row] for row in self.rows])
        return out.getvalue()

    def long_csv(self) -> str:
        """Every value cell on its own line: key columns, column, mean, std, n, failed."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        keys = [i for i, c in enumerate(self.rows[0]) if not isinstance(c, Cell)] if self.rows else []
        writer.writerow(
            [self.header[i] for i in keys] + ["column", "mean", "std", "n", "failed", "without_value"]
        )
        for row in self.rows:
            for i, c in enumerate(row):
                if isinstance(c, Cell):
                    writer.writerow(
                        [row[j] for j in keys]
                        + [self.header[i], _num(c.mean), _num(c.std), c.n, c.failed, c.no_value]
                    )
        return out.getvalue()

    def markdown(self) -> str:
        lines = [
            f"### {self.title}",
            "",
            "| " + " | ".join(self.header) + " |",
            "|" + "---|" * len(self.header),
        ]
        lines += [
            "| " + " | ".join(c.text() if isinstance(c, Cell) else c for c in row) + " |" for row in self.rows
        ]
        return "\n".join(lines + ([""] + [f"- {n}" for n in self.notes] if self.notes else []) + [""])

    def latex(self) -> str:
        spec = "".join(
            "r" if any(isinstance(r[i], Cell) for r in self.rows) else "l" for i in range(len(self.header))
        )
        body = [
            " & ".join(
                _tex(c.text(plus_minus="$\\pm$") if isinstance(c, Cell) else c, raw=isinstance(c, Cell))
                for c in row
            )
            + r" \\"
            for row in self.rows
        ]
        return "\n".join(
            [
                r"\begin{table}[t]",
                r"\centering",
                f"\\caption{{{_tex(self.title)}}}",
                f"\\begin{{tabular}}{{{spec}}}",
                r"\toprule",
                " & ".join(_tex(h) for h in self.header) + r" \\",
                r"\midrule",
                *body,
                r"\bottomrule",
                r"\end{tabular}",
                r"\end{table}",
                "",
            ]
        )

    def renderers(self) -> dict[str, Callable[[], str]]:
        """File suffix -> renderer; the long per-cell CSV only where the table has aggregated cells."""
        out = {".csv": self.csv, ".md": self.markdown, ".tex": self.latex}
        if self.cells_csv and any(isinstance(c, Cell) for row in self.rows for c in row):
            out["_cells.csv"] = self.long_csv
        return out

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        outputs = {suffix: render() for suffix, render in self.renderers().items()}
        paths = []
        for suffix, text in outputs.items():
            path = folder / f"{self.name}{suffix}"
            path.write_text(text)
            paths.append(path)
        return paths


# The published tables (arXiv 2507.11441), as CSV files in the paper's layout.
PAPER_DIR = Path(__file__).parent / "paper"
DP_DATASET = "flowers102"  # the paper's DP tables (2, 3, 10) are on Oxford Flowers
DP_TABLES = ("table2_dp_multiplicity", "table3_dp_epsilon", "table10_dp_ablation")


def published(name: str) -> list[dict[str, str]]:
    with open(PAPER_DIR / f"{name}.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# A row of a paper table: model, method (Table 10: variant), k, epsilon, as the tables print them (None: no such key).
RowKey = tuple[str, str, str | None, str | None]


def _published_keys(name: str) -> list[RowKey]:
    """The rows of published table ``name`` (Table 3: its cells, one per epsilon column)."""
    keys = []
    for row in published(name):
        epsilons = [c.removeprefix("eps_") for c in row if c.startswith("eps_") and row[c]] or [
            row.get("epsilon")
        ]
        keys += [(row["model"], row.get("method") or row["variant"], row.get("k"), e) for e in epsilons]
    return keys


def _row_name(model: str, method: str, k: str | None = None, epsilon: str | None = None) -> str:
    """How a note names a row: "VAR-d20 LNTuning", "VAR-d20 LoRA k=32 (epsilon 10)"."""
    return f"{model} {method}" + (f" k={k}" if k else "") + (f" (epsilon {epsilon})" if epsilon else "")


def _left_out(why: str, rows: list[RowKey]) -> list[str]:
    """The note naming the rows a table leaves out and why (none left out: no note)."""
    return [f"not in the table, {why}: {'; '.join(_row_name(*row) for row in rows)}"] if rows else []


def _unrun_published(
    name: str, shown: set[tuple], trials: pd.DataFrame, *, epsilon: str | None = None
) -> list[str]:
    """The note naming the rows of published table ``name`` that this table lacks: a reader without
    --compare-paper learns what these results have no trial for. Only for the models of ``trials`` (the table's
    own) on the paper's datasets for the table, so another model or dataset (the digits demo) gets no note.
    ``shown``: the table's rows or cells as a ``RowKey`` or a prefix of one (a row another note names);
    ``epsilon``: the only one a table at one epsilon (Table 2) can show."""
    datasets = {DP_DATASET} if name in DP_TABLES else set(DATASET_COLUMNS)
    if not datasets & set(trials["dataset"]):
        return []
    models = set(trials["model"])
    missing = [
        key
        for key in _published_keys(name)
        if key[0] in models
        and epsilon in (None, key[3])
        and not any(key[:n] in shown for n in range(2, len(key) + 1))
    ]
    return _left_out("published but without a trial here", missing)


PARAMETERS_NOTE = (
    "trainable_params / trainable_pct: median over the row's trials; the new class embedding included (the "
    "published code left it untrained); share of the adapted model's parameters (base plus adapter modules, as "
    "peft and the paper count them)"
)


def _num(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _tex(text: str, *, raw: bool = False) -> str:
    if raw:  # cells carry their own $\pm$; only the dash and the other specials need care
        return text.replace(MISSING, "--").replace("%", r"\%").replace("_", r"\_")
    for char, escaped in (
        ("\\", r"\textbackslash{}"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("_", r"\_"),
        ("#", r"\#"),
        ("$", r"\$"),
    ):
        text = text.replace(char, escaped)
    return text.replace(MISSING, "--").replace("±", r"$\pm$")


def cell(trials: pd.DataFrame, metric: str, *, formatter: Callable[[float], str] | None = None) -> Cell:
    """Aggregate ``metric`` over the successful trials of ``trials``; failed trials and successful ones without a
    finite value are counted and shown, never averaged in."""
    values = trials[trials["status"] == "success"][metric].astype(float)
    ok = values[values.map(math.isfinite)]
    failed, no_value = int((trials["status"] != "success").sum()), len(values) - len(ok)
    fmt = formatter or METRICS[metric].format
    if ok.empty:
        return Cell(None, None, 0, failed, fmt, no_value)
    mean, spread = float(ok.mean()), float(ok.std(ddof=1)) if len(ok) > 1 else None
    # Equal values (non-DP seeds' counted FLOPs) have a float std of ~1e-15: no spread to print.
    if spread is not None and spread <= 1e-9 * abs(mean):
        spread = 0.0
    return Cell(mean, spread, len(ok), failed, fmt, no_value)


def _eps(value: float) -> str:
    return f"{value:g}"


def _method_order(methods) -> list[str]:
    return sorted(set(methods), key=lambda m: list(METHOD_LABELS).index(m))


def _models(trials: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(trials.sort_values("depth")["model"]))


def dataset_columns(trials: pd.DataFrame) -> list[str]:
    """The paper's dataset columns in its order where any paper dataset is present, then any other dataset."""
    present = list(dict.fromkeys(trials["dataset"]))
    paper = [d for d in DATASET_COLUMNS if d in present]
    return (list(DATASET_COLUMNS) if paper else []) + [d for d in present if d not in DATASET_COLUMNS]


def _params(group: pd.DataFrame) -> list[Cell]:
    """Trainable parameters and share of a row: the median over its trials (class embeddings differ slightly
    with the class count), as the paper prints them; n counts those trials, and a median has no std."""
    ok = group[group["status"] == "success"]
    return [
        _median(ok[column].dropna(), formatter)
        for column, formatter in (("trainable_params", format_count), ("trainable_pct", format_percent_share))
    ]


def _median(values: pd.Series, formatter: Callable[[float], str]) -> Cell:
    return Cell(float(values.median()) if len(values) else None, None, len(values), 0, formatter)


# The trials each utility table draws on (before its split by dataset): what the builders select, and how
# ``all_tables`` counts the audited trials that a table leaves out.
def in_table1(trials: pd.DataFrame) -> pd.Series:
    return ~trials["dp"]


def in_table9(trials: pd.DataFrame) -> pd.Series:
    return ~trials["dp"] & (trials["method"] != "base")


def in_table2(trials: pd.DataFrame, epsilon: float) -> pd.Series:
    return trials["dp"] & trials["method"].isin(TABLE2_METHODS) & (trials["epsilon"] == epsilon)


def in_table3(trials: pd.DataFrame) -> pd.Series:
    return trials["dp"]


def in_table10(trials: pd.DataFrame) -> pd.Series:
    return trials["dp"] & trials["method"].isin(VARIANT_LABELS)


def in_class_accuracy(trials: pd.DataFrame) -> pd.Series:
    """Every trial of a dataset where some trial recorded class accuracy."""
    scored = trials.loc[trials["class_accuracy"].map(math.isfinite), "dataset"]
    return trials["dataset"].isin(set(scored))


def _in_table3_rows(trials: pd.DataFrame) -> pd.Series:
    """The DP trials Table 3 shows or names, per dataset: those of a (model, method, k) run at two or more
    epsilons, and those of one run at a single epsilon whose method and k has such a row (its note names them)."""
    dp = trials[in_table3(trials)]
    multi = dp.groupby(["dataset", "model", "method", "k"])["epsilon"].transform("nunique") >= 2
    rowed = set(zip(dp.loc[multi, "dataset"], dp.loc[multi, "method"], dp.loc[multi, "k"]))
    named = [key in rowed for key in zip(dp["dataset"], dp["method"], dp["k"])]
    return pd.Series(trials.index.isin(dp.index[named]), index=trials.index)


def _in_table10_rows(trials: pd.DataFrame) -> pd.Series:
    """The DP trials Table 10 shows: a variant's at a (dataset, model, epsilon, k) where a LoRA variant ran."""
    dp = trials[in_table10(trials)]
    ablation = dp[dp["method"].isin(ABLATION_METHODS)]
    settings = set(zip(ablation["dataset"], ablation["model"], ablation["epsilon"], ablation["k"]))
    shown = [key in settings for key in zip(dp["dataset"], dp["model"], dp["epsilon"], dp["k"])]
    return pd.Series(trials.index.isin(dp.index[shown]), index=trials.index)


def dp_in_no_table(trials: pd.DataFrame, *, table2_epsilon: float = 10.0) -> dict[str, str]:
    """Dataset -> the note naming its DP trials that no utility table shows nor names (e.g. DP full fine-tuning,
    which the paper's DP tables never printed, or LNTuning at an epsilon other than Table 2's), so that no result
    is lost silently. The paper-shaped tables keep the published layout; the note sits under the dataset's first
    DP table and in the report's notices. Audited trials aside: the privacy_audit table shows them."""
    plain = trials[~trials["audited"]]
    shown = (
        in_table2(plain, table2_epsilon)
        | _in_table3_rows(plain)
        | _in_table10_rows(plain)
        | in_class_accuracy(plain)
    )
    left = plain[plain["dp"] & ~shown].sort_values(["depth", "method", "epsilon", "k"], key=_table_order)
    why = (
        f"DP runs outside Table 2 (LoRA and LNTuning at epsilon {_eps(table2_epsilon)}), Table 3 (a model, "
        "method and k run at two or more epsilons) and Table 10 (where a LoRA variant ran)"
    )
    return {
        dataset: f"in no table, {why}: {'; '.join(_fid_of_rows(group))}"
        for dataset, group in left.groupby("dataset", sort=False)
    }


def _table_order(column: pd.Series) -> pd.Series:
    """Methods in their table order, any other column as it is (a ``sort_values`` key)."""
    return column.map(list(METHOD_LABELS).index) if column.name == "method" else column


def _fid_of_rows(trials: pd.DataFrame) -> list[str]:
    """ "VAR-d16 FFT k=1 (epsilon 10): FID 55.50" per setting of ``trials`` (seeds aggregated as in a table)."""
    keys = ["model", "method", "k", "epsilon"]
    return [
        f"{_row_name(model, METHOD_LABELS[method], str(k), _eps(epsilon))}: FID {cell(group, 'fid').text()}"
        for (model, method, k, epsilon), group in trials.groupby(keys, sort=False)
    ]


def _model_method_groups(trials: pd.DataFrame):
    """(model, method, that row's trials) in table order: model depth, then the methods' table order."""
    for model in _models(trials):
        for method in _method_order(trials[trials["model"] == model]["method"]):
            yield model, method, trials[(trials["model"] == model) & (trials["method"] == method)]


def table1(trials: pd.DataFrame) -> list[Table]:
    """FID per model x method (rows) x dataset (columns), non-DP trials, with trainable parameters and share."""
    plain = trials[in_table1(trials)]
    if plain.empty:
        return []
    datasets = dataset_columns(plain)
    rows = [
        [
            model,
            METHOD_LABELS[method],
            *[cell(group[group["dataset"] == d], "fid") for d in datasets],
            *_params(group),
        ]
        for model, method, group in _model_method_groups(plain)
    ]
    header = [
        "model",
        "method",
        *[DATASET_COLUMNS.get(d, d) for d in datasets],
        "trainable_params",
        "trainable_pct",
    ]
    return [
        Table(
            "table1_fid",
            "Table 1: FID of non-private adaptation (lower is better)",
            header,
            rows,
            notes=[PARAMETERS_NOTE, *_unrun_published("table1_fid", {tuple(r[:2]) for r in rows}, plain)],
        )
    ]


def table9(trials: pd.DataFrame) -> list[Table]:
    """Precision and recall (percent, k = 3 nearest neighbours) of the Table 1 trials."""
    plain = trials[in_table9(trials)]
    if plain.empty:
        return []
    datasets = dataset_columns(plain)
    rows = [
        [
            model,
            METHOD_LABELS[method],
            *[
                cell(group[group["dataset"] == d], metric)
                for d in datasets
                for metric in ("precision", "recall")
            ],
        ]
        for model, method, group in _model_method_groups(plain)
    ]
    header = ["model", "method", *[f"{DATASET_COLUMNS.get(d, d)}_{s}" for d in datasets for s in ("p", "r")]]
    return [
        Table(
            "table9_precision_recall",
            "Table 9: precision and recall (%) of non-private adaptation",
            header,
            rows,
            notes=_unrun_published("table9_precision_recall", {tuple(r[:2]) for r in rows}, plain),
        )
    ]


def _per_dataset(trials: pd.DataFrame, build: Callable[[pd.DataFrame, str], Table | None]) -> list[Table]:
    """DP tables are per dataset; with one dataset the file keeps the paper's name, else gets a suffix."""
    datasets = list(dict.fromkeys(trials["dataset"]))
    tables = []
    for dataset in datasets:
        table = build(trials[trials["dataset"] == dataset], dataset)
        if table is not None:
            table.dataset, table.title = dataset, f"{table.title} [{dataset}]"
            if len(datasets) > 1:
                table.name = f"{table.name}_{dataset}"
            tables.append(table)
    return tables


def table2(trials: pd.DataFrame, *, epsilon: float = 10.0) -> list[Table]:
    """DP FID vs augmentation multiplicity k at one epsilon (LoRA and LNTuning)."""
    dp = trials[in_table2(trials, epsilon)]

    def build(group: pd.DataFrame, dataset: str) -> Table | None:
        rows = [
            [model, METHOD_LABELS[method], _eps(epsilon), str(k), cell(sub[sub["k"] == k], "fid")]
            for model, method, sub in _model_method_groups(group)
            for k in sorted(set(sub["k"]))
        ]
        return (
            Table(
                "table2_dp_multiplicity",
                f"Table 2: DP FID vs augmentation multiplicity k at epsilon {_eps(epsilon)}",
                ["model", "method", "epsilon", "k", "fid"],
                rows,
                notes=_unrun_published(
                    "table2_dp_multiplicity",
                    {(r[0], r[1], r[3], r[2]) for r in rows},
                    group,
                    epsilon=_eps(epsilon),
                ),
            )
            if rows
            else None
        )

    return _per_dataset(dp, build)


def table3(trials: pd.DataFrame) -> list[Table]:
    """DP FID vs epsilon: one row per (model, method, k) run at two or more epsilons. A (model, method, k) run at one
    epsilon only whose method and k have a row (a sweep cut short at one depth) is named in a note, not dropped
    silently."""
    dp = trials[in_table3(trials)]

    def build(group: pd.DataFrame, dataset: str) -> Table | None:
        run_at = group.groupby(["model", "method", "k"])["epsilon"].unique()
        keys = [key for key, epsilons in run_at.items() if len(epsilons) >= 2]
        if not keys:
            return None
        methods = {(method, k) for _, method, k in keys}
        single = [
            (model, METHOD_LABELS[method], str(k), _eps(e[0]))
            for (model, method, k), e in run_at.items()
            if len(e) == 1 and (method, k) in methods
        ]
        epsilons = sorted(set(group[group.set_index(["model", "method", "k"]).index.isin(keys)]["epsilon"]))
        rows = []
        for model, method, k in sorted(
            keys,
            key=lambda key: (
                group[group["model"] == key[0]]["depth"].iloc[0],
                list(METHOD_LABELS).index(key[1]),
                key[2],
            ),
        ):
            sub = group[(group["model"] == model) & (group["method"] == method) & (group["k"] == k)]
            rows.append(
                [
                    model,
                    METHOD_LABELS[method],
                    str(k),
                    *[cell(sub[sub["epsilon"] == e], "fid") for e in epsilons],
                ]
            )
        # the cells shown, and the rows named as run at one epsilon (their other published cells go unnamed)
        shown = {(*row[:3], _eps(e)) for row in rows for e in epsilons} | {row[:3] for row in single}
        return Table(
            "table3_dp_epsilon",
            "Table 3: DP FID vs privacy budget epsilon",
            ["model", "method", "k", *[f"eps_{_eps(e)}" for e in epsilons]],
            rows,
            notes=[
                *_left_out("run at one epsilon only", single),
                *_unrun_published("table3_dp_epsilon", shown, group),
            ],
        )

    return _per_dataset(dp, build)


def table10(trials: pd.DataFrame) -> list[Table]:
    """DP LoRA ablation: every method at each (model, epsilon, k) where an attention-only or MLP-only LoRA ran."""
    dp = trials[in_table10(trials)]

    def build(group: pd.DataFrame, dataset: str) -> Table | None:
        settings = (
            group[group["method"].isin(ABLATION_METHODS)][["depth", "model", "epsilon", "k"]]
            .drop_duplicates()
            .sort_values(["depth", "epsilon", "k"])
        )
        rows = []
        for _, s in settings.iterrows():
            at = group[
                (group["model"] == s["model"]) & (group["epsilon"] == s["epsilon"]) & (group["k"] == s["k"])
            ]
            for method, (label, targets) in _variants(at):
                sub = at[at["method"] == method]
                rows.append(
                    [
                        s["model"],
                        label,
                        targets,
                        _eps(s["epsilon"]),
                        str(s["k"]),
                        cell(sub, "fid"),
                        *_params(sub),
                    ]
                )
        return (
            Table(
                "table10_dp_ablation",
                "Table 10: which layers DP LoRA adapts",
                ["model", "variant", "targets", "epsilon", "k", "fid", "trainable_params", "trainable_pct"],
                rows,
                notes=[
                    PARAMETERS_NOTE,
                    *_unrun_published("table10_dp_ablation", {(r[0], r[1], r[4], r[3]) for r in rows}, group),
                ],
            )
            if rows
            else None
        )

    return _per_dataset(dp, build)


def _variants(trials: pd.DataFrame) -> list[tuple[str, tuple[str, str]]]:
    """(method, its (variant, targets)) of each method of ``trials``, named by the groups it adapts (one setting per
    method and cell, ``load``), in the paper's variant order, any other variant after them."""
    named = {
        t.method: variant(t.method, t.lora_targets) for t in trials.drop_duplicates("method").itertuples()
    }
    order = list(VARIANT_LABELS.values())
    return sorted(named.items(), key=lambda item: (_index(order, item[1][0]), item[1]))


def _index(order: list[str], value: str) -> int:
    return order.index(value) if value in order else len(order)


COMPUTE_METRICS = (
    "train_pflops",
    "sample_pflops",
    "gpu_hours",
    "rows_per_second",
    "mfu",
    "peak_memory_gib",
    "train_seconds",
)


def compute_table(trials: pd.DataFrame) -> list[Table]:
    """Training and sampling compute per model x dataset x method x privacy setting (mean over seeds). Audited
    trials train on canaries besides the dataset, so their cost is not the setting's: they get rows of their own
    (per canary count, after the setting's row), as every other table keeps them apart."""
    if trials.empty:
        return []
    keys = ["depth", "model", "dataset", "method", "epsilon", "k", "audit_canaries"]
    keyed = []
    for key, group in trials.groupby(keys, dropna=False):
        depth, model, dataset, method, epsilon, k, canaries = key
        dp, audited = not math.isnan(epsilon), not math.isnan(canaries)
        keyed.append(
            (
                (
                    depth,
                    dataset,
                    list(METHOD_LABELS).index(method),
                    dp,
                    epsilon if dp else 0.0,
                    k,
                    audited,
                    canaries if audited else 0.0,
                ),
                [
                    model,
                    dataset,
                    METHOD_LABELS[method] + (f" (audited, {canaries:.0f} canaries)" if audited else ""),
                    _eps(epsilon) if dp else "no DP",
                    str(k),
                    *[cell(group, m) for m in COMPUTE_METRICS],
                    _cost_source(group["cost_estimated"]),
                    _devices(group),
                ],
            )
        )
    rows = [row for _, row in sorted(keyed, key=lambda item: item[0])]
    header = [
        "model",
        "dataset",
        "method",
        "epsilon",
        "k",
        "train_pflops",
        "sample_pflops",
        "gpu_hours",
        "rows_per_second",
        "mfu_pct",
        "peak_memory_gib",
        "train_seconds",
        "cost",
        "devices",
    ]
    return [
        Table(
            "compute",
            "Compute: training and sampling PFLOPs (totals, not rates), GPU hours, throughput, MFU, peak memory",
            header,
            rows,
            notes=[
                "PFLOPs = 1e15 floating-point operations counted by PyTorch's FLOP counter over the rows actually trained "
                "(norms, softmax, element-wise ops and the optimiser are not counted); a DP trial's include its "
                "per-example clipping products, which depend on the clipping mode (over the non-DP step on the same "
                "rows: book-keeping under 0.5%, Opacus hooks up to 31% for full fine-tuning and 1-9% for LoRA, ghost "
                "clipping 86-141%; scripts/benchmark_clipping_flops.py): compare DP rows within one mode",
                f"sampling PFLOPs count generation and decoding; not {FEATURES_NOTE}",
                ATTENTION_NOTE,
                "MFU against the device's dense bf16 peak; empty on CPUs and unknown GPUs",
                "rows/s counts training rows, one per view of an example: a DP trial with k augmentation views trains "
                "k rows per example (examples/s = rows/s / k), counted at its expected Poisson batch",
                DEVICES_NOTE,
                *([AUDITED_COMPUTE_NOTE] if trials["audited"].any() else []),
                *([ESTIMATED_COMPUTE_NOTE] if trials["cost_estimated"].any() else []),
            ],
        )
    ]


def _cost_source(estimated: pd.Series) -> str:
    """Whether a row's trials measured their cost: a mean over measured and estimated records is neither."""
    return "estimated" if estimated.all() else "partly estimated" if estimated.any() else "measured"


def _devices(group: pd.DataFrame) -> str:
    """The hardware of a row's successful measured trials ("NVIDIA H100 80GB HBM3 (1 worker)"), "mixed: A + B"
    where they ran on different hardware, the missing mark where none measured its cost."""
    measured = group[(group["status"] == "success") & ~group["cost_estimated"]]
    found = sorted(set(map(_hardware, measured["devices"], measured["workers"])))
    if len(found) > 1:
        return "mixed: " + " + ".join(found)
    return found[0] if found else MISSING


def _hardware(devices: str, workers: int) -> str:
    return f"{devices or 'unknown devices'} ({workers} worker{'s' * (workers != 1)})"


DEVICES_NOTE = (
    "devices: the hardware of the row's measured trials (device names, DDP workers); a row marked mixed averages "
    "their throughput, MFU, memory, time and GPU hours over different hardware, so those cells are no one "
    "machine's: see each trial in trials.csv (columns devices, workers); —: no measured trial"
)


ESTIMATED_COMPUTE_NOTE = (
    "cost estimated: the records hold the dry-run estimate (bench.estimates: the datasets' published sizes and an "
    "assumed or measured utilisation), not what a trial measured; they have no throughput, MFU, memory or time"
)


AUDITED_COMPUTE_NOTE = (
    "audited rows: trials of a privacy audit, which train on about half of their m canaries besides the dataset "
    "(each is in with probability 1/2), so they cost more than the setting's own trials and are never averaged "
    "with them; see privacy_audit"
)


PRIVACY_METRICS = ("epsilon_spent", "epsilon_spent_prv", "noise_multiplier", "dp_steps")


def privacy_table(trials: pd.DataFrame) -> list[Table]:
    """One row per DP trial: target and spent epsilon, delta, sigma, q, steps, C, k."""
    dp = trials[trials["dp"]]
    if dp.empty:
        return []
    rows = []
    for _, t in dp.iterrows():
        one = dp[dp["trial_id"] == t["trial_id"]]
        rows.append(
            [
                t["model"],
                t["dataset"],
                METHOD_LABELS[t["method"]],
                str(t["k"]),
                str(t["seed"]),
                _eps(t["epsilon"]),
                *[cell(one, m) for m in PRIVACY_METRICS],
                "" if math.isnan(t["delta"]) else f"{t['delta']:.3g}",
                f"{t['sampling_rate']:.4g}",
                f"{t['dp_max_grad_norm']:g}",
                t["trial_id"][:12],
            ]
        )
    header = [
        "model",
        "dataset",
        "method",
        "k",
        "seed",
        "target_epsilon",
        "epsilon_spent_rdp",
        "epsilon_spent_prv",
        "sigma",
        "steps",
        "delta",
        "q",
        "C",
        "trial",
    ]
    return [
        Table(
            "privacy",
            "Privacy: budget spent per DP trial",
            header,
            rows,
            notes=[
                "epsilon spent is computed by both accountants from the steps actually taken; sigma was calibrated "
                "with the trial's own accountant"
            ],
        )
    ]


CLASS_ACCURACY_COLUMNS = ("fid", "precision", "recall", "kid", "class_accuracy")


def class_accuracy_table(trials: pd.DataFrame) -> list[Table]:
    """Per dataset whose trials recorded class accuracy: every setting (model, method, epsilon, k; seeds averaged)
    with FID, precision, recall, KID and the class accuracy of its generated images. Not a paper table: the
    paper's datasets have no reference classifier."""
    return _per_dataset(trials[in_class_accuracy(trials)], _class_accuracy_build)


def _class_accuracy_build(group: pd.DataFrame, dataset: str) -> Table | None:
    if not group["class_accuracy"].map(math.isfinite).any():
        return None
    rows = []
    for model, method, sub in _model_method_groups(group):
        privacy = sub["epsilon"].fillna(-1.0)  # -1: no DP, listed before the DP settings
        for epsilon, k in sorted(set(zip(privacy, sub["k"]))):
            one = sub[(privacy == epsilon) & (sub["k"] == k)]
            rows.append(
                [
                    model,
                    METHOD_LABELS[method],
                    "no DP" if epsilon < 0 else _eps(epsilon),
                    str(k),
                    *[cell(one, m) for m in CLASS_ACCURACY_COLUMNS],
                ]
            )
    header = [
        "model",
        "method",
        "epsilon",
        "k",
        "fid",
        "precision_pct",
        "recall_pct",
        "kid",
        "class_accuracy_pct",
    ]
    return Table(
        "class_accuracy",
        "Class accuracy of generated samples (%, higher is better) beside FID, precision, recall and KID",
        header,
        rows,
        notes=_classifier_notes(group),
    )


def _classifier_notes(trials: pd.DataFrame) -> list[str]:
    """What measured class accuracy: a fixed classifier's accuracy on images generated for each class (does the
    model draw the class it was asked for), with the classifier's own accuracy on real test images."""
    notes = [
        "class accuracy: the share of images generated for class c that a fixed classifier assigns to class c"
    ]
    named = trials.dropna(subset=["classifier"]).drop_duplicates(["classifier", "classifier_test_accuracy"])
    for _, t in named.iterrows():
        real = (
            ""
            if math.isnan(t["classifier_test_accuracy"])
            else f" (its accuracy on real test images: {t['classifier_test_accuracy']:.1f}%)"
        )
        notes.append(f"classifier: {t['classifier']}{real}")
    return notes


# The privacy audit's mean columns: (trials column, header, formatter); fractions shown in percent. The bound
# is not averaged: each run's bound is its own, and the table shows their maximum and the runs above their
# claim.
AUDIT_MEANS = (
    ("audit_claimed_epsilon", "claimed_epsilon_spent", lambda v: f"{v:.2f}"),
    ("audit_delta", "delta", lambda v: f"{v:.3g}"),
)
AUDIT_RATES = (
    ("audit_tpr_at_1pct_fpr", "tpr_at_1pct_fpr_pct", lambda v: f"{100 * v:.1f}"),
    ("audit_auc", "auc", lambda v: f"{v:.3f}"),
)
AUDIT_BOUND_COLUMNS = ("epsilon_lower_bound_max", "runs_above_claim")
AUDIT_NOTES = [
    "a run's epsilon lower bound: with probability at least the stated confidence, no mechanism whose "
    "epsilon (at this delta) is below this number could let the membership guesses on the run's canaries be "
    "as accurate as they were (one-run audit, Steinke, Nasr & Jagielski 2023). It bounds epsilon from "
    "below; it does not estimate it: a bound far below the claimed epsilon is expected of DP-SGD and proves "
    "no extra privacy, while a bound above the run's claimed epsilon is evidence of a bug in the training's "
    "DP mechanism or its accounting (a correct one shows it with probability at most 1 - confidence: rerun "
    "with another audit.seed to confirm)",
    "epsilon_lower_bound_max: the largest bound of the row's runs (seeds, audit seeds), not a mean: a mean "
    "of lower bounds is no lower bound, and it would hide a run above its claim. runs_above_claim: how many "
    "of the row's runs have a bound above their own claimed epsilon, of how many (no DP: none claimed). "
    "Among n runs of a correct mechanism, one lands above its claim with probability up to n x (1 - "
    "confidence). Every run's bound: trials.csv, column audit_epsilon_lower_bound; in "
    "privacy_audit_cells.csv the 'mean' of these two columns is the maximum and the count",
    "claimed_epsilon_spent: the DP ledger's epsilon spent, mean over the row's runs (no DP: none); delta: "
    "the trial's DP delta (no DP: the delta a DP trial on the same data would use)",
    "canaries: m, each in the training set with probability 1/2, never in the evaluation; score: the drop of a "
    "canary's per-token NLL from the start of fine-tuning to the released model; tpr_at_1pct_fpr_pct: the share "
    "of included canaries flagged when 1% of the excluded ones are; auc: of that score",
    "a 'broken' mechanism row is a test of the audit (clipping skipped on purpose), recorded as failed: never a "
    "result",
]


def audit_table(trials: pd.DataFrame) -> list[Table]:
    """The privacy audit: one row per audited setting (model, dataset, method, epsilon, k, canaries,
    confidence, mechanism) with, over its runs (seeds, audit seeds), the mean claimed epsilon and delta, the
    largest empirical lower bound and how many runs' bounds exceed their own claimed epsilon, and the mean TPR
    at 1% FPR and AUC. Only trials whose config asks for an audit; a failed one counts as failed in its row. A
    successful run above its claim puts a warning in the title and a first note naming the run."""
    audited = _audit_keys(trials[trials["audited"]])
    if audited.empty:
        return []
    rows = []
    for key, group in audited.groupby(AUDIT_KEYS, sort=True):
        _, model, dataset, _, method, epsilon, k, canaries, confidence, _, mechanism = key
        means = [cell(group, column, formatter=formatter) for column, _, formatter in AUDIT_MEANS]
        bounds = [_largest_bound(group), _runs_above_claim(group)]
        if epsilon < 0:  # no DP claims no epsilon: a dash, not "no value"
            means[0] = dataclasses.replace(means[0], no_value=0)
            bounds[1] = Cell(None, None, 0, bounds[1].failed, bounds[1].formatter)
        values = (
            means
            + bounds
            + [cell(group, column, formatter=formatter) for column, _, formatter in AUDIT_RATES]
        )
        rows.append(
            [
                model,
                dataset,
                METHOD_LABELS[method],
                "no DP" if epsilon < 0 else _eps(epsilon),
                str(k),
                f"{canaries:.0f}",
                f"{100 * confidence:g}%",
                mechanism,
                *values,
            ]
        )
    header = ["model", "dataset", "method", "epsilon", "k", "canaries", "confidence", "mechanism"]
    above = above_claim(audited)
    title = "Privacy audit: empirical lower bound on epsilon vs the claimed epsilon"
    if len(above):
        title += f" (WARNING: {_runs_above(len(above))})"
    return [
        Table(
            "privacy_audit",
            title,
            header
            + [name for _, name, _ in AUDIT_MEANS]
            + list(AUDIT_BOUND_COLUMNS)
            + [name for _, name, _ in AUDIT_RATES],
            rows,
            notes=_above_claim_warning(above, confidence=audited["audit_confidence"]) + AUDIT_NOTES,
        )
    ]


def _bound_format(value: float) -> str:
    return f"{value:.2f}"


def _count_format(value: float) -> str:
    return f"{value:.0f}"


def _runs_above(n: int) -> str:
    """ "1 audited run with a bound above its claimed epsilon", "2 audited runs with ... their ..." """
    return (
        f"{n} audited run{'s' * (n != 1)} with a bound above {'their' if n != 1 else 'its'} claimed epsilon"
    )


def _audit_bounds(group: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """(the successful runs of ``group`` with a finite bound, the failed runs, the successful ones without a
    bound): a failed run (a broken mechanism's included) is never a result."""
    ok = group[group["status"] == "success"]
    finite = ok["audit_epsilon_lower_bound"].astype(float).map(math.isfinite).astype(bool)
    return ok.loc[finite], int((group["status"] != "success").sum()), int((~finite).sum())


def _largest_bound(group: pd.DataFrame) -> Cell:
    """The largest bound of the row's successful runs, "(max of n)" after it where there are several."""
    ok, failed, no_value = _audit_bounds(group)
    if ok.empty:
        return Cell(None, None, 0, failed, _bound_format, no_value)
    n = len(ok)
    largest = float(ok["audit_epsilon_lower_bound"].astype(float).max())
    return Cell(largest, None, n, failed, _bound_format, no_value, detail=f" (max of {n})" if n > 1 else "")


def _runs_above_claim(group: pd.DataFrame) -> Cell:
    """How many of the row's successful runs have a bound above their own claimed epsilon, "of n" compared; a
    run without a claimed epsilon counts as without value."""
    ok, failed, no_value = _audit_bounds(group)
    claimed = ok["audit_claimed_epsilon"].astype(float)
    compared = ok.loc[claimed.map(math.isfinite).astype(bool)]
    no_value += len(ok) - len(compared)
    if compared.empty:
        return Cell(None, None, 0, failed, _count_format, no_value)
    n = len(compared)
    count = len(above_claim(compared))
    return Cell(float(count), None, n, failed, _count_format, no_value, detail=f" of {n}")


def above_claim(audited: pd.DataFrame) -> pd.DataFrame:
    """The successful audited runs whose bound exceeds their own claimed epsilon (no DP claims none): evidence
    of a bug, which the audit table and figure show run by run."""
    ok = audited[audited["status"] == "success"]
    bound, claimed = ok["audit_epsilon_lower_bound"].astype(float), ok["audit_claimed_epsilon"].astype(float)
    return ok.loc[(claimed.map(math.isfinite) & bound.map(math.isfinite) & (bound > claimed)).astype(bool)]


def _above_claim_warning(above: pd.DataFrame, *, confidence: pd.Series) -> list[str]:
    """The first note of the audit table where any run's bound exceeds its claim: which runs, by how much,
    what it means and what to do. None otherwise."""
    if above.empty:
        return []
    runs = "; ".join(
        f"{t.label} ({t.trial_id[:12]}): bound {t.audit_epsilon_lower_bound:.2f} > claimed "
        f"{t.audit_claimed_epsilon:.2f}"
        for t in above.itertuples()
    )
    chance = 1 - float(confidence.dropna().min()) if confidence.notna().any() else float("nan")
    return [
        f"WARNING: {_runs_above(len(above))}, evidence of a bug in the DP mechanism or its accounting: "
        f"{runs}. A correct mechanism puts a run there with probability at most {chance:.0%} (1 - "
        "confidence), so among many runs one may by chance: rerun the setting with another audit.seed; a "
        "bound above the claim again confirms the bug"
    ]


# A row of the audit table, in sort order: depth, then the methods' table order, no DP before DP, the mechanism
# as ``AUDIT_MECHANISMS`` lists it (a broken one after the correct run of its setting).
AUDIT_KEYS = [
    "depth",
    "model",
    "dataset",
    "_method_order",
    "method",
    "_epsilon",
    "k",
    "audit_canaries",
    "audit_confidence",
    "_mechanism_order",
    "_mechanism",
]


def _audit_keys(audited: pd.DataFrame) -> pd.DataFrame:
    """``audited`` with the sort and key columns of ``AUDIT_KEYS``; a trial that failed before recording its
    audit gets the mechanism its config implies (DP-SGD or none)."""
    mechanisms = [
        m if isinstance(m, str) else ("dp-sgd" if dp else "none")
        for m, dp in zip(audited["audit_mechanism"], audited["dp"])
    ]
    return audited.assign(
        _mechanism=mechanisms,
        _mechanism_order=[
            AUDIT_MECHANISMS.index(m) if m in AUDIT_MECHANISMS else len(AUDIT_MECHANISMS) for m in mechanisms
        ],
        _method_order=audited["method"].map(list(METHOD_LABELS).index),
        _epsilon=audited["epsilon"].fillna(-1.0),  # -1: no DP, listed before the DP settings
    )


def audited_left_out(n: int, where: str = "the utility tables") -> str:
    """Why ``n`` audited trials are not in a utility table (or figure), and where they are."""
    verb, pronoun = ("is", "it trains") if n == 1 else ("are", "they train")
    return (
        f"{n} audited trial{'s' * (n != 1)} {verb} left out of {where}: {pronoun} on canaries besides the "
        "dataset; see privacy_audit"
    )


def all_tables(trials: pd.DataFrame, *, table2_epsilon: float = 10.0) -> tuple[list[Table], list[str]]:
    """(tables, one line per table not produced, saying what data it lacks). Audited trials are their own
    experiment (they train on canaries besides the dataset, so their FIDs are not the setting's): the utility
    tables leave them out and say how many of theirs they left out; compute, privacy and privacy_audit keep them."""
    audited, plain = trials[trials["audited"]], trials[~trials["audited"]]
    tables, skipped = [], []
    in_no_table = dp_in_no_table(trials, table2_epsilon=table2_epsilon)
    for name, build, selects, why in _utility_tables(plain, table2_epsilon):
        built, left_out = build(plain), audited[selects(audited)]
        for table in built:  # a table of one dataset counts the audited trials of its dataset
            here = left_out if table.dataset is None else left_out[left_out["dataset"] == table.dataset]
            table.notes += [audited_left_out(len(here))] if len(here) else []
            # the first DP table of a dataset names its DP trials that no table shows
            if name in DP_TABLES and table.dataset in in_no_table:
                table.notes.append(in_no_table.pop(table.dataset))
        tables += built
        if not built:
            skipped.append(
                f"{name}: {why}" + (f" ({audited_left_out(len(left_out))})" if len(left_out) else "")
            )
    for name, build, why in OTHER_TABLES:
        built = build(trials)
        tables += built
        skipped += [] if built else [f"{name}: {why}"]
    return tables, skipped


def _utility_tables(plain: pd.DataFrame, table2_epsilon: float) -> list[tuple]:
    """(name, builder, the trials it draws on, why it may have none) of every utility table, in report order."""
    dp_epsilons = sorted(set(plain.loc[plain["dp"], "epsilon"]))
    found = (
        f" (DP trials ran at ε in {{{', '.join(_eps(e) for e in dp_epsilons)}}}; see --table2-epsilon)"
        if dp_epsilons
        else ""
    )
    return [
        ("table1_fid", table1, in_table1, "no non-DP trial"),
        # right after Table 1: every setting with all its metrics, where a classifier scored the samples
        (
            "class_accuracy",
            class_accuracy_table,
            in_class_accuracy,
            "no trial recorded class accuracy (metrics.class_accuracy)",
        ),
        (
            "table2_dp_multiplicity",
            lambda t: table2(t, epsilon=table2_epsilon),
            lambda t: in_table2(t, table2_epsilon),
            f"no DP LoRA or LNTuning trial at ε={_eps(table2_epsilon)}{found}",
        ),
        ("table3_dp_epsilon", table3, in_table3, "no DP model x method x k was run at two or more epsilons"),
        ("table9_precision_recall", table9, in_table9, "no adapted non-DP trial"),
        ("table10_dp_ablation", table10, in_table10, "no DP attention-only or MLP-only LoRA trial"),
    ]


# The tables of every trial, audited ones included: (name, builder, why it may have none).
OTHER_TABLES = [
    ("compute", compute_table, "no trial"),
    ("privacy", privacy_table, "no DP trial"),
    ("privacy_audit", audit_table, "no trial has a privacy audit (config audit)"),
]
