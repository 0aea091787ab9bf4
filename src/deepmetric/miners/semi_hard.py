"""Semi-hard negative mining (FaceNet): negatives farther than the positive but inside the margin."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.distances import get_distance
from deepmetric.miners._common import (
    CHUNK_ELEMENTS,
    SeededRNG,
    band_triplets,
    check_cap,
    check_choice,
    masks,
    prepare,
)
from deepmetric.registry import MINERS
from deepmetric.tuples import Triplets

__all__ = ["SemiHardMiner", "semi_hard_triplets"]

_NEGATIVES = ("hardest", "random", "all")
_FALLBACKS = (None, "hardest", "easiest")


def semi_hard_triplets(
    dist: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    margin: float = 0.2,
    negatives: str = "hardest",
    fallback: str | None = None,
    tuples_per_anchor: int | None = None,
    generator: torch.Generator | None = None,
    budget: int = CHUNK_ELEMENTS,
) -> Triplets:
    """Semi-hard triplets for every positive pair ``(a, p)`` of ``pos_mask`` (see :class:`SemiHardMiner`).

    Works over anchor chunks of at most about ``budget`` (pair, reference) cells, so memory stays
    O(B·R) whatever the number of positive pairs.
    """
    a, p = pos_mask.nonzero(as_tuple=True)
    d_ap = dist[a, p]
    fallback_n = None
    if fallback is not None:
        if fallback == "hardest":
            fallback_n = dist.masked_fill(~neg_mask, float("inf")).argmin(1)
        else:
            fallback_n = dist.masked_fill(~neg_mask, float("-inf")).argmax(1)
        fallback_n = torch.where(neg_mask.any(1), fallback_n, torch.full_like(fallback_n, -1))
    return band_triplets(
        dist, a, p, neg_mask, d_ap, d_ap + margin, negatives,  # type: ignore[arg-type]
        cap=tuples_per_anchor, generator=generator, fallback=fallback_n, budget=budget,
    )


@MINERS.register("semi_hard")
class SemiHardMiner(nn.Module):
    """Semi-hard triplets (FaceNet): negatives farther than the positive but within the margin.

    For every positive pair (a, p) the semi-hard negatives are

    $$ \\mathcal{N}_{sh}(a, p) = \\{\\, n : y_n \\ne y_a,\\; d(a, p) < d(a, n) < d(a, p) + \\alpha \\,\\} $$

    i.e. the negatives whose triplet loss $$[d(a,p) - d(a,n) + \\alpha]_+$$ is positive but which are not
    closer than the positive. FaceNet uses *all* anchor-positive pairs and, per pair, one semi-hard
    negative; which one is chosen by ``negatives``:

    * ``"hardest"`` (default, as in FaceNet's reference implementation ``triplet_semihard_loss``):
      the semi-hard negative closest to the anchor; at most one triplet per positive pair.
    * ``"random"``: one uniformly random semi-hard negative per positive pair.
    * ``"all"``: every semi-hard negative (the set PML's ``TripletMarginMiner(type_of_triplets=
      "semihard")`` returns). The output can be large (up to P·N per anchor); combine with
      ``tuples_per_anchor``.

    A positive pair without any semi-hard negative is dropped unless ``fallback`` is set:
    ``"hardest"`` uses the anchor's closest negative (a hard triplet), ``"easiest"`` its farthest one
    (what ``triplet_semihard_loss`` does when no negative is farther than the positive).
    ``tuples_per_anchor`` then keeps a uniform random subset of at most that many triplets per
    anchor. The computation never forms all triplets: it runs over anchor chunks of bounded size
    (O(B·R) memory).

    Reference:
        Schroff, Kalenichenko & Philbin, "FaceNet: A Unified Embedding for Face Recognition and
        Clustering", CVPR 2015 (§3.2, eq. 4).

    Args:
        margin: the triplet margin α (FaceNet: 0.2). Use the same margin and distance as the loss,
            otherwise "semi-hard" refers to a different band than the one the loss penalises.
        distance: ``"squared_euclidean"`` (default; FaceNet's choice and the default of
            :class:`TripletMarginLoss`), ``"euclidean"`` or ``"cosine"``.
        negatives: ``"hardest"``, ``"random"`` or ``"all"`` (see above).
        fallback: ``None``, ``"hardest"`` or ``"easiest"`` (see above).
        tuples_per_anchor: at most this many triplets per anchor (uniform random subset); ``None``:
            no cap.
        seed: seed of the random choices (``None``: the global torch RNG).

    Shape:
        Input ``embeddings (B, D)``, ``labels (B,)``, optional ``ref_embeddings (R, D)``,
        ``ref_labels (R,)``. Output: triplets ``(a, p, n)``; at most one per positive pair unless
        ``negatives="all"``.

    Requirements:
        ≥ 2 samples per class (or positives in the reference set) and at least two classes.

    Example:
        >>> x = torch.tensor([[0.0], [0.5], [0.6], [2.0]])
        >>> a, p, n = SemiHardMiner(margin=0.2)(x, torch.tensor([0, 0, 1, 1]))
        >>> a.tolist(), p.tolist(), n.tolist()  # squared distances: 0.25 < d(0, 2) = 0.36 < 0.45
        ([0], [1], [2])
    """

    output_kind: ClassVar[str] = "triplets"

    def __init__(
        self,
        margin: float = 0.2,
        distance: str = "squared_euclidean",
        negatives: str = "hardest",
        fallback: str | None = None,
        tuples_per_anchor: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("negatives", negatives, _NEGATIVES)
        check_choice("fallback", fallback, _FALLBACKS)
        self.margin = float(margin)
        self.distance = distance
        self._distance = get_distance(distance)
        self.negatives = negatives
        self.fallback = fallback
        self.tuples_per_anchor = check_cap(tuples_per_anchor)
        self.rng = SeededRNG(seed)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, distance={self.distance!r}, negatives={self.negatives!r}, "
            f"fallback={self.fallback!r}, tuples_per_anchor={self.tuples_per_anchor}, seed={self.rng.seed}"
        )

    @torch.no_grad()
    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Triplets:
        labels, ref_embeddings, ref_labels, same_set = prepare(embeddings, labels, ref_embeddings, ref_labels)
        dist = self._distance(embeddings, None if same_set else ref_embeddings)
        pos, neg = masks(labels, ref_labels, same_set)
        return semi_hard_triplets(
            dist, pos, neg, self.margin, self.negatives, self.fallback, self.tuples_per_anchor,
            self.rng.get(embeddings.device),
        )
