"""ROUGE between a model's generation and the ground-truth answer (Lin 2004).

TOFU (Maini et al. 2024) reports ROUGE-L recall of greedy generations; MUSE (Shi et al. 2024) ROUGE-L F1.
"""

from __future__ import annotations

from functools import lru_cache

from rouge_score import rouge_scorer

from . import _mean_or_none, _one_role, _result, _sorted_keys, register_metric

ROUGE_FIELDS = ("rouge1_recall", "rougeL_f1", "rougeL_recall")


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_scores(ground_truth: str, generation: str) -> dict[str, float]:
    """ROUGE-1 recall, ROUGE-L recall and ROUGE-L F1 of ``generation`` against ``ground_truth``.

    ROUGE-N recall = |matching n-grams| / |n-grams of the reference|; ROUGE-L uses the longest common
    subsequence: recall = LCS / |reference|, precision = LCS / |generation|, F1 their harmonic mean
    (Lin 2004). Tokenised and Porter-stemmed by the ``rouge_score`` package (use_stemmer=True).
    """
    scores = _scorer().score(target=ground_truth, prediction=generation)
    return {
        "rouge1_recall": float(scores["rouge1"].recall),
        "rougeL_f1": float(scores["rougeL"].fmeasure),
        "rougeL_recall": float(scores["rougeL"].recall),
    }


@register_metric(
    "rouge",
    higher_is_better=None,
    needs=("generations",),
    description="ROUGE of greedy generations vs ground truth (option rouge_type, default rougeL_recall)",
    sample_fields=("rougeL_recall", "rougeL_f1", "rouge1_recall"),
)
def rouge_metric(*, generations=None, rouge_type: str = "rougeL_recall", **_: object) -> dict:
    """generations: {role: {index -> {"input", "ground_truth", "generation"}}} (one role). Per index the three ROUGE fields plus
    the texts; agg_value = mean of ``rouge_type``. A missing (None) generation or ground truth is excluded.
    """
    if rouge_type not in ROUGE_FIELDS:
        raise ValueError(f"unknown rouge_type {rouge_type!r}; choose one of {list(ROUGE_FIELDS)}")
    generations = _one_role(generations, "generations", "rouge")
    value_by_index: dict[str, dict] = {}
    values: list[float] = []
    excluded: list = []
    for idx in _sorted_keys(generations):
        item = generations[idx]
        gt, gen = item.get("ground_truth"), item.get("generation")
        texts = {"input": item.get("input"), "ground_truth": gt, "generation": gen}
        if gt is None or gen is None:
            value_by_index[str(idx)] = {**dict.fromkeys(ROUGE_FIELDS), **texts}
            excluded.append(idx)
            continue
        scores = rouge_scores(str(gt), str(gen))
        value_by_index[str(idx)] = {**scores, **texts}
        values.append(scores[rouge_type])
    return _result(_mean_or_none(values), value_by_index, excluded)
