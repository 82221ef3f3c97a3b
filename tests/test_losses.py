"""Each loss against a value computed by hand on tiny tensors (vocab 5)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer import losses

LN4 = math.log(4.0)


def _example():
    """Two sequences of 3 tokens; position i predicts labels[i + 1].

    sample 0: answer tokens 1, 2. Row 0 uniform -> p(1) = 1/5; row 1 has logit ln4 at token 2 -> p = 4/8.
    sample 1: answer token 3 then padding. Row 0 has ln4 at token 0 -> p(3) = 1/8.
    """
    logits = torch.zeros(2, 3, 5)
    logits[0, 1, 2] = LN4
    logits[1, 0, 0] = LN4
    logits[1, 1, :] = torch.tensor([9.0, -3.0, 2.0, 0.5, 7.0])  # masked position: must not matter
    labels = torch.tensor([[-100, 1, 2], [-100, 3, -100]])
    return logits, labels


def test_sequence_nll_by_hand():
    logits, labels = _example()
    total, count = losses.sequence_nll(logits, labels)
    assert torch.allclose(total, torch.tensor([math.log(5) + math.log(2), math.log(8)]), atol=1e-6)
    assert count.tolist() == [2, 1]


def test_per_sample_mean_and_token_mean_by_hand():
    """``A = S / T`` per sample and ``sum S / sum T`` over the batch (the trainers' ``answer_mean_nll``;
    gradient ascent is its negative, checked through ``GradAscent`` in test_methods.py)."""
    logits, labels = _example()
    total, count = losses.sequence_nll(logits, labels)
    assert torch.allclose(losses.per_sample_mean(total, count), torch.tensor([math.log(10) / 2, math.log(8)]),
                          atol=1e-6)
    assert losses.token_mean(total, count).item() == pytest.approx(math.log(80) / 3, abs=1e-6)


def test_per_sample_mean_of_a_sample_without_answer_tokens_is_nan():
    logits, labels = _example()
    labels[1] = -100
    mean = losses.per_sample_mean(*losses.sequence_nll(logits, labels))
    assert mean[0].item() == pytest.approx(math.log(10) / 2, abs=1e-6) and math.isnan(mean[1].item())


def test_losses_compute_in_float32_for_bf16_logits():
    logits, labels = _example()
    bf16 = losses.sequence_nll(logits.bfloat16(), labels)[0]
    assert bf16.dtype == torch.float32
    assert torch.allclose(bf16, losses.sequence_nll(logits, labels)[0], atol=2e-2)


def test_npo_loss_by_hand():
    # Equal to the reference: -(2/beta) log sigmoid(0) = 2 ln 2 for beta = 1.
    same = torch.tensor([2.0, 3.0])
    assert losses.npo_loss(same, same, beta=1.0).item() == pytest.approx(2 * math.log(2), abs=1e-6)
    # beta = 2, S - S_ref = [ln(3)/2, 0]: -(2/2) * mean(ln(3/4), ln(1/2)) = ln(8/3) / 2.
    nll = torch.tensor([math.log(3) / 2, 0.0])
    value = losses.npo_loss(nll, torch.zeros(2), beta=2.0).item()
    assert value == pytest.approx(math.log(8 / 3) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="beta"):
        losses.npo_loss(nll, nll, beta=0.0)


def test_npo_loss_falls_as_forget_nll_rises():
    ref = torch.tensor([1.0])
    assert losses.npo_loss(torch.tensor([3.0]), ref, 0.5) < losses.npo_loss(torch.tensor([1.0]), ref, 0.5)


def test_answer_kl_by_hand():
    # Answer tokens at label positions 1 and 2 -> rows 0 and 1 count; row 2 (prompt/pad) must not.
    labels = torch.tensor([[-100, 1, 4, -100]])
    model_logits = torch.zeros(1, 4, 5)
    ref_logits = torch.zeros(1, 4, 5)
    ref_logits[0, 0, 0] = LN4  # p_ref = [1/2, 1/8, 1/8, 1/8, 1/8] vs uniform: KL = ln(5/4)
    ref_logits[0, 2, 3] = 50.0  # a non-answer position: excluded
    value = losses.answer_kl(model_logits, ref_logits, labels).item()
    assert value == pytest.approx(math.log(1.25) / 2, abs=1e-6)
    assert losses.answer_kl(ref_logits, ref_logits, labels).item() == pytest.approx(0.0, abs=1e-7)
