"""Runs at scale: the best checkpoint under a constraint, the evaluation history, the final evaluation,
sweeps (Hydra multirun) and what a run returns to an optimising sweeper."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, train_in_process
from sweep import job_folder_name, sweep_objective
from trainer.selection import parse_constraint, resolve_metric_key

# ----- pure pieces ----------------------------------------------------------------------------------


def test_constraint_parses_and_holds():
    c = parse_constraint("forget_quality >= 0.05")
    assert (c.metric, c.comparison, c.threshold) == ("forget_quality", ">=", 0.05)
    assert c.holds({"forget_quality": 0.05}) and not c.holds({"forget_quality": 0.049})
    assert not c.holds({}) and not c.holds({"forget_quality": math.nan})  # missing / not computed: fails
    assert parse_constraint("tofu.privleak<-1e-1").holds({"tofu.privleak": -0.2})
    for bad in ("forget_quality => 0.05", "forget_quality >= high", ">= 0.05", "forget_quality"):
        with pytest.raises(ValueError, match="<metric> <op> <number>"):
            parse_constraint(bad)


def test_metric_names_resolve_to_logged_keys():
    valid = ["eval_loss", ("eval_tofu_model_utility", "tofu"), ("eval_tofu_forget_quality", "tofu"),
             ("eval_muse_privleak", "muse"), ("eval_tofu_privleak", "tofu"), ("eval_lm_eval_mmlu_acc", "lm_eval")]
    assert resolve_metric_key("loss", valid, setting="s") == "eval_loss"
    assert resolve_metric_key("model_utility", valid, setting="s") == "eval_tofu_model_utility"
    assert resolve_metric_key("tofu_forget_quality", valid, setting="s") == "eval_tofu_forget_quality"
    assert resolve_metric_key("eval_lm_eval_mmlu_acc", valid, setting="s") == "eval_lm_eval_mmlu_acc"
    assert resolve_metric_key("mmlu_acc", valid, setting="s") == "eval_lm_eval_mmlu_acc"
    with pytest.raises(ValueError, match="ambiguous: it could be eval_muse_privleak, eval_tofu_privleak"):
        resolve_metric_key("privleak", valid, setting="s")
    with pytest.raises(ValueError, match=r"s='utility': no evaluation of this run produces 'eval_utility'; valid: eval_loss"):
        resolve_metric_key("utility", valid, setting="s")


def test_sweep_folder_names_show_the_swept_values():
    overrides = ["experiment=unlearn/tofu/default", "trainer=NPO", "trainer.args.learning_rate=1e-05",
                 "trainer.method_args.alpha=0.5", "paths.tofu=/data/tofu"]
    swept = {"trainer.args.learning_rate", "trainer.method_args.alpha"}
    assert job_folder_name(overrides, swept) == "trainer.args.learning_rate=1e-05,trainer.method_args.alpha=0.5"
    # nothing known of the sweep: every override but those choosing what it is about
    assert job_folder_name(overrides, None) == "trainer.args.learning_rate=1e-05,trainer.method_args.alpha=0.5"
    assert job_folder_name(["data.dataset_args.max_length=64", "+x=a/b"], {"+x", "x"}) == "x=a_b"


def test_each_combination_of_a_sweep_gets_its_own_output_folder(tmp_path, monkeypatch):
    """A literal paths.output_dir, the same for every combination, gets the swept values as a subfolder; a
    folder another job of the sweep already used is refused, naming that job."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    import sweep
    from checks import BadValueError

    def job(num, overrides):
        root = OmegaConf.create({"paths": {"root_dir": str(tmp_path)}, "hydra": {
            "mode": RunMode.MULTIRUN, "overrides": {"task": overrides}, "sweep": {"dir": str(tmp_path / "sweep")},
            "job": {"num": num}, "runtime": {"output_dir": str(tmp_path / "sweep" / str(num))}, "sweeper": {}}})
        hydra_cfg = root.hydra  # as Hydra's: a node of the run's config, where interpolations resolve
        monkeypatch.setattr(sweep.HydraConfig, "get", staticmethod(lambda: hydra_cfg))
        monkeypatch.setattr(sys, "argv", ["train.py", "-m", "trainer.args.learning_rate=1e-4,2e-4", *overrides[1:]])

    import sys

    mine = str(tmp_path / "mine")
    job(0, ["trainer.args.learning_rate=1e-4", f"paths.output_dir={mine}"])
    cfg = OmegaConf.create({"paths": {"output_dir": mine}})
    sweep.own_folder(cfg)
    assert cfg.paths.output_dir == f"{mine}/trainer.args.learning_rate=1e-4"
    sweep.write_job_status("finished", cfg.paths.output_dir)
    job(1, ["trainer.args.learning_rate=2e-4", f"paths.output_dir={mine}"])
    second = OmegaConf.create({"paths": {"output_dir": mine}})
    sweep.own_folder(second)
    assert second.paths.output_dir == f"{mine}/trainer.args.learning_rate=2e-4"
    # a folder built from settings the sweep does not vary: the same for both jobs, refused for the second
    job(1, ["trainer.args.learning_rate=2e-4", "paths.output_dir=${paths.root_dir}/x"])
    clash = OmegaConf.create({"paths": {"output_dir": f"{mine}/trainer.args.learning_rate=1e-4"}})
    with pytest.raises(BadValueError, match=r"was already the folder of job 0 of this sweep "
                                            r"\(trainer.args.learning_rate=1e-4\): every combination needs its own"):
        sweep.own_folder(clash)


