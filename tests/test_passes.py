"""Evaluation passes: the shortened output layer computes exactly what a full forward pass does."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from conftest import MODEL_CACHE, REPO
from data import build_dataset
from data.collators import DataCollatorForSupervisedDataset
from evals.passes import answer_logits, token_stats_pass
from model import get_model
from trainer.losses import sequence_nll


def _tiny():
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny-random-llama.yaml"))
    cfg["cache_dir"] = str(MODEL_CACHE)
    model, tok = get_model(cfg)
    return model.eval(), tok


def test_answer_logits_equal_full_forward():
    model, tok = _tiny()
    ids = [torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([5, 6, 11, 12])]
    labels = [torch.tensor([-100, -100, -100, 8, 9, 10]), torch.tensor([-100, -100, 11, 12])]
    batch = DataCollatorForSupervisedDataset(tok)(
        [{"input_ids": i, "labels": lab, "attention_mask": torch.ones_like(i)} for i, lab in zip(ids, labels)])
    with torch.no_grad():
        logits, targets = answer_logits(model, batch, torch.device("cpu"))
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[1] == 4  # the first answer label is at position 2: logits from position 1 on
    full_targets = batch["labels"][:, 1:]
    assert torch.equal(targets[targets != -100], full_targets[full_targets != -100])
    assert torch.allclose(logits[targets != -100], full[:, :-1][full_targets != -100], atol=1e-5)


def test_token_stats_match_the_training_loss(tofu_dir):
    model, tok = _tiny()
    root = OmegaConf.create({"paths": {"tofu": str(tofu_dir)}, "seed": 0})
    dataset = build_dataset("TOFU_QA_FORGET10_P", tok, {"apply_chat_template": True}, root_cfg=root,
                            dataset_args={"answer_key": "perturbed_answer"})
    stats = token_stats_pass(model, dataset, tok, batch_size=3)
    assert sorted(stats) == list(range(len(dataset))) and all(len(v) == 5 for v in stats.values())
    batch = DataCollatorForSupervisedDataset(tok)(dataset[1])
    with torch.no_grad():
        nll, count = sequence_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  batch["labels"])
    for k in range(5):
        assert len(stats[1][k].logp) == int(count[k])
        assert abs(-stats[1][k].logp.sum() - float(nll[k])) < 1e-3
        assert stats[1][k].answer_text == dataset.rows[1]["perturbed_answer"][k]
