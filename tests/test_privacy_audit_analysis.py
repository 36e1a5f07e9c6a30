"""The privacy_audit sweep (paper and smoke versions, every trial audited, its dry run) and its analysis: the
``privacy_audit`` table's rows and values, the figure (claimed vs empirical epsilon with the y = x line, "no DP"
apart, a broken mechanism drawn distinctly), the membership ROC figure, the report's links and sentences, and results
without an audit."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PathCollection

from analysis import figures
from analysis.figures import ABOVE_CLAIM_LABEL, AUDIT_CAPTION, audit_figure, audit_roc_figure
from analysis.load import SETTING_NEUTRAL, AnalysisError, load_results, setting_of
from analysis.paper import paper_fixture
from analysis.run import analyse
from bench.__main__ import main as bench_main
from bench.results import ResultStore
from bench.roc import roc_vertices
from bench.schema import BROKEN_MECHANISM, DATASETS, MethodConfig, TrialConfig, make_result, replace
from bench.sweeps import SWEEPS, build_sweep, privacy_audit

DELTA = privacy_audit.AUDIT_DELTA


# --- the sweep --------------------------------------------------------------------------------------------------
def test_the_sweep_is_registered_and_every_trial_is_audited():
    assert SWEEPS["privacy_audit"] is privacy_audit.sweep
    for smoke, canaries in ((False, 1000), (True, 200)):
        configs = build_sweep("privacy_audit", smoke=smoke)
        ids = [c.trial_id for c in configs]
        assert len(set(ids)) == len(ids), "trial ids repeat"
        assert all(c.audit is not None and c.audit.canaries == canaries for c in configs)
        assert all(c.audit.confidence == 0.95 and c.audit.canary_kind == "glyphs" for c in configs)
        assert all(TrialConfig.from_dict(c.to_dict()) == c for c in configs)  # valid and round-trips
        # One small delta for all: a DP trial's own (the audit uses it), the audit's where there is no DP.
        assert all(
            (c.privacy.delta, c.audit.delta) == (1e-6, None) if c.privacy else c.audit.delta == 1e-6
            for c in configs
        )


@pytest.mark.parametrize("smoke", [False, True])
def test_the_sweeps_delta_leaves_room_for_a_positive_bound(smoke):
    """Perfect membership guesses on the sweep's canaries give a clearly positive bound at its delta; at the
    paper's 1/N (N real images plus the included canaries) the same guesses prove nothing."""
    from trainables.audit_bound import epsilon_lower_bound

    config = build_sweep("privacy_audit", smoke=smoke)[0]
    m = config.audit.canaries
    mask = np.arange(m) % 2 == 0
    scores = mask.astype(float)  # members score 1, non-members 0: every confident guess is right
    at_sweep = epsilon_lower_bound(scores, mask, delta=privacy_audit.AUDIT_DELTA)["epsilon_lower_bound"]
    one_over_n = 1 / (DATASETS[config.data.dataset].train_images + m // 2)
    at_one_over_n = epsilon_lower_bound(scores, mask, delta=one_over_n)["epsilon_lower_bound"]
    assert at_sweep > 2.0 and at_one_over_n == 0.0


def test_the_paper_sweep_covers_epsilon_k_and_every_method_on_flowers():
    configs = build_sweep("privacy_audit")
    assert {(c.model.base, c.model.depth, c.data.dataset) for c in configs} == {
        ("official", 16, "flowers102")
    }
    points = {
        (c.method.name, None if c.privacy is None else c.privacy.target_epsilon,
         1 if c.privacy is None else c.privacy.augmentation_multiplicity)
        for c in configs
    }  # fmt: skip
    lora = {(e, k) for m, e, k in points if m == "lora" and e is not None}
    assert lora == {(e, k) for e in (1, 10, 100) for k in (1, 32)}
    assert {(m, e) for m, e, _ in points if m != "lora" and e is not None} == {
        ("full", 10),
        ("ln_tuning", 10),
    }
    assert {m for m, e, _ in points if e is None} == {"full", "lora", "ln_tuning"}
    assert len(configs) == 11


def test_the_smoke_sweep_is_small_and_on_the_tiny_base():
    configs = build_sweep("privacy_audit", smoke=True)
    assert len(configs) == 7
    assert all(c.model.base == "tiny" and c.data.dataset == "digits" and c.data.root is None for c in configs)
    assert all(c.resources.gpus_per_worker == 0 for c in configs)
    points = {
        (c.method.name, c.privacy.target_epsilon if c.privacy else None,
         c.privacy.augmentation_multiplicity if c.privacy else 1): c
        for c in configs
    }  # fmt: skip
    assert set(points) == {("lora", None, 1), ("full", None, 1), ("full", 8, 1)} | {
        ("lora", e, k) for e in (1, 8) for k in (1, 4)
    }
    lora = [c for (method, _, _), c in points.items() if method == "lora"]
    assert all(c.optimization.steps == privacy_audit.SMOKE_STEPS <= 100 for c in lora)
    # The memorising pair: the same training with and without DP (a DP trial's batches are Poisson).
    plain, dp = points["full", None, 1], points["full", 8, 1]
    assert plain.optimization.steps == dp.optimization.steps == privacy_audit.MEMORISING_STEPS
    assert plain.optimization.learning_rate == dp.optimization.learning_rate == 1e-2
    assert plain.optimization.class_dropout == dp.optimization.class_dropout == 0.0
    assert plain.optimization.batch_size == 64 and dp.privacy.sampling_rate == 0.05


def test_the_smoke_sweeps_dry_run_lists_every_trial_and_writes_nothing(tmp_path, capsys):
    storage = tmp_path / "runs"
    assert bench_main(["sweep", "privacy_audit", "--smoke", "--dry-run", "--storage", str(storage)]) == 0
    out = capsys.readouterr().out
    assert "7 of 7 trials to run" in out and "lora-d2-digits-eps8-k4-audit200-s0" in out
    assert not storage.exists()


# --- results with audits ----------------------------------------------------------------------------------------
def audit_section(config: TrialConfig, *, claimed: float | None, bound: float, tpr: float, auc: float,
                  mechanism: str) -> dict:  # fmt: skip
    """An ``AuditRecord`` for ``config``'s canaries: a seeded inclusion mask, member scores shifted up by the
    AUC's separation, and the given summary numbers."""
    m = config.audit.canaries
    rng = np.random.default_rng(m + int(1000 * auc))
    mask = rng.random(m) < 0.5
    scores = rng.normal(size=m) + 2.0 * (auc - 0.5) * mask
    return {
        "canaries": m,
        "included": int(mask.sum()),
        "canary_kind": config.audit.canary_kind,
        "score": "nll_drop",
        "confidence": config.audit.confidence,
        "delta": DELTA,
        "claimed_epsilon": claimed,
        "epsilon_lower_bound": bound,
        "guesses": 40,
        "correct_guesses": 30,
        "tpr_at_1pct_fpr": tpr,
        "tpr_at_0_1pct_fpr": tpr / 2,
        "auc": auc,
        "mechanism": mechanism,
        "scores": [float(s) for s in scores],
        "included_mask": [bool(b) for b in mask],
    }


def ledger(config: TrialConfig, claimed: float) -> dict:
    p = config.privacy
    return {
        "target_epsilon": p.target_epsilon,
        "epsilon_rdp": claimed,
        "delta": DELTA,
        "noise_multiplier": 1.2,
        "steps": config.optimization.steps or 300,  # a paper trial plans its steps from epochs
        "sampling_rate": p.sampling_rate,
        "max_grad_norm": p.max_grad_norm,
        "augmentation_multiplicity": p.augmentation_multiplicity,
    }


def audited_record(config: TrialConfig, *, bound: float, tpr: float, auc: float, status: str = "success",
                   mechanism: str | None = None) -> dict:  # fmt: skip
    """A result of an audited smoke trial: claimed epsilon 0.98 of the target (none without DP)."""
    claimed = None if config.privacy is None else 0.98 * config.privacy.target_epsilon
    mechanism = mechanism or ("none" if config.privacy is None else "dp-sgd")
    failed = status != "success"
    return make_result(
        config,
        status=status,
        error="broken mechanism: a test of the audit, not a result" if failed else None,
        metrics={} if failed else {"fid": 50.0},
        privacy=None if config.privacy is None else ledger(config, claimed),
        cost={"train_pflops": 0.001, "gpu_hours": 0.0},
        evaluation_settings={"extractor": config.evaluation.extractor},
        audit=audit_section(config, claimed=claimed, bound=bound, tpr=tpr, auc=auc, mechanism=mechanism),
    )


def smoke_configs() -> dict[tuple, TrialConfig]:
    """(epsilon or None, k) -> the smoke sweep's LoRA trial."""
    return {
        (c.privacy.target_epsilon if c.privacy else None, c.privacy.augmentation_multiplicity if c.privacy else 1): c
        for c in build_sweep("privacy_audit", smoke=True)
        if c.method.name == "lora"
    }  # fmt: skip


def seed(config: TrialConfig, value: int) -> TrialConfig:
    return dataclasses.replace(config, optimization=dataclasses.replace(config.optimization, seed=value))


# (epsilon, k) -> (bound, TPR at 1% FPR, AUC) of the successful audited trials (seed 0).
AUDITS = {
    (None, 1): (2.5, 0.30, 0.90),
    (1, 1): (0.0, 0.01, 0.51),
    (1, 4): (0.1, 0.02, 0.52),
    (8, 1): (0.4, 0.05, 0.60),
    (8, 4): (0.6, 0.06, 0.62),
}


def write_audit_storage(folder: Path) -> Path:
    """The five smoke audits, a second seed at (1, 1), a failed broken-mechanism run at (8, 4) seed 1 whose bound
    (9.5) exceeds its claim (7.84), and a full fine-tuning trial without an audit (ignored by the audit outputs)."""
    configs, store = smoke_configs(), ResultStore(folder)
    for key, (bound, tpr, auc) in AUDITS.items():
        store.write(audited_record(configs[key], bound=bound, tpr=tpr, auc=auc))
    store.write(audited_record(seed(configs[1, 1], 1), bound=0.2, tpr=0.03, auc=0.55))
    store.write(
        audited_record(
            seed(configs[8, 4], 1), bound=9.5, tpr=0.9, auc=0.99, status="failed", mechanism=BROKEN_MECHANISM
        )
    )
    plain = dataclasses.replace(configs[None, 1], method=MethodConfig(name="full"), audit=None)
    store.write(
        make_result(
            plain,
            status="success",
            metrics={"fid": 40.0},
            cost={"train_pflops": 0.001, "gpu_hours": 0.0},
            evaluation_settings={"extractor": plain.evaluation.extractor},
        )
    )
    return folder


@pytest.fixture(scope="module")
def audit_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit")
    return analyse(write_audit_storage(folder / "storage"), folder / "out", grids=False)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_table_has_a_row_per_audited_setting_with_its_numbers(audit_run):
    rows = read_csv(audit_run.out / "tables" / "privacy_audit.csv")
    assert list(rows[0]) == [
        "model", "dataset", "method", "epsilon", "k", "canaries", "confidence", "mechanism",
        "claimed_epsilon_spent", "delta", "epsilon_lower_bound_max", "runs_above_claim",
        "tpr_at_1pct_fpr_pct", "auc",
    ]  # fmt: skip
    keyed = {(r["epsilon"], r["k"], r["mechanism"]): r for r in rows}
    assert list(keyed) == [
        ("no DP", "1", "none"),
        ("1", "1", "dp-sgd"),
        ("1", "4", "dp-sgd"),
        ("8", "1", "dp-sgd"),
        ("8", "4", "dp-sgd"),
        ("8", "4", BROKEN_MECHANISM),
    ]  # no row for the trial without an audit (full fine-tuning)
    assert all(r["model"] == "tiny-d2" and r["dataset"] == "digits" and r["method"] == "LoRA" for r in rows)
    assert all(r["canaries"] == "200" and r["confidence"] == "95%" for r in rows)
    plain, eps8 = keyed["no DP", "1", "none"], keyed["8", "4", "dp-sgd"]
    assert (plain["claimed_epsilon_spent"], plain["epsilon_lower_bound_max"], plain["auc"]) == (
        "",
        "2.50",
        "0.900",
    )
    assert plain["runs_above_claim"] == ""  # no DP claims nothing to be above
    assert plain["tpr_at_1pct_fpr_pct"] == "30.0" and plain["delta"] == f"{DELTA:.3g}"
    assert (eps8["claimed_epsilon_spent"], eps8["epsilon_lower_bound_max"], eps8["tpr_at_1pct_fpr_pct"]) == (
        "7.84",
        "0.60",
        "6.0",
    )
    assert eps8["runs_above_claim"] == "0"
    two_seeds = keyed["1", "1", "dp-sgd"]  # bounds 0.0 and 0.2
    assert (two_seeds["epsilon_lower_bound_max"], two_seeds["runs_above_claim"]) == ("0.20", "0")
    # The broken mechanism's bound (9.5) exceeds its claim, but a test of the audit is never a result.
    broken = keyed["8", "4", BROKEN_MECHANISM]
    assert {broken[c] for c in ("epsilon_lower_bound_max", "runs_above_claim", "claimed_epsilon_spent")} == {
        ""
    }


def test_the_tables_markdown_shows_seeds_failures_and_what_the_bound_means(audit_run):
    text = (audit_run.out / "tables" / "privacy_audit.md").read_text()
    assert "| 0.20 (max of 2) | 0 of 2 |" in text  # the bounds of the two seeds at epsilon 1, k 1
    no_dp = next(line for line in text.splitlines() if "| no DP |" in line)
    assert "| none | — |" in no_dp and "| 2.50 | — |" in no_dp and "no value" not in no_dp  # no claim
    broken_line = next(line for line in text.splitlines() if BROKEN_MECHANISM in line)
    assert broken_line.count("failed") == 6 and "9.50" not in broken_line
    assert "lower bound" in text and "does not estimate it" in text and "not a mean" in text
    assert "WARNING" not in text  # no successful run exceeds its claim


def test_the_figure_puts_the_claim_against_the_bound_with_no_dp_apart(audit_run):
    figure = {f.name: f for f in audit_run.figures}["privacy_audit"]
    assert all(p.is_file() and p.stat().st_size > 5000 for p in figure.paths)
    assert [p.suffix for p in figure.paths] == [".png", ".pdf"]
    assert figure.xlabels == ("claimed ε (DP accounting, spent)",) and figure.ylabels == (
        "empirical ε lower bound",
    )
    (ticks,) = figure.xticklabels
    assert ticks[-1] == "no DP" and {"1", "2", "5"} <= set(ticks)  # plain numbers, not 10^0
    assert set(figure.legend) == {
        "LoRA, k=1",
        "LoRA, k=4",
        "LoRA, no DP",
        "broken mechanism (test only)",
        "y = x (bound = claimed ε)",
    }


def test_the_report_shows_the_table_and_the_figure_with_their_meaning(audit_run):
    for page in ("index.md", "index.html"):
        text = (audit_run.out / page).read_text()
        assert "figures/privacy_audit.png" in text and "figures/privacy_audit.pdf" in text, page
        assert "tables/privacy_audit.csv" in text and "Privacy audit" in text, page
        assert AUDIT_CAPTION.split(":")[0] in text, page
    assert not any(
        line.startswith("privacy_audit") for line in audit_run.skipped_tables + audit_run.skipped_figures
    )


def one_run_above_its_claim(folder: Path) -> Path:
    """Three seeds of DP LoRA at epsilon 1 (claimed 0.98): seed 0's bound, 2.0, exceeds its claim (evidence of
    a bug), seeds 1 and 2 bound 0; their mean, 0.67, would be below the claim."""
    store, config = ResultStore(folder), smoke_configs()[1, 1]
    for value, bound in ((0, 2.0), (1, 0.0), (2, 0.0)):
        store.write(audited_record(seed(config, value), bound=bound, tpr=0.01, auc=0.51))
    return folder


def test_a_run_above_its_claim_is_shown_and_warned_of_not_averaged_away(tmp_path):
    analysis = analyse(one_run_above_its_claim(tmp_path / "storage"), tmp_path / "out", grids=False)
    (row,) = read_csv(tmp_path / "out" / "tables" / "privacy_audit.csv")
    assert (row["claimed_epsilon_spent"], row["epsilon_lower_bound_max"], row["runs_above_claim"]) == (
        "0.98",
        "2.00",
        "1",
    )
    text = (tmp_path / "out" / "tables" / "privacy_audit.md").read_text()
    assert "| 2.00 (max of 3) | 1 of 3 |" in text and "0.67" not in text
    warning = "WARNING: 1 audited run with a bound above its claimed epsilon"
    (table,) = [t for t in analysis.tables if t.name == "privacy_audit"]
    assert warning in table.title and table.notes[0].startswith(warning)
    above = seed(smoke_configs()[1, 1], 0)
    assert f"{above.label} ({above.trial_id[:12]}): bound 2.00 > claimed 0.98" in table.notes[0]
    assert "5%" in table.notes[0] and "audit.seed" in table.notes[0]
    for page in ("index.md", "index.html"):  # the report's table heading and first note carry it
        assert (tmp_path / "out" / page).read_text().count(warning) >= 2, page
    # ... and the notices at the top of the report name the run in full
    md = (tmp_path / "out" / "index.md").read_text()
    notice = md.index("## WARNING: audited runs whose epsilon lower bound exceeds their claimed epsilon")
    assert notice < md.index("## Failed trials")
    assert f"- {above.label} ({above.trial_id}): bound 2.000 &gt; claimed 0.980" in md[notice:], md[notice:][
        :600
    ]
    figure = {f.name: f for f in analysis.figures}["privacy_audit"]
    assert "WARNING: 1 run above its claimed ε" in figure.title and ABOVE_CLAIM_LABEL in figure.legend


def drawn_points(ax) -> list[tuple[float, float]]:
    """Every marker an axis draws, (x, y) rounded and sorted: scatter offsets, lines' points with markers."""
    points = [xy for c in ax.collections if isinstance(c, PathCollection) for xy in c.get_offsets()]
    points += [
        xy for line in ax.lines if line.get_marker() not in (None, "None", "") for xy in line.get_xydata()
    ]
    return sorted((round(float(x), 3), round(float(y), 3)) for x, y in points)


def test_the_figure_draws_each_run_and_rings_the_one_above_its_claim(tmp_path, monkeypatch):
    drawn = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, *args: drawn.append(fig) or save(fig, *args))
    results = load_results(one_run_above_its_claim(tmp_path / "storage"))
    assert audit_figure(results.trials, tmp_path / "figures") is not None
    (ax,) = [ax for ax in drawn[0].axes if ax.get_visible()]
    # seeds 1 and 2 coincide, the ring marks seed 0 again; no mean at 0.67
    assert drawn_points(ax) == [(0.98, 0.0), (0.98, 0.0), (0.98, 2.0), (0.98, 2.0)]
    (ring,) = [c for c in ax.collections if c.get_label() == ABOVE_CLAIM_LABEL]
    assert ring.get_offsets().tolist() == [[pytest.approx(0.98), 2.0]]
    assert [t.get_text() for t in ax.texts] == ["1 run above y = x"]
    assert AUDIT_CAPTION.startswith("Each point is one audited training run")
    assert "never a mean" in AUDIT_CAPTION


