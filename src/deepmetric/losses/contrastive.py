"""Contrastive loss (Hadsell, Chopra & LeCun) over all pairs of a batch, mined pairs or explicit pairs."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.errors import DataError, NonFiniteError
from deepmetric.losses._pairs import (
    _EPS,
    BLOCK_ELEMS,
    FALLBACK,
    SPARSE_FRACTION,
    PairKernel,
    SparseGrad,
    check_distance,
    check_reduction,
    fused_pair_loss,
    label_positive_pairs,
    paired_distance,
    reduce_terms,
    resolve_masks,
)
from deepmetric.losses._native_rows import finalize, int32_labels, pair_rows_lib, upper_gram
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


#: Entries per row block of the fused kernel (see :data:`deepmetric.losses._pairs.BLOCK_ELEMS`).
_BLOCK = BLOCK_ELEMS

#: Squared-distance fast path (sparse gradient): taken when at most this fraction of a block's entries
#: are near negatives and positive pairs (the lower triangle's positives counted too).
_SPARSE_BOUND = SPARSE_FRACTION

def _class_layout(labels: Tensor) -> tuple[Tensor, Tensor, int, int] | None:
    """``(class, slot, C, K)``: each sample's compact class and its rank within the class (stable
    order), the number of classes and the largest class; ``None`` when ``C·K²`` would exceed ``B²/2``
    entries (very uneven classes: the per-class blocks would outgrow a distance matrix)."""
    _, cls, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    classes, width = int(counts.numel()), int(counts.max())
    batch = labels.shape[0]
    if classes * width * width > batch * batch // 2:
        return None
    order = torch.argsort(cls, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(cls)
    slot[order] = torch.arange(batch, device=labels.device) - starts[cls[order]]
    return cls, slot, classes, width


#: Positive pairs go in index lists up to this fraction of all pairs (dense masks beyond).
_PAIR_LIST_FRACTION = 1 / 8


class _ContrastiveKernel(PairKernel):
    """Contrastive terms and their gradient w.r.t. the distance matrix, block by block.

    Label pairs (``pairs``, the positive pairs as index lists from :func:`label_positive_pairs`):
    every entry is first treated as a negative pair — ``h = [m − d]₊``, gradient ``−q·h^{q−1}`` —
    and the positive pairs are then overwritten with ``[d − m_pos]₊`` and its gradient. Entries that
    are not pairs (self-pairs; with ``upper`` the lower triangle, each visited unordered pair
    standing for both orders) get distance ``+inf``: no term, zero gradient. Stored gradients are
    those of negative pairs up to the sign and factor that go into the scale.

    Explicit boolean masks ``pos``/``neg`` (mined pairs; positive wins where both are set): a sign
    matrix ``s`` (+1 / −1 / 0) and ``h = [s·d + o]₊`` with offset ``o`` (−m_pos / m).

    The hinge is zero for most pairs once the classes are apart: a block with at most
    :data:`SPARSE_FRACTION` active entries returns them as a :class:`SparseGrad`.
    """

    def __init__(
        self,
        *,
        margin: float,
        pos_margin: float,
        squared: bool,
        reduction: str,
        kind: str,
        pairs: tuple[Tensor, Tensor, Tensor] | None = None,
        batch: int = 0,
        width: int = 0,
        same: bool = False,
        upper: bool = False,
        pos: Tensor | None = None,
        neg: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> None:
        self.margin, self.pos_margin, self.squared, self.reduction = margin, pos_margin, squared, reduction
        self.kind = kind
        self.pairs, self.batch, self.width, self.same, self.upper = pairs, batch, width, same, upper
        self.pos, self.neg = pos, neg
        self.total = 0.0
        self.nonzero = 0
        self.dtype: torch.dtype | None = None
        self.tri: dict[int, Tensor] = {}
        # class layout for the positive pairs' gradient (batch against itself, label pairs), built
        # by the first block that takes the squared-distance path
        self.labels = labels if same and upper else None
        self.layout: tuple[Tensor, Tensor, int, int] | None = None
        self.weights: Tensor | None = None  # (C, K, K) symmetric: the positive pairs' V entries
        self._near: Tensor | None = None  # block_squared's mask buffer

    # -- label pairs -------------------------------------------------------------------------
    def _not_pairs(self, m: Tensor, r0: int, r1: int, c0: int) -> None:
        """Distance +inf on the entries that are not pairs (self-pairs, lower triangle)."""
        if not self.same:
            return
        nb = r1 - r0
        if self.upper:
            m[:, :nb].masked_fill_(self._tril(nb, m.device), float("inf"))
        else:
            m[:, r0 - c0 : r1 - c0].fill_diagonal_(float("inf"))

    def prepare(self, d2: Tensor, r0: int, r1: int, c0: int) -> None:
        if self.pairs is not None:
            self._not_pairs(d2, r0, r1, c0)

    def _block_labels(self, m: Tensor, r0: int, r1: int, c0: int) -> Tensor | SparseGrad | None:
        assert self.pairs is not None
        if self.kind not in ("euclidean", "squared_euclidean"):
            self._not_pairs(m, r0, r1, c0)  # (euclidean kinds: done on d² by prepare)
        rows, cols, ptr = self.pairs
        lo, hi = int(ptr[r0]), int(ptr[r1])
        pr, pc = rows[lo:hi] - r0, cols[lo:hi] - c0  # (upper: the list holds j > i only)
        hinge_p = (m[pr, pc] - self.pos_margin).relu_()
        hinge = torch.rsub(m, self.margin).relu_()  # every entry as a negative pair
        hinge[pr, pc] = 0.0
        active = self._accumulate(hinge, hinge_p)
        if not self.need_grad:
            return None
        # stored: ∂/∂d of −h^q / q (negatives); the scale carries −q
        grad_p = -hinge_p if self.squared else -hinge_p.sign_()
        if active + pr.numel() <= SPARSE_FRACTION * hinge.numel():
            rows, cols = hinge.nonzero(as_tuple=True)
            vals = hinge[rows, cols] if self.squared else torch.ones(rows.numel(), dtype=m.dtype, device=m.device)
            return SparseGrad(torch.cat([rows, pr]), torch.cat([cols, pc]), torch.cat([vals, grad_p]))
        grad = hinge if self.squared else hinge.sign_()
        grad[pr, pc] = grad_p
        return grad

    def block_squared(self, d2: Tensor, r0: int, r1: int, c0: int) -> Tensor | SparseGrad | None | object:
        """Label pairs, ``"euclidean"``: a negative pair has a term iff ``d² < m²``, so the square
        roots (and everything after) are taken on the positive pairs and those near negatives only.

        The near negatives' gradient is sparse. The positive pairs' gradient goes, for a batch
        against itself, into per-class ``(K, K)`` weight blocks (one batched matmul in the backward,
        however large the classes), otherwise into the sparse list. Falls back to the dense path
        when there are too many near negatives (or, without the class blocks, positive pairs)."""
        if self.pairs is None:
            return FALLBACK
        rows, cols, ptr = self.pairs
        lo, hi = int(ptr[r0]), int(ptr[r1])
        if self.labels is not None:
            self.layout, self.labels = _class_layout(self.labels), None
        blocked = self.layout is not None
        if not blocked and hi - lo > _SPARSE_BOUND * d2.numel():
            return FALLBACK  # large classes: too many positive pairs alone
        pr, pc = rows[lo:hi] - r0, cols[lo:hi] - c0
        # a slightly loose bound (rounding of m² and of the square root): extra entries get h = 0
        bound = (self.margin * (1.0 + 1e-5)) ** 2 if self.margin > 0.0 else -1.0
        width = d2.shape[1]
        flat_p = torch.add(pc, pr, alpha=width)  # flat cells: index_select/index_fill beat 2-D indexing
        if self._near is None or self._near.numel() < d2.numel():
            self._near = torch.empty(d2.numel(), dtype=torch.bool, device=d2.device)  # reused by every block
        near = torch.lt(d2, bound, out=self._near[: d2.numel()].view(d2.shape))
        # near: near negatives, plus positives, self-pairs and (upper) the lower triangle
        near.view(-1).index_fill_(0, flat_p, False)
        if self.upper:  # (the batch against itself) not pairs: the diagonal block's lower triangle
            near[:, : r1 - r0].masked_fill_(self._tril(r1 - r0, d2.device), False)
        found = int(torch.count_nonzero(near))
        if found + (0 if blocked else pr.numel()) > _SPARSE_BOUND * near.numel():
            return FALLBACK  # many active pairs: the dense path (one matmul in the backward) is faster
        flat_n = near.view(-1).nonzero().squeeze(1)
        del near
        nr, nc = torch.div(flat_n, width, rounding_mode="floor"), torch.remainder(flat_n, width)
        self.dtype = d2.dtype
        sq = d2.view(-1).index_select(0, torch.cat([flat_n, flat_p]))
        dist = sq.clamp_min(_EPS).sqrt_()
        k = nr.numel()
        hinge = torch.rsub(dist[:k], self.margin).relu_()
        hinge_p = (dist[k:] - self.pos_margin).relu_()
        self._accumulate(hinge, hinge_p)
        if not self.need_grad:
            return None
        # the label path's sign convention (negatives +h^{q-1}, positives −h^{q-1}), then / d
        if self.squared:
            vals = torch.cat([hinge, hinge_p.neg_()])
        else:
            vals = torch.cat([hinge.sign_(), hinge_p.sign_().neg_()])
        vals.div_(dist).masked_fill_(sq < _EPS, 0.0)  # a clamped distance passes no gradient
        if not blocked:
            return SparseGrad(torch.cat([nr, pr]), torch.cat([nc, pc]), vals)
        self._add_positive_weights(pr + r0, pc + c0, vals[k:])
        return SparseGrad(nr, nc, vals[:k])

    def _tril(self, nb: int, device: torch.device) -> Tensor:
        tri = self.tri.get(nb)
        if tri is None:
            tri = self.tri[nb] = torch.ones(nb, nb, dtype=torch.bool, device=device).tril_()
        return tri

    def _add_positive_weights(self, i: Tensor, j: Tensor, vals: Tensor) -> None:
        """Store the ``V`` entries of positive pairs ``(i, j)`` (global, ``i < j``) in both orders."""
        assert self.layout is not None
        cls, slot, classes, width = self.layout
        if self.weights is None:
            self.weights = vals.new_zeros(classes, width, width)
        c, si, sj = cls.index_select(0, i), slot.index_select(0, i), slot.index_select(0, j)
        base = c.mul_(width)
        flat = self.weights.view(-1)
        flat.index_copy_(0, (base + si).mul_(width).add_(sj), vals)  # (c, si, sj); pairs are distinct
        flat.index_copy_(0, (base + sj).mul_(width).add_(si), vals)  # (c, sj, si)

    def extra_grad(self, x: Tensor) -> Tensor | None:
        """``Σ_{j ∈ P(i)} W_ij (x_i − x_j)`` per class: ``rowsum(W_c) X_c − W_c X_c``, one ``bmm``."""
        if self.weights is None or self.layout is None:
            return None
        cls, slot, classes, width = self.layout
        w = self.weights.to(x.dtype)
        xc = x.new_zeros(classes, width, x.shape[1])
        xc[cls, slot] = x
        g = torch.baddbmm(xc * w.sum(2, keepdim=True), w, xc, alpha=-1.0)
        return g[cls, slot]

    def _accumulate(self, hinge: Tensor, hinge_p: Tensor | None = None) -> int:
        """Add the terms ``h^q`` (and the non-zero count); return the number of non-zero ``h``."""
        active = int(torch.count_nonzero(hinge))
        if self.squared:
            terms = hinge * hinge
            self.total += float(terms.sum())
            if self.reduction == "mean_nonzero":
                self.nonzero += int(torch.count_nonzero(terms))
        else:
            self.total += float(hinge.sum())
            self.nonzero += active
        if hinge_p is not None:
            terms_p = hinge_p * hinge_p if self.squared else hinge_p
            self.total += float(terms_p.sum())
            self.nonzero += int(torch.count_nonzero(terms_p))
        return active

    # -- explicit masks ----------------------------------------------------------------------
    def _block_masks(self, m: Tensor, r0: int, r1: int, c0: int) -> Tensor | SparseGrad | None:
        assert self.pos is not None and self.neg is not None
        one = torch.ones((), dtype=m.dtype, device=m.device)
        p, n = self.pos[r0:r1, c0:], self.neg[r0:r1, c0:]
        sgn = n.to(m.dtype).neg_().masked_fill_(p, 1.0)
        hinge = torch.where(p, -self.pos_margin * one, self.margin * one)
        hinge.addcmul_(sgn, m).relu_().mul_(sgn).abs_()  # 0 off the pairs (sgn = 0)
        active = self._accumulate(hinge)
        if not self.need_grad:
            return None
        # stored with the sign convention of the label path: −s·h^{q−1}
        if active <= SPARSE_FRACTION * hinge.numel():
            rows, cols = hinge.nonzero(as_tuple=True)
            vals = sgn[rows, cols].neg_()
            if self.squared:
                vals.mul_(hinge[rows, cols])
            return SparseGrad(rows, cols, vals)
        if self.squared:
            return sgn.mul_(hinge).neg_()
        return sgn.mul_(hinge.sign_()).neg_()

    def block(self, m: Tensor, r0: int, r1: int, c0: int) -> Tensor | SparseGrad | None:
        self.dtype = m.dtype
        if self.pairs is not None:
            return self._block_labels(m, r0, r1, c0)
        return self._block_masks(m, r0, r1, c0)

    def count_all(self) -> int:
        if self.pairs is not None:
            return self.batch * (self.batch - 1) if self.same else self.batch * self.width
        assert self.pos is not None and self.neg is not None
        return int((self.pos | self.neg).sum())

    def finish(self) -> tuple[Tensor, float, list[Tensor] | None]:
        self._near = None  # the mask buffer is not needed by the backward
        mult = 2 if self.upper else 1  # each visited unordered pair stands for both orders
        total = self.total * mult
        if self.reduction == "sum":
            denom = 1.0
        elif self.reduction == "mean":
            denom = float(max(self.count_all(), 1))
        else:
            denom = float(max(self.nonzero * mult, 1))
        value = torch.tensor(total / denom, dtype=self.dtype)
        return value, -mult * (2.0 if self.squared else 1.0) / denom, None


#: The native path lists the pairs with a gradient while there are at most this fraction of all
#: pairs, and then its backward works from the list (no mirrored matrix, no matrix product).
_NATIVE_SPARSE = 1 / 32


class _NativeContrastive(torch.autograd.Function):
    """All label pairs of a batch against itself in C, euclidean or squared euclidean:
    ``dm_contrastive_rows`` computes the distances, the terms and ``c_ij = (∂term/∂d)/d`` over the
    upper triangle of ``X Xᵀ`` in place (each unordered pair standing for both orders). Backward:
    ``∂L/∂x_i = Σ_j 2c_ij (x_i − x_j) / denominator``, from the list of the few non-zero ``c_ij``
    the kernel wrote (``dm_pair_list_grad``; with the default ``d²`` positive term, whose ``c_ij`` is 2
    for every positive pair, the positives come from class sums instead of list entries) or, when
    many are non-zero, as one GEMM ``W X`` with ``W`` the mirrored
    matrix and ``W_ii = −Σ_j W_ij`` (``dm_pair_finalize``). A batch without positive pairs gives 0 and
    a zero gradient, as the blocked path."""

    @staticmethod
    def forward(ctx, x: Tensor, lab: Tensor, lib, margin: float, pos_margin: float, squared: bool, kind: str,  # type: ignore[override]
                reduction: str) -> Tensor:
        xd = x.detach().contiguous()
        batch = xd.shape[0]
        gram = upper_gram(xd)  # the kernel reads the upper triangle only
        sq = gram.diagonal().clone()
        stats = torch.zeros(4, dtype=torch.float64)
        need = bool(ctx.needs_input_grad[0])
        cap = int(_NATIVE_SPARSE * batch * (batch - 1) / 2) if need else 0
        li, lj = torch.empty(cap, dtype=torch.int32), torch.empty(cap, dtype=torch.int32)
        lc = torch.empty(cap)
        # the defaults' positive pairs (d² with no margin) all have c_ij = 2: class sums, not list entries
        pos_sum = need and kind == "euclidean" and squared and pos_margin == 0.0
        lib.dm_contrastive_rows(
            gram.data_ptr(), batch, gram.stride(0), sq.data_ptr(), lab.data_ptr(), margin, pos_margin,
            int(squared), 0 if kind == "euclidean" else 1, li.data_ptr(), lj.data_ptr(), lc.data_ptr() if need else None,
            cap, int(pos_sum), stats.data_ptr(),
        )
        total, nonzero, positives, grads = (float(v) for v in stats)
        if reduction == "sum":
            denom = 1.0
        elif reduction == "mean":
            denom = float(max(batch * (batch - 1), 1))
        else:
            denom = max(nonzero, 1.0)
        ctx.scale = 0.0 if positives == 0 else 1.0 / denom
        ctx.lib, ctx.count = lib, int(grads)
        if not (need and ctx.scale and (grads or pos_sum)):
            ctx.save_for_backward(xd, None, None, None, None, None)
        elif grads <= cap:  # the list holds every pair with a gradient (with pos_sum: but the positives)
            ctx.save_for_backward(xd, None, li[: ctx.count], lj[: ctx.count], lc[: ctx.count], lab if pos_sum else None)
        else:
            ctx.save_for_backward(xd, finalize(lib, gram, lab, None, None, None, upper=True, diag_rows=True),
                                  None, None, None, None)
        return torch.tensor(total * ctx.scale, dtype=x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        xd, weights, li, lj, lc, pos_lab = ctx.saved_tensors
        scale = float(grad_out) * ctx.scale
        if weights is not None:
            gx = torch.mm(weights, xd).mul_(-scale)
        elif lc is not None:
            gx = torch.empty_like(xd)
            status = ctx.lib.dm_pair_list_grad(li.data_ptr(), lj.data_ptr(), lc.data_ptr(), ctx.count,
                                               xd.data_ptr(), xd.shape[0], xd.shape[1], gx.data_ptr(), scale,
                                               None if pos_lab is None else pos_lab.data_ptr(), 2.0)
            if status != 0:
                raise MemoryError("contrastive backward: could not allocate the kernel's row scratch")
        else:
            gx = torch.zeros_like(xd)
        return gx, None, None, None, None, None, None, None


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
    """Functional form of :class:`ContrastiveLoss` (same arguments).

    One fused pass over the distance matrix (row blocks; the upper triangle only for a batch
    against itself) computes the loss and ``∂L/∂D``; the backward is a matmul per block. A batch
    against itself with label pairs on CPU float32 (euclidean kinds) takes the same formulas in a C
    kernel (:class:`_NativeContrastive`, :mod:`deepmetric.losses._native_rows`).
    """
    check_distance(distance)
    check_reduction(reduction, _REDUCTIONS)
    same_set = ref_embeddings is None
    ref, ref_lab = check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    batch, ref_size = embeddings.shape[0], ref.shape[0]
    lib = (
        pair_rows_lib(embeddings) if same_set and indices is None and distance != "cosine" else None
    )
    if lib is not None:
        return _NativeContrastive.apply(
            embeddings, int32_labels(labels), lib, float(margin), float(pos_margin), bool(squared), distance, reduction
        )
    common = dict(
        margin=float(margin), pos_margin=float(pos_margin), squared=bool(squared), reduction=reduction, kind=distance
    )
    pairs = None
    if indices is None:
        # positive pairs as index lists (upper triangle only for a batch against itself)
        limit = int(_PAIR_LIST_FRACTION * batch * ref_size / (2 if same_set else 1))
        pairs = label_positive_pairs(labels, None if same_set else ref_lab, upper=same_set, max_pairs=limit)
        if pairs is not None and pairs[0].numel() == 0:
            return zero_loss(embeddings, None if same_set else ref)
    if pairs is not None:
        kernel = _ContrastiveKernel(
            pairs=pairs, batch=batch, width=ref_size, same=same_set, upper=same_set,
            labels=labels if same_set and distance == "euclidean" else None, **common,  # type: ignore[arg-type]
        )
    else:
        pos, neg = resolve_masks(labels, None if same_set else ref_lab, indices, batch, ref_size)
        if not bool(pos.any()):
            return zero_loss(embeddings, None if same_set else ref)
        kernel = _ContrastiveKernel(pos=pos, neg=neg, **common)  # type: ignore[arg-type]
    y = None if same_set else ref
    return fused_pair_loss(
        embeddings, y, distance, kernel, upper=kernel.upper, block_elems=_BLOCK, normalize=distance == "cosine"
    )


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
