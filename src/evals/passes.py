"""Model passes of an evaluation: each runs once per (dataset, answer key) and feeds every metric.

- ``token_stats_passes``: teacher-forced forward passes giving, per answer token, its log-prob, the
  mean and std of log p under the model's own next-token distribution (Min-K%++) and whether the
  argmax prediction is exact (EM, ES), for one dataset or several asking the same questions.
  Probability, truth ratio, model utility, LOSS/ZLib/Min-K/Min-K%++ attacks all come from it.
- ``generation_pass``: greedy generation from the prompts (ROUGE), batched with left padding.
- ``grad_norm_pass``: per-sample gradient norm of the mean answer NLL (GradNorm attack).

Batches are formed from samples sorted by length (less padding); with several processes each rank
takes a strided shard and the results are gathered, so every rank ends with the full result.

``plain_token_stats_pass`` and ``plain_generation_pass`` compute the same results without the speed
tricks (whole-row forwards over the full sequence, ``model.generate``, fixed batches in dataset order):
the reference the fast passes are tested against, and what runs with ``eval.<bench>.passes=plain``, for a
model sharded over the processes (its forwards stay in lockstep), and with open-unlearning's numerics
(``PlainPassOptions``: its mask, float32 log-probabilities in its batch layout, stop rule and ROUGE texts).
``evals.runners`` picks one of the two for each pass.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from checks import check_bool
from core.compute import add_tokens, mask_tokens
from core.distributed import gather_dicts, is_sharded, lockstep_total, rank_shard
from data.collators import DataCollatorForSupervisedDataset, common_prefix_length, pad_sequences
from data.utils import IGNORE_INDEX, PromptTemplate, answer_end_token_id
from evals.metrics import TokenStats
from model.forward import answer_span_logits, forward_accepts
from progress import progress, progress_over

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlainPassOptions:
    """How the plain passes compute (``eval.<bench>.plain_pass_options``; all False: ours). Each True is one of
    open-unlearning's conventions, which ``compat=open_unlearning`` sets (docs/evaluation.md, "Differences
    from open-unlearning", says which is right and what each changes).

    Attributes:
        attention_mask_from_pad: the attention mask is ``input_ids != pad id``, which also hides in-prompt
            tokens equal to the pad id (SmolLM2's ``<|im_end|>``); ours: 1 on every real token.
        float32_log_probs: log-probabilities in float32, from a cross-entropy over ``[B, V, L]`` logits in
            open-unlearning's batches (items, then one batch per answer position), whose rounding depends
            on that layout; ours: float64, by row.
        generation_stops_at_eos_only: a base model's generation is not cut at the tag closing an answer
            (``template_args.asst_end_tag``), only at EOS and the configured stop strings; ours cuts it.
        rouge_texts_from_tokens: ROUGE's ground truth is the decoded sample minus the decoded prompt and
            ``input`` the decoded prompt (tokenization spaces cleaned up); ours: the dataset's strings.
    """

    attention_mask_from_pad: bool = False
    float32_log_probs: bool = False
    generation_stops_at_eos_only: bool = False
    rouge_texts_from_tokens: bool = False

    @classmethod
    def from_config(cls, cfg: Any, owner: str) -> PlainPassOptions:
        """The options of ``eval.<bench>.plain_pass_options`` (a mapping of the fields above; null: all False);
        an unknown key or a non-boolean value is a BadValueError naming it."""
        cfg = dict(cfg or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(valid))
        if unknown:
            raise ValueError(f"{owner}.plain_pass_options: unknown option(s) {unknown}; valid: {', '.join(valid)}")
        return cls(**{k: check_bool(f"plain_pass_options.{k}", v, owner=owner) for k, v in cfg.items()})

    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def as_dict(self) -> dict[str, bool]:
        return asdict(self)


OURS = PlainPassOptions()


def _answers(dataset: Any, index: int) -> list[str]:
    """The answer texts of item ``index``, one per sample (the dataset's ``answer_texts``)."""
    return dataset.answer_texts(index)


def _ends_with_eos(dataset: Any) -> bool:
    """Whether the dataset's samples end with an end-of-answer token (``last_token_is_eos``, checked)."""
    value = getattr(dataset, "last_token_is_eos", None)
    if not isinstance(value, bool):
        raise TypeError(f"dataset {getattr(dataset, 'name', type(dataset).__name__)} has no boolean "
                        "last_token_is_eos; every evaluation dataset must say whether its last token is an EOS")
    return value


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _count(model: torch.nn.Module, batch: dict, backward: bool = False) -> None:
    """The non-padding tokens of a collated batch (its attention mask, on the host), for the cost record."""
    add_tokens(model, mask_tokens(batch), backward=backward)


def answer_logits(model: torch.nn.Module, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token logits aligned with their target labels, the output layer skipping the prompts.

    Returns ``(logits [B, L', V], labels [B, L'])`` where ``logits[:, j]`` predicts ``labels[:, j]``:
    ``model.forward.answer_span_logits`` (the output layer, often the largest matrix product of a
    small model, runs only from the first position that predicts an answer token in any row), shifted
    by one. The values are those of a full forward pass.
    """
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    logits, labels = answer_span_logits(model, batch)
    return logits[:, :-1], labels[:, 1:]


def answer_token_stats(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None,
                       rows: torch.Tensor | None = None, moments: bool = True) -> tuple[torch.Tensor | None, ...]:
    """Per answer token: ``(log p(target), E_p[log p], std_p[log p], argmax == target)`` from ``[N, V]`` logits.

    ``log p = logits - logsumexp(logits)``; the mean and standard deviation of ``log p(v)`` under
    ``v ~ p`` are those of Min-K%++ (Zhang et al. 2024, arXiv:2404.02936); ``moments=False`` skips them
    (None in their places). ``rows`` (optional) selects the rows of ``logits`` to score, ``targets``
    having one entry per selected row.

    The rows are processed ``chunk_rows`` at a time (default: 32 on a CPU, where a ``[32, V]`` block
    stays in the cache across the passes below, 1024 elsewhere). With ``z`` the logits minus their
    maximum, ``e = exp(z)`` and ``s = sum(e)``: ``log p = z - log s``, ``E_p[log p] = e.z / s - log s``,
    and the variance is taken in two passes, ``e.(z - e.z/s)^2 / s`` (``E[x^2] - E[x]^2`` would lose
    the digits of a flat distribution).
    """
    if chunk_rows is None:
        chunk_rows = 32 if logits.device.type == "cpu" else 1024
    count = logits.shape[0] if rows is None else rows.shape[0]
    parts: list[list[torch.Tensor]] = [[], [], [], []]
    for start in range(0, count, chunk_rows):
        if rows is None:
            block = logits[start:start + chunk_rows].float()
        else:
            block = logits.index_select(0, rows[start:start + chunk_rows]).float()
        target = targets[start:start + chunk_rows].unsqueeze(-1)
        shifted = block - block.amax(-1, keepdim=True)  # exactly 0 at the maximum
        target_shifted = shifted.gather(-1, target)
        # argmax == target without an argmax (several times slower than amax on a CPU): the target
        # holds the maximum (0) and no other token does; on a tie, argmax's first-index rule decides.
        shifted.scatter_(-1, target, float("-inf"))
        runner_up = shifted.amax(-1)
        shifted.scatter_(-1, target, target_shifted)
        target_shifted, target = target_shifted.squeeze(-1), target.squeeze(-1)
        match = (target_shifted == 0) & (runner_up < 0)
        tied = ((target_shifted == 0) & (runner_up == 0)).nonzero().squeeze(-1)
        if len(tied):
            match[tied] = block[tied].argmax(-1) == target[tied]
        weights = shifted.exp()
        total = weights.sum(-1)
        log_total = total.log()
        values = [target_shifted - log_total, None, None, match]
        if moments:
            mean_shifted = torch.linalg.vecdot(weights, shifted) / total
            deviation_sq = shifted.sub_(mean_shifted.unsqueeze(-1)).square_()
            variance = torch.linalg.vecdot(weights, deviation_sq) / total
            values[1:3] = mean_shifted - log_total, variance.sqrt()
        for out, value in zip(parts, values):
            out.append(value)
    if not parts[0]:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty, empty if moments else None, empty if moments else None, torch.zeros(0, dtype=torch.bool)
    return tuple(None if p[0] is None else torch.cat(p) for p in parts)


def _split_prompt(sample: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prompt ids, answer ids, answer labels)`` of one sample: the prompt is its leading -100 labels."""
    labels = sample["labels"]
    answer = (labels != IGNORE_INDEX).nonzero()
    cut = int(answer[0]) if len(answer) else len(labels)
    cut = max(cut, 1)  # a prompt of at least one token carries the first answer prediction
    return sample["input_ids"][:cut], sample["input_ids"][cut:], labels[cut:]


RowStats = tuple  # (logp, mean_logp, std_logp, argmax_match) numpy arrays of one sample's answer tokens


def _row_stats(logits: torch.Tensor, labels: torch.Tensor, moments: bool = True) -> list[RowStats]:
    """``answer_token_stats`` of every row of ``(logits [R, L, V], labels [R, L])``, split per row."""
    mask = labels != IGNORE_INDEX
    rows = mask.flatten().nonzero().squeeze(-1)
    arrays = [None if t is None else t.cpu().numpy()
              for t in answer_token_stats(logits.flatten(0, 1), labels[mask], rows=rows, moments=moments)]
    out, offset = [], 0
    for n in mask.sum(-1).tolist():
        out.append(tuple(None if a is None else a[offset:offset + n] for a in arrays))
        offset += n
    return out


def _join_stats(head: RowStats, tail: RowStats) -> RowStats:
    """The statistics of a row's first tokens followed by those of the rest."""
    return tuple(None if a is None else np.concatenate([a, b]) for a, b in zip(head, tail))


def _chunks(order: Sequence[int], size: int) -> list[Sequence[int]]:
    return [order[k:k + size] for k in range(0, len(order), size)]


def _whole_row_stats(model: torch.nn.Module, samples: Sequence[dict], collate: Any, device: torch.device,
                     rows_per_forward: int, moments: bool = True) -> list[RowStats]:
    """Statistics of each sample from full forward passes of length-sorted chunks of rows."""
    result: list[Any] = [None] * len(samples)
    order = sorted(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]), reverse=True)
    for chunk in _chunks(order, rows_per_forward):
        batch = collate([samples[i] for i in chunk])
        _count(model, batch)
        logits, labels = answer_logits(model, batch, device)
        for i, stats in zip(chunk, _row_stats(logits, labels, moments)):
            result[i] = stats
    return result


def _runs_on_a_kv_cache(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes what the cached passes pass it (cache, positions, logits_to_keep)."""
    return forward_accepts(model, "past_key_values", "position_ids", "use_cache", "logits_to_keep")


def _plain_dynamic_cache(cache: Any) -> bool:
    """Whether every layer of ``cache`` is a plain ``DynamicLayer`` (no sliding window, no recurrent state)."""
    layers = getattr(cache, "layers", None)
    return isinstance(cache, DynamicCache) and bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def prefill_prompts(model: torch.nn.Module, prompts: Sequence[torch.Tensor],
                    device: torch.device) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Run prompts with a KV cache, the tokens they all start with only once.

    Returns ``(last_logits [B, V], cache, attention_mask [B, L])``. The shared leading tokens (at most
    all but the last token of the shortest prompt) run once as a single row whose cache is repeated
    for every prompt; the rests run left-padded after it, so a row reads ``prefix, padding, rest``
    with the padding masked and positions counted over real tokens only: the values are those of each
    prompt run alone, up to floating-point rounding. Without a shared prefix, with one prompt, or for a
    model whose cache is not made of plain ``DynamicLayer`` s (a sliding window counts cache slots,
    padding included), the prompts simply run left-padded.
    """
    shared = common_prefix_length(prompts) if len(prompts) > 1 else 0
    shared = min(shared, min(len(p) for p in prompts) - 1)
    cache = None
    if shared > 0:
        cache = model(input_ids=prompts[0][:shared].unsqueeze(0).to(device), use_cache=True,
                      logits_to_keep=1).past_key_values
        add_tokens(model, shared)
        if _plain_dynamic_cache(cache):
            cache.batch_repeat_interleave(len(prompts))
        else:
            shared, cache = 0, None
    rests = [p[shared:] for p in prompts]
    add_tokens(model, sum(len(r) for r in rests))
    ids = pad_sequences(rests, 0, "left").to(device)  # padding is masked: any valid id will do
    mask = pad_sequences([torch.ones_like(r) for r in rests], 0, "left").to(device)
    mask = torch.cat([mask.new_ones(len(prompts), shared), mask], dim=-1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    return out.logits[:, -1], out.past_key_values, mask


def answer_stems(answers: Sequence[Sequence[int]], groups: Sequence[int]) -> list[int]:
    """Per answer: how many of its leading tokens it shares with another answer to the same prompt.

    ``groups[i]`` names the prompt of ``answers[i]``. The stem of an answer is its longest common
    prefix with any other answer of its group, at most all but its last token (the rest then has a
    token to score on top of the stem). 0 where no other answer starts like it.
    """
    by_group: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    stems = [0] * len(answers)
    for members in by_group.values():
        for i in members:
            best = max((common_prefix_length([answers[i], answers[j]]) for j in members if j != i), default=0)
            stems[i] = min(best, max(len(answers[i]) - 1, 0))
    return stems


class _CachedRows:
    """Rows already run with a KV cache: per layer ``(keys, values)``, their attention mask, and the
    logits at each row's last real position (the prediction of the token that follows it)."""

    def __init__(self, cache: Any, mask: torch.Tensor, last_logits: torch.Tensor) -> None:
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        self.mask, self.lengths, self.last_logits = mask, mask.sum(-1), last_logits

    def run_after(self, model: torch.nn.Module, rows: torch.Tensor, inputs: Sequence[torch.Tensor]) -> tuple:
        """Forward of the token rows ``inputs`` (right-padded) after the cached rows ``rows``.

        Returns ``(logits [R, W, V], attention mask [R, L + W], cache)``; positions continue from each
        parent row's real length. An empty input gets one masked-in dummy token whose outputs are
        ignored (a row with nothing to attend to would give NaN)."""
        ids = pad_sequences([t if len(t) else torch.zeros(1, dtype=torch.long) for t in inputs], 0, "right")
        add_tokens(model, sum(max(len(t), 1) for t in inputs))
        ids = ids.to(rows.device)
        mask = pad_sequences([torch.ones(max(len(t), 1), dtype=torch.long) for t in inputs], 0, "right").to(rows.device)
        positions = self.lengths[rows].unsqueeze(-1) + torch.arange(ids.shape[1], device=rows.device)
        cache = DynamicCache()
        for layer_index, (keys, values) in enumerate(self.layers):
            cache.update(keys[rows], values[rows], layer_index)
        full_mask = torch.cat([self.mask[rows], mask], dim=-1)
        out = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                    use_cache=True)
        return out.logits, full_mask, out.past_key_values


def _score_after(model: torch.nn.Module, parent: _CachedRows, parents: Sequence[int], answers: Sequence[torch.Tensor],
                 labels: Sequence[torch.Tensor], rows_per_forward: int, device: torch.device,
                 moments: bool = True) -> list[RowStats]:
    """Statistics of each answer run after its parent cached row, in length-sorted chunks of rows.

    The first answer token's prediction is the parent's last logit; an answer's last token predicts
    nothing, so it is not run."""
    result: list[Any] = [None] * len(answers)
    order = sorted(range(len(answers)), key=lambda i: len(answers[i]), reverse=True)
    for chunk in _chunks(order, rows_per_forward):
        rows = torch.tensor([parents[i] for i in chunk], device=device)
        targets = pad_sequences([labels[i] if len(labels[i]) else torch.full((1,), IGNORE_INDEX) for i in chunk],
                                IGNORE_INDEX, "right").to(device)
        logits = parent.last_logits[rows].unsqueeze(1)
        if targets.shape[1] > 1:
            rest, _, _ = parent.run_after(model, rows, [answers[i][:-1] for i in chunk])
            logits = torch.cat([logits, rest[:, :targets.shape[1] - 1]], dim=1)
        for i, stats in zip(chunk, _row_stats(logits, targets, moments)):
            result[i] = stats
    return result


def _shared_prompt_stats(model: torch.nn.Module, samples: Sequence[dict], device: torch.device,
                         rows_per_forward: int, share_answer_prefixes: bool = True, moments: bool = True
                         ) -> list[RowStats] | None:
    """Statistics of each sample with every distinct prompt run once (None: the model's cache cannot be split).

    The distinct prompts run together with a KV cache (``prefill_prompts``: their common leading
    tokens once, the rests left-padded, positions counted over real tokens). With
    ``share_answer_prefixes``, the leading answer tokens several answers to one prompt share (their
    ``answer_stems``: "The author's full name is" of five perturbed names) then run once per distinct
    stem on top of the prompt's cache rows; every answer's remaining tokens run, sorted by length,
    in chunks of ``rows_per_forward`` rows on top of its stem's (or its prompt's) cache rows. The
    values equal those of a full forward pass of each prompt + answer, up to floating-point rounding
    (attention sums run in another order).
    """
    prompts: dict[tuple, int] = {}
    group, answers, answer_labels = [], [], []
    for sample in samples:
        prompt, answer, labels = _split_prompt(sample)
        group.append(prompts.setdefault(tuple(prompt.tolist()), len(prompts)))
        answers.append(answer)
        answer_labels.append(labels)
    first_logits, cache, p_mask = prefill_prompts(model, [torch.tensor(p, dtype=torch.long) for p in prompts], device)
    if not _plain_dynamic_cache(cache):
        return None  # e.g. sliding-window layers: run whole rows instead
    prompt_rows = _CachedRows(cache, p_mask, first_logits)
    stems = [0] * len(samples)
    if share_answer_prefixes:
        # only tokens that are their own labels can be shared (a stem's targets are its tokens)
        tokens = [a.tolist() if torch.equal(a, lab) else [] for a, lab in zip(answers, answer_labels)]
        stems = answer_stems(tokens, group)
    result: list[Any] = [None] * len(samples)
    direct = [i for i, n in enumerate(stems) if n == 0]
    for i, stats in zip(direct, _score_after(model, prompt_rows, [group[i] for i in direct],
                                             [answers[i] for i in direct], [answer_labels[i] for i in direct],
                                             rows_per_forward, device, moments)):
        result[i] = stats
    distinct: dict[tuple, int] = {}
    stem_of = {i: distinct.setdefault((group[i], tuple(answers[i][:n].tolist())), len(distinct))
               for i, n in enumerate(stems) if n}
    keys = sorted(distinct, key=lambda k: len(k[1]), reverse=True)
    for stem_chunk in _chunks(keys, rows_per_forward):
        parents = torch.tensor([g for g, _ in stem_chunk], device=device)
        stem_ids = [torch.tensor(t, dtype=torch.long) for _, t in stem_chunk]
        logits, mask, stem_cache = prompt_rows.run_after(model, parents, stem_ids)
        lengths = torch.tensor([len(t) for t in stem_ids], device=device)
        stem_rows = _CachedRows(stem_cache, mask, logits[torch.arange(len(stem_ids), device=device), lengths - 1])
        stem_logits = torch.cat([first_logits[parents].unsqueeze(1), logits[:, :-1]], dim=1)
        stem_stats = _row_stats(stem_logits, pad_sequences(stem_ids, IGNORE_INDEX, "right").to(device), moments)
        local = {distinct[k]: n for n, k in enumerate(stem_chunk)}
        members = [i for i, s in stem_of.items() if s in local]
        rests = _score_after(model, stem_rows, [local[stem_of[i]] for i in members],
                             [answers[i][stems[i]:] for i in members], [answer_labels[i][stems[i]:] for i in members],
                             rows_per_forward, device, moments)
        for i, rest in zip(members, rests):
            result[i] = _join_stats(stem_stats[local[stem_of[i]]], rest)
    return result


@torch.inference_mode()
def token_stats_passes(model: torch.nn.Module, datasets: Sequence[Any], tokenizer: Any, batch_size: int = 32,
                       share_prompts: bool = True, share_answer_prefixes: bool = True, vocab_moments: bool = True
                       ) -> list[dict[int, list[TokenStats]]]:
    """Per dataset, per index, one ``TokenStats`` per answer (several for perturbed-answer lists), for several
    datasets over the same questions (one per answer column) at once (or one dataset).

    Questions are taken ``batch_size`` at a time (sorted by length); all their answers, in every
    dataset, are scored together, so with ``share_prompts`` question ``i`` runs once for its true,
    paraphrased and perturbed answers, and with ``share_answer_prefixes`` the leading tokens its answers
    share run once too (``_shared_prompt_stats``). A forward pass holds at most ``batch_size`` rows. Returns one
    result per dataset, in order. The datasets must have the same number of items (the same rows).
    ``vocab_moments=False`` leaves out the Min-K%++ mean and std (``TokenStats.mean_logp`` is None).
    """
    sizes = {len(d) for d in datasets}
    if len(sizes) != 1:
        raise ValueError(f"token_stats_passes needs datasets with the same rows; got sizes {[len(d) for d in datasets]}")
    lengths = [max(values) for values in zip(*(d.lengths() for d in datasets))]
    device = _device(model)
    share_prompts = share_prompts and _runs_on_a_kv_cache(model)
    collate = DataCollatorForSupervisedDataset(tokenizer, padding_side="right")
    outs: list[dict[int, list[TokenStats]]] = [{} for _ in datasets]
    eos = [_ends_with_eos(d) for d in datasets]
    by_length = sorted(rank_shard(range(sizes.pop())), key=lambda i: lengths[i], reverse=True)
    bar = progress(len(by_length), f"log-probs {_name(datasets[0])}", unit="question")
    for batch_indices in _chunks(by_length, batch_size):
        bar.update(len(batch_indices))
        samples, owners = [], []
        for i in batch_indices:
            for d, dataset in enumerate(datasets):
                item = dataset[i]
                for sample in item if isinstance(item, list) else [item]:
                    samples.append(sample)
                    owners.append((d, i))
        stats = None
        if share_prompts and len({tuple(_split_prompt(s)[0].tolist()) for s in samples}) < len(samples):
            stats = _shared_prompt_stats(model, samples, device, batch_size, share_answer_prefixes, vocab_moments)
        if stats is None:
            stats = _whole_row_stats(model, samples, collate, device, batch_size, vocab_moments)
        for (d, index), (token_logp, mean_logp, std_logp, match) in zip(owners, stats):
            out = outs[d]
            position = len(out.get(index, []))  # rows of one item arrive in answer order
            out.setdefault(index, []).append(TokenStats(
                logp=token_logp, mean_logp=mean_logp, std_logp=std_logp, argmax_match=match,
                answer_text=_answers(datasets[d], index)[position], ends_with_eos=eos[d],
            ))
    bar.close()
    return [gather_dicts(out) for out in outs]


#: Generation-config fields that change greedy decoding beyond "take the argmax"; a model whose
#: generation config sets one of them is decoded by ``model.generate`` so they apply.
_LOGITS_CHANGING_FIELDS = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "min_new_tokens": (None, 0),
    "min_length": (None, 0), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "sequence_bias": (None,), "encoder_repetition_penalty": (None, 1.0), "exponential_decay_length_penalty": (None,),
}


def _plain_greedy_ok(model: torch.nn.Module) -> bool:
    """Whether ``greedy_decode`` reproduces ``model.generate(do_sample=False)`` for this model."""
    if not _runs_on_a_kv_cache(model):
        return False
    config = getattr(model, "generation_config", None)
    return all(getattr(config, field, None) in neutral for field, neutral in _LOGITS_CHANGING_FIELDS.items())


class _PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in buffers sized for the whole generation.

    ``DynamicLayer.update`` concatenates, copying the layer's whole cache at every decoding step (a
    quarter of a CPU decoding step at batch 128 and 200 tokens); here a step writes its new positions
    in place and ``keys`` / ``values`` are views of the filled part.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int, copies: int = 1,
                 buffers: Sequence[torch.Tensor] | None = None) -> None:
        """``keys`` / ``values`` ``[rows, heads, length, head_dim]`` held ``copies`` times each (row ``r``'s copy
        ``c`` is row ``r * copies + c``, as ``repeat_interleave``) in ``buffers`` of ``capacity`` positions: the
        two given (``[rows * copies, heads, capacity, head_dim]``, ``_preallocate``'s slices of one allocation
        for the whole cache), or new ones."""
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._length = keys.shape[-2]
        if buffers is None:
            buffers = [t.new_empty(t.shape[0] * copies, t.shape[1], capacity, t.shape[3]) for t in (keys, values)]
        for buffer, t in zip(buffers, (keys, values)):
            rows, heads, length, dim = t.shape
            buffer[:, :, :length].view(rows, copies, heads, length, dim).copy_(t.unsqueeze(1))
        self._buffers = list(buffers)
        self._set_views()

    def _rebuffer(self, capacity: int) -> None:
        """Copy the filled positions into new buffers of ``capacity`` positions."""
        new_buffers = []
        for old in self._buffers:
            filled = old[:, :, :self._length]
            buffer = filled.new_empty(filled.shape[0], filled.shape[1], capacity, filled.shape[3])
            buffer[:, :, :self._length] = filled
            new_buffers.append(buffer)
        self._buffers = new_buffers
        self._set_views()

    def _set_views(self) -> None:
        self.keys, self.values = (buffer[:, :, :self._length] for buffer in self._buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[-2]
        if end > self._buffers[0].shape[-2]:  # more positions than planned: grow (not on the decoding path)
            self._rebuffer(max(end, 2 * self._buffers[0].shape[-2]))
        for buffer, t in zip(self._buffers, (key_states, value_states)):
            buffer[:, :, self._length:end] = t
        self._length = end
        self._set_views()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (in that order), moved to the front of the buffers in place: no new buffers
        (each drop of finished rows would allocate the whole cache again)."""
        for buffer in self._buffers:
            buffer[:len(indices), :, :self._length] = buffer[indices, :, :self._length]
        self._buffers = [buffer[:len(indices)] for buffer in self._buffers]
        self._set_views()


def _preallocate(cache: Any, capacity: int, copies: int = 1) -> None:
    """Swap the plain ``DynamicLayer`` s of ``cache`` for ``_PreallocatedLayer`` s of ``capacity`` positions holding
    each row ``copies`` times (``repeat_interleave``); other layers (e.g. sliding) are repeated as they are.

    When the plain layers' keys and values all have one shape, their buffers are slices of one allocation (a
    single block, given back whole when the decoding ends, instead of two per layer), filled from the layers
    directly (no intermediate repeated cache)."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # not a cache of layers: repeated as it is, not preallocated
        if copies > 1:
            cache.batch_repeat_interleave(copies)
        return
    plain = [i for i, layer in enumerate(layers)
             if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4]
    storage = None
    if plain and len({(layers[i].keys.shape, layers[i].values.shape) for i in plain}) == 1 \
            and layers[plain[0]].keys.shape == layers[plain[0]].values.shape:
        rows, heads, _, dim = layers[plain[0]].keys.shape
        storage = layers[plain[0]].keys.new_empty(len(plain), 2, rows * copies, heads, capacity, dim)
    for n, index in enumerate(plain):
        layer = layers[index]
        layers[index] = _PreallocatedLayer(layer.keys, layer.values, capacity, copies,
                                           None if storage is None else storage[n].unbind(0))
    if copies > 1:
        for index, layer in enumerate(layers):
            if index not in plain:
                layer.batch_repeat_interleave(copies)


