"""Private helpers shared by the miners.

Input handling, seeded randomness, the per-anchor cap, anchor-aligned chunking and the "band" engine
that selects negatives ``n`` with ``low < d(a, n) < high`` for given positive pairs ``(a, p)``.
Everything here is O(B·R) memory (or O(chunk · R) per chunk) and loop-free over anchors.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from deepmetric.errors import ConfigError
from deepmetric.tuples import Triplets, check_inputs, label_masks

__all__ = [
    "CHUNK_ELEMENTS",
    "SeededRNG",
    "prepare",
    "masks",
    "check_cap",
    "check_choice",
    "random_cap",
    "sample_distinct",
    "anchor_chunks",
    "band_triplets",
]

#: Upper bound on the number of (pair, reference) cells a miner materialises per chunk (32 MiB in float32).
CHUNK_ELEMENTS = 1 << 23

NegativeSelection = Literal["hardest", "random", "all"]


class SeededRNG:
    """Lazily created ``torch.Generator`` per device, seeded with ``seed`` (``None``: global RNG).

    The generator is created once and reused, so successive calls of a seeded miner differ from each
    other while the whole sequence is reproducible. Copies (``copy.deepcopy``, pickling) restart it.
    """

    def __init__(self, seed: int | None) -> None:
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ConfigError(f"seed must be an int or None; got {seed!r}")
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def get(self, device: torch.device) -> torch.Generator | None:
        """The generator for ``device`` (``None`` when unseeded)."""
        if self.seed is None:
            return None
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._generators[device] = generator
        return generator

    def __getstate__(self) -> dict[str, object]:
        return {"seed": self.seed}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.seed = state["seed"]  # type: ignore[assignment]
        self._generators = {}

    def __deepcopy__(self, memo: dict[int, object]) -> SeededRNG:
        return SeededRNG(self.seed)


def prepare(
    embeddings: Tensor, labels: Tensor, ref_embeddings: Tensor | None, ref_labels: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Validate inputs; return ``(labels, ref_embeddings, ref_labels, same_set)`` on the embeddings' device.

    ``same_set`` is true when no reference set was given (or the batch itself was passed as the
    reference set); then an element is never paired with itself.
    """
    same_set = ref_embeddings is None or (ref_embeddings is embeddings and ref_labels is labels)
    ref_embeddings, ref_labels = check_inputs(embeddings, labels, ref_embeddings, ref_labels)
    device = embeddings.device
    return labels.to(device), ref_embeddings, ref_labels.to(device), same_set


def masks(labels: Tensor, ref_labels: Tensor, same_set: bool) -> tuple[Tensor, Tensor]:
    """``(B, R)`` positive and negative masks; the diagonal is excluded from positives when ``same_set``."""
    if same_set:
        return label_masks(labels, None, exclude_self=True)
    return label_masks(labels, ref_labels, exclude_self=False)


def check_cap(tuples_per_anchor: int | None) -> int | None:
    """Validate a ``tuples_per_anchor`` argument (positive int or ``None``)."""
    if tuples_per_anchor is None:
        return None
    if isinstance(tuples_per_anchor, bool) or not isinstance(tuples_per_anchor, int) or tuples_per_anchor < 1:
        raise ConfigError(f"tuples_per_anchor must be a positive int or None; got {tuples_per_anchor!r}")
    return tuples_per_anchor


