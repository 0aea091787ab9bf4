"""Input validation and conversion shared by the evaluation functions (private)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from deepmetric.errors import ConfigError, DataError, NonFiniteError

METRICS = ("euclidean", "cosine")


def _to_numpy(x: Any, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if x is None:
        raise DataError(f"{name} is None; pass a numpy array or a torch tensor")
    return np.asarray(x)


def as_embeddings(x: Any, name: str = "query") -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 ``(N, D)`` array, checking shape and finiteness.

    Raises:
        DataError: not 2-D, no rows, no columns or not real numbers.
        NonFiniteError: NaN or infinity anywhere.
    """
    arr = _to_numpy(x, name)
    if arr.ndim != 2:
        raise DataError(f"{name} must be a 2-D array (num_items, dim); got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise DataError(f"{name} is empty (0 rows); evaluation needs at least one item")
    if arr.shape[1] == 0:
        raise DataError(f"{name} has 0 columns; embeddings need at least one dimension")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    if not finite.all():
        bad_rows = np.flatnonzero(~finite.all(axis=1))
        raise NonFiniteError(
            f"{name} has NaN or infinite values in {bad_rows.size} row(s) (first: row {int(bad_rows[0])}); "
            "check the model output (or values too large for float32) before evaluating"
        )
    return arr


def as_labels(y: Any, num_items: int, name: str = "query_labels") -> np.ndarray:
    """Return ``y`` as a 1-D array of ``num_items`` class labels (integers or strings).

    Raises:
        DataError: wrong shape, wrong length, or non-integral float labels.
    """
    arr = _to_numpy(y, name)
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1-D (one class label per item); got shape {tuple(arr.shape)}")
    if arr.shape[0] != num_items:
        raise DataError(
            f"{name} has {arr.shape[0]} entries but its embeddings have {num_items} rows; "
            "pass one label per embedding"
        )
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{name} must be integer class labels; got non-integral float values")
        arr = arr.astype(np.int64)
    elif np.issubdtype(arr.dtype, np.complexfloating):
        raise DataError(f"{name} must be integer class labels; got dtype {arr.dtype}")
    return arr


def encode_labels(*labels: np.ndarray) -> list[np.ndarray]:
    """Map several label arrays to shared codes ``0 .. L-1`` (int64), preserving equality."""
    try:
        joined = np.concatenate(labels)
    except (TypeError, ValueError) as exc:  # pragma: no cover - mixed incompatible dtypes
        raise DataError(f"query and gallery labels cannot be compared: {exc}") from exc
    _, codes = np.unique(joined, return_inverse=True)
    codes = codes.astype(np.int64).ravel()
    out, start = [], 0
    for lab in labels:
        out.append(codes[start : start + lab.shape[0]])
        start += lab.shape[0]
    return out


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; valid metrics: {', '.join(METRICS)}")
    return metric


def check_ks(ks: Sequence[int] | int) -> tuple[int, ...]:
    """Validate the recall cut-offs: positive integers, at least one; returned sorted and unique."""
    if isinstance(ks, (int, np.integer)):
        ks = (int(ks),)
    try:
        values = tuple(ks)
    except TypeError as exc:
        raise ConfigError(f"ks must be a sequence of positive integers; got {ks!r}") from exc
    if not values:
        raise ConfigError("ks is empty; pass at least one recall cut-off, e.g. ks=(1, 2, 4, 8)")
    for k in values:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"ks must hold positive integers; got {k!r} in {values!r}")
    return tuple(sorted({int(k) for k in values}))


def check_num_threads(num_threads: int | None) -> int:
    if num_threads is None:
        import torch

        return max(1, int(torch.get_num_threads()))
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
        raise ConfigError(f"num_threads must be a positive integer or None; got {num_threads!r}")
    return int(num_threads)


def normalize_rows(x: np.ndarray, name: str) -> np.ndarray:
    """L2-normalise rows (float32) for cosine retrieval; a zero row is an error."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise DataError(
            f"{name} has {zero.size} all-zero row(s) (first: row {int(zero[0])}); "
            "cosine distance is undefined for them: use metric='euclidean' or drop those rows"
        )
    return np.ascontiguousarray(x / norms[:, None].astype(np.float32), dtype=np.float32)
