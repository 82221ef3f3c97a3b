"""A results report over many runs: one table, a few plots and a per-sample view of the forget set.

    python src/report.py saves/unlearn saves/eval [--out saves/report] [--target saves/eval/target] \
        [--retain saves/eval/retain90] [--title "forget10 sweep"]

Every folder given is walked recursively. A training or unlearning run of ``src/train.py`` is a folder with
``run_complete.json`` and ``config.yaml`` (its final evaluation under ``evals/``, its trainer log in
``train_log.jsonl``, optionally ``eval_history.jsonl`` and ``best_checkpoint.json``); an evaluation of
``src/eval.py`` is a folder with ``<NAME>_SUMMARY.json`` / ``<NAME>_EVAL.json`` (and usually ``config.yaml``).
Staging folders (``*.incomplete*``, ``*.replaced*``), checkpoints and hidden folders are not runs.

The output folder (``--out``, default ``<first folder>/report``) receives ``report.md``, ``report.csv``,
``report.html`` (self-contained: plots embedded as PNG data, inline CSS and script) and one PNG per plot.
Every file is written atomically. See docs/report.md.
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime
import html
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from run_folder import BEST_CHECKPOINT_FILE as BEST_CHECKPOINT
from run_folder import COMPLETION_MARKER as RUN_MARKER
from run_folder import EVAL_HISTORY_FILE as EVAL_HISTORY
from run_folder import (
    EVAL_SUFFIX,
    RESULT_EVALS_DIR,
    ROBUSTNESS_SUFFIX,
    RUN_CONFIG,
    SUMMARY_SUFFIX,
    write_atomic,
)
from run_folder import TRAIN_LOG_FILE as TRAIN_LOG

log = logging.getLogger("report")

#: ``trainer.method_args`` entries that change how a method is computed, not what it computes.
IMPLEMENTATION_KNOBS = frozenset({"nll_impl", "pack_rows", "joint_forward", "precompute_ref_log_probs"})
#: Keys of a training-step log entry that are not loss terms.
LOG_BOOKKEEPING = frozenset({"loss", "step", "epoch", "learning_rate", "grad_norm"})
#: Folder-name fragments of staging folders (run_folder.py) that never hold a finished result.
STAGING_MARKERS = (".incomplete", ".replaced")

ROLES = ("target", "retain", "run")
ROLE_ORDER = {role: i for i, role in enumerate(ROLES)}
#: Forget quality is a p-value: on a log axis, zero is drawn at this floor.
FQ_FLOOR = 1e-20
#: At most this many runs get a panel in the loss-terms plot.
MAX_LOSS_PANELS = 12
#: Above this many runs, only the first per-sample section is open.
OPEN_SAMPLE_SECTIONS = 3
#: The metrics followed over unlearning steps (those present are drawn), and the ones drawn on a log axis.
TRAJECTORY_METRICS = ("forget_quality", "model_utility", "forget_Q_A_Prob", "forget_Q_A_ROUGE",
                      "forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "privleak")
LOG_AXIS_METRICS = frozenset({"forget_quality"})
#: Evaluator keys tried when a trainer log entry ``eval_<bench>_<metric>`` has no ``eval`` config to go by.
DEFAULT_BENCH_KEYS = ("tofu_full", "tofu", "muse", "lm_eval")
#: Samples listed per run in report.md's per-sample summary.
MD_SAMPLES = 5

ARROWS = {True: "↑", False: "↓", None: ""}
ARROW_NOTE = ("↑ / ↓ after a metric: a higher / lower value is the direction of more forgetting / better "
              "utility (from the EVAL files' `_meta.higher_is_better`); no arrow: the metric has no fixed "
              "direction (e.g. privleak, whose goal is the retain model's value) or it is not known.")


class ReportError(ValueError):
    """Bad input to the report (a missing folder, no runs, an unknown --target...)."""


# ---------------------------------------------------------------------------------------------------------
# reading runs
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One collected run: a training/unlearning run (``kind="train"``) or an evaluation folder (``"eval"``).

    ``summaries`` maps an evaluator name (``TOFU``, ``MUSE``) to its ``<NAME>_SUMMARY.json``; the matching
    ``<NAME>_EVAL.json`` files (``eval_paths``) are read only when asked for (:meth:`eval_log`).
    ``train_log`` is the trainer's log history, ``history`` the lines of ``eval_history.jsonl`` and ``best``
    the ``best_checkpoint.json`` object. ``role`` is set by :func:`assign_roles`.
    """

    path: Path
    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    summaries: dict[str, dict[str, float | None]] = field(default_factory=dict)
    eval_paths: dict[str, Path] = field(default_factory=dict)
    train_log: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    #: ``<NAME>_ROBUSTNESS.json`` of an evaluation with attacks (src/attacks/), by evaluator name
    robustness: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str = ""
    role: str = "run"
    _eval_cache: dict[str, dict | None] = field(default_factory=dict, repr=False, compare=False)
    _meta_cache: dict[str, dict | None] = field(default_factory=dict, repr=False, compare=False)

    def eval_log(self, bench: str, cache: bool = True) -> dict[str, Any] | None:
        """The ``<bench>_EVAL.json`` object, read on first use; None when absent or unreadable."""
        if bench in self._eval_cache:
            return self._eval_cache[bench]
        path = self.eval_paths.get(bench)
        data = _read_json(path) if path is not None else None
        if not isinstance(data, dict):
            data = None
        if data is not None:
            meta = data.get("_meta")
            self._meta_cache[bench] = meta if isinstance(meta, dict) else None
        if cache:
            self._eval_cache[bench] = data
        return data

    def eval_meta(self, bench: str) -> dict[str, Any] | None:
        """The ``_meta`` object of ``<bench>_EVAL.json`` (reads the file once, keeps only ``_meta``)."""
        if bench not in self._meta_cache:
            self.eval_log(bench, cache=False)
            self._meta_cache.setdefault(bench, None)
        return self._meta_cache[bench]

    @property
    def eval_logs(self) -> dict[str, dict[str, Any]]:
        """Every readable EVAL file of the run, by evaluator name (each read on first use)."""
        found = {bench: self.eval_log(bench) for bench in self.eval_paths}
        return {bench: data for bench, data in found.items() if data is not None}

    @property
    def mode(self) -> str:
        """``unlearn``, ``train`` or ``eval`` (from the config; an evaluation folder without one is ``eval``)."""
        mode = self.config.get("mode")
        if isinstance(mode, str) and mode:
            return mode
        return "eval" if self.kind == "eval" else "train"

    @property
    def method(self) -> str:
        """The trainer handler of a training run; ``eval`` for an evaluation folder (``?`` without config)."""
        if self.kind == "eval":
            return "eval" if self.config else "?"
        handler = _get(self.config, "trainer", "handler")
        return str(handler) if handler else "?"

    @property
    def model_in(self) -> str | None:
        """The model the run started from (training) or evaluated (evaluation folder)."""
        value = _get(self.config, "model", "model_args", "pretrained_model_name_or_path")
        return str(value) if value else None

    @property
    def model_out(self) -> str | None:
        """The model the run's numbers describe: a training run's own folder, an evaluation's model."""
        return str(self.path) if self.kind == "train" else self.model_in

    @property
    def forget_split(self) -> str | None:
        """The ``forget_split`` of the run's config (None without one)."""
        value = self.config.get("forget_split")
        return str(value) if value else None

    def metric(self, name: str) -> float | None:
        """The final value of summary metric ``name`` (first evaluator that has it), None when missing."""
        for summary in self.summaries.values():
            if name in summary:
                return summary[name]
        return None

    def has_metric(self, name: str) -> bool:
        """Whether any summary of the run has the metric ``name`` (even as null)."""
        return any(name in summary for summary in self.summaries.values())


