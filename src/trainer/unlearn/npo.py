"""Negative Preference Optimization (Zhang et al. 2024, arXiv:2404.05868)."""

from __future__ import annotations

from typing import Any

from trainer.losses import npo_loss
from trainer.unlearn.base import UnlearningTrainer


class NPO(UnlearningTrainer):
    """``L = gamma * L_NPO(forget) + alpha * retain_loss`` with ``L_NPO`` of ``trainer.losses.npo_loss``.

    The log-ratio is the paper's sequence-level one, ``log pi(y|x) - log pi_ref(y|x) = S_ref - S``
    (summed over answer tokens), with the frozen model from before unlearning as reference.

    Args (``trainer.method_args``):
        beta: inverse temperature of the NPO loss.
        gamma: weight of the forget term.
        alpha: weight of the retain term.
        retain_loss_type: ``NLL``, ``KL``, or null for no retain term (pure NPO).
    """

    uses_reference_model = True
    reference_nll_only = True

    def __init__(self, *args: Any, beta: float = 0.1, gamma: float = 1.0, alpha: float = 1.0,
                 retain_loss_type: str | None = "NLL", **kwargs: Any):
        self.beta = self.check_arg("beta", beta, low=0, low_open=True)
        self.set_loss_weights(gamma, alpha, retain_loss_type)
        super().__init__(*args, **kwargs)

    supports_joint_forward = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget, retain = self.answer_nlls(model, inputs["forget"], self.nll_retain_batch(inputs))
        forget_loss = npo_loss(forget.summed, self.reference_nll(inputs["forget"]), self.beta)
        loss = self.weighted_total(model, inputs, forget_loss, retain_nll=retain)
        return (loss, {}) if return_outputs else loss
