"""Deliberately naive retrieval and clustering metrics (full distance matrix, explicit loops).

Written from the definitions in Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020) §3.2
and Vinh et al. (JMLR 2010) for the expected mutual information. Only for small N (<= a few hundred).
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "ref_distances",
    "ref_ranking",
    "ref_knn",
    "ref_retrieval",
    "ref_expected_mutual_information",
]


def ref_distances(query: np.ndarray, gallery: np.ndarray, metric: str) -> np.ndarray:
    """Full (N, M) float64 distance matrix: euclidean (not squared) or 1 - cos."""
    q = np.asarray(query, dtype=np.float64)
    g = np.asarray(gallery, dtype=np.float64)
    out = np.zeros((q.shape[0], g.shape[0]))
    for i in range(q.shape[0]):
        for j in range(g.shape[0]):
            if metric == "euclidean":
                out[i, j] = math.sqrt(float(((q[i] - g[j]) ** 2).sum()))
            else:
                out[i, j] = 1.0 - float(q[i] @ g[j]) / (np.linalg.norm(q[i]) * np.linalg.norm(g[j]))
    return out


def ref_ranking(dist_row: np.ndarray, exclude: int | None = None) -> list[int]:
    """Gallery indices sorted by (distance, index), optionally without one index."""
    order = sorted(range(len(dist_row)), key=lambda j: (dist_row[j], j))
    return [j for j in order if j != exclude]


def ref_knn(query, gallery, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """k nearest by (distance, index); ``gallery=None`` means leave-one-out on ``query``."""
    loo = gallery is None
    gal = query if loo else gallery
    dist = ref_distances(query, gal, metric)
    idx = np.array([ref_ranking(dist[i], i if loo else None)[:k] for i in range(len(query))], dtype=np.int64)
    return np.take_along_axis(dist, idx, axis=1), idx


def ref_retrieval(query, query_labels, gallery, gallery_labels, ks, metric: str) -> dict[str, float]:
    """Mean Recall@K, P@1, R-Precision, MAP@R over non-lone queries, plus their count."""
    loo = gallery is None
    gal = query if loo else gallery
    gal_labels = list(query_labels if loo else gallery_labels)
    dist = ref_distances(query, gal, metric)
    sums: dict[str, float] = {f"recall@{k}": 0.0 for k in ks}
    sums.update({"precision@1": 0.0, "r_precision": 0.0, "map@r": 0.0})
    count = 0
    for i, label in enumerate(query_labels):
        ranking = ref_ranking(dist[i], i if loo else None)
        rel = [1 if gal_labels[j] == label else 0 for j in ranking]
        r = sum(rel)
        if r == 0:
            continue
        count += 1
        for k in ks:
            sums[f"recall@{k}"] += 1.0 if any(rel[:k]) else 0.0
        sums["precision@1"] += rel[0]
        sums["r_precision"] += sum(rel[:r]) / r
        ap, hits = 0.0, 0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        sums["map@r"] += ap / r
    out = {name: (value / count if count else float("nan")) for name, value in sums.items()}
    out["num_queries"] = float(count)
    return out


def ref_expected_mutual_information(labels_a, labels_b) -> float:
    """E[MI] by the triple loop over (cluster i, cluster j, n_ij) of the hypergeometric model."""
    n = len(labels_a)
    a = [list(labels_a).count(v) for v in sorted(set(labels_a))]
    b = [list(labels_b).count(v) for v in sorted(set(labels_b))]
    emi = 0.0
    for ai in a:
        for bj in b:
            for nij in range(max(1, ai + bj - n), min(ai, bj) + 1):
                log_p = (
                    math.lgamma(ai + 1) + math.lgamma(bj + 1) + math.lgamma(n - ai + 1) + math.lgamma(n - bj + 1)
                    - math.lgamma(n + 1) - math.lgamma(nij + 1) - math.lgamma(ai - nij + 1)
                    - math.lgamma(bj - nij + 1) - math.lgamma(n - ai - bj + nij + 1)
                )
                emi += nij / n * math.log(n * nij / (ai * bj)) * math.exp(log_p)
    return emi
