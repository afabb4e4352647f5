"""Resampling over studies: bootstrap weights, percentile intervals, paired-test p-values.

Every metric is a function of per-study statistics summed over the studies (a mean is a
sum divided by n), so a bootstrap resample is a row of multiplicities w (how many times
each study was drawn) and its statistics are w @ S. Drawing an index matrix and turning
each row into counts with one `bincount` keeps this vectorised; rows are made in blocks
so that 10,000 studies x 1,000 resamples never needs more than a few MB at once.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = ["bootstrap_weights", "swap_masks", "percentile_ci", "bootstrap_p_value", "permutation_p_value",
           "holm", "ALTERNATIVES"]

ALTERNATIVES = ("two-sided", "greater", "less")
BLOCK = 128  # resamples per block


def bootstrap_weights(n: int, n_boot: int, seed: int = 0, block: int = BLOCK) -> Iterator[np.ndarray]:
    """Yield (m x n) float arrays of bootstrap multiplicities, n_boot rows in all.

    The draws depend only on (n, n_boot, seed): the same seed gives the same resamples,
    which is what makes the CIs of different metrics and the paired test comparable.
    """
    if n < 1:
        raise ValueError("cannot resample an empty set of studies")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, block):
        m = min(block, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        idx += (np.arange(m) * n)[:, None]
        yield np.bincount(idx.ravel(), minlength=m * n).reshape(m, n).astype(np.float64)


def swap_masks(n: int, n_perm: int, seed: int = 0, block: int = BLOCK) -> Iterator[np.ndarray]:
    """Yield (m x n) 0/1 arrays: 1 where a study's two systems swap (approximate randomisation)."""
    if n < 1:
        raise ValueError("cannot permute an empty set of studies")
    if n_perm < 1:
        raise ValueError(f"the number of permutations must be at least 1, got {n_perm}")
    rng = np.random.default_rng(seed)
    for start in range(0, n_perm, block):
        m = min(block, n_perm - start)
        yield rng.integers(0, 2, size=(m, n)).astype(np.float64)


def percentile_ci(values: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval of the resampled values (NaN where nothing was computed)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")


def bootstrap_p_value(deltas: np.ndarray, delta: float, alternative: str = "two-sided") -> float:
    """Paired bootstrap p-value: the resampled deltas, shifted to mean zero under H0
    (deltas - delta), as extreme as the observed delta (Berg-Kirkpatrick et al. 2012
    count resamples with delta_b > 2 delta; the same thing)."""
    _check_alternative(alternative)
    null = np.asarray(deltas, dtype=np.float64) - delta
    return _p(null, delta, alternative)


def permutation_p_value(perm_deltas: np.ndarray, delta: float, alternative: str = "two-sided") -> float:
    """Approximate-randomisation p-value: permuted deltas as extreme as the observed one."""
    _check_alternative(alternative)
    return _p(np.asarray(perm_deltas, dtype=np.float64), delta, alternative)


def _p(null: np.ndarray, delta: float, alternative: str) -> float:
    # A tiny tolerance so that ties produced by rounding count as "as extreme".
    eps = 1e-12 * max(1.0, abs(delta))
    if alternative == "greater":
        hits = np.sum(null >= delta - eps)
    elif alternative == "less":
        hits = np.sum(null <= delta + eps)
    else:
        hits = np.sum(np.abs(null) >= abs(delta) - eps)
    # (hits + 1) / (R + 1): never exactly 0, valid for a finite number of resamples.
    return float((hits + 1) / (null.size + 1))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (same order out; NaN stays NaN and is not
    counted in the family). The k-th smallest of m is multiplied by m - k + 1, then made monotone, so an
    adjusted p below alpha rejects with family-wise error at most alpha, under any dependence between the
    tests (Holm 1979)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    order = np.argsort(p[ok], kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[ok][order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    out[ok] = adjusted
    return out
