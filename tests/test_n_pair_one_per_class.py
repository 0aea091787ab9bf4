"""``NPairLoss(pairs="one_per_class")``: the paper's N-pair batch taken from a labelled batch (the
first two samples of each class), against the naive loop reference (float64 values and gradients),
PML's ``NPairsLoss``, and the native CPU float32 path (``dm_first_pairs``, ``dm_npair_gather``,
``dm_npair_rows``, ``dm_scatter_rows``) on both its AVX2 and portable instances."""
from __future__ import annotations

import math

import pytest
import torch
from reference.native import requires_cc
from reference.ref_losses_core import n_pair as ref_n_pair

from deepmetric._native import load
from deepmetric._native.labels import first_pair_rows
from deepmetric.errors import ConfigError, NonFiniteError
from deepmetric.losses import NPairLoss
from deepmetric.losses import n_pair as n_pair_module


def _first_pairs_naive(labels: list[int]) -> list[tuple[int, int]]:
    """(first, second) sample of every class with two or more, in order of first appearance."""
    seen: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        seen.setdefault(c, []).append(i)
    return [(v[0], v[1]) for v in seen.values() if len(v) >= 2]


def _reference(x: torch.Tensor, labels: list[int], l2_reg: float) -> torch.Tensor:
    """The paper's N-pair batch through the naive loop: pairs (a_c, p_c), the negatives of a_c the
    other classes' positives p_c'."""
    pos = _first_pairs_naive(labels)
    neg = [(a, p2) for a, p in pos for _, p2 in pos if p2 != p]
    if len(pos) < 2:
        return x.sum() * 0
    return ref_n_pair(x, None, pairs=(pos, neg), l2_reg=l2_reg)


# batches: classes in shuffled order, singletons (no pair), classes with more than two samples
LABELS = [
    [4, 1, 4, 2, 1, 7, 2, 2, 9, 4],
    [0, 0, 1, 1],
    [3, 5, 3, 5, 3, 5, 8],
    [int(v) for v in torch.randperm(40, generator=torch.Generator().manual_seed(3)) % 13],
]


