"""Finding and reading runs: the run folders under the given folders and the files the report reads.

A training or unlearning run of ``src/train.py`` is a folder with ``run_complete.json`` and ``config.yaml`` (its
final evaluation under ``evals/``, the evaluations during training under ``checkpoint-<step>/evals/``, its
trainer log in ``train_log.jsonl``, optionally ``eval_history.jsonl`` and ``best_checkpoint.json``); an
evaluation of ``src/eval.py`` is a folder with ``<NAME>_SUMMARY.json`` / ``<NAME>_EVAL.json`` next to its
``config.yaml`` (and, since evaluations follow the run-folder rules, its own ``run_complete.json``). Staging folders (``*.incomplete*``, ``*.replaced*``), checkpoints and hidden folders are not
runs. Nothing here knows a benchmark: a benchmark is the ``<NAME>`` of its files.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from run_folder import BEST_CHECKPOINT_FILE as BEST_CHECKPOINT
from run_folder import COMPLETION_MARKER as RUN_MARKER
from run_folder import EVAL_HISTORY_FILE as EVAL_HISTORY
from run_folder import EVAL_SUFFIX, RESULT_EVALS_DIR, ROBUSTNESS_SUFFIX, RUN_CONFIG, SUMMARY_SUFFIX
from run_folder import TRAIN_LOG_FILE as TRAIN_LOG

log = logging.getLogger("report")

#: Folder-name fragments of staging folders (run_folder.py) that never hold a finished result.
STAGING_MARKERS = (".incomplete", ".replaced")
#: Prefix of the trainer's checkpoint folders (each may hold the evaluation made at that step in ``evals/``).
CHECKPOINT_PREFIX = "checkpoint-"


class ReportError(ValueError):
    """Bad input to the report (a missing folder, no runs, an unknown --target...)."""


@dataclass
class Run:
    """One collected run: a training/unlearning run (``kind="train"``) or an evaluation folder (``"eval"``).

    ``summaries`` maps a benchmark name (the ``<NAME>`` of its files) to its ``<NAME>_SUMMARY.json``; the
    matching ``<NAME>_EVAL.json`` files (``eval_paths``; for a training run also ``checkpoint_eval_paths``, the
    latest checkpoint's evaluation of each benchmark) are read only when asked for (:meth:`eval_log`,
    :meth:`eval_meta`). ``train_log`` is the trainer's log history, ``history`` the lines of
    ``eval_history.jsonl`` and ``best`` the ``best_checkpoint.json`` object. ``cost`` is what the whole run
    cost, the ``compute.total`` record of its ``run_complete.json`` (``core.compute.PhaseCost``; None for a
    run written before runs recorded it). ``role`` is set by ``roles.assign_roles``.
    """

    path: Path
    kind: str
    config: dict[str, Any] = field(default_factory=dict)
    summaries: dict[str, dict[str, float | None]] = field(default_factory=dict)
    eval_paths: dict[str, Path] = field(default_factory=dict)
    checkpoint_eval_paths: dict[str, Path] = field(default_factory=dict)
    train_log: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    #: ``<NAME>_ROBUSTNESS.json`` of an evaluation with attacks (src/attacks/), by benchmark name
    robustness: dict[str, dict[str, Any]] = field(default_factory=dict)
    cost: dict[str, Any] | None = None
    name: str = ""
    role: str = "run"
    _eval_cache: dict[Path, dict | None] = field(default_factory=dict, repr=False, compare=False)
    _meta_cache: dict[Path, dict | None] = field(default_factory=dict, repr=False, compare=False)

    def _read_eval(self, path: Path | None, cache: bool) -> dict[str, Any] | None:
        if path is None:
            return None
        if path in self._eval_cache:
            return self._eval_cache[path]
        data = read_json(path)
        if not isinstance(data, dict):
            data = None
        meta = data.get("_meta") if data is not None else None
        self._meta_cache[path] = meta if isinstance(meta, dict) else None
        if cache:
            self._eval_cache[path] = data
        return data

    def eval_log(self, bench: str, cache: bool = True) -> dict[str, Any] | None:
        """The final ``<bench>_EVAL.json`` object, read on first use; None when absent or unreadable."""
        return self._read_eval(self.eval_paths.get(bench), cache)

    def eval_meta(self, bench: str, checkpoint: bool = False) -> dict[str, Any] | None:
        """The ``_meta`` object of the final ``<bench>_EVAL.json`` (``checkpoint``: of the latest checkpoint's);
        the file is read once and only its ``_meta`` is kept."""
        path = (self.checkpoint_eval_paths if checkpoint else self.eval_paths).get(bench)
        if path is None:
            return None
        if path not in self._meta_cache:
            self._read_eval(path, cache=False)
        return self._meta_cache.get(path)

    @property
    def benchmarks(self) -> list[str]:
        """Every benchmark the run has a SUMMARY or an EVAL file of (final or a checkpoint's), first seen first."""
        return list(dict.fromkeys([*self.summaries, *self.eval_paths, *self.checkpoint_eval_paths]))

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
        handler = get(self.config, "trainer", "handler")
        return str(handler) if handler else "?"

    @property
    def model_in(self) -> str | None:
        """The model the run started from (training) or evaluated (evaluation folder)."""
        value = get(self.config, "model", "model_args", "pretrained_model_name_or_path")
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

    def value(self, bench: str, metric: str) -> float | None:
        """The final value of summary metric ``metric`` of benchmark ``bench``; None when missing or null."""
        return self.summaries.get(bench, {}).get(metric)

    def bench_of_key(self, key: str) -> str:
        """The benchmark name (file prefix) of the run config's evaluator ``eval.<key>`` (its ``name``; the key
        itself when the config does not give one)."""
        name = get(self.config, "eval", key, "name")
        return str(name) if isinstance(name, str) and name else key


def get(mapping: Any, *keys: str) -> Any:
    """``mapping[k1][k2]...``, None as soon as a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def read_json(path: Path) -> Any:
    """The JSON content of ``path``; None when missing or unreadable (a warning for the latter)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("report: skipping %s: %s", path, e)
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; a line that does not parse (a run killed mid-write) or is not UTF-8
    text is skipped with a warning naming the file and the line."""
    if not path.is_file():
        return []
    out: list[dict[str, Any]] = []
    try:
        raw = path.read_bytes()
    except OSError as e:
        log.warning("report: cannot read %s (%s); skipped", path, e)
        return []
    for number, binary in enumerate(raw.splitlines(), start=1):
        try:
            line = binary.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            log.warning("report: %s line %d is not UTF-8 text (byte %d); skipped", path, number, e.start)
            continue
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


def read_config(path: Path) -> dict[str, Any]:
    """A run's ``config.yaml`` as a dict; empty when missing or unreadable (a warning for the latter)."""
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError) as e:  # ValueError: not UTF-8 text
        log.warning("report: cannot read %s (%s); the run is listed without its config", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def as_number(value: Any) -> float | None:
    """A summary value as a float; None for null, NaN, booleans and anything not a number. (The same rule as
    ``evals.result.finite_or_none``, which cannot be imported here: the ``evals`` package pulls in torch.)"""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def read_summary(path: Path) -> dict[str, float | None] | None:
    """A ``<NAME>_SUMMARY.json`` as ``{metric: float or None}``; None when it is not a JSON object."""
    data = read_json(path)
    if not isinstance(data, dict):
        return None
    return {str(k): as_number(v) for k, v in data.items()}


def folder_kind(filenames: Iterable[str]) -> str | None:
    """``train`` for a finished run of src/train.py, ``eval`` for an evaluation folder, None otherwise."""
    names = set(filenames)
    if any(n.endswith(SUMMARY_SUFFIX) and len(n) > len(SUMMARY_SUFFIX) for n in names):
        return "eval"  # a training run keeps its evaluations under evals/, never next to its marker
    if RUN_MARKER in names and RUN_CONFIG in names:
        return "train"
    return None


def is_skipped_folder(name: str) -> bool:
    """Folders never searched for runs: staging folders, checkpoints and hidden folders (``.hydra``)."""
    return (name.startswith(".") or name.startswith(CHECKPOINT_PREFIX)
            or any(marker in name for marker in STAGING_MARKERS))


def _bench_files(folder: Path, suffix: str) -> dict[str, Path]:
    """``{<NAME>: folder/<NAME><suffix>}`` of the files of that form in ``folder``."""
    if not folder.is_dir():
        return {}
    return {f.name[: -len(suffix)]: f for f in sorted(folder.iterdir())
            if f.name.endswith(suffix) and len(f.name) > len(suffix) and f.is_file()}


def latest_checkpoint_evals(path: Path) -> dict[str, Path]:
    """Per benchmark, the ``<NAME>_EVAL.json`` of the latest ``checkpoint-<step>/evals/`` that holds one."""
    steps = sorted((int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in path.glob(f"{CHECKPOINT_PREFIX}*")
                   if p.name[len(CHECKPOINT_PREFIX):].isdigit() and p.is_dir())
    found: dict[str, Path] = {}
    for _, folder in reversed(steps):
        for bench, file in _bench_files(folder / RESULT_EVALS_DIR, EVAL_SUFFIX).items():
            found.setdefault(bench, file)
    return found


def load_run(path: Path, kind: str) -> Run:
    """Read one run folder of the given kind (see :func:`folder_kind`)."""
    config = read_config(path / RUN_CONFIG)
    eval_dir = path / RESULT_EVALS_DIR if kind == "train" else path
    summaries = {bench: s for bench, file in _bench_files(eval_dir, SUMMARY_SUFFIX).items()
                 for s in [read_summary(file)] if s is not None}
    robustness = {bench: r for bench, file in _bench_files(eval_dir, ROBUSTNESS_SUFFIX).items()
                  for r in [read_json(file)] if isinstance(r, dict)}
    best = read_json(path / BEST_CHECKPOINT) if kind == "train" else None
    cost = get(read_json(path / RUN_MARKER), "compute", "total")
    task_name = config.get("task_name")
    return Run(
        path=path, kind=kind, config=config, summaries=summaries, eval_paths=_bench_files(eval_dir, EVAL_SUFFIX),
        checkpoint_eval_paths=latest_checkpoint_evals(path) if kind == "train" else {},
        train_log=read_jsonl(path / TRAIN_LOG) if kind == "train" else [],
        history=read_jsonl(path / EVAL_HISTORY) if kind == "train" else [],
        best=best if isinstance(best, dict) else None, robustness=robustness,
        cost=cost if isinstance(cost, dict) else None, name=str(task_name) if task_name else path.name,
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
    runs = []
    for path, kind in tqdm(list(found.values()), desc="reading runs", unit="run", disable=None):
        try:
            runs.append(load_run(path, kind))
        except Exception as e:  # noqa: BLE001 - one unreadable run must not hide the others
            log.warning("report: skipping the run in %s: %s: %s", path, type(e).__name__, e)
    if not runs:
        raise ReportError(f"every run found under {', '.join(repr(str(f)) for f in folders)} was unreadable (see the "
                          "warnings above)")
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
