"""A battery of bad inputs through every entry point: ``python -m bench sweep|status``, ``python -m analysis``, the
evaluation command, ``TrialConfig`` / ``from_dict``, checkpoint and adapter loading and the result store.

Each bad input must be refused before any compute with the project's own error: a command exits with status 2 and
its last stderr line starts with ``error:`` and names the offending value, path or field (no traceback anywhere);
a Python call raises a ``VarsweepError`` (or ``CheckpointError``) whose message names the input. The commands run
in-process (their ``main(argv)``) so the battery stays fast; a few run as real ``python -m`` processes. No case
trains a model or starts Ray (a guard fails any case that would reach the sweep's first compute step).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, TINY_VAR, TINY_VQVAE
from old_records import as_version
from test_datasets import jpeg, make_folder

from bench.errors import VarsweepError
from bench.results import ResultStore
from bench.schema import (
    SCHEMA_VERSION,
    DataConfig,
    EvaluationConfig,
    MethodConfig,
    ModelConfig,
    OptimizationConfig,
    PrivacyConfig,
    TrialConfig,
    make_result,
)
from bench.sweeps import build_sweep
from trainables.methods import adapt, load_adapter, save_adapter
from trainables.models import (
    CheckpointError,
    build_var,
    build_vqvae,
    load_var,
    load_vqvae,
    save_var,
    save_vqvae,
)
from trainables.models.checkpoints import checkpoint_sha256, read_state_dict

MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / f"varsweep-unpickled-{os.getpid()}"


class WritesMarker:
    """Unpickling this would create ``MARKER``: a checkpoint holding it must be refused without running it."""

    def __reduce__(self):
        return (Path.touch, (MARKER,))


@pytest.fixture(scope="module")
def a(tmp_path_factory):
    """Saved tiny checkpoints with sidecars, a small image folder, an adapter, valid results."""
    root = tmp_path_factory.mktemp("assets")
    var = build_var(**TINY_VAR, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    save_var(var, root / "var.pth")
    save_vqvae(build_vqvae(**TINY_VQVAE), root / "vqvae.pth")
    make_folder(root / "data")
    base = load_var(root / "var.pth", **TINY_VAR)
    adaptation = adapt(
        base,
        MethodConfig(name="lora", lora_rank=2),
        num_classes=2,
        seed=0,
        base_sha256=checkpoint_sha256(root / "var.pth"),
    )
    save_adapter(base, root / "adapter.pt", adaptation=adaptation)
    (root / "a-file").write_text("not a folder")
    torch.save(var.state_dict(), root / "plain.pth")  # no sidecar
    results = root / "storage"
    configs = build_sweep("demo", smoke=True)
    for config in configs[:2]:
        ResultStore(results).write(make_result(config, status="success", metrics={"fid": 3.0}))
    return SimpleNamespace(
        root=root,
        var=root / "var.pth",
        vqvae=root / "vqvae.pth",
        data=root / "data",
        adapter=root / "adapter.pt",
        file=root / "a-file",
        plain=root / "plain.pth",
        storage=results,
        configs=configs,
    )


@pytest.fixture(autouse=True)
def no_compute(monkeypatch):
    """A bad input must be refused before the sweep builds anything: reaching its first compute step fails."""

    def refuse(*args, **kwargs):
        raise AssertionError("compute started for a bad input")

    import trainables.trial

    monkeypatch.setattr(trainables.trial, "prepare_shared", refuse)


def copy_of(path: Path, tmp: Path, *, sidecar: bool = True) -> Path:
    """A private copy of a saved checkpoint (and its sidecar) to damage."""
    out = tmp / path.name
    out.write_bytes(path.read_bytes())
    if sidecar:
        Path(f"{out}.json").write_text(Path(f"{path}.json").read_text())
    return out


def assert_cli_refuses(code: int, err: str, needles) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for needle in needles:
        assert str(needle) in last, f"{needle!r} not named in the last line {last!r}"


# --- python -m bench sweep / status ---------------------------------------------------------------------------------
def _status_storage_file(a, t):
    return ["status", "demo", "--smoke", "--storage", str(a.file)], [a.file, "is a file"]


BENCH = {
    "unknown sweep": lambda a, t: (["sweep", "nosuch", "--dry-run"], ["'nosuch'", "invalid choice"]),
    "where without =": lambda a, t: (
        ["sweep", "demo", "--smoke", "--dry-run", "--where", "method.name"],
        ["method.name", "FIELD=VALUE"],
    ),
    "where unknown field": lambda a, t: (
        ["sweep", "demo", "--smoke", "--dry-run", "--where", "method.rank=16"],
        ["method.rank", "no such config field"],
    ),
    "where matches nothing": lambda a, t: (
        ["sweep", "demo", "--smoke", "--dry-run", "--where", "method.name=lora_mlp"],
        ["method.name=lora_mlp"],
    ),
    "max-concurrent 0": lambda a, t: (
        ["sweep", "demo", "--smoke", "--max-concurrent", "0", "--storage", str(t / "s")],
        ["--max-concurrent", "'0'"],
    ),
    "max-concurrent -1": lambda a, t: (
        ["sweep", "demo", "--smoke", "--max-concurrent", "-1", "--storage", str(t / "s")],
        ["--max-concurrent", "'-1'"],
    ),
    "max-concurrent x": lambda a, t: (
        ["sweep", "demo", "--smoke", "--max-concurrent", "x", "--storage", str(t / "s")],
        ["--max-concurrent", "'x'"],
    ),
    "storage not writable": lambda a, t: (
        ["sweep", "demo", "--smoke", "--storage", "/sys/varsweep-storage"],
        ["/sys/varsweep-storage", "not writable"],
    ),
    "storage is a file": lambda a, t: (
        ["sweep", "demo", "--smoke", "--storage", str(a.file)],
        [a.file, "is a file"],
    ),
    "storage under a file": lambda a, t: (
        ["sweep", "demo", "--smoke", "--storage", str(a.file / "runs")],
        [a.file / "runs"],
    ),
    "dry-run storage is a file": lambda a, t: (
        ["sweep", "demo", "--smoke", "--dry-run", "--storage", str(a.file)],
        [a.file, "is a file"],
    ),
    "unknown URI scheme": lambda a, t: (
        ["sweep", "demo", "--smoke", "--storage", "foo://x"],
        ["foo://x", "'foo'"],
    ),
    "malformed URI": lambda a, t: (
        ["sweep", "demo", "--smoke", "--storage", "file://relative/runs"],
        ["file://relative/runs"],
    ),
    "URI without a bucket": lambda a, t: (
        ["sweep", "demo", "--smoke", "--storage", "s3:///runs"],
        ["s3:///runs"],
    ),
    "paper sweep, assets nowhere": lambda a, t: (
        ["sweep", "table2", "--dry-run", "--assets", str(t / "nowhere"), "--storage", str(t / "s")],
        [t / "nowhere", "cannot run"],
    ),
    "paper sweep, assets nowhere, no dry run": lambda a, t: (
        [
            "sweep",
            "table2",
            "--assets",
            str(t / "nowhere"),
            "--storage",
            str(t / "s"),
            "--cache-dir",
            str(t / "cache"),
        ],
        [t / "nowhere", "cannot run"],
    ),
    "cache-dir is a file": lambda a, t: (
        ["sweep", "demo", "--smoke", "--storage", str(t / "s"), "--cache-dir", str(a.file)],
        ["--cache-dir", a.file],
    ),
    "dry-run cache-dir is a file": lambda a, t: (
        ["sweep", "demo", "--smoke", "--dry-run", "--storage", str(t / "s"), "--cache-dir", str(a.file)],
        ["--cache-dir", a.file],
    ),
    "cache-dir not writable": lambda a, t: (
        ["sweep", "demo", "--smoke", "--storage", str(t / "s"), "--cache-dir", "/sys/varsweep-cache"],
        ["--cache-dir", "/sys/varsweep-cache"],
    ),
    "unknown option": lambda a, t: (["sweep", "demo", "--smoke", "--dry-run", "--bogus"], ["--bogus"]),
    "status: missing storage": lambda a, t: (
        ["status", "demo", "--smoke", "--storage", str(t / "never")],
        [t / "never", "no storage folder"],
    ),
    "status: storage is a file": _status_storage_file,
    "status: unknown URI scheme": lambda a, t: (
        ["status", "demo", "--smoke", "--storage", "foo://x"],
        ["foo://x"],
    ),
    "status: unknown sweep": lambda a, t: (["status", "tabel1"], ["'tabel1'"]),
}


@pytest.mark.parametrize("case", sorted(BENCH))
def test_bench_refuses(case, a, tmp_path, capsys, monkeypatch):
    from bench.__main__ import main

    monkeypatch.chdir(tmp_path)  # a default storage (runs/sweeps) would land here, not in the checkout
    argv, needles = BENCH[case](a, tmp_path)
    assert_cli_refuses(main(argv), capsys.readouterr().err, needles)
    assert not (tmp_path / "s" / "cache").exists() and not (tmp_path / "runs").exists()  # nothing built


# Files in a results folder that are not valid results: `bench status` lists them as invalid (no crash), and a
# sweep does not count them as done.
def _valid(a, index=2):
    return make_result(a.configs[index], status="success", metrics={"fid": 1.0})


INVALID_RECORDS = {
    "truncated JSON": (lambda a: '{"schema_version": 1, "trial', "not JSON"),
    "not UTF-8": (lambda a: b"\xff\xfe{}", "not JSON"),
    "JSON list": (lambda a: "[1, 2]", "JSON object"),
    "config not matching its id": (
        lambda a: json.dumps({**_valid(a), "config": _valid(a, 3)["config"]}),
        "does not match its config",
    ),
    "bad status": (lambda a: json.dumps({**_valid(a), "status": "done"}), "status"),
    "another trial's result": (lambda a: json.dumps(_valid(a, 3)), "holds the result of trial"),
    "config of the wrong shape": (lambda a: json.dumps({**_valid(a), "config": {"model": 3}}), "model"),
    "a folder in its place": (lambda a: None, "cannot be read"),
}


@pytest.mark.parametrize("case", sorted(INVALID_RECORDS))
def test_status_lists_invalid_results_and_a_sweep_reruns_them(case, a, tmp_path, capsys):
    from bench.__main__ import main

    content, reason = INVALID_RECORDS[case]
    store = ResultStore(tmp_path)
    store.write(_valid(a, 0))
    text = content(a)
    target = Path(store.path(a.configs[2].trial_id))
    if text is None:
        target.mkdir()
    else:
        target.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert main(["status", "demo", "--smoke", "--storage", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    row = next(line for line in captured.out.splitlines() if a.configs[2].trial_id in line)
    assert " invalid " in row and reason in row, row
    assert "1 success, 1 invalid, 3 pending of 5 trials" in captured.out and "Traceback" not in captured.err
    assert store.status(a.configs[2].trial_id) is None  # never "success": the sweep runs the trial again
    assert [r["trial_id"] for r in store.all()] == [a.configs[0].trial_id]
    from bench.launcher import pending_trials  # imports Ray, starts nothing

    todo, done = pending_trials(a.configs, store)
    assert done == [a.configs[0]] and a.configs[2] in todo


def test_an_older_versions_result_at_its_own_id_is_old_and_stops_a_sweep(a, tmp_path, capsys):
    """Unlike an invalid file, a result of an older schema version is kept: `status` shows it as old and a sweep
    refuses to run its trial again until `upgrade-results` has rewritten it (tests/test_cli.py upgrades it)."""
    from bench.__main__ import main
    from bench.launcher import SweepError, refuse_older_results

    store = ResultStore(tmp_path)
    Path(store.path(a.configs[2].trial_id)).write_text(json.dumps({**_valid(a), "schema_version": 1}))
    assert main(["status", "demo", "--smoke", "--storage", str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if a.configs[2].trial_id in line)
    assert " old " in row and "upgrade-results" in row, row
    with pytest.raises(SweepError, match=rf"1 trial\(s\) to run .* \({a.configs[2].label}: "):
        refuse_older_results(a.configs, store)


def test_a_newer_versions_result_is_kept_and_stops_a_sweep(a, tmp_path, capsys):
    """A result a later varsweep wrote (another machine on the same storage) is neither read nor replaced: status
    names it, a sweep refuses to run its trial again, and the analysis says to upgrade varsweep."""
    from bench.__main__ import main
    from bench.launcher import SweepError, pending_trials, refuse_older_results

    store = ResultStore(tmp_path)
    store.write(_valid(a, 0))
    newer = {**_valid(a, 2), "schema_version": SCHEMA_VERSION + 1}
    Path(store.path(a.configs[2].trial_id)).write_text(json.dumps(newer))
    assert main(["status", "demo", "--smoke", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if a.configs[2].trial_id in line)
    assert " newer " in row and "upgrade varsweep" in row, row
    assert "1 success, 1 newer, 3 pending of 5 trials" in out
    todo, done = pending_trials(a.configs, store)
    with pytest.raises(
        SweepError, match=rf"1 trial\(s\) to run .*\({a.configs[2].label}: written by a newer"
    ):
        refuse_older_results(todo, store, done=done)
    assert json.loads(Path(store.path(a.configs[2].trial_id)).read_text()) == newer
    from analysis.__main__ import main as analysis_main

    assert analysis_main([str(tmp_path), "--out", str(tmp_path / "out"), "--no-figures", "--no-grids"]) == 2
    assert (
        f"schema_version: written by a newer varsweep (schema version {SCHEMA_VERSION + 1}"
        in capsys.readouterr().err
    )


def test_an_older_result_the_upgrade_cannot_take_does_not_stop_a_sweep(a, tmp_path, capsys):
    """Its config upgrades but the record does not validate: upgrade-results leaves it alone (naming why), so the
    sweep must not wait for an upgrade that never comes; the trial runs again."""
    from bench.__main__ import main
    from bench.launcher import refuse_older_results

    store = ResultStore(tmp_path)
    broken = {**as_version(_valid(a), 1), "metrics": "not a dict"}
    Path(store.path(broken["trial_id"])).write_text(json.dumps(broken))
    assert main(["upgrade-results", str(tmp_path)]) == 1
    assert f"{broken['trial_id']}.json: left alone: metrics" in capsys.readouterr().out
    assert store.upgrades_due(store.older_results()) == {}
    refuse_older_results(a.configs, store)


# --- python -m analysis ----------------------------------------------------------------------------------------------
def _invalid_only(a, t):
    (t / "invalid").mkdir()
    (t / "invalid" / "bad.json").write_text("{")
    return [str(t / "invalid"), "--out", str(t / "out")], ["bad.json", "not valid results"]


def _invalid_skipped(a, t):
    argv, _ = _invalid_only(a, t)
    return argv + ["--skip-invalid"], [t / "invalid", "no valid results"]


def _empty(a, t):
    (t / "empty").mkdir()
    return [str(t / "empty"), "--out", str(t / "out")], [t / "empty", "no result files"]


ANALYSIS = {
    "missing results folder": lambda a, t: (
        [str(t / "nowhere"), "--out", str(t / "out")],
        [t / "nowhere", "does not exist"],
    ),
    "empty folder": _empty,
    "results folder is a file": lambda a, t: (
        [str(a.file), "--out", str(t / "out")],
        [a.file, "is not a folder"],
    ),
    "only invalid files": _invalid_only,
    "only invalid files, skipped": _invalid_skipped,
    "where without =": lambda a, t: (
        [str(a.storage), "--out", str(t / "out"), "--where", "seed"],
        ["--where 'seed'", "FIELD=VALUE"],
    ),
    "where unknown field": lambda a, t: (
        [str(a.storage), "--out", str(t / "out"), "--where", "method.rnak=4"],
        ["method.rnak", "no such config field"],
    ),
    "where matches nothing": lambda a, t: (
        [str(a.storage), "--out", str(t / "out"), "--where", "optimization.seed=7"],
        ["optimization.seed=7"],
    ),
    "unknown extractor": lambda a, t: (
        [str(a.storage), "--out", str(t / "out"), "--extractor", "vgg"],
        ["'vgg'"],
    ),
    "table2 epsilon negative": lambda a, t: (
        [str(a.storage), "--out", str(t / "out"), "--table2-epsilon", "-1"],
        ["--table2-epsilon", "'-1'"],
    ),
    "table2 epsilon nan": lambda a, t: (
        [str(a.storage), "--out", str(t / "out"), "--table2-epsilon", "nan"],
        ["--table2-epsilon", "'nan'"],
    ),
    "out is a file": lambda a, t: ([str(a.storage), "--out", str(a.file)], [a.file, "is a file"]),
    "out not writable": lambda a, t: (
        [str(a.storage), "--out", "/sys/varsweep-analysis"],
        ["/sys/varsweep-analysis"],
    ),
    "out missing": lambda a, t: ([str(a.storage)], ["--out", "required"]),
    # an unset variable: the analysis wrote into (and pruned) the folder it ran in, or read it as the results
    "out empty": lambda a, t: ([str(a.storage), "--out", ""], ["--out", "an empty path"]),
    "results folder empty": lambda a, t: (["", "--out", str(t / "out")], ["results_dir", "an empty path"]),
    "unknown URI scheme": lambda a, t: (
        ["foo://results", "--out", str(t / "out")],
        ["foo://results", "'foo'"],
    ),
    "unknown option": lambda a, t: ([str(a.storage), "--out", str(t / "out"), "--grids"], ["--grids"]),
}


@pytest.mark.parametrize("case", sorted(ANALYSIS))
def test_analysis_refuses(case, a, tmp_path, capsys):
    from analysis.__main__ import main

    argv, needles = ANALYSIS[case](a, tmp_path)
    assert_cli_refuses(main(argv + ["--no-grids", "--no-figures"]), capsys.readouterr().err, needles)
    assert not (tmp_path / "out" / "tables").exists()  # nothing analysed


# --- python -m trainables.evaluation.evaluate ------------------------------------------------------------------------
def _evaluate_argv(a, t, **change):
    options = {
        "--var": a.var,
        "--vqvae": a.vqvae,
        "--dataset": "folder",
        "--root": a.data,
        "--split": "train",
        "--extractor": "substitute-randconv-v1",
        "--resolution": 16,
        "--cfg": 1.0,
        "--top-k": 0,
        "--top-p": 0,
        "--batch-size": 4,
        "--cache": t / "ref",
        "--out": t / "eval",
    }
    options.update(change)
    return [str(x) for key, value in options.items() if value is not None for x in (key, value)]


def _truncated(a, t):
    path = t / "cut.pth"
    data = a.plain.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return _evaluate_argv(a, t, **{"--var": path, "--depth": 2}), [path, "truncated"]


def _pickled(a, t):
    path = t / "object.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, path)
    return _evaluate_argv(a, t, **{"--var": path, "--depth": 2}), [path, "cannot read checkpoint"]


def _text_file(a, t):
    return _evaluate_argv(a, t, **{"--var": a.file, "--depth": 2}), [a.file, "cannot read checkpoint"]


def _bad_inception(a, t):
    (t / "inception.pth").write_bytes(b"not weights")
    return (
        _evaluate_argv(
            a, t, **{"--extractor": "inception-v3-compat", "--inception-weights": t / "inception.pth"}
        ),
        [t / "inception.pth", "not a readable Inception-v3"],
    )


def _sidecar_not_json(a, t):
    path = copy_of(a.var, t)
    Path(f"{path}.json").write_text("{ nope")
    return _evaluate_argv(a, t, **{"--var": path}), [f"{path}.json", "not valid JSON"]


def _damaged(a, t):
    path = copy_of(a.var, t)
    state = torch.load(path, weights_only=True)
    state["head.bias"] += 1.0
    torch.save(state, path)
    return _evaluate_argv(a, t, **{"--var": path}), [path, "SHA-256"]


def _adapter_without_sidecar(a, t):
    path = copy_of(a.adapter, t, sidecar=False)
    return _evaluate_argv(a, t, **{"--adapter": path}), [path, "no sidecar"]


def _corrupt_image(a, t):
    make_folder(t / "data")
    next((t / "data" / "train").rglob("*.png")).write_bytes(b"not an image")
    return _evaluate_argv(a, t, **{"--root": t / "data"}), [
        "unreadable image",
        "--skip-corrupt-images drops them",
    ]


def _more_classes_than_the_adapter(a, t):
    """The adapter was trained for 2 classes (its sidecar says so); the split has 3."""
    for c in range(3):
        for i in range(2):
            jpeg(t / "three" / "train" / f"c{c}" / f"{i}.jpg", seed=i)  # no .png: none is generated
    argv = _evaluate_argv(a, t, **{"--root": t / "three", "--adapter": a.adapter})
    return argv, ["the split has 3 classes", f"--adapter {a.adapter} has 2"]


def _adapter_on_a_deeper_base(a, t):
    deeper = save_var(build_var(**{**TINY_VAR, "depth": 3}), t / "deep.pth")
    argv = _evaluate_argv(a, t, **{"--var": deeper, "--adapter": a.adapter})
    return argv, [a.adapter, "another var-adapter architecture", "depth: saved 2, requested 3"]


def _adapter_on_another_base_file(a, t):
    other = save_var(build_var(**TINY_VAR, generator=torch.Generator().manual_seed(5)), t / "other.pth")
    return _evaluate_argv(a, t, **{"--var": other, "--adapter": a.adapter}), [a.adapter, "SHA-256"]


def _vqvae_of_other_tokens(a, t):
    other = save_vqvae(build_vqvae(**{**TINY_VQVAE, "vocab_size": 32}), t / "vq32.pth")
    return _evaluate_argv(a, t, **{"--vqvae": other}), [other, "vocab_size: VAR 64, VQVAE 32"]


def _other_classes_than_the_adapter(a, t):
    """The adapter records its training classes 'a' and 'b'; the split's are '10' and '2' (as many)."""
    base = load_var(a.var, **TINY_VAR)
    adaptation = adapt(base, MethodConfig(name="lora", lora_rank=2), num_classes=2, seed=0)
    path = save_adapter(base, t / "named.pt", adaptation=adaptation, class_names=["a", "b"])
    argv = _evaluate_argv(a, t, **{"--adapter": path})
    return argv, ["folder train", "missing from the split: 'a', 'b'; not trained on: '10', '2'"]


