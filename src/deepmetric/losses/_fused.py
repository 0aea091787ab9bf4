"""Private helpers for the fused batch-softmax losses (SupCon, Circle, ranked list) and proxy losses.

The batch losses are written as a function of one ``(B, R)`` similarity matrix ``S = x̂ ŷᵀ`` of
L2-normalised rows. Their gradient w.r.t. ``S`` is known in closed form, so
:class:`FusedSimilarityLoss` computes the value **and** ``∂L/∂S`` in one forward pass over ``S``
(in place, on its own buffers), keeps only that one matrix for the backward, and turns it into the
gradient w.r.t. the embeddings with matmuls plus the chain rule of the normalisation. Autograd
through the same elementwise chain would keep several ``(B, R)`` tensors and run one backward
kernel per op.

The backward is two matmuls (``G ŷ`` and ``Gᵀ x̂``, the second accumulated into the first for the
batch against itself) and the normalisation's chain rule. With labels and the batch
as its own reference set, the positives of each row are handled through a ``(B, K)`` table of
column indices (:class:`LabelGroups`: one ``gather`` reads them, one ``scatter`` overwrites them),
so no ``(B, B)`` mask is built. Exponentials use ``exp2`` of base-2 logits (the faster CPU kernel),
without a shift when the range of the logits allows it.

Memory stays ``O(B·R)``: one or two ``(B, R)`` float buffers, no ``B×B×B`` tensor, no
(positive pairs × negative pairs) matrix.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from deepmetric.losses._native_rows import native_lib

__all__ = [
    "NORM_EPS",
    "normalize_rows",
    "normalize_rows_backward",
    "LabelGroups",
    "label_groups",
    "SimGrad",
    "FusedSimilarityLoss",
    "fused_similarity_loss",
    "NativeGramLoss",
    "native_gram_loss",
    "exp_limits",
    "LOG2E",
    "LN2",
    "masked_lse_rows",
    "symmetric_result",
    "deferred_class_check",
    "softmax_xent",
]

NORM_EPS = 1e-12  # F.normalize's default eps
LOG2E = 1.0 / math.log(2.0)  # exp(z) = exp2(z · log2 e); exp2 is the faster kernel on CPU
LN2 = math.log(2.0)


def normalize_rows(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``F.normalize(x, dim=1)`` and what its backward needs: ``(x̂, max(‖x‖, eps), ‖x‖ > eps)``."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    denom = norm.clamp_min(NORM_EPS)
    return x / denom, denom, norm > NORM_EPS


def _normalize(x: Tensor) -> tuple[Tensor, Tensor, Tensor, bool, bool | None]:
    """:func:`normalize_rows` and ``(all_unit, finite)``: whether every row passed the clamp, and
    whether every norm is finite (``None``: not checked). On CPU float32, one C pass
    (``dm_normalize_rows``) does it all instead of five tensor operations."""
    lib = native_lib(x)
    if lib is not None:
        xc = x.detach().contiguous()
        unit, denom = torch.empty_like(xc), xc.new_empty(xc.shape[0], 1)
        passes = torch.empty(xc.shape[0], 1, dtype=torch.bool)
        count = lib.dm_normalize_rows(xc.data_ptr(), xc.shape[0], xc.shape[1], unit.data_ptr(), denom.data_ptr(),
                                      passes.data_ptr())
        if count >= 0:
            return unit, denom, passes, count == xc.shape[0], True
        unit, denom, passes = normalize_rows(x)  # a non-finite norm: the caller's check raises
        return unit, denom, passes, False, False
    unit, denom, passes = normalize_rows(x)
    return unit, denom, passes, bool(passes.all()), None


def normalize_rows_backward(
    grad: Tensor, unit: Tensor, denom: Tensor, passes: Tensor, scale: Tensor | float
) -> Tensor:
    """Gradient w.r.t. ``x`` of ``x̂ = x / max(‖x‖, eps)``, times ``scale``, given ``grad = ∂L/∂x̂``.

    ``(g − x̂ (x̂·g)) / ‖x‖`` where ``‖x‖ > eps``, else ``g / eps`` (the clamp passes no gradient).
    ``grad`` is overwritten (one C pass, ``dm_normalize_backward``, on CPU float32).
    """
    lib = native_lib(grad)
    if lib is not None and grad.is_contiguous() and unit.is_contiguous() and (
        not isinstance(scale, Tensor) or scale.numel() == 1
    ):
        lib.dm_normalize_backward(grad.data_ptr(), unit.data_ptr(), denom.contiguous().data_ptr(),
                                  passes.contiguous().data_ptr(), grad.shape[0], grad.shape[1], float(scale))
        return grad
    radial = (unit * grad).sum(1, keepdim=True)  # (B, 1) row dot products (a batched 1×D·D×1 bmm is slower)
    radial = torch.where(passes, radial, torch.zeros((), dtype=grad.dtype, device=grad.device))
    return grad.addcmul_(unit, radial, value=-1.0).mul_(scale / denom)


def exp_limits(dtype: torch.dtype, width: int) -> tuple[float, float]:
    """``(hi, lo)``: ``exp(z)`` is safe for ``z <= hi`` in sums of ``width`` terms, and does not
    underflow (to a denormal or 0) for ``z >= -lo``; both with a margin of ``e^4``."""
    info = torch.finfo(dtype)
    hi = math.log(info.max) - math.log(max(width, 1) + 1) - 4.0
    lo = -math.log(info.tiny) - 4.0
    return hi, lo


# ------------------------------------------------------------------------------------ label groups
class LabelGroups(NamedTuple):
    """The positives of every sample of a batch as a ``(B, K)`` table (``K`` the largest class).

    ``members[i]`` lists every sample with the label of ``i`` (``i`` included), padded with ``i``
    itself; ``pos_slots[i, k]`` marks the slots that are true positives (not padding, not ``i``).
    ``S.gather(1, members)`` reads the positive similarities of each row, ``S.scatter_(1,
    members, v)`` overwrites the positive (and self) entries: ``O(B·K)`` work, no ``(B, B)`` mask.
    ``inv`` is the compact class of each sample, ``counts`` the class sizes, ``num_pos`` the
    number of positives of each sample.
    """

    inv: Tensor
    counts: Tensor
    members: Tensor
    pos_slots: Tensor
    num_pos: Tensor


def label_groups(labels: Tensor) -> Optional[LabelGroups]:
    """:class:`LabelGroups` of ``labels``; ``None`` when the largest class exceeds ``max(B/8, 8)``
    samples (the long table would outgrow a ``(B, B)`` boolean mask: callers use their masked path)."""
    batch = labels.shape[0]
    _, inv, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    width = int(counts.max())
    if width > max(batch // 8, 8):
        return None
    device = labels.device
    order = torch.argsort(inv, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    own_count = counts[inv]
    slot = torch.arange(width, device=device)
    valid = slot < own_count.unsqueeze(1)
    rows = torch.arange(batch, device=device).unsqueeze(1)
    members = order[(starts[inv].unsqueeze(1) + slot).clamp_max_(batch - 1)]
    members = torch.where(valid, members, rows)
    return LabelGroups(inv, counts, members, valid & (members != rows), own_count - 1)


# --------------------------------------------------------------------------------- fused function
class SimGrad(NamedTuple):
    """``∂L/∂S = row · matrix`` (``row`` a constant, folded into the output scale of the backward;
    per-row factors are applied to ``matrix`` by the kernels).

    ``symmetric``: the batch against itself, and ``matrix`` already holds ``G + Gᵀ`` (both sides of
    ``S = x̂ x̂ᵀ`` at once), so the backward is the single product ``matrix · x̂``. Only valid when the
    columns carry gradient (``col_grad``)."""

    matrix: Tensor
    row: float = 1.0
    symmetric: bool = False


Kernel = Callable[[Tensor, Tensor, bool, bool], tuple[Tensor, Optional[SimGrad]]]


def symmetric_result(
    grad: Tensor, total: float, denominator: float | None, need_grad: bool, dtype: torch.dtype
) -> tuple[Tensor, Optional[SimGrad]]:
    """What a native kernel returns: the value ``total / denominator`` and ``grad`` (``G + Gᵀ``) scaled
    by ``1 / denominator``; ``denominator`` ``None`` (no positive pair in the batch) gives 0 and a
    zero gradient."""
    if denominator is None:
        return torch.zeros((), dtype=dtype), (SimGrad(grad.zero_(), symmetric=True) if need_grad else None)
    value = torch.tensor(total / denominator, dtype=dtype)
    return value, (SimGrad(grad, 1.0 / denominator, symmetric=True) if need_grad else None)


class FusedSimilarityLoss(torch.autograd.Function):
    """Loss of ``S = normalize(x) normalize(y)ᵀ`` with a closed-form ``∂L/∂S`` (see module doc).

    ``kernel(x̂, ŷ, need_grad, all_unit) -> (value, SimGrad | None)`` owns the elementwise work
    (``all_unit``: no row was a zero vector, so every ``‖x̂_i‖ = 1`` up to rounding); ``y`` None
    means ``y = x`` (both sides of ``S`` depend on ``x``). ``col_grad=False`` treats the columns of
    ``S`` as constants (the gradient flows through the rows, i.e. the queries, only).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, y: Optional[Tensor], kernel: Kernel, col_grad: bool, finite_check
    ):
        xn, x_den, x_pass, x_unit, x_finite = _normalize(x)
        if y is None:
            yn, y_den, y_pass, y_unit, y_finite = xn, x_den, x_pass, x_unit, x_finite
        else:
            yn, y_den, y_pass, y_unit, y_finite = _normalize(y)
        if finite_check is not None:
            # NaN / inf rows have a non-finite norm: only then run the caller's full check (which
            # raises); a finite row whose norm overflows passes it, as before
            finite = all(
                bool(torch.isfinite(den).all()) if known is None else known
                for den, known in ((x_den, x_finite), (y_den, y_finite))
            )
            if not finite:
                finite_check()
        need = bool(ctx.needs_input_grad[0]) or (y is not None and bool(ctx.needs_input_grad[1]))
        all_unit = x_unit and y_unit
        value, grad = kernel(xn, yn, need, all_unit)
        ctx.same, ctx.col_grad = y is None, col_grad
        ctx.has_grad = grad is not None
        if grad is not None:
            # the (B, R) gradient goes through save_for_backward too: freed after the backward
            # (unless retain_graph), and a second backward sees the same tensors
            if grad.symmetric and not (y is None and col_grad):
                raise RuntimeError("a symmetric SimGrad needs the batch against itself with col_grad")
            ctx.row, ctx.symmetric = grad.row, grad.symmetric
            ctx.save_for_backward(xn, x_den, x_pass, yn, y_den, y_pass, grad.matrix)
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if not ctx.has_grad:
            return None, None, None, None, None
        xn, x_den, x_pass, yn, y_den, y_pass, h = ctx.saved_tensors
        cols = ctx.col_grad and (ctx.same or ctx.needs_input_grad[1])
        # ∂L/∂x̂ = G ŷ, ∂L/∂ŷ = Gᵀ x̂ (the same set: both go to x, accumulated by the second matmul)
        gx = h @ yn
        gy = None
        if cols and not ctx.symmetric:
            if ctx.same:
                gx.addmm_(h.T, xn)
            else:
                gy = h.T @ xn
        if ctx.row != 1.0:
            grad_out = grad_out * ctx.row
        out_x = out_y = None
        if ctx.needs_input_grad[0]:
            out_x = normalize_rows_backward(gx, xn, x_den, x_pass, grad_out)
        if gy is not None and ctx.needs_input_grad[1]:
            out_y = normalize_rows_backward(gy, yn, y_den, y_pass, grad_out)
        return out_x, out_y, None, None, None


