"""Multi-similarity loss (Wang et al.) on cosine similarities of all or mined pairs."""
from __future__ import annotations

import ctypes
import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.errors import ConfigError, DataError
from deepmetric.losses._fused import native_gram_loss
from deepmetric.losses._native_rows import int32_labels, pair_rows_lib
from deepmetric.losses._pairs import (
    BLOCK_ELEMS,
    PairKernel,
    fused_pair_loss,
    has_positive_label_pair,
    label_positive_pairs,
    resolve_pair_lists,
)
from deepmetric.registry import LOSSES
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["MultiSimilarityLoss", "multi_similarity_loss"]


#: Entries per row block of the fused kernel (see :data:`deepmetric.losses._pairs.BLOCK_ELEMS`).
_BLOCK = BLOCK_ELEMS

#: Positive pairs go in index lists up to this fraction of all pairs (dense masks beyond).
_PAIR_LIST_FRACTION = 1 / 8


class _MultiSimilarityKernel(PairKernel):
    """Both log-sum-exp terms of every anchor and their gradient w.r.t. the similarity matrix.

    For anchor ``i`` with ``E⁺_ik = e^{−α(S_ik − λ)}`` (positives) and ``E⁻_ik = e^{β(S_ik − λ)}``
    (negatives), ``s± = Σ_k E±_ik``: the loss adds ``log(1 + s⁺)/α + log(1 + s⁻)/β`` and
    ``∂/∂S_ik = −E⁺_ik/(1 + s⁺)`` resp. ``E⁻_ik/(1 + s⁻)``. Rows are processed in blocks.

    Sparse path (the exponents are bounded because ``|S| ≤ 1``): the negatives are dense —
    ``e^{βS}`` on the block (the constant ``e^{−βλ}`` goes into the per-row factors), zeroed off
    the negative pairs — and the positives, a short index list (:func:`label_positive_pairs` or the
    mined positive pairs), are evaluated on their own and added to the gradient. Otherwise (large
    ``α``/``β``) each part is shifted by its row maximum (``max(0, max_k a_ik)``) on dense masks.
    """

    def __init__(
        self,
        *,
        alpha: float,
        beta: float,
        base: float,
        batch: int,
        width: int,
        dtype: torch.dtype,
        same: bool = False,
        pairs: tuple[Tensor, Tensor, Tensor] | None = None,
        labels: Tensor | None = None,
        col_labels: Tensor | None = None,
        pos: Tensor | None = None,
        neg: Tensor | None = None,
        mine_epsilon: float | None = None,
    ) -> None:
        self.alpha, self.beta, self.base = alpha, beta, base
        self.mine_epsilon = mine_epsilon  # label mode only: apply the MS miner's ε-rule inside the blocks
        self.batch = batch
        self.same = same
        self.pairs = pairs
        self.labels, self.col_labels = labels, col_labels
        self.pos, self.neg = pos, neg
        self.dtype = dtype
        # |S| <= 1 (+ rounding): e^{βS} stays finite, also summed over a row, and normal.
        limit = math.log(torch.finfo(dtype).max) - math.log(width + 1.0) - 2.0
        self.sparse = (
            pairs is not None and beta * 1.01 < limit and beta * abs(base) < 600 and alpha * (1 + abs(base)) < 600
        )
        self.total = 0.0

    def block(self, s: Tensor, r0: int, r1: int, c0: int) -> Tensor | None:
        if self.sparse:
            return self._block_sparse(s, r0, r1)
        return self._block_shifted(s, r0, r1)

    def _block_sparse(self, s: Tensor, r0: int, r1: int) -> Tensor | None:
        assert self.pairs is not None
        rows, cols, ptr = self.pairs
        lo, hi = int(ptr[r0]), int(ptr[r1])
        pr, pc = rows[lo:hi] - r0, cols[lo:hi]
        if self.mine_epsilon is not None:
            return self._block_mined(s, r0, r1, pr, pc)
        sim_p = s[pr, pc].double()
        e = s.mul_(self.beta).exp_()  # e^{βS}
        if self.neg is not None:
            e.mul_(self.neg[r0:r1])
        else:  # label pairs: everything but the positives and self
            e[pr, pc] = 0.0
            if self.same:
                e[:, r0:r1].fill_diagonal_(0.0)
        return self._sparse_terms(e, sim_p, pr, pc)

    def _block_mined(self, s: Tensor, r0: int, r1: int, pr: Tensor, pc: Tensor) -> Tensor | None:
        """:meth:`_block_sparse` on the pairs the multi-similarity miner keeps (label mode), found in the
        block itself: a negative ``(a, n)`` is kept iff ``S_an + ε > min_p S_ap``, a positive iff
        ``S_ap − ε < max_n S_an`` (same comparisons, same dtype as the miner)."""
        eps = float(self.mine_epsilon)  # type: ignore[arg-type]
        s_ap = s[pr, pc]
        hardest_pos = torch.full((r1 - r0,), float("inf"), dtype=s.dtype, device=s.device)
        hardest_pos.scatter_reduce_(0, pr, s_ap, "amin")  # least similar positive (+inf: none)
        s[pr, pc] = float("-inf")  # positives and self leave the negative side (and become e^{-inf} = 0)
        if self.same:
            s[:, r0:r1].fill_diagonal_(float("-inf"))
        hardest_neg = s.amax(1)  # most similar negative (-inf: none)
        keep = s_ap - eps < hardest_neg[pr]
        pr, pc, sim_p = pr[keep], pc[keep], s_ap[keep].double()
        drop = torch.le(s + eps, hardest_pos.unsqueeze(1))  # negatives not kept (and the -inf cells)
        e = s.mul_(self.beta).exp_().masked_fill_(drop, 0.0)  # e^{βS} on the kept negatives
        return self._sparse_terms(e, sim_p, pr, pc)

    def _sparse_terms(self, e: Tensor, sim_p: Tensor, pr: Tensor, pc: Tensor) -> Tensor | None:
        """Both terms from ``e = e^{βS}`` (0 off the negatives) and the positives' similarities
        ``sim_p`` at block rows ``pr``, columns ``pc``: adds the value; returns ``∂L/∂S`` (in ``e``)."""
        shift = math.exp(-self.beta * self.base)
        s_neg = e.sum(1).double().mul_(shift)
        e_pos = torch.exp((sim_p - self.base) * -self.alpha)
        s_pos = torch.zeros(e.shape[0], dtype=torch.float64, device=e.device).index_add_(0, pr, e_pos)
        self.total += float(torch.log1p(s_pos).sum() / self.alpha + torch.log1p(s_neg).sum() / self.beta)
        if not self.need_grad:
            return None
        # G = E⁻/(1 + s⁻) − E⁺/(1 + s⁺)
        e.mul_((s_neg.add_(1.0).reciprocal_().mul_(shift)).to(e.dtype).unsqueeze(1))
        g_pos = (e_pos / s_pos.add_(1.0)[pr]).neg_().to(e.dtype)
        return e.index_put_((pr, pc), g_pos, accumulate=True)

    def _masks(self, r0: int, r1: int) -> tuple[Tensor, Tensor | None]:
        """``(positive, negative)`` masks of rows ``r0:r1``; label mode: ``(same class, None)``
        (the negatives are the complement; self-pairs are removed from the values instead)."""
        if self.labels is not None:
            assert self.col_labels is not None
            return self.labels[r0:r1].unsqueeze(1) == self.col_labels.unsqueeze(0), None
        assert self.pos is not None and self.neg is not None
        return self.pos[r0:r1], self.neg[r0:r1]

    def _part(self, s: Tensor, mask: Tensor | None, p: Tensor, coef: float, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """One part with a row shift: (``E/(e^{−m} + Σ E)`` with shift ``m``, per-row log term)."""
        logits = (s - self.base).mul_(coef)
        ninf = torch.full((), float("-inf"), dtype=s.dtype, device=s.device)
        if mask is None:  # label mode, negatives: the complement of p
            logits.masked_fill_(p, float("-inf"))
        else:
            torch.where(mask, logits, ninf, out=logits)
            if self.labels is not None and self.same:
                logits[:, r0:r1].fill_diagonal_(float("-inf"))
        shift = logits.amax(1, keepdim=True).clamp_min_(0.0)  # -inf (empty row) -> 0
        e = logits.sub_(shift).exp_()
        denom = torch.exp(-shift).add_(e.sum(1, keepdim=True))
        term = shift + torch.log(denom)
        return e.div_(denom), term

    def _block_shifted(self, s: Tensor, r0: int, r1: int) -> Tensor | None:
        p, n = self._masks(r0, r1)
        gp, tp = self._part(s, p, p, -self.alpha, r0, r1)
        gn, tn = self._part(s, n, p, self.beta, r0, r1)
        self.total += float((tp.sum(dtype=torch.float64) / self.alpha) + (tn.sum(dtype=torch.float64) / self.beta))
        if not self.need_grad:
            return None
        return gn.sub_(gp)

    def finish(self) -> tuple[Tensor, float, list[Tensor] | None]:
        value = torch.tensor(self.total / self.batch, dtype=self.dtype)
        return value, 1.0 / self.batch, None


def multi_similarity_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 1.0,
    miner: nn.Module | None = None,
) -> Tensor:
    """Functional form of :class:`MultiSimilarityLoss` (same arguments).

    One fused pass over the cosine-similarity matrix (row blocks) computes the loss and ``∂L/∂S``;
    the backward is a matmul per block. A batch against itself with label pairs on CPU float32
    (``β <= 80``) does the row work in a C kernel (:func:`_native_kernel`).
    """
    same_set = ref_embeddings is None
    ref, ref_lab = check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    batch, ref_size = embeddings.shape[0], ref.shape[0]
    common = dict(
        alpha=float(alpha), beta=float(beta), base=float(base), batch=batch, width=ref_size, dtype=embeddings.dtype
    )
    col_lab = labels if same_set else ref_lab
    if miner is not None:
        if indices is not None:
            raise DataError("pass either indices= (mined pairs) or miner=, not both")
        fused = _fused_mining(embeddings, labels, ref, ref_lab, same_set, miner, common)
        if fused is not None:
            return fused
        with torch.no_grad():
            indices = miner(embeddings.detach(), labels) if same_set else miner(
                embeddings.detach(), labels, ref.detach(), ref_lab)
    lib = pair_rows_lib(embeddings) if same_set and indices is None and beta <= _NATIVE_MAX_BETA else None
    if lib is not None:
        return native_gram_loss(embeddings, _native_kernel(lib, int32_labels(labels), **common))
    if indices is None:
        limit = int(_PAIR_LIST_FRACTION * batch * ref_size)
        pairs = label_positive_pairs(labels, None if same_set else ref_lab, max_pairs=limit)
        if pairs is None:
            if not has_positive_label_pair(labels, None if same_set else ref_lab):
                return zero_loss(embeddings, None if same_set else ref)
        elif pairs[0].numel() == 0:
            return zero_loss(embeddings, None if same_set else ref)
        kernel = _MultiSimilarityKernel(pairs=pairs, labels=labels, col_labels=col_lab, same=same_set, **common)
        if not kernel.sparse:  # dense label masks, row-shifted
            kernel.pairs = None
    else:
        pairs, neg = resolve_pair_lists(labels, indices, batch, ref_size)
        if pairs[0].numel() == 0:
            return zero_loss(embeddings, None if same_set else ref)
        kernel = _MultiSimilarityKernel(pairs=pairs, neg=neg, **common)
        if not kernel.sparse:  # dense masks, row-shifted
            pos = torch.zeros_like(neg)
            pos[pairs[0], pairs[1]] = True
            kernel.pos, kernel.pairs = pos, None
    return fused_pair_loss(embeddings, None if same_set else ref, "dot", kernel, block_elems=_BLOCK, normalize=True)


