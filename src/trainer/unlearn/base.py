"""``UnlearningTrainer``: the base class of every unlearning method.

A method subclasses it, takes its hyperparameters as keyword arguments of ``__init__`` (they arrive
from ``trainer.method_args``), and implements ``compute_loss(model, inputs, return_outputs=False)``
where ``inputs = {"forget": batch, "retain": batch}`` (``retain`` absent when no retain set is given).
Shared pieces live here so each method file holds only its loss:

- ``answer_nll`` / ``answer_mean_nll`` / ``answer_token_nll`` (from ``FinetuneTrainer``): per-sample
  summed, batch token-mean and per-token answer NLLs, computed as ``nll_impl`` says; ``forward_nll``
  also returns the logits (``nll_impl=logits``);
- ``reference_nll`` / ``reference_logits``: the same under a frozen copy of the model taken before
  unlearning, created only when ``needs_reference_model()`` is true. For methods whose reference
  enters only through ``reference_nll`` of forget samples (``reference_nll_only``: NPO, DPO, AltPO),
  those values are computed once before training (``precompute_ref_log_probs``, on by default) and
  the copy is freed unless a KL retain term still needs it;
- ``retain_loss``: the retain term, NLL or KL to the reference over answer tokens;
- ``log_loss_terms``: per-term logging (forget and retain terms appear separately in the log);
- ``evaluators`` (from ``FinetuneTrainer``): benchmarks run at each evaluation (``eval_strategy``).
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from typing import Any

import torch
from transformers import PreTrainedModel, TrainerCallback

from checks import check_bool, check_choice, check_number
from core.distributed import gather_dicts, is_sharded, lockstep_total, rank_shard
from data.collators import concat_batches
from model.forward import answer_span_logits
from model.peft import AdapterDisabled, is_peft_model
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

    def __init_subclass__(cls, **kwargs: Any):
        # Methods may write compute_loss(self, model, inputs, return_outputs=False) as in the docs;
        # the Hugging Face Trainer also passes num_items_in_batch, which such methods do not need.
        # The wrapper also runs the joint forward pass (joint_forward) before the method's loss.
        super().__init_subclass__(**kwargs)
        fn = cls.__dict__.get("compute_loss")
        if fn is None:
            return
        params = inspect.signature(fn).parameters
        takes_count = "num_items_in_batch" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

        @functools.wraps(fn)
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            extra = {"num_items_in_batch": num_items_in_batch} if takes_count else {}
            if not getattr(self, "joint_forward", False) or self._joint_nll is not None:
                return fn(self, model, inputs, return_outputs=return_outputs, **extra)
            self._joint_nll = self._joint_answer_token_nll(model, self.joint_forward_batches(inputs))
            try:
                return fn(self, model, inputs, return_outputs=return_outputs, **extra)
            finally:
                self._joint_nll = None

        cls.compute_loss = compute_loss

    def __init__(self, *args: Any, precompute_ref_log_probs: bool = True, joint_forward: bool = False,
                 **kwargs: Any):
        """``precompute_ref_log_probs`` (``trainer.method_args``, methods with ``reference_nll_only``):
        compute the reference model's answer NLL of every forget sample once before training and
        reuse it every step and epoch (the same loss values; false: one reference forward per step).

        ``joint_forward`` (``trainer.method_args``, methods that define ``joint_forward_batches``): the
        batches whose answer NLLs a step's loss reads (forget and retain, DPO's two answers) run as one
        forward pass, padded to a common width, instead of one pass each: fewer, larger matrix
        products and kernel launches, the same losses (tested)."""
        self._joint_nll: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
        precompute_ref_log_probs = check_bool("trainer.method_args.precompute_ref_log_probs", precompute_ref_log_probs,
                                              owner=type(self).__name__)
        self.joint_forward = check_bool("trainer.method_args.joint_forward", joint_forward, owner=type(self).__name__)
        if self.joint_forward and type(self).joint_forward_batches is UnlearningTrainer.joint_forward_batches:
            raise ValueError(f"joint_forward=true: {type(self).__name__} does not support it (its loss reads logits or "
                             "hidden states, or a single batch per step); methods that do: GradDiff, NPO, SimNPO, "
                             "DPO, AltPO, IdkNLL, WGA, SatImp")
        super().__init__(*args, **kwargs)
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
        if precompute_ref_log_probs and self.reference_nll_only and self.ref_model is not None and has_forget:
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
                       **extra_terms: Any) -> torch.Tensor:
        """``gamma * forget_loss + alpha * retain_loss`` (retain term only if configured); logs each term."""
        loss = self.gamma * forget_loss
        terms = {"forget_loss": forget_loss, **extra_terms}
        if self.retain_loss_type is not None:
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
                    "trainer.method_args.precompute_ref_log_probs=false to compute it at every step"
                )
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

    # ----- joint forward pass (joint_forward) -------------------------------------------------------
    def joint_forward_batches(self, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """The batches of ``inputs`` whose answer NLLs the loss reads through ``answer_token_nll`` /
        ``answer_nll`` / ``answer_mean_nll``; a method that defines it supports ``joint_forward``."""
        raise NotImplementedError

    def nll_retain_batches(self, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """``[inputs["retain"]]`` when the retain term is the NLL one, else ``[]`` (for ``joint_forward_batches``)."""
        return [inputs["retain"]] if self.retain_loss_type == "NLL" and "retain" in inputs else []

    def forget_and_nll_retain_batches(self, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """``joint_forward_batches`` of methods whose forget term reads the NLLs of ``inputs["forget"]``:
        set ``joint_forward_batches = UnlearningTrainer.forget_and_nll_retain_batches`` in the class."""
        return [inputs["forget"], *self.nll_retain_batches(inputs)]

    def _joint_answer_token_nll(self, model: torch.nn.Module,
                                batches: list[dict[str, Any]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``(NLL_t, mask)`` of each batch (by ``id``) from one forward pass over their rows."""
        if len(batches) < 2:  # nothing to join: answer_token_nll computes it as usual
            return {}
        nll, mask = super().answer_token_nll(model, concat_batches(batches))
        results, row = {}, 0
        for batch in batches:
            rows = slice(row, row + batch["input_ids"].shape[0])
            results[id(batch)] = (nll[rows], mask[rows])
            row = rows.stop
        return results

    def answer_token_nll(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._joint_nll is not None and id(batch) in self._joint_nll:
            return self._joint_nll.pop(id(batch))
        return super().answer_token_nll(model, batch)

    # ----- shared pieces ---------------------------------------------------------------------------
    def forward_nll(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                   torch.Tensor | None]:
        """``(S [B], T [B], logits)`` of a batch: per-sample summed answer NLL, answer-token counts and the
        answer-span logits (None unless ``nll_impl`` is ``logits``: the other ways never hold them all)."""
        if self.nll_impl == "logits":
            logits, labels = answer_span_logits(model, batch)
            return *sequence_nll(logits, labels), logits
        return *self.answer_nll(model, batch), None

    def retain_loss(self, model: torch.nn.Module, batch: dict[str, Any], loss_type: str) -> torch.Tensor:
        """Retain term: ``NLL`` (mean answer-token NLL) or ``KL`` (``answer_kl`` to the reference)."""
        if loss_type == "NLL":
            return self.answer_mean_nll(model, batch)
        if loss_type == "KL":
            logits, labels = answer_span_logits(model, batch)
            return answer_kl(logits, self.reference_logits(batch), labels)
        raise ValueError(f"retain_loss_type={loss_type!r}; valid: {', '.join(RETAIN_LOSS_TYPES)}")
