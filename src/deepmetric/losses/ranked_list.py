"""Ranked list loss (Wang et al., CVPR 2019)."""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.registry import LOSSES
from deepmetric.losses._fused import (
    LOG2E,
    LabelGroups,
    SimGrad,
    exp_limits,
    fused_similarity_loss,
    label_groups,
    symmetric_result,
)
from deepmetric.losses._native_rows import finalize, int32_labels, pair_rows_lib
from deepmetric.losses._pairs import self_free_pair_masks as _pair_masks
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["RankedListLoss", "ranked_list_loss"]


def ranked_list_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    alpha: float = 1.2,
    margin: float = 0.4,
    temperature: float = 10.0,
    negative_weight: float = 1.0,
    query_only_gradient: bool = False,
) -> Tensor:
    """Ranked list loss value; see :class:`RankedListLoss`. Inputs are assumed validated.

    One fused pass (:mod:`deepmetric.losses._fused`): the distances, the value and ``∂L/∂S``
    (``S`` the cosine matrix, ``d = sqrt(2 − 2S)``) from one buffer worked in place. With labels and
    no reference set, the positives of each row are read with one gather and overwritten with one
    scatter (no ``(B, B)`` positive mask); otherwise masks from labels / mined ``indices``. On CPU
    float32, labels and no reference set, the row work is a C kernel (:func:`_native_kernel`).
    """
    return _ranked_list_loss(
        embeddings, labels, indices, ref_embeddings, ref_labels, alpha=alpha, margin=margin,
        temperature=temperature, negative_weight=negative_weight, query_only_gradient=query_only_gradient,
    )


def _ranked_list_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    alpha: float = 1.2,
    margin: float = 0.4,
    temperature: float = 10.0,
    negative_weight: float = 1.0,
    query_only_gradient: bool = False,
    finite_check: Callable[[], object] | None = None,
) -> Tensor:
    """See :func:`ranked_list_loss`; ``finite_check`` (module calls) replaces the up-front ``isfinite`` pass."""
    same_set = ref_embeddings is None
    ref = embeddings if same_set else ref_embeddings
    params = (alpha, margin, temperature, negative_weight)
    lib = pair_rows_lib(embeddings) if same_set and indices is None and not query_only_gradient else None
    if lib is not None:
        kernel = _native_kernel(lib, int32_labels(labels), *params)
        return fused_similarity_loss(embeddings, None, kernel, True, finite_check)
    groups = label_groups(labels) if same_set and indices is None else None
    if groups is None and finite_check is not None:
        finite_check()  # masks may raise too: keep the checks in their usual order
        finite_check = None
    if groups is not None:
        if not bool((groups.num_pos > 0).any()):
            if finite_check is not None:
                finite_check()
            return zero_loss(embeddings, embeddings if not query_only_gradient else embeddings.detach())
        return fused_similarity_loss(
            embeddings, None, _label_kernel(groups, *params), not query_only_gradient, finite_check
        )
    batch, ref_size = embeddings.shape[0], ref.shape[0]  # type: ignore[union-attr]
    pos, neg = _pair_masks(labels, None if same_set else ref_labels, indices, batch, ref_size)
    if not bool(pos.any()):
        return zero_loss(embeddings, ref if not query_only_gradient else ref.detach())  # type: ignore[union-attr]
    return fused_similarity_loss(
        embeddings, None if same_set else ref, _masked_kernel(pos, neg, *params), not query_only_gradient
    )


_EPS = 1e-12  # clamp of the squared distance, as in deepmetric.distances.euclidean
_BLOCK_ELEMENTS = 1 << 18  # row block of the negative weights: 1 MiB of float32


def _weight_shift(dtype: torch.dtype, width: int, span: float) -> float | None:
    """Constant shift for ``exp(T(α − d))`` with ``T(α − d) ∈ [0, span]``, or None (row maxima)."""
    hi, lo = exp_limits(dtype, width)
    if span <= hi:
        return 0.0
    if span <= lo:
        return span
    return None


