"""Reference NLLs precomputed before training (NPO, DPO, AltPO): same losses, one model fewer in memory."""

from __future__ import annotations

import pytest
import torch

from conftest import StubLM, make_batch
from data.collators import Parts
from data.unlearn import ForgetRetainDataset
from trainer import load_trainer
from trainer.reference_cache import (
    KeyedCollator,
    ReferenceNLLCache,
    add_sample_keys,
    batch_keys,
    leaf_samples,
    sample_key,
)


def test_sample_key_ignores_padding_and_sees_labels():
    ids, labels = torch.tensor([4, 5, 6]), torch.tensor([-100, 5, 6])
    padded = sample_key(torch.tensor([4, 5, 6, 0, 0]), torch.tensor([-100, 5, 6, -100, -100]),
                        torch.tensor([1, 1, 1, 0, 0]))
    assert sample_key(ids, labels) == padded
    assert sample_key(ids, torch.tensor([-100, -100, 6])) != padded  # same tokens, other answer span
    assert sample_key(torch.tensor([4, 5, 7]), labels) != padded


def test_cache_lookup_needs_every_row():
    def keyed(ids, labels):
        return add_sample_keys(make_batch(ids, labels))

    batch = keyed([[0, 2], [1, 3]], [[-100, 2], [-100, 3]])
    cache = ReferenceNLLCache()
    assert cache.lookup(batch) is None
    cache.store(batch_keys(batch), torch.tensor([1.5, 2.5]))
    assert cache.lookup(batch).tolist() == [1.5, 2.5]
    swapped = keyed([[1, 3], [0, 2]], [[-100, 3], [-100, 2]])
    assert cache.lookup(swapped).tolist() == [2.5, 1.5]  # by content, not by position
    assert cache.lookup(keyed([[0, 2], [1, 4]], [[-100, 2], [-100, 4]])) is None
    assert len(set(batch_keys(batch))) == 2
    # a batch whose collator made no keys is refused, not keyed by reading its tokens back from the device
    with pytest.raises(ValueError, match="no sample_keys.*KeyedCollator"):
        cache.lookup(make_batch([[0, 2]], [[-100, 2]]))
    with pytest.raises(ValueError, match="2 sample keys for 1 reference NLLs"):
        cache.store(batch_keys(batch), torch.tensor([1.0]))


def test_keyed_collator_adds_the_keys_of_every_nested_batch():
    import pickle

    from data.collators import DataCollatorForSupervisedDataset, Parts

    class _Tok:
        pad_token_id = 0

    sample = {"input_ids": torch.tensor([0, 2]), "labels": torch.tensor([-100, 2]), "attention_mask": torch.tensor([1, 1])}
    other = {"input_ids": torch.tensor([1, 3, 4]), "labels": torch.tensor([-100, 3, 4]),
             "attention_mask": torch.tensor([1, 1, 1])}
    collate = KeyedCollator(DataCollatorForSupervisedDataset(_Tok()))
    batch = collate([Parts(forget=Parts(original=sample, alternate=other), retain=other),
                     Parts(forget=Parts(original=other, alternate=sample), retain=sample)])
    original = batch["forget"]["original"]
    assert original["sample_keys"] == [sample_key(sample["input_ids"], sample["labels"]),
                                       sample_key(other["input_ids"], other["labels"])]
    # the keys made at collation are the ones batch_keys would compute from the (padded) tensors
    assert original["sample_keys"] == batch_keys({k: v for k, v in original.items() if k != "sample_keys"})
    assert batch["retain"]["sample_keys"][::-1] == original["sample_keys"]
    assert collate.pad_id == 0  # attributes of the wrapped collator pass through
    assert pickle.loads(pickle.dumps(collate)).pad_id == 0  # data-loader workers receive a copy


def test_leaf_samples_of_pairs_and_lists():
    a, b = {"input_ids": torch.tensor([1])}, {"input_ids": torch.tensor([2])}
    assert list(leaf_samples(Parts(original=a, alternate=b))) == [a, b]
    assert list(leaf_samples([a, b])) == [a, b]
    assert list(leaf_samples(3)) == []


def _stub_trainer(tmp_path, handler, trainer_args=None, **method_args):
    forget = [{"input_ids": torch.tensor([0, 2]), "labels": torch.tensor([-100, 2]),
               "attention_mask": torch.tensor([1, 1])},
              {"input_ids": torch.tensor([1, 3]), "labels": torch.tensor([-100, 3]),
               "attention_mask": torch.tensor([1, 1])}]
    from data.collators import DataCollatorForSupervisedDataset

    class _Tok:
        pad_token_id = 0

    cfg = {"handler": handler, "method_args": method_args,
           "args": {"per_device_train_batch_size": 2, "report_to": "none", **(trainer_args or {})}}
    return load_trainer(cfg, StubLM(), train_dataset=ForgetRetainDataset(forget, forget),
                        data_collator=DataCollatorForSupervisedDataset(_Tok()), output_dir=str(tmp_path / "out"))


def test_npo_precomputes_and_frees_the_reference(tmp_path):
    t = _stub_trainer(tmp_path, "NPO", beta=0.5, retain_loss_type=None)
    assert t.ref_model is None and len(t.reference_cache) == 2
    batch = add_sample_keys(make_batch([[0, 2], [1, 3]], [[-100, 2], [-100, 3]]))
    assert isinstance(t.data_collator, KeyedCollator)  # training batches carry their keys
    # StubLM: after token 0, p(2) = 4/8; after token 1 uniform over 5
    assert t.reference_nll(batch).tolist() == pytest.approx([-torch.log(torch.tensor(0.5)).item(),
                                                             torch.log(torch.tensor(5.0)).item()], abs=1e-6)
    with pytest.raises(RuntimeError, match="precompute_ref_log_probs=false"):
        t.reference_nll(add_sample_keys(make_batch([[0, 3]], [[-100, 3]])))


def test_kl_retain_keeps_the_reference_and_switch_off_computes_per_step(tmp_path):
    kl = _stub_trainer(tmp_path, "NPO", retain_loss_type="KL")
    assert kl.ref_model is not None and kl.reference_cache is not None
    off = _stub_trainer(tmp_path, "NPO", trainer_args={"precompute_ref_log_probs": False})
    assert off.ref_model is not None and off.reference_cache is None


def test_switch_has_no_effect_on_methods_without_a_reference_nll(tmp_path):
    """precompute_ref_log_probs is a trainer argument of every unlearning method (as in TRL's configs); a method
    whose reference does not enter through forget-sample NLLs computes nothing in advance."""
    graddiff = _stub_trainer(tmp_path, "GradDiff", trainer_args={"precompute_ref_log_probs": True})
    assert graddiff.ref_model is None and graddiff.reference_cache is None
    undial = _stub_trainer(tmp_path, "UNDIAL", trainer_args={"precompute_ref_log_probs": True})
    assert undial.ref_model is not None and undial.reference_cache is None
