"""The results report over many runs: one table, a few plots and a per-sample view of the forget set.

``src/report.py`` is its command line. The package knows no benchmark: a benchmark is the ``<NAME>`` of its
``<NAME>_SUMMARY.json`` / ``<NAME>_EVAL.json`` files, and what the report draws for it comes from the roles
its evaluation recorded in ``_meta.roles`` (from the benchmark's config; see ``reporting.roles``).

Layers, each importing only those below it. None imports torch; the one exception is the fallback for metric
directions missing from every EVAL file (``table._metric_registry``), which imports ``evals.metrics``:

- ``collect``: finding run folders and reading their files (``Run``, ``find_runs``, ``load_run``);
- ``roles``: target / retain / run, and the benchmark roles read from ``_meta.roles``;
- ``table`` (columns, rows, directions, best values, hyperparameters), ``samples`` (the per-sample view) and
  ``plots`` (matplotlib figures, PNG);
- ``render``: report.md, report.csv and report.html (``report.css`` and ``report.js`` of this package inlined).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

from reporting.collect import ReportError, Run, check_folders, find_runs, folder_kind, load_run
from reporting.plots import (
    Figure,
    LeakCurve,
    leak_curves,
    make_figures,
    tradeoffs,
    trajectories,
    trajectory_panels,
)
from reporting.render import Report, render_csv, render_html, render_markdown, write_report
from reporting.roles import (
    BenchRoles,
    assign_roles,
    bench_roles,
    missing_roles_note,
    same_path,
    sort_runs,
    target_for,
)
from reporting.samples import SampleView, per_sample_rows, sample_views
from reporting.table import (
    COST_NOTE,
    build_table,
    hyperparameters,
    metric_directions,
    table_directions,
    varying_keys,
)

DEFAULT_TITLE = "Unlearning results"


def build_report(runs: Sequence[Run], folders: Sequence[str], out_dir: Path, title: str = DEFAULT_TITLE) -> Report:
    """Table, figures (written into ``out_dir``) and per-sample views of runs with roles assigned."""
    ordered = sort_runs(runs)
    directions = table_directions(ordered)
    columns, rows = build_table(ordered, directions)
    figures = make_figures(ordered, out_dir, directions)
    samples, sample_notes = sample_views(ordered)
    notes = [note for note in [missing_roles_note(ordered)] if note]
    if any(col.kind == "cost" for col in columns):
        notes.append(COST_NOTE)
    generated = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    best = [(r.name, r.best) for r in ordered if r.best]
    return Report(title, generated, list(folders), columns, rows, figures, samples, sample_notes, notes, best)


def make_report(folders: Sequence[str | Path], out: str | Path | None = None, target: str | Path | None = None,
                retain: str | Path | None = None, title: str = DEFAULT_TITLE) -> Path:
    """The whole report: collect the runs under ``folders`` (and the ``target`` / ``retain`` folders), assign
    roles, write report.md, report.csv, report.html and the PNGs into ``out`` (default ``<first
    folder>/report``); returns the path of report.html. Bad input raises ReportError."""
    paths = check_folders(folders)
    extra = [Path(p).expanduser() for p in (target, retain) if p]
    for path in extra:
        if not path.exists():
            raise ReportError(f"{str(path)!r} (given to --target/--retain) does not exist")
    scan = paths + [p.parent if p.is_file() else p for p in extra]
    runs = assign_roles(find_runs(scan), target=target, retain=retain)
    out_dir = Path(out).expanduser() if out else paths[0] / "report"
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportError(f"--out {str(out_dir)!r} is a file; give a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(runs, [str(f) for f in folders], out_dir, title)
    return write_report(report, out_dir)


__all__ = [
    "DEFAULT_TITLE", "BenchRoles", "Figure", "LeakCurve", "Report", "ReportError", "Run", "SampleView", "assign_roles",
    "bench_roles", "build_report", "build_table", "check_folders", "find_runs", "folder_kind", "hyperparameters",
    "leak_curves", "load_run", "make_figures", "make_report", "metric_directions", "missing_roles_note", "per_sample_rows",
    "render_csv", "render_html", "render_markdown", "same_path", "sample_views", "sort_runs", "table_directions",
    "target_for", "trajectories", "trajectory_panels", "tradeoffs", "varying_keys", "write_report",
]
