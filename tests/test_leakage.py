"""Leak@k and the per-prompt summaries of sampled answers (issue 33's estimator; src/evals/metrics/leakage.py)."""

from __future__ import annotations

from math import comb

import pytest

from evals.metrics.leakage import best_of_n, leak_at_k, leak_rate


def test_leak_at_k_by_hand():
    """4 samples, 1 leaks: of the C(4, 2) = 6 pairs, the C(3, 2) = 3 without it do not leak: leak@2 = 1/2."""
    assert leak_at_k(4, 1, 2) == pytest.approx(0.5)
    assert leak_at_k(16, 4, 1) == pytest.approx(4 / 16)  # leak@1 is the leak rate
    assert leak_at_k(16, 0, 8) == 0.0 and leak_at_k(16, 16, 1) == 1.0
    assert leak_at_k(5, 3, 3) == 1.0  # only 2 samples do not leak: any 3 include a leak


def test_leak_at_k_equals_the_binomial_form():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert leak_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12), (n, c, k)


def test_leak_at_k_refuses_impossible_counts():
    with pytest.raises(ValueError, match="k=5 with n=4 samples; k must be from 1 to n"):
        leak_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="leaks=5 > n=4"):
        leak_at_k(4, 5, 2)
    with pytest.raises(ValueError, match="k=1.5; give a non-negative integer"):
        leak_at_k(4, 1, 1.5)


def test_leak_rate_and_best_of_n():
    assert leak_rate([True, False, False, True]) == 0.5
    assert best_of_n([0.1, 0.7, 0.3]) == 0.7
    with pytest.raises(ValueError, match="no sample"):
        leak_rate([])
