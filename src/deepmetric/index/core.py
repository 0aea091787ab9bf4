"""A persistent embedding index: vectors under int64 ids with labels, metadata and thumbnails.

Distances returned by :meth:`Index.search` follow deepmetric's one convention, *smaller = closer*:

* ``"euclidean"``: the euclidean distance $$ \\lVert q - x \\rVert_2 $$ (not squared);
* ``"cosine"``: the cosine distance $$ 1 - \\frac{q \\cdot x}{\\lVert q \\rVert \\lVert x \\rVert} $$ in
  ``[0, 2]`` (vectors are L2-normalised when added and queried; a zero vector is refused);
* ``"inner_product"``: the *negated* inner product $$ -\\, q \\cdot x $$ (maximum inner-product search;
  values may be negative).

When fewer than ``k`` items can be returned (a small index, or an IVF search whose probed lists hold
fewer than ``k`` vectors) the rows are padded with id ``-1``, distance ``+inf``, label ``-1`` and
metadata ``None``. Items added without a label carry label ``-1``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from deepmetric.errors import ConfigError
from deepmetric.index.backends import INDEX_BACKENDS
from deepmetric.index.errors import SearchIndexError

__all__ = ["METRICS", "BACKENDS", "Index", "IndexItem", "SearchResult", "recall_against_exact"]

METRICS = ("euclidean", "cosine", "inner_product")
BACKENDS = ("flat", "ivf", "hnsw")
NO_LABEL = -1
PAD_ID = -1


@dataclass(frozen=True)
class SearchResult:
    """Neighbours of ``Q`` queries, best first (see the module docstring for distances and padding).

    Attributes:
        distances: float32 ``(Q, k)``, smaller = closer; ``+inf`` for padding.
        ids: int64 ``(Q, k)``; ``-1`` for padding.
        labels: int64 ``(Q, k)``; ``-1`` for padding or unlabelled items.
        metadata: ``Q`` lists of ``k`` metadata dicts (``None`` for padding or items without metadata).
    """

    distances: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    metadata: list[list[dict[str, Any] | None]]

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def rows(self, query: int = 0) -> list[dict[str, Any]]:
        """The non-padding neighbours of query ``query`` as dicts ``{rank, id, distance, label, metadata}``."""
        out = []
        for rank in range(self.ids.shape[1]):
            item_id = int(self.ids[query, rank])
            if item_id == PAD_ID:
                continue
            out.append({"rank": rank + 1, "id": item_id, "distance": float(self.distances[query, rank]),
                        "label": int(self.labels[query, rank]), "metadata": self.metadata[query][rank]})
        return out


@dataclass(frozen=True)
class IndexItem:
    """One stored item (see :meth:`Index.get`)."""

    id: int
    label: int
    metadata: dict[str, Any] | None
    vector: np.ndarray
    thumbnail: np.ndarray | None


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_ids(ids: Any, n: int, what: str = "ids") -> np.ndarray:
    array = _as_array(ids)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1 or array.shape[0] != n:
        raise SearchIndexError(f"{what} must be a 1-D array of {n} integers; got shape {array.shape}")
    if n and array.dtype.kind not in "iu":
        raise SearchIndexError(f"{what} must be integers; got dtype {array.dtype}")
    if n and array.dtype.kind == "u" and int(array.max()) > np.iinfo(np.int64).max:
        raise SearchIndexError(f"{what} must fit in int64")
    return array.astype(np.int64)


class Index:
    """Embeddings under unique int64 ids, searchable by k-nearest neighbours, saved as a directory.

    Args:
        dim: embedding dimension.
        metric: ``"euclidean"``, ``"cosine"`` or ``"inner_product"`` (see the module docstring).
        backend: ``"flat"`` (exact), ``"ivf"`` or ``"hnsw"`` (approximate); see
            :mod:`deepmetric.index.backends` for what each does and when IVF is trained.
        **backend_params: the back-end's arguments (``ivf``: ``nlist``, ``nprobe``; ``hnsw``: ``M``,
            ``efConstruction``, ``efSearch``); an unknown one raises ConfigError naming the valid ones.

    Attributes:
        provenance: what the index was built from (model fingerprint, checkpoint path, input shape and
            normalisation, class names, dataset); saved in the manifest. Empty for a hand-built index.

    Example:
        >>> import numpy as np
        >>> index = Index(2)
        >>> index.add(np.array([[0.0, 0.0], [3.0, 4.0]]), ids=[10, 20], labels=[0, 1])
        >>> result = index.search(np.array([[0.0, 1.0]]), k=3)
        >>> result.ids.tolist(), [[round(float(d), 3) for d in row] for row in result.distances]
        ([[10, 20, -1]], [[1.0, 4.243, inf]])
    """

    def __init__(self, dim: int, metric: str = "euclidean", backend: str = "flat", **backend_params: Any) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or int(dim) < 1:
            raise ConfigError(f"dim must be a positive integer; got {dim!r}")
        if metric not in METRICS:
            raise ConfigError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
        self.dim = int(dim)
        self.metric = metric
        self.backend_name = backend
        self._backend = INDEX_BACKENDS.build(backend, self.dim, "l2" if metric == "euclidean" else "ip",
                                             **backend_params)
        self._vectors = np.zeros((0, self.dim), dtype=np.float32)
        self._ids = np.zeros(0, dtype=np.int64)
        self._labels = np.zeros(0, dtype=np.int64)
        self._metadata: list[dict[str, Any] | None] = []
        self._thumbnails: np.ndarray | None = None
        self._sorted: tuple[np.ndarray, np.ndarray] | None = None
        self.provenance: dict[str, Any] = {}

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def __contains__(self, item_id: object) -> bool:
        try:
            return self._rows(np.asarray([item_id], dtype=np.int64))[0] >= 0
        except (TypeError, ValueError, OverflowError):
            return False

    def __repr__(self) -> str:
        return (f"Index(dim={self.dim}, metric={self.metric!r}, backend={self.backend_name!r}, "
                f"items={len(self)})")

    @property
    def approximate(self) -> bool:
        """Whether the back-end's search is approximate (``ivf``, ``hnsw``)."""
        return bool(self._backend.approximate)

    @property
    def backend_params(self) -> dict[str, Any]:
        """The back-end's resolved parameters (e.g. the ``nlist`` chosen when IVF was trained)."""
        return dict(self._backend.params())

    @property
    def ids(self) -> np.ndarray:
        """The stored ids, in insertion order (a copy)."""
        return self._ids.copy()

    @property
    def labels(self) -> np.ndarray:
        """The stored labels, aligned with :attr:`ids` (a copy; ``-1`` = no label)."""
        return self._labels.copy()

    @property
    def vectors(self) -> np.ndarray:
        """The stored float32 vectors, aligned with :attr:`ids` (L2-normalised for cosine; a copy)."""
        return self._vectors.copy()

    @property
    def has_thumbnails(self) -> bool:
        return self._thumbnails is not None

    # ------------------------------------------------------------------ helpers
    def _prepare(self, vectors: Any, what: str) -> np.ndarray:
        array = _as_array(vectors)
        if array.ndim == 1 and what == "queries":
            array = array.reshape(1, -1)
        if array.ndim != 2 or array.shape[1] != self.dim:
            raise SearchIndexError(f"{what} must have shape (N, {self.dim}); got {array.shape}")
        if array.dtype.kind not in "iuf":
            raise SearchIndexError(f"{what} must be numeric; got dtype {array.dtype}")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not np.isfinite(array).all():
            bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
            raise SearchIndexError(f"{what} contain NaN or infinite values (row {bad})")
        if self.metric == "cosine" and len(array):
            norms = np.linalg.norm(array, axis=1, keepdims=True)
            if (norms <= 0).any():
                bad = int(np.flatnonzero(norms[:, 0] <= 0)[0])
                raise SearchIndexError(f"{what}: row {bad} is a zero vector, which has no cosine distance")
            array = np.ascontiguousarray(array / norms, dtype=np.float32)
        return array

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of every id in the stored arrays, ``-1`` when absent."""
        if self._sorted is None:
            order = np.argsort(self._ids, kind="stable")
            self._sorted = (self._ids[order], order)
        sorted_ids, order = self._sorted
        pos = np.searchsorted(sorted_ids, ids)
        pos_clipped = np.minimum(pos, max(len(sorted_ids) - 1, 0))
        found = (pos < len(sorted_ids)) & (sorted_ids[pos_clipped] == ids) if len(sorted_ids) else np.zeros(
            ids.shape, bool)
        rows = np.where(found, order[pos_clipped] if len(sorted_ids) else 0, -1)
        return rows.astype(np.int64)

    def _distances(self, raw: np.ndarray) -> np.ndarray:
        raw = raw.astype(np.float32, copy=True)
        if self.metric == "euclidean":
            return np.sqrt(np.maximum(raw, 0.0))
        if self.metric == "cosine":
            return np.maximum(1.0 - raw, 0.0)
        return -raw

    # ------------------------------------------------------------------ mutation
    def add(
        self,
        embeddings: Any,
        ids: Any,
        labels: Any = None,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        thumbnails: Any = None,
    ) -> None:
        """Add ``N`` embeddings under new unique ids.

        Args:
            embeddings: ``(N, dim)`` numbers (numpy array, torch tensor or nested lists).
            ids: ``N`` unique non-negative integers not yet in the index.
            labels: ``N`` integer labels, or None (label ``-1``).
            metadata: ``N`` JSON-serialisable dicts (or None), e.g. the source file of each item.
            thumbnails: optional uint8 images ``(N, H, W)`` or ``(N, C, H, W)`` (C = 1 or 3) shown by the
                search service. Either every add of an index passes them, with one shape, or none does.

        Raises:
            SearchIndexError: wrong shapes or dtypes, NaN/inf, duplicate or already present ids,
                metadata that is not JSON, thumbnails inconsistent with the index.
        """
        vectors = self._prepare(embeddings, "embeddings")
        n = len(vectors)
        new_ids = _as_ids(ids, n)
        if n and int(new_ids.min()) < 0:
            raise SearchIndexError(f"ids must be >= 0 (-1 marks padding in search results); got {int(new_ids.min())}")
        unique, counts = np.unique(new_ids, return_counts=True)
        if (counts > 1).any():
            dup = unique[counts > 1][:5].tolist()
            raise SearchIndexError(f"duplicate ids in this add: {dup}")
        present = new_ids[self._rows(new_ids) >= 0]
        if len(present):
            raise SearchIndexError(f"ids already in the index: {present[:5].tolist()}"
                                   f"{' …' if len(present) > 5 else ''} (remove them first)")
        new_labels = (np.full(n, NO_LABEL, dtype=np.int64) if labels is None
                      else _as_ids(labels, n, "labels"))
        if metadata is None:
            new_meta: list[dict[str, Any] | None] = [None] * n
        else:
            new_meta = list(metadata)
            if len(new_meta) != n:
                raise SearchIndexError(f"metadata must have {n} entries; got {len(new_meta)}")
            for i, m in enumerate(new_meta):
                if m is not None and not isinstance(m, dict):
                    raise SearchIndexError(f"metadata[{i}] must be a dict or None; got {type(m).__name__}")
            try:
                json.dumps(new_meta, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise SearchIndexError(f"metadata must be JSON-serialisable: {exc}") from exc
        new_thumbs = self._check_thumbnails(thumbnails, n)
        if n == 0:
            return
        self._backend.add(vectors, new_ids, live_vectors=self._vectors, live_ids=self._ids)
        self._vectors = np.concatenate([self._vectors, vectors])
        self._ids = np.concatenate([self._ids, new_ids])
        self._labels = np.concatenate([self._labels, new_labels])
        self._metadata.extend(new_meta)
        if new_thumbs is not None:
            self._thumbnails = new_thumbs if self._thumbnails is None else np.concatenate([self._thumbnails, new_thumbs])
        self._sorted = None

    def _check_thumbnails(self, thumbnails: Any, n: int) -> np.ndarray | None:
        if thumbnails is None:
            if self._thumbnails is not None and n:
                raise SearchIndexError("this index stores thumbnails: pass thumbnails for the new items too")
            return None
        array = _as_array(thumbnails)
        if array.ndim == 3:
            array = array[:, None]
        if array.ndim != 4 or array.shape[0] != n or array.shape[1] not in (1, 3) or array.dtype != np.uint8:
            raise SearchIndexError(f"thumbnails must be uint8 (N, H, W) or (N, C, H, W) with N={n}, C=1 or 3; "
                                   f"got {array.dtype} {array.shape}")
        if len(self) and self._thumbnails is None:
            raise SearchIndexError("this index was built without thumbnails; add items without them")
        if self._thumbnails is not None and array.shape[1:] != self._thumbnails.shape[1:]:
            raise SearchIndexError(f"thumbnails must have shape {self._thumbnails.shape[1:]} like the stored ones; "
                                   f"got {array.shape[1:]}")
        return np.ascontiguousarray(array)

    def remove(self, ids: Any) -> None:
        """Remove the items ``ids`` (repeats are ignored).

        Raises:
            SearchIndexError: an id that is not in the index (nothing is removed then).
        """
        array = _as_array(ids)
        gone = np.unique(_as_ids(array.reshape(-1), array.size))
        if not len(gone):
            return
        rows = self._rows(gone)
        missing = gone[rows < 0]
        if len(missing):
            raise SearchIndexError(f"ids not in the index: {missing[:5].tolist()}{' …' if len(missing) > 5 else ''}")
        keep = np.ones(len(self), dtype=bool)
        keep[rows] = False
        self._backend.remove(gone, self._vectors[keep], self._ids[keep])
        self._vectors = self._vectors[keep]
        self._ids = self._ids[keep]
        self._labels = self._labels[keep]
        self._metadata = [m for m, k in zip(self._metadata, keep) if k]
        if self._thumbnails is not None:
            self._thumbnails = self._thumbnails[keep]
        self._sorted = None

    # ------------------------------------------------------------------ queries
    def search(self, queries: Any, k: int = 10) -> SearchResult:
        """The ``k`` nearest stored items of each query, best first.

        Args:
            queries: ``(Q, dim)`` numbers, or one ``(dim,)`` vector (then ``Q = 1``).
            k: neighbours per query (``>= 1``); rows are padded when fewer items exist.

        Raises:
            ConfigError: ``k`` is not a positive integer.
            SearchIndexError: wrong query shape, NaN/inf, or a zero vector with the cosine metric.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
            raise ConfigError(f"k must be a positive integer; got {k!r}")
        k = int(k)
        q = self._prepare(queries, "queries")
        fetch = min(k, len(self))
        distances = np.full((len(q), k), np.inf, dtype=np.float32)
        ids = np.full((len(q), k), PAD_ID, dtype=np.int64)
        if fetch and len(q):
            raw_d, raw_i = self._backend.search(q, fetch)
            valid = raw_i >= 0
            distances[:, :fetch] = np.where(valid, self._distances(raw_d), np.inf)
            ids[:, :fetch] = np.where(valid, raw_i, PAD_ID)
        rows = self._rows(ids.reshape(-1)).reshape(ids.shape)
        labels = np.where(rows >= 0, self._labels[np.maximum(rows, 0)] if len(self) else NO_LABEL, NO_LABEL)
        metadata = [[self._metadata[r] if r >= 0 else None for r in row] for row in rows.tolist()]
        return SearchResult(distances=distances, ids=ids, labels=labels.astype(np.int64), metadata=metadata)

    def get(self, item_id: int) -> IndexItem:
        """The stored item ``item_id`` (label, metadata, vector, thumbnail).

        Raises:
            SearchIndexError: no item has this id.
        """
        try:
            key = np.asarray([item_id], dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SearchIndexError(f"item id must be an integer; got {item_id!r}") from exc
        row = int(self._rows(key)[0])
        if row < 0:
            raise SearchIndexError(f"no item with id {item_id} in the index")
        thumb = self._thumbnails[row].copy() if self._thumbnails is not None else None
        return IndexItem(id=int(self._ids[row]), label=int(self._labels[row]), metadata=self._metadata[row],
                         vector=self._vectors[row].copy(), thumbnail=thumb)

    def thumbnail(self, item_id: int) -> np.ndarray | None:
        """The stored uint8 ``(C, H, W)`` thumbnail of ``item_id`` (None when the index has none)."""
        return self.get(item_id).thumbnail

    # ------------------------------------------------------------------ tuning
    def set_search_params(self, **params: int) -> None:
        """Change search-time parameters: ``nprobe`` (ivf) or ``efSearch`` (hnsw).

        Raises:
            ConfigError: a parameter this back-end does not have.
        """
        valid = {"ivf": ("nprobe",), "hnsw": ("efSearch",)}.get(self.backend_name, ())
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ConfigError(f"unknown search parameter(s) {unknown} for backend {self.backend_name!r}; "
                              f"valid: {', '.join(valid) or '(none)'}")
        if "nprobe" in params:
            self._backend.set_nprobe(params["nprobe"])
        if "efSearch" in params:
            self._backend.set_ef_search(params["efSearch"])

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write the index to ``directory`` atomically (see :func:`deepmetric.index.store.save_index`)."""
        from deepmetric.index.store import save_index

        return save_index(self, directory)

    @classmethod
    def load(cls, directory: str | Path, expected_fingerprint: str | None = None) -> Index:
        """Read an index saved by :meth:`save`, verifying it (see :func:`deepmetric.index.store.load_index`)."""
        from deepmetric.index.store import load_index

        return load_index(directory, expected_fingerprint=expected_fingerprint)

    @classmethod
    def _restore(cls, *, dim: int, metric: str, backend: str, backend_params: dict[str, Any], faiss_bytes: bytes,
                 state: dict[str, np.ndarray], vectors: np.ndarray, ids: np.ndarray, labels: np.ndarray,
                 metadata: list[dict[str, Any] | None], thumbnails: np.ndarray | None,
                 provenance: dict[str, Any]) -> Index:
        index = cls(dim, metric, backend, **backend_params)
        index._backend.restore(faiss_bytes, state)
        index._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        index._ids = ids.astype(np.int64)
        index._labels = labels.astype(np.int64)
        index._metadata = metadata
        index._thumbnails = thumbnails
        index.provenance = dict(provenance)
        return index

    def _backend_state(self) -> tuple[bytes, dict[str, np.ndarray], int]:
        return self._backend.to_bytes(), self._backend.state(), self._backend.ntotal


def recall_against_exact(index: Index, queries: Any, k: int = 10) -> float:
    """Recall@k of ``index``'s search against an exact flat search over the same stored vectors.

    For each query, the fraction of the exact ``k`` nearest ids (at most ``len(index)``) that the
    index returned; averaged over queries. An exact (``flat``) index scores 1.0 up to ties.

    Args:
        index: the index to measure.
        queries: ``(Q, dim)`` queries, e.g. a sample of the stored vectors.
        k: neighbours compared.

    Raises:
        SearchIndexError: an empty index or bad queries.
    """
    if len(index) == 0:
        raise SearchIndexError("recall_against_exact needs a non-empty index")
    exact = Index(index.dim, index.metric, "flat")
    exact.add(index._vectors, index._ids)
    approx_ids = index.search(queries, k).ids
    exact_ids = exact.search(queries, k).ids
    if len(exact_ids) == 0:
        raise SearchIndexError("recall_against_exact needs at least one query")
    hits = []
    for found, truth in zip(approx_ids, exact_ids):
        truth = truth[truth >= 0]
        hits.append(len(np.intersect1d(found[found >= 0], truth)) / max(len(truth), 1))
    return float(np.mean(hits))
