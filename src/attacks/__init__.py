"""Robustness checks: the forget metrics of a model under attack, next to their clean values.

``attack=quantize`` (``attack=[quantize,relearn,rephrase]`` for several; configs/attack/<name>.yaml, each
``# @package attack.<name>``) makes ``src/eval.py`` evaluate, after the clean evaluation, each attack's
forget metrics (``attack.<name>.metrics``; null: every summary metric with ``forget`` in its name):

- ``quantize`` (attacks/quantize.py): a quantized copy of the model, as ``<metric>@quant<bits>``;
- ``relearn`` (attacks/relearn.py): a copy fine-tuned a few steps on related data, as ``<metric>@relearn``,
  with the same relearning of the retain model (``baseline_model_path``) as the baseline;
- ``rephrase`` (attacks/rephrase.py): the worst case per sample over rephrased prompts, as ``<metric>@rephrase``.

The attacked metrics are computed into a temporary folder and only then written, with the clean ones,
into the benchmark's EVAL and SUMMARY files, together with ``<NAME>_ROBUSTNESS.json``: per metric its
clean value, each attacked value, the retain model's value and (relearning) the retain model's value
after the same attack. Attacks work on copies: the evaluated model and its files never change.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attacks import quantize, relearn, rephrase
from checks import BadValueError

log = logging.getLogger(__name__)

ROBUSTNESS_SUFFIX = "_ROBUSTNESS.json"


@dataclass(frozen=True)
class AttackSpec:
    """An attack: the name its metrics carry (``suffix(cfg)``) and, for attacks on the model, the attacked copy."""

    name: str
    suffix: Callable[[Mapping[str, Any]], str]
    attacked_model: Callable[..., torch.nn.Module] | None  # None: the attack changes the inputs (rephrase)


ATTACK_REGISTRY: dict[str, AttackSpec] = {
    "quantize": AttackSpec("quantize", quantize.suffix, lambda model, cfg, **_: quantize.quantized_copy(model, cfg)),
    "relearn": AttackSpec("relearn", relearn.suffix, lambda model, cfg, **ctx: relearn.relearn(model, cfg, **ctx)),
    "rephrase": AttackSpec("rephrase", rephrase.suffix, None),
}


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


def attacked_metrics(evaluator: Any, cfg: Mapping[str, Any]) -> list[str]:
    """The metrics an attack re-evaluates: ``cfg.metrics``, or every summary metric with ``forget`` in its name."""
    names = cfg.get("metrics")
    summary = evaluator.summary_names()
    if names is None:
        names = [n for n in summary if "forget" in n]
    unknown = [n for n in names if n not in evaluator.metrics_cfg]
    if unknown or not names:
        raise BadValueError(f"attack {cfg.get('handler')}: metrics {list(names)} are not all metrics of {evaluator.name}; "
                            f"valid: {', '.join(evaluator.metrics_cfg)}")
    return list(names)


def evaluate_metrics(evaluator: Any, model: torch.nn.Module, metrics: Mapping[str, dict], model_id: str,
                     template_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The EVAL entries of ``metrics`` (name -> config) on ``model``, by an evaluator like ``evaluator``
    writing into a temporary folder (nothing of the run's is touched; nothing is reused)."""
    cfg = {**evaluator.cfg, "metrics": dict(metrics), "summary_metrics": list(metrics), "overwrite": True}
    sub = type(evaluator)(cfg, tokenizer=evaluator.tokenizer,
                          template_args=evaluator.template_args if template_args is None else template_args,
                          root_cfg=evaluator.root_cfg)
    with tempfile.TemporaryDirectory(prefix="attack-") as folder:
        sub.evaluate(model, output_dir=folder, model_id=model_id, overwrite=True)
        eval_file = Path(folder) / f"{sub.name}_EVAL.json"
        payload = json.loads(eval_file.read_text()) if eval_file.is_file() else {}
    return {name: payload[name] for name in metrics if name in payload}


def _rephrased(evaluator: Any, model: torch.nn.Module, names: list[str], cfg: Mapping[str, Any],
               model_id: str) -> dict[str, Any]:
    """The worst case over ``attack.rephrase.variants`` of each metric that has per-sample probabilities or
    ROUGE (others are left out, logged)."""
    from evals.metrics import get_metric

    fields = {}
    for name in names:
        handler = get_metric(evaluator.metrics_cfg[name]["handler"]).name
        if handler in rephrase.WORST_CASE_FIELDS:
            fields[name] = rephrase.WORST_CASE_FIELDS[handler]
        else:
            log.info("rephrase: %s (%s) has no per-sample probability or ROUGE: not rephrased", name, handler)
    if not fields:
        return {}
    per_variant: dict[str, dict[str, Any]] = {}
    for variant in rephrase.check_variants(cfg.get("variants", rephrase.VARIANTS)):
        metrics, template = rephrase.variant_setup(variant, {n: evaluator.metrics_cfg[n] for n in fields},
                                                   evaluator.template_args, cfg)
        per_variant[variant] = evaluate_metrics(evaluator, model, metrics, f"{model_id}|rephrase:{variant}", template)
    return {name: rephrase.worst_case({v: r[name] for v, r in per_variant.items() if name in r}, fields[name])
            for name in fields}


