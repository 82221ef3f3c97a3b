"""No host-device synchronisation inside a training step of our code.

On a GPU every read of a device value by the host (``.item()``, ``float(t)``, ``bool(t)``,
``.tolist()``, ``.cpu()``, boolean-mask indexing, ``nonzero``) makes the host wait until the device
has run everything queued so far; the host then queues the rest of the step while the device idles.
Unlearning steps of small models are launch-bound (issue 5: ~10 ms of arithmetic in a 300 ms step),
so these waits cost time. The machine here has no GPU, so the tests count the operations that would
synchronise there, with a ``TorchFunctionMode`` active from ``on_step_begin`` to ``on_step_end``
(forward, loss, backward, clipping, optimizer; data loading and collation happen before).
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import TrainerCallback

from conftest import REPO, train_in_process

_T = torch.Tensor
_HOST_READS = {_T.item: "item", _T.__bool__: "bool", _T.__float__: "float", _T.__int__: "int",
               _T.__index__: "index", _T.tolist: "tolist", _T.numpy: "numpy", _T.cpu: "cpu",
               torch.nonzero: "nonzero", _T.nonzero: "nonzero", torch.masked_select: "masked_select",
               _T.masked_select: "masked_select"}


class HostReadCounter(TorchFunctionMode):
    """Counts, per (operation, calling line outside torch), the tensor operations that read device data."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.reads: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.active:
            name = _HOST_READS.get(func)
            if func is _T.__getitem__ and len(args) > 1:
                index = args[1] if isinstance(args[1], tuple) else (args[1],)
                if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                    name = "bool_mask_index"
            if name:
                frames = [f for f in traceback.extract_stack()[:-1]
                          if "/torch/" not in f.filename and f.filename != __file__]
                caller = frames[-1]
                where = caller.filename.split("site-packages/")[-1].split(str(REPO) + "/")[-1]
                self.reads[(name, f"{where}:{caller.lineno}")] += 1
        return func(*args, **(kwargs or {}))


class _CountDuringSteps(TrainerCallback):
    def __init__(self, counter: HostReadCounter):
        self.counter, self.steps = counter, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self.counter.active = True

    def on_step_end(self, args, state, control, **kwargs):
        self.counter.active = False
        self.steps += 1


def _host_reads(tofu_dir, tmp_path, monkeypatch, trainer: str, forget: str, *extra: str):
    import train

    counter = HostReadCounter()
    callback = _CountDuringSteps(counter)
    build = train.load_trainer

    def load_trainer_with_counter(*args, **kwargs):
        built = build(*args, **kwargs)
        built.add_callback(callback)
        return built

    monkeypatch.setattr(train, "load_trainer", load_trainer_with_counter)
    monkeypatch.chdir(REPO)
    overrides = ["model=tiny-random-llama", f"trainer={trainer}", f"data.forget={forget}",
                 "data.retain=TOFU_QA_RETAIN90", f"paths.tofu={tofu_dir}", "trainer.args.max_steps=3",
                 "trainer.args.per_device_train_batch_size=2", "trainer.args.gradient_accumulation_steps=1",
                 "trainer.args.logging_steps=100", "trainer.args.disable_tqdm=true",
                 # these counts are about GPU steps: packing (pack_rows=auto packs on a CPU only) builds its
                 # layout from the token ids on the host
                 "trainer.args.pack_rows=false", *extra]
    with counter:
        train_in_process(tmp_path / "run", overrides)
    assert callback.steps == 3
    ours = {k: n for k, n in counter.reads.items() if k[1].startswith("src/")}
    theirs = {k: n for k, n in counter.reads.items() if not k[1].startswith("src/")}
    return ours, theirs


@pytest.mark.parametrize("trainer, forget, extra, forwards_per_step", [
    ("GradDiff", "TOFU_QA_FORGET10", (), 2),
    ("GradDiff", "TOFU_QA_FORGET10", ("trainer.args.joint_forward=true",), 1),
    ("GradDiff", "TOFU_QA_FORGET10", ("trainer.args.nll_impl=chunked",), 2),  # answer_tokens from the collator
    ("NPO", "TOFU_QA_FORGET10", ("trainer.args.nll_impl=chunked", "trainer.args.joint_forward=true"), 1),
    ("NPO", "TOFU_QA_FORGET10", (), 2),         # reference NLLs looked up by keys made at collation
    ("SimNPO", "TOFU_QA_FORGET10", (), 2),      # per-sample means without a zero-count check
    ("DPO", "TOFU_QA_FORGET10_IDK", (), 3),
    ("PDU", "TOFU_QA_FORGET10", ("trainer.method_args.retain_loss_eps=2.0",), 2),  # lambda stays on the device
    ("WGA", "TOFU_QA_FORGET10", (), 2),         # weighted token sums without a boolean mask index
])
def test_training_steps_read_nothing_back_from_the_device(tofu_dir, tmp_path, monkeypatch, trainer, forget, extra,
                                                          forwards_per_step):
    ours, theirs = _host_reads(tofu_dir, tmp_path, monkeypatch, trainer, forget, *extra)
    assert ours == {}, f"host reads of device values in our training step: {ours}"
    # What remains is transformers' own check for packed sequences, once per forward pass of a batch
    # without attention mask (model_inputs leaves the mask out of right-padded batches).
    assert set(theirs) <= {k for k in theirs if "masking_utils" in k[1]}, theirs
    assert sum(theirs.values()) == 3 * forwards_per_step, theirs


def test_the_counter_sees_a_host_read(tofu_dir, tmp_path, monkeypatch):
    """The test above cannot pass vacuously: a loss term read with float() each step is counted."""
    from trainer.base import FinetuneTrainer

    def eager_log_loss_terms(self, **terms):
        for value in terms.values():
            float(value.detach())

    monkeypatch.setattr(FinetuneTrainer, "log_loss_terms", eager_log_loss_terms)
    ours, _ = _host_reads(tofu_dir, tmp_path, monkeypatch, "GradDiff", "TOFU_QA_FORGET10")
    # forget_loss and retain_loss, 3 steps; the caller outside this file is the method's weighted_total
    assert {op for op, _ in ours} == {"float"} and sum(ours.values()) == 6, ours
