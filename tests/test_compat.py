"""compat=open_unlearning: each switched behaviour against a value worked out by hand, and end to end.

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


def test_compat_values_are_checked():
    from checks import BadValueError
    from compat import OPEN_UNLEARNING, OURS, get_compat

    assert get_compat(None) is OURS and get_compat("null") is OURS
    assert get_compat("open_unlearning") is OPEN_UNLEARNING
    with pytest.raises(BadValueError, match=r"compat='open-unlearning'; valid: open_unlearning or null"):
        get_compat("open-unlearning")


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


def test_eval_in_compat_mode_end_to_end(tofu_dir, tmp_path):
    out = tmp_path / "compat"
    result = run_cli(["src/eval.py", "--config-name=eval.yaml", "model=tiny-random-llama", f"paths.tofu={tofu_dir}",
                      f"paths.output_dir={out}", "compat=open_unlearning", "eval.tofu.limit=4", *SHORT])
    assert result.returncode == 0, result.stderr[-4000:]
    logs = json.loads((out / "TOFU_EVAL.json").read_text())
    assert logs["_meta"]["compat"] == "open_unlearning" and logs["_meta"]["passes"] == "plain"
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
    assert json.loads((out / "TOFU_EVAL.json").read_text())["_meta"]["compat"] is None


def test_bad_compat_value_fails_before_any_work(tmp_path):
    result = run_cli(["src/train.py", "--config-name=unlearn.yaml", "model=tiny-random-llama", "compat=openunlearning",
                      f"paths.output_dir={tmp_path / 'x'}"])
    assert result.returncode != 0
    assert "compat='openunlearning'; valid: open_unlearning or null" in result.stderr
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
    from compat import OPEN_UNLEARNING, OURS
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
    for compat in (OURS, OPEN_UNLEARNING):
        trainer.compat = compat
        values[compat.name] = float(trainer.compute_loss(None, {"forget": {}}))
    A = torch.tensor([1.5, 0.5])
    ours = float(-(2 / 2.0) * torch.nn.functional.logsigmoid(2.0 * A - 0.5).mean())
    theirs = float(-(2 / 2.0) * torch.nn.functional.logsigmoid(2.0 * (A - 0.5)).mean())
    assert values[None] == pytest.approx(ours) and values["open_unlearning"] == pytest.approx(theirs)
    assert ours != pytest.approx(theirs)
