"""How many trials a sweep runs at once follows what the cluster can grow to (the autoscaler's node types and
limits, here the repo's own cluster.yaml), not only what it has at launch; a local Ray without an autoscaler
keeps fitting its current resources; trials started beyond the current resources queue, they do not fail."""

from __future__ import annotations

import dataclasses
import logging
import shutil

import pytest
import ray
import yaml
from conftest import REPO
from sweep_driver import tiny_trial

from bench.launcher import (
    POLL_INTERVAL_ENV,
    POLL_INTERVAL_S,
    RUNTIME_ENV_VARS,
    Launch,
    autoscaling_limits,
    check_fits,
    concurrency,
    fixed_cluster,
    limits_from_cluster_config,
    limits_from_gcs,
    read_cluster_config,
    run_sweep,
)
from bench.preflight import SweepError
from bench.results import ResultStore
from bench.schema import TrialConfig

HEAD_ONLY = {
    "CPU": 8.0,
    "GPU": 0.0,
    "memory": 3e10,
}  # what cluster.yaml's head reports before any worker joined


def trial(*, workers: int = 1, gpus: float = 1.0, cpus: float = 8.0, seed: int = 0) -> TrialConfig:
    """A trial asking for ``workers`` x (``gpus`` GPUs + ``cpus`` CPUs), like the paper's (1 GPU + 8 CPUs)."""
    base = tiny_trial(seed=seed)
    return dataclasses.replace(
        base,
        resources=dataclasses.replace(
            base.resources, workers=workers, gpus_per_worker=gpus, cpus_per_worker=cpus
        ),
    )


def launch(tmp_path, **changes) -> Launch:
    return Launch(storage=str(tmp_path / "storage"), cache_dir=str(tmp_path / "cache"), **changes)


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_is_the_shape_these_numbers_assume(cluster_yaml):
    types = cluster_yaml["available_node_types"]
    assert cluster_yaml["max_workers"] == 4 and types["head"]["resources"]["GPU"] == 0
    assert (types["gpu_h100x8"]["max_workers"], types["gpu_h100x8"]["resources"]["GPU"]) == (4, 8)
    # no 1-GPU type: the autoscaler sent the first and last trials of a sweep there, and a 48 GB L40S cannot hold
    # a d20 step
    assert {name for name, t in types.items() if t["resources"]["GPU"]} == {"gpu_h100x8"}


def test_one_gpu_trials_fill_every_gpu_the_autoscaler_can_start(tmp_path):
    limits = read_cluster_config(str(REPO / "cluster.yaml"))
    configs = [trial(seed=s) for s in range(50)]
    # 4 x 8 H100; the head has no GPU.
    assert concurrency(configs, launch(tmp_path), resources=HEAD_ONLY, limits=limits) == (
        32,
        f"the autoscaler's node types and limits, {REPO / 'cluster.yaml'}",
    )
    # the old rule, the head's resources at launch, ran them one at a time
    assert concurrency(configs, launch(tmp_path), resources=HEAD_ONLY, limits=None)[0] == 1


def test_eight_gpu_trials_fit_the_h100_nodes(tmp_path):
    limits = read_cluster_config(str(REPO / "cluster.yaml"))
    # one trial per 8-GPU node
    assert (
        concurrency([trial(workers=8, gpus=1.0)], launch(tmp_path), resources=HEAD_ONLY, limits=limits)[0]
        == 4
    )


@pytest.mark.parametrize("cap,expected", [(1, 8), (2, 16), (8, 32)])
def test_global_max_workers_caps_the_nodes(cluster_yaml, tmp_path, cap, expected):
    # `cap` nodes at most, each type within its own limit
    limits = limits_from_cluster_config({**cluster_yaml, "max_workers": cap}, source="capped")
    assert concurrency([trial()], launch(tmp_path), resources=HEAD_ONLY, limits=limits)[0] == expected


