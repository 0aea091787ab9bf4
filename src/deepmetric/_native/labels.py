"""Dense class ids of a label vector in one C pass (``dm_dense_labels`` in ``pair_rows.c``)."""
from __future__ import annotations

import torch
from torch import Tensor

from deepmetric._native import load

__all__ = ["dense_label_ids"]


def dense_label_ids(labels: Tensor) -> tuple[Tensor, int] | None:
    """``(ids, classes)``: contiguous int32 ids in ``[0, classes)`` with ``ids[i] == ids[j]`` iff
    ``labels[i] == labels[j]`` (numbered in order of first appearance), from 1-D int64 CPU labels by
    open addressing in C; ``None`` where that does not apply (another dtype or device, no kernel).
    At B = 512 this is one C call instead of :func:`torch.unique`'s sort."""
    if labels.dtype != torch.int64 or labels.device.type != "cpu" or labels.dim() != 1:
        return None
    lib = load("pair_rows")
    if lib is None:
        return None
    src = labels.contiguous()
    ids = torch.empty(src.shape[0], dtype=torch.int32)
    classes = lib.dm_dense_labels(src.data_ptr(), src.shape[0], ids.data_ptr())
    return (ids, int(classes)) if classes >= 0 else None
