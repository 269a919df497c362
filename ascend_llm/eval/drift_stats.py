"""Two-sample drift statistics on host arrays (float64 NumPy): PSI, Jensen-Shannon, MMD^2 and permutation tests.

Every test here compares a reference sample with a new sample and returns a statistic and a permutation p-value
p = (1 + #{permuted statistic >= observed}) / (1 + num_permutations), the exact-test form that keeps the
false-positive rate at or below alpha under exchangeability (Phipson & Smyth 2010). The permutations are
drawn from a seeded NumPy generator, so a result is a pure function of (inputs, seed).

- `psi`: population stability index, sum_i (q_i - p_i) ln(q_i / p_i) over bins, proportions floored at `eps`
  (the usual bands: < 0.1 none, 0.1-0.2 moderate, >= 0.2 significant).
- `js_divergence`: Jensen-Shannon divergence in nats, JS(p, q) = (KL(p||m) + KL(q||m)) / 2, m = (p + q) / 2
  (equals `scipy.spatial.distance.jensenshannon(p, q) ** 2`).
- `mmd2_unbiased`: unbiased MMD^2 (Gretton et al. 2012, eq. 3) with a Gaussian RBF kernel
  k(x, y) = exp(-||x - y||^2 / (2 sigma^2)); sigma from the median heuristic 2 sigma^2 = median of the pooled
  off-diagonal squared distances (alibi-detect's `sigma_median`, here over the pooled sample so the kernel does
  not change under permutation).
- `mean_shift_test`: difference of means (new - ref) of per-unit values with a two-sided permutation p-value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PSI_BANDS = (0.1, 0.2)  # < 0.1 none, [0.1, 0.2) moderate, >= 0.2 significant


@dataclass
class TestResult:
    """statistic: the observed value; p_value: permutation p-value in (0, 1]; num_permutations: B."""

    statistic: float
    p_value: float
    num_permutations: int


def permutation_p_value(observed: float, permuted: np.ndarray) -> float:
    """(1 + #{permuted >= observed}) / (1 + B) for permuted (B,) statistics; a relative tolerance of 1e-12 counts
    ties computed in a different summation order as ties."""
    permuted = np.asarray(permuted, np.float64)
    tol = 1e-12 * max(abs(observed), 1.0)
    return float((1 + np.count_nonzero(permuted >= observed - tol)) / (1 + len(permuted)))


def permutations(n: int, num_permutations: int, seed: int) -> np.ndarray:
    """(num_permutations, n) int64: independent uniform permutations of range(n) from default_rng(seed)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) for _ in range(num_permutations)]) if num_permutations else \
        np.zeros((0, n), np.int64)


def psi(ref: np.ndarray, new: np.ndarray, eps: float = 1e-4) -> float:
    """PSI between two count (or probability) vectors over the same bins, (K,) each; proportions are the counts
    normalised to sum 1 and floored at eps (an empty bin would make the log infinite)."""
    p = np.maximum(np.asarray(ref, np.float64) / np.sum(ref), eps)
    q = np.maximum(np.asarray(new, np.float64) / np.sum(new), eps)
    return float(np.sum((q - p) * np.log(q / p)))


def psi_band(value: float) -> str:
    """'none' (< 0.1), 'moderate' ([0.1, 0.2)) or 'significant' (>= 0.2)."""
    return "none" if value < PSI_BANDS[0] else "moderate" if value < PSI_BANDS[1] else "significant"


