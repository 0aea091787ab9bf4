"""ArcFace / additive angular margin loss (Deng et al., CVPR 2019)."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.losses.softmax import check_class_count, check_class_inputs
from deepmetric.registry import LOSSES

__all__ = ["ArcFaceLoss", "arc_face_loss", "arc_face_target_logit"]


def arc_face_target_logit(cos: Tensor, margin: float) -> Tensor:
    """Unscaled target logit: ``cos(θ + m)`` if ``θ + m <= π``, else ``cos θ - m sin m``.

    ``cos(θ + m)`` is evaluated as ``cos θ cos m - sin θ sin m`` with ``sin θ = sqrt(1 - cos²θ)``
    (clamped at 1e-12 under the root so the gradient stays finite at ``θ = 0``).

    Args:
        cos: cosines of the target angles, any shape.
        margin: $m$ in radians, ``0 <= m < π``.
    """
    sin = (1.0 - cos * cos).clamp_min(1e-12).sqrt()
    shifted = cos * math.cos(margin) - sin * math.sin(margin)
    return torch.where(cos > math.cos(math.pi - margin), shifted, cos - margin * math.sin(margin))


def arc_face_loss(
    embeddings: Tensor, labels: Tensor, weight: Tensor, scale: float = 64.0, margin: float = 0.5
) -> Tensor:
    """Mean cross-entropy of ``s * cos θ_j`` with the target replaced by ``s * ψ(θ_y)``.

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` class indices.
        weight: ``(C, D)`` class weights (normalised here).
        scale: $s$.
        margin: $m$ in radians.
    """
    unit = F.normalize(embeddings, dim=1)
    normalized_weight = F.normalize(weight, dim=1)
    scaled = (scale * unit) @ normalized_weight.T  # (B, C) = s cos, one matmul
    own = labels.unsqueeze(1)
    # target cosines from B dot products (exact, no division of the scaled logits)
    cos_target = (unit * normalized_weight.index_select(0, labels)).sum(1, keepdim=True)
    logits = scaled.scatter(1, own, scale * arc_face_target_logit(cos_target, margin))
    return F.cross_entropy(logits, labels)


@LOSSES.register("arc_face")
class ArcFaceLoss(nn.Module):
    """ArcFace (additive angular margin): softmax on scaled cosines with the target angle + m.

    $$ L = -\\frac{1}{B}\\sum_{i=1}^{B} \\log \\frac{e^{s\\,\\psi(\\theta_{y_i,i})}}
    {e^{s\\,\\psi(\\theta_{y_i,i})} + \\sum_{j \\neq y_i} e^{s \\cos\\theta_{j,i}}}, \\qquad
    \\psi(\\theta) = \\begin{cases} \\cos(\\theta + m) & \\theta + m \\le \\pi \\\\
    \\cos\\theta - m \\sin m & \\text{otherwise} \\end{cases} $$

    $\\theta_{j,i}$ is the angle between embedding $x_i$ and class weight $W_j$ (both
    L2-normalised, no bias). $\\cos(\\theta + m)$ stops decreasing in $\\theta$ once
    $\\theta + m > \\pi$; there the authors' code (insightface) switches to the CosFace-like
    $\\cos\\theta - m\\sin m$, which keeps the target logit monotonically decreasing, and so do we.
    Weights start at $\\mathcal N(0, 0.01^2)$. pytorch-metric-learning's
    ``ArcFaceLoss(margin=degrees(m), scale=s)`` computes the same value, with its ``W`` =
    ``weight.T`` (its margin is in degrees).

    Reference: J. Deng, J. Guo, N. Xue, S. Zafeiriou, "ArcFace: Additive Angular Margin Loss for
    Deep Face Recognition", CVPR 2019.

    Args:
        num_classes: number of classes ``C``; labels are indices in ``[0, C)``.
        embedding_dim: embedding size ``D``.
        scale: $s$ (paper: 64).
        margin: $m$ in radians (paper: 0.5), in ``[0, π)``.

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` integer in ``[0, C)``; output scalar.

    Requirements:
        Class-index labels; any batch. The weights are an ``nn.Parameter`` for the optimizer.
        Not invariant to relabelling.

    Example:
        >>> import torch
        >>> loss_fn = ArcFaceLoss(num_classes=3, embedding_dim=4)
        >>> loss = loss_fn(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> loss.backward()
        >>> loss_fn.weight.grad.shape
        torch.Size([3, 4])
    """

    tuple_kind: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "class"

    def __init__(
        self, *, num_classes: int, embedding_dim: int, scale: float = 64.0, margin: float = 0.5
    ) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim)
        if scale <= 0:
            raise ConfigError(f"scale must be > 0; got {scale}")
        if not 0.0 <= margin < math.pi:
            raise ConfigError(f"margin must be in [0, pi) radians; got {margin}")
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
        check_class_inputs(
            embeddings, labels, self.num_classes, self.embedding_dim,
            indices=indices, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
        )
        return arc_face_loss(
            embeddings, labels, self.weight.to(embeddings.dtype), self.scale, self.margin
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"scale={self.scale}, margin={self.margin}"
        )
