"""Core pair/tuple losses: float64 values and gradients against naive loops, gradcheck, PML cross-checks."""
from __future__ import annotations

import itertools

import pytest
import torch

from deepmetric.errors import ConfigError, DataError
from deepmetric.losses import (
    ContrastiveLoss,
    LiftedStructureLoss,
    MultiSimilarityLoss,
    NPairLoss,
    QuadrupletLoss,
    TripletMarginLoss,
)
from deepmetric.losses import _pairs
from reference.memory import LargestTensor
from reference import ref_losses_core as ref

LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4])
REF_LABELS = torch.tensor([0, 1, 1, 2, 5, 3, 3, 0])


def _data(n: int = 12, d: int = 3, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, d, generator=g, dtype=torch.float64)).requires_grad_()


def _compare(ours_fn, ref_fn, x: torch.Tensor, *others: torch.Tensor, tol: float = 1e-9) -> None:
    ours = ours_fn()
    expected = ref_fn()
    inputs = (x,) + others
    g_ours = torch.autograd.grad(ours, inputs, allow_unused=True)
    g_ref = torch.autograd.grad(expected, inputs, allow_unused=True)
    assert ours.dtype == torch.float64 and ours.dim() == 0
    assert torch.allclose(ours, expected, rtol=tol, atol=tol), (float(ours), float(expected))
    for a, b in zip(g_ours, g_ref):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-9), (a - b).abs().max()


