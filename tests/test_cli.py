"""The command line (`python -m bench`) without Ray: list, dry run, status; and the demo's acceptance checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from old_records import as_version, written_by_version_2

from bench.__main__ import main
from bench.demo import demo_checks, summary_rows
from bench.results import ResultStore
from bench.schema import make_result, replace, upgrade_record
from bench.sweeps import build_sweep


def test_list_shows_every_sweep(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(
        name in out
        for name in ("demo", "table1", "table2", "table3", "table9", "table10", "convergence", "second_seed")
    )
    assert "30 trials (6 smoke)" in out


def test_dry_run_checks_and_prints_and_creates_nothing(tmp_path, capsys):
    storage = tmp_path / "runs"
    assert main(["sweep", "demo", "--smoke", "--dry-run", "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    assert "5 of 5 trials to run" in out and "pending" in out
    assert not storage.exists()  # no results folder, no cache, no offline data written
    assert (
        main(
            ["sweep", "table2", "--dry-run", "--assets", str(tmp_path / "nothing"), "--storage", str(storage)]
        )
        == 2
    )
    captured = capsys.readouterr()
    assert "8 of 8 trials to run" in captured.out and "cannot run; nothing was started" in captured.err
    # the listing first, then one last line that says what is wrong and names the first problem's input
    last = captured.err.strip().splitlines()[-1]
    assert (
        last.startswith("error: 8 of 8 trials cannot run")
        and str(tmp_path / "nothing") in last
        and "Traceback" not in captured.err
    )
    assert not storage.exists()
    # --where runs part of a grid; a wrong field or a value no trial has is named, nothing starts. A privacy field
    # passes over the non-DP trials (their privacy is null) instead of failing on them.
    dry_run = ["sweep", "demo", "--smoke", "--dry-run", "--storage", str(storage)]
    for where in (["method.name=lora", "privacy=null"], ["privacy.target_epsilon=8"]):
        assert main([*dry_run, *[arg for w in where for arg in ("--where", w)]]) == 0
        assert "1 of 1 trials to run" in capsys.readouterr().out
    assert main([*dry_run, "--where", "method.rank=16"]) == 2
    assert "no such config field" in capsys.readouterr().err
    assert (
        main(["status", "demo", "--smoke", "--where", "method.name=lora_mlp", "--storage", str(storage)]) == 2
    )
    assert capsys.readouterr().err.startswith(
        "error: no trial of sweep demo has method.name=lora_mlp (5 trials)"
    )
    assert not storage.exists()


def test_a_storage_inside_a_ray_job_s_working_directory_is_refused(tmp_path, capsys, monkeypatch):
    """Under `ray job submit --working-dir .` the driver runs in Ray's unpacked copy of the folder: the default
    (relative) storage resolved there, on the head alone and deleted with the job, while the GPU nodes wrote
    their checkpoints and results to folders of their own."""
    job = tmp_path / "session_2026" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    job.mkdir(parents=True)
    monkeypatch.chdir(job)
    assert main(["sweep", "demo", "--smoke", "--dry-run"]) == 2  # the default --storage, runs/sweeps
    err = capsys.readouterr().err
    assert (
        f"--storage runs/sweeps ({job / 'runs' / 'sweeps'}) is inside Ray's copy of this job's working" in err
    )
    assert "Traceback" not in err
    assert main(["status", "demo", "--smoke", "--storage", "runs"]) == 2
    assert "e.g. --storage /mnt/varsweep/runs" in capsys.readouterr().err
    assert not any(job.iterdir())
    # an absolute path elsewhere passes
    assert main(["sweep", "demo", "--smoke", "--dry-run", "--storage", str(tmp_path / "shared")]) == 0


@pytest.mark.parametrize(
    "command",
    [["sweep", "demo", "--smoke", "--dry-run"], ["sweep", "demo", "--smoke"], ["status", "demo"], ["demo"]],
)
def test_a_storage_uri_with_a_slash_missing_is_refused(tmp_path, capsys, monkeypatch, command):
    """`--storage s3:/bucket/runs` was the local folder ./s3:/bucket/runs: the results of a cluster's sweep on
    one node's disk, with no word said. Refused before anything is created (a real run had made its results and
    cache folders first); a folder whose name holds a colon elsewhere is no URI."""
    monkeypatch.chdir(tmp_path)
    assert main([*command, "--storage", "s3:/bucket/runs"]) == 2
    err = capsys.readouterr().err
    assert "--storage s3:/bucket/runs reads as a local folder named s3: but looks like a URI" in err
    assert "write s3://bucket/runs" in err and not any(tmp_path.iterdir())
    if command[-1] == "--dry-run":
        assert main([*command, "--storage", "run-2024-01-01T12:00"]) == 0


def test_status_is_read_only_and_shows_every_state(tmp_path, capsys):
    configs = build_sweep("demo", smoke=True)
    missing = tmp_path / "never-ran"
    assert main(["status", "demo", "--smoke", "--storage", str(missing)]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "no storage folder" in err and str(missing) in err and not missing.exists()
    )
    store = ResultStore(tmp_path)
    store.write(make_result(configs[0], status="success", metrics={"fid": 12.5}))
    store.write(make_result(configs[1], status="failed", error="RuntimeError: out of memory\n  at line 3"))
    Path(store.path(configs[2].trial_id)).write_text('{"schema_version": 1, "truncat')
    Path(store.path(configs[3].trial_id)).write_text(
        json.dumps({**make_result(configs[3], status="success"), "schema_version": 99})
    )
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["status", "demo", "--smoke", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "12.50" in out and "RuntimeError: out of memory" in out and "at line 3" not in out
    assert (
        "1 success, 1 failed, 1 invalid, 1 newer, 1 pending of 5 trials" in out
        and "not JSON" in out
        and "schema version 99" in out
    )
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created or changed


def test_status_shows_the_epsilon_of_the_accountant_that_calibrated_the_trial():
    """A PRV-calibrated trial (the paper sweeps' up to epsilon 100) showed its RDP reading, 11.14 at a target of 10:
    an overrun at a glance."""
    from bench.__main__ import spent_epsilon

    ledger = {"target_epsilon": 10.0, "epsilon_rdp": 11.139, "epsilon_prv": 9.999}
    assert spent_epsilon({"privacy": {**ledger, "calibration_accountant": "prv"}}) == 9.999
    assert spent_epsilon({"privacy": {**ledger, "calibration_accountant": "rdp"}}) == 11.139
    assert spent_epsilon({"privacy": ledger}) == 11.139  # ledgers before the field: RDP calibrated them
    assert spent_epsilon({"privacy": None}) is None and spent_epsilon({}) is None


def test_status_says_when_assets_are_not_found_and_results_match_no_listed_trial(tmp_path, capsys):
    """From a machine without the assets mount, trial ids fall back to paths: every trial reads as pending, so
    status says why, and that the folder holds results of trials it did not list."""
    storage = tmp_path / "storage"
    store = ResultStore(storage)
    store.write(make_result(build_sweep("demo", smoke=True)[0], status="success", metrics={"fid": 1.0}))
    nowhere = tmp_path / "nowhere"
    assert main(["status", "table3", "--assets", str(nowhere), "--storage", str(storage)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-3] == "14 pending of 14 trials"
    assert out[-2].startswith(f"warning: 5 asset path(s) not found here, e.g. {nowhere}/")
    assert (
        "the 14 trial(s) reading them are identified by their paths" in out[-2] and "--assets DIR" in out[-2]
    )
    assert out[-1] == f"1 other result file(s) in {store.folder} are of trials not listed above"
    assert main(["status", "demo", "--smoke", "--storage", str(storage)]) == 0  # tiny bases: nothing to find
    assert "warning" not in capsys.readouterr().out


def test_bad_arguments_end_in_one_line(tmp_path, capsys):
    assert main(["sweep", "demo", "--smoke", "--max-concurrent", "0", "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: python -m bench sweep: argument --max-concurrent: '0' is not an integer >= 1")
        and err.count("\n") == 1
    )
    assert not (tmp_path / "s").exists()  # refused while parsing, before anything is created
    assert main(["sweep", "table1", "--dry-run", "--gpu", "V100", "--storage", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "error: python -m bench sweep: argument --gpu: unknown GPU 'V100': the dry run prices one of"
    )
    assert "H100" in err and err.count("\n") == 1 and not (tmp_path / "s").exists()
    # an empty storage (a script's unset variable) would be the working folder
    for command in (["sweep", "demo", "--smoke", "--dry-run"], ["status", "demo", "--smoke"]):
        assert main([*command, "--storage", ""]) == 2
        assert (
            capsys.readouterr().err
            == "error: storage: an empty path (an unset variable?); give a folder or a URI\n"
        )


def test_a_dry_run_prices_the_gpu_it_is_given(tmp_path, capsys):
    """--gpu: the estimate's hours on that kind of GPU (any case, any part of its name); with no measurement of
    it, the committed H200 rates scaled by the datasheet peaks."""
    storage, assets = str(tmp_path / "runs"), str(tmp_path / "nothing")
    totals = {}
    for gpu in ("NVIDIA H200", "h100", "A100"):
        command = ["sweep", "table1", "--dry-run", "--gpu", gpu, "--assets", assets, "--storage", storage]
        assert main(command) == 2  # no checkpoints or datasets here: the estimate is printed all the same
        out = capsys.readouterr().out
        total = next(line for line in out.splitlines() if "trials to run; estimated GPU hours on" in line)
        assert total.startswith(f"30 of 30 trials to run; estimated GPU hours on an {gpu}: training ")
        totals[gpu] = float(total.rsplit("= ", 1)[1])
        rows = [line for line in out.splitlines() if " pending " in line]
        assert len(rows) == 30 and all(("from H200" in row) == (gpu != "NVIDIA H200") for row in rows)
    assert totals["h100"] == pytest.approx(totals["NVIDIA H200"], rel=0.01)  # the same peak
    assert totals["A100"] == pytest.approx(totals["NVIDIA H200"] * 989 / 312, rel=0.01)


def _demo_rows(fids, accuracies, precision=0.5, recall=0.3):
    configs = sorted(
        build_sweep("demo", smoke=True),
        key=lambda c: (
            c.method.name != "base",
            c.privacy is not None,
            c.privacy.target_epsilon if c.privacy else 0,
        ),
    )
    # base, full, lora, dp-lora eps 1, dp-lora eps 8
    return summary_rows(
        [
            make_result(
                c,
                status="success",
                metrics={"fid": f, "precision": precision, "recall": recall, "class_accuracy": a},
            )
            for c, f, a in zip(configs, fids, accuracies)
        ]
    )


GOOD_FIDS, GOOD_ACCURACIES = [28.0, 8.5, 9.9, 15.0, 13.2], [0.1, 0.95, 0.9, 0.4, 0.6]


def test_demo_checks_pass_on_a_good_run():
    checks = demo_checks(_demo_rows(GOOD_FIDS, GOOD_ACCURACIES))
    assert len(checks) == 6 and all(checks.values())
    assert len(build_sweep("demo")) == len(build_sweep("demo", smoke=True)) == 5


@pytest.mark.parametrize(
    "change, failing",
    [
        ({"fids": [9.0, 8.5, 9.9, 15.0, 13.2]}, "every non-DP fine-tuned FID below the base model's"),
        ({"accuracies": [0.1, 0.95, 0.69, 0.4, 0.6]}, "class accuracy >= 0.70 for full fine-tuning and LoRA"),
        ({"accuracies": [0.31, 0.95, 0.9, 0.4, 0.6]}, "class accuracy <= 0.30 for the base model"),
        ({"precision": 0.39}, "precision >= 0.40 and recall >= 0.15 for every non-DP fine-tuned trial"),
        ({"recall": 0.14}, "precision >= 0.40 and recall >= 0.15 for every non-DP fine-tuned trial"),
        (
            {"accuracies": [0.1, 0.95, 0.9, 0.9, 0.6]},
            "DP at epsilon 1: class accuracy below the same method without DP",
        ),
        ({"fids": [28.0, 8.5, 9.9, 9.0, 13.2]}, "DP at epsilon 1: FID above the same method without DP"),
    ],
)
def test_each_demo_check_fails_alone(change, failing):
    rows = _demo_rows(
        change.get("fids", GOOD_FIDS),
        change.get("accuracies", GOOD_ACCURACIES),
        change.get("precision", 0.5),
        change.get("recall", 0.3),
    )
    checks = demo_checks(rows)
    assert [name for name, ok in checks.items() if not ok] == [failing]


def test_a_missing_metric_fails_the_checks():
    rows = _demo_rows(GOOD_FIDS, GOOD_ACCURACIES)
    rows[1]["class_accuracy"] = None
    assert demo_checks(rows)["class accuracy >= 0.70 for full fine-tuning and LoRA"] is False


def test_result_store_on_a_uri(tmp_path):
    """Storage given as a URI goes through pyarrow's filesystems (here file://; s3:// and gs:// work the same way)."""
    configs = build_sweep("demo", smoke=True)
    store = ResultStore(f"file://{tmp_path}/bucket")
    store.write(make_result(configs[0], status="success", metrics={"fid": 3.0}))
    store.write(
        make_result(configs[0], status="success", metrics={"fid": 2.0})
    )  # a rerun replaces, never duplicates
    assert [r["metrics"]["fid"] for r in store.all()] == [2.0] and store.status(configs[1].trial_id) is None
    assert (tmp_path / "bucket" / "results" / f"{configs[0].trial_id}.json").is_file()


def test_the_drivers_runtime_env_merges_with_a_submitted_job_s(monkeypatch):
    """Under `ray job submit --runtime-env-json`, ray.init merges the job's runtime env with the driver's and
    refuses any shared variable (even at the same value): the driver leaves those to the job."""
    import json

    from ray.runtime_env.runtime_env import _merge_runtime_env

    from bench.launcher import JOB_CONFIG_ENV, POLL_INTERVAL_ENV, driver_env_vars

    job_env = {"working_dir": "/src", "env_vars": {POLL_INTERVAL_ENV: "1", "PYTHONUNBUFFERED": "1"}}
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    alone = driver_env_vars()
    assert {POLL_INTERVAL_ENV, "PYTHONUNBUFFERED"} <= alone.keys()
    assert _merge_runtime_env(job_env, {"env_vars": alone}) is None  # what failed before
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": job_env}))
    submitted = driver_env_vars()
    assert submitted == {k: v for k, v in alone.items() if k not in job_env["env_vars"]}
    merged = _merge_runtime_env(job_env, {"env_vars": submitted})
    assert merged is not None and merged["env_vars"][POLL_INTERVAL_ENV] == "1"


def test_launch_makes_local_paths_absolute_and_passes_uris(tmp_path, monkeypatch):
    from bench.launcher import Launch, SweepError, default_cache_dir, training_run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("VARSWEEP_CACHE", raising=False)
    launch = Launch(storage="runs/demo", cache_dir=default_cache_dir("runs/demo"))
    assert launch.storage == str(tmp_path / "runs" / "demo") and launch.cache_dir == str(
        tmp_path / "runs" / "demo" / "cache"
    )
    assert launch.train_storage == str(tmp_path / "runs" / "demo" / "train")
    assert (
        Launch(**launch.__dict__) == launch
    )  # what the trial function rebuilds from Tune's parameters is the same
    remote = Launch(storage="s3://bucket/runs", cache_dir="cache")
    assert (
        remote.storage == "s3://bucket/runs"
        and remote.tune_storage == "s3://bucket/runs/tune"
        and remote.cache_dir == str(tmp_path / "cache")
    )
    # A URI's query (region, endpoint) stays at its end: appended folders would land in it, where Ray reads them
    query = "?region=us-east-1&endpoint_override=localhost:9000&scheme=http"
    minio = Launch(storage=f"s3://bucket/runs{query}", cache_dir="cache")
    assert (
        minio.train_storage == f"s3://bucket/runs/train{query}"
        and minio.tune_storage == f"s3://bucket/runs/tune{query}"
        and training_run_dir(minio, "abc") == f"s3://bucket/runs/train/trial-abc{query}"
    )
    for bad in (0, -2):
        with pytest.raises(SweepError, match="--max-concurrent must be >= 1"):
            Launch(storage="runs", cache_dir="cache", max_concurrent=bad)


def test_sweep_progress_line_counts_and_estimates(tmp_path, capsys):
    from types import SimpleNamespace

    from bench.launcher import SweepProgress

    configs = build_sweep("demo", smoke=True)[:3]
    store = ResultStore(tmp_path)
    progress = SweepProgress(
        "demo", configs, store=store, skipped=2, planned_steps={c.trial_id: 100 for c in configs}, parallel=2
    )
    trials = [SimpleNamespace(trial_id=f"t{i}", config={"trial": c.to_dict()}) for i, c in enumerate(configs)]
    progress.on_trial_start(0, trials, trials[0])
    progress.on_trial_start(0, trials, trials[1])
    progress.on_trial_result(0, trials, trials[0], {"step": 50, "seconds": 10.0, "eta_seconds": 10})
    progress.on_trial_result(0, trials, trials[1], {"step": 20, "seconds": 10.0, "eta_seconds": 40})
    progress._print()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    # work left: 10 s + 40 s running, and the pending trial's 100 steps at the mean 0.35 s/step, over 2 at a time
    assert line.startswith(
        "sweep demo: 0 done, 2 running, 0 failed, 1 pending of 3 (2 already done)"
    ) and line.endswith("ETA 42 s")
    store.write(make_result(configs[0], status="success", metrics={"fid": 1.0}))
    progress.on_trial_complete(0, trials, trials[0])
    store.write(make_result(configs[1], status="failed", error="ValueError: boom"))
    progress.on_trial_complete(0, trials, trials[1])
    assert "1 done, 0 running, 1 failed, 1 pending of 3" in capsys.readouterr().out


def test_a_trial_function_that_raised_leaves_a_failed_result_naming_the_cause(tmp_path, capsys):
    """A trial function that raised (its storage write failed, its actor died) wrote no result: its reason stayed in
    Tune's folder, and the sweep called the trial unfinished and exited as if interrupted (status 130)."""
    from types import SimpleNamespace

    from bench.launcher import SweepProgress, summarise

    configs = build_sweep("demo", smoke=True)[:2]
    store = ResultStore(tmp_path)
    progress = SweepProgress("demo", configs, store=store, skipped=0, planned_steps={}, parallel=2)
    error_file = tmp_path / "error.txt"
    error_file.write_text(
        "Failure # 1 (occurred at 2026-12-07)\nray.exceptions.RayTaskError(StorageError): ray::_trial_function()\n"
        '  File "launcher.py", line 304\nbench.results.StorageError: cannot write results/x.json: disk full\n'
    )
    crashed = SimpleNamespace(
        trial_id="t0", config={"trial": configs[0].to_dict()}, error_file=str(error_file)
    )
    store.write(make_result(configs[1], status="failed", error="ValueError: its own record"))
    recorded = SimpleNamespace(
        trial_id="t1", config={"trial": configs[1].to_dict()}, error_file=str(error_file)
    )
    for trial in (crashed, recorded):
        progress.on_trial_start(0, [crashed, recorded], trial)
        progress.on_trial_error(0, [crashed, recorded], trial)
    assert store.state(configs[0].trial_id) == (
        "failed",
        "bench.results.StorageError: cannot write results/x.json: disk full (the trial function)",
    )
    assert store.state(configs[1].trial_id) == ("failed", "ValueError: its own record")  # kept
    summary = summarise("demo", configs, store, skipped=0, tail="1 s")
    assert summary["failed"] == 2 and not summary["unfinished"]


def test_a_failed_training_run_records_the_worker_s_error_first():
    """Train's WorkerGroupError reads "Training failed due to worker errors:" on its first line, the only one
    status and the summary show; the cause (the lowest failed rank's exception) now leads."""
    from bench.launcher import training_error

    class WorkerGroupError(Exception):  # Train's shape: the message, then the failures by rank
        def __init__(self, message: str, worker_failures: dict) -> None:
            super().__init__("Training failed due to worker errors:\n" + message)
            self.worker_failures = worker_failures

    failures = {1: ValueError("rank 1's"), 0: RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")}
    error = training_error(WorkerGroupError("[Rank 0 Error Snippet]:\nTraceback ...", failures))
    first, *rest = error.splitlines()
    assert first == "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB (rank 0)"
    assert rest[0] == "WorkerGroupError: Training failed due to worker errors:"
    assert training_error(KeyError("k")) == "KeyError: 'k'"


def _version_1(record: dict) -> dict:
    """``record`` as schema version 1 wrote it (renamed fields, the DP rows per forward under privacy, its old id)."""
    return as_version(record, 1)


def test_upgrade_results_rewrites_version_1_files_once(tmp_path, capsys):
    configs = build_sweep("demo", smoke=True)
    store = ResultStore(tmp_path)
    store.write(make_result(configs[0], status="success", metrics={"fid": 1.0}))  # already current
    old = [_version_1(make_result(c, status="success", metrics={"fid": 2.0})) for c in configs[1:3]]
    for record in old:
        Path(store.path(record["trial_id"])).write_text(json.dumps(record))
    Path(store.path("0" * 16)).write_text('{"schema_version": 1, "truncat')
    assert store.state(old[0]["trial_id"]) == (
        "invalid",
        f"schema version 1: run `python -m bench upgrade-results {tmp_path}` "
        "(rewrites it as a version-3 result)",
    )
    before = sorted(p.name for p in (tmp_path / "results").iterdir())

    assert main(["upgrade-results", str(tmp_path), "--dry-run"]) == 1  # one file is left alone
    out, err = capsys.readouterr()
    assert err.startswith("error: 1 file(s) left alone, each named above")
    assert (
        out.count(": would upgrade: ") == 2
        and sorted(p.name for p in (tmp_path / "results").iterdir()) == before
    )
    summary = (
        f"2 would upgrade, 1 current, 1 left alone of 4 files in {store.folder} (dry run: nothing changed)"
    )
    assert out.strip().splitlines()[-1] == summary

    assert main(["upgrade-results", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert (
        f"{'0' * 16}.json: left alone: not JSON" in out
        and f"{configs[0].trial_id}.json: schema version 3 already" in out
    )
    for record, config in zip(old, configs[1:3]):
        assert (
            f"{record['trial_id']}.json: upgraded: version 1 -> 3, trial {record['trial_id']} -> {config.trial_id}"
            in out
        )
        assert (
            store.read(config.trial_id) == upgrade_record(record)
            and store.status(config.trial_id) == "success"
        )
        assert not Path(store.path(record["trial_id"])).exists()
    assert main(["upgrade-results", str(tmp_path)]) == 1  # run again: nothing left to upgrade
    assert (
        capsys.readouterr().out.strip().splitlines()[-1]
        == f"3 current, 1 left alone of 4 files in {store.folder}"
    )


def test_an_interrupted_upgrade_finishes_and_a_newer_result_is_kept(tmp_path, capsys):
    configs = build_sweep("demo", smoke=True)
    store = ResultStore(tmp_path)
    interrupted = _version_1(make_result(configs[0], status="success", metrics={"fid": 2.0}))
    superseded = _version_1(make_result(configs[1], status="failed", error="RuntimeError: out of memory"))
    for record in (interrupted, superseded):
        Path(store.path(record["trial_id"])).write_text(json.dumps(record))
    store.write(upgrade_record(interrupted))  # the new file was written, the old one not yet deleted
    store.write(make_result(configs[1], status="success", metrics={"fid": 3.0}))  # rerun under version 3
    assert main(["upgrade-results", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert (
        f"{interrupted['trial_id']}.json: upgraded" in out
        and not Path(store.path(interrupted["trial_id"])).exists()
    )
    assert (
        f"{superseded['trial_id']}.json: left alone: trial {configs[1].trial_id} already has a schema version 3 result (success)"
        in out
    )
    assert (
        Path(store.path(superseded["trial_id"])).exists() and store.status(configs[1].trial_id) == "success"
    )
    # The older file left alone blocks nothing: the trial shows (and is skipped) as the finished run it is.
    from bench.launcher import refuse_older_results  # imports Ray, starts nothing

    refuse_older_results(configs, store)
    assert main(["status", "demo", "--smoke", "--storage", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if configs[1].trial_id in line)
    assert " success " in row and "3.0" in row, row


@pytest.mark.parametrize("success_first", [True, False])
def test_a_success_of_an_old_version_takes_a_failed_result_s_place_whatever_the_order(
    tmp_path, capsys, success_first
):
    """Version 3 left a DP trial's rows per forward out of its id, so an attempt that ran out of memory at 256 rows
    and its successful rerun at 128 became one trial: the file that sorted first was kept, and a failed one made
    a relaunch train again what the success held. The dry run says line by line what the run then does (it
    called both files upgradable, seeing neither's new file)."""
    dp = next(c for c in build_sweep("demo", smoke=True) if c.privacy is not None)
    store = ResultStore(tmp_path)
    rows = {"failed": 256, "success": 128}
    old = {
        status: written_by_version_2(
            replace(dp, resources={"rows_per_forward": rows[status]}),
            tmp_path / "version-2",
            status=status,
            **(
                {"metrics": {"fid": 2.0}}
                if status == "success"
                else {"error": "torch.OutOfMemoryError: CUDA oom"}
            ),
        )
        for status in rows
    }
    first, second = ("1" * 64, "9" * 64) if success_first else ("9" * 64, "1" * 64)
    old["success"]["trial_id"], old["failed"]["trial_id"] = first, second  # version 2 hashed the rows
    for record in old.values():
        Path(store.path(record["trial_id"])).write_text(json.dumps(record))
    planned = main(["upgrade-results", str(tmp_path), "--dry-run"]), capsys.readouterr().out
    done = main(["upgrade-results", str(tmp_path)]), capsys.readouterr().out
    assert store.state(dp.trial_id) == ("success", "") and store.read(dp.trial_id)["metrics"]["fid"] == 2.0
    if not success_first:
        assert "replaces its failed result (torch.OutOfMemoryError: CUDA oom)" in done[1]
    assert (
        planned[0] == done[0]
        and [line.replace("would upgrade", "upgraded") for line in planned[1].splitlines()[:-1]]
        == done[1].splitlines()[:-1]
    )


def test_an_upgrade_leaves_a_newer_varsweep_s_failed_result_alone(tmp_path, capsys):
    """A success upgraded from version 1 replaced the failed result a later varsweep had written for the trial,
    whose fields this one cannot read: "newer" results are neither read nor replaced."""
    config = build_sweep("demo", smoke=True)[0]
    store = ResultStore(tmp_path)
    old = _version_1(make_result(config, status="success", metrics={"fid": 2.0}))
    Path(store.path(old["trial_id"])).write_text(json.dumps(old))
    newer = {**make_result(config, status="failed", error="RuntimeError: a later run"), "schema_version": 4}
    Path(store.path(config.trial_id)).write_text(json.dumps({**newer, "field_of_version_4": 1}))
    assert main(["upgrade-results", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "already has a schema version 4 result (failed)" in out
    assert json.loads(Path(store.path(config.trial_id)).read_text())["field_of_version_4"] == 1


@pytest.mark.parametrize(
    ("text", "state", "upgrade"),
    [
        ("null", "not a JSON object but null", "not a JSON object but null"),
        ("[1, 2]", "not a JSON object but [1, 2]", "not a JSON object but [1, 2]"),
        (
            '{"schema_version": true}',
            "expected 3, got True",
            "schema version True (versions are the integers",
        ),
        ('{"schema_version": 2.0}', "expected 3, got 2.0", "schema version 2.0 (versions are the integers"),
        ('{"schema_version": 2, "config": "x"}', "schema version 2: run", "without a config object"),
    ],
)
def test_a_result_file_that_is_no_result_is_named_invalid_and_left_alone(
    tmp_path, capsys, text, state, upgrade
):
    """``null`` read as a missing result (status showed a pending trial, not a damaged file), ``true`` and
    ``2.0`` passed for old versions 1 and 2, and the upgrade's messages were Python errors."""
    store = ResultStore(tmp_path)
    Path(store.path("a" * 16)).write_text(text)
    found, detail = store.state("a" * 16)
    assert found == "invalid" and state in detail, detail
    assert main(["upgrade-results", str(tmp_path)]) == 1
    assert f"{'a' * 16}.json: left alone: " in (out := capsys.readouterr().out) and upgrade in out, out


def test_status_shows_version_1_results_at_the_trial_they_upgrade_to(tmp_path, capsys):
    configs = build_sweep("demo", smoke=True)
    store = ResultStore(tmp_path)
    old = _version_1(make_result(configs[0], status="success", metrics={"fid": 2.0}))
    Path(store.path(old["trial_id"])).write_text(json.dumps(old))
    assert main(["status", "demo", "--smoke", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if configs[0].trial_id in line)
    assert " old " in row and f"{old['trial_id']}.json" in row and "upgrade-results" in row
    assert "1 old, 4 pending of 5 trials" in out
    assert (
        f"1 result file(s) in {store.folder} have an older schema version: `python -m bench upgrade-results {tmp_path}`"
        in out
    )


def test_version_2_results_are_kept_whether_or_not_their_trial_id_changed(tmp_path, capsys):
    """Real version-2 records (written by that schema): a non-DP trial keeps its id in version 3 (its file is the
    old record itself), a DP trial gets a new one. Until they are upgraded `status` shows both as old and a sweep
    refuses to run them again (that would spend the compute twice and overwrite the first); the upgrade rewrites
    the first in place, moves the second and names the checkpoints left under its old id."""
    configs = build_sweep("demo", smoke=True)
    plain, dp = configs[0], next(c for c in configs if c.privacy is not None)
    storage, store = tmp_path / "runs", ResultStore(tmp_path / "runs")
    old = {
        c.label: written_by_version_2(c, tmp_path / "v2", status="success", metrics={"fid": 2.0})
        for c in (plain, dp)
    }
    assert old[plain.label]["trial_id"] == plain.trial_id and old[dp.label]["trial_id"] != dp.trial_id
    for record in old.values():
        Path(store.path(record["trial_id"])).write_text(json.dumps(record))
    stale_run = storage / "train" / f"trial-{old[dp.label]['trial_id']}"
    stale_run.mkdir(parents=True)

    assert main(["status", "demo", "--smoke", "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    for config in (plain, dp):
        row = next(line for line in out.splitlines() if config.trial_id in line)
        assert " old " in row and f"{old[config.label]['trial_id']}.json" in row, row
    assert "2 old, 3 pending of 5 trials" in out

    assert main(["sweep", "demo", "--smoke", "--storage", str(storage), "--dry-run"]) == 2  # bad input
    err = capsys.readouterr().err
    assert "2 trial(s) to run have a result of an older schema version" in err and "upgrade-results" in err

    assert main(["upgrade-results", str(storage)]) == 0
    out = capsys.readouterr().out
    assert (
        f"{plain.trial_id}.json: upgraded: version 2 -> 3, trial {plain.trial_id} -> {plain.trial_id}" in out
    )
    assert f"its checkpoints under the old id, {stale_run}, are no longer used: delete that folder" in out
    for config in (plain, dp):
        assert store.status(config.trial_id) == "success"
        assert store.read(config.trial_id)["upgraded_from"] == {
            "schema_version": 2,
            "trial_id": old[config.label]["trial_id"],
        }
    assert sorted(p.stem for p in (storage / "results").glob("*.json")) == sorted(
        [plain.trial_id, dp.trial_id]
    )
    assert main(["sweep", "demo", "--smoke", "--storage", str(storage), "--dry-run"]) == 0  # 3 left to run
    assert "3 of 5 trials to run" in capsys.readouterr().out


def test_upgrade_results_moves_old_artifacts_into_the_storage(tmp_path, capsys):
    """A version-1 record names its images by absolute paths (the cache's work folder, the dataset): the upgrade
    copies them under artifacts/<new trial id>/ and names them relative to the storage root."""
    config = build_sweep("demo", smoke=True)[1]
    work, data = tmp_path / "cache" / "work" / "0123456789abcdef", tmp_path / "data"
    for path in (
        work / "images" / "class_0" / "0.png",
        work / "adapter.pt",
        work / "adapter.pt.json",
        data / "seven.png",
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(path.name.encode())
    old = _version_1(
        make_result(
            config,
            status="success",
            metrics={"fid": 2.0},
            artifacts={
                "generated_images": str(work / "images"),
                "real_images": [{"label": 7, "class": "7", "paths": [str(data / "seven.png")]}],
            },
        )
    )
    storage = tmp_path / "storage"
    store = ResultStore(storage)
    Path(store.path(old["trial_id"])).write_text(json.dumps(old))
    assert main(["upgrade-results", str(storage), "--dry-run"]) == 0
    assert (
        "4 artifact file(s) and folder(s) copied" in capsys.readouterr().out
        and not (storage / "artifacts").exists()
    )
    assert main(["upgrade-results", str(storage)]) == 0
    folder = f"artifacts/{config.trial_id}"
    assert store.read(config.trial_id)["artifacts"] == {
        "folder": folder,
        "adapter": f"{folder}/adapter.pt",
        "generated_images": f"{folder}/images",
        "real_images": [{"label": 7, "class": "7", "paths": [f"{folder}/real/class_7/0.png"]}],
    }
    assert sorted(
        p.relative_to(storage / folder).as_posix() for p in (storage / folder).rglob("*") if p.is_file()
    ) == ["adapter.pt", "adapter.pt.json", "images/class_0/0.png", "real/class_7/0.png"]
    assert (storage / folder / "real" / "class_7" / "0.png").read_bytes() == b"seven.png" and (
        work / "adapter.pt"
    ).is_file()


def test_the_last_line_counts_the_listed_problems_not_their_detail_lines():
    import io

    from bench.cli import report

    def last_line(message: str) -> str:
        stream = io.StringIO()
        report(ValueError(message), stream=stream)
        return stream.getvalue().strip().splitlines()[-1]

    one = "1 of 1 trials cannot run:\n  data.dataset: classes differ\n    affects 1 trial: a (1)"
    assert last_line(one) == "error: 1 of 1 trials cannot run: data.dataset: classes differ"
    two = one + "\n  method.name: unknown 'LoRA'\n    affects 1 trial: b (2)\n    did you mean 'lora'"
    assert last_line(two) == (
        "error: 1 of 1 trials cannot run: data.dataset: classes differ (and 1 more listed above)"
    )
    nested = (
        "1 of 1 trials cannot run:\n  invalid privacy settings:\n    - privacy.sampling_rate: q*N below one"
    )
    assert last_line(nested) == (
        "error: 1 of 1 trials cannot run: invalid privacy settings: privacy.sampling_rate: q*N below one"
    )


def test_a_sweep_refuses_the_trials_another_running_sweep_trains_before_any_compute(tmp_path):
    """The launch checks the storage's claims after its preflight and before Ray, Tune or any shared cache."""
    import sys
    import time

    from bench.launcher import Launch, run_sweep
    from bench.results import ClaimedError

    configs = build_sweep("demo", smoke=True)
    storage = tmp_path / "runs"
    launch = Launch(storage=str(storage), cache_dir=str(tmp_path / "cache"))
    run_sweep("demo", configs, launch, dry_run=True)  # identifies them (content ids), as the launch will
    from bench.preflight import identify

    held = identify(configs, cache_dir=launch.cache_dir, write=False, log=None)[0]
    (storage / "claims").mkdir(parents=True)
    claim = {"sweep": "demo", "host": "another-machine", "pid": 7, "token": "t", "heartbeat": time.time()}
    (storage / "claims" / f"{held.trial_id}.json").write_text(json.dumps(claim))
    ray_before = "ray" in sys.modules
    with pytest.raises(
        ClaimedError, match=rf"{held.label} \({held.trial_id}\): sweep 'demo', pid 7 on another"
    ):
        run_sweep("demo", configs, launch)
    assert not (storage / "tune").exists() and ("ray" in sys.modules) == ray_before
    assert not (tmp_path / "cache" / "tiny-base").exists()
