"""Miners against naive loop references, PML cross-checks, caps, reference sets and edge cases."""
from __future__ import annotations

import doctest
import importlib
from collections import Counter

import pytest
import torch

from deepmetric import miners
from deepmetric.distances import euclidean
from deepmetric.errors import ConfigError, DataError
from deepmetric.miners._common import anchor_chunks, random_cap, sample_distinct
from deepmetric.miners.distance_weighted import distance_weighted_probabilities
from deepmetric.miners.semi_hard import semi_hard_triplets
from deepmetric.tuples import label_masks
from reference import ref_miners as ref
from reference.native import requires_cc

MINER_NAMES = ["all_triplets", "hard", "semi_hard", "easy", "distance_weighted", "multi_similarity"]


def _data(seed: int, batch: int = 18, dim: int = 4, classes: int = 4, ref_size: int | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    if ref_size is None:
        return x, y, None, None
    rx = torch.randn(ref_size, dim, generator=g, dtype=torch.float64)
    ry = torch.randint(0, classes, (ref_size,), generator=g)
    return x, y, rx, ry


def _ref_args(x, y, rx, ry, metric="euclidean"):
    same = rx is None
    rx_, ry_ = (x, y) if same else (rx, ry)
    return ref.ref_distance_matrix(x, rx_, metric), y.tolist(), ry_.tolist(), same


def _triplet_set(t) -> set[tuple[int, int, int]]:
    a, p, n = t
    out = set(zip(a.tolist(), p.tolist(), n.tolist()))
    assert len(out) == len(a), "duplicate triplets"
    return out


CASES = [(0, None), (1, None), (2, 11), (3, 25)]


def test_registry_and_output_kind() -> None:
    assert set(MINER_NAMES) <= set(miners.names())
    for name in MINER_NAMES:
        cls = miners.MINERS.get(name)
        assert cls.__module__.endswith("." + name)
        assert cls.output_kind == ("pairs" if name == "multi_similarity" else "triplets")
        assert miners.describe(name)


@pytest.mark.parametrize("name", MINER_NAMES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(f"deepmetric.miners.{name}")
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0


# --------------------------------------------------------------------------------- all triplets
@pytest.mark.parametrize("seed,ref_size", CASES)
def test_all_triplets_matches_reference(seed: int, ref_size: int | None) -> None:
    x, y, rx, ry = _data(seed, ref_size=ref_size)
    _, yl, ryl, same = _ref_args(x, y, rx, ry)
    out = miners.AllTripletsMiner()(x, y, rx, ry)
    assert all(t.dtype == torch.long for t in out)
    assert _triplet_set(out) == ref.ref_all_triplets(yl, ryl, same)


@pytest.mark.parametrize("cap", [1, 3, 40])
def test_all_triplets_cap(cap: int) -> None:
    x, y, _, _ = _data(4)
    full = _triplet_set(miners.AllTripletsMiner()(x, y))
    capped = miners.AllTripletsMiner(tuples_per_anchor=cap, seed=1)(x, y)
    got = _triplet_set(capped)
    assert got <= full
    per_full = Counter(a for a, _, _ in full)
    per_got = Counter(capped[0].tolist())
    assert per_got == Counter({a: min(cap, c) for a, c in per_full.items()})


def test_all_triplets_cap_is_uniform() -> None:
    # anchor 0: 2 positives x 5 negatives = 10 candidates; cap 1 and 3 take the drawing path
    # (10 > 2 * cap), cap 5 the enumerating one (10 <= 2 * cap).
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    x = torch.zeros(8, 2)
    for cap in (1, 3, 5):
        miner = miners.AllTripletsMiner(tuples_per_anchor=cap, seed=0)
        counts: Counter = Counter()
        rounds = 600
        for _ in range(rounds):
            a, p, n = miner(x, y)
            sel = a == 0
            counts.update(zip(p[sel].tolist(), n[sel].tolist()))
        assert len(counts) == 10
        expected = rounds * cap / 10
        assert all(abs(c - expected) < 0.35 * expected for c in counts.values()), counts


def test_sample_distinct_large_groups() -> None:
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([0, 1, 5, 1000, 10**9])
    owner, local = sample_distinct(counts, 4, g)
    assert Counter(owner.tolist()) == Counter({1: 1, 2: 4, 3: 4, 4: 4})
    for grp in (2, 3, 4):
        vals = local[owner == grp]
        assert len(set(vals.tolist())) == 4 and int(vals.min()) >= 0 and int(vals.max()) < int(counts[grp])


def test_random_cap_keeps_order_and_bound() -> None:
    groups = torch.tensor([3, 3, 3, 1, 1, 7, 3, 1])
    keep = random_cap(groups, 2, torch.Generator().manual_seed(0))
    assert torch.equal(keep, keep.sort().values)
    assert Counter(groups[keep].tolist()) == Counter({3: 2, 1: 2, 7: 1})


# --------------------------------------------------------------------------------- hard
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("seed,ref_size", CASES)
def test_hard_matches_reference(seed: int, ref_size: int | None, metric: str) -> None:
    x, y, rx, ry = _data(seed, ref_size=ref_size)
    d, yl, ryl, same = _ref_args(x, y, rx, ry, metric)
    out = miners.HardMiner(distance=metric)(x, y, rx, ry)
    assert _triplet_set(out) == ref.ref_hard(d, yl, ryl, same)


@requires_cc
@pytest.mark.parametrize("ref_size", [None, 70])
@pytest.mark.parametrize("metric", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("data", ["continuous", "integer"])
def test_hard_native_kernel_matches_reference_and_torch_path(
    ref_size: int | None, metric: str, data: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """float32 input takes the C row scan (deepmetric/_native/rows_select.c); 90 rows against 90 / 70
    columns exercise its 16-column vector loop and the tail; a singleton class has no positive.
    Continuous data (no ties): the reference's triplets. Integer coordinates (thousands of equal
    distances; the block's scores, ``‖y‖² − 2·x·y`` with ``‖y‖²`` from a norm, are equal only up
    to rounding): the torch path's triplets (DEEPMETRIC_NATIVE=0), which reads the same block values,
    so the first-of-ties rule (lowest column) is compared on real ties."""
    from deepmetric._native import load

    assert load("rows_select") is not None  # a C compiler is here (requires_cc): the kernel is what is tested
    g = torch.Generator().manual_seed(5)

    def points(n: int) -> torch.Tensor:
        if data == "continuous":
            return torch.randn(n, 3, generator=g)
        return torch.randint(-2, 3, (n, 3), generator=g).float() + (0.5 if metric == "cosine" else 0.0)

    x = points(90)
    rx = None if ref_size is None else points(ref_size)
    y = torch.randint(0, 6, (90,), generator=g)
    y[7] = 99  # a singleton class: no positive (and none in the reference set either)
    ry = None if ref_size is None else torch.randint(0, 6, (ref_size,), generator=g)
    native = miners.HardMiner(distance=metric)(x, y, rx, ry)
    assert 7 not in native[0].tolist() and len(native[0]) == 89
    if data == "continuous":
        d, yl, ryl, same = _ref_args(x.double(), y, None if rx is None else rx.double(), ry, metric)
        assert _triplet_set(native) == ref.ref_hard(d, yl, ryl, same)
    monkeypatch.setenv("DEEPMETRIC_NATIVE", "0")
    assert _triplet_set(miners.HardMiner(distance=metric)(x, y, rx, ry)) == _triplet_set(native)
    # one class only: no negatives anywhere, no triplets (both paths)
    for env in ("0", "1"):
        monkeypatch.setenv("DEEPMETRIC_NATIVE", env)
        a, _, _ = miners.HardMiner(distance=metric)(x, torch.zeros(90, dtype=torch.long))
        assert a.numel() == 0


# --------------------------------------------------------------------------------- semi-hard
@pytest.mark.parametrize("negatives", ["all", "hardest"])
@pytest.mark.parametrize("fallback", [None, "hardest", "easiest"])
@pytest.mark.parametrize("seed,ref_size", CASES)
def test_semi_hard_matches_reference(seed: int, ref_size: int | None, negatives: str, fallback: str | None) -> None:
    x, y, rx, ry = _data(seed, ref_size=ref_size)
    for metric, margin in (("squared_euclidean", 2.0), ("euclidean", 0.8), ("cosine", 0.2)):
        d, yl, ryl, same = _ref_args(x, y, rx, ry, metric)
        miner = miners.SemiHardMiner(margin=margin, distance=metric, negatives=negatives, fallback=fallback)
        expected = ref.ref_semi_hard(d, yl, ryl, same, margin, negatives, fallback)
        assert len(expected) > 0
        assert _triplet_set(miner(x, y, rx, ry)) == expected
    assert miners.SemiHardMiner().distance == "squared_euclidean"


def test_semi_hard_random_picks_one_band_negative_per_pair() -> None:
    x, y, _, _ = _data(5)
    d, yl, _, _ = _ref_args(x, y, None, None)
    band = ref.ref_semi_hard(d, yl, yl, True, 0.8, "all")
    pairs_with_band = {(a, p) for a, p, _ in band}
    seen: Counter = Counter()
    miner = miners.SemiHardMiner(margin=0.8, distance="euclidean", negatives="random", seed=3)
    for _ in range(200):
        got = _triplet_set(miner(x, y))
        assert got <= band
        assert {(a, p) for a, p, _ in got} == pairs_with_band  # exactly one per pair
        seen.update(got)
    assert set(seen) == band  # every semi-hard negative gets drawn eventually


def test_semi_hard_chunking_is_exact() -> None:
    x, y, _, _ = _data(6, batch=30, classes=3)
    dist = euclidean(x)
    pos, neg = label_masks(y)
    for negatives in ("all", "hardest"):
        whole = _triplet_set(semi_hard_triplets(dist, pos, neg, 0.8, negatives))
        tiny = _triplet_set(semi_hard_triplets(dist, pos, neg, 0.8, negatives, budget=1))  # one anchor a chunk
        mid = _triplet_set(semi_hard_triplets(dist, pos, neg, 0.8, negatives, budget=5 * 30))
        assert whole == tiny == mid and len(whole) > 0


def test_anchor_chunks_never_split_an_anchor() -> None:
    anchors = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 4, 4])
    ranges = anchor_chunks(anchors, row_cost=10, budget=30)  # 3 rows per chunk
    assert ranges[0][0] == 0 and ranges[-1][1] == len(anchors)
    for (s, e), (s2, _) in zip(ranges, ranges[1:]):
        assert e == s2 and anchors[e - 1] != anchors[e]
    assert all(e - s <= 3 or len(set(anchors[s:e].tolist())) == 1 for s, e in ranges)


@pytest.mark.parametrize("cap", [1, 2])
def test_semi_hard_cap(cap: int) -> None:
    x, y, _, _ = _data(7, batch=24)
    full = _triplet_set(miners.SemiHardMiner(margin=0.8, distance="euclidean", negatives="all")(x, y))
    out = miners.SemiHardMiner(margin=0.8, distance="euclidean", negatives="all", tuples_per_anchor=cap, seed=0)(x, y)
    got = _triplet_set(out)
    assert got <= full
    per_full = Counter(a for a, _, _ in full)
    assert Counter(out[0].tolist()) == Counter({a: min(cap, c) for a, c in per_full.items()})


# --------------------------------------------------------------------------------- easy
@pytest.mark.parametrize("positives", ["easiest", "all"])
@pytest.mark.parametrize("negatives", ["all", "hardest"])
@pytest.mark.parametrize("seed,ref_size", CASES)
def test_easy_matches_reference(seed: int, ref_size: int | None, positives: str, negatives: str) -> None:
    x, y, rx, ry = _data(seed, ref_size=ref_size)
    d, yl, ryl, same = _ref_args(x, y, rx, ry)
    out = miners.EasyMiner(margin=0.5, distance="euclidean", positives=positives, negatives=negatives)(x, y, rx, ry)
    expected = ref.ref_easy(d, yl, ryl, same, 0.5, positives, negatives)
    assert len(expected) > 0
    assert _triplet_set(out) == expected


def test_easy_random_and_cap() -> None:
    x, y, _, _ = _data(8)
    d, yl, _, _ = _ref_args(x, y, None, None)
    allowed = ref.ref_easy(d, yl, yl, True, 0.5, "all", "all")
    out = miners.EasyMiner(margin=0.5, distance="euclidean", positives="all", negatives="random", tuples_per_anchor=2, seed=0)(x, y)
    got = _triplet_set(out)
    assert got <= allowed and len(got) > 0
    assert max(Counter(out[0].tolist()).values()) <= 2


# --------------------------------------------------------------------------------- multi-similarity
@pytest.mark.parametrize("seed,ref_size", CASES)
def test_multi_similarity_matches_reference(seed: int, ref_size: int | None) -> None:
    x, y, rx, ry = _data(seed, ref_size=ref_size)
    same = rx is None
    a1, p, a2, n = miners.MultiSimilarityMiner(epsilon=0.1)(x, y, rx, ry)
    exp_pos, exp_neg = ref.ref_multi_similarity(
        x, y.tolist(), x if same else rx, (y if same else ry).tolist(), same, 0.1
    )
    assert set(zip(a1.tolist(), p.tolist())) == exp_pos and len(a1) == len(exp_pos)
    assert set(zip(a2.tolist(), n.tolist())) == exp_neg and len(a2) == len(exp_neg)
    assert len(exp_pos) > 0 and len(exp_neg) > 0


def test_multi_similarity_cap() -> None:
    x, y, _, _ = _data(9, batch=24, classes=2)
    a1, p, a2, n = miners.MultiSimilarityMiner(epsilon=0.5)(x, y)
    c1, cp, c2, cn = miners.MultiSimilarityMiner(epsilon=0.5, tuples_per_anchor=3, seed=0)(x, y)
    assert set(zip(c1.tolist(), cp.tolist())) <= set(zip(a1.tolist(), p.tolist()))
    assert set(zip(c2.tolist(), cn.tolist())) <= set(zip(a2.tolist(), n.tolist()))
    assert Counter(c1.tolist()) == Counter({a: min(3, c) for a, c in Counter(a1.tolist()).items()})
    assert Counter(c2.tolist()) == Counter({a: min(3, c) for a, c in Counter(a2.tolist()).items()})


# --------------------------------------------------------------------------------- distance weighted
def test_distance_weighted_probabilities_match_reference() -> None:
    x, y, _, _ = _data(10, batch=16, dim=6)
    xn = torch.nn.functional.normalize(x, dim=1)
    pos, neg = label_masks(y)
    probs = distance_weighted_probabilities(euclidean(xn), neg, 6, 0.5, 1.4)
    expected = ref.ref_distance_weighted_probabilities(x, y.tolist(), 0.5, 1.4)
    for a, row in enumerate(expected):
        want = torch.zeros(16, dtype=torch.float64)
        for n, w in row.items():
            want[n] = w
        torch.testing.assert_close(probs[a], want, rtol=1e-9, atol=1e-12)


def test_distance_weighted_fallback_is_uniform_over_negatives() -> None:
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.01, 0.0], [-1.0, 0.0, 0.0], [-1.0, 0.0, 0.01]])
    y = torch.tensor([0, 0, 1, 1])  # every negative at distance ~2 > 1.4
    probs = distance_weighted_probabilities(euclidean(torch.nn.functional.normalize(x)), label_masks(y)[1], 3)
    torch.testing.assert_close(probs[0], torch.tensor([0.0, 0.0, 0.5, 0.5]))


