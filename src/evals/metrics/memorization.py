"""Verbatim memorisation of answers under teacher forcing: exact memorisation and extraction strength.

The compute functions score the answer's content tokens (``TokenStats.content``): for question-answer
data the first T - 1 of the T entries (the final end-of-answer token left out), for raw text (MUSE's
verbatim continuations) all T. The pure helpers score exactly the array they are given. Higher = more
memorised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from checks import check_bool

from . import _mean_or_none, _one_role, _result, _sorted_keys, register_metric


def exact_memorization_score(match: Sequence[bool] | np.ndarray) -> float:
    """EM = (1/T') * sum_t 1[argmax_v p(v | y_<t) = y_t]: the fraction of answer tokens the model predicts
    exactly under teacher forcing (Tirumala et al. 2022, "Memorization without overfitting").

    ``match`` holds the T' answer tokens to score (EOS excluded); it must be non-empty.
    """
    match = np.asarray(match, dtype=bool).reshape(-1)
    if match.size == 0:
        raise ValueError("exact_memorization_score of an empty answer")
    return float(np.mean(match))


def extraction_strength_score(match: Sequence[bool] | np.ndarray, floor_at_one_token: bool = False) -> float:
    """ES = 1 - k / T' with k the smallest k in [0, T'] such that every prediction from position k on is
    exact, i.e. the shortest prefix after which the model completes the answer verbatim (Carlini et al. 2021
    extraction; "extraction strength", Wang et al. 2025). All exact -> 1; last token wrong -> 0.

    ``match`` holds the T' answer tokens to score (EOS excluded); it must be non-empty.
    ``floor_at_one_token`` (open-unlearning's score): k is at most T' - 1, so the score is
    at least 1/T' (open-unlearning's search stops at the last suffix without testing the empty one).
    """
    match = np.asarray(match, dtype=bool).reshape(-1)
    n = match.size
    if n == 0:
        raise ValueError("extraction_strength_score of an empty answer")
    wrong = np.flatnonzero(~match)
    k = 0 if wrong.size == 0 else int(wrong[-1]) + 1
    if floor_at_one_token:
        k = min(k, n - 1)
    return float(1.0 - k / n)


def _memorization(token_stats, helper: Callable[[np.ndarray], float], name: str) -> dict:
    token_stats = _one_role(token_stats, "token_stats", name)
    value_by_index: dict[str, dict] = {}
    values: list[float] = []
    excluded: list = []
    for idx in _sorted_keys(token_stats):
        answers = list(token_stats[idx])
        # at least one content token (EOS left out) must remain
        if not answers or answers[0].num_content_tokens < 1:
            value_by_index[str(idx)] = {"score": None}
            excluded.append(idx)
            continue
        score = helper(answers[0].argmax_match[answers[0].content])
        value_by_index[str(idx)] = {"score": score}
        values.append(score)
    return _result(_mean_or_none(values), value_by_index, excluded)


@register_metric(
    "exact_memorization",
    higher_is_better=None,
    needs=("token_stats",),
    description="fraction of answer content tokens (a final EOS excluded) predicted exactly by argmax (Tirumala et al. 2022)",
)
def exact_memorization_metric(*, token_stats=None, **_: object) -> dict:
    """Per index {"score": EM} of the first answer's content tokens; agg = mean. Higher = more memorised."""
    return _memorization(token_stats, exact_memorization_score, "exact_memorization")


@register_metric(
    "extraction_strength",
    higher_is_better=None,
    needs=("token_stats",),
    description="1 - (shortest prefix fraction after which the answer is predicted verbatim), a final EOS excluded",
)
def extraction_strength_metric(*, token_stats=None, floor_at_one_token: bool = False, **_: object) -> dict:
    """Per index {"score": ES} of the first answer's content tokens; agg = mean. Higher = more memorised.

    ``floor_at_one_token`` (open-unlearning's score; ``extraction_strength_score``): at least 1/T."""
    floor = check_bool("floor_at_one_token", floor_at_one_token, owner="extraction_strength")
    return _memorization(token_stats, lambda m: extraction_strength_score(m, floor), "extraction_strength")