def greedy_decode(model: torch.nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int,
                  stop_ids: Sequence[int], min_finished_fraction: float = 1 / 16) -> list[list[int]]:
    """Greedy continuation of token-id prompts with a KV cache; finished rows leave the batch.

    Returns the new tokens of each row, its stop token included (as ``model.generate`` does). Unlike
    ``model.generate``, which keeps computing finished rows until the last one stops, finished rows
    are dropped from the cache and the batch, so later steps run only the rows still generating.
    Dropping copies the cache, so it waits until at least ``min_finished_fraction`` of the batch has
    finished (the few finished rows computed meanwhile are discarded). The cache is preallocated for
    ``max_new_tokens`` (``_PreallocatedLayer``); the prompts' common leading tokens run once
    (``prefill_prompts``). Every row's tokens are those of decoding it alone, up to floating-point rounding.
    """
    return decode_rows(model, prompts, max_new_tokens, stop_ids, lambda logits, rows, step: logits.argmax(-1),
                       copies=1, min_finished_fraction=min_finished_fraction)


#: ``pick(logits [B, V], rows [B], step) -> tokens [B]``: the next token of each active row (``rows``: their
#: indices in the output, ``step``: how many tokens each has generated so far).
TokenPicker = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def decode_rows(model: torch.nn.Module, prompts: Sequence[torch.Tensor], max_new_tokens: int,
                stop_ids: Sequence[int], pick: TokenPicker, copies: int = 1,
                min_finished_fraction: float = 1 / 16) -> list[list[int]]:
    """Continue every prompt ``copies`` times with a KV cache, the next token chosen by ``pick``; returns the
    new tokens of each row (prompt ``i``'s copy ``c`` is row ``i * copies + c``), its stop token included.

    Each prompt is prefilled once (``prefill_prompts``: their common leading tokens once too) and its cache
    repeated for its copies, so n samples of a prompt cost one prefill. Finished rows leave the batch (once
    ``min_finished_fraction`` of it has finished: dropping copies the cache); the cache is preallocated for
    ``max_new_tokens``. Every row's tokens are those of decoding it alone, up to floating-point rounding."""
    results: list[list[int]] = [[] for _ in range(len(prompts) * copies)]
    if max_new_tokens <= 0 or not prompts:
        return results
    device = _device(model)
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    last_logits, cache, attention_mask = prefill_prompts(model, list(prompts), device)
    next_position = attention_mask.sum(-1)
    _preallocate(cache, attention_mask.shape[1] + max_new_tokens, copies)  # the cache repeated for the copies
    if copies > 1:
        last_logits, attention_mask, next_position = (t.repeat_interleave(copies, dim=0)
                                                      for t in (last_logits, attention_mask, next_position))
    active: list[int | None] = list(range(len(results)))  # batch row -> result row; None once it has stopped
    rows = torch.arange(len(results), device=device)
    step = 0
    token = pick(last_logits, rows, step)

    def record(tokens: torch.Tensor) -> None:
        for batch_row, (t, is_stop) in enumerate(zip(tokens.tolist(), torch.isin(tokens, stop).tolist())):
            row = active[batch_row]
            if row is not None:
                results[row].append(t)
                if is_stop or len(results[row]) == max_new_tokens:
                    active[batch_row] = None

    record(token)
    while True:
        kept = [b for b, row in enumerate(active) if row is not None]
        if not kept:
            add_tokens(model, sum(len(r) for r in results))  # the prompts are counted by prefill_prompts
            return results
        if len(active) - len(kept) >= min_finished_fraction * len(active):
            keep = torch.tensor(kept, device=device)
            cache.batch_select_indices(keep)
            active = [active[b] for b in kept]
            token, attention_mask, next_position, rows = (token[keep], attention_mask[keep], next_position[keep],
                                                          rows[keep])
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(active), 1)], dim=-1)
        out = model(input_ids=token.unsqueeze(-1), attention_mask=attention_mask,
                    position_ids=next_position.unsqueeze(-1), past_key_values=cache, use_cache=True)
        next_position = next_position + 1
        step += 1
        token = pick(out.logits[:, -1], rows, step)
        record(token)


