"""Benchmark evaluators, looked up by name (``configs/eval/<bench>.yaml`` -> ``handler``).

Every evaluator subclasses ``evals.benchmark.Benchmark`` (check its inputs, evaluate a model into an
``EvalResult``, name its summary metrics and their directions, list the paths it reads); metrics are
registered in ``evals.metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evals.benchmark import Benchmark
from evals.result import EvalResult, ResultStore

EVALUATOR_REGISTRY: dict[str, type[Benchmark]] = {}


def _register_evaluator(cls: type[Benchmark]) -> type[Benchmark]:
    if not issubclass(cls, Benchmark):
        raise TypeError(f"{cls.__name__} is not a Benchmark subclass (evals.benchmark.Benchmark)")
    EVALUATOR_REGISTRY[cls.__name__] = cls
    return cls


def get_evaluators(eval_cfgs: DictConfig | Mapping | None, tokenizer: Any = None, template_args: Any = None,
                   paths: Mapping | None = None) -> dict[str, Benchmark]:
    """Instantiate every evaluator of ``cfg.eval`` (a mapping name -> evaluator config), each resolved in place
    (its metrics' composed datasets with it: ``${paths.tofu}``, ``${eval.tofu.forget_split}``). ``paths`` are
    the run's data folders."""
    kwargs = {"tokenizer": tokenizer, "template_args": template_args, "paths": paths}
    evaluators = {}
    for name, cfg in (eval_cfgs or {}).items():
        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)
        handler = cfg.get("handler")
        if handler not in EVALUATOR_REGISTRY:
            raise ValueError(f"eval.{name}: unknown evaluator {handler!r}; registered: {sorted(EVALUATOR_REGISTRY) or 'none yet'}")
        evaluators[name] = EVALUATOR_REGISTRY[handler](cfg, **kwargs)
    return evaluators


from evals.base import Evaluator, format_summary  # noqa: E402
from evals.lm_eval import LMEvalEvaluator  # noqa: E402  (imports lm-eval, an optional extra, only when built)

_register_evaluator(Evaluator)
_register_evaluator(LMEvalEvaluator)

__all__ = ["EVALUATOR_REGISTRY", "_register_evaluator", "get_evaluators", "Benchmark", "EvalResult", "ResultStore",
           "Evaluator", "LMEvalEvaluator", "format_summary"]
