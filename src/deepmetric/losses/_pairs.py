"""Private helpers shared by the pair/tuple losses (contrastive, triplet, MS, quadruplet, lifted, N-pair).

Everything here works on dense ``(B, R)`` matrices and masks (memory O(B·R)); nothing builds a
``B×B×B`` tensor or a (positive pairs × negative pairs) matrix.

* :func:`resolve_masks` turns labels and/or mined ``indices`` into ``(B, R)`` positive/negative masks.
* :func:`row_hinge_sums` evaluates, for every entry ``(i, j)`` of a query matrix ``T``,
  ``Σ_{k ∈ N_i} [T_ij − V_ik]₊`` and the number of non-zero terms, from per-row sorted values,
  a cumulative sum and ``searchsorted`` — the identity
  ``Σ_{v_k < t} (t − v_k) = cnt·t − Σ_{v_k < t} v_k`` — in O(B·R log R) time and O(B·R) memory.
* :func:`grouped_hinge_sums` does the same when the summation set is a *group* of matrix entries
  (e.g. every negative pair whose row belongs to class ``c``), via one lexicographic sort.
* :func:`masked_log1p_sum_exp` / :func:`masked_logsumexp`: numerically stable masked reductions.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric.errors import ConfigError, DataError
from deepmetric.tuples import Indices, label_masks, pair_masks_from_indices

__all__ = [
    "resolve_masks",
    "self_free_pair_masks",
    "paired_distance",
    "distance_matrix",
    "check_distance",
    "check_reduction",
    "reduce_terms",
    "row_hinge_sums",
    "grouped_hinge_sums",
    "masked_logsumexp",
    "masked_log1p_sum_exp",
    "compact_rows",
    "check_triplets",
    "DISTANCE_NAMES",
    "FUSED_KINDS",
    "BLOCK_ELEMS",
    "PairKernel",
    "SparseGrad",
    "SPARSE_FRACTION",
    "FALLBACK",
    "fused_pair_loss",
    "has_positive_label_pair",
    "has_negative_label_pair",
    "label_positive_pairs",
    "resolve_pair_lists",
]

DISTANCE_NAMES = ("euclidean", "squared_euclidean", "cosine")
_EPS = 1e-12


def check_distance(distance: str, allowed: tuple[str, ...] = DISTANCE_NAMES) -> str:
    """Validate a distance name (ConfigError naming the valid ones)."""
    if distance not in allowed:
        raise ConfigError(f"unknown distance {distance!r}; valid: {', '.join(allowed)}")
    return distance


def check_reduction(reduction: str, allowed: tuple[str, ...]) -> str:
    """Validate a reduction name (ConfigError naming the valid ones)."""
    if reduction not in allowed:
        raise ConfigError(f"unknown reduction {reduction!r}; valid: {', '.join(allowed)}")
    return reduction


def distance_matrix(x: Tensor, y: Tensor, distance: str) -> Tensor:
    """``(B, R)`` distances (smaller = closer) under ``distance``; ``y is x`` uses the symmetric path."""
    from deepmetric import distances as dist

    fn: Callable[..., Tensor] = dist.get_distance(distance)
    return fn(x, None) if y is x else fn(x, y)


def paired_distance(x: Tensor, y: Tensor, distance: str) -> Tensor:
    """Row-wise distance ``d(x[i], y[i])`` (length B), computed from the difference (no expansion)."""
    if distance == "cosine":
        return 1.0 - F.cosine_similarity(x, y, dim=1, eps=1e-12)
    sq = (x - y).pow(2).sum(1)
    if distance == "squared_euclidean":
        return sq
    if distance == "euclidean":
        return sq.clamp_min(_EPS).sqrt()
    raise ConfigError(f"unknown distance {distance!r}; valid: {', '.join(DISTANCE_NAMES)}")


def _in_range(t: Tensor, size: int) -> bool:
    """``0 <= t < size`` everywhere (one pass over ``t``)."""
    if t.is_floating_point() or t.dtype == torch.bool:
        return int(t.min()) >= 0 and int(t.max()) < size
    lo, hi = torch.aminmax(t)
    return int(lo) >= 0 and int(hi) < size


def resolve_masks(
    labels: Tensor,
    ref_labels: Tensor | None,
    indices: Indices | None,
    batch_size: int,
    ref_size: int,
) -> tuple[Tensor, Tensor]:
    """``(B, R)`` boolean positive and negative masks.

    Without ``indices``: every label-positive pair (self-pairs excluded when ``ref_labels`` is
    ``None``) and every label-negative pair. With ``indices`` (pairs or triplets, see
    :mod:`deepmetric.tuples`): exactly the pairs they name (triplets are reduced to their unique pairs).
    """
    if indices is None:
        return label_masks(labels, ref_labels)
    pairs = _validated_pairs(indices, labels.device, batch_size, ref_size)
    pos, neg = pair_masks_from_indices(pairs, batch_size, ref_size)
    return pos, neg


def self_free_pair_masks(
    labels: Tensor, ref_labels: Tensor | None, indices: Indices | None, batch_size: int, ref_size: int
) -> tuple[Tensor, Tensor]:
    """Positive/negative ``(B, R)`` masks from labels or mined indices; never a self-pair."""
    if isinstance(indices, (tuple, list)) and len(indices) == 3:
        # Triplets name the pairs (a, p) and (a, n): given in the pair layout they set the same mask
        # entries without the O(T log T) de-duplication of ``triplets_to_pairs``.
        indices = (indices[0], indices[1], indices[0], indices[2])
    pos, neg = resolve_masks(labels, ref_labels, indices, batch_size, ref_size)
    if indices is not None and ref_labels is None:
        pos.fill_diagonal_(False)
        neg.fill_diagonal_(False)
    return pos, neg


def _validated_pairs(
    indices: Indices, device: torch.device, batch_size: int, ref_size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Check mined ``indices`` (types, ranges: :class:`DataError`) and return them as long pairs
    ``(a1, p, a2, n)`` on ``device`` (triplets ``(a, p, n)`` become ``(a, p, a, n)``)."""
    if not isinstance(indices, (tuple, list)) or len(indices) not in (3, 4):
        raise DataError("indices must be triplets (a, p, n) or pairs (a1, p, a2, n)")
    for t in indices:
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise DataError("every index tensor must be a 1-D long tensor")
    n_anchor = [indices[0]] + ([indices[2]] if len(indices) == 4 else [])
    n_ref = [indices[1]] + ([indices[3]] if len(indices) == 4 else [indices[2]])
    for t in n_anchor:
        if t.numel() and not _in_range(t, batch_size):
            raise DataError(f"anchor index out of range for a batch of {batch_size}")
    for t in n_ref:
        if t.numel() and not _in_range(t, ref_size):
            raise DataError(f"reference index out of range for a reference set of {ref_size}")
    idx = [t.to(device).long() for t in indices]
    if len(idx) == 3:
        return idx[0], idx[1], idx[0], idx[2]
    return idx[0], idx[1], idx[2], idx[3]


