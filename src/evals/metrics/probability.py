"""Answer probability, probability among options, and the Truth Ratio (TOFU, Maini et al. 2024).

All quantities are length-normalised: for an answer of T tokens (EOS included) with log-probabilities
``logp`` the mean negative log-likelihood is A = -mean(logp) and the normalised probability is exp(-A).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.special import logsumexp

from . import (
    _as_float_list,
    _check_same_indices,
    _mean_or_none,
    _one_role,
    _pre_compute_entry,
    _result,
    _sorted_keys,
    register_metric,
)

TRUTH_RATIO_AGGREGATORS = ("closer_to_1_better", "true_better", "prob_mean")


# ------------------------------------------------------------------------------------------ pure helpers


def mean_nll(logp: Sequence[float] | np.ndarray) -> float:
    """A = -(1/T) * sum_t log p(y_t): the length-normalised negative log-likelihood of one answer.

    TOFU (Maini et al. 2024), "Probability": P(a|q)^(1/|a|) = exp(-A). ``logp`` must be non-empty.
    """
    logp = np.asarray(logp, dtype=np.float64)
    if logp.size == 0:
        raise ValueError("mean_nll of an empty answer (no token)")
    return float(-np.mean(logp))


def sequence_prob(logp: Sequence[float] | np.ndarray) -> float:
    """exp(-A) = P(a|q)^(1/|a|): the length-normalised answer probability (TOFU, Maini et al. 2024)."""
    return float(np.exp(-mean_nll(logp)))


def prob_with_options(true_avg_loss: float, wrong_avg_losses: Sequence[float]) -> float:
    """P_true / (P_true + sum_k P_wrong_k) with P = exp(-A) the normalised probability of each option.

    TOFU (Maini et al. 2024) probability on the Real Authors / World Facts sets (the correct answer among
    the perturbed options). Computed in log space, so it stays defined when every P underflows to 0.
    """
    wrong = np.asarray(wrong_avg_losses, dtype=np.float64).reshape(-1)
    log_terms = np.concatenate([[-float(true_avg_loss)], -wrong])
    return float(np.exp(-float(true_avg_loss) - logsumexp(log_terms)))


def truth_ratio(correct_avg_loss: float | Sequence[float], wrong_avg_losses: Sequence[float] | float) -> float:
    """R = P_wrong / P_correct (TOFU, Maini et al. 2024, "Truth Ratio").

    P_wrong = exp(-mean_k A_wrong_k) is the geometric mean of the normalised probabilities of the perturbed
    (wrong) answers and P_correct = exp(-A_correct) that of the paraphrased (or true) answer; when several
    correct answers are given their mean A is used. Computed as exp(A_correct - mean_k A_wrong_k).
    """
    a_correct = float(np.mean(np.asarray(correct_avg_loss, dtype=np.float64)))
    a_wrong = float(np.mean(np.asarray(wrong_avg_losses, dtype=np.float64)))
    return float(np.exp(a_correct - a_wrong))


def _truth_ratio_transform(ratio: float, aggregator: str) -> float:
    if aggregator == "closer_to_1_better":
        return min(ratio, 1.0 / ratio) if ratio > 0 else 0.0
    if aggregator == "true_better":
        return max(0.0, 1.0 - ratio)
    if aggregator == "prob_mean":
        # P_correct / (P_correct + P_wrong) = 1 / (1 + R)
        return 1.0 / (1.0 + ratio)
    raise ValueError(f"unknown truth_ratio aggregator {aggregator!r}; choose one of {list(TRUTH_RATIO_AGGREGATORS)}")


def truth_ratio_aggregate(ratios: Sequence[float], aggregator: str = "closer_to_1_better") -> float:
    """Aggregate truth ratios R_i (TOFU, Maini et al. 2024).

    ``closer_to_1_better``: mean_i min(R_i, 1/R_i) (forget set: 1 = cannot tell true from false);
    ``true_better``: mean_i max(0, 1 - R_i) (retain / real-world sets: higher = prefers the truth);
    ``prob_mean``: mean_i P_correct / (P_correct + P_wrong) = mean_i 1 / (1 + R_i).
    """
    if aggregator not in TRUTH_RATIO_AGGREGATORS:
        raise ValueError(
            f"unknown truth_ratio aggregator {aggregator!r}; choose one of {list(TRUTH_RATIO_AGGREGATORS)}"
        )
    ratios = [float(r) for r in ratios]
    if not ratios:
        raise ValueError("truth_ratio_aggregate of no ratio")
    return float(np.mean([_truth_ratio_transform(r, aggregator) for r in ratios]))


# ------------------------------------------------------------------------------------------ compute functions


@register_metric(
    "probability",
    higher_is_better=None,
    needs=("token_stats",),
    description="length-normalised answer probability exp(-A) and mean NLL A (lists for K answers)",
    sample_fields=("prob",),
)
def probability_metric(*, token_stats=None, as_list: bool | None = None, **_: object) -> dict:
    """Per index {"prob", "avg_loss"}; a list of K values each when the index has K > 1 answers.
    ``token_stats``: ``{role: {index: [TokenStats, ...]}}`` with one role.

    ``as_list`` forces the list form (True) or the scalar form (False, only for single answers); by default
    an index with one answer gives scalars. agg_value = mean over indices of prob (a list's mean first).
    An index with any broken answer (T = 0 or non-finite logp) is excluded as a whole.
    """
    token_stats = _one_role(token_stats, "token_stats", "probability")
    value_by_index: dict[str, dict] = {}
    per_index_prob: list[float] = []
    excluded: list = []
    for idx in _sorted_keys(token_stats):
        answers = list(token_stats[idx])
        listed = as_list if as_list is not None else len(answers) != 1
        if not listed and len(answers) != 1:
            raise ValueError(f"probability: as_list=False but index {idx} has {len(answers)} answers")
        if not answers or not all(a.is_valid() for a in answers):
            value_by_index[str(idx)] = {"prob": None, "avg_loss": None}
            excluded.append(idx)
            continue
        losses = [mean_nll(a.logp) for a in answers]
        probs = [float(np.exp(-a)) for a in losses]
        if listed:
            value_by_index[str(idx)] = {"prob": probs, "avg_loss": losses}
        else:
            value_by_index[str(idx)] = {"prob": probs[0], "avg_loss": losses[0]}
        per_index_prob.append(float(np.mean(probs)))
    return _result(_mean_or_none(per_index_prob), value_by_index, excluded)


def _losses_of(entry: dict | None) -> list[float] | None:
    """avg_loss values of one probability entry (falls back to -log prob); None when excluded."""
    if entry is None:
        return None
    losses = _as_float_list(entry.get("avg_loss"))
    if losses is not None:
        return losses
    probs = _as_float_list(entry.get("prob"))
    if probs is None or any(p <= 0 for p in probs):
        return None
    return [float(-np.log(p)) for p in probs]


def _score_pairs(pre_compute: dict | None, handler: str, field: str,
                 score: Callable[[list[float], list[float]], float]) -> tuple[dict, list[float], list]:
    """Score every index from the avg_losses of its "correct" and "wrong" `probability` results.

    Returns ``(value_by_index {"<idx>": {field: value}}, values, excluded indices)``; an index whose
    correct or wrong entry is missing/excluded gets ``None`` and is listed as excluded.
    """
    correct = _pre_compute_entry(pre_compute, "correct", handler)["value_by_index"]
    wrong = _pre_compute_entry(pre_compute, "wrong", handler)["value_by_index"]
    _check_same_indices(correct, wrong, "correct", "wrong", handler)
    value_by_index: dict[str, dict] = {}
    values: list[float] = []
    excluded: list = []
    for key in _sorted_keys(correct):
        true_losses, wrong_losses = _losses_of(correct[key]), _losses_of(wrong[key])
        if true_losses is None or wrong_losses is None:
            value_by_index[str(key)] = {field: None}
            excluded.append(key)
            continue
        value_by_index[str(key)] = {field: score(true_losses, wrong_losses)}
        values.append(value_by_index[str(key)][field])
    return value_by_index, values, excluded


@register_metric(
    "probability_w_options",
    higher_is_better=None,
    needs=("pre_compute",),
    description="P_true / (P_true + sum of wrong-option probabilities) (TOFU real authors / world facts)",
)
def probability_w_options_metric(*, pre_compute=None, **_: object) -> dict:
    """pre_compute["correct"] and ["wrong"] are `probability` results; per index {"prob"}; agg = mean.

    A list-valued "correct" entry uses the mean of its avg_loss as the true option.
    """
    value_by_index, values, excluded = _score_pairs(
        pre_compute, "probability_w_options", "prob",
        lambda true_losses, wrong_losses: prob_with_options(float(np.mean(true_losses)), wrong_losses))
    return _result(_mean_or_none(values), value_by_index, excluded)


@register_metric(
    "truth_ratio",
    higher_is_better=None,
    needs=("pre_compute",),
    description="TOFU Truth Ratio R = P_wrong / P_correct, aggregated by `aggregator`",
)
def truth_ratio_metric(*, pre_compute=None, aggregator: str = "closer_to_1_better", **_: object) -> dict:
    """pre_compute["correct"] (paraphrased / true answer) and ["wrong"] (perturbed list) are `probability`
    results. Per index {"score": R}; agg_value by ``aggregator`` (closer_to_1_better, true_better, prob_mean).
    """
    if aggregator not in TRUTH_RATIO_AGGREGATORS:
        raise ValueError(
            f"unknown truth_ratio aggregator {aggregator!r}; choose one of {list(TRUTH_RATIO_AGGREGATORS)}"
        )
    value_by_index, ratios, excluded = _score_pairs(pre_compute, "truth_ratio", "score", truth_ratio)
    agg = truth_ratio_aggregate(ratios, aggregator) if ratios else None
    return _result(agg, value_by_index, excluded)
