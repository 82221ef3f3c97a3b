"""Trainers: each method's loss on a hand-made batch, the registry, and method-argument errors."""

from __future__ import annotations

import math

import pytest
import torch

import trainer as trainer_pkg
from conftest import StubLM, make_batch
from data.unlearn import ForgetRetainDataset
from trainer import TRAINER_REGISTRY, _register_trainer, load_trainer
from trainer.unlearn.base import UnlearningTrainer

LN = math.log


# forget NLLs: ln 2 (token 2 after 0) and ln 5 (uniform row)  -> token mean ln(10)/2
FORGET = make_batch([[0, 2], [1, 3]], [[-100, 2], [-100, 3]])
# retain NLLs: ln 8 (token 1 after 0) and ln 5                   -> token mean ln(40)/2
RETAIN = make_batch([[0, 1], [1, 1]], [[-100, 1], [-100, 1]])
INPUTS = {"forget": FORGET, "retain": RETAIN}


def make(handler, tmp_path, retain=True, trainer_args=None, **method_args):
    dataset = ForgetRetainDataset([0, 1], [0, 1] if retain else None)
    cfg = {"handler": handler, "method_args": method_args,
           "args": {"per_device_train_batch_size": 2, "report_to": "none", **(trainer_args or {})}}
    return load_trainer(cfg, StubLM(), train_dataset=dataset, output_dir=str(tmp_path / "out"))


@pytest.mark.parametrize("handler, method_args, expected", [
    ("GradAscent", {}, -LN(10) / 2),
    ("GradDiff", {"gamma": 1.0, "alpha": 0.5}, -LN(10) / 2 + 0.5 * LN(40) / 2),
    ("GradDiff", {"gamma": 2.0, "alpha": 1.0, "retain_loss_type": "KL"}, -LN(10)),  # KL to itself = 0
    # Before any update the model equals its reference: NPO term = (2/beta) ln 2.
    ("NPO", {"beta": 0.1, "alpha": 1.0}, 20 * LN(2) + LN(40) / 2),
    ("NPO", {"beta": 0.5, "retain_loss_type": None}, 4 * LN(2)),
])
def test_method_loss_by_hand(tmp_path, handler, method_args, expected):
    t = make(handler, tmp_path, **method_args)
    loss = t.compute_loss(t.model, INPUTS)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_npo_after_an_update_matches_hand_value(tmp_path):
    t = make("NPO", tmp_path, beta=1.0, retain_loss_type=None)
    with torch.no_grad():  # raise the forget sample's logit of token 2 after token 0 from ln 4 to ln 8
        t.model.table[0, 2] = LN(8)
    # S = [ln(12/8), ln 5] vs S_ref = [ln 2, ln 5]; S - S_ref = [ln(3/4), 0]
    expected = -2 * (math.log(1 / (1 + 4 / 3)) + LN(0.5)) / 2
    assert t.compute_loss(t.model, INPUTS).item() == pytest.approx(expected, abs=1e-5)


def test_reference_model_only_when_needed(tmp_path):
    assert make("GradAscent", tmp_path, retain=False).ref_model is None
    assert make("GradDiff", tmp_path).ref_model is None
    for t in (make("GradDiff", tmp_path, retain_loss_type="KL"), make("NPO", tmp_path)):
        assert t.ref_model is not None and t.ref_model is not t.model
        assert not any(p.requires_grad for p in t.ref_model.parameters())


def test_loss_terms_are_logged_separately(tmp_path):
    t = make("GradDiff", tmp_path, alpha=0.5)
    t.model.train()
    t.compute_loss(t.model, INPUTS)
    t.log({"loss": 0.0})
    entry = t.state.log_history[-1]
    assert entry["forget_loss"] == pytest.approx(-LN(10) / 2, abs=1e-5)
    assert entry["retain_loss"] == pytest.approx(LN(40) / 2, abs=1e-5)


def test_unknown_handler_lists_registered(tmp_path):
    with pytest.raises(ValueError, match="GradDiff") as err:
        load_trainer({"handler": "GradAscentt", "args": {}}, StubLM(), output_dir=str(tmp_path))
    assert "GradAscentt" in str(err.value)


def test_unknown_method_arg_lists_valid(tmp_path):
    with pytest.raises(ValueError, match=r"alpha.*gamma.*retain_loss_type"):
        make("GradDiff", tmp_path, alhpa=0.5)


def test_bad_retain_loss_type(tmp_path):
    with pytest.raises(ValueError, match="'MSE'.*NLL, KL"):
        make("GradDiff", tmp_path, retain_loss_type="MSE")


