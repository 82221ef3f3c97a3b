"""Quantization attack: evaluate a quantized copy of the model (Zhang et al. 2024, "Catastrophic Failure of
LLM Unlearning via Quantization", arXiv:2410.16454).

Unlearning with a small learning rate moves the weights so little that rounding them to a 4-bit grid
often lands them back on the original model's grid points: the "forgotten" answers return. The finding
rests on plain round-to-nearest (RTN) weight-only quantization, which is what ``method=rtn`` does on any
device: every ``nn.Linear`` weight (not the embeddings or the output head, as in the paper's setting) is
cut into groups of ``group_size`` consecutive input columns of one output row, and each group is mapped
to ``2**bits`` evenly spaced levels between its minimum and maximum (asymmetric, with a zero point), or
to a symmetric grid around 0 (``symmetric=true``), then mapped back to floating point ("fake
quantization": the same numbers a quantized kernel computes with, in the model's own dtype).

``method=nf4`` / ``int8`` use bitsandbytes (CUDA only, the ``qlora`` extra): a 4-bit NormalFloat or 8-bit
LLM.int8() copy loaded from a saved folder of the model.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

from checks import BadValueError, check_bool, check_choice, check_number

log = logging.getLogger(__name__)

METHODS = ("rtn", "nf4", "int8")


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None,
                 symmetric: bool = False) -> torch.Tensor:
    """Round-to-nearest fake quantization of a 2-D weight ``[out, in]``, returned in its dtype.

    Each group (``group_size`` consecutive input columns of a row, the last group of a row holding the
    remaining ``in % group_size`` columns when the size does not divide the width; None: the whole row, one
    scale per output channel) gets ``scale = (max - min) / (2**bits - 1)`` and ``zero = round(-min / scale)``;
    a weight becomes ``(clamp(round(w / scale) + zero, 0, 2**bits - 1) - zero) * scale``. ``symmetric``:
    ``scale = max|w| / (2**(bits-1) - 1)``, levels ``-2**(bits-1) .. 2**(bits-1) - 1``, no zero point. A group
    of equal values is kept as it is (its scale would be 0). Computed in float32.
    """
    if weight.dim() != 2:
        raise BadValueError(f"rtn_quantize: a 2-D weight is needed, got shape {tuple(weight.shape)}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise BadValueError(f"attack.quantize.bits={bits!r}; give an integer from 2 to 16 (4 and 8 are usual)")
    rows, cols = weight.shape
    size = cols if group_size is None else int(group_size)
    if size <= 0:
        raise BadValueError(f"attack.quantize.group_size={group_size!r}; must be an integer >= 1, or null for one "
                            "scale per output channel")
    size = min(size, cols)
    full = cols - cols % size
    w = weight.detach().float()
    parts = [_rtn_groups(w[:, :full].reshape(rows, full // size, size), bits, symmetric).reshape(rows, full)]
    if full < cols:  # the remainder of each row: one smaller group
        parts.append(_rtn_groups(w[:, full:].reshape(rows, 1, cols - full), bits, symmetric).reshape(rows, cols - full))
    return torch.cat(parts, dim=1).to(weight.dtype)


def _rtn_groups(w: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """``rtn_quantize``'s rounding of ``[rows, groups, size]`` float32 values, each group on its own grid."""
    if symmetric:
        top = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=-1, keepdim=True) / top
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(w / safe), -top - 1, top) * safe
    else:
        top = 2 ** bits - 1
        low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scale = (high - low) / top
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-low / safe)
        q = (torch.clamp(torch.round(w / safe) + zero, 0, top) - zero) * safe
    return torch.where(scale > 0, q, w)  # a constant group: nothing to round


def quantizable_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The ``nn.Linear`` layers RTN quantizes: all but the output head (``get_output_embeddings``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head]


def grouping(model: torch.nn.Module, group_size: int | None) -> dict[str, Any]:
    """How ``rtn_copy`` groups ``model``'s weights for ``group_size`` (recorded in the EVAL file's ``_meta``):
    the layers quantized, those whose rows end with a smaller group (width not a multiple of the size) or
    are narrower than a group, and the share of the quantized weights in groups smaller than requested (a
    weaker attack there: a finer grid)."""
    layers = quantizable_linears(model)
    smaller = [(name, linear.in_features) for name, linear in layers
               if group_size is not None and linear.in_features % int(group_size)]
    total = sum(linear.weight.numel() for _, linear in layers)
    # a row narrower than a group is one group of its width; a wider one ends with in_features % group_size columns
    in_small = sum(linear.out_features * (linear.in_features % int(group_size))
                   for _, linear in layers if group_size is not None)
    widths = sorted({width for _, width in smaller})
    return {"group_size": group_size, "layers": len(layers), "layers_with_a_smaller_group": len(smaller),
            "widths_not_divisible": widths, "share_of_weights_in_smaller_groups": in_small / total if total else 0.0}


