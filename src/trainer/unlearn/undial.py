"""UNDIAL (Dong et al. 2025, "UNDIAL: Self-Distillation with Adjusted Logits for Robust Unlearning in
Large Language Models", NAACL 2025, arXiv:2402.10052)."""

from __future__ import annotations

from typing import Any

from trainer.losses import undial_loss
from trainer.unlearn.base import RETAIN_LOSS_TYPES, UnlearningTrainer


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

    def __init__(self, *args: Any, beta: float = 10.0, gamma: float = 1.0, alpha: float = 1.0,
                 retain_loss_type: str | None = "NLL", **kwargs: Any):
        if retain_loss_type is not None and retain_loss_type not in RETAIN_LOSS_TYPES:
            raise ValueError(f"retain_loss_type={retain_loss_type!r}; valid: {', '.join(RETAIN_LOSS_TYPES)} or null")
        if beta < 0:
            raise ValueError(f"UNDIAL beta must be >= 0, got {beta}")
        self.beta, self.gamma, self.alpha, self.retain_loss_type = beta, gamma, alpha, retain_loss_type
        self.uses_retain = retain_loss_type is not None
        super().__init__(*args, **kwargs)

    def needs_reference_model(self) -> bool:
        return True

    def compute_loss(self, model, inputs, return_outputs=False):
        forget = inputs["forget"]
        _, _, logits = self.forward_nll(model, forget)
        forget_loss = undial_loss(logits, self.reference_logits(forget), forget["labels"], self.beta)
        loss = self.gamma * forget_loss
        terms = {"forget_loss": forget_loss}
        if self.retain_loss_type is not None:
            terms["retain_loss"] = self.retain_loss(model, inputs["retain"], self.retain_loss_type)
            loss = loss + self.alpha * terms["retain_loss"]
        self.log_loss_terms(**terms)
        return (loss, {"logits": logits}) if return_outputs else loss