def test_the_figure_draws_every_run_of_a_setting_apart(audit_run, tmp_path, monkeypatch):
    """The shared storage's two seeds at epsilon 1, k 1 (bounds 0.0 and 0.2) are two points, not their mean
    (0.1, which k 4's one run has too); no ring and no warning where no run exceeds its claim."""
    drawn = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, *args: drawn.append(fig) or save(fig, *args))
    info = audit_figure(audit_run.results.trials, tmp_path / "figures")
    (ax,) = [ax for ax in drawn[0].axes if ax.get_visible()]
    points = drawn_points(ax)
    assert [y for x, y in points if x == 0.98] == [0.0, 0.1, 0.2]  # k 1: 0.0 and 0.2; k 4: 0.1
    assert [y for x, y in points if x == 7.84] == [0.4, 0.6, 9.5]  # k 1, k 4 and the broken mechanism's cross
    assert [y for x, y in points if x > 7.84] == [2.5]  # no DP
    assert not ax.texts and ABOVE_CLAIM_LABEL not in info.legend and "WARNING" not in info.title


def test_results_without_an_audit_say_so_instead_of_drawing(tmp_path):
    store = ResultStore(tmp_path / "storage")
    config = dataclasses.replace(smoke_configs()[8, 1], audit=None)
    store.write(
        make_result(
            config,
            status="success",
            metrics={"fid": 60.0},
            privacy=ledger(config, 7.9),
            evaluation_settings={"extractor": config.evaluation.extractor},
        )
    )
    analysis = analyse(tmp_path / "storage", tmp_path / "out", grids=False)
    assert "privacy_audit: no trial has a privacy audit (config audit)" in analysis.skipped_tables
    for figure in ("privacy_audit", "privacy_audit_roc"):
        assert f"{figure}: no successful trial has a privacy audit (config audit)" in analysis.skipped_figures
    assert not (tmp_path / "out" / "tables" / "privacy_audit.csv").exists()
    assert not list((tmp_path / "out" / "figures").glob("privacy_audit*"))


