"""Answer-token NLLs without the logits (``trainer.answer_nll``): values, gradients and errors."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import trainer.answer_nll as answer_nll_module
from data.collators import BatchLayout, layout_of
from model.forward import last_hidden_states, model_inputs
from trainer.answer_nll import answer_positions, answer_token_nll, check_nll_impl, chunked_linear_nll
from trainer.losses import per_token_nll


def _output_layer(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    return layer


def test_chunked_linear_nll_by_hand():
    # W = [[1, 0], [0, 1], [0, 0]]: h = (ln 2, 0) gives logits (ln 2, 0, 0), softmax (1/2, 1/4, 1/4);
    # h = (0, 0) gives uniform logits. NLL(y=0 | h0) = ln 2, NLL(y=1 | h0) = ln 4, NLL(y=2 | h1) = ln 3.
    layer = _output_layer(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    hidden = torch.tensor([[math.log(2), 0.0], [math.log(2), 0.0], [0.0, 0.0]])
    expected = [math.log(2), math.log(4), math.log(3)]
    for chunk_rows in (1, 2, 3, 10):
        nll = chunked_linear_nll(hidden, torch.tensor([0, 1, 2]), layer.weight, chunk_rows)
        assert nll.tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        chunked_linear_nll(hidden, torch.tensor([0, 1, 2]), layer.weight, 0)


def test_chunked_linear_nll_gradients_equal_the_full_logits():
    torch.manual_seed(0)
    weight, hidden = torch.randn(50, 8), torch.randn(13, 8)
    targets, upstream = torch.randint(0, 50, (13,)), torch.rand(13)  # per-token upstream gradients (NPO-like)
    grads = []
    for chunk_rows in (None, 1, 4, 13):
        layer = _output_layer(weight)
        h = hidden.clone().requires_grad_(True)
        if chunk_rows is None:
            nll = F.cross_entropy(layer(h), targets, reduction="none")
        else:
            nll = chunked_linear_nll(h, targets, layer.weight, chunk_rows)
        (nll * upstream).sum().backward()
        grads.append((nll.detach(), h.grad, layer.weight.grad))
    for nll, grad_h, grad_w in grads[1:]:
        assert torch.allclose(nll, grads[0][0], atol=1e-6)
        assert torch.allclose(grad_h, grads[0][1], atol=1e-6)
        assert torch.allclose(grad_w, grads[0][2], atol=1e-6)


def _tiny_llama(**config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **config)
    return LlamaForCausalLM(cfg).eval()


def _batch() -> dict:
    # Row 0: prompt of 3 tokens, 4 answer tokens; row 1: prompt of 2, answer of 2, then right padding.
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 8, 9, 10, 11], [-100, -100, 14, 15, -100, -100, -100]])
    mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "layout": layout_of(labels)}


def test_last_hidden_states_are_the_output_layer_input():
    model, batch = _tiny_llama(), _batch()
    hidden = last_hidden_states(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()  # the padding positions run without mask (model_inputs)
    assert torch.allclose(model.lm_head(hidden)[real], logits[real], atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral_sliding_window"])
def test_right_padded_batches_run_without_mask_with_equal_real_positions(arch):
    """``model_inputs`` drops the mask of a right-padded batch (its layout says so); causal attention
    alone gives every real position the logits of the masked forward pass, also under a sliding window
    (here 3 positions, shorter than the rows, so the window is really applied)."""
    from transformers import MistralConfig, MistralForCausalLM

    if arch == "llama":
        model = _tiny_llama()
    else:
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 sliding_window=3, attn_implementation="sdpa")).eval()
    batch = _batch()
    assert set(model_inputs(batch)) == {"input_ids"}
    left_padded = {**batch, "layout": layout_of(batch["labels"], "left")}  # the same tensors, read as left-padded
    assert set(model_inputs(left_padded)) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        masked = model(**model_inputs(left_padded)).logits
        unmasked = model(**model_inputs(batch)).logits
    real = batch["attention_mask"].bool()
    assert torch.allclose(unmasked[real], masked[real], atol=1e-5)
    assert not torch.allclose(unmasked[~real], masked[~real], atol=1e-3)  # padding: differs, read by no loss
    if arch != "llama":  # the window was applied: without it row 0's later positions change
        model.config.sliding_window = None
        with torch.no_grad():
            no_window = model(**model_inputs(batch)).logits
        assert torch.allclose(no_window[0, :3], unmasked[0, :3], atol=1e-5)
        assert not torch.allclose(no_window[0, 3:], unmasked[0, 3:], atol=1e-3)


@pytest.mark.parametrize("impl", ["chunked", "liger"])
def test_hidden_state_paths_equal_the_logits_path(impl, monkeypatch):
    """Per-sample sums, counts and parameter gradients of ``chunked`` (and ``liger``, here a stand-in with
    Liger's call signature: the real kernel needs a CUDA GPU) equal those of the ``logits`` path."""
    if impl == "liger":
        calls = []

        def fake_liger(input, weight, target, bias=None, ignore_index=-100, reduction="mean", **_):
            calls.append((tuple(input.shape), reduction, ignore_index))
            logits = input @ weight.t() + (bias if bias is not None else 0)
            return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction)

        functional = types.ModuleType("liger_kernel.transformers.functional")
        functional.liger_fused_linear_cross_entropy = fake_liger
        monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
        monkeypatch.setitem(sys.modules, "liger_kernel.transformers", types.ModuleType("liger_kernel.transformers"))
        monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    batch = _batch()
    results = []
    for which in ("logits", impl):
        model = _tiny_llama()
        nll, mask = answer_token_nll(model, batch, which, **({"chunk_rows": 2} if which == "chunked" else {}))
        total, count = nll.sum(-1), mask.sum(-1)
        (total * torch.tensor([0.3, 1.7])).sum().backward()  # unequal per-sample weights, as NPO's
        results.append((total.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (t0, c0, g0), (t1, c1, g1) = results
    assert c0.tolist() == c1.tolist() == [4, 2]
    assert torch.allclose(t0, t1, atol=1e-5)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5), name
    if impl == "liger":
        assert calls == [((6, 32), "none", -100)]  # one call over the 6 answer tokens, per-token values


def test_check_nll_impl_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"nll_impl='fused'; valid: logits, chunked, liger"):
        check_nll_impl("fused")
    check_nll_impl("chunked", _tiny_llama())
    capped = _tiny_llama()
    capped.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30.0.*use nll_impl=logits"):
        check_nll_impl("chunked", capped)
    check_nll_impl("logits", capped)
    with pytest.raises(ValueError, match=r"FSDP and ZeRO-3 keep its weight sharded; use nll_impl=logits with FSDP or DeepSpeed"):
        check_nll_impl("chunked", _tiny_llama(), sharded=True)
    check_nll_impl("logits", _tiny_llama(), sharded=True)

    def version_of(found):
        def version(name):
            if found is None:
                raise answer_nll_module.importlib.metadata.PackageNotFoundError(name)
            return found
        return version

    monkeypatch.setattr(answer_nll_module.importlib.metadata, "version", version_of(None))
    with pytest.raises(ValueError, match=r"needs the liger-kernel package .*nll_impl=chunked"):
        check_nll_impl("liger", _tiny_llama())
    monkeypatch.setattr(answer_nll_module.importlib.metadata, "version", version_of("0.5.2"))
    with pytest.raises(ValueError, match=r"liger-kernel >= 0.8.5 .*found 0.5.2"):
        check_nll_impl("liger", _tiny_llama())
    monkeypatch.setattr(answer_nll_module.importlib.metadata, "version", version_of("0.8.5"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"CUDA GPU and none is available; use nll_impl=chunked"):
        check_nll_impl("liger", _tiny_llama())


def test_trainer_rejects_a_bad_nll_impl(tmp_path):
    from conftest import StubLM
    from trainer import load_trainer

    cfg = {"handler": "GradAscent", "args": {"report_to": "none", "nll_impl": "fast"}}
    with pytest.raises(ValueError, match=r"trainer.args.nll_impl=.fast.; valid: logits, chunked, liger"):
        load_trainer(cfg, StubLM(), output_dir=str(tmp_path))


def test_logits_path_is_per_token_nll_of_the_answer_span():
    model, batch = _tiny_llama(), _batch()
    nll, mask = answer_token_nll(model, batch, "logits")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    full, full_mask = per_token_nll(logits, batch["labels"])
    assert torch.allclose(nll.sum(-1), full.sum(-1), atol=1e-5)
    assert mask.sum(-1).tolist() == full_mask.sum(-1).tolist()


def test_chunked_linear_nll_under_bf16_autocast_matches_the_autocast_output_layer():
    """Under autocast the output layer's product runs in bfloat16 (as the model's own would), the
    softmax and the weight-gradient sum in float32; gradients come back in the inputs' dtypes."""
    torch.manual_seed(0)
    weight, hidden = torch.randn(300, 16), torch.randn(11, 16)
    targets, upstream = torch.randint(0, 300, (11,)), torch.rand(11)
    results = []
    for chunked in (False, True):
        layer = _output_layer(weight)
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if chunked:
                nll = chunked_linear_nll(h, targets, layer.weight, 4)
            else:
                nll = F.cross_entropy(layer(h).float(), targets, reduction="none")
        (nll * upstream).sum().backward()
        results.append((nll.detach(), h.grad, layer.weight.grad))
    (n0, gh0, gw0), (n1, gh1, gw1) = results
    assert n1.dtype == torch.float32 and gh1.dtype == gw1.dtype == torch.float32
    assert torch.allclose(n0, n1, atol=1e-6)  # same bf16 products, same float32 reductions
    assert torch.allclose(gh0, gh1, atol=2e-2) and torch.allclose(gw0, gw1, atol=2e-2)  # bf16 rounding of dL/dz
    assert not torch.allclose(n1, F.cross_entropy(hidden @ weight.t(), targets, reduction="none"), atol=1e-4)


def test_answer_positions_by_hand():
    mask = torch.tensor([[False, True, True], [True, False, False]])
    assert answer_positions(mask).tolist() == [1, 2, 3]
    assert answer_positions(mask, count=3).tolist() == [1, 2, 3]  # size known on the host: no synchronisation


def test_chunked_nll_equal_with_and_without_the_collated_answer_count():
    model, batch = _tiny_llama(), _batch()
    assert batch["layout"].answer_tokens == int((batch["labels"][:, 1:] != -100).sum()) == 6
    with_count, mask = answer_token_nll(model, batch, "chunked")
    without = {**batch, "layout": BatchLayout("right", True, answer_start=2, answer_tokens=None)}
    assert torch.equal(answer_token_nll(model, without, "chunked")[0], with_count)
    assert torch.equal(mask, batch["labels"][:, 1:] != -100) and bool((with_count[~mask] == 0).all())