def run_attacks(attacks: list[tuple[AttackSpec, dict]], evaluator: Any, model: torch.nn.Module, model_id: str,
                tokenizer: Any, root_cfg: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every attack's metrics: ``({suffix: {metric: EVAL entry}}, {suffix: {metric: baseline EVAL entry}})``,
    the baseline being the retain model under the same attack (relearning with ``baseline_model_path``)."""
    attacked, baselines = {}, {}
    for spec, cfg in attacks:
        names, tag = attacked_metrics(evaluator, cfg), spec.suffix(cfg)
        log.info("attack %s: %s on %s", tag, evaluator.name, ", ".join(names))
        if spec.attacked_model is None:
            attacked[tag] = _rephrased(evaluator, model, names, cfg, model_id)
            continue
        context = {"tokenizer": tokenizer, "template_args": evaluator.template_args, "root_cfg": root_cfg}
        copy_ = spec.attacked_model(model, cfg, **context)
        try:
            attacked[tag] = evaluate_metrics(evaluator, copy_, {n: evaluator.metrics_cfg[n] for n in names},
                                             f"{model_id}@{tag}")
        finally:
            del copy_
        baseline_path = baseline_model(cfg, evaluator)
        if baseline_path:
            baselines[tag] = _baseline(spec, cfg, evaluator, names, baseline_path, model, context)
    return attacked, baselines


def baseline_model(cfg: Mapping[str, Any], evaluator: Any) -> str | None:
    """The model an attack is also applied to as the baseline (``baseline_model_path``): a folder; ``auto`` =
    the retain model, as its evaluation (``retain_logs_path``) records it in ``_meta.model``, when that is a
    local folder; null or absent = none."""
    path = cfg.get("baseline_model_path")
    if path != "auto":
        return path or None
    retain_logs = evaluator.cfg.get("retain_logs_path")
    if not retain_logs or not Path(retain_logs).is_file():
        return None
    recorded = (json.loads(Path(retain_logs).read_text()).get("_meta") or {}).get("model")
    if recorded and Path(str(recorded)).is_dir():
        log.info("attack %s: the retain model %s (from %s) is the baseline", cfg.get("handler"), recorded, retain_logs)
        return str(recorded)
    log.info("attack %s: no baseline (the retain model recorded in %s, %r, is not a local folder)",
             cfg.get("handler"), retain_logs, recorded)
    return None


def _baseline(spec: AttackSpec, cfg: Mapping[str, Any], evaluator: Any, names: list[str], path: str,
              model: torch.nn.Module, context: dict) -> dict[str, Any]:
    """The same attack on the model in ``path`` (the retain model), loaded like the evaluated one."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype).to(
        next(model.parameters()).device)
    reference.eval()
    attacked = spec.attacked_model(reference, cfg, **context)
    return evaluate_metrics(evaluator, attacked, {n: evaluator.metrics_cfg[n] for n in names}, f"{path}@{spec.suffix(cfg)}")


def robustness_summary(clean: Mapping[str, Any], attacked: Mapping[str, Mapping[str, Any]],
                       baselines: Mapping[str, Mapping[str, Any]], retain_logs: Mapping[str, Any] | None) -> dict:
    """Per attacked metric: ``clean``, ``attacked`` ({suffix: value}), ``retain`` (the retain model's clean
    value, from its EVAL file) and ``retain_attacked`` ({suffix: value}: the baseline under the same attack,
    or the retain EVAL file's own ``<metric>@<suffix>``)."""
    def value(entry: Any) -> float | None:
        v = entry.get("agg_value") if isinstance(entry, Mapping) else None
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    retain_logs = retain_logs or {}
    out: dict[str, dict[str, Any]] = {}
    for tag, metrics in attacked.items():
        for name, entry in metrics.items():
            row = out.setdefault(name, {"clean": value(clean.get(name)), "attacked": {},
                                        "retain": value(retain_logs.get(name)), "retain_attacked": {}})
            row["attacked"][tag] = value(entry)
            reference = (baselines.get(tag) or {}).get(name) or retain_logs.get(f"{name}@{tag}")
            if reference is not None:
                row["retain_attacked"][tag] = value(reference)
    return out


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


def merge_into_files(output_dir: Path, name: str, attacked: Mapping[str, Mapping[str, Any]],
                     robustness: Mapping[str, Any]) -> dict[str, float | None]:
    """Add ``<metric>@<suffix>`` to ``<NAME>_EVAL.json`` and ``<NAME>_SUMMARY.json`` and write
    ``<NAME>_ROBUSTNESS.json`` (each through a temporary file and a rename); returns the new summary."""
    from evals.base import _finite_or_none, write_json_atomic

    eval_path, summary_path = output_dir / f"{name}_EVAL.json", output_dir / f"{name}_SUMMARY.json"
    payload, summary = json.loads(eval_path.read_text()), json.loads(summary_path.read_text())
    for tag, metrics in attacked.items():
        for metric, entry in metrics.items():
            payload[f"{metric}@{tag}"] = entry
            summary[f"{metric}@{tag}"] = _finite_or_none(entry.get("agg_value"))
    write_json_atomic(output_dir / f"{name}{ROBUSTNESS_SUFFIX}", robustness)
    write_json_atomic(eval_path, payload)
    write_json_atomic(summary_path, summary)
    return summary


__all__ = ["ATTACK_REGISTRY", "get_attacks", "run_attacks", "robustness_summary", "format_robustness",
           "merge_into_files", "attacked_metrics", "evaluate_metrics", "baseline_model"]
