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

from collections.abc import Mapping, Sequence
from typing import Any

from checks import BadValueError

VARIANTS = ("paraphrased_question", "no_chat_template", "system_prompt")


def check_variants(variants: Sequence[str]) -> list[str]:
    variants = list(variants or [])
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise BadValueError(f"attack.rephrase.variants={variants}: give one or more of {', '.join(VARIANTS)}")
    return variants


def variant_inputs(variant: str, template_args: Mapping[str, Any] | None,
                   cfg: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """``(question column or None, template arguments)`` of one variant (``VARIANTS``), for
    ``Benchmark.with_inputs``."""
    template = dict(template_args or {})
    question_key = None
    if variant == "paraphrased_question":
        question_key = cfg.get("paraphrased_question_key", "paraphrased_question")
    elif variant == "no_chat_template":
        template["apply_chat_template"] = False
    elif variant == "system_prompt":
        template["apply_chat_template"] = True
        template["system_prompt"] = cfg.get("system_prompt")
    else:
        check_variants([variant])
    return question_key, template


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
