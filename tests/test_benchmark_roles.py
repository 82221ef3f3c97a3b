"""What a benchmark's config declares about its metrics (evals.benchmark.BenchmarkRoles) and how it is recorded."""

import pytest

from checks import BadValueError
from evals.base import Evaluator
from evals.benchmark import BenchmarkRoles

DATA = {"main": "TOFU_QA_FORGET10"}
METRICS = {"forget_Q_A_ROUGE": {"handler": "rouge", "datasets": DATA},
           "forget_Q_A_Prob": {"handler": "probability", "datasets": DATA},
           "forget_Truth_Ratio": {"handler": "truth_ratio", "aggregator": "true_better",
                                  "pre_compute": {k: {"handler": "probability", "datasets": DATA, "access_key": k}
                                                  for k in ("correct", "wrong")}}}


def test_roles_are_read_from_the_config_and_checked():
    roles = BenchmarkRoles.from_config("X", {"data_folder_key": "paths.x", "headline_metrics": ["u", "f"],
                                             "sample_metrics": ["f"]})
    assert roles.data_folder_key == "paths.x" and roles.headline_metrics == ("u", "f")
    assert roles.sample_metrics == ("f",) and roles.trajectory_metrics == ()
    with pytest.raises(BadValueError, match=r"data_folder_key='tofu'.*paths.<name>"):
        BenchmarkRoles.from_config("X", {"data_folder_key": "tofu"})
    with pytest.raises(BadValueError, match=r"headline_metrics='u'; give a list of metric names"):
        BenchmarkRoles.from_config("X", {"headline_metrics": "u"})


def test_roles_keep_only_the_metrics_the_benchmark_reports():
    roles = BenchmarkRoles(headline_metrics=("a", "b"), trajectory_metrics=("b", "c"), sample_metrics=("c",))
    kept = roles.restricted_to(["b"])
    assert (kept.headline_metrics, kept.trajectory_metrics, kept.sample_metrics) == (("b",), ("b",), ())


def test_sample_metrics_record_their_per_sample_field():
    ev = Evaluator({"name": "TOY", "metrics": METRICS, "headline_metrics": ["forget_Q_A_Prob", "not_reported"],
                    "sample_metrics": ["forget_Q_A_Prob", "forget_Q_A_ROUGE"]})
    meta = ev.roles_meta()
    assert meta["sample_metrics"] == {"forget_Q_A_Prob": "prob", "forget_Q_A_ROUGE": "rougeL_recall"}
    assert meta["headline_metrics"] == ["forget_Q_A_Prob"]  # a metric the benchmark does not report is dropped


def test_a_sample_metric_without_per_sample_values_is_an_error():
    with pytest.raises(BadValueError, match=r"sample_metrics \['forget_Truth_Ratio'\] record no per-sample values"):
        Evaluator({"name": "TOY", "metrics": METRICS, "sample_metrics": ["forget_Truth_Ratio"]})
