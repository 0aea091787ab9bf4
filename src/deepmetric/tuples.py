"""Index tuples exchanged between miners and losses, and label masks.

Conventions (the whole library uses them):

* **Triplets** ``(a, p, n)``: three 1-D ``long`` tensors of equal length; ``a`` indexes the
  embeddings (anchors), ``p`` and ``n`` index the reference set (``ref_embeddings``, which is the
  batch itself by default). ``labels[a] == ref_labels[p]`` and ``labels[a] != ref_labels[n]``.
* **Pairs** ``(a1, p, a2, n)``: positive pairs ``(a1[i], p[i])`` and negative pairs ``(a2[j], n[j])``,
  the layout PML uses, so mined output is interchangeable.
* A loss that needs pairs accepts triplets (converted to their unique pairs), and a loss that needs
  triplets accepts pairs: the triplets are then every ``(a, p, n)`` with ``(a, p)`` a given positive
  pair and ``(a, n)`` a given negative pair. That set is never materialised; losses work on the
  ``(B, R)`` pair masks returned by :func:`pair_masks_from_indices`.
* When the reference set is the batch itself, an element is never paired with itself.
"""
from __future__ import annotations

import math

from typing import Union

import torch
from torch import Tensor

from deepmetric.errors import ConfigError, DataError, NonFiniteError

__all__ = [
    "Triplets",
    "Pairs",
    "Indices",
    "is_triplets",
    "is_pairs",
    "check_inputs",
    "check_label_free_inputs",
    "label_masks",
    "pair_masks_from_indices",
    "triplets_to_pairs",
    "masks_to_pairs",
    "empty_pairs",
    "empty_triplets",
    "zero_loss",
]

Triplets = tuple[Tensor, Tensor, Tensor]
Pairs = tuple[Tensor, Tensor, Tensor, Tensor]
Indices = Union[Triplets, Pairs]


def is_triplets(indices: object) -> bool:
    return isinstance(indices, (tuple, list)) and len(indices) == 3


def is_pairs(indices: object) -> bool:
    return isinstance(indices, (tuple, list)) and len(indices) == 4


def all_finite(t: Tensor) -> bool:
    """Whether ``t`` has no NaN/inf: for floating tensors one ``aminmax`` pass (NaN propagates to
    both ends, ±inf shows at one of them) instead of an elementwise ``isfinite`` mask."""
    if t.numel() == 0 or not t.is_floating_point():
        return bool(torch.isfinite(t).all())
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())  # no further tensor operations


