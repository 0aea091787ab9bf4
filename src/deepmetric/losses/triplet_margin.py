"""Triplet margin loss (FaceNet) over all valid triplets of a batch, mined triplets or mined pairs."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric._native import load
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
from deepmetric.miners import _blocks
from deepmetric.miners._blocks import LabelGroups, Operands, Scratch, big, block_loss, block_rows, supported
from deepmetric.registry import LOSSES
from deepmetric.tuples import Indices, check_inputs, is_pairs, is_triplets, zero_loss

__all__ = ["TripletMarginLoss", "triplet_margin_loss", "triplet_margin_loss_explicit"]

_REDUCTIONS = ("mean_nonzero", "mean", "sum")
_EPS = 1e-12  # the clamp of paired_distance
# Elements of the (anchor chunk, positives, references) block used by the soft-margin path.
_SOFT_CHUNK_ELEMENTS = 1 << 22
# Up to this many positives per anchor the hinge is summed slot by slot (cheaper than sorting).
_DENSE_POSITIVE_SLOTS = 8
# Explicit triplets: with fewer than (B·R) / this many triplets the distances are computed per triplet
# from the gathered embeddings (O(T·D)); with more, from the (B, R) distance blocks (one matmul).
_PER_TRIPLET_RATIO = 32


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


def _native_triplet_terms(x, y, a, p, n, margin, soft_margin, squared, want_grad, rows_in_order):
    """:class:`_PairedTriplets`' value, count and gradient in one C loop over the triplets
    (``dm_triplet_terms`` in ``deepmetric/_native/rows_select.c``: the same formulas, O(T·D) work,
    no (T, D) temporaries), or ``None`` where it does not apply: float32 on CPU, one embedding set
    (``y is None``), hinge (not soft margin), and the kernel available."""
    if y is not None or soft_margin or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    lib = load("rows_select")
    if lib is None:
        return None
    xc = x.detach().contiguous()
    idx = [t.to(torch.int64).contiguous() for t in (a, p, n)]
    gx = torch.zeros_like(xc) if want_grad else None
    out = torch.zeros(2, dtype=torch.float64)
    lib.dm_triplet_terms(
        xc.data_ptr(), xc.shape[1], None if rows_in_order else idx[0].data_ptr(), idx[1].data_ptr(),
        idx[2].data_ptr(), idx[1].numel(), float(margin), int(bool(squared)), _EPS,
        None if gx is None else gx.data_ptr(), out.data_ptr(),
    )
    total = out[0].to(x.dtype)
    count = out[1].round().to(torch.int64)
    return total, count, gx


class _PairedTriplets(torch.autograd.Function):
    """Terms of few explicit triplets from the gathered embeddings (``‖x_a − y_p‖``, ``‖x_a − y_n‖``):
    value, non-zero count and the gradient in one pass (instead of autograd through a dozen
    ``(T, D)`` operations). Euclidean and squared euclidean; same formulas as :func:`paired_distance`.

    ``rows_in_order``: ``a`` is ``0 … B−1`` (one triplet per anchor row, as batch-hard mining gives),
    so the anchors' gradient is written directly instead of scattered. The positives' and negatives'
    gradients go through a single ``index_add_`` (each such call has a fixed cost on CPU)."""

    @staticmethod
    def forward(ctx, x, y, a, p, n, margin, soft_margin, squared, want_grad, rows_in_order=False):  # type: ignore[override]
        native = _native_triplet_terms(x, y, a, p, n, margin, soft_margin, squared, want_grad, rows_in_order)
        if native is not None:
            total, count, gx = native
            ctx.mark_non_differentiable(count)
            if want_grad:
                ctx.save_for_backward(gx, None)
            return total, count
        ref = x if y is None else y
        scratch = Scratch("_PairedTriplets")  # work buffers (a fresh (T, D) buffer costs page faults)
        t, dim = a.numel(), x.shape[1]
        xa = torch.index_select(x, 0, a, out=scratch.get("xa", (t, dim), x.dtype, x.device))
        diffs = scratch.get("pn", (2 * t, dim), x.dtype, x.device)  # x_a − y_p, then x_a − y_n
        dp, dn = diffs[:t], diffs[t:]
        torch.index_select(ref, 0, p, out=dp)
        torch.index_select(ref, 0, n, out=dn)
        pairs = diffs.view(2, t, dim)
        torch.sub(xa.unsqueeze(0), pairs, out=pairs)
        sq = torch.bmm(diffs.unsqueeze(1), diffs.unsqueeze(2)).view(-1)  # row-wise squared norms
        dist = sq if squared else sq.clamp_min(_EPS).sqrt_()
        d_ap, d_an = dist[:t], dist[t:]
        z = d_ap - d_an
        if soft_margin:
            terms = F.softplus(z)
            weight = torch.sigmoid(z)
        else:
            terms = z.add_(margin).clamp_min_(0.0)
            weight = torch.sign(terms)
        total, count = terms.sum(), (terms > 0).sum()
        ctx.mark_non_differentiable(count)
        if want_grad:
            coef = torch.cat([weight, weight.neg()])  # ±∂S/∂d for the positive and the negative pair
            if squared:
                coef.mul_(2.0)
            else:  # ∂d/∂x_a = (x_a − y) / d where s = d² >= eps (the clamp passes), 0 below
                coef.div_(dist).mul_(sq >= _EPS)
            diffs.mul_(coef[:, None])  # ∂S/∂x_a = c_p·(x_a − y_p) − c_n·(x_a − y_n)
            if rows_in_order:
                gx = torch.add(dp, dn)
            else:
                gx = torch.zeros_like(x)
                gx.index_add_(0, a, torch.add(dp, dn, out=xa))
            gy = gx if y is None else torch.zeros_like(y)
            gy.index_add_(0, torch.cat([p, n]), diffs, alpha=-1.0)  # ∂S/∂y = −(the anchors' terms)
            ctx.save_for_backward(gx, None if y is None else gy)
        return total, count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_count):  # type: ignore[override]
        gx, gy = ctx.saved_tensors
        return (gx * grad_total, None if gy is None else gy * grad_total) + (None,) * 8


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

def _strictly_increasing(t: Tensor) -> bool:
    return t.numel() < 2 or bool((t[1:] > t[:-1]).all())


def _positives_from_pairs(a1: Tensor, p: Tensor, batch: int, ref_size: int) -> tuple[Tensor, Tensor]:
    """The distinct positive pairs ``(a1, p)`` as padded per-anchor ``(B, W)`` reference indices."""
    flat = torch.add(p, a1, alpha=ref_size)
    if not _strictly_increasing(flat):
        flat = torch.unique(flat)  # sorted and de-duplicated: the pairs form a set
        a1 = torch.div(flat, ref_size, rounding_mode="floor")
        p = flat - a1 * ref_size
    counts = torch.bincount(a1, minlength=batch)
    width = int(counts.max()) if counts.numel() else 0
    slot = torch.arange(a1.numel(), device=a1.device) - (torch.cumsum(counts, 0) - counts)[a1]
    cols = torch.zeros(batch, width, dtype=torch.long, device=a1.device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=a1.device)
    cols[a1, slot] = p
    valid[a1, slot] = True
    return cols, valid


def _slot_penalty(valid: Tensor, dtype: torch.dtype) -> Tensor:
    """0 on the valid positive slots, -inf on the others (added to the thresholds)."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, float("-inf"))


