"""scripts/benchmark_gpu.py cannot rot before a GPU session: its CPU smoke run (tiny official-layout models) measures
every section and writes numbers; its rows refresh the measured-throughput file the dry-run estimate reads."""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
from conftest import REPO, run_script

sys.path.insert(0, str(REPO / "scripts"))


def _number(value) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("benchmark_gpu") / "run.json"
    stdout = run_script("benchmark_gpu.py", "--device", "cpu", "--depth", "2", "--quick", "--out", str(out))
    return {"data": json.loads(out.read_text()), "stdout": stdout}


def test_every_section_is_measured_with_numbers(smoke):
    data = smoke["data"]
    assert data["errors"] == [], data["errors"]
    assert _number(data["rates"]["achievable_tflops"]) and _number(data["rates"]["bandwidth_tb_per_s"])
    training = data["training"]
    assert {r["kernel"] for r in training} >= {"masked", "per_scale"}
    assert {r["method"] for r in training} == {"full", "lora"}
    assert any(r["fused"] for r in training) and any(r["frozen_bf16"] for r in training)
    assert len({r["batch"] for r in training}) >= 2
    for r in training:
        assert all(
            _number(r[key]) for key in ("step_ms", "images_per_s", "useful_tflop_per_step", "mfu_measured")
        )
    # A trial's own loop at each method's fastest trials' setting, and DP-LoRA's, each beside its bare step.
    loops = data["trial_loops"]
    assert [(r["method"], r["clipping"]) for r in loops] == [
        ("full", None),
        ("lora", None),
        ("lora", "bookkeeping"),
    ]
    assert all(r["kernel"] == "per_scale" for r in loops)
    for r in loops:
        assert all(_number(r[key]) for key in ("loop_images_per_s", "step_images_per_s", "loop_vs_step"))
        assert r["host_waits"] is None  # counted on a GPU only (CUDA's sync debug mode)
    privacy = data["privacy"]
    assert {(r["method"], r["clipping"]) for r in privacy} >= {
        ("lora", None),
        ("lora", "bookkeeping"),
        ("lora", "hooks"),
        ("lora", "ghost"),
        ("full", None),
        ("full", "bookkeeping"),
    }
    assert {r["k"] for r in privacy} >= {1, 2, 4}
    assert all(_number(r["step_ms"]) and _number(r["time_vs_non_dp"]) for r in privacy)
    # k = 4 at 2 rows per forward: one example, its views in two forwards, DP and not, on the same 4 rows
    split = [r for r in privacy if r["k"] == 4]
    assert {r["clipping"] for r in split} == {None, "bookkeeping"}
    assert all(r["rows"] == 4 and r["rows_per_forward"] == 2 and r["examples"] == 1 for r in split)
    assert all(_number(r["images_per_s"]) for r in data["generation"])
    (lora,) = data["generation_lora"]  # a LoRA trial's model at the fastest eager batch
    assert lora["method"] == "lora" and _number(lora["images_per_s"]) and _number(lora["vs_base"])
    (layouts,) = data["decode_layouts"]  # the fastest eager batch's decode in NCHW and channels-last
    assert _number(layouts["nchw_ms"]) and _number(layouts["channels_last_ms"]) and _number(layouts["ratio"])
    assert layouts["image_diff"] <= 1e-4  # float32 on a CPU: the two layouts' convolutions a rounding apart
    assert layouts["group_norm_keeps_channels_last"] is True  # the CPU's kernel does
    (evaluation,) = data["evaluation"]  # a trial's setting (on a CPU also the fastest: batch 2, eager)
    assert evaluation["setting"] == "trial" and (evaluation["batch"], evaluation["compiled"]) == (2, False)
    assert evaluation["png_files"]  # drawn through the trials' generate, files and all
    assert evaluation["feature_dim"] == 2048  # the Inception-v3 pool features
    assert all(_number(evaluation[key]) for key in ("generation_s", "features_s", "total_s"))
    assert (
        "| matmul |" in smoke["stdout"]
        and "DP-SGD step" in smoke["stdout"]
        and "Evaluation at a trial's setting:" in smoke["stdout"]
        and "VQVAE decode at batch" in smoke["stdout"]
        and "A trial's loop (`finetune`" in smoke["stdout"]
    )


