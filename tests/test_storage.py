"""A trial's artifacts belong to the storage, not to the cache: written in place under a local storage, staged on
the node and uploaded before the result under a URI storage (file:// here, which takes the same path as s3://),
replaced by a new attempt. (tests/test_front_door.py clears the cache after real sweeps and analyses them again.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sweep_driver import tiny_trial

from bench.results import ResultStore
from bench.schema import ConfigError, make_result

CONFIG = tiny_trial("lora", steps=2)
FIRST_ATTEMPT = {
    "adapter.pt": b"weights",
    "adapter.pt.json": b"{}",
    "images/class_0/0.png": b"png 0",
    "images/class_1/0.png": b"png 1",
    "real/class_0/0.png": b"real 0",
}


def fill(folder: Path, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_a_uri_storage_gets_the_staged_artifacts_before_the_result(tmp_path):
    store, cache = ResultStore(f"file://{tmp_path}/bucket"), tmp_path / "cache"
    staged = store.artifacts_dir(CONFIG.trial_id, cache_dir=cache, fresh=True)
    assert store.remote and staged == cache / "staging" / store.key / CONFIG.trial_id and staged.is_dir()
    fill(staged, FIRST_ATTEMPT)
    store.publish(make_result(CONFIG, status="success"), artifacts_dir=staged)
    uploaded = tmp_path / "bucket" / "artifacts" / CONFIG.trial_id
    assert tree(uploaded) == FIRST_ATTEMPT and store.status(CONFIG.trial_id) == "success"
    assert not staged.exists()  # the node keeps nothing of the trial's own

    # A new attempt (the trial run again) starts from an empty staging folder and replaces the whole upload.
    fill(staged, {"images/class_9/stale.png": b"left on this node by an attempt that failed"})
    staged = store.artifacts_dir(CONFIG.trial_id, cache_dir=cache, fresh=True)
    assert tree(staged) == {}
    fill(staged, {"images/class_0/0.png": b"new 0"})
    store.publish(make_result(CONFIG, status="success"), artifacts_dir=staged)
    assert tree(uploaded) == {"images/class_0/0.png": b"new 0"}


def test_an_invalid_result_uploads_nothing(tmp_path):
    store = ResultStore(f"file://{tmp_path}/bucket")
    staged = store.artifacts_dir(CONFIG.trial_id, cache_dir=tmp_path / "cache", fresh=True)
    fill(staged, FIRST_ATTEMPT)
    with pytest.raises(ConfigError, match="status"):
        store.publish({**make_result(CONFIG, status="success"), "status": "done"}, artifacts_dir=staged)
    assert not (tmp_path / "bucket" / "artifacts").exists() and store.status(CONFIG.trial_id) is None


def test_a_local_storage_takes_the_artifacts_in_place(tmp_path):
    store, cache = ResultStore(tmp_path / "storage"), tmp_path / "cache"
    folder = store.artifacts_dir(CONFIG.trial_id, cache_dir=cache, fresh=True)
    assert not store.remote and folder == tmp_path / "storage" / "artifacts" / CONFIG.trial_id
    fill(folder, FIRST_ATTEMPT)
    assert (
        store.artifacts_dir(CONFIG.trial_id, cache_dir=cache) == folder and tree(folder) == FIRST_ATTEMPT
    )  # other ranks: untouched
    folder = store.artifacts_dir(CONFIG.trial_id, cache_dir=cache, fresh=True)  # rank 0 of a new attempt
    assert tree(folder) == {}
    fill(folder, {"images/class_0/0.png": b"new 0"})
    store.publish(make_result(CONFIG, status="success"), artifacts_dir=folder)
    assert tree(folder) == {"images/class_0/0.png": b"new 0"} and not cache.exists()


def test_a_relaunch_deletes_the_checkpoints_a_finished_dp_trial_left(tmp_path):
    """A driver that died between a DP trial's result and the deletion of its checkpoints (intermediate models)
    left them for good: a relaunch skips the finished trial. It now deletes them; a non-DP trial's stay."""
    from bench.launcher import Launch, delete_finished_dp_runs, training_run_dir
    from bench.schema import NON_DP_ONLY, replace

    launch = Launch(storage=str(tmp_path / "storage"), cache_dir=str(tmp_path / "cache"))
    plain = tiny_trial("lora")
    private = replace(
        plain,
        privacy={"target_epsilon": 8.0, "sampling_rate": 0.1, "max_grad_norm": 1.0},
        optimization=NON_DP_ONLY,
    )
    for config in (plain, private):
        step = Path(training_run_dir(launch, config.trial_id)) / "checkpoint_000001"
        step.mkdir(parents=True)
        (step / "state.pt").write_bytes(b"weights")
    delete_finished_dp_runs([plain, private], launch)
    assert Path(training_run_dir(launch, plain.trial_id)).is_dir()
    assert not Path(training_run_dir(launch, private.trial_id)).exists()
    delete_finished_dp_runs([private], launch)  # already gone: nothing to do


