"""Every valid triplet of the batch, optionally a uniform random subset per anchor."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.miners._common import SeededRNG, check_cap, masks, prepare, sample_distinct
from deepmetric.registry import MINERS
from deepmetric.tuples import Triplets

__all__ = ["AllTripletsMiner", "all_triplets"]


def all_triplets(
    pos_mask: Tensor,
    neg_mask: Tensor,
    tuples_per_anchor: int | None = None,
    generator: torch.Generator | None = None,
) -> Triplets:
    """Triplets ``(a, p, n)`` with ``pos_mask[a, p]`` and ``neg_mask[a, n]``.

    Without a cap every triplet is returned, sorted by ``(a, p, n)``. With a cap ``k`` each anchor gets
    a uniform random set of ``min(k, P_a N_a)`` distinct triplets, drawn without enumerating the
    ``P_a N_a`` candidates (so the cost is O(B·R + B·k) however many triplets exist).
    """
    pos_count = pos_mask.sum(1)
    neg_count = neg_mask.sum(1)
    a, local = sample_distinct(pos_count * neg_count, tuples_per_anchor, generator)
    pos_cols = pos_mask.nonzero(as_tuple=True)[1]  # row-major: grouped by anchor
    neg_cols = neg_mask.nonzero(as_tuple=True)[1]
    pos_start = torch.cumsum(pos_count, 0) - pos_count
    neg_start = torch.cumsum(neg_count, 0) - neg_count
    n_a = neg_count[a]
    p = pos_cols[pos_start[a] + torch.div(local, n_a, rounding_mode="floor")]
    n = neg_cols[neg_start[a] + local % n_a]
    return a, p, n


@MINERS.register("all_triplets")
class AllTripletsMiner(nn.Module):
    """All valid triplets (a, p, n): same label for (a, p), different label for (a, n).

    Nothing is filtered by distance. The number of triplets is $$\\sum_a P_a N_a$$ (cubic in the batch
    size for a P×K batch: about 50 M at B = 4096, K = 4); set ``tuples_per_anchor`` to keep a uniform
    random subset of at most that many distinct triplets per anchor, which is drawn without
    enumerating all candidates.

    Reference:
        The exhaustive triplet set of Weinberger & Saul, "Distance Metric Learning for Large Margin
        Nearest Neighbor Classification", JMLR 2009, and Schroff et al., "FaceNet", CVPR 2015 (§3.1).

    Args:
        tuples_per_anchor: at most this many triplets per anchor (uniform random, without
            replacement); ``None`` returns all of them.
        seed: seed of the random subset (``None``: the global torch RNG).

    Shape:
        Input ``embeddings (B, D)``, ``labels (B,)``, optional ``ref_embeddings (R, D)``,
        ``ref_labels (R,)``. Output: triplets ``(a, p, n)`` of equal length; ``a`` indexes the batch,
        ``p`` and ``n`` the reference set.

    Requirements:
        An anchor needs a positive (another sample of its class) and a negative; other anchors
        produce no triplets. Without ``ref_embeddings`` a sample is never its own positive.

    Example:
        >>> miner = AllTripletsMiner()
        >>> a, p, n = miner(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
        >>> len(a)  # 6 anchors x 1 positive x 4 negatives
        24
        >>> len(AllTripletsMiner(tuples_per_anchor=3, seed=0)(torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))[0])
        18
    """

    output_kind: ClassVar[str] = "triplets"

    def __init__(self, tuples_per_anchor: int | None = None, seed: int | None = None) -> None:
        super().__init__()
        self.tuples_per_anchor = check_cap(tuples_per_anchor)
        self.rng = SeededRNG(seed)

    def extra_repr(self) -> str:
        return f"tuples_per_anchor={self.tuples_per_anchor}, seed={self.rng.seed}"

    @torch.no_grad()
    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Triplets:
        labels, ref_embeddings, ref_labels, same_set = prepare(embeddings, labels, ref_embeddings, ref_labels)
        pos, neg = masks(labels, ref_labels, same_set)
        return all_triplets(pos, neg, self.tuples_per_anchor, self.rng.get(embeddings.device))
