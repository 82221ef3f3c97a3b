"""eval=lm_eval: EleutherAI's lm-evaluation-harness on the in-memory model (WMDP, MMLU, local tasks).

A 4-question multiple-choice task in a JSON-lines file of our own, scored on tiny-random-llama; the
accuracy lm-eval reports is checked against one computed here from the model's own option
log-likelihoods (a plain forward pass). Offline: no task reads the Hub.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import MODEL_CACHE, REPO, run_cli, train_in_process

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason='the lm_eval extra is not installed: pip install -e ".[lm_eval]"')

QUESTIONS = [
    ("What is two plus two?", ["three", "four", "five", "six"]),
    ("Which city is the capital of France?", ["Paris", "Rome", "Madrid", "Berlin"]),
    ("What colour is a clear daytime sky?", ["green", "red", "blue", "black"]),
    ("Which planet is the largest?", ["Mars", "Venus", "Earth", "Jupiter"]),
]
LETTERS = ["A", "B", "C", "D"]
# WMDP's prompt (lm_eval/tasks/wmdp/_default_template_yaml), and wmdp_bio's description before it
TASK_YAML = """\
task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. {{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""
BIO_DESCRIPTION = "The following are multiple choice questions (with answers) about biology.\n\n"


def _prompt(question: str, choices: list[str]) -> str:
    return question.strip() + "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, choices)) + "\nAnswer:"


@torch.no_grad()
def _option_logliks(model, tokenizer, context: str) -> list[float]:
    """sum_t log p(option token t | context, earlier option tokens) of each option " A" ... " D"."""
    context_ids = tokenizer(context)["input_ids"]
    out = []
    for letter in LETTERS:
        ids = tokenizer(context + " " + letter)["input_ids"]
        assert ids[:len(context_ids)] == context_ids  # the option's tokens follow the context's
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        logp = torch.log_softmax(logits[len(context_ids) - 1:-1], dim=-1)
        out.append(float(logp.gather(1, torch.tensor(ids[len(context_ids):])[:, None]).sum()))
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


@pytest.fixture(scope="module")
def tiny():
    from omegaconf import OmegaConf

    from model import get_model

    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny-random-llama.yaml"))
    cfg["cache_dir"] = str(MODEL_CACHE)
    model, tokenizer = get_model(cfg)
    return SimpleNamespace(model=model.eval(), tokenizer=tokenizer, template_args=cfg["template_args"])


@pytest.fixture(scope="module")
def toy(tiny, tmp_path_factory):
    """The data file (the fields of the Hub's cais/wmdp: question, choices, answer), the task folder, and the
    option log-likelihoods by hand. The answers are chosen so that the model gets exactly 2 of 4 right."""
    folder = tmp_path_factory.mktemp("lm_eval_toy")
    logliks = [_option_logliks(tiny.model, tiny.tokenizer, _prompt(q, c)) for q, c in QUESTIONS]
    preds = [_argmax(ll) for ll in logliks]
    answers = [preds[0], preds[1], (preds[2] + 1) % 4, (preds[3] + 2) % 4]
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for (q, c), a in zip(QUESTIONS, answers)))
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / "toy_mc.yaml").write_text(TASK_YAML.format(data=data))
    return SimpleNamespace(data=data, tasks=tasks, logliks=logliks, answers=answers, acc=0.5)


def _evaluator(tiny, toy, **cfg):
    from evals import get_evaluators

    base = {"handler": "LMEvalEvaluator", "name": "LMEval", "tasks": ["toy_mc"], "include_path": str(toy.tasks),
            "batch_size": 4, "bootstrap_iters": 0}
    return get_evaluators({"lm_eval": {**base, **cfg}}, tokenizer=tiny.tokenizer,
                          template_args=tiny.template_args)["lm_eval"]


