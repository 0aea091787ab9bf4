"""Proxy-Anchor loss (Kim et al., CVPR 2020)."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.losses.softmax import check_class_count, check_class_inputs
from deepmetric.registry import LOSSES

__all__ = ["ProxyAnchorLoss", "proxy_anchor_loss"]


def _log1p_sum_exp_columns(z: Tensor) -> Tensor:
    """``log(1 + sum_i exp(z[i, c]))`` per column, stable; ``-inf`` entries contribute nothing."""
    shift = z.detach().amax(dim=0).clamp_min(0.0)  # (C,), >= 0 so exp(-shift) <= 1
    return shift + torch.log(torch.exp(-shift) + torch.exp(z - shift).sum(dim=0))


def proxy_anchor_loss(
    embeddings: Tensor, labels: Tensor, proxies: Tensor, alpha: float = 32.0, delta: float = 0.1
) -> Tensor:
    """Proxy-Anchor loss from one ``(B, C)`` cosine matrix (see :class:`ProxyAnchorLoss`).

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` class indices.
        proxies: ``(C, D)``.
        alpha: scale $\\alpha$.
        delta: margin $\\delta$.
    """
    num_classes = proxies.shape[0]
    unit = F.normalize(embeddings, dim=1)
    unit_proxies = F.normalize(proxies, dim=1)
    own = labels.unsqueeze(1)
    # Negative term: every (sample, proxy) pair with a different class; alpha (cos + delta) from
    # one fused addmm.
    scaled = torch.addmm(unit.new_full((1, 1), alpha * delta), alpha * unit, unit_proxies.T)
    negative = _log1p_sum_exp_columns(scaled.scatter(1, own, float("-inf")))
    # Positive term: only the B entries cos[i, y_i] (B dot products), reduced per class.
    cos_own = (unit * unit_proxies.index_select(0, labels)).sum(1)
    z = -alpha * (cos_own - delta)  # (B,)
    shift = torch.zeros(num_classes, dtype=z.dtype, device=z.device)
    shift = shift.scatter_reduce(0, labels, z.detach(), reduce="amax", include_self=True)  # >= 0
    sums = torch.zeros_like(shift).index_add(0, labels, torch.exp(z - shift.index_select(0, labels)))
    positive = shift + torch.log(torch.exp(-shift) + sums)  # 0 for proxies without positives
    with_positives = torch.bincount(labels, minlength=num_classes).gt(0).sum()
    return positive.sum() / with_positives + negative.sum() / num_classes


@LOSSES.register("proxy_anchor")
class ProxyAnchorLoss(nn.Module):
    """Proxy-Anchor: each proxy is an anchor pulling its class and pushing all others (similarity).

    $$ L = \\frac{1}{|P^+|}\\sum_{p \\in P^+} \\log\\Big(1 + \\sum_{x \\in X_p^+}
    e^{-\\alpha (s(x, p) - \\delta)}\\Big) + \\frac{1}{|P|}\\sum_{p \\in P}
    \\log\\Big(1 + \\sum_{x \\in X_p^-} e^{\\alpha (s(x, p) + \\delta)}\\Big) $$

    $s$ is cosine similarity (similarity-native: larger = closer), $P$ all proxies, $P^+$ the proxies
    with at least one positive in the batch, $X_p^\\pm$ the batch samples of / not of $p$'s class.
    Proxies start from Kaiming-normal values (``fan_out`` mode), as in the official code.
    pytorch-metric-learning's ``ProxyAnchorLoss(margin=δ, alpha=α)`` computes the same value.

    Reference: S. Kim, D. Kim, M. Cho, S. Kwak, "Proxy Anchor Loss for Deep Metric Learning",
    CVPR 2020.

    Args:
        num_classes: number of classes ``C``; labels are indices in ``[0, C)``.
        embedding_dim: embedding size ``D``.
        alpha: scale $\\alpha$ (paper: 32).
        delta: margin $\\delta$ (paper: 0.1).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` integer in ``[0, C)``; output scalar.

    Requirements:
        Class-index labels; any batch. Proxies are an ``nn.Parameter`` (the paper trains them with
        a 100x larger learning rate). Not invariant to relabelling.

    Example:
        >>> import torch
        >>> loss_fn = ProxyAnchorLoss(num_classes=3, embedding_dim=4)
        >>> loss = loss_fn(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> loss.backward()
        >>> loss_fn.proxies.grad.shape
        torch.Size([3, 4])
    """

    tuple_kind: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "class"

    def __init__(
        self, *, num_classes: int, embedding_dim: int, alpha: float = 32.0, delta: float = 0.1
    ) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim)
        if alpha <= 0 or not math.isfinite(alpha):
            raise ConfigError(f"alpha must be a positive number; got {alpha}")
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.alpha = float(alpha)
        self.delta = float(delta)
        proxies = torch.empty(num_classes, embedding_dim)
        nn.init.kaiming_normal_(proxies, mode="fan_out")
        self.proxies = nn.Parameter(proxies)

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
        return proxy_anchor_loss(
            embeddings, labels, self.proxies.to(embeddings.dtype), self.alpha, self.delta
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"alpha={self.alpha}, delta={self.delta}"
        )
