"""Membership-inference attacks on the forget set (MIMIR, Duan et al. 2024).

Members = the forget set, non-members = a holdout set. Each attack gives a score per sample where HIGHER
means "more likely a NON-member"; the AUC is that of separating holdout (label 1) from forget (label 0),
i.e. the probability that a holdout sample scores higher than a forget sample (0.5 = no membership leak).

Every handler takes role-keyed inputs: ``token_stats={"forget": {idx: [TokenStats, ...]}, "holdout": {...}}``
(the FIRST answer of each index is used), ``grad_norms={"forget": {idx: float}, "holdout": {...}}`` and
``reference_token_stats`` in the token_stats layout. Output::

    {"agg_value": auc, "auc": auc,
     "forget": {"agg_value": mean score, "value_by_index": {"<idx>": {"score": s}}},
     "holdout": {...}}
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

from . import TokenStats, _mean_or_none, _one_role, _require, _result, _sorted_keys, register_metric
from .probability import mean_nll

ROLES = ("forget", "holdout")
STD_EPS = 1e-12


# ------------------------------------------------------------------------------------------ pure helpers


def zlib_entropy(text: str) -> int:
    """len(zlib.compress(text.encode("utf-8"))): the zlib size in bytes used as a text-complexity reference."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_score(logp: Sequence[float] | np.ndarray, text: str) -> float:
    """A / zlib_entropy(text), with A the mean NLL of the answer (Carlini et al. 2021 zlib attack; MIMIR)."""
    return mean_nll(logp) / zlib_entropy(text)


def _lowest_mean(values: np.ndarray, k: float) -> float:
    if not 0.0 < k <= 1.0:
        raise ValueError(f"min-k fraction k must be in (0, 1]; got {k}")
    if values.size == 0:
        raise ValueError("min-k score of an empty token sequence")
    n = max(1, int(k * values.size))
    return float(-np.mean(np.sort(values)[:n]))


def min_k_score(logp: Sequence[float] | np.ndarray, k: float = 0.4) -> float:
    """Min-K% Prob (Shi et al. 2024): -(1/n) * sum of the n = max(1, int(k * T')) smallest token log-probs.

    ``logp`` holds the T' tokens to score (the compute function drops the EOS token). Higher = less likely a
    member (members have fewer very unlikely tokens).
    """
    return _lowest_mean(np.asarray(logp, dtype=np.float64).reshape(-1), k)


def min_k_plus_plus_score(
    logp: Sequence[float] | np.ndarray,
    mean_logp: Sequence[float] | np.ndarray,
    std_logp: Sequence[float] | np.ndarray,
    k: float = 0.4,
) -> float:
    """Min-K%++ (Zhang et al. 2024): z_t = (log p(y_t) - mu_t) / sigma_t with mu_t = E_{v~p}[log p(v)] and
    sigma_t = sqrt(Var_{v~p}[log p(v)]) of the next-token distribution; score = -(1/n) * sum of the n =
    max(1, int(k * T'')) smallest z_t.

    Tokens whose sigma_t <= 1e-12 (a one-hot distribution, z undefined) are SKIPPED and T'' counts the rest;
    when every token is skipped a ValueError is raised. ``logp`` etc. hold the tokens to score (EOS dropped by
    the compute function).
    """
    logp = np.asarray(logp, dtype=np.float64).reshape(-1)
    mu = np.asarray(mean_logp, dtype=np.float64).reshape(-1)
    sigma = np.asarray(std_logp, dtype=np.float64).reshape(-1)
    keep = np.isfinite(sigma) & (sigma > STD_EPS) & np.isfinite(mu)
    if not keep.any():
        raise ValueError("min_k_plus_plus_score: no token with a defined z-score (std > 1e-12)")
    z = (logp[keep] - mu[keep]) / sigma[keep]
    return _lowest_mean(z, k)