def _get(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]...``, None as soon as a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("report: skipping %s: %s", path, e)
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a line that does not parse (a run killed mid-write) is skipped."""
    if not path.is_file():
        return []
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                log.warning("report: %s line %d is not JSON; skipped", path, number)
                continue
            if isinstance(entry, dict):
                out.append(entry)
    return out


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        log.warning("report: cannot read %s (%s); the run is listed without its config", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _as_number(value: Any) -> float | None:
    """A summary value as a float; None for null, NaN, booleans and anything not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_summary(path: Path) -> dict[str, float | None] | None:
    """A ``<NAME>_SUMMARY.json`` as ``{metric: float or None}``; None when it is not a JSON object."""
    data = _read_json(path)
    if not isinstance(data, dict):
        return None
    return {str(k): _as_number(v) for k, v in data.items()}


def folder_kind(filenames: Iterable[str]) -> str | None:
    """``train`` for a finished run of src/train.py, ``eval`` for an evaluation folder, None otherwise."""
    names = set(filenames)
    if RUN_MARKER in names and RUN_CONFIG in names:
        return "train"
    if RUN_MARKER not in names and any(n.endswith(SUMMARY_SUFFIX) and len(n) > len(SUMMARY_SUFFIX)
                                       for n in names):
        return "eval"
    return None


def is_skipped_folder(name: str) -> bool:
    """Folders never searched for runs: staging folders, checkpoints and hidden folders (``.hydra``)."""
    return (name.startswith(".") or name.startswith("checkpoint-")
            or any(marker in name for marker in STAGING_MARKERS))


