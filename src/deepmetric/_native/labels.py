"""Dense class ids of a label vector (one C pass, ``dm_dense_labels`` in ``pair_rows.c``, where it applies)."""
from __future__ import annotations

import torch
from torch import Tensor

from deepmetric._native import load

__all__ = ["dense_label_ids"]


def dense_label_ids(labels: Tensor) -> tuple[Tensor, int]:
    """``(ids, classes)``: contiguous int32 ids in ``[0, classes)`` with ``ids[i] == ids[j]`` iff
    ``labels[i] == labels[j]``. For 1-D int64 CPU labels by open addressing in C (ids in order of first
    appearance; at B = 512 one C call instead of :func:`torch.unique`'s sort), else (another dtype or
    device, no kernel) from :func:`torch.unique` (ids in label order)."""
    if labels.dtype == torch.int64 and labels.device.type == "cpu" and labels.dim() == 1:
        lib = load("pair_rows")
        if lib is not None:
            src = labels.contiguous()
            ids = torch.empty(src.shape[0], dtype=torch.int32)
            classes = lib.dm_dense_labels(src.data_ptr(), src.shape[0], ids.data_ptr())
            if classes >= 0:
                return ids, int(classes)
    uniq, inverse = torch.unique(labels, return_inverse=True)
    return inverse.to(torch.int32).contiguous(), uniq.numel()
