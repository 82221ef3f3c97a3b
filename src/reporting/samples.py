"""The per-sample view: each sample of a benchmark's ``sample_metrics`` (``_meta.roles``), the unlearned run's
values next to its target model's (before unlearning), ranked by the change of the first sample metric.

A sample metric's ``value_by_index`` maps a sample index to its per-sample values; the field shown is the one
recorded for it in ``_meta.roles.sample_metrics``. Entries of generation metrics also carry ``input`` (the
question), ``ground_truth`` and ``generation`` (the model's answer): those become text columns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from reporting.collect import Run, as_number, get
from reporting.roles import bench_roles, target_for

#: Per-sample text fields of an entry: (field, column key, column label); ``generation`` is shown twice
#: (the target's answer and the run's).
TEXT_FIELDS = (("input", "question", "question"), ("ground_truth", "ground_truth", "ground truth"))
GENERATION_FIELD = "generation"
#: The key of the ranking column (after - before of the first sample metric).
CHANGE = "change"


@dataclass(frozen=True)
class SampleColumn:
    """A column of a per-sample table: ``numeric`` values are right-aligned and sorted as numbers."""

    key: str
    label: str
    numeric: bool


@dataclass
class SampleView:
    """The per-sample comparison of one unlearned run with its target model on one benchmark; ``metric``
    and ``field``: the first sample metric, whose after - before is the ``change`` column."""

    run: str
    target: str
    bench: str
    columns: list[SampleColumn]
    rows: list[dict[str, Any]]
    metric: str
    field: str

    @property
    def ranked_by(self) -> str:
        """The label of the ranking metric and its field."""
        return metric_label(self.metric, self.field)


def _by_index(eval_log: Mapping[str, Any] | None, metric: str) -> Mapping[str, Any]:
    values = get(eval_log, metric, "value_by_index")
    return values if isinstance(values, Mapping) else {}


def index_key(index: str) -> tuple:
    """Sort key of a sample index: integers by value, then other indexes as text."""
    return (0, int(index), "") if str(index).lstrip("-").isdigit() else (1, 0, str(index))


def metric_label(metric: str, field: str) -> str:
    """A sample metric's column label: the metric and its per-sample field."""
    return f"{metric} ({field})"


def _text_source(entries: Sequence[tuple[str, Mapping[str, Any], Mapping[str, Any]]], field: str) -> str | None:
    """The first sample metric whose entries (after or before) carry ``field``."""
    for metric, after, before in entries:
        if any(isinstance(e, Mapping) and field in e for values in (after, before) for e in values.values()):
            return metric
    return None


def per_sample_rows(after: Mapping[str, Any], before: Mapping[str, Any],
                    sample_metrics: Mapping[str, str] | Sequence[tuple[str, str]]
                    ) -> tuple[list[SampleColumn], list[dict[str, Any]]]:
    """The columns and one row per index of the first sample metric's ``value_by_index`` in the run's EVAL
    (``after``), next to the target's (``before``): index, question, ground truth and both generations (from
    the first sample metric whose entries carry them; left out when none does), each sample metric's field
    before and after, and ``change`` (after - before of the first metric; None when either is missing)."""
    pairs = list(sample_metrics.items()) if isinstance(sample_metrics, Mapping) else list(sample_metrics)
    if not pairs:
        return [], []
    entries = [(m, _by_index(after, m), _by_index(before, m)) for m, _ in pairs]
    columns = [SampleColumn("index", "index", True)]
    text: list[tuple[str, str, str]] = []  # (column key, metric, field)
    for field, key, label in TEXT_FIELDS:
        source = _text_source(entries, field)
        if source is not None:
            columns.append(SampleColumn(key, label, False))
            text.append((key, source, field))
    generation = _text_source(entries, GENERATION_FIELD)
    if generation is not None:
        columns += [SampleColumn("before", "generation before", False),
                    SampleColumn("after", "generation after", False)]
    for metric, field in pairs:
        columns += [SampleColumn(f"{metric}:before", f"{metric_label(metric, field)} before", True),
                    SampleColumn(f"{metric}:after", f"{metric_label(metric, field)} after", True)]
    first, first_field = pairs[0]
    columns.append(SampleColumn(CHANGE, f"change of {metric_label(first, first_field)}, after − before", True))

    values = {m: (a, b) for m, a, b in entries}
    rows = []
    for index in sorted(entries[0][1], key=index_key):
        row: dict[str, Any] = {"index": index}
        for key, metric, field in text:
            a, b = (get(v, index) for v in values[metric])
            row[key] = get(a, field) or get(b, field) or ""
        if generation is not None:
            a, b = (get(v, index) for v in values[generation])
            row["after"], row["before"] = get(a, GENERATION_FIELD), get(b, GENERATION_FIELD)
        for metric, field in pairs:
            a, b = values[metric]
            row[f"{metric}:after"] = as_number(get(a, index, field))
            row[f"{metric}:before"] = as_number(get(b, index, field))
        a, b = row[f"{first}:after"], row[f"{first}:before"]
        row[CHANGE] = a - b if a is not None and b is not None else None
        rows.append(row)
    return columns, rows


def _forget_split_of(run: Run, bench: str) -> str | None:
    split = get(run.eval_meta(bench), "splits", "forget_split")
    return str(split) if split else run.forget_split


def sample_views(runs: Sequence[Run]) -> tuple[list[SampleView], list[str]]:
    """The per-sample view of every unlearned run, for each benchmark whose roles (in the run's final EVAL)
    name sample metrics, against its target model; and notes on the runs that could not be compared."""
    views, notes = [], []
    targets = [r for r in runs if r.role == "target"]
    for run in runs:
        if run.role != "run" or run.mode == "train":
            continue
        for bench in run.eval_paths:
            roles = bench_roles(run, bench)
            if roles is None or not roles.sample_metrics:
                continue
            target = target_for(run, runs) if targets else None
            if target is None or bench not in target.eval_paths:
                notes.append(f"{run.name}: no target model with a {bench} EVAL file to compare with (use --target).")
                continue
            split_run, split_target = _forget_split_of(run, bench), _forget_split_of(target, bench)
            if split_run and split_target and split_run != split_target:
                notes.append(f"{run.name}: evaluated on {split_run}, the target on {split_target}; not compared.")
                continue
            after, before = run.eval_log(bench, cache=False), target.eval_log(bench)
            columns, rows = per_sample_rows(after or {}, before or {}, roles.sample_metrics)
            if rows:
                views.append(SampleView(run.name, target.name, bench, columns, rows, *roles.sample_metrics[0]))
    return views, notes


def biggest_drops(rows: Sequence[Mapping[str, Any]], count: int) -> list[Mapping[str, Any]]:
    """The ``count`` samples whose first sample metric fell the most (most negative change first)."""
    known = [row for row in rows if row.get(CHANGE) is not None]
    return sorted(known, key=lambda row: row[CHANGE])[:count]