def test_sweep_objective_with_a_constraint_and_a_pareto_front():
    summaries = {"tofu": {"model_utility": 0.42, "forget_quality": 0.1, "privleak": None}}
    assert sweep_objective(summaries, ["tofu.model_utility"]) == 0.42
    assert sweep_objective(summaries, ["model_utility"], "forget_quality >= 0.05") == 0.42
    # a miss is the worst value of the direction (Optuna refuses NaN), never the optimum
    assert sweep_objective(summaries, ["model_utility"], "tofu.forget_quality >= 0.5") == -math.inf
    assert sweep_objective(summaries, ["model_utility"], "forget_quality >= 0.5", ["minimize"]) == math.inf
    assert sweep_objective(summaries, ["model_utility", "forget_quality"]) == [0.42, 0.1]
    assert sweep_objective(summaries, ["privleak"]) == -math.inf  # not computed: no made-up value
    with pytest.raises(ValueError, match="sweeper direction 'max'; valid: maximize, minimize"):
        sweep_objective(summaries, ["model_utility"], directions=["max"])
    with pytest.raises(ValueError, match=r"'forget_qualty' is not in the run's final evaluation; valid: tofu.model_utility"):
        sweep_objective(summaries, ["forget_qualty"])


# ----- the best checkpoint, end to end --------------------------------------------------------------
def _scripted_bench():
    """A benchmark whose summary at step s is the s-th entry of each script (the step read from the model id
    the trainer gives, ``<output>@step<s>``), saved like any result."""
    from evals import Benchmark, EvalResult

    class ScriptedBench(Benchmark):
        utility = [0.5, 0.9, 0.8, 0.7]
        quality = [0.1, 0.01, 0.2, 0.06]

        def summary_names(self):
            return ["model_utility", "forget_quality"]

        def directions(self):
            return {"model_utility": True, "forget_quality": True}

        def check_inputs(self, names=None):
            pass

        def input_paths(self):
            return []

        def evaluate(self, model, *, output_dir=None, model_id=None, overwrite=None, only=None, save=True):
            step = int(model_id.rsplit("@step", 1)[1])
            summary = {"model_utility": self.utility[step - 1], "forget_quality": self.quality[step - 1]}
            result = EvalResult("TOFU", {k: {"agg_value": v} for k, v in summary.items()}, summary, {"step": step})
            if save:
                result.save(output_dir)
            return result

    return ScriptedBench({"name": "TOFU"})


