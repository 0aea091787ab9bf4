"""Circle loss, pair-wise form (Sun et al., CVPR 2020)."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.distances import cosine_similarity
from deepmetric.errors import ConfigError
from deepmetric.registry import LOSSES
from deepmetric.losses._pairs import masked_logsumexp, resolve_masks
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["CircleLoss", "circle_loss"]


def _pair_masks(
    labels: Tensor, ref_labels: Tensor | None, indices: Indices | None, batch_size: int, ref_size: int
) -> tuple[Tensor, Tensor]:
    """Positive/negative ``(B, R)`` masks from labels or mined indices; never a self-pair."""
    if isinstance(indices, (tuple, list)) and len(indices) == 3:
        # Triplets name the pairs (a, p) and (a, n): given in the pair layout they set the same mask
        # entries without the O(T log T) de-duplication of ``triplets_to_pairs``.
        indices = (indices[0], indices[1], indices[0], indices[2])
    pos, neg = resolve_masks(labels, ref_labels, indices, batch_size, ref_size)
    if indices is not None and ref_labels is None:
        pos.fill_diagonal_(False)
        neg.fill_diagonal_(False)
    return pos, neg


def circle_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
) -> Tensor:
    """Circle loss value; see :class:`CircleLoss`. Inputs are assumed validated."""
    same_set = ref_embeddings is None
    ref = embeddings if same_set else ref_embeddings
    sim = cosine_similarity(embeddings, None if same_set else ref)
    pos, neg = _pair_masks(labels, None if same_set else ref_labels, indices, sim.shape[0], sim.shape[1])
    valid = pos.any(1) & neg.any(1)
    if not bool(valid.any()):
        return zero_loss(embeddings, ref)  # type: ignore[arg-type]
    optimum_pos, optimum_neg = 1.0 + m, -m
    delta_pos, delta_neg = 1.0 - m, m
    alpha_pos = F.relu(optimum_pos - sim.detach())
    alpha_neg = F.relu(sim.detach() - optimum_neg)
    logits_pos = -gamma * alpha_pos * (sim - delta_pos)
    logits_neg = gamma * alpha_neg * (sim - delta_neg)
    lse = masked_logsumexp(logits_pos, pos)[0] + masked_logsumexp(logits_neg, neg)[0]
    per_anchor = F.softplus(torch.where(valid, lse, lse.new_zeros(())))
    return per_anchor[valid].mean()


@LOSSES.register("circle")
class CircleLoss(nn.Module):
    r"""Circle loss: self-paced weighting of each similarity towards its own optimum.

    For an anchor with positive similarities $s_p^i$ and negative similarities $s_n^j$ (cosine):

    $$ L = \log\Big[1 + \sum_{j} e^{\gamma \alpha_n^j (s_n^j - \Delta_n)}
           \sum_{i} e^{-\gamma \alpha_p^i (s_p^i - \Delta_p)}\Big]
         = \operatorname{softplus}\big(\operatorname{LSE}_j[\gamma\alpha_n^j(s_n^j-\Delta_n)]
           + \operatorname{LSE}_i[-\gamma\alpha_p^i(s_p^i-\Delta_p)]\big) $$

    with $\alpha_p^i = [O_p - s_p^i]_+$, $\alpha_n^j = [s_n^j - O_n]_+$ (constants in
    back-propagation, as in the paper's reference code), $O_p = 1 + m$, $O_n = -m$,
    $\Delta_p = 1 - m$, $\Delta_n = m$. The loss is averaged over the anchors that have at least one
    positive and one negative. Similarity-native: uses cosine similarity (larger = closer).

    Reference: Y. Sun, C. Cheng, Y. Zhang, C. Zhang, L. Zheng, Z. Wang, Y. Wei, "Circle Loss: A
    Unified Perspective of Pair Similarity Optimization", CVPR 2020.

    Defaults: the paper's fine-grained image retrieval (deep metric learning) setting of §4.1,
    $\gamma = 80$, $m = 0.4$. Its face-recognition default is $\gamma = 256$, $m = 0.25$ and its
    re-ID setting $\gamma = 128$, $m = 0.25$. PML's ``CircleLoss(m, gamma)`` is the same function
    (same defaults, mean over anchors with a non-zero loss).

    Args:
        m: relaxation margin $m$.
        gamma: scale factor $\gamma$.

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``, optional ref ``(R, D)`` / ``(R,)``; output scalar.

    Requirements:
        ≥ 2 samples per class in a batch and ≥ 2 classes; otherwise the loss is 0 (with a graph).

    Example:
        >>> import torch
        >>> loss_fn = CircleLoss()
        >>> embeddings = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(embeddings, labels)
        >>> loss.backward()
        >>> bool(torch.isfinite(embeddings.grad).all())
        True
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(self, m: float = 0.4, gamma: float = 80.0) -> None:
        super().__init__()
        if gamma <= 0:
            raise ConfigError(f"gamma must be > 0; got {gamma}")
        self.m = float(m)
        self.gamma = float(gamma)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_inputs(embeddings, labels, ref_embeddings, ref_labels)
        return circle_loss(
            embeddings, labels, indices, ref_embeddings, ref_labels, m=self.m, gamma=self.gamma
        )

    def extra_repr(self) -> str:
        return f"m={self.m}, gamma={self.gamma}"