def reference_score(logp: Sequence[float] | np.ndarray, reference_logp: Sequence[float] | np.ndarray) -> float:
    """A_model - A_reference: the loss calibrated by a reference model's loss on the same text
    (Carlini et al. 2021 reference-model attack; MIMIR "ref")."""
    return mean_nll(logp) - mean_nll(reference_logp)


def roc_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """ROC AUC of the scores with labels forget = 0, holdout = 1 (sklearn ``roc_auc_score``): the probability
    that a holdout sample scores higher than a forget sample, ties counting 1/2."""
    forget_scores = [float(s) for s in forget_scores]
    holdout_scores = [float(s) for s in holdout_scores]
    if not forget_scores or not holdout_scores:
        raise ValueError(
            f"roc_auc needs scores of both sets; got {len(forget_scores)} forget, {len(holdout_scores)} holdout"
        )
    labels = [0] * len(forget_scores) + [1] * len(holdout_scores)
    return float(roc_auc_score(labels, forget_scores + holdout_scores))


# ------------------------------------------------------------------------------------------ compute functions


def _roles(inputs: Mapping | None, what: str, metric: str) -> Mapping:
    inputs = _require(inputs, what, metric)
    missing = [r for r in ROLES if r not in inputs or inputs[r] is None]
    if missing:
        raise ValueError(f"metric {metric!r} needs {what} for roles {list(ROLES)}; missing {missing}")
    return inputs


def _attack_result(scores_by_role: dict[str, dict], note: str | None = None) -> dict:
    """Assemble the MIA layout from role -> {index: score or None}."""
    out: dict = {}
    kept: dict[str, list[float]] = {}
    for role in ROLES:
        value_by_index = {str(i): {"score": s} for i, s in scores_by_role[role].items()}
        excluded = [i for i, s in scores_by_role[role].items() if s is None]
        kept[role] = [s for s in scores_by_role[role].values() if s is not None]
        out[role] = _result(_mean_or_none(kept[role]), value_by_index, excluded)
    if kept["forget"] and kept["holdout"]:
        auc = roc_auc(kept["forget"], kept["holdout"])
    else:
        auc = None
        note = note or "AUC undefined: no scored sample in forget or holdout"
    result = {"agg_value": auc, "auc": auc, **out}
    if note:
        result["note"] = note
    return result


def _score_first_answers(
    token_stats: Mapping, metric: str, score: Callable[[TokenStats, object], float | None]
) -> dict:
    """role -> {index: score(first answer, index) or None}; broken samples (and ValueError) give None."""
    token_stats = _roles(token_stats, "token_stats", metric)
    scores: dict[str, dict] = {}
    for role in ROLES:
        scores[role] = {}
        for idx in _sorted_keys(token_stats[role]):
            answers = list(token_stats[role][idx])
            value = None
            if answers and answers[0].is_valid():
                try:
                    value = score(answers[0], (role, idx))
                except ValueError:
                    value = None
            if value is not None and not math.isfinite(value):
                value = None
            scores[role][idx] = value
    return scores


@register_metric(
    "mia_loss", higher_is_better=None, needs=("token_stats",),
    description="MIA AUC with the mean answer NLL as score (LOSS attack, Yeom et al. 2018)",
)
def mia_loss_metric(*, token_stats=None, **_: object) -> dict:
    """Score = A (mean NLL over all T answer tokens, EOS included)."""
    return _attack_result(_score_first_answers(token_stats, "mia_loss", lambda ts, _key: mean_nll(ts.logp)))


@register_metric(
    "mia_zlib", higher_is_better=None, needs=("token_stats",),
    description="MIA AUC with A / zlib size of the answer text as score (Carlini et al. 2021)",
)
def mia_zlib_metric(*, token_stats=None, **_: object) -> dict:
    """Score = A / len(zlib.compress(answer_text.encode("utf-8")))."""
    return _attack_result(
        _score_first_answers(token_stats, "mia_zlib", lambda ts, _key: zlib_score(ts.logp, ts.answer_text))
    )