def _load(path: Path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def plain_run(tiny, toy, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval_plain")
    evaluator = _evaluator(tiny, toy)  # first: importing the project's modules draws random numbers
    tiny.model.train()  # as the trainer leaves it between steps: the evaluator must not change that
    torch.manual_seed(5)
    random.seed(5)
    expected_draws = (torch.rand(3), random.random())
    torch.manual_seed(5)
    random.seed(5)
    summary = evaluator.evaluate(tiny.model, output_dir=out, model_id="tiny").summary
    draws = (torch.rand(3), random.random())
    was_training = tiny.model.training
    tiny.model.eval()
    return SimpleNamespace(out=out, summary=summary, draws=draws, expected_draws=expected_draws,
                           was_training=was_training)


@needs_lm_eval
def test_accuracy_is_the_argmax_of_the_models_own_option_logliks(tiny, toy, plain_run):
    assert plain_run.summary == {"toy_mc_acc": toy.acc}
    logs = _load(plain_run.out / "LMEval_EVAL.json")
    assert _load(plain_run.out / "LMEval_SUMMARY.json") == plain_run.summary
    entry = logs["toy_mc_acc"]
    assert entry["agg_value"] == toy.acc and entry["metric"] == "acc"
    assert entry["metrics"]["acc"] == toy.acc and entry["metrics"]["acc_norm"] == toy.acc  # one-letter options
    assert entry["num_fewshot"] == 0 and entry["n_samples"] == {"original": 4, "effective": 4}
    by_hand = [float(_argmax(ll) == a) for ll, a in zip(toy.logliks, toy.answers)]
    assert sum(by_hand) / 4 == toy.acc
    for i, (ll, answer, correct) in enumerate(zip(toy.logliks, toy.answers, by_hand)):
        sample = entry["value_by_index"][str(i)]
        assert sample["target"] == answer and sample["acc"] == correct
        assert sample["loglikelihoods"] == pytest.approx(ll, abs=1e-4)
    meta = logs["_meta"]
    assert meta["model"] == "tiny" and meta["evaluator"] == "LMEval" and meta["lm_eval_version"] == "0.4.13"
    assert set(meta["fingerprints"]) == {"toy_mc_acc"} and meta["code_version"] and meta["timestamp"]
    # the model is in train mode again, and the global random generators are where they were
    assert plain_run.was_training
    assert torch.equal(plain_run.draws[0], plain_run.expected_draws[0])
    assert plain_run.draws[1] == plain_run.expected_draws[1]
    assert all(p.grad is None for p in tiny.model.parameters())


@needs_lm_eval
def test_second_evaluation_reuses_the_result(tiny, toy, plain_run, monkeypatch):
    import lm_eval

    real, calls = lm_eval.simple_evaluate, []

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    before = _load(plain_run.out / "LMEval_EVAL.json")
    assert _evaluator(tiny, toy).evaluate(tiny.model, output_dir=plain_run.out, model_id="tiny").summary == plain_run.summary
    assert calls == []
    after = _load(plain_run.out / "LMEval_EVAL.json")
    assert after["toy_mc_acc"] == before["toy_mc_acc"] and after["_meta"]["fingerprints"] == before["_meta"]["fingerprints"]
    # another model, another setting, or overwrite: computed again
    _evaluator(tiny, toy).evaluate(tiny.model, output_dir=plain_run.out, model_id="another")
    again = _evaluator(tiny, toy, limit=3)
    first = again.evaluate(tiny.model, output_dir=plain_run.out, model_id="another")
    second = again.evaluate(tiny.model, output_dir=plain_run.out, model_id="another", overwrite=True)
    assert len(calls) == 3
    # the evaluator builds each task once and hands the same object to lm-eval again: the same result
    assert calls[1]["tasks"][0] is calls[2]["tasks"][0]
    assert second.entries["toy_mc_acc"]["value_by_index"] == first.entries["toy_mc_acc"]["value_by_index"]
    assert second.meta["fingerprints"] == first.meta["fingerprints"]


@needs_lm_eval
def test_settings_reach_lm_eval(tiny, toy, plain_run, tmp_path, monkeypatch):
    import lm_eval

    real, calls = lm_eval.simple_evaluate, []

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", spy)
    evaluator = _evaluator(tiny, toy, tasks=[{"name": "toy_mc", "num_fewshot": 1, "metric": "acc_norm"}], limit=2,
                           batch_size=3, apply_chat_template=None, system_instruction="Answer with one letter.")
    summary = evaluator.evaluate(tiny.model, output_dir=tmp_path, model_id="tiny").summary
    assert list(summary) == ["toy_mc_acc_norm"] == evaluator.summary_names()
    (call,) = calls
    (task,) = call["tasks"]  # the task lm-eval built for the checks, its num_fewshot set by a generated YAML
    assert task.task_name == "toy_mc" and task.config.num_fewshot == 1
    assert call["num_fewshot"] == 1 and call["limit"] == 2
    assert call["batch_size"] == 3 and call["model"].batch_size_per_gpu == 3
    assert call["model"].model is tiny.model  # the in-memory model, not a copy
    # apply_chat_template: null follows the model config (tiny-random-llama: true); multi-turn shots with it
    assert call["apply_chat_template"] is True and call["fewshot_as_multiturn"] is True
    assert call["system_instruction"] == "Answer with one letter."
    entry = _load(tmp_path / "LMEval_EVAL.json")["toy_mc_acc_norm"]
    assert entry["num_fewshot"] == 1 and entry["n_samples"]["effective"] == 2 and set(entry["value_by_index"]) == {"0", "1"}
    plain = _load(plain_run.out / "LMEval_EVAL.json")["toy_mc_acc"]["value_by_index"]
    assert entry["value_by_index"]["0"]["prompt_hash"] != plain["0"]["prompt_hash"]  # chat template and one shot


@pytest.mark.slow  # ~25 s: lm-eval on local files (make test-slow)
@needs_lm_eval
def test_task_overrides_point_wmdp_bio_at_a_local_file(tiny, toy, tmp_path):
    """wmdp_bio with its own prompt (description, questions, options), read from a local file instead of the Hub."""
    local = {"wmdp_bio": {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(toy.data)}}}}
    evaluator = _evaluator(tiny, toy, tasks=["wmdp_bio"], include_path=None, task_overrides=local)
    summary = evaluator.evaluate(tiny.model, output_dir=tmp_path, model_id="tiny").summary
    logliks = [_option_logliks(tiny.model, tiny.tokenizer, BIO_DESCRIPTION + _prompt(q, c)) for q, c in QUESTIONS]
    assert summary["wmdp_bio_acc"] == sum(_argmax(ll) == a for ll, a in zip(logliks, toy.answers)) / 4
    entry = _load(tmp_path / "LMEval_EVAL.json")["wmdp_bio_acc"]
    for i, ll in enumerate(logliks):
        assert entry["value_by_index"][str(i)]["loglikelihoods"] == pytest.approx(ll, abs=1e-4)
    assert entry["config"]["dataset_kwargs"]["data_files"]["test"] == str(toy.data)
    assert entry["config"]["description"] == BIO_DESCRIPTION
    # a missing local file, an unknown task, a metric the task does not report: errors before any model pass
    for over, error in [({"task_overrides": {"wmdp_bio": {"dataset_path": "json", "dataset_kwargs": {
            "data_files": {"test": str(tmp_path / "nope.jsonl")}}}}}, r"wmdp_bio reads .*nope.jsonl, which does not exist"),
            ({"tasks": ["wmdp_bioo"]}, r"'wmdp_bioo' is no task of lm-eval.*close: wmdp_bio"),
            ({"task_overrides": local, "metric": "acc_norm"}, r"wmdp_bio reports acc, not metric=acc_norm")]:
        with pytest.raises((FileNotFoundError, ValueError), match=error):
            _evaluator(tiny, toy, **{"tasks": ["wmdp_bio"], **over}).check_inputs()
    # the Hub's data while the Hub is off: the error says how to point the task at a file
    try:
        _evaluator(tiny, toy, tasks=["wmdp_cyber"], limit=1).evaluate(tiny.model, output_dir=tmp_path / "hub")
    except RuntimeError as e:  # (no error where the datasets cache holds cais/wmdp)
        assert "reads the Hub dataset cais/wmdp (wmdp-cyber)" in str(e)
        assert "'+eval.lm_eval.task_overrides.wmdp_cyber={dataset_path: json" in str(e)