def test_distance_weighted_sampling_follows_probabilities() -> None:
    x, y, _, _ = _data(11, batch=12, dim=5, classes=3)
    miner = miners.DistanceWeightedMiner(seed=0)
    expected = ref.ref_distance_weighted_probabilities(x, y.tolist())
    counts = [Counter() for _ in range(12)]
    for _ in range(400):
        a, p, n = miner(x, y)
        assert bool((y[a] == y[p]).all()) and bool((y[a] != y[n]).all()) and bool((a != p).all())
        for i, j in zip(a.tolist(), n.tolist()):
            counts[i][j] += 1
    for anchor, row in enumerate(expected):
        total = sum(counts[anchor].values())
        if total == 0:
            continue
        assert set(counts[anchor]) <= set(row)
        tv = 0.5 * sum(abs(counts[anchor][j] / total - pj) for j, pj in row.items())
        assert tv < 0.08, (anchor, tv)


def test_distance_weighted_one_negative_per_positive_pair_and_cap() -> None:
    x, y, _, _ = _data(12, batch=20)
    pos, _ = label_masks(y)
    a, p, n = miners.DistanceWeightedMiner(seed=0)(x, y)
    assert set(zip(a.tolist(), p.tolist())) == set(map(tuple, pos.nonzero().tolist())) and len(a) == int(pos.sum())
    a, p, n = miners.DistanceWeightedMiner(tuples_per_anchor=1, seed=0)(x, y)
    assert Counter(a.tolist()) == Counter({i: 1 for i in range(20) if pos[i].any()})