def rtn_copy(model: torch.nn.Module, bits: int, group_size: int | None = 128, symmetric: bool = False) -> torch.nn.Module:
    """A deep copy of ``model`` with every ``quantizable_linears`` weight RTN-quantized; ``model`` untouched.

    Rows whose width is not a multiple of ``group_size`` end with one smaller group (``rtn_quantize``); a
    WARNING says how many weights that concerns, since a finer grid there is a weaker attack than asked for."""
    attacked = copy.deepcopy(model)
    with torch.no_grad():
        for _, linear in quantizable_linears(attacked):
            linear.weight.copy_(rtn_quantize(linear.weight, bits, group_size, symmetric))
    groups = grouping(model, group_size)
    if groups["layers_with_a_smaller_group"]:
        log.warning("quantize: group_size=%s does not divide the width of %d of %d layers (widths %s): each of their "
                    "rows ends with a smaller group, %.1f%% of the quantized weights, where the attack is weaker than "
                    "asked (a finer grid); a group_size dividing every width avoids it", group_size,
                    groups["layers_with_a_smaller_group"], groups["layers"], groups["widths_not_divisible"],
                    100 * groups["share_of_weights_in_smaller_groups"])
    return attacked


def bitsandbytes_copy(model: torch.nn.Module, bits: int, method: str) -> torch.nn.Module:
    """A bitsandbytes-quantized copy (``nf4``: 4-bit NormalFloat; ``int8``: LLM.int8()), through a saved folder."""
    if not torch.cuda.is_available():
        raise BadValueError(f"attack.quantize.method={method}: bitsandbytes needs a CUDA GPU; on a CPU use method=rtn")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if (method, bits) not in (("nf4", 4), ("int8", 8)):
        raise BadValueError(f"attack.quantize.method={method} with bits={bits}: nf4 is 4-bit, int8 is 8-bit")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16) \
        if method == "nf4" else BitsAndBytesConfig(load_in_8bit=True)
    with tempfile.TemporaryDirectory(prefix="quantize-") as folder:
        model.save_pretrained(folder)
        return AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, device_map={"": 0})


def check_config(cfg: Mapping[str, Any]) -> None:
    """Every option of ``attack.quantize`` checked before any work (a bad one is a BadValueError naming it)."""
    method = check_choice("attack.quantize.method", cfg.get("method", "rtn"), METHODS)
    bits = cfg.get("bits", 4)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise BadValueError(f"attack.quantize.bits={bits!r}; give an integer from 2 to 16 (4 and 8 are usual)")
    group_size = cfg.get("group_size", 128)
    if group_size is not None:
        check_number("attack.quantize.group_size", group_size, integer=True, low=1,
                     hint="or null for one scale per output channel")
    check_bool("attack.quantize.symmetric", cfg.get("symmetric", False))
    if method != "rtn":
        if (method, bits) not in (("nf4", 4), ("int8", 8)):
            raise BadValueError(f"attack.quantize.method={method} with bits={bits}: nf4 is 4-bit, int8 is 8-bit")
        if not torch.cuda.is_available():
            raise BadValueError(f"attack.quantize.method={method}: bitsandbytes needs a CUDA GPU; on a CPU use method=rtn")


def quantized_copy(model: torch.nn.Module, cfg: Mapping[str, Any]) -> torch.nn.Module:
    """The attacked model of ``attack.quantize`` (``bits``, ``method``, ``group_size``, ``symmetric``)."""
    check_config(cfg)
    method = cfg.get("method", "rtn")
    bits = cfg.get("bits", 4)
    if method == "rtn":
        return rtn_copy(model, bits, cfg.get("group_size", 128), bool(cfg.get("symmetric", False)))
    return bitsandbytes_copy(model, bits, method)


def describe(model: torch.nn.Module, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The attack's settings and, for ``rtn``, its effective grouping on ``model`` (``grouping``)."""
    settings = {k: cfg.get(k, default) for k, default in
                (("method", "rtn"), ("bits", 4), ("group_size", 128), ("symmetric", False))}
    if settings["method"] == "rtn":
        settings["grouping"] = grouping(model, settings["group_size"])
    return settings


def suffix(cfg: Mapping[str, Any]) -> str:
    """``quant<bits>``: the name the attacked metrics carry (``forget_Q_A_Prob@quant4``)."""
    return f"quant{cfg.get('bits', 4)}"