@pytest.mark.slow  # ~15 s: lm-eval groups (make test-slow)
@needs_lm_eval
def test_groups_tags_and_overrides_of_a_groups_tasks(tiny, toy, tmp_path):
    """A group of two copies of the toy task (through a tag); an override of one of them reaches it inside the
    group, and the tag keeps both; a tag, a group without aggregate_metric_list and a task whose data file is
    missing are refused."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    for name in ("toy_a", "toy_b"):
        (folder / f"{name}.yaml").write_text(f"include: {toy.tasks / 'toy_mc.yaml'}\ntask: {name}\ntag: toy_tag\n")
    (folder / "toy_group.yaml").write_text("group: toy_group\ntask: [toy_tag]\n"
                                           "aggregate_metric_list: [{metric: acc, weight_by_size: true}]\n")
    (folder / "toy_bare.yaml").write_text("group: toy_bare\ntask: [toy_a]\n")
    (folder / "toy_gone.yaml").write_text(TASK_YAML.replace("toy_mc", "toy_gone").format(data=tmp_path / "gone.jsonl"))
    evaluator = _evaluator(tiny, toy, include_path=str(folder), tasks=["toy_group", "toy_bare"],
                           task_overrides={"toy_b": {"description": "Quiz.\n\n"}})
    assert evaluator.directions()["toy_group_acc"] is True  # its tasks' direction
    with pytest.raises(ValueError, match="group toy_bare has no aggregate_metric_list"):
        evaluator.check_inputs(["toy_bare_acc"])
    result = evaluator.evaluate(tiny.model, output_dir=tmp_path / "out", model_id="tiny", only=["toy_group_acc"])
    entry = result.entries["toy_group_acc"]
    assert result.summary == {"toy_group_acc": toy.acc} and entry["agg_value"] == toy.acc
    assert set(entry["subtasks"]) == {"toy_a", "toy_b"}
    assert entry["subtasks"]["toy_b"]["config"]["description"] == "Quiz.\n\n"
    assert not entry["subtasks"]["toy_a"]["config"].get("description")
    with pytest.raises(ValueError, match=r"toy_tag is a tag of lm-eval .* list its tasks instead: toy_a, toy_b"):
        _evaluator(tiny, toy, include_path=str(folder), tasks=["toy_tag"]).check_inputs()
    # a task of include_path whose data file is missing: lm-eval's failure to load it, told as such
    with pytest.raises(FileNotFoundError, match=r"task toy_gone reads .*gone.jsonl, which does not exist"):
        _evaluator(tiny, toy, include_path=str(folder), tasks=["toy_gone"]).check_inputs()


def test_only_the_public_lm_eval_api_is_used():
    """No name of lm-eval's that starts with an underscore: no private module, attribute or import."""
    import ast

    tree = ast.parse((REPO / "src" / "evals" / "lm_eval.py").read_text())
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lm_eval"):
            private += [p for p in [*node.module.split("."), *(a.name for a in node.names)] if p.startswith("_")]
        elif isinstance(node, ast.Import):
            private += [p for a in node.names if a.name.startswith("lm_eval") for p in a.name.split(".")
                        if p.startswith("_")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            own = isinstance(base, ast.Name) and base.id in ("self", "cls")
            if not own:  # attributes of anything but this evaluator (lm-eval's objects)
                private.append(ast.unparse(node))
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            private += [a.value for a in node.args[1:2] if isinstance(a, ast.Constant) and str(a.value).startswith("_")
                        and not str(a.value).startswith("__")]
    assert private == []


@needs_lm_eval
def test_during_training_on_every_evaluation(tofu_dir, toy, tmp_path):
    """Unlearning with eval=lm_eval: each evaluation writes its files and logs the accuracy."""
    steps = train_in_process(tmp_path / "run", [
        "model=tiny-random-llama", "trainer=GradDiff", f"paths.tofu={tofu_dir}", "data.eval=null", "eval=lm_eval",
        f"eval.lm_eval.include_path={toy.tasks}", "eval.lm_eval.tasks=[toy_mc]", "eval.lm_eval.bootstrap_iters=0",
        "trainer.args.eval_strategy=steps", "trainer.args.eval_steps=1", "trainer.args.max_steps=2",
        "trainer.args.per_device_train_batch_size=2", "trainer.args.gradient_accumulation_steps=1",
        "trainer.args.logging_steps=1", "trainer.args.disable_tqdm=true"])
    assert [s["step"] for s in steps] == [1, 2]
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "eval_lm_eval_toy_mc_acc" in e] == [1, 2]
    for step in (1, 2):
        logs = _load(tmp_path / "run" / f"checkpoint-{step}" / "evals" / "LMEval_EVAL.json")
        assert logs["_meta"]["model"].endswith(f"@step{step}")


