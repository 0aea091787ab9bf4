"""Lifted structured loss (Oh Song et al.), the smooth upper bound over all pairs of a batch."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.losses._pairs import (
    PairKernel,
    check_distance,
    fused_pair_loss,
    label_positive_pairs,
    resolve_masks,
)
from deepmetric.registry import LOSSES
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["LiftedStructureLoss", "lifted_structure_loss"]


#: Positive pairs go in index lists up to this fraction of all pairs (dense masks beyond).
_PAIR_LIST_FRACTION = 1 / 8


class _LiftedKernel(PairKernel):
    """Lifted structured loss and its gradient w.r.t. the whole distance matrix ``D`` (one block).

    Row (and column) log-sum-exps ``r_i = log Σ_{(i,k) ∈ N} e^{α − D_ik}`` are computed densely
    with a max shift; the positive pairs (a short index list) are handled on their own:
    ``J̃_ij = logaddexp(r_i, c_j) + D_ij``, ``∂L/∂J̃_ij = [J̃_ij]₊ / |P|``, and
    ``∂L/∂D_ik = [(i,k) ∈ P] ∂L/∂J̃_ik − g_i·softmax_k(α − D_i·) − g'_k·softmax_i(α − D_·k)`` with
    ``g_i = Σ_j ∂L/∂J̃_ij σ(r_i − c_j)`` (rows) and ``g'_j = Σ_i ∂L/∂J̃_ij σ(c_j − r_i)`` (columns;
    the same as the rows when the reference set is the batch).

    Label pairs of a batch against itself (``pairs``, no masks): the negatives are every entry but
    the positives and the diagonal (distance ``+inf`` there), so no ``(B, B)`` mask is built.
    """

    def __init__(
        self,
        *,
        margin: float,
        kind: str,
        same: bool,
        pos: Tensor | None = None,
        neg: Tensor | None = None,
        pairs: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        self.margin, self.kind, self.same = margin, kind, same
        self.pos, self.neg, self.pairs = pos, neg, pairs
        self.result: tuple[Tensor, float] | None = None

    def prepare(self, d2: Tensor, r0: int, r1: int, c0: int) -> None:
        if self.pairs is not None:
            d2.fill_diagonal_(float("inf"))  # not a pair (and no near-zero distance)

    def _lse(self, d: Tensor, mask: Tensor | None, dim: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(e^{l − peak} (0 off the mask), their sums (1 if none), lse)`` along ``dim``; without
        a mask the label negatives (see the class docstring)."""
        logits = torch.rsub(d, self.margin)
        if mask is not None:
            torch.where(mask, logits, torch.full((), float("-inf"), dtype=d.dtype, device=d.device), out=logits)
        else:
            assert self.pairs is not None
            rows, cols, _ = self.pairs
            logits[rows, cols] = float("-inf")
            logits.fill_diagonal_(float("-inf"))
        peak = logits.amax(dim, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        e = logits.sub_(peak).exp_()
        total = e.sum(dim, keepdim=True)
        safe = torch.where(total > 0, total, torch.ones_like(total))
        return e, safe, (torch.log(safe) + peak).squeeze(dim)

    def block(self, d: Tensor, r0: int, r1: int, c0: int) -> Tensor | None:
        assert r0 == 0 and c0 == 0 and r1 == d.shape[0], "the lifted kernel takes the whole matrix"
        very_negative = torch.finfo(d.dtype).min / 4
        if self.pairs is not None:
            if self.kind not in ("euclidean", "squared_euclidean"):
                d.fill_diagonal_(float("inf"))  # (euclidean kinds: done on d² by prepare)
            a, p, ptr = self.pairs
            n_pos = a.numel()
            e_row, s_row, r = self._lse(d, None, 1)
            # row i has a negative unless its class fills the whole batch
            row_any = (ptr[1:] - ptr[:-1]).to(d.device) < d.shape[1] - 1
            e_col = s_col = None
            c, col_any = r, row_any
        else:
            assert self.pos is not None and self.neg is not None
            pos, neg = self.pos, self.neg
            # Negative pairs are unordered when the reference set is the batch: (j, l) ∈ N either way.
            neg_rows = neg | neg.T if self.same else neg
            row_any = neg_rows.any(1)
            e_row, s_row, r = self._lse(d, neg_rows, 1)
            if self.same:
                e_col = s_col = None
                c, col_any = r, row_any
            else:
                col_any = neg.any(0)
                e_col, s_col, c = self._lse(d, neg, 0)
            n_pos = int(pos.sum())
            a, p = pos.nonzero(as_tuple=True)
        r = torch.where(row_any, r, torch.full_like(r, very_negative))
        if e_col is not None:
            c = torch.where(col_any, c, torch.full_like(c, very_negative))
        else:
            c = r
        keep = row_any[a] | col_any[p]  # a positive pair without any negative contributes 0
        a, p = a[keep], p[keep]
        ra, cp = r[a], c[p]
        lae = torch.logaddexp(ra, cp)
        t = (lae + d[a, p]).relu_()
        total = (t * t).sum()
        self.result = (total / (2.0 * n_pos), 1.0 / n_pos)
        if not self.need_grad:
            return None
        # ∂L/∂J̃ = t / |P| (1/|P| in the scale)
        g_row = torch.zeros_like(r).index_add_(0, a, t * torch.exp(ra - lae))
        g_col = torch.zeros_like(c).index_add_(0, p, t * torch.exp(cp - lae))
        if e_col is None:
            g_row.add_(g_col)
        grad = e_row.mul_(g_row.div_(s_row.squeeze(1)).neg_().unsqueeze(1))
        if e_col is not None and s_col is not None:
            grad.addcmul_(e_col, g_col.div_(s_col.squeeze(0)).unsqueeze(0), value=-1.0)
        return grad.index_put_((a, p), t, accumulate=True)

    def finish(self) -> tuple[Tensor, float, list[Tensor] | None]:
        assert self.result is not None
        value, scale = self.result
        return value, scale, None


def lifted_structure_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin: float = 1.0,
    distance: str = "euclidean",
) -> Tensor:
    """Functional form of :class:`LiftedStructureLoss` (same arguments).

    One fused pass over the distance matrix computes the loss and ``∂L/∂D``; the backward is a
    matmul per side.
    """
    check_distance(distance)
    same_set = ref_embeddings is None
    ref, ref_lab = check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    batch, ref_size = embeddings.shape[0], ref.shape[0]
    pairs = None
    if indices is None and same_set:
        pairs = label_positive_pairs(labels, max_pairs=int(_PAIR_LIST_FRACTION * batch * batch))
        if pairs is not None and pairs[0].numel() == 0:
            return zero_loss(embeddings)
    if pairs is not None:
        kernel = _LiftedKernel(margin=float(margin), kind=distance, same=True, pairs=pairs)
    else:
        pos, neg = resolve_masks(labels, None if same_set else ref_lab, indices, batch, ref_size)
        if not bool(pos.any()):
            return zero_loss(embeddings, None if same_set else ref)
        kernel = _LiftedKernel(margin=float(margin), kind=distance, same=same_set, pos=pos, neg=neg)
    y = None if same_set else ref
    return fused_pair_loss(embeddings, y, distance, kernel, block_elems=0, normalize=distance == "cosine")