#: Prompts per generation batch for ``batch_size: auto`` without a GPU: on 2 CPU cores 128 decodes as
#: fast as 256 (benchmarks/README.md) with half the KV-cache memory.
AUTO_GENERATION_ROWS_CPU = 128
#: Upper bound of ``batch_size: auto`` on a GPU, and the share of its free memory the KV cache may take.
AUTO_GENERATION_ROWS_MAX, AUTO_GENERATION_MEMORY_SHARE = 1024, 0.5


def kv_cache_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of key and value cache one token takes: ``2 * layers * kv_heads * head_dim * dtype size``."""
    config = model.config
    config = getattr(config, "get_text_config", lambda: config)()
    heads = getattr(config, "num_attention_heads", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()


def generation_rows(batch_size: int | str, model: torch.nn.Module, longest_prompt: int, max_new_tokens: int,
                    free_bytes: int | None = None) -> int:
    """Prompts per generation batch: ``batch_size`` itself, or for ``"auto"`` as many as the device holds.

    ``auto``: 128 without a GPU (``AUTO_GENERATION_ROWS_CPU``); on a GPU the rows whose KV cache
    (``longest_prompt + max_new_tokens`` tokens each) and float32 logits fit in half its free memory,
    at most 1024: decoding steps are launch-bound there, so fewer, fuller batches run the same prompts
    in fewer sequential steps. ``free_bytes`` replaces the device's free memory (tests).
    """
    if batch_size != "auto":
        try:
            rows = int(batch_size) if not isinstance(batch_size, bool) else 0
        except (TypeError, ValueError):
            rows = 0
        if rows < 1:
            raise ValueError(f"batch_size={batch_size!r}: give a positive number of prompts or 'auto'")
        return rows
    device = _device(model)
    if free_bytes is None:
        if device.type != "cuda":
            return AUTO_GENERATION_ROWS_CPU
        free_bytes = torch.cuda.mem_get_info(device)[0]
    vocab = model.get_output_embeddings().weight.shape[0]
    per_row = kv_cache_bytes_per_token(model) * (longest_prompt + max_new_tokens) + 4 * 2 * vocab
    rows = int(AUTO_GENERATION_MEMORY_SHARE * free_bytes // per_row)
    return max(1, min(AUTO_GENERATION_ROWS_MAX, rows))


def _dataset_template(dataset: Any, template_args: Any) -> PromptTemplate | None:
    """How the dataset's prompts were built: its own ``template`` (None for raw text), else ``template_args``."""
    if hasattr(dataset, "template"):
        return dataset.template
    return PromptTemplate.from_config(template_args)


