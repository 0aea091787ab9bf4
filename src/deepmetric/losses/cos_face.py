"""CosFace / large margin cosine loss (Wang et al., CVPR 2018)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.losses._fused import LOG2E, SimGrad, deferred_class_check, fused_similarity_loss, softmax_xent
from deepmetric.losses.softmax import check_class_count
from deepmetric.registry import LOSSES

__all__ = ["CosFaceLoss", "cos_face_loss"]


def cos_face_loss(
    embeddings: Tensor, labels: Tensor, weight: Tensor, scale: float = 64.0, margin: float = 0.35
) -> Tensor:
    """Mean cross-entropy of ``s * (cos(x_i, W_c) - m [c = y_i])``.

    One fused pass (:func:`deepmetric.losses._fused.fused_similarity_loss`): the margin is applied
    to the target column only (one scatter), the softmax is computed in place and ``∂L/∂cos = s
    (softmax − onehot) / B`` is the only ``(B, C)`` tensor kept for the backward.

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` class indices.
        weight: ``(C, D)`` class weights (normalised here).
        scale: $s$.
        margin: $m$ (cosine margin).
    """
    return _cos_face_loss(embeddings, labels, weight, scale, margin)


def _cos_face_loss(
    embeddings: Tensor, labels: Tensor, weight: Tensor, scale: float, margin: float, finite_check=None
) -> Tensor:
    own = labels.unsqueeze(1)

    def kernel(unit: Tensor, unit_weight: Tensor, need_grad: bool, _all_unit: bool):
        # base-2 logits s cos log2(e), one matmul; the margin on the target column only
        logits = torch.addmm(unit.new_zeros(()), unit, unit_weight.T, beta=0.0, alpha=scale * LOG2E)
        if margin != 0.0:
            logits.scatter_add_(1, own, logits.new_full(own.shape, -scale * margin * LOG2E))
        value, soft = softmax_xent(logits, own)
        return value, SimGrad(soft, scale / labels.shape[0]) if need_grad else None

    return fused_similarity_loss(embeddings, weight, kernel, True, finite_check)


@LOSSES.register("cos_face")
class CosFaceLoss(nn.Module):
    """CosFace (large margin cosine loss): softmax on scaled cosines, target cosine minus a margin.

    $$ L = -\\frac{1}{B}\\sum_{i=1}^{B} \\log \\frac{e^{s(\\cos\\theta_{y_i,i} - m)}}
    {e^{s(\\cos\\theta_{y_i,i} - m)} + \\sum_{j \\neq y_i} e^{s \\cos\\theta_{j,i}}} $$

    $\\cos\\theta_{j,i}$ is the cosine between embedding $x_i$ and class weight $W_j$ (both
    L2-normalised, no bias). Weights start at $\\mathcal N(0, 0.01^2)$. pytorch-metric-learning's
    ``CosFaceLoss(margin=m, scale=s)`` computes the same value, with its ``W`` = ``weight.T``.

    Reference: H. Wang, Y. Wang, Z. Zhou, X. Ji, D. Gong, J. Zhou, Z. Li, W. Liu, "CosFace: Large
    Margin Cosine Loss for Deep Face Recognition", CVPR 2018.

    Args:
        num_classes: number of classes ``C``; labels are indices in ``[0, C)``.
        embedding_dim: embedding size ``D``.
        scale: $s$ (paper: 64).
        margin: $m$ (paper: 0.35).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` integer in ``[0, C)``; output scalar.

    Requirements:
        Class-index labels; any batch. The weights are an ``nn.Parameter`` for the optimizer.
        Not invariant to relabelling.

    Example:
        >>> import torch
        >>> loss_fn = CosFaceLoss(num_classes=3, embedding_dim=4)
        >>> loss = loss_fn(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> loss.backward()
        >>> loss_fn.weight.grad.shape
        torch.Size([3, 4])
    """

    tuple_kind: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "class"

    def __init__(
        self, *, num_classes: int, embedding_dim: int, scale: float = 64.0, margin: float = 0.35
    ) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim)
        if scale <= 0:
            raise ConfigError(f"scale must be > 0; got {scale}")
        if margin < 0:
            raise ConfigError(f"margin must be >= 0; got {margin}")
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.scale = float(scale)
        self.margin = float(margin)
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: object = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check = deferred_class_check(
            embeddings, labels, self.num_classes, self.embedding_dim, indices, ref_embeddings, ref_labels
        )
        return _cos_face_loss(
            embeddings, labels, self.weight.to(embeddings.dtype), self.scale, self.margin, check
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"scale={self.scale}, margin={self.margin}"
        )
