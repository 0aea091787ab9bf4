"""Offline generation of explicit pairs and triplets from labels (and, to mine, embeddings).

For siamese / triplet networks trained on fixed tuples (:class:`deepmetric.networks.PairDataset`,
:class:`deepmetric.networks.TripletDataset`). Random strategies need only labels; the mining
strategies (``"hard"``, ``"semi_hard"``, ``"easy"``) search the *whole dataset* for each anchor
using embeddings from the current model, chunked over anchors so the memory is
O(chunk_size · N) whatever the dataset size (N = 100 000 works with the default chunk).

Example:
    >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
    >>> pairs = generate_pairs(labels, 8, positive_fraction=0.5, seed=0)
    >>> pairs.shape, int((labels[pairs[:, 0]] == labels[pairs[:, 1]]).sum())
    (torch.Size([8, 2]), 4)
    >>> triplets = generate_triplets(labels, 5, seed=0)
    >>> bool((labels[triplets[:, 0]] == labels[triplets[:, 1]]).all())
    True
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deepmetric.distances import get_distance
from deepmetric.errors import ConfigError, DataError

__all__ = ["generate_pairs", "generate_triplets", "STRATEGIES"]

STRATEGIES = ("random", "hard", "semi_hard", "easy")


@dataclass(frozen=True)
class _Classes:
    """Labels grouped by class: ``order`` sorts the samples by label; per sample its class size,
    the start of its class block in ``order`` and its rank inside the block."""

    order: Tensor
    size: Tensor
    start: Tensor
    rank: Tensor
    num_classes: int


def _classes(labels: Tensor) -> _Classes:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.numel() == 0:
        raise DataError("labels must be a non-empty 1-D tensor")
    if labels.is_floating_point():
        raise DataError("labels must be integer class labels")
    order = labels.argsort(stable=True)
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(order)
    position[order] = torch.arange(labels.numel(), device=labels.device)
    start = starts[inverse]
    return _Classes(order, counts[inverse], start, position - start, int(counts.numel()))


def _randint(high: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform integers in ``[0, high)`` element-wise (``high >= 1``)."""
    u = torch.rand(high.shape, generator=generator, device=high.device, dtype=torch.float64)
    return torch.minimum((u * high).long(), high - 1)


def _random_positive(anchors: Tensor, c: _Classes, generator: torch.Generator) -> Tensor:
    size = c.size[anchors]
    offset = (c.rank[anchors] + 1 + _randint(size - 1, generator)) % size
    return c.order[c.start[anchors] + offset]


def _random_negative(anchors: Tensor, c: _Classes, generator: torch.Generator) -> Tensor:
    n = c.order.numel()
    r = _randint(n - c.size[anchors], generator)
    start = c.start[anchors]
    return c.order[torch.where(r < start, r, r + c.size[anchors])]


def _generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


