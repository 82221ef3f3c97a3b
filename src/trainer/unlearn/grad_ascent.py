"""Gradient ascent on the forget set (Jang et al. 2023, "Knowledge Unlearning", arXiv:2210.01504)."""

from __future__ import annotations

from trainer.unlearn.base import UnlearningTrainer


class GradAscent(UnlearningTrainer):
    """``L = -mean_t NLL_t(forget)``: maximise the likelihood loss of the forget answers. No retain term."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = inputs["forget"]
        loss = -self.answer_mean_nll(model, forget)
        self.log_loss_terms(forget_loss=loss)
        return (loss, {}) if return_outputs else loss
