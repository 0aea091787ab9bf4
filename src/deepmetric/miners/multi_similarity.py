"""Multi-similarity pair mining (Wang et al. 2019) on cosine similarity."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.distances import cosine_similarity
from deepmetric.miners._common import SeededRNG, check_cap, masks, prepare, random_cap
from deepmetric.registry import MINERS
from deepmetric.tuples import Pairs

__all__ = ["MultiSimilarityMiner", "multi_similarity_pairs"]


def multi_similarity_pairs(
    sim: Tensor,
    pos_mask: Tensor,
    neg_mask: Tensor,
    epsilon: float = 0.1,
    tuples_per_anchor: int | None = None,
    generator: torch.Generator | None = None,
) -> Pairs:
    """Informative pairs under the multi-similarity pair-mining rule (see :class:`MultiSimilarityMiner`).

    ``sim`` is a ``(B, R)`` similarity (larger = closer). Returns ``(a1, p, a2, n)``.
    """
    hardest_pos = sim.masked_fill(~pos_mask, float("inf")).amin(1, keepdim=True)
    hardest_neg = sim.masked_fill(~neg_mask, float("-inf")).amax(1, keepdim=True)
    keep_neg = neg_mask & (sim + epsilon > hardest_pos)
    keep_pos = pos_mask & (sim - epsilon < hardest_neg)
    a1, p = keep_pos.nonzero(as_tuple=True)
    a2, n = keep_neg.nonzero(as_tuple=True)
    if tuples_per_anchor is not None:
        kp = random_cap(a1, tuples_per_anchor, generator)
        kn = random_cap(a2, tuples_per_anchor, generator)
        a1, p, a2, n = a1[kp], p[kp], a2[kn], n[kn]
    return a1, p, a2, n


@MINERS.register("multi_similarity")
class MultiSimilarityMiner(nn.Module):
    """Multi-similarity pair mining: keep the negatives and positives that violate the ε-relaxed order.

    With cosine similarities $$S_{ij}$$ (similarity-native, as in the paper; larger = closer), for
    each anchor a

    $$ \\text{negative } (a, n) \\text{ kept iff } S_{an} + \\epsilon > \\min_{p:\\,y_p = y_a} S_{ap}, \\qquad
       \\text{positive } (a, p) \\text{ kept iff } S_{ap} - \\epsilon < \\max_{n:\\,y_n \\ne y_a} S_{an}. $$

    An anchor without positives keeps no negatives and vice versa. Output: pairs
    ``(a1, p, a2, n)`` (O(B·R) memory; no triplets are formed), the input of
    :class:`MultiSimilarityLoss` and of any pair loss. ``tuples_per_anchor`` caps the kept positive
    pairs and, separately, the kept negative pairs of each anchor (uniform random subsets).

    Reference:
        Wang, Han, Huang, Dong & Scott, "Multi-Similarity Loss with General Pair Weighting for Deep
        Metric Learning", CVPR 2019 (§4.1, eqs. 7-8).

    Args:
        epsilon: the relaxation ε (paper: 0.1).
        tuples_per_anchor: at most this many positive pairs and this many negative pairs per anchor.
        seed: seed of the cap's random subsets (``None``: the global torch RNG).

    Shape:
        Input ``embeddings (B, D)``, ``labels (B,)``, optional ``ref_embeddings (R, D)``,
        ``ref_labels (R,)``. Output: pairs ``(a1, p, a2, n)``.

    Requirements:
        ≥ 2 samples per class (or positives in the reference set) and at least two classes.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.0]])
        >>> a1, p, a2, n = MultiSimilarityMiner(epsilon=0.1)(x, torch.tensor([0, 0, 1, 1]))
        >>> list(zip(a1.tolist(), p.tolist())), list(zip(a2.tolist(), n.tolist()))
        ([(0, 1), (1, 0), (2, 3), (3, 2)], [(0, 2), (1, 2), (1, 3), (2, 0), (2, 1), (3, 0), (3, 1)])
    """

    output_kind: ClassVar[str] = "pairs"

    def __init__(self, epsilon: float = 0.1, tuples_per_anchor: int | None = None, seed: int | None = None) -> None:
        super().__init__()
        self.epsilon = float(epsilon)
        self.tuples_per_anchor = check_cap(tuples_per_anchor)
        self.rng = SeededRNG(seed)

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, tuples_per_anchor={self.tuples_per_anchor}, seed={self.rng.seed}"

    @torch.no_grad()
    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_embeddings: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Pairs:
        labels, ref_embeddings, ref_labels, same_set = prepare(embeddings, labels, ref_embeddings, ref_labels)
        sim = cosine_similarity(embeddings, None if same_set else ref_embeddings)
        pos, neg = masks(labels, ref_labels, same_set)
        return multi_similarity_pairs(
            sim, pos, neg, self.epsilon, self.tuples_per_anchor, self.rng.get(embeddings.device)
        )
