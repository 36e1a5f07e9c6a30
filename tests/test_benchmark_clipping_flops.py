"""scripts/benchmark_clipping_flops.py reads the FLOPs per row a trial records for the non-DP step and each DP
clipping mode on the same rows: every step must record those rows, the counts must be finite, per row (the same at
another row count), and ordered as the modes' work is (book-keeping's products over the non-DP step's, within a few
percent; Opacus's per-sample gradients more; ghost clipping's second backward more still)."""

from __future__ import annotations

import math
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

from benchmark_clipping_flops import (
    NO_DP,
    measure,
    percent,
    recorded_step,
    summary,
    table,
    tiny_model,
    token_views,
    wide_model,
)


@pytest.fixture(scope="module")
def tiny_results() -> dict:
    results = measure(tiny_model(), rows=4, views=(1, 2))
    return {(r["method"], r["clipping"], r["k"]): r for r in results}


def test_every_mode_counted_on_the_same_rows_finite_and_positive(tiny_results):
    modes = {(NO_DP, 1), ("bookkeeping", 1), ("bookkeeping", 2), ("hooks", 1), ("hooks", 2), ("ghost", 1)}
    assert set(tiny_results) == {(m, mode, k) for m in ("full", "lora") for mode, k in modes}
    for r in tiny_results.values():
        assert r["rows"] == 4 and math.isfinite(r["flops_per_row"]) and r["flops_per_row"] > 0
        assert math.isfinite(r["over_non_dp"])
    for method in ("full", "lora"):
        assert tiny_results[(method, NO_DP, 1)]["over_non_dp"] == 0.0


def test_modes_ordered_by_the_work_they_add(tiny_results):
    for method in ("full", "lora"):
        over = {(mode, k): r["over_non_dp"] for (m, mode, k), r in tiny_results.items() if m == method}
        # book-keeping replaces the weight-gradient products its frozen backward skips: a little over, never under
        assert 0.0 <= over[("bookkeeping", 1)] < 0.05 and 0.0 <= over[("bookkeeping", 2)] < 0.05
        # Opacus's hooks add per-sample gradients to the ordinary backward; ghost clipping a second backward
        assert over[("bookkeeping", 1)] < over[("hooks", 1)] < over[("ghost", 1)]
    # full fine-tuning's per-sample gradients span every weight, LoRA's its small factors
    assert (
        tiny_results[("full", "hooks", 1)]["over_non_dp"] > tiny_results[("lora", "hooks", 1)]["over_non_dp"]
    )
    assert tiny_results[("full", "ghost", 1)]["over_non_dp"] > 0.5


def test_counts_are_per_row(tiny_results):
    for clipping in (None, "bookkeeping"):
        at_two = recorded_step(tiny_model(), "full", clipping, rows=2)["train_flops_per_row"]
        assert at_two == pytest.approx(
            tiny_results[("full", clipping or NO_DP, 1)]["flops_per_row"], rel=1e-9
        )


def test_the_same_rows_whatever_k():
    one, two = (token_views(tiny_model(), rows=4, k=k) for k in (1, 2))
    assert (one.num_examples, two.num_examples) == (4, 2)
    for a, b in zip(one.views, two.views):
        assert a.flatten().tolist() == b.flatten().tolist()
    with pytest.raises(ValueError, match="multiple of k"):
        recorded_step(tiny_model(), "full", "bookkeeping", rows=3, k=2)
    with pytest.raises(ValueError, match="one view"):
        recorded_step(tiny_model(), "full", None, rows=4, k=2)


def test_report_lines(tiny_results):
    results = list(tiny_results.values())
    lines = table(results)
    assert len(lines) == 2 + len(results)
    hooks = tiny_results[("full", "hooks", 1)]
    assert f"| {percent(hooks['over_non_dp'])} |" in "\n".join(lines)
    assert (percent(0.2864), percent(0.00356), percent(0.0000119), percent(0.0)) == (
        "+28.6%",
        "+0.36%",
        "+0.0012%",
        "+0%",
    )
    (line,) = summary(results)
    assert line.startswith("- tiny, k = 1") and line.count("%") == 6
    assert wide_model().tokens == 680
