"""The sweep harness on a simulated 2-node Ray cluster (one module-scoped cluster for all tests): DDP trials write
schema-valid results and upload their artifacts to a URI storage; a killed training worker is retried from its checkpoint; a killed sweep driver is relaunched
and finishes without re-running or losing any trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import ray
from conftest import REPO
from ray.cluster_utils import Cluster
from sweep_driver import driver_trials, tiny_trial

from bench.launcher import Launch, run_sweep
from bench.results import ResultStore
from bench.schema import PrivacyConfig, check_result

pytestmark = pytest.mark.slow


# Every process of this module's cluster that runs our code (trial actors, Train controllers and workers) inherits
# the job's runtime environment, so this variable marks them: a test kills only its own cluster's workers, never
# those of another Ray on the same host.
CLUSTER_MARK = "VARSWEEP_TEST_CLUSTER"


@pytest.fixture(scope="module")
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    cluster.mark = uuid.uuid4().hex
    ray.init(
        address=cluster.address,
        runtime_env={
            "env_vars": {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900", CLUSTER_MARK: cluster.mark}
        },
    )
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _launch(tmp_path: Path, **changes) -> Launch:
    return Launch(storage=str(tmp_path / "storage"), cache_dir=str(tmp_path / "cache"), **changes)


def test_two_node_sweep_with_ddp_trials(cluster, tmp_path):
    """On a URI storage (file://, which takes the object-store path): results, Train checkpoints and the trials'
    artifacts, staged by rank 0 under the cache and uploaded before the result, all land in the storage."""
    dp = PrivacyConfig(target_epsilon=4.0, sampling_rate=0.02, max_grad_norm=1.0)
    configs = [tiny_trial("full", workers=2), tiny_trial("lora", workers=2, privacy=dp)]
    launch = Launch(storage=f"file://{tmp_path}/storage", cache_dir=str(tmp_path / "cache"))
    outcome = run_sweep("two-node", configs, launch, verbose=0)
    assert outcome["failed"] == 0 and outcome["ran"] == 2 and outcome["concurrency"] == 2
    storage = tmp_path / "storage"
    records = ResultStore(storage).all()
    assert sorted(r["trial_id"] for r in records) == sorted(c.trial_id for c in configs)
    for record in records:
        assert check_result(record) and record["status"] == "success"
        assert record["environment"]["world_size"] == 2 and record["metrics"]["fid"] > 0
        assert record["cost"]["train_pflops"] > 0 and record["history"][-1]["step"] == 6
        artifacts = record["artifacts"]
        assert (storage / artifacts["adapter"]).is_file() and list(
            (storage / artifacts["generated_images"]).glob("class_*/*.png")
        )
    assert not list((tmp_path / "cache" / "staging").glob("*")) and not (tmp_path / "cache" / "work").exists()
    private = next(r for r in records if r["privacy"])
    assert private["privacy"]["world_size"] == 2 and private["privacy"]["epsilon_rdp"] <= 4.0
    assert not (
        storage / "train" / f"trial-{private['trial_id']}"
    ).exists()  # a DP trial's checkpoints go with its result
    again = run_sweep("two-node", configs, launch, verbose=0)
    assert again["ran"] == 0 and again["skipped"] == 2


def _train_workers(mark: str) -> list[psutil.Process]:
    """The Ray Train worker processes of the cluster whose processes carry ``CLUSTER_MARK=mark``."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if "RayTrainWorker" not in " ".join(process.info["cmdline"] or []):
            continue
        try:
            if process.environ().get(CLUSTER_MARK) == mark:
                found.append(process)
        except psutil.Error:  # gone, or another user's process: not ours
            continue
    return found


def _decoy(mark: str | None) -> subprocess.Popen:
    """A process that looks like a Ray Train worker (by its command line) of the cluster marked ``mark``."""
    env = {k: v for k, v in os.environ.items() if k != CLUSTER_MARK} | ({CLUSTER_MARK: mark} if mark else {})
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "RayTrainWorker"], env=env)


def test_only_the_marked_clusters_workers_are_found():
    mark = uuid.uuid4().hex
    ours, other, unmarked = _decoy(mark), _decoy(uuid.uuid4().hex), _decoy(None)
    try:
        assert [p.pid for p in _train_workers(mark)] == [ours.pid]
    finally:
        for process in (ours, other, unmarked):
            process.kill()
            process.wait()


def test_killed_worker_resumes_from_checkpoint(cluster, tmp_path):
    steps = 300
    config = tiny_trial("lora", steps=steps, checkpoint_every=20, seed=11)
    launch = _launch(tmp_path)
    outcome = {}
    thread = threading.Thread(
        target=lambda: outcome.update(run_sweep("kill-worker", [config], launch, verbose=0))
    )
    thread.start()
    run_dir = Path(launch.train_storage) / f"trial-{config.trial_id}"
    deadline = time.time() + 600
    # The second checkpoint's folder appears after the first one was registered (reports are barriers): resuming
    # from step 20 or later is then certain.
    while len(list(run_dir.glob("step_*"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    bystander = _decoy(None)  # a worker of another Ray on this host: must survive
    workers = _train_workers(cluster.mark)
    assert workers, "no Ray Train worker of this test's cluster found to kill"
    for worker in workers:
        worker.send_signal(signal.SIGKILL)
    thread.join(timeout=900)
    assert bystander.poll() is None
    bystander.kill()
    bystander.wait()
    record = ResultStore(launch.storage).read(config.trial_id)
    assert outcome["failed"] == 0 and record["status"] == "success"
    assert record["data"]["resumed_from_step"] >= 20
    logged = [entry["step"] for entry in record["history"]]
    expected = [
        s + 1 for s in range(steps) if s % 15 == 0 or s == steps - 1
    ]  # log_every = min(50, steps // 20)
    assert logged == expected  # the checkpoint's history continues: nothing lost, nothing logged twice


def test_killed_driver_relaunch_finishes_the_sweep(cluster, tmp_path):
    storage, count, steps = tmp_path / "storage", 2, 30
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    driver = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tests" / "sweep_driver.py"),
            str(storage),
            cluster.address,
            str(count),
            str(steps),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    results = storage / "results"
    deadline = time.time() + 600
    while not list(results.glob("*.json")) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    first = {p.name: json.loads(p.read_text()) for p in results.glob("*.json")}
    assert len(first) >= 1
    outcome = run_sweep(
        "driver",
        driver_trials(count, steps),
        Launch(storage=str(storage), cache_dir=str(storage / "cache"), max_concurrent=1),
        verbose=0,
    )
    final = {p.name: json.loads(p.read_text()) for p in results.glob("*.json")}
    assert outcome["failed"] == 0 and outcome["skipped"] >= len(
        [r for r in first.values() if r["status"] == "success"]
    )
    assert sorted(final) == sorted(f"{c.trial_id}.json" for c in driver_trials(count, steps))
    assert all(r["status"] == "success" for r in final.values())
    for name, record in first.items():  # finished before the kill: kept, not re-run
        if record["status"] == "success":
            assert final[name]["finished_at"] == record["finished_at"]
