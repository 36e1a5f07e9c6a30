"""python -m analysis RESULTS_DIR --out OUT_DIR [--compare-paper] [--extractor NAME] [--skip-invalid] [--where F=V]

Turns a sweep's results (a storage folder or its results/ folder) into the paper's tables (CSV, Markdown, LaTeX),
figures (PNG, PDF), per-trial sample grids and a report page (OUT_DIR/index.html and index.md). Imports neither
torch nor Ray. Exits 2 with a last stderr line ``error: ...`` naming the input and the problem, no traceback,
when the command line is wrong or the results cannot be analysed as asked: no or unreadable results, invalid
files (listed above that line), mixed feature extractors, several settings in one cell, a refused
--compare-paper, an output folder that cannot be written."""

from __future__ import annotations

import json
import sys

from bench.cli import Parser, number, path_text, report, run_reporting

from .load import AnalysisError
from .report import notices, summary
from .run import analyse


def main(argv: list[str] | None = None) -> int:
    return run_reporting(lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    parser = Parser(prog="python -m analysis", description=__doc__.splitlines()[0])
    parser.add_argument(
        "results_dir",
        type=path_text,
        help="a sweep's storage folder (with results/) or a folder of result JSON files",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=path_text,
        help="folder for tables/, figures/, grids/, index.html, index.md",
    )
    parser.add_argument(
        "--compare-paper",
        action="store_true",
        help="put the published numbers beside ours for the same cells",
    )
    parser.add_argument("--extractor", help="analyse only the trials evaluated with this feature extractor")
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="list and skip files that are not valid results instead of stopping",
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="keep trials whose config field (dotted, e.g. method.lora_rank=16) has this value; repeatable",
    )
    parser.add_argument(
        "--table2-epsilon",
        type=number(float, above=0),
        default=10.0,
        help="the epsilon of Table 2 (DP FID vs k); default 10",
    )
    parser.add_argument("--no-grids", action="store_true", help="do not draw per-trial sample grids")
    parser.add_argument(
        "--no-figures", action="store_true", help="do not draw figures (tables and report only)"
    )
    args = parser.parse_args(argv)
    try:
        analysis = analyse(
            args.results_dir,
            args.out,
            compare_paper=args.compare_paper,
            extractor=args.extractor,
            skip_invalid=args.skip_invalid,
            where=parse_where(args.where),
            table2_epsilon=args.table2_epsilon,
            grids=not args.no_grids,
            figures=not args.no_figures,
        )
    except OSError as error:  # the output folder is not writable, the disk is full: say so, no traceback
        return fail(f"cannot write the analysis to {args.out}: {error}")
    print(
        f"{summary(analysis.results)} Wrote {len(analysis.tables)} tables, {len(analysis.comparisons)} comparisons, "
        f"{len(analysis.figures)} figures, {len(analysis.grids)} sample grids."
    )
    for heading, items in notices(analysis):
        if items and items != ["None."]:
            print(f"{heading}:\n" + "\n".join(f"  {item}" for item in items))
    print(f"report: {analysis.out / 'index.html'} (and index.md)")
    return 0


def fail(message: str) -> int:
    """Exit status 2 with the reason: any listing it carries (which files, which cells) indented, then the line to
    read, ``error: ...`` (see ``bench.cli.report``)."""
    return report(message)


def parse_where(pairs: list[str]) -> dict[str, object]:
    """["method.lora_rank=16", "data.dataset=cub200"] -> {"method.lora_rank": 16, "data.dataset": "cub200"}
    (values are JSON where they parse as JSON: numbers, true/false, null; else strings)."""
    out = {}
    for pair in pairs:
        field, sep, text = pair.partition("=")
        if not sep or not field:
            raise AnalysisError(f"--where {pair!r}: expected FIELD=VALUE, e.g. method.lora_rank=16")
        if (
            field in out
        ):  # every condition must hold, so a second value would select nothing (or hide the first)
            raise AnalysisError(f"--where {field} given twice: each field takes one value")
        try:
            out[field] = json.loads(text)
        except json.JSONDecodeError:
            out[field] = text
    return out


if __name__ == "__main__":
    sys.exit(main())
