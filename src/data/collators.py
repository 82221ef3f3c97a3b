"""Batch collation: padding of (nested) samples into tensors, and the contracts of a collated batch.

- A dataset item is a sample (a mapping with ``input_ids``, ``labels``, ``attention_mask``), a list of
  samples (one per answer), or ``Parts``: named parts collated one by one (``{"forget": ..., "retain":
  ...}``, ``{"original": ..., "alternate": ...}``). Anything else is refused with the keys it has.
- A collated batch of samples carries a ``BatchLayout`` under ``"layout"``: its padding side, whether
  its attention mask hides padding only, and where its answers start. Code that runs a model on the
  batch reads these fields (``batch_layout``), never the presence of a key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from data.utils import IGNORE_INDEX

_PAD_VALUES = {"labels": IGNORE_INDEX, "attention_mask": 0}
PADDING_SIDES = ("left", "right")
#: The key of a collated batch that holds its ``BatchLayout``.
LAYOUT_KEY = "layout"
#: The tensors of a sample that the collator pads.
SAMPLE_TENSORS = ("input_ids", "labels", "attention_mask")


class Parts(dict):
    """A dataset item, or a batch, made of named parts collated one by one: ``Parts(forget=..., retain=...)``
    (``data.unlearn.ForgetRetainDataset``), ``Parts(original=..., alternate=...)`` (a question with its true and
    its alternate or refusal answer). A plain dict is a sample; the type, not the keys, says which is which."""


@dataclass(frozen=True)
class BatchLayout:
    """What a collated batch of samples is, beyond its tensors (``batch["layout"]``, set by the collator).

    Attributes:
        padding_side: ``right`` (training, teacher forcing) or ``left`` (batched generation).
        mask_hides_padding_only: the attention mask is 1 on every real token and 0 on padding only (ours);
            False for a mask that also hides real tokens (``attention_mask_from_pad``).
        answer_start: the first position holding an answer label in any row (the width if none), known on
            the host; None for a batch without labels.
        answer_tokens: how many next-token targets are answer tokens (labels past position 0 that are not
            -100); None for a batch without labels.
    """

    padding_side: str
    mask_hides_padding_only: bool = True
    answer_start: int | None = None
    answer_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"BatchLayout.padding_side={self.padding_side!r}; valid: {', '.join(PADDING_SIDES)}")

    @property
    def causal_attention_suffices(self) -> bool:
        """Whether the model may run without the attention mask (``model.forward.model_inputs``).

        With right padding every padding position comes after the real tokens of its row, so causal
        attention alone keeps real positions from seeing it (position ids count from 0 either way): every
        real position gets the value it gets with the mask. That holds only when the mask hides padding
        and nothing else."""
        return self.padding_side == "right" and self.mask_hides_padding_only


def layout_of(labels: torch.Tensor | None, padding_side: str = "right",
              mask_hides_padding_only: bool = True) -> BatchLayout:
    """The ``BatchLayout`` of a batch with these (host) ``labels``: its answer span read from them."""
    if labels is None:
        return BatchLayout(padding_side, mask_hides_padding_only)
    return BatchLayout(padding_side, mask_hides_padding_only, first_answer_position(labels), answer_token_count(labels))


def batch_layout(batch: Mapping[str, Any]) -> BatchLayout:
    """The ``BatchLayout`` of a collated batch; ValueError when the batch has none (it did not come from a
    collator of this module and was not given one)."""
    layout = batch.get(LAYOUT_KEY) if isinstance(batch, Mapping) else None
    if not isinstance(layout, BatchLayout):
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"a batch of samples must carry its layout (batch['layout'], a data.collators.BatchLayout: "
                         f"padding side, mask, answer span); this one has {keys}. Collate samples with "
                         "DataCollatorForSupervisedDataset, or build the field with data.collators.layout_of(labels)")
    return layout


def relabelled(batch: Mapping[str, Any], labels: torch.Tensor) -> dict[str, Any]:
    """``batch`` with new ``labels`` and the answer span of its layout recomputed from them (a method that
    changes labels after collation must go through this: the layout's answer counts would be stale)."""
    layout = batch_layout(batch)
    fresh = layout_of(labels.cpu(), layout.padding_side, layout.mask_hides_padding_only)
    return {**batch, "labels": labels, LAYOUT_KEY: fresh}


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
    ``attention_mask`` (0) are widened to the widest batch and concatenated; the layout's
    ``answer_start`` is the smallest of the batches' and ``answer_tokens`` their sum. Row ``i`` of
    batch ``k`` keeps its values, so per-row results of a model run on the joint batch equal those of
    separate runs (up to float rounding). Batches padded on the left, or with masks of different kinds,
    cannot be joined this way: ValueError.
    """
    layouts = [batch_layout(b) for b in batches]
    if any(layout.padding_side != "right" for layout in layouts) or \
            len({layout.mask_hides_padding_only for layout in layouts}) != 1:
        raise ValueError(f"concat_batches joins right-padded batches whose masks are of one kind; got {layouts}")
    width = max(b["input_ids"].shape[1] for b in batches)
    pad_values = {"input_ids": 0, **_PAD_VALUES}
    joint: dict[str, Any] = {}
    for key in SAMPLE_TENSORS:
        present = [key in b for b in batches]
        if any(present) and not all(present):
            raise ValueError(f"concat_batches: {key} is in some batches and not in others")
        if all(present):
            joint[key] = torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=pad_values[key])
                                    for b in batches])
    starts, counts = [layout.answer_start for layout in layouts], [layout.answer_tokens for layout in layouts]
    joint[LAYOUT_KEY] = BatchLayout("right", layouts[0].mask_hides_padding_only,
                                    None if None in starts else min(starts), None if None in counts else sum(counts))
    return joint


class DataCollatorForSupervisedDataset:
    """Pads ``input_ids`` (pad id), ``labels`` (-100) and ``attention_mask`` (0) of a batch of samples.

    Works on nested items: a dict of samples (``{"forget": ..., "retain": ...}``) gives a dict of
    batches, recursively. Items that are lists of samples (one per answer, e.g. perturbed answers) are
    flattened into one batch with a ``group`` tensor giving, for every row, the position of its question
    in the batch. The attention mask is carried from the samples (1 on every real token), never
    recomputed from ``input_ids != pad_token_id``: the pad id often equals EOS, which appears inside
    samples too.

    Every batch of samples carries its ``BatchLayout`` (``batch["layout"]``): the padding side, whether
    the mask hides padding only, ``answer_start`` (the first position with an answer label in any row,
    so trainers skip the prompts in the output layer without reading the labels back from the GPU:
    ``model.forward.answer_span_logits``) and ``answer_tokens`` (the batch's answer targets, so the
    hidden-state NLL paths gather them without a read-back either).

    Args:
        tokenizer: gives the pad id.
        padding_side: "right" for training, "left" for batched generation.
        index: keep each sample's dataset index as an ``index`` tensor.
        attention_mask_from_pad: open-unlearning's mask, ``input_ids != pad_token_id``: it also
            hides every real token equal to the pad id (SmolLM2's pad is its ``<|im_end|>``). The layout
            says so (``mask_hides_padding_only=False``), so trainers pass the mask to the model.
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
        if isinstance(first, Parts):
            return Parts({key: self([item[key] for item in items]) for key in first})
        if isinstance(first, list):
            flat = [sample for group in items for sample in group]
            batch = self(flat)
            batch["group"] = torch.tensor([g for g, group in enumerate(items) for _ in group], dtype=torch.long)
            return batch
        if not isinstance(first, Mapping) or "input_ids" not in first:
            shape = sorted(first) if isinstance(first, Mapping) else type(first).__name__
            raise ValueError(f"a dataset item must be a sample (a mapping with input_ids, labels, attention_mask), a "
                             f"list of samples, or data.collators.Parts of those; got {shape}")
        batch: dict[str, Any] = {
            key: pad_sequences([item[key] for item in items], _PAD_VALUES.get(key, self.pad_id), self.padding_side)
            for key in SAMPLE_TENSORS
            if key in first
        }
        if self.index and "index" in first:
            batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.long)
        if self.attention_mask_from_pad:
            batch["attention_mask"] = batch["input_ids"].ne(self.pad_id).long()
        batch[LAYOUT_KEY] = layout_of(batch.get("labels"), self.padding_side,
                                      mask_hides_padding_only=not self.attention_mask_from_pad)
        return batch


class DataCollatorForSupervisedDatasetWithIndices(DataCollatorForSupervisedDataset):
    """``DataCollatorForSupervisedDataset`` that also returns each sample's dataset ``index``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, padding_side: str = "right", index: bool = True,
                 attention_mask_from_pad: bool = False):
        super().__init__(tokenizer, padding_side=padding_side, index=index, attention_mask_from_pad=attention_mask_from_pad)