# --------------------------------------------------------------------------------- shared behaviour
def _build(name: str, **kwargs):
    if name in ("semi_hard", "easy"):
        kwargs.setdefault("margin", 0.8)
    return miners.build(name, **kwargs)


@pytest.mark.parametrize("name", MINER_NAMES)
def test_no_self_pairs_and_labels_respected(name: str) -> None:
    x, y, _, _ = _data(13)
    out = _build(name)(x, y)
    if len(out) == 3:
        a, p, n = out
        assert len(a) > 0
        assert bool((a != p).all()) and bool((y[a] == y[p]).all()) and bool((y[a] != y[n]).all())
    else:
        a1, p, a2, n = out
        assert bool((a1 != p).all()) and bool((y[a1] == y[p]).all()) and bool((y[a2] != y[n]).all())


@pytest.mark.parametrize("name", MINER_NAMES)
def test_reference_set_has_no_self_exclusion(name: str) -> None:
    # the reference set is a copy of the batch: element i of the batch may pair with ref element i
    x = torch.tensor([[0.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    out = _build(name, **({"margin": 10.0} if name == "semi_hard" else {}))(x, y, x.clone(), y.clone())
    a, p = out[0], out[1]
    assert len(a) > 0 and bool((a == p).all())
    assert len(_build(name)(x, y)[0]) == 0  # as its own reference set: no positive pair at all


@pytest.mark.parametrize("name", MINER_NAMES)
@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [5, 5, 5, 5]])
def test_empty_output(name: str, labels: list[int]) -> None:
    out = _build(name)(torch.randn(4, 3), torch.tensor(labels))
    assert all(t.dtype == torch.long and t.numel() == 0 for t in out)


@pytest.mark.parametrize("name", ["all_triplets", "semi_hard", "easy", "distance_weighted", "multi_similarity"])
def test_seeded_randomness_is_reproducible(name: str) -> None:
    x, y, _, _ = _data(14, batch=24)
    kwargs = {"tuples_per_anchor": 2, "seed": 5}
    if name in ("semi_hard", "easy"):
        kwargs.update(negatives="random")
    first = [_build(name, **kwargs)(x, y) for _ in range(2)]
    assert all(torch.equal(u, v) for u, v in zip(*first))
    m = _build(name, **kwargs)
    calls = [m(x, y), m(x, y)]  # the generator advances between calls
    assert all(torch.equal(u, v) for u, v in zip(first[0], calls[0]))


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        miners.SemiHardMiner(negatives="semi")
    with pytest.raises(ConfigError):
        miners.SemiHardMiner(fallback="random")
    with pytest.raises(ConfigError):
        miners.EasyMiner(positives="hardest")
    with pytest.raises(ConfigError):
        miners.AllTripletsMiner(tuples_per_anchor=0)
    with pytest.raises(ConfigError):
        miners.DistanceWeightedMiner(cutoff=1.5, nonzero_loss_cutoff=1.4)
    with pytest.raises(ConfigError):
        miners.build("hard", margin=0.1)
    with pytest.raises(DataError):
        miners.HardMiner()(torch.randn(4, 3), torch.tensor([0, 1]))


def test_float32_and_no_grad() -> None:
    x = torch.randn(16, 8, requires_grad=True)
    y = torch.arange(16) // 4
    for name in MINER_NAMES:
        out = _build(name)(x, y)
        assert all(not t.requires_grad for t in out)


# --------------------------------------------------------------------------------- PML cross-checks
# Mapping: PML distances normalise embeddings by default; LpDistance(normalize_embeddings=False) is
# our "euclidean" and LpDistance(normalize_embeddings=False, power=2) our "squared_euclidean". BatchHardMiner == HardMiner; TripletMarginMiner(margin=m, type_of_triplets=
# "semihard") == SemiHardMiner(margin=m, negatives="all") (PML uses d_ap < d_an <= d_ap + m: the
# boundary has probability 0 on random data); TripletMarginMiner(type_of_triplets="easy") ==
# EasyMiner(positives="all", negatives="all"); TripletMarginMiner(margin=inf, "all") ==
# AllTripletsMiner; MultiSimilarityMiner(epsilon) == MultiSimilarityMiner(epsilon) (both cosine).
def _pml():
    return pytest.importorskip("pytorch_metric_learning")


@pytest.mark.parametrize("seed,ref_size", CASES)
def test_pml_cross_check(seed: int, ref_size: int | None) -> None:
    _pml()
    from pytorch_metric_learning import distances as pd
    from pytorch_metric_learning import miners as pm

    x, y, rx, ry = _data(seed, ref_size=ref_size)
    args = (x, y) if rx is None else (x, y, rx, ry)
    lp = pd.LpDistance(normalize_embeddings=False)
    lp2 = pd.LpDistance(normalize_embeddings=False, power=2)
    cases = [
        (miners.HardMiner(), pm.BatchHardMiner(distance=lp)),
        (miners.SemiHardMiner(margin=2.0, negatives="all"), pm.TripletMarginMiner(2.0, "semihard", distance=lp2)),
        (
            miners.SemiHardMiner(margin=0.8, distance="euclidean", negatives="all"),
            pm.TripletMarginMiner(0.8, "semihard", distance=lp),
        ),
        (miners.EasyMiner(margin=3.0, positives="all"), pm.TripletMarginMiner(3.0, "easy", distance=lp2)),
        (
            miners.EasyMiner(margin=0.5, distance="euclidean", positives="all"),
            pm.TripletMarginMiner(0.5, "easy", distance=lp),
        ),
        (miners.AllTripletsMiner(), pm.TripletMarginMiner(float("inf"), "all", distance=lp)),
    ]
    for ours, theirs in cases:
        got = _triplet_set(ours(*args))
        want = set(zip(*(t.tolist() for t in theirs(*args))))
        assert got == want and len(got) > 0, type(ours).__name__
    a1, p, a2, n = miners.MultiSimilarityMiner(0.1)(*args)
    b1, q, b2, m = pm.MultiSimilarityMiner(0.1)(*args)
    assert set(zip(a1.tolist(), p.tolist())) == set(zip(b1.tolist(), q.tolist()))
    assert set(zip(a2.tolist(), n.tolist())) == set(zip(b2.tolist(), m.tolist()))


def test_pml_distance_weighted_roughly_agrees() -> None:
    _pml()
    from pytorch_metric_learning import miners as pm

    x, y, _, _ = _data(15, batch=32, dim=8, classes=4)
    d = euclidean(torch.nn.functional.normalize(x, dim=1))
    ours, theirs = [], []
    miner = miners.DistanceWeightedMiner(seed=0)
    torch.manual_seed(0)
    for _ in range(50):
        a, _, n = miner(x, y)
        ours.append(d[a, n])
        a, _, n = pm.DistanceWeightedMiner()(x, y)
        theirs.append(d[a, n])
    ours_t, theirs_t = torch.cat(ours), torch.cat(theirs)
    assert abs(float(ours_t.mean()) - float(theirs_t.mean())) < 0.03
    # 1/q(d) favours the negatives closer than the bulk near sqrt(2) that uniform sampling picks
    uniform = d[label_masks(y)[1]]
    assert float(ours_t.mean()) < float(uniform.mean()) - 0.2
