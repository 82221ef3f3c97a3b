"""SimNPO: Simple Negative Preference Optimization (Fan et al. 2024, arXiv:2410.07163)."""

from __future__ import annotations

import math
from typing import Any

from trainer.base import model_inputs
from trainer.losses import mean_nll, simnpo_loss
from trainer.unlearn.base import RETAIN_LOSS_TYPES, UnlearningTrainer


class SimNPO(UnlearningTrainer):
    """``L = gamma * L_f + alpha * retain_loss``, ``L_f = -(2/beta) mean_i log sigmoid(beta A_i - delta)``.

    From Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
    Unlearning" (arXiv:2410.07163): NPO without the reference model and with the length-normalised
    log-likelihood ``(1/|y|) log pi(y|x) = -A`` (``A = S / T``, the mean answer-token NLL) as the reward
    (``trainer.losses.simnpo_loss``). The paper's reward margin ``gamma`` is called ``delta`` here, because
    ``gamma`` is the weight of the forget term in every method of this project.

    Args (``trainer.method_args``):
        beta: inverse temperature (> 0).
        delta: reward margin (the paper's ``gamma``); 0 in the paper's TOFU runs.
        gamma: weight of the forget term.
        alpha: weight of the retain term.
        retain_loss_type: ``NLL``, ``KL`` (loads a frozen reference model), or null for no retain term.
    """

    def __init__(self, *args: Any, beta: float = 4.5, delta: float = 0.0, gamma: float = 0.125, alpha: float = 1.0,
                 retain_loss_type: str | None = "NLL", **kwargs: Any):
        if retain_loss_type is not None and retain_loss_type not in RETAIN_LOSS_TYPES:
            raise ValueError(f"retain_loss_type={retain_loss_type!r}; valid: {', '.join(RETAIN_LOSS_TYPES)} or null")
        if not beta > 0:
            raise ValueError(f"SimNPO beta must be > 0, got {beta}")
        if not math.isfinite(delta):
            raise ValueError(f"SimNPO delta must be a finite number, got {delta}")
        self.beta, self.delta, self.gamma, self.alpha = beta, delta, gamma, alpha
        self.retain_loss_type = retain_loss_type
        self.uses_retain = retain_loss_type is not None
        super().__init__(*args, **kwargs)

    def needs_reference_model(self) -> bool:
        return self.retain_loss_type == "KL"

    def compute_loss(self, model, inputs, return_outputs=False):
        forget = inputs["forget"]
        logits = model(**model_inputs(forget)).logits
        forget_loss = simnpo_loss(mean_nll(logits, forget["labels"]), self.beta, self.delta)
        loss = self.gamma * forget_loss
        terms = {"forget_loss": forget_loss}
        if self.retain_loss_type is not None:
            terms["retain_loss"] = self.retain_loss(model, inputs["retain"], self.retain_loss_type)
            loss = loss + self.alpha * terms["retain_loss"]
        self.log_loss_terms(**terms)
        return (loss, {"logits": logits}) if return_outputs else loss
