"""Triplet margin loss (FaceNet) over all valid triplets of a batch, mined triplets or mined pairs."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import DataError
from deepmetric.losses._pairs import (
    check_distance,
    check_reduction,
    check_triplets,
    compact_rows,
    distance_matrix,
    paired_distance,
    reduce_terms,
    resolve_masks,
    row_hinge_sums,
)
from deepmetric.registry import LOSSES
from deepmetric.tuples import Indices, check_inputs, is_triplets, zero_loss

__all__ = ["TripletMarginLoss", "triplet_margin_loss", "triplet_margin_loss_explicit"]

_REDUCTIONS = ("mean_nonzero", "mean", "sum")
# Elements of the (anchor chunk, positives, references) block used by the soft-margin path.
_SOFT_CHUNK_ELEMENTS = 1 << 22
# Up to this many positives per anchor the hinge is summed slot by slot (cheaper than sorting).
_DENSE_POSITIVE_SLOTS = 8


def _terms(d_ap: Tensor, d_an: Tensor, margin: float, soft_margin: bool) -> Tensor:
    if soft_margin:
        return F.softplus(d_ap - d_an)
    return F.relu(d_ap - d_an + margin)


def triplet_margin_loss_explicit(
    d_ap: Tensor, d_an: Tensor, *, margin: float = 0.2, soft_margin: bool = False, reduction: str = "mean_nonzero"
) -> Tensor:
    """Triplet loss of explicit per-triplet distances ``d(a,p)`` and ``d(a,n)`` (1-D, same length)."""
    check_reduction(reduction, _REDUCTIONS)
    terms = _terms(d_ap, d_an, margin, soft_margin)
    count_all = torch.tensor(terms.numel(), device=terms.device)
    return reduce_terms(terms.sum(), count_all, (terms > 0).sum(), reduction)


class _SlotHingeSum(torch.autograd.Function):
    """``Σ_{a, j, n} [T_aj − D_an]₊`` over valid slots ``j`` and masked ``(a, n)``, plus the count.

    The gradient (the number of active terms per threshold and per distance) is accumulated in the
    forward pass, so nothing larger than one ``(B, R)`` matrix is kept for the backward pass.
    """

    @staticmethod
    def forward(ctx, thresholds: Tensor, valid: Tensor, dist: Tensor, mask: Tensor):  # type: ignore[override]
        total = dist.new_zeros(())
        grad_dist = torch.zeros_like(dist)
        grad_thr = torch.zeros_like(thresholds)
        for j in range(thresholds.shape[1]):
            t = thresholds[:, j : j + 1]
            active = (t > dist) & mask & valid[:, j : j + 1]
            act = active.to(dist.dtype)
            n_active = act.sum(1)
            grad_thr[:, j] = n_active
            total += (t.squeeze(1) * n_active).sum() - (act * dist).sum()
            grad_dist -= act
        ctx.save_for_backward(grad_thr, grad_dist)
        count = grad_thr.double().sum().round().long()  # exact: integer entries
        ctx.mark_non_differentiable(count)
        return total, count

    @staticmethod
    def backward(ctx, grad_total: Tensor, _grad_count: Tensor):  # type: ignore[override]
        grad_thr, grad_dist = ctx.saved_tensors
        return grad_total * grad_thr, None, grad_total * grad_dist, None


def _all_triplets_sum(
    dist: Tensor, pos: Tensor, neg: Tensor, margin: float, soft_margin: bool
) -> tuple[Tensor, Tensor]:
    """Sum and non-zero count of the loss over every ``(a, p, n)`` with ``pos[a,p]`` and ``neg[a,n]``."""
    pidx, pvalid = compact_rows(pos)  # (B, Pmax): each anchor's positives, padded
    d_ap = dist.gather(1, pidx)
    if not soft_margin:
        # Σ_{p,n} [d_ap + m − d_an]₊ from sorted per-anchor values, a cumulative sum and searchsorted:
        # sort the narrow side (usually the K−1 positives) and query it with the other side.
        width = pidx.shape[1]
        if width <= _DENSE_POSITIVE_SLOTS:
            # Few positives per anchor (P×K batches): one masked (B, R) hinge per positive slot.
            total, count = _SlotHingeSum.apply(d_ap + margin, pvalid, dist, neg)
            return total, count
        if width <= int(neg.sum(1).max()):
            # per (a, n): Σ_p [u_p − d_an]₊ with u_p = d_ap + m, written as [(−d_an) − (−u_p)]₊
            sums, counts = row_hinge_sums(-(d_ap + margin), pvalid, -dist)
            keep = neg
        else:
            # per (a, p): Σ_n [d_ap + m − d_an]₊ = cnt·(d_ap + m) − Σ_{d_an < d_ap + m} d_an
            sums, counts = row_hinge_sums(dist, neg, d_ap + margin)
            keep = pvalid
        total = torch.where(keep, sums, torch.zeros_like(sums)).sum()
        return total, torch.where(keep, counts, torch.zeros_like(counts)).sum()
    # Soft margin has no sorted-prefix identity: dense (chunk, Pmax, R) blocks, chunked over anchors.
    batch, width = pidx.shape
    ref = dist.shape[1]
    chunk = max(1, _SOFT_CHUNK_ELEMENTS // max(1, width * ref))
    total = dist.new_zeros(())
    count = torch.zeros((), dtype=torch.long, device=dist.device)
    for start in range(0, batch, chunk):
        sl = slice(start, start + chunk)
        block = F.softplus(d_ap[sl].unsqueeze(2) - dist[sl].unsqueeze(1))
        keep = pvalid[sl].unsqueeze(2) & neg[sl].unsqueeze(1)
        total = total + torch.where(keep, block, torch.zeros_like(block)).sum()
        count = count + keep.sum()
    return total, count


def triplet_margin_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin: float = 0.2,
    distance: str = "squared_euclidean",
    soft_margin: bool = False,
    reduction: str = "mean_nonzero",
) -> Tensor:
    """Functional form of :class:`TripletMarginLoss` (same arguments)."""
    check_distance(distance)
    check_reduction(reduction, _REDUCTIONS)
    same_set = ref_embeddings is None
    ref, ref_lab = check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    batch, ref_size = embeddings.shape[0], ref.shape[0]
    if indices is not None and is_triplets(indices):
        a, p, n = check_triplets(indices, batch, ref_size)
        a, p, n = a.to(embeddings.device), p.to(embeddings.device), n.to(embeddings.device)
        if a.numel() == 0:
            return zero_loss(embeddings, None if same_set else ref)
        anchors = embeddings[a]
        d_ap = paired_distance(anchors, ref[p], distance)
        d_an = paired_distance(anchors, ref[n], distance)
        return triplet_margin_loss_explicit(
            d_ap, d_an, margin=margin, soft_margin=soft_margin, reduction=reduction
        )
    pos, neg = resolve_masks(labels, None if same_set else ref_lab, indices, batch, ref_size)
    n_triplets = (pos.sum(1) * neg.sum(1)).sum()
    if int(n_triplets) == 0:
        return zero_loss(embeddings, None if same_set else ref)
    dist = distance_matrix(embeddings, embeddings if same_set else ref, distance)
    total, nonzero = _all_triplets_sum(dist, pos, neg, margin, soft_margin)
    if soft_margin:
        nonzero = n_triplets  # softplus is never exactly 0
    return reduce_terms(total, n_triplets, nonzero, reduction)


@LOSSES.register("triplet_margin")
class TripletMarginLoss(nn.Module):
    r"""Triplet margin loss: anchor–positive closer than anchor–negative by a margin (FaceNet).

    $$ L = \frac{1}{|T_{+}|} \sum_{(a,p,n) \in T} \big[\, d(a,p) - d(a,n) + m \,\big]_{+} $$

    where :math:`T` is the set of triplets and :math:`T_{+}` those with a non-zero term
    (``reduction="mean_nonzero"``, the default; ``"mean"`` divides by :math:`|T|`, ``"sum"`` does
    not divide). With ``soft_margin=True`` the hinge is replaced by
    :math:`\log(1 + e^{d(a,p) - d(a,n)})` (no margin; Hermans et al., 2017) and ``mean_nonzero``
    equals ``mean``.

    Without ``indices`` :math:`T` is **every** valid triplet of the batch (``labels[a] == labels[p]``,
    ``a != p``, ``labels[a] != labels[n]``). They are never materialised: for each anchor the
    negative distances are sorted once and
    :math:`\sum_n [d_{ap} + m - d_{an}]_+ = c\,(d_{ap}+m) - \sum_{d_{an} < d_{ap}+m} d_{an}` is read from
    a cumulative sum at the ``searchsorted`` position :math:`c` (O(B² log B) time, O(B²) memory).
    With mined triplets the loss is computed on exactly those (duplicates count); with mined pairs
    :math:`T` is every ``(a, p, n)`` with ``(a, p)`` a given positive and ``(a, n)`` a given
    negative pair.

    Reference:
        F. Schroff, D. Kalenichenko, J. Philbin, "FaceNet: A Unified Embedding for Face Recognition
        and Clustering", CVPR 2015.

    Args:
        margin: :math:`m` (FaceNet: 0.2, with squared euclidean distance of L2-normalised embeddings).
        distance: ``"squared_euclidean"`` (FaceNet, default), ``"euclidean"`` or ``"cosine"``.
        soft_margin: use the soft-plus form instead of the hinge (``margin`` is then unused).
        reduction: ``"mean_nonzero"`` (default), ``"mean"`` or ``"sum"`` over triplets.

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``; ``ref_embeddings`` ``(R, D)``, ``ref_labels`` ``(R,)``;
        output: scalar. A batch with no valid triplet returns 0 (with a graph).

    Requirements:
        At least 2 samples of some class and at least 2 classes per batch (a P×K sampler with
        K ≥ 2). FaceNet L2-normalises embeddings; this loss does not normalise them for you.

    Example:
        >>> import torch
        >>> loss_fn = TripletMarginLoss(margin=0.2)
        >>> emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=1).requires_grad_()
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(emb, labels)
        >>> loss.backward()
        >>> loss.ndim, bool(loss >= 0)
        (0, True)
    """

    tuple_kind: ClassVar[str | None] = "triplets"
    label_kind: ClassVar[str] = "class"

    def __init__(
        self,
        margin: float = 0.2,
        distance: str = "squared_euclidean",
        soft_margin: bool = False,
        reduction: str = "mean_nonzero",
    ) -> None:
        super().__init__()
        self.margin = float(margin)
        self.distance = check_distance(distance)
        self.soft_margin = bool(soft_margin)
        self.reduction = check_reduction(reduction, _REDUCTIONS)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """Loss over all valid triplets of the batch, or over the tuples named by ``indices``."""
        return triplet_margin_loss(
            embeddings,
            labels,
            indices,
            ref_embeddings,
            ref_labels,
            margin=self.margin,
            distance=self.distance,
            soft_margin=self.soft_margin,
            reduction=self.reduction,
        )

    def forward_triplets(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        """Loss of explicit triplets given as three ``(B, D)`` tensors (row ``i`` is one triplet)."""
        if anchor.dim() != 2 or anchor.shape != positive.shape or anchor.shape != negative.shape:
            raise DataError(
                "anchor, positive and negative must be (B, D) tensors of the same shape; got "
                f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
            )
        d_ap = paired_distance(anchor, positive, self.distance)
        d_an = paired_distance(anchor, negative, self.distance)
        return triplet_margin_loss_explicit(
            d_ap, d_an, margin=self.margin, soft_margin=self.soft_margin, reduction=self.reduction
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, distance={self.distance!r}, soft_margin={self.soft_margin}, "
            f"reduction={self.reduction!r}"
        )
