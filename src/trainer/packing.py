"""Packed rows (``trainer.args.pack_rows``): a batch's rows as a few padding-free sequences that
compute their common prompt prefix once.

A right-padded question-answer batch spends compute on two things no loss reads: the padding after
each short row, and the same leading tokens in every row (a chat template's system prompt and
header: 24 of SmolLM2's ~90-token TOFU rows). Packing lays the rows of a batch out as sequences of at
most ``PACKED_SEQUENCE_TOKENS`` tokens: the group's common prefix once, then each row's remaining
tokens, with

- position ids that continue each row from the prefix (``P, P+1, ...``), as in the padded row;
- an attention mask ``[S, 1, N, N]`` in which a query sees a key when the key is not after it and
  either belongs to the prefix or to the query's own row (and, where the batch carries a padding mask
  with holes, as ``compat=open_unlearning``'s does, the key is not masked there).

Every position a loss reads then has the hidden state of the padded forward pass (up to float
rounding: the sums run in another order), because it attends to exactly the same keys at the same
positions. Only the positions a loss reads are computed: a row's tokens after its last label are
never inputs whose output is needed (causal attention), so each row stops one token before its last
label. The layout is built on the host from the batch's token ids (on a GPU a device-to-host copy).

Attention costs ``N^2`` per packed sequence instead of ``L^2`` per row, so sequences are capped at
``PACKED_SEQUENCE_TOKENS``; a row longer than that gets a sequence of its own. A batch that packing
would shrink by less than 10 % (``PACKED_MAX_SHARE``: long raw-text chunks, which have neither
padding nor a shared prefix) runs padded. SDPA and eager attention take such a mask; flash attention
does not (``check_pack_rows``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data.collators import common_prefix_length
from model.forward import unwrap
from trainer.losses import IGNORE_INDEX

#: Longest packed sequence: attention over ``N`` packed tokens costs ``N^2`` (against ``L^2`` per row
#: padded); at 512 it stays a small share of the linear layers' cost for models of SmolLM2's width.
PACKED_SEQUENCE_TOKENS = 512
#: A batch runs packed only if that keeps at most this share of its padded tokens; otherwise (rows
#: without padding or a shared prefix) it runs padded, with attention's causal kernel.
PACKED_MAX_SHARE = 0.9
#: Attention implementations that accept an arbitrary ``[S, 1, N, N]`` mask.
PACKABLE_ATTENTION = ("sdpa", "eager")
PACK_ROWS_CHOICES = (True, False, "auto")


@dataclass(frozen=True)
class PackedLayout:
    """Where each (row, position) of a ``[B, L]`` batch sits in ``S`` packed sequences of ``N`` tokens.

    ``input_ids``/``position_ids`` ``[S, N]``; ``allowed`` ``[S, N, N]`` (query, key) bool;
    ``source`` ``[B, L]``: flat index into ``S * N`` of the packed position whose hidden state is that
    of (row, position), -1 where the position is not computed (after the row's last needed input).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    source: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def needed_inputs(labels: torch.Tensor) -> list[int]:
    """Per row, how many leading positions a next-token loss reads: the index of its last label
    (positions ``0..n-1`` predict labels ``1..n``); 0 for a row without labels."""
    has = labels != IGNORE_INDEX
    last = torch.where(has.any(-1), has.shape[1] - 1 - has.flip(-1).int().argmax(-1), torch.zeros_like(has[:, 0],
                       dtype=torch.long))
    return [int(n) for n in last.tolist()]


def _group_rows(keys: torch.Tensor, needed: list[int], max_tokens: int) -> list[tuple[list[int], int]]:
    """Rows (in order) in groups of at most ``max_tokens`` packed tokens: ``[(rows, prefix length)]``.
    ``keys`` ``[B, L]``: what two rows must agree on to share a position (token and key mask)."""
    groups: list[tuple[list[int], int]] = []
    rows: list[int] = []
    prefix = 0
    for row, n in enumerate(needed):
        if n == 0:
            continue
        if not rows:
            rows, prefix = [row], n
            continue
        candidate = min(prefix, common_prefix_length([keys[rows[0], :prefix], keys[row, :n]]))
        tokens = candidate + sum(needed[r] - candidate for r in rows) + n - candidate
        if tokens > max_tokens:
            groups.append((rows, prefix))
            rows, prefix = [row], n
        else:
            rows.append(row)
            prefix = candidate
    if rows:
        groups.append((rows, prefix))
    # A group of one row needs no shared prefix; several rows share at most what every row has.
    return [(g, p if len(g) > 1 else 0) for g, p in groups]


def pack_rows_layout(input_ids: torch.Tensor, labels: torch.Tensor, key_mask: torch.Tensor | None = None,
                     max_tokens: int = PACKED_SEQUENCE_TOKENS, pad_id: int = 0) -> PackedLayout:
    """The ``PackedLayout`` of a batch (host tensors; see the module docstring).

    ``key_mask`` ``[B, L]``: positions that later positions may attend to (a padding mask with holes);
    None: every position before a row's end. Rows are packed in order, a new sequence starting where the
    next row would take the current one past ``max_tokens``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = input_ids.detach().cpu()
    batch, length = ids.shape
    needed = needed_inputs(labels.detach().cpu())
    valid = key_mask.detach().cpu().bool() if key_mask is not None else torch.ones_like(ids, dtype=torch.bool)
    groups = _group_rows(ids * 2 + valid.long(), needed, max_tokens)  # the prefix must agree on both
    sizes = [p + sum(needed[r] - p for r in g) for g, p in groups]
    width = max(sizes, default=1)
    count = max(len(groups), 1)
    packed_ids = torch.full((count, width), pad_id, dtype=ids.dtype)
    positions = torch.zeros((count, width), dtype=torch.long)
    segment = torch.full((count, width), -2, dtype=torch.long)  # -1: the shared prefix, -2: padding
    key_ok = torch.zeros((count, width), dtype=torch.bool)
    source = torch.full((batch, length), -1, dtype=torch.long)
    for s, (rows, prefix) in enumerate(groups):
        base = s * width
        if prefix:
            packed_ids[s, :prefix] = ids[rows[0], :prefix]
            positions[s, :prefix] = torch.arange(prefix)
            segment[s, :prefix] = -1
            key_ok[s, :prefix] = valid[rows[0], :prefix]
        at = prefix
        for r in rows:
            own = needed[r] - prefix
            packed_ids[s, at:at + own] = ids[r, prefix:needed[r]]
            positions[s, at:at + own] = torch.arange(prefix, needed[r])
            segment[s, at:at + own] = r
            key_ok[s, at:at + own] = valid[r, prefix:needed[r]]
            source[r, :prefix] = base + torch.arange(prefix)
            source[r, prefix:needed[r]] = base + torch.arange(at, at + own)
            at += own
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (segment[:, None, :] == -1) | (segment[:, None, :] == segment[:, :, None])
    allowed = causal & same & key_ok[:, None, :] & (segment[:, :, None] != -2)
    # A query that may see no key (padding, or a masked start) attends to itself, so that attention
    # gives no NaN; no loss reads such a position.
    alone = ~allowed.any(-1)
    allowed |= alone[:, :, None] & torch.eye(width, dtype=torch.bool)
    return PackedLayout(packed_ids, positions, allowed, source)


def attention_implementation(model: torch.nn.Module) -> str | None:
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_attn_implementation", None)


def check_pack_rows(value: Any, model: torch.nn.Module | None = None) -> None:
    """ValueError naming the problem when ``pack_rows=value`` cannot run on ``model``."""
    if value not in PACK_ROWS_CHOICES or not isinstance(value, (bool, str)):
        raise ValueError(f"trainer.args.pack_rows={value!r}; valid: true, false, auto")
    if value is not True or model is None:
        return
    impl = attention_implementation(model)
    if impl not in PACKABLE_ATTENTION:
        raise ValueError(f"pack_rows=true needs attention that takes a 4-D mask ({', '.join(PACKABLE_ATTENTION)}); "
                         f"this model uses attn_implementation={impl!r}: set trainer.args.pack_rows=false "
                         "(or auto)")


def packs_rows(value: Any, model: torch.nn.Module) -> bool:
    """Whether ``pack_rows=value`` packs this model's batches: ``true``; ``auto`` on a CPU with SDPA or
    eager attention (where compute, not kernel launches, bounds a step; on a GPU it is still to be
    measured, so ``auto`` stays off there)."""
    if value == "auto":
        if attention_implementation(model) not in PACKABLE_ATTENTION:
            return False
        return next(unwrap(model).parameters()).device.type == "cpu"
    return bool(value)


def packed_attention_mask(allowed: torch.Tensor, model: torch.nn.Module, device: torch.device) -> torch.Tensor:
    """``allowed`` as the ``[S, 1, N, N]`` mask the model's attention takes: bool for SDPA (True =
    attend), additive float for eager."""
    mask = allowed[:, None].to(device)
    if attention_implementation(model) == "eager":
        dtype = next(unwrap(model).parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    return mask


__all__ = ["PACKED_SEQUENCE_TOKENS", "PACKED_MAX_SHARE", "PackedLayout", "needed_inputs", "common_prefix_length", "pack_rows_layout",
           "check_pack_rows", "packs_rows", "packed_attention_mask"]
