"""Exact k-nearest-neighbour search (faiss, blocked over queries).

Ordering and ties: the neighbours of a query are sorted by increasing distance; equal distances
(as computed in float32) are ordered by increasing gallery index, and when equidistant items compete
for the last of the ``k`` places the lowest gallery indices win. The leave-one-out search
(``gallery=None``) excludes each query by *index*, never by distance, so an exact duplicate of a
query is still one of its neighbours.

Memory is ``O(N·k)``: queries are searched in blocks with faiss' exhaustive search (``faiss.knn``:
the kernels of ``IndexFlatL2`` / ``IndexFlatIP``, without copying the gallery into an index), so no
``N × N`` matrix is ever built.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np

from deepmetric.errors import ConfigError, DataError
from deepmetric.metrics._inputs import (
    as_embeddings,
    check_metric,
    check_num_threads,
    normalize_rows,
)

__all__ = ["knn", "faiss_threads", "iter_knn_blocks", "default_block_size"]


@contextmanager
def faiss_threads(num_threads: int) -> Iterator[None]:
    """Run the body with faiss (OpenMP) set to ``num_threads`` threads, restoring the old value after."""
    import faiss

    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(num_threads))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def default_block_size(k: int) -> int:
    """Queries per faiss call: about 64 MB of (distance, index) results, between 1,024 and 16,384."""
    return int(max(1024, min(16384, (64 << 20) // (12 * (k + 1)))))


def _sort_rows(dist: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order each row by (distance, index), the documented tie rule.

    faiss returns rows sorted by distance, so only the rows holding equal neighbouring distances
    need the (distance, index) sort; a row out of order (never seen from faiss) is sorted too.
    One comparison over the block instead of a lexsort of every row (the sort took ~8 % of a
    leave-one-out evaluation)."""
    rows = np.flatnonzero(~(dist[:, 1:] > dist[:, :-1]).all(axis=1))  # a tie, a descent or a NaN
    if rows.size:
        sub_d, sub_i = dist[rows], idx[rows]
        order = np.lexsort((sub_i, sub_d), axis=-1)
        dist[rows] = np.take_along_axis(sub_d, order, axis=1)
        idx[rows] = np.take_along_axis(sub_i, order, axis=1)
    return dist, idx


def iter_knn_blocks(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    metric: str,
    *,
    self_ids: np.ndarray | None = None,
    block_size: int | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """Yield ``(start, stop, distances, indices)`` for consecutive blocks of ``queries``.

    ``queries`` and ``gallery`` are prepared float32 arrays (already L2-normalised for cosine).
    ``distances`` are squared euclidean distances or cosine distances ``1 - cos``, clamped at 0;
    ``indices`` are gallery rows (int64), both ``(stop - start, k)``. With ``self_ids`` (the gallery
    row of every query) each query's own row is excluded (leave-one-out); ``k`` must then be at most
    ``len(gallery) - 1``, else at most ``len(gallery)``.
    """
    from tqdm.auto import tqdm

    loo = self_ids is not None
    search_k = k + 1 if loo else k
    if search_k > gallery.shape[0]:
        raise DataError(f"k={k} neighbours requested but only {gallery.shape[0] - int(loo)} are available")
    import faiss

    faiss_metric = faiss.METRIC_L2 if metric == "euclidean" else faiss.METRIC_INNER_PRODUCT
    bs = block_size or default_block_size(search_k)
    starts = range(0, queries.shape[0], bs)
    bar = tqdm(total=queries.shape[0], disable=not progress, desc="k-NN", unit="query", leave=False)
    try:
        for start in starts:
            stop = min(start + bs, queries.shape[0])
            dist, idx = faiss.knn(queries[start:stop], gallery, search_k, metric=faiss_metric)
            if metric == "cosine":
                dist = 1.0 - dist
            np.maximum(dist, 0.0, out=dist)
            dist, idx = _sort_rows(dist, idx)
            if loo:
                is_self = idx == self_ids[start:stop, None]
                is_self[~is_self.any(axis=1), -1] = True  # self pushed out by duplicates: drop the last
                keep = ~is_self
                dist = dist[keep].reshape(stop - start, k)
                idx = idx[keep].reshape(stop - start, k)
            bar.update(stop - start)
            yield start, stop, dist, idx
    finally:
        bar.close()


def knn(
    query: Any,
    gallery: Any = None,
    k: int = 10,
    *,
    metric: str = "euclidean",
    num_threads: int | None = None,
    block_size: int | None = None,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``k`` nearest gallery items of every query (faiss exhaustive search, blocked over queries).

    Args:
        query: ``(N, D)`` embeddings (numpy array or torch tensor).
        gallery: ``(M, D)`` embeddings searched; ``None`` searches ``query`` itself leave-one-out
            (a query never returns itself; exact duplicates of it are still returned).
        k: neighbours per query, ``1 <= k <= M`` (``<= N - 1`` leave-one-out).
        metric: ``"euclidean"`` (faiss L2 search) or ``"cosine"`` (faiss inner-product search on
            L2-normalised vectors, distance ``1 - cos``).
        num_threads: faiss threads (default ``torch.get_num_threads()``); restored afterwards.
        block_size: queries per faiss call (default about 64 MB of results per block).
        progress: show a tqdm bar over queries.

    Returns:
        ``(distances, indices)``: float32 and int64 arrays of shape ``(N, k)``, nearest first; ties
        broken by the lower gallery index. Euclidean distances are not squared.

    Raises:
        DataError: bad shapes, empty sets, dimension mismatch, ``k`` larger than the gallery.
        NonFiniteError: NaN/inf in the embeddings.
        ConfigError: unknown metric, non-positive ``k``, ``num_threads`` or ``block_size``.

    Example:
        >>> import numpy as np
        >>> x = np.array([[0.0], [1.0], [3.0]], dtype=np.float32)
        >>> d, i = knn(x, k=1)
        >>> i.ravel().tolist(), d.ravel().tolist()
        ([1, 0, 1], [1.0, 1.0, 2.0])
    """
    check_metric(metric)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k must be a positive integer; got {k!r}")
    if block_size is not None and (not isinstance(block_size, (int, np.integer)) or block_size < 1):
        raise ConfigError(f"block_size must be a positive integer or None; got {block_size!r}")
    threads = check_num_threads(num_threads)
    q = as_embeddings(query, "query")
    loo = gallery is None
    g = q if loo else as_embeddings(gallery, "gallery")
    if g.shape[1] != q.shape[1]:
        raise DataError(f"query has dimension {q.shape[1]} but gallery has dimension {g.shape[1]}")
    available = g.shape[0] - int(loo)
    if k > available:
        raise DataError(
            f"k={k} but only {available} gallery item(s) can be returned per query"
            + (" (leave-one-out excludes the query itself)" if loo else "")
        )
    if metric == "cosine":
        q = normalize_rows(q, "query")
        g = q if loo else normalize_rows(g, "gallery")
    dist = np.empty((q.shape[0], k), dtype=np.float32)
    idx = np.empty((q.shape[0], k), dtype=np.int64)
    self_ids = np.arange(q.shape[0], dtype=np.int64) if loo else None
    with faiss_threads(threads):
        for start, stop, d, i in iter_knn_blocks(
            q, g, int(k), metric, self_ids=self_ids, block_size=block_size, progress=progress
        ):
            dist[start:stop] = d
            idx[start:stop] = i
    if metric == "euclidean":
        np.sqrt(dist, out=dist)
    return dist, idx
