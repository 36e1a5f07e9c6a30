"""The command line (`python -m bench`) without Ray: list, dry run, status; and the demo's acceptance checks."""
from __future__ import annotations

import pytest

from bench.__main__ import main
from bench.demo import demo_checks, summary_rows
from bench.results import ResultStore
from bench.schema import make_result
from bench.sweeps import build_sweep


def test_list_shows_every_sweep(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("demo", "table1", "table2", "table3", "table9", "table10", "convergence", "second_seed"))
    assert "30 trials (6 smoke)" in out


def test_dry_run_checks_and_prints_without_running(tmp_path, capsys):
    storage = tmp_path / "runs"
    assert main(["sweep", "demo", "--smoke", "--dry-run", "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    assert "6 of 6 trials to run" in out and "pending" in out
    assert not list((storage / "results").glob("*.json"))
    assert main(["sweep", "table2", "--dry-run", "--assets", str(tmp_path / "nothing"), "--storage", str(storage)]) == 2
    captured = capsys.readouterr()
    assert "8 of 8 trials to run" in captured.out and "cannot run; nothing was started" in captured.err


def test_status_reads_results(tmp_path, capsys):
    configs = build_sweep("demo", smoke=True)
    store = ResultStore(tmp_path)
    store.write(make_result(configs[0], status="success", metrics={"fid": 12.5}))
    store.write(make_result(configs[1], status="failed", error="RuntimeError: out of memory"))
    assert main(["status", "demo", "--smoke", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "12.50" in out and "1 failed, 4 pending, 1 success of 6 trials" in out


def _record(config, fid):
    return make_result(config, status="success", metrics={"fid": fid, "precision": 0.1, "recall": 0.1})


@pytest.mark.parametrize("dp_fid, expected", [(15.0, True), (9.0, False)])
def test_demo_checks(dp_fid, expected):
    configs = build_sweep("demo", smoke=True)  # base, full, lora, ln_tuning, dp-lora eps 1, dp-lora eps 8
    fids = [28.0, 8.5, 9.9, 11.4, dp_fid, 13.2]
    checks = demo_checks(summary_rows([_record(c, f) for c, f in zip(configs, fids)]))
    assert list(checks.values()) == [True, expected]
    worse_base = demo_checks(summary_rows([_record(c, f) for c, f in zip(configs, [10.0, 8.5, 9.9, 11.4, 15.0, 13.2])]))
    assert list(worse_base.values())[0] is False


def test_result_store_on_a_uri(tmp_path):
    """Storage given as a URI goes through pyarrow's filesystems (here file://; s3:// and gs:// work the same way)."""
    configs = build_sweep("demo", smoke=True)
    store = ResultStore(f"file://{tmp_path}/bucket")
    store.write(make_result(configs[0], status="success", metrics={"fid": 3.0}))
    store.write(make_result(configs[0], status="success", metrics={"fid": 2.0}))  # a rerun replaces, never duplicates
    assert [r["metrics"]["fid"] for r in store.all()] == [2.0] and store.status(configs[1].trial_id) is None
    assert (tmp_path / "bucket" / "results" / f"{configs[0].trial_id}.json").is_file()
