"""Leak@k and the per-prompt summaries of sampled answers (issue 33's estimator; src/evals/metrics/leakage.py)."""

from __future__ import annotations

from math import comb

import pytest

from evals.metrics.leakage import best_of_n, leak_at_k, leak_rate


def test_leak_at_k_by_hand():
    """4 samples, 1 leaks: of the C(4, 2) = 6 pairs, the C(3, 2) = 3 without it do not leak: leak@2 = 1/2."""
    assert leak_at_k(4, 1, 2) == pytest.approx(0.5)
    assert leak_at_k(16, 4, 1) == pytest.approx(4 / 16)  # leak@1 is the leak rate
    assert leak_at_k(16, 0, 8) == 0.0 and leak_at_k(16, 16, 1) == 1.0
    assert leak_at_k(5, 3, 3) == 1.0  # only 2 samples do not leak: any 3 include a leak


def test_leak_at_k_equals_the_binomial_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert leak_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12), (n, c, k)


def test_leak_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match="k=5 with n=4 samples; k must be from 1 to n"):
        leak_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="leaks=5 > n=4"):
        leak_at_k(4, 5, 2)
    with pytest.raises(ValueError, match="k=1.5; give a non-negative integer"):
        leak_at_k(4, 1, 1.5)


def test_leak_rate_and_best_of_n():
    assert leak_rate([True, False, False, True]) == 0.5
    assert best_of_n([0.1, 0.7, 0.3]) == 0.7
    with pytest.raises(ValueError, match="no sample"):
        leak_rate([])


# ----- the metrics over scored answers ----------------------------------------------------------------------

def _answer(score, leaked, text="a"):
    return {"text": text, "score": score, "leaked": leaked}


def _scored(by_index, kind="rouge"):
    from evals.metrics.leakage import ScoredAnswers

    return {"main": ScoredAnswers(by_index=by_index, scorer={"kind": kind})}


def test_leak_at_k_metric_by_hand():
    """Prompt 0: 4 answers, 1 leaks -> leak@1 1/4, leak@2 1/2, leak@4 1. Prompt 1: none leaks -> 0, 0, 0.
    Means: 1/8, 1/4, 1/2; leak rate 1/8 of the 8 answers; best scores 0.9 and 0.3 -> 0.6."""
    from evals.metrics import get_metric

    by_index = {0: {"input": "q0", "ground_truth": "g0",
                    "answers": [_answer(0.1, False), _answer(0.9, True), _answer(0.2, False), _answer(0.0, False)]},
                1: {"input": "q1", "ground_truth": "g1", "answers": [_answer(0.3, False)] * 4}}
    result = get_metric("leak_at_k").fn(scored_answers=_scored(by_index), k=[1, 2, 4])
    assert result["leak_at_k"] == pytest.approx({"1": 1 / 8, "2": 1 / 4, "4": 1 / 2})
    assert result["agg_value"] == pytest.approx(0.5)
    assert result["leak_rate"] == pytest.approx(1 / 8) and result["best_of_n"] == pytest.approx(0.6)
    assert result["num_samples"] == 4 and result["unparsed"] == 0 and result["scorer"] == {"kind": "rouge"}
    first = result["value_by_index"]["0"]
    assert first["leaks"] == 1 and first["best_score"] == 0.9 and first["leak_at_k"]["2"] == pytest.approx(0.5)
    assert len(first["samples"]) == 4 and first["samples"][1]["leaked"] is True
    # k left out: powers of two below n, and n
    assert list(get_metric("leak_at_k").fn(scored_answers=_scored(by_index))["leak_at_k"]) == ["1", "2", "4"]


