"""Robustness attacks (src/attacks/): quantization, relearning, rephrasing, and eval.py running them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from attacks import format_robustness, get_attacks, robustness_summary
from attacks.quantize import quantizable_linears, rtn_copy, rtn_quantize
from attacks.relearn import relearned_copy, relearning_rows
from attacks.rephrase import variant_inputs, worst_case
from conftest import run_cli


# ----- quantization ---------------------------------------------------------------------------------
def test_rtn_rounds_to_the_grid_computed_by_hand():
    # 2 bits, asymmetric, groups of 4: group 1 spans [0, 3] (scale 1, zero 0), group 2 [-1, 2] (scale 1, zero 1);
    # halves round to even (0.5 -> 0, 1.5 -> 2)
    w = torch.tensor([[0.0, 0.4, 1.6, 3.0, -1.0, 0.0, 0.5, 2.0]])
    assert rtn_quantize(w, bits=2, group_size=4).tolist() == [[0.0, 0.0, 2.0, 3.0, -1.0, 0.0, 0.0, 2.0]]
    # one scale per row (group_size null): [-1, 3] over 3 levels -> scale 4/3, zero round(0.75) = 1
    s = 4 / 3
    expected = [(min(max(round(v / s) + 1, 0), 3) - 1) * s for v in w[0].tolist()]
    assert torch.allclose(rtn_quantize(w, bits=2), torch.tensor([expected]))
    # 3 bits symmetric: scale max|w| / 3 = 1, levels -4..3
    sym = torch.tensor([[0.3, -1.5, 3.0, 0.9]])
    assert rtn_quantize(sym, bits=3, symmetric=True).tolist() == [[0.0, -2.0, 3.0, 1.0]]
    # a constant group is kept; dtype kept
    const = torch.full((2, 4), 0.25, dtype=torch.bfloat16)
    assert torch.equal(rtn_quantize(const, bits=4), const)
    # groups of 3 over 8 columns: [0, .4, 1.6] (scale 1.6/3, zero 0), [3, -1, 0] (scale 4/3, zero 1) and the
    # remainder [.5, 2] as a smaller group (scale .5, zero -1)
    third = 1.6 / 3
    assert torch.allclose(rtn_quantize(w, bits=2, group_size=3), torch.tensor(
        [[0.0, third, 3 * third, 2 * 4 / 3, -4 / 3, 0.0, 0.5, 2.0]]))
    assert torch.equal(rtn_quantize(w, bits=2, group_size=100), rtn_quantize(w, bits=2))  # wider than a row
    with pytest.raises(ValueError, match="group_size=0; must be an integer >= 1"):
        rtn_quantize(w, bits=4, group_size=0)
    with pytest.raises(ValueError, match="bits=1"):
        rtn_quantize(w, bits=1)


def test_the_effective_grouping_is_described_and_a_weaker_attack_warned(caplog):
    """SmolLM2's width 576 is 4.5 groups of 128: each row ends with a group of 64 (not one scale per row, as
    before), and the share of weights in those smaller groups is recorded and warned about."""
    from attacks.quantize import grouping, rtn_copy

    layers = torch.nn.Sequential(torch.nn.Linear(576, 8), torch.nn.Linear(256, 4))
    groups = grouping(layers, 128)
    assert groups["layers"] == 2 and groups["layers_with_a_smaller_group"] == 1 and groups["widths_not_divisible"] == [576]
    assert groups["share_of_weights_in_smaller_groups"] == pytest.approx(8 * 64 / (8 * 576 + 4 * 256))
    with caplog.at_level("WARNING"):
        rtn_copy(layers, bits=4, group_size=128)
    assert "does not divide the width of 1 of 2 layers (widths [576])" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        rtn_copy(layers, bits=4, group_size=64)
    assert "does not divide" not in caplog.text


def _tiny():
    from model import get_model

    cfg = OmegaConf.load("configs/model/tiny-random-llama.yaml")
    cfg.cache_dir = ".cache/models"
    model, tokenizer = get_model(cfg)
    return model, tokenizer


def test_quantized_copy_differs_and_leaves_the_model_alone(repo, monkeypatch):
    monkeypatch.chdir(repo)
    model, _ = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attacked = rtn_copy(model, bits=4, group_size=32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    names = {name for name, _ in quantizable_linears(attacked)}
    assert "model.layers.0.mlp.down_proj" in names and "lm_head" not in names
    q = dict(attacked.named_modules())["model.layers.0.self_attn.q_proj"].weight
    assert not torch.equal(q, dict(model.named_modules())["model.layers.0.self_attn.q_proj"].weight)
    assert all(torch.unique(group).numel() <= 16 for group in q.reshape(-1, 32))  # at most 2**4 levels per group
    assert torch.equal(attacked.model.embed_tokens.weight, model.model.embed_tokens.weight)


# ----- relearning -----------------------------------------------------------------------------------
def test_relearning_rows_are_a_seeded_fraction():
    assert relearning_rows(10, 0.5, seed=0) == relearning_rows(10, 0.5, seed=0)
    assert len(relearning_rows(10, 0.5, seed=0)) == 5 and len(relearning_rows(3, 0.1, seed=0)) == 1
    with pytest.raises(ValueError, match="fraction"):
        relearning_rows(10, 0.0, seed=0)


def test_two_relearning_steps_raise_the_forget_answer_probability(tofu_dir, repo, monkeypatch):
    from data import build_dataset, compose_dataset
    from data.collators import DataCollatorForSupervisedDataset
    from trainer.answer_nll import answer_token_nll

    monkeypatch.chdir(repo)
    model, tokenizer = _tiny()
    root = OmegaConf.create({"paths": {"tofu": str(tofu_dir)}, "seed": 0})
    forget = build_dataset(compose_dataset("TOFU_QA_FORGET10", root), tokenizer, template_args={"apply_chat_template": True})
    batch = DataCollatorForSupervisedDataset(tokenizer)([forget[i] for i in range(len(forget))])

    def mean_nll(m):
        with torch.no_grad():
            nll, mask = answer_token_nll(m, batch)
        return float(nll.sum() / mask.sum())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    attacked = relearned_copy(model, forget, tokenizer, steps=2, learning_rate=1e-3, batch_size=4, seed=0)
    assert mean_nll(attacked) < mean_nll(model) - 0.1  # the answers came back (more likely)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----- rephrasing -----------------------------------------------------------------------------------
def test_worst_case_is_the_per_sample_maximum_over_variants():
    results = {
        "paraphrased_question": {"agg_value": 0.3, "value_by_index": {"0": {"prob": 0.2}, "1": {"prob": 0.4}}},
        "no_chat_template": {"agg_value": 0.35, "value_by_index": {"0": {"prob": 0.5}, "1": {"prob": 0.2}}},
        "system_prompt": {"agg_value": 0.1, "value_by_index": {"0": {"prob": [0.1, 0.9]}, "1": {"prob": None}}},
    }
    out = worst_case(results, ("prob",))
    assert out["value_by_index"] == {"0": {"prob": 0.5, "variant": "no_chat_template"},
                                     "1": {"prob": 0.4, "variant": "paraphrased_question"}}
    assert out["agg_value"] == pytest.approx((0.5 + 0.4) / 2)
    assert out["variants"] == {"paraphrased_question": 0.3, "no_chat_template": 0.35, "system_prompt": 0.1}


def test_variants_change_one_thing_each():
    from evals.base import with_question_key

    assert variant_inputs("paraphrased_question", {"apply_chat_template": True}, {}) == (
        "paraphrased_question", {"apply_chat_template": True})
    assert variant_inputs("no_chat_template", {"apply_chat_template": True}, {}) == (
        None, {"apply_chat_template": False})
    assert variant_inputs("system_prompt", {"system_prompt": None}, {"system_prompt": "Be exact."}) == (
        None, {"apply_chat_template": True, "system_prompt": "Be exact."})
    # the benchmark asks its questions from the paraphrased column, its pre-compute metrics' datasets too
    metric = {"handler": "probability", "datasets": {"main": {"args": {"question_key": "question"}}},
              "pre_compute": {"p": {"handler": "probability", "datasets": {"main": {"args": {"question_key": "question"}}}}}}
    varied = with_question_key(metric, "paraphrased_question")
    assert varied["datasets"]["main"]["args"]["question_key"] == "paraphrased_question"
    assert varied["pre_compute"]["p"]["datasets"]["main"]["args"]["question_key"] == "paraphrased_question"
    assert metric["datasets"]["main"]["args"]["question_key"] == "question"  # the given config is not changed
    # a raw-text dataset (MUSE's verbatim continuations: CompletionDataset) has no question column: left as it is
    raw = {"handler": "rouge", "datasets": {"main": {"handler": "CompletionDataset", "args": {"text_key": "gt"}}}}
    assert with_question_key(raw, "paraphrased_question")["datasets"]["main"]["args"] == {"text_key": "gt"}


def test_relearning_set_is_the_composed_dataset(tofu_dir, smollm2_tokenizer):
    """attack.relearn.data reaches the attack composed (src/eval.py composes its name): a name is refused."""
    from attacks.relearn import relearning_set
    from data import compose_dataset

    data = compose_dataset("TOFU_QA_FORGET10", {"paths": {"tofu": str(tofu_dir)}, "seed": 0})
    rows = relearning_set({"data": data, "fraction": 0.5, "dataset_args": {"max_length": 128}}, smollm2_tokenizer, None)
    assert len(rows) == 4 and rows.dataset.name == "TOFU_QA_FORGET10"
    with pytest.raises(ValueError, match=r"'TOFU_QA_FORGET10' is a dataset name.*valid names: .*TOFU_QA_RA"):
        relearning_set({"data": "TOFU_QA_FORGET10"}, smollm2_tokenizer, None)


def test_relearning_follows_the_benchmark_evaluated(tofu_dir, smollm2_tokenizer):
    """attack.relearn.data null: the benchmark's relearn_data (TOFU: the forget split evaluated; MUSE: its forget
    corpus), composed by the entry point; neither given is refused before any work."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from attacks import ATTACK_REGISTRY, check_attacks, get_attacks
    from attacks.relearn import relearning_set
    from checks import BadValueError
    from conftest import REPO
    from evals import get_evaluators
    from resolvers import compose_names

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        tofu = compose_names(compose("eval.yaml", overrides=["eval=tofu", "attack=relearn", f"paths.tofu={tofu_dir}",
                                                             "forget_split=forget01", "holdout_split=holdout01"]))
        muse = compose_names(compose("eval.yaml", overrides=["eval=muse", "attack=relearn", "paths.muse_news=/m"]))
    assert tofu.attack.relearn.data is None
    assert tofu.eval.tofu.relearn_data.name == "TOFU_QA_FORGET01" and muse.eval.muse.relearn_data.name == "MUSE_forget"
    bench = get_evaluators(tofu.eval, paths=tofu.paths)["tofu"]
    attacks = get_attacks(OmegaConf.to_container(tofu.attack, resolve=True))
    check_attacks(attacks, {"tofu": bench})
    rows = relearning_set(attacks[0][1], smollm2_tokenizer, None, bench.relearn_data())
    assert rows.dataset.name == "TOFU_QA_FORGET01"
    assert ATTACK_REGISTRY["relearn"].check is not None
    orphan = get_evaluators({"t": {**OmegaConf.to_container(tofu.eval.tofu, resolve=True), "relearn_data": None}},
                            paths=tofu.paths)["t"]
    with pytest.raises(BadValueError, match="attack.relearn.data is not set and the benchmark declares no relearn_data"):
        check_attacks(attacks, {"t": orphan})


