"""Evaluation metrics: pure functions from per-sample model statistics to the open-unlearning result layout.

Every metric is registered under a handler name (the ``handler`` of a metric in ``configs/eval/<bench>.yaml``)
with :func:`register_metric`; :func:`get_metric` looks one up. A metric's compute function is called with
keyword arguments only::

    fn(*, token_stats=None, generations=None, grad_norms=None, reference_token_stats=None, samples=None,
       scored_answers=None, pre_compute=None, reference_logs=None, **options) -> dict

and returns ``{"agg_value": float | None, "value_by_index": {"<index>": {...}}}`` (plus extra keys documented
per metric). ``MetricSpec.needs`` names the inputs the engine has to supply.

Broken samples (no answer token, or a non-finite log-probability) are never turned into NaN: their values are
``None``, their indices are listed under ``"excluded"`` and aggregates are taken over the remaining samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The metric inputs a model pass supplies, each by the one runner ``evals.runners`` registers for it.
PASS_INPUTS: tuple[str, ...] = ("token_stats", "generations", "grad_norms", "reference_token_stats", "samples",
                                 "scored_answers")
#: What a metric may declare in ``needs``: the pass inputs, and the other inputs below.
ALLOWED_NEEDS: frozenset[str] = frozenset(PASS_INPUTS + ("vocab_moments", "pre_compute", "reference_logs"))
#: ``vocab_moments`` (with ``token_stats``): the metric reads ``TokenStats.mean_logp`` / ``std_logp``, which the
#: teacher-forced pass computes (two more sweeps over the vocabulary per answer token) only for the datasets
#: such a metric reads.


@dataclass(eq=False)
class TokenStats:
    """Teacher-forced statistics of one answer, one entry per scored answer token.

    ``ends_with_eos``: the last entry is the end-of-answer (EOS) token (question-answer data), which the
    memorisation and Min-K% metrics leave out (``content``); False for raw text (a MUSE chunk, a verbatim
    continuation), where every token is content. ``logp[t]``: log p(answer token t); ``mean_logp[t]`` = E_{v~p}[log p(v)] and ``std_logp[t]`` =
    sqrt(Var_{v~p}[log p(v)]) of the model's next-token distribution at that position; ``argmax_match[t]``:
    the argmax prediction equals the answer token. ``answer_text`` is the ground-truth answer string.
    ``mean_logp`` and ``std_logp`` are None when the pass skipped them (no metric reading the dataset
    declared ``vocab_moments``).
    """

    logp: np.ndarray
    mean_logp: np.ndarray | None
    std_logp: np.ndarray | None
    argmax_match: np.ndarray
    answer_text: str = ""
    ends_with_eos: bool = True

    def __post_init__(self) -> None:
        self.logp = np.asarray(self.logp, dtype=np.float64).reshape(-1)
        if (self.mean_logp is None) != (self.std_logp is None):
            raise ValueError("TokenStats: give both mean_logp and std_logp, or neither")
        if self.mean_logp is not None:
            self.mean_logp = np.asarray(self.mean_logp, dtype=np.float64).reshape(-1)
            self.std_logp = np.asarray(self.std_logp, dtype=np.float64).reshape(-1)
        self.argmax_match = np.asarray(self.argmax_match, dtype=bool).reshape(-1)
        moments = () if self.mean_logp is None else (self.mean_logp, self.std_logp)
        lengths = {len(a) for a in (self.logp, *moments, self.argmax_match)}
        if len(lengths) != 1:
            raise ValueError(
                "TokenStats arrays must have one entry per answer token; got lengths "
                f"logp={len(self.logp)}, mean_logp={len(moments[0]) if moments else None}, "
                f"std_logp={len(moments[1]) if moments else None}, argmax_match={len(self.argmax_match)}"
            )

    @property
    def num_tokens(self) -> int:
        """T, the number of scored answer tokens (EOS included when ``ends_with_eos``)."""
        return len(self.logp)

    @property
    def content(self) -> slice:
        """The entries of the answer's own tokens: all but the last (EOS) when ``ends_with_eos``, else all."""
        return slice(0, self.num_tokens - 1 if self.ends_with_eos else self.num_tokens)

    @property
    def num_content_tokens(self) -> int:
        """T' = T - 1 with an EOS at the end, T without."""
        return max(self.num_tokens - 1, 0) if self.ends_with_eos else self.num_tokens

    def is_valid(self) -> bool:
        """False for a broken sample: no answer token, or a non-finite log-probability."""
        return self.num_tokens > 0 and bool(np.all(np.isfinite(self.logp)))