class _SlotHinge:
    """Block kernel of ``S = Σ_{a, p, n} [d_ap + m − d_an]₊`` over each anchor's positives ``p`` (padded
    ``(B, W)`` indices) and negatives ``n`` (cells whose penalty is 0).

    Per positive slot the row is compared once with the threshold ``t_p = d_ap + m``:
    ``c_n = #{p : d_an < t_p}`` and ``k_p = #{n : d_an < t_p}``, so that
    ``S = Σ_p t_p·k_p − Σ_n c_n·d_an``, ``∂S/∂d_an = −c_n`` and ``∂S/∂d_ap = k_p`` (exact counts).
    """

    def __init__(self, margin: float, pidx: Tensor, pvalid: Tensor, negatives) -> None:
        self.margin = margin
        self.pidx, self.pvalid = pidx, pvalid
        self.negatives = negatives  # (d, start, end, out) -> d + penalty (penalty huge off the negatives)
        self.scratch = Scratch("_SlotHinge")
        self._tpen: Tensor | None = None

    def __call__(self, d: Tensor, start: int, end: int, want_grad: bool):
        rows, cols = d.shape
        pidx, pvalid = self.pidx[start:end], self.pvalid[start:end]
        width = pidx.shape[1]
        if width == 0:
            return (torch.zeros((), dtype=torch.float64, device=d.device),
                    torch.zeros((), dtype=torch.long, device=d.device), None, None)
        if self._tpen is None:
            self._tpen = _slot_penalty(self.pvalid, d.dtype)
        sc = self.scratch
        dn = self.negatives(d, start, end, sc.get("dn", (rows, cols), d.dtype, d.device))
        kept = getattr(self.negatives, "kept_positives", None)  # fused mining: this block's positives
        if kept is not None:
            pvalid, tpen = kept, _slot_penalty(kept, d.dtype)
        else:
            tpen = self._tpen[start:end]
        t = d.gather(1, pidx).add_(self.margin).add_(tpen)  # -inf on padding (and unkept) slots
        c, cnt = self._slots(t, dn, sc)
        tz = torch.where(pvalid, t, torch.zeros((), dtype=t.dtype, device=t.device))
        # row sums in the working dtype, accumulated in float64 across rows (the two sums nearly cancel)
        value = (tz * cnt).sum(1).double().sum() - torch.mul(c, d, out=dn).sum(1).double().sum()
        count = cnt.sum(1).double().sum().round().long()
        if not want_grad:
            return value, count, None, None
        grad = c.neg_()
        grad.scatter_add_(1, pidx, cnt)  # padding slots carry a zero count
        return value, count, grad, None

    @staticmethod
    def _slots(t: Tensor, dn: Tensor, sc: Scratch) -> tuple[Tensor, Tensor]:
        """One vectorised comparison of the row per threshold (measured faster on CPU than sorting the
        row or a vectorised binary search among the sorted thresholds, up to W = 127)."""
        rows, cols = dn.shape
        width = t.shape[1]
        c = sc.get("c", (rows, cols), dn.dtype, dn.device)
        cnt = torch.empty(rows, width, dtype=dn.dtype, device=dn.device)
        torch.lt(dn, t[:, :1], out=c)
        cnt[:, 0] = c.sum(1)
        if width > 1:
            act = sc.get("act", (rows, cols), dn.dtype, dn.device)
            for j in range(1, width):
                torch.lt(dn, t[:, j : j + 1], out=act)
                cnt[:, j] = act.sum(1)
                c.add_(act)
        return c, cnt


