"""Aggregates of other metrics: TOFU's model utility (a harmonic mean) and plain means (RWKU's "All" columns)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from scipy.stats import hmean

from . import _require, register_metric


def harmonic_mean(values: Sequence[float]) -> float:
    """n / sum_i (1 / x_i) (TOFU, Maini et al. 2024, "Model Utility": harmonic mean of the probability, ROUGE
    and truth-ratio scores on the retain, real-authors and world-facts sets). Any x_i = 0 gives 0; negative or
    non-finite values raise ValueError."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("harmonic_mean of no value")
    bad = [v for v in values if not math.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"harmonic_mean needs finite non-negative values; got {bad}")
    if any(v == 0 for v in values):
        return 0.0
    return float(hmean(values))


@register_metric(
    "hm_aggregate", higher_is_better=True, needs=("pre_compute",),
    description="TOFU model utility: harmonic mean of the agg_value of every pre_compute entry",
)
def hm_aggregate_metric(*, pre_compute=None, **_: object) -> dict:
    """agg_value = harmonic mean of pre_compute[name]["agg_value"] over every entry (a bare number is also
    accepted). Returns {"agg_value", "inputs": {name: value}}. An entry without a value (every one of its
    samples excluded) makes the mean undefined: agg_value None and a note naming the entries, so the
    rest of the evaluation is kept. A negative or non-finite entry raises ValueError naming it."""
    pre_compute = _require(pre_compute, "pre_compute", "hm_aggregate")
    if not pre_compute:
        raise ValueError("hm_aggregate needs at least one pre_compute entry")
    inputs: dict[str, float | None] = {}
    for name, entry in pre_compute.items():
        value = entry.get("agg_value") if isinstance(entry, Mapping) else entry
        if value is None:
            inputs[str(name)] = None
            continue
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"hm_aggregate: pre_compute entry {name!r} = {value} (must be finite and >= 0)")
        inputs[str(name)] = value
    missing = [name for name, value in inputs.items() if value is None]
    if missing:
        return {"agg_value": None, "inputs": inputs,
                "note": f"harmonic mean undefined: no value for {', '.join(missing)} (every sample excluded)"}
    return {"agg_value": harmonic_mean(list(inputs.values())), "inputs": inputs}


@register_metric(
    "mean_aggregate", higher_is_better=None, needs=("pre_compute",),
    description="arithmetic mean of the agg_value of every pre_compute entry (RWKU's 'All' columns)",
)
def mean_aggregate_metric(*, pre_compute=None, **_: object) -> dict:
    """agg_value = (1/m) * sum_j pre_compute[j]["agg_value"] (RWKU, Jin et al. 2024: the "All" column of the forget
    and neighbour sets, the mean of the per-level ROUGE-L recalls). An entry without a value makes the mean
    undefined: agg_value None and a note naming it. Returns {"agg_value", "inputs": {name: value}}."""
    pre_compute = _require(pre_compute, "pre_compute", "mean_aggregate")
    if not pre_compute:
        raise ValueError("mean_aggregate needs at least one pre_compute entry")
    inputs = {str(name): (entry.get("agg_value") if isinstance(entry, Mapping) else entry)
              for name, entry in pre_compute.items()}
    missing = [name for name, value in inputs.items() if value is None]
    if missing:
        return {"agg_value": None, "inputs": inputs,
                "note": f"mean undefined: no value for {', '.join(missing)} (every sample excluded)"}
    values = [float(v) for v in inputs.values()]
    bad = [name for name, v in zip(inputs, values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"mean_aggregate: pre_compute entries {bad} are not finite")
    return {"agg_value": sum(values) / len(values), "inputs": dict(zip(inputs, values))}
