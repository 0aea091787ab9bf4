"""Semi-hard negative mining (FaceNet): negatives farther than the positive but inside the margin."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.distances import get_distance
from deepmetric.miners._blocks import (
    FAST_DISTANCES,
    LabelGroups,
    MinedTuples,
    MiningNote,
    Operands,
    Outputs,
    Scratch,
    cat_indices,
    supported,
)
from deepmetric.miners._common import (
    CHUNK_ELEMENTS,
    SeededRNG,
    band_triplets,
    check_cap,
    check_choice,
    masks,
    prepare,
)
from deepmetric.registry import MINERS
from deepmetric.tuples import Triplets

__all__ = ["SemiHardMiner", "semi_hard_triplets"]

_NEGATIVES = ("hardest", "random", "all")
_FALLBACKS = (None, "hardest", "easiest")


def semi_hard_triplets(
    dist: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    margin: float = 0.2,
    negatives: str = "hardest",
    fallback: str | None = None,
    tuples_per_anchor: int | None = None,
    generator: torch.Generator | None = None,
    budget: int = CHUNK_ELEMENTS,
) -> Triplets:
    """Semi-hard triplets for every positive pair ``(a, p)`` of ``pos_mask`` (see :class:`SemiHardMiner`).

    Works over anchor chunks of at most about ``budget`` (pair, reference) cells, so memory stays
    O(B·R) whatever the number of positive pairs.
    """
    a, p = pos_mask.nonzero(as_tuple=True)
    d_ap = dist[a, p]
    fallback_n = None
    if fallback is not None:
        if fallback == "hardest":
            fallback_n = dist.masked_fill(~neg_mask, float("inf")).argmin(1)
        else:
            fallback_n = dist.masked_fill(~neg_mask, float("-inf")).argmax(1)
        fallback_n = torch.where(neg_mask.any(1), fallback_n, torch.full_like(fallback_n, -1))
    return band_triplets(
        dist, a, p, neg_mask, d_ap, d_ap + margin, negatives,  # type: ignore[arg-type]
        cap=tuples_per_anchor, generator=generator, fallback=fallback_n, budget=budget,
    )


class _Bands:
    """Semi-hard bands of a block of anchors: ``(rows, W, R)`` boolean, ``True`` where reference ``n`` is a
    negative of the anchor with ``d(a, p_j) < d(a, n) < d(a, p_j) + margin`` for its ``j``-th positive."""

    def __init__(self, groups: LabelGroups, margin: float) -> None:
        self.groups, self.pidx, self.pvalid, self.margin = groups, groups.pidx, groups.pvalid, margin
        self.scratch = Scratch("_Bands")

    def __call__(self, start: int, end: int, d: Tensor) -> tuple[Tensor, Tensor]:
        """``(band, dn)``: the band and the block with non-negatives pushed beyond every band (scratch
        tensors, valid until the next call)."""
        rows, cols = d.shape
        width = self.pidx.shape[1]
        sc = self.scratch
        dn = self.groups.push(sc.get("dn", (rows, cols), d.dtype, d.device).copy_(d), start, end)
        d_ap = d.gather(1, self.pidx[start:end])
        low = d_ap.masked_fill(~self.pvalid[start:end], float("inf"))  # padding slots: empty band
        high = d_ap.add_(self.margin)
        band = torch.gt(dn[:, None, :], low[:, :, None], out=sc.get("band", (rows, width, cols), torch.bool, d.device))
        upper = torch.lt(dn[:, None, :], high[:, :, None], out=sc.get("upper", (rows, width, cols), torch.bool, d.device))
        return band.logical_and_(upper), dn


class SemiHardNote(MiningNote):
    """:func:`_semi_hard_all` mined every ``(a, p, n)`` of the semi-hard bands (``margin``) of its
    distance blocks."""

    kind = "semi_hard_bands"

    def __init__(self, groups: LabelGroups, margin: float, distance: str, embeddings: Tensor, labels: Tensor) -> None:
        super().__init__(groups, embeddings, labels, distance)
        self.margin = margin


def _semi_hard_all(ops: Operands, groups: LabelGroups, margin: float, note: SemiHardNote | None = None) -> Triplets:
    """Every semi-hard triplet, in ``(a, p, n)`` order, written block by block straight into the outputs
    (no per-block pieces to concatenate)."""
    device = groups.pidx.device
    pidx = groups.pidx
    width = pidx.shape[1]
    bands = _Bands(groups, margin)
    outputs = Outputs(3, ops.rows, device)
    found = torch.empty(0, 2, dtype=torch.long, device=device)
    for start, end, d in ops.blocks(width):
        band, _ = bands(start, end, d)
        torch.nonzero(band.view(-1, band.shape[2]), out=found.resize_(0, 2))  # reuses the storage
        count = found.shape[0]
        if note is not None:
            note.record(start, end, count)
        if count == 0:
            continue
        pair, n = found[:, 0], found[:, 1]  # pair = row * W + slot, in (a, p, n) order
        anchors = torch.arange(start, end, device=device).repeat_interleave(width)
        sl = outputs.take(count, end)
        out_a, out_p, out_n = outputs.bufs
        torch.gather(anchors, 0, pair, out=out_a[sl])
        torch.gather(pidx[start:end].reshape(-1), 0, pair, out=out_p[sl])
        out_n[sl].copy_(n)
    return tuple(outputs.finish())  # type: ignore[return-value]


def _semi_hard_blocked(
    ops: Operands, labels: Tensor, ref_labels: Tensor, same_set: bool, margin: float, negatives: str,
    fallback: str | None, ops_source: Tensor | None = None,
) -> Triplets:
    """:func:`semi_hard_triplets` for ``negatives`` in ``("all", "hardest")`` without a cap, computed from
    distance blocks of a few anchors (never the whole ``(B, R)`` matrix) and each anchor's positives
    taken from the sorted labels. Same triplets, in the same order."""
    device = ops.x.device
    groups = LabelGroups(labels, ref_labels, same_set)
    pidx, pvalid = groups.pidx, groups.pvalid
    width = pidx.shape[1]
    empty = torch.empty(0, dtype=torch.long, device=device)
    if width == 0:
        return empty, empty.clone(), empty.clone()
    if negatives == "all" and fallback is None:
        if not same_set:
            return _semi_hard_all(ops, groups, margin)
        note = SemiHardNote(groups, margin, ops.distance, ops_source, labels)
        return MinedTuples(_semi_hard_all(ops, groups, margin, note), note)  # type: ignore[return-value]
    has_neg = groups.has_negatives()
    bands = _Bands(groups, margin)
    out_a: list[Tensor] = []
    out_p: list[Tensor] = []
    out_n: list[Tensor] = []
    for start, end, d in ops.blocks(width):
        pi, pv = pidx[start:end], pvalid[start:end]
        band, dn = bands(start, end, d)
        if negatives == "all":
            r, j, n = band.nonzero(as_tuple=True)
            ta, tp, tn = r + start, pi[r, j], n
        else:
            score = torch.where(band, dn[:, None, :], torch.tensor(float("inf"), dtype=d.dtype, device=device))
            n = score.argmin(2)
            r, j = band.any(2).nonzero(as_tuple=True)
            ta, tp, tn = r + start, pi[r, j], n[r, j]
        if fallback is not None:
            lonely = pv & ~band.any(2) & has_neg[start:end, None]
            if bool(lonely.any()):
                if fallback == "hardest":
                    fb = dn.argmin(1)  # the closest negative (non-negatives sit at +huge)
                else:
                    fb = torch.add(dn.neg(), d, alpha=2.0).argmax(1)  # 2d - dn: d on negatives, -huge elsewhere
                r, j = lonely.nonzero(as_tuple=True)
                ta = torch.cat([ta, r + start])
                tp = torch.cat([tp, pi[r, j]])
                tn = torch.cat([tn, fb[r]])
                order = ta.argsort(stable=True)
                ta, tp, tn = ta[order], tp[order], tn[order]
        out_a.append(ta)
        out_p.append(tp)
        out_n.append(tn)
    return tuple(cat_indices(parts, device) for parts in (out_a, out_p, out_n))  # type: ignore[return-value]


@MINERS.register("semi_hard")
class SemiHardMiner(nn.Module):
    """Semi-hard triplets (FaceNet): negatives farther than the positive but within the margin.

    For every positive pair (a, p) the semi-hard negatives are

    $$ \\mathcal{N}_{sh}(a, p) = \\{\\, n : y_n \\ne y_a,\\; d(a, p) < d(a, n) < d(a, p) + \\alpha \\,\\} $$

    i.e. the negatives whose triplet loss $$[d(a,p) - d(a,n) + \\alpha]_+$$ is positive but which are not
    closer than the positive. FaceNet uses *all* anchor-positive pairs and, per pair, one semi-hard
    negative; which one is chosen by ``negatives``:

    * ``"hardest"`` (default, as in FaceNet's reference implementation ``triplet_semihard_loss``):
      the semi-hard negative closest to the anchor; at most one triplet per positive pair.
    * ``"random"``: one uniformly random semi-hard negative per positive pair.
    * ``"all"``: every semi-hard negative (the set PML's ``TripletMarginMiner(type_of_triplets=
      "semihard")`` returns). The output can be large (up to P·N per anchor); combine with
      ``tuples_per_anchor``.

    A positive pair without any semi-hard negative is dropped unless ``fallback`` is set:
    ``"hardest"`` uses the anchor's closest negative (a hard triplet), ``"easiest"`` its farthest one
    (what ``triplet_semihard_loss`` does when no negative is farther than the positive).
    ``tuples_per_anchor`` then keeps a uniform random subset of at most that many triplets per
    anchor. The computation never forms all triplets: it runs over blocks of a few anchors (the
    ``(B, R)`` distance matrix is never held) and writes the triplets straight into the outputs.
    With ``negatives="all"``, no cap and no reference set the result is a tuple subclass that also
    notes how it was mined, so that :class:`~deepmetric.losses.TripletMarginLoss` given the same,
    unchanged embeddings recomputes the triplets from the same blocks instead of reading them (it is
    an ordinary 3-tuple for everything else; pickling or copying drops the note).

    Reference:
        Schroff, Kalenichenko & Philbin, "FaceNet: A Unified Embedding for Face Recognition and
        Clustering", CVPR 2015 (§3.2, eq. 4).

    Args:
        margin: the triplet margin α (FaceNet: 0.2). Use the same margin and distance as the loss,
            otherwise "semi-hard" refers to a different band than the one the loss penalises.
        distance: ``"squared_euclidean"`` (default; FaceNet's choice and the default of
            :class:`TripletMarginLoss`), ``"euclidean"`` or ``"cosine"``.
        negatives: ``"hardest"``, ``"random"`` or ``"all"`` (see above).
        fallback: ``None``, ``"hardest"`` or ``"easiest"`` (see above).
        tuples_per_anchor: at most this many triplets per anchor (uniform random subset); ``None``:
            no cap.
        seed: seed of the random choices (``None``: the global torch RNG).

    Shape:
        Input ``embeddings (B, D)``, ``labels (B,)``, optional ``ref_embeddings (R, D)``,
        ``ref_labels (R,)``. Output: triplets ``(a, p, n)``; at most one per positive pair unless
        ``negatives="all"``.

    Requirements:
        ≥ 2 samples per class (or positives in the reference set) and at least two classes.

    Example:
        >>> x = torch.tensor([[0.0], [0.5], [0.6], [2.0]])
        >>> a, p, n = SemiHardMiner(margin=0.2)(x, torch.tensor([0, 0, 1, 1]))
        >>> a.tolist(), p.tolist(), n.tolist()  # squared distances: 0.25 < d(0, 2) = 0.36 < 0.45
        ([0], [1], [2])
    """

    output_kind: ClassVar[str] = "triplets"

    def __init__(
        self,
        margin: float = 0.2,
        distance: str = "squared_euclidean",
        negatives: str = "hardest",
        fallback: str | None = None,
        tuples_per_anchor: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("negatives", negatives, _NEGATIVES)
        check_choice("fallback", fallback, _FALLBACKS)
        self.margin = float(margin)
        self.distance = distance
        self._distance = get_distance(distance)
        self.negatives = negatives
        self.fallback = fallback
        self.tuples_per_anchor = check_cap(tuples_per_anchor)
        self.rng = SeededRNG(seed)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, distance={self.distance!r}, negatives={self.negatives!r}, "
            f"fallback={self.fallback!r}, tuples_per_anchor={self.tuples_per_anchor}, seed={self.rng.seed}"
        )

    @torch.no_grad()
    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Triplets:
        labels, ref_embeddings, ref_labels, same_set = prepare(embeddings, labels, ref_embeddings, ref_labels)
        if (
            self.negatives in ("all", "hardest")
            and self.tuples_per_anchor is None
            and self.distance in FAST_DISTANCES
            and supported(embeddings, None if same_set else ref_embeddings, self.distance)
        ):
            ops = Operands(embeddings, None if same_set else ref_embeddings, self.distance)
            return _semi_hard_blocked(
                ops, labels, ref_labels, same_set, self.margin, self.negatives, self.fallback, embeddings
            )
        dist = self._distance(embeddings, None if same_set else ref_embeddings)
        pos, neg = masks(labels, ref_labels, same_set)
        return semi_hard_triplets(
            dist, pos, neg, self.margin, self.negatives, self.fallback, self.tuples_per_anchor,
            self.rng.get(embeddings.device),
        )
