"""compat=open_unlearning: the preset and the options it sets, each behaviour against a value worked out by hand,
and end to end.

The comparison with a real open-unlearning checkout is in test_vs_open_unlearning.py (run when
OU_CHECKOUT is set).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import run_cli

SHORT = ["eval.tofu.metrics.forget_Q_A_ROUGE.generation_args.max_new_tokens=8",
         *[f"eval.tofu.metrics.model_utility.pre_compute.{p}_Q_A_ROUGE.generation_args.max_new_tokens=8"
           for p in ("retain", "ra", "wf")]]


#: Every option the preset sets, where it lands in a run's config (unlearn.yaml, trainer=SimNPO, eval=tofu).
PRESET_OPTIONS = {
    "data.forget.args.labels_cover_chat_tail": True,
    "data.retain.args.labels_cover_chat_tail": True,
    "eval.tofu.metrics.forget_Q_A_Prob.datasets.main.args.labels_cover_chat_tail": True,
    "collator.args.attention_mask_from_pad": True,
    "data.retain_partners_from_global_rng": True,
    "trainer.method_args.delta_before_scaling": True,
    "eval.tofu.passes": "plain",
    "eval.tofu.plain_pass_options": {"attention_mask_from_pad": True, "float32_log_probs": True,
                                     "generation_stops_at_eos_only": True, "rouge_texts_from_tokens": True},
    "eval.tofu.metrics.extraction_strength.floor_at_one_token": True,
}


def _composed(overrides: list[str], config_name: str = "unlearn.yaml"):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import REPO
    from resolvers import compose_names, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        cfg = compose(config_name, overrides=overrides)
        compose_names(cfg)
    return cfg, OmegaConf


def test_the_preset_sets_each_components_own_option():
    """compat=open_unlearning is a config group whose values become the options of the components that own each
    behaviour; without it every option is ours, and one option can be set alone."""
    def values(cfg, omegaconf):
        return {key: omegaconf.to_container(omegaconf.select(cfg, key), resolve=True)
                if omegaconf.is_config(omegaconf.select(cfg, key)) else omegaconf.select(cfg, key)
                for key in PRESET_OPTIONS}

    base = ["trainer=SimNPO", "eval=tofu", "paths.tofu=/t"]
    assert values(*_composed([*base, "compat=open_unlearning"])) == PRESET_OPTIONS
    ours = values(*_composed(base))
    assert ours["eval.tofu.passes"] == "fast"
    assert not any(v for k, v in ours.items() if k not in ("eval.tofu.passes", "eval.tofu.plain_pass_options"))
    assert not any(ours["eval.tofu.plain_pass_options"].values())
    single = values(*_composed([*base, "collator.args.attention_mask_from_pad=true"]))
    assert single["collator.args.attention_mask_from_pad"] and not single["data.forget.args.labels_cover_chat_tail"]
    # a run without the component ignores its value (GradDiff has no delta; eval.py has no collator)
    cfg, _ = _composed(["trainer=GradDiff", "compat=open_unlearning"])
    assert "delta_before_scaling" not in cfg.trainer.method_args
    cfg, omegaconf = _composed(["eval=muse", "paths.muse_news=/m", "compat=open_unlearning"], "eval.yaml")
    muse = omegaconf.to_container(cfg.eval.muse, resolve=True)
    assert muse["passes"] == "plain" and muse["metrics"]["forget_knowmem_ROUGE"]["datasets"]["main"]["args"][
        "labels_cover_chat_tail"] is True
    chunks = muse["metrics"]["mia_zlib"]["datasets"]["forget"]["args"]
    assert chunks["last_token_is_eos"] is True and chunks["unlabelled_first_token"] is True
    cfg, omegaconf = _composed(["eval=muse", "paths.muse_news=/m"], "eval.yaml")
    chunks = omegaconf.to_container(cfg.eval.muse, resolve=True)["metrics"]["mia_zlib"]["datasets"]["forget"]["args"]
    assert chunks["last_token_is_eos"] is False and chunks["unlabelled_first_token"] is False


def test_a_preset_named_in_a_config_file_is_composed_and_a_bad_one_refused():
    from omegaconf import OmegaConf

    from checks import BadValueError
    from resolvers import compose_names

    cfg = OmegaConf.create({"compat": "open_unlearning", "data": {}})
    compose_names(cfg)
    assert cfg.compat.labels_cover_chat_tail is True and cfg.compat.passes == "plain"
    with pytest.raises(BadValueError, match=r"compat='open-unlearning'; valid: open_unlearning or null"):
        compose_names(OmegaConf.create({"compat": "open-unlearning"}))


def test_no_code_reads_a_mode_name():
    """The behaviours are options of their components: nothing below the entry points names the preset."""
    import ast

    from conftest import REPO

    for path in (REPO / "src").rglob("*.py"):
        if path.name == "resolvers.py":  # composes a preset named in a config file
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = {node.id} if isinstance(node, ast.Name) else {node.attr} if isinstance(node, ast.Attribute) else \
                {node.value} if isinstance(node, ast.Constant) and isinstance(node.value, str) else set()
            assert not names & {"compat", "open_unlearning", "get_compat"}, f"{path}:{node.lineno}"


def test_plain_pass_options_need_the_plain_passes(tofu_dir):
    from evals.base import Evaluator

    cfg, omegaconf = _composed(["eval=tofu", f"paths.tofu={tofu_dir}", "eval.tofu.plain_pass_options.float32_log_probs=true"],
                               "eval.yaml")
    with pytest.raises(ValueError, match=r"plain_pass_options \['float32_log_probs'\].*set eval.<bench>.passes=plain"):
        Evaluator(omegaconf.to_container(cfg.eval.tofu, resolve=True), paths=cfg.paths)
    cfg, omegaconf = _composed(["eval=tofu", f"paths.tofu={tofu_dir}", "+eval.tofu.plain_pass_options.fp32=true"],
                               "eval.yaml")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['fp32'\]; valid: attention_mask_from_pad"):
        Evaluator(omegaconf.to_container(cfg.eval.tofu, resolve=True), paths=cfg.paths)


def test_samples_as_open_unlearning_prepares_them(smollm2_tokenizer):
    """SmolLM2's chat renders `...<|im_start|>assistant\\n{answer}<|im_end|>\\n`: the labels are the answer,
    <|im_end|>, "\\n", and one more EOS (<|im_end|>), since the rendering ends with "\\n"."""
    from data.utils import PromptTemplate, format_prompt, tokenize_qa_batch

    tok, template = smollm2_tokenizer, PromptTemplate()
    ours, = tokenize_qa_batch(tok, template, ["Who wrote it?"], ["Jane Doe."], 512)
    theirs, = tokenize_qa_batch(tok, template, ["Who wrote it?"], ["Jane Doe."], 512, labels_cover_chat_tail=True)
    prompt = tok(format_prompt(tok, template, "Who wrote it?"), add_special_tokens=False)["input_ids"]
    answer = tok("Jane Doe.", add_special_tokens=False)["input_ids"]
    end, newline = tok.convert_tokens_to_ids("<|im_end|>"), tok("\n", add_special_tokens=False)["input_ids"]
    assert ours.input_ids == prompt + answer + [end]
    assert theirs.input_ids == prompt + answer + [end] + newline + [tok.eos_token_id]
    assert theirs.labels == [-100] * len(prompt) + answer + [end] + newline + [tok.eos_token_id]
    assert tok.eos_token_id == end  # SmolLM2: EOS is the end-of-turn token


def test_samples_with_in_context_examples_as_open_unlearning_prepares_them(smollm2_tokenizer):
    """MUSE's knowledge prompts in open-unlearning: the examples as earlier turns of one text tokenized at once,
    the labels every token after the prompt, one EOS appended (plain tags, as MUSE's datasets set)."""
    from data.utils import PromptTemplate, tokenize_qa_batch

    tok = smollm2_tokenizer
    template = PromptTemplate(apply_chat_template=False, user_start_tag="Question: ", user_end_tag="\n",
                              asst_start_tag="Answer: ", asst_end_tag="\n\n")
    fewshot = [("Who won?", "Selby"), ("Where?", "Sheffield")]
    theirs, = tokenize_qa_batch(tok, template, ["When?"], ["May"], 512, labels_cover_chat_tail=True, fewshot=fewshot)
    prompt_text = "Question: Who won?\nAnswer: Selby\n\nQuestion: Where?\nAnswer: Sheffield\n\nQuestion: When?\nAnswer: "
    prompt = tok(prompt_text, add_special_tokens=True)["input_ids"]
    whole = tok(prompt_text + "May", add_special_tokens=True)["input_ids"]
    assert theirs.input_ids == whole + [tok.eos_token_id]
    assert theirs.labels == [-100] * len(prompt) + whole[len(prompt):] + [tok.eos_token_id]


def test_raw_text_as_open_unlearning_prepares_it(smollm2_tokenizer, tmp_path):
    """A chunk's first token gets no label (nothing predicts it) and its text, which mia_zlib compresses, starts
    at the second token; the last token counts as an EOS that the memorisation and Min-K% metrics leave out."""
    from data.text import CompletionDataset
    from data.utils import IGNORE_INDEX

    (tmp_path / "chunks.json").write_text(json.dumps({"text": "Alpha beta gamma delta."}) + "\n")
    ours = CompletionDataset({"name": "chunks"}, smollm2_tokenizer, prefix_key=None, local_dir=str(tmp_path))
    theirs = CompletionDataset({"name": "chunks"}, smollm2_tokenizer, prefix_key=None, local_dir=str(tmp_path),
                               last_token_is_eos=True, unlabelled_first_token=True)
    tokens = smollm2_tokenizer("Alpha beta gamma delta.", add_special_tokens=False)["input_ids"]
    assert ours[0]["labels"].tolist() == tokens and not ours.last_token_is_eos
    assert theirs[0]["labels"].tolist() == [IGNORE_INDEX, *tokens[1:]] and theirs.last_token_is_eos
    assert ours.answer_texts(0) == ["Alpha beta gamma delta."]
    assert theirs.answer_texts(0) == [smollm2_tokenizer.decode(tokens[1:])]


def test_pad_derived_mask_hides_in_sample_pad_tokens(smollm2_tokenizer):
    from data.collators import DataCollatorForSupervisedDataset

    pad = smollm2_tokenizer.pad_token_id
    a = {"input_ids": torch.tensor([5, pad, 7, pad]), "labels": torch.tensor([-100, -100, 7, pad]),
         "attention_mask": torch.ones(4, dtype=torch.long)}
    b = {"input_ids": torch.tensor([5, 6]), "labels": torch.tensor([-100, 6]), "attention_mask": torch.ones(2, dtype=torch.long)}
    ours = DataCollatorForSupervisedDataset(smollm2_tokenizer)([a, b])
    theirs = DataCollatorForSupervisedDataset(smollm2_tokenizer, attention_mask_from_pad=True)([a, b])
    assert ours["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]] and ours["layout"].answer_start == 1
    assert ours["layout"].causal_attention_suffices
    assert theirs["attention_mask"].tolist() == [[1, 0, 1, 0], [1, 1, 0, 0]]
    assert not theirs["layout"].causal_attention_suffices  # trainers must pass this mask to the model


def test_extraction_strength_floor():
    from evals.metrics.memorization import extraction_strength_score

    # last of 4 tokens wrong: no suffix is predicted -> ours 0, open-unlearning 1/4
    assert extraction_strength_score([1, 1, 1, 0]) == 0.0
    assert extraction_strength_score([1, 1, 1, 0], floor_at_one_token=True) == 0.25
    # only the last token right: k = 3 of 4 in both
    assert extraction_strength_score([0, 0, 0, 1]) == extraction_strength_score([0, 0, 0, 1], True) == 0.25
    assert extraction_strength_score([1, 1, 1, 1], floor_at_one_token=True) == 1.0


def test_open_unlearning_batches_take_items_then_answer_positions():
    """With ``float32_log_probs`` the batches are open-unlearning's: its float32 cross-entropy rounds
    differently with another batch layout (by ~1e-4 in a mean NLL), so the layout must be its own."""
    from evals.passes import _open_unlearning_batches

    class Grouped:
        def __init__(self, n, k):
            self.items = [[{"i": i, "k": j} for j in range(k)] for i in range(n)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    batches = _open_unlearning_batches(Grouped(5, 3), batch_size=2)
    # items (0, 1), then (2, 3), then (4,); one batch per answer position
    assert [[(i, s["k"]) for i, s in b] for b in batches] == [
        [(0, 0), (1, 0)], [(0, 1), (1, 1)], [(0, 2), (1, 2)],
        [(2, 0), (3, 0)], [(2, 1), (3, 1)], [(2, 2), (3, 2)], [(4, 0)], [(4, 1)], [(4, 2)]]


@pytest.mark.slow  # ~30 s: a command-line evaluation (tests/test_golden.py pins compat's numbers) (make test-slow)
def test_eval_in_compat_mode_end_to_end(tofu_dir, tmp_path):
    out = tmp_path / "compat"
    result = run_cli(["src/eval.py", "--config-name=eval.yaml", "model=tiny-random-llama", f"paths.tofu={tofu_dir}",
                      f"paths.output_dir={out}", "compat=open_unlearning", "eval.tofu.limit=4", *SHORT])
    assert result.returncode == 0, result.stderr[-4000:]
    logs = json.loads((out / "TOFU_EVAL.json").read_text())
    assert logs["_meta"]["passes"] == "plain" and all(logs["_meta"]["plain_pass_options"].values())
    record = logs["forget_Q_A_ROUGE"]["value_by_index"]["0"]
    # open-unlearning's texts: the decoded prompt (chat roles included), the answer decoded from the tokens
    assert record["input"].startswith("system\n") and record["input"].rstrip().endswith("assistant")
    row = json.loads((tofu_dir / "forget10_perturbed.json").read_text().splitlines()[0])
    assert row["question"] in record["input"] and record["ground_truth"] == row["answer"]
    for name in ("forget_Q_A_Prob", "extraction_strength", "model_utility"):
        assert math.isfinite(logs[name]["agg_value"]), name
    # the same evaluation without compat: another fingerprint, so nothing is reused across modes
    again = run_cli(["src/eval.py", "--config-name=eval.yaml", "model=tiny-random-llama", f"paths.tofu={tofu_dir}",
                     f"paths.output_dir={out}", "eval.tofu.limit=4", *SHORT])
    assert again.returncode == 0, again.stderr[-4000:]
    assert "reusing" not in again.stdout + again.stderr
    assert not any(json.loads((out / "TOFU_EVAL.json").read_text())["_meta"]["plain_pass_options"].values())


def test_bad_compat_value_fails_before_any_work(tmp_path):
    result = run_cli(["src/train.py", "--config-name=unlearn.yaml", "model=tiny-random-llama", "compat=openunlearning",
                      f"paths.output_dir={tmp_path / 'x'}"])
    assert result.returncode != 0
    assert "compat/openunlearning" in result.stderr and "open_unlearning" in result.stderr
    assert not (tmp_path / "x").exists()


def test_vs_open_unlearning_helpers(tmp_path):
    """The benchmark's pure parts: the transformers-4.45 config, and the per-metric comparison."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import vs_open_unlearning as vs

    config = {"model_type": "llama", "dtype": "float32", "hidden_size": 8, "num_hidden_layers": 2,
              "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "transformers_version": "5.23.0"}
    legacy = vs.legacy_llama_config(config)
    assert legacy["rope_theta"] == 100000.0 and legacy["rope_scaling"] is None
    assert "rope_parameters" not in legacy and legacy["torch_dtype"] == "float32" and legacy["hidden_size"] == 8
    with pytest.raises(ValueError, match="only Llama models"):
        vs.legacy_llama_config({"model_type": "gpt2"})

    theirs = {"m": {"agg_value": 0.5, "value_by_index": {"0": {"prob": 0.2, "generation": "a b"}, "1": {"prob": 0.8}}}}
    ours = {"m": {"agg_value": 0.50001, "value_by_index": {"0": {"prob": 0.2, "generation": "a c"}, "1": {"prob": 0.8}}},
            "_meta": {}}
    report = vs.compare_eval_files(theirs, ours)["m"]
    assert report["agg_rel_diff"] == pytest.approx(0.00001 / 0.50001)
    assert report["per_sample_max_rel_diff"] == 0.0 and report["per_sample_values"] == 2
    assert report["texts_differing"] == 1 and report["matches"] is False


def test_simnpo_delta_in_open_unlearning_units(monkeypatch):
    """open-unlearning's delta is subtracted before the scaling: log sigmoid(beta * (A - delta))."""
    from trainer.unlearn import simnpo

    trainer = object.__new__(simnpo.SimNPO)
    trainer.beta, trainer.delta = 2.0, 0.5
    nll = torch.tensor([3.0, 1.0])  # summed answer NLLs S of two samples of T = 2 tokens: A = 1.5, 0.5
    from trainer.answer_nll import AnswerNLL

    per_token = torch.stack([nll / 2, nll / 2], dim=1)  # [2 samples, 2 tokens]
    monkeypatch.setattr(simnpo.SimNPO, "answer_nlls",
                        lambda self, model, *batches: [AnswerNLL(per_token, torch.ones(2, 2, dtype=torch.bool)), None])
    monkeypatch.setattr(simnpo.SimNPO, "nll_retain_batch", lambda self, inputs: None)
    monkeypatch.setattr(simnpo.SimNPO, "weighted_total", lambda self, model, inputs, forget_loss, retain_nll: forget_loss)
    values = {}
    for before_scaling in (False, True):
        trainer.delta_before_scaling = before_scaling
        values[before_scaling] = float(trainer.compute_loss(None, {"forget": {}}))
    A = torch.tensor([1.5, 0.5])
    ours = float(-(2 / 2.0) * torch.nn.functional.logsigmoid(2.0 * A - 0.5).mean())
    theirs = float(-(2 / 2.0) * torch.nn.functional.logsigmoid(2.0 * (A - 0.5)).mean())
    assert values[False] == pytest.approx(ours) and values[True] == pytest.approx(theirs)
    assert ours != pytest.approx(theirs)