def _fewer_classes_than_an_unnamed_adapter(a, t):
    """The adapter records 2 classes and no names (saved before they were recorded); the split has 1 class."""
    for i in range(4):
        jpeg(t / "one" / "train" / "c0" / f"{i}.jpg", seed=i)
    argv = _evaluate_argv(a, t, **{"--root": t / "one", "--adapter": a.adapter})
    return argv, ["the split has 1 classes", f"--adapter {a.adapter} has 2", "records no class names"]


EVALUATE = {
    "missing checkpoint": lambda a, t: (
        _evaluate_argv(a, t, **{"--var": t / "absent.pth"}),
        [t / "absent.pth", "no such checkpoint"],
    ),
    "truncated checkpoint": _truncated,
    "pickle payload": _pickled,
    "not a checkpoint": _text_file,
    "checkpoint is a folder": lambda a, t: (_evaluate_argv(a, t, **{"--var": a.data}), [a.data]),
    "damaged weights": _damaged,
    "sidecar not JSON": _sidecar_not_json,
    "depth disagrees with sidecar": lambda a, t: (
        _evaluate_argv(a, t, **{"--depth": 3}),
        ["--depth 3", "depth=2", a.var],
    ),
    "num-classes disagrees with sidecar": lambda a, t: (
        _evaluate_argv(a, t, **{"--num-classes": 7}),
        ["--num-classes 7", "num_classes=5"],
    ),
    "no sidecar and no depth": lambda a, t: (
        _evaluate_argv(a, t, **{"--var": a.plain}),
        ["--depth", a.plain],
    ),
    "vqvae is a VAR checkpoint": lambda a, t: (
        _evaluate_argv(a, t, **{"--vqvae": a.var}),
        [f"{a.var}.json", "'var'"],
    ),
    "missing adapter": lambda a, t: (
        _evaluate_argv(a, t, **{"--adapter": t / "adapter.pt"}),
        ["--adapter", t / "adapter.pt"],
    ),
    "adapter without sidecar": _adapter_without_sidecar,
    "image folder missing": lambda a, t: (_evaluate_argv(a, t, **{"--root": t / "no-data"}), [t / "no-data"]),
    "image folder is a file": lambda a, t: (_evaluate_argv(a, t, **{"--root": a.file}), [a.file]),
    "corrupt image": _corrupt_image,
    "more classes than the adapter": _more_classes_than_the_adapter,
    "adapter on a deeper base": _adapter_on_a_deeper_base,
    "adapter on another base file": _adapter_on_another_base_file,
    "vqvae of other tokens": _vqvae_of_other_tokens,
    "other classes than the adapter": _other_classes_than_the_adapter,
    "fewer classes than an unnamed adapter": _fewer_classes_than_an_unnamed_adapter,
    "split of fewer than 4 images": lambda a, t: (
        _evaluate_argv(a, t, **{"--split": "test"}),
        ["folder test", "3 image(s)", "fewer than the 4"],
    ),
    "unknown dataset": lambda a, t: (_evaluate_argv(a, t, **{"--dataset": "imagenet"}), ["'imagenet'"]),
    "unknown split": lambda a, t: (_evaluate_argv(a, t, **{"--split": "val"}), ["'val'"]),
    "num-images 0": lambda a, t: (_evaluate_argv(a, t, **{"--num-images": 0}), ["--num-images", "'0'"]),
    "num-images negative": lambda a, t: (
        _evaluate_argv(a, t, **{"--num-images": -5}),
        ["--num-images", "'-5'"],
    ),
    "top-p 1": lambda a, t: (_evaluate_argv(a, t, **{"--top-p": 1.0}), ["--top-p", "'1.0'"]),
    "top-p negative": lambda a, t: (_evaluate_argv(a, t, **{"--top-p": -0.1}), ["--top-p", "'-0.1'"]),
    "top-k negative": lambda a, t: (_evaluate_argv(a, t, **{"--top-k": -1}), ["--top-k", "'-1'"]),
    "cfg negative": lambda a, t: (_evaluate_argv(a, t, **{"--cfg": -1}), ["--cfg", "'-1'"]),
    "cfg nan": lambda a, t: (_evaluate_argv(a, t, **{"--cfg": "nan"}), ["--cfg", "'nan'"]),
    "batch-size 0": lambda a, t: (_evaluate_argv(a, t, **{"--batch-size": 0}), ["--batch-size", "'0'"]),
    "seed 2**31": lambda a, t: (
        _evaluate_argv(a, t, **{"--seed": 2**31}),
        ["--sampling-seed/--seed", "'2147483648'", "[0, 2147483647]"],
    ),
    "resolution not the model's": lambda a, t: (
        _evaluate_argv(a, t, **{"--resolution": 32}),
        ["--resolution 32", "16px"],
    ),
    "missing inception weights": lambda a, t: (
        _evaluate_argv(a, t, **{"--extractor": "inception-v3-compat", "--inception-weights": t / "w.pth"}),
        ["--inception-weights", t / "w.pth"],
    ),
    "inception without weights": lambda a, t: (
        _evaluate_argv(a, t, **{"--extractor": "inception-v3-compat"}),
        ["--inception-weights"],
    ),
    "bad inception weights": _bad_inception,
    "unknown extractor": lambda a, t: (
        _evaluate_argv(a, t, **{"--extractor": "vgg"}),
        ["'vgg'", "--extractor"],
    ),
    "out is a file": lambda a, t: (_evaluate_argv(a, t, **{"--out": a.file}), ["--out", a.file]),
    "var missing": lambda a, t: (_evaluate_argv(a, t, **{"--var": None}), ["--var", "required"]),
}


