"""Triplet-center loss (He et al., CVPR 2018) with learnable centers, optionally with softmax."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.distances import squared_euclidean
from deepmetric.errors import ConfigError
from deepmetric.losses.softmax import check_class_count, check_class_inputs
from deepmetric.registry import LOSSES

__all__ = ["TripletCenterLoss", "triplet_center_loss"]


def triplet_center_loss(embeddings: Tensor, labels: Tensor, centers: Tensor, margin: float) -> Tensor:
    """Mean over the batch of ``[D(f_i, c_{y_i}) + m - min_{j != y_i} D(f_i, c_j)]_+``.

    ``D(f, c) = ||f - c||^2 / 2``. One ``(B, C)`` distance matrix; the positive distance is
    recomputed directly (no cancellation) and gradients reach the embeddings and the centers.

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` class indices.
        centers: ``(C, D)``, ``C >= 2``.
        margin: ``m``.
    """
    dist = 0.5 * squared_euclidean(embeddings, centers)  # (B, C)
    own = F.one_hot(labels, centers.shape[0]).bool()
    nearest_other = dist.masked_fill(own, float("inf")).amin(dim=1)
    diff = embeddings - centers.index_select(0, labels)
    positive = 0.5 * (diff * diff).sum(1)
    return torch.relu(positive + margin - nearest_other).mean()


@LOSSES.register("triplet_center")
class TripletCenterLoss(nn.Module):
    """Triplet-center loss: be closer to your class center than to any other center by a margin.

    $$ L_{tc} = \\frac{1}{B}\\sum_{i=1}^{B} \\Big[ D(f_i, c_{y_i}) + m - \\min_{j \\neq y_i} D(f_i, c_j)
    \\Big]_+, \\qquad D(f, c) = \\tfrac{1}{2}\\|f - c\\|_2^2 $$

    and, with ``with_softmax=True`` (the paper's training setting), $L = L_{tc} + \\lambda
    L_{softmax}$ where $L_{softmax}$ is the mean cross-entropy of a linear classifier with bias.
    $D$ is the halved squared euclidean distance of the paper; the sum over the batch is averaged
    here (as the authors' released code does). The centers are an ``nn.Parameter`` trained by the
    optimizer with the rest of the model (standard normal initialisation, as the authors' code).

    Reference: X. He, Y. Zhou, Z. Zhou, S. Bai, X. Bai, "Triplet-Center Loss for Multi-View 3D Object
    Retrieval", CVPR 2018.

    Args:
        num_classes: number of classes ``C >= 2``; labels are indices in ``[0, C)``.
        embedding_dim: embedding size ``D``.
        margin: ``m`` (default 5.0, the value used for the paper's ModelNet experiments; the best
            margin scales with the embedding norm, so tune it for normalised embeddings).
        with_softmax: add the softmax term (default ``True``).
        lambda_softmax: weight $\\lambda$ of the softmax term (default 1.0).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` integer in ``[0, C)``; output scalar.

    Requirements:
        Class-index labels; any batch (negatives are centers, not samples). Give the loss's
        parameters (centers, classifier) to the optimizer. Not invariant to relabelling.

    Example:
        >>> import torch
        >>> loss_fn = TripletCenterLoss(num_classes=3, embedding_dim=4)
        >>> loss = loss_fn(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> loss.backward()
        >>> loss_fn.centers.grad.shape
        torch.Size([3, 4])
    """

    tuple_kind: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "class"

    def __init__(
        self,
        *,
        num_classes: int,
        embedding_dim: int,
        margin: float = 5.0,
        with_softmax: bool = True,
        lambda_softmax: float = 1.0,
    ) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim, min_classes=2)
        if margin < 0:
            raise ConfigError(f"margin must be >= 0; got {margin}")
        if lambda_softmax < 0:
            raise ConfigError(f"lambda_softmax must be >= 0; got {lambda_softmax}")
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.margin = float(margin)
        self.with_softmax = bool(with_softmax)
        self.lambda_softmax = float(lambda_softmax)
        self.centers = nn.Parameter(torch.randn(num_classes, embedding_dim))
        if self.with_softmax:
            linear = nn.Linear(embedding_dim, num_classes, bias=True)
            self.weight = nn.Parameter(linear.weight.detach().clone())
            self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: object = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_class_inputs(
            embeddings, labels, self.num_classes, self.embedding_dim,
            indices=indices, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
        )
        dtype = embeddings.dtype
        loss = triplet_center_loss(embeddings, labels, self.centers.to(dtype), self.margin)
        if self.with_softmax:
            logits = F.linear(embeddings, self.weight.to(dtype), self.bias.to(dtype))
            loss = loss + self.lambda_softmax * F.cross_entropy(logits, labels)
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"margin={self.margin}, with_softmax={self.with_softmax}, "
            f"lambda_softmax={self.lambda_softmax}"
        )