def _label_negatives(groups: LabelGroups):
    return lambda d, start, end, out: groups.push(out.copy_(d), start, end)


def _pair_negatives(cells: "PairCells", counts: Tensor, big: float):
    """Negatives given as pairs: huge everywhere but on the block's negative cells; records the counts."""

    def negatives(d: Tensor, start: int, end: int, out: Tensor) -> Tensor:
        cells.fill(out.fill_(big), start, 0.0)
        counts[start:end] = out.shape[1] - torch.count_nonzero(out, dim=1)
        return out.add_(d)

    return negatives


class _KeptNegatives:
    """The negatives the multi-similarity ε-rule (:class:`~deepmetric.miners.multi_similarity._Kept`)
    keeps in a block of anchors, from the block's cosine similarities (one more matmul, rows of
    ``step`` at most): :meth:`_keep` gives the kept positive slots and the kept negatives (0/1 floats
    in ``out``); :meth:`_penalised` turns the latter into ``d`` on them, huge elsewhere."""

    def __init__(self, kept, embeddings: Tensor, step: int, owner: str) -> None:
        self.kept, self.step, self.big = kept, step, big(embeddings.dtype)
        self.ops = Operands(embeddings.detach(), None, "cosine")
        self.scratch = Scratch(owner)

    def _keep(self, start: int, end: int, out: Tensor) -> tuple[Tensor, Tensor]:
        rows, cols = out.shape
        ops = self.ops
        buf = self.scratch.get("sim", (min(self.step, ops.rows), cols), ops.x.dtype, ops.x.device)
        sim = torch.mm(ops.x[start:end], ops.yt, out=buf[:rows])
        return self.kept(start, end, sim, out=out)

    def _penalised(self, keep: Tensor, d: Tensor) -> Tensor:
        return keep.sub_(1.0).mul_(-self.big).add_(d)  # huge off the kept negatives, d on them


class _MinedNegatives(_KeptNegatives):
    """The negatives of :class:`~deepmetric.miners.MultiSimilarityMiner` pairs, recomputed per block from
    the miner's similarity blocks (same operations, same blocks) instead of read from the 4-tuple, and
    checked against the miner's per-block counts (``mismatch`` if they differ)."""

    def __init__(self, note, embeddings: Tensor, counts: Tensor) -> None:
        super().__init__(note.kept, embeddings, note.step, "_MinedNegatives")
        self.note, self.counts = note, counts
        self.mismatch = False

    def __call__(self, d: Tensor, start: int, end: int, out: Tensor) -> Tensor:
        _, keep = self._keep(start, end, out)
        per_row = keep.sum(1)  # exact: integers below 2**24
        self.counts[start:end] = per_row
        if int(per_row.sum()) != self.note.counts.get(start, 0):
            self.mismatch = True
        return self._penalised(keep, d)


class _FusedMultiSimilarity(_KeptNegatives):
    """Multi-similarity mining inside the loss's blocks (``loss(x, y, miner=MultiSimilarityMiner())``):
    the kept negatives of each block and its kept positive slots (``kept_positives``, read by
    :class:`_SlotHinge`); the number of triplets, ``Σ_a #kept positives(a) · #kept negatives(a)``,
    is counted as the blocks pass. No pair is listed."""

    def __init__(self, groups: LabelGroups, embeddings: Tensor, epsilon: float, step: int) -> None:
        from deepmetric.miners.multi_similarity import _Kept

        super().__init__(_Kept(groups, epsilon), embeddings, step, "_FusedMultiSimilarity")
        self.kept_positives: Tensor | None = None
        self.triplets = torch.zeros((), dtype=torch.float64, device=embeddings.device)

    def __call__(self, d: Tensor, start: int, end: int, out: Tensor) -> Tensor:
        keep_pos, keep = self._keep(start, end, out)
        self.kept_positives = keep_pos
        per_row = keep.sum(1, dtype=torch.float64)
        self.triplets += (keep_pos.sum(1, dtype=torch.float64) * per_row).sum()
        return self._penalised(keep, d)


