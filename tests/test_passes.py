"""Evaluation passes: the shortened output layer computes exactly what a full forward pass does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import MODEL_CACHE, REPO
from data import build_dataset, compose_dataset
from data.collators import DataCollatorForSupervisedDataset, pad_sequences
from evals.passes import (
    answer_logits,
    answer_token_stats,
    greedy_decode,
    token_stats_passes,
)
from model import get_model
from trainer.losses import sequence_nll


def _tiny():
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny-random-llama.yaml"))
    cfg["cache_dir"] = str(MODEL_CACHE)
    model, tok = get_model(cfg)
    return model.eval(), tok


def _dataset(tok, tofu_dir, name: str, answer_key: str = "answer"):
    root = OmegaConf.create({"paths": {"tofu": str(tofu_dir)}, "seed": 0})
    return build_dataset(compose_dataset(name, root), tok, {"apply_chat_template": True}, dataset_args={"answer_key": answer_key})


def test_answer_logits_equal_full_forward():
    model, tok = _tiny()
    ids = [torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([5, 6, 11, 12])]
    labels = [torch.tensor([-100, -100, -100, 8, 9, 10]), torch.tensor([-100, -100, 11, 12])]
    batch = DataCollatorForSupervisedDataset(tok)(
        [{"input_ids": i, "labels": lab, "attention_mask": torch.ones_like(i)} for i, lab in zip(ids, labels)])
    with torch.no_grad():
        logits, targets = answer_logits(model, batch, torch.device("cpu"))
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[1] == 4  # the first answer label is at position 2: logits from position 1 on
    full_targets = batch["labels"][:, 1:]
    assert torch.equal(targets[targets != -100], full_targets[full_targets != -100])
    assert torch.allclose(logits[targets != -100], full[:, :-1][full_targets != -100], atol=1e-5)


def test_token_stats_match_the_training_loss(tofu_dir):
    model, tok = _tiny()
    dataset = _dataset(tok, tofu_dir, "TOFU_QA_FORGET10_P", "perturbed_answer")
    stats = token_stats_passes(model, [dataset], tok, batch_size=3)[0]
    assert sorted(stats) == list(range(len(dataset))) and all(len(v) == 5 for v in stats.values())
    batch = DataCollatorForSupervisedDataset(tok)(dataset[1])
    with torch.no_grad():
        nll, count = sequence_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                  batch["labels"])
    for k in range(5):
        assert len(stats[1][k].logp) == int(count[k])
        assert abs(-stats[1][k].logp.sum() - float(nll[k])) < 1e-3
        assert stats[1][k].answer_text == dataset.rows[1]["perturbed_answer"][k]


def test_prompt_sharing_gives_the_statistics_of_whole_rows(tofu_dir):
    """Speed knob: running each prompt once for its perturbed answers changes no statistic."""
    model, tok = _tiny()
    dataset = _dataset(tok, tofu_dir, "TOFU_QA_FORGET10_P", "perturbed_answer")
    shared = token_stats_passes(model, [dataset], tok, batch_size=7)[0]
    whole = token_stats_passes(model, [dataset], tok, batch_size=7, share_prompts=False)[0]
    assert sorted(shared) == sorted(whole) == list(range(len(dataset)))
    for i in whole:
        for a, b in zip(shared[i], whole[i], strict=True):
            assert a.answer_text == b.answer_text
            np.testing.assert_allclose(a.logp, b.logp, atol=1e-4)
            np.testing.assert_allclose(a.mean_logp, b.mean_logp, atol=1e-4)
            np.testing.assert_allclose(a.std_logp, b.std_logp, atol=1e-4)
            assert np.array_equal(a.argmax_match, b.argmax_match)


def test_answer_token_stats_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    targets = torch.tensor([1, 0])
    for chunk in (1, 2):
        logp, mean, std, match = answer_token_stats(logits, targets, chunk_rows=chunk)
        # row 0: p = (1/2, 1/2): log p = -log 2 for both, std 0; row 1: p = (3/4, 1/4)
        assert torch.allclose(logp, torch.tensor([-math.log(2), math.log(0.75)]))
        m1 = 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
        s1 = math.sqrt(0.75 * math.log(0.75) ** 2 + 0.25 * math.log(0.25) ** 2 - m1 ** 2)
        assert torch.allclose(mean, torch.tensor([-math.log(2), m1]))
        assert torch.allclose(std, torch.tensor([0.0, s1]), atol=1e-6)
        assert match.tolist() == [False, True]  # row 0 is a tie: argmax picks the first index
    # argmax ties: the first index wins, as in torch.argmax
    ties = torch.tensor([[2.0, 2.0, 1.0], [2.0, 2.0, 1.0], [1.0, 3.0, 3.0], [0.0, 0.0, 0.0]])
    assert answer_token_stats(ties, torch.tensor([0, 1, 1, 2]))[3].tolist() == [True, False, True, False]
    # ``rows`` scores selected rows of a larger block, in the order given
    padded = torch.cat([torch.full((1, 2), 7.0), logits.flip(0)])
    picked = answer_token_stats(padded, targets, rows=torch.tensor([2, 1]))
    assert all(torch.equal(a, b) for a, b in zip(picked, answer_token_stats(logits, targets)))


def test_greedy_decode_equals_generate_with_rows_stopping_early():
    """Speed knob: dropping finished rows from the batch leaves every generated token unchanged."""
    model, tok = _tiny()
    torch.manual_seed(0)
    with torch.no_grad():  # larger weights than the init: varied tokens instead of one token repeated
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    # a common prefix [3, 4] runs once (prefill_prompts); the rests differ in length
    prompts = [torch.tensor([3, 4, 5, 6, 7, 8, 9]), torch.tensor([3, 4, 11, 12]), torch.tensor([3, 4, 13, 14, 15]),
               torch.tensor([3, 4, 7])]
    ids = pad_sequences(prompts, tok.pad_token_id, "left")
    attn = pad_sequences([torch.ones_like(p) for p in prompts], 0, "left")
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
        stops = sorted({int(free[0, 1]), int(free[2, 5])})  # rows 0 and 2 stop early (or earlier), the others may not
        ref = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=12, do_sample=False,
                             eos_token_id=stops, pad_token_id=tok.pad_token_id)[:, ids.shape[1]:].tolist()
        # rows dropped as soon as they stop, or only once all stopped (finished rows computed along)
        runs = [greedy_decode(model, prompts, max_new_tokens=12, stop_ids=stops, min_finished_fraction=f)
                for f in (0.0, 1.0)]
    for ours in runs:
        for row, got in zip(ref, ours, strict=True):
            first_stop = min((row.index(s) for s in stops if s in row), default=len(row) - 1)
            assert got == row[: first_stop + 1]
        assert len(ours[0]) <= 2 and len(ours[2]) <= 6 and max(len(r) for r in ours) == 12


def test_common_prefix_length_by_hand():
    from evals.passes import common_prefix_length

    t = torch.tensor
    assert common_prefix_length([t([1, 2, 3]), t([1, 2, 4, 5]), t([1, 2])]) == 2
    assert common_prefix_length([t([1, 2, 3]), t([9, 2, 3])]) == 0
    assert common_prefix_length([t([1, 2, 3]), t([1, 2, 3])]) == 3
    assert common_prefix_length([t([1, 2]), t([], dtype=torch.long)]) == 0


def test_prefill_prompts_equals_each_prompt_run_alone():
    """Speed knob: the prompts' shared leading tokens run once; every last-position logit is unchanged."""
    from evals.passes import prefill_prompts

    model, _ = _tiny()
    prompts = [torch.tensor([3, 4, 5, 6, 7, 8, 9]), torch.tensor([3, 4, 11]), torch.tensor([3, 4, 13, 14])]
    with torch.no_grad():
        last, cache, mask = prefill_prompts(model, prompts, torch.device("cpu"))
        alone = torch.stack([model(input_ids=p.unsqueeze(0)).logits[0, -1] for p in prompts])
    torch.testing.assert_close(last, alone, atol=1e-5, rtol=1e-5)
    # rows read prefix, padding, rest: [3, 4] then 4, 0 and 2 padding slots
    assert mask.tolist()[1] == [1, 1, 0, 0, 0, 0, 1]
    assert cache.get_seq_length() == 7


