"""The paper's figures from the trials DataFrame, each as PNG and PDF in one style: training compute (Fig. 1/3),
FID (and class accuracy, where recorded) vs training steps (Fig. 2), the privacy-utility curve, DP FID vs
augmentation multiplicity k (Table 2), trainable parameters vs FID, and per-trial sample grids (generated images
per class beside real ones, labelled). matplotlib (Agg backend) and PIL only; a figure without data is skipped and
the report says why.

Readability rules every figure follows: the title is wrapped to the figure's width, legends sit outside the axes
(right of them), log axes print plain numbers (1, 2, 5, 10, not 10^0), each k has its own colour, and the no-DP
reference lines are in the legend."""

from __future__ import annotations

import itertools
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib import font_manager, ticker
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from pyarrow import fs as pafs

from bench.pixels import to_rgb
from bench.results import open_storage
from bench.schema import is_storage_relative, is_uri

from .metrics import DATASET_COLUMNS, METHOD_LABELS, METRICS, lookup, method_label
from .tables import TABLE2_METHODS, above_claim, audited_left_out, dataset_columns

STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "legend.fontsize": 8,
    "figure.titlesize": 11,
}
METHOD_COLORS = {
    "full": "#1b6ca8",
    "lora": "#d1495b",
    "ln_tuning": "#edae49",
    "lora_attention": "#66a182",
    "lora_mlp": "#8d6a9f",
    "base": "#7f7f7f",
}
# Distinct per method: figures that colour by k tell methods apart by marker alone.
METHOD_MARKERS = {
    "full": "D",
    "lora": "o",
    "ln_tuning": "s",
    "lora_attention": "^",
    "lora_mlp": "v",
    "base": "P",
}
# No-DP reference lines are black; the method shows in the dash pattern (and the legend says which), each pattern
# unlike the others at a glance.
REFERENCE_STYLES = {
    "full": (0, ()),
    "lora": (0, (1, 1.5)),
    "ln_tuning": (0, (5, 2)),
    "lora_attention": (0, (4, 1.5, 1, 1.5)),
    "lora_mlp": (0, (8, 2, 1, 2, 1, 2)),
    "base": (0, (2, 4)),
}
LEGEND_WIDTH = 1.9  # inches added to a figure for the legend on its right
MAX_COLUMNS = 3  # panels per row: wider figures shrink below legibility in a report or a paper column


@dataclass(frozen=True)
class FigureFile:
    """A written figure: its name, files (PNG and PDF) and what was actually drawn (for checks): axis labels, tick
    labels of each x axis, legend entries."""

    name: str
    title: str
    paths: tuple[Path, ...]
    xlabels: tuple[str, ...]
    ylabels: tuple[str, ...]
    xticklabels: tuple[tuple[str, ...], ...] = ()
    legend: tuple[str, ...] = ()
    yticklabels: tuple[tuple[str, ...], ...] = ()  # the labelled y ticks inside each axis' limits


def _figure(panels: int, *, width: float = 3.6, height: float = 3.0):
    """A figure of ``panels`` axes, at most MAX_COLUMNS a row (returned as a flat list, unused cells hidden), with
    room for a legend on the right; constrained layout keeps the title, the axes and the legend inside the canvas."""
    columns = min(panels, MAX_COLUMNS)
    rows = math.ceil(panels / columns)
    fig, grid = plt.subplots(
        rows,
        columns,
        figsize=(width * columns + LEGEND_WIDTH, height * rows),
        squeeze=False,
        layout="constrained",
    )
    axes = list(grid.flat)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _legend(fig, *, extra: list | None = None) -> None:
    """One legend for the whole figure, right of the axes, each label once (panels repeat methods)."""
    entries = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    for handle in extra or []:
        entries.setdefault(handle.get_label(), handle)
    labels = sorted(
        entries, key=lambda label: label.endswith("no DP")
    )  # the references after the curves they refer to
    if labels:
        fig.legend(
            [entries[label] for label in labels],
            labels,
            loc="outside right upper",
            ncols=1 if len(labels) <= 22 else 2,
        )


def _plain_log(axis, values) -> None:
    """Log scale with ticks at the plotted values, printed as plain numbers (1, 8, 10, 128), no minor labels; a
    value too close to the previous labelled one (under 7% of the axis' log span) keeps its tick but no label."""
    ticks = sorted({float(v) for v in values if v > 0})
    span = math.log(ticks[-1] / ticks[0]) if len(ticks) > 1 else 1.0
    labelled = [ticks[0]]
    for tick in ticks[1:]:
        if math.log(tick / labelled[-1]) >= 0.07 * span:
            labelled.append(tick)
    axis.set_major_locator(ticker.FixedLocator(ticks))
    axis.set_major_formatter(
        ticker.FuncFormatter(lambda v, _: f"{v:g}" if any(math.isclose(v, t) for t in labelled) else "")
    )
    axis.set_minor_formatter(ticker.NullFormatter())


def _plain_log_auto(axis, values) -> None:
    """Log scale with matplotlib's ticks, printed as plain numbers (0.1, 1, 10, 100) rather than powers of ten.
    ``values``: the positive data on the axis; over less than two decades 1, 2 and 5 of each are labelled, so the
    axis never shows a single labelled tick (or none)."""
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())
    positive = [v for v in values if v > 0]
    if positive and max(positive) < 100 * min(positive):
        axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))


def _title(fig, title: str) -> None:
    """The title centred over the axes, left of the legend, and wrapped to that width: a long title never runs off
    the canvas or into the legend."""
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # places the legend, so its width is known
    canvas = fig.get_figwidth() * fig.dpi
    legend = max((lg.get_window_extent(renderer).width for lg in fig.legends), default=0.0)
    room = 0.9 * (canvas - legend)  # a margin on both sides: the title never touches the legend
    text = fig.suptitle(title, x=0.5 * (canvas - legend) / canvas)
    chars = len(title)
    while (
        text.get_window_extent(renderer).width > room and chars > 12
    ):  # characters differ in width: measure, not guess
        chars = min(chars - 1, int(chars * room / text.get_window_extent(renderer).width))
        text.set_text(textwrap.fill(title, chars))


