"""Supervised contrastive loss, L^sup_out (Khosla et al., NeurIPS 2020)."""
from __future__ import annotations

import ctypes
from typing import Callable, ClassVar

import torch
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
    native_gram_loss,
)
from deepmetric.losses._native_rows import finalize, int32_labels, pair_rows_lib, upper_gram
from deepmetric.losses._pairs import self_free_pair_masks as _pair_masks
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["SupConLoss", "sup_con_loss"]


def sup_con_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    temperature: float = 0.1,
) -> Tensor:
    """SupCon (L^sup_out) value; see :class:`SupConLoss`. Inputs are assumed validated.

    One fused pass (:mod:`deepmetric.losses._fused`): the value and ``∂L/∂S`` come from one
    ``(B, R)`` buffer, ``exp(S/τ)`` computed in place. With labels and no reference set, the
    positive logits of each row are read with one gather (``O(B·K)``) and their gradient added
    with one scatter, so no ``(B, B)`` mask is built; otherwise masks from labels / mined ``indices``.
    On CPU float32, labels and no reference set, the row work is a C kernel (:func:`_native_kernel`).
    """
    return _sup_con_loss(embeddings, labels, indices, ref_embeddings, ref_labels, temperature=temperature)


def _sup_con_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    temperature: float = 0.1,
    finite_check: Callable[[], object] | None = None,
) -> Tensor:
    """See :func:`sup_con_loss`; ``finite_check`` (module calls) replaces the up-front ``isfinite`` pass."""
    same_set = ref_embeddings is None
    ref = embeddings if same_set else ref_embeddings
    inv_t = 1.0 / temperature
    lib = pair_rows_lib(embeddings) if same_set and indices is None else None
    if lib is not None:
        return native_gram_loss(embeddings, _native_kernel(lib, int32_labels(labels), inv_t), finite_check)
    groups = label_groups(labels) if same_set and indices is None else None
    if groups is None and finite_check is not None:
        finite_check()  # masks may raise too: keep the checks in their usual order
        finite_check = None
    if groups is not None:
        has_pos = groups.num_pos > 0
        if not bool(has_pos.any()):
            if finite_check is not None:
                finite_check()
            return zero_loss(embeddings, ref)  # type: ignore[arg-type]
        return fused_similarity_loss(embeddings, None, _label_kernel(groups, has_pos, inv_t), True, finite_check)
    batch, ref_size = embeddings.shape[0], ref.shape[0]  # type: ignore[union-attr]
    pos, neg = _pair_masks(labels, None if same_set else ref_labels, indices, batch, ref_size)
    num_pos = pos.sum(1)
    has_pos = num_pos > 0
    if not bool(has_pos.any()):
        return zero_loss(embeddings, ref)  # type: ignore[arg-type]
    kernel = _masked_kernel(pos, neg, num_pos, has_pos, inv_t)
    return fused_similarity_loss(embeddings, None if same_set else ref, kernel)


def _native_kernel(lib, lab: Tensor, inv_t: float):
    """Same set, label positives, in C, for :func:`~deepmetric.losses._fused.native_gram_loss`. For
    ``τ >= 1/40``, ``|S/τ| <= 40``: the exponentials need no shift. ``dm_supcon_upper`` then takes
    the upper triangle of ``S`` (:func:`upper_gram`: the GEMM skips the lower-left quarter), computes
    ``e^{S/τ}`` once per unordered pair (AVX2 where the CPU has it), the loss and, in place, the
    symmetric gradient of both sides. Else ``dm_supcon_rows`` shifts each row by its maximum and
    ``dm_pair_finalize`` adds the transposed rows. A batch without positives gives 0 and a zero
    gradient (every row factor is 0)."""

    def run(unit: Tensor, need_grad: bool) -> tuple[Tensor, float, float]:
        batch = unit.shape[0]
        stats = (ctypes.c_double * 3)()
        if 2.0 * inv_t <= 80.0:
            grad = upper_gram(unit)
            lib.dm_supcon_upper(grad.data_ptr(), batch, grad.stride(0), lab.data_ptr(), unit.data_ptr(), unit.shape[1],
                                inv_t, int(need_grad), ctypes.addressof(stats))
            if stats[2] < 0:
                raise MemoryError("SupCon: could not allocate the kernel's scratch")
        else:
            factor, cpos = torch.empty(batch), torch.empty(batch)
            grad = unit @ unit.T
            lib.dm_supcon_rows(grad.data_ptr(), batch, grad.stride(0), lab.data_ptr(), inv_t, factor.data_ptr(),
                               cpos.data_ptr(), ctypes.addressof(stats))
            if need_grad:
                finalize(lib, grad, lab, factor, factor, cpos)
        return grad, stats[0], max(stats[1], 1.0)

    return run


