"""Deliberately naive references for the ranking/structured losses, written from the papers.

Explicit Python loops over pairs / triplets, scalar autograd in float64. ``self_index[i]`` is the
reference position that equals anchor ``i`` (skipped), or ``None``. Pair lists, when given, are
``(anchor, reference)`` tuples that replace the label-derived sets.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

PairList = Sequence[tuple[int, int]]


def _unit(v: Tensor) -> Tensor:
    return v / torch.sqrt((v * v).sum())


def _default_self(batch: int, same_set: bool) -> list[Optional[int]]:
    return list(range(batch)) if same_set else [None] * batch


def _sets(
    labels: Tensor, ref_labels: Tensor, self_index: list[Optional[int]]
) -> tuple[list[list[int]], list[list[int]]]:
    pos, neg = [], []
    for i in range(len(labels)):
        pos.append([j for j in range(len(ref_labels)) if j != self_index[i] and int(labels[i]) == int(ref_labels[j])])
        neg.append([j for j in range(len(ref_labels)) if int(labels[i]) != int(ref_labels[j])])
    return pos, neg


def _sets_from_pairs(batch: int, pos_pairs: PairList, neg_pairs: PairList) -> tuple[list[list[int]], list[list[int]]]:
    pos: list[list[int]] = [[] for _ in range(batch)]
    neg: list[list[int]] = [[] for _ in range(batch)]
    for a, p in sorted(set(pos_pairs)):
        pos[a].append(p)
    for a, n in sorted(set(neg_pairs)):
        neg[a].append(n)
    return pos, neg


def ref_histogram(
    embeddings: Tensor,
    labels: Tensor,
    num_nodes: int = 101,
    pos_pairs: PairList | None = None,
    neg_pairs: PairList | None = None,
) -> Tensor:
    """Ustinova & Lempitsky: histograms of unordered pair similarities, L = Σ_r h⁻_r Σ_{q≤r} h⁺_q."""
    b = embeddings.shape[0]
    z = [_unit(embeddings[i]) for i in range(b)]
    s_pos, s_neg = [], []
    if pos_pairs is None:
        for i in range(b):
            for j in range(i + 1, b):
                (s_pos if int(labels[i]) == int(labels[j]) else s_neg).append((z[i] * z[j]).sum())
    else:
        for pairs, out in ((pos_pairs, s_pos), (neg_pairs, s_neg)):
            for i, j in sorted({(min(a, c), max(a, c)) for a, c in pairs}):
                out.append((z[i] * z[j]).sum())
    step = 2.0 / (num_nodes - 1)
    nodes = [-1.0 + r * step for r in range(num_nodes)]

    def hist(values: list[Tensor]) -> list[Tensor]:
        h = [embeddings.new_zeros(()) for _ in range(num_nodes)]
        for s in values:
            sv = float(s.detach())
            for r in range(num_nodes):
                t = nodes[r]
                if r > 0 and nodes[r - 1] <= sv <= t:
                    h[r] = h[r] + (s - nodes[r - 1]) / step
                elif r < num_nodes - 1 and t < sv <= nodes[r + 1]:
                    h[r] = h[r] + (nodes[r + 1] - s) / step
        return [v / len(values) for v in h]

    h_pos, h_neg = hist(s_pos), hist(s_neg)
    loss = embeddings.new_zeros(())
    cumulative = embeddings.new_zeros(())
    for r in range(num_nodes):
        cumulative = cumulative + h_pos[r]
        loss = loss + h_neg[r] * cumulative
    return loss


def ref_ranked_list(
    embeddings: Tensor,
    labels: Tensor,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    alpha: float = 1.2,
    margin: float = 0.4,
    temperature: float = 10.0,
    negative_weight: float = 1.0,
) -> Tensor:
    """Wang et al.: per query, mean positive hinge over P* + λ Σ_{N*} (w / Σw)(α − d), w constants."""
    same = ref_embeddings is None
    ref_e = embeddings if same else ref_embeddings
    ref_l = labels if same else ref_labels
    pos, neg = _sets(labels, ref_l, _default_self(len(labels), same))
    total = embeddings.new_zeros(())
    for i in range(len(labels)):
        zi = _unit(embeddings[i])
        dist = {j: torch.sqrt(((zi - _unit(ref_e[j])) ** 2).sum()) for j in pos[i] + neg[i]}
        p_star = [j for j in pos[i] if float(dist[j].detach()) > alpha - margin]
        n_star = [j for j in neg[i] if float(dist[j].detach()) < alpha]
        loss_p = embeddings.new_zeros(())
        for j in p_star:
            loss_p = loss_p + (dist[j] - (alpha - margin)) / len(p_star)
        weights = {j: math.exp(temperature * (alpha - float(dist[j].detach()))) for j in n_star}
        norm = sum(weights.values())
        loss_n = embeddings.new_zeros(())
        for j in n_star:
            loss_n = loss_n + weights[j] / norm * (alpha - dist[j])
        total = total + loss_p + negative_weight * loss_n
    return total / len(labels)


def ref_margin(
    embeddings: Tensor,
    labels: Tensor,
    beta: Tensor,
    margin: float = 0.2,
    nu: float = 0.0,
    pos_pairs: PairList | None = None,
    neg_pairs: PairList | None = None,
) -> Tensor:
    """Wu et al.: Σ [α + y(D − β_{c(i)})]₊ + ν Σ β_{c(i)}, divided by the number of non-zero terms."""
    b = len(labels)
    if pos_pairs is None:
        pos, neg = _sets(labels, labels, _default_self(b, True))
    else:
        pos, neg = _sets_from_pairs(b, pos_pairs, neg_pairs or [])
    total = embeddings.new_zeros(())
    active = 0
    for i in range(b):
        bi = beta[0] if beta.numel() == 1 else beta[int(labels[i])]
        zi = _unit(embeddings[i])
        for j, y in [(j, 1.0) for j in pos[i]] + [(j, -1.0) for j in neg[i]]:
            d = torch.sqrt(((zi - _unit(embeddings[j])) ** 2).sum())
            term = torch.clamp(margin + y * (d - bi), min=0.0)
            active += int(float(term.detach()) > 0)
            total = total + term + nu * bi
    return total / max(active, 1)


def ref_circle(
    embeddings: Tensor,
    labels: Tensor,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    m: float = 0.4,
    gamma: float = 80.0,
    self_index: list[Optional[int]] | None = None,
    pos_pairs: PairList | None = None,
    neg_pairs: PairList | None = None,
) -> Tensor:
    """Sun et al.: log(1 + Σ_n exp(γ α_n (s_n − Δn)) Σ_p exp(−γ α_p (s_p − Δp))), α constants."""
    same = ref_embeddings is None
    ref_e = embeddings if same else ref_embeddings
    ref_l = labels if same else ref_labels
    if pos_pairs is not None:
        pos, neg = _sets_from_pairs(len(labels), pos_pairs, neg_pairs or [])
    else:
        pos, neg = _sets(labels, ref_l, self_index or _default_self(len(labels), same))
    losses = []
    for i in range(len(labels)):
        if not pos[i] or not neg[i]:
            continue
        zi = _unit(embeddings[i])
        sum_p = embeddings.new_zeros(())
        for j in pos[i]:
            s = (zi * _unit(ref_e[j])).sum()
            a_p = max(1.0 + m - float(s.detach()), 0.0)
            sum_p = sum_p + torch.exp(-gamma * a_p * (s - (1.0 - m)))
        sum_n = embeddings.new_zeros(())
        for j in neg[i]:
            s = (zi * _unit(ref_e[j])).sum()
            a_n = max(float(s.detach()) + m, 0.0)
            sum_n = sum_n + torch.exp(gamma * a_n * (s - m))
        losses.append(torch.log(1.0 + sum_n * sum_p))
    return torch.stack(losses).mean()


def ref_sup_con(
    embeddings: Tensor,
    labels: Tensor,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    temperature: float = 0.1,
    self_index: list[Optional[int]] | None = None,
) -> Tensor:
    """Khosla et al. L^sup_out: mean over anchors with positives of −1/|P| Σ_p log softmax_A(i)(p)."""
    same = ref_embeddings is None
    ref_e = embeddings if same else ref_embeddings
    ref_l = labels if same else ref_labels
    selves = self_index or _default_self(len(labels), same)
    pos, _ = _sets(labels, ref_l, selves)
    losses = []
    for i in range(len(labels)):
        if not pos[i]:
            continue
        zi = _unit(embeddings[i])
        others = [a for a in range(len(ref_l)) if a != selves[i]]
        denominator = embeddings.new_zeros(())
        for a in others:
            denominator = denominator + torch.exp((zi * _unit(ref_e[a])).sum() / temperature)
        term = embeddings.new_zeros(())
        for p in pos[i]:
            numerator = torch.exp((zi * _unit(ref_e[p])).sum() / temperature)
            term = term - torch.log(numerator / denominator) / len(pos[i])
        losses.append(term)
    return torch.stack(losses).mean()


def ref_log_ratio(
    embeddings: Tensor,
    label_vectors: Tensor,
    eps: float = 1e-6,
    anchors: Sequence[int] | None = None,
    triplets: Sequence[tuple[int, int, int]] | None = None,
) -> Tensor:
    """Kim et al.: mean over triplets (a, i, j) of (log D_f(a,i)/D_f(a,j) − log D_y(a,i)/D_y(a,j))²."""
    b = embeddings.shape[0]
    y = label_vectors.reshape(b, -1)

    def d_f(u: int, v: int) -> Tensor:
        return ((embeddings[u] - embeddings[v]) ** 2).sum()

    def d_y(u: int, v: int) -> Tensor:
        return ((y[u] - y[v]) ** 2).sum()

    if triplets is None:
        triplets = [
            (a, i, j)
            for a in (anchors if anchors is not None else range(b))
            for i in range(b)
            for j in range(b)
            if i != j and i != a and j != a
        ]
    total = embeddings.new_zeros(())
    for a, i, j in triplets:
        lhs = torch.log(d_f(a, i) + eps) - torch.log(d_f(a, j) + eps)
        rhs = torch.log(d_y(a, i) + eps) - torch.log(d_y(a, j) + eps)
        total = total + (lhs - rhs) ** 2
    return total / len(triplets)
