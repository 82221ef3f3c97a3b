"""Relearning attack: fine-tune a copy of the model for a few steps on related data, then evaluate again
(Hu et al. 2024, "Jogging the Memory of Unlearned LLMs Through Targeted Relearning Attacks",
arXiv:2406.13356; Lynch et al. 2024, arXiv:2402.16835; Deeb & Roger 2024, arXiv:2410.08827).

Knowledge that was only hidden comes back after a few dozen steps on a fraction of the forget set (or
its paraphrases, or other questions about the same entities); knowledge that is gone has to be learned
again. So the same relearning is applied to the retain model (``baseline_model_path``, which never saw
the forget set) as the baseline: "how fast it comes back" is the comparison of the two.

The copy is trained with AdamW (no weight decay, constant learning rate) on the mean answer-token NLL,
every weight trainable; batches are drawn from a seeded permutation of the relearning set.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from checks import BadValueError, check_number
from core.compute import add_tokens, mask_tokens
from data.collators import DataCollatorForSupervisedDataset
from progress import progress_over
from trainer.answer_nll import answer_token_nll
from trainer.losses import token_mean

log = logging.getLogger(__name__)


def relearning_rows(size: int, fraction: float, seed: int) -> list[int]:
    """The rows of a dataset of ``size`` rows relearned on: the first ``ceil(fraction * size)`` of a seeded
    permutation (at least one)."""
    check_number("attack.relearn.fraction", fraction, low=0, low_open=True, high=1)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(order[:max(1, math.ceil(fraction * size))])


def relearned_copy(model: torch.nn.Module, dataset: Any, tokenizer: Any, steps: int, learning_rate: float,
                   batch_size: int, seed: int = 0) -> torch.nn.Module:
    """A copy of ``model`` after ``steps`` AdamW steps on ``dataset`` (every weight trainable); ``model`` untouched."""
    steps = check_number("attack.relearn.steps", steps, integer=True, low=1)
    batch_size = check_number("attack.relearn.batch_size", batch_size, integer=True, low=1)
    check_number("attack.relearn.learning_rate", learning_rate, low=0, low_open=True)
    if len(dataset) == 0:
        raise BadValueError("attack.relearn: the relearning set is empty")
    attacked = copy.deepcopy(model)
    params = [p for p in attacked.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    attacked.train()
    optimizer = torch.optim.AdamW(params, lr=float(learning_rate), weight_decay=0.0)
    collate = DataCollatorForSupervisedDataset(tokenizer)
    device = next(attacked.parameters()).device
    generator = torch.Generator().manual_seed(int(seed))
    order: list[int] = []
    for step in progress_over(range(steps), "relearning", unit="step"):
        if len(order) < batch_size:
            order += torch.randperm(len(dataset), generator=generator).tolist()
        rows, order = order[:batch_size], order[batch_size:]
        batch = collate([_first(dataset[i]) for i in rows])
        add_tokens(attacked, mask_tokens(batch), backward=True)  # the cost record; the mask is still on the host
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        nll, mask = answer_token_nll(attacked, batch)
        loss = token_mean(nll.sum(-1), mask.sum(-1))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"attack.relearn: non-finite loss at step {step + 1}; lower attack.relearn.learning_rate")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    attacked.eval()
    for p in params:
        p.requires_grad_(False)
    return attacked


def _first(item: Any) -> dict:
    return item[0] if isinstance(item, list) else item


def check_config(cfg: Mapping[str, Any], default_data: Mapping[str, Any] | None = None) -> None:
    """Every option of ``attack.relearn`` checked before any work: the numbers, the data to relearn on
    (``data``, else the benchmark's ``relearn_data``) and the baseline model folder."""
    check_number("attack.relearn.steps", cfg.get("steps", 30), integer=True, low=1)
    check_number("attack.relearn.batch_size", cfg.get("batch_size", 4), integer=True, low=1)
    check_number("attack.relearn.learning_rate", cfg.get("learning_rate", 1e-5), low=0, low_open=True)
    check_number("attack.relearn.fraction", cfg.get("fraction", 0.5), low=0, low_open=True, high=1)
    check_number("attack.relearn.seed", cfg.get("seed", 0), integer=True, low=0)
    if not (cfg.get("data") or default_data):
        raise BadValueError("attack.relearn.data is not set and the benchmark declares no relearn_data: name a dataset "
                            "config to relearn on (e.g. attack.relearn.data=TOFU_QA_FORGET10)")
    baseline = cfg.get("baseline_model_path")
    if baseline not in (None, "auto") and not (Path(str(baseline)).expanduser() / "config.json").is_file():
        raise BadValueError(f"attack.relearn.baseline_model_path={baseline}: not a model folder (no config.json in it); "
                            "give the retain model's folder, auto (the model recorded in retain_logs_path) or null")


def relearning_set(cfg: Mapping[str, Any], tokenizer: Any, template_args: Any,
                   default_data: Mapping[str, Any] | None = None) -> Any:
    """The rows relearned on: ``attack.relearn.data`` (a dataset config, composed by the entry point from its
    name), else ``default_data`` (the benchmark's ``relearn_data``), cut to ``fraction`` of its rows."""
    from torch.utils.data import Subset

    from data import build_dataset
    from data.splits import dataset_names

    check_config(cfg, default_data)
    data = cfg.get("data") or default_data
    dataset = build_dataset(data, tokenizer, template_args=template_args,
                            dataset_args=cfg.get("dataset_args") or {})
    rows = relearning_rows(len(dataset), float(cfg.get("fraction", 0.5)), int(cfg.get("seed", 0)))
    log.info("relearn: %d of %d rows of %s, %d steps", len(rows), len(dataset), dataset_names(data), cfg.get("steps"))
    return Subset(dataset, rows)


def relearn(model: torch.nn.Module, cfg: Mapping[str, Any], tokenizer: Any, template_args: Any,
            default_data: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The attacked model of ``attack.relearn`` (``default_data``: the benchmark's ``relearn_data``)."""
    dataset = relearning_set(cfg, tokenizer, template_args, default_data)
    return relearned_copy(model, dataset, tokenizer, cfg.get("steps", 30), cfg.get("learning_rate", 1e-5),
                          cfg.get("batch_size", 4), int(cfg.get("seed", 0)))


def suffix(cfg: Mapping[str, Any]) -> str:
    return "relearn"