def resolve_pair_lists(
    labels: Tensor,
    indices: Indices,
    batch_size: int,
    ref_size: int,
) -> tuple[tuple[Tensor, Tensor, Tensor], Tensor]:
    """Mined ``indices`` as the positive pairs' index lists and the negative pairs' ``(B, R)`` mask.

    Same pairs (and the same checks and errors) as :func:`resolve_masks`, but the positive side —
    a few pairs per anchor — is returned like :func:`label_positive_pairs`: ``(rows, cols,
    row_ptr)``, unique pairs sorted by row then column (``pos_mask.nonzero()`` without the mask).
    """
    a1, p, a2, n = _validated_pairs(indices, labels.device, batch_size, ref_size)
    keys = torch.unique(a1 * ref_size + p)  # sorted
    rows, cols = keys // ref_size, keys % ref_size
    row_ptr = torch.zeros(batch_size + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(rows, minlength=batch_size).cpu(), 0, out=row_ptr[1:])
    neg = torch.zeros(batch_size, ref_size, dtype=torch.bool, device=labels.device)
    neg[a2, n] = True  # (2-D indices: no flat-index temporary of the size of the mined set)
    return (rows, cols, row_ptr), neg


def reduce_terms(total: Tensor, count_all: Tensor, count_nonzero: Tensor, reduction: str) -> Tensor:
    """Reduce a summed loss: ``"sum"``, ``"mean"`` (÷ all terms) or ``"mean_nonzero"`` (÷ non-zero terms).

    A zero denominator gives 0 (the sum is then 0 too) while keeping the graph.
    """
    if reduction == "sum":
        return total
    denom = count_all if reduction == "mean" else count_nonzero
    denom = denom.to(total.dtype).clamp_min(1.0)
    return total / denom


