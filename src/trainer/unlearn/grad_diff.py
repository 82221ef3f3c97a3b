"""Gradient difference (Liu et al. 2022, "Continual Learning and Private Unlearning"; TOFU's GradDiff)."""

from __future__ import annotations

from typing import Any

from trainer.base import model_inputs
from trainer.losses import gradient_ascent_loss
from trainer.unlearn.base import RETAIN_LOSS_TYPES, UnlearningTrainer


class GradDiff(UnlearningTrainer):
    """``L = gamma * (-NLL(forget)) + alpha * retain_loss``.

    Args (``trainer.method_args``):
        gamma: weight of the forget term (gradient ascent on forget answers).
        alpha: weight of the retain term.
        retain_loss_type: ``NLL`` (keep fitting the retain answers) or ``KL`` (stay close to the
            model before unlearning on retain answers; loads a frozen reference model).
    """

    uses_retain = True

    def __init__(self, *args: Any, gamma: float = 1.0, alpha: float = 1.0, retain_loss_type: str = "NLL",
                 **kwargs: Any):
        if retain_loss_type not in RETAIN_LOSS_TYPES:
            raise ValueError(f"retain_loss_type={retain_loss_type!r}; valid: {', '.join(RETAIN_LOSS_TYPES)}")
        self.gamma, self.alpha, self.retain_loss_type = gamma, alpha, retain_loss_type
        super().__init__(*args, **kwargs)

    def needs_reference_model(self) -> bool:
        return self.retain_loss_type == "KL"

    def forget_loss(self, model, forget):
        outputs = model(**model_inputs(forget))
        return gradient_ascent_loss(outputs.logits, forget["labels"]), outputs

    def compute_loss(self, model, inputs, return_outputs=False):
        forget_loss, outputs = self.forget_loss(model, inputs["forget"])
        retain_loss = self.retain_loss(model, inputs["retain"], self.retain_loss_type)
        loss = self.gamma * forget_loss + self.alpha * retain_loss
        self.log_loss_terms(forget_loss=forget_loss, retain_loss=retain_loss)
        return (loss, outputs) if return_outputs else loss
