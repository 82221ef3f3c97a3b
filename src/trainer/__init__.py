"""Trainers, looked up by name: ``trainer.handler`` in a config names a class registered here.

To add an unlearning method: subclass ``trainer.unlearn.base.UnlearningTrainer`` in its own file under
``src/trainer/unlearn/``, register it below with ``_register_trainer``, and add
``configs/trainer/<Name>.yaml`` (see docs/components.md).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import TrainingArguments

from checks import BadValueError, check_number
from trainer.arguments import (
    MOVED_METHOD_ARGS,
    FinetuneArguments,
    UnlearningArguments,
    moved_method_arg_message,
)
from trainer.base import FinetuneTrainer
from trainer.selection import MetricConstraint, parse_constraint, resolve_metric_key
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
    """Keyword arguments a trainer class takes from ``trainer.method_args``: the method's hyperparameters, the
    keyword arguments of its own ``__init__`` and those of its parent methods."""
    names = []
    for klass in cls.__mro__:
        if klass is UnlearningTrainer or klass is FinetuneTrainer:
            break
        if "__init__" in klass.__dict__:
            params = inspect.signature(klass.__dict__["__init__"]).parameters.values()
            names += [p.name for p in params if p.kind is p.KEYWORD_ONLY or
                      (p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self")]
    return sorted(set(names))


def trainer_class(handler: Any) -> type[FinetuneTrainer]:
    """The registered trainer class named ``handler`` (``trainer.handler``); ValueError listing the valid names."""
    if handler not in TRAINER_REGISTRY:
        raise ValueError(f"unknown trainer handler {handler!r}; registered: {', '.join(sorted(TRAINER_REGISTRY))}")
    return TRAINER_REGISTRY[handler]


def check_moved_overrides(overrides: list[str]) -> None:
    """BadValueError naming the new key when a command-line override still sets an implementation option under
    ``trainer.method_args`` (``trainer.arguments.MOVED_METHOD_ARGS``). Hydra would otherwise refuse the override
    as an unknown key without saying where the option went; the entry points call this before composing."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key.startswith("trainer.method_args.") and key.rsplit(".", 1)[-1] in MOVED_METHOD_ARGS:
            raise BadValueError(moved_method_arg_message(key.rsplit(".", 1)[-1], value or None))


#: ``trainer.args`` names that newer transformers versions renamed: given under the old name (which
#: every 5.x version takes), they are passed under the new one where it exists.
_RENAMED_TRAINING_ARGS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


#: ``trainer.args`` numbers checked before ``TrainingArguments`` sees them (``checks.check_number`` bounds):
#: a value that makes no sense (0 accumulation steps, a string seed, NaN learning rate) is refused by name.
_TRAINING_ARG_BOUNDS: dict[str, dict[str, Any]] = {
    "gradient_accumulation_steps": {"integer": True, "low": 1},
    "per_device_train_batch_size": {"integer": True, "low": 1},
    "per_device_eval_batch_size": {"integer": True, "low": 1},
    "seed": {"integer": True, "low": 0},
    "learning_rate": {"low": 0},
    "weight_decay": {"low": 0},
    "warmup_steps": {"low": 0},  # a value below 1 is a fraction of all steps
    "max_grad_norm": {"low": 0, "allow_none": True},  # 0 or null: no clipping
    "logging_steps": {"low": 0, "low_open": True},
    "eval_steps": {"low": 0, "low_open": True, "allow_none": True},
    "save_steps": {"low": 0, "low_open": True, "allow_none": True},
}


def check_training_args(args: Mapping[str, Any]) -> None:
    """ValueError naming the ``trainer.args`` key whose value makes no sense (see ``_TRAINING_ARG_BOUNDS``);
    ``max_steps`` must be > 0, or -1 to train for ``num_train_epochs`` (then > 0)."""
    for key, bounds in _TRAINING_ARG_BOUNDS.items():
        if key in args:
            check_number(f"trainer.args.{key}", args[key], **bounds)
    max_steps = check_number("trainer.args.max_steps", args.get("max_steps", -1), integer=True, low=-1)
    if max_steps == 0:
        raise BadValueError("trainer.args.max_steps=0; must be > 0 (the number of optimizer steps), or -1 to train "
                            "for trainer.args.num_train_epochs")
    if max_steps == -1 and "num_train_epochs" in args:
        check_number("trainer.args.num_train_epochs", args["num_train_epochs"], low=0, low_open=True,
                     hint="or set trainer.args.max_steps > 0")
    if args.get("load_best_model_at_end") and not evaluates(args):
        raise BadValueError("trainer.args.load_best_model_at_end=true, but the run never evaluates, so there is no best "
                            "checkpoint to end with: set trainer.args.eval_strategy=steps (with eval_steps, and "
                            "save_strategy/save_steps to match) and an evaluation (eval=<bench> or data.eval), or drop it")


def evaluates(trainer_args: Mapping[str, Any] | None) -> bool:
    """Whether the Trainer will evaluate during training (``eval_strategy`` other than ``no``, or
    ``eval_on_start``): only then is ``data.eval`` read (``get_data(..., need_eval=...)``)."""
    trainer_args = trainer_args or {}
    strategy = trainer_args.get("eval_strategy", "no")
    return str(getattr(strategy, "value", strategy)) != "no" or bool(trainer_args.get("eval_on_start"))


