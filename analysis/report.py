"""The report page: every table, figure and sample grid of an analysis, with the sweep's provenance and the list of
failed or skipped trials, as ``index.md`` and a self-contained-but-linked ``index.html``."""

from __future__ import annotations

import datetime
import html
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.schema import SCHEMA_VERSION

from .figures import AUDIT_CAPTION, CONVERGENCE_CAPTION, ROC_CAPTION, FigureFile
from .load import Results
from .metrics import lookup
from .tables import Cell, Table, above_claim

KEY_PACKAGES = ("torch", "torchvision", "ray", "peft", "opacus", "torch-fidelity")
# Every trial, one row each, beside index.md (written by ``analysis.run.write_trials``, linked from the page).
TRIAL_TABLES = ("trials.csv", "trials.parquet")
TRIALS_NOTE = "Every trial, one row each (its settings, status, error and metrics):"
# What a cell and an error bar stand for (the tables' cells and the figures' bars are the same aggregates).
CELLS_NOTE = (
    "A cell over several seeds is their mean ± the sample standard deviation (n - 1 in the denominator), n the "
    "successful trials with a value; failed trials and trials without a value are counted beside it, never "
    "averaged in. Error bars in the figures are the same standard deviation."
)
# What a figure means where its axes alone do not say it (figure name -> one sentence below it).
FIGURE_CAPTIONS = {
    "privacy_audit": AUDIT_CAPTION,
    "privacy_audit_roc": ROC_CAPTION,
    "convergence_fid": CONVERGENCE_CAPTION,
}


@dataclass
class Analysis:
    """What one run of the analysis produced (paths relative to ``out``)."""

    out: Path
    results: Results
    tables: list[Table]
    skipped_tables: list[str] = field(default_factory=list)
    comparisons: list[Table] = field(default_factory=list)
    figures: list[FigureFile] = field(default_factory=list)
    skipped_figures: list[str] = field(default_factory=list)
    grids: dict[str, Path] = field(default_factory=dict)
    missing_grids: dict[str, str] = field(default_factory=dict)
    # per dataset, the DP trials no table shows (``tables.dp_in_no_table``): the report names them
    in_no_table: list[str] = field(default_factory=list)


def provenance(results: Results) -> dict[str, list[str]]:
    """Distinct values (with trial counts) of what produced the results: code version, packages, devices, extractor,
    sampling settings and evaluation split."""
    # One record per trial: the convergence twins counted once (``Results.repeats``) stay out of the counts.
    records = [results.records[trial_id] for trial_id in results.trials["trial_id"]]
    count = lambda values: [f"{v} ({n})" for v, n in Counter(values).most_common()]  # noqa: E731
    out = {
        "git commit": count(lookup(r, "environment.git_commit") or "unknown" for r in records),
        "devices": count(
            ", ".join(sorted(set(lookup(r, "environment.devices") or []))) or "unknown" for r in records
        ),
        "feature extractor": count(results.trials["extractor"]),
        "sampling": count(map(_sampling, *[results.trials[c] for c in ("guidance_scale", "top_k", "top_p")])),
        "evaluation split": count(results.trials["evaluation_split"]),
        "result schema": [f"version {SCHEMA_VERSION}"],
    }
    classifiers = [_classifier(r) for r in records]
    if any(classifiers):
        out["class-accuracy classifier"] = count(c or "none recorded" for c in classifiers)
    for package in KEY_PACKAGES:
        versions = [
            (lookup(r, "environment.packages") or {}).get(package) for r in records
        ]  # package names are open-ended
        if any(versions):
            out[package] = count(v or "absent" for v in versions)
    return out


def _sampling(guidance: float, top_k: int, top_p: float) -> str:
    """ "guidance 1.5, top-k 900, top-p 0.96" (0: that filter off)."""
    return f"guidance {guidance:g}, top-k {top_k}, top-p {top_p:g}"


