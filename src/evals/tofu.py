"""The TOFU benchmark evaluator (Maini et al. 2024, arXiv:2401.06121)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evals.base import Evaluator


class TOFUEvaluator(Evaluator):
    """TOFU's metrics (configs/eval/tofu.yaml); writes ``TOFU_EVAL.json`` and ``TOFU_SUMMARY.json``."""

    def __init__(self, cfg: Mapping, **kwargs: Any):
        super().__init__({"name": "TOFU", **dict(cfg)}, **kwargs)