@pytest.mark.slow  # ~12 s: src/eval.py eval=lm_eval through the command line (make test-slow)
@needs_lm_eval
def test_command_line(toy, tmp_path):
    out = tmp_path / "eval"
    result = run_cli(["src/eval.py", "--config-name=eval.yaml", "eval=lm_eval", "model=tiny-random-llama",
                      f"eval.lm_eval.include_path={toy.tasks}", "eval.lm_eval.tasks=[toy_mc]",
                      "eval.lm_eval.batch_size=2", f"paths.output_dir={out}"])
    assert result.returncode == 0, result.stderr[-4000:]
    assert _load(out / "LMEval_SUMMARY.json") == {"toy_mc_acc": toy.acc}  # the same seeded random model
    assert "toy_mc_acc" in result.stdout  # the printed table
    assert set(_load(out / "LMEval_EVAL.json")) == {"toy_mc_acc", "_meta"}


@needs_lm_eval
def test_shipped_config_builds():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from evals import get_evaluators

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="eval.yaml", overrides=["eval=lm_eval", "model=tiny-random-llama"])
    resolved = OmegaConf.to_container(cfg.eval.lm_eval, resolve=True)
    assert resolved["tasks"] == ["wmdp_bio", "wmdp_cyber", "mmlu"] and resolved["name"] == "LMEval"
    evaluator = get_evaluators(cfg.eval, template_args=cfg.model.template_args)["lm_eval"]
    assert evaluator.summary_names() == ["wmdp_bio_acc", "wmdp_cyber_acc", "mmlu_acc"]
    assert evaluator.apply_chat_template is False and evaluator.fewshot_as_multiturn is False


