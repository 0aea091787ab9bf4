"""Distance-weighted negative sampling (Wu et al., "Sampling Matters", 2017)."""
from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.errors import ConfigError
from deepmetric.miners._blocks import LabelGroups, Operands, Scratch, big
from deepmetric.miners._common import SeededRNG, check_cap, prepare, random_cap
from deepmetric.registry import MINERS
from deepmetric.tuples import Triplets

__all__ = ["DistanceWeightedMiner", "distance_weighted_log_weights", "distance_weighted_probabilities"]


def distance_weighted_log_weights(dist: Tensor, dim: int, cutoff: float = 0.5) -> Tensor:
    """Unnormalised log sampling weight $$\\log q(d)^{-1}$$ of unit-sphere distances ``dist`` in ``dim`` dimensions.

    $$ \\log q(d)^{-1} = (2 - n)\\log d - \\tfrac{n - 3}{2}\\log\\bigl(1 - d^2/4\\bigr), \\quad d \\leftarrow \\max(d, \\text{cutoff}) $$

    ``1 - d²/4`` is clamped at a tiny positive value so antipodal points give a large finite weight.
    """
    d = dist.clamp_min(cutoff)
    tiny = torch.finfo(d.dtype).tiny
    if torch.is_grad_enabled() and d.requires_grad:
        return (2.0 - dim) * torch.log(d) - ((dim - 3.0) / 2.0) * torch.log((1.0 - 0.25 * d * d).clamp_min(tiny))
    # no autograd: the same operations in place on two (B, R) buffers
    log_w = torch.log(d).mul_(2.0 - dim)
    second = d.mul_(d).mul_(-0.25).add_(1.0).clamp_min_(tiny).log_().mul_((dim - 3.0) / 2.0)
    return log_w.sub_(second)


def distance_weighted_probabilities(
    dist: Tensor, neg_mask: Tensor, dim: int, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4
) -> Tensor:
    """``(B, R)`` per-anchor sampling probabilities of the negatives (rows sum to 1, or 0 without negatives).

    Negatives at distance ≥ ``nonzero_loss_cutoff`` get probability 0; a row where that leaves no
    negative falls back to uniform over its negatives. Normalised in log space (row-wise max).
    """
    log_w = distance_weighted_log_weights(dist, dim, cutoff)
    invalid = torch.logical_not(neg_mask).logical_or_(dist >= nonzero_loss_cutoff)
    if dist.isnan().any():
        invalid |= dist.isnan()  # ``dist < cutoff`` is False for NaN
    in_place = not (torch.is_grad_enabled() and log_w.requires_grad)
    log_w = log_w.masked_fill_(invalid, float("-inf")) if in_place else log_w.masked_fill(invalid, float("-inf"))
    row_max = log_w.amax(1, keepdim=True)
    has_valid = torch.isfinite(row_max)
    shift = torch.where(has_valid, row_max, torch.zeros_like(row_max))
    w = log_w.sub_(shift).exp_() if in_place else torch.exp(log_w - shift)
    if not bool(has_valid.all()):
        w = torch.where(has_valid, w, neg_mask.to(w.dtype))
    total = w.sum(1, keepdim=True)
    return w.div_(total.clamp_min(torch.finfo(w.dtype).tiny)) if in_place else w / total.clamp_min(torch.finfo(w.dtype).tiny)


