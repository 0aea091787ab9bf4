"""SoftTriple loss (Qian et al., ICCV 2019)."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.losses.softmax import check_class_count, check_class_inputs
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

    Args:
        embeddings: ``(B, D)``.
        labels: ``(B,)`` class indices.
        centers: ``(C, K, D)`` centers (normalised here).
        la: $\\lambda$, scale of the class similarities.
        gamma: $\\gamma$, temperature of the soft assignment to a class's centers.
        tau: $\\tau$, weight of the regulariser (0 disables it).
        delta: $\\delta$, margin subtracted from the target similarity.
    """
    num_classes, k, dim = centers.shape
    unit = F.normalize(centers, dim=2)
    sim = (F.normalize(embeddings, dim=1) @ unit.reshape(num_classes * k, dim).T).view(-1, num_classes, k)
    weights = torch.softmax(sim / gamma, dim=2)
    class_sim = (weights * sim).sum(dim=2)  # (B, C): S'_{i,c}
    own = labels.unsqueeze(1)
    logits = (la * class_sim).scatter_add(1, own, class_sim.new_full(own.shape, -la * delta))
    loss = F.cross_entropy(logits, labels)
    if tau > 0 and k > 1:
        loss = loss + tau * _regularizer_of_unit(unit)
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
        check_class_inputs(
            embeddings, labels, self.num_classes, self.embedding_dim,
            indices=indices, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
        )
        return soft_triple_loss(
            embeddings, labels, self.centers.to(embeddings.dtype),
            self.la, self.gamma, self.tau, self.delta,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"centers_per_class={self.centers_per_class}, la={self.la}, gamma={self.gamma}, "
            f"tau={self.tau}, delta={self.delta}"
        )