def test_unread_answers_are_counted_and_left_out_never_zero():
    """Prompt 0 has 2 readable answers of 4 (1 leaks): its leak@2 = 1, its leak@4 has no value; prompt 1 has none
    readable: excluded. Unread answers are counted, not taken as 'no leak'."""
    from evals.metrics import get_metric

    by_index = {0: {"input": "q", "ground_truth": "g",
                    "answers": [_answer(None, None), _answer(8.0, True), _answer(2.0, False), _answer(None, None)]},
                1: {"input": "q", "ground_truth": "g", "answers": [_answer(None, None)] * 4}}
    result = get_metric("leak_at_k").fn(scored_answers=_scored(by_index, "judge"), k=[1, 2, 4])
    assert result["unparsed"] == 6 and result["excluded"] == [1]
    assert result["leak_at_k"] == {"1": pytest.approx(0.5), "2": pytest.approx(1.0), "4": None}
    assert result["agg_value"] is None and result["leak_rate"] == pytest.approx(0.5)
    judged = get_metric("llm_judge").fn(scored_answers=_scored(by_index, "judge"))
    assert judged["agg_value"] == pytest.approx(5.0) and judged["leak_rate"] == pytest.approx(0.5)
    assert judged["judged"] == 2 and judged["unparsed"] == 6 and judged["excluded"] == [1]
    assert judged["value_by_index"]["0"]["mean_score"] == pytest.approx(5.0)
    none_read = get_metric("llm_judge").fn(scored_answers=_scored({1: by_index[1]}, "judge"))
    assert none_read["agg_value"] is None and "no verdict" in none_read["note"]


def test_rouge_scorer_by_hand():
    """ROUGE-L recall of 'Paris is nice' against 'Paris': 1 (the reference's only word is there); against
    'Rome': 0. Leaks at recall >= 0.5."""
    from evals.judge import JudgeItem
    from evals.scorers import build_scorer

    scorer = build_scorer({"kind": "rouge", "field": "rougeL_recall", "threshold": 0.5}, "test")
    judgments = scorer.score([JudgeItem("q", "Paris", "Paris is nice"), JudgeItem("q", "Paris", "Rome"),
                              JudgeItem("q", "the capital Paris", "capital city")])
    assert [j.score for j in judgments] == pytest.approx([1.0, 0.0, 1 / 3])
    assert [j.leaked for j in judgments] == [True, False, False]
    assert scorer.describe() == {"kind": "rouge", "field": "rougeL_recall", "threshold": 0.5}


@pytest.mark.parametrize(("cfg", "message"), [
    ({"kind": "bleu"}, r"scorer.kind='bleu'; valid: entailment, judge, rouge"),
    ({"kind": "rouge", "threshold": 2}, r"scorer.threshold=2; give a number in \[0, 1\]"),
    ({"kind": "rouge", "field": "rouge2"}, r"scorer.field='rouge2'; valid: rouge1_recall, rougeL_f1, rougeL_recall"),
    ({"kind": "rouge", "model": "x"}, r"scorer keys \['model'\] are not understood by scorer kind 'rouge'"),
    ({"kind": "entailment"}, r"scorer kind entailment needs scorer.model"),
    ({"kind": "judge", "judge": None}, r"scorer kind judge needs scorer.judge.*judge=openai"),
])
def test_a_bad_scorer_config_names_the_key(cfg, message):
    from evals.scorers import build_scorer

    with pytest.raises(ValueError, match=message):
        build_scorer(cfg, "metric m")


def test_entailment_scorer_runs_a_classifier_pipeline(tmp_path, smollm2_tokenizer):
    """Any sequence-classification model with an entailment label: here a tiny random one saved locally (its
    probabilities are meaningless; the test is the plumbing: pairs in, one probability of the named label out)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from evals.judge import JudgeItem
    from evals.scorers import build_scorer

    labels = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}
    config = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=3, id2label=labels,
                         label2id={v: k for k, v in labels.items()}, pad_token_id=smollm2_tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "nli")
    smollm2_tokenizer.save_pretrained(tmp_path / "nli")
    scorer = build_scorer({"kind": "entailment", "model": str(tmp_path / "nli"), "threshold": 0.0}, "test")
    judgments = scorer.score([JudgeItem("Where?", "Paris", "In Paris"), JudgeItem("Who?", "Ann", "Nobody")])
    assert len(judgments) == 2 and all(0 < j.score < 1 and j.leaked for j in judgments)
    wrong = build_scorer({"kind": "entailment", "model": str(tmp_path / "nli"), "label": "implies"}, "test")
    with pytest.raises(ValueError, match="scorer.label='implies' is not a label of .* CONTRADICTION, NEUTRAL, ENTAILMENT"):
        wrong.score([JudgeItem("q", "a", "b")])
