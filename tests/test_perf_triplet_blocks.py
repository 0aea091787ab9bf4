"""The anchor-block paths of the triplet-family losses and miners against the reference paths.

Every fast path (``deepmetric.miners._blocks``) is compared with the code it replaces, which stays
in place for unsupported inputs: patching ``supported`` to return False selects it. Small block
budgets force many blocks on small batches, so the block bookkeeping is exercised too.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deepmetric.losses.margin as margin_mod
import deepmetric.losses.triplet_margin as triplet_mod
import deepmetric.miners.hard as hard_mod
import deepmetric.miners.multi_similarity as ms_mod
import deepmetric.miners.semi_hard as semi_mod
from deepmetric import miners
from deepmetric.errors import DataError
from deepmetric.losses import MarginLoss, TripletMarginLoss
from deepmetric.miners import _blocks
from deepmetric.miners._common import masks, random_cap
from deepmetric.miners.distance_weighted import distance_weighted_probabilities
from reference.memory import LargestTensor
from reference.native import requires_cc
from reference import ref_losses_core as ref
from reference.ref_losses_rank import ref_margin

DISTANCES = ["euclidean", "squared_euclidean", "cosine"]


def _data(b: int, d: int = 5, classes: int = 4, seed: int = 0, ref_size: int | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (b,), generator=g)
    if ref_size is None:
        return x, y, None, None
    return x, y, torch.randn(ref_size, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (ref_size,), generator=g)


@pytest.fixture(params=[None, 40], ids=["default_blocks", "tiny_blocks"])
def budget(request, monkeypatch):
    if request.param is not None:
        monkeypatch.setattr(_blocks, "BLOCK_ELEMENTS", request.param)
    return request.param


def _slow(monkeypatch, *modules):
    for module in modules:
        monkeypatch.setattr(module, "supported", lambda *args, **kwargs: False)


def _value_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors if t is not None]
    it = iter(leaves)
    args = [next(it) if t is not None else None for t in tensors]
    out = fn(*args)
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return out.detach(), [torch.zeros_like(l) if g is None else g for l, g in zip(leaves, grads)]


def _assert_same(fast, slow, rtol=1e-9, atol=1e-10):
    torch.testing.assert_close(fast[0], slow[0], rtol=rtol, atol=atol)
    for a, b in zip(fast[1], slow[1]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def _both(monkeypatch, fn, *tensors, modules=(triplet_mod,)):
    fast = _value_and_grads(fn, *tensors)
    with monkeypatch.context() as m:
        _slow(m, *modules)
        slow = _value_and_grads(fn, *tensors)
    return fast, slow


# ------------------------------------------------------------------------------------ triplet loss
@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("reduction", ["mean_nonzero", "mean", "sum"])
@pytest.mark.parametrize("ref_size", [None, 23])
def test_all_triplets_blocks_match(monkeypatch, budget, distance, reduction, ref_size):
    x, y, r, ry = _data(30, ref_size=ref_size)
    loss = TripletMarginLoss(margin=0.7, distance=distance, reduction=reduction)
    fast, slow = _both(monkeypatch, lambda e, f: loss(e, y, None, f, ry), x, r)
    _assert_same(fast, slow)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("count", [20, 400])  # per-triplet path and block path
def test_explicit_triplets_match(monkeypatch, budget, distance, soft, count):
    x, y, _, _ = _data(30, seed=1)
    trips = ref.all_triplets(y.tolist())
    g = torch.Generator().manual_seed(2)
    chosen = [trips[i] for i in torch.randint(len(trips), (count,), generator=g).tolist()]  # unsorted, duplicates
    idx = tuple(torch.tensor(c) for c in zip(*chosen))
    for reduction in ("mean_nonzero", "mean", "sum"):
        loss = TripletMarginLoss(margin=0.5, distance=distance, soft_margin=soft, reduction=reduction)
        fast, slow = _both(monkeypatch, lambda e: loss(e, y, idx), x)
        _assert_same(fast, slow)
        expected = _value_and_grads(
            lambda e: ref.triplet(e, None, triplets=chosen, margin=0.5, metric=distance, soft_margin=soft, reduction=reduction), x
        )
        _assert_same(fast, expected)


@pytest.mark.parametrize("count", [10, 300])
def test_explicit_triplets_with_reference_set_and_self_pairs(monkeypatch, budget, count):
    x, y, r, ry = _data(20, ref_size=17, seed=3)
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 20, (count,), generator=g)
    p = torch.randint(0, 17, (count,), generator=g)
    n = torch.randint(0, 17, (count,), generator=g)
    for distance in DISTANCES:
        loss = TripletMarginLoss(margin=0.3, distance=distance)
        fast, slow = _both(monkeypatch, lambda e, f: loss(e, y, (a, p, n), f, ry), x, r)
        _assert_same(fast, slow)
    # a triplet whose positive is its anchor (distance 0: the clamp blocks the gradient)
    x2, y2, _, _ = _data(16, seed=5)
    a2 = torch.arange(16).repeat(30)
    p2 = a2.clone()
    n2 = torch.randint(0, 16, a2.shape, generator=g)
    loss = TripletMarginLoss(margin=0.3, distance="euclidean")
    fast, slow = _both(monkeypatch, lambda e: loss(e, y2, (a2, p2, n2)), x2)
    _assert_same(fast, slow)


@pytest.mark.parametrize("ref_size", [None, 19])
def test_pairs_match(monkeypatch, budget, ref_size):
    x, y, r, ry = _data(26, ref_size=ref_size, seed=6)
    rl = y if ry is None else ry
    size = 26 if ref_size is None else ref_size
    pos = [(i, j) for i in range(26) for j in range(size) if int(y[i]) == int(rl[j]) and (ref_size or i != j)]
    neg = [(i, j) for i in range(26) for j in range(size) if int(y[i]) != int(rl[j])]
    g = torch.Generator().manual_seed(7)
    pos = [pos[i] for i in torch.randperm(len(pos), generator=g)[: len(pos) // 2].tolist()] * 2  # unsorted, duplicates
    neg = [neg[i] for i in torch.randperm(len(neg), generator=g)[: len(neg) // 2].tolist()]
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    indices = (t([a for a, _ in pos]), t([b for _, b in pos]), t([a for a, _ in neg]), t([b for _, b in neg]))
    for distance in DISTANCES:
        for reduction in ("mean_nonzero", "mean"):
            loss = TripletMarginLoss(margin=0.4, distance=distance, reduction=reduction)
            fast, slow = _both(monkeypatch, lambda e, f: loss(e, y, indices, f, ry), x, r)
            _assert_same(fast, slow)


def test_bad_indices_same_errors(budget):
    x, y, _, _ = _data(40, seed=8)
    loss = TripletMarginLoss()
    big = torch.arange(40).repeat(5)
    cases = [
        ((big.flip(0) + 1, big, big), "anchor index out of range"),
        ((big, big, big + 1), "reference index out of range"),
        ((big - 1, big + 1, big), "anchor index out of range"),  # both wrong: the anchors are reported
        ((big, big[:-1], big), "differ in length"),
    ]
    for triplets, message in cases:
        with pytest.raises(DataError, match=message):
            loss(x, y, triplets)
    pairs_cases = [
        ((big, big, big + 1, big), "anchor index out of range"),
        ((big, big, big, big - 1), "reference index out of range"),
    ]
    for pairs, message in pairs_cases:
        with pytest.raises(DataError, match=message):
            loss(x, y, pairs)


def test_no_valid_triplet_gives_graph_connected_zero(budget):
    x = torch.randn(12, 3, dtype=torch.float64, requires_grad=True)
    out = TripletMarginLoss()(x, torch.arange(12))
    out.backward()
    assert float(out.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


# ------------------------------------------------------------------------------------ margin loss
@pytest.mark.parametrize("num_classes,nu", [(None, 0.0), (4, 0.1)])
@pytest.mark.parametrize("ref_size", [None, 21])
def test_margin_labels_match(monkeypatch, budget, num_classes, nu, ref_size):
    x, y, r, ry = _data(28, ref_size=ref_size, seed=9)
    loss = MarginLoss(margin=0.2, beta=1.0, nu=nu, num_classes=num_classes).double()
    with torch.no_grad():
        loss.beta.copy_(torch.linspace(0.9, 1.3, loss.beta.numel()))
    fast, slow = _both(monkeypatch, lambda e, f: loss(e, y, None, f, ry), x, r, modules=(margin_mod,))
    _assert_same(fast, slow)
    grads = []
    for patch in (False, True):
        with monkeypatch.context() as m:
            if patch:
                _slow(m, margin_mod)
            loss.beta.grad = None
            loss(x, y, None, r, ry).backward()
            grads.append(loss.beta.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("count", [6, 200])  # per-pair path and block path
@pytest.mark.parametrize("nu", [0.0, 0.2])
def test_margin_mined_triplets_match(monkeypatch, budget, count, nu):
    x, y, _, _ = _data(40, seed=10)
    trips = ref.all_triplets(y.tolist())
    g = torch.Generator().manual_seed(11)
    chosen = [trips[i] for i in torch.randint(len(trips), (count,), generator=g).tolist()]
    a, p, n = (torch.tensor(c) for c in zip(*chosen))
    loss = MarginLoss(margin=0.2, beta=1.1, nu=nu).double()
    fast, slow = _both(monkeypatch, lambda e: loss(e, y, (a, p, n)), x, modules=(margin_mod,))
    _assert_same(fast, slow)
    expected = _value_and_grads(
        lambda e: ref_margin(e, y, loss.beta.detach(), nu=nu,
                             pos_pairs=list(zip(a.tolist(), p.tolist())), neg_pairs=list(zip(a.tolist(), n.tolist()))),
        x,
    )
    _assert_same(fast, expected)
    # self-pairs are dropped and a pair given as positive and as negative counts once
    a2 = torch.cat([a, torch.tensor([3, 5, 5])])
    p2 = torch.cat([p, torch.tensor([3, 7, 7])])
    n2 = torch.cat([n, torch.tensor([7, 5, 7])])
    fast, slow = _both(monkeypatch, lambda e: loss(e, y, (a2, p2, n2)), x, modules=(margin_mod,))
    _assert_same(fast, slow)


# ------------------------------------------------------------------------------------ miners
def _same_tuples(fast, slow):
    assert len(fast) == len(slow)
    for u, v in zip(fast, slow):
        assert u.dtype == torch.long and torch.equal(u, v)


def _miner_both(monkeypatch, make, module, *args):
    fast = make()(*args)  # a fresh miner each time: seeded miners advance their generator
    with monkeypatch.context() as m:
        _slow(m, module)
        slow = make()(*args)
    _same_tuples(fast, slow)
    return fast


@pytest.mark.parametrize("ref_size", [None, 27])
def test_semi_hard_blocks_match(monkeypatch, budget, ref_size):
    x, y, r, ry = _data(40, ref_size=ref_size, seed=12)
    for distance, margin in (("euclidean", 0.8), ("squared_euclidean", 2.0), ("cosine", 0.2)):
        for negatives in ("all", "hardest"):
            for fallback in (None, "hardest", "easiest"):
                make = lambda: miners.SemiHardMiner(margin=margin, distance=distance, negatives=negatives, fallback=fallback)  # noqa: E731
                out = _miner_both(monkeypatch, make, semi_mod, x, y, r, ry)
                assert len(out[0]) > 0


@pytest.mark.parametrize("ref_size", [None, 27])
def test_hard_and_multi_similarity_blocks_match(monkeypatch, budget, ref_size):
    x, y, r, ry = _data(40, ref_size=ref_size, seed=13)
    for distance in DISTANCES:
        _miner_both(monkeypatch, lambda: miners.HardMiner(distance=distance), hard_mod, x, y, r, ry)
    for eps in (0.1, 0.5):
        _miner_both(monkeypatch, lambda: miners.MultiSimilarityMiner(epsilon=eps), ms_mod, x, y, r, ry)
        _miner_both(monkeypatch, lambda: miners.MultiSimilarityMiner(epsilon=eps, tuples_per_anchor=2, seed=3), ms_mod, x, y, r, ry)


def test_miners_ties_go_to_the_lowest_index(monkeypatch, budget):
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1, 1])
    for distance in DISTANCES[:2]:
        _miner_both(monkeypatch, lambda: miners.HardMiner(distance=distance), hard_mod, x, y)
        make = lambda: miners.SemiHardMiner(margin=5.0, distance=distance, negatives="hardest", fallback="easiest")  # noqa: E731
        _miner_both(monkeypatch, make, semi_mod, x, y)


def _old_distance_weighted(miner, embeddings, labels):
    """The full-matrix implementation the block version replaced (same random draws)."""
    generator = miner.rng.get(embeddings.device)
    x = F.normalize(embeddings, dim=1)
    dist = _blocks.Operands(x, None, "euclidean").block(0, len(x))[0]
    pos, neg = masks(labels, labels, True)
    pos &= neg.any(1, keepdim=True)
    a, p = pos.nonzero(as_tuple=True)
    keep = random_cap(a, miner.tuples_per_anchor, generator)
    a, p = a[keep], p[keep]
    if a.numel() == 0:
        return a, p, a.clone()
    probs = distance_weighted_probabilities(dist, neg, embeddings.shape[1], miner.cutoff, miner.nonzero_loss_cutoff)
    rows, row_of_pair, per_row = torch.unique_consecutive(a, return_inverse=True, return_counts=True)
    draws = torch.multinomial(probs[rows], int(per_row.max()), replacement=True, generator=generator)
    rank = torch.arange(a.numel()) - (torch.cumsum(per_row, 0) - per_row)[row_of_pair]
    return a, p, draws[row_of_pair, rank]


@pytest.mark.parametrize("cap", [None, 1])
def test_distance_weighted_blocks_draw_the_same(budget, cap):
    x, y, _, _ = _data(50, d=6, classes=5, seed=14)
    y[:3] = 9  # a class of three; and one singleton anchor without positives
    y[3] = 11
    fast = miners.DistanceWeightedMiner(tuples_per_anchor=cap, seed=4)
    slow = miners.DistanceWeightedMiner(tuples_per_anchor=cap, seed=4)
    for _ in range(3):  # the generator advances identically
        _same_tuples(fast(x, y), _old_distance_weighted(slow, x, y))


@pytest.mark.parametrize("cutoff, nonzero_loss_cutoff", [(0.0, 1.4), (0.5, 2.5), (0.0, 3.0)])
def test_distance_weighted_blocks_degenerate_cutoffs(cutoff, nonzero_loss_cutoff):
    """No clamp away from d = 0 (cutoff 0) or none below d = 2 (τ >= 2): the weights stay finite with a
    duplicated point and an antipodal pair, every draw is a negative, and the block probabilities
    equal the reference :func:`distance_weighted_probabilities` (up to rounding)."""
    g = torch.Generator().manual_seed(30)
    x = F.normalize(torch.randn(24, 5, generator=g, dtype=torch.float64), dim=1)
    y = torch.arange(24) % 4
    x[1] = x[2]  # a duplicate of another class: d = 0
    x[5] = -x[6]  # an antipodal pair of different classes: d = 2
    a, p, n = miners.DistanceWeightedMiner(cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff, seed=1)(x, y)
    assert len(a) and bool((y[a] != y[n]).all()) and bool((y[a] == y[p]).all())
    dist = _blocks.Operands(x, None, "euclidean").block(0, 24)[0]
    _, neg = masks(y, y, True)
    from deepmetric.miners.distance_weighted import _block_probabilities

    groups = _blocks.LabelGroups(y, y, True)
    fast = _block_probabilities(dist.clone(), groups, 0, 24, 5, cutoff, nonzero_loss_cutoff, _blocks.Scratch())
    slow = distance_weighted_probabilities(dist, neg, 5, cutoff, nonzero_loss_cutoff)
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------ memory


@pytest.mark.parametrize(
    "miner,loss",
    [
        (None, TripletMarginLoss(distance="euclidean")),
        (miners.HardMiner(), TripletMarginLoss(distance="euclidean")),
        (miners.DistanceWeightedMiner(seed=0), MarginLoss()),
        (miners.MultiSimilarityMiner(), TripletMarginLoss(distance="euclidean")),
    ],
    ids=["all_triplets", "hard", "distance_weighted", "multi_similarity"],
)
def test_no_batch_by_batch_tensor(miner, loss):
    """Forward and backward never materialise a (B, B) tensor (the blocks hold a few anchor rows); the
    multi-similarity miner's output itself is O(B²) pairs."""
    b, k = 1024, 4
    x = F.normalize(torch.randn(b, 32), dim=1).requires_grad_()
    y = torch.arange(b // k).repeat_interleave(k)
    with LargestTensor() as mode:
        indices = None if miner is None else miner(x, y)
        if isinstance(miner, miners.MultiSimilarityMiner):
            mode.largest = 0
        loss(x, y, indices).backward()
    assert torch.isfinite(x.grad).all()
    assert mode.largest < b * b // 2, mode.largest


@pytest.mark.parametrize("miner", [miners.HardMiner(), miners.MultiSimilarityMiner()], ids=["hard", "multi_similarity"])
def test_fused_mining_holds_no_batch_by_batch_tensor(miner):
    """loss(x, y, miner=m) for batch-hard and multi-similarity mining: forward and backward hold blocks
    of a few anchor rows only (the fused multi-similarity path lists no pairs either)."""
    b, k = 1024, 4
    x = F.normalize(torch.randn(b, 32), dim=1).requires_grad_()
    y = torch.arange(b // k).repeat_interleave(k)
    with LargestTensor() as mode:
        TripletMarginLoss(distance="euclidean")(x, y, miner=miner).backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    assert mode.largest < b * b // 2, mode.largest


# ------------------------------------------------------------------------------------ mined bands
@pytest.mark.parametrize("distance,margin", [("euclidean", 0.8), ("squared_euclidean", 2.0), ("cosine", 0.2)])
def test_semi_hard_triplets_recomputed_by_the_loss(budget, distance, margin):
    """Triplets from SemiHardMiner(negatives="all") carry a note; the loss rebuilds the bands from the
    same distance blocks instead of reading the indices: same values and gradients as a plain tuple."""
    x, y, _, _ = _data(40, seed=15)
    leaf = x.clone().requires_grad_()
    mined = miners.SemiHardMiner(margin=margin, distance=distance, negatives="all")(leaf, y)
    assert isinstance(mined, tuple) and len(mined) == 3 and hasattr(mined, "note") and len(mined[0]) > 0
    for loss_margin, reduction in ((margin, "mean_nonzero"), (0.5 * margin, "mean"), (2 * margin, "sum")):
        loss = TripletMarginLoss(margin=loss_margin, distance=distance, reduction=reduction)
        out = loss(leaf, y, mined)
        g_band = torch.autograd.grad(out, leaf)[0]
        plain = loss(leaf, y, tuple(mined))
        g_plain = torch.autograd.grad(plain, leaf)[0]
        torch.testing.assert_close(out, plain, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(g_band, g_plain, rtol=1e-7, atol=1e-9)


def test_semi_hard_note_is_ignored_when_anything_changed(monkeypatch):
    import copy
    import pickle

    x, y, _, _ = _data(40, seed=16)
    leaf = x.clone().requires_grad_()
    miner = miners.SemiHardMiner(margin=0.8, distance="euclidean", negatives="all")
    loss = TripletMarginLoss(margin=0.8, distance="euclidean")
    calls = []
    original = triplet_mod._semi_hard_band_loss
    monkeypatch.setattr(triplet_mod, "_semi_hard_band_loss", lambda *a: calls.append(1) or original(*a))
    mined = miner(leaf, y)
    reference = loss(leaf, y, tuple(mined)).detach()
    torch.testing.assert_close(loss(leaf.detach(), y, mined), reference)  # detach() shares the storage
    assert len(calls) == 1
    assert type(pickle.loads(pickle.dumps(mined))) is tuple and type(copy.deepcopy(mined)) is tuple
    loss(leaf, y.flip(0), mined)  # other labels
    loss(leaf.detach().clone(), y, mined)  # other storage
    TripletMarginLoss(margin=0.8, distance="cosine")(leaf, y, mined)  # other distance
    mined[0].add_(0)  # in-place change of the indices
    loss(leaf, y, mined)
    assert len(calls) == 1
    # bands that do not reproduce (here: a tampered count) fall back to reading the indices
    mined = miner(leaf, y)
    mined.note.counts[0] += 1
    torch.testing.assert_close(loss(leaf, y, mined), reference)
    assert len(calls) == 2


@pytest.mark.parametrize("distance", DISTANCES)
def test_multi_similarity_pairs_recomputed_by_the_triplet_loss(monkeypatch, budget, distance):
    from deepmetric.losses import MultiSimilarityLoss

    x, y, _, _ = _data(40, seed=17)
    leaf = x.clone().requires_grad_()
    mined = miners.MultiSimilarityMiner(epsilon=0.3)(leaf, y)
    assert hasattr(mined, "note") and len(mined) == 4 and len(mined[2]) > 0
    for reduction in ("mean_nonzero", "mean", "sum"):
        loss = TripletMarginLoss(margin=0.6, distance=distance, reduction=reduction)
        out = loss(leaf, y, mined)
        g = torch.autograd.grad(out, leaf)[0]
        plain = loss(leaf, y, tuple(mined))
        g_plain = torch.autograd.grad(plain, leaf)[0]
        torch.testing.assert_close(out, plain, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(g, g_plain, rtol=1e-7, atol=1e-9)
    # other consumers see an ordinary 4-tuple
    torch.testing.assert_close(MultiSimilarityLoss()(leaf, y, mined), MultiSimilarityLoss()(leaf, y, tuple(mined)))
    # negatives that do not reproduce fall back to reading the pairs
    mined.note.counts[0] += 1
    torch.testing.assert_close(TripletMarginLoss(margin=0.6, distance=distance)(leaf, y, mined),
                               TripletMarginLoss(margin=0.6, distance=distance)(leaf, y, tuple(mined)))
    # capped or against a reference set: plain tuples
    assert not hasattr(miners.MultiSimilarityMiner(tuples_per_anchor=2, seed=0)(leaf, y), "note")
    assert not hasattr(miners.MultiSimilarityMiner()(leaf, y, leaf.detach(), y), "note")


def test_note_does_not_match_new_embeddings_at_a_reused_address(monkeypatch):
    """Offline mining: indices mined from old embeddings, used with new ones, are read, not recomputed."""
    x, y, _, _ = _data(40, seed=18)
    calls = []
    original = triplet_mod._semi_hard_band_loss
    monkeypatch.setattr(triplet_mod, "_semi_hard_band_loss", lambda *a: calls.append(1) or original(*a))
    mined = miners.SemiHardMiner(margin=0.8, distance="euclidean", negatives="all")(x.clone(), y)
    new = x + 0.1  # whatever its address, the note still holds the old storage
    loss = TripletMarginLoss(margin=0.8, distance="euclidean")
    torch.testing.assert_close(loss(new, y, mined), loss(new, y, tuple(mined)))
    assert not calls


# ------------------------------------------------------------------------------------ fused mining
@pytest.mark.parametrize("distance,margin", [("euclidean", 0.8), ("squared_euclidean", 2.0), ("cosine", 0.2)])
def test_fused_semi_hard_equals_mining_then_loss(budget, distance, margin):
    """loss(x, y, miner=SemiHardMiner(negatives="all")) builds the bands inside the loss and never
    lists the triplets: the same values and gradients as mining first and passing a plain tuple."""
    x, y, _, _ = _data(40, seed=21)
    miner = miners.SemiHardMiner(margin=margin, distance=distance, negatives="all")
    for loss_margin, reduction in ((margin, "mean_nonzero"), (0.5 * margin, "mean"), (2 * margin, "sum")):
        loss = TripletMarginLoss(margin=loss_margin, distance=distance, reduction=reduction)
        fused = _value_and_grads(lambda t: loss(t, y, miner=miner), x)
        plain = _value_and_grads(lambda t: loss(t, y, tuple(t_.clone() for t_ in miner(t.detach(), y))), x)
        assert float(plain[0]) != 0.0
        _assert_same(fused, plain)


def test_fused_semi_hard_lists_no_triplets(monkeypatch):
    """The fused path never calls the miner (nothing is mined as indices) and, with blocks of a few
    rows, allocates nothing of the size of the triplet set."""
    monkeypatch.setattr(_blocks, "BLOCK_ELEMENTS", 512)
    x, y, _, _ = _data(96, classes=3, seed=2)
    miner = miners.SemiHardMiner(margin=2.0, negatives="all")
    listed = len(miner(x, y)[0])
    assert listed > 96 * 96  # more triplets than cells of the distance matrix
    monkeypatch.setattr(miners.SemiHardMiner, "forward", lambda *a, **k: pytest.fail("miner called"))

    leaf = x.clone().requires_grad_()
    with LargestTensor() as probe:
        TripletMarginLoss(margin=2.0)(leaf, y, miner=miner).backward()
    assert probe.largest < listed, (probe.largest, listed)
    assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("miner_distance", DISTANCES)
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("layout", ["pk", "singletons"])
def test_fused_batch_hard_equals_mining_then_loss(budget, monkeypatch, miner_distance, distance, layout):
    """loss(x, y, miner=HardMiner()) mines in the loss (one call, no index checks) and writes the
    anchors' gradient row by row when every row has a triplet: the same values and gradients as
    mining first and computing the loss of those triplets by autograd through paired distances."""
    g = torch.Generator().manual_seed(23)
    x = torch.randn(36, 6, generator=g, dtype=torch.float64)
    y = torch.arange(9).repeat_interleave(4)[torch.randperm(36, generator=g)]
    if layout == "singletons":
        y[:2] = torch.tensor([50, 51])  # two rows without a positive: no triplet, anchors not 0 … B−1
    miner = miners.HardMiner(distance=miner_distance)
    rows_seen = []
    real = hard_mod.batch_hard_rows

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        rows_seen.append(out[3])
        return out

    monkeypatch.setattr(hard_mod, "batch_hard_rows", spy)
    for soft, reduction in ((False, "mean_nonzero"), (False, "sum"), (True, "mean")):
        loss = TripletMarginLoss(margin=1.5, distance=distance, soft_margin=soft, reduction=reduction)
        fused = _value_and_grads(lambda t: loss(t, y, miner=miner), x)
        a, p, n = _blocks_off(monkeypatch, lambda: miner(x, y))

        def reference(t):
            return loss.forward_triplets(t[a], t[p], t[n])

        plain = _value_and_grads(reference, x)
        assert float(plain[0]) != 0.0
        _assert_same(fused, plain)
    assert rows_seen and all(r == (layout == "pk") for r in rows_seen)


@pytest.mark.parametrize("distance,margin", [("euclidean", 0.8), ("squared_euclidean", 2.0), ("cosine", 0.2)])
def test_fused_multi_similarity_equals_mining_then_loss(budget, monkeypatch, distance, margin):
    """loss(x, y, miner=MultiSimilarityMiner()) applies the ε-rule inside the loss's blocks and never
    calls the miner: the same values and gradients as mining the pairs first and passing them as a
    plain tuple (every (a, p, n) of a kept positive and a kept negative pair)."""
    x, y, _, _ = _data(40, seed=24)
    y[0] = 77  # an anchor without positives: no triplets
    for epsilon in (0.1, 0.5):
        miner = miners.MultiSimilarityMiner(epsilon=epsilon)
        pairs = tuple(t.clone() for t in miner(x, y))
        for loss_margin, reduction in ((margin, "mean_nonzero"), (0.5 * margin, "mean"), (2 * margin, "sum")):
            loss = TripletMarginLoss(margin=loss_margin, distance=distance, reduction=reduction)
            plain = _value_and_grads(lambda t: loss(t, y, pairs), x)
            with monkeypatch.context() as m:
                m.setattr(miners.MultiSimilarityMiner, "forward", lambda *a, **k: pytest.fail("miner called"))
                fused = _value_and_grads(lambda t: loss(t, y, miner=miner), x)
            assert float(plain[0]) != 0.0
            _assert_same(fused, plain)
    # capped miner or soft margin: not fused, mined first (same as passing its output)
    capped = miners.MultiSimilarityMiner(tuples_per_anchor=2, seed=3)
    loss = TripletMarginLoss(margin=margin, distance=distance)
    torch.testing.assert_close(
        loss(x, y, miner=capped), loss(x, y, tuple(miners.MultiSimilarityMiner(tuples_per_anchor=2, seed=3)(x, y)))
    )
    # no positive pair at all: a graph-connected zero
    leaf = x.clone().requires_grad_()
    out = loss(leaf, torch.arange(40), miner=miners.MultiSimilarityMiner())
    out.backward()
    assert float(out.detach()) == 0.0 and leaf.grad is not None


def _blocks_off(monkeypatch, fn):
    """``fn()`` with the miners' block paths disabled (the reference implementation)."""
    with monkeypatch.context() as m:
        m.setattr(hard_mod, "supported", lambda *args, **kwargs: False)
        return fn()


def test_batch_hard_rows_picks_the_farthest_positive_and_closest_negative():
    """The miner's score blocks (d² − ‖x‖², no square root) pick what the distances pick, with ties
    (equal distances) going to the lowest index, as :func:`batch_hard` on the distance matrix."""
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [-3.0, 4.0], [0.0, 1.0], [0.0, -1.0], [1.0, 0.0]])
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    for distance in ("euclidean", "squared_euclidean"):
        a, p, n = miners.HardMiner(distance=distance)(x, y)
        # anchor 0: positives 1 and 2 are both at distance 5 (tie: 1); negatives 3, 4, 5 at 1 (tie: 3)
        assert (int(a[0]), int(p[0]), int(n[0])) == (0, 1, 3)
        d = torch.cdist(x, x)
        pos, neg = masks(y, y, True)
        ea, ep, en = hard_mod.batch_hard(d, pos, neg)
        assert torch.equal(a, ea) and torch.equal(p, ep) and torch.equal(n, en)


def test_miner_argument_other_miners_and_errors():
    x, y, _, _ = _data(30, seed=4)
    loss = TripletMarginLoss(margin=0.3)
    # not fused (one negative per pair, a fallback): mined first, then the index path; batch-hard is
    # fused differently but gives the same
    for miner in (miners.SemiHardMiner(margin=0.3), miners.HardMiner(),
                  miners.SemiHardMiner(margin=0.3, negatives="all", fallback="hardest")):
        via_arg = _value_and_grads(lambda t: loss(t, y, miner=miner), x)
        separate = _value_and_grads(lambda t: loss(t, y, miner(t.detach(), y)), x)
        _assert_same(via_arg, separate)
    with pytest.raises(DataError, match="not both"):
        loss(x, y, miner(x, y), miner=miner)
    # no positive pair at all: a graph-connected zero
    leaf = x.clone().requires_grad_()
    out = loss(leaf, torch.arange(30), miner=miners.SemiHardMiner(negatives="all"))
    out.backward()
    assert float(out.detach()) == 0.0 and leaf.grad is not None


def test_trainer_passes_the_miner_to_a_fusing_loss(monkeypatch):
    from deepmetric.losses import ProxyAnchorLoss
    from deepmetric.train.loop import LossSet

    x, y, _, _ = _data(24, d=6, seed=5)
    miner = miners.SemiHardMiner(margin=0.5, negatives="all")
    triplet = TripletMarginLoss(margin=0.5)
    proxy = ProxyAnchorLoss(num_classes=4, embedding_dim=6).double()
    expected = triplet(x, y, tuple(miner(x, y))) + 0.1 * proxy(x, y)
    calls = []
    original = TripletMarginLoss.forward

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("miner"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TripletMarginLoss, "forward", spy)
    out = LossSet(["triplet_margin", "proxy_anchor"], [triplet, proxy], [1.0, 0.1])(x, y, miner)
    assert calls == [miner]
    torch.testing.assert_close(out, expected)


@requires_cc
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize("explicit", [False, True])
def test_native_triplet_terms_match_the_torch_path(
    distance: str, explicit: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32 on CPU: the triplet terms, their count and the gradient come from the C loop
    (``dm_triplet_terms``); DEEPMETRIC_NATIVE=0 selects the torch path it replaces. Both the
    batch-hard rows (one triplet per anchor row, in order) and explicit triplets with repeated
    anchors, positives and negatives (rows hit many times), D = 21 (vector and scalar tail), and
    a pair closer than the clamp (squared distance below 1e-12: zero gradient for the euclidean
    distance)."""
    from deepmetric._native import load

    assert load("rows_select") is not None
    g = torch.Generator().manual_seed(11)
    x0 = torch.randn(40, 21, generator=g)
    x0[4], x0[5] = 0.0, 1e-8  # |x_4 - x_5|^2 = 2.1e-15 < eps: the clamp zeroes this pair's gradient
    x0[8] = 0.1  # a close negative (class 2), so the triplet (4, 5, 8) is active
    y = torch.arange(40) // 4
    a = torch.randint(0, 40, (300,), generator=g)
    p = (a // 4) * 4 + torch.randint(0, 4, (300,), generator=g)
    n = torch.randint(0, 40, (300,), generator=g)
    keep = (y[n] != y[a]) & (p != a)
    a, p, n = a[keep][:48], p[keep][:48], n[keep][:48]  # few triplets (T * 32 <= B * R): the per-triplet path
    a[0], p[0], n[0] = 4, 5, 8  # the near-duplicate pair as an active triplet's positive pair

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        x = x0.clone().requires_grad_()
        loss_fn = TripletMarginLoss(margin=1.5, distance=distance)
        if explicit:
            value = loss_fn(x, y, indices=(a, p, n))
        else:
            value = loss_fn(x, y, miner=miners.HardMiner(distance=distance))
        value.backward()
        return value.detach(), x.grad

    calls: list[bool] = []
    real = triplet_mod._native_triplet_terms

    def spy(*args):  # type: ignore[no-untyped-def]
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(triplet_mod, "_native_triplet_terms", spy)
    native_value, native_grad = run()
    assert calls == [True]  # the C loop computed this loss
    monkeypatch.setenv("DEEPMETRIC_NATIVE", "0")
    torch_value, torch_grad = run()
    assert native_value > 0 and bool(native_grad.abs().sum() > 0)
    torch.testing.assert_close(native_value, torch_value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(native_grad, torch_grad, rtol=1e-4, atol=1e-6)
