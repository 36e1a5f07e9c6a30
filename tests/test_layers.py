"""Imports point one way. Three layers:

- the contract (configs, the result schema, the result store, names, sweeps as data, how image files decode):
  ``bench.errors``, ``bench.schema``, ``bench.results``, ``bench.cli``, ``bench.estimates``, ``bench.roc``,
  ``bench.sweeps.*``, ``bench.pixels``; it imports only the standard library, other contract modules, (the result
  store, for URIs) pyarrow and (the decoding) PIL and numpy;
- ``trainables`` and ``analysis``: each imports the contract, third-party packages and itself, never the other
  (``trainables.models`` imports only torch and itself);
- the top: ``bench.launcher``, ``bench.preflight``, ``bench.sweep_file``, ``bench.tracking``, ``bench.demo``,
  ``bench.__main__``, ``trainables.ray_worker`` and the ``varsweep`` command, which may import anything; nothing
  imports them but the top.

Every import of every module counts, function-level ones included (parsed, not executed)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bench", "analysis", "trainables", "varsweep")
CONTRACT = (
    "bench.errors",
    "bench.schema",
    "bench.results",
    "bench.cli",
    "bench.estimates",
    "bench.roc",
    "bench.sweeps",
    "bench.pixels",
)
TOP = (
    "bench.launcher",
    "bench.preflight",
    "bench.sweep_file",
    "bench.tracking",
    "bench.demo",
    "bench.__main__",
    "trainables.ray_worker",
    "varsweep",
)
# The result store opens URIs through pyarrow; training and the analysis's grids decode images alike through PIL.
CONTRACT_THIRD_PARTY = {"bench.results": {"pyarrow"}, "bench.pixels": {"PIL", "numpy"}}
HEAVY = ("torch", "ray", "opacus", "peft", "pandas", "matplotlib")


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(f"{p}.") for p in prefixes)


def layer(module: str) -> str:
    """ "contract", "trainables", "analysis" or "top" (``bench/__init__`` counts as contract: it is empty)."""
    if _within(module, TOP):
        return "top"
    if module == "bench" or _within(module, CONTRACT):
        return "contract"
    if _within(module, ("trainables", "analysis")):
        return module.split(".")[0]
    raise AssertionError(f"{module} belongs to no layer: add it to CONTRACT or TOP in tests/test_layers.py")


def modules(root: Path = REPO) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) of every import statement in the file, relative ones resolved (``known``: the
    modules of the tree, to tell ``from package import module`` from ``from module import name``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from . import x" and "from pkg import module" name modules: count each as its own import.
            names = [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
            out += [(name, node.lineno) for name in names if name in known] or [(base, node.lineno)]
    return out


def wrong_arrows(root: Path = REPO) -> list[tuple[str, str]]:
    """(where: "file:line: module (layer) imports target", the rule it breaks) of every wrong import."""
    problems = []
    known = modules(root)
    for module, path in known.items():
        here = layer(module)
        for target, line in imports(module, path, known):
            top_name = target.split(".")[0]
            where = f"{path.relative_to(root)}:{line}: {module} ({here}) imports {target}"
            if top_name in sys.stdlib_module_names or top_name == "__future__":
                continue
            if top_name not in PACKAGES:  # third party
                if here == "contract" and top_name not in CONTRACT_THIRD_PARTY.get(module, set()):
                    problems.append((where, "the contract imports only the standard library"))
                if _within(module, ("trainables.models",)) and top_name != "torch":
                    problems.append((where, "trainables.models imports only torch"))
                continue
            there = layer(target)
            if here == "contract" and there != "contract":
                problems.append((f"{where} ({there})", "the contract imports nothing above it"))
            elif here in ("trainables", "analysis") and there not in ("contract", here):
                problems.append((f"{where} ({there})", f"{here} imports only the contract and itself"))
            elif _within(module, ("trainables.models",)) and not _within(target, ("trainables.models",)):
                problems.append((where, "trainables.models imports only torch"))
    return problems


def test_imports_point_one_way():
    problems = wrong_arrows()
    assert not problems, f"{len(problems)} import(s) point the wrong way:\n" + "\n".join(
        f"{where}: {rule}" for where, rule in problems
    )


def test_the_checker_finds_each_kind_of_wrong_arrow(tmp_path):
    """A small tree with one wrong arrow of each kind, function-level and relative imports among them."""
    files = {
        "bench/__init__.py": "",
        "bench/launcher.py": "import ray\nfrom trainables import trial\n",
        "bench/schema.py": "import json\n\ndef late():\n    from .launcher import run_sweep\n    import torch\n",
        "analysis/__init__.py": "",
        "analysis/load.py": "import pandas\nfrom bench import schema\nfrom trainables.trial import run_trial\n",
        "trainables/__init__.py": "",
        "trainables/trial.py": "from analysis.load import load_results\nfrom bench.schema import utc_now\n",
        "trainables/models/__init__.py": "import numpy\nfrom ..trial import run_trial\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = sorted(where for where, _ in wrong_arrows(tmp_path))
    expected = [
        "analysis/load.py:3: analysis.load (analysis) imports trainables.trial (trainables)",
        "bench/schema.py:4: bench.schema (contract) imports bench.launcher (top)",
        "bench/schema.py:5: bench.schema (contract) imports torch",
        "trainables/models/__init__.py:1: trainables.models (trainables) imports numpy",
        "trainables/models/__init__.py:2: trainables.models (trainables) imports trainables.trial",
        "trainables/trial.py:1: trainables.trial (trainables) imports analysis.load (analysis)",
    ]
    assert found == expected


def test_contract_modules_import_nothing_heavy():
    """One fresh interpreter imports the contract modules one by one; the first whose import brings in a heavy
    package is named with it."""
    contract = sorted(m for m in modules() if layer(m) == "contract")
    code = (
        "import importlib, json, sys\nfound = {}\n"
        f"for name in {contract!r}:\n    importlib.import_module(name)\n"
        f"    heavy = [m for m in {HEAVY!r} if m in sys.modules and not any(m in v for v in found.values())]\n"
        "    if heavy:\n        found[name] = heavy\nprint(json.dumps(found))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == {}, f"contract modules pull in heavy packages: {result.stdout}"
