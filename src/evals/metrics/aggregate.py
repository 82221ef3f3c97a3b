"""The aggregate scores of the OpenUnlearning paper (Dorna et al. 2025, "OpenUnlearning: Accelerating LLM
Unlearning via Unified Benchmarking of Methods and Metrics", arXiv:2506.12618): Memorization, Privacy and
Utility, each a harmonic mean over a family of metrics, and the Overall harmonic mean of the three.

The paper's code does not compute them (open-unlearning issues #150 and #172); these are written from the
paper's definitions, with the choices docs/evaluation.md ("Aggregate scores") lists where the paper leaves
a detail open. Every score lies in [0, 1], higher is better. They combine results the benchmark has already
computed (the metric configs name them under ``metric_inputs``), so they cost no model pass.

An input without a value (every sample excluded, or no retain model to compare with) makes a harmonic mean
undefined: the score is None, with a note naming each missing input and why. It is never taken as 0 and never
dropped from the mean. An input outside [0, 1] (a metric that is not a score or an AUC) is a ValueError.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from . import _require, register_metric
from .utility import harmonic_mean

NO_RETAIN_REASON = "no retain model result, retain_logs_path not given"


# ------------------------------------------------------------------------------------------ pure formulas


def _check_unit_interval(value: float, what: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{what} = {value}: must lie in [0, 1]")
    return value


def memorization_score(values: Sequence[float]) -> float:
    """Memorization = HM_i(1 - x_i), the harmonic mean of one minus each memorisation metric x_i in [0, 1]
    (OpenUnlearning, Dorna et al. 2025: TOFU's extraction strength, exact memorisation, paraphrased-answer
    probability and truth ratio P_correct / (P_correct + P_wrong)). 1 = nothing memorised; any x_i = 1 gives 0."""
    if not values:
        raise ValueError("memorization_score of no value")
    return harmonic_mean([1.0 - _check_unit_interval(v, "memorisation metric") for v in values])


def smia_score(auc: float, retain_auc: float) -> float:
    """sMIA, how close a membership-inference AUC is to the retain model's, in [0, 1] (OpenUnlearning, Dorna
    et al. 2025: 1 = the retain model's AUC, 0 = as far from it as an AUC can be):

        sMIA = 1 - |AUC - AUC_r| / (1 - AUC_r)   when AUC >= AUC_r (the attack separates more than on retain)
        sMIA = 1 - |AUC - AUC_r| / AUC_r         when AUC <  AUC_r (less: over-unlearned)

    The gap is scaled by the room left on its side of AUC_r, so AUC = 1 and AUC = 0 both give 0, and the
    score does not depend on which class the AUC calls positive. On the first side it equals
    1 - |PrivLeak| / 100 of MUSE (Shi et al. 2024), whose AUC is 1 - AUC here."""
    auc = _check_unit_interval(auc, "AUC")
    retain_auc = _check_unit_interval(retain_auc, "retain model AUC")
    if auc == retain_auc:
        return 1.0
    room = 1.0 - retain_auc if auc > retain_auc else retain_auc
    return 1.0 - abs(auc - retain_auc) / room


def privacy_score(aucs: Sequence[float], retain_aucs: Sequence[float]) -> float:
    """Privacy = HM_i(sMIA(AUC_i, AUC_r,i)) over membership-inference attacks i (OpenUnlearning, Dorna et al.
    2025: LOSS, ZLib, Min-K%, Min-K%++), each against the retain model's AUC of the same attack."""
    if not aucs or len(aucs) != len(retain_aucs):
        raise ValueError(f"privacy_score needs one retain AUC per AUC; got {len(aucs)} and {len(retain_aucs)}")
    return harmonic_mean([smia_score(a, r) for a, r in zip(aucs, retain_aucs)])


# ------------------------------------------------------------------------------------------ compute functions


def _agg_of(entry: Any, name: str, metric: str) -> tuple[float | None, str | None]:
    """(agg_value, None) of a metric result, or (None, why it has none: its own note when it gives one)."""
    if not isinstance(entry, Mapping) or "agg_value" not in entry:
        raise ValueError(f"{metric}: input {name!r} must be a metric result with an agg_value; got {entry!r}")
    value = entry["agg_value"]
    if value is None:
        return None, str(entry.get("note") or "no value (every sample excluded)")
    return _check_unit_interval(value, f"{metric}: input {name!r}"), None


def _undefined(metric: str, reasons: Mapping[str, str], **fields: Any) -> dict:
    """agg_value None, with a note naming the inputs without a value, grouped by reason."""
    by_reason: dict[str, list[str]] = {}
    for name, why in reasons.items():
        by_reason.setdefault(why, []).append(name)
    listed = "; ".join(f"{', '.join(names)}: {why}" for why, names in by_reason.items())
    return {"agg_value": None, **fields, "note": f"{metric} undefined (no value for {listed})"}


