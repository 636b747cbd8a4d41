"""DeLong and the patient-clustered bootstrap (readingrace.stats.intervals)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from readingrace.errors import ConfigError
from readingrace.stats.intervals import (
    CHUNK_REPLICATES,
    WeightedAUC,
    auc_midrank,
    bootstrap_multiplicities,
    cluster_bootstrap_auc,
    delong_auc,
    delong_paired,
    paired_cluster_bootstrap_auc,
    percentile_ci,
    two_sided_p,
)


def _psi(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kernel matrix psi(x_i, y_j) = 1 if x > y, 1/2 if equal, 0 otherwise (m, n)."""
    return (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])


def _brute_delong(y: np.ndarray, scores: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """DeLong (1988) by its O(m n) definition: AUCs and their covariance matrix."""
    v10, v01, aucs = [], [], []
    for s in scores:
        k = _psi(s[y], s[~y])
        aucs.append(k.mean())
        v10.append(k.mean(axis=1))
        v01.append(k.mean(axis=0))
    m, n = int(y.sum()), int((~y).sum())
    cov = np.atleast_2d(np.cov(np.array(v10))) / m + np.atleast_2d(np.cov(np.array(v01))) / n
    return np.array(aucs), cov


def _tied_data(rng: np.random.Generator, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    y = rng.random(n) < 0.4
    s = np.round(rng.normal(size=n) + 0.8 * y, 1)  # rounding makes many ties
    return y, s


# ---------------------------------------------------------------------------------------- AUC
def test_auc_midrank_hand_case_with_ties():
    y = np.array([1, 1, 0, 0])
    s = np.array([0.7, 0.3, 0.3, 0.1])
    # pairs: 0.7>0.3, 0.7>0.1, 0.3=0.3 (1/2), 0.3>0.1 -> 3.5 / 4
    assert auc_midrank(y, s) == pytest.approx(0.875)
    assert auc_midrank([0, 0, 1], [0.1, 0.2, 0.3]) == 1.0
    assert math.isnan(auc_midrank([1, 1], [0.2, 0.3]))


def test_auc_equals_sklearn_on_random_tied_data():
    rng = np.random.default_rng(0)
    for _ in range(5):
        y, s = _tied_data(rng)
        assert auc_midrank(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        stat = WeightedAUC(y, s, np.arange(y.size), y.size)
        assert stat(np.ones((1, y.size)))[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_weighted_auc_equals_auc_of_duplicated_rows():
    """Integer cluster weights are the same as physically repeating each cluster's rows."""
    rng = np.random.default_rng(1)
    y, s = _tied_data(rng, 120)
    cluster = rng.integers(0, 40, y.size)
    y[cluster == 0] = True  # make sure both classes survive the weights below
    y[cluster == 1] = False
    w = rng.integers(0, 4, size=(3, 40)).astype(float)
    w[:, :2] = 1.0
    stat = WeightedAUC(y, s, cluster, 40)
    got = stat(w)
    for b in range(3):
        rows = np.repeat(np.arange(y.size), w[b, cluster].astype(int))
        assert got[b] == pytest.approx(roc_auc_score(y[rows], s[rows]), abs=1e-12)


def test_weighted_auc_nan_when_a_class_has_zero_weight():
    y = np.array([True, True, False, False])
    stat = WeightedAUC(y, [0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1], 2)
    out = stat(np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    assert math.isnan(out[0]) and math.isnan(out[1]) and out[2] == 1.0


# ---------------------------------------------------------------------------------------- DeLong
def test_delong_matches_brute_force_with_ties():
    rng = np.random.default_rng(2)
    y, s = _tied_data(rng, 250)
    aucs, cov = _brute_delong(y, [s])
    res = delong_auc(y, s)
    assert res.auc == pytest.approx(aucs[0], abs=1e-12)
    assert res.se == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-10)
    assert res.n_positive == int(y.sum()) and res.n_negative == int((~y).sum())
    assert 0.0 <= res.ci[0] < res.auc < res.ci[1] <= 1.0
    plain = delong_auc(y, s, transform="none")
    z = stats.norm.ppf(0.975)
    assert plain.ci == pytest.approx((res.auc - z * res.se, res.auc + z * res.se))


def test_paired_delong_matches_brute_force():
    rng = np.random.default_rng(3)
    y, s_a = _tied_data(rng, 200)
    s_b = np.round(s_a + rng.normal(scale=0.7, size=y.size), 1)
    aucs, cov = _brute_delong(y, [s_a, s_b])
    res = delong_paired(y, s_a, s_b)
    assert res.auc_a == pytest.approx(aucs[0], abs=1e-12)
    assert res.auc_b == pytest.approx(aucs[1], abs=1e-12)
    assert res.difference == pytest.approx(aucs[0] - aucs[1], abs=1e-12)
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert res.se == pytest.approx(se, rel=1e-10)
    assert res.p_value == pytest.approx(2 * stats.norm.sf(abs(res.difference) / se), rel=1e-9)
    assert res.correlation == pytest.approx(cov[0, 1] / math.sqrt(cov[0, 0] * cov[1, 1]), rel=1e-9)


def test_paired_delong_identical_scores_gives_zero_difference_and_p_one():
    rng = np.random.default_rng(4)
    y, s = _tied_data(rng, 100)
    res = delong_paired(y, s, s)
    assert res.difference == 0.0 and res.se == 0.0 and res.p_value == 1.0
    assert res.ci == (0.0, 0.0)


def test_p_values_are_in_unit_interval():
    rng = np.random.default_rng(5)
    for _ in range(30):
        n = int(rng.integers(4, 60))
        y = rng.random(n) < rng.uniform(0.2, 0.8)
        y[0], y[1] = True, False
        s = rng.normal(size=n) * rng.choice([0.0, 1.0]) + y * rng.uniform(0, 3)
        p1 = delong_auc(y, s).p_value
        p2 = delong_paired(y, s, rng.normal(size=n)).p_value
        for p in (p1, p2):
            assert math.isnan(p) or 0.0 <= p <= 1.0
    assert two_sided_p(0.5, 0.5, 0.0) == 1.0 and two_sided_p(0.7, 0.5, 0.0) == 0.0
    assert two_sided_p(0.5 + 1e-9, 0.5, 1e-300) == 0.0


def test_delong_perfect_separation_and_degenerate():
    y = np.r_[np.zeros(20, bool), np.ones(20, bool)]
    s = np.arange(40.0)
    res = delong_auc(y, s)
    assert res.auc == 1.0 and res.se == 0.0 and res.ci == (1.0, 1.0) and res.p_value == 0.0
    empty = delong_auc(np.ones(5, bool), np.arange(5.0))
    assert math.isnan(empty.auc) and math.isnan(empty.se)
    one_pos = delong_auc([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3])
    assert one_pos.auc == 1.0 and math.isnan(one_pos.se)  # variance needs >= 2 per class


def test_delong_million_rows_runs_and_is_finite():
    rng = np.random.default_rng(6)
    n = 1_000_000
    y = rng.random(n) < 0.3
    s = np.round(rng.normal(size=n) + y, 3).astype(np.float32)  # many ties, float32 input
    res = delong_auc(y, s)
    assert math.isfinite(res.auc) and math.isfinite(res.se) and res.se > 0
    true_auc = stats.norm.cdf(1 / math.sqrt(2))
    assert abs(res.auc - true_auc) < 5 * res.se + 1e-3
    assert res.ci[0] < res.auc < res.ci[1] and 0.0 <= res.p_value <= 1.0


def test_bad_options_raise_config_error():
    with pytest.raises(ConfigError, match="confidence level"):
        delong_auc([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], level=95)
    with pytest.raises(ConfigError, match="n_bootstrap"):
        cluster_bootstrap_auc([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], n_bootstrap=-1)
    with pytest.raises(ConfigError, match="transform"):
        delong_auc([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], transform="probit")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- bootstrap
def test_multiplicities_keep_stratum_sizes_and_are_reproducible():
    strata = np.array(["a"] * 7 + ["b"] * 3)
    chunks = list(bootstrap_multiplicities(strata, n_bootstrap=70, seed=11))
    m = np.concatenate(chunks)
    assert m.shape == (70, 10)
    assert (m[:, :7].sum(axis=1) == 7).all() and (m[:, 7:].sum(axis=1) == 3).all()
    assert (m >= 0).all() and np.all(m == np.round(m))
    again = np.concatenate(list(bootstrap_multiplicities(strata, n_bootstrap=70, seed=11)))
    assert np.array_equal(m, again)
    other = np.concatenate(list(bootstrap_multiplicities(strata, n_bootstrap=70, seed=12)))
    assert not np.array_equal(m, other)
    # replicate i does not depend on how many replicates were asked for
    shorter = np.concatenate(list(bootstrap_multiplicities(strata, n_bootstrap=CHUNK_REPLICATES + 3, seed=11)))
    assert np.array_equal(shorter, m[: CHUNK_REPLICATES + 3])
    # each cluster is drawn with probability 1/k: mean multiplicity near 1
    big = np.concatenate(list(bootstrap_multiplicities(np.zeros(50), n_bootstrap=2000, seed=1)))
    assert big.mean(axis=0) == pytest.approx(np.ones(50), abs=0.15)


def test_perfectly_separated_bootstrap_ci_is_one_one():
    y = np.r_[np.zeros(30, bool), np.ones(20, bool)]
    s = np.linspace(0, 1, 50)
    patients = np.arange(50) // 2
    res = cluster_bootstrap_auc(y, s, patients, n_bootstrap=300)
    assert res.estimate == 1.0 and res.ci == (1.0, 1.0) and res.n_degenerate == 0


def test_clustered_bootstrap_resamples_patients_not_images():
    """Five identical copies of every patient's image: the patient bootstrap must be about sqrt(5) wider."""
    rng = np.random.default_rng(7)
    n_pat = 80
    y_pat = np.r_[np.ones(30, bool), np.zeros(n_pat - 30, bool)]
    s_pat = rng.normal(size=n_pat) + 1.0 * y_pat
    patient = np.repeat(np.arange(n_pat), 5)
    y, s = y_pat[patient], s_pat[patient]
    clustered = cluster_bootstrap_auc(y, s, patient, n_bootstrap=600, seed=3)
    by_image = cluster_bootstrap_auc(y, s, None, n_bootstrap=600, seed=3)
    one_copy = cluster_bootstrap_auc(y_pat, s_pat, None, n_bootstrap=600, seed=3)
    assert clustered.estimate == by_image.estimate == pytest.approx(roc_auc_score(y_pat, s_pat))
    w_cl = clustered.ci[1] - clustered.ci[0]
    w_img = by_image.ci[1] - by_image.ci[0]
    assert w_cl > 1.6 * w_img  # sqrt(5) = 2.24 in expectation
    assert w_cl == pytest.approx(one_copy.ci[1] - one_copy.ci[0], rel=0.25)  # copies add no information


def test_degenerate_replicates_are_counted_and_excluded():
    """The only positive image belongs to a patient whose first image is negative: stratification
    cannot keep it, so replicates that miss that patient (about (8/9)^9 = 35%) have no positive."""
    y = np.r_[False, True, np.zeros(8, bool)]
    s = np.r_[0.1, 0.9, np.linspace(0.2, 0.5, 8)]
    patient = np.r_[0, 0, np.arange(1, 9)]
    res = cluster_bootstrap_auc(y, s, patient, n_bootstrap=500, seed=5)
    assert 100 < res.n_degenerate < 260
    assert res.estimate == 1.0 and res.ci == (1.0, 1.0)  # the finite replicates are all perfect
    ci, bad = percentile_ci(np.array([np.nan, 0.2, 0.4, np.nan]), level=0.5)
    assert bad == 2 and ci == pytest.approx((0.25, 0.35))
    (lo, hi), bad = percentile_ci(np.array([np.nan, np.nan]))
    assert bad == 2 and math.isnan(lo) and math.isnan(hi)


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(8)
    n_pat = 150
    patient = np.repeat(np.arange(n_pat), 2)
    y = (np.arange(n_pat) < 60)[patient]
    good = rng.normal(size=y.size) + 1.5 * y
    worse = good + rng.normal(scale=1.5, size=y.size)
    res = paired_cluster_bootstrap_auc(y, good, worse, patient, n_bootstrap=500)
    assert res.estimate == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, worse))
    assert res.estimate > 0 and res.ci[0] > 0  # the noise clearly lowers the AUC
    same = paired_cluster_bootstrap_auc(y, good, good, patient, n_bootstrap=100)
    assert same.estimate == 0.0 and same.ci == (0.0, 0.0)


def test_delong_and_bootstrap_se_agree_at_large_n():
    rng = np.random.default_rng(9)
    n = 4000
    y = rng.random(n) < 0.35
    s = rng.normal(size=n) + 1.2 * y
    d = delong_auc(y, s)
    b = cluster_bootstrap_auc(y, s, None, n_bootstrap=1000, seed=2021)
    assert b.se == pytest.approx(d.se, rel=0.10)


def _simulate(rng, n_pos, n_neg, mean_images, icc, true_auc):
    mu = math.sqrt(2) * stats.norm.ppf(true_auc)
    y_pat = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
    k = 1 + rng.poisson(mean_images - 1, y_pat.size) if mean_images > 1 else np.ones(y_pat.size, int)
    patient = np.repeat(np.arange(y_pat.size), k)
    b = rng.normal(0, math.sqrt(icc), y_pat.size) if icc else np.zeros(y_pat.size)
    s = mu * y_pat[patient] + b[patient] + rng.normal(0, math.sqrt(1 - icc), patient.size)
    return y_pat[patient], s, patient


def test_reduced_coverage_simulation():
    """200 datasets per setting, fixed seed; nominal 95%, accept 90-99% (Monte-Carlo SE about 1.5%).

    Settings (binormal, true AUC known): (a) clustered, 120 positive + 180 negative patients,
    1 + Poisson(3) images each, ICC 0.6, true AUC 0.95 -> patient bootstrap;
    (b) unclustered, 200 + 300 images, true AUC 0.80 -> DeLong (logit);
    (c) the clustered data (a) with DeLong, which ignores clustering: reported lower than nominal.
    """
    rng = np.random.default_rng(2021)
    n_sets = 200
    hits_boot = hits_delong = hits_delong_clustered = 0
    for d in range(n_sets):
        y, s, patient = _simulate(rng, 120, 180, 4, 0.6, 0.95)
        ci = cluster_bootstrap_auc(y, s, patient, n_bootstrap=400, seed=d).ci
        hits_boot += ci[0] <= 0.95 <= ci[1]
        ci = delong_auc(y, s).ci
        hits_delong_clustered += ci[0] <= 0.95 <= ci[1]
        y, s, _ = _simulate(rng, 200, 300, 1, 0.0, 0.80)
        ci = delong_auc(y, s).ci
        hits_delong += ci[0] <= 0.80 <= ci[1]
    assert 0.90 <= hits_boot / n_sets <= 0.99
    assert 0.90 <= hits_delong / n_sets <= 0.99
    assert hits_delong_clustered / n_sets < hits_boot / n_sets  # DeLong ignores clustering
