"""Circle loss, pair-wise form (Sun et al., CVPR 2020)."""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.registry import LOSSES
from deepmetric.losses._fused import (
    LN2,
    LOG2E,
    LabelGroups,
    SimGrad,
    exp_limits,
    fused_similarity_loss,
    label_groups,
    masked_lse_rows,
)
from deepmetric.losses._pairs import self_free_pair_masks as _pair_masks
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["CircleLoss", "circle_loss"]


def circle_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
) -> Tensor:
    """Circle loss value; see :class:`CircleLoss`. Inputs are assumed validated.

    One fused pass (:mod:`deepmetric.losses._fused`): value and ``∂L/∂S`` from the similarity
    buffer, worked in place. With labels and no reference set, the positives of each row are read
    with one gather (``O(B·K)``) and overwritten with one scatter, so no ``(B, B)`` mask is built;
    otherwise masks from labels / mined ``indices``.
    """
    return _circle_loss(embeddings, labels, indices, ref_embeddings, ref_labels, m=m, gamma=gamma)


def _circle_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    finite_check: Callable[[], object] | None = None,
) -> Tensor:
    """See :func:`circle_loss`; ``finite_check`` (module calls) replaces the up-front ``isfinite`` pass."""
    same_set = ref_embeddings is None
    ref = embeddings if same_set else ref_embeddings
    groups = label_groups(labels) if same_set and indices is None else None
    if groups is None and finite_check is not None:
        finite_check()  # masks may raise too: keep the checks in their usual order
        finite_check = None
    if groups is not None:
        valid = (groups.num_pos > 0) & (groups.counts[groups.inv] < labels.shape[0])
        if not bool(valid.any()):
            if finite_check is not None:
                finite_check()
            return zero_loss(embeddings, ref)  # type: ignore[arg-type]
        return fused_similarity_loss(embeddings, None, _label_kernel(groups, valid, m, gamma), True, finite_check)
    batch, ref_size = embeddings.shape[0], ref.shape[0]  # type: ignore[union-attr]
    pos, neg = _pair_masks(labels, None if same_set else ref_labels, indices, batch, ref_size)
    valid = pos.any(1) & neg.any(1)
    if not bool(valid.any()):
        return zero_loss(embeddings, ref)  # type: ignore[arg-type]
    return fused_similarity_loss(embeddings, None if same_set else ref, _masked_kernel(pos, neg, valid, m, gamma))


_BLOCK_ELEMENTS = 1 << 18  # row block of the negative exponentials: 1 MiB of float32


def _negative_range(m: float, gamma: float) -> tuple[float, float]:
    """Bounds of the negative logit ``γ α_n (s − m)`` over ``s ∈ [−1, 1]``."""
    top = max(1.0 + m, 0.0)
    low = max(-1.0 + m, 0.0)
    values = [a * (a - 2.0 * m) for a in (top, low, min(max(m, low), top))]
    return gamma * min(values), gamma * max(values)


