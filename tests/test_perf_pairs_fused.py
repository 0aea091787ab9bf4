"""Fused pair-matrix losses (contrastive, multi-similarity, lifted structure, histogram) against
the plain-autograd formulation they replaced, on batches large enough to span several row blocks,
on every branch (labels / mined pairs / triplets / reference set, distances, reductions, the
shifted multi-similarity path, overlapping mined pairs), plus the memory bound at B = 2048."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepmetric.distances import cosine_similarity
from deepmetric.losses import ContrastiveLoss, HistogramLoss, LiftedStructureLoss, MultiSimilarityLoss
from deepmetric.losses import _pairs
from deepmetric.losses import contrastive as contrastive_mod
from deepmetric.losses import histogram as histogram_mod
from deepmetric.losses import lifted_structure as lifted_mod
from deepmetric.losses import multi_similarity as ms_mod
from deepmetric.losses._pairs import distance_matrix, masked_log1p_sum_exp, masked_logsumexp, resolve_masks
from deepmetric.losses.contrastive import contrastive_pair_terms
from deepmetric.losses.histogram import soft_histogram
from deepmetric.tuples import label_masks, pair_masks_from_indices, triplets_to_pairs
from reference.memory import LargestTensor

DT = torch.float64


# ------------------------------------------------------------------ plain-autograd references
def ref_contrastive(x, y, indices=None, r=None, ry=None, *, margin=1.0, pos_margin=0.0, distance="euclidean",
                    squared=True, reduction="mean"):
    same = r is None
    pos, neg = resolve_masks(y, None if same else ry, indices, x.shape[0], (x if same else r).shape[0])
    dist = distance_matrix(x, x if same else r, distance)
    terms = contrastive_pair_terms(dist, pos, margin=margin, pos_margin=pos_margin, squared=squared)
    keep = pos | neg
    kept = torch.where(keep, terms, torch.zeros_like(terms))
    nonzero = (kept > 0).sum() if reduction == "mean_nonzero" else keep.sum()
    return _pairs.reduce_terms(kept.sum(), keep.sum(), nonzero, reduction)


def ref_multi_similarity(x, y, indices=None, r=None, ry=None, *, alpha=2.0, beta=50.0, base=1.0):
    same = r is None
    pos, neg = resolve_masks(y, None if same else ry, indices, x.shape[0], (x if same else r).shape[0])
    sim = cosine_similarity(x, None if same else r)
    pos_term = masked_log1p_sum_exp(-alpha * (sim - base), pos) / alpha
    neg_term = masked_log1p_sum_exp(beta * (sim - base), neg) / beta
    return (pos_term + neg_term).mean()


def ref_lifted(x, y, indices=None, r=None, ry=None, *, margin=1.0, distance="euclidean"):
    same = r is None
    pos, neg = resolve_masks(y, None if same else ry, indices, x.shape[0], (x if same else r).shape[0])
    dist = distance_matrix(x, x if same else r, distance)
    logits = margin - dist
    if same:
        neg_sym = neg | neg.T
        row_lse, row_any = masked_logsumexp(logits, neg_sym, dim=1)
        col_lse, col_any = row_lse, row_any
    else:
        row_lse, row_any = masked_logsumexp(logits, neg, dim=1)
        col_lse, col_any = masked_logsumexp(logits, neg, dim=0)
    very_negative = torch.finfo(dist.dtype).min / 4
    rr = torch.where(row_any, row_lse, torch.full_like(row_lse, very_negative)).unsqueeze(1)
    cc = torch.where(col_any, col_lse, torch.full_like(col_lse, very_negative)).unsqueeze(0)
    has_negative = row_any.unsqueeze(1) | col_any.unsqueeze(0)
    terms = F.relu(torch.logaddexp(rr, cc) + dist).pow(2)
    total = torch.where(pos & has_negative, terms, torch.zeros_like(terms)).sum()
    return total / (2.0 * pos.sum().to(total.dtype))


def ref_histogram(x, y, indices=None, r=None, ry=None, *, num_nodes=101):
    same = r is None
    ref = x if same else r
    sim = cosine_similarity(x, None if same else ref)
    if indices is None:
        pos, neg = label_masks(y, None if same else ry)
    else:
        pos, neg = pair_masks_from_indices(indices, x.shape[0], ref.shape[0])
    if same:
        upper = torch.ones_like(pos).triu_(1)
        pos = (pos | pos.T) & upper
        neg = (neg | neg.T) & upper
    if not bool(pos.any()) or not bool(neg.any()):
        return (x * 0).sum()
    h_pos = soft_histogram(sim[pos], num_nodes)
    h_neg = soft_histogram(sim[neg], num_nodes)
    return (h_neg * torch.cumsum(h_pos, dim=0)).sum()


# ------------------------------------------------------------------ helpers
@pytest.fixture(autouse=True, params=["lists-dense", "lists-sparse", "lists-squared", "masks"])
def _small_blocks(monkeypatch, request):
    """Force several row blocks (and uneven ones) even on small test batches, and each path: label
    positives as index lists with dense or sparse (active entries only, contrastive) gradient
    blocks, the contrastive squared-distance path (near negatives found on d², square roots of
    those only), or as dense masks."""
    for mod in (contrastive_mod, ms_mod, histogram_mod):
        monkeypatch.setattr(mod, "_BLOCK", 97)
    for mod in (contrastive_mod, ms_mod, histogram_mod, lifted_mod):
        monkeypatch.setattr(mod, "_PAIR_LIST_FRACTION", 0.0 if request.param == "masks" else 1.0)
    monkeypatch.setattr(contrastive_mod, "SPARSE_FRACTION", 1.0 if request.param == "lists-sparse" else 0.0)
    monkeypatch.setattr(contrastive_mod, "_SPARSE_BOUND", 1.0 if request.param == "lists-squared" else 0.0)


def _data(b=37, d=5, classes=6, seed=0, dtype=DT, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(b, d, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (b,), generator=g)
    return x, y


def _mined(y, ry=None, seed=1, triplets=False, frac=0.4):
    pos, neg = label_masks(y, ry)
    g = torch.Generator().manual_seed(seed)
    pos = pos & (torch.rand(pos.shape, generator=g) < frac)
    neg = neg & (torch.rand(neg.shape, generator=g) < frac)
    a1, p = pos.nonzero(as_tuple=True)
    a2, n = neg.nonzero(as_tuple=True)
    if not triplets:
        return a1, p, a2, n
    # every anchor's first mined negative, for each mined positive pair (with duplicates)
    first_neg = {}
    for a, k in zip(a2.tolist(), n.tolist()):
        first_neg.setdefault(a, k)
    trip = [(a, q, first_neg[a]) for a, q in zip(a1.tolist(), p.tolist()) if a in first_neg]
    trip = trip + trip[:5]
    return tuple(torch.tensor(c, dtype=torch.long) for c in zip(*trip))


def _check(ours_fn, ref_fn, x, *others, rtol=1e-9, atol=1e-11):
    leaves = [x.clone().requires_grad_(True)] + [o.clone().requires_grad_(True) for o in others]
    leaves2 = [t.detach().clone().requires_grad_(True) for t in leaves]
    a = ours_fn(*leaves)
    b = ref_fn(*leaves2)
    assert a.dtype == b.dtype and a.dim() == 0
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
    ga = torch.autograd.grad(a, leaves, allow_unused=True)
    gb = torch.autograd.grad(b, leaves2, allow_unused=True)
    for u, v, t in zip(ga, gb, leaves):
        u = torch.zeros_like(t) if u is None else u
        v = torch.zeros_like(t) if v is None else v
        torch.testing.assert_close(u, v, rtol=rtol * 100, atol=atol * 100)


# ------------------------------------------------------------------ contrastive
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum"])
def test_contrastive_labels(distance, squared, reduction):
    x, y = _data()
    kw = dict(margin=0.9, pos_margin=0.2, distance=distance, squared=squared, reduction=reduction)
    loss = ContrastiveLoss(**kw)
    _check(lambda e: loss(e, y), lambda e: ref_contrastive(e, y, **kw), x)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("kind", ["pairs", "triplets", "ref", "ref_pairs"])
def test_contrastive_mined_and_ref(distance, kind):
    x, y = _data(seed=2)
    r, ry = _data(23, seed=3)
    kw = dict(margin=1.1, pos_margin=0.1, distance=distance, squared=False, reduction="mean_nonzero")
    loss = ContrastiveLoss(**kw)
    if kind in ("pairs", "triplets"):
        idx = _mined(y, triplets=kind == "triplets")
        _check(lambda e: loss(e, y, idx), lambda e: ref_contrastive(e, y, idx, **kw), x)
    elif kind == "ref":
        _check(lambda e, f: loss(e, y, ref_embeddings=f, ref_labels=ry),
               lambda e, f: ref_contrastive(e, y, None, f, ry, **kw), x, r)
    else:
        idx = _mined(y, ry)
        _check(lambda e, f: loss(e, y, idx, ref_embeddings=f, ref_labels=ry),
               lambda e, f: ref_contrastive(e, y, idx, f, ry, **kw), x, r)


def test_contrastive_overlapping_mined_pairs_and_duplicates():
    x, y = _data(12, seed=4)
    x[5] = x[3]  # a duplicate: clamped distance, zero gradient
    y[5] = y[3]
    a = torch.tensor([0, 1, 3, 3, 2])
    b = torch.tensor([4, 2, 5, 5, 7])
    idx = (a, b, a.flip(0), b.flip(0))  # one pair both positive and negative, repeats
    for reduction in ("mean", "mean_nonzero", "sum"):
        loss = ContrastiveLoss(pos_margin=0.0, reduction=reduction)
        _check(lambda e: loss(e, y, idx), lambda e: ref_contrastive(e, y, idx, reduction=reduction), x)
        _check(lambda e: loss(e, y), lambda e: ref_contrastive(e, y, reduction=reduction), x)


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("ref_set", [False, True])
def test_contrastive_squared_distance_path(squared, ref_set, monkeypatch, request):
    """Spread classes, a few near negatives, duplicate rows (a clamped positive and a clamped
    negative distance): the squared-distance path takes every one of the (small) blocks (counted;
    the bound is raised, a 16-row block's self-pairs alone are 1/9 of it), and values and gradients
    match the dense reference."""
    if request.node.callspec.params["_small_blocks"] != "lists-dense":
        pytest.skip("the bound is set here")
    monkeypatch.setattr(contrastive_mod, "_SPARSE_BOUND", 0.5)
    g = torch.Generator().manual_seed(7)
    y = torch.randint(0, 40, (150,), generator=g)
    x = 3.0 * torch.randn(40, 16, generator=g, dtype=DT)[y] + 0.3 * torch.randn(150, 16, generator=g, dtype=DT)
    x[5], y[5] = x[3], y[3]  # positive pair at distance 0
    x[9] = x[4]
    y[9] = y[4] + 1  # negative pair at distance 0 (a term, no gradient)
    x[12] = x[11] + 0.2
    y[12] = y[11] + 1  # a near negative
    calls = {"fast": 0, "fallback": 0}
    real = contrastive_mod._ContrastiveKernel.block_squared

    def spy(self, *args):
        out = real(self, *args)
        calls["fallback" if out is _pairs.FALLBACK else "fast"] += 1
        return out

    monkeypatch.setattr(contrastive_mod._ContrastiveKernel, "block_squared", spy)
    kw = dict(margin=1.0, pos_margin=0.1, squared=squared, reduction="mean_nonzero")
    loss = ContrastiveLoss(**kw)
    if ref_set:
        r, ry = x[::2].clone(), y[::2].clone()
        _check(lambda e, f: loss(e, y, ref_embeddings=f, ref_labels=ry),
               lambda e, f: ref_contrastive(e, y, None, f, ry, **kw), x, r)
    else:
        _check(lambda e: loss(e, y), lambda e: ref_contrastive(e, y, **kw), x)
    assert calls["fast"] >= 2 and calls["fallback"] == 0, calls  # several blocks, all on the fast path


def test_contrastive_class_blocks(monkeypatch, request):
    """The positive pairs' gradient in per-class (K, K) blocks (batch against itself) equals the
    reference; very uneven classes (C·K² > B²/2) use the pair list instead, also exact."""
    if request.node.callspec.params["_small_blocks"] != "lists-squared":
        pytest.skip("the fast path is forced by this fixture parameter")
    assert contrastive_mod._class_layout(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])) is not None
    uneven = torch.cat([torch.zeros(20, dtype=torch.long), torch.arange(1, 21)])
    assert contrastive_mod._class_layout(uneven) is None  # 21 classes × 20² > 40² / 2
    used = []
    real = contrastive_mod._ContrastiveKernel.extra_grad
    monkeypatch.setattr(contrastive_mod._ContrastiveKernel, "extra_grad",
                        lambda self, x: used.append(self.weights is not None) or real(self, x))
    g = torch.Generator().manual_seed(9)
    for y in (torch.randint(0, 5, (60,), generator=g), uneven):
        x = 0.4 * torch.randn(y.shape[0], 8, generator=g, dtype=DT)
        kw = dict(margin=0.8, pos_margin=0.05, squared=False, reduction="mean")
        loss = ContrastiveLoss(**kw)
        _check(lambda e: loss(e, y), lambda e: ref_contrastive(e, y, **kw), x)
    assert used == [True, False]  # class blocks for the first batch only


# ------------------------------------------------------------------ multi-similarity
@pytest.mark.parametrize("params", [(2.0, 50.0, 0.5), (2.0, 50.0, 1.0), (2.0, 120.0, -0.5), (0.5, 3.0, 0.0)])
@pytest.mark.parametrize("kind", ["labels", "pairs", "triplets", "ref", "ref_pairs"])
def test_multi_similarity(params, kind):
    alpha, beta, base = params  # (2, 120, -0.5) overflows without a shift: the shifted path
    x, y = _data(seed=5)
    r, ry = _data(23, seed=6)
    kw = dict(alpha=alpha, beta=beta, base=base)
    loss = MultiSimilarityLoss(**kw)
    if kind == "labels":
        _check(lambda e: loss(e, y), lambda e: ref_multi_similarity(e, y, **kw), x)
    elif kind in ("pairs", "triplets"):
        idx = _mined(y, triplets=kind == "triplets")
        _check(lambda e: loss(e, y, idx), lambda e: ref_multi_similarity(e, y, idx, **kw), x)
    elif kind == "ref":
        _check(lambda e, f: loss(e, y, ref_embeddings=f, ref_labels=ry),
               lambda e, f: ref_multi_similarity(e, y, None, f, ry, **kw), x, r)
    else:
        idx = _mined(y, ry)
        _check(lambda e, f: loss(e, y, idx, ref_embeddings=f, ref_labels=ry),
               lambda e, f: ref_multi_similarity(e, y, idx, f, ry, **kw), x, r)


def test_multi_similarity_overlapping_pairs_and_float32():
    x, y = _data(12, seed=7)
    a = torch.tensor([0, 1, 3, 3])
    b = torch.tensor([4, 2, 5, 5])
    idx = (a, b, a, b)  # every pair both positive and negative
    loss = MultiSimilarityLoss(base=0.5)
    _check(lambda e: loss(e, y, idx), lambda e: ref_multi_similarity(e, y, idx, base=0.5), x)
    xf, yf = _data(300, d=16, classes=40, seed=8, dtype=torch.float32)
    _check(lambda e: loss(e, yf), lambda e: ref_multi_similarity(e, yf, base=0.5), xf, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------ lifted structure
@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("kind", ["labels", "pairs", "triplets", "ref", "ref_pairs"])
def test_lifted_structure(distance, kind):
    x, y = _data(seed=9)
    r, ry = _data(23, seed=10)
    kw = dict(margin=0.8, distance=distance)
    loss = LiftedStructureLoss(**kw)
    if kind == "labels":
        _check(lambda e: loss(e, y), lambda e: ref_lifted(e, y, **kw), x)
    elif kind in ("pairs", "triplets"):
        idx = _mined(y, triplets=kind == "triplets", frac=0.1)  # some positives without negatives
        _check(lambda e: loss(e, y, idx), lambda e: ref_lifted(e, y, idx, **kw), x)
    elif kind == "ref":
        _check(lambda e, f: loss(e, y, ref_embeddings=f, ref_labels=ry),
               lambda e, f: ref_lifted(e, y, None, f, ry, **kw), x, r)
    else:
        idx = _mined(y, ry, frac=0.1)
        _check(lambda e, f: loss(e, y, idx, ref_embeddings=f, ref_labels=ry),
               lambda e, f: ref_lifted(e, y, idx, f, ry, **kw), x, r)


def test_lifted_far_apart_embeddings():
    x, y = _data(20, seed=11, scale=30.0)  # exp(α − D) underflows without the row shift
    _check(lambda e: LiftedStructureLoss()(e, y), lambda e: ref_lifted(e, y), x)


# ------------------------------------------------------------------ histogram
@pytest.mark.parametrize("kind", ["labels", "pairs", "triplets", "ref", "ref_pairs", "overlap"])
def test_histogram(kind):
    x, y = _data(seed=12)
    r, ry = _data(23, seed=13)
    loss = HistogramLoss(num_nodes=31)
    kw = dict(num_nodes=31)
    if kind == "labels":
        _check(lambda e: loss(e, y), lambda e: ref_histogram(e, y, **kw), x)
    elif kind in ("pairs", "triplets"):
        idx = _mined(y, triplets=kind == "triplets")
        _check(lambda e: loss(e, y, idx), lambda e: ref_histogram(e, y, idx, **kw), x)
    elif kind == "ref":
        _check(lambda e, f: loss(e, y, ref_embeddings=f, ref_labels=ry),
               lambda e, f: ref_histogram(e, y, None, f, ry, **kw), x, r)
    elif kind == "ref_pairs":
        idx = _mined(y, ry)
        _check(lambda e, f: loss(e, y, idx, ref_embeddings=f, ref_labels=ry),
               lambda e, f: ref_histogram(e, y, idx, f, ry, **kw), x, r)
    else:
        a1, p, a2, n = _mined(y)
        idx = (a1, p, torch.cat([a2, a1[:3]]), torch.cat([n, p[:3]]))  # 3 pairs both positive and negative
        _check(lambda e: loss(e, y, idx), lambda e: ref_histogram(e, y, idx, **kw), x)


def test_histogram_clamped_similarities_and_float32():
    x, y = _data(16, seed=14)
    x[3] = x[1] * 2.0  # cosine exactly 1 (or just above): clamped
    x[7] = -x[1]
    y[3] = y[1]
    _check(lambda e: HistogramLoss(num_nodes=11)(e, y), lambda e: ref_histogram(e, y, num_nodes=11), x)
    xf, yf = _data(300, d=16, classes=40, seed=15, dtype=torch.float32)
    _check(lambda e: HistogramLoss()(e, yf), lambda e: ref_histogram(e, yf), xf, rtol=2e-5, atol=1e-6)


# ------------------------------------------------------------------ shared helpers
def test_pair_masks_from_triplets_match_unique_pairs():
    g = torch.Generator().manual_seed(16)
    trip = tuple(torch.randint(0, 9, (40,), generator=g) for _ in range(3))
    pos, neg = pair_masks_from_indices(trip, 9, 9)
    a1, p, a2, n = triplets_to_pairs(trip)
    pos2 = torch.zeros(9, 9, dtype=torch.bool)
    neg2 = torch.zeros(9, 9, dtype=torch.bool)
    pos2[a1, p] = True
    neg2[a2, n] = True
    assert torch.equal(pos, pos2) and torch.equal(neg, neg2)


def test_no_grad_forward_and_label_pair_helpers():
    x, y = _data()
    with torch.no_grad():
        for loss, ref in [(ContrastiveLoss(), ref_contrastive), (MultiSimilarityLoss(), ref_multi_similarity),
                          (LiftedStructureLoss(), ref_lifted), (HistogramLoss(), ref_histogram)]:
            torch.testing.assert_close(loss(x, y), ref(x, y))
    assert not _pairs.has_positive_label_pair(torch.arange(5))
    assert _pairs.has_positive_label_pair(torch.tensor([3, 1, 3]))
    assert _pairs.has_positive_label_pair(torch.tensor([0, 1]), torch.tensor([2, 1]))
    assert not _pairs.has_positive_label_pair(torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert not _pairs.has_negative_label_pair(torch.tensor([4, 4]))
    assert _pairs.has_negative_label_pair(torch.tensor([4]), torch.tensor([5]))




@pytest.mark.parametrize("loss", [ContrastiveLoss(), MultiSimilarityLoss(), LiftedStructureLoss(), HistogramLoss()],
                         ids=lambda l: type(l).__name__)
def test_b2048_largest_tensor_is_one_matrix(loss, monkeypatch):
    """B = 2048: no op produces more than one B×B tensor's worth of entries."""
    for mod in (contrastive_mod, ms_mod, histogram_mod):
        monkeypatch.setattr(mod, "_BLOCK", 1 << 17)
    b, k = 2048, 4
    x = F.normalize(torch.randn(b, 32), dim=1).requires_grad_()
    y = torch.arange(b // k).repeat_interleave(k)
    with LargestTensor() as mode:
        out = loss(x, y)
        out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    assert mode.largest <= b * b


def test_zero_embedding_rows_follow_f_normalize():
    """A zero row: F.normalize clamps its norm (gradient g / eps there), as the fused normalisation."""
    x, y = _data(14, seed=17)
    x[2] = 0.0
    _check(lambda e: MultiSimilarityLoss(base=0.5)(e, y), lambda e: ref_multi_similarity(e, y, base=0.5), x)
    _check(lambda e: HistogramLoss(num_nodes=21)(e, y), lambda e: ref_histogram(e, y, num_nodes=21), x)
    kw = dict(distance="cosine", pos_margin=0.1)
    _check(lambda e: ContrastiveLoss(**kw)(e, y), lambda e: ref_contrastive(e, y, **kw), x)


@pytest.mark.parametrize("loss", [ContrastiveLoss(), MultiSimilarityLoss(), LiftedStructureLoss(), HistogramLoss()],
                         ids=lambda l: type(l).__name__)
def test_bad_mined_indices_raise(loss):
    from deepmetric.errors import DataError

    x, y = _data(8)
    e = torch.tensor([], dtype=torch.long)
    bad = [
        (torch.tensor([0]), torch.tensor([9]), e, e),  # reference index out of range
        (torch.tensor([0]), torch.tensor([1])),  # wrong arity
    ]
    if not isinstance(loss, HistogramLoss):  # (the histogram loss does not range-check; -1 wraps)
        bad.append((torch.tensor([-1]), torch.tensor([1]), e, e))  # negative anchor
    for idx in bad:
        with pytest.raises((DataError, IndexError)):
            loss(x, y, idx)


# ------------------------------------------------------------------ multi-similarity: fused mining
@pytest.mark.parametrize("base,classes,b", [(0.5, 6, 37), (1.0, 3, 40), (0.5, 40, 45)])
def test_multi_similarity_fused_mining_equals_mining_then_loss(base, classes, b):
    """loss(x, y, miner=MultiSimilarityMiner()) applies the ε-rule inside the similarity blocks: the same
    value and gradients as mining first and passing the pairs as indices (the reference formula on
    those pairs); in the "masks" variant (no positive lists) it mines first."""
    from deepmetric.miners import MultiSimilarityMiner

    x, y = _data(b=b, classes=classes, seed=classes)
    miner = MultiSimilarityMiner(epsilon=0.1)
    loss = MultiSimilarityLoss(base=base)
    mined = tuple(t.clone() for t in miner(x, y))
    assert len(mined[0]) > 0 and len(mined[2]) > 0
    _check(lambda t: loss(t, y, miner=miner), lambda t: ref_multi_similarity(t, y, mined, base=base), x)


def test_multi_similarity_fused_mining_calls_no_miner_and_falls_back(monkeypatch):
    from deepmetric.errors import DataError
    from deepmetric.miners import MultiSimilarityMiner

    x, y = _data(b=40, classes=8, seed=3)
    loss = MultiSimilarityLoss(base=0.5)
    capped = MultiSimilarityMiner(epsilon=0.1, tuples_per_anchor=2, seed=0)
    expected = loss(x, y, capped(x, y))
    torch.testing.assert_close(loss(x, y, miner=MultiSimilarityMiner(epsilon=0.1, tuples_per_anchor=2, seed=0)), expected)
    with pytest.raises(DataError, match="not both"):
        loss(x, y, capped(x, y), miner=capped)
    lonely = loss(x.clone().requires_grad_(), torch.arange(40), miner=MultiSimilarityMiner())
    assert float(lonely.detach()) == 0.0
    if ms_mod._PAIR_LIST_FRACTION > 0:  # the fused path (positive lists) never calls the miner
        monkeypatch.setattr(MultiSimilarityMiner, "forward", lambda *a, **k: pytest.fail("miner called"))
        assert torch.isfinite(loss(x, y, miner=MultiSimilarityMiner()))