def _multi_similarity_fused(
    embeddings: Tensor, labels: Tensor, epsilon: float, margin: float, distance: str, reduction: str
) -> Tensor:
    """Every ``(a, p, n)`` of a kept positive and a kept negative pair of
    :class:`~deepmetric.miners.MultiSimilarityMiner` (no cap), mined inside the loss's blocks."""
    lab = labels.to(embeddings.device)
    groups = LabelGroups(lab, lab, True)
    if groups.pidx.shape[1] == 0:
        return zero_loss(embeddings, None)
    x, _ = _block_operands(embeddings, None, distance)
    step = block_rows(x.shape[0], x.shape[0], x.device)
    negatives = _FusedMultiSimilarity(groups, embeddings, epsilon, step)
    total, nonzero = block_loss(_SlotHinge(margin, groups.pidx, groups.pvalid, negatives), x, None, distance, step=step)
    n_triplets = negatives.triplets.round().long()
    if int(n_triplets) == 0:
        return zero_loss(embeddings, None)
    return reduce_terms(total, n_triplets, nonzero, reduction)


class _TripletTerms:
    """Block kernel of the terms of explicit, anchor-sorted triplets ``(a, p, n)``: the distances are
    read from the block and ``∂S/∂D`` (the hinge's or soft-plus' derivative) is scattered back."""

    def __init__(self, a: Tensor, p: Tensor, n: Tensor, margin: float, soft_margin: bool, slices: dict[int, tuple[int, int]]) -> None:
        self.a, self.p, self.n = a, p, n
        self.margin = margin
        self.soft_margin = soft_margin
        self.slices = slices  # block start -> the range of triplets whose anchor is in that block
        self.scratch = Scratch("_TripletTerms")

    def __call__(self, d: Tensor, start: int, end: int, want_grad: bool):
        rows, cols = d.shape
        i0, i1 = self.slices[start]
        if i0 == i1:
            return (torch.zeros((), dtype=torch.float64, device=d.device),
                    torch.zeros((), dtype=torch.long, device=d.device), None, None)
        sc = self.scratch
        size = (i1 - i0,)
        local = torch.sub(self.a[i0:i1], start, out=sc.get("fn", size, torch.long, d.device))
        fp = torch.add(self.p[i0:i1], local, alpha=cols, out=sc.get("fp", size, torch.long, d.device))  # cell of (a, p)
        fn = local.mul_(cols).add_(self.n[i0:i1])  # cell of (a, n)
        flat = d.view(-1)
        z = torch.index_select(flat, 0, fp, out=sc.get("z", size, d.dtype, d.device))
        other = torch.index_select(flat, 0, fn, out=sc.get("w", size, d.dtype, d.device))
        z.sub_(other)  # d_ap - d_an
        if self.soft_margin:
            terms = F.softplus(z)
            weight = torch.sigmoid(z, out=other) if want_grad else None
            count = torch.count_nonzero(terms)
        else:
            terms = z.add_(self.margin).clamp_min_(0.0)
            weight = torch.sign(terms, out=other)  # 1 where the hinge is active
            # the number of active terms: exact as a float sum below 2**24 terms per block
            count = weight.sum().round().long() if weight.numel() < (1 << 24) else torch.count_nonzero(terms)
        value = terms.sum().double()
        if not want_grad:
            return value, count, None, None
        grad = sc.get("grad", (rows * cols,), d.dtype, d.device).zero_()
        grad.scatter_add_(0, fp, weight)
        grad_n = sc.get("grad_n", (rows * cols,), d.dtype, d.device).zero_()
        grad_n.scatter_add_(0, fn, weight)
        return value, count, grad.sub_(grad_n).view(rows, cols), None


class _BandHinge:
    """Block kernel of the hinge over the triplets a :class:`~deepmetric.miners.SemiHardMiner` returned
    (``negatives="all"``), recomputed from the same distance blocks rather than read from the indices:
    the bands ``d_ap < d_an < d_ap + m_miner`` are rebuilt exactly as the miner built them (same
    operations on the same blocks) and checked against the miner's per-block counts; the terms are
    those of the index path, ``[(d_ap − d_an) + m]₊``."""

    def __init__(self, note, margin: float) -> None:
        self.groups, self.band_margin, self.counts = note.groups, note.margin, note.counts
        self.margin = margin
        self.scratch = Scratch("_BandHinge")
        self.mismatch = False
        self.band_total = 0  # triplets in the bands (fused mining: no miner counts to check against)

    def __call__(self, d: Tensor, start: int, end: int, want_grad: bool):
        rows, cols = d.shape
        zero = (torch.zeros((), dtype=torch.float64, device=d.device), torch.zeros((), dtype=torch.long, device=d.device), None, None)
        groups, sc = self.groups, self.scratch
        pidx, pvalid = groups.pidx[start:end], groups.pvalid[start:end]
        width = pidx.shape[1]
        if self.mismatch or width == 0:
            return zero
        dn = groups.push(sc.get("dn", (rows, cols), d.dtype, d.device).copy_(d), start, end)
        d_ap = d.gather(1, pidx)
        low = d_ap.masked_fill(~pvalid, float("inf"))
        high = d_ap + self.band_margin
        shape = (rows, width, cols)
        band = torch.gt(dn[:, None, :], low[:, :, None], out=sc.get("band", shape, d.dtype, d.device))
        band.mul_(torch.lt(dn[:, None, :], high[:, :, None], out=sc.get("z", shape, d.dtype, d.device)))
        found = int(band.sum(2).sum(dtype=torch.float64).item())  # 0/1 sums: exact
        if self.counts is None:
            self.band_total += found
        elif found != self.counts.get(start, 0):
            self.mismatch = True
            return zero
        z = torch.sub(d_ap[:, :, None], d[:, None, :], out=sc.get("z", shape, d.dtype, d.device))  # d_ap - d_an
        terms = z.add_(self.margin).clamp_min_(0.0).mul_(band)
        value = terms.sum(2).sum(1).double().sum()
        weight = torch.sign(terms, out=band)  # 1 where the hinge is active
        count = weight.sum().round().long()
        if not want_grad:
            return value, count, None, None
        grad = weight.sum(1).neg_()  # -#{p : (a, p, n) active}
        grad.scatter_add_(1, pidx, weight.sum(2))  # +#{n : (a, p, n) active}; padding slots add 0
        return value, count, grad, None


