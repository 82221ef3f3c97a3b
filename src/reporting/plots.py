"""The report's plots (matplotlib, PNG): one trade-off plot per benchmark, the metrics over the training
steps, the loss terms per step, after attacks the attacked metrics, and leak@k against k of sampled answers.

What to draw comes from the benchmarks' roles (``reporting.roles``): a benchmark whose roles name two
headline metrics [utility, forgetting] gets a trade-off plot (``<NAME>_tradeoff.png``); the trajectory
panels are the benchmarks' ``trajectory_metrics``; ``log_axis_metrics`` are drawn on a log axis. A metric
whose result carries a ``leak_at_k`` mapping (k -> leak@k, from n sampled answers per question) gets a plot of
that curve, one line per run (``<NAME>_<metric>_leak_vs_k.png``).
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reporting.collect import Run, as_number, get
from reporting.roles import bench_roles, benchmarks_with_roles, target_for
from run_folder import write_atomic

#: On a log axis, a value of zero (or below) is drawn at this floor.
LOG_FLOOR = 1e-20
#: At most this many runs get a panel in the loss-terms plot.
MAX_LOSS_PANELS = 12
#: Keys of a training-step log entry that are not loss terms.
LOG_BOOKKEEPING = frozenset({"loss", "step", "epoch", "learning_rate", "grad_norm"})

CAPTIONS = {
    "trajectories": (
        "Each panel follows one metric over the unlearning steps, one line per run; the dashed line is the "
        "retain model's value, the level that ideal unlearning would reach and hold."),
    "robustness": (
        "Each panel is one forget metric: per run its clean value and its value under each attack "
        "(quantization, relearning, rephrasing); the dashed line is the retain model's clean value. A bar "
        "that jumps back towards the target's level means the knowledge was hidden, not removed."),
    "loss_terms": (
        "Each panel is one run: the total loss and each of the method's loss terms at every logged step; a "
        "term that keeps falling without levelling off often comes with a collapse of model utility."),
    "leak_at_k": (
        "Each line is one model: leak@k, the chance that at least one of k answers sampled for a question reveals "
        "its answer (averaged over the questions, estimated without bias from the n answers sampled per "
        "question), against k on a log scale. Lower is better on a forget set; a line that climbs with k means "
        "the answer is still there to be drawn by sampling, even where the greedy answer hides it."),
}
#: The field of a metric's result holding its leak@k curve: ``{"<k>": leak@k}``.
LEAK_FIELD = "leak_at_k"


@dataclass
class Figure:
    """A plot of the report (``path`` None when skipped, ``notes`` saying why or what was left out)."""

    key: str
    title: str
    caption: str
    path: Path | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Point:
    """One model in a scatter plot (``clipped``: y was raised to the log-axis floor)."""

    name: str
    method: str
    role: str
    x: float
    y: float
    clipped: bool = False


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain(text: str) -> str:
    """Text for matplotlib with ``$`` taken literally (not as mathtext)."""
    return str(text).replace("$", r"\$")


def file_stem(text: str) -> str:
    """``text`` as a file-name part: anything but letters, digits, ``.``, ``_`` and ``-`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "benchmark"


def _method_styles(methods: Iterable[str]) -> dict[str, tuple[str, str]]:
    markers = ["o", "s", "^", "D", "v", "P", "<", ">", "h", "p", "d", "8"]
    colours = [f"C{i}" for i in range(10)]
    return {m: (markers[i % len(markers)], colours[i % len(colours)]) for i, m in enumerate(sorted(set(methods)))}


def _save_figure(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    write_atomic(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------------------
# trade-off: forgetting against utility, one plot per benchmark
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tradeoff:
    """A trade-off plot: benchmark ``bench``, utility ``x`` against forgetting ``y`` (``log_y``: a log axis)."""

    bench: str
    x: str
    y: str
    log_y: bool


def tradeoffs(runs: Sequence[Run]) -> list[Tradeoff]:
    """Every distinct (utility, forgetting) pair declared by the runs' roles, benchmarks in the order first
    seen (one per benchmark unless its runs were evaluated with different headline metrics)."""
    found: dict[Tradeoff, None] = {}
    for bench in benchmarks_with_roles(runs):
        for run in runs:
            roles = bench_roles(run, bench)
            pair = roles.tradeoff if roles is not None else None
            if pair is not None:
                found.setdefault(Tradeoff(bench, *pair, pair[1] in roles.log_axis_metrics), None)
    return list(found)


def scatter_points(runs: Sequence[Run], bench: str, x_metric: str, y_metric: str,
                   floor: float | None = None) -> tuple[list[Point], list[str], list[str]]:
    """Points (x, y) of the runs whose ``bench`` evaluation records roles and has both metrics; y values at or
    below ``floor`` are raised to it. Returns (points, names clipped to the floor, names left out: a run with
    one of the two metrics null or missing)."""
    points, clipped, left_out = [], [], []
    for run in runs:
        summary = run.summaries.get(bench, {})
        if bench_roles(run, bench) is None or (x_metric not in summary and y_metric not in summary):
            continue
        x, y = summary.get(x_metric), summary.get(y_metric)
        if x is None or y is None:
            left_out.append(run.name)
            continue
        low = floor is not None and y <= floor
        if low:
            clipped.append(run.name)
        points.append(Point(run.name, run.method, run.role, x, floor if low else y, low))
    return points, clipped, left_out


def plot_scatter(points: Sequence[Point], path: Path, xlabel: str, ylabel: str, title: str,
                 log_y: bool = False) -> Path:
    """One marker per point (a colour/marker per method, the target as a black X, the retain model as a star),
    each labelled with its run name; saved as PNG at ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    styles = _method_styles(p.method for p in points if p.role == "run")
    labelled: set[str] = set()
    for p in points:
        if p.role == "target":
            kw = {"marker": "X", "color": "black", "s": 120, "label": "target", "zorder": 4}
        elif p.role == "retain":
            kw = {"marker": "*", "color": "gold", "edgecolors": "black", "s": 220, "label": "retain", "zorder": 4}
        else:
            marker, colour = styles[p.method]
            kw = {"marker": marker, "color": colour, "s": 55, "label": _plain(p.method), "zorder": 3}
        if kw["label"] in labelled:
            kw["label"] = None
        else:
            labelled.add(kw["label"])
        ax.scatter([p.x], [p.y], **kw)
        ax.annotate(_plain(p.name), (p.x, p.y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(_plain(xlabel))
    ax.set_ylabel(_plain(ylabel))
    ax.set_title(_plain(title))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save_figure(fig, path)


def tradeoff_caption(plot: Tradeoff, directions: Mapping[str, bool | None]) -> str:
    """The caption of a trade-off plot, from the metric names and their directions (when known)."""
    scale = " on a log scale" if plot.log_y else ""
    text = f"Each point is one model: {plot.x} (utility kept) across, {plot.y} (forgetting) up{scale}."
    vertical = {True: "up", False: "down"}.get(directions.get(plot.y))
    horizontal = {True: "to the right", False: "to the left"}.get(directions.get(plot.x))
    better = " and ".join(d for d in (vertical, horizontal) if d)
    if better:
        text += f" {better[0].upper()}{better[1:]} is better."
    return (text + " The retain model (star) is the goal, the target (X) is where unlearning starts; one colour "
            "and marker per method.")


def tradeoff_figure(runs: Sequence[Run], out_dir: Path, plot: Tradeoff, key: str,
                    directions: Mapping[str, bool | None]) -> Figure:
    """The trade-off plot ``plot`` as ``<key>.png``, or a note saying why it was skipped."""
    title = f"{plot.bench}: {plot.y} vs {plot.x}"
    figure = Figure(key, title, tradeoff_caption(plot, directions))
    points, clipped, left_out = scatter_points(runs, plot.bench, plot.x, plot.y, LOG_FLOOR if plot.log_y else None)
    if not points:
        nulls = f" (null for: {', '.join(left_out)})" if left_out else ""
        figure.notes.append(f"{title}: skipped, no run has both {plot.x} and {plot.y}{nulls}.")
        return figure
    if clipped:
        figure.notes.append(f"{plot.y} of 0 drawn at {LOG_FLOOR:g} (log scale): {', '.join(clipped)}.")
    if left_out:
        figure.notes.append(f"Left out ({plot.x} or {plot.y} is null): {', '.join(left_out)}.")
    figure.path = plot_scatter(points, out_dir / f"{key}.png", plot.x, plot.y, title, plot.log_y)
    return figure


def tradeoff_figures(runs: Sequence[Run], out_dir: Path, directions: Mapping[str, bool | None]) -> list[Figure]:
    """One trade-off plot per (benchmark, headline pair): ``<NAME>_tradeoff.png`` (a second pair of the same
    benchmark: ``<NAME>_tradeoff_2.png``); a note when no benchmark declares two headline metrics."""
    plots = tradeoffs(runs)
    if not plots:
        if not benchmarks_with_roles(runs):
            return []  # nothing records roles: the note on the missing roles says why
        return [Figure("tradeoff", "Trade-off", "", notes=[
            "Trade-off plot: skipped, no benchmark of these runs declares two headline metrics "
            "(headline_metrics: [utility, forgetting] in its config, recorded in the EVAL file's _meta.roles)."])]
    figures, counts = [], {}
    for plot in plots:
        counts[plot.bench] = counts.get(plot.bench, 0) + 1
        suffix = f"_{counts[plot.bench]}" if counts[plot.bench] > 1 else ""
        figures.append(tradeoff_figure(runs, out_dir, plot, f"{file_stem(plot.bench)}_tradeoff{suffix}", directions))
    return figures


# ---------------------------------------------------------------------------------------------------------
# metrics over the training steps
# ---------------------------------------------------------------------------------------------------------

#: A line of a trajectory panel: (run name, steps, values).
Line = tuple[str, list[float], list[float]]


def trajectory_panels(runs: Sequence[Run]) -> dict[tuple[str, str], bool]:
    """``{(benchmark, metric): log axis}``: the union over the runs' roles of each benchmark's
    ``trajectory_metrics`` (benchmarks in the order first seen, metrics in their config's order)."""
    per_bench: dict[str, dict[str, bool]] = {}
    for bench in benchmarks_with_roles(runs):
        for run in runs:
            roles = bench_roles(run, bench)
            if roles is not None:
                for metric in roles.trajectory_metrics:
                    per_bench.setdefault(bench, {}).setdefault(metric, metric in roles.log_axis_metrics)
    return {(bench, m): log for bench, metrics in per_bench.items() for m, log in metrics.items()}


def trajectories(runs: Sequence[Run]) -> dict[tuple[str, str], list[Line]]:
    """Per (benchmark, trajectory metric), the line of each run evaluated during training whose evaluation of
    that benchmark records roles: from ``eval_history.jsonl``, else from the ``eval_<key>_<metric>`` entries of
    the trainer log. Where the run's target model is known (with roles for the benchmark) and the run was not
    evaluated at step 0, the target's value is step 0 (the model unlearning started from)."""
    panels = trajectory_panels(runs)
    out: dict[tuple[str, str], list[Line]] = {}
    for run in runs:
        series = history_series(run) or train_log_series(run)
        if not series:
            continue
        target = target_for(run, runs) if run.role == "run" else None
        for bench, metric in panels:
            if bench_roles(run, bench) is None:
                continue
            points = sorted(series.get((bench, metric), []))
            if points and points[0][0] > 0 and target is not None and bench_roles(target, bench) is not None:
                start = target.value(bench, metric)
                if start is not None:
                    points.insert(0, (0.0, start))
            if points:
                out.setdefault((bench, metric), []).append((run.name, [s for s, _ in points], [v for _, v in points]))
    return {panel: out[panel] for panel in panels if panel in out}


def history_series(run: Run) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """``{(benchmark, metric): [(step, value), ...]}`` of a run's ``eval_history.jsonl`` (the benchmark: the
    line's ``name``, else the run config's name of its ``evaluator`` key)."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for entry in run.history:
        step, summary = as_number(entry.get("step")), entry.get("summary")
        bench = entry.get("name") or (run.bench_of_key(str(entry["evaluator"])) if entry.get("evaluator") else None)
        if step is None or not isinstance(summary, Mapping) or not bench:
            continue
        for metric, value in summary.items():
            value = as_number(value)
            if value is not None:
                series.setdefault((str(bench), str(metric)), []).append((step, value))
    return series


def train_log_series(run: Run) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """``{(benchmark, metric): [(step, value), ...]}`` of the trainer log's ``eval_<key>_<metric>`` entries, for
    the evaluator keys of the run's own config (``eval.<key>``; a longer key is tried first)."""
    evals = run.config.get("eval")
    keys = sorted((str(k) for k in evals), key=len, reverse=True) if isinstance(evals, Mapping) else []
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    if not keys:
        return series
    for entry in run.train_log:
        step = as_number(entry.get("step"))
        if step is None:
            continue
        for name, value in entry.items():
            value = as_number(value)
            if value is None or not name.startswith("eval_"):
                continue
            rest = name[len("eval_"):]
            key = next((k for k in keys if rest.startswith(f"{k}_")), None)
            if key is not None:
                series.setdefault((run.bench_of_key(key), rest[len(key) + 1:]), []).append((step, value))
    return series


def retain_levels(runs: Sequence[Run], panels: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[tuple[str, float]]]:
    """Per (benchmark, metric), ``(retain run name, final value)`` of every retain model that has it (and roles
    for the benchmark)."""
    out: dict[tuple[str, str], list[tuple[str, float]]] = {}
    for run in runs:
        if run.role != "retain":
            continue
        for bench, metric in panels:
            value = run.value(bench, metric)
            if value is not None and bench_roles(run, bench) is not None:
                out.setdefault((bench, metric), []).append((run.name, value))
    return out


def _panel_grid(count: int, width: float, height: float) -> tuple[Any, list[Any]]:
    """A figure of ``count`` panels, three to a row (the unused places of the last row hidden)."""
    plt = _pyplot()
    ncols = min(3, count)
    nrows = math.ceil(count / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def panel_title(bench: str, metric: str, several_benches: bool) -> str:
    """A trajectory panel's title: the metric, prefixed by its benchmark when there are several."""
    return f"{bench}.{metric}" if several_benches else metric


def plot_trajectories(series: Mapping[tuple[str, str], Sequence[Line]], log_axis: Mapping[tuple[str, str], bool],
                      levels: Mapping[tuple[str, str], Sequence[tuple[str, float]]], path: Path) -> Path:
    """One panel per (benchmark, metric), one line per run against the step, the retain model's value dashed."""
    panels = list(series)
    several = len({bench for bench, _ in panels}) > 1
    fig, axes = _panel_grid(len(panels), 4.6, 3.4)
    for ax, panel in zip(axes, panels):
        log_y = log_axis.get(panel, False)
        for name, steps, values in series[panel]:
            values = [max(v, LOG_FLOOR) for v in values] if log_y else list(values)
            ax.plot(steps, values, marker="o", markersize=3, label=_plain(name))
        for name, value in levels.get(panel, []):
            ax.axhline(max(value, LOG_FLOOR) if log_y else value, linestyle="--", color="grey", linewidth=1,
                       label=_plain(f"retain ({name})" if len(levels[panel]) > 1 else "retain"))
        if log_y:
            ax.set_yscale("log")
        ax.set_title(_plain(panel_title(*panel, several)), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, path)


def trajectory_figure(runs: Sequence[Run], out_dir: Path) -> Figure:
    """``trajectories.png`` over the training runs, or a note saying why it was skipped."""
    fig = Figure("trajectories", "Metrics over unlearning steps", CAPTIONS["trajectories"])
    series = trajectories(runs)  # only training runs have steps; the others are their targets and retain models
    if not series:
        fig.notes.append("Metrics over unlearning steps: skipped, no run has eval_history.jsonl or "
                         "eval_<bench>_<metric> entries in train_log.jsonl for a benchmark whose roles name "
                         "trajectory_metrics.")
        return fig
    log_axis = trajectory_panels(runs)
    fig.path = plot_trajectories(series, log_axis, retain_levels(runs, series), out_dir / "trajectories.png")
    several = len({bench for bench, _ in series}) > 1
    logged = [panel_title(*panel, several) for panel in series if log_axis.get(panel)]
    if logged:
        fig.notes.append(f"Drawn on a log scale (0 at {LOG_FLOOR:g}): {', '.join(logged)}.")
    return fig


# ---------------------------------------------------------------------------------------------------------
# loss terms, attacks
# ---------------------------------------------------------------------------------------------------------


def loss_series(run: Run) -> dict[str, tuple[list[float], list[float]]]:
    """``{term: (steps, values)}`` of a run's training-step log entries: ``loss`` and every loss term (a float
    key other than the bookkeeping ones and the ``eval_`` / ``train_`` entries)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for entry in run.train_log:
        step = as_number(entry.get("step"))
        if step is None or "loss" not in entry:
            continue
        for key, value in entry.items():
            if key == "loss":
                value = as_number(value)
            elif (key in LOG_BOOKKEEPING or key.startswith(("eval_", "train_")) or not isinstance(value, float)):
                continue
            else:
                value = as_number(value)
            if value is not None:
                steps, values = out.setdefault(key, ([], []))
                steps.append(step)
                values.append(value)
    return out


def plot_loss_terms(per_run: Sequence[tuple[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]]],
                    path: Path) -> Path:
    """A grid of panels, one per run, with ``loss`` and each loss term against the step."""
    fig, axes = _panel_grid(len(per_run), 4.6, 3.2)
    for ax, (name, terms) in zip(axes, per_run):
        for term, (steps, values) in terms.items():
            ax.plot(steps, values, linewidth=1.4 if term == "loss" else 1.0, label=_plain(term))
        ax.set_title(_plain(name), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, path)


def robustness_bars(runs: Sequence[Run]) -> dict[str, list[tuple[str, dict[str, float | None], float | None]]]:
    """Per attacked metric, ``(run name, {"clean": v, "@<attack>": v, ...}, retain model's value)`` of every run
    evaluated with attacks (its ``<NAME>_ROBUSTNESS.json``)."""
    out: dict[str, list[tuple[str, dict[str, float | None], float | None]]] = {}
    for run in runs:
        for bench, table in run.robustness.items():
            for metric, row in table.items():
                if not isinstance(row, Mapping):
                    continue
                values = {"clean": as_number(row.get("clean"))}
                values.update({f"@{tag}": as_number(v) for tag, v in (row.get("attacked") or {}).items()})
                label = metric if len(run.robustness) == 1 else f"{bench}.{metric}"
                out.setdefault(label, []).append((run.name, values, as_number(row.get("retain"))))
    return out


def plot_robustness(bars: Mapping[str, Sequence[tuple[str, Mapping[str, float | None], float | None]]],
                    path: Path) -> Path:
    """One panel per metric: for each run a group of bars, its clean value then each attacked one; the retain
    model's value dashed."""
    metrics = list(bars)
    fig, axes = _panel_grid(len(metrics), 4.8, 3.4)
    for ax, metric in zip(axes, metrics):
        rows = bars[metric]
        kinds = list(dict.fromkeys(k for _, values, _ in rows for k in values))
        width = 0.8 / max(len(kinds), 1)
        for k, kind in enumerate(kinds):
            heights = [values.get(kind) for _, values, _ in rows]
            ax.bar([i + k * width for i in range(len(rows))], [h if h is not None else 0.0 for h in heights],
                   width, label=_plain(kind))
        retain = [r for _, _, r in rows if r is not None]
        if retain:
            ax.axhline(retain[0], linestyle="--", color="grey", linewidth=1, label="retain")
        ax.set_xticks([i + width * (len(kinds) - 1) / 2 for i in range(len(rows))])
        ax.set_xticklabels([_plain(name) for name, _, _ in rows], fontsize=7, rotation=15)
        ax.set_title(_plain(metric), fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------
# leak@k of sampled answers against k
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeakCurve:
    """One run's leak@k curve of a metric: ``ks`` ascending, ``values`` their leak@k; ``samples`` (n answers
    per question) and ``scorer`` (what counts as a leak) as the result records them (None when it does not)."""

    name: str
    method: str
    role: str
    ks: tuple[int, ...]
    values: tuple[float, ...]
    samples: int | None
    scorer: str | None


def _leak_points(curve: Mapping[str, Any]) -> list[tuple[int, float]]:
    """``(k, leak@k)`` of a ``leak_at_k`` mapping, k ascending; keys that are not positive integers and values
    that are not numbers are left out."""
    points = []
    for key, value in curve.items():
        number = as_number(value)
        if str(key).isdigit() and int(key) > 0 and number is not None:
            points.append((int(key), number))
    return sorted(points)


def _scorer_text(scorer: Any) -> str | None:
    """The result's ``scorer`` mapping as ``key=value`` text (None when it is not a mapping)."""
    if not isinstance(scorer, Mapping):
        return None
    return ", ".join(f"{k}={v}" for k, v in scorer.items())


def leak_curves(runs: Sequence[Run]) -> dict[tuple[str, str], list[LeakCurve]]:
    """Per (benchmark, metric), the leak@k curve of every run whose final ``<benchmark>_EVAL.json`` has that
    metric with a ``leak_at_k`` mapping (benchmarks and metrics in the order first seen, runs in ``runs``'
    order); a run without one is simply not in it."""
    out: dict[tuple[str, str], list[LeakCurve]] = {}
    for run in runs:
        for bench in run.eval_paths:
            eval_log = run.eval_log(bench, cache=False)
            for metric, entry in (eval_log or {}).items():
                curve = get(entry, LEAK_FIELD)
                if not isinstance(curve, Mapping):
                    continue
                points = _leak_points(curve)
                if not points:
                    continue
                samples = as_number(get(entry, "num_samples"))
                out.setdefault((bench, str(metric)), []).append(LeakCurve(
                    run.name, run.method, run.role, tuple(k for k, _ in points), tuple(v for _, v in points),
                    int(samples) if samples is not None else None, _scorer_text(get(entry, "scorer"))))
    return out


def plot_leak_curves(curves: Sequence[LeakCurve], path: Path, title: str) -> Path:
    """leak@k against k (log2 axis, a tick at every k), one line per run: the target in black with X markers,
    the retain model in gold with stars, the runs in their method's colour and marker (another line style
    for each further run of a method), labelled with the run name; y from 0 to 1."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    styles = _method_styles(c.method for c in curves if c.role == "run")
    line_styles = ["-", "--", ":", "-."]
    seen: dict[str, int] = {}
    for c in curves:
        if c.role == "target":
            kw = {"marker": "X", "color": "black", "markersize": 8, "linestyle": "-"}
        elif c.role == "retain":
            kw = {"marker": "*", "color": "gold", "markeredgecolor": "black", "markersize": 11, "linestyle": "-"}
        else:
            marker, colour = styles[c.method]
            count = seen[c.method] = seen.get(c.method, -1) + 1
            kw = {"marker": marker, "color": colour, "markersize": 5, "linestyle": line_styles[count % len(line_styles)]}
        ax.plot(c.ks, c.values, label=_plain(c.name), clip_on=False, zorder=3, **kw)
    ks = sorted({k for c in curves for k in c.ks})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()
    margin = 1.15 if len(ks) > 1 else 2.0
    ax.set_xlim(ks[0] / margin, ks[-1] * margin)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("k (sampled answers)")
    ax.set_ylabel("leak@k")
    ax.set_title(_plain(title))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save_figure(fig, path)


def leak_figures(runs: Sequence[Run], out_dir: Path) -> list[Figure]:
    """One plot per (benchmark, metric) with a leak@k curve (``leak_curves``): ``<NAME>_<metric>_leak_vs_k.png``;
    nothing (and no note) when no run has one. A note names the runs whose number of samples or scorer differs
    from the others' (their curves are not measured alike)."""
    figures: list[Figure] = []
    taken: set[str] = set()
    for (bench, metric), curves in leak_curves(runs).items():
        key = base = f"{file_stem(bench)}_{file_stem(metric)}_leak_vs_k"
        number = 2
        while key in taken:
            key, number = f"{base}_{number}", number + 1
        taken.add(key)
        title = f"{bench}: {metric}, leak@k against k"
        caption = CAPTIONS["leak_at_k"]
        samples = {c.samples for c in curves if c.samples is not None}
        scorers = {c.scorer for c in curves if c.scorer is not None}
        if len(samples) == 1:
            caption += f" n = {samples.pop()} answers per question."
        if len(scorers) == 1:
            caption += f" What counts as a leak: {scorers.pop()}."
        figure = Figure(key, title, caption)
        for what, values in (("number of samples", {c.name: c.samples for c in curves}),
                             ("scorer", {c.name: c.scorer for c in curves})):
            if len(set(values.values())) > 1:
                listed = "; ".join(f"{name}: {value}" for name, value in values.items())
                figure.notes.append(f"{title}: the runs differ in their {what} ({listed}).")
        figure.path = plot_leak_curves(curves, out_dir / f"{key}.png", title)
        figures.append(figure)
    return figures


def make_figures(runs: Sequence[Run], out_dir: Path,
                 directions: Mapping[str, bool | None] | None = None) -> list[Figure]:
    """Draw every plot that has data into ``out_dir``; a plot without data comes back with a note instead.
    ``directions`` (metric -> higher is better) only words the trade-off captions."""
    figures = tradeoff_figures(runs, out_dir, directions or {})
    figures.append(trajectory_figure(runs, out_dir))

    fig = Figure("loss_terms", "Loss terms per step", CAPTIONS["loss_terms"])
    per_run = [(r.name, terms) for r in runs if r.kind == "train" for terms in [loss_series(r)] if terms]
    if per_run:
        if len(per_run) > MAX_LOSS_PANELS:
            cut = [name for name, _ in per_run[MAX_LOSS_PANELS:]]
            fig.notes.append(f"Only the first {MAX_LOSS_PANELS} runs are drawn; left out: {', '.join(cut)}.")
            per_run = per_run[:MAX_LOSS_PANELS]
        fig.path = plot_loss_terms(per_run, out_dir / "loss_terms.png")
    else:
        fig.notes.append("Loss terms per step: skipped, no run has training steps in train_log.jsonl.")
    figures.append(fig)

    bars = robustness_bars(runs)
    if bars:  # only when some evaluation ran attacks (no note otherwise: attacks are optional)
        fig = Figure("robustness", "Forget metrics under attack", CAPTIONS["robustness"])
        fig.path = plot_robustness(bars, out_dir / "robustness.png")
        figures.append(fig)
    figures += leak_figures(runs, out_dir)  # only for metrics with a leak@k curve (no note otherwise)
    return figures