def _positive_terms(sim: Tensor, mask: Tensor, m: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Row-wise ``LSE_p`` of ``−γ α_p (s − Δ_p)`` over ``mask`` and ``∂LSE_p/∂s`` (α_p constant)."""
    alpha = (1.0 + m - sim).clamp_min_(0.0)
    logits = (sim - (1.0 - m)).mul_(alpha).mul_(-gamma)
    lse, soft = masked_lse_rows(logits, mask)
    return lse, soft.mul_(alpha).mul_(-gamma)


def _label_kernel(groups: LabelGroups, valid: Tensor, m: float, gamma: float):
    """Same set, label positives (gathered per row), every other label a negative."""

    def kernel(unit: Tensor, _ref: Tensor, need_grad: bool, _all_unit: bool) -> tuple[Tensor, SimGrad | None]:
        batch, dtype = unit.shape[0], unit.dtype
        sim = unit @ unit.T
        zero = sim.new_zeros(())
        lse_p, grad_p = _positive_terms(sim.gather(1, groups.members), groups.pos_slots, m, gamma)
        low, high = _negative_range(m, gamma)
        _, lo = exp_limits(dtype, batch)
        constant_shift = high - low <= lo  # one shift for the whole matrix: exp in [e^{low-high}, 1]
        count = valid.sum().to(dtype)
        lse_n = sim.new_empty(batch)
        # logit_n = γ α_n (s − m) = γ (t² − m²) with t = max(s, −m) = α_n − m, kept in the buffer.
        # Row blocks: a block's exponentials live in a small scratch buffer (no second (B, B)
        # allocation) and its gradient overwrites its t while both are in cache.
        rows = max(32, _BLOCK_ELEMENTS // batch)
        scratch = sim.new_empty(min(rows, batch), batch)
        for start in range(0, batch, rows):
            stop = min(start + rows, batch)
            members = groups.members[start:stop]
            t = sim[start:stop].clamp_min_(-m)
            e = torch.mul(t, t, out=scratch[: stop - start]).mul_(gamma * LOG2E)  # base 2, + γ m² log2 e
            if constant_shift:
                shift: Tensor | float = high
                e.sub_((gamma * m * m + high) * LOG2E)
            else:  # row maxima over the negatives
                e.sub_(gamma * m * m * LOG2E).scatter_(1, members, float("-inf"))
                peak = e.amax(1, keepdim=True)
                peak = torch.where(torch.isfinite(peak), peak, zero)
                e.sub_(peak)
                shift = peak.squeeze(1).mul_(LN2)
            e.exp2_().scatter_(1, members, 0.0)  # positives and i itself are not negatives
            total = e.sum(1)
            has_neg = total > 0
            safe_total = torch.where(has_neg, total, torch.ones_like(total))
            lse_block = torch.where(has_neg, safe_total.log().add_(shift), zero)
            lse_n[start:stop] = lse_block
            if need_grad:
                # ∂L/∂s_ij = σ(z_i)/|I| · softmax_n(j) γ α_n,ij on the negatives
                ok = valid[start:stop]
                w = torch.where(ok, torch.sigmoid(lse_p[start:stop] + lse_block), zero) / count
                if m != 0.0:  # t ← E (m + t) = m (E + E t / m): one pass, m folded into the row scale
                    e.mul_((w * (gamma * m) / safe_total).unsqueeze(1))
                    torch.addcmul(e, e, t, value=1.0 / m, out=t)
                else:
                    t.mul_(e.mul_((w * gamma / safe_total).unsqueeze(1)))
        z = lse_p + lse_n
        value = torch.where(valid, F.softplus(z), zero).sum() / count
        if not need_grad:
            return value, None
        # positives: σ(z_i)/|I| · softmax_p(j) · (−γ α_p,ij), added into the (zero) positive slots
        w = torch.where(valid, torch.sigmoid(z), zero) / count
        sim.scatter_add_(1, groups.members, grad_p.mul_(w.unsqueeze(1)))
        return value, SimGrad(sim)

    return kernel


def _masked_kernel(pos: Tensor, neg: Tensor, valid: Tensor, m: float, gamma: float):
    """Explicit positive / negative masks (mined indices or a reference set)."""

    def kernel(unit: Tensor, ref: Tensor, need_grad: bool, _all_unit: bool) -> tuple[Tensor, SimGrad | None]:
        dtype = unit.dtype
        sim = unit @ ref.T
        zero = sim.new_zeros(())
        lse_p, grad_p = _positive_terms(sim, pos, m, gamma)
        alpha_n = (sim + m).clamp_min_(0.0)
        logits_n = (sim - m).mul_(alpha_n).mul_(gamma)
        lse_n, soft_n = masked_lse_rows(logits_n, neg)
        z = lse_p + lse_n
        count = valid.sum().to(dtype)
        value = torch.where(valid, F.softplus(z), zero).sum() / count
        if not need_grad:
            return value, None
        w = torch.where(valid, torch.sigmoid(z), zero) / count
        grad = soft_n.mul_(alpha_n).mul_(gamma).add_(grad_p).mul_(w.unsqueeze(1))
        return value, SimGrad(grad)

    return kernel


@LOSSES.register("circle")
class CircleLoss(nn.Module):
    r"""Circle loss: self-paced weighting of each similarity towards its own optimum.

    For an anchor with positive similarities $s_p^i$ and negative similarities $s_n^j$ (cosine):

    $$ L = \log\Big[1 + \sum_{j} e^{\gamma \alpha_n^j (s_n^j - \Delta_n)}
           \sum_{i} e^{-\gamma \alpha_p^i (s_p^i - \Delta_p)}\Big]
         = \operatorname{softplus}\big(\operatorname{LSE}_j[\gamma\alpha_n^j(s_n^j-\Delta_n)]
           + \operatorname{LSE}_i[-\gamma\alpha_p^i(s_p^i-\Delta_p)]\big) $$

    with $\alpha_p^i = [O_p - s_p^i]_+$, $\alpha_n^j = [s_n^j - O_n]_+$ (constants in
    back-propagation, as in the paper's reference code), $O_p = 1 + m$, $O_n = -m$,
    $\Delta_p = 1 - m$, $\Delta_n = m$. The loss is averaged over the anchors that have at least one
    positive and one negative. Similarity-native: uses cosine similarity (larger = closer).

    Reference: Y. Sun, C. Cheng, Y. Zhang, C. Zhang, L. Zheng, Z. Wang, Y. Wei, "Circle Loss: A
    Unified Perspective of Pair Similarity Optimization", CVPR 2020.

    Defaults: the paper's fine-grained image retrieval (deep metric learning) setting of §4.1,
    $\gamma = 80$, $m = 0.4$. Its face-recognition default is $\gamma = 256$, $m = 0.25$ and its
    re-ID setting $\gamma = 128$, $m = 0.25$. PML's ``CircleLoss(m, gamma)`` is the same function
    (same defaults, mean over anchors with a non-zero loss).

    Args:
        m: relaxation margin $m$.
        gamma: scale factor $\gamma$.

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``, optional ref ``(R, D)`` / ``(R,)``; output scalar.

    Requirements:
        ≥ 2 samples per class in a batch and ≥ 2 classes; otherwise the loss is 0 (with a graph).

    Example:
        >>> import torch
        >>> loss_fn = CircleLoss()
        >>> embeddings = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(embeddings, labels)
        >>> loss.backward()
        >>> bool(torch.isfinite(embeddings.grad).all())
        True
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(self, m: float = 0.4, gamma: float = 80.0) -> None:
        super().__init__()
        if gamma <= 0:
            raise ConfigError(f"gamma must be > 0; got {gamma}")
        self.m = float(m)
        self.gamma = float(gamma)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_inputs(embeddings, labels, ref_embeddings, ref_labels, check_finite=False)
        return _circle_loss(
            embeddings, labels, indices, ref_embeddings, ref_labels, m=self.m, gamma=self.gamma,
            finite_check=lambda: check_inputs(embeddings, labels, ref_embeddings, ref_labels),
        )

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}"
