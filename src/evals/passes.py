"""Model passes of an evaluation: each runs once per (dataset, answer key) and feeds every metric.

- ``token_stats_pass``: one teacher-forced forward pass giving, per answer token, its log-prob, the
  mean and std of log p under the model's own next-token distribution (Min-K%++) and whether the
  argmax prediction is exact (EM, ES). Probability, truth ratio, model utility, LOSS/ZLib/Min-K/
  Min-K%++ attacks all come from it.
- ``generation_pass``: greedy generation from the prompts (ROUGE), batched with left padding.
- ``grad_norm_pass``: per-sample gradient norm of the mean answer NLL (GradNorm attack).

Batches are formed from samples sorted by length (less padding); with several processes each rank
takes a strided shard and the results are gathered, so every rank ends with the full result.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from data.collators import DataCollatorForSupervisedDataset, pad_sequences
from data.utils import IGNORE_INDEX, PromptTemplate, answer_end_token_id
from evals.metrics import TokenStats

log = logging.getLogger(__name__)


def _shard(indices: Sequence[int]) -> list[int]:
    """This rank's share of the indices (all of them in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return list(indices[rank::world])
    return list(indices)


def _gather(part: dict) -> dict:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, part)
        merged: dict = {}
        for p in parts:
            merged.update(p)
        return merged
    return part


def _batches_by_length(dataset: Any, indices: Sequence[int], batch_size: int) -> list[list[int]]:
    lengths = dataset.lengths()
    ordered = sorted(indices, key=lambda i: lengths[i], reverse=True)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def _answers(dataset: Any, index: int) -> list[str]:
    answer = dataset.rows[index][dataset.answer_key]
    return answer if isinstance(answer, list) else [answer]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def answer_logits(model: torch.nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits aligned with their target labels, skipping the LM head where no row has an answer.

    Returns ``(logits [B, L', V], labels [B, L'])`` where ``logits[:, j]`` predicts ``labels[:, j]``. The
    output layer (often the largest matrix product of a small model: vocab x hidden per position) runs
    only from the first position that predicts an answer token in any row, through the model's
    ``logits_to_keep`` argument when it has one; the values are those of a full forward pass.
    """
    labels = batch["labels"].to(device)
    width = labels.shape[1]
    has_answer = (labels != IGNORE_INDEX).any(0).nonzero()
    first = int(has_answer[0]) if len(has_answer) else width - 1
    keep = width - max(first - 1, 0)  # positions first-1 .. width-1 predict labels first .. width
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        logits = model(**inputs).logits[:, width - keep:]
    return logits[:, :-1], labels[:, width - keep + 1:]


@torch.inference_mode()
def token_stats_pass(model: torch.nn.Module, dataset: Any, tokenizer: Any, batch_size: int = 32) -> dict[int, list[TokenStats]]:
    """Per dataset index, one ``TokenStats`` per answer (several for perturbed-answer lists)."""
    collate = DataCollatorForSupervisedDataset(tokenizer, padding_side="right", index=True)
    device = _device(model)
    out: dict[int, list[TokenStats]] = {}
    for batch_indices in _batches_by_length(dataset, _shard(range(len(dataset))), batch_size):
        items = [dataset[i] for i in batch_indices]
        batch = collate([it if isinstance(it, list) else [it] for it in items])
        logits, labels = answer_logits(model, batch, device)
        mask = labels != IGNORE_INDEX
        # Only answer positions are normalised: [N_answer_tokens, V] instead of [B, L, V].
        logp_all = F.log_softmax(logits[mask].float(), dim=-1)
        token_logp = logp_all.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
        probs = logp_all.exp()
        mean_logp = (probs * logp_all).sum(-1)
        std_logp = ((probs * logp_all.square()).sum(-1) - mean_logp.square()).clamp(min=0).sqrt()
        match = logp_all.argmax(-1) == labels[mask]
        counts = mask.sum(-1).tolist()
        splits = [t.cpu().numpy() for t in (token_logp.double(), mean_logp.double(), std_logp.double(), match)]
        offset = 0
        for group, n in zip(batch["group"].tolist(), counts):
            index = batch_indices[group]
            answers = _answers(dataset, index)
            position = len(out.get(index, []))  # rows of one item arrive in answer order
            sl = slice(offset, offset + n)
            out.setdefault(index, []).append(TokenStats(
                logp=splits[0][sl], mean_logp=splits[1][sl], std_logp=splits[2][sl], argmax_match=splits[3][sl],
                answer_text=answers[position],
            ))
            offset += n
    return _gather(out)


def _prompt_ids(sample: dict) -> torch.Tensor:
    """The prompt tokens of a sample: its leading positions whose label is -100."""
    answer_positions = (sample["labels"] != IGNORE_INDEX).nonzero()
    end = int(answer_positions[0]) if len(answer_positions) else len(sample["labels"])
    return sample["input_ids"][:end]


@torch.inference_mode()
def generation_pass(model: torch.nn.Module, dataset: Any, tokenizer: Any, template_args: Any = None,
                    batch_size: int = 32, max_new_tokens: int = 200, stop_strings: Sequence[str] = ()) -> dict[int, dict]:
    """Greedy continuation of each prompt, cut at the end-of-answer token or a stop string.

    Returns per index ``{"input": question, "ground_truth": answer, "generation": text}`` (the first
    answer of a list). Sequences stop independently at their end token (KV cache, left padding).
    """
    template = PromptTemplate.from_config(template_args)
    stop_strings = list(stop_strings)
    if not template.apply_chat_template and template.asst_end_tag.strip(" "):
        stop_strings.append(template.asst_end_tag)  # base models: the tag that closes an answer
    stop_ids = sorted({answer_end_token_id(tokenizer, template), tokenizer.eos_token_id} - {None})
    device = _device(model)
    out: dict[int, dict] = {}
    prompts = {}
    for i in _shard(range(len(dataset))):
        item = dataset[i]
        prompts[i] = _prompt_ids(item[0] if isinstance(item, list) else item)
    ordered = sorted(prompts, key=lambda i: len(prompts[i]), reverse=True)
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start:start + batch_size]
        ids = pad_sequences([prompts[i] for i in chunk], tokenizer.pad_token_id, "left").to(device)
        attn = pad_sequences([torch.ones_like(prompts[i]) for i in chunk], 0, "left").to(device)
        generated = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(generated[:, ids.shape[1]:], skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            for stop in stop_strings:
                if stop and stop in text:
                    text = text.split(stop)[0]
            out[i] = {"input": dataset.rows[i][dataset.question_key], "ground_truth": _answers(dataset, i)[0],
                      "generation": text.strip()}
    return _gather(out)


def grad_norm_pass(model: torch.nn.Module, dataset: Any, tokenizer: Any) -> dict[int, float]:
    """Per index, the L2 norm of the gradient of the mean answer NLL w.r.t. all trainable weights.

    Uses ``torch.autograd.grad`` so the weights' ``.grad`` (e.g. a trainer's accumulators) stay untouched.
    """
    collate = DataCollatorForSupervisedDataset(tokenizer)
    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad] or list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    out: dict[int, float] = {}
    try:
        with torch.enable_grad():
            for i in _shard(range(len(dataset))):
                item = dataset[i]
                batch = collate([item[0] if isinstance(item, list) else item])
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
                labels = batch["labels"].to(device)
                loss = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                out[i] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return _gather(out)


__all__ = ["token_stats_pass", "generation_pass", "grad_norm_pass"]
