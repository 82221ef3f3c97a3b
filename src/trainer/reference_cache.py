"""Reference-model answer NLLs computed once before training and looked up by sample content.

NPO, DPO and AltPO compare each forget answer's summed NLL ``S`` under the model being trained with
``S_ref`` under the frozen model from before unlearning. ``S_ref`` depends only on the sample's
tokens, so it is computed for every forget sample in one inference pass before the first step,
instead of one reference forward pass per step and epoch; the losses are the same (up to
floating-point rounding from different padding), and when nothing else needs the reference model it
is freed (one model in memory instead of two).

Samples are keyed by their content, not their dataset index: the real tokens and their labels, so
the original and the alternate answer of a DPO pair, or the same question in two datasets, never
collide, and no index has to travel through the data pipeline. The trainer's collator computes the
keys on the host as it builds each batch (``KeyedCollator``), so a lookup reads nothing back from the
GPU.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from core.compute import add_tokens, mask_tokens
from data.collators import Parts
from model.forward import answer_span_logits
from progress import progress_over
from trainer.losses import sequence_nll


def sample_key(input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> bytes:
    """A 16-byte digest of one sample's real tokens (attention mask 1) and their labels."""
    if attention_mask is not None:
        real = attention_mask.bool()
        input_ids, labels = input_ids[real], labels[real]
    data = torch.stack([input_ids.long(), labels.long()]).cpu().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


def batch_keys(batch: Mapping[str, Any]) -> list[bytes]:
    """``sample_key`` of every row of a collated batch, computed from its tokens (read on the host)."""
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    mask = batch.get("attention_mask")
    mask = mask.cpu() if mask is not None else torch.ones_like(ids)
    return [sample_key(i, lab, m) for i, lab, m in zip(ids, labels, mask)]


def leaf_samples(item: Any) -> Iterator[dict]:
    """The samples (dicts with ``input_ids``) inside a dataset item: itself, or those of a pair/list."""
    if isinstance(item, Parts):
        for value in item.values():
            yield from leaf_samples(value)
    elif isinstance(item, Mapping):
        yield item
    elif isinstance(item, (list, tuple)):
        for value in item:
            yield from leaf_samples(value)


def add_sample_keys(batch: Any) -> Any:
    """``batch`` with ``sample_keys`` (a list of ``sample_key``) added to every (nested) batch of samples.

    Run by the collator, on the host, so that ``ReferenceNLLCache.lookup`` never has to read a
    batch's tokens back from the GPU (a synchronisation per step). The keys are bytes, which the
    Trainer's move of the batch to the device leaves as they are.
    """
    if isinstance(batch, Parts):
        return Parts({key: add_sample_keys(value) for key, value in batch.items()})
    if isinstance(batch, Mapping):
        return {**batch, "sample_keys": batch_keys(batch)}
    return batch


class KeyedCollator:
    """A collator whose batches carry ``sample_keys`` (``add_sample_keys``); other attributes pass through."""

    def __init__(self, collate: Callable[[list], Any]):
        self.collate = collate

    def __call__(self, items: list) -> Any:
        return add_sample_keys(self.collate(items))

    def __getattr__(self, name: str) -> Any:
        if name == "collate":  # not set yet (unpickling in a data-loader worker): no recursion
            raise AttributeError(name)
        return getattr(self.collate, name)


class ReferenceNLLCache:
    """``S_ref`` per sample, filled by ``fill`` (or ``store``), read by ``lookup``."""

    def __init__(self) -> None:
        self.values: dict[bytes, float] = {}

    def __len__(self) -> int:
        return len(self.values)

    def store(self, keys: Sequence[bytes], nll: torch.Tensor) -> None:
        """Record ``S_ref`` of the rows whose ``sample_key`` are ``keys``."""
        values = nll.detach().float().cpu().tolist()
        if len(values) != len(keys):
            raise ValueError(f"{len(keys)} sample keys for {len(values)} reference NLLs")
        self.values.update(zip(keys, values))

    def lookup(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """``S_ref [B]`` (float32, on the batch's device) if every row is cached, else None. The batch must carry
        the ``sample_keys`` its collator made (``KeyedCollator``), so that no token is read back from the device."""
        keys = batch.get("sample_keys")
        if keys is None:
            raise ValueError("the batch has no sample_keys: with precomputed reference values its collator must be "
                             "wrapped in trainer.reference_cache.KeyedCollator (UnlearningTrainer does so)")
        try:
            values = [self.values[k] for k in keys]
        except KeyError:
            return None
        return torch.tensor(values, dtype=torch.float32, device=batch["input_ids"].device)

    @torch.no_grad()  # not inference_mode: FSDP2 keeps buffers from its forward that training then updates
    def fill(self, model: torch.nn.Module, samples: Sequence[dict], collate: Callable[[list], dict],
             batch_size: int, device: torch.device | str, num_batches: int | None = None) -> None:
        """Compute ``S_ref`` of ``samples`` with ``model``, batches of ``batch_size`` sorted by length.

        ``num_batches`` (a sharded model, whose forward is a collective call): run exactly that many
        forward passes, the extra ones on the last batch again, their results not stored, so that every
        process makes the same number of calls."""
        order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]), reverse=True)
        starts = list(range(0, len(order), batch_size))
        total = len(starts) if num_batches is None else num_batches
        if total and not starts:
            raise ValueError(f"num_batches={num_batches} forward passes asked for, but there are no samples to run")
        if total < len(starts):
            raise ValueError(f"num_batches={num_batches} is fewer than the {len(starts)} batches of {len(samples)} samples")
        for step in progress_over(range(total), "reference log-probs", unit="batch"):
            start = starts[min(step, len(starts) - 1)]
            batch = collate([samples[i] for i in order[start:start + batch_size]])
            keys = batch_keys(batch)  # on the host, before the move
            add_tokens(model, mask_tokens(batch))  # a forward pass, for the cost record
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            nll = sequence_nll(*answer_span_logits(model, batch))[0]
            if step < len(starts):
                self.store(keys, nll)


__all__ = ["ReferenceNLLCache", "sample_key", "batch_keys", "add_sample_keys", "KeyedCollator", "leaf_samples"]