def _save(fig, folder: Path, name: str, title: str) -> FigureFile:
    folder.mkdir(parents=True, exist_ok=True)
    _title(fig, title)
    paths = tuple(folder / f"{name}.{ext}" for ext in ("png", "pdf"))
    for path in paths:
        fig.savefig(path)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    legend = tuple(t.get_text() for lg in fig.legends for t in lg.get_texts())
    info = FigureFile(
        name,
        title,
        paths,
        tuple(ax.get_xlabel() for ax in axes),
        tuple(ax.get_ylabel() for ax in axes),
        tuple(tuple(t.get_text() for t in ax.get_xticklabels()) for ax in axes),
        legend,
        tuple(_visible_tick_labels(ax.yaxis) for ax in axes),
    )
    plt.close(fig)
    return info


def _visible_tick_labels(axis) -> tuple[str, ...]:
    low, high = sorted(axis.get_view_interval())
    labels = (
        t.get_text()
        for t in axis.get_majorticklabels()
        if low <= t.get_position()[axis.axis_name == "y"] <= high
    )
    return tuple(label for label in labels if label)


def compute_figure(trials: pd.DataFrame, folder: Path) -> FigureFile | None:
    """Training PFLOPs per dataset (x) and method (bars), one panel per model (non-DP trials; a log scale when the
    values span a decade or more, else linear from zero). Audited trials (canaries besides the dataset cost more)
    get hatched bars of their own beside their method's, as the compute table gives them rows of their own."""
    audited = trials["audited"].astype(bool) if "audited" in trials else False
    data = (
        trials.assign(_audited=audited)
        .loc[(trials["status"] == "success") & ~trials["dp"] & (trials["method"] != "base")]
        .dropna(subset=["train_pflops"])
    )
    data = data[np.isfinite(data["train_pflops"].astype(float))]  # an infinite value hid the axis' ticks
    if data.empty:
        return None
    models = list(dict.fromkeys(data.sort_values("depth")["model"]))
    with plt.rc_context(STYLE):
        fig, axes = _figure(len(models), width=4.2)
        for ax, model in zip(axes, models):
            _compute_panel(ax, data[data["model"] == model])
            ax.set_title(model)
        _legend(fig)
        return _save(
            fig,
            folder,
            "compute_pflops",
            "Training compute of non-private adaptation per dataset, method and model",
        )


def _compute_panel(ax, sub: pd.DataFrame) -> None:
    # one bar series per method, and per method with audited trials one more (``_audited``: compute_figure's)
    audited = sub["_audited"] if "_audited" in sub else pd.Series(False, index=sub.index)
    datasets, series = (
        [d for d in dataset_columns(sub) if d in set(sub["dataset"])],
        [
            (m, a)
            for m in METHOD_LABELS
            for a in (False, True)
            if ((sub["method"] == m) & (audited == a)).any()
        ],
    )
    heights = {
        (key, j): float(of[of["dataset"] == d]["train_pflops"].mean())
        for key in series
        for of in [sub[(sub["method"] == key[0]) & (audited == key[1])]]
        for j, d in enumerate(datasets)
        if (of["dataset"] == d).any()
    }
    # Each dataset centres the series it has: audited trials of one dataset left gaps in every other one.
    present = [[key for key in series if (key, j) in heights] for j in range(len(datasets))]
    width = 0.8 / max(len(keys) for keys in present)
    for method, is_audited in series:
        at = [j for j in range(len(datasets)) if ((method, is_audited), j) in heights]
        ax.bar(
            [j + (present[j].index((method, is_audited)) - (len(present[j]) - 1) / 2) * width for j in at],
            [heights[(method, is_audited), j] for j in at],
            width,
            label=METHOD_LABELS[method] + (" (audited)" if is_audited else ""),
            color=METHOD_COLORS[method],
            hatch="//" if is_audited else None,
            edgecolor="white" if is_audited else None,
        )
    ax.set_xticks(np.arange(len(datasets)), [DATASET_COLUMNS.get(d, d) for d in datasets])
    positive = sub["train_pflops"][sub["train_pflops"] > 0]
    if len(positive) and positive.max() >= 10 * positive.min():  # methods decades apart: log scale
        ax.set_yscale("log")
        _plain_log_auto(ax.yaxis, positive)
    else:  # within a decade a log axis has no labelled tick and makes close bars look far apart
        ax.set_ylim(bottom=0)
    ax.set_xlabel("dataset")
    ax.set_ylabel(METRICS["train_pflops"].axis_label)


def convergence_figure(trials: pd.DataFrame, convergence: pd.DataFrame, folder: Path) -> FigureFile | None:
    """FID vs training steps, one line per trial (DP trials labelled with epsilon and k), one panel per (model,
    dataset) with convergence evaluations, each followed by a class-accuracy panel where the evaluations recorded it."""
    if convergence.empty or "fid" not in convergence:
        return None
    # The curve's own metric columns keep their names; the trial's final values get "_final".
    data = convergence.dropna(subset=["fid"]).merge(
        trials[trials["status"] == "success"], on="trial_id", suffixes=("", "_final")
    )
    if data.empty:
        return None
    ordered = data.sort_values("depth")
    panels = list(dict.fromkeys(zip(ordered["model"], ordered["dataset"])))
    # Only the curves' own class accuracy (a trial's final value alone would draw a flat line).
    curves_have_accuracy = "class_accuracy" in convergence and convergence["class_accuracy"].notna().any()
    metrics = ["fid"] + (["class_accuracy"] if curves_have_accuracy else [])
    with plt.rc_context(STYLE):
        fig, axes = _figure(len(panels) * len(metrics), width=4.2)
        for ax, ((model, dataset), metric) in zip(axes, itertools.product(panels, metrics)):
            _convergence_panel(ax, data[(data["model"] == model) & (data["dataset"] == dataset)], metric)
            ax.set_title(f"{model}, {dataset}")
        _legend(fig)
        return _save(
            fig,
            folder,
            "convergence_fid",
            "FID during training" + (" and class accuracy" if len(metrics) > 1 else ""),
        )