def _stop_criteria(tokenizer: Any, template: PromptTemplate | None, stop_strings: Sequence[str],
                   options: PlainPassOptions = OURS) -> tuple[list[str], list[int]]:
    """``(stop strings, stop token ids)`` of a generation: the configured strings (plus, for a base model,
    the tag closing an answer, unless ``options.generation_stops_at_eos_only``) and the end-of-answer and
    EOS token ids. Raw text (``template`` None) stops at EOS and the configured strings only."""
    stop_strings = list(stop_strings)
    if template is None:
        return stop_strings, sorted({tokenizer.eos_token_id} - {None})
    if not template.apply_chat_template and template.asst_end_tag.strip(" ") and not options.generation_stops_at_eos_only:
        stop_strings.append(template.asst_end_tag)  # base models: the tag that closes an answer
    stop_ids = sorted({answer_end_token_id(tokenizer, template), tokenizer.eos_token_id} - {None})
    return stop_strings, stop_ids


def _generation_prompts(dataset: Any) -> dict[int, torch.Tensor]:
    """This rank's prompts, by dataset index: the token prefix of each item's (first) sample before its answer."""
    prompts = {}
    for i in rank_shard(range(len(dataset))):
        item = dataset[i]
        prompts[i] = _split_prompt(item[0] if isinstance(item, list) else item)[0]
    return prompts


