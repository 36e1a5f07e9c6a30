"""One analysis run: results folder -> tables, figures, sample grids and the report page under ``out``."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import pandas as pd

from bench.cli import probe_folder

from .figures import all_figures, sample_grid
from .load import AnalysisError, Results, load_results, storage_root
from .paper import check_comparable, comparison
from .report import TRIAL_TABLES, Analysis, markdown, page
from .tables import all_tables, dp_in_no_table


def analyse(
    results_dir: str | Path,
    out: str | Path,
    *,
    compare_paper: bool = False,
    extractor: str | None = None,
    skip_invalid: bool = False,
    where: dict[str, object] | None = None,
    table2_epsilon: float = 10.0,
    grids: bool = True,
    figures: bool = True,
    trial_ids: Collection[str] | None = None,
) -> Analysis:
    """Load every result (validated; see ``load_results``), then write ``out/tables/`` (CSV, long CSV, Markdown,
    LaTeX), ``out/figures/`` (PNG, PDF), ``out/grids/`` (one PNG per successful trial), ``out/trials.csv`` and
    ``out/trials.parquet`` (``write_trials``) and the report ``out/index.md`` / ``out/index.html``. ``compare_paper`` refuses results that cannot stand beside
    the published numbers before anything is written (AnalysisError)."""
    out = Path(out)
    results = load_results(
        results_dir, skip_invalid=skip_invalid, extractor=extractor, where=where, trial_ids=trial_ids
    )
    if compare_paper:
        check_comparable(results.trials, results.records)
    _make_folder(out)
    tables, skipped_tables = all_tables(results.trials, table2_epsilon=table2_epsilon)
    analysis = Analysis(out=out, results=results, tables=tables, skipped_tables=skipped_tables)
    # named under their dataset's first DP table too, but that table may not exist (no LoRA run under DP)
    analysis.in_no_table = [
        f"{dataset}: {note}"
        for dataset, note in dp_in_no_table(results.trials, table2_epsilon=table2_epsilon).items()
    ]
    # A folder this analysis does not write (--no-figures, --no-grids) is emptied of an earlier one's files too.
    written = {
        "tables": [path for table in tables for path in table.write(out / "tables")],
        "figures": [],
        "grids": [],
    }
    if compare_paper:
        analysis.comparisons = [c for c in (comparison(t) for t in tables) if c is not None]
        written["tables"] += [path for table in analysis.comparisons for path in table.write(out / "tables")]
    if figures:
        analysis.figures, analysis.skipped_figures = all_figures(
            results.trials,
            results.convergence,
            out / "figures",
            audit_roc=results.audit_roc,
            table2_epsilon=table2_epsilon,
        )
        written["figures"] = [path for figure in analysis.figures for path in figure.paths]
    else:
        analysis.skipped_figures = ["all figures: not asked for (--no-figures)"]
    if grids:
        analysis.grids, analysis.missing_grids = _grids(
            results, out / "grids", storage=storage_root(results_dir)
        )
        written["grids"] = list(analysis.grids.values())
    _remove_stale(out, written)
    write_trials(results.trials, out)
    (out / "index.md").write_text(markdown(analysis))
    (out / "index.html").write_text(page(analysis))
    return analysis


def write_trials(trials: pd.DataFrame, out: Path) -> None:
    """One row per trial, every column of ``load_results``' table, as ``out/trials.csv`` (for a spreadsheet) and
    ``out/trials.parquet`` (for pandas, polars, DuckDB, Spark: the column types survive, so a reader needs no
    parsing of numbers, booleans or missing values). Both are written from the same frame: the same rows."""
    trials.to_csv(out / TRIAL_TABLES[0], index=False)
    trials.to_parquet(out / TRIAL_TABLES[1], index=False)


# The files an analysis wrote into its folders, relative to ``out``: the next analysis into ``out`` removes those
# it does not write again, and never a file it did not write (a user's own file in out/figures stays).
OUTPUTS_MANIFEST = ".varsweep-outputs.json"


def _remove_stale(out: Path, written: dict[str, list[Path]]) -> None:
    """Remove what an earlier analysis into ``out`` wrote (as its manifest lists) and this one did not (a table of
    trials since left out, a figure no longer drawn, the grids of a --no-grids run), so ``out`` holds one
    analysis; then list this one's files. A file no analysis wrote is left alone."""
    manifest = out / OUTPUTS_MANIFEST
    now = sorted(
        {path.resolve().relative_to(out.resolve()).as_posix() for paths in written.values() for path in paths}
    )
    try:
        before = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: nothing is known to be ours
        before = []
    inside = out.resolve()
    for name in {str(n) for n in before} - set(now) if isinstance(before, list) else ():
        path = out / name
        # only a file under ``out``: a copied or hand-edited manifest may name "/abs/path", "../x" or a link out
        if path.is_file() and path.resolve().is_relative_to(inside):
            path.unlink()
    manifest.write_text(json.dumps({"files": now}, indent=1) + "\n")


def _make_folder(out: Path) -> None:
    """Create ``out`` and write a probe file in it: an output folder that is a file, lies under one or cannot be
    written fails here, naming itself, before any table is drawn."""
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"cannot create the output folder {out}: it is a file")
    try:
        probe_folder(out)
    except OSError as error:
        raise AnalysisError(
            f"cannot create or write in the output folder {out}: {error.strerror or error}"
        ) from error


def _grids(results: Results, folder: Path, *, storage: str | Path) -> tuple[dict[str, Path], dict[str, str]]:
    """(trial id -> grid PNG, trial id -> why no grid) for every successful trial; one trial's broken images never
    cost the others their grids or the report its page."""
    drawn, missing = {}, {}
    for trial_id in results.succeeded["trial_id"]:
        try:
            path, why = sample_grid(results.records[trial_id], folder, storage=storage)
        except Exception as error:
            path, why = None, f"drawing failed ({type(error).__name__}: {error})"
        if path is None:
            missing[trial_id] = why
        else:
            drawn[trial_id] = path
    return drawn, missing