def load_run(path: Path, kind: str) -> Run:
    """Read one run folder of the given kind (see :func:`folder_kind`)."""
    config = _read_config(path / RUN_CONFIG)
    eval_dir = path / RESULT_EVALS_DIR if kind == "train" else path
    summaries: dict[str, dict[str, float | None]] = {}
    eval_paths: dict[str, Path] = {}
    robustness: dict[str, dict[str, Any]] = {}
    if eval_dir.is_dir():
        for file in sorted(eval_dir.iterdir()):
            if file.name.endswith(SUMMARY_SUFFIX) and file.is_file():
                summary = read_summary(file)
                if summary is not None:
                    summaries[file.name[: -len(SUMMARY_SUFFIX)]] = summary
            elif file.name.endswith(EVAL_SUFFIX) and file.is_file():
                eval_paths[file.name[: -len(EVAL_SUFFIX)]] = file
            elif file.name.endswith(ROBUSTNESS_SUFFIX) and file.is_file():
                found = _read_json(file)
                if isinstance(found, dict):
                    robustness[file.name[: -len(ROBUSTNESS_SUFFIX)]] = found
    best = _read_json(path / BEST_CHECKPOINT) if kind == "train" else None
    task_name = config.get("task_name")
    return Run(
        path=path, kind=kind, config=config, summaries=summaries, eval_paths=eval_paths,
        train_log=_read_jsonl(path / TRAIN_LOG) if kind == "train" else [],
        history=_read_jsonl(path / EVAL_HISTORY) if kind == "train" else [],
        best=best if isinstance(best, dict) else None, robustness=robustness,
        name=str(task_name) if task_name else path.name,
    )


def _walk_runs(folder: Path) -> Iterator[tuple[Path, str]]:
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        kind = folder_kind(filenames)
        if kind is not None:
            yield here, kind
        if kind == "train":
            dirnames[:] = []  # its evals/ and checkpoints belong to the run
        else:
            dirnames[:] = sorted(d for d in dirnames if not is_skipped_folder(d))


def check_folders(folders: Sequence[str | Path]) -> list[Path]:
    """The folders as paths; ReportError naming the first one that does not exist or is not a folder."""
    if not folders:
        raise ReportError("no folder given: name at least one folder to search for runs")
    out = []
    for folder in folders:
        path = Path(folder).expanduser()
        if not path.exists():
            raise ReportError(f"folder {str(folder)!r} does not exist")
        if not path.is_dir():
            raise ReportError(f"{str(folder)!r} is not a folder (give folders that hold runs)")
        out.append(path)
    return out


def find_runs(folders: Sequence[str | Path]) -> list[Run]:
    """Every run under ``folders`` (searched recursively), each folder once, with unique names."""
    from tqdm import tqdm

    found: dict[Path, tuple[Path, str]] = {}
    for folder in check_folders(folders):
        for path, kind in _walk_runs(folder):
            found.setdefault(path.resolve(), (path, kind))
    if not found:
        shown = ", ".join(repr(str(f)) for f in folders)
        raise ReportError(
            f"no run found under {shown}: a run folder holds run_complete.json and config.yaml (src/train.py), "
            "or <NAME>_SUMMARY.json and <NAME>_EVAL.json (src/eval.py)"
        )
    runs = [load_run(path, kind) for path, kind in tqdm(list(found.values()), desc="reading runs", unit="run",
                                                        disable=None)]
    _unique_names(runs)
    return runs


def _unique_names(runs: Sequence[Run]) -> None:
    """Give runs sharing a name the folder name (then a number) as a suffix."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.name] = counts.get(run.name, 0) + 1
    taken: set[str] = set()
    for run in runs:
        name = run.name
        if counts[name] > 1:
            name = f"{name} ({run.path.name})" if run.path.name != name else name
        base, i = name, 2
        while name in taken:
            name, i = f"{base} #{i}", i + 1
        taken.add(name)
        run.name = name


# ---------------------------------------------------------------------------------------------------------
# roles
# ---------------------------------------------------------------------------------------------------------


def _norm_path(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def same_path(reference: str | Path, candidate: str | Path) -> bool:
    """Whether two paths name the same file or folder: equal once made absolute and resolved, or, for a
    relative ``reference`` (written from another working folder), equal to the last parts of ``candidate``."""
    if _norm_path(reference) == _norm_path(candidate):
        return True
    ref = Path(reference).expanduser()
    if ref.is_absolute():
        return False
    parts = [p for p in ref.parts if p not in (".", "")]
    if not parts or ".." in parts:
        return False
    cand = _norm_path(candidate).parts
    return len(cand) >= len(parts) and list(cand[-len(parts):]) == parts


def retain_references(run: Run) -> list[str]:
    """The retain-model EVAL files a run's config names (top-level and per-evaluator ``retain_logs_path``)."""
    refs = [run.config.get("retain_logs_path")]
    evals = run.config.get("eval")
    if isinstance(evals, Mapping):
        refs += [_get(bench, "retain_logs_path") for bench in evals.values()]
    return sorted({str(r) for r in refs if isinstance(r, str) and r})


def _explicit_match(runs: Sequence[Run], given: str | Path, flag: str) -> list[Run]:
    path = Path(given).expanduser()
    if path.is_file():
        path = path.parent
    matched = [run for run in runs if _norm_path(run.path) == _norm_path(path)
               or (run.kind == "train" and _norm_path(run.path / RESULT_EVALS_DIR) == _norm_path(path))]
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


def retain_for(run: Run, runs: Sequence[Run]) -> Run | None:
    """The retain model a run was compared with (its ``retain_logs_path``), else the only retain model."""
    retains = [r for r in runs if r.role == "retain"]
    refs = retain_references(run)
    matching = [r for r in retains if any(same_path(ref, p) for ref in refs for p in r.eval_paths.values())]
    if matching:
        return matching[0]
    return retains[0] if len(retains) == 1 else None


