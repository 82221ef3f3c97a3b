"""Progress of the long loops: a bar on a terminal, log lines elsewhere.

A bar is shown when ``UNLEARNING_PROGRESS`` is ``1``, hidden when it is ``0``, and otherwise shown only
if stderr is a terminal. Where no bar is drawn (a log file, CI, a cluster job), a loop logs one INFO line
when it starts and then at most one every ``LOG_INTERVAL_S`` seconds (items done of the total, time
elapsed, an estimate of the time left), and a last one when it took longer than that: nobody watches a
silent job for half an hour wondering whether it is stuck. Only process 0 of a multi-process run reports.
``quiet_library_bars`` applies the same rule to the bars of transformers (weight loading) and datasets
(file reading), which print one line per update when not on a terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("progress")

#: ``1`` / ``0`` forces progress bars on / off; unset: on a terminal only.
PROGRESS_ENV = "UNLEARNING_PROGRESS"
#: Without a bar, the longest a loop goes without a log line (seconds).
LOG_INTERVAL_S = 30.0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class LoggedProgress:
    """What a loop reports where no bar is drawn (see the module docstring); the part of tqdm's interface the
    loops use: ``update(n)``, ``close()``, a context manager."""

    def __init__(self, total: int, desc: str, unit: str = "row", report: bool = True) -> None:
        self.total, self.desc, self.unit, self.report = total, desc, unit, report
        self.done = 0
        self.started = self.last = time.monotonic()
        if report:
            log.info("%s: %d %s(s) to go", desc, total, unit)

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.report and now - self.last >= LOG_INTERVAL_S:
            self.last = now
            elapsed = now - self.started
            left = elapsed / self.done * (self.total - self.done) if self.done and self.total >= self.done else None
            log.info("%s: %d/%d %s(s), %s elapsed%s", self.desc, self.done, self.total, self.unit, _duration(elapsed),
                     f", about {_duration(left)} left" if left is not None else "")

    def close(self) -> None:
        elapsed = time.monotonic() - self.started
        if self.report and elapsed >= LOG_INTERVAL_S:
            log.info("%s: %d %s(s) done in %s", self.desc, self.done, self.unit, _duration(elapsed))
        self.report = False  # closed once

    def __enter__(self) -> LoggedProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress_enabled() -> bool:
    """Whether bars are drawn here (the environment switch, else whether stderr is a terminal; process 0 only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return False
    forced = os.environ.get(PROGRESS_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def progress(total: int, desc: str, unit: str = "row") -> tqdm | LoggedProgress:
    """A bar over ``total`` items (update it with the items done; its rate is items per second), or where no bar
    is drawn, log lines (``LoggedProgress``; none on processes other than 0)."""
    if progress_enabled():
        return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
    return LoggedProgress(total, desc, unit, report=int(os.environ.get("RANK", "0")) == 0)


def progress_over(items: Iterable[Any], desc: str, unit: str = "row") -> Iterator[Any]:
    """``items`` (materialised into a list unless a list or range) with a bar advancing one per item."""
    items = items if isinstance(items, (list, range)) else list(items)
    with progress(len(items), desc, unit=unit) as bar:
        for item in items:
            yield item
            bar.update(1)


def quiet_library_bars() -> None:
    """transformers' and datasets' own bars follow ``progress_enabled`` too."""
    if progress_enabled():
        return
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
