"""Leakage under sampling: how often an unlearned model still says a forgotten answer when it samples.

Greedy decoding shows one answer per question; a model that never gives the forgotten fact greedily may still
give it in some of n sampled answers. Leak@k (arXiv:2511.04934) asks for the probability that at least one of
k sampled answers leaks it, estimated without bias from n >= k samples as pass@k is for code (Chen et al. 2021,
"Evaluating Large Language Models Trained on Code", arXiv:2107.03374).

Whether an answer leaks is decided by a scorer (``evals.scorers``: ROUGE recall above a threshold, an entailment
model, or an LLM judge); the ``scored_answers`` pass hands the metrics below each prompt's answers with their
score and leaked flag (``ScoredAnswers``). An answer the scorer could not read (a judge reply without a verdict)
has ``leaked`` None: it is counted under ``unparsed`` and left out of the estimates, never taken as a no.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from . import _mean_or_none, _one_role, _result, _sorted_keys, register_metric

#: Where a metric's answers come from (its config's ``answers``): n sampled answers per prompt (``sampling_args``),
#: or the greedy answer (``generation_args``).
ANSWER_SOURCES = ("sampled", "greedy")


@dataclass(frozen=True)
class ScoredAnswers:
    """Every prompt's answers with their scores (the ``scored_answers`` pass input).

    ``by_index``: dataset index -> ``{"input", "ground_truth", "answers": [{"text", "score", "leaked"}, ...]}``
    (plus ``"raw"``, the judge's reply, for a judge); ``scorer``: the scorer's settings (``AnswerScorer.describe``).
    """

    by_index: Mapping[Any, dict]
    scorer: Mapping[str, Any]


def leak_at_k(n: int, leaks: int, k: int) -> float:
    """The unbiased estimate of P(at least one of k samples leaks) from n samples of which ``leaks`` leak:
    ``1 - C(n - c, k) / C(n, k)``, computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` (Chen et al.
    2021's numerically stable form; no large binomials). 1 when fewer than k samples do not leak."""
    for name, value in (("n", n), ("leaks", leaks), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"leak_at_k: {name}={value!r}; give a non-negative integer")
    if not 1 <= k <= n:
        raise ValueError(f"leak_at_k: k={k} with n={n} samples; k must be from 1 to n")
    if leaks > n:
        raise ValueError(f"leak_at_k: leaks={leaks} > n={n}")
    if n - leaks < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - leaks + 1, n + 1))


def leak_rate(leaked: Sequence[bool]) -> float:
    """The share of samples that leak, c / n (the expected leak@1)."""
    if not leaked:
        raise ValueError("leak_rate of no sample")
    return sum(bool(x) for x in leaked) / len(leaked)


def best_of_n(scores: Sequence[float]) -> float:
    """The highest score among one prompt's n sampled answers (the report averages it over prompts)."""
    if not scores:
        raise ValueError("best_of_n of no sample")
    return float(max(scores))


def _readable(answers: Sequence[Mapping]) -> tuple[list[Mapping], int]:
    """A prompt's answers the scorer could read (``leaked`` not None), and how many it could not."""
    readable = [a for a in answers if a["leaked"] is not None]
    return readable, len(answers) - len(readable)


def answer_source(config: Mapping, owner: str) -> str:
    """A metric config's ``answers`` (default ``sampled``), checked."""
    source = config.get("answers", "sampled")
    if source not in ANSWER_SOURCES:
        raise ValueError(f"{owner}: answers={source!r}; valid: {', '.join(ANSWER_SOURCES)}")
    return source


def default_ks(n: int) -> list[int]:
    """The k of a leak@k curve when none are given: the powers of two below n, and n."""
    return sorted({2 ** p for p in range(n.bit_length()) if 2 ** p < n} | {n})


def _check_leak_at_k_config(config: Mapping, owner: str) -> None:
    from evals.sampling import SamplingArgs  # the sampling settings live with the sampler

    if answer_source(config, owner) != "sampled":
        raise ValueError(f"{owner}: leak_at_k needs sampled answers (answers: sampled), not "
                         f"answers={config.get('answers')!r}: one greedy answer has no leak@k beyond k=1")
    n = SamplingArgs.from_config(config.get("sampling_args"), owner).num_samples
    ks = config.get("k")
    if ks is None:
        return
    if not isinstance(ks, (list, tuple)) or not ks or \
            not all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= n for k in ks) or len(set(ks)) != len(ks):
        raise ValueError(f"{owner}: k={ks!r}; give distinct integers from 1 to sampling_args.num_samples={n} "
                         "(or leave k out: powers of two up to n)")


@register_metric(
    "leak_at_k",
    higher_is_better=None,
    needs=("scored_answers",),
    description="leak@k of sampled answers: P(at least one of k answers leaks the ground truth), for each k",
    check_config=_check_leak_at_k_config,
)
def leak_at_k_metric(*, scored_answers=None, k: Sequence[int] | None = None, **_: object) -> dict:
    """Per prompt, from its n scored answers of which c leak: leak@k = 1 - C(n-c, k)/C(n, k) for each k (``k``;
    default powers of two up to n), the number of leaks and the best score. Over prompts: the mean leak@k for each
    k (``leak_at_k``; agg_value is the largest k's), the share of all answers that leak (``leak_rate``), the mean
    best-of-n score (``best_of_n``) and the count of answers the scorer could not read (``unparsed``, left out: a
    prompt's n is then its readable answers, and a k above it has no value for that prompt)."""
    scored: ScoredAnswers = _one_role(scored_answers, "scored_answers", "leak_at_k")
    num_samples = max((len(v["answers"]) for v in scored.by_index.values()), default=0)
    ks = sorted(k) if k is not None else default_ks(max(num_samples, 1))
    value_by_index: dict[str, dict] = {}
    per_k: dict[int, list[float]] = {kk: [] for kk in ks}
    best: list[float] = []
    leaks_total = readable_total = unparsed = 0
    excluded: list = []
    for idx in _sorted_keys(scored.by_index):
        item = scored.by_index[idx]
        readable, unread = _readable(item["answers"])
        leaks = sum(bool(a["leaked"]) for a in readable)
        unparsed += unread
        leaks_total, readable_total = leaks_total + leaks, readable_total + len(readable)
        values = {str(kk): leak_at_k(len(readable), leaks, kk) if kk <= len(readable) else None for kk in ks}
        for kk in ks:
            if values[str(kk)] is not None:
                per_k[kk].append(values[str(kk)])
        best_score = best_of_n([a["score"] for a in readable]) if readable else None
        if best_score is not None:
            best.append(best_score)
        else:
            excluded.append(idx)
        value_by_index[str(idx)] = {"input": item["input"], "ground_truth": item["ground_truth"],
                                    "samples": item["answers"], "leaks": leaks, "leak_at_k": values,
                                    "best_score": best_score}
    curve = {str(kk): _mean_or_none(per_k[kk]) for kk in ks}
    unread = {"note": f"the scorer could read none of the {unparsed} answers"} if unparsed and not readable_total else {}
    return _result(curve[str(ks[-1])], value_by_index, excluded, **unread, leak_at_k=curve,
                   leak_rate=leaks_total / readable_total if readable_total else None,
                   best_of_n=_mean_or_none(best), num_samples=num_samples, unparsed=unparsed,
                   scorer=dict(scored.scorer))


def _check_llm_judge_config(config: Mapping, owner: str) -> None:
    answer_source(config, owner)
    kind = (config.get("scorer") or {}).get("kind")
    if kind != "judge":
        raise ValueError(f"{owner}: llm_judge scores answers with a judge; set scorer.kind=judge (got {kind!r}) and "
                         "scorer.judge (configs/judge/)")


@register_metric(
    "llm_judge",
    higher_is_better=None,
    needs=("scored_answers",),
    description="an LLM judge's score of generated answers (greedy or sampled) against the ground truth",
    check_config=_check_llm_judge_config,
)
def llm_judge_metric(*, scored_answers=None, **_: object) -> dict:
    """Per prompt, each answer's judgment (score, leaked, the judge's reply), their mean score and leak share. Over
    prompts: agg_value = the mean score of every readable answer, ``leak_rate`` = the share of readable answers
    judged to leak, ``judged`` / ``unparsed`` = the answers with and without a verdict the parser could read (an
    unread verdict is left out of both means, never counted as 0)."""
    scored: ScoredAnswers = _one_role(scored_answers, "scored_answers", "llm_judge")
    value_by_index: dict[str, dict] = {}
    scores: list[float] = []
    leaked: list[bool] = []
    unparsed = 0
    excluded: list = []
    for idx in _sorted_keys(scored.by_index):
        item = scored.by_index[idx]
        readable, unread = _readable(item["answers"])
        unparsed += unread
        scores += [float(a["score"]) for a in readable]
        leaked += [bool(a["leaked"]) for a in readable]
        if not readable:
            excluded.append(idx)
        value_by_index[str(idx)] = {
            "input": item["input"], "ground_truth": item["ground_truth"], "answers": item["answers"],
            "mean_score": _mean_or_none(a["score"] for a in readable),
            "leak_rate": leak_rate([bool(a["leaked"]) for a in readable]) if readable else None}
    unread = {"note": f"the judge's {unparsed} replies had no verdict the parser could read"} \
        if unparsed and not scores else {}
    return _result(_mean_or_none(scores), value_by_index, excluded, **unread,
                   leak_rate=leak_rate(leaked) if leaked else None, judged=len(scores), unparsed=unparsed,
                   judge=dict(scored.scorer))
