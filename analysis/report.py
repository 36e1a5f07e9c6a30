"""The report page: every table, figure and sample grid of an analysis, with the sweep's provenance and the list of
failed or skipped trials, as ``index.md`` and a self-contained-but-linked ``index.html``."""
from __future__ import annotations

import datetime
import html
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench.schema import SCHEMA_VERSION

from .figures import FigureFile
from .load import Results
from .tables import Cell, Table

KEY_PACKAGES = ("torch", "torchvision", "ray", "peft", "opacus", "torch-fidelity")


@dataclass
class Analysis:
    """What one run of the analysis produced (paths relative to ``out``)."""

    out: Path
    results: Results
    tables: list[Table]
    comparisons: list[Table] = field(default_factory=list)
    figures: list[FigureFile] = field(default_factory=list)
    skipped_figures: list[str] = field(default_factory=list)
    grids: dict[str, Path] = field(default_factory=dict)
    missing_grids: dict[str, str] = field(default_factory=dict)


def provenance(results: Results) -> dict[str, list[str]]:
    """Distinct values (with trial counts) of what produced the results: code version, packages, devices, extractor."""
    envs = [r.get("environment") or {} for r in results.records.values()]
    count = lambda values: [f"{v} ({n})" for v, n in Counter(values).most_common()]  # noqa: E731
    out = {"git commit": count(e.get("git_commit") or "unknown" for e in envs),
           "devices": count(", ".join(sorted(set(e.get("devices") or []))) or "unknown" for e in envs),
           "feature extractor": count(results.trials["extractor"]), "result schema": [f"version {SCHEMA_VERSION}"]}
    for package in KEY_PACKAGES:
        versions = [(e.get("packages") or {}).get(package) for e in envs]
        if any(versions):
            out[package] = count(v or "absent" for v in versions)
    return out


def _rel(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def markdown(analysis: Analysis) -> str:
    r, out = analysis.results, analysis.out
    lines = [f"# varsweep analysis of {r.folder}", "", f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}. "
             f"{len(r.trials)} trials: {len(r.succeeded)} succeeded, {len(r.failed)} failed"
             + (f"; {len(r.invalid)} files skipped as invalid" if r.invalid else "") + ".", "", "## Provenance", ""]
    lines += [f"- {name}: {', '.join(values)}" for name, values in provenance(r).items()]
    lines += ["", "## Failed trials", ""] + ([f"- `{t.trial_id}` {t.label}: {_first_line(t.error)}" for t in r.failed.itertuples()] or ["None."])
    if r.invalid:
        lines += ["", "## Files skipped as invalid", ""] + [f"- {name}: {reason}" for name, reason in r.invalid]
    lines += ["", "## Tables", ""]
    for table in analysis.tables:
        lines += [table.markdown(), _links(table, out), ""]
    if analysis.comparisons:
        lines += ["## Compared with the published tables", ""]
        for table in analysis.comparisons:
            lines += [table.markdown(), _links(table, out), ""]
    lines += ["## Figures", ""]
    for figure in analysis.figures:
        png, pdf = figure.paths
        lines += [f"### {figure.title}", "", f"![{figure.title}]({_rel(png, out)})", "", f"PDF: [{_rel(pdf, out)}]({_rel(pdf, out)})", ""]
    lines += [f"- not drawn: {why}" for why in analysis.skipped_figures]
    lines += ["", "## Sample grids", "", "Each row is a class: generated images on the left, real evaluation images on the right.", ""]
    labels = dict(zip(r.trials["trial_id"], r.trials["label"]))
    lines += [f"### {labels[tid]} (`{tid[:12]}`)\n\n![{labels[tid]}]({_rel(path, out)})\n" for tid, path in analysis.grids.items()]
    lines += [f"- no grid for {n} trial(s): {why}" for why, n in _reasons(analysis.missing_grids)]
    return "\n".join(lines) + "\n"


def _links(table: Table, out: Path) -> str:
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
    parts = [f"<h1>varsweep analysis of {esc(str(r.folder))}</h1>",
             f"<p>{len(r.trials)} trials: {len(r.succeeded)} succeeded, {len(r.failed)} failed"
             + (f", {len(r.invalid)} files skipped as invalid" if r.invalid else "") + ".</p>", "<h2>Provenance</h2><ul>"]
    parts += [f"<li>{esc(name)}: {esc(', '.join(values))}</li>" for name, values in provenance(r).items()]
    parts += ["</ul><h2>Failed trials</h2><ul>"]
    parts += [f"<li><code>{esc(t.trial_id)}</code> {esc(t.label)}: {esc(_first_line(t.error))}</li>" for t in r.failed.itertuples()] or ["<li>None.</li>"]
    parts += ["</ul>"]
    if r.invalid:
        parts += ["<h2>Files skipped as invalid</h2><ul>"] + [f"<li>{esc(n)}: {esc(w)}</li>" for n, w in r.invalid] + ["</ul>"]
    parts += ["<h2>Tables</h2>"] + [_html_table(t) for t in analysis.tables]
    if analysis.comparisons:
        parts += ["<h2>Compared with the published tables</h2>"] + [_html_table(t) for t in analysis.comparisons]
    parts += ["<h2>Figures</h2>"]
    for figure in analysis.figures:
        png, pdf = figure.paths
        parts += [f"<h3>{esc(figure.title)}</h3><img src='{_rel(png, out)}' style='max-width:100%'><p><a href='{_rel(pdf, out)}'>PDF</a></p>"]
    parts += [f"<p>Not drawn: {esc(why)}</p>" for why in analysis.skipped_figures]
    parts += ["<h2>Sample grids</h2><p>Each row is a class: generated images on the left, real evaluation images on the right.</p>"]
    labels = dict(zip(r.trials["trial_id"], r.trials["label"]))
    parts += [f"<h3>{esc(labels[tid])}</h3><img src='{_rel(path, out)}'>" for tid, path in analysis.grids.items()]
    parts += [f"<p>No grid for {n} trial(s): {esc(why)}</p>" for why, n in _reasons(analysis.missing_grids)]
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td.key{text-align:left}caption{font-weight:bold;text-align:left}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>varsweep analysis</title><style>{style}</style></head><body>{''.join(parts)}</body></html>\n"


def _html_table(table: Table) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in table.header)
    rows = "".join("<tr>" + "".join(f"<td>{esc(c.text())}</td>" if isinstance(c, Cell) else f"<td class='key'>{esc(c)}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    links = " ".join(f"<a href='tables/{table.name}{s}'>{s.lstrip('_.')}</a>" for s in table.renderers())
    notes = "".join(f"<li>{esc(n)}</li>" for n in table.notes)
    return f"<table><caption>{esc(table.title)}</caption><tr>{head}</tr>{rows}</table><p>{links}</p>" + (f"<ul>{notes}</ul>" if notes else "")
