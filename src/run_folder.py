"""The output folder of a training run: never destroyed unless it is a finished run of ours.

A run never writes into ``paths.output_dir`` directly. It works in a staging folder of its own next
to it, ``<name>.incomplete-<pid>-<time>-<random>``, while holding a lock on the output path
(``.<name>.lock``, an ``fcntl`` lock the system releases when the process dies, even by SIGKILL).
When everything is written, the last file being the completion marker (``run_complete.json``, next
to the resolved ``config.yaml``), the staging folder takes the output folder's place in one step:

- an existing output folder is replaced only if it is empty or a finished run of ours (both files present)
  of the same kind (an evaluation never replaces a training run, nor a training run an evaluation);
  anything else (a folder of the user's files, a file, an older run without the marker) is an error
  before any work starts, as is an output folder that is, or contains, something the run reads (the
  model, the data folder, a retain model's EVAL file);
- the swap is an atomic exchange of the two folders (Linux ``renameat2(RENAME_EXCHANGE)``), so there
  is never a moment without a complete run in place; where the system has no exchange, the old run is
  first renamed to ``<name>.replaced-<pid>`` and a later run puts it back if a crash came between
  the two renames;
- a second run to the same output while one is running fails at once (the lock is held);
- a failed or interrupted run (an exception, SIGINT, SIGTERM) removes its staging folder, unless it
  already holds checkpoints: those are kept for ``trainer.args.resume_from_checkpoint`` (a staging
  folder is never mistaken for a result: it has no completion marker and another name). Staging
  folders of dead runs are cleaned only while holding the lock (so their runs are gone), by the next
  run that finishes for this output.

Resuming (``resume_from_checkpoint=true`` or a checkpoint folder) adopts the interrupted run's
staging folder, so its checkpoints survive until the resuming run finishes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import errno
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Written last into a finished run's folder; with ``config.yaml`` it marks a folder we may replace.
COMPLETION_MARKER = "run_complete.json"
RUN_CONFIG = "config.yaml"
#: The rest of a finished run's layout (read by src/report.py): the trainer's log history, one line per
#: evaluation during training, the best checkpoint's record, and the folder of the result's evaluation.
TRAIN_LOG_FILE = "train_log.jsonl"
EVAL_HISTORY_FILE = "eval_history.jsonl"
BEST_CHECKPOINT_FILE = "best_checkpoint.json"
RESULT_EVALS_DIR = "evals"
#: A benchmark's result files in an evaluation folder: ``<NAME>_EVAL.json`` (every metric, per-sample values,
#: ``_meta``), ``<NAME>_SUMMARY.json`` (headline numbers) and, under attack, ``<NAME>_ROBUSTNESS.json``.
EVAL_SUFFIX = "_EVAL.json"
SUMMARY_SUFFIX = "_SUMMARY.json"
ROBUSTNESS_SUFFIX = "_ROBUSTNESS.json"
#: What a Hugging Face checkpoint folder needs for an exact resume (optimizer, schedule, RNG, state).
RESUMABLE_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def eval_file(folder: Path, benchmark: str) -> Path:
    return Path(folder) / f"{benchmark}{EVAL_SUFFIX}"


def summary_file(folder: Path, benchmark: str) -> Path:
    return Path(folder) / f"{benchmark}{SUMMARY_SUFFIX}"


def robustness_file(folder: Path, benchmark: str) -> Path:
    return Path(folder) / f"{benchmark}{ROBUSTNESS_SUFFIX}"


class OutputFolderError(RuntimeError):
    """The output folder cannot be used (it is not ours, a run is writing it, it holds an input...)."""


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and one ``os.replace``: a
    reader sees the old file or the new one, never half of it (the temporary file goes on failure)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def publish_folder(staging: Path, target: Path) -> bool:
    """Move the fully written folder ``staging`` to ``target`` in one rename, for caches that several
    processes may fill at once (a converted model, generated task files): a reader sees no folder or the
    whole one. When ``target`` already exists (another process published it first), ``staging`` is removed
    and ``target`` is left as it is. Returns whether ``staging`` became ``target``."""
    try:
        os.rename(staging, target)  # refused when target exists with anything in it
        return True
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)
        return False


def _json_default(value: Any) -> Any:
    """Numbers and arrays of numpy and torch as plain JSON numbers and lists (torch only if already imported:
    the report reads run folders without it)."""
    torch = sys.modules.get("torch")
    if isinstance(value, (np.ndarray, np.generic)) or torch is not None and isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path: Path, payload: Any, indent: int | None = 2) -> None:
    """``payload`` as JSON at ``path`` (its folder made if needed), through ``write_atomic``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(payload, indent=indent, default=_json_default, allow_nan=True))


