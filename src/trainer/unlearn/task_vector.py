"""Task-vector negation (Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089),
as an unlearning baseline in MUSE (Shi et al. 2024, arXiv:2407.06460)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from core.distributed import unwrap_parallel
from model.forward import unwrap
from model.peft import is_peft_model, merged_name
from trainer.unlearn.base import UnlearningTrainer

log = logging.getLogger(__name__)


class TaskVector(UnlearningTrainer):
    """``theta = theta_target - scale * (theta_ft - theta_target)``.

    Training fine-tunes the model on the forget set (plain answer NLL, ``L = mean_t NLL_t(forget)``) for
    the configured epochs/steps, giving ``theta_ft``; at the end of ``train()`` the task vector
    ``tau = theta_ft - theta_target`` is subtracted from the weights taken before training, in place,
    so the saved model is the unlearned one. The task-vector norm ``||tau||_2`` is logged as
    ``task_vector_norm``. No retain term and no reference model (the target is kept as a CPU copy of
    the parameters). With LoRA (``model.peft``) the adapters are merged into the base weights first,
    so ``tau = B A s``, and the saved result is the whole negated model. Checkpoints and evaluations *during* training see the fine-tuned model, not the
    negated one.

    Args (``trainer.method_args``):
        scale: how much of the task vector to subtract (> 0).
    """

    def __init__(self, *args: Any, scale: float = 1.0, **kwargs: Any):
        self.scale = self.check_arg("scale", scale, low=0, low_open=True)
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError("TaskVector subtracts whole weight tensors after training, which FSDP and DeepSpeed keep "
                             "sharded over the processes: run it on one process or with DDP "
                             "(configs/accelerate/ddp.yaml), or with LoRA (peft=lora) to fit a large model")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        forget = inputs["forget"]
        loss = self.answer_mean_nll(model, forget)
        self.log_loss_terms(forget_loss=loss)
        return (loss, {}) if return_outputs else loss

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        # named_parameters() lists a tied tensor (embeddings / LM head) once: negating it twice would be wrong.
        return dict(self.accelerator.unwrap_model(self.model).named_parameters())

    def train(self, *args: Any, **kwargs: Any):
        policy = unwrap_parallel(self.accelerator.unwrap_model(self.model))
        if getattr(unwrap(policy), "is_loaded_in_4bit", False):
            raise ValueError("TaskVector with a 4-bit base (model.peft.quantization): the task-vector arithmetic would "
                             "round into 4-bit weights; use peft=lora")
        if not is_peft_model(policy):
            target = {name: p.detach().to("cpu", copy=True) for name, p in self._parameters().items()}
            result = super().train(*args, **kwargs)
            self.negate_task_vector(target)
            return result
        # LoRA: the base weights are theta_target (they never train); theta_ft is base + B A s, so the adapters are
        # merged first and the arithmetic runs on the merged weights. (Negating A and B would not negate the
        # update: (-B)(-A) = BA.) The result is a plain model, saved whole.
        target = {merged_name(name): p.detach().to("cpu", copy=True)
                  for name, p in policy.get_base_model().named_parameters() if "lora_" not in name}
        result = super().train(*args, **kwargs)
        self.model = self.model_wrapped = policy.merge_and_unload()
        self.negate_task_vector(target)
        return result

    @torch.no_grad()
    def negate_task_vector(self, target: dict[str, torch.Tensor]) -> float:
        """Set every parameter to ``target - scale * (current - target)``; returns ``||current - target||``."""
        squared = 0.0
        for name, param in self._parameters().items():
            base = target[name].to(param.device, param.dtype)
            tau = param - base
            squared += float(tau.float().pow(2).sum())
            param.copy_(base - self.scale * tau)
        norm = squared**0.5
        log.info("task vector norm %.4g; subtracted with scale %g", norm, self.scale)
        self.log({"task_vector_norm": norm})
        return norm
