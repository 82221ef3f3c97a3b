"""Roles: which run is the target (the model before unlearning), which the retain model (the goal), and
what each benchmark declares about its metrics.

A benchmark's roles are read from the run's own evaluation: ``_meta.roles`` of its ``<NAME>_EVAL.json``,
written by the evaluator from the benchmark's config (``evals.benchmark.BenchmarkRoles``):
``headline_metrics`` ([utility, forgetting]: the trade-off plot), ``trajectory_metrics`` (followed over
the steps of training), ``log_axis_metrics`` (drawn on a log axis) and ``sample_metrics`` (``{metric:
per-sample field}``: the per-sample view). A training run's roles come from its final evaluation, else from
its latest checkpoint's. A run whose evaluation records no roles (an older version wrote it) is left out of
that benchmark's plots and per-sample view, with a note (:func:`missing_roles_note`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reporting.collect import ReportError, Run, get
from run_folder import EVAL_SUFFIX, RESULT_EVALS_DIR

ROLES = ("target", "retain", "run")
ROLE_ORDER = {role: i for i, role in enumerate(ROLES)}


# ---------------------------------------------------------------------------------------------------------
# what a benchmark declares about its metrics (_meta.roles)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRoles:
    """The roles a benchmark's evaluation recorded in ``_meta.roles`` (read from ``source``).

    ``sample_metrics`` keeps the recorded order: ``((metric, per-sample field), ...)``; the first metric ranks
    the per-sample view."""

    bench: str
    source: Path
    headline_metrics: tuple[str, ...] = ()
    trajectory_metrics: tuple[str, ...] = ()
    log_axis_metrics: tuple[str, ...] = ()
    sample_metrics: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_meta(cls, bench: str, roles: Any, source: Path) -> BenchRoles | None:
        """The roles of ``_meta.roles`` (None when it is not a mapping); entries of the wrong type are ignored."""
        if not isinstance(roles, Mapping):
            return None

        def names(key: str) -> tuple[str, ...]:
            value = roles.get(key)
            return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()

        samples = roles.get("sample_metrics")
        samples = tuple((m, f) for m, f in samples.items() if isinstance(m, str) and isinstance(f, str)) \
            if isinstance(samples, Mapping) else ()
        return cls(bench, source, names("headline_metrics"), names("trajectory_metrics"),
                   names("log_axis_metrics"), samples)

    @property
    def tradeoff(self) -> tuple[str, str] | None:
        """(utility, forgetting) for the trade-off plot: the two headline metrics, None without two."""
        return (self.headline_metrics[0], self.headline_metrics[1]) if len(self.headline_metrics) >= 2 else None


def roles_source(run: Run, bench: str) -> tuple[Path, bool] | None:
    """The EVAL file the run's roles of ``bench`` are read from, and whether it is a checkpoint's: the final
    ``<bench>_EVAL.json``, else (a training run evaluated only during training) the latest checkpoint's."""
    if bench in run.eval_paths:
        return run.eval_paths[bench], False
    if bench in run.checkpoint_eval_paths:
        return run.checkpoint_eval_paths[bench], True
    return None


def bench_roles(run: Run, bench: str) -> BenchRoles | None:
    """The roles of ``bench`` recorded by the run's evaluation (:func:`roles_source`); None without them."""
    source = roles_source(run, bench)
    if source is None:
        return None
    path, checkpoint = source
    return BenchRoles.from_meta(bench, get(run.eval_meta(bench, checkpoint=checkpoint), "roles"), path)


def run_roles(run: Run) -> dict[str, BenchRoles | None]:
    """``{benchmark: its roles, or None}`` for every benchmark of the run."""
    return {bench: bench_roles(run, bench) for bench in run.benchmarks}


def benchmarks_with_roles(runs: Iterable[Run]) -> list[str]:
    """The benchmarks for which some run records roles, in the order first seen."""
    return list(dict.fromkeys(b for run in runs for b, roles in run_roles(run).items() if roles is not None))


def missing_roles(runs: Iterable[Run]) -> list[tuple[Run, str, Path, bool]]:
    """``(run, benchmark, EVAL file, whether the file exists)`` of every benchmark of a run whose evaluation
    records no ``_meta.roles`` (a file written by an older version, or a SUMMARY without its EVAL file)."""
    out = []
    for run in runs:
        for bench, roles in run_roles(run).items():
            if roles is not None:
                continue
            source = roles_source(run, bench)
            if source is not None:
                out.append((run, bench, source[0], True))
            else:
                folder = run.path / RESULT_EVALS_DIR if run.kind == "train" else run.path
                out.append((run, bench, folder / f"{bench}{EVAL_SUFFIX}", False))
    return out


def missing_roles_note(runs: Iterable[Run]) -> str | None:
    """One note naming every evaluation without ``_meta.roles`` and what to do about it (None: no such file)."""
    missing = missing_roles(runs)
    if not missing:
        return None
    files = "; ".join(f"{run.name}: {path}" + ("" if exists else " (missing)") for run, _, path, exists in missing)
    return (f"Left out of the plots and per-sample views (their numbers are in the table): runs whose evaluation "
            f"records no benchmark roles (`_meta.roles` in `<NAME>_EVAL.json`, written since the benchmark configs "
            f"declare them; an older version wrote the file, or it is missing): {files}. Re-run these evaluations "
            f"(src/eval.py, or the training run) to include them.")


