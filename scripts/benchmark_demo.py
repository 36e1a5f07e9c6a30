"""The embedded default measured as a user runs it: ``python -m bench demo`` in a subprocess with a fresh storage
(everything built: tiny base, digit classifier, token cache), its wall time, and every trial's metrics against the
demo's targets (``bench.demo``: class accuracy, precision/recall, DP below non-DP).

Usage: python scripts/benchmark_demo.py [--storage DIR (must not exist; default: a new temporary folder)] [--out docs/benchmarks.md]
Run from the repository root, as `make demo` does (relative --storage works too).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import benchmark_common

from bench.results import ResultStore
from bench.sweeps import build_sweep


def _row(record: dict) -> str:
    c, m, cost = record["config"], record["metrics"], record["cost"]
    name = c["method"]["name"] + (
        ""
        if c["privacy"] is None
        else f" DP eps {c['privacy']['target_epsilon']:g}, k {c['privacy']['augmentation_multiplicity']}"
    )
    fmt = lambda key, spec: format(m[key], spec) if isinstance(m.get(key), float) else "-"  # noqa: E731
    return (
        f"| {name} | {fmt('class_accuracy', '.3f')} | {fmt('fid', '.2f')} | {fmt('precision', '.3f')} | {fmt('recall', '.3f')} | "
        f"{fmt('kid_mean', '.3f')} ± {fmt('kid_std', '.3f')} | {cost.get('train_seconds') or 0:.0f} | {cost.get('wall_seconds') or 0:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    storage = args.storage or Path(tempfile.mkdtemp(prefix="varsweep-demo-")) / "demo"
    if storage.exists():
        sys.exit(f"{storage} exists: the benchmark measures a demo that builds everything, give a new folder")
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "bench", "demo", "--storage", str(storage)], capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if run.returncode != 0 and not (storage / "summary.json").is_file():
        _failed(run)  # it stopped before its summary: nothing to report but its own error
    summary = json.loads((storage / "summary.json").read_text())
    store = ResultStore(storage, create=False)
    records = [store.read(c.trial_id) for c in build_sweep("demo")]
    classifier = next(
        (r["evaluation_settings"] or {}).get("classifier") for r in records if r and r["evaluation_settings"]
    )
    text = "\n".join(
        [
            f"### `python -m bench demo` from scratch ({benchmark_common.stamp()})",
            "",
            f"Machine: {benchmark_common.machine()}. Script: `python scripts/benchmark_demo.py` (a fresh storage: the tiny base, the digit "
            f"classifier and the token cache are built, as on a fresh clone). Exit status {run.returncode}; "
            f"wall time {wall:.0f} s ({wall / 60:.1f} min) for the whole command, analysis included. Digit classifier "
            f"{classifier['name']}: test accuracy {classifier['test_accuracy']:.4f} on the held-out digits.",
            "",
            "| trial | class accuracy | FID | precision | recall | KID | train s | trial wall s |",
            "|---|---|---|---|---|---|---|---|",
            *[_row(r) for r in records if r is not None],
            "",
            *[f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in summary["checks"].items()],
            "",
        ]
    )
    benchmark_common.publish(text, args.out)
    if run.returncode != 0:  # a trial or a check failed: the report above says which
        _failed(run)


def _failed(run: subprocess.CompletedProcess) -> NoReturn:
    """Show the tail of what the failed demo printed and exit with its status (1 where a signal ended it)."""
    print(
        f"`python -m bench demo` exited with status {run.returncode}; the end of its output:",
        run.stdout[-3000:],
        run.stderr[-3000:],
        sep="\n",
        file=sys.stderr,
    )
    sys.exit(run.returncode if run.returncode > 0 else 1)


if __name__ == "__main__":
    main()
