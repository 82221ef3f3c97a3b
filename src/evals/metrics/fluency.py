"""Fluency of generated text: the weighted n-gram entropy RWKU reports (after ROME, Meng et al. 2022).

A model that repeats itself (a common result of too much unlearning) has few distinct n-grams, hence a low
entropy; fluent text has a high one.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from . import _mean_or_none, _one_role, _result, _sorted_keys, register_metric

#: RWKU's n-gram orders and their weights (its eval_fluency.py, from ROME's evaluation code).
NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@lru_cache(maxsize=1)
def _word_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def word_tokens(text: str) -> list[str]:
    """The words and punctuation marks of ``text``: NLTK's Treebank-style word tokenizer on each sentence.

    RWKU calls ``nltk.word_tokenize``, whose sentence splitter (punkt) needs a data download; the sentences are
    split here at ``.``, ``!`` or ``?`` followed by white space instead, which differs from punkt only around
    abbreviations."""
    return [token for sentence in _SENTENCE_END.split(text) for token in _word_tokenizer().tokenize(sentence)]


def ngram_entropy(tokens: Sequence[str], n: int) -> float:
    """H_n = -sum_g f_g * log2(f_g) over the n-grams g of ``tokens``, f_g the share of g among them; 0 when the
    text has fewer than n tokens (no n-gram: nothing varied was said)."""
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def weighted_ngram_entropy(text: str) -> float:
    """(1/2) * (2/3 * H_2 + 4/3 * H_3) of the text's word tokens: RWKU's fluency score of one answer (the
    arithmetic mean of the weighted entropies of orders 2 and 3)."""
    tokens = word_tokens(text)
    weighted = [w * ngram_entropy(tokens, n) for n, w in zip(NGRAM_ORDERS, NGRAM_WEIGHTS)]
    return sum(weighted) / len(weighted)


@register_metric(
    "ngram_entropy", higher_is_better=True, needs=("generations",),
    description="fluency: weighted 2/3-gram entropy of the generated answers (RWKU, after ROME)",
)
def ngram_entropy_metric(*, generations=None, **_: object) -> dict:
    """generations: {role: {index -> {"input", "ground_truth", "generation"}}} (one role). Per index the
    answer's ``weighted_ngram_entropy``; agg_value = their arithmetic mean (RWKU). A missing generation is
    excluded."""
    generations = _one_role(generations, "generations", "ngram_entropy")
    value_by_index: dict[str, dict] = {}
    values: list[float] = []
    excluded: list = []
    for idx in _sorted_keys(generations):
        item = generations[idx]
        text = item.get("generation")
        if text is None:
            value_by_index[str(idx)] = {"entropy": None, "input": item.get("input"), "generation": None}
            excluded.append(idx)
            continue
        value = weighted_ngram_entropy(str(text))
        value_by_index[str(idx)] = {"entropy": value, "input": item.get("input"), "generation": text}
        values.append(value)
    return _result(_mean_or_none(values), value_by_index, excluded)
