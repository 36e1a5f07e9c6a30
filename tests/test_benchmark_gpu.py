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
    assert {r["k"] for r in privacy} >= {1, 2}
    assert all(_number(r["step_ms"]) and _number(r["time_vs_non_dp"]) for r in privacy)
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
    """MFU = useful FLOPs (attention over the visible pairs) / the rate measured in the same run."""
    from bench.estimates import VarShape, training_flops_per_row

    data = smoke["data"]
    rate = data["rates"]["achievable_tflops"] * 1e12
    for r in data["training"]:
        useful = training_flops_per_row(VarShape.official(2), r["method"], dense_attention=False) * r["batch"]
        assert r["useful_tflop_per_step"] * 1e12 == pytest.approx(useful, rel=1e-9)
        assert r["mfu_measured"] == pytest.approx(useful / (r["step_ms"] / 1e3) / rate, rel=1e-9)


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


def test_the_privacy_phase_measures_every_target_before_the_options():
    """The targets first (no DP and book-keeping for every configuration, DP-full at k = 1 at VAR-d20 right after
    VAR-d16: routes change with the width), then the options: Gram routes and ghost clipping only at one view per
    example, ghost in float32 beside a float32 non-DP step, hooks. A phase cut short keeps the targets' rows."""
    import argparse

    import benchmark_gpu
    import torch

    def schedule(**args) -> list:
        namespace = argparse.Namespace(**{"quick": False, "budget_s": None, "depth": None, **args})
        return benchmark_gpu.privacy_schedule(benchmark_gpu.make_plan(namespace, torch.device("cuda")))

    bf16 = "bf16"
    targets = [
        (depth, method, k, clipping, bf16)
        for depth, method, k in (
            (16, "full", 1),
            (20, "full", 1),
            (16, "lora", 1),
            (16, "full", 32),
            (16, "lora", 32),
        )
        for clipping in (None, "bookkeeping")
    ]
    options = [
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
    ]
    assert schedule() == targets + options
    assert schedule(quick=True) == [
        (16, "full", 1, None, bf16),
        (16, "full", 1, "bookkeeping", bf16),
        (16, "full", 1, "bookkeeping:gram", bf16),
    ]
