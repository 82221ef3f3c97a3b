"""SimNPO: Simple Negative Preference Optimization (Fan et al. 2024, arXiv:2410.07163)."""

from __future__ import annotations

from typing import Any

from checks import check_bool
from trainer.losses import per_sample_mean, simnpo_loss
from trainer.unlearn.base import UnlearningTrainer


class SimNPO(UnlearningTrainer):
    """``L = gamma * L_f + alpha * retain_loss``, ``L_f = -(2/beta) mean_i log sigmoid(beta A_i - delta)``.

    From Fan et al. 2024, "Simplicity Prevails: Rethinking Negative Preference Optimization for LLM
    Unlearning" (arXiv:2410.07163): NPO without the reference model and with the length-normalised
    log-likelihood ``(1/|y|) log pi(y|x) = -A`` (``A = S / T``, the mean answer-token NLL) as the reward
    (``trainer.losses.simnpo_loss``). The paper's reward margin ``gamma`` is called ``delta`` here, because
    ``gamma`` is the weight of the forget term in every method of this project.

    Args (``trainer.method_args``):
        beta: inverse temperature (> 0).
        delta: reward margin (the paper's ``gamma``), subtracted after the scaling by ``beta``; 0 in the
            paper's TOFU runs. open-unlearning subtracts its delta before the scaling
            (``beta * (A - delta')``): convert with ``delta = beta * delta'`` (docs/methods.md), or set
            ``delta_before_scaling``.
        delta_before_scaling: read ``delta`` in open-unlearning's units, ``log sigmoid(beta * (A - delta))``
            (``compat=open_unlearning`` sets it).
        gamma: weight of the forget term.
        alpha: weight of the retain term.
        retain_loss_type: ``NLL``, ``KL`` (loads a frozen reference model), or null for no retain term.
    """

    def __init__(self, *args: Any, beta: float = 4.5, delta: float = 0.0, gamma: float = 0.125, alpha: float = 1.0,
                 retain_loss_type: str | None = "NLL", delta_before_scaling: bool = False, **kwargs: Any):
        self.beta = self.check_arg("beta", beta, low=0, low_open=True)
        self.delta = self.check_arg("delta", delta)  # any finite margin (0 in the paper's TOFU runs)
        self.delta_before_scaling = check_bool("delta_before_scaling", delta_before_scaling, owner="SimNPO")
        self.set_loss_weights(gamma, alpha, retain_loss_type)
        super().__init__(*args, **kwargs)

    supports_joint_forward = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget, retain = self.answer_nlls(model, inputs["forget"], self.nll_retain_batch(inputs))
        # beta * (A - delta') = beta * A - beta * delta'
        delta = self.beta * self.delta if self.delta_before_scaling else self.delta
        forget_loss = simnpo_loss(per_sample_mean(forget.summed, forget.counts), self.beta, delta)
        loss = self.weighted_total(model, inputs, forget_loss, retain_nll=retain)
        return (loss, {}) if return_outputs else loss
