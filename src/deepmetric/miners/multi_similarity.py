"""Multi-similarity pair mining (Wang et al. 2019) on cosine similarity."""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from deepmetric.distances import cosine_similarity
from deepmetric.miners._blocks import (
    LabelGroups,
    MinedTuples,
    MiningNote,
    Operands,
    Outputs,
    big,
    cat_indices,
    supported,
)
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


class _Kept:
    """The kept pairs of a block of anchors (scratch tensors, valid until the next call)."""

    def __init__(self, groups: LabelGroups, epsilon: float) -> None:
        self.groups, self.epsilon = groups, epsilon

    def __call__(self, start: int, end: int, sim: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(keep_pos (rows, W) over the positive slots, keep_neg (rows, R))``; ``sim`` is overwritten.
        With ``out`` (a float block) ``keep_neg`` is written there as 0/1 instead of a boolean."""
        pi, pv = self.groups.pidx[start:end], self.groups.pvalid[start:end]
        s_ap = sim.gather(1, pi)
        if pi.shape[1]:
            hardest_pos = s_ap.masked_fill(~pv, float("inf")).amin(1, keepdim=True)  # least similar positive
        else:
            hardest_pos = torch.full((end - start, 1), float("inf"), dtype=sim.dtype, device=sim.device)
        sim_neg = self.groups.push(sim, start, end, -big(sim.dtype))  # in place: negatives keep their similarity
        hardest_neg = sim_neg.amax(1, keepdim=True)  # most similar negative (about -huge if none)
        keep_pos = pv & (s_ap - self.epsilon < hardest_neg)
        sim_neg.add_(self.epsilon)  # sim + epsilon on the negatives
        keep_neg = torch.gt(sim_neg, hardest_pos) if out is None else torch.gt(sim_neg, hardest_pos, out=out)
        return keep_pos, keep_neg


class MultiSimilarityNote(MiningNote):
    """:func:`_multi_similarity_blocked` kept, per similarity block, ``kept`` 's negatives (``counts``)."""

    kind = "multi_similarity_pairs"

    def __init__(self, kept: "_Kept", embeddings: Tensor, labels: Tensor) -> None:
        super().__init__(kept.groups, embeddings, labels, "cosine")
        self.kept = kept


def _multi_similarity_blocked(
    ops: Operands, labels: Tensor, ref_labels: Tensor, same_set: bool, epsilon: float,
    note_for: Tensor | None = None,
) -> Pairs:
    """The uncapped pairs of :func:`multi_similarity_pairs` from similarity blocks of a few anchors, in the
    same order; the positives are read from the sorted labels, the negatives from the block with the
    same-label cells pushed to -huge and written block by block straight into the outputs."""
    groups = LabelGroups(labels, ref_labels, same_set)
    device = groups.pidx.device
    kept = _Kept(groups, epsilon)
    note = MultiSimilarityNote(kept, note_for, labels) if note_for is not None else None
    pos_rows, pos_cols = [], []
    outputs = Outputs(2, ops.rows, device)
    found = torch.empty(0, 2, dtype=torch.long, device=device)
    for start, end, sim in ops.blocks(similarity=True):
        keep_pos, keep_neg = kept(start, end, sim)
        r, j = keep_pos.nonzero(as_tuple=True)
        pos_rows.append(r + start)
        pos_cols.append(groups.pidx[start:end][r, j])
        torch.nonzero(keep_neg, out=found.resize_(0, 2))  # reuses the storage
        count = found.shape[0]
        if note is not None:
            note.record(start, end, count)
        if count:
            sl = outputs.take(count, end)
            a2, n = outputs.bufs
            torch.add(found[:, 0], start, out=a2[sl])
            n[sl].copy_(found[:, 1])
    a2, n = outputs.finish()
    pairs = (cat_indices(pos_rows, device), cat_indices(pos_cols, device), a2, n)
    return pairs if note is None else MinedTuples(pairs, note)  # type: ignore[return-value]


@MINERS.register("multi_similarity")
class MultiSimilarityMiner(nn.Module):
    """Multi-similarity pair mining: keep the negatives and positives that violate the ε-relaxed order.

    With cosine similarities $$S_{ij}$$ (similarity-native, as in the paper; larger = closer), for
    each anchor a

    $$ \\text{negative } (a, n) \\text{ kept iff } S_{an} + \\epsilon > \\min_{p:\\,y_p = y_a} S_{ap}, \\qquad
       \\text{positive } (a, p) \\text{ kept iff } S_{ap} - \\epsilon < \\max_{n:\\,y_n \\ne y_a} S_{an}. $$

    An anchor without positives keeps no negatives and vice versa. Output: pairs
    ``(a1, p, a2, n)`` (similarities in blocks of a few anchors, pairs written straight into the
    outputs; without a cap or reference set the 4-tuple also notes how it was mined, which lets
    :class:`~deepmetric.losses.TripletMarginLoss` recompute the negatives instead of reading them), the input of
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
        if supported(embeddings, None if same_set else ref_embeddings, "cosine"):
            ops = Operands(embeddings, None if same_set else ref_embeddings, "cosine")
            if self.tuples_per_anchor is None and same_set:  # the loss may recompute these pairs
                return _multi_similarity_blocked(ops, labels, ref_labels, same_set, self.epsilon, embeddings)
            a1, p, a2, n = _multi_similarity_blocked(ops, labels, ref_labels, same_set, self.epsilon)
            if self.tuples_per_anchor is not None:
                generator = self.rng.get(embeddings.device)
                kp = random_cap(a1, self.tuples_per_anchor, generator)
                kn = random_cap(a2, self.tuples_per_anchor, generator)
                a1, p, a2, n = a1[kp], p[kp], a2[kn], n[kn]
            return a1, p, a2, n
        sim = cosine_similarity(embeddings, None if same_set else ref_embeddings)
        pos, neg = masks(labels, ref_labels, same_set)
        return multi_similarity_pairs(
            sim, pos, neg, self.epsilon, self.tuples_per_anchor, self.rng.get(embeddings.device)
        )