@register_metric(
    "mia_min_k", higher_is_better=None, needs=("token_stats",),
    description="MIA AUC with the Min-K% Prob score (Shi et al. 2024), a final EOS excluded; option k (0.4)",
)
def mia_min_k_metric(*, token_stats=None, k: float = 0.4, **_: object) -> dict:
    """Score = min_k_score of the content tokens' log-probs (``TokenStats.content``: a final EOS left out, every
    token of raw text); a sample with no content token is excluded."""
    if not 0.0 < float(k) <= 1.0:
        raise ValueError(f"mia_min_k: k must be in (0, 1]; got {k}")
    return _attack_result(
        _score_first_answers(
            token_stats, "mia_min_k",
            lambda ts, _key: min_k_score(ts.logp[ts.content], float(k)) if ts.num_content_tokens else None,
        )
    )


@register_metric(
    "mia_min_k_plus_plus", higher_is_better=None, needs=("token_stats", "vocab_moments"),
    description="MIA AUC with the Min-K%++ score (Zhang et al. 2024), a final EOS excluded; option k (0.4)",
)
def mia_min_k_plus_plus_metric(*, token_stats=None, k: float = 0.4, **_: object) -> dict:
    """Score = min_k_plus_plus_score of the content tokens (a final EOS left out); tokens with std <= 1e-12
    are skipped and a sample with no token left is excluded."""
    if not 0.0 < float(k) <= 1.0:
        raise ValueError(f"mia_min_k_plus_plus: k must be in (0, 1]; got {k}")
    for role, per_index in _roles(token_stats, "token_stats", "mia_min_k_plus_plus").items():
        if any(ts.mean_logp is None for answers in per_index.values() for ts in answers):
            raise ValueError(f"mia_min_k_plus_plus: the {role} statistics have no mean/std of log p over the "
                             "vocabulary (computed only for datasets a metric declaring needs 'vocab_moments' reads)")
    return _attack_result(
        _score_first_answers(
            token_stats, "mia_min_k_plus_plus",
            lambda ts, _key: (
                min_k_plus_plus_score(ts.logp[ts.content], ts.mean_logp[ts.content], ts.std_logp[ts.content],
                                      float(k))
                if ts.num_content_tokens else None
            ),
        )
    )


@register_metric(
    "mia_gradnorm", higher_is_better=None, needs=("grad_norms",),
    description="MIA AUC with the norm of the loss gradient w.r.t. the parameters as score (MIMIR GradNorm)",
)
def mia_gradnorm_metric(*, grad_norms=None, **_: object) -> dict:
    """Score = the gradient norm supplied per sample (members: smaller gradients); None / non-finite excluded."""
    grad_norms = _roles(grad_norms, "grad_norms", "mia_gradnorm")
    scores: dict[str, dict] = {}
    for role in ROLES:
        scores[role] = {}
        for idx in _sorted_keys(grad_norms[role]):
            value = grad_norms[role][idx]
            value = None if value is None else float(value)
            scores[role][idx] = value if value is not None and math.isfinite(value) else None
    return _attack_result(scores)


@register_metric(
    "mia_reference", higher_is_better=None, needs=("token_stats", "reference_token_stats"),
    description="MIA AUC with A_model - A_reference as score (Carlini et al. 2021 reference attack)",
)
def mia_reference_metric(*, token_stats=None, reference_token_stats=None, **_: object) -> dict:
    """Score = A_model - A_reference on the same answer; an index missing from the reference is an error,
    a broken reference sample is excluded."""
    reference = _roles(reference_token_stats, "reference_token_stats", "mia_reference")
    model = _roles(token_stats, "token_stats", "mia_reference")
    for role in ROLES:
        missing = [i for i in model[role] if i not in reference[role]]
        if missing:
            raise ValueError(
                f"mia_reference: {len(missing)} {role} indices have no reference statistics "
                f"(first: {_sorted_keys(missing)[:5]})"
            )

    def score(ts: TokenStats, key: tuple) -> float | None:
        role, idx = key
        ref = list(reference[role][idx])
        if not ref or not ref[0].is_valid():
            return None
        return reference_score(ts.logp, ref[0].logp)

    return _attack_result(_score_first_answers(model, "mia_reference", score))


