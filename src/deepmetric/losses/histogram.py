"""Histogram loss (Ustinova & Lempitsky, NeurIPS 2016)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.distances import cosine_similarity
from deepmetric.errors import ConfigError
from deepmetric.losses._pairs import (
    BLOCK_ELEMS,
    PairKernel,
    fused_pair_loss,
    has_negative_label_pair,
    has_positive_label_pair,
    label_positive_pairs,
)
from deepmetric.registry import LOSSES
from deepmetric.tuples import Indices, check_inputs, label_masks, pair_masks_from_indices, zero_loss

__all__ = ["HistogramLoss", "histogram_loss", "soft_histogram"]


def soft_histogram(values: Tensor, num_nodes: int) -> Tensor:
    """Normalised soft histogram of ``values`` in [-1, 1] with linear interpolation between nodes.

    The nodes are ``t_r = -1 + (r - 1) Δ`` for ``r = 1..R`` with ``Δ = 2 / (R - 1)``; a value in
    ``[t_r, t_{r+1}]`` gives weight ``(t_{r+1} - s) / Δ`` to node ``r`` and ``(s - t_r) / Δ`` to node
    ``r + 1``. Built with ``scatter_add`` (memory O(len(values) + R)), differentiable in ``values``.

    Args:
        values: 1-D tensor of similarities (clamped to [-1, 1]).
        num_nodes: R, the number of histogram nodes (≥ 2).

    Returns:
        ``(R,)`` tensor summing to 1 (all zeros when ``values`` is empty).
    """
    step = 2.0 / (num_nodes - 1)
    pos = (values.clamp(-1.0, 1.0) + 1.0) / step
    lower = pos.detach().floor().clamp(0, num_nodes - 2).long()
    frac = pos - lower.to(pos.dtype)  # in [0, 1]: weight of the upper node
    hist = values.new_zeros(num_nodes)
    hist = hist.scatter_add(0, lower, 1.0 - frac).scatter_add(0, lower + 1, frac)
    return hist / max(values.numel(), 1)


#: Entries per row block of the fused kernel (see :data:`deepmetric.losses._pairs.BLOCK_ELEMS`).
_BLOCK = BLOCK_ELEMS

#: Positive pairs go in index lists up to this fraction of all pairs (dense masks beyond).
_PAIR_LIST_FRACTION = 1 / 8


class _HistogramKernel(PairKernel):
    """Both soft histograms and the gradient w.r.t. the similarity matrix, in two phases.

    Phase 1 (per block): every entry gets a bin ``l`` (the lower node), its interpolation weight
    ``f`` and a segment — negative pair, positive pair, the same two +2 if its similarity was
    clamped to [−1, 1], or 4 = not a pair — and two ``bincount`` calls accumulate the counts and the
    sums of ``f`` per (segment, bin), from which ``h_r = (n_r − F_r + F_{r−1}) / N``. Label pairs:
    every entry starts as a negative pair and the positives (a short index list) are moved.
    Phase 2: with ``L = Σ_r h⁻_r Φ⁺_r``, an entry in bin ``l`` has ``∂L/∂s = −h⁻_l / (Δ N⁺)``
    (positive pair) or ``h⁺_{l+1} / (Δ N⁻)`` (negative pair), 0 if clamped: one table lookup.
    """

    def __init__(
        self,
        *,
        num_nodes: int,
        dtype: torch.dtype,
        pairs: tuple[Tensor, Tensor, Tensor] | None = None,
        upper: bool = False,
        pos: Tensor | None = None,
        neg: Tensor | None = None,
    ) -> None:
        self.nodes = num_nodes
        self.dtype = dtype
        self.pairs, self.upper = pairs, upper
        self.pos, self.neg = pos, neg
        self.counts: Tensor | None = None
        self.weights: Tensor | None = None
        self.bins: list[Tensor] = []
        self.tri: dict[int, Tensor] = {}

    def block(self, s: Tensor, r0: int, r1: int, c0: int) -> Tensor | None:
        nodes = self.nodes
        step = 2.0 / (nodes - 1)
        nb = r1 - r0
        tri = None
        if self.upper:  # the diagonal block: keep its strict upper triangle only
            tri = self.tri.get(nb)
            if tri is None:
                tri = self.tri[nb] = torch.ones(nb, nb, dtype=torch.bool, device=s.device).tril_()
            s[:, :nb].masked_fill_(tri, 0.0)
        lo, hi = torch.aminmax(s)
        oob = None
        if float(lo) < -1.0 or float(hi) > 1.0:
            oob = (s < -1.0).logical_or_(s > 1.0)  # the clamp blocks the gradient there
            s.clamp_(-1.0, 1.0)
        t = s.add_(1.0).div_(step)  # >= 0
        idx = t.to(torch.long).clamp_(max=nodes - 2)  # floor, clamped to [0, R − 2]
        frac = t.sub_(idx)
        # segments: 0 negative, 1 positive, 2 / 3 the same clamped, 4 not a pair
        if self.pairs is not None:
            rows, cols, ptr = self.pairs
            a, b = int(ptr[r0]), int(ptr[r1])
            pr, pc = rows[a:b], cols[a:b]  # (upper: the list holds j > i only)
            idx.index_put_((pr - r0, pc - c0), torch.full((), nodes, dtype=torch.long), accumulate=True)
        else:
            assert self.pos is not None and self.neg is not None
            p, n = self.pos[r0:r1, c0:], self.neg[r0:r1, c0:]
            idx.add_(p, alpha=nodes)
            idx.masked_fill_(~(p | n), 4 * nodes)
        if oob is not None:
            idx.add_(oob, alpha=2 * nodes).clamp_(max=5 * nodes - 1)
            del oob
        if tri is not None:
            idx[:, :nb].masked_fill_(tri, 4 * nodes)
        flat = idx.view(-1)
        counts = torch.bincount(flat, minlength=5 * nodes)[: 5 * nodes]
        weights = torch.bincount(flat, weights=frac.view(-1), minlength=5 * nodes)[: 5 * nodes]
        self.counts = counts if self.counts is None else self.counts.add_(counts)
        self.weights = weights if self.weights is None else self.weights.add_(weights)
        if self.need_grad:
            self.bins.append(idx)
        return None

    def _hist(self, seg: int) -> tuple[Tensor, float]:
        assert self.counts is not None and self.weights is not None
        r = self.nodes
        cnt = (self.counts[seg * r : (seg + 1) * r] + self.counts[(seg + 2) * r : (seg + 3) * r]).double()
        w = (self.weights[seg * r : (seg + 1) * r] + self.weights[(seg + 2) * r : (seg + 3) * r]).double()
        total = float(cnt.sum())
        h = cnt - w
        h[1:] += w[:-1]
        return h / max(total, 1.0), total

    def finish(self) -> tuple[Tensor, float, list[Tensor] | None]:
        h_neg, n_neg = self._hist(0)
        h_pos, n_pos = self._hist(1)
        value = torch.tensor(float((h_neg * torch.cumsum(h_pos, 0)).sum()), dtype=self.dtype)
        if not self.need_grad:
            return value, 1.0, None
        r = self.nodes
        step = 2.0 / (r - 1)
        table = torch.zeros(5 * r, dtype=torch.float64)
        table[: r - 1] = h_pos[1:] / (step * max(n_neg, 1.0))
        table[r : 2 * r] = -h_neg / (step * max(n_pos, 1.0))
        table = table.to(device=self.bins[0].device if self.bins else None, dtype=self.dtype)
        grads = [table.take(idx) for idx in self.bins]
        self.bins = []
        return value, 1.0, grads


def _histogram_loss_autograd(
    sim: Tensor, pos: Tensor, neg: Tensor, num_nodes: int, embeddings: Tensor, ref: Tensor
) -> Tensor:
    """Plain autograd form (used when mined positive and negative pairs overlap)."""
    if not bool(pos.any()) or not bool(neg.any()):
        return zero_loss(embeddings, ref)
    h_pos = soft_histogram(sim[pos], num_nodes)
    h_neg = soft_histogram(sim[neg], num_nodes)
    return (h_neg * torch.cumsum(h_pos, dim=0)).sum()


def histogram_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    num_nodes: int = 101,
) -> Tensor:
    """Histogram loss value; see :class:`HistogramLoss`. Inputs are assumed validated.

    One fused pass over the cosine-similarity matrix (row blocks; the upper triangle only for a
    batch against itself) builds both histograms with ``bincount`` and the gradient w.r.t. the
    similarities by table lookup; the backward is a matmul per block.
    """
    same_set = ref_embeddings is None
    ref = embeddings if same_set else ref_embeddings
    common = dict(num_nodes=int(num_nodes), dtype=embeddings.dtype)
    batch, ref_size = embeddings.shape[0], ref.shape[0]
    if indices is None:
        ref_lab = None if same_set else ref_labels
        if not has_negative_label_pair(labels, ref_lab):
            return zero_loss(embeddings, ref)
        limit = int(_PAIR_LIST_FRACTION * batch * ref_size / (2 if same_set else 1))
        pairs = label_positive_pairs(labels, ref_lab, upper=same_set, max_pairs=limit)
        if pairs is None:
            if not has_positive_label_pair(labels, ref_lab):
                return zero_loss(embeddings, ref)
        elif pairs[0].numel() == 0:
            return zero_loss(embeddings, ref)
        if pairs is not None:
            kernel = _HistogramKernel(pairs=pairs, upper=same_set, **common)  # type: ignore[arg-type]
        else:
            pos, neg = label_masks(labels, ref_lab)
            if same_set:
                upper = torch.ones_like(pos).triu_(1)
                pos, neg = pos & upper, neg & upper
            kernel = _HistogramKernel(pos=pos, neg=neg, upper=same_set, **common)  # type: ignore[arg-type]
    else:
        pos, neg = pair_masks_from_indices(indices, batch, ref_size)
        if same_set:
            # Each unordered pair {i, j} once (the paper's sets S+ and S-), self-pairs never.
            upper = torch.ones_like(pos).triu_(1)
            pos = (pos | pos.T) & upper
            neg = (neg | neg.T) & upper
        if not bool(pos.any()) or not bool(neg.any()):
            return zero_loss(embeddings, ref)
        if bool((pos & neg).any()):
            sim = cosine_similarity(embeddings, None if same_set else ref)
            return _histogram_loss_autograd(sim, pos, neg, num_nodes, embeddings, ref)
        kernel = _HistogramKernel(pos=pos, neg=neg, upper=same_set, **common)  # type: ignore[arg-type]
    y = None if same_set else ref
    return fused_pair_loss(embeddings, y, "dot", kernel, upper=same_set, block_elems=_BLOCK, normalize=True)


@LOSSES.register("histogram")
class HistogramLoss(nn.Module):
    r"""Histogram loss: probability that a negative pair is more similar than a positive pair.

    Cosine similarities of the positive pairs (set $S^+$) and of the negative pairs ($S^-$) are
    binned into soft histograms on $R$ nodes $t_r = -1 + (r-1)\Delta$, $\Delta = 2/(R-1)$, with
    linear interpolation:

    $$ h^{\pm}_r = \frac{1}{|S^{\pm}|}\sum_{(i,j)\in S^{\pm}} \delta_{ijr},\quad
       \delta_{ijr} = \begin{cases} (s_{ij}-t_{r-1})/\Delta & s_{ij}\in[t_{r-1},t_r]\\
       (t_{r+1}-s_{ij})/\Delta & s_{ij}\in[t_r,t_{r+1}]\\ 0 & \text{otherwise}\end{cases} $$

    $$ L = \sum_{r=1}^{R} h^-_r \, \Phi^+_r, \qquad \Phi^+_r = \sum_{q=1}^{r} h^+_q . $$

    Reference: E. Ustinova and V. Lempitsky, "Learning Deep Embeddings with Histogram Loss",
    NeurIPS 2016. Similarity-native: uses cosine similarity (larger = closer), as the paper does
    (the paper L2-normalises the embeddings and uses their dot product).

    The paper's only parameter is $R$ and it reports the results to be insensitive to it. The
    default $R = 101$ (step $\Delta = 0.02$) equals PML's default ``HistogramLoss(n_bins=100)``
    (PML's ``n_bins`` counts intervals, so ``num_nodes = n_bins + 1``).

    When the reference set is the batch itself every unordered pair counts once (mined pairs given
    in either orientation are merged). With ``ref_embeddings`` every (batch, reference) pair counts.
    Mined triplets are reduced to their unique positive and negative pairs.

    Args:
        num_nodes: $R$, number of histogram nodes including both ends $-1$ and $+1$ (≥ 2).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``, optional ref ``(R, D)`` / ``(R,)``; output scalar.

    Requirements:
        At least one positive and one negative pair (else the loss is 0 with a graph); ≥ 2 samples
        per class in a batch.

    Example:
        >>> import torch
        >>> loss_fn = HistogramLoss()
        >>> embeddings = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(embeddings, labels)
        >>> loss.backward()
        >>> bool(0.0 <= loss.item() <= 1.0)
        True
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(self, num_nodes: int = 101) -> None:
        super().__init__()
        if int(num_nodes) < 2:
            raise ConfigError(f"num_nodes must be >= 2; got {num_nodes}")
        self.num_nodes = int(num_nodes)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_inputs(embeddings, labels, ref_embeddings, ref_labels)
        return histogram_loss(
            embeddings, labels, indices, ref_embeddings, ref_labels, num_nodes=self.num_nodes
        )

    def extra_repr(self) -> str:
        return f"num_nodes={self.num_nodes}"
