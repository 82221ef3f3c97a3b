"""The model passes an evaluation runs for its metrics, and the public context every pass runner gets.

A metric declares the inputs it needs (``MetricSpec.needs``); each pass input (``evals.metrics.PASS_INPUTS``)
has one runner here, ``runner(context, spec, metric_config) -> result``, registered with :func:`register_pass`.
A runner computes its result once per cache key (pass kind, dataset, options) and keeps it in
``context.cache``, so metrics reading the same pass share it. It reaches the evaluation only through
:class:`EvalContext`: the model, the tokenizer, the datasets by spec, the plan of teacher-forced passes, and
whether this evaluation runs the plain reference passes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from core.distributed import gather_dicts, is_sharded, rank_shard
from evals import passes
from evals.judge import JudgeItem
from evals.metrics import PASS_INPUTS
from evals.metrics.leakage import ScoredAnswers, answer_source
from evals.passes import PlainPassOptions
from evals.result import content_hash
from evals.sampling import SamplingArgs, sampling_pass
from evals.scorers import build_scorer
from evals.served import ServedGeneration, served_generation_pass, served_sampling_pass


@dataclass
class EvalContext:
    """One evaluation's view for the pass runners.

    Attributes:
        benchmark: the benchmark's name (for messages).
        model: the model evaluated.
        tokenizer: its tokenizer.
        template_args: the model config's prompt settings.
        plain_options: how the plain passes compute (``eval.<bench>.plain_pass_options``).
        plain: run the plain reference passes (``passes: plain``, or a model sharded over the
            processes, whose forwards must run in lockstep) instead of the fast ones.
        dataset: a dataset spec -> the dataset (built once per evaluator).
        dataset_key: ``(spec, questions_only=False)`` -> the dataset's identity (questions only: the same
            questions with any answer column).
        token_stats_plan: the teacher-forced passes the metrics will run, ``{questions key: {dataset key: spec}}``:
            the datasets asking the same questions are scored together.
        moment_datasets: keys of the datasets a metric reads the vocabulary moments of (Min-K%++).
        cache: the results of the passes run so far (shared by the metrics).
        served: the server the generation passes run on (``generation_server``), or None: they run locally.
    """

    benchmark: str
    model: torch.nn.Module
    tokenizer: Any
    template_args: Mapping[str, Any] | None
    plain_options: PlainPassOptions
    plain: bool
    dataset: Callable[[Any], Any]
    dataset_key: Callable[..., str]
    token_stats_plan: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    moment_datasets: frozenset[str] = frozenset()
    cache: dict = field(default_factory=dict)
    served: ServedGeneration | None = None

    def token_stats(self, model: torch.nn.Module, datasets: list, batch_size: int,
                    vocab_moments: bool = True) -> list[dict]:
        """Teacher-forced statistics of each dataset: together (``passes.token_stats_passes``; the vocabulary
        moments only with ``vocab_moments``), or one plain pass each."""
        if self.plain:
            return [passes.plain_token_stats_pass(model, d, self.tokenizer, batch_size=batch_size,
                                                 options=self.plain_options)
                    for d in datasets]
        return passes.token_stats_passes(model, datasets, self.tokenizer, batch_size=batch_size,
                                         vocab_moments=vocab_moments)


Runner = Callable[[EvalContext, Any, Mapping], Any]
ConfigCheck = Callable[[Mapping, str], None]
#: pass input -> its runner (one per ``evals.metrics.PASS_INPUTS`` entry).
PASS_RUNNERS: dict[str, Runner] = {}
#: pass input -> the check of a metric config's settings for that pass, ``check(metric config, owner)``, run
#: before any pass (``Evaluator``): a bad value fails at once, naming the key, not after hours of passes.
PASS_CHECKS: dict[str, ConfigCheck] = {}


def register_pass(kind: str, check: ConfigCheck | None = None) -> Callable[[Runner], Runner]:
    """Decorator registering ``runner`` as the pass that supplies the metric input ``kind`` (and ``check`` as the
    check of its settings)."""
    if kind not in PASS_INPUTS:
        raise ValueError(f"pass kind {kind!r} is not a declared metric input; declare it in "
                         f"evals.metrics.PASS_INPUTS (declared: {', '.join(PASS_INPUTS)})")

    def decorator(runner: Runner) -> Runner:
        if kind in PASS_RUNNERS:
            raise ValueError(f"pass kind {kind!r} is already registered")
        PASS_RUNNERS[kind] = runner
        if check is not None:
            PASS_CHECKS[kind] = check
        return runner
    return decorator


@register_pass("token_stats")
def token_stats_runner(ctx: EvalContext, spec: Any, mcfg: Mapping) -> Any:
    """Teacher-forced statistics. Every planned pass over the same questions (true, paraphrased, perturbed
    answers) runs at once, together: each question's prompt is computed once for all its answers."""
    dataset = ctx.dataset(spec)
    key = ("token_stats", ctx.dataset_key(spec))
    if key not in ctx.cache:
        group = {k: s for k, s in ctx.token_stats_plan.get(ctx.dataset_key(spec, True), {}).items()
                 if ("token_stats", k) not in ctx.cache and len(ctx.dataset(s)) == len(dataset)}
        group[key[1]] = spec
        planned = {k for g in ctx.token_stats_plan.values() for k in g}
        # the Min-K%++ moments unless no metric reads them from any dataset of the group
        moments = any(k in ctx.moment_datasets or k not in planned for k in group)
        results = ctx.token_stats(ctx.model, [ctx.dataset(s) for s in group.values()], mcfg.get("batch_size", 32),
                                  vocab_moments=moments)
        for dataset_key, result in zip(group, results):
            ctx.cache[("token_stats", dataset_key)] = result
    return ctx.cache[key]