def _convergence_panel(ax, sub: pd.DataFrame, metric: str) -> None:
    dp_markers = itertools.cycle(
        "s^vDP*X"
    )  # DP curves of one method share its colour: tell them apart by marker
    seed_styles = ("-", ":", "-.", (0, (5, 1)), (0, (1, 3)))  # seeds of a non-DP setting: apart by line style
    seeds = {seed: i for i, seed in enumerate(sorted(set(sub["seed"])))}
    scale = METRICS[metric].scale  # curves store fractions, like the final metrics
    order = sub.assign(_method=sub["method"].map(list(METHOD_LABELS).index)).sort_values(
        ["dp", "_method", "epsilon", "k", "seed"]
    )
    # Each point scores convergence_num_images images: one count names the axis, several name each line.
    counts = set(sub["convergence_num_images"])
    for _, curve in order.groupby("trial_id", sort=False):
        t, curve = curve.iloc[0], curve.dropna(subset=[metric]).sort_values("step")
        label = method_label(t["method"], t["epsilon"], t["k"]) + (f", seed {t['seed']}" if t["seed"] else "")
        label += f", {_images(t['convergence_num_images'])}" if len(counts) > 1 else ""
        ax.plot(
            curve["step"],
            curve[metric] * scale,
            marker=next(dp_markers) if t["dp"] else "o",
            markersize=4,
            label=label,
            color=METHOD_COLORS[t["method"]],
            linestyle="--" if t["dp"] else seed_styles[seeds[t["seed"]] % len(seed_styles)],
        )
    ax.set_xlabel("training step")
    on = f"on {_images(*counts)}" if len(counts) == 1 else "image count per line"
    ax.set_ylabel(f"{METRICS[metric].axis_label} ({on})")


def _images(count: int) -> str:
    """ "1,000 images": the sample a convergence point is scored on."""
    return f"{int(count):,} images"


CONVERGENCE_CAPTION = (
    "Each point scores a small sample of generated images during training, evaluation.convergence_num_images "
    "of them (the axis says how many, or each line where they differ): FID grows as the sample shrinks, so "
    "points are comparable only at one image count, and not with the tables' FIDs of the final evaluation."
)


def dataset_markers(points: pd.DataFrame) -> dict[str, str]:
    """A marker per dataset of ``points``, in the paper's column order (the legend's), not alphabetical."""
    shown = set(points["dataset"])
    return dict(zip((d for d in dataset_columns(points) if d in shown), itertools.cycle("osD^vP*X")))


def k_colors(ks) -> dict[int, str]:
    """A distinct colour for every augmentation multiplicity k (in increasing k), the same in every panel."""
    distinct = sorted({int(k) for k in ks})
    palette = plt.get_cmap(
        "tab10" if len(distinct) <= 10 else "tab20"
    ).colors  # tab10 reads better; tab20 beyond ten k
    return {k: matplotlib.colors.to_hex(palette[i % len(palette)]) for i, k in enumerate(distinct)}


def _no_dp_reference(ax, ok: pd.DataFrame, *, model: str, dataset: str, method: str, label: str) -> None:
    """The method's non-DP FID as a horizontal black line (dash pattern per method), labelled for the legend."""
    plain = ok[~ok["dp"] & (ok["model"] == model) & (ok["dataset"] == dataset) & (ok["method"] == method)][
        "fid"
    ]
    if not plain.empty:
        ax.axhline(
            plain.mean(), color="black", linestyle=REFERENCE_STYLES[method], linewidth=1.1, label=label
        )


def privacy_figure(trials: pd.DataFrame, folder: Path) -> FigureFile | None:
    """FID vs epsilon (log scale, ticks at the epsilons run), one line per (method, k) -- colour per k, marker per
    method --, one panel per (model, dataset); the same method's non-DP FID as a labelled reference line."""
    ok = trials[trials["status"] == "success"].dropna(subset=["fid"])
    dp = ok[ok["dp"]]
    if dp.empty:
        return None
    ordered = dp.sort_values("depth")
    panels = list(dict.fromkeys(zip(ordered["model"], ordered["dataset"])))
    colors = k_colors(dp["k"])
    with plt.rc_context(STYLE):
        fig, axes = _figure(len(panels), width=4.2)
        for ax, (model, dataset) in zip(axes, panels):
            sub = dp[(dp["model"] == model) & (dp["dataset"] == dataset)]
            lines = sorted(
                sub.groupby(["method", "k"]),
                key=lambda item: (list(METHOD_LABELS).index(item[0][0]), item[0][1]),
            )
            for (method, k), line in lines:
                points = line.groupby("epsilon")["fid"].agg(["mean", "std"]).reset_index()
                ax.errorbar(
                    points["epsilon"],
                    points["mean"],
                    yerr=points["std"].fillna(0),
                    marker=METHOD_MARKERS[method],
                    markersize=4,
                    capsize=2,
                    label=f"{METHOD_LABELS[method]}, k={k}",
                    color=colors[int(k)],
                )
            for method in _in_table_order(sub["method"]):
                _no_dp_reference(
                    ax,
                    ok,
                    model=model,
                    dataset=dataset,
                    method=method,
                    label=f"{METHOD_LABELS[method]}, no DP",
                )
            ax.set_xscale("log")
            _plain_log(ax.xaxis, sub["epsilon"])
            ax.set_title(f"{model}, {dataset}")
            ax.set_xlabel("privacy budget ε")
            ax.set_ylabel(METRICS["fid"].axis_label)
        _legend(fig)
        return _save(
            fig,
            folder,
            "privacy_utility",
            "Privacy-utility: FID vs privacy budget ε per augmentation multiplicity k",
        )


def multiplicity_figure(trials: pd.DataFrame, folder: Path, *, epsilon: float) -> FigureFile | None:
    """Table 2 as a figure: DP FID vs augmentation multiplicity k (log2 scale, ticks at the k run) at one epsilon,
    one line per method, one panel per (model, dataset), with each method's non-DP FID as a dotted reference
    line of its colour."""
    ok = trials[trials["status"] == "success"].dropna(subset=["fid"])
    dp = ok[ok["dp"] & ok["method"].isin(TABLE2_METHODS) & (ok["epsilon"] == epsilon)]
    if dp.empty:
        return None
    ordered = dp.sort_values("depth")
    panels = list(dict.fromkeys(zip(ordered["model"], ordered["dataset"])))
    with plt.rc_context(STYLE):
        fig, axes = _figure(len(panels))
        for ax, (model, dataset) in zip(axes, panels):
            _multiplicity_panel(ax, ok, dp[(dp["model"] == model) & (dp["dataset"] == dataset)])
            ax.set_title(f"{model}, {dataset}")
        _legend(fig)
        return _save(
            fig, folder, "fid_vs_k", f"DP FID vs augmentation multiplicity k at ε={epsilon:g} (Table 2)"
        )


