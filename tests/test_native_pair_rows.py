"""The native pair-matrix kernels (``deepmetric/_native/pair_rows.c``) of contrastive, SupCon, ranked
list and multi-similarity: values and gradients against the naive loop references (float64) and
against the torch paths they replace (``DEEPMETRIC_NATIVE=0``), on batches whose size is not a multiple of the vector width,
with every branch of the kernels taken (sparse / dense contrastive backward, fixed / per-row
exponent shifts, rows without positives or negatives, zero embeddings, labels beyond int32)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference.native import requires_cc
from reference.ref_losses_core import contrastive as ref_contrastive
from reference.ref_losses_core import multi_similarity as ref_multi_similarity
from reference.ref_losses_rank import ref_ranked_list, ref_sup_con

import deepmetric.losses._native_rows as native_rows
from deepmetric._native import load
from deepmetric.losses import ContrastiveLoss, MultiSimilarityLoss, RankedListLoss, SupConLoss
from deepmetric.losses import contrastive as contrastive_module
from deepmetric.losses import multi_similarity as multi_similarity_module
from deepmetric.losses import ranked_list as ranked_module
from deepmetric.losses import sup_con as sup_con_module

pytestmark = requires_cc


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the batches that took the native path (``pair_rows_lib`` returned the library)."""
    calls = {"native": 0}
    real = native_rows.pair_rows_lib

    def spy(x):
        lib = real(x)
        calls["native"] += lib is not None
        return lib

    for module in (contrastive_module, ranked_module, sup_con_module, multi_similarity_module):
        monkeypatch.setattr(module, "pair_rows_lib", spy)
    assert load("pair_rows") is not None  # a C compiler is here (requires_cc): the kernel is what is tested
    return calls


@pytest.fixture
def generic_path():
    """``dm_force_generic``: the portable paths (SupCon's exponentials, the upper-mode finalize) on
    every CPU."""
    lib = load("pair_rows")
    lib.dm_force_generic(1)
    yield lib
    lib.dm_force_generic(0)


def _value_grad(fn, x):
    e = x.detach().clone().requires_grad_(True)
    value = fn(e)
    value.backward()
    return value.detach(), e.grad


def _batch(b: int, k: int, d: int = 8, scale: float = 1.0, seed: int = 0, normalize: bool = False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=gen)
    if normalize:
        x = F.normalize(x, dim=1)
    labels = torch.arange(b) // k
    return x * scale, labels[torch.randperm(b, generator=gen)]


