"""Deliberately naive miners: Python loops over explicit anchors, positives and negatives.

Written from the papers' definitions, independent of ``deepmetric.miners`` (no shared helpers),
and only meant for tiny inputs in tests.
"""
from __future__ import annotations

import math

from torch import Tensor

__all__ = [
    "ref_distance_matrix",
    "ref_candidates",
    "ref_all_triplets",
    "ref_hard",
    "ref_semi_hard",
    "ref_easy",
    "ref_multi_similarity",
    "ref_distance_weighted_probabilities",
]


def ref_distance_matrix(x: Tensor, y: Tensor, metric: str = "euclidean") -> list[list[float]]:
    """Distances by explicit per-pair formulas (smaller = closer)."""
    out = []
    for i in range(x.shape[0]):
        row = []
        for j in range(y.shape[0]):
            u, v = x[i].double(), y[j].double()
            if metric == "euclidean":
                row.append(math.sqrt(float(((u - v) ** 2).sum())))
            elif metric == "squared_euclidean":
                row.append(float(((u - v) ** 2).sum()))
            elif metric == "cosine":
                row.append(1.0 - float(u @ v) / (float(u.norm()) * float(v.norm())))
            else:
                raise ValueError(metric)
        out.append(row)
    return out


def ref_candidates(labels: list[int], ref_labels: list[int], same_set: bool) -> tuple[list[list[int]], list[list[int]]]:
    """Per anchor: the list of positives and the list of negatives in the reference set."""
    positives, negatives = [], []
    for i, yi in enumerate(labels):
        positives.append([j for j, yj in enumerate(ref_labels) if yj == yi and not (same_set and j == i)])
        negatives.append([j for j, yj in enumerate(ref_labels) if yj != yi])
    return positives, negatives


def ref_all_triplets(labels: list[int], ref_labels: list[int], same_set: bool) -> set[tuple[int, int, int]]:
    positives, negatives = ref_candidates(labels, ref_labels, same_set)
    return {(a, p, n) for a in range(len(labels)) for p in positives[a] for n in negatives[a]}


def ref_hard(d: list[list[float]], labels: list[int], ref_labels: list[int], same_set: bool) -> set[tuple[int, int, int]]:
    """Batch hard (Hermans et al. 2017): farthest positive, closest negative, per anchor."""
    positives, negatives = ref_candidates(labels, ref_labels, same_set)
    out = set()
    for a in range(len(labels)):
        if not positives[a] or not negatives[a]:
            continue
        p = max(positives[a], key=lambda j: d[a][j])
        n = min(negatives[a], key=lambda j: d[a][j])
        out.add((a, p, n))
    return out


def ref_semi_hard(
    d: list[list[float]],
    labels: list[int],
    ref_labels: list[int],
    same_set: bool,
    margin: float,
    negatives_mode: str = "all",
    fallback: str | None = None,
) -> set[tuple[int, int, int]]:
    """FaceNet semi-hard: d_ap < d_an < d_ap + margin; ``negatives_mode`` "all" or "hardest"."""
    positives, negatives = ref_candidates(labels, ref_labels, same_set)
    out = set()
    for a in range(len(labels)):
        for p in positives[a]:
            band = [n for n in negatives[a] if d[a][p] < d[a][n] < d[a][p] + margin]
            if band:
                if negatives_mode == "all":
                    out.update((a, p, n) for n in band)
                else:
                    out.add((a, p, min(band, key=lambda j: d[a][j])))
            elif fallback is not None and negatives[a]:
                pick = min if fallback == "hardest" else max
                out.add((a, p, pick(negatives[a], key=lambda j: d[a][j])))
    return out


def ref_easy(
    d: list[list[float]],
    labels: list[int],
    ref_labels: list[int],
    same_set: bool,
    margin: float,
    positives_mode: str = "easiest",
    negatives_mode: str = "all",
) -> set[tuple[int, int, int]]:
    """Easy positive (closest, Xuan et al. 2020) and easy negatives d_an > d_ap + margin."""
    positives, negatives = ref_candidates(labels, ref_labels, same_set)
    out = set()
    for a in range(len(labels)):
        if not positives[a]:
            continue
        chosen = [min(positives[a], key=lambda j: d[a][j])] if positives_mode == "easiest" else positives[a]
        for p in chosen:
            easy = [n for n in negatives[a] if d[a][n] > d[a][p] + margin]
            if not easy:
                continue
            if negatives_mode == "all":
                out.update((a, p, n) for n in easy)
            else:
                out.add((a, p, min(easy, key=lambda j: d[a][j])))
    return out


def ref_multi_similarity(
    x: Tensor, labels: list[int], y: Tensor, ref_labels: list[int], same_set: bool, epsilon: float
) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """MS pair mining (Wang et al. 2019, eqs. 7-8) with cosine similarity."""
    positives, negatives = ref_candidates(labels, ref_labels, same_set)
    cos = [[1.0 - v for v in row] for row in ref_distance_matrix(x, y, "cosine")]
    pos_out, neg_out = set(), set()
    for a in range(len(labels)):
        if not positives[a] or not negatives[a]:
            continue
        min_pos = min(cos[a][p] for p in positives[a])
        max_neg = max(cos[a][n] for n in negatives[a])
        pos_out.update((a, p) for p in positives[a] if cos[a][p] - epsilon < max_neg)
        neg_out.update((a, n) for n in negatives[a] if cos[a][n] + epsilon > min_pos)
    return pos_out, neg_out


def ref_distance_weighted_probabilities(
    x: Tensor, labels: list[int], cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4
) -> list[dict[int, float]]:
    """Per anchor, the sampling probability of each negative (Wu et al. 2017), by explicit formula.

    q(d) = d^(n-2) (1 - d^2/4)^((n-3)/2) with d clamped at ``cutoff``; weight 1/q(d) for negatives
    closer than ``nonzero_loss_cutoff``; uniform over negatives if none qualifies.
    """
    xn = x.double() / x.double().norm(dim=1, keepdim=True)
    dim = x.shape[1]
    d = ref_distance_matrix(xn, xn, "euclidean")
    _, negatives = ref_candidates(labels, labels, True)
    out = []
    for a in range(len(labels)):
        weights = {}
        for n in negatives[a]:
            if d[a][n] >= nonzero_loss_cutoff:
                continue
            dd = max(d[a][n], cutoff)
            q = dd ** (dim - 2) * (1.0 - dd * dd / 4.0) ** ((dim - 3) / 2.0)
            weights[n] = 1.0 / q
        if not weights:
            weights = {n: 1.0 for n in negatives[a]}
        total = sum(weights.values())
        out.append({n: w / total for n, w in weights.items()})
    return out
