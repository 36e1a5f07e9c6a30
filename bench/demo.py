"""The embedded default (``make demo`` = ``python -m bench demo``): the ``demo`` sweep on a local Ray instance (tiny
base pre-trained offline on procedural shapes, adapted to scikit-learn's handwritten digits: base model, full
fine-tuning, LoRA, LN tuning, DP-LoRA at epsilon 1 and 8), then a summary table, the two checks that show
adaptation working (every fine-tuned model's FID is below the base model's; DP at the smallest epsilon is worse
than the same method without DP) and the analysis of the results (``STORAGE/analysis/index.html``: tables,
figures, sample grids).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from analysis.run import analyse

from .launcher import Launch, default_cache_dir, run_sweep
from .results import ResultStore
from .sweeps import build_sweep


def summary_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        c, m = r["config"], r["metrics"]
        rows.append({"trial": r["trial_id"], "method": c["method"]["name"], "epsilon": (c["privacy"] or {}).get("target_epsilon"),
                     "status": r["status"], "fid": m.get("fid"), "precision": m.get("precision"), "recall": m.get("recall"),
                     "train_pflops": r["cost"].get("train_pflops"), "train_seconds": r["cost"].get("train_seconds"),
                     "epsilon_spent": (r["privacy"] or {}).get("epsilon_rdp")})
    return rows


def demo_checks(rows: list[dict]) -> dict[str, bool]:
    """The demo's acceptance: fine-tuning beats the base model; DP at the smallest epsilon is worse than non-DP."""
    base = next(r["fid"] for r in rows if r["method"] == "base")
    tuned = [r for r in rows if r["method"] != "base" and r["epsilon"] is None]
    dp = sorted((r for r in rows if r["epsilon"] is not None), key=lambda r: r["epsilon"])
    same_method = next(r for r in tuned if r["method"] == dp[0]["method"])
    return {"every fine-tuned FID below the base model's": all(r["fid"] < base for r in tuned),
            f"DP at epsilon {dp[0]['epsilon']:g} worse than the same method without DP": dp[0]["fid"] > same_method["fid"]}


def _table(rows: list[dict]) -> str:
    head = "| method | epsilon | FID | precision | recall | epsilon spent | train PFLOPs | train s |\n|---|---|---|---|---|---|---|---|"
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    return "\n".join([head] + [f"| {r['method']} | {fmt(r['epsilon'], 'g') or 'no DP'} | {fmt(r['fid'], '.3f')} | {fmt(r['precision'], '.3f')} | "
                               f"{fmt(r['recall'], '.3f')} | {fmt(r['epsilon_spent'], '.2f')} | {fmt(r['train_pflops'], '.2e')} | "
                               f"{fmt(r['train_seconds'], '.1f')} |" for r in rows])


def run_demo(*, storage: str = "runs/demo", smoke: bool = False) -> int:
    started = time.perf_counter()
    configs = build_sweep("demo", smoke=smoke)
    launch = Launch(storage=storage, cache_dir=default_cache_dir(storage))
    outcome = run_sweep("demo-smoke" if smoke else "demo", configs, launch)
    store = ResultStore(storage)
    records = [r for r in (store.read(c.trial_id) for c in configs) if r is not None]
    rows = summary_rows(records)
    checks = demo_checks(rows) if all(r["status"] == "success" for r in rows) and len(rows) == len(configs) else {}
    analysis = analyse(storage, Path(storage) / "analysis")  # tables, figures, sample grids, report page
    report = "\n".join([f"# varsweep demo ({len(rows)} trials, {time.perf_counter() - started:.0f} s)", "", _table(rows), "",
                        *[f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in checks.items()], "",
                        f"Results: {Path(storage) / 'results'}", f"Analysis (tables, figures, sample grids): {analysis.out / 'index.html'}"])
    (Path(storage) / "summary.md").write_text(report + "\n")
    (Path(storage) / "summary.json").write_text(json.dumps({"rows": rows, "checks": checks, "sweep": outcome}, indent=1))
    print(report)
    print(f"summary: {Path(storage) / 'summary.md'}; analysis: {analysis.out / 'index.html'} ({len(analysis.tables)} tables, "
          f"{len(analysis.figures)} figures, {len(analysis.grids)} sample grids)")
    return 0 if checks and all(checks.values()) else 1