def _block_probabilities(
    dist: Tensor, groups: LabelGroups, start: int, end: int, dim: int, cutoff: float, nonzero_loss_cutoff: float,
    scratch: Scratch,
) -> Tensor:
    """:func:`distance_weighted_probabilities` of the block of anchors ``start:end`` with one logarithm
    per cell instead of two (the same weights up to rounding), the non-negatives and the cells
    beyond the cutoff removed by an additive penalty instead of a boolean mask."""
    if bool(torch.isnan(dist).any()):  # not on finite inputs; keep the reference handling
        neg = groups.push(torch.zeros_like(dist), start, end) == 0
        return distance_weighted_probabilities(dist, neg, dim, cutoff, nonzero_loss_cutoff)
    shape, dtype, device = dist.shape, dist.dtype, dist.device
    huge = big(dtype)
    tiny = torch.finfo(dtype).tiny
    # log q(d)^{-1} = (2 - n) log d - c log(1 - d²/4), c = (n - 3)/2, equals
    # -c log(u (4 - u)) - log d + c log 4 with u = d²: one logarithm; the -log d factor is applied
    # after the exponential as a division by d (>= cutoff > 0, or 1 at d = 0 with cutoff 0), and the
    # constant cancels in the normalisation. Distances at or beyond the cutoff τ get weight 0 anyway:
    # clamping them to τ (< 2) keeps u (4 - u) > 0 without the tiny clamp.
    upper = min(nonzero_loss_cutoff, 2.0)
    d = torch.clamp(dist, cutoff, upper, out=scratch.get("d", shape, dtype, device))
    c = (dim - 3.0) / 2.0
    u = torch.mul(d, d, out=scratch.get("w", shape, dtype, device))
    rest = torch.add(d.new_full((), 4.0), u, alpha=-1.0, out=scratch.get("m", shape, dtype, device))  # 4 - u
    log_w = u.mul_(rest)
    degenerate = cutoff == 0.0 or upper >= 2.0  # u (4 - u) or d can reach 0
    if degenerate:
        log_w.clamp_min_(tiny)
    log_w.log_().mul_(-c)
    invalid = torch.ge(dist, nonzero_loss_cutoff, out=rest)
    groups.push(invalid, start, end, 1.0)  # 1 beyond the cutoff; +1 on same-label cells
    log_w.add_(invalid, alpha=-huge)  # kept cells: + 0 (exact); removed cells: about -huge or -inf
    row_max = log_w.amax(1, keepdim=True)
    has_valid = row_max > -0.5 * huge
    shift = torch.where(has_valid, row_max, torch.zeros_like(row_max))
    # exp of an argument whose result underflows takes a slow path (10-40x slower on CPU): clamp the
    # argument one above log(tiny) (at log(tiny) itself the result rounds to a subnormal; a kept weight
    # below e^{-86} of its row's largest stays that small) and zero the removed cells with their mask
    w = log_w.sub_(shift).clamp_min_(math.log(tiny) + 1.0).exp_()
    w.mul_(torch.lt(invalid, 0.5, out=scratch.get("keep", shape, torch.bool, device)))
    w.div_(d.clamp_min_(tiny) if degenerate else d)  # the -log d factor (<= 1/cutoff: no overflow)
    if not bool(has_valid.all()):
        neg = (groups.push(torch.zeros_like(dist), start, end) == 0).to(dtype)
        w = torch.where(has_valid, w, neg)
    total = w.sum(1, keepdim=True)
    return w.div_(total.clamp_min(tiny))


