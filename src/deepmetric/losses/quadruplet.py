"""Quadruplet loss (Chen et al., "Beyond triplet loss") over all triplets and quadruplets of a batch."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.losses._pairs import (
    check_distance,
    check_reduction,
    distance_matrix,
    grouped_hinge_sums,
    reduce_terms,
    resolve_masks,
)
from deepmetric.losses.triplet_margin import _all_triplets_sum
from deepmetric.registry import LOSSES
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["QuadrupletLoss", "quadruplet_loss"]

_REDUCTIONS = ("mean_nonzero", "mean", "sum")


def _second_term(
    dist: Tensor, pos: Tensor, neg: Tensor, row_class: Tensor, col_class: Tensor, margin: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Sum, non-zero count and total count of ``[D_ap − D_lk + α₂]₊`` over the quadruplets.

    For each positive pair ``(a, p)`` the second negative pairs are the negative entries ``(l, k)``
    whose two classes both differ from ``class(a)``. Their hinge sum is
    ``Σ_all − Σ_{class(l) = class(a)} − Σ_{class(k) = class(a)}`` (a negative entry cannot have
    both ends in ``class(a)``); each of the three is read from a (group, value)-sorted list.
    """
    batch, ref = dist.shape
    anchors, positives = pos.nonzero(as_tuple=True)
    thresholds = dist[anchors, positives] + margin
    query_class = row_class[anchors]
    values = dist.reshape(-1)
    valid = neg.reshape(-1)
    all_groups = torch.zeros_like(valid, dtype=torch.long)
    row_groups = row_class.unsqueeze(1).expand(batch, ref).reshape(-1)
    col_groups = col_class.unsqueeze(0).expand(batch, ref).reshape(-1)
    s_all, c_all = grouped_hinge_sums(values, all_groups, valid, thresholds, torch.zeros_like(query_class))
    s_row, c_row = grouped_hinge_sums(values, row_groups, valid, thresholds, query_class)
    s_col, c_col = grouped_hinge_sums(values, col_groups, valid, thresholds, query_class)
    total = (s_all - s_row - s_col).sum().to(dist.dtype)
    nonzero = (c_all - c_row - c_col).sum()
    num_classes = int(torch.maximum(row_class.max(), col_class.max())) + 1
    neg_per_row_class = torch.bincount(row_class, weights=neg.sum(1).double(), minlength=num_classes)
    neg_per_col_class = torch.bincount(col_class, weights=neg.sum(0).double(), minlength=num_classes)
    n_neg = neg.sum().double()
    pairs_per_query = n_neg - neg_per_row_class[query_class] - neg_per_col_class[query_class]
    return total, nonzero, pairs_per_query.sum().round().long()


def quadruplet_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    alpha1: float = 1.0,
    alpha2: float = 0.5,
    distance: str = "squared_euclidean",
    reduction: str = "mean_nonzero",
) -> Tensor:
    """Functional form of :class:`QuadrupletLoss` (same arguments)."""
    check_distance(distance)
    check_reduction(reduction, _REDUCTIONS)
    same_set = ref_embeddings is None
    ref, ref_lab = check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    batch, ref_size = embeddings.shape[0], ref.shape[0]
    pos, neg = resolve_masks(labels, None if same_set else ref_lab, indices, batch, ref_size)
    n_triplets = (pos.sum(1) * neg.sum(1)).sum()
    if not bool(pos.any()):
        return zero_loss(embeddings, None if same_set else ref)
    dist = distance_matrix(embeddings, embeddings if same_set else ref, distance)
    total1, nonzero1 = _all_triplets_sum(dist, pos, neg, alpha1, soft_margin=False)
    _, inverse = torch.unique(torch.cat([labels.reshape(-1), ref_lab.reshape(-1)]), return_inverse=True)
    row_class, col_class = inverse[:batch], inverse[batch:]
    total2, nonzero2, n_quadruplets = _second_term(dist, pos, neg, row_class, col_class, alpha2)
    first = reduce_terms(total1, n_triplets, nonzero1, reduction)
    second = reduce_terms(total2, n_quadruplets, nonzero2, reduction)
    return first + second