def _semi_hard_band_loss(
    embeddings: Tensor, triplets: tuple, margin: float, distance: str, reduction: str
) -> Tensor | None:
    """The loss of semi-hard triplets from their mining note (``None`` if the bands do not reproduce)."""
    note = triplets.note  # type: ignore[attr-defined]
    kernel = _BandHinge(note, margin)
    x, _ = _block_operands(embeddings, None, distance)
    total, nonzero = block_loss(kernel, x, None, distance, step=note.step)
    if kernel.mismatch:
        return None
    count_all = torch.tensor(triplets[0].numel(), device=embeddings.device)
    return reduce_terms(total, count_all, nonzero, reduction)


class _FusedNote:
    """What :class:`_BandHinge` reads when the loss mines the semi-hard bands itself (no miner call)."""

    def __init__(self, groups: LabelGroups, margin: float) -> None:
        self.groups, self.margin, self.counts = groups, margin, None


def _semi_hard_fused(
    embeddings: Tensor, labels: Tensor, band_margin: float, margin: float, distance: str, reduction: str
) -> Tensor:
    """The loss of every semi-hard triplet (``d_ap < d_an < d_ap + band_margin``) of the batch, the bands
    built block by block inside the loss: the triplets are never listed (O(block·W·B) memory)."""
    groups = LabelGroups(labels, labels, True)
    width = groups.pidx.shape[1]
    if width == 0:
        return zero_loss(embeddings, None)
    kernel = _BandHinge(_FusedNote(groups, band_margin), margin)
    x, _ = _block_operands(embeddings, None, distance)
    rows, cols = x.shape[0], x.shape[0]
    budget = None if x.device.type != "cpu" else _blocks.BLOCK_ELEMENTS * min(width, 4)  # as the miner's blocks
    step = block_rows(rows, cols * width, x.device, budget)
    total, nonzero = block_loss(kernel, x, None, distance, step=step)
    if kernel.band_total == 0:
        return zero_loss(embeddings, None)
    count_all = torch.tensor(kernel.band_total, device=embeddings.device)
    return reduce_terms(total, count_all, nonzero, reduction)


def _fusable(miner: object, distance: str, soft_margin: bool, same_set: bool, fast: bool) -> bool:
    """Whether the loss can mine ``miner``'s triplets itself (see :func:`_semi_hard_fused`)."""
    from deepmetric.miners.semi_hard import SemiHardMiner

    return (
        isinstance(miner, SemiHardMiner) and miner.negatives == "all" and miner.fallback is None
        and miner.tuples_per_anchor is None and miner.distance == distance
        and fast and same_set and not soft_margin
    )


def _batch_hard_fused(
    embeddings: Tensor, labels: Tensor, miner: nn.Module, margin: float, distance: str, soft_margin: bool,
    reduction: str,
) -> Tensor:
    """``loss(x, y, miner=HardMiner(...))`` in one go: the miner's blocks give one triplet per anchor row
    (known valid: no index checks), whose terms come from the gathered embeddings, the anchors'
    gradient written row by row when every row has a triplet."""
    from deepmetric.miners.hard import batch_hard_rows

    with torch.no_grad():
        lab = labels.to(embeddings.device)
        a, p, n, rows = batch_hard_rows(Operands(embeddings.detach(), None, miner.distance), lab, lab, True)
    if a.numel() == 0:
        return zero_loss(embeddings, None)
    want_grad = torch.is_grad_enabled() and embeddings.requires_grad
    total, nonzero = _PairedTriplets.apply(
        embeddings, None, a, p, n, margin, soft_margin, distance == "squared_euclidean", want_grad, rows
    )
    return reduce_terms(total, torch.tensor(a.numel(), device=embeddings.device), nonzero, reduction)


def _hard_fusable(miner: object, embeddings: Tensor, distance: str) -> bool:
    """Whether the loss can mine ``miner``'s triplets in the same call (see :func:`_batch_hard_fused`)."""
    from deepmetric.miners.hard import HardMiner

    return isinstance(miner, HardMiner) and distance != "cosine" and supported(embeddings, None, miner.distance)