def _x(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("labels", LABELS)
@pytest.mark.parametrize("l2_reg", [0.0, 0.01])
def test_matches_reference_float64(labels, l2_reg):
    """The torch path (float64: no native kernel) against the naive loop, values and gradients."""
    x = _x(len(labels), 5, seed=len(labels)).requires_grad_()
    y = torch.tensor(labels)
    ours = NPairLoss(l2_reg=l2_reg, pairs="one_per_class")(x, y)
    ref = _reference(x, labels, l2_reg)
    g_ours, = torch.autograd.grad(ours, x)
    g_ref, = torch.autograd.grad(ref, x)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(g_ours, g_ref, rtol=1e-9, atol=1e-12)


def test_gradcheck_float64():
    x = _x(10, 4, seed=1).requires_grad_()
    y = torch.tensor(LABELS[0])
    assert torch.autograd.gradcheck(lambda t: NPairLoss(l2_reg=0.1, pairs="one_per_class")(t, y), (x,))


@pytest.fixture(params=["avx2_or_portable", "portable"])
def native(request):
    """The native path, on the CPU's best instance and (``dm_force_generic``) the portable one."""
    lib = load("pair_rows")
    assert lib is not None
    if request.param == "portable":
        lib.dm_force_generic(1)
    yield lib
    lib.dm_force_generic(0)


@requires_cc
@pytest.mark.parametrize("classes,k,d", [(13, 3, 5), (128, 4, 128), (9, 2, 17), (2, 5, 8)])
def test_native_float32_matches_float64_reference(native, monkeypatch, classes, k, d):
    """CPU float32 with int64 labels takes the C path (spied); it must agree with the float64 naive
    loop, at class counts that leave a tail after the 8-lane blocks and below one block."""
    calls = []
    real = n_pair_module._npair_native
    monkeypatch.setattr(n_pair_module, "_npair_native", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(classes)
    labels = torch.arange(classes).repeat_interleave(k)[torch.randperm(classes * k, generator=g)]
    labels = torch.cat([labels, torch.tensor([classes + 7])])  # a singleton class: no pair
    x64 = _x(labels.numel(), d, seed=k).requires_grad_()
    x32 = x64.detach().float().requires_grad_()
    ours = NPairLoss(l2_reg=0.002, pairs="one_per_class")(x32, labels)
    ours.backward()
    ref = _reference(x64, labels.tolist(), 0.002)
    ref.backward()
    assert calls, "the native path was not taken"
    assert abs(ours.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))
    assert torch.allclose(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


@requires_cc
def test_native_large_logits_and_grad_scaling(native):
    """Logits far apart (the row shift, exponentials below -87 clamped) and an upstream gradient ≠ 1."""
    labels = torch.arange(20).repeat_interleave(2)
    x64 = (_x(40, 6, seed=9) * 6).requires_grad_()
    x32 = x64.detach().float().requires_grad_()
    (2.5 * NPairLoss(l2_reg=0.0, pairs="one_per_class")(x32, labels)).backward()
    (2.5 * _reference(x64, labels.tolist(), 0.0)).backward()
    assert torch.allclose(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)


@requires_cc
def test_native_retain_graph_no_grad_and_create_graph():
    labels = torch.tensor(LABELS[0])
    x64 = _x(10, 5, seed=2).requires_grad_()
    g_ref, = torch.autograd.grad(_reference(x64, LABELS[0], 0.0), x64)
    x = x64.detach().float().requires_grad_()
    loss = NPairLoss(l2_reg=0.0, pairs="one_per_class")(x, labels)
    (3 * loss).backward(retain_graph=True)  # the stored gradient is handed over ...
    first = x.grad.clone()
    loss.backward()  # ... and recomputed for the second backward
    assert torch.allclose(first.double(), 3 * g_ref, atol=1e-6)
    assert torch.allclose(x.grad.double(), 4 * g_ref, atol=1e-6)
    with torch.no_grad():
        value = NPairLoss(l2_reg=0.0, pairs="one_per_class")(x, labels)
    assert abs(value.item() - loss.item()) < 1e-6
    grad, = torch.autograd.grad(NPairLoss(l2_reg=0.0, pairs="one_per_class")(x, labels), x, create_graph=True)
    assert torch.allclose(grad.double(), g_ref, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fewer_than_two_pairs_is_zero(dtype):
    for labels in ([0, 1, 2, 3], [0, 0, 1, 2]):  # no pair; one pair (no negatives)
        x = _x(4, 3, seed=0, dtype=dtype).requires_grad_()
        loss = NPairLoss(l2_reg=0.0, pairs="one_per_class")(x, torch.tensor(labels))
        loss.backward()
        assert loss.item() == 0.0 and not x.grad.any()
        penalised = NPairLoss(l2_reg=0.1, pairs="one_per_class")(x, torch.tensor(labels))
        assert abs(penalised.item() - 0.1 * x.detach().norm(dim=1).mean().item()) < 1e-6  # the penalty alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_inputs_raise(dtype):
    y = torch.tensor(LABELS[0])
    x = _x(10, 5, seed=0, dtype=dtype)
    x[3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        NPairLoss(pairs="one_per_class")(x, y)
    x = _x(10, 5, seed=0, dtype=dtype)
    x[[0, 2]] = 1e25 if dtype == torch.float32 else 1e160  # class 4's pair: finite, its dot product is not
    with pytest.raises(NonFiniteError, match="overflow"):
        NPairLoss(l2_reg=0.0, pairs="one_per_class")(x, y)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="pairs"):
        NPairLoss(pairs="first")
    x, y = _x(10, 5, seed=0), torch.tensor(LABELS[0])
    with pytest.raises(ConfigError, match="one_per_class"):
        NPairLoss(pairs="one_per_class")(x, y, ref_embeddings=x, ref_labels=y)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_first_pair_rows(dtype):
    """The C pass (int64) and the torch fallback (int32) pick the same pairs; the C pass keeps the
    order of first appearance."""
    for labels in LABELS:
        rows = first_pair_rows(torch.tensor(labels, dtype=dtype))
        n = rows.numel() // 2
        got = sorted(zip(rows[:n].tolist(), rows[n:].tolist()))
        assert got == sorted(_first_pairs_naive(labels))
        if dtype == torch.int64 and load("pair_rows") is not None:
            assert list(zip(rows[:n].tolist(), rows[n:].tolist())) == _first_pairs_naive(labels)


@requires_cc
def test_npair_rows_kernel(native):
    """``dm_npair_rows`` against its formula in float64, its transpose output, and NaN / inf rows."""
    for n in (5, 8, 21):
        s = torch.randn(n, n, generator=torch.Generator().manual_seed(n)) * 4
        buf = torch.empty(2, n, n)
        buf[0] = s
        total = native.dm_npair_rows(buf.data_ptr(), n, n, 1.0 / n, buf[1].data_ptr())
        s64 = s.double()
        assert abs(total - float((torch.logsumexp(s64, 1) - s64.diagonal()).sum())) < 1e-4
        expected = (torch.softmax(s64, 1) - torch.eye(n, dtype=torch.float64)) / n
        assert torch.allclose(buf[0].double(), expected, atol=1e-7)
        assert torch.equal(buf[1], buf[0].T)
        for bad in (float("nan"), float("inf")):
            t = s.clone()
            t[n - 1, n // 2] = bad
            assert math.isnan(native.dm_npair_rows(t.data_ptr(), n, n, 1.0, None))


def test_pml_n_pairs_one_per_class():
    """Identity mapping to PML's NPairsLoss (raw dot products), values and gradients, on a shuffled
    P×K batch in float32 (the native path where it is built)."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import distances, losses

    g = torch.Generator().manual_seed(4)
    y = torch.arange(32).repeat_interleave(4)[torch.randperm(128, generator=g)]
    x = torch.nn.functional.normalize(torch.randn(128, 16, generator=g), dim=1)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = NPairLoss(l2_reg=0.0, pairs="one_per_class")(a, y)
    pml = losses.NPairsLoss(distance=distances.DotProductSimilarity(normalize_embeddings=False))(b, y)
    ours.backward(), pml.backward()
    assert torch.allclose(ours, pml, atol=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-7)
