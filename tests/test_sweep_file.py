"""Sweeps from a file (``bench.sweep_file``, ``python -m bench sweep FILE``): YAML and TOML read alike, every kind of
bad file refused with the field and problem named before anything starts, the paper-table example equal to the
built-in table trial by trial, dry run and status on a file, and resource overrides that keep trial ids. No Ray:
one dry run as a real process, the rest in-process."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_datasets import make_folder

from bench.__main__ import main, override_resources
from bench.schema import ConfigError, with_absolute_paths
from bench.sweep_file import SweepFileError, load_sweep_file, named_sweep
from bench.sweeps import build_sweep
from bench.sweeps.common import Assets

EXAMPLES = REPO / "examples"

YAML_SWEEP = """
name: both-formats
base:
  model: {base: tiny, depth: 2, tiny_pretraining_steps: 150}
  data: {dataset: digits, resolution: 16, cached_views: 2}
  optimization: {learning_rate: 5e-4, steps: 6}
  evaluation: {extractor: digits-cnn-v2, num_images: 40, top_k: 0}
axes:
  method.name: [full, lora]
  method.train_blocks: [[0], [0, 1]]
  privacy:
    - null
    - {target_epsilon: 8, sampling_rate: 0.05, max_grad_norm: 0.5, augmentation_multiplicity: 2}
tracking: none
"""
TOML_SWEEP = """
name = "both-formats"
tracking = "none"

[base.model]
base = "tiny"
depth = 2
tiny_pretraining_steps = 150

[base.data]
dataset = "digits"
resolution = 16
cached_views = 2

[base.optimization]
learning_rate = 5e-4
steps = 6

[base.evaluation]
extractor = "digits-cnn-v2"
num_images = 40
top_k = 0