# ---------------------------------------------------------------------------------------------------------
# table
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A column of the results table. ``kind``: info, param, metric or path; ``direction``: higher is
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
    """The metric registry of src/evals (imported only when an EVAL file lacks the directions)."""
    src = os.path.dirname(os.path.abspath(__file__))
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
    """(evaluator, metric) of every summary metric: the union over runs, in the order first seen."""
    seen: dict[tuple[str, str], None] = {}
    for run in runs:
        for bench, summary in run.summaries.items():
            for metric in summary:
                seen.setdefault((bench, metric), None)
    return list(seen)


def build_table(runs: Sequence[Run], directions: Mapping[str, bool | None] | None = None
                ) -> tuple[list[Column], list[dict[str, Any]]]:
    """The results table: columns and one row of raw values (``{column key: value}``) per run, in report
    order (:func:`sort_runs`). ``directions``: per metric name; by default read with :func:`metric_directions`."""
    runs = sort_runs(runs)
    metrics = metric_columns(runs)
    if directions is None:
        directions = metric_directions([m for _, m in metrics], eval_metas(runs))
    several_benches = len({bench for bench, _ in metrics}) > 1
    params = {id(run): hyperparameters(run.config) for run in runs}
    trained = [params[id(run)] for run in runs if run.kind == "train"]
    param_keys = varying_keys(trained) if trained else []
    columns = [Column("name", "name", "info"), Column("role", "role", "info"), Column("method", "method", "info")]
    columns += [Column(f"hp.{key}", key, "param") for key in param_keys]
    columns.append(Column("forget_split", "forget split", "info"))
    for bench, metric in metrics:
        label = f"{bench}.{metric}" if several_benches else metric
        columns.append(Column(f"m.{bench}.{metric}", label, "metric", bench, metric, directions.get(metric)))
    columns.append(Column("path", "path", "path"))
    rows = []
    for run in runs:
        row: dict[str, Any] = {"name": run.name, "role": run.role, "method": run.method,
                               "forget_split": run.forget_split, "path": str(run.path.resolve())}
        for key in param_keys:
            row[f"hp.{key}"] = params[id(run)].get(key)
        for bench, metric in metrics:
            row[f"m.{bench}.{metric}"] = run.summaries.get(bench, {}).get(metric)
        rows.append(row)
    return columns, rows


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


def _display_path(path: str) -> str:
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


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------


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


def find_metric(run: Run, must_contain: Sequence[str]) -> str | None:
    """The first summary metric name of a run that contains every fragment of ``must_contain``."""
    for summary in run.summaries.values():
        for name in summary:
            if all(part in name for part in must_contain):
                return name
    return None


def scatter_points(runs: Sequence[Run], x_metric: Sequence[str], y_metric: Sequence[str],
                   floor: float | None = None) -> tuple[list[Point], list[str], list[str]]:
    """Points (x, y) of the runs having both metrics (found by :func:`find_metric` fragments); y values at or
    below ``floor`` are raised to it. Returns (points, names clipped to the floor, names left out)."""
    points, clipped, left_out = [], [], []
    for run in runs:
        x_name, y_name = find_metric(run, x_metric), find_metric(run, y_metric)
        if x_name is None and y_name is None:
            continue
        x = run.metric(x_name) if x_name else None
        y = run.metric(y_name) if y_name else None
        if x is None or y is None:
            left_out.append(run.name)
            continue
        low = floor is not None and y <= floor
        if low:
            clipped.append(run.name)
        points.append(Point(run.name, run.method, run.role, x, floor if low else y, low))
    return points, clipped, left_out


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
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save_figure(fig, path)


def _points_figure(runs: Sequence[Run], out_dir: Path, key: str, title: str, caption: str,
                   x: Sequence[str], y: Sequence[str], xlabel: str, ylabel: str, log_y: bool) -> Figure:
    figure = Figure(key, title, caption)
    points, clipped, left_out = scatter_points(runs, x, y, FQ_FLOOR if log_y else None)
    if not points:
        nulls = f" (null for: {', '.join(left_out)})" if left_out else ""
        figure.notes.append(f"{title}: skipped, no run has both {xlabel} and {ylabel}{nulls}.")
        return figure
    if clipped:
        figure.notes.append(f"{ylabel} of 0 drawn at {FQ_FLOOR:g} (log scale): {', '.join(clipped)}.")
    if left_out:
        figure.notes.append(f"Left out ({xlabel} or {ylabel} is null): {', '.join(left_out)}.")
    figure.path = plot_scatter(points, out_dir / f"{key}.png", xlabel, ylabel, title, log_y)
    return figure


