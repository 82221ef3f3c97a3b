"""The OmegaConf resolvers our configs use, registered in one place.

Every entry point (src/train.py, src/eval.py, src/sequential.py, the benchmarks' ``common.compose``, the
tests' ``conftest``) calls :func:`register_resolvers` once, before it composes or resolves a config; no
library module registers anything when it is imported.

- ``${holdout_for:<forget split>}``: TOFU's holdout split of the same size (forget10 -> holdout10);
- ``${forget_split_of:<dataset name>}``: the forget split a dataset config reads (TOFU_QA_FORGET10 -> forget10);
- ``${muse_corpus:<name>}``: MUSE's corpus name, checked (News, Books);
- ``${lower:<text>}`` / ``${upper:<text>}``: case changes (``TOFU_QA_${upper:${forget_split}}``);
- ``${dataset_names:<name or list>}``: dataset names joined with ``+`` (a task name);
- ``${sweep_subdir:}``: ``/<swept values>`` inside a multirun job, else ``""`` (the end of ``paths.output_dir``).
"""

from __future__ import annotations

from omegaconf import OmegaConf

from data.splits import dataset_names, forget_split_of, holdout_for, muse_corpus
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


__all__ = ["register_resolvers"]
