"""Inputs that make no sense are refused before any work, with one line naming the key (or the file,
line and field) and what is valid: method hyperparameters, trainer.args, the config/trainer pairing,
metric names, local data files and the retain model's EVAL file (docs/configs.md, "What is checked
before a run starts")."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO, StubLM
from data.unlearn import ForgetRetainDataset
from trainer import build_training_args, check_mode, evaluates, load_trainer

NAN, INF = float("nan"), float("inf")


class _Decoder(torch.nn.Module):
    """Two decoder layers at model.layers (what RMU's layer checks look for); never run here."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=2)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])


def make(handler, tmp_path, retain=True, args=None, model=None, **method_args):
    dataset = ForgetRetainDataset([0, 1], [0, 1] if retain else None)
    cfg = {"handler": handler, "method_args": method_args,
           "args": {"per_device_train_batch_size": 2, "report_to": "none", **(args or {})}}
    return load_trainer(cfg, model or StubLM(), train_dataset=dataset, output_dir=str(tmp_path / "out"))


# ----- method hyperparameters ---------------------------------------------------------------------
BAD_METHOD_ARGS = [
    # weights of the forget / retain terms (every method with set_loss_weights)
    ("GradDiff", "gamma", NAN), ("GradDiff", "gamma", -1.0), ("GradDiff", "alpha", "high"), ("GradDiff", "alpha", INF),
    ("GradDiff", "retain_loss_type", "MSE"), ("GradDiff", "retain_loss_type", None),
    ("IdkNLL", "alpha", -0.5), ("CEU", "gamma", "1"),
    ("PDU", "gamma", NAN), ("PDU", "retain_loss_type", "MSE"),
    # inverse temperatures > 0
    ("NPO", "beta", 0.0), ("NPO", "beta", "high"), ("NPO", "beta", NAN), ("NPO", "beta", -INF),
    ("SimNPO", "beta", 0), ("SimNPO", "delta", INF), ("SimNPO", "delta", "x"),
    ("DPO", "beta", -1.0), ("DPO", "beta", True), ("AltPO", "beta", 0),
    # exponents >= 0
    ("UNDIAL", "beta", -1.0), ("UNDIAL", "beta", "10"), ("WGA", "beta", INF), ("WGA", "beta", -0.1),
    ("SatImp", "beta1", NAN), ("SatImp", "beta2", -1.0),
    # counts and the rest
    ("CEU", "ignore_first_n_answer_tokens", -1), ("CEU", "ignore_first_n_answer_tokens", 1.5),
    ("TaskVector", "scale", 0.0), ("TaskVector", "scale", "1"),
    ("RMU", "steering_coeff", 0.0), ("RMU", "steering_coeff", 1e30), ("RMU", "alpha", NAN), ("RMU", "seed", -1), ("RMU", "seed", 1.5),
    ("RMU", "layer_id", "1"), ("RMU", "layer_id", -1), ("RMU", "token_mask", "prompt"),
    ("RMU", "trainable_params", 5), ("RMU", "trainable_params", "model\\.layers\\.(0"),
]


@pytest.mark.parametrize("handler, key, value", BAD_METHOD_ARGS,
                         ids=[f"{h}-{k}-{v!r}" for h, k, v in BAD_METHOD_ARGS])
def test_bad_method_hyperparameter_is_a_value_error_naming_the_key(tmp_path, handler, key, value):
    extra = {"retain_loss_eps": 0.1} if handler == "PDU" else {}
    model = _Decoder() if handler == "RMU" else None
    extra.update({"layer_id": 1} if handler == "RMU" and key != "layer_id" else {})
    with pytest.raises(ValueError) as err:
        make(handler, tmp_path, retain=handler != "TaskVector", model=model, **extra, **{key: value})
    message = str(err.value)
    assert f"trainer.method_args.{key}=" in message and "\n" not in message, message
    assert ("must be" in message or "valid:" in message or "not a regular expression" in message), message
    assert message.startswith(f"{handler}: "), message


BAD_TRAINER_OPTIONS = [
    ("GradDiff", "joint_forward", "false"),  # a string would read as true
    ("NPO", "precompute_ref_log_probs", "no"), ("TaskVector", "nll_impl", 5), ("GradDiff", "pack_rows", "yes"),
]


@pytest.mark.parametrize("handler, key, value", BAD_TRAINER_OPTIONS,
                         ids=[f"{h}-{k}-{v!r}" for h, k, v in BAD_TRAINER_OPTIONS])
def test_bad_trainer_option_is_a_value_error_naming_the_key(tmp_path, handler, key, value):
    """The implementation options are typed trainer arguments (trainer.arguments): checked by key."""
    with pytest.raises(ValueError) as err:
        make(handler, tmp_path, retain=handler != "TaskVector", args={key: value})
    message = str(err.value)
    assert f"trainer.args.{key}=" in message and "\n" not in message, message
    assert "must be" in message or "valid:" in message, message


def test_number_check_describes_the_valid_range():
    from checks import check_number

    with pytest.raises(ValueError, match=r"^M: k='high' is a str; must be a finite number > 0$"):
        check_number("k", "high", low=0, low_open=True, owner="M")
    with pytest.raises(ValueError, match=r"^p=1\.5; must be a finite number in \[0, 1\]$"):
        check_number("p", 1.5, low=0, high=1)
    with pytest.raises(ValueError, match=r"^n=True is a bool; must be an integer >= 1$"):
        check_number("n", True, integer=True, low=1)
    assert check_number("p", 1, low=0, high=1) == 1.0 and check_number("n", 3, integer=True, low=1) == 3


def test_pdu_hyperparameters_use_the_shared_checks(tmp_path):
    """PDU's own numbers (in pdu.py) refuse wrong types and NaN by key, like every other method."""
    for key, value in (("dual_step_size", "x"), ("dual_init", NAN), ("retain_loss_eps", INF),
                       ("dual_warmup_epochs", "1")):
        with pytest.raises(ValueError, match=rf"PDU: trainer\.method_args\.{key}=.*must be"):
            make("PDU", tmp_path, **{"retain_loss_eps": 0.1, key: value})


def test_good_hyperparameters_at_their_bounds_are_accepted(tmp_path):
    make("GradDiff", tmp_path, gamma=0, alpha=0)
    make("WGA", tmp_path, beta=0)
    make("UNDIAL", tmp_path, beta=0.0)
    make("CEU", tmp_path, ignore_first_n_answer_tokens=0)
    make("SimNPO", tmp_path, delta=-2.0)


# ----- trainer.args -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    ({"max_steps": 0}, r"trainer.args.max_steps=0; must be > 0 .*or -1 to train for trainer.args.num_train_epochs"),
    ({"max_steps": -5}, r"trainer.args.max_steps=-5; must be an integer >= -1"),
    ({"max_steps": 2.5}, r"trainer.args.max_steps=2.5 is a float"),
    ({"gradient_accumulation_steps": 0}, r"trainer.args.gradient_accumulation_steps=0; must be an integer >= 1"),
    ({"gradient_accumulation_steps": -2}, r"trainer.args.gradient_accumulation_steps=-2"),
    ({"seed": "abc"}, r"trainer.args.seed='abc' is a str; must be an integer >= 0"),
    ({"seed": True}, r"trainer.args.seed=True is a bool"),
    ({"seed": 1.5}, r"trainer.args.seed=1.5 is a float"),
    ({"learning_rate": NAN}, r"trainer.args.learning_rate=nan; must be a finite number >= 0"),
    ({"per_device_train_batch_size": 0}, r"trainer.args.per_device_train_batch_size=0"),
    ({"num_train_epochs": 0}, r"trainer.args.num_train_epochs=0; must be a finite number > 0 \(or set trainer.args.max_steps > 0\)"),
    ({"deepspeed": "no/such/zero3.json"}, r"trainer.args.deepspeed=.no/such/zero3.json. is not a file: give a DeepSpeed JSON"),
    ({"load_best_model_at_end": True, "eval_strategy": "no"},
     r"trainer.args.load_best_model_at_end=true, but the run never evaluates"),
])
def test_bad_training_args_are_refused_by_name(tmp_path, args, message):
    with pytest.raises(ValueError, match=message):
        build_training_args(args, str(tmp_path))


