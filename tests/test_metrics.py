"""Evaluation metrics against values computed by hand on tiny hand-made token statistics."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest

from evals.metrics import (
    ALLOWED_NEEDS,
    METRIC_REGISTRY,
    TokenStats,
    exact_memorization_score,
    extraction_strength_score,
    get_metric,
    harmonic_mean,
    mean_nll,
    min_k_plus_plus_score,
    min_k_score,
    prob_with_options,
    register_metric,
    roc_auc,
    rouge_scores,
    truth_ratio,
    zlib_score,
)

LN2 = math.log(2.0)
LN4 = math.log(4.0)
LN8 = math.log(8.0)


def ts(logp, match=None, mean_logp=None, std_logp=None, text="an answer") -> TokenStats:
    """TokenStats with defaults: every prediction exact, mu = -1, sigma = 1 at every position."""
    n = len(logp)
    return TokenStats(
        logp=np.array(logp, dtype=float),
        mean_logp=np.full(n, -1.0) if mean_logp is None else np.array(mean_logp, dtype=float),
        std_logp=np.ones(n) if std_logp is None else np.array(std_logp, dtype=float),
        argmax_match=np.ones(n, dtype=bool) if match is None else np.array(match, dtype=bool),
        answer_text=text,
    )


def const(a: float, t: int = 3) -> TokenStats:
    """T tokens each with log-prob -a, so the mean NLL is A = a."""
    return ts([-a] * t)


def empty() -> TokenStats:
    return ts([])


def run(name: str, **kwargs) -> dict:
    result = get_metric(name).fn(**kwargs)
    json.dumps(result, allow_nan=False)  # serialisable and NaN-free
    return result


# ------------------------------------------------------------------------------------------ registry


def test_registry_specs_are_well_formed():
    expected = {
        "probability", "probability_w_options", "truth_ratio", "rouge", "exact_memorization",
        "extraction_strength", "mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus", "mia_gradnorm",
        "mia_reference", "ks_test", "privleak", "hm_aggregate",
    }
    assert expected <= set(METRIC_REGISTRY)
    for name, spec in METRIC_REGISTRY.items():
        assert spec.name == name
        assert spec.needs and set(spec.needs) <= ALLOWED_NEEDS, name
        assert spec.higher_is_better in (True, False, None)
        assert callable(spec.fn) and spec.description
    assert get_metric("ks_test").higher_is_better is True
    assert get_metric("hm_aggregate").higher_is_better is True
    assert get_metric("mia_reference").needs == ("token_stats", "reference_token_stats")


def test_unknown_metric_lists_valid_names():
    with pytest.raises(ValueError, match="unknown metric 'nope'") as err:
        get_metric("nope")
    assert "truth_ratio" in str(err.value) and "probability" in str(err.value)


def test_register_rejects_unknown_needs_and_duplicates():
    with pytest.raises(ValueError, match="unknown needs"):
        register_metric("x_bad_needs", higher_is_better=None, needs=("logits",))
    with pytest.raises(ValueError, match="already registered"):
        register_metric("probability", higher_is_better=None, needs=("token_stats",))(lambda **_: {})


def test_token_stats_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one entry per answer token"):
        TokenStats(logp=np.zeros(3), mean_logp=np.zeros(2), std_logp=np.zeros(3), argmax_match=np.ones(3, bool))


# ------------------------------------------------------------------------------------------ probability


def test_mean_nll_hand_value():
    # logp = ln 1/2, ln 1/4, ln 1/8 -> A = (ln2 + 2 ln2 + 3 ln2) / 3 = 2 ln2 -> prob = 1/4
    assert mean_nll([-LN2, -LN4, -LN8]) == pytest.approx(2 * LN2)


def test_probability_single_and_list_answers():
    token_stats = {
        0: [ts([-LN2, -LN4, -LN8])],  # A = 2 ln2, prob 1/4
        1: [const(LN2), const(LN4)],  # probs [1/2, 1/4], index mean 3/8
    }
    res = run("probability", token_stats={"main": token_stats})
    v0 = res["value_by_index"]["0"]
    assert v0["prob"] == pytest.approx(0.25) and v0["avg_loss"] == pytest.approx(2 * LN2)
    v1 = res["value_by_index"]["1"]
    assert v1["prob"] == pytest.approx([0.5, 0.25]) and v1["avg_loss"] == pytest.approx([LN2, LN4])
    # agg = mean(1/4, 3/8) = 5/16
    assert res["agg_value"] == pytest.approx(5 / 16)
    assert "excluded" not in res


def test_probability_as_list_forces_lists():
    res = run("probability", token_stats={"main": {0: [const(LN2)]}}, as_list=True)
    assert res["value_by_index"]["0"]["prob"] == pytest.approx([0.5])


def test_zero_token_sample_is_excluded_not_nan():
    # index 1 has no answer token; the aggregate is over index 0 only (prob 1/2)
    res = run("probability", token_stats={"main": {0: [const(LN2)], 1: [empty()]}})
    assert res["value_by_index"]["1"] == {"prob": None, "avg_loss": None}
    assert res["excluded"] == [1]
    assert res["agg_value"] == pytest.approx(0.5)
    # an index with one broken answer among K is excluded as a whole
    res = run("probability", token_stats={"main": {0: [const(LN2), empty()]}})
    assert res["agg_value"] is None and res["excluded"] == [0] and "note" in res


def test_memorization_and_mia_exclude_broken_samples():
    stats = {0: [ts([-LN2, -LN2, -LN2], match=[True, False, True])], 1: [empty()], 2: [ts([-LN2])]}
    for name in ("exact_memorization", "extraction_strength"):
        res = run(name, token_stats={"main": stats})
        # index 2 has only the EOS token: nothing left once EOS is dropped
        assert res["excluded"] == [1, 2]
        assert res["value_by_index"]["1"] == {"score": None}
    em = run("exact_memorization", token_stats={"main": stats})
    assert em["agg_value"] == pytest.approx(0.5)  # [T, F] -> 1/2
    res = run("mia_loss", token_stats={"forget": stats, "holdout": {0: [const(LN8)], 1: [ts([-np.inf, -1.0])]}})
    assert res["forget"]["excluded"] == [1] and res["holdout"]["excluded"] == [1]
    assert res["holdout"]["value_by_index"]["1"] == {"score": None}
    # forget scores ln2, ln2 (index 2: A = ln2); holdout ln8 -> perfect separation
    assert res["auc"] == pytest.approx(1.0)


def _prob_result(values: dict) -> dict:
    """A `probability` result from index -> avg_loss (scalar or list)."""
    vbi = {}
    for i, a in values.items():
        if isinstance(a, list):
            vbi[str(i)] = {"prob": [math.exp(-x) for x in a], "avg_loss": a}
        else:
            vbi[str(i)] = {"prob": math.exp(-a), "avg_loss": a}
    return {"agg_value": 0.0, "value_by_index": vbi}


def test_probability_w_options_hand_value():
    # P_true = 1/2, wrong = [1/4, 1/4] -> (1/2) / (1/2 + 1/2) = 1/2
    # P_true = 1/2, wrong = [1/8, 1/8] -> (1/2) / (3/4) = 2/3 ; agg = (1/2 + 2/3) / 2 = 7/12
    pre = {
        "correct": _prob_result({0: LN2, 1: LN2}),
        "wrong": _prob_result({0: [LN4, LN4], 1: [LN8, LN8]}),
    }
    res = run("probability_w_options", pre_compute=pre)
    assert res["value_by_index"]["0"]["prob"] == pytest.approx(0.5)
    assert res["value_by_index"]["1"]["prob"] == pytest.approx(2 / 3)
    assert res["agg_value"] == pytest.approx(7 / 12)
    assert prob_with_options(LN2, [LN4, LN4]) == pytest.approx(0.5)
    # underflowing probabilities stay defined: A_true = 1000, wrong = [1000, 1000] -> 1/3
    assert prob_with_options(1000.0, [1000.0, 1000.0]) == pytest.approx(1 / 3)


def test_probability_w_options_index_mismatch():
    pre = {"correct": _prob_result({0: LN2, 1: LN2}), "wrong": _prob_result({0: [LN4], 7: [LN4]})}
    with pytest.raises(ValueError, match=r"only in correct \(first: \['1'\]\).*only in wrong \(first: \['7'\]\)"):
        run("probability_w_options", pre_compute=pre)


@pytest.mark.parametrize(
    "aggregator, expected",
    [
        # A_para = ln2, A_pert = [ln4, ln4]: P_correct = 1/2, P_wrong = 1/4 -> R = 1/2
        ("closer_to_1_better", 0.5),  # min(1/2, 2)
        ("true_better", 0.5),  # max(0, 1 - 1/2)
        ("prob_mean", 2 / 3),  # (1/2) / (1/2 + 1/4)
    ],
)
def test_truth_ratio_aggregators(aggregator, expected):
    pre = {"correct": _prob_result({0: LN2}), "wrong": _prob_result({0: [LN4, LN4]})}
    res = run("truth_ratio", pre_compute=pre, aggregator=aggregator)
    assert res["value_by_index"]["0"]["score"] == pytest.approx(0.5)
    assert res["agg_value"] == pytest.approx(expected)


def test_truth_ratio_geometric_mean_and_two_indices():
    # wrong A = [ln2, ln8] -> mean 2 ln2 -> P_wrong = 1/4 (geometric mean of 1/2 and 1/8), P_correct = 1/8
    # -> R = 2 ; closer_to_1_better = 1/2 ; true_better = 0
    assert truth_ratio(LN8, [LN2, LN8]) == pytest.approx(2.0)
    # a list-valued correct entry uses its mean A: [ln2, ln8] -> 2 ln2 -> P_correct = 1/4
    assert truth_ratio([LN2, LN8], [LN4]) == pytest.approx(1.0)
    pre = {"correct": _prob_result({0: LN2, 1: LN8}), "wrong": _prob_result({0: [LN4, LN4], 1: [LN2, LN8]})}
    # R = [1/2, 2]: closer_to_1 = (1/2 + 1/2)/2 = 1/2 ; true_better = (1/2 + 0)/2 = 1/4
    assert run("truth_ratio", pre_compute=pre)["agg_value"] == pytest.approx(0.5)
    assert run("truth_ratio", pre_compute=pre, aggregator="true_better")["agg_value"] == pytest.approx(0.25)
    # prob_mean: (2/3 + 1/3) / 2 = 1/2
    assert run("truth_ratio", pre_compute=pre, aggregator="prob_mean")["agg_value"] == pytest.approx(0.5)


def test_truth_ratio_unknown_aggregator_and_excluded():
    pre = {"correct": _prob_result({0: LN2}), "wrong": _prob_result({0: [LN4]})}
    with pytest.raises(ValueError, match="closer_to_1_better.*true_better.*prob_mean"):
        run("truth_ratio", pre_compute=pre, aggregator="median")
    pre["correct"]["value_by_index"]["1"] = {"prob": None, "avg_loss": None}
    pre["wrong"]["value_by_index"]["1"] = {"prob": [0.25], "avg_loss": [LN4]}
    res = run("truth_ratio", pre_compute=pre)
    assert res["excluded"] == [1] and res["value_by_index"]["1"] == {"score": None}
    assert res["agg_value"] == pytest.approx(0.5)  # index 0 only: R = exp(ln2 - ln4) = 1/2 -> min(1/2, 2)


# ------------------------------------------------------------------------------------------ rouge


def test_rouge_hand_example():
    # gt "the cat sat", gen "the cat": 2 of 3 reference unigrams / LCS 2 -> recall 2/3, precision 1, F1 0.8
    s = rouge_scores("the cat sat", "the cat")
    assert s["rouge1_recall"] == pytest.approx(2 / 3)
    assert s["rougeL_recall"] == pytest.approx(2 / 3)
    assert s["rougeL_f1"] == pytest.approx(0.8)
    # stemming: "running" and "runs" both stem to "run" -> LCS "he run" = 2 of 3, precision 2/2
    s = rouge_scores("he was running", "he runs")
    assert s["rougeL_recall"] == pytest.approx(2 / 3) and s["rougeL_f1"] == pytest.approx(0.8)
    # word order: gt "a b c", gen "c b a" -> unigram recall 1, LCS 1 -> rougeL recall 1/3
    s = rouge_scores("a b c", "c b a")
    assert s["rouge1_recall"] == pytest.approx(1.0) and s["rougeL_recall"] == pytest.approx(1 / 3)


def test_rouge_metric_layout_and_rouge_type():
    gens = {
        0: {"input": "q0", "ground_truth": "the cat sat", "generation": "the cat"},
        1: {"input": "q1", "ground_truth": "a b c", "generation": "c b a"},
    }
    res = run("rouge", generations={"main": gens})
    v0 = res["value_by_index"]["0"]
    assert set(v0) == {"rouge1_recall", "rougeL_f1", "rougeL_recall", "input", "ground_truth", "generation"}
    assert v0["input"] == "q0" and v0["generation"] == "the cat"
    # rougeL recall: (2/3 + 1/3) / 2 = 1/2
    assert res["agg_value"] == pytest.approx(0.5)
    # rouge1 recall: (2/3 + 1) / 2 = 5/6
    assert run("rouge", generations={"main": gens}, rouge_type="rouge1_recall")["agg_value"] == pytest.approx(5 / 6)
    # rougeL F1: gen "c b a" LCS 1 -> P = R = 1/3 -> F1 1/3 ; (0.8 + 1/3) / 2
    assert run("rouge", generations={"main": gens}, rouge_type="rougeL_f1")["agg_value"] == \
        pytest.approx((0.8 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="rougeL_recall"):
        run("rouge", generations={"main": gens}, rouge_type="rouge2")


# ------------------------------------------------------------------------------------------ memorization


def test_exact_memorization_and_extraction_strength_exclude_eos():
    # match [T, F, T, T, EOS: F]: EOS dropped -> EM 3/4 ; exact from position 2 on -> ES 1 - 2/4 = 1/2
    stats = {0: [ts([-1.0] * 5, match=[True, False, True, True, False])]}
    assert run("exact_memorization", token_stats={"main": stats})["value_by_index"]["0"]["score"] == pytest.approx(0.75)
    assert run("extraction_strength", token_stats={"main": stats})["value_by_index"]["0"]["score"] == pytest.approx(0.5)
    # last (non-EOS) token wrong -> ES 0 ; all right (EOS wrong is ignored) -> ES 1, EM 1
    assert extraction_strength_score([True, True, False]) == 0.0
    stats = {0: [ts([-1.0] * 4, match=[True, True, False, True])], 1: [ts([-1.0] * 4, match=[True] * 3 + [False])]}
    es = run("extraction_strength", token_stats={"main": stats})
    assert es["value_by_index"]["0"]["score"] == 0.0
    assert es["value_by_index"]["1"]["score"] == 1.0
    assert es["agg_value"] == pytest.approx(0.5)
    assert run("exact_memorization", token_stats={"main": stats})["value_by_index"]["1"]["score"] == 1.0
    assert exact_memorization_score([False, False, True]) == pytest.approx(1 / 3)
    assert extraction_strength_score([False, False, False, False]) == 0.0


# ------------------------------------------------------------------------------------------ MIA


def test_min_k_hand_value():
    # k = 0.5 of 4 tokens -> n = 2 lowest: -8 and -4 -> score (8 + 4) / 2 = 6
    assert min_k_score([-1.0, -8.0, -2.0, -4.0], k=0.5) == pytest.approx(6.0)
    # k = 0.1 of 4 -> int(0.4) = 0 -> at least one token: -(-8)
    assert min_k_score([-1.0, -8.0, -2.0, -4.0], k=0.1) == pytest.approx(8.0)


def test_min_k_metric_drops_eos():
    # first answer: logp [-1, -8, -2, -4, EOS -100]; EOS dropped -> k=0.5 -> 6 (the EOS would dominate otherwise)
    stats = {0: [ts([-1.0, -8.0, -2.0, -4.0, -100.0])]}
    res = run("mia_min_k", token_stats={"forget": stats, "holdout": {0: [ts([-10.0, -10.0, -1.0])]}}, k=0.5)
    assert res["forget"]["value_by_index"]["0"]["score"] == pytest.approx(6.0)
    # holdout: 2 tokens -> n = 1 -> 10
    assert res["holdout"]["value_by_index"]["0"]["score"] == pytest.approx(10.0)
    assert res["auc"] == pytest.approx(1.0)


def test_min_k_plus_plus_hand_value():
    # z = (logp - mu) / sigma = [(-1+2)/1, (-3+1)/2, (-2-0)/0.5, (-1+1)/4] = [1, -1, -4, 0]
    # k = 0.5 -> n = 2 lowest z: -4, -1 -> score 2.5
    logp, mu, sigma = [-1.0, -3.0, -2.0, -1.0], [-2.0, -1.0, 0.0, -1.0], [1.0, 2.0, 0.5, 4.0]
    assert min_k_plus_plus_score(logp, mu, sigma, k=0.5) == pytest.approx(2.5)
    # a zero-std token is skipped: the z = -4 token has sigma 0 -> z = [1, -1, 0], n = int(1.5) = 1 -> 1
    assert min_k_plus_plus_score(logp, mu, [1.0, 2.0, 0.0, 4.0], k=0.5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="std"):
        min_k_plus_plus_score([-1.0], [-1.0], [0.0])
    # through the handler: same tokens plus an EOS entry; an all-zero-std sample is excluded
    stats = {
        0: [ts(logp + [-50.0], mean_logp=mu + [0.0], std_logp=sigma + [1.0])],
        1: [ts([-1.0, -1.0], std_logp=[0.0, 1.0])],
    }
    res = run("mia_min_k_plus_plus", token_stats={"forget": stats, "holdout": {0: [const(1.0)]}}, k=0.5)
    assert res["forget"]["value_by_index"]["0"]["score"] == pytest.approx(2.5)
    assert res["forget"]["excluded"] == [1]
    # holdout z = (-1 + 1)/1 = 0 -> score 0 < 2.5 -> AUC 0
    assert res["auc"] == pytest.approx(0.0)


def test_zlib_score():
    text = "the quick brown fox"
    size = len(zlib.compress(text.encode("utf-8")))
    # A = ln4 over 3 tokens -> score ln4 / size
    assert zlib_score([-LN4] * 3, text) == pytest.approx(LN4 / size)
    res = run("mia_zlib", token_stats={"forget": {0: [ts([-LN4] * 3, text=text)]}, "holdout": {5: [ts([-LN8] * 3, text=text)]}})
    assert res["forget"]["value_by_index"]["0"]["score"] == pytest.approx(LN4 / size)
    assert res["holdout"]["value_by_index"]["5"]["score"] == pytest.approx(LN8 / size)


def test_roc_auc_cases():
    assert roc_auc([0.1, 0.2], [0.8, 0.9]) == pytest.approx(1.0)  # holdout always higher
    assert roc_auc([0.8, 0.9], [0.1, 0.2]) == pytest.approx(0.0)  # reversed
    assert roc_auc([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.5)  # ties
    # 3 of the 4 (forget, holdout) pairs have holdout higher -> 3/4
    assert roc_auc([0.1, 0.6], [0.5, 0.9]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both sets"):
        roc_auc([], [0.1])


def test_mia_result_layout_loss_attack():
    # forget A = [ln2, ln4], holdout A = [ln4, ln8]: pairs with holdout higher: (ln2,ln4) (ln2,ln8) (ln4,ln8)
    # and one tie (ln4, ln4) counting 1/2 -> AUC = 3.5 / 4
    res = run(
        "mia_loss",
        token_stats={"forget": {0: [const(LN2)], 1: [const(LN4)]}, "holdout": {0: [const(LN4)], 1: [const(LN8)]}},
    )
    assert set(res) == {"agg_value", "auc", "forget", "holdout"}
    assert res["agg_value"] == res["auc"] == pytest.approx(3.5 / 4)
    assert res["forget"]["agg_value"] == pytest.approx((LN2 + LN4) / 2)
    assert res["holdout"]["value_by_index"]["1"] == {"score": pytest.approx(LN8)}
    with pytest.raises(ValueError, match="holdout"):
        run("mia_loss", token_stats={"forget": {0: [const(LN2)]}})


def test_mia_gradnorm_and_reference():
    res = run("mia_gradnorm", grad_norms={"forget": {0: 1.0, 1: 2.0}, "holdout": {0: 3.0, 1: None}})
    assert res["auc"] == pytest.approx(1.0) and res["holdout"]["excluded"] == [1]
    # score = A_model - A_ref: forget ln4 - ln2 = ln2 ; holdout ln8 - ln2 = 2 ln2
    res = run(
        "mia_reference",
        token_stats={"forget": {0: [const(LN4)]}, "holdout": {0: [const(LN8)]}},
        reference_token_stats={"forget": {0: [const(LN2)]}, "holdout": {0: [const(LN2)]}},
    )
    assert res["forget"]["value_by_index"]["0"]["score"] == pytest.approx(LN2)
    assert res["holdout"]["value_by_index"]["0"]["score"] == pytest.approx(2 * LN2)
    assert res["auc"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no reference"):
        run(
            "mia_reference",
            token_stats={"forget": {0: [const(LN4)]}, "holdout": {0: [const(LN8)]}},
            reference_token_stats={"forget": {}, "holdout": {0: [const(LN2)]}},
        )


# ------------------------------------------------------------------------------------------ privacy


def _tr_result(ratios: dict) -> dict:
    return {"agg_value": 0.0, "value_by_index": {str(i): {"score": r} for i, r in ratios.items()}}


def test_ks_test_against_itself_is_one():
    tr = _tr_result({0: 0.5, 1: 2.0, 2: 0.9})
    res = run("ks_test", pre_compute={"forget": tr}, reference_logs={"retain": tr})
    assert res["agg_value"] == pytest.approx(1.0) and res["pvalue"] == pytest.approx(1.0)
    assert res["statistic"] == pytest.approx(0.0)


def test_ks_test_hand_value():
    # fully separated samples of 3 vs 3: statistic 1, exact two-sided p = 2 / C(6,3) = 0.1
    res = run(
        "ks_test",
        pre_compute={"forget": _tr_result({0: 0.1, 1: 0.2, 2: 0.3})},
        reference_logs={"retain": _tr_result({0: 0.7, 1: 0.8, 2: 0.9})},
    )
    assert res["statistic"] == pytest.approx(1.0) and res["pvalue"] == pytest.approx(0.1)


def test_ks_test_mismatched_indices_and_no_reference():
    with pytest.raises(ValueError, match=r"only in this model's.*\['2'\].*only in the retain.*\['5'\]"):
        run(
            "ks_test",
            pre_compute={"forget": _tr_result({0: 0.5, 1: 0.2, 2: 0.3})},
            reference_logs={"retain": _tr_result({0: 0.5, 1: 0.2, 5: 0.3})},
        )
    res = run("ks_test", pre_compute={"forget": _tr_result({0: 0.5})}, reference_logs={"retain": None})
    assert res["agg_value"] is None and "retain" in res["note"]
    assert run("ks_test", pre_compute={"forget": _tr_result({0: 0.5})})["agg_value"] is None


def test_ks_test_drops_indices_excluded_on_either_side():
    res = run(
        "ks_test",
        pre_compute={"forget": _tr_result({0: 0.5, 1: None, 2: 0.3})},
        reference_logs={"retain": _tr_result({0: 0.5, 1: 0.2, 2: 0.3})},
    )
    assert res["excluded"] == [1] and res["num_samples"] == 2 and res["agg_value"] == pytest.approx(1.0)


def test_privleak():
    mia = {"agg_value": 0.8, "auc": 0.8}
    res = run("privleak", pre_compute={"forget": mia}, reference_logs={"retain": mia})
    assert res["agg_value"] == pytest.approx(0.0)
    # AUC 0.8 vs ref 0.6 -> ((1-0.8) - (1-0.6)) / (1-0.6) * 100 = (0.2 - 0.4) / 0.4 * 100 = -50
    res = run("privleak", pre_compute={"forget": mia}, reference_logs={"retain": {"agg_value": 0.6}})
    assert res["agg_value"] == pytest.approx(-50.0)
    assert res["auc"] == pytest.approx(0.8) and res["ref_auc"] == pytest.approx(0.6)
    assert "note" not in res
    # no reference -> ref_value 0.5: (0.2 - 0.5) / 0.5 * 100 = -60
    res = run("privleak", pre_compute={"forget": mia}, reference_logs={"retain": None})
    assert res["agg_value"] == pytest.approx(-60.0) and res["ref_auc"] == 0.5 and "ref_value" in res["note"]
    # custom ref_value 0.75: (0.2 - 0.25) / 0.25 * 100 = -20
    assert run("privleak", pre_compute={"forget": mia}, ref_value=0.75)["agg_value"] == pytest.approx(-20.0)


# ------------------------------------------------------------------------------------------ utility


def test_hm_aggregate():
    # hmean(1, 1/2, 1/4) = 3 / (1 + 2 + 4) = 3/7
    pre = {"a": {"agg_value": 1.0}, "b": {"agg_value": 0.5}, "c": {"agg_value": 0.25}}
    res = run("hm_aggregate", pre_compute=pre)
    assert res["agg_value"] == pytest.approx(3 / 7)
    assert res["inputs"] == {"a": 1.0, "b": 0.5, "c": 0.25}
    assert harmonic_mean([2.0, 2.0]) == pytest.approx(2.0)
    pre["d"] = {"agg_value": 0.0}
    assert run("hm_aggregate", pre_compute=pre)["agg_value"] == 0.0
    pre["e"] = {"agg_value": None}  # undefined input: undefined mean, named in a note, no exception
    res = run("hm_aggregate", pre_compute=pre)
    assert res["agg_value"] is None and res["inputs"]["e"] is None and "no value for e" in res["note"]
    with pytest.raises(ValueError, match="'n'"):
        run("hm_aggregate", pre_compute={"n": {"agg_value": -0.1}})


def test_min_k_plus_plus_needs_the_vocabulary_moments():
    from evals.metrics import TokenStats, get_metric

    spec = get_metric("mia_min_k_plus_plus")
    assert "vocab_moments" in spec.needs
    bare = TokenStats(logp=[-1.0, -2.0, -0.5], mean_logp=None, std_logp=None, argmax_match=[True, False, True])
    with pytest.raises(ValueError, match="vocab_moments"):
        spec.fn(token_stats={"forget": {0: [bare]}, "holdout": {0: [bare]}})
    with pytest.raises(ValueError, match="both mean_logp and std_logp"):
        TokenStats(logp=[-1.0], mean_logp=[-1.0], std_logp=None, argmax_match=[True])


def test_every_pass_input_has_one_runner():
    from evals.metrics import PASS_INPUTS
    from evals.runners import PASS_RUNNERS, register_pass

    assert list(PASS_RUNNERS) == list(PASS_INPUTS)
    with pytest.raises(ValueError, match=r"pass kind 'logits' is not a declared metric input.*PASS_INPUTS"):
        register_pass("logits")
    with pytest.raises(ValueError, match="already registered"):
        register_pass("token_stats")(lambda ctx, spec, mcfg: None)


def test_single_dataset_metrics_take_inputs_keyed_by_role():
    """A metric's pass inputs are always keyed by dataset role, whether its config lists one dataset or several;
    a metric that reads one dataset refuses a bare per-index map and several roles, saying what it got."""
    stats = {0: [const(LN2)]}
    assert run("probability", token_stats={"forget": stats})["agg_value"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"'probability' reads one dataset: token_stats must be keyed by its dataset "
                                         r"role .*got \['0'\]"):
        run("probability", token_stats=stats)
    with pytest.raises(ValueError, match=r"'rouge' reads one dataset.*one role; got \['forget', 'retain'\]"):
        run("rouge", generations={"forget": {}, "retain": {}})