def generate_pairs(labels: Tensor, num_pairs: int, positive_fraction: float = 0.5, seed: int = 0) -> Tensor:
    """Random pairs of sample indices: ``round(num_pairs · positive_fraction)`` same-label pairs, the rest
    different-label pairs, shuffled together.

    A positive pair draws its first element uniformly among the samples whose class has at least two
    members and its partner uniformly among the other members of the class; a negative pair draws
    its first element uniformly among all samples and its partner uniformly among the samples of
    other classes. Never pairs a sample with itself. Pairs may repeat.

    Args:
        labels: ``(N,)`` integer class labels.
        num_pairs: number of pairs.
        positive_fraction: fraction of same-label pairs, in ``[0, 1]``.
        seed: seed of the sampling (results are reproducible per device).

    Returns:
        ``(num_pairs, 2)`` long tensor of indices, for :class:`deepmetric.networks.PairDataset`.

    Raises:
        DataError: positive pairs requested but no class has two samples, or negative pairs
            requested with a single class.
    """
    if num_pairs < 0 or not 0.0 <= positive_fraction <= 1.0:
        raise ConfigError(f"need num_pairs >= 0 and 0 <= positive_fraction <= 1; got {num_pairs}, {positive_fraction}")
    c = _classes(labels)
    generator = _generator(seed, labels.device)
    num_pos = int(round(num_pairs * positive_fraction))
    num_neg = num_pairs - num_pos
    parts = []
    if num_pos:
        eligible = (c.size >= 2).nonzero(as_tuple=True)[0]
        if eligible.numel() == 0:
            raise DataError("no class has two samples: cannot form positive pairs")
        anchors = eligible[_randint(torch.full((num_pos,), eligible.numel(), device=labels.device), generator)]
        parts.append(torch.stack([anchors, _random_positive(anchors, c, generator)], 1))
    if num_neg:
        if c.num_classes < 2:
            raise DataError("a single class: cannot form negative pairs")
        anchors = _randint(torch.full((num_neg,), labels.numel(), device=labels.device), generator)
        parts.append(torch.stack([anchors, _random_negative(anchors, c, generator)], 1))
    if not parts:
        return torch.empty(0, 2, dtype=torch.long, device=labels.device)
    pairs = torch.cat(parts)
    return pairs[torch.randperm(pairs.shape[0], generator=generator, device=labels.device)]


def _masked_pick(score: Tensor, mask: Tensor, largest: bool) -> tuple[Tensor, Tensor]:
    fill = float("-inf") if largest else float("inf")
    filled = score.masked_fill(~mask, fill)
    index = filled.argmax(1) if largest else filled.argmin(1)
    return index, mask.any(1)


