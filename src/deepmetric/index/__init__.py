"""Retrieval in use: a persistent embedding index (exact or approximate, on faiss) and its tools.

Example:
    >>> import numpy as np
    >>> from deepmetric.index import Index
    >>> index = Index(dim=4, metric="cosine")
    >>> index.add(np.eye(4), ids=[7, 8, 9, 10], labels=[0, 0, 1, 1])
    >>> index.search(np.array([1.0, 0.1, 0.0, 0.0]), k=2).ids.tolist()
    [[7, 8]]

See :mod:`deepmetric.index.core` (distances, padding), :mod:`deepmetric.index.backends` (flat, ivf,
hnsw) and :mod:`deepmetric.index.store` (the directory format, checksums, atomic replacement).
"""
from __future__ import annotations

from deepmetric.index.backends import INDEX_BACKENDS, FlatIndex, HNSWIndex, IVFIndex
from deepmetric.index.core import BACKENDS, METRICS, Index, IndexItem, SearchResult, recall_against_exact
from deepmetric.index.errors import SearchIndexError
from deepmetric.index.store import FORMAT, VERSION, load_index, read_manifest, save_index

__all__ = [
    "Index",
    "IndexItem",
    "SearchResult",
    "SearchIndexError",
    "recall_against_exact",
    "save_index",
    "load_index",
    "read_manifest",
    "METRICS",
    "BACKENDS",
    "INDEX_BACKENDS",
    "FlatIndex",
    "IVFIndex",
    "HNSWIndex",
    "FORMAT",
    "VERSION",
]
