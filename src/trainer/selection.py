"""Choosing the best checkpoint of a run from its evaluations during training.

``trainer.args.metric_for_best_model`` names the metric to optimise: a key an evaluation logs
(``eval_loss``, ``eval_tofu_model_utility``) or, shorter, a benchmark's summary metric
(``model_utility``, ``tofu_model_utility``). ``trainer.best_model_constraint`` (e.g.
``forget_quality >= 0.05``) admits only the evaluations where another metric passes a threshold: an
evaluation that fails it is never the best, however good its metric. With
``load_best_model_at_end=true`` the best admitted checkpoint becomes the run's result.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from checks import BadValueError

#: The comparisons a constraint may use.
COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
}
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][\w.@-]*)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class MetricConstraint:
    """``<metric> <comparison> <threshold>``; ``key`` is the logged name the metric resolved to."""

    metric: str
    comparison: str
    threshold: float
    key: str | None = None

    def holds(self, metrics: Mapping[str, float]) -> bool:
        """Whether the evaluation ``metrics`` pass; a missing or non-finite value does not."""
        value = metrics.get(self.key or self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return COMPARISONS[self.comparison](float(value), self.threshold)

    def __str__(self) -> str:
        return f"{self.metric} {self.comparison} {self.threshold:g}"


def parse_constraint(text: str) -> MetricConstraint:
    """``"forget_quality >= 0.05"`` -> ``MetricConstraint("forget_quality", ">=", 0.05)``; BadValueError otherwise."""
    match = _CONSTRAINT.match(str(text))
    if not match:
        raise BadValueError(f"trainer.best_model_constraint={text!r}: write '<metric> <op> <number>', with op one of "
                            f"{', '.join(COMPARISONS)} (e.g. 'forget_quality >= 0.05')")
    return MetricConstraint(match.group(1), match.group(2), float(match.group(3)))


def resolve_metric_key(name: str, valid: Iterable[str | tuple[str, str]], *, setting: str,
                       notes: Iterable[str] = ()) -> str:
    """The logged evaluation key that ``name`` means.

    ``valid``: the ``eval_...`` keys the run's evaluations log. Tried in turn: ``name`` itself,
    ``eval_<name>`` (transformers' rule: ``loss`` is ``eval_loss``), then the one valid key
    ``eval_<bench>_<name>`` (a summary metric without its benchmark: ``model_utility`` ->
    ``eval_tofu_model_utility``; ``valid`` keys given as ``(key, bench)`` pairs say where the benchmark ends).
    BadValueError listing the valid keys (and ``notes``) when none or several match.
    """
    pairs = [item if isinstance(item, tuple) else (item, None) for item in valid]
    valid = [k for k, _ in pairs]
    key = name if name.startswith("eval_") else f"eval_{name}"
    if key in valid:
        return key
    matches = [k for k, bench in pairs if bench is not None and k == f"eval_{bench}_{name}"]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise BadValueError(f"{setting}={name!r} is ambiguous: it could be {', '.join(matches)}; give one of them")
    notes = list(notes)
    raise BadValueError(f"{setting}={name!r}: no evaluation of this run produces {key!r}; valid: "
                        f"{', '.join(valid) or 'none'}" + (f" ({'; '.join(notes)})" if notes else ""))
