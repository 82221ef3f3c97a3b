"""Sampled answers, reproducible whatever the batching: n answers per prompt at a temperature and a top-p.

Each answer (prompt ``index``, sample ``s``) draws its random numbers from a generator of its own, seeded by
``(seed, index, s)``: one uniform number per generated token, turned into a token by the inverse of the
cumulative distribution of the (temperature-scaled, top-p-restricted) next-token probabilities. So an answer
does not depend on which other prompts share its batch, on how rows leave the batch, or on how many processes
share the prompts (each prompt keeps its dataset index); the same config gives the same answers.

``sample_answers`` is the fast path: every prompt is prefilled once and its KV cache shared by its n samples,
and finished rows leave the batch (``passes.decode_rows``). ``sample_answers_plain`` is the reference: each
answer decoded alone, with the same random numbers; both give the same tokens up to floating-point rounding of
the probabilities (a uniform number within rounding of a cumulative boundary could pick the neighbour token).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from core.distributed import gather_dicts
from evals.passes import answer_text, decode_rows, generation_rows, generation_setup, question_and_answer
from progress import progress


@dataclass(frozen=True)
class SamplingArgs:
    """How answers are sampled: ``num_samples`` per prompt, ``temperature`` (> 0), ``top_p`` in (0, 1] (the
    smallest set of most likely tokens whose probability reaches it; 1 = every token), ``max_new_tokens``, the
    ``seed`` every answer's random numbers derive from, and ``stop_strings`` that end an answer's text (besides
    the end-of-answer token), as in greedy generation."""

    num_samples: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0
    stop_strings: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, owner: str) -> SamplingArgs:
        """The settings of a metric's ``sampling_args``; an unknown key or a bad value is a ValueError naming it."""
        cfg = dict(cfg or {})
        valid = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            raise ValueError(f"{owner}: sampling_args has unknown keys {unknown}; valid: {', '.join(sorted(valid))}")
        stops = cfg.get("stop_strings", ())
        if not isinstance(stops, (list, tuple)) or not all(isinstance(x, str) and x for x in stops):
            raise ValueError(f"{owner}: sampling_args.stop_strings={stops!r}; give a list of non-empty strings")
        args = cls(**{**cfg, "stop_strings": tuple(stops)})
        checks = [("num_samples", args.num_samples, isinstance(args.num_samples, int) and args.num_samples >= 1,
                   "an integer >= 1"),
                  ("temperature", args.temperature, _number(args.temperature) and args.temperature > 0, "a number > 0"),
                  ("top_p", args.top_p, _number(args.top_p) and 0 < args.top_p <= 1, "a number in (0, 1]"),
                  ("max_new_tokens", args.max_new_tokens,
                   isinstance(args.max_new_tokens, int) and args.max_new_tokens >= 1, "an integer >= 1"),
                  ("seed", args.seed, isinstance(args.seed, int) and args.seed >= 0, "an integer >= 0")]
        for name, value, ok, valid_text in checks:
            if not ok or isinstance(value, bool):
                raise ValueError(f"{owner}: sampling_args.{name}={value!r}; give {valid_text}")
        return args


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def answer_seed(seed: int, index: int, sample: int) -> int:
    """The seed of answer ``sample`` to prompt ``index``: 63 bits of SHA-256 of ``"seed:index:sample"`` (no
    two answers share a stream, and the seed does not depend on the process or the batch)."""
    digest = hashlib.sha256(f"{seed}:{index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def answer_uniforms(seed: int, indices: Sequence[int], num_samples: int, steps: int) -> torch.Tensor:
    """``[len(indices) * num_samples, steps]`` uniform numbers in [0, 1): row ``i * num_samples + s`` is answer
    ``s`` of prompt ``indices[i]``, from its own generator (``answer_seed``)."""
    rows = []
    for index in indices:
        for sample in range(num_samples):
            generator = torch.Generator().manual_seed(answer_seed(seed, int(index), sample))
            rows.append(torch.rand(steps, generator=generator, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.empty(0, steps, dtype=torch.float64)


def pick_sampled(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of ``logits`` [B, V]: the first token whose cumulative probability exceeds ``u * total``
    (inverse-CDF sampling with the row's uniform number ``u``), the probabilities ``softmax(logits / T)`` in
    float64, restricted to the top-p nucleus (tokens by decreasing probability while the mass before them is
    below ``top_p``; ties in vocabulary order) when ``top_p < 1``."""
    # the same values as softmax(logits.double() / temperature) and its cumsum, with fewer [B, V] float64 temporaries
    # (a third of the time of this function at B = 128, V = 49152 on a CPU): softmax's dtype casts first, a
    # temperature of 1 divides nothing, and the cumsum overwrites the probabilities once they are no longer read
    scaled = logits.double().div_(temperature) if temperature != 1 else logits
    probs = torch.softmax(scaled, dim=-1, dtype=torch.float64)
    last = probs.new_full((probs.shape[0], 1), probs.shape[-1] - 1, dtype=torch.long)
    if top_p < 1:
        probs, order, size = nucleus(probs, top_p)
        last = (size - 1).unsqueeze(-1)  # u * total rounding up to the total still picks a nucleus token
    cumulative = probs.cumsum_(-1)
    target = uniforms.to(cumulative.device, torch.float64).unsqueeze(-1) * cumulative[:, -1:]
    chosen = torch.minimum(torch.searchsorted(cumulative, target, right=True), last)
    return (order.gather(-1, chosen) if top_p < 1 else chosen).squeeze(-1)


#: Tokens a nucleus is first looked for among (``nucleus``), widened 4-fold until it fits.
NUCLEUS_CANDIDATES = 256


def nucleus(probs: torch.Tensor, top_p: float, sort_all: bool = False) -> tuple[torch.Tensor, ...]:
    """``(probabilities, token ids, size)`` of each row's top-p nucleus: the probabilities sorted by decreasing
    value (ties in vocabulary order), zero after the nucleus (the tokens while the mass before them is below
    ``top_p``), and the nucleus size.

    Speed knob: the nucleus is taken from the ``NUCLEUS_CANDIDATES`` most likely tokens (``topk``, re-sorted
    stably), widened 4-fold until every row's nucleus ends inside them with its last token strictly more likely
    than every token left out (so no tie crosses the edge): the same columns as sorting the whole vocabulary,
    which ``sort_all`` (and the last widening) does, at a fraction of the cost (a stable float64 sort of 49k
    tokens per row is slower than a small model's forward pass on a CPU)."""
    vocab = probs.shape[-1]
    width = vocab if sort_all else min(vocab, NUCLEUS_CANDIDATES)
    while True:
        if width >= vocab:
            values, ids = probs.sort(dim=-1, descending=True, stable=True)
        else:
            values, ids = probs.topk(width, dim=-1)  # ties in no set order: put them in vocabulary order
            by_id = ids.argsort(dim=-1)
            values, ids = values.gather(-1, by_id), ids.gather(-1, by_id)
            values, order = values.sort(dim=-1, descending=True, stable=True)
            ids = ids.gather(-1, order)
        inside = (values.cumsum(-1) - values) < top_p
        size = inside.sum(-1)
        if width >= vocab:
            return values * inside, ids, size
        last_inside = values.gather(-1, (size - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
        if bool(((size < width) & (last_inside > values[:, -1])).all()):
            return values * inside, ids, size
        width *= 4


@torch.no_grad()
def sample_answers(model: torch.nn.Module, prompts: Sequence[torch.Tensor], indices: Sequence[int],
                   args: SamplingArgs, stop_ids: Sequence[int]) -> list[list[list[int]]]:
    """``args.num_samples`` sampled continuations of each prompt (its stop token included), per prompt in
    order: ``out[i][s]`` is answer ``s`` to prompt ``indices[i]`` (its dataset index, which seeds it)."""
    uniforms = answer_uniforms(args.seed, indices, args.num_samples, args.max_new_tokens)

    def pick(logits: torch.Tensor, rows: torch.Tensor, step: int) -> torch.Tensor:
        return pick_sampled(logits, uniforms[rows.cpu(), step], args.temperature, args.top_p)

    flat = decode_rows(model, prompts, args.max_new_tokens, stop_ids, pick, copies=args.num_samples)
    n = args.num_samples
    return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]


@torch.no_grad()
def sample_answers_plain(model: torch.nn.Module, prompts: Sequence[torch.Tensor], indices: Sequence[int],
                         args: SamplingArgs, stop_ids: Sequence[int]) -> list[list[list[int]]]:
    """The reference of ``sample_answers``: each answer decoded alone (its prompt run again for every sample,
    a cache of its own, no row leaving a batch), with the same random numbers."""
    device = next(model.parameters()).device
    uniforms = answer_uniforms(args.seed, indices, args.num_samples, args.max_new_tokens)
    stop = set(stop_ids)
    out: list[list[list[int]]] = []
    for i, prompt in enumerate(prompts):
        answers = []
        for sample in range(args.num_samples):
            row = uniforms[i * args.num_samples + sample]
            result = model(input_ids=prompt.unsqueeze(0).to(device), use_cache=True)
            cache, logits, tokens = result.past_key_values, result.logits[:, -1], []
            for step in range(args.max_new_tokens):
                token = pick_sampled(logits, row[step:step + 1], args.temperature, args.top_p)
                tokens.append(int(token))
                if tokens[-1] in stop:
                    break
                result = model(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
                cache, logits = result.past_key_values, result.logits[:, -1]
            answers.append(tokens)
        out.append(answers)
    return out


def sampling_pass(model: torch.nn.Module, dataset: Any, tokenizer: Any, template_args: Any, args: SamplingArgs,
                  batch_size: int | str = "auto", plain: bool = False) -> dict[int, dict]:
    """``args.num_samples`` sampled answers to each prompt of ``dataset``: per index ``{"input", "ground_truth",
    "samples": [text, ...]}``, each text cut at the end-of-answer token or a stop string, as greedy generations are.

    ``batch_size`` counts answers (rows) per batch, a number or ``"auto"`` (``passes.generation_rows``); a batch
    holds ``max(1, batch_size // num_samples)`` prompts. ``plain``: ``sample_answers_plain`` (each answer alone)
    instead of ``sample_answers``; the same answers either way. Each process samples its share of the prompts
    and the results are gathered; an answer depends only on (seed, dataset index, sample number)."""
    prompts, stop_strings, stop_ids = generation_setup(dataset, tokenizer, template_args, args.stop_strings)
    ordered = sorted(prompts, key=lambda i: len(prompts[i]), reverse=True)
    rows = generation_rows(batch_size, model, len(prompts[ordered[0]]) if ordered else 0, args.max_new_tokens)
    per_batch = max(1, rows // args.num_samples)
    decode = sample_answers_plain if plain else sample_answers
    out: dict[int, dict] = {}
    with progress(len(ordered), f"sample {args.num_samples} answers", unit="prompt") as bar:
        for start in range(0, len(ordered), per_batch):
            chunk = ordered[start:start + per_batch]
            answers = decode(model, [prompts[i] for i in chunk], chunk, args, stop_ids)
            for index, tokens in zip(chunk, answers):
                out[index] = {**question_and_answer(dataset, index),
                              "samples": [answer_text(tokenizer, t, stop_strings) for t in tokens]}
            bar.update(len(chunk))
    return gather_dicts(out)


__all__ = ["NUCLEUS_CANDIDATES", "SamplingArgs", "nucleus", "sampling_pass", "answer_seed", "answer_uniforms", "pick_sampled", "sample_answers", "sample_answers_plain"]