def _multiplicity_panel(ax, ok: pd.DataFrame, sub: pd.DataFrame) -> None:
    model, dataset = sub["model"].iloc[0], sub["dataset"].iloc[0]
    for method in _in_table_order(sub["method"]):
        line = sub[sub["method"] == method].groupby("k")["fid"].agg(["mean", "std"]).reset_index()
        ax.errorbar(
            line["k"],
            line["mean"],
            yerr=line["std"].fillna(0),
            marker=METHOD_MARKERS[method],
            markersize=4,
            capsize=2,
            color=METHOD_COLORS[method],
            label=f"{METHOD_LABELS[method]}, DP ε={sub['epsilon'].iloc[0]:g}",
        )
        plain = ok[
            ~ok["dp"] & (ok["model"] == model) & (ok["dataset"] == dataset) & (ok["method"] == method)
        ]["fid"]
        if not plain.empty:
            ax.axhline(
                plain.mean(),
                color=METHOD_COLORS[method],
                linestyle=":",
                linewidth=1.3,
                label=f"{METHOD_LABELS[method]}, no DP",
            )
    ax.set_xscale("log", base=2)
    _plain_log(ax.xaxis, sub["k"])
    ax.set_xlabel("augmentation multiplicity k")
    ax.set_ylabel(METRICS["fid"].axis_label)


def _in_table_order(methods) -> list[str]:
    return [m for m in METHOD_LABELS if m in set(methods)]


def parameters_figure(trials: pd.DataFrame, folder: Path) -> FigureFile | None:
    """FID vs trainable parameters (log scale), one point per (model, method, dataset), non-DP."""
    data = trials[(trials["status"] == "success") & ~trials["dp"] & (trials["method"] != "base")].dropna(
        subset=["fid", "trainable_params"]
    )
    if data.empty:
        return None
    points = (
        data.groupby(["depth", "model", "method", "dataset"], sort=True)[["trainable_params", "fid"]]
        .mean()
        .reset_index()
    )
    markers = dataset_markers(points)
    models = list(dict.fromkeys(points["model"]))
    with plt.rc_context(STYLE):
        fig, axes = _figure(len(models), width=4.2, height=3.4)
        for ax, model in zip(axes, models):
            sub = points[points["model"] == model]
            for _, p in sub.iterrows():
                ax.scatter(
                    p["trainable_params"] / 1e6,
                    p["fid"],
                    color=METHOD_COLORS[p["method"]],
                    marker=markers[p["dataset"]],
                    s=28,
                )
            ax.set_xscale("log")
            _plain_log_auto(ax.xaxis, sub["trainable_params"] / 1e6)
            ax.set_title(model)
            ax.set_xlabel("trainable parameters [millions]")
            ax.set_ylabel(METRICS["fid"].axis_label)
        handles = [
            plt.Line2D([], [], color=METHOD_COLORS[m], marker="o", linestyle="", label=METHOD_LABELS[m])
            for m in _in_table_order(points["method"])
        ]
        handles += [
            plt.Line2D(
                [], [], color="black", marker=markers[d], linestyle="", label=DATASET_COLUMNS.get(d, d)
            )
            for d in markers
        ]
        _legend(fig, extra=handles)
        return _save(fig, folder, "parameters_vs_fid", "FID vs trainable parameters")


# The privacy audit figure: where the non-DP trials stand (this factor right of the largest claimed epsilon on
# the log axis, past a dotted rule) and how a deliberately broken mechanism (a test of the audit) is drawn.
NO_DP_OFFSET = 4.0
BROKEN_STYLE = {"color": "#c00000", "marker": "X", "s": 60, "linewidths": 0.5}
# A successful run whose bound exceeds its own claimed epsilon: ringed, whatever its method and k.
ABOVE_CLAIM_STYLE = {"s": 220, "facecolors": "none", "edgecolors": "#ff7f00", "linewidths": 2.0}
ABOVE_CLAIM_LABEL = "run above its claimed ε (evidence of a bug)"
AUDIT_CAPTION = (
    "Each point is one audited training run (every seed and audit seed its own point, never a mean): its "
    "empirical ε lower bound (one-run audit with canaries, at the stated confidence) against the ε its DP "
    "accounting claims. A run above the y = x line, ringed in orange, is evidence that the DP "
    "implementation or accounting is wrong (a correct one lands there with probability at most 1 − "
    "confidence; rerun with another audit seed to confirm); runs far below it are expected and do not show "
    "extra privacy. Runs with equal values overlap: the privacy_audit table counts each setting's runs and "
    "those above their claim."
)


def audit_figure(trials: pd.DataFrame, folder: Path) -> FigureFile | None:
    """Empirical epsilon lower bound (y) vs claimed epsilon spent (x, log scale), one panel per (model,
    dataset), one point per audited run: DP runs coloured by k with each method's marker, the y = x line,
    non-DP runs in black at a "no DP" position right of the DP ones, and failed runs of a broken mechanism as
    red crosses (a test of the audit, never a result). A successful run above its own claim is ringed, counted
    in its panel and in the title. None without a successful audited trial."""
    ok, broken = _successful_and_broken(
        trials[trials["audited"]].dropna(subset=["audit_epsilon_lower_bound"])
    )
    if ok.empty:
        return None
    ordered = pd.concat([ok, broken]).sort_values("depth")
    panels = list(dict.fromkeys(zip(ordered["model"], ordered["dataset"])))
    colors = k_colors(ok.loc[ok["dp"], "k"]) if ok["dp"].any() else {}
    above = len(above_claim(ok))
    title = "Privacy audit: empirical ε lower bound vs claimed ε (y = x: the claim)"
    if above:
        title += (
            f" — WARNING: {above} run{'s' * (above != 1)} above {'their' if above != 1 else 'its'} claimed ε"
        )
    with plt.rc_context(STYLE):
        fig, axes = _figure(len(panels), width=4.2, height=3.4)
        for ax, (model, dataset) in zip(axes, panels):
            _audit_panel(ax, _in_panel(ok, model, dataset), _in_panel(broken, model, dataset), colors)
            ax.set_title(f"{model}, {dataset}")
        _legend(fig)
        return _save(fig, folder, "privacy_audit", title)


