"""IdkNLL: fine-tune the forget questions towards "I don't know" (Maini et al. 2024, TOFU, arXiv:2401.06121)."""

from __future__ import annotations

from typing import Any

from trainer.unlearn.base import UnlearningTrainer
from trainer.unlearn.dpo import IDK_HINT, check_paired_forget_dataset, paired_forget


class IdkNLL(UnlearningTrainer):
    """``L = gamma * NLL(refusals) + alpha * retain_loss``.

    TOFU's "IDK" baseline (Maini et al. 2024, arXiv:2401.06121): the forget questions are trained, with
    the usual mean answer-token NLL, to answer with a refusal drawn from ``idontknow.jsonl``
    (``inputs["forget"]["alternate"]``, configs ``TOFU_QA_FORGET*_IDK``); the true forget answers
    (``inputs["forget"]["original"]``) are not used.

    Args (``trainer.method_args``):
        gamma: weight of the forget (refusal NLL) term.
        alpha: weight of the retain term.
        retain_loss_type: ``NLL``, ``KL`` (loads a frozen reference model), or null for no retain term.
    """

    def __init__(self, *args: Any, gamma: float = 1.0, alpha: float = 1.0, retain_loss_type: str | None = "NLL",
                 **kwargs: Any):
        check_paired_forget_dataset(kwargs.get("train_dataset"), type(self).__name__, IDK_HINT)
        self.set_loss_weights(gamma, alpha, retain_loss_type)
        super().__init__(*args, **kwargs)

    supports_joint_forward = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        _, refusal = paired_forget(inputs["forget"], type(self).__name__, IDK_HINT)
        refusal_nll, retain = self.answer_nlls(model, refusal, self.nll_retain_batch(inputs))
        forget_loss = self.token_mean(refusal_nll)
        loss = self.weighted_total(model, inputs, forget_loss, retain_nll=retain)
        return (loss, {}) if return_outputs else loss
