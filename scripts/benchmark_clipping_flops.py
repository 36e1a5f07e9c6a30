"""Training FLOPs per row that a trial records, DP per clipping mode against the non-DP step on the same rows, per
method, counted side by side in one run.

Usage: python scripts/benchmark_clipping_flops.py [--models tiny,wide] [--tiny-rows 32] [--wide-rows 4] [--views 1,2]
                                                  [--width 1024 --heads 16 --depth 2] [--out docs/benchmarks.md]
Every configuration is one step of ``trainables.finetune.finetune`` itself, the function a trial trains through, on
a fresh copy of the same seeded model: its ``StepMeter`` counts the step with the visible-pair FLOP counter
(``trainables.profiling``), and the figure reported is the ``compute.train_flops_per_row`` the run returns, what a
trial's record multiplies by its rows. Every step of a model does the same R rows (token views): without DP one
batch of R examples of one view each (``batch_size`` R); with DP (``privacy.clipping`` bookkeeping, hooks or ghost,
``--views`` k per example: R / k examples whose k views are those R rows) at sampling rate 1, so the Poisson draw
selects every example, no draw left to chance; the script checks that each step recorded R rows. Ghost clipping
runs at k = 1 only (it cannot average views). A DP step's count includes its per-example clipping products
(book-keeping's norms and clipped sums, Opacus's per-sample gradients, ghost clipping's norms and second backward);
norms, softmax, element-wise ops and the optimiser are counted in no step (``profiling.NOT_COUNTED``). Random
weights and tokens (the counts do not depend on them), float32 on the CPU (a GPU trial's bf16 autocast runs the
same products), the trials' default resources (attention kernel "auto", 256 rows per forward).

Models: ``tiny``, the demo's base (``trainables.tiny_base.var_architecture(2)``: width 64, 2 heads, depth 2, 16 px,
85 tokens, codebook 256) adapted to the digits' 10 classes with the demo's scale weights (examples/digits-tiny.yaml);
``wide``, VAR-d16's layer widths (``--width`` 1024, ``--heads`` 16) and tokens (256 px: patch_nums 1..16, 680 per
view, codebook 4096) at ``--depth`` blocks, 1,000 classes, a narrow VQVAE (only its embedding is used), as
``benchmark_privacy.py --versus`` and ``benchmark_dp_memory.py`` build it. Appends a dated Markdown section to
``--out``.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import benchmark_common
import torch

from bench.schema import MethodConfig, OptimizationConfig, PrivacyConfig, ResourcesConfig
from trainables.data.tokens import TokenViews
from trainables.finetune import RunPlan, finetune
from trainables.methods import adapt
from trainables.models import OFFICIAL_PATCH_NUMS, build_var, build_vqvae
from trainables.tiny_base import VQVAE_ARCHITECTURE, var_architecture

METHODS = ("full", "lora")
CLIPPING_MODES = ("bookkeeping", "hooks", "ghost")
DIGITS_CLASSES = 10  # the demo's target classes (scikit-learn's digits)
NO_DP = "no DP"


@dataclass(frozen=True)
class Model:
    """What one model is built from: keyword arguments of ``build_var`` and ``build_vqvae``, the classes ``adapt``
    gives it, and method settings besides the name."""

    name: str
    var: dict
    vqvae: dict
    classes: int
    method: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(pn * pn for pn in self.var["patch_nums"])

    def describe(self) -> str:
        v = self.var
        return (
            f"width {v['embed_dim']}, {v['num_heads']} heads, depth {v['depth']}, {self.tokens} tokens, "
            f"codebook {v['vocab_size']}, {self.classes} classes"
        )


def tiny_model() -> Model:
    """The demo's base (examples/digits-tiny.yaml: depth 2), adapted to the digits with scale weights 0.5**s."""
    return Model(
        name="tiny",
        var=var_architecture(2),
        vqvae=dict(VQVAE_ARCHITECTURE),
        classes=DIGITS_CLASSES,
        method={"scale_weight_decay": 0.5},
    )


def wide_model(*, width: int = 1024, heads: int = 16, depth: int = 2) -> Model:
    """VAR-d16's layer widths and 680 tokens at ``depth`` blocks (``benchmark_privacy.d16_like``'s geometry)."""
    return Model(
        name="wide",
        var=dict(
            depth=depth,
            embed_dim=width,
            num_heads=heads,
            drop_path_rate=0.0,
            num_classes=1000,
            patch_nums=OFFICIAL_PATCH_NUMS,
            vocab_size=4096,
            z_channels=32,
        ),
        vqvae=dict(
            vocab_size=4096,
            z_channels=32,
            ch=32,
            patch_nums=OFFICIAL_PATCH_NUMS,
            ch_mult=(1, 1),
            num_res_blocks=1,
        ),
        classes=1000,
    )


