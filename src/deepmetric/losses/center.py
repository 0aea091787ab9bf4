"""Center loss (Wen et al., ECCV 2016), jointly with softmax, with the paper's center update rule."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.losses.softmax import check_class_count, check_class_inputs
from deepmetric.registry import LOSSES

__all__ = ["CenterLoss", "center_loss", "center_update"]


def center_loss(embeddings: Tensor, labels: Tensor, centers: Tensor) -> Tensor:
    """The center-loss term, averaged over the batch: ``(1/2B) sum_i ||x_i - c_{y_i}||^2``.

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` class indices.
        centers: ``(C, D)`` class centers.

    Returns:
        Scalar tensor.
    """
    diff = embeddings - centers.index_select(0, labels)
    return 0.5 * (diff * diff).sum() / embeddings.shape[0]


@torch.no_grad()
def center_update(centers: Tensor, embeddings: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """The center step of Wen et al. (Algorithm 1), returned as a new ``(C, D)`` tensor.

    $$ \\Delta c_j = \\frac{\\sum_i \\delta(y_i = j)(c_j - x_i)}{1 + \\sum_i \\delta(y_i = j)}, \\qquad
    c_j \\leftarrow c_j - \\alpha\\, \\Delta c_j $$

    Classes absent from the batch are unchanged. Embeddings are treated as constants.

    Args:
        centers: ``(C, D)`` current centers.
        embeddings: ``(B, D)``.
        labels: ``(B,)`` class indices.
        alpha: center learning rate.
    """
    x = embeddings.detach().to(centers.dtype)
    counts = torch.bincount(labels, minlength=centers.shape[0]).to(centers.dtype)
    sums = torch.zeros_like(centers).index_add_(0, labels, x)
    delta = (counts.unsqueeze(1) * centers - sums) / (1.0 + counts).unsqueeze(1)
    return centers - alpha * delta


@LOSSES.register("center")
class CenterLoss(nn.Module):
    """Center loss: pull each embedding towards its class center, jointly with softmax.

    $$ L = L_S + \\lambda L_C, \\qquad L_C = \\frac{1}{2B}\\sum_{i=1}^{B} \\|x_i - c_{y_i}\\|_2^2 $$

    with $L_S$ the mean softmax cross-entropy of a linear classifier with bias (as
    :class:`~deepmetric.losses.softmax.SoftmaxLoss`). The paper writes both terms as sums over the
    mini-batch; we average both over the batch (as the authors' Caffe layers do), which leaves their
    ratio, hence $\\lambda$, unchanged. The centers are **not** trained by the optimizer: they are a
    buffer updated in ``forward`` (only when ``module.training``), after the loss is computed, by the
    paper's rule

    $$ \\Delta c_j = \\frac{\\sum_i \\delta(y_i = j)(c_j - x_i)}{1 + \\sum_i \\delta(y_i = j)}, \\qquad
    c_j \\leftarrow c_j - \\alpha\\, \\Delta c_j . $$

    Centers start from Xavier-uniform values (the filler of the authors' released face model).

    Reference: Y. Wen, K. Zhang, Z. Li, Y. Qiao, "A Discriminative Feature Learning Approach for Deep
    Face Recognition", ECCV 2016.

    Args:
        num_classes: number of classes ``C``; labels are indices in ``[0, C)``.
        embedding_dim: embedding size ``D``.
        lambda_c: weight $\\lambda$ of the center term (paper's face experiments: 0.003).
        alpha: center learning rate $\\alpha$ (paper: 0.5), in ``[0, 1]``.
        with_softmax: add the softmax term $L_S$ (default ``True``, as in the paper). With ``False``
            the loss is $\\lambda L_C$ alone; combine it with another separating loss, since $L_C$
            alone collapses all embeddings.

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` integer in ``[0, C)``; output scalar.

    Requirements:
        Class-index labels; any batch. The classifier (when ``with_softmax``) is an ``nn.Parameter``
        for the optimizer; the centers need no optimizer. Not invariant to relabelling.

    Example:
        >>> import torch
        >>> loss_fn = CenterLoss(num_classes=3, embedding_dim=4)
        >>> before = loss_fn.centers.clone()
        >>> loss = loss_fn(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> loss.dim(), bool((loss_fn.centers != before).any())
        (0, True)
    """

    tuple_kind: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "class"
    centers: Tensor

    def __init__(
        self,
        *,
        num_classes: int,
        embedding_dim: int,
        lambda_c: float = 0.003,
        alpha: float = 0.5,
        with_softmax: bool = True,
    ) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"alpha (center learning rate) must be in [0, 1]; got {alpha}")
        if lambda_c < 0:
            raise ConfigError(f"lambda_c must be >= 0; got {lambda_c}")
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.lambda_c = float(lambda_c)
        self.alpha = float(alpha)
        self.with_softmax = bool(with_softmax)
        centers = torch.empty(num_classes, embedding_dim)
        nn.init.xavier_uniform_(centers)
        self.register_buffer("centers", centers)
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
        loss = self.lambda_c * center_loss(embeddings, labels, self.centers.to(dtype))
        if self.with_softmax:
            logits = F.linear(embeddings, self.weight.to(dtype), self.bias.to(dtype))
            loss = F.cross_entropy(logits, labels) + loss
        if self.training:
            self.centers.copy_(center_update(self.centers, embeddings, labels, self.alpha))
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"lambda_c={self.lambda_c}, alpha={self.alpha}, with_softmax={self.with_softmax}"
        )
