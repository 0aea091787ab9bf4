"""faiss back-ends of :class:`~deepmetric.index.Index`: exact ``flat``, approximate ``ivf`` and ``hnsw``.

A back-end stores prepared float32 vectors (already L2-normalised for the cosine metric) under int64
ids and answers raw faiss searches. It knows two faiss metrics only: ``"l2"`` (squared euclidean
distances) and ``"ip"`` (inner products); :class:`~deepmetric.index.Index` converts the results to
its documented distances.

* ``flat``: ``IndexIDMap2(IndexFlatL2 | IndexFlatIP)``, exhaustive and exact; ``remove`` is native.
* ``ivf``: ``IndexIVFFlat`` with ``nlist`` inverted lists (default ``round(4·√N)``, at most ``N``). The
  coarse quantiser is **trained on the vectors of the first non-empty ``add``**: later additions are
  assigned to those centroids without retraining (rebuild the index if the data drifts). A search
  visits ``nprobe`` lists (default 8). ``remove`` is native.
* ``hnsw``: ``IndexIDMap2(IndexHNSWFlat)`` with ``M`` = 32 links per node, ``efConstruction`` = 40 and
  ``efSearch`` = 64. faiss cannot delete from an HNSW graph, so ``remove`` records *tombstones*: the
  removed ids stay in the graph but are filtered out inside faiss' search by an ``IDSelector`` (so a
  search still returns ``k`` live items, no over-fetching needed). When tombstones exceed
  :data:`HNSW_COMPACT_FRACTION` of the graph — or when a removed id is added again — the graph is
  rebuilt from the stored live vectors. Tombstones are saved with the index.

Back-ends are registered in :data:`INDEX_BACKENDS` (``deepmetric.registry.Registry``), so their keyword
arguments are validated: an unknown one raises :class:`~deepmetric.errors.ConfigError` naming the
valid ones.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from deepmetric.errors import ConfigError
from deepmetric.registry import Registry

__all__ = ["INDEX_BACKENDS", "FlatIndex", "IVFIndex", "HNSWIndex", "HNSW_COMPACT_FRACTION", "default_nlist"]

INDEX_BACKENDS: Registry[Any] = Registry("index backend")

#: Fraction of tombstoned nodes in an HNSW graph above which ``remove`` rebuilds the graph.
HNSW_COMPACT_FRACTION = 0.2


def _faiss_metric(metric: str) -> int:
    import faiss

    if metric == "l2":
        return faiss.METRIC_L2
    if metric == "ip":
        return faiss.METRIC_INNER_PRODUCT
    raise ConfigError(f"faiss metric must be 'l2' or 'ip'; got {metric!r}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def default_nlist(n: int) -> int:
    """IVF list count for ``n`` training vectors: ``round(4·√n)``, between 1 and ``n``."""
    return int(max(1, min(n, round(4.0 * math.sqrt(max(n, 1))))))


def _empty_result(q: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((q, k), np.nan, dtype=np.float32), np.full((q, k), -1, dtype=np.int64)


class _Backend:
    """Shared plumbing (not public): the faiss object, serialisation and parameters."""

    approximate: ClassVar[bool] = False

    def __init__(self, dim: int, metric: str) -> None:
        self.dim = _positive_int("dim", dim)
        self.metric = metric
        self._faiss_metric = _faiss_metric(metric)
        self.index: Any = None

    @property
    def ntotal(self) -> int:
        """Vectors held by the faiss index (tombstones included)."""
        return int(self.index.ntotal) if self.index is not None else 0

    def params(self) -> dict[str, Any]:
        """The constructor arguments that reproduce this back-end (saved in the manifest)."""
        return {}

    def state(self) -> dict[str, np.ndarray]:
        """Extra arrays to save next to the vectors (e.g. tombstones)."""
        return {}

    def to_bytes(self) -> bytes:
        """The faiss index serialised (``faiss.serialize_index``); empty bytes when nothing is built."""
        import faiss

        if self.index is None:
            return b""
        return faiss.serialize_index(self.index).tobytes()

    def restore(self, data: bytes, state: dict[str, np.ndarray]) -> None:
        """Load a faiss index written by :meth:`to_bytes` (and the :meth:`state` arrays)."""
        import faiss

        self.index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)) if data else None
        if self.index is not None and int(self.index.d) != self.dim:
            raise ValueError(f"the faiss index has dimension {self.index.d}, the manifest says {self.dim}")

    def add(self, vectors: np.ndarray, ids: np.ndarray, live_vectors: np.ndarray | None = None,
            live_ids: np.ndarray | None = None) -> None:
        """Add ``vectors`` under ``ids``; ``live_*`` are the vectors and ids held before this call."""
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray, live_vectors: np.ndarray, live_ids: np.ndarray) -> None:
        """Remove ``ids``; ``live_*`` are the vectors and ids that remain afterwards."""
        import faiss

        removed = self.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))
        if int(removed) != len(ids):
            raise RuntimeError(f"faiss removed {removed} vectors instead of {len(ids)}")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw faiss ``(distances, ids)``, ``(Q, k)``; missing results have id -1."""
        if self.index is None or self.ntotal == 0:
            return _empty_result(len(queries), k)
        distances, ids = self.index.search(queries, k)
        return distances, ids


