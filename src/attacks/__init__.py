"""Robustness checks: the forget metrics of a model under attack, next to their clean values.

``attack=quantize`` (``attack=[quantize,relearn,rephrase]`` for several; configs/attack/<name>.yaml, each
``# @package attack.<name>``) makes ``src/eval.py`` evaluate, after the clean evaluation, each attack's
forget metrics (``attack.<name>.metrics``; null: the benchmark's ``attackable_metrics``):

- ``quantize`` (attacks/quantize.py): a quantized copy of the model, as ``<metric>@quant<bits>``;
- ``relearn`` (attacks/relearn.py): a copy fine-tuned a few steps on related data, as ``<metric>@relearn``,
  with the same relearning of the retain model (``baseline_model_path``) as the baseline;
- ``rephrase`` (attacks/rephrase.py): the worst case per sample over rephrased prompts, as ``<metric>@rephrase``.

The attacked metrics are evaluated in memory (``Benchmark.evaluate(only=..., save=False)``); ``src/eval.py``
adds them to the clean result (``EvalResult.with_attacked``), saves it once, and writes
``<NAME>_ROBUSTNESS.json``: per metric its clean value, each attacked value, the retain model's value and
(relearning) the retain model's value after the same attack. Attacks work on copies: the evaluated model
and its files never change.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attacks import quantize, relearn, rephrase
from checks import BadValueError
from core.compute import Phase
from evals.benchmark import Benchmark
from evals.result import EvalResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttackSpec:
    """An attack: the name its metrics carry (``suffix(cfg)``) and, for attacks on the model, the attacked copy."""

    name: str
    suffix: Callable[[Mapping[str, Any]], str]
    attacked_model: Callable[..., torch.nn.Module] | None  # None: the attack changes the inputs (rephrase)
    #: ``check(cfg, benchmark)``: every option checked against the benchmark attacked, before any work
    check: Callable[[Mapping[str, Any], Benchmark], None]
    #: ``describe(model, cfg)``: what the attack does to this model, for the EVAL file's ``_meta.attacks``
    describe: Callable[[torch.nn.Module, Mapping[str, Any]], dict] = lambda model, cfg: dict(cfg)


def _check_rephrase(cfg: Mapping[str, Any], benchmark: Benchmark) -> None:
    rephrase.check_variants(cfg.get("variants", rephrase.VARIANTS))
    benchmark.with_inputs()  # a benchmark that cannot ask its questions another way refuses here


ATTACK_REGISTRY: dict[str, AttackSpec] = {
    "quantize": AttackSpec("quantize", quantize.suffix, lambda model, cfg, **_: quantize.quantized_copy(model, cfg),
                           lambda cfg, benchmark: quantize.check_config(cfg), quantize.describe),
    "relearn": AttackSpec("relearn", relearn.suffix,
                          lambda model, cfg, tokenizer, template_args, benchmark: relearn.relearn(
                              model, cfg, tokenizer, template_args, benchmark.relearn_data()),
                          lambda cfg, benchmark: relearn.check_config(cfg, benchmark.relearn_data())),
    "rephrase": AttackSpec("rephrase", rephrase.suffix, None, _check_rephrase),
}


def check_attacks(attacks: list[tuple[AttackSpec, dict]], benchmarks: Mapping[str, Benchmark]) -> None:
    """Every attack's options and the metrics it would attack, for every benchmark, checked before any work (an
    attack failing after the clean evaluation would cost that evaluation's time)."""
    for benchmark in benchmarks.values():
        for spec, cfg in attacks:
            spec.check(cfg, benchmark)
            attacked_metrics(benchmark, cfg)


def get_attacks(attack_cfg: Mapping[str, Any] | None) -> list[tuple[AttackSpec, dict]]:
    """``cfg.attack`` (``{name: config}``) as ``(spec, config)`` pairs; an unknown handler is an error."""
    out = []
    for name, cfg in (attack_cfg or {}).items():
        cfg = dict(cfg or {})
        handler = cfg.get("handler", name)
        if handler not in ATTACK_REGISTRY:
            raise BadValueError(f"attack.{name}: unknown attack {handler!r}; valid: {', '.join(ATTACK_REGISTRY)}")
        out.append((ATTACK_REGISTRY[handler], cfg))
    suffixes = [spec.suffix(cfg) for spec, cfg in out]
    if len(set(suffixes)) != len(suffixes):
        raise BadValueError(f"two attacks would write the same metric names ({suffixes}): give them other settings")
    return out


