"""Easy-positive / easy-negative mining: the closest positive and the negatives beyond the margin."""
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

__all__ = ["EasyMiner", "easy_triplets"]

_POSITIVES = ("easiest", "all")
_NEGATIVES = ("all", "hardest", "random")


def easy_triplets(
    dist: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    margin: float = 0.2,
    positives: str = "easiest",
    negatives: str = "all",
    tuples_per_anchor: int | None = None,
    generator: torch.Generator | None = None,
    budget: int = CHUNK_ELEMENTS,
) -> Triplets:
    """Easy triplets (see :class:`EasyMiner`), computed over bounded anchor chunks."""
    if positives == "easiest":
        a = pos_mask.any(1).nonzero(as_tuple=True)[0]
        p = dist.masked_fill(~pos_mask, float("inf")).argmin(1)[a]
    else:
        a, p = pos_mask.nonzero(as_tuple=True)
    low = dist[a, p] + margin
    high = torch.full_like(low, float("inf"))
    return band_triplets(
        dist, a, p, neg_mask, low, high, negatives,  # type: ignore[arg-type]
        cap=tuples_per_anchor, generator=generator, budget=budget,
    )


@MINERS.register("easy")
class EasyMiner(nn.Module):
    """Easy triplets: each anchor's easiest (closest) positive with the easy negatives beyond the margin.

    $$ p^e(a) = \\arg\\min_{p:\\,y_p = y_a,\\,p \\ne a} d(a, p), \\qquad
       \\mathcal{N}_e(a, p) = \\{\\, n : y_n \\ne y_a,\\; d(a, n) > d(a, p) + \\alpha \\,\\} $$

    The positive is the *easy positive* of Xuan et al. (the most similar sample of the class, which
    lets a class keep several modes instead of collapsing them); the negatives are the *easy
    negatives* of the hard / semi-hard / easy taxonomy (FaceNet, §3.2): negatives already farther
    than the positive by the margin, whose hinge triplet loss is zero. Easy triplets are useful as a
    curriculum start, for losses that still weight them (NCA-style or soft-margin losses, as Xuan et
    al. use), and for analysis. Options:

    * ``positives="easiest"`` (default): one positive per anchor, the closest; ``"all"``: every
      positive pair.
    * ``negatives="all"`` (default): every easy negative; ``"hardest"``: the closest easy negative;
      ``"random"``: one uniformly random easy negative per (a, p).

    With ``positives="all", negatives="all"`` the result is the set PML's
    ``TripletMarginMiner(type_of_triplets="easy")`` returns. Output size: at most R per anchor with
    the default easiest positive; up to P·N per anchor with ``positives="all"`` (use
    ``tuples_per_anchor``). Memory is O(B·R) (anchor chunks).

    Reference:
        Xuan, Stylianou & Pless, "Improved Embeddings with Easy Positive Triplet Mining", WACV 2020
        (easy positives); Schroff, Kalenichenko & Philbin, "FaceNet", CVPR 2015 (hard / semi-hard /
        easy negatives).

    Args:
        margin: the margin α that separates easy from semi-hard negatives.
        distance: ``"squared_euclidean"`` (default, as FaceNet and :class:`TripletMarginLoss`),
            ``"euclidean"`` or ``"cosine"``; use the loss's distance and margin.
        positives: ``"easiest"`` or ``"all"``.
        negatives: ``"all"``, ``"hardest"`` or ``"random"``.
        tuples_per_anchor: at most this many triplets per anchor (uniform random subset).
        seed: seed of the random choices (``None``: the global torch RNG).

    Shape:
        Input ``embeddings (B, D)``, ``labels (B,)``, optional ``ref_embeddings (R, D)``,
        ``ref_labels (R,)``. Output: triplets ``(a, p, n)``.

    Requirements:
        ≥ 2 samples per class (or positives in the reference set) and at least two classes.

    Example:
        >>> x = torch.tensor([[0.0], [0.1], [1.0], [0.2], [3.0]])
        >>> a, p, n = EasyMiner(margin=0.5)(x, torch.tensor([0, 0, 0, 1, 1]))
        >>> [(i, j, k) for i, j, k in zip(a.tolist(), p.tolist(), n.tolist())]
        [(0, 1, 4), (1, 0, 4), (2, 1, 4), (4, 3, 0), (4, 3, 1)]
        >>> # squared distances: anchor 3's only positive is at 7.84 and no negative is beyond 8.34
    """

    output_kind: ClassVar[str] = "triplets"

    def __init__(
        self,
        margin: float = 0.2,
        distance: str = "squared_euclidean",
        positives: str = "easiest",
        negatives: str = "all",
        tuples_per_anchor: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_choice("positives", positives, _POSITIVES)
        check_choice("negatives", negatives, _NEGATIVES)
        self.margin = float(margin)
        self.distance = distance
        self._distance = get_distance(distance)
        self.positives = positives
        self.negatives = negatives
        self.tuples_per_anchor = check_cap(tuples_per_anchor)
        self.rng = SeededRNG(seed)

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, distance={self.distance!r}, positives={self.positives!r}, "
            f"negatives={self.negatives!r}, tuples_per_anchor={self.tuples_per_anchor}, seed={self.rng.seed}"
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
        return easy_triplets(
            dist, pos, neg, self.margin, self.positives, self.negatives, self.tuples_per_anchor,
            self.rng.get(embeddings.device),
        )