@LOSSES.register("lifted_structure")
class LiftedStructureLoss(nn.Module):
    r"""Lifted structured loss: each positive pair against all negatives of both its ends (smooth form).

    $$ \tilde J_{ij} = \log\Big( \sum_{(i,k) \in N} e^{\alpha - D_{ik}} + \sum_{(j,l) \in N}
       e^{\alpha - D_{jl}} \Big) + D_{ij}, \qquad
       L = \frac{1}{2|P|} \sum_{(i,j) \in P} [\tilde J_{ij}]_{+}^{2} $$

    :math:`D` is the euclidean distance, :math:`P` the positive pairs and :math:`N` the negative
    pairs of the batch (all of them, or those named by mined ``indices``; negative pairs are
    unordered, so a mined ``(j, l)`` also counts as ``(l, j)``). :math:`P` is taken as ordered
    pairs; since :math:`\tilde J_{ij} = \tilde J_{ji}` this equals the paper's average over
    unordered pairs. With ``ref_embeddings`` the negatives of a batch element are references and
    those of a reference element are batch elements. A positive pair without any negative has
    :math:`\log 0 = -\infty` and contributes 0. This is the paper's smooth bound (the objective it
    optimises), not the "generalized" lifted loss of Hermans et al. (2017).

    Reference:
        H. Oh Song, Y. Xiang, S. Jegelka, S. Savarese, "Deep Metric Learning via Lifted Structured
        Feature Embedding", CVPR 2016.

    Args:
        margin: :math:`\alpha` (paper: 1).
        distance: ``"euclidean"`` (paper, default), ``"squared_euclidean"`` or ``"cosine"``.

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``; ``ref_embeddings`` ``(R, D)``, ``ref_labels`` ``(R,)``;
        output: scalar. A batch with no positive pair returns 0 (with a graph).

    Requirements:
        ≥ 2 samples per class for positive pairs and ≥ 2 classes per batch (P×K sampling).

    Example:
        >>> import torch
        >>> loss_fn = LiftedStructureLoss(margin=1.0)
        >>> emb = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(emb, labels)
        >>> loss.backward()
        >>> bool(loss > 0)
        True
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(self, margin: float = 1.0, distance: str = "euclidean") -> None:
        super().__init__()
        self.margin = float(margin)
        self.distance = check_distance(distance)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """Loss over all pairs of the batch, or over the pairs named by ``indices``."""
        return lifted_structure_loss(
            embeddings, labels, indices, ref_embeddings, ref_labels, margin=self.margin, distance=self.distance
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, distance={self.distance!r}"
