"""Label passes in C (``pair_rows.c``, where they apply): dense class ids, the N-pair batch's pairs."""
from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from deepmetric._native import load

__all__ = ["dense_label_ids", "first_pair_rows", "label_kernel"]


def label_kernel(labels: Tensor) -> tuple[ctypes.CDLL, Tensor] | None:
    """``(pair_rows library, contiguous labels)`` where the C label passes apply (1-D int64 labels on
    the CPU, the library built), else ``None``."""
    if labels.dtype != torch.int64 or labels.device.type != "cpu" or labels.dim() != 1:
        return None
    lib = load("pair_rows")
    return None if lib is None else (lib, labels.contiguous())


def dense_label_ids(labels: Tensor) -> tuple[Tensor, int]:
    """``(ids, classes)``: contiguous int32 ids in ``[0, classes)`` with ``ids[i] == ids[j]`` iff
    ``labels[i] == labels[j]``. For 1-D int64 CPU labels by open addressing in C (ids in order of first
    appearance; at B = 512 one C call instead of :func:`torch.unique`'s sort), else (another dtype or
    device, no kernel) from :func:`torch.unique` (ids in label order)."""
    native = label_kernel(labels)
    if native is not None:
        lib, src = native
        ids = torch.empty(src.shape[0], dtype=torch.int32)
        classes = lib.dm_dense_labels(src.data_ptr(), src.shape[0], ids.data_ptr())
        if classes >= 0:
            return ids, int(classes)
    uniq, inverse = torch.unique(labels, return_inverse=True)
    return inverse.to(torch.int32).contiguous(), uniq.numel()


def first_pair_rows(labels: Tensor) -> Tensor:
    """The paper's N-pair batch in a labelled batch: for every class with at least two samples, its
    first two samples in batch order. Returns ``rows``, int64 of length 2m: ``rows[:m]`` the first
    ones (anchors), ``rows[m:]`` the second ones (positives), class by class. Classes come in order
    of first appearance for 1-D int64 CPU labels (one C pass, ``dm_first_pairs``), else in label
    order (:func:`torch.unique` and a stable sort)."""
    native = label_kernel(labels)
    if native is not None:
        lib, src = native
        rows = torch.empty(src.shape[0], dtype=torch.int64)
        pairs = lib.dm_first_pairs(src.data_ptr(), src.shape[0], rows.data_ptr())
        if pairs >= 0:
            return rows[: 2 * pairs]
    _, ids, counts = torch.unique(labels.reshape(-1), return_inverse=True, return_counts=True)
    order = torch.argsort(ids, stable=True)
    starts = (torch.cumsum(counts, 0) - counts)[counts >= 2]
    return torch.cat([order[starts], order[starts + 1]])