def check_choice(name: str, value: object, choices: tuple[object, ...]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def random_cap(groups: Tensor, k: int | None, generator: torch.Generator | None) -> Tensor:
    """Positions of a uniformly random subset of at most ``k`` entries per distinct value of ``groups``.

    Returns the kept positions in increasing order (so the caller's order is preserved).
    """
    n = groups.numel()
    device = groups.device
    if k is None or n == 0:
        return torch.arange(n, device=device)
    keys = torch.rand(n, generator=generator, device=device)
    order = keys.argsort()
    order = order[groups[order].argsort(stable=True)]
    sorted_groups = groups[order]
    position = torch.arange(n, device=device)
    is_start = torch.ones(n, dtype=torch.bool, device=device)
    is_start[1:] = sorted_groups[1:] != sorted_groups[:-1]
    start = torch.cummax(torch.where(is_start, position, torch.zeros_like(position)), 0).values
    keep = order[(position - start) < k]
    return keep.sort().values


def _enumerate(groups: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    owner = torch.repeat_interleave(groups, counts)
    offsets = torch.cumsum(counts, 0) - counts
    local = torch.arange(owner.numel(), device=counts.device) - torch.repeat_interleave(offsets, counts)
    return owner, local


def sample_distinct(counts: Tensor, k: int | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """For every group ``g`` with ``counts[g]`` items, a uniform random set of ``min(k, counts[g])`` distinct
    local indices in ``[0, counts[g])``, without enumerating large groups.

    Groups with at most ``2k`` items are enumerated and capped with :func:`random_cap`; larger groups
    draw ``2k`` indices with replacement, keep the distinct ones (a uniform random subset of its size)
    and a uniform ``k`` of those, redrawing in the rare case fewer than ``k`` distinct came up.
    ``k=None`` enumerates every item. Returns ``(group, local)`` sorted by group.
    """
    device = counts.device
    groups = torch.arange(counts.numel(), device=device)
    if k is None:
        return _enumerate(groups, counts)
    small = counts <= 2 * k
    owner, local = _enumerate(groups[small], counts[small])
    keep = random_cap(owner, k, generator)
    owners, locals_ = [owner[keep]], [local[keep]]
    pending = groups[~small]
    while pending.numel() > 0:
        size = counts[pending].to(torch.float64).unsqueeze(1)
        draws = torch.rand(pending.numel(), 2 * k, generator=generator, device=device, dtype=torch.float64)
        draws = torch.minimum((draws * size).long(), counts[pending].unsqueeze(1) - 1)
        draws = draws.sort(dim=1).values
        distinct = torch.ones_like(draws, dtype=torch.bool)
        distinct[:, 1:] = draws[:, 1:] != draws[:, :-1]
        done = distinct.sum(1) >= k
        keys = torch.rand(draws.shape, generator=generator, device=device).masked_fill(~distinct, 2.0)
        chosen = draws.gather(1, keys.topk(k, dim=1, largest=False).indices)
        owners.append(pending[done].repeat_interleave(k))
        locals_.append(chosen[done].reshape(-1))
        pending = pending[~done]
    owner = torch.cat(owners)
    local = torch.cat(locals_)
    order = owner.argsort(stable=True)
    return owner[order], local[order]


def anchor_chunks(anchors: Tensor, row_cost: int, budget: int = CHUNK_ELEMENTS) -> list[tuple[int, int]]:
    """Split the positions of the anchor-sorted ``anchors`` into ranges that never split an anchor and hold
    at most ``budget // row_cost`` rows each (an anchor with more rows than that gets a range of its own)."""
    n = anchors.numel()
    if n == 0:
        return []
    rows = max(1, budget // max(1, row_cost))
    if n <= rows:
        return [(0, n)]
    cpu = anchors.cpu()
    is_start = torch.ones(n, dtype=torch.bool)
    is_start[1:] = cpu[1:] != cpu[:-1]
    starts = is_start.nonzero().flatten()  # position where each anchor's rows begin
    bounds = torch.cat([starts, torch.tensor([n])])
    ranges: list[tuple[int, int]] = []
    start = 0
    while start < n:
        # the largest anchor boundary not beyond start + rows, at least one anchor further
        index = int(torch.searchsorted(bounds, start + rows, right=True)) - 1
        end = int(bounds[index])
        if end <= start:
            end = int(bounds[int(torch.searchsorted(bounds, start, right=True))])
        ranges.append((start, end))
        start = end
    return ranges


def band_triplets(
    dist: Tensor,
    anchors: Tensor,
    positives: Tensor,
    neg_mask: Tensor,
    low: Tensor,
    high: Tensor,
    select: NegativeSelection,
    *,
    cap: int | None,
    generator: torch.Generator | None,
    fallback: Tensor | None = None,
    budget: int = CHUNK_ELEMENTS,
) -> Triplets:
    """Triplets ``(a, p, n)`` whose negative lies in the open band ``low < dist[a, n] < high``.

    Args:
        dist: ``(B, R)`` distances (smaller = closer).
        anchors: anchors of the positive pairs, sorted ascending.
        positives: their positives (reference indices).
        neg_mask: ``(B, R)`` negative mask.
        low: per-pair lower bound of the band.
        high: per-pair upper bound of the band.
        select: ``"all"`` band negatives, the ``"hardest"`` (closest) one or a uniformly ``"random"`` one.
        cap: at most this many triplets per anchor, a uniform random subset (``None``: no cap).
        generator: randomness for ``"random"`` and the cap.
        fallback: per-anchor reference index used for a pair with an empty band (``-1``: drop the pair).
        budget: at most about this many (pair, reference) cells per chunk.
    """
    device = dist.device
    out_a: list[Tensor] = []
    out_p: list[Tensor] = []
    out_n: list[Tensor] = []
    for start, end in anchor_chunks(anchors, dist.shape[1], budget):
        a = anchors[start:end]
        p = positives[start:end]
        d = dist[a]
        band = neg_mask[a] & (d > low[start:end, None]) & (d < high[start:end, None])
        if select == "all":
            rows, n = band.nonzero(as_tuple=True)
            ta, tp, tn = a[rows], p[rows], n
            empty = ~band.any(1)
        else:
            if select == "hardest":
                score = d.masked_fill(~band, float("inf"))
            else:
                score = torch.rand(d.shape, generator=generator, device=device).masked_fill(~band, 2.0)
            n = score.argmin(1)
            empty = ~band.any(1)
            ta, tp, tn = a[~empty], p[~empty], n[~empty]
        if fallback is not None and bool(empty.any()):
            fb = fallback[a[empty]]
            ok = fb >= 0
            ta = torch.cat([ta, a[empty][ok]])
            tp = torch.cat([tp, p[empty][ok]])
            tn = torch.cat([tn, fb[ok]])
            order = ta.argsort(stable=True)
            ta, tp, tn = ta[order], tp[order], tn[order]
        if cap is not None:
            keep = random_cap(ta, cap, generator)
            ta, tp, tn = ta[keep], tp[keep], tn[keep]
        out_a.append(ta)
        out_p.append(tp)
        out_n.append(tn)
    if not out_a:
        e = torch.empty(0, dtype=torch.long, device=device)
        return e, e.clone(), e.clone()
    return torch.cat(out_a), torch.cat(out_p), torch.cat(out_n)
