"""Progress bars for the long loops, on a terminal only.

A bar is shown when ``UNLEARNING_PROGRESS`` is ``1``, hidden when it is ``0``, and otherwise shown only
if stderr is a terminal: a log file or CI gets no line per update. Only process 0 of a multi-process run
draws one. ``quiet_library_bars`` applies the same rule to the bars of transformers (weight loading) and
datasets (file reading), which print one line per update when not on a terminal.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

#: ``1`` / ``0`` forces progress bars on / off; unset: on a terminal only.
PROGRESS_ENV = "UNLEARNING_PROGRESS"


def progress_enabled() -> bool:
    """Whether bars are drawn here (the environment switch, else whether stderr is a terminal; process 0 only)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return False
    forced = os.environ.get(PROGRESS_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def progress(total: int, desc: str, unit: str = "row") -> tqdm:
    """A bar over ``total`` items (update it with the items done; its rate is items per second)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress_enabled(), leave=False, dynamic_ncols=True)


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