def test_shipped_training_args_pass_and_max_steps_overrides_epochs(tmp_path):
    args = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "trainer" / "finetune.yaml"))["args"]
    args["seed"] = 0
    assert build_training_args(args, str(tmp_path)).max_steps == -1
    assert build_training_args({"max_steps": 3, "num_train_epochs": 0}, str(tmp_path)).max_steps == 3


def test_evaluates_only_with_an_eval_strategy_or_eval_on_start():
    assert not evaluates({"eval_strategy": "no"}) and not evaluates(None) and not evaluates({})
    assert evaluates({"eval_strategy": "steps"}) and evaluates({"eval_strategy": "no", "eval_on_start": True})


# ----- top-level config and trainer -----------------------------------------------------------------
def _compose(config_name, overrides=()):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


def test_mode_and_trainer_must_match():
    check_mode(_compose("train.yaml"))
    check_mode(_compose("unlearn.yaml", ["trainer=NPO"]))
    with pytest.raises(ValueError, match=r"trainer=GradDiff is an unlearning method.*use --config-name=unlearn.yaml"):
        check_mode(_compose("train.yaml", ["trainer=GradDiff"]))
    with pytest.raises(ValueError, match=r"FinetuneTrainer fine-tunes .*--config-name=train.yaml.*GradAscent"):
        check_mode(_compose("unlearn.yaml", ["trainer=finetune"]))
    with pytest.raises(ValueError, match=r"mode='eval'.*src/eval.py"):
        check_mode(OmegaConf.create({"mode": "eval"}))