# ------------------------------------------------------------------------------------------ one set's mean score

#: The statistics ``member_score`` averages: each maps a sample's TokenStats to the score above (higher = less
#: like a member), None where it is undefined.
MEMBER_STATISTICS: dict[str, Callable[[TokenStats, float], float | None]] = {
    "loss": lambda ts, k: mean_nll(ts.logp),
    "zlib": lambda ts, k: zlib_score(ts.logp, ts.answer_text),
    "min_k": lambda ts, k: min_k_score(ts.logp[ts.content], k) if ts.num_content_tokens else None,
    "min_k_plus_plus": lambda ts, k: (
        min_k_plus_plus_score(ts.logp[ts.content], ts.mean_logp[ts.content], ts.std_logp[ts.content], k)
        if ts.num_content_tokens else None),
}


def _member_scores(token_stats: Mapping | None, metric: str, statistic: str, k: float) -> dict:
    if statistic not in MEMBER_STATISTICS:
        raise ValueError(f"{metric}: statistic={statistic!r}; valid: {', '.join(MEMBER_STATISTICS)}")
    if not 0.0 < float(k) <= 1.0:
        raise ValueError(f"{metric}: k must be in (0, 1]; got {k}")
    per_index = _one_role(token_stats, "token_stats", metric)
    score = MEMBER_STATISTICS[statistic]
    scores: dict = {}
    for idx in _sorted_keys(per_index):
        answers = list(per_index[idx])
        value = None
        if answers and answers[0].is_valid():
            try:
                value = score(answers[0], float(k))
            except ValueError:
                value = None
        scores[idx] = value if value is not None and math.isfinite(value) else None
    value_by_index = {str(i): {"score": s} for i, s in scores.items()}
    excluded = [i for i, s in scores.items() if s is None]
    return _result(_mean_or_none([s for s in scores.values() if s is not None]), value_by_index, excluded,
                   statistic=statistic)


@register_metric(
    "member_score", higher_is_better=None, needs=("token_stats",),
    description="mean membership statistic of one set (RWKU's MIA set: forget or retain members); option "
                "statistic = loss | zlib | min_k (k)",
)
def member_score_metric(*, token_stats=None, statistic: str = "loss", k: float = 0.4, **_: object) -> dict:
    """agg_value = the mean over the set's samples of one membership statistic (higher = less like a member):
    ``loss`` = mean NLL A, ``zlib`` = A / zlib size, ``min_k`` = Min-K% (k). RWKU (Jin et al. 2024) reports these
    means for its forget members (FM: they should rise after unlearning) and retain members (RM: they should
    stay), not an AUC between the two sets. Undefined samples are excluded."""
    if statistic == "min_k_plus_plus":
        raise ValueError("member_score: statistic=min_k_plus_plus needs the vocabulary moments; use the handler "
                         "member_score_min_k_plus_plus")
    return _member_scores(token_stats, "member_score", statistic, k)


@register_metric(
    "member_score_min_k_plus_plus", higher_is_better=None, needs=("token_stats", "vocab_moments"),
    description="mean Min-K%++ score of one set (RWKU's MIA set); option k",
)
def member_score_min_k_plus_plus_metric(*, token_stats=None, k: float = 0.4, **_: object) -> dict:
    """agg_value = the mean over the set's samples of the Min-K%++ score (Zhang et al. 2024; higher = less like a
    member). RWKU uses k = 0.2. Tokens with std <= 1e-12 are skipped; a sample with none left is excluded."""
    return _member_scores(token_stats, "member_score_min_k_plus_plus", "min_k_plus_plus", k)