def test_preallocated_cache_layer_appends_grows_and_selects_rows():
    from transformers.cache_utils import DynamicLayer

    from evals.passes import _PreallocatedLayer

    keys, values = torch.randn(3, 2, 4, 5), torch.randn(3, 2, 4, 5)
    plain, ours = DynamicLayer(), _PreallocatedLayer(keys, values, capacity=6)
    plain.update(keys, values)
    for length in (1, 3):  # the second update passes the capacity (6): the buffers grow
        new_k, new_v = torch.randn(3, 2, length, 5), torch.randn(3, 2, length, 5)
        for got, want in zip(ours.update(new_k, new_v), plain.update(new_k, new_v)):
            assert torch.equal(got, want)
    assert ours.get_seq_length() == 8
    rows = torch.tensor([2, 0])
    plain.batch_select_indices(rows)
    ours.batch_select_indices(rows)
    new_k, new_v = torch.randn(2, 2, 1, 5), torch.randn(2, 2, 1, 5)
    for got, want in zip(ours.update(new_k, new_v), plain.update(new_k, new_v)):
        assert torch.equal(got, want)


def test_preallocated_cache_repeats_rows_into_one_block_and_drops_rows_in_place():
    """Memory: the cache of n copies per prompt is filled from the prompts' rows into one allocation for all layers
    (no intermediate repeated cache), and dropping rows moves the kept ones to the front of it (no new buffers);
    the keys and values are those of DynamicCache's own repeat and select."""
    from transformers import DynamicCache

    from evals.passes import _preallocate

    plain, ours = DynamicCache(), DynamicCache()
    for layer in range(3):
        keys, values = torch.randn(2, 2, 4, 5), torch.randn(2, 2, 4, 5)
        plain.update(keys, values, layer)
        ours.update(keys, values, layer)
    plain.batch_repeat_interleave(3)
    _preallocate(ours, capacity=7, copies=3)
    storage = {buffer.untyped_storage().data_ptr() for layer in ours.layers for buffer in layer._buffers}
    assert len(storage) == 1  # one block
    rows = torch.tensor([4, 0, 5])
    plain.batch_select_indices(rows)
    ours.batch_select_indices(rows)
    assert {buffer.untyped_storage().data_ptr() for layer in ours.layers for buffer in layer._buffers} == storage
    for layer in range(3):
        new_k, new_v = torch.randn(3, 2, 1, 5), torch.randn(3, 2, 1, 5)
        for got, want in zip(ours.layers[layer].update(new_k, new_v), plain.layers[layer].update(new_k, new_v)):
            assert torch.equal(got, want)