def trajectories(runs: Sequence[Run]) -> dict[str, list[tuple[str, list[float], list[float]]]]:
    """Per headline metric, ``(run name, steps, values)`` of each run evaluated during training: from
    ``eval_history.jsonl``, else from the ``eval_<bench>_<metric>`` entries of the trainer log. Where the
    run's target model is known and the run was not evaluated at step 0, the target's value is step 0 (the
    model unlearning started from)."""
    out: dict[str, list[tuple[str, list[float], list[float]]]] = {}
    for run in runs:
        series = _history_series(run) or _train_log_series(run)
        target = target_for(run, runs) if series and run.role == "run" else None
        for metric in TRAJECTORY_METRICS:
            points = sorted(series.get(metric, []))
            start = target.metric(metric) if target is not None and points and points[0][0] > 0 else None
            if start is not None:
                points.insert(0, (0.0, start))
            if points:
                out.setdefault(metric, []).append((run.name, [s for s, _ in points], [v for _, v in points]))
    return {m: out[m] for m in TRAJECTORY_METRICS if m in out}


def _history_series(run: Run) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}
    for entry in run.history:
        step, summary = _as_number(entry.get("step")), entry.get("summary")
        if step is None or not isinstance(summary, Mapping):
            continue
        for metric, value in summary.items():
            value = _as_number(value)
            if value is not None:
                series.setdefault(str(metric), []).append((step, value))
    return series


def _train_log_series(run: Run) -> dict[str, list[tuple[float, float]]]:
    evals = run.config.get("eval")
    benches = [str(k) for k in evals] if isinstance(evals, Mapping) else []
    benches = sorted(set(benches) | set(DEFAULT_BENCH_KEYS), key=len, reverse=True)
    series: dict[str, list[tuple[float, float]]] = {}
    for entry in run.train_log:
        step = _as_number(entry.get("step"))
        if step is None:
            continue
        for key, value in entry.items():
            value = _as_number(value)
            if value is None or not key.startswith("eval_"):
                continue
            rest = key[len("eval_"):]
            bench = next((b for b in benches if rest.startswith(f"{b}_")), None)
            if bench is not None:
                series.setdefault(rest[len(bench) + 1:], []).append((step, value))
    return series


def retain_levels(runs: Sequence[Run], metrics: Iterable[str]) -> dict[str, list[tuple[str, float]]]:
    """Per metric, ``(retain run name, final value)`` of every retain model that has it."""
    out: dict[str, list[tuple[str, float]]] = {}
    for run in runs:
        if run.role != "retain":
            continue
        for metric in metrics:
            value = run.metric(metric)
            if value is not None:
                out.setdefault(metric, []).append((run.name, value))
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


def plot_trajectories(series: Mapping[str, Sequence[tuple[str, Sequence[float], Sequence[float]]]],
                      levels: Mapping[str, Sequence[tuple[str, float]]], path: Path) -> Path:
    """One panel per metric, one line per run against the step, the retain model's value dashed."""
    metrics = list(series)
    fig, axes = _panel_grid(len(metrics), 4.6, 3.4)
    for ax, metric in zip(axes, metrics):
        log_y = metric in LOG_AXIS_METRICS
        for name, steps, values in series[metric]:
            values = [max(v, FQ_FLOOR) for v in values] if log_y else list(values)
            ax.plot(steps, values, marker="o", markersize=3, label=_plain(name))
        for name, value in levels.get(metric, []):
            ax.axhline(max(value, FQ_FLOOR) if log_y else value, linestyle="--", color="grey", linewidth=1,
                       label=_plain(f"retain ({name})" if len(levels[metric]) > 1 else "retain"))
        if log_y:
            ax.set_yscale("log")
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, path)