def row_hinge_sums(values: Tensor, mask: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """Per-entry hinge sums against the masked entries of the same row.

    For every ``(i, j)``: ``S_ij = Σ_{k: mask_ik} [T_ij − V_ik]₊`` and ``C_ij = #{k: mask_ik, V_ik < T_ij}``.
    Cost: one row-wise sort of ``V`` (``(B, M)``) and a batched ``searchsorted`` of the ``(B, Q)``
    queries, so put the *narrow* side in ``values``.

    Args:
        values: ``V``, shape ``(B, M)``.
        mask: boolean ``(B, M)``: which entries of each row enter the sum.
        thresholds: ``T``, shape ``(B, Q)`` (any number ``Q`` of queries per row).

    Returns:
        ``(S, C)``: ``S`` (dtype of ``values``; the cumulative sums are accumulated in float64 when
        rows are wide, to avoid cancellation in ``C·T − Σ V``), differentiable w.r.t. ``values``
        and ``thresholds``; ``C`` a long tensor.
    """
    inf = torch.tensor(float("inf"), dtype=values.dtype, device=values.device)
    masked = torch.where(mask, values, inf)
    sorted_vals, _ = masked.sort(dim=1)
    finite = torch.where(torch.isfinite(sorted_vals), sorted_vals, torch.zeros_like(sorted_vals))
    wide = values.shape[1] > 64
    acc = torch.float64 if wide else values.dtype
    csum = F.pad(torch.cumsum(finite.to(acc), dim=1), (1, 0))
    counts = torch.searchsorted(sorted_vals.detach(), thresholds.detach().to(values.dtype).contiguous())
    sums = counts.to(acc) * thresholds.to(acc) - csum.gather(1, counts)
    return sums.to(values.dtype), counts


def grouped_hinge_sums(
    values: Tensor,
    groups: Tensor,
    valid: Tensor,
    thresholds: Tensor,
    query_groups: Tensor,
) -> tuple[Tensor, Tensor]:
    """Hinge sums of each query against the valid values of one group.

    ``S_q = Σ_{e: valid_e, groups_e = g_q} [t_q − v_e]₊`` and the matching count of non-zero terms,
    from a single lexicographic (group, value) sort: O(E log E) time, O(E + Q) memory.

    Args:
        values: 1-D values ``v_e`` (flattened matrix entries).
        groups: 1-D non-negative integer group of each value.
        valid: 1-D boolean, which values take part.
        thresholds: 1-D queries ``t_q``.
        query_groups: 1-D group of each query.

    Returns:
        ``(S, C)`` as in :func:`row_hinge_sums` (``S`` float64).
    """
    v64 = values.double()
    vd = v64.detach()
    if not bool(valid.any()):
        zero = thresholds.double() * 0
        return zero, torch.zeros_like(thresholds, dtype=torch.long)
    lo = torch.where(valid, vd, torch.full_like(vd, float("inf"))).min()
    hi = torch.where(valid, vd, torch.full_like(vd, float("-inf"))).max()
    span = (hi - lo) + 1.0
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=values.device)
    keys = torch.where(valid, groups.double() * span + (vd - lo), inf)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    sorted_vals = torch.where(valid, v64, torch.zeros_like(v64))[order]
    csum = F.pad(torch.cumsum(sorted_vals, 0), (1, 0))
    t64 = thresholds.double()
    qx = (t64.detach() - lo).clamp(-0.5, None)
    qx = torch.minimum(qx, span - 0.5)
    base = query_groups.double() * span
    end = torch.searchsorted(sorted_keys, base + qx)
    start = torch.searchsorted(sorted_keys, base - 0.5)
    counts = end - start
    sums = counts.double() * t64 - (csum[end] - csum[start])
    return sums, counts


