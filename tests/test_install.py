"""The install variants (pyproject.toml): the bare package is the analysis side and runs without torch and Ray;
the training side (`varsweep[train]`), when missing, is named with the command that installs it; the `varsweep`
console command wraps both entry points; the packages whose internals varsweep uses carry upper bounds; `make`
refuses a Python older than 3.11 and replaces a venv such a Python left.

The light-install tests run fresh interpreters of this venv with the training side's packages made unimportable
(a ``sitecustomize`` on PYTHONPATH puts a finder first on ``sys.meta_path`` that refuses them), which is what a
light install looks like to varsweep; the ``slow`` test builds a real one in a new venv."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
import venv
from importlib.metadata import packages_distributions, requires, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from analysis.paper import paper_fixture

REPO = Path(__file__).resolve().parents[1]
HEAVY_EXTRAS = ("train", "tracking")
# The training side's core: whatever else the extras hold, these must be among the refused modules.
TRAINING_CORE = {"torch", "torchvision", "ray", "opacus", "peft", "torch_fidelity"}
TRAIN_INSTALL = "pip install 'varsweep[train]'"
# The line README.md quotes for `varsweep sweep demo` from an analysis-only install: torch is named first.
TORCH_MISSING = (
    "error: torch is not installed: this command needs varsweep's training side, which an analysis-only install"
    f" leaves out; install it with: {TRAIN_INSTALL}"
)
# Packages whose internals (private attributes, non-exported modules) varsweep uses: each needs an upper bound.
INTERNALS_USED = {
    "torch": "torch._dynamo.config, aten._scaled_dot_product_* ops, Module._compiled_call_impl",
    "torchvision": "dataset attributes _image_files, _labels, _samples",
    "opacus": "grad_sample_module's create_or_accumulate_grad_sample, Parameter._forward_counter",
    "peft": "peft.tuners.tuners_utils.BaseTunerLayer, peft.tuners.ln_tuning.layer.LNTuningLayer",
    "torch-fidelity": "torch_fidelity.metric_fid / metric_kid / metric_prc functions",
    "ray": "ray.autoscaler._private (the suite), Train V2 callbacks",
}
BLOCKER = """\
import sys

REFUSED = frozenset({names})


class RefuseTrainingSide:
    \"\"\"Makes the training side's packages look uninstalled, as in `pip install varsweep`.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in REFUSED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, RefuseTrainingSide())
"""


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def training_import_names() -> set[str]:
    """Import names of the distributions the heavy extras add to the bare package (e.g. scikit-learn: sklearn)."""
    base = {canonicalize_name(Requirement(r).name) for r in project()["dependencies"]}
    extras = project()["optional-dependencies"]
    heavy = {canonicalize_name(Requirement(r).name) for e in HEAVY_EXTRAS for r in extras[e]} - base
    names = {
        module
        for module, distributions in packages_distributions().items()
        if any(canonicalize_name(d) in heavy for d in distributions)
    }
    return names | {name.replace("-", "_") for name in heavy}  # an extra's package not installed here


@pytest.fixture(scope="module")
def light(tmp_path_factory) -> dict[str, str]:
    """The environment of a light install: this venv with the training side refused."""
    folder = tmp_path_factory.mktemp("light")
    refused = sorted(training_import_names())
    assert TRAINING_CORE <= set(refused), TRAINING_CORE - set(refused)
    (folder / "sitecustomize.py").write_text(BLOCKER.format(names=json.dumps(refused)))
    return {**os.environ, "PYTHONPATH": str(folder), "VARSWEEP_DEBUG": ""}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A finished sweep's storage: one result per published cell (the analysis tests' fixture)."""
    storage = tmp_path_factory.mktemp("paper") / "storage"
    paper_fixture(storage)
    return storage


def run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def console_command() -> str:
    """The `varsweep` script pip installed beside this interpreter (`make install` puts it there)."""
    script = Path(sys.executable).parent / "varsweep"
    assert script.exists(), f"{script} is missing: reinstall the project (make install)"
    return str(script)


def test_the_blocker_refuses_the_training_side(light, tmp_path):
    # Without this, a blocker that blocks nothing would let every light-install test pass vacuously.
    for module in sorted(TRAINING_CORE):
        done = run([sys.executable, "-c", f"import {module}"], light, tmp_path)
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, module


def test_analysis_makes_tables_figures_and_report_without_the_training_side(light, results, tmp_path):
    out = tmp_path / "out"
    done = run([sys.executable, "-m", "analysis", str(results), "--out", str(out)], light, REPO)
    assert done.returncode == 0, done.stderr
    assert "53 trials: 53 succeeded" in done.stdout and "index.html" in done.stdout
    for made in ("index.html", "index.md", "trials.csv", "trials.parquet", "tables/table1_fid.csv"):
        assert (out / made).is_file(), made
    assert list((out / "figures").glob("*.png")) and list((out / "figures").glob("*.pdf"))


