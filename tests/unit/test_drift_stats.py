"""Drift statistics against independent references (SciPy, float64 NumPy written here) on fixed inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps
from scipy.spatial.distance import cdist, jensenshannon

from ascend_llm.eval import drift_stats as ds


def test_js_divergence_equals_scipy():
    rng = np.random.default_rng(0)
    p, q = rng.integers(0, 50, 40).astype(float), rng.integers(0, 50, 40).astype(float)
    p[3] = 0.0  # a zero bin on one side
    assert ds.js_divergence(p, q) == pytest.approx(jensenshannon(p, q) ** 2, rel=1e-12)
    assert ds.js_divergence(p, p) == pytest.approx(0.0, abs=1e-15)
    assert ds.js_divergence([1, 0], [0, 1]) == pytest.approx(np.log(2), rel=1e-12)


def test_psi_formula_and_bands():
    ref = np.array([30.0, 20.0, 25.0, 25.0, 0.0])
    new = np.array([10.0, 30.0, 25.0, 30.0, 5.0])
    p = np.maximum(ref / ref.sum(), 1e-4)
    q = np.maximum(new / new.sum(), 1e-4)
    expected = sum((qi - pi) * np.log(qi / pi) for pi, qi in zip(p, q))
    assert ds.psi(ref, new) == pytest.approx(expected, rel=1e-12)
    # without empty bins PSI is the symmetrised KL divergence KL(q||p) + KL(p||q) (SciPy's entropy)
    a, b = ref[:4], new[:4]
    assert ds.psi(a, b) == pytest.approx(sps.entropy(b, a) + sps.entropy(a, b), rel=1e-9)
    assert [ds.psi_band(v) for v in (0.05, 0.1, 0.15, 0.2, 0.7)] == \
        ["none", "moderate", "moderate", "significant", "significant"]


def test_equal_mass_bins():
    counts = np.array([50, 1, 1, 1, 10, 10, 10, 10, 5, 2], float)
    bins = ds.equal_mass_bins(counts, 4)
    assert bins[0] == 0 and np.count_nonzero(bins == 0) == 1  # the heaviest token (half the mass) fills a bin
    assert bins.max() == 2  # the bin its weight skipped is dropped
    mass = np.bincount(bins, counts) / counts.sum()
    assert np.allclose(mass, [0.5, 0.3, 0.2])  # 50 | 10+10+10 | 10+5+2+1+1+1
    order = np.argsort(-counts, kind="stable")
    assert np.all(np.diff(bins[order]) >= 0)  # bins follow the reference frequency order


def _rbf_mmd2_reference(x, y):
    """Unbiased MMD^2 (Gretton et al. 2012 eq. 3) with the pooled median heuristic, written with SciPy cdist."""
    pool = np.concatenate([x, y])
    d2 = cdist(pool, pool, "sqeuclidean")
    sigma2 = np.median(d2[~np.eye(len(pool), dtype=bool)]) / 2.0
    k = lambda a, b: np.exp(-cdist(a, b, "sqeuclidean") / (2 * sigma2))  # noqa: E731
    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * k(x, y).mean()), np.sqrt(sigma2)


def test_mmd2_equals_reference_and_p_value():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.8, 1.0, size=(25, 5))
    value, sigma = ds.mmd2_unbiased(x, y)
    ref_value, ref_sigma = _rbf_mmd2_reference(x, y)
    assert value == pytest.approx(ref_value, rel=1e-9)
    assert sigma == pytest.approx(ref_sigma, rel=1e-12)
    result, _ = ds.mmd_test(x, y, 50, seed=3)
    assert result.statistic == pytest.approx(ref_value, rel=1e-9)
    # p-value by the same permutations, each statistic recomputed from scratch (fixed bandwidth)
    pool = np.concatenate([x, y])
    perms = np.random.default_rng(3)
    permuted = []
    for _ in range(50):
        p = perms.permutation(len(pool))
        permuted.append(ds.mmd2_unbiased(pool[p[:30]], pool[p[30:]], sigma=ref_sigma)[0])
    expected = (1 + sum(v >= ref_value - 1e-12 for v in permuted)) / 51
    assert result.p_value == pytest.approx(expected, abs=1e-12)
    assert result.p_value == pytest.approx(1 / 51)  # a strong shift: nothing permuted reaches it


def test_mean_shift_statistic_and_exact_p_value():
    """The statistic is SciPy's; with many permutations the p-value is close to SciPy's exact test (all 252
    splits of 5 + 5)."""
    ref = np.array([3.1, 2.9, 3.4, 3.0, 3.3])
    new = np.array([3.6, 3.2, 3.9, 3.5, 3.1])
    exact = sps.permutation_test((new, ref), lambda a, b: np.mean(a) - np.mean(b), permutation_type="independent",
                                 alternative="two-sided", n_resamples=np.inf)
    result = ds.mean_shift_test(ref, new, 20000, seed=0)
    assert result.statistic == pytest.approx(exact.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(exact.pvalue, abs=0.01)
    # the exact count by enumeration agrees with SciPy (our reference for the two-sided rule |d*| >= |d|)
    pool = np.concatenate([ref, new])
    hits = sum(abs(pool[list(set(range(10)) - set(c))].mean() - pool[list(c)].mean()) >= abs(exact.statistic) - 1e-12
               for c in itertools.combinations(range(10), 5))
    assert hits / 252 == pytest.approx(exact.pvalue, abs=1e-12)


def test_count_divergence_test_by_reference_loop():
    rng = np.random.default_rng(2)
    ref = rng.poisson(3.0, size=(12, 20)).astype(float)
    new = rng.poisson(3.0, size=(10, 20)).astype(float)
    new[:, 0] += 6  # one token far more frequent in the new sample
    result = ds.count_divergence_test(ref, new, 40, seed=5)
    assert result.statistic == pytest.approx(jensenshannon(ref.sum(0), new.sum(0)) ** 2, rel=1e-10)
    pool, perms, permuted = np.concatenate([ref, new]), np.random.default_rng(5), []
    for _ in range(40):
        p = perms.permutation(22)
        permuted.append(jensenshannon(pool[p[:12]].sum(0), pool[p[12:]].sum(0)) ** 2)
    assert result.p_value == pytest.approx((1 + sum(v >= result.statistic - 1e-12 for v in permuted)) / 41)
    assert result.p_value < 0.05


def test_permutation_p_value_ties_count():
    assert ds.permutation_p_value(1.0, np.array([1.0, 0.5, 2.0])) == pytest.approx(3 / 4)
    assert ds.permutation_p_value(5.0, np.zeros(99)) == pytest.approx(0.01)
