"""Trainers, looked up by name: ``trainer.handler`` in a config names a class registered here.

To add an unlearning method: subclass ``trainer.unlearn.base.UnlearningTrainer`` in its own file under
``src/trainer/unlearn/``, register it below with ``_register_trainer``, and add
``configs/trainer/<Name>.yaml`` (see docs/components.md).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TrainingArguments

from trainer.base import FinetuneTrainer
from trainer.unlearn.altpo import AltPO
from trainer.unlearn.base import UnlearningTrainer
from trainer.unlearn.ceu import CEU
from trainer.unlearn.dpo import DPO
from trainer.unlearn.grad_ascent import GradAscent
from trainer.unlearn.grad_diff import GradDiff
from trainer.unlearn.idk_nll import IdkNLL
from trainer.unlearn.npo import NPO
from trainer.unlearn.pdu import PDU
from trainer.unlearn.rmu import RMU
from trainer.unlearn.satimp import SatImp
from trainer.unlearn.simnpo import SimNPO
from trainer.unlearn.task_vector import TaskVector
from trainer.unlearn.undial import UNDIAL
from trainer.unlearn.wga import WGA

log = logging.getLogger(__name__)

TRAINER_REGISTRY: dict[str, type] = {}

# TrainingArguments keys that older configs (and the seed's example) carry but transformers 5 dropped.
_REMOVED_TRAINING_ARGS = {
    "logging_dir": "logs are written to the run's output folder",
    "overwrite_output_dir": "each run replaces its output folder once it succeeds",
}


def _register_trainer(cls: type) -> type:
    TRAINER_REGISTRY[cls.__name__] = cls
    return cls


_register_trainer(FinetuneTrainer)
_register_trainer(GradAscent)
_register_trainer(GradDiff)
_register_trainer(NPO)
_register_trainer(RMU)
_register_trainer(UNDIAL)
_register_trainer(CEU)
_register_trainer(SimNPO)
_register_trainer(DPO)
_register_trainer(IdkNLL)
_register_trainer(AltPO)
_register_trainer(SatImp)
_register_trainer(WGA)
_register_trainer(PDU)
_register_trainer(TaskVector)


def _container(cfg: Any) -> dict:
    if cfg is None:
        return {}
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def method_arg_names(cls: type) -> list[str]:
    """Keyword arguments a trainer class takes from ``trainer.method_args``."""
    names = []
    for klass in cls.__mro__:
        if klass is UnlearningTrainer or klass is FinetuneTrainer:
            break
        if "__init__" in klass.__dict__:
            params = inspect.signature(klass.__dict__["__init__"]).parameters.values()
            names += [p.name for p in params if p.kind is p.KEYWORD_ONLY or
                      (p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self")]
    names.append("nll_impl")  # FinetuneTrainer's own switch, every method
    if issubclass(cls, UnlearningTrainer):
        names.append("joint_forward")  # UnlearningTrainer's; true is an error for methods without joint_forward_batches
    if getattr(cls, "reference_nll_only", False):
        names.append("precompute_ref_log_probs")  # UnlearningTrainer's own switch, for these methods only
    return sorted(set(names))


#: ``trainer.args`` names that newer transformers versions renamed: given under the old name (which
#: every 5.x version takes), they are passed under the new one where it exists.
_RENAMED_TRAINING_ARGS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


def build_training_args(args: Mapping[str, Any], output_dir: str) -> TrainingArguments:
    """``TrainingArguments`` from ``trainer.args``, adapted to the machine.

    - ``output_dir`` is the run's staging folder (``paths.output_dir`` decides where results go);
    - without a GPU, bf16/fp16 and non-blocking copies are turned off and ``use_cpu`` on (CPU autocast
      would only be slower);
    - ``remove_unused_columns`` is off: our batches are nested (forget/retain).
    """
    args = dict(args)
    for key, why in _REMOVED_TRAINING_ARGS.items():
        if key in args:
            log.warning("trainer.args.%s is ignored (not a transformers 5 argument): %s", key, why)
            args.pop(key)
    args["output_dir"] = output_dir
    args["remove_unused_columns"] = False
    args.setdefault("report_to", "none")
    if not torch.cuda.is_available():
        if args.get("bf16") or args.get("fp16") or args.get("bf16_full_eval") or args.get("fp16_full_eval"):
            log.warning("no GPU: training in the model's own dtype on the CPU (bf16/fp16 mixed precision turned off)")
        for key in ("bf16", "fp16", "bf16_full_eval", "fp16_full_eval"):
            args[key] = False
        args["use_cpu"] = True
        if isinstance(args.get("accelerator_config"), Mapping) and args["accelerator_config"].get("non_blocking"):
            # nothing to overlap without a GPU, and transformers warns about it without pinned memory
            args["accelerator_config"] = {**args["accelerator_config"], "non_blocking": False}
    valid = {f for f in inspect.signature(TrainingArguments).parameters}
    for old_name, new_name in _RENAMED_TRAINING_ARGS.items():
        # transformers >= 5.2x renamed these (the old name warns); older 5.x only knows the old name
        if old_name in args and new_name in valid and new_name not in args:
            args[new_name] = args.pop(old_name)
    unknown = sorted(set(args) - valid)
    if unknown:
        raise ValueError(f"unknown trainer.args {unknown}; see transformers.TrainingArguments for valid names")
    return TrainingArguments(**args)


def load_trainer(trainer_cfg: DictConfig | Mapping, model: torch.nn.Module, train_dataset: Any = None,
                 eval_dataset: Any = None, tokenizer: Any = None, data_collator: Any = None,
                 output_dir: str = "saves/tmp", evaluators: Mapping[str, Any] | None = None) -> FinetuneTrainer:
    """Build the trainer named by ``trainer.handler`` with ``trainer.args`` and ``trainer.method_args``."""
    handler = trainer_cfg.get("handler")
    if handler not in TRAINER_REGISTRY:
        raise ValueError(f"unknown trainer handler {handler!r}; registered: {', '.join(sorted(TRAINER_REGISTRY))}")
    cls = TRAINER_REGISTRY[handler]
    method_args = _container(trainer_cfg.get("method_args"))
    valid = method_arg_names(cls)
    unknown = sorted(set(method_args) - set(valid))
    if unknown:
        raise ValueError(f"trainer.method_args {unknown} not accepted by {handler}; valid: {valid or 'none'}")
    kwargs = dict(model=model, args=build_training_args(_container(trainer_cfg.get("args")), output_dir),
                  train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
                  data_collator=data_collator, evaluators=evaluators)
    return cls(**kwargs, **method_args)


__all__ = ["TRAINER_REGISTRY", "_register_trainer", "load_trainer", "build_training_args", "FinetuneTrainer",
           "UnlearningTrainer"]
