"""Normalized softmax loss (Zhai & Wu, BMVC 2019)."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.losses._fused import LOG2E, SimGrad, deferred_class_check, fused_similarity_loss, softmax_xent
from deepmetric.losses.softmax import check_class_count
from deepmetric.registry import LOSSES

__all__ = ["NormSoftmaxLoss", "norm_softmax_loss"]


def norm_softmax_loss(
    embeddings: Tensor, labels: Tensor, proxies: Tensor, temperature: float = 0.05
) -> Tensor:
    """Mean cross-entropy of the logits ``cos(x_i, p_c) / temperature``.

    One fused pass (:func:`deepmetric.losses._fused.fused_similarity_loss`): softmax in place,
    ``∂L/∂cos = (softmax − onehot) / (σ B)`` the only ``(B, C)`` tensor kept for the backward.

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` class indices.
        proxies: ``(C, D)`` class weights (normalised here).
        temperature: $\\sigma$.
    """
    return _norm_softmax_loss(embeddings, labels, proxies, temperature)


def _norm_softmax_loss(
    embeddings: Tensor, labels: Tensor, proxies: Tensor, temperature: float, finite_check=None
) -> Tensor:
    own = labels.unsqueeze(1)
    scale = 1.0 / temperature

    def kernel(unit: Tensor, unit_proxies: Tensor, need_grad: bool, _all_unit: bool):
        logits = torch.addmm(unit.new_zeros(()), unit, unit_proxies.T, beta=0.0, alpha=scale * LOG2E)
        value, soft = softmax_xent(logits, own)
        return value, SimGrad(soft, scale / labels.shape[0]) if need_grad else None

    return fused_similarity_loss(embeddings, proxies, kernel, True, finite_check)


@LOSSES.register("norm_softmax")
class NormSoftmaxLoss(nn.Module):
    """Normalized softmax: a bias-free classifier on unit vectors with a temperature (NormSoftmax).

    $$ L = -\\frac{1}{B}\\sum_{i=1}^{B} \\log \\frac{\\exp(\\hat x_i^\\top \\hat p_{y_i} / \\sigma)}
    {\\sum_{z=1}^{C} \\exp(\\hat x_i^\\top \\hat p_z / \\sigma)} $$

    $\\hat x, \\hat p$ are the L2-normalised embedding and class weights (proxies), no bias,
    temperature $\\sigma = 0.05$ (paper). It is Proxy-NCA with the positive kept in the denominator
    (seed survey, eq. 19). Weights start uniform in $\\pm 1/\\sqrt{D}$ (the authors' code).
    pytorch-metric-learning's ``NormalizedSoftmaxLoss(temperature=σ)`` computes the same value, with
    its ``W`` = ``proxies.T``.

    Reference: A. Zhai, H.-Y. Wu, "Classification is a Strong Baseline for Deep Metric Learning",
    BMVC 2019.

    Args:
        num_classes: number of classes ``C``; labels are indices in ``[0, C)``.
        embedding_dim: embedding size ``D``.
        temperature: $\\sigma$ (paper: 0.05).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` integer in ``[0, C)``; output scalar.

    Requirements:
        Class-index labels; any batch. The weights are an ``nn.Parameter`` for the optimizer.
        Not invariant to relabelling.

    Example:
        >>> import torch
        >>> loss_fn = NormSoftmaxLoss(num_classes=3, embedding_dim=4)
        >>> loss = loss_fn(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> loss.backward()
        >>> loss_fn.proxies.grad.shape
        torch.Size([3, 4])
    """

    tuple_kind: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "class"

    def __init__(self, *, num_classes: int, embedding_dim: int, temperature: float = 0.05) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim)
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0; got {temperature}")
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.temperature = float(temperature)
        bound = 1.0 / math.sqrt(embedding_dim)
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_dim).uniform_(-bound, bound))

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
        return _norm_softmax_loss(embeddings, labels, self.proxies.to(embeddings.dtype), self.temperature, check)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"temperature={self.temperature}"
        )