def test_the_run_records_its_clock_and_measures_in_priority_order(smoke):
    """The JSON ends with nothing in flight and no broken device; every measurement is on the timeline with its
    expected and actual seconds; the targets' sections come first (d16 training at the trials' setting, the DP
    targets, eager generation, the 6,149-image evaluation), the options after the profiles, the trial loops last;
    every phase is done and each measurement line was printed when it started."""
    import benchmark_gpu

    data = smoke["data"]
    assert data["running"] == [] and "device_broken" not in data
    assert data["deadline_s"] == 3600 and 0 < data["elapsed_s"] < data["deadline_s"]
    timeline = data["timeline"]
    assert all(e["expected_s"] > 0 and e["seconds"] >= 0 and e["ok"] for e in timeline)
    assert [e["start_s"] for e in timeline] == sorted(e["start_s"] for e in timeline)
    measured = sum(len(data[k]) for k in ("training", "privacy", "generation", "evaluation", "profiles"))
    assert len(timeline) >= measured

    def at(section: str, *words: str, phase: str | None = None) -> list[int]:
        return [
            i
            for i, e in enumerate(timeline)
            if e["section"] == section and all(w in e["what"] for w in words) and phase in (None, e["phase"])
        ]

    def first(section: str, *words: str, phase: str | None = None) -> int:
        return min(at(section, *words, phase=phase))

    def last(section: str, *words: str, phase: str | None = None) -> int:
        return max(at(section, *words, phase=phase))

    assert last("matmul") < first("training") and last("bandwidth") < first("training")
    # d16's targets: the trials' setting (per_scale, fused AdamW) up the batch ladder, both methods, first
    targets = at("training", phase="training")
    assert targets == list(range(targets[0], targets[0] + len(targets)))
    assert all(
        "per_scale fused=True compiled=False" in timeline[i]["what"]
        and "frozen_bf16=False" in timeline[i]["what"]
        for i in targets
    )
    assert len(targets) == 4 and last("training", phase="training") < first("privacy")
    dp_targets = at("privacy", phase="privacy")
    assert {timeline[i]["what"].split(" ", 3)[3] for i in dp_targets} == {"no DP bf16", "bookkeeping bf16"}
    assert max(dp_targets) < first("generation") < first("evaluation") < first("profiles")
    assert first("profiles") < first("block_ops") < first("norm_accuracy") < first("training", "fused=False")
    assert (
        first("training", "fused=False") < first("training", "masked") < first("training", "frozen_bf16=True")
    )
    assert first("training", "frozen_bf16=True") < first("privacy", "hooks") < first("generation_lora")
    assert first("generation_lora") < first("decode_layouts") < first("trial_loops")
    phases = [e["phase"] for e in timeline]
    order = list(dict.fromkeys(phases))
    assert order == [p for p in benchmark_gpu.PHASES if p in order]
    assert "> training: d2 full per_scale fused=True" in smoke["stdout"]  # printed as it starts
    assert "expected ~" in smoke["stdout"] and "to the deadline" in smoke["stdout"]


def test_block_ops_are_timed_beside_the_published_forms_with_the_same_values(smoke):
    rows = {r["what"]: r for r in smoke["data"]["block_ops"]}
    assert len(rows) == 6
    for r in rows.values():
        assert _number(r["published_ms"]) and _number(r["ours_ms"]) and _number(r["ratio"])
        assert r["dtypes"][0] == r["dtypes"][1]
        assert r["gradient_diff"] < 2**-7  # bf16 gradients: a rounding apart
    # The same operations forward on CUDA, whose autocast takes F.normalize's norm in float32 as ours is taken;
    # CPU autocast takes it in bf16, a rounding of the norm apart.
    assert rows["keys: F.normalize, then the attention's cast"]["output_diff"] <= 2**-7
    lora = [r for name, r in rows.items() if name.startswith("LoRA")]
    # scaling 2: the output, and a bf16 input's gradient, within one bf16 step (sums inside one product, rounded
    # once); a float32 input's gradients bit for bit
    assert len(lora) == 2 and all(r["gradient_diff"] <= 2**-7 and r["output_diff"] <= 2**-7 for r in lora)
    assert [r["gradient_diff"] == 0 for r in lora] == ["float32" in r["what"] for r in lora]
    assert all(r["weight_gradient_diff"] == 0 for r in lora)  # the adapter weights' gradients: bit for bit
    assert all(r["output_diff"] < 2**-7 for r in rows.values())
    assert "A block's element-wise pieces" in smoke["stdout"]


def test_the_decoder_s_pieces_are_timed_beside_their_float32_forms(smoke):
    """Norm + SiLU and upsampling in the map's dtype beside the forms CUDA autocast runs in float32: on a CPU, whose
    autocast keeps both in bf16, the dtypes agree; the upsampled entries are the same bits, the norm's within two
    bf16 roundings (of its affine parameters, which ours casts to bf16, and of its output, SiLU's input)."""
    rows = {r["what"]: r for r in smoke["data"]["decode_ops"]}
    assert len(rows) == 2
    for r in rows.values():
        assert (
            _number(r["published_ms"]) and _number(r["ours_ms"]) and r["dtypes"] == ["bfloat16", "bfloat16"]
        )
    assert rows["decoder nearest upsampling, then the convolution's cast"]["output_diff"] == 0
    assert rows["decoder norm + SiLU, then the convolution's cast"]["output_diff"] <= 2**-6
    assert "The decoder's pieces in the map's dtype" in smoke["stdout"]


def test_dp_routes_norm_accuracy_and_profiles_are_recorded(smoke):
    """Book-keeping as trials run it beside every linear layer through Gram matrices (k = 1 only); the norms'
    accuracy on the device; profiles whose categories add up to the kernel time, beside a readable table."""
    data = smoke["data"]
    routes = {(r["method"], r["k"], r["route"]) for r in data["privacy"] if r["clipping"] == "bookkeeping"}
    assert {("full", 1, "auto"), ("full", 1, "gram"), ("lora", 2, "auto")} <= routes
    assert ("lora", 2, "gram") not in routes
    assert {r["dtype"] for r in data["norm_accuracy"]} == {"bfloat16", "float32"}
    for r in data["norm_accuracy"]:
        assert all(0 <= r[route] < 1e-5 for route in ("gram", "direct", "direct_kept")), r
        assert 0 <= r["noised_sum"] < 1e-6, r  # float32 sums of exact products, against float64
        assert 0 <= r["sum_over_nan"] < 1e-6, r  # NaN there would fail both comparisons
    profiled = {r["what"].split(" ")[0] for r in data["profiles"]}
    assert {"training", "generation", "d2"} <= profiled
    for r in data["profiles"]:
        assert sum(r["categories_ms"].values()) == pytest.approx(r["kernel_ms"], rel=1e-6)
        assert 0 < r["kernel_ms"] and 0 < r["busy"] <= 1.0 + 1e-6 and r["top"]
    training = next(r for r in data["profiles"] if r["what"].startswith("training d2 full"))
    assert training["categories_ms"]["matmul"] > 0.1 * training["kernel_ms"]  # the products are named as such
    assert "Where the time goes" in smoke["stdout"] and "(gram routes)" in smoke["stdout"]