[axes]
"method.name" = ["full", "lora"]
"method.train_blocks" = [[0], [0, 1]]
privacy = ["none", {target_epsilon = 8, sampling_rate = 0.05, max_grad_norm = 0.5, augmentation_multiplicity = 2}]
"""


def write(folder: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_yaml_and_toml_give_the_same_grid(tmp_path):
    yaml_sweep = load_sweep_file(write(tmp_path, YAML_SWEEP))
    toml_sweep = load_sweep_file(write(tmp_path, TOML_SWEEP, "sweep.toml"))
    assert yaml_sweep.name == toml_sweep.name == "both-formats" and yaml_sweep.tracking == "none"
    assert [c.trial_id for c in yaml_sweep.configs] == [c.trial_id for c in toml_sweep.configs]
    labels = [c.label for c in yaml_sweep.configs]
    assert len(labels) == 8 and labels[:2] == ["full-d2-digits-s0", "full-d2-digits-eps8-k2-s0"]
    first = yaml_sweep.configs[0]
    assert first.optimization.learning_rate == 5e-4  # YAML 1.2 numbers: 5e-4 is no string
    assert first.method.train_blocks == (0,) and yaml_sweep.configs[2].method.train_blocks == (0, 1)
    assert [c.privacy is None for c in yaml_sweep.configs[:2]] == [True, False]


def test_one_base_serves_a_privacy_axis_s_non_dp_and_dp_points(tmp_path):
    """A batch size in the base (under a small split's size, for the non-DP points) made every DP point fail with
    "does not apply under DP": comparing the two took two files. Set by an axis it is still refused there."""
    with_batch = YAML_SWEEP.replace(
        "{learning_rate: 5e-4, steps: 6}",
        "{learning_rate: 5e-4, steps: 6, batch_size: 4, global_clip_norm: 1.0}",
    )
    configs = load_sweep_file(write(tmp_path, with_batch)).configs
    assert len(configs) == 8
    assert {
        (c.privacy is None, c.optimization.batch_size, c.optimization.global_clip_norm) for c in configs
    } == {
        (True, 4, 1.0),
        (False, 256, 2.0),
    }
    smoked = with_batch + "smoke: {optimization: {batch_size: 2}}\n"
    small = load_sweep_file(write(tmp_path, smoked), smoke=True).configs
    assert {(c.privacy is None, c.optimization.batch_size) for c in small} == {(True, 2), (False, 256)}
    by_axis = with_batch + "  optimization.batch_size: [4, 8]\n"
    with pytest.raises(SweepFileError, match=r"optimization\.batch_size: does not apply under DP"):
        load_sweep_file(write(tmp_path, by_axis.replace("tracking: none\n", "") + "tracking: none\n"))


def test_paths_are_relative_to_the_file_or_the_assets_root(tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    sweep = """
name: paths
base:
  model: {base: official, depth: 16, var_checkpoint: "{assets}/checkpoints/var_d16.pth",
          vqvae_checkpoint: ../elsewhere/vae.pth, tiny_pretraining_steps: 0}
  data: {dataset: folder, root: images, resolution: 256}
  optimization: {steps: 10}
  evaluation: {extractor: substitute-randconv-v1}
"""
    (config,) = load_sweep_file(write(folder, sweep), assets=Assets(str(tmp_path / "assets"))).configs
    assert config.model.var_checkpoint == str(tmp_path / "assets" / "checkpoints" / "var_d16.pth")
    assert config.model.vqvae_checkpoint == str(tmp_path / "elsewhere" / "vae.pth")
    assert config.data.root == str(folder / "images")
    with pytest.raises(SweepFileError, match=r"data\.root: unknown placeholder \{asset\}"):
        load_sweep_file(write(folder, sweep.replace("root: images", "root: '{asset}/images'")))
    # It said "unknown placeholder {assets} ... the only one is {assets}"
    with pytest.raises(
        SweepFileError, match=r"data\.root: \{assets\} \(the --assets root\) stands only at the start"
    ):
        load_sweep_file(write(folder, sweep.replace("root: images", "root: '/x/{assets}/images'")))
    # A link to the file: its paths are relative to the link's folder, where the user put it (they were the
    # target's, so a project's link to a shared file read another project's images)
    (tmp_path / "shared").mkdir()
    target = write(tmp_path / "shared", sweep, "target.yaml")
    (folder / "experiments").mkdir()
    (folder / "experiments" / "linked.yaml").symlink_to(target)
    linked = load_sweep_file(folder / "experiments" / "linked.yaml", assets=Assets(str(tmp_path / "assets")))
    assert linked.configs[0].data.root == str(folder / "experiments" / "images")
    assert linked.configs[0].model.vqvae_checkpoint == str(folder / "elsewhere" / "vae.pth")


# One case per kind of problem: (the file's text, what its message must name).
# TrialConfig's default evaluation needs Inception weights: these files score with the offline substitute.
GOOD = "name: bad\nbase:\n  optimization: {steps: 5}\n  evaluation: {extractor: substitute-randconv-v1}\n"
BAD_FILES = {
    "not a mapping": ("- name: x\n", ["expected a mapping with name, base and axes", "list"]),
    "not YAML": ("name: [unclosed\n", ["is not valid YAML", "line"]),
    "key twice": (GOOD + "name: again\n", ["the key 'name' is given twice"]),
    "unknown key": (GOOD + "axis: {}\n", ["unknown key 'axis' (did you mean axes?)"]),
    "no name": ("base: {}\n", ["name: missing"]),
    "bad name": ("name: a/b\n", ["name: expected letters", "'a/b'"]),
    "built-in name": ("name: table3\n", ["'table3' is a built-in sweep's name"]),
    "unknown tracker": (GOOD + "tracking: mlfow\n", ["tracking: expected one of", "'mlfow'"]),
    "unknown section": (
        "name: x\nbase: {methods: {name: lora}}\n",
        ["base.methods: unknown section (did you mean method?)"],
    ),
    "section not a mapping": (
        "name: x\nbase: {method: lora}\n",
        ["base.method: expected a mapping of fields"],
    ),
    "unknown field": (
        "name: x\nbase: {method: {nmae: lora}}\n",
        ["base.method.nmae: unknown field (did you mean method.name?)"],
    ),
    "moved field": (
        GOOD
        + "axes: {privacy: [{target_epsilon: 8, sampling_rate: 0.1, max_grad_norm: 1, physical_batch_rows: 64}]}\n",
        [
            "axes.privacy[0].physical_batch_rows: unknown field (moved to resources.rows_per_forward (since schema version 3))"
        ],
    ),
    "moved axis": (
        GOOD + "axes: {privacy.physical_batch_rows: [64]}\n",
        ["axes.privacy.physical_batch_rows: no such config field (moved to resources.rows_per_forward"],
    ),
    "unknown axis": (
        GOOD + "axes: {method.lora_rnak: [4, 8]}\n",
        ["axes.method.lora_rnak: no such config field (did you mean method.lora_rank?)"],
    ),
    "axis not a list": (
        GOOD + "axes: {method.name: lora}\n",
        ["axes.method.name: expected a non-empty list"],
    ),
    "empty axis": (
        GOOD + "axes: {optimization.seed: []}\n",
        ["axes.optimization.seed: expected a non-empty list"],
    ),
    "repeated value": (GOOD + "axes: {optimization.seed: [0, 1, 0]}\n", ["the value 0 is given twice"]),
    "field set twice": (
        GOOD + "axes:\n  optimization: [{seed: 1}]\n  optimization.seed: [2]\n",
        ["optimization.seed: set by both the axis optimization and the axis optimization.seed"],
    ),
    "wrong type": (
        GOOD + "axes: {optimization.steps: [2.5]}\n",
        ["optimization.steps: expected integer or null, got 2.5", "affects 1 point: optimization.steps=2.5"],
    ),
    "string for a number": (
        "name: x\nbase:\n  optimization: {steps: 5, learning_rate: 'fast'}\n",
        ["optimization.learning_rate: expected finite number, got 'fast'", "affects 1 point: the base"],
    ),
    "invalid combination": (
        GOOD
        + "  privacy: {target_epsilon: 1, sampling_rate: 0.1, max_grad_norm: 1}\naxes: {method.name: [lora, base]}\n",
        [
            "1 of 2 grid points cannot run",
            "privacy: method 'base' trains nothing",
            "affects 1 point: method.name=base",
        ],
    ),
    "incomplete privacy": (
        GOOD + "axes: {privacy: [{target_epsilon: 1}]}\n",
        ["privacy: missing fields ['max_grad_norm', 'sampling_rate']"],
    ),
    "privacy field without DP": (
        GOOD + "axes: {privacy.target_epsilon: [1, 8]}\n",
        ["privacy.target_epsilon: set on a point without DP", "2 of 2 grid points"],
    ),
    "same trial twice": (
        GOOD + "axes: {resources.workers: [1, 2]}\n",
        ["the same trial", "resources.workers=1; resources.workers=2"],
    ),
    # Keys are names: a key YAML reads as a boolean or a number is named, never compared with the names.
    "key not a string": (
        GOOD + "axes: {resources: [{true: 1, workers: 2}]}\n",
        ["axes.resources[0]: the key True (bool) is not a name", "(quote it)"],
    ),
    # YAML 1.2: on, yes and no are strings, so this is an unknown field, not a boolean key.
    "yes and on are strings": (
        GOOD + "axes: {resources: [{on: 1, workers: 2}]}\n",
        ["axes.resources[0].on: unknown field"],
    ),
    "YAML 1.1 boolean": (
        GOOD + "axes: {optimization.autocast_bf16: [yes, no]}\n",
        ["optimization.autocast_bf16: expected boolean, got 'yes'"],
    ),
    "sexagesimal number": (
        GOOD + "axes: {optimization.steps: [1:30]}\n",
        ["optimization.steps: expected integer or null, got '1:30'"],
    ),
    "loader error": (
        GOOD + "description: !!timestamp 2024-06-31\n",
        ["is not valid YAML", "day is out of range for month"],
    ),
    "empty path": (
        GOOD + "  data: {root: ''}\n",
        ["data.root: an empty path", "affects 1 point: the base"],
    ),
    "empty weights path": (
        GOOD + "axes: {evaluation.inception_weights: ['', w.pth]}\n",
        ["evaluation.inception_weights: an empty path", "1 of 2 grid points"],
    ),
    "audit field without audit": (
        GOOD + "  audit: null\naxes: {audit.canaries: [200]}\n",
        ["audit.canaries: set on a point without an audit"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_refused_naming_the_problem(case, tmp_path):
    text, needles = BAD_FILES[case]
    with pytest.raises(SweepFileError) as raised:
        load_sweep_file(write(tmp_path, text))
    for needle in needles:
        assert needle in str(raised.value), f"{needle!r} not in {raised.value}"


def test_yaml_merge_keys_take_the_explicit_key(tmp_path):
    """``<<: *anchor`` merges the anchored mapping; an explicit key overrides a merged one (YAML's rule, not a key
    given twice), while an explicit key given twice is still refused."""
    text = GOOD + (
        "axes:\n  privacy:\n    - &dp {target_epsilon: 8, sampling_rate: 0.02, max_grad_norm: 0.5}\n"
        "    - {<<: *dp, target_epsilon: 2}\n"
    )
    configs = load_sweep_file(write(tmp_path, text)).configs
    assert [(c.privacy.target_epsilon, c.privacy.max_grad_norm) for c in configs] == [(8.0, 0.5), (2.0, 0.5)]
    twice = text.replace("target_epsilon: 2}", "target_epsilon: 2, target_epsilon: 3}")
    with pytest.raises(SweepFileError, match="the key 'target_epsilon' is given twice"):
        load_sweep_file(write(tmp_path, twice))


def test_audit_is_optional_like_privacy(tmp_path):
    """``audit: null`` (and "none") is a trial without an audit, in base and in an audit axis."""
    (config,) = load_sweep_file(write(tmp_path, GOOD + "  audit: null\n")).configs
    assert config.audit is None
    sweep = load_sweep_file(write(tmp_path, GOOD + "axes: {audit: [null, {canaries: 256}]}\n"))
    assert [c.audit and c.audit.canaries for c in sweep.configs] == [None, 256]
    toml = 'name = "t"\n[base]\naudit = "none"\n[base.optimization]\nsteps = 5\n'
    toml += '[base.evaluation]\nextractor = "substitute-randconv-v1"\n'
    (config,) = load_sweep_file(write(tmp_path, toml, "sweep.toml")).configs
    assert config.audit is None


def test_yaml_numbers_and_booleans_follow_yaml_1_2(tmp_path):
    """Leading zeros are decimal (YAML 1.1: octal), 0o and 0x are octal and hex, an exponent needs no dot, true and
    false are the booleans, .inf is a float (refused as not finite) and a date is a string."""
    text = GOOD.replace("steps: 5", "steps: 5, learning_rate: 1e-3, autocast_bf16: false")
    text += "description: 2024-06-31\naxes: {optimization.seed: [010, 0o10, 0x10]}\n"
    sweep = load_sweep_file(write(tmp_path, text))
    assert [c.optimization.seed for c in sweep.configs] == [10, 8, 16]
    assert {(c.optimization.learning_rate, c.optimization.autocast_bf16) for c in sweep.configs} == {
        (1e-3, False)
    }
    assert sweep.description == "2024-06-31"
    with pytest.raises(SweepFileError, match="optimization.learning_rate: expected finite number, got inf"):
        load_sweep_file(write(tmp_path, GOOD.replace("steps: 5", "steps: 5, learning_rate: .inf")))


def test_a_loader_error_names_the_file(tmp_path):
    path = write(tmp_path, GOOD + "description: !!float fast\n")
    with pytest.raises(SweepFileError, match=f"^sweep file {path} is not valid YAML: .*'fast'"):
        load_sweep_file(path)


def test_an_axis_on_a_section_the_base_leaves_out_starts_from_its_default(tmp_path):
    """Without ``optimization`` in base a trial has TrialConfig's default (100 steps); a seed axis changes only
    the seed, and an epochs axis replaces the default steps."""
    base = "name: x\nbase:\n  evaluation: {extractor: substitute-randconv-v1}\n"
    (alone,) = load_sweep_file(write(tmp_path, base)).configs
    seeds = load_sweep_file(write(tmp_path, base + "axes: {optimization.seed: [0, 1]}\n")).configs
    assert [(c.optimization.steps, c.optimization.seed) for c in seeds] == [(100, 0), (100, 1)]
    assert seeds[0] == alone
    sections = load_sweep_file(write(tmp_path, base + "axes: {optimization: [{seed: 3}]}\n")).configs
    assert [(c.optimization.steps, c.optimization.seed) for c in sections] == [(100, 3)]
    epochs = load_sweep_file(write(tmp_path, base + "axes: {optimization.epochs: [1, 2]}\n")).configs
    assert [(c.optimization.steps, c.optimization.epochs) for c in epochs] == [(None, 1.0), (None, 2.0)]


def test_toml_writes_no_value_as_none_for_every_optional_field(tmp_path):
    toml = 'name = "t"\n[base.optimization]\nsteps = 5\nglobal_clip_norm = "none"\n'
    toml += '[base.evaluation]\nextractor = "substitute-randconv-v1"\n'
    (config,) = load_sweep_file(write(tmp_path, toml, "sweep.toml")).configs
    assert config.optimization.global_clip_norm is None
    axis = (
        toml.replace('global_clip_norm = "none"\n', "")
        + '[axes]\n"optimization.global_clip_norm" = ["none", 1]\n'
    )
    sweep = load_sweep_file(write(tmp_path, axis, "sweep.toml"))
    assert [c.optimization.global_clip_norm for c in sweep.configs] == [None, 1.0]
    unquoted = axis.replace('"optimization.global_clip_norm"', "optimization.global_clip_norm")
    with pytest.raises(SweepFileError) as raised:
        load_sweep_file(write(tmp_path, unquoted, "sweep.toml"))
    assert "axes.optimization: expected a non-empty list of values, got a mapping" in str(raised.value)
    assert '"optimization.global_clip_norm" = [...]' in str(raised.value)


def test_a_sweep_file_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, GOOD, "home.yaml")
    sweep = named_sweep("~/home.yaml")
    assert sweep.name == "bad" and sweep.source == "~/home.yaml" and len(sweep.configs) == 1


def test_every_problem_is_listed_at_once_and_the_command_names_the_first(tmp_path, capsys):
    path = write(
        tmp_path,
        "name: x\nbase: {method: {nmae: lora}}\naxes: {method.rnak: [1], optimization.seed: [1, 1]}\nextra: 1\n",
    )
    with pytest.raises(SweepFileError) as raised:
        load_sweep_file(path)
    message = str(raised.value)
    assert message.startswith(f"sweep file {path}: 4 problems:")
    assert all(part in message for part in ("'extra'", "base.method.nmae", "axes.method.rnak", "given twice"))
    points = write(
        tmp_path,
        GOOD + "axes:\n  optimization.steps: [0, 5]\n  method.name: [lora, base]\n",
        "points.yaml",
    )
    assert main(["sweep", str(points), "--dry-run", "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    # two problems (steps 0 for a training method; steps 5 for 'base'), each with its points, in one report
    assert "2 of 4 grid points cannot run" in err and "a training method needs steps >= 1" in err
    assert "method 'base' evaluates the base model" in err and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: sweep file {points}: 2 of 4 grid points cannot run") and "steps" in last
    assert not (tmp_path / "runs").exists()


def test_a_name_that_is_neither_is_refused_with_the_closest_sweep(capsys):
    assert main(["status", "tabel3"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'tabel3'" in last and "did you mean table3?" in last and ".yaml" in last
    with pytest.raises(SweepFileError, match="sweep file nowhere/sweep.toml does not exist"):
        named_sweep("nowhere/sweep.toml")


def test_the_paper_table_file_is_the_built_in_table(tmp_path):
    assets = Assets(str(tmp_path / "assets"))
    from_file = load_sweep_file(EXAMPLES / "table3.yaml", assets=assets)
    built_in = [with_absolute_paths(c) for c in build_sweep("table3", assets=assets)]
    assert [c.trial_id for c in from_file.configs] == [c.trial_id for c in built_in]
    assert list(from_file.configs) == built_in  # every field, resources included
    smoke = load_sweep_file(EXAMPLES / "table3.yaml", assets=assets, smoke=True)
    assert [c.trial_id for c in smoke.configs] == [c.trial_id for c in build_sweep("table3", smoke=True)]
    # The numbers written as floats (10.0, 80.0, 1.0, ...) are the same trials.
    text = (EXAMPLES / "table3.yaml").read_text()
    as_floats = text.replace("epochs: 80,", "epochs: 80.0,")
    for epsilon in (1, 10, 20, 50, 100, 500, 1000):
        as_floats = as_floats.replace(f"{{target_epsilon: {epsilon},", f"{{target_epsilon: {epsilon}.0,")
    assert as_floats.count(".0") >= text.count(".0") + 8
    (tmp_path / "table3.yaml").write_text(as_floats)
    rewritten = load_sweep_file(tmp_path / "table3.yaml", assets=assets).configs
    assert [c.trial_id for c in rewritten] == [c.trial_id for c in from_file.configs]


def test_smoke_applies_the_files_smoke_section():
    sweep = load_sweep_file(EXAMPLES / "digits-tiny.yaml", smoke=True)
    assert len(sweep.configs) == 4 and {c.optimization.steps for c in sweep.configs} == {4}
    assert {c.resources.cpus_per_worker for c in sweep.configs} == {1.0}


def test_a_smoke_section_s_opacus_clipping_keeps_the_smoke_views_in_one_forward(tmp_path):
    """A point spreading its k = 8 views over forwards of 4 has a smoke version spreading its 6 over two; a
    ``smoke:`` section asking for Opacus's hooks (which need an example's views in one forward) gets the smoke
    rows back, unless it sets them itself (then they are checked as given)."""
    base = """name: split