@pytest.mark.parametrize("option, message", [
    ("attack.quantize.group_size=0", r"attack.quantize.group_size=0; must be an integer >= 1"),
    ("attack.quantize.bits=1", r"attack.quantize.bits=1; give an integer from 2 to 16"),
    ("attack.quantize.method=gptq", r"attack.quantize.method='gptq'; valid: rtn, nf4, int8"),
    ("attack.relearn.steps=0", r"attack.relearn.steps=0; must be an integer >= 1"),
    ("attack.relearn.baseline_model_path=/no/such/model", r"baseline_model_path=/no/such/model: not a model folder"),
    ("attack.rephrase.variants=[typo]", r"attack.rephrase.variants=\['typo'\]: give one or more of"),
])
def test_every_attack_option_is_checked_before_any_work(tofu_dir, tmp_path, option, message):
    """A bad attack option fails before the model is loaded and the clean evaluation runs (it used to fail after
    it, throwing the clean results away), and the output folder is not created."""
    from hydra import compose, initialize_config_dir

    import eval as eval_script
    from checks import BadValueError
    from conftest import REPO

    attack = option.split(".")[1]
    out = tmp_path / "out"
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose("eval.yaml", overrides=["model=tiny-random-llama", f"paths.tofu={tofu_dir}",
                                              f"paths.output_dir={out}", f"attack={attack}", option])
    loaded = []
    original = eval_script.get_model
    eval_script.get_model = lambda *a, **k: loaded.append(1) or original(*a, **k)
    try:
        with pytest.raises(BadValueError, match=message):
            eval_script.run(cfg)
    finally:
        eval_script.get_model = original
    assert not loaded and not out.exists()


