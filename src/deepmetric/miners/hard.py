"""Batch-hard mining: per anchor the farthest positive and the closest negative."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric._native import load
from deepmetric.distances import get_distance
from deepmetric.miners._blocks import FAST_DISTANCES, LabelGroups, Operands, dense_labels, supported
from deepmetric.miners._common import masks, prepare
from deepmetric.registry import MINERS
from deepmetric.tuples import Triplets

__all__ = ["HardMiner", "batch_hard"]


def batch_hard(dist: Tensor, pos_mask: Tensor, neg_mask: Tensor) -> Triplets:
    """One triplet per anchor: ``p = argmax_{p ∈ P(a)} d(a, p)``, ``n = argmin_{n ∈ N(a)} d(a, n)``.

    Anchors without a positive or a negative are dropped. Ties go to the lowest index.
    """
    p = dist.masked_fill(~pos_mask, float("-inf")).argmax(1)
    n = dist.masked_fill(~neg_mask, float("inf")).argmin(1)
    a = (pos_mask.any(1) & neg_mask.any(1)).nonzero(as_tuple=True)[0]
    return a, p[a], n[a]


def _batch_hard_blocked(ops: Operands, labels: Tensor, ref_labels: Tensor, same_set: bool) -> Triplets:
    """:func:`batch_hard` from blocks of a few anchors (the ``(B, R)`` matrix is never held); the
    positives are read from the sorted labels, the negatives' minimum from the block with the
    same-label cells pushed to +huge. The blocks hold :meth:`Operands.scores` (``d² − ‖x_a‖²``: one
    matmul, no square root), whose arg-max / arg-min along a row are the distances' (up to rounding
    between distances equal to float precision)."""
    a, p, n, _ = batch_hard_rows(ops, labels, ref_labels, same_set)
    return a, p, n


def _rows_result(ok: Tensor, p: Tensor, n: Tensor) -> tuple[Tensor, Tensor, Tensor, bool]:
    """The triplets of the anchor rows with ``ok`` (a positive and a negative), and whether that is
    every row (``a`` is then ``0 … B−1``)."""
    if bool(ok.all()):
        return torch.arange(ok.numel(), device=ok.device), p, n, True
    a = ok.nonzero(as_tuple=True)[0]
    return a, p[a], n[a], False


def _batch_hard_rows_native(
    lib, ops: Operands, labels: Tensor, ref_labels: Tensor, same_set: bool
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """:func:`batch_hard_rows` with the per-row arg-max / arg-min of each block in C (same blocks, same
    values, same first-of-ties rule: the lowest column). The kernel overwrites each row's same-label
    cells of the block with +inf (the block is scratch, not read again)."""
    row_lab, col_lab, classes = dense_labels(labels, None if same_set else ref_labels)
    row_lab, col_lab = row_lab.contiguous(), col_lab.contiguous()
    nclass = max(classes, 1)
    p = torch.empty(ops.rows, dtype=torch.long)
    n = torch.empty(ops.rows, dtype=torch.long)
    ok = torch.empty(ops.rows, dtype=torch.uint8)
    for start, end, s in ops.blocks(scores=True):
        assert s.is_contiguous()
        status = lib.dm_batch_hard(
            s.data_ptr(), s.stride(0), end - start, ops.cols, start, row_lab[start:end].data_ptr(),
            col_lab.data_ptr(), nclass, int(same_set), p[start:end].data_ptr(), n[start:end].data_ptr(),
            ok[start:end].data_ptr(),
        )
        if status != 0:
            raise MemoryError("batch-hard mining: could not allocate the label lists")
    return _rows_result(ok.bool(), p, n)


def batch_hard_rows(
    ops: Operands, labels: Tensor, ref_labels: Tensor, same_set: bool
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """:func:`_batch_hard_blocked`'s triplets and whether every anchor row has one (``a`` is then
    ``0 … B−1``). On CPU float32 the per-row search runs in a small C kernel where one builds
    (:mod:`deepmetric._native`; ``DEEPMETRIC_NATIVE=0`` turns it off), else in torch."""
    if ops.x.device.type == "cpu" and ops.x.dtype == torch.float32 and ops.cols < 2**31:
        lib = load("rows_select")
        if lib is not None:
            return _batch_hard_rows_native(lib, ops, labels, ref_labels, same_set)
    groups = LabelGroups(labels, ref_labels, same_set)
    pidx, pvalid = groups.pidx, groups.pvalid
    device = pidx.device
    p = torch.zeros(ops.rows, dtype=torch.long, device=device)
    n = torch.empty(ops.rows, dtype=torch.long, device=device)
    for start, end, s in ops.blocks(scores=True):
        if pidx.shape[1]:
            s_ap = s.gather(1, pidx[start:end]).masked_fill_(~pvalid[start:end], float("-inf"))
            p[start:end] = pidx[start:end].gather(1, s_ap.argmax(1, keepdim=True)).squeeze(1)  # first of ties
        n[start:end] = groups.push(s, start, end).argmin(1)  # in place: s is not used afterwards
    return _rows_result(pvalid.any(1) & groups.has_negatives(), p, n)


@MINERS.register("hard")
class HardMiner(nn.Module):
    """Batch-hard triplets: for each anchor its hardest (farthest) positive and hardest (closest) negative.

    $$ p^*(a) = \\arg\\max_{p:\\,y_p = y_a,\\,p \\ne a} d(a, p), \\qquad
       n^*(a) = \\arg\\min_{n:\\,y_n \\ne y_a} d(a, n) $$

    Exactly one triplet ``(a, p*, n*)`` per anchor that has a positive and a negative, so the output
    has at most B triplets; the distances are computed in blocks of a few anchors (the ``(B, R)``
    matrix is never held) and each anchor's positives are read from the sorted labels. With a P×K batch this is the
    "batch hard" variant that Hermans et al. found best; pair it with a triplet loss (hinge or
    soft-margin). Unlike the other miners it has no ``tuples_per_anchor`` option: it always returns
    one triplet per anchor.

    Reference:
        Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person Re-Identification",
        arXiv:1703.07737, 2017 (§2, "Batch Hard").

    Args:
        distance: ``"euclidean"`` (as in the paper), ``"squared_euclidean"`` or ``"cosine"``.

    Shape:
        Input ``embeddings (B, D)``, ``labels (B,)``, optional ``ref_embeddings (R, D)``,
        ``ref_labels (R,)``. Output: triplets ``(a, p, n)`` with at most B entries.

    Requirements:
        An anchor needs at least one positive (≥ 2 samples of its class in the batch, or one in the
        reference set) and one negative; P×K sampling with K ≥ 2 gives every anchor both.

    Example:
        >>> x = torch.tensor([[0.0], [1.0], [3.0], [0.6], [4.0]])
        >>> a, p, n = HardMiner()(x, torch.tensor([0, 0, 0, 1, 1]))
        >>> a.tolist(), p.tolist(), n.tolist()
        ([0, 1, 2, 3, 4], [2, 2, 0, 4, 3], [3, 3, 4, 1, 2])
    """

    output_kind: ClassVar[str] = "triplets"

    def __init__(self, distance: str = "euclidean") -> None:
        super().__init__()
        self.distance = distance
        self._distance = get_distance(distance)

    def extra_repr(self) -> str:
        return f"distance={self.distance!r}"

    @torch.no_grad()
    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Triplets:
        labels, ref_embeddings, ref_labels, same_set = prepare(embeddings, labels, ref_embeddings, ref_labels)
        if self.distance in FAST_DISTANCES and supported(embeddings, None if same_set else ref_embeddings, self.distance):
            ops = Operands(embeddings, None if same_set else ref_embeddings, self.distance)
            return _batch_hard_blocked(ops, labels, ref_labels, same_set)
        dist = self._distance(embeddings, None if same_set else ref_embeddings)
        pos, neg = masks(labels, ref_labels, same_set)
        return batch_hard(dist, pos, neg)
