"""SatImp (Yang et al. 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning",
ICML 2025, arXiv:2505.11953)."""

from __future__ import annotations

from typing import Any

import torch

from trainer.answer_nll import AnswerNLL
from trainer.losses import satimp_weights, token_weighted_ascent
from trainer.unlearn.grad_diff import GradDiff


class SatImp(GradDiff):
    """``L = gamma * (-mean_t w_t NLL_t(forget)) + alpha * retain_loss``, ``w_t = p_t^beta1 (1 - p_t)^beta2``.

    ``p_t`` is the model's (detached) probability of forget-answer token t: saturation (``p^beta1``)
    times importance (``(1-p)^beta2``). The mean runs over all answer tokens of the batch
    (``trainer.losses.token_weighted_ascent``). Defaults are the paper's ``beta1 = 5``,
    ``beta2 = 1`` with a forget:retain weight ratio of 10 (``alpha = 0.1``).

    Args (``trainer.method_args``):
        beta1: saturation exponent (>= 0).
        beta2: importance exponent (>= 0).
        gamma, alpha, retain_loss_type: as in GradDiff (NLL or KL; KL loads a reference model).
    """

    def __init__(self, *args: Any, beta1: float = 5.0, beta2: float = 1.0, alpha: float = 0.1, **kwargs: Any):
        self.beta1 = self.check_arg("beta1", beta1, low=0)
        self.beta2 = self.check_arg("beta2", beta2, low=0)
        super().__init__(*args, alpha=alpha, **kwargs)

    def forget_loss(self, forget: AnswerNLL) -> torch.Tensor:
        weights = lambda p: satimp_weights(p, self.beta1, self.beta2)  # noqa: E731
        return token_weighted_ascent(forget.per_token, forget.mask, weights, self.token_mean_processes)