def test_mfu_counts_the_visible_pairs(smoke):
    """MFU = useful FLOPs (attention over the visible pairs, its backward twice its forward: a flash kernel's
    recomputation of the scores, which the counter and the estimate count, is left out) / the rate measured in
    the same run."""
    from bench.estimates import VarShape, training_flops_per_row, visible_attention_fraction

    data, shape = smoke["data"], VarShape.official(2)
    rate = data["rates"]["achievable_tflops"] * 1e12
    recomputed = 0.5 * shape.attention_flops * visible_attention_fraction()
    assert data["training"]
    for r in data["training"]:
        useful = (training_flops_per_row(shape, r["method"]) - recomputed) * r["batch"]
        assert r["useful_tflop_per_step"] * 1e12 == pytest.approx(useful, rel=1e-9)
        assert r["mfu_measured"] == pytest.approx(useful / (r["step_ms"] / 1e3) / rate, rel=1e-9)


def test_a_compiled_row_says_what_compiled_and_one_with_skipped_cuda_graphs_prices_nothing(smoke):
    """Rows said "compiled True" whatever dynamo and inductor did; a generation row whose CUDA graphs inductor
    skipped ran partly eager, and was written to the throughput file as a compiled trial's rate."""
    import benchmark_gpu

    data = copy.deepcopy(smoke["data"])
    eager = data["generation"][0]
    compiled = {**eager, "compiled": True, "dynamo_graphs": 9, "cudagraph_skips": 0}
    skipped = {**compiled, "batch": eager["batch"] + 1, "cudagraph_skips": 2}
    data["generation"] += [compiled, skipped]
    assert [benchmark_gpu._compiled(r) for r in (eager, compiled, skipped)] == [
        "False",
        "True (9 graphs)",
        "True (9 graphs, 2 CUDA graph(s) skipped)",
    ]
    priced = benchmark_gpu.sampling_entries(data, command="c", docs="d")
    rows = [(e["batch_size"], e["compiled"]) for e in priced if e["measured_in"] == "generation"]
    assert (compiled["batch"], True) in rows and (skipped["batch"], True) not in rows
    assert "| True (9 graphs, 2 CUDA graph(s) skipped) |" in benchmark_gpu.report(data, command="c")


def test_each_book_keeping_row_says_which_products_it_ran(smoke):
    """Book-keeping turns its float32-output products off for the process at their first failure: only the
    accuracy rows said which path ran, not the timed ones."""
    rows = smoke["data"]["privacy"]
    assert all(isinstance(r["float32_output_products"], bool) for r in rows if r["clipping"])
    assert all("float32_output_products" not in r for r in rows if not r["clipping"])


def test_a_run_on_a_gpu_of_unknown_peak_does_not_write_the_throughput_file(smoke, tmp_path):
    """The estimate carries rates between settings and GPUs by datasheet peaks: a run on a GPU it has none for
    would leave a file that every dry run and sweep refuses, so nothing is written and the peak is asked for."""
    import benchmark_gpu

    path, run_json = tmp_path / "throughput.json", tmp_path / "run.json"
    data = copy.deepcopy(smoke["data"])
    data["meta"]["device"] = "Tesla V100-SXM2-32GB"
    run_json.write_text(json.dumps(data))
    path.write_text("{}\n")
    with pytest.raises(SystemExit, match=r"no dense bf16 peak is known for Tesla V100-SXM2-32GB.*PEAK_FLOPS"):
        benchmark_gpu.main(["--write-throughput", str(path), "--from", str(run_json)])
    assert path.read_text() == "{}\n"