@pytest.mark.parametrize("case", sorted(EVALUATE))
def test_evaluate_refuses(case, a, tmp_path, capsys):
    from trainables.evaluation.evaluate import main

    argv, needles = EVALUATE[case](a, tmp_path)
    assert_cli_refuses(main(argv), capsys.readouterr().err, needles)
    assert not list(tmp_path.rglob("*.png")) or case == "corrupt image"  # nothing generated


# --- TrialConfig and from_dict ---------------------------------------------------------------------------------------
def _dp(**change):
    return dict(target_epsilon=8.0, sampling_rate=0.1, max_grad_norm=1.0) | change


def _demo_dict(section, **change):
    record = build_sweep("demo", smoke=True)[1].to_dict()
    record[section] = {**record[section], **change}
    return record


def _delta_at_least_inverse_n(tmp):
    from bench.preflight import check_sweep

    make_folder(tmp / "data")  # 5 training images: delta 0.5 >= 1/N
    config = TrialConfig(
        data=DataConfig(dataset="folder", root=str(tmp / "data"), resolution=16),
        privacy=PrivacyConfig(**_dp(delta=0.5)),
        evaluation=EvaluationConfig(extractor="substitute-randconv-v1"),
    )
    check_sweep([config], cache_dir=str(tmp / "cache"), write=False)


