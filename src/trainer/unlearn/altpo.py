"""Alternate Preference Optimization (Mekala et al. 2025, arXiv:2409.13474)."""

from __future__ import annotations

from trainer.unlearn.dpo import DPO


class AltPO(DPO):
    """DPO on the forget set with an alternate plausible answer as the preferred side.

    From Mekala et al. 2025, "Alternate Preference Optimization for Unlearning Factual Knowledge in Large
    Language Models" (arXiv:2409.13474): negative feedback on the true forget answer ``y_l`` combined with
    in-domain positive feedback on an alternate answer ``y_w`` to the same question, produced beforehand by
    the model itself (``scripts/generate_alternates.py``; dataset configs ``TOFU_QA_FORGET*_ALT`` with
    ``QAwithAlternateDataset``). The loss is ``DPO``'s (``trainer.losses.dpo_loss``, with TOFU's ``2/beta``
    scale), ``L = gamma * L_DPO(y_w = alternate, y_l = forget answer) + alpha * retain_loss``, with the
    frozen model from before unlearning as reference. The paper averages the term over several alternates
    per question; here each question gets one alternate per seed (drawn by the dataset).

    Args (``trainer.method_args``): as ``DPO``: beta (0.1), gamma (1.0), alpha (1.0), retain_loss_type (NLL).
    """

    paired_data_hint = ("use a *_ALT dataset, e.g. data.forget=TOFU_QA_FORGET10_ALT with paths.tofu holding "
                        "forget10_alternate.json made by scripts/generate_alternates.py")