@dataclass(frozen=True)
class MetricSpec:
    name: str
    fn: Callable[..., dict]
    higher_is_better: bool | None
    needs: tuple[str, ...]
    description: str
    #: Keys the metric reads from each ``reference_logs`` result (another model's EVAL entry), checked
    #: before any pass (``Evaluator.check_reference_logs``).
    reference_fields: tuple[str, ...] = ()
    #: Per-sample fields of its ``value_by_index`` where a higher value means more of the answer is known (the
    #: rephrasing attack keeps each sample's maximum over variants; the first field makes the aggregate).
    sample_fields: tuple[str, ...] = ()
    #: Checks the handler's whole metric config before any pass, ``check_config(config, owner)``: raises a
    #: ValueError naming ``owner``, the key and what is valid (what the option names alone cannot show).
    check_config: Callable[[Mapping, str], None] | None = None


METRIC_REGISTRY: dict[str, MetricSpec] = {}


def register_metric(
    name: str, *, higher_is_better: bool | None, needs: Iterable[str], description: str = "",
    reference_fields: Iterable[str] = (), sample_fields: Iterable[str] = (),
    check_config: Callable[[Mapping, str], None] | None = None,
) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    """Decorator registering a compute function under ``name``."""
    needs = tuple(needs)
    unknown = sorted(set(needs) - ALLOWED_NEEDS)
    if unknown:
        raise ValueError(f"metric {name!r}: unknown needs {unknown}; allowed: {sorted(ALLOWED_NEEDS)}")

    def decorator(fn: Callable[..., dict]) -> Callable[..., dict]:
        if name in METRIC_REGISTRY:
            raise ValueError(f"metric {name!r} is already registered")
        doc = description or (fn.__doc__ or "").strip().split("\n")[0]
        METRIC_REGISTRY[name] = MetricSpec(
            name=name, fn=fn, higher_is_better=higher_is_better, needs=needs, description=doc,
            reference_fields=tuple(reference_fields), sample_fields=tuple(sample_fields), check_config=check_config,
        )
        return fn

    return decorator


def get_metric(name: str) -> MetricSpec:
    """The registered metric ``name``; an unknown name raises ValueError listing the valid ones."""
    if name not in METRIC_REGISTRY:
        raise ValueError(f"unknown metric {name!r}; registered metrics: {sorted(METRIC_REGISTRY)}")
    return METRIC_REGISTRY[name]


# ---------------------------------------------------------------------------------------------------------
# shared helpers of the family modules (private)
# ---------------------------------------------------------------------------------------------------------


def _index_sort_key(key: Any) -> tuple:
    s = str(key)
    try:
        return (0, int(s), s)
    except ValueError:
        return (1, 0, s)


def _sorted_keys(keys: Iterable[Any]) -> list:
    return sorted(keys, key=_index_sort_key)


def _excluded_entry(key: Any) -> int | str:
    try:
        return int(key)
    except (TypeError, ValueError):
        return str(key)