@pytest.mark.parametrize("seed", ["abc", True, 1.5, -1])
def test_top_level_seed_must_be_an_integer(seed):
    cfg = _compose("unlearn.yaml")
    cfg.seed = seed
    with pytest.raises(ValueError, match=r"^seed=.*must be an integer >= 0"):
        check_mode(cfg)


# ----- metric names -------------------------------------------------------------------------------
def _Bench():
    from conftest import stub_benchmark

    return stub_benchmark({"forget_quality": 0.5, "model_utility": 0.4})


def _with_best_metric(tmp_path, name, eval_dataset=None, evaluators=None):
    cfg = {"handler": "GradAscent", "args": {"report_to": "none", "eval_strategy": "steps", "eval_steps": 1,
                                             "metric_for_best_model": name}}
    return load_trainer(cfg, StubLM(), train_dataset=ForgetRetainDataset([0, 1]), eval_dataset=eval_dataset,
                        output_dir=str(tmp_path / "out"), evaluators=evaluators)


def test_metric_for_best_model_must_be_produced(tmp_path):
    benches = {"tofu": _Bench()}
    _with_best_metric(tmp_path, "tofu_forget_quality", evaluators=benches)
    _with_best_metric(tmp_path, "eval_tofu_model_utility", evaluators=benches)
    _with_best_metric(tmp_path, "loss", eval_dataset=[0, 1])
    with pytest.raises(ValueError, match=r"metric_for_best_model='tofu_forget_qualty'.*'eval_tofu_forget_qualty'; "
                                         r"valid: eval_tofu_forget_quality, eval_tofu_model_utility \(eval_loss needs"):
        _with_best_metric(tmp_path, "tofu_forget_qualty", evaluators=benches)
    with pytest.raises(ValueError, match=r"'eval_loss'; valid: none \(eval_loss needs data.eval.*eval=tofu\)"):
        _with_best_metric(tmp_path, "eval_loss")


def test_summary_metric_must_be_a_metric():
    from evals.base import Evaluator

    metrics = {"forget_Q_A_ROUGE": {"handler": "rouge", "datasets": {"main": "TOFU_QA_FORGET10"}}}
    Evaluator({"metrics": metrics, "summary_metrics": ["forget_Q_A_ROUGE"]})
    with pytest.raises(ValueError, match=r"summary_metrics \['forget_Q_A_ROGUE'\] are not metrics .*valid: forget_Q_A_ROUGE"):
        Evaluator({"metrics": metrics, "summary_metrics": ["forget_Q_A_ROGUE"]})
    with pytest.raises(ValueError, match=r"summary_metrics='forget_Q_A_ROUGE'; must be a list"):
        Evaluator({"metrics": metrics, "summary_metrics": "forget_Q_A_ROUGE"})


# ----- data files -----------------------------------------------------------------------------------
def _root(folder):
    return OmegaConf.create({"paths": {"tofu": str(folder)}, "seed": 0})


def _build(tokenizer, folder, name="TOFU_QA_FORGET01"):
    from data import build_dataset, compose_dataset

    return build_dataset(compose_dataset(name, _root(folder)), tokenizer)


ROW = '{"question": "Who wrote it?", "answer": "Ann."}\n'