@MINERS.register("distance_weighted")
class DistanceWeightedMiner(nn.Module):
    """Distance-weighted sampling: one negative per positive pair, drawn with probability ∝ 1/q(d).

    On the unit sphere in $$\\mathbb{R}^n$$ pairwise distances of random points follow
    $$ q(d) \\propto d^{\\,n-2}\\,\\bigl[1 - \\tfrac{1}{4}d^2\\bigr]^{\\frac{n-3}{2}} $$
    so the paper samples a negative of anchor a with

    $$ \\Pr(n \\mid a) \\propto \\min\\bigl(\\lambda, q(d_{an})^{-1}\\bigr)\\,[d_{an} < \\tau] $$

    which spreads the sampled negatives over all distances instead of concentrating them where
    random points lie (around √2). Here the variance-limiting clip is applied, as in the authors'
    code, by clamping distances below ``cutoff`` (0.5), and negatives at or beyond
    ``nonzero_loss_cutoff`` τ (1.4, where the margin loss is already zero) get weight 0; an anchor
    with no negative left samples uniformly among its negatives (the authors' fallback, restricted to
    negatives). Weights are computed in log space and normalised per anchor.

    Following the authors' code, every positive pair (a, p) of the batch gets one negative drawn
    independently (with replacement) from a's distribution, so the output is one triplet per positive
    pair (at most ``tuples_per_anchor`` per anchor, a uniform random subset of the positives).
    Embeddings are L2-normalised inside the miner (the analysis assumes the unit sphere); n is the
    embedding dimension.

    Reference:
        Wu, Manmatha, Smola & Krähenbühl, "Sampling Matters in Deep Embedding Learning", ICCV 2017
        (§4, eq. 3 and the distance-weighted sampling rule).

    Args:
        cutoff: distances below this are clamped before weighting (paper/code: 0.5).
        nonzero_loss_cutoff: negatives at least this far away are never sampled (paper/code: 1.4).
        tuples_per_anchor: at most this many triplets (positives) per anchor; ``None``: all positives.
        seed: seed of the sampling (``None``: the global torch RNG).

    Shape:
        Input ``embeddings (B, D)``, ``labels (B,)``, optional ``ref_embeddings (R, D)``,
        ``ref_labels (R,)``. Output: triplets ``(a, p, n)``, one per kept positive pair.

    Requirements:
        ≥ 2 samples per class (or positives in the reference set), at least two classes, D ≥ 2.
        Pair with a margin loss on normalised embeddings (e.g. :class:`MarginLoss`).

    Example:
        >>> miner = DistanceWeightedMiner(seed=0)
        >>> a, p, n = miner(torch.randn(8, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]))
        >>> len(a)  # one negative per positive pair
        8
    """

    output_kind: ClassVar[str] = "triplets"

    def __init__(
        self,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        tuples_per_anchor: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not (0.0 <= cutoff < nonzero_loss_cutoff) or math.isnan(nonzero_loss_cutoff):
            raise ConfigError(
                f"need 0 <= cutoff < nonzero_loss_cutoff; got cutoff={cutoff}, nonzero_loss_cutoff={nonzero_loss_cutoff}"
            )
        self.cutoff = float(cutoff)
        self.nonzero_loss_cutoff = float(nonzero_loss_cutoff)
        self.tuples_per_anchor = check_cap(tuples_per_anchor)
        self.rng = SeededRNG(seed)

    def extra_repr(self) -> str:
        return (
            f"cutoff={self.cutoff}, nonzero_loss_cutoff={self.nonzero_loss_cutoff}, "
            f"tuples_per_anchor={self.tuples_per_anchor}, seed={self.rng.seed}"
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
        generator = self.rng.get(embeddings.device)
        x = F.normalize(embeddings.float() if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings, dim=1)
        y = None if same_set else F.normalize(ref_embeddings.to(x.dtype), dim=1)
        groups = LabelGroups(labels, ref_labels, same_set)
        pidx = groups.pidx
        pvalid = groups.pvalid & groups.has_negatives().unsqueeze(1)  # an anchor without negatives yields nothing
        a = pvalid.nonzero(as_tuple=True)[0]  # row-major: anchors ascending, positives ascending
        p = pidx[pvalid]
        keep = random_cap(a, self.tuples_per_anchor, generator)
        a, p = a[keep], p[keep]
        if a.numel() == 0:
            return a, p, a.clone()
        rows, row_of_pair, per_row = torch.unique_consecutive(a, return_inverse=True, return_counts=True)
        k = int(per_row.max())
        ops = Operands(x, y, "euclidean")
        bounds = torch.searchsorted(rows, torch.arange(0, ops.rows + 1, device=rows.device)).tolist()
        draws = []
        scratch = Scratch("DistanceWeightedMiner")
        for start, end, d in ops.blocks():
            lo, hi = bounds[start], bounds[end]
            if lo == hi:
                continue
            probs = _block_probabilities(d, groups, start, end, embeddings.shape[1], self.cutoff, self.nonzero_loss_cutoff, scratch)
            if hi - lo != end - start:  # anchors without positives draw nothing
                probs = probs[rows[lo:hi] - start]
            draws.append(torch.multinomial(probs, k, replacement=True, generator=generator))
        table = torch.cat(draws) if len(draws) > 1 else draws[0]  # one row of draws per anchor in ``rows``
        rank = torch.arange(a.numel(), device=a.device) - (torch.cumsum(per_row, 0) - per_row)[row_of_pair]
        n = table[row_of_pair, rank]
        return a, p, n