# ----- the summary and the command line -------------------------------------------------------------
def test_robustness_summary_and_table():
    from evals.result import EvalResult

    clean = EvalResult("TOFU", {"forget_Q_A_Prob": {"agg_value": 0.1}}, {"forget_Q_A_Prob": 0.1})
    attacked = {"quant4": {"forget_Q_A_Prob": {"agg_value": 0.4}}, "relearn": {"forget_Q_A_Prob": {"agg_value": 0.7}}}
    baselines = {"relearn": {"forget_Q_A_Prob": {"agg_value": 0.3}}}
    retain = EvalResult("TOFU", {"forget_Q_A_Prob": {"agg_value": 0.05}, "forget_Q_A_Prob@quant4": {"agg_value": 0.06}}, {})
    summary = robustness_summary(clean, attacked, baselines, retain)
    assert summary == {"forget_Q_A_Prob": {"clean": 0.1, "attacked": {"quant4": 0.4, "relearn": 0.7}, "retain": 0.05,
                                           "retain_attacked": {"quant4": 0.06, "relearn": 0.3}}}
    table = format_robustness(summary)
    assert "@quant4" in table and "retain@relearn" in table and "0.7" in table
    with pytest.raises(ValueError, match="unknown attack 'quantise'; valid: quantize, relearn, rephrase"):
        get_attacks({"quantise": {}})