def test_retain_set_required_when_method_uses_it(tmp_path):
    with pytest.raises(ValueError, match="data.retain"):
        make("GradDiff", tmp_path, retain=False)
    make("NPO", tmp_path, retain=False, retain_loss_type=None)  # pure NPO needs none


def test_unknown_training_arg(tmp_path):
    cfg = {"handler": "GradAscent", "args": {"learning_rte": 1e-5}}
    with pytest.raises(ValueError, match="learning_rte"):
        load_trainer(cfg, StubLM(), output_dir=str(tmp_path))


def test_gradient_checkpointing_passes_under_the_current_name(tmp_path):
    """``gradient_checkpointing`` (all 5.x versions) goes to ``activation_checkpointing`` where that
    exists, so transformers does not warn about the deprecated name; the setting itself is kept."""
    import dataclasses
    import warnings

    from trainer import build_training_args

    for value in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            args = build_training_args({"gradient_checkpointing": value}, str(tmp_path))
        assert args.gradient_checkpointing is value
        if any(f.name == "activation_checkpointing" for f in dataclasses.fields(args)):
            assert args.activation_checkpointing is value


def test_seed_recipe_custom_method(tmp_path, monkeypatch):
    """The seed's recipe: subclass, compute_loss, register, config. compute_loss has Hugging Face's signature
    and is the code that runs; the seed's shorter signature (no num_items_in_batch, which the Trainer passes)
    is refused when the trainer is built, with the signature to write."""

    class CustomMethod(UnlearningTrainer):
        def __init__(self, *args, scale=1.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.scale = scale

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            nll, count, logits = self.forward_nll(model, inputs["forget"])
            loss = -self.scale * nll.sum() / count.sum()
            return (loss, logits) if return_outputs else loss

    class SeedSignature(UnlearningTrainer):
        def compute_loss(self, model, inputs, return_outputs=False):
            raise AssertionError("never called")

    monkeypatch.setitem(TRAINER_REGISTRY, "CustomMethod", None)
    monkeypatch.setitem(TRAINER_REGISTRY, "SeedSignature", None)
    _register_trainer(CustomMethod)
    _register_trainer(SeedSignature)
    t = make("CustomMethod", tmp_path, retain=False, scale=2.0)
    assert type(t).compute_loss is CustomMethod.compute_loss  # no wrapper: the method's own code runs
    assert t.compute_loss(t.model, INPUTS, num_items_in_batch=4).item() == pytest.approx(-LN(10), abs=1e-5)
    assert "CustomMethod" in trainer_pkg.TRAINER_REGISTRY
    with pytest.raises(TypeError, match=r"SeedSignature.compute_loss.*num_items_in_batch=None"):
        make("SeedSignature", tmp_path, retain=False)


def test_non_finite_loss_stops_training(tmp_path):
    t = make("GradAscent", tmp_path, retain=False)
    with torch.no_grad():
        t.model.table[1, 3] = float("nan")
    t.current_gradient_accumulation_steps = 1  # set by train() in real runs
    t.training_step(t.model, INPUTS)  # no device read per step: checked before the next log or save
    with pytest.raises(FloatingPointError, match=r"non-finite loss \(nan\) at step 1 \(forget_loss=nan\)"):
        t.log({"loss": 0.0})
    t.training_step(t.model, INPUTS)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        t.check_finite_losses()
    t.check_finite_losses()  # reported once


def test_non_finite_loss_found_at_the_end_of_training_without_logs(tmp_path):
    from types import SimpleNamespace

    from data.collators import DataCollatorForSupervisedDataset

    sample = {k: v[1] for k, v in FORGET.items() if k != "layout"}  # tokens 1 -> 3: reads table[1, 3]
    cfg = {"handler": "GradAscent", "args": {"per_device_train_batch_size": 1, "max_steps": 2, "logging_steps": 100,
                                             "report_to": "none", "disable_tqdm": True}}
    t = load_trainer(cfg, StubLM(), train_dataset=ForgetRetainDataset([sample, sample]),
                     data_collator=DataCollatorForSupervisedDataset(SimpleNamespace(pad_token_id=0)),
                     output_dir=str(tmp_path / "out"))
    with torch.no_grad():
        t.model.table[1, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 1 "):
        t.train()


def test_evaluators_run_during_unlearning(tmp_path):
    from conftest import stub_benchmark

    calls = []
    recorder = stub_benchmark({"forget_quality": 0.25, "privleak": None},
                              on_evaluate=lambda model, out, model_id: calls.append((out, model_id, model.training)))
    cfg = {"handler": "GradAscent", "args": {"report_to": "none"}}
    t = load_trainer(cfg, StubLM(), train_dataset=ForgetRetainDataset([0, 1]), output_dir=str(tmp_path / "out"),
                     evaluators={"tofu": recorder})
    t.model.train()
    t.state.global_step = 7
    metrics = t.evaluate()
    assert metrics == {"eval_tofu_forget_quality": 0.25}  # a metric that could not be computed is not logged
    assert calls == [(str(tmp_path / "out" / "checkpoint-7" / "evals"), f"{tmp_path / 'out'}@step7", False)]
    assert t.evaluations[7]["tofu"].summary["forget_quality"] == 0.25
    assert t.state.log_history[-1]["eval_tofu_forget_quality"] == 0.25
    assert t.model.training  # back to training mode afterwards


def test_unknown_evaluator_lists_registered():
    from evals import get_evaluators

    with pytest.raises(ValueError, match="eval.tofu: unknown evaluator 'TOFUEvaluatorr'"):
        get_evaluators({"tofu": {"handler": "TOFUEvaluatorr"}})
    assert get_evaluators(None) == {}


class _Sized(list):
    """A forget 'dataset' whose items are their own token lengths."""

    def lengths(self):
        return list(self)


def test_group_by_length_batches_similar_lengths(tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    lengths = [5, 90, 7, 88, 6, 91, 8, 89] * 25
    dataset = ForgetRetainDataset(_Sized(lengths), _Sized(lengths))
    cfg = {"handler": "GradDiff", "args": {"per_device_train_batch_size": 4, "report_to": "none",
                                           "train_sampling_strategy": "group_by_length"}}
    t = load_trainer(cfg, StubLM(), train_dataset=dataset, output_dir=str(tmp_path / "out"))
    sampler = t._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))

    def padding(order):
        batches = [[lengths[i] for i in order[k:k + 4]] for k in range(0, len(order), 4)]
        return sum(len(b) * max(b) - sum(b) for b in batches)

    # sorted within mega-batches: short and long samples rarely share a batch (in order, every batch mixes)
    assert padding(order) < 0.2 * padding(range(len(lengths)))
    with pytest.raises(TypeError, match="no lengths"):
        ForgetRetainDataset([1, 2]).lengths()


def test_joint_forward_is_refused_where_the_loss_reads_logits(tmp_path):
    with pytest.raises(ValueError, match=r"joint_forward=true: UNDIAL does not support it .*: AltPO, DPO, GradDiff, "
                                         r"IdkNLL, NPO, SatImp, SimNPO, WGA$"):
        make("UNDIAL", tmp_path, trainer_args={"joint_forward": True})
    assert make("GradDiff", tmp_path, trainer_args={"joint_forward": True}).args.joint_forward is True


def test_implementation_options_are_trainer_arguments(tmp_path):
    """nll_impl, pack_rows, joint_forward and precompute_ref_log_probs are typed trainer arguments; set as
    method_args (their old place) they are refused with the new key, in a config or on the command line."""
    from trainer import check_moved_overrides
    from trainer.arguments import UnlearningArguments

    t = make("NPO", tmp_path, trainer_args={"nll_impl": "logits", "pack_rows": False,
                                            "precompute_ref_log_probs": False})
    assert isinstance(t.args, UnlearningArguments)
    assert (t.args.nll_impl, t.args.pack_rows, t.args.joint_forward, t.args.precompute_ref_log_probs) == \
        ("logits", False, False, False)
    for name, value in [("joint_forward", True), ("nll_impl", "chunked"), ("pack_rows", False),
                        ("precompute_ref_log_probs", False)]:
        with pytest.raises(ValueError, match=rf"set trainer.args.{name}={str(value).lower() if isinstance(value, bool) else value} instead"):
            make("NPO", tmp_path, **{name: value})
    with pytest.raises(ValueError, match=r"trainer.method_args.nll_impl=chunked: .*set trainer.args.nll_impl=chunked"):
        check_moved_overrides(["trainer=GradDiff", "trainer.method_args.nll_impl=chunked"])
    check_moved_overrides(["trainer.args.nll_impl=chunked", "trainer.method_args.alpha=0.5"])
    with pytest.raises(ValueError, match=r"unknown trainer.args \['joint_forward'\] \(joint_forward: options of "
                                         r"unlearning methods only\)"):
        load_trainer({"handler": "FinetuneTrainer", "args": {"joint_forward": True}}, StubLM(),
                     output_dir=str(tmp_path / "ft"))
    with pytest.raises(ValueError, match=r"trainer.args.nll_impl='fused'; valid: logits, chunked, liger"):
        make("GradDiff", tmp_path, trainer_args={"nll_impl": "fused"})