def _label_kernel(groups: LabelGroups, has_pos: Tensor, inv_t: float):
    """Same set, label positives: A(i) = every j != i, P(i) = the rest of i's class (a gather)."""

    def kernel(unit: Tensor, _ref: Tensor, need_grad: bool, _all_unit: bool) -> tuple[Tensor, SimGrad | None]:
        batch, dtype = unit.shape[0], unit.dtype
        hi, lo = exp_limits(dtype, batch)
        # base-2 logits S/(τ ln 2): exp2 of them is exp(S/τ), and exp2 is the cheaper kernel
        logits = torch.addmm(unit.new_zeros(()), unit, unit.T, beta=0.0, alpha=inv_t * LOG2E)
        zero = logits.new_zeros(())
        pos_logit_sum = torch.where(groups.pos_slots, logits.gather(1, groups.members), zero).sum(1).mul_(LN2)
        if inv_t <= min(hi, lo):  # |S/τ| <= 1/τ: exp neither overflows nor underflows, no shift
            shift: Tensor | float = 0.0
        else:  # row maxima over A(i)
            logits.fill_diagonal_(float("-inf"))
            shift = logits.amax(1, keepdim=True)
            logits.sub_(shift)
            shift = shift.squeeze(1).mul_(LN2)
        weights = logits.exp2_()
        weights.fill_diagonal_(0.0)  # A(i) excludes i
        denominator = weights.sum(1)
        npos = groups.num_pos.clamp_min(1).to(dtype)
        per_anchor = torch.where(has_pos, denominator.log() + shift - pos_logit_sum / npos, zero)
        count = has_pos.sum().to(dtype)
        value = per_anchor.sum() / count
        if not need_grad:
            return value, None
        # ∂L/∂S_ij = [i ∈ I] / (|I| τ) · (softmax_A(i)(j) − [j ∈ P(i)] / |P(i)|)
        scale = has_pos.to(dtype) * (inv_t / count)
        weights.mul_((scale / denominator).unsqueeze(1))
        step = torch.where(groups.pos_slots, (scale / npos).neg_().unsqueeze(1), zero)
        weights.scatter_add_(1, groups.members, step)
        return value, SimGrad(weights)

    return kernel


def _masked_kernel(pos: Tensor, neg: Tensor, num_pos: Tensor, has_pos: Tensor, inv_t: float):
    """Explicit positive / candidate masks (mined indices or a reference set)."""

    def kernel(unit: Tensor, ref: Tensor, need_grad: bool, _all_unit: bool) -> tuple[Tensor, SimGrad | None]:
        dtype = unit.dtype
        logits = (unit * inv_t) @ ref.T
        zero = logits.new_zeros(())
        pos_logit_sum = torch.where(pos, logits, zero).sum(1)
        logits.masked_fill_(~(pos | neg), float("-inf"))
        peak = logits.amax(1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, zero)
        weights = logits.sub_(peak).exp_()  # 0 outside A(i)
        denominator = weights.sum(1)
        log_denominator = torch.where(has_pos, denominator, torch.ones_like(denominator)).log() + peak.squeeze(1)
        npos = num_pos.clamp_min(1).to(dtype)
        per_anchor = torch.where(has_pos, log_denominator - pos_logit_sum / npos, zero)
        count = has_pos.sum().to(dtype)
        value = per_anchor.sum() / count
        if not need_grad:
            return value, None
        scale = has_pos.to(dtype) * (inv_t / count)
        row = torch.where(has_pos, scale / denominator, zero)
        grad = weights.mul_(row.unsqueeze(1))
        grad.sub_(pos * (scale / npos).unsqueeze(1))
        return value, SimGrad(grad)

    return kernel


@LOSSES.register("sup_con")
class SupConLoss(nn.Module):
    r"""Supervised contrastive loss ($L^{sup}_{out}$): softmax over the batch, averaged over positives.

    With $z$ the L2-normalised embeddings, $P(i)$ the positives of anchor $i$ and $A(i)$ every
    other sample of the batch (positives and negatives):

    $$ L = \frac{1}{|I|}\sum_{i\in I} \frac{-1}{|P(i)|}\sum_{p\in P(i)}
           \log\frac{\exp(z_i\cdot z_p/\tau)}{\sum_{a\in A(i)}\exp(z_i\cdot z_a/\tau)},
       \qquad I = \{i : |P(i)| > 0\}. $$

    Reference: P. Khosla, P. Teterwak, C. Wang, A. Sarna, Y. Tian, P. Isola, A. Maschinot, C. Liu,
    D. Krishnan, "Supervised Contrastive Learning", NeurIPS 2020 (Eq. 2, the "out" variant the paper
    recommends). Similarity-native: cosine similarity (larger = closer).

    Choices: anchors without positives are excluded (the paper's formula is undefined for them);
    the sum over anchors of Eq. 2 is replaced by the mean, as in the authors' code, and the code's
    extra factor $\tau/\tau_{base}$ (1 at its defaults) is omitted. With mined ``indices``,
    $P(i)$ are the given positive pairs and $A(i)$ the given positive and negative pairs. Memory is
    $O(B \cdot R)$: one similarity matrix and two masks, never a (positives × negatives) matrix.
    Views of the same image are passed as separate rows with the same label.

    PML mapping: ``pml.SupConLoss(temperature=τ)`` is the same function when the batch has at least
    one positive and one negative pair (PML returns 0 for a single-class batch; this loss does not).

    Args:
        temperature: $\tau$ (the paper uses 0.1).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``, optional ref ``(R, D)`` / ``(R,)``; output scalar.

    Requirements:
        ≥ 2 samples (or views) per class; a batch without positive pairs gives 0 (with a graph).

    Example:
        >>> import torch
        >>> loss_fn = SupConLoss(temperature=0.1)
        >>> embeddings = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(embeddings, labels)
        >>> loss.backward()
        >>> bool(loss.item() > 0)
        True
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0; got {temperature}")
        self.temperature = float(temperature)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_inputs(embeddings, labels, ref_embeddings, ref_labels, check_finite=False)
        return _sup_con_loss(
            embeddings, labels, indices, ref_embeddings, ref_labels, temperature=self.temperature,
            finite_check=lambda: check_inputs(embeddings, labels, ref_embeddings, ref_labels),
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
