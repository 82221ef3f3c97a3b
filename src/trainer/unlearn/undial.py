"""UNDIAL (Dong et al. 2025, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in
Large Language Models", NAACL 2025, arXiv:2402.10052)."""

from __future__ import annotations

from typing import Any

from model.forward import answer_span_logits
from trainer.losses import undial_loss
from trainer.unlearn.base import UnlearningTrainer


class UNDIAL(UnlearningTrainer):
    """``L = gamma * L_UNDIAL(forget) + alpha * retain_loss``.

    ``L_UNDIAL`` (``trainer.losses.undial_loss``): self-distillation towards the frozen model's
    next-token distribution with the true token's logit lowered by ``beta``,
    ``q_t = softmax(z_ref,t - beta * onehot(y_t))``, as the cross-entropy ``-sum_v q_t(v) log p(v)``
    averaged over the forget ANSWER tokens (= ``KL(q || p)`` + const, same gradient). The published code
    averages over prompt and padding positions too; here they are excluded, as the paper's objective is
    over the tokens to unlearn.

    The paper's objective is the distillation term alone (no retain data); ``retain_loss_type: null``
    reproduces it. The default adds an NLL retain term (``alpha = 1``), the usual TOFU set-up in which
    every method may train on the retain split.

    Args (``trainer.method_args``):
        beta: how much the true token's logit is lowered in the target (paper's default 10).
        gamma: weight of the forget (distillation) term.
        alpha: weight of the retain term.
        retain_loss_type: ``NLL``, ``KL``, or null for the paper's pure UNDIAL.
    """

    uses_reference_model = True

    def __init__(self, *args: Any, beta: float = 10.0, gamma: float = 1.0, alpha: float = 1.0,
                 retain_loss_type: str | None = "NLL", **kwargs: Any):
        self.beta = self.check_arg("beta", beta, low=0)  # 0: plain self-distillation
        self.set_loss_weights(gamma, alpha, retain_loss_type)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = inputs["forget"]
        logits, labels = answer_span_logits(model, forget)
        forget_loss = undial_loss(logits, self.reference_logits(forget), labels, self.beta,
                                  self.token_mean_processes)
        loss = self.weighted_total(model, inputs, forget_loss)
        return (loss, {"logits": logits}) if return_outputs else loss
