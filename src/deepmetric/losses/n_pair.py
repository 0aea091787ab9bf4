"""Multi-class N-pair loss (Sohn) on dot-product similarities, generalised to any labelled batch."""
from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric._native.labels import first_pair_rows, label_kernel
from deepmetric.errors import ConfigError, NonFiniteError
from deepmetric.losses._native_rows import native_lib
from deepmetric.losses._pairs import masked_logsumexp, resolve_masks
from deepmetric.registry import LOSSES
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["NPairLoss", "n_pair_loss"]

PairMode = Literal["all", "one_per_class"]
_PAIR_MODES = ("all", "one_per_class")


def n_pair_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    l2_reg: float = 0.002,
    pairs: PairMode = "all",
) -> Tensor:
    """Functional form of :class:`NPairLoss` (same arguments)."""
    if pairs not in _PAIR_MODES:
        raise ConfigError(f"pairs must be one of {_PAIR_MODES}; got {pairs!r}")
    same_set = ref_embeddings is None
    checked = (embeddings, labels, ref_embeddings, ref_labels)
    # the N-pair batches' isfinite pass is deferred to a non-finite value (_NPairCrossEntropy)
    ref, ref_lab = check_inputs(*checked, check_finite=False)
    batch, ref_size = embeddings.shape[0], ref.shape[0]
    if pairs == "one_per_class":
        if not same_set or indices is not None:
            raise ConfigError(
                "pairs='one_per_class' builds its N-pair batch from (embeddings, labels) alone; "
                "it takes no indices or ref_embeddings"
            )
        native = label_kernel(labels) if native_lib(embeddings) is not None else None
        if native is not None:
            need = torch.is_grad_enabled() and embeddings.requires_grad
            loss = _NPairNative.apply(embeddings, native[1], native[0], need, *checked)
        else:
            rows = first_pair_rows(labels)
            if rows.numel() < 4:  # fewer than two classes with a pair: no negatives, no cross-entropy
                check_inputs(*checked)
                loss = zero_loss(embeddings)
            else:
                loss = _NPairCrossEntropy.apply(embeddings, None, rows.to(embeddings.device), *checked)
        return loss + l2_reg * embeddings.norm(dim=1).mean() if l2_reg else loss
    if _is_n_pair_batch(labels, ref_lab, indices, same_set):
        # the paper's batch: N anchors, their N positives, one class each. The positive of anchor i is
        # reference i and every other reference is a negative: a cross-entropy with target i.
        loss = _NPairCrossEntropy.apply(embeddings, ref, None, *checked)
        return loss + l2_reg * embeddings.norm(dim=1).mean() if l2_reg else loss
    check_inputs(*checked)
    pos, neg = resolve_masks(labels, None if same_set else ref_lab, indices, batch, ref_size)
    if not bool(pos.any()):
        return zero_loss(embeddings, None if same_set else ref)
    sim = embeddings @ (embeddings if same_set else ref).T
    neg_lse, has_neg = masked_logsumexp(sim, neg, dim=1)
    # −log( e^{S_ij} / (e^{S_ij} + Σ_k e^{S_ik}) ) = softplus(log Σ_k e^{S_ik} − S_ij); 0 without negatives.
    terms = F.softplus(neg_lse.unsqueeze(1) - sim)
    keep = pos & has_neg.unsqueeze(1)
    total = torch.where(keep, terms, torch.zeros_like(terms)).sum()
    loss = total / pos.sum().to(total.dtype)
    if l2_reg:
        loss = loss + l2_reg * embeddings.norm(dim=1).mean()
    return loss


