"""Comparisons with a retain (never-trained-on-forget) model: TOFU forget quality and MUSE PrivLeak."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import ks_2samp

from . import _check_same_indices, _excluded_entry, _pre_compute_entry, _sorted_keys, register_metric

NO_RETAIN_NOTE = "no retain_logs_path given: forget quality needs the retain model's truth ratios"


def forget_quality(model_ratios: Sequence[float], retain_ratios: Sequence[float]) -> tuple[float, float]:
    """(p-value, statistic) of the two-sample Kolmogorov-Smirnov test between the forget-set truth ratios of
    the unlearned model and of the retain model (TOFU, Maini et al. 2024, "Forget Quality"); a high p-value
    means the two distributions cannot be told apart."""
    model_ratios = np.asarray(model_ratios, dtype=np.float64)
    retain_ratios = np.asarray(retain_ratios, dtype=np.float64)
    if model_ratios.size == 0 or retain_ratios.size == 0:
        raise ValueError("forget_quality needs at least one truth ratio on each side")
    res = ks_2samp(model_ratios, retain_ratios)
    return float(res.pvalue), float(res.statistic)


def privleak_score(auc: float, ref_auc: float) -> float:
    """PrivLeak = (AUC_m - AUC_r) / AUC_r * 100 in MUSE's convention (Shi et al. 2024, members positive).

    Our AUCs label holdout (non-members) positive, so the MUSE AUC is 1 - AUC here:
    ((1 - auc) - (1 - ref_auc)) / (1 - ref_auc) * 100.

    Sign: 0 = the same membership leak as the retain model. NEGATIVE = the model tells forget rows from
    holdout rows better than the retain model does (more leak: under-unlearned; a model trained on the
    forget set scores near -100, like MUSE's target models). POSITIVE = it scores the forget rows as
    less familiar than unseen ones (over-unlearned: the forgetting itself is visible).
    """
    denom = 1.0 - float(ref_auc)
    if denom <= 0:
        raise ValueError(f"privleak undefined for a reference AUC of {ref_auc} (1 - AUC_ref must be > 0)")
    return float(((1.0 - float(auc)) - denom) / denom * 100.0)


def _reference(reference_logs: Mapping | None, key: str = "retain") -> dict | None:
    if not reference_logs:
        return None
    return reference_logs.get(key)


def _score_of(entry) -> float | None:
    if entry is None:
        return None
    value = entry.get("score") if isinstance(entry, Mapping) else entry
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@register_metric(
    "ks_test", higher_is_better=True, needs=("pre_compute", "reference_logs"), reference_fields=("value_by_index",),
    description="TOFU forget quality: KS-test p-value of forget truth ratios vs the retain model's",
)
def ks_test_metric(*, pre_compute=None, reference_logs=None, **_: object) -> dict:
    """pre_compute["forget"]: this model's forget truth_ratio result; reference_logs["retain"]: the retain
    model's (same layout) or None. Both sides must cover the same indices; an index whose ratio is None on
    either side is dropped from both and listed under "excluded"."""
    model = _pre_compute_entry(pre_compute, "forget", "ks_test")["value_by_index"]
    retain = _reference(reference_logs)
    if retain is None:
        return {"agg_value": None, "pvalue": None, "statistic": None, "note": NO_RETAIN_NOTE}
    if "value_by_index" not in retain:
        raise ValueError(
            f"ks_test: reference_logs['retain'] must be a truth_ratio result with 'value_by_index'; got keys {sorted(retain)}"
        )
    retain = retain["value_by_index"]
    _check_same_indices(model, retain, "this model's forget truth ratios", "the retain model's", "ks_test")
    retain = {str(k): v for k, v in retain.items()}
    model_values, retain_values, excluded = [], [], []
    for key in _sorted_keys(model):
        m, r = _score_of(model[key]), _score_of(retain[str(key)])
        if m is None or r is None:
            excluded.append(key)
            continue
        model_values.append(m)
        retain_values.append(r)
    out: dict = {}
    if model_values:
        pvalue, statistic = forget_quality(model_values, retain_values)
        out.update(agg_value=pvalue, pvalue=pvalue, statistic=statistic)
    else:
        out.update(agg_value=None, pvalue=None, statistic=None, note="no index with a truth ratio on both sides")
    out["num_samples"] = len(model_values)
    if excluded:
        out["excluded"] = [_excluded_entry(k) for k in excluded]
    return out


@register_metric(
    "privleak", higher_is_better=None, needs=("pre_compute", "reference_logs"),
    description="MUSE PrivLeak: relative gap (%) of the Min-K% MIA AUC to the retain model's; 0 is best, < 0 leaks more",
)
def privleak_metric(*, pre_compute=None, reference_logs=None, ref_value: float = 0.5,
                    ref_value_source: str | None = None, **_: object) -> dict:
    """pre_compute["forget"]: this model's mia_min_k result (agg_value = AUC); reference_logs["retain"]: the
    retain model's, or None (then AUC_ref = ``ref_value``, and a note says so, naming ``ref_value_source``
    when given: MUSE's published retrained-model AUC of the corpus)."""
    forget = _pre_compute_entry(pre_compute, "forget", "privleak")
    auc = forget.get("agg_value")
    retain = _reference(reference_logs)
    note = None
    if retain is None or retain.get("agg_value") is None:
        ref_auc = float(ref_value)
        note = f"no retain model MIA result: reference AUC set to ref_value={ref_auc}" + (
            f" ({ref_value_source})" if ref_value_source else "")
    else:
        ref_auc = float(retain["agg_value"])
    if auc is None:
        out = {"agg_value": None, "auc": None, "ref_auc": ref_auc}
        out["note"] = "this model's MIA AUC is undefined" + (f"; {note}" if note else "")
        return out
    auc = float(auc)
    out = {"agg_value": privleak_score(auc, ref_auc), "auc": auc, "ref_auc": ref_auc}
    if note:
        out["note"] = note
    return out