# ---------------------------------------------------------------------------------------------------------
# target, retain and run
# ---------------------------------------------------------------------------------------------------------


def norm_path(path: str | Path) -> Path:
    """``path`` made absolute (``~`` expanded) and resolved."""
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def same_path(reference: str | Path, candidate: str | Path) -> bool:
    """Whether two paths name the same file or folder: equal once made absolute and resolved, or, for a
    relative ``reference`` (written from another working folder), equal to the last parts of ``candidate``."""
    if norm_path(reference) == norm_path(candidate):
        return True
    ref = Path(reference).expanduser()
    if ref.is_absolute():
        return False
    parts = [p for p in ref.parts if p not in (".", "")]
    if not parts or ".." in parts:
        return False
    cand = norm_path(candidate).parts
    return len(cand) >= len(parts) and list(cand[-len(parts):]) == parts


def retain_references(run: Run) -> list[str]:
    """The retain-model EVAL files a run's config names (top-level and per-evaluator ``retain_logs_path``)."""
    refs = [run.config.get("retain_logs_path")]
    evals = run.config.get("eval")
    if isinstance(evals, Mapping):
        refs += [get(bench, "retain_logs_path") for bench in evals.values()]
    return sorted({str(r) for r in refs if isinstance(r, str) and r})


def _explicit_match(runs: Sequence[Run], given: str | Path, flag: str) -> list[Run]:
    path = Path(given).expanduser()
    if path.is_file():
        path = path.parent
    matched = [run for run in runs if norm_path(run.path) == norm_path(path)
               or (run.kind == "train" and norm_path(run.path / RESULT_EVALS_DIR) == norm_path(path))]
    if not matched:
        raise ReportError(
            f"{flag} {str(given)!r}: no run was found in that folder (an evaluation folder with "
            f"<NAME>_SUMMARY.json, or a run folder with run_complete.json); collected runs: "
            + ", ".join(str(r.path) for r in runs)
        )
    return matched


def detect_targets(runs: Sequence[Run]) -> list[Run]:
    """Runs (not unlearning runs) whose model is the starting model of an unlearning run."""
    unlearn = [r for r in runs if r.kind == "train" and r.mode == "unlearn"]
    starts = [r.model_in for r in unlearn if r.model_in]
    outputs = [str(r.path) for r in unlearn]
    found = []
    for run in runs:
        if run.mode == "unlearn" or not run.model_out or not run.summaries:
            continue
        if any(same_path(out, run.model_out) for out in outputs):
            continue  # evaluates an unlearned model (e.g. step one of a sequential unlearning)
        if any(same_path(start, run.model_out) or same_path(run.model_out, start) for start in starts):
            found.append(run)
    return found


def detect_retains(runs: Sequence[Run]) -> list[Run]:
    """Runs one of whose EVAL files is named as ``retain_logs_path`` by another run."""
    found = []
    for run in runs:
        refs = [ref for other in runs if other is not run for ref in retain_references(other)]
        if any(same_path(ref, path) for ref in refs for path in run.eval_paths.values()):
            found.append(run)
    return found


def assign_roles(runs: Sequence[Run], target: str | Path | None = None,
                 retain: str | Path | None = None) -> list[Run]:
    """Set each run's ``role`` (``target``, ``retain`` or ``run``) and return the runs in report order.

    ``target`` / ``retain``: a folder (or its EVAL file) chosen by hand; otherwise the roles are detected
    (:func:`detect_targets`, :func:`detect_retains`). A run that is both is the target.
    """
    targets = _explicit_match(runs, target, "--target") if target else detect_targets(runs)
    retains = _explicit_match(runs, retain, "--retain") if retain else detect_retains(runs)
    both = [r for r in targets if target and retain and r in retains]
    if both:
        raise ReportError(f"--target and --retain name the same run ({both[0].path}); give two different folders")
    for run in runs:
        run.role = "target" if run in targets else "retain" if run in retains else "run"
    return sort_runs(runs)


def natural_key(text: str) -> tuple:
    """Sort key comparing the digit runs of ``text`` as numbers (``run_2`` before ``run_10``), case-blind."""
    parts = re.split(r"(\d+)", text.lower())
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p)


def sort_runs(runs: Iterable[Run]) -> list[Run]:
    """Target first, then retain, then the other runs by method and name."""
    def key(run: Run) -> tuple:
        method = run.method.lower() if run.role == "run" else ""
        return ROLE_ORDER.get(run.role, len(ROLES)), method, natural_key(run.name)

    return sorted(runs, key=key)


def target_for(run: Run, runs: Sequence[Run]) -> Run | None:
    """The target model a run started from (same model, preferring the same forget split); without a model
    match, the only target (None when there are several)."""
    targets = [r for r in runs if r.role == "target"]
    matching = [t for t in targets if run.model_in and t.model_out and same_path(run.model_in, t.model_out)]
    pool = matching or targets
    pool = [t for t in pool if t.forget_split == run.forget_split] or pool
    if not pool or (not matching and len(pool) > 1):
        return None
    return pool[0]
