"""cluster.yaml passes Ray's own cluster-launcher validation offline (no cloud credentials) and keeps its promises:
a GPU-less head, GPU worker types with autoscaling limits, varsweep installed on every node, shared storage mounted,
the dashboard bound to localhost."""
from __future__ import annotations

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import REPO


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_ray_accepts_cluster_yaml(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_cluster_shape(cluster):
    types = cluster["available_node_types"]
    assert types[cluster["head_node_type"]]["resources"]["GPU"] == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert len(gpu_types) >= 1 and all(t["max_workers"] >= 1 and t["min_workers"] == 0 for t in gpu_types)
    setup = " ".join(cluster["setup_commands"])
    assert "pip install" in setup and "mount" in setup and "VARSWEEP_ASSETS" in setup
    assert "--dashboard-host=127.0.0.1" in " ".join(cluster["head_start_ray_commands"])


def test_validation_catches_a_broken_file(cluster):
    broken = copy.deepcopy(cluster)
    broken["head_node_type"] = "no_such_type"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))
