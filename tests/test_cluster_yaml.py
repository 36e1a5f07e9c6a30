"""cluster.yaml passes Ray's own cluster-launcher validation offline (no cloud credentials) and keeps its promises:
a GPU-less head, GPU worker types with autoscaling limits, varsweep installed on every node at the versions
constraints.txt pins (Ray exactly the driver's), the aws extra on the head so that Ray's AWS node provider loads,
shared storage mounted, the dashboard bound to localhost."""

from __future__ import annotations

import copy
import shlex
import tomllib
from importlib.metadata import version

import pytest
import ray
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from ray.autoscaler._private.util import prepare_config, validate_config


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


# The cluster's install: pinned, reproducible, and enough for the head's autoscaler to launch AWS workers.


def _pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments after ``pip install`` of every pip invocation in ``commands`` (shell lines joined by &&)."""
    found = []
    for command in commands:
        for part in command.split("&&"):
            words = shlex.split(part)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    found.append(words[i + 2 :])
    return found


def _constraints() -> dict[str, str]:
    """constraints.txt as {canonical name: pinned version}; every line must be an exact pin."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==" and not requirement.extras, (
                f"constraints.txt: {line} is not an exact pin"
            )
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _installs_with_constraints(args: list[str], extra: str | None) -> bool:
    """Whether pip ``args`` install this checkout editable (with ``extra``) under ``-c constraints.txt``."""
    constrained = any(a == "-c" and b == "constraints.txt" for a, b in zip(args, args[1:]))
    target = next((b for a, b in zip(args, args[1:]) if a == "-e"), "")
    path, _, extras = target.partition("[")
    return constrained and path == "." and (extra is None or extra in extras.rstrip("]").split(","))


def test_every_node_installs_varsweep_with_the_constraints(cluster):
    # the training side: the bare package is the analysis only (no torch, no Ray)
    assert any(_installs_with_constraints(args, "train") for args in _pip_installs(cluster["setup_commands"]))
    every = _pip_installs(
        cluster["setup_commands"] + cluster["head_setup_commands"] + cluster["worker_setup_commands"]
    )
    assert every and all(any(a == "-c" for a in args) for args in every)  # no unpinned pip install anywhere


def test_the_head_installs_the_aws_extra_with_the_constraints(cluster):
    # An empty head_setup_commands replaces Ray's AWS default (pip install boto3): the head then has no boto3.
    assert any(
        _installs_with_constraints(args, "aws") for args in _pip_installs(cluster["head_setup_commands"])
    )
    assert {canonicalize_name(Requirement(r).name) for r in _project()["optional-dependencies"]["aws"]} == {
        "boto3",
        "botocore",
    }


def test_ray_is_pinned_exactly_and_to_the_installed_version():
    (ray_requirement,) = [
        Requirement(r)
        for r in _project()["optional-dependencies"]["train"]
        if canonicalize_name(Requirement(r).name) == "ray"
    ]
    (spec,) = ray_requirement.specifier
    assert spec.operator == "==" and spec.version == ray.__version__ == _constraints()["ray"]
    assert {"default", "tune", "train"} <= ray_requirement.extras


def test_every_direct_dependency_is_pinned_to_a_version_it_allows():
    pins = _constraints()
    project = _project()
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    requirements = [r for r in requirements if r.name != project["name"]]  # `all`: varsweep's own extras
    assert {"boto3", "botocore"} <= {canonicalize_name(r.name) for r in requirements}
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} has no pin in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} is outside {requirement}"
        )
        assert "+" not in pins[name], f"{name}=={pins[name]}: a local build, not the registry's"


def test_this_environment_is_installed_as_the_cluster_installs():
    # the suite runs where `make install` put the pinned versions: what passes here is what the nodes get
    pins = _constraints()
    project = _project()
    extras = project["optional-dependencies"]
    for line in project["dependencies"] + [r for e in ("train", "tracking", "aws") for r in extras[e]]:
        name = canonicalize_name(Requirement(line).name)
        assert version(name) == pins[name], (
            f"{name} {version(name)} is installed, constraints.txt pins {pins[name]}"
        )


def test_makefile_installs_with_the_constraints_and_reinstalls_when_they_change():
    text = (REPO / "Makefile").read_text()
    rule = next(line for line in text.splitlines() if line.startswith("$(STAMP):"))
    assert "pyproject.toml" in rule and "constraints.txt" in rule
    assert '-c constraints.txt -e ".[$(EXTRAS)]"' in text
    (extras,) = [line.split(":=")[1].strip() for line in text.splitlines() if line.startswith("EXTRAS :=")]
    assert set(extras.split(",")) == {"train", "tracking", "dev", "aws"}  # the suite tests each of them


def test_ray_aws_node_provider_loads_and_accepts_the_node_configs(cluster, monkeypatch):
    # What the autoscaler does on the head before it can start a worker: import the AWS provider (boto3/botocore)
    # and build its EC2 clients. No request is sent; the instance metadata service is not consulted.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    from botocore.validate import validate_parameters
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.providers import _get_node_provider, _get_node_provider_cls

    assert _get_node_provider_cls(cluster["provider"]) is AWSNodeProvider
    provider = _get_node_provider(cluster["provider"], cluster["cluster_name"], use_cache=False)
    assert (
        isinstance(provider, AWSNodeProvider)
        and provider.ec2.meta.client.meta.region_name == cluster["provider"]["region"]
    )
    # The installed botocore knows every field the node types pass to EC2 RunInstances (e.g. spot InstanceMarketOptions).
    run_instances = provider.ec2.meta.client.meta.service_model.operation_model("RunInstances").input_shape
    for node_type in cluster["available_node_types"].values():
        validate_parameters({**node_type["node_config"], "MinCount": 1, "MaxCount": 1}, run_instances)
