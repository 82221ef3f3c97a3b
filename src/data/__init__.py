"""Datasets and collators, looked up by name.

``configs/data/datasets/<NAME>.yaml`` describes one dataset (``name``, ``handler`` = a class registered here,
and its ``args``). Hydra composes these files into the run's config: ``configs/data/unlearn.yaml`` places its
default datasets with package directives (``datasets@forget: TOFU_QA_FORGET10`` -> ``data.forget``), and every
metric config places its own (``/data/datasets@datasets.main: _TOFU_QA``). A name given on the command line
(``data.forget=TOFU_QA_FORGET05``) is composed once, by the entry point (``resolvers.compose_names``, through
``compose_dataset``). ``get_data`` builds what a run needs from the composed nodes; in unlearning mode forget
and retain are paired into one training dataset.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from checks import check_bool
from data.collators import DataCollatorForSupervisedDataset, DataCollatorForSupervisedDatasetWithIndices
from data.splits import check_eval_splits, dataset_names, forget_split_of, holdout_for
from data.text import CompletionDataset, ConcatenatedDataset, PretrainingDataset
from data.tofu import QADataset, QAwithAlternateDataset, QAwithIdkDataset
from data.unlearn import ForgetRetainDataset

log = logging.getLogger(__name__)

DATASET_REGISTRY: dict[str, type] = {}
COLLATOR_REGISTRY: dict[str, type] = {}
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
DATASET_CONFIG_DIR = CONFIG_DIR / "data" / "datasets"
#: The dataset roles of ``data`` (``data.<role>``): a composed dataset, a list of them, or null.
DATA_ROLES = ("train", "forget", "retain", "eval")


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


def compose_config(group: str, name: str, package: str) -> DictConfig:
    """``configs/<group>/<name>.yaml`` as Hydra composes the override ``+<group>=<name>`` (its defaults list
    applied), taken from ``package`` (where that file lands: ``data.datasets`` for a dataset config,
    ``model.peft`` for a PEFT config). Interpolations (``${paths.tofu}``, ``${seed}``) are left as they are:
    they resolve in the config the node is put into. Inside a Hydra app (``@hydra.main``, or the compose API
    after ``initialize_config_dir``) the app's config search path is used; otherwise this repository's configs/."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"+{group}={name}"]
    if GlobalHydra.instance().is_initialized():
        composed = compose(overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = compose(overrides=overrides)
    node = OmegaConf.select(composed, package)
    if not isinstance(node, DictConfig):
        raise ValueError(f"configs/{group}/{name}.yaml composed nothing at {package}")
    return OmegaConf.create(OmegaConf.to_container(node, resolve=False))  # detached from the composed root


def compose_dataset(name: str, context: Mapping | None = None, where: str = "dataset") -> DictConfig:
    """The dataset config ``name`` (a file of configs/data/datasets) composed by Hydra: ``name``, ``handler``
    and ``args``. Its interpolations resolve where the node is put (the entry point puts it into the run's
    config); ``context`` (outside a run: scripts and tests, e.g. ``{"paths": {"tofu": <folder>}, "seed": 0}``)
    resolves them against that mapping instead. An unknown name is a ValueError listing the valid ones
    (``where``: the setting that gave it, e.g. ``data.forget``)."""
    if not isinstance(name, str) or name not in available_datasets():
        raise ValueError(f"{where}: unknown dataset {name!r}; valid names: {', '.join(available_datasets())}")
    node = compose_config("data/datasets", name, "data.datasets")
    if context is None:
        return node
    root = OmegaConf.create(OmegaConf.to_container(context, resolve=False) if OmegaConf.is_config(context)
                            else copy.deepcopy(dict(context)))
    OmegaConf.set_struct(root, False)
    root["_dataset"] = node
    return OmegaConf.create(OmegaConf.to_container(root["_dataset"], resolve=True))


def dataset_config(spec: Mapping, where: str = "dataset") -> dict:
    """A composed dataset config (``handler``, ``args``, optionally ``name``) as plain data, checked.

    A node of the run's config resolves its interpolations there (``${paths.tofu}``, ``${eval.tofu.forget_split}``);
    a name is refused: names are composed by the entry point (``resolvers.compose_names``) or ``compose_dataset``.
    """
    if isinstance(spec, str):
        raise ValueError(f"{where}={spec!r} is a dataset name, not a composed dataset config: the entry point "
                         f"composes the names of data.* (resolvers.compose_names; data.compose_dataset outside a run), "
                         f"and a metric config composes its datasets in its defaults list "
                         f"('- /data/datasets@datasets.<role>: {spec}'); valid names: {', '.join(available_datasets())}")
    if OmegaConf.is_config(spec):
        cfg = OmegaConf.to_container(spec, resolve=True)
    elif isinstance(spec, Mapping):
        cfg = copy.deepcopy(dict(spec))
    else:
        raise ValueError(f"{where}={spec!r}: give a dataset config (handler and args) or a dataset name "
                         f"(valid: {', '.join(available_datasets())})")
    what = f"dataset {cfg['name']}" if cfg.get("name") else where
    if "defaults" in cfg:
        raise ValueError(f"{what} has a defaults list: Hydra composes dataset configs, so select a base with a "
                         f"package directive (data/datasets@data.forget=<NAME>, or /data/datasets@datasets.<role>: "
                         f"<NAME> in a metric config's defaults list) and override its keys")
    if cfg.get("handler") not in DATASET_REGISTRY:
        hint = (" (data.<role>=<NAME> followed by data.<role>.args...=... replaces the name; select the dataset with "
                "data/datasets@data.<role>=<NAME> to override its args)" if "handler" not in cfg else "")
        raise ValueError(f"{what}: handler {cfg.get('handler')!r} unknown; valid: {sorted(DATASET_REGISTRY)}" + hint)
    return cfg


def build_dataset(spec: Mapping, tokenizer: PreTrainedTokenizerBase, template_args: Any = None,
                  dataset_args: Mapping | None = None) -> Dataset:
    """Instantiate one composed dataset config; ``dataset_args`` (``data.dataset_args``) override every dataset's
    args.

    A dataset config's own ``args.template_args`` (e.g. plain ``Question:``/``Answer:`` tags for MUSE's
    knowledge prompts) are merged over the model's ``template_args``: the template is a property of
    the dataset where the benchmark fixes it."""
    cfg = dataset_config(spec)
    handler = DATASET_REGISTRY[cfg["handler"]]
    overrides = {k: v for k, v in dict(dataset_args or {}).items() if v is not None and _accepts(handler, k)}
    args = {**cfg.get("args", {}), **overrides}
    if isinstance(template_args, DictConfig):
        template_args = OmegaConf.to_container(template_args, resolve=True)
    if args.get("template_args"):
        template_args = {**(template_args or {}), **args.pop("template_args")}
    args.pop("template_args", None)
    if cfg.get("name"):
        args["name"] = cfg["name"]
    return handler(tokenizer=tokenizer, template_args=template_args, **args)


def _accepts(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` takes the keyword ``name`` (itself or through a parent class's ``__init__``)."""
    return any(name in inspect.signature(c.__init__).parameters for c in cls.__mro__ if "__init__" in vars(c))


def accepts_arg(spec: Mapping, name: str) -> bool:
    """Whether the dataset class of the config ``spec`` takes the argument ``name`` (True without a handler)."""
    handler = DATASET_REGISTRY.get(spec.get("handler")) if isinstance(spec, Mapping) else None
    return handler is None or _accepts(handler, name)


def _role_specs(data_cfg: DictConfig | Mapping, role: str) -> list:
    spec = data_cfg.get(role)
    if spec is None:
        return []
    return list(spec) if isinstance(spec, (list, ListConfig)) else [spec]


def get_data(data_cfg: DictConfig | Mapping, mode: str, tokenizer: PreTrainedTokenizerBase, template_args: Any = None,
             seed: int = 0, need_eval: bool = True) -> dict[str, Dataset | None]:
    """Datasets of a run: ``{"train": ..., "eval": ...}`` (plus ``forget``/``retain`` in unlearn mode).

    ``data_cfg`` holds composed dataset configs (``resolvers.compose_names`` turns names into them).
    ``mode="train"`` reads ``data.train``; ``mode="unlearn"`` reads ``data.forget`` and ``data.retain``
    (optional) and pairs them with ``ForgetRetainDataset``. ``data.eval`` is optional in both, and is
    built only with ``need_eval`` (the run evaluates: ``trainer.evaluates(cfg.trainer.args)``); otherwise
    ``"eval"`` is None and its file is never read. ``data.retain_pairing`` and
    ``data.retain_partners_from_global_rng`` configure the pairing (``ForgetRetainDataset``).
    """
    dataset_args = {k: v for k, v in dict(data_cfg.get("dataset_args") or {}).items() if v is not None}
    handlers = {DATASET_REGISTRY[dataset_config(s, f"data.{role}")["handler"]]
                for role in DATA_ROLES for s in _role_specs(data_cfg, role)}
    unused = sorted(k for k in dataset_args if handlers and not any(_accepts(h, k) for h in handlers))
    if unused:
        raise ValueError(f"data.dataset_args {unused}: no dataset of this run ({', '.join(sorted(h.__name__ for h in handlers))}) "
                         "takes that argument; see the dataset classes in src/data for their arguments")
    if not need_eval and data_cfg.get("eval") is not None:
        log.info("data.eval=%s not loaded: the run does not evaluate (trainer.args.eval_strategy is 'no')",
                 dataset_names(data_cfg.get("eval")))

    def build(role: str) -> Dataset | None:
        spec = data_cfg.get(role)
        if spec is None or (role == "eval" and not need_eval):
            return None
        if isinstance(spec, (list, ListConfig)):  # data.train=[MUSE_forget,MUSE_retain]: one dataset after the other
            if not spec:
                raise ValueError(f"data.{role} is an empty list; give dataset names "
                                 f"(valid: {', '.join(available_datasets())})")
            return ConcatenatedDataset([build_dataset(s, tokenizer, template_args, dataset_args) for s in spec])
        return build_dataset(spec, tokenizer, template_args, dataset_args)

    if mode == "train":
        if data_cfg.get("train") is None:
            raise ValueError(f"data.train is required to fine-tune; valid names: {', '.join(available_datasets())}")
        return {"train": build("train"), "eval": build("eval")}
    if mode == "unlearn":
        if data_cfg.get("forget") is None:
            raise ValueError(f"data.forget is required to unlearn; valid names: {', '.join(available_datasets())}")
        forget, retain = build("forget"), build("retain")
        paired = ForgetRetainDataset(forget, retain, seed=seed,
                                     retain_from_global_rng=check_bool(
                                         "data.retain_partners_from_global_rng",
                                         data_cfg.get("retain_partners_from_global_rng", False)),
                                     retain_pairing=data_cfg.get("retain_pairing") or "random")
        return {"train": paired, "eval": build("eval"),
                "forget": forget, "retain": retain}
    raise ValueError(f"mode={mode!r}; valid: 'train', 'unlearn'")


def data_input_paths(data_cfg: DictConfig | Mapping) -> list[str]:
    """The local data folder of every dataset of ``data_cfg`` (``train``, ``forget``, ``retain``, ``eval``)."""
    found = [dataset_config(s, f"data.{role}").get("args", {}).get("local_dir")
             for role in DATA_ROLES for s in _role_specs(data_cfg, role)]
    return [str(p) for p in dict.fromkeys(found) if p]


def get_collator(collator_cfg: DictConfig | Mapping, tokenizer: PreTrainedTokenizerBase) -> Any:
    """The collator of ``collator_cfg`` (``handler`` and its ``args``)."""
    handler = collator_cfg.get("handler")
    if handler not in COLLATOR_REGISTRY:
        raise ValueError(f"unknown collator {handler!r}; valid: {sorted(COLLATOR_REGISTRY)}")
    args = collator_cfg.get("args") or {}
    if isinstance(args, DictConfig):
        args = OmegaConf.to_container(args, resolve=True)
    args = dict(args)
    return COLLATOR_REGISTRY[handler](tokenizer=tokenizer, **args)


__all__ = ["DATASET_REGISTRY", "COLLATOR_REGISTRY", "DATA_ROLES", "get_data", "get_collator", "build_dataset",
           "data_input_paths", "dataset_config", "compose_config", "compose_dataset", "accepts_arg",
           "available_datasets", "QADataset", "QAwithIdkDataset", "PretrainingDataset", "CompletionDataset",
           "QAwithAlternateDataset", "ForgetRetainDataset", "check_eval_splits", "forget_split_of", "holdout_for"]
