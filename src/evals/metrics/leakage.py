"""Leakage under sampling: how often an unlearned model still says a forgotten answer when it samples.

Greedy decoding shows one answer per question; a model that never gives the forgotten fact greedily may still
give it in some of n sampled answers. Leak@k (arXiv:2511.04934) asks for the probability that at least one of
k sampled answers leaks it, estimated without bias from n >= k samples as pass@k is for code (Chen et al. 2021,
"Evaluating Large Language Models Trained on Code", arXiv:2107.03374).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def leak_at_k(n: int, leaks: int, k: int) -> float:
    """The unbiased estimate of P(at least one of k samples leaks) from n samples of which ``leaks`` leak:
    ``1 - C(n - c, k) / C(n, k)``, computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` (Chen et al.
    2021's numerically stable form; no large binomials). 1 when fewer than k samples do not leak."""
    for name, value in (("n", n), ("leaks", leaks), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"leak_at_k: {name}={value!r}; give a non-negative integer")
    if not 1 <= k <= n:
        raise ValueError(f"leak_at_k: k={k} with n={n} samples; k must be from 1 to n")
    if leaks > n:
        raise ValueError(f"leak_at_k: leaks={leaks} > n={n}")
    if n - leaks < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - leaks + 1, n + 1))


def leak_rate(leaked: Sequence[bool]) -> float:
    """The share of samples that leak, c / n (the expected leak@1)."""
    if not leaked:
        raise ValueError("leak_rate of no sample")
    return sum(bool(x) for x in leaked) / len(leaked)


def best_of_n(scores: Sequence[float]) -> float:
    """The highest score among one prompt's n sampled answers (the report averages it over prompts)."""
    if not scores:
        raise ValueError("best_of_n of no sample")
    return float(max(scores))
