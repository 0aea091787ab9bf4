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

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from deepmetric.errors import ConfigError, DataError
from deepmetric.tuples import Indices, label_masks, pair_masks_from_indices

__all__ = [
    "resolve_masks",
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
    if not isinstance(indices, (tuple, list)) or len(indices) not in (3, 4):
        raise DataError("indices must be triplets (a, p, n) or pairs (a1, p, a2, n)")
    for t in indices:
        if not isinstance(t, Tensor) or t.dim() != 1:
            raise DataError("every index tensor must be a 1-D long tensor")
    n_anchor = [indices[0]] + ([indices[2]] if len(indices) == 4 else [indices[0]])
    n_ref = [indices[1]] + ([indices[3]] if len(indices) == 4 else [indices[2]])
    for t in n_anchor:
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= batch_size):
            raise DataError(f"anchor index out of range for a batch of {batch_size}")
    for t in n_ref:
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= ref_size):
            raise DataError(f"reference index out of range for a reference set of {ref_size}")
    pos, neg = pair_masks_from_indices(
        tuple(t.to(labels.device).long() for t in indices), batch_size, ref_size  # type: ignore[arg-type]
    )
    return pos, neg


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
