"""The OmegaConf resolvers our configs use, and the composition of config names, in one place.

Every entry point (src/train.py, src/eval.py, src/sequential.py, the benchmarks' ``common.compose``, the
tests' ``conftest``) calls :func:`register_resolvers` once, before it composes or resolves a config; no
library module registers anything when it is imported.

- ``${holdout_for:<forget split>}``: TOFU's holdout split of the same size (forget10 -> holdout10);
- ``${forget_split_of:<dataset>}``: the forget split a dataset config reads (TOFU_QA_FORGET10 -> forget10);
- ``${muse_corpus:<name>}``: MUSE's corpus name, checked (News, Books);
- ``${lower:<text>}`` / ``${upper:<text>}``: case changes (``TOFU_QA_${upper:${forget_split}}``);
- ``${dataset_names:<dataset or list>}``: dataset names joined with ``+`` (a task name);
- ``${sweep_subdir:}``: ``/<swept values>`` inside a multirun job, else ``""`` (the end of ``paths.output_dir``).

Dataset and PEFT configs are composed by Hydra: ``configs/data/unlearn.yaml`` places its default datasets with
package directives (``datasets@forget: TOFU_QA_FORGET10``), the metric configs theirs, ``peft=lora`` its file at
``model.peft``. A *name* given as a value instead (``data.forget=TOFU_QA_FORGET05``, ``data.train=[A,B]``, an
experiment's ``TOFU_QA_${upper:${forget_split}}``, ``model.peft=lora``, ``attack.relearn.data``) is composed
once, by :func:`compose_names`, which every entry point calls on the composed config before using it. A list
given on the command line in place of a composed default (``data.train=[MUSE_forget,MUSE_retain]``) needs the
default taken out first: :func:`command_line_overrides` does that before Hydra composes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from checks import check_choice
from data import CONFIG_DIR, DATA_ROLES, compose_config, compose_dataset
from data.splits import dataset_names, forget_split_of, holdout_for, muse_corpus
from model.peft import compose_peft
from sweep import sweep_subdir


def register_resolvers() -> None:
    """Register every resolver of the module docstring (again: replacing is harmless)."""
    OmegaConf.register_new_resolver("holdout_for", holdout_for, replace=True)
    OmegaConf.register_new_resolver("forget_split_of", forget_split_of, replace=True)
    OmegaConf.register_new_resolver("muse_corpus", muse_corpus, replace=True)
    OmegaConf.register_new_resolver("lower", lambda text: str(text).lower(), replace=True)
    OmegaConf.register_new_resolver("upper", lambda text: str(text).upper(), replace=True)
    OmegaConf.register_new_resolver("dataset_names", dataset_names, replace=True)
    OmegaConf.register_new_resolver("sweep_subdir", sweep_subdir, replace=True)


def _composed(spec: object, where: str) -> object:
    """``spec`` with every dataset name in it (one, or a list) composed; configs and null as they are."""
    if isinstance(spec, str):
        return compose_dataset(spec, where=where)
    if isinstance(spec, (list, ListConfig)):
        return [_composed(s, f"{where}[{i}]") for i, s in enumerate(spec)]
    return spec


def compose_names(cfg: DictConfig) -> DictConfig:
    """Compose, in place, every config given by name in the run's config ``cfg`` (and return it):

    - ``data.train`` / ``data.forget`` / ``data.retain`` / ``data.eval``: a dataset name (or a list of names)
      becomes its configs/data/datasets file composed by Hydra (``name``, ``handler``, ``args``); its
      interpolations (``${paths.tofu}``, ``${seed}``) then resolve in ``cfg``;
    - ``attack.<name>.data`` and each benchmark's ``relearn_data`` (the relearning set): the same;
    - ``model.peft``: the name of a configs/peft file becomes that file composed;
    - ``compat``: a preset's name set as a value in a config file (``compat: open_unlearning``, where the command
      line's ``compat=open_unlearning`` selects the config group) becomes configs/compat/<name>.yaml composed.

    An unknown name is a ValueError naming the setting and the valid names. Configs already composed are left
    as they are (calling this twice changes nothing). The saved ``config.yaml`` of a run records the result.
    """
    data = cfg.get("data")
    if isinstance(data, DictConfig):
        for role in DATA_ROLES:
            if role in data:
                data[role] = _composed(data[role], f"data.{role}")
    for name, attack in (cfg.get("attack") or {}).items():
        if isinstance(attack, DictConfig) and isinstance(attack.get("data"), str):
            attack["data"] = compose_dataset(attack.data, where=f"attack.{name}.data")
    for name, bench in (cfg.get("eval") or {}).items():
        if isinstance(bench, DictConfig) and isinstance(bench.get("relearn_data"), str):
            bench["relearn_data"] = compose_dataset(bench.relearn_data, where=f"eval.{name}.relearn_data")
    model = cfg.get("model")
    if isinstance(model, DictConfig) and isinstance(model.get("peft"), str):
        model["peft"] = compose_peft(model.peft)
    if isinstance(cfg.get("compat"), str):
        cfg["compat"] = compose_preset(cfg.compat)
    return cfg


def compose_preset(name: str) -> DictConfig:
    """``configs/compat/<name>.yaml`` composed (the values its preset gives the components' options); an unknown
    name is a BadValueError listing the presets."""
    presets = sorted(p.stem for p in (CONFIG_DIR / "compat").glob("*.yaml"))
    check_choice("compat", name, presets, allow_none=True)
    return compose_config("compat", name, "compat")


_LIST_OVERRIDE = re.compile(r"^data\.(" + "|".join(DATA_ROLES) + r")=\s*\[")


def command_line_overrides(overrides: Sequence[str]) -> list[str]:
    """The command line's overrides as Hydra should see them: before a list of datasets in place of a composed
    default (``data.train=[MUSE_forget,MUSE_retain]``, ``data.retain=[A,B]``), that default is taken out
    (``~data/datasets@data.train``): Hydra cannot merge a list into the composed dataset. Everything else is
    unchanged. The entry points call this before ``hydra.main`` reads ``sys.argv``; compose helpers on their
    overrides."""
    out: list[str] = []
    for override in overrides:
        match = _LIST_OVERRIDE.match(override)
        if match:
            out.append(f"~data/datasets@data.{match.group(1)}")
        out.append(override)
    return out


__all__ = ["register_resolvers", "compose_names", "command_line_overrides"]