def test_only_failed_audits_draw_no_figure(tmp_path):
    config = smoke_configs()[8, 4]
    store = ResultStore(tmp_path / "storage")
    store.write(
        audited_record(config, bound=9.5, tpr=0.9, auc=0.99, status="failed", mechanism=BROKEN_MECHANISM)
    )
    results = load_results(tmp_path / "storage")
    assert audit_figure(results.trials, tmp_path / "figures") is None
    assert len(results.audit_roc) > 2  # the broken run's curve is there, but alone it is no figure
    assert audit_roc_figure(results.trials, results.audit_roc, tmp_path / "figures") is None


def test_an_audited_and_an_unaudited_twin_are_analysed_apart_and_can_be_selected(tmp_path):
    """The same cell with and without canaries: two experiments, not two settings to refuse. The utility tables
    show the trial without an audit (and say they left one out), the audit table the audited one; two audited
    settings in one cell are still refused, naming the audited cell."""
    configs = smoke_configs()
    store = ResultStore(tmp_path / "storage")
    store.write(audited_record(configs[8, 1], bound=0.4, tpr=0.05, auc=0.6))
    twin = dataclasses.replace(configs[8, 1], audit=None)
    store.write(
        make_result(
            twin,
            status="success",
            metrics={"fid": 55.0},
            privacy=ledger(twin, 7.9),
            evaluation_settings={"extractor": twin.evaluation.extractor},
        )
    )
    analysis = analyse(tmp_path / "storage", tmp_path / "out", table2_epsilon=8, grids=False, figures=False)
    tables = {t.name: t for t in analysis.tables}
    (row,) = tables["table2_dp_multiplicity"].rows
    assert row[-1].text() == "55.00" and tables["table2_dp_multiplicity"].notes == [
        "1 audited trial is left out of the utility tables: it trains on canaries besides the dataset; see "
        "privacy_audit"
    ]
    assert len(tables["privacy_audit"].rows) == 1 and len(tables["privacy"].rows) == 2
    plain = load_results(tmp_path / "storage", where={"audit": None})
    assert list(plain.trials["trial_id"]) == [twin.trial_id]
    audited = load_results(tmp_path / "storage", where={"audit.canaries": 200})
    assert list(audited.trials["trial_id"]) == [configs[8, 1].trial_id]
    rank = dataclasses.replace(configs[8, 1], method=dataclasses.replace(configs[8, 1].method, lora_rank=64))
    store.write(audited_record(rank, bound=0.4, tpr=0.05, auc=0.6))
    with pytest.raises(
        AnalysisError, match=r"tiny-d2 digits lora ε=8 k=1 \(audited\): 2 settings .*lora_rank"
    ):
        load_results(tmp_path / "storage")