def test_results_and_artifacts_are_readable_by_the_umask_s_users(tmp_path):
    """mkstemp's 0600 stayed on the renamed result: another user of a shared storage read it as invalid."""
    import os
    import stat

    from trainables.models.checkpoints import atomic_write

    previous = os.umask(0o022)
    try:
        path = ResultStore(tmp_path / "storage").write(
            make_result(tiny_trial("lora"), status="failed", error="x")
        )
        artifact = atomic_write(tmp_path / "artifact.bin", lambda tmp: tmp.write_bytes(b"pixels"))
    finally:
        os.umask(previous)
    for written in (Path(path), artifact):
        assert stat.S_IMODE(written.stat().st_mode) == 0o644, written


def test_a_sweep_stopped_before_its_trials_ended_says_so_and_exits_as_interrupted(
    tmp_path, capsys, monkeypatch
):
    """Tune catches the first Ctrl-C itself and stops every running trial: the sweep listed them as failed
    ("no result written") and exited 1. They are now "not finished", and the command exits as interrupted (130)."""
    import bench.__main__ as cli
    import bench.launcher as launcher
    from bench.launcher import summarise

    store = ResultStore(tmp_path / "storage")
    done, broken, stopped = (tiny_trial("lora", seed=seed) for seed in range(3))
    store.write(make_result(done, status="success"))
    store.write(make_result(broken, status="failed", error="RuntimeError: out of memory"))
    summary = summarise("s", [done, broken, stopped], store, skipped=1, tail="1m")
    out = capsys.readouterr().out
    assert summary == {"ran": 3, "skipped": 1, "failed": 1, "unfinished": 1}
    assert "1 trials finished, 1 failed, 1 not finished, 1 skipped, 1m" in out
    assert f"failed: {broken.label} ({broken.trial_id}): RuntimeError: out of memory" in out
    assert f"not finished: {stopped.label} ({stopped.trial_id}): no result written; a relaunch resumes" in out
    monkeypatch.setattr(launcher, "run_sweep", lambda *a, **k: summary)
    assert cli.main(["sweep", "demo", "--storage", str(tmp_path / "s")]) == 130
    assert "error: interrupted; relaunch the same command" in capsys.readouterr().err
    monkeypatch.setattr(launcher, "run_sweep", lambda *a, **k: {**summary, "unfinished": 0})
    assert cli.main(["sweep", "demo", "--storage", str(tmp_path / "s")]) == 1


def test_two_uri_storages_sharing_a_cache_stage_apart(tmp_path):
    """Every URI storage shares the default cache: two sweeps into two buckets staged a trial in one folder, the
    later emptied it under the earlier, and the earlier uploaded the later's files as its own."""
    cache = tmp_path / "cache"
    one, two = (ResultStore(f"file://{tmp_path}/{name}") for name in ("one", "two"))
    staged_one = one.artifacts_dir(CONFIG.trial_id, cache_dir=cache, fresh=True)
    fill(staged_one, FIRST_ATTEMPT)
    staged_two = two.artifacts_dir(CONFIG.trial_id, cache_dir=cache, fresh=True)
    assert staged_two != staged_one and tree(staged_one) == FIRST_ATTEMPT
    fill(staged_two, {"images/class_9/other.png": b"the other sweep's image"})
    one.publish(make_result(CONFIG, status="success"), artifacts_dir=staged_one)
    assert tree(tmp_path / "one" / "artifacts" / CONFIG.trial_id) == FIRST_ATTEMPT and staged_two.is_dir()
    two.publish(make_result(CONFIG, status="success"), artifacts_dir=staged_two)
    assert not list((cache / "staging").iterdir())  # each storage's folder goes with its last staged trial


