"""Statistics for evaluation results: bootstrap confidence intervals and paired comparisons.

- :func:`bootstrap_ci`: percentile bootstrap over samples (resample the per-sample values with
  replacement, recompute the statistic, take the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles).
- :func:`paired_bootstrap`: two runs scored on the **same** samples (``a[i]`` and ``b[i]`` belong to
  sample ``i``); the same resample indices are applied to both, giving a CI for
  ``delta = stat(b) - stat(a)`` and a two-sided bootstrap p-value (centred: the share of resampled
  deltas at least as far from the observed delta as the observed delta is from 0).
- :func:`cluster_bootstrap_cis`: percentile bootstrap of several statistics of clustered data (e.g.
  the per-finding questions of one image): each replicate draws the clusters with replacement and the
  statistics are recomputed from the clusters' multiplicities, so correlated items move together.
- :func:`two_sample_bootstrap`: two **different** sets of samples (e.g. one model on a zero-shot split
  and on an in-distribution split): each replicate resamples each set on its own, giving a CI for
  ``delta = stat(b) - stat(a)`` and the same centred two-sided p-value. Unpaired, so wider than a
  paired CI would be; use it only where no sample is in both.
- :func:`permutation_test`: paired two-sided permutation test of ``stat(b) - stat(a)``: each sample's
  pair is swapped at random (a sign flip of the per-sample difference for the mean);
  ``p = (1 + #{|T*| >= |T|}) / (1 + n_resamples)``.

Everything is seeded (``numpy.random.default_rng(seed)``) and vectorised; resamples are drawn in
chunks so memory stays bounded for 100k samples. ``stat`` must accept an ``axis`` keyword like
``numpy.mean`` / ``numpy.median``; other callables are applied row by row (slower).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

Stat = Callable[..., Any]

_CHUNK_ELEMENTS = 1 << 22  # values drawn per chunk (4M: ~32 MB of indices)


def _as_values(values: ArrayLike, name: str = "values") -> NDArray[np.float64]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _check_resamples(n_resamples: int) -> None:
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")


def _percentiles(reps: ArrayLike, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates."""
    lo, hi = np.quantile(np.asarray(reps), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _stat_of(stat: Stat, values: NDArray[np.float64]) -> float:
    """``stat`` of one sample."""
    return float(_apply(stat, values[None, :])[0])


def _apply(stat: Stat, rows: NDArray[np.float64]) -> NDArray[np.float64]:
    """``stat`` of each row of a 2-D array."""
    try:
        out = np.asarray(stat(rows, axis=1), dtype=np.float64)
        if out.shape == (rows.shape[0],):
            return out
    except TypeError:
        pass
    return np.array([float(stat(r)) for r in rows], dtype=np.float64)


def _chunks(n_resamples: int, n: int) -> list[int]:
    size = max(1, _CHUNK_ELEMENTS // max(n, 1))
    return [min(size, n_resamples - start) for start in range(0, n_resamples, size)]


def _index_dtype(n: int) -> type[np.integer[Any]]:
    return np.int32 if n < 2**31 else np.int64


def bootstrap_distribution(
    values: ArrayLike, stat: Stat = np.mean, n_resamples: int = 2000, seed: int = 0
) -> NDArray[np.float64]:
    """The ``n_resamples`` bootstrap replicates of ``stat(values)``."""
    arr = _as_values(values)
    _check_resamples(n_resamples)
    rng = np.random.default_rng(seed)
    n = arr.size
    out = []
    for size in _chunks(n_resamples, n):
        idx = rng.integers(0, n, size=(size, n), dtype=_index_dtype(n))
        out.append(_apply(stat, arr[idx]))
    return np.concatenate(out)


def bootstrap_ci(
    values: ArrayLike,
    stat: Stat = np.mean,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval ``(lo, hi)`` of ``stat(values)``."""
    _check_level(level)
    reps = bootstrap_distribution(values, stat, n_resamples, seed)
    return _percentiles(reps, level)


DIRECT_BOOTSTRAP_LIMIT = 20_000_000  # values resampled (n x resamples) before the level-count shortcut
MAX_LEVELS = 1024  # distinct values up to which the shortcut applies


def bootstrap_mean_ci(
    values: ArrayLike, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean, fast for large inputs with few distinct values.

    Small inputs go to :func:`bootstrap_ci` (resampled indices). When that gets costly (``n *
    n_resamples`` over :data:`DIRECT_BOOTSTRAP_LIMIT`) and the values take few distinct levels (0/1
    accuracies, token scores), the same bootstrap is drawn through the levels: resampling ``n`` values
    with replacement puts ``Multinomial(n, level frequencies)`` counts on them, so each replicate mean
    costs the same whatever ``n``. The replicates have exactly the distribution of the index bootstrap
    (not the same random stream); the percentile rule is the same.
    """
    _check_level(level)
    arr = np.asarray(values, dtype=np.float64)
    levels, counts = np.unique(arr, return_counts=True)
    if arr.size * n_resamples <= DIRECT_BOOTSTRAP_LIMIT or levels.size > MAX_LEVELS:
        return bootstrap_ci(arr, n_resamples=n_resamples, seed=seed, level=level)
    if not np.all(np.isfinite(levels)):
        raise ValueError("values contain NaN or infinite values")
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(arr.size, counts / arr.size, size=n_resamples)
    means = draws @ levels / arr.size
    return _percentiles(means, level)


def bootstrap_cis(
    values_by_metric: Mapping[str, ArrayLike],
    stat: Stat = np.mean,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """:func:`bootstrap_ci` of each metric's per-sample values (metrics without values are left out)."""
    return {
        name: bootstrap_ci(vals, stat, n_resamples, seed, level)
        for name, vals in values_by_metric.items()
        if np.asarray(vals).size
    }


ClusterStat = Callable[[NDArray[np.int64]], Mapping[str, float]]


def cluster_bootstrap_cis(
    n_clusters: int,
    stat: ClusterStat,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs of the statistics ``stat`` returns, resampling whole clusters.

    Each replicate draws ``n_clusters`` cluster indices with replacement and calls ``stat`` with the
    multiplicity of every cluster (an ``int64`` array of length ``n_clusters`` summing to it), which
    returns ``{metric: value}``. A metric that a replicate leaves out (undefined there, e.g. an AUC of
    a resample without positives) gets no value from that replicate; its interval comes from the
    replicates that define it (none: no interval).
    """
    _check_level(level)
    if n_clusters < 1:
        raise ValueError("no clusters")
    _check_resamples(n_resamples)
    rng = np.random.default_rng(seed)
    reps: dict[str, list[float]] = {}
    for _ in range(n_resamples):
        counts = np.bincount(rng.integers(0, n_clusters, size=n_clusters), minlength=n_clusters)
        for name, value in stat(counts.astype(np.int64)).items():
            reps.setdefault(name, []).append(float(value))
    return {name: _percentiles(values, level) for name, values in reps.items()}


@dataclass(frozen=True, slots=True)
class PairedComparison:
    """``delta = stat(b) - stat(a)`` on the same ``n`` samples, its bootstrap CI and p-value."""

    n: int
    stat_a: float
    stat_b: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    level: float
    method: str = "paired percentile bootstrap"

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "a": self.stat_a,
            "b": self.stat_b,
            "delta": self.delta,
            "ci": [self.ci_low, self.ci_high],
            "p_value": self.p_value,
            "level": self.level,
            "method": self.method,
        }


def _paired_arrays(a: ArrayLike, b: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    xa, xb = _as_values(a, "a"), _as_values(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"paired samples differ in length: {xa.size} vs {xb.size}")
    return xa, xb


def _interval_and_p(d: np.ndarray, delta: float, level: float) -> tuple[float, float, float]:
    """Percentile interval of bootstrap differences ``d`` and the two-sided p-value of ``delta`` (the
    share of resampled differences at least as far from ``delta`` as zero is, with +1 smoothing)."""
    lo, hi = _percentiles(d, level)
    tol = 1e-12 * max(1.0, abs(delta))
    extreme = np.count_nonzero(np.abs(d - delta) >= abs(delta) - tol)
    return lo, hi, float(min(1.0, (1 + extreme) / (1 + d.size)))


def _bootstrap_delta(
    xa: NDArray[np.float64],
    xb: NDArray[np.float64],
    stat: Stat,
    n_resamples: int,
    seed: int,
    level: float,
    *,
    paired: bool,
) -> tuple[float, float, float, float, float, float, float]:
    """``stat(a)``, ``stat(b)``, ``delta = stat(b) - stat(a)``, its percentile interval, p-value and
    ``level``; each replicate resamples both, with the same indices when ``paired``."""
    _check_level(level)
    _check_resamples(n_resamples)
    sa, sb = _stat_of(stat, xa), _stat_of(stat, xb)
    delta = sb - sa
    rng = np.random.default_rng(seed)
    reps = []
    for size in _chunks(n_resamples, max(xa.size, xb.size)):
        ia = rng.integers(0, xa.size, size=(size, xa.size), dtype=_index_dtype(xa.size))
        ib = ia if paired else rng.integers(0, xb.size, size=(size, xb.size), dtype=_index_dtype(xb.size))
        reps.append(_apply(stat, xb[ib]) - _apply(stat, xa[ia]))
    lo, hi, p = _interval_and_p(np.concatenate(reps), delta, level)
    return sa, sb, delta, lo, hi, p, level


def paired_bootstrap(
    a: ArrayLike,
    b: ArrayLike,
    stat: Stat = np.mean,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedComparison:
    """Paired bootstrap of ``stat(b) - stat(a)``: the same resampled sample indices for both runs."""
    xa, xb = _paired_arrays(a, b)
    return PairedComparison(xa.size, *_bootstrap_delta(xa, xb, stat, n_resamples, seed, level, paired=True))


def permutation_test(
    a: ArrayLike,
    b: ArrayLike,
    stat: Stat = np.mean,
    n_resamples: int = 10000,
    seed: int = 0,
) -> float:
    """Two-sided paired permutation p-value for ``stat(b) - stat(a)`` (random swaps within pairs)."""
    _check_resamples(n_resamples)
    xa, xb = _paired_arrays(a, b)
    n = xa.size
    rng = np.random.default_rng(seed)
    is_mean = stat is np.mean
    observed = abs(_stat_of(stat, xb) - _stat_of(stat, xa))
    tol = 1e-12 * max(1.0, observed)
    diff = xb - xa
    extreme = 0
    for size in _chunks(n_resamples, n):
        swap = rng.random((size, n)) < 0.5
        if is_mean:
            t = np.abs(np.where(swap, -diff, diff).mean(axis=1))
        else:
            pa, pb = np.where(swap, xb, xa), np.where(swap, xa, xb)
            t = np.abs(_apply(stat, pb) - _apply(stat, pa))
        extreme += int(np.count_nonzero(t >= observed - tol))
    return (1 + extreme) / (1 + n_resamples)


@dataclass(frozen=True)
class TwoSampleComparison:
    """``delta = stat(b) - stat(a)`` on two independent sets of samples, its bootstrap CI and p-value."""

    n_a: int
    n_b: int
    stat_a: float
    stat_b: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    level: float
    method: str = "two-sample percentile bootstrap (each set resampled on its own)"


def two_sample_bootstrap(
    a: ArrayLike,
    b: ArrayLike,
    stat: Stat = np.mean,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> TwoSampleComparison:
    """Unpaired bootstrap of ``stat(b) - stat(a)``: ``a`` and ``b`` are resampled independently."""
    xa, xb = _as_values(a, "a"), _as_values(b, "b")
    return TwoSampleComparison(
        xa.size, xb.size, *_bootstrap_delta(xa, xb, stat, n_resamples, seed, level, paired=False)
    )