def check_inputs(
    embeddings: Tensor,
    labels: Tensor,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    check_finite: bool = True,
    continuous_labels: bool = False,
) -> tuple[Tensor, Tensor]:
    """Validate shapes (and finiteness) and return ``(ref_embeddings, ref_labels)``.

    Raises:
        DataError: wrong ranks, mismatched lengths or dimensions, empty batch.
        NonFiniteError: NaN/inf in embeddings.
    """
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
        raise DataError(
            f"embeddings must be a 2-D tensor (batch, dim); got shape {tuple(getattr(embeddings, 'shape', ()))}"
        )
    if not isinstance(labels, Tensor):
        raise DataError(f"labels must be a tensor; got {type(labels).__name__}")
    if continuous_labels:
        if labels.shape[0] != embeddings.shape[0]:
            raise DataError(
                f"labels have {labels.shape[0]} rows but embeddings have {embeddings.shape[0]}"
            )
    elif labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise DataError(
            f"labels must be 1-D with one label per embedding: embeddings {tuple(embeddings.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if embeddings.shape[0] == 0:
        raise DataError("empty batch: embeddings have 0 rows")
    if check_finite and not all_finite(embeddings):
        raise NonFiniteError("embeddings contain NaN or infinite values")
    if ref_embeddings is None:
        if ref_labels is not None:
            raise DataError("ref_labels given without ref_embeddings")
        return embeddings, labels
    if ref_labels is None:
        raise DataError("ref_embeddings given without ref_labels")
    if ref_embeddings.dim() != 2 or ref_embeddings.shape[1] != embeddings.shape[1]:
        raise DataError(
            f"ref_embeddings must be (R, {embeddings.shape[1]}); got {tuple(ref_embeddings.shape)}"
        )
    if ref_labels.shape[0] != ref_embeddings.shape[0]:
        raise DataError(
            f"ref_labels have {ref_labels.shape[0]} rows but ref_embeddings have {ref_embeddings.shape[0]}"
        )
    if check_finite and not all_finite(ref_embeddings):
        raise NonFiniteError("ref_embeddings contain NaN or infinite values")
    return ref_embeddings, ref_labels


def check_label_free_inputs(name: str, embeddings: Tensor, labels: Tensor, indices: object) -> None:
    """:func:`check_inputs` for a label-free regulariser (labels checked, not used) that takes no
    mined ``indices`` (ConfigError naming the loss)."""
    check_inputs(embeddings, labels)
    if indices is not None:
        raise ConfigError(f"{name} ignores labels and takes no mined indices; use it without a miner "
                          "or as an [[extra_losses]] term")


def label_masks(
    labels: Tensor, ref_labels: Tensor | None = None, *, exclude_self: bool | None = None
) -> tuple[Tensor, Tensor]:
    """``(B, R)`` boolean masks of positive and negative pairs.

    ``exclude_self`` (default: ``ref_labels is None``) removes the diagonal from the positives.
    """
    same_set = ref_labels is None
    ref = labels if ref_labels is None else ref_labels
    pos = labels.unsqueeze(1) == ref.unsqueeze(0)
    neg = ~pos
    if exclude_self if exclude_self is not None else same_set:
        n = min(pos.shape)
        idx = torch.arange(n, device=labels.device)
        pos[idx, idx] = False
    return pos, neg


def triplets_to_pairs(triplets: Triplets) -> Pairs:
    """The unique positive and negative pairs contained in ``triplets``."""
    a, p, n = triplets
    pos = torch.unique(torch.stack([a, p]), dim=1) if a.numel() else torch.stack([a, p])
    neg = torch.unique(torch.stack([a, n]), dim=1) if a.numel() else torch.stack([a, n])
    return pos[0], pos[1], neg[0], neg[1]


def pair_masks_from_indices(indices: Indices, batch_size: int, ref_size: int) -> tuple[Tensor, Tensor]:
    """``(B, R)`` masks of the positive and negative pairs named by ``indices`` (pairs or triplets).

    Triplets ``(a, p, n)`` name the positive pairs ``(a, p)`` and the negative pairs ``(a, n)``;
    repeated pairs set the same entry (the masks of :func:`triplets_to_pairs`'s unique pairs,
    without its sort).
    """
    if is_triplets(indices):
        a, p, n = indices  # type: ignore[misc]
        indices = (a, p, a, n)
    if not is_pairs(indices):
        raise DataError("indices must be triplets (a, p, n) or pairs (a1, p, a2, n)")
    a1, p, a2, n = indices
    device = a1.device
    pos = torch.zeros(batch_size, ref_size, dtype=torch.bool, device=device)
    neg = torch.zeros(batch_size, ref_size, dtype=torch.bool, device=device)
    pos[a1, p] = True
    neg[a2, n] = True
    return pos, neg


def masks_to_pairs(pos_mask: Tensor, neg_mask: Tensor) -> Pairs:
    a1, p = pos_mask.nonzero(as_tuple=True)
    a2, n = neg_mask.nonzero(as_tuple=True)
    return a1, p, a2, n


def empty_pairs(device: torch.device | None = None) -> Pairs:
    e = torch.empty(0, dtype=torch.long, device=device)
    return e, e.clone(), e.clone(), e.clone()


def empty_triplets(device: torch.device | None = None) -> Triplets:
    e = torch.empty(0, dtype=torch.long, device=device)
    return e, e.clone(), e.clone()


def zero_loss(*tensors: Tensor) -> Tensor:
    """A zero scalar connected to the autograd graph of ``tensors`` (so ``backward()`` works)."""
    total = None
    for t in tensors:
        if t is None:
            continue
        term = (t * 0).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("zero_loss needs at least one tensor")
    return total