#: The native path holds e^{βS} (|S| <= 1) and its row sums in float32: β up to 80.
_NATIVE_MAX_BETA = 80.0


def _native_kernel(lib, lab: Tensor, *, alpha: float, beta: float, base: float, **_):
    """Same set, label pairs, in C, for :func:`~deepmetric.losses._fused.native_gram_loss`: one GEMM
    scaled by ``β`` and torch's vectorised ``exp`` give ``E = e^{βS}``; ``dm_ms_rows`` adds the loss
    up (the positives' similarities read back as ``log(E)/β``) and writes the symmetric gradient of
    both sides over ``E``, row by row. A batch without positive pairs gives 0 and a zero gradient,
    as the blocked path."""

    def run(unit: Tensor, _need_grad: bool) -> tuple[Tensor, float, float | None]:
        batch = unit.shape[0]
        grad = torch.addmm(unit.new_zeros(()), unit, unit.T, beta=0.0, alpha=beta).exp_()
        fp, fn = torch.empty(batch), torch.empty(batch)
        stats = (ctypes.c_double * 2)()
        lib.dm_ms_rows(grad.data_ptr(), batch, grad.stride(0), lab.data_ptr(), alpha, beta, base, fp.data_ptr(),
                       fn.data_ptr(), ctypes.addressof(stats))
        return grad, stats[0], float(batch) if stats[1] else None

    return run


