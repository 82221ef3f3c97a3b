"""Gradient ascent on the forget set (Jang et al. 2023, "Knowledge Unlearning", arXiv:2210.01504)."""

from __future__ import annotations

from trainer.base import answer_span_logits
from trainer.losses import gradient_ascent_loss
from trainer.unlearn.base import UnlearningTrainer


class GradAscent(UnlearningTrainer):
    """``L = -mean_t NLL_t(forget)``: maximise the likelihood loss of the forget answers. No retain term."""

    def compute_loss(self, model, inputs, return_outputs=False):
        forget = inputs["forget"]
        logits, labels = answer_span_logits(model, forget)
        loss = gradient_ascent_loss(logits, labels)
        self.log_loss_terms(forget_loss=loss)
        return (loss, {"logits": logits}) if return_outputs else loss
