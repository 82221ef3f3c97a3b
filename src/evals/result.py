"""What an evaluation returns and where it is kept: ``EvalResult`` and ``ResultStore``.

A benchmark's ``evaluate`` returns an :class:`EvalResult`: every metric's entry (``agg_value``, per-sample
``value_by_index``, ...), the summary (the headline numbers) and ``meta`` (what was evaluated, how, and each
metric's fingerprint). Callers use it in memory; it is written once, by :class:`ResultStore`, as
``<NAME>_EVAL.json`` (entries and ``_meta``) and ``<NAME>_SUMMARY.json`` (file names: ``run_folder``).

The store also decides reuse: a metric of an earlier EVAL file in the same folder is taken over when its
fingerprint (a hash of everything its value depends on: its config, the model, the data files, the prompt
settings, the code version) equals the new one, unless ``overwrite`` is asked for.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from core.compute import PhaseCost
from run_folder import eval_file, summary_file, write_json_atomic


def finite_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (bool is not a number here), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def content_hash(payload: Any) -> str:
    """A short, stable hash of JSON-able ``payload`` (keys sorted; anything else by its text)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str | None) -> str | None:
    """Content hash of a file (a retain model's EVAL file), so a regenerated file invalidates reuse."""
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


@functools.cache
def code_version() -> str:
    """The git commit of this checkout (with a mark if ``src/`` is modified), else ``unknown``.

    Computed once per process (two git subprocesses): every metric fingerprint of every evaluation reads it."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, timeout=5)
        if sha.returncode == 0:
            return sha.stdout.strip() + ("+modified" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def model_fingerprint(model_id: str) -> str:
    """Identity of a model: its path plus the size and mtime of its weight files when it is a folder.

    Anything else (a Hub id, a ``random_init:<recipe>`` identity, a name too long to be a path) is its own
    fingerprint."""
    folder = Path(model_id)
    try:
        is_folder = folder.is_dir()
    except OSError:  # e.g. ENAMETOOLONG: a random-init recipe of a full architecture is no path
        is_folder = False
    if is_folder:
        files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
        return model_id + "|" + ";".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files)
    return model_id


def evaluated_model_id(model: Any) -> str:
    """What an EVAL file records as the model when the caller gives no id: the model's own path
    (``config._name_or_path`` of a transformers model), or ``in-memory model``."""
    from transformers import PreTrainedModel

    config = model.config if isinstance(model, PreTrainedModel) else None
    return (config._name_or_path if config is not None else "") or "in-memory model"


def utc_timestamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class EvalResult:
    """One benchmark's evaluation of one model.

    ``benchmark``: the file prefix (``TOFU``); ``entries``: metric name -> its entry (every metric of the
    benchmark and every ``pre_compute`` metric under its own name); ``summary``: the headline metrics'
    ``agg_value`` (None where not finite); ``meta``: what the EVAL file's ``_meta`` holds (model, splits,
    fingerprints, directions, the benchmark's declared metric roles, what computing it cost, ...)."""

    benchmark: str
    entries: dict[str, Any]
    summary: dict[str, float | None]
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path) -> None:
        """Write ``<NAME>_EVAL.json`` and ``<NAME>_SUMMARY.json`` into ``folder``, each whole (temporary file
        and rename). When that fails (a full disk, a folder gone), the result is not lost: it is written to the
        system's temporary folder instead, and the OSError raised names that copy (or, if even that fails, holds
        the summary)."""
        folder = Path(folder)
        payload = {**self.entries, "_meta": self.meta}
        try:
            write_json_atomic(eval_file(folder, self.benchmark), payload)
            write_json_atomic(summary_file(folder, self.benchmark), self.summary)
        except OSError as error:
            rescue = Path(tempfile.gettempdir()) / f"{self.benchmark}_EVAL.rescued-{os.getpid()}-{int(time.time())}.json"
            try:
                write_json_atomic(rescue, payload)
                kept = f"the whole result is kept in {rescue}"
            except OSError:
                kept = f"it could not be kept elsewhere either; its summary: {json.dumps(self.summary, default=str)}"
            raise OSError(error.errno, f"could not write {self.benchmark}'s result into {folder} "
                                       f"({error.strerror or error}); {kept}") from error

    @classmethod
    def from_eval_payload(cls, benchmark: str, payload: Mapping[str, Any],
                          summary: Mapping[str, Any] | None = None) -> EvalResult:
        """A result from an EVAL file's object (and its SUMMARY's, when read)."""
        entries = {k: v for k, v in payload.items() if k != "_meta"}
        meta = dict(payload.get("_meta") or {})
        return cls(benchmark, entries, dict(summary or {}), meta)

    @classmethod
    def load(cls, folder: str | Path, benchmark: str) -> EvalResult:
        """The result saved in ``folder`` (FileNotFoundError naming the missing file)."""
        folder = Path(folder)
        payload = json.loads(eval_file(folder, benchmark).read_text(encoding="utf-8"))
        summary = json.loads(summary_file(folder, benchmark).read_text(encoding="utf-8"))
        return cls.from_eval_payload(benchmark, payload, summary)

    @staticmethod
    def saved_in(folder: str | Path, benchmark: str) -> bool:
        """Whether ``folder`` holds a saved result of ``benchmark`` (both files)."""
        return eval_file(Path(folder), benchmark).is_file() and summary_file(Path(folder), benchmark).is_file()

    def with_attacked(self, attacked: Mapping[str, Mapping[str, Any]],
                      settings: Mapping[str, Mapping[str, Any]] | None = None) -> EvalResult:
        """This result plus each attack's entries as ``<metric>@<tag>`` (``attacked`` = {tag: {metric: entry}}),
        in the entries and the summary; ``settings`` ({tag: what the attack did, e.g. quantization's effective
        grouping}) goes to ``_meta.attacks``."""
        entries, summary = dict(self.entries), dict(self.summary)
        for tag, metrics in attacked.items():
            for metric, entry in metrics.items():
                entries[f"{metric}@{tag}"] = entry
                summary[f"{metric}@{tag}"] = finite_or_none(entry.get("agg_value"))
        meta = {**self.meta, "attacks": dict(settings)} if settings else self.meta
        return replace(self, entries=entries, summary=summary, meta=meta)

    def with_compute(self, records: list[PhaseCost]) -> EvalResult:
        """This result with ``_meta.compute``: what the phases that produced it cost (``core.compute``; the
        evaluation, then each attack), for the record only (no fingerprint or reuse reads it)."""
        return replace(self, meta={**self.meta, "compute": [r.as_json() for r in records]})