class _NPairCrossEntropy(torch.autograd.Function):
    r"""The N-pair batch's loss, :math:`\frac{1}{N} \sum_i [\log \sum_k e^{S_{ik}} - S_{ii}]` with
    :math:`S = A P^\top`: ``(A, P) = (x, ref)``, or with ``rows`` (2N distinct row indices of ``x``)
    ``A = x[rows[:N]]``, ``P = x[rows[N:]]``.

    The forward is one matmul and one log-softmax, whose exponential is the gradient
    :math:`G = (\mathrm{softmax}(S) - I)/N` w.r.t. ``S``; the backward is ``dA = G P``, ``dP = Gᵀ A``
    (with ``rows``: written into the rows of a zero gradient of ``x``), instead of autograd's gather,
    cross-entropy and scatter nodes. ``checked`` (the loss's four inputs) goes through the full
    :func:`check_inputs` only when the value is not finite.
    """

    @staticmethod
    def forward(ctx, x: Tensor, ref: Tensor | None, rows: Tensor | None, *checked: Tensor | None) -> Tensor:  # type: ignore[override]
        if rows is None:
            assert ref is not None
            first, a, p = x, x, ref
        else:
            first = x.index_select(0, rows)
            a, p = first.split(rows.shape[0] // 2)
        n = a.shape[0]
        log_prob = torch.log_softmax(a @ p.T, dim=1)
        total = -float(log_prob.diagonal().sum())
        _check_total(total, checked)
        g = log_prob.exp_().div_(n)
        g.diagonal().sub_(1.0 / n)
        ctx.save_for_backward(first, p, g, rows)
        ctx.x_shape = x.shape
        return torch.tensor(total / n, dtype=x.dtype, device=x.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        first, p, g, rows = ctx.saved_tensors
        g = g * grad
        if rows is None:
            return (g @ p, g.T @ first) + (None,) * 5
        n = g.shape[0]
        grad_rows = torch.cat([g @ p, g.T @ first[:n]])
        return (grad_rows.new_zeros(ctx.x_shape).index_copy_(0, rows, grad_rows),) + (None,) * 6


class _NPairNative(torch.autograd.Function):
    r"""``pairs="one_per_class"`` for a CPU float32 ``x`` and int64 labels (:func:`_npair_native`).

    With ``need_grad`` the gradient ``∂L/∂x`` is computed in the forward (the backward matmuls right
    after the forward one, no graph nodes in between) and handed over by the backward, scaled by the
    incoming gradient. At N = 128 the loss is three 128³ matmuls, and each tensor operation or autograd
    step around them costs 5–25 µs on this class of machine: the first backward gives its stored
    gradient away (autograd keeps it as ``x.grad`` without a copy); a second one (``retain_graph``)
    recomputes it. Under ``create_graph`` the result is once-differentiable (the gradient is not
    itself differentiable).
    """

    @staticmethod
    def forward(ctx, x: Tensor, labels: Tensor, lib, need_grad: bool, *checked: Tensor | None) -> Tensor:  # type: ignore[override]
        total, ctx.grad_x = _npair_native(x, labels, lib, need_grad, checked)
        ctx.lib = lib
        ctx.save_for_backward(x, labels)
        return torch.scalar_tensor(total, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph: a gradient that refuses to be differentiated
            return _once_backward(ctx, grad)
        return _npair_backward(ctx, grad)


def _npair_backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    grad_x, ctx.grad_x = ctx.grad_x, None
    if grad_x is None:  # a second backward through the same graph
        x, labels = ctx.saved_tensors
        grad_x = _npair_native(x, labels, ctx.lib, True, ())[1]
    scale = float(grad)
    return (grad_x if scale == 1.0 else grad_x.mul_(scale),) + (None,) * 7


_once_backward = torch.autograd.function.once_differentiable(_npair_backward)


def _npair_native(
    x: Tensor, labels: Tensor, lib, need_grad: bool, checked: tuple[Tensor | None, ...]
) -> tuple[float, Tensor | None]:
    r"""``pairs="one_per_class"``'s value (and ``∂L/∂x`` with ``need_grad``) for a CPU float32 ``x``
    and int64 labels: :class:`_NPairCrossEntropy` with C where torch has no single operation — the
    pairs (``dm_first_pairs``), the row gather (``dm_npair_gather``), the log-softmax and its gradient
    :math:`G` and :math:`G^\top` in one pass over ``S`` (``dm_npair_rows``), the scatter into a zero
    gradient (``dm_scatter_rows``). The three matmuls take row-major operands: ``S = A (Pᵀ)`` and one
    batched ``[G; Gᵀ] @ [P; A]``. Fewer than two classes with a pair (no negatives): 0."""
    x = x.contiguous()
    batch, d = x.shape
    rows = first_pair_rows(labels)  # (int64 CPU labels: its C pass)
    n = rows.shape[0] // 2
    if n < 2:
        check_inputs(*checked)  # type: ignore[arg-type]
        return 0.0, torch.zeros_like(x) if need_grad else None
    pa, pt = x.new_empty(2, n, d), x.new_empty(d, n)  # [P; A] and Pᵀ
    lib.dm_npair_gather(x.data_ptr(), rows.data_ptr(), n, d, pa.data_ptr(), pt.data_ptr())
    g = x.new_empty(2, n, n)
    torch.mm(pa[1], pt, out=g[0])
    # g[0] <- G = (softmax(S) - I) / n, g[1] <- Gᵀ
    total = lib.dm_npair_rows(g.data_ptr(), n, n, 1.0 / n, g.data_ptr() + 4 * n * n if need_grad else None)
    _check_total(total, checked)
    if not need_grad:
        return total / n, None
    grad_rows = torch.bmm(g, pa)  # [G P; Gᵀ A] = [∂L/∂A; ∂L/∂P], in the order of rows
    grad_x = x.new_empty(batch, d)
    lib.dm_scatter_rows(grad_rows.data_ptr(), rows.data_ptr(), 2 * n, d, grad_x.data_ptr(), batch)
    return total / n, grad_x


def _check_total(total: float, checked: tuple[Tensor | None, ...]) -> None:
    """Raise on a non-finite N-pair loss: the inputs' error if they hold NaN / inf (``checked``: the
    loss's four inputs), else an overflow."""
    if not math.isfinite(total):
        if checked:
            check_inputs(*checked)  # type: ignore[arg-type]
        raise NonFiniteError("N-pair similarities overflow: the embeddings' dot products are not finite")


def _is_n_pair_batch(labels: Tensor, ref_labels: Tensor, indices: Indices | None, same_set: bool) -> bool:
    """Whether ``(embeddings, ref_embeddings)`` is an N-pair batch: labels distinct (N ≥ 2) and
    ``ref_labels == labels`` elementwise, no mined indices."""
    if same_set or indices is not None or labels.shape != ref_labels.shape or labels.numel() < 2:
        return False
    if labels.is_floating_point() or not torch.equal(labels, ref_labels.to(labels.device)):
        return False
    values = labels.tolist()  # (N values: a set is cheaper than a tensor sort at any useful N)
    return len(set(values)) == len(values)


@LOSSES.register("n_pair")
class NPairLoss(nn.Module):
    r"""Multi-class N-pair loss: each positive pair against all other-class samples at once.

    Similarity-native: :math:`S_{ij} = f(x_i)^\top f(x_j)`, the **dot product of un-normalised
    embeddings** (as in the paper; the L2 penalty keeps norms in check).

    $$ L = \frac{-1}{|P|} \sum_{(i,j) \in P} \log \frac{e^{S_{ij}}}{e^{S_{ij}}
       + \sum_{k:\, y_k \ne y_i} e^{S_{ik}}} + \frac{\lambda}{m} \sum_{i=1}^{m} \lVert f(x_i) \rVert_2 $$

    Batch construction (the generalisation of the paper's N-pair batches to a P×K batch, as written
    in the survey formula above): every ordered positive pair :math:`(i, j)` of the batch (self
    excluded) is an (anchor, positive) and **every** other-class sample is a negative for it; with
    mined ``indices`` the positive pairs and each anchor's negatives are those given. The paper's
    original N-pair batch (one pair per class, the other classes' *positives* as negatives) is
    obtained by passing the N anchors as ``embeddings`` and their N positives as ``ref_embeddings``
    (labels = class ids), or, from a labelled batch, by ``pairs="one_per_class"``: the first two
    samples of each class (in batch order) are its (anchor, positive), the anchors' negatives are the
    other classes' positives, and classes with one sample take no part (PML's ``NPairsLoss``).
    :math:`m` is the batch size (``embeddings``' rows); the regulariser uses the (unsquared) L2 norm
    as in that formula.

    Reference:
        K. Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective",
        NeurIPS (NIPS) 2016.

    Args:
        l2_reg: :math:`\lambda`, weight of the embedding-norm penalty (0.002, the value used with
            the N-pair objective in TensorFlow's reference ``npairs_loss``; 0 disables it).
        pairs: ``"all"`` (every positive pair of the batch, above) or ``"one_per_class"`` (the
            paper's N-pair batch taken from a labelled batch; no ``indices`` or ``ref_embeddings``).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``; ``ref_embeddings`` ``(R, D)``, ``ref_labels`` ``(R,)``;
        output: scalar. A batch with no positive pair returns 0 (with a graph; the penalty is then
        not added either); with ``pairs="one_per_class"``, fewer than two classes with a pair give
        a cross-entropy term of 0 and the penalty alone.

    Requirements:
        ≥ 2 samples per class (K ≥ 2) and ≥ 2 classes per batch. Do not L2-normalise the embeddings
        (the paper does not; normalised inputs make the penalty a constant).

    Example:
        >>> import torch
        >>> loss_fn = NPairLoss(l2_reg=0.002)
        >>> emb = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(emb, labels)
        >>> loss.backward()
        >>> bool(loss > 0)
        True
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(self, l2_reg: float = 0.002, pairs: PairMode = "all") -> None:
        super().__init__()
        if l2_reg < 0:
            raise ConfigError(f"l2_reg must be >= 0; got {l2_reg}")
        if pairs not in _PAIR_MODES:
            raise ConfigError(f"pairs must be one of {_PAIR_MODES}; got {pairs!r}")
        self.l2_reg = float(l2_reg)
        self.pairs: PairMode = pairs

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """Loss over all positive pairs of the batch, or over the pairs named by ``indices``."""
        return n_pair_loss(
            embeddings, labels, indices, ref_embeddings, ref_labels, l2_reg=self.l2_reg, pairs=self.pairs
        )

    def extra_repr(self) -> str:
        return f"l2_reg={self.l2_reg}, pairs={self.pairs!r}"
