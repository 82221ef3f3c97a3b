"""Batch collation: padding of (nested) samples into tensors."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from data.utils import IGNORE_INDEX

_PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0}


def first_answer_position(labels: torch.Tensor) -> int:
    """The first position holding an answer label (not -100) in any row; the width if there is none."""
    positions = (labels != IGNORE_INDEX).any(0).nonzero()
    return int(positions[0]) if len(positions) else labels.shape[-1]


def answer_token_count(labels: torch.Tensor) -> int:
    """How many next-token targets of a batch are answer tokens: labels past position 0 that are not -100."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def common_prefix_length(rows: Sequence[Sequence[int] | torch.Tensor]) -> int:
    """Number of leading tokens that all ``rows`` share (system prompt, chat-template header); 0 for none."""
    if not rows:
        return 0
    shortest = min(len(r) for r in rows)
    if shortest == 0:
        return 0
    heads = torch.stack([torch.as_tensor(r[:shortest]) for r in rows])
    return int((heads == heads[0]).all(0).long().cumprod(0).sum())


def pad_sequences(seqs: Sequence[torch.Tensor], value: int, side: str) -> torch.Tensor:
    """Stack 1-D tensors into ``[B, max_len]``, filling with ``value`` on the ``side`` ('left'/'right')."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=seqs[0].dtype)
    for row, s in enumerate(seqs):
        if side == "right":
            out[row, : len(s)] = s
        else:
            out[row, width - len(s):] = s
    return out


def concat_batches(batches: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One right-padded batch holding the rows of ``batches`` in order (each right-padded itself).

    ``input_ids`` (padded with 0: the attention mask hides it), ``labels`` (-100) and
    ``attention_mask`` (0) are widened to the widest batch and concatenated; ``answer_start`` is the
    smallest of the batches' and ``answer_tokens`` their sum. Row ``i`` of batch ``k`` keeps its
    values, so per-row results of a model run on the joint batch equal those of separate runs (up to
    float rounding).
    """
    width = max(b["input_ids"].shape[1] for b in batches)
    pad_values = {"input_ids": 0, **_PAD_VALUES}
    joint = {}
    for key in ("input_ids", "labels", "attention_mask"):
        if key in batches[0]:
            joint[key] = torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=pad_values[key])
                                    for b in batches])
    starts = [b.get("answer_start") for b in batches]
    if all(s is not None for s in starts):
        joint["answer_start"] = min(int(s) for s in starts)
    counts = [b.get("answer_tokens") for b in batches]
    if all(c is not None for c in counts):
        joint["answer_tokens"] = sum(int(c) for c in counts)
    return joint


class DataCollatorForSupervisedDataset:
    """Pads ``input_ids`` (pad id), ``labels`` (-100) and ``attention_mask`` (0) of a batch of samples.

    Works on nested items: a dict of samples (``{"forget": ..., "retain": ...}``) gives a dict of
    batches, recursively. Items that are lists of samples (one per answer, e.g. perturbed answers) are
    flattened into one batch with a ``group`` tensor giving, for every row, the position of its question
    in the batch. The attention mask is carried from the samples (1 on every real token), never
    recomputed from ``input_ids != pad_token_id``: the pad id often equals EOS, which appears inside
    samples too.

    A right-padded batch also carries ``answer_start`` (an int: the first position with an answer
    label in any row), so trainers can skip the prompts in the output layer without reading the
    labels back from the GPU (``model.forward.answer_span_logits``). Its presence also tells
    trainers that the batch is right-padded, so its forward pass needs no attention mask
    (``model.forward.model_inputs``): a collator that pads differently must not set it.
    ``answer_tokens`` (an int) counts the batch's answer targets (labels past position 0 that are not
    -100), so the hidden-state NLL paths can gather them without reading the labels back either.

    Args:
        tokenizer: gives the pad id.
        padding_side: "right" for training, "left" for batched generation.
        index: keep each sample's dataset index as an ``index`` tensor.
        attention_mask_from_pad: ``compat=open_unlearning``'s mask, ``input_ids != pad_token_id``: it also
            hides every real token equal to the pad id (SmolLM2's pad is its ``<|im_end|>``). Such a batch
            carries no ``answer_start``, so trainers pass the mask to the model.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, padding_side: str = "right", index: bool = False,
                 attention_mask_from_pad: bool = False):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}; valid: 'left', 'right'")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token id")
        self.pad_id, self.padding_side, self.index = tokenizer.pad_token_id, padding_side, index
        self.attention_mask_from_pad = attention_mask_from_pad

    def __call__(self, items: Sequence[Any]) -> dict[str, Any]:
        first = items[0]
        if isinstance(first, Mapping) and "input_ids" not in first:
            return {key: self([item[key] for item in items]) for key in first}
        if isinstance(first, list):
            flat = [sample for group in items for sample in group]
            batch = self(flat)
            batch["group"] = torch.tensor([g for g, group in enumerate(items) for _ in group], dtype=torch.long)
            return batch
        batch = {
            key: pad_sequences([item[key] for item in items], _PAD_VALUES.get(key, self.pad_id), self.padding_side)
            for key in ("input_ids", "labels", "attention_mask")
            if key in first
        }
        if self.index and "index" in first:
            batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        if self.attention_mask_from_pad:
            batch["attention_mask"] = batch["input_ids"].ne(self.pad_id).long()
            return batch
        if "labels" in batch and self.padding_side == "right":
            batch["answer_start"] = first_answer_position(batch["labels"])
            batch["answer_tokens"] = answer_token_count(batch["labels"])
        return batch


class DataCollatorForSupervisedDatasetWithIndices(DataCollatorForSupervisedDataset):
    """``DataCollatorForSupervisedDataset`` that also returns each sample's dataset ``index``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, padding_side: str = "right", index: bool = True,
                 attention_mask_from_pad: bool = False):
        super().__init__(tokenizer, padding_side=padding_side, index=index, attention_mask_from_pad=attention_mask_from_pad)