def test_a_run_refreshes_the_measured_throughput(smoke, tmp_path):
    """--write-throughput --from: the run's training and sampling rates replace older entries of the same setting
    and keep the others; a training entry states a trial loop's rate where one ran at its setting; the tiny base
    is never priced from them."""
    import benchmark_gpu

    from bench.estimates import load_measured_sampling, load_measured_throughput, measured_rate
    from bench.sweeps import build_sweep

    path = tmp_path / "throughput.json"
    run_json = tmp_path / "run.json"
    data = copy.deepcopy(smoke["data"])  # the module's other tests read the run as it was
    data["meta"]["device"] = "NVIDIA H200"  # priced as the estimate's device
    run_json.write_text(json.dumps(data))
    old = {
        "device": "NVIDIA H200",
        "depth": 2,
        "method": "lora",
        "clipping": "bookkeeping",
        "augmentation_multiplicity": 1,
        "precision": "bf16 autocast",
        "rows_per_second": 1e6,
        "attention_kernel": "per_scale",
        "compile": False,
        "source": {"script": "old", "date": "2000-01-01"},
    }
    other = {**old, "depth": 16, "rows_per_second": 5.0}
    old_sampling = {
        "device": "NVIDIA H200",
        "depth": 16,
        "precision": "bf16 autocast",
        "batch_size": 32,
        "compiled": False,
        "images_per_second": 112.4,
        "measured_in": "generation",
        "source": {"script": "old", "date": "2000-01-01"},
    }
    trial_batch = next(r["batch"] for r in data["evaluation"] if r["setting"] == "trial")
    same_sampling = {**old_sampling, "depth": 2, "batch_size": trial_batch, "measured_in": "trial evaluation"}
    path.write_text(json.dumps({"measurements": [old, other], "sampling": [old_sampling, same_sampling]}))
    benchmark_gpu.main(["--write-throughput", str(path), "--from", str(run_json)])
    entries = load_measured_throughput(path)
    assert other in entries and old not in entries  # replaced by the run's DP-LoRA book-keeping row at k = 1
    new = next(
        e for e in entries if e["depth"] == 2 and e["method"] == "lora" and e["clipping"] == "bookkeeping"
    )
    row = next(
        r for r in data["privacy"] if r["method"] == "lora" and r["clipping"] == "bookkeeping" and r["k"] == 1
    )
    loop = next(r for r in data["trial_loops"] if r["clipping"] == "bookkeeping")
    assert (loop["depth"], loop["method"], loop["k"], loop["batch"]) == (2, "lora", 1, row["rows"])
    # where a trial's own loop ran at the setting, the estimate prices trials at what the loop got
    assert new["measured_in"] == "trial loop" and new["rows_per_second"] == round(
        loop["loop_images_per_s"], 1
    )
    assert new["bare_step_rows_per_second"] == round(row["rows_per_s"], 1)
    k2 = next(
        e
        for e in entries
        if e["depth"] == 2 and e["clipping"] == "bookkeeping" and e["augmentation_multiplicity"] == 2
    )
    # no loop ran at k = 2 (the smoke's second k): the bare step's rate
    assert k2["measured_in"] == "bare step"
    full = [e for e in entries if e["clipping"] is None and e["method"] == "full"]
    looped = [e for e in full if e["measured_in"] == "trial loop"]
    assert full and len(looped) == 1  # the loop ran at one kernel and compile setting: the fastest eager one
    full_loop = next(r for r in data["trial_loops"] if r["clipping"] is None and r["method"] == "full")
    assert looped[0]["rows_per_second"] == round(full_loop["loop_images_per_s"], 1)
    assert looped[0]["rows_per_forward"] == full_loop["batch"]
    demo = build_sweep("demo")[0]
    assert measured_rate(demo, entries) is None  # the tiny base is never priced from official measurements
    # Sampling: the evaluation at a trial's setting (its PNG files and Inception features timed with it) and
    # each generation row, beside the file's older sampling entries of other settings.
    samplings = load_measured_sampling(path)
    assert samplings[0] == old_sampling and same_sampling not in samplings
    trial = next(r for r in data["evaluation"] if r["setting"] == "trial" and not r["compiled"])
    evaluation = next(e for e in samplings if e["measured_in"] == "trial evaluation" and not e["compiled"])
    assert (evaluation["depth"], evaluation["batch_size"], evaluation["images"]) == (
        2,
        trial["batch"],
        trial["images"],
    )
    assert evaluation["images_per_second"] == round(trial["images"] / trial["total_s"], 1)
    generation = [e for e in samplings if e["measured_in"] == "generation" and e["depth"] == 2]
    assert [(e["batch_size"], e["images_per_second"]) for e in generation] == [
        (r["batch"], round(r["images_per_s"], 1)) for r in data["generation"]
    ]


def test_from_a_returned_json_rebuilds_the_report_the_run_printed(smoke, tmp_path, capsys):
    """The lent device returns a run's JSON whole but only the tail of its output: --from must publish the
    same tables from the JSON alone, measuring nothing."""
    import benchmark_gpu

    run_json, docs = tmp_path / "run.json", tmp_path / "benchmarks.md"
    run_json.write_text(json.dumps(smoke["data"]))
    docs.write_text("# Benchmarks\n")
    benchmark_gpu.main(["--from", str(run_json), "--report", str(docs)])
    tables = benchmark_gpu.report(smoke["data"], command=smoke["data"]["meta"]["command"])
    assert "| depth | method |" in tables and tables in smoke["stdout"]  # the run printed these tables
    assert capsys.readouterr().out.strip() == tables.strip()
    assert docs.read_text() == "# Benchmarks\n\n" + tables


def test_the_loop_row_counts_where_the_host_waited_for_the_gpu(monkeypatch):
    """On a GPU the trial-loop row runs under CUDA's sync debug mode and records each implicit wait's line (the
    warning CUDA gives, "called a synchronizing CUDA operation"); other warnings are not waits, and the mode is
    restored to what it was. On a CPU nothing is counted."""
    import warnings

    import benchmark_gpu
    import torch

    assert benchmark_gpu.host_waits(lambda: 3, device=torch.device("cpu")) == (3, None)
    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: "as it was")
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def loop() -> str:
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("an unrelated warning", stacklevel=1)
        return "done"

    result, waits = benchmark_gpu.host_waits(loop, device=torch.device("cuda"))
    (at,) = waits
    assert result == "done" and at.startswith("test_benchmark_gpu.py:") and waits[at] == 2
    assert modes == ["warn", "as it was"]
    assert benchmark_gpu._waits(waits) == f"2 ({at} x2)" and benchmark_gpu._waits({}) == "0 (none)"