@LOSSES.register("quadruplet")
class QuadrupletLoss(nn.Module):
    r"""Quadruplet loss: a triplet loss plus a margin between positive pairs and unrelated negative pairs.

    $$ L = \frac{1}{|T_{+}|} \sum_{(i,j,k) \in T} [\, D_{ij} - D_{ik} + \alpha_1 \,]_{+}
       + \frac{1}{|Q_{+}|} \sum_{(i,j,l,k) \in Q} [\, D_{ij} - D_{lk} + \alpha_2 \,]_{+} $$

    :math:`D = g^2` is the squared euclidean distance of the embeddings (the paper's learned metric
    :math:`g` is replaced by the embedding distance). :math:`T` is every triplet
    (:math:`y_i = y_j`, :math:`i \ne j`, :math:`y_k \ne y_i`) and :math:`Q` every quadruplet with
    :math:`y_i = y_j`, :math:`y_l \ne y_k`, :math:`y_l \ne y_i`, :math:`y_k \ne y_i` — all of them,
    as in the paper's sums; :math:`(l, k)` is an ordered pair of the batch (with
    ``ref_embeddings``: :math:`l` from the batch, :math:`k` from the references). With mined pairs
    in ``indices``, :math:`(i,j)` runs over the given positive pairs and :math:`(i,k)`, :math:`(l,k)`
    over the given negative pairs.

    Nothing of size :math:`B^3` or :math:`B^4` is built: the triplet part is the sorted-prefix sum
    of :class:`TripletMarginLoss`, and for each positive pair the sum over the second negative pairs
    is :math:`\Sigma_{\text{all}} - \Sigma_{y_l = y_i} - \Sigma_{y_k = y_i}`, each read from a
    (class, distance)-sorted list with a cumulative sum and ``searchsorted``
    (O(B² log B) time, O(B²) memory).

    Reduction: ``"mean_nonzero"`` (default) averages each sum over its margin-violating tuples
    (:math:`T_+`, :math:`Q_+`), in the spirit of the paper's use of hard (margin-violating) samples;
    ``"mean"`` divides by :math:`|T|` and :math:`|Q|`; ``"sum"`` adds the raw sums. The paper's
    adaptive margin (:math:`\alpha` from the batch's distance statistics) is not implemented: the
    margins are fixed.

    Reference:
        W. Chen, X. Chen, J. Zhang, K. Huang, "Beyond triplet loss: a deep quadruplet network for
        person re-identification", CVPR 2017.

    Args:
        alpha1: :math:`\alpha_1`, margin of the triplet term (1.0).
        alpha2: :math:`\alpha_2`, the weaker margin of the second term (0.5; the paper keeps
            :math:`\alpha_2 < \alpha_1`).
        distance: ``"squared_euclidean"`` (default), ``"euclidean"`` or ``"cosine"``.
        reduction: ``"mean_nonzero"`` (default), ``"mean"`` or ``"sum"``.

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``; ``ref_embeddings`` ``(R, D)``, ``ref_labels`` ``(R,)``;
        output: scalar. A batch with no positive pair returns 0 (with a graph).

    Requirements:
        ≥ 2 samples per class and ≥ 3 classes per batch (the second term needs two classes other
        than the anchor's; with 2 classes only the triplet term is non-zero).

    Example:
        >>> import torch
        >>> loss_fn = QuadrupletLoss(alpha1=1.0, alpha2=0.5)
        >>> emb = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(emb, labels)
        >>> loss.backward()
        >>> loss.ndim
        0
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(
        self,
        alpha1: float = 1.0,
        alpha2: float = 0.5,
        distance: str = "squared_euclidean",
        reduction: str = "mean_nonzero",
    ) -> None:
        super().__init__()
        self.alpha1 = float(alpha1)
        self.alpha2 = float(alpha2)
        self.distance = check_distance(distance)
        self.reduction = check_reduction(reduction, _REDUCTIONS)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """Loss over all triplets and quadruplets of the batch, or over those the mined pairs allow."""
        return quadruplet_loss(
            embeddings,
            labels,
            indices,
            ref_embeddings,
            ref_labels,
            alpha1=self.alpha1,
            alpha2=self.alpha2,
            distance=self.distance,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"alpha1={self.alpha1}, alpha2={self.alpha2}, distance={self.distance!r}, "
            f"reduction={self.reduction!r}"
        )