def token_views(model: Model, *, rows: int, k: int, seed: int = 0) -> TokenViews:
    """The same ``rows`` random token rows (seeded) whatever ``k``: ``rows // k`` examples of k cached views each,
    example b's views being rows b*k .. b*k + k - 1."""
    generator = torch.Generator().manual_seed(seed)
    labels_R = torch.randint(0, model.classes, (rows,), generator=generator)
    tokens = [
        torch.randint(0, model.vqvae["vocab_size"], (rows, pn * pn), generator=generator, dtype=torch.int16)
        for pn in model.var["patch_nums"]
    ]
    return TokenViews(labels_R[::k].clone(), tuple(t.view(rows // k, k, -1) for t in tokens))


def recorded_step(model: Model, method: str, clipping: str | None, *, rows: int, k: int = 1) -> dict:
    """The compute record ``finetune`` returns for one step of ``method`` over ``rows`` rows (every example once):
    without DP when ``clipping`` is None (k must be 1), else DP-SGD with that clipping mode, k views per example
    and sampling rate 1. Raises if the step did not record exactly ``rows`` rows."""
    if clipping is None and k != 1:
        raise ValueError("the non-DP step takes one view per example (k = 1)")
    if rows % k or rows < 2 * k:
        raise ValueError(f"rows must be a multiple of k = {k} and hold >= 2 examples, got {rows}")
    torch.manual_seed(0)
    vqvae = build_vqvae(**model.vqvae).eval()
    var = build_var(**model.var, generator=torch.Generator().manual_seed(0))
    method_config = MethodConfig(name=method, **model.method)
    adapt(var, method_config, num_classes=model.classes, seed=0)
    privacy = (
        None
        if clipping is None
        else PrivacyConfig(
            target_epsilon=8.0,
            sampling_rate=1.0,
            max_grad_norm=0.5,
            augmentation_multiplicity=k,
            clipping=clipping,
        )
    )
    with warnings.catch_warnings():
        # Opacus's PRV reading of the ledger at q = 1 (log(1 - q); no figure here reads the ledger), and torch's
        # note that Opacus's full backward hooks fire on outputs: both as in every hooks or ghost trial.
        warnings.filterwarnings(
            "ignore", message="divide by zero encountered in log", category=RuntimeWarning
        )
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        result = finetune(
            var,
            vqvae,
            token_views(model, rows=rows, k=k),
            optimization=OptimizationConfig(steps=1, batch_size=rows // k),
            method=method_config,
            plan=RunPlan(planned_steps=1, noise_multiplier=1.0),  # sigma given: no calibration to wait for
            privacy=privacy,
            resources=ResourcesConfig(gpus_per_worker=0),
            debug_seed=None if privacy is None else 0,
        )
    compute = result["compute"]
    if compute["rows_trained"] != rows or compute["steps_trained"] != 1:
        raise RuntimeError(
            f"{model.name} {method} {clipping or NO_DP} k={k}: the step recorded {compute['rows_trained']} rows "
            f"over {compute['steps_trained']} steps, not {rows} rows in one step"
        )
    return compute


def measure(
    model: Model,
    *,
    rows: int,
    views: tuple[int, ...] = (1,),
    methods: tuple[str, ...] = METHODS,
    modes: tuple[str, ...] = CLIPPING_MODES,
    log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Per method: the non-DP step, then each clipping mode at each k of ``views`` (ghost at k = 1 only), all on
    the same ``rows`` rows. Each result: FLOPs per row as recorded, and ``over_non_dp``, its ratio to the non-DP
    step of the same method minus one."""
    results = []
    for method in methods:
        steps = [(None, 1)] + [(mode, k) for mode in modes for k in views if mode != "ghost" or k == 1]
        base = None
        for clipping, k in steps:
            compute = recorded_step(model, method, clipping, rows=rows, k=k)
            per_row = float(compute["train_flops_per_row"])
            base = per_row if clipping is None else base
            results.append(
                dict(
                    model=model.name,
                    geometry=model.describe(),
                    method=method,
                    clipping=clipping or NO_DP,
                    k=k,
                    rows=rows,
                    flops_per_row=per_row,
                    over_non_dp=per_row / base - 1.0,
                    rows_per_forward=compute["rows_per_forward"],
                    attention_kernel=compute["attention_kernel"],
                )
            )
            if log:
                log(results[-1])
    return results


def percent(ratio_minus_one: float) -> str:
    """ "+x.x%" from 1% up, two significant digits below (book-keeping's excess is a fraction of a percent)."""
    value = 100 * ratio_minus_one
    return f"{value:+.1f}%" if abs(value) >= 1 else f"{value:+.2g}%"


def table(results: list[dict]) -> list[str]:
    lines = [
        "| model | method | step | k | rows | GFLOPs per row | over the non-DP step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        over = "-" if r["clipping"] == NO_DP else percent(r["over_non_dp"])
        lines.append(
            f"| {r['model']} | {r['method']} | {r['clipping']} | {r['k']} | {r['rows']} | "
            f"{r['flops_per_row'] / 1e9:.5g} | {over} |"
        )
    return lines


def summary(results: list[dict]) -> list[str]:
    """One line per model: each mode's excess at k = 1, full fine-tuning and LoRA."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        by = {(r["method"], r["clipping"]): r for r in results if r["model"] == model and r["k"] == 1}
        methods = [m for m in METHODS if (m, NO_DP) in by]
        parts = [
            f"{mode} {' and '.join(percent(by[(m, mode)]['over_non_dp']) for m in methods)}"
            for mode in CLIPPING_MODES
            if all((m, mode) in by for m in methods)
        ]
        lines.append(f"- {model}, k = 1, over the non-DP step ({' and '.join(methods)}): " + "; ".join(parts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,wide", help="comma-separated: tiny, wide")
    parser.add_argument("--tiny-rows", type=int, default=32, help="rows per step on the tiny model")
    parser.add_argument("--wide-rows", type=int, default=4, help="rows per step on the wide model")
    parser.add_argument("--views", default="1,2", help="DP views per example k (ghost: 1 only)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--depth", type=int, default=2, help="blocks of the wide model")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    names = args.models.split(",")
    if unknown := set(names) - {"tiny", "wide"}:
        parser.error(f"unknown models {sorted(unknown)}; known: tiny, wide")
    views = tuple(int(k) for k in args.views.split(","))
    if 1 not in views:
        parser.error("--views must include 1 (the only k ghost clipping takes)")
    plans = {
        "tiny": (tiny_model(), args.tiny_rows),
        "wide": (wide_model(width=args.width, heads=args.heads, depth=args.depth), args.wide_rows),
    }
    for name in names:
        if any(plans[name][1] % k or plans[name][1] < 2 * k for k in views):
            parser.error(f"--{name}-rows must be a multiple of every k in --views and hold >= 2 examples")
    results = []
    for name in names:
        model, rows = plans[name]
        results += measure(model, rows=rows, views=views, log=lambda row: print(row, flush=True))
    command = (
        f"python scripts/benchmark_clipping_flops.py --models {args.models} --tiny-rows {args.tiny_rows}"
    )
    command += f" --wide-rows {args.wide_rows} --views {args.views} --width {args.width} --heads {args.heads}"
    command += f" --depth {args.depth}"
    models = "; ".join(f"{name}: {plans[name][0].describe()}" for name in names)
    kernels = ", ".join(sorted({r["attention_kernel"] for r in results}))
    forwards = ", ".join(sorted({str(r["rows_per_forward"]) for r in results}))
    section = [
        "### Training FLOPs per row a trial records: DP per clipping mode vs the non-DP step on the same rows "
        f"({benchmark_common.stamp()})",
        "",
        f"Machine: {benchmark_common.machine()}. Script: `{command}`. Models ({models}): random weights, adapted "
        "by the method (seed 0). Each row is one step of `trainables.finetune.finetune` on a fresh copy of the "
        "model, reporting the `compute.train_flops_per_row` the run records, as a trial does (`StepMeter`, the "
        "visible-pair FLOP counter: matrix products and attention; norms, softmax, element-wise ops and the "
        "optimiser are not counted). Every step of a model does the same rows (token views): without DP a batch "
        "of that many examples of one view; with DP the same rows as examples of k views, at sampling rate 1 (the "
        "Poisson draw selects every example; each step checked to record exactly these rows). Float32, attention "
        f"kernel {kernels}, rows per forward {forwards} (one forward per step). Over the non-DP step: FLOPs per "
        "row over the non-DP step's of the same model and method, minus one. Ghost clipping adds a second "
        "backward and Opacus's norms from T x T Gram matrices (~2 T^2 (in + out) FLOPs per linear layer and "
        "example, T tokens per row): its excess grows with the tokens against the width.",
        "",
        *table(results),
        "",
        *summary(results),
        "",
    ]
    benchmark_common.publish("\n".join(section), args.out)


if __name__ == "__main__":
    main()
