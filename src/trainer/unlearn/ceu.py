"""CE-U: Cross Entropy Unlearning (Yang 2025, arXiv:2503.01224)."""

from __future__ import annotations

from typing import Any

from model.forward import answer_span_logits
from trainer.losses import ceu_loss
from trainer.unlearn.base import UnlearningTrainer


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
        self.ignore_first_n_answer_tokens = self.check_arg("ignore_first_n_answer_tokens", ignore_first_n_answer_tokens,
                                                           integer=True, low=0)
        self.set_loss_weights(gamma, alpha, retain_loss_type)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = inputs["forget"]
        logits, labels = answer_span_logits(model, forget)
        forget_loss = ceu_loss(logits, labels, self.ignore_first_n_answer_tokens, self.token_mean_processes)
        loss = self.weighted_total(model, inputs, forget_loss)
        return (loss, {"logits": logits}) if return_outputs else loss
