"""Deliberately naive reference implementations of the core pair/tuple losses.

Written from the papers' formulas with explicit Python loops over tuples (slow; tests only).
Each takes a float64 embedding tensor ``x`` (requires_grad allowed), labels, and optionally a
reference set ``(r, ry)``; tuple lists can be given explicitly.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

Pair = tuple[int, int]
Triplet = tuple[int, int, int]


def dist(u: Tensor, v: Tensor, metric: str) -> Tensor:
    """Distance between two vectors, from the definition."""
    if metric == "squared_euclidean":
        return ((u - v) ** 2).sum()
    if metric == "euclidean":
        return ((u - v) ** 2).sum().clamp_min(1e-12).sqrt()
    if metric == "cosine":
        return 1 - (u @ v) / (u.norm() * v.norm())
    raise ValueError(metric)


def cos_sim(u: Tensor, v: Tensor) -> Tensor:
    return (u @ v) / (u.norm() * v.norm())


def all_pairs(y: Sequence[int], ry: Sequence[int] | None = None) -> tuple[list[Pair], list[Pair]]:
    """Ordered positive and negative pairs (i in batch, j in ref); self-pairs excluded when ref is batch."""
    same = ry is None
    ry = y if ry is None else ry
    pos, neg = [], []
    for i in range(len(y)):
        for j in range(len(ry)):
            if same and i == j:
                continue
            (pos if y[i] == ry[j] else neg).append((i, j))
    return pos, neg


def all_triplets(y: Sequence[int], ry: Sequence[int] | None = None) -> list[Triplet]:
    pos, neg = all_pairs(y, ry)
    return [(a, p, n) for (a, p) in pos for (a2, n) in neg if a2 == a]


def _reduce(terms: list[Tensor], reduction: str, like: Tensor) -> Tensor:
    if not terms:
        return like.sum() * 0
    t = torch.stack(terms)
    if reduction == "sum":
        return t.sum()
    if reduction == "mean":
        return t.sum() / len(terms)
    nz = int((t > 0).sum())
    return t.sum() / max(nz, 1)


def contrastive(x, y, r=None, ry=None, *, pairs=None, margin=1.0, pos_margin=0.0,
                metric="euclidean", squared=True, reduction="mean"):
    r = x if r is None else r
    pos, neg = pairs if pairs is not None else all_pairs(y, ry)
    q = 2 if squared else 1
    terms = [torch.relu(dist(x[i], r[j], metric) - pos_margin) ** q for i, j in pos]
    terms += [torch.relu(margin - dist(x[i], r[j], metric)) ** q for i, j in neg]
    return _reduce(terms, reduction, x)


def triplet(x, y, r=None, ry=None, *, triplets=None, margin=0.2, metric="squared_euclidean",
            soft_margin=False, reduction="mean_nonzero"):
    r = x if r is None else r
    trips = triplets if triplets is not None else all_triplets(y, ry)
    terms = []
    for a, p, n in trips:
        dap, dan = dist(x[a], r[p], metric), dist(x[a], r[n], metric)
        terms.append(torch.nn.functional.softplus(dap - dan) if soft_margin else torch.relu(dap - dan + margin))
    return _reduce(terms, reduction, x)


def multi_similarity(x, y, r=None, ry=None, *, pairs=None, alpha=2.0, beta=50.0, base=1.0):
    r = x if r is None else r
    pos, neg = pairs if pairs is not None else all_pairs(y, ry)
    total = x.sum() * 0
    for i in range(x.shape[0]):
        ps = [cos_sim(x[i], r[k]) for (a, k) in set(pos) if a == i]
        ns = [cos_sim(x[i], r[k]) for (a, k) in set(neg) if a == i]
        sp = sum((torch.exp(-alpha * (s - base)) for s in ps), torch.zeros((), dtype=x.dtype))
        sn = sum((torch.exp(beta * (s - base)) for s in ns), torch.zeros((), dtype=x.dtype))
        total = total + torch.log(1 + sp) / alpha + torch.log(1 + sn) / beta
    return total / x.shape[0]


def lifted_structure(x, y, *, pairs=None, margin=1.0, metric="euclidean"):
    """Batch-only form (reference set = batch); negative pairs unordered."""
    pos, neg = pairs if pairs is not None else all_pairs(y)
    neg_set = set(neg) | {(j, i) for i, j in neg}
    pos = sorted(set(pos))
    if not pos:
        return x.sum() * 0
    total = x.sum() * 0
    for i, j in pos:
        s = torch.zeros((), dtype=x.dtype)
        for k in range(x.shape[0]):
            if (i, k) in neg_set:
                s = s + torch.exp(margin - dist(x[i], x[k], metric))
            if (j, k) in neg_set:
                s = s + torch.exp(margin - dist(x[j], x[k], metric))
        if float(s.detach()) == 0:
            continue
        jt = torch.log(s) + dist(x[i], x[j], metric)
        total = total + torch.relu(jt) ** 2
    return total / (2 * len(pos))


def n_pair(x, y, r=None, ry=None, *, pairs=None, l2_reg=0.002):
    r = x if r is None else r
    pos, neg = pairs if pairs is not None else all_pairs(y, ry)
    pos, neg = sorted(set(pos)), set(neg)
    if not pos:
        return x.sum() * 0
    total = x.sum() * 0
    for i, j in pos:
        sij = x[i] @ r[j]
        negs = [x[i] @ r[k] for k in range(r.shape[0]) if (i, k) in neg]
        if not negs:
            continue
        denom = torch.exp(sij) + sum(torch.exp(s) for s in negs)
        total = total - torch.log(torch.exp(sij) / denom)
    loss = total / len(pos)
    if l2_reg:
        loss = loss + l2_reg / x.shape[0] * sum(x[i].norm() for i in range(x.shape[0]))
    return loss


def quadruplet(x, y, r=None, ry=None, *, pairs=None, alpha1=1.0, alpha2=0.5,
               metric="squared_euclidean", reduction="mean_nonzero"):
    """Every triplet (i,j,k) and quadruplet (i,j,l,k) with (l,k) an ordered negative pair."""
    r = x if r is None else r
    ry_ = y if ry is None else ry
    pos, neg = pairs if pairs is not None else all_pairs(y, ry)
    pos, neg = sorted(set(pos)), sorted(set(neg))
    t1, t2 = [], []
    for i, j in pos:
        dij = dist(x[i], r[j], metric)
        for a, k in neg:
            if a == i:
                t1.append(torch.relu(dij - dist(x[i], r[k], metric) + alpha1))
        for l, k in neg:
            if y[l] != y[i] and ry_[k] != y[i]:
                t2.append(torch.relu(dij - dist(x[l], r[k], metric) + alpha2))
    if not pos:
        return x.sum() * 0
    return _reduce(t1, reduction, x) + _reduce(t2, reduction, x)


def isclose(a: float, b: float, tol: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
