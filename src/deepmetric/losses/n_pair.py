"""Multi-class N-pair loss (Sohn) on dot-product similarities, generalised to any labelled batch."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.losses._pairs import masked_logsumexp, resolve_masks
from deepmetric.registry import LOSSES
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["NPairLoss", "n_pair_loss"]


def n_pair_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    l2_reg: float = 0.002,
) -> Tensor:
    """Functional form of :class:`NPairLoss` (same arguments)."""
    same_set = ref_embeddings is None
    ref, ref_lab = check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    batch, ref_size = embeddings.shape[0], ref.shape[0]
    if _is_n_pair_batch(labels, ref_lab, indices, same_set):
        # the paper's batch: N anchors, their N positives, one class each. The positive of anchor i is
        # reference i and every other reference is a negative, so the loss is a cross-entropy with
        # target i: -log(e^{S_ii} / Σ_k e^{S_ik}) (one matmul, one log-softmax).
        sim = embeddings @ ref.T
        loss = F.cross_entropy(sim, torch.arange(batch, device=sim.device))
        if l2_reg:
            loss = loss + l2_reg * embeddings.norm(dim=1).mean()
        return loss
    pos, neg = resolve_masks(labels, None if same_set else ref_lab, indices, batch, ref_size)
    if not bool(pos.any()):
        return zero_loss(embeddings, None if same_set else ref)
    sim = embeddings @ (embeddings if same_set else ref).T
    neg_lse, has_neg = masked_logsumexp(sim, neg, dim=1)
    # −log( e^{S_ij} / (e^{S_ij} + Σ_k e^{S_ik}) ) = softplus(log Σ_k e^{S_ik} − S_ij); 0 without negatives.
    terms = F.softplus(neg_lse.unsqueeze(1) - sim)
    keep = pos & has_neg.unsqueeze(1)
    total = torch.where(keep, terms, torch.zeros_like(terms)).sum()
    loss = total / pos.sum().to(total.dtype)
    if l2_reg:
        loss = loss + l2_reg * embeddings.norm(dim=1).mean()
    return loss


def _is_n_pair_batch(labels: Tensor, ref_labels: Tensor, indices: Indices | None, same_set: bool) -> bool:
    """Whether ``(embeddings, ref_embeddings)`` is an N-pair batch: labels distinct (N ≥ 2) and
    ``ref_labels == labels`` elementwise, no mined indices."""
    if same_set or indices is not None or labels.shape != ref_labels.shape or labels.numel() < 2:
        return False
    if labels.is_floating_point() or not torch.equal(labels, ref_labels.to(labels.device)):
        return False
    values = labels.tolist()  # (N values: a set is cheaper than a tensor sort at any useful N)
    return len(set(values)) == len(values)


@LOSSES.register("n_pair")
class NPairLoss(nn.Module):
    r"""Multi-class N-pair loss: each positive pair against all other-class samples at once.

    Similarity-native: :math:`S_{ij} = f(x_i)^\top f(x_j)`, the **dot product of un-normalised
    embeddings** (as in the paper; the L2 penalty keeps norms in check).

    $$ L = \frac{-1}{|P|} \sum_{(i,j) \in P} \log \frac{e^{S_{ij}}}{e^{S_{ij}}
       + \sum_{k:\, y_k \ne y_i} e^{S_{ik}}} + \frac{\lambda}{m} \sum_{i=1}^{m} \lVert f(x_i) \rVert_2 $$

    Batch construction (the generalisation of the paper's N-pair batches to a P×K batch, as written
    in the survey formula above): every ordered positive pair :math:`(i, j)` of the batch (self
    excluded) is an (anchor, positive) and **every** other-class sample is a negative for it; with
    mined ``indices`` the positive pairs and each anchor's negatives are those given. The paper's
    original N-pair batch (one pair per class, the other classes' *positives* as negatives) is
    obtained by passing the N anchors as ``embeddings`` and their N positives as ``ref_embeddings``
    (labels = class ids). :math:`m` is the batch size; the regulariser uses the (unsquared) L2 norm
    as in that formula.

    Reference:
        K. Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective",
        NeurIPS (NIPS) 2016.

    Args:
        l2_reg: :math:`\lambda`, weight of the embedding-norm penalty (0.002, the value used with
            the N-pair objective in TensorFlow's reference ``npairs_loss``; 0 disables it).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``; ``ref_embeddings`` ``(R, D)``, ``ref_labels`` ``(R,)``;
        output: scalar. A batch with no positive pair returns 0 (with a graph; the penalty is then
        not added either).

    Requirements:
        ≥ 2 samples per class (K ≥ 2) and ≥ 2 classes per batch. Do not L2-normalise the embeddings
        (the paper does not; normalised inputs make the penalty a constant).

    Example:
        >>> import torch
        >>> loss_fn = NPairLoss(l2_reg=0.002)
        >>> emb = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(emb, labels)
        >>> loss.backward()
        >>> bool(loss > 0)
        True
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(self, l2_reg: float = 0.002) -> None:
        super().__init__()
        if l2_reg < 0:
            raise ConfigError(f"l2_reg must be >= 0; got {l2_reg}")
        self.l2_reg = float(l2_reg)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """Loss over all positive pairs of the batch, or over the pairs named by ``indices``."""
        return n_pair_loss(embeddings, labels, indices, ref_embeddings, ref_labels, l2_reg=self.l2_reg)

    def extra_repr(self) -> str:
        return f"l2_reg={self.l2_reg}"