@register_pass("generations")
def generations_runner(ctx: EvalContext, spec: Any, mcfg: Mapping) -> Any:
    """Greedy generations (``generation_args``: ``max_new_tokens``, ``stop_strings``); ``batch_size`` may be ``auto``.
    On the generation server when the evaluation has one."""
    gen_args = dict(mcfg.get("generation_args") or {})
    key = ("generations", ctx.dataset_key(spec), content_hash(gen_args))
    if key not in ctx.cache and ctx.served is not None:
        ctx.cache[key] = served_generation_pass(ctx.served, ctx.model, ctx.dataset(spec), ctx.tokenizer,
                                                ctx.template_args, **gen_args)
    elif key not in ctx.cache:
        generate, extra = ((passes.plain_generation_pass, {"options": ctx.plain_options}) if ctx.plain
                           else (passes.generation_pass, {}))
        ctx.cache[key] = generate(ctx.model, ctx.dataset(spec), ctx.tokenizer, ctx.template_args,
                                  batch_size=mcfg.get("batch_size", 32), **extra, **gen_args)
    return ctx.cache[key]


@register_pass("grad_norms")
def grad_norms_runner(ctx: EvalContext, spec: Any, mcfg: Mapping) -> Any:
    """Per-sample gradient norms (GradNorm attack)."""
    key = ("grad_norms", ctx.dataset_key(spec))
    if is_sharded(ctx.model):
        raise ValueError(f"evaluator {ctx.benchmark}: gradient norms (mia_gradnorm) need whole weights, which this "
                         "model has split over the processes (FSDP/ZeRO-3); evaluate it with src/eval.py instead")
    if key not in ctx.cache:
        ctx.cache[key] = passes.grad_norm_pass(ctx.model, ctx.dataset(spec), ctx.tokenizer)
    return ctx.cache[key]


@register_pass("reference_token_stats")
def reference_token_stats_runner(ctx: EvalContext, spec: Any, mcfg: Mapping) -> Any:
    """Teacher-forced statistics of a reference model (``reference_model``, loaded once per path)."""
    ref_path = (mcfg.get("reference_model") or {}).get("pretrained_model_name_or_path")
    if not ref_path:
        raise ValueError("mia_reference needs reference_model.pretrained_model_name_or_path "
                         "(e.g. the retain model's folder)")
    key = ("reference_token_stats", ctx.dataset_key(spec), ref_path)
    if key not in ctx.cache:
        ref_model = ctx.cache.get(("reference_model", ref_path))
        if ref_model is None:
            from model import get_model

            ref_model, _ = get_model({"model_args": {**mcfg["reference_model"]},
                                      "tokenizer_args": {"pretrained_model_name_or_path": ref_path}})
            ref_model.to(next(ctx.model.parameters()).device).eval()
            ctx.cache[("reference_model", ref_path)] = ref_model
        ctx.cache[key] = ctx.token_stats(ref_model, [ctx.dataset(spec)], mcfg.get("batch_size", 32))[0]
    return ctx.cache[key]