def test_audited_trials_are_left_out_of_the_utility_tables_and_figures_and_they_say_so(audit_run):
    """Audited trials train on canaries besides the dataset: Table 1 shows only the trial without an audit, a
    table left without trials says how many audited ones it left out, and so do the utility figures; compute,
    privacy and the audit's own table and figures keep them."""
    tables = {t.name: t for t in audit_run.tables}
    assert [row[:2] for row in tables["table1_fid"].rows] == [["tiny-d2", "FFT"]]
    assert tables["table1_fid"].notes[-1] == (
        "1 audited trial is left out of the utility tables: it trains on canaries besides the dataset; see "
        "privacy_audit"
    )
    assert (
        "table3_dp_epsilon: no DP model x method x k was run at two or more epsilons (6 audited trials are left "
        "out of the utility tables: they train on canaries besides the dataset; see privacy_audit)"
    ) in audit_run.skipped_tables
    figures = {f.name for f in audit_run.figures}
    assert (
        "privacy_utility" not in figures
        and (
            "privacy_utility: no trial has the data it plots (7 audited trials are left out of the utility figures: "
            "they train on canaries besides the dataset; see privacy_audit)"
        )
        in audit_run.skipped_figures
    )
    assert len(tables["privacy"].rows) == 6 and len(tables["compute"].rows) == 6
    assert {"compute_pflops", "privacy_audit", "privacy_audit_roc"} <= figures