def test_a_node_type_without_its_own_limit_takes_the_global_one(cluster_yaml, tmp_path):
    types = {
        name: {k: v for k, v in spec.items() if k != "max_workers"}
        for name, spec in cluster_yaml["available_node_types"].items()
    }
    limits = limits_from_cluster_config(
        {**cluster_yaml, "available_node_types": types, "max_workers": 3}, source="defaults"
    )
    assert (
        concurrency([trial()], launch(tmp_path), resources=HEAD_ONLY, limits=limits)[0] == 24
    )  # 3 H100 nodes


def test_current_resources_decide_when_they_fit_more(tmp_path):
    limits = read_cluster_config(str(REPO / "cluster.yaml"))
    big = {"CPU": 2000.0, "GPU": 64.0}  # more than the config allows (nodes added by hand, say)
    count, source = concurrency([trial()], launch(tmp_path), resources=big, limits=limits)
    assert count == 64 and source.startswith("the cluster's current resources")


def test_without_an_autoscaler_the_current_resources_decide(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "HOME", str(tmp_path)
    )  # no ~/ray_bootstrap_config.yaml, and Ray not started: no GCS record
    assert autoscaling_limits(launch(tmp_path)) is None
    cpu_trials = [trial(gpus=0.0, cpus=1.0, seed=s) for s in range(4)]
    assert concurrency(cpu_trials, launch(tmp_path), resources={"CPU": 2.0}, limits=None) == (
        2,
        "the cluster's current resources; no autoscaler",
    )
    assert (
        concurrency([trial(gpus=1.0)], launch(tmp_path), resources={"CPU": 16.0, "GPU": 3.0}, limits=None)[0]
        == 3
    )


