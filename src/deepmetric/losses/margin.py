"""Margin loss with a learnable boundary β (Wu et al., "Sampling Matters", ICCV 2017)."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.distances import euclidean
from deepmetric.errors import ConfigError, DataError
from deepmetric.registry import LOSSES
from deepmetric.losses._pairs import resolve_masks
from deepmetric.tuples import Indices, check_inputs, zero_loss

__all__ = ["MarginLoss", "margin_loss"]


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


def margin_loss(
    embeddings: Tensor,
    labels: Tensor,
    beta: Tensor,
    indices: Indices | None = None,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    *,
    margin: float = 0.2,
    nu: float = 0.0,
) -> Tensor:
    """Margin loss value; see :class:`MarginLoss`. Inputs are assumed validated.

    Args:
        beta: ``(1,)`` shared boundary or ``(C,)`` class-specific boundaries (indexed by the
            anchor's label).
    """
    same_set = ref_embeddings is None
    queries = F.normalize(embeddings, dim=1)
    ref = queries if same_set else F.normalize(ref_embeddings, dim=1)  # type: ignore[arg-type]
    dist = euclidean(queries, ref)
    pos, neg = _pair_masks(labels, None if same_set else ref_labels, indices, dist.shape[0], dist.shape[1])
    if not bool(pos.any()):
        return zero_loss(embeddings, ref, beta)
    if beta.numel() == 1:
        beta_rows = beta.reshape(1).to(dist.dtype).expand(dist.shape[0])
    else:
        beta_rows = beta.to(dist.dtype)[labels]
    beta_col = beta_rows.unsqueeze(1)
    zero = dist.new_zeros(())
    pos_loss = torch.where(pos, F.relu(margin + dist - beta_col), zero)
    neg_loss = torch.where(neg, F.relu(margin - dist + beta_col), zero)
    active = ((pos_loss > 0) | (neg_loss > 0)).sum()
    pairs_per_row = (pos | neg).sum(1).to(dist.dtype)
    regulariser = nu * (beta_rows * pairs_per_row).sum()
    return (pos_loss.sum() + neg_loss.sum() + regulariser) / active.clamp_min(1).to(dist.dtype)


@LOSSES.register("margin")
class MarginLoss(nn.Module):
    r"""Margin loss: positives inside a learnable boundary $\beta - \alpha$, negatives beyond $\beta + \alpha$.

    With $D_{ij}$ the euclidean distance between L2-normalised embeddings and $y_{ij} = +1$ for a
    positive pair, $-1$ for a negative pair,

    $$ \ell(i,j) = \big[\alpha + y_{ij}(D_{ij} - \beta_{c(i)})\big]_+ ,\qquad
       L = \frac{\sum_{(i,j)} \ell(i,j) + \nu \sum_{(i,j)} \beta_{c(i)}}
                {\#\{(i,j) : \ell(i,j) > 0\}} . $$

    Reference: C.-Y. Wu, R. Manmatha, A. J. Smola, P. Krähenbühl, "Sampling Matters in Deep
    Embedding Learning", ICCV 2017 (loss Eq. 4, objective with the $\nu$ term Eq. 6; normalising by
    the number of pairs with non-zero loss follows the authors' released code). Pair it with
    ``DistanceWeightedMiner`` (the paper's sampler); its triplets are reduced to their unique
    positive and negative pairs, so each pair counts once.

    Choices: $\beta = \beta^{(0)}$ (one shared value) by default, or class-specific
    $\beta^{(class)}_c$ with ``num_classes=C`` (the image-specific $\beta^{(img)}$ is not provided);
    $\beta$ is an ``nn.Parameter`` (``learn_beta=True``, the paper learns it; give it its own
    learning rate as the paper does). The $\nu$ penalty is taken per pair as written in Eq. 6 (the
    authors' code adds $\nu\beta$ once per triplet, i.e. $\nu/2$ per pair). Without ``indices`` all
    ordered pairs of the batch are used. No active pair gives the regulariser alone (divided by 1).

    PML mapping: ``pml.MarginLoss(margin=α, nu=0, beta=β, learn_beta=True, num_classes=...)`` with
    triplets whose (a, p) and (a, n) pairs are all distinct gives the same value and gradients (PML
    turns "all pairs" into all triplets, which repeats pairs, so only that case is comparable).

    Args:
        margin: $\alpha$, half-width of the separation band.
        beta: initial $\beta$ (boundary between positive and negative distances).
        nu: $\nu$, weight of the $\beta$ regulariser.
        num_classes: if given, one $\beta$ per class (labels must be in ``[0, num_classes)``).
        learn_beta: keep $\beta$ trainable (``nn.Parameter``) or fixed (buffer).

    Shape:
        embeddings ``(B, D)``, labels ``(B,)``, optional ref ``(R, D)`` / ``(R,)``; output scalar.

    Requirements:
        ≥ 2 samples per class in a batch; a batch without any positive pair gives 0.

    Example:
        >>> import torch
        >>> loss_fn = MarginLoss()
        >>> embeddings = torch.randn(8, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        >>> loss = loss_fn(embeddings, labels)
        >>> loss.backward()
        >>> loss_fn.beta.grad is not None
        True
    """

    tuple_kind: ClassVar[str | None] = "pairs"
    label_kind: ClassVar[str] = "class"

    def __init__(
        self,
        margin: float = 0.2,
        beta: float = 1.2,
        nu: float = 0.0,
        num_classes: int | None = None,
        learn_beta: bool = True,
    ) -> None:
        super().__init__()
        if margin < 0:
            raise ConfigError(f"margin must be >= 0; got {margin}")
        if num_classes is not None and int(num_classes) < 1:
            raise ConfigError(f"num_classes must be a positive integer; got {num_classes}")
        self.margin = float(margin)
        self.nu = float(nu)
        self.num_classes = None if num_classes is None else int(num_classes)
        init = torch.full((self.num_classes or 1,), float(beta))
        if learn_beta:
            self.beta = nn.Parameter(init)
        else:
            self.register_buffer("beta", init)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices: Indices | None = None,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        check_inputs(embeddings, labels, ref_embeddings, ref_labels)
        if self.num_classes is not None and labels.numel() and (
            int(labels.min()) < 0 or int(labels.max()) >= self.num_classes
        ):
            raise DataError(
                f"MarginLoss(num_classes={self.num_classes}) needs labels in [0, {self.num_classes}); "
                f"got range [{int(labels.min())}, {int(labels.max())}]"
            )
        return margin_loss(
            embeddings,
            labels,
            self.beta,
            indices,
            ref_embeddings,
            ref_labels,
            margin=self.margin,
            nu=self.nu,
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, nu={self.nu}, num_classes={self.num_classes}"