def _ms_fusable(miner: object, embeddings: Tensor, soft_margin: bool) -> bool:
    """Whether the loss can mine ``miner``'s pairs itself (see :func:`_multi_similarity_fused`)."""
    from deepmetric.miners.multi_similarity import MultiSimilarityMiner

    return (
        isinstance(miner, MultiSimilarityMiner) and miner.tuples_per_anchor is None and not soft_margin
        and supported(embeddings, None, "cosine")
    )


def _anchor_slices(a: Tensor, batch: int, step: int) -> dict[int, tuple[int, int]] | None:
    """For each block of ``step`` anchor rows, the slice of ``a`` holding its triplets; ``None`` unless
    every anchor lies in its block's slice (``a`` grouped by block, any order inside a block). One
    min/max pass over ``a``, which also proves every anchor in range."""
    starts = list(range(0, batch, step))
    bounds = torch.searchsorted(a, torch.tensor(starts + [batch], dtype=a.dtype, device=a.device)).tolist()
    if bounds[0] != 0 or bounds[-1] != a.numel() or any(x > y for x, y in zip(bounds, bounds[1:])):
        return None
    slices = {}
    for k, start in enumerate(starts):
        lo, hi = bounds[k], bounds[k + 1]
        if hi > lo:
            first, last = torch.aminmax(a[lo:hi])
            if int(first) < start or int(last) >= min(start + step, batch):
                return None
        slices[start] = (lo, hi)
    return slices


def _check_anchor_range(a: Tensor, batch: int) -> None:
    lo, hi = torch.aminmax(a)
    if int(lo) < 0 or int(hi) >= batch:
        raise DataError(f"anchor index out of range for a batch of {batch}")