@pytest.mark.parametrize(("padded", "drawn"), [(False, 12 * 512 + 5), (True, 13 * 512)])
def test_the_in_memory_evaluation_draws_what_a_trial_draws(padded, drawn):
    """Eager, a trial's ``generate`` draws a smaller last batch: the in-memory evaluation drew 6,656 images for
    Flowers' 6,149 at batch 512 (8% more time against the < 30 s target). Compiled, every batch is drawn whole."""
    import benchmark_gpu
    import torch

    asked = []

    def fn(rows: int | None = None) -> torch.Tensor:
        asked.append(512 if rows is None else rows)
        return torch.rand(asked[-1], 3, 2, 2)

    images = benchmark_gpu.in_memory_generation(fn, 6149, batch=512, padded=padded)
    assert sum(asked) == drawn and sum(len(b) for b in images) == 6149
    assert all(b.dtype == torch.uint8 for b in images)


def test_profiles_leave_annotation_ranges_out():
    """The profiler puts annotation ranges (``record_function``; on a GPU also ``Optimizer.step#AdamW.step`` and
    ``Torch-Compiled Region``) on the device's timeline, spanning the kernels inside them: counted as kernels,
    they doubled the optimizer's share and inflated the kernel time and the GPU-busy share."""
    import benchmark_gpu
    import torch

    a = torch.randn(256, 256)

    def fn() -> None:
        with torch.profiler.record_function("annotation_range"):
            a @ a

    row = benchmark_gpu.profile_calls(fn, steps=2, device=torch.device("cpu"))
    names = [entry["name"] for entry in row["top"]]
    assert "aten::mm" in names and "annotation_range" not in names


def _plan(device: str = "cuda", **args):
    import argparse

    import benchmark_gpu
    import torch

    namespace = argparse.Namespace(**{"quick": False, "depth": None, **args})
    return benchmark_gpu.make_plan(namespace, torch.device(device))


def test_the_privacy_phase_measures_every_target_before_the_options():
    """The targets first (no DP and book-keeping for every configuration of VAR-d16, phase 3), DP-full at k = 1
    at VAR-d20 with the other depth (phase 8: routes change with the width), then the options (phase 10): Gram
    routes and ghost clipping only at one view per example, ghost in float32 beside a float32 non-DP step,
    hooks."""
    import benchmark_gpu

    bf16 = "bf16"
    targets = [
        (16, method, k, clipping, bf16)
        for method, k in (("full", 1), ("lora", 1), ("full", 32), ("lora", 32))
        for clipping in (None, "bookkeeping")
    ]
    options = [
        *(
            (16, method, 128, clipping, bf16)
            for method in ("full", "lora")
            for clipping in (None, "bookkeeping")
        ),
        *(
            (16, method, 1, clipping, precision)
            for method in ("full", "lora")
            for clipping, precision in (
                ("bookkeeping:gram", bf16),
                (None, "float32"),
                ("ghost", "float32"),
                ("hooks", bf16),
            )
        ),
        (16, "full", 32, "hooks", bf16),
        (16, "lora", 32, "hooks", bf16),
    ]  # not at k = 128: Opacus's hooks need an example's 128 views in one forward of the 32 rows
    assert benchmark_gpu.privacy_schedule(_plan()) == {
        "targets": targets,
        "more_depths": [(20, "full", 1, None, bf16), (20, "full", 1, "bookkeeping", bf16)],
        "options": options,
    }
    assert benchmark_gpu.privacy_schedule(_plan(quick=True)) == {
        "targets": [(16, "full", 1, None, bf16), (16, "full", 1, "bookkeeping", bf16)],
        "more_depths": [],
        "options": [(16, "full", 1, "bookkeeping:gram", bf16)],
    }


def test_the_phases_run_in_the_issue_s_priority_order():
    """The targets (matmul, d16 eager training, DP at k = 1 and 32, eager generation, the 6,149-image evaluation)
    before anything that compiles; compiled training, then compiled generation at one batch; the other depths;
    then profiles, options, trial loops, the other compiled settings, and FlexAttention (it compiles) last. Each
    of the first phases has a window counted from its own start; the later ones only the deadline."""
    import benchmark_gpu
    import torch

    plan = _plan()
    rec = benchmark_gpu.Recorder(None, {})
    models = benchmark_gpu.Models(torch.device("cpu"), vqvae_channels=32)
    names = [name for name, _ in benchmark_gpu.phases(rec, plan, models)]
    assert names == [
        "matmul",
        "training",
        "privacy",
        "generation",
        "evaluation",
        "training_compiled",
        "generation_compiled",
        "more_depths",
        "profiles",
        "options",
        "trial_loops",
        "compiled_more",
        "flex",
    ]
    assert set(plan.windows) == set(names[:8]) and all(w > 0 for w in plan.windows.values())
    assert (plan.deadline_s, plan.hard_stop_s) == (500, 530) and plan.compile and plan.generation_compiled
    quick = _plan(quick=True)  # a first look: eager only, at most 150 s
    assert (quick.deadline_s, quick.hard_stop_s, quick.compile, quick.generation_compiled) == (
        150,
        180,
        False,
        False,
    )
    cpu = _plan("cpu", deadline_s=7.0, cost=[("flex", 1.0)])
    assert (cpu.deadline_s, cpu.hard_stop_s, cpu.windows, cpu.costs["flex"]) == (7.0, None, {}, 1.0)
    # The expected cost of what cannot be predicted from rows: compiled sampling's ten scale graphs, scaled with
    # depth; none for a batch whose graphs are compiled already.
    assert benchmark_gpu.sampling_compile_cost(plan, 16, 512) == 10 * plan.costs["compile_sampling_scale"]
    assert benchmark_gpu.sampling_compile_cost(plan, 20, 512) == 12.5 * plan.costs["compile_sampling_scale"]


