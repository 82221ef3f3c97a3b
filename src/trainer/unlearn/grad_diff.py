"""Gradient difference (Liu et al. 2022, "Continual Learning and Private Unlearning"; TOFU's GradDiff)."""

from __future__ import annotations

from typing import Any

import torch

from trainer.answer_nll import AnswerNLL
from trainer.unlearn.base import UnlearningTrainer


class GradDiff(UnlearningTrainer):
    """``L = gamma * (-NLL(forget)) + alpha * retain_loss``.

    Args (``trainer.method_args``):
        gamma: weight of the forget term (gradient ascent on forget answers).
        alpha: weight of the retain term.
        retain_loss_type: ``NLL`` (keep fitting the retain answers) or ``KL`` (stay close to the
            model before unlearning on retain answers; loads a frozen reference model).
    """

    def __init__(self, *args: Any, gamma: float = 1.0, alpha: float = 1.0, retain_loss_type: str = "NLL",
                 **kwargs: Any):
        self.set_loss_weights(gamma, alpha, retain_loss_type, retain_required=True)
        super().__init__(*args, **kwargs)

    supports_joint_forward = True

    def forget_loss(self, forget: AnswerNLL) -> torch.Tensor:
        """Gradient ascent on the forget answers: ``-mean_t NLL_t`` over the batch's answer tokens."""
        return -self.token_mean(forget)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget, retain = self.answer_nlls(model, inputs["forget"], self.nll_retain_batch(inputs))
        loss = self.weighted_total(model, inputs, self.forget_loss(forget), retain_nll=retain)
        return (loss, {}) if return_outputs else loss