def _successful_and_broken(audited: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the successful audited trials, the runs of a deliberately broken mechanism: a test of the audit)."""
    broken = audited["audit_mechanism"].map(lambda m: isinstance(m, str) and m.startswith("broken"))
    return audited[audited["status"] == "success"], audited[broken]


def _in_panel(trials: pd.DataFrame, model: str, dataset: str) -> pd.DataFrame:
    return trials[(trials["model"] == model) & (trials["dataset"] == dataset)]


def _audit_panel(ax, ok: pd.DataFrame, broken: pd.DataFrame, colors: dict[int, str]) -> None:
    dp = ok[ok["dp"]]
    claimed = pd.concat([dp["audit_claimed_epsilon"], broken["audit_claimed_epsilon"]]).dropna()
    low, high = (float(claimed.min()), float(claimed.max())) if len(claimed) else (1.0, 10.0)
    no_dp_x = high * NO_DP_OFFSET
    lines = sorted(
        dp.groupby(["method", "k"]), key=lambda item: (list(METHOD_LABELS).index(item[0][0]), item[0][1])
    )
    for i, ((method, k), line) in enumerate(lines):
        ax.scatter(
            line["audit_claimed_epsilon"],
            line["audit_epsilon_lower_bound"],
            color=colors[int(k)],
            marker=METHOD_MARKERS[method],
            s=max(3.0, 7.0 - 1.5 * i) ** 2,  # later settings smaller: equal bounds (often all 0) stay visible
            zorder=2,
            label=f"{METHOD_LABELS[method]}, k={k}",
        )
    for method in _in_table_order(ok.loc[~ok["dp"], "method"]):
        plain = ok[~ok["dp"] & (ok["method"] == method)]["audit_epsilon_lower_bound"]
        ax.scatter(
            [no_dp_x] * len(plain),
            plain,
            color="black",
            marker=METHOD_MARKERS[method],
            s=25,
            zorder=2,
            label=f"{METHOD_LABELS[method]}, no DP",
        )
    above = above_claim(dp)
    if not above.empty:
        ax.scatter(
            above["audit_claimed_epsilon"],
            above["audit_epsilon_lower_bound"],
            zorder=4,
            label=ABOVE_CLAIM_LABEL,
            **ABOVE_CLAIM_STYLE,
        )
        ax.text(
            0.03,
            0.97,
            f"{len(above)} run{'s' * (len(above) != 1)} above y = x",
            transform=ax.transAxes,
            color=ABOVE_CLAIM_STYLE["edgecolors"],
            fontweight="bold",
            va="top",
        )
    if not broken.empty:
        ax.scatter(
            broken["audit_claimed_epsilon"],
            broken["audit_epsilon_lower_bound"],
            label="broken mechanism (test only)",
            zorder=3,
            **BROKEN_STYLE,
        )
    line_x = np.geomspace(low / 2, high * 1.5, 200)
    ax.plot(line_x, line_x, color="#555555", linestyle="--", linewidth=1.0, label="y = x (bound = claimed ε)")
    # Up to the largest claim, so the y = x line spans the DP points; a margin below 0 shows bounds of 0 whole.
    bounds = pd.concat([ok["audit_epsilon_lower_bound"], broken["audit_epsilon_lower_bound"]])
    top = 1.1 * max(1.0, float(bounds.max()), high if len(claimed) else 0.0)
    ax.set_ylim(-0.04 * top, top)
    _audit_axis(ax, low=low, high=high, no_dp_x=no_dp_x, with_no_dp=bool((~ok["dp"]).any()))
    ax.set_xlabel("claimed ε (DP accounting, spent)")
    ax.set_ylabel("empirical ε lower bound")


def _audit_axis(ax, *, low: float, high: float, no_dp_x: float, with_no_dp: bool) -> None:
    """Log x with plain labels at 1, 2, 5 x 10^n inside the claimed range (every decade when it spans three or
    more), and "no DP" at its own position past a dotted rule."""
    ax.set_xscale("log")
    decades = range(math.floor(math.log10(low / 2)), math.ceil(math.log10(high * 1.5)) + 1)
    steps = (1.0,) if math.log10(3 * high / low) >= 3 else (1.0, 2.0, 5.0)
    ticks = [m * 10.0**d for d in decades for m in steps if low / 2 <= m * 10.0**d <= high * 1.5]
    labels = [f"{t:g}" for t in ticks]
    if with_no_dp:
        ax.axvline(math.sqrt(high * 1.5 * no_dp_x), color="#999999", linestyle=":", linewidth=1.0)
        ticks, labels = ticks + [no_dp_x], labels + ["no DP"]
    ax.set_xlim(low / 2, no_dp_x * 1.6 if with_no_dp else high * 1.5)
    ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter(labels))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())


ROC_CAPTION = (
    "The membership score's ROC for each audited run, on log-log axes: the share of included canaries flagged "
    "against the share of excluded ones flagged, as the threshold on the score moves. The diagonal is guessing. "
    "What matters for privacy is the low false-positive end (Carlini et al. 2022): a curve far above the "
    "diagonal there means some canaries can be told apart confidently."
)
GUESSING_STYLE = {"color": "#555555", "linestyle": "--", "linewidth": 1.0}
BROKEN_CURVE = {"color": BROKEN_STYLE["color"], "linestyle": "--", "linewidth": 1.2}


def audit_roc_figure(trials: pd.DataFrame, roc: pd.DataFrame, folder: Path) -> FigureFile | None:
    """The membership ROC of every audited trial (``Results.audit_roc``), log-log, one panel per (model, dataset):
    one colour per DP setting (its seeds share it), trials without DP in black with the method's dash pattern, a
    broken mechanism (a test of the audit) dashed red, and the diagonal of guessing. None without a successful
    audited trial."""
    ok, broken = _successful_and_broken(trials[trials["audited"] & trials["trial_id"].isin(roc["trial_id"])])
    if ok.empty:
        return None
    shown = pd.concat([ok, broken]).sort_values("depth", kind="stable")
    curves = {trial_id: points for trial_id, points in roc.groupby("trial_id")}
    styles = _roc_styles(ok)
    panels = list(dict.fromkeys(zip(shown["model"], shown["dataset"])))
    with plt.rc_context(STYLE):
        fig, axes = _figure(len(panels), width=4.0, height=3.6)
        for ax, (model, dataset) in zip(axes, panels):
            here = _in_panel(shown, model, dataset)
            _roc_panel(ax, [(curves[t], *styles.get(t, BROKEN_ROC)) for t in here["trial_id"]])
            ax.set_title(f"{model}, {dataset}")
        _legend(fig)
        return _save(fig, folder, "privacy_audit_roc", "Privacy audit: membership ROC")


BROKEN_ROC = ("broken mechanism (test only)", BROKEN_CURVE)


def _roc_panel(ax, curves: list[tuple[pd.DataFrame, str, dict]]) -> None:
    """(points with fpr and tpr columns, label, line style) per curve. Both axes start at the smallest non-zero
    rate of any curve (1 / excluded or 1 / included canaries), so every curve's first step is in view; a rate of
    0 is drawn at the axis' edge."""
    floor = min(float(p.loc[p[rate] > 0, rate].min()) for p, _, _ in curves for rate in ("fpr", "tpr"))
    for points, label, style in curves:
        ax.plot(points["fpr"], points["tpr"], label=label, **style)
    ax.plot([floor, 1.0], [floor, 1.0], label="guessing (TPR = FPR)", **GUESSING_STYLE)
    ax.set_xscale("log", nonpositive="clip")
    ax.set_yscale("log", nonpositive="clip")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(floor, 1.05)
    for axis in (ax.xaxis, ax.yaxis):  # 0.01, 0.1, 1 rather than powers of ten, as every other figure prints
        _plain_log_auto(axis, [floor, 1.0])
    ax.set_xlabel("false positive rate (excluded canaries flagged)")
    ax.set_ylabel("true positive rate (included canaries flagged)")


