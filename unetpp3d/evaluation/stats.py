"""Confidence intervals for per-case scores: cluster bootstrap, paired differences, t over folds, rank correlation.

Scores of nodules from one patient are not independent (same scanner, same reader, often the
same kind of nodule), so the bootstrap resamples *patients* with replacement and takes the mean
over all their nodules (a cluster bootstrap; with one nodule per group it is the ordinary
bootstrap over cases). Paired differences between two models are bootstrapped the same way, on
the per-case differences, so the interval reflects that both models saw the same cases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _stats


@dataclass
class Interval:
    """A mean with its confidence interval.

    Attributes:
        mean: the point estimate (mean over cases).
        low: lower bound.
        high: upper bound.
        n: number of cases.
        groups: number of independent groups (patients, folds) the interval rests on.
        method: how the interval was computed.
    """

    mean: float
    low: float
    high: float
    n: int
    groups: int
    method: str

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self, scale: float = 1.0, digits: int = 1) -> str:
        """``"77.2 [75.0, 79.3]"`` with values multiplied by ``scale``."""
        if math.isnan(self.mean):
            return "n/a"
        return f"{self.mean * scale:.{digits}f} [{self.low * scale:.{digits}f}, {self.high * scale:.{digits}f}]"


def bootstrap_mean(values: Sequence[float], groups: Sequence | None = None, n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> Interval:
    """Mean of ``values`` with a percentile bootstrap interval, resampling whole groups.

    Args:
        values: one score per case (NaN cases are left out).
        groups: one group key per case (e.g. the patient); None treats every case as its own group.
        n_boot: bootstrap resamples.
        level: confidence level.
        seed: seed of the resampling, so that a table is reproducible.

    Returns:
        The :class:`Interval` (NaN bounds when there are no cases; equal bounds with one group).
    """
    v = np.asarray(values, dtype=np.float64)
    g = np.arange(len(v)) if groups is None else np.asarray(groups)
    keep = ~np.isnan(v)
    v, g = v[keep], g[keep]
    if len(v) == 0:
        return Interval(math.nan, math.nan, math.nan, 0, 0, "cluster bootstrap")
    _, inverse = np.unique(g, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    sums = np.bincount(inverse, weights=v, minlength=n_groups)
    counts = np.bincount(inverse, minlength=n_groups).astype(np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_groups, size=(n_boot, n_groups))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Interval(float(v.mean()), float(low), float(high), int(len(v)), n_groups,
                    f"{level:.0%} percentile bootstrap over {n_groups} {'patients' if groups is not None else 'cases'}"
                    f", {n_boot} resamples")


def paired_difference(a: Sequence[float], b: Sequence[float], groups: Sequence | None = None, n_boot: int = 2000,
                      level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of ``a - b`` over the same cases, with the cluster bootstrap interval of :func:`bootstrap_mean`."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same cases, got {a.shape} and {b.shape}")
    return bootstrap_mean(a - b, groups, n_boot, level, seed)


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean with Student's t interval, e.g. over the means of cross-validation folds."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) < 2:
        m = float(v.mean()) if len(v) else math.nan
        return Interval(m, math.nan, math.nan, int(len(v)), int(len(v)), "t interval (needs 2 values)")
    half = float(_stats.t.ppf(0.5 + level / 2.0, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return Interval(float(v.mean()), float(v.mean()) - half, float(v.mean()) + half, int(len(v)), int(len(v)),
                    f"{level:.0%} t interval over {len(v)} values")


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Spearman's rank correlation of paired values (NaN pairs left out): ``{"rho", "p", "n"}``."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = ~(np.isnan(x) | np.isnan(y))
    if keep.sum() < 3:
        return {"rho": math.nan, "p": math.nan, "n": int(keep.sum())}
    result = _stats.spearmanr(x[keep], y[keep])
    return {"rho": float(result.statistic), "p": float(result.pvalue), "n": int(keep.sum())}