def _generate(model: torch.nn.Module, prompts: Sequence[torch.Tensor], tokenizer: Any, max_new_tokens: int,
              stop_ids: Sequence[int], attention_mask_from_pad: bool = False) -> list[list[int]]:
    """``model.generate(do_sample=False)`` of left-padded prompts (with their attention mask: 1 on every
    prompt token, or ``ids != pad id`` with ``attention_mask_from_pad``); the new tokens of each row up to
    its first stop token, included (what follows it is padding)."""
    device = _device(model)
    ids = pad_sequences(list(prompts), tokenizer.pad_token_id, "left").to(device)
    if attention_mask_from_pad:
        attn = ids.ne(tokenizer.pad_token_id).long()
    else:
        attn = pad_sequences([torch.ones_like(p) for p in prompts], 0, "left").to(device)
    # synced_gpus: with sharded weights every process keeps stepping until all have finished (a forward is collective)
    generated = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=list(stop_ids), pad_token_id=tokenizer.pad_token_id,
                               synced_gpus=is_sharded(model))
    stop = set(stop_ids)
    rows = []
    for row in generated[:, ids.shape[1]:].tolist():
        end = next((k + 1 for k, t in enumerate(row) if t in stop), len(row))
        rows.append(row[:end])
    add_tokens(model, sum(len(p) for p in prompts) + sum(len(r) for r in rows))
    return rows


