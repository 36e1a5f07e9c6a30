"""The paper's figures from the trials DataFrame, each as PNG and PDF in one style: training compute (Fig. 1/3),
FID vs training steps (Fig. 2), the privacy-utility curve, trainable parameters vs FID, and per-trial sample grids
(generated images per class beside real ones). matplotlib only (Agg backend); a figure without data is skipped
and the report says why."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from .metrics import DATASET_COLUMNS, METHOD_LABELS, METRICS  # noqa: E402
from .tables import dataset_columns  # noqa: E402

STYLE = {"figure.dpi": 110, "savefig.dpi": 150, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3,
         "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False, "legend.fontsize": 8}
METHOD_COLORS = {"full": "#1b6ca8", "lora": "#d1495b", "ln_tuning": "#edae49", "lora_attention": "#66a182", "lora_mlp": "#8d6a9f", "base": "#7f7f7f"}
GRID_CLASSES, GRID_IMAGES, GRID_PIXELS = 8, 6, 64


@dataclass(frozen=True)
class FigureFile:
    """A written figure: its name, files (PNG and PDF) and the axis labels actually drawn (for checks)."""

    name: str
    title: str
    paths: tuple[Path, ...]
    xlabels: tuple[str, ...]
    ylabels: tuple[str, ...]


def _save(fig, folder: Path, name: str, title: str) -> FigureFile:
    folder.mkdir(parents=True, exist_ok=True)
    fig.suptitle(title)
    fig.tight_layout()
    paths = tuple(folder / f"{name}.{ext}" for ext in ("png", "pdf"))
    for path in paths:
        fig.savefig(path)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    info = FigureFile(name, title, paths, tuple(ax.get_xlabel() for ax in axes), tuple(ax.get_ylabel() for ax in axes))
    plt.close(fig)
    return info


def _panels(n: int, *, width: float = 4.2, height: float = 3.2):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
    return fig, list(axes[0])


def compute_figure(trials: pd.DataFrame, folder: Path) -> FigureFile | None:
    """Training PFLOPs per dataset (x) and method (bars), one panel per model (non-DP trials; log scale)."""
    data = trials[(trials["status"] == "success") & ~trials["dp"] & (trials["method"] != "base")].dropna(subset=["train_pflops"])
    if data.empty:
        return None
    models = list(dict.fromkeys(data.sort_values("depth")["model"]))
    with plt.rc_context(STYLE):
        fig, axes = _panels(len(models))
        for ax, model in zip(axes, models):
            sub = data[data["model"] == model]
            datasets, methods = [d for d in dataset_columns(sub) if d in set(sub["dataset"])], [m for m in METHOD_LABELS if m in set(sub["method"])]
            width = 0.8 / len(methods)
            for i, method in enumerate(methods):
                means = [sub[(sub["dataset"] == d) & (sub["method"] == method)]["train_pflops"].mean() for d in datasets]
                ax.bar(np.arange(len(datasets)) + (i - (len(methods) - 1) / 2) * width, means, width, label=METHOD_LABELS[method],
                       color=METHOD_COLORS[method])
            ax.set_xticks(np.arange(len(datasets)), [DATASET_COLUMNS.get(d, d) for d in datasets])
            ax.set_yscale("log")
            ax.set_title(model)
            ax.set_xlabel("dataset")
            ax.set_ylabel(METRICS["train_pflops"].axis_label)
            ax.legend()
        return _save(fig, folder, "compute_pflops", "Training compute per dataset, method and model")


def convergence_figure(trials: pd.DataFrame, convergence: pd.DataFrame, folder: Path) -> FigureFile | None:
    """FID vs training steps, one line per method (DP trials labelled with epsilon and k), one panel per
    (model, dataset) that has convergence evaluations."""
    if convergence.empty or "fid" not in convergence:
        return None
    data = convergence.dropna(subset=["fid"]).merge(trials[trials["status"] == "success"], on="trial_id", suffixes=("", "_final"))
    if data.empty:
        return None
    panels = list(dict.fromkeys(zip(data.sort_values("depth")["model"], data.sort_values("depth")["dataset"])))
    with plt.rc_context(STYLE):
        fig, axes = _panels(len(panels))
        for ax, (model, dataset) in zip(axes, panels):
            sub = data[(data["model"] == model) & (data["dataset"] == dataset)]
            dp_markers = itertools.cycle("s^vDP*X")  # DP curves of one method share its colour: tell them apart by marker
            for _, curve in sub.sort_values(["dp", "epsilon"]).groupby("trial_id", sort=False):
                t = curve.iloc[0]
                label = METHOD_LABELS[t["method"]] + (f", DP ε={t['epsilon']:g}, k={t['k']}" if t["dp"] else "") + (f", seed {t['seed']}" if t["seed"] else "")
                curve = curve.sort_values("step")
                ax.plot(curve["step"], curve["fid"], marker=next(dp_markers) if t["dp"] else "o", markersize=4, label=label,
                        color=METHOD_COLORS[t["method"]], linestyle="--" if t["dp"] else "-")
            ax.set_title(f"{model}, {dataset}")
            ax.set_xlabel("training step")
            ax.set_ylabel(METRICS["fid"].axis_label)
            ax.legend()
        return _save(fig, folder, "convergence_fid", "FID during training")


def privacy_figure(trials: pd.DataFrame, folder: Path) -> FigureFile | None:
    """FID vs epsilon (log scale), one line per (method, k), one panel per (model, dataset); non-DP FID of the
    same method as a horizontal reference line where it exists."""
    ok = trials[trials["status"] == "success"].dropna(subset=["fid"])
    dp = ok[ok["dp"]]
    if dp.empty:
        return None
    panels = list(dict.fromkeys(zip(dp.sort_values("depth")["model"], dp.sort_values("depth")["dataset"])))
    with plt.rc_context(STYLE):
        fig, axes = _panels(len(panels))
        for ax, (model, dataset) in zip(axes, panels):
            sub = dp[(dp["model"] == model) & (dp["dataset"] == dataset)]
            for (method, k), line in sub.groupby(["method", "k"]):
                points = line.groupby("epsilon")["fid"].agg(["mean", "std"]).reset_index()
                ax.errorbar(points["epsilon"], points["mean"], yerr=points["std"].fillna(0), marker="o", markersize=3, capsize=2,
                            label=f"{METHOD_LABELS[method]}, k={k}", color=METHOD_COLORS[method], alpha=0.5 + 0.5 * k / sub["k"].max())
                plain = ok[~ok["dp"] & (ok["model"] == model) & (ok["dataset"] == dataset) & (ok["method"] == method)]["fid"]
                if not plain.empty:
                    ax.axhline(plain.mean(), color=METHOD_COLORS[method], linestyle=":", linewidth=1)
            ax.set_xscale("log")
            ax.set_title(f"{model}, {dataset} (dotted: no DP)")
            ax.set_xlabel("privacy budget ε")
            ax.set_ylabel(METRICS["fid"].axis_label)
            ax.legend()
        return _save(fig, folder, "privacy_utility", "Privacy-utility: FID vs epsilon per augmentation multiplicity k")


def parameters_figure(trials: pd.DataFrame, folder: Path) -> FigureFile | None:
    """FID vs trainable parameters (log scale), one point per (model, method, dataset), non-DP."""
    data = trials[(trials["status"] == "success") & ~trials["dp"] & (trials["method"] != "base")].dropna(subset=["fid", "trainable_params"])
    if data.empty:
        return None
    points = data.groupby(["depth", "model", "method", "dataset"], sort=True)[["trainable_params", "fid"]].mean().reset_index()
    markers = dict(zip(dict.fromkeys(points["dataset"]), itertools.cycle("osD^vP*X")))
    models = list(dict.fromkeys(points["model"]))
    with plt.rc_context(STYLE):
        fig, axes = _panels(len(models), width=5.0, height=3.8)
        for ax, model in zip(axes, models):
            sub = points[points["model"] == model]
            for _, p in sub.iterrows():
                ax.scatter(p["trainable_params"] / 1e6, p["fid"], color=METHOD_COLORS[p["method"]], marker=markers[p["dataset"]], s=28)
            handles = [plt.Line2D([], [], color=METHOD_COLORS[m], marker="o", linestyle="", label=METHOD_LABELS[m]) for m in dict.fromkeys(sub["method"])]
            handles += [plt.Line2D([], [], color="black", marker=markers[d], linestyle="", label=DATASET_COLUMNS.get(d, d))
                        for d in dict.fromkeys(sub["dataset"])]
            ax.legend(handles=handles, ncol=2)
            ax.set_xscale("log")
            ax.set_title(model)
            ax.set_xlabel("trainable parameters [millions]")
            ax.set_ylabel(METRICS["fid"].axis_label)
        return _save(fig, folder, "parameters_vs_fid", "FID vs trainable parameters")


def all_figures(trials: pd.DataFrame, convergence: pd.DataFrame, folder: Path) -> tuple[list[FigureFile], list[str]]:
    """(written figures, one line per figure skipped for lack of data)."""
    makers = {"compute_pflops": lambda: compute_figure(trials, folder),
              "convergence_fid": lambda: convergence_figure(trials, convergence, folder),
              "privacy_utility": lambda: privacy_figure(trials, folder),
              "parameters_vs_fid": lambda: parameters_figure(trials, folder)}
    written, skipped = [], []
    for name, make in makers.items():
        try:
            figure = make()
        except Exception as error:  # one figure's failure must not cost the report and the other figures
            plt.close("all")
            skipped.append(f"{name}: drawing failed ({type(error).__name__}: {error})")
            continue
        if figure is None:
            skipped.append(f"{name}: no trial has the data it plots")
        else:
            written.append(figure)
    return written, skipped


# --- sample grids ----------------------------------------------------------------------------------------------

def sample_grid(record: dict, folder: Path) -> tuple[Path | None, str | None]:
    """One PNG per trial: for up to 8 classes, generated images (left) beside real evaluation images (right).
    Returns (path, None) or (None, why no grid was drawn)."""
    artifacts = record.get("artifacts") or {}
    generated_dir, entries = artifacts.get("generated_images"), artifacts.get("real_images") or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) and {"label", "paths"} <= set(e) for e in entries):
        return None, "artifacts.real_images is not a list of {label, class, paths}"
    real = {int(entry["label"]): entry["paths"] for entry in entries}
    if not generated_dir or not Path(generated_dir).is_dir():
        return None, f"generated images not found ({generated_dir or 'not recorded'})"
    rows = []
    for class_dir in sorted(Path(generated_dir).glob("class_*"))[:GRID_CLASSES]:
        label = int(class_dir.name.removeprefix("class_"))
        generated = [_thumb(p) for p in sorted(class_dir.glob("*.png"))[:GRID_IMAGES]]
        rows.append(_row(generated, [_thumb(Path(p)) for p in real.get(label, [])[:GRID_IMAGES]]))
    if not rows:
        return None, f"no generated images in {generated_dir}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{record['trial_id']}.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path, None


def _thumb(path: Path) -> np.ndarray | None:
    """A square centre crop resized to the grid size; None for a file that cannot be read (shown blank)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            return np.asarray(image.crop((left, top, left + side, top + side)).resize((GRID_PIXELS, GRID_PIXELS), Image.LANCZOS))
    except (OSError, UnidentifiedImageError):
        return None


def _row(generated: list, reals: list) -> np.ndarray:
    """GRID_IMAGES generated tiles, a gap, GRID_IMAGES real tiles (blank where missing), 2-pixel white borders."""
    blank = np.full((GRID_PIXELS, GRID_PIXELS, 3), 255, np.uint8)
    tiles = [(t if t is not None else blank) for t in (generated + [None] * GRID_IMAGES)[:GRID_IMAGES]]
    tiles += [np.full((GRID_PIXELS, GRID_PIXELS // 2, 3), 255, np.uint8)]
    tiles += [(t if t is not None else blank) for t in (reals + [None] * GRID_IMAGES)[:GRID_IMAGES]]
    padded = [np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=255) for t in tiles]
    return np.concatenate(padded, axis=1)