def _mean_or_none(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return None
    return float(np.mean(kept))


def _result(agg_value: float | None, value_by_index: dict, excluded: list, **extra: Any) -> dict:
    """The open-unlearning layout, with ``excluded`` (and a note when nothing is left) when samples dropped."""
    out: dict[str, Any] = {"agg_value": None if agg_value is None else float(agg_value)}
    out.update(extra)
    out["value_by_index"] = value_by_index
    if excluded:
        out["excluded"] = [_excluded_entry(k) for k in _sorted_keys(excluded)]
        if agg_value is None and "note" not in out:
            out["note"] = "every sample was excluded (no answer token or a non-finite value)"
    return out


def _require(value: Any, what: str, metric: str) -> Any:
    if value is None:
        raise ValueError(f"metric {metric!r} needs {what}, which was not supplied")
    return value


def _one_role(value: Any, what: str, metric: str) -> Mapping:
    """The per-index input of a metric that reads one dataset. A metric's pass inputs are always keyed by the
    dataset roles of its config (``{role: {index: ...}}``, e.g. ``{"main": ...}``); this one must list exactly
    one role. ValueError otherwise, naming what it got."""
    value = _require(value, what, metric)
    if not isinstance(value, Mapping) or len(value) != 1 or not all(isinstance(k, str) for k in value):
        got = sorted(map(str, value)) if isinstance(value, Mapping) else type(value).__name__
        raise ValueError(f"metric {metric!r} reads one dataset: {what} must be keyed by its dataset role "
                         f"({{role: {{index: ...}}}}), with one role; got {got}")
    return next(iter(value.values()))


def _pre_compute_entry(pre_compute: Mapping | None, key: str, metric: str) -> dict:
    pre_compute = _require(pre_compute, "pre_compute", metric)
    if key not in pre_compute or pre_compute[key] is None:
        raise ValueError(
            f"metric {metric!r} needs pre_compute[{key!r}]; got access keys {sorted(pre_compute)}"
        )
    return pre_compute[key]


def _check_same_indices(a: Mapping, b: Mapping, name_a: str, name_b: str, metric: str, shown: int = 5) -> None:
    """Raise ValueError when the index sets (compared as strings) of two value_by_index maps differ."""
    keys_a = {str(k) for k in a}
    keys_b = {str(k) for k in b}
    if keys_a == keys_b:
        return
    only_a = _sorted_keys(keys_a - keys_b)
    only_b = _sorted_keys(keys_b - keys_a)
    parts = []
    if only_a:
        parts.append(f"{len(only_a)} only in {name_a} (first: {only_a[:shown]})")
    if only_b:
        parts.append(f"{len(only_b)} only in {name_b} (first: {only_b[:shown]})")
    raise ValueError(f"metric {metric!r}: {name_a} and {name_b} cover different indices: " + "; ".join(parts))


def _as_float_list(value: Any) -> list[float] | None:
    """A scalar or list field of a result as a list of floats; None when missing or containing None/NaN."""
    if value is None:
        return None
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not values or any(v is None for v in values):
        return None
    out = [float(v) for v in values]
    if not all(math.isfinite(v) for v in out):
        return None
    return out


from . import aggregate, fluency, leakage, memorization, mia, privacy, probability, rouge, utility  # noqa: E402  (fill the registry)
from .aggregate import memorization_score, privacy_score, smia_score  # noqa: E402
from .fluency import ngram_entropy, weighted_ngram_entropy  # noqa: E402
from .leakage import ScoredAnswers, best_of_n, leak_at_k, leak_rate  # noqa: E402
from .memorization import exact_memorization_score, extraction_strength_score  # noqa: E402
from .mia import (  # noqa: E402
    min_k_plus_plus_score,
    min_k_score,
    reference_score,
    roc_auc,
    zlib_entropy,
    zlib_score,
)
from .privacy import forget_quality, privleak_score  # noqa: E402
from .probability import (  # noqa: E402
    mean_nll,
    prob_with_options,
    sequence_prob,
    truth_ratio,
    truth_ratio_aggregate,
)
from .rouge import rouge_scores  # noqa: E402
from .utility import harmonic_mean  # noqa: E402

__all__ = [
    "ALLOWED_NEEDS",
    "aggregate",
    "PASS_INPUTS",
    "METRIC_REGISTRY",
    "MetricSpec",
    "TokenStats",
    "exact_memorization_score",
    "extraction_strength_score",
    "fluency",
    "forget_quality",
    "get_metric",
    "harmonic_mean",
    "best_of_n",
    "leak_at_k",
    "leak_rate",
    "leakage",
    "ScoredAnswers",
    "mean_nll",
    "memorization",
    "memorization_score",
    "mia",
    "min_k_plus_plus_score",
    "ngram_entropy",
    "min_k_score",
    "privacy",
    "privacy_score",
    "privleak_score",
    "prob_with_options",
    "probability",
    "reference_score",
    "register_metric",
    "roc_auc",
    "rouge",
    "rouge_scores",
    "sequence_prob",
    "smia_score",
    "truth_ratio",
    "truth_ratio_aggregate",
    "utility",
    "weighted_ngram_entropy",
    "zlib_entropy",
    "zlib_score",
]
