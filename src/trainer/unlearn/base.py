"""``UnlearningTrainer``: the base class of every unlearning method.

A method subclasses it, takes its hyperparameters as keyword arguments of ``__init__`` (they arrive
from ``trainer.method_args``), and implements Hugging Face's
``compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None)`` where
``inputs = {"forget": batch, "retain": batch}`` (``retain`` absent when no retain set is given). The
``compute_loss`` a method writes is the one that runs. Shared pieces live here so each method file holds
only its loss:

- ``answer_nll`` / ``answer_mean_nll`` / ``answer_token_nll`` (from ``FinetuneTrainer``): per-sample
  summed, batch token-mean and per-token answer NLLs, computed as ``trainer.args.nll_impl`` says;
  ``answer_nlls(model, *batches)`` gives those of several batches, from one forward pass when
  ``trainer.args.joint_forward`` is on (methods that call it declare ``supports_joint_forward``);
- ``reference_nll`` / ``reference_logits``: the same under a frozen copy of the model taken before
  unlearning, created only when ``needs_reference_model()`` is true. For methods whose reference
  enters only through ``reference_nll`` of forget samples (``reference_nll_only``: NPO, DPO, AltPO),
  those values are computed once before training (``trainer.args.precompute_ref_log_probs``, on by
  default) and the copy is freed unless a KL retain term still needs it;
- ``retain_loss`` / ``weighted_total``: the retain term, NLL or KL to the reference over answer tokens,
  and ``gamma * forget + alpha * retain``;
- ``log_loss_terms``: per-term logging (forget and retain terms appear separately in the log);
- ``token_mean_processes``: the process count every token-mean loss takes (``trainer.losses``);
- ``evaluators`` (from ``FinetuneTrainer``): benchmarks run at each evaluation (``eval_strategy``).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from transformers import PreTrainedModel, TrainerCallback

from checks import check_choice, check_number
from core.compute import add_tokens, mask_tokens
from core.distributed import gather_dicts, is_sharded, lockstep_total, rank_shard
from data.collators import concat_batches
from model.forward import answer_span_logits
from model.peft import AdapterDisabled, is_peft_model
from trainer.answer_nll import AnswerNLL
from trainer.arguments import UnlearningArguments
from trainer.base import FinetuneTrainer
from trainer.losses import answer_kl, sequence_nll
from trainer.reference_cache import KeyedCollator, ReferenceNLLCache, leaf_samples

log = logging.getLogger(__name__)


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in evaluation mode with no parameter requiring gradients (a reference model)."""
    model.eval()
    model.requires_grad_(False)
    return model

RETAIN_LOSS_TYPES = ("NLL", "KL")


