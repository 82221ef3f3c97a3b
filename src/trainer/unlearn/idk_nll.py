"""IdkNLL: fine-tune the forget questions towards "I don't know" (Maini et al. 2024, TOFU, arXiv:2401.06121)."""

from __future__ import annotations

from typing import Any

from trainer.base import model_inputs
from trainer.losses import token_mean_nll
from trainer.unlearn.base import RETAIN_LOSS_TYPES, UnlearningTrainer
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
        if retain_loss_type is not None and retain_loss_type not in RETAIN_LOSS_TYPES:
            raise ValueError(f"retain_loss_type={retain_loss_type!r}; valid: {', '.join(RETAIN_LOSS_TYPES)} or null")
        check_paired_forget_dataset(kwargs.get("train_dataset"), type(self).__name__, IDK_HINT)
        self.gamma, self.alpha, self.retain_loss_type = gamma, alpha, retain_loss_type
        self.uses_retain = retain_loss_type is not None
        super().__init__(*args, **kwargs)

    def needs_reference_model(self) -> bool:
        return self.retain_loss_type == "KL"

    def compute_loss(self, model, inputs, return_outputs=False):
        _, refusal = paired_forget(inputs["forget"], type(self).__name__, IDK_HINT)
        logits = model(**model_inputs(refusal)).logits
        forget_loss = token_mean_nll(logits, refusal["labels"])
        loss = self.gamma * forget_loss
        terms = {"forget_loss": forget_loss}
        if self.retain_loss_type is not None:
            terms["retain_loss"] = self.retain_loss(model, inputs["retain"], self.retain_loss_type)
            loss = loss + self.alpha * terms["retain_loss"]
        self.log_loss_terms(**terms)
        return (loss, {"logits": logits}) if return_outputs else loss
