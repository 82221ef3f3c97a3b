"""``Benchmark``: the one interface every evaluator implements (``configs/eval/<bench>.yaml`` -> ``handler``).

Callers (``src/eval.py``, the trainer's evaluations during and after training, the attacks, sweeps and
sequences) use only these methods:

- ``check_inputs()``: every file the evaluation will read exists and has the fields it needs, before any
  model pass (an error names the file and the setting);
- ``evaluate(model, ...) -> EvalResult``: the result in memory (``evals.result``), saved once into
  ``output_dir`` unless ``save=False``; ``only=[...]`` evaluates a subset of the metrics afresh;
- ``summary_names()`` / ``directions()``: the headline metrics and whether a higher value is better;
- ``input_paths()``: the data folders and files it reads (an output folder may not hold them);
- ``attackable_metrics()``: the metrics the robustness attacks re-evaluate (``attackable_metrics`` in the
  config; none for a benchmark that cannot be attacked), and ``relearn_data()``: what the relearning attack
  relearns on by default (``relearn_data``);
- ``with_inputs(question_key=..., template_args=...)`` and ``sample_fields(metric)``: the same benchmark
  asking its questions another way, and the per-sample fields a worst case is taken over (the rephrasing
  attack), where the benchmark supports it.

What is specific to a benchmark is configuration, read here once (``BenchmarkRoles``, restricted to the metrics the
benchmark reports) and recorded in the EVAL file's ``_meta.roles`` for the report: ``data_folder_key`` (the ``paths.<key>`` setting of its local
data), ``headline_metrics`` (the report's summary columns and plots), ``trajectory_metrics`` (followed over
unlearning steps), ``log_axis_metrics``, ``attackable_metrics`` and ``sample_metrics`` (the report's per-sample
view of the forget set: each metric's first per-sample field, before and after, ranked by the first metric's
change).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from checks import BadValueError
from evals.result import EvalResult

#: Keys every benchmark config may set, whatever its evaluator.
COMMON_KEYS = frozenset({"handler", "name", "output_dir", "overwrite", "data_folder_key", "headline_metrics",
                         "trajectory_metrics", "log_axis_metrics", "attackable_metrics", "sample_metrics",
                         "relearn_data"})


@dataclass(frozen=True)
class BenchmarkRoles:
    """What a benchmark's config declares about its metrics and data (see the module docstring)."""

    data_folder_key: str | None = None
    headline_metrics: tuple[str, ...] = ()
    trajectory_metrics: tuple[str, ...] = ()
    log_axis_metrics: tuple[str, ...] = ()
    attackable_metrics: tuple[str, ...] = ()
    sample_metrics: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, name: str, cfg: Mapping[str, Any]) -> BenchmarkRoles:
        key = cfg.get("data_folder_key")
        if key is not None and not (isinstance(key, str) and key.startswith("paths.")):
            raise BadValueError(f"evaluator {name}: data_folder_key={key!r}; give the paths.<name> setting of the "
                                "benchmark's local data folder (e.g. paths.tofu) or null")

        def names(option: str) -> tuple[str, ...]:
            value = cfg.get(option) or []
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise BadValueError(f"evaluator {name}: {option}={value!r}; give a list of metric names")
            return tuple(value)

        return cls(key, *(names(o) for o in ("headline_metrics", "trajectory_metrics", "log_axis_metrics",
                                             "attackable_metrics", "sample_metrics")))

    def restricted_to(self, summary_names: list[str]) -> BenchmarkRoles:
        """The roles of the metrics this benchmark reports (a run that evaluates fewer metrics than the
        benchmark's config lists, ``eval.tofu.metrics=...``, keeps the roles of those it has)."""
        def kept(names: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(n for n in names if n in summary_names)

        return replace(self, headline_metrics=kept(self.headline_metrics),
                       trajectory_metrics=kept(self.trajectory_metrics), log_axis_metrics=kept(self.log_axis_metrics),
                       attackable_metrics=kept(self.attackable_metrics), sample_metrics=kept(self.sample_metrics))

    def as_meta(self, sample_field: Mapping[str, str]) -> dict[str, Any]:
        """Plain data for ``_meta.roles``; ``sample_metrics`` becomes ``{metric: the per-sample field shown}``."""
        meta = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        meta["sample_metrics"] = {m: sample_field[m] for m in self.sample_metrics}
        return meta


class Benchmark(abc.ABC):
    """A benchmark evaluating a model in memory (see the module docstring).

    Args:
        cfg: the benchmark's config (``eval.<bench>``), resolved to plain data.
        tokenizer: the model's tokenizer.
        template_args: the model config's prompt settings (a DictConfig is resolved to plain data).
    """

    #: File prefix when the config gives no ``name``.
    default_name = "EVAL"

    def __init__(self, cfg: Mapping[str, Any], tokenizer: Any = None,
                 template_args: Mapping[str, Any] | DictConfig | None = None) -> None:
        if isinstance(template_args, DictConfig):
            template_args = OmegaConf.to_container(template_args, resolve=True)
        self.cfg = dict(cfg)
        self.name: str = self.cfg.get("name") or self.default_name
        self.tokenizer = tokenizer
        self.template_args: dict[str, Any] | None = None if template_args is None else dict(template_args)
        self.roles = BenchmarkRoles.from_config(self.name, self.cfg)

    def _settle_roles(self) -> None:
        """Keep the roles of the metrics this benchmark reports; every ``sample_metrics`` entry must have
        per-sample fields (called by subclasses once their metrics are known)."""
        self.roles = self.roles.restricted_to(self.summary_names())
        bare = [m for m in self.roles.sample_metrics if not self.sample_fields(m)]
        if bare:
            raise BadValueError(f"evaluator {self.name}: sample_metrics {bare} record no per-sample values; list "
                                "metrics whose handler registers sample_fields (probability, rouge) or none")

    def roles_meta(self) -> dict[str, Any]:
        """The roles as recorded in the EVAL file's ``_meta.roles`` (read by the report)."""
        return self.roles.as_meta({m: self.sample_fields(m)[0] for m in self.roles.sample_metrics})

    @abc.abstractmethod
    def check_inputs(self, names: list[str] | None = None) -> None:
        """Every input of the metrics ``names`` (default all) checked before any model pass."""

    @abc.abstractmethod
    def evaluate(self, model: torch.nn.Module, *, output_dir: str | Path | None = None, model_id: str | None = None,
                 overwrite: bool | None = None, only: list[str] | None = None, save: bool = True) -> EvalResult:
        """The benchmark's result on ``model``. Earlier results in ``output_dir`` with the same fingerprint are
        reused unless ``overwrite``; ``only``: just these metrics, computed afresh (nothing reused); ``save``:
        write the result into ``output_dir`` (on the main process)."""

    @abc.abstractmethod
    def summary_names(self) -> list[str]:
        """The metrics of the SUMMARY, in order."""

    @abc.abstractmethod
    def directions(self) -> dict[str, bool | None]:
        """For each summary metric, whether a higher value is better (None: no fixed direction)."""

    @abc.abstractmethod
    def input_paths(self) -> list[Path]:
        """The local folders and files the evaluation reads (none for data from the Hub)."""

    def attackable_metrics(self) -> list[str]:
        """The metrics the robustness attacks re-evaluate by default (the config's ``attackable_metrics``)."""
        return list(self.roles.attackable_metrics)

    def relearn_data(self) -> Mapping[str, Any] | None:
        """The dataset ``attack=relearn`` relearns on unless ``attack.relearn.data`` names one: the config's
        ``relearn_data`` (a dataset config the entry point composes from its name; TOFU: the forget split, MUSE:
        the forget corpus), or None."""
        return self.cfg.get("relearn_data")

    def sample_fields(self, metric: str) -> tuple[str, ...]:
        """The per-sample fields of ``metric`` a worst case can be taken over (higher = more known); none here."""
        return ()

    def with_inputs(self, *, question_key: str | None = None,
                    template_args: Mapping[str, Any] | None = None) -> Benchmark:
        """This benchmark asking its questions from another column (``question_key``) or in another prompt
        format (``template_args``); a benchmark whose prompts are not its own refuses."""
        raise BadValueError(f"evaluator {self.name} ({type(self).__name__}) cannot change how its questions are "
                            "asked (attack=rephrase needs a benchmark of metric configs, e.g. eval=tofu)")


__all__ = ["Benchmark", "BenchmarkRoles", "COMMON_KEYS"]