def _roc_styles(ok: pd.DataFrame) -> dict[str, tuple[str, dict]]:
    """trial_id -> (legend label, line style) of each successful audited trial: a colour per DP setting in table
    order (tab20 past ten settings; colours repeat past twenty), black with the method's dash pattern without
    DP."""
    dp = ok[ok["dp"]]
    labels = {
        t: method_label(m, e, int(k))
        for t, m, e, k in zip(dp["trial_id"], dp["method"], dp["epsilon"], dp["k"])
    }
    palette = plt.get_cmap("tab10" if len(set(labels.values())) <= 10 else "tab20").colors
    colors = {
        label: matplotlib.colors.to_hex(palette[i % len(palette)])
        for i, label in enumerate(dict.fromkeys(labels.values()))
    }
    styles = {t: (label, {"color": colors[label], "linewidth": 1.2}) for t, label in labels.items()}
    for trial_id, method in zip(ok.loc[~ok["dp"], "trial_id"], ok.loc[~ok["dp"], "method"]):
        style = {"color": "black", "linestyle": REFERENCE_STYLES[method], "linewidth": 1.4}
        styles[trial_id] = (f"{METHOD_LABELS[method]}, no DP", style)
    return styles


def all_figures(
    trials: pd.DataFrame,
    convergence: pd.DataFrame,
    folder: Path,
    *,
    audit_roc: pd.DataFrame,
    table2_epsilon: float = 10.0,
) -> tuple[list[FigureFile], list[str]]:
    """(written figures, one line per figure skipped for lack of data); ``audit_roc``: ``Results.audit_roc``.
    Audited trials (their own experiment: they train on canaries besides the dataset) are drawn in the audit and
    compute figures only (the compute figure's bars of them are their own); a utility figure not drawn says how
    many it left out."""
    audited = int(trials["audited"].sum())
    plain = trials[~trials["audited"]]
    dp_epsilons = sorted(set(plain.loc[plain["dp"], "epsilon"]))
    ran = (
        f" (DP trials ran at ε in {{{', '.join(f'{e:g}' for e in dp_epsilons)}}}; see --table2-epsilon)"
        if dp_epsilons
        else ""
    )
    left_out = f" ({audited_left_out(audited, 'the utility figures')})" if audited else ""
    makers = {
        "compute_pflops": (lambda: compute_figure(trials, folder), "no trial has the data it plots"),
        "convergence_fid": (
            lambda: convergence_figure(plain, convergence, folder),
            f"no trial has the data it plots{left_out}",
        ),
        "privacy_utility": (
            lambda: privacy_figure(plain, folder),
            f"no trial has the data it plots{left_out}",
        ),
        "fid_vs_k": (
            lambda: multiplicity_figure(plain, folder, epsilon=table2_epsilon),
            f"no successful DP LoRA or LNTuning trial at ε={table2_epsilon:g}{ran}{left_out}",
        ),
        "parameters_vs_fid": (
            lambda: parameters_figure(plain, folder),
            f"no trial has the data it plots{left_out}",
        ),
        "privacy_audit": (
            lambda: audit_figure(trials, folder),
            "no successful trial has a privacy audit (config audit)",
        ),
        "privacy_audit_roc": (
            lambda: audit_roc_figure(trials, audit_roc, folder),
            "no successful trial has a privacy audit (config audit)",
        ),
    }
    written, skipped = [], []
    for name, (make, why) in makers.items():
        try:
            figure = make()
        except Exception as error:  # one figure's failure must not cost the report and the other figures
            plt.close("all")
            skipped.append(f"{name}: drawing failed ({type(error).__name__}: {error})")
            continue
        if figure is None:
            skipped.append(f"{name}: {why}")
        else:
            written.append(figure)
    return written, skipped


# --- sample grids ----------------------------------------------------------------------------------------------
# A grid is: a caption (the trial's label and metrics), a header row ("generated" | "real"), then one row per
# class: its name, GRID_IMAGES generated tiles, a gap, GRID_IMAGES real tiles. Sizes in pixels.
GRID_IMAGES, GRID_PIXELS, GRID_BORDER = 6, 64, 2
GRID_LABEL_WIDTH, GRID_GAP, GRID_MARGIN = 150, 32, 8
GRID_CAPTION_HEIGHT, GRID_HEADER_HEIGHT = 56, 26