def test_the_paper_audit_beside_the_paper_sweeps_leaves_their_tables_and_comparison_alone(tmp_path):
    """The paper sweeps and privacy_audit run into one storage folder: the audited trials (1,000 canaries besides
    Flowers, FID 50) share cells with Table 1 and 2 trials. They are analysed apart, not refused, and no paper
    table or comparison holds their FIDs (the fixture's equal the published ones)."""
    storage = tmp_path / "storage"
    paper_fixture(storage)
    store = ResultStore(storage)
    for config in build_sweep("privacy_audit"):
        store.write(audited_record(config, bound=0.1, tpr=0.02, auc=0.52))
    analysis = analyse(storage, tmp_path / "out", compare_paper=True, grids=False, figures=False)
    assert len(analysis.results.trials) == 53 + 11 and len(analysis.comparisons) == 5
    for table in analysis.comparisons:
        both = [row for row in table.rows if "—" not in row[-3:-1]]
        assert both and {row[-1] for row in both} <= {"+0", "-0"}, table.name
    tables = {t.name: t for t in analysis.tables}
    # Table 1: the three trials without DP; Table 2: LoRA at k = 1 and 32 and LNTuning, at epsilon 10
    three = "3 audited trials are left out of the utility tables: they train on canaries besides the dataset"
    assert (
        tables["table1_fid"].notes[-1]
        == tables["table2_dp_multiplicity"].notes[-1]
        == f"{three}; see privacy_audit"
    )
    assert len(read_csv(tmp_path / "out" / "tables" / "privacy_audit.csv")) == 11


