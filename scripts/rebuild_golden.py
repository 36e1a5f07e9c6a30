"""Rebuild the committed golden outputs of the analysis (tests/golden/paper/): the tables regenerated from a
results fixture whose metrics equal the published values (analysis.paper.paper_fixture).

Usage: python scripts/rebuild_golden.py   (then review the diff: a change here changes what users' tables look like)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from analysis.paper import paper_fixture
from analysis.run import analyse

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "paper"


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        paper_fixture(Path(folder) / "storage")
        analysis = analyse(
            Path(folder) / "storage", Path(folder) / "out", compare_paper=True, grids=False, figures=False
        )
        if GOLDEN.exists():
            shutil.rmtree(GOLDEN)
        GOLDEN.mkdir(parents=True)
        for path in sorted((analysis.out / "tables").iterdir()):
            shutil.copy(path, GOLDEN / path.name)
    print(f"wrote {len(list(GOLDEN.iterdir()))} files to {GOLDEN}")


if __name__ == "__main__":
    main()