def _mined_pairs(labels: torch.Tensor, ref_labels: torch.Tensor | None = None, seed: int = 1):
    """A random subset of the valid pairs, as PML-layout index tensors plus python lists."""
    y = labels.tolist()
    ry = None if ref_labels is None else ref_labels.tolist()
    pos, neg = ref.all_pairs(y, ry)
    g = torch.Generator().manual_seed(seed)
    pos = [pos[i] for i in torch.randperm(len(pos), generator=g)[: max(1, len(pos) // 2)].tolist()]
    neg = [neg[i] for i in torch.randperm(len(neg), generator=g)[: max(1, len(neg) // 3)].tolist()]
    t = lambda idx: torch.tensor(idx, dtype=torch.long)  # noqa: E731
    indices = (t([a for a, _ in pos]), t([p for _, p in pos]), t([a for a, _ in neg]), t([n for _, n in neg]))
    return indices, (pos, neg)


# ----------------------------------------------------------------------------------------------
# Contrastive
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum"])
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
def test_contrastive_matches_reference(reduction, squared, distance):
    x = _data(scale=0.6)
    kw = dict(margin=1.0, pos_margin=0.1)
    loss = ContrastiveLoss(distance=distance, squared=squared, reduction=reduction, **kw)
    y = LABELS.tolist()
    _compare(
        lambda: loss(x, LABELS),
        lambda: ref.contrastive(x, y, metric=distance, squared=squared, reduction=reduction, **kw),
        x,
    )


def test_contrastive_ref_set_and_mined_pairs():
    x, r = _data(), _data(8, seed=3)
    loss = ContrastiveLoss(margin=2.0)
    _compare(
        lambda: loss(x, LABELS, ref_embeddings=r, ref_labels=REF_LABELS),
        lambda: ref.contrastive(x, LABELS.tolist(), r, REF_LABELS.tolist(), margin=2.0),
        x,
        r,
    )
    indices, pairs = _mined_pairs(LABELS)
    _compare(lambda: loss(x, LABELS, indices), lambda: ref.contrastive(x, None, pairs=pairs, margin=2.0), x)


def test_contrastive_forward_pairs():
    x1, x2 = _data(6, seed=1), _data(6, seed=2)
    same = torch.tensor([1, 0, 1, 0, 0, 1])
    loss = ContrastiveLoss(margin=2.5)
    pairs = ([(i, i) for i in range(6) if same[i]], [(i, i) for i in range(6) if not same[i]])
    _compare(lambda: loss.forward_pairs(x1, x2, same), lambda: ref.contrastive(x1, None, x2, pairs=pairs, margin=2.5), x1, x2)
    assert torch.equal(loss.forward_pairs(x1, x2, same.bool()), loss.forward_pairs(x1, x2, same))
    with pytest.raises(DataError):
        loss.forward_pairs(x1, x2, torch.tensor([2, 0, 1, 0, 0, 1]))
    with pytest.raises(DataError):
        loss.forward_pairs(x1, x2[:3], same)


# ----------------------------------------------------------------------------------------------
# Triplet
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum"])
@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("distance", ["squared_euclidean", "euclidean", "cosine"])
def test_triplet_all_matches_reference(reduction, soft_margin, distance):
    x = _data(scale=0.5)
    loss = TripletMarginLoss(margin=0.3, distance=distance, soft_margin=soft_margin, reduction=reduction)
    _compare(
        lambda: loss(x, LABELS),
        lambda: ref.triplet(x, LABELS.tolist(), margin=0.3, metric=distance, soft_margin=soft_margin, reduction=reduction),
        x,
    )


@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([0] * 12 + [1] * 3 + [2] * 2),  # > 8 positives per anchor: sorted positives
        torch.tensor([0, 1] * 9),  # 8 positives per anchor: slot path at its limit
    ],
)
def test_triplet_all_large_classes(labels):
    x = _data(len(labels), seed=4, scale=0.4)
    loss = TripletMarginLoss(margin=0.5, reduction="mean_nonzero")
    _compare(lambda: loss(x, labels), lambda: ref.triplet(x, labels.tolist(), margin=0.5), x)


def test_triplet_sorted_negatives_branch():
    # More positives than negatives per anchor: the negative side is sorted instead.
    x = _data(5, seed=5, scale=0.4)
    r = _data(23, seed=6, scale=0.4)
    y, ry = torch.zeros(5, dtype=torch.long), torch.tensor([0] * 20 + [1] * 3)
    for reduction in ["mean_nonzero", "mean", "sum"]:
        loss = TripletMarginLoss(margin=0.5, reduction=reduction)
        _compare(
            lambda: loss(x, y, ref_embeddings=r, ref_labels=ry),
            lambda: ref.triplet(x, y.tolist(), r, ry.tolist(), margin=0.5, reduction=reduction),
            x,
            r,
        )


def test_triplet_given_triplets_and_pairs():
    x = _data(scale=0.5)
    trips = ref.all_triplets(LABELS.tolist())
    g = torch.Generator().manual_seed(0)
    chosen = [trips[i] for i in torch.randint(len(trips), (40,), generator=g).tolist()]  # duplicates kept
    idx = tuple(torch.tensor(c) for c in zip(*chosen))
    loss = TripletMarginLoss(margin=0.4, distance="euclidean")
    _compare(lambda: loss(x, LABELS, idx), lambda: ref.triplet(x, None, triplets=chosen, margin=0.4, metric="euclidean"), x)
    indices, (pos, neg) = _mined_pairs(LABELS)
    pos, neg = sorted(set(pos)), sorted(set(neg))
    combos = [(a, p, n) for a, p in pos for a2, n in neg if a2 == a]
    assert combos, "the mined pairs should form some triplets"
    _compare(lambda: loss(x, LABELS, indices), lambda: ref.triplet(x, None, triplets=combos, margin=0.4, metric="euclidean"), x)


def test_triplet_forward_triplets():
    a, p, n = _data(7, seed=1), _data(7, seed=2), _data(7, seed=3)
    loss = TripletMarginLoss(margin=1.0, reduction="mean")
    stacked = torch.cat([a, p, n])
    trips = [(i, 7 + i, 14 + i) for i in range(7)]
    _compare(lambda: loss.forward_triplets(a, p, n), lambda: ref.triplet(stacked, None, triplets=trips, margin=1.0, reduction="mean"), a, p, n)
    with pytest.raises(DataError):
        loss.forward_triplets(a, p, n[:3])


def test_triplet_no_valid_triplet_and_bad_indices():
    x = _data(4)
    out = TripletMarginLoss()(x, torch.tensor([0, 1, 2, 3]))
    out.backward()
    assert float(out.detach()) == 0.0 and x.grad is not None
    with pytest.raises(DataError):
        TripletMarginLoss()(x, torch.tensor([0, 0, 1, 1]), (torch.tensor([0]), torch.tensor([9]), torch.tensor([2])))
    with pytest.raises(ConfigError):
        TripletMarginLoss(distance="manhattan")
    with pytest.raises(ConfigError):
        TripletMarginLoss(reduction="max")




@pytest.mark.parametrize(
    "loss",
    [
        TripletMarginLoss(),
        TripletMarginLoss(soft_margin=True),
        QuadrupletLoss(),
        ContrastiveLoss(),
        MultiSimilarityLoss(),
        LiftedStructureLoss(),
        NPairLoss(),
    ],
    ids=lambda l: type(l).__name__ + ("_soft" if getattr(l, "soft_margin", False) else ""),
)
def test_memory_is_o_batch_by_ref(loss):
    """No op (forward or backward) produces a tensor larger than a few B×R."""
    b, k = 256, 4
    x = torch.randn(b, 16).requires_grad_()
    y = torch.arange(b // k).repeat_interleave(k)
    with LargestTensor() as mode:
        loss(x, y).backward()
    assert mode.largest <= 4 * b * b, mode.largest


def test_triplet_all_b2048_no_cubic_path():
    """B=2048, D=128, K=4 forward+backward of all triplets: every tensor stays O(B²)."""
    b, k = 2048, 4
    x = torch.nn.functional.normalize(torch.randn(b, 128), dim=1).requires_grad_()
    y = torch.arange(b // k).repeat_interleave(k)
    with LargestTensor() as mode:
        out = TripletMarginLoss()(x, y)
        out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    assert mode.largest <= 2 * b * b


# ----------------------------------------------------------------------------------------------
# Multi-similarity, lifted structure, N-pair, quadruplet
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,beta,base", [(2.0, 50.0, 1.0), (2.0, 40.0, 0.5), (1.0, 10.0, 0.0)])
def test_multi_similarity_matches_reference(alpha, beta, base):
    x = _data()
    loss = MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
    kw = dict(alpha=alpha, beta=beta, base=base)
    _compare(lambda: loss(x, LABELS), lambda: ref.multi_similarity(x, LABELS.tolist(), **kw), x)
    indices, pairs = _mined_pairs(LABELS)
    _compare(lambda: loss(x, LABELS, indices), lambda: ref.multi_similarity(x, None, pairs=pairs, **kw), x)
    r = _data(8, seed=7)
    _compare(
        lambda: loss(x, LABELS, ref_embeddings=r, ref_labels=REF_LABELS),
        lambda: ref.multi_similarity(x, LABELS.tolist(), r, REF_LABELS.tolist(), **kw),
        x,
        r,
    )


@pytest.mark.parametrize("margin,distance", [(1.0, "euclidean"), (0.5, "squared_euclidean")])
def test_lifted_structure_matches_reference(margin, distance):
    x = _data(scale=0.5)
    loss = LiftedStructureLoss(margin=margin, distance=distance)
    _compare(lambda: loss(x, LABELS), lambda: ref.lifted_structure(x, LABELS.tolist(), margin=margin, metric=distance), x)
    indices, pairs = _mined_pairs(LABELS)
    _compare(lambda: loss(x, LABELS, indices), lambda: ref.lifted_structure(x, None, pairs=pairs, margin=margin, metric=distance), x)


@pytest.mark.parametrize("l2_reg", [0.0, 0.002, 0.5])
def test_n_pair_matches_reference(l2_reg):
    x = _data()
    loss = NPairLoss(l2_reg=l2_reg)
    _compare(lambda: loss(x, LABELS), lambda: ref.n_pair(x, LABELS.tolist(), l2_reg=l2_reg), x)
    indices, pairs = _mined_pairs(LABELS)
    _compare(lambda: loss(x, LABELS, indices), lambda: ref.n_pair(x, None, pairs=pairs, l2_reg=l2_reg), x)
    r = _data(8, seed=8)
    _compare(
        lambda: loss(x, LABELS, ref_embeddings=r, ref_labels=REF_LABELS),
        lambda: ref.n_pair(x, LABELS.tolist(), r, REF_LABELS.tolist(), l2_reg=l2_reg),
        x,
        r,
    )


@pytest.mark.parametrize("l2_reg", [0.0, 0.002])
def test_n_pair_batch_matches_reference(l2_reg):
    """The paper's N-pair batch (distinct anchor labels, ref_labels == labels) takes a cross-entropy
    shortcut; it must equal the naive formula, and batches that are not N-pair batches (a repeated
    label, a permuted reference) must keep the general path."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_()
    p = torch.randn(6, 4, generator=g, dtype=torch.float64).requires_grad_()
    loss = NPairLoss(l2_reg=l2_reg)
    for y, ry in (
        (torch.tensor([3, 0, 5, 1, 2, 9]), torch.tensor([3, 0, 5, 1, 2, 9])),  # N-pair batch
        (torch.tensor([3, 0, 5, 1, 2, 3]), torch.tensor([3, 0, 5, 1, 2, 3])),  # a label twice
        (torch.tensor([3, 0, 5, 1, 2, 9]), torch.tensor([0, 3, 5, 1, 2, 9])),  # positives permuted
    ):
        _compare(
            lambda: loss(a, y, ref_embeddings=p, ref_labels=ry),
            lambda: ref.n_pair(a, y.tolist(), p, ry.tolist(), l2_reg=l2_reg),
            a,
            p,
        )


@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum"])
def test_quadruplet_matches_reference(reduction):
    x = _data(scale=0.5)
    loss = QuadrupletLoss(alpha1=1.0, alpha2=0.5, reduction=reduction)
    y = LABELS.tolist()
    _compare(lambda: loss(x, LABELS), lambda: ref.quadruplet(x, y, reduction=reduction), x)
    indices, pairs = _mined_pairs(LABELS)
    _compare(lambda: loss(x, LABELS, indices), lambda: ref.quadruplet(x, y, pairs=pairs, reduction=reduction), x)
    r = _data(8, seed=9, scale=0.5)
    _compare(
        lambda: loss(x, LABELS, ref_embeddings=r, ref_labels=REF_LABELS),
        lambda: ref.quadruplet(x, y, r, REF_LABELS.tolist(), reduction=reduction),
        x,
        r,
    )


def test_quadruplet_two_classes_only_triplet_term():
    x = _data(6, scale=0.5)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    q = QuadrupletLoss(alpha1=0.7, reduction="mean")(x, y)
    t = TripletMarginLoss(margin=0.7, reduction="mean")(x, y)
    assert torch.allclose(q, t)


def test_grouped_hinge_sums_against_loop():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(50, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 4, (50,), generator=g)
    valid = torch.rand(50, generator=g) < 0.7
    t = torch.randn(9, generator=g, dtype=torch.float64) * 2
    qg = torch.randint(0, 5, (9,), generator=g)  # group 4 is empty
    sums, counts = _pairs.grouped_hinge_sums(values, groups, valid, t, qg)
    for q in range(9):
        sel = valid & (groups == qg[q])
        hinge = torch.relu(t[q] - values[sel])
        assert torch.isclose(sums[q], hinge.sum(), atol=1e-12)
        assert int(counts[q]) == int((hinge > 0).sum())


# ----------------------------------------------------------------------------------------------
# gradcheck (tiny inputs, away from hinge kinks)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "loss",
    [
        ContrastiveLoss(margin=3.0),
        TripletMarginLoss(margin=5.0, reduction="mean"),
        TripletMarginLoss(soft_margin=True),
        MultiSimilarityLoss(beta=10.0),
        LiftedStructureLoss(margin=3.0),
        NPairLoss(l2_reg=0.1),
        QuadrupletLoss(alpha1=5.0, alpha2=5.0, reduction="mean"),
    ],
    ids=lambda l: type(l).__name__,
)
def test_gradcheck(loss):
    x = _data(6, d=2, seed=11, scale=0.5)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (x,), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# pytorch-metric-learning cross-checks (documented parameter mappings)
# ----------------------------------------------------------------------------------------------
def _pml():
    return pytest.importorskip("pytorch_metric_learning")


def _pk_batch(p: int = 6, k: int = 3, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p * k, d, generator=g, dtype=torch.float64)
    y = torch.arange(p).repeat_interleave(k)
    return x, y


def test_pml_contrastive():
    """PML ContrastiveLoss(pos_margin, neg_margin, LpDistance(normalize_embeddings=False)) has
    unsquared hinges and reduces each of its two parts by mean-over-non-zero, then adds them:
    ours(squared=False, reduction="mean_nonzero") on positive pairs + the same on negative pairs."""
    _pml()
    from pytorch_metric_learning import distances, losses

    x, y = _pk_batch()
    pml = losses.ContrastiveLoss(pos_margin=0.5, neg_margin=2.5, distance=distances.LpDistance(normalize_embeddings=False))
    ours = ContrastiveLoss(margin=2.5, pos_margin=0.5, squared=False, reduction="mean_nonzero")
    pos, neg = ref.all_pairs(y.tolist())
    t = lambda idx: torch.tensor(idx, dtype=torch.long)  # noqa: E731
    pos_idx = (t([a for a, _ in pos]), t([p for _, p in pos]), t([]), t([]))
    assert torch.allclose(ours(x, y, pos_idx), pml(x, y, pos_idx))
    neg_part = ours.forward_pairs(x[t([a for a, _ in neg])], x[t([n for _, n in neg])], torch.zeros(len(neg)))
    assert torch.allclose(ours(x, y, pos_idx) + neg_part, pml(x, y))


@pytest.mark.parametrize("power,distance", [(2, "squared_euclidean"), (1, "euclidean")])
def test_pml_triplet(power, distance):
    """PML TripletMarginLoss(margin, LpDistance(normalize_embeddings=False, power)) with its default
    AvgNonZeroReducer == ours(reduction="mean_nonzero"), for all triplets and for given triplets;
    smooth_loss=True with margin=0 == ours(soft_margin=True)."""
    _pml()
    from pytorch_metric_learning import distances, losses, miners

    x, y = _pk_batch()
    lp = distances.LpDistance(normalize_embeddings=False, power=power)
    pml = losses.TripletMarginLoss(margin=0.3, distance=lp)
    ours = TripletMarginLoss(margin=0.3, distance=distance)
    assert torch.allclose(ours(x, y), pml(x, y))
    mined = miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard", distance=lp)(x, y)
    assert len(mined[0]) > 0
    assert torch.allclose(ours(x, y, mined), pml(x, y, mined))
    soft = losses.TripletMarginLoss(margin=0.0, smooth_loss=True, distance=lp)
    assert torch.allclose(TripletMarginLoss(distance=distance, soft_margin=True)(x, y), soft(x, y))


@pytest.mark.parametrize("base", [1.0, 0.5])
def test_pml_multi_similarity(base):
    """PML MultiSimilarityLoss(alpha, beta, base) == ours(alpha, beta, base) (PML's base is λ)."""
    _pml()
    from pytorch_metric_learning import losses, miners

    x, y = _pk_batch()
    pml = losses.MultiSimilarityLoss(alpha=2, beta=50, base=base)
    ours = MultiSimilarityLoss(alpha=2, beta=50, base=base)
    assert torch.allclose(ours(x, y), pml(x, y))
    mined = miners.MultiSimilarityMiner(epsilon=0.1)(x, y)
    assert torch.allclose(ours(x, y, mined), pml(x, y, mined))


def test_pml_lifted_structure():
    """PML LiftedStructureLoss(neg_margin=α, pos_margin=0, LpDistance(normalize_embeddings=False)) is
    the paper's smooth form over all pairs == ours(margin=α). (PML's GeneralizedLiftedStructureLoss
    is a different loss and is not compared.)"""
    _pml()
    from pytorch_metric_learning import distances, losses

    x, y = _pk_batch()
    x = 0.3 * x
    pml = losses.LiftedStructureLoss(neg_margin=1.0, pos_margin=0.0, distance=distances.LpDistance(normalize_embeddings=False))
    assert torch.allclose(LiftedStructureLoss(margin=1.0)(x, y), pml(x, y))


def test_pml_n_pairs():
    """PML NPairsLoss takes one (anchor, positive) pair per class and uses the other classes'
    positives as negatives (the paper's N-pair batch). Ours reproduces it with the anchors as
    embeddings and their positives as ref_embeddings, l2_reg=0; PML's DotProductSimilarity must be
    told not to normalise (its default), since the paper uses raw dot products."""
    _pml()
    from pytorch_metric_learning import distances, losses

    x, y = _pk_batch(p=7, k=2)
    anchors, positives = torch.arange(0, 14, 2), torch.arange(1, 14, 2)  # PML picks the first pair per class
    ours = NPairLoss(l2_reg=0.0)(x[anchors], y[anchors], ref_embeddings=x[positives], ref_labels=y[positives])
    pml = losses.NPairsLoss(distance=distances.DotProductSimilarity(normalize_embeddings=False))
    assert torch.allclose(ours, pml(x, y))


def test_float32_all_triplets_close_to_float64():
    x, y = _pk_batch(p=32, k=4, d=16)
    x = torch.nn.functional.normalize(x, dim=1)
    for loss in [TripletMarginLoss(), QuadrupletLoss()]:
        a = loss(x.float(), y)
        b = loss(x, y)
        assert a.dtype == torch.float32
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-5)


def test_all_pairs_helper_sanity():
    pos, neg = ref.all_pairs([0, 0, 1])
    assert pos == [(0, 1), (1, 0)] and len(neg) == 4
    assert len(list(itertools.chain(pos, neg))) == 6