def generation_setup(dataset: Any, tokenizer: Any, template_args: Any,
                     stop_strings: Sequence[str]) -> tuple[dict[int, torch.Tensor], list[str], list[int]]:
    """What every generation from ``dataset`` starts from: this rank's prompts by dataset index, the stop strings
    and the stop token ids (``_stop_criteria``)."""
    stop_strings, stop_ids = _stop_criteria(tokenizer, _dataset_template(dataset, template_args), stop_strings)
    return _generation_prompts(dataset), stop_strings, stop_ids


def answer_text(tokenizer: Any, tokens: Sequence[int], stop_strings: Sequence[str], **decode_args: Any) -> str:
    """The text of generated ``tokens``: decoded without special tokens, cut at the first stop string, stripped."""
    return cut_at_stops(tokenizer.decode(list(tokens), skip_special_tokens=True, **decode_args), stop_strings)


def cut_at_stops(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the first of ``stop_strings`` it contains (each tried in turn), stripped."""
    for stop in stop_strings:
        if stop and stop in text:
            text = text.split(stop)[0]
    return text.strip()


def prompt_and_answer_ids(dataset: Any, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt ids, answer ids)`` of item ``index``'s (first) sample."""
    item = dataset[index]
    prompt, answer, _ = _split_prompt(item[0] if isinstance(item, list) else item)
    return prompt, answer


def question_and_answer(dataset: Any, index: int) -> dict[str, str]:
    """``{"input": the question, "ground_truth": its (first) answer}`` of item ``index``."""
    return {"input": dataset.prompt_text(index), "ground_truth": _answers(dataset, index)[0]}


def _generation_records(dataset: Any, tokenizer: Any, indices: Sequence[int], new_tokens: Sequence[Sequence[int]],
                        stop_strings: Sequence[str], texts_from_tokens: bool = False) -> dict[int, dict]:
    """``{"input", "ground_truth", "generation"}`` per index: the decoded tokens cut at the first stop string, stripped.

    ``input`` and ``ground_truth`` are the row's question and (first) answer; with ``texts_from_tokens``
    (``PlainPassOptions.rouge_texts_from_tokens``) they are derived from the tokens as open-unlearning does: the
    decoded prompt, and the decoded sample with the decoded prompt removed, stripped (special tokens
    skipped and tokenization spaces cleaned up, in the generation too).
    """
    decode_args = {"clean_up_tokenization_spaces": True} if texts_from_tokens else {}
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True, **decode_args)
    out = {}
    for i, tokens in zip(indices, new_tokens):
        text = answer_text(tokenizer, tokens, stop_strings, **decode_args)
        if texts_from_tokens:
            item = dataset[i]
            sample = item[0] if isinstance(item, list) else item
            prompt_text = decode(_split_prompt(sample)[0].tolist())
            record = {"input": prompt_text,
                      "ground_truth": decode(sample["input_ids"].tolist()).replace(prompt_text, "").strip()}
        else:
            record = question_and_answer(dataset, i)
        out[i] = {**record, "generation": text}
    return out