def _check_samples(mcfg: Mapping, owner: str) -> None:
    SamplingArgs.from_config(mcfg.get("sampling_args"), owner)


@register_pass("samples", check=_check_samples)
def samples_runner(ctx: EvalContext, spec: Any, mcfg: Mapping) -> Any:
    """``sampling_args.num_samples`` sampled answers per prompt (``evals.sampling.sampling_pass``; the plain
    reference with ``passes: plain``); ``batch_size`` counts answers and may be ``auto``."""
    args = SamplingArgs.from_config(mcfg.get("sampling_args"), f"evaluator {ctx.benchmark}")
    key = ("samples", ctx.dataset_key(spec), content_hash(asdict(args)))
    if key not in ctx.cache and ctx.served is not None:
        ctx.cache[key] = served_sampling_pass(ctx.served, ctx.model, ctx.dataset(spec), ctx.tokenizer,
                                              ctx.template_args, args)
    if is_sharded(ctx.model) and key not in ctx.cache:
        raise ValueError(f"evaluator {ctx.benchmark}: sampled answers need whole weights, which this model has split "
                         "over the processes (FSDP/ZeRO-3); evaluate it with src/eval.py instead, or generate on a "
                         "server (generation_server=openai)")
    if key not in ctx.cache:
        ctx.cache[key] = sampling_pass(ctx.model, ctx.dataset(spec), ctx.tokenizer, ctx.template_args, args,
                                       batch_size=mcfg.get("batch_size", "auto"), plain=ctx.plain)
    return ctx.cache[key]


def _check_scored_answers(mcfg: Mapping, owner: str) -> None:
    if answer_source(mcfg, owner) == "sampled":
        _check_samples(mcfg, owner)
    build_scorer(mcfg.get("scorer"), owner)


@register_pass("scored_answers", check=_check_scored_answers)
def scored_answers_runner(ctx: EvalContext, spec: Any, mcfg: Mapping) -> Any:
    """Each prompt's answers (``answers``: ``sampled``, the ``samples`` pass, or ``greedy``, the ``generations``
    pass) scored by the metric's ``scorer`` (``evals.scorers``). Each process scores its share of the prompts (a
    judge is asked once per answer, whatever the number of processes), and the results are gathered."""
    owner = f"evaluator {ctx.benchmark}"
    sampled = answer_source(mcfg, owner) == "sampled"
    answers = samples_runner(ctx, spec, mcfg) if sampled else generations_runner(ctx, spec, mcfg)
    scorer_cfg = dict(mcfg.get("scorer") or {"kind": "rouge"})
    settings = mcfg.get("sampling_args") if sampled else mcfg.get("generation_args")
    key = ("scored_answers", ctx.dataset_key(spec), sampled, content_hash(settings or {}), content_hash(scorer_cfg))
    if key not in ctx.cache:
        if ("scorer", content_hash(scorer_cfg)) not in ctx.cache:  # one entailment model / judge per evaluation
            ctx.cache[("scorer", content_hash(scorer_cfg))] = build_scorer(scorer_cfg, owner)
        scorer = ctx.cache[("scorer", content_hash(scorer_cfg))]
        mine = rank_shard(sorted(answers))
        texts = {i: answers[i]["samples"] if sampled else [answers[i]["generation"]] for i in mine}
        items = [JudgeItem(question=answers[i]["input"], ground_truth=answers[i]["ground_truth"], answer=text)
                 for i in mine for text in texts[i]]
        judgments = iter(scorer.score(items))
        scored: dict[int, dict] = {}
        for i in mine:
            rows = []
            for text in texts[i]:
                judgment = next(judgments)
                row = {"text": text, "score": judgment.score, "leaked": judgment.leaked}
                rows.append({**row, "raw": judgment.raw} if scorer.keeps_raw_output else row)
            scored[i] = {"input": answers[i]["input"], "ground_truth": answers[i]["ground_truth"], "answers": rows}
        ctx.cache[key] = ScoredAnswers(by_index=gather_dicts(scored), scorer=scorer.describe())
    return ctx.cache[key]


__all__ = ["EvalContext", "PASS_CHECKS", "PASS_RUNNERS", "register_pass"]
