"""The OpenUnlearning paper's aggregate scores (src/evals/metrics/aggregate.py): each formula against a value
worked out by hand, the handlers' missing-input behaviour, the evaluator's ``metric_inputs``, and an evaluation
end to end (no extra model pass, the scores in the SUMMARY and in the report)."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import pytest

from evals.metrics import get_metric, memorization_score, privacy_score, privleak_score, smia_score
from evals.metrics.utility import harmonic_mean

AGGREGATES = ["memorization_score", "privacy_score", "utility_score", "overall_score"]
ATTACKS = ["mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"]


def run(handler: str, **kwargs) -> dict:
    result = get_metric(handler).fn(**kwargs)
    json.dumps(result, allow_nan=False)  # serialisable and NaN-free
    return result


def results(**values) -> dict:
    return {name: {"agg_value": value} for name, value in values.items()}


# ------------------------------------------------------------------------------------------ the formulas


REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_memorization_score_hand_value():
    # HM(1 - 0.2, 1 - 0.5) = 2 / (1/0.8 + 1/0.5) = 2 / 3.25
    assert memorization_score([0.2, 0.5]) == pytest.approx(2 / 3.25)
    # nothing memorised: 1; one metric at its maximum: 0
    assert memorization_score([0.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert memorization_score([0.0, 1.0]) == 0.0
    with pytest.raises(ValueError, match=r"1\.2: must lie in \[0, 1\]"):
        memorization_score([0.5, 1.2])
    with pytest.raises(ValueError, match="no value"):
        memorization_score([])


def test_smia_hand_values():
    # more separation than the retain model: the gap over the room above it, 1 - 0.2 / (1 - 0.6)
    assert smia_score(0.8, 0.6) == pytest.approx(0.5)
    # less (over-unlearned): the gap over the room below it, 1 - 0.3 / 0.6
    assert smia_score(0.3, 0.6) == pytest.approx(0.5)
    assert smia_score(0.9, 0.5) == pytest.approx(0.2)  # 1 - 0.4 / 0.5
    assert smia_score(0.6, 0.6) == 1.0
    assert smia_score(1.0, 0.6) == pytest.approx(0.0) and smia_score(0.0, 0.6) == pytest.approx(0.0)
    assert smia_score(1.0, 1.0) == 1.0 and smia_score(0.5, 1.0) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="AUC = 1.5"):
        smia_score(1.5, 0.5)


@pytest.mark.parametrize("auc,retain_auc", [(0.8, 0.6), (0.3, 0.6), (0.95, 0.45), (0.1, 0.45), (0.5, 0.5)])
def test_smia_does_not_depend_on_the_positive_class(auc, retain_auc):
    assert smia_score(1 - auc, 1 - retain_auc) == pytest.approx(smia_score(auc, retain_auc))


@pytest.mark.parametrize("auc,retain_auc", [(0.8, 0.6), (0.95, 0.45), (0.52, 0.5228)])
def test_smia_is_one_minus_privleak_on_the_leaking_side(auc, retain_auc):
    if auc < retain_auc:  # a leaking model has the larger AUC here (holdout is our positive class)
        auc, retain_auc = retain_auc, auc
    assert smia_score(auc, retain_auc) == pytest.approx(1 - abs(privleak_score(auc, retain_auc)) / 100)


def test_privacy_score_hand_value():
    # sMIA 0.5, 1, 0.5, 0.2 -> HM = 4 / (2 + 1 + 2 + 5) = 0.4
    assert privacy_score([0.8, 0.6, 0.3, 0.9], [0.6, 0.6, 0.6, 0.5]) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="one retain AUC per AUC"):
        privacy_score([0.8, 0.6], [0.6])


# ------------------------------------------------------------------------------------------ the handlers


def test_memorization_handler():
    res = run("memorization_score", pre_compute=results(extraction_strength=0.2, exact_memorization=0.5))
    assert res["agg_value"] == pytest.approx(2 / 3.25)
    assert res["inputs"] == {"extraction_strength": 0.2, "exact_memorization": 0.5}
    assert res["scores"] == pytest.approx({"extraction_strength": 0.8, "exact_memorization": 0.5})
    # an input without a value: no mean, and the note says which and why (never a 0, never dropped)
    pre = results(extraction_strength=0.2, exact_memorization=None)
    pre["exact_memorization"]["note"] = "every sample was excluded (no answer token or a non-finite value)"
    res = run("memorization_score", pre_compute=pre)
    assert res["agg_value"] is None and res["scores"]["exact_memorization"] is None
    assert "exact_memorization: every sample was excluded" in res["note"]
    with pytest.raises(ValueError, match=r"input 'privleak' = -50.0: must lie in \[0, 1\]"):
        run("memorization_score", pre_compute=results(privleak=-50.0))


def test_privacy_handler_with_and_without_the_retain_model():
    mine = results(mia_loss=0.8, mia_zlib=0.6, mia_min_k=0.3, mia_min_k_plus_plus=0.9)
    retain = results(mia_loss=0.6, mia_zlib=0.6, mia_min_k=0.6, mia_min_k_plus_plus=0.5)
    res = run("privacy_score", pre_compute=mine, reference_logs=retain)
    assert res["agg_value"] == pytest.approx(0.4) and "note" not in res
    assert res["scores"] == pytest.approx({"mia_loss": 0.5, "mia_zlib": 1.0, "mia_min_k": 0.5,
                                           "mia_min_k_plus_plus": 0.2})
    assert res["auc"]["mia_loss"] == 0.8 and res["retain_auc"]["mia_loss"] == 0.6
    # no retain_logs_path (the evaluator hands None for each entry): null, with the reason, like forget_quality
    res = run("privacy_score", pre_compute=mine, reference_logs=dict.fromkeys(retain))
    assert res["agg_value"] is None and set(res["scores"].values()) == {None}
    assert res["note"] == ("privacy_score undefined (no value for mia_loss, mia_zlib, mia_min_k, mia_min_k_plus_plus: "
                           "no retain model result, retain_logs_path not given)")
    # the retain model's AUC undefined for one attack
    retain["mia_zlib"] = {"agg_value": None, "note": "every sample was excluded"}
    res = run("privacy_score", pre_compute=mine, reference_logs=retain)
    assert res["agg_value"] is None and "mia_zlib: retain model result: every sample was excluded" in res["note"]
    with pytest.raises(ValueError, match=r"no reference_logs entry for \['mia_min_k'\]"):
        run("privacy_score", pre_compute=results(mia_min_k=0.5), reference_logs={})


def test_harmonic_mean_of_scores_handler():
    # Utility with one input is that input
    assert run("harmonic_mean_of_scores", pre_compute=results(model_utility=0.42))["agg_value"] == pytest.approx(0.42)
    # Overall: HM(0.5, 0.4, 0.25) = 3 / (2 + 2.5 + 4)
    res = run("harmonic_mean_of_scores", pre_compute=results(memorization_score=0.5, privacy_score=0.4,
                                                             utility_score=0.25))
    assert res["agg_value"] == pytest.approx(3 / 8.5) == harmonic_mean([0.5, 0.4, 0.25])
    assert run("harmonic_mean_of_scores", pre_compute=results(a=0.0, b=0.9))["agg_value"] == 0.0
    # a component without a value passes its own note on
    pre = results(memorization_score=0.5, privacy_score=None, utility_score=0.25)
    pre["privacy_score"]["note"] = "privacy_score undefined (no value for mia_loss: no retain model result, ...)"
    res = run("harmonic_mean_of_scores", pre_compute=pre)
    assert res["note"] == ("harmonic mean undefined (no value for privacy_score: privacy_score undefined (no value "
                           "for mia_loss: no retain model result, ...))") and res["agg_value"] is None


def test_the_scores_are_registered_higher_is_better():
    for handler in ("memorization_score", "privacy_score", "harmonic_mean_of_scores"):
        assert get_metric(handler).higher_is_better is True
    assert get_metric("privacy_score").needs == ("pre_compute", "reference_logs")


# ------------------------------------------------------------------------------------------ metric_inputs


def _evaluator(metrics: dict):
    from evals.base import Evaluator

    return Evaluator({"handler": "Evaluator", "name": "T", "metrics": metrics})


def test_metric_inputs_are_checked_when_the_evaluator_is_built():
    base = {"a": {"handler": "hm_aggregate", "pre_compute": {}}}
    with pytest.raises(ValueError, match=r"metric s: metric_inputs \['nope'\] are not metrics of evaluator T "
                                         r"\(its metrics: a, s\)"):
        _evaluator({**base, "s": {"handler": "harmonic_mean_of_scores", "metric_inputs": {"x": "nope"}}})
    with pytest.raises(ValueError, match="metrics read each other through metric_inputs: s -> t -> s"):
        _evaluator({"s": {"handler": "harmonic_mean_of_scores", "metric_inputs": {"x": "t"}},
                    "t": {"handler": "harmonic_mean_of_scores", "metric_inputs": {"y": "s"}}})
    with pytest.raises(ValueError, match=r"access key\(s\) \['x'\] are given both by metric_inputs and by pre_compute"):
        _evaluator({**base, "s": {"handler": "harmonic_mean_of_scores", "metric_inputs": {"x": "a"},
                                  "pre_compute": {"b": {"handler": "hm_aggregate", "access_key": "x"}}}})
    with pytest.raises(ValueError, match=r"metric_inputs=\['a'\]; give a mapping"):
        _evaluator({**base, "s": {"handler": "harmonic_mean_of_scores", "metric_inputs": ["a"]}})
    with pytest.raises(ValueError, match="handler exact_memorization reads no pre_compute"):
        _evaluator({**base, "s": {"handler": "exact_memorization", "metric_inputs": {"x": "a"},
                                  "datasets": {"main": {}}}})


def test_a_retain_file_without_an_attack(tmp_path):
    """A retain EVAL file without one of the attacks: with missing_entries: error, an error naming it before any
    pass (as privleak and forget quality read their file); with missing_entries: null (the shipped privacy_score
    configs: a retain file of another framework often lacks them), privacy_score is null with a note naming it."""
    from data.utils import DataFileError

    retain = tmp_path / "TOFU_EVAL.json"
    retain.write_text(json.dumps({**results(mia_loss=0.5, mia_zlib=0.5, mia_min_k=0.5), "_meta": {"evaluator": "T"}}))
    attacks = {name: {"handler": name, "datasets": {"forget": {}, "holdout": {}}} for name in ATTACKS}
    include = {name: {"access_key": name} for name in ATTACKS}

    def privacy(missing: str | None) -> dict:
        ref = {"path": str(retain), "include": include, **({"missing_entries": missing} if missing else {})}
        return {"handler": "privacy_score", "metric_inputs": {name: name for name in ATTACKS},
                "reference_logs": {"retain_model_logs": ref}}

    strict = _evaluator({**attacks, "privacy_score": privacy(None)})
    with pytest.raises(DataFileError, match=r"has no metric 'mia_min_k_plus_plus', which privacy_score reads"):
        strict.check_reference_logs(["privacy_score"])
    lenient = _evaluator({**attacks, "privacy_score": privacy("null")})
    lenient.check_reference_logs(["privacy_score"])
    logs = lenient._reference_logs(lenient.metrics_cfg["privacy_score"])
    assert logs["mia_loss"]["agg_value"] == 0.5 and logs["mia_min_k_plus_plus"]["agg_value"] is None
    out = get_metric("privacy_score").fn(pre_compute={name: {"agg_value": 0.6} for name in ATTACKS}, reference_logs=logs)
    assert out["agg_value"] is None and "has no 'mia_min_k_plus_plus' entry" in out["note"]
    with pytest.raises(ValueError, match=r"missing_entries='skip'; valid: error, null"):
        _evaluator({**attacks, "privacy_score": privacy("skip")}).check_reference_logs(["privacy_score"])
    for bench in ("tofu", "muse"):  # the shipped configs are lenient
        config = (REPO_CONFIGS / "eval" / f"{bench}_metrics" / "privacy_score.yaml").read_text()
        assert 'missing_entries: "null"' in config


# ------------------------------------------------------------------------------------------ end to end


def _eval_in_process(tofu, out, *extra):
    from hydra import compose, initialize_config_dir

    import eval as eval_script
    from conftest import MODEL_CACHE, REPO

    short = ["eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=4",
             *[f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=4"
               for p in ("retain", "ra", "wf")]]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="eval.yaml", overrides=[
            "model=tiny-random-llama", f"paths.tofu={tofu}", f"paths.output_dir={out}", "eval.tofu.limit=4",
            f"paths.model_cache_dir={MODEL_CACHE}", *short, *extra])
    return eval_script.run(cfg)


def _counted(name: str, fn, calls: dict):
    def counted(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return fn(*args, **kwargs)
    return counted


def _counting_passes(monkeypatch) -> dict:
    """Count the model passes an evaluation runs, by kind (the functions the pass runners call)."""
    from evals import passes

    calls: dict[str, int] = {}
    for name in ("token_stats_passes", "generation_pass", "plain_token_stats_pass", "plain_generation_pass"):
        monkeypatch.setattr(passes, name, _counted(name, vars(passes)[name], calls))
    return calls


def test_evaluation_reports_the_scores_without_another_model_pass(tofu_dir, tmp_path, monkeypatch, caplog):
    calls = _counting_passes(monkeypatch)
    with caplog.at_level("WARNING", logger="evals.base"):
        _eval_in_process(tofu_dir, tmp_path / "with")
    with_scores = dict(calls)
    calls.clear()
    listed = ["forget_quality", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_Truth_Ratio", "model_utility",
              "privleak", "extraction_strength", "exact_memorization", *ATTACKS]
    _eval_in_process(tofu_dir, tmp_path / "without", f"eval/tofu_metrics@eval.tofu.tofu_metrics=[{','.join(listed)}]")
    assert with_scores == calls and with_scores  # the same passes, each run once

    logs = json.loads((tmp_path / "with" / "TOFU_EVAL.json").read_text())
    summary = json.loads((tmp_path / "with" / "TOFU_SUMMARY.json").read_text())
    assert list(summary)[-4:] == AGGREGATES
    assert all(logs["_meta"]["higher_is_better"][name] is True for name in AGGREGATES)
    # Memorization from the reported metrics and the forget truth ratios averaged as P_correct / (P_correct + P_wrong)
    ratios = [entry["score"] for entry in logs["forget_Truth_Ratio"]["value_by_index"].values()]
    inputs = [summary["extraction_strength"], summary["exact_memorization"],
              logs["forget_Q_A_PARA_Prob"]["agg_value"], sum(1 / (1 + r) for r in ratios) / len(ratios)]
    assert summary["memorization_score"] == pytest.approx(harmonic_mean([1 - x for x in inputs]))
    assert logs["forget_Truth_Ratio_prob_mean"]["agg_value"] == pytest.approx(inputs[3])
    assert summary["utility_score"] == summary["model_utility"]
    # no retain model: privacy and overall are null, with the reason, logged
    assert summary["privacy_score"] is None and summary["overall_score"] is None
    assert "retain_logs_path not given" in logs["privacy_score"]["note"]
    assert "retain_logs_path not given" in logs["overall_score"]["note"]
    assert "privacy_score undefined" in caplog.text

    # against its own logs: every attack's AUC equals the retain model's, sMIA 1
    _eval_in_process(tofu_dir, tmp_path / "with", f"retain_logs_path={tmp_path / 'with' / 'TOFU_EVAL.json'}")
    again = json.loads((tmp_path / "with" / "TOFU_SUMMARY.json").read_text())
    assert again["privacy_score"] == 1.0
    assert again["overall_score"] == pytest.approx(harmonic_mean([again["memorization_score"], 1.0,
                                                                  again["utility_score"]]))

    # the report shows them: a column each, higher is better, the SUMMARY's numbers
    import report

    with contextlib.redirect_stdout(io.StringIO()):
        assert report.main([str(tmp_path / "with"), "--out", str(tmp_path / "report")]) == 0
    (row,) = csv.DictReader((tmp_path / "report" / "report.csv").open(encoding="utf-8", newline=""))
    header = next(line for line in (tmp_path / "report" / "report.md").read_text().splitlines()
                  if line.startswith("| name"))
    for name in AGGREGATES:
        assert f"{name} ↑" in header
        assert math.isclose(float(row[name]), again[name]), name
