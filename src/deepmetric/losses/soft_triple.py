"""SoftTriple loss (Qian et al., ICCV 2019)."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.losses._fused import (
    LOG2E,
    SimGrad,
    deferred_class_check,
    exp_limits,
    fused_similarity_loss,
    softmax_xent,
)
from deepmetric.losses.softmax import check_class_count
from deepmetric.registry import LOSSES

__all__ = ["SoftTripleLoss", "soft_triple_loss", "soft_triple_regularizer"]


def _regularizer_of_unit(unit: Tensor) -> Tensor:
    num_classes, k, _ = unit.shape
    gram = unit @ unit.transpose(1, 2)  # (C, K, K)
    upper = torch.ones(k, k, dtype=torch.bool, device=unit.device).triu(1)
    dist = (2.0 + 1e-5 - 2.0 * gram).clamp_min(0.0).sqrt()
    return dist.masked_fill(~upper, 0.0).sum() / (num_classes * k * (k - 1))


def soft_triple_regularizer(centers: Tensor) -> Tensor:
    """Adaptive-center regulariser ``sum_j sum_{t<s} ||w_j^t - w_j^s|| / (C K (K-1))``.

    Computed per class (a ``(C, K, K)`` Gram tensor, never ``(CK, CK)``) on unit centers as
    ``sqrt(2 + 1e-5 - 2 w^t·w^s)``; the 1e-5 (official code) keeps the gradient finite when two
    centers coincide, which is the state the regulariser drives redundant centers to.

    Args:
        centers: ``(C, K, D)`` centers, normalised here.
    """
    if centers.shape[1] < 2:
        return centers.sum() * 0
    return _regularizer_of_unit(F.normalize(centers, dim=2))


def soft_triple_loss(
    embeddings: Tensor,
    labels: Tensor,
    centers: Tensor,
    la: float = 20.0,
    gamma: float = 0.1,
    tau: float = 0.2,
    delta: float = 0.01,
) -> Tensor:
    """Mean SoftTriple loss plus ``tau`` times the adaptive-center regulariser.

    The first term is one fused pass (:func:`deepmetric.losses._fused.fused_similarity_loss`) over
    the ``(B, C·K)`` similarities: the soft assignment, ``S'`` and the softmax over classes are
    computed on two buffers, and ``∂L/∂s_{ick} = ∂L/∂S'_{ic} · p_{ick} (1 + (s_{ick} − S'_{ic})/γ)``
    (``p`` the soft assignment) is written into the similarity buffer, the only one kept for the
    backward.

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` class indices.
        centers: ``(C, K, D)`` centers (normalised here).
        la: $\\lambda$, scale of the class similarities.
        gamma: $\\gamma$, temperature of the soft assignment to a class's centers.
        tau: $\\tau$, weight of the regulariser (0 disables it).
        delta: $\\delta$, margin subtracted from the target similarity.
    """
    return _soft_triple_loss(embeddings, labels, centers, la, gamma, tau, delta)


def _soft_triple_loss(
    embeddings: Tensor,
    labels: Tensor,
    centers: Tensor,
    la: float,
    gamma: float,
    tau: float,
    delta: float,
    finite_check=None,
) -> Tensor:
    num_classes, k, dim = centers.shape
    own = labels.unsqueeze(1)
    batch = labels.shape[0]

    def kernel(unit: Tensor, unit_centers: Tensor, need_grad: bool, _all_unit: bool):
        sim = (unit @ unit_centers.T).view(batch, num_classes, k)  # s_{ick}
        # soft assignment p = softmax_k(s / γ), in base 2 on a second buffer; |s| <= 1, so no
        # shift is needed unless 1/γ is beyond the range of exp
        hi, lo = exp_limits(unit.dtype, k)
        if 1.0 / gamma <= min(hi, lo):
            weights = torch.mul(sim, LOG2E / gamma).exp2_()
        else:
            weights = torch.sub(sim, sim.amax(2, keepdim=True)).mul_(LOG2E / gamma).exp2_()
        total = weights.sum(2)
        class_sim = (weights.view(-1, 1, k) @ sim.view(-1, k, 1)).view(batch, num_classes).div_(total)  # S'
        logits = class_sim * (la * LOG2E)
        logits.scatter_add_(1, own, logits.new_full(own.shape, -la * delta * LOG2E))
        value, soft = softmax_xent(logits, own)
        if not need_grad:
            return value, None
        # ∂L/∂S' = λ (softmax − onehot) / B;  ∂S'/∂s_k = p_k (1 + (s_k − S')/γ)
        grad = sim.sub_((class_sim - gamma).unsqueeze(2)).mul_(weights)
        grad.mul_(soft.mul_(la / (batch * gamma)).div_(total).unsqueeze(2))
        return value, SimGrad(grad.view(batch, num_classes * k))

    loss = fused_similarity_loss(embeddings, centers.reshape(num_classes * k, dim), kernel, True, finite_check)
    if tau > 0 and k > 1:
        loss = loss + tau * _regularizer_of_unit(F.normalize(centers, dim=2))
    return loss


@LOSSES.register("soft_triple")
class SoftTripleLoss(nn.Module):
    """SoftTriple: softmax over classes that each have K centers, softly assigned (multi-proxy).

    $$ L = -\\frac{1}{B}\\sum_{i=1}^{B} \\log \\frac{e^{\\lambda (S'_{i,y_i} - \\delta)}}
    {e^{\\lambda (S'_{i,y_i} - \\delta)} + \\sum_{j \\neq y_i} e^{\\lambda S'_{i,j}}}
    + \\tau \\frac{\\sum_{j=1}^{C} \\sum_{t=1}^{K} \\sum_{s=t+1}^{K} \\|w_j^t - w_j^s\\|_2}{C K (K-1)},
    \\qquad S'_{i,c} = \\sum_{k=1}^{K} \\frac{e^{x_i^\\top w_c^k / \\gamma}}
    {\\sum_{k'} e^{x_i^\\top w_c^{k'} / \\gamma}}\\, x_i^\\top w_c^k $$

    Embeddings and centers are L2-normalised (similarity-native: cosine similarity, larger =
    closer). The second term is the paper's regulariser that lets the number of centers adapt:
    it pulls the K centers of a class together so that redundant ones merge (computed as
    $\\sqrt{2 + 10^{-5} - 2 w^{t\\top} w^s}$ like the official code). Centers start uniform in
    $\\pm 1/\\sqrt{CK}$ (the official ``kaiming_uniform_(a=√5)`` on its ``(D, CK)`` matrix).
    pytorch-metric-learning's ``SoftTripleLoss(centers_per_class=K, la=λ, gamma=γ, margin=δ)``
    computes the first term only (its ``fc`` = ``centers.reshape(C*K, D).T``); ``tau=0`` matches it.

    Reference: Q. Qian, L. Shang, B. Sun, J. Hu, H. Li, R. Jin, "SoftTriple Loss: Deep Metric
    Learning Without Triplet Sampling", ICCV 2019.

    Args:
        num_classes: number of classes ``C``; labels are indices in ``[0, C)``.
        embedding_dim: embedding size ``D``.
        centers_per_class: $K$ (paper: 10).
        la: $\\lambda$ (paper: 20).
        gamma: $\\gamma$ (paper: 0.1).
        tau: $\\tau$ (paper: 0.2).
        delta: $\\delta$ (paper: 0.01).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)`` integer in ``[0, C)``; output scalar.

    Requirements:
        Class-index labels; any batch. The centers (``(C, K, D)``) are an ``nn.Parameter`` for
        the optimizer. Not invariant to relabelling.

    Example:
        >>> import torch
        >>> loss_fn = SoftTripleLoss(num_classes=3, embedding_dim=4)
        >>> loss = loss_fn(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> loss.backward()
        >>> loss_fn.centers.grad.shape
        torch.Size([3, 10, 4])
    """

    tuple_kind: ClassVar[str | None] = None
    label_kind: ClassVar[str] = "class"

    def __init__(
        self,
        *,
        num_classes: int,
        embedding_dim: int,
        centers_per_class: int = 10,
        la: float = 20.0,
        gamma: float = 0.1,
        tau: float = 0.2,
        delta: float = 0.01,
    ) -> None:
        super().__init__()
        check_class_count(num_classes, embedding_dim)
        k = centers_per_class
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"centers_per_class must be a positive integer; got {centers_per_class!r}")
        if la <= 0 or gamma <= 0:
            raise ConfigError(f"la and gamma must be > 0; got la={la}, gamma={gamma}")
        if tau < 0:
            raise ConfigError(f"tau must be >= 0; got {tau}")
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.centers_per_class = centers_per_class
        self.la = float(la)
        self.gamma = float(gamma)
        self.tau = float(tau)
        self.delta = float(delta)
        bound = 1.0 / math.sqrt(num_classes * centers_per_class)
        self.centers = nn.Parameter(
            torch.empty(num_classes, centers_per_class, embedding_dim).uniform_(-bound, bound)
        )

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
        return _soft_triple_loss(
            embeddings, labels, self.centers.to(embeddings.dtype),
            self.la, self.gamma, self.tau, self.delta, check,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, "
            f"tau={self.tau}, delta={self.delta}"
        )
