"""analysis: the paper's tables regenerated cell by cell from a fixture of published values (golden), gaps of
failed and partial sweeps, refusal of mixed feature extractors and invalid files, seeds, figures, sample grids,
the report, the CLI, and that analysis imports neither torch nor Ray."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import analysis.figures as analysis_figures
from analysis.__main__ import main as cli
from analysis.figures import CONVERGENCE_CAPTION, grid_caption, grid_layout, k_colors, sample_grid
from analysis.load import AnalysisError, load_results, setting_of
from analysis.metrics import DATASET_COLUMNS, PAPER_VARIANTS, variant
from analysis.paper import number, paper_fixture, published
from analysis.report import provenance
from analysis.run import analyse
from analysis.tables import PAPER_DIR
from bench.results import ResultStore
from bench.schema import LORA_PRESETS, TrialConfig, make_result, replace
from bench.sweeps import build_sweep
from bench.sweeps.common import Assets, dp_trial

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "paper"
SHARED_PAPER = Path(os.environ.get("VARSWEEP_SHARED", REPO.parent / "shared")) / "paper"
PAPER_TABLES = (
    "table1_fid",
    "table2_dp_multiplicity",
    "table3_dp_epsilon",
    "table9_precision_recall",
    "table10_dp_ablation",
)
KEYS = {
    "table1_fid": 2,
    "table2_dp_multiplicity": 4,
    "table3_dp_epsilon": 3,
    "table9_precision_recall": 2,
    "table10_dp_ablation": 5,
}
# Cells our Table 2 has beyond the paper's: the same sweep's k = 32 trials (Table 3's epsilon-10 column) and the
# ablation's LNTuning at k = 128 (Table 10), which the paper prints elsewhere.
TABLE2_EXTRA = {
    ("VAR-d16", "LoRA", "10", "32"),
    ("VAR-d20", "LoRA", "10", "32"),
    ("VAR-d16", "LNTuning", "10", "128"),
}


@pytest.fixture(scope="module")
def fixture_storage(tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("paper") / "storage"
    paper_fixture(storage)
    return storage


@pytest.fixture(scope="module")
def golden_run(fixture_storage, tmp_path_factory):
    return analyse(
        fixture_storage, tmp_path_factory.mktemp("out"), compare_paper=True, grids=False, figures=False
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def copy_storage(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rewrite(path: Path, change) -> dict:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    return record


def result_path(storage: Path, label_part: str) -> Path:
    """The fixture result whose config label is ``label_part`` but for its seed (``lora-d16-flowers102`` is not a DP
    trial), else the first, in id order, whose label contains it."""
    labels = {}
    for path in sorted((storage / "results").glob("*.json")):
        try:
            labels[path] = TrialConfig.from_dict(json.loads(path.read_text())["config"]).label
        except ValueError:  # a test's broken file (JSON errors are ValueErrors)
            continue
    exact = [path for path, label in labels.items() if label.rsplit("-s", 1)[0] == label_part]
    matching = exact or [path for path, label in labels.items() if label_part in label]
    if not matching:
        raise AssertionError(f"no fixture trial matches {label_part}")
    return matching[0]


@pytest.mark.parametrize("name", PAPER_TABLES)
def test_fixture_regenerates_the_published_tables_cell_by_cell(golden_run, name):
    ours = read_csv(golden_run.out / "tables" / f"{name}.csv")
    paper = [
        r for r in published(name) if r["model"].startswith("VAR-")
    ]  # DiT baselines are not ours to regenerate
    n_keys = KEYS[name]
    assert list(ours[0]) == list(paper[0]), "column layout differs from the paper's"
    keyed = {tuple(r.values())[:n_keys]: r for r in ours}
    assert len(keyed) == len(ours), f"{name}: a row key appears twice"
    for row in paper:
        key = tuple(row.values())[:n_keys]
        assert key in keyed, f"{name}: row {key} missing"
        for column, value in row.items():
            mine = keyed[key][column]
            if column in ("model", "method", "variant", "targets"):
                assert mine == value, (name, key, column)
            else:
                assert number(mine) == pytest.approx(number(value), rel=1e-9, abs=1e-9), (
                    name,
                    key,
                    column,
                    mine,
                    value,
                )
    extra = set(keyed) - {tuple(r.values())[:n_keys] for r in paper}
    assert extra == (TABLE2_EXTRA if name == "table2_dp_multiplicity" else set()), extra


def test_outputs_equal_the_committed_golden_files(golden_run):
    """Byte-for-byte: CSV, per-cell CSV, Markdown and LaTeX of every table and comparison
    (rebuild with ``python scripts/rebuild_golden.py`` after an intended change, and review the diff)."""
    produced = {p.name: p.read_text() for p in (golden_run.out / "tables").iterdir()}
    golden = {p.name: p.read_text() for p in GOLDEN.iterdir()}
    assert sorted(produced) == sorted(golden)
    for name, text in golden.items():
        assert produced[name] == text, f"{name} differs from tests/golden/paper/{name}"


def test_comparison_with_the_paper_shows_no_difference_for_the_fixture(golden_run):
    assert len(golden_run.comparisons) == 5
    for table in golden_run.comparisons:
        both = [row for row in table.rows if "—" not in row[-3:-1]]
        assert both and {row[-1] for row in both} <= {"+0", "-0"}, table.name
        only_ours = {tuple(row[:4]) for row in table.rows if row[-2] == "—"}
        assert only_ours == (TABLE2_EXTRA if table.name == "compare_table2_dp_multiplicity" else set()), (
            only_ours
        )


def test_a_table3_cut_short_names_the_row_it_leaves_out_and_keeps_every_published_cell(
    fixture_storage, tmp_path
):
    """A DP sweep cut short: no trial at epsilon 1000, and VAR-d20 only at epsilon 10. Table 3 loses the column and
    names the row it cannot show and the published cell it has no trial for; the comparison still lists every
    published cell, ours marked missing."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    for path in (storage / "results").glob("*.json"):
        config = json.loads(path.read_text())["config"]
        privacy = config["privacy"] or {}
        cut = privacy.get("target_epsilon") == 1000 or (
            config["model"]["depth"] == 20
            and privacy.get("augmentation_multiplicity") == 32
            and privacy.get("target_epsilon") != 10
        )
        if cut:
            path.unlink()
    analysis = analyse(storage, tmp_path / "out", compare_paper=True, grids=False, figures=False)
    (table3,) = [t for t in analysis.tables if t.name == "table3_dp_epsilon"]
    assert [row[0] for row in table3.rows] == ["VAR-d16"] and "eps_1000" not in table3.header
    assert table3.notes == [
        "not in the table, run at one epsilon only: VAR-d20 LoRA k=32 (epsilon 10)",
        "not in the table, published but without a trial here: VAR-d16 LoRA k=32 (epsilon 1000)",
    ]
    assert (
        "run at one epsilon only: VAR-d20 LoRA k=32"
        in (tmp_path / "out" / "tables" / "table3_dp_epsilon.md").read_text()
    )
    (compared,) = [t for t in analysis.comparisons if t.name == "compare_table3_dp_epsilon"]
    missing = {(row[0], row[3]): row[5] for row in compared.rows if row[4] == "—"}
    paper = {row["model"]: row for row in published("table3_dp_epsilon")}
    assert missing == {
        ("VAR-d16", "eps_1000"): paper["VAR-d16"]["eps_1000"],
        **{
            ("VAR-d20", column): paper["VAR-d20"][column]
            for column in paper["VAR-d20"]
            if column.startswith("eps_")
        },
    }


def test_packaged_published_tables_equal_the_shared_copy():
    if not SHARED_PAPER.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_PAPER} is missing (set VARSWEEP_SHARED)")
        pytest.skip("shared paper tables not available")
    for path in SHARED_PAPER.glob("*.csv"):
        assert (PAPER_DIR / path.name).read_text() == path.read_text(), path.name


