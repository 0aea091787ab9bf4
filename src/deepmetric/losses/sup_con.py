"""Supervised contrastive loss, L^sup_out (Khosla et al., NeurIPS 2020)."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.distances import cosine_similarity
from deepmetric.errors import ConfigError
from deepmetric.registry import LOSSES
from deepmetric.losses._pairs import masked_logsumexp, resolve_masks
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["SupConLoss", "sup_con_loss"]


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


def sup_con_loss(
    embeddings: Tensor,
    labels: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    temperature: float = 0.1,
) -> Tensor:
    """SupCon (L^sup_out) value; see :class:`SupConLoss`. Inputs are assumed validated."""
    same_set = ref_embeddings is None
    ref = embeddings if same_set else ref_embeddings
    logits = cosine_similarity(embeddings, None if same_set else ref) / temperature
    pos, neg = _pair_masks(labels, None if same_set else ref_labels, indices, logits.shape[0], logits.shape[1])
    has_pos = pos.any(1)
    if not bool(has_pos.any()):
        return zero_loss(embeddings, ref)  # type: ignore[arg-type]
    log_denominator, _ = masked_logsumexp(logits, pos | neg)  # A(i): every candidate but i itself
    pos_logit_sum = torch.where(pos, logits, logits.new_zeros(())).sum(1)
    num_pos = pos.sum(1)
    per_anchor = log_denominator - pos_logit_sum / num_pos.clamp_min(1).to(logits.dtype)
    return per_anchor[has_pos].mean()


@LOSSES.register("sup_con")
class SupConLoss(nn.Module):
    r"""Supervised contrastive loss ($L^{sup}_{out}$): softmax over the batch, averaged over positives.

    With $z$ the L2-normalised embeddings, $P(i)$ the positives of anchor $i$ and $A(i)$ every
    other sample of the batch (positives and negatives):

    $$ L = \frac{1}{|I|}\sum_{i\in I} \frac{-1}{|P(i)|}\sum_{p\in P(i)}
           \log\frac{\exp(z_i\cdot z_p/\tau)}{\sum_{a\in A(i)}\exp(z_i\cdot z_a/\tau)},
       \qquad I = \{i : |P(i)| > 0\}. $$

    Reference: P. Khosla, P. Teterwak, C. Wang, A. Sarna, Y. Tian, P. Isola, A. Maschinot, C. Liu,
    D. Krishnan, "Supervised Contrastive Learning", NeurIPS 2020 (Eq. 2, the "out" variant the paper
    recommends). Similarity-native: cosine similarity (larger = closer).

    Choices: anchors without positives are excluded (the paper's formula is undefined for them);
    the sum over anchors of Eq. 2 is replaced by the mean, as in the authors' code, and the code's
    extra factor $\tau/\tau_{base}$ (1 at its defaults) is omitted. With mined ``indices``,
    $P(i)$ are the given positive pairs and $A(i)$ the given positive and negative pairs. Memory is
    $O(B \cdot R)$: one similarity matrix and two masks, never a (positives × negatives) matrix.
    Views of the same image are passed as separate rows with the same label.

    PML mapping: ``pml.SupConLoss(temperature=τ)`` is the same function when the batch has at least
    one positive and one negative pair (PML returns 0 for a single-class batch; this loss does not).

    Args:
        temperature: $\tau$ (the paper uses 0.1).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``, optional ref ``(R, D)`` / ``(R,)``; output scalar.

    Requirements:
        ≥ 2 samples (or views) per class; a batch without positive pairs gives 0 (with a graph).

    Example:
        >>> import torch
        >>> loss_fn = SupConLoss(temperature=0.1)
        >>> embeddings = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(embeddings, labels)
        >>> loss.backward()
        >>> bool(loss.item() > 0)
        True
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0; got {temperature}")
        self.temperature = float(temperature)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_inputs(embeddings, labels, ref_embeddings, ref_labels)
        return sup_con_loss(
            embeddings, labels, indices, ref_embeddings, ref_labels, temperature=self.temperature
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