def grid_layout(classes: int) -> dict[str, int]:
    """Pixel geometry of a grid of ``classes`` rows: ``tile`` (pitch of one image with its border), the left edges
    of the generated and real blocks, the top of the header row and of the first class row, width and height."""
    tile = GRID_PIXELS + 2 * GRID_BORDER
    generated_left = GRID_LABEL_WIDTH
    real_left = generated_left + GRID_IMAGES * tile + GRID_GAP
    rows_top = GRID_CAPTION_HEIGHT + GRID_HEADER_HEIGHT
    return {
        "tile": tile,
        "generated_left": generated_left,
        "real_left": real_left,
        "header_top": GRID_CAPTION_HEIGHT,
        "rows_top": rows_top,
        "width": real_left + GRID_IMAGES * tile + GRID_MARGIN,
        "height": rows_top + classes * tile + GRID_MARGIN,
    }


def sample_grid(
    record: dict, folder: Path, *, storage: str | Path | None = None
) -> tuple[Path | None, str | None]:
    """One PNG per trial: a caption with the trial's label and metrics, a header row, then for every class (its
    name, and its class accuracy where recorded, on the left) generated images beside real evaluation images.
    The record's artifact paths are relative to ``storage`` (the storage root the results were read from; a URI
    storage's images are downloaded into ``folder/downloaded/``). Small images are enlarged with nearest-neighbour
    (crisp pixels), large ones reduced; an unreadable image is a blank tile. Returns (path, None) or (None, why no
    grid was drawn)."""
    found = _artifact_files(record, storage, download_to=folder / "downloaded")
    if isinstance(found, str):
        return None, found
    generated_dir, entries = found
    generated = _generated_by_label(generated_dir)
    if not any(generated.values()):
        return None, f"no generated images in {generated_dir}"
    real = {int(e["label"]): [Path(p) for p in e["paths"]][:GRID_IMAGES] for e in entries}
    names = {int(e["label"]): str(e.get("class", e["label"])) for e in entries}
    labels = sorted(set(generated) | set(real))  # every class: one without generated images shows blank tiles
    image = _grid_canvas(record, labels, names)
    layout = grid_layout(len(labels))
    for row, label in enumerate(labels):
        top = layout["rows_top"] + row * layout["tile"]
        _paste_tiles(image, generated.get(label, []), left=layout["generated_left"], top=top)
        _paste_tiles(image, real.get(label, []), left=layout["real_left"], top=top)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record['trial_id']}.png"
    image.save(path)
    return path, None


def _artifact_files(
    record: dict, storage: str | Path | None, *, download_to: Path
) -> tuple[Path, list[dict]] | str:
    """(local folder of the generated images, real-image entries with local paths), or why there are none. Paths
    in the record are relative to the storage root (``bench.schema.Artifacts``); records of the older layout
    (absolute paths into a trial's work folder) are skipped with a note rather than trusted."""
    artifacts = record.get("artifacts") or {}
    if not artifacts:
        return "no artifacts recorded"
    if "folder" not in artifacts:
        return (
            "artifacts recorded as absolute paths by an older varsweep (before <storage>/artifacts/<trial_id>/); "
            "rerun the trial to draw its grid"
        )
    if storage is None:
        return "no storage root given to resolve the artifact paths against"
    paths = [artifacts["generated_images"]] + [p for e in artifacts["real_images"] for p in e["paths"]]
    if not all(is_storage_relative(p) for p in paths):
        return f"artifact paths are not relative to the storage root: {[p for p in paths if not is_storage_relative(p)][:2]}"
    if is_uri(str(storage)):
        try:
            root = _download(artifacts, str(storage), download_to / record["trial_id"])
        except (
            OSError,
            ValueError,
        ) as error:  # unreachable storage, missing object (pyarrow raises both kinds)
            return f"cannot download the sample images from {storage}: {type(error).__name__}: {error}"
    else:
        root = Path(storage)
    generated_dir = root / artifacts["generated_images"]
    if not generated_dir.is_dir():
        return f"generated images not found ({generated_dir})"
    entries = [{**e, "paths": [str(root / p) for p in e["paths"]]} for e in artifacts["real_images"]]
    return generated_dir, entries


def _download(artifacts: dict, storage: str, target: Path) -> Path:
    """Copy what a grid shows (the first GRID_IMAGES generated PNGs of every class, the real images) from a URI
    storage into ``target`` under the same relative paths; returns ``target`` (the local stand-in for the root)."""
    filesystem, root = open_storage(storage)
    listing = filesystem.get_file_info(
        pafs.FileSelector(f"{root}/{artifacts['generated_images']}", recursive=True, allow_not_found=True)
    )
    by_class: dict[str, list[str]] = {}
    for info in listing:
        relative = info.path[len(root) + 1 :]
        parent = relative.rsplit("/", 2)
        if (
            info.is_file
            and relative.endswith(".png")
            and len(parent) == 3
            and re.fullmatch(r"class_\d+", parent[1])
        ):
            by_class.setdefault(parent[1], []).append(relative)
    wanted = [p for files in by_class.values() for p in sorted(files)[:GRID_IMAGES]]
    wanted += [p for e in artifacts["real_images"] for p in e["paths"][:GRID_IMAGES]]
    for relative in wanted:
        local = target / relative
        local.parent.mkdir(parents=True, exist_ok=True)
        with filesystem.open_input_stream(f"{root}/{relative}") as source:
            local.write_bytes(source.read())
    return target


def _generated_by_label(folder: Path) -> dict[int, list[Path]]:
    """class_<label>/ folders -> the first GRID_IMAGES PNGs of each (folders of other names are ignored)."""
    out = {}
    for class_dir in sorted(folder.glob("class_*")):
        label = class_dir.name.removeprefix("class_")
        if class_dir.is_dir() and label.isdigit():
            out[int(label)] = sorted(class_dir.glob("*.png"))[:GRID_IMAGES]
    return out


def _paste_tiles(image: Image.Image, paths: list[Path], *, left: int, top: int) -> None:
    tile = GRID_PIXELS + 2 * GRID_BORDER
    for i, path in enumerate(paths[:GRID_IMAGES]):
        thumb = _thumb(path)
        if thumb is not None:  # unreadable: the tile stays blank (white)
            image.paste(thumb, (left + i * tile + GRID_BORDER, top + GRID_BORDER))