def equal_mass_bins(ref_counts: np.ndarray, num_bins: int) -> np.ndarray:
    """(V,) int64 bin of each token id, labels 0..K-1 with K <= num_bins: ids sorted by reference frequency
    (descending, ties by id); a token goes to bin floor(num_bins * reference mass before it), so the bins hold
    about equal reference mass and a token heavier than one bin's share fills a bin alone (bins left empty by
    it are dropped). Ten equal-mass bins is the setting the PSI bands were made for; a bin per vocabulary id
    would give a same-distribution PSI bias of about (V - 1) (1/N_ref + 1/N_new)."""
    counts = np.asarray(ref_counts, np.float64)
    order = np.lexsort((np.arange(len(counts)), -counts))
    before = (np.cumsum(counts[order]) - counts[order]) / max(counts.sum(), 1.0)
    cut = np.minimum((before * num_bins + 1e-9).astype(np.int64), num_bins - 1)
    bins = np.empty(len(counts), np.int64)
    bins[order] = np.unique(cut, return_inverse=True)[1]
    return bins


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) of two count or probability vectors (K,), each normalised;
    0 ln 0 = 0."""
    p = np.asarray(p, np.float64) / np.sum(p)
    q = np.asarray(q, np.float64) / np.sum(q)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray) -> float:
        keep = a > 0
        return float(np.sum(a[keep] * np.log(a[keep] / m[keep])))

    return 0.5 * (kl(p) + kl(q))


def count_divergence_test(ref_counts: np.ndarray, new_counts: np.ndarray, num_permutations: int,
                          seed: int) -> TestResult:
    """JS divergence of the pooled token counts of two samples of documents, with a permutation p-value over
    documents. ref_counts (n, V), new_counts (m, V): per-document token counts. Documents (not tokens) are
    exchanged, so the test respects the dependence of tokens inside a document."""
    pool = np.concatenate([ref_counts, new_counts]).astype(np.float64)
    n = len(ref_counts)
    observed = js_divergence(pool[:n].sum(0), pool[n:].sum(0))
    total = pool.sum(0)
    permuted = []
    for perm in permutations(len(pool), num_permutations, seed):
        first = pool[perm[:n]].sum(0)
        permuted.append(js_divergence(first, total - first))
    return TestResult(observed, permutation_p_value(observed, np.asarray(permuted)), num_permutations)


def squared_distances(x: np.ndarray) -> np.ndarray:
    """(N, N) float64 pairwise squared Euclidean distances of rows x (N, D), clipped at 0."""
    x = np.asarray(x, np.float64)
    sq = np.sum(x * x, 1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)


def median_bandwidth(d2: np.ndarray) -> float:
    """sigma with 2 sigma^2 = median of the off-diagonal entries of a squared-distance matrix (N, N)."""
    off = d2[~np.eye(len(d2), dtype=bool)]
    med = float(np.median(off))
    return float(np.sqrt(max(med, 1e-12) / 2.0))


def _mmd2_from_kernel(k: np.ndarray, n: int) -> float:
    m = len(k) - n
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    sxx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(sxx + syy - 2.0 * kxy.sum() / (n * m))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, sigma: float | None = None) -> tuple[float, float]:
    """(unbiased MMD^2, sigma) of samples x (n, D) and y (m, D), n, m >= 2, Gaussian RBF kernel; sigma None:
    the median heuristic over the pooled sample."""
    pool = np.concatenate([x, y])
    d2 = squared_distances(pool)
    sigma = median_bandwidth(d2) if sigma is None else float(sigma)
    return _mmd2_from_kernel(np.exp(-d2 / (2.0 * sigma * sigma)), len(x)), sigma


def mmd_test(x: np.ndarray, y: np.ndarray, num_permutations: int, seed: int) -> tuple[TestResult, float]:
    """(MMD^2 with its permutation p-value, sigma): the kernel matrix is computed once and its rows and columns
    permuted (alibi-detect MMDDrift: 100 permutations, p < 0.05 by default)."""
    pool = np.concatenate([x, y])
    d2 = squared_distances(pool)
    sigma = median_bandwidth(d2)
    k = np.exp(-d2 / (2.0 * sigma * sigma))
    n = len(x)
    observed = _mmd2_from_kernel(k, n)
    permuted = [_mmd2_from_kernel(k[np.ix_(p, p)], n) for p in permutations(len(pool), num_permutations, seed)]
    return TestResult(observed, permutation_p_value(observed, np.asarray(permuted)), num_permutations), sigma


def mean_shift_test(ref: np.ndarray, new: np.ndarray, num_permutations: int, seed: int) -> TestResult:
    """mean(new) - mean(ref) of per-unit values (n,), (m,) with a two-sided permutation p-value
    (|permuted difference| >= |observed|)."""
    pool = np.concatenate([ref, new]).astype(np.float64)
    n = len(ref)
    observed = float(pool[n:].mean() - pool[:n].mean())
    perms = permutations(len(pool), num_permutations, seed)
    shuffled = pool[perms] if num_permutations else np.zeros((0, len(pool)))
    permuted = np.abs(shuffled[:, n:].mean(1) - shuffled[:, :n].mean(1))
    return TestResult(observed, permutation_p_value(abs(observed), permuted), num_permutations)
