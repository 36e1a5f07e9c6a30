"""One analysis run: results folder -> tables, figures, sample grids and the report page under ``out``."""
from __future__ import annotations

from pathlib import Path

from .figures import all_figures, sample_grid
from .load import load_results
from .paper import comparison
from .report import Analysis, markdown, page
from .tables import all_tables


def analyse(results_dir: str | Path, out: str | Path, *, compare_paper: bool = False, extractor: str | None = None,
            skip_invalid: bool = False, where: dict[str, object] | None = None, table2_epsilon: float = 10.0,
            grids: bool = True) -> Analysis:
    """Load every result (validated; see ``load_results``), then write ``out/tables/`` (CSV, long CSV, Markdown,
    LaTeX), ``out/figures/`` (PNG, PDF), ``out/grids/`` (one PNG per successful trial), ``out/trials.csv`` and
    the report ``out/index.md`` / ``out/index.html``."""
    out = Path(out)
    results = load_results(results_dir, skip_invalid=skip_invalid, extractor=extractor, where=where)
    out.mkdir(parents=True, exist_ok=True)
    tables, skipped_tables = all_tables(results.trials, table2_epsilon=table2_epsilon)
    analysis = Analysis(out=out, results=results, tables=tables, skipped_tables=skipped_tables)
    for table in tables:
        table.write(out / "tables")
    if compare_paper:
        analysis.comparisons = [c for c in (comparison(t) for t in tables) if c is not None]
        for table in analysis.comparisons:
            table.write(out / "tables")
    analysis.figures, analysis.skipped_figures = all_figures(results.trials, results.convergence, out / "figures")
    if grids:
        for trial_id in results.succeeded["trial_id"]:
            path, why = sample_grid(results.records[trial_id], out / "grids")
            if path is None:
                analysis.missing_grids[trial_id] = why
            else:
                analysis.grids[trial_id] = path
    results.trials.to_csv(out / "trials.csv", index=False)
    (out / "index.md").write_text(markdown(analysis))
    (out / "index.html").write_text(page(analysis))
    return analysis
