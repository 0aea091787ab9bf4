"""``evaluate``: retrieval (k-NN) and clustering metrics of embeddings in one call."""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from deepmetric.errors import DataError
from deepmetric.metrics._inputs import (
    as_embeddings,
    as_labels,
    check_ks,
    check_metric,
    check_num_threads,
    encode_labels,
    normalize_rows,
)
from deepmetric.metrics.clustering import kmeans_assign, nmi_ami
from deepmetric.metrics.knn import check_backend, default_block_size, faiss_threads, iter_knn_blocks
from deepmetric.metrics.retrieval import RetrievalAccumulator

__all__ = ["evaluate"]


def evaluate(
    query: Any,
    query_labels: Any,
    gallery: Any = None,
    gallery_labels: Any = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    metric: str = "euclidean",
    clustering: bool = True,
    seed: int = 0,
    num_threads: int | None = None,
    progress: bool = False,
    backend: str = "auto",
) -> dict[str, float]:
    """Retrieval and clustering metrics of labelled embeddings (exact k-NN, MLRC definitions).

    k-NN metrics (see :mod:`deepmetric.metrics.retrieval` for the formulas): ``recall@K`` for each
    ``K`` in ``ks`` (hit if *any* of the top K shares the query's label), ``precision@1``,
    ``r_precision`` and ``map@r``, where ``R`` is the number of gallery items with the query's
    label. The k-NN search is exact (:func:`deepmetric.metrics.knn.knn`'s backends) with ``k = max(max(ks), R_max)`` neighbours,
    ``R_max`` the largest ``R`` of any query, so memory is ``O(N·k)``, never ``N × N``.
    Neighbours are ordered by distance, ties by gallery index (see :mod:`deepmetric.metrics.knn`).

    Leave-one-out (``gallery=None``): the queries are searched among themselves and a query never
    retrieves itself (excluded by index, so exact duplicates still count as neighbours); ``R``
    excludes the query. Queries with ``R = 0`` ("lone" queries) are left out of the k-NN metrics
    and counted in ``num_lone_queries``; if every query is lone the k-NN metrics are NaN.

    Clustering metrics: faiss k-means (seeded by ``seed``; ``KMEANS_NITER`` iterations on at most
    ``KMEANS_MAX_POINTS_PER_CENTROID`` points per centroid, see :mod:`deepmetric.metrics.clustering`)
    of the *query* embeddings (L2-normalised when ``metric="cosine"``) with as many clusters as
    distinct query labels, then ``nmi`` and ``ami`` (arithmetic normaliser, exact expected mutual
    information) against the query labels.

    Args:
        query: ``(N, D)`` embeddings, numpy array or torch tensor (cast to float32).
        query_labels: ``(N,)`` class labels.
        gallery: ``(M, D)`` embeddings to retrieve from; ``None`` for leave-one-out on ``query``.
        gallery_labels: ``(M,)`` labels, required with ``gallery``.
        ks: recall cut-offs. A cut-off larger than the number of retrievable items uses them all.
        metric: ``"euclidean"`` or ``"cosine"`` (``1 - cos``).
        clustering: compute ``nmi`` and ``ami`` (skip to save the k-means time).
        seed: k-means seed.
        num_threads: threads of the k-NN search and of faiss k-means (default
            ``torch.get_num_threads()``), restored afterwards.
        progress: show a tqdm bar over query blocks.
        backend: k-NN backend, ``"auto"``, ``"native"`` or ``"faiss"`` (same neighbours; see
            :mod:`deepmetric.metrics.knn`).

    Returns:
        ``{"recall@K": ..., "precision@1", "r_precision", "map@r", ["nmi", "ami"], "num_queries",
        "num_lone_queries", "k_used"}`` as floats; ``num_queries`` counts the queries in the k-NN
        metrics, ``k_used`` the neighbours retrieved per query.

    Raises:
        DataError: bad shapes, length mismatches, empty sets, gallery without labels.
        NonFiniteError: NaN/inf in the embeddings.
        ConfigError: unknown metric or backend, bad ``ks`` or ``num_threads``.

    Example:
        >>> import numpy as np
        >>> x = np.array([[0.0], [0.1], [5.0], [5.2], [0.3]], dtype=np.float32)
        >>> r = evaluate(x, [0, 0, 1, 1, 1], ks=(1,), clustering=False)
        >>> r["precision@1"], r["num_lone_queries"]
        (0.8, 0.0)
    """
    check_metric(metric)
    check_backend(backend)
    ks = check_ks(ks)
    threads = check_num_threads(num_threads)
    q = as_embeddings(query, "query")
    q_lab = as_labels(query_labels, q.shape[0], "query_labels")
    loo = gallery is None
    if loo:
        if gallery_labels is not None:
            raise DataError("gallery_labels given without gallery; pass both or neither")
        g, g_lab = q, q_lab
    else:
        if gallery_labels is None:
            raise DataError("gallery given without gallery_labels; pass one label per gallery row")
        g = as_embeddings(gallery, "gallery")
        g_lab = as_labels(gallery_labels, g.shape[0], "gallery_labels")
        if g.shape[1] != q.shape[1]:
            raise DataError(f"query has dimension {q.shape[1]} but gallery has dimension {g.shape[1]}")
    if metric == "cosine":
        q = normalize_rows(q, "query")
        g = q if loo else normalize_rows(g, "gallery")

    q_codes, g_codes = encode_labels(q_lab, g_lab) if not loo else encode_labels(q_lab) * 2
    gallery_counts = np.bincount(g_codes, minlength=int(max(q_codes.max(), g_codes.max())) + 1)
    num_relevant = gallery_counts[q_codes] - int(loo)
    valid = np.flatnonzero(num_relevant > 0)
    available = g.shape[0] - int(loo)

    result: dict[str, float] = {}
    acc = RetrievalAccumulator(ks)
    k_used = 0
    if valid.size == 0:
        warnings.warn("no query has a relevant gallery item; k-NN metrics are NaN", RuntimeWarning, stacklevel=2)
    else:
        k_used = int(min(max(ks[-1], int(num_relevant[valid].max())), available))
        queries = q[valid] if valid.size < q.shape[0] else q
        self_ids = valid.astype(np.int64) if loo else None
        with faiss_threads(threads):
            for start, stop, _, idx in iter_knn_blocks(
                queries, g, k_used, metric, self_ids=self_ids,
                block_size=default_block_size(k_used + 1), progress=progress,
                backend=backend, num_threads=threads,
            ):
                rows = valid[start:stop]
                relevant = g_codes[idx] == q_codes[rows, None]
                acc.add(relevant, num_relevant[rows])
    result.update(acc.means())
    if clustering:
        with faiss_threads(threads):
            clusters = kmeans_assign(q, int(np.unique(q_codes).size), seed=seed)
        result["nmi"], result["ami"] = nmi_ami(q_codes, clusters)
    result["num_queries"] = float(acc.count)
    result["num_lone_queries"] = float(q.shape[0] - valid.size)
    result["k_used"] = float(k_used)
    return result
