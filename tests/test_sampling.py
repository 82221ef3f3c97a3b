"""Sampled answers (issue 33): inverse-CDF sampling by hand, the fast path (one prefill per prompt, its cache
shared by its samples, finished rows leaving) against the plain one, and reproducibility whatever the batch."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import MODEL_CACHE, REPO
from evals.sampling import SamplingArgs, answer_seed, pick_sampled, sample_answers, sample_answers_plain
from model import get_model


def _tiny():
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny-random-llama.yaml"))
    cfg["cache_dir"] = str(MODEL_CACHE)
    model, tok = get_model(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # larger weights than the init: varied tokens instead of one token repeated
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval(), tok


PROMPTS = [torch.tensor([3, 4, 5, 6, 7, 8, 9]), torch.tensor([3, 4, 11, 12]), torch.tensor([3, 4, 13, 14, 15])]


def test_inverse_cdf_sampling_by_hand():
    """Probabilities 0.5, 0.3, 0.2 (cumulative 0.5, 0.8, 1): u picks the first token whose cumulative mass
    exceeds u; with top_p = 0.6 the nucleus is the first two (the mass before the third, 0.8, reaches 0.6)."""
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log().repeat(3, 1)
    u = torch.tensor([0.0, 0.6, 0.95])
    assert pick_sampled(logits, u, 1.0, 1.0).tolist() == [0, 1, 2]
    # nucleus {0, 1}, total 0.8: u * 0.8 = 0, 0.48, 0.76 -> tokens 0, 0, 1; the third token is never drawn
    assert pick_sampled(logits, u, 1.0, 0.6).tolist() == [0, 0, 1]
    assert pick_sampled(logits[:1], torch.tensor([0.999]), 1.0, 0.6).tolist() == [1]
    # a temperature near 0 puts all the mass on the most likely token
    assert pick_sampled(logits, u, 1e-4, 1.0).tolist() == [0, 0, 0]


def _pick_written_out(logits, uniforms, temperature, top_p):
    """pick_sampled as first written: every step its own float64 tensor."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    last = probs.shape[-1] - 1
    if top_p < 1:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        inside = (probs.cumsum(-1) - probs) < top_p
        probs, last = probs * inside, (inside.sum(-1, keepdim=True) - 1)
    cumulative = probs.cumsum(-1)
    chosen = torch.searchsorted(cumulative, (uniforms.double().unsqueeze(-1) * cumulative[:, -1:]), right=True)
    chosen = torch.minimum(chosen, torch.as_tensor(last))
    return (order.gather(-1, chosen) if top_p < 1 else chosen).squeeze(-1)


def test_pick_sampled_keeps_the_values_of_the_written_out_formula():
    """Speed knob (in-place float64 steps, softmax casting itself, no division by a temperature of 1): the same
    tokens as the formula written out, for float32 and bfloat16 logits."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(256, 4000, generator=generator) * 4
    uniforms = torch.rand(256, generator=generator, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (1.3, 0.5)):
            want = _pick_written_out(logits.to(dtype), uniforms, temperature, top_p)
            assert torch.equal(pick_sampled(logits.to(dtype), uniforms, temperature, top_p), want)


def test_the_nucleus_from_the_most_likely_tokens_equals_sorting_them_all():
    """Speed knob (the nucleus looked for among the 256 most likely tokens, widened until it fits): the columns of
    a stable sort of the whole vocabulary, ties (bfloat16 logits, a flat distribution) included."""
    from evals.sampling import nucleus

    generator = torch.Generator().manual_seed(5)
    cases = [torch.randn(64, 5000, generator=generator) * scale for scale in (1.0, 4.0, 12.0)]
    cases += [cases[1].bfloat16().float(), torch.zeros(4, 5000)]  # many ties; every token tied
    for logits in cases:
        probs = torch.softmax(logits.double(), dim=-1)
        for top_p in (0.1, 0.9, 0.999):
            want = nucleus(probs, top_p, sort_all=True)
            got = nucleus(probs, top_p)
            assert torch.equal(got[2], want[2])
            width = int(want[2].max())
            for a, b in zip(got[:2], want[:2]):
                assert torch.equal(a[:, :width], b[:, :width])


def test_a_uniform_number_next_to_one_still_picks_a_nucleus_token():
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert pick_sampled(logits, torch.tensor([1 - 2 ** -53]), 1.0, 0.6).tolist() == [1]


def test_fast_sampling_equals_the_plain_reference():
    """Speed knob (one prefill per prompt, its cache shared by its 4 samples, finished rows leaving the batch):
    the same tokens as decoding every answer alone with the same random numbers."""
    model, tok = _tiny()
    args = SamplingArgs(num_samples=4, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)
    plain = sample_answers_plain(model, PROMPTS, [0, 1, 2], args, stop_ids=[])
    stops = sorted({plain[0][0][2], plain[1][3][4]})  # some answers stop early
    plain = sample_answers_plain(model, PROMPTS, [0, 1, 2], args, stop_ids=stops)
    fast = sample_answers(model, PROMPTS, [0, 1, 2], args, stop_ids=stops)
    assert fast == plain
    lengths = [len(a) for answers in fast for a in answers]
    assert min(lengths) < 10 and max(lengths) == 10
    assert len({tuple(a) for answers in fast for a in answers}) > 3  # samples differ


def test_an_answer_depends_on_its_prompt_index_and_seed_only():
    model, tok = _tiny()
    args = SamplingArgs(num_samples=3, temperature=1.2, top_p=1.0, max_new_tokens=6, seed=1)
    together = sample_answers(model, PROMPTS, [10, 11, 12], args, stop_ids=[])
    alone = sample_answers(model, PROMPTS[1:2], [11], args, stop_ids=[])
    assert alone[0] == together[1]  # another batch, the same answers (as on another process)
    assert sample_answers(model, PROMPTS, [10, 11, 12], args, stop_ids=[]) == together
    other = sample_answers(model, PROMPTS, [10, 11, 12], SamplingArgs(3, 1.2, 1.0, 6, seed=2), stop_ids=[])
    assert other != together
    assert answer_seed(1, 11, 0) != answer_seed(1, 11, 1) != answer_seed(1, 12, 0)


def test_sampling_args_are_checked():
    assert SamplingArgs.from_config({"num_samples": 4, "top_p": 0.9}, "m") == SamplingArgs(num_samples=4, top_p=0.9)
    for bad, message in [({"temperature": 0}, "sampling_args.temperature=0; give a number > 0"),
                         ({"top_p": 1.5}, r"sampling_args.top_p=1.5; give a number in \(0, 1\]"),
                         ({"num_samples": 0}, "sampling_args.num_samples=0; give an integer >= 1"),
                         ({"n": 4}, "sampling_args has unknown keys \\['n'\\]")]:
        with pytest.raises(ValueError, match=message):
            SamplingArgs.from_config(bad, "m")
