"""python -m analysis RESULTS_DIR --out OUT_DIR [--compare-paper] [--extractor NAME] [--skip-invalid]

Turns a sweep's results (a storage folder or its results/ folder) into the paper's tables (CSV, Markdown, LaTeX),
figures (PNG, PDF), per-trial sample grids and a report page (OUT_DIR/index.html and index.md). Imports neither
torch nor Ray. Exits 2 with the reason when the results cannot be analysed as asked (invalid files, mixed
feature extractors, no results)."""
from __future__ import annotations

import argparse
import sys

from .load import AnalysisError
from .run import analyse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", help="a sweep's storage folder (with results/) or a folder of result JSON files")
    parser.add_argument("--out", required=True, help="folder for tables/, figures/, grids/, index.html, index.md")
    parser.add_argument("--compare-paper", action="store_true", help="put the published numbers beside ours for the same cells")
    parser.add_argument("--extractor", help="analyse only the trials evaluated with this feature extractor")
    parser.add_argument("--skip-invalid", action="store_true", help="list and skip files that are not valid results instead of stopping")
    parser.add_argument("--table2-epsilon", type=float, default=10.0, help="the epsilon of Table 2 (DP FID vs k); default 10")
    parser.add_argument("--no-grids", action="store_true", help="do not draw per-trial sample grids")
    args = parser.parse_args(argv)
    try:
        analysis = analyse(args.results_dir, args.out, compare_paper=args.compare_paper, extractor=args.extractor,
                           skip_invalid=args.skip_invalid, table2_epsilon=args.table2_epsilon, grids=not args.no_grids)
    except AnalysisError as error:
        print(f"analysis: {error}", file=sys.stderr)
        return 2
    r = analysis.results
    print(f"{len(r.trials)} trials ({len(r.succeeded)} succeeded, {len(r.failed)} failed"
          + (f", {len(r.invalid)} invalid files skipped" if r.invalid else "") + f"): {len(analysis.tables)} tables, "
          f"{len(analysis.comparisons)} comparisons, {len(analysis.figures)} figures, {len(analysis.grids)} sample grids")
    for t in r.failed.itertuples():
        print(f"  failed: {t.label} ({t.trial_id[:12]})")
    print(f"report: {analysis.out / 'index.html'} (and index.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