@pytest.mark.parametrize("uri", [False, True])
def test_a_trial_another_running_sweep_trains_is_refused_and_freed_when_it_ends(tmp_path, uri):
    """Two sweeps sharing trials on one storage (Table 2's and 3's k = 32 cells) trained them at once: each resumed
    the other's checkpoints and emptied its artifacts, and a DP trial's steps ran twice with fresh noise while its
    ledger counted them once. A running sweep's claims refuse them by name; they go when it ends."""
    import json
    import time

    from bench.results import ClaimedError, claim_is_live

    storage = f"file://{tmp_path}/runs" if uri else str(tmp_path / "runs")
    first, second = ResultStore(storage), ResultStore(storage)
    ids, labels = ["a" * 16, "b" * 16], {"a" * 16: "lora-d16-flowers102-eps10-k32-s0"}
    with first.claimed(ids, sweep="table2", labels=labels):
        claim = first.read_claim(ids[0])
        assert claim["sweep"] == "table2" and claim_is_live(claim, now=time.time())
        with pytest.raises(
            ClaimedError, match=r"1 trial\(s\) of this sweep are being trained by another sweep"
        ):
            with second.claimed([ids[1], "c" * 16], sweep="table3"):
                pytest.fail("claimed a trial another sweep holds")
        assert second.read_claim("c" * 16) is None  # nothing claimed when refused
        with pytest.raises(
            ClaimedError, match=rf"lora-d16-flowers102-eps10-k32-s0 \({ids[0]}\): sweep 'table2'"
        ):
            with second.claimed(ids, sweep="table3", labels=labels):
                pass
    assert first.read_claim(ids[0]) is None and second.read_claim(ids[1]) is None
    with second.claimed(ids, sweep="table3"):  # free once the first ended
        pass
    if not uri:
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["results"]  # no claims/ left behind
    # A claim left by a killed driver: on its machine free at once, elsewhere once its heartbeat is stale.
    gone = {"host": claim["host"], "pid": 2**22 + 12345, "heartbeat": time.time(), "token": "x"}
    other_host = {**gone, "host": "another-machine", "pid": 1}
    now = time.time()
    assert not claim_is_live(gone, now=now)
    assert claim_is_live(other_host, now=now) and not claim_is_live(other_host, now=now + 301)
    (tmp_path / "runs" / "claims").mkdir(exist_ok=True)  # the storage's folder, whether named by path or URI
    (tmp_path / "runs" / "claims" / f"{ids[0]}.json").write_text(json.dumps(gone))
    with second.claimed(ids, sweep="table3"):
        assert second.read_claim(ids[0])["sweep"] == "table3"


RACING_DRIVER = """
import sys, time
from bench.results import ClaimedError, ResultStore
store, start = ResultStore(sys.argv[1]), float(sys.argv[2])
ids = [f"{i:016x}" for i in range(200)]
time.sleep(max(0.0, start - time.time()))
try:
    with store.claimed(ids, sweep=sys.argv[3]):
        print("claimed", flush=True)
        time.sleep(1.0)
except ClaimedError:
    print("refused", flush=True)
"""