def test_best_checkpoint_obeys_the_constraint_and_becomes_the_result(tofu_dir, tmp_path, monkeypatch):
    """Step 2 has the best utility but fails forget_quality >= 0.05: the result is step 3 (the best that
    passes), kept despite save_total_limit=1, its evaluation copied as the run's; every evaluation is in
    the history."""
    import train

    monkeypatch.setattr(train, "get_evaluators", lambda *a, **k: {"tofu": _scripted_bench()})
    out = tmp_path / "run"
    train_in_process(out, [
        "model=tiny-random-llama", "trainer=GradDiff", f"paths.tofu={tofu_dir}", "data.eval=null",
        "trainer.args.max_steps=4", "trainer.args.per_device_train_batch_size=2", "trainer.args.gradient_accumulation_steps=1",
        "trainer.args.learning_rate=1e-3", "trainer.args.eval_strategy=steps", "trainer.args.eval_steps=1",
        "trainer.args.save_strategy=steps", "trainer.args.save_steps=1", "trainer.args.save_total_limit=1",
        "trainer.args.load_best_model_at_end=true", "trainer.args.metric_for_best_model=model_utility",
        "trainer.best_model_constraint='forget_quality >= 0.05'", "trainer.args.report_to=none"])
    best = json.loads((out / "best_checkpoint.json").read_text())
    assert best == {"metric": "eval_tofu_model_utility", "greater_is_better": True,
                    "constraint": "forget_quality >= 0.05", "step": 3, "value": 0.8, "checkpoint": "checkpoint-3",
                    "is_result": True}
    assert (out / "checkpoint-3").is_dir()
    result, kept = load_file(str(out / "model.safetensors")), load_file(str(out / "checkpoint-3" / "model.safetensors"))
    assert all(torch.equal(result[k], kept[k]) for k in result)
    assert json.loads((out / "evals" / "TOFU_EVAL.json").read_text())["_meta"]["step"] == 3
    history = [json.loads(line) for line in (out / "eval_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert [h["summary"]["model_utility"] for h in history] == [0.5, 0.9, 0.8, 0.7]


def test_constraint_without_metric_and_unknown_constraint_metric_are_errors(tofu_dir, tmp_path, monkeypatch):
    import train

    monkeypatch.setattr(train, "get_evaluators", lambda *a, **k: {"tofu": _scripted_bench()})
    common = ["model=tiny-random-llama", f"paths.tofu={tofu_dir}", "data.eval=null", "trainer.args.max_steps=1",
              "trainer.args.eval_strategy=steps", "trainer.args.eval_steps=1", "trainer.args.report_to=none"]
    with pytest.raises(ValueError, match="needs trainer.args.metric_for_best_model"):
        train_in_process(tmp_path / "a", [*common, "trainer.best_model_constraint='forget_quality >= 0.05'"])
    with pytest.raises(ValueError, match=r"best_model_constraint='forget_qualty'.*valid: eval_tofu_model_utility"):
        train_in_process(tmp_path / "b", [*common, "trainer.args.metric_for_best_model=model_utility",
                                          "trainer.best_model_constraint='forget_qualty > 0'"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----- sweeps ---------------------------------------------------------------------------------------
def test_multirun_puts_each_combination_in_its_folder_and_lists_failures(tofu_dir, tmp_path):
    """Two combinations, one with an invalid learning rate: the other still finishes into a folder named
    by its swept value; the summary lists both and the exit status says one failed."""
    result = run_cli(["src/train.py", "-m", "--config-name=unlearn.yaml", "model=tiny-random-llama", "trainer=GradDiff",
                      f"paths.tofu={tofu_dir}", f"paths.root_dir={tmp_path}", "data.eval=null", "trainer.args.max_steps=1",
                      "trainer.args.per_device_train_batch_size=2", "trainer.args.gradient_accumulation_steps=1",
                      "trainer.args.report_to=none", "trainer.args.learning_rate=-1,1e-4"])
    assert result.returncode == 1, result.stderr[-3000:]
    task = tmp_path / "saves" / "unlearn" / "GradDiff_TOFU_QA_FORGET10"
    finished = task / "trainer.args.learning_rate=0.0001"
    assert (finished / "run_complete.json").is_file() and (finished / "model.safetensors").is_file()
    assert not (task / "trainer.args.learning_rate=-1").exists()
    summary_file = next((tmp_path / "saves" / "logs" / "unlearn" / "multirun").glob("*/sweep_summary.json"))
    summary = json.loads(summary_file.read_text())
    records = summary["jobs"]
    assert [(r["swept"], r["status"]) for r in records] == [("trainer.args.learning_rate=-1", "failed"),
                                                            ("trainer.args.learning_rate=0.0001", "finished")]
    assert "learning_rate=-1; must be a finite number >= 0" in records[0]["error"]
    assert records[1]["output_dir"] == str(finished)
    # the cost: the finished run's record, summed (the failed one has none)
    run_cost = json.loads((finished / "run_complete.json").read_text())["compute"]["total"]
    assert records[0]["compute"] is None and records[1]["compute"] == run_cost
    spent = summary["compute"]
    assert (spent["runs_counted"], spent["runs_without_record"]) == (1, 1)
    assert (spent["tokens"], spent["flops"], spent["wall_s"]) == (run_cost["tokens"], run_cost["flops"], run_cost["wall_s"])
    assert spent["tokens"] > 0
    assert "1 of 2 combination(s) failed" in result.stdout + result.stderr


@pytest.mark.slow  # ~45 s: two trials (make test-slow installs the sweep extra)
def test_optuna_sweep_returns_the_final_evaluation(tofu_dir, tmp_path):
    """experiment=sweep/tofu_optuna_pareto for 2 trials on a 2-layer model: each trial's returned objective
    is its final TOFU evaluation, and the study writes its Pareto front."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the sweep extra: pip install -e '.[sweep]'")
    result = run_cli(["src/train.py", "-m", "--config-name=unlearn.yaml", "experiment=sweep/tofu_optuna_pareto",
                      "model=tiny-random-llama", "model.model_args.pretrained_model_name_or_path=null",
                      f"paths.tofu={tofu_dir}", f"paths.root_dir={tmp_path}", "trainer.args.max_steps=1",
                      "trainer.args.per_device_train_batch_size=2", "trainer.args.gradient_accumulation_steps=1",
                      "trainer.args.report_to=none", "objective.metrics=[tofu.model_utility,tofu.forget_Q_A_Prob]",
                      "hydra.sweeper.direction=[maximize,minimize]", "hydra.sweeper.n_trials=2",
                      "eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=4"])
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = next((tmp_path / "saves" / "logs" / "unlearn" / "multirun").iterdir())
    records = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    assert [r["status"] for r in records] == ["finished", "finished"]
    for record in records:
        summary = json.loads((tmp_path / record["output_dir"] / "evals" / "TOFU_SUMMARY.json").read_text())
        assert record["objective"] == [summary["model_utility"], summary["forget_Q_A_Prob"]]
        assert "trainer.args.learning_rate=" in record["output_dir"]  # named by the sampled values
    assert "solutions:" in (sweep_dir / "optimization_results.yaml").read_text()  # the Pareto front


@pytest.mark.slow  # ~12 s: the launcher plugin's composition (make test-slow)
def test_submitit_launcher_composes_for_slurm():
    """The documented cluster command composes (the cluster extra installs the launcher plugin)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the cluster extra: pip install -e '.[cluster]'")
    result = run_cli(["src/train.py", "--config-name=unlearn.yaml", "experiment=unlearn/tofu/default",
                      "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1",
                      "hydra.launcher.timeout_min=600", "--cfg", "hydra"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SlurmLauncher" in result.stdout and "partition: gpu" in result.stdout


# ----- logging and progress -------------------------------------------------------------------------
def test_tensorboard_gets_the_loss_terms_and_the_evaluation_metrics(tofu_dir, tmp_path, monkeypatch):
    """report_to=tensorboard (the default): loss, each loss term and every evaluation metric are scalars of
    their own in <output>/runs/; the final evaluation's too."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train

    monkeypatch.setattr(train, "get_evaluators", lambda *a, **k: {"tofu": _scripted_bench()})
    out = tmp_path / "run"
    train_in_process(out, [
        "model=tiny-random-llama", "trainer=GradDiff", f"paths.tofu={tofu_dir}", "data.eval=null",
        "trainer.args.max_steps=2", "trainer.args.per_device_train_batch_size=2", "trainer.args.logging_steps=1",
        "trainer.args.gradient_accumulation_steps=1", "trainer.args.eval_strategy=steps", "trainer.args.eval_steps=2"])
    (events,) = list((out / "runs").rglob("events.out.tfevents.*"))
    scalars = EventAccumulator(str(events.parent)).Reload().Tags()["scalars"]
    assert {"train/loss", "train/forget_loss", "train/retain_loss", "eval/tofu_model_utility",
            "eval/tofu_forget_quality"} <= set(scalars)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # the last evaluation was at the last step: it is the result's, not computed again
    assert not any("final_tofu_model_utility" in e for e in log)
    assert json.loads((out / "evals" / "TOFU_EVAL.json").read_text())["_meta"]["step"] == 2


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import progress

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("UNLEARNING_PROGRESS", "1")
    assert progress.progress_enabled() and not progress.progress(3, "x").disable
    monkeypatch.setenv("UNLEARNING_PROGRESS", "0")
    assert not progress.progress_enabled() and isinstance(progress.progress(3, "x"), progress.LoggedProgress)
    monkeypatch.delenv("UNLEARNING_PROGRESS")
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert not progress.progress_enabled()
    monkeypatch.setenv("UNLEARNING_PROGRESS", "1")
    monkeypatch.setenv("RANK", "1")  # another process than 0 never draws one
    assert not progress.progress_enabled()
    assert list(progress.progress_over(iter([1, 2]), "y")) == [1, 2]


def test_without_a_bar_long_loops_log_their_progress(tofu_dir, tmp_path, monkeypatch, caplog):
    """Off a terminal every loop logs a line when it starts and at least every LOG_INTERVAL_S seconds with what is
    done, the time elapsed and an estimate of the time left: training, the evaluation passes, the relearning."""
    import progress

    clock = iter(range(0, 10_000, 20))  # each reading of the clock 20 s after the previous one
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    caplog.set_level("INFO", logger="progress")
    with progress.progress(4, "generate forget", unit="sample") as bar:  # started at t=0
        bar.update(1)  # t=20: not yet 30 s since the last line
        bar.update(1)  # t=40: a line, 2 of 4 in 40 s -> about 40 s left
    assert caplog.messages == ["generate forget: 4 sample(s) to go",
                               "generate forget: 2/4 sample(s), 40 s elapsed, about 40 s left",
                               "generate forget: 2 sample(s) done in 1 min 00 s"]

    monkeypatch.undo()  # the real clock again
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    monkeypatch.setenv("UNLEARNING_PROGRESS", "0")
    caplog.clear()
    train_in_process(tmp_path / "run", [
        "model=tiny-random-llama", "trainer=GradDiff", f"paths.tofu={tofu_dir}", "data.eval=null",
        "trainer.args.max_steps=2", "trainer.args.per_device_train_batch_size=2", "trainer.args.disable_tqdm=true",
        "trainer.args.gradient_accumulation_steps=1", "eval=tofu", "eval.tofu.limit=2",
        "eval/tofu_metrics@eval.tofu.tofu_metrics=[forget_Q_A_Prob]"])
    messages = caplog.messages
    assert "training: 2 step(s) to go" in messages and any(m.startswith("training: 1/2 step(s)") for m in messages)
    assert any(m.startswith("log-probs") and "to go" in m for m in messages)  # the final evaluation's pass
