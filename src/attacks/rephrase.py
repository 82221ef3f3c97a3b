"""Rephrasing attack: ask the forget questions another way and keep each sample's worst case.

A model that only learned to refuse the benchmark's exact wording still answers the same question
paraphrased or in another prompt format (Lynch et al. 2024, arXiv:2402.16835; "The Unlearning Mirage"
2026 and JensUn/LKF 2025 on reformatted queries). Each variant re-runs the forget metrics with one change:

- ``paraphrased_question``: the dataset's paraphrased question (TOFU's ``paraphrased_question`` column)
  instead of ``question``;
- ``no_chat_template``: the raw question / answer tags of the model config, without the chat template;
- ``system_prompt``: the chat template with ``attack.rephrase.system_prompt`` as the system message.

For every sample and metric the worst case is kept: the highest answer probability and the highest
ROUGE over the variants (``worst_case``); the metric's value is the mean of those per-sample maxima.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from checks import BadValueError

VARIANTS = ("paraphrased_question", "no_chat_template", "system_prompt")
#: Per-sample fields a worst case is taken of, by metric handler: the answer probability, the ROUGE scores.
WORST_CASE_FIELDS = {"probability": ("prob",), "rouge": ("rougeL_recall", "rougeL_f1", "rouge1_recall")}


def check_variants(variants: Sequence[str]) -> list[str]:
    variants = list(variants or [])
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise BadValueError(f"attack.rephrase.variants={variants}: give one or more of {', '.join(VARIANTS)}")
    return variants


def _set_question_key(mcfg: dict, key: str) -> dict:
    """A metric config whose every dataset (its own and its pre-compute metrics') reads questions from ``key``."""
    out = copy.deepcopy(mcfg)
    for spec in (out.get("datasets") or {}).values():
        if isinstance(spec, dict):
            spec.setdefault("args", {})["question_key"] = key
    out["pre_compute"] = {name: _set_question_key(sub, key) for name, sub in (out.get("pre_compute") or {}).items()}
    if not out["pre_compute"]:
        out.pop("pre_compute")
    return out


def variant_setup(variant: str, metrics_cfg: Mapping[str, dict], template_args: Mapping[str, Any] | None,
                  cfg: Mapping[str, Any]) -> tuple[dict[str, dict], dict[str, Any]]:
    """The metric configs and template arguments of one variant (``VARIANTS``)."""
    template = dict(template_args or {})
    metrics = {name: copy.deepcopy(m) for name, m in metrics_cfg.items()}
    if variant == "paraphrased_question":
        metrics = {name: _set_question_key(m, cfg.get("paraphrased_question_key", "paraphrased_question"))
                   for name, m in metrics.items()}
    elif variant == "no_chat_template":
        template["apply_chat_template"] = False
    elif variant == "system_prompt":
        template["apply_chat_template"] = True
        template["system_prompt"] = cfg.get("system_prompt")
    else:
        check_variants([variant])
    return metrics, template


def worst_case(results: Mapping[str, Mapping[str, Any]], fields: Sequence[str]) -> dict[str, Any]:
    """One metric's worst case over variants: ``results`` = ``{variant: EVAL entry}`` (each with
    ``value_by_index``). Per sample, each of ``fields`` is its maximum over the variants that scored it,
    with ``variant`` naming where ``fields[0]`` peaked; ``agg_value`` is the mean of the per-sample maxima
    of ``fields[0]`` (None when no sample was scored). ``variants`` keeps each variant's own ``agg_value``."""
    by_index: dict[str, dict[str, Any]] = {}
    for variant, entry in results.items():
        for index, values in (entry.get("value_by_index") or {}).items():
            if not isinstance(values, Mapping):
                continue
            row = by_index.setdefault(index, {})
            for field in fields:
                value = values.get(field)
                if isinstance(value, list):  # several answers: the true answer's value comes first
                    value = value[0] if value else None
                if isinstance(value, (int, float)) and (row.get(field) is None or value > row[field]):
                    row[field] = float(value)
                    if field == fields[0]:
                        row["variant"] = variant
    main = [row[fields[0]] for row in by_index.values() if row.get(fields[0]) is not None]
    return {"agg_value": sum(main) / len(main) if main else None,
            "value_by_index": dict(sorted(by_index.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 0)),
            "variants": {v: e.get("agg_value") for v, e in results.items()}}


def suffix(cfg: Mapping[str, Any]) -> str:
    return "rephrase"
