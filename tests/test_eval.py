"""The evaluation suite end to end: src/eval.py, EVAL/SUMMARY files, reuse, evaluation during unlearning."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_cli

DEFAULT_METRICS = ["forget_quality", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_Truth_Ratio", "model_utility",
                   "privleak", "extraction_strength", "exact_memorization", "mia_loss", "mia_zlib", "mia_min_k",
                   "mia_min_k_plus_plus", "memorization_score", "privacy_score", "utility_score", "overall_score"]
#: What compares with the retain model: null without retain_logs_path, with a note saying so.
NEEDS_RETAIN = ("forget_quality", "privacy_score", "overall_score")
SHORT_GENERATION = [f"eval.tofu.metrics.{m}.generation_args.max_new_tokens=16" for m in ("forget_Q_A_ROUGE",)] + [
    f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=16"
    for p in ("retain", "ra", "wf")]


def _eval(tofu, out, *extra):
    result = run_cli(["src/eval.py", "--config-name=eval.yaml", "model=tiny-random-llama", f"paths.tofu={tofu}",
                      f"paths.output_dir={out}", *SHORT_GENERATION, *extra])
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _eval_in_process(tofu, out, *extra, generation=SHORT_GENERATION):
    """``_eval`` run by ``eval.run`` in this process (no interpreter start-up: the command line itself is
    covered by ``_eval``)."""
    from hydra import compose, initialize_config_dir

    import eval as eval_script
    from conftest import MODEL_CACHE, REPO

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="eval.yaml", overrides=[
            "model=tiny-random-llama", f"paths.tofu={tofu}", f"paths.output_dir={out}",
            f"paths.model_cache_dir={MODEL_CACHE}", *generation, *extra])
    return eval_script.run(cfg)


def _load(path):
    return json.loads(path.read_text())


def _container(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def test_eval_writes_every_metric_and_reuses_them(tofu_dir, tmp_path, caplog):
    out = tmp_path / "eval"
    first = _eval(tofu_dir, out)
    logs = _load(out / "TOFU_EVAL.json")
    summary = _load(out / "TOFU_SUMMARY.json")
    assert set(DEFAULT_METRICS) <= set(logs) and logs["_meta"]["splits"]["forget_split"] == "forget10"
    assert list(summary) == DEFAULT_METRICS
    for name in DEFAULT_METRICS:
        if name in NEEDS_RETAIN:  # no retain logs given: reported as missing, not made up
            assert summary[name] is None and "retain" in logs[name]["note"]
            continue
        assert summary[name] is not None and math.isfinite(summary[name]), name
    # per-sample values keyed by dataset index; generations kept
    forget = logs["forget_Q_A_ROUGE"]["value_by_index"]
    assert set(forget) == {str(i) for i in range(8)}
    assert {"input", "ground_truth", "generation", "rougeL_recall"} <= set(forget["0"])
    assert "forget_quality" in first.stdout and "model_utility" in first.stdout  # the printed table
    # not a terminal: no progress bars (ours, transformers' weight loading, datasets' file reading)
    assert "it/s]" not in first.stderr and "Loading weights" not in first.stderr and "%|" not in first.stderr
    assert (out / "config.yaml").is_file()  # what was evaluated, for the report
    # every pre-compute metric at the top level under open-unlearning's names, with per-sample values
    pre_compute = ["forget_truth_ratio", "forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "retain_Q_A_Prob",
                   "retain_Q_A_ROUGE", "retain_Truth_Ratio", "retain_Q_A_PARA_Prob", "retain_Q_A_PERT_Prob",
                   "ra_Q_A_Prob_normalised", "ra_Q_A_Prob", "ra_Q_A_PERT_Prob", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
                   "wf_Q_A_Prob_normalised", "wf_Q_A_Prob", "wf_Q_A_PERT_Prob", "wf_Q_A_ROUGE", "wf_Truth_Ratio",
                   "forget_Truth_Ratio_prob_mean"]
    assert set(logs) == set(DEFAULT_METRICS) | set(pre_compute) | {"_meta"}
    assert len(logs["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]["prob"]) > 1  # one per perturbed answer
    assert logs["forget_truth_ratio"] == logs["forget_Truth_Ratio"]
    assert math.isfinite(logs["ra_Q_A_Prob_normalised"]["agg_value"])

    # Against its own logs: forget quality 1 (same distribution), privleak 0.
    with caplog.at_level("INFO", logger="evals.base"):
        second = _eval_in_process(tofu_dir, out, f"retain_logs_path={out / 'TOFU_EVAL.json'}")
    again = _load(out / "TOFU_SUMMARY.json")
    assert again == second["tofu"].summary
    assert again["forget_quality"] == 1.0
    assert abs(again["privleak"]) < 1e-9
    assert again["model_utility"] == summary["model_utility"]
    assert "reusing" in caplog.text  # unchanged metrics are not recomputed
    # a reused metric keeps its pre-compute entries in the rewritten file
    assert set(_load(out / "TOFU_EVAL.json")) == set(logs)

    caplog.clear()
    with caplog.at_level("INFO", logger="evals.base"):
        _eval_in_process(tofu_dir, out, f"retain_logs_path={out / 'TOFU_EVAL.json'}", "eval.tofu.overwrite=true")
    assert "reusing" not in caplog.text
    assert _load(out / "TOFU_SUMMARY.json") == again


@pytest.mark.slow  # ~2 min on 2 cores: the full metric set over 40 real rows (make test-slow)
def test_eval_on_real_tofu_forget01(shared_tofu, tmp_path):
    out = tmp_path / "eval"
    _eval(shared_tofu, out, "forget_split=forget01", "holdout_split=holdout01")
    summary = _load(out / "TOFU_SUMMARY.json")
    logs = _load(out / "TOFU_EVAL.json")
    assert len(logs["forget_Q_A_Prob"]["value_by_index"]) == 40
    # without a retain model's file, the scores that compare with it are null (with a note)
    needs_retain = {"forget_quality", "privacy_score", "overall_score"}
    assert all(v is not None and math.isfinite(v) for k, v in summary.items() if k not in needs_retain)
    assert summary["privacy_score"] is None and "retain_logs_path not given" in logs["privacy_score"]["note"]


def test_evaluation_during_unlearning_writes_checkpoint_evals(tofu_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli([
        "src/train.py", "--config-name=unlearn.yaml", "model=tiny-random-llama", "trainer=GradDiff",
        f"paths.tofu={tofu_dir}", "eval=tofu", "trainer.args.eval_strategy=steps", "trainer.args.eval_steps=2",
        "trainer.args.max_steps=2", "trainer.args.per_device_train_batch_size=2",
        "trainer.args.gradient_accumulation_steps=1", "trainer.args.disable_tqdm=true", "data.eval=null",
        *SHORT_GENERATION, f"paths.output_dir={out}"])
    assert result.returncode == 0, result.stderr[-4000:]
    summary = _load(out / "checkpoint-2" / "evals" / "TOFU_SUMMARY.json")
    assert math.isfinite(summary["forget_Q_A_Prob"])
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # once: the callbacks are told of the evaluation, so the epoch end does not evaluate step 2 again
    assert [e["step"] for e in log if "eval_tofu_model_utility" in e] == [2]


def test_misspelt_metric_option_is_an_error():
    from evals.base import Evaluator

    cfg = {"metrics": {"forget_truth_ratio": {"handler": "truth_ratio", "agregator": "true_better", "pre_compute": {}}}}
    with pytest.raises(ValueError, match=r"\['agregator'\] not understood by handler truth_ratio.*aggregator"):
        Evaluator(cfg)
    with pytest.raises(ValueError, match="unknown|valid"):
        Evaluator({"metrics": {"x": {"handler": "no_such_metric"}}})


def test_batch_size_auto_only_for_generation_metrics():
    from evals.base import Evaluator

    data = {"main": "TOFU_QA_FORGET10"}
    Evaluator({"metrics": {"rouge": {"handler": "rouge", "batch_size": "auto", "datasets": data}}})
    with pytest.raises(ValueError, match=r"metric prob: batch_size='auto'.*'auto' is for generation metrics only"):
        Evaluator({"metrics": {"prob": {"handler": "probability", "batch_size": "auto", "datasets": data}}})
    with pytest.raises(ValueError, match=r"metric rouge: batch_size=0; give a positive number of rows or 'auto'"):
        Evaluator({"metrics": {"rouge": {"handler": "rouge", "batch_size": 0, "datasets": data}}})


@pytest.mark.parametrize("bench", ["tofu", "tofu_full"])
def test_every_benchmark_config_builds_its_evaluator(bench, repo):
    from hydra import compose, initialize_config_dir

    from evals import get_evaluators

    with initialize_config_dir(config_dir=str(repo / "configs"), version_base=None):
        cfg = compose(config_name="eval.yaml", overrides=[f"eval={bench}", "paths.tofu=/data",
                                                          "+eval/tofu_metrics@eval.tofu.metrics.mia_reference=mia_reference"])
    evaluator = get_evaluators(cfg.eval, paths=cfg.paths)["tofu"]  # validates handlers and options of every metric
    assert "mia_reference" in evaluator.metrics_cfg and "model_utility" in evaluator.metrics_cfg


def test_model_fingerprint_of_random_init_and_folder_models(repo, tmp_path):
    """A random-init recipe of a full architecture is longer than a file name may be: it is its own
    fingerprint (``Path.is_dir`` would raise ENAMETOOLONG); a folder adds its weight files."""
    from omegaconf import OmegaConf

    from eval import model_identity
    from evals.result import model_fingerprint

    identity = model_identity(OmegaConf.load(repo / "configs" / "model" / "Llama-3.2-1B-arch.yaml"))
    assert identity.startswith("random_init:") and len(identity) > 255
    assert model_fingerprint(identity) == identity
    (tmp_path / "model.safetensors").write_bytes(b"12345")
    assert model_fingerprint(str(tmp_path)).startswith(f"{tmp_path}|model.safetensors:5:")


@pytest.mark.slow  # ~20 s: fine-tunes a model first (make test-slow)
def test_privleak_is_negative_for_a_model_trained_on_the_forget_rows(tofu_dir, tmp_path, monkeypatch):
    """The sign convention, end to end: a model fine-tuned on the forget rows recognises them (Min-K% AUC
    > 0.5: holdout rows look less familiar) and, against a retain model that never saw them, scores
    privleak < 0 (MUSE: under-unlearned models are negative, target models near -100)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import MODEL_CACHE, REPO, train_in_process
    from evals.base import Evaluator
    from model import get_model

    monkeypatch.chdir(REPO)
    recipe = ["model=tiny-random-llama", f"paths.tofu={tofu_dir}", "trainer.args.max_steps=40",
              "trainer.args.learning_rate=3e-3", "trainer.args.warmup_steps=0", "trainer.args.logging_steps=40",
              "trainer.args.per_device_train_batch_size=8", "trainer.args.gradient_accumulation_steps=1",
              "trainer.args.disable_tqdm=true"]
    target, retain = tmp_path / "target", tmp_path / "retain"
    train_in_process(target, [*recipe, "data.train=TOFU_QA_FORGET10"], config_name="train.yaml")
    train_in_process(retain, [*recipe, "data.train=TOFU_QA_RETAIN90"], config_name="train.yaml")

    def evaluate(folder, retain_logs):
        with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
            cfg = compose(config_name="eval.yaml", overrides=[
                "model=tiny-random-llama", f"model.model_args.pretrained_model_name_or_path={folder}",
                f"paths.tofu={tofu_dir}", f"paths.model_cache_dir={MODEL_CACHE}", f"retain_logs_path={retain_logs}"])
        bench = OmegaConf.to_container(cfg.eval.tofu, resolve=True)
        bench["metrics"] = {k: bench["metrics"][k] for k in ("mia_min_k", "privleak")}
        model, tok = get_model(cfg.model)
        out = tmp_path / "eval" / folder.name
        Evaluator(bench, tokenizer=tok, template_args=cfg.model.template_args, paths=cfg.paths).evaluate(model, output_dir=out)
        return _load(out / "TOFU_EVAL.json")

    retain_logs = evaluate(retain, "null")
    target_logs = evaluate(target, tmp_path / "eval" / "retain" / "TOFU_EVAL.json")
    assert target_logs["mia_min_k"]["agg_value"] > 0.75  # forget rows memorised: told apart from holdout rows
    assert target_logs["privleak"]["ref_auc"] == retain_logs["mia_min_k"]["agg_value"]
    assert target_logs["privleak"]["agg_value"] < -20, target_logs["privleak"]


