"""Bootstrap confidence intervals (percentile method) over evaluation prompts.

Resampling is vectorised with numpy and done in chunks so memory stays bounded for
large evaluation sets; results depend only on the inputs and `seed`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Elements of the (resamples × n) index matrix generated at once (~64 MB of int64).
_CHUNK_ELEMENTS = 8_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap confidence interval.

    mean: the estimate on the data as given (not the mean of the resamples).
    lo, hi: interval bounds; NaN when there are fewer than 2 values (one value says
        nothing about spread), all NaN when there are none.
    n: how many values (or prompts) were used after dropping missing ones.
    """

    mean: float
    lo: float
    hi: float
    n: int = 0


def _check_args(confidence: float, n_resamples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples!r}")


def _as_float(values: Sequence) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _resample_stat(n: int, n_resamples: int, seed: int, stat) -> np.ndarray:
    """stat(idx) for `n_resamples` rows of resampled indices, generated in chunks."""
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    out = []
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        out.append(stat(idx))
    return np.concatenate(out)


def _percentiles(samples: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    samples = samples[~np.isnan(samples)]
    if samples.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(samples, [alpha, 1 - alpha])
    return float(lo), float(hi)


def bootstrap_mean_ci(
    values: Sequence[float | None],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Mean of `values` with a percentile-bootstrap interval; None/NaN values are ignored."""
    _check_args(confidence, n_resamples)
    x = _as_float(values)
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    means = _resample_stat(n, int(n_resamples), seed, lambda idx: x[idx].mean(axis=1))
    lo, hi = _percentiles(means, confidence)
    return Interval(mean, lo, hi, n)


def bootstrap_ratio_ci(
    numerators: Sequence[float | None],
    denominators: Sequence[float | None],
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """sum(numerators) / sum(denominators) with a percentile-bootstrap interval that
    resamples whole pairs (e.g. per prompt: summed token NLL, token count), giving a
    token-weighted mean. Pairs with a missing part are ignored; denominators must be
    >= 0, and the estimate is NaN when they sum to 0.
    """
    _check_args(confidence, n_resamples)
    if len(numerators) != len(denominators):
        raise ValueError(f"got {len(numerators)} numerators but {len(denominators)} denominators")
    num, den = _as_float(numerators), _as_float(denominators)
    keep = ~(np.isnan(num) | np.isnan(den))
    num, den = num[keep], den[keep]
    if (den < 0).any():
        raise ValueError("denominators must be >= 0 (they are counts, e.g. tokens)")
    n = int(num.size)
    total = float(den.sum())
    if n == 0 or total == 0:
        return Interval(math.nan, math.nan, math.nan, n)
    ratio = float(num.sum()) / total
    if n == 1:
        return Interval(ratio, math.nan, math.nan, 1)

    def stat(idx):
        d = den[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            # A resample of only zero-token prompts has no ratio: NaN, dropped below.
            return np.where(d > 0, num[idx].sum(axis=1) / d, np.nan)

    lo, hi = _percentiles(_resample_stat(n, int(n_resamples), seed, stat), confidence)
    return Interval(ratio, lo, hi, n)
