"""Packed rows (``trainer.packing``, ``trainer.args.pack_rows``): the layout by hand, the same
NLLs and gradients as the padded batch, errors, and the same loss curves end to end."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO, train_in_process
from data.collators import layout_of
from trainer.answer_nll import answer_token_nll, resolve_pack_rows
from trainer.packing import common_prefix_length, needed_inputs, pack_rows_layout, packs_rows

X = -100


def _model(attn: str = "sdpa", **config) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, attn_implementation=attn, **config)
    return LlamaForCausalLM(cfg).eval()


def test_needed_inputs_and_common_prefix_by_hand():
    labels = torch.tensor([[X, X, 3, 4, X], [X, 7, X, X, X], [X, X, X, X, X]])
    # row 0: last label at 3, so positions 0..2 are read; row 1: last label at 1; row 2: no label
    assert needed_inputs(labels) == [3, 1, 0]
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[1, 2], [1, 2]]) == 2
    assert common_prefix_length([[5], [6]]) == 0
    assert common_prefix_length([]) == 0


def test_layout_by_hand():
    # Two rows share "9 8"; row 0 needs 4 inputs (labels up to position 4), row 1 needs 3.
    ids = torch.tensor([[9, 8, 1, 2, 3, 0], [9, 8, 5, 6, 0, 0]])
    labels = torch.tensor([[X, X, X, 2, 3, X], [X, X, X, 6, X, X]])
    layout = pack_rows_layout(ids, labels)
    # prefix once, then row 0's own inputs (1, 2), then row 1's (5)
    assert layout.input_ids.tolist() == [[9, 8, 1, 2, 5]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert layout.source.tolist() == [[0, 1, 2, 3, -1, -1], [0, 1, 4, -1, -1, -1]]
    T, F = True, False
    assert layout.allowed[0].tolist() == [[T, F, F, F, F],
                                          [T, T, F, F, F],
                                          [T, T, T, F, F],
                                          [T, T, T, T, F],
                                          [T, T, F, F, T]]  # row 1's token sees the prefix and itself only


def test_layout_splits_at_max_tokens_and_masks_holes():
    ids = torch.tensor([[9, 8, 1, 2, 3], [9, 8, 5, 6, 7], [9, 8, 4, 4, 4]])
    labels = torch.tensor([[X, X, 1, 2, 3], [X, X, 5, 6, 7], [X, X, 4, 4, 4]])
    layout = pack_rows_layout(ids, labels, max_tokens=7)  # 2 + 2 + 2 = 6 fit, a third row would make 8
    assert layout.input_ids.tolist() == [[9, 8, 1, 2, 5, 6], [9, 8, 4, 4, 0, 0]]  # the second sequence: one row
    assert layout.position_ids[1].tolist() == [0, 1, 2, 3, 0, 0]
    assert layout.source[2].tolist() == [6, 7, 8, 9, -1]
    padding = layout.allowed[1, 4:]
    assert padding.tolist() == [[False] * 4 + [True, False], [False] * 5 + [True]]  # padding sees itself only
    holes = torch.tensor([[1, 0, 1, 1, 1]] * 3)
    masked = pack_rows_layout(ids, labels, key_mask=holes)
    assert not masked.allowed[0, :, 1].any()  # key 1 is masked for every query
    assert masked.allowed[0, 2, :3].tolist() == [True, False, True]


def _batch(holes: bool = False) -> dict:
    torch.manual_seed(1)
    lengths, prompt = [12, 9, 7, 11, 4], 5
    ids = torch.randint(1, 96, (len(lengths), 12))
    ids[:, :4] = ids[0, :4]  # a 4-token common prefix
    labels = torch.full_like(ids, X)
    for row, n in enumerate(lengths):
        labels[row, prompt:n] = ids[row, prompt:n]
        ids[row, n:] = 0
    labels[4] = X  # a row without labels
    mask = (torch.arange(12)[None] < torch.tensor(lengths)[:, None]).long()
    if holes:  # compat=open_unlearning's pad-derived mask: no answer_start, a masked key inside the prompt
        mask[:, 2] = 0
        return {"input_ids": ids, "labels": labels, "attention_mask": mask,
                "layout": layout_of(labels, mask_hides_padding_only=False)}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "layout": layout_of(labels)}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("impl", ["logits", "chunked"])
@pytest.mark.parametrize("holes", [False, True])
def test_packed_nll_and_gradients_equal_the_padded_batch(attn, impl, holes, monkeypatch):
    import trainer.packing as packing

    monkeypatch.setattr(packing, "PACKED_SEQUENCE_TOKENS", 20)  # the 5 rows become 2 packed sequences
    batch = _batch(holes)
    assert len(pack_rows_layout(batch["input_ids"], batch["labels"], max_tokens=20).input_ids) == 2
    results = []
    for pack in (False, True):
        model = _model(attn)
        nll, mask = answer_token_nll(model, batch, impl, pack=pack)
        total, count = nll.sum(-1), mask.sum(-1)
        (total * torch.tensor([0.3, 1.7, 1.0, 0.5, 2.0])).sum().backward()
        results.append((total.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (t0, c0, g0), (t1, c1, g1) = results
    assert c0.tolist() == c1.tolist() == [7, 4, 2, 6, 0]
    assert torch.allclose(t0, t1, atol=1e-5), (t0, t1)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5), name


def test_pack_rows_choices_and_errors():
    model = _model("sdpa")
    assert resolve_pack_rows("auto", model) is True  # a CPU, SDPA attention
    assert resolve_pack_rows(False, model) is False
    with pytest.raises(ValueError, match=r"pack_rows='yes'; valid: true, false, auto"):
        resolve_pack_rows("yes", model)
    flash = _model("sdpa")
    flash.config._attn_implementation = "flash_attention_2"
    assert packs_rows("auto", flash) is False
    with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2': set trainer.args.pack_rows=false"):
        resolve_pack_rows(True, flash)
    capped = _model("sdpa", final_logit_softcapping=30.0)
    assert resolve_pack_rows("auto", capped) is False
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30.0.*set trainer.args.pack_rows=false"):
        resolve_pack_rows(True, capped)


def _common(tofu_dir, trainer: str, forget: str) -> list[str]:
    return ["model=tiny-random-llama", f"trainer={trainer}", f"data.forget={forget}", "data.retain=TOFU_QA_RETAIN90",
            f"paths.tofu={tofu_dir}", "trainer.args.max_steps=4", "trainer.args.per_device_train_batch_size=4",
            "trainer.args.gradient_accumulation_steps=1", "trainer.args.logging_steps=1",
            "trainer.args.learning_rate=1e-3", "trainer.args.disable_tqdm=true"]


@pytest.mark.parametrize("trainer, forget, extra", [
    ("GradDiff", "TOFU_QA_FORGET10", []),
    ("NPO", "TOFU_QA_FORGET10", ["trainer.args.joint_forward=true"]),
    ("WGA", "TOFU_QA_FORGET10", ["trainer.args.nll_impl=chunked"]),
    ("GradDiff", "TOFU_QA_FORGET10", ["compat=open_unlearning"]),
])
def test_pack_rows_gives_the_same_loss_curve(tofu_dir, tmp_path, monkeypatch, trainer, forget, extra):
    """``pack_rows=true`` against the padded batches (``false``): the same losses step by step, with a
    joint forward pass, the chunked NLLs, and open-unlearning's pad-derived masks."""
    import trainer.answer_nll as answer_nll

    monkeypatch.chdir(REPO)
    packed_calls = []
    original = answer_nll.pack_rows_layout
    monkeypatch.setattr(answer_nll, "pack_rows_layout", lambda *a, **k: packed_calls.append(1) or original(*a, **k))
    common = [*_common(tofu_dir, trainer, forget), *extra]
    padded = train_in_process(tmp_path / "padded", [*common, "trainer.args.pack_rows=false"])
    assert not packed_calls
    packed = train_in_process(tmp_path / "packed", [*common, "trainer.args.pack_rows=true"])
    assert len(packed_calls) >= 4
    assert len(padded) == len(packed) == 4
    for a, b in zip(padded, packed):
        for key in ("loss", "forget_loss", "retain_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (key, a, b)
    assert padded[-1]["forget_loss"] != pytest.approx(padded[0]["forget_loss"], abs=1e-6)  # training moved


def test_batches_that_packing_would_barely_shrink_run_padded(monkeypatch):
    import trainer.answer_nll as answer_nll

    # Two 6-token rows, no padding, different first tokens: packing keeps 10 of 12 tokens (83 %: each
    # row's last token is no input), so it packs; 20-token rows would keep 38 of 40 (95 %): padded.
    short = torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    assert answer_nll.packed_layout({"input_ids": short, "labels": short.clone(), "layout": layout_of(short)}) is not None
    torch.manual_seed(0)
    long = torch.randint(1, 96, (2, 20))
    long[1, 0] = long[0, 0] + 1
    batch = {"input_ids": long, "labels": long.clone(), "layout": layout_of(long)}
    assert answer_nll.packed_layout(batch) is None
    calls = []
    monkeypatch.setattr(answer_nll, "packed_hidden_states", lambda *a: calls.append(1))
    model = _model()
    packed, _ = answer_token_nll(model, batch, "logits", pack=True)
    padded, _ = answer_token_nll(model, batch, "logits")
    assert not calls and torch.equal(packed, padded)