@torch.inference_mode()
def generation_pass(model: torch.nn.Module, dataset: Any, tokenizer: Any, template_args: Any = None,
                    batch_size: int | str = 32, max_new_tokens: int = 200,
                    stop_strings: Sequence[str] = ()) -> dict[int, dict]:
    """Greedy continuation of each prompt, cut at the end-of-answer token or a stop string.

    Returns per index ``{"input": question, "ground_truth": answer, "generation": text}`` (the first
    answer of a list). Prompts are sorted by length and left-padded, ``batch_size`` at a time (a
    number, or ``"auto"``: ``generation_rows``); ``greedy_decode`` drops each sequence from the batch
    once it emits its end token; ``batch_size`` prompts run at a time, each batch to its end.
    ``model.generate`` is used instead when the model's
    generation config asks for logit processors such as a repetition penalty.
    """
    prompts, stop_strings, stop_ids = generation_setup(dataset, tokenizer, template_args, stop_strings)
    use_plain_greedy = _plain_greedy_ok(model)
    out: dict[int, dict] = {}
    ordered = sorted(prompts, key=lambda i: len(prompts[i]), reverse=True)
    batch_size = generation_rows(batch_size, model, len(prompts[ordered[0]]) if ordered else 0, max_new_tokens)
    with progress(len(ordered), f"generate {_name(dataset)}", unit="sample") as bar:
        for chunk in _chunks(ordered, batch_size):
            chunk_prompts = [prompts[i] for i in chunk]
            if use_plain_greedy:
                new_tokens = greedy_decode(model, chunk_prompts, max_new_tokens, stop_ids)
            else:
                new_tokens = _generate(model, chunk_prompts, tokenizer, max_new_tokens, stop_ids)
            out.update(_generation_records(dataset, tokenizer, chunk, new_tokens, stop_strings))
            bar.update(len(chunk))
    return gather_dicts(out)


def grad_norm_pass(model: torch.nn.Module, dataset: Any, tokenizer: Any) -> dict[int, float]:
    """Per index, the L2 norm of the gradient of the mean answer NLL w.r.t. ALL the model's weights.

    Frozen weights count too (``requires_grad`` is switched on for the pass and restored after), so
    the score is a property of the model, not of what a method happens to train: the same for a
    model evaluated on its own, during RMU (a few trainable layers) or through a PEFT adapter
    (open-unlearning takes all weights as well). Uses ``torch.autograd.grad`` so the weights'
    ``.grad`` (e.g. a trainer's accumulators) stay untouched.
    """
    collate = DataCollatorForSupervisedDataset(tokenizer)
    device = _device(model)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    out: dict[int, float] = {}
    try:
        with torch.enable_grad():
            for i in progress_over(rank_shard(range(len(dataset))), f"gradient norms {_name(dataset)}"):
                item = dataset[i]
                batch = collate([item[0] if isinstance(item, list) else item])
                _count(model, batch, backward=True)
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
                labels = batch["labels"].to(device)
                loss = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE_INDEX)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                out[i] = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return gather_dicts(out)


# ----- the plain path (``eval.<bench>.passes=plain``) ------------------------------------------------
# The reference implementation of the passes above, without their speed tricks: whole rows instead of
# shared prompts and a shortened output layer, ``model.generate`` instead of ``greedy_decode``, fixed
# batches in dataset order. It must give the same numbers (tests/test_plain_passes.py).

#: Prompts per generation batch for ``batch_size: auto`` in plain mode: a fixed number on any device.
PLAIN_AUTO_GENERATION_ROWS = 32


def plain_token_stats(logits: torch.Tensor, targets: torch.Tensor,
                      float32: bool = False) -> tuple[torch.Tensor, ...]:
    """Per row of ``[N, V]`` logits: ``(log p(target), E_p[log p], std_p[log p], argmax == target)``, written out.

    ``log p = torch.log_softmax(logits)`` in float64 over the whole vocabulary, then
    ``E_p[log p] = sum_v p(v) log p(v)``, ``std_p[log p] = sqrt(sum_v p(v) (log p(v) - E_p[log p])^2)``
    and ``argmax(logits) == target`` (first index on a tie). The same values as ``answer_token_stats``,
    computed independently of it (float64 tensors, one pass per formula). ``float32``
    (``PlainPassOptions.float32_log_probs``): in float32, as open-unlearning computes them, the variance
    included: ``E_p[(log p)^2] - E_p[log p]^2`` floored at 1e-6 before the square root (its Min-K%++; the
    one-pass form loses digits to cancellation, so the z-scores differ from ours by ~1e-4); its answer
    log-probabilities themselves come from its cross-entropy (``plain_token_stats_pass``).
    """
    logp = torch.log_softmax(logits.float() if float32 else logits.double(), dim=-1)
    p = logp.exp()
    mean = (p * logp).sum(-1)
    if float32:
        std = ((p * logp.square()).sum(-1) - mean.square()).clamp(min=1e-6).sqrt()
    else:
        std = (p * (logp - mean.unsqueeze(-1)) ** 2).sum(-1).sqrt()
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return token_logp, mean, std, logits.argmax(-1) == targets