def is_finished_run(folder: Path) -> bool:
    """Whether ``folder`` is a run of ours that finished: its resolved config and completion marker exist."""
    return (folder / RUN_CONFIG).is_file() and (folder / COMPLETION_MARKER).is_file()


def resumable_checkpoint(checkpoint: Path) -> bool:
    """Whether a checkpoint folder holds what an exact resume needs (``RESUMABLE_FILES``; a weights-only
    checkpoint, ``save_only_model=true``, does not)."""
    return all((checkpoint / f).is_file() for f in RESUMABLE_FILES)


def folder_bytes(folder: Path) -> int:
    """The size of the files under ``folder`` (links not followed)."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _size(folder: Path) -> str:
    return f"{folder_bytes(folder) / 1e6:.1f} MB"


def stale_folders(root: Path) -> list[Path]:
    """Folders left by dead runs under ``root`` (at any depth): staging folders (``<name>.incomplete-*``) and
    runs set aside during a replacement (``<name>.replaced-*``) whose output's lock no process holds."""
    found = []
    for path in sorted(root.rglob("*")):
        if not path.is_dir() or not (".incomplete-" in path.name or ".replaced-" in path.name):
            continue
        name = path.name.split(".incomplete-")[0].split(".replaced-")[0]
        lock_path = path.parent / f".{name}.lock"
        if lock_path.is_file():
            with open(lock_path, "a+") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # its run is alive
                fcntl.flock(handle, fcntl.LOCK_UN)
        found.append(path)
    return [p for p in found if not any(q in p.parents for q in found)]


def finished_mode(folder: Path) -> str | None:
    """The ``mode`` a finished run of ours records (``train``, ``unlearn``, ``eval``); None when ``folder`` is no
    finished run. An evaluation folder written before evaluations had a completion marker (``config.yaml`` with
    ``mode: eval`` and an ``*_EVAL.json``) counts as a finished evaluation."""
    if is_finished_run(folder):
        try:
            return json.loads((folder / COMPLETION_MARKER).read_text(encoding="utf-8")).get("mode") or "unlearn"
        except (OSError, ValueError):
            return None
    config = folder / RUN_CONFIG
    if config.is_file() and any(folder.glob(f"*{EVAL_SUFFIX}")):
        lines = config.read_text(encoding="utf-8", errors="replace").splitlines()
        if "mode: eval" in lines:
            return "eval"
    return None


def _kind(mode: str | None) -> str:
    return "evaluation" if mode == "eval" else "training run"


def checkpoints(folder: Path) -> list[Path]:
    """The ``checkpoint-<step>`` folders of ``folder`` with a trainer state, oldest step first."""
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(..., RENAME_EXCHANGE)``); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False  # e.g. a file system without exchange
    raise OSError(err, f"renameat2 exchange of {a} and {b}: {os.strerror(err)}")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