def test_another_audit_seed_is_a_replicate_of_the_audited_setting(tmp_path):
    """An audit rerun with another audit.seed (as a bound above the claim asks) draws other canaries: a
    replicate of the setting, one more run in its audit-table row, never a repeat of the first run nor another
    setting."""
    first = smoke_configs()[8, 1]
    second = dataclasses.replace(first, audit=dataclasses.replace(first.audit, seed=1))
    store = ResultStore(tmp_path / "storage")
    store.write(audited_record(first, bound=0.4, tpr=0.05, auc=0.6))
    store.write(audited_record(second, bound=0.6, tpr=0.05, auc=0.6))
    analysis = analyse(tmp_path / "storage", tmp_path / "out", grids=False, figures=False)
    assert len(analysis.results.trials) == 2 and not analysis.results.repeats
    (table,) = [t for t in analysis.tables if t.name == "privacy_audit"]
    (row,) = table.rows
    bound = row[table.header.index("epsilon_lower_bound_max")]
    assert bound.n == 2 and bound.mean == pytest.approx(0.6)
    assert first.trial_id != second.trial_id and setting_of(first) == setting_of(second)
    plain = dataclasses.replace(first, audit=None)  # no audit: the setting key is what it always was
    assert setting_of(plain) == replace(plain, **SETTING_NEUTRAL).trial_id