def masked_logsumexp(x: Tensor, mask: Tensor, dim: int = 1) -> tuple[Tensor, Tensor]:
    """``log Σ_{mask} exp(x)`` along ``dim`` and a boolean "any entry" flag.

    Rows with no masked entry return 0 (not ``-inf``) so gradients stay finite; use the flag.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=x.device)
    masked = torch.where(mask, x, neg_inf)
    any_entry = mask.any(dim=dim)
    peak = masked.amax(dim=dim, keepdim=True).detach()
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.exp(masked - peak).sum(dim=dim)  # exp(-inf) = 0: no inf·0 in the backward
    out = torch.log(torch.where(any_entry, total, torch.ones_like(total))) + peak.squeeze(dim)
    return torch.where(any_entry, out, torch.zeros_like(out)), any_entry


def masked_log1p_sum_exp(x: Tensor, mask: Tensor, dim: int = 1) -> Tensor:
    """``log(1 + Σ_{mask} exp(x))`` along ``dim`` (0 for rows with no masked entry), stable."""
    lse, any_entry = masked_logsumexp(x, mask, dim=dim)
    out = F.softplus(lse)
    return torch.where(any_entry, out, torch.zeros_like(out))


def compact_rows(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Column indices of each row's ``True`` entries, left-aligned and padded: ``(B, M)`` and validity.

    ``M`` is the largest row count (at least 1). O(B·R) time, no sort.
    """
    batch = mask.shape[0]
    counts = mask.sum(1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    rows, cols = mask.nonzero(as_tuple=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=mask.device) - starts[rows]
    idx = torch.zeros(batch, width, dtype=torch.long, device=mask.device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=mask.device)
    idx[rows, slot] = cols
    valid[rows, slot] = True
    return idx, valid


def check_triplets(triplets: Indices, batch_size: int, ref_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Validate explicit ``(a, p, n)`` index tensors (equal length, in range) and return them as long."""
    if len(triplets) != 3:
        raise DataError("triplets must be a tuple (a, p, n)")
    a, p, n = (torch.as_tensor(t).long().reshape(-1) for t in triplets)
    if not (a.numel() == p.numel() == n.numel()):
        raise DataError(f"triplet index tensors differ in length: {a.numel()}, {p.numel()}, {n.numel()}")
    if a.numel():
        if int(a.min()) < 0 or int(a.max()) >= batch_size:
            raise DataError(f"anchor index out of range for a batch of {batch_size}")
        if min(int(p.min()), int(n.min())) < 0 or max(int(p.max()), int(n.max())) >= ref_size:
            raise DataError(f"reference index out of range for a reference set of {ref_size}")
    return a, p, n


# ---------------------------------------------------------------------------------------------
# Fused pair-matrix losses: value and gradient in one pass over the (B, R) matrix.
# ---------------------------------------------------------------------------------------------
#: Matrix kinds understood by :func:`fused_pair_loss`: ``"dot"`` (``x yᵀ``; pass L2-normalised
#: inputs for cosine similarity), ``"cosine"`` (``1 − x yᵀ`` on L2-normalised inputs, i.e. the cosine
#: distance), ``"squared_euclidean"`` and ``"euclidean"`` (same values as :mod:`deepmetric.distances`).
FUSED_KINDS = ("dot", "cosine", "squared_euclidean", "euclidean")

#: Default number of matrix entries per row block: big enough that a block costs far more than an
#: op dispatch (few ops per call), small enough that its temporaries stay in the last-level cache.
BLOCK_ELEMS = 1 << 19


#: Returned by :meth:`PairKernel.block_squared` to have a block done the regular way.
FALLBACK = object()


class PairKernel(ABC):
    """A loss over a pair matrix ``M`` (``(B, R)``) that returns its own gradient ``∂L/∂M``.

    :func:`fused_pair_loss` computes ``M`` in row blocks (``M[r0:r1, c0:]``) and calls
    :meth:`block` on each; the kernel may overwrite the block (it owns it; for the euclidean kinds
    it must leave the distances intact, they are needed for the chain rule) and returns ``G`` =
    ``∂L/∂M`` on that block **divided by** the scale it reports from :meth:`finish` (or ``None``
    when it produces its gradients in :meth:`finish`, ``"dot"``/``"cosine"`` kinds only). The
    framework applies the chain rule of the matrix kind to ``G`` in place and keeps only that
    tensor for the backward pass.

    Attributes:
        need_grad: set by the framework before the first block (skip ``G`` when ``False``).
    """

    need_grad: bool = True

    def prepare(self, d2: Tensor, r0: int, r1: int, c0: int) -> None:
        """Hook on the raw squared distances of a block (euclidean kinds), before the clamp: a
        kernel may set entries that are not pairs to ``+inf`` (distance ``inf``: no term, zero
        gradient), which also keeps them out of the near-zero-distance check."""

    def extra_grad(self, x: Tensor) -> Tensor | None:
        """Optional, batch against itself only: a gradient term the kernel keeps in its own layout,
        added to ``∂/∂x`` in the backward pass before the scale (the convention of ``V``:
        ``Σ_j W_ij (x_i − x_j)`` for the euclidean kinds). Default: none."""
        return None

    def block_squared(self, d2: Tensor, r0: int, r1: int, c0: int) -> Tensor | SparseGrad | None | object:
        """Optional fast path of the ``"euclidean"`` kind, on the raw squared distances of a block
        (before the clamp and the square root, which it must not modify in place).

        A kernel whose active entries can be found on ``d²`` (a hinge ``[m − d]₊`` is active iff
        ``d² < m²``) takes square roots of those entries only. It returns :data:`FALLBACK` to have
        the block done the regular way (:meth:`prepare`, clamp, square root, :meth:`block`), or
        what :meth:`block` returns, except that a gradient is already the gradient w.r.t. ``d``
        **divided by** ``d`` and zero where ``d²`` was clamped (below ``1e-12``): the framework
        applies no further chain rule to it. The default always falls back.

        A kernel that overrides this method gets every block in one reused buffer, so neither this
        method nor :meth:`block` may return or keep the block tensor itself.
        """
        return FALLBACK

    @abstractmethod
    def block(self, m: Tensor, r0: int, r1: int, c0: int) -> Tensor | SparseGrad | None:
        """``G`` for one block (see the class docstring)."""

    @abstractmethod
    def finish(self) -> tuple[Tensor, float, list[Tensor] | None]:
        """``(value, scale, late_grads)``: the loss (0-dim), the gradient scale, and (optionally)
        the gradient blocks in the order :meth:`block` saw them."""


def _row_blocks(batch: int, width: int, upper: bool, target: int) -> list[tuple[int, int]]:
    """Row ranges of roughly ``target`` matrix entries each (``width`` columns per row; ``upper``:
    the block ``[r0, r1)`` spans columns ``r0..width``)."""
    if target <= 0 or batch * width <= target:
        return [(0, batch)]
    out: list[tuple[int, int]] = []
    r0 = 0
    while r0 < batch:
        cols = max(width - r0, 1) if upper else max(width, 1)
        rows = max(16, min(batch - r0, target // cols))
        if batch - (r0 + rows) < rows // 2:  # no thin last block
            rows = batch - r0
        out.append((r0, r0 + rows))
        r0 += rows
    return out


class SparseGrad(NamedTuple):
    """A gradient block given by its non-zero entries: block-local ``rows``, ``cols`` and ``values``
    (what :meth:`PairKernel.block` may return instead of a dense ``G`` when few entries are active,
    e.g. hinge losses; the backward then costs O(#entries · D) instead of two matmuls)."""

    rows: Tensor
    cols: Tensor
    values: Tensor


#: A kernel returns a :class:`SparseGrad` when at most this fraction of a block's entries is
#: non-zero (below it, gathers and index_add beat the two dense matmuls of the backward).
SPARSE_FRACTION = 1.0 / 128


_NORM_EPS = 1e-12  # F.normalize's default


def _normalize_backward(g: Tensor, xn: Tensor, denom: Tensor) -> Tensor:
    """Gradient through ``xn = x / max(‖x‖, eps)`` (in place on ``g``): ``(g − xn (g·xn)) / ‖x‖``,
    and ``g / eps`` for the rows whose norm was clamped."""
    dot = (g * xn).sum(1, keepdim=True)
    if float(denom.amin()) <= _NORM_EPS:
        dot.mul_(denom > _NORM_EPS)  # clamped rows: the denominator is a constant
    return g.addcmul_(xn, dot, value=-1.0).div_(denom)


class _FusedPairLoss(torch.autograd.Function):
    """See :func:`fused_pair_loss`. Saved for the backward: the operands, their norms (``normalize``)
    and the gradient blocks (dense ``V`` or :class:`SparseGrad` triples), nothing else."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        y: Tensor | None,
        kind: str,
        kernel: PairKernel,
        upper: bool,
        target: int,
        normalize: bool,
    ):
        same = y is None
        norms: list[Tensor] = []
        if normalize:  # F.normalize: x / max(‖x‖, eps)
            for t in (x,) if same else (x, y):
                norms.append(torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min_(_NORM_EPS))
            x = x / norms[0]
            y = None if same else y / norms[1]  # type: ignore[operator]
        yy = x if same else y
        assert yy is not None
        kernel.need_grad = bool(ctx.needs_input_grad[0] or (not same and ctx.needs_input_grad[1]))
        euclid = kind in ("squared_euclidean", "euclidean")
        squared = kind == "squared_euclidean"
        thr = 0.0 if squared else _EPS
        x2 = y2 = None
        if euclid:
            x2 = (x * x).sum(1, keepdim=True)
            y2 = x2.T if same else (yy * yy).sum(1).unsqueeze(0)
        one = torch.ones((), dtype=x.dtype, device=x.device)
        upper = upper and same
        dense: list[tuple[int, int, int, Tensor]] = []
        sparse: list[tuple[Tensor, Tensor, Tensor]] = []
        pending: list[tuple[int, int, int]] = []
        blocks = _row_blocks(x.shape[0], yy.shape[0], upper, target)
        # a kernel with the squared-distance path keeps no block: one buffer serves them all
        scratch = None
        if kind == "euclidean" and type(kernel).block_squared is not PairKernel.block_squared:
            cells = max((r1 - r0) * (yy.shape[0] - (r0 if upper else 0)) for r0, r1 in blocks)
            scratch = torch.empty(cells, dtype=x.dtype, device=x.device)
        for r0, r1 in blocks:
            c0 = r0 if upper else 0
            fails = None
            if kind == "dot":
                m = x[r0:r1] @ yy[c0:].T
            elif kind == "cosine":
                m = torch.addmm(one, x[r0:r1], yy[c0:].T, beta=1.0, alpha=-1.0)
            else:
                assert x2 is not None and y2 is not None
                if scratch is not None:
                    out = scratch[: (r1 - r0) * (yy.shape[0] - c0)].view(r1 - r0, yy.shape[0] - c0)
                    m = torch.addmm(x2[r0:r1], x[r0:r1], yy[c0:].T, beta=1.0, alpha=-2.0, out=out)
                else:
                    m = torch.addmm(x2[r0:r1], x[r0:r1], yy[c0:].T, beta=1.0, alpha=-2.0)
                m.add_(y2[:, c0:])
                if not squared:
                    g = kernel.block_squared(m, r0, r1, c0)
                    if g is not FALLBACK:  # its gradient needs no chain rule any more
                        if g is None or not kernel.need_grad:
                            pending.append((r0, r1, c0))
                        elif isinstance(g, SparseGrad):
                            sparse.append((g.rows + r0, g.cols + c0, g.values))
                        else:
                            assert isinstance(g, Tensor)
                            dense.append((r0, r1, c0, g))
                        del m, g
                        continue
                kernel.prepare(m, r0, r1, c0)
                if kernel.need_grad and float(m.amin()) < thr:
                    fails = m < thr  # clamped entries: zero gradient
                if squared:
                    m.clamp_min_(0.0)
                else:
                    m.clamp_min_(_EPS).sqrt_()
            g = kernel.block(m, r0, r1, c0)
            if g is None or not kernel.need_grad:
                pending.append((r0, r1, c0))
            elif isinstance(g, SparseGrad):
                vals = g.values
                if kind == "euclidean":
                    vals = vals / m[g.rows, g.cols]
                if fails is not None:
                    vals = vals.masked_fill(fails[g.rows, g.cols], 0.0)
                sparse.append((g.rows + r0, g.cols + c0, vals))
            else:
                if kind == "euclidean":
                    g.div_(m)  # ∂d/∂(d²) = 1 / (2d); the 2 cancels against ∂(d²)/∂x = 2(x − y)
                if fails is not None:
                    g.masked_fill_(fails, 0.0)
                dense.append((r0, r1, c0, g))
            del m, fails, g
        value, scale, late = kernel.finish()
        if late is not None and kernel.need_grad:
            if euclid:
                raise RuntimeError("late gradient blocks need a dot/cosine matrix")
            dense.extend((r0, r1, c0, g) for (r0, r1, c0), g in zip(pending, late))
        if kind == "cosine":
            scale = -scale
        elif squared:
            scale = 2.0 * scale
        ctx.kind, ctx.same, ctx.scale = kind, same, float(scale)
        # kept for the backward only by a kernel with an extra gradient term (others are freed here)
        has_extra = type(kernel).extra_grad is not PairKernel.extra_grad
        ctx.kernel = kernel if same and kernel.need_grad and has_extra else None
        ctx.coords = [(r0, r1, c0) for r0, r1, c0, _ in dense]
        ctx.n_sparse = len(sparse)
        ctx.normalize = normalize
        # Intermediate tensors through save_for_backward: freed after a backward without retain_graph.
        ctx.save_for_backward(
            x, y, *norms, *(g for _, _, _, g in dense), *(t for trip in sparse for t in trip)
        )
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, y, *saved = ctx.saved_tensors
        same = ctx.same
        n_norms = (1 if same else 2) if ctx.normalize else 0
        norms, saved = saved[:n_norms], saved[n_norms:]
        vs, flat = saved[: len(ctx.coords)], saved[len(ctx.coords) :]
        yy = x if same else y
        euclid = ctx.kind in ("squared_euclidean", "euclidean")
        need_x = ctx.needs_input_grad[0]
        need_y = (not same) and ctx.needs_input_grad[1]
        rows_side = need_x or same
        cols_side = need_y or same
        gx = torch.zeros_like(x) if rows_side else None
        gy = (gx if same else torch.zeros_like(yy)) if cols_side else None
        # ∂/∂x_i Σ_j V_ij M_ij: dot: V y; euclidean (V already divided by d): rowsum(V) x − V y.
        whole = same and len(vs) == 1 and ctx.coords[0] == (0, x.shape[0], 0)
        if whole:  # one block holding all of V (batch against itself): (V + Vᵀ) x in one matmul
            v = vs[0]
            w = v + v.T
            torch.mm(w, x, out=gx)
            if euclid:
                gx.neg_().addcmul_(x, w.sum(1, keepdim=True))
            vs = ()
        for (r0, r1, c0), v in zip(ctx.coords, vs):
            if gx is not None:
                gx[r0:r1].addmm_(v, yy[c0:], alpha=-1.0 if euclid else 1.0)
                if euclid:
                    gx[r0:r1].addcmul_(x[r0:r1], v.sum(1, keepdim=True))
            if gy is not None:
                gy[c0:].addmm_(v.T, x[r0:r1], alpha=-1.0 if euclid else 1.0)
                if euclid:
                    gy[c0:].addcmul_(yy[c0:], v.sum(0).unsqueeze(1))
        for k in range(ctx.n_sparse):
            rows, cols, vals = flat[3 * k : 3 * k + 3]
            w = vals.unsqueeze(1)
            # index_select: about twice as fast as advanced indexing (x[rows]) on CPU
            if euclid:
                diff = (x.index_select(0, rows) - yy.index_select(0, cols)).mul_(w)
                if gx is not None:
                    gx.index_add_(0, rows, diff)
                if gy is not None:
                    gy.index_add_(0, cols, diff, alpha=-1.0)
            else:
                if gx is not None:
                    gx.index_add_(0, rows, yy.index_select(0, cols).mul_(w))
                if gy is not None:
                    gy.index_add_(0, cols, x.index_select(0, rows).mul_(w))
        factor = grad_out * ctx.scale
        if same:
            assert gx is not None
            extra = ctx.kernel.extra_grad(x) if ctx.kernel is not None else None
            if extra is not None:
                gx.add_(extra)
            gx.mul_(factor)
            if ctx.normalize:
                gx = _normalize_backward(gx, x, norms[0])
            return gx, None, None, None, None, None, None
        if need_x and gx is not None:
            gx.mul_(factor)
            if ctx.normalize:
                gx = _normalize_backward(gx, x, norms[0])
        if need_y and gy is not None:
            gy.mul_(factor)
            if ctx.normalize:
                gy = _normalize_backward(gy, yy, norms[1])
        return (gx if need_x else None), (gy if need_y else None), None, None, None, None, None


def fused_pair_loss(
    x: Tensor,
    y: Tensor | None,
    kind: str,
    kernel: PairKernel,
    *,
    upper: bool = False,
    block_elems: int = BLOCK_ELEMS,
    normalize: bool = False,
) -> Tensor:
    """Evaluate ``kernel`` on the pair matrix of ``x`` (``(B, D)``) against ``y`` (``(R, D)``; ``None``
    = ``x`` itself) with a hand-written backward.

    Forward: the matrix of ``kind`` (see :data:`FUSED_KINDS`) is built in row blocks of about
    ``block_elems`` entries (0: one block) — with ``upper`` (batch against itself only) each block
    ``[r0, r1)`` covers columns ``r0..B`` only, i.e. the upper triangle and the diagonal block — and
    handed to the kernel, which returns the loss and ``∂L/∂M`` blockwise. Only that gradient is kept;
    the backward is one in-place ``addmm`` per block and side (``V y`` and ``Vᵀ x``), plus the
    row/column sums of ``V`` for the euclidean kinds. Euclidean gradients are 0 where the squared
    distance was clamped (below 0, resp. below ``1e-12`` for ``"euclidean"``), as in
    :mod:`deepmetric.distances`.

    ``normalize``: L2-normalise ``x``/``y`` first (as :func:`torch.nn.functional.normalize`, with
    its backward fused in) — for cosine similarities (``"dot"``) and cosine distances (``"cosine"``).
    """
    if kind not in FUSED_KINDS:
        raise ConfigError(f"unknown matrix kind {kind!r}; valid: {', '.join(FUSED_KINDS)}")
    return _FusedPairLoss.apply(x, y, kind, kernel, bool(upper), int(block_elems), bool(normalize))


def has_positive_label_pair(labels: Tensor, ref_labels: Tensor | None = None) -> bool:
    """Whether some label pair is positive (two batch elements of one class, or a batch element and
    a reference of one class) — ``label_masks(...)[0].any()`` in O(B log B), no ``(B, R)`` mask."""
    if ref_labels is None:
        if labels.numel() < 2:
            return False
        s = labels.sort().values
        return bool((s[1:] == s[:-1]).any())
    return bool(torch.isin(labels, ref_labels).any())


def has_negative_label_pair(labels: Tensor, ref_labels: Tensor | None = None) -> bool:
    """Whether some label pair is negative (two different classes), without a ``(B, R)`` mask."""
    ref = labels if ref_labels is None else ref_labels
    if labels.numel() == 0 or ref.numel() == 0:
        return False
    lo = torch.minimum(labels.min(), ref.min())
    hi = torch.maximum(labels.max(), ref.max())
    return bool(lo != hi)


def label_positive_pairs(
    labels: Tensor,
    ref_labels: Tensor | None = None,
    *,
    upper: bool = False,
    max_pairs: int | None = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The positive pairs of :func:`~deepmetric.tuples.label_masks` as index lists, without a mask.

    Returns ``(rows, cols, row_ptr)``: ``(rows[k], cols[k])`` for every ``(i, j)`` with
    ``labels[i] == ref[j]`` (``ref = labels`` and ``i ≠ j`` when ``ref_labels`` is ``None``; with
    ``upper``, ``j > i`` only), sorted by row then column, and ``row_ptr`` (length ``B + 1``, a CPU
    long tensor) with row ``i``'s pairs at ``row_ptr[i]:row_ptr[i + 1]``. O(B log B + #pairs): the
    classes are contiguous runs of the stably sorted labels. ``None`` if there are more than
    ``max_pairs`` pairs (dense masks are then the better representation).
    """
    same = ref_labels is None
    ref = labels if same else ref_labels
    device = labels.device
    order = torch.argsort(ref, stable=True)
    sorted_ref = ref[order]
    start = torch.searchsorted(sorted_ref, labels)
    end = torch.searchsorted(sorted_ref, labels, right=True)
    if same:
        # position of i itself in the sorted order; its class members after it have larger indices
        where = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=device))
        first = where + 1 if upper else start
        counts = end - first if upper else end - start - 1
    else:
        first, counts = start, end - start
    ends = torch.cumsum(counts, 0)
    total = int(ends[-1]) if ends.numel() else 0
    if max_pairs is not None and total > max_pairs:
        return None
    rows = torch.repeat_interleave(counts, output_size=total)
    offsets = torch.arange(total, device=device) - (ends - counts)[rows]
    if same and not upper:
        offsets += offsets >= (where - start)[rows]  # skip i itself
    cols = order[first[rows] + offsets]
    row_ptr = torch.zeros(labels.numel() + 1, dtype=torch.long)
    row_ptr[1:] = ends.cpu()
    return rows, cols, row_ptr


