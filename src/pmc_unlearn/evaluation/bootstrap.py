"""Bootstrap confidence intervals over examples: pure functions (numpy only, fixed seed).

`bootstrap_interval(groups, statistic)` resamples each group of per-example values with
replacement (independently, same size as the group), recomputes the statistic on every
resample and returns the percentile interval: the (1 - level)/2 and (1 + level)/2 quantiles
of the resampled statistics (empirical quantiles, numpy's `inverted_cdf`: every bound is a value
some resample produced). The TOFU summary's intervals (`evaluation.intervals`) use the same. One group for a mean over examples
(VerbMem, KnowMem); two for a statistic of two samples (PrivLeak: forget and holdout scores).
The generator is numpy's default_rng(seed), so the same values and seed give the same interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

N_RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def percentile_interval(stats: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """(lo, hi) quantiles of the statistics at (1 - level)/2 and (1 + level)/2; non-finite values ignored (NaN if all are)."""
    a = np.asarray(stats, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(a, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(lo), float(hi)


def bootstrap_interval(
    groups: Sequence[Sequence[float]],
    statistic: Callable[..., float] = lambda x: float(np.mean(x)),
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(*groups); NaN when a group is empty."""
    if not 0 < level < 1:
        raise ValueError(f"level {level}: must be in (0, 1)")
    arrs = [np.asarray(g, dtype=np.float64) for g in groups]
    if not arrs or any(a.size == 0 for a in arrs):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_resamples):
        stats.append(statistic(*[a[rng.integers(0, a.size, a.size)] for a in arrs]))
    return percentile_interval(stats, level)