def attacked_metrics(benchmark: Benchmark, cfg: Mapping[str, Any]) -> list[str]:
    """The metrics an attack re-evaluates: ``cfg.metrics``, or the benchmark's ``attackable_metrics``."""
    names = cfg.get("metrics")
    if names is None:
        names = benchmark.attackable_metrics()
        if not names:
            raise BadValueError(f"attack {cfg.get('handler')}: {benchmark.name} declares no attackable_metrics; name "
                                f"the metrics to attack with attack.{cfg.get('handler')}.metrics=[...] (valid: "
                                f"{', '.join(benchmark.summary_names())})")
    unknown = [n for n in names if n not in benchmark.summary_names()]
    if unknown or not names:
        raise BadValueError(f"attack {cfg.get('handler')}: metrics {list(names)} are not all metrics of {benchmark.name}; "
                            f"valid: {', '.join(benchmark.summary_names())}")
    return list(names)


def _attacked(benchmark: Benchmark, model: torch.nn.Module, names: list[str], model_id: str) -> dict[str, Any]:
    """The entries of ``names`` on ``model``, computed afresh in memory (nothing read or written)."""
    return benchmark.evaluate(model, model_id=model_id, only=names, save=False).entries


def _rephrased(benchmark: Benchmark, model: torch.nn.Module, names: list[str], cfg: Mapping[str, Any],
               model_id: str) -> dict[str, Any]:
    """The worst case over ``attack.rephrase.variants`` of each metric with per-sample fields to take it over
    (``MetricSpec.sample_fields``: probabilities, ROUGE); others are left out, logged."""
    fields = {}
    for name in names:
        fields[name] = benchmark.sample_fields(name)
        if not fields[name]:
            log.info("rephrase: %s has no per-sample probability or ROUGE: not rephrased", name)
    fields = {name: f for name, f in fields.items() if f}
    if not fields:
        return {}
    per_variant: dict[str, dict[str, Any]] = {}
    for variant in rephrase.check_variants(cfg.get("variants", rephrase.VARIANTS)):
        question_key, template = rephrase.variant_inputs(variant, benchmark.template_args, cfg)
        varied = benchmark.with_inputs(question_key=question_key, template_args=template)
        per_variant[variant] = _attacked(varied, model, list(fields), f"{model_id}|rephrase:{variant}")
    return {name: rephrase.worst_case({v: r[name] for v, r in per_variant.items() if name in r}, fields[name])
            for name in fields}