def test_answer_columns_scored_together_equal_separate_passes(tofu_dir):
    """Speed knob: the true, paraphrased and perturbed answers of a question in one pass (prompt run once)."""
    model, tok = _tiny()
    keys = ("answer", "paraphrased_answer", "perturbed_answer")
    datasets = [_dataset(tok, tofu_dir, "TOFU_QA_FORGET10_P", key) for key in keys]
    joint = token_stats_passes(model, datasets, tok, batch_size=10)
    for dataset, together in zip(datasets, joint, strict=True):
        alone = token_stats_passes(model, [dataset], tok, batch_size=10, share_prompts=False)[0]
        assert sorted(together) == sorted(alone)
        for i in alone:
            assert [s.answer_text for s in together[i]] == [s.answer_text for s in alone[i]]
            for a, b in zip(together[i], alone[i]):
                np.testing.assert_allclose(a.logp, b.logp, atol=1e-4)
                np.testing.assert_allclose(a.std_logp, b.std_logp, atol=1e-4)
    with pytest.raises(ValueError, match="same rows"):
        token_stats_passes(model, [datasets[0], _dataset(tok, tofu_dir, "TOFU_QA_RETAIN90")], tok)


def test_logit_processors_in_the_generation_config_fall_back_to_generate():
    from evals.passes import _plain_greedy_ok

    model, _ = _tiny()
    assert _plain_greedy_ok(model)
    model.generation_config.repetition_penalty = 1.3  # greedy_decode would ignore it: model.generate applies it
    assert not _plain_greedy_ok(model)
    model.generation_config.repetition_penalty = 1.0
    assert _plain_greedy_ok(model)


def test_generation_rows_auto_by_hand():
    from evals.passes import generation_rows, kv_cache_bytes_per_token

    model, _ = _tiny()  # 2 layers, 2 KV heads of 16 dims, float32, vocab 49152
    assert kv_cache_bytes_per_token(model) == 2 * 2 * 2 * 16 * 4 == 512  # keys and values
    assert generation_rows("auto", model, 50, 200) == 128  # no GPU: the CPU's measured size
    assert generation_rows(64, model, 50, 200) == 64 and generation_rows("64", model, 50, 200) == 64
    # on a GPU with 256 MiB free: half of it over (512 B x 250 tokens + 2 x 4 B x 49152 logits) per row
    per_row = 512 * 250 + 8 * 49152
    assert generation_rows("auto", model, 50, 200, free_bytes=1 << 28) == (1 << 27) // per_row == 257
    assert generation_rows("auto", model, 50, 200, free_bytes=1 << 40) == 1024  # capped
    assert generation_rows("auto", model, 50, 200, free_bytes=1) == 1
    for bad in ("many", 0, -3, True, None):
        with pytest.raises(ValueError, match=r"batch_size=.*positive number of prompts or 'auto'"):
            generation_rows(bad, model, 50, 200)