def test_a_ray_up_head_is_found_by_its_bootstrap_config(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(REPO / "cluster.yaml", tmp_path / "ray_bootstrap_config.yaml")
    limits = autoscaling_limits(launch(tmp_path))
    assert limits is not None and limits.source == str(tmp_path / "ray_bootstrap_config.yaml")
    assert concurrency([trial()], launch(tmp_path), resources=HEAD_ONLY, limits=limits)[0] == 32


def test_limits_an_autoscaler_reported_to_the_gcs(tmp_path):
    # KubeRay-style autoscaler v2 platforms report node groups (max_count -1: no limit) and total caps instead.
    from ray.core.generated.autoscaler_pb2 import ClusterConfig, NodeGroupConfig

    groups = [
        NodeGroupConfig(name="head", resources={"CPU": 8}, max_count=1),
        NodeGroupConfig(name="gpu8", resources={"CPU": 192, "GPU": 8}, max_count=4),
    ]
    limits = limits_from_gcs(ClusterConfig(node_group_configs=groups, max_resources={"GPU": 20}))
    assert concurrency([trial()], launch(tmp_path), resources=HEAD_ONLY, limits=limits) == (
        20,
        "the autoscaler's node types and limits, as reported to the GCS",
    )
    unlimited = limits_from_gcs(
        ClusterConfig(
            node_group_configs=[NodeGroupConfig(name="gpu1", resources={"CPU": 8, "GPU": 1}, max_count=-1)]
        )
    )
    assert (
        concurrency(
            [trial(seed=s) for s in range(7)], launch(tmp_path), resources=HEAD_ONLY, limits=unlimited
        )[0]
        == 7
    )
    assert limits_from_gcs(ClusterConfig()) is None and limits_from_gcs(None) is None


def test_max_concurrent_decides_over_everything(tmp_path):
    limits = read_cluster_config(str(REPO / "cluster.yaml"))
    assert concurrency([trial()], launch(tmp_path, max_concurrent=3), resources=HEAD_ONLY, limits=limits) == (
        3,
        "--max-concurrent",
    )


@pytest.mark.parametrize("bad", [0, -1, -8, 2.5, True, "2"])
def test_max_concurrent_must_be_a_positive_count(tmp_path, bad):
    with pytest.raises(SweepError, match=r"--max-concurrent must be >= 1, got"):
        launch(tmp_path, max_concurrent=bad)


@pytest.mark.parametrize("bad", [0, -5.0, float("inf"), float("nan"), "60", True])
def test_worker_start_timeout_must_be_positive_seconds(tmp_path, bad):
    with pytest.raises(SweepError, match="worker start timeout must be a positive number of seconds"):
        launch(tmp_path, worker_start_timeout_s=bad)


def test_a_trial_no_node_type_can_place_is_refused(tmp_path):
    limits = read_cluster_config(str(REPO / "cluster.yaml"))
    check_fits([trial(workers=32, gpus=1.0)], limits)  # 4 H100 nodes: fits
    too_big = trial(gpus=1.0, cpus=512.0, seed=1)  # no node has 512 CPUs, and one worker cannot span nodes
    with pytest.raises(
        SweepError,
        match=rf"trial {too_big.label} \({too_big.trial_id}\) needs 1 worker\(s\) x 1 GPU \+ 512 CPU; .* cannot place it",
    ):
        check_fits([trial(), too_big], limits)
    check_fits([too_big], None)  # no limits given: nothing is known to refuse it


def test_without_an_autoscaler_config_a_local_ray_refuses_and_a_cluster_warns(monkeypatch, capsys):
    """No autoscaler config found: a Ray this sweep started never grows (refused); a cluster it connected to may
    have an autoscaler that reported nothing (KubeRay's): a warning, and the trial waits for a node that can."""
    import bench.launcher as launcher

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": False}])
    monkeypatch.setattr(launcher, "_started_here", lambda: True)
    with pytest.raises(SweepError, match=r"the running Ray cluster \(1 node\(s\), 2 CPU and 0 GPU in all\)"):
        launcher.check_current_nodes([trial(gpus=1.0, cpus=1.0)])
    launcher.check_current_nodes([trial(gpus=0.0, cpus=2.0)])  # fits: nothing said
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(launcher, "_started_here", lambda: False)
    launcher.check_current_nodes([trial(gpus=1.0, cpus=1.0)])
    out = capsys.readouterr().out
    assert (
        out.startswith("warning: trial ") and "No autoscaler config was found (--cluster-config FILE" in out
    )


def test_a_trial_no_node_of_a_cluster_without_autoscaler_can_place_is_refused():
    """A local Ray or a fixed cluster will not grow: a trial none of its nodes can place would wait forever (Train
    re-requests the worker group without limit), so the launcher refuses it once connected."""
    limits = fixed_cluster([{"CPU": 2.0, "memory": 1e10}, {"CPU": 8.0, "GPU": 1.0, "memory": 1e10}])
    check_fits([trial(gpus=1.0, cpus=8.0), trial(workers=5, gpus=0.0, cpus=2.0)], limits)  # 1 + 4 slots
    for too_big in (trial(workers=2), trial(gpus=0.0, cpus=9.0), trial(workers=6, gpus=0.0, cpus=2.0)):
        with pytest.raises(
            SweepError,
            match=r"the running Ray cluster \(2 node\(s\), 10 CPU and 1 GPU in all\) "
            r"cannot place it \(set the sweep's resources, e.g. --workers",
        ):
            check_fits([too_big], limits)


@pytest.mark.parametrize(
    "text,problem",
    [
        ("max_workers: [", "cannot read it as YAML"),
        ("- a list", "not a mapping"),
        ("max_workers: 2\n", "no available_node_types"),
        ("available_node_types: {gpu: {max_workers: 1}}\n", "node type gpu declares no resources"),
        (
            "available_node_types: {gpu: {max_workers: lots, resources: {GPU: 1}}}\n",
            "node type gpu: max_workers must be a whole number >= 0, got 'lots'",
        ),
        (
            "available_node_types: {gpu: {max_workers: 2, resources: {GPU: -1}}}\n",
            r"node type gpu: resources.GPU must be a number >= 0, got -1",
        ),
        (
            "max_workers: 1.5\navailable_node_types: {gpu: {resources: {GPU: 1}}}\n",
            "max_workers must be a whole number >= 0, got 1.5",
        ),
    ],
)
def test_a_bad_cluster_config_is_named(tmp_path, text, problem):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(SweepError, match=rf"cluster config {path}.*{problem}"):
        read_cluster_config(str(path))
    with pytest.raises(SweepError, match="cluster config .*does-not-exist.yaml: no such file"):
        read_cluster_config(str(tmp_path / "does-not-exist.yaml"))


def test_a_bad_cluster_config_fails_the_dry_run_before_anything_starts(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("available_node_types: {}\n")
    with pytest.raises(SweepError, match="no available_node_types"):
        run_sweep("bad-cluster", [tiny_trial()], launch(tmp_path, cluster_config=str(path)), dry_run=True)
    assert not (tmp_path / "storage").exists() and not (tmp_path / "cache").exists()


@pytest.fixture
def one_cpu_ray(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "HOME", str(tmp_path)
    )  # this machine is no `ray up` head, whatever the user's home holds
    # Ray's default token auth would keep a token from this home in the process (and RAY_AUTH_MODE=token in its
    # environment) after the fixture: a later module's cluster, started under the real home, would then refuse
    # this process's client (InvalidAuthToken).
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=1, logging_level=logging.ERROR, runtime_env={"env_vars": RUNTIME_ENV_VARS})
    yield
    ray.shutdown()


@pytest.mark.slow  # 2-5 min on 2 shared cores (a local Ray, a tiny base, two trials one after the other)
def test_trials_beyond_the_resources_queue_and_finish(one_cpu_ray, tmp_path, capsys):
    # Two 1-CPU trials at once on a 1-CPU Ray: the second one's workers cannot be placed until the first trial
    # ends. A 3 s start timeout makes its Train controller give up and re-request them several times meanwhile;
    # with max_failures=0 any of those counted as a failure would fail the trial.
    configs = [
        dataclasses.replace(c, resources=dataclasses.replace(c.resources, max_failures=0))
        for c in (tiny_trial("lora", seed=1), tiny_trial("lora", seed=2))
    ]
    outcome = run_sweep("queue", configs, launch(tmp_path, max_concurrent=2, worker_start_timeout_s=3.0))
    assert outcome["concurrency"] == 2 and outcome["failed"] == 0 and outcome["ran"] == 2
    assert [ResultStore(tmp_path / "storage").status(c.trial_id) for c in configs] == ["success", "success"]
    assert "up to 2 at a time (from --max-concurrent)" in capsys.readouterr().out


def test_train_passes_the_poll_interval_on_to_its_controller():
    """The launcher's poll interval only reaches Train's controller (which reads it once, at its start) because
    Train copies the variables of this list from the process that calls ``fit``; a Ray upgrade that drops it would
    bring back a 2 s wait per report, 7.5x a short trial's wall time (docs/benchmarks.md)."""
    from ray.train.v2._internal.constants import ENV_VARS_TO_PROPAGATE, HEALTH_CHECK_INTERVAL_S_ENV_VAR

    assert POLL_INTERVAL_ENV == HEALTH_CHECK_INTERVAL_S_ENV_VAR and POLL_INTERVAL_ENV in ENV_VARS_TO_PROPAGATE
    assert 0 < POLL_INTERVAL_S < 1


def test_each_trial_s_tune_actor_asks_for_the_head():
    """Train 2.60 starts a trial's controller on its Tune actor's node: an actor placed on a spot GPU node took
    its trial down with the node (Tune retries none). Every Ray head holds this resource; no other node does."""
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    from bench.launcher import TRIAL_FUNCTION_RESOURCES

    assert 0 < TRIAL_FUNCTION_RESOURCES[HEAD_NODE_RESOURCE_NAME] <= 0.001
    assert TRIAL_FUNCTION_RESOURCES["CPU"] == 0