@pytest.mark.parametrize("content, message", [
    (b"", r"forget01.json: empty file \(no rows"),
    (b"\n  \n", r"forget01.json: empty file"),
    ((ROW + '{"question": "Q?"}\n').encode(), r"forget01.json, line 2: no 'answer' field \(answer_key='answer'\); "
                                              r"the row has: question"),
    ((ROW * 2 + '{"question": "Q?", "answer": "A."\n').encode(), r"forget01.json, line 3: not valid JSON"),
    (ROW.encode() + b'{"question": "Q\xe9?", "answer": "A."}\n', r"forget01.json, line 2: not UTF-8 text \(byte 0xe9"),
    ((ROW + '{"question": "Q?", "answer": null}\n').encode(), r"line 2: field 'answer' is null; must be a string or"),
    ((ROW + '{"question": ["Q?"], "answer": "A."}\n').encode(), r"line 2: field 'question' is \[\"Q\?\"\]; must be a string"),
    ((ROW + '{"question": "Q?", "answer": ["A.", "B."]}\n').encode(), r"line 2: field 'answer' is a list but a str in .*line 1"),
    ((ROW + '["Q?", "A."]\n').encode(), r"line 2: a JSON object expected, got a list"),
])
def test_bad_data_file_names_file_line_and_field(smollm2_tokenizer, tmp_path, content, message):
    from data.utils import DataFileError

    (tmp_path / "forget01.json").write_bytes(content)
    with pytest.raises(DataFileError, match=message) as err:
        _build(smollm2_tokenizer, tmp_path)
    assert "\n" not in str(err.value) and str(err.value).startswith("TOFU_QA_FORGET01: ")


def test_file_that_datasets_cannot_read_is_one_line(smollm2_tokenizer, tmp_path, monkeypatch):
    """A file our line check accepts but ``datasets`` refuses gives one line too, not its traceback."""
    import datasets

    from data.utils import DataFileError

    def refuse(*args, **kwargs):
        raise datasets.exceptions.DatasetGenerationError("An error occurred while generating the dataset\nmore")

    (tmp_path / "forget01.json").write_text(ROW)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(DataFileError, match=r"forget01.json: could not be loaded as JSON lines "
                                            r"\(DatasetGenerationError: An error occurred") as err:
        _build(smollm2_tokenizer, tmp_path)
    assert "\n" not in str(err.value)


def test_json_array_file_is_checked_by_item(smollm2_tokenizer, tmp_path):
    from data.utils import DataFileError

    (tmp_path / "forget01.json").write_text(json.dumps([{"question": "Q?", "answer": "A."}, {"question": "Q?"}]))
    with pytest.raises(DataFileError, match=r"forget01.json, item 2: no 'answer' field"):
        _build(smollm2_tokenizer, tmp_path)


def test_bad_refusal_file_names_file_and_line(smollm2_tokenizer, tmp_path):
    from data.utils import DataFileError

    (tmp_path / "forget01.json").write_text(ROW * 2)
    (tmp_path / "idontknow.jsonl").write_text("\n\n")
    with pytest.raises(DataFileError, match=r"idontknow.jsonl: empty file"):
        _build(smollm2_tokenizer, tmp_path, "TOFU_QA_FORGET01_IDK")
    (tmp_path / "idontknow.jsonl").write_bytes(b"I don't know.\nNo idea \xff.\n")
    with pytest.raises(DataFileError, match=r"idontknow.jsonl, line 2: not UTF-8 text \(byte 0xff at column 9\)"):
        _build(smollm2_tokenizer, tmp_path, "TOFU_QA_FORGET01_IDK")


def test_bad_max_length_is_refused(smollm2_tokenizer, tmp_path):
    from data import build_dataset, compose_dataset

    (tmp_path / "forget01.json").write_text(ROW)
    with pytest.raises(ValueError, match=r"TOFU_QA_FORGET01: max_length='long' is a str; must be an integer >= 1"):
        build_dataset(compose_dataset("TOFU_QA_FORGET01", _root(tmp_path)), smollm2_tokenizer,
                      dataset_args={"max_length": "long"})


def test_eval_dataset_not_loaded_when_the_run_does_not_evaluate(smollm2_tokenizer, tmp_path):
    from data import get_data
    from resolvers import compose_names

    (tmp_path / "forget01.json").write_text(ROW * 2)
    run_cfg = OmegaConf.merge(_root(tmp_path), {"data": {"forget": "TOFU_QA_FORGET01", "retain": None,
                                                         "eval": "TOFU_QA_FORGET10_P"}})
    data_cfg = compose_names(run_cfg).data
    data = get_data(data_cfg, "unlearn", smollm2_tokenizer, need_eval=False)
    assert data["eval"] is None and len(data["train"]) == 2  # forget10_perturbed.json is not there: never read
    with pytest.raises(FileNotFoundError, match="forget10_perturbed.json not found"):
        get_data(data_cfg, "unlearn", smollm2_tokenizer, need_eval=True)


# ----- evaluator inputs ---------------------------------------------------------------------------
def _tofu_evaluator(tofu_dir, retain_logs_path="null"):
    from evals import get_evaluators

    cfg = _compose("eval.yaml", ["model=tiny-random-llama", f"paths.tofu={tofu_dir}",
                                 f"retain_logs_path={retain_logs_path}"])
    return get_evaluators(cfg.eval, paths=cfg.paths)["tofu"]


