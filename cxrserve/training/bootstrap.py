"""Percentile bootstrap confidence intervals of any metric, optionally by cluster (patient).

The metric is any function of equally long arrays that returns a number or ``None``
(:mod:`cxrserve.training.metrics` follows that convention); a replicate where it is
undefined (e.g. an AUC on a one-class resample) is dropped and counted, not turned into NaN.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np


def bootstrap_ci(
    metric_fn: Callable[..., Any],
    *arrays: Any,
    n: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    groups: Any = None,
) -> dict:
    """Percentile bootstrap confidence interval of ``metric_fn(*arrays)``.

    Each replicate resamples indices with replacement and calls ``metric_fn`` on the
    indexed arrays (all indexed alike). With ``groups`` (e.g. patient ids, one per
    sample) whole groups are resampled (cluster bootstrap): draw as many groups as
    there are, with replacement, and take all samples of each drawn group. Replicates
    where the metric is None or NaN (e.g. AUC on a one-class resample) are dropped and
    counted.

    Args:
        metric_fn: function of the arrays returning a number (or None).
        *arrays: equally long array-likes.
        n: number of bootstrap replicates.
        alpha: 1 - confidence level (0.05 -> 95% interval).
        seed: RNG seed.
        groups: optional group id per sample.

    Returns:
        ``{"estimate", "low", "high", "alpha", "n_boot", "n_valid"}``; ``low``/``high``
        are None when no replicate gave a value.
    """
    arrs = [np.asarray(a) for a in arrays]
    if not arrs:
        raise ValueError("need at least one array")
    size = arrs[0].shape[0]
    if any(a.shape[0] != size for a in arrs):
        raise ValueError("arrays must have equal length")
    estimate = metric_fn(*arrs)
    rng = np.random.default_rng(seed)
    if groups is not None:
        g = np.asarray(groups)
        if g.shape[0] != size:
            raise ValueError("groups must have one entry per sample")
        _, inverse = np.unique(g, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.r_[0, np.cumsum(np.bincount(inverse))]
        members = [order[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
    values = []
    for _ in range(n):
        if groups is None:
            idx = rng.integers(0, size, size)
        else:
            pick = rng.integers(0, len(members), len(members))
            idx = np.concatenate([members[i] for i in pick])
        v = metric_fn(*(a[idx] for a in arrs))
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            values.append(v)
    if values:
        low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
        low, high = float(low), float(high)
    else:
        low = high = None
    return {
        "estimate": None if estimate is None else float(estimate),
        "low": low, "high": high, "alpha": alpha, "n_boot": n, "n_valid": len(values),
    }
