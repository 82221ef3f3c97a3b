"""How a causal LM is run: through its wrappers (distributed, compiled, PEFT) to the transformers model, with
only the inputs and outputs a loss or a metric needs. Used by training (``trainer``) and evaluation (``evals``).

- ``unwrap`` / ``forward_accepts``: the transformers model inside the wrappers, and what its forward takes;
- ``model_inputs``: the tensors of a collated batch the forward takes;
- ``answer_span_logits``: logits over the answer span only (the output layer skips the prompts);
- ``last_hidden_states``: the input of the output layer, the output layer itself run on one position.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from core.distributed import unwrap_parallel
from data.collators import batch_layout
from model.peft import AdapterDisabled, is_peft_model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside distributed / compiled wrappers (``.module``, ``._orig_mod``), a PEFT
    ``PeftModel`` and an ``AdapterDisabled`` view: the model whose layers, config and output layer the
    helpers read (LoRA's layers sit inside it, so reading them sees the adapters too)."""
    while True:
        model = unwrap_parallel(model)
        if isinstance(model, AdapterDisabled):
            model = model.peft_model
        elif is_peft_model(model):
            model = model.get_base_model()
        else:
            return model


@functools.cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def forward_accepts(model: torch.nn.Module, *names: str) -> bool:
    """Whether the forward of ``model`` (through wrappers) takes every keyword argument in ``names``."""
    return set(names) <= _forward_parameters(type(unwrap(model)))


MODEL_INPUT_KEYS = ("input_ids", "attention_mask")


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors a causal LM's forward takes from a collated batch (labels and indices stay out).

    A batch whose layout says causal attention suffices (``BatchLayout.causal_attention_suffices``: right
    padding, a mask that hides padding only) goes in without its attention mask. With the padding after
    every real token, causal attention alone already keeps real positions from seeing it, and position
    ids count from 0 either way, so every real position gets the same hidden state (only the padding
    positions, which no loss reads, differ). Without a mask transformers neither reads the mask back from
    the device to decide whether it can be skipped (two synchronisations per forward pass) nor builds a
    ``[B, 1, L, L]`` mask, and SDPA runs its causal kernel (flash attention on a GPU).
    """
    keys = ("input_ids",) if batch_layout(batch).causal_attention_suffices else MODEL_INPUT_KEYS
    return {k: batch[k] for k in keys if k in batch}


def answer_span_logits(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of a batch over its answer span only: the output layer skips the prompts.

    Every loss in ``trainer.losses`` reads a logit only where it predicts an answer token (label not
    -100). The span starts one position before the first answer label of any row (the batch layout's
    ``answer_start``, known on the host, so no device synchronisation is needed) and runs to the end;
    the output layer runs only there, through the model's ``logits_to_keep`` argument. ``labels`` is cut
    alike, so ``logits[:, t]`` still sits at the position of ``labels[:, t]`` and every loss has the value
    of a full forward pass. On TOFU the prompts are about 40 % of the positions: that much less
    output-layer compute and vocabulary-sized logit memory.
    """
    labels = batch["labels"]
    start = batch_layout(batch).answer_start
    if start is None:
        raise ValueError("answer_span_logits needs a batch with labels collated with them (its layout has no "
                         "answer_start)")
    begin = max(int(start) - 1, 0)
    inputs = model_inputs(batch)
    if begin > 0 and forward_accepts(model, "logits_to_keep"):
        logits = model(**inputs, logits_to_keep=labels.shape[1] - begin).logits
    else:
        logits = model(**inputs).logits[:, begin:]
    return logits, labels[:, begin:]


def last_hidden_states(model: torch.nn.Module, batch: dict[str, Any],
                       inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The input of the output layer ``[B, L, d]`` (after the final norm), from the model's own forward.

    The forward goes through ``model`` itself (wrappers such as DDP see it); a hook on the decoder
    keeps its ``last_hidden_state``, and the output layer runs on the last position only. ``inputs``
    replaces the model inputs taken from ``batch`` (``model_inputs``), e.g. a packed layout's.
    """
    captured: list[torch.Tensor] = []
    decoder = unwrap(model).get_decoder()
    handle = decoder.register_forward_hook(lambda _m, _a, out: captured.append(
        out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]))
    try:
        extra = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}
        model(**(inputs if inputs is not None else model_inputs(batch)), **extra)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected the decoder to run once in the forward pass, it ran {len(captured)} times")
    return captured[0]


__all__ = ["unwrap", "forward_accepts", "MODEL_INPUT_KEYS", "model_inputs", "answer_span_logits", "last_hidden_states"]