def _positive_terms(dist2: Tensor, mask: Tensor, boundary: float, batch: int) -> tuple[Tensor, Tensor]:
    """``L_P`` per row from squared distances ``dist2`` (``mask`` the positives) and ``∂(L_P/N)/∂S``."""
    passes = dist2 >= _EPS
    dist = dist2.clamp_min(_EPS).sqrt_()
    star = mask & (dist > boundary)
    count = star.sum(1, keepdim=True).clamp_min_(1).to(dist.dtype)
    zero = dist.new_zeros(())
    loss_p = torch.where(star, dist - boundary, zero).sum(1, keepdim=True).div_(count).squeeze(1)
    # ∂d/∂S = −1/d where the clamp passes
    grad = torch.where(star & passes, (dist * count).reciprocal_().mul_(-1.0 / batch), zero)
    return loss_p, grad


#: A row block whose share of negatives within α (the set N*) is at most this is worked sparsely.
SPARSE_FRACTION = 1.0 / 64


def _sparse_negatives(
    d2: Tensor, near: Tensor, alpha: float, temperature: float, shift: float, negative_weight: float,
    clamped: float, batch: int, need_grad: bool, total: Tensor, weighted_dist: Tensor,
) -> bool:
    """The negative part of a row block from its few entries in N* (``d < α``, i.e. ``d² < α²``):
    one comparison finds them (a mask in the memory of the float work block ``near``: no new (B, B)
    buffer); the square roots, weights and gradients are computed on those entries only and the
    block (squared distances in, ``∂L/∂S`` out) is zeroed elsewhere. Writes the rows' weight sums
    ``total`` and ``Σ w·d`` ``weighted_dist``; ``False`` (block untouched) when N* is too large a
    share of the block for this to pay off."""
    cells = d2.numel()
    near = near.view(-1).view(torch.bool)[:cells].view(d2.shape)  # a mask in the float work block's memory
    torch.lt(d2, alpha * alpha * (1.0 + 1e-5), out=near)  # loose: the exact test d < α is below
    if int(torch.count_nonzero(near)) > SPARSE_FRACTION * cells:
        return False  # (counted first: no index list of a dense block)
    flat = near.view(-1).nonzero().squeeze(1)
    r = torch.div(flat, d2.shape[1], rounding_mode="floor")
    d = d2.view(-1).index_select(0, flat).clamp_min_(_EPS).sqrt_()
    inside = d < alpha
    if temperature == 0.0:
        w = inside.to(d.dtype)
    else:  # w = exp(T (α − d) − shift), as the dense path (exp2 of the log2-scaled exponent)
        w = torch.sub(alpha, d).mul_(temperature * LOG2E).sub_(shift * LOG2E).exp2_().mul_(inside)
    total.zero_().index_add_(0, r, w)
    weighted_dist.zero_().index_add_(0, r, w * d)
    if need_grad:
        d2.zero_()
        if negative_weight != 0.0 and flat.numel():
            zero = d.new_zeros(())
            coef = torch.where(total > 0, negative_weight / batch / total, zero)
            grad = torch.where(d > clamped, w * coef[r] / d, zero)  # a clamped distance passes no gradient
            d2.view(-1).index_copy_(0, flat, grad)
    return True


