"""The frozen reference runs in the policy's precision: at step 0 every NPO / DPO log-ratio is exactly 0.

With float32 weights and ``bf16: true`` the Trainer's accelerator runs the policy's forward under
bf16 autocast; a reference left in float32 gives log-ratios of the size of bf16 rounding (about 1e-2
per answer here) before the model has changed at all. CPU autocast in bf16 shows the same thing
without a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from conftest import MODEL_CACHE, REPO
from data import build_dataset, compose_dataset
from data.collators import DataCollatorForSupervisedDataset
from data.unlearn import ForgetRetainDataset
from model import get_model
from trainer import TRAINER_REGISTRY, UnlearningArguments


@pytest.fixture(scope="module")
def tiny():
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny-random-llama.yaml"))
    cfg["cache_dir"] = str(MODEL_CACHE)
    return get_model(cfg)


def _first_step_ratios(tiny, tofu_dir, tmp_path, monkeypatch, handler, forget, bf16, trainer_args):
    """Train one step of ``handler`` (CPU, bf16 autocast if ``bf16``) and return the log-ratios
    ``S_ref - S`` its loss received (for DPO: both answers') and the policy's ``S``."""
    import trainer.unlearn.dpo as dpo_module
    import trainer.unlearn.npo as npo_module

    base, tok = tiny
    model = copy.deepcopy(base)
    assert next(model.parameters()).dtype == torch.float32
    root = OmegaConf.create({"paths": {"tofu": str(tofu_dir)}, "seed": 0})
    data = ForgetRetainDataset(build_dataset(compose_dataset(forget, root), tok, {"apply_chat_template": True}), None)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    if handler == "NPO":
        loss = npo_module.npo_loss
        monkeypatch.setattr(npo_module, "npo_loss",
                            lambda nll, ref, beta: seen.append((ref - nll, nll)) or loss(nll, ref, beta))
    else:
        loss = dpo_module.dpo_loss
        monkeypatch.setattr(dpo_module, "dpo_loss", lambda w, ref_w, lose, ref_l, beta: seen.extend(
            [(ref_w - w, w), (ref_l - lose, lose)]) or loss(w, ref_w, lose, ref_l, beta))
    args = UnlearningArguments(output_dir=str(tmp_path / handler), use_cpu=True, bf16=bf16, max_steps=1,
                               per_device_train_batch_size=4, report_to="none", remove_unused_columns=False,
                               disable_tqdm=True, save_strategy="no", pack_rows=False, **trainer_args)
    trainer = TRAINER_REGISTRY[handler](model=model, args=args, train_dataset=data, processing_class=tok,
                                        data_collator=DataCollatorForSupervisedDataset(tok), retain_loss_type=None)
    trainer.train()
    assert seen
    return tuple(torch.cat(t).detach().float() for t in zip(*seen))


@pytest.mark.parametrize("handler, forget", [("NPO", "TOFU_QA_FORGET10"), ("DPO", "TOFU_QA_FORGET10_IDK")])
@pytest.mark.parametrize("precompute", [False, True])
def test_log_ratios_are_zero_at_step_0_under_bf16_autocast(tiny, tofu_dir, tmp_path, monkeypatch, handler, forget,
                                                           precompute):
    ratios, nll = _first_step_ratios(tiny, tofu_dir, tmp_path, monkeypatch, handler, forget, bf16=True,
                                     trainer_args={"precompute_ref_log_probs": precompute})
    if not precompute:  # the reference runs on the step's own batch: the same computation, bit for bit
        assert torch.equal(ratios, torch.zeros_like(ratios)), ratios
    else:  # precomputed on other batches (other padding): a few float32 ulps of S (~1e-5), vs ~1e-3 below
        assert (ratios.abs() <= 4 * torch.finfo(torch.float32).eps * nll.abs()).all(), (ratios, nll)


def test_a_float32_reference_would_not_give_zero(tiny, tofu_dir, tmp_path, monkeypatch):
    """The test above can fail: a reference outside the autocast (the old behaviour) gives non-zero ratios."""
    from trainer.unlearn.base import UnlearningTrainer

    def unprepared_reference(self):
        ref = copy.deepcopy(self.accelerator.unwrap_model(self.model)).eval().requires_grad_(False)
        return ref.to(self.args.device)

    monkeypatch.setattr(UnlearningTrainer, "_make_reference_model", unprepared_reference)
    ratios, nll = _first_step_ratios(tiny, tofu_dir, tmp_path, monkeypatch, "NPO", "TOFU_QA_FORGET10", bf16=True,
                                     trainer_args={"precompute_ref_log_probs": False})
    assert (ratios.abs() > 4 * torch.finfo(torch.float32).eps * nll.abs()).any(), (ratios, nll)