def _fused_mining(
    embeddings: Tensor, labels: Tensor, ref: Tensor, ref_lab: Tensor, same_set: bool, miner: nn.Module,
    common: dict,
) -> Tensor | None:
    """The loss on the pairs a :class:`~deepmetric.miners.MultiSimilarityMiner` (no cap) keeps, mined
    inside the loss's similarity blocks (no pair lists); ``None`` where that path does not apply."""
    from deepmetric.miners.multi_similarity import MultiSimilarityMiner

    if not isinstance(miner, MultiSimilarityMiner) or miner.tuples_per_anchor is not None:
        return None
    batch, ref_size = embeddings.shape[0], ref.shape[0]
    pairs = label_positive_pairs(labels, None if same_set else ref_lab, max_pairs=int(_PAIR_LIST_FRACTION * batch * ref_size))
    if pairs is None:
        return None
    if pairs[0].numel() == 0:
        return zero_loss(embeddings, None if same_set else ref)
    kernel = _MultiSimilarityKernel(
        pairs=pairs, labels=labels, col_labels=labels if same_set else ref_lab, same=same_set,
        mine_epsilon=miner.epsilon, **common,
    )
    if not kernel.sparse:
        return None
    return fused_pair_loss(embeddings, None if same_set else ref, "dot", kernel, block_elems=_BLOCK, normalize=True)


