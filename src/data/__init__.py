"""Datasets and collators, looked up by name.

``configs/data/datasets/<NAME>.yaml`` describes one dataset (``handler`` = a class registered here, and
its ``args``); ``data.forget=<NAME>`` (or ``data.retain``, ``data.eval``, ``data.train``) picks one by
name. ``get_data`` builds what a run needs; in unlearning mode forget and retain are paired into one
training dataset.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from compat import compat_of, get_compat
from data.collators import DataCollatorForSupervisedDataset, DataCollatorForSupervisedDatasetWithIndices
from data.splits import check_eval_splits, forget_split_of, holdout_for
from data.text import CompletionDataset, ConcatenatedDataset, PretrainingDataset
from data.tofu import QADataset, QAwithAlternateDataset, QAwithIdkDataset
from data.unlearn import ForgetRetainDataset

log = logging.getLogger(__name__)

DATASET_REGISTRY: dict[str, type] = {}
COLLATOR_REGISTRY: dict[str, type] = {}
DATASET_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "data" / "datasets"


def _register_data(cls: type) -> type:
    DATASET_REGISTRY[cls.__name__] = cls
    return cls


def _register_collator(cls: type) -> type:
    COLLATOR_REGISTRY[cls.__name__] = cls
    return cls


_register_data(QADataset)
_register_data(QAwithIdkDataset)
_register_data(QAwithAlternateDataset)
_register_data(PretrainingDataset)
_register_data(CompletionDataset)
_register_collator(DataCollatorForSupervisedDataset)
_register_collator(DataCollatorForSupervisedDatasetWithIndices)


def available_datasets() -> list[str]:
    """Names accepted by ``data.forget=`` / ``data.retain=`` / ``data.eval=`` / ``data.train=``."""
    return sorted(p.stem for p in DATASET_CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _load_dataset_file(name: str, seen: tuple[str, ...] = ()) -> DictConfig:
    """A dataset config file with its ``defaults`` (base files, merged first) applied, as in Hydra."""
    path = DATASET_CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(available_datasets())}")
    if name in seen:
        raise ValueError(f"dataset config {name} includes itself through defaults: {' -> '.join(seen + (name,))}")
    raw = OmegaConf.load(path)
    bases = [b for b in raw.pop("defaults", []) if b != "_self_"]
    return OmegaConf.merge(*[_load_dataset_file(b, seen + (name,)) for b in bases], raw)


def dataset_config(name_or_cfg: str | Mapping, root_cfg: DictConfig | None = None) -> dict:
    """The resolved config of a dataset given by name (a file in configs/data/datasets) or inline.

    Interpolations such as ``${paths.tofu}`` are resolved against ``root_cfg``, the run's config.
    """
    if isinstance(name_or_cfg, str):
        raw = _load_dataset_file(name_or_cfg)
        name = name_or_cfg
    else:
        raw = OmegaConf.create(OmegaConf.to_container(name_or_cfg) if isinstance(name_or_cfg, DictConfig)
                               else dict(name_or_cfg))
        bases = [b for b in raw.pop("defaults", []) if b != "_self_"]
        raw = OmegaConf.merge(*[_load_dataset_file(b) for b in bases], raw)
        name = raw.get("name", "inline dataset")
    root = OmegaConf.create(OmegaConf.to_container(root_cfg, resolve=False)) if root_cfg is not None \
        else OmegaConf.create({})
    OmegaConf.set_struct(root, False)
    root["_dataset"] = raw
    cfg = OmegaConf.to_container(root["_dataset"], resolve=True)
    cfg.setdefault("name", name)
    if "handler" not in cfg or cfg["handler"] not in DATASET_REGISTRY:
        raise ValueError(f"dataset {name}: handler {cfg.get('handler')!r} unknown; valid: {sorted(DATASET_REGISTRY)}")
    return cfg


def build_dataset(name_or_cfg: str | Mapping, tokenizer: PreTrainedTokenizerBase, template_args: Any = None,
                  root_cfg: DictConfig | None = None, dataset_args: Mapping | None = None) -> Dataset:
    """Instantiate one dataset; ``dataset_args`` (``data.dataset_args``) override every dataset's args.

    A dataset config's own ``args.template_args`` (e.g. plain ``Question:``/``Answer:`` tags for MUSE's
    knowledge prompts) are merged over the model's ``template_args``: the template is a property of
    the dataset where the benchmark fixes it."""
    cfg = dataset_config(name_or_cfg, root_cfg)
    handler = DATASET_REGISTRY[cfg["handler"]]
    overrides = {k: v for k, v in dict(dataset_args or {}).items() if v is not None and _accepts(handler, k)}
    args = {**cfg.get("args", {}), **overrides}
    if isinstance(template_args, DictConfig):
        template_args = OmegaConf.to_container(template_args, resolve=True)
    if args.get("template_args"):
        template_args = {**(template_args or {}), **args.pop("template_args")}
    args.pop("template_args", None)
    if _accepts(handler, "compat"):
        args.setdefault("compat", compat_of(root_cfg).name)
    return handler(tokenizer=tokenizer, template_args=template_args, name=cfg["name"], **args)


def _accepts(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` takes the keyword ``name`` (itself or through a parent class's ``__init__``)."""
    return any(name in inspect.signature(c.__init__).parameters for c in cls.__mro__ if "__init__" in vars(c))