class ResultStore:
    """The EVAL and SUMMARY files of one benchmark in one folder: what can be reused, and the one writer."""

    def __init__(self, folder: str | Path, benchmark: str) -> None:
        self.folder, self.benchmark = Path(folder), benchmark

    @property
    def eval_path(self) -> Path:
        return eval_file(self.folder, self.benchmark)

    def previous(self) -> EvalResult | None:
        """The result an earlier evaluation left in this folder (its EVAL file), or None."""
        if not self.eval_path.is_file():
            return None
        with open(self.eval_path, encoding="utf-8") as f:
            payload = json.load(f)
        return EvalResult.from_eval_payload(self.benchmark, payload) if isinstance(payload, dict) else None

    def reusable(self, fingerprints: Mapping[str, str], overwrite: bool) -> tuple[dict[str, Any], EvalResult | None]:
        """``({metric: earlier entry}, earlier result)``: the metrics of the earlier EVAL file whose recorded
        fingerprint equals ``fingerprints[metric]`` (nothing with ``overwrite``)."""
        previous = None if overwrite else self.previous()
        if previous is None:
            return {}, None
        old = previous.meta.get("fingerprints") or {}
        reused = {name: previous.entries[name] for name, print_ in fingerprints.items()
                  if isinstance(previous.entries.get(name), dict) and old.get(name) == print_}
        return reused, previous

    def save(self, result: EvalResult) -> None:
        result.save(self.folder)


__all__ = ["EvalResult", "ResultStore", "finite_or_none", "content_hash", "file_digest", "code_version",
           "model_fingerprint", "evaluated_model_id", "utc_timestamp"]
