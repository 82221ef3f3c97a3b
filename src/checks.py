"""Value checks shared by every config consumer: numbers in a range, names from a set, booleans.

Each raises a ValueError (``BadValueError``) whose one-line message names the key as a user writes it
(``trainer.method_args.beta``), the value given, and what is valid, e.g.::

    GradDiff: trainer.method_args.alpha='high' is a str; must be a number >= 0
    NPO: trainer.method_args.beta=nan; must be a finite number > 0

so a bad value is refused before any work, never as a TypeError deep inside a loss.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any


class BadValueError(ValueError):
    """A config value of the wrong type or outside its valid range (one-line message)."""


def _where(name: str, owner: str | None) -> str:
    return f"{owner}: {name}" if owner else name


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False,
                 allow_none: bool = False, owner: str | None = None, hint: str = "") -> Any:
    """``value`` if it is a finite number (an ``int`` when ``integer``) within the bounds, else BadValueError.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``; ``None`` passes only with
    ``allow_none``; bools are never numbers; NaN and infinities are always refused. ``owner`` (e.g. the
    method's name) and ``hint`` (what to do instead) go into the message. Returns ints as they are and
    other numbers as ``float``.
    """
    kind = "an integer" if integer else "a finite number"
    valid = kind + _range(low, high, low_open, high_open) + (" or null" if allow_none else "")
    tail = f" ({hint})" if hint else ""
    if value is None and allow_none:
        return None
    wrong_type = isinstance(value, bool) or not isinstance(value, numbers.Real) or \
        (integer and not isinstance(value, numbers.Integral))
    if wrong_type:
        got = "null" if value is None else f"a {type(value).__name__}"
        raise BadValueError(f"{_where(name, owner)}={value!r} is {got}; must be {valid}{tail}")
    if not integer and not math.isfinite(value):
        raise BadValueError(f"{_where(name, owner)}={value!r}; must be {valid}{tail}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise BadValueError(f"{_where(name, owner)}={value!r}; must be {valid}{tail}")
    return int(value) if integer else float(value)


def check_choice(name: str, value: Any, choices: Iterable[Any], *, allow_none: bool = False,
                 owner: str | None = None) -> Any:
    """``value`` if it is one of ``choices`` (or None with ``allow_none``), else BadValueError listing them."""
    choices = tuple(choices)
    if (value is None and allow_none) or (value is not None and _hashable(value) and value in choices):
        return value
    valid = ", ".join(str(c) for c in choices) + (" or null" if allow_none else "")
    raise BadValueError(f"{_where(name, owner)}={value!r}; valid: {valid}")


def check_bool(name: str, value: Any, *, owner: str | None = None) -> bool:
    """``value`` if it is a bool (not a string such as 'false', which would read as true), else BadValueError."""
    if isinstance(value, bool):
        return value
    raise BadValueError(f"{_where(name, owner)}={value!r} is a {type(value).__name__}; must be true or false")


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


__all__ = ["BadValueError", "check_number", "check_choice", "check_bool"]