def test_the_baseline_is_the_retain_model_its_evaluation_names(tmp_path):
    from attacks import baseline_model

    retain_dir = tmp_path / "retain"
    retain_dir.mkdir()
    logs = tmp_path / "TOFU_EVAL.json"
    logs.write_text(json.dumps({"_meta": {"model": str(retain_dir)}}))
    assert baseline_model({"baseline_model_path": "auto"}, str(logs)) == str(retain_dir)
    assert baseline_model({"baseline_model_path": "/given"}, str(logs)) == "/given"
    assert baseline_model({"baseline_model_path": None}, str(logs)) is None
    logs.write_text(json.dumps({"_meta": {"model": "org/hub-model"}}))  # not a local folder: no baseline
    assert baseline_model({"baseline_model_path": "auto"}, str(logs)) is None
    assert baseline_model({"baseline_model_path": "auto"}, None) is None


SHORT = ["eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=4",
         *[f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=4"
           for p in ("retain", "ra", "wf")]]


def test_eval_with_every_attack_writes_every_attacked_metric(tofu_dir, tmp_path):
    """One eval.py call with the three attacks on a 2-layer model: each forget metric gets @quant4, @relearn
    and (for probabilities and ROUGE) @rephrase in the SUMMARY and EVAL files, the robustness file has clean,
    attacked and retain values, the table is printed, and the model folder is unchanged."""
    from safetensors.torch import load_file

    model_dir = tmp_path / "model"
    model, tokenizer = _tiny_at(model_dir)
    before = load_file(str(model_dir / "model.safetensors"))
    out = tmp_path / "eval"
    result = run_cli(["src/eval.py", "--config-name=eval.yaml", "model=tiny-random-llama",
                      f"model.model_args.pretrained_model_name_or_path={model_dir}", f"paths.tofu={tofu_dir}",
                      f"paths.output_dir={out}", "eval.tofu.limit=4", "attack=[quantize,relearn,rephrase]",
                      "attack.quantize.group_size=32", "attack.relearn.steps=2", "attack.relearn.learning_rate=1e-3",
                      f"attack.relearn.baseline_model_path={model_dir}", *SHORT])
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "TOFU_SUMMARY.json").read_text())
    logs = json.loads((out / "TOFU_EVAL.json").read_text())
    for metric in ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_Truth_Ratio", "forget_quality"):
        for tag in ("quant4", "relearn"):
            assert f"{metric}@{tag}" in summary and f"{metric}@{tag}" in logs, (metric, tag)
    for metric in ("forget_Q_A_Prob", "forget_Q_A_ROUGE"):
        assert math.isfinite(summary[f"{metric}@rephrase"])
        assert set(logs[f"{metric}@rephrase"]["variants"]) == {"paraphrased_question", "no_chat_template", "system_prompt"}
    assert summary["forget_Q_A_Prob@relearn"] > summary["forget_Q_A_Prob"]  # relearning brought answers back
    robustness = json.loads((out / "TOFU_ROBUSTNESS.json").read_text())
    row = robustness["forget_Q_A_Prob"]
    assert row["clean"] == summary["forget_Q_A_Prob"] and set(row["attacked"]) == {"quant4", "relearn", "rephrase"}
    assert row["retain_attacked"]["relearn"] == pytest.approx(row["attacked"]["relearn"])  # the same model as baseline
    assert "@quant4" in result.stdout and "@relearn" in result.stdout  # the side-by-side table
    quant = logs["_meta"]["attacks"]["quant4"]  # what the attack did, e.g. its effective grouping
    assert quant["group_size"] == 32 and quant["grouping"]["layers"] > 0 and quant["method"] == "rtn"
    after = load_file(str(model_dir / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)

    # the report shows the attacked metrics in its table and plots them next to the clean ones
    import csv

    import report

    assert report.main([str(out), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "robustness.png").read_bytes().startswith(b"\x89PNG")
    with open(tmp_path / "report" / "report.csv", encoding="utf-8") as f:
        (table_row,) = list(csv.DictReader(f))
    assert float(table_row["forget_Q_A_Prob@quant4"]) == summary["forget_Q_A_Prob@quant4"]


def _tiny_at(folder):
    import os

    cwd = os.getcwd()
    try:
        os.chdir(str(__import__("pathlib").Path(__file__).resolve().parents[1]))
        model, tokenizer = _tiny()
    finally:
        os.chdir(cwd)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer
