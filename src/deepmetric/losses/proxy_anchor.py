"""Proxy-Anchor loss (Kim et al., CVPR 2020)."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.losses._fused import LN2, LOG2E, SimGrad, deferred_class_check, fused_similarity_loss
from deepmetric.losses.softmax import check_class_count
from deepmetric.registry import LOSSES

__all__ = ["ProxyAnchorLoss", "proxy_anchor_loss"]


def proxy_anchor_loss(
    embeddings: Tensor, labels: Tensor, proxies: Tensor, alpha: float = 32.0, delta: float = 0.1
) -> Tensor:
    """Proxy-Anchor loss from one ``(B, C)`` cosine matrix (see :class:`ProxyAnchorLoss`).

    One fused pass (:func:`deepmetric.losses._fused.fused_similarity_loss`): the negative term's
    column sums are computed in place on the cosine buffer (the own class masked by one scatter),
    the positive term from the ``B`` target cosines (per-class reductions of length ``B``), and
    ``∂L/∂cos`` is the only ``(B, C)`` tensor kept for the backward.

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` class indices.
        proxies: ``(C, D)``.
        alpha: scale $\\alpha$.
        delta: margin $\\delta$.
    """
    return _proxy_anchor_loss(embeddings, labels, proxies, alpha, delta)


def _proxy_anchor_loss(
    embeddings: Tensor, labels: Tensor, proxies: Tensor, alpha: float, delta: float, finite_check=None
) -> Tensor:
    num_classes = proxies.shape[0]
    own = labels.unsqueeze(1)

    def kernel(unit: Tensor, unit_proxies: Tensor, need_grad: bool, _all_unit: bool):
        dtype = unit.dtype
        factor = alpha * LOG2E
        # base-2 logits α cos log2(e); the negative logits are α (cos + δ)
        logits = torch.addmm(unit.new_zeros(()), unit, unit_proxies.T, beta=0.0, alpha=factor)
        cos_own = logits.gather(1, own).squeeze(1).div_(factor)
        logits.scatter_(1, own, float("-inf"))  # X_p^-: every sample not of p's class
        # log(1 + Σ_i e^{z_ic}) per column with the shift max(max_i z_ic, 0) (so e^{-shift} <= 1)
        shift = logits.amax(0).add_(alpha * delta * LOG2E).clamp_min_(0.0)  # base 2
        weights = logits.add_((alpha * delta * LOG2E - shift).unsqueeze(0)).exp2_()
        denominator = weights.sum(0).add_(torch.exp2(-shift))
        negative = (shift + denominator.log2()).sum() * (LN2 / num_classes)
        # positive term: only the B entries cos[i, y_i], reduced per class
        z = (cos_own - delta) * (-alpha)
        pos_shift = torch.zeros(num_classes, dtype=dtype, device=z.device)
        pos_shift = pos_shift.scatter_reduce(0, labels, z, reduce="amax", include_self=True)  # >= 0
        own_shift = pos_shift.index_select(0, labels)
        terms = torch.exp(z - own_shift)
        sums = torch.zeros_like(pos_shift).index_add_(0, labels, terms).add_(torch.exp(-pos_shift))
        with_positives = torch.bincount(labels, minlength=num_classes).gt(0).sum()
        positive = (pos_shift + sums.log()).sum() / with_positives  # 0 for proxies without positives
        value = positive + negative
        if not need_grad:
            return value, None
        # ∂/∂cos_ic = α/C · e^{z_ic} / (1 + Σ_i e^{z_ic}) (negatives);
        # ∂/∂cos_{i,y_i} = −α/|P+| · e^{z_i} / (1 + Σ_{class} e^{z}) (positives)
        grad = weights.mul_((alpha / num_classes) / denominator)
        pos_grad = terms.div_(sums.index_select(0, labels)).mul_(-alpha / with_positives.to(dtype))
        grad.scatter_(1, own, pos_grad.unsqueeze(1))
        return value, SimGrad(grad)

    return fused_similarity_loss(embeddings, proxies, kernel, True, finite_check)


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
        check = deferred_class_check(
            embeddings, labels, self.num_classes, self.embedding_dim, indices, ref_embeddings, ref_labels
        )
        return _proxy_anchor_loss(
            embeddings, labels, self.proxies.to(embeddings.dtype), self.alpha, self.delta, check
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"alpha={self.alpha}, delta={self.delta}"
        )
