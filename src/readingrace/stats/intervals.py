"""Confidence intervals for ROC-AUC and proportions: DeLong and a patient-clustered bootstrap.

Two families, both for a binary (one-vs-rest) problem given as arrays:

* **DeLong** (:func:`delong_auc`, :func:`delong_paired`): the AUC's variance from its structural
  components, computed with midranks (Sun & Xu 2014, "fast DeLong"; ties count 1/2), so it costs
  three rankings, O(n log n), and runs at 10^6 rows. It treats every row as independent: with several
  images per patient it ignores that clustering and its interval is too narrow.
* **Patient-clustered stratified percentile bootstrap** (:func:`cluster_bootstrap_auc`,
  :func:`paired_cluster_bootstrap_auc`, and the engine :func:`bootstrap_multiplicities` +
  :class:`WeightedAUC`): patients, not images, are drawn with replacement, within strata (the label of
  the patient's first image) so every replicate keeps both classes where possible. A replicate is a
  vector of patient multiplicities; the AUC under those integer weights is a rank statistic, computed
  for a chunk of replicates at once by gathers and one cumulative sum over the sorted scores.

No torch here: numpy, scipy and pandas only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from readingrace.errors import ConfigError

DEFAULT_SEED = 2021
DEFAULT_N_BOOTSTRAP = 1000
DEFAULT_LEVEL = 0.95
#: Replicates drawn per random stream. Fixed (never tuned to memory) so a seed gives the same
#: replicates on every machine; each chunk has its own child of ``SeedSequence(seed)``.
CHUNK_REPLICATES = 32

Transform = Literal["logit", "none"]

__all__ = [
    "BootstrapResult", "DeLongResult", "PairedDeLongResult", "WeightedAUC",
    "auc_midrank", "bootstrap_multiplicities", "bootstrap_replicates", "check_options",
    "cluster_bootstrap_auc", "cluster_codes", "delong_auc", "delong_paired",
    "paired_cluster_bootstrap_auc", "percentile_ci", "two_sided_p",
]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def check_options(*, level: float | None = None, n_bootstrap: int | None = None) -> None:
    """Raise :class:`ConfigError` for a confidence level outside (0, 1) or a negative replicate count."""
    if level is not None and not (isinstance(level, (int, float)) and 0.0 < float(level) < 1.0):
        raise ConfigError(f"confidence level must be between 0 and 1 (e.g. 0.95), got {level!r}")
    if n_bootstrap is not None and (
        isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, (int, np.integer)) or n_bootstrap < 0
    ):
        raise ConfigError(f"n_bootstrap must be a non-negative integer (e.g. 1000), got {n_bootstrap!r}")


def _binary(y_true: ArrayLike) -> NDArray[np.bool_]:
    """Labels as a boolean vector (accepts bool or 0/1)."""
    y = np.asarray(y_true)
    if y.dtype == bool:
        return y.ravel()
    uniq = np.unique(y)
    if not np.isin(uniq, [0, 1]).all():
        raise ValueError(f"binary labels must be bool or 0/1, got values {uniq[:5].tolist()}")
    return (y == 1).ravel()


def _scores(score: ArrayLike, n: int) -> NDArray[np.float64]:
    s = np.asarray(score, dtype=np.float64).ravel()
    if s.shape[0] != n:
        raise ValueError(f"{s.shape[0]} scores for {n} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return s


def _z(level: float) -> float:
    return float(stats.norm.ppf(0.5 + level / 2.0))


def two_sided_p(estimate: float, null: float, se: float) -> float:
    """Two-sided normal p-value of ``estimate`` against ``null``; always in [0, 1] (NaN if undefined).

    A zero standard error gives 1 when the estimate equals the null and 0 otherwise.
    """
    if not (math.isfinite(estimate) and math.isfinite(se)):
        return math.nan
    if se <= 0.0:
        return 1.0 if estimate == null else 0.0
    p = 2.0 * float(stats.norm.sf(abs(estimate - null) / se))
    return min(1.0, max(0.0, p))


def _wald(est: float, se: float, z: float, lo: float, hi: float) -> tuple[float, float]:
    if not (math.isfinite(est) and math.isfinite(se)):
        return (math.nan, math.nan)
    return (min(hi, max(lo, est - z * se)), min(hi, max(lo, est + z * se)))


def _auc_interval(auc: float, se: float, z: float, transform: Transform) -> tuple[float, float]:
    """Wald interval on the logit scale (default) or the plain scale, within [0, 1]."""
    if transform not in ("logit", "none"):
        raise ConfigError(f"DeLong transform must be 'logit' or 'none', got {transform!r}")
    if transform == "none" or not (0.0 < auc < 1.0) or not se > 0.0:
        return _wald(auc, se, z, 0.0, 1.0)
    centre = math.log(auc / (1.0 - auc))
    half = z * se / (auc * (1.0 - auc))
    return (float(stats.logistic.cdf(centre - half)), float(stats.logistic.cdf(centre + half)))


def auc_midrank(y_true: ArrayLike, score: ArrayLike) -> float:
    """ROC-AUC by the Mann-Whitney statistic with midranks (ties count 1/2); NaN if a class is empty."""
    y = _binary(y_true)
    s = _scores(score, y.shape[0])
    m = int(y.sum())
    n = y.shape[0] - m
    if m == 0 or n == 0:
        return math.nan
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() / m - (m + 1) / 2.0) / n)


# --------------------------------------------------------------------------------------------
# DeLong
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeLongResult:
    """DeLong AUC estimate; ``p_value`` tests AUC = 0.5 (two-sided)."""

    auc: float
    se: float
    ci: tuple[float, float]
    p_value: float
    n_positive: int
    n_negative: int
    level: float
    transform: str


@dataclass(frozen=True)
class PairedDeLongResult:
    """Paired DeLong comparison of two score sets on the same rows; ``difference = auc_a - auc_b``."""

    auc_a: float
    auc_b: float
    difference: float
    se: float
    ci: tuple[float, float]
    p_value: float
    correlation: float
    n_positive: int
    n_negative: int
    level: float


def _delong_components(
    y: NDArray[np.bool_], scores: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """AUCs (k,), and the structural components V10 (k, m) and V01 (k, n) of k score rows.

    With midranks Tx (within positives), Ty (within negatives) and Tz (pooled):
    V10_i = (Tz_i - Tx_i) / n, V01_j = 1 - (Tz_j - Ty_j) / m, AUC = mean(V10) = mean(V01).
    """
    pos = scores[:, y]
    neg = scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    tx = stats.rankdata(pos, axis=1)
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return v10.mean(axis=1), v10, v01


def _delong_cov(v10: NDArray[np.float64], v01: NDArray[np.float64]) -> NDArray[np.float64]:
    m, n = v10.shape[1], v01.shape[1]
    if m < 2 or n < 2:
        k = v10.shape[0]
        return np.full((k, k), math.nan)
    s10 = np.atleast_2d(np.cov(v10))
    s01 = np.atleast_2d(np.cov(v01))
    return s10 / m + s01 / n


def delong_auc(
    y_true: ArrayLike, score: ArrayLike, *, level: float = DEFAULT_LEVEL, transform: Transform = "logit"
) -> DeLongResult:
    """AUC with its DeLong standard error, a Wald interval and a p-value against AUC = 0.5.

    The interval is built on the logit scale by default (``transform="logit"``: it stays inside
    (0, 1) and covers better near AUC 0.9-1); ``"none"`` gives AUC +- z*SE clipped to [0, 1]. An AUC
    of exactly 0 or 1 has SE 0 and the interval (AUC, AUC). A class with fewer than two rows gives a
    NaN SE. The rows are taken as independent (no patient clustering).
    """
    check_options(level=level)
    y = _binary(y_true)
    s = _scores(score, y.shape[0])
    m = int(y.sum())
    n = y.shape[0] - m
    if m == 0 or n == 0:
        return DeLongResult(math.nan, math.nan, (math.nan, math.nan), math.nan, m, n, level, transform)
    aucs, v10, v01 = _delong_components(y, s[None, :])
    auc = float(aucs[0])
    var = float(_delong_cov(v10, v01)[0, 0])
    se = math.sqrt(max(var, 0.0)) if math.isfinite(var) else math.nan
    ci = _auc_interval(auc, se, _z(level), transform)
    return DeLongResult(auc, se, ci, two_sided_p(auc, 0.5, se), m, n, level, transform)


def delong_paired(
    y_true: ArrayLike, score_a: ArrayLike, score_b: ArrayLike, *, level: float = DEFAULT_LEVEL
) -> PairedDeLongResult:
    """Paired DeLong test of AUC(a) - AUC(b) for two score sets on the same rows.

    Var(diff) = Var(a) + Var(b) - 2 Cov(a, b) from the joint structural components; the interval is
    the Wald interval clipped to [-1, 1]; the p-value tests a zero difference (two-sided).
    """
    check_options(level=level)
    y = _binary(y_true)
    sa = _scores(score_a, y.shape[0])
    sb = _scores(score_b, y.shape[0])
    m = int(y.sum())
    n = y.shape[0] - m
    if m == 0 or n == 0:
        nan = math.nan
        return PairedDeLongResult(nan, nan, nan, nan, (nan, nan), nan, nan, m, n, level)
    aucs, v10, v01 = _delong_components(y, np.vstack([sa, sb]))
    cov = _delong_cov(v10, v01)
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1])
    se = math.sqrt(max(var, 0.0)) if math.isfinite(var) else math.nan
    denom = math.sqrt(cov[0, 0] * cov[1, 1]) if math.isfinite(var) else math.nan
    corr = float(cov[0, 1] / denom) if denom and math.isfinite(denom) and denom > 0 else math.nan
    ci = _wald(diff, se, _z(level), -1.0, 1.0)
    return PairedDeLongResult(
        float(aucs[0]), float(aucs[1]), diff, se, ci, two_sided_p(diff, 0.0, se), corr, m, n, level
    )


# --------------------------------------------------------------------------------------------
# bootstrap engine
# --------------------------------------------------------------------------------------------
def cluster_codes(clusters: ArrayLike | None, n: int) -> tuple[NDArray[np.intp], int, NDArray[np.intp]]:
    """Cluster ids -> (code per row, number of clusters, row index of each cluster's first row).

    ``None`` makes every row its own cluster. Codes follow the order of first appearance.
    """
    if clusters is None:
        codes = np.arange(n, dtype=np.intp)
        return codes, n, codes.copy()
    arr = np.asarray(clusters, dtype=object).ravel()
    if arr.shape[0] != n:
        raise ValueError(f"{arr.shape[0]} cluster ids for {n} rows")
    codes, uniques = pd.factorize(arr, use_na_sentinel=False)
    codes = codes.astype(np.intp)
    _, first = np.unique(codes, return_index=True)
    return codes, len(uniques), first.astype(np.intp)


def bootstrap_multiplicities(
    strata: ArrayLike, *, n_bootstrap: int = DEFAULT_N_BOOTSTRAP, seed: int = DEFAULT_SEED
) -> Iterator[NDArray[np.float64]]:
    """Yield chunks (b, n_clusters) of cluster multiplicities for a stratified bootstrap.

    ``strata`` has one entry per cluster (e.g. the label of the patient's first image). Within each
    stratum of size k, a replicate draws k clusters with replacement (uniform draws, counted), so
    stratum sizes are the same in every replicate. Chunks hold :data:`CHUNK_REPLICATES` replicates,
    each chunk from its own child of ``numpy.random.SeedSequence(seed)``.
    """
    check_options(n_bootstrap=n_bootstrap)
    _, inv = np.unique(np.asarray(strata, dtype=object).astype(str), return_inverse=True)
    groups = [np.flatnonzero(inv == g) for g in range(int(inv.max()) + 1)] if inv.size else []
    n_clusters = inv.size
    n_chunks = -(-int(n_bootstrap) // CHUNK_REPLICATES)
    for i, child in enumerate(np.random.SeedSequence(seed).spawn(n_chunks)):
        rng = np.random.default_rng(child)
        b = CHUNK_REPLICATES  # always a full chunk, so replicate i never depends on n_bootstrap
        out = np.zeros((b, n_clusters), dtype=np.float64)
        for idx in groups:
            k = idx.size
            draws = rng.integers(0, k, size=(b, k))
            draws += np.arange(b)[:, None] * k
            out[:, idx] = np.bincount(draws.ravel(), minlength=b * k).reshape(b, k)
        yield out[: min(b, int(n_bootstrap) - i * CHUNK_REPLICATES)]


class WeightedAUC:
    """One-vs-rest AUC of one score vector under cluster weights, many replicates at once.

    Negatives are sorted by score once; for a weight matrix ``m`` (b, clusters) a cumulative sum of
    the negatives' weights gives, for every positive, the negative weight strictly below it (L_lo)
    and up to ties (L_hi), so AUC = sum_i w_i (L_lo_i + L_hi_i) / 2 / (W+ W-) (ties count 1/2).
    Cost O(b n) per call after one O(n log n) sort. ``m = ones`` gives the ordinary (midrank) AUC;
    replicates without positives or negatives give NaN.
    """

    def __init__(self, positive: ArrayLike, score: ArrayLike, cluster: ArrayLike, n_clusters: int):
        pos = _binary(positive)
        s = _scores(score, pos.shape[0])
        cl = np.asarray(cluster, dtype=np.intp).ravel()
        if cl.shape[0] != pos.shape[0]:
            raise ValueError(f"{cl.shape[0]} cluster codes for {pos.shape[0]} rows")
        self.n_clusters = int(n_clusters)
        neg_idx = np.flatnonzero(~pos)
        neg_idx = neg_idx[np.argsort(s[neg_idx], kind="stable")]
        pos_idx = np.flatnonzero(pos)
        pos_idx = pos_idx[np.argsort(s[pos_idx], kind="stable")]  # monotone gathers below
        neg_sorted = s[neg_idx]
        self._neg_cluster = cl[neg_idx]
        self._pos_cluster = cl[pos_idx]
        self._lo = np.searchsorted(neg_sorted, s[pos_idx], side="left")
        self._hi = np.searchsorted(neg_sorted, s[pos_idx], side="right")
        self._ties = bool((self._hi != self._lo).any())

    def __call__(self, m: NDArray[np.float64]) -> NDArray[np.float64]:
        m = np.asarray(m, dtype=np.float64)
        if m.ndim != 2 or m.shape[1] != self.n_clusters:
            raise ValueError(f"weights must have shape (b, {self.n_clusters}), got {m.shape}")
        b = m.shape[0]
        cum = np.zeros((b, self._neg_cluster.size + 1))
        np.cumsum(np.take(m, self._neg_cluster, axis=1), axis=1, out=cum[:, 1:])
        wpos = np.take(m, self._pos_cluster, axis=1)
        below = np.take(cum, self._lo, axis=1)
        if self._ties:
            below += np.take(cum, self._hi, axis=1)
            below *= 0.5
        num = np.einsum("ij,ij->i", wpos, below)
        wp = wpos.sum(axis=1)
        wn = cum[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = num / (wp * wn)
        auc[(wp <= 0) | (wn <= 0)] = np.nan
        return auc


def bootstrap_replicates(
    statistic: Callable[[NDArray[np.float64]], NDArray[np.float64]],
    strata: ArrayLike,
    *,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
) -> NDArray[np.float64]:
    """Evaluate ``statistic(multiplicities (b, clusters)) -> (b, j)`` on every replicate: (B, j)."""
    parts = []
    for m in bootstrap_multiplicities(strata, n_bootstrap=n_bootstrap, seed=seed):
        r = np.asarray(statistic(m), dtype=np.float64)
        parts.append(r.reshape(r.shape[0], -1))
    if not parts:
        return np.empty((0, 0))
    return np.concatenate(parts, axis=0)


def percentile_ci(replicates: ArrayLike, *, level: float = DEFAULT_LEVEL) -> tuple[tuple[float, float], int]:
    """Percentile interval of the finite replicates, and the count of non-finite (degenerate) ones."""
    r = np.asarray(replicates, dtype=np.float64).ravel()
    ok = np.isfinite(r)
    n_bad = int(r.size - ok.sum())
    if not ok.any():
        return (math.nan, math.nan), n_bad
    alpha = 1.0 - level
    lo, hi = np.quantile(r[ok], [alpha / 2.0, 1.0 - alpha / 2.0])
    return (float(lo), float(hi)), n_bad


@dataclass(frozen=True)
class BootstrapResult:
    """A bootstrap estimate: point value, percentile interval, SD of the replicates, degenerate count."""

    estimate: float
    ci: tuple[float, float]
    se: float
    n_degenerate: int
    n_bootstrap: int
    level: float
    seed: int


def _first_label_strata(y: NDArray[np.bool_], first: NDArray[np.intp]) -> NDArray[np.bool_]:
    return y[first]


def _summarise(point: float, reps: NDArray[np.float64], n_bootstrap: int, level: float, seed: int) -> BootstrapResult:
    ci, n_bad = percentile_ci(reps, level=level)
    ok = reps[np.isfinite(reps)]
    se = float(np.std(ok, ddof=1)) if ok.size > 1 else math.nan
    return BootstrapResult(point, ci, se, n_bad, n_bootstrap, level, seed)


def cluster_bootstrap_auc(
    y_true: ArrayLike,
    score: ArrayLike,
    clusters: ArrayLike | None = None,
    *,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
) -> BootstrapResult:
    """AUC with a cluster (patient) bootstrap percentile interval, stratified by first-row label.

    ``clusters=None`` resamples rows (each row its own cluster).
    """
    check_options(level=level, n_bootstrap=n_bootstrap)
    y = _binary(y_true)
    codes, n_cl, first = cluster_codes(clusters, y.shape[0])
    stat = WeightedAUC(y, score, codes, n_cl)
    point = float(stat(np.ones((1, n_cl)))[0])
    reps = bootstrap_replicates(stat, _first_label_strata(y, first), n_bootstrap=n_bootstrap, seed=seed)
    return _summarise(point, reps.ravel(), n_bootstrap, level, seed)


def paired_cluster_bootstrap_auc(
    y_true: ArrayLike,
    score_a: ArrayLike,
    score_b: ArrayLike,
    clusters: ArrayLike | None = None,
    *,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
) -> BootstrapResult:
    """AUC(a) - AUC(b) on the same rows, both evaluated on the same resampled patients per replicate."""
    check_options(level=level, n_bootstrap=n_bootstrap)
    y = _binary(y_true)
    codes, n_cl, first = cluster_codes(clusters, y.shape[0])
    stat_a = WeightedAUC(y, score_a, codes, n_cl)
    stat_b = WeightedAUC(y, score_b, codes, n_cl)

    def diff(m: NDArray[np.float64]) -> NDArray[np.float64]:
        return stat_a(m) - stat_b(m)

    point = float(diff(np.ones((1, n_cl)))[0])
    reps = bootstrap_replicates(diff, _first_label_strata(y, first), n_bootstrap=n_bootstrap, seed=seed)
    return _summarise(point, reps.ravel(), n_bootstrap, level, seed)
