"""Siamese and triplet network structures, and datasets of explicit pairs and triplets.

A *siamese* network applies one embedder (shared weights) to the two inputs of a pair; a *triplet*
network applies it to anchor, positive and negative. They are the classic structures of Bromley et
al. ("Signature Verification using a Siamese Time Delay Neural Network", NeurIPS 1993), Hadsell,
Chopra & LeCun ("Dimensionality Reduction by Learning an Invariant Mapping", CVPR 2006) and Hoffer &
Ailon ("Deep Metric Learning Using Triplet Network", SIMBAD 2015). Train them on explicit tuples
with ``ContrastiveLoss.forward_pairs`` / ``TripletMarginLoss.forward_triplets``; the tuples come from
:class:`PairDataset` / :class:`TripletDataset`, built from index tensors that
:mod:`deepmetric.offline` generates.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = SiameseNetwork(nn.Linear(4, 2))
    >>> e1, e2 = net(torch.randn(3, 4), torch.randn(3, 4))
    >>> e1.shape, e2.shape
    (torch.Size([3, 2]), torch.Size([3, 2]))
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from deepmetric.errors import DataError

__all__ = ["SiameseNetwork", "TripletNetwork", "PairDataset", "TripletDataset", "LabelledDataset"]


class LabelledDataset(Protocol):
    """A dataset with a 1-D ``long`` tensor ``labels`` and ``__getitem__(i) -> (x, y)``."""

    labels: Tensor

    def __getitem__(self, index: int) -> tuple[Any, Any]: ...

    def __len__(self) -> int: ...


def _shared_forward(embedder: nn.Module, inputs: tuple[Tensor, ...], batched: bool) -> tuple[Tensor, ...]:
    if batched and all(t.shape == inputs[0].shape for t in inputs):
        return tuple(embedder(torch.cat(inputs, 0)).chunk(len(inputs), 0))
    return tuple(embedder(t) for t in inputs)


class SiameseNetwork(nn.Module):
    """Two branches with shared weights: ``forward(x1, x2) -> (embedder(x1), embedder(x2))``.

    There is one embedder module, so the two branches share every parameter by construction.

    Args:
        embedder: the module mapping an input batch ``(B, ...)`` to embeddings ``(B, D)``.
        batched: run both inputs through the embedder in one call (concatenated) when their shapes
            match, which is faster; with batch normalisation in training mode the statistics are then
            taken over both halves together. ``False`` calls the embedder once per input.

    Shape:
        ``x1``, ``x2``: ``(B, ...)``. Output: two ``(B, D)`` tensors.

    Example:
        >>> net = SiameseNetwork(nn.Linear(4, 2))
        >>> e1, e2 = net(torch.ones(1, 4), torch.ones(1, 4))
        >>> torch.equal(e1, e2)
        True
    """

    def __init__(self, embedder: nn.Module, batched: bool = True) -> None:
        super().__init__()
        self.embedder = embedder
        self.batched = batched

    def embed(self, x: Tensor) -> Tensor:
        """Embeddings of one batch (one branch)."""
        return self.embedder(x)

    def forward(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        e1, e2 = _shared_forward(self.embedder, (x1, x2), self.batched)
        return e1, e2


class TripletNetwork(nn.Module):
    """Three branches with shared weights: ``forward(a, p, n) -> (embedder(a), embedder(p), embedder(n))``.

    Args:
        embedder: the module mapping an input batch ``(B, ...)`` to embeddings ``(B, D)``.
        batched: one concatenated embedder call when the shapes match (see :class:`SiameseNetwork`).

    Shape:
        ``anchor``, ``positive``, ``negative``: ``(B, ...)``. Output: three ``(B, D)`` tensors.

    Example:
        >>> net = TripletNetwork(nn.Linear(4, 2))
        >>> [e.shape[1] for e in net(torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4))]
        [2, 2, 2]
    """

    def __init__(self, embedder: nn.Module, batched: bool = True) -> None:
        super().__init__()
        self.embedder = embedder
        self.batched = batched

    def embed(self, x: Tensor) -> Tensor:
        """Embeddings of one batch (one branch)."""
        return self.embedder(x)

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ea, ep, en = _shared_forward(self.embedder, (anchor, positive, negative), self.batched)
        return ea, ep, en


def _base_labels(base: Any) -> Tensor:
    labels = getattr(base, "labels", None)
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        raise DataError("the base dataset needs a 1-D tensor attribute `labels` (one label per item)")
    return labels.cpu()


def _check_index_tensor(name: str, idx: Tensor, width: int, size: int) -> Tensor:
    idx = torch.as_tensor(idx)
    if idx.dim() != 2 or idx.shape[1] != width or idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise DataError(f"{name} must be an integer tensor of shape (N, {width}); got {tuple(idx.shape)} {idx.dtype}")
    idx = idx.long().cpu()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise DataError(f"{name} index out of range for a base dataset of {size} items")
    return idx


class PairDataset(Dataset):
    """Explicit pairs over a labelled dataset: item ``i`` is ``(x1, x2, same)``.

    Args:
        base: a dataset with a 1-D ``labels`` tensor and ``__getitem__(j) -> (x, y)``.
        pairs: ``(N, 2)`` integer tensor of indices into ``base`` (e.g. from
            :func:`deepmetric.offline.generate_pairs`).

    ``same`` is a ``bool`` tensor, ``labels[pairs[i, 0]] == labels[pairs[i, 1]]``, the target of
    ``ContrastiveLoss.forward_pairs``.

    Example:
        >>> class Toy(torch.utils.data.Dataset):
        ...     labels = torch.tensor([0, 0, 1])
        ...     def __len__(self): return 3
        ...     def __getitem__(self, i): return torch.full((2,), float(i)), int(self.labels[i])
        >>> ds = PairDataset(Toy(), torch.tensor([[0, 1], [0, 2]]))
        >>> x1, x2, same = ds[1]
        >>> x2.tolist(), bool(same)
        ([2.0, 2.0], False)
    """

    def __init__(self, base: LabelledDataset, pairs: Tensor) -> None:
        labels = _base_labels(base)
        self.base = base
        self.pairs = _check_index_tensor("pairs", pairs, 2, labels.numel())
        self.same = labels[self.pairs[:, 0]] == labels[self.pairs[:, 1]]

    def __len__(self) -> int:
        return self.pairs.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, Any, Tensor]:
        i, j = self.pairs[index].tolist()
        return self.base[i][0], self.base[j][0], self.same[index]


class TripletDataset(Dataset):
    """Explicit triplets over a labelled dataset: item ``i`` is ``(anchor, positive, negative)`` inputs.

    Args:
        base: a dataset with a 1-D ``labels`` tensor and ``__getitem__(j) -> (x, y)``.
        triplets: ``(N, 3)`` integer tensor of indices ``(a, p, n)`` into ``base`` with
            ``labels[a] == labels[p] != labels[n]`` (e.g. from
            :func:`deepmetric.offline.generate_triplets`).

    Raises:
        DataError: an index is out of range or a triplet has the wrong label structure.

    Example:
        >>> class Toy(torch.utils.data.Dataset):
        ...     labels = torch.tensor([0, 0, 1])
        ...     def __len__(self): return 3
        ...     def __getitem__(self, i): return torch.full((2,), float(i)), int(self.labels[i])
        >>> a, p, n = TripletDataset(Toy(), torch.tensor([[1, 0, 2]]))[0]
        >>> a.tolist(), n.tolist()
        ([1.0, 1.0], [2.0, 2.0])
    """

    def __init__(self, base: LabelledDataset, triplets: Tensor) -> None:
        labels = _base_labels(base)
        self.base = base
        self.triplets = _check_index_tensor("triplets", triplets, 3, labels.numel())
        a, p, n = self.triplets.unbind(1)
        bad = (labels[a] != labels[p]) | (labels[a] == labels[n]) | (a == p)
        if bool(bad.any()):
            first = int(bad.nonzero()[0])
            raise DataError(
                f"triplet {first} = {self.triplets[first].tolist()} is not (anchor, positive of the same "
                "label, negative of another label)"
            )

    def __len__(self) -> int:
        return self.triplets.shape[0]

    def __getitem__(self, index: int) -> tuple[Any, Any, Any]:
        a, p, n = self.triplets[index].tolist()
        return self.base[a][0], self.base[p][0], self.base[n][0]
