"""Clustering quality: k-means on the embeddings, then NMI and AMI against the class labels.

$$ \\mathrm{NMI} = \\frac{I(Y; C)}{\\tfrac12 (H(Y) + H(C))} \\qquad
   \\mathrm{AMI} = \\frac{I(Y; C) - E[I]}{\\tfrac12 (H(Y) + H(C)) - E[I]} $$

with ``E[I]`` the expected mutual information of two random labelings with the same cluster sizes
(hypergeometric model; Vinh, Epps, Bailey, "Information Theoretic Measures for Clusterings
Comparison", JMLR 2010). Both use the arithmetic mean normaliser, as scikit-learn's defaults do.

``E[I]`` depends on the two labelings only through their cluster *sizes*, so it is summed over
pairs of distinct sizes weighted by how often each occurs. This is exact (same value as
``sklearn.metrics.adjusted_mutual_info_score``) and far cheaper when there are thousands of clusters:
sizes sum to N, so there are at most ``sqrt(2N)`` distinct ones.
"""
from __future__ import annotations

import numpy as np
from scipy.special import gammaln

__all__ = [
    "KMEANS_NITER",
    "KMEANS_MAX_POINTS_PER_CENTROID",
    "kmeans_assign",
    "expected_mutual_information",
    "nmi_ami",
]

#: k-means iterations. A speed/quality trade-off: on the benchmark data (100k points, 1,000
#: clusters) these settings take ~1/3 of the time of PML's (20 iterations, 256 points per centroid)
#: and give NMI ~0.01 lower (less converged k-means); see benchmarks/results/bench_eval.md. Compare
#: NMI/AMI only between runs with the same settings.
KMEANS_NITER = 10
#: k-means trains on at most this many points per centroid (a random subset, faiss' own mechanism);
#: every point is then assigned to its nearest centroid.
KMEANS_MAX_POINTS_PER_CENTROID = 64


def kmeans_assign(
    embeddings: np.ndarray,
    num_clusters: int,
    *,
    seed: int = 0,
    niter: int = KMEANS_NITER,
    max_points_per_centroid: int = KMEANS_MAX_POINTS_PER_CENTROID,
) -> np.ndarray:
    """Cluster ids (int64, one per row) from seeded faiss k-means with ``num_clusters`` centroids.

    faiss' k-means++-free default initialisation picks ``num_clusters`` random points (seeded);
    training uses at most ``max_points_per_centroid * num_clusters`` random points, then every row
    is assigned to its nearest centroid (squared euclidean). Uses faiss' current thread setting.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = x.shape[0]
    if num_clusters <= 1:
        return np.zeros(n, dtype=np.int64)
    if num_clusters >= n:
        return np.arange(n, dtype=np.int64)
    kmeans = faiss.Kmeans(
        x.shape[1],
        int(num_clusters),
        niter=int(niter),
        seed=int(seed),
        max_points_per_centroid=int(max_points_per_centroid),
        min_points_per_centroid=1,
        verbose=False,
    )
    kmeans.train(x)
    _, assign = kmeans.index.search(x, 1)
    return assign.ravel().astype(np.int64)


def expected_mutual_information(row_sizes: np.ndarray, col_sizes: np.ndarray, n: int) -> float:
    """Exact expected mutual information (nats) of two labelings with the given cluster sizes.

    Args:
        row_sizes: positive sizes of the clusters of the first labeling (sum ``n``).
        col_sizes: positive sizes of the clusters of the second labeling (sum ``n``).
        n: number of items.
    """
    a_vals, a_mult = np.unique(np.asarray(row_sizes, dtype=np.int64), return_counts=True)
    b_vals, b_mult = np.unique(np.asarray(col_sizes, dtype=np.int64), return_counts=True)
    if a_mult.sum() <= 1 or b_mult.sum() <= 1:
        return 0.0
    lf = gammaln(np.arange(n + 1, dtype=np.float64) + 1.0)  # lf[m] = log(m!)
    log_n = np.log(n)
    b = b_vals[:, None]
    emi = 0.0
    for a, a_count in zip(a_vals.tolist(), a_mult.tolist()):
        length = min(a, int(b_vals[-1]))
        nij = np.arange(1, length + 1, dtype=np.int64)[None, :]
        valid = (nij <= b) & (nij >= a + b - n)
        # log of the hypergeometric probability P(n_ij | a, b, n); invalid cells clipped then masked
        log_p = (
            lf[a] + lf[b] + lf[n - a] + lf[n - b] - lf[n]
            - lf[nij] - lf[a - nij]
            - lf[np.clip(b - nij, 0, n)]
            - lf[np.clip(n - a - b + nij, 0, n)]
        )
        term = (nij / n) * (log_n + np.log(nij) - np.log(a) - np.log(b)) * np.exp(np.where(valid, log_p, -np.inf))
        emi += a_count * float((b_mult[:, None] * term).sum())
    return emi


def _entropy(sizes: np.ndarray, n: int) -> float:
    p = sizes[sizes > 0] / n
    return float(-(p * np.log(p)).sum())


def nmi_ami(labels_true: np.ndarray, labels_pred: np.ndarray) -> tuple[float, float]:
    """``(NMI, AMI)`` of two labelings, arithmetic normaliser (equal to scikit-learn's defaults)."""
    _, t = np.unique(np.asarray(labels_true), return_inverse=True)
    _, c = np.unique(np.asarray(labels_pred), return_inverse=True)
    t, c = t.ravel(), c.ravel()
    n = t.shape[0]
    nt, nc = int(t.max()) + 1, int(c.max()) + 1
    if nt == nc == 1:
        return 1.0, 1.0
    if nt == 1 or nc == 1:
        return 0.0, 0.0
    pair_ids, joint = np.unique(t * nc + c, return_counts=True)
    a = np.bincount(t, minlength=nt)
    b = np.bincount(c, minlength=nc)
    ai, bj = a[pair_ids // nc], b[pair_ids % nc]
    mi = float((joint / n * (np.log(joint) + np.log(n) - np.log(ai) - np.log(bj))).sum())
    mi = max(mi, 0.0)
    h_true, h_pred = _entropy(a, n), _entropy(b, n)
    mean_h = 0.5 * (h_true + h_pred)
    nmi = mi / mean_h if mean_h > 0 else 1.0
    emi = expected_mutual_information(a, b, n)
    denom = mean_h - emi
    eps = np.finfo(np.float64).eps
    denom = min(denom, -eps) if denom < 0 else max(denom, eps)
    ami = (mi - emi) / denom
    return float(nmi), float(ami)