def test_a_call_of_compiled_generation_alone_is_one_flag_per_phase_kept():
    """Compiled generation does not fit a default call after the targets' phases: its own call keeps generation
    (whose eager ladder picks the batch) and generation_compiled, and leaves out every other phase."""
    import benchmark_gpu

    only = benchmark_gpu.parse_args(["--only-phase", "generation", "--only-phase", "generation_compiled"])
    kept = [p for p in benchmark_gpu.PHASES if p not in _plan(only_phase=only.only_phase).skip_phases]
    assert kept == ["generation", "generation_compiled"]
    both = benchmark_gpu.parse_args(["--only-phase", "generation", "--skip-phase", "generation"])
    assert benchmark_gpu.skipped_phases(both) == benchmark_gpu.PHASES
    assert _plan(skip_phase=["flex"]).skip_phases == ("flex",) and _plan().skip_phases == ()


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_measurement_that_does_not_fit_before_the_deadline_is_skipped_and_recorded(tmp_path):
    """The start gate: a measurement starts only if its expected seconds fit before the deadline (counted from the
    given start) and its phase is inside its window; else it is not called and is recorded as skipped, why and
    what it was expected to cost. A phase (no cost) is gated by nothing but the device's health."""
    import benchmark_gpu

    clock = _Clock()
    path = tmp_path / "run.json"
    rec = benchmark_gpu.Recorder(path, {"device": "fake"}, t0=clock.now - 20, deadline_s=100, clock=clock)
    calls = []

    def work(seconds: float, name: str):
        def fn() -> dict:
            calls.append(name)
            clock.now += seconds
            return {"name": name}

        return fn

    rec.begin_phase("training", window=60)
    assert rec.measure("training", "fits", work(30, "fits"), cost=40) == {"name": "fits"}  # 20 + 40 <= 100
    assert rec.measure("training", "too long", work(1, "too long"), cost=51) is None  # 50 + 51 > 100
    assert rec.measure("training", "just fits", work(5, "just fits"), cost=49) is not None
    clock.now += 10  # 65 s in, 45 s into the phase
    rec.begin_phase("privacy", window=5)
    assert rec.measure("privacy", "in the window", work(6, "in the window"), cost=1) is not None
    assert rec.measure("privacy", "past the window", work(1, "past"), cost=1) is None  # 6 s into a 5 s window
    assert rec.measure("phases", "a phase", lambda: None) is None  # no cost: not gated by time
    assert calls == ["fits", "just fits", "in the window"]
    data = json.loads(path.read_text())
    skipped = {s["what"]: s for s in data["skipped"]}
    assert set(skipped) == {"too long", "past the window"}
    assert skipped["too long"]["why"] == "time: expected ~51 s, 50 s left before the deadline at 100 s"
    assert skipped["too long"]["expected_s"] == 51 and skipped["too long"]["phase"] == "training"
    assert skipped["past the window"]["why"].startswith("time: phase privacy's window of 5 s is over")
    assert [(e["what"], e["expected_s"], e["seconds"]) for e in data["timeline"]] == [
        ("fits", 40, 30),
        ("just fits", 49, 5),
        ("in the window", 1, 6),
    ]
    assert data["training"] == [{"name": "fits"}, {"name": "just fits"}] and data["errors"] == []
    assert data["elapsed_s"] == 20 + 30 + 5 + 10 + 6
    report = benchmark_gpu.report(
        {**data, "training": [], "privacy": [], "meta": {"device": "fake", "stamp": "-", "torch": "-"}},
        command="c",
    )
    assert "- skipped: training: too long (time: expected ~51 s" in report


def test_a_tiny_deadline_skips_every_measurement_of_a_run_and_still_writes_and_reports(tmp_path):
    """A whole run (the CPU smoke plan) under a deadline already past: every measurement is skipped for time (none
    starts), every phase still runs its gate, the JSON is complete and the report builds from it."""
    import benchmark_gpu

    path = tmp_path / "run.json"
    args = benchmark_gpu.parse_args(["--device", "cpu", "--depth", "2", "--quick", "--out", str(path)])
    clock = _Clock()
    rec = benchmark_gpu.Recorder(path, {}, t0=clock.now - 1, deadline_s=0.5, clock=clock)
    data = benchmark_gpu.run(args, rec=rec)
    saved = json.loads(path.read_text())
    assert saved["skipped"] == data["skipped"] and saved["timeline"] == [] and saved["errors"] == []
    assert not any(data.get(k) for k in ("matmul", "training", "privacy", "generation", "evaluation"))
    whats = [s["what"] for s in data["skipped"] if s["why"].startswith("time: expected")]
    assert whats[:2] == [
        "256^3",
        "64 MiB copy",
    ] and "d2 full per_scale fused=True compiled=False batch=1 " in " ".join(whats)
    assert saved["meta"]["device"] == "CPU" and saved["meta"]["plan"]["deadline_s"] == 3600
    assert "- skipped: matmul: 256^3 (time: expected" in benchmark_gpu.report(saved, command="c")