def loss_series(run: Run) -> dict[str, tuple[list[float], list[float]]]:
    """``{term: (steps, values)}`` of a run's training-step log entries: ``loss`` and every loss term (a float
    key other than the bookkeeping ones and the ``eval_`` / ``train_`` entries)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for entry in run.train_log:
        step = _as_number(entry.get("step"))
        if step is None or "loss" not in entry:
            continue
        for key, value in entry.items():
            if key == "loss":
                value = _as_number(value)
            elif (key in LOG_BOOKKEEPING or key.startswith(("eval_", "train_")) or not isinstance(value, float)):
                continue
            else:
                value = _as_number(value)
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
                values = {"clean": _as_number(row.get("clean"))}
                values.update({f"@{tag}": _as_number(v) for tag, v in (row.get("attacked") or {}).items()})
                label = metric if len(run.robustness) == 1 else f"{bench}.{metric}"
                out.setdefault(label, []).append((run.name, values, _as_number(row.get("retain"))))
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


CAPTIONS = {
    "forget_quality_vs_model_utility": (
        "Each point is one model: to the right, more utility kept; up, forget quality (a p-value on a log "
        "scale) closer to the retain model. Up and to the right is better; the retain model (star) is the "
        "goal, the target (X) is where unlearning starts."),
    "muse_knowmem_vs_verbmem": (
        "Each point is one model: to the right, more knowledge of the retain set kept; down, less verbatim "
        "memory of the forget set. Down and to the right is better; the retain model (star) is the goal."),
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
}


def make_figures(runs: Sequence[Run], out_dir: Path) -> list[Figure]:
    """Draw every plot that has data into ``out_dir``; a plot without data comes back with a note instead."""
    figures = []
    tofu_like = any(r.has_metric("model_utility") or r.has_metric("forget_quality") for r in runs)
    muse_like = any(find_metric(r, ("knowmem", "retain")) and find_metric(r, ("verbmem", "forget")) for r in runs)
    if tofu_like or not muse_like:
        figures.append(_points_figure(
            runs, out_dir, "forget_quality_vs_model_utility", "Forget quality vs model utility",
            CAPTIONS["forget_quality_vs_model_utility"], ("model_utility",), ("forget_quality",),
            "model_utility", "forget_quality", log_y=True))
    if muse_like:
        figures.append(_points_figure(
            runs, out_dir, "muse_knowmem_vs_verbmem", "MUSE: knowledge kept vs verbatim memory",
            CAPTIONS["muse_knowmem_vs_verbmem"], ("knowmem", "retain"), ("verbmem", "forget"),
            "knowmem on retain", "verbmem on forget", log_y=False))

    fig = Figure("trajectories", "Metrics over unlearning steps", CAPTIONS["trajectories"])
    series = trajectories([r for r in runs if r.kind == "train"])
    if series:
        fig.path = plot_trajectories(series, retain_levels(runs, series), out_dir / "trajectories.png")
        if "forget_quality" in series:
            fig.notes.append(f"forget_quality is drawn on a log scale (0 at {FQ_FLOOR:g}).")
    else:
        fig.notes.append("Metrics over unlearning steps: skipped, no run has eval_history.jsonl or "
                         "eval_<bench>_<metric> entries in train_log.jsonl.")
    figures.append(fig)

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
    return figures


# ---------------------------------------------------------------------------------------------------------
# per-sample view of the forget set
# ---------------------------------------------------------------------------------------------------------

SAMPLE_COLUMNS = (
    ("index", "index"), ("question", "question"), ("ground_truth", "ground truth"),
    ("before", "generation before"), ("after", "generation after"),
    ("rouge_before", "ROUGE-L recall before"), ("rouge_after", "ROUGE-L recall after"),
    ("prob_before", "answer prob. before"), ("prob_after", "answer prob. after"),
    ("change", "prob. change (after − before)"),
)


@dataclass
class SampleView:
    """The per-sample comparison of one unlearned run with its target model."""

    run: str
    target: str
    rows: list[dict[str, Any]]


def _by_index(eval_log: Mapping[str, Any] | None, metric: str) -> Mapping[str, Any]:
    values = _get(eval_log, metric, "value_by_index")
    return values if isinstance(values, Mapping) else {}


def _index_key(index: str) -> tuple:
    return (0, int(index), "") if str(index).lstrip("-").isdigit() else (1, 0, str(index))


def per_sample_rows(after: Mapping[str, Any], before: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per forget sample of the run's EVAL (``after``) next to the target's (``before``): question,
    ground truth, both generations, ROUGE-L recall and answer probability before and after, and the change
    of probability (after - before; None when either is missing)."""
    rouge_after, rouge_before = _by_index(after, "forget_Q_A_ROUGE"), _by_index(before, "forget_Q_A_ROUGE")
    prob_after, prob_before = _by_index(after, "forget_Q_A_Prob"), _by_index(before, "forget_Q_A_Prob")
    rows = []
    for index in sorted(rouge_after, key=_index_key):
        a, b = rouge_after.get(index) or {}, rouge_before.get(index) or {}
        pa, pb = _as_number(_get(prob_after, index, "prob")), _as_number(_get(prob_before, index, "prob"))
        rows.append({
            "index": index,
            "question": a.get("input") or b.get("input") or "",
            "ground_truth": a.get("ground_truth") or b.get("ground_truth") or "",
            "before": b.get("generation"),
            "after": a.get("generation"),
            "rouge_before": _as_number(b.get("rougeL_recall")),
            "rouge_after": _as_number(a.get("rougeL_recall")),
            "prob_before": pb,
            "prob_after": pa,
            "change": pa - pb if pa is not None and pb is not None else None,
        })
    return rows


def _forget_split_of(run: Run, bench: str) -> str | None:
    split = _get(run.eval_meta(bench), "splits", "forget_split")
    return str(split) if split else run.forget_split


def sample_views(runs: Sequence[Run]) -> tuple[list[SampleView], list[str]]:
    """The per-sample view of every unlearned run with per-sample ROUGE on the forget set, against its
    target model; and notes on the runs that could not be compared."""
    views, notes = [], []
    targets = [r for r in runs if r.role == "target"]
    for run in runs:
        if run.role != "run" or run.mode == "train":
            continue
        bench = next((b for b, s in run.summaries.items() if "forget_Q_A_ROUGE" in s and b in run.eval_paths), None)
        if bench is None:
            continue
        target = target_for(run, runs) if targets else None
        if target is None or bench not in target.eval_paths:
            notes.append(f"{run.name}: no target model with a {bench}_EVAL.json to compare with "
                         "(use --target).")
            continue
        split_run, split_target = _forget_split_of(run, bench), _forget_split_of(target, bench)
        if split_run and split_target and split_run != split_target:
            notes.append(f"{run.name}: evaluated on {split_run}, the target on {split_target}; not compared.")
            continue
        after, before = run.eval_log(bench, cache=False), target.eval_log(bench)
        rows = per_sample_rows(after or {}, before or {})
        if rows:
            views.append(SampleView(run.name, target.name, rows))
    return views, notes


