"""A dry run checks and prints a sweep without the machinery that runs it: neither Ray nor the training libraries
(Opacus, peft) are imported (torch is, for the checkpoint header checks). Each run is a fresh interpreter, since
this test process has imported them already."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO

HEAVY = ("ray", "opacus", "peft")
# Runs `python -m bench ARGS` in this interpreter, then prints (as the last stdout line) the heavy modules it
# imported and its exit status.
PROBE = """
import json, runpy, sys
sys.argv = ["python -m bench", *json.loads(sys.argv[1])]
try:
    runpy.run_module("bench", run_name="__main__")
    status = 0
except SystemExit as exit:
    status = exit.code
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {heavy})
print(json.dumps({{"status": status, "heavy": heavy}}))
"""


def dry_run(*args: str, cwd) -> tuple[dict, str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VARSWEEP_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=set(HEAVY)), json.dumps(list(args))],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    *out, last = done.stdout.strip().splitlines() or [""]
    assert last.startswith("{"), done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(last), "\n".join(out), done.stderr


def test_a_smoke_dry_run_imports_neither_ray_opacus_nor_peft(tmp_path):
    outcome, out, err = dry_run(
        "sweep", "table1", "--smoke", "--dry-run", "--storage", str(tmp_path / "runs"), cwd=tmp_path
    )
    assert outcome["status"] == 0, err[-3000:]
    assert "9 of 9 trials to run" in out  # 6 settings, 3 of them also with the curves (d16 flowers and cub)
    assert outcome["heavy"] == []
    assert not (tmp_path / "runs").exists()


def test_a_paper_dry_run_imports_neither_ray_opacus_nor_peft(tmp_path):
    """The paper grid on an empty assets folder: every check runs (and names the missing files), nothing heavy."""
    assets = tmp_path / "assets"
    (assets / "checkpoints").mkdir(parents=True)
    (assets / "datasets").mkdir()
    outcome, out, err = dry_run(
        "sweep",
        "table1",
        "--dry-run",
        "--assets",
        str(assets),
        "--storage",
        str(tmp_path / "runs"),
        cwd=tmp_path,
    )
    assert outcome["status"] == 2 and "30 of 30 trials cannot run" in err, err[-3000:]
    assert "30 of 30 trials to run" in out  # the grid and its estimate are printed all the same
    assert outcome["heavy"] == []
