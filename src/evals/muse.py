"""The MUSE benchmark evaluator (Shi et al. 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language
Models", arXiv:2407.06460).

Everything MUSE needs is configuration (configs/eval/muse.yaml): raw-text datasets (``PretrainingDataset``,
``CompletionDataset``), few-shot knowledge prompts, stop strings, ROUGE-L F1 and the MIA metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evals.base import Evaluator


class MUSEEvaluator(Evaluator):
    """MUSE's metrics (configs/eval/muse.yaml); writes ``MUSE_EVAL.json`` and ``MUSE_SUMMARY.json``."""

    def __init__(self, cfg: Mapping, **kwargs: Any):
        super().__init__({"name": "MUSE", **dict(cfg)}, **kwargs)
