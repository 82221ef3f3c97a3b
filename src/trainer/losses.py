"""Loss functions of unlearning methods: pure functions of tensors, importable on their own.

Notation (per sample): ``NLL_t`` the negative log-likelihood of answer token t, ``S = sum_t NLL_t``,
``T`` the number of answer tokens (label != -100), ``A = S / T``; ``log pi(y|x) = -S``.
Logits are ``[B, L, V]`` and labels ``[B, L]`` in the usual causal layout (position i predicts token
i+1). Every function computes in float32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def per_token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL of every predicted token ``[B, L-1]`` (0 where masked) and the answer-token mask ``[B, L-1]``."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none",
    ).view(shift_labels.shape)
    return nll, shift_labels != IGNORE_INDEX


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample summed answer NLL ``S`` ``[B]`` and answer-token count ``T`` ``[B]``."""
    nll, mask = per_token_nll(logits, labels)
    return nll.sum(dim=-1), mask.sum(dim=-1)


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample length-normalised NLL ``A = S / T`` ``[B]``; a sample without answer tokens is an error."""
    total, count = sequence_nll(logits, labels)
    if bool((count == 0).any()):
        raise ValueError(f"{int((count == 0).sum())} sample(s) have no answer tokens (all labels are -100)")
    return total / count


def token_mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL over all answer tokens of the batch (the usual language-modelling loss)."""
    total, count = sequence_nll(logits, labels)
    return total.sum() / count.sum().clamp(min=1)


def answer_kl(logits: torch.Tensor, ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p_model)`` of the next-token distributions, averaged over answer tokens.

    ``sum_v p_ref(v) (log p_ref(v) - log p_model(v))`` at each answer position; prompt and padding
    positions are excluded (some published code averages over them too, diluting the term).
    """
    mask = labels[:, 1:] != IGNORE_INDEX
    logp = F.log_softmax(logits[:, :-1, :].float(), dim=-1)[mask]
    ref_logp = F.log_softmax(ref_logits[:, :-1, :].float(), dim=-1)[mask]
    kl = F.kl_div(logp, ref_logp, reduction="none", log_target=True).sum(dim=-1)
    return kl.sum() / mask.sum().clamp(min=1)


def gradient_ascent_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Gradient ascent on the forget answers: ``-mean_t NLL_t`` (minimising it raises their NLL)."""
    return -token_mean_nll(logits, labels)


def npo_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """Negative Preference Optimization (Zhang et al. 2024, arXiv:2404.05868), eq. 3.

    ``L = -(2/beta) mean_i log sigmoid(-beta log(pi(y_i|x_i) / pi_ref(y_i|x_i)))`` with the sequence
    log-ratio ``log pi - log pi_ref = S_ref - S``, i.e. ``L = -(2/beta) mean log sigmoid(beta (S - S_ref))``.
    ``nll`` and ``ref_nll`` are per-sample summed NLLs ``S`` ``[B]``.
    """
    if beta <= 0:
        raise ValueError(f"NPO beta must be > 0, got {beta}")
    return -(2.0 / beta) * F.logsigmoid(beta * (nll - ref_nll)).mean()
