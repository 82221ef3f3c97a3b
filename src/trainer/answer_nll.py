"""Answer-token NLLs of a batch, with or without materialising the vocabulary-sized logits.

Every NLL-based loss (GradAscent, GradDiff, NPO, SimNPO, DPO, IdkNLL, WGA, SatImp, the NLL retain
term, fine-tuning) needs only ``NLL_t = logsumexp(z_t) - z_t[y_t]`` at the answer positions, with
``z_t = W h_t`` the output layer applied to the last hidden state. ``nll_impl`` (the trainers'
``trainer.args.nll_impl``) chooses how it is computed:

- ``logits``: the model's forward returns the logits over the answer span
  (``model.forward.answer_span_logits``), then ``cross_entropy``. Keeps a ``[rows, span, vocab]``
  float32 block (and its gradient) alive through the backward pass.
- ``chunked``: the forward stops at the last hidden state (the output layer runs on one position
  only); ``chunked_linear_nll`` applies the output layer to the answer positions a chunk of rows at a
  time and keeps one ``logsumexp`` per token, so only one chunk's logits exist at any time, in the
  forward and in the backward pass (which recomputes them: one more output-layer product). Any
  device; the same values as ``logits`` up to float rounding (``tests/test_speed_knobs.py``).
- ``liger``: the same hidden states through Liger Kernel's fused linear cross-entropy
  (``liger_kernel.transformers.functional.liger_fused_linear_cross_entropy``, Triton, CUDA only),
  which computes the logits' gradient chunk by chunk in its own kernels. Per-token values
  (``reduction="none"``) had wrong gradients before liger-kernel 0.8.5 (linkedin/Liger-Kernel
  PR #1298), so older versions are refused.

Both hidden-state paths skip the rows' padding and prompt positions entirely (the ``logits`` path
computes the whole answer span of every row, padding included; the answer positions are gathered with
a size known on the host, the collator's ``answer_tokens``, so without a device synchronisation) and
refuse models whose forward transforms the logits after the output
layer (soft-capping, logit scaling), where ``W h_t`` would not be the model's logits. Methods that
need the full next-token distribution (KL retain term, UNDIAL, CE-U, logit-margin flattening)
always use ``logits``.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

import torch
from packaging.version import Version

from checks import check_choice
from data.collators import batch_layout
from model.forward import answer_span_logits, last_hidden_states, unwrap
from trainer.losses import IGNORE_INDEX, per_token_nll
from trainer.packing import (
    PACKED_MAX_SHARE,
    PackedLayout,
    check_pack_rows,
    pack_rows_layout,
    packed_attention_mask,
    packs_rows,
)

NLL_IMPLS = ("logits", "chunked", "liger")


@dataclass(frozen=True)
class AnswerNLL:
    """The answer-token NLLs of one batch: ``per_token`` ``[B, L']`` (``NLL_t``, 0 where masked) and ``mask``
    ``[B, L']`` (True at answer tokens), as ``answer_token_nll`` returns them."""

    per_token: torch.Tensor
    mask: torch.Tensor

    @property
    def summed(self) -> torch.Tensor:
        """``S = sum_t NLL_t`` per sample ``[B]``."""
        return self.per_token.sum(dim=-1)

    @property
    def counts(self) -> torch.Tensor:
        """``T``, the number of answer tokens per sample ``[B]``."""
        return self.mask.sum(dim=-1)
#: Oldest liger-kernel whose fused linear cross-entropy has correct gradients with reduction="none".
LIGER_MIN_VERSION = "0.8.5"
#: Logits per chunk of ``chunked_linear_nll`` (rows = this / vocabulary size): 64 MiB of float32 on a
#: CPU, 256 MiB on a GPU (where bigger matrix products run faster).
CHUNK_LOGITS = {"cpu": 1 << 24, "cuda": 1 << 26}
#: Config attributes of models whose logits are not ``W h`` (Gemma 2/3 soft-capping, Cohere, Granite).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


SHARDED_NOTE = " with FSDP or DeepSpeed ZeRO-3 (DDP, ZeRO-1/2 and one device work)"


def _output_layer_problem(model: torch.nn.Module, sharded: bool = False) -> str | None:
    """Why the output layer cannot be applied to hidden states outside the model's forward (None: it can)."""
    if sharded:
        return "applies the output layer outside the model's forward, where FSDP and ZeRO-3 keep its weight sharded"
    config = getattr(unwrap(model), "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            return f"computes logits as W h, but this model's config sets {name}={value!r} (its forward transforms the logits)"
    get_output_layer = getattr(unwrap(model), "get_output_embeddings", None)
    if get_output_layer is None or get_output_layer() is None:
        return "needs the model's output layer (get_output_embeddings() is None)"
    if hasattr(get_output_layer(), "base_layer"):
        return "applies the output layer's weight on its own, but LoRA adapters sit on it (model.peft.target_modules)"
    return None


def check_nll_impl(impl: str, model: torch.nn.Module | None = None, sharded: bool = False) -> None:
    """ValueError naming the problem when ``impl`` cannot compute the NLLs of ``model`` here.

    ``sharded``: the model's weights are split over the processes (FSDP, DeepSpeed ZeRO-3), so the
    output-layer weight is only whole inside the model's forward, where ``chunked`` and ``liger`` cannot reach it.
    """
    check_choice("trainer.args.nll_impl", impl, NLL_IMPLS)
    if impl == "logits" or model is None:
        return
    problem = _output_layer_problem(model, sharded)
    if problem:
        raise ValueError(f"nll_impl={impl!r} {problem}; use nll_impl=logits{SHARDED_NOTE if sharded else ''}")
    output_layer = unwrap(model).get_output_embeddings()
    if impl == "chunked" and getattr(output_layer, "bias", None) is not None:
        raise ValueError("nll_impl='chunked' handles an output layer without bias, this model's has one; "
                         "use nll_impl=logits (or liger on a GPU)")
    if impl == "liger":
        try:
            version = importlib.metadata.version("liger-kernel")
        except importlib.metadata.PackageNotFoundError:
            raise ValueError("nll_impl='liger' needs the liger-kernel package (pip install 'liger-kernel>=0.8.5') "
                             "and a CUDA GPU; nll_impl=chunked saves the same memory anywhere") from None
        if Version(version) < Version(LIGER_MIN_VERSION):
            raise ValueError(f"nll_impl='liger' needs liger-kernel >= 0.8.5 (per-token gradients are wrong before it), "
                             f"found {version}; upgrade it or use nll_impl=chunked")
        if not torch.cuda.is_available():
            raise ValueError("nll_impl='liger' runs Triton kernels on a CUDA GPU and none is available; "
                             "use nll_impl=chunked on this machine")


def resolve_pack_rows(value: Any, model: torch.nn.Module, sharded: bool = False) -> bool:
    """Whether the trainer packs rows (``trainer.args.pack_rows``: true, false or auto; see
    ``trainer.packing``). ``true`` on a model that cannot be packed is an error naming why; ``auto``
    then stays off."""
    check_pack_rows(value, model)
    if not packs_rows(value, model):
        return False
    problem = _output_layer_problem(model, sharded)
    if value is True and problem:
        raise ValueError(f"pack_rows=true {problem}; set trainer.args.pack_rows=false"
                         f"{SHARDED_NOTE if sharded else ''}")
    return problem is None


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the output layer's matrix product runs in: autocast's where it is on, else the weight's."""
    device = weight.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


class _ChunkedLinearNLL(torch.autograd.Function):
    """``NLL [N]`` of ``targets`` under ``softmax(hidden @ weight.T)``, one chunk of rows at a time.

    Forward keeps only ``logsumexp`` per row; backward recomputes each chunk's logits and applies
    ``dNLL_i/dz_i = softmax(z_i) - onehot(y_i)`` times the incoming per-row gradient, accumulating the
    weight's gradient in place (float32).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, dtype):
        w = weight.to(dtype)
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(nll)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = (hidden[rows].to(dtype) @ w.t()).float()
            lse[rows] = torch.logsumexp(z, dim=-1)
            nll[rows] = lse[rows] - z.gather(1, targets[rows, None]).squeeze(1)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_rows, ctx.dtype = chunk_rows, dtype
        return nll

    @staticmethod
    def backward(ctx, grad_nll):
        hidden, weight, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h = hidden[rows].to(ctx.dtype)
            grad_z = (h @ w.t()).float().sub_(lse[rows, None]).exp_()
            grad_z[torch.arange(grad_z.shape[0], device=grad_z.device), targets[rows]] -= 1.0
            grad_z = grad_z.mul_(grad_nll[rows, None].float()).to(ctx.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_z @ w
            if grad_weight is not None:
                if grad_z.dtype == torch.float32:
                    grad_weight.addmm_(grad_z.t(), h)
                else:
                    grad_weight += grad_z.t() @ h
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None


def chunked_linear_nll(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                       chunk_rows: int) -> torch.Tensor:
    """``NLL_i = logsumexp(W h_i) - (W h_i)[y_i]`` ``[N]`` for hidden states ``[N, d]``, targets ``[N]``
    and the output layer's weight ``W`` ``[V, d]``, never holding more than ``chunk_rows`` rows of logits.

    The logits of each chunk are computed, reduced to ``logsumexp`` and the target's logit, and freed;
    the backward pass recomputes them (one more ``[chunk, d] x [d, V]`` product per chunk) and
    accumulates ``dL/dW`` in one float32 buffer. The product runs in autocast's dtype where autocast
    is on (as the model's own output layer would), softmax and sums in float32.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _ChunkedLinearNLL.apply(hidden, weight, targets, chunk_rows, _compute_dtype(weight))


def _liger_linear_nll(hidden: torch.Tensor, targets: torch.Tensor, output_layer: torch.nn.Module) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    nll = liger_fused_linear_cross_entropy(hidden, output_layer.weight, targets, getattr(output_layer, "bias", None),
                                           ignore_index=IGNORE_INDEX, reduction="none")
    return (nll[0] if isinstance(nll, tuple) else nll).float()


def packed_layout(batch: dict[str, Any]) -> PackedLayout | None:
    """The batch's ``PackedLayout`` (``trainer.packing``), or None where packing would remove less than
    ``1 - PACKED_MAX_SHARE`` of its tokens (rows without padding or shared prefix, e.g. long raw-text
    chunks: there the padded batch keeps attention's causal kernel, which needs no ``N x N`` mask).

    The batch's attention mask is a key mask only where it can hide more than the padding after a row
    (``BatchLayout.causal_attention_suffices`` false: see ``model_inputs``); a right-padded batch's rows
    end where their labels end.
    """
    key_mask = None if batch_layout(batch).causal_attention_suffices else batch.get("attention_mask")
    layout = pack_rows_layout(batch["input_ids"], batch["labels"], key_mask)
    return layout if layout.tokens <= PACKED_MAX_SHARE * batch["input_ids"].numel() else None


def packed_hidden_states(model: torch.nn.Module, batch: dict[str, Any],
                         layout: PackedLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [S * N, d], source [B, L])``: the last hidden states of the batch's rows packed as
    ``layout`` says and, per (row, position), the index of its hidden state (-1: not computed)."""
    device = batch["input_ids"].device
    inputs = {"input_ids": layout.input_ids.to(device), "position_ids": layout.position_ids.to(device),
              "attention_mask": packed_attention_mask(layout.allowed, model, device)}
    hidden = last_hidden_states(model, batch, inputs)
    return hidden.reshape(-1, hidden.shape[-1]), layout.source.to(device)


def answer_token_nll(model: torch.nn.Module, batch: dict[str, Any], impl: str = "logits",
                     chunk_rows: int | None = None, pack: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(NLL_t, mask)``: per-token answer NLL ``[B, L']`` (float32, 0 where masked) and its answer mask.

    ``L'`` is the answer span (``logits``) or the whole row minus one (``chunked``/``liger``, and any
    ``impl`` with ``pack``); either way ``nll.sum(-1)`` is the per-sample summed NLL ``S`` and
    ``mask.sum(-1)`` the token count ``T``. ``pack``: the rows run packed (``trainer.packing``) where
    that removes enough tokens (``packed_layout``), and the output layer then runs at the answer
    positions only, whatever ``impl``.
    """
    layout = packed_layout(batch) if pack else None
    if impl == "logits" and layout is None:
        return per_token_nll(*answer_span_logits(model, batch))
    check_nll_impl(impl)
    shifted = batch["labels"][:, 1:]
    mask = shifted != IGNORE_INDEX
    positions = answer_positions(mask, batch_layout(batch).answer_tokens)
    if layout is not None:
        hidden, source = packed_hidden_states(model, batch, layout)
        answer_hidden = hidden.index_select(0, source[:, :-1].reshape(-1).index_select(0, positions))
    else:
        hidden = last_hidden_states(model, batch)[:, :-1]
        answer_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    targets = shifted.reshape(-1).index_select(0, positions)
    output_layer = unwrap(model).get_output_embeddings()
    if impl == "liger":
        values = _liger_linear_nll(answer_hidden, targets, output_layer)
    elif impl == "logits":
        values = torch.nn.functional.cross_entropy(output_layer(answer_hidden).float(), targets, reduction="none")
    else:
        if chunk_rows is None:
            budget = CHUNK_LOGITS["cuda" if answer_hidden.device.type == "cuda" else "cpu"]
            chunk_rows = max(1, budget // output_layer.weight.shape[0])
        values = chunked_linear_nll(answer_hidden, targets, output_layer.weight, chunk_rows)
    nll = torch.zeros(mask.numel(), dtype=values.dtype, device=values.device).index_copy(0, positions, values)
    return nll.view(mask.shape), mask


def answer_positions(mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Flat indices of the True entries of ``mask``, in order.

    With ``count`` (the number of True entries, known on the host: the collator's ``answer_tokens``)
    the result has a size fixed in advance (``torch.nonzero_static``), so the host does not wait for
    the device to learn it; without, ``nonzero`` does (a synchronisation on a GPU). A batch whose
    labels are changed after collation must therefore get a fresh layout (``data.collators.relabelled``). A
    count that does not match the mask is an error, checked without a synchronisation
    (``torch._assert_async``: at once on a CPU, at the device's next synchronisation on a GPU).
    """
    flat = mask.reshape(-1)
    if count is None:
        return flat.nonzero().squeeze(1)
    torch._assert_async(flat.sum() == int(count),
                        f"the batch layout counts {count} answer tokens but its labels hold another number: were the "
                        "labels changed after collation? Rebuild the batch with data.collators.relabelled(batch, labels)")
    return torch.nonzero_static(flat, size=int(count)).squeeze(1)


__all__ = ["NLL_IMPLS", "AnswerNLL", "check_nll_impl", "resolve_pack_rows",
           "chunked_linear_nll", "packed_layout", "packed_hidden_states", "answer_token_nll", "answer_positions"]
