"""Scorers: decide, for each generated answer, how much of the ground truth it gives away, and whether it leaks it.

A scorer reads ``(question, ground truth, answer)`` triples (``judge.JudgeItem``) and returns one
``judge.Judgment`` per answer: a score, a leaked flag, and the judge's raw text where there is one. Leak@k and the
``llm_judge`` metric count the flags (``evals.metrics.leakage``). Three kinds, chosen by a metric's ``scorer.kind``:

- ``rouge`` (default): ROUGE recall of the answer against the ground truth (Lin 2004); it leaks when the recall is
  at least ``threshold``. Cheap, but blind to paraphrase.
- ``entailment``: any natural-language-inference model the user names, through a transformers
  ``text-classification`` pipeline: premise ``"<question> <answer>"``, hypothesis ``"<question> <ground truth>"``;
  the score is the probability of the model's entailment label, and it leaks at ``threshold`` or above.
- ``judge``: an LLM judge with a rubric (``evals.judge``), in-process or behind an OpenAI-compatible server.

A scorer is built from its config without loading anything (so a bad config fails before any model pass); the
entailment model and the judge's backend load on first use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from evals.judge import Judge, JudgeItem, Judgment
from evals.metrics.rouge import ROUGE_FIELDS, rouge_scores


class AnswerScorer(ABC):
    """Scores generated answers against their ground truth."""

    #: the ``scorer.kind`` that selects this class
    kind: ClassVar[str]
    #: whether its judgments carry text worth keeping per answer (a judge's reply)
    keeps_raw_output: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Mapping[str, Any], owner: str) -> AnswerScorer:
        """The scorer of ``cfg`` (``kind`` included), every key and value checked; nothing loaded yet."""

    @abstractmethod
    def score(self, items: Sequence[JudgeItem]) -> list[Judgment]:
        """One judgment per item, in order; an answer the scorer cannot read gets ``Judgment(None, None, raw)``."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """JSON-able settings, written to the EVAL file beside the scores."""


SCORER_REGISTRY: dict[str, type[AnswerScorer]] = {}


def register_scorer(cls: type[AnswerScorer]) -> type[AnswerScorer]:
    if cls.kind in SCORER_REGISTRY:
        raise ValueError(f"scorer kind {cls.kind!r} is already registered")
    SCORER_REGISTRY[cls.kind] = cls
    return cls


def build_scorer(cfg: Mapping[str, Any] | None, owner: str) -> AnswerScorer:
    """The scorer a metric's ``scorer`` config names (``kind``: one of ``SCORER_REGISTRY``; default rouge)."""
    cfg = dict(cfg or {"kind": "rouge"})
    kind = cfg.get("kind")
    if kind not in SCORER_REGISTRY:
        raise ValueError(f"{owner}: scorer.kind={kind!r}; valid: {', '.join(sorted(SCORER_REGISTRY))}")
    return SCORER_REGISTRY[kind].from_config(cfg, owner)


def _check_keys(cfg: Mapping[str, Any], valid: Sequence[str], owner: str, kind: str) -> None:
    unknown = sorted(set(cfg) - set(valid) - {"kind"})
    if unknown:
        raise ValueError(f"{owner}: scorer keys {unknown} are not understood by scorer kind {kind!r}; "
                         f"its keys: kind, {', '.join(valid)}")


def _threshold(cfg: Mapping[str, Any], owner: str, default: float) -> float:
    value = cfg.get("threshold", default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{owner}: scorer.threshold={value!r}; give a number in [0, 1]")
    return float(value)


@register_scorer
class RougeScorer(AnswerScorer):
    """ROUGE recall (or F1) of the answer against the ground truth; leaked when it is at least ``threshold``."""

    kind = "rouge"

    def __init__(self, field: str = "rougeL_recall", threshold: float = 0.5) -> None:
        self.field, self.threshold = field, threshold

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], owner: str) -> RougeScorer:
        _check_keys(cfg, ("field", "threshold"), owner, cls.kind)
        field = cfg.get("field", "rougeL_recall")
        if field not in ROUGE_FIELDS:
            raise ValueError(f"{owner}: scorer.field={field!r}; valid: {', '.join(ROUGE_FIELDS)}")
        return cls(field, _threshold(cfg, owner, 0.5))

    def score(self, items: Sequence[JudgeItem]) -> list[Judgment]:
        out = []
        for item in items:
            value = rouge_scores(item.ground_truth, item.answer)[self.field]
            out.append(Judgment(score=value, leaked=value >= self.threshold, raw=""))
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "field": self.field, "threshold": self.threshold}


