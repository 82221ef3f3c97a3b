"""The results table: one row per run with its hyperparameters and every summary metric, the metrics'
directions (from the EVAL files' ``_meta.higher_is_better``) and the best value of each metric column."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reporting.collect import Run
from reporting.roles import sort_runs

log = logging.getLogger("report")

#: Implementation options (``trainer.arguments``) that runs saved before they moved to ``trainer.args`` recorded
#: among ``trainer.method_args``: they change how a method is computed, not what it computes.
IMPLEMENTATION_KNOBS = frozenset({"nll_impl", "pack_rows", "joint_forward", "precompute_ref_log_probs"})

ARROWS = {True: "↑", False: "↓", None: ""}
ARROW_NOTE = ("↑ / ↓ after a metric: a higher / lower value is the direction of more forgetting / better "
              "utility (from the EVAL files' `_meta.higher_is_better`); no arrow: the metric has no fixed "
              "direction (its goal is, for example, the retain model's value) or it is not known.")


#: The cost columns (when any run records its cost): key in the row, label, and the value from a run's
#: ``compute.total`` record (``core.compute.PhaseCost`` as JSON).
COST_COLUMNS = (
    ("cost.wall_s", "wall (s)", lambda c: c["wall_s"]),
    ("cost.device_hours", "device-hours", lambda c: c["device_hours"]),
    ("cost.peak_memory_gib", "peak memory (GiB)",
     lambda c: max(c["peak_memory_bytes"].values()) / 2**30 if c["peak_memory_bytes"] else None),
    ("cost.tokens", "tokens", lambda c: c["tokens"]),
    ("cost.flops", "FLOPs", lambda c: c["flops"]),
)
COST_NOTE = ("wall (s) ... FLOPs: what each whole run cost (`compute.total` of its run_complete.json): elapsed "
             "time, devices x wall hours, the largest peak memory of a device (CUDA memory allocated; on a CPU "
             "the process's peak resident memory), the tokens fed to the model and the estimated FLOPs (6 N per "
             "training token, 2 N per forward-only token, N the model's parameters without embedding tables); "
             "see docs/report.md.")


@dataclass(frozen=True)
class Column:
    """A column of the results table. ``kind``: info, param, metric, cost or path; ``direction``: higher is
    better (True), lower (False) or unknown (None), for metrics."""

    key: str
    label: str
    kind: str
    bench: str | None = None
    metric: str | None = None
    direction: bool | None = None

    @property
    def header(self) -> str:
        """The label with the direction arrow of a metric."""
        arrow = ARROWS[self.direction] if self.kind == "metric" else ""
        return f"{self.label} {arrow}" if arrow else self.label


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def hyperparameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """A training run's hyperparameters: ``trainer.method_args`` (nested keys joined by dots) without the
    implementation knobs, then learning_rate, max_steps (when > 0) or num_train_epochs, and the effective
    batch size (per-device batch size x gradient accumulation steps). Empty for a config without trainer."""
    trainer = config.get("trainer")
    if not isinstance(trainer, Mapping):
        return {}
    method_args = trainer.get("method_args") or {}
    out = {k: v for k, v in _flatten(method_args).items() if k.split(".")[0] not in IMPLEMENTATION_KNOBS} \
        if isinstance(method_args, Mapping) else {}
    args = trainer.get("args") or {}
    if not isinstance(args, Mapping):
        return out
    out["learning_rate"] = args.get("learning_rate")
    max_steps = args.get("max_steps")
    if isinstance(max_steps, int) and not isinstance(max_steps, bool) and max_steps > 0:
        out["max_steps"] = max_steps
    else:
        out["num_train_epochs"] = args.get("num_train_epochs")
    batch, accumulation = args.get("per_device_train_batch_size"), args.get("gradient_accumulation_steps", 1)
    if isinstance(batch, int) and isinstance(accumulation, int):
        out["effective_batch_size"] = batch * accumulation
    return out


_MISSING = object()


def varying_keys(params: Sequence[Mapping[str, Any]], always: Iterable[str] = ("learning_rate",)) -> list[str]:
    """The keys whose value is not the same in every mapping (missing counts as a value), plus ``always``
    (when any mapping has it), in first-seen order."""
    order: list[str] = []
    for p in params:
        order += [k for k in p if k not in order]
    always = set(always)
    out = []
    for key in order:
        values = [p.get(key, _MISSING) for p in params]
        first = values[0]
        if key in always or any(v is not first and v != first for v in values[1:]):
            out.append(key)
    return out


def metric_directions(metrics: Iterable[str], metas: Iterable[Mapping[str, Any] | None],
                      registry: Mapping[str, Any] | None = None) -> dict[str, bool | None]:
    """Whether a higher value of each metric is better: from the first EVAL ``_meta.higher_is_better`` that
    names it (``metas`` is consumed only until every metric is found), else from ``registry`` (a
    ``{name: spec with .higher_is_better}``, by default ``evals.metrics.METRIC_REGISTRY``, used for summary
    names that are registered metric names), else None (unknown)."""
    wanted = list(dict.fromkeys(metrics))
    found: dict[str, bool | None] = {}
    missing = set(wanted)
    for meta in metas if missing else ():
        directions = meta.get("higher_is_better") if isinstance(meta, Mapping) else None
        if isinstance(directions, Mapping):
            for name in [n for n in missing if n in directions]:
                value = directions[name]
                found[name] = value if isinstance(value, bool) else None
                missing.discard(name)
        if not missing:
            break
    if missing:
        if registry is None:
            registry = _metric_registry()
        for name in missing:
            spec = registry.get(name)
            value = getattr(spec, "higher_is_better", None)
            found[name] = value if isinstance(value, bool) else None
    return {name: found.get(name) for name in wanted}


def _metric_registry() -> Mapping[str, Any]:
    """The metric registry of src/evals (imported only when an EVAL file lacks the directions: it pulls in
    torch, which the report otherwise never loads)."""
    src = str(Path(__file__).resolve().parent.parent)
    if src not in sys.path:
        sys.path.insert(0, src)
    try:
        from evals.metrics import METRIC_REGISTRY
    except Exception as e:  # noqa: BLE001  (a broken import must not stop the report)
        log.warning("report: cannot import evals.metrics (%s); metric directions are unknown", e)
        return {}
    return METRIC_REGISTRY


def eval_metas(runs: Iterable[Run]) -> Iterator[dict[str, Any] | None]:
    """The ``_meta`` of every EVAL file of the runs, each file read only when the iterator gets to it."""
    for run in runs:
        for bench in run.eval_paths:
            yield run.eval_meta(bench)


def metric_columns(runs: Sequence[Run]) -> list[tuple[str, str]]:
    """(benchmark, metric) of every summary metric: the union over runs, in the order first seen."""
    seen: dict[tuple[str, str], None] = {}
    for run in runs:
        for bench, summary in run.summaries.items():
            for metric in summary:
                seen.setdefault((bench, metric), None)
    return list(seen)


def attack_gaps(metrics: Sequence[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """``(benchmark, attacked metric, its clean metric)`` of every ``<metric>@<attack>`` column whose clean metric
    is a column too: the report shows the gap, attacked minus clean, beside them."""
    present = set(metrics)
    return [(bench, metric, metric.split("@", 1)[0]) for bench, metric in metrics
            if "@" in metric and (bench, metric.split("@", 1)[0]) in present]


def gap(attacked: Any, clean: Any) -> float | None:
    """``attacked - clean``, or None when either is not a number: how far an attack moved a metric (towards the
    target's value, for a forget metric, when the knowledge was hidden rather than removed)."""
    numbers = [v for v in (attacked, clean) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return float(attacked) - float(clean) if len(numbers) == 2 else None


def table_directions(runs: Sequence[Run]) -> dict[str, bool | None]:
    """The direction of every summary metric of the runs (:func:`metric_directions`)."""
    return metric_directions([m for _, m in metric_columns(runs)], eval_metas(runs))


def build_table(runs: Sequence[Run], directions: Mapping[str, bool | None] | None = None
                ) -> tuple[list[Column], list[dict[str, Any]]]:
    """The results table: columns and one row of raw values (``{column key: value}``) per run, in report
    order (``roles.sort_runs``). ``directions``: per metric name; by default :func:`table_directions`."""
    runs = sort_runs(runs)
    metrics = metric_columns(runs)
    if directions is None:
        directions = table_directions(runs)
    several_benches = len({bench for bench, _ in metrics}) > 1
    params = {id(run): hyperparameters(run.config) for run in runs}
    trained = [params[id(run)] for run in runs if run.kind == "train"]
    param_keys = varying_keys(trained) if trained else []
    columns = [Column("name", "name", "info"), Column("role", "role", "info"), Column("method", "method", "info")]
    columns += [Column(f"hp.{key}", key, "param") for key in param_keys]
    columns.append(Column("forget_split", "forget split", "info"))
    gaps = attack_gaps(metrics)
    clean_of = {(bench, metric): clean for bench, metric, clean in gaps}
    for bench, metric in metrics:
        label = f"{bench}.{metric}" if several_benches else metric
        columns.append(Column(f"m.{bench}.{metric}", label, "metric", bench, metric, directions.get(metric)))
        if (bench, metric) in clean_of:  # its gap, better the way its metric is (a forget metric: lower)
            columns.append(Column(f"gap.{bench}.{metric}", f"{label} gap", "metric", bench, metric,
                                  directions.get(clean_of[bench, metric])))
    costs = any(run.cost is not None for run in runs)
    if costs:
        columns += [Column(key, label, "cost") for key, label, _ in COST_COLUMNS]
    columns.append(Column("path", "path", "path"))
    rows = []
    for run in runs:
        row: dict[str, Any] = {"name": run.name, "role": run.role, "method": run.method,
                               "forget_split": run.forget_split, "path": str(run.path.resolve())}
        for key in param_keys:
            row[f"hp.{key}"] = params[id(run)].get(key)
        for bench, metric in metrics:
            row[f"m.{bench}.{metric}"] = run.value(bench, metric)
        for bench, metric, clean in gaps:
            row[f"gap.{bench}.{metric}"] = gap(run.value(bench, metric), run.value(bench, clean))
        if costs:
            row.update(cost_values(run.cost))
        rows.append(row)
    return columns, rows


def cost_values(cost: Mapping[str, Any] | None) -> dict[str, Any]:
    """The cost columns' values of a run's ``compute.total`` record (None each without one)."""
    return {key: None if cost is None else value(cost) for key, _, value in COST_COLUMNS}


def format_value(value: Any) -> str:
    """A table cell: 4 significant digits for floats, ``n/a`` for null / NaN."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "n/a"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def display_path(path: str) -> str:
    """A path relative to the working folder when it lies below it, else as given."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def best_values(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per metric column with a known direction, the best value among the non-reference runs (two or more)."""
    out = {}
    for col in columns:
        if col.kind != "metric" or col.direction is None:
            continue
        values = [row[col.key] for row in rows if row.get("role") == "run" and isinstance(row.get(col.key), float)]
        if len(values) >= 2:
            out[col.key] = max(values) if col.direction else min(values)
    return out