def check_metric_for_best_model(args: TrainingArguments, eval_dataset: Any, evaluators: Mapping[str, Any] | None,
                                constraint: str | None = None,
                                greater_is_better_given: bool = True) -> MetricConstraint | None:
    """Resolve ``trainer.args.metric_for_best_model`` (in ``args``) and ``trainer.best_model_constraint``
    to keys an evaluation of this run logs; BadValueError naming a metric no evaluation produces.

    An evaluation yields ``eval_loss`` (with ``data.eval``) and ``eval_<bench>_<metric>`` for each summary
    metric of each evaluator (``FinetuneTrainer.evaluate``); a name may leave out ``eval_`` (``loss``) and
    the benchmark (``model_utility``), see ``selection.resolve_metric_key``. Without an explicit
    ``greater_is_better`` (``greater_is_better_given=False``), the direction is the metric's own
    (``Evaluator.directions``: model_utility up, forget_Q_A_Prob down) where it has one. Returns the parsed
    constraint, or None.
    """
    name = args.metric_for_best_model
    if name is None:
        if constraint:
            raise BadValueError(f"trainer.best_model_constraint={constraint!r} needs trainer.args.metric_for_best_model "
                                "(the metric to optimise among the evaluations that pass it)")
        return None
    valid = ["eval_loss"] if eval_dataset is not None else []
    directions: dict[str, bool | None] = {}
    for bench, evaluator in (evaluators or {}).items():
        valid += [(f"eval_{bench}_{metric}", bench) for metric in evaluator.summary_names()]
        directions.update({f"eval_{bench}_{metric}": d for metric, d in evaluator.directions().items()})
    notes = []
    if eval_dataset is None:
        notes.append("eval_loss needs data.eval and trainer.args.eval_strategy other than 'no'")
    if not evaluators:
        notes.append("eval_<bench>_<metric> needs an evaluator, e.g. eval=tofu")
    if name == "loss" and args.load_best_model_at_end:
        notes.insert(0, "loss is the default of load_best_model_at_end")
    args.metric_for_best_model = resolve_metric_key(name, valid, notes=notes,
                                                    setting="trainer.args.metric_for_best_model")
    if not greater_is_better_given and directions.get(args.metric_for_best_model) is not None:
        args.greater_is_better = directions[args.metric_for_best_model]
    if not constraint:
        return None
    parsed = parse_constraint(constraint)
    key = resolve_metric_key(parsed.metric, valid, notes=notes, setting="trainer.best_model_constraint")
    return dataclasses.replace(parsed, key=key)


def check_mode(cfg: DictConfig | Mapping) -> None:
    """ValueError, before any work, when the top-level config and the trainer do not go together.

    ``train.yaml`` (``mode: train``) fine-tunes with ``trainer=finetune``; ``unlearn.yaml``
    (``mode: unlearn``) runs an unlearning method. Also checks the top-level ``seed`` (an integer >= 0).
    """
    mode = cfg.get("mode")
    handler = (cfg.get("trainer") or {}).get("handler")
    cls = TRAINER_REGISTRY.get(handler)
    if mode not in ("train", "unlearn"):
        raise ValueError(f"mode={mode!r}: src/train.py runs --config-name=train.yaml (fine-tuning) or "
                         "--config-name=unlearn.yaml (unlearning); evaluate with src/eval.py --config-name=eval.yaml")
    if cls is not None and mode == "train" and issubclass(cls, UnlearningTrainer):
        raise ValueError(f"trainer={handler} is an unlearning method but the config is train.yaml (mode: train, "
                         f"fine-tuning on data.train): use --config-name=unlearn.yaml trainer={handler} with "
                         "data.forget / data.retain")
    if cls is not None and mode == "unlearn" and not issubclass(cls, UnlearningTrainer):
        methods = sorted(n for n, c in TRAINER_REGISTRY.items() if issubclass(c, UnlearningTrainer))
        raise ValueError(f"trainer.handler={handler} fine-tunes but the config is unlearn.yaml (mode: unlearn): "
                         "fine-tune with --config-name=train.yaml trainer=finetune data.train=..., or pick an "
                         f"unlearning method: {', '.join(methods)}")
    check_number("seed", cfg.get("seed", 0), integer=True, low=0)