def test_error_without_lm_eval(monkeypatch):
    from hydra import compose, initialize_config_dir

    from evals import get_evaluators

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name="eval.yaml", overrides=["eval=lm_eval", "model=tiny-random-llama"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails as if it were not installed
    with pytest.raises(ImportError, match=r'not installed: pip install -e "\.\[lm_eval\]" \(or pip install lm-eval==0\.4\.13\)'):
        get_evaluators(cfg.eval, template_args=cfg.model.template_args)


@needs_lm_eval
@pytest.mark.parametrize("bad, error", [
    ({"tasks": []}, "no tasks configured"),
    ({"tasks": ["a", "a"]}, "listed twice"),
    ({"tasks": [{"name": "a", "shots": 1}]}, r"unknown key\(s\) \['shots'\]"),
    ({"limit": 0}, "limit=0"),
    ({"num_fewshot": -1}, "num_fewshot=-1"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"apply_chat_template": False, "fewshot_as_multiturn": True}, "needs a chat template"),
    ({"lm_args": {"pretrained": "x"}}, "lm_args may not set"),
    ({"task_overrides": {"a": {"task": "b"}}}, "may not set task"),
    ({"batchsize": 4}, r"unknown key\(s\) \['batchsize'\]"),
])
def test_bad_settings_are_errors(bad, error):
    from evals.lm_eval import LMEvalEvaluator

    with pytest.raises(ValueError, match=error):
        LMEvalEvaluator({"handler": "LMEvalEvaluator", "tasks": ["a"], **bad})


@needs_lm_eval
def test_sharded_training_is_refused(tiny, toy, monkeypatch):
    from evals import lm_eval

    monkeypatch.setattr(lm_eval, "is_sharded", lambda model: model is tiny.model)
    with pytest.raises(ValueError, match="FSDP"):
        _evaluator(tiny, toy).evaluate(tiny.model, output_dir="unused")
