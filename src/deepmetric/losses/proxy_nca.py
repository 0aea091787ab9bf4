"""Proxy-NCA loss (Movshovitz-Attias et al., ICCV 2017)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.losses._fused import LOG2E, SimGrad, deferred_class_check, fused_similarity_loss, softmax_xent
from deepmetric.losses.softmax import check_class_count
from deepmetric.registry import LOSSES

__all__ = ["ProxyNCALoss", "proxy_nca_loss"]


def proxy_nca_loss(embeddings: Tensor, labels: Tensor, proxies: Tensor, softmax_scale: float = 1.0) -> Tensor:
    """Mean Proxy-NCA loss with the positive proxy excluded from the denominator.

    With unit vectors $d^2(\\hat x, \\hat p) = 2 - 2\\hat x^\\top \\hat p$, so the loss is computed from
    one cosine matrix: $-s d^2_y - \\log\\sum_{z\\ne y} e^{-s d^2_z}
    = -2s\\cos_y + \\log\\sum_{z \\ne y} e^{2s \\cos_z}$ (the constant $2s$ cancels). One fused
    pass (:func:`deepmetric.losses._fused.fused_similarity_loss`): the softmax over the other
    proxies in place, ``∂L/∂cos`` the only ``(B, C)`` tensor kept for the backward.

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` class indices.
        proxies: ``(C, D)``, ``C >= 2``.
        softmax_scale: ``s``.
    """
    return _proxy_nca_loss(embeddings, labels, proxies, softmax_scale)


def _proxy_nca_loss(
    embeddings: Tensor, labels: Tensor, proxies: Tensor, softmax_scale: float, finite_check=None
) -> Tensor:
    own = labels.unsqueeze(1)
    scale = 2.0 * softmax_scale

    def kernel(unit: Tensor, unit_proxies: Tensor, need_grad: bool, _all_unit: bool):
        logits = torch.addmm(unit.new_zeros(()), unit, unit_proxies.T, beta=0.0, alpha=scale * LOG2E)
        value, soft = softmax_xent(logits, own, exclude_target=True)
        return value, SimGrad(soft, scale / labels.shape[0]) if need_grad else None

    return fused_similarity_loss(embeddings, proxies, kernel, True, finite_check)


@LOSSES.register("proxy_nca")
class ProxyNCALoss(nn.Module):
    """Proxy-NCA: NCA against one learned proxy per class, positive excluded from the denominator.

    $$ L = -\\frac{1}{B}\\sum_{i=1}^{B} \\log \\frac{\\exp(-s\\, d^2(\\hat x_i, \\hat p_{y_i}))}
    {\\sum_{z \\neq y_i} \\exp(-s\\, d^2(\\hat x_i, \\hat p_z))} $$

    $\\hat x, \\hat p$ are the L2-normalised embedding and proxies, $d^2$ the squared euclidean
    distance, $s$ = ``softmax_scale`` (the paper has no scale: $s = 1$). The positive proxy is
    *not* in the denominator (as in the paper and the seed survey's eq. 13), so the loss can be
    negative; it is bounded below by $-4s + \\log(C-1)$. pytorch-metric-learning's ``ProxyNCALoss``
    keeps the positive in the denominator (a plain softmax over $-s d^2$); the two are related per
    sample by $L = L_{PML} + \\log(1 - e^{-L_{PML}})$. Proxies start at $\\mathcal N(0, 1)/8$
    (a widely used re-implementation; the paper gives no initialisation).

    Reference: Y. Movshovitz-Attias, A. Toshev, T. K. Leung, S. Ioffe, S. Singh, "No Fuss Distance
    Metric Learning using Proxies", ICCV 2017.

    Args:
        num_classes: number of classes ``C >= 2``; labels are indices in ``[0, C)``.
        embedding_dim: embedding size ``D``.
        softmax_scale: $s$ (default 1.0).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` integer in ``[0, C)``; output scalar.

    Requirements:
        Class-index labels; any batch. Proxies are an ``nn.Parameter``: give them to the optimizer
        (usually with a larger learning rate). Not invariant to relabelling.

    Example:
        >>> import torch
        >>> loss_fn = ProxyNCALoss(num_classes=3, embedding_dim=4)
        >>> loss = loss_fn(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> loss.backward()
        >>> loss_fn.proxies.grad.shape
        torch.Size([3, 4])
    """

    tuple_kind: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "class"

    def __init__(self, *, num_classes: int, embedding_dim: int, softmax_scale: float = 1.0) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim, min_classes=2)
        if softmax_scale <= 0:
            raise ConfigError(f"softmax_scale must be > 0; got {softmax_scale}")
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.softmax_scale = float(softmax_scale)
        self.proxies = nn.Parameter(torch.randn(num_classes, embedding_dim) / 8)

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
        return _proxy_nca_loss(embeddings, labels, self.proxies.to(embeddings.dtype), self.softmax_scale, check)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"softmax_scale={self.softmax_scale}"
        )
