"""Retrieval metrics computed from the labels of each query's ranked neighbours.

Definitions (Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020, §3.2), for a
query with ``R`` relevant gallery items (same label; the query itself excluded in leave-one-out) and
``rel(i) = 1`` if the ``i``-th neighbour is relevant:

$$ \\mathrm{Recall@K} = \\mathbb{1}[\\textstyle\\sum_{i \\le K} rel(i) > 0] \\qquad
   \\mathrm{P@1} = rel(1) \\qquad
   \\mathrm{R\\text{-}Precision} = \\frac{1}{R} \\sum_{i \\le R} rel(i) $$

$$ \\mathrm{MAP@R} = \\frac{1}{R} \\sum_{i=1}^{R} P(i)\\, rel(i), \\qquad
   P(i) = \\frac{1}{i} \\sum_{j \\le i} rel(j) $$

Recall@K is the deep-metric-learning recall (a hit if *any* of the top K is relevant), not the
information-retrieval recall. Each metric is averaged over queries with ``R >= 1``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["retrieval_scores", "retrieval_metrics", "RetrievalAccumulator"]


def retrieval_scores(
    relevant: np.ndarray, num_relevant: np.ndarray, ks: Sequence[int]
) -> dict[str, np.ndarray]:
    """Per-query metric values from a ranked relevance matrix.

    Args:
        relevant: ``(Q, k)`` boolean, ``relevant[q, i]`` = the ``i``-th neighbour of ``q`` shares
            its label. ``k`` must be at least ``num_relevant.max()``; cut-offs ``K > k`` use all
            ``k`` neighbours.
        num_relevant: ``(Q,)`` integers ``R >= 1``.
        ks: recall cut-offs.

    Returns:
        ``{"recall@K": ..., "precision@1", "r_precision", "map@r"}``, each a float64 ``(Q,)`` array.
    """
    relevant = np.asarray(relevant, dtype=bool)
    r = np.asarray(num_relevant, dtype=np.int64)
    q, k = relevant.shape
    if q and (r.min() < 1 or r.max() > k):
        raise ValueError(f"num_relevant must lie in [1, k={k}]; got range [{r.min()}, {r.max()}]")
    out: dict[str, np.ndarray] = {}
    for cut in ks:
        out[f"recall@{cut}"] = relevant[:, : min(cut, k)].any(axis=1).astype(np.float64)
    out["precision@1"] = relevant[:, 0].astype(np.float64) if k else np.zeros(q)
    hits = np.cumsum(relevant, axis=1, dtype=np.int32)  # hits[q, i] = relevant among first i+1
    rows = np.arange(q)
    out["r_precision"] = hits[rows, r - 1] / r
    within_r = np.arange(k)[None, :] < r[:, None]
    ranks = np.arange(1, k + 1, dtype=np.float64)
    precision_at_hit = np.where(relevant & within_r, hits / ranks, 0.0)
    out["map@r"] = precision_at_hit.sum(axis=1) / r
    return out


def retrieval_metrics(
    knn_labels: np.ndarray, query_labels: np.ndarray, num_relevant: np.ndarray, ks: Sequence[int] = (1,)
) -> dict[str, float]:
    """Mean metrics from the ``(Q, k)`` labels of ranked neighbours (see module docstring)."""
    knn_labels = np.asarray(knn_labels)
    relevant = knn_labels == np.asarray(query_labels)[:, None]
    return {name: float(v.mean()) for name, v in retrieval_scores(relevant, num_relevant, ks).items()}


class RetrievalAccumulator:
    """Sums per-query metric values over query blocks; ``means()`` gives the averages."""

    def __init__(self, ks: Sequence[int]) -> None:
        self.ks = tuple(ks)
        self.count = 0
        self.sums: dict[str, float] = {}

    def add(self, relevant: np.ndarray, num_relevant: np.ndarray) -> None:
        """Add one block of queries."""
        for name, values in retrieval_scores(relevant, num_relevant, self.ks).items():
            self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.count += int(relevant.shape[0])

    def means(self) -> dict[str, float]:
        """Averages over all queries added (NaN for every metric when none were)."""
        names = [f"recall@{k}" for k in self.ks] + ["precision@1", "r_precision", "map@r"]
        if self.count == 0:
            return {name: float("nan") for name in names}
        return {name: self.sums[name] / self.count for name in names}
