"""Naive loop references for the center/cluster and proxy/classification losses.

Written from the papers' formulas, deliberately slow: Python loops over samples, classes, centers
and candidate medoids, with scalar torch ops so autograd gives reference gradients. float64 only.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "ref_softmax",
    "ref_center",
    "ref_center_update",
    "ref_triplet_center",
    "ref_coupled_clusters",
    "ref_nmi",
    "ref_facility_location",
    "ref_proxy_nca",
    "ref_proxy_anchor",
    "ref_norm_softmax",
    "ref_cos_face",
    "ref_arc_face",
    "ref_soft_triple",
    "ref_soft_triple_regularizer",
]


def _unit(v: Tensor) -> Tensor:
    return v / torch.sqrt((v * v).sum())


def _cross_entropy(logits: list[Tensor], target: int) -> Tensor:
    """-log softmax(logits)[target], written out."""
    denom = sum(torch.exp(z) for z in logits)
    return -torch.log(torch.exp(logits[target]) / denom)


def _value(t: Tensor) -> float:
    return float(t.detach())


def _mean(terms: list[Tensor]) -> Tensor:
    return sum(terms) / len(terms)


def ref_softmax(x: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    terms = []
    for i in range(x.shape[0]):
        logits = [(weight[c] * x[i]).sum() + bias[c] for c in range(weight.shape[0])]
        terms.append(_cross_entropy(logits, int(y[i])))
    return _mean(terms)


def ref_center(x: Tensor, y: Tensor, centers: Tensor) -> Tensor:
    """(1/2B) sum_i ||x_i - c_{y_i}||^2 (the paper's sum, averaged over the batch)."""
    terms = [0.5 * ((x[i] - centers[int(y[i])]) ** 2).sum() for i in range(x.shape[0])]
    return _mean(terms)


def ref_center_update(centers: Tensor, x: Tensor, y: Tensor, alpha: float) -> Tensor:
    """c_j <- c_j - alpha * sum_i [y_i=j](c_j - x_i) / (1 + sum_i [y_i=j]), class by class."""
    new = centers.clone()
    for j in range(centers.shape[0]):
        num = torch.zeros_like(centers[j])
        count = 0
        for i in range(x.shape[0]):
            if int(y[i]) == j:
                num = num + (centers[j] - x[i])
                count += 1
        new[j] = centers[j] - alpha * num / (1 + count)
    return new


def ref_triplet_center(x: Tensor, y: Tensor, centers: Tensor, margin: float) -> Tensor:
    def dist(a: Tensor, b: Tensor) -> Tensor:
        return 0.5 * ((a - b) ** 2).sum()

    terms = []
    for i in range(x.shape[0]):
        yi = int(y[i])
        pos = dist(x[i], centers[yi])
        neg = min((dist(x[i], centers[j]) for j in range(centers.shape[0]) if j != yi), key=_value)
        terms.append(torch.clamp(pos + margin - neg, min=0))
    return _mean(terms)


def ref_coupled_clusters(x: Tensor, y: Tensor, alpha: float) -> Tensor:
    terms = []
    classes = sorted({int(v) for v in y})
    for p in classes:
        members = [i for i in range(x.shape[0]) if int(y[i]) == p]
        others = [i for i in range(x.shape[0]) if int(y[i]) != p]
        center = sum(x[i] for i in members) / len(members)
        sq = [((x[n] - center) ** 2).sum() for n in others]
        nearest = sq[min(range(len(others)), key=lambda k: _value(sq[k]))]
        for i in members:
            terms.append(0.5 * torch.clamp(((x[i] - center) ** 2).sum() + alpha - nearest, min=0))
    return _mean(terms)


def ref_nmi(a: list[int], b: list[int]) -> float:
    """NMI = I(a;b) / sqrt(H(a) H(b)) from counts (1 if both single-cluster, 0 if one is)."""
    n = len(a)
    ca: dict[int, int] = {}
    cb: dict[int, int] = {}
    cab: dict[tuple[int, int], int] = {}
    for u, v in zip(a, b):
        ca[u] = ca.get(u, 0) + 1
        cb[v] = cb.get(v, 0) + 1
        cab[(u, v)] = cab.get((u, v), 0) + 1
    ha = -sum(c / n * math.log(c / n) for c in ca.values())
    hb = -sum(c / n * math.log(c / n) for c in cb.values())
    mi = sum(c / n * math.log(n * c / (ca[u] * cb[v])) for (u, v), c in cab.items())
    if ha <= 0 and hb <= 0:
        return 1.0
    if ha <= 0 or hb <= 0:
        return 0.0
    return min(max(mi / math.sqrt(ha * hb), 0.0), 1.0)


def _assignment(d: list[list[float]], medoids: list[int]) -> list[int]:
    """Cluster position of the nearest medoid (first on ties); medoids in their own cluster."""
    out = []
    for i in range(len(d)):
        if i in medoids:
            out.append(medoids.index(i))
            continue
        best = 0
        for c in range(1, len(medoids)):
            if d[medoids[c]][i] < d[medoids[best]][i]:
                best = c
        out.append(best)
    return out


def ref_facility_location(
    x: Tensor, y: Tensor, gamma: float, pam_iterations: int
) -> tuple[Tensor, list[int]]:
    """Greedy loss-augmented inference + PAM refinement + hinge, all by loops.

    Returns ``(loss, medoids)``; medoid positions are cluster indices.
    """
    b = x.shape[0]
    labels = [int(v) for v in y]
    k = len(set(labels))
    dist = [[torch.sqrt(((x[i] - x[j]) ** 2).sum()) if i != j else x[i].sum() * 0 for j in range(b)]
            for i in range(b)]
    d = [[_value(v) for v in row] for row in dist]

    def facility(medoids: list[int]) -> float:
        return -sum(min(d[j][i] for j in medoids) for i in range(b))

    chosen: list[int] = []
    for _ in range(k):
        best_score, best_j = -math.inf, -1
        for j in range(b):
            if j in chosen:
                continue
            trial = chosen + [j]
            score = facility(trial) + gamma * (1.0 - ref_nmi(labels, _assignment(d, trial)))
            if score > best_score:
                best_score, best_j = score, j
        chosen.append(best_j)
    for _ in range(pam_iterations):
        assign = _assignment(d, chosen)
        for c in range(k):
            members = [i for i in range(b) if assign[i] == c]
            best_score, best_j = -math.inf, -1
            for j in members:
                trial = list(chosen)
                trial[c] = j
                within = -sum(d[j][i] for i in members)
                score = within + gamma * (1.0 - ref_nmi(labels, _assignment(d, trial)))
                if score > best_score:
                    best_score, best_j = score, j
            chosen[c] = best_j
    score_pred = -sum(min((dist[j][i] for j in chosen), key=_value) for i in range(b))
    nmi = ref_nmi(labels, _assignment(d, chosen))
    score_true = 0
    for cls in sorted(set(labels)):
        members = [i for i in range(b) if labels[i] == cls]
        totals = [sum(dist[i][j] for i in members) for j in members]
        score_true = score_true - min(totals, key=_value)
    loss = torch.clamp(score_pred + gamma * (1.0 - nmi) - score_true, min=0)
    return loss, chosen


def ref_proxy_nca(x: Tensor, y: Tensor, proxies: Tensor, scale: float) -> Tensor:
    terms = []
    for i in range(x.shape[0]):
        xi = _unit(x[i])
        d2 = [((xi - _unit(proxies[z])) ** 2).sum() for z in range(proxies.shape[0])]
        yi = int(y[i])
        num = torch.exp(-scale * d2[yi])
        den = sum(torch.exp(-scale * d2[z]) for z in range(proxies.shape[0]) if z != yi)
        terms.append(-torch.log(num / den))
    return _mean(terms)


def ref_proxy_anchor(x: Tensor, y: Tensor, proxies: Tensor, alpha: float, delta: float) -> Tensor:
    num_classes = proxies.shape[0]
    pos_terms, neg_terms = [], []
    for p in range(num_classes):
        pu = _unit(proxies[p])
        pos_sum = x.sum() * 0
        neg_sum = x.sum() * 0
        has_pos = False
        for i in range(x.shape[0]):
            s = (_unit(x[i]) * pu).sum()
            if int(y[i]) == p:
                pos_sum = pos_sum + torch.exp(-alpha * (s - delta))
                has_pos = True
            else:
                neg_sum = neg_sum + torch.exp(alpha * (s + delta))
        if has_pos:
            pos_terms.append(torch.log(1 + pos_sum))
        neg_terms.append(torch.log(1 + neg_sum))
    return sum(pos_terms) / len(pos_terms) + sum(neg_terms) / num_classes


def ref_norm_softmax(x: Tensor, y: Tensor, proxies: Tensor, temperature: float) -> Tensor:
    terms = []
    for i in range(x.shape[0]):
        xi = _unit(x[i])
        logits = [(xi * _unit(proxies[c])).sum() / temperature for c in range(proxies.shape[0])]
        terms.append(_cross_entropy(logits, int(y[i])))
    return _mean(terms)


def ref_cos_face(x: Tensor, y: Tensor, weight: Tensor, scale: float, margin: float) -> Tensor:
    terms = []
    for i in range(x.shape[0]):
        xi = _unit(x[i])
        logits = []
        for c in range(weight.shape[0]):
            cos = (xi * _unit(weight[c])).sum()
            logits.append(scale * (cos - margin) if c == int(y[i]) else scale * cos)
        terms.append(_cross_entropy(logits, int(y[i])))
    return _mean(terms)


def ref_arc_face(x: Tensor, y: Tensor, weight: Tensor, scale: float, margin: float) -> Tensor:
    terms = []
    for i in range(x.shape[0]):
        xi = _unit(x[i])
        logits = []
        for c in range(weight.shape[0]):
            cos = (xi * _unit(weight[c])).sum()
            if c == int(y[i]):
                theta = torch.acos(cos)
                if _value(theta) + margin <= math.pi:
                    logits.append(scale * torch.cos(theta + margin))
                else:
                    logits.append(scale * (cos - margin * math.sin(margin)))
            else:
                logits.append(scale * cos)
        terms.append(_cross_entropy(logits, int(y[i])))
    return _mean(terms)


def ref_soft_triple_regularizer(centers: Tensor) -> Tensor:
    num_classes, k, _ = centers.shape
    total = centers.sum() * 0
    for j in range(num_classes):
        for t in range(k):
            for s in range(t + 1, k):
                diff = _unit(centers[j, t]) - _unit(centers[j, s])
                total = total + torch.sqrt((diff * diff).sum() + 1e-5)
    return total / (num_classes * k * (k - 1))


def ref_soft_triple(
    x: Tensor, y: Tensor, centers: Tensor, la: float, gamma: float, tau: float, delta: float
) -> Tensor:
    num_classes, k, _ = centers.shape
    terms = []
    for i in range(x.shape[0]):
        xi = _unit(x[i])
        logits = []
        for c in range(num_classes):
            sims = [(xi * _unit(centers[c, t])).sum() for t in range(k)]
            norm = sum(torch.exp(s / gamma) for s in sims)
            relaxed = sum(torch.exp(s / gamma) / norm * s for s in sims)
            logits.append(la * (relaxed - delta) if c == int(y[i]) else la * relaxed)
        terms.append(_cross_entropy(logits, int(y[i])))
    loss = _mean(terms)
    if tau > 0 and k > 1:
        loss = loss + tau * ref_soft_triple_regularizer(centers)
    return loss
