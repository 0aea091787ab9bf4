"""Coupled clusters loss (Liu et al., "Deep relative distance learning", CVPR 2016)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.distances import squared_euclidean
from deepmetric.errors import ConfigError
from deepmetric.losses.softmax import check_class_inputs
from deepmetric.registry import LOSSES
from deepmetric.tuples import zero_loss

__all__ = ["CoupledClustersLoss", "coupled_clusters_loss"]


def coupled_clusters_loss(embeddings: Tensor, labels: Tensor, alpha: float = 1.0) -> Tensor:
    """Coupled clusters loss of a batch, averaged over the samples (see :class:`CoupledClustersLoss`).

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` integer labels (any values).
        alpha: margin.

    Returns:
        Scalar tensor; a zero with a graph when the batch has fewer than two classes.
    """
    classes, inverse = torch.unique(labels, return_inverse=True)
    num = classes.numel()
    if num < 2:
        return zero_loss(embeddings)
    counts = torch.bincount(inverse, minlength=num).to(embeddings.dtype)
    sums = torch.zeros(num, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
    centers = sums.index_add(0, inverse, embeddings) / counts.unsqueeze(1)  # (K, D), differentiable
    with torch.no_grad():
        dist = squared_euclidean(centers, embeddings)  # (K, B), only to pick the nearest negative
        own = inverse.unsqueeze(0) == torch.arange(num, device=labels.device).unsqueeze(1)
        nearest = dist.masked_fill(own, float("inf")).argmin(dim=1)  # (K,)
    neg_diff = embeddings.index_select(0, nearest) - centers
    negative = (neg_diff * neg_diff).sum(1)  # (K,)
    pos_diff = embeddings - centers.index_select(0, inverse)
    positive = (pos_diff * pos_diff).sum(1)  # (B,)
    return 0.5 * torch.relu(positive + alpha - negative.index_select(0, inverse)).mean()


@LOSSES.register("coupled_clusters")
class CoupledClustersLoss(nn.Module):
    """Coupled clusters loss: each sample nearer its batch class mean than the nearest negative is.

    $$ L = \\frac{1}{B}\\sum_{i=1}^{B} \\frac{1}{2}\\Big[\\|f(x_i) - c^{y_i}\\|_2^2 + \\alpha
    - \\|f(x_*^{y_i}) - c^{y_i}\\|_2^2\\Big]_+, \\qquad c^{p} = \\frac{1}{N^p}\\sum_{i:\\,y_i = p} f(x_i) $$

    where $x_*^{p}$ is the sample of another class nearest to the center $c^p$. As in the paper,
    every class of the batch is a "positive set" whose center is estimated from the batch, and all
    other samples of the batch form its negative set. The paper sums over the positive samples of
    one coupled cluster; here the per-sample terms of all classes are averaged over the batch.
    Gradients flow through the centers (batch means) and the chosen negatives; the choice itself
    (argmin) is not differentiated. Squared euclidean distances, margin $\\alpha = 1$ as in the paper.

    Reference: H. Liu, Y. Tian, Y. Wang, L. Pang, T. Huang, "Deep Relative Distance Learning: Tell the
    Difference Between Similar Vehicles", CVPR 2016.

    Args:
        alpha: margin $\\alpha$ (default 1.0).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` integer; output scalar.

    Requirements:
        At least two classes in the batch (otherwise a zero loss with a graph); samples per class
        >= 2 make the center meaningful (a singleton's center is itself). No learnable parameters.

    Example:
        >>> import torch
        >>> loss_fn = CoupledClustersLoss()
        >>> loss = loss_fn(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
        >>> loss.dim(), bool(loss >= 0)
        (0, True)
    """

    tuple_kind: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "class"

    def __init__(self, *, alpha: float = 1.0) -> None:
        super().__init__()
        if alpha < 0:
            raise ConfigError(f"alpha (margin) must be >= 0; got {alpha}")
        self.alpha = float(alpha)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: object = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_class_inputs(
            embeddings, labels, None, None,
            indices=indices, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
        )
        return coupled_clusters_loss(embeddings, labels, self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"
