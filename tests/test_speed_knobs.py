"""Golden values for the training speed knobs: each computes the same losses as the plain path.

Every test trains the tiny random Llama for a few optimizer steps twice through ``src/train.py``'s
``run`` (composed from ``configs/unlearn.yaml``), once with the knob and once without, and compares
every logged loss term step by step.
"""

from __future__ import annotations

import math

import pytest

from conftest import REPO, train_in_process


def _common(tofu_dir, trainer: str, forget: str) -> list[str]:
    return ["model=tiny-random-llama", f"trainer={trainer}", f"data.forget={forget}", "data.retain=TOFU_QA_RETAIN90",
            f"paths.tofu={tofu_dir}", "trainer.args.max_steps=4", "trainer.args.per_device_train_batch_size=4",
            "trainer.args.gradient_accumulation_steps=1", "trainer.args.logging_steps=1",
            "trainer.args.learning_rate=1e-3", "trainer.args.disable_tqdm=true"]


def _assert_same_curve(a_steps: list[dict], b_steps: list[dict]) -> None:
    assert len(a_steps) == len(b_steps) == 4
    for a, b in zip(a_steps, b_steps):
        for key in ("loss", "forget_loss", "retain_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-5, rel=1e-5), (key, a, b)
    assert a_steps[-1]["forget_loss"] != pytest.approx(a_steps[0]["forget_loss"], abs=1e-6)  # training moved


@pytest.mark.parametrize("trainer, forget", [("NPO", "TOFU_QA_FORGET10"), ("DPO", "TOFU_QA_FORGET10_IDK")])
def test_precomputed_reference_gives_the_same_loss_curve(tofu_dir, tmp_path, monkeypatch, trainer, forget):
    monkeypatch.chdir(REPO)
    common = _common(tofu_dir, trainer, forget)
    cached = train_in_process(tmp_path / "cached", common)
    per_step = train_in_process(tmp_path / "per_step", [*common, "trainer.args.precompute_ref_log_probs=false"])
    _assert_same_curve(cached, per_step)


def test_gradient_checkpointing_gives_the_same_loss_curve(tofu_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    common = _common(tofu_dir, "GradDiff", "TOFU_QA_FORGET10")
    plain = train_in_process(tmp_path / "plain", common)
    checkpointed = train_in_process(tmp_path / "ckpt", [*common, "trainer.args.gradient_checkpointing=true"])
    _assert_same_curve(plain, checkpointed)


def test_fused_adamw_gives_the_same_loss_curve(tofu_dir, tmp_path, monkeypatch):
    """The default optimizer is torch's fused AdamW (one kernel for all parameters; on a CPU 5x faster
    than the per-tensor loop that ``adamw_torch`` falls back to there); same updates as ``adamw_torch``."""
    monkeypatch.chdir(REPO)
    common = _common(tofu_dir, "GradDiff", "TOFU_QA_FORGET10")
    fused = train_in_process(tmp_path / "fused", [*common, "trainer.args.optim=adamw_torch_fused"])
    plain = train_in_process(tmp_path / "plain", [*common, "trainer.args.optim=adamw_torch"])
    _assert_same_curve(fused, plain)


@pytest.mark.parametrize("trainer, forget", [("GradDiff", "TOFU_QA_FORGET10"), ("NPO", "TOFU_QA_FORGET10"),
                                             ("WGA", "TOFU_QA_FORGET10")])
def test_chunked_nll_gives_the_same_loss_curve(tofu_dir, tmp_path, monkeypatch, trainer, forget):
    """``nll_impl=chunked`` (output layer per chunk of answer tokens, recomputed in the backward pass):
    the same summed (GradDiff), per-sample (NPO) and per-token (WGA) NLL losses as the logits."""
    from trainer import answer_nll

    monkeypatch.chdir(REPO)
    calls = []
    original = answer_nll.chunked_linear_nll
    monkeypatch.setattr(answer_nll, "chunked_linear_nll", lambda *a, **k: calls.append(1) or original(*a, **k))
    common = _common(tofu_dir, trainer, forget)
    logits = train_in_process(tmp_path / "logits", common)
    assert not calls
    chunked = train_in_process(tmp_path / "chunked", [*common, "trainer.args.nll_impl=chunked"])
    assert len(calls) >= 8  # forget and retain terms of 4 steps
    _assert_same_curve(logits, chunked)


@pytest.mark.parametrize("trainer, forget, nll_impl", [("GradDiff", "TOFU_QA_FORGET10", "logits"),
                                                       ("NPO", "TOFU_QA_FORGET10", "logits"),
                                                       ("DPO", "TOFU_QA_FORGET10_IDK", "logits"),
                                                       ("NPO", "TOFU_QA_FORGET10", "chunked")])
def test_joint_forward_gives_the_same_loss_curve(tofu_dir, tmp_path, monkeypatch, trainer, forget, nll_impl):
    """``joint_forward=true``: forget and retain (and DPO's two answers) in one forward pass per step
    (with ``nll_impl=chunked`` too, against separate passes with the logits)."""
    import trainer.base as trainer_base

    monkeypatch.chdir(REPO)
    batch_rows = []
    original = trainer_base.answer_token_nll
    monkeypatch.setattr(trainer_base, "answer_token_nll",
                        lambda model, batch, *a, **k: batch_rows.append(len(batch["input_ids"])) or original(model, batch, *a, **k))
    common = _common(tofu_dir, trainer, forget)
    separate = train_in_process(tmp_path / "separate", common)
    assert set(batch_rows) == {4}
    batch_rows.clear()
    joint = train_in_process(tmp_path / "joint", [*common, "trainer.args.joint_forward=true",
                                                  f"trainer.args.nll_impl={nll_impl}"])
    assert set(batch_rows) == {12 if trainer == "DPO" else 8}  # every NLL pass ran on all the step's rows at once
    _assert_same_curve(separate, joint)


def test_length_matched_retain_pairing_trains_end_to_end(tofu_dir, tmp_path, monkeypatch):
    """``data.retain_pairing=length_matched`` with length-grouped batches: a run goes through, drawing
    every retain partner from its forget sample's length slice (not a speed-exact knob: other pairs)."""
    from data.unlearn import ForgetRetainDataset

    monkeypatch.chdir(REPO)
    widths = []
    original = ForgetRetainDataset.retain_index

    def retain_index(self, index):
        j = original(self, index)
        start, stop = self._retain_slices[index]
        assert j in self._retain_by_length[start:stop]
        widths.append(len(self.retain[j]["input_ids"]))
        return j

    monkeypatch.setattr(ForgetRetainDataset, "retain_index", retain_index)
    steps = train_in_process(tmp_path / "matched", [*_common(tofu_dir, "GradDiff", "TOFU_QA_FORGET10"),
                                                    "data.retain_pairing=length_matched",
                                                    "trainer.args.train_sampling_strategy=group_by_length"])
    assert len(steps) == 4 and len(widths) >= 16
    assert all(math.isfinite(s["loss"]) for s in steps)


@pytest.mark.slow  # compilation takes minutes on 2 CPU cores
def test_torch_compile_gives_the_same_loss_curve(tofu_dir, tmp_path, monkeypatch):
    """``+trainer.args.torch_compile=true`` (the Trainer compiles the model; measured by
    benchmarks/host_overhead.py) works with our trainers: same curve up to the compiled kernels' rounding."""
    monkeypatch.chdir(REPO)
    common = _common(tofu_dir, "GradDiff", "TOFU_QA_FORGET10")
    eager = train_in_process(tmp_path / "eager", common)
    compiled = train_in_process(tmp_path / "compiled", [*common, "+trainer.args.torch_compile=true"])
    _assert_same_curve(eager, compiled)
