"""Rendering a report: ``report.md`` (table, plot links, notes, a short per-sample summary), ``report.csv``
(the table at full precision) and ``report.html`` (one self-contained page: plots embedded as PNG data, the
style sheet ``report.css`` and the sorting script ``report.js`` of this package inlined)."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from reporting.plots import Figure
from reporting.samples import CHANGE, SampleView, biggest_drops, index_key
from reporting.table import ARROW_NOTE, Column, best_values, display_path, format_value
from run_folder import write_atomic

#: Samples listed per run in report.md's per-sample summary.
MD_SAMPLES = 5
#: Above this many per-sample sections, only the first is open.
OPEN_SAMPLE_SECTIONS = 3
#: The files report.html is made of, next to this module (package data).
STYLE_FILE, SCRIPT_FILE = "report.css", "report.js"


@dataclass
class Report:
    """Everything the renderers need. ``notes``: about the report as a whole (shown after the table);
    ``sample_notes``: runs the per-sample view could not compare."""

    title: str
    generated: str
    folders: list[str]
    columns: list[Column]
    rows: list[dict[str, Any]]
    figures: list[Figure] = field(default_factory=list)
    samples: list[SampleView] = field(default_factory=list)
    sample_notes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    best: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def _md_cell(text: Any) -> str:
    """Text for a markdown table cell: pipes and backslashes escaped, HTML tags shown literally."""
    text = str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _shorten(text: Any, limit: int = 80) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell_text(col: Column, value: Any) -> str:
    """A cell as text: a shorter path, blank for a hyperparameter the run does not have, else formatted."""
    if col.kind == "path":
        return display_path(value)
    if col.kind == "param" and value is None:
        return ""
    return format_value(value)


def _best_line(name: str, best: Mapping[str, Any]) -> str:
    if best.get("step") is None:
        return f"{name}: no evaluation met the constraint {best.get('constraint')!s} (metric {best.get('metric')!s})"
    constraint = f", constraint {best['constraint']}" if best.get("constraint") else ""
    return (f"{name}: step {best.get('step')} ({best.get('checkpoint')!s}), {best.get('metric')!s} = "
            f"{format_value(best.get('value'))}{constraint}")


def _view_title(view: SampleView) -> str:
    return f"{view.run}: {view.bench}"


def render_markdown(report: Report) -> str:
    """report.md: the table, the plots as image links, notes and a short per-sample summary."""
    lines = [f"# {report.title}", "", f"Generated {report.generated} from:", ""]
    lines += [f"- `{folder}`" for folder in report.folders]
    lines += ["", "## Runs", ""]
    lines.append("| " + " | ".join(_md_cell(c.header) for c in report.columns) + " |")
    lines.append("|" + "|".join("---" for _ in report.columns) + "|")
    for row in report.rows:
        lines.append("| " + " | ".join(_md_cell(_cell_text(c, row.get(c.key))) for c in report.columns) + " |")
    lines += ["", ARROW_NOTE, ""]
    if report.notes:
        lines += [f"- {note}" for note in report.notes] + [""]
    if report.best:
        lines += ["## Best checkpoints", ""] + [f"- {_best_line(n, b)}" for n, b in report.best] + [""]
    lines += ["## Plots", ""]
    for fig in report.figures:
        if fig.path is not None:
            lines += [f"### {fig.title}", "", f"![{fig.title}]({fig.path.name})", "", fig.caption, ""]
        lines += [f"- {note}" for note in fig.notes]
        if fig.notes:
            lines.append("")
    if report.samples or report.sample_notes:
        lines += ["## Forget set, sample by sample", ""]
        lines.append(f"Per run and benchmark, the {MD_SAMPLES} samples whose first sample metric fell the most "
                     "(the full table is in report.html).")
        lines.append("")
        for view in report.samples:
            labels = {c.key: c.label for c in view.columns}
            keys = ["index", *(["question"] if "question" in labels else []), f"{view.metric}:before",
                    f"{view.metric}:after", CHANGE]
            lines += [f"### {_view_title(view)} (before: {view.target})", "",
                      "| " + " | ".join(_md_cell(labels[k]) for k in keys) + " |",
                      "|" + "|".join("---" for _ in keys) + "|"]
            for row in biggest_drops(view.rows, MD_SAMPLES):
                cells = [_shorten(row[k]) if k == "question" else row[k] if k == "index" else format_value(row[k])
                         for k in keys]
                lines.append("| " + " | ".join(_md_cell(v) for v in cells) + " |")
            lines.append("")
        lines += [f"- {note}" for note in report.sample_notes]
    return "\n".join(lines).rstrip() + "\n"


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def render_csv(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> str:
    """report.csv: the table's columns (plain labels), full-precision numbers, empty for null."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([c.label for c in columns])
    for row in rows:
        writer.writerow([_csv_value(row.get(c.key)) for c in columns])
    return buf.getvalue()


