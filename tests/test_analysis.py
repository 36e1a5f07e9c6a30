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
import pytest
from PIL import Image

from analysis.__main__ import main as cli
from analysis.load import AnalysisError, load_results
from analysis.paper import PAPER_DIR, number, paper_fixture, published
from analysis.run import analyse
from bench.results import ResultStore
from bench.schema import TrialConfig, make_result, replace
from bench.sweeps import build_sweep

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "paper"
SHARED_PAPER = Path(os.environ.get("VARSWEEP_SHARED", REPO.parent / "shared")) / "paper"
PAPER_TABLES = ("table1_fid", "table2_dp_multiplicity", "table3_dp_epsilon", "table9_precision_recall", "table10_dp_ablation")
KEYS = {"table1_fid": 2, "table2_dp_multiplicity": 4, "table3_dp_epsilon": 3, "table9_precision_recall": 2, "table10_dp_ablation": 5}
# Cells our Table 2 has beyond the paper's: the same sweep's k = 32 trials (Table 3's epsilon-10 column) and the
# ablation's LNTuning at k = 128 (Table 10), which the paper prints elsewhere.
TABLE2_EXTRA = {("VAR-d16", "LoRA", "10", "32"), ("VAR-d20", "LoRA", "10", "32"), ("VAR-d16", "LNTuning", "10", "128")}


@pytest.fixture(scope="module")
def fixture_storage(tmp_path_factory) -> Path:
    storage = tmp_path_factory.mktemp("paper") / "storage"
    paper_fixture(storage)
    return storage


@pytest.fixture(scope="module")
def golden_run(fixture_storage, tmp_path_factory):
    return analyse(fixture_storage, tmp_path_factory.mktemp("out"), compare_paper=True, grids=False)


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
    """The fixture result whose config label contains ``label_part`` (the first, in id order)."""
    for path in sorted((storage / "results").glob("*.json")):
        if label_part in TrialConfig.from_dict(json.loads(path.read_text())["config"]).label:
            return path
    raise AssertionError(f"no fixture trial matches {label_part}")


@pytest.mark.parametrize("name", PAPER_TABLES)
def test_fixture_regenerates_the_published_tables_cell_by_cell(golden_run, name):
    ours = read_csv(golden_run.out / "tables" / f"{name}.csv")
    paper = [r for r in published(name) if r["model"].startswith("VAR-")]  # DiT baselines are not ours to regenerate
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
                assert number(mine) == pytest.approx(number(value), rel=1e-9, abs=1e-9), (name, key, column, mine, value)
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
        assert only_ours == (TABLE2_EXTRA if table.name == "compare_table2_dp_multiplicity" else set()), only_ours


def test_packaged_published_tables_equal_the_shared_copy():
    if not SHARED_PAPER.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{SHARED_PAPER} is missing (set VARSWEEP_SHARED)")
        pytest.skip("shared paper tables not available")
    for path in SHARED_PAPER.glob("*.csv"):
        assert (PAPER_DIR / path.name).read_text() == path.read_text(), path.name


