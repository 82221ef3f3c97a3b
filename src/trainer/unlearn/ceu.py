"""CE-U: Cross Entropy Unlearning (Yang 2025, arXiv:2503.01224)."""

from __future__ import annotations

from typing import Any

from trainer.base import model_inputs
from trainer.losses import ceu_loss
from trainer.unlearn.base import RETAIN_LOSS_TYPES, UnlearningTrainer


class CEU(UnlearningTrainer):
    """``L = gamma * L_CEU(forget) + alpha * retain_loss``.

    ``L_CEU`` (``trainer.losses.ceu_loss``): at each forget answer position, the cross-entropy between
    the model's distribution ``p`` and a target equal to ``p`` itself, detached, with the true token's
    logit set to ``-inf`` and renormalised; the first ``ignore_first_n_answer_tokens`` answer tokens of
    each sample are skipped. No reference model is needed.

    The paper reports its TOFU results with CE-U alone (no retain samples, no reference model), so the
    retain term is off by default (``retain_loss_type: null``); ``NLL`` or ``KL`` adds one.

    Args (``trainer.method_args``):
        ignore_first_n_answer_tokens: answer tokens skipped at the start of each answer.
        gamma: weight of the forget term.
        alpha: weight of the retain term.
        retain_loss_type: null (paper), ``NLL``, or ``KL`` (loads a frozen reference model).
    """

    def __init__(self, *args: Any, ignore_first_n_answer_tokens: int = 1, gamma: float = 1.0, alpha: float = 1.0,
                 retain_loss_type: str | None = None, **kwargs: Any):
        if retain_loss_type is not None and retain_loss_type not in RETAIN_LOSS_TYPES:
            raise ValueError(f"retain_loss_type={retain_loss_type!r}; valid: {', '.join(RETAIN_LOSS_TYPES)} or null")
        if ignore_first_n_answer_tokens < 0:
            raise ValueError(f"ignore_first_n_answer_tokens must be >= 0, got {ignore_first_n_answer_tokens}")
        self.ignore_first_n_answer_tokens = ignore_first_n_answer_tokens
        self.gamma, self.alpha, self.retain_loss_type = gamma, alpha, retain_loss_type
        self.uses_retain = retain_loss_type is not None
        super().__init__(*args, **kwargs)

    def needs_reference_model(self) -> bool:
        return self.retain_loss_type == "KL"

    def compute_loss(self, model, inputs, return_outputs=False):
        forget = inputs["forget"]
        logits = model(**model_inputs(forget)).logits
        forget_loss = ceu_loss(logits, forget["labels"], self.ignore_first_n_answer_tokens)
        loss = self.gamma * forget_loss
        terms = {"forget_loss": forget_loss}
        if self.retain_loss_type is not None:
            terms["retain_loss"] = self.retain_loss(model, inputs["retain"], self.retain_loss_type)
            loss = loss + self.alpha * terms["retain_loss"]
        self.log_loss_terms(**terms)
        return (loss, {"logits": logits}) if return_outputs else loss
