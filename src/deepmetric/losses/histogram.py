"""Histogram loss (Ustinova & Lempitsky, NeurIPS 2016)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.distances import cosine_similarity
from deepmetric.errors import ConfigError
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


def histogram_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    num_nodes: int = 101,
) -> Tensor:
    """Histogram loss value; see :class:`HistogramLoss`. Inputs are assumed validated."""
    same_set = ref_embeddings is None
    ref = embeddings if same_set else ref_embeddings
    sim = cosine_similarity(embeddings, None if same_set else ref)
    if indices is None:
        pos, neg = label_masks(labels, None if same_set else ref_labels)
    else:
        pos, neg = pair_masks_from_indices(indices, embeddings.shape[0], ref.shape[0])
    if same_set:
        # Each unordered pair {i, j} once (the paper's sets S+ and S-), self-pairs never.
        upper = torch.ones_like(pos).triu_(1)
        pos = (pos | pos.T) & upper
        neg = (neg | neg.T) & upper
    if not bool(pos.any()) or not bool(neg.any()):
        return zero_loss(embeddings, ref)
    h_pos = soft_histogram(sim[pos], num_nodes)
    h_neg = soft_histogram(sim[neg], num_nodes)
    return (h_neg * torch.cumsum(h_pos, dim=0)).sum()


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