def generate_triplets(
    labels: Tensor,
    num_triplets: int,
    strategy: str = "random",
    embeddings: Tensor | None = None,
    margin: float = 0.2,
    seed: int = 0,
    chunk_size: int = 1024,
    distance: str = "squared_euclidean",
) -> Tensor:
    """Triplets ``(a, p, n)`` of sample indices, chosen by ``strategy``.

    Anchors: the samples that have a positive (class of ≥ 2) taken in random order, cycling
    through them again when ``num_triplets`` exceeds their number (so every anchor is used
    ⌊·⌋ or ⌈·⌉ times). Then per anchor, searching the whole dataset:

    * ``"random"``: a uniform positive and a uniform negative.
    * ``"hard"``: the farthest positive and the closest negative (batch-hard, Hermans et al. 2017,
      applied to the full set; an anchor repeated gives the same triplet).
    * ``"semi_hard"``: a uniform positive and a uniformly random semi-hard negative,
      $$d(a,p) < d(a,n) < d(a,p) + \\text{margin}$$ (Schroff et al., FaceNet, CVPR 2015). With none, the
      rule of FaceNet's reference ``triplet_semihard_loss``: the closest negative farther than the
      positive, else the farthest negative.
    * ``"easy"``: the closest positive (easy positive, Xuan et al., WACV 2020) and a uniformly random
      easy negative $$d(a,n) > d(a,p) + \\text{margin}$$; with none, the farthest negative.

    Args:
        labels: ``(N,)`` integer class labels.
        num_triplets: number of triplets.
        strategy: ``"random"``, ``"hard"``, ``"semi_hard"`` or ``"easy"``.
        embeddings: ``(N, D)`` embeddings of the samples (current model); required by the mining
            strategies. Computation runs on their device.
        margin: the triplet margin of ``"semi_hard"`` and ``"easy"`` (in units of ``distance``; use
            the loss's margin and distance).
        seed: seed of every random choice (reproducible per device).
        chunk_size: anchors per chunk; memory is about ``chunk_size × N`` distances.
        distance: ``"squared_euclidean"`` (default, like :class:`TripletMarginLoss`), ``"euclidean"``
            or ``"cosine"``.

    Returns:
        ``(num_triplets, 3)`` long tensor, for :class:`deepmetric.networks.TripletDataset`.

    Raises:
        ConfigError: unknown strategy or bad sizes.
        DataError: no anchor has both a positive and a negative; missing or mis-shaped embeddings.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}")
    if num_triplets < 0 or chunk_size < 1:
        raise ConfigError(f"need num_triplets >= 0 and chunk_size >= 1; got {num_triplets}, {chunk_size}")
    device = labels.device if embeddings is None else embeddings.device
    labels = labels.to(device)
    c = _classes(labels)
    if strategy != "random":
        if embeddings is None:
            raise DataError(f"strategy {strategy!r} mines with embeddings: pass embeddings=(N, D) from the model")
        if embeddings.dim() != 2 or embeddings.shape[0] != labels.numel():
            raise DataError(
                f"embeddings must be (N, D) with N = {labels.numel()} labels; got {tuple(embeddings.shape)}"
            )
        if not bool(torch.isfinite(embeddings).all()):
            raise DataError("embeddings contain NaN or infinite values")
    eligible = (c.size >= 2).nonzero(as_tuple=True)[0]
    if eligible.numel() == 0 or c.num_classes < 2:
        raise DataError("need a class with two samples and at least two classes to form triplets")
    generator = _generator(seed, device)
    rounds = -(-num_triplets // eligible.numel())
    perms = [eligible[torch.randperm(eligible.numel(), generator=generator, device=device)] for _ in range(rounds)]
    anchors = torch.cat(perms)[:num_triplets] if perms else eligible[:0]
    if strategy == "random":
        p = _random_positive(anchors, c, generator)
        n = _random_negative(anchors, c, generator)
        return torch.stack([anchors, p, n], 1)

    assert embeddings is not None
    metric = get_distance(distance)
    random_p = _random_positive(anchors, c, generator) if strategy == "semi_hard" else None
    block = torch.arange(int(c.size.max()), device=device)
    out_p, out_n = [], []
    with torch.no_grad():
        for start in range(0, anchors.numel(), chunk_size):
            a = anchors[start : start + chunk_size]
            rows = torch.arange(a.numel(), device=device)
            d = metric(embeddings[a], embeddings)
            neg = labels[a].unsqueeze(1) != labels.unsqueeze(0)
            if strategy == "semi_hard":
                assert random_p is not None
                p = random_p[start : start + chunk_size]
            else:
                # the positives of an anchor are its class block in `order`: a (chunk, max class size) gather
                members = c.order[(c.start[a].unsqueeze(1) + block).clamp_max(labels.numel() - 1)]
                valid = (block < c.size[a].unsqueeze(1)) & (members != a.unsqueeze(1))
                d_pos = d.gather(1, members)
                pick, _ = _masked_pick(d_pos, valid, largest=strategy == "hard")
                p = members[rows, pick]
            if strategy == "hard":
                n = d.masked_fill_(~neg, float("inf")).argmin(1)
            else:
                d_ap = d[rows, p].unsqueeze(1)
                if strategy == "semi_hard":
                    band = neg & (d > d_ap)
                    band &= d < d_ap + margin
                else:
                    band = neg & (d > d_ap + margin)
                keys = torch.rand(d.shape, generator=generator, device=device).masked_fill_(~band, 2.0)
                n = keys.argmin(1)
                del keys
                missing = (~band.any(1)).nonzero(as_tuple=True)[0]
                if missing.numel():
                    dm, nm = d[missing], neg[missing]
                    farthest, _ = _masked_pick(dm, nm, largest=True)
                    fallback = farthest
                    if strategy == "semi_hard":
                        beyond, has_beyond = _masked_pick(dm, nm & (dm > d_ap[missing]), largest=False)
                        fallback = torch.where(has_beyond, beyond, farthest)
                    n[missing] = fallback
            out_p.append(p)
            out_n.append(n)
    p = torch.cat(out_p) if out_p else anchors
    n = torch.cat(out_n) if out_n else anchors
    return torch.stack([anchors, p, n], 1)
