"""DPO on the forget set with refusals as preferred answers: TOFU's IdkDPO.

DPO: Rafailov et al. 2023, arXiv:2305.18290. IdkDPO: Maini et al. 2024, "TOFU: A Task of Fictitious
Unlearning for LLMs", arXiv:2401.06121.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from data.collators import Parts
from trainer.losses import dpo_loss
from trainer.unlearn.base import UnlearningTrainer

IDK_HINT = "use a *_IDK dataset, e.g. data.forget=TOFU_QA_FORGET10_IDK"


def _paired_error(method: str, hint: str) -> ValueError:
    return ValueError(
        f"{method} needs forget items with an 'alternate' answer ({{'original': ..., 'alternate': ...}}) but "
        f"data.forget gives plain question-answer samples; {hint}"
    )


def check_paired_forget_dataset(train_dataset: Any, method: str, hint: str) -> None:
    """Fail before training when ``data.forget`` is a plain QA dataset (its items have no 'alternate')."""
    forget = getattr(train_dataset, "forget", None)
    if forget is None or len(forget) == 0:
        return
    item = forget[0]
    if isinstance(item, Mapping) and not isinstance(item, Parts):  # a plain sample, no pair
        raise _paired_error(method, hint)


def paired_forget(forget: Mapping[str, Any], method: str, hint: str) -> tuple[dict, dict]:
    """``(original, alternate)`` batches of a paired forget batch, or a ValueError saying which data to use."""
    if not isinstance(forget, Parts) or set(forget) != {"original", "alternate"}:
        raise _paired_error(method, hint)
    return forget["original"], forget["alternate"]


class DPO(UnlearningTrainer):
    """``L = gamma * L_DPO + alpha * retain_loss`` on forget questions, preferring a refusal.

    ``inputs["forget"] = {"original": <forget answers, the rejected y_l>, "alternate": <"I don't know"
    refusals, the preferred y_w>}`` (``QAwithIdkDataset``, configs ``TOFU_QA_FORGET*_IDK``) and
    ``L_DPO = -(2/beta) mean log sigmoid(beta [(S_ref(y_w) - S(y_w)) - (S_ref(y_l) - S(y_l))])``
    (``trainer.losses.dpo_loss``), the reference being the frozen model from before unlearning. The
    ``2/beta`` factor is TOFU's scaling (Maini et al. 2024, arXiv:2401.06121); the DPO paper (Rafailov
    et al. 2023, arXiv:2305.18290) has none. It only rescales the loss (and the gradient) by ``2/beta``.

    Args (``trainer.method_args``):
        beta: inverse temperature of the DPO loss (> 0).
        gamma: weight of the forget (DPO) term.
        alpha: weight of the retain term.
        retain_loss_type: ``NLL``, ``KL``, or null for no retain term.
    """

    #: What to tell a user whose forget data has no alternate answers.
    paired_data_hint = IDK_HINT
    uses_reference_model = True
    reference_nll_only = True

    def __init__(self, *args: Any, beta: float = 0.1, gamma: float = 1.0, alpha: float = 1.0,
                 retain_loss_type: str | None = "NLL", **kwargs: Any):
        self.beta = self.check_arg("beta", beta, low=0, low_open=True)
        check_paired_forget_dataset(kwargs.get("train_dataset"), type(self).__name__, self.paired_data_hint)
        self.set_loss_weights(gamma, alpha, retain_loss_type)
        super().__init__(*args, **kwargs)

    supports_joint_forward = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        rejected, preferred = paired_forget(inputs["forget"], type(self).__name__, self.paired_data_hint)
        nll_l, nll_w, retain = self.answer_nlls(model, rejected, preferred, self.nll_retain_batch(inputs))
        forget_loss = dpo_loss(nll_w.summed, self.reference_nll(preferred), nll_l.summed, self.reference_nll(rejected),
                               self.beta)
        loss = self.weighted_total(model, inputs, forget_loss, retain_nll=retain)
        return (loss, {}) if return_outputs else loss