# ---------------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything the renderers need."""

    title: str
    generated: str
    folders: list[str]
    columns: list[Column]
    rows: list[dict[str, Any]]
    figures: list[Figure] = field(default_factory=list)
    samples: list[SampleView] = field(default_factory=list)
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
        return _display_path(value)
    if col.kind == "param" and value is None:
        return ""
    return format_value(value)


def _best_line(name: str, best: Mapping[str, Any]) -> str:
    if best.get("step") is None:
        return f"{name}: no evaluation met the constraint {best.get('constraint')!s} (metric {best.get('metric')!s})"
    constraint = f", constraint {best['constraint']}" if best.get("constraint") else ""
    return (f"{name}: step {best.get('step')} ({best.get('checkpoint')!s}), {best.get('metric')!s} = "
            f"{format_value(best.get('value'))}{constraint}")


def biggest_drops(rows: Sequence[Mapping[str, Any]], count: int = MD_SAMPLES) -> list[Mapping[str, Any]]:
    """The ``count`` samples whose answer probability fell the most (most negative change first)."""
    known = [row for row in rows if row.get("change") is not None]
    return sorted(known, key=lambda row: row["change"])[:count]


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
    if report.best:
        lines += ["## Best checkpoints", ""] + [f"- {_best_line(n, b)}" for n, b in report.best] + [""]
    lines += ["## Plots", ""]
    for fig in report.figures:
        if fig.path is not None:
            lines += [f"### {fig.title}", "", f"![{fig.title}]({fig.path.name})", "", fig.caption, ""]
        lines += [f"- {note}" for note in fig.notes]
        if fig.notes:
            lines.append("")
    if report.samples or report.notes:
        lines += ["## Forget set, sample by sample", ""]
        lines.append(f"The {MD_SAMPLES} forget samples whose answer probability fell the most per run "
                     "(the full table is in report.html).")
        lines.append("")
        for view in report.samples:
            lines += [f"### {view.run} (before: {view.target})", "",
                      "| index | question | prob. before | prob. after | change |", "|---|---|---|---|---|"]
            for row in biggest_drops(view.rows):
                lines.append("| " + " | ".join(_md_cell(v) for v in (
                    row["index"], _shorten(row["question"]), format_value(row["prob_before"]),
                    format_value(row["prob_after"]), format_value(row["change"]))) + " |")
            lines.append("")
        lines += [f"- {note}" for note in report.notes]
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