def _check(loss, ref, x, labels, native_calls, rtol=1e-4, atol=1e-6):
    before = native_calls["native"]
    value, grad = _value_grad(lambda e: loss(e, labels), x)
    assert native_calls["native"] == before + 1
    ref_value, ref_grad = _value_grad(lambda e: ref(e, labels), x.double())
    torch.testing.assert_close(value.double(), ref_value, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------- contrastive
@pytest.mark.parametrize("b", [13, 37, 70])
@pytest.mark.parametrize(
    "params",
    [
        dict(margin=1.0, squared=False, reduction="mean_nonzero"),
        dict(margin=1.5, pos_margin=0.2, squared=True, reduction="mean"),
        dict(margin=2.0, distance="squared_euclidean", reduction="sum"),
    ],
)
@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_contrastive_native_matches_reference(b, params, scale, native_calls):
    x, labels = _batch(b, 3, scale=scale, seed=b)
    loss = ContrastiveLoss(**params)
    metric = params.get("distance", "euclidean")
    ref_params = {k: v for k, v in params.items() if k != "distance"}
    _check(loss, lambda e, y: ref_contrastive(e, y, metric=metric, **ref_params), x, labels, native_calls)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("spread", ["sparse", "dense"])
def test_contrastive_native_backward_paths_match_torch_path(spread, portable, native_calls, monkeypatch, request):
    """Few pairs with a gradient (pairs of a class, negatives beyond the margin): the pair-list
    backward; many (everything within the margin): the mirrored matrix (8 x 8 AVX2 blocks, or the
    portable 4 x 4 ones) and one GEMM. 61 rows: tails past the last multiple of 8 and of 4."""
    if portable:
        request.getfixturevalue("generic_path")
    _contrastive_backward_case(spread, native_calls, monkeypatch)


def _contrastive_backward_case(spread, native_calls, monkeypatch):
    x, labels = _batch(61, 2, d=32, normalize=True, seed=5)
    if spread == "dense":
        x = x * 0.2
    loss = ContrastiveLoss(margin=1.0, squared=False, reduction="mean_nonzero")
    ref = lambda e: ref_contrastive(e, labels, margin=1.0, squared=False, reduction="mean_nonzero")  # noqa: E731
    _native_matches_torch_and_reference(loss, ref, x, labels, native_calls, monkeypatch, atol=1e-7)


def _native_matches_torch_and_reference(loss, ref, x, labels, native_calls, monkeypatch, atol):
    """``loss`` on the native path (taken once), then on the torch path (``DEEPMETRIC_NATIVE=0``) and
    ``ref`` in float64: equal values and gradients."""
    value, grad = _value_grad(lambda e: loss(e, labels), x)
    assert native_calls["native"] == 1
    monkeypatch.setenv("DEEPMETRIC_NATIVE", "0")
    torch_value, torch_grad = _value_grad(lambda e: loss(e, labels), x)
    torch.testing.assert_close(value, torch_value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, torch_grad, rtol=1e-4, atol=atol)
    ref_value, ref_grad = _value_grad(ref, x.double())
    torch.testing.assert_close(value.double(), ref_value, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("spread", ["sparse", "dense"])
def test_contrastive_native_default_positives_from_class_sums(spread, portable, native_calls, monkeypatch, request):
    """The defaults (euclidean, squared, pos_margin 0): every positive pair's c_ij is 2, so the pair-list
    backward takes the positives from class sums (``pos_sum``) and lists only the negatives within
    the margin and the positives closer than 1e-6 (``raw < 1e-12``: no gradient, listed to cancel
    their class-sum share). Against the torch path and the float64 reference, with an exact and a
    near duplicate inside a class (their corrections are below float32 resolution: this checks they
    do no harm), and 16 samples per class (c32-like) where the list would have held the positives."""
    if portable:
        request.getfixturevalue("generic_path")
    x, labels = _batch(96, 16, d=32, normalize=True, seed=7)
    first, second, third = (torch.nonzero(labels == labels[0]).flatten()[:3]).tolist()
    x[second] = x[first]  # an exact duplicate
    x[third] = x[first] + 1e-7  # a near duplicate (raw < 1e-12)
    if spread == "dense":
        x = x * 0.2
    ref = lambda e: ref_contrastive(e, labels, margin=1.0)  # noqa: E731
    _native_matches_torch_and_reference(ContrastiveLoss(), ref, x, labels, native_calls, monkeypatch, atol=1e-6)


def test_contrastive_native_without_positives_is_zero(native_calls):
    x, _ = _batch(9, 1)
    value, grad = _value_grad(lambda e: ContrastiveLoss()(e, torch.arange(9)), x)
    assert float(value) == 0.0 and torch.count_nonzero(grad) == 0


# ---------------------------------------------------------------------------------------- SupCon
@pytest.mark.parametrize("b", [5, 8, 13, 37, 70])  # 5: fewer columns than a vector; 8, 13, ...: tails
@pytest.mark.parametrize("temperature", [0.1, 0.5, 0.02])  # 0.02: per-row shifts (dm_supcon_rows)
def test_sup_con_native_matches_reference(b, temperature, native_calls):
    x, labels = _batch(b, 3, seed=b)
    _check(SupConLoss(temperature), lambda e, y: ref_sup_con(e, y, temperature=temperature), x, labels,
           native_calls, rtol=2e-4)


@pytest.mark.parametrize("b", [6, 16, 37, 70])
def test_sup_con_native_portable_path_matches_reference(b, generic_path, native_calls):
    """The portable paths (CPUs without AVX2 and FMA) against the reference; on a CPU with them the
    same kind of batches take the AVX2 paths in the test above."""
    x, labels = _batch(b, 4, seed=b + 1)
    _check(SupConLoss(0.1), lambda e, y: ref_sup_con(e, y, temperature=0.1), x, labels, native_calls, rtol=2e-4)


def test_int32_labels_keep_the_classes():
    """int64 labels (beyond int32's range too) become dense int32 ids in C: equal ids exactly where the
    labels are equal."""
    gen = torch.Generator().manual_seed(7)
    labels = torch.randint(-3, 4, (300,), generator=gen) * (2**40) + torch.randint(0, 5, (300,), generator=gen)
    ids = native_rows.int32_labels(labels)
    assert ids.dtype == torch.int32 and ids.is_contiguous()
    assert torch.equal(ids.unsqueeze(0) == ids.unsqueeze(1), labels.unsqueeze(0) == labels.unsqueeze(1))
    assert int(ids.min()) == 0 and int(ids.max()) == len(torch.unique(labels)) - 1
    strided = labels[::2]  # not contiguous
    assert torch.equal(native_rows.int32_labels(strided).unsqueeze(0) == native_rows.int32_labels(strided).unsqueeze(1),
                       strided.unsqueeze(0) == strided.unsqueeze(1))


def test_sup_con_native_rows_without_positives_and_zero_embedding(native_calls, monkeypatch):
    x, labels = _batch(21, 3, seed=3)
    labels[0] = 99  # a class of one: no positives, not an anchor
    _check(SupConLoss(0.1), lambda e, y: ref_sup_con(e, y, temperature=0.1), x, labels, native_calls)
    x[5] = 0.0  # a zero embedding (its similarities are 0; the reference's normalisation divides by 0)
    value, grad = _value_grad(lambda e: SupConLoss(0.1)(e, labels), x)
    monkeypatch.setenv("DEEPMETRIC_NATIVE", "0")
    torch_value, torch_grad = _value_grad(lambda e: SupConLoss(0.1)(e, labels), x)
    torch.testing.assert_close(value, torch_value)
    torch.testing.assert_close(grad, torch_grad, rtol=1e-4, atol=1e-6)


def test_sup_con_native_single_class_and_no_positive(native_calls):
    x, _ = _batch(10, 1)
    _check(SupConLoss(0.1), lambda e, y: ref_sup_con(e, y, temperature=0.1), x, torch.zeros(10, dtype=torch.long),
           native_calls)
    value, grad = _value_grad(lambda e: SupConLoss(0.1)(e, torch.arange(10)), x)
    assert float(value) == 0.0 and torch.count_nonzero(grad) == 0


# ----------------------------------------------------------------------------------- ranked list
@pytest.mark.parametrize("b", [13, 37, 70])
@pytest.mark.parametrize("temperature", [10.0, 0.0, 100.0])  # 100: per-row shifts (T α > 60)
def test_ranked_list_native_matches_reference(b, temperature, native_calls):
    x, labels = _batch(b, 3, d=4, seed=b)  # d = 4: many negatives within α
    _check(RankedListLoss(temperature=temperature), lambda e, y: ref_ranked_list(e, y, temperature=temperature),
           x, labels, native_calls, rtol=2e-4, atol=1e-6)


def test_ranked_list_native_params_and_zero_embedding_fallback(native_calls, monkeypatch):
    x, labels = _batch(30, 4, d=4, seed=7)
    params = dict(alpha=1.1, margin=0.5, temperature=5.0, negative_weight=0.7)
    _check(RankedListLoss(**params), lambda e, y: ref_ranked_list(e, y, **params), x, labels, native_calls)
    x[3] = 0.0  # not every row a unit vector: the masked torch kernel (d² = |x̂_i|² + |x̂_j|² − 2S)
    value, grad = _value_grad(lambda e: RankedListLoss(**params)(e, labels), x)
    monkeypatch.setenv("DEEPMETRIC_NATIVE", "0")
    torch_value, torch_grad = _value_grad(lambda e: RankedListLoss(**params)(e, labels), x)
    torch.testing.assert_close(value, torch_value)
    torch.testing.assert_close(grad, torch_grad, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ multi-similarity
@pytest.mark.parametrize("b", [13, 37, 70])
@pytest.mark.parametrize("params", [dict(alpha=2.0, beta=50.0, base=0.5), dict(alpha=2.0, beta=40.0, base=1.0),
                                    dict(alpha=10.0, beta=2.0, base=0.0)])
def test_multi_similarity_native_matches_reference(b, params, native_calls):
    x, labels = _batch(b, 3, d=4, seed=b)  # d = 4: similarities spread over [-1, 1]
    _check(MultiSimilarityLoss(**params), lambda e, y: ref_multi_similarity(e, y, **params), x, labels,
           native_calls, rtol=2e-4)


def test_multi_similarity_native_edge_cases(native_calls, monkeypatch):
    x, _ = _batch(12, 1, d=4)
    value, grad = _value_grad(lambda e: MultiSimilarityLoss()(e, torch.arange(12)), x)
    assert float(value) == 0.0 and torch.count_nonzero(grad) == 0  # no positive pair
    labels = torch.zeros(12, dtype=torch.long)  # one class: no negatives
    _check(MultiSimilarityLoss(), lambda e, y: ref_multi_similarity(e, y), x, labels, native_calls)
    before = native_calls["native"]
    MultiSimilarityLoss(beta=81.0)(x, labels)  # e^{βS} could overflow float32 sums: the torch path
    assert native_calls["native"] == before


# ----------------------------------------------------------------------------------- all four
LOSSES = [
    lambda: ContrastiveLoss(margin=1.0, squared=False, reduction="mean_nonzero"),
    lambda: SupConLoss(0.1),
    lambda: RankedListLoss(),
    lambda: MultiSimilarityLoss(base=0.5),
]


@pytest.mark.parametrize("make", LOSSES)
def test_no_positive_pair_gives_zero_as_the_torch_path(make, native_calls, monkeypatch):
    x, _ = _batch(11, 1, d=4)
    labels = torch.arange(11)
    value, grad = _value_grad(lambda e: make()(e, labels), x)
    assert native_calls["native"] == 1
    assert float(value) == 0.0 and torch.count_nonzero(grad) == 0
    monkeypatch.setenv("DEEPMETRIC_NATIVE", "0")
    assert float(make()(x, labels)) == 0.0


@pytest.mark.parametrize("make", LOSSES)
def test_labels_beyond_int32_and_no_grad(make, native_calls):
    x, labels = _batch(40, 4, seed=11)
    loss = make()
    value, grad = _value_grad(lambda e: loss(e, labels), x)
    big = labels * (2**40) - 7  # the same classes, ids beyond int32: dense ids from torch.unique
    value_big, grad_big = _value_grad(lambda e: loss(e, big), x)
    torch.testing.assert_close(value_big, value)
    torch.testing.assert_close(grad_big, grad)
    with torch.no_grad():
        torch.testing.assert_close(loss(x, labels), value)


@pytest.mark.parametrize("make", LOSSES)
def test_native_path_limits(make, native_calls, monkeypatch):
    """float64, a reference set, mined indices and batches over MAX_ELEMS entries take the torch paths."""
    x, labels = _batch(24, 4, seed=2)
    loss = make()
    loss(x.double(), labels)
    loss(x[:12], labels[:12], ref_embeddings=x[12:], ref_labels=labels[12:])
    loss(x, labels, (torch.tensor([0, 1]), torch.tensor([4, 5]), torch.tensor([0, 1]), torch.tensor([2, 3])))
    assert native_calls["native"] == 0
    monkeypatch.setattr(native_rows, "MAX_ELEMS", 23 * 23)
    loss(x, labels)
    assert native_calls["native"] == 0
    monkeypatch.setattr(native_rows, "MAX_ELEMS", 24 * 24)
    loss(x, labels)
    assert native_calls["native"] == 1


# ------------------------------------------------------------------------------ dm_pair_finalize
def _ref_finalize(q, lab, fp, fn, cpos, upper, diag_rows):
    """The documented result of ``dm_pair_finalize``, in float64."""
    n = q.shape[0]
    same = lab[:, None] == lab[None, :]
    one = torch.ones(n, dtype=torch.float64)
    f_row = torch.where(same, (one if fp is None else fp.double())[:, None], (one if fn is None else fn.double())[:, None])
    if upper:
        qu = torch.triu(q.double(), 1)
        w = (qu + qu.T) * (f_row + f_row.T)
    else:
        w = q.double() * f_row + q.double().T * f_row.T
    if cpos is not None:
        w = w + same * (cpos.double()[:, None] + cpos.double()[None, :])
    w.fill_diagonal_(0.0)
    if diag_rows:
        w.diagonal().copy_(-w.sum(1))
    return w


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("n", [13, 37, 70])
def test_pair_finalize_every_mode_matches_its_formula(n, portable, request):
    """Every flag combination of ``dm_pair_finalize`` (the fused losses use four of them), on both
    paths (AVX2 8 x 8 blocks where the CPU has them; the portable 4 x 4 blocks), with rows past the
    last multiple of 8 and of 4."""
    if portable:
        request.getfixturevalue("generic_path")
    lib = load("pair_rows")
    gen = torch.Generator().manual_seed(n)
    lab = (torch.arange(n) // 3)[torch.randperm(n, generator=gen)].to(torch.int32)
    q = torch.randn(n, n, generator=gen)
    fp, fn, cpos = torch.rand(n, generator=gen), torch.rand(n, generator=gen), torch.randn(n, generator=gen)
    for upper in (0, 1):
        for with_f in (False, True):
            for with_c in (False, True):
                for diag_rows in (0, 1):
                    args = (fp if with_f else None, fn if with_f else None, cpos if with_c else None)
                    out = native_rows.finalize(lib, q.clone(), lab, *args, upper=bool(upper), diag_rows=bool(diag_rows))
                    expected = _ref_finalize(q, lab.long(), *args, upper, diag_rows)
                    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
