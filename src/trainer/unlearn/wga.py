"""Weighted gradient ascent (Wang et al. 2025, "Rethinking LLM Unlearning Objectives: A Gradient
Perspective and Go Beyond", ICLR 2025, arXiv:2502.19301)."""

from __future__ import annotations

from typing import Any

import torch

from trainer.answer_nll import AnswerNLL
from trainer.losses import token_weighted_ascent, wga_weights
from trainer.unlearn.grad_diff import GradDiff


class WGA(GradDiff):
    """``L = gamma * (-mean_t w_t NLL_t(forget)) + alpha * retain_loss`` with ``w_t = p_t^beta`` (detached).

    ``p_t`` is the model's probability of forget-answer token t; the mean runs over all answer tokens
    of the batch (``trainer.losses.token_weighted_ascent``), so ``beta = 0`` is GradDiff.

    Args (``trainer.method_args``):
        beta: exponent of the token weights (>= 0).
        gamma, alpha, retain_loss_type: as in GradDiff (NLL or KL; KL loads a reference model).
    """

    def __init__(self, *args: Any, beta: float = 1.0, **kwargs: Any):
        self.beta = self.check_arg("beta", beta, low=0)  # 0: GradDiff
        super().__init__(*args, **kwargs)

    def forget_loss(self, forget: AnswerNLL) -> torch.Tensor:
        return token_weighted_ascent(forget.per_token, forget.mask, lambda p: wga_weights(p, self.beta),
                                     self.token_mean_processes)