def _triplets_blocked(
    embeddings: Tensor, ref: Tensor | None, triplets: Indices, batch: int, ref_size: int,
    margin: float, distance: str, soft_margin: bool, reduction: str,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """Explicit triplets from distance blocks, with the checks of :func:`check_triplets` (same errors, in
    the same order); when there are too few triplets for blocks to pay off, the checked ``(a, p, n)``
    instead (for the per-triplet path)."""
    device = embeddings.device
    a, p, n = (torch.as_tensor(t).long().reshape(-1) for t in triplets)
    if not (a.numel() == p.numel() == n.numel()):
        raise DataError(f"triplet index tensors differ in length: {a.numel()}, {p.numel()}, {n.numel()}")
    if a.numel() * _PER_TRIPLET_RATIO <= batch * ref_size:
        if a.numel():  # the checks of check_triplets, one min/max pass per tensor
            _check_anchor_range(a, batch)
            if not (_in_range(p, ref_size) and _in_range(n, ref_size)):
                raise DataError(f"reference index out of range for a reference set of {ref_size}")
        return a.to(device), p.to(device), n.to(device)
    (plo, phi), (nlo, nhi) = torch.aminmax(p), torch.aminmax(n)
    refs_ok = min(int(plo), int(nlo)) >= 0 and max(int(phi), int(nhi)) < ref_size
    a, p, n = a.to(device), p.to(device), n.to(device)
    step = block_rows(batch, ref_size, device)
    slices = _anchor_slices(a, batch, step)
    if slices is None:
        _check_anchor_range(a, batch)
    if not refs_ok:
        raise DataError(f"reference index out of range for a reference set of {ref_size}")
    if slices is None:
        order = torch.argsort(a, stable=True)
        a, p, n = a[order], p[order], n[order]
        slices = _anchor_slices(a, batch, step)
        assert slices is not None
    x, y = _block_operands(embeddings, ref, distance)
    kernel = _TripletTerms(a, p, n, margin, soft_margin, slices)
    total, nonzero = block_loss(kernel, x, y, distance, step=step)
    count_all = torch.tensor(a.numel(), device=device)
    return reduce_terms(total, count_all, nonzero, reduction)


def _in_range(t: Tensor, size: int) -> bool:
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return int(lo) >= 0 and int(hi) < size


def pair_cells(indices: Indices, batch: int, ref_size: int, step: int, device: torch.device) -> tuple["PairCells", "PairCells"]:
    """The checks :func:`resolve_masks` makes on pairs ``(a1, p, a2, n)`` (same errors, in the same order),
    then the positive and the negative pairs grouped by blocks of ``step`` anchor rows."""
    if not isinstance(indices, (tuple, list)) or len(indices) not in (3, 4):
        raise DataError("indices must be triplets (a, p, n) or pairs (a1, p, a2, n)")
    for t in indices:
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise DataError("every index tensor must be a 1-D long tensor")
    if len(indices) == 3:
        indices = (indices[0], indices[1], indices[0], indices[2])
    a1, p, a2, n = (t.to(device).long() for t in indices)
    refs_ok = _in_range(p, ref_size) and _in_range(n, ref_size)
    found = []
    for rows in (a1, a2):
        slices = _anchor_slices(rows, batch, step)
        if slices is None:
            _check_anchor_range(rows, batch)
        found.append(slices)
    if not refs_ok:
        raise DataError(f"reference index out of range for a reference set of {ref_size}")
    return PairCells(a1, p, found[0], batch, step), PairCells(a2, n, found[1], batch, step)


class PairCells:
    """Index pairs ``(rows[i], cols[i])`` grouped by blocks of anchor rows, written into blocks on demand."""

    def __init__(self, rows: Tensor, cols: Tensor, slices: dict[int, tuple[int, int]] | None, batch: int, step: int) -> None:
        if slices is None:  # not grouped by block: sort by row once
            order = torch.argsort(rows, stable=True)
            rows, cols = rows[order], cols[order]
            slices = _anchor_slices(rows, batch, step)
            assert slices is not None
        self.rows, self.cols, self.slices = rows, cols, slices
        self.scratch = Scratch("PairCells")

    def fill(self, block: Tensor, start: int, value: float) -> Tensor:
        """In place: ``block[r - start, c] = value`` for the pairs of the block starting at row ``start``."""
        i0, i1 = self.slices[start]
        if i1 > i0:
            flat = torch.sub(self.rows[i0:i1], start, out=self.scratch.get("flat", (i1 - i0,), torch.long, block.device))
            flat.mul_(block.shape[1]).add_(self.cols[i0:i1])
            block.view(-1).index_fill_(0, flat, value)
        return block


def _block_operands(embeddings: Tensor, ref: Tensor | None, distance: str) -> tuple[Tensor, Tensor | None]:
    if distance == "cosine":
        x = F.normalize(embeddings, dim=1)
        return x, None if ref is None else F.normalize(ref, dim=1)
    return embeddings, ref


def _all_triplets_blocked(
    embeddings: Tensor, labels: Tensor, ref: Tensor | None, ref_labels: Tensor | None, indices: Indices | None,
    margin: float, distance: str, reduction: str,
) -> Tensor:
    """Hinge loss over every ``(a, p, n)`` of the label masks or of the given pairs, in anchor blocks."""
    batch = embeddings.shape[0]
    ref_size = batch if ref is None else ref.shape[0]
    device, dtype = embeddings.device, embeddings.dtype
    step = block_rows(batch, ref_size, device)
    note = getattr(indices, "note", None)
    mined = note if (
        ref is None and getattr(note, "kind", None) == "multi_similarity_pairs"
        and note.matches(embeddings, labels, indices)  # type: ignore[union-attr]
    ) else None
    if indices is None:
        groups = LabelGroups(labels.to(device), labels.to(device) if ref_labels is None else ref_labels.to(device), ref is None)
        pidx, pvalid = groups.pidx, groups.pvalid
        negatives = _label_negatives(groups)
        neg_count = ref_size - groups.same_count
    elif mined is not None:  # pairs of MultiSimilarityMiner: recompute its negatives, block by block
        pidx, pvalid = _positives_from_pairs(indices[0], indices[1], batch, ref_size)
        neg_count = torch.zeros(batch, dtype=torch.long, device=device)
        negatives = _MinedNegatives(mined, embeddings, neg_count)
        step = mined.step
    else:
        pos_cells, neg_cells = pair_cells(indices, batch, ref_size, step, device)
        pidx, pvalid = _positives_from_pairs(pos_cells.rows, pos_cells.cols, batch, ref_size)
        neg_count = torch.zeros(batch, dtype=torch.long, device=device)
        negatives = _pair_negatives(neg_cells, neg_count, big(dtype))
    if not bool(pvalid.any()):
        return zero_loss(embeddings, ref)
    x, y = _block_operands(embeddings, ref, distance)
    total, nonzero = block_loss(_SlotHinge(margin, pidx, pvalid, negatives), x, y, distance, step=step)
    if mined is not None and negatives.mismatch:  # the blocks did not reproduce the miner's: read the pairs
        return _all_triplets_blocked(embeddings, labels, ref, ref_labels, tuple(indices), margin, distance, reduction)
    n_triplets = (pvalid.sum(1) * neg_count).sum()  # neg_count is complete once every block has been seen
    if int(n_triplets) == 0:
        return zero_loss(embeddings, ref)
    return reduce_terms(total, n_triplets, nonzero, reduction)


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
    miner: nn.Module | None = None,
) -> Tensor:
    """Functional form of :class:`TripletMarginLoss` (same arguments)."""
    check_distance(distance)
    check_reduction(reduction, _REDUCTIONS)
    same_set = ref_embeddings is None
    ref, ref_lab = check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    batch, ref_size = embeddings.shape[0], ref.shape[0]
    fast = supported(embeddings, None if same_set else ref, distance)
    if miner is not None:
        if indices is not None:
            raise DataError("pass either indices= (mined tuples) or miner=, not both")
        if _fusable(miner, distance, soft_margin, same_set, fast):
            return _semi_hard_fused(embeddings, labels, miner.margin, margin, distance, reduction)  # type: ignore[attr-defined]
        if same_set and fast:
            if _hard_fusable(miner, embeddings, distance):
                return _batch_hard_fused(embeddings, labels, miner, margin, distance, soft_margin, reduction)
            if _ms_fusable(miner, embeddings, soft_margin):
                return _multi_similarity_fused(embeddings, labels, miner.epsilon, margin, distance, reduction)  # type: ignore[attr-defined]
        with torch.no_grad():
            if same_set:
                indices = miner(embeddings.detach(), labels)
            else:
                indices = miner(embeddings.detach(), labels, ref.detach(), ref_lab)
    if indices is not None and is_triplets(indices):
        note = getattr(indices, "note", None)
        if (
            fast and not soft_margin and same_set and getattr(note, "kind", None) == "semi_hard_bands"
            and note.distance == distance  # type: ignore[union-attr]
            and note.matches(embeddings, labels, indices)  # type: ignore[union-attr]
        ):
            out = _semi_hard_band_loss(embeddings, indices, margin, distance, reduction)
            if out is not None:
                return out
        if fast:
            out = _triplets_blocked(
                embeddings, None if same_set else ref, indices, batch, ref_size, margin, distance, soft_margin, reduction
            )
            if isinstance(out, Tensor):
                return out
            a, p, n = out
        else:
            a, p, n = check_triplets(indices, batch, ref_size)
            a, p, n = a.to(embeddings.device), p.to(embeddings.device), n.to(embeddings.device)
        if a.numel() == 0:
            return zero_loss(embeddings, None if same_set else ref)
        if fast and distance != "cosine":
            want_grad = torch.is_grad_enabled() and (embeddings.requires_grad or (not same_set and ref.requires_grad))
            total, nonzero = _PairedTriplets.apply(
                embeddings, None if same_set else ref, a, p, n, margin, soft_margin,
                distance == "squared_euclidean", want_grad,
            )
            return reduce_terms(total, torch.tensor(a.numel(), device=embeddings.device), nonzero, reduction)
        anchors = embeddings[a]
        d_ap = paired_distance(anchors, ref[p], distance)
        d_an = paired_distance(anchors, ref[n], distance)
        return triplet_margin_loss_explicit(
            d_ap, d_an, margin=margin, soft_margin=soft_margin, reduction=reduction
        )
    pair_indices = (  # well-formed pairs; anything else keeps the mask path (and its errors)
        indices is not None and is_pairs(indices)
        and all(isinstance(t, Tensor) and t.dim() == 1 and not t.is_floating_point() for t in indices)
        and indices[0].numel() == indices[1].numel() and indices[2].numel() == indices[3].numel()
    )
    if fast and not soft_margin and (indices is None or pair_indices):
        return _all_triplets_blocked(
            embeddings, labels, None if same_set else ref, None if same_set else ref_lab, indices,
            margin, distance, reduction,
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
    ``a != p``, ``labels[a] != labels[n]``). They are never materialised: the distances are computed
    in blocks of a few anchor rows (never the whole ``(B, R)`` matrix), each anchor's row is compared
    once per positive with :math:`t_p = d_{ap} + m`, which gives the number :math:`k_p` of active
    negatives per positive and :math:`c_n` of active positives per negative, and
    :math:`\sum_{p,n} [t_p - d_{an}]_+ = \sum_p t_p k_p - \sum_n c_n d_{an}`; the gradient w.r.t. the
    distances is these exact counts, turned into the gradient w.r.t. the embeddings by two matmuls per
    block (O(B·R·P) time for P positives per anchor, O(block·R + B·D) memory).
    With mined triplets the loss is computed on exactly those (duplicates count), their distances
    read from the same blocks (from the gathered embeddings when there are few); triplets that
    :class:`~deepmetric.miners.SemiHardMiner` (``negatives="all"``) returned for these very
    embeddings are recomputed from the blocks instead of read. With mined pairs :math:`T` is every
    ``(a, p, n)`` with ``(a, p)`` a given positive and ``(a, n)`` a given negative pair.

    ``loss(embeddings, labels, miner=m)`` mines with ``m`` and returns the loss of what it picks, the
    same value as ``loss(embeddings, labels, m(embeddings.detach(), labels))``. For a
    :class:`~deepmetric.miners.SemiHardMiner` with ``negatives="all"`` (no cap, no fallback, same
    distance) the two steps are **fused**: the semi-hard bands are evaluated inside the loss's distance
    blocks and the triplets are never listed, so time and memory do not grow with their number
    (about 10⁹ at B = 4096 with 32 classes, 24 GB as index tensors). Likewise for a
    :class:`~deepmetric.miners.MultiSimilarityMiner` without a cap: its ε-rule is applied to the
    cosine similarities of each block of anchors (one more matmul per block) and the loss covers every
    ``(a, p, n)`` of a kept positive and a kept negative pair, no pair listed. A
    :class:`~deepmetric.miners.HardMiner` mines in the same call and the loss reads its one triplet
    per anchor without re-checking the indices. The trainer passes its miner this way
    (``fuses_miner``).

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
    fuses_miner: ClassVar[bool] = True  # forward(..., miner=m) mines itself

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
        *,
        miner: nn.Module | None = None,
    ) -> Tensor:
        """Loss over all valid triplets of the batch, over the tuples named by ``indices``, or over the
        triplets ``miner`` picks from this batch (``miner=``; fused for semi-hard "all", multi-similarity
        and batch-hard mining, see above)."""
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
            miner=miner,
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
