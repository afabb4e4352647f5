"""Two sources of noise: the training seed and the test studies.

A benchmark row trained with several training seeds has one score per seed, each measured on the same
test studies. Its interval should cover a rerun of training as well as another draw of test studies,
and a test between two rows should ask whether their gap survives both. The method here is a two-level
bootstrap, paired across the systems compared:

1. the studies are resampled with replacement (the weights of `stats.bootstrap_weights`, the same draw
   for every system and seed, since all were scored on the same studies), and every seed's metric is
   recomputed on each resample;
2. the seeds are resampled with replacement (the same seed indices for every system: a row's seed k
   shares its training seed, and in MambaXray-VL's chain its upstream runs, with the other rows' seed k),
   and the replicate is the mean over the drawn seeds.

With few seeds, drawing S of S with replacement understates the variance of a mean by (S - 1) / S (the
plug-in bootstrap's bias; with 3 seeds a third). Each replicate's deviation from the mean over all seeds
is therefore scaled by sqrt(S / (S - 1)), which makes the seed part of the replicates' variance the
unbiased s^2 / S. With one seed there is no seed level: the replicates are the studies' alone, and
`seeds` in every result says so.

The p-value of a gap is the paired bootstrap's (`stats.bootstrap_p_value`: the replicated gaps shifted to
mean zero, as extreme as the observed gap); a family of such tests is corrected by Holm's step-down method
(`stats.holm`), which controls the family-wise error without assuming the tests independent (they are not:
every pair shares studies, and many share a system).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from cxpmrg_lib.metrics.stats import bootstrap_p_value, bootstrap_weights, percentile_ci
from cxpmrg_lib.metrics.suite import StudyStats

__all__ = ["seed_replicates", "replicate_ci", "compare_replicates", "gap_test", "seed_mean"]


def _check(per_seed: Sequence[StudyStats]) -> None:
    if not per_seed:
        raise ValueError("no seeds: a system needs at least one scored seed")
    first = per_seed[0]
    for st in per_seed[1:]:
        if st.n != first.n or st.references != first.references:
            raise ValueError("every seed must be scored on the same references in the same order")


def seed_mean(per_seed: Sequence[StudyStats], metric: str) -> float:
    """The point estimate: the mean over seeds of each seed's score on all the studies."""
    _check(per_seed)
    return float(np.mean([st.values[metric] for st in per_seed]))


def _seed_draws(n_seeds: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot x n_seeds) seed indices drawn with replacement, the same for every system of one comparison."""
    rng = np.random.default_rng([seed, 7919])      # a stream of its own, apart from the studies' weights
    return rng.integers(0, n_seeds, size=(n_boot, n_seeds))


def seed_replicates(per_seed: Sequence[StudyStats], metric: str, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """n_boot two-level replicates of the seed-mean of `metric` (module docstring): studies resampled, then
    seeds, with the small-sample scaling of the seed deviations. Same `seed`, same draws: replicates of two
    systems with as many seeds are paired (their difference is the gap's replicate)."""
    _check(per_seed)
    n_seeds = len(per_seed)
    per_study = np.stack([np.concatenate([st.resample(w)[metric] for w in bootstrap_weights(st.n, n_boot, seed)])
                          for st in per_seed])                  # (seeds x n_boot): each seed on each resample
    if n_seeds == 1:
        return per_study[0]
    centre = per_study.mean(axis=0)
    draws = _seed_draws(n_seeds, n_boot, seed)
    drawn = np.take_along_axis(per_study.T, draws, axis=1).mean(axis=1)
    return centre + np.sqrt(n_seeds / (n_seeds - 1)) * (drawn - centre)


def replicate_ci(per_seed: Sequence[StudyStats], metric: str, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """The percentile (1 - alpha) interval of the seed-mean over both sources of noise."""
    return percentile_ci(seed_replicates(per_seed, metric, n_boot, seed), alpha)


def compare_replicates(a: Sequence[StudyStats], b: Sequence[StudyStats], metric: str, n_boot: int = 1000,
                       seed: int = 0, alpha: float = 0.05) -> dict:
    """A against B over seeds and studies: the gap of the seed-means, its interval and two-sided p-value,
    and in how many seeds A scored above B (seed k against seed k).

    Both need the same number of seeds (pair them by training seed first); with one seed each this is the
    studies-only paired bootstrap."""
    if len(a) != len(b):
        raise ValueError(f"a paired comparison needs as many seeds on both sides, not {len(a)} and {len(b)}")
    _check(list(a) + list(b))
    return gap_test(seed_replicates(a, metric, n_boot, seed), seed_replicates(b, metric, n_boot, seed),
                    [x.values[metric] for x in a], [y.values[metric] for y in b], alpha) | {"metric": metric}


def gap_test(replicates_a: np.ndarray, replicates_b: np.ndarray, seeds_a: Sequence[float],
             seeds_b: Sequence[float], alpha: float = 0.05) -> dict:
    """The comparison of compare_replicates from paired replicates (seed_replicates with one `seed`) and
    each side's per-seed scores, in training-seed order: for a table of many pairs, each system's
    replicates are made once."""
    if len(seeds_a) != len(seeds_b) or len(replicates_a) != len(replicates_b):
        raise ValueError("both sides need as many seeds and as many replicates")
    delta = float(np.mean(seeds_a) - np.mean(seeds_b))
    gaps = np.asarray(replicates_a, dtype=np.float64) - np.asarray(replicates_b, dtype=np.float64)
    per_seed = [float(x - y) for x, y in zip(seeds_a, seeds_b)]
    return {"seeds": len(per_seed), "delta": delta, "ci_delta": percentile_ci(gaps, alpha),
            "p_value": float("nan") if np.isnan(delta) else bootstrap_p_value(gaps, delta),
            "seed_deltas": per_seed, "a_above": int(sum(d > 0 for d in per_seed)),
            "b_above": int(sum(d < 0 for d in per_seed))}