def _thumb(path: Path) -> Image.Image | None:
    """A square centre crop at GRID_PIXELS: nearest-neighbour when enlarging (a 16 px digit stays crisp, each
    pixel a 4x4 block), Lanczos when reducing; None for a file that cannot be read (shown blank)."""
    try:
        with Image.open(path) as image:
            image = to_rgb(image)
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            square = image.crop((left, top, left + side, top + side))
            return square.resize(
                (GRID_PIXELS, GRID_PIXELS), Image.NEAREST if side < GRID_PIXELS else Image.LANCZOS
            )
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def _font(size: int, *, bold: bool = False) -> ImageFont.ImageFont:
    """matplotlib's bundled DejaVu Sans (clean, has ε), else PIL's own font."""
    try:
        path = font_manager.findfont(
            font_manager.FontProperties(family="DejaVu Sans", weight="bold" if bold else "normal")
        )
        return ImageFont.truetype(path, size)
    except (OSError, ValueError):
        return ImageFont.load_default(size)


def _grid_canvas(record: dict, labels: list[int], names: dict[int, str]) -> Image.Image:
    """The white canvas with caption, header and class names drawn; tiles are pasted afterwards."""
    layout = grid_layout(len(labels))
    image = Image.new("RGB", (layout["width"], layout["height"]), "white")
    draw = ImageDraw.Draw(image)
    title, metrics = grid_caption(record)
    room = layout["width"] - 2 * GRID_MARGIN
    draw.text(
        (GRID_MARGIN, 8),
        _fit(draw, title, _font(15, bold=True), room),
        fill="black",
        font=_font(15, bold=True),
    )
    draw.text((GRID_MARGIN, 31), _fit(draw, metrics, _font(13), room), fill="#333333", font=_font(13))
    _draw_header(draw, layout)
    per_class = lookup(record, "metrics.class_accuracy_per_class")
    for row, label in enumerate(labels):
        accuracy = (
            per_class[label]
            if isinstance(per_class, list) and label < len(per_class) and _is_number(per_class[label])
            else None
        )
        _draw_class_name(
            draw,
            display_class_name(names.get(label, str(label))),
            accuracy,
            top=layout["rows_top"] + row * layout["tile"],
            height=layout["tile"],
        )
    return image


def _draw_header(draw: ImageDraw.ImageDraw, layout: dict[str, int]) -> None:
    font, block = _font(14, bold=True), GRID_IMAGES * layout["tile"]
    middle = layout["header_top"] + GRID_HEADER_HEIGHT // 2
    for text, left in (("generated", layout["generated_left"]), ("real", layout["real_left"])):
        draw.text((left + block // 2, middle), text, fill="black", font=font, anchor="mm")
    gap_middle = layout["real_left"] - GRID_GAP // 2  # a thin rule between the two blocks
    draw.line(
        [(gap_middle, layout["header_top"]), (gap_middle, layout["height"] - GRID_MARGIN)],
        fill="#bbbbbb",
        width=1,
    )
    draw.text((GRID_MARGIN, middle), "class", fill="#555555", font=_font(13), anchor="lm")


def display_class_name(name: str) -> str:
    """A class folder's name as a reader wants it: without the "NN_" prefix that only fixes the folders' order
    ("03_3" -> "3", "07_tall_bar" -> "tall bar")."""
    return re.sub(r"^\d+_(?=.)", "", name).replace("_", " ")


def _draw_class_name(
    draw: ImageDraw.ImageDraw, name: str, accuracy: float | None, *, top: int, height: int
) -> None:
    """The class name (wrapped to two lines at most) at the row's left, with its class accuracy below it."""
    font, room = _font(13), GRID_LABEL_WIDTH - GRID_MARGIN - 6
    lines = _wrap(draw, name, font, room)
    if len(lines) > 2:  # two lines at most; the ellipsis says the name goes on
        lines = [lines[0], _fit(draw, lines[1] + "…", font, room)]
    if accuracy is not None:
        lines.append(f"acc. {100 * accuracy:.0f}%")
    line_height, names = 16, len(lines) - (accuracy is not None)
    y = top + (height - line_height * len(lines)) // 2
    for i, line in enumerate(lines):  # the name in black, the accuracy in grey
        draw.text(
            (GRID_MARGIN, y + i * line_height), line, fill="black" if i < names else "#666666", font=font
        )


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, room: int) -> list[str]:
    """Words into lines no wider than ``room`` pixels (a single over-long word is cut with an ellipsis)."""
    lines, current = [], ""
    for word in text.replace("_", " ").split() or [text]:
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= room or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    lines.append(current)
    return [_fit(draw, line, font, room) for line in lines]


def _fit(draw: ImageDraw.ImageDraw, text: str, font, room: int) -> str:
    """``text`` cut with an ellipsis where it is wider than ``room`` pixels."""
    if draw.textlength(text, font=font) <= room:
        return text
    while text and draw.textlength(text + "…", font=font) > room:
        text = text[:-1]
    return text + "…"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def grid_caption(record: dict) -> tuple[str, str]:
    """(title, metrics) of a trial's grid: "DP-LoRA ε=8, k=2 · tiny-d4 · digits · seed 0 · trial 0123abcd" and
    "FID 12.34 · precision 56.70% · recall 45.60% · class accuracy 78.9%" (the metrics it recorded)."""
    config = record.get("config") or {}
    privacy, model = config.get("privacy") or {}, config.get("model") or {}
    method = (config.get("method") or {}).get("name", "base")
    label = (
        method_label(method, privacy.get("target_epsilon"), privacy.get("augmentation_multiplicity", 1))
        if privacy
        else METHOD_LABELS[method]
    )
    model_name = f"{'VAR' if model.get('base') == 'official' else 'tiny'}-d{model.get('depth', '?')}"
    dataset, seed = (
        (config.get("data") or {}).get("dataset", "?"),
        (config.get("optimization") or {}).get("seed", 0),
    )
    title = f"{label} · {model_name} · {dataset} · seed {seed} · trial {record['trial_id'][:12]}"
    shown = []
    for name, words in CAPTION_METRICS.items():
        metric = METRICS[name]
        value = lookup(record, metric.source)
        if _is_number(value):
            shown.append(f"{words} {metric.format(value * metric.scale)}{'%' if metric.unit == '%' else ''}")
    return title, " · ".join(shown) or "no metrics recorded"


# What a grid's caption shows, in this order, and how it names each metric mid-sentence.
CAPTION_METRICS = {
    "fid": "FID",
    "precision": "precision",
    "recall": "recall",
    "kid": "KID",
    "class_accuracy": "class accuracy",
}