@LOSSES.register("multi_similarity")
class MultiSimilarityLoss(nn.Module):
    r"""Multi-similarity loss: soft-weights every positive and negative pair of an anchor at once.

    Similarity-native: :math:`S_{ik}` is the **cosine similarity** (larger = closer), as in the paper.

    $$ L = \frac{1}{m} \sum_{i=1}^{m} \Big\{ \frac{1}{\alpha} \log\Big[1 + \sum_{k \in P_i}
       e^{-\alpha (S_{ik} - \lambda)}\Big] + \frac{1}{\beta} \log\Big[1 + \sum_{k \in N_i}
       e^{\beta (S_{ik} - \lambda)}\Big] \Big\} $$

    :math:`m` is the batch size (anchors without pairs contribute 0 but count), :math:`P_i` /
    :math:`N_i` the positive / negative pairs of anchor :math:`i`: all of them (self excluded), or
    those named by mined ``indices`` (the paper mines pairs with its ε-rule before weighting; that
    step is the separate ``multi_similarity`` miner — pass its output as ``indices``, or pass the miner
    itself as ``miner=``: then, for a :class:`~deepmetric.miners.MultiSimilarityMiner` without a cap,
    the ε-rule is applied inside the loss's similarity blocks and no pair list is built; the value and
    gradients are those of mining first. The trainer calls it that way).

    Reference:
        X. Wang, X. Han, W. Huang, D. Dong, M. R. Scott, "Multi-Similarity Loss with General Pair
        Weighting for Deep Metric Learning", CVPR 2019.

    Args:
        alpha: :math:`\alpha`, scale of the positive part (paper: 2).
        beta: :math:`\beta`, scale of the negative part (paper: 50).
        base: :math:`\lambda`, the similarity margin (paper: 1, with α = 2, β = 50). The authors'
            released configuration and pytorch-metric-learning use 0.5 (PML calls it ``base``). With
            λ = 1 the negative term :math:`e^{\beta (S - 1)}` is near 0 unless a negative is almost
            identical, so little pushes classes apart: on scikit-learn digits (tests/test_trainability.py
            setting) held-out MAP@R was 0.536 with λ = 1 against 0.655 with λ = 0.5.

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``; ``ref_embeddings`` ``(R, D)``, ``ref_labels`` ``(R,)``;
        output: scalar. A batch with no positive pair returns 0 (with a graph).

    Requirements:
        ≥ 2 samples per class for positive pairs (P×K sampling). Embeddings need not be normalised
        (cosine similarity normalises them).

    Example:
        >>> import torch
        >>> loss_fn = MultiSimilarityLoss()
        >>> emb = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(emb, labels)
        >>> loss.backward()
        >>> bool(torch.isfinite(emb.grad).all())
        True
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"
    fuses_miner: ClassVar[bool] = True  # forward(..., miner=m) mines itself

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 1.0) -> None:
        super().__init__()
        if alpha <= 0 or beta <= 0:
            raise ConfigError(f"alpha and beta must be > 0; got alpha={alpha}, beta={beta}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.base = float(base)

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
        """Loss over all pairs of the batch, over the pairs named by ``indices``, or over the pairs
        ``miner`` keeps (``miner=``; fused for the multi-similarity miner, see above)."""
        return multi_similarity_loss(
            embeddings,
            labels,
            indices,
            ref_embeddings,
            ref_labels,
            alpha=self.alpha,
            beta=self.beta,
            base=self.base,
            miner=miner,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, base={self.base}"
