"""ArcFace / additive angular margin loss (Deng et al., CVPR 2019)."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.losses._fused import LOG2E, SimGrad, deferred_class_check, fused_similarity_loss, softmax_xent
from deepmetric.losses.softmax import check_class_count
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

    One fused pass (:func:`deepmetric.losses._fused.fused_similarity_loss`): the target column is
    replaced by one scatter, the softmax is computed in place and ``∂L/∂cos`` (``s (softmax −
    onehot) / B``, the target entry times ``ψ'(cos θ_y)``) is the only ``(B, C)`` tensor kept.

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` class indices.
        weight: ``(C, D)`` class weights (normalised here).
        scale: $s$.
        margin: $m$ in radians.
    """
    return _arc_face_loss(embeddings, labels, weight, scale, margin)


def _arc_face_loss(
    embeddings: Tensor, labels: Tensor, weight: Tensor, scale: float, margin: float, finite_check=None
) -> Tensor:
    own = labels.unsqueeze(1)
    cos_m, sin_m = math.cos(margin), math.sin(margin)

    def kernel(unit: Tensor, unit_weight: Tensor, need_grad: bool, _all_unit: bool):
        factor = scale * LOG2E
        logits = torch.addmm(unit.new_zeros(()), unit, unit_weight.T, beta=0.0, alpha=factor)
        cos = logits.gather(1, own).div_(factor)  # target cosines
        sin_sq = 1.0 - cos * cos
        sin = sin_sq.clamp_min(1e-12).sqrt_()
        shifted = cos > math.cos(math.pi - margin)
        psi = torch.where(shifted, cos * cos_m - sin * sin_m, cos - margin * sin_m)
        logits.scatter_(1, own, psi.mul_(factor))
        value, soft = softmax_xent(logits, own)
        if not need_grad:
            return value, None
        # ∂ψ/∂cos: cos m + sin m · cos / sin θ on the cos(θ + m) branch (0 for the sin term where
        # the clamp is active), 1 on the other
        slope = torch.where(sin_sq >= 1e-12, cos / sin, torch.zeros_like(cos)).mul_(sin_m).add_(cos_m)
        slope = torch.where(shifted, slope, torch.ones_like(slope))
        soft.scatter_(1, own, soft.gather(1, own).mul_(slope))
        return value, SimGrad(soft, scale / labels.shape[0])

    return fused_similarity_loss(embeddings, weight, kernel, True, finite_check)


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
        check = deferred_class_check(
            embeddings, labels, self.num_classes, self.embedding_dim, indices, ref_embeddings, ref_labels
        )
        return _arc_face_loss(
            embeddings, labels, self.weight.to(embeddings.dtype), self.scale, self.margin, check
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"scale={self.scale}, margin={self.margin}"
        )
