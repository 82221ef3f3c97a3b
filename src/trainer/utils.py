"""Model-internals helpers shared by trainers: decoder layers and truncated forwards.

``hidden_states_at(model, layer_index, **inputs)`` returns the output of decoder layer ``layer_index``
(0-based) without running the layers after it nor the LM head. A forward hook on
``layers[layer_index]`` stores the layer's output and raises a private ``_StopForward`` exception,
which the function catches; the hook is removed in every case. Works for any Hugging Face decoder
whose layers are ``model.model.layers`` (Llama, Mistral, Qwen, Gemma, SmolLM...).

Relation to ``output_hidden_states=True``: for ``layer_index < num_layers - 1`` the result equals
``hidden_states[layer_index + 1]`` exactly; for the last layer Hugging Face reports the output *after*
the final norm (``hidden_states[-1] = model.model.norm(h)``), while this returns the raw layer output.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from model.peft import AdapterDisabled, is_peft_model


class _StopForward(Exception):
    """Raised by the capture hook once the wanted layer has run (never escapes ``hidden_states_at``)."""


def unwrap_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside distributed / compiled wrappers (``.module``, ``._orig_mod``) only."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def is_fsdp2_module(model: torch.nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP2 (``fully_shard`` changes the module's class in place, no wrapper)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed support
        return False
    return isinstance(unwrap_parallel(model), FSDPModule) or isinstance(model, FSDPModule)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s weights are split over the processes (FSDP2, or DeepSpeed ZeRO-3 partitioned
    parameters), so that every forward pass is a collective call that all processes must make together."""
    if not isinstance(model, torch.nn.Module):
        return False
    if is_fsdp2_module(model):
        return True
    return any(hasattr(p, "ds_id") for p in unwrap_parallel(model).parameters())


def lockstep_total(count: int) -> int:
    """The largest ``count`` over the processes (``count`` itself without a process group): how many
    collective steps every process runs so that none waits for a call the others never make."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count
    total = torch.tensor(count, dtype=torch.long)
    if torch.distributed.get_backend() == "nccl":
        total = total.cuda()
    torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.MAX)
    return int(total)


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


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers (``model.model.layers``) of a causal LM, through wrappers."""
    base = unwrap(model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(base).__name__} has no decoder layers at model.model.layers; "
                         "representation methods need a Hugging Face decoder-only model")
    return layers


def check_layer_index(model: torch.nn.Module, layer_index: int, name: str = "layer_id") -> None:
    """ValueError naming ``name`` and the valid range when ``layer_index`` is not a decoder layer."""
    n = len(decoder_layers(model))
    if isinstance(layer_index, bool) or not isinstance(layer_index, int) or not 0 <= layer_index < n:
        raise ValueError(f"{name}={layer_index!r} is out of range: the model has {n} decoder layers, "
                         f"valid {name} values are 0..{n - 1}")


def hidden_states_at(model: torch.nn.Module, layer_index: int, **inputs: Any) -> torch.Tensor:
    """Output ``[B, L, d]`` of decoder layer ``layer_index`` (0-based); later layers and the head do not run.

    ``inputs`` are the model's forward keyword arguments (``input_ids``, ``attention_mask``...).

    A model wrapped for distributed training (DistributedDataParallel, a DeepSpeed engine) or sharded
    (FSDP2, ZeRO-3) is run to the end with the hook only capturing: stopping it early would skip the
    wrapper's post-forward bookkeeping (gradient synchronisation, FSDP's resharding, ZeRO-3's release of
    gathered weights), silently or with a hang.
    """
    check_layer_index(model, layer_index, "layer_index")
    layer = decoder_layers(model)[layer_index]
    stop_early = unwrap_parallel(model) is model and not is_sharded(model)
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, (tuple, list)) else output)
        if stop_early:
            raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        model(**{"use_cache": False, **inputs})
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"decoder layer {layer_index} did not run during the forward pass")
    return captured[0]


def rank_shard(indices: Sequence[int]) -> list[int]:
    """This process's strided share of ``indices`` (all of them without ``torch.distributed``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return list(indices[rank::world])
    return list(indices)


def is_main_process() -> bool:
    """Whether this is process 0 (or the only process)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def on_main_process(compute: Callable[[], Any]) -> Any:
    """``compute()`` run by process 0 only, its result (or its exception, re-raised) on every process.

    For decisions that read the file system and steer collective calls (reuse an EVAL file, start the
    output folder): each process deciding for itself can see a file another process is writing, and
    the processes would then run different numbers of collectives and wait for each other forever.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return compute()
    shared: list = [None]
    if torch.distributed.get_rank() == 0:
        try:
            shared[0] = (True, compute())
        except Exception as e:  # handed to every process, so that all fail together
            shared[0] = (False, e)
    torch.distributed.broadcast_object_list(shared, src=0)
    ok, value = shared[0]
    if not ok:
        raise value
    return value


def gather_dicts(part: dict) -> dict:
    """The union of every process's ``part`` (``all_gather_object``), on every process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        parts: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, part)
        merged: dict = {}
        for p in parts:
            merged.update(p)
        return merged
    return part