def get_data(data_cfg: DictConfig | Mapping, mode: str, tokenizer: PreTrainedTokenizerBase, template_args: Any = None,
             root_cfg: DictConfig | None = None, seed: int = 0,
             need_eval: bool = True) -> dict[str, Dataset | None]:
    """Datasets of a run: ``{"train": ..., "eval": ...}`` (plus ``forget``/``retain`` in unlearn mode).

    ``mode="train"`` reads ``data.train``; ``mode="unlearn"`` reads ``data.forget`` and ``data.retain``
    (optional) and pairs them with ``ForgetRetainDataset``. ``data.eval`` is optional in both, and is
    built only with ``need_eval`` (the run evaluates: ``trainer.evaluates(cfg.trainer.args)``); otherwise
    ``"eval"`` is None and its file is never read.
    """
    dataset_args = {k: v for k, v in dict(data_cfg.get("dataset_args") or {}).items() if v is not None}
    specs = [s for role in ("train", "forget", "retain", "eval") if data_cfg.get(role) is not None
             for s in (data_cfg.get(role) if isinstance(data_cfg.get(role), (list, ListConfig)) else [data_cfg.get(role)])]
    handlers = {DATASET_REGISTRY[dataset_config(s, root_cfg)["handler"]] for s in specs}
    unused = sorted(k for k in dataset_args if handlers and not any(_accepts(h, k) for h in handlers))
    if unused:
        raise ValueError(f"data.dataset_args {unused}: no dataset of this run ({', '.join(sorted(h.__name__ for h in handlers))}) "
                         "takes that argument; see the dataset classes in src/data for their arguments")
    if not need_eval and data_cfg.get("eval") is not None:
        log.info("data.eval=%s not loaded: the run does not evaluate (trainer.args.eval_strategy is 'no')",
                 data_cfg.get("eval"))

    def build(role: str) -> Dataset | None:
        spec = data_cfg.get(role)
        if spec is None or (role == "eval" and not need_eval):
            return None
        if isinstance(spec, (list, ListConfig)):  # data.train=[MUSE_forget,MUSE_retain]: one dataset after the other
            if not spec:
                raise ValueError(f"data.{role} is an empty list; give dataset names "
                                 f"(valid: {', '.join(available_datasets())})")
            return ConcatenatedDataset([build_dataset(s, tokenizer, template_args, root_cfg, dataset_args) for s in spec])
        return build_dataset(spec, tokenizer, template_args, root_cfg, dataset_args)

    if mode == "train":
        if data_cfg.get("train") is None:
            raise ValueError(f"data.train is required to fine-tune; valid names: {', '.join(available_datasets())}")
        return {"train": build("train"), "eval": build("eval")}
    if mode == "unlearn":
        if data_cfg.get("forget") is None:
            raise ValueError(f"data.forget is required to unlearn; valid names: {', '.join(available_datasets())}")
        forget, retain = build("forget"), build("retain")
        paired = ForgetRetainDataset(forget, retain, seed=seed,
                                     retain_from_global_rng=compat_of(root_cfg).retain_partners_from_global_rng,
                                     retain_pairing=data_cfg.get("retain_pairing") or "random")
        return {"train": paired, "eval": build("eval"),
                "forget": forget, "retain": retain}
    raise ValueError(f"mode={mode!r}; valid: 'train', 'unlearn'")


def data_input_paths(data_cfg: DictConfig | Mapping, root_cfg: DictConfig | None = None) -> list[str]:
    """The local data folder of every dataset of ``data_cfg`` (``train``, ``forget``, ``retain``, ``eval``)."""
    found = []
    for role in ("train", "forget", "retain", "eval"):
        spec = data_cfg.get(role)
        for s in spec if isinstance(spec, (list, ListConfig)) else [spec] if spec is not None else []:
            found.append(dataset_config(s, root_cfg).get("args", {}).get("local_dir"))
    return [str(p) for p in dict.fromkeys(found) if p]


def get_collator(collator_cfg: DictConfig | Mapping, tokenizer: PreTrainedTokenizerBase, compat: Any = None) -> Any:
    """The collator of ``collator_cfg``; ``compat`` (the run's mode) sets the switches it names (the mask)."""
    handler = collator_cfg.get("handler")
    if handler not in COLLATOR_REGISTRY:
        raise ValueError(f"unknown collator {handler!r}; valid: {sorted(COLLATOR_REGISTRY)}")
    args = collator_cfg.get("args") or {}
    if isinstance(args, DictConfig):
        args = OmegaConf.to_container(args, resolve=True)
    args = dict(args)
    if get_compat(compat).attention_mask_from_pad and _accepts(COLLATOR_REGISTRY[handler], "attention_mask_from_pad"):
        args.setdefault("attention_mask_from_pad", True)
    return COLLATOR_REGISTRY[handler](tokenizer=tokenizer, **args)


__all__ = ["DATASET_REGISTRY", "COLLATOR_REGISTRY", "get_data", "get_collator", "build_dataset", "data_input_paths",
           "dataset_config", "available_datasets", "QADataset", "QAwithIdkDataset", "PretrainingDataset",
           "CompletionDataset",
           "QAwithAlternateDataset", "ForgetRetainDataset", "check_eval_splits", "forget_split_of", "holdout_for"]