class _SetEpoch(TrainerCallback):
    """Tells the paired dataset the epoch, so each epoch draws new retain partners."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


class UnlearningTrainer(FinetuneTrainer):
    """Base class of unlearning methods (see the module docstring for the contract)."""

    #: Whether the method trains on the retain set (a missing retain set is then an error).
    uses_retain: bool = False
    #: Whether the loss always compares with the frozen model from before unlearning (NPO, DPO, UNDIAL,
    #: RMU); otherwise the reference model is loaded only for a KL retain term.
    uses_reference_model: bool = False
    #: Whether the reference model enters the loss only through ``reference_nll`` of forget samples
    #: (NPO, DPO, AltPO): then those values can be computed once before training.
    reference_nll_only: bool = False

    #: Whether the loss reads its answer NLLs through ``answer_nlls`` with more than one batch, so that
    #: ``trainer.args.joint_forward`` can run them as one forward pass (refused for the other methods).
    supports_joint_forward: bool = False
    arguments_class = UnlearningArguments

    def __init__(self, model: torch.nn.Module | None = None, args: UnlearningArguments | None = None, *rest: Any,
                 **kwargs: Any):
        """The Trainer's arguments (``model``, ``args``: an ``UnlearningArguments``, datasets, ...); a method's
        own ``__init__`` takes its hyperparameters first and passes the rest here.

        ``args.precompute_ref_log_probs`` (methods with ``reference_nll_only``): compute the reference model's
        answer NLL of every forget sample once before training and reuse it every step and epoch (the same
        loss values; false: one reference forward per step). ``args.joint_forward`` (methods with
        ``supports_joint_forward``): ``answer_nlls`` runs its batches as one forward pass, padded to a common
        width, instead of one pass each: fewer, larger matrix products and kernel launches, the same losses
        (tested)."""
        super().__init__(model, args, *rest, **kwargs)
        if self.args.joint_forward and not self.supports_joint_forward:
            methods = sorted({c.__name__ for c in _subclasses(UnlearningTrainer)
                              if c.supports_joint_forward and c.__module__.startswith("trainer.unlearn.")})
            raise ValueError(f"trainer.args.joint_forward=true: {type(self).__name__} does not support it (its loss "
                             "reads logits or hidden states, or a single batch per step); methods that do: "
                             f"{', '.join(methods)}")
        retain = getattr(self.train_dataset, "retain", None)
        if self.uses_retain and self.train_dataset is not None and retain is None:
            raise ValueError(
                f"{type(self).__name__} trains on a retain set but none is given: set data.retain "
                "(e.g. data.retain=TOFU_QA_RETAIN90)"
            )
        if hasattr(self.train_dataset, "set_epoch"):
            self.add_callback(_SetEpoch(self.train_dataset))
        self.ref_model = self._make_reference_model() if self.needs_reference_model() else None
        self.reference_cache: ReferenceNLLCache | None = None
        has_forget = getattr(self.train_dataset, "forget", None) is not None
        if self.args.precompute_ref_log_probs and self.reference_nll_only and self.ref_model is not None and has_forget:
            self.reference_cache = self._precompute_reference_nll()
            if len(self.reference_cache) == 0:  # forget items without samples (hand-built batches): per step
                self.reference_cache = None
            else:
                if self.data_collator is not None:
                    self.data_collator = KeyedCollator(self.data_collator)
                if getattr(self, "retain_loss_type", None) != "KL":
                    self.ref_model = None  # nothing else reads it: free its memory

    # ----- hyperparameter checks ---------------------------------------------------------------------
    def check_arg(self, name: str, value: Any, **bounds: Any) -> Any:
        """``trainer.method_args.<name>`` checked by ``checks.check_number`` (``low``, ``high``, ``low_open``,
        ``integer``, ``allow_none``, ``hint``): the value, or a ValueError naming the method, the key, the
        value and the valid range. Methods call it in ``__init__`` for every number they take."""
        return check_number(f"trainer.method_args.{name}", value, owner=type(self).__name__, **bounds)

    def check_arg_choice(self, name: str, value: Any, choices: Any, allow_none: bool = False) -> Any:
        """``trainer.method_args.<name>`` checked to be one of ``choices`` (``checks.check_choice``)."""
        return check_choice(f"trainer.method_args.{name}", value, choices, allow_none=allow_none,
                            owner=type(self).__name__)

    # ----- loss weights and the retain term ---------------------------------------------------------
    def set_loss_weights(self, gamma: float, alpha: float, retain_loss_type: str | None,
                         retain_required: bool = False) -> None:
        """Store ``gamma`` (forget weight), ``alpha`` (retain weight) and the retain term's type.

        Call before ``super().__init__`` (the base class checks the retain set against ``uses_retain``).
        ``gamma`` and ``alpha`` are weights (>= 0: a negative one would turn forgetting into learning, or
        the retain term into unlearning); ``retain_loss_type`` is NLL, KL, or (unless ``retain_required``)
        None for no retain term.
        """
        self.retain_loss_type = self.check_arg_choice("retain_loss_type", retain_loss_type, RETAIN_LOSS_TYPES,
                                                      allow_none=not retain_required)
        self.gamma = self.check_arg("gamma", gamma, low=0)
        self.alpha = self.check_arg("alpha", alpha, low=0)
        self.uses_retain = retain_loss_type is not None

    def weighted_total(self, model: torch.nn.Module, inputs: dict[str, Any], forget_loss: torch.Tensor,
                       retain_nll: AnswerNLL | None = None, **extra_terms: Any) -> torch.Tensor:
        """``gamma * forget_loss + alpha * retain_loss`` (retain term only if configured); logs each term.

        ``retain_nll``: the retain batch's answer NLLs when the method already has them (``answer_nlls`` with
        ``nll_retain_batch``); the NLL retain term is then their token mean, else it is computed here."""
        loss = self.gamma * forget_loss
        terms = {"forget_loss": forget_loss, **extra_terms}
        if self.retain_loss_type is not None:
            if retain_nll is not None and self.retain_loss_type == "NLL":
                terms["retain_loss"] = self.token_mean(retain_nll)
            else:
                terms["retain_loss"] = self.retain_loss(model, inputs["retain"], self.retain_loss_type)
            loss = loss + self.alpha * terms["retain_loss"]
        self.log_loss_terms(**terms)
        return loss

    # ----- reference model -------------------------------------------------------------------------
    def needs_reference_model(self) -> bool:
        """Whether the method compares against the model before unlearning.

        True when the method's loss uses it (``uses_reference_model``) or the retain term is KL.
        """
        return self.uses_reference_model or getattr(self, "retain_loss_type", None) == "KL"

    def _make_reference_model(self) -> PreTrainedModel:
        """A frozen copy of the model as it is before unlearning, loaded once.

        Under LoRA (``model.peft``) it is the policy itself with its adapters switched off
        (``model.peft.AdapterDisabled``): no second copy. Otherwise it is prepared by the Trainer's
        accelerator as the policy is (``evaluation_mode``: no
        distributed wrapper), so it runs with the same mixed-precision autocast: with float32
        weights and ``bf16: true`` the policy's forward runs under bf16 autocast, and a reference
        left in float32 would make every log-ratio ``S_ref - S`` non-zero at step 0.
        """
        policy = self.accelerator.unwrap_model(self.model)
        if is_peft_model(policy):  # LoRA: the base weights never train, so the model without adapters is the reference
            return AdapterDisabled(policy)
        if self.is_fsdp_enabled:
            return self._sharded_reference_model(policy)
        if self.is_deepspeed_enabled:
            return self._deepspeed_reference_model(policy)
        ref = _frozen(copy.deepcopy(policy))
        return self.accelerator.prepare_model(ref.to(self.args.device), evaluation_mode=True)

    def _sharded_reference_model(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The reference under FSDP2: a copy of the (not yet sharded) policy, sharded with the run's own FSDP
        settings (``accelerate``'s ``fsdp2_prepare_model``), so each process holds its shard only."""
        if not self.accelerator.is_fsdp2:
            raise ValueError(f"{type(self).__name__} needs a frozen reference model, which is sharded with FSDP2 only: "
                             "set fsdp_version: 2 in the accelerate config (configs/accelerate/fsdp.yaml)")
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(self.accelerator, _frozen(copy.deepcopy(policy)))

    def _deepspeed_reference_model(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The reference under DeepSpeed: an inference engine (``deepspeed.initialize`` without an optimizer)
        built from the run's own DeepSpeed config, so it runs in the policy's precision.

        Under ZeRO-3 a pretrained policy is already partitioned (``zero.Init``): the reference is created
        partitioned the same way and each process copies its own partition of every weight, so no process
        ever holds a whole model. Otherwise (ZeRO-1/2, or a small random-weight model built whole) the
        reference is a copy of the policy (stage 0 for the engine: partitioning optimizer state means
        nothing without an optimizer).
        """
        import deepspeed

        config = {key: value for key, value in copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config).items()
                  if key not in ("optimizer", "scheduler")}
        if is_sharded(policy):
            weights = list(policy.parameters())
            # transformers creates it under zero.Init with the run's DeepSpeed config (and skips initialising
            # partitioned weights, which the copy below overwrites anyway)
            ref = type(policy)._from_config(policy.config, dtype=weights[0].ds_tensor.dtype)
            copies = list(ref.parameters())
            if len(copies) != len(weights) or any(c.ds_tensor.shape != w.ds_tensor.shape for c, w in zip(copies, weights)):
                raise RuntimeError(f"the ZeRO-3 reference of {type(policy).__name__} is not partitioned as the policy "
                                   "is (was the policy changed after it was loaded?)")
            with torch.no_grad():
                for mine, theirs in zip(copies, weights):
                    mine.ds_tensor.copy_(theirs.ds_tensor)
                ours = dict(ref.named_buffers())
                for name, buffer in policy.named_buffers():
                    ours[name].copy_(buffer)
            log.info("reference model: a ZeRO-3 copy holding this process's partition of each weight")
        else:
            ref = copy.deepcopy(policy)
            config["zero_optimization"] = {"stage": 0}
        engine, *_ = deepspeed.initialize(model=_frozen(ref), config=config)
        engine.eval()
        return engine

    def _reference(self) -> torch.nn.Module:
        if self.ref_model is None:
            raise RuntimeError(f"{type(self).__name__} asked for reference outputs but needs_reference_model() is False")
        return self.ref_model

    @torch.no_grad()
    def reference_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """Reference-model logits over the batch's answer span (aligned with ``answer_span_logits``)."""
        add_tokens(self._reference(), mask_tokens(batch))  # a forward pass, for the cost record
        return answer_span_logits(self._reference(), batch)[0]

    @torch.no_grad()
    def reference_nll(self, batch: dict[str, Any]) -> torch.Tensor:
        """Per-sample summed answer NLL ``S_ref`` ``[B]`` under the reference model (precomputed if cached)."""
        if self.reference_cache is not None:
            cached = self.reference_cache.lookup(batch)
            if cached is not None:
                return cached
            if self.ref_model is None:
                raise RuntimeError(
                    f"{type(self).__name__}: a training sample is not among the forget samples whose reference NLL "
                    "was precomputed (does the forget dataset change its items between calls?); set "
                    "trainer.args.precompute_ref_log_probs=false to compute it at every step"
                )
        add_tokens(self._reference(), mask_tokens(batch))  # a forward pass, for the cost record
        return sequence_nll(*answer_span_logits(self._reference(), batch))[0]

    def _precompute_reference_nll(self) -> ReferenceNLLCache:
        """``S_ref`` of every sample of every forget item (both answers of a DPO pair), before training.

        With several processes each computes a strided share and the shares are exchanged.
        """
        forget = self.train_dataset.forget
        samples = [s for i in rank_shard(range(len(forget))) for s in leaf_samples(forget[i])]
        cache = ReferenceNLLCache()
        # An inference pass: batches of the evaluation size (no activations kept for a backward pass).
        batch_size = max(self.args.per_device_eval_batch_size, self.args.per_device_train_batch_size)
        num_batches = None
        if is_sharded(self.ref_model):  # a sharded forward is collective: every process runs as many batches
            if not samples:  # fewer forget items than processes: this one scores a real sample again (same value)
                samples = leaf_samples(forget[0])
            num_batches = lockstep_total(-(-len(samples) // batch_size))
        cache.fill(self.ref_model, samples, self.data_collator, batch_size, self.args.device, num_batches=num_batches)
        cache.values = gather_dicts(cache.values)
        log.info("%s: reference NLL of %d forget samples precomputed", type(self).__name__, len(cache))
        return cache

    # ----- answer NLLs of several batches (joint_forward) -------------------------------------------
    def nll_retain_batch(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """``inputs["retain"]`` when the retain term is the NLL one (its NLLs can join ``answer_nlls``), else None."""
        return inputs["retain"] if self.retain_loss_type == "NLL" else None

    def answer_nlls(self, model: torch.nn.Module, *batches: dict[str, Any] | None) -> list[AnswerNLL | None]:
        """The answer NLLs of each batch (None for a None batch), in order.

        With ``trainer.args.joint_forward`` the batches run as one forward pass over their rows, padded to a
        common width (``data.collators.concat_batches``), and the result is split back by rows: the same
        values as one pass each, up to float rounding. A method that calls this with more than one batch sets
        ``supports_joint_forward = True``.
        """
        present = [batch for batch in batches if batch is not None]
        if not (self.args.joint_forward and len(present) > 1):
            return [None if batch is None else self.answer_token_nll(model, batch) for batch in batches]
        joint = self.answer_token_nll(model, concat_batches(present))
        results, row = [], 0
        for batch in batches:
            if batch is None:
                results.append(None)
                continue
            rows = slice(row, row + batch["input_ids"].shape[0])
            results.append(AnswerNLL(joint.per_token[rows], joint.mask[rows]))
            row = rows.stop
        return results

    # ----- shared pieces ---------------------------------------------------------------------------
    def forward_nll(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor | None]:
        """``(S [B], T [B], logits)`` of a batch: per-sample summed answer NLL, answer-token counts and the
        answer-span logits (None unless ``args.nll_impl`` is ``logits``: the other ways never hold them all)."""
        if self.args.nll_impl == "logits":
            logits, labels = answer_span_logits(model, batch)
            return *sequence_nll(logits, labels), logits
        return *self.answer_nll(model, batch), None

    def retain_loss(self, model: torch.nn.Module, batch: dict[str, Any], loss_type: str) -> torch.Tensor:
        """Retain term: ``NLL`` (mean answer-token NLL) or ``KL`` (``answer_kl`` to the reference)."""
        if loss_type == "NLL":
            return self.answer_mean_nll(model, batch)
        if loss_type == "KL":
            logits, labels = answer_span_logits(model, batch)
            return answer_kl(logits, self.reference_logits(batch), labels, self.token_mean_processes)
        raise ValueError(f"retain_loss_type={loss_type!r}; valid: {', '.join(RETAIN_LOSS_TYPES)}")


def _subclasses(cls: type) -> list[type]:
    """Every class below ``cls`` defined so far (the methods of src/trainer/unlearn/ are all imported by the
    registry, which sits above them)."""
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found
