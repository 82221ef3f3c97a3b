"""Primal-dual unlearning (Entesari et al. 2025, "Constrained Entropic Unlearning: A Primal-Dual
Framework for Large Language Models", arXiv:2506.05314)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from model.forward import answer_span_logits
from trainer.losses import lagrangian_loss, logit_margin_flattening_loss
from trainer.unlearn.base import UnlearningTrainer

DUAL_UPDATES = ("step", "epoch")


class _DualAscent(TrainerCallback):
    """Calls ``PDU.update_dual`` after each optimizer step or each epoch; tracks the epoch index."""

    def __init__(self, trainer: PDU):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.trainer.epoch_index = int(state.epoch or 0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.dual_update == "step":
            self.trainer.update_dual()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.trainer.dual_update == "epoch":
            self.trainer.update_dual()


class PDU(UnlearningTrainer):
    """``min_theta L_forget  s.t.  L_retain <= eps``, solved by primal-dual descent-ascent.

    Each step minimises the Lagrangian ``L = gamma * L_forget + lambda * (L_retain - eps)`` over the
    model (``trainer.losses.lagrangian_loss``); the multiplier ``lambda >= 0`` is a plain number the
    optimizer never sees, updated by projected dual ascent
    ``lambda <- max(0, lambda + dual_step_size * mean(L_retain - eps))`` after every optimizer step
    (``dual_update: step``; mean over its micro-batches) or at the end of every epoch
    (``dual_update: epoch``; mean over the epoch), and not during the first ``dual_warmup_epochs``.
    With several processes the mean is taken over all of them, so every rank holds the same lambda.
    lambda and the violations stay on the device (a 0-dim tensor): the update reads nothing back to
    the host, so a step never waits for the device.

    ``L_forget`` is the paper's logit-margin flattening loss (``trainer.losses.logit_margin_flattening_loss``,
    which drives the next-token distribution on forget answers towards uniform), not gradient ascent.
    ``L_retain`` is the retain NLL (the paper's choice) or KL to the model before unlearning. The paper
    suggests ``eps = (1 + tolerance) * L_retain(model before unlearning)``. lambda is logged as
    ``dual_variable`` and ``L_retain - eps`` as ``constraint_violation``; lambda (and the violations of an
    unfinished epoch) are saved in every checkpoint and restored when a run resumes.

    Args (``trainer.method_args``):
        retain_loss_eps: the bound ``eps`` on the retain loss (required, >= 0).
        dual_step_size: step size of the dual ascent (>= 0; 0 keeps lambda at ``dual_init``).
        dual_update: ``step`` or ``epoch``.
        dual_init: starting value of lambda (>= 0).
        dual_warmup_epochs: number of first epochs without dual updates (>= 0).
        gamma: weight of the forget term.
        retain_loss_type: ``NLL`` or ``KL`` (KL loads a frozen reference model).
    """

    def __init__(self, *args: Any, retain_loss_eps: float | None = None, dual_step_size: float = 1.0,
                 dual_update: str = "step", dual_init: float = 1.0, dual_warmup_epochs: int = 0,
                 gamma: float = 1.0, retain_loss_type: str = "NLL", **kwargs: Any):
        self.retain_loss_eps = self.check_arg(
            "retain_loss_eps", retain_loss_eps, low=0,
            hint="required: the bound on the retain loss, e.g. (1 + tolerance) x the retain loss of the model "
                 "before unlearning")
        self.dual_step_size = self.check_arg("dual_step_size", dual_step_size, low=0)
        self.dual_update = self.check_arg_choice("dual_update", dual_update, DUAL_UPDATES)
        dual_init = self.check_arg("dual_init", dual_init, low=0)
        self.dual_warmup_epochs = self.check_arg("dual_warmup_epochs", dual_warmup_epochs, integer=True, low=0)
        self.set_loss_weights(gamma, 1.0, retain_loss_type, retain_required=True)  # lambda weighs the retain term
        self.epoch_index = 0
        self.violations: list[torch.Tensor] = []  # L_retain - eps of the training batches since the last update
        super().__init__(*args, **kwargs)
        self.dual = torch.tensor(float(dual_init), device=self.args.device)
        self.add_callback(_DualAscent(self))

    def method_state(self) -> dict[str, Any]:
        """lambda, the violations not yet applied (``dual_update: epoch``) and the epoch index, for checkpoints."""
        return {"dual": float(self.dual), "violations": [float(v) for v in self.violations],
                "epoch_index": self.epoch_index}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.dual = torch.tensor(float(state["dual"]), device=self.args.device)
        self.violations = [torch.tensor(float(v), device=self.args.device) for v in state["violations"]]
        self.epoch_index = int(state["epoch_index"])

    @staticmethod
    def dual_step(dual: float | torch.Tensor, violation: float | torch.Tensor,
                  step_size: float) -> float | torch.Tensor:
        """Projected dual ascent: ``max(0, lambda + step_size * violation)`` (numbers, or tensors on
        the device: then a new tensor, computed without reading anything back)."""
        updated = dual + step_size * violation
        return updated.clamp(min=0.0) if isinstance(updated, torch.Tensor) else max(0.0, updated)

    def update_dual(self) -> None:
        """Apply one dual step with the mean violation recorded since the last update, then reset it."""
        violations, self.violations = self.violations, []
        if not violations or self.epoch_index < self.dual_warmup_epochs:
            return
        mean = torch.stack(violations).float().mean()
        if self.accelerator.num_processes > 1:
            mean = self.accelerator.reduce(mean, reduction="mean")
        self.dual = self.dual_step(self.dual, mean, self.dual_step_size)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = inputs["forget"]
        logits, labels = answer_span_logits(model, forget)
        forget_loss = logit_margin_flattening_loss(logits, labels, self.token_mean_processes)
        retain_loss = self.retain_loss(model, inputs["retain"], self.retain_loss_type)
        loss = lagrangian_loss(self.gamma * forget_loss, retain_loss, self.dual, self.retain_loss_eps)
        violation = retain_loss.detach() - self.retain_loss_eps
        if model.training:
            self.violations.append(violation)
        self.log_loss_terms(forget_loss=forget_loss, retain_loss=retain_loss, constraint_violation=violation,
                            dual_variable=self.dual)
        return (loss, {"logits": logits}) if return_outputs else loss