base:
  model: {base: tiny, depth: 2}
  data: {dataset: digits, resolution: 16, cached_views: 8}
  method: {name: lora}
  optimization: {learning_rate: 3e-3, steps: 10}
  evaluation: {extractor: digits-cnn-v2, batch_size: 120, top_k: 0}
  resources: {workers: 1, gpus_per_worker: 0, cpus_per_worker: 1, rows_per_forward: 4}
  privacy: {target_epsilon: 8, sampling_rate: 0.0223, max_grad_norm: 0.5, augmentation_multiplicity: 8}
axes:
  method.name: [full, lora]
"""
    path = tmp_path / "split.yaml"
    for smoke, rows in (("", 3), ("smoke:\n  privacy: {clipping: hooks}\n", 64)):
        path.write_text(base + smoke)
        configs = load_sweep_file(path, smoke=True).configs
        assert [(c.privacy.augmentation_multiplicity, c.resources.rows_per_forward) for c in configs] == [
            (6, rows)
        ] * 2
    path.write_text(base + "smoke:\n  privacy: {clipping: hooks}\n  resources: {rows_per_forward: 3}\n")
    with pytest.raises(
        SweepFileError, match="smoke: resources.rows_per_forward: 3 rows cannot hold one example's k=6"
    ):
        load_sweep_file(path, smoke=True)


def test_the_folder_example_reads_your_images(tmp_path, capsys):
    """The folder example on images beside it: the dry run lists both splits (no data problem) and stops only at
    the missing checkpoints; nothing is created."""
    shutil.copy(EXAMPLES / "my-images.yaml", tmp_path)
    make_folder(tmp_path / "my_images")
    storage = tmp_path / "runs"
    code = main(
        [
            "sweep",
            str(tmp_path / "my-images.yaml"),
            "--dry-run",
            "--assets",
            str(tmp_path),
            "--storage",
            str(storage),
        ]
    )
    captured = capsys.readouterr()
    assert code == 2 and "4 of 4 trials cannot run" in captured.err
    problems = [line.strip() for line in captured.err.splitlines()]
    assert "var_d16.pth" in captured.err and not any(line.startswith("data") for line in problems)
    assert "lora-d16-folder-s1" in captured.out and not storage.exists()
    sweep = load_sweep_file(tmp_path / "my-images.yaml", assets=Assets(str(tmp_path)))
    assert {c.data.root for c in sweep.configs} == {str(tmp_path / "my_images")}


def test_dry_run_of_a_file_prints_the_grid_and_creates_nothing(tmp_path):
    """The real command, from the repository: the grid with its ids, the override visible in the workers column,
    no folder created."""
    storage = tmp_path / "runs"
    command = [
        sys.executable,
        "-m",
        "bench",
        "sweep",
        "examples/digits-tiny.yaml",
        "--dry-run",
        "--workers",
        "2",
    ]
    done = subprocess.run(
        [*command, "--storage", str(storage)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert (
        "sweep file examples/digits-tiny.yaml: digits-tiny, 4 trials; full fine-tuning and LoRA"
        in done.stdout
    )
    assert "4 of 4 trials to run" in done.stdout and not storage.exists()
    for config in load_sweep_file(EXAMPLES / "digits-tiny.yaml").configs:
        row = next(line for line in done.stdout.splitlines() if config.trial_id in line)
        assert row.startswith(config.label) and " 2 x 0 " in row


def test_status_of_a_file_and_overrides_keep_ids(tmp_path, capsys):
    sweep = load_sweep_file(EXAMPLES / "digits-tiny.yaml")
    storage = tmp_path / "runs"
    storage.mkdir()
    command = ["status", str(EXAMPLES / "digits-tiny.yaml"), "--storage", str(storage)]
    assert main([*command, "--workers", "3", "--gpus-per-worker", "1", "--where", "method.name=lora"]) == 0
    out = capsys.readouterr().out
    assert "2 pending of 2 trials" in out
    assert all(c.trial_id in out for c in sweep.configs if c.method.name == "lora")
    assert not any(c.trial_id in out for c in sweep.configs if c.method.name == "full")
    for configs in (list(sweep.configs), build_sweep("table3", assets=Assets(str(tmp_path)))):
        changed = override_resources(configs, workers=4, gpus_per_worker=1.0)
        assert [c.trial_id for c in changed] == [c.trial_id for c in configs]
        assert {(c.resources.workers, c.resources.gpus_per_worker) for c in changed} == {(4, 1.0)}
        assert override_resources(configs, workers=None, gpus_per_worker=None) == configs
    with pytest.raises(ConfigError, match=r"--workers 2 --gpus-per-worker 0.5: resources.gpus_per_worker"):
        override_resources(list(sweep.configs), workers=2, gpus_per_worker=0.5)


def test_tracking_reaches_the_launch_the_command_line_winning(tmp_path, monkeypatch):
    """The file's ``tracking:`` and ``--tracking`` / ``--tracking-uri`` arrive in ``Launch`` (the launcher's run is
    replaced by a recorder here: running a tracked sweep is the launcher's own test)."""
    import bench.launcher

    launches = []

    def record(name, configs, launch, *, dry_run=False, gpu=None):
        launches.append((name, len(configs), launch))
        return {"failed": 0}

    monkeypatch.setattr(bench.launcher, "run_sweep", record)
    path = write(tmp_path, (EXAMPLES / "digits-tiny.yaml").read_text() + "tracking: tensorboard\n")
    storage = str(tmp_path / "runs")
    assert main(["sweep", str(path), "--dry-run", "--storage", storage]) == 0
    uri = str(tmp_path / "mlruns")  # MLflow's file store: no SQL packages needed
    command = [
        "sweep",
        str(path),
        "--smoke",
        "--tracking",
        "mlflow",
        "--tracking-uri",
        uri,
        "--storage",
        storage,
    ]
    assert main(command) == 0
    (name, count, first), (smoke_name, _, second) = launches
    assert (name, count, first.tracking, first.tracking_uri) == ("digits-tiny", 4, "tensorboard", None)
    assert (smoke_name, second.tracking, second.tracking_uri) == ("digits-tiny-smoke", "mlflow", uri)