def fused_similarity_loss(
    x: Tensor,
    y: Optional[Tensor],
    kernel: Kernel,
    col_grad: bool = True,
    finite_check: Optional[Callable[[], object]] = None,
) -> Tensor:
    """Apply :class:`FusedSimilarityLoss` (``y`` None: the batch against itself).

    ``finite_check``: called (to raise) when an input row is not finite; lets a module skip its own
    ``isfinite`` pass over the embeddings, since the normalisation computes the row norms anyway.
    """
    return FusedSimilarityLoss.apply(x, y, kernel, col_grad, finite_check)


def masked_lse_rows(z: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise ``log Σ_{mask} exp(z)`` (0 for rows without an entry) and the masked softmax
    (0 outside the mask), for small ``(B, K)`` tables."""
    neg_inf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    masked = torch.where(mask, z, neg_inf)
    peak = masked.amax(1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = masked.sub_(peak).exp_()
    total = weights.sum(1, keepdim=True)
    any_entry = total > 0
    total = torch.where(any_entry, total, torch.ones_like(total))
    lse = torch.where(any_entry, total.log() + peak, torch.zeros_like(peak)).squeeze(1)
    return lse, weights.div_(total)


class NativeGramLoss(torch.autograd.Function):
    """A loss of ``S = X̂ X̂ᵀ`` (``X̂`` the L2-normalised rows of a CPU float32 batch, against itself)
    whose C kernel turns ``S`` in place into the symmetric gradient ``W`` of both sides, so that
    ``∂L/∂X̂ = scale · W X̂``: :class:`FusedSimilarityLoss` without its general cases, for the
    native kernels of :mod:`deepmetric.losses._native_rows`.

    ``run(x̂, need_grad) -> (W, total, denominator)``: the value is ``total / denominator`` and the
    gradient ``W X̂ / denominator`` (``denominator`` ``None``: 0 and a zero gradient). The forward
    is one normalisation pass, ``run`` and one scalar; the backward one GEMM and the normalisation's
    chain rule. At B = 512 a loss takes about 2 ms here and every tensor operation after a GEMM costs
    5–25 µs, so the handful this saves is measurable.
    """

    @staticmethod
    def forward(ctx, x: Tensor, run, finite_check):  # type: ignore[override]
        unit, den, passes, _all_unit, finite = _normalize(x)
        if not finite and finite_check is not None:
            finite_check()  # raises on NaN / inf rows (a finite row whose norm overflows passes it)
        need = bool(ctx.needs_input_grad[0])
        weights, total, denominator = run(unit, need)
        ctx.scale = 0.0 if denominator is None else 1.0 / denominator
        ctx.save_for_backward(unit, den, passes, weights if need and ctx.scale else None)
        return torch.tensor(total * ctx.scale, dtype=x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        unit, den, passes, weights = ctx.saved_tensors
        if weights is None:
            return torch.zeros_like(unit), None, None
        return normalize_rows_backward(weights @ unit, unit, den, passes, float(grad_out) * ctx.scale), None, None


def native_gram_loss(x: Tensor, run, finite_check: Optional[Callable[[], object]] = None) -> Tensor:
    """Apply :class:`NativeGramLoss`."""
    return NativeGramLoss.apply(x, run, finite_check)


# ------------------------------------------------------------------------------- class losses
def deferred_class_check(
    embeddings: Tensor,
    labels: Tensor,
    num_classes: Optional[int],
    embedding_dim: Optional[int],
    indices: object = None,
    ref_embeddings: Optional[Tensor] = None,
    ref_labels: Optional[Tensor] = None,
) -> Callable[[], None]:
    """The checks of :func:`~deepmetric.losses.softmax.check_class_inputs` except the ``isfinite``
    pass over the embeddings, which is deferred: returns a callback for
    :func:`fused_similarity_loss` (``finite_check``), run only when a row norm is not finite.

    Any failing check runs the full :func:`check_class_inputs`, so the same error (and, for an
    input with several problems, the same first error) is raised as before.
    """
    from deepmetric.losses.softmax import check_class_inputs

    def full() -> None:
        check_class_inputs(
            embeddings, labels, num_classes, embedding_dim,
            indices=indices, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
        )

    ok = (
        indices is None
        and ref_embeddings is None
        and ref_labels is None
        and isinstance(embeddings, Tensor)
        and embeddings.dim() == 2
        and embeddings.shape[0] > 0
        and isinstance(labels, Tensor)
        and labels.dim() == 1
        and labels.shape[0] == embeddings.shape[0]
        and not (labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool)
        and (embedding_dim is None or embeddings.shape[1] == embedding_dim)
    )
    if ok and num_classes is not None:
        low, high = torch.aminmax(labels)
        ok = int(low) >= 0 and int(high) < num_classes
    if not ok:
        full()
    return full


def softmax_xent(logits2: Tensor, own: Tensor, exclude_target: bool = False) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of base-2 logits (natural logits ``= logits2 · ln 2``) and its gradient.

    Works in place on ``logits2``; returns ``(value, softmax − onehot)`` (``∂(B·value)/∂logit``).
    ``exclude_target``: the target logit is left out of the normaliser (Proxy-NCA's form).
    """
    target = logits2.gather(1, own)
    if exclude_target:
        logits2.scatter_(1, own, float("-inf"))
    peak = logits2.amax(1, keepdim=True)
    weights = logits2.sub_(peak).exp2_()
    total = weights.sum(1, keepdim=True)
    value = (total.log2() + peak - target).mean() * LN2
    soft = weights.div_(total)
    soft.scatter_add_(1, own, torch.full_like(target, -1.0))
    return value, soft
