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

from typing import Any

import torch

from core.distributed import is_sharded, unwrap_parallel
from model.forward import unwrap


class _StopForward(Exception):
    """Raised by the capture hook once the wanted layer has run (never escapes ``hidden_states_at``)."""










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








