"""The benchmark scripts fail early and say why: benchmark_privacy.py --versus runs another revision's whole code in
processes of its own and any child that fails ends the run with its stderr; benchmark_demo.py shows a failed demo's
own error; demo_seed_spread.py refuses a cache folder that no demo finished in before running anything;
rebuild_golden.py parses its arguments (--help writes nothing) and can compare without writing;
benchmark_cpu_side_by_side.py --original refuses a folder that is not a checkout of the original VAR code and
builds the base models from the checkout's own package."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

import benchmark_cpu_side_by_side
import benchmark_demo
import benchmark_privacy
import demo_seed_spread
import rebuild_golden

from bench.sweeps import build_sweep
from trainables.evaluation.classifier import classifier_folder
from trainables.models.checkpoints import checkpoint_sha256
from trainables.tiny_base import tiny_base_folder, tiny_vqvae_folder

TINY_D16_LIKE = dict(depth=1, width=64, heads=1)


def _exit_message(raised: pytest.ExceptionInfo) -> str:
    return str(raised.value.code)


def test_side_by_side_refuses_a_folder_that_is_not_the_original_code_naming_what_it_lacks(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "var.py").write_text("")
    with pytest.raises(SystemExit) as raised:
        benchmark_cpu_side_by_side.check_original(tmp_path)
    message = _exit_message(raised)
    assert "not a checkout of github.com/FoundationVision/VAR" in message
    assert "dist.py" in message and "models/vqvae.py" in message
    assert "models/var.py" not in message.split("missing")[1]


def test_side_by_side_builds_the_original_models_from_the_checkout_s_own_package(tmp_path):
    """The worker imports the checkout's ``models`` and ``dist`` (not anything of this tree's), and a worker
    that fails ends the run with its stderr."""
    (tmp_path / "models").mkdir()
    for name in benchmark_cpu_side_by_side.ORIGINAL_FILES:
        (tmp_path / name).write_text("")
    (tmp_path / "models" / "var.py").write_text('raise RuntimeError("the var.py of this checkout")\n')
    tree = benchmark_cpu_side_by_side.check_original(tmp_path)
    run = benchmark_cpu_side_by_side.Run(
        batch=1,
        threads=1,
        repeats=1,
        task="generation",
        settings=benchmark_cpu_side_by_side.SAMPLING,
        base_kind="original",
    )
    with pytest.raises(RuntimeError, match="the var.py of this checkout"):
        benchmark_cpu_side_by_side.worker("base", tree, depth=2, run=run)


def test_privacy_versus_runs_the_revision_s_own_code_and_ends_with_its_error(tmp_path):
    """The other revision's ``trainables`` is the one its processes import (not this tree's, not a copy of one
    file), and a process that fails ends the run naming the revision, with its stderr."""
    tree = tmp_path / "checkout"
    (tree / "trainables").mkdir(parents=True)
    (tree / "trainables" / "__init__.py").write_text(
        'raise RuntimeError("the trainables of revision fakerev")\n'
    )
    with pytest.raises(SystemExit) as raised:
        benchmark_privacy.run_versus_row(
            dict(method="lora", k=1, rows=1), revision="fakerev", worktree=tree, steps=1, **TINY_D16_LIKE
        )
    message = _exit_message(raised)
    assert "this script could not run fakerev's code" in message
    assert str(tree) in message
    assert "RuntimeError: the trainables of revision fakerev" in message


@pytest.mark.slow  # ~10 s: a process importing torch and this tree's code
def test_privacy_a_stepping_process_builds_imports_from_its_code_and_steps_on_request():
    child = benchmark_privacy.SteppingChild(
        dict(method="lora", k=1, rows=1, dp=False),  # no DP: no noise calibration
        code=REPO,
        what="the tiny non-DP step",
        extra=("--depth", "1", "--width", "64", "--heads", "1"),
    )
    try:
        reply = child.step()
    finally:
        child.close()
    assert reply["s"] > 0
    assert child.process.returncode == 0


def test_privacy_a_stepping_process_replies_once_ready_and_once_per_request():
    steps, replies = [], io.StringIO()
    benchmark_privacy.serve_steps(
        lambda: steps.append(1), requests=io.StringIO("step\nstep\n"), replies=replies
    )
    lines = replies.getvalue().splitlines()
    assert len(steps) == 2 and len(lines) == 3
    assert all(line.startswith(benchmark_privacy.REPLY) for line in lines)
    ready, *stepped = [json.loads(line.removeprefix(benchmark_privacy.REPLY)) for line in lines]
    assert ready == {"ready": True}
    assert all(set(reply) == {"s", "mib"} for reply in stepped)


def test_privacy_versus_refuses_an_unknown_revision_before_checking_anything_out(monkeypatch, capsys):
    monkeypatch.setattr(
        sys, "argv", ["benchmark_privacy.py", "--versus", "no-such-revision-0x", "--steps", "1"]
    )
    with pytest.raises(SystemExit) as raised:
        benchmark_privacy.main()
    assert raised.value.code == 2
    assert "--versus no-such-revision-0x: no such git revision" in capsys.readouterr().err


def test_privacy_versus_refuses_views_that_are_not_k_rows_pairs():
    assert benchmark_privacy.parse_views("1:2,8:8") == [(1, 2), (8, 8)]
    for bad in ("1:2,8", "0:4", "8:4", "a:b", "4:6"):
        with pytest.raises(ValueError):
            benchmark_privacy.parse_views(bad)


def test_privacy_split_takes_forwards_that_divide_k_or_hold_whole_examples():
    assert benchmark_privacy.parse_split("8:16:16,8,4,2") == (8, 16, [16, 8, 4, 2])
    for bad in ("8:16", "8:12:4", "8:16:3", "8:16:12", "0:16:2", "8:16:", "a:16:2", "8:16:32"):
        with pytest.raises(ValueError):
            benchmark_privacy.parse_split(bad)


def test_privacy_split_steps_book_keeping_and_the_non_dp_step_on_the_same_rows_and_forwards(tmp_path):
    """Four processes in this tree (k = 4 on 8 rows: forwards of 4, one per example; of 2, its views split), each
    pair measured side by side and tabled with the route taken."""
    rows = [
        benchmark_privacy.run_split_row(
            dict(method="lora", k=4, rows=8, forward=forward), **TINY_D16_LIKE, steps=1
        )
        for forward in (4, 2)
    ]
    assert all(r["none_s"] > 0 and r["dp_s"] > 0 for r in rows)
    table = benchmark_privacy.split_table(rows)
    assert "| one forward |" in table[2] and "| views split, 2 forwards an example |" in table[3]


def test_privacy_a_failing_configuration_s_process_ends_the_run_with_its_stderr(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmark_privacy.py", "--depth", "0", "--steps", "1"])
    with pytest.raises(SystemExit) as raised:
        benchmark_privacy.main()
    assert "ValueError: need depth >= 1" in _exit_message(raised)


@pytest.mark.slow
def test_privacy_versus_measures_a_revision_beside_this_tree(tmp_path):
    """The command of docs/benchmarks.md at a tiny width: HEAD's code in a worktree beside this tree's."""
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    report = tmp_path / "report.md"
    command = [sys.executable, str(REPO / "scripts" / "benchmark_privacy.py"), "--versus", head]
    command += ["--depth", "1", "--width", "64", "--heads", "1", "--views", "1:1", "--steps", "1"]
    done = subprocess.run([*command, "--out", str(report)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in report.read_text().splitlines() if line.startswith(("| full |", "| lora |"))]
    assert len(rows) == 2


def test_demo_benchmark_shows_a_failed_demo_s_own_error_and_exits_with_its_status(
    tmp_path, monkeypatch, capsys
):
    def failed_demo(command, **kwargs):
        return subprocess.CompletedProcess(
            command, 3, stdout="building ...\n", stderr="error: the demo's reason\n"
        )

    monkeypatch.setattr(benchmark_demo.subprocess, "run", failed_demo)
    monkeypatch.setattr(sys, "argv", ["benchmark_demo.py", "--storage", str(tmp_path / "demo")])
    with pytest.raises(SystemExit) as raised:
        benchmark_demo.main()
    assert raised.value.code == 3
    err = capsys.readouterr().err
    assert "exited with status 3" in err and "error: the demo's reason" in err and "building ..." in err


def _refuse_to_run(*args, **kwargs):
    raise AssertionError("a trial was started")


def test_seed_spread_refuses_a_cache_no_demo_finished_in_before_running_anything(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_seed_spread, "one", _refuse_to_run)
    monkeypatch.chdir(tmp_path)  # the default runs/demo/cache is taken from here: no demo ran here
    monkeypatch.setattr(sys, "argv", ["demo_seed_spread.py", "--seeds", "0", "--methods", "lora"])
    with pytest.raises(SystemExit) as raised:
        demo_seed_spread.main()
    message = _exit_message(raised)
    assert "`make demo`" in message and str(tmp_path / "runs" / "demo" / "cache") in message
    for part in ("tiny base's VQVAE", "digit classifier", "token cache"):
        assert part in message


def test_seed_spread_takes_a_cache_holding_what_a_finished_demo_leaves(tmp_path):
    model = build_sweep("demo")[0].model
    steps = model.tiny_pretraining_steps
    vqvae = tiny_vqvae_folder(tmp_path, pretraining_steps=steps) / "vqvae.pth"
    classifier = classifier_folder(tmp_path)
    meta = tmp_path / "token-cache" / "folder-train-0" / "meta.json"
    for path in (vqvae, classifier / "weights.pt", classifier / "classifier.json", meta):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    var = tiny_base_folder(
        tmp_path, depth=model.depth, pretraining_steps=steps, vqvae_sha256=checkpoint_sha256(vqvae)
    )
    (var / "var.pth").parent.mkdir(parents=True)
    (var / "var.pth").write_text("")
    assert demo_seed_spread.missing_from_demo_cache(tmp_path) == [
        f"a complete token cache (in {meta.parents[1]})"
    ]
    meta.write_text(json.dumps({"complete": True}))
    assert demo_seed_spread.missing_from_demo_cache(tmp_path) == []
    (var / "var.pth").unlink()
    assert demo_seed_spread.missing_from_demo_cache(tmp_path) == [f"the tiny base's VAR ({var / 'var.pth'})"]
    (var.parent / f"d{model.depth}-{steps}-of-other-code").mkdir()  # a VAR of other sources: named
    assert (
        f"d{model.depth}-{steps}-of-other-code beside it"
        in demo_seed_spread.missing_from_demo_cache(tmp_path)[0]
    )


@pytest.fixture
def golden(tmp_path, monkeypatch):
    """A copy of tests/golden/paper that rebuild_golden.py reads and writes instead."""
    folder = tmp_path / "golden"
    shutil.copytree(rebuild_golden.GOLDEN, folder)
    monkeypatch.setattr(rebuild_golden, "GOLDEN", folder)
    return folder


@pytest.mark.parametrize(("argument", "status"), [("--help", 0), ("--no-such-option", 2)])
def test_rebuild_golden_help_and_unknown_arguments_write_nothing(golden, monkeypatch, argument, status):
    (golden / "kept.txt").write_text("not removed")
    monkeypatch.setattr(sys, "argv", ["rebuild_golden.py", argument])
    with pytest.raises(SystemExit) as raised:
        rebuild_golden.main()
    assert raised.value.code == status
    assert (golden / "kept.txt").read_text() == "not removed"


def test_rebuild_golden_check_compares_and_writes_nothing(golden, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rebuild_golden.py", "--check"])
    rebuild_golden.main()
    assert "equal the regenerated tables" in capsys.readouterr().out
    changed = sorted(golden.iterdir())[0]
    changed.write_text("edited")
    (golden / "extra.csv").write_text("")
    with pytest.raises(SystemExit) as raised:
        rebuild_golden.main()
    message = _exit_message(raised)
    assert "2 golden files" in message and changed.name in message and "extra.csv" in message
    assert changed.read_text() == "edited" and (golden / "extra.csv").exists()