CONFIGS = {
    "epsilon as a string": (lambda t: PrivacyConfig(**_dp(target_epsilon="10")), "privacy.target_epsilon"),
    "steps as a float": (lambda t: OptimizationConfig(steps=2.5), "optimization.steps"),
    "depth as a string": (lambda t: TrialConfig.from_dict(_demo_dict("model", depth="2")), "model.depth"),
    "learning rate as a string": (
        lambda t: TrialConfig.from_dict(_demo_dict("optimization", learning_rate="1e-4")),
        "optimization.learning_rate",
    ),
    "autocast as a string": (
        lambda t: OptimizationConfig(steps=10, autocast_bf16="no"),
        "optimization.autocast_bf16",
    ),
    "unknown section": (
        lambda t: TrialConfig.from_dict({**build_sweep("demo", smoke=True)[1].to_dict(), "modle": {}}),
        "modle",
    ),
    "unknown field": (lambda t: TrialConfig.from_dict(_demo_dict("method", lora_rnak=4)), "lora_rnak"),
    "section not an object": (
        lambda t: TrialConfig.from_dict({**build_sweep("demo", smoke=True)[1].to_dict(), "model": 3}),
        "model",
    ),
    "sampling rate 0": (lambda t: PrivacyConfig(**_dp(sampling_rate=0.0)), "privacy.sampling_rate"),
    "epsilon negative": (lambda t: PrivacyConfig(**_dp(target_epsilon=-1.0)), "privacy.target_epsilon"),
    "epsilon inf": (lambda t: PrivacyConfig(**_dp(target_epsilon=math.inf)), "privacy.target_epsilon"),
    "epsilon nan": (lambda t: PrivacyConfig(**_dp(target_epsilon=math.nan)), "privacy.target_epsilon"),
    "delta 1": (lambda t: PrivacyConfig(**_dp(delta=1.0)), "privacy.delta"),
    "delta >= 1/N (preflight)": (_delta_at_least_inverse_n, "delta"),
    "batch size 0": (lambda t: OptimizationConfig(steps=10, batch_size=0), "optimization.batch_size"),
    "lora rank 0": (lambda t: MethodConfig(lora_rank=0), "method.lora_rank"),
    "resolution 12": (lambda t: DataConfig(resolution=12), "data.resolution"),
    "unknown dataset": (lambda t: DataConfig(dataset="imagenet", root="/data"), "data.dataset"),
    "top_p 1": (lambda t: EvaluationConfig(top_p=1.0, inception_weights="w.pth"), "top_p"),
    "official base without checkpoints": (
        lambda t: ModelConfig(base="official", depth=16, tiny_pretraining_steps=0),
        "model.var_checkpoint",
    ),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_config_refuses(case, tmp_path):
    build, field = CONFIGS[case]
    with pytest.raises(VarsweepError) as err:
        build(tmp_path)
    assert field in str(err.value)


# --- checkpoints, adapters, result store -----------------------------------------------------------------------------
def _empty_file(a, t):
    (t / "empty.pth").write_bytes(b"")
    return lambda: load_var(t / "empty.pth", **TINY_VAR), [t / "empty.pth"]


def _truncated_zip(a, t):
    data = a.plain.read_bytes()
    (t / "cut.pth").write_bytes(data[: len(data) * 2 // 3])
    return lambda: load_var(t / "cut.pth", **TINY_VAR), [t / "cut.pth", "truncated"]


def _damaged_without_sidecar(a, t):
    """One bit of a tensor's bytes flipped in a checkpoint without a sidecar (as the official ones are)."""
    import zipfile

    path = t / "damaged.pth"
    path.write_bytes(a.plain.read_bytes())
    with zipfile.ZipFile(path) as archive:
        member = next(m for m in archive.infolist() if m.filename.endswith("/data/4"))
    data = bytearray(path.read_bytes())
    name_length, extra_length = (
        int.from_bytes(data[member.header_offset + i :][:2], "little") for i in (26, 28)
    )
    data[member.header_offset + 30 + name_length + extra_length] ^= 0x01
    path.write_bytes(bytes(data))
    return lambda: load_var(path, **TINY_VAR), [path, "is damaged", member.filename, "Bad CRC-32"]


def _marker_class(a, t):
    (t / "evil.pth").write_bytes(pickle.dumps({"w": WritesMarker()}, protocol=2))
    return lambda: read_state_dict(t / "evil.pth"), [t / "evil.pth", "cannot read checkpoint"]


def _marker_class_torch(a, t):
    torch.save({"w": WritesMarker()}, t / "evil.pth")
    return lambda: load_vqvae(t / "evil.pth", **TINY_VQVAE), [t / "evil.pth", "cannot read checkpoint"]


def _nested(a, t):
    torch.save({"model": torch.load(a.plain, weights_only=True), "epoch": 3}, t / "nested.pth")
    return lambda: load_var(t / "nested.pth", **TINY_VAR), [t / "nested.pth", "flat state dict", "model ("]


def _list_payload(a, t):
    torch.save([torch.zeros(2)], t / "list.pth")
    return lambda: read_state_dict(t / "list.pth"), [t / "list.pth", "holds a list"]


def _wrong_shapes(a, t):
    return lambda: load_var(a.plain, **(TINY_VAR | {"num_classes": 7})), [a.plain, "class_emb.weight"]


def _nan(a, t):
    state = torch.load(a.plain, weights_only=True)
    state["head.bias"] = torch.full_like(state["head.bias"], float("nan"))
    torch.save(state, t / "nan.pth")
    return lambda: load_var(t / "nan.pth", **TINY_VAR), [t / "nan.pth", "head.bias"]


def _sha_mismatch(a, t):
    path = copy_of(a.var, t)
    state = torch.load(path, weights_only=True)
    state["head.bias"] += 1.0
    torch.save(state, path)
    return lambda: load_var(path, **TINY_VAR), [path, "SHA-256"]


def _sidecar_garbage(a, t):
    path = copy_of(a.var, t)
    Path(f"{path}.json").write_text("not json")
    return lambda: load_var(path, **TINY_VAR), [f"{path}.json", "not valid JSON"]


def _sidecar_list(a, t):
    path = copy_of(a.vqvae, t)
    Path(f"{path}.json").write_text("[1, 2]")
    return lambda: load_vqvae(path, **TINY_VQVAE), [f"{path}.json"]


def _sidecar_other_kind(a, t):
    path = copy_of(a.vqvae, t)
    return lambda: load_var(path, **TINY_VAR), [f"{path}.json", "'vqvae'"]


def _other_architecture(a, t):
    return lambda: load_var(a.var, **(TINY_VAR | {"depth": 3})), [a.var, "depth: saved 2, requested 3"]


def _adapter_missing_sidecar(a, t):
    path = copy_of(a.adapter, t, sidecar=False)
    return lambda: load_adapter(load_var(a.var, **TINY_VAR), path, base_sha256=None), [path, "no sidecar"]


def _adapter_nan(a, t):
    path = copy_of(a.adapter, t)
    state = torch.load(path, weights_only=True)
    name = next(iter(state))
    state[name] = torch.full_like(state[name], float("nan"))
    torch.save(state, path)
    record = json.loads(Path(f"{path}.json").read_text())
    from trainables.models.checkpoints import file_sha256

    Path(f"{path}.json").write_text(
        json.dumps({**record, "sha256": file_sha256(path)})
    )  # a consistent pair holding NaN
    return lambda: load_adapter(load_var(a.var, **TINY_VAR), path, base_sha256=None), [path, "NaN"]


def _adapter_other_base(a, t):
    other = t / "other.pth"
    save_var(build_var(**TINY_VAR, generator=torch.Generator().manual_seed(5)), other)
    return lambda: load_adapter(
        load_var(other, **TINY_VAR), a.adapter, base_sha256=checkpoint_sha256(other)
    ), [
        a.adapter,
        "SHA-256",
    ]


def _adapter_on_var_file(a, t):
    return lambda: load_adapter(load_var(a.var, **TINY_VAR), a.var, base_sha256=None), [
        f"{a.var}.json",
        "'var'",
    ]


def _record_case(make, needles):
    """Writing the record ``make(a)`` to a result store is refused, naming ``needles``."""
    return lambda a, t: ((lambda: ResultStore(t / "store").write(make(a))), needles)


LOADING = {
    "missing file": lambda a, t: (
        lambda: load_var(t / "absent.pth", **TINY_VAR),
        [t / "absent.pth", "no checkpoint file"],
    ),
    "a folder": lambda a, t: (lambda: load_vqvae(a.data, **TINY_VQVAE), [a.data, "folder"]),
    "empty file": _empty_file,
    "truncated zip": _truncated_zip,
    "damaged bytes without a sidecar": _damaged_without_sidecar,
    "pickle with a class (plain pickle)": _marker_class,
    "pickle with a class (torch.save)": _marker_class_torch,
    "nested {'model': ...}": _nested,
    "a list, not a dict": _list_payload,
    "wrong shapes": _wrong_shapes,
    "NaN weights": _nan,
    "sidecar SHA mismatch": _sha_mismatch,
    "sidecar not JSON": _sidecar_garbage,
    "sidecar not an object": _sidecar_list,
    "sidecar of another kind": _sidecar_other_kind,
    "other architecture": _other_architecture,
    "adapter without sidecar": _adapter_missing_sidecar,
    "adapter with NaN": _adapter_nan,
    "adapter on another base": _adapter_other_base,
    "adapter is a VAR checkpoint": _adapter_on_var_file,
    "store: not an object": _record_case(lambda a: [1, 2], ["JSON object"]),
    "store: bad status": _record_case(lambda a: {**_valid(a), "status": "done"}, ["status", "'done'"]),
    "store: config not matching its id": _record_case(
        lambda a: {**_valid(a), "trial_id": "0" * 16}, ["trial_id", "0" * 16]
    ),
    "store: schema version 0": _record_case(
        lambda a: {**_valid(a), "schema_version": 0}, ["schema_version", "got 0"]
    ),
    "store: a newer schema version": _record_case(
        lambda a: {**_valid(a), "schema_version": SCHEMA_VERSION + 1}, ["schema_version", "upgrade varsweep"]
    ),
    "store: failed without error": _record_case(
        lambda a: make_result(a.configs[0], status="success") | {"status": "failed"}, ["error"]
    ),
    "store: metric not a number": _record_case(
        lambda a: _valid(a) | {"metrics": {"fid": {1, 2}}}, ["metrics.fid", "expected number"]
    ),
    "store: unknown URI scheme": lambda a, t: (
        lambda: ResultStore("foo://bucket/runs"),
        ["foo://bucket/runs", "'foo'"],
    ),
    "store: malformed URI": lambda a, t: (lambda: ResultStore("file:///tmp/a b"), ["file:///tmp/a b"]),
    "store: path is a file": lambda a, t: (lambda: ResultStore(a.file), [a.file, "is a file"]),
    "store: not writable": lambda a, t: (
        lambda: ResultStore("/sys/varsweep-store"),
        ["/sys/varsweep-store", "not writable"],
    ),
}


@pytest.mark.parametrize("case", sorted(LOADING))
def test_loading_refuses(case, a, tmp_path):
    MARKER.unlink(missing_ok=True)
    call, needles = LOADING[case](a, tmp_path)
    with pytest.raises((VarsweepError, CheckpointError)) as err:
        call()
    for needle in needles:
        assert str(needle) in str(err.value), str(err.value)
    assert not MARKER.exists()  # nothing in a checkpoint was executed


# --- the real entry points -------------------------------------------------------------------------------------------
SUBPROCESS = {
    "bench sweep": lambda a, t: (["bench", "sweep", "demo", "--smoke", "--storage", "foo://x"], ["foo://x"]),
    "bench status": lambda a, t: (["bench", "status", "demo", "--smoke", "--storage", str(a.file)], [a.file]),
    "analysis": lambda a, t: (["analysis", str(t / "nowhere"), "--out", str(t / "out")], [t / "nowhere"]),
    "evaluate": lambda a, t: (
        ["trainables.evaluation.evaluate"] + _evaluate_argv(a, t, **{"--depth": 3}),
        ["--depth 3"],
    ),
}


@pytest.mark.parametrize("case", sorted(SUBPROCESS))
def test_entry_points_print_no_traceback(case, a, tmp_path):
    argv, needles = SUBPROCESS[case](a, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "VARSWEEP_DEBUG"}
    done = subprocess.run(
        [sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert_cli_refuses(done.returncode, done.stderr, needles)
    assert "Traceback" not in done.stdout