def test_the_json_is_replaced_whole_and_names_the_measurement_in_flight(tmp_path, monkeypatch):
    """Every write leaves a parsable JSON (a temporary file renamed over it): written at each measurement's start
    (``running`` names it, so a run killed mid-measurement says what it was doing) and end; a write that dies
    half-way leaves the previous JSON whole, and no temporary file stays behind."""
    import pathlib

    import benchmark_gpu

    path = tmp_path / "run.json"
    rec = benchmark_gpu.Recorder(path, {"device": "fake"}, deadline_s=1e9)
    seen = []
    write = rec.write

    def checked_write() -> None:
        write()
        seen.append(json.loads(path.read_text()))  # parses after every write

    monkeypatch.setattr(rec, "write", checked_write)

    def inside() -> dict:
        running = json.loads(path.read_text())["running"]
        assert [(r["section"], r["what"], r["expected_s"]) for r in running] == [("training", "a", 3.0)]
        return {"row": 1, "text": "x" * 10_000}

    rec.measure("training", "a", inside, cost=3)
    rec.measure("training", "fails", lambda: 1 / 0, cost=1)
    rec.skip("privacy", "b", "why not")
    assert len(seen) >= 5 and json.loads(path.read_text())["running"] == []
    assert [e["what"] for e in seen[-1]["errors"]] == ["fails"]
    before = path.read_text()

    real = pathlib.Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)  # a kill mid-write
        raise KeyboardInterrupt

    monkeypatch.setattr(pathlib.Path, "write_text", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        rec.add("training", {"row": 2})
    monkeypatch.setattr(pathlib.Path, "write_text", real)
    assert path.read_text() == before and json.loads(before)["training"][0]["row"] == 1
    rec.add("training", {"row": 3})
    assert [r["row"] for r in json.loads(path.read_text())["training"]] == [1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_a_broken_device_stops_every_later_measurement(tmp_path):
    """After a measurement's exception the device's health is checked: an error that leaves it broken (an illegal
    address, a failed CUDA-graph capture) is recorded, every later measurement and phase is skipped without
    running, and the JSON and the report still say what was measured. An ordinary failure (out of memory) that
    leaves the device healthy does not stop the run."""
    import benchmark_gpu

    faults = [None]
    path = tmp_path / "run.json"
    rec = benchmark_gpu.Recorder(path, {"device": "fake"}, deadline_s=1e9, health=lambda: faults[0])

    def oom() -> dict:
        raise RuntimeError("CUDA out of memory")

    def illegal() -> dict:
        faults[0] = "AcceleratorError: CUDA error: an illegal memory access was encountered"
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    calls = []
    assert rec.measure("training", "oom", oom, cost=1) is None and rec.broken is None
    assert rec.measure("training", "ok", lambda: calls.append("ok") or {"row": 1}, cost=1) == {"row": 1}
    assert rec.measure("generation", "graph capture", illegal, cost=1) is None
    assert rec.broken and "illegal memory access" in rec.broken
    assert rec.measure("generation", "next", lambda: calls.append("next") or {}, cost=1) is None
    assert rec.measure("phases", "evaluation", lambda: calls.append("phase")) is None
    assert calls == ["ok"]
    data = json.loads(path.read_text())
    assert data["device_broken"] == {
        "section": "generation",
        "what": "graph capture",
        "fault": "AcceleratorError: CUDA error: an illegal memory access was encountered",
    }
    assert [s["what"] for s in data["skipped"]] == ["next", "evaluation"]
    assert all(s["why"].startswith("device broken: after generation: graph capture") for s in data["skipped"])
    assert [e["what"] for e in data["errors"]] == ["oom", "graph capture"] and data["training"] == [
        {"row": 1}
    ]
    data["meta"], data["training"] = {"device": "fake", "stamp": "-", "torch": "-"}, []
    text = benchmark_gpu.report(data, command="c")
    assert "- the device broke in generation: graph capture" in text
    # On a CPU (and for a healthy GPU) the check finds nothing.
    import torch

    assert benchmark_gpu.device_fault(torch.device("cpu")) is None


def test_the_clock_starts_at_the_process_s_start_or_the_device_command_s(monkeypatch):
    """The deadline counts from the process's creation (the imports count), or from $BENCHMARK_GPU_T0 (the device
    command's first line, the wheels' install before the script counting too) where it is plausible."""
    import benchmark_gpu
    import psutil

    created = psutil.Process().create_time()
    monkeypatch.delenv("BENCHMARK_GPU_T0", raising=False)
    assert benchmark_gpu.process_start() == created
    monkeypatch.setenv("BENCHMARK_GPU_T0", str(created - 30))
    assert benchmark_gpu.process_start() == created - 30
    for stale in (str(created - 7200), str(created + 5), "not a number"):
        monkeypatch.setenv("BENCHMARK_GPU_T0", stale)
        assert benchmark_gpu.process_start() == created


def test_a_report_builds_from_an_older_run_s_json(smoke):
    """--from with a JSON written before the deadline (no timeline, running, deadline or phase in its skips)."""
    import benchmark_gpu

    old = copy.deepcopy(smoke["data"])
    for key in ("timeline", "running", "deadline_s", "device_broken"):
        old.pop(key, None)
    old["skipped"] = [{k: s[k] for k in ("section", "what", "why")} for s in old["skipped"]]
    text = benchmark_gpu.report(old, command="c")
    assert "| depth | method |" in text and "deadline" not in text.split("\n")[2]


def test_the_compiled_phases_control_flow_on_fakes(monkeypatch):
    """The GPU-only phases, on a CPU with the heavy work faked (no compile, no model): compiled training at each
    method's best eager batch (profiled while compiled); compiled generation at ONE batch, the fastest eager one,
    then the 6,149-image evaluation on the same model with its graphs compiled (no compile in its expected cost);
    the options' compiled settings; FlexAttention last, its compile priced once. With too little time left,
    compiled generation (ten scale graphs) is skipped before a model is even copied."""
    import benchmark_gpu
    import torch

    class FakeVar:
        def eval(self):
            return self

    built = []

    def adapted(depth, method):
        built.append((depth, method))
        return "vqvae", FakeVar()

    models = benchmark_gpu.Models(torch.device("cpu"), vqvae_channels=32)
    monkeypatch.setattr(models, "adapted", adapted)
    monkeypatch.setattr(models, "built", lambda depth: True)
    monkeypatch.setattr(models, "device", torch.device("cuda"))  # (flex is compiled on CUDA only)
    monkeypatch.setattr(benchmark_gpu, "compile_blocks", lambda var: 16)
    monkeypatch.setattr(benchmark_gpu, "training_step", lambda models, s, var=None, vqvae=None: lambda: None)
    monkeypatch.setattr(benchmark_gpu, "timed", lambda fn, **kwargs: 0.05)
    monkeypatch.setattr(benchmark_gpu, "peak_gib", lambda device: 1.0)
    monkeypatch.setattr(benchmark_gpu, "reset_peak", lambda device: None)
    monkeypatch.setattr(benchmark_gpu, "profile_row", lambda what, fn, plan, device: {"what": what})
    monkeypatch.setattr(benchmark_gpu, "release_caches", lambda var: None)

    def generation_timing(var, vqvae, batch, *, compiled, plan, device):
        return {
            "first_call_s": 1.0,
            "batch_s": 0.1,
            "images_per_s": batch * (20 if compiled else 1.0),
            "peak_gib": 1,
        }

    evaluations = []

    def evaluation_row(models, setting, *, batch, compiled, images, depth, var=None, vqvae=None):
        evaluations.append((setting, batch, compiled, var))
        return {"setting": setting, "batch": batch, "compiled": compiled, "images": images}

    monkeypatch.setattr(benchmark_gpu, "generation_timing", generation_timing)
    monkeypatch.setattr(benchmark_gpu, "evaluation_row", evaluation_row)
    plan = _plan()

    def recorder(left: float):
        clock = _Clock()
        rec = benchmark_gpu.Recorder(None, {}, t0=clock.now - (500 - left), deadline_s=500, clock=clock)
        rec.data["rates"] = {"achievable_tflops": 800.0, "datasheet_tflops": 989.0}
        for method in ("full", "lora"):
            for batch in plan.batches:
                setting = benchmark_gpu.Setting(16, method, "per_scale", True, batch)
                ms = batch * (5.0 if batch != 64 else 4.0)  # batch 64 the fastest
                rec.data.setdefault("training", []).append(
                    {**benchmark_gpu.asdict(setting), "step_ms": ms, "images_per_s": batch / ms * 1e3}
                )
        for batch, rate in ((64, 100.0), (128, 140.0), (256, 150.0), (512, 120.0)):
            rec.data.setdefault("generation", []).append(
                {
                    "depth": 16,
                    "batch": batch,
                    "compiled": False,
                    "images_per_s": rate,
                    "batch_s": batch / rate,
                }
            )
        return rec

    rec = recorder(left=1e6)
    by_name = dict(benchmark_gpu.phases(rec, plan, models))
    by_name["training_compiled"]()
    compiled = [r for r in rec.data["training"] if r["compiled"]]
    assert [(r["method"], r["batch"], r["dynamo_graphs"] >= 0) for r in compiled] == [
        ("full", 64, True),
        ("lora", 64, True),
    ]
    assert [r["what"].split(" ", 3)[2] for r in rec.data["profiles"]] == ["full", "lora"]
    built.clear()
    by_name["generation_compiled"]()
    (row,) = [r for r in rec.data["generation"] if r["compiled"]]
    assert row["batch"] == 256 and built == [(16, "base")]  # the fastest eager batch only, one model
    (evaluation,) = evaluations
    assert evaluation[:3] == ("fastest", 256, True) and isinstance(evaluation[3], FakeVar)
    expected = {e["what"]: e["expected_s"] for e in rec.data["timeline"]}
    compile_cost = 10 * plan.costs["compile_sampling_scale"]
    assert expected["d16 batch 256 compiled=True"] > compile_cost
    assert (
        expected["fastest: 6149 images at batch 256 compiled=True"] < compile_cost
    )  # its graphs are compiled
    by_name["compiled_more"]()
    assert [(r["method"], r["batch"]) for r in rec.data["training"] if r["compiled"]][2:] == [
        ("full", 16),
        ("lora", 16),
    ]
    assert [r["batch"] for r in rec.data["generation"] if r["compiled"]] == [256, 512, 128, 64]
    assert evaluations[-1][:3] == ("trial", 32, True)
    by_name["flex"]()
    flex = [e for e in rec.data["timeline"] if " flex " in e["what"]]
    assert len(flex) == 2 and flex[0]["expected_s"] - flex[1]["expected_s"] >= plan.costs["flex"] - 1
    assert rec.data["errors"] == [] and rec.data["skipped"] == []

    rec = recorder(left=200)  # compiled generation's ten graphs (~250 s) do not fit: no model is copied
    built.clear()
    dict(benchmark_gpu.phases(rec, plan, models))["generation_compiled"]()
    assert built == [] and not any(r["compiled"] for r in rec.data["generation"])
    (skipped,) = rec.data["skipped"]
    assert skipped["what"] == "d16 batch 256 compiled=True" and skipped["why"].startswith("time: expected ~2")