HTML_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em 2em; color: #222; }
h1 { margin-bottom: 0.2em; }
.meta, .note, figcaption { color: #555; font-size: 0.9em; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; vertical-align: top; }
th { background: #f0f0f0; position: sticky; top: 0; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { max-width: 28em; }
tr.target td { background: #eef4ff; }
tr.retain td { background: #fff8e0; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
details { margin: 0.8em 0; }
summary { cursor: pointer; font-weight: 600; }
"""

#: Click a header to sort by it (numbers by value, text alphabetically, missing values last; click again to
#: reverse). The table gets ``data-sorted="<key>:<asc|desc>"``. ``#sort=<key>`` in the address clicks that
#: header once the page is loaded (used by the test).
HTML_SCRIPT = """
(function () {
  "use strict";
  function value(cell) {
    if (!cell || cell.hasAttribute("data-na")) { return null; }
    var v = cell.getAttribute("data-v");
    if (v !== null) { var n = Number(v); if (!isNaN(n)) { return n; } }
    return cell.textContent.trim().toLowerCase();
  }
  function compare(a, b) {
    if (typeof a === "number" && typeof b === "number") { return a - b; }
    if (typeof a === "number") { return -1; }
    if (typeof b === "number") { return 1; }
    return a < b ? -1 : (a > b ? 1 : 0);
  }
  function sortBy(table, th, col) {
    var body = table.tBodies[0];
    if (!body) { return; }
    var key = th.getAttribute("data-key") || String(col);
    var dir = table.getAttribute("data-sorted") === key + ":asc" ? "desc" : "asc";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r1, r2) {
      var a = value(r1.cells[col]), b = value(r2.cells[col]);
      if (a === null || b === null) { return (a === null) - (b === null); }
      var c = compare(a, b);
      return dir === "asc" ? c : -c;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(th.parentNode.cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === "asc" ? "ascending" : "descending");
    table.setAttribute("data-sorted", key + ":" + dir);
  }
  var tables = document.querySelectorAll("table.sortable");
  Array.prototype.forEach.call(tables, function (table) {
    if (!table.tHead) { return; }
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.title = "click to sort";
      th.addEventListener("click", function () { sortBy(table, th, col); });
    });
  });
  var m = /^#sort=(.+)$/.exec(window.location.hash);
  if (m) {
    var wanted = decodeURIComponent(m[1]);
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable thead th"), function (th) {
      if (th.getAttribute("data-key") === wanted) { th.click(); }
    });
  }
})();
"""


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
                cells.append(f'<td class="text"><code>{_e(_display_path(value))}</code></td>')
            elif col.kind == "metric" or col.kind == "param":
                strong = col.key in best and row.get("role") == "run" and value == best[col.key]
                cells.append(_td(value, _cell_text(col, value), strong=strong))
            else:
                cells.append(f'<td class="text">{_e(format_value(value))}</td>')
        body.append(f'<tr class="{_e(row.get("role"))}">' + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="sortable" id="runs"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _html_samples(view: SampleView, number: int, open_: bool) -> str:
    head = "".join(f'<th data-key="{key}" scope="col">{_e(label)}</th>' for key, label in SAMPLE_COLUMNS)
    body = []
    for row in view.rows:
        cells = [_td(int(row["index"]) if _index_key(row["index"])[0] == 0 else row["index"], str(row["index"]))]
        cells += [f'<td class="text">{_e(row[key])}</td>' if row[key] is not None
                  else '<td class="text" data-na="1">n/a</td>' for key in ("question", "ground_truth", "before", "after")]
        cells += [_td(row[key]) for key in ("rouge_before", "rouge_after", "prob_before", "prob_after", "change")]
        body.append(f'<tr data-index="{_e(row["index"])}">' + "".join(cells) + "</tr>")
    return (f'<details{" open" if open_ else ""}><summary>{_e(view.run)}: {len(view.rows)} forget samples '
            f'(before = {_e(view.target)})</summary><div class="scroll">'
            f'<table class="sortable samples" id="samples-{number}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div></details>')


def render_html(report: Report) -> str:
    """report.html: self-contained (plots as embedded PNG data, inline style and script, no external file)."""
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(report.title)}</title>", '<link rel="icon" href="data:,">',
        f"<style>{HTML_STYLE}</style></head><body>",
        f"<h1>{_e(report.title)}</h1>", f'<p class="meta">Generated {_e(report.generated)}</p>',
        "<h2>Input folders</h2><ul>" + "".join(f"<li><code>{_e(f)}</code></li>" for f in report.folders) + "</ul>",
        f"<h2>Runs</h2>{_html_table(report.columns, report.rows)}",
        f'<p class="note">{_e(ARROW_NOTE.replace("`", ""))} Best value among the runs in bold; click a header to sort.</p>',
    ]
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
    if report.samples or report.notes:
        parts.append("<h2>Forget set, sample by sample</h2>")
        parts.append('<p class="note">Each forget question with the target model\'s answer (before unlearning) '
                     "and the run's (after); the change is the answer probability after minus before, so the "
                     "most forgotten samples come first when sorted by it.</p>")
        open_all = len(report.samples) <= OPEN_SAMPLE_SECTIONS
        parts += [_html_samples(v, i, open_all or i == 0) for i, v in enumerate(report.samples)]
        parts += [f'<p class="note">{_e(note)}</p>' for note in report.notes]
    parts.append(f"<script>{HTML_SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None)."""
    parser = argparse.ArgumentParser(
        prog="report.py", description="Collect the runs under the given folders into a table, plots and a "
        "per-sample view (report.md, report.csv, report.html).")
    parser.add_argument("folders", nargs="+", help="folders searched recursively for runs")
    parser.add_argument("--out", help="output folder (default: <first folder>/report)")
    parser.add_argument("--target", help="the target model's evaluation folder (default: detected)")
    parser.add_argument("--retain", help="the retain model's evaluation folder (default: detected)")
    parser.add_argument("--title", default="Unlearning results", help="title of the report")
    return parser.parse_args(argv)


def build_report(runs: Sequence[Run], folders: Sequence[str], out_dir: Path, title: str) -> Report:
    """Table, figures (written into ``out_dir``) and per-sample views of runs with roles assigned."""
    columns, rows = build_table(runs)
    ordered = sort_runs(runs)
    figures = make_figures(ordered, out_dir)
    samples, notes = sample_views(ordered)
    generated = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    best = [(r.name, r.best) for r in ordered if r.best]
    return Report(title, generated, list(folders), columns, rows, figures, samples, notes, best)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: writes the report and prints the path of report.html."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        folders = check_folders(args.folders)
        extra = [p for p in (args.target, args.retain) if p]
        for path in extra:
            if not Path(path).expanduser().exists():
                raise ReportError(f"{path!r} (given to --target/--retain) does not exist")
        scan = folders + [Path(p).expanduser().parent if Path(p).expanduser().is_file() else Path(p).expanduser()
                          for p in extra]
        runs = assign_roles(find_runs(scan), target=args.target, retain=args.retain)
        out_dir = Path(args.out).expanduser() if args.out else folders[0] / "report"
        if out_dir.exists() and not out_dir.is_dir():
            raise ReportError(f"--out {str(out_dir)!r} is a file; give a folder")
        out_dir.mkdir(parents=True, exist_ok=True)
        report = build_report(runs, [str(f) for f in args.folders], out_dir, args.title)
    except ReportError as e:
        raise SystemExit(f"report: error: {e}") from None
    write_atomic(out_dir / "report.md", render_markdown(report))
    write_atomic(out_dir / "report.csv", render_csv(report.columns, report.rows))
    write_atomic(out_dir / "report.html", render_html(report))
    print(out_dir / "report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
