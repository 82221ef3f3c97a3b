"""Which TOFU splits go together: the evaluation's forget split, and the holdout split that goes with it.

TOFU (and open-unlearning) pair every forget split with the holdout split of the same size:
forget01 -> holdout01 (40 rows), forget05 -> holdout05 (200), forget10 -> holdout10 (400). The
membership-inference metrics and privleak compare the two sets, so a mismatch (400 forget rows against
40 holdout rows) changes what the AUCs measure. In an unlearning run the evaluation scores the split
being unlearned: ``data.forget=TOFU_QA_FORGET01`` is split ``forget01``.

The top-level configs say so with two resolvers (registered by ``resolvers.register_resolvers``)::

    forget_split: ${forget_split_of:${data.forget}}   # unlearn.yaml: the split of data.forget
    holdout_split: ${holdout_for:${forget_split}}     # every top-level config

Both stay overridable (``forget_split=forget05``, ``holdout_split=holdout01``); ``check_eval_splits``
refuses an unlearning run whose evaluation would score another split than the one it unlearns.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

_FORGET = re.compile(r"^forget(\d+)(?:_|$)")


def holdout_for(forget_split: str | None) -> str | None:
    """The holdout split of the same size as ``forget_split``: ``forgetNN`` -> ``holdoutNN``; None for None
    (the run's data is no TOFU forget split: MUSE, WMDP)."""
    if forget_split is None:
        return None
    match = _FORGET.match(str(forget_split))
    if match is None or match.end() != len(str(forget_split)):
        raise ValueError(f"forget_split={forget_split!r} is not a TOFU forget split (forget01, forget05, forget10, ...); "
                         "set holdout_split=<name> explicitly for other data")
    return f"holdout{match.group(1)}"


@functools.cache
def _named_hub_config_name(name: str) -> str | None:
    """``hf_args.name`` of the dataset config ``name``, composed by Hydra once per process (a config that names
    its dataset before the entry point composes it: ``forget_split`` resolves many times)."""
    from data import compose_dataset  # the dataset registry imports this module

    return _hub_config_name(compose_dataset(name, where="data.forget"))


def _hub_config_name(dataset: str | Mapping) -> str | None:
    """``hf_args.name`` of a dataset given by config name (configs/data/datasets) or as a composed config."""
    if isinstance(dataset, str):
        return _named_hub_config_name(dataset)
    if isinstance(dataset, DictConfig):
        dataset = OmegaConf.to_container(dataset, resolve=False)
    name = ((dataset.get("args") or {}).get("hf_args") or {}).get("name") if isinstance(dataset, Mapping) else None
    return name if isinstance(name, str) else None


def forget_split_of(dataset: str | Mapping | None) -> str | None:
    """The TOFU forget split a dataset reads (``TOFU_QA_FORGET01``, ``..._IDK``, ``..._ALT`` -> ``forget01``),
    or None when it is not one (another benchmark's data, no dataset)."""
    if dataset is None:
        return None
    name = _hub_config_name(dataset)
    match = _FORGET.match(name) if name else None
    return f"forget{match.group(1)}" if match else None


def check_eval_splits(cfg: DictConfig) -> None:
    """ValueError before any work when an unlearning run's evaluators would score another forget split.

    Every evaluator config with a ``forget_split`` (``eval.<bench>.forget_split``, by default the
    top-level ``forget_split``, itself by default the split of ``data.forget``) must name the split of
    ``data.forget``.
    """
    if cfg.get("mode") != "unlearn" or not cfg.get("eval"):
        return
    forget = dataset_names(cfg.data.get("forget"))
    unlearned = forget_split_of(cfg.data.get("forget"))
    for bench, eval_cfg in cfg.eval.items():
        if "forget_split" not in eval_cfg:
            continue
        evaluated = eval_cfg.forget_split
        if unlearned is None and evaluated is None:
            raise ValueError(f"eval.{bench}: data.forget={forget} is not a TOFU forget split, so the evaluation's "
                             "forget split cannot follow it: set forget_split=<split> (e.g. forget10)")
        if unlearned is not None and evaluated != unlearned:
            raise ValueError(
                f"eval.{bench}.forget_split={evaluated} but data.forget={forget} unlearns {unlearned}: the evaluation "
                f"would score other rows than those being forgotten. Drop the forget_split override (it follows "
                f"data.forget) or set forget_split={unlearned}")


#: MUSE's two corpora (``data_split=News|Books``: Hub datasets muse-bench/MUSE-News and MUSE-Books).
MUSE_CORPORA = ("News", "Books")


def muse_corpus(name: str | None) -> str:
    """``name`` if it is a MUSE corpus (None: ``News``, the default corpus), else a ValueError listing them
    (``data_split=news`` is a typo too)."""
    if name is None:
        return MUSE_CORPORA[0]
    if name not in MUSE_CORPORA:
        raise ValueError(f"data_split={name!r} is not a MUSE corpus; valid: {', '.join(MUSE_CORPORA)}")
    return name


def dataset_names(spec: object) -> str:
    """A dataset's name, or several joined with ``+`` (``data.train=[MUSE_forget,MUSE_retain]`` in a task name):
    a name as given, or the ``name`` of a composed dataset config (else its ``hf_args.name``)."""
    if isinstance(spec, (list, tuple)) or OmegaConf.is_list(spec):
        return "+".join(dataset_names(s) for s in spec)
    if isinstance(spec, Mapping) or OmegaConf.is_dict(spec):
        name = spec.get("name")
        return str(name) if name else str(_hub_config_name(spec) or "dataset")
    return str(spec)


__all__ = ["holdout_for", "forget_split_of", "check_eval_splits", "dataset_names", "muse_corpus", "MUSE_CORPORA"]