def test_code_version_runs_git_once_per_process(monkeypatch):
    """Every metric fingerprint reads the code version: git runs twice (commit, status) per process, not
    twice per metric per evaluation."""
    import subprocess

    from evals import base, result

    calls = []
    real_run = subprocess.run

    def counting_run(*args, **kwargs):
        calls.append(args[0])
        return real_run(*args, **kwargs)

    monkeypatch.setattr(result.subprocess, "run", counting_run)
    result.code_version.cache_clear()
    from data import compose_dataset

    dataset = _container(compose_dataset("TOFU_QA_FORGET10", {"paths": {"tofu": None}, "seed": 0}))
    evaluator = base.Evaluator({"metrics": {name: {"handler": "rouge", "datasets": {"main": dataset}}
                                            for name in ("a", "b", "c")}})
    for _ in range(3):  # three evaluations of three metrics
        for name in ("a", "b", "c"):
            evaluator.fingerprint(name, "model", "fast")
    assert len(calls) == 2, calls
    assert result.code_version() == result.code_version()
    result.code_version.cache_clear()


def test_vocabulary_moments_only_for_the_datasets_min_k_plus_plus_reads(tofu_dir, tmp_path, monkeypatch):
    """Speed knob: the Min-K%++ mean/std over the vocabulary are computed only where a metric declaring
    ``vocab_moments`` reads them; every value equals that of a run computing them everywhere."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import MODEL_CACHE, REPO
    from evals import passes
    from evals.base import Evaluator
    from model import get_model

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="eval.yaml", overrides=[
            "model=tiny-random-llama", f"paths.tofu={tofu_dir}", f"paths.model_cache_dir={MODEL_CACHE}"])
    bench = OmegaConf.to_container(cfg.eval.tofu, resolve=True)
    metrics = bench["metrics"]
    bench["metrics"] = {"mia_min_k_plus_plus": metrics["mia_min_k_plus_plus"],
                        "retain_Q_A_Prob": metrics["model_utility"]["pre_compute"]["retain_Q_A_Prob"]}
    model, tok = get_model(cfg.model)
    real = passes.token_stats_passes

    def run(out, force_moments):
        calls = []

        def spy(model, datasets, tokenizer, batch_size=32, vocab_moments=True, **kwargs):
            result = real(model, datasets, tokenizer, batch_size=batch_size,
                          vocab_moments=vocab_moments or force_moments, **kwargs)
            calls.append((len(datasets[0]), vocab_moments or force_moments,
                          all(s.mean_logp is None for r in result for v in r.values() for s in v)))
            return result

        monkeypatch.setattr(passes, "token_stats_passes", spy)
        Evaluator(bench, tokenizer=tok, template_args=cfg.model.template_args, paths=cfg.paths).evaluate(model, output_dir=out)
        return calls, _load(out / "TOFU_EVAL.json")

    calls, logs = run(tmp_path / "skip", False)
    retain_rows = len(logs["retain_Q_A_Prob"]["value_by_index"])
    # forget and holdout with the moments (Min-K%++ reads them); the retain answers without
    assert sorted(calls) == sorted([(8, True, False), (8, True, False), (retain_rows, False, True)]), calls
    forced_calls, forced = run(tmp_path / "all", True)
    assert all(moments for _, moments, _ in forced_calls)
    for name in bench["metrics"]:
        assert logs[name] == forced[name], name


# ----- the output folder --------------------------------------------------------------------------
ONE_METRIC = ["eval/tofu_metrics@eval.tofu.tofu_metrics=[forget_Q_A_Prob]", "eval.tofu.limit=2"]


def test_evaluation_output_follows_the_run_folder_rules(tofu_dir, tmp_path, monkeypatch):
    """A finished training run and a user's folder are never touched; a failed evaluation leaves nothing; a
    finished evaluation is replaced in one step and its results carried over; an attack that fails publishes
    the clean results first."""
    import attacks
    import eval as eval_script
    from run_folder import COMPLETION_MARKER, OutputFolderError

    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "config.yaml").write_text("mode: unlearn\n")
    (trained / "model.safetensors").write_text("weights")
    (trained / COMPLETION_MARKER).write_text('{"mode": "unlearn"}')
    users = tmp_path / "mine"
    users.mkdir()
    (users / "config.yaml").write_text("my own\n")
    for folder, what in ((trained, "a finished training run"), (users, "not a finished run")):
        before = sorted((p.name, p.read_text()) for p in folder.iterdir())
        with pytest.raises(OutputFolderError, match=what):
            _eval_in_process(tofu_dir, folder, *ONE_METRIC, generation=[])
        assert sorted((p.name, p.read_text()) for p in folder.iterdir()) == before

    out = tmp_path / "eval"
    monkeypatch.setattr(eval_script, "format_summary", lambda *a: 1 / 0)  # fails after the results are computed
    with pytest.raises(ZeroDivisionError):
        _eval_in_process(tofu_dir, out, *ONE_METRIC, generation=[])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("eval")]  # nothing half-written
    monkeypatch.undo()

    _eval_in_process(tofu_dir, out, *ONE_METRIC, generation=[])
    assert json.loads((out / COMPLETION_MARKER).read_text())["mode"] == "eval"
    first = _load(out / "TOFU_EVAL.json")["forget_Q_A_Prob"]
    # evaluated again with another metric: the first one's results are carried over (and reused)
    _eval_in_process(tofu_dir, out, "eval/tofu_metrics@eval.tofu.tofu_metrics=[forget_Q_A_Prob,extraction_strength]",
                     "eval.tofu.limit=2", generation=[])
    again = _load(out / "TOFU_EVAL.json")
    assert again["forget_Q_A_Prob"] == first and "extraction_strength" in again

    def failing_attack(*args, **kwargs):
        raise RuntimeError("attack broke")

    monkeypatch.setattr(eval_script, "run_attacks", failing_attack)
    attacked = tmp_path / "attacked"
    with pytest.raises(RuntimeError, match="attack broke"):
        _eval_in_process(tofu_dir, attacked, *ONE_METRIC, "attack=quantize", generation=[])
    assert "forget_Q_A_Prob" in _load(attacked / "TOFU_EVAL.json")  # the clean result is kept
    assert "attack broke" in json.loads((attacked / COMPLETION_MARKER).read_text())["attack_failed"]
    assert attacks  # (the module whose entry point was replaced)


def test_a_full_disk_loses_no_result_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    """ENOSPC while writing the EVAL file: the error names a complete copy of the result elsewhere, and the
    folder holds no half-written or temporary file."""
    import errno
    import os

    import run_folder
    from evals.result import EvalResult

    result = EvalResult("TOFU", {"forget_Q_A_Prob": {"agg_value": 0.25, "value_by_index": {"0": {"prob": 0.25}}}},
                        {"forget_Q_A_Prob": 0.25}, {"evaluator": "TOFU"})
    folder = tmp_path / "out"
    folder.mkdir()
    real_fsync = os.fsync

    def full_disk(fd):
        if str(folder) in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(run_folder.os, "fsync", full_disk)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "spare"))
    (tmp_path / "spare").mkdir()
    with pytest.raises(OSError, match=r"No space left on device\); the whole result is kept in .*spare/TOFU_EVAL.rescued") as e:
        result.save(folder)
    assert e.value.errno == errno.ENOSPC
    assert list(folder.iterdir()) == []  # no .tmp left behind
    (rescued,) = (tmp_path / "spare").iterdir()
    assert json.loads(rescued.read_text())["forget_Q_A_Prob"]["agg_value"] == 0.25