def test_failed_and_missing_trials_are_marked_not_invented(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    failed = rewrite(result_path(storage, "full-d16-food101"), lambda r: r.update(status="failed", error="CUDA out of memory\ntraceback...", metrics={}))
    result_path(storage, "lora-d20-stanford_cars").unlink()
    analysis = analyse(storage, tmp_path / "out", grids=False)
    assert len(analysis.results.failed) == 1 and analysis.results.failed.iloc[0]["trial_id"] == failed["trial_id"]
    table1 = read_csv(tmp_path / "out" / "tables" / "table1_fid.csv")
    row = lambda model, method: next(r for r in table1 if r["model"] == model and r["method"] == method)  # noqa: E731
    assert row("VAR-d16", "FFT")["food101"] == "" and row("VAR-d20", "LoRA")["cars196"] == ""
    markdown = (tmp_path / "out" / "tables" / "table1_fid.md").read_text()
    assert "| VAR-d16 | FFT | failed | 5.74 |" in markdown and "| VAR-d20 | LoRA | 6.97 | 6.29 | 11.16 | — | 12.97 |" in markdown
    report = (tmp_path / "out" / "index.md").read_text()
    assert "52 trials: 51 succeeded, 1 failed." in report and f"({failed['trial_id']}): CUDA out of memory" in report
    assert "traceback" not in report  # first line of the error only


def test_mixed_feature_extractors_are_refused(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    record = json.loads(result_path(storage, "lora-d16-cub200").read_text())
    config = replace(TrialConfig.from_dict(record["config"]), evaluation={"extractor": "substitute-randconv-v1", "inception_weights": None})
    other = make_result(config, status="success", metrics={"fid": 3.0}, evaluation_settings={"extractor": "substitute-randconv-v1"})
    (storage / "results" / f"{config.trial_id}.json").write_text(json.dumps(other))
    with pytest.raises(AnalysisError, match="mix feature extractors.*inception-v3-compat.*substitute-randconv-v1.*--extractor"):
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
    assert "truncated.json: JSONDecodeError" in str(error.value) and "schema_version: expected 1, got 99" in str(error.value)
    analysis = analyse(storage, tmp_path / "out", skip_invalid=True, grids=False)
    assert len(analysis.results.invalid) == 2 and len(analysis.results.trials) == 52
    assert "truncated.json" in (tmp_path / "out" / "index.md").read_text()
    with pytest.raises(AnalysisError, match="does not exist"):
        load_results(tmp_path / "nowhere")


def test_seeds_give_mean_and_std(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    record = json.loads(result_path(storage, "lora-d16-flowers102").read_text())
    for seed, fid in ((1, 13.58), (2, 12.78)):
        config = replace(TrialConfig.from_dict(record["config"]), optimization={"seed": seed})
        twin = {**record, "trial_id": config.trial_id, "config": config.to_dict(), "metrics": {**record["metrics"], "fid": fid}}
        (storage / "results" / f"{config.trial_id}.json").write_text(json.dumps(twin))
    analysis = analyse(storage, tmp_path / "out", grids=False)
    table1 = next(t for t in analysis.tables if t.name == "table1_fid")
    lora = next(r for r in table1.rows if r[:2] == ["VAR-d16", "LoRA"])
    flowers = lora[2 + 2]
    assert flowers.n == 3 and flowers.mean == pytest.approx((13.18 + 13.58 + 12.78) / 3)
    assert flowers.std == pytest.approx(float(np.std([13.18, 13.58, 12.78], ddof=1)))
    assert flowers.text() == "13.18 ± 0.40 (n=3)"
    assert "13.18 $\\pm$ 0.40 (n=3)" in (tmp_path / "out" / "tables" / "table1_fid.tex").read_text()


def test_figures_have_files_and_axes(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    for label, fids in (("full-d16-flowers102", (40.0, 20.5, 12.08)), ("lora-d16-flowers102", (45.0, 25.1, 13.18))):
        rewrite(result_path(storage, label), lambda r, f=fids: r.update(convergence=[{"step": 500 * (i + 1), "fid": v} for i, v in enumerate(f)]))
    analysis = analyse(storage, tmp_path / "out", grids=False)
    figures = {f.name: f for f in analysis.figures}
    assert sorted(figures) == ["compute_pflops", "convergence_fid", "parameters_vs_fid", "privacy_utility"] and not analysis.skipped_figures
    for figure in figures.values():
        assert all(p.is_file() and p.stat().st_size > 5000 for p in figure.paths), figure.paths
        assert [p.suffix for p in figure.paths] == [".png", ".pdf"]
    assert set(figures["compute_pflops"].ylabels) == {"Training compute [PFLOPs] ↓"} and set(figures["compute_pflops"].xlabels) == {"dataset"}
    assert figures["convergence_fid"].xlabels == ("training step",) and figures["convergence_fid"].ylabels == ("FID ↓",)
    assert set(figures["privacy_utility"].xlabels) == {"privacy budget ε"} and len(figures["privacy_utility"].xlabels) == 2  # d16, d20
    assert figures["parameters_vs_fid"].xlabels == ("trainable parameters [millions]",) * 2  # a panel per model
    page = (tmp_path / "out" / "index.html").read_text()
    assert all(f"figures/{name}.png" in page for name in figures)


def test_sample_grid_puts_generated_beside_real_images(tmp_path):
    """Real images are matched to generated ones by label, whatever order the class names sort in (results are
    written with sorted keys)."""
    generated, real_dir = tmp_path / "images", tmp_path / "real"
    real = []
    rng = np.random.default_rng(0)
    for label, name in enumerate(("pink primrose", "hard-leaved pocket orchid", "canterbury bells")):
        (generated / f"class_{label:04d}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(generated / f"class_{label:04d}" / f"{i:06d}.png")
        paths = []
        for i in range(2):
            path = real_dir / name / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((90, 120, 3), 40 * (label + 1), np.uint8)).save(path, quality=100)
            paths.append(str(path))
        real.append({"label": label, "class": name, "paths": paths})
    Path(real[1]["paths"][1]).write_bytes(b"not a jpeg")  # an unreadable real image shows as a blank tile
    config = build_sweep("demo")[1]
    record = make_result(config, status="success", metrics={"fid": 9.0}, artifacts={"generated_images": str(generated), "real_images": real})
    ResultStore(tmp_path / "storage").write(record)
    analysis = analyse(tmp_path / "storage", tmp_path / "out")
    grid = Image.open(analysis.grids[config.trial_id])
    tile = 64 + 4
    assert grid.size == (2 * 6 * tile + 32 + 4, 3 * tile)
    pixels = np.asarray(grid).astype(int)
    real_left = 6 * tile + 36 + 2
    for row, grey in enumerate((40, 80, 120)):  # each class's real image beside its own generated images
        assert np.abs(pixels[row * tile + 10: row * tile + 50, real_left + 10: real_left + 50] - grey).max() <= 2, row
    assert (pixels[tile + 10, real_left + tile + 10] == 255).all()  # the orchid's unreadable second image: blank
    assert f"grids/{config.trial_id}.png" in (tmp_path / "out" / "index.md").read_text()


def test_cli_writes_the_report_and_says_where(fixture_storage, tmp_path, capsys):
    assert cli([str(fixture_storage / "results"), "--out", str(tmp_path / "out"), "--compare-paper", "--no-grids"]) == 0
    printed = capsys.readouterr().out
    assert "53 trials: 53 succeeded, 0 failed. Wrote 7 tables, 5 comparisons, 3 figures, 0 sample grids." in printed
    assert "Figures not drawn:\n  convergence_fid: no trial has the data it plots" in printed and "index.html" in printed
    html = (tmp_path / "out" / "index.html").read_text()
    for needle in ("Provenance", "feature extractor", "inception-v3-compat (53)", "tables/table1_fid.tex", "compare_table3_dp_epsilon",
                   "convergence_fid: no trial has the data it plots"):
        assert needle in html, needle
    assert len(read_csv(tmp_path / "out" / "trials.csv")) == 53


def test_analysis_imports_neither_torch_nor_ray():
    code = ("import sys, analysis.__main__, analysis.run, analysis.paper; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'torchvision')); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_results_on_a_storage_uri_are_read_like_a_folder(fixture_storage):
    """Sweeps may store results on s3://, gs://, ... (pyarrow); file:// exercises the same code path offline."""
    results = load_results(f"file://{fixture_storage}")
    assert len(results.trials) == 53 and not results.invalid


def twin(storage: Path, label_part: str, *, metrics: dict | None = None, **sections) -> dict:
    """Write a copy of a fixture trial with config sections changed (a new trial id) and return it."""
    record = json.loads(result_path(storage, label_part).read_text())
    config = replace(TrialConfig.from_dict(record["config"]), **sections)
    copy = {**record, "trial_id": config.trial_id, "config": config.to_dict(), "metrics": {**record["metrics"], **(metrics or {})}}
    (storage / "results" / f"{config.trial_id}.json").write_text(json.dumps(copy))
    return copy


def test_different_settings_in_one_cell_are_refused_not_averaged(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    other = twin(storage, "lora-d16-cub200", metrics={"fid": 30.0}, method={"lora_rank": 64})
    with pytest.raises(AnalysisError, match=r"(?s)1 table cell.*VAR-d16 cub200 lora no DP k=1: 2 settings differing in method.lora_rank = 16, 64"):
        load_results(storage)
    assert cli([str(storage), "--out", str(tmp_path / "refused")]) == 2
    rank64 = analyse(storage, tmp_path / "out", where={"method.lora_rank": 64}, grids=False)
    assert list(rank64.results.trials["trial_id"]) == [other["trial_id"]] and len(rank64.results.excluded) == 53
    assert "lora_rank is not 64" in (tmp_path / "out" / "index.md").read_text()
    assert cli([str(storage), "--out", str(tmp_path / "cli"), "--where", "method.lora_rank=16", "--no-grids"]) == 0
    assert read_csv(tmp_path / "cli" / "tables" / "table1_fid.csv")[1]["cub200"] == "7.84"
    with pytest.raises(AnalysisError, match="no such config field"):
        load_results(storage, where={"method.rank": 16})


def test_a_convergence_twin_counts_once(fixture_storage, tmp_path):
    """The convergence sweep re-runs Table 1 trials with evaluations during training: same setting and seed,
    so the cell holds one value (the twin with the curve), not a fake n=2."""
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    curve = twin(storage, "full-d16-flowers102", evaluation={"convergence_every_steps": 500, "convergence_num_images": 1000})
    rewrite(storage / "results" / f"{curve['trial_id']}.json", lambda r: r.update(convergence=[{"step": 500, "fid": 30.0}]))
    analysis = analyse(storage, tmp_path / "out", grids=False)
    table1 = next(t for t in analysis.tables if t.name == "table1_fid")
    cell_ = next(r for r in table1.rows if r[:2] == ["VAR-d16", "FFT"])[4]
    assert cell_.n == 1 and cell_.text() == "12.08"
    assert [kept for _, _, kept in analysis.results.repeats] == [curve["trial_id"]]
    assert "Repeats counted once" in (tmp_path / "out" / "index.md").read_text()
    assert "convergence_fid" in {f.name for f in analysis.figures}


def test_successful_trials_without_a_value_are_shown(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    for seed in (1, 2):
        twin(storage, "lora-d16-flowers102", metrics={"fid": float("nan")}, optimization={"seed": seed})
    rewrite(result_path(storage, "lora-d16-cub200"), lambda r: r["metrics"].pop("fid"))
    analysis = analyse(storage, tmp_path / "out", grids=False)
    lora = next(r for r in next(t for t in analysis.tables if t.name == "table1_fid").rows if r[:2] == ["VAR-d16", "LoRA"])
    assert lora[4].text() == "13.18 (2 without value)" and lora[3].text() == "no value"
    assert read_csv(tmp_path / "out" / "tables" / "table1_fid.csv")[1]["cub200"] == ""


def test_dp_tables_are_per_dataset_and_only_flowers_is_compared(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    cub = twin(storage, "lora-d16-flowers102-eps10-k1", metrics={"fid": 200.0}, data={"dataset": "cub200", "root": "/assets/datasets/cub200"})
    analysis = analyse(storage, tmp_path / "out", compare_paper=True, grids=False)
    names = {t.name for t in analysis.tables}
    assert {"table2_dp_multiplicity_flowers102", "table2_dp_multiplicity_cub200"} <= names
    cub_table = next(t for t in analysis.tables if t.name == "table2_dp_multiplicity_cub200")
    assert cub_table.title.endswith("[cub200]") and [r[:4] for r in cub_table.rows] == [["VAR-d16", "LoRA", "10", "1"]]
    assert cub_table.rows[0][4].text() == "200.00" and cub["trial_id"] in analysis.results.records
    compared = {t.name for t in analysis.comparisons}
    assert "compare_table2_dp_multiplicity_flowers102" in compared and not any("cub200" in name for name in compared)


def test_sweeps_of_one_kind_say_which_tables_they_lack(fixture_storage, tmp_path):
    dp_only = copy_storage(fixture_storage, tmp_path / "dp")
    for path in (dp_only / "results").glob("*.json"):
        if json.loads(path.read_text())["config"]["privacy"] is None:
            path.unlink()
    analysis = analyse(dp_only, tmp_path / "dp-out", grids=False)
    assert sorted(t.name for t in analysis.tables) == ["compute", "privacy", "table10_dp_ablation", "table2_dp_multiplicity", "table3_dp_epsilon"]
    assert analysis.skipped_tables == ["table1_fid: no non-DP trial", "table9_precision_recall: no adapted non-DP trial"]
    other_eps = analyse(dp_only, tmp_path / "eps3", table2_epsilon=3, grids=False)
    assert any("table2_dp_multiplicity: no DP LoRA or LNTuning trial at ε=3 (DP trials ran at ε in {1, 10, 20, 50, 100, 500, 1000}" in line
               for line in other_eps.skipped_tables)
    assert "Tables not produced" in (tmp_path / "eps3" / "index.md").read_text()

    failed_only = copy_storage(fixture_storage, tmp_path / "failed")
    for path in (failed_only / "results").glob("*.json"):
        rewrite(path, lambda r: r.update(status="failed", error="worker died", metrics={}))
    analysis = analyse(failed_only, tmp_path / "failed-out", grids=False)
    assert len(analysis.results.failed) == 53 and not analysis.figures
    assert {c.text() for t in analysis.tables if t.name == "table1_fid" for r in t.rows for c in r[2:7]} == {"failed"}


def test_error_text_is_inert_in_the_report_and_latex_is_escaped(fixture_storage, tmp_path):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    rewrite(result_path(storage, "full-d16-food101"), lambda r: r.update(status="failed", metrics={}, error="<img src=x onerror=alert(1)> | `x`"))
    analyse(storage, tmp_path / "out", grids=False)
    md, page = (tmp_path / "out" / "index.md").read_text(), (tmp_path / "out" / "index.html").read_text()
    assert "<img src=x" not in md and "&lt;img src=x onerror=alert(1)&gt; \\| 'x'" in md
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    tex = (tmp_path / "out" / "tables" / "table1_fid.tex").read_text()
    assert "trainable\\_params" in tex and "—" not in tex and "failed" in tex


def test_many_dp_curves_and_a_broken_figure_do_not_cost_the_report(fixture_storage, tmp_path, monkeypatch):
    storage = copy_storage(fixture_storage, tmp_path / "storage")
    for path in (storage / "results").glob("*.json"):
        rewrite(path, lambda r: r.update(convergence=[{"step": 100, "fid": 50.0}, {"step": 200, "fid": 40.0}]))
    analysis = analyse(storage, tmp_path / "out", grids=False)
    assert "convergence_fid" in {f.name for f in analysis.figures}  # 30+ DP curves in one panel: markers cycle
    import analysis.figures as figures

    monkeypatch.setattr(figures, "parameters_figure", lambda trials, folder: 1 / 0)
    broken = analyse(storage, tmp_path / "broken", grids=False)
    assert "parameters_vs_fid: drawing failed (ZeroDivisionError: division by zero)" in broken.skipped_figures
    assert (tmp_path / "broken" / "index.html").is_file() and len(broken.figures) == 3


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