def test_the_console_command_runs_the_analysis_without_the_training_side(light, results, tmp_path):
    script = console_command()
    out = tmp_path / "out"
    done = run([script, "analysis", str(results), "--out", str(out), "--no-figures"], light, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (out / "index.html").is_file() and (out / "trials.parquet").is_file()
    alias = run([script, "report", "--help"], light, tmp_path)  # `report` is the same command
    assert alias.returncode == 0 and "usage: python -m analysis" in alias.stdout, alias.stderr
    helped = run([script, "--help"], light, tmp_path)
    assert helped.returncode == 0, helped.stderr
    for word in ("varsweep analysis", "python -m analysis", "python -m bench", "sweep", "status", "demo"):
        assert word in helped.stdout, word
    bare = run([script], light, tmp_path)
    assert bare.returncode == 2 and bare.stderr.splitlines()[-1].startswith("error: ")


def test_a_sweep_without_the_training_side_says_what_to_install(light, tmp_path):
    """... and creates nothing first (it made the storage's results/ and cache/ folders, then stopped)."""
    for command in ([sys.executable, "-m", "bench"], [console_command()]):
        for args in (["sweep", "demo", "--storage", "runs"], ["sweep", "demo"], ["demo"]):
            done = run([*command, *args], light, tmp_path)
            last = done.stderr.strip().splitlines()[-1]
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
            assert last == TORCH_MISSING, last
            assert not list(tmp_path.iterdir()), args
    readme = (REPO / "README.md").read_text()
    assert f"$ varsweep sweep demo\n{TORCH_MISSING}\n" in readme


def test_the_installed_metadata_is_this_pyproject():
    # The checks below read the installed metadata; it must be the current pyproject's (else: make install).
    installed = {str(Requirement(r)) for r in requires("varsweep") or []}
    declared = {str(Requirement(r)) for r in project()["dependencies"]}
    for extra, lines in project()["optional-dependencies"].items():
        declared |= {str(Requirement(f'{r}; extra == "{extra}"')) for r in lines}
    assert installed == declared, "the installed varsweep is older than pyproject.toml: run make install"


def test_packages_whose_internals_are_used_have_upper_bounds_that_hold_here():
    requirements = {
        canonicalize_name(Requirement(r).name): Requirement(r) for r in requires("varsweep") or []
    }
    for name, internals in INTERNALS_USED.items():
        requirement = requirements.get(name)
        assert requirement is not None, f"{name} is not a requirement of varsweep"
        bounded = any(spec.operator in ("<", "<=", "==", "~=", "===") for spec in requirement.specifier)
        assert bounded, f"{requirement}: no upper bound, but varsweep uses {internals}"
        assert requirement.specifier.contains(version(name), prereleases=True), (
            f"{name} {version(name)} is installed, outside {requirement}"
        )


def test_the_light_install_installs_no_training_package():
    base = {canonicalize_name(Requirement(r).name) for r in project()["dependencies"]}
    heavy = {"torch", "torchvision", "ray", "opacus", "peft", "torch-fidelity", "scikit-learn", "mlflow"}
    assert not base & heavy, base & heavy
    assert project()["scripts"]["varsweep"] == "varsweep.__main__:main"


@pytest.mark.slow  # ~1-2 min: a new venv and the light dependencies from the registry (or pip's cache)
def test_the_light_install_in_a_new_venv_runs_the_analysis_without_torch(results, tmp_path):
    source = tmp_path / "source"  # a copy: building from the checkout would leave build/ in it
    source.mkdir()
    for part in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy2(REPO / part, source / part)
    for package in ("bench", "trainables", "analysis", "varsweep"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    venv.create(tmp_path / "venv", with_pip=True)
    python, script = tmp_path / "venv" / "bin" / "python", tmp_path / "venv" / "bin" / "varsweep"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = [str(python), "-m", "pip", "install", "--quiet", "-c", "constraints.txt", "."]
    done = run(install, env, source)
    assert done.returncode == 0, done.stderr
    absent = run([str(python), "-c", "import torch"], env, tmp_path)
    assert absent.returncode != 0 and "No module named 'torch'" in absent.stderr
    done = run([str(script), "analysis", str(results), "--out", str(tmp_path / "out")], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "index.html").is_file() and list((tmp_path / "out" / "figures").glob("*.png"))
    done = run([str(script), "sweep", "demo", "--storage", str(tmp_path / "runs")], env, tmp_path)
    assert done.returncode == 2 and TRAIN_INSTALL in done.stderr.strip().splitlines()[-1], done.stderr


OLD_PYTHON = """\
#!/bin/sh
case "$1" in --version|-V) echo "Python 3.10.12";; *) exit 1;; esac
"""


# Debian's and Ubuntu's python3 without the python3.11-venv package: `-m venv` makes the venv without pip, prints
# Debian's advice and exits 1 (as seen there, with its ensurepip taken away). Its own pip installing pip into the venv
# is done here with the venv's ensurepip, offline; everything else is the real Python.
DEBIAN_PYTHON = """\
#!/bin/sh
case "$1 $2 $3" in
  "-m venv --clear")
    case "$*" in *--without-pip*) exec {python} "$@";; esac
    {python} -m venv --clear --without-pip "$4" && echo "ensurepip is not available ... apt install python3.11-venv"
    exit 1;;
  "-m pip --python")
    echo "$*" >> pip-calls
    [ -e no-system-pip ] && exit 1
    exec "$4" -m ensurepip --default-pip;;
esac
exec {python} "$@"
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_makes_the_venv_where_python_has_no_ensurepip_and_mends_a_half_made_one(tmp_path):
    # Where `python3 -m venv` fails (no ensurepip), `make demo` used to stop, and every later run failed with
    # ".venv/bin/python: No module named pip": the half-made venv stayed. Reproduced on Debian 12's python3.11.
    shutil.copy2(REPO / "Makefile", tmp_path / "Makefile")
    for name in ("pyproject.toml", "constraints.txt"):
        (tmp_path / name).touch()
    debian = tmp_path / "python3"
    debian.write_text(
        DEBIAN_PYTHON.format(python=shlex.quote(str(Path(sys.base_prefix) / "bin" / "python3")))
    )
    debian.chmod(0o755)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS", "VENV", "PYTHON", "PIP_"))
    }
    # the recipe's pip upgrade stays offline (no index: pip is kept as it is)
    env["PIP_NO_INDEX"] = "1"
    venv_python = tmp_path / ".venv" / "bin" / "python"

    def make() -> subprocess.CompletedProcess:
        command = ["make", "--no-print-directory", str(venv_python.relative_to(tmp_path)), f"PYTHON={debian}"]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    def has_pip() -> bool:
        return subprocess.run([venv_python, "-m", "pip", "--version"], capture_output=True).returncode == 0

    done = make()
    assert done.returncode == 0 and "-m venv failed (above)" in done.stdout, done.stdout + done.stderr
    assert has_pip() and "install --quiet pip" in (tmp_path / "pip-calls").read_text()
    shutil.rmtree(tmp_path / ".venv")
    subprocess.run([debian, "-m", "venv", "--clear", "--without-pip", ".venv"], cwd=tmp_path, check=True)
    # a venv without pip that says it is installed (pip removed, or another tool's venv): made again and
    # installed in the same run (--clear deletes the stamp make has already read)
    (tmp_path / ".venv" / ".installed").touch()
    planned = subprocess.run(
        ["make", "--no-print-directory", "-n", "install", f"PYTHON={debian}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        "-m venv --clear .venv" in planned.stdout
        and "pip install --quiet -c constraints.txt" in planned.stdout
    )
    (tmp_path / ".venv" / ".installed").unlink()
    # the venv the old Makefile left: made again, now with pip
    done = make()
    assert done.returncode == 0 and ".venv has no pip" in done.stdout and has_pip(), done.stdout + done.stderr
    shutil.rmtree(tmp_path / ".venv")
    # no pip either: stopped, naming both packages, and no half-made venv is left
    (tmp_path / "no-system-pip").touch()
    done = make()
    assert done.returncode != 0 and "apt install python3.11-venv" in done.stderr, done.stderr
    assert "apt install python3-pip" in done.stderr and not (tmp_path / ".venv").exists()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_refuses_a_python_older_than_3_11_and_replaces_a_venv_one_left(tmp_path):
    # With a python3 older than 3.11, `make demo` used to make .venv with it and fail to install into it, then keep
    # failing with PYTHON=python3.11 too: the old venv stayed. Dry runs (-n) where the venv would be made.
    shutil.copy2(REPO / "Makefile", tmp_path / "Makefile")
    for name in ("pyproject.toml", "constraints.txt"):
        (tmp_path / name).touch()
    old = tmp_path / "python3.10"  # says it is 3.10 and fails the version check, as a real 3.10 does
    old.write_text(OLD_PYTHON)
    old.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS", "VENV", "PYTHON"))}

    def make(*args: str) -> subprocess.CompletedProcess:
        command = ["make", "--no-print-directory", *args, "VENV=.venv"]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    venv_python = tmp_path / ".venv" / "bin" / "python"
    done = make("install", f"PYTHON={old}")  # no venv: refused before one is made, naming the way out
    assert done.returncode != 0 and "PYTHON=python3.11" in done.stderr and "3.10.12" in done.stderr, (
        done.stderr
    )
    assert not (tmp_path / ".venv").exists()
    venv_python.parent.mkdir(parents=True)
    shutil.copy2(old, venv_python)  # the venv an older python3 left (its install failed)
    done = make("-n", "install", f"PYTHON={sys.executable}")
    assert done.returncode == 0 and f"{sys.executable} -m venv --clear .venv" in done.stdout, done.stdout
    assert "pip install --quiet -c constraints.txt" in done.stdout
    done = make("install", f"PYTHON={old}")  # the old one again: refused, the venv left as it was
    assert (
        done.returncode != 0 and "PYTHON=python3.11" in done.stderr and venv_python.read_text() == OLD_PYTHON
    )
    venv_python.unlink()
    venv_python.symlink_to(sys.executable)  # a venv of 3.11 or newer is kept
    (tmp_path / ".venv" / ".installed").touch()
    done = make("-n", "install")
    assert done.returncode == 0 and "-m venv" not in done.stdout and "pip install" not in done.stdout, (
        done.stdout
    )
