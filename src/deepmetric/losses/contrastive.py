"""Contrastive loss (Hadsell, Chopra & LeCun) over all pairs of a batch, mined pairs or explicit pairs."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.errors import DataError, NonFiniteError
from deepmetric.losses._pairs import (
    check_distance,
    check_reduction,
    distance_matrix,
    paired_distance,
    reduce_terms,
    resolve_masks,
)
from deepmetric.registry import LOSSES
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["ContrastiveLoss", "contrastive_loss", "contrastive_pair_terms"]

_REDUCTIONS = ("mean", "mean_nonzero", "sum")


def contrastive_pair_terms(
    dist: Tensor, same: Tensor, *, margin: float = 1.0, pos_margin: float = 0.0, squared: bool = True
) -> Tensor:
    """Per-pair terms ``y·[d − m_pos]₊^q + (1 − y)·[m − d]₊^q`` (``q = 2`` if ``squared`` else 1)."""
    hinge = torch.where(same.to(torch.bool), dist - pos_margin, margin - dist).clamp_min(0.0)
    return hinge * hinge if squared else hinge


def contrastive_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin: float = 1.0,
    pos_margin: float = 0.0,
    distance: str = "euclidean",
    squared: bool = True,
    reduction: str = "mean",
) -> Tensor:
    """Functional form of :class:`ContrastiveLoss` (same arguments)."""
    check_distance(distance)
    check_reduction(reduction, _REDUCTIONS)
    same_set = ref_embeddings is None
    ref, ref_lab = check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    batch, ref_size = embeddings.shape[0], ref.shape[0]
    pos, neg = resolve_masks(labels, None if same_set else ref_lab, indices, batch, ref_size)
    if not bool(pos.any()):
        return zero_loss(embeddings, None if same_set else ref)
    dist = distance_matrix(embeddings, embeddings if same_set else ref, distance)
    terms = contrastive_pair_terms(dist, pos, margin=margin, pos_margin=pos_margin, squared=squared)
    keep = pos | neg
    kept = torch.where(keep, terms, torch.zeros_like(terms))
    nonzero = (kept > 0).sum() if reduction == "mean_nonzero" else keep.sum()
    return reduce_terms(kept.sum(), keep.sum(), nonzero, reduction)


@LOSSES.register("contrastive")
class ContrastiveLoss(nn.Module):
    r"""Contrastive loss: pull positive pairs together, push negative pairs beyond a margin.

    $$ L = \frac{1}{|P| + |N|} \Big( \sum_{(i,j) \in P} [\, d_{ij} - m_{pos} \,]_{+}^{2}
       + \sum_{(i,j) \in N} [\, m - d_{ij} \,]_{+}^{2} \Big) $$

    With ``pos_margin`` :math:`m_{pos} = 0` this is the paper's
    :math:`Y d^2 + (1 - Y)\,[m - d]_+^2` for a pair with label :math:`Y` (1 = same class); the
    paper's factor ½ on both terms is dropped (a constant rescaling, equivalent to a learning-rate
    change). ``squared=False`` uses the hinges without squaring (the form pytorch-metric-learning
    implements). :math:`P` and :math:`N` are all ordered positive and negative pairs of the batch
    (self-pairs excluded) or the mined pairs given in ``indices``.

    Reduction (``reduction``): ``"mean"`` (default) divides by the number of pairs considered,
    :math:`|P| + |N|`, as a mean of the paper's per-pair loss; ``"mean_nonzero"`` divides by the
    number of pairs with a non-zero term; ``"sum"`` does not divide.

    Reference:
        R. Hadsell, S. Chopra, Y. LeCun, "Dimensionality Reduction by Learning an Invariant
        Mapping", CVPR 2006.

    Args:
        margin: :math:`m`, the distance beyond which negative pairs cost nothing. The paper leaves
            it free; the default 1.0 suits L2-normalised embeddings (euclidean distances in [0, 2]).
        pos_margin: :math:`m_{pos}`, distance below which positive pairs cost nothing (paper: 0).
        distance: ``"euclidean"`` (paper, default), ``"squared_euclidean"`` or ``"cosine"``.
        squared: square the hinge terms (paper, default).
        reduction: ``"mean"`` (default), ``"mean_nonzero"`` or ``"sum"``.

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``; ``ref_embeddings`` ``(R, D)``, ``ref_labels`` ``(R,)``;
        output: scalar. A batch with no positive pair returns 0 (with a graph).
        :meth:`forward_pairs` takes two ``(B, D)`` tensors and a ``(B,)`` 0/1 or bool ``same``.

    Requirements:
        At least one positive pair in the batch (≥ 2 samples of some class), or explicit
        siamese pairs via :meth:`forward_pairs`.

    Example:
        >>> import torch
        >>> loss_fn = ContrastiveLoss(margin=1.0)
        >>> emb = torch.randn(6, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> loss = loss_fn(emb, labels)
        >>> loss.backward()
        >>> x1, x2 = torch.zeros(2, 3), torch.tensor([[0.0, 0.0, 0.5], [0.0, 0.0, 0.5]])
        >>> float(loss_fn.forward_pairs(x1, x2, torch.tensor([1, 0])))  # (0.25 + 0.25) / 2
        0.25
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(
        self,
        margin: float = 1.0,
        pos_margin: float = 0.0,
        distance: str = "euclidean",
        squared: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.margin = float(margin)
        self.pos_margin = float(pos_margin)
        self.distance = check_distance(distance)
        self.squared = bool(squared)
        self.reduction = check_reduction(reduction, _REDUCTIONS)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """Loss over all pairs of the batch, or over the pairs named by ``indices``."""
        return contrastive_loss(
            embeddings,
            labels,
            indices,
            ref_embeddings,
            ref_labels,
            margin=self.margin,
            pos_margin=self.pos_margin,
            distance=self.distance,
            squared=self.squared,
            reduction=self.reduction,
        )

    def forward_pairs(self, x1: Tensor, x2: Tensor, same: Tensor) -> Tensor:
        """Loss of explicit (siamese) pairs: row ``i`` of ``x1`` and ``x2`` with ``same[i]`` in {0, 1}."""
        if x1.dim() != 2 or x1.shape != x2.shape:
            raise DataError(f"x1 and x2 must be (B, D) of the same shape; got {tuple(x1.shape)}, {tuple(x2.shape)}")
        same = torch.as_tensor(same, device=x1.device)
        if same.shape != (x1.shape[0],):
            raise DataError(f"same must have shape ({x1.shape[0]},); got {tuple(same.shape)}")
        if same.dtype != torch.bool and not bool(((same == 0) | (same == 1)).all()):
            raise DataError("same must be boolean or contain only 0 and 1")
        if not (bool(torch.isfinite(x1).all()) and bool(torch.isfinite(x2).all())):
            raise NonFiniteError("x1 or x2 contain NaN or infinite values")
        dist = paired_distance(x1, x2, self.distance)
        terms = contrastive_pair_terms(
            dist, same.bool(), margin=self.margin, pos_margin=self.pos_margin, squared=self.squared
        )
        count = torch.tensor(terms.numel(), device=terms.device)
        return reduce_terms(terms.sum(), count, (terms > 0).sum(), self.reduction)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, pos_margin={self.pos_margin}, distance={self.distance!r}, "
            f"squared={self.squared}, reduction={self.reduction!r}"
        )