def test_grad_norms_cover_frozen_weights_too(tofu_dir):
    """GradNorm is over every weight: freezing layers (RMU, PEFT, a trainer's set-up) leaves it unchanged,
    and the pass restores each weight's requires_grad flag."""
    from evals.passes import grad_norm_pass

    model, tok = _tiny()
    data = _dataset(tok, tofu_dir, "TOFU_QA_FORGET10")
    every_weight = grad_norm_pass(model, data, tok)
    for name, p in model.named_parameters():
        if not name.startswith("model.layers.1."):
            p.requires_grad_(False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    partly_frozen = grad_norm_pass(model, data, tok)
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    assert set(partly_frozen) == set(every_weight) and len(every_weight) == len(data)
    for i in every_weight:
        assert partly_frozen[i] == pytest.approx(every_weight[i], rel=1e-6)
    # the trainable layer alone would give a smaller norm: the frozen weights do count
    only_layer_1 = [p for p in model.parameters() if p.requires_grad]
    batch = DataCollatorForSupervisedDataset(tok)([data[0]])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch["labels"][0, 1:], ignore_index=-100)
    layer_1_norm = float(torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(loss, only_layer_1))))
    assert layer_1_norm < every_weight[0] * (1 - 1e-3)


def test_greedy_decode_equals_generate_one_prompt_at_a_time():
    """Speed knob: rows leaving the batch as they stop, at any threshold, change no token."""
    model, tok = _tiny()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.cat([torch.tensor([3, 4]), torch.randint(5, 200, (int(n),), generator=gen)])
               for n in torch.randint(1, 9, (9,), generator=gen)]

    def alone(prompt: torch.Tensor, stops: list[int] | None) -> list[int]:
        with torch.no_grad():
            out = model.generate(input_ids=prompt.unsqueeze(0), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=10, do_sample=False, eos_token_id=stops,
                                 pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
        if stops:
            out = out[: min((out.index(s) + 1 for s in stops if s in out), default=len(out))]
        return out

    free = [alone(p, None) for p in prompts]
    stops = sorted({free[0][2], free[3][4], free[5][1]})  # several rows stop early, at different steps
    ref = [alone(p, stops) for p in prompts]
    assert len({len(r) for r in ref}) > 2 and max(len(r) for r in ref) == 10
    with torch.no_grad():
        for fraction in (0.0, 0.5, 1.0):
            got = greedy_decode(model, prompts, max_new_tokens=10, stop_ids=stops, min_finished_fraction=fraction)
            assert got == ref, fraction


def test_answer_stems_by_hand():
    from evals.passes import answer_stems

    answers = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 6], [7, 8], [1, 2], [1, 2, 3, 4]]
    groups = [0, 0, 0, 0, 1, 1]
    # group 0: [1,2,3,4] and [1,2,3,6] share 3 tokens, [1,2,5] shares 2 with both, [7,8] nothing;
    # group 1: [1,2] is capped at all but its last token; the other shares [1,2] with it
    assert answer_stems(answers, groups) == [3, 2, 3, 0, 1, 2]
    assert answer_stems([[1, 2], [1, 2]], [0, 0]) == [1, 1]  # identical answers: all but the last token
    assert answer_stems([[], [1]], [0, 0]) == [0, 0]


def test_shared_answer_prefixes_give_the_statistics_of_whole_rows():
    """Speed knob: answer tokens several answers to one prompt start with run once per prompt."""
    from evals.passes import _shared_prompt_stats, _whole_row_stats

    model, tok = _tiny()
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)

    def sample(prompt: list[int], answer: list[int]) -> dict:
        ids = torch.tensor(prompt + answer)
        return {"input_ids": ids, "labels": torch.tensor([-100] * len(prompt) + answer),
                "attention_mask": torch.ones_like(ids)}

    p1, p2 = [3, 4, 5, 6], [3, 4, 9]
    samples = [sample(p1, [10, 11, 12, 13]), sample(p1, [10, 11, 12, 14, 15]), sample(p1, [10, 11, 16]),
               sample(p1, [17, 18]), sample(p2, [10, 11, 12]), sample(p2, [10, 11, 12]), sample(p2, [19]),
               sample(p2, [10, 20, 21, 22, 23, 24])]
    collate = DataCollatorForSupervisedDataset(tok, padding_side="right")
    with torch.no_grad():
        whole = _whole_row_stats(model, samples, collate, torch.device("cpu"), 3)
        runs = [_shared_prompt_stats(model, samples, torch.device("cpu"), rows, share)
                for rows in (1, 2, 8) for share in (True, False)]
    for shared in runs:
        for got, want in zip(shared, whole, strict=True):
            assert len(got[0]) == len(want[0])
            for a, b in zip(got[:3], want[:3]):
                np.testing.assert_allclose(a, b, atol=1e-4)
            assert np.array_equal(got[3], want[3])


def test_answer_token_stats_without_the_vocabulary_moments():
    torch.manual_seed(0)
    logits, targets = torch.randn(70, 50), torch.randint(0, 50, (70,))
    full = answer_token_stats(logits, targets, chunk_rows=32)
    logp, mean, std, match = answer_token_stats(logits, targets, chunk_rows=32, moments=False)
    assert mean is None and std is None
    assert torch.equal(logp, full[0]) and torch.equal(match, full[3])