def _native_kernel(lib, lab: Tensor, alpha: float, margin: float, temperature: float, negative_weight: float):
    """Same set, label positives, in C: ``dm_ranked_list_rows`` (distances, weights and the loss over
    the rows of ``S`` in place, with the per-row factors of the gradient), then ``dm_pair_finalize``
    (the gradient of both sides, ``G + Gᵀ``). A batch without positive pairs gives 0 and a zero
    gradient, as the torch paths. Rows that are not unit vectors (a zero embedding) take the torch
    kernel, which handles ``d² = |x̂_i|² + |x̂_j|² − 2S``."""
    fallback = None

    def kernel(unit: Tensor, ref: Tensor, need_grad: bool, all_unit: bool) -> tuple[Tensor, SimGrad | None]:
        nonlocal fallback
        if not all_unit:
            if fallback is None:
                fallback = _masked_kernel(*_pair_masks(lab, None, None, lab.shape[0], lab.shape[0]),
                                          alpha, margin, temperature, negative_weight)
            return fallback(unit, ref, need_grad, all_unit)
        sim = unit @ unit.T
        batch = sim.shape[0]
        fp, fn = torch.empty(batch), torch.empty(batch)
        stats = torch.zeros(2, dtype=torch.float64)
        lib.dm_ranked_list_rows(sim.data_ptr(), batch, sim.stride(0), lab.data_ptr(), alpha, margin, temperature,
                                negative_weight, fp.data_ptr(), fn.data_ptr(), stats.data_ptr())
        total, positives = stats.tolist()
        if positives and need_grad:
            finalize(lib, sim, lab, fp, fn, None)
        # no positive pair in the batch: 0, as the torch paths
        return symmetric_result(sim, total, batch if positives else None, need_grad, unit.dtype)

    return kernel


