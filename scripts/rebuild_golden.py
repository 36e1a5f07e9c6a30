"""Rebuild the committed golden outputs of the analysis (tests/golden/paper/): the tables regenerated from a
results fixture whose metrics equal the published values (analysis.paper.paper_fixture).

Usage: python scripts/rebuild_golden.py           (then review the diff: a change here changes what users' tables look like)
       python scripts/rebuild_golden.py --check   (compare only: exit 1 naming the files that would change)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from analysis.paper import paper_fixture
from analysis.run import analyse

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "paper"


def differences(tables: Path, golden: Path) -> list[str]:
    """The file names whose text differs between the folders ``tables`` and ``golden``, or that only one holds."""
    ours = {p.name: p for p in tables.iterdir()}
    theirs = {p.name: p for p in golden.iterdir()} if golden.is_dir() else {}
    return sorted(
        name
        for name in set(ours) | set(theirs)
        if name not in ours or name not in theirs or ours[name].read_bytes() != theirs[name].read_bytes()
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=f"Without --check, {GOLDEN} is deleted and written again.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare the regenerated tables with the golden files, write nothing",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        paper_fixture(Path(folder) / "storage")
        analysis = analyse(
            Path(folder) / "storage", Path(folder) / "out", compare_paper=True, grids=False, figures=False
        )
        tables = analysis.out / "tables"
        if args.check:
            changed = differences(tables, GOLDEN)
            if changed:
                sys.exit(
                    f"{len(changed)} golden files in {GOLDEN} differ from the regenerated tables (or only one side "
                    f"has them): {', '.join(changed)}. Rebuild with `python scripts/rebuild_golden.py` if intended."
                )
            print(f"the {len(list(GOLDEN.iterdir()))} golden files in {GOLDEN} equal the regenerated tables")
            return
        if GOLDEN.exists():
            shutil.rmtree(GOLDEN)
        GOLDEN.mkdir(parents=True)
        for path in sorted(tables.iterdir()):
            shutil.copy(path, GOLDEN / path.name)
    print(f"wrote {len(list(GOLDEN.iterdir()))} files to {GOLDEN}")


if __name__ == "__main__":
    main()