def test_the_dry_run_estimate_counts_the_expected_canaries():
    """Without a plan (no dataset listing) a trial trains on the published split plus half the canaries: an audited
    trial's planned steps (epochs x examples / batch) and GPU hours grow by (N + m/2) / N over its un-audited twin."""
    from bench.estimates import estimate, expected_examples, trial_estimate

    audited = next(c for c in build_sweep("privacy_audit") if c.privacy is None)
    plain = dataclasses.replace(audited, audit=None)
    train_images = DATASETS[audited.data.dataset].train_images
    assert expected_examples(plain) == train_images
    assert expected_examples(audited) == train_images + audited.audit.canaries // 2
    rates = {"measurements": [], "samplings": []}
    table = estimate([audited, plain], done=set(), plans={}, **rates).splitlines()
    (audited_steps, audited_hours), (plain_steps, plain_hours) = (
        (e.steps, e.training_hours) for e in (trial_estimate(c, **rates) for c in (audited, plain))
    )
    for line, steps, hours in zip(table[1:3], (audited_steps, plain_steps), (audited_hours, plain_hours)):
        assert f" {steps:>7} {hours:>8.2f} " in line  # the table prints them
    ratio = expected_examples(audited) / train_images
    assert audited_steps == pytest.approx(plain_steps * ratio, rel=0.01)
    assert audited_hours == pytest.approx(plain_hours * ratio, rel=0.02)