@register_scorer
class EntailmentScorer(AnswerScorer):
    """The probability that ``"<question> <answer>"`` entails ``"<question> <ground truth>"`` under a
    natural-language-inference classifier (any transformers sequence-classification model with an entailment
    label); leaked when it is at least ``threshold``."""

    kind = "entailment"

    def __init__(self, model: str, label: str = "entailment", threshold: float = 0.5, batch_size: int = 16,
                 device: str | None = None) -> None:
        self.model, self.label, self.threshold, self.batch_size, self.device = model, label, threshold, batch_size, device
        self._pipeline: Any = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], owner: str) -> EntailmentScorer:
        _check_keys(cfg, ("model", "label", "threshold", "batch_size", "device"), owner, cls.kind)
        model = cfg.get("model")
        if not isinstance(model, str) or model in ("", "???"):
            raise ValueError(f"{owner}: scorer kind entailment needs scorer.model, a local folder or Hub id of an "
                             f"NLI classifier (e.g. microsoft/deberta-large-mnli); got {model!r}")
        label = cfg.get("label", "entailment")
        if not isinstance(label, str) or not label:
            raise ValueError(f"{owner}: scorer.label={label!r}; give the classifier's entailment label name")
        batch_size = cfg.get("batch_size", 16)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{owner}: scorer.batch_size={batch_size!r}; give an integer >= 1")
        device = cfg.get("device")
        if device is not None and not isinstance(device, str):
            raise ValueError(f"{owner}: scorer.device={device!r}; give a torch device name such as cpu or cuda:0")
        return cls(model, label, _threshold(cfg, owner, 0.5), batch_size, device)

    def _classifier(self) -> Any:
        if self._pipeline is None:
            import torch
            from transformers import pipeline

            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            self._pipeline = pipeline("text-classification", model=self.model, device=device)
            labels = {str(name).lower(): str(name) for name in self._pipeline.model.config.id2label.values()}
            if self.label.lower() not in labels:
                raise ValueError(f"scorer.label={self.label!r} is not a label of {self.model} (its labels: "
                                 f"{', '.join(labels.values())}); set scorer.label to its entailment label")
            self._label = labels[self.label.lower()]
        return self._pipeline

    def score(self, items: Sequence[JudgeItem]) -> list[Judgment]:
        if not items:
            return []
        classifier = self._classifier()
        pairs = [{"text": f"{it.question} {it.answer}".strip(), "text_pair": f"{it.question} {it.ground_truth}".strip()}
                 for it in items]
        results = classifier(pairs, top_k=None, batch_size=self.batch_size, truncation=True)
        out = []
        for labels in results:
            probability = next(float(r["score"]) for r in labels if r["label"] == self._label)
            out.append(Judgment(score=probability, leaked=probability >= self.threshold, raw=""))
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "label": self.label, "threshold": self.threshold}


@register_scorer
class JudgeScorer(AnswerScorer):
    """An LLM judge (``evals.judge.Judge``, configured by ``scorer.judge``)."""

    kind = "judge"
    keeps_raw_output = True

    def __init__(self, judge: Judge) -> None:
        self.judge = judge

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], owner: str) -> JudgeScorer:
        _check_keys(cfg, ("judge",), owner, cls.kind)
        if not isinstance(cfg.get("judge"), Mapping):
            raise ValueError(f"{owner}: scorer kind judge needs scorer.judge, the judge's settings (configs/judge/: "
                             f"set judge=openai or judge=transformers on the command line); got {cfg.get('judge')!r}")
        return cls(Judge.from_config(cfg["judge"], f"{owner}: scorer.judge"))

    def score(self, items: Sequence[JudgeItem]) -> list[Judgment]:
        return self.judge.judge(items)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.judge.describe()}


__all__ = ["AnswerScorer", "EntailmentScorer", "JudgeScorer", "RougeScorer", "SCORER_REGISTRY", "build_scorer",
           "register_scorer"]