def build_training_args(args: Mapping[str, Any], output_dir: str,
                        arguments_class: type[FinetuneArguments] = FinetuneArguments) -> FinetuneArguments:
    """The trainer's arguments (``arguments_class``: ``FinetuneArguments``, or ``UnlearningArguments`` for an
    unlearning method; ``trainer_class(handler).arguments_class``) from ``trainer.args``, adapted to the machine.

    - values that make no sense are refused by name first (``check_training_args``);
    - ``output_dir`` is the run's staging folder (``paths.output_dir`` decides where results go);
    - without a GPU, bf16/fp16 and non-blocking copies are turned off and ``use_cpu`` on (CPU autocast
      would only be slower);
    - ``remove_unused_columns`` is off: our batches are nested (forget/retain).
    """
    args = dict(args)
    check_training_args(args)
    args["output_dir"] = output_dir
    args["remove_unused_columns"] = False
    args.setdefault("report_to", "none")
    if args.get("disable_tqdm") is None:  # bars on a terminal only: a log file or CI gets no line per update
        args["disable_tqdm"] = not sys.stderr.isatty()
    if args.get("greater_is_better") is None:
        args.pop("greater_is_better", None)  # transformers' default, then the metric's direction (load_trainer)
    if not torch.cuda.is_available():
        if args.get("bf16") or args.get("fp16") or args.get("bf16_full_eval") or args.get("fp16_full_eval"):
            log.warning("no GPU: training in the model's own dtype on the CPU (bf16/fp16 mixed precision turned off)")
        for key in ("bf16", "fp16", "bf16_full_eval", "fp16_full_eval"):
            args[key] = False
        args["use_cpu"] = True
        if isinstance(args.get("accelerator_config"), Mapping) and args["accelerator_config"].get("non_blocking"):
            # nothing to overlap without a GPU, and transformers warns about it without pinned memory
            args["accelerator_config"] = {**args["accelerator_config"], "non_blocking": False}
    valid = {f.name for f in dataclasses.fields(arguments_class) if f.init}
    for old_name, new_name in _RENAMED_TRAINING_ARGS.items():
        # transformers >= 5.2x renamed these (the old name warns); older 5.x only knows the old name
        if old_name in args and new_name in valid and new_name not in args:
            args[new_name] = args.pop(old_name)
    unknown = sorted(set(args) - valid)
    if unknown:
        unlearning_only = sorted(set(unknown) & {f.name for f in dataclasses.fields(UnlearningArguments)})
        note = f" ({', '.join(unlearning_only)}: options of unlearning methods only)" if unlearning_only else ""
        raise ValueError(f"unknown trainer.args {unknown}{note}; see transformers.TrainingArguments and "
                         f"{arguments_class.__name__} (src/trainer/arguments.py) for valid names")
    if args.get("deepspeed") is not None and isinstance(args["deepspeed"], str) and not os.path.isfile(args["deepspeed"]):
        raise ValueError(f"trainer.args.deepspeed={args['deepspeed']!r} is not a file: give a DeepSpeed JSON config "
                         "(e.g. configs/deepspeed/zero3.json) or launch with configs/accelerate/deepspeed_zero3.yaml")
    training_args = arguments_class(**args)
    if training_args.deepspeed and not torch.cuda.is_available():
        _start_deepspeed_comm_on_cpu()
    return training_args


def _start_deepspeed_comm_on_cpu() -> None:
    """DeepSpeed's own communication layer over the process group that the CPU run already has (gloo).

    On GPUs accelerate starts it with the process group; a CPU run (torchrun, ``use_cpu``) gets a plain
    gloo group, and ZeRO-3's ``zero.Init`` would otherwise count a world of one process.
    """
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")


def load_trainer(trainer_cfg: DictConfig | Mapping, model: torch.nn.Module, train_dataset: Any = None,
                 eval_dataset: Any = None, tokenizer: Any = None, data_collator: Any = None,
                 output_dir: str = "saves/tmp", evaluators: Mapping[str, Any] | None = None,
                 training_args: FinetuneArguments | None = None) -> FinetuneTrainer:
    """Build the trainer named by ``trainer.handler`` with ``trainer.args`` and ``trainer.method_args``.
    ``training_args``: the arguments
    already built from ``trainer.args`` (``build_training_args``), e.g. before the model was loaded."""
    handler = trainer_cfg.get("handler")
    cls = trainer_class(handler)
    method_args = _container(trainer_cfg.get("method_args"))
    for name in MOVED_METHOD_ARGS:
        if name in method_args:
            raise BadValueError(moved_method_arg_message(name, method_args[name]))
    valid = method_arg_names(cls)
    unknown = sorted(set(method_args) - set(valid))
    if unknown:
        raise ValueError(f"trainer.method_args {unknown} not accepted by {handler}; valid: {valid or 'none'}")
    if training_args is None:
        training_args = build_training_args(_container(trainer_cfg.get("args")), output_dir, cls.arguments_class)
    raw_args = trainer_cfg.get("args") or {}
    constraint = check_metric_for_best_model(training_args, eval_dataset, evaluators,
                                             constraint=trainer_cfg.get("best_model_constraint"),
                                             greater_is_better_given=raw_args.get("greater_is_better") is not None)
    kwargs = dict(model=model, args=training_args,
                  train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
                  data_collator=data_collator, evaluators=evaluators,
                  best_model_constraint=constraint)
    return cls(**kwargs, **method_args)


__all__ = ["TRAINER_REGISTRY", "_register_trainer", "load_trainer", "build_training_args", "FinetuneTrainer",
           "UnlearningTrainer", "FinetuneArguments", "UnlearningArguments", "trainer_class", "check_moved_overrides", "check_mode", "check_training_args", "check_metric_for_best_model", "evaluates"]