def _pre_compute(pre_compute: Mapping | None, metric: str) -> Mapping:
    pre_compute = _require(pre_compute, "pre_compute", metric)
    if not pre_compute:
        raise ValueError(f"{metric} needs at least one input (metric_inputs or pre_compute)")
    return pre_compute


def _input_values(pre_compute: Mapping | None, metric: str) -> tuple[dict[str, float | None], dict[str, str]]:
    """({input: agg_value or None}, {input without a value: why}) of a score's inputs."""
    values: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    for name, entry in _pre_compute(pre_compute, metric).items():
        values[name], why = _agg_of(entry, name, metric)
        if why:
            reasons[name] = why
    return values, reasons


@register_metric(
    "memorization_score", higher_is_better=True, needs=("pre_compute",),
    description="OpenUnlearning Memorization: harmonic mean of 1 - x over memorisation metrics (1 = nothing memorised)",
)
def memorization_score_metric(*, pre_compute=None, **_: object) -> dict:
    """:func:`memorization_score` of every input's agg_value. Returns ``{"agg_value", "inputs": {name: x},
    "scores": {name: 1 - x}}``; an input without a value gives agg_value None and a note."""
    inputs, reasons = _input_values(pre_compute, "memorization_score")
    scores = {name: None if x is None else 1.0 - x for name, x in inputs.items()}
    if reasons:
        return _undefined("memorization_score", reasons, inputs=inputs, scores=scores)
    return {"agg_value": memorization_score(list(inputs.values())), "inputs": inputs, "scores": scores}


@register_metric(
    "privacy_score", higher_is_better=True, needs=("pre_compute", "reference_logs"),
    description="OpenUnlearning Privacy: harmonic mean of sMIA, each MIA AUC's closeness to the retain model's",
)
def privacy_score_metric(*, pre_compute=None, reference_logs=None, **_: object) -> dict:
    """pre_compute[key]: this model's MIA result (agg_value = AUC); reference_logs[key]: the retain model's
    result of the same attack (same key), or None without retain_logs_path. Returns ``{"agg_value", "auc",
    "retain_auc", "scores": {key: sMIA}}``; a missing AUC on either side gives agg_value None and a note."""
    pre_compute = _pre_compute(pre_compute, "privacy_score")
    reference_logs = reference_logs or {}
    unpaired = sorted(set(pre_compute) - set(reference_logs))
    if unpaired:
        raise ValueError(f"privacy_score: no reference_logs entry for {unpaired}; give each attack's retain result "
                         f"the access key of its pre_compute entry (reference_logs keys: {sorted(reference_logs)})")
    aucs, retain_aucs, scores, reasons = {}, {}, {}, {}
    for name, entry in pre_compute.items():
        aucs[name], why = _agg_of(entry, name, "privacy_score")
        if reference_logs[name] is None:
            retain_aucs[name], retain_why = None, NO_RETAIN_REASON
        else:
            retain_aucs[name], retain_why = _agg_of(reference_logs[name], f"retain {name}", "privacy_score")
            retain_why = retain_why and f"retain model result: {retain_why}"
        missing = [w for w in (why, retain_why) if w]
        scores[name] = None if missing else smia_score(aucs[name], retain_aucs[name])
        if missing:
            reasons[name] = "; ".join(missing)
    fields = {"auc": aucs, "retain_auc": retain_aucs, "scores": scores}
    if reasons:
        return _undefined("privacy_score", reasons, **fields)
    return {"agg_value": privacy_score(list(aucs.values()), list(retain_aucs.values())), **fields}


@register_metric(
    "harmonic_mean_of_scores", higher_is_better=True, needs=("pre_compute",),
    description="harmonic mean of scores in [0, 1] (OpenUnlearning Utility and Overall)",
)
def harmonic_mean_of_scores_metric(*, pre_compute=None, **_: object) -> dict:
    """The harmonic mean of every input's agg_value, each a score in [0, 1]. Returns ``{"agg_value", "inputs"}``;
    an input without a value gives agg_value None and a note carrying the input's own note."""
    inputs, reasons = _input_values(pre_compute, "harmonic_mean_of_scores")
    if reasons:
        return _undefined("harmonic mean", reasons, inputs=inputs)
    return {"agg_value": harmonic_mean(list(inputs.values())), "inputs": inputs}


__all__ = ["NO_RETAIN_REASON", "memorization_score", "privacy_score", "smia_score"]