def test_the_roc_figure_draws_every_audited_trial_against_guessing(audit_run):
    figure = {f.name: f for f in audit_run.figures}["privacy_audit_roc"]
    assert all(p.is_file() and p.stat().st_size > 5000 for p in figure.paths)
    assert figure.xlabels == ("false positive rate (excluded canaries flagged)",)
    assert set(figure.legend) == {
        "LoRA, no DP",
        "DP-LoRA ε=1, k=1",  # seeds 0 and 1 share it
        "DP-LoRA ε=1, k=4",
        "DP-LoRA ε=8, k=1",
        "DP-LoRA ε=8, k=4",
        "broken mechanism (test only)",
        "guessing (TPR = FPR)",
    }
    # One curve per audited trial (six successful, one broken), from the recorded scores and inclusion.
    roc, records = audit_run.results.audit_roc, audit_run.results.records
    audited = {tid for tid, record in records.items() if record.get("audit")}
    assert set(roc["trial_id"]) == audited and len(audited) == 7
    for trial_id in audited:
        audit, curve = records[trial_id]["audit"], roc[roc["trial_id"] == trial_id]
        assert (curve[["fpr", "tpr"]].to_numpy().tolist()) == [
            list(p) for p in zip(*roc_vertices(audit["scores"], audit["included_mask"]))
        ]
    for page in ("index.md", "index.html"):
        text = (audit_run.out / page).read_text()
        assert "figures/privacy_audit_roc.png" in text and "each audited run, on log-log axes" in text, page


def test_roc_vertices_move_once_per_tie_group_whatever_the_order():
    fpr, tpr = roc_vertices([3.0, 2.0, 2.0, 1.0], [True, True, False, False])
    assert (fpr, tpr) == ([0.0, 0.0, 0.5, 1.0], [0.0, 0.5, 1.0, 1.0])  # the tie moves both rates at once
    assert roc_vertices([1.0, 2.0, 2.0, 3.0], [False, False, True, True]) == (fpr, tpr)
    assert roc_vertices([2.0, 2.0], [True, False]) == ([0.0, 1.0], [0.0, 1.0])


def test_the_area_under_the_drawn_curve_is_the_auc_the_trial_records():
    """Independently of the shared ROC code: the trapezoid area under ``roc_vertices`` (ties as straight
    segments) equals the trial's Mann-Whitney AUC, ties counting 1/2."""
    from trainables.audit_bound import membership_roc

    rng = np.random.default_rng(0)
    for m in (20, 201, 1000):
        mask = rng.random(m) < 0.5
        scores = (rng.normal(size=m) + 0.7 * mask).round(1)  # rounding makes ties between members and not
        fpr, tpr = roc_vertices(scores.tolist(), mask.tolist())
        assert np.trapezoid(tpr, fpr) == pytest.approx(membership_roc(scores, mask)["auc"], abs=1e-12)
