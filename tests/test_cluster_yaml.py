"""cluster.yaml passes Ray's own cluster-launcher validation offline (no cloud credentials) and keeps its promises:
a GPU-less head, GPU worker types with autoscaling limits, varsweep installed on every node at the versions
constraints.txt pins (Ray exactly the driver's) and at one pinned commit, the aws extra on the head so that Ray's
AWS node provider loads, shared storage mounted (a security group the EFS mount target can let in), GPU nodes on
an AMI with a new enough NVIDIA driver, apt waiting for the boot's own package work, the dashboard bound to
localhost. The node commands are run here as Ray runs them, against fakes of the tools they call."""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import shlex
import subprocess
import tomllib
from importlib.metadata import requires, version
from pathlib import Path

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


def _installed_closure(root: str) -> dict[str, str]:
    """{canonical name: installed version} of ``root`` and everything it pulls in here (markers evaluated)."""
    found: dict[str, str] = {}
    seen = set()
    todo = [Requirement(root)]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if (name, frozenset(requirement.extras)) in seen:
            continue
        seen.add((name, frozenset(requirement.extras)))
        found[name] = version(name)
        for line in requires(name) or []:
            dependency = Requirement(line)
            extras = sorted(requirement.extras) or [""]
            if dependency.marker is None or any(dependency.marker.evaluate({"extra": e}) for e in extras):
                todo.append(dependency)
    return found


def test_every_package_the_install_pulls_in_is_pinned_at_its_installed_version():
    # setuptools among them: torch requires it at run time, and a plain `pip freeze` leaves it out of the file.
    pins = _constraints()
    installed = _installed_closure("varsweep[train,tracking,dev,aws]")
    del installed["varsweep"]  # editable, the checkout itself
    assert "setuptools" in installed
    unpinned = {name: v for name, v in installed.items() if pins.get(name) != v}
    assert not unpinned, f"installed here but not pinned so in constraints.txt: {unpinned}"
    lines = (REPO / "Makefile").read_text().split("\nconstraints:\n")[1].split("\n\n")[0]
    assert "pip freeze --all --exclude-editable | grep -v '^pip=='" in lines


# What a node needs to come up: a security group the EFS mount target lets in, a GPU AMI with a new enough NVIDIA
# driver, one commit on every node, apt waiting for the boot's own package work, downloads left unfiltered.

GPU_AMI_PLACEHOLDER = "ami-0123456789abcdef0"  # the GPU node types' ImageId as shipped (FILL IN)


def _header() -> str:
    """cluster.yaml's leading comment: the FILL IN list."""
    lines = (REPO / "cluster.yaml").read_text().splitlines()
    return "\n".join(itertools.takewhile(lambda line: line.startswith("#"), lines))


def _run_like_ray(command: str, home: Path, path: Path | None = None) -> subprocess.CompletedProcess:
    """``command`` as Ray's command runner runs it on a node (in a bash subshell), with HOME=``home`` and ``path``
    (fakes of the tools it calls) first on the PATH."""
    env = {**os.environ, "HOME": str(home)}
    if path is not None:
        env["PATH"] = f"{path}:{env['PATH']}"
    return subprocess.run(
        ["bash", "-c", f"({command})"], env=env, capture_output=True, text=True, timeout=120
    )