class RunFolder:
    """Lock, staging folder and final swap of one run's ``output_dir`` (see the module docstring).

    Only the main process of a run uses it; the others receive the staging folder's path.

    Args:
        output_dir: ``paths.output_dir``.
        inputs: paths the run reads (model folder, data folder, EVAL files...; names that are no local
            path, such as Hub ids, are ignored): the output folder may neither be nor contain any of them.
        mode: the run's ``mode`` (``train``, ``unlearn``, ``eval``), recorded in the completion marker; a finished
            training run is never replaced by an evaluation, nor an evaluation by a training run.
    """

    def __init__(self, output_dir: str | os.PathLike, inputs: list[str | os.PathLike] = (), mode: str = "unlearn"):
        self.mode = mode
        self.output_dir = Path(output_dir).absolute()
        self.parent, self.name = self.output_dir.parent, self.output_dir.name
        self.inputs = [Path(p).expanduser().absolute() for p in inputs if p and Path(p).expanduser().exists()]
        self.staging: Path | None = None
        self._lock_file: Any = None

    # ----- start -----------------------------------------------------------------------------------
    def start(self, resume: bool | str | None = None, carry_over: bool = False) -> tuple[Path, Path | None]:
        """Check the output folder, take the lock and make (or adopt) the staging folder.

        Returns ``(staging folder, checkpoint to resume from or None)``. ``resume``: ``True`` (the
        latest checkpoint of this output's interrupted runs), a checkpoint folder, or None/False.
        ``carry_over``: the staging folder starts as a copy of the finished run it will replace (an
        evaluation adds to the results already there, and reuses them).
        """
        self._check_inputs()
        self.parent.mkdir(parents=True, exist_ok=True)
        self._lock()
        self._restore_replaced()
        existing = finished_mode(self.output_dir) if self.output_dir.is_dir() else None
        empty = self.output_dir.is_dir() and not any(self.output_dir.iterdir())  # nothing to lose
        if self.output_dir.exists() and not empty and (existing is None or _kind(existing) != _kind(self.mode)):
            what = "a file" if not self.output_dir.is_dir() else (
                "a folder that is not a finished run of this framework (no " + COMPLETION_MARKER + " next to "
                + RUN_CONFIG + ")") if existing is None else \
                f"a finished {_kind(existing)} (mode {existing}), which this {_kind(self.mode)} would replace"
            self.release()
            raise OutputFolderError(
                f"paths.output_dir={self.output_dir} exists and is {what}: it is never replaced. Choose another "
                "paths.output_dir (or task_name), or move that path away yourself")
        checkpoint = self._resume_point(resume)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.staging = Path(tempfile.mkdtemp(prefix=f"{self.name}.incomplete-{os.getpid()}-{stamp}-", dir=self.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.staging, 0o777 & ~umask)  # mkdtemp makes it private; the result should not be
        if carry_over and self.output_dir.is_dir():
            shutil.copytree(self.output_dir, self.staging, dirs_exist_ok=True, symlinks=True)
            (self.staging / COMPLETION_MARKER).unlink(missing_ok=True)  # written again, last, by finish()
        if checkpoint is not None and checkpoint.parent.parent == self.parent and \
                checkpoint.parent.name.startswith(f"{self.name}.incomplete-"):
            os.replace(checkpoint.parent, self.staging)  # adopt the interrupted run's staging folder (onto the empty one)
            checkpoint = self.staging / checkpoint.name
            log.info("resuming from %s (the interrupted run's folder is now %s)", checkpoint, self.staging)
        return self.staging, checkpoint

    def _check_inputs(self) -> None:
        for path in self.inputs:
            if _inside(path, self.output_dir):
                raise OutputFolderError(
                    f"paths.output_dir={self.output_dir} is or contains {path}, which this run reads: replacing "
                    "the output folder at the end would delete it. Choose another paths.output_dir")

    def _lock(self) -> None:
        lock_path = self.parent / f".{self.name}.lock"
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise OutputFolderError(
                f"another run is writing paths.output_dir={self.output_dir} ({holder}); wait for it to finish "
                "or choose another paths.output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        self._lock_file = handle

    def release(self) -> None:
        """Give the lock back (the lock file itself stays: removing it would race with a new run)."""
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _stale(self, pattern: str) -> list[Path]:
        """Folders of dead runs next to the output (the caller holds the lock), newest first."""
        found = [p for p in self.parent.glob(f"{self.name}.{pattern}-*") if p.is_dir() and p != self.staging]
        return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)

    def _restore_replaced(self) -> None:
        """Put back a finished run that a crash left renamed aside (two-rename fallback of ``finish``)."""
        for old in self._stale("replaced"):
            if not self.output_dir.exists() and is_finished_run(old):
                os.replace(old, self.output_dir)
                log.warning("put back %s, left aside by an interrupted replacement", self.output_dir)
            else:
                shutil.rmtree(old, ignore_errors=True)

    def _resume_point(self, resume: bool | str | None) -> Path | None:
        if resume in (None, False, "", "false", "False"):
            for stale in self._stale("incomplete"):
                resumable = [c for c in checkpoints(stale) if resumable_checkpoint(c)]
                if resumable:
                    log.warning("an interrupted run of %s left checkpoints in %s: add "
                                "trainer.args.resume_from_checkpoint=true to continue it", self.output_dir, stale)
                elif checkpoints(stale):
                    log.warning("an interrupted run of %s left weights-only checkpoints in %s (saved with "
                                "trainer.args.save_only_model=true: no optimizer state, so they cannot be resumed); "
                                "they are removed when a run of this output finishes: copy them elsewhere to keep "
                                "them", self.output_dir, stale)
            for stale in self._stale("incomplete"):
                if not checkpoints(stale):
                    log.warning("%s is the staging folder of an interrupted run of %s (%s, nothing resumable); it "
                                "is removed when a run of this output finishes, or now by python src/clean.py %s",
                                stale, self.output_dir, _size(stale), self.parent)
            return None
        if resume is True or str(resume).lower() == "true":
            candidates = [c for stale in self._stale("incomplete") for c in checkpoints(stale)[-1:]
                          if resumable_checkpoint(c)]
            if not candidates:
                self.release()
                raise OutputFolderError(
                    f"trainer.args.resume_from_checkpoint=true: no interrupted run of paths.output_dir="
                    f"{self.output_dir} left a resumable checkpoint (looked for {self.parent}/{self.name}.incomplete-*/"
                    "checkpoint-* with " + ", ".join(RESUMABLE_FILES) + "); give a checkpoint folder instead, or "
                    "drop the option")
            checkpoint = candidates[0]
        else:
            checkpoint = Path(str(resume)).expanduser().absolute()
            if not (checkpoint / "trainer_state.json").is_file():
                self.release()
                raise OutputFolderError(f"trainer.args.resume_from_checkpoint={resume}: not a checkpoint folder "
                                        "(no trainer_state.json in it)")
        if not resumable_checkpoint(checkpoint):
            missing = [f for f in RESUMABLE_FILES if not (checkpoint / f).is_file()]
            self.release()
            raise OutputFolderError(
                f"checkpoint {checkpoint} cannot be resumed exactly: it lacks {', '.join(missing)} (it was saved "
                "with trainer.args.save_only_model=true, which keeps the weights only)")
        return checkpoint

    # ----- end -------------------------------------------------------------------------------------
    def finish(self, summary: dict | None = None) -> None:
        """Write the completion marker last, then put the staging folder in the output folder's place."""
        assert self.staging is not None, "start() first"
        marker = {"finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "mode": self.mode, **(summary or {})}
        write_atomic(self.staging / COMPLETION_MARKER, json.dumps(marker, indent=2) + "\n")
        if self.output_dir.exists():
            if _exchange(self.staging, self.output_dir):
                shutil.rmtree(self.staging)  # the earlier run, now at the staging path
            else:
                aside = self.parent / f"{self.name}.replaced-{os.getpid()}"
                os.replace(self.output_dir, aside)
                os.replace(self.staging, self.output_dir)
                shutil.rmtree(aside)
        else:
            os.replace(self.staging, self.output_dir)
        self.staging = None
        for stale in self._stale("incomplete"):  # superseded by the run just finished
            held = [c.name for c in checkpoints(stale)]
            log.warning("removing %s, the staging folder of an interrupted run of this output (%s%s), superseded by "
                        "the run just finished", stale, _size(stale),
                        f"; checkpoints {', '.join(held)}" if held else "")
            shutil.rmtree(stale, ignore_errors=True)
        self.release()

    def abandon(self) -> Path | None:
        """After a failure: remove the staging folder unless it holds checkpoints (returned then)."""
        kept = None
        if self.staging is not None and self.staging.exists():
            if checkpoints(self.staging):
                kept = self.staging
            else:
                shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None
        self.release()
        return kept


__all__ = ["RunFolder", "OutputFolderError", "is_finished_run", "finished_mode", "checkpoints", "folder_bytes", "resumable_checkpoint", "stale_folders",
           "COMPLETION_MARKER"]
