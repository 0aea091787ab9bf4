"""Tests of the ranking/structured losses, the log-ratio loss and the cross-batch memory."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from deepmetric.errors import ConfigError, DataError
from deepmetric.losses import build
from deepmetric.losses.circle import CircleLoss
from deepmetric.losses.cross_batch_memory import CrossBatchMemory
from deepmetric.losses.histogram import HistogramLoss, soft_histogram
from deepmetric.losses.log_ratio import LogRatioLoss, dense_triplet_batch
from deepmetric.losses.margin import MarginLoss
from deepmetric.losses.ranked_list import RankedListLoss
from deepmetric.losses.sup_con import SupConLoss
from deepmetric.registry import LOSSES
from deepmetric.tuples import masks_to_pairs
from reference.ref_losses_rank import (
    ref_circle,
    ref_histogram,
    ref_log_ratio,
    ref_margin,
    ref_ranked_list,
    ref_sup_con,
)

DT = torch.float64


def _batch(b: int = 10, d: int = 4, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=DT)
    y = torch.arange(b) % classes
    return x, y


def _value_and_grad(fn, x: torch.Tensor, *extra: torch.Tensor):
    leaves = [x.clone().requires_grad_(True)] + [e.detach().clone().requires_grad_(True) for e in extra]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, leaves)
    return value.detach(), [g.detach() for g in grads]


def _assert_same(ours, theirs, rtol: float = 1e-7, atol: float = 1e-9) -> None:
    (v1, g1), (v2, g2) = ours, theirs
    torch.testing.assert_close(v1, v2, rtol=rtol, atol=atol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- registry / attributes

@pytest.mark.parametrize(
    "name, cls",
    [
        ("histogram", HistogramLoss),
        ("ranked_list", RankedListLoss),
        ("margin", MarginLoss),
        ("circle", CircleLoss),
        ("sup_con", SupConLoss),
        ("log_ratio", LogRatioLoss),
        ("cross_batch_memory", CrossBatchMemory),
    ],
)
def test_registered_with_attributes(name: str, cls: type) -> None:
    assert LOSSES.get(name) is cls
    assert cls.label_kind == ("continuous" if name == "log_ratio" else "class")
    assert cls.tuple_kind in ("pairs", "triplets")


# --------------------------------------------------------------------------- naive references

@pytest.mark.parametrize("seed", [0, 1])
def test_histogram_matches_reference(seed: int) -> None:
    x, y = _batch(seed=seed)
    ours = _value_and_grad(lambda e: HistogramLoss(num_nodes=21)(e, y), x)
    ref = _value_and_grad(lambda e: ref_histogram(e, y, num_nodes=21), x)
    _assert_same(ours, ref)
    assert 0.0 < float(ours[0]) < 1.0


@pytest.mark.parametrize("temperature", [0.0, 10.0])
def test_ranked_list_matches_reference(temperature: float) -> None:
    x, y = _batch(b=12, d=3, seed=2)
    loss = RankedListLoss(temperature=temperature)
    ours = _value_and_grad(lambda e: loss(e, y), x)
    ref = _value_and_grad(lambda e: ref_ranked_list(e, y, temperature=temperature), x)
    _assert_same(ours, ref)
    assert float(ours[0]) > 0


_RANKED_PARAMS = [
    {"temperature": 10.0},
    {"temperature": 0.0},
    {"temperature": 5.0, "alpha": 1.1, "margin": 0.5, "negative_weight": 0.7},
    {"temperature": 10.0, "negative_weight": 0.0},
]
_RANKED_IDS = ["default", "t0", "other", "no_negative_weight"]


def _ranked_paths(monkeypatch, fraction: float) -> list[bool]:
    """Force (fraction 1) or forbid (0) the sparse negative path, with row blocks of a few rows;
    returns the list of what ``_sparse_negatives`` answered, block by block."""
    import deepmetric.losses.ranked_list as rl

    monkeypatch.setattr(rl, "SPARSE_FRACTION", fraction)
    monkeypatch.setattr(rl, "_BLOCK_ELEMENTS", 64)  # blocks of max(32, 64 // B) rows: 2 blocks at B = 40
    calls: list[bool] = []
    real = rl._sparse_negatives
    monkeypatch.setattr(rl, "_sparse_negatives", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    return calls


def _ranked_batch(duplicates: bool):
    g = torch.Generator().manual_seed(11)
    x = torch.nn.functional.normalize(torch.randn(40, 16, generator=g, dtype=DT), dim=1)
    if duplicates:
        x[5] = x[16]  # a duplicate of another class: a clamped negative distance
        x[7] = x[13]  # and of the same class: a clamped positive distance
    return x, torch.arange(40) % 6


@pytest.mark.parametrize("params", _RANKED_PARAMS, ids=_RANKED_IDS)
@pytest.mark.parametrize("fraction", [1.0, 0.0], ids=["sparse", "dense"])
def test_ranked_list_sparse_negatives_match_reference(monkeypatch, params, fraction) -> None:
    """Row blocks with few negatives within α are worked on those entries only
    (``_sparse_negatives``); forced on every block (fraction 1) or off (0, unless a block has no such
    negative), values and gradients equal the naive formula, over several row blocks."""
    calls = _ranked_paths(monkeypatch, fraction)
    x, y = _ranked_batch(duplicates=False)
    ours = _value_and_grad(lambda e: RankedListLoss(**params)(e, y), x)
    ref = _value_and_grad(lambda e: ref_ranked_list(e, y, **params), x)
    _assert_same(ours, ref)
    assert float(ours[0]) > 0
    assert len(calls) == 2 and all(calls) == (fraction == 1.0), calls


@pytest.mark.parametrize("params", _RANKED_PARAMS, ids=_RANKED_IDS)
def test_ranked_list_sparse_negatives_clamped_distances(monkeypatch, params) -> None:
    """With duplicated points (clamped distances pass no gradient; the naive formula's square root
    gives NaN there) the sparse path equals the dense one."""
    x, y = _ranked_batch(duplicates=True)
    results = []
    for fraction in (1.0, 0.0):
        with monkeypatch.context() as m:
            calls = _ranked_paths(m, fraction)
            results.append(_value_and_grad(lambda e: RankedListLoss(**params)(e, y), x))
            assert calls and all(calls) == (fraction == 1.0)
    _assert_same(results[0], results[1])
    assert all(torch.isfinite(g).all() for g in results[0][1])


def test_ranked_list_with_ref_set_and_query_only_gradient() -> None:
    x, y = _batch(b=8, d=3, seed=3)
    r, ry = _batch(b=9, d=3, seed=4)
    loss = RankedListLoss(alpha=1.1, margin=0.5, temperature=5.0, negative_weight=0.7)
    ours = _value_and_grad(lambda e, f: loss(e, y, ref_embeddings=f, ref_labels=ry), x, r)
    ref = _value_and_grad(
        lambda e, f: ref_ranked_list(e, y, f, ry, alpha=1.1, margin=0.5, temperature=5.0, negative_weight=0.7), x, r
    )
    _assert_same(ours, ref)
    # query_only_gradient: the gradient only reaches each query through its own list.
    q_only = RankedListLoss(query_only_gradient=True)
    ours_q = _value_and_grad(lambda e: q_only(e, y), x)
    ref_q = _value_and_grad(lambda e: ref_ranked_list(e, y, e.detach(), y) * 1.0, x)
    # the reference with a detached copy as reference set keeps i == j pairs as d = 0 positives,
    # which are trivial (d < α − m) and so contribute nothing: values and gradients coincide.
    _assert_same(ours_q, ref_q)
    full = _value_and_grad(lambda e: RankedListLoss()(e, y), x)
    assert not torch.allclose(full[1][0], ours_q[1][0])


@pytest.mark.parametrize("num_classes, nu", [(None, 0.0), (3, 0.1)])
def test_margin_matches_reference(num_classes: int | None, nu: float) -> None:
    x, y = _batch(b=10, d=3, seed=5)
    loss = MarginLoss(margin=0.2, beta=1.0, nu=nu, num_classes=num_classes).double()
    with torch.no_grad():
        loss.beta.copy_(torch.linspace(0.9, 1.3, loss.beta.numel()))
    beta0 = loss.beta.detach().clone()

    def ours_fn(e: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            loss.beta.copy_(b)
        return loss(e, y)

    value = loss(x.clone().requires_grad_(True), y)
    grads = torch.autograd.grad(value, [loss.beta])
    ref = _value_and_grad(lambda e, b: ref_margin(e, y, b, margin=0.2, nu=nu), x, beta0)
    torch.testing.assert_close(value.detach(), ref[0])
    torch.testing.assert_close(grads[0], ref[1][1])
    xe = x.clone().requires_grad_(True)
    gx = torch.autograd.grad(loss(xe, y), [xe])[0]
    torch.testing.assert_close(gx, ref[1][0])


def test_margin_with_mined_triplets() -> None:
    x, y = _batch(b=9, d=3, seed=6)
    a = torch.tensor([0, 1, 2, 3, 0])
    p = torch.tensor([3, 4, 5, 6, 6])
    n = torch.tensor([1, 2, 0, 4, 2])
    loss = MarginLoss().double()
    ours = _value_and_grad(lambda e: loss(e, y, (a, p, n)), x)
    pos_pairs = list(zip(a.tolist(), p.tolist()))
    neg_pairs = list(zip(a.tolist(), n.tolist()))
    ref = _value_and_grad(
        lambda e: ref_margin(e, y, torch.tensor([1.2], dtype=DT), pos_pairs=pos_pairs, neg_pairs=neg_pairs), x
    )
    _assert_same(ours, ref)


def test_margin_rejects_labels_outside_classes() -> None:
    x, y = _batch()
    with pytest.raises(DataError):
        MarginLoss(num_classes=2)(x, y)


@pytest.mark.parametrize("m, gamma", [(0.4, 80.0), (0.25, 32.0)])
def test_circle_matches_reference(m: float, gamma: float) -> None:
    x, y = _batch(b=10, d=4, seed=7)
    ours = _value_and_grad(lambda e: CircleLoss(m=m, gamma=gamma)(e, y), x)
    ref = _value_and_grad(lambda e: ref_circle(e, y, m=m, gamma=gamma), x)
    _assert_same(ours, ref)


def test_circle_with_ref_and_indices() -> None:
    x, y = _batch(b=6, d=3, seed=8)
    r, ry = _batch(b=7, d=3, seed=9)
    ours = _value_and_grad(lambda e, f: CircleLoss()(e, y, ref_embeddings=f, ref_labels=ry), x, r)
    ref = _value_and_grad(lambda e, f: ref_circle(e, y, f, ry), x, r)
    _assert_same(ours, ref)
    # mined pairs: a subset of positive and negative pairs within the batch
    xb, yb = _batch(b=9, d=3, seed=10)
    pos_pairs = [(0, 3), (1, 4), (4, 1), (2, 8)]
    neg_pairs = [(0, 1), (0, 2), (1, 5), (4, 0), (2, 0)]
    indices = tuple(torch.tensor(v) for v in (*zip(*pos_pairs), *zip(*neg_pairs)))
    ours = _value_and_grad(lambda e: CircleLoss()(e, yb, indices), xb)
    ref = _value_and_grad(lambda e: ref_circle(e, yb, pos_pairs=pos_pairs, neg_pairs=neg_pairs), xb)
    _assert_same(ours, ref)


def test_sup_con_matches_reference_and_skips_anchors_without_positives() -> None:
    x, _ = _batch(b=9, d=4, seed=11)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # sample 8 has no positive
    ours = _value_and_grad(lambda e: SupConLoss(temperature=0.1)(e, y), x)
    ref = _value_and_grad(lambda e: ref_sup_con(e, y, temperature=0.1), x)
    _assert_same(ours, ref)
    r, ry = _batch(b=7, d=4, seed=12)
    ours = _value_and_grad(lambda e, f: SupConLoss(0.5)(e, y, ref_embeddings=f, ref_labels=ry), x, r)
    ref = _value_and_grad(lambda e, f: ref_sup_con(e, y, f, ry, temperature=0.5), x, r)
    _assert_same(ours, ref)


def test_sup_con_single_class_batch_is_defined() -> None:
    x, _ = _batch(b=5, d=3, seed=13)
    y = torch.zeros(5, dtype=torch.long)
    ours = _value_and_grad(lambda e: SupConLoss()(e, y), x)
    ref = _value_and_grad(lambda e: ref_sup_con(e, y), x)
    _assert_same(ours, ref)


def test_log_ratio_matches_reference_all_triplets_and_anchors() -> None:
    x, _ = _batch(b=7, d=3, seed=14)
    labels = torch.rand(7, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    ours = _value_and_grad(lambda e: LogRatioLoss()(e, labels), x)
    ref = _value_and_grad(lambda e: ref_log_ratio(e, labels), x)
    _assert_same(ours, ref)
    anchors = torch.tensor([0, 4])
    ours = _value_and_grad(lambda e: LogRatioLoss()(e, labels, anchors=anchors), x)
    ref = _value_and_grad(lambda e: ref_log_ratio(e, labels, anchors=[0, 4]), x)
    _assert_same(ours, ref)


def test_log_ratio_indices_and_label_distances() -> None:
    x, _ = _batch(b=7, d=3, seed=15)
    labels = torch.rand(7, generator=torch.Generator().manual_seed(2), dtype=DT)  # 1-D labels
    triplets = [(0, 1, 2), (0, 2, 5), (3, 6, 1), (6, 0, 4)]
    idx = tuple(torch.tensor(v) for v in zip(*triplets))
    ours = _value_and_grad(lambda e: LogRatioLoss()(e, labels, idx), x)
    ref = _value_and_grad(lambda e: ref_log_ratio(e, labels, triplets=triplets), x)
    _assert_same(ours, ref)
    # pairs (a1, p, a2, n): the triplets (a, p, n) of each anchor
    pairs = (torch.tensor([0, 0, 3]), torch.tensor([1, 2, 6]), torch.tensor([0, 3, 3]), torch.tensor([5, 1, 2]))
    expected = [(0, 1, 5), (0, 2, 5), (3, 6, 1), (3, 6, 2)]
    ours = _value_and_grad(lambda e: LogRatioLoss()(e, labels, pairs), x)
    ref = _value_and_grad(lambda e: ref_log_ratio(e, labels, triplets=expected), x)
    _assert_same(ours, ref)
    # a precomputed label-distance matrix gives the same loss as the label vectors
    dist = (labels[:, None] - labels[None, :]) ** 2
    a = LogRatioLoss()(x, None, label_distances=dist)
    b = LogRatioLoss()(x, labels)
    torch.testing.assert_close(a, b)


def test_log_ratio_zero_when_embedding_equals_labels_and_scale_invariant() -> None:
    labels = torch.rand(8, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    assert float(LogRatioLoss()(labels.clone(), labels)) < 1e-12
    x, _ = _batch(b=8, d=5, seed=16)
    v1, v2 = LogRatioLoss(eps=1e-12)(x, labels), LogRatioLoss(eps=1e-12)(3.0 * x, labels)
    torch.testing.assert_close(v1, v2)
    assert float(v1) > 0.1


def test_log_ratio_with_ref_set() -> None:
    x, _ = _batch(b=5, d=3, seed=17)
    r, _ = _batch(b=6, d=3, seed=18)
    y = torch.rand(5, 2, dtype=DT)
    ry = torch.rand(6, 2, dtype=DT)
    # naive: all (a, i, j) with i != j over the reference set
    def ref_fn(e: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        total, count = e.new_zeros(()), 0
        for a in range(5):
            for i in range(6):
                for j in range(6):
                    if i == j:
                        continue
                    dfi, dfj = ((e[a] - f[i]) ** 2).sum(), ((e[a] - f[j]) ** 2).sum()
                    dyi, dyj = ((y[a] - ry[i]) ** 2).sum(), ((y[a] - ry[j]) ** 2).sum()
                    lr = torch.log(dfi + 1e-6) - torch.log(dfj + 1e-6)
                    total = total + (lr - torch.log(dyi + 1e-6) + torch.log(dyj + 1e-6)) ** 2
                    count += 1
        return total / count

    ours = _value_and_grad(lambda e, f: LogRatioLoss()(e, y, ref_embeddings=f, ref_labels=ry), x, r)
    _assert_same(ours, _value_and_grad(ref_fn, x, r))


# --------------------------------------------------------------------------- gradcheck

@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("histogram", {"num_nodes": 11}),
        ("ranked_list", {"temperature": 0.0}),
        ("margin", {}),
        ("sup_con", {"temperature": 0.5}),
    ],
)
def test_gradcheck_class_losses(name: str, kwargs: dict) -> None:
    # Circle loss (α weights) and ranked list loss with T > 0 (w weights) hold weights constant in
    # back-propagation by design, so finite differences differ from their analytical gradient;
    # their gradients are checked against the loop references above instead.
    loss = build(name, **kwargs).double()
    x, y = _batch(b=6, d=3, classes=2, seed=19)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (x,), eps=1e-6, atol=1e-5)


def test_gradcheck_log_ratio() -> None:
    x, _ = _batch(b=5, d=3, seed=20)
    y = torch.rand(5, 2, dtype=DT)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda e: LogRatioLoss()(e, y), (x,), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- behaviour

def test_soft_histogram_is_normalised_and_preserves_the_mean() -> None:
    values = torch.rand(50, dtype=DT) * 2 - 1
    h = soft_histogram(values, 11)
    nodes = torch.linspace(-1, 1, 11, dtype=DT)
    torch.testing.assert_close(h.sum(), torch.tensor(1.0, dtype=DT))
    torch.testing.assert_close((h * nodes).sum(), values.mean())
    assert bool((h >= 0).all())


def test_histogram_separated_is_zero_and_inverted_is_one() -> None:
    angles = torch.tensor([0.0, 0.05, 0.1, 1.5, 1.55, 1.6], dtype=DT)
    x = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    assert float(HistogramLoss()(x, y)) == 0.0
    pos, neg = y[:, None] == y[None, :], y[:, None] != y[None, :]
    pos.fill_diagonal_(False)
    a1, p, a2, n = masks_to_pairs(neg, pos)  # declare the far pairs positive
    torch.testing.assert_close(HistogramLoss()(x, y, (a1, p, a2, n)), torch.tensor(1.0, dtype=DT))


def test_ranked_list_large_temperature_focuses_on_the_hardest_negative() -> None:
    x, y = _batch(b=8, d=3, seed=21)
    soft = RankedListLoss(temperature=0.0, margin=0.0, alpha=2.0)(x, y)
    hard = RankedListLoss(temperature=200.0, margin=0.0, alpha=2.0)(x, y)
    assert float(hard) > float(soft)


@pytest.mark.parametrize("name", ["histogram", "ranked_list", "margin", "circle", "sup_con"])
def test_no_positive_pair_gives_zero_with_graph(name: str) -> None:
    x = torch.randn(5, 3, dtype=DT, requires_grad=True)
    loss = build(name).double()(x, torch.arange(5))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("name", ["histogram", "ranked_list", "margin", "circle", "sup_con"])
def test_permutation_invariance_and_dtype(name: str) -> None:
    x, y = _batch(b=10, seed=22)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    loss = build(name).double()
    torch.testing.assert_close(loss(x, y), loss(x[perm], y[perm]))
    assert build(name)(x.float(), y).dtype == torch.float32


def test_sup_con_large_batch_runs() -> None:
    x = torch.randn(512, 16)
    y = torch.arange(512) % 64
    assert torch.isfinite(SupConLoss()(x, y))


# --------------------------------------------------------------------------- dense triplet batches

def test_dense_triplet_batch_follows_the_paper() -> None:
    labels = torch.rand(60, 2, generator=torch.Generator().manual_seed(4))
    batch = dense_triplet_batch(labels, anchor_count=2, k=3, batch_size=12, seed=5)
    again = dense_triplet_batch(labels, anchor_count=2, k=3, batch_size=12, seed=5)
    other = dense_triplet_batch(labels, anchor_count=2, k=3, batch_size=12, seed=6)
    assert torch.equal(batch.indices, again.indices) and not torch.equal(batch.indices, other.indices)
    assert batch.anchors.tolist() == [0, 6]
    assert len(set(batch.indices.tolist())) == 12
    first = int(batch.indices[0])
    dist = ((labels - labels[first]) ** 2).sum(1)
    dist[first] = float("inf")
    assert set(batch.indices[1:4].tolist()) == set(torch.argsort(dist)[:3].tolist())
    loss = LogRatioLoss()(torch.randn(12, 4), labels[batch.indices], anchors=batch.anchors)
    assert torch.isfinite(loss)
    with pytest.raises(ConfigError):
        dense_triplet_batch(labels, anchor_count=5, k=3, batch_size=12, seed=0)
    with pytest.raises(ConfigError):
        dense_triplet_batch(labels, anchor_count=1, k=3, batch_size=100, seed=0)


# --------------------------------------------------------------------------- cross-batch memory

def _xbm_reference(steps, memory_size: int, temperature: float = 0.1):
    """Simulate the queue with Python lists and evaluate the naive SupCon on (batch, memory)."""
    queue: list[tuple[torch.Tensor, int]] = []
    pointer = 0
    results = []
    for x, y in steps:
        slots = []
        for i in range(len(y)):
            entry = (x[i].detach().clone(), int(y[i]))
            if len(queue) < memory_size:
                queue.append(entry)
                slots.append(len(queue) - 1)
            else:
                queue[pointer] = entry
                slots.append(pointer)
            pointer = (pointer + 1) % memory_size
        mem_e = torch.stack([e for e, _ in queue])
        mem_y = torch.tensor([c for _, c in queue])
        results.append(
            _value_and_grad(lambda e: ref_sup_con(e, y, mem_e, mem_y, temperature, self_index=slots), x)
        )
    return results


def test_cross_batch_memory_matches_reference_with_wraparound() -> None:
    steps = [_batch(b=6, d=3, classes=3, seed=30 + s) for s in range(5)]
    xbm = CrossBatchMemory(SupConLoss(), memory_size=14, embedding_dim=3)
    expected = _xbm_reference(steps, 14)
    for (x, y), ref in zip(steps, expected):
        _assert_same(_value_and_grad(lambda e: xbm(e, y), x), ref)
    assert int(xbm.fill_count) == 14 and int(xbm.queue_pointer) == (5 * 6) % 14


def test_cross_batch_memory_first_step_equals_plain_loss_value() -> None:
    x, y = _batch(b=8, d=3, seed=40)
    xbm = CrossBatchMemory("circle", memory_size=64, embedding_dim=3)
    torch.testing.assert_close(xbm(x, y), CircleLoss()(x, y))


def test_cross_batch_memory_state_dict_resume() -> None:
    steps = [_batch(b=5, d=3, seed=50 + s) for s in range(4)]
    xbm = CrossBatchMemory(CircleLoss(), memory_size=12, embedding_dim=3)
    for x, y in steps[:3]:
        xbm(x, y)
    state = copy.deepcopy(xbm.state_dict())
    assert set(state) == {"embedding_memory", "label_memory", "queue_pointer", "fill_count"}
    resumed = CrossBatchMemory(CircleLoss(), memory_size=12, embedding_dim=3)
    resumed.load_state_dict(state)
    torch.testing.assert_close(resumed(*steps[3]), xbm(*steps[3]))
    torch.testing.assert_close(resumed.embedding_memory, xbm.embedding_memory)


class _AllTripletsMiner(nn.Module):
    """Test miner: every (a, p, n) of (batch, reference), self-pairs included on purpose."""

    def forward(self, embeddings, labels, ref_embeddings, ref_labels):
        same = labels[:, None] == ref_labels[None, :]
        a, p, n = (same[:, :, None] & ~same[:, None, :]).nonzero(as_tuple=True)
        return a, p, n


class _Spy(nn.Module):
    tuple_kind = "triplets"
    label_kind = "class"

    def __init__(self) -> None:
        super().__init__()
        self.seen = None

    def forward(self, embeddings, labels, indices=None, ref_embeddings=None, ref_labels=None):
        self.seen = indices
        return embeddings.sum() * 0


def test_cross_batch_memory_drops_self_comparisons_from_miner_output() -> None:
    spy = _Spy()
    xbm = CrossBatchMemory(spy, memory_size=10, embedding_dim=3, miner=_AllTripletsMiner())
    x, y = _batch(b=4, d=3, classes=2, seed=60)
    xbm(x, y)
    x2, y2 = _batch(b=4, d=3, classes=2, seed=61)
    xbm(x2, y2)
    a, p, n = spy.seen
    slots = torch.arange(4, 8)
    assert a.numel() > 0 and not bool((p == slots[a]).any())
    # every other (anchor, positive) of the memory is still there
    mem_y = xbm.label_memory[:8]
    expected_pos = sum(int((mem_y == y2[i]).sum()) - 1 for i in range(4))
    assert len({(int(u), int(v)) for u, v in zip(a, p)}) == expected_pos


def test_cross_batch_memory_errors() -> None:
    with pytest.raises(ConfigError):
        CrossBatchMemory(LogRatioLoss(), memory_size=8, embedding_dim=3)

    class _NoTuples(nn.Module):
        tuple_kind = None
        label_kind = "class"

    with pytest.raises(ConfigError):
        CrossBatchMemory(_NoTuples(), memory_size=8, embedding_dim=3)
    xbm = CrossBatchMemory(SupConLoss(), memory_size=4, embedding_dim=3)
    with pytest.raises(DataError):
        xbm(torch.randn(5, 3), torch.arange(5))
    with pytest.raises(DataError):
        xbm(torch.randn(2, 4), torch.arange(2))


# --------------------------------------------------------------------------- PML cross-checks

@pytest.fixture
def pml():
    return pytest.importorskip("pytorch_metric_learning")


def test_pml_histogram(pml) -> None:
    from pytorch_metric_learning import losses as L

    x, y = _batch(b=12, d=4, seed=70)
    ours = _value_and_grad(lambda e: HistogramLoss(num_nodes=101)(e, y), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PML's own indexing deprecation warning
        theirs = _value_and_grad(lambda e: L.HistogramLoss(n_bins=100)(e, y), x)
    # PML computes the bin indices in float32, hence the looser tolerance.
    _assert_same(ours, theirs, rtol=1e-5, atol=1e-6)


def test_pml_ranked_list(pml) -> None:
    from pytorch_metric_learning import losses as L

    x, y = _batch(b=12, d=3, seed=71)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_t = L.RankedListLoss(margin=0.4, Tn=10.0, imbalance=0.5, alpha=1.2, Tp=0)(x, y)
    ours_t = RankedListLoss(temperature=10.0)(x, y)
    torch.testing.assert_close(0.5 * ours_t, theirs_t, rtol=1e-3, atol=1e-6)
    # gradients agree when the weights are constant anyway (T = 0)
    ours = _value_and_grad(lambda e: 0.5 * RankedListLoss(temperature=0.0)(e, y), x)
    theirs = _value_and_grad(lambda e: L.RankedListLoss(margin=0.4, Tn=0.0, imbalance=0.5, alpha=1.2)(e, y), x)
    _assert_same(ours, theirs, rtol=1e-3, atol=1e-6)


def test_pml_margin(pml) -> None:
    from pytorch_metric_learning import losses as L

    x, y = _batch(b=9, d=3, seed=72)
    a = torch.tensor([0, 1, 2, 3, 0, 4])
    p = torch.tensor([3, 4, 5, 6, 6, 7])
    n = torch.tensor([1, 2, 0, 4, 2, 3])
    for num_classes in (None, 3):
        ours_loss = MarginLoss(margin=0.2, beta=1.1, num_classes=num_classes).double()
        theirs_loss = L.MarginLoss(margin=0.2, nu=0, beta=1.1, learn_beta=True, num_classes=num_classes).double()
        xe1, xe2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        v1, v2 = ours_loss(xe1, y, (a, p, n)), theirs_loss(xe2, y, (a, p, n))
        g1 = torch.autograd.grad(v1, [xe1, ours_loss.beta])
        g2 = torch.autograd.grad(v2, [xe2, theirs_loss.beta])
        torch.testing.assert_close(v1, v2)
        torch.testing.assert_close(g1[0], g2[0])
        torch.testing.assert_close(g1[1], g2[1])


def test_pml_circle(pml) -> None:
    from pytorch_metric_learning import losses as L

    x, y = _batch(b=12, d=4, seed=73)
    ours = _value_and_grad(lambda e: CircleLoss(m=0.4, gamma=80)(e, y), x)
    theirs = _value_and_grad(lambda e: L.CircleLoss(m=0.4, gamma=80)(e, y), x)
    _assert_same(ours, theirs, rtol=1e-6, atol=1e-8)


def test_pml_sup_con(pml) -> None:
    from pytorch_metric_learning import losses as L

    x, y = _batch(b=12, d=4, seed=74)
    ours = _value_and_grad(lambda e: SupConLoss(0.1)(e, y), x)
    theirs = _value_and_grad(lambda e: L.SupConLoss(temperature=0.1)(e, y), x)
    _assert_same(ours, theirs, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["circle", "sup_con"])
def test_pml_cross_batch_memory(pml, kind: str) -> None:
    from pytorch_metric_learning import losses as L

    ours_inner = CircleLoss() if kind == "circle" else SupConLoss()
    theirs_inner = L.CircleLoss(m=0.4, gamma=80) if kind == "circle" else L.SupConLoss(temperature=0.1)
    ours = CrossBatchMemory(ours_inner, memory_size=16, embedding_dim=3)
    theirs = L.CrossBatchMemory(theirs_inner, embedding_size=3, memory_size=16)
    for step in range(4):
        x, y = _batch(b=6, d=3, classes=3, seed=80 + step)
        x = x.float()
        _assert_same(
            _value_and_grad(lambda e: ours(e, y), x),
            _value_and_grad(lambda e: theirs(e, y), x),
            rtol=1e-4,
            atol=1e-5,
        )