def test_retain_logs_are_checked_before_any_pass(tofu_dir, tmp_path):
    from data.utils import DataFileError

    _tofu_evaluator(tofu_dir).check_inputs()  # no retain logs: nothing to read
    missing = tmp_path / "retain" / "TOFU_EVAL.json"
    with pytest.raises(FileNotFoundError, match=rf"reference_logs.retain_model_logs.path={missing} \(retain_logs_path\) "
                                                "does not exist"):
        _tofu_evaluator(tofu_dir, missing).check_inputs()
    bad = tmp_path / "bad.json"
    bad.write_text('{"forget_truth_ratio": {"value_by_index": {}},\n "mia_min_k": ')
    with pytest.raises(DataFileError, match=r"bad.json \(retain_logs_path\), line 2: not valid JSON"):
        _tofu_evaluator(tofu_dir, bad).check_inputs()
    bad.write_text(json.dumps({"mia_min_k": {"agg_value": 0.5}}))
    with pytest.raises(DataFileError, match=r"has no metric 'forget_truth_ratio', which forget_quality reads"):
        _tofu_evaluator(tofu_dir, bad).check_inputs()
    bad.write_text(json.dumps({"mia_min_k": {"agg_value": 0.5}, "forget_truth_ratio": {"agg_value": 0.7}}))
    with pytest.raises(DataFileError, match=r"'forget_truth_ratio' entry has no 'value_by_index' object"):
        _tofu_evaluator(tofu_dir, bad).check_inputs()
    bad.write_text(json.dumps({"mia_min_k": {"agg_value": 0.5}, "forget_truth_ratio": {"value_by_index": {}}}))
    _tofu_evaluator(tofu_dir, bad).check_inputs()
    # an evaluation of another benchmark (MUSE's has a mia_min_k too, whose AUC privleak would take)
    bad.write_text(json.dumps({"mia_min_k": {"agg_value": 0.5}, "forget_truth_ratio": {"value_by_index": {}},
                               "_meta": {"evaluator": "MUSE"}}))
    with pytest.raises(DataFileError, match=r"bad.json \(retain_logs_path\) is an evaluation of benchmark MUSE .*not "
                                            r"of TOFU: give the retain model's TOFU_EVAL.json"):
        _tofu_evaluator(tofu_dir, bad).check_inputs()


def test_evaluator_data_files_are_read_through_before_any_pass(tofu_dir, tmp_path):
    from data.utils import DataFileError

    folder = tmp_path / "tofu"
    shutil.copytree(tofu_dir, folder)
    path = folder / "forget10_perturbed.json"
    lines = path.read_text().splitlines()
    row = json.loads(lines[1])
    del row["paraphrased_answer"]
    path.write_text("\n".join([lines[0], json.dumps(row), *lines[2:]]) + "\n")
    with pytest.raises(DataFileError, match=r"TOFU metric .*forget10_perturbed.json, line 2: no 'paraphrased_answer' "
                                            r"field \(answer_key='paraphrased_answer'\)"):
        _tofu_evaluator(folder).check_inputs()


def test_nan_is_not_a_number_we_accept_anywhere_in_checks():
    from checks import check_number

    for value in (NAN, INF, -INF):
        with pytest.raises(ValueError, match="finite"):
            check_number("x", value)
    assert math.isfinite(check_number("x", -1e300))


def test_the_training_command_checks_mode_and_loads_only_what_it_uses(tofu_dir, tmp_path, monkeypatch):
    """Through train.run: a mode/method mismatch is refused before anything is created, and an unused
    default data.eval (no eval_strategy) need not exist."""
    from conftest import train_in_process

    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match="unlearn.yaml"):
        train_in_process(tmp_path / "wrong", ["model=tiny-random-llama", "trainer=GradDiff"], config_name="train.yaml")
    assert not (tmp_path / "wrong").exists()
    folder = tmp_path / "tofu"
    shutil.copytree(tofu_dir, folder)
    (folder / "forget10_perturbed.json").unlink()  # the file of the default data.eval
    steps = train_in_process(tmp_path / "run", ["model=tiny-random-llama", f"paths.tofu={folder}",
                                                "trainer.args.max_steps=1", "trainer.args.logging_steps=1",
                                                "trainer.args.per_device_train_batch_size=2",
                                                "trainer.args.gradient_accumulation_steps=1"])
    assert [e["step"] for e in steps] == [1]