def _classifier(record: dict) -> str | None:
    """ "digits-cnn-v2 (98.6% on real test images, 16 px, weights sha256 0123456789ab)", or None."""
    name = lookup(record, "evaluation_settings.classifier.name")
    if not name:
        return None
    details = []
    accuracy = lookup(record, "evaluation_settings.classifier.test_accuracy")
    if accuracy is not None:
        details.append(f"{100 * accuracy:.1f}% on real test images")
    # the classifier's input size, whichever name it was recorded under
    size = lookup(record, "evaluation_settings.classifier.input_size") or lookup(
        record, "evaluation_settings.classifier.resolution"
    )
    if size is not None:
        details.append(f"{size} px")
    weights = lookup(record, "evaluation_settings.classifier.weights_sha256")
    if weights is not None:
        details.append(f"weights sha256 {weights[:12]}")
    return f"{name}" + (f" ({', '.join(details)})" if details else "")


def _rel(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def summary(r: Results) -> str:
    parts = [f"{len(r.trials)} trials: {len(r.succeeded)} succeeded, {len(r.failed)} failed"]
    parts += [f"{len(r.invalid)} files skipped as invalid"] * bool(r.invalid) + [
        f"{len(r.excluded)} trials left out by the selection"
    ] * bool(r.excluded)
    parts += [f"{len(r.repeats)} repeats counted once"] * bool(r.repeats)
    return "; ".join(parts) + "."


def notices(analysis: Analysis) -> list[tuple[str, list[str]]]:
    """(heading, plain-text lines) of everything a reader must know is missing or was left out."""
    r = analysis.results
    labels = dict(zip(r.trials["trial_id"], r.trials["label"]))
    above = above_claim(r.trials[r.trials["audited"].astype(bool)]) if len(r.trials) else r.trials
    return [
        (
            "WARNING: audited runs whose epsilon lower bound exceeds their claimed epsilon (evidence of a bug in "
            "the DP mechanism or its accounting, or a 1-in-20 chance at 95% confidence: rerun with another "
            "audit.seed)",
            [
                f"{t.label} ({t.trial_id}): bound {t.audit_epsilon_lower_bound:.3f} > claimed "
                f"{t.audit_claimed_epsilon:.3f}"
                for t in above.itertuples()
            ],
        ),
        (
            "Failed trials",
            [f"{t.label} ({t.trial_id}): {_first_line(t.error)}" for t in r.failed.itertuples()] or ["None."],
        ),
        ("Files skipped as invalid", [f"{name}: {reason}" for name, reason in r.invalid]),
        ("Trials left out by the selection", [f"{label} ({tid}): {why}" for tid, label, why in r.excluded]),
        (
            "Repeats counted once (same setting and seeds; they differ only in convergence evaluations)",
            [f"{label} ({tid}) repeats {labels.get(kept, kept)} ({kept})" for tid, label, kept in r.repeats],
        ),
        ("Tables not produced", analysis.skipped_tables),
        ("DP trials in no table", analysis.in_no_table),
        ("Figures not drawn", analysis.skipped_figures),
        ("Sample grids not drawn", [f"{n} trial(s): {why}" for why, n in _reasons(analysis.missing_grids)]),
    ]


def _md(text: str) -> str:
    """Plain text (error messages, file names) made inert in Markdown: no HTML, no table breaks."""
    return html.escape(text, quote=False).replace("|", "\\|").replace("`", "'")


def markdown(analysis: Analysis) -> str:
    r, out = analysis.results, analysis.out
    lines = [
        f"# varsweep analysis of {_md(str(r.folder))}",
        "",
        f"Generated {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}. {summary(r)}",
        "",
        "## Provenance",
        "",
    ]
    lines += [f"- {name}: {_md(', '.join(values))}" for name, values in provenance(r).items()]
    for heading, items in notices(analysis):
        if items:
            lines += ["", f"## {heading}", ""] + [f"- {_md(item)}" for item in items]
    lines += [
        "",
        "## Tables",
        "",
        f"{TRIALS_NOTE} " + ", ".join(f"[{name}]({name})" for name in TRIAL_TABLES),
        "",
        CELLS_NOTE,
        "",
    ]
    for table in analysis.tables:
        lines += [table.markdown(), _links(table), ""]
    if analysis.comparisons:
        lines += ["## Compared with the published tables", ""]
        for table in analysis.comparisons:
            lines += [table.markdown(), _links(table), ""]
    lines += ["## Figures", ""]
    for figure in analysis.figures:
        png, pdf = figure.paths
        lines += [
            f"### {figure.title}",
            "",
            f"![{figure.title}]({_rel(png, out)})",
            "",
            *([FIGURE_CAPTIONS[figure.name], ""] if figure.name in FIGURE_CAPTIONS else []),
            f"PDF: [{_rel(pdf, out)}]({_rel(pdf, out)})",
            "",
        ]
    lines += ["## Sample grids", "", GRID_NOTE, ""]
    labels = dict(zip(r.trials["trial_id"], r.trials["label"]))
    lines += [
        f"### {labels[tid]} (`{tid[:12]}`)\n\n![{labels[tid]}]({_rel(path, out)})\n"
        for tid, path in analysis.grids.items()
    ]
    return "\n".join(lines) + "\n"


GRID_NOTE = (
    "Each grid is captioned with its trial (method, privacy, model, dataset, seed) and metrics. Each row is a class, "
    "named on the left (with its class accuracy where recorded): generated images on the left, real evaluation "
    "images on the right."
)


def _links(table: Table) -> str:
    return "Files: " + ", ".join(f"[{table.name}{s}](tables/{table.name}{s})" for s in table.renderers())


def _reasons(missing: dict[str, str]) -> list[tuple[str, int]]:
    """Why grids are missing, most common first (one line per reason rather than per trial)."""
    return Counter(why.split(" (")[0] for why in missing.values()).most_common()


def _first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0] if text and text.strip() else "no error recorded"


