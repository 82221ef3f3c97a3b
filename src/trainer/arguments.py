"""Typed trainer arguments: ``transformers.TrainingArguments`` plus our implementation options.

The options below choose *how* a step is computed, never *what* it computes: every setting gives the
same losses up to float rounding (tests/test_speed_knobs.py, tests/test_packing.py). They live in
``trainer.args`` next to transformers' own keys, as TRL's configs carry ``use_liger_kernel`` and
``padding_free``; ``trainer.method_args`` holds only a method's hyperparameters.

``FinetuneArguments`` is what every trainer takes; ``UnlearningArguments`` adds the options of the
unlearning base class. A trainer class names its arguments class (``FinetuneTrainer.arguments_class``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from checks import check_bool, check_choice
from trainer.answer_nll import NLL_IMPLS
from trainer.packing import check_pack_rows

#: Keys that were ``trainer.method_args`` before they became trainer arguments: a config or override that
#: still sets one is refused with its new place (``moved_method_arg_message``).
MOVED_METHOD_ARGS = ("nll_impl", "pack_rows", "joint_forward", "precompute_ref_log_probs")


def moved_method_arg_message(name: str, value: Any = None) -> str:
    """What a user who set ``trainer.method_args.<name>`` (an implementation option) is told."""
    shown = "" if value is None else f"={str(value).lower() if isinstance(value, bool) else value}"
    return (f"trainer.method_args.{name}{shown}: {name} is an option of the trainer, not a hyperparameter of the "
            f"method; set trainer.args.{name}{shown} instead")


@dataclass
class FinetuneArguments(TrainingArguments):
    """``TrainingArguments`` with how answer-token NLLs are computed (every trainer).

    Args:
        nll_impl: ``logits`` (the model's logits over the answer span, then cross-entropy), ``chunked``
            (the output layer applied a chunk of answer tokens at a time and recomputed in the backward
            pass: no ``[tokens, vocab]`` block kept) or ``liger`` (Liger Kernel's fused linear
            cross-entropy, CUDA); ``trainer.answer_nll``.
        pack_rows: ``True``, ``False`` or ``"auto"`` (on a CPU with SDPA or eager attention): a batch's
            rows packed into padding-free sequences that compute their common prompt prefix once
            (``trainer.packing``).
    """

    nll_impl: str = field(default="logits", metadata={"help": "logits, chunked or liger (trainer.answer_nll)"})
    pack_rows: bool | str = field(default="auto", metadata={"help": "true, false or auto (trainer.packing)"})

    def __post_init__(self) -> None:
        check_choice("trainer.args.nll_impl", self.nll_impl, NLL_IMPLS)
        check_pack_rows(self.pack_rows)
        super().__post_init__()


@dataclass
class UnlearningArguments(FinetuneArguments):
    """``FinetuneArguments`` with the unlearning base class's options.

    Args:
        joint_forward: the batches whose answer NLLs a step's loss reads (forget and NLL-retain, DPO's two
            answers) run as one forward pass, padded to a common width, instead of one pass each; only for
            methods that declare ``supports_joint_forward``.
        precompute_ref_log_probs: for methods whose reference model enters only through the reference NLL of
            forget samples (``reference_nll_only``: NPO, DPO, AltPO), compute those once before training (the
            reference copy is then freed unless a KL retain term needs it); ``False``: a reference pass per
            step. No effect on other methods.
    """

    joint_forward: bool = field(default=False, metadata={"help": "one forward pass for the step's NLL batches"})
    precompute_ref_log_probs: bool = field(default=True,
                                           metadata={"help": "reference NLLs of the forget samples computed once"})

    def __post_init__(self) -> None:
        check_bool("trainer.args.joint_forward", self.joint_forward)
        check_bool("trainer.args.precompute_ref_log_probs", self.precompute_ref_log_probs)
        super().__post_init__()


__all__ = ["FinetuneArguments", "UnlearningArguments", "MOVED_METHOD_ARGS", "moved_method_arg_message"]
