"""core.evaluation.stats: bootstrap intervals."""
from __future__ import annotations

import math

import numpy as np
import pytest

from core.evaluation import stats
from core.evaluation.stats import Interval, bootstrap_mean_ci, bootstrap_ratio_ci


def test_constant_gives_constant_interval():
    assert bootstrap_mean_ci([0.7] * 10) == Interval(pytest.approx(0.7), pytest.approx(0.7), pytest.approx(0.7), 10)


def test_interval_contains_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(1)
    small = bootstrap_mean_ci(rng.normal(2.0, 1.0, 20).tolist())
    large = bootstrap_mean_ci(rng.normal(2.0, 1.0, 2000).tolist())
    for iv in (small, large):
        assert iv.lo < iv.mean < iv.hi
    assert (large.hi - large.lo) < (small.hi - small.lo) / 3


def test_deterministic_by_seed_and_ignores_missing():
    values = [1.0, 2.0, None, 4.0, float("nan"), 8.0]
    a = bootstrap_mean_ci(values, seed=3)
    assert a.n == 4 and a.mean == pytest.approx(3.75)
    varied = np.random.default_rng(0).exponential(1.0, 40).tolist()
    b = bootstrap_mean_ci(varied, n_resamples=200, seed=3)
    assert b == bootstrap_mean_ci(varied, n_resamples=200, seed=3)
    assert b != bootstrap_mean_ci(varied, n_resamples=200, seed=4)


def test_two_values_interval_is_their_range():
    iv = bootstrap_mean_ci([0.0, 1.0])
    assert (iv.mean, iv.lo, iv.hi) == (0.5, 0.0, 1.0)


def test_empty_and_single():
    empty = bootstrap_mean_ci([None, float("nan")])
    assert empty.n == 0 and all(math.isnan(x) for x in (empty.mean, empty.lo, empty.hi))
    one = bootstrap_mean_ci([3.0])
    assert one.mean == 3.0 and math.isnan(one.lo) and math.isnan(one.hi)


def test_chunking_does_not_change_results(monkeypatch):
    values = list(range(50))
    whole = bootstrap_mean_ci(values, n_resamples=300, seed=5)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 50 * 7)  # 7 resamples per chunk
    assert bootstrap_mean_ci(values, n_resamples=300, seed=5) == whole


def test_bad_arguments():
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean_ci([1, 2], confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_mean_ci([1, 2], n_resamples=0)
    with pytest.raises(ValueError, match="numerators"):
        bootstrap_ratio_ci([1, 2], [1])
    with pytest.raises(ValueError, match=">= 0"):
        bootstrap_ratio_ci([1, 2], [1, -1])


def test_ratio_is_token_weighted():
    # Prompt A: 10 tokens, total NLL 10 (1.0/token); prompt B: 2 tokens, total NLL 6 (3.0/token).
    iv = bootstrap_ratio_ci([10.0, 6.0], [10, 2])
    assert iv.mean == pytest.approx(16 / 12)  # not the unweighted (1 + 3) / 2
    assert iv.lo == pytest.approx(1.0) and iv.hi == pytest.approx(3.0)


def test_ratio_constant_missing_and_zero():
    iv = bootstrap_ratio_ci([2.0, 4.0, None, 6.0], [1, 2, 5, 3])
    assert (iv.mean, iv.lo, iv.hi, iv.n) == (pytest.approx(2.0), pytest.approx(2.0), pytest.approx(2.0), 3)
    assert math.isnan(bootstrap_ratio_ci([0.0], [0]).mean)
    # Resamples made only of the zero-token prompt have no ratio and are dropped.
    iv = bootstrap_ratio_ci([0.0, 5.0], [0, 5], n_resamples=500)
    assert (iv.mean, iv.lo, iv.hi) == (1.0, 1.0, 1.0)


def test_ratio_contains_estimate():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 50, 100)
    nll = tokens * rng.uniform(0.5, 2.5, 100)
    iv = bootstrap_ratio_ci(nll.tolist(), tokens.tolist(), seed=1)
    assert iv.lo < iv.mean < iv.hi and iv.n == 100