def page(analysis: Analysis) -> str:
    """index.html: the same content as index.md, as HTML."""
    r, out = analysis.results, analysis.out
    esc = html.escape
    parts = [
        f"<h1>varsweep analysis of {esc(str(r.folder))}</h1>",
        f"<p>{esc(summary(r))}</p>",
        "<h2>Provenance</h2><ul>",
    ]
    parts += [f"<li>{esc(name)}: {esc(', '.join(values))}</li>" for name, values in provenance(r).items()]
    parts += ["</ul>"]
    for heading, items in notices(analysis):
        if items:
            parts += (
                [f"<h2>{esc(heading)}</h2><ul>"] + [f"<li>{esc(item)}</li>" for item in items] + ["</ul>"]
            )
    trial_links = ", ".join(f"<a href='{name}'>{name}</a>" for name in TRIAL_TABLES)
    parts += ["<h2>Tables</h2>", f"<p>{esc(TRIALS_NOTE)} {trial_links}</p>", f"<p>{esc(CELLS_NOTE)}</p>"]
    parts += [_html_table(t) for t in analysis.tables]
    if analysis.comparisons:
        parts += ["<h2>Compared with the published tables</h2>"] + [
            _html_table(t) for t in analysis.comparisons
        ]
    parts += ["<h2>Figures</h2>"]
    for figure in analysis.figures:
        png, pdf = figure.paths
        parts += [
            f"<h3>{esc(figure.title)}</h3><img src='{_rel(png, out)}' style='max-width:100%'>"
            + (f"<p>{esc(FIGURE_CAPTIONS[figure.name])}</p>" if figure.name in FIGURE_CAPTIONS else "")
            + f"<p><a href='{_rel(pdf, out)}'>PDF</a></p>"
        ]
    parts += [f"<h2>Sample grids</h2><p>{GRID_NOTE}</p>"]
    labels = dict(zip(r.trials["trial_id"], r.trials["label"]))
    parts += [
        f"<h3>{esc(labels[tid])}</h3><img src='{_rel(path, out)}' style='max-width:100%' alt='{esc(labels[tid])}'>"
        for tid, path in analysis.grids.items()
    ]
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td.key{text-align:left}caption{font-weight:bold;text-align:left}"
    )
    return f"<!doctype html><html><head><meta charset='utf-8'><title>varsweep analysis</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"


def _html_table(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in table.header)
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{esc(c.text())}</td>" if isinstance(c, Cell) else f"<td class='key'>{esc(c)}</td>"
            for c in row
        )
        + "</tr>"
        for row in table.rows
    )
    links = " ".join(f"<a href='tables/{table.name}{s}'>{s.lstrip('_.')}</a>" for s in table.renderers())
    notes = "".join(f"<li>{esc(n)}</li>" for n in table.notes)
    return f"<table><caption>{esc(table.title)}</caption><tr>{head}</tr>{rows}</table><p>{links}</p>" + (
        f"<ul>{notes}</ul>" if notes else ""
    )