def run_attacks(attacks: list[tuple[AttackSpec, dict]], benchmark: Benchmark, model: torch.nn.Module, model_id: str,
                tokenizer: Any, template_args: Any,
                retain_logs_path: str | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every attack's metrics: ``({suffix: {metric: EVAL entry}}, {suffix: {metric: baseline EVAL entry}})``,
    the baseline being the retain model under the same attack (relearning with ``baseline_model_path``;
    ``auto``: the model ``retain_logs_path`` records)."""
    attacked, baselines = {}, {}
    for spec, cfg in attacks:
        names, tag = attacked_metrics(benchmark, cfg), spec.suffix(cfg)
        log.info("attack %s: %s on %s", tag, benchmark.name, ", ".join(names))
        # its cost (the attacked copy, its evaluation, the baseline's) is a phase of the run (core.compute)
        with Phase(f"attack:{tag}:{benchmark.name}", "attack"):
            attacked[tag], baseline = _attack(spec, cfg, benchmark, model, model_id, names, tag, tokenizer,
                                              template_args, retain_logs_path)
        if baseline is not None:
            baselines[tag] = baseline
    return attacked, baselines


def _attack(spec: AttackSpec, cfg: dict, benchmark: Benchmark, model: torch.nn.Module, model_id: str,
            names: list[str], tag: str, tokenizer: Any, template_args: Any,
            retain_logs_path: str | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One attack's entries and its baseline's (None without a baseline model)."""
    if spec.attacked_model is None:
        return _rephrased(benchmark, model, names, cfg, model_id), None
    context = {"tokenizer": tokenizer, "template_args": template_args, "benchmark": benchmark}
    copy_ = spec.attacked_model(model, cfg, **context)
    try:
        attacked = _attacked(benchmark, copy_, names, f"{model_id}@{tag}")
    finally:
        del copy_
    baseline_path = baseline_model(cfg, retain_logs_path)
    if not baseline_path:
        return attacked, None
    return attacked, _baseline(spec, cfg, benchmark, names, baseline_path, model, context)


def attack_settings(attacks: list[tuple[AttackSpec, dict]], model: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """``{suffix: what the attack does to model}`` (``AttackSpec.describe``), for the EVAL file's ``_meta.attacks``."""
    return {spec.suffix(cfg): spec.describe(model, cfg) for spec, cfg in attacks}


def baseline_model(cfg: Mapping[str, Any], retain_logs_path: str | None) -> str | None:
    """The model an attack is also applied to as the baseline (``baseline_model_path``): a folder; ``auto`` =
    the retain model, as its evaluation (``retain_logs_path``) records it in ``_meta.model``, when that is a
    local folder; null or absent = none."""
    path = cfg.get("baseline_model_path")
    if path != "auto":
        return path or None
    if not retain_logs_path or not Path(retain_logs_path).is_file():
        return None
    recorded = (json.loads(Path(retain_logs_path).read_text()).get("_meta") or {}).get("model")
    if recorded and Path(str(recorded)).is_dir():
        log.info("attack %s: the retain model %s (from %s) is the baseline", cfg.get("handler"), recorded,
                 retain_logs_path)
        return str(recorded)
    log.info("attack %s: no baseline (the retain model recorded in %s, %r, is not a local folder)",
             cfg.get("handler"), retain_logs_path, recorded)
    return None


def _baseline(spec: AttackSpec, cfg: Mapping[str, Any], benchmark: Benchmark, names: list[str], path: str,
              model: torch.nn.Module, context: dict) -> dict[str, Any]:
    """The same attack on the model in ``path`` (the retain model), loaded like the evaluated one."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype).to(
        next(model.parameters()).device)
    reference.eval()
    attacked = spec.attacked_model(reference, cfg, **context)
    return _attacked(benchmark, attacked, names, f"{path}@{spec.suffix(cfg)}")


def robustness_summary(clean: EvalResult, attacked: Mapping[str, Mapping[str, Any]],
                       baselines: Mapping[str, Mapping[str, Any]], retain: EvalResult | None) -> dict:
    """Per attacked metric: ``clean``, ``attacked`` ({suffix: value}), ``retain`` (the retain model's clean
    value, from its evaluation) and ``retain_attacked`` ({suffix: value}: the baseline under the same attack,
    or the retain evaluation's own ``<metric>@<suffix>``)."""
    def value(entry: Any) -> float | None:
        v = entry.get("agg_value") if isinstance(entry, Mapping) else None
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    retain_entries = retain.entries if retain is not None else {}
    out: dict[str, dict[str, Any]] = {}
    for tag, metrics in attacked.items():
        for name, entry in metrics.items():
            row = out.setdefault(name, {"clean": value(clean.entries.get(name)), "attacked": {},
                                        "retain": value(retain_entries.get(name)), "retain_attacked": {}})
            row["attacked"][tag] = value(entry)
            reference = (baselines.get(tag) or {}).get(name) or retain_entries.get(f"{name}@{tag}")
            if reference is not None:
                row["retain_attacked"][tag] = value(reference)
    return out


def attacked_result(clean: EvalResult, attacked: Mapping[str, Mapping[str, Any]],
                    baselines: Mapping[str, Mapping[str, Any]], benchmark: Benchmark,
                    attacks: list[tuple[AttackSpec, dict]], model: torch.nn.Module) -> tuple[EvalResult, dict]:
    """``(the clean result with every attack's entries added, its robustness table)``: ``EvalResult.with_attacked``
    with the attacks' settings, and ``robustness_summary`` against the retain model's evaluation
    (``retain_logs_path`` of ``benchmark``, when given). For src/eval.py and an unlearning run's final evaluation."""
    retain_path = benchmark.cfg.get("retain_logs_path")
    retain = EvalResult.from_eval_payload(benchmark.name, json.loads(Path(retain_path).read_text())) \
        if retain_path else None
    return (clean.with_attacked(attacked, attack_settings(attacks, model)),
            robustness_summary(clean, attacked, baselines, retain))


def format_robustness(robustness: Mapping[str, Mapping[str, Any]]) -> str:
    """A text table: one row per metric; clean, each attack, the retain model (and its attacked values)."""
    tags = [t for row in robustness.values() for t in row["attacked"]]
    tags = list(dict.fromkeys(tags))
    retain_tags = list(dict.fromkeys(t for row in robustness.values() for t in row["retain_attacked"]))
    headers = ["clean", *[f"@{t}" for t in tags], "retain", *[f"retain@{t}" for t in retain_tags]]
    width = max([len(m) for m in robustness] + [6])
    lines = [f"{'metric':<{width}} | " + " | ".join(f"{h:>12}" for h in headers)]
    lines.append("-" * len(lines[0]))

    def cell(v: float | None) -> str:
        return f"{'n/a':>12}" if v is None else f"{v:>12.4g}"

    for name, row in robustness.items():
        cells = [row["clean"], *[row["attacked"].get(t) for t in tags], row["retain"],
                 *[row["retain_attacked"].get(t) for t in retain_tags]]
        lines.append(f"{name:<{width}} | " + " | ".join(cell(v) for v in cells))
    return "\n".join(lines)


__all__ = ["ATTACK_REGISTRY", "get_attacks", "run_attacks", "robustness_summary", "format_robustness",
           "attacked_metrics", "baseline_model", "check_attacks", "attack_settings", "attacked_result"]
