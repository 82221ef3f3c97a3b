"""Robustness-aware selection: an unlearning run's final evaluation under attack (``attack=`` in src/train.py),
a sweep objective naming ``<metric>@<attack>``, and the report's clean-vs-attacked gap."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import REPO, run_cli

RELEARN = ["attack=relearn", "attack.relearn.steps=1", "attack.relearn.batch_size=2", "attack.relearn.fraction=1.0",
           "attack.relearn.learning_rate=1e-3"]
COMMON = ["model=tiny-random-llama", "trainer=GradDiff", "data.eval=null", "eval=tofu", "eval.tofu.limit=4",
          "trainer.args.max_steps=1", "trainer.args.per_device_train_batch_size=2",
          "trainer.args.gradient_accumulation_steps=1", "trainer.args.report_to=none",
          "eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=4",
          *[f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=4"
            for p in ("retain", "ra", "wf")]]
OBJECTIVE = "tofu.forget_Q_A_Prob@relearn"


def test_an_attack_needs_a_final_evaluation(tofu_dir, tmp_path):
    """attack=... without eval=<bench>: refused before the output folder is taken."""
    from hydra import compose, initialize_config_dir

    import train
    from checks import BadValueError

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="unlearn.yaml", overrides=[
            "model=tiny-random-llama", f"paths.tofu={tofu_dir}", "data.eval=null", *RELEARN,
            f"paths.output_dir={tmp_path / 'run'}"])
    with pytest.raises(BadValueError, match=r"attack=\['relearn'\] attacks the result's final evaluation, but the "
                                            "run has none: add eval=<bench>"):
        train.run(cfg)
    assert not (tmp_path / "run").exists()


def test_a_sweep_selects_on_the_metric_after_relearning(tofu_dir, tmp_path):
    """Two combinations, each unlearned, evaluated, then relearned and evaluated again: each job's objective is
    its forget_Q_A_Prob after relearning, the EVAL and ROBUSTNESS files hold both values, and the report shows
    the gap attacked - clean per run."""
    result = run_cli(["src/train.py", "-m", "--config-name=unlearn.yaml", *COMMON, *RELEARN, f"paths.tofu={tofu_dir}",
                      f"paths.root_dir={tmp_path}", f"objective.metrics=[{OBJECTIVE}]",
                      "trainer.args.learning_rate=1e-5,1e-3"], timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    summary_file = next((tmp_path / "saves" / "logs" / "unlearn" / "multirun").glob("*/sweep_summary.json"))
    records = json.loads(summary_file.read_text())["jobs"]
    assert [r["status"] for r in records] == ["finished", "finished"]
    for record in records:
        evals = tmp_path / record["output_dir"] / "evals"
        summary = json.loads((evals / "TOFU_SUMMARY.json").read_text())
        assert record["objective"] == summary["forget_Q_A_Prob@relearn"]
        assert {"forget_Q_A_Prob", "forget_Q_A_ROUGE@relearn", "forget_quality@relearn"} <= set(summary)
        robustness = json.loads((evals / "TOFU_ROBUSTNESS.json").read_text())
        assert robustness["forget_Q_A_Prob"]["attacked"]["relearn"] == summary["forget_Q_A_Prob@relearn"]
        assert robustness["forget_Q_A_Prob"]["clean"] == summary["forget_Q_A_Prob"]
        meta = json.loads((evals / "TOFU_EVAL.json").read_text())["_meta"]
        assert meta["attacks"]["relearn"]["steps"] == 1
        phases = json.loads((tmp_path / record["output_dir"] / "run_complete.json").read_text())["compute"]["phases"]
        assert [p["name"] for p in phases][-1] == "attack:relearn:TOFU"  # the attack is part of the run's cost
    # the relearning moved the forget probability: the objective is not the clean value
    assert any(r["objective"] != json.loads((tmp_path / r["output_dir"] / "evals" / "TOFU_SUMMARY.json").read_text())
               ["forget_Q_A_Prob"] for r in records)

    import report

    task = tmp_path / "saves" / "unlearn" / "GradDiff_TOFU_QA_FORGET10"
    assert report.main([str(task), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "report.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for row in rows:
        gap = float(row["forget_Q_A_Prob@relearn gap"])
        assert gap == pytest.approx(float(row["forget_Q_A_Prob@relearn"]) - float(row["forget_Q_A_Prob"]))
    assert (tmp_path / "report" / "robustness.png").is_file()


@pytest.mark.slow  # ~90 s: two Optuna trials, each relearned (make test-slow installs the sweep extra)
def test_optuna_minimises_the_forget_probability_after_relearning(tofu_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the sweep extra: pip install -e '.[sweep]'")
    npo = [o for o in COMMON if not o.startswith("trainer=")]  # the experiment's NPO, whose settings it searches
    result = run_cli(["src/train.py", "-m", "--config-name=unlearn.yaml", "experiment=sweep/tofu_optuna", *npo,
                      *RELEARN, "model.model_args.pretrained_model_name_or_path=null",
                      f"paths.tofu={tofu_dir}", f"paths.root_dir={tmp_path}", f"objective.metrics=[{OBJECTIVE}]",
                      "objective.constraint=null", "hydra.sweeper.direction=minimize", "hydra.sweeper.n_trials=2"],
                     timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    sweep_dir = next((tmp_path / "saves" / "logs" / "unlearn" / "multirun").iterdir())
    records = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    assert [r["status"] for r in records] == ["finished", "finished"]
    values = []
    for record in records:
        summary = json.loads((tmp_path / record["output_dir"] / "evals" / "TOFU_SUMMARY.json").read_text())
        assert record["objective"] == summary["forget_Q_A_Prob@relearn"]
        values.append(record["objective"])
    best = (sweep_dir / "optimization_results.yaml").read_text()
    assert f"best_value: {min(values)}" in best