def _fake(folder: Path, name: str, script: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text("#!/bin/sh\n" + script)
    (folder / name).chmod(0o755)


def test_every_node_type_names_the_same_security_group_and_ray_leaves_it_alone(cluster, monkeypatch):
    # Without SecurityGroupIds Ray creates ray-autoscaler-varsweep (its own members and SSH only): the EFS mount
    # target's group lets no NFS in from it, the mount fails and so does every node's setup.
    from ray.autoscaler._private.aws import config as aws_config

    groups = [t["node_config"].get("SecurityGroupIds") for t in cluster["available_node_types"].values()]
    assert groups[0] and all(g == groups[0] for g in groups), groups  # one group: all traffic between members
    assert all(re.fullmatch(r"sg-[0-9a-f]{8,17}", g) for g in groups[0]), groups[0]

    def upsert(config, node_types):
        raise AssertionError(f"Ray would create or change a security group for {node_types}")

    monkeypatch.setattr(aws_config, "_upsert_security_groups", upsert)
    configured = aws_config._configure_security_group(prepare_config(copy.deepcopy(cluster)))
    assert [
        t["node_config"]["SecurityGroupIds"] for t in configured["available_node_types"].values()
    ] == groups
    header = _header()
    assert "SecurityGroupIds" in header and "2049" in header


def test_gpu_node_types_need_an_ami_with_a_new_enough_nvidia_driver(cluster, tmp_path):
    types = cluster["available_node_types"]
    head_ami = types[cluster["head_node_type"]]["node_config"]["ImageId"]
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    gpu_amis = {t["node_config"]["ImageId"] for t in gpu_types}
    assert len(gpu_amis) == 1 and head_ami not in gpu_amis  # the head's plain Ubuntu has no NVIDIA driver
    header = _header()
    assert "ImageId" in header and "580" in header
    # The head stops `ray up` while the GPU AMI is the placeholder (~/ray_bootstrap_config.yaml: this file, as
    # Ray writes it for the autoscaler).
    (guard,) = [c for c in cluster["head_setup_commands"] if "ray_bootstrap_config" in c]
    for ami, refused in ((GPU_AMI_PLACEHOLDER, True), ("ami-0fedcba9876543210", False)):
        config = copy.deepcopy(cluster)
        for node_type in config["available_node_types"].values():
            if node_type["resources"].get("GPU", 0) > 0:
                node_type["node_config"]["ImageId"] = ami
        (tmp_path / "ray_bootstrap_config.yaml").write_text(json.dumps(config))
        done = _run_like_ray(guard, tmp_path)
        assert (done.returncode != 0, "FILL IN" in done.stderr) == (refused, refused), (ami, done.stderr)
    # Every worker type has GPUs: no NVIDIA driver, or one older than CUDA 13's minimum (580), fails the setup.
    (check,) = [c for c in cluster["worker_setup_commands"] if "nvidia-smi" in c]
    assert all(t in gpu_types for t in types.values() if t is not types[cluster["head_node_type"]])
    for output, accepted in (
        ("580.65.06", True),
        ("590.44.01\n590.44.01", True),
        ("575.57.08", False),
        ("", False),
    ):
        script = f"printf '{output}\\n'\n" if output else "echo 'NVIDIA-SMI has failed' >&2; exit 9\n"
        _fake(tmp_path / "bin", "nvidia-smi", script)
        done = _run_like_ray(check, tmp_path, tmp_path / "bin")
        assert (done.returncode == 0) == accepted, (output, done.stderr)
        assert accepted or "580" in done.stderr


def _git(*args: str, cwd: Path) -> str:
    identity = [
        "-c",
        "user.name=varsweep",
        "-c",
        "user.email=varsweep@example.com",
        "-c",
        "init.defaultBranch=main",
    ]
    done = subprocess.run(["git", *identity, *args], cwd=cwd, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def test_every_node_checks_out_one_pinned_commit(cluster, tmp_path):
    # The head, a reused head and every autoscaled worker run the same code: one commit, not a branch's tip then.
    git_commands = [c for c in cluster["setup_commands"] if re.search(r"\bgit ", c)]
    others = cluster["head_setup_commands"] + cluster["worker_setup_commands"]
    assert git_commands and not [c for c in others if re.search(r"\bgit ", c)]
    assert not [c for c in git_commands if re.search(r"origin/|checkout .*-B|pip ", c)], git_commands
    (pinned,) = {
        commit for c in git_commands if "checkout" in c for commit in re.findall(r"\b[0-9a-f]{40}\b", c)
    }
    # The same commands against a local repository whose branch moves on: a new node, then the same node again
    # (a reused head, or a worker `ray up` updates) once the pin moved to a commit pushed after its clone.
    origin, work, node = tmp_path / "origin.git", tmp_path / "work", tmp_path / "node"
    _git("init", "-q", "--bare", str(origin), cwd=tmp_path)
    _git("clone", "-q", str(origin), str(work), cwd=tmp_path)
    node.mkdir()

    def push(message: str) -> str:
        _git("commit", "-q", "--allow-empty", "-m", message, cwd=work)
        _git("push", "-q", "origin", "HEAD:main", cwd=work)
        return _git("rev-parse", "HEAD", cwd=work)

    for commit in (push("pinned first"), push("pinned second")):
        push("the branch moved on")
        for command in git_commands:
            command = re.sub(r"(https://|ssh://|git@)\S+", str(origin), command).replace(pinned, commit)
            done = _run_like_ray(command, node)
            assert done.returncode == 0, (command, done.stderr)
        assert _git("rev-parse", "HEAD", cwd=node / "varsweep") == commit  # not the branch's tip


def test_apt_waits_for_the_boots_own_package_work(cluster, tmp_path):
    # Right after boot cloud-init and unattended-upgrades hold apt's locks; apt-get would fail at once.
    setup = cluster["setup_commands"]
    first_apt = next(i for i, c in enumerate(setup) if "apt-get" in c)
    (wait,) = [c for c in setup[:first_apt] if "cloud-init status --wait" in c]
    apt_calls = [call for c in setup for call in re.findall(r"apt-get [^;&|]*", c)]
    assert apt_calls and all("DPkg::Lock::Timeout=" in call for call in apt_calls), apt_calls
    # cloud-init's "done, with warnings" (status 2) goes on; apt-get update, which does not wait for its lists
    # lock, is retried, and apt-get install runs once it succeeded, never after it kept failing.
    _fake(tmp_path / "bin", "cloud-init", "exit 2\n")
    assert _run_like_ray(wait, tmp_path, tmp_path / "bin").returncode == 0
    _fake(tmp_path / "bin", "sleep", "exit 0\n")
    _fake(
        tmp_path / "bin",
        "sudo",
        'echo "$*" >> "$HOME/apt.log"\n'
        'case "$*" in *" update"*) test "$(grep -c " update" "$HOME/apt.log")" -gt "$(cat "$HOME/fails")";; esac\n',
    )
    (install,) = [c for c in setup if "apt-get" in c and " update" in c]
    for fails, succeeds in ((3, True), (1000, False)):
        (tmp_path / "fails").write_text(str(fails))
        (tmp_path / "apt.log").write_text("")
        done = _run_like_ray(install, tmp_path, tmp_path / "bin")
        calls = (tmp_path / "apt.log").read_text().splitlines()
        installs = [call for call in calls if " install " in call]
        assert (done.returncode == 0, len(installs)) == (succeeds, int(succeeds)), (fails, calls)
        assert sum(" update" in call for call in calls) == (fails + 1 if succeeds else len(calls))


def test_downloads_are_not_filtered_and_land_in_the_named_folder(cluster):
    # Nothing is synced up (no file_mounts; jobs ship the code with --working-dir): rsync_exclude and rsync_filter
    # would only filter `ray rsync-down`, where the old exclude "runs" dropped every downloaded run.
    assert not cluster["file_mounts"] and not cluster.get("cluster_synced_files")
    assert not cluster.get("rsync_exclude") and not cluster.get("rsync_filter")
    # rsync copies a source folder without a trailing slash into the destination (./x/analysis/...).
    downloads = re.findall(r"ray rsync-down cluster\.yaml (\S+) (\S+)", (REPO / "README.md").read_text())
    assert downloads and all(src.endswith("/") and dst.endswith("/") for src, dst in downloads), downloads