def package_text(name: str) -> str:
    """A text file of this package (``report.css``, ``report.js``)."""
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _td(value: Any, text: str | None = None, strong: bool = False) -> str:
    """A table cell: numbers right-aligned with their full value in ``data-v`` (for sorting)."""
    shown = _e(format_value(value) if text is None else text)
    if strong:
        shown = f"<strong>{shown}</strong>"
    if value is None or isinstance(value, float) and not math.isfinite(value):
        return f'<td class="num" data-na="1">{shown}</td>'
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num" data-v="{value!r}">{shown}</td>'
    return f'<td class="text">{shown}</td>'


def _html_table(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> str:
    best = best_values(columns, rows)
    head = "".join(f'<th data-key="{_e(c.key)}" scope="col">{_e(c.header)}</th>' for c in columns)
    body = []
    for row in rows:
        cells = []
        for col in columns:
            value = row.get(col.key)
            if col.kind == "path":
                cells.append(f'<td class="text"><code>{_e(display_path(value))}</code></td>')
            elif col.kind == "metric" or col.kind == "param":
                strong = col.key in best and row.get("role") == "run" and value == best[col.key]
                cells.append(_td(value, _cell_text(col, value), strong=strong))
            elif col.kind == "cost":
                cells.append(_td(value))
            else:
                cells.append(f'<td class="text">{_e(format_value(value))}</td>')
        body.append(f'<tr class="{_e(row.get("role"))}">' + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="sortable" id="runs"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _html_samples(view: SampleView, number: int, open_: bool) -> str:
    head = "".join(f'<th data-key="{_e(c.key)}" scope="col">{_e(c.label)}</th>' for c in view.columns)
    body = []
    for row in view.rows:
        cells = []
        for col in view.columns:
            value = row.get(col.key)
            if col.key == "index":
                cells.append(_td(int(value) if index_key(value)[0] == 0 else value, str(value)))
            elif col.numeric:
                cells.append(_td(value))
            elif value is None:
                cells.append('<td class="text" data-na="1">n/a</td>')
            else:
                cells.append(f'<td class="text">{_e(value)}</td>')
        body.append(f'<tr data-index="{_e(row["index"])}">' + "".join(cells) + "</tr>")
    return (f'<details{" open" if open_ else ""}><summary>{_e(_view_title(view))}: {len(view.rows)} samples '
            f'(before = {_e(view.target)}; change = {_e(view.ranked_by)} after − before)</summary><div class="scroll">'
            f'<table class="sortable samples" id="samples-{number}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div></details>')


def render_html(report: Report) -> str:
    """report.html: self-contained (plots as embedded PNG data, inline style and script, no external file)."""
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(report.title)}</title>", '<link rel="icon" href="data:,">',
        f"<style>\n{package_text(STYLE_FILE)}</style></head><body>",
        f"<h1>{_e(report.title)}</h1>", f'<p class="meta">Generated {_e(report.generated)}</p>',
        "<h2>Input folders</h2><ul>" + "".join(f"<li><code>{_e(f)}</code></li>" for f in report.folders) + "</ul>",
        f"<h2>Runs</h2>{_html_table(report.columns, report.rows)}",
        f'<p class="note">{_e(ARROW_NOTE.replace("`", ""))} Best value among the runs in bold; click a header to sort.</p>',
    ]
    parts += [f'<p class="note">{_e(note.replace("`", ""))}</p>' for note in report.notes]
    if report.best:
        parts.append("<h2>Best checkpoints</h2><ul>"
                     + "".join(f"<li>{_e(_best_line(n, b))}</li>" for n, b in report.best) + "</ul>")
    parts.append("<h2>Plots</h2>")
    for fig in report.figures:
        if fig.path is not None:
            data = base64.b64encode(fig.path.read_bytes()).decode("ascii")
            parts.append(f'<figure id="{_e(fig.key)}"><img src="data:image/png;base64,{data}" alt="{_e(fig.title)}">'
                         f"<figcaption><strong>{_e(fig.title)}.</strong> {_e(fig.caption)}</figcaption></figure>")
        parts += [f'<p class="note">{_e(note)}</p>' for note in fig.notes]
    if report.samples or report.sample_notes:
        parts.append("<h2>Forget set, sample by sample</h2>")
        parts.append('<p class="note">Each sample of the benchmark\'s sample metrics with the target model\'s values '
                     "and answer (before unlearning) and the run's (after); the change is the first sample metric "
                     "after minus before, so the most forgotten samples come first when sorted by it.</p>")
        open_all = len(report.samples) <= OPEN_SAMPLE_SECTIONS
        parts += [_html_samples(v, i, open_all or i == 0) for i, v in enumerate(report.samples)]
        parts += [f'<p class="note">{_e(note)}</p>' for note in report.sample_notes]
    parts.append(f"<script>\n{package_text(SCRIPT_FILE)}</script></body></html>")
    return "\n".join(parts) + "\n"


def write_report(report: Report, out_dir: Path) -> Path:
    """Write report.md, report.csv and report.html into ``out_dir`` (each atomically); the path of the page."""
    write_atomic(out_dir / "report.md", render_markdown(report))
    write_atomic(out_dir / "report.csv", render_csv(report.columns, report.rows))
    write_atomic(out_dir / "report.html", render_html(report))
    return out_dir / "report.html"