def _label_kernel(groups: LabelGroups, alpha: float, margin: float, temperature: float, negative_weight: float):
    """Same set, label positives (gathered per row), every other label a negative."""

    def kernel(unit: Tensor, _ref: Tensor, need_grad: bool, all_unit: bool) -> tuple[Tensor, SimGrad | None]:
        batch, dtype = unit.shape[0], unit.dtype
        if all_unit:  # d² = 2 − 2 S for unit rows
            dist = torch.addmm(unit.new_zeros(()), unit, unit.T, beta=0.0, alpha=-2.0).add_(2.0)
        else:  # a zero row: d² = |x̂_i|² + |x̂_j|² − 2 S
            norms2 = (unit * unit).sum(1)
            dist = torch.addmm(norms2.unsqueeze(1), unit, unit.T, alpha=-2.0).add_(norms2)
        zero = dist.new_zeros(())
        loss_p, grad_p = _positive_terms(dist.gather(1, groups.members), groups.pos_slots, alpha - margin, batch)
        # positives and i itself leave the negative sums: d² = α² + 1 (d > α: no weight, no term)
        dist.scatter_(1, groups.members, alpha * alpha + 1.0)
        clamped = float(torch.tensor(_EPS, dtype=dtype).sqrt())  # d of a clamped d² (no gradient)
        shift = _weight_shift(dtype, batch, temperature * alpha)
        total = dist.new_empty(batch)
        weighted_dist = dist.new_empty(batch)
        # Row blocks: the weights of a block live in a small scratch buffer (no second (B, B)
        # allocation) and the block's gradient overwrites its distances while both are in cache.
        rows = max(32, _BLOCK_ELEMENTS // batch)
        scratch = dist.new_empty(min(rows, batch), batch)
        for start in range(0, batch, rows):
            stop = min(start + rows, batch)
            if shift is not None and _sparse_negatives(
                dist[start:stop], scratch[: stop - start], alpha, temperature, shift, negative_weight, clamped,
                batch, need_grad, total[start:stop], weighted_dist[start:stop],
            ):
                continue
            d = dist[start:stop].clamp_min_(_EPS).sqrt_()
            # w = exp(T (α − d)) on N* = {d < α}, 0 elsewhere: threshold −d at −α (strict), exp2
            w = torch.neg(d, out=scratch[: stop - start])
            F.threshold_(w, -alpha, float("-inf"))
            w.add_(alpha)  # α − d on N*, −inf elsewhere
            if temperature == 0.0:
                w.clamp_max_(0.0)  # w = 1 on N*
            else:
                w.mul_(temperature * LOG2E)
                if shift is None:  # row maxima of T(α − d) over N*
                    peak = w.amax(1, keepdim=True)
                    w.sub_(torch.where(torch.isfinite(peak), peak, zero))
                elif shift:
                    w.sub_(shift * LOG2E)
            w.exp2_()
            block_total = torch.sum(w, 1, out=total[start:stop])
            torch.bmm(w.unsqueeze(1), d.unsqueeze(2), out=weighted_dist[start:stop].view(-1, 1, 1))
            if need_grad:
                # N*: ∂L/∂S_ij = λ w_ij / (N W_i d_ij), written over the block's distances; a
                # clamped distance passes no gradient (d → inf there, so w / d = 0)
                if negative_weight == 0.0:
                    d.zero_()
                else:
                    w.mul_(torch.where(block_total > 0, negative_weight / batch / block_total, zero).unsqueeze(1))
                    torch.div(w, F.threshold_(d, clamped, float("inf")), out=d)
        has_neg = total > 0
        safe_total = torch.where(has_neg, total, torch.ones_like(total))
        loss_n = torch.where(has_neg, alpha - weighted_dist / safe_total, zero)
        value = (loss_p + negative_weight * loss_n).mean()
        if not need_grad:
            return value, None
        dist.scatter_add_(1, groups.members, grad_p)  # P*: −1 / (N |P*_i| d_ij) (0 in the N* part)
        return value, SimGrad(dist)

    return kernel


def _masked_kernel(pos: Tensor, neg: Tensor, alpha: float, margin: float, temperature: float, negative_weight: float):
    """Explicit positive / negative masks (mined indices or a reference set)."""

    def kernel(unit: Tensor, ref: Tensor, need_grad: bool, _all_unit: bool) -> tuple[Tensor, SimGrad | None]:
        batch, dtype = unit.shape[0], unit.dtype
        x2 = (unit * unit).sum(1, keepdim=True)
        y2 = x2.T if ref is unit else (ref * ref).sum(1).unsqueeze(0)
        dist2 = torch.addmm(x2, unit, ref.T, alpha=-2.0).add_(y2)
        zero = dist2.new_zeros(())
        loss_p, grad_p = _positive_terms(dist2, pos, alpha - margin, batch)
        passes = dist2 >= _EPS
        dist = dist2.clamp_min_(_EPS).sqrt_()
        star = neg & (dist < alpha)
        neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=dist.device)
        logits = torch.where(star, (alpha - dist).mul_(temperature), neg_inf)
        peak = logits.amax(1, keepdim=True)
        weights = logits.sub_(torch.where(torch.isfinite(peak), peak, zero)).exp_()
        total = weights.sum(1)
        has_neg = total > 0
        safe_total = torch.where(has_neg, total, torch.ones_like(total))
        loss_n = torch.where(has_neg, (weights * (alpha - dist)).sum(1) / safe_total, zero)
        value = (loss_p + negative_weight * loss_n).mean()
        if not need_grad:
            return value, None
        scale = negative_weight / batch
        grad = weights.div_(dist).mul_(passes).mul_((scale / safe_total).unsqueeze(1)).add_(grad_p)
        return value, SimGrad(grad)

    return kernel