@INDEX_BACKENDS.register("flat")
class FlatIndex(_Backend):
    """Exact exhaustive search: ``IndexIDMap2`` over ``IndexFlatL2`` / ``IndexFlatIP``.

    Args:
        dim: vector dimension.
        metric: ``"l2"`` or ``"ip"``.
    """

    approximate = False

    def __init__(self, dim: int, metric: str = "l2") -> None:
        import faiss

        super().__init__(dim, metric)
        flat = faiss.IndexFlatL2(self.dim) if metric == "l2" else faiss.IndexFlatIP(self.dim)
        self.index = faiss.IndexIDMap2(flat)


@INDEX_BACKENDS.register("ivf")
class IVFIndex(_Backend):
    """Approximate search over inverted lists: ``IndexIVFFlat`` (trained on the first added vectors).

    Args:
        dim: vector dimension.
        metric: ``"l2"`` or ``"ip"``.
        nlist: number of inverted lists; None = ``round(4·√N)`` for the ``N`` vectors of the first add.
        nprobe: lists visited per query (more = better recall, slower).
    """

    approximate = True

    def __init__(self, dim: int, metric: str = "l2", nlist: int | None = None, nprobe: int = 8) -> None:
        super().__init__(dim, metric)
        self.nlist = None if nlist is None else _positive_int("nlist", nlist)
        self.nprobe = _positive_int("nprobe", nprobe)

    def params(self) -> dict[str, Any]:
        return {"nlist": self.nlist, "nprobe": self.nprobe}

    @property
    def trained(self) -> bool:
        """Whether the coarse quantiser has been trained (it is, after the first non-empty add)."""
        return self.index is not None

    def _train(self, vectors: np.ndarray) -> None:
        import faiss

        nlist = self.nlist or default_nlist(len(vectors))
        if nlist > len(vectors):
            raise ConfigError(f"ivf: nlist={nlist} needs at least {nlist} vectors in the first add; got {len(vectors)}")
        quantizer = faiss.IndexFlatL2(self.dim) if self.metric == "l2" else faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, self._faiss_metric)
        index.cp.seed = 1234
        index.cp.min_points_per_centroid = 1  # small first batches are fine; silences faiss' warning
        index.train(vectors)
        index.nprobe = self.nprobe
        self.index = index
        self.nlist = nlist

    def add(self, vectors: np.ndarray, ids: np.ndarray, live_vectors: np.ndarray | None = None,
            live_ids: np.ndarray | None = None) -> None:
        if self.index is None:
            self._train(vectors)
        self.index.add_with_ids(vectors, ids)

    def restore(self, data: bytes, state: dict[str, np.ndarray]) -> None:
        super().restore(data, state)
        if self.index is not None:
            self.index.nprobe = self.nprobe

    def set_nprobe(self, nprobe: int) -> None:
        """Change the number of lists visited per query."""
        self.nprobe = _positive_int("nprobe", nprobe)
        if self.index is not None:
            self.index.nprobe = self.nprobe


