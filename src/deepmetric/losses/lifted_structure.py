"""Lifted structured loss (Oh Song et al.), the smooth upper bound over all pairs of a batch."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.losses._pairs import check_distance, distance_matrix, masked_logsumexp, resolve_masks
from deepmetric.registry import LOSSES
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["LiftedStructureLoss", "lifted_structure_loss"]


def lifted_structure_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin: float = 1.0,
    distance: str = "euclidean",
) -> Tensor:
    """Functional form of :class:`LiftedStructureLoss` (same arguments)."""
    check_distance(distance)
    same_set = ref_embeddings is None
    ref, ref_lab = check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    batch, ref_size = embeddings.shape[0], ref.shape[0]
    pos, neg = resolve_masks(labels, None if same_set else ref_lab, indices, batch, ref_size)
    if not bool(pos.any()):
        return zero_loss(embeddings, None if same_set else ref)
    dist = distance_matrix(embeddings, embeddings if same_set else ref, distance)
    logits = margin - dist
    if same_set:
        # Negative pairs are unordered: (j, l) ∈ N whichever way round it was given.
        neg_sym = neg | neg.T
        row_lse, row_any = masked_logsumexp(logits, neg_sym, dim=1)
        col_lse, col_any = row_lse, row_any
    else:
        # i indexes the batch (its negatives are references), j the references (negatives: batch).
        row_lse, row_any = masked_logsumexp(logits, neg, dim=1)
        col_lse, col_any = masked_logsumexp(logits, neg, dim=0)
    # log(Σ_k e^{α−D_ik} + Σ_l e^{α−D_jl}); an empty side contributes e^{-inf} = 0.
    very_negative = torch.finfo(dist.dtype).min / 4
    r = torch.where(row_any, row_lse, torch.full_like(row_lse, very_negative)).unsqueeze(1)
    c = torch.where(col_any, col_lse, torch.full_like(col_lse, very_negative)).unsqueeze(0)
    has_negative = row_any.unsqueeze(1) | col_any.unsqueeze(0)
    j_tilde = torch.logaddexp(r, c) + dist
    terms = F.relu(j_tilde).pow(2)
    keep = pos & has_negative
    total = torch.where(keep, terms, torch.zeros_like(terms)).sum()
    return total / (2.0 * pos.sum().to(total.dtype))


@LOSSES.register("lifted_structure")
class LiftedStructureLoss(nn.Module):
    r"""Lifted structured loss: each positive pair against all negatives of both its ends (smooth form).

    $$ \tilde J_{ij} = \log\Big( \sum_{(i,k) \in N} e^{\alpha - D_{ik}} + \sum_{(j,l) \in N}
       e^{\alpha - D_{jl}} \Big) + D_{ij}, \qquad
       L = \frac{1}{2|P|} \sum_{(i,j) \in P} [\tilde J_{ij}]_{+}^{2} $$

    :math:`D` is the euclidean distance, :math:`P` the positive pairs and :math:`N` the negative
    pairs of the batch (all of them, or those named by mined ``indices``; negative pairs are
    unordered, so a mined ``(j, l)`` also counts as ``(l, j)``). :math:`P` is taken as ordered
    pairs; since :math:`\tilde J_{ij} = \tilde J_{ji}` this equals the paper's average over
    unordered pairs. With ``ref_embeddings`` the negatives of a batch element are references and
    those of a reference element are batch elements. A positive pair without any negative has
    :math:`\log 0 = -\infty` and contributes 0. This is the paper's smooth bound (the objective it
    optimises), not the "generalized" lifted loss of Hermans et al. (2017).

    Reference:
        H. Oh Song, Y. Xiang, S. Jegelka, S. Savarese, "Deep Metric Learning via Lifted Structured
        Feature Embedding", CVPR 2016.

    Args:
        margin: :math:`\alpha` (paper: 1).
        distance: ``"euclidean"`` (paper, default), ``"squared_euclidean"`` or ``"cosine"``.

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``; ``ref_embeddings`` ``(R, D)``, ``ref_labels`` ``(R,)``;
        output: scalar. A batch with no positive pair returns 0 (with a graph).

    Requirements:
        ≥ 2 samples per class for positive pairs and ≥ 2 classes per batch (P×K sampling).

    Example:
        >>> import torch
        >>> loss_fn = LiftedStructureLoss(margin=1.0)
        >>> emb = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(emb, labels)
        >>> loss.backward()
        >>> bool(loss > 0)
        True
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(self, margin: float = 1.0, distance: str = "euclidean") -> None:
        super().__init__()
        self.margin = float(margin)
        self.distance = check_distance(distance)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """Loss over all pairs of the batch, or over the pairs named by ``indices``."""
        return lifted_structure_loss(
            embeddings, labels, indices, ref_embeddings, ref_labels, margin=self.margin, distance=self.distance
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, distance={self.distance!r}"
