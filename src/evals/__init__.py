"""Benchmark evaluators, looked up by name (``configs/eval/<bench>.yaml`` -> ``handler``).

An evaluator has ``evaluate(model, output_dir, trainer=None, **kwargs) -> dict`` returning its headline
numbers (see ``evals.base.Evaluator``); metrics are registered in ``evals.metrics``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

EVALUATOR_REGISTRY: dict[str, type] = {}


def _register_evaluator(cls: type) -> type:
    EVALUATOR_REGISTRY[cls.__name__] = cls
    return cls


def get_evaluators(eval_cfgs: DictConfig | Mapping | None, **kwargs: Any) -> dict[str, Any]:
    """Instantiate every evaluator of ``cfg.eval`` (a mapping name -> evaluator config)."""
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
from evals.muse import MUSEEvaluator  # noqa: E402
from evals.tofu import TOFUEvaluator  # noqa: E402

_register_evaluator(Evaluator)
_register_evaluator(TOFUEvaluator)
_register_evaluator(LMEvalEvaluator)
_register_evaluator(MUSEEvaluator)

__all__ = ["EVALUATOR_REGISTRY", "_register_evaluator", "get_evaluators", "Evaluator", "TOFUEvaluator",
           "LMEvalEvaluator", "MUSEEvaluator", "format_summary"]