@INDEX_BACKENDS.register("hnsw")
class HNSWIndex(_Backend):
    """Approximate search on a navigable small-world graph: ``IndexIDMap2(IndexHNSWFlat)``.

    ``remove`` tombstones ids (filtered inside faiss' search) and rebuilds the graph when tombstones
    exceed :data:`HNSW_COMPACT_FRACTION` of it.

    Args:
        dim: vector dimension.
        metric: ``"l2"`` or ``"ip"``.
        M: graph links per node.
        efConstruction: candidate list size while building.
        efSearch: candidate list size while searching (more = better recall, slower).
    """

    approximate = True

    def __init__(self, dim: int, metric: str = "l2", M: int = 32, efConstruction: int = 40,  # noqa: N803
                 efSearch: int = 64) -> None:  # noqa: N803
        super().__init__(dim, metric)
        self.M = _positive_int("M", M)
        self.efConstruction = _positive_int("efConstruction", efConstruction)
        self.efSearch = _positive_int("efSearch", efSearch)
        self.tombstones: np.ndarray = np.zeros(0, dtype=np.int64)
        self._selector: Any = None
        self.index = self._new_graph()

    def _new_graph(self) -> Any:
        import faiss

        graph = faiss.IndexHNSWFlat(self.dim, self.M, self._faiss_metric)
        graph.hnsw.efConstruction = self.efConstruction
        graph.hnsw.efSearch = self.efSearch
        return faiss.IndexIDMap2(graph)

    def params(self) -> dict[str, Any]:
        return {"M": self.M, "efConstruction": self.efConstruction, "efSearch": self.efSearch}

    def state(self) -> dict[str, np.ndarray]:
        return {"tombstones": self.tombstones.copy()}

    def restore(self, data: bytes, state: dict[str, np.ndarray]) -> None:
        super().restore(data, state)
        if self.index is None:
            self.index = self._new_graph()
        self.tombstones = np.asarray(state.get("tombstones", np.zeros(0)), dtype=np.int64)
        self._selector = None

    def set_ef_search(self, ef_search: int) -> None:
        """Change the search candidate list size."""
        self.efSearch = _positive_int("efSearch", ef_search)

    def _rebuild(self, live_vectors: np.ndarray, live_ids: np.ndarray) -> None:
        self.index = self._new_graph()
        if len(live_ids):
            self.index.add_with_ids(live_vectors, live_ids)
        self.tombstones = np.zeros(0, dtype=np.int64)
        self._selector = None

    def add(self, vectors: np.ndarray, ids: np.ndarray, live_vectors: np.ndarray | None = None,
            live_ids: np.ndarray | None = None) -> None:
        if len(self.tombstones) and np.isin(ids, self.tombstones).any():
            # A re-added id would be hidden by its own tombstone: compact first.
            if live_vectors is None or live_ids is None:
                raise RuntimeError("hnsw: re-adding a removed id needs the live vectors to rebuild the graph")
            self._rebuild(live_vectors, live_ids)
        self.index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray, live_vectors: np.ndarray, live_ids: np.ndarray) -> None:
        self.tombstones = np.union1d(self.tombstones, np.asarray(ids, dtype=np.int64))
        self._selector = None
        if len(self.tombstones) > HNSW_COMPACT_FRACTION * max(self.ntotal, 1):
            self._rebuild(live_vectors, live_ids)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if self.ntotal == 0:
            return _empty_result(len(queries), k)
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(self.efSearch, k)
        if len(self.tombstones):
            if self._selector is None:
                batch = faiss.IDSelectorBatch(self.tombstones)
                self._selector = (faiss.IDSelectorNot(batch), batch)  # keep ``batch`` alive
            params.sel = self._selector[0]
        distances, ids = self.index.search(queries, k, params=params)
        return distances, ids