@torch.no_grad()  # not inference_mode: a sharded model (FSDP2) keeps buffers from it that training then updates
def plain_token_stats_pass(model: torch.nn.Module, dataset: Any, tokenizer: Any,
                           batch_size: int = 32, options: PlainPassOptions = OURS) -> dict[int, list[TokenStats]]:
    """``token_stats_passes`` of one dataset computed plainly: per dataset index, one ``TokenStats`` per answer.

    The (question, answer) rows of the dataset (every answer of a list is a row) are taken in dataset
    order, ``batch_size`` rows at a time, right-padded with their attention mask and run through
    ``model(input_ids=..., attention_mask=...)``: logits at every position, no ``logits_to_keep``, no KV
    cache, no prompt shared between rows. Answer token ``t`` is scored by the logits of position
    ``t - 1`` (``plain_token_stats``). With several processes each takes a strided share of the
    indices and the results are gathered.

    ``options`` (open-unlearning's numerics): the mask is ``ids != pad id`` (``attention_mask_from_pad``);
    with ``float32_log_probs`` the batches are its batches (``batch_size`` items, then one batch per
    answer position) and ``logp`` is its float32 cross-entropy over the ``[B, V, L]`` logits, whose
    rounding depends on that layout.
    """
    collate = DataCollatorForSupervisedDataset(tokenizer, padding_side="right",
                                               attention_mask_from_pad=options.attention_mask_from_pad)
    device = _device(model)
    batches = _open_unlearning_batches(dataset, batch_size) if options.float32_log_probs else \
        _chunks([(i, sample) for i in rank_shard(range(len(dataset))) for sample in _samples(dataset[i])], batch_size)
    out: dict[int, list[TokenStats]] = {}
    eos = _ends_with_eos(dataset)
    for chunk, keep in progress_over(_lockstep(batches, model, lambda: [(0, _samples(dataset[0])[0])]),
                                     f"log-probs {_name(dataset)}", unit="batch"):
        batch = collate([sample for _, sample in chunk])
        _count(model, batch)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        if not keep:  # a padding pass of a sharded model: its result is not this process's
            continue
        labels = batch["labels"].to(device)
        if options.float32_log_probs:
            nll = F.cross_entropy(logits[:, :-1].float().transpose(-1, -2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                                  reduction="none")
        for row, (i, _) in enumerate(chunk):
            targets = labels[row, 1:]
            scored = targets != IGNORE_INDEX
            logp, mean, std, match = (v.cpu().numpy() for v in plain_token_stats(
                logits[row, :-1][scored], targets[scored], float32=options.float32_log_probs))
            if options.float32_log_probs:
                logp = -nll[row][scored].cpu().numpy()
            answers = out.setdefault(i, [])  # rows of one item come in answer order
            answers.append(TokenStats(logp=logp, mean_logp=mean, std_logp=std, argmax_match=match,
                                      answer_text=_answers(dataset, i)[len(answers)], ends_with_eos=eos))
    return gather_dicts(out)


def _lockstep(batches: Sequence[Any], model: torch.nn.Module, dummy: Callable[[], Any]) -> Iterator[tuple[Any, bool]]:
    """``(batch, keep)`` for each of this process's batches, then, for a sharded model (``is_sharded``), padding
    passes (``keep`` False: the last batch again, or ``dummy()`` on a process with none) until every process
    has run as many as the one with the most: each forward of a sharded model is a collective call."""
    # agreed before the first batch: a count exchanged after them would meet another process's forward
    total = lockstep_total(len(batches)) if is_sharded(model) else len(batches)
    for batch in batches:
        yield batch, True
    filler = batches[-1] if batches else (dummy() if total else None)
    for _ in range(total - len(batches)):
        yield filler, False


def _name(dataset: Any) -> str:
    return str(getattr(dataset, "name", "") or "")


def _samples(item: Any) -> list[dict]:
    """The samples of a dataset item: itself, or its list of samples (one per answer)."""
    return item if isinstance(item, list) else [item]


def _open_unlearning_batches(dataset: Any, batch_size: int) -> list[list[tuple[int, dict]]]:
    """This rank's ``(index, sample)`` rows in open-unlearning's batches: ``batch_size`` items at a time in
    dataset order, and for items with several answers one batch per answer position."""
    batches = []
    for items in _chunks(rank_shard(range(len(dataset))), batch_size):
        groups = {i: _samples(dataset[i]) for i in items}
        for k in range(max(len(g) for g in groups.values())):
            batches.append([(i, g[k]) for i, g in groups.items() if k < len(g)])
    return batches


@torch.no_grad()
def plain_generation_pass(model: torch.nn.Module, dataset: Any, tokenizer: Any, template_args: Any = None,
                          batch_size: int | str = 32, max_new_tokens: int = 200,
                          stop_strings: Sequence[str] = (), options: PlainPassOptions = OURS) -> dict[int, dict]:
    """``generation_pass`` computed plainly: ``model.generate`` (greedy) of the prompts in dataset order.

    The prompts are those of ``generation_pass`` (the tokens of each sample before its answer), run
    ``batch_size`` at a time (``"auto"``: ``PLAIN_AUTO_GENERATION_ROWS``, 32), left-padded with their
    attention mask, through ``model.generate(do_sample=False)`` with the same stop tokens and
    ``max_new_tokens``; the text is cut at the same stop strings and stripped. Same result layout.
    ``options`` switch the mask, the stop strings and the texts to open-unlearning's
    (``attention_mask_from_pad``, ``generation_stops_at_eos_only``, ``rouge_texts_from_tokens``).
    """
    stop_strings, stop_ids = _stop_criteria(tokenizer, _dataset_template(dataset, template_args), stop_strings, options)
    prompts = _generation_prompts(dataset)
    rows = PLAIN_AUTO_GENERATION_ROWS if batch_size == "auto" else generation_rows(batch_size, model, 0, 0)
    out: dict[int, dict] = {}
    first = _split_prompt(_samples(dataset[0])[0])[0]
    for chunk, keep in progress_over(_lockstep(_chunks(list(prompts), rows), model, lambda: [None]),
                                     f"generate {_name(dataset)}", unit="batch"):
        chunk_prompts = [prompts[i] if i is not None else first for i in chunk]
        new_tokens = _generate(model, chunk_prompts, tokenizer, max_new_tokens, stop_ids,
                               attention_mask_from_pad=options.attention_mask_from_pad)
        if keep:
            out.update(_generation_records(dataset, tokenizer, chunk, new_tokens, stop_strings,
                                           texts_from_tokens=options.rouge_texts_from_tokens))
    return gather_dicts(out)


__all__ = ["PlainPassOptions", "token_stats_passes", "generation_pass", "grad_norm_pass", "greedy_decode", "decode_rows",
           "answer_token_stats", "answer_logits", "plain_token_stats", "plain_token_stats_pass",
           "plain_generation_pass", "generation_setup", "answer_text", "cut_at_stops", "question_and_answer", "prompt_and_answer_ids",
           "generation_rows"]
