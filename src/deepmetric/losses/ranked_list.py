"""Ranked list loss (Wang et al., CVPR 2019)."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.distances import euclidean
from deepmetric.errors import ConfigError
from deepmetric.registry import LOSSES
from deepmetric.losses._pairs import resolve_masks
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["RankedListLoss", "ranked_list_loss"]


def _pair_masks(
    labels: Tensor, ref_labels: Tensor | None, indices: Indices | None, batch_size: int, ref_size: int
) -> tuple[Tensor, Tensor]:
    """Positive/negative ``(B, R)`` masks from labels or mined indices; never a self-pair."""
    if isinstance(indices, (tuple, list)) and len(indices) == 3:
        # Triplets name the pairs (a, p) and (a, n): given in the pair layout they set the same mask
        # entries without the O(T log T) de-duplication of ``triplets_to_pairs``.
        indices = (indices[0], indices[1], indices[0], indices[2])
    pos, neg = resolve_masks(labels, ref_labels, indices, batch_size, ref_size)
    if indices is not None and ref_labels is None:
        pos.fill_diagonal_(False)
        neg.fill_diagonal_(False)
    return pos, neg


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
    """Ranked list loss value; see :class:`RankedListLoss`. Inputs are assumed validated."""
    same_set = ref_embeddings is None
    queries = F.normalize(embeddings, dim=1)
    ref = queries if same_set else F.normalize(ref_embeddings, dim=1)  # type: ignore[arg-type]
    if query_only_gradient:
        ref = ref.detach()
    dist = euclidean(queries, ref)
    pos, neg = _pair_masks(labels, None if same_set else ref_labels, indices, dist.shape[0], dist.shape[1])
    if not bool(pos.any()):
        return zero_loss(embeddings, ref)
    pos_boundary = alpha - margin
    pos_star = pos & (dist > pos_boundary)  # non-trivial positives P*
    neg_star = neg & (dist < alpha)  # non-trivial negatives N*
    zero = dist.new_zeros(())
    # L_P: plain mean of the positive hinge over P* (0 where P* is empty).
    pos_hinge = torch.where(pos_star, dist - pos_boundary, zero)
    loss_pos = pos_hinge.sum(1) / pos_star.sum(1).clamp_min(1).to(dist.dtype)
    # L_N: weights exp(T (alpha - d)) normalised over N*, constants for back-propagation.
    with torch.no_grad():
        logits = (temperature * (alpha - dist)).masked_fill(~neg_star, float("-inf"))
        has_neg = neg_star.any(1, keepdim=True)
        weights = torch.softmax(logits.masked_fill(~has_neg, 0.0), dim=1)
        weights = torch.where(neg_star, weights, zero)
    loss_neg = (weights * torch.where(neg_star, alpha - dist, zero)).sum(1)
    return (loss_pos + negative_weight * loss_neg).mean()


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
        check_inputs(embeddings, labels, ref_embeddings, ref_labels)
        return ranked_list_loss(
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
        )

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, margin={self.margin}, temperature={self.temperature}, "
            f"negative_weight={self.negative_weight}"
        )