@LOSSES.register("ranked_list")
class RankedListLoss(nn.Module):
    r"""Ranked list loss: positives inside $\alpha - m$, negatives beyond $\alpha$, loss-weighted negatives.

    Every sample $x_i$ is a query; with $d_{ij}$ the euclidean distance between L2-normalised
    embeddings, the non-trivial positives and negatives are
    $P^*_i = \{j : y_j = y_i,\, j \ne i,\, d_{ij} > \alpha - m\}$ and
    $N^*_i = \{j : y_j \ne y_i,\, d_{ij} < \alpha\}$, and

    $$ L_P(i) = \frac{1}{|P^*_i|}\sum_{j\in P^*_i}\big(d_{ij} - (\alpha - m)\big),\qquad
       L_N(i) = \sum_{j\in N^*_i}\frac{w_{ij}}{\sum_{k\in N^*_i} w_{ik}}\,(\alpha - d_{ij}),\quad
       w_{ij} = e^{T(\alpha - d_{ij})} $$

    $$ L = \frac{1}{N}\sum_{i=1}^{N} \big(L_P(i) + \lambda\, L_N(i)\big). $$

    Reference: X. Wang, Y. Hua, E. Kodirov, G. Hu, R. Garnier, N. M. Robertson, "Ranked List Loss
    for Deep Metric Learning", CVPR 2019 (this is RLL-Simpler's form: positives unweighted, one
    temperature for negatives).

    Choices (all from the paper unless stated): distances between L2-normalised embeddings (so in
    $[0, 2]$); $\alpha = 1.2$, $m = 0.4$, $T = 10$, $\lambda = 1$; the weights $w_{ij}$ are constants
    in back-propagation (computed under ``no_grad``); an empty $P^*_i$ or $N^*_i$ contributes 0;
    the mean is over all $N$ queries of the batch (queries with zero loss included). The paper also
    says that within a query's list the other points are treated as constants (only $f(x_i)$ is
    updated); that is available as ``query_only_gradient=True``. The default (False) lets the
    gradient of $d_{ij}$ flow to both ends, as standard autograd and PML do.

    PML mapping: ``pml.RankedListLoss(margin=m, Tn=T, imbalance=0.5, alpha=α, Tp=0)`` equals
    ``0.5 ×`` this loss with ``negative_weight=1`` (PML weights ``(1-imbalance) L_P + imbalance L_N``
    and adds ``1e-5`` per entry to its normalisers); PML back-propagates through $w_{ij}$, so
    gradients agree only for ``temperature=0``.

    Args:
        alpha: $\alpha$, distance beyond which negatives are trivial.
        margin: $m$, margin between the positive boundary $\alpha - m$ and $\alpha$.
        temperature: $T$ of the negative weighting (0 = no weighting, large = hardest negative).
        negative_weight: $\lambda$, weight of the negative term.
        query_only_gradient: if True, reference embeddings are constants (gradient only via queries).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``, optional ref ``(R, D)`` / ``(R,)``; output scalar.

    Requirements:
        ≥ 2 samples per class in a batch (P×K sampling, as in the paper); a batch without any
        positive pair gives 0 (with a graph).

    Example:
        >>> import torch
        >>> loss_fn = RankedListLoss()
        >>> embeddings = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(embeddings, labels)
        >>> loss.backward()
        >>> bool(loss.item() > 0)
        True
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(
        self,
        alpha: float = 1.2,
        margin: float = 0.4,
        temperature: float = 10.0,
        negative_weight: float = 1.0,
        query_only_gradient: bool = False,
    ) -> None:
        super().__init__()
        if margin < 0 or alpha <= 0:
            raise ConfigError(f"need alpha > 0 and margin >= 0; got alpha={alpha}, margin={margin}")
        if temperature < 0:
            raise ConfigError(f"temperature must be >= 0; got {temperature}")
        self.alpha = float(alpha)
        self.margin = float(margin)
        self.temperature = float(temperature)
        self.negative_weight = float(negative_weight)
        self.query_only_gradient = bool(query_only_gradient)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_inputs(embeddings, labels, ref_embeddings, ref_labels, check_finite=False)
        return _ranked_list_loss(
            embeddings,
            labels,
            indices,
            ref_embeddings,
            ref_labels,
            alpha=self.alpha,
            margin=self.margin,
            temperature=self.temperature,
            negative_weight=self.negative_weight,
            query_only_gradient=self.query_only_gradient,
            finite_check=lambda: check_inputs(embeddings, labels, ref_embeddings, ref_labels),
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, margin={self.margin}, temperature={self.temperature}, "
            f"negative_weight={self.negative_weight}"
        )