def test_two_drivers_starting_together_on_a_local_storage_do_not_both_claim_a_trial(tmp_path):
    """Both found no claim, then both wrote theirs (10 of 10 simultaneous starts; 200 trials, a start 5 ms after
    the other's got in too): each sweep then resumed the other's checkpoints. The check and the writing hold a lock."""
    import time

    storage = str(tmp_path / "runs")
    ResultStore(storage)
    start = time.time() + 3.0  # both past their imports, then at once
    drivers = [
        subprocess.Popen(
            [sys.executable, "-c", RACING_DRIVER, storage, str(start), name],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        for name in ("table2", "table3")
    ]
    outcomes = sorted(driver.communicate(timeout=120)[0].strip() for driver in drivers)
    assert outcomes == ["claimed", "refused"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["results"]  # no claims/ left behind


def test_the_claims_lock_is_shared_bounded_and_optional(tmp_path, monkeypatch, capsys):
    """The lock file was made with the umask's 0644, so a second user of a shared storage could not open it; a held
    lock waited for ever; a file system without locks (ENOLCK) ended the driver with a bare OSError."""
    import errno
    import fcntl

    import bench.results as results
    from bench.results import StorageError

    store, ids = ResultStore(tmp_path / "runs"), ["a" * 16]
    lock = tmp_path / "runs" / "results" / ".claims.lock"
    with store.claimed(ids, sweep="one"):
        pass
    assert lock.stat().st_mode & 0o777 == 0o666
    holder = os.open(lock, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    monkeypatch.setattr(results, "CLAIMS_LOCK_WAIT_S", 0.3)
    with pytest.raises(StorageError, match=r"claims' lock .* has been held by another process for 0 s"):
        with store.claimed(ids, sweep="two"):
            pytest.fail("claimed under another's lock")
    os.close(holder)
    assert store.read_claim(ids[0]) is None  # nothing claimed while refused

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(results.fcntl, "flock", no_locks)
    with store.claimed(ids, sweep="three"):
        assert store.read_claim(ids[0])["sweep"] == "three"
    assert "claims unlocked" in capsys.readouterr().err


def test_a_running_sweep_s_claims_are_refreshed_while_it_runs(tmp_path):
    import time

    store = ResultStore(tmp_path / "runs")
    ids = [CONFIG.trial_id, "a" * 16]
    with store.claimed(ids, sweep="demo", refresh_s=0.05):
        first = store.read_claim(ids[1])["heartbeat"]
        time.sleep(0.3)
        assert store.read_claim(ids[1])["heartbeat"] > first
        store.write(make_result(CONFIG, status="success"))  # a finished trial is released for other sweeps
        time.sleep(0.3)
        assert store.read_claim(CONFIG.trial_id) is None and store.read_claim(ids[1]) is not None


def test_a_killed_write_s_temporary_file_is_removed_when_the_store_opens_again(tmp_path):
    """A result write killed between its temporary file and the rename left ``results/.tmp-<hex>`` forever."""
    store = ResultStore(tmp_path)
    killed, under_way = tmp_path / "results" / ".tmp-killed", tmp_path / "results" / ".tmp-under-way"
    for tmp in (killed, under_way):
        tmp.write_text('{"status": "succ')
    os.utime(killed, (0, os.path.getmtime(killed) - 2 * 3600))
    store.write(make_result(CONFIG, status="success"))
    ResultStore(tmp_path)
    assert not killed.exists() and under_way.exists()  # another process's write keeps its own
    assert [Path(p).name for p in store.files()] == [f"{CONFIG.trial_id}.json"]


def test_hidden_json_files_are_no_results(tmp_path):
    """An analysis written into results/ keeps its manifest there (.varsweep-outputs.json): `status` listed it as
    an invalid result of another sweep."""
    store = ResultStore(str(tmp_path))
    config = tiny_trial("lora")
    store.write(make_result(config, status="success", metrics={"fid": 1.0}))
    (tmp_path / "results" / ".varsweep-outputs.json").write_text('{"files": []}')
    assert [Path(p).name for p in store.files()] == [f"{config.trial_id}.json"]


# A Google Cloud Storage bucket this machine cannot reach: the client's endpoint and the metadata server it asks for
# credentials are a closed local port, so nothing leaves the machine.
UNREACHABLE_GCS = """
import sys
from bench.results import ResultStore, StorageError
try:
    # what `bench status` does
    ResultStore("gs://varsweep-missing/runs?endpoint_override=127.0.0.1:9&scheme=http", create=False).require_folder()
except StorageError as err:
    sys.exit(str(err))
"""


def test_an_unreachable_gcs_storage_is_named_without_retrying_for_minutes():
    # pyarrow's client retried every call for minutes: `bench status gs://...` and a launch looked hung.
    env = {**os.environ, "GCE_METADATA_ROOT": "127.0.0.1:9", "GCE_METADATA_HOST": "127.0.0.1:9"}
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    done = subprocess.run(
        [sys.executable, "-c", UNREACHABLE_GCS], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and done.stderr.startswith("cannot reach storage gs://varsweep-missing/runs?")
    assert "check the bucket's name" in done.stderr


def test_a_trial_s_workers_open_a_uri_storage_without_the_short_probe():
    """The driver probes the storage before the sweep; a worker's store rides out a brief outage on its longer
    retries instead of failing the attempt on the 10-second probe (constructing it makes no call)."""
    store = ResultStore(
        "gs://varsweep-missing/runs?endpoint_override=127.0.0.1:9&scheme=http", create=False, reach=False
    )
    assert store.remote and store.root == "varsweep-missing/runs"