def test_failed_and_missing_trials_are_marked_not_invented(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    failed = rewrite(
        result_path(storage, "full-d16-food101"),
        lambda r: r.update(status="failed", error="CUDA out of memory\ntraceback...", metrics={}),
    )
    result_path(storage, "lora-d20-stanford_cars").unlink()
    analysis = analyse(storage, tmp_path / "out", grids=False, figures=False)
    assert (
        len(analysis.results.failed) == 1
        and analysis.results.failed.iloc[0]["trial_id"] == failed["trial_id"]
    )
    table1 = read_csv(tmp_path / "out" / "tables" / "table1_fid.csv")
    row = lambda model, method: next(r for r in table1 if r["model"] == model and r["method"] == method)  # noqa: E731
    assert row("VAR-d16", "FFT")["food101"] == "" and row("VAR-d20", "LoRA")["cars196"] == ""
    markdown = (tmp_path / "out" / "tables" / "table1_fid.md").read_text()
    assert (
        "| VAR-d16 | FFT | failed | 5.74 |" in markdown
        and "| VAR-d20 | LoRA | 6.97 | 6.29 | 11.16 | — | 12.97 |" in markdown
    )
    report = (tmp_path / "out" / "index.md").read_text()
    assert (
        "52 trials: 51 succeeded, 1 failed." in report
        and f"({failed['trial_id']}): CUDA out of memory" in report
    )
    assert "traceback" not in report  # first line of the error only


def test_mixed_feature_extractors_are_refused(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    record = json.loads(result_path(storage, "lora-d16-cub200").read_text())
    config = replace(
        TrialConfig.from_dict(record["config"]),
        evaluation={"extractor": "substitute-randconv-v1", "inception_weights": None},
    )
    other = make_result(
        config,
        status="success",
        metrics={"fid": 3.0},
        evaluation_settings={"extractor": "substitute-randconv-v1"},
    )
    (storage / "results" / f"{config.trial_id}.json").write_text(json.dumps(other))
    with pytest.raises(
        AnalysisError,
        match="mix feature extractors.*inception-v3-compat.*substitute-randconv-v1.*--extractor",
    ):
        load_results(storage)
    assert cli([str(storage), "--out", str(tmp_path / "refused")]) == 2
    assert not (tmp_path / "refused" / "index.md").exists()
    only = load_results(storage, extractor="substitute-randconv-v1")
    assert list(only.trials["trial_id"]) == [config.trial_id]


def test_invalid_files_stop_the_analysis_unless_skipped(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    (storage / "results" / "truncated.json").write_text('{"schema_version": 1, "trial_')
    rewrite(result_path(storage, "full-d20-food101"), lambda r: r.update(schema_version=99))
    with pytest.raises(AnalysisError, match=r"2 file\(s\)") as error:
        load_results(storage)
    assert "truncated.json: JSONDecodeError" in str(
        error.value
    ) and "schema_version: written by a newer varsweep (schema version 99" in str(error.value)
    analysis = analyse(storage, tmp_path / "out", skip_invalid=True, grids=False, figures=False)
    assert len(analysis.results.invalid) == 2 and len(analysis.results.trials) == 52
    assert "truncated.json" in (tmp_path / "out" / "index.md").read_text()
    with pytest.raises(AnalysisError, match="does not exist"):
        load_results(tmp_path / "nowhere")


def test_seeds_give_mean_and_std(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    record = json.loads(result_path(storage, "lora-d16-flowers102").read_text())
    for seed, fid in ((1, 13.58), (2, 12.78)):
        config = replace(TrialConfig.from_dict(record["config"]), optimization={"seed": seed})
        twin = {
            **record,
            "trial_id": config.trial_id,
            "config": config.to_dict(),
            "metrics": {**record["metrics"], "fid": fid},
        }
        (storage / "results" / f"{config.trial_id}.json").write_text(json.dumps(twin))
    analysis = analyse(storage, tmp_path / "out", grids=False, figures=False)
    table1 = next(t for t in analysis.tables if t.name == "table1_fid")
    lora = next(r for r in table1.rows if r[:2] == ["VAR-d16", "LoRA"])
    flowers = lora[2 + 2]
    assert flowers.n == 3 and flowers.mean == pytest.approx((13.18 + 13.58 + 12.78) / 3)
    assert flowers.std == pytest.approx(float(np.std([13.18, 13.58, 12.78], ddof=1)))
    assert flowers.text() == "13.18 ± 0.40 (n=3)"
    assert "13.18 $\\pm$ 0.40 (n=3)" in (tmp_path / "out" / "tables" / "table1_fid.tex").read_text()


def test_crop_seeds_are_replicates_not_repeats(fixture_storage, tmp_path):
    """Trials with one training seed and other crop seeds (data.view_seed, a replicate axis) are seeds of the
    setting, averaged in its cell; only trials that differ in convergence evaluations alone repeat one run."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    for view_seed, fid in ((1, 13.58), (2, 12.78)):
        twin(storage, "lora-d16-flowers102", metrics={"fid": fid}, data={"view_seed": view_seed})
    analysis = analyse(storage, tmp_path / "out", grids=False, figures=False)
    table1 = next(t for t in analysis.tables if t.name == "table1_fid")
    flowers = next(r for r in table1.rows if r[:2] == ["VAR-d16", "LoRA"])[4]
    assert flowers.n == 3 and flowers.mean == pytest.approx((13.18 + 13.58 + 12.78) / 3)
    assert not analysis.results.repeats and len(analysis.results.trials) == 55


def test_a_second_seed_sampled_with_seed_0_repeats_the_one_sampled_with_its_seed(fixture_storage, tmp_path):
    """The second seed sampled with seed 0 before it sampled with its own: both results of one training counted as
    two seeds (n = 3 for two trainings). They are one run; the result sampled with the training seed is kept."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    seeds = {"optimization": {"seed": 1}, "data": {"view_seed": 1}}
    old = twin(storage, "lora-d16-flowers102", metrics={"fid": 14.0}, **seeds)
    new = twin(
        storage, "lora-d16-flowers102", metrics={"fid": 13.5}, evaluation={"sampling_seed": 1}, **seeds
    )
    analysis = analyse(storage, tmp_path / "out", grids=False, figures=False)
    table1 = next(t for t in analysis.tables if t.name == "table1_fid")
    flowers = next(r for r in table1.rows if r[:2] == ["VAR-d16", "LoRA"])[4]
    assert flowers.n == 2 and flowers.mean == pytest.approx((13.18 + 13.5) / 2)
    assert [(repeat, kept) for repeat, _, kept in analysis.results.repeats] == [
        (old["trial_id"], new["trial_id"])
    ]


def test_one_value_has_no_std_and_parameter_cells_count_their_trials(golden_run):
    """The sample std of one value is undefined: the per-cell CSV leaves it empty. A trainable-parameter cell is a
    median over its row's trials (Table 1: one per dataset): n counts them, and it has no std."""
    rows = read_csv(golden_run.out / "tables" / "table1_fid_cells.csv")
    fft = {r["column"]: r for r in rows if (r["model"], r["method"]) == ("VAR-d16", "FFT")}
    assert (fft["food101"]["mean"], fft["food101"]["std"], fft["food101"]["n"]) == ("6.11", "", "1")
    for column in ("trainable_params", "trainable_pct"):
        assert (fft[column]["std"], fft[column]["n"]) == ("", "5"), fft[column]
    assert (
        "| VAR-d16 | FFT | 6.11 | 5.74 | 12.08 | 7.42 | 13.13 | 309.6M | 100 |"
        in (golden_run.out / "tables" / "table1_fid.md").read_text()
    )


def test_published_rows_without_a_trial_are_named_under_their_table(fixture_storage, tmp_path):
    """Sweeps cut short: every paper table names the published rows it has no trial for (a reader without
    --compare-paper is told), for the models it shows only; the digits demo's tables get no such note."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    for path in (storage / "results").glob("*.json"):
        config = TrialConfig.from_dict(json.loads(path.read_text())["config"])
        k = config.privacy.augmentation_multiplicity if config.privacy else None
        if (config.model.depth, config.method.name, k) in {
            (20, "ln_tuning", None),
            (20, "lora", 128),
        } or config.method.name == "lora_attention":
            path.unlink()
    analysis = analyse(storage, tmp_path / "out", grids=False, figures=False)
    missing = "not in the table, published but without a trial here: "
    notes = {t.name: [n for n in t.notes if n.startswith("not in the table")] for t in analysis.tables}
    assert notes["table1_fid"] == notes["table9_precision_recall"] == [f"{missing}VAR-d20 LNTuning"]
    assert notes["table2_dp_multiplicity"] == [f"{missing}VAR-d20 LoRA k=128 (epsilon 10)"]
    assert notes["table10_dp_ablation"] == [f"{missing}VAR-d16 LoRA-A k=128 (epsilon 10)"]
    assert notes["table3_dp_epsilon"] == []
    assert f"{missing}VAR-d20 LNTuning" in (tmp_path / "out" / "tables" / "table1_fid.md").read_text()
    # Only the models run: VAR-d16 alone misses no published row; Table 2 at another epsilon has none to miss.
    d16 = analyse(fixture_storage, tmp_path / "d16", where={"model.depth": 16}, grids=False, figures=False)
    at_20 = analyse(storage, tmp_path / "eps20", table2_epsilon=20, grids=False, figures=False)
    for table in d16.tables + [t for t in at_20.tables if t.name.startswith("table2")]:
        assert not any(n.startswith("not in the table") for n in table.notes), (table.name, table.notes)


def test_the_second_seed_sweep_replicates_table1_settings():
    # The paper sweeps move the crop seed with the training seed; the analysis must still see one setting.
    settings = {setting_of(c) for c in build_sweep("table1")}
    twins = build_sweep("second_seed")
    assert {c.data.view_seed for c in twins} == {1}
    assert all(setting_of(c) in settings for c in twins)


def test_figures_have_files_and_axes(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    for label, fids in (
        ("full-d16-flowers102", (40.0, 20.5, 12.08)),
        ("lora-d16-flowers102", (45.0, 25.1, 13.18)),
    ):
        rewrite(
            result_path(storage, label),
            lambda r, f=fids: r.update(
                convergence=[{"step": 500 * (i + 1), "fid": v} for i, v in enumerate(f)]
            ),
        )
    analysis = analyse(storage, tmp_path / "out", grids=False)
    figures = {f.name: f for f in analysis.figures}
    assert sorted(figures) == [
        "compute_pflops",
        "convergence_fid",
        "fid_vs_k",
        "parameters_vs_fid",
        "privacy_utility",
    ] and analysis.skipped_figures == [
        "privacy_audit: no successful trial has a privacy audit (config audit)",
        "privacy_audit_roc: no successful trial has a privacy audit (config audit)",
    ]
    for figure in figures.values():
        assert all(p.is_file() and p.stat().st_size > 5000 for p in figure.paths), figure.paths
        assert [p.suffix for p in figure.paths] == [".png", ".pdf"]
    assert set(figures["compute_pflops"].ylabels) == {"Training compute [PFLOPs] ↓"} and set(
        figures["compute_pflops"].xlabels
    ) == {"dataset"}
    assert figures["convergence_fid"].xlabels == ("training step",) and figures[
        "convergence_fid"
    ].ylabels == ("FID ↓ (on 1,000 images)",)
    assert (
        set(figures["privacy_utility"].xlabels) == {"privacy budget ε"}
        and len(figures["privacy_utility"].xlabels) == 2
    )  # d16, d20
    assert (
        figures["parameters_vs_fid"].xlabels == ("trainable parameters [millions]",) * 2
    )  # a panel per model
    # epsilon and k ticks are the values run, printed plainly (not 10^0); no-DP references are in the legend
    assert figures["privacy_utility"].xticklabels == (("1", "10", "20", "50", "100", "500", "1000"),) * 2
    assert {"LoRA, no DP", "LNTuning, no DP", "LoRA, k=32", "LoRA, k=128"} <= set(
        figures["privacy_utility"].legend
    )
    assert (
        figures["fid_vs_k"].xlabels == ("augmentation multiplicity k",) * 2
        and figures["fid_vs_k"].xticklabels == (("1", "32", "128"),) * 2
    )
    assert figures["fid_vs_k"].legend == (
        "LoRA, DP ε=10",
        "LNTuning, DP ε=10",
        "LoRA, no DP",
        "LNTuning, no DP",
    )
    assert all(
        label.replace(".", "").isdigit()
        for f in figures.values()
        for ticks in f.xticklabels
        for label in ticks
        if label and f.name != "compute_pflops"
    ), [f.xticklabels for f in figures.values()]
    page = (tmp_path / "out" / "index.html").read_text()
    assert all(f"figures/{name}.png" in page for name in figures)


def test_sample_grid_puts_generated_beside_real_images(tmp_path):
    """Real images are matched to generated ones by label, whatever order the class names sort in (results are
    written with sorted keys); the record's artifact paths are relative to the storage root."""
    config = build_sweep("demo")[1]
    storage, folder = tmp_path / "storage", f"artifacts/{config.trial_id}"
    real = []
    rng = np.random.default_rng(0)
    for label, name in enumerate(("pink primrose", "hard-leaved pocket orchid", "canterbury bells")):
        generated = storage / folder / "images" / f"class_{label:04d}"
        generated.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                generated / f"{i:06d}.png"
            )
        paths = []
        for i in range(2):
            path = f"{folder}/real/class_{label}/{i}.jpg"
            (storage / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((90, 120, 3), 40 * (label + 1), np.uint8)).save(
                storage / path, quality=100
            )
            paths.append(path)
        real.append({"label": label, "class": name, "paths": paths})
    (storage / real[1]["paths"][1]).write_bytes(
        b"not a jpeg"
    )  # an unreadable real image shows as a blank tile
    record = make_result(config, status="success", metrics={"fid": 9.0}, artifacts=artifacts_of(folder, real))
    ResultStore(storage).write(record)
    analysis = analyse(storage, tmp_path / "out", figures=False)
    grid = Image.open(analysis.grids[config.trial_id])
    layout = grid_layout(3)
    assert grid.size == (layout["width"], layout["height"])
    pixels, tile = np.asarray(grid).astype(int), layout["tile"]
    real_left = layout["real_left"] + 2
    for row, grey in enumerate((40, 80, 120)):  # each class's real image beside its own generated images
        top = layout["rows_top"] + row * tile
        assert np.abs(pixels[top + 10 : top + 50, real_left + 10 : real_left + 50] - grey).max() <= 2, row
    top = layout["rows_top"] + tile
    assert (
        pixels[top + 10, real_left + tile + 10] == 255
    ).all()  # the orchid's unreadable second image: blank
    assert (pixels[top + 10, real_left + 2 * tile + 10] == 255).all()  # no third image recorded: blank
    assert f"grids/{config.trial_id}.png" in (tmp_path / "out" / "index.md").read_text()
    assert not analysis.missing_grids
    # The same storage read through a URI: the images a grid shows are downloaded into the output folder.
    remote = analyse(f"file://{storage}", tmp_path / "out-uri", figures=False)
    assert np.array_equal(np.asarray(Image.open(remote.grids[config.trial_id])), np.asarray(grid))
    assert (tmp_path / "out-uri" / "grids" / "downloaded" / config.trial_id / real[0]["paths"][0]).is_file()
    # Given its results/ folder, the storage root is its parent.
    assert analyse(storage / "results", tmp_path / "out-results", figures=False).grids


def artifacts_of(folder: str, real: list[dict], *, adapter: bool = True) -> dict:
    """An ``artifacts`` section of the storage layout (``bench.schema.Artifacts``)."""
    return {
        "folder": folder,
        "adapter": f"{folder}/adapter.pt" if adapter else None,
        "generated_images": f"{folder}/images",
        "real_images": real,
    }


def test_grids_of_old_absolute_paths_and_missing_images_are_skipped_with_a_note(tmp_path):
    config = build_sweep("demo")[1]
    images = tmp_path / "work" / "images" / "class_0"
    digit_png(images / "0.png", 0)
    old = make_result(
        config,
        status="success",
        metrics={"fid": 9.0},
        artifacts={
            "generated_images": str(images.parent),
            "real_images": [{"label": 0, "class": "0", "paths": []}],
        },
    )
    ResultStore(tmp_path / "storage").write(old)
    analysis = analyse(tmp_path / "storage", tmp_path / "out", figures=False)
    assert (
        not analysis.grids
        and "absolute paths by an older varsweep" in analysis.missing_grids[config.trial_id]
    )
    assert "absolute paths by an older varsweep" in (tmp_path / "out" / "index.md").read_text()
    moved = make_result(
        config,
        status="success",
        metrics={"fid": 9.0},
        artifacts=artifacts_of(f"artifacts/{config.trial_id}", []),
    )
    ResultStore(tmp_path / "storage").write(moved)
    analysis = analyse(tmp_path / "storage", tmp_path / "out2", figures=False)
    assert analysis.missing_grids[config.trial_id].startswith("generated images not found")


def test_cli_writes_the_report_and_says_where(fixture_storage, tmp_path, capsys):
    assert (
        cli(
            [
                str(fixture_storage / "results"),
                "--out",
                str(tmp_path / "out"),
                "--compare-paper",
                "--no-grids",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert (
        "53 trials: 53 succeeded, 0 failed. Wrote 7 tables, 5 comparisons, 4 figures, 0 sample grids."
        in printed
    )
    assert (
        "Figures not drawn:\n  convergence_fid: no trial has the data it plots" in printed
        and "index.html" in printed
    )
    html = (tmp_path / "out" / "index.html").read_text()
    for needle in (
        "Provenance",
        "feature extractor",
        "inception-v3-compat (53)",
        "tables/table1_fid.tex",
        "compare_table3_dp_epsilon",
        "convergence_fid: no trial has the data it plots",
    ):
        assert needle in html, needle
    assert len(read_csv(tmp_path / "out" / "trials.csv")) == 53


def test_trials_parquet_has_the_rows_and_types_of_trials_csv(golden_run):
    out = golden_run.out
    parquet, from_csv = pd.read_parquet(out / "trials.parquet"), pd.read_csv(out / "trials.csv")
    pd.testing.assert_frame_equal(parquet, golden_run.results.trials)  # every column's type survives
    assert list(parquet.columns) == list(from_csv.columns) and len(parquet) == len(from_csv) == 53
    # The same values as the CSV, where CSV cannot say None (it reads an empty cell back as NaN).
    as_read = [frame.astype(object).where(frame.notna(), None) for frame in (parquet, from_csv)]
    pd.testing.assert_frame_equal(*as_read, check_dtype=False, check_exact=False)
    for page in ("index.html", "index.md"):
        text = (out / page).read_text()
        assert "trials.parquet" in text and "trials.csv" in text, page


def test_analysis_imports_neither_torch_nor_ray():
    code = (
        "import sys, analysis.__main__, analysis.run, analysis.paper; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'torchvision')); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_results_on_a_storage_uri_are_read_like_a_folder(fixture_storage):
    """Sweeps may store results on s3://, gs://, ... (pyarrow); file:// exercises the same code path offline."""
    results = load_results(f"file://{fixture_storage}")
    assert len(results.trials) == 53 and not results.invalid


def twin(storage: Path, label_part: str, *, metrics: dict | None = None, **sections) -> dict:
    """Write a copy of a fixture trial with config sections changed (a new trial id) and return it."""
    record = json.loads(result_path(storage, label_part).read_text())
    config = replace(TrialConfig.from_dict(record["config"]), **sections)
    copy = {
        **record,
        "trial_id": config.trial_id,
        "config": config.to_dict(),
        "metrics": {**record["metrics"], **(metrics or {})},
    }
    (storage / "results" / f"{config.trial_id}.json").write_text(json.dumps(copy))
    return copy


def test_different_settings_in_one_cell_are_refused_not_averaged(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    other = twin(storage, "lora-d16-cub200", metrics={"fid": 30.0}, method={"lora_rank": 64})
    with pytest.raises(
        AnalysisError,
        match=r"(?s)1 table cell.*VAR-d16 cub200 lora no DP k=1: 2 settings differing in method.lora_rank = 16, 64",
    ):
        load_results(storage)
    assert cli([str(storage), "--out", str(tmp_path / "refused")]) == 2
    rank64 = analyse(storage, tmp_path / "out", where={"method.lora_rank": 64}, grids=False, figures=False)
    assert (
        list(rank64.results.trials["trial_id"]) == [other["trial_id"]] and len(rank64.results.excluded) == 53
    )
    assert "lora_rank is not 64" in (tmp_path / "out" / "index.md").read_text()
    assert (
        cli(
            [
                str(storage),
                "--out",
                str(tmp_path / "cli"),
                "--where",
                "method.lora_rank=16",
                "--no-grids",
                "--no-figures",
            ]
        )
        == 0
    )
    assert read_csv(tmp_path / "cli" / "tables" / "table1_fid.csv")[1]["cub200"] == "7.84"
    with pytest.raises(AnalysisError, match="no such config field"):
        load_results(storage, where={"method.rank": 16})
    # One sweep's trials in a folder that holds others (the demo analyses its own): the rest are listed as excluded.
    own = load_results(storage, trial_ids=[other["trial_id"]])
    assert list(own.trials["trial_id"]) == [other["trial_id"]] and {why for *_, why in own.excluded} == {
        "not one of the 1 trials asked for"
    }


def test_where_selects_dp_trials_by_their_privacy_fields_in_a_folder_with_non_dp_ones(
    fixture_storage, tmp_path, capsys
):
    """A non-DP trial's privacy section is null: its fields read as None, so it is left out, not an error."""
    dp10 = load_results(fixture_storage, where={"privacy.target_epsilon": 10})
    assert len(dp10.trials) and set(dp10.trials["epsilon"]) == {10.0} and dp10.trials["dp"].all()
    assert len(dp10.excluded) == 53 - len(dp10.trials) and "privacy.target_epsilon is not 10" in {
        why for *_, why in dp10.excluded
    }
    k32 = load_results(fixture_storage, where={"privacy.augmentation_multiplicity": 32})
    assert set(k32.trials["k"]) == {32}
    with pytest.raises(AnalysisError, match=r"privacy.target_epsilonn: no such config field \(privacy has: "):
        load_results(fixture_storage, where={"privacy.target_epsilonn": 10})
    assert (
        cli(
            [
                str(fixture_storage),
                "--out",
                str(tmp_path / "out"),
                "--where",
                "method.name=lora",
                "--where",
                "method.name=full",
            ]
        )
        == 2
    )
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("error: --where method.name given twice: each field takes one value")
    )


def test_a_folder_named_like_a_result_is_not_read_as_one(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    (storage / "results" / "stray.json").mkdir()
    for where in (storage, f"file://{storage}"):  # a local folder, and a storage URI (read through pyarrow)
        results = load_results(where)
        assert len(results.trials) == 53 and not results.invalid


def test_a_second_analysis_into_the_same_folder_leaves_none_of_the_first_s_tables(fixture_storage, tmp_path):
    out = tmp_path / "out"
    analyse(fixture_storage, out, grids=False, figures=False)
    assert (out / "tables" / "privacy.csv").is_file() and (out / "tables" / "table3_dp_epsilon.md").is_file()
    mine = {"notes.txt", "my_notes.md", "hand_made.csv"}  # files no analysis wrote, of its kinds too: kept
    for name in mine:
        (out / "tables" / name).write_text("mine")
    (out / "figures").mkdir(exist_ok=True)
    (out / "figures" / "architecture.pdf").write_text("mine")
    second = analyse(fixture_storage, out, where={"privacy": None}, grids=False, figures=False)
    names = {p.name for p in (out / "tables").iterdir()}
    assert names == {f"{t.name}{s}" for t in second.tables for s in t.renderers()} | mine
    assert "privacy.csv" not in names and not any(name.startswith("table3") for name in names)
    assert (out / "figures" / "architecture.pdf").read_text() == "mine"


def test_a_first_analysis_into_a_folder_of_the_user_s_files_removes_none(fixture_storage, tmp_path):
    out = tmp_path / "paper"
    for folder, name in (("tables", "table1_fid.notes.md"), ("figures", "diagram.png"), ("grids", "x.png")):
        (out / folder).mkdir(parents=True)
        (out / folder / name).write_text("mine")
    analyse(fixture_storage, out, grids=False, figures=False)
    assert {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.read_bytes() == b"mine"
    } == {
        "tables/table1_fid.notes.md",
        "figures/diagram.png",
        "grids/x.png",
    }


def test_an_analysis_into_its_own_folder_of_results_runs_twice(fixture_storage, tmp_path):
    """Written into a flat folder of result JSONs, an analysis left its manifest there, which the second read as
    an invalid result ("schema_version: expected 3, got None")."""
    flat = tmp_path / "flat"
    shutil.copytree(fixture_storage / "results", flat)
    first = analyse(flat, flat, grids=False, figures=False)
    assert (flat / ".varsweep-outputs.json").is_file()
    second = analyse(flat, flat, grids=False, figures=False)
    assert [t.name for t in second.tables] == [t.name for t in first.tables]


def test_a_manifest_naming_files_outside_the_output_folder_removes_none_of_them(fixture_storage, tmp_path):
    """The manifest lists what an earlier analysis wrote; a copied or hand-edited one naming an absolute path, a
    path through "..", or a link out of the folder deleted that file."""
    out, victims = (
        tmp_path / "out",
        [tmp_path / "absolute.txt", tmp_path / "dotdot.txt", tmp_path / "linked.txt"],
    )
    for victim in victims:
        victim.write_text("mine")
    out.mkdir()
    (out / "link.txt").symlink_to(victims[2])
    listed = [str(victims[0]), "../dotdot.txt", "link.txt"]
    (out / ".varsweep-outputs.json").write_text(json.dumps({"files": listed}))
    analyse(fixture_storage, out, grids=False, figures=False)
    assert all(victim.read_text() == "mine" for victim in victims)


def test_a_second_analysis_without_figures_leaves_none_of_the_first_s_figures(fixture_storage, tmp_path):
    """index.md would say "all figures: not asked for" beside the first analysis's figures."""
    out = tmp_path / "out"
    assert analyse(fixture_storage, out, grids=False).figures and any((out / "figures").glob("*.png"))
    analyse(fixture_storage, out, grids=False, figures=False)
    assert not any((out / "figures").glob("*.p*"))


@pytest.mark.parametrize(
    "curve_settings",
    [{"convergence_every_steps": 500, "convergence_points": 0}, {"convergence_points": 4}],
)
def test_a_convergence_twin_counts_once(fixture_storage, tmp_path, curve_settings):
    """A sweep that re-runs a trial with other evaluations during training (every N steps, or at N points of the
    run; the convergence sweep did, before its trials were Table 1's own): same setting and seed, so the cell holds
    one value (the twin with the curve), not a fake n=2."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    curve = twin(
        storage, "full-d16-flowers102", evaluation={**curve_settings, "convergence_num_images": 1000}
    )
    rewrite(
        storage / "results" / f"{curve['trial_id']}.json",
        lambda r: r.update(convergence=[{"step": 500, "fid": 30.0}]),
    )
    analysis = analyse(storage, tmp_path / "out", grids=False)
    table1 = next(t for t in analysis.tables if t.name == "table1_fid")
    cell_ = next(r for r in table1.rows if r[:2] == ["VAR-d16", "FFT"])[4]
    assert cell_.n == 1 and cell_.text() == "12.08"
    assert [kept for _, _, kept in analysis.results.repeats] == [curve["trial_id"]]
    assert "Repeats counted once" in (tmp_path / "out" / "index.md").read_text()
    # the provenance counts trials too, the repeat once
    assert provenance(analysis.results)["git commit"] == [f"fixture ({len(analysis.results.trials)})"]
    assert "convergence_fid" in {f.name for f in analysis.figures}


def test_successful_trials_without_a_value_are_shown(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    for seed in (1, 2):
        twin(storage, "lora-d16-flowers102", metrics={"fid": float("nan")}, optimization={"seed": seed})
    rewrite(
        result_path(storage, "lora-d16-cub200"), lambda r: r["metrics"].update(fid=float("nan"))
    )  # a recorded FID is a number
    analysis = analyse(storage, tmp_path / "out", grids=False, figures=False)
    lora = next(
        r
        for r in next(t for t in analysis.tables if t.name == "table1_fid").rows
        if r[:2] == ["VAR-d16", "LoRA"]
    )
    assert lora[4].text() == "13.18 (2 without value)" and lora[3].text() == "no value"
    assert read_csv(tmp_path / "out" / "tables" / "table1_fid.csv")[1]["cub200"] == ""


def test_dp_tables_are_per_dataset_and_only_flowers_is_compared(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    cub = twin(
        storage,
        "lora-d16-flowers102-eps10-k1-",
        metrics={"fid": 200.0},
        data={"dataset": "cub200", "root": "/assets/datasets/cub200"},
    )
    analysis = analyse(storage, tmp_path / "out", compare_paper=True, grids=False, figures=False)
    names = {t.name for t in analysis.tables}
    assert {"table2_dp_multiplicity_flowers102", "table2_dp_multiplicity_cub200"} <= names
    cub_table = next(t for t in analysis.tables if t.name == "table2_dp_multiplicity_cub200")
    assert cub_table.title.endswith("[cub200]") and [r[:4] for r in cub_table.rows] == [
        ["VAR-d16", "LoRA", "10", "1"]
    ]
    assert cub_table.rows[0][4].text() == "200.00" and cub["trial_id"] in analysis.results.records
    compared = {t.name for t in analysis.comparisons}
    assert "compare_table2_dp_multiplicity_flowers102" in compared and not any(
        "cub200" in name for name in compared
    )


def test_sweeps_of_one_kind_say_which_tables_they_lack(fixture_storage, tmp_path):
    dp_only = copy_storage(fixture_storage, tmp_path / "dp")
    for path in (dp_only / "results").glob("*.json"):
        if json.loads(path.read_text())["config"]["privacy"] is None:
            path.unlink()
    analysis = analyse(dp_only, tmp_path / "dp-out", grids=False, figures=False)
    assert sorted(t.name for t in analysis.tables) == [
        "compute",
        "privacy",
        "table10_dp_ablation",
        "table2_dp_multiplicity",
        "table3_dp_epsilon",
    ]
    assert analysis.skipped_tables == [
        "table1_fid: no non-DP trial",
        "class_accuracy: no trial recorded class accuracy (metrics.class_accuracy)",
        "table9_precision_recall: no adapted non-DP trial",
        "privacy_audit: no trial has a privacy audit (config audit)",
    ]
    other_eps = analyse(dp_only, tmp_path / "eps3", table2_epsilon=3, grids=False, figures=False)
    assert any(
        "table2_dp_multiplicity: no DP LoRA or LNTuning trial at ε=3 (DP trials ran at ε in {1, 10, 20, 50, 100, 500, 1000}"
        in line
        for line in other_eps.skipped_tables
    )
    assert "Tables not produced" in (tmp_path / "eps3" / "index.md").read_text()

    failed_only = copy_storage(fixture_storage, tmp_path / "failed")
    for path in (failed_only / "results").glob("*.json"):
        rewrite(path, lambda r: r.update(status="failed", error="worker died", metrics={}))
    analysis = analyse(failed_only, tmp_path / "failed-out", grids=False)
    assert len(analysis.results.failed) == 53 and not analysis.figures
    assert {c.text() for t in analysis.tables if t.name == "table1_fid" for r in t.rows for c in r[2:7]} == {
        "failed"
    }


def test_error_text_is_inert_in_the_report_and_latex_is_escaped(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    rewrite(
        result_path(storage, "full-d16-food101"),
        lambda r: r.update(status="failed", metrics={}, error="<img src=x onerror=alert(1)> | `x`"),
    )
    analyse(storage, tmp_path / "out", grids=False, figures=False)
    md, page = (tmp_path / "out" / "index.md").read_text(), (tmp_path / "out" / "index.html").read_text()
    assert "<img src=x" not in md and "&lt;img src=x onerror=alert(1)&gt; \\| 'x'" in md
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    tex = (tmp_path / "out" / "tables" / "table1_fid.tex").read_text()
    assert "trainable\\_params" in tex and "—" not in tex and "failed" in tex


def test_many_dp_curves_and_a_broken_figure_do_not_cost_the_report(fixture_storage, tmp_path, monkeypatch):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    for path in (storage / "results").glob("*.json"):
        rewrite(
            path, lambda r: r.update(convergence=[{"step": 100, "fid": 50.0}, {"step": 200, "fid": 40.0}])
        )
    results = load_results(storage)
    many = analysis_figures.convergence_figure(
        results.trials, results.convergence, tmp_path / "many"
    )  # 30+ DP curves in one panel
    assert (
        len(set(many.legend)) == len(many.legend) == 16 and "DP-LoRA ε=1000, k=32" in many.legend
    )  # one entry per label

    monkeypatch.setattr(analysis_figures, "parameters_figure", lambda trials, folder: 1 / 0)
    broken = analyse(fixture_storage, tmp_path / "broken", grids=False)
    assert "parameters_vs_fid: drawing failed (ZeroDivisionError: division by zero)" in broken.skipped_figures
    assert (tmp_path / "broken" / "index.html").is_file() and len(
        broken.figures
    ) == 3  # compute, privacy, FID vs k


def test_nothing_valid_and_repeated_ids_are_named(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    first = result_path(storage, "full-d16-food101")
    shutil.copy(first, storage / "results" / "zz-copy.json")
    with pytest.raises(AnalysisError, match=r"zz-copy\.json: repeats trial"):
        load_results(storage)
    assert len(load_results(storage, skip_invalid=True).trials) == 53
    junk = tmp_path / "junk" / "results"
    junk.mkdir(parents=True)
    (junk / "a.json").write_text("{}")
    with pytest.raises(AnalysisError, match="no valid results.*all 1 files are invalid"):
        analyse(tmp_path / "junk", tmp_path / "junk-out", skip_invalid=True)


# --- demo-like results: digits, class accuracy, labelled sample grids -------------------------------------------
# (method, epsilon, FID, precision, recall, class accuracy) of the six demo trials, made up but shaped like the demo.
DIGIT_TRIALS = (
    ("base", None, 180.0, 0.10, 0.05, 0.12),
    ("full", None, 40.0, 0.70, 0.60, 0.91),
    ("lora", None, 45.0, 0.66, 0.58, 0.87),
    ("ln_tuning", None, 62.0, 0.55, 0.41, 0.64),
    ("lora", 1.0, 120.0, 0.30, 0.12, 0.31),
    ("lora", 8.0, 71.0, 0.48, 0.33, 0.58),
)
CLASSIFIER = {"name": "digits-cnn-v1", "test_accuracy": 0.986, "weights_sha256": "ab" * 32, "resolution": 16}


def digit_png(path: Path, digit: int, *, noise: float = 0.0, seed: int = 0) -> None:
    """A 16 px digit, dark ink on light paper like the demo's (noisy for generated images)."""
    import matplotlib.font_manager as fm
    from PIL import ImageDraw, ImageFont

    image = Image.new("L", (16, 16), 235)
    font = ImageFont.truetype(fm.findfont(fm.FontProperties(family="DejaVu Sans")), 14)
    ImageDraw.Draw(image).text((8, 8), str(digit), fill=20, font=font, anchor="mm")
    pixels = np.asarray(image, dtype=float) + noise * np.random.default_rng(seed).normal(size=(16, 16))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB").save(path)


def digit_record(
    config: TrialConfig, row: tuple, storage: Path, real: list[bytes], *, classes: int = 10
) -> dict:
    """A demo-like result whose artifacts (generated digits, and copies of the ``real`` PNGs per class) are
    written into ``storage`` under the trial's artifacts folder."""
    method, epsilon, fid, precision, recall, accuracy = row
    folder = f"artifacts/{config.trial_id}"
    for label in range(classes):
        for i in range(6):
            digit_png(
                storage / folder / "images" / f"class_{label:04d}" / f"{i:06d}.png",
                label,
                noise=40.0 * (1 - accuracy),
                seed=100 * label + i,
            )
    entries = []
    for label in range(classes):
        paths = [f"{folder}/real/class_{label}/{i}.png" for i in range(6)]
        for path in paths:
            (storage / path).parent.mkdir(parents=True, exist_ok=True)
            (storage / path).write_bytes(real[label])
        entries.append({"label": label, "class": str(label), "paths": paths})
    per_class = [
        round(min(1.0, max(0.0, accuracy + 0.05 * ((label % 3) - 1))), 3) for label in range(classes)
    ]
    per_class[-1] = (
        None if method == "base" else per_class[-1]
    )  # a class without generated images has no accuracy
    curve = (
        []
        if method == "base"
        else [
            {
                "step": s,
                "fid": fid * f,
                "precision": precision,
                "recall": recall,
                "class_accuracy": accuracy / f,
            }
            for s, f in ((100, 1.8), (200, 1.2), (300, 1.0))
        ]
    )
    privacy = (
        None
        if epsilon is None
        else {
            "target_epsilon": epsilon,
            "epsilon_rdp": epsilon * 0.98,
            "epsilon_prv": epsilon * 0.95,
            "delta": 1 / 1438,
            "noise_multiplier": 1.1,
            "steps": 300,
            "sampling_rate": 0.1,
            "max_grad_norm": 1.0,
            "augmentation_multiplicity": 2,
        }
    )
    return make_result(
        config,
        status="success",
        metrics={
            "fid": fid,
            "precision": precision,
            "recall": recall,
            "kid_mean": fid / 1e4,
            "class_accuracy": accuracy,
            "class_accuracy_per_class": per_class,
        },
        convergence=curve,
        privacy=privacy,
        cost={"train_pflops": 0.002, "gpu_hours": 0.0},
        parameters={"trainable": 1000 if method != "full" else 90000, "base_total": 100000},
        evaluation_settings={"extractor": "digits-cnn-v1", "classifier": CLASSIFIER},
        artifacts=artifacts_of(folder, entries, adapter=method != "base"),
    )


def real_digits(folder: Path, classes: int) -> list[bytes]:
    """One real 16 px digit PNG per class (as bytes)."""
    for label in range(classes):
        digit_png(folder / f"{label}.png", label % 10)
    return [(folder / f"{label}.png").read_bytes() for label in range(classes)]


def digit_storage(folder: Path, *, classes: int = 10) -> Path:
    """Six demo-like results (the demo's base, full, lora and DP-LoRA at epsilon 1 and 8 with k=2, and an LN-tuning twin) with generated and
    real 16 px digit PNGs on disk, evaluated with the digits classifier as extractor."""
    configs = {
        (c.method.name, c.privacy.target_epsilon if c.privacy else None): c for c in build_sweep("demo")
    }
    configs["ln_tuning", None] = replace(
        configs["lora", None], method={"name": "ln_tuning"}
    )  # not in the demo: its own setting
    real = real_digits(folder / "real", classes)
    store = ResultStore(folder / "storage")
    for row in DIGIT_TRIALS:
        store.write(digit_record(configs[row[:2]], row, folder / "storage", real, classes=classes))
    return folder / "storage"


@pytest.fixture(scope="module")
def digit_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    return analyse(digit_storage(folder), folder / "out")


def test_class_accuracy_is_a_metric_a_column_and_its_own_table(digit_run):
    out = digit_run.out
    trials = {(r["method"], r["epsilon"]): r for r in read_csv(out / "trials.csv")}
    assert (
        float(trials[("full", "")]["class_accuracy"]) == pytest.approx(91.0)
        and trials[("full", "")]["classifier"] == "digits-cnn-v1"
    )
    assert "class_accuracy_per_class" not in trials[("full", "")]  # a list, not a table column
    rows = read_csv(out / "tables" / "class_accuracy.csv")
    assert list(rows[0]) == [
        "model",
        "method",
        "epsilon",
        "k",
        "fid",
        "precision_pct",
        "recall_pct",
        "kid",
        "class_accuracy_pct",
    ]
    assert [(r["method"], r["epsilon"], r["k"], r["class_accuracy_pct"]) for r in rows] == [
        ("Base", "no DP", "1", "12.0"),
        ("FFT", "no DP", "1", "91.0"),
        ("LoRA", "no DP", "1", "87.0"),
        ("LoRA", "1", "2", "31.0"),
        ("LoRA", "8", "2", "58.0"),
        ("LNTuning", "no DP", "1", "64.0"),
    ]
    assert rows[1]["fid"] == "40.00" and rows[1]["precision_pct"] == "70.00" and rows[1]["kid"] == "0.0040"
    md = (out / "tables" / "class_accuracy.md").read_text()
    assert "classifier: digits-cnn-v1 (its accuracy on real test images: 98.6%)" in md
    page = (out / "index.html").read_text()
    assert (
        "Class accuracy of generated samples" in page
        and "digits-cnn-v1 (98.6% on real test images, 16 px" in page
    )
    assert "digits-cnn-v1 (6)" in page  # the extractor, in the provenance
    assert not any(line.startswith("class_accuracy") for line in digit_run.skipped_tables)


def test_without_class_accuracy_its_table_is_skipped_with_the_reason(golden_run):
    assert (
        "class_accuracy: no trial recorded class accuracy (metrics.class_accuracy)"
        in golden_run.skipped_tables
    )


def test_digit_grids_are_labelled_and_show_every_class(digit_run):
    assert len(digit_run.grids) == 6 and not digit_run.missing_grids
    full = next(
        tid
        for tid, label in zip(digit_run.results.trials["trial_id"], digit_run.results.trials["label"])
        if label.startswith("full")
    )
    grid = np.asarray(Image.open(digit_run.grids[full]).convert("L")).astype(int)
    layout = grid_layout(10)
    assert grid.shape == (layout["height"], layout["width"])
    header = grid[layout["header_top"] : layout["rows_top"]]
    for left in (
        layout["generated_left"],
        layout["real_left"],
    ):  # "generated" and "real" written over their blocks
        assert (header[:, left : left + 6 * layout["tile"]] < 128).sum() > 30
    assert (grid[: layout["header_top"], :400] < 128).sum() > 200  # the caption
    assert (
        grid[layout["rows_top"] :, : layout["generated_left"]] < 128
    ).sum() > 10 * 20  # a class name on every row
    last = (
        layout["rows_top"] + 9 * layout["tile"]
    )  # the tenth class (digit 9): real and generated tiles drawn
    for left in (layout["generated_left"], layout["real_left"]):
        tile = grid[last + 2 : last + 66, left + 2 : left + 66]
        assert tile.min() < 80 and tile.max() > 200, left
    # 16 px digits are enlarged 4x with nearest-neighbour: every 4x4 block of a real tile is one pixel
    real = grid[last + 2 : last + 66, layout["real_left"] + 2 : layout["real_left"] + 66].reshape(
        16, 4, 16, 4
    )
    assert (real.max(axis=(1, 3)) == real.min(axis=(1, 3))).all()


def test_grid_caption_names_the_trial_and_its_metrics(digit_run):
    records = digit_run.results.records
    dp8 = next(r for r in records.values() if (r["config"]["privacy"] or {}).get("target_epsilon") == 8.0)
    title, metrics = grid_caption(dp8)
    assert (
        title.startswith("DP-LoRA ε=8, k=2 · tiny-d") and "digits" in title and dp8["trial_id"][:12] in title
    )
    assert metrics == "FID 71.00 · precision 48.00% · recall 33.00% · KID 0.0071 · class accuracy 58.0%"
    base = next(r for r in records.values() if r["config"]["method"]["name"] == "base")
    assert grid_caption(base)[0].startswith("Base · ")


def test_grid_grows_with_the_number_of_classes(tmp_path):
    heights = {}
    for classes in (3, 12):
        folder = tmp_path / str(classes)
        record = digit_record(
            build_sweep("demo")[1],
            DIGIT_TRIALS[1],
            folder,
            real_digits(folder / "real", classes),
            classes=classes,
        )
        path, why = sample_grid(record, folder / "grids", storage=folder)
        assert why is None
        heights[classes] = Image.open(path).height
    assert heights[12] - heights[3] == 9 * grid_layout(1)["tile"]


def test_digit_figures_have_plain_epsilon_ticks_and_no_dp_references(digit_run):
    figures = {f.name: f for f in digit_run.figures}
    assert {"privacy_utility", "convergence_fid", "compute_pflops", "parameters_vs_fid"} <= set(figures)
    privacy = figures["privacy_utility"]
    assert privacy.xticklabels == (("1", "8"),)  # not 10^0
    assert "LoRA, no DP" in privacy.legend and "LoRA, k=2" in privacy.legend
    assert figures["convergence_fid"].ylabels == (
        "FID ↓ (on 120 images)",
        "Class accuracy [%] ↑ (on 120 images)",
    )  # class accuracy during training too
    curves = digit_run.results.convergence.drop(
        columns="class_accuracy"
    )  # final class accuracy alone draws no curve
    only_fid = analysis_figures.convergence_figure(
        digit_run.results.trials, curves, digit_run.out / "fid-only"
    )
    assert only_fid.ylabels == ("FID ↓ (on 120 images)",)
    assert any(
        "fid_vs_k: no successful DP LoRA or LNTuning trial at ε=10 (DP trials ran at ε in {1, 8}" in line
        for line in digit_run.skipped_figures
    )


def test_every_k_has_its_own_colour():
    colours = k_colors([1, 4, 8, 16, 32, 64, 128, 4, 1])
    assert sorted(colours) == [1, 4, 8, 16, 32, 64, 128] and len(set(colours.values())) == 7


def test_compare_paper_refuses_other_extractors_and_datasets(tmp_path, capsys):
    storage = digit_storage(tmp_path, classes=2)
    assert (
        cli([str(storage), "--out", str(tmp_path / "out"), "--compare-paper", "--no-grids", "--no-figures"])
        == 2
    )
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert error.startswith(
        "error: --compare-paper refused: the published numbers use the inception-v3-compat extractor, "
        "these results were evaluated with digits-cnn-v1 (6 trials), whose FIDs are not comparable"
    )
    assert not (tmp_path / "out").exists()  # nothing written
    for path in (storage / "results").glob(
        "*.json"
    ):  # Inception features, but a dataset the paper did not use
        rewrite(path, lambda r: r["evaluation_settings"].update(extractor="inception-v3-compat"))
    with pytest.raises(
        AnalysisError,
        match=r"^--compare-paper refused: the paper did not use dataset digits \(6 trials\) \(it used food101, cub200",
    ):
        analyse(storage, tmp_path / "out", compare_paper=True)
    assert not (tmp_path / "out").exists()
    assert (
        len(analyse(storage, tmp_path / "plain", grids=False, figures=False).tables) > 0
    )  # without --compare-paper: fine


def test_compare_paper_refuses_a_set_number_of_images_and_another_resolution(fixture_storage, tmp_path):
    """The paper generates as many images per class as the test split has, at 256 px: a trial evaluated on a set
    number of images, or at another resolution, cannot stand beside it. The refusal counts them and names the
    selection that leaves them out."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    original = result_path(storage, "lora-d16-cub200")
    twin(storage, "lora-d16-cub200", evaluation={"num_images": 500})
    original.unlink()  # the same trial, evaluated on 500 images
    tiny = replace(
        build_sweep("demo")[1],
        data={"dataset": "flowers102", "root": "/assets/datasets/flowers102"},
        evaluation={
            "extractor": "inception-v3-compat",
            "inception_weights": "/assets/inception.pth",
            "guidance_scale": 1.5,
            "top_k": 900,
        },
    )
    extractor = {"extractor": "inception-v3-compat"}
    ResultStore(storage).write(
        make_result(tiny, status="success", metrics={"fid": 90.0}, evaluation_settings=extractor)
    )
    with pytest.raises(AnalysisError) as refused:
        analyse(storage, tmp_path / "out", compare_paper=True, grids=False, figures=False)
    assert str(refused.value) == (
        "--compare-paper refused: 1 trial evaluated on a set number of images (evaluation.num_images = 500; the "
        "paper generates as many per class as the test split has: select the others with --where "
        "evaluation.num_images=null); 1 trial at data.resolution = 16 (the paper's images are 256 px: select the "
        "others with --where data.resolution=256)"
    )
    assert not (tmp_path / "out").exists()
    where = {"evaluation.num_images": None, "data.resolution": 256}
    selected = analyse(storage, tmp_path / "ok", compare_paper=True, where=where, grids=False, figures=False)
    assert len(selected.comparisons) == 5 and len(selected.results.excluded) == 2


def replace_trial(storage: Path, label_part: str, **sections) -> dict:
    """Rewrite a fixture trial with config sections changed (so under a new trial id) and return it."""
    original = result_path(storage, label_part)
    record = twin(storage, label_part, **sections)
    original.unlink()
    return record


def test_compare_paper_refuses_other_sampling_settings_and_evaluation_split(fixture_storage, tmp_path):
    """The paper samples with guidance 1.5, top-k 900 and top-p 0.96 and scores against the test split: results
    sampled otherwise, or scored against another split, stood beside it with a difference of +0. The refusal names
    each setting, the values found and the paper's; the provenance lists the sampling and split of the results."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    replace_trial(storage, "lora-d16-cub200", evaluation={"guidance_scale": 3.0, "top_k": 0, "top_p": 0.0})
    replace_trial(storage, "full-d16-cub200", data={"evaluation_split": "train"})
    with pytest.raises(AnalysisError) as refused:
        analyse(storage, tmp_path / "out", compare_paper=True, grids=False, figures=False)
    assert str(refused.value) == (
        "--compare-paper refused: 1 trial at evaluation.guidance_scale = 3 (the paper's is 1.5: select the others "
        "with --where evaluation.guidance_scale=1.5); 1 trial at evaluation.top_k = 0 (the paper's is 900: select "
        "the others with --where evaluation.top_k=900); 1 trial at evaluation.top_p = 0 (the paper's is 0.96: "
        "select the others with --where evaluation.top_p=0.96); 1 trial at data.evaluation_split = train (the "
        "paper's is test: select the others with --where data.evaluation_split=test)"
    )
    assert not (tmp_path / "out").exists()
    sources = provenance(load_results(storage))
    assert sources["sampling"] == [
        "guidance 1.5, top-k 900, top-p 0.96 (52)",
        "guidance 3, top-k 0, top-p 0 (1)",
    ]
    assert sources["evaluation split"] == ["test (52)", "train (1)"]
    where = {"evaluation.guidance_scale": 1.5, "data.evaluation_split": "test"}
    selected = analyse(storage, tmp_path / "ok", compare_paper=True, where=where, grids=False, figures=False)
    assert (
        len(selected.comparisons) == 5
        and "- sampling: guidance 1.5, top-k 900, top-p 0.96 (51)"
        in (tmp_path / "ok" / "index.md").read_text()
    )


def measured_on(record: dict, devices: list[str], workers: int, rows_per_second: float) -> None:
    """Make ``record``'s cost measured on ``devices`` by ``workers`` DDP workers."""
    record["cost"].update(estimated=False, rows_per_second=rows_per_second, peak_memory_bytes=2**33)
    record["environment"].update(devices=devices, world_size=workers)


def test_a_compute_row_over_different_hardware_says_it_mixes_devices(fixture_storage, tmp_path):
    """Two seeds of one setting, one on an H100 and one on 4 CPU workers (resources are not in the trial id), were
    averaged into one row's throughput, memory and GPU hours with nothing saying so."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    h100 = ["NVIDIA H100 80GB HBM3"]
    gpu = rewrite(result_path(storage, "lora-d16-cub200"), lambda r: measured_on(r, h100, 1, 900.0))
    config = replace(TrialConfig.from_dict(gpu["config"]), optimization={"seed": 1}, resources={"workers": 4})
    cpu = {**json.loads(json.dumps(gpu)), "trial_id": config.trial_id, "config": config.to_dict()}
    measured_on(cpu, ["cpu"], 4, 3.0)
    (storage / "results" / f"{config.trial_id}.json").write_text(json.dumps(cpu))
    rewrite(result_path(storage, "lora-d16-flowers102"), lambda r: measured_on(r, h100, 1, 800.0))
    analysis = analyse(storage, tmp_path / "out", grids=False, figures=False)
    (compute,) = [t for t in analysis.tables if t.name == "compute"]
    assert compute.header[-1] == "devices"
    devices = {tuple(r[:3]): r[-1] for r in compute.rows if r[3] == "no DP"}
    assert (
        devices[("VAR-d16", "cub200", "LoRA")] == "mixed: NVIDIA H100 80GB HBM3 (1 worker) + cpu (4 workers)"
    )
    assert devices[("VAR-d16", "flowers102", "LoRA")] == "NVIDIA H100 80GB HBM3 (1 worker)"
    assert devices[("VAR-d16", "cub200", "FFT")] == "—"  # estimated: no hardware measured it
    assert any(
        note.startswith("devices: the hardware of the row's measured trials") for note in compute.notes
    )
    assert (
        "mixed: NVIDIA H100 80GB HBM3 (1 worker) + cpu (4 workers)"
        in (tmp_path / "out" / "index.md").read_text()
    )


def test_convergence_fids_say_how_many_images_they_score(fixture_storage, tmp_path):
    """Curves scored on 20 and on 1,000 images shared one axis labelled "FID ↓": the count goes on the axis where
    the lines share it, on each line where they differ, and the report's caption says what such FIDs are."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    for label, images, fids in (
        ("full-d16-cub200", 20, (80.0, 60.0)),
        ("lora-d16-cub200", 1000, (30.0, 20.0)),
    ):
        record = replace_trial(
            storage, label, evaluation={"convergence_points": 2, "convergence_num_images": images}
        )
        rewrite(
            storage / "results" / f"{record['trial_id']}.json",
            lambda r, f=fids: r.update(
                convergence=[{"step": 100 * (i + 1), "fid": v} for i, v in enumerate(f)]
            ),
        )
    analysis = analyse(storage, tmp_path / "out", grids=False)
    (figure,) = [f for f in analysis.figures if f.name == "convergence_fid"]
    assert figure.ylabels == ("FID ↓ (image count per line)",)
    assert set(figure.legend) == {"FFT, 20 images", "LoRA, 1,000 images"}
    assert CONVERGENCE_CAPTION in (tmp_path / "out" / "index.md").read_text()
    trials, curves = analysis.results.trials, analysis.results.convergence
    lora = trials.loc[trials["method"] == "lora", "trial_id"]
    one = analysis_figures.convergence_figure(trials, curves[curves["trial_id"].isin(lora)], tmp_path / "one")
    assert one.ylabels == ("FID ↓ (on 1,000 images)",) and one.legend == ("LoRA",)


def test_lora_variants_are_named_by_the_groups_they_adapt():
    assert set(PAPER_VARIANTS) == set(LORA_PRESETS.values())
    assert variant("lora", None) == ("LoRA-AM+LN", "attention+mlp+adaln")
    assert variant("lora_attention", "attention") == ("LoRA-A", "attention qkv+proj")
    assert variant("lora", "attention") == ("LoRA-A", "attention qkv+proj")
    assert variant("lora", "attention+mlp") == ("LoRA-AM", "attention+mlp")
    assert variant("lora", "attention+modulation") == ("LoRA-A+LN", "attention+adaln")
    assert variant("lora_mlp", "modulation") == ("LoRA-LN", "adaln")
    assert variant("ln_tuning", None) == ("LNTuning", "adaln")


def test_table10_names_a_trial_by_its_effective_targets_and_compare_paper_refuses_others(
    fixture_storage, tmp_path
):
    """Table 10 named a variant after its method: a lora trial adapting attention and MLP only read "LoRA-AM+LN",
    and its comparison split the published row in two half-empty ones; the ablation presets spelled out as
    targets printed raw group names."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    replace_trial(storage, "lora_attention-d16", method={"lora_targets": ["attention"]})
    replace_trial(storage, "lora_mlp-d16", method={"lora_targets": ["mlp"]})
    spelled = analyse(storage, tmp_path / "spelled", compare_paper=True, grids=False, figures=False)
    (table10,) = [t for t in spelled.tables if t.name == "table10_dp_ablation"]
    assert [r[1:3] for r in table10.rows] == [
        ["LoRA-A", "attention qkv+proj"],
        ["LoRA-M", "mlp fc1+fc2"],
        ["LoRA-AM+LN", "attention+mlp+adaln"],
        ["LNTuning", "adaln"],
    ]
    (compared,) = [t for t in spelled.comparisons if t.name == "compare_table10_dp_ablation"]
    assert {row[-1] for row in compared.rows} == {"+0"}
    replace_trial(storage, "lora-d16-flowers102-eps10-k128", method={"lora_targets": ["attention", "mlp"]})
    replace_trial(storage, "lora-d16-cub200", method={"lora_targets": ["attention"]})
    plain = analyse(storage, tmp_path / "plain", grids=False, figures=False)
    (table10,) = [t for t in plain.tables if t.name == "table10_dp_ablation"]
    assert [r[1:3] for r in table10.rows][2:] == [["LNTuning", "adaln"], ["LoRA-AM", "attention+mlp"]]
    with pytest.raises(AnalysisError) as refused:
        analyse(storage, tmp_path / "out", compare_paper=True, grids=False, figures=False)
    assert str(refused.value) == (
        "--compare-paper refused: method.lora_targets other than the method's preset (lora with attention (1 "
        "trial): LoRA-A, method lora_attention's run; lora with attention+mlp (1 trial): LoRA-AM, no paper "
        "variant); the paper's LoRA variants are the presets LoRA-A (attention), LoRA-M (mlp), LoRA-AM+LN "
        "(attention+mlp+modulation), each under its own method: select the others with --where "
        "method.lora_targets=null"
    )


def test_cli_expected_failures_end_in_one_line_without_traceback(
    fixture_storage, tmp_path, capsys, monkeypatch
):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("x")
    invalid = tmp_path / "invalid" / "results"
    invalid.mkdir(parents=True)
    (invalid / "bad.json").write_text("{")
    mixed = copy_storage(fixture_storage, tmp_path / "mixed")
    record = json.loads(result_path(mixed, "lora-d16-cub200").read_text())
    config = replace(
        TrialConfig.from_dict(record["config"]),
        evaluation={"extractor": "substitute-randconv-v1", "inception_weights": None},
    )
    ResultStore(mixed).write(
        make_result(
            config, status="success", metrics={"fid": 3.0}, evaluation_settings={"extractor": "digits-cnn-v1"}
        )
    )
    cases = {
        "empty": ([str(tmp_path / "empty")], "no result files"),
        "missing": ([str(tmp_path / "nowhere")], "does not exist"),
        "file": ([str(tmp_path / "a-file")], "is not a folder"),
        "invalid": ([str(invalid)], "1 file(s) are not valid results"),
        "mixed": ([str(mixed)], "mix feature extractors"),
        "unwritable out": (
            [str(fixture_storage), "--out", str(tmp_path / "a-file" / "out")],
            "cannot create or write in the output folder",
        ),
    }
    for name, (args, needle) in cases.items():
        argv = args + ([] if "--out" in args else ["--out", str(tmp_path / "out" / name.replace(" ", "_"))])
        assert cli(argv + ["--no-grids", "--no-figures"]) == 2, name
        error = capsys.readouterr().err
        last = error.strip().splitlines()[
            -1
        ]  # a listing (which files) comes above the line that says what is wrong
        assert last.startswith("error: ") and needle in last and "Traceback" not in error, (name, error)
    import analysis.load as load

    def unreadable(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(load, "_json_names", unreadable)
    assert cli([str(tmp_path / "empty"), "--out", str(tmp_path / "out" / "unreadable")]) == 2
    error = capsys.readouterr().err
    assert (
        error
        == f"error: cannot read the results in {tmp_path / 'empty'}: PermissionError: [Errno 13] Permission denied: '{tmp_path / 'empty'}'\n"
    )


def test_a_long_title_is_wrapped_inside_the_figure_left_of_the_legend(tmp_path):
    import matplotlib.pyplot as plt

    fig, axes = analysis_figures._figure(1)
    axes[0].plot([1, 2], [3, 4], label="a rather long legend entry, DP ε=8, k=2")
    analysis_figures._legend(fig)
    analysis_figures._title(fig, "A title far too long for one panel: " + "words " * 30)
    renderer = fig.canvas.get_renderer()
    title, legend = fig._suptitle.get_window_extent(renderer), fig.legends[0].get_window_extent(renderer)
    assert "\n" in fig._suptitle.get_text() and title.x0 >= 0 and title.x1 <= legend.x0
    plt.close(fig)


@pytest.mark.parametrize(
    "pflops, scale", [({"full": 2.31e-3, "lora": 2.22e-3}, "linear"), ({"full": 300.0, "lora": 12.0}, "log")]
)
def test_the_compute_figure_labels_its_axis_whatever_the_spread(pflops, scale, tmp_path):
    """The demo's FFT and LoRA spend about the same compute: on a log axis that spans less than a decade no major
    tick was labelled, and the bars' heights were relative to an arbitrary floor (a 4% difference drawn as 10x)."""
    import pandas as pd

    trials = pd.DataFrame(
        [
            {
                "status": "success",
                "dp": False,
                "method": m,
                "train_pflops": v,
                "depth": 2,
                "model": "tiny-d2",
                "dataset": "digits",
            }
            for m, v in pflops.items()
        ]
    )
    captured = {}
    original = analysis_figures._compute_panel
    analysis_figures._compute_panel = lambda ax, sub: (
        original(ax, sub),
        captured.update(scale=ax.get_yscale()),
    )
    try:
        figure = analysis_figures.compute_figure(trials, tmp_path)
    finally:
        analysis_figures._compute_panel = original
    assert captured["scale"] == scale
    assert len(figure.yticklabels[0]) >= 2, (
        figure.yticklabels
    )  # at least two labelled values to read the bars by


def test_a_small_non_zero_metric_is_not_shown_as_zero():
    """Tables round each metric to its decimals; a value that rounding would show as zero (the tiny demo model's
    0.002 training PFLOPs against one decimal) keeps two significant digits instead."""
    from analysis.metrics import METRICS

    compute = METRICS["train_pflops"]
    assert compute.format(0.00213) == "0.0021"
    assert compute.format(12.345) == "12.3" and compute.format(0.0) == "0.0"
    assert METRICS["fid"].format(7.94204) == "7.94"


def fixture_record(storage: Path, config: TrialConfig, *, fid: float, trainable: int) -> dict:
    """Write the fixture's record of ``config`` (estimated cost, as ``paper_fixture`` writes) with an FID."""
    from analysis.paper import _fixture_record

    record = _fixture_record(config)
    record["metrics"] = {"fid": fid}
    record["parameters"] = {"trainable": trainable, "base_total": trainable * 50, "adapter_parameters": 0}
    (storage / "results" / f"{config.trial_id}.json").write_text(json.dumps(record))
    return record


def test_the_compute_table_says_which_rows_hold_the_dry_run_estimate(fixture_storage, tmp_path):
    """The fixture's cost is the dry-run estimate (``cost.estimated``); its compute table looked measured. A row
    says where its numbers come from, and one that averages a measured record with an estimated one says so."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    measured = json.loads(result_path(storage, "lora-d16-flowers102").read_text())
    del measured["cost"]["estimated"]
    result_path(storage, "lora-d16-flowers102").write_text(json.dumps(measured))
    config = replace(TrialConfig.from_dict(measured["config"]), optimization={"seed": 1})
    fixture_record(storage, config, fid=20.0, trainable=6_020_000)  # a second seed, estimated
    result_path(storage, "full-d16-flowers102").write_text(
        result_path(storage, "full-d16-flowers102")
        .read_text()
        .replace('"estimated": true', '"estimated": false')
    )
    analysis = analyse(storage, tmp_path / "out", grids=False, figures=False)
    (compute,) = [t for t in analysis.tables if t.name == "compute"]
    assert compute.header[-2:] == ["cost", "devices"]
    source = {tuple(r[:5]): r[-2] for r in compute.rows}
    assert source[("VAR-d16", "flowers102", "LoRA", "no DP", "1")] == "partly estimated"
    assert source[("VAR-d16", "flowers102", "FFT", "no DP", "1")] == "measured"
    assert source[("VAR-d16", "cub200", "LoRA", "no DP", "1")] == "estimated"
    assert any(
        note.startswith("cost estimated: the records hold the dry-run estimate") for note in compute.notes
    )


def test_audited_trials_get_compute_rows_and_bars_of_their_own(fixture_storage, tmp_path, monkeypatch):
    """The privacy_audit sweep beside the paper sweeps: its audited LoRA trial (d16 Flowers, no DP) trains on ~500
    canaries besides the dataset and costs more than Table 1's LoRA trial of the setting. The compute table showed
    one cell for both ("31.8 ± 8.8 (n=2)", as if two seeds) and the compute figure one bar of their mean."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    config = next(c for c in build_sweep("privacy_audit") if c.privacy is None and c.method.name == "lora")
    audited = fixture_record(storage, config, fid=20.0, trainable=6_020_000)["cost"]["train_pflops"]
    plain = json.loads(result_path(storage, "lora-d16-flowers102").read_text())["cost"]["train_pflops"]
    assert audited > 1.2 * plain
    analysis = analyse(storage, tmp_path / "out", grids=False, figures=False)
    (compute,) = [t for t in analysis.tables if t.name == "compute"]
    rows = {tuple(r[:5]): r[5] for r in compute.rows if r[:2] == ["VAR-d16", "flowers102"]}
    own = rows[("VAR-d16", "flowers102", "LoRA", "no DP", "1")]
    theirs = rows[("VAR-d16", "flowers102", "LoRA (audited, 1000 canaries)", "no DP", "1")]
    assert (own.n, theirs.n) == (1, 1) and (own.mean, theirs.mean) == pytest.approx((plain, audited))
    assert any(note.startswith("audited rows: trials of a privacy audit") for note in compute.notes)

    bars = {}
    original = analysis_figures._compute_panel
    monkeypatch.setattr(
        analysis_figures,
        "_compute_panel",
        lambda ax, sub: (
            original(ax, sub),
            bars.update(  # column (dataset) -> height: a series has bars only where it has trials
                {
                    (ax, c.get_label()): {round(b.get_x() + b.get_width() / 2): b.get_height() for b in c}
                    for c in ax.containers
                }
            ),
        ),
    )
    figure = analysis_figures.compute_figure(analysis.results.trials, tmp_path / "figures")
    d16 = {label: heights for (ax, label), heights in bars.items() if ax.get_title() == "VAR-d16"}
    flowers = list(DATASET_COLUMNS).index("flowers102")
    assert d16["LoRA"][flowers] == pytest.approx(plain)
    assert d16["LoRA (audited)"][flowers] == pytest.approx(audited)
    assert "LoRA (audited)" in figure.legend


def test_dp_trials_no_table_shows_are_named_with_their_fid(fixture_storage, tmp_path):
    """DP full fine-tuning at one epsilon (a setting of REFERENCE.md's DP table the paper's DP tables never print)
    fell in no table: Table 2 shows LoRA and LNTuning, Table 3 settings run at two or more epsilons. Table 2 keeps
    the published layout and names them with their FID, and the report lists them; so does a report of them
    alone, where no DP table is drawn."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    alone = tmp_path / "alone"
    (alone / "results").mkdir(parents=True)
    for depth in (16, 20):
        config = dp_trial("full", depth, epsilon=10, k=1, assets=Assets("/assets"))
        for folder in (storage, alone):
            fixture_record(folder, config, fid=55.5, trainable=309_600_000)
    named = (
        "in no table, DP runs outside Table 2 (LoRA and LNTuning at epsilon 10), Table 3 (a model, method and k "
        "run at two or more epsilons) and Table 10 (where a LoRA variant ran): VAR-d16 FFT k=1 (epsilon 10): FID "
        "55.50; VAR-d20 FFT k=1 (epsilon 10): FID 55.50"
    )
    analysis = analyse(storage, tmp_path / "out", grids=False, figures=False)
    tables = {t.name: t for t in analysis.tables}
    assert {r[1] for r in tables["table2_dp_multiplicity"].rows} == {"LoRA", "LNTuning"}
    assert named in tables["table2_dp_multiplicity"].notes
    assert not any(
        named in note for t in analysis.tables if t.name != "table2_dp_multiplicity" for note in t.notes
    )
    report = (tmp_path / "out" / "index.md").read_text()
    assert f"## DP trials in no table\n\n- flowers102: {named}" in report

    only = analyse(alone, tmp_path / "alone-out", grids=False, figures=False)
    assert not any(t.name.startswith("table") for t in only.tables)
    assert only.in_no_table == [f"flowers102: {named}"]
    assert f"- flowers102: {named}" in (tmp_path / "alone-out" / "index.md").read_text()


def test_a_single_epsilon_run_of_a_table3_method_is_named_once():
    """Every DP trial is in exactly one place: a Table 3 method's run at one epsilon (named by Table 3's own note)
    and an ablation setting's LNTuning (Table 10) are not named again as in no table."""
    from analysis.tables import dp_in_no_table

    trials = pd.DataFrame(
        [
            {"dataset": "flowers102", "model": "VAR-d16", "depth": 16, "method": m, "epsilon": e, "k": k}
            for m, e, k in (
                ("lora", 1.0, 32),
                ("lora", 20.0, 32),  # Table 3's row
                ("lora", 50.0, 1),  # at one epsilon, no Table 3 row of LoRA k=1: in no table
                ("lora_attention", 20.0, 128),
                ("ln_tuning", 20.0, 128),  # Table 10's
                ("full", 20.0, 1),  # in no table
            )
        ]
    ).assign(dp=True, audited=False, status="success", fid=50.0, class_accuracy=float("nan"))
    (note,) = dp_in_no_table(trials).values()
    assert note.endswith(
        ": VAR-d16 FFT k=1 (epsilon 20): FID 50.00; VAR-d16 LoRA k=1 (epsilon 50): FID 50.00"
    )


def test_equal_values_over_seeds_show_no_spread_and_the_comparison_shows_ours_whole():
    """Counted FLOPs are equal over non-DP seeds: their float std of 1e-15 was printed as "± 1.1e-15". Beside the
    published numbers, our cell lost its spread, seed count and failures (a 3-seed mean with a failed run read as
    one clean value); the CSV keeps the mean."""
    from analysis.paper import comparison
    from analysis.tables import Cell, Table, cell

    equal = pd.DataFrame({"status": ["success"] * 3, "sample_pflops": [6.092285253976064] * 3})
    assert cell(equal, "sample_pflops").text() == "6.09 ± 0.00 (n=3)"
    fid = lambda value: f"{value:.2f}"  # noqa: E731
    ours = Table(
        "table1_fid",
        "FID",
        ["model", "method", "food101", "cub200"],
        [["VAR-d16", "FFT", Cell(8.84, 1.0, 3, 0, fid), Cell(6.11, None, 1, 1, fid)]],
    )
    compared = comparison(ours)
    shown = {row[2]: row for row in compared.rows if row[:2] == ["VAR-d16", "FFT"]}
    assert "8.84 ± 1.00 (n=3) |" in compared.markdown() and "6.11 (1 failed) |" in compared.markdown()
    paper = {r["method"]: r for r in published("table1_fid") if r["model"] == "VAR-d16"}["FFT"]
    assert shown["food101"][-1] == f"{8.84 - number(paper['food101']):+.4g}"
    assert "VAR-d16,FFT,food101,8.84," in compared.csv() and "_cells.csv" not in compared.renderers()


def test_figures_tell_seeds_apart_print_plain_rates_and_keep_the_paper_s_dataset_order(tmp_path):
    """Non-DP seeds of one setting were drawn alike in the convergence figure (two identical legend entries), the
    ROC's log axes printed powers of ten, and the parameters figure's legend listed datasets alphabetically."""
    import matplotlib.pyplot as plt

    from analysis.figures import _convergence_panel, _roc_panel, dataset_markers

    curves = pd.DataFrame(
        [
            {"trial_id": f"t{seed}", "method": "lora", "epsilon": np.nan, "k": 1, "dp": False, "seed": seed}
            | {"step": step, "fid": 10.0 - step - seed, "convergence_num_images": 1000}
            for seed in (0, 1)
            for step in (1, 2)
        ]
    )
    fig, ax = plt.subplots()
    _convergence_panel(ax, curves, "fid")
    assert len({str(line.get_linestyle()) for line in ax.lines}) == 2
    points = pd.DataFrame({"fpr": [0.0, 0.01, 0.1, 1.0], "tpr": [0.0, 0.05, 0.5, 1.0]})
    _roc_panel(ax, [(points, "a trial", {})])
    assert [ax.xaxis.get_major_formatter()(v, 0) for v in (0.01, 0.1, 1.0)] == ["0.01", "0.1", "1"]
    plt.close(fig)
    order = dataset_markers(pd.DataFrame({"dataset": ["oxford_pet", "cub200", "food101", "mine"]}))
    assert list(order) == ["food101", "cub200", "oxford_pet", "mine"]


def test_a_result_file_that_is_not_an_object_is_named_as_such(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "odd.json").write_text('"a string"')
    with pytest.raises(AnalysisError, match=r"odd.json: ValueError: not a JSON object but \"a string\""):
        load_results(tmp_path)


def test_compute_bars_are_centred_on_each_dataset_with_the_series_it_has():
    """Audited trials of one dataset made a series of their own across the panel, leaving gaps beside the bars
    of every other dataset."""
    import matplotlib.pyplot as plt

    from analysis.figures import _compute_panel

    rows = [("flowers102", "full", False), ("flowers102", "full", True), ("cub200", "full", False)]
    rows += [("cub200", "lora", False), ("flowers102", "lora", False)]
    sub = pd.DataFrame(
        [
            {"dataset": d, "method": m, "_audited": a, "train_pflops": 5.0 + i}
            for i, (d, m, a) in enumerate(rows)
        ]
    )
    fig, ax = plt.subplots()
    _compute_panel(ax, sub)
    centres = sorted(p.get_x() + p.get_width() / 2 for p in ax.patches)
    cub, flowers = centres[:2], centres[2:]  # cub200 is column 0 in the paper's order, flowers102 column 1
    assert len(flowers) == 3 and sum(cub) / 2 == pytest.approx(0.0) and sum(flowers) / 3 == pytest.approx(1.0)
    plt.close(fig)
